"""Shared fixtures: small random DeepSeek checkpoints written by transformers itself."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))

BASE = dict(vocab_size=96, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, qk_nope_head_dim=16,
            qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
            max_position_embeddings=128, bos_token_id=0, eos_token_id=1, first_k_dense_replace=1)


def randomize(model: torch.nn.Module, seed: int, std: float = 0.15) -> None:
    """Larger-than-init random weights so routing, norms and attention all matter to the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            p.copy_(1.0 + noise if "norm" in name else noise)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)


def make_hf_model(kind: str = "v3", seed: int = 0, **overrides):
    from transformers import (DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config,
                              DeepseekV3ForCausalLM)

    kw = dict(BASE, **overrides)
    kw.setdefault("rope_parameters", {"rope_type": "default", "rope_theta": 10000.0})
    if kind == "v3":
        cfg, cls = DeepseekV3Config(**kw), DeepseekV3ForCausalLM
    else:
        cfg, cls = DeepseekV2Config(**kw), DeepseekV2ForCausalLM
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    randomize(model, seed)
    return model


@pytest.fixture
def hf_checkpoint(tmp_path):
    """Factory: (kind, **config overrides) → (transformers model, folder it was saved to)."""
    def build(kind="v3", seed=0, **overrides):
        model = make_hf_model(kind, seed, **overrides)
        path = tmp_path / f"{kind}-{seed}-{len(list(tmp_path.iterdir()))}"
        model.save_pretrained(path)
        return model, path
    return build
