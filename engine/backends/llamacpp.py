"""The llama.cpp backend: a GGUF model through llama-cpp-python's C bindings, decoded by moedesk.

llama.cpp evaluates, moedesk decides. We call llama_decode and read the logits ourselves rather than
use Llama.generate, because
- sampling must follow the protocol's settings the way the native backend applies them (temperature,
  then top-k / top-p / min-p: engine/sampling.py through TokenPicker); llama.cpp's sampler chain cuts
  before the temperature, which is another distribution;
- speculation needs the logits at every verified position, an exact cache rollback and acceptance
  figures, none of which Llama.generate gives;
- the high-level Llama() cannot load a model's MTP layers (llama_model_params.load_mtp).

The worker imports this module only when a "llamacpp" load arrives, so llama_cpp is never loaded
otherwise. llama.cpp aborts the process on some malformed files; that is one reason it runs in the
worker, whose death the app survives.
"""
from __future__ import annotations

import codecs
import os
import time
from pathlib import Path
from typing import Callable

import gguf
import llama_cpp
import numpy as np
import torch

from engine.backends.base import Backend, BackendError, EmitFn, ProgressFn, sampling_params
from engine.backends.llamacpp_runtime import Context, GGUFModel, check_gguf, nextn
from engine.backends.native import rss_bytes
from engine.generate import Emitter, GenerationResult, TokenPicker
from engine.protocol import Done, Generate, Load, Token
from engine.sampling import SamplingParams
from engine.speculative import DraftLength, SpecStats, SpeculativeConfig, commit, propose, verify
from engine.tokenizer import ChatTemplateError, Tokenizer

MAX_CONTEXT = 8192  # llama.cpp allocates the whole KV cache up front; longer models are capped here
NGRAM = 3  # prompt lookup matches the last 3, 2, then 1 tokens
CPU = torch.device("cpu")


# ---- text ----

class PieceStream:
    """engine.generate.TextStream's decoder for llama.cpp tokens: pieces are bytes, and a UTF-8
    character may span tokens, so bytes wait until their character is whole."""

    def __init__(self):
        self.utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def step(self, model: GGUFModel, token: int) -> str:
        return self.utf8.decode(model.piece(token))


class GGUFText:
    """What TextStream asks of a tokenizer (`decode_stream()`, and `tok` handed back to `step`), and
    what engine.tokenizer.Tokenizer asks when it only renders the chat template (`token_to_id`)."""

    def __init__(self, model: GGUFModel):
        self.tok = model
        self.specials: dict[str, str] = {}  # "bos_token" / "eos_token" → its text, for the template
        self.ids: dict[str, int] = {}
        for key, tid in (("bos_token", llama_cpp.llama_vocab_bos(model.vocab)),
                         ("eos_token", llama_cpp.llama_vocab_eos(model.vocab))):
            if tid >= 0:
                self.specials[key] = model.token_text(tid).decode("utf-8", "replace")
                self.ids[self.specials[key]] = tid

    def decode_stream(self) -> PieceStream:
        return PieceStream()

    def token_to_id(self, text: str) -> int | None:
        return self.ids.get(text)


def chat_renderer(model: GGUFModel, text: GGUFText) -> Tokenizer | None:
    """The GGUF's tokenizer.chat_template in our sandboxed Jinja environment (engine/tokenizer.py)."""
    template = llama_cpp.llama_model_chat_template(model.ptr, None)
    return Tokenizer(text, dict(text.specials), template.decode("utf-8", "replace")) if template else None


# ---- drafters ----

class Drafter:
    """Proposes k tokens after the committed ones; the target verifies them (see `decode`)."""

    def begin(self, ids: list[int]) -> int:
        """A request starts: how much of the target's cached prefix it may keep."""
        return len(ids)

    def end(self) -> None:
        """The request is over."""

    def draft(self, tokens: list[int], k: int, picker: TokenPicker) -> tuple[list[int], list]:
        """→ (drafts, their distributions q: None when greedy)."""
        raise NotImplementedError


