"""Rotary position embedding with YaRN scaling, as DeepSeek configs describe it."""
from __future__ import annotations

import math

import torch

from engine.model.config import RopeConfig


def rope_inv_freq(rope: RopeConfig, dim: int) -> torch.Tensor:
    """Inverse frequencies [dim/2], YaRN-blended between interpolation and extrapolation when configured."""
    base_freq = 1.0 / (rope.theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if not rope.is_yarn:
        return base_freq

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(rope.original_max_position_embeddings / (num_rotations * 2 * math.pi))
                / (2 * math.log(rope.theta)))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp  # 1 where the frequency is high enough to keep as is
    return base_freq / rope.factor * ramp + base_freq * extrapolate


class RotaryEmbedding(torch.nn.Module):
    """The rotation per position comes from a table built once (grown when a position passes its end)
    and indexed per forward pass: `at(positions)` → what `forward` applies.

    Interleaved pairs (x0,x1),(x2,x3).. (DeepSeek's layout): x as complex numbers times the table's
    unit rotations, three kernels. Halves (x_i, x_{i+dim/2}): cos/sin tables."""

    def __init__(self, rope: RopeConfig, dim: int, interleave: bool):
        super().__init__()
        self.interleave = interleave
        self.scale = rope.cos_sin_scale()
        self.register_buffer("inv_freq", rope_inv_freq(rope, dim), persistent=False)
        self.table: torch.Tensor | None = None  # [L, dim/2] complex64, or [2, L, dim/2] cos, sin
        self.pair: torch.Tensor | None = None  # [2, L, dim/2] cos, sin in either layout (the CPU kernel's)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] → cos, sin [T, dim/2] in fp32."""
        angles = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]
        return angles.cos() * self.scale, angles.sin() * self.scale

    def build(self, length: int) -> None:
        cos, sin = self.cos_sin(torch.arange(length, device=self.inv_freq.device))
        self.pair = torch.stack([cos, sin])
        self.table = torch.complex(cos, sin) if self.interleave else self.pair

    def at(self, positions: torch.Tensor, end: int) -> torch.Tensor:
        """The table rows of positions [T]; `end` (> every position, known on the host) sizes the table."""
        if not self.covers(end):
            if torch.compiler.is_compiling():  # no table to index yet: compute these rows in the graph
                cos, sin = self.cos_sin(positions)
                return torch.complex(cos, sin) if self.interleave else torch.stack([cos, sin])
            self.grow(end)
        return self.table[positions] if self.interleave else self.table[:, positions]

    def covers(self, end: int) -> bool:
        """Whether the table holds positions 0..end-1, on the frequencies' device."""
        return self.table is not None and end <= self.table.shape[-2] and self.table.device == self.inv_freq.device

    def grow(self, end: int) -> None:
        self.build(max(end, 2 * (0 if self.table is None else self.table.shape[-2]), 256))

    def rows(self, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [count, dim/2] of positions start.. as contiguous views (no copy)."""
        if not self.covers(start + count):
            self.grow(start + count)
        return self.pair[0, start:start + count], self.pair[1, start:start + count]

    def forward(self, x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        """Rotate x [B, T, (heads,) dim] by freqs (`at`) broadcast over batch and heads."""
        if self.interleave:
            if x.dim() == 4:
                freqs = freqs[:, None]
            xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
            return torch.view_as_real(xc * freqs).flatten(-2).to(x.dtype)
        cos, sin = (freqs[0][:, None], freqs[1][:, None]) if x.dim() == 4 else (freqs[0], freqs[1])
        a, b = x.float().chunk(2, dim=-1)
        return torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1).to(x.dtype)
