"""What a routing change buys where expert bytes dominate: a replay.

The bundled model sits in the CPU cache, so a lower expert union per verification window hardly moves
its wall time. This measures the effect on weights that stream from memory instead, by replaying
routing traces:

1. trace: each model (before and after a routing change) decodes the same prompts with MTP k drafts
   (greedy); every verification pass's expert choices per MoE layer are recorded
   (engine/expert_windows.py), with the tokens the passes produced.
2. replay: V2-Lite-shaped routed experts (hidden 2048, intermediate 1408, bf16, random weights; 3 target
   experts per source expert, so top-2 of 8 becomes top-6 of 24 as in DeepSeek-V2-Lite) take each pass's
   choices, mapped layer by layer, through moedesk's MoE kernel (each chosen expert read once for all
   the pass's tokens). Passes of the two traces alternate, so machine drift falls on both.

Reported per trace: the median time of the routed experts of one verification (all mapped layers),
their bytes per step and per generated token, and time per generated token. This is a replay, not a
decode: attention, shared experts, the head and drafting are left out, and the acceptance is the traced
model's, not the target's.
"""
from __future__ import annotations

import statistics
import time

import torch

from engine.bench import BUILTIN_PROMPTS, prompt_ids
from engine.expert_windows import ExpertWindows
from engine.generate import generate
from engine.pretrained import Pretrained
from engine.sampling import SamplingParams
from engine.speculative import SpeculativeConfig
from kernels import cpu

HIDDEN, INTER, SPREAD = 2048, 1408, 3  # V2-Lite's expert shape; target experts per source expert


def trace(pre: Pretrained, k: int = 3, max_tokens: int = 128, prompts=BUILTIN_PROMPTS) -> dict:
    """{"passes": [per pass: [per MoE layer: ids [rows, top_k]]], "tokens": produced by the passes}."""
    passes, tokens = [], 0
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    for prompt in prompts:
        meter = ExpertWindows(pre.model)
        with meter:
            result = generate(pre.model, prompt_ids(pre, prompt), params, eos_ids=pre.eos_ids,
                              speculative=SpeculativeConfig(k=k))
        recorded = [list(layer) for layer in zip(*meter.recorded)]  # the prompt's prefill, then the passes
        steps = result.stats["verify_steps"] + result.stats["plain_steps"]
        assert len(recorded) == steps + 1, (len(recorded), steps)
        passes += recorded[1:]
        tokens += len(result.token_ids) - 1
    return {"passes": passes, "tokens": tokens, "experts": pre.cfg.n_routed_experts}


def target_experts(n_layers: int, n_experts: int, hidden: int, inter: int, seed: int = 0) -> list[tuple]:
    """(gate_up [E, 2I, H], down [E, H, I]) bf16 per layer, E = n_experts · SPREAD."""
    g = torch.Generator().manual_seed(seed)
    E = n_experts * SPREAD
    return [((torch.randn(E, 2 * inter, hidden, generator=g) * 0.02).bfloat16(),
             (torch.randn(E, hidden, inter, generator=g) * 0.02).bfloat16()) for _ in range(n_layers)]


def mapped(ids: torch.Tensor) -> torch.Tensor:
    """Source expert e → target experts SPREAD·e … SPREAD·e + SPREAD − 1: ids [rows, k] → [rows, SPREAD·k]."""
    return (ids.long()[:, :, None] * SPREAD + torch.arange(SPREAD)).flatten(1)


def replay_pass(layers, choices: list[torch.Tensor], x: torch.Tensor) -> tuple[float, int]:
    """One verification's routed experts on the target weights: (seconds, distinct experts read)."""
    e, distinct = cpu.empty(), 0
    t0 = time.perf_counter()
    for (gate_up, down), ids in zip(layers, choices):
        ids = mapped(ids)
        w = torch.full(ids.shape, 1.0 / ids.shape[1])
        torch.ops.moedesk.moe(x[:ids.shape[0]], ids, w, gate_up, e, e, down, e, e, cpu.FORMATS["bf16"], 0)
        distinct += int(ids.unique().numel())
    return time.perf_counter() - t0, distinct


def replay(traces: dict[str, dict], n_layers: int = 4, hidden: int = HIDDEN, inter: int = INTER, seed: int = 0) -> dict:
    """Both traces' passes, alternating, on n_layers target MoE layers fed by source layers spread over
    the source model's depth."""
    if not cpu.available():
        raise RuntimeError("the replay times moedesk's CPU MoE kernel: build it first (python -m kernels.cpu)")
    n_src = len(next(iter(traces.values()))["passes"][0])
    pick = [round(i * (n_src - 1) / max(n_layers - 1, 1)) for i in range(n_layers)]
    n_experts = next(iter(traces.values()))["experts"]
    layers = target_experts(n_layers, n_experts, hidden, inter, seed)
    expert_bytes = 3 * inter * hidden * 2
    x = torch.randn(16, hidden, generator=torch.Generator().manual_seed(seed + 1))
    times: dict[str, list[float]] = {name: [] for name in traces}
    reads: dict[str, list[int]] = {name: [] for name in traces}
    longest = max(len(t["passes"]) for t in traces.values())
    for i in range(longest):
        for name, t in traces.items():
            if i < len(t["passes"]):
                s, d = replay_pass(layers, [t["passes"][i][j] for j in pick], x)
                times[name].append(s)
                reads[name].append(d)
    out = {"target": {"hidden": hidden, "intermediate": inter, "experts": n_experts * SPREAD, "dtype": "bf16",
                      "layers": n_layers, "source_layers": pick, "expert_bytes": expert_bytes}}
    for name, t in traces.items():
        steps, tokens = len(t["passes"]), t["tokens"]
        total_bytes = sum(reads[name]) * expert_bytes
        out[name] = {"verify_steps": steps, "tokens": tokens, "tokens_per_step": tokens / steps,
                     "median_step_s": statistics.median(times[name]),
                     "experts_per_layer_step": sum(reads[name]) / (steps * n_layers),
                     "bytes_per_step": total_bytes / steps, "bytes_per_token": total_bytes / tokens,
                     "seconds_per_token": sum(times[name]) / tokens,
                     "read_bytes_per_s": total_bytes / sum(times[name])}
    return out


def format_replay(r: dict) -> str:
    names = [n for n in r if n != "target"]
    t = r["target"]
    rows = [("verification passes", "verify_steps", "{:d}"), ("tokens per pass", "tokens_per_step", "{:.2f}"),
            ("experts per layer per pass", "experts_per_layer_step", "{:.2f}"),
            ("routed experts, ms per pass (median)", "median_step_s", "ms"),
            ("MiB per pass", "bytes_per_step", "mib"), ("MiB per token", "bytes_per_token", "mib"),
            ("ms per token (experts)", "seconds_per_token", "ms"), ("GB/s read", "read_bytes_per_s", "gbs")]

    def f(v, how):
        return {"ms": f"{v * 1e3:.2f}", "mib": f"{v / 2**20:.1f}", "gbs": f"{v / 1e9:.1f}"}.get(how) or how.format(v)
    lines = [f"replay on {t['layers']} V2-Lite-shaped MoE layers ({t['experts']} experts, {t['dtype']}), "
             f"source layers {t['source_layers']}",
             f"{'':<38}" + "".join(f"{n:>14}" for n in names)]
    for label, key, how in rows:
        lines.append(f"{label:<38}" + "".join(f"{f(r[n][key], how):>14}" for n in names))
    return "\n".join(lines)