class LookupDrafter(Drafter):
    """Prompt lookup decoding: find the latest earlier occurrence of the text's last n tokens
    (n = NGRAM..1) and propose what followed it. The draft is deterministic, so its q is a point mass:
    speculative sampling then keeps a draft d with probability p(d) and otherwise samples from p
    without d, which leaves the output distributed as p."""

    def __init__(self, n_vocab: int):
        self.n_vocab = n_vocab

    def draft(self, tokens: list[int], k: int, picker: TokenPicker) -> tuple[list[int], list]:
        seq = np.asarray(tokens)
        drafts: list[int] = []
        for n in range(min(NGRAM, len(seq) - 1), 0, -1):
            windows = np.lib.stride_tricks.sliding_window_view(seq[:-1], n)  # every earlier n-gram
            hits = np.flatnonzero((windows == seq[-n:]).all(axis=1))
            if hits.size:
                start = int(hits[-1]) + n
                drafts = seq[start:start + k].tolist()
                break
        if picker.params.greedy:
            return drafts, [None] * len(drafts)
        return drafts, [torch.nn.functional.one_hot(torch.tensor(d), self.n_vocab).float() for d in drafts]


class ModelDrafter(Drafter):
    """A second GGUF with the same vocabulary drafts autoregressively in its own context."""

    def __init__(self, ctx: Context):
        self.ctx = ctx

    def draft(self, tokens: list[int], k: int, picker: TokenPicker) -> tuple[list[int], list]:
        ctx = self.ctx
        ctx.rewind(min(ctx.common_prefix(tokens), len(tokens) - 1))  # keep what it has seen of the text
        ctx.extend(tokens[len(ctx.tokens):])
        drafts, qs = [], []
        for j in range(k):
            propose(ctx.logits(), picker, drafts, qs)
            if j + 1 < k:
                ctx.extend(drafts[-1:])
        return drafts, qs


class MTPDrafter(Drafter):
    """The model's own MTP layer, run by llama.cpp's MTP graph in a context of its own.

    Its entry at position p is token p with the target's hidden state at p-1 and predicts token p+1;
    position 0 has none, as in DeepSeek's MTP (an entry there with a zero state would be attended by all
    later ones). An entry is final once token p is committed. Each round first feeds the entries that
    became final, the newest committed token's last; drafts after the first chain the layer on its own
    output state, which llama.cpp gives after the shared head norm (it gives the target's after the
    final norm, as DeepSeek's MTP takes it). Only the first nextn layer is used."""

    def __init__(self, ctx: Context, target: Context):
        self.ctx, self.target = ctx, target
        self.final = 0  # the leading positions of ctx whose entries are final (0 counts, having none)

    def begin(self, ids: list[int]) -> int:
        """The target records its hidden states for this request. The entries still to feed need the
        state before them, so the target's cache is kept only up to the first of those."""
        self.target.keep_states(True)
        return max(min(self.ctx.common_prefix(ids), self.final) - 1, 0)

    def end(self) -> None:
        self.target.keep_states(False)

    def draft(self, tokens: list[int], k: int, picker: TokenPicker) -> tuple[list[int], list]:
        ctx, N = self.ctx, len(tokens) - 1
        start = min(ctx.common_prefix(tokens), self.final, N)  # entry N (the newest token) is always fed
        ctx.rewind(start)
        if not ctx.tokens:
            ctx.tokens.append(tokens[0])
            start = 1
        states = self.target.states
        ctx.extend(tokens[start:N + 1], states=np.stack([states[p - 1] for p in range(start, N + 1)]))
        self.final = N + 1
        for p in [p for p in states if p < N - 1]:  # consumed; N-1 stays should entry N be fed again
            del states[p]
        drafts, qs = [], []
        for j in range(k):
            propose(ctx.logits(), picker, drafts, qs)
            if j + 1 < k:
                ctx.extend(drafts[-1:], states=ctx.output_state()[None])
        return drafts, qs


def vocab_mismatch(target: GGUFModel, draft: GGUFModel) -> str | None:
    """Why the draft cannot propose tokens for the target, or None: same size, same text per id."""
    if target.n_vocab != draft.n_vocab:
        return f"its vocabulary has {draft.n_vocab} tokens, the model's has {target.n_vocab}"
    for t in range(target.n_vocab):
        if target.token_text(t) != draft.token_text(t):
            return (f"token {t} is {draft.token_text(t).decode('utf-8', 'replace')!r} in the draft but "
                    f"{target.token_text(t).decode('utf-8', 'replace')!r} in the model")
    return None


# ---- decoding ----

