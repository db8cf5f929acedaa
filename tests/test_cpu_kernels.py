"""moedesk's C++ CPU kernels (kernels/cpu) against the PyTorch reference, every format and row count,
under every instruction set the build has (AVX-512, AVX2, plain C++: `moedesk::set_isa` lowers it)."""
from __future__ import annotations

import contextlib
import subprocess
import sys

import pytest
import torch

from kernels import cpu
from kernels.formats import dequantize, group_blocks, group_rows, int4_blocks, int4_rows, quantize_int4, quantize_int8
from kernels.reference import fused_moe_ref


@pytest.fixture(scope="module", autouse=True)
def built():
    """The bootstrap builds the kernels; a checkout without them builds them here (about 15 s)."""
    if not cpu.library_path().is_file():
        cpu.build()
    cpu._loaded = None
    assert cpu.available(), "the moedesk CPU kernels did not load"


ISAS = {"avx512": 2, "avx2": 1, "generic": 0}


@pytest.fixture(autouse=True, params=list(ISAS))
def isa(request, built):
    """Each test once per instruction set this build has (an AVX2-only CPU skips the AVX-512 runs)."""
    best = torch.ops.moedesk.set_isa(99)
    if ISAS[request.param] > best:
        pytest.skip(f"this CPU has no {request.param}")
    torch.ops.moedesk.set_isa(ISAS[request.param])
    yield request.param
    torch.ops.moedesk.set_isa(best)


def weights(fmt: str, N: int, K: int, seed: int = 0, group: int = 64):
    """(q, scale, zero, fmt code, group) for the op, and the fp32 weight the format means."""
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(seed)) * 0.05
    e = cpu.empty()
    if fmt == "fp32":
        return (w, e, e, 0, 0), w
    if fmt == "bf16":
        return (w.bfloat16(), e, e, 1, 0), w.bfloat16().float()
    if fmt == "bf16_exact":
        return (w.bfloat16(), e, e, 4, 0), w.bfloat16().float()
    if fmt == "bf16_blocks":
        return (cpu.blocks16(w.bfloat16()), e, e, 5, 0), w.bfloat16().float()
    if fmt == "int8":
        q = quantize_int8(w)
        return (q.qweight, q.scale, e, 2, 0), dequantize(q, torch.float32)
    q = quantize_int4(w, group)
    return (q.qweight, q.scale, q.zero, 3, group), dequantize(q, torch.float32)


# Weight-only formats dot bf16-rounded activations (int8 on VNNI and AVX2: int16, finer; int4 on VNNI and
# AVX2: int8 per 64 values, coarser): their error is the activations' rounding, ~2^-9 relative (int4
# ~2^-7, against int4's own ~9%).
TOL = {"fp32": 1e-5, "bf16": 6e-3, "int8": 6e-3, "int4": 1.5e-2, "bf16_exact": 1e-5, "bf16_blocks": 1e-5}


@pytest.mark.parametrize("fmt", ["fp32", "bf16", "int8", "int4", "bf16_exact", "bf16_blocks"])
@pytest.mark.parametrize("shape", [(96, 64), (256, 192), (160, 1408), (48, 200), (40, 24)])
def test_linear_matches_the_reference_for_every_row_count(fmt, shape):
    N, K = shape
    if fmt == "int4" and K % 64:
        K = K // 64 * 64 + 64  # int4 groups of 64
    if fmt == "bf16_blocks" and N % 16:
        N = N // 16 * 16 + 16  # blocks of 16 rows
    args, w = weights(fmt, N, K)
    x = torch.randn(16, K, generator=torch.Generator().manual_seed(1))
    ref = x @ w.T
    rows = {}
    for M in (1, 2, 3, 5, 8, 16):
        y = torch.ops.moedesk.linear(x[:M], *args)
        assert y.shape == (M, N) and y.dtype == torch.float32
        err = ((y - ref[:M]).norm() / ref[:M].norm()).item()
        assert err < TOL[fmt], (fmt, shape, M, err)
        rows[M] = y
    # The same bits for a row whatever else is in the batch: verification equals one-token steps.
    for M in (2, 3, 5, 8, 16):
        assert torch.equal(rows[M][0], rows[1][0])


