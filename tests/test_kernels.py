"""The Triton kernels against their PyTorch references, run on the CPU by Triton's interpreter.

The interpreter must be switched on (TRITON_INTERPRET=1) before the first `import triton` in a process.
Run alone on a machine without CUDA, this module does that itself. Otherwise (the full suite usually
imports triton earlier, through torch's dynamo; a CUDA machine must keep real kernels for the rest of
the suite) the kernel tests run in a fresh process with the variable set, and only that one test is
collected here.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if "triton" not in sys.modules and not torch.cuda.is_available():
    # In time: this process has not imported triton yet. Not on a CUDA machine, where the rest of the
    # suite must keep compiling real kernels.
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton", reason="triton is not installed (optional: the kernels need it, the engine does not)")

from triton.language import standard as tl_standard
from triton.runtime.interpreter import InterpretedFunction

from kernels import triton_available, use_triton
from kernels.formats import quantize_fp8, quantize_int4, quantize_int8
from kernels.reference import fused_moe_ref, moe_align_ref, quant_matmul_ref

INTERPRETED = isinstance(tl_standard.zeros, InterpretedFunction)
ROOT = Path(__file__).resolve().parents[1]


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest error relative to the output's magnitude (small outputs have no relative precision)."""
    return ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp(min=1e-6)).item()


# fp32 outputs: fp32 accumulation only. bf16 outputs: one rounding of the output (the interpreter
# truncates fp32 → bf16 where the GPU rounds to nearest: up to 2⁻⁷ of the magnitude) and, in fused_moe,
# the bf16 intermediates between the two products.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
MOE_TOL = {torch.float32: 1e-5, torch.bfloat16: 4e-2}


def test_use_triton_is_cuda_only():
    assert triton_available()
    assert not use_triton(torch.zeros(1))


