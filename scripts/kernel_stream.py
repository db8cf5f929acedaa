"""moedesk's CPU products streaming from memory, GB/s: V2-Lite expert shapes (gate_up 2816 × 2048,
down 2048 × 1408), enough distinct matrices to leave the cache, for 1, 4 and 8 activation rows, beside the
machine's read bandwidth (a 512 MiB fp32 sum), in one process. The figures behind docs/cpu_decode.md's
"Reading at the memory's speed". Formats: bf16, int8, int4 (row order), int4_blocks (the engine's layout
on AVX-512 VNNI). Usage: .venv/bin/python scripts/kernel_stream.py [--formats bf16,int8,int4]"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.bench import read_bandwidth  # noqa: E402
from kernels import cpu  # noqa: E402
from kernels.formats import group_blocks, int4_blocks, quantize_int4, quantize_int8  # noqa: E402

SHAPES = [(2816, 2048), (2048, 1408)]


def weight(fmt: str, N: int, K: int, seed: int) -> tuple:
    """moedesk.linear's weight arguments (q, scale, zero, format, group)."""
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(seed)) * 0.05
    e = cpu.empty()
    if fmt == "bf16":
        return w.bfloat16(), e, e, 1, 0
    if fmt == "int8":
        q = quantize_int8(w)
        return q.qweight, q.scale, e, 2, 0
    q = quantize_int4(w, 64)
    if fmt == "int4_blocks":  # the layout the engine keeps int4 in on AVX-512 VNNI (kernels/formats.py)
        return int4_blocks(q.qweight), group_blocks(q.scale), group_blocks(q.zero), 6, 64
    return q.qweight, q.scale, q.zero, 3, 64


def nbytes(args: tuple) -> int:
    return sum(t.numel() * t.element_size() for t in args[:3])


def stream_rate(mats: list[tuple], rows: int, repeat: int = 7) -> float:
    """Bytes/s of one product per matrix, every matrix in turn, median of `repeat` sweeps."""
    x = torch.randn(rows, mats[0][0].shape[1] * (2 if mats[0][3] in (3, 6) else 1))
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for a in mats:
            torch.ops.moedesk.linear(x, *a)
        times.append(time.perf_counter() - t0)
    return sum(nbytes(a) for a in mats) / statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--formats", default="bf16,int8,int4")
    ap.add_argument("--rows", default="1,4,8", help="activation rows (tokens) per product")
    ap.add_argument("--mib", type=int, default=96, help="MiB of distinct weights per shape (beyond the L3)")
    args = ap.parse_args()
    if not cpu.available():
        print("moedesk's CPU kernels are not built: python -m kernels.cpu", file=sys.stderr)
        return 1
    out = {"threads": torch.get_num_threads(), "read_bandwidth_GBps": round(read_bandwidth() / 1e9, 1)}
    for fmt in args.formats.split(","):
        for N, K in SHAPES:
            one = nbytes(weight(fmt, N, K, 0))
            mats = [weight(fmt, N, K, i) for i in range(max(2, args.mib * 2**20 // one))]
            for rows in map(int, args.rows.split(",")):
                out[f"{fmt} {N}x{K} rows={rows} GBps"] = round(stream_rate(mats, rows) / 1e9, 1)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
