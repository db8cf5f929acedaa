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
from engine.model.linear import CPU_FORMATS, FusedArgs, Linear, cpu_weight, decode_shaped, own_weights
from engine.model.rope import RotaryEmbedding
from kernels import cpu


class RMSNorm(torch.nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)  # one fused kernel
        # Other dtypes round as transformers does: normalize in fp32, round, then scale.
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


class LatentCache(torch.nn.Module):
    """Per layer: latent [B, S_max, kv_lora_rank] and rotary key [B, S_max, rope_dim], side by side in
    one buffer kv [B, S_max, C+R], so that attention scores against both are one product.

    Positions past the caller's current length are stale and never read, so rolling back rejected
    speculative tokens costs nothing: the caller just continues from an earlier position.
    """

    def __init__(self, batch: int, max_len: int, kv_lora_rank: int, rope_dim: int, dtype, device):
        super().__init__()
        self.rank = kv_lora_rank
        self.register_buffer("kv", torch.zeros(batch, max_len, kv_lora_rank + rope_dim, dtype=dtype, device=device),
                             persistent=False)

    @property
    def latent(self) -> torch.Tensor:
        return self.kv[..., :self.rank]

    @property
    def rope_key(self) -> torch.Tensor:
        return self.kv[..., self.rank:]

    @property
    def max_len(self) -> int:
        return self.kv.shape[1]

    def update(self, start: int, latent: torch.Tensor, rope_key: torch.Tensor) -> torch.Tensor:
        """Store T new tokens from position `start`; → the cache up to them, kv [B, start+T, C+R]."""
        end = start + latent.shape[1]
        if end > self.max_len:
            raise ValueError(f"context full: position {end} exceeds the cache of {self.max_len} tokens")
        self.kv[:, start:end, :self.rank] = latent
        self.kv[:, start:end, self.rank:] = rope_key
        return self.kv[:, :end]

    def write(self, input_pos: torch.Tensor, latent: torch.Tensor, rope_key: torch.Tensor) -> None:
        """Store the new tokens at positions input_pos [T] (a device tensor: no host read; the caller
        checks the bounds, which it knows on the host)."""
        self.kv.index_copy_(1, input_pos, torch.cat([latent, rope_key], dim=-1))


