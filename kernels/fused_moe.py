"""Routed experts for prefill and speculative verification, as two grouped GEMMs over all experts.

1. moe_align (torch ops, no host synchronisation): the T·k (token, expert) pairs p = t·k + j sorted by
   expert, each expert's run padded to a multiple of BLOCK_M with the sentinel T·k, so that every block
   of BLOCK_M slots belongs to one expert. The number of slots is a static upper bound, blocks past the
   used ones have expert -1 and their programs exit at once.
2. grouped GEMM: program (block, column tile) gathers its pairs' input rows, multiplies them by its
   expert's weight tile (dequantized in registers, kernels.quant_matmul.dot_weight_block) and writes
   the rows back by pair index. Product 1: x[p // k] · gate_up[e]ᵀ → [T·k, 2I]; product 2 after SwiGLU:
   h[p] · down[e]ᵀ · topk_weights[p] → [T·k, H].
3. the k rows of each token are summed: [T, k, H] → [T, H].

Every shape depends only on T, k, E and BLOCK_M, so a call can be captured in a CUDA graph.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.formats import QWeight
from kernels.quant_matmul import (DEFAULT_BLOCK_N, cdiv, check_block_k, default_block_k, dot_weight_block,
                                  require_triton, tl, triton_jit, weight_operands)


def moe_align(topk_ids: torch.Tensor, n_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """topk_ids [T, k] → (sorted_pairs int32 [S], block_expert int32 [S / block_m]).

    sorted_pairs lists the pairs p = t·k + j of expert 0, then of expert 1, ... (ascending within an
    expert), each run padded with the sentinel T·k to a multiple of block_m; block_expert is the expert
    of each block of block_m slots, -1 for the unused blocks at the end. S is the static bound
    T·k + min(E, T·k)·(block_m − 1) rounded up to block_m: at most that many slots are ever used.
    """
    flat = topk_ids.reshape(-1).long()  # [P] (scatter indices must be int64)
    P, dev = flat.numel(), flat.device
    n_blocks = cdiv(P + min(n_experts, P) * (block_m - 1), block_m)
    counts = torch.zeros(n_experts, dtype=torch.int64, device=dev).scatter_add_(0, flat, torch.ones_like(flat))  # [E]
    padded = (counts + block_m - 1) // block_m * block_m  # [E] slots per expert
    region_end = padded.cumsum(0)  # [E] one past each expert's last slot
    order = flat.argsort(stable=True)  # [P] pairs grouped by expert, ascending within one
    expert_of = flat[order]  # [P]
    first_in_order = counts.cumsum(0) - counts  # [E] where each expert's pairs start in `order`
    slot = (region_end - padded)[expert_of] + torch.arange(P, device=dev) - first_in_order[expert_of]  # [P]
    sorted_pairs = torch.full((n_blocks * block_m,), P, dtype=torch.int32, device=dev)
    sorted_pairs.scatter_(0, slot, order.to(torch.int32))
    block_start = torch.arange(n_blocks, device=dev) * block_m  # [n_blocks]
    # The expert of a block is the first whose region ends after the block's first slot; experts with
    # no pairs have empty regions and are never chosen; past the last region the answer is E → -1.
    block_expert = torch.searchsorted(region_end, block_start, right=True)
    block_expert = torch.where(block_expert < n_experts, block_expert, -1).to(torch.int32)
    return sorted_pairs, block_expert


@triton_jit
def grouped_gemm_kernel(a_ptr, out_ptr, sorted_pairs_ptr, block_expert_ptr, routing_ptr, n_pairs, N, K,
                        stride_am, stride_om,
                        w_ptr, stride_we, stride_wn, stride_wk, s_ptr, stride_se, stride_sn, stride_sk,
                        z_ptr, stride_ze, stride_zn, stride_zk,
                        ROW_DIV: tl.constexpr, MUL_ROUTING: tl.constexpr,
                        FMT: tl.constexpr, GROUP: tl.constexpr, FP8_BN: tl.constexpr, FP8_BK: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[p, cols] = a[p // ROW_DIV] · W[e, cols]ᵀ (· routing[p]) for the BLOCK_M pairs p of one block."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:  # past the used blocks
        return
    pairs = tl.load(sorted_pairs_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))  # [BM]
    real = pairs < n_pairs  # padding holds the sentinel n_pairs
    row_mask = real[:, None]
    a_rows = a_ptr + (pairs // ROW_DIV).to(tl.int64)[:, None] * stride_am  # [BM, 1]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    e = expert.to(tl.int64)  # a stack of experts can hold more than 2³¹ elements
    w_e, s_e, z_e = w_ptr + e * stride_we, s_ptr + e * stride_se, z_ptr + e * stride_ze
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        acc = dot_weight_block(acc, a_rows, row_mask, k0, K,
                               w_e, stride_wn, stride_wk, s_e, stride_sn, stride_sk, z_e, stride_zn, stride_zk,
                               offs_n, n_mask, FMT, GROUP, FP8_BN, FP8_BK, BLOCK_K)
    if MUL_ROUTING:
        acc *= tl.load(routing_ptr + pairs, mask=real, other=0.0).to(tl.float32)[:, None]
    out = out_ptr + pairs.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_mask & n_mask[None, :])


def grouped_gemm(a: torch.Tensor, w: QWeight | torch.Tensor, sorted_pairs: torch.Tensor, block_expert: torch.Tensor,
                 n_pairs: int, row_div: int, block_m: int, routing: torch.Tensor | None = None) -> torch.Tensor:
    """out [n_pairs, N] with row p = a[p // row_div] · w[expert of p]ᵀ (× routing[p]); w is [E, N, K]."""
    _, N, K = w.shape
    ops = weight_operands(w)
    block_n = DEFAULT_BLOCK_N[ops["fmt"]]
    block_k = default_block_k(ops["fmt"], ops["group"], (ops["fp8_bn"], ops["fp8_bk"]))
    check_block_k(ops["fmt"], block_k, ops["group"], (ops["fp8_bn"], ops["fp8_bk"]))
    out = torch.empty(n_pairs, N, dtype=a.dtype, device=a.device)
    grid = (block_expert.numel(), cdiv(N, block_n))
    grouped_gemm_kernel[grid](
        a, out, sorted_pairs, block_expert, routing if routing is not None else a, n_pairs, N, K,
        a.stride(0), out.stride(0),
        ops["q"], *ops["q_strides"], ops["s"], *ops["s_strides"], ops["z"], *ops["z_strides"],
        ROW_DIV=row_div, MUL_ROUTING=routing is not None,
        FMT=ops["fmt"], GROUP=ops["group"], FP8_BN=ops["fp8_bn"], FP8_BK=ops["fp8_bk"],
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4)
    return out


def default_block_m(n_pairs: int, n_experts: int) -> int:
    """Pairs per block: small when experts get few pairs each (less padding), larger for long prefills."""
    return 16 if n_pairs <= 16 * n_experts else 64


def fused_moe(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
              gate_up: QWeight | torch.Tensor, down: QWeight | torch.Tensor, *,
              block_m: int | None = None) -> torch.Tensor:
    """Σ_j topk_weights[t, j] · expert_{topk_ids[t, j]}(x[t]) → [T, H] in x.dtype.

    x [T, H]; topk_weights [T, k] float; topk_ids [T, k] int64; gate_up [E, 2I, H] (gate rows, then
    up rows) and down [E, H, I], each a plain tensor or a QWeight. SwiGLU experts: silu(gate) · up.
    """
    require_triton()
    T, H = x.shape
    k = topk_ids.shape[1]
    E = gate_up.shape[0]
    P = T * k
    if P == 0:
        return torch.zeros_like(x)
    block_m = block_m or default_block_m(P, E)
    sorted_pairs, block_expert = moe_align(topk_ids, E, block_m)
    x = x if x.stride(-1) == 1 else x.contiguous()
    gate_up_out = grouped_gemm(x, gate_up, sorted_pairs, block_expert, P, k, block_m)  # [P, 2I]
    gate, up = gate_up_out.float().chunk(2, dim=-1)
    h = (F.silu(gate) * up).to(x.dtype)  # [P, I]
    routing = topk_weights.reshape(-1).contiguous()  # [P], row p = t·k + j
    y = grouped_gemm(h, down, sorted_pairs, block_expert, P, 1, block_m, routing)  # [P, H]
    return y.view(T, k, H).float().sum(1).to(x.dtype)
