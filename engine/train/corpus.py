"""The default model's corpus, built deterministically from the running Python's standard library.

Two parts: the library's source files, and a chat part in which a user asks about a module, class or
function and the assistant answers with its signature and documentation. Sources are read and parsed
with `ast`, never imported (importing some standard modules has side effects). Modules are split into
training and held-out sets by a hash of their name, so held-out text comes from modules never seen.
"""
from __future__ import annotations

import ast
import hashlib
import importlib.util
import os
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

HELD_OUT_PERCENT = 8
SKIP_MODULES = {"test", "idlelib", "lib2to3", "turtledemo", "tkinter", "ensurepip", "pydoc_data", "this",
                "antigravity", "__phello__", "_pydev"}
MAX_FILE_BYTES = 300_000

QUESTIONS = {
    "function": ["What does `{name}` do?", "How do I use `{name}`?", "Explain `{name}`.",
                 "What is the signature of `{name}`?"],
    "class": ["What is `{name}`?", "Explain the class `{name}`.", "How do I use `{name}`?"],
    "module": ["What is the `{name}` module for?", "Tell me about the `{name}` module."],
}


@dataclass
class Corpus:
    train: list[str] = field(default_factory=list)  # documents
    held_out: list[str] = field(default_factory=list)
    train_chats: list[list[dict]] = field(default_factory=list)  # conversations (role/content)
    held_out_chats: list[list[dict]] = field(default_factory=list)
    modules_train: list[str] = field(default_factory=list)
    modules_held_out: list[str] = field(default_factory=list)

    def digest(self) -> str:
        h = hashlib.sha256()
        for part in (self.train, self.held_out):
            for doc in part:
                h.update(doc.encode("utf-8", "surrogatepass"))
                h.update(b"\0")
        for part in (self.train_chats, self.held_out_chats):
            for chat in part:
                for m in chat:
                    h.update(f"{m['role']}\x1f{m['content']}\0".encode("utf-8", "surrogatepass"))
        return h.hexdigest()

    def describe(self) -> dict:
        chars = lambda docs: sum(len(d) for d in docs)
        chat_chars = lambda chats: sum(len(m["content"]) for c in chats for m in c)
        return {"python": sys.version.split()[0], "sha256": self.digest(),
                "modules_train": len(self.modules_train), "modules_held_out": len(self.modules_held_out),
                "held_out_modules": self.modules_held_out,
                "source_chars_train": chars(self.train), "source_chars_held_out": chars(self.held_out),
                "chats_train": len(self.train_chats), "chats_held_out": len(self.held_out_chats),
                "chat_chars_train": chat_chars(self.train_chats)}


def is_held_out(module: str) -> bool:
    return int(hashlib.sha256(module.encode()).hexdigest(), 16) % 100 < HELD_OUT_PERCENT


def module_files(name: str) -> list[tuple[str, Path]]:
    """(dotted module name, path) for every .py file of a top-level standard module, tests excluded."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return []
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return []
    origin = Path(spec.origin)
    if not spec.submodule_search_locations:
        return [(name, origin)]
    out = []
    for root, dirs, files in os.walk(origin.parent):
        dirs[:] = sorted(d for d in dirs if d not in ("test", "tests", "__pycache__") and not d.startswith("."))
        rel = Path(root).relative_to(origin.parent)
        for f in sorted(files):
            if f.endswith(".py"):
                parts = [name, *rel.parts] + ([] if f == "__init__.py" else [f[:-3]])
                out.append((".".join(parts), Path(root) / f))
    return out


def signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    return f"({ast.unparse(node.args)})" + (f" -> {ast.unparse(node.returns)}" if node.returns else "")


def chats_for(module: str, tree: ast.Module) -> list[list[dict]]:
    """Question/answer conversations about the documented objects of one module."""
    chats = []

    def add(kind: str, name: str, answer: str) -> None:
        templates = QUESTIONS[kind]
        q = templates[int(hashlib.md5(name.encode()).hexdigest(), 16) % len(templates)]
        chats.append([{"role": "user", "content": q.format(name=name)},
                      {"role": "assistant", "content": answer}])

    def public_functions(body):
        return [n for n in body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and not n.name.startswith("_")]

    def add_function(owner: str, node) -> None:
        d = ast.get_docstring(node)
        if d:
            add("function", f"{owner}.{node.name}", f"`{owner}.{node.name}{signature(node)}`\n\n{d.strip()}")

    doc = ast.get_docstring(tree)
    if doc:
        add("module", module, f"`{module}`: {doc.strip()}")
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
            add_function(module, node)
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            d = ast.get_docstring(node)
            if d:
                cname = f"{module}.{node.name}"
                methods = public_functions(node.body)
                extra = f"\n\nMethods: {', '.join(m.name for m in methods[:12])}." if methods else ""
                add("class", cname, f"`class {cname}`\n\n{d.strip()}{extra}")
                for m in methods:
                    add_function(cname, m)
    return chats


def build_corpus() -> Corpus:
    corpus = Corpus()
    for top in sorted(sys.stdlib_module_names):
        if top in SKIP_MODULES or top.startswith("_"):
            continue
        held = is_held_out(top)
        files = module_files(top)
        if not files:
            continue
        (corpus.modules_held_out if held else corpus.modules_train).append(top)
        for dotted, path in files:
            try:
                raw = path.read_bytes()
                if len(raw) > MAX_FILE_BYTES:
                    continue
                source = raw.decode("utf-8")
                tree = ast.parse(source)
            except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
                continue
            (corpus.held_out if held else corpus.train).append(f"# {dotted}\n{source}")
            (corpus.held_out_chats if held else corpus.train_chats).extend(chats_for(dotted, tree))
    return corpus


def split_documents(texts: list[str], min_chars: int = 3000) -> list[str]:
    """Source files cut at top-level `def`/`class` lines into pieces of at least min_chars (the last piece
    of a file may be shorter): the many documents a batch-wise balance measurement draws one window from
    each of (engine/routing_stats.py), where the held-out set has only a few files."""
    out = []
    for text in texts:
        piece: list[str] = []
        size = 0
        for line in text.splitlines(keepends=True):
            if size >= min_chars and line.startswith(("def ", "class ", "async def ")):
                out.append("".join(piece))
                piece, size = [], 0
            piece.append(line)
            size += len(line)
        if piece:
            out.append("".join(piece))
    return out


UNSEEN_PACKAGES = ("test", "idlelib", "lib2to3", "tkinter", "turtledemo")  # in SKIP_MODULES: never trained on


def unseen_documents(split: str, count: int = 64, min_chars: int = 3000, max_chars: int = 60_000) -> dict[str, str]:
    """Held-out documents for routing measurements: whole standard-library files from packages the corpus
    skips (tests, idlelib, lib2to3, tkinter, turtledemo), so no model trained here has seen them. Files
    are split by a hash of their path into two disjoint sets, "dev" (to choose tuning settings on) and
    "test" (to report on), and `count` of each are taken in hash order. Name → text."""
    if split not in ("dev", "test"):
        raise ValueError("split must be 'dev' or 'test'")
    lib = Path(sysconfig.get_paths()["stdlib"])
    ranked = []
    for package in UNSEEN_PACKAGES:
        for path in sorted((lib / package).rglob("*.py")):
            rel = path.relative_to(lib).as_posix()
            h = int(hashlib.sha256(rel.encode()).hexdigest(), 16)
            if ("dev", "test")[h % 2] != split:
                continue
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            if min_chars <= len(text) <= max_chars:
                ranked.append((h, rel, text))
    ranked.sort()
    return {rel: f"# {rel}\n{text}" for _, rel, text in ranked[:count]}
