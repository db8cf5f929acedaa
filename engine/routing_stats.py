"""Routing statistics: how evenly a model spreads tokens over its experts, and how many distinct experts
a verification window touches.

Per MoE layer, over the tokens recorded (rows in the order the router saw them: a batch-1 pass in text
order gives text order):
  tokens_per_expert  how many of the recorded tokens chose each routed expert
  max_mean_load      the busiest expert's count over the mean count (1 = perfectly balanced; at most E/k)
  cv                 coefficient of variation of the counts: population std / mean (0 = balanced)
  entropy            mean over tokens of the routing entropy, in nats: the entropy of the token's
                     affinities to all routed experts normalized to sum to 1, p_i = s_i / Σ_j s_j (softmax
                     routers: the softmax itself). Unbiased scores, before the group mask and the
                     top-k, so it measures how decided the router is; at most ln E (`max_entropy`).
  expert_union[k]    mean over every window of k+1 consecutive tokens of the number of distinct experts
                     in the union of their top-k sets (k = 1..4; one token alone would give top_k). A
                     verification of k drafts reads this many experts' weights, against top_k for one
                     token: why MoE verification costs more than a single decode step.
Overall: each number averaged over the main model's MoE layers with equal weight (every layer routes the
same tokens); `max_mean_load_worst` is the worst layer's. MTP modules' routers are left out unless asked
for (`mtp=True`), and then reported apart under "mtp", never in the overall averages.

Batch-wise balance (`batch_load`), the way DeepSeek-V3 balances (its bias moves on whole-batch loads): a
batch is one window (default 256 tokens) from each of many documents (≥ 16 asked for), the b-th window
of every document that has one; per layer the max/mean load over the batch's tokens, averaged over the
batches; `batch_max_mean_load` is the mean over layers, `batch_max_mean_load_worst` the worst layer's.
Per-text load (max_mean_load above, over one contiguous text) stays reported, not bounded.

Recording hooks `Router.observe`; a model with no recorder attached pays one `is None` test per layer.
"""
from __future__ import annotations

import math

import torch

from engine.routing import Router

UNION_KS = (1, 2, 3, 4)
PENDING_STEPS = 64


def routing_entropy(scores: torch.Tensor) -> torch.Tensor:
    """Affinities [N, E] (sigmoid or softmax, all ≥ 0) → entropy in nats of each row normalized to sum 1 [N]."""
    p = scores.float() / scores.float().sum(-1, keepdim=True).clamp_min(1e-30)
    return -(p * p.clamp_min(1e-30).log()).sum(-1)


