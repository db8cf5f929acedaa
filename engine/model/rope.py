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
    def __init__(self, rope: RopeConfig, dim: int, interleave: bool):
        super().__init__()
        self.interleave = interleave
        self.scale = rope.cos_sin_scale()
        self.register_buffer("inv_freq", rope_inv_freq(rope, dim), persistent=False)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] → cos, sin [T, dim/2] in fp32."""
        angles = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]
        return angles.cos() * self.scale, angles.sin() * self.scale

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate x [..., T, dim]. Interleaved pairs (x0,x1),(x2,x3).. or halves (x_i, x_{i+dim/2})."""
        xf = x.float()
        if self.interleave:
            a, b = xf[..., 0::2], xf[..., 1::2]
        else:
            a, b = xf.chunk(2, dim=-1)
        ra, rb = a * cos - b * sin, b * cos + a * sin
        if self.interleave:
            out = torch.stack((ra, rb), dim=-1).flatten(-2)
        else:
            out = torch.cat((ra, rb), dim=-1)
        return out.to(x.dtype)
