"""The quantized weight formats that the kernels read, their round-to-nearest quantizers, and the
PyTorch definition of what each format means (`dequantize`), which every kernel is checked against.

A weight is a matrix [N, K] (output rows × input columns, as nn.Linear stores it) or a stack of them
[E, N, K] (one per routed expert). Formats:
- "int8": symmetric per output row. qweight int8 [..., N, K], scale fp32 [..., N]; w = q · scale.
- "int4": group-wise along K with a zero point, two values per byte. qweight uint8 [..., N, K/2] with
  column 2j in the low nibble and 2j+1 in the high one (the byte order of compressed-tensors' int32
  packing on a little-endian host), scale fp32 [..., N, G] and zero uint8 [..., N, G] with
  G = ceil(K / group); w = (q − zero) · scale. The last group may be short when group ∤ K.
  On the CPU, where moedesk's kernel reads it by vpdpbusd, the three may be in layout "blocks16" instead
  (int4_blocks, group_blocks: the same bytes and shapes, each block of 16 rows reordered);
  `QWeight.rows()` gives the row order that everything else reads.
- "fp8": DeepSeek's block-scaled e4m3. qweight float8_e4m3fn [..., N, K], scale fp32
  [..., ceil(N/bn), ceil(K/bk)]; w = q · scale of its (bn × bk) block.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

FORMATS = ("int8", "int4", "fp8")
INT4_GROUPS = (32, 64, 128)


@dataclass
class QWeight:
    fmt: str
    qweight: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None = None
    group: int = 0  # int4: columns per scale
    block: tuple[int, int] = (128, 128)  # fp8: (rows, columns) per scale
    layout: str = "rows"  # int4: "rows", or "blocks16" (int4_blocks: moedesk's CPU kernel's order)

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical (dequantized) shape [..., N, K]."""
        s = tuple(self.qweight.shape)
        return s[:-1] + (s[-1] * 2,) if self.fmt == "int4" else s

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scale, self.zero) if t is not None)

    def expert(self, e: int) -> "QWeight":
        """One matrix of a stacked [E, N, K] weight."""
        return QWeight(self.fmt, self.qweight[e], self.scale[e], None if self.zero is None else self.zero[e],
                       self.group, self.block, self.layout)

    def rows(self) -> "QWeight":
        """This weight with qweight in row order (a reordered copy where it is in blocks of 16 rows)."""
        if self.layout == "rows":
            return self
        return replace(self, qweight=int4_rows(self.qweight), scale=group_rows(self.scale), zero=group_rows(self.zero),
                       layout="rows")


def quantize_int8(w: torch.Tensor) -> QWeight:
    """Symmetric per output row: scale = max|w_row| / 127."""
    w = w.float()
    scale = (w.abs().amax(dim=-1) / 127).clamp(min=1e-12)
    q = torch.round(w / scale[..., None]).clamp(-127, 127).to(torch.int8)
    return QWeight("int8", q, scale)


