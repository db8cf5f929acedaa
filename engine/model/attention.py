"""Multi-head Latent Attention (MLA) and its compressed decode cache.

Keys and values are compressed into one normalized latent of `kv_lora_rank` values per token, plus a
small rotary key of `qk_rope_head_dim` values shared by all heads; the cache holds only those two.
Prefill from an empty cache expands the latent into per-head keys and values and runs SDPA. Decode
and verification (a few new tokens against a long cache) absorb the key up-projection into the query
and the value up-projection into the output, so attention runs directly on the cached latents.

Positions come as a Python int (eager: the cache is sliced to the current length) or as a device tensor
of positions (the static step: the cache is written at those positions and attended whole under a mask,
so shapes never change and nothing is read back to the host; what CUDA graphs capture).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.model.config import ModelConfig
from engine.model.rope import RotaryEmbedding


class RMSNorm(torch.nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class LatentCache(torch.nn.Module):
    """Per layer: latent [B, S_max, kv_lora_rank] and rotary key [B, S_max, rope_dim].

    Positions past the caller's current length are stale and never read, so rolling back rejected
    speculative tokens costs nothing: the caller just continues from an earlier position.
    """

    def __init__(self, batch: int, max_len: int, kv_lora_rank: int, rope_dim: int, dtype, device):
        super().__init__()
        self.register_buffer("latent", torch.zeros(batch, max_len, kv_lora_rank, dtype=dtype, device=device),
                             persistent=False)
        self.register_buffer("rope_key", torch.zeros(batch, max_len, rope_dim, dtype=dtype, device=device),
                             persistent=False)

    @property
    def max_len(self) -> int:
        return self.latent.shape[1]

    def update(self, start: int, latent: torch.Tensor, rope_key: torch.Tensor):
        end = start + latent.shape[1]
        if end > self.max_len:
            raise ValueError(f"context full: position {end} exceeds the cache of {self.max_len} tokens")
        self.latent[:, start:end] = latent
        self.rope_key[:, start:end] = rope_key
        return self.latent[:, :end], self.rope_key[:, :end]

    def write(self, input_pos: torch.Tensor, latent: torch.Tensor, rope_key: torch.Tensor) -> None:
        """Store the new tokens at positions input_pos [T] (a device tensor: no host read; the caller
        checks the bounds, which it knows on the host)."""
        self.latent.index_copy_(1, input_pos, latent)
        self.rope_key.index_copy_(1, input_pos, rope_key)


class MLA(torch.nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        self.softmax_scale = cfg.softmax_scale
        H, nh = cfg.hidden_size, cfg.num_attention_heads
        if cfg.q_lora_rank:
            self.q_down_proj = torch.nn.Linear(H, cfg.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_up_proj = torch.nn.Linear(cfg.q_lora_rank, nh * cfg.qk_head_dim, bias=False)
        else:
            self.q_proj = torch.nn.Linear(H, nh * cfg.qk_head_dim, bias=False)
        self.kv_down_proj = torch.nn.Linear(H, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps)
        self.kv_up_proj = torch.nn.Linear(cfg.kv_lora_rank, nh * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.out_proj = torch.nn.Linear(nh * cfg.v_head_dim, H, bias=False)
        self.cache: LatentCache | None = None

    def query(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "q_proj"):
            q = self.q_proj(x)
        else:
            q = self.q_up_proj(self.q_norm(self.q_down_proj(x)))
        return q.view(*x.shape[:2], self.n_heads, -1)  # [B, T, nh, nope+rope]

    def forward(self, x: torch.Tensor, rotary: RotaryEmbedding, cos, sin,
                start_pos: int | torch.Tensor | None) -> torch.Tensor:
        """x [B, T, H]; start_pos None: causal attention within x only (training, scoring); an int: where
        x starts in the cache; a tensor: the positions [T] of x (the static step)."""
        q_nope, q_rope = self.query(x).split([self.nope_dim, self.rope_dim], dim=-1)
        q_rope = rotary(q_rope, cos[:, None], sin[:, None])
        latent, k_rope = self.kv_down_proj(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        latent, k_rope = self.kv_norm(latent), rotary(k_rope, cos, sin)  # [B, T, C], [B, T, R]

        if isinstance(start_pos, torch.Tensor):
            self.cache.write(start_pos, latent, k_rope)
            out = self.attend_absorbed(q_nope, q_rope, self.cache.latent, self.cache.rope_key, start_pos)
        elif start_pos is None or self.cache is None:
            out = self.attend_expanded(q_nope, q_rope, latent, k_rope)
        else:
            all_latent, all_rope = self.cache.update(start_pos, latent, k_rope)
            if start_pos == 0:
                out = self.attend_expanded(q_nope, q_rope, latent, k_rope)
            else:
                query_pos = torch.arange(start_pos, start_pos + x.shape[1], device=x.device)
                out = self.attend_absorbed(q_nope, q_rope, all_latent, all_rope, query_pos)
        return self.out_proj(out.flatten(2))

    def attend_expanded(self, q_nope, q_rope, latent, k_rope):
        """Causal attention with per-head keys and values expanded from the latents."""
        B, T = latent.shape[:2]
        kv = self.kv_up_proj(latent).view(B, T, self.n_heads, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_rope[:, :, None].expand(-1, -1, self.n_heads, -1)], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=True, scale=self.softmax_scale)
        return out.transpose(1, 2)  # [B, T, nh, v]

    def attend_absorbed(self, q_nope, q_rope, all_latent, all_rope, query_pos: torch.Tensor):
        """T new queries at positions query_pos [T] against S cached latents, never expanding them per
        head. Cache position s is visible to query t iff s <= query_pos[t]: later ones are the future,
        or stale entries of rejected drafts."""
        S = all_latent.shape[1]
        w = self.kv_up_proj.weight.view(self.n_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        w_k, w_v = w[:, :self.nope_dim], w[:, self.nope_dim:]  # [nh, nope, C], [nh, v, C]
        q_latent = torch.einsum("bthd,hdc->bthc", q_nope, w_k)
        scores = (torch.einsum("bthc,bsc->bhts", q_latent, all_latent)
                  + torch.einsum("bthr,bsr->bhts", q_rope, all_rope)) * self.softmax_scale
        future = torch.arange(S, device=scores.device)[None, :] > query_pos[:, None]  # [T, S]
        probs = scores.float().masked_fill(future, float("-inf")).softmax(dim=-1).to(q_nope.dtype)
        out_latent = torch.einsum("bhts,bsc->bthc", probs, all_latent)
        return torch.einsum("bthc,hdc->bthd", out_latent, w_v)  # [B, T, nh, v]
