"""nn.Linear whose decode-shaped products on the CPU go through moedesk's kernels (kernels/cpu).

A few rows (decode, verification) times an fp32 or bf16 weight, at inference: the kernel reads the weight
once for all rows at close to memory bandwidth, where torch's CPU GEMV reaches about a third of it in
bf16 (docs/quantization.md). Anything else (prefill, training with autograd, the GPU) is F.linear.
"""
from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

from kernels import cpu

CPU_FORMATS = {torch.float32: cpu.FORMATS["fp32"], torch.bfloat16: cpu.FORMATS["bf16"]}
log = logging.getLogger(__name__)


def kernel_ready(x: torch.Tensor) -> bool:
    """Whether the CPU kernels can take products with these activations: CPU, no autograd, kernels built."""
    return x.device.type == "cpu" and x.dim() >= 2 and not torch.is_grad_enabled() and cpu.available()


def decode_shaped(x: torch.Tensor) -> bool:
    """Whether the CPU kernels take this product: few rows, no autograd, the kernels built."""
    return x.numel() <= cpu.MAX_ROWS * x.shape[-1] and kernel_ready(x)


def by_kernel_rows(product, x: torch.Tensor) -> torch.Tensor:
    """product(rows) over x's rows [..., K], cpu.MAX_ROWS at a time (what the kernels take): a prefill
    through the decode kernels, each call reading the weight once for its rows. fp32 out."""
    rows = x.reshape(-1, x.shape[-1])
    out = torch.cat([product(rows[i:i + cpu.MAX_ROWS]) for i in range(0, rows.shape[0], cpu.MAX_ROWS)])
    return out.view(*x.shape[:-1], out.shape[-1])


def bf16_valued(w: torch.Tensor) -> bool:
    """Whether every value of an fp32 tensor is a bf16 value (its low 16 bits are zero): a bf16
    checkpoint loaded in fp32. A sample is checked first, so other weights cost almost nothing; the
    answer is kept per tensor until its data changes (meters ask at every request)."""
    if w.dtype != torch.float32 or not w.is_contiguous() or w.device.type != "cpu":
        return False
    stamp = (w.data_ptr(), w._version)
    seen = getattr(w, "_moedesk_bf16_valued", None)  # kept on the tensor: (stamp, answer)
    if seen is None or seen[0] != stamp:
        bits = w.detach().view(-1).view(torch.int32)
        seen = (stamp, not bool((bits[:4096] & 0xFFFF).any()) and not bool((bits & 0xFFFF).any()))
        w._moedesk_bf16_valued = seen
    return seen[1]


def mark_bf16_valued(w: torch.Tensor) -> None:
    """Record that an fp32 tensor holds only bf16 values (it was filled from a bf16 checkpoint), so that
    bf16_valued need not scan it: the scan of a multi-GiB model took seconds before its first token."""
    if w.dtype == torch.float32 and w.device.type == "cpu":
        w._moedesk_bf16_valued = ((w.data_ptr(), w._version), True)


