"""The DeepSeek-V2/V3 network: decoder blocks of MLA + (dense MLP | DeepSeekMoE), and MTP modules."""
from __future__ import annotations

from contextlib import contextmanager

import torch

from engine.model.attention import MLA, LatentCache, RMSNorm, attention_mask
from engine.model.config import ModelConfig
from engine.model.moe import MLP, MoE
from engine.model.rope import RotaryEmbedding
from engine.routing import Router
from engine.model.linear import FusedArgs, Linear, cpu_weight, decode_shaped, own_weights
from kernels import cpu


def positions_of(tokens: torch.Tensor, start_pos: int | torch.Tensor | None) -> torch.Tensor:
    """The positions [T] of tokens [B, T]: given as a tensor (static step) or counted from start_pos."""
    if isinstance(start_pos, torch.Tensor):
        return start_pos
    return torch.arange(tokens.shape[1], device=tokens.device) + (start_pos or 0)


class Block(torch.nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = MLA(cfg)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.ffn = MoE(cfg) if cfg.is_moe_layer(layer_idx) else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, rotary, freqs, start_pos, mask=None):
        fused = self.attn.fused_decode(x, self.attn_norm, rotary, start_pos)  # CPU decode: one kernel call
        x = fused if fused is not None else x + self.attn(self.attn_norm(x), rotary, freqs, start_pos, mask)
        fused = self.ffn.fused_decode(x, self.ffn_norm)
        return fused if fused is not None else x + self.ffn(self.ffn_norm(x))


class MTPModule(torch.nn.Module):
    """One Multi-Token-Prediction depth: (next token's embedding, previous hidden state) → hidden state.

    h' = block(eh_proj([enorm(embed(t)); hnorm(h)])), logits = head(head_norm(h')).
    Embedding and head are the main model's unless the checkpoint carries different ones.
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.block = Block(cfg, layer_idx)
        self.head_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.embed: torch.nn.Embedding | None = None
        self.head: torch.nn.Linear | None = None
        self._fused = FusedArgs()  # the norms, eh_proj and head as moedesk::mtp_decode takes them

    def forward(self, hidden, next_tokens, main: "Transformer", freqs, start_pos, mask=None):
        """hidden [B, T, H] of the previous depth at positions i, next_tokens [B, T] = tokens i+depth
        → this depth's hidden states [B, T, H] (before head_norm), which predict tokens i+depth+1."""
        emb = (self.embed or main.embed)(next_tokens)
        x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(hidden)], dim=-1))
        return self.block(x, main.rotary, freqs, start_pos, mask)

    def logits(self, hidden: torch.Tensor, main: "Transformer") -> torch.Tensor:
        return (self.head or main.head)(self.head_norm(hidden)).float()

    def head_args(self, main: "Transformer") -> tuple | None:
        """(tensors, ints) of mtp_decode's input and output parts (enorm, hnorm, eh_proj, head_norm, head),
        or None where the kernel lacks a weight's format."""
        head = self.head or main.head
        return self._fused.get(self, head, lambda: self._head_args(head))

    def _head_args(self, head: torch.nn.Module):
        norms = (self.enorm, self.hnorm, self.head_norm)
        sources = [n.weight for n in norms] + own_weights(self.eh_proj) + own_weights(head)
        eh, out = cpu_weight(self.eh_proj), cpu_weight(head)
        if eh is None or out is None:
            return sources, None
        f32 = [n.weight.detach().float().contiguous() for n in norms]
        return sources, ([f32[0], f32[1], *eh[0], f32[2], *out[0]], [eh[1], eh[2], out[1], out[2]])


CATCH_UP_CALLS = 4  # an MTP pass over up to this many 16-row pieces goes to the fused kernel piece by piece


