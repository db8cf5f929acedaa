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
from engine.quant import (STORED_PARTS, QuantEmbedding, QuantExperts, QuantLinear, QuantSpec, from_stored, to_stored,
                          logical_weights, plan_quantization, quantization_config, split_stored_name, stored_shape, swap_modules,
                          use_kernel_layout)
from engine.routing import Router
from engine.model.linear import Linear, mark_bf16_valued

QUANT_MODULES = (QuantLinear, QuantExperts, QuantEmbedding)

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
TOP_LEVEL_REV, IN_BLOCK_REV, IN_MTP_REV = ({v: k for k, v in t.items()} for t in (TOP_LEVEL, IN_BLOCK, IN_MTP))
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


@dataclass(frozen=True)
class Entry:
    """One checkpoint tensor's place: `kind` is "dense" (copied as is), "quantize" (a full-precision
    tensor quantized on its way into a quantized module) or a stored quantized part: "qweight",
    "scale", "zero", "shape" (checked only)."""
    target: Target
    kind: str


def dense_and_logical(model: Transformer) -> dict[str, torch.Tensor]:
    """Every tensor a checkpoint can fill, quantized weights under their full-precision names."""
    quant_paths = {p for p, m in model.named_modules() if isinstance(m, QUANT_MODULES)}
    params = {n: t for n, t in (dict(model.named_parameters()) | dict(model.named_buffers())).items()
              if n.rsplit(".", 1)[0] not in quant_paths}
    return params | logical_weights(model)


def plan_load(cfg: ModelConfig, infos: dict[str, TensorInfo], model: Transformer) -> dict[str, Entry]:
    """Map every checkpoint tensor to its place and check shapes, dtypes and coverage."""
    params = dense_and_logical(model)
    modules = dict(model.named_modules())
    plan, covered, stored = {}, set(), {}
    for name, info in infos.items():
        if IGNORED.match(name):
            continue
        base, suffix = split_stored_name(name)
        t = target_of(base, cfg.num_hidden_layers)
        if t is None or t.param not in params:
            raise ModelLoadError(str(info.file), name, "unexpected tensor for this config")
        want = tuple(target_view(params[t.param], t).shape)
        module = modules.get(t.param.rsplit(".", 1)[0])
        spec = module.spec if isinstance(module, QUANT_MODULES) else None
        if spec is None or (suffix == "weight" and info.dtype in FLOAT_DTYPES):
            if suffix == "weight_scale_inv":
                continue  # read together with its FP8 weight
            if suffix != "weight":
                raise ModelLoadError(str(info.file), name, "a quantized part of a weight this model keeps dense")
            _check_dense(cfg, infos, name, info, want)
            plan[name] = Entry(t, "dense" if spec is None else "quantize")
        elif suffix == "weight" and info.dtype == torch.float8_e4m3fn and spec.fmt != "fp8":
            _check_dense(cfg, infos, name, info, want)
            plan[name] = Entry(t, "quantize")  # FP8 source, another target format: dequantize first
        else:
            part = STORED_PARTS[spec.fmt].get(suffix)
            shape = stored_shape(spec.fmt, suffix, *want, spec.group, spec.block) if part else None
            if part is None or info.shape != shape:
                raise ModelLoadError(str(info.file), name, f"shape {list(info.shape)} does not fit a {spec.describe()} "
                                     f"weight of shape {list(want)} (expected {shape and list(shape)})")
            plan[name] = Entry(t, part)
            stored.setdefault((t.param, t.expert, t.part), set()).add(part)
        covered.add((t.param, t.expert, t.part))
    for key, parts in stored.items():
        fmt = modules[key[0].rsplit(".", 1)[0]].spec.fmt
        need = {"qweight", "scale"} | ({"zero"} if "zero" in STORED_PARTS[fmt].values() else set())
        if not need <= parts:
            raise ModelLoadError(str(next(iter(infos.values())).file.parent), key[0],
                                 f"quantized weight without its {', '.join(sorted(need - parts))}")
    for pname, p in params.items():
        if pname.startswith("rotary.") or OPTIONAL.match(pname) or (pname, None, None) in covered:
            continue
        if pname.endswith("experts.gate_up") or pname.endswith("experts.down"):
            parts = ("gate", "up") if pname.endswith("gate_up") else ("down",)
            if all((pname, e, part) in covered for e in range(p.shape[0]) for part in parts):
                continue
        raise ModelLoadError(str(next(iter(infos.values())).file.parent), pname, "missing from the checkpoint")
    return plan


