"""A model folder → one GGUF file that llama.cpp runs as its `deepseek2` architecture.

The weights come through the engine's own loader (engine/model/checkpoint.py), so every checkpoint it
reads exports: bf16/fp32, DeepSeek FP8 (dequantized there) and our compressed-tensors int8/int4
(dequantized here, one weight at a time). The GGUF is streamed: its header is written from the
tensors' shapes, then each tensor is converted and written on its own, so besides the loaded model
there is never more than one converted tensor in memory.

Types: f32 and f16 written here; q8_0 through gguf-py's quantizer (a matrix whose rows are not whole
32-value blocks stays f16); q4_k_m by llama.cpp's own quantizer run on a lossless temporary GGUF.
Norms, the router and its bias always stay f32, as llama.cpp's converter keeps them.

What llama.cpp's deepseek2 loader needs, and why the mapping below looks as it does, was worked out
in a trial export (docs: shared/reference/gguf_trial.md): MLA is written as one KV head with the key
and value up-projections split per head (attn_k_b / attn_v_b, never the fused attn_kv_b), the
gating function is always written (a missing key silently means softmax), and topk_group == n_group
is written as one group (llama.cpp aborts the process on the former; both select the same experts).
"""
from __future__ import annotations

import ctypes
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import gguf
import numpy as np
import torch

from engine.model.checkpoint import ProgressFn, checkpoint_files, load_model, scan_headers
from engine.model.config import ModelConfig, load_config
from engine.model.transformer import Transformer

ARCH = "deepseek2"
FTYPES = ("f32", "f16", "q8_0", "q4_k_m")
Q = gguf.GGMLQuantizationType
FILE_TYPE = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
LLAMA_FTYPE_MOSTLY_Q4_K_M = 15  # llama.h's enum llama_ftype
# Whether the vendored llama.cpp reads deepseek2's MTP (nextn) layers: checked by
# tests/test_gguf_export.py with load_mtp=True. Set False to leave them out if a llama.cpp update drops it.
LLAMA_READS_DEEPSEEK2_MTP = True
# llama.cpp's deepseek2 MTP graph drafts with exactly one nextn layer (it asserts n_layer_nextn == 1 and
# aborts otherwise), so by default only the first MTP module is written: one layer it can draft with.
LLAMA_MTP_LAYERS = 1


class ExportError(ValueError):
    """A model this exporter cannot write faithfully, or a llama.cpp step that failed; names the reason.
    A ValueError, so the command line reports it as one line, like a bad argument."""


# ---- what llama.cpp can express --------------------------------------------------------------------

def check_supported(cfg: ModelConfig, source: str) -> None:
    """Refuse what deepseek2 in llama.cpp would run differently from the native engine."""
    if cfg.n_routed_experts is None:
        raise ExportError(f"{source}: a dense model (no routed experts); the deepseek2 export needs MoE layers")
    if cfg.moe_layer_freq != 1:
        raise ExportError(f"{source}: moe_layer_freq {cfg.moe_layer_freq}; llama.cpp makes every layer after "
                          "the leading dense ones an MoE layer")
    if cfg.topk_method == "group_limited_greedy" and 1 < cfg.topk_group < cfg.n_group:
        raise ExportError(f"{source}: group_limited_greedy routing ranks groups by their best expert; llama.cpp "
                          "ranks them by the sum of the best two (DeepSeek-V3's noaux_tc)")
    rope = cfg.rope
    if rope.is_yarn and not rope.truncate:
        raise ExportError(f"{source}: YaRN with truncate=false; llama.cpp always rounds the ramp bounds")
    if rope.is_yarn and (rope.beta_fast, rope.beta_slow) != (32.0, 1.0):
        raise ExportError(f"{source}: YaRN beta_fast/beta_slow {rope.beta_fast}/{rope.beta_slow}; llama.cpp takes "
                          "them from its context settings (32/1 by default), not from the GGUF")
    if rope.is_yarn and abs(rope.cos_sin_scale() - 1.0) > 1e-6:
        raise ExportError(f"{source}: YaRN with mscale != mscale_all_dim (or an attention_factor) scales cos/sin "
                          f"by {rope.cos_sin_scale():.4f}; llama.cpp's deepseek2 keeps them unscaled")


