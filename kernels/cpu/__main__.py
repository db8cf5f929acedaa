"""`python -m kernels.cpu`: build the C++ CPU kernels for this machine (bootstrap.py runs it)."""
from __future__ import annotations

import sys
import time

from kernels import cpu


def main() -> int:
    if cpu.library_path().is_file():
        print(f"moedesk CPU kernels: built ({cpu.library_path()})")
        return 0
    t0 = time.perf_counter()
    try:
        path = cpu.build(verbose="-v" in sys.argv)
    except Exception as e:  # no compiler, no OpenMP: the engine falls back to PyTorch's products
        print(f"could not build the moedesk CPU kernels ({type(e).__name__}: {str(e)[-400:]})", file=sys.stderr)
        return 1
    print(f"moedesk CPU kernels: built in {time.perf_counter() - t0:.0f} s ({path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
