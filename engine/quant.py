"""Weight-only quantization of a loaded (or loading) model: which layers, the modules that hold the
quantized weights, and how each device multiplies by them.

Quantized: attention projections (except kv_up_proj), dense MLPs, shared and routed experts, the MTP
modules' projections; optionally the embedding and head (int8). Kept in full precision: norms, the
router's gate and score-correction bias (routing decisions are cheap and sensitive), and kv_up_proj,
whose weight the absorbed MLA attention multiplies through directly (under 3% of a V3 layer's weights).

Products: on CUDA the Triton kernels (kernels/); on the CPU torch's own weight-only kernels
(`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`), which want bf16 activations: for a decode row
about 9× faster than fp32 F.linear and 4× than bf16 (docs/quantization.md). A shape they cannot take
gets a bf16 copy of that one layer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels import cpu, use_triton
from kernels.formats import (INT4_GROUPS, QWeight, dequantize, group_blocks, group_rows, int4_blocks, int4_rows,
                             quantize_fp8, quantize_int4, quantize_int8)
from engine.model.linear import by_kernel_rows, decode_shaped, kernel_ready, read_bytes
from engine.model.moe import Experts

KEEP_DENSE = ("kv_up_proj", "router")  # module names never quantized (see the module docstring)


@dataclass(frozen=True)
class QuantSpec:
    """What to quantize and how: fmt int8 | int4 | fp8, the int4 group, and the embedding/head."""
    fmt: str
    group: int = 64
    embed_head: bool = False
    block: tuple[int, int] = (128, 128)

    def __post_init__(self):
        if self.fmt not in ("int8", "int4", "fp8"):
            raise ValueError(f"unknown quantization {self.fmt!r}; choose int8 or int4")
        if self.fmt == "int4" and self.group not in INT4_GROUPS:
            raise ValueError(f"int4 group size must be one of {INT4_GROUPS}, got {self.group}")

    def quantize(self, w: torch.Tensor) -> QWeight:
        if self.fmt == "int8":
            return quantize_int8(w)
        if self.fmt == "int4":
            return quantize_int4(w, self.group)
        return quantize_fp8(w, self.block)

    def describe(self) -> str:
        return f"int4 (group {self.group})" if self.fmt == "int4" else self.fmt


def _empty_qweight(spec: QuantSpec, lead: tuple, N: int, K: int, device) -> QWeight:
    """Buffers of the right shape and dtype (device may be meta) for a [*lead, N, K] weight."""
    kw = {"device": device}
    if spec.fmt == "int8":
        return QWeight("int8", torch.empty(*lead, N, K, dtype=torch.int8, **kw),
                       torch.empty(*lead, N, dtype=torch.float32, **kw))
    if spec.fmt == "int4":
        G = -(-K // spec.group)
        return QWeight("int4", torch.empty(*lead, N, K // 2, dtype=torch.uint8, **kw),
                       torch.empty(*lead, N, G, dtype=torch.float32, **kw),
                       torch.empty(*lead, N, G, dtype=torch.uint8, **kw), spec.group)
    bn, bk = spec.block
    return QWeight("fp8", torch.empty(*lead, N, K, dtype=torch.float8_e4m3fn, **kw),
                   torch.empty(*lead, -(-N // bn), -(-K // bk), dtype=torch.float32, **kw), block=spec.block)


class QuantLinear(torch.nn.Module):
    """nn.Linear (no bias) with its weight quantized; buffers qweight / scale / zero (kernels/formats.py)."""
    INT4_BUFFERS = ("qweight", "scale", "zero")  # what reorder_int4 moves between layouts

    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, device=None):
        super().__init__()
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        qw = _empty_qweight(spec, (), out_features, in_features, device)
        self.register_buffer("qweight", qw.qweight)
        self.register_buffer("scale", qw.scale)
        self.register_buffer("zero", qw.zero)
        self._cpu: tuple | None = None  # the CPU kernel's own packing, made on first use
        self.layout = "rows"  # int4: "blocks16" where moedesk's CPU kernel reads it (use_kernel_layout)
        int4_layout_hooks(self)

    @property
    def qw(self) -> QWeight:
        return QWeight(self.spec.fmt, self.qweight, self.scale, self.zero, self.spec.group, self.spec.block,
                       self.layout)

    def use_layout(self, layout: str) -> None:
        reorder_int4(self, layout)

    def set_weight(self, w: torch.Tensor) -> None:
        """Quantize a full-precision [N, K] weight into this module's buffers."""
        q = self.spec.quantize(w.to(self.qweight.device))
        self.set_qweight(q)

    def set_qweight(self, q: QWeight) -> None:
        self.use_layout("rows")
        for name in ("qweight", "scale", "zero"):
            src = getattr(q, name)
            if src is not None:
                getattr(self, name).copy_(src)
        self._cpu = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_triton(x) and x.numel() // x.shape[-1] <= 8:
            from kernels.quant_matmul import quant_matmul
            return quant_matmul(x, self.qw.rows())  # row order off the CPU (a no-op unless moved there)
        if x.is_cuda:  # prefill: one transient dequantized copy of this layer beats a slow product
            return F.linear(x, dequantize(self.qw, x.dtype))
        if self.spec.fmt in ("int8", "int4") and kernel_ready(x) and self.qw.shape[-1] == x.shape[-1]:
            return kernel_product(self.qw, x)
        if self._cpu is None:
            self._cpu = cpu_pack(self.qw)
        return cpu_product(self._cpu, x)