def test_int8_dots_round_activations_to_int16(isa):
    """int8 weights on AVX512-VNNI (vpdpwssd) and on AVX2 (vpmaddwd) meet int16 activations: the product
    is then within 1e-4 of x · dequantized W (5e-4 with a few features 30 times the rest, as hidden
    states have), where bf16-rounded activations leave ~2e-3. Rows longer than the int32 lanes can sum
    exactly (4,096 columns on AVX2, 8,192 on AVX-512) are summed in parts."""
    if isa == "generic" or (isa == "avx512" and "avx512_vnni" not in cpu.cpu_flags()):
        pytest.skip(f"int8 takes the fp32 or bf16 path on {isa}")
    for K in (1408, 8192 + 256):
        args, w = weights("int8", 64, K)
        x = torch.randn(4, K, generator=torch.Generator().manual_seed(1))
        y, ref = torch.ops.moedesk.linear(x, *args), x @ w.T
        assert ((y - ref).norm() / ref.norm()) < 1e-4, K
        x[:, :8] *= 30  # the row's scale follows its largest value
        y, ref = torch.ops.moedesk.linear(x, *args), x @ w.T
        assert ((y - ref).norm() / ref.norm()) < 5e-4, K


def test_int4_rounds_activations_to_int8_per_64_values(isa):
    """int4 on AVX2 (vpmaddubsw) and on AVX512-VNNI (vpdpbusd) meets int8 activations with a scale per 64
    values, llama.cpp's way: within 1e-2 of x · dequantized W, a few features 30 times the rest costing
    only their own blocks, and far below the error int4 itself makes against the full-precision weight."""
    if isa == "generic" or (isa == "avx512" and "avx512_vnni" not in cpu.cpu_flags()):
        pytest.skip(f"int4 meets fp32 or bf16 activations on {isa}")
    # rows in whole blocks of 16 and not; groups of 64 and of 128 with a last group of 64 columns
    for N, K, group in ((64, 2048, 64), (40, 1472, 128)):
        (q, s, z, fmt, group), w = weights("int4", N, K, group=group)
        w_full = torch.randn(N, K, generator=torch.Generator().manual_seed(0)) * 0.05  # what weights() quantized
        x = torch.randn(4, K, generator=torch.Generator().manual_seed(1))
        for boost in (1, 30):
            x[:, :8] *= boost
            y, ref = torch.ops.moedesk.linear(x, q, s, z, fmt, group), x @ w.T
            err, own = ((y - ref).norm() / ref.norm()).item(), ((ref - x @ w_full.T).norm() / ref.norm()).item()
            assert err < (8e-3 if boost == 1 else 1.5e-2) and err < own / 5, (N, K, group, boost, err, own)


def test_bf16_weights_with_fp32_activations_equal_the_fp32_products():
    """"bf16_exact" (a bf16 checkpoint run in fp32) reads half the bytes and gives the same bits."""
    for N, K in ((96, 64), (160, 1408), (40, 24)):
        (q, *_), w = weights("bf16_exact", N, K)
        x = torch.randn(5, K, generator=torch.Generator().manual_seed(2))
        e = cpu.empty()
        assert torch.equal(torch.ops.moedesk.linear(x, q, e, e, 4, 0), torch.ops.moedesk.linear(x, w, e, e, 0, 0))


def test_bf16_blocks_give_the_same_bits_on_every_instruction_set_and_slice():
    """"bf16_blocks" sums each output in column order, one FMA at a time: the AVX-512 kernel, the plain
    C++ loop and any split of the rows (slices that cut a block of 16) give the same bits."""
    (q, e, _, fmt, _), w = weights("bf16_blocks", 96, 200)
    x = torch.randn(6, 200, generator=torch.Generator().manual_seed(3))
    best = torch.ops.moedesk.set_isa(-1)
    try:
        torch.ops.moedesk.set_isa(0)
        plain = torch.ops.moedesk.linear(x, q, e, e, fmt, 0)
    finally:
        torch.ops.moedesk.set_isa(best)
    assert torch.equal(torch.ops.moedesk.linear(x, q, e, e, fmt, 0), plain)
    assert ((plain - x @ w.T).norm() / (x @ w.T).norm()) < 1e-6
    torch.ops.moedesk.set_team(0)  # ATen's regions: slices at any row
    try:
        with torch.inference_mode():
            threads = torch.get_num_threads()
            torch.set_num_threads(3)
            try:
                assert torch.equal(torch.ops.moedesk.linear(x, q, e, e, fmt, 0), plain)
            finally:
                torch.set_num_threads(threads)
    finally:
        torch.ops.moedesk.set_team(1)


