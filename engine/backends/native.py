"""The native PyTorch engine behind the backend interface."""
from __future__ import annotations

import gc
import os
from pathlib import Path
from typing import Callable

import torch

from engine.backends.base import Backend, BackendError, EmitFn, ProgressFn, sampling_params
from engine.generate import generate
from engine.model.errors import ModelLoadError
from engine.pretrained import Pretrained, load_pretrained
from engine.quant import QuantSpec, model_spec, weight_bytes
from engine.protocol import Done, Generate, Load, Token
from engine.routing_stats import RoutingRecorder, rounded
from engine.speculative import SpeculativeConfig
from engine.tokenizer import ChatTemplateError


def rss_bytes() -> int | None:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        try:
            import resource
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        except (ImportError, OSError):
            return None


class NativeBackend(Backend):
    name = "native"

    def __init__(self):
        self.pre: Pretrained | None = None
        self.request: Load | None = None

    def load(self, request: Load, progress: ProgressFn) -> dict:
        if request.device == "cuda" and not torch.cuda.is_available():
            raise BackendError("unsupported", "no CUDA device is available; load on the CPU instead")
        self.unload()
        try:
            quant = QuantSpec(request.quant) if request.quant else None
            self.pre = load_pretrained(request.path, device=request.device, dtype=request.dtype, progress=progress,
                                       quant=quant)
        except ModelLoadError as e:
            code = "not_found" if "not found" in e.reason or "no config.json" in e.reason else "load_failed"
            raise BackendError(code, str(e)) from e
        self.request = request
        return self.info()

    def info(self) -> dict:
        if self.pre is None:
            return {}
        model, cfg = self.pre.model, self.pre.cfg
        p = model.norm.weight  # never quantized: the model's device and compute dtype
        counts = model.param_counts()
        spec = model_spec(model)
        return {
            "name": self.pre.path.name, "path": str(self.pre.path), "backend": self.name,
            "device": str(p.device), "dtype": str(p.dtype).removeprefix("torch."),
            "quantization": spec.describe() if spec else None, "weight_bytes": weight_bytes(model)["model_bytes"],
            "parameters": counts["total"], "active_parameters": counts["active_per_token"],
            "memory_bytes": rss_bytes(),
            "gpu_memory_bytes": torch.cuda.memory_allocated(p.device) if p.is_cuda else None,
            "mtp_modules": len(model.mtp), "speculative_modes": ["off", "mtp"] if model.mtp else ["off"],
            "context_length": cfg.max_position_embeddings,
            "vocab_size": cfg.vocab_size, "model_type": cfg.model_type,
            "experts": cfg.n_routed_experts, "experts_per_token": cfg.num_experts_per_tok,
            "has_chat_template": bool(self.pre.tokenizer and self.pre.tokenizer.chat_template),
        }

    def prompt_ids(self, request: Generate) -> list[int]:
        messages = [{"role": m.role, "content": m.content} for m in request.messages]
        tok = self.pre.tokenizer
        if tok is None:
            raise BackendError("bad_request", "this model has no tokenizer.json, so it cannot take chat messages")
        try:
            if tok.chat_template:
                return tok.encode_chat(messages, request.continue_final_message)
            return tok.encode("\n".join(m["content"] for m in messages))
        except ChatTemplateError as e:
            raise BackendError("bad_request", str(e)) from e

    def generate(self, request: Generate, emit: EmitFn, cancelled: Callable[[], bool]) -> Done:
        if self.pre is None:
            raise BackendError("not_loaded", "no model is loaded")
        p, spec_req = request.params, request.params.speculative
        params = sampling_params(p)
        spec = None
        if spec_req.mode == "mtp":
            if not self.pre.model.mtp:
                raise BackendError("unsupported", "this model has no MTP modules; use speculative mode \"off\"")
            spec = SpeculativeConfig(k=spec_req.k)
        elif spec_req.mode != "off":
            raise BackendError("unsupported", f"speculative mode {spec_req.mode!r} needs the llama.cpp backend")
        ids = self.prompt_ids(request)
        from_draft = [False]
        # Routing statistics of the generated tokens: the first token comes right after the prompt's
        # prefill, whose rows are dropped then. With speculation the rows are the verification passes',
        # drafts later rejected included. Graphed CUDA steps go unrecorded (see RoutingRecorder).
        recorder = RoutingRecorder(self.pre.model)
        first_token = [True]

        def on_token(token: int, draft: bool) -> None:
            if first_token[0]:
                first_token[0] = False
                recorder.clear()
            from_draft[0] = draft

        def on_text(text: str) -> None:
            emit(Token(id=request.id, text=text, accepted=from_draft[0]))

        try:
            with recorder:
                result = generate(self.pre.model, ids, params, tokenizer=self.pre.tokenizer,
                                  eos_ids=self.pre.eos_ids, on_text=on_text, on_token=on_token,
                                  should_stop=cancelled, speculative=spec)
        except ValueError as e:  # prompt longer than the context, and the like
            raise BackendError("bad_request", str(e)) from e
        # Tokens per expert of the reply's tokens (the heatmap), from the same record: counting them in
        # every step would cost a bincount per layer per step.
        result.stats["expert_load"] = recorder.expert_load()
        if recorder.routers:  # per MoE layer: max/mean load, cv, entropy, expert union for k = 1..4
            result.stats["routing"] = rounded(recorder.summary(per_expert=False))
        return Done(id=request.id, finish_reason=result.finish_reason, text=result.text, stats=result.stats)

    def unload(self) -> None:
        if self.pre is not None:
            cuda = self.pre.model.norm.weight.is_cuda
            self.pre = None
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()

    def recover_from_oom(self) -> None:
        """After running out of memory mid-generation: drop the caches so the next request starts small."""
        if self.pre is not None:
            self.pre.model.max_seq_len = 0
            for block in [*self.pre.model.layers, *(m.block for m in self.pre.model.mtp)]:
                block.attn.cache = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
