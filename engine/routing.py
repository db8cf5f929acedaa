"""The MoE router: expert scores, group-limited top-k, the score-correction bias.

DeepSeek-V3 (`topk_method: noaux_tc`): sigmoid scores; a per-expert bias is added for *selection only*;
groups are ranked by the sum of their two best biased scores; the weights are the unbiased scores of
the chosen experts, normalized when `norm_topk_prob`, times `routed_scaling_factor`.
DeepSeek-V2: softmax scores; `greedy` top-k, or `group_limited_greedy` ranking groups by their best score;
the weights are normalized when `norm_topk_prob`, otherwise scaled by `routed_scaling_factor`.
Routing runs in fp32 whatever the model dtype, as the reference implementations do.

Balancing (V3 routers only: only `noaux_tc` selection reads the bias). Training:
count each expert's tokens over a batch (`track_load`), then `balance_bias(γ)`. Calibration: the bias
that evens the loads of a given set of tokens outright (`balancing_bias`), instead of in γ-sized steps
that can stall short of balance on a sharply specialized router. Inference, optional
and off by default (`online_step = γ`): after every forward pass the bias moves by γ from that pass's
own counts. That changes which experts are chosen, so it can change the output (greedy included)
versus the checkpoint's bias; `engine.generate` restores the bias after each request.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch
import torch.nn.functional as F

from engine.model.config import ModelConfig


class Router(torch.nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts = cfg.n_routed_experts
        self.top_k = cfg.num_experts_per_tok
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.method, self.scoring = cfg.topk_method, cfg.scoring_func
        self.norm_topk_prob = cfg.norm_topk_prob
        self.scaling = cfg.routed_scaling_factor
        self.v2_weighting = cfg.model_type == "deepseek_v2"
        self.weight = torch.nn.Parameter(torch.empty(self.n_experts, cfg.hidden_size, dtype=torch.float32))
        # Score-correction bias: shifts which experts are chosen, never their weights.
        self.register_buffer("bias", torch.zeros(self.n_experts, dtype=torch.float32))
        self.load: torch.Tensor | None = None  # tokens routed to each expert, while tracking
        # Routing tuning (GRPO) samples experts instead of taking the top-k: policy(router, scores,
        # choice) → ids [N, k], given the affinities and the (biased, group-masked) selection scores.
        self.policy: Callable[["Router", torch.Tensor, torch.Tensor], torch.Tensor] | None = None
        # Routing statistics (engine.routing_stats): observe(router, scores, ids) after each selection.
        self.observe: Callable[["Router", torch.Tensor, torch.Tensor], None] | None = None
        self.online_step: float | None = None  # γ of online balancing at inference; None: off
        # Each selection's ids [N, k] while engine.expert_windows measures what decode passes read.
        self.windows: list[torch.Tensor] | None = None

    def track_load(self, enabled: bool = True) -> None:
        self.load = torch.zeros(self.n_experts, dtype=torch.long, device=self.bias.device) if enabled else None

    def count(self, ids: torch.Tensor) -> torch.Tensor:
        """Tokens per expert [E] (int64) of ids [N, k]. index_add_ into a fresh buffer of known size never
        reads the device (bincount sizes its output from the data, a host synchronisation on CUDA)."""
        flat = ids.flatten()
        return torch.zeros(self.n_experts, dtype=torch.long, device=ids.device).index_add_(
            0, flat, torch.ones_like(flat))

    @torch.no_grad()
    def balance_bias(self, step: float) -> None:
        """DeepSeek-V3's auxiliary-loss-free balancing: move each expert's bias by `step` toward
        balance (down if it got more than the mean load, up if less), then start counting again."""
        if self.load is not None and self.load.sum() > 0:
            self.bias += step * torch.sign(self.load.float().mean() - self.load.float())
            self.load.zero_()

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, H] → affinities [N, E] in fp32."""
        logits = F.linear(x.float(), self.weight.float())
        return logits.sigmoid() if self.scoring == "sigmoid" else logits.softmax(dim=-1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, H] → (weights [N, k] fp32, expert ids [N, k] int64)."""
        scores = self.scores(x)
        choice = scores + self.bias if self.method == "noaux_tc" else scores
        choice = self.mask_groups(choice)
        if self.policy is not None:
            ids = self.policy(self, scores, choice)
        else:
            ids = choice.topk(self.top_k, dim=-1, sorted=False).indices
        self.record(scores, ids)
        if self.online_step:  # after this pass's selection: the next pass sees the moved bias
            load = self.count(ids).float()
            self.bias += self.online_step * torch.sign(load.mean() - load)
        return self.weights_of(scores, ids), ids

    def record(self, scores: torch.Tensor, ids: torch.Tensor) -> None:
        """A selection's bookkeeping, wherever it was made (here, or in moedesk's CPU kernel): load
        counting, the observer, the expert windows."""
        if self.load is not None:
            self.load += self.count(ids)
        if self.observe is not None:
            self.observe(self, scores, ids)
        if self.windows is not None:
            self.windows.append(ids)

    def mask_groups(self, choice: torch.Tensor) -> torch.Tensor:
        """Keep the experts of the best `topk_group` groups; the rest can't be chosen."""
        if self.method == "greedy" or self.n_group <= 1:
            return choice
        grouped = choice.view(choice.shape[0], self.n_group, -1)  # [N, G, E/G]
        if self.method == "noaux_tc":
            group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)
        else:  # group_limited_greedy
            group_scores = grouped.amax(dim=-1)
        keep = group_scores.topk(self.topk_group, dim=-1, sorted=False).indices  # [N, topk_group]
        mask = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)
        # V3 masks with -inf on biased scores; V2 with 0 on softmax scores (all positive): same choice.
        return grouped.masked_fill(mask[..., None], float("-inf")).view_as(choice)

    def weights_of(self, scores: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        w = scores.gather(1, ids)
        if self.v2_weighting:  # DeepSeek-V2's gate: normalize (top_k > 1) or scale, never both
            if self.norm_topk_prob and self.top_k > 1:
                return w / (w.sum(dim=-1, keepdim=True) + 1e-20)
            return w * self.scaling
        if self.norm_topk_prob:
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        return w * self.scaling


@torch.no_grad()
def balancing_bias(router: Router, scores: torch.Tensor, iters: int = 800, tol: float = 1e-3
                   ) -> tuple[torch.Tensor, float]:
    """The score-correction bias under which these tokens' affinities scores [N, E] (fp32) load every
    expert evenly, and the max/mean load it gives them (the best iterate's).

    Each expert's load only grows with its own bias, so a step proportional to the load's excess (loads
    normalized to mean 1) settles where every load is 1; the step shrinks so that the discrete top-k
    counts stop flipping. It starts from the router's bias, whose units (affinities) set the scale.
    """
    n, k = scores.shape[0], router.top_k
    bias, step = router.bias.clone(), 0.05
    best = (float("inf"), bias.clone())
    for _ in range(iters):
        ids = router.mask_groups(scores + bias).topk(k, dim=-1, sorted=False).indices
        load = router.count(ids).float() * (router.n_experts / (n * k))  # [E], mean 1
        worst = float(load.max())
        if worst < best[0]:
            best = (worst, bias.clone())
            if worst <= 1 + tol:
                break
        bias -= step * (load - 1)
        step *= 0.994
    return best[1], best[0]


def batch_loads(router: Router, scores: torch.Tensor, bias: torch.Tensor, batches: torch.Tensor) -> torch.Tensor:
    """Each batch's expert loads [nb, E], normalized to mean 1, under this bias: scores [B, T, E] of B windows
    of T tokens, batches [nb, m] the windows in each batch."""
    B, T, E = scores.shape
    ids = router.mask_groups((scores + bias).view(B * T, E)).topk(router.top_k, dim=-1, sorted=False).indices
    per_window = scores.new_zeros(B * T, E).scatter_(1, ids, 1.0).view(B, T, E).sum(1)  # [B, E]
    load = per_window[batches].sum(1)  # [nb, E]
    return load / load.mean(dim=1, keepdim=True)


def batch_balancing_bias(router: Router, scores: torch.Tensor, batches: torch.Tensor, iters: int = 400,
                         temperature: float = 0.02) -> tuple[torch.Tensor, float]:
    """The bias under which the busiest expert of a batch of windows is least busy, on average over the
    batches: what DeepSeek-V3's batch-wise balance (engine/routing_stats.py) measures. scores [B, T, E]
    (fp32) of B windows, batches [nb, m] window indices. Returns the bias and that mean max/mean load.

    It starts from `balancing_bias` (every expert's load even over all the tokens). Experts whose load
    swings from one batch to the next (those a few documents prefer) are then the busiest more often than
    1/E of the time; each step lowers an expert's bias by how much more often it is (a softmax over the
    batch's loads, so near-ties share the blame), until every expert tops about as many batches. Keeps
    the best iterate.
    """
    E = scores.shape[-1]
    bias, _ = balancing_bias(router, scores.view(-1, E))
    best, step = (float("inf"), bias.clone()), 0.02
    for _ in range(iters):
        load = batch_loads(router, scores, bias, batches)
        worst = float(load.max(dim=1).values.mean())
        if worst < best[0]:
            best = (worst, bias.clone())
        busiest = torch.softmax(load / temperature, dim=1).mean(0)  # [E], sums to 1
        bias -= step * E * (busiest - 1 / E)
        step *= 0.992
    return best[1], best[0]


def moe_routers(model: torch.nn.Module) -> list[Router]:
    """The routers of the main model's MoE layers, in layer order (MTP modules' left out)."""
    return [b.ffn.router for b in model.layers if isinstance(getattr(b.ffn, "router", None), Router)]


def online_balancing(model: torch.nn.Module) -> bool:
    """Whether a router of the model balances online. Such steps run eagerly: a CUDA graph would bake the
    bias update in and replay it in later requests, with balancing off."""
    return any(isinstance(m, Router) and m.online_step for m in model.modules())


@contextmanager
def balanced_online(model: torch.nn.Module, step: float):
    """Online balancing with γ = step on the main model's V3 routers for the duration; their biases are put
    back afterwards, so one request's drift never reaches the next."""
    routers = [r for r in moe_routers(model) if r.method == "noaux_tc"]
    if not routers:
        raise ValueError("online balancing moves the score-correction bias, which only DeepSeek-V3-style "
                         "routers (topk_method noaux_tc) use; this model has none")
    saved = [r.bias.clone() for r in routers]
    for r in routers:
        r.online_step = step
    try:
        yield routers
    finally:
        for r, bias in zip(routers, saved):
            r.online_step = None
            r.bias.copy_(bias)
