"""Checkpoint names ↔ module names, and loading/saving safetensors checkpoints.

The one mapping table between DeepSeek/Hugging Face tensor names and this engine's module names lives
here. Loading is checked in full before any large allocation (every header, shape, dtype and the
memory needed), then tensors are copied one by one from memory-mapped files into a model built on the
meta device, so there are never two full copies of the weights in memory.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine.model.config import ModelConfig, load_config
from engine.model.errors import ModelLoadError
from engine.model.transformer import Transformer
from engine.routing import Router

ProgressFn = Callable[[str, float], None]

TOP_LEVEL = {
    "model.embed_tokens.weight": "embed.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "head.weight",
}
IN_BLOCK = {  # suffix after model.layers.N.
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn.q_proj.weight",
    "self_attn.q_a_proj.weight": "attn.q_down_proj.weight",
    "self_attn.q_a_layernorm.weight": "attn.q_norm.weight",
    "self_attn.q_b_proj.weight": "attn.q_up_proj.weight",
    "self_attn.kv_a_proj_with_mqa.weight": "attn.kv_down_proj.weight",
    "self_attn.kv_a_layernorm.weight": "attn.kv_norm.weight",
    "self_attn.kv_b_proj.weight": "attn.kv_up_proj.weight",
    "self_attn.o_proj.weight": "attn.out_proj.weight",
    "mlp.gate_proj.weight": "ffn.gate_proj.weight",
    "mlp.up_proj.weight": "ffn.up_proj.weight",
    "mlp.down_proj.weight": "ffn.down_proj.weight",
    "mlp.gate.weight": "ffn.router.weight",
    "mlp.gate.e_score_correction_bias": "ffn.router.bias",
    "mlp.shared_experts.gate_proj.weight": "ffn.shared_experts.gate_proj.weight",
    "mlp.shared_experts.up_proj.weight": "ffn.shared_experts.up_proj.weight",
    "mlp.shared_experts.down_proj.weight": "ffn.shared_experts.down_proj.weight",
    "mlp.experts.gate_up_proj": "ffn.experts.gate_up",  # transformers 5 fused layout [E, 2I, H]
    "mlp.experts.down_proj": "ffn.experts.down",  # [E, H, I]
}
IN_MTP = {  # suffix after model.layers.{num_hidden_layers + i}. that belongs to the MTP module itself
    "enorm.weight": "enorm.weight",
    "hnorm.weight": "hnorm.weight",
    "eh_proj.weight": "eh_proj.weight",
    "shared_head.norm.weight": "head_norm.weight",
    "embed_tokens.weight": "embed.weight",
    "shared_head.head.weight": "head.weight",
}
PER_EXPERT = re.compile(r"mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")
LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)$")
IGNORED = re.compile(r".*rotary_emb\.inv_freq$")
OPTIONAL = re.compile(r".*(router\.bias|^head\.weight)$")  # bias defaults to 0; head may be tied
FLOAT_DTYPES = {torch.float32, torch.float16, torch.bfloat16}


@dataclass(frozen=True)
class Target:
    """Where a checkpoint tensor goes: a parameter, or one expert's part of a stacked parameter."""
    param: str
    expert: int | None = None
    part: str | None = None  # "gate" | "up" | "down"


def target_of(name: str, n_layers: int) -> Target | None:
    if name in TOP_LEVEL:
        return Target(TOP_LEVEL[name])
    m = LAYER.match(name)
    if not m:
        return None
    layer, rest = int(m.group(1)), m.group(2)
    prefix = f"layers.{layer}." if layer < n_layers else f"mtp.{layer - n_layers}."
    if layer >= n_layers and rest in IN_MTP:
        return Target(prefix + IN_MTP[rest])
    if layer >= n_layers:
        prefix += "block."
    if rest in IN_BLOCK:
        return Target(prefix + IN_BLOCK[rest])
    e = PER_EXPERT.search(rest)
    if e and rest.startswith("mlp.experts."):
        param = "ffn.experts.down" if e.group(2) == "down" else "ffn.experts.gate_up"
        return Target(prefix + param, int(e.group(1)), e.group(2))
    return None