def test_int4_rows_do_not_depend_on_their_neighbours_or_the_slice():
    """int4 on AVX512-VNNI takes 16 rows a vector: a row alone, a part block, or a slice cut anywhere by
    ATen's threads gives each row the bits it has in the whole product."""
    (q, s, z, fmt, group), _ = weights("int4", 200, 1472, group=64)  # 147 KB: split across threads
    x = torch.randn(4, 1472, generator=torch.Generator().manual_seed(4))
    whole = torch.ops.moedesk.linear(x, q, s, z, fmt, group)
    alone = torch.cat([torch.ops.moedesk.linear(x, q[r:r + 1], s[r:r + 1], z[r:r + 1], fmt, group)
                       for r in range(200)], dim=1)
    assert torch.equal(alone, whole)
    torch.ops.moedesk.set_team(0)  # ATen's regions: slices at any row
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        assert torch.equal(torch.ops.moedesk.linear(x, q, s, z, fmt, group), whole)
    finally:
        torch.set_num_threads(threads)
        torch.ops.moedesk.set_team(1)


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_groups_and_a_batch_shape(group):
    args, w = weights("int4", 64, 256, group=group)
    x = torch.randn(2, 3, 256)
    y = torch.ops.moedesk.linear(x, *args)
    ref = x @ w.T
    assert y.shape == (2, 3, 64) and ((y - ref).norm() / ref.norm()) < TOL["int4"]


@pytest.mark.parametrize("fmt", ["fp32", "bf16", "int8", "int4", "bf16_exact", "bf16_blocks"])
def test_moe_reads_each_chosen_expert_once_and_matches_the_reference(fmt):
    E, H, I, k = 6, 128, 64, 2
    gu = [weights(fmt, 2 * I, H, seed=e) for e in range(E)]
    dn = [weights(fmt, H, I, seed=100 + e) for e in range(E)]
    stack = lambda parts, i: torch.stack([p[0][i] for p in parts]) if parts[0][0][i].numel() else cpu.empty()  # noqa
    args = [stack(gu, 0), stack(gu, 1), stack(gu, 2), stack(dn, 0), stack(dn, 1), stack(dn, 2), gu[0][0][3],
            gu[0][0][4]]
    gate_up = torch.stack([p[1] for p in gu])
    down = torch.stack([p[1] for p in dn])
    g = torch.Generator().manual_seed(3)
    for M in (1, 3, 5):
        x = torch.randn(M, H, generator=g)
        ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(M)])
        w = torch.rand(M, k, generator=g)
        y = torch.ops.moedesk.moe(x, ids, w, *args[:6], args[6], args[7])
        ref = fused_moe_ref(x, w, ids, gate_up, down)
        assert ((y - ref).norm() / ref.norm()) < 2 * TOL[fmt], (fmt, M)


def test_int4_in_blocks_of_16_rows_gives_the_bits_of_row_order(isa):
    """Layout "blocks16" (format int4_blocks) stores each block of 16 rows in the order dpbusd_block
    multiplies it, the group scales and zero points as its [G, 16] tiles: the same products, bit for bit,
    for 1 to 16 tokens, in linear and moe; where the kernel cannot read it (no AVX-512 VNNI, rows not a
    multiple of 16) the op refuses it by name."""
    (q, s, z, _, group), _ = weights("int4", 96, 1408, group=64)
    blocked, bs, bz = int4_blocks(q), group_blocks(s), group_blocks(z)
    assert torch.equal(int4_rows(blocked), q) and not torch.equal(blocked, q)
    assert torch.equal(group_rows(bs), s) and torch.equal(group_rows(bz), z) and not torch.equal(bs, s)
    x = torch.randn(16, 1408, generator=torch.Generator().manual_seed(5))
    if not cpu.int4_blocks_ok(96, 1408, 64):
        assert isa != "avx512" or not cpu_flags_have("avx512_vnni")
        with pytest.raises(RuntimeError, match="blocks of 16 rows"):
            torch.ops.moedesk.linear(x[:1], blocked, bs, bz, 6, 64)
        return
    assert not cpu.int4_blocks_ok(40, 1408, 64) and not cpu.int4_blocks_ok(96, 1408, 32)
    for M in (1, 3, 8, 16):
        assert torch.equal(torch.ops.moedesk.linear(x[:M], blocked, bs, bz, 6, 64),
                           torch.ops.moedesk.linear(x[:M], q, s, z, 3, 64)), M
    E, H, I = 4, 128, 64
    gu = [weights("int4", 2 * I, H, seed=e)[0] for e in range(E)]
    dn = [weights("int4", H, I, seed=10 + e)[0] for e in range(E)]
    parts = [torch.stack([p[i] for p in ws]) for ws in (gu, dn) for i in range(3)]
    xs = torch.randn(5, H, generator=torch.Generator().manual_seed(6))
    ids, w = torch.tensor([[0, 1], [2, 3], [1, 2], [3, 0], [0, 2]]), torch.rand(5, 2)
    rows = torch.ops.moedesk.moe(xs, ids, w, *parts, 3, 64)
    parts = [int4_blocks(p) if i % 3 == 0 else group_blocks(p) for i, p in enumerate(parts)]
    assert torch.equal(torch.ops.moedesk.moe(xs, ids, w, *parts, 6, 64), rows)


