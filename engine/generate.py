"""Plain generation: prefill the prompt into the caches, then decode one token at a time.

The engine knows nothing of processes or protocols: callers stream through `on_text` / `on_token`
callbacks and cancel through `should_stop`, checked between decode steps.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from engine.model.transformer import Transformer
from engine.sampling import (SamplingParams, apply_repetition_penalty, make_generator, probs_from_logits,
                             sample)
from engine.tokenizer import Tokenizer


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

    def probs(self, logits: torch.Tensor, seen: torch.Tensor | None = None) -> torch.Tensor:
        """logits [V] → sampling distribution [V]."""
        logits = apply_repetition_penalty(logits, self.seen if seen is None else seen,
                                          self.params.repetition_penalty)
        return probs_from_logits(logits, self.params)

    def pick(self, logits: torch.Tensor) -> int:
        if self.params.greedy and self.params.repetition_penalty == 1.0:
            token = int(logits.argmax())
        elif self.params.greedy:
            token = int(apply_repetition_penalty(logits, self.seen, self.params.repetition_penalty).argmax())
        else:
            token = int(sample(self.probs(logits), self.generator))
        self.seen = torch.cat([self.seen, self.seen.new_tensor([token])])
        return token


@torch.inference_mode()
def generate(model: Transformer, prompt_ids: list[int], params: SamplingParams,
             tokenizer: Tokenizer | None = None, eos_ids: tuple[int, ...] = (),
             on_text: Callable[[str], None] | None = None,
             on_token: Callable[[int], None] | None = None,
             should_stop: Callable[[], bool] | None = None) -> GenerationResult:
    if not prompt_ids:
        raise ValueError("empty prompt")
    device = model.embed.weight.device
    budget = context_budget(model, len(prompt_ids), params.max_tokens)
    ensure_cache(model, len(prompt_ids) + budget)
    picker = TokenPicker(params, prompt_ids, device)
    stream = TextStream(tokenizer, params.stop)
    out: list[int] = []
    finish = "length"

    t0 = time.perf_counter()
    tokens = torch.tensor([prompt_ids], device=device)
    logits = model.logits(model(tokens, 0)[:, -1])[0]
    pos = len(prompt_ids)
    t_prefill = time.perf_counter() - t0
    t_first = None
    while len(out) < budget:
        if should_stop and should_stop():
            finish = "cancelled"
            break
        token = picker.pick(logits)
        out.append(token)
        if t_first is None:
            t_first = time.perf_counter() - t0
        if on_token:
            on_token(token)
        if token in eos_ids:
            finish = "stop"
            break
        chunk = stream.push(token)
        if chunk and on_text:
            on_text(chunk)
        if stream.stopped:
            finish = "stop"
            break
        if len(out) == budget:
            break
        logits = model.logits(model(torch.tensor([[token]], device=device), pos))[0, -1]
        pos += 1
    tail = stream.flush()
    if tail and on_text:
        on_text(tail)
    total = time.perf_counter() - t0
    decode_time = total - (t_first or total)
    stats = {
        "prompt_tokens": len(prompt_ids),
        "generated_tokens": len(out),
        "time_to_first_token_s": t_first,
        "prefill_s": t_prefill,
        "prefill_tokens_per_s": len(prompt_ids) / t_prefill if t_prefill > 0 else None,
        "decode_tokens_per_s": (len(out) - 1) / decode_time if len(out) > 1 and decode_time > 0 else None,
        "total_s": total,
    }
    return GenerationResult(out, stream.text, finish, stats)