def target_view(param: torch.Tensor, t: Target) -> torch.Tensor:
    """The part of `param` that target `t` fills."""
    if t.expert is None:
        return param
    inter = param.shape[1] // 2
    if t.part == "gate":
        return param[t.expert, :inter]
    if t.part == "up":
        return param[t.expert, inter:]
    return param[t.expert]


def checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ModelLoadError(str(index), None, f"unreadable index: {e}") from e
        files = [model_dir / f for f in dict.fromkeys(weight_map.values())]
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(str(model_dir), None, "no .safetensors weights in the model folder")
    for f in files:
        if not f.is_file():
            raise ModelLoadError(str(f), None, "weight shard listed in the index is missing")
    return files


@dataclass
class TensorInfo:
    file: Path
    shape: tuple
    dtype: torch.dtype


def scan_headers(files: list[Path]) -> dict[str, TensorInfo]:
    """Read every header (no tensor data) and say which file holds which tensor."""
    infos: dict[str, TensorInfo] = {}
    for f in files:
        try:
            with safe_open(f, framework="pt") as st:
                for name in st.keys():
                    sl = st.get_slice(name)
                    infos[name] = TensorInfo(f, tuple(sl.get_shape()), _dtype_of(sl.get_dtype(), f, name))
        except ModelLoadError:
            raise
        except Exception as e:  # safetensors raises its own error types for corrupt/truncated files
            raise ModelLoadError(str(f), None, f"not a valid safetensors file ({e})") from e
    return infos


def _dtype_of(code: str, f: Path, name: str) -> torch.dtype:
    table = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "F8_E4M3": torch.float8_e4m3fn, "I8": torch.int8, "U8": torch.uint8, "I32": torch.int32,
             "I64": torch.int64, "F64": torch.float64}
    if code not in table:
        raise ModelLoadError(str(f), name, f"unsupported dtype {code}")
    return table[code]


def plan_load(cfg: ModelConfig, infos: dict[str, TensorInfo], model: Transformer) -> dict[str, Target]:
    """Map every checkpoint tensor to its place and check shapes, dtypes and coverage."""
    params = dict(model.named_parameters()) | dict(model.named_buffers())
    plan, covered = {}, set()
    for name, info in infos.items():
        if name.endswith("weight_scale_inv") or IGNORED.match(name):
            continue
        t = target_of(name, cfg.num_hidden_layers)
        if t is None or t.param not in params:
            raise ModelLoadError(str(info.file), name, "unexpected tensor for this config")
        want = tuple(target_view(params[t.param], t).shape)
        if info.shape != want:
            raise ModelLoadError(str(info.file), name, f"shape {list(info.shape)} but the config implies {list(want)}")
        if info.dtype == torch.float8_e4m3fn:
            _check_fp8_scale(cfg, infos, name, info)
        elif info.dtype not in FLOAT_DTYPES:
            raise ModelLoadError(str(info.file), name, f"dtype {info.dtype} where a float tensor is expected")
        plan[name] = t
        covered.add((t.param, t.expert, t.part))
    for pname, p in params.items():
        if pname.startswith("rotary.") or OPTIONAL.match(pname) or (pname, None, None) in covered:
            continue
        if pname.endswith("experts.gate_up") or pname.endswith("experts.down"):
            parts = ("gate", "up") if pname.endswith("gate_up") else ("down",)
            if all((pname, e, part) in covered for e in range(p.shape[0]) for part in parts):
                continue
        raise ModelLoadError(str(next(iter(infos.values())).file.parent), pname, "missing from the checkpoint")
    return plan