def cpu_flags_have(flag: str) -> bool:
    return flag in cpu.cpu_flags().split()


def test_bad_arguments_are_errors_not_crashes():
    args, _ = weights("fp32", 8, 64)
    with pytest.raises(RuntimeError, match="x \\[..., 64\\]"):
        torch.ops.moedesk.linear(torch.randn(1, 32), *args)
    with pytest.raises(RuntimeError, match="at most 16 rows"):
        torch.ops.moedesk.linear(torch.randn(17, 64), *args)
    bad = (args[0].bfloat16(),) + args[1:]
    with pytest.raises(RuntimeError, match="fp32 weight expected"):
        torch.ops.moedesk.linear(torch.randn(1, 64), *bad)


def test_the_engine_uses_the_kernels_and_can_do_without(monkeypatch):
    """A model's decode-shaped products go through the kernels; with them off, the PyTorch products give
    the same logits (fp32) within rounding."""
    from engine.model.config import parse_config
    from engine.model.transformer import Transformer
    from engine.tiny import tiny_config

    model = Transformer(parse_config(tiny_config()), n_mtp=1)
    model.init_weights(seed=0, std=0.1)
    model.eval()
    tokens = torch.randint(2, 96, (1, 6))
    calls = []
    real = torch.ops.moedesk.linear
    with torch.inference_mode():
        model.setup_caches(1, 32)
        model(tokens[:, :5], 0)
        monkeypatch.setattr(torch.ops.moedesk, "linear", lambda *a: calls.append(1) or real(*a))
        fast = model.logits(model(tokens[:, 5:], 5))
        monkeypatch.setattr(cpu, "_loaded", False)
        model(tokens[:, :5], 0)
        slow = model.logits(model(tokens[:, 5:], 5))
    assert calls and torch.allclose(fast, slow, atol=1e-4, rtol=1e-4)


def small_model(variant: str, seed: int, n_mtp: int = 0, **config):
    """A tiny random model in the variant's weights (fp32, bf16, int8, int4), router biases random."""
    from engine.model.config import parse_config
    from engine.model.transformer import Transformer
    from engine.quant import QuantSpec, quantize_model
    from engine.routing import Router
    from engine.tiny import tiny_config

    model = Transformer(parse_config(tiny_config(**config)), n_mtp=n_mtp)
    model.init_weights(seed=seed, std=0.1)
    g = torch.Generator().manual_seed(seed + 1)
    for m in model.modules():
        if isinstance(m, Router):
            m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    model.eval()
    if variant == "bf16":
        model.to(torch.bfloat16)
    if variant in ("int8", "int4"):
        quantize_model(model, QuantSpec(variant))
    return model


def decode_both_ways(model, monkeypatch, seed: int, recorder=None) -> dict:
    """{fused: (logits of one new token, logits of a verification of four)} with the CPU kernels on
    (True) and off, after the same 7-token prefill; with a recorder, also the experts it saw."""
    from contextlib import nullcontext

    tokens = torch.randint(2, 96, (1, 12), generator=torch.Generator().manual_seed(seed))
    out = {}
    for fused in (True, False):
        monkeypatch.setattr(cpu, "_loaded", fused)
        with torch.inference_mode(), recorder or nullcontext() as rec:
            model.setup_caches(1, 32)
            model(tokens[:, :7], 0)
            if rec is not None:
                rec.clear()
            logits = (model.logits(model(tokens[:, 7:8], 7)), model.logits(model(tokens[:, 8:12], 8)))
        out[fused] = (logits, [rec.layer(j)[0] for j in range(len(rec.routers))] if rec is not None else [])
    return out


