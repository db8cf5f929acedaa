"""The routed-expert bytes each decode pass reads: distinct experts per MoE layer in the pass's window
(one token for a plain step, last token + k drafts for a verification) × one expert's bytes at the
weights' real precision (int8/int4 with their scales, FP8 with its block scales).

When the model does not fit in cache this is what a verification costs beyond a plain step: k+1 tokens
read the union of their experts, not top_k of them. Reported per request (`done.stats`, `engine bench`,
the app's reply details) as:
  expert_bytes_per_step   mean over decode passes of Σ_layers distinct experts × bytes per expert
  expert_bytes_per_token  all passes' expert bytes over the tokens they produced
  experts_per_layer_step  mean distinct experts per layer per pass (top_k for a plain step)
Shared experts and attention are left out: every pass reads them once, however many tokens it verifies.

Each main-model router appends its choices to `Router.windows` while a meter listens; nothing is
computed until `summary`. Graphed CUDA steps run no Python and go unmeasured (the figures are None).
"""
from __future__ import annotations

import torch

from engine.model.linear import read_bytes
from engine.routing import Router


def expert_bytes(experts: torch.nn.Module, n_experts: int) -> int:
    """Bytes of one routed expert: the layer's stacked weights (and scales) over its expert count."""
    tensors = list(experts.parameters(recurse=False)) + list(experts.buffers(recurse=False))
    return sum(read_bytes(t) for t in tensors) // n_experts


def union_sizes(windows: list[torch.Tensor], n_experts: int) -> torch.Tensor:
    """Per pass, the number of distinct experts its ids [rows, top_k] name → [passes] (int64)."""
    if not windows:
        return torch.zeros(0, dtype=torch.long)
    ids = torch.cat([w.reshape(-1).long().cpu() for w in windows])
    rows = torch.repeat_interleave(torch.arange(len(windows)), torch.tensor([w.numel() for w in windows]))
    chosen = torch.zeros(len(windows), n_experts, dtype=torch.bool)
    chosen[rows, ids] = True
    return chosen.sum(-1)


class ExpertWindows:
    """with ExpertWindows(model) as meter: <decode passes>; then meter.summary(tokens) (module docstring)."""

    def __init__(self, model: torch.nn.Module):
        layers = [b.ffn for b in model.layers if isinstance(getattr(b.ffn, "router", None), Router)]
        self.routers = [f.router for f in layers]
        self.bytes = [expert_bytes(f.experts, f.router.n_experts) for f in layers]
        self.bytes_per_layer = torch.tensor(self.bytes, dtype=torch.float64)
        self.recorded: list[list[torch.Tensor]] = [[] for _ in layers]

    def __enter__(self) -> "ExpertWindows":
        # Nested meters share the routers' lists: each keeps what was appended while it was open.
        self.owner = [r.windows is None for r in self.routers]
        for r, own in zip(self.routers, self.owner):
            if own:
                r.windows = []
        self.start = [len(r.windows) for r in self.routers]
        return self

    def __exit__(self, *exc) -> None:
        self.recorded = [r.windows[a:] for r, a in zip(self.routers, self.start)]
        for r, own in zip(self.routers, self.owner):
            if own:
                r.windows = None

    def last_bytes(self) -> float | None:
        """The newest pass's routed-expert bytes (None before any, or where passes go unmeasured)."""
        if not self.routers or not self.routers[0].windows:
            return None
        if self.routers[0].windows[-1].numel() == self.routers[0].top_k:  # one token: top_k experts everywhere
            return float(sum(r.top_k * b for r, b in zip(self.routers, self.bytes)))
        ids = torch.stack([r.windows[-1].reshape(-1) for r in self.routers]).tolist()  # [L, rows·k]: one read
        return float(sum(len(set(row)) * b for row, b in zip(ids, self.bytes)))

    def summary(self, tokens: int) -> dict:
        """tokens: what the recorded passes produced (accepted drafts and the main model's own tokens)."""
        out = {"expert_bytes_per_step": None, "expert_bytes_per_token": None, "experts_per_layer_step": None}
        if not self.routers or not self.recorded[0]:
            return out  # no MoE layer, no decode pass, or graphed steps
        sizes = torch.stack([union_sizes(w, r.n_experts) for w, r in zip(self.recorded, self.routers)])
        per_pass = (sizes * self.bytes_per_layer[:, None]).sum(0)  # [passes]
        out["expert_bytes_per_step"] = float(per_pass.double().mean())
        out["expert_bytes_per_token"] = float(per_pass.sum()) / tokens if tokens > 0 else None
        out["experts_per_layer_step"] = float(sizes.double().mean())
        return out