def groups_for_llama(cfg: ModelConfig) -> tuple[int, int]:
    """(n_group, topk_group) as written. Keeping every group masks nothing, so it is one group: the same
    choice, and llama.cpp asserts topk_group < n_group. `greedy` ignores groups altogether."""
    if cfg.topk_method == "greedy" or cfg.topk_group >= cfg.n_group:
        return 1, 1
    return cfg.n_group, cfg.topk_group


def expert_weighting(cfg: ModelConfig) -> tuple[bool, float]:
    """(normalize, scale) of the chosen experts' weights. llama.cpp normalizes then scales; DeepSeek-V2's
    gate does one or the other (engine.routing.Router.weights_of)."""
    if cfg.model_type == "deepseek_v2":
        if cfg.norm_topk_prob and cfg.num_experts_per_tok > 1:
            return True, 1.0
        return False, cfg.routed_scaling_factor
    return cfg.norm_topk_prob, cfg.routed_scaling_factor


# ---- metadata --------------------------------------------------------------------------------------

def write_model_keys(w: gguf.GGUFWriter, cfg: ModelConfig, n_mtp: int) -> None:
    w.add_vocab_size(cfg.vocab_size)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers + n_mtp)  # llama.cpp counts the MTP layers in
    w.add_feed_forward_length(cfg.intermediate_size or cfg.moe_intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(1)  # MLA runs as one shared latent "head"
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_q_lora_rank(cfg.q_lora_rank or 0)
    w.add_kv_lora_rank(cfg.kv_lora_rank)
    w.add_key_length(cfg.kv_lora_rank + cfg.qk_rope_head_dim)  # what attention sees after absorption
    w.add_value_length(cfg.kv_lora_rank)
    w.add_key_length_mla(cfg.qk_head_dim)  # per-head sizes before absorption: selects the MLA path
    w.add_value_length_mla(cfg.v_head_dim)
    w.add_leading_dense_block_count(cfg.first_k_dense_replace)
    w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    w.add_expert_count(cfg.n_routed_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    w.add_expert_shared_count(cfg.n_shared_experts)
    n_group, topk_group = groups_for_llama(cfg)
    w.add_expert_group_count(n_group)
    w.add_expert_group_used_count(topk_group)
    norm, scale = expert_weighting(cfg)
    w.add_expert_weights_norm(norm)
    w.add_expert_weights_scale(scale)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if cfg.scoring_func == "sigmoid"
                             else gguf.ExpertGatingFuncType.SOFTMAX)
    if n_mtp:
        w.add_nextn_predict_layers(n_mtp)
    write_rope_keys(w, cfg)


def write_rope_keys(w: gguf.GGUFWriter, cfg: ModelConfig) -> None:
    rope = cfg.rope
    w.add_rope_freq_base(rope.theta)
    w.add_rope_dimension_count(cfg.qk_rope_head_dim)
    if not rope.is_yarn:
        return
    w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    w.add_rope_scaling_factor(rope.factor)
    w.add_rope_scaling_orig_ctx_len(rope.original_max_position_embeddings)
    w.add_rope_scaling_yarn_beta_fast(rope.beta_fast)
    w.add_rope_scaling_yarn_beta_slow(rope.beta_slow)
    # llama.cpp's softmax scale is (1 + log_mul·ln factor)²/√d: DeepSeek's mscale(factor, mscale_all_dim)².
    w.add_rope_scaling_yarn_log_mul(0.1 * rope.mscale_all_dim)


# ---- tokenizer -------------------------------------------------------------------------------------

@dataclass
class Vocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    bos_id: int | None
    eos_id: int | None
    add_bos: bool
    chat_template: str | None


def read_vocab(model_dir: Path, vocab_size: int) -> Vocab:
    """tokenizer.json (a byte-level BPE) → llama.cpp's gpt2 vocabulary, padded to the embedding's rows."""
    from engine.tokenizer import Tokenizer

    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise ExportError(f"{path}: missing; a GGUF carries its vocabulary, so the model needs a tokenizer.json")
    spec = json.loads(path.read_text(encoding="utf-8"))
    bpe = spec.get("model") or {}
    if bpe.get("type") != "BPE" or bpe.get("byte_fallback") or bpe.get("continuing_subword_prefix") \
            or bpe.get("end_of_word_suffix"):
        raise ExportError(f"{path}: only plain byte-level BPE tokenizers export (found model {bpe.get('type')!r})")
    if spec.get("normalizer"):
        raise ExportError(f"{path}: a normalizer ({spec['normalizer'].get('type')}) llama.cpp's gpt2 vocabulary lacks")
    pre = pre_tokenizer_name(spec.get("pre_tokenizer"), path)
    tokens, types = [f"[PAD{i}]" for i in range(vocab_size)], [int(gguf.TokenType.UNUSED)] * vocab_size
    entries = [(i, t, gguf.TokenType.NORMAL) for t, i in bpe.get("vocab", {}).items()]
    entries += [(a["id"], a["content"], gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED)
                for a in spec.get("added_tokens", [])]
    for i, text, kind in entries:
        if not 0 <= i < vocab_size:
            raise ExportError(f"{path}: token id {i} ({text!r}) is outside the model's vocab_size {vocab_size}")
        tokens[i], types[i] = text, int(kind)
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe.get("merges", [])]
    tok = Tokenizer.from_dir(model_dir)  # the chat template, bos/eos and add_bos as the engine reads them
    return Vocab(tokens, types, merges, pre, tok.bos_id, tok.eos_id, tok.add_bos, tok.chat_template)


