"""The integer multiply-add ceiling of this CPU core, beside what moedesk's int4 and int8 kernels reach in
cache.

`vpdpbusd` (AVX512-VNNI) is the densest integer multiply-add there is here: 64 int8 products per
instruction, i.e. 32 bytes of int4 weights met by one token. An int4 product of M tokens therefore needs
M of them per 32 bytes of weights, so a core's vpdpbusd rate bounds the bytes of int4 weights it can take
per second at M tokens, however the weights are laid out: rate · 32 / M. int8 weights go by `vpdpwssd`
against int16 activations (32 products, 32 bytes of weights): the same bound with that instruction's
rate. This compiles loops of independent vpdpbusd (zmm, ymm) and vpdpwssd (zmm) with g++ -march=native
(and one where 4 shuffles come with every 8 products, which shows whether they share the issue slots),
times them on one thread, and times moedesk.linear on an in-cache 1024 × 2048 matrix (int4 group 64,
int8) on one thread for 1, 4 and 8 tokens. JSON on stdout. Usage: .venv/bin/python scripts/vnni_ceiling.py"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kernel_stream import weight  # noqa: E402  (scripts/, this script's folder)
from kernels import cpu  # noqa: E402

LOOP = r"""
#include <chrono>
#include <cstdio>
// 8 independent operations an iteration on registers (inline assembly: nothing for the compiler to fold or
// spill); best rate of 40 timings, operations a second
template <class F> double rate(F body) {
  double best = 0;
  const long n = 1000000;
  for (int rep = 0; rep < 40; ++rep) {
    auto t0 = std::chrono::steady_clock::now();
    for (long i = 0; i < n; ++i) body();
    double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (8 * n / s > best) best = 8 * n / s;
  }
  return best;
}
#define CLOBBER "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9"
#define EIGHT(OP, R) OP " %%" R "15, %%" R "14, %%" R "0\n\t" OP " %%" R "15, %%" R "14, %%" R "1\n\t" \
  OP " %%" R "15, %%" R "14, %%" R "2\n\t" OP " %%" R "15, %%" R "14, %%" R "3\n\t" \
  OP " %%" R "15, %%" R "14, %%" R "4\n\t" OP " %%" R "15, %%" R "14, %%" R "5\n\t" \
  OP " %%" R "15, %%" R "14, %%" R "6\n\t" OP " %%" R "15, %%" R "14, %%" R "7\n\t"
int main() {
  double busd = rate([] { asm volatile(EIGHT("vpdpbusd", "zmm") ::: CLOBBER); });
  double busd_y = rate([] { asm volatile(EIGHT("vpdpbusd", "ymm") ::: CLOBBER); });
  double wssd = rate([] { asm volatile(EIGHT("vpdpwssd", "zmm") ::: CLOBBER); });
  // 8 vpdpbusd beside 4 vpermt2q: whether the shuffles take the products' issue slots
  double mixed = rate([] { asm volatile(EIGHT("vpdpbusd", "zmm")
      "vpermt2q %%zmm15, %%zmm14, %%zmm8\n\tvpermt2q %%zmm15, %%zmm14, %%zmm9\n\t"
      "vpermt2q %%zmm15, %%zmm14, %%zmm8\n\tvpermt2q %%zmm15, %%zmm14, %%zmm9\n\t" ::: CLOBBER); });
  printf("%f %f %f %f\n", busd, busd_y, wssd, mixed);
}
"""


def vnni_rates() -> tuple[float, ...]:
    """vpdpbusd zmm, vpdpbusd ymm and vpdpwssd zmm instructions per second on one thread, and vpdpbusd zmm
    a second when 4 vpermt2q come with every 8."""
    with tempfile.TemporaryDirectory() as d:
        src, exe = Path(d) / "loop.cpp", Path(d) / "loop"
        src.write_text(LOOP)
        subprocess.run(["g++", "-O2", "-march=native", str(src), "-o", str(exe)], check=True)
        return tuple(map(float, subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.split()))


def kernel_rate(fmt: str, tokens: int, N: int = 1024, K: int = 2048) -> float:
    """Bytes/s of int4 or int8 weights moedesk.linear reads in cache at this many tokens, best of 300 × 10
    calls."""
    args = weight(fmt, N, K, 0)
    x = torch.randn(tokens, K)
    for _ in range(50):
        torch.ops.moedesk.linear(x, *args)
    best = float("inf")
    for _ in range(300):
        t0 = time.perf_counter()
        for _ in range(10):
            torch.ops.moedesk.linear(x, *args)
        best = min(best, (time.perf_counter() - t0) / 10)
    return args[0].numel() * args[0].element_size() / best


def main() -> int:
    if not cpu.available():
        print("moedesk's CPU kernels are not built: python -m kernels.cpu", file=sys.stderr)
        return 1
    torch.set_num_threads(1)
    z, y, w, mixed = vnni_rates()
    out = {"vpdpbusd_zmm_per_s": round(z / 1e9, 3) * 1e9, "vpdpbusd_ymm_per_s": round(y / 1e9, 3) * 1e9,
           "vpdpwssd_zmm_per_s": round(w / 1e9, 3) * 1e9,
           "vpdpbusd_zmm_per_s_beside_half_as_many_vpermt2q": round(mixed / 1e9, 3) * 1e9}
    # int4: 64 products (32 bytes of weights) per vpdpbusd; int8 (vpdpwssd, int16 activations): 32 products,
    # 32 bytes
    per_instruction = {"int4": (max(z, y * 0.5), 32), "int8": (w, 32)}
    for fmt, (rate, nbytes) in per_instruction.items():
        for m in (1, 4, 8):
            ceiling = rate * nbytes / m
            got = kernel_rate(fmt, m)
            out[f"{fmt} tokens={m}"] = {"ceiling_GBps": round(ceiling / 1e9, 1), "kernel_GBps": round(got / 1e9, 1),
                                        "of_ceiling": round(got / ceiling, 2)}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
