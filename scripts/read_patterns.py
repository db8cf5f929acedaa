"""How fast this machine's memory serves the CPU kernels' read patterns, with no arithmetic: GB/s of a
read-only loop (2 threads over 256 MiB, each thread half) for the patterns in docs/cpu_decode.md's
"4 and 8 tokens" section, beside torch's fp32 sum (what `engine bench` calls the read bandwidth), in one
process, interleaved, medians of 5. Builds a small C++ extension on first use (a compiler is needed, as
for kernels/cpu). Usage: .venv/bin/python scripts/read_patterns.py"""
from __future__ import annotations

import json
import statistics
import sys
import timeit
from pathlib import Path

import torch
from torch.utils.cpp_extension import load_inline

SOURCE = r"""
#include <torch/extension.h>
#include <immintrin.h>
#include <omp.h>
#include <chrono>

static inline void prefetch_l2(const void* p) { asm volatile("prefetcht1 (%0)" : : "r"(p)); }

// mode 0: sequential 64-byte lines. 1: R rows of `row` bytes side by side, 64 bytes of each a step, a
// prefetch `ahead` bytes past each read (0: none). 2: the same rows, prefetching the next block of R
// rows in address order (the int4 kernel's way).
double read_rate(torch::Tensor buf, int64_t mode, int64_t R, int64_t row, int64_t ahead, int64_t reps) {
  const uint8_t* base = buf.data_ptr<uint8_t>();
  const int64_t half = buf.numel() / 2;
  volatile int64_t sink = 0;
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t rep = 0; rep < reps; ++rep) {
#pragma omp parallel num_threads(2)
    {
      const uint8_t* p0 = base + omp_get_thread_num() * half;
      __m512i acc = _mm512_setzero_si512();
      if (mode == 0) {
        for (int64_t i = 0; i < half; i += 64) acc = _mm512_xor_si512(acc, _mm512_loadu_si512(p0 + i));
      } else {
        const int64_t rows = half / row, steps = row / 64, per = R;  // mode 2: R lines of the next block a step
        for (int64_t r0 = 0; r0 + R <= rows; r0 += R) {
          const uint8_t* rp = p0 + r0 * row;
          for (int64_t s = 0; s < steps; ++s) {
            if (mode == 2)
              for (int64_t i = 0; i < per; ++i) prefetch_l2(rp + R * row + (s * per + i) * 64);
            for (int64_t r = 0; r < R; ++r) {
              const uint8_t* q = rp + r * row + s * 64;
              if (mode == 1 && ahead) prefetch_l2(q + ahead);
              acc = _mm512_xor_si512(acc, _mm512_loadu_si512(q));
            }
          }
        }
      }
      int64_t v[8];
      _mm512_storeu_si512(v, acc);
      sink += v[0];
    }
  }
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return double(buf.numel()) * reps / s / 1e9;
}
"""

PATTERNS = {  # name: (mode, rows side by side, row bytes, prefetch distance)
    "sequential": (0, 1, 4096, 0),
    "4 rows of 4 KB, prefetch 16 KB ahead (bf16, int8)": (1, 4, 4096, 16384),
    "4 rows of 4 KB, no prefetch": (1, 4, 4096, 0),
    "16 rows of 1 KB, next block prefetched (int4)": (2, 16, 1024, 0),
    "16 rows of 1 KB, prefetch 16 KB ahead per row": (1, 16, 1024, 16384),
    "16 rows of 1 KB, no prefetch": (1, 16, 1024, 0),
}


def main() -> int:
    if not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        print("needs AVX-512", file=sys.stderr)
        return 1
    build = Path.home() / ".cache" / "moedesk" / "read_patterns"
    build.mkdir(parents=True, exist_ok=True)
    ext = load_inline("moedesk_read_patterns", cpp_sources=SOURCE, functions=["read_rate"],
                      extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"],
                      build_directory=str(build))
    buf = torch.randint(0, 255, (256 * 2**20,), dtype=torch.uint8)
    as_float = buf.view(torch.float32)
    rates: dict[str, list[float]] = {"torch fp32 sum": [], **{k: [] for k in PATTERNS}}
    for _ in range(5):
        t = min(timeit.repeat(as_float.sum, number=1, repeat=3))
        rates["torch fp32 sum"].append(buf.numel() / t / 1e9)
        for name, args in PATTERNS.items():
            rates[name].append(ext.read_rate(buf, *args, 3))
    print(json.dumps({k: round(statistics.median(v), 1) for k, v in rates.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
