"""The GPU-only expert paths (weight gather for decode, grouped products) checked on the CPU against
the loop over experts that the CPU runs."""
from __future__ import annotations

import pytest
import torch

from engine.model.moe import Experts, grouped_swiglu_loop, grouped_swiglu_mm


def experts(seed=0, E=8, H=32, I=16):
    torch.manual_seed(seed)
    ex = Experts(E, H, I)
    with torch.no_grad():
        ex.gate_up.normal_(0, 0.2)
        ex.down.normal_(0, 0.2)
    return ex


def routing(N, E=8, k=2, seed=1, skip=(3, 5)):
    """Random top-k choices that never pick the experts in `skip`: zero-token groups included."""
    g = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([e for e in range(E) if e not in skip])
    ids = torch.stack([allowed[torch.randperm(len(allowed), generator=g)[:k]] for _ in range(N)])
    weights = torch.rand(N, k, generator=g)
    return weights, ids


@pytest.mark.parametrize("N", [1, 3, 8])
def test_gathered_path_equals_grouped(N):
    ex = experts()
    x = torch.randn(N, 32)
    w, ids = routing(N)
    with torch.no_grad():
        assert torch.allclose(ex.forward_gathered(x, w, ids), ex.forward_grouped(x, w, ids), atol=1e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_grouped_mm_path_equals_the_loop_with_empty_and_ragged_groups(dtype, tol):
    ex = experts()
    counts = torch.tensor([3, 0, 7, 1, 0, 0, 12, 2])  # ragged, with experts that got no token
    xs = torch.randn(int(counts.sum()), 32).to(dtype)
    gu, dn = ex.gate_up.detach().to(dtype), ex.down.detach().to(dtype)
    ref = grouped_swiglu_loop(xs.float(), counts, gu.float(), dn.float(), 16)
    out = grouped_swiglu_mm(xs, counts, gu, dn, 16)
    assert (out.float() - ref).abs().max() < tol * ref.abs().max()
