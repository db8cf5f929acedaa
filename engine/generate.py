"""Plain generation: prefill the prompt into the caches, then decode one token at a time.

The engine knows nothing of processes or protocols: callers stream through `on_text` / `on_token`
callbacks and cancel through `should_stop`, checked between decode steps.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch

from engine import cuda_graphs
from engine.expert_windows import ExpertWindows
from engine.model.transformer import Transformer
from engine.routing import balanced_online, online_balancing
from engine.sampling import (SamplingParams, apply_repetition_penalty, make_generator, probs_from_logits,
                             sample)
from engine.tokenizer import Tokenizer

if TYPE_CHECKING:
    from engine.speculative import SpeculativeConfig


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" | "length" | "cancelled"
    stats: dict = field(default_factory=dict)


class TextStream:
    """Generated ids → text chunks: whole UTF-8 characters only, stop strings cut and held back."""

    def __init__(self, tokenizer: Tokenizer | None, stop: list[str]):
        self.tokenizer = tokenizer
        self.decoder = tokenizer.decode_stream() if tokenizer else None
        self.stop = [s for s in stop if s]
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add a token; return the text that is now safe to show."""
        if self.decoder is None or self.stopped:
            return ""
        self.text += self.decoder.step(self.tokenizer.tok, token_id) or ""
        hit = min((i for s in self.stop if (i := self.text.find(s, max(0, self.emitted - len(s)))) >= 0),
                  default=-1)
        if hit >= 0:
            self.text, self.stopped = self.text[:hit], True
            return self.flush()
        hold = max((n for s in self.stop for n in range(1, len(s)) if self.text.endswith(s[:n])), default=0)
        chunk = self.text[self.emitted:len(self.text) - hold]
        self.emitted += len(chunk)
        return chunk

    def flush(self) -> str:
        chunk = self.text[self.emitted:]
        self.emitted = len(self.text)
        return chunk


def ensure_cache(model: Transformer, needed: int) -> None:
    if model.max_seq_len < needed:
        size = min(max(needed, 2 * model.max_seq_len, 256), model.cfg.max_position_embeddings)
        model.setup_caches(1, max(size, needed))


def context_budget(model: Transformer, n_prompt: int, max_tokens: int) -> int:
    """How many tokens may be generated after a prompt of n_prompt tokens."""
    limit = model.cfg.max_position_embeddings
    if n_prompt >= limit:
        raise ValueError(f"the prompt has {n_prompt} tokens; this model's context is {limit}")
    return min(max_tokens, limit - n_prompt)


class TokenPicker:
    """Sampling state for one request: settings, seeded generator, tokens seen for the penalty."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int], device: torch.device):
        self.params = params
        self.generator = make_generator(params.seed, device)
        self.seen = torch.tensor(prompt_ids, dtype=torch.long, device=device)

    def _penalized(self, logits: torch.Tensor, pending: list[int]) -> torch.Tensor:
        if self.params.repetition_penalty == 1.0:
            return logits
        seen = torch.cat([self.seen, self.seen.new_tensor(pending)]) if pending else self.seen
        return apply_repetition_penalty(logits, seen, self.params.repetition_penalty)

    def probs(self, logits: torch.Tensor, pending: list[int] = ()) -> torch.Tensor:
        """logits [V] → sampling distribution [V], as if `pending` tokens had been committed too."""
        return probs_from_logits(self._penalized(logits, list(pending)), self.params)

    def choose(self, logits: torch.Tensor, pending: list[int] = ()) -> int:
        """The next token after committed + pending tokens (argmax when greedy)."""
        if self.params.greedy:
            return int(self._penalized(logits, list(pending)).argmax())
        return int(sample(self.probs(logits, pending), self.generator))

    def commit(self, token: int) -> None:
        if self.params.repetition_penalty != 1.0:
            self.seen = torch.cat([self.seen, self.seen.new_tensor([token])])

    def pick(self, logits: torch.Tensor) -> int:
        token = self.choose(logits)
        self.commit(token)
        return token


class Emitter:
    """Takes generated tokens one at a time and decides when generation ends: the token budget,
    end-of-sequence ids, stop strings; streams through the callbacks and keeps timing."""

    def __init__(self, budget: int, tokenizer: Tokenizer | None, stop: list[str], eos_ids: tuple[int, ...],
                 on_text: Callable[[str], None] | None, on_token: Callable[[int, bool], None] | None):
        self.budget, self.eos_ids = budget, eos_ids
        self.stream = TextStream(tokenizer, stop)
        self.on_text, self.on_token = on_text, on_token
        self.tokens: list[int] = []
        self.finish = "length"
        self.t0 = time.perf_counter()
        self.t_first: float | None = None

    @property
    def remaining(self) -> int:
        return self.budget - len(self.tokens)

    def push(self, token: int, from_draft: bool = False) -> bool:
        """Record a token (from_draft: an accepted speculative draft); True when generation must end."""
        self.tokens.append(token)
        if self.t_first is None:
            self.t_first = time.perf_counter() - self.t0
        if self.on_token:
            self.on_token(token, from_draft)
        if token in self.eos_ids:
            self.finish = "stop"
            return True
        chunk = self.stream.push(token)
        if chunk and self.on_text:
            self.on_text(chunk)
        if self.stream.stopped:
            self.finish = "stop"
            return True
        return len(self.tokens) >= self.budget

    def close(self, n_prompt: int, t_prefill: float) -> GenerationResult:
        tail = self.stream.flush()
        if tail and self.on_text:
            self.on_text(tail)
        total = time.perf_counter() - self.t0
        n = len(self.tokens)
        decode_time = total - (self.t_first or total)
        stats = {
            "prompt_tokens": n_prompt,
            "generated_tokens": n,
            "time_to_first_token_s": self.t_first,
            "prefill_s": t_prefill,
            "prefill_tokens_per_s": n_prompt / t_prefill if t_prefill > 0 else None,
            "decode_tokens_per_s": (n - 1) / decode_time if n > 1 and decode_time > 0 else None,
            "total_s": total,
        }
        return GenerationResult(self.tokens, self.stream.text, self.finish, stats)


def decode_plain(model: Transformer, hidden: torch.Tensor, picker: TokenPicker, emitter: Emitter,
                 should_stop: Callable[[], bool] | None) -> dict:
    """One main-model step per token. hidden [1, P, H] is the prefilled prompt's.

    On CUDA each step is the graphed static step; picking the token is then the step's only host read."""
    pos = hidden.shape[1]
    logits = model.logits(hidden[:, -1])[0]
    device = hidden.device
    static = cuda_graphs.wants_static(device) and not online_balancing(model)
    while True:
        if should_stop and should_stop():
            emitter.finish = "cancelled"
            break
        token = picker.pick(logits)
        if emitter.push(token):
            break
        if static:
            logits = cuda_graphs.main_step(model, cuda_graphs.to_device([[token]], device), pos)[1][0, -1]
        else:
            logits = model.decode(torch.tensor([[token]], device=device), pos)[1][0, -1]
        pos += 1
    return {}


