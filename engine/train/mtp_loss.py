"""Training loss for a model with MTP modules: LM loss + λ/D · Σ_k CE(MTP module k)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.model.transformer import Transformer


def lm_and_mtp_losses(model: Transformer, tokens: torch.Tensor, reduction: str = "mean"
                      ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """tokens [B, T] → (main next-token CE, [CE of MTP depth k predicting token i+k+1, k = 1..D]).

    Depth k at position i combines depth k-1's hidden state at i with the embedding of token i+k, so
    each depth scores one position fewer than the one before. reduction "none": per position,
    main [B, T-1] (position i predicts token i+1) and depth k [B, T-k-1] (position i).
    """
    hidden = model(tokens)  # [B, T, H], causal attention, no cache
    B = tokens.shape[0]

    def ce(logits, targets):
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction=reduction)
        return loss if reduction == "mean" else loss.view(B, -1)

    lm = ce(model.logits(hidden[:, :-1]), tokens[:, 1:])
    mtp = [ce(model.mtp_logits(k - 1, h), tokens[:, k + 1:k + 1 + h.shape[1]])
           for k, h in mtp_hidden_states(model, hidden, tokens)]
    return lm, mtp


def mtp_hidden_states(model: Transformer, hidden: torch.Tensor, tokens: torch.Tensor):
    """Teacher-forced MTP depths from the main hidden states [B, T, H] of tokens [B, T]: yields (k, depth k's
    hidden states [B, T-k-1, H]) for k = 1..D, position i combining depth k-1's state at i with the
    embedding of token i+k (it predicts token i+k+1). Stops at the first depth with no position left."""
    T = tokens.shape[1]
    for k in range(1, len(model.mtp) + 1):
        n = T - k - 1  # positions i = 0..T-k-2
        if n <= 0:
            return
        hidden = model.mtp_forward(k - 1, hidden[:, :n], tokens[:, k:k + n])
        yield k, hidden


def mtp_training_loss(model: Transformer, tokens: torch.Tensor, mtp_weight: float = 0.3) -> tuple[torch.Tensor, dict]:
    """The DeepSeek-V3 objective: L = L_main + λ/D · Σ_k L_k. Returns (loss, per-part values)."""
    lm, mtp = lm_and_mtp_losses(model, tokens)
    lm_value = lm.detach()
    loss = lm + (mtp_weight / len(mtp)) * sum(mtp) if mtp else lm
    return loss, {"lm": lm_value.item(), **{f"mtp{k + 1}": x.detach().item() for k, x in enumerate(mtp)}}
