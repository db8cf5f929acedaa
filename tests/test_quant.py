"""Weight-only int8/int4 (and FP8 kept as FP8): the quantizers, the CPU products, quantize-on-load,
the compressed-tensors checkpoint layout (checked against compressed-tensors' own packing), and that
greedy speculative decoding stays identical to plain decoding under each quantization."""
from __future__ import annotations

import json

import pytest
import torch

from engine.generate import generate
from engine.model.checkpoint import load_model, save_model
from engine.model.errors import ModelLoadError
from engine.quant import QuantExperts, QuantLinear, QuantSpec, cpu_pack, cpu_product, model_spec, quantize_model
from engine.sampling import SamplingParams
from engine.speculative import SpeculativeConfig
from engine.tiny import write_tiny_model
from kernels import cpu
from kernels.formats import dequantize, quantize_fp8, quantize_int4, quantize_int8, unpack_int4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny"), with_tokenizer=False, num_nextn_predict_layers=2)


def test_round_to_nearest_error_is_at_most_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(3, 40, 96) * torch.rand(3, 40, 1) * 4
    q8 = quantize_int8(w)
    assert ((dequantize(q8) - w).abs() <= q8.scale[..., None] / 2 + 1e-6).all()
    for group in (32, 64):  # 96 = 1.5 groups of 64: a short last group
        q4 = quantize_int4(w, group)
        step = q4.scale.repeat_interleave(group, -1)[..., :96]
        assert ((dequantize(q4) - w).abs() <= step / 2 + 1e-5).all()
        assert q4.qweight.shape == (3, 40, 48) and q4.qweight.dtype == torch.uint8
    q8fp = quantize_fp8(w, (16, 32))
    assert ((dequantize(q8fp) - w).abs() <= w.abs() / 16 + 1e-3).all()  # e4m3: 3 mantissa bits


@pytest.mark.parametrize("fmt,N,K,group", [("int8", 40, 96, 0), ("int4", 48, 128, 64), ("int4", 32, 96, 64),
                                           ("int4", 40, 64, 32)])
def test_cpu_kernels_compute_the_reference_product(fmt, N, K, group):
    """torch's CPU kernels (int8, int4 when N % 16 == 0) and the bf16 fallback (N = 40) against
    x @ dequantize(W)ᵀ; the int4 case with K = 96, group 64 re-expresses the short group."""
    torch.manual_seed(1)
    w = torch.randn(N, K)
    qw = quantize_int8(w) if fmt == "int8" else quantize_int4(w, group)
    x = torch.randn(5, K)
    want = x @ dequantize(qw).T
    packed = cpu_pack(qw)
    got = cpu_product(packed, x)
    assert packed[0] == (fmt if N % 16 == 0 or fmt == "int8" else "dense")
    assert (got - want).abs().max() < 0.02 * want.abs().max()
    # each row is computed alone: one verification pass gives the same rows as one-token steps
    assert torch.equal(cpu_product(packed, x[:1]), got[:1])


@pytest.mark.skipif(not cpu.available(), reason="moedesk's CPU kernels are not built")
@pytest.mark.parametrize("fmt,K,group", [("int4", 128, 64), ("int4", 96, 64), ("int4", 64, 32), ("int8", 96, 0)])
def test_quantized_prefill_runs_the_kernel_on_the_stored_weight(fmt, K, group):
    """More rows than the kernels take at once (a prompt), int8 and int4 linears and experts: moedesk's
    kernel 16 rows a call, no packed copy of the weight (torch's int4 kernel needed one, doubling the
    model's memory), every row the bits of a one-row call (the prefill's cache equals one-token steps'),
    close to x @ dequantize(W)ᵀ (int4: int8 activations per 64 values, ~0.6% relative)."""
    torch.manual_seed(2)
    spec = QuantSpec(fmt, group) if fmt == "int4" else QuantSpec(fmt)
    lin = QuantLinear(K, 48, spec)
    lin.set_weight(torch.randn(48, K))
    x = torch.randn(37, K)
    with torch.inference_mode():
        y = lin(x)
        assert all(torch.equal(y[i], lin(x[i:i + 1])[0]) for i in range(37))
    assert lin._cpu is None
    want = x @ dequantize(lin.qw).T
    assert ((y - want).norm() / want.norm()).item() < 0.015

    experts = QuantExperts(4, K, 32, spec)
    for name, (N, KK) in {"gate_up": (64, K), "down": (K, 32)}.items():
        for e in range(4):
            experts.set_expert(name, e, slice(None), torch.randn(N, KK) * 0.1)
    ids = torch.randint(0, 4, (37, 2))
    weights = torch.rand(37, 2)
    with torch.inference_mode():
        got = experts(x, weights, ids)
        one = experts(x[:1], weights[:1], ids[:1])  # decode-shaped: moedesk::moe
    assert experts._cpu is None
    gu, dn = (dequantize(q, torch.float32) for q in experts.kernel_weights())
    want = torch.zeros_like(x)
    for t in range(37):
        for j in range(2):
            g, u = (x[t] @ gu[ids[t, j]].T).split(32)
            want[t] += weights[t, j] * (torch.nn.functional.silu(g) * u) @ dn[ids[t, j]].T
    assert ((got - want).norm() / want.norm()).item() < 0.02
    assert ((one[0] - want[0]).norm() / want[0].norm()).item() < 0.02