def quantize_int4(w: torch.Tensor, group: int) -> QWeight:
    """Asymmetric per group of `group` columns: [min, max] of the group mapped onto 0..15."""
    w = w.float()
    *lead, N, K = w.shape
    if K % 2:
        raise ValueError(f"int4 needs an even number of input columns, got {K}")
    G = -(-K // group)
    pad = G * group - K
    wg = torch.nn.functional.pad(w, (0, pad)).view(*lead, N, G, group)
    if pad:  # padding must not widen the last group's range
        last = wg[..., -1, :group - pad]
        wg[..., -1, group - pad:] = last[..., :1]
    lo = wg.amin(dim=-1).clamp(max=0)
    hi = wg.amax(dim=-1).clamp(min=0)
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    zero = torch.round(-lo / scale).clamp(0, 15)
    q = torch.round(wg / scale[..., None] + zero[..., None]).clamp(0, 15).to(torch.uint8)
    q = q.view(*lead, N, G * group)[..., :K]
    return QWeight("int4", pack_int4(q), scale, zero.to(torch.uint8), group)


def quantize_fp8(w: torch.Tensor, block: tuple[int, int] = (128, 128)) -> QWeight:
    """DeepSeek's layout: e4m3 values with one fp32 scale per (bn × bk) block, max |w| → 448."""
    w = w.float()
    *lead, N, K = w.shape
    bn, bk = block
    Gn, Gk = -(-N // bn), -(-K // bk)
    wp = torch.nn.functional.pad(w, (0, Gk * bk - K, 0, Gn * bn - N))
    blocks = wp.view(*lead, Gn, bn, Gk, bk)
    scale = (blocks.abs().amax(dim=(-3, -1)) / 448).clamp(min=1e-12)  # [..., Gn, Gk]
    q = (blocks / scale[..., :, None, :, None]).view(*lead, Gn * bn, Gk * bk)[..., :N, :K]
    return QWeight("fp8", q.to(torch.float8_e4m3fn), scale, block=block)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 values 0..15 [..., K] → bytes [..., K/2]: even column low nibble, odd column high."""
    return (q[..., 0::2] | (q[..., 1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    lo, hi = packed & 0x0F, packed >> 4
    return torch.stack([lo, hi], dim=-1).flatten(-2)


def int4_blocks(q: torch.Tensor) -> torch.Tensor:
    """int4 bytes [..., N, K/2] in row order (N a multiple of 16, K of 64) → layout "blocks16", same shape:
    per block of 16 rows and 64 columns, 512 contiguous bytes holding 8 vectors of 16 words, vector j's
    word r = row r's bytes 4j..4j+3 of those columns: the registers moedesk's vpdpbusd kernel multiplies,
    so it streams each block in order and transposes nothing (kernels/cpu/moedesk_cpu.cpp, dpbusd_block)."""
    *lead, N, half = q.shape
    L = len(lead)
    blocks = q.reshape(*lead, N // 16, 16, half // 32, 8, 4)  # [.., block, row, column block, word, byte]
    return blocks.permute(*range(L), L, L + 2, L + 3, L + 1, L + 4).contiguous().view(q.shape)


def group_blocks(t: torch.Tensor) -> torch.Tensor:
    """int4 scales or zero points [..., N, G] in row order → layout "blocks16", same shape: per block of 16
    rows, [G, 16], the tiles the kernel multiplies by (one vector per group)."""
    *lead, N, G = t.shape
    return t.reshape(*lead, N // 16, 16, G).transpose(-1, -2).contiguous().view(t.shape)


def group_rows(t: torch.Tensor) -> torch.Tensor:
    """The inverse of group_blocks."""
    *lead, N, G = t.shape
    return t.reshape(*lead, N // 16, G, 16).transpose(-1, -2).contiguous().view(t.shape)


def int4_rows(q: torch.Tensor) -> torch.Tensor:
    """The inverse of int4_blocks: layout "blocks16" → row order."""
    *lead, N, half = q.shape
    L = len(lead)
    blocks = q.reshape(*lead, N // 16, half // 32, 8, 16, 4)  # [.., block, column block, word, row, byte]
    return blocks.permute(*range(L), L, L + 3, L + 1, L + 2, L + 4).contiguous().view(q.shape)


def dequantize(w: QWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The reference meaning of every format: the full-precision matrix [..., N, K]."""
    w = w.rows()
    if w.fmt == "int8":
        out = w.qweight.float() * w.scale.float()[..., None]
    elif w.fmt == "int4":
        K = w.qweight.shape[-1] * 2
        q = unpack_int4(w.qweight).float()
        idx = torch.arange(K, device=q.device) // w.group
        out = (q - w.zero.float()[..., idx]) * w.scale.float()[..., idx]
    elif w.fmt == "fp8":
        N, K = w.qweight.shape[-2:]
        bn, bk = w.block
        s = w.scale.float().repeat_interleave(bn, dim=-2)[..., :N, :].repeat_interleave(bk, dim=-1)[..., :K]
        out = w.qweight.float() * s
    else:
        raise ValueError(f"unknown weight format {w.fmt!r}; known: {FORMATS}")
    return out.to(dtype)
