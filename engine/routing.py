"""The MoE router: expert scores, group-limited top-k, the score-correction bias.

DeepSeek-V3 (`topk_method: noaux_tc`): sigmoid scores; a per-expert bias is added for *selection only*;
groups are ranked by the sum of their two best biased scores; the weights are the unbiased scores of
the chosen experts, normalized when `norm_topk_prob`, times `routed_scaling_factor`.
DeepSeek-V2: softmax scores; `greedy` top-k, or `group_limited_greedy` ranking groups by their best score;
the weights are normalized when `norm_topk_prob`, otherwise scaled by `routed_scaling_factor`.
Routing runs in fp32 whatever the model dtype, as the reference implementations do.
"""
from __future__ import annotations

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

    def track_load(self, enabled: bool = True) -> None:
        self.load = torch.zeros(self.n_experts, dtype=torch.long, device=self.bias.device) if enabled else None

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
        if self.load is not None:
            self.load += torch.bincount(ids.flatten(), minlength=self.n_experts)
        return self.weights_of(scores, ids), ids

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