def test_int4_kept_in_the_kernels_layout_decodes_and_saves_as_row_order(tmp_path):
    """Where moedesk's kernel reads it (AVX-512 VNNI), loading keeps int4 weights in layout "blocks16": the
    logits of a prompt, greedy decoding with MTP speculation and the saved checkpoint are those of the
    same model in row order, and state_dict() and dequantize see row order."""
    d = write_tiny_model(tmp_path / "m", with_tokenizer=False, moe_intermediate_size=64, num_nextn_predict_layers=1)
    spec = QuantSpec("int4", 64)
    model = load_model(d, device="cpu", quant=spec)
    blocked = [m for m in model.modules() if getattr(m, "layout", "rows") == "blocks16"]
    if not cpu.int4_blocks_ok(64, 64, 64):
        assert not blocked
        pytest.skip("the CPU kernels do not read int4 in blocks of 16 rows here (no AVX-512 VNNI)")
    assert {QuantExperts, QuantLinear} <= {type(m) for m in blocked}
    rows = load_model(d, device="cpu", quant=spec)
    for m in rows.modules():
        if hasattr(m, "use_layout"):
            m.use_layout("rows")
    a, b = model.state_dict(), rows.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ex = next(m for m in blocked if isinstance(m, QuantExperts))
    assert torch.equal(dequantize(ex.stacked("down")), dequantize(rows.get_submodule(
        next(n for n, m in model.named_modules() if m is ex)).stacked("down")))
    ids = torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(model.logits(model(ids)), rows.logits(rows(ids)))
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    for spec_cfg in (None, SpeculativeConfig(k=2)):
        got = generate(model, ids[0, :12].tolist(), params, speculative=spec_cfg)
        assert got.token_ids == generate(rows, ids[0, :12].tolist(), params, speculative=spec_cfg).token_ids
    save_model(model, tmp_path / "saved")
    reloaded = load_model(tmp_path / "saved", device="cpu")
    assert all(torch.equal(reloaded.state_dict()[k], b[k]) for k in b)


@pytest.mark.parametrize("spec", [QuantSpec("int8"), QuantSpec("int4", 32), QuantSpec("int4", 64, embed_head=True)])
def test_quantize_on_load_equals_quantizing_the_loaded_model(tiny, spec):
    dense = quantize_model(load_model(tiny, device="cpu"), spec)
    onload = load_model(tiny, device="cpu", quant=spec)
    a, b = dense.state_dict(), onload.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    kinds = {type(m) for m in onload.modules()}
    assert QuantExperts in kinds and QuantLinear in kinds
    assert onload.layers[0].attn.kv_up_proj.weight.dtype == torch.float32  # kept dense by design
    assert onload.layers[1].ffn.router.weight.dtype == torch.float32
    assert model_spec(onload) == spec


@pytest.mark.parametrize("spec", [QuantSpec("int8"), QuantSpec("int4", 32), QuantSpec("int4", 64, embed_head=True)])
def test_compressed_tensors_checkpoint_round_trip(tiny, tmp_path, spec):
    model = load_model(tiny, device="cpu", quant=spec)
    save_model(model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors" and cfg["quantization_status"] == "compressed"
    reloaded = load_model(tmp_path, device="cpu")
    ids = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model.logits(model(ids)), reloaded.logits(reloaded(ids)))
    assert model_spec(reloaded) == spec