def assert_close(out: dict, tol: float, variant: str) -> None:
    for a, b in zip(out[True][0], out[False][0]):
        assert (a - b).abs().max() < tol * max(1.0, b.abs().max()), variant


@pytest.mark.parametrize("variant", ["fp32", "bf16", "int8", "int4", "no-q-lora", "halves"])
def test_fused_attention_decode_matches_the_pytorch_layers(variant, monkeypatch):
    """moedesk::mla_decode (norm, projections, rotary, cache write, absorbed attention, out_proj and the
    residual in one call) against the PyTorch path, for one new token and for a verification of four."""
    over = {"no-q-lora": {"q_lora_rank": 0}, "halves": {"rope_interleave": False}}.get(variant, {})
    out = decode_both_ways(small_model(variant, 1, **over), monkeypatch, seed=2)
    # int4: with the kernels on, the prefill's products round activations to int8 per 64 values as the
    # decode's do (kernel_product); off, torch's int4 kernel rounds them to bf16. Twice the per-product error.
    tol = {"int4": 5e-2}.get(variant, 2e-4 if variant in ("fp32", "no-q-lora", "halves") else 3e-2)
    assert_close(out, tol, variant)


@pytest.mark.parametrize("variant", ["fp32", "bf16", "int8", "int4", "v2-softmax", "no-shared", "greedy"])
def test_fused_moe_layer_matches_the_pytorch_layers(variant, monkeypatch):
    """moedesk::moe_ffn (norm, router with bias and group limit, chosen experts, shared experts, residual)
    against the PyTorch path: same experts chosen, same output; observers and load counting still fed."""
    from engine.routing_stats import RoutingRecorder

    over = {"v2-softmax": {"model_type": "deepseek_v2", "scoring_func": "softmax", "topk_method": "group_limited_greedy",
                           "n_group": 2, "topk_group": 1, "norm_topk_prob": False, "routed_scaling_factor": 1.5},
            "no-shared": {"n_shared_experts": 0}, "greedy": {"topk_method": "greedy", "n_group": 1, "topk_group": 1}
            }.get(variant, {"n_group": 2, "topk_group": 1, "routed_scaling_factor": 2.5})
    model = small_model(variant, 3, **over)
    out = decode_both_ways(model, monkeypatch, seed=5, recorder=RoutingRecorder(model))
    assert_close(out, 2e-4 if variant not in ("bf16", "int8", "int4") else 3e-2, variant)
    for a, b in zip(out[True][1], out[False][1]):  # the same experts, recorded for both tokens and the four
        assert a.shape[0] == 5 and torch.equal(a.sort(-1).values, b.sort(-1).values), variant