def _check_dense(cfg, infos, name: str, info: TensorInfo, want: tuple) -> None:
    if info.shape != want:
        raise ModelLoadError(str(info.file), name, f"shape {list(info.shape)} but the config implies {list(want)}")
    if info.dtype == torch.float8_e4m3fn:
        _check_fp8_scale(cfg, infos, name, info)
    elif info.dtype not in FLOAT_DTYPES:
        raise ModelLoadError(str(info.file), name, f"dtype {info.dtype} where a float tensor is expected")


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
                m.head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
    model.to(dtype)
    for m in model.modules():
        if isinstance(m, Router):
            m.float()  # routing stays fp32
    return model


def load_model(model_dir: str | Path, device: str | None = None, dtype=None,
               progress: ProgressFn | None = None, quant: QuantSpec | None = None) -> Transformer:
    """Load a checkpoint folder. `quant` quantizes full-precision weights tensor by tensor as they
    are read (never holding the full-precision model); a quantized checkpoint loads as stored."""
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
    own = {t.param for n in infos if (t := target_of(split_stored_name(n)[0], cfg.num_hidden_layers))
           and t.param.startswith("mtp.")}
    model = build_empty(cfg, n_mtp, own, dt)
    stored = stored_specs(cfg, infos, model, dev, keep_fp8=quant is None)
    if quant is not None and any(s.fmt != "fp8" for s in stored.values()):
        raise ModelLoadError(str(model_dir), None, "this checkpoint is already quantized; load it without --quant")
    swap_modules(model, plan_quantization(model, quant) if quant is not None else stored)
    plan = plan_load(cfg, infos, model)
    _check_memory(model, dev, model_dir)
    model.to_empty(device=dev).requires_grad_(False)
    for m in model.modules():
        if isinstance(m, Router):
            m.bias.zero_()  # a checkpoint without score-correction bias routes without one
    _copy_tensors(model, cfg, infos, plan, progress)
    if "lm_head.weight" not in infos and not any(n.startswith("lm_head.") for n in infos):
        if not cfg.tie_word_embeddings:
            raise ModelLoadError(str(model_dir), "lm_head.weight", "missing and tie_word_embeddings is false")
        model.head.weight = model.embed.weight
    _share_mtp_copies(model)
    use_kernel_layout(model)
    model.reset_rotary()
    return model.eval().requires_grad_(False)


