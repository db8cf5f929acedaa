"""The int8 multiply-add ceiling of this CPU core, beside what moedesk's int4 kernel reaches in cache.

`vpdpbusd` (AVX512-VNNI) is the densest integer multiply-add there is here: 64 int8 products per
instruction. An int4 product of M tokens against a 16-row × 64-column block (512 bytes of weights) needs
16 · 64 · M / 64 = 16 · M of them, so a core's vpdpbusd rate bounds the bytes of int4 weights it can
take per second at M tokens, however the weights are laid out: rate / (16 · M) · 512. This compiles a
loop of independent vpdpbusd (zmm and ymm) with g++ -march=native, times it on one thread, and times
moedesk.linear on an in-cache int4 matrix (1024 × 2048, group 64) on one thread for 1, 4 and 8 tokens.
JSON on stdout. Usage: .venv/bin/python scripts/vnni_ceiling.py"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kernels import cpu  # noqa: E402
from kernels.formats import quantize_int4  # noqa: E402

LOOP = r"""
#include <immintrin.h>
#include <chrono>
#include <cstdio>
template <class V, class F> double rate(F dp, V a, V b) {  // instructions/s, best of 60
  V acc[12] = {};
  const long n = 12000000;
  double best = 0;
  for (int rep = 0; rep < 60; ++rep) {
    auto t0 = std::chrono::steady_clock::now();
    for (long i = 0; i < n; i += 12) {
      for (int j = 0; j < 12; ++j) acc[j] = dp(acc[j], a, b);
      asm volatile("" : "+v"(a));
    }
    double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (n / s > best) best = n / s;
  }
  volatile int sink = 0;
  for (int j = 0; j < 12; ++j) sink += reinterpret_cast<int*>(&acc[j])[0];
  return best;
}
int main() {
  double z = rate<__m512i>([](__m512i c, __m512i a, __m512i b) { return _mm512_dpbusd_epi32(c, a, b); },
                           _mm512_set1_epi8(3), _mm512_set1_epi8(5));
  double y = rate<__m256i>([](__m256i c, __m256i a, __m256i b) { return _mm256_dpbusd_epi32(c, a, b); },
                           _mm256_set1_epi8(3), _mm256_set1_epi8(5));
  printf("%f %f\n", z, y);
}
"""


def vnni_rates() -> tuple[float, float]:
    """(zmm, ymm) vpdpbusd instructions per second on one thread."""
    with tempfile.TemporaryDirectory() as d:
        src, exe = Path(d) / "loop.cpp", Path(d) / "loop"
        src.write_text(LOOP)
        subprocess.run(["g++", "-O2", "-march=native", str(src), "-o", str(exe)], check=True)
        z, y = map(float, subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.split())
    return z, y


def kernel_rate(tokens: int, N: int = 1024, K: int = 2048) -> float:
    """Bytes/s of int4 weights moedesk.linear reads in cache at this many tokens, best of 300 × 10 calls."""
    q = quantize_int4(torch.randn(N, K, generator=torch.Generator().manual_seed(0)) * 0.05, 64)
    x = torch.randn(tokens, K)
    for _ in range(50):
        torch.ops.moedesk.linear(x, q.qweight, q.scale, q.zero, 3, 64)
    best = float("inf")
    for _ in range(300):
        t0 = time.perf_counter()
        for _ in range(10):
            torch.ops.moedesk.linear(x, q.qweight, q.scale, q.zero, 3, 64)
        best = min(best, (time.perf_counter() - t0) / 10)
    return N * K / 2 / best


def main() -> int:
    if not cpu.available():
        print("moedesk's CPU kernels are not built: python -m kernels.cpu", file=sys.stderr)
        return 1
    torch.set_num_threads(1)
    z, y = vnni_rates()
    out = {"vpdpbusd_zmm_per_s": round(z / 1e9, 3) * 1e9, "vpdpbusd_ymm_per_s": round(y / 1e9, 3) * 1e9}
    for m in (1, 4, 8):
        ceiling = max(z, y * 0.5) / (16 * m) * 512
        got = kernel_rate(m)
        out[f"tokens={m}"] = {"ceiling_GBps": round(ceiling / 1e9, 1), "kernel_GBps": round(got / 1e9, 1),
                              "of_ceiling": round(got / ceiling, 2)}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
