"""Loading real layouts (FP8 block-scaled, MTP layers, official config.json) and refusing bad files."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.model import ModelLoadError, parse_config
from engine.model import checkpoint as ckpt
from engine.model.checkpoint import dequantize_fp8, load_model
from engine.tiny import tiny_config, write_tiny_model

OFFICIAL_V3_CONFIG = {  # the fields of deepseek-ai/DeepSeek-V3's config.json that matter here
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "first_k_dense_replace": 3,
    "hidden_size": 7168, "intermediate_size": 18432, "kv_lora_rank": 512, "max_position_embeddings": 163840,
    "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256,
    "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 128, "num_experts_per_tok": 8,
    "num_hidden_layers": 61, "num_key_value_heads": 128, "num_nextn_predict_layers": 1, "q_lora_rank": 1536,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "rms_norm_eps": 1e-6,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "topk_group": 4,
    "topk_method": "noaux_tc", "torch_dtype": "bfloat16", "vocab_size": 129280, "bos_token_id": 0,
    "eos_token_id": 1, "some_future_field": {"ignored": True},
}


def test_official_config_parses_with_yarn_and_fp8():
    cfg = parse_config(OFFICIAL_V3_CONFIG)
    assert cfg.rope.is_yarn and cfg.rope.factor == 40 and cfg.fp8_block_size == (128, 128)
    mscale = 0.1 * math.log(40) + 1
    assert cfg.softmax_scale == pytest.approx(192 ** -0.5 * mscale ** 2)  # 0.13523, as transformers computes
    assert cfg.rope.cos_sin_scale() == pytest.approx(1.0)
    assert cfg.is_moe_layer(3) and not cfg.is_moe_layer(2)
    assert cfg.cache_values_per_token == 576


def test_rope_scaling_and_rope_parameters_forms_agree():
    a = dict(OFFICIAL_V3_CONFIG)
    b = {k: v for k, v in a.items() if k not in ("rope_scaling", "rope_theta")}
    b["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000, "factor": 40, "beta_fast": 32,
                            "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0,
                            "original_max_position_embeddings": 4096}
    assert parse_config(a).rope == parse_config(b).rope


def test_missing_required_field_is_named():
    d = dict(OFFICIAL_V3_CONFIG)
    del d["kv_lora_rank"]
    with pytest.raises(ModelLoadError, match="kv_lora_rank"):
        parse_config(d)


def test_unknown_model_type_is_refused(tmp_path):
    path = write_tiny_model(tmp_path / "m", with_tokenizer=False)
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = "llama"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="unsupported model_type 'llama'"):
        load_model(path)


def quantize_fp8(w: torch.Tensor, block=(128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's layout: per 128×128 block, scale = amax / 448, stored as weight_scale_inv."""
    out, inp = w.shape
    bo, bi = -(-out // block[0]), -(-inp // block[1])
    padded = torch.zeros(bo * block[0], bi * block[1])
    padded[:out, :inp] = w
    blocks = padded.view(bo, block[0], bi, block[1])
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0  # [bo, bi]
    q = (blocks / scale[:, None, :, None]).to(torch.float8_e4m3fn).view(bo * block[0], bi * block[1])
    return q[:out, :inp].contiguous(), scale


def test_fp8_block_scaled_checkpoint_matches_its_dequantized_reference(tmp_path):
    # Dimensions that are not multiples of 128, so edge blocks are padded.
    overrides = dict(hidden_size=192, intermediate_size=320, moe_intermediate_size=144, q_lora_rank=160,
                     kv_lora_rank=136)
    src = write_tiny_model(tmp_path / "src", with_tokenizer=False, **overrides)
    state = load_file(src / "model.safetensors")
    fp8_state, ref_state, n_fp8 = {}, {}, 0
    for name, w in state.items():
        linear = w.dim() == 2 and "norm" not in name and "embed" not in name and "lm_head" not in name \
            and not name.endswith("mlp.gate.weight")
        if linear:
            q, scale = quantize_fp8(w)
            fp8_state[name], fp8_state[name + "_scale_inv"] = q, scale
            ref_state[name] = dequantize_fp8(q, scale, (128, 128))
            n_fp8 += 1
        else:
            fp8_state[name] = ref_state[name] = w
    assert n_fp8 > 20
    for d, st, quant in ((tmp_path / "fp8", fp8_state, True), (tmp_path / "ref", ref_state, False)):
        d.mkdir()
        save_file(st, str(d / "model.safetensors"))
        cfg = json.loads((src / "config.json").read_text())
        if quant:
            cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                          "weight_block_size": [128, 128]}
        (d / "config.json").write_text(json.dumps(cfg))
    ids = torch.randint(2, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    fp8_model, ref_model = load_model(tmp_path / "fp8"), load_model(tmp_path / "ref")
    with torch.no_grad():
        a, b = fp8_model.logits(fp8_model(ids)), ref_model.logits(ref_model(ids))
    assert (a - b).abs().max().item() <= 1e-5
    # and the FP8 copy really is a quantization of the original (close, not equal)
    w = fp8_model.layers[0].attn.kv_up_proj.weight
    orig = state["model.layers.0.self_attn.kv_b_proj.weight"]
    assert 0 < (w - orig).abs().max() < 0.1 * orig.abs().max()


def test_fp8_weight_without_scale_is_refused(tmp_path):
    src = write_tiny_model(tmp_path / "m", with_tokenizer=False)
    state = load_file(src / "model.safetensors")
    name = "model.layers.0.self_attn.o_proj.weight"
    state[name] = state[name].to(torch.float8_e4m3fn)
    save_file(state, str(src / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="weight_scale_inv"):
        load_model(src)


def test_mtp_layers_load_into_mtp_modules(tmp_path):
    path = write_tiny_model(tmp_path / "m", with_tokenizer=False, num_nextn_predict_layers=2)
    state = load_file(path / "model.safetensors")
    n = tiny_config()["num_hidden_layers"]
    assert f"model.layers.{n}.eh_proj.weight" in state and f"model.layers.{n + 1}.enorm.weight" in state
    assert f"model.layers.{n}.shared_head.norm.weight" in state
    model = load_model(path)
    assert len(model.mtp) == 2
    assert torch.equal(model.mtp[1].eh_proj.weight, state[f"model.layers.{n + 1}.eh_proj.weight"])
    assert torch.equal(model.mtp[0].block.attn.kv_up_proj.weight,
                       state[f"model.layers.{n}.self_attn.kv_b_proj.weight"])
    gate_up = model.mtp[0].block.ffn.experts.gate_up
    assert torch.equal(gate_up[3, 32:], state[f"model.layers.{n}.mlp.experts.3.up_proj.weight"])
    assert model.mtp[0].embed is None and model.mtp[0].head is None  # shared with the main model


def test_mtp_copies_of_embedding_and_head_are_shared_when_equal(tmp_path):
    path = write_tiny_model(tmp_path / "m", with_tokenizer=False)
    state = load_file(path / "model.safetensors")
    n = tiny_config()["num_hidden_layers"]
    state[f"model.layers.{n}.embed_tokens.weight"] = state["model.embed_tokens.weight"].clone()
    state[f"model.layers.{n}.shared_head.head.weight"] = state["lm_head.weight"].clone() * 2
    save_file(state, str(path / "model.safetensors"))
    model = load_model(path)
    assert model.mtp[0].embed is None  # identical copy: shared
    assert torch.equal(model.mtp[0].head.weight, state["lm_head.weight"] * 2)  # different: its own


def test_no_mtp_layers_is_fine(tmp_path):
    path = write_tiny_model(tmp_path / "m", with_tokenizer=False, num_nextn_predict_layers=0)
    assert len(load_model(path).mtp) == 0


# ---- bad files: one exception type, naming the file, the tensor and the reason ----

def corrupt(tmp_path, edit):
    path = write_tiny_model(tmp_path / "m", with_tokenizer=False)
    state = load_file(path / "model.safetensors")
    edit(state)
    save_file(state, str(path / "model.safetensors"))
    return path


def test_shape_mismatch_names_the_tensor(tmp_path):
    def edit(s):
        s["model.layers.1.self_attn.o_proj.weight"] = torch.zeros(64, 60)
    with pytest.raises(ModelLoadError, match=r"model\.layers\.1\.self_attn\.o_proj\.weight.*shape \[64, 60\]"):
        load_model(corrupt(tmp_path, edit))


def test_wrong_dtype_is_refused(tmp_path):
    def edit(s):
        s["model.norm.weight"] = torch.ones(64, dtype=torch.int32)
    with pytest.raises(ModelLoadError, match=r"model\.norm\.weight.*dtype"):
        load_model(corrupt(tmp_path, edit))


def test_nan_tensor_is_refused(tmp_path):
    def edit(s):
        s["model.layers.0.mlp.up_proj.weight"][3, 5] = float("nan")
    with pytest.raises(ModelLoadError, match=r"up_proj.*NaN"):
        load_model(corrupt(tmp_path, edit))


def test_missing_tensor_is_named(tmp_path):
    def edit(s):
        del s["model.layers.1.mlp.experts.5.down_proj.weight"]
    with pytest.raises(ModelLoadError, match=r"layers\.1\.ffn\.experts\.down.*missing"):
        load_model(corrupt(tmp_path, edit))


def test_unexpected_tensor_is_named(tmp_path):
    def edit(s):
        s["model.layers.0.self_attn.q_bias"] = torch.zeros(4)
    with pytest.raises(ModelLoadError, match=r"q_bias.*unexpected"):
        load_model(corrupt(tmp_path, edit))


def test_truncated_safetensors_is_refused(tmp_path):
    path = write_tiny_model(tmp_path / "m", with_tokenizer=False)
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        load_model(path)


def test_garbage_file_is_refused(tmp_path):
    path = write_tiny_model(tmp_path / "m", with_tokenizer=False)
    (path / "model.safetensors").write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(ModelLoadError, match="not a valid safetensors"):
        load_model(path)


def test_missing_folder_and_missing_weights(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(tmp_path / "nope")
    path = write_tiny_model(tmp_path / "m", with_tokenizer=False)
    (path / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="no .safetensors"):
        load_model(path)


def test_model_larger_than_memory_is_refused_before_allocating(tmp_path, monkeypatch):
    path = write_tiny_model(tmp_path / "m", with_tokenizer=False)
    monkeypatch.setattr(ckpt, "available_memory", lambda device: 1000)
    allocated = []
    monkeypatch.setattr(ckpt.Transformer, "to_empty", lambda self, **kw: allocated.append(1))
    with pytest.raises(ModelLoadError, match=r"needs .* GiB .* only .* GiB available"):
        load_model(path)
    assert not allocated


def test_bf16_load(tmp_path):
    path = write_tiny_model(tmp_path / "m", with_tokenizer=False)
    model = load_model(path, dtype="bfloat16")
    assert model.layers[0].attn.kv_up_proj.weight.dtype == torch.bfloat16
    assert model.layers[1].ffn.router.weight.dtype == torch.float32  # routing stays fp32
    ids = torch.randint(2, 512, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = load_model(path)
        a, b = model.logits(model(ids))[0], ref.logits(ref(ids))[0]
    # bf16 rounding may flip a near-tied expert choice, so compare direction, not every value
    assert torch.nn.functional.cosine_similarity(a, b, dim=-1).min() > 0.98


def test_a_bf16_checkpoint_loaded_in_fp32_is_known_to_hold_bf16_values_without_a_scan(tmp_path, monkeypatch):
    """Parameters filled only from bf16 tensors are marked bf16-valued at load time (kernel_dense then needs
    no scan of every weight before the first token); the mark agrees with a scan, and a parameter written
    afterwards, or one read from an fp32 file, is scanned as before."""
    from engine.model import linear
    from engine.model.checkpoint import load_model

    model = load_model(write_tiny_model(tmp_path / "bf16", save_dtype=torch.bfloat16), dtype="float32")
    fp32 = load_model(write_tiny_model(tmp_path / "fp32"), dtype="float32")
    scans = []
    real_any = torch.Tensor.any
    monkeypatch.setattr(torch.Tensor, "any", lambda self, *a, **k: scans.append(1) or real_any(self, *a, **k))
    params = [p for n, p in model.named_parameters() if p.dim() >= 2 and ".router." not in n]  # routers: fp32
    assert params and all(linear.bf16_valued(p) for p in params)
    assert not scans  # answered from the load-time mark
    bits = [p.detach().view(-1).view(torch.int32) & 0xFFFF for p in params]
    assert not any(bool(real_any(b)) for b in bits)  # and the mark is true
    with torch.no_grad():
        params[0][0, 0] += 1e-3  # written: its version moves, so it is scanned again
    assert not linear.bf16_valued(params[0]) and scans
    scans.clear()
    w = next(p for p in fp32.parameters() if p.dim() >= 2)
    assert not linear.bf16_valued(w) and scans


HUGE_PAGE_CHECK = """
import engine, re, torch
t = torch.empty(8 << 20, dtype=torch.uint8)
p = t.data_ptr()
for block in re.split(r"\\n(?=[0-9a-f]+-[0-9a-f]+ )", open("/proc/self/smaps").read()):
    lo, hi = (int(v, 16) for v in block.split()[0].split("-"))
    if lo <= p < hi:
        print(" ".join(re.search(r"VmFlags:(.*)", block).group(1).split()))
"""


@pytest.mark.skipif(not Path("/sys/kernel/mm/transparent_hugepage").is_dir(), reason="no transparent huge pages")
def test_the_engine_asks_for_huge_pages_for_weight_sized_tensors():
    """engine/__init__.py sets THP_MEM_ALLOC_ENABLE before torch loads: torch then advises huge pages
    (madvise MADV_HUGEPAGE, the mapping's "hg" flag) for tensors of 2 MiB and more. THP_MEM_ALLOC_ENABLE=0
    from the user keeps 4 KiB pages."""
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    flags = subprocess.run([sys.executable, "-c", HUGE_PAGE_CHECK], capture_output=True, text=True, env=env,
                           check=True).stdout.split()
    assert "hg" in flags
    env["THP_MEM_ALLOC_ENABLE"] = "0"
    flags = subprocess.run([sys.executable, "-c", HUGE_PAGE_CHECK], capture_output=True, text=True, env=env,
                           check=True).stdout.split()
    assert flags and "hg" not in flags
