"""DeepSeekMoE: shared experts that see every token plus routed experts chosen per token."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.model.config import ModelConfig
from engine.model.linear import CPU_FORMATS, Linear, FusedArgs, cpu_weight, decode_shaped, kernel_dense, own_weights
from engine.routing import Router
from kernels import cpu, use_triton

# On the GPU with Triton, the fused MoE kernel of kernels/ serves every batch size. Without Triton, up
# to this many (token, expert) pairs gather the chosen experts' weights and apply them
# in one batched product (decode, no host synchronisation). On the CPU, decode and verification go to
# moedesk's MoE kernel (kernels/cpu: each chosen expert read in place once); otherwise tokens are sorted
# by expert and each chosen expert runs once on its rows (a gather would copy the weights it reads).
GATHER_MAX_PAIRS = 16


class MLP(torch.nn.Module):
    """SwiGLU feed-forward: dense layers and shared experts."""

    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = Linear(hidden, inter, bias=False)
        self.up_proj = Linear(hidden, inter, bias=False)
        self.down_proj = Linear(inter, hidden, bias=False)
        self._fused = FusedArgs()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def fused_args_for(self, x: torch.Tensor, norm):
        """The CPU kernel's arguments (moe_ffn's, with no routed experts) for these tokens, or None."""
        if torch.compiler.is_compiling() or not decode_shaped(x):
            return None
        return self._fused.get(self, norm, lambda: self.fused_args(norm))

    def fused_decode(self, x: torch.Tensor, norm) -> torch.Tensor | None:
        """x + self(norm(x)) for a few tokens in one call of moedesk's CPU kernel, or None."""
        args = self.fused_args_for(x, norm)
        if args is None:
            return None
        return torch.ops.moedesk.moe_ffn(x.reshape(-1, x.shape[-1]), *args)[0].view(x.shape).to(x.dtype)

    def fused_args(self, norm):
        """(the weights they are made of, the kernel's tensors and settings or None: a format it lacks)."""
        layers = (self.gate_proj, self.up_proj, self.down_proj)
        sources = [norm.weight, *(t for m in layers for t in own_weights(m))]
        parts = [cpu_weight(m) for m in layers]
        if any(p is None for p in parts):
            return sources, None
        e = cpu.empty()
        tensors, ints = [norm.weight.detach().float().contiguous()] + [e] * 8, [0] * 9 + [1]  # top_k 0, shared
        for part in parts:
            tensors += list(part[0])
            ints += [part[1], part[2]]
        return sources, (tensors, ints, [norm.eps, 1.0])


class Experts(torch.nn.Module):
    """All routed experts' weights stacked: gate and up fused, so one product serves both."""

    def __init__(self, n_experts: int, hidden: int, inter: int):
        super().__init__()
        self.inter = inter
        self.gate_up = torch.nn.Parameter(torch.empty(n_experts, 2 * inter, hidden))  # [E, 2I, H]
        self.down = torch.nn.Parameter(torch.empty(n_experts, hidden, inter))  # [E, H, I]

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [N, H], weights/ids [N, k] → Σ_k weight · expert_k(x) [N, H]."""
        if use_triton(x):  # one fused kernel, no host synchronisation (decode, verification, prefill)
            from kernels.fused_moe import fused_moe
            return fused_moe(x, weights, ids, self.gate_up, self.down)
        if x.is_cuda and ids.numel() <= GATHER_MAX_PAIRS:
            return self.forward_gathered(x, weights, ids)
        fmt = CPU_FORMATS.get(self.gate_up.dtype)
        if fmt is not None and decode_shaped(x):  # each chosen expert read once, SwiGLU and the sum fused
            e = cpu.empty()
            return torch.ops.moedesk.moe(x, ids, weights, self.gate_up, e, e, self.down, e, e, fmt, 0).to(x.dtype)
        return self.forward_grouped(x, weights, ids)

    def forward_gathered(self, x, weights, ids):
        gate, up = torch.einsum("nh,nkoh->nko", x, self.gate_up[ids]).split(self.inter, dim=-1)
        y = torch.einsum("nki,nkhi->nkh", F.silu(gate) * up, self.down[ids])  # [N, k, H]
        return torch.einsum("nkh,nk->nh", y, weights.to(y.dtype))

    def forward_grouped(self, x, weights, ids):
        flat_ids = ids.flatten()  # [N*k]
        order = flat_ids.argsort(stable=True)
        token_of = order // ids.shape[1]
        xs = x[token_of]  # [N*k, H], rows grouped by expert
        counts = torch.bincount(flat_ids, minlength=self.n_experts)
        ys = self.grouped(xs, counts)
        ys = ys * weights.flatten()[order, None].to(ys.dtype)
        return torch.zeros_like(x).index_add_(0, token_of, ys.to(x.dtype))

    @property
    def n_experts(self) -> int:
        return self.gate_up.shape[0]

    def grouped(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return grouped_swiglu(xs, counts, self.gate_up, self.down, self.inter)


def grouped_swiglu(xs, counts, gate_up, down, inter):
    """Rows of xs grouped by expert (counts [E]) → each group through its expert's SwiGLU."""
    if xs.is_cuda and hasattr(F, "grouped_mm") and xs.dtype == torch.bfloat16:
        return grouped_swiglu_mm(xs, counts, gate_up, down, inter)
    return grouped_swiglu_loop(xs, counts, gate_up, down, inter)


