"""Decode speed in the app vs the engine alone, same prompts and settings, interleaved rounds:
`.venv/bin/python scripts/app_speed.py [--rounds 3] [--json OUT]`.

App: tests/app_soak.py (the real window offscreen, a worker process, each prompt in a new chat, accepted-
token colouring on), tok/s as the worker measures it in `done.stats`. Engine: `engine generate` logic in
one process, the same prompt, 256 tokens, ignore_eos, MTP k=auto. Reports per-prompt medians and the
ratio app/engine.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENGINE = """
import json, sys
from engine.generate import generate
from engine.paths import BUNDLED_MODEL
from engine.pretrained import load_pretrained
from engine.sampling import SamplingParams
from engine.speculative import SpeculativeConfig
sys.path.insert(0, "tests")
from app_soak import PROMPTS
pre = load_pretrained(str(BUNDLED_MODEL))
mode, out = sys.argv[1], []
for prompt in PROMPTS:
    ids = pre.encode_prompt(chat=[{"role": "user", "content": prompt}])
    r = generate(pre.model, ids, SamplingParams(max_tokens=int(sys.argv[2]), ignore_eos=True), eos_ids=pre.eos_ids,
                 speculative=SpeculativeConfig(mode="mtp", k="auto") if mode == "mtp" else None)
    out.append({"prompt": prompt, "decode_tokens_per_s": r.stats["decode_tokens_per_s"]})
print(json.dumps(out))
"""


def last_json(text: str):
    return json.loads([line for line in text.splitlines() if line.startswith(("{", "["))][-1])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--speculative", default="mtp", choices=["off", "mtp"])
    ap.add_argument("--colour", default="on", choices=["on", "off"])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen", HF_HUB_OFFLINE="1")
    app, engine = {}, {}
    for _ in range(args.rounds):
        out = subprocess.run([sys.executable, "tests/app_soak.py", "--replies", "5", "--per-chat", "1",
                              "--colour", args.colour, "--tokens", str(args.tokens), "--speculative", args.speculative],
                             capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
        for r in last_json(out.stdout)["replies"]:
            app.setdefault(r["prompt"], []).append(r["decode_tokens_per_s"])
        out = subprocess.run([sys.executable, "-c", ENGINE, args.speculative, str(args.tokens)], capture_output=True,
                             text=True, cwd=ROOT, env=env, timeout=900)
        for r in last_json(out.stdout):
            engine.setdefault(r["prompt"], []).append(r["decode_tokens_per_s"])
    rows = [{"prompt": p, "app_tok_s": statistics.median(app[p]), "engine_tok_s": statistics.median(engine[p]),
             "ratio": statistics.median(app[p]) / statistics.median(engine[p])} for p in app]
    result = {"rows": rows, "median_ratio": statistics.median(r["ratio"] for r in rows),
              "app_tok_s_median": statistics.median(v for vs in app.values() for v in vs),
              "engine_tok_s_median": statistics.median(v for vs in engine.values() for v in vs),
              "rounds": args.rounds, "tokens": args.tokens, "speculative": args.speculative, "colour": args.colour}
    for r in rows:
        print(f"{r['app_tok_s']:7.1f} app  {r['engine_tok_s']:7.1f} engine  {r['ratio']:.2f}  {r['prompt']}")
    print(f"median ratio app/engine {result['median_ratio']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