def _check_fp8_scale(cfg: ModelConfig, infos, name: str, info: TensorInfo) -> None:
    scale = infos.get(name + "_scale_inv") or infos.get(name.removesuffix("weight") + "weight_scale_inv")
    if scale is None:
        raise ModelLoadError(str(info.file), name, "FP8 weight without weight_scale_inv")
    bo, bi = cfg.fp8_block_size or (128, 128)
    want = (-(-info.shape[0] // bo), -(-info.shape[1] // bi))
    if scale.shape != want:
        raise ModelLoadError(str(scale.file), name + "_scale_inv", f"scale shape {list(scale.shape)}, expected {list(want)}")


def dequantize_fp8(w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """DeepSeek FP8: each (bo × bi) block of w times its fp32 scale; edge blocks were zero-padded."""
    out, inp = w.shape
    s = scale_inv.float().repeat_interleave(block[0], 0)[:out].repeat_interleave(block[1], 1)[:, :inp]
    return w.float() * s


def available_memory(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def pick_device(device: str | None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype:
        table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                 "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
        if dtype not in table:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(table)}")
        return table[dtype]
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def build_empty(cfg: ModelConfig, n_mtp: int, own_mtp: set[str], dtype: torch.dtype) -> Transformer:
    """The network on the meta device: shapes and dtypes, no memory."""
    with torch.device("meta"):
        model = Transformer(cfg, n_mtp)
        for i, m in enumerate(model.mtp):
            if f"mtp.{i}.embed.weight" in own_mtp:
                m.embed = torch.nn.Embedding(cfg.vocab_size, cfg.hidden_size)
            if f"mtp.{i}.head.weight" in own_mtp:
                m.head = torch.nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
    model.to(dtype)
    for m in model.modules():
        if isinstance(m, Router):
            m.float()  # routing stays fp32
    return model


def load_model(model_dir: str | Path, device: str | None = None, dtype=None,
               progress: ProgressFn | None = None) -> Transformer:
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelLoadError(str(model_dir), None, "model folder not found")
    cfg = load_config(model_dir)
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    infos = scan_headers(checkpoint_files(model_dir))
    mtp_layers = {int(m.group(1)) for n in infos if (m := LAYER.match(n)) and int(m.group(1)) >= cfg.num_hidden_layers}
    n_mtp = len(mtp_layers)
    if mtp_layers != set(range(cfg.num_hidden_layers, cfg.num_hidden_layers + n_mtp)):
        raise ModelLoadError(str(model_dir), None, f"MTP layers {sorted(mtp_layers)} are not consecutive after the main layers")
    own = {t.param for n in infos if (t := target_of(n, cfg.num_hidden_layers)) and t.param.startswith("mtp.")}
    model = build_empty(cfg, n_mtp, own, dt)
    plan = plan_load(cfg, infos, model)
    _check_memory(model, dev, model_dir)
    model.to_empty(device=dev).requires_grad_(False)
    for m in model.modules():
        if isinstance(m, Router):
            m.bias.zero_()  # a checkpoint without score-correction bias routes without one
    _copy_tensors(model, cfg, infos, plan, progress)
    if "lm_head.weight" not in infos:
        if not cfg.tie_word_embeddings:
            raise ModelLoadError(str(model_dir), "lm_head.weight", "missing and tie_word_embeddings is false")
        model.head.weight = model.embed.weight
    _share_mtp_copies(model)
    model.reset_rotary()
    return model.eval().requires_grad_(False)


def _check_memory(model: Transformer, dev: torch.device, model_dir: Path) -> None:
    need = sum(p.numel() * p.element_size() for p in model.parameters())
    have = available_memory(dev)
    if have is not None and need > have:
        raise ModelLoadError(str(model_dir), None,
                             f"needs {need / 2**30:.1f} GiB for its weights on {dev.type}, "
                             f"only {have / 2**30:.1f} GiB available")


def _copy_tensors(model, cfg, infos, plan, progress: ProgressFn | None) -> None:
    params = dict(model.named_parameters()) | dict(model.named_buffers())
    total = sum(_numel(infos[n].shape) for n in plan) or 1
    done = 0
    by_file: dict[Path, list[str]] = {}
    for name in plan:
        by_file.setdefault(infos[name].file, []).append(name)
    for f, names in by_file.items():
        with safe_open(f, framework="pt") as st:
            for name in names:
                try:
                    t = st.get_tensor(name)
                    if t.dtype == torch.float8_e4m3fn:
                        scale_name = name + "_scale_inv"
                        scale = st.get_tensor(scale_name) if scale_name in infos and infos[scale_name].file == f \
                            else _read(infos, scale_name)
                        t = dequantize_fp8(t, scale, cfg.fp8_block_size or (128, 128))
                except Exception as e:
                    raise ModelLoadError(str(f), name, f"cannot read tensor ({e})") from e
                if not torch.isfinite(t).all():
                    raise ModelLoadError(str(f), name, "contains NaN or Inf")
                target_view(params[plan[name].param], plan[name]).copy_(t)
                done += t.numel()
                if progress:
                    progress("loading weights", done / total)


def _read(infos, name: str) -> torch.Tensor:
    with safe_open(infos[name].file, framework="pt") as st:
        return st.get_tensor(name)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _share_mtp_copies(model: Transformer) -> None:
    """DeepSeek checkpoints repeat the embedding and head in the MTP layer; keep one copy when equal."""
    for m in model.mtp:
        if m.embed is not None and torch.equal(m.embed.weight, model.embed.weight):
            m.embed = None
        if m.head is not None and torch.equal(m.head.weight, model.head.weight):
            m.head = None


def checkpoint_state(model: Transformer) -> dict[str, torch.Tensor]:
    """The model's tensors under official DeepSeek names (per-expert tensors, MTP as extra layers)."""
    reverse = {v: k for k, v in TOP_LEVEL.items()}
    block_rev = {v: k for k, v in IN_BLOCK.items()}
    mtp_rev = {v: k for k, v in IN_MTP.items()}
    n_layers, out = model.cfg.num_hidden_layers, {}
    state = model.state_dict()
    if model.cfg.tie_word_embeddings:
        state.pop("head.weight", None)
    for name, t in state.items():
        if name in reverse:
            out[reverse[name]] = t
            continue
        m = re.match(r"(layers|mtp)\.(\d+)\.(.+)$", name)
        if not m:
            continue  # rotary frequencies are derived, not stored
        kind, i, rest = m.group(1), int(m.group(2)), m.group(3)
        layer = i if kind == "layers" else n_layers + i
        prefix = f"model.layers.{layer}."
        if kind == "mtp" and rest in mtp_rev:
            out[prefix + mtp_rev[rest]] = t
            continue
        rest = rest.removeprefix("block.")
        if rest == "ffn.experts.gate_up":
            inter = t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{prefix}mlp.experts.{e}.gate_proj.weight"] = t[e, :inter]
                out[f"{prefix}mlp.experts.{e}.up_proj.weight"] = t[e, inter:]
        elif rest == "ffn.experts.down":
            for e in range(t.shape[0]):
                out[f"{prefix}mlp.experts.{e}.down_proj.weight"] = t[e]
        else:
            out[prefix + block_rev[rest]] = t
    return {k: v.detach().contiguous().cpu() for k, v in out.items()}


def save_model(model: Transformer, out_dir: str | Path, dtype: torch.dtype | None = None) -> None:
    """Write config.json + model.safetensors in the layout load_model (and transformers) reads."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = checkpoint_state(model)
    if dtype is not None:
        state = {k: (v if k.endswith("e_score_correction_bias") or ".mlp.gate." in k else v.to(dtype))
                 for k, v in state.items()}
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    cfg = dict(model.cfg.raw)
    cfg["num_nextn_predict_layers"] = len(model.mtp)
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
