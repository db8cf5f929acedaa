"""Hugging Face `config.json` → ModelConfig, for the DeepSeek-V2/V3 family.

Parsed once, at the loader boundary. Unknown fields are ignored; a missing required field is a
ModelLoadError naming it. Defaults follow the official DeepSeek configs and transformers.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from engine.model.errors import ModelLoadError

SUPPORTED_MODEL_TYPES = ("deepseek_v3", "deepseek_v2")

REQUIRED_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
    "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
)
REQUIRED_MOE_FIELDS = ("moe_intermediate_size", "num_experts_per_tok")


@dataclass
class RopeConfig:
    theta: float = 10000.0
    type: str = "default"  # "default" or "yarn"
    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    attention_factor: float | None = None
    truncate: bool = True

    @property
    def is_yarn(self) -> bool:
        return self.type == "yarn"

    def softmax_mscale(self) -> float:
        """Factor on the attention softmax scale: mscale(factor, mscale_all_dim)² under YaRN."""
        if not self.is_yarn or not self.mscale_all_dim:
            return 1.0
        m = yarn_mscale(self.factor, self.mscale_all_dim)
        return m * m

    def cos_sin_scale(self) -> float:
        """Factor on cos/sin: mscale(factor, mscale) / mscale(factor, mscale_all_dim) under YaRN."""
        if not self.is_yarn:
            return 1.0
        if self.attention_factor is not None:
            return self.attention_factor
        if self.mscale and self.mscale_all_dim:
            return yarn_mscale(self.factor, self.mscale) / yarn_mscale(self.factor, self.mscale_all_dim)
        return yarn_mscale(self.factor)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None
    intermediate_size: int = 0
    moe_intermediate_size: int = 0
    n_routed_experts: int | None = None
    n_shared_experts: int = 0
    num_experts_per_tok: int = 0
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    n_group: int = 1
    topk_group: int = 1
    topk_method: str = "noaux_tc"  # "noaux_tc" (V3), "greedy" or "group_limited_greedy" (V2)
    scoring_func: str = "sigmoid"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    rope: RopeConfig = field(default_factory=RopeConfig)
    rope_interleave: bool = True
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    num_nextn_predict_layers: int = 0
    fp8_block_size: tuple[int, int] | None = None  # DeepSeek FP8 checkpoints: weight_block_size
    int4_group_size: int | None = None  # compressed-tensors int4 checkpoints
    torch_dtype: str | None = None
    raw: dict = field(default_factory=dict, repr=False)  # the parsed JSON, kept for saving back

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        return self.qk_head_dim ** -0.5 * self.rope.softmax_mscale()

    @property
    def cache_values_per_token(self) -> int:
        """What MLA keeps per token per layer: the normalized KV latent plus the rotary key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (self.n_routed_experts is not None and layer_idx >= self.first_k_dense_replace
                and layer_idx % self.moe_layer_freq == 0)


def _parse_rope(d: dict, max_pos: int) -> RopeConfig:
    # Official DeepSeek configs: rope_theta + rope_scaling{"type": "yarn", ...};
    # transformers 5 writes rope_parameters{"rope_type": ..., "rope_theta": ...}.
    params = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ModelLoadError("config.json", "rope_parameters", "must be an object")
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type not in ("default", "yarn"):
        raise ModelLoadError("config.json", "rope_scaling", f"unsupported rope type {rope_type!r}")
    theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
    rope = RopeConfig(theta=float(theta), type=rope_type)
    if rope.is_yarn:
        orig = params.get("original_max_position_embeddings")
        if orig is None:
            raise ModelLoadError("config.json", "rope_scaling", "yarn needs original_max_position_embeddings")
        factor = params.get("factor")
        rope.original_max_position_embeddings = int(orig)
        rope.factor = float(factor) if factor is not None else max_pos / int(orig)
        rope.beta_fast = float(params.get("beta_fast") or 32)
        rope.beta_slow = float(params.get("beta_slow") or 1)
        rope.mscale = float(params.get("mscale") or 0)
        rope.mscale_all_dim = float(params.get("mscale_all_dim") or 0)
        af = params.get("attention_factor")
        rope.attention_factor = None if af is None else float(af)
        rope.truncate = bool(params.get("truncate", True))
    return rope


