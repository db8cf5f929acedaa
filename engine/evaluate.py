"""Perplexity of a text under a model, scored in windows of causal attention, and optionally the routing
statistics of the same passes (engine.routing_stats)."""
from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.pretrained import Pretrained
from engine.routing_stats import RoutingRecorder


def text_files(paths: list[str]) -> list[Path]:
    """Files as given, folders as the .txt files in them (sorted): one document each."""
    out = []
    for p in map(Path, paths):
        out += sorted(p.glob("*.txt")) if p.is_dir() else [p]
    if not out:
        raise ValueError(f"no .txt files in {', '.join(paths)}")
    return out


@torch.inference_mode()
def token_nll(model, ids: list[int], window: int, recorder: RoutingRecorder | None = None) -> tuple[float, int]:
    """Sum of next-token negative log-likelihoods and how many tokens were scored.

    Windows overlap by half so that every scored token (after the first window) sees at least
    window/2 tokens of context. recorder (attached to model): each window's routing is trimmed to the
    positions whose next token that window scores, so every position is counted once, with the context it
    was scored with, in text order; the recorder ends with as many rows as tokens were scored.
    """
    window = min(window, model.cfg.max_position_embeddings)
    device = model.norm.weight.device  # never quantized
    total, count, scored_to = 0.0, 0, 1  # ids[0] has no context and is never scored
    start = 0
    while scored_to < len(ids):
        chunk = torch.tensor([ids[start:start + window]], device=device)
        logp = F.log_softmax(model.logits(model(chunk)), dim=-1)[0]  # [T, V]
        targets = chunk[0, 1:]
        nll = -logp[:-1].gather(-1, targets[:, None])[:, 0]  # nll[i] scores ids[start+i+1]
        first = scored_to - start - 1
        total += float(nll[first:].sum())
        if recorder is not None:
            recorder.keep(slice(first, chunk.shape[1] - 1))  # the rows behind nll[first:]
        count += nll.shape[0] - first
        scored_to = start + chunk.shape[1]
        start = max(start + window // 2, scored_to - window // 2) if scored_to < len(ids) else scored_to
    return total, count


def perplexity(pre: Pretrained, text: str, window: int = 512, routing: bool = False) -> dict:
    """The text's score (see score_ids)."""
    if pre.tokenizer is None:
        raise ValueError("this model folder has no tokenizer.json")
    return score_ids(pre.model, pre.tokenizer.encode(text), window, routing)


def score_ids(model, ids: list[int], window: int = 512, routing: bool = False) -> dict:
    """{"perplexity", "nll_per_token", "tokens"} of token ids; routing=True adds "routing":
    RoutingRecorder.summary() of the scored positions (None for a model without MoE layers)."""
    if len(ids) < 2:
        raise ValueError("the text is too short to score (fewer than 2 tokens)")
    recorder = RoutingRecorder(model) if routing else None
    with recorder or contextlib.nullcontext():
        nll, n = token_nll(model, ids, window, recorder)
    res = {"perplexity": math.exp(nll / n), "nll_per_token": nll / n, "tokens": n}
    if recorder is not None:
        res["routing"] = recorder.summary()
    return res