def grouped_swiglu_mm(xs, counts, gate_up, down, inter):
    """One grouped product per projection and no host synchronisation (the GPU path)."""
    offs = counts.cumsum(0).to(torch.int32)
    gate, up = F.grouped_mm(xs, gate_up.transpose(-2, -1), offs=offs).split(inter, dim=-1)
    return F.grouped_mm(F.silu(gate) * up, down.transpose(-2, -1), offs=offs)


def grouped_swiglu_loop(xs, counts, gate_up, down, inter):
    """Each chosen expert on its rows, one host read of the counts per layer (the CPU path)."""
    out = torch.empty(xs.shape[0], down.shape[1], dtype=xs.dtype, device=xs.device)
    start = 0
    for e, n in enumerate(counts.tolist()):  # one host read per layer; a loop over experts, not tokens
        if n:
            gate, up = F.linear(xs[start:start + n], gate_up[e]).split(inter, dim=-1)
            out[start:start + n] = F.linear(F.silu(gate) * up, down[e])
            start += n
    return out


class MoE(torch.nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.router = Router(cfg)
        self.experts = Experts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_experts = (MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
                               if cfg.n_shared_experts else None)
        self._fused = FusedArgs()

    def fused_args_for(self, x: torch.Tensor, norm):
        """The CPU kernel's (tensors, ints, floats) for these tokens, or None where it does not apply."""
        r = self.router
        if torch.compiler.is_compiling() or r.policy is not None or r.online_step or not decode_shaped(x):
            return None  # a traced step keeps the layers apart (its weights are checked on the host here)
        return self._fused.get(self, norm, lambda: self.fused_args(norm))

    def fused_decode(self, x: torch.Tensor, norm) -> torch.Tensor | None:
        """x + self(norm(x)) for a few tokens in one call of moedesk's CPU kernel (router included; its load
        counting and observers still see every choice), or None where it does not apply."""
        args = self.fused_args_for(x, norm)
        if args is None:
            return None
        y, ids, scores = torch.ops.moedesk.moe_ffn(x.reshape(-1, x.shape[-1]), *args)
        self.router.record(scores, ids)
        return y.view(x.shape).to(x.dtype)

    def fused_args(self, norm):
        """(the weights they are made of, the kernel's tensors and settings or None: a format it lacks)."""
        r, ex, sh = self.router, self.experts, self.shared_experts
        experts = ([getattr(ex, f"{n}_{p}") for n in ("gate_up", "down") for p in ("qweight", "scale", "zero")
                    if getattr(ex, f"{n}_{p}") is not None] if hasattr(ex, "spec") else [ex.gate_up, ex.down])
        shared_w = [t for m in (sh.gate_proj, sh.up_proj, sh.down_proj) for t in own_weights(m)] if sh else []
        sources = [norm.weight, r.weight, r.bias, *experts, *shared_w]
        e = cpu.empty()
        if hasattr(ex, "spec"):  # quantized experts
            if ex.spec.fmt not in ("int8", "int4"):
                return sources, None
            gu, dn = ex.stacked("gate_up"), ex.stacked("down")
            experts = [gu.qweight, gu.scale, e if gu.zero is None else gu.zero,
                       dn.qweight, dn.scale, e if dn.zero is None else dn.zero]
            fmt, group = cpu.quant_format(ex.spec.fmt, ex.layout), ex.spec.group if ex.spec.fmt == "int4" else 0
        elif ex.gate_up.dtype in CPU_FORMATS:
            (gu, fmt), (dn, dn_fmt) = kernel_dense(ex.gate_up), kernel_dense(ex.down)
            if dn_fmt != fmt:  # the kernel takes one format for both: unblocked copies, or as stored
                (gu, fmt), (dn, dn_fmt) = kernel_dense(ex.gate_up, blocks=False), kernel_dense(ex.down, blocks=False)
            if dn_fmt != fmt:
                gu, dn, fmt = ex.gate_up.detach(), ex.down.detach(), CPU_FORMATS[ex.gate_up.dtype]
            experts, group = [gu, e, e, dn, e, e], 0
        else:
            return sources, None
        shared = [cpu_weight(m) for m in (sh.gate_proj, sh.up_proj, sh.down_proj)] if sh is not None else []
        methods = {"greedy": 0, "group_limited_greedy": 1, "noaux_tc": 2}
        if any(p is None for p in shared) or r.method not in methods or r.scoring not in ("sigmoid", "softmax"):
            return sources, None
        f32 = lambda t: t.detach().float().contiguous()  # noqa: E731
        tensors = [f32(norm.weight), f32(r.weight), f32(r.bias), *experts]
        ints = [fmt, group, r.top_k, r.n_group, r.topk_group, methods[r.method], int(r.scoring == "softmax"),
                int(r.norm_topk_prob), int(r.v2_weighting), int(sh is not None)]
        for part in shared or [((e, e, e), 0, 0)] * 3:
            tensors += list(part[0])
            ints += [part[1], part[2]]
        return sources, (tensors, ints, [norm.eps, float(r.scaling)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, H]
        weights, ids = self.router(x)
        y = self.experts(x, weights, ids)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y.view(shape)
