"""Fuzz a real worker process from outside, as a buggy client would: random and malformed protocol lines
(lone surrogates, invalid UTF-8, NUL, 10 MB lines, deep nesting, wrong types, NaN/inf/1e308/negative
numbers), each followed by a ping that must be answered within 10 s. Writes the counts as JSON.

    .venv/bin/python scripts/fuzz_worker.py --backend native --model assets/models/moedesk-mini --lines 2600
    .venv/bin/python scripts/fuzz_worker.py --backend llamacpp --model tiny.gguf --lines 1000
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.client import WorkerClient  # noqa: E402
from engine.protocol import Cancel, ChatMessage, Generate, GenerateParams, Load  # noqa: E402

TEMPLATES = [Generate(id="a", messages=[ChatMessage(role="user", content="hi")], params=GenerateParams(max_tokens=4)),
             Load(path="/nonexistent/model"), Cancel(id="a")]
PATHOLOGICAL = [b"[" * 100_000, b'{"type":"ping"' + b" " * (10 * 2**20) + b"}", b'{"type":"load","path":"\x00"}',
                b'{"type":"cancel","id":"\xff\xfe"}', b"\xc3\x28" * 10, b'{"type":"generate"}', b"null", b"1e999",
                b'{"type":"generate","id":"x","messages":[{"role":"user","content":"hi"}],"params":{"max_tokens":1e308}}',
                b'{"type":"generate","id":"x","messages":[{"role":"user","content":"hi"}],"params":{"top_p":NaN}}']


def text(rng: random.Random) -> str:
    pool = [lambda: chr(rng.randint(0xD800, 0xDFFF)), lambda: chr(rng.randint(32, 0x2FFF)), lambda: "\x00",
            lambda: "\U0001f600", lambda: rng.choice("abc \n\"\\")]
    return "".join(rng.choice(pool)() for _ in range(rng.randint(0, 10)))


def value(rng: random.Random, depth: int = 0):
    kinds = ["none", "bool", "int", "float", "text"] + (["list", "dict"] if depth < 3 else [])
    k = rng.choice(kinds)
    if k == "none":
        return None
    if k == "bool":
        return rng.random() < 0.5
    if k == "int":
        return rng.choice([-1, 0, 10**30, -2**63, rng.randint(-10**6, 10**6)])
    if k == "float":
        return rng.choice([float("nan"), float("inf"), -float("inf"), 1e308, -1e308, rng.uniform(-5, 5)])
    if k == "text":
        return text(rng)
    if k == "list":
        return [value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {text(rng): value(rng, depth + 1) for _ in range(rng.randint(0, 3))}


def line(rng: random.Random) -> bytes:
    r = rng.random()
    if r < 0.05:
        return rng.choice(PATHOLOGICAL)
    if r < 0.12:
        return bytes(rng.randrange(256) for _ in range(rng.randint(1, 64))).replace(b"\n", b" ")
    d = json.loads(rng.choice(TEMPLATES).to_json())
    target = d["params"] if "params" in d and rng.random() < 0.5 else d
    target[rng.choice(sorted(target))] = value(rng)
    return json.dumps(d, ensure_ascii=rng.random() < 0.5).encode("utf-8", "surrogatepass")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="native")
    ap.add_argument("--model", default="assets/models/moedesk-mini")
    ap.add_argument("--lines", type=int, default=2600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    c = WorkerClient()
    c.start()
    c.send(Load(path=args.model, backend=args.backend))
    assert c.wait_for("loaded", timeout=180).type == "loaded", "the model did not load"
    counts = {"backend": args.backend, "model": args.model, "tried": 0, "answered": 0, "hung": 0, "crashed": 0,
              "errors": {}}
    t0 = time.time()
    for _ in range(args.lines):
        raw = line(rng)
        counts["tried"] += 1
        c.proc.stdin.write(raw + b"\n")
        c.proc.stdin.write(b'{"type":"ping"}\n')
        c.proc.stdin.flush()
        deadline = time.monotonic() + 10
        answered = crashed = False
        while time.monotonic() < deadline:
            try:
                ev = c.next_event(max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                break
            if ev.type == "error":
                counts["errors"][ev.code] = counts["errors"].get(ev.code, 0) + 1
                if ev.code == "worker_died":
                    counts["crashed"] += 1
                    crashed = True
                    print(f"crashed on {raw[:200]!r}", file=sys.stderr)
                    c.restart()
                    c.send(Load(path=args.model, backend=args.backend))
                    c.wait_for("loaded", timeout=180)
                    break
            if ev.type == "pong":
                answered = True
                break
        if answered:
            counts["answered"] += 1
        elif not crashed:
            counts["hung"] += 1
            print(f"no pong after {raw[:200]!r}", file=sys.stderr)
        c.send(Cancel(id="a"))  # a generation the line started ends before the next line
        c.send('{"type":"ping"}')
        while c.next_event(60).type != "pong":
            pass
    counts["seconds"] = round(time.time() - t0, 1)
    c.close()
    print(json.dumps(counts))
    if args.json:
        Path(args.json).write_text(json.dumps(counts, indent=1))
    return 0 if counts["hung"] == 0 and counts["crashed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