def expert_counts(ids: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Expert ids [T, k] → tokens per expert [E] (int64)."""
    return torch.bincount(ids.flatten().long(), minlength=n_experts)


def load_balance(counts: torch.Tensor) -> dict:
    """Tokens per expert [E] → max/mean load and coefficient of variation (None when nothing was routed)."""
    c = counts.double()
    mean = c.mean()
    if mean <= 0:
        return {"max_mean_load": None, "cv": None}
    return {"max_mean_load": float(c.max() / mean), "cv": float(c.std(unbiased=False) / mean)}


def expert_union(ids: torch.Tensor, n_experts: int, k: int) -> float | None:
    """Expert ids [T, top_k] → mean number of distinct experts chosen by k+1 consecutive tokens, over all
    T-k windows (None when T ≤ k)."""
    T, w = ids.shape[0], k + 1
    if T < w:
        return None
    chosen = torch.zeros(T, n_experts, dtype=torch.bool, device=ids.device).scatter_(1, ids.long(), True)
    union = chosen[:T - w + 1].clone()
    for j in range(1, w):
        union |= chosen[j:T - w + 1 + j]
    return float(union.sum(-1).double().mean())


def layer_stats(ids: torch.Tensor, entropy: torch.Tensor, n_experts: int, ks=UNION_KS,
                per_expert: bool = True) -> dict:
    """One layer's statistics from its recorded ids [T, top_k] and per-token entropies [T]."""
    counts = expert_counts(ids, n_experts)
    out = {"tokens_per_expert": counts.tolist()} if per_expert else {}
    out.update(load_balance(counts))
    out["entropy"] = float(entropy.double().mean()) if entropy.numel() else None
    out["expert_union"] = {str(k): expert_union(ids, n_experts, k) for k in ks}
    return out


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def summarize(layers: list[dict], n_experts: int, top_k: int, tokens: int, ks=UNION_KS) -> dict:
    """Per-layer statistics (layer_stats, each with its "layer") → the overall figures plus "layers"."""
    return {
        "tokens": tokens, "experts": n_experts, "top_k": top_k, "max_entropy": math.log(n_experts),
        "max_mean_load": _mean([s["max_mean_load"] for s in layers]),
        "max_mean_load_worst": max((s["max_mean_load"] for s in layers if s["max_mean_load"] is not None),
                                   default=None),
        "cv": _mean([s["cv"] for s in layers]),
        "entropy": _mean([s["entropy"] for s in layers]),
        "expert_union": {str(k): _mean([s["expert_union"][str(k)] for s in layers]) for k in ks},
        "layers": layers,
    }


def rounded(x, digits: int = 4):
    """Floats in nested dicts/lists rounded (for compact per-request stats)."""
    if isinstance(x, float):
        return round(x, digits)
    if isinstance(x, dict):
        return {k: rounded(v, digits) for k, v in x.items()}
    if isinstance(x, list):
        return [rounded(v, digits) for v in x]
    return x


class RoutingRecorder:
    """Records the chosen experts and routing entropy of every token each MoE layer routes, in order.

        with RoutingRecorder(model) as rec:
            model(tokens)
        rec.summary()  # see the module docstring

    Rows are kept on the model's device until `summary`. CUDA graph captures and their warm-ups pause it
    (cuda_graphs.load_counting_paused) and a replay runs no Python, so graphed decode steps go unrecorded,
    as they go uncounted in Router.load; on the CPU every step is recorded.
    `keep(rows)` trims what was recorded since the last keep/clear, e.g. the overlap of eval windows.
    """

    def __init__(self, model: torch.nn.Module, mtp: bool = False):
        self.routers: list[tuple[str, int, Router]] = [
            ("layers", i, b.ffn.router) for i, b in enumerate(model.layers)
            if isinstance(getattr(b.ffn, "router", None), Router)]
        if mtp:
            self.routers += [("mtp", i, m.block.ffn.router) for i, m in enumerate(model.mtp)
                             if isinstance(getattr(m.block.ffn, "router", None), Router)]
        self.ids: list[list[torch.Tensor]] = [[] for _ in self.routers]
        self.entropy: list[list[torch.Tensor]] = [[] for _ in self.routers]
        # A decode step only appends its ids and scores here (no ops in the step); every PENDING_STEPS
        # steps, and before anything reads the record, they become rows of `ids`/`entropy` in one batch.
        self.pending: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in self.routers]
        self.kept = [0] * len(self.routers)  # entries before this index have been through keep()

    def __enter__(self) -> "RoutingRecorder":
        for j, (_, _, r) in enumerate(self.routers):
            if r.observe is not None:
                raise RuntimeError("another routing observer is attached to this model")
            r.observe = self._observer(j)
        return self

    def __exit__(self, *exc) -> None:
        for _, _, r in self.routers:
            r.observe = None

    def _observer(self, j: int):
        def observe(router: Router, scores: torch.Tensor, ids: torch.Tensor) -> None:
            if scores.is_cuda and torch.cuda.is_current_stream_capturing():
                return
            self.pending[j].append((ids.detach(), scores.detach()))
            if len(self.pending[j]) >= PENDING_STEPS:
                self._settle(j)
        return observe

    def _settle(self, j: int) -> None:
        if self.pending[j]:
            ids, scores = zip(*self.pending[j])
            self.pending[j] = []
            self.ids[j].append(torch.cat(ids).to(torch.int32))
            self.entropy[j].append(routing_entropy(torch.cat(scores)))

    def settle(self) -> None:
        for j in range(len(self.routers)):
            self._settle(j)

    def clear(self) -> None:
        for j in range(len(self.routers)):
            self.ids[j], self.entropy[j], self.pending[j] = [], [], []
        self.kept = [0] * len(self.routers)

    def keep(self, rows: slice) -> None:
        """Of the rows recorded since the last keep/clear (taken together), keep only `rows`."""
        self.settle()
        for j in range(len(self.routers)):
            n = self.kept[j]
            if len(self.ids[j]) > n:
                self.ids[j][n:] = [torch.cat(self.ids[j][n:])[rows]]
                self.entropy[j][n:] = [torch.cat(self.entropy[j][n:])[rows]]
            self.kept[j] = len(self.ids[j])

    @property
    def tokens(self) -> int:
        """Tokens recorded by the first main layer (every main layer routes the same ones)."""
        self.settle()
        return sum(t.shape[0] for t in self.ids[0]) if self.routers else 0

    def layer(self, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Router j's recorded ids [T, top_k] and entropies [T], on the CPU."""
        self._settle(j)
        r = self.routers[j][2]
        ids = torch.cat(self.ids[j]).cpu() if self.ids[j] else torch.zeros(0, r.top_k, dtype=torch.int32)
        ent = torch.cat(self.entropy[j]).cpu() if self.entropy[j] else torch.zeros(0)
        return ids, ent

    def expert_load(self) -> list[list[int]]:
        """Tokens per routed expert, per main MoE layer, over what was recorded."""
        return [expert_counts(self.layer(j)[0], r.n_experts).tolist()
                for j, (kind, _, r) in enumerate(self.routers) if kind == "layers"]

    def summary(self, ks=UNION_KS, per_expert: bool = True) -> dict | None:
        """Overall and per-layer statistics (module docstring); None for a model without MoE layers.
        per_expert=False leaves out tokens_per_expert (for compact per-request stats)."""
        if not self.routers:
            return None
        main, mtp = [], []
        for j, (kind, index, r) in enumerate(self.routers):
            ids, ent = self.layer(j)
            stats = {"layer": index, **layer_stats(ids, ent, r.n_experts, ks, per_expert)}
            (main if kind == "layers" else mtp).append(stats)
        r = self.routers[0][2]
        out = summarize(main, r.n_experts, r.top_k, self.tokens, ks)
        if mtp:
            out["mtp"] = mtp
        return out


BATCH_WINDOW, BATCH_DOCUMENTS = 256, 16


@torch.inference_mode()
def batch_load(model: torch.nn.Module, documents: list[list[int]], window: int = BATCH_WINDOW,
               min_documents: int = BATCH_DOCUMENTS) -> dict:
    """Batch-wise max/mean load (module docstring) of token id lists, one per document. Batches with fewer
    than min_documents windows are not formed (a short document drops out of later batches)."""
    device = model.norm.weight.device
    windows = [[d[i:i + window] for i in range(0, len(d) - window + 1, window)] for d in documents]
    per_layer: list[list[float]] = []
    batches = 0
    for b in range(max((len(w) for w in windows), default=0)):
        rows = [w[b] for w in windows if len(w) > b]
        if len(rows) < min_documents:
            break
        with RoutingRecorder(model) as rec:
            model(torch.tensor(rows, device=device))  # causal within each window, no cache
        loads = [load_balance(expert_counts(rec.layer(j)[0], r.n_experts))["max_mean_load"]
                 for j, (_, _, r) in enumerate(rec.routers)]
        per_layer.append(loads)
        batches += 1
    out = {"documents": len(documents), "window": window, "batches": batches,
           "batch_max_mean_load": None, "batch_max_mean_load_worst": None, "batch_max_mean_load_layers": []}
    if batches:
        layers = [sum(col) / batches for col in zip(*per_layer)]
        out.update(batch_max_mean_load=sum(layers) / len(layers), batch_max_mean_load_worst=max(layers),
                   batch_max_mean_load_layers=layers)
    return out