def free_memory() -> float:
    """Bytes of physical memory free now (where the OS says; elsewhere: no limit assumed)."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return float("inf")


def read_bytes(w: torch.Tensor) -> int:
    """Bytes of a weight as decoding reads it: the bf16 copy of kernel_dense where the CPU kernels run."""
    if w.dtype == torch.float32 and cpu.available() and bf16_valued(w):
        return w.numel() * 2
    return w.numel() * w.element_size()


def kernel_dense(w: torch.Tensor, blocks: bool = True) -> tuple[torch.Tensor, int]:
    """A full-precision weight as moedesk's kernels read it, with its format. An fp32 weight holding only
    bf16 values goes as a bf16 copy met by fp32 activations ("bf16_exact"): half the bytes read per step.
    On AVX-512, with rows a multiple of 16, K even and `blocks`, the copy is laid out in blocks of 16 rows
    ("bf16_blocks"): no horizontal sum per output and token, one weight vector for every verified token.
    The copy is extra memory (half the fp32 weight), made only while there is room for it twice over."""
    if bf16_valued(w):
        if free_memory() > 4 * w.numel():
            copy = w.detach().to(torch.bfloat16)
            pairs = w.shape[-2] % 16 == 0 and w.shape[-1] % 2 == 0  # blocks of 16 rows, pairs of columns
            if blocks and pairs and cpu.available() and torch.ops.moedesk.set_isa(-1) >= cpu.AVX512:
                return cpu.blocks16(copy), cpu.FORMATS["bf16_blocks"]
            return copy, cpu.FORMATS["bf16_exact"]
        log.info("no memory to spare for a bf16 copy of a %s weight; the kernels read it as fp32", tuple(w.shape))
    return w.detach(), CPU_FORMATS[w.dtype]


class Linear(torch.nn.Linear):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._fused = FusedArgs()  # the weight as the CPU kernel reads it (kernel_dense)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype in CPU_FORMATS and self.bias is None and decode_shaped(x):
            if torch.compiler.is_compiling():  # a traced step reads the weight as stored (no host checks)
                w, fmt = self.weight, CPU_FORMATS[self.weight.dtype]
            else:
                w, fmt = self.kernel_weight()
            return torch.ops.moedesk.linear(x, w, cpu.empty(), cpu.empty(), fmt, 0).to(x.dtype)
        return F.linear(x, self.weight, self.bias)

    def kernel_weight(self) -> tuple[torch.Tensor, int]:
        """The weight as the kernels read it (kernel_dense), kept until it changes: one copy whoever asks."""
        return self._fused.get(self, None, lambda: ([self.weight], kernel_dense(self.weight)))


def cpu_weight(module: torch.nn.Module) -> tuple | None:
    """A linear layer as moedesk's kernels take it: ((q, scale, zero), format, group), or None (a format
    they do not read, e.g. FP8)."""
    e = cpu.empty()
    if isinstance(module, torch.nn.Linear) and module.bias is None and module.weight.dtype in CPU_FORMATS:
        w, fmt = module.kernel_weight() if isinstance(module, Linear) else kernel_dense(module.weight)
        return (w, e, e), fmt, 0
    spec = getattr(module, "spec", None)
    if spec is not None and spec.fmt in ("int8", "int4") and hasattr(module, "qweight"):
        if spec.fmt == "int8":
            return (module.qweight, module.scale, e), cpu.FORMATS["int8"], 0
        if module.qweight.shape[-1] * 2 == module.in_features:
            return (module.qweight, module.scale, module.zero), cpu.quant_format("int4", module.layout), spec.group
    return None


class FusedArgs:
    """What a module derives from its weights (a fused kernel's arguments, re-laid-out weights), remade when
    they change: a submodule replaced (quantization, loading), a weight written in place (its version
    moves) or given new data (its data pointer moves). The check costs a few attribute reads per call, no
    traversal of the module tree. make() → (the weights used, the value)."""

    def __init__(self):
        self.key, self.tensors, self.stamps, self.value = None, [], [], None

    def get(self, module: torch.nn.Module, norm: torch.nn.Module | None, make):
        key = (id(norm), *map(id, module._modules.values()))
        if key != self.key or any((t.data_ptr(), t._version) != v for t, v in zip(self.tensors, self.stamps)):
            self.tensors, self.value = make()
            self.stamps = [(t.data_ptr(), t._version) for t in self.tensors]
            self.key = key
        return self.value


def own_weights(module: torch.nn.Module) -> list[torch.Tensor]:
    """A linear layer's weight tensors, by attribute: nn.Linear's weight or a quantized layer's buffers."""
    if hasattr(module, "qweight"):
        return [t for t in (module.qweight, module.scale, getattr(module, "zero", None)) if t is not None]
    return [module.weight]
