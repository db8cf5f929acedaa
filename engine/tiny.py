"""Small random-weight models written in the real formats: for tests, and for the quick start until
the bundled model exists. config.json + model.safetensors (DeepSeek names, MTP as extra layers),
tokenizer.json trained with `tokenizers`, tokenizer_config.json with a Jinja chat template."""
from __future__ import annotations

import inspect
from pathlib import Path

from engine.model.checkpoint import save_model
from engine.model.config import parse_config
from engine.model.transformer import Transformer
from engine.train.tokenizer_train import train_bpe, write_tokenizer_files


def tiny_config(vocab_size: int = 512, **overrides) -> dict:
    """A DeepSeek-V3 config.json dict at toy size; overrides replace any field."""
    d = {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "vocab_size": vocab_size, "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32,
        "num_hidden_layers": 2, "first_k_dense_replace": 1, "num_attention_heads": 4,
        "num_key_value_heads": 4, "q_lora_rank": 32, "kv_lora_rank": 16, "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 8, "v_head_dim": 16, "n_routed_experts": 8, "n_shared_experts": 1,
        "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1, "routed_scaling_factor": 2.5,
        "norm_topk_prob": True, "scoring_func": "sigmoid", "topk_method": "noaux_tc",
        "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "rope_interleave": True, "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 1,
        "num_nextn_predict_layers": 1, "torch_dtype": "float32",
    }
    d.update(overrides)
    return d


def v2_lite_config(num_hidden_layers: int = 27, n_routed_experts: int = 64, vocab_size: int = 102400,
                   **overrides) -> dict:
    """DeepSeek-V2-Lite's shapes (hidden 2048, MLA without q compression, 64 routed experts top-6 +
    2 shared, 27 layers) in a V3 config (sigmoid router, one expert group): random-weight models of
    a real size, for speed measurements. Fewer layers/experts/vocab keep the per-layer shapes."""
    return tiny_config(vocab_size=vocab_size, **{
        "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408,
        "num_hidden_layers": num_hidden_layers, "first_k_dense_replace": 1, "num_attention_heads": 16,
        "num_key_value_heads": 16, "q_lora_rank": None, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64, "v_head_dim": 128, "n_routed_experts": n_routed_experts, "n_shared_experts": 2,
        "num_experts_per_tok": 6, "n_group": 1, "topk_group": 1, "routed_scaling_factor": 1.0,
        "max_position_embeddings": 4096, "torch_dtype": "bfloat16", **overrides})


def write_tokenizer(out: Path, vocab_size: int) -> None:
    """A small byte-level BPE on a little standard-library source: deterministic for a Python version."""
    import json as json_mod
    import textwrap

    tok = train_bpe([inspect.getsource(m) for m in (json_mod, textwrap)], vocab_size)
    write_tokenizer_files(tok, out, max_length=512)


def write_tiny_model(out: str | Path, seed: int = 0, std: float = 0.1, with_tokenizer: bool = True,
                     save_dtype=None, **overrides) -> Path:
    """A random-weight DeepSeek-V3 checkpoint folder; returns its path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    d = tiny_config(**overrides)
    cfg = parse_config(d)
    model = Transformer(cfg, n_mtp=cfg.num_nextn_predict_layers)
    model.init_weights(seed=seed, std=std)
    save_model(model, out, dtype=save_dtype)
    if with_tokenizer:
        write_tokenizer(out, cfg.vocab_size)
    return out
