"""PyTorch references of the kernels, with the same signatures: what each kernel must compute, in fp32
from the dequantized weights. They run anywhere (the engine's CPU path) and are what the tests and the
GPU checks compare the Triton kernels with.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.formats import QWeight, dequantize


def as_float(w: QWeight | torch.Tensor) -> torch.Tensor:
    """Any weight (quantized or plain) as fp32."""
    return dequantize(w) if isinstance(w, QWeight) else w.float()


def expert_weight(w: QWeight | torch.Tensor, e: int) -> torch.Tensor:
    """Expert e of a stacked weight [E, N, K] as fp32 [N, K], dequantizing only that expert."""
    return as_float(w.expert(e) if isinstance(w, QWeight) else w[e])


def quant_matmul_ref(x: torch.Tensor, w: QWeight) -> torch.Tensor:
    """x [..., K] · dequantize(w [N, K])ᵀ → [..., N] in x.dtype."""
    return (x.float() @ dequantize(w).T).to(x.dtype)


def fused_moe_ref(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                  gate_up: QWeight | torch.Tensor, down: QWeight | torch.Tensor) -> torch.Tensor:
    """Σ_j topk_weights[t, j] · expert_{topk_ids[t, j]}(x[t]) with SwiGLU experts: x [T, H] → [T, H].

    gate_up [E, 2I, H] holds gate then up; down [E, H, I]. One expert at a time, in fp32.
    """
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(gate_up.shape[0]):
        tokens, slots = (topk_ids == e).nonzero(as_tuple=True)
        if tokens.numel() == 0:
            continue
        gate, up = (x[tokens].float() @ expert_weight(gate_up, e).T).chunk(2, dim=-1)
        y = (F.silu(gate) * up) @ expert_weight(down, e).T  # [n, H]
        out.index_add_(0, tokens, y * topk_weights[tokens, slots, None].float())
    return out.to(x.dtype)


def moe_align_ref(topk_ids: torch.Tensor, n_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What kernels.fused_moe.moe_align computes, by plain loops (with host reads; tests only).

    Pairs p = t·k + j in ascending order per expert, each expert's run padded with the sentinel T·k
    to a multiple of block_m, experts in order; then sentinel blocks up to the static size, whose
    expert is -1.
    """
    flat = topk_ids.flatten().tolist()
    P = len(flat)
    pairs, experts = [], []
    for e in range(n_experts):
        mine = [p for p, i in enumerate(flat) if i == e]
        n_blocks = -(-len(mine) // block_m)
        pairs += mine + [P] * (n_blocks * block_m - len(mine))
        experts += [e] * n_blocks
    total_blocks = -(-(P + min(n_experts, P) * (block_m - 1)) // block_m)
    pairs += [P] * (total_blocks * block_m - len(pairs))
    experts += [-1] * (total_blocks - len(experts))
    dev = topk_ids.device
    return (torch.tensor(pairs, dtype=torch.int32, device=dev), torch.tensor(experts, dtype=torch.int32, device=dev))