def test_packing_matches_compressed_tensors(tiny, tmp_path):
    """Our int4 bytes, zero points and int8 tensors unpack with compressed-tensors' own helpers to the
    values the engine holds (an independent implementation of the layout)."""
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    from safetensors.torch import load_file

    model = load_model(tiny, device="cpu", quant=QuantSpec("int4", 32))
    save_model(model, tmp_path)
    st = load_file(tmp_path / "model.safetensors")
    layer = model.layers[0].attn.q_down_proj
    name = "model.layers.0.self_attn.q_a_proj."
    shape = tuple(st[name + "weight_shape"].tolist())
    q = helpers.unpack_from_int32(st[name + "weight_packed"], 4, torch.Size(shape)).to(torch.int16) + 8
    assert torch.equal(q, unpack_int4(layer.qweight).to(torch.int16))
    G = layer.scale.shape[1]
    zp = helpers.unpack_from_int32(st[name + "weight_zero_point"], 4, torch.Size((shape[0], G)), packed_dim=0)
    assert torch.equal(zp.to(torch.int16) + 8, layer.zero.to(torch.int16))
    expert = model.layers[1].ffn.experts
    e3 = "model.layers.1.mlp.experts.3.up_proj."
    inter = expert.inter
    up = helpers.unpack_from_int32(st[e3 + "weight_packed"], 4, torch.Size((inter, 64))).to(torch.int16) + 8
    assert torch.equal(up, unpack_int4(expert.gate_up_qweight[3, inter:]).to(torch.int16))
    repacked = helpers.pack_to_int32((unpack_int4(layer.qweight).to(torch.int16) - 8).to(torch.int8), 4)
    assert torch.equal(repacked, st[name + "weight_packed"])


def test_greedy_speculation_is_identical_to_plain_under_each_quantization(tiny):
    prompts = [[3, 17, 99, 4, 250], [7] * 6, list(range(40, 52))]
    params = SamplingParams(max_tokens=40)
    for spec in (QuantSpec("int8"), QuantSpec("int4", 32)):
        model = load_model(tiny, device="cpu", quant=spec)
        for ids in prompts:
            plain = generate(model, ids, params).token_ids
            for k in (1, 2, 3, "auto"):
                assert generate(model, ids, params, speculative=SpeculativeConfig(k=k)).token_ids == plain


def test_fp8_checkpoint_kept_as_fp8_computes_like_its_dequantized_weights(tiny, tmp_path):
    """The FP8-kept modules (what a GPU with FP8 runs) give the logits of the dequantized model."""
    spec = QuantSpec("fp8", block=(16, 16))
    model = load_model(tiny, device="cpu", quant=spec)
    save_model(model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert cfg == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [16, 16]}
    dequantized = load_model(tmp_path, device="cpu")  # no FP8 here: dequantized on load
    assert model_spec(dequantized) is None
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        a, b = model.logits(model(ids)), dequantized.logits(dequantized(ids))
    assert (a - b).abs().max() < 0.05 * b.abs().max()  # the kept path multiplies in bf16


def test_fp8_checkpoint_loads_as_fp8_where_the_device_supports_it(tiny, tmp_path, monkeypatch):
    """What a GPU with FP8 (and Triton) does: weights and block scales stored as they are in the file."""
    import engine.model.checkpoint as checkpoint

    model = load_model(tiny, device="cpu", quant=QuantSpec("fp8", block=(16, 16)))
    save_model(model, tmp_path)
    monkeypatch.setattr(checkpoint, "fp8_supported", lambda dev: True)
    kept = load_model(tmp_path, device="cpu")
    assert model_spec(kept) == QuantSpec("fp8", block=(16, 16))
    assert kept.layers[1].ffn.experts.gate_up_qweight.dtype == torch.float8_e4m3fn
    a, b = model.state_dict(), kept.state_dict()
    assert all(torch.equal(a[k].view(torch.uint8) if a[k].dtype == torch.float8_e4m3fn else a[k],
                           b[k].view(torch.uint8) if b[k].dtype == torch.float8_e4m3fn else b[k]) for k in a)


def test_bad_quantized_checkpoints_give_clear_errors(tiny, tmp_path):
    save_model(load_model(tiny, device="cpu", quant=QuantSpec("int4", 32)), tmp_path)
    with pytest.raises(ModelLoadError, match="already quantized"):
        load_model(tmp_path, device="cpu", quant=QuantSpec("int8"))
    from safetensors.torch import load_file, save_file
    st = load_file(tmp_path / "model.safetensors")
    name = "model.layers.0.self_attn.q_a_proj.weight_zero_point"
    broken = dict(st)
    del broken[name]
    save_file(broken, tmp_path / "model.safetensors")
    with pytest.raises(ModelLoadError, match="without its zero"):
        load_model(tmp_path, device="cpu")
    broken[name] = st[name][:1]
    save_file(broken, tmp_path / "model.safetensors")
    with pytest.raises(ModelLoadError, match="does not fit"):
        load_model(tmp_path, device="cpu")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"]["config_groups"]["group_0"]["input_activations"] = {"num_bits": 8}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="weight-only"):
        load_model(tmp_path, device="cpu")
    with pytest.raises(ValueError, match="group size"):
        QuantSpec("int4", 48)
