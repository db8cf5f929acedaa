"""Write held-out document folders for `engine eval` / `engine routing-report` (--text-file DIR):

  DIR/modules/  the 7 held-out modules cut into ≥ 3,000-character pieces (split_documents)
  DIR/dev/      64 unseen standard-library files (tests, idlelib, lib2to3, tkinter, turtledemo): choose on these
  DIR/test/     64 others from the same packages, disjoint from dev: report on these

Usage: python scripts/held_out_docs.py DIR
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine.train.corpus import build_corpus, split_documents, unseen_documents  # noqa: E402


def write(folder: Path, docs: dict[str, str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in docs.items():
        (folder / (name.replace("/", "__") + ".txt")).write_text(text, encoding="utf-8")
    print(f"{folder}: {len(docs)} documents, {sum(map(len, docs.values())):,} characters")


def main() -> None:
    out = Path(sys.argv[1])
    pieces = split_documents(build_corpus().held_out)
    write(out / "modules", {f"piece{i:03d}": t for i, t in enumerate(pieces)})
    for split in ("dev", "test"):
        write(out / split, unseen_documents(split))


if __name__ == "__main__":
    main()
