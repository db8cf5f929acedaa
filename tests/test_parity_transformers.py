"""The engine against transformers' DeepseekV3/V2 on the same random checkpoints (fp32)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from engine.generate import generate
from engine.model.checkpoint import load_model
from engine.sampling import SamplingParams

TOL = 1e-4
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.707}

V3_CASES = {
    "qlora-groups-dense1-norm": dict(q_lora_rank=24, n_group=4, topk_group=2, first_k_dense_replace=1,
                                     norm_topk_prob=True),
    "plainq-nogroups-dense0-nonorm": dict(q_lora_rank=None, n_group=1, topk_group=1, first_k_dense_replace=0,
                                          norm_topk_prob=False),
    "yarn-qlora-groups": dict(q_lora_rank=24, n_group=2, topk_group=1, first_k_dense_replace=1,
                              rope_parameters=YARN, routed_scaling_factor=2.5),
    "yarn-plainq-not-interleaved": dict(q_lora_rank=None, n_group=4, topk_group=3, first_k_dense_replace=0,
                                        rope_parameters=YARN, rope_interleave=False, num_experts_per_tok=3),
}
V2_CASES = {
    "v2-lite-greedy": dict(q_lora_rank=None, topk_method="greedy", first_k_dense_replace=1,
                           norm_topk_prob=False, routed_scaling_factor=1.0),
    "v2-group-limited-yarn": dict(q_lora_rank=24, topk_method="group_limited_greedy", n_group=4, topk_group=2,
                                  norm_topk_prob=False, routed_scaling_factor=1.7, rope_parameters=YARN),
}
ALL_CASES = [("v3", k, v) for k, v in V3_CASES.items()] + [("v2", k, v) for k, v in V2_CASES.items()]


def tokens(n: int, seed: int = 1, vocab: int = 96) -> torch.Tensor:
    return torch.randint(2, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind,name,overrides", ALL_CASES, ids=[c[1] for c in ALL_CASES])
def test_full_forward_and_cached_decode_match_transformers(hf_checkpoint, kind, name, overrides):
    ref_model, path = hf_checkpoint(kind, **overrides)
    ids = tokens(40)  # past original_max_position_embeddings=16, so YaRN's interpolated bands matter
    with torch.no_grad():
        ref = ref_model(ids).logits[0]
    ours = load_model(path, device="cpu", dtype=torch.float32)
    assert len(ours.mtp) == 0
    with torch.no_grad():
        full = ours.logits(ours(ids))[0]
        assert (full - ref).abs().max().item() <= TOL
        assert ref.std() > 0.1  # the logits are not trivially flat

        # Prefill, then one token at a time through the latent cache (absorbed attention).
        ours.setup_caches(1, 64)
        steps = [ours.logits(ours(ids[:, :20], 0))[0]]
        for i in range(20, 40):
            steps.append(ours.logits(ours(ids[:, i:i + 1], i))[0])
        assert (torch.cat(steps) - ref).abs().max().item() <= TOL

        # Several new tokens at once against the cache, as speculative verification does.
        ours.setup_caches(1, 64)
        ours(ids[:, :13], 0)
        chunk = ours.logits(ours(ids[:, 13:18], 13))[0]
        assert (chunk - ref[13:18]).abs().max().item() <= TOL


def test_config_without_scoring_func_means_sigmoid(hf_checkpoint):
    _, path = hf_checkpoint("v3", n_group=2, topk_group=1)
    cfg = json.loads((path / "config.json").read_text())
    assert "scoring_func" not in cfg and "rope_parameters" in cfg
    ours = load_model(path, device="cpu")
    router = ours.layers[-1].ffn.router
    assert router.scoring == "sigmoid" and router.method == "noaux_tc"
    assert router.bias.abs().sum() > 0  # the non-zero score-correction bias was loaded


def test_fused_3d_expert_tensors_load(hf_checkpoint, tmp_path):
    """transformers 5 may also save experts fused as [E, 2I, H] / [E, H, I]."""
    ref_model, path = hf_checkpoint("v3", n_group=2, topk_group=1, first_k_dense_replace=1)
    fused = tmp_path / "fused"
    fused.mkdir()
    state = {k: v.contiguous() for k, v in ref_model.state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)
    save_file(state, str(fused / "model.safetensors"))
    (fused / "config.json").write_text((path / "config.json").read_text())
    ids = tokens(12)
    ours = load_model(fused, device="cpu")
    with torch.no_grad():
        a = ours.logits(ours(ids))
        ref = ref_model(ids).logits
    assert (a - ref).abs().max().item() <= TOL


def test_sharded_checkpoint_with_index(hf_checkpoint, tmp_path):
    ref_model, _ = hf_checkpoint("v3", n_group=2, topk_group=1)
    sharded = tmp_path / "sharded"
    ref_model.save_pretrained(sharded, max_shard_size="60KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 2
    fractions = []
    ours = load_model(sharded, device="cpu", progress=lambda stage, f: fractions.append(f))
    assert fractions and fractions[-1] == pytest.approx(1.0) and fractions == sorted(fractions)
    ids = tokens(10)
    with torch.no_grad():
        assert (ours.logits(ours(ids)) - ref_model(ids).logits).abs().max().item() <= TOL


@pytest.mark.parametrize("kind,overrides", [("v3", dict(n_group=2, topk_group=1, rope_parameters=YARN)),
                                            ("v2", dict(q_lora_rank=None, topk_method="greedy"))])
def test_greedy_generate_equals_transformers(hf_checkpoint, kind, overrides):
    ref_model, path = hf_checkpoint(kind, **overrides)
    prompt = tokens(7, seed=3)
    with torch.no_grad():
        ref = ref_model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=24,
                                 do_sample=False, eos_token_id=None, pad_token_id=95)[0, 7:].tolist()
    ours = load_model(path, device="cpu")
    result = generate(ours, prompt[0].tolist(), SamplingParams(max_tokens=24))
    assert result.token_ids == ref
    assert len(set(ref)) > 3  # not a degenerate constant output


def test_latent_cache_holds_only_latent_and_rope_key(hf_checkpoint):
    _, path = hf_checkpoint("v3", n_group=2, topk_group=1)
    ours = load_model(path, device="cpu", dtype=torch.float32)
    ours.setup_caches(1, 32)
    cfg = ours.cfg
    per_token = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    assert cfg.cache_values_per_token == per_token == 24
    assert ours.cache_bytes_per_token() == cfg.num_hidden_layers * per_token * 4
    cache_tensors = [b for n, b in ours.named_buffers() if ".cache." in n]
    assert sum(b.numel() for b in cache_tensors) == cfg.num_hidden_layers * 32 * per_token