def kernel_product(qw: QWeight, x: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ Wᵀ for an int8 or int4 weight through moedesk's kernel, 16 rows a call, the weight as
    stored: decode and prefill alike. int4 prefill took torch's int4 kernel, whose packed copy of every
    int4 weight, made at the first prompt, doubled an int4 model's memory and delayed that prompt's first
    token by the packing (V2-Lite-shaped, 4 layers: +400 MiB and 1.1 s); int8 prefill took torch's int8
    kernel, slower than this one (docs/quantization.md)."""
    fmt = cpu.quant_format(qw.fmt, qw.layout)
    zero = cpu.empty() if qw.zero is None else qw.zero
    return by_kernel_rows(lambda rows: torch.ops.moedesk.linear(rows, qw.qweight, qw.scale, zero, fmt, qw.group),
                          x).to(x.dtype)


def cpu_product(packed_weight: tuple, x: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ Wᵀ through torch's CPU weight-only kernels (bf16 activations)."""
    kind, *packed = packed_weight
    xb = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
    if kind == "int8":
        y = torch.ops.aten._weight_int8pack_mm(xb, *packed)
    elif kind == "int4":
        w, group, scales_zeros = packed
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, w, group, scales_zeros)
    else:  # a shape the kernels do not take: a bf16 copy made once
        y = F.linear(xb, packed[0])
    return y.to(x.dtype).view(*x.shape[:-1], -1)