def parse_config(d: dict, source: str = "config.json") -> ModelConfig:
    model_type = d.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(source, "model_type",
                             f"unsupported model_type {model_type!r}; expected one of {SUPPORTED_MODEL_TYPES}")
    missing = [k for k in REQUIRED_FIELDS if d.get(k) is None]
    is_moe = d.get("n_routed_experts") is not None
    if is_moe:
        missing += [k for k in REQUIRED_MOE_FIELDS if d.get(k) is None]
    if not is_moe or d.get("first_k_dense_replace", 0) > 0:
        missing += [k for k in ("intermediate_size",) if d.get(k) is None]
    if missing:
        raise ModelLoadError(source, ", ".join(missing), "required field(s) missing from config.json")

    v3 = model_type == "deepseek_v3"
    eos = d.get("eos_token_id")
    cfg = ModelConfig(
        model_type=model_type,
        **{k: int(d[k]) for k in REQUIRED_FIELDS},
        q_lora_rank=d.get("q_lora_rank"),
        intermediate_size=int(d.get("intermediate_size") or 0),
        moe_intermediate_size=int(d.get("moe_intermediate_size") or 0),
        n_routed_experts=d.get("n_routed_experts"),
        n_shared_experts=int(d.get("n_shared_experts") or 0),
        num_experts_per_tok=int(d.get("num_experts_per_tok") or 0),
        first_k_dense_replace=int(d.get("first_k_dense_replace") or 0),
        moe_layer_freq=int(d.get("moe_layer_freq") or 1),
        n_group=int(d.get("n_group") or 1),
        topk_group=int(d.get("topk_group") or 1),
        # transformers 5 writes neither field for V3: its router is sigmoid + noaux_tc.
        topk_method=d.get("topk_method") or ("noaux_tc" if v3 else "greedy"),
        scoring_func=d.get("scoring_func") or ("sigmoid" if v3 else "softmax"),
        norm_topk_prob=bool(d.get("norm_topk_prob", v3)),
        routed_scaling_factor=float(d.get("routed_scaling_factor") or 1.0),
        hidden_act=d.get("hidden_act", "silu"),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
        rope=_parse_rope(d, int(d.get("max_position_embeddings", 4096))),
        rope_interleave=bool(d.get("rope_interleave", True)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        bos_token_id=d.get("bos_token_id"),
        eos_token_ids=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
        num_nextn_predict_layers=int(d.get("num_nextn_predict_layers") or 0),
        torch_dtype=d.get("torch_dtype") or d.get("dtype"),
        raw=d,
    )
    _check_consistency(cfg, d, source)
    return cfg


def _check_consistency(cfg: ModelConfig, d: dict, source: str) -> None:
    if cfg.hidden_act != "silu":
        raise ModelLoadError(source, "hidden_act", f"unsupported activation {cfg.hidden_act!r}")
    if cfg.scoring_func not in ("sigmoid", "softmax"):
        raise ModelLoadError(source, "scoring_func", f"unsupported scoring_func {cfg.scoring_func!r}")
    if cfg.topk_method not in ("noaux_tc", "greedy", "group_limited_greedy"):
        raise ModelLoadError(source, "topk_method", f"unsupported topk_method {cfg.topk_method!r}")
    if cfg.qk_rope_head_dim % 2:
        raise ModelLoadError(source, "qk_rope_head_dim", "must be even")
    if cfg.n_routed_experts is not None:
        if cfg.n_routed_experts % cfg.n_group:
            raise ModelLoadError(source, "n_group", "n_routed_experts must be divisible by n_group")
        if cfg.topk_group > cfg.n_group:
            raise ModelLoadError(source, "topk_group", "topk_group exceeds n_group")
        if cfg.num_experts_per_tok > cfg.n_routed_experts:
            raise ModelLoadError(source, "num_experts_per_tok", "more experts per token than experts")
    q = d.get("quantization_config")
    if q and q.get("quant_method") == "compressed-tensors":
        cfg.int4_group_size = compressed_tensors_group(q, source)
    elif q:
        if q.get("quant_method") != "fp8":
            raise ModelLoadError(source, "quantization_config",
                                 f"unsupported quant_method {q.get('quant_method')!r}")
        if q.get("fmt", "e4m3") != "e4m3":
            raise ModelLoadError(source, "quantization_config", f"unsupported FP8 format {q.get('fmt')!r}")
        cfg.fp8_block_size = tuple(q.get("weight_block_size") or (128, 128))


def compressed_tensors_group(q: dict, source: str) -> int | None:
    """The int4 group size of a compressed-tensors config; only weight-only int8/int4 is read."""
    group = None
    for name, g in (q.get("config_groups") or {}).items():
        w = (g or {}).get("weights") or {}
        if (g or {}).get("input_activations") or w.get("type", "int") != "int" or w.get("num_bits") not in (4, 8) \
                or w.get("dynamic"):
            raise ModelLoadError(source, f"quantization_config.config_groups.{name}",
                                 "only weight-only int8 and int4 compressed-tensors schemes are supported")
        if w.get("num_bits") == 4:
            if w.get("strategy") != "group" or w.get("group_size") not in (32, 64, 128):
                raise ModelLoadError(source, f"quantization_config.config_groups.{name}",
                                     "int4 weights must be group-wise with group_size 32, 64 or 128")
            group = w["group_size"]
    return group


def load_config(model_dir: str | Path) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ModelLoadError(str(path), None, "no config.json in the model folder")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(str(path), None, f"cannot read config.json: {e}") from e
    if not isinstance(d, dict):
        raise ModelLoadError(str(path), None, "config.json is not a JSON object")
    return parse_config(d, str(path))
