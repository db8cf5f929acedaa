"""moedesk's C++ CPU kernels (moedesk_cpu.cpp): decode-shaped products that read each weight once.

Built once per machine (`python -m kernels.cpu`, which `bootstrap.py` runs) with torch's extension
builder into the user cache folder, under a key of the source, torch, Python and the CPU's instruction
set (the build targets this CPU). The engine only loads a finished build, never builds in front of a
user: without one (no compiler, a failed build, MOEDESK_CPU_KERNELS=0) it runs the PyTorch products.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import sys
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("moedesk_cpu.cpp")
FORMATS = {"fp32": 0, "bf16": 1, "int8": 2, "int4": 3, "bf16_exact": 4, "bf16_blocks": 5, "int4_blocks": 6}
AVX512 = 2  # moedesk::set_isa's level for AVX-512
MAX_ROWS = 16  # what the kernels take (decode and verification); more rows go to the PyTorch products
log = logging.getLogger(__name__)


def cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def build_key() -> str:
    h = hashlib.sha256(SOURCE.read_bytes())
    for part in (torch.__version__, sys.version, platform.machine(), cpu_flags()):
        h.update(part.encode())
    return h.hexdigest()[:16]


def build_dir() -> Path:
    base = os.environ.get("MOEDESK_KERNEL_CACHE")
    if not base:
        import platformdirs
        base = platformdirs.user_cache_dir("moedesk", appauthor=False)
    return Path(base) / "kernels" / build_key()


def library_path() -> Path:
    return build_dir() / f"moedesk_cpu_{build_key()}.so"


def build(verbose: bool = False) -> Path:
    """Compile the kernels for this machine (about half a minute); returns the library's path."""
    from torch.utils import cpp_extension

    folder = build_dir()
    folder.mkdir(parents=True, exist_ok=True)
    flags = ["-O3", "-fopenmp", "-ffp-contract=fast"]
    if platform.machine() in ("x86_64", "AMD64"):
        flags += ["-march=native", "-mprefer-vector-width=512"]
    elif platform.machine() in ("aarch64", "arm64"):
        flags += ["-mcpu=native"]
    cpp_extension.load(name=f"moedesk_cpu_{build_key()}", sources=[str(SOURCE)], extra_cflags=flags,
                       extra_ldflags=["-fopenmp"], build_directory=str(folder), is_python_module=False,
                       verbose=verbose)
    return library_path()


_loaded: bool | None = None  # the answer of available(), once asked


def available() -> bool:
    """Whether the built kernels are loaded (tried once; a plain global after that, which tracing reads)."""
    global _loaded
    if _loaded is None:
        _loaded = _load()
    return _loaded


def _load() -> bool:
    if os.environ.get("MOEDESK_CPU_KERNELS", "1") == "0":
        return False
    path = library_path()
    if not path.is_file():
        log.info("moedesk CPU kernels not built (%s); using PyTorch's products. `python -m kernels.cpu` builds them",
                 path)
        return False
    try:
        if not hasattr(torch.ops.moedesk, "linear"):
            torch.ops.load_library(str(path))
        register_fakes()
    except Exception as e:  # a stale or broken build: the PyTorch products still work
        log.warning("moedesk CPU kernels failed to load (%s); using PyTorch's products", e)
        return False
    return True


def register_fakes() -> None:
    """Shapes for tracing (torch.compile, the host-read checks): the ops are opaque to the tracer."""
    @torch.library.register_fake("moedesk::linear")
    def _(x, q, scale, zero, fmt, group):
        return x.new_empty(*x.shape[:-1], q.shape[0], dtype=torch.float32)

    @torch.library.register_fake("moedesk::moe")
    def _(x, ids, weights, gu_q, gu_s, gu_z, dn_q, dn_s, dn_z, fmt, group):
        return x.new_empty(x.shape, dtype=torch.float32)


def quant_format(fmt: str, layout: str = "rows") -> int:
    """The kernels' format code of a quantized weight (int8, int4) in its layout (kernels/formats.py)."""
    return FORMATS["int4_blocks"] if layout == "blocks16" else FORMATS[fmt]


def int4_blocks_ok(N: int, K: int, group: int) -> bool:
    """Whether the built kernels read an int4 weight [N, K] in layout "blocks16" on this CPU now."""
    return available() and torch.ops.moedesk.int4_blocks_ok(N, K, group)


def empty() -> torch.Tensor:
    return _EMPTY


_EMPTY = torch.empty(0)


def blocks16(w: torch.Tensor) -> torch.Tensor:
    """bf16 rows [..., N, K] (N a multiple of 16, K even) in the kernels' format "bf16_blocks": each block
    of 16 rows stored by pairs of columns ((n, k) at (n // 16) · 16K + 32 (k // 2) + 2 (n % 16) + k % 2),
    kept in a tensor of the same shape."""
    *lead, N, K = w.shape
    blocks = w.reshape(*lead, N // 16, 16, K // 2, 2).transpose(-2, -3)
    return blocks.contiguous().reshape(w.shape)