def cpu_pack(qw: QWeight) -> tuple:
    """The layouts torch's CPU kernels read: int8 as is with bf16 scales; int4 re-packed with
    scales and zeros folded into w = (q − 8)·s + z; otherwise a dequantized bf16 copy."""
    qw = qw.rows()
    N, K = qw.shape
    if qw.fmt == "int8":
        return "int8", qw.qweight, qw.scale.to(torch.bfloat16)
    if qw.fmt == "int4":
        group = math.gcd(qw.group, K)
        if N % 16 == 0 and group in (32, 64, 128, 256):
            from kernels.formats import unpack_int4
            reps = qw.group // group  # a group that does not divide K splits into sub-groups of one scale
            scale = qw.scale.repeat_interleave(reps, dim=1)[:, :K // group]
            zero = qw.zero.float().repeat_interleave(reps, dim=1)[:, :K // group]
            q = unpack_int4(qw.qweight).to(torch.int32)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
            zeros = (8 - zero) * scale  # (q − zero)·s = (q − 8)·s + (8 − zero)·s
            scales_zeros = torch.stack([scale, zeros], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
            return "int4", packed, group, scales_zeros
    return "dense", dequantize(qw, torch.bfloat16)


class QuantExperts(Experts):
    """The routed experts with quantized stacked weights: gate_up [E, 2I, H] and down [E, H, I]."""
    INT4_BUFFERS = tuple(f"{w}_{part}" for w in ("gate_up", "down") for part in QuantLinear.INT4_BUFFERS)

    def __init__(self, n_experts: int, hidden: int, inter: int, spec: QuantSpec, device=None):
        torch.nn.Module.__init__(self)
        self.inter, self.spec = inter, spec
        for name, (N, K) in {"gate_up": (2 * inter, hidden), "down": (hidden, inter)}.items():
            qw = _empty_qweight(spec, (n_experts,), N, K, device)
            self.register_buffer(f"{name}_qweight", qw.qweight)
            self.register_buffer(f"{name}_scale", qw.scale)
            self.register_buffer(f"{name}_zero", qw.zero)
        self._cpu: list | None = None
        self.layout = "rows"  # int4: "blocks16" where moedesk's CPU kernel reads it (use_kernel_layout)
        int4_layout_hooks(self)

    def stacked(self, name: str) -> QWeight:
        return QWeight(self.spec.fmt, getattr(self, f"{name}_qweight"), getattr(self, f"{name}_scale"),
                       getattr(self, f"{name}_zero"), self.spec.group, self.spec.block, self.layout)

    def use_layout(self, layout: str) -> None:
        reorder_int4(self, layout)

    @property
    def n_experts(self) -> int:
        return self.gate_up_qweight.shape[0]

    def kernel_weights(self):
        return self.stacked("gate_up"), self.stacked("down")

    def set_expert(self, name: str, e: int, rows: slice, w: torch.Tensor) -> None:
        """Quantize one expert's rows of `name` (gate rows, up rows, or all of down): every format is
        per row or per block of rows, so quantizing the parts apart equals quantizing the whole."""
        q = self.spec.quantize(w.to(self.gate_up_qweight.device))
        self.set_expert_q(name, e, rows, q)

    def set_expert_q(self, name: str, e: int, rows: slice, q: QWeight) -> None:
        for part in ("qweight", "scale", "zero"):
            if getattr(q, part) is not None:
                self.set_expert_part(name, e, rows, part, getattr(q, part))

    def set_expert_part(self, name: str, e: int, rows: slice, part: str, t: torch.Tensor) -> None:
        """rows: the expert's weight rows that `t` covers (gate or up half of gate_up, or all)."""
        self.use_layout("rows")
        if self.spec.fmt == "fp8" and part == "scale" and rows.stop is not None:
            bn = self.spec.block[0]  # one scale per block of rows (stored_specs checks they align)
            rows = slice(rows.start // bn, rows.stop // bn)
        getattr(self, f"{name}_{part}")[e][rows].copy_(t)
        self._cpu = None

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if use_triton(x):
            from kernels.fused_moe import fused_moe
            return fused_moe(x, weights, ids, *(w.rows() for w in self.kernel_weights()))
        if x.is_cuda:
            from kernels.reference import fused_moe_ref
            return fused_moe_ref(x, weights, ids, *(w.rows() for w in self.kernel_weights()))
        if self.spec.fmt in ("int8", "int4") and decode_shaped(x):
            gu, dn, e = self.stacked("gate_up"), self.stacked("down"), cpu.empty()
            zero = lambda q: e if q.zero is None else q.zero  # noqa: E731
            return torch.ops.moedesk.moe(x, ids, weights, gu.qweight, gu.scale, zero(gu), dn.qweight, dn.scale,
                                         zero(dn), cpu.quant_format(self.spec.fmt, self.layout),
                                         self.spec.group).to(x.dtype)
        return self.forward_grouped(x, weights, ids)

    def grouped(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Rows grouped by expert → each group through its quantized SwiGLU (the CPU path). int8 and int4 go
        through moedesk's kernel (kernel_product): each expert read once per 16 of its rows; without it,
        torch's kernels on a packing made once (cpu_pack)."""
        gate_up, down = self.kernel_weights()
        if (self.spec.fmt in ("int8", "int4") and kernel_ready(xs) and gate_up.shape[-1] == xs.shape[-1]
                and down.shape[-1] == self.inter):
            project = lambda e, i, rows: kernel_product((gate_up, down)[i].expert(e), rows)  # noqa: E731
        else:
            if self._cpu is None:
                self._cpu = [(cpu_pack(gate_up.expert(e)), cpu_pack(down.expert(e))) for e in range(self.n_experts)]
            project = lambda e, i, rows: cpu_product(self._cpu[e][i], rows)  # noqa: E731
        out = torch.empty(xs.shape[0], down.shape[-2], dtype=xs.dtype, device=xs.device)
        start = 0
        for e, n in enumerate(counts.tolist()):  # one host read per layer, as in Experts
            if n:
                gate, up = project(e, 0, xs[start:start + n]).split(self.inter, dim=-1)
                out[start:start + n] = project(e, 1, F.silu(gate) * up)
                start += n
        return out


def int4_converter(name: str, layout: str):
    """The function that puts an int4 buffer (…qweight, …scale, …zero) into `layout` ("rows", "blocks16")."""
    to_blocks, to_rows = (int4_blocks, int4_rows) if name.endswith("qweight") else (group_blocks, group_rows)
    return to_rows if layout == "rows" else to_blocks


def reorder_int4(module: torch.nn.Module, layout: str) -> None:
    """A quantized module's int4 buffers (its INT4_BUFFERS) into `layout` ("rows" or "blocks16"), in place."""
    if layout != module.layout:
        for name in module.INT4_BUFFERS:
            convert = int4_converter(name, layout)
            buf = getattr(module, name)
            for matrix in buf if buf.dim() == 3 else [buf]:  # an expert at a time: a small transient copy
                moved = convert(matrix)
                if moved.data_ptr() != matrix.data_ptr():  # the same memory: the order does not change it
                    matrix.copy_(moved)
        module.layout = layout
        module._cpu = None


def int4_layout_hooks(module: torch.nn.Module) -> None:
    """state_dict() gives the int4 buffers in row order whatever their layout in memory (checkpoints, the
    GGUF export and comparisons read it), and load_state_dict() puts the module back in row order first."""
    def rows_out(m, state, prefix, _meta):
        if m.layout != "rows":
            for name in m.INT4_BUFFERS:
                state[prefix + name] = int4_converter(name, "rows")(state[prefix + name])

    module.register_state_dict_post_hook(rows_out)
    module.register_load_state_dict_pre_hook(lambda m, *_: m.use_layout("rows"))


def use_kernel_layout(model: torch.nn.Module) -> int:
    """int4 weights on the CPU into layout "blocks16" wherever moedesk's kernel reads it (AVX-512 VNNI, rows
    a multiple of 16, columns and group of 64): each block of 16 rows streams from memory in order, where
    row order has the kernel read 16 rows 32 bytes at a time and transpose them (docs/cpu_decode.md).
    Returns how many modules moved. Everything else reads the weights through QWeight.rows() or
    state_dict(), which give row order."""
    moved = 0
    for m in model.modules():
        if not isinstance(m, QuantLinear | QuantExperts) or m.spec.fmt != "int4" or m.layout != "rows":
            continue
        shapes = [w.shape[-2:] for w in m.kernel_weights()] if isinstance(m, QuantExperts) else [m.qw.shape]
        on_cpu = getattr(m, m.INT4_BUFFERS[0]).device.type == "cpu"
        if on_cpu and all(cpu.int4_blocks_ok(N, K, m.spec.group) for N, K in shapes):
            m.use_layout("blocks16")
            moved += 1
    return moved


class QuantEmbedding(torch.nn.Module):
    """An int8 embedding table: one row dequantized per token looked up."""

    spec = QuantSpec("int8")  # per row, like an int8 QuantLinear (what the checkpoint code reads)

    def __init__(self, vocab: int, dim: int, dtype: torch.dtype, device=None):
        super().__init__()
        self.dtype = dtype
        self.register_buffer("qweight", torch.empty(vocab, dim, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.empty(vocab, dtype=torch.float32, device=device))

    def set_weight(self, w: torch.Tensor) -> None:
        q = quantize_int8(w.to(self.qweight.device))
        self.qweight.copy_(q.qweight)
        self.scale.copy_(q.scale)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return (self.qweight[tokens].float() * self.scale[tokens, None]).to(self.dtype)


def policy(path: str, module: torch.nn.Module, spec: QuantSpec) -> QuantSpec | None:
    """The spec `module` at `path` gets under `spec`, or None to keep it in full precision."""
    name = path.rsplit(".", 1)[-1]
    if isinstance(module, QuantExperts | QuantLinear | QuantEmbedding):
        return None
    if isinstance(module, Experts):
        return spec
    if isinstance(module, torch.nn.Linear) and name not in KEEP_DENSE:
        if name == "head":
            return QuantSpec("int8") if spec.embed_head else None
        return spec
    if isinstance(module, torch.nn.Embedding) and spec.embed_head:
        return QuantSpec("int8")
    return None


def quantized_module(old: torch.nn.Module, spec: QuantSpec, device=None) -> torch.nn.Module:
    """An empty quantized module with `old`'s shapes (device None: old's device, e.g. meta)."""
    if isinstance(old, Experts):
        E, two_i, H = old.gate_up.shape
        return QuantExperts(E, H, two_i // 2, spec, device or old.gate_up.device)
    if isinstance(old, torch.nn.Embedding):
        return QuantEmbedding(old.num_embeddings, old.embedding_dim, old.weight.dtype, device or old.weight.device)
    return QuantLinear(old.in_features, old.out_features, spec, device or old.weight.device)


def swap_modules(model: torch.nn.Module, specs: dict[str, QuantSpec]) -> list[tuple]:
    """Put empty quantized modules at the given paths; returns (path, old, new) for each."""
    swapped = []
    for path, spec in specs.items():
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        old = getattr(parent, name)
        new = quantized_module(old, spec)
        setattr(parent, name, new)
        swapped.append((path, old, new))
    return swapped


def plan_quantization(model: torch.nn.Module, spec: QuantSpec) -> dict[str, QuantSpec]:
    return {path: s for path, m in model.named_modules() if path and (s := policy(path, m, spec))}


@torch.no_grad()
def quantize_model(model: torch.nn.Module, spec: QuantSpec) -> torch.nn.Module:
    """Replace the weights `spec` covers by quantized ones, in place, one layer at a time."""
    for _, old, new in swap_modules(model, plan_quantization(model, spec)):
        if isinstance(new, QuantExperts):
            for e in range(old.gate_up.shape[0]):
                new.set_expert("gate_up", e, slice(None), old.gate_up[e])
                new.set_expert("down", e, slice(None), old.down[e])
        else:
            new.set_weight(old.weight)
    model.quant_spec = spec
    use_kernel_layout(model)
    return model


def logical_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Meta tensors with the full-precision shapes of every quantized weight, under the names the
    dense model would have (`….weight`, `….gate_up`, `….down`): what checkpoint names map onto."""
    out = {}
    for path, m in model.named_modules():
        if isinstance(m, QuantExperts):
            for name in ("gate_up", "down"):
                out[f"{path}.{name}"] = torch.empty(m.stacked(name).shape, device="meta")
        elif isinstance(m, QuantLinear):
            out[f"{path}.weight"] = torch.empty(m.out_features, m.in_features, device="meta")
        elif isinstance(m, QuantEmbedding):
            out[f"{path}.weight"] = torch.empty(m.qweight.shape, device="meta")
    return out


def weight_bytes(model: torch.nn.Module) -> dict:
    """Bytes of weights: the whole model, and what one decoded token reads — every matrix it
    multiplies by (embedding: one row; routed experts: the top-k chosen per MoE layer; MTP excluded)."""
    total = per_token = 0
    k = model.cfg.num_experts_per_tok
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if name.startswith("rotary") or ".cache." in name:
            continue
        total += t.numel() * t.element_size()
        n = read_bytes(t)
        if name.startswith("mtp."):
            continue
        if name.startswith("embed."):  # a row looked up as stored
            per_token += t.numel() * t.element_size() // t.shape[0]
        elif ".experts." in name:
            per_token += n // t.shape[0] * k
        else:
            per_token += n
    head = getattr(model.head, "weight", None)
    if head is not None and head is getattr(model.embed, "weight", None):  # tied: the head reads it all
        per_token += read_bytes(head)
    return {"model_bytes": total, "bytes_per_token": per_token}


# ---- compressed-tensors on disk (docs/quantization.md) ------------------------------------------
# int4: `weight_packed` int32 [N, ceil(K/8)] (8 values per word, lowest bits first — on a little-endian
# host exactly our bytes), `weight_scale` [N, G], `weight_zero_point` int32 [ceil(N/8), G] packed along
# the rows, `weight_shape` [2]; int8: `weight` int8 [N, K] and `weight_scale` [N, 1]; DeepSeek fp8:
# `weight` e4m3 and `weight_scale_inv`. Stored values are the unsigned nibbles: compressed-tensors
# offsets signed int4 by +8 before packing, and (q − zp) is the same in either convention.
STORED_PARTS = {"int4": {"weight_packed": "qweight", "weight_scale": "scale", "weight_zero_point": "zero",
                         "weight_shape": "shape"},
                "int8": {"weight": "qweight", "weight_scale": "scale"},
                "fp8": {"weight": "qweight", "weight_scale_inv": "scale"}}
STORED_SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_scale_inv")


def split_stored_name(name: str) -> tuple[str, str]:
    """'…q_a_proj.weight_packed' → ('…q_a_proj.weight', 'weight_packed'); plain weights → (name, 'weight')."""
    for suffix in STORED_SUFFIXES:
        if name.endswith("." + suffix):
            return name[: -len(suffix)] + "weight", suffix
    return name, "weight"


def _words(nibbles_as_bytes: torch.Tensor) -> torch.Tensor:
    """uint8 [..., B] → int32 [..., ceil(B/4)], little-endian (zero-padded)."""
    pad = (-nibbles_as_bytes.shape[-1]) % 4
    b = F.pad(nibbles_as_bytes, (0, pad)).contiguous()
    b = b if _little_endian() else _swap_bytes(b)
    return b.reshape(-1).view(torch.int32).view(*b.shape[:-1], -1)  # flat: size-1 dims keep odd strides


def _bytes(words: torch.Tensor, n_bytes: int) -> torch.Tensor:
    b = words.contiguous().reshape(-1).view(torch.uint8).view(*words.shape[:-1], -1)
    return (b if _little_endian() else _swap_bytes(b))[..., :n_bytes]


def _little_endian() -> bool:
    import sys
    return sys.byteorder == "little"


def _swap_bytes(b: torch.Tensor) -> torch.Tensor:
    return b.view(*b.shape[:-1], -1, 4).flip(-1).flatten(-2)


def to_stored(fmt: str, part: str, t: torch.Tensor) -> torch.Tensor:
    """An engine buffer (one matrix) → its compressed-tensors / DeepSeek form."""
    if fmt == "int4" and part == "qweight":
        return _words(t)
    if fmt == "int4" and part == "zero":  # pack along the rows: row 2j low nibble, 2j+1 high
        z = F.pad(t, (0, 0, 0, t.shape[0] % 2))
        rows_as_bytes = (z[0::2] | (z[1::2] << 4)).transpose(0, 1)  # [G, ceil(N/2)]
        return _words(rows_as_bytes).transpose(0, 1).contiguous()
    if fmt == "int8" and part == "scale":
        return t[:, None]
    return t


def from_stored(fmt: str, part: str, t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The inverse of to_stored for a matrix of `rows` × `cols` logical values."""
    if fmt == "int4" and part == "qweight":
        return _bytes(t, cols // 2)
    if fmt == "int4" and part == "zero":
        b = _bytes(t.transpose(0, 1), -(-rows // 2))  # [G, ceil(N/2)]
        return torch.stack([b & 0x0F, b >> 4], dim=-1).flatten(-2)[:, :rows].transpose(0, 1).contiguous()
    if fmt == "int8" and part == "scale":
        return t[:, 0]
    return t


def stored_shape(fmt: str, suffix: str, rows: int, cols: int, group: int, block=(128, 128)) -> tuple:
    G = -(-cols // group) if group else 0
    return {("int4", "weight_packed"): (rows, -(-cols // 8)), ("int4", "weight_scale"): (rows, G),
            ("int4", "weight_zero_point"): (-(-rows // 8), G), ("int4", "weight_shape"): (2,),
            ("int8", "weight"): (rows, cols), ("int8", "weight_scale"): (rows, 1),
            ("fp8", "weight"): (rows, cols),
            ("fp8", "weight_scale_inv"): (-(-rows // block[0]), -(-cols // block[1]))}[(fmt, suffix)]


def compressed_tensors_config(spec: QuantSpec) -> dict:
    """config.json's quantization_config for a model written by `engine quantize`."""
    def group(fmt, group_size):
        w = {"num_bits": 4 if fmt == "int4" else 8, "type": "int", "symmetric": fmt == "int8",
             "strategy": "group" if fmt == "int4" else "channel", "group_size": group_size if fmt == "int4" else None,
             "dynamic": False, "observer": "minmax", "actorder": None}
        return {"targets": ["Linear"], "weights": w, "input_activations": None, "output_activations": None,
                "format": "pack-quantized" if fmt == "int4" else "int-quantized"}

    groups = {"group_0": group(spec.fmt, spec.group)}
    ignore = ["re:.*mlp\\.gate$", "re:.*kv_b_proj$"]
    if spec.embed_head and spec.fmt != "int8":
        groups["group_1"] = group("int8", None) | {
            "targets": ["re:.*lm_head$", "re:.*shared_head\\.head$", "re:.*embed_tokens$"]}
    elif not spec.embed_head:
        ignore += ["lm_head", "re:.*shared_head\\.head$"]
    fmt = "mixed-precision" if len(groups) > 1 else groups["group_0"]["format"]
    return {"quant_method": "compressed-tensors", "format": fmt, "config_groups": groups, "ignore": ignore,
            "quantization_status": "compressed", "kv_cache_scheme": None,
            "moedesk": {"scheme": spec.fmt, "group_size": spec.group, "embed_head": spec.embed_head}}


def model_spec(model: torch.nn.Module) -> QuantSpec | None:
    """The quantization a model carries (its body's spec; embed_head when the head or table is int8)."""
    body = [m.spec for p, m in model.named_modules() if isinstance(m, QuantExperts | QuantLinear) and
            not p.endswith("head")]
    quant_head = any(isinstance(m, QuantEmbedding) or (isinstance(m, QuantLinear) and p.endswith("head"))
                     for p, m in model.named_modules())
    if not body:
        return QuantSpec("int8", embed_head=True) if quant_head else None
    spec = max(set(body), key=body.count)
    return QuantSpec(spec.fmt, spec.group, quant_head, spec.block)


def quantization_config(model: torch.nn.Module) -> dict | None:
    spec = model_spec(model)
    if spec is None:
        return None
    if spec.fmt == "fp8":
        return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                "weight_block_size": list(spec.block)}
    return compressed_tensors_config(spec)
