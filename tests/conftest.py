"""Shared fixtures: small random DeepSeek checkpoints written by transformers itself."""
from __future__ import annotations

import os
from pathlib import Path

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


def write_agreeing_mtp_model(out, vocab_size: int = 512, depth: int = 2, attn_scale: float = 1.0, seed: int = 0,
                             with_tokenizer: bool = False):
    """A model whose MTP modules mostly predict what the main model will, by construction.

    The main model has one decoder layer. Each MTP module copies that layer, passes the embedding of
    the token it is given straight through eh_proj (embedding rows of unit RMS make enorm the
    identity) and shares the final norm, so it computes the main model's prediction for that token.
    Only attention differs (the module's cache holds other inputs), which keeps agreement high but
    below 100% (about 80% here; attn_scale < 1 raises it), so both the accept and the reject paths run.
    """
    from engine.model.checkpoint import save_model
    from engine.model.config import parse_config
    from engine.model.transformer import Transformer
    from engine.tiny import tiny_config

    cfg = parse_config(tiny_config(vocab_size=vocab_size, num_hidden_layers=1, first_k_dense_replace=0,
                                   num_nextn_predict_layers=depth))
    model = Transformer(cfg, n_mtp=depth)
    model.init_weights(seed=seed, std=0.1)
    H = cfg.hidden_size
    with torch.no_grad():
        emb = model.embed.weight
        emb /= emb.pow(2).mean(-1, keepdim=True).sqrt()
        model.layers[0].attn.out_proj.weight *= attn_scale
        for m in model.mtp:
            m.eh_proj.weight.zero_()
            m.eh_proj.weight[:, :H] = torch.eye(H)
            m.block.load_state_dict(model.layers[0].state_dict())
            m.head_norm.weight.copy_(model.norm.weight)
    save_model(model, out)
    if with_tokenizer:
        from engine.tiny import write_tokenizer
        write_tokenizer(Path(out), vocab_size)
    return out