def pre_tokenizer_name(pre: dict | None, path: Path) -> str:
    """llama.cpp's name for the pre-tokenizer. A lone ByteLevel with use_regex splits with GPT-2's regex,
    which llama.cpp calls "gpt-2" ("default" is another regex: it also splits punctuation runs)."""
    if pre and pre.get("type") == "Sequence" and len(pre.get("pretokenizers", [])) == 1:
        pre = pre["pretokenizers"][0]
    if pre and pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        return "gpt-2"
    raise ExportError(f"{path}: pre-tokenizer {json.dumps(pre)[:200]} has no llama.cpp equivalent here; "
                      "only ByteLevel(add_prefix_space=false, use_regex=true) is mapped")


def write_vocab_keys(w: gguf.GGUFWriter, vocab: Vocab) -> None:
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    w.add_token_merges(vocab.merges)
    if vocab.bos_id is not None:
        w.add_bos_token_id(vocab.bos_id)
    if vocab.eos_id is not None:
        w.add_eos_token_id(vocab.eos_id)
    w.add_add_bos_token(vocab.add_bos)
    w.add_add_eos_token(False)
    if vocab.chat_template:
        w.add_chat_template(vocab.chat_template)


# ---- tensors ---------------------------------------------------------------------------------------

Getter = Callable[[str], torch.Tensor]  # engine parameter name → float32 tensor (or a meta one: shapes only)
TensorFn = Callable[[Getter], torch.Tensor]  # → the tensor in GGUF (numpy, row-major) order


def weight(model: Transformer, param: str) -> torch.Tensor:
    """An engine weight in float32; quantized modules (int8/int4 checkpoints) dequantized."""
    from kernels.formats import dequantize
    from engine.quant import QuantEmbedding, QuantExperts, QuantLinear

    path, _, leaf = param.rpartition(".")
    module = model.get_submodule(path)
    if isinstance(module, QuantExperts):
        return dequantize(module.stacked(leaf))
    if isinstance(module, QuantLinear):
        return dequantize(module.qw)
    if isinstance(module, QuantEmbedding):
        return module.qweight.float() * module.scale[:, None]
    return getattr(module, leaf).detach().float()


def logical_shapes(model: Transformer) -> dict[str, tuple[int, ...]]:
    """Every weight's full-precision shape, quantized ones included: the tensor table is written first."""
    from engine.quant import logical_weights

    shapes = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    return shapes | {n: tuple(t.shape) for n, t in logical_weights(model).items()}