class Transformer(torch.nn.Module):
    def __init__(self, cfg: ModelConfig, n_mtp: int = 0):
        super().__init__()
        self.cfg = cfg
        self.embed = torch.nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = torch.nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.mtp = torch.nn.ModuleList(MTPModule(cfg, cfg.num_hidden_layers + i) for i in range(n_mtp))
        self.rotary = RotaryEmbedding(cfg.rope, cfg.qk_rope_head_dim, cfg.rope_interleave)
        # stack ("main" or an MTP depth) → (what its arguments were made of, them, its blocks' routers)
        self._joined: dict = {}
        self._head_fused = FusedArgs()  # the final norm and head as moedesk::layers_decode_logits takes them
        self._fixed: dict | None = None  # inside fixed_weights(): stack (and "head") → its first fused pass's arguments
        self.max_seq_len = 0

    def reset_rotary(self) -> None:
        """Recompute the rotary frequencies (a model built on the meta device has none)."""
        device = self.norm.weight.device
        self.rotary = RotaryEmbedding(self.cfg.rope, self.cfg.qk_rope_head_dim, self.cfg.rope_interleave).to(device)

    def setup_caches(self, max_batch: int, max_seq_len: int) -> None:
        """Allocate the latent caches of the main layers and of every MTP module."""
        cfg, p = self.cfg, self.norm.weight
        self.max_seq_len = max_seq_len
        if self._fixed:
            self._fixed.clear()  # the fused arguments name the old caches
        for block in [*self.layers, *(m.block for m in self.mtp)]:
            block.attn.cache = LatentCache(max_batch, max_seq_len, cfg.kv_lora_rank, cfg.qk_rope_head_dim,
                                           p.dtype, p.device)

    def cache_bytes_per_token(self) -> int:
        """Bytes the main layers' caches hold per token (MTP caches excluded)."""
        total = 0
        for block in self.layers:
            c = block.attn.cache
            total += c.kv[0, 0].numel() * c.kv.element_size()
        return total

    def param_counts(self) -> dict:
        """Total parameters (MTP modules apart) and those the main model uses for one token: routed
        experts beyond the chosen top-k and the embedding table (a lookup, not a product) excluded.
        A quantized weight counts its values, not its bytes."""
        from engine.quant import logical_weights

        cfg = self.cfg
        sizes = {n: p.numel() for n, p in self.named_parameters()}
        sizes |= {n: t.numel() for n, t in logical_weights(self).items()}
        main = sum(v for n, v in sizes.items() if not n.startswith("mtp."))
        mtp = sum(v for n, v in sizes.items() if n.startswith("mtp."))
        idle = sizes["embed.weight"]
        for i, block in enumerate(self.layers):
            if hasattr(block.ffn, "experts"):
                per_expert = (sizes[f"layers.{i}.ffn.experts.gate_up"] + sizes[f"layers.{i}.ffn.experts.down"]) \
                    // cfg.n_routed_experts
                idle += per_expert * (cfg.n_routed_experts - cfg.num_experts_per_tok)
        return {"total": main + mtp, "main": main, "mtp": mtp, "active_per_token": main - idle}

    def forward(self, tokens: torch.Tensor, start_pos: int | torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, T] → final-normed hidden states [B, T, H].

        start_pos: where these tokens start in the caches (prefill 0, then decode); None runs causal
        attention within `tokens` only and leaves the caches alone; a device tensor input_pos [T] runs
        the static step (see `decode_step`).
        """
        return self._stack(self.embed(tokens), tokens, start_pos)

    def decode(self, tokens: torch.Tensor, start_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [1, T] at start_pos → (final-normed hidden [1, T, H], logits [1, T, V] fp32): a decode
        step or a verification pass. On the CPU's decode path the layers, the final norm and the head are
        one kernel call; elsewhere it is `forward` then `logits`."""
        x = self.embed(tokens)
        fused = self.fused_decode(x, start_pos)
        if fused is not None:
            return fused
        h = self._stack(x, tokens, start_pos)
        return h, self.logits(h)

    def _stack(self, x: torch.Tensor, tokens: torch.Tensor, start_pos) -> torch.Tensor:
        """Embeddings x [B, T, H] of tokens through every block and the final norm."""
        fused = self.fused_layers(x, start_pos)  # CPU decode and verification: every layer in one call
        if fused is not None:
            return self.norm(fused)
        freqs, mask = self.attention_inputs(tokens, start_pos)
        for block in self.layers:
            x = block(x, self.rotary, freqs, start_pos, mask)
        return self.norm(x)

    def fused_decode(self, x: torch.Tensor, start_pos) -> tuple[torch.Tensor, torch.Tensor] | None:
        """x [1, T, H] through every block, the final norm and the head in one call of
        moedesk::layers_decode_logits → (hidden [1, T, H], logits [1, T, V]), or None where it does not
        apply (see fused_layers; fp32 activations and a head in a format the kernel reads)."""
        if x.dtype != torch.float32:
            return None
        args = self._pass_args("main", self.layers, x, start_pos)
        fixed = self._fixed
        head = fixed.get("head") if fixed else None  # inside fixed_weights(): checked at the first pass only
        if head is None and args is not None:
            head = self._head_fused.get(self, self.norm, self._head_args)
            if fixed is not None and head is not None:
                fixed["head"] = head
        if args is None or head is None:
            return None
        (w, ints, floats, top_k, E), kvs = args
        cos, sin = self.rotary.rows(start_pos, x.shape[1])
        h, logits, ids, scores = torch.ops.moedesk.layers_decode_logits(
            x[0], w, ints, floats, kvs, cos, sin, start_pos, top_k, E, *head, self.norm.eps)
        self._record("main", ids, scores)
        return h[None], logits[None]

    def _head_args(self):
        """(the weights used, (tensors, ints) of layers_decode_logits' norm and head, or None where the
        kernel lacks the head's format or the norm is not fp32)."""
        sources = [self.norm.weight] + own_weights(self.head)
        out = cpu_weight(self.head)
        if out is None or self.norm.weight.dtype != torch.float32:
            return sources, None
        return sources, ([self.norm.weight.detach().contiguous(), *out[0]], [out[1], out[2]])

    def fused_layers(self, x: torch.Tensor, start_pos) -> torch.Tensor | None:
        """x [1, T, H] through every block in one call of moedesk's CPU kernel (moedesk::layers_decode: each
        block's fused attention and feed-forward, no Python between layers), or None where a block's
        fused path does not apply. The routers' bookkeeping (load, observers, windows) follows the call."""
        args = self._pass_args("main", self.layers, x, start_pos)
        if args is None:
            return None
        (w, ints, floats, top_k, E), kvs = args
        cos, sin = self.rotary.rows(start_pos, x.shape[1])
        y, ids, scores = torch.ops.moedesk.layers_decode(x[0], w, ints, floats, kvs, cos, sin, start_pos, top_k, E)
        self._record("main", ids, scores)
        return y[None].to(x.dtype)

    def fused_mtp(self, depth: int, hidden: torch.Tensor, next_tokens: torch.Tensor, start_pos):
        """MTP module `depth` over a few positions in one call of moedesk::mtp_decode (its norms, eh_proj,
        block, head_norm and head) → (hidden states [1, T, H], logits [V] fp32 of the last position), or
        None where the fused path does not apply (see fused_layers)."""
        module = self.mtp[depth]
        args = self._pass_args(depth, [module.block], hidden, start_pos)  # hidden: the block input's shape
        head = module.head_args(self) if args is not None else None
        if head is None:
            return None
        (w, ints, floats, top_k, E), kvs = args
        emb = (module.embed or self.embed)(next_tokens)
        cos, sin = self.rotary.rows(start_pos, emb.shape[1])
        h, logits, ids, scores = torch.ops.moedesk.mtp_decode(emb[0], hidden[0], *head, module.enorm.eps, w, ints,
                                                              floats, kvs, cos, sin, start_pos, top_k, E)
        self._record(depth, ids, scores)
        return h[None].to(hidden.dtype), logits

    def _record(self, stack, ids: torch.Tensor, scores: torch.Tensor) -> None:
        """The routers' bookkeeping of a fused pass, for those that keep any (load, observers, windows)."""
        routers = self._joined[stack][2]  # kept with the joined arguments: module attribute reads cost µs each
        keeping = [r is not None and (r.load is not None or r.observe is not None or r.windows is not None)
                   for r in routers]
        if any(keeping):  # one unbind, not an index op per layer: a fifth of a step's Python once
            for r, keep, s, i in zip(routers, keeping, scores.unbind(), ids.unbind()):
                if keep:
                    r.record(s, i)

    def _pass_args(self, stack, blocks, x: torch.Tensor, start_pos) -> tuple | None:
        """(the joined kernel arguments of blocks, their caches) for x at start_pos, or None where the fused
        path does not apply. Inside fixed_weights(), after the stack's first fused pass, only what depends
        on x is checked."""
        if not isinstance(start_pos, int) or torch.compiler.is_compiling():
            return None
        # An MTP module's pass from position 0 (its first draft of a reply catching up over the prompt) is
        # fused too: a draft is only a proposal, and the PyTorch layers took 4-5 ms of a 21-token reply.
        first = 1 if stack == "main" else 0
        fixed = self._fixed
        if fixed and stack in fixed:
            if start_pos < first or x.shape[0] != 1 or not decode_shaped(x):
                return None
            if start_pos + x.shape[1] > self.max_seq_len:
                raise ValueError(f"context full: position {start_pos + x.shape[1]} exceeds the cache of "
                                 f"{self.max_seq_len} tokens")
            return fixed[stack]
        joined = self._checked_args(stack, blocks, x, start_pos, first)
        if joined is not None and fixed is not None:
            fixed[stack] = joined
        return joined

    @contextmanager
    def fixed_weights(self):
        """Within it the weights and router settings stay as they are (one request's decoding): the fused
        CPU path checks every layer's kernel arguments at its first pass and reuses them after, where it
        checked them at every pass (a quarter of a bundled-model step). Nested uses share the outer one."""
        if self._fixed is not None:
            yield
            return
        self._fixed = {}
        try:
            yield
        finally:
            self._fixed = None

    def _checked_args(self, stack, blocks, x: torch.Tensor, start_pos: int, first: int = 1) -> tuple | None:
        """(layers_decode's joined arguments, the caches) for x at start_pos, each block's checked and made
        again where its weights changed; None where a block's fused path does not apply."""
        parts = []
        for b in blocks:
            attn = b.attn.fused_args_for(x, b.attn_norm, self.rotary, start_pos, first)
            ffn = b.ffn.fused_args_for(x, b.ffn_norm) if attn is not None else None
            if ffn is None:
                return None
            parts.append(attn)
            parts.append(ffn)
        kvs = [b.attn.cache.kv for b in blocks]
        return self._joined_args(stack, blocks, parts, kvs), kvs

    def _joined_args(self, stack, blocks, parts: list, kvs: list) -> tuple:
        """The blocks' kernel arguments laid end to end (layers_decode's layout), made again when any
        block's arguments or cache changed (each block's FusedArgs keeps the same objects otherwise)."""
        key, seen = parts + kvs, self._joined.get(stack)
        if seen is None or len(seen[0]) != len(key) or any(a is not b for a, b in zip(seen[0], key)):
            w, ints, floats = [], [], []
            for attn, ffn in zip(parts[::2], parts[1::2]):
                w += attn[0] + ffn[0]
                ints += [0] + attn[1] + ffn[1]  # the attention's start, set by the kernel
                floats += attn[2] + ffn[2]
            routers = [getattr(b.ffn, "router", None) for b in blocks]  # None: a dense block
            routed = [r for b, r in zip(blocks, routers) if isinstance(b.ffn, MoE)]
            top_k, E = (routed[0].top_k, routed[0].n_experts) if routed else (0, 0)
            seen = self._joined[stack] = (key, (w, ints, floats, top_k, E), routers)
        return seen[1]

    def attention_inputs(self, tokens: torch.Tensor, start_pos: int | torch.Tensor | None):
        """Once per pass, for every layer: the rotary rows of these positions, and the attention mask of
        the absorbed paths (None where none is needed: one new token against the cache up to it, or
        attention within `tokens`, which is causal by construction)."""
        T = tokens.shape[1]
        positions = positions_of(tokens, start_pos)
        if isinstance(start_pos, torch.Tensor):  # the static step attends the whole cache
            end = self.max_seq_len
            mask = attention_mask(positions, end, self.norm.weight.dtype)
        else:
            end = (start_pos or 0) + T
            mask = attention_mask(positions, end, self.norm.weight.dtype) if start_pos and T > 1 else None
        return self.rotary.at(positions, end), mask

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden).float()

    def mtp_forward(self, depth: int, hidden: torch.Tensor, next_tokens: torch.Tensor,
                    start_pos: int | torch.Tensor | None = None) -> torch.Tensor:
        """Run MTP module `depth` (0-based) over positions start_pos.. (see MTPModule.forward)."""
        freqs, mask = self.attention_inputs(next_tokens, start_pos)
        return self.mtp[depth](hidden, next_tokens, self, freqs, start_pos, mask)

    def mtp_logits(self, depth: int, hidden: torch.Tensor) -> torch.Tensor:
        return self.mtp[depth].logits(hidden, self)

    def mtp_draft(self, depth: int, hidden: torch.Tensor, next_tokens: torch.Tensor, start_pos: int):
        """MTP module `depth` over positions start_pos.. → (hidden states [1, T, H], logits [V] fp32 of the
        last position, what a draft is read from): one kernel call on the CPU's decode path."""
        fused = self.fused_mtp(depth, hidden, next_tokens, start_pos)
        if fused is not None:
            return fused
        T, rows = hidden.shape[1], cpu.MAX_ROWS
        done, parts = 0, []
        if isinstance(start_pos, int) and rows < T <= CATCH_UP_CALLS * rows:
            # A catch-up after a run of plain steps: a few of the fused kernel's 16-row calls cost less than
            # PyTorch's layers (bundled model: 17 positions 1.9 ms that way, 0.38 ms per 16 rows fused)
            while done < T:
                out = self.fused_mtp(depth, hidden[:, done:done + rows], next_tokens[:, done:done + rows],
                                     start_pos + done)
                if out is None:
                    break
                parts.append(out[0])
                done += parts[-1].shape[1]
            if done == T:
                return torch.cat(parts, 1), out[1]
        h = self.mtp_forward(depth, hidden[:, done:], next_tokens[:, done:], start_pos + done)
        logits = self.mtp_logits(depth, h[:, -1])[0]
        return (torch.cat(parts + [h], 1) if parts else h), logits

    # The static steps: positions as a device tensor input_pos [T], the caches written there and attended
    # whole under a mask. Fixed shapes for a given T and no host reads, so a CUDA graph can capture them
    # (engine/cuda_graphs.py); the caller checks on the host that the positions fit the caches.

    def decode_step(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [1, T] at positions input_pos [T] → (hidden [1, T, H], logits [1, T, V] fp32)."""
        hidden = self(tokens, input_pos)
        return hidden, self.logits(hidden)

    def mtp_step(self, depth: int, hidden: torch.Tensor, next_tokens: torch.Tensor,
                 input_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """MTP module `depth` over positions input_pos [T] → (hidden [1, T, H], logits [1, V] fp32 of the
        last position, the only one a draft is read from)."""
        h = self.mtp_forward(depth, hidden, next_tokens, input_pos)
        return h, self.mtp_logits(depth, h[:, -1])

    @torch.no_grad()
    def init_weights(self, seed: int = 0, std: float = 0.02) -> None:
        """Random weights, for test models and the start of training."""
        g = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)
        for m in self.modules():
            if isinstance(m, Router):
                m.bias.zero_()
