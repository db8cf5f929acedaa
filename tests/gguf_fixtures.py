"""Helpers for tests that run exported GGUFs in llama.cpp next to the native engine (imported by
test_gguf_export.py and test_llamacpp_backend.py; a plain module, so importing it costs nothing).

`open_llama` uses the settings under which llama.cpp reproduces an F32 export's logits to ~1e-5: an F32 KV
cache (its default is F16, ~2e-3 off) and no flash attention (which rounds K/V to F16 even with an F32 cache).
One thread by default: on a busy 2-core machine llama.cpp's spinning thread barriers made a tiny model's
evaluation 20-30x slower with 2 threads than with 1.
"""
from __future__ import annotations

import ctypes
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from engine.export.gguf import export_gguf
from engine.tiny import write_tiny_model


def exported_tiny(tmp_dir: str | Path, ftype: str = "f32", seed: int = 0, std: float = 0.1, mtp: bool | int = True,
                  bias_std: float = 0.1, **overrides) -> tuple[Path, Path]:
    """A random tiny DeepSeek-V3 folder (engine.tiny.write_tiny_model; overrides: config fields) and its GGUF
    export, both under tmp_dir → (model folder, .gguf path). The routers' score-correction bias is random
    too (bias_std), so that llama.cpp's exp_probs_b is exercised: write_tiny_model leaves it zero."""
    tmp_dir = Path(tmp_dir)
    model_dir = write_tiny_model(tmp_dir / f"tiny-{seed}", seed=seed, std=std, **overrides)
    if bias_std:
        randomize_router_bias(model_dir, seed, bias_std)
    return model_dir, export_gguf(model_dir, tmp_dir / f"tiny-{seed}-{ftype}.gguf", ftype, mtp=mtp)


def randomize_router_bias(model_dir: Path, seed: int, std: float) -> None:
    from safetensors.torch import load_file, save_file

    path = model_dir / "model.safetensors"
    state = load_file(path)
    g = torch.Generator().manual_seed(seed + 1)
    for name, t in state.items():
        if name.endswith("e_score_correction_bias"):
            state[name] = torch.randn(t.shape, generator=g) * std
    save_file(state, path, metadata={"format": "pt"})


@contextmanager
def llama_log() -> Iterator[list[str]]:
    """Collect llama.cpp's log lines, all of them, instead of printing them (a quiet Llama() load hides
    the reason it failed); whatever callback was set is put back after."""
    import llama_cpp

    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def collect(level, text, user_data):
        lines.append(text.decode("utf-8", errors="replace"))

    previous, user_data = llama_cpp.llama_log_callback(), ctypes.c_void_p()
    llama_cpp.llama_log_get(ctypes.byref(previous), ctypes.byref(user_data))
    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        yield lines
    finally:
        llama_cpp.llama_log_set(previous, user_data)


def open_llama(path: str | Path, n_ctx: int = 256, exact: bool = True, **kwargs):
    """llama_cpp.Llama on a GGUF, quiet; exact: F32 KV cache, no flash attention, logits at every position.
    A failed load raises RuntimeError with llama.cpp's own reason (a quiet load only says it failed)."""
    import llama_cpp

    from engine.backends.llamacpp_runtime import error_lines

    settings = dict(type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, flash_attn=False,
                    logits_all=True) if exact else {}
    settings |= dict(n_ctx=n_ctx, n_threads=1, n_threads_batch=1, seed=0, verbose=False) | kwargs
    with llama_log() as lines:
        try:
            return llama_cpp.Llama(model_path=str(path), **settings)
        except ValueError as e:
            raise RuntimeError(f"llama.cpp could not load {path}:\n" + "\n".join(error_lines(lines, 8))) from e


def llama_logits(llm, ids: list[int]) -> np.ndarray:
    """Logits [T, V] of llama.cpp fed `ids` from an empty context (needs logits_all=True)."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)], dtype=np.float32)


@torch.no_grad()
def native_logits(model, ids: list[int]) -> np.ndarray:
    """Logits [T, V] of the native engine on `ids` (one causal pass, no cache)."""
    return model.logits(model(torch.tensor([ids])))[0].numpy()


@torch.no_grad()
def routing_margins(model, ids: list[int]) -> np.ndarray:
    """Per position, the smallest gap over all MoE layers between the last chosen and the first rejected
    candidate (expert, or group when groups are limited). Where it is tiny, float rounding in another
    runtime may pick another expert, and the logits move by O(1): those positions prove nothing."""
    from engine.routing import Router

    margins = []

    def hook(router, inputs, _output):
        margins.append(router_margin(router, inputs[0]))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, Router)]
    try:
        model(torch.tensor([ids]))
    finally:
        for h in handles:
            h.remove()
    return torch.stack(margins).amin(0).numpy() if margins else np.full(len(ids), np.inf)


def router_margin(router, x: torch.Tensor) -> torch.Tensor:
    """x [N, H] → [N]: min(expert margin, group margin) of the router's own selection rule."""
    scores = router.scores(x)
    choice = scores + router.bias if router.method == "noaux_tc" else scores
    top = router.mask_groups(choice).topk(router.top_k + 1, dim=-1).values
    margin = top[:, -2] - top[:, -1]
    if router.method != "greedy" and 1 < router.topk_group < router.n_group:
        grouped = choice.view(choice.shape[0], router.n_group, -1)
        if router.method == "noaux_tc":
            group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)
        else:
            group_scores = grouped.amax(-1)
        g = group_scores.topk(router.topk_group + 1, dim=-1).values
        margin = torch.minimum(margin, g[:, -2] - g[:, -1])
    return margin
