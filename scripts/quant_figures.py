"""Perplexity of the bundled model on its held-out text, unquantized and under each quantization, in
one run (the figures in its MODEL_CARD.md and docs/quantization.md). Usage:
    python scripts/quant_figures.py [--out FILE.json]
    python scripts/quant_figures.py --ppl FILE.json --bench BENCH.json --bandwidth-bound TEXT --card
the second form writes the measured figures into the bundled model's figures.json and MODEL_CARD.md
(BENCH.json: `engine bench --quant fp32,bf16,int8,int4 --k 2,auto --json BENCH.json`)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.evaluate import perplexity  # noqa: E402
from engine.pretrained import BUNDLED_MODEL, load_pretrained  # noqa: E402
from engine.quant import QuantSpec, weight_bytes  # noqa: E402
from engine.train.default_model import DEFAULT_WORK  # noqa: E402

VARIANTS = {"fp32": None, "int8": QuantSpec("int8"), "int4 g32": QuantSpec("int4", 32),
            "int4 g64": QuantSpec("int4", 64), "int4 g128": QuantSpec("int4", 128),
            "int8 + int8 embed/head": QuantSpec("int8", embed_head=True),
            "int4 g64 + int8 embed/head": QuantSpec("int4", 64, embed_head=True)}


def held_out_text() -> str:
    cached = DEFAULT_WORK / "held_out.txt"
    if cached.is_file():
        return cached.read_text(encoding="utf-8")
    from engine.train.corpus import build_corpus
    return "\n\n".join(build_corpus().held_out)  # as default_model.py writes it


def measure_perplexities() -> dict:
    text = held_out_text()
    results = {}
    for name, spec in VARIANTS.items():
        pre = load_pretrained(BUNDLED_MODEL, device="cpu", quant=spec)
        t0 = time.perf_counter()
        r = perplexity(pre, text)
        results[name] = {**r, **weight_bytes(pre.model), "seconds": round(time.perf_counter() - t0, 1)}
        base = results["fp32"]["perplexity"]
        print(f"{name:<28} ppl {r['perplexity']:8.3f} ({100 * (r['perplexity'] / base - 1):+.2f}%)  "
              f"weights {results[name]['model_bytes'] / 2**20:6.1f} MiB", flush=True)
    return results


BENCH_NAME = {"fp32": "float32", "int8": "int8", "int4 g64": "int4"}


def card_figures(ppl: dict, bench: dict, bandwidth_bound: str) -> dict:
    """figures.json's "quantization" entry from the two measurements."""
    base = ppl["fp32"]["perplexity"]
    variants = {}
    for name, r in ppl.items():
        v = {"perplexity": r["perplexity"], "perplexity_change_pct": 100 * (r["perplexity"] / base - 1),
             "model_bytes": r["model_bytes"], "bytes_per_token": r["bytes_per_token"]}
        b = BENCH_NAME.get(name)
        if b and f"{b} off" in bench["configs"]:
            off, auto = bench["configs"][f"{b} off"], bench["configs"][f"{b} mtp k=auto"]
            v.update({"decode_tokens_per_s": off["median_decode_tokens_per_s"],
                      "decode_vs_fp32": off["speedup_vs_first_variant_off"], "mtp_auto_speedup": auto["speedup"],
                      "identical": all(c["identical_to_off"] for k, c in bench["configs"].items() if k.startswith(b))})
        variants[name] = v
    s = bench["settings"]
    return {"tokens": ppl["fp32"]["tokens"], "variants": variants, "bench_variants": ",".join(bench["variants"]),
            "bench_settings": f"greedy, {s['max_tokens']} tokens, {s['repeat']} interleaved rounds, medians, "
                              f"{bench['environment']['threads']} threads",
            "bench_all": {k: {x: c[x] for x in ("median_decode_tokens_per_s", "speedup", "speedup_vs_first_variant_off",
                                                "identical_to_off")} for k, c in bench["configs"].items()},
            "bandwidth_bound": bandwidth_bound}


def write_card(figures: dict) -> None:
    from engine.train.export import model_card
    path = BUNDLED_MODEL / "figures.json"
    info = json.loads(path.read_text())
    info["figures"]["quantization"] = figures
    path.write_text(json.dumps(info, indent=1))
    (BUNDLED_MODEL / "MODEL_CARD.md").write_text(model_card(info))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None, help="write the perplexities to this JSON file")
    ap.add_argument("--ppl", default=None, help="perplexities measured before (--out of an earlier run)")
    ap.add_argument("--bench", default=None, help="engine bench --quant fp32,bf16,int8,int4 --json output")
    ap.add_argument("--bandwidth-bound", default="", help="one sentence: the bandwidth-bound model's figures")
    ap.add_argument("--card", action="store_true", help="write the figures into the bundled model's card")
    args = ap.parse_args()
    ppl = json.loads(Path(args.ppl).read_text()) if args.ppl else measure_perplexities()
    if args.out:
        Path(args.out).write_text(json.dumps(ppl, indent=1))
    if args.card:
        write_card(card_figures(ppl, json.loads(Path(args.bench).read_text()), args.bandwidth_bound))


if __name__ == "__main__":
    main()