def prefill(ctx: Context, ids: list[int], keep: int, should_stop: Callable[[], bool]) -> torch.Tensor | None:
    """Bring the cache to the prompt, reusing up to `keep` tokens of the prefix it holds (the previous
    turn of a chat); the logits after the prompt, or None if stopped."""
    ctx.rewind(min(ctx.common_prefix(ids), keep, len(ids) - 1))  # at least one token to get logits from
    if not ctx.extend(ids[len(ctx.tokens):], should_stop=should_stop):
        return None
    return ctx.logits()


def decode(ctx: Context, tokens: list[int], picker: TokenPicker, emitter: Emitter,
           should_stop: Callable[[], bool], drafter: Drafter | None = None,
           control: DraftLength | None = None) -> dict:
    """Generate after `tokens` (the prompt and the first token, which the cache has not seen yet).

    Each step feeds the newest token and any drafts in one llama_decode, verifies the drafts against
    those logits (engine/speculative.verify: greedy keeps a draft while it equals the argmax, sampling
    uses the min(1, p/q) test with the residual), rolls the cache back past the first rejected draft and
    commits the kept drafts plus the target's own next token. Without a drafter every step is plain.
    Greedy speculative output is plain output: a k+1-token batch rounds like single steps in Q8_0 and
    within ~1e-6 in F32 (llama.cpp picks kernels by batch size), which only a logit tie could expose."""
    stats = SpecStats()
    done = False
    while not done:
        if should_stop():
            emitter.finish = "cancelled"
            break
        N = len(tokens) - 1
        k = control.choose(min(emitter.remaining - 1, ctx.n_ctx - N - 1)) if drafter else 0
        t0 = time.perf_counter()
        drafts, qs = drafter.draft(tokens, k, picker) if k else ([], [])
        t1 = time.perf_counter()
        ctx.extend([tokens[N], *drafts], all_logits=True)
        logits = torch.stack([ctx.logits(i) for i in range(len(drafts) + 1)])  # [k+1, V]
        accepted, bonus = verify(logits, drafts, qs, picker)
        ctx.rewind(N + 1 + accepted)
        t2 = time.perf_counter()
        done = commit(drafts[:accepted] + [bonus], tokens, picker, emitter)
        if drafter:
            control.observe(len(drafts), accepted, time.perf_counter() - t0, t1 - t0)
            stats.record(len(drafts), accepted, t1 - t0, t2 - t1)
    return stats.as_dict() if drafter else {}


# ---- the backend ----

def cpu_threads() -> tuple[int, int]:
    """(decode, batch) threads: decoding is memory-bound and does best on about one thread per
    physical core (half the logical CPUs, llama-cpp-python's default); batches use them all.
    MOEDESK_LLAMA_THREADS sets both: on a busy machine llama.cpp's OpenMP barriers stall whenever one
    of its threads is descheduled, so there fewer threads are faster."""
    if os.environ.get("MOEDESK_LLAMA_THREADS"):
        n = max(1, int(os.environ["MOEDESK_LLAMA_THREADS"]))
        return n, n
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, n // 2), n


def file_type_name(model: GGUFModel) -> str:
    ftype = llama_cpp.llama_model_ftype(model.ptr) & ~1024  # LLAMA_FTYPE_GUESSED
    try:
        return gguf.LlamaFileType(ftype).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except ValueError:
        return f"ftype {ftype}"