def stored_specs(cfg: ModelConfig, infos: dict[str, TensorInfo], model: Transformer, dev: torch.device,
                 keep_fp8: bool) -> dict[str, QuantSpec]:
    """Module path → spec for every weight the checkpoint stores quantized and this device keeps so:
    compressed-tensors int4 (`weight_packed`) and int8 (int8 `weight` with `weight_scale`), and
    DeepSeek FP8 on a GPU with FP8 support and the Triton kernels (elsewhere it is dequantized)."""
    fp8_ok = keep_fp8 and fp8_supported(dev)
    modules = dict(model.named_modules())
    specs = {}
    for name, info in infos.items():
        base, suffix = split_stored_name(name)
        if suffix == "weight_packed":
            spec = QuantSpec("int4", cfg.int4_group_size or 64)
        elif suffix == "weight" and info.dtype == torch.int8 and base[:-len("weight")] + "weight_scale" in infos:
            spec = QuantSpec("int8")
        elif suffix == "weight" and info.dtype == torch.float8_e4m3fn and fp8_ok:
            spec = QuantSpec("fp8", block=cfg.fp8_block_size or (128, 128))
        else:
            continue
        t = target_of(base, cfg.num_hidden_layers)
        if t is None:
            continue  # plan_load reports it
        path = t.param.rsplit(".", 1)[0]
        module = modules.get(path)
        if spec.fmt == "fp8" and (isinstance(module, torch.nn.Embedding) or
                                  (t.expert is not None and module.gate_up.shape[1] // 2 % spec.block[0])):
            continue  # FP8 blocks that would straddle gate and up: dequantize this one instead
        specs[path] = spec
    return specs


def fp8_supported(dev: torch.device) -> bool:
    from kernels import triton_available
    return dev.type == "cuda" and torch.cuda.get_device_capability(dev) >= (8, 9) and triton_available()


def _check_memory(model: Transformer, dev: torch.device, model_dir: Path) -> None:
    need = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    have = available_memory(dev)
    if have is not None and need > have:
        raise ModelLoadError(str(model_dir), None,
                             f"needs {need / 2**30:.1f} GiB for its weights on {dev.type}, "
                             f"only {have / 2**30:.1f} GiB available")


def _copy_tensors(model, cfg, infos, plan: dict[str, Entry], progress: ProgressFn | None) -> None:
    params = dense_and_logical(model)
    modules = dict(model.named_modules())
    total = sum(_numel(infos[n].shape) for n in plan) or 1
    done = 0
    from_bf16: dict[str, bool] = {}  # dense parameter → every part of it was read from bf16
    by_file: dict[Path, list[str]] = {}
    for name in plan:
        by_file.setdefault(infos[name].file, []).append(name)
    for f, names in by_file.items():
        with safe_open(f, framework="pt") as st:
            for name in names:
                entry = plan[name]
                try:
                    t = st.get_tensor(name)
                    if t.dtype == torch.float8_e4m3fn and entry.kind in ("dense", "quantize"):
                        scale_name = name + "_scale_inv"
                        scale = st.get_tensor(scale_name) if scale_name in infos and infos[scale_name].file == f \
                            else _read(infos, scale_name)
                        t = dequantize_fp8(t, scale, cfg.fp8_block_size or (128, 128))
                except Exception as e:
                    raise ModelLoadError(str(f), name, f"cannot read tensor ({e})") from e
                if t.is_floating_point() and t.dtype != torch.float8_e4m3fn and not torch.isfinite(t).all():
                    raise ModelLoadError(str(f), name, "contains NaN or Inf")
                view = target_view(params[entry.target.param], entry.target)
                if entry.kind == "dense":
                    view.copy_(t)
                    param = entry.target.param
                    from_bf16[param] = from_bf16.get(param, True) and t.dtype == torch.bfloat16
                else:
                    _into_quantized(modules[entry.target.param.rsplit(".", 1)[0]], entry, t, tuple(view.shape), f, name)
                done += t.numel()
                if progress:
                    progress("loading weights", done / total)
    for param, exact in from_bf16.items():
        if exact:
            mark_bf16_valued(params[param])


def _into_quantized(module, entry: Entry, t: torch.Tensor, shape: tuple, f: Path, name: str) -> None:
    """A checkpoint tensor into a quantized module: quantized now, or a stored part converted."""
    target, kind = entry.target, entry.kind
    if kind == "shape":
        if [int(v) for v in t.tolist()] != list(shape):
            raise ModelLoadError(str(f), name, f"weight_shape {t.tolist()} but the config implies {list(shape)}")
        return
    if isinstance(module, QuantExperts):
        attr = target.param.rsplit(".", 1)[1]
        inter = module.inter
        rows = {"gate": slice(0, inter), "up": slice(inter, 2 * inter)}.get(target.part, slice(None))
        if kind == "quantize":
            module.set_expert(attr, target.expert, rows, t)
            return
        module.set_expert_part(attr, target.expert, rows, kind, from_stored(module.spec.fmt, kind, t, *shape))
        return
    if kind == "quantize":
        module.set_weight(t)
        return
    getattr(module, kind).copy_(from_stored(module.spec.fmt, kind, t, *shape))
    if isinstance(module, QuantLinear):
        module._cpu = None


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
        if m.embed is not None and _same_weights(m.embed, model.embed):
            m.embed = None
        if m.head is not None and _same_weights(m.head, model.head):
            m.head = None


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return type(a) is type(b) and sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def official_name(param: str, n_layers: int) -> str | None:
    """Engine parameter name → DeepSeek checkpoint name (experts: the stacked name, see split_experts)."""
    if param in TOP_LEVEL_REV:
        return TOP_LEVEL_REV[param]
    m = re.match(r"(layers|mtp)\.(\d+)\.(.+)$", param)
    if not m:
        return None  # rotary frequencies are derived, not stored
    kind, i, rest = m.group(1), int(m.group(2)), m.group(3)
    prefix = f"model.layers.{i if kind == 'layers' else n_layers + i}."
    if kind == "mtp" and rest in IN_MTP_REV:
        return prefix + IN_MTP_REV[rest]
    return prefix + IN_BLOCK_REV[rest.removeprefix("block.")]


def split_experts(name: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
    """A stacked experts tensor (official name ….mlp.experts.gate_up_proj / down_proj) → per-expert
    DeepSeek names; gate and up are the two halves of the rows (or of the row blocks)."""
    prefix = name.removesuffix("gate_up_proj").removesuffix("down_proj")
    out = {}
    for e in range(t.shape[0]):
        if name.endswith("gate_up_proj"):
            half = t.shape[1] // 2
            out[f"{prefix}{e}.gate_proj.weight"] = t[e, :half]
            out[f"{prefix}{e}.up_proj.weight"] = t[e, half:]
        else:
            out[f"{prefix}{e}.down_proj.weight"] = t[e]
    return out


def checkpoint_state(model: Transformer) -> dict[str, torch.Tensor]:
    """The model's tensors under official DeepSeek names (per-expert tensors, MTP as extra layers);
    quantized weights in compressed-tensors form (engine/quant.py)."""
    n_layers, out = model.cfg.num_hidden_layers, {}
    state = model.state_dict()
    if model.cfg.tie_word_embeddings:
        state.pop("head.weight", None)
    modules = dict(model.named_modules())
    for name, t in state.items():
        path, _, leaf = name.rpartition(".")
        module = modules.get(path)
        if isinstance(module, QUANT_MODULES):
            attr, _, part = leaf.rpartition("_") if isinstance(module, QuantExperts) else ("weight", "", leaf)
            fmt = module.spec.fmt
            official = official_name(f"{path}.{attr}", n_layers)
            matrices = split_experts(official, t) if isinstance(module, QuantExperts) else {official: t}
            for weight_name, m in matrices.items():
                out.update(stored_tensors(fmt, weight_name, part, m, module))
            continue
        official = official_name(name, n_layers)
        if official is None:
            continue
        if official.endswith("mlp.experts.gate_up_proj") or official.endswith("mlp.experts.down_proj"):
            out.update(split_experts(official, t))
        else:
            out[official] = t
    return {k: v.detach().contiguous().cpu() for k, v in out.items()}


def stored_tensors(fmt: str, weight_name: str, part: str, t: torch.Tensor, module) -> dict[str, torch.Tensor]:
    """One quantized matrix's part under its compressed-tensors (or DeepSeek FP8) name."""
    suffix = {v: k for k, v in STORED_PARTS[fmt].items()}[part]
    out = {weight_name.removesuffix("weight") + suffix: to_stored(fmt, part, t)}
    if fmt == "int4" and part == "qweight":
        out[weight_name.removesuffix("weight") + "weight_shape"] = torch.tensor([t.shape[0], t.shape[1] * 2])
    return out


def save_model(model: Transformer, out_dir: str | Path, dtype: torch.dtype | None = None) -> None:
    """Write config.json + model.safetensors in the layout load_model (and transformers) reads."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = checkpoint_state(model)
    if dtype is not None:  # routing and quantization scales stay as they are
        keep = re.compile(r".*(e_score_correction_bias|\.mlp\.gate\.weight|weight_scale|weight_scale_inv)$")
        state = {k: (v.to(dtype) if v.dtype in FLOAT_DTYPES and not keep.match(k) else v) for k, v in state.items()}
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    cfg = dict(model.cfg.raw)
    cfg["num_nextn_predict_layers"] = len(model.mtp)
    cfg.pop("quantization_config", None)
    if (qc := quantization_config(model)) is not None:
        cfg["quantization_config"] = qc
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