@torch.inference_mode()
def generate(model: Transformer, prompt_ids: list[int], params: SamplingParams,
             tokenizer: Tokenizer | None = None, eos_ids: tuple[int, ...] = (),
             on_text: Callable[[str], None] | None = None,
             on_token: Callable[[int, bool], None] | None = None,
             should_stop: Callable[[], bool] | None = None,
             speculative: "SpeculativeConfig | None" = None,
             online_balance: float | None = None) -> GenerationResult:
    """Prefill, then decode plainly or with MTP speculation (`speculative.mode == "mtp"`).

    online_balance γ (off by default): after every forward pass each main-model router moves its bias by
    γ toward balance, from that pass's expert loads (engine/routing.py). It changes routing, so it can
    change the output (greedy too, and speculative greedy output may then differ from plain) versus the
    checkpoint's bias; the bias is put back when the request ends. On CUDA it decodes without graphs."""
    if not online_balance:
        return _generate(model, prompt_ids, params, tokenizer, eos_ids, on_text, on_token, should_stop, speculative)
    with balanced_online(model, online_balance):
        result = _generate(model, prompt_ids, params, tokenizer, eos_ids, on_text, on_token, should_stop,
                           speculative)
    result.stats["online_balance"] = online_balance
    return result


def _generate(model, prompt_ids, params, tokenizer, eos_ids, on_text, on_token, should_stop,
              speculative) -> GenerationResult:
    from engine.speculative import decode_mtp, draft_room

    if not prompt_ids:
        raise ValueError("empty prompt")
    use_mtp = speculative is not None and speculative.mode == "mtp"
    if use_mtp and not model.mtp:
        raise ValueError("this model has no MTP modules; speculative mode 'mtp' needs them")
    device = model.norm.weight.device  # not the embedding's: a quantized one has no .weight
    budget = context_budget(model, len(prompt_ids), params.max_tokens)
    ensure_cache(model, len(prompt_ids) + budget + (draft_room(speculative) if use_mtp else 0))
    picker = TokenPicker(params, prompt_ids, device)
    emitter = Emitter(budget, tokenizer, params.stop, () if params.ignore_eos else eos_ids, on_text, on_token)
    hidden = model(torch.tensor([prompt_ids], device=device), 0)  # [1, P, H]
    t_prefill = time.perf_counter() - emitter.t0
    if budget == 0:
        return emitter.close(len(prompt_ids), t_prefill)
    with ExpertWindows(model) as meter, model.fixed_weights():
        if use_mtp:
            extra = decode_mtp(model, prompt_ids, hidden, picker, emitter, should_stop, speculative, meter)
        else:
            extra = decode_plain(model, hidden, picker, emitter, should_stop)
    result = emitter.close(len(prompt_ids), t_prefill)
    result.stats.update(extra)
    # the first token came from the prefill; the decode passes produced the rest
    result.stats.update(meter.summary(len(result.token_ids) - 1))
    return result