class LlamaCppBackend(Backend):
    name = "llamacpp"

    def __init__(self):
        self.model: GGUFModel | None = None
        self.ctx: Context | None = None
        self.mtp_drafter: MTPDrafter | None = None
        self.draft_model: GGUFModel | None = None
        self.draft_ctx: Context | None = None
        self.arch = ""
        self.gpu = False
        self.controls: dict[tuple, DraftLength] = {}

    # ---- loading ----

    def load(self, request: Load, progress: ProgressFn) -> dict:
        self.unload()
        if request.quant or request.dtype:
            raise BackendError("unsupported", "a GGUF file carries its own quantization; choose another file "
                                              "rather than quant or dtype")
        path = Path(request.path).expanduser()
        self.arch = check_gguf(path)
        draft_path = Path(request.draft).expanduser() if request.draft else None
        if draft_path:
            check_gguf(draft_path, "draft model")
        self.gpu = bool(llama_cpp.llama_supports_gpu_offload()) and request.device != "cpu"
        if request.device == "cuda" and not self.gpu:
            raise BackendError("unsupported", "this llama.cpp build has no GPU support; load on the CPU instead")
        share = 0.8 if draft_path else 1.0
        # load_mtp reads the nextn layers of a file that has them (one more layer) so MTP can draft
        self.model = GGUFModel(path, -1 if self.gpu else 0, nextn is not None,
                               lambda f: progress("loading", f * share))
        n_ctx = min(llama_cpp.llama_model_n_ctx_train(self.model.ptr) or MAX_CONTEXT, MAX_CONTEXT)
        self.ctx = Context(self.model, n_ctx, cpu_threads(), self.gpu)
        if draft_path:
            self.load_draft(draft_path, lambda f: progress("loading draft", share + (1 - share) * f))
        self.text = GGUFText(self.model)
        self.chat = chat_renderer(self.model, self.text)
        self.eog = self.model.end_of_generation_ids()
        progress("ready", 1.0)
        return self.info()

    def mtp_unavailable(self) -> str | None:
        """Why speculative mode "mtp" cannot run on this model, or None."""
        if nextn is None:
            return "this llama-cpp-python build does not bind llama.cpp's MTP calls"
        layers = llama_cpp.llama_model_n_layer_nextn(self.model.ptr)
        if not layers:
            return "this GGUF has no MTP (nextn) layers; use speculative mode \"lookup\" or \"draft\""
        if layers != 1:  # deepseek2's MTP graph asserts one block: its context would abort the worker
            return f"llama.cpp runs MTP with exactly one nextn layer; this GGUF has {layers}"
        return None

    def mtp(self) -> MTPDrafter:
        """The MTP drafter, its context made on first use (its KV cache costs memory only when used),
        then kept: its cache carries over to the next request like the target's."""
        if self.mtp_drafter is None:
            why = self.mtp_unavailable()
            if why:
                raise BackendError("unsupported", why)
            ctx = Context(self.model, self.ctx.n_ctx, cpu_threads(), self.gpu, mtp=True)
            self.mtp_drafter = MTPDrafter(ctx, self.ctx)
        return self.mtp_drafter

    def load_draft(self, path: Path, progress: Callable[[float], None]) -> None:
        self.draft_model = GGUFModel(path, -1 if self.gpu else 0, False, progress)
        why = vocab_mismatch(self.model, self.draft_model)
        if why:
            raise BackendError("incompatible_draft", f"{path.name} cannot draft for {self.model.path.name}: "
                                                     f"{why}; a draft model needs the same tokenizer")
        self.draft_ctx = Context(self.draft_model, self.ctx.n_ctx, cpu_threads(), self.gpu)

    def info(self) -> dict:
        if self.model is None:
            return {}
        m = self.model
        experts = m.meta(f"{self.arch}.expert_count")
        used = m.meta(f"{self.arch}.expert_used_count")
        modes = ["off", "lookup"] + (["draft"] if self.draft_ctx else []) + ([] if self.mtp_unavailable() else ["mtp"])
        return {
            "name": m.path.name, "path": str(m.path), "backend": self.name, "architecture": self.arch,
            "model_type": self.arch, "description": m.meta("general.name"),
            "quantization": file_type_name(m), "device": "gpu" if self.gpu else "cpu", "gpu_offload": self.gpu,
            "parameters": llama_cpp.llama_model_n_params(m.ptr), "weight_bytes": llama_cpp.llama_model_size(m.ptr),
            "memory_bytes": rss_bytes(), "context_length": self.ctx.n_ctx,
            "context_length_trained": llama_cpp.llama_model_n_ctx_train(m.ptr), "vocab_size": m.n_vocab,
            "experts": int(experts) if experts else None, "experts_per_token": int(used) if used else None,
            "mtp_modules": llama_cpp.llama_model_n_layer_nextn(m.ptr), "has_chat_template": self.chat is not None,
            "draft": self.draft_model.path.name if self.draft_model else None,
            "speculative_modes": modes, "threads": list(cpu_threads()),
        }

    # ---- generation ----

    def prompt_ids(self, request: Generate) -> list[int]:
        messages = [{"role": m.role, "content": m.content} for m in request.messages]
        try:
            if self.chat:  # the rendered template writes its own bos and special tokens
                text = self.chat.render_chat(messages, continue_final_message=request.continue_final_message)
                ids = self.model.tokenize(text, add_special=False, parse_special=True)
            else:
                ids = self.model.tokenize("\n".join(m["content"] for m in messages), True, False)
        except ChatTemplateError as e:
            raise BackendError("bad_request", str(e)) from e
        if not ids:
            raise BackendError("bad_request", "the prompt is empty")
        if len(ids) >= self.ctx.n_ctx:
            raise BackendError("bad_request", f"the prompt has {len(ids)} tokens; the context is {self.ctx.n_ctx}")
        return ids

    def drafter(self, mode: str, k):
        """The drafter and draft-length controller for a speculative mode (None, None when off)."""
        if mode == "off":
            return None, None
        if mode == "lookup":
            drafter = LookupDrafter(self.model.n_vocab)
        elif mode == "draft":
            if self.draft_ctx is None:
                raise BackendError("unsupported", "speculative mode \"draft\" needs a draft model: load one "
                                                  "with the model (Load.draft)")
            drafter = ModelDrafter(self.draft_ctx)
        else:
            drafter = self.mtp()
        # One controller per mode and k, kept across requests: what it measured still holds.
        control = self.controls.setdefault((mode, k), DraftLength(SpeculativeConfig(k=k)))
        return drafter, control

    def generate(self, request: Generate, emit: EmitFn, cancelled: Callable[[], bool]) -> Done:
        if self.model is None:
            raise BackendError("not_loaded", "no model is loaded")
        p, spec = request.params, request.params.speculative
        params = sampling_params(p)
        ids = self.prompt_ids(request)
        from_draft = [False]

        def on_token(token: int, draft: bool) -> None:
            from_draft[0] = draft

        def on_text(text: str) -> None:
            emit(Token(id=request.id, text=text, accepted=from_draft[0]))

        result = self.generate_ids(ids, params, spec.mode, spec.k, on_text, on_token, cancelled)
        return Done(id=request.id, finish_reason=result.finish_reason, text=result.text, stats=result.stats)

    def generate_ids(self, ids: list[int], params: SamplingParams, mode: str = "off", k: int | str = "auto",
                     on_text=None, on_token=None, cancelled: Callable[[], bool] = lambda: False,
                     reuse_prefix: bool = True) -> GenerationResult:
        """Token ids in, a GenerationResult out (what engine.generate.generate returns for native models):
        the request path above and `engine bench`. reuse_prefix=False prefills the whole prompt even
        when the cache holds it, as a benchmark wants."""
        drafter, control = self.drafter(mode, k)
        emitter = Emitter(min(params.max_tokens, self.ctx.n_ctx - len(ids)), self.text, params.stop,
                          () if params.ignore_eos else self.eog, on_text, on_token)
        keep = drafter.begin(ids) if drafter else len(ids)
        try:
            stats = self.run(ids, TokenPicker(params, ids, CPU), emitter, cancelled, drafter, control,
                             keep if reuse_prefix else 0)
        finally:
            if drafter:
                drafter.end()
        if mode != "off":
            stats["speculative"] = mode
        if mode == "draft":
            stats["draft_model"] = self.draft_model.path.name
        return GenerationResult(list(emitter.tokens), emitter.stream.text, emitter.finish, stats)

    def run(self, ids: list[int], picker: TokenPicker, emitter: Emitter, cancelled: Callable[[], bool],
            drafter, control: DraftLength | None, keep: int) -> dict:
        """Prefill, the first token, then decoding → the stats."""
        cached = min(self.ctx.common_prefix(ids), keep, len(ids) - 1)
        logits = prefill(self.ctx, ids, keep, cancelled)
        t_prefill = time.perf_counter() - emitter.t0
        extra = {}
        if logits is None:
            emitter.finish = "cancelled"
        else:
            tokens = ids + [picker.pick(logits)]
            if not emitter.push(tokens[-1]):
                extra = decode(self.ctx, tokens, picker, emitter, cancelled, drafter, control)
        stats = emitter.close(len(ids), t_prefill).stats
        stats.update(extra, cached_prompt_tokens=cached)
        if cached:  # the prefill computed only the tokens after the cached prefix
            stats["prefill_tokens_per_s"] = (len(ids) - cached) / t_prefill if t_prefill > 0 else None
        return stats

    def unload(self) -> None:
        # contexts before their models: a context refers to its model
        mtp_ctx = self.mtp_drafter.ctx if self.mtp_drafter else None
        for obj in (self.draft_ctx, mtp_ctx, self.ctx, self.draft_model, self.model):
            if obj is not None:
                obj.free()
        self.model = self.ctx = self.draft_model = self.draft_ctx = self.mtp_drafter = None
        self.controls.clear()