def rope_rows_interleaved(w: torch.Tensor, n_heads: int, nope: int, rope: int) -> torch.Tensor:
    """llama.cpp rotates neighbouring pairs (x0,x1),(x2,x3)…; a rope_interleave=false model rotates
    halves (x_i, x_{i+d/2}). Reorder each head's rotary output rows so pairs become neighbours; q and k
    get the same order, so their product is unchanged."""
    half = torch.arange(rope // 2, device=w.device)
    order = torch.stack([half, half + rope // 2], dim=-1).flatten()
    w = w.view(n_heads, nope + rope, -1)
    return torch.cat([w[:, :nope], w[:, nope:][:, order]], dim=1).flatten(0, 1)


def as_is(param: str) -> TensorFn:
    """The engine weight `param`, unchanged."""
    return lambda get: get(param)


def attention_tensors(cfg: ModelConfig, pre: str, blk: str) -> Iterator[tuple[str, TensorFn]]:
    nh, nope, rope, v = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim

    def plain(param):
        return as_is(pre + param)

    def query(param):
        def fn(get):
            w = get(pre + param)
            return w if cfg.rope_interleave else rope_rows_interleaved(w, nh, nope, rope)
        return fn

    def kv_down(get):
        w = get(pre + "attn.kv_down_proj.weight")
        return w if cfg.rope_interleave else rope_rows_interleaved(w, 1, cfg.kv_lora_rank, rope)

    def kv_up(part):
        def fn(get):
            w = get(pre + "attn.kv_up_proj.weight").view(nh, nope + v, cfg.kv_lora_rank)
            # attn_k_b [nh, kv_lora, nope] (ggml ne {nope, kv_lora, nh}); attn_v_b [nh, v, kv_lora]
            return w[:, :nope].transpose(1, 2).contiguous() if part == "k" else w[:, nope:].contiguous()
        return fn

    yield blk + "attn_norm.weight", plain("attn_norm.weight")
    if cfg.q_lora_rank:
        yield blk + "attn_q_a.weight", plain("attn.q_down_proj.weight")
        yield blk + "attn_q_a_norm.weight", plain("attn.q_norm.weight")
        yield blk + "attn_q_b.weight", query("attn.q_up_proj.weight")
    else:  # V2-Lite style: one query projection
        yield blk + "attn_q.weight", query("attn.q_proj.weight")
    yield blk + "attn_kv_a_mqa.weight", kv_down
    yield blk + "attn_kv_a_norm.weight", plain("attn.kv_norm.weight")
    yield blk + "attn_k_b.weight", kv_up("k")
    yield blk + "attn_v_b.weight", kv_up("v")
    yield blk + "attn_output.weight", plain("attn.out_proj.weight")


def ffn_tensors(cfg: ModelConfig, pre: str, blk: str, moe: bool) -> Iterator[tuple[str, TensorFn]]:
    def plain(param):
        return as_is(pre + param)

    def experts(half):
        rows = slice(None, cfg.moe_intermediate_size) if half == "gate" else slice(cfg.moe_intermediate_size, None)
        return lambda get: get(pre + "ffn.experts.gate_up")[:, rows].contiguous()  # [E, I, H]

    yield blk + "ffn_norm.weight", plain("ffn_norm.weight")
    if not moe:
        for part in ("gate", "up", "down"):
            yield blk + f"ffn_{part}.weight", plain(f"ffn.{part}_proj.weight")
        return
    yield blk + "ffn_gate_inp.weight", plain("ffn.router.weight")
    if cfg.topk_method == "noaux_tc":  # only noaux_tc selects with the score-correction bias
        yield blk + "exp_probs_b.bias", plain("ffn.router.bias")
    yield blk + "ffn_gate_exps.weight", experts("gate")
    yield blk + "ffn_up_exps.weight", experts("up")
    yield blk + "ffn_down_exps.weight", plain("ffn.experts.down")
    if cfg.n_shared_experts:
        for part in ("gate", "up", "down"):
            yield blk + f"ffn_{part}_shexp.weight", plain(f"ffn.shared_experts.{part}_proj.weight")


def mtp_tensors(model: Transformer, i: int) -> Iterator[tuple[str, TensorFn]]:
    """MTP depth i as llama.cpp's nextn layer blk.{L+i}: a full decoder layer plus its nextn.* parts."""
    cfg = model.cfg
    L = cfg.num_hidden_layers
    pre, blk, m = f"mtp.{i}.", f"blk.{L + i}.", model.mtp[i]
    yield from attention_tensors(cfg, pre + "block.", blk)
    yield from ffn_tensors(cfg, pre + "block.", blk, moe=cfg.is_moe_layer(L + i))
    parts = [("eh_proj", "eh_proj"), ("enorm", "enorm"), ("hnorm", "hnorm"), ("shared_head_norm", "head_norm")]
    if m.embed is not None:  # the loader drops MTP copies equal to the main model's
        parts.append(("embed_tokens", "embed"))
    if m.head is not None:
        parts.append(("shared_head_head", "head"))
    for gname, param in parts:
        yield blk + f"nextn.{gname}.weight", as_is(f"{pre}{param}.weight")


def all_tensors(model: Transformer, n_mtp: int) -> Iterator[tuple[str, TensorFn]]:
    cfg = model.cfg
    yield "token_embd.weight", as_is("embed.weight")
    yield "output_norm.weight", as_is("norm.weight")
    yield "output.weight", as_is("head.weight")  # written even when tied: llama.cpp needs it
    for i in range(cfg.num_hidden_layers):
        yield from attention_tensors(cfg, f"layers.{i}.", f"blk.{i}.")
        yield from ffn_tensors(cfg, f"layers.{i}.", f"blk.{i}.", moe=cfg.is_moe_layer(i))
    for i in range(n_mtp):
        yield from mtp_tensors(model, i)


def ggml_type(name: str, shape: tuple[int, ...], ftype: str) -> Q:
    """Vectors, the router and its bias stay f32; q8_0 needs whole 32-value blocks per row (ne0)."""
    if len(shape) == 1 or name.endswith("ffn_gate_inp.weight") or ftype == "f32":
        return Q.F32
    if ftype == "q8_0":
        # The token embedding and the output head stay f16 (llama-quantize's --token-embedding-type /
        # --output-tensor-type): on the bundled model Q8_0 embeddings alone cost 1.9 points of greedy
        # top-1 agreement with the native engine (97.5% → 98.4% with both f16), at 2·vocab·hidden bytes.
        if name in ("token_embd.weight", "output.weight"):
            return Q.F16
        return Q.Q8_0 if shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0] == 0 else Q.F16
    return {"f16": Q.F16, "bf16": Q.BF16}[ftype]


def encode(t: torch.Tensor, qtype: Q) -> np.ndarray:
    a = t.contiguous().numpy()
    if qtype == Q.F32:
        return a
    if qtype == Q.F16:
        return a.astype(np.float16)
    return gguf.quants.quantize(a, qtype)


def nbytes(shape: tuple[int, ...], qtype: Q) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    return rows * shape[-1] // block * size


# ---- writing ---------------------------------------------------------------------------------------

def write_gguf(path: Path, model: Transformer, vocab: Vocab, n_mtp: int, ftype: str, name: str,
               progress: ProgressFn | None) -> dict[str, int]:
    """Stream the GGUF: header and tensor table first, then each tensor converted on its own. Returns
    how many tensors of each type were written."""
    tensors = list(all_tensors(model, n_mtp))
    w = gguf.GGUFWriter(path, ARCH)
    w.add_name(name)
    w.add_file_type(FILE_TYPE[ftype])
    if ftype == "q8_0":
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    write_model_keys(w, model.cfg, n_mtp)
    write_vocab_keys(w, vocab)
    plan, counts, shapes = [], {}, logical_shapes(model)
    for tname, fn in tensors:
        shape = tuple(fn(lambda p: torch.empty(shapes[p], device="meta")).shape)
        qtype = ggml_type(tname, shape, ftype)
        w.add_tensor_info(tname, shape, np.dtype(np.float32), nbytes(shape, qtype), raw_dtype=qtype)
        plan.append((fn, qtype))
        counts[qtype.name] = counts.get(qtype.name, 0) + 1
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for k, (fn, qtype) in enumerate(plan):
        w.write_tensor_data(encode(fn(lambda p: weight(model, p)), qtype))
        if progress:
            progress("writing GGUF", (k + 1) / len(plan))
    w.close()
    return counts


def load_dtype(model_dir: Path) -> torch.dtype:
    """Load in the checkpoint's own 16-bit type when every float weight has it (lossless, half the memory
    of fp32); otherwise fp32 (fp32 weights, and FP8 ones, which dequantize to fp32 without rounding)."""
    infos = scan_headers(checkpoint_files(model_dir))
    kinds = {i.dtype for n, i in infos.items() if i.dtype.is_floating_point and len(i.shape) > 1
             and not n.endswith("mlp.gate.weight")}  # routers are fp32 in any model
    return kinds.pop() if kinds in ({torch.bfloat16}, {torch.float16}) else torch.float32


def export_gguf(model_dir: str | Path, out_path: str | Path, ftype: str = "f32",
                progress: ProgressFn | None = None, mtp: bool | int = True) -> Path:
    """Write `model_dir` as a GGUF of type `ftype` (f32 | f16 | q8_0 | q4_k_m) at `out_path`; returns it.
    mtp: how many MTP modules to write as llama.cpp nextn layers (when the vendored llama.cpp reads
    them): True = as many as llama.cpp drafts with (LLAMA_MTP_LAYERS), a number = up to that many, False = none."""
    model_dir, out = Path(model_dir), Path(out_path)
    if ftype not in FTYPES:
        raise ExportError(f"unknown GGUF type {ftype!r}; choose one of {', '.join(FTYPES)}")
    cfg = load_config(model_dir)  # ModelLoadError names a non-DeepSeek or broken config
    check_supported(cfg, str(model_dir / "config.json"))
    vocab = read_vocab(model_dir, cfg.vocab_size)
    dtype = load_dtype(model_dir)
    model = load_model(model_dir, device="cpu", dtype=dtype, progress=progress)
    wanted = LLAMA_MTP_LAYERS if mtp is True else int(mtp)
    n_mtp = min(len(model.mtp), wanted)
    if wanted > LLAMA_MTP_LAYERS and n_mtp > LLAMA_MTP_LAYERS:
        warnings.warn(f"writing {n_mtp} MTP layers: llama.cpp loads them but drafts only with files that have "
                      f"{LLAMA_MTP_LAYERS}", stacklevel=2)
    if n_mtp and not LLAMA_READS_DEEPSEEK2_MTP:
        warnings.warn("this llama.cpp build does not read deepseek2 MTP layers; leaving them out", stacklevel=2)
        n_mtp = 0
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_name(out.name + ".part")
    try:
        if ftype == "q4_k_m":
            # k-quants have no Python quantizer: a lossless GGUF first, then llama.cpp's own quantizer.
            source = out.with_name(out.name + ".src.gguf")
            try:
                write_gguf(source, model, vocab, n_mtp, "bf16" if dtype == torch.bfloat16 else "f32",
                           model_dir.name, progress)
                del model
                if progress:
                    progress("quantizing with llama.cpp", 0.0)
                llama_quantize(source, part, LLAMA_FTYPE_MOSTLY_Q4_K_M)
            finally:
                source.unlink(missing_ok=True)
        else:
            write_gguf(part, model, vocab, n_mtp, ftype, model_dir.name, progress)
        os.replace(part, out)
    finally:
        part.unlink(missing_ok=True)
    return out


def describe_gguf(path: str | Path) -> dict:
    """What a GGUF holds, read back from its header: size, tensors per type, vocabulary, MTP layers,
    whether it has a chat template (for the command line's report, and for tests)."""
    reader = gguf.GGUFReader(path)

    def value(key):
        field = reader.fields.get(key)
        return None if field is None else field.contents()

    types: dict[str, int] = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    return {"bytes": Path(path).stat().st_size, "tensors": len(reader.tensors), "types": types,
            "file_type": value("general.file_type"), "vocab": len(value("tokenizer.ggml.tokens") or []),
            "mtp_layers": value(f"{ARCH}.nextn_predict_layers") or 0,
            "chat_template": value("tokenizer.chat_template") is not None}


# ---- llama.cpp -------------------------------------------------------------------------------------

def llama_quantize(src: Path, dst: Path, llama_ftype: int) -> None:
    """llama.cpp's quantizer (the one llama-quantize runs). Tensors whose rows are not whole k-quant
    blocks it stores in a fallback type itself."""
    import llama_cpp

    from engine.backends.llamacpp_runtime import fresh_log, init_library, last_error

    init_library()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_ftype
    params.nthread = os.cpu_count() or 1
    fresh_log()
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0 or not dst.is_file():
        raise ExportError(f"llama.cpp's quantizer failed on {src.name} (code {rc}): {last_error()}")