def test_kernels_in_fresh_interpreter_process():
    """triton was imported before this module, too late for the interpreter: run the file anew."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.fail("TRITON_INTERPRET=1 is set yet triton was imported without the interpreter")
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", str(Path(__file__).resolve()), "-q", "-p", "no:cacheprovider"]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]


test_kernels_in_fresh_interpreter_process.__test__ = not INTERPRETED


# ---- quant_matmul ------------------------------------------------------------------------------------

def int4(group):
    return lambda w: quantize_int4(w, group)


# (name, quantizer, N, K): odd-sized N; K = 96 with group 64 leaves a short last group; fp8 with small
# scale blocks puts several blocks along both axes, with the default (128, 128) one partial block.
QM_CASES = [
    ("int8", quantize_int8, 40, 128),
    ("int4-g32", int4(32), 40, 128),
    ("int4-g64-short-group", int4(64), 40, 96),
    ("int4-g128", int4(128), 24, 128),
    ("fp8-16x32", lambda w: quantize_fp8(w, (16, 32)), 40, 96),
    ("fp8-128x128", quantize_fp8, 40, 96),
]


class TestQuantMatmul:
    __test__ = INTERPRETED

    @pytest.mark.parametrize("name,quantize,N,K", QM_CASES, ids=[c[0] for c in QM_CASES])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
    def test_matches_reference(self, name, quantize, N, K, dtype):
        from kernels.quant_matmul import quant_matmul
        g = torch.Generator().manual_seed(N * K)
        w = quantize(torch.randn(N, K, generator=g))
        for M in (1, 3, 8):
            x = torch.randn(M, K, generator=g).to(dtype)
            y = quant_matmul(x, w)
            assert y.shape == (M, N) and y.dtype == dtype
            assert rel_err(y, quant_matmul_ref(x, w)) < TOL[dtype], (name, M)

    @pytest.mark.parametrize("name,quantize,N,K", QM_CASES[:3], ids=[c[0] for c in QM_CASES[:3]])
    def test_split_k_and_leading_dims(self, name, quantize, N, K):
        """K sliced across programs (fp32 partial sums added afterwards); x [2, 3, K] keeps its lead."""
        from kernels.quant_matmul import quant_matmul
        g = torch.Generator().manual_seed(1)
        w = quantize(torch.randn(N, K, generator=g))
        x = torch.randn(2, 3, K, generator=g)
        for split in (2, 3):
            y = quant_matmul(x, w, split_k=split)
            assert y.shape == (2, 3, N)
            assert rel_err(y, quant_matmul_ref(x, w)) < TOL[torch.float32]

    def test_fp16_and_more_rows(self):
        """fp16 activations; M = 20 spans two row tiles of the general path."""
        from kernels.quant_matmul import quant_matmul
        g = torch.Generator().manual_seed(2)
        w = quantize_int4(torch.randn(40, 128, generator=g), 32)
        for M, dtype in ((4, torch.float16), (20, torch.float32)):
            x = torch.randn(M, 128, generator=g).to(dtype)
            assert rel_err(quant_matmul(x, w), quant_matmul_ref(x, w)) < TOL[dtype]

    def test_bad_block_k_is_refused(self):
        from kernels.quant_matmul import quant_matmul
        w = quantize_int4(torch.randn(16, 64), 32)
        with pytest.raises(ValueError, match="divide the group"):
            quant_matmul(torch.randn(1, 64), w, block_k=64)


# ---- moe_align ---------------------------------------------------------------------------------------

def routed_ids(T: int, k: int, E: int, seed: int) -> torch.Tensor:
    """Top-k ids [T, k] with ragged expert loads: skewed odds, and the last expert is never chosen."""
    odds = torch.tensor([2.0 ** -(e % 5) for e in range(E)])
    odds[-1] = 0
    g = torch.Generator().manual_seed(seed)
    if T == 0:
        return torch.zeros(0, k, dtype=torch.int64)
    return torch.multinomial(odds.expand(T, E), k, replacement=False, generator=g)


class TestMoeAlign:
    __test__ = INTERPRETED

    @pytest.mark.parametrize("T,k,block_m", [(0, 2, 16), (1, 2, 16), (5, 6, 16), (40, 6, 16), (40, 2, 64), (3, 1, 4)])
    def test_invariants_and_reference(self, T, k, block_m):
        from kernels.fused_moe import moe_align
        E = 8
        ids = routed_ids(T, k, E, seed=T + k)
        pairs, experts = moe_align(ids, E, block_m)
        want_pairs, want_experts = moe_align_ref(ids, E, block_m)
        assert torch.equal(pairs, want_pairs) and torch.equal(experts, want_experts)
        assert all(map(torch.equal, moe_align(ids.int(), E, block_m), (pairs, experts)))  # int32 ids too
        P = T * k
        assert pairs.numel() == experts.numel() * block_m  # static size: a function of T, k, E, block_m only
        real = pairs[pairs < P]
        assert torch.equal(real.sort().values, torch.arange(P, dtype=torch.int32))  # each pair exactly once
        assert ((pairs == P) | (pairs < P)).all()  # everything else is the sentinel
        blocks = pairs.view(-1, block_m)
        for b, e in enumerate(experts.tolist()):
            mine = blocks[b][blocks[b] < P].long()
            if e < 0:
                assert mine.numel() == 0  # unused blocks hold only padding
            else:
                assert mine.numel() > 0 and (ids.flatten()[mine] == e).all()  # one expert per block
        n_used = int((experts >= 0).sum())
        assert (experts[:n_used] >= 0).all()  # the unused blocks come last


# ---- fused_moe ---------------------------------------------------------------------------------------

E, H, I = 8, 64, 48  # I = 48 with int4 group 32: down's last group is short


def moe_weights(kind: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    gate_up, down = torch.randn(E, 2 * I, H, generator=g) * 0.2, torch.randn(E, H, I, generator=g) * 0.2
    make = {"fp32": lambda w: w, "bf16": lambda w: w.bfloat16(), "int4": lambda w: quantize_int4(w, 32),
            "int8": quantize_int8, "fp8": lambda w: quantize_fp8(w, (16, 32))}[kind]
    return make(gate_up), make(down)


MOE_CASES = [("fp32", torch.float32), ("bf16", torch.bfloat16), ("int4", torch.bfloat16), ("int4", torch.float32),
             ("int8", torch.bfloat16), ("fp8", torch.bfloat16)]


class TestFusedMoe:
    __test__ = INTERPRETED

    @pytest.mark.parametrize("kind,dtype", MOE_CASES, ids=[f"{k}-{str(d)[6:]}" for k, d in MOE_CASES])
    @pytest.mark.parametrize("T,k", [(1, 2), (5, 6), (40, 2), (40, 6)])
    def test_matches_reference(self, kind, dtype, T, k):
        from kernels.fused_moe import fused_moe
        gate_up, down = moe_weights(kind, seed=T)
        g = torch.Generator().manual_seed(T * k)
        x = torch.randn(T, H, generator=g).to(dtype)
        ids = routed_ids(T, k, E, seed=T * 10 + k)
        weights = torch.rand(T, k, generator=g).softmax(-1)
        y = fused_moe(x, weights, ids, gate_up, down)
        assert y.shape == (T, H) and y.dtype == dtype
        assert rel_err(y, fused_moe_ref(x, weights, ids, gate_up, down)) < MOE_TOL[dtype]

    def test_block_sizes_and_empty_batch(self):
        """The result does not depend on the block of pairs; no tokens give an empty result."""
        from kernels.fused_moe import fused_moe
        gate_up, down = moe_weights("int4", seed=3)
        x = torch.randn(9, H)
        ids, weights = routed_ids(9, 3, E, seed=3), torch.rand(9, 3)
        want = fused_moe_ref(x, weights, ids, gate_up, down)
        for block_m in (16, 32, 64):
            assert rel_err(fused_moe(x, weights, ids, gate_up, down, block_m=block_m), want) < 1e-5
        empty = fused_moe(x[:0], weights[:0], ids[:0], gate_up, down)
        assert empty.shape == (0, H)