class MLA(torch.nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        self.softmax_scale = cfg.softmax_scale
        H, nh = cfg.hidden_size, cfg.num_attention_heads
        if cfg.q_lora_rank:
            self.q_down_proj = Linear(H, cfg.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_up_proj = Linear(cfg.q_lora_rank, nh * cfg.qk_head_dim, bias=False)
        else:
            self.q_proj = Linear(H, nh * cfg.qk_head_dim, bias=False)
        self.kv_down_proj = Linear(H, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps)
        self.kv_up_proj = Linear(cfg.kv_lora_rank, nh * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.out_proj = Linear(nh * cfg.v_head_dim, H, bias=False)
        self.cache: LatentCache | None = None
        self._absorbed = FusedArgs()  # w_k, w_v of the absorbed products
        self._fused = FusedArgs()

    def query(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "q_proj"):
            q = self.q_proj(x)
        else:
            q = self.q_up_proj(self.q_norm(self.q_down_proj(x)))
        return q.view(*x.shape[:2], self.n_heads, -1)  # [B, T, nh, nope+rope]

    def forward(self, x: torch.Tensor, rotary: RotaryEmbedding, freqs: torch.Tensor,
                start_pos: int | torch.Tensor | None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, H]; freqs: rotary.at(positions of x); start_pos None: causal attention within x only
        (training, scoring); an int: where x starts in the cache; a tensor: the positions [T] of x (the
        static step). mask: the additive attention bias [T, S] of the absorbed paths (None: no mask,
        one new token against the cache up to it)."""
        q_nope, q_rope = self.query(x).split([self.nope_dim, self.rope_dim], dim=-1)
        q_rope = rotary(q_rope, freqs)
        latent, k_rope = self.kv_down_proj(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        latent, k_rope = self.kv_norm(latent), rotary(k_rope, freqs)  # [B, T, C], [B, T, R]

        if isinstance(start_pos, torch.Tensor):
            self.cache.write(start_pos, latent, k_rope)
            out = self.attend_absorbed(q_nope, q_rope, self.cache.kv, mask)
        elif start_pos is None or self.cache is None:
            out = self.attend_expanded(q_nope, q_rope, latent, k_rope)
        else:
            kv = self.cache.update(start_pos, latent, k_rope)
            if start_pos == 0:
                out = self.attend_expanded(q_nope, q_rope, latent, k_rope)
            else:
                out = self.attend_absorbed(q_nope, q_rope, kv, mask)
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

    def fused_args_for(self, x: torch.Tensor, norm: RMSNorm, rotary: RotaryEmbedding, start_pos, first: int = 1):
        """The CPU kernel's (tensors, ints, floats) for these new tokens, or None where it does not apply
        (prefill, the static step, batches, the GPU, a weight format it lacks). first: the lowest start_pos
        taken (the main model's prefill from 0 keeps the expanded attention of the PyTorch layers)."""
        if (not isinstance(start_pos, int) or start_pos < first or self.cache is None or x.shape[0] != 1
                or not decode_shaped(x)):
            return None
        args = self._fused.get(self, norm, lambda: self.fused_args(norm, rotary.interleave))
        if args is not None and start_pos + x.shape[1] > self.cache.max_len:
            raise ValueError(f"context full: position {start_pos + x.shape[1]} exceeds the cache of "
                             f"{self.cache.max_len} tokens")
        return args

    def fused_decode(self, x: torch.Tensor, norm: RMSNorm, rotary: RotaryEmbedding, start_pos) -> torch.Tensor | None:
        """x + self(norm(x)) for a few new tokens in one call of moedesk's CPU kernel (kernels/cpu), or None
        where it does not apply (fused_args_for)."""
        args = self.fused_args_for(x, norm, rotary, start_pos)
        if args is None:
            return None
        tensors, ints, floats = args
        cos, sin = rotary.rows(start_pos, x.shape[1])
        y = torch.ops.moedesk.mla_decode(x[0], tensors, [start_pos] + ints, floats, self.cache.kv[0], cos, sin)
        return y[None].to(x.dtype)

    def fused_args(self, norm: RMSNorm, interleave: bool):
        """(the weights they are made of, the kernel's tensors and settings or None: a format it lacks)."""
        projections = ([self.q_down_proj, self.q_up_proj] if hasattr(self, "q_down_proj") else [self.q_proj])
        projections += [self.kv_down_proj, self.out_proj]
        sources = [norm.weight, self.kv_up_proj.weight, self.kv_norm.weight,
                   *(t for m in projections for t in own_weights(m))]
        if hasattr(self, "q_norm"):
            sources.append(self.q_norm.weight)
        parts = [cpu_weight(m) for m in projections]
        w = self.kv_up_proj.weight.detach()
        if any(p is None for p in parts) or w.dtype not in CPU_FORMATS:
            return sources, None
        e = cpu.empty()
        f32 = lambda t: t.detach().float().contiguous()  # noqa: E731
        if hasattr(self, "q_down_proj"):
            (qd, qd_fmt, qd_group), q_norm, rest = parts[0], f32(self.q_norm.weight), parts[1:]
        else:
            (qd, qd_fmt, qd_group), q_norm, rest = ((e, e, e), 0, 0), e, parts
        (qu, qu_fmt, qu_group), (kvd, kvd_fmt, kvd_group), (out, out_fmt, out_group) = rest
        w_k, w_v = self.split_up_proj(w)  # [nh, nope, C] scaled, [nh, C, V]
        tensors = [f32(norm.weight), *qd, q_norm, *qu, *kvd, f32(self.kv_norm.weight),
                   w_k.transpose(1, 2).contiguous(), w_v.transpose(1, 2).contiguous(), *out]
        q_lora = self.q_down_proj.out_features if hasattr(self, "q_down_proj") else 0
        ints = [self.n_heads, self.nope_dim, self.rope_dim, self.v_dim, self.kv_lora_rank, q_lora,
                int(interleave), qd_fmt, qd_group, qu_fmt, qu_group, kvd_fmt, kvd_group,
                CPU_FORMATS[w.dtype], out_fmt, out_group]
        return sources, (tensors, ints, [norm.eps, self.softmax_scale])

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_up_proj split per head for the absorbed products: w_k [nh, nope, C] scaled by the softmax
        scale (so scores need no scaling of their own) and w_v transposed to [nh, C, v]. Made again
        whenever the weight changes (loading, training)."""
        w = self.kv_up_proj.weight
        if torch.compiler.is_compiling():  # traced as ops on the weight (a compiler folds them)
            return self.split_up_proj(w)
        made = lambda: ([w], [t.contiguous() for t in self.split_up_proj(w.detach())])  # noqa: E731
        return self._absorbed.get(self, None, made)

    def split_up_proj(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = w.view(self.n_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        return w[:, :self.nope_dim] * self.softmax_scale, w[:, self.nope_dim:].transpose(1, 2)

    def attend_absorbed(self, q_nope, q_rope, kv, mask):
        """T new queries against S cached tokens kv [B, S, C+R], never expanding the latents per head:
        the key up-projection goes into the query, the value up-projection after the weighted sum.
        mask [T, S] (additive, -inf where a cached position is the future or a rejected draft's)."""
        w_k, w_v = self.absorbed_weights()
        q_latent = q_nope.transpose(1, 2) @ w_k  # [B, nh, T, C], scaled
        q = torch.cat([q_latent, q_rope.transpose(1, 2) * self.softmax_scale], dim=-1)  # [B, nh, T, C+R]
        scores = q @ kv[:, None].transpose(-1, -2)  # [B, nh, T, S]
        if mask is not None:
            scores = scores + mask
        probs = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
        out_latent = probs @ kv[:, None, :, :self.kv_lora_rank]  # [B, nh, T, C]
        return (out_latent @ w_v).transpose(1, 2)  # [B, T, nh, v]


def attention_mask(query_pos: torch.Tensor, length: int, dtype) -> torch.Tensor:
    """Additive bias [T, S]: cache position s is visible to query t iff s <= query_pos[t]; later ones
    are the future, or stale entries of rejected drafts."""
    future = torch.arange(length, device=query_pos.device)[None, :] > query_pos[:, None]
    return torch.zeros(future.shape, dtype=dtype, device=query_pos.device).masked_fill_(future, float("-inf"))
