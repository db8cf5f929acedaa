"""Make a tuned checkpoint the bundled model: copy its files into assets/models/moedesk-mini and measure
it as the build's export does (held-out perplexity, MTP acceptance, `engine bench`), keeping the build's
provenance in figures.json and adding the tuning's before/after figures to MODEL_CARD.md. The
quantization table is dropped (it described the old weights); scripts/quant_figures.py measures it
again afterwards. Usage:
    python scripts/ship_tuned.py TUNED_DIR --before EVAL.json --after EVAL.json --minutes M [--tuning T.json]
(EVAL.json: `engine eval --text-file DIR --json` of the bundled model and of TUNED_DIR on held-out files;
T.json: the tuning run's tuning.json where TUNED_DIR is a later `--steps 0` recalibration of it)"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.model.checkpoint import checkpoint_files  # noqa: E402
from engine.pretrained import BUNDLED_MODEL, load_pretrained  # noqa: E402
from engine.train.default_model import DEFAULT_WORK, prepare_data  # noqa: E402
from engine.train.export import measure, model_card  # noqa: E402

FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")


def eval_figures(path: str) -> dict:
    """Perplexity, expert union per 4-token window (token-weighted over the files, main layers' mean) and
    batch-wise max/mean load from `engine eval --json`."""
    e = json.loads(Path(path).read_text())
    n = sum(t["tokens"] for t in e["texts"])
    union = sum(t["routing"]["expert_union"]["3"] * t["tokens"] for t in e["texts"]) / n
    return {"perplexity": e["perplexity"], "union": union, "batch_load": e["routing"]["batch_max_mean_load"],
            "files": e["routing"]["documents"]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("tuned")
    ap.add_argument("--before", required=True, help="engine eval --json of the bundled model as built")
    ap.add_argument("--after", required=True, help="engine eval --json of the tuned model, same files")
    ap.add_argument("--minutes", type=float, required=True, help="wall time of the tuning run")
    ap.add_argument("--tuning", default=None, help="the tuning run's tuning.json (default: TUNED_DIR's)")
    ap.add_argument("--calibration", default=None,
                    help="how the bias was balanced, for the card (e.g. 'batch-wise on 32 held-out development files')")
    args = ap.parse_args()
    src, out = Path(args.tuned), BUNDLED_MODEL
    info = json.loads((out / "figures.json").read_text())
    tokenizer = (src / "tokenizer.json").read_bytes()
    if tokenizer != (out / "tokenizer.json").read_bytes():
        raise SystemExit("the tuned model has another tokenizer than the bundled one")
    for f in checkpoint_files(src):
        shutil.copy2(f, out / f.name)
    for name in FILES:
        shutil.copy2(src / name, out / name)
    prepare_data(DEFAULT_WORK)
    pre = load_pretrained(out, device="cpu")
    t0 = time.perf_counter()
    figures = measure(pre, DEFAULT_WORK)
    figures["measure_s"] = time.perf_counter() - t0
    before, after = eval_figures(args.before), eval_figures(args.after)
    tuning = json.loads(Path(args.tuning or src / "tuning.json").read_text())
    info["routing"] = {"settings": tuning["settings"], "before": before, "after": after, "minutes": args.minutes,
                       "test_files": after["files"]}
    if args.calibration:
        info["routing"]["calibration"] = args.calibration
    info["figures"] = figures  # the old weights' quantization table goes: quant_figures.py measures the new
    info["size_bytes"] = (out / "model.safetensors").stat().st_size
    (out / "figures.json").write_text(json.dumps(info, indent=1))
    (out / "MODEL_CARD.md").write_text(model_card(info))
    print(json.dumps({k: figures[k] for k in ("held_out_perplexity", "mtp_greedy_acceptance")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
