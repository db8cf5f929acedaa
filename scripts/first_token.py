"""Time from a fresh process to the first token, with a cold kernel cache and a warm one:
`.venv/bin/python scripts/first_token.py [--model DIR] [--rounds 3] [--json OUT]`.

The engine compiles nothing at run time: its only compiled artifact is the C++ CPU kernels, which the
bootstrap builds once per machine (`python -m kernels.cpu`) into the user cache, keyed by source, torch,
Python and CPU. So "cold" is that build in a fresh cache folder followed by a warm start, and "warm" is a
process that imports the engine, loads the model and decodes one token of a chat prompt. Each start is a
new process (imports included); medians over the rounds.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
START = """
import json, sys, time
t0 = float(sys.argv[2])
import torch
from engine.generate import generate
from engine.pretrained import load_pretrained
from engine.sampling import SamplingParams
import kernels.cpu
t_import = time.time()
pre = load_pretrained(sys.argv[1])
t_load = time.time()
ids = pre.encode_prompt(chat=[{"role": "user", "content": "How do I read a file with pathlib?"}])
generate(pre.model, ids, SamplingParams(max_tokens=1, ignore_eos=True), eos_ids=pre.eos_ids)
t_first = time.time()
print(json.dumps({"kernels": kernels.cpu.available(), "import_s": t_import - t0, "load_s": t_load - t_import,
                  "first_token_s": t_first - t_load, "total_s": t_first - t0}))
"""


def start(model: str, env: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", START, model, repr(time.time())], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    from engine.paths import BUNDLED_MODEL

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(BUNDLED_MODEL))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", dest="json_out", default=None)
    args = ap.parse_args()
    rounds = []
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "MOEDESK_KERNEL_CACHE": cache, "HF_HUB_OFFLINE": "1"}
            t = time.time()
            subprocess.run([sys.executable, "-m", "kernels.cpu"], cwd=ROOT, env=env, check=True,
                           capture_output=True)
            build_s = time.time() - t
            cold = start(args.model, env)
            warm = start(args.model, env)
        rounds.append({"build_s": build_s, "cold_total_s": build_s + cold["total_s"], "cold": cold, "warm": warm})
        print(json.dumps(rounds[-1]), flush=True)
    med = lambda f: statistics.median(f(r) for r in rounds)  # noqa: E731
    summary = {"model": args.model, "rounds": rounds,
               "median_build_s": med(lambda r: r["build_s"]),
               "median_cold_to_first_token_s": med(lambda r: r["cold_total_s"]),
               "median_warm_to_first_token_s": med(lambda r: r["warm"]["total_s"]),
               "median_warm_load_s": med(lambda r: r["warm"]["load_s"]),
               "median_warm_first_token_s": med(lambda r: r["warm"]["first_token_s"])}
    print(json.dumps({k: v for k, v in summary.items() if k != "rounds"}, indent=1))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