def test_a_bf16_checkpoint_run_in_fp32_decodes_from_blocks_of_16_rows(isa, monkeypatch):
    """fp32 weights that hold bf16 values (the bundled model) reach the kernels as bf16 copies, on
    AVX-512 in blocks of 16 rows: the fused decode and verification match the PyTorch layers."""
    model = small_model("fp32", 21, first_k_dense_replace=1, n_shared_experts=1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
    made, real = [], cpu.blocks16
    monkeypatch.setattr(cpu, "blocks16", lambda w: made.append(tuple(w.shape)) or real(w))
    out = decode_both_ways(model, monkeypatch, seed=22)
    assert_close(out, 2e-4, "bf16-valued fp32")
    assert bool(made) == (isa == "avx512"), made


@pytest.mark.parametrize("variant", ["fp32", "bf16"])
def test_fused_attention_over_a_long_context(variant, monkeypatch):
    """The attention core (vectorized scores, exp and weighted sum over cache rows) past the short
    contexts above: 150 cached tokens, then one token and a verification of four, at lengths that are
    not multiples of 16."""
    model = small_model(variant, 4)
    tokens = torch.randint(2, 96, (1, 155), generator=torch.Generator().manual_seed(6))
    out = {}
    for fused in (True, False):
        monkeypatch.setattr(cpu, "_loaded", fused)
        with torch.inference_mode():
            model.setup_caches(1, 160)
            model(tokens[:, :150], 0)
            out[fused] = (model.logits(model(tokens[:, 150:151], 150)), model.logits(model(tokens[:, 151:155], 151)))
    for a, b in zip(out[True], out[False]):
        assert (a - b).abs().max() < (2e-4 if variant == "fp32" else 3e-2) * max(1.0, b.abs().max()), variant


def test_every_layer_in_one_call_equals_the_layer_by_layer_calls(monkeypatch):
    """moedesk::layers_decode (the whole decoder stack, dense and MoE layers, in one call) gives the bits
    of the per-layer fused calls, and feeds the routers' bookkeeping the same choices."""
    from engine.model.transformer import Transformer
    from engine.routing_stats import RoutingRecorder

    model = small_model("fp32", 7, first_k_dense_replace=1)
    tokens = torch.randint(2, 96, (1, 12), generator=torch.Generator().manual_seed(8))
    calls, real = [], torch.ops.moedesk.layers_decode
    monkeypatch.setattr(torch.ops.moedesk, "layers_decode", lambda *a: calls.append(1) or real(*a))
    out = {}
    for joined in (True, False):
        if not joined:
            monkeypatch.setattr(Transformer, "fused_layers", lambda *a: None)
        with torch.inference_mode(), RoutingRecorder(model) as rec:
            model.setup_caches(1, 32)
            model(tokens[:, :7], 0)
            rec.clear()
            logits = (model.logits(model(tokens[:, 7:8], 7)), model.logits(model(tokens[:, 8:12], 8)))
            out[joined] = logits, [rec.layer(j)[0] for j in range(len(rec.routers))]
    assert len(calls) == 2
    assert all(torch.equal(a, b) for a, b in zip(out[True][0], out[False][0]))
    assert all(torch.equal(a, b) for a, b in zip(out[True][1], out[False][1]))


@pytest.mark.parametrize("variant", ["fp32", "int8", "int4", "bf16"])
def test_the_layers_norm_and_head_in_one_call_equal_the_separate_calls(variant, monkeypatch):
    """Transformer.decode runs the decoder stack, the final norm and the head as one call
    (moedesk::layers_decode_logits): hidden states and logits within rounding of forward + logits, the
    same routing choices, and each row the bits it has in a pass of any length (a verification's first
    row is the plain step's, so greedy speculation stays identical). bf16 activations take forward +
    logits."""
    from engine.model.transformer import Transformer
    from engine.routing_stats import RoutingRecorder

    model = small_model(variant, 13, first_k_dense_replace=1)
    tokens = torch.randint(2, 96, (1, 12), generator=torch.Generator().manual_seed(14))
    calls, real = [], torch.ops.moedesk.layers_decode_logits
    monkeypatch.setattr(torch.ops.moedesk, "layers_decode_logits", lambda *a: calls.append(1) or real(*a))

    def passes(one_call: bool):
        if not one_call:
            monkeypatch.setattr(Transformer, "fused_decode", lambda *a: None)
        out = []
        with torch.inference_mode(), RoutingRecorder(model) as rec:
            for T in (1, 4):
                model.setup_caches(1, 32)
                model(tokens[:, :7], 0)
                rec.clear()
                out.append((*model.decode(tokens[:, 7:7 + T], 7), [rec.layer(j)[0] for j in range(len(rec.routers))]))
        return out

    one, separate = passes(True), passes(False)
    if variant == "bf16":
        assert not calls
        return
    assert len(calls) == 2
    for (h, logits, ids), (h_ref, logits_ref, ids_ref) in zip(one, separate):
        assert (h - h_ref).abs().max() < 1e-5 * max(1.0, h_ref.abs().max())
        assert (logits - logits_ref).abs().max() < 1e-5 * max(1.0, logits_ref.abs().max())
        assert all(torch.equal(a, b) for a, b in zip(ids, ids_ref))
    assert torch.equal(one[0][1][0, 0], one[1][1][0, 0]) and torch.equal(one[0][0][0, 0], one[1][0][0, 0])


def test_the_one_call_pass_refuses_a_head_or_norm_of_the_wrong_size():
    """Wrong head or norm shapes, or too many rows, are errors raised before any layer runs."""
    model = small_model("fp32", 15)
    with torch.inference_mode():
        model.setup_caches(1, 32)
        model(torch.tensor([[3, 4, 5]]), 0)
        x = model.embed(torch.tensor([[6]]))
        (w, ints, floats, top_k, E), kvs = model._pass_args("main", model.layers, x, 3)
        cos, sin = model.rotary.rows(3, 1)
        head, head_ints = model._head_args()[1]
        H = x.shape[-1]
        bad_heads = {"norm \\[H\\] fp32": [torch.ones(H + 1)] + head[1:],
                     "head \\[V, H\\]": [head[0], torch.randn(50, H + 8)] + head[2:]}
        for message, bad in bad_heads.items():
            with pytest.raises(RuntimeError, match=message):
                torch.ops.moedesk.layers_decode_logits(x[0], w, ints, floats, kvs, cos, sin, 3, top_k, E, bad,
                                                       head_ints, 1e-6)
        with pytest.raises(RuntimeError, match="1 <= T <= 16"):
            torch.ops.moedesk.layers_decode_logits(x[0].expand(17, H), w, ints, floats, kvs, cos, sin, 3, top_k, E,
                                                   head, head_ints, 1e-6)


def test_fused_decode_past_the_first_rotary_table_and_inside_fixed_weights(monkeypatch):
    """The fused stack's rotary rows past the table's first 256 positions (the table grows for them:
    the layer-by-layer path grows it, the fused one once read past its end), and the arguments a
    fixed_weights() scope keeps from its first pass, give the layer-by-layer logits bit for bit."""
    from engine.model.transformer import Transformer

    model = small_model("fp32", 9, first_k_dense_replace=1)
    tokens = torch.randint(2, 96, (1, 264), generator=torch.Generator().manual_seed(10))
    out = {}
    for joined in (True, False):
        if not joined:
            monkeypatch.setattr(Transformer, "fused_layers", lambda *a: None)
        with torch.inference_mode():
            model.reset_rotary()  # a table of 256 positions from the prefill, as a fresh model has
            model.setup_caches(1, 300)
            model(tokens[:, :250], 0)
            with model.fixed_weights():
                steps = [model.logits(model(tokens[:, p:p + 1], p)) for p in range(250, 260)]
                steps.append(model.logits(model(tokens[:, 260:264], 260)))
            out[joined] = steps
    assert all(torch.equal(a, b) for a, b in zip(out[True], out[False]))


def team_passes(model, tokens, team: int) -> list[torch.Tensor]:
    torch.ops.moedesk.set_team(team)
    try:
        with torch.inference_mode():
            model.setup_caches(1, 32)
            model(tokens[:, :12], 0)
            return [model.logits(model(tokens[:, 12:13], 12)), model.logits(model(tokens[:, 13:17], 13))]
    finally:
        torch.ops.moedesk.set_team(1)


def test_a_team_pass_equals_a_pass_on_per_product_regions():
    """layers_decode on one team of threads (the products, heads and experts split by hand-off) gives the
    bits of the same pass opening ATen's parallel regions per product; greedy decoding is unchanged. So
    it does with a busy process on these cores, where thread 0 runs the slices of helpers the OS has
    taken off their core."""
    if torch.get_num_threads() < 2:
        pytest.skip("one thread: no team")
    model = small_model("fp32", 11, first_k_dense_replace=1, n_shared_experts=1)
    tokens = torch.randint(2, 96, (1, 20), generator=torch.Generator().manual_seed(12))
    plain = team_passes(model, tokens, 0)
    assert all(torch.equal(a, b) for a, b in zip(team_passes(model, tokens, 1), plain))
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        for _ in range(20):
            assert all(torch.equal(a, b) for a, b in zip(team_passes(model, tokens, 1), plain))
    finally:
        busy.kill()
        busy.wait()


def mtp_decode_rows(monkeypatch) -> list:
    """The positions of each moedesk::mtp_decode call from now on, appended as they run."""
    calls = []
    real = torch.ops.moedesk.mtp_decode
    monkeypatch.setattr(torch.ops.moedesk, "mtp_decode", lambda *a: calls.append(a[1].shape[0]) or real(*a))
    return calls


def test_an_mtp_catch_up_of_17_to_64_positions_runs_in_16_row_calls_and_equals_the_modules(monkeypatch):
    """mtp_draft over more positions than one kernel call takes (a catch-up after plain steps) goes to the
    fused kernel in 16-row pieces, one after another (each piece's cache rows written before the next
    reads them); hidden states, the last position's logits and the cache equal the modules run whole, and
    the next pass over the cache agrees too. Above 4 pieces it runs the modules."""
    from engine.model import transformer

    model = small_model("fp32", 31, n_mtp=1, first_k_dense_replace=1, n_shared_experts=1)
    g = torch.Generator().manual_seed(32)
    calls = mtp_decode_rows(monkeypatch)
    with torch.inference_mode():
        for T in (40, 64, 65):
            hidden = torch.randn(1, T + 1, model.cfg.hidden_size, generator=g)
            ids = torch.randint(2, 96, (1, T + 1), generator=g)
            outs = {}
            for pieces in (4, 0):
                monkeypatch.setattr(transformer, "CATCH_UP_CALLS", pieces)
                model.setup_caches(1, 128)
                calls.clear()
                h, logits = model.mtp_draft(0, hidden[:, :T], ids[:, :T], 3)
                shapes = list(calls)
                nxt = model.mtp_forward(0, hidden[:, T:], ids[:, T:], 3 + T)  # reads every cache row
                outs[pieces] = (h, logits, nxt, shapes)
            (h, logits, nxt, shapes), (h0, logits0, nxt0, shapes0) = outs[4], outs[0]
            assert shapes0 == [] and shapes == ([16] * (T // 16) + [T % 16] * (T % 16 > 0) if T <= 64 else [])
            torch.testing.assert_close(h, h0, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(logits, logits0, atol=1e-4, rtol=1e-5)
            torch.testing.assert_close(nxt, nxt0, atol=1e-5, rtol=1e-5)


def test_an_mtp_pass_from_position_0_runs_fused_and_equals_the_modules(monkeypatch):
    """An MTP depth's first pass of a reply starts at position 0 (catching up over the prompt): it runs on
    the fused kernel too, in 16-row calls, within 1e-5 of the modules (whose attention from position 0 is
    the expanded form). The main model's prefill from 0 stays on the PyTorch layers."""
    model = small_model("fp32", 17, n_mtp=1, first_k_dense_replace=1, n_shared_experts=1)
    g = torch.Generator().manual_seed(18)
    calls = mtp_decode_rows(monkeypatch)
    with torch.inference_mode():
        for T in (5, 16, 40):
            hidden = torch.randn(1, T, model.cfg.hidden_size, generator=g)
            ids = torch.randint(2, 96, (1, T), generator=g)
            model.setup_caches(1, 64)
            assert model.fused_layers(hidden, 0) is None
            want_h = model.mtp_forward(0, hidden, ids, 0)
            want = model.mtp_logits(0, want_h[:, -1])[0]
            model.setup_caches(1, 64)
            calls.clear()
            got_h, got = model.mtp_draft(0, hidden, ids, 0)
            assert sum(calls) == T, calls
            tol = 1e-5 * max(1.0, want.abs().max().item())
            assert (got_h - want_h).abs().max() <= tol and (got - want).abs().max() <= tol, T


@pytest.mark.parametrize("variant", ["fp32", "int8"])
def test_an_mtp_depth_in_one_call_equals_its_modules(variant):
    """moedesk::mtp_decode (enorm, hnorm, eh_proj, the block, head_norm and head in one call) gives the
    hidden states and draft logits of the MTP modules run one by one, catch-up passes of several
    positions and single drafts alike, inside fixed_weights() too; the drafts (argmax) are the same."""
    model = small_model(variant, 13, n_mtp=2, first_k_dense_replace=1, n_shared_experts=1)
    g = torch.Generator().manual_seed(14)
    with torch.inference_mode():
        model.setup_caches(1, 40)
        hidden = torch.randn(1, 40, model.cfg.hidden_size, generator=g)
        for d in range(2):
            model.mtp_forward(d, hidden[:, :10], torch.randint(2, 96, (1, 10), generator=g), 0)
        for fixed in (False, True):
            with model.fixed_weights() if fixed else contextlib.nullcontext():
                for start, T in ((10, 4), (14, 1), (15, 1), (16, 3)):
                    for d in range(2):
                        ids = torch.randint(2, 96, (1, T), generator=g)
                        want_h = model.mtp_forward(d, hidden[:, start:start + T], ids, start)
                        want = model.mtp_logits(d, want_h[:, -1])[0]
                        got_h, got = model.fused_mtp(d, hidden[:, start:start + T], ids, start)  # not None
                        assert got_h.shape == want_h.shape and got.shape == want.shape
                        tol = 1e-5 * max(1.0, want.abs().max().item())
                        assert (got_h - want_h).abs().max() <= tol and (got - want).abs().max() <= tol, (d, start)
                        assert int(got.argmax()) == int(want.argmax())
