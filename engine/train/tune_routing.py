"""`python -m engine tune-routing`: tune every MoE router with Group Relative Policy Optimization.

Policy: each router's selection scores (affinities + score-correction bias, group-masked) over a
temperature τ; while tuning, the top-k experts are *sampled* without replacement (Gumbel top-k, whose
ordered sample has the Plackett–Luce probability); at inference routing stays the deterministic top-k.
Group masking is part of the environment: the groups a token may use are the ones the deterministic
rule keeps, and the policy samples experts inside them.

Each step takes B token windows and routes them G times (one batched forward under no_grad; rewards
only, no backprop through the network). A rollout is scored per chunk of `chunk` tokens of one
window (the chunk's decisions share its advantage, which keeps the credit local):
  reward = −(LM + MTP loss) − λ_bal·(max/mean load − 1) − λ_ent·routing entropy − λ_union·expert union
with the load imbalance taken over the whole rollout (or, with balance_scope="window", over each token
window alone, so that load is even within one text too), the routing entropy and the union = distinct
experts per window of `window` consecutive tokens (one verification pass of speculative decoding) over
the main layers; entropy as engine/routing_stats.py defines it (what `engine eval` reports).
Advantages are normalized over the G rollouts of the same chunk, per router by default (credit "layer":
a router's decisions are credited with −(LM + MTP loss) minus its own layer's load, entropy and union
terms, not the other layers', which its choices do not move); the objective is PPO's clipped ratio
per routing decision plus β·KL(policy ‖ starting router) (exact, per token, over the first pick).
Only the router weights are in the optimizer; the score-correction bias follows DeepSeek-V3's
auxiliary-loss-free rule on the rollouts' loads after every step (learning it by reward would let the
union fall by sending every token to the same few experts). After the GRPO steps the bias is solved
outright on deterministic routing of `calibrate_windows` windows (`calibrate_bias`): γ-sized steps
stall short of balance once the routers have sharpened. Those are the only tensors that change, unless
--heal-steps asks for recovery training (`heal`): then every other full-precision weight learns the LM +
MTP loss under the tuned routing, which takes back most of the perplexity the routing change cost;
--distill-steps then teaches the MTP modules the healed model's own greedy choices (`distill_mtp`).

The output folder holds the input checkpoint with only `mlp.gate.weight` and
`mlp.gate.e_score_correction_bias` replaced (checked before it is written; after healing, every tensor,
in its stored dtype), its config and tokenizer, tune_log.jsonl (one line per step, heal and distill step),
tuning.json, and tune_state/ (router tensors and optimizer state before the bias calibration, and the
healing's checkpoint) to resume from, or to continue with more --steps.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from engine.model.checkpoint import checkpoint_files, checkpoint_state, load_model, official_name
from engine.model.transformer import Transformer
from engine.quant import quantization_config
from engine.routing import Router, balancing_bias, batch_balancing_bias, moe_routers
from engine.routing_stats import routing_entropy
from engine.train.default_model import (TrainSettings, distill_loss, load_checkpoint, make_optimizer,
                                        optimizer_tensors, progress_line, restore_optimizer, save_checkpoint)
from engine.train.mtp_loss import lm_and_mtp_losses, mtp_hidden_states, mtp_training_loss

ROUTER_SUFFIXES = (".mlp.gate.weight", ".mlp.gate.e_score_correction_bias")
AFTER_STEPS = ("steps", "heal_steps", "heal_lr", "heal_batch", "heal_seq_len", "heal_union", "heal_balance",
               "heal_balance_worst", "heal_temperature",
               "distill_steps", "distill_lr", "distill_sequences", "calibrate_windows",
               "calibrate_len", "calibrate_batch")  # settings a resumed run takes as given
STATE, LOG = "tune_state", "tune_log.jsonl"  # STATE: a folder (its tensors are no model shard)
MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "chat_template.jinja")  # copied from --model to the output


@dataclass
class TuneSettings:
    steps: int = 300
    group: int = 8  # G routings of the same tokens
    batch: int = 8  # token windows per step
    seq_len: int = 64
    chunk: int = 16  # tokens per scored unit of a rollout
    window: int = 4  # tokens per verification window (union)
    temperature: float = 0.05
    lr: float = 1e-3
    epochs: int = 2  # policy updates per batch of rollouts
    clip: float = 0.2
    kl: float = 0.05  # β
    lambda_bal: float = 1.0
    balance_scope: str = "rollout"  # max/mean load over the whole rollout, or per token window ("window")
    credit: str = "layer"  # a router's advantage from its own routing cost ("layer") or the total ("shared")
    lambda_ent: float = 0.0
    lambda_union: float = 0.3
    seq_balance: float = 0.0  # α of DeepSeek-V3's sequence-wise balance loss in the policy objective (0: off)
    mtp_weight: float = 0.3
    heal_steps: int = 0  # steps of recovery training after the GRPO steps (every weight but the routers')
    heal_lr: float = 2e-4
    heal_batch: int = 16  # windows of heal_seq_len tokens per heal step
    heal_seq_len: int = 256
    heal_union: float = 0.0  # weight of the soft expert union per verification window in the healing loss
    heal_balance: float = 0.0  # weight of the batch's load-balance loss (Switch Transformer's) in it
    heal_balance_worst: float = 0.0  # weight of the worst main layer's balance loss in it (beside the mean)
    heal_temperature: float = 0.0  # τ of the selection softmax in those terms (0: the policy's temperature)
    distill_steps: int = 0  # steps of MTP self-distillation after healing (the MTP modules' weights alone)
    distill_lr: float = 1e-3
    distill_sequences: int = 64  # greedy continuations of the main model to distill on
    calibrate_windows: int = 512  # windows the bias is balanced on after the GRPO steps (0: not at all)
    calibrate_len: int = 256  # tokens per calibration window (at most the model's context)
    calibrate_batch: int = 16  # documents per batch when --data is a folder of them (batch-wise balance)
    bias_step: float = 1e-3  # γ of the bias update after each GRPO step
    seed: int = 0
    checkpoint_every: int = 20


# ---- the policy ----

def selection_logits(router: Router, x: torch.Tensor, allowed: torch.Tensor, temperature: float,
                     weight: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Router input x [N, H] → policy logits [N, E]: selection scores / τ, -inf outside `allowed`."""
    logits = F.linear(x, router.weight if weight is None else weight)
    scores = logits.sigmoid() if router.scoring == "sigmoid" else logits.softmax(dim=-1)
    if router.method == "noaux_tc":
        scores = scores + (router.bias if bias is None else bias)
    return scores.masked_fill(~allowed, float("-inf")) / temperature


def plackett_luce(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Log-probability [N] of drawing experts ids [N, k] in this order without replacement."""
    logp = torch.zeros(ids.shape[0], device=logits.device)
    for j in range(ids.shape[1]):
        pick = ids[:, j:j + 1]
        logp = logp + logits.gather(1, pick)[:, 0] - logits.logsumexp(dim=-1)
        logits = logits.scatter(1, pick, float("-inf"))
    return logp


def gumbel_top_k(logits: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """An ordered sample of k experts without replacement from softmax(logits)."""
    u = torch.rand(logits.shape, generator=gen, device=logits.device).clamp_(1e-20, 1.0)
    return (logits - torch.log(-torch.log(u))).topk(k, dim=-1).indices  # sorted: the draw order


def categorical_kl(logits: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """KL(softmax(logits) ‖ softmax(ref)) [N] over the allowed experts (both -inf at the same places)."""
    masked = ~logits.isfinite()
    lp, lq = logits.log_softmax(-1).masked_fill(masked, 0.0), ref.log_softmax(-1).masked_fill(masked, 0.0)
    return (lp.exp().masked_fill(masked, 0.0) * (lp - lq)).sum(-1)


class Sampler:
    """Installs the tuning policy on every router (Router.policy) and records each decision:
    router input x, allowed experts, sampled ids in draw order, their log-probability, routing entropy.
    With sample=False it routes deterministically (top-k) and records the same things."""

    def __init__(self, routers: list[Router], temperature: float, sample: bool = True):
        self.routers, self.temperature, self.sample = routers, temperature, sample
        self.gen: torch.Generator | None = None
        self.records: list[dict] = [{} for _ in routers]
        self.handles = []

    def __enter__(self) -> "Sampler":
        for i, r in enumerate(self.routers):
            r.policy = partial(self.route, i)
            self.handles.append(r.register_forward_pre_hook(partial(self.capture, i)))
        return self

    def __exit__(self, *exc) -> None:
        for r in self.routers:
            r.policy = None
        for h in self.handles:
            h.remove()
        self.handles = []

    def capture(self, i: int, module, args) -> None:
        self.records[i] = {"x": args[0].detach().float()}

    def route(self, i: int, router: Router, scores: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
        logits = choice / self.temperature
        ids = gumbel_top_k(logits, router.top_k, self.gen) if self.sample else logits.topk(router.top_k, -1).indices
        self.records[i].update(allowed=choice.isfinite(), ids=ids, logp=plackett_luce(logits, ids),
                               entropy=routing_entropy(scores))
        return ids


# ---- rewards ----

def window_union(ids: torch.Tensor, n_experts: int, window: int, step: int | None = None) -> torch.Tensor:
    """ids [R, T, k] → distinct experts per window of `window` consecutive tokens [R, W]
    (windows every `step` tokens; default: not overlapping)."""
    hot = torch.zeros(*ids.shape[:2], n_experts, device=ids.device).scatter_(2, ids, 1.0)  # [R, T, E]
    wins = hot.unfold(1, window, step or window)  # [R, W, E, window]
    return wins.amax(-1).sum(-1)


def chunk_mean(v: torch.Tensor, n_chunks: int, size: int) -> torch.Tensor:
    """v [R, n] (position-indexed) → mean over each chunk of `size` positions [R, n_chunks]."""
    pad = torch.full((v.shape[0], n_chunks * size), float("nan"), device=v.device)
    pad[:, :v.shape[1]] = v[:, :n_chunks * size]
    return pad.view(v.shape[0], n_chunks, size).nanmean(-1).nan_to_num(0.0)


def load_imbalance(ids: torch.Tensor, n_experts: int) -> torch.Tensor:
    """ids [G, N, k] → max/mean expert load per rollout [G]."""
    hot = torch.zeros(*ids.shape[:2], n_experts, device=ids.device).scatter_(2, ids, 1.0)
    load = hot.sum((1,))  # [G, E]
    return load.amax(-1) / load.mean(-1)


def rewards(model: Transformer, sampler: Sampler, lm: torch.Tensor, mtp: list[torch.Tensor],
            s: TuneSettings) -> dict[str, torch.Tensor]:
    """Every reward component and the total, each [G, B, C] (C chunks per window); and under "layer"
    (a list, one [G, B, C] per router) each router's own routing cost: λ_bal·(its load − 1) + λ_ent·its
    entropy + λ_union·its union (the last two on main layers only, as in the totals)."""
    G, B, T = s.group, lm.shape[0] // s.group, lm.shape[1] + 1
    C, n_main = T // s.chunk, model.cfg.num_hidden_layers
    loss = chunk_mean(lm, C, s.chunk)
    for m in mtp:
        loss = loss + s.mtp_weight / len(mtp) * chunk_mean(m, C, s.chunk)
    union, ent, imb, n_layers, costs = 0.0, 0.0, 0.0, 0, []
    for r, rec in zip(sampler.routers, sampler.records):
        ids = rec["ids"].view(G * B, -1, r.top_k)
        if s.balance_scope == "window":  # each window's own load: even within a text, not only across texts
            imb_r = load_imbalance(ids, r.n_experts).view(G, B, 1)
        else:
            imb_r = load_imbalance(ids.view(G, -1, r.top_k), r.n_experts)[:, None, None]
        imb = imb + imb_r / len(sampler.routers)
        cost = s.lambda_bal * (imb_r.expand(G, B, C) - 1)
        if ids.shape[1] == T and n_layers < n_main:  # a main layer (MTP layers see fewer positions)
            n_layers += 1
            union_r = chunk_mean(window_union(ids, r.n_experts, s.window), C, s.chunk // s.window).view(G, B, C)
            ent_r = chunk_mean(rec["entropy"].view(G * B, T), C, s.chunk).view(G, B, C)
            union, ent = union + union_r, ent + ent_r
            cost = cost + s.lambda_union * union_r + s.lambda_ent * ent_r
        costs.append(cost)
    parts = {"loss": loss, "union": union / max(n_layers, 1), "entropy": ent / max(n_layers, 1),
             "imbalance": imb.expand(G, B, C).reshape(G * B, C)}
    parts = {k: v.view(G, B, C) for k, v in parts.items()}
    parts["reward"] = (-parts["loss"] - s.lambda_bal * (parts["imbalance"] - 1) - s.lambda_ent * parts["entropy"]
                       - s.lambda_union * parts["union"])
    parts["layer"] = costs
    return parts


def advantages(parts: dict, s: TuneSettings) -> torch.Tensor | list[torch.Tensor]:
    """credit "shared": every decision takes its chunk's advantage of the total reward. "layer": a router's
    decisions take the advantage of −loss − its own routing cost, so that the other layers' union and
    load, which its choices do not move, add no noise to its credit (the loss stays shared: every
    router's choices move it)."""
    if s.credit == "shared":
        return group_advantages(parts["reward"])
    return [group_advantages(-parts["loss"] - cost) for cost in parts["layer"]]


def group_advantages(reward: torch.Tensor) -> torch.Tensor:
    """reward [G, ...] → (reward − group mean) / group std, per unit."""
    return (reward - reward.mean(0)) / (reward.std(0) + 1e-6)


# ---- the update ----

def sequence_balance(router: Router, x: torch.Tensor, ids: torch.Tensor, n_seq: int) -> torch.Tensor:
    """DeepSeek-V3's complementary sequence-wise balance loss, summed over n_seq sequences:
    Σ_i f_i·P_i per sequence, f_i = E/(k·T)·(tokens routed to i), P_i = mean normalized affinity of i.
    Its gradient lowers the affinity of the experts one text overloads, which a reward measured over a
    whole rollout hardly sees: load even within a text, not only across the corpus the bias balances."""
    E, k = router.n_experts, router.top_k
    scores = F.linear(x, router.weight)
    scores = scores.sigmoid() if router.scoring == "sigmoid" else scores.softmax(-1)
    share = (scores / scores.sum(-1, keepdim=True)).view(n_seq, -1, E)  # [S, T, E]
    hot = torch.zeros(ids.shape[0], E, device=x.device).scatter_(1, ids, 1.0).view(n_seq, -1, E)
    f = hot.mean(1) * E / k  # [S, E], 1 everywhere when balanced
    return (f * share.mean(1)).sum()


def policy_loss(sampler: Sampler, ref: list[tuple[torch.Tensor, torch.Tensor | None]],
                adv: torch.Tensor | list[torch.Tensor], s: TuneSettings) -> tuple[torch.Tensor, dict]:
    """PPO-clipped surrogate per routing decision (its chunk's advantage: adv [G, B, C], or a list of them,
    one per router) + β·KL to the start (+ α·the sequence-wise balance loss, when seq_balance is set)."""
    per_router = adv if isinstance(adv, list) else [adv] * len(sampler.routers)
    G, B, C = per_router[0].shape
    surr, kl, clipped, n, seq_bal = 0.0, 0.0, 0.0, 0, 0.0
    for r, rec, (w0, b0), adv_r in zip(sampler.routers, sampler.records, ref, per_router):
        n_pos = rec["ids"].shape[0] // (G * B)
        chunk_of = (torch.arange(n_pos, device=adv_r.device) // s.chunk).clamp_max(C - 1)
        a = adv_r.reshape(G * B, C)[:, chunk_of].flatten()  # [G*B*n_pos]
        logits = selection_logits(r, rec["x"], rec["allowed"], s.temperature)
        ratio = (plackett_luce(logits, rec["ids"]) - rec["logp"]).exp()
        surr = surr + torch.min(ratio * a, ratio.clamp(1 - s.clip, 1 + s.clip) * a).sum()
        with torch.no_grad():
            ref_logits = selection_logits(r, rec["x"], rec["allowed"], s.temperature, w0, b0)
            clipped += float(((ratio - 1).abs() > s.clip).float().sum())
        kl = kl + categorical_kl(logits, ref_logits).sum()
        n += a.numel()
        if s.seq_balance:
            seq_bal = seq_bal + sequence_balance(r, rec["x"], rec["ids"], G * B) / (G * B * len(sampler.routers))
    loss = -surr / n + s.kl * kl / n + s.seq_balance * seq_bal
    return loss, {"kl": float(kl.detach()) / n, "clip_frac": clipped / n, "seq_balance": float(seq_bal)}


def tune_step(model: Transformer, sampler: Sampler, ref, opt, tokens: torch.Tensor, gen: torch.Generator,
              s: TuneSettings) -> dict:
    """One GRPO step on windows tokens [B, T]: G rollouts, rewards, `epochs` clipped updates."""
    sampler.gen = gen
    with torch.no_grad():
        lm, mtp = lm_and_mtp_losses(model, tokens.repeat(s.group, 1), reduction="none")
        parts = rewards(model, sampler, lm, mtp, s)
    adv = advantages(parts, s)
    parts.pop("layer")
    stats = {}
    params = [p for g in opt.param_groups for p in g["params"]]
    for _ in range(s.epochs):
        loss, stats = policy_loss(sampler, ref, adv, s)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    for r in sampler.routers:  # the rollouts' loads (tracked by the routers) move the bias
        r.balance_bias(s.bias_step)
    out = {k: float(v.mean()) for k, v in parts.items()}
    out["lm"] = float(lm.mean())
    out |= {f"mtp{k + 1}": float(m.mean()) for k, m in enumerate(mtp)}
    return out | stats


# ---- data ----

def data_texts(data: str) -> list[str]:
    """--data's texts: a text file, or a folder's .txt files, one document each."""
    from engine.evaluate import text_files

    return [f.read_text(encoding="utf-8") for f in text_files([data])]


def default_ids(model_dir: Path, data: str | None) -> np.ndarray:
    """Token ids to tune on: --data (a text, or a folder's documents joined; the model's tokenizer); else,
    for a model with the bundled model's tokenizer, the bundled model's own training ids (built by
    default_model.prepare_data when missing: its documents and chats, the chats twice); else the corpus
    builder's training documents and chats, the chats in the model's chat template where it has one.
    Healing on documents alone (as this once did when the training ids had not been built) unlearns the
    chat turns: the healed model stopped 0 of 20 chat replies where the bundled model stopped 11."""
    from engine.paths import BUNDLED_MODEL
    from engine.tokenizer import Tokenizer
    from engine.train.default_model import DEFAULT_WORK, prepare_data

    tok_file = model_dir / "tokenizer.json"
    if not tok_file.is_file():
        raise ValueError(f"{model_dir} has no tokenizer.json to encode the tuning text with")
    tokenizer = Tokenizer.from_dir(model_dir)
    if data is not None:
        return np.asarray(tokenizer.encode("\n\n".join(data_texts(data))), dtype=np.int64)
    bundled_tok = BUNDLED_MODEL / "tokenizer.json"
    if bundled_tok.is_file() and bundled_tok.read_bytes() == tok_file.read_bytes():
        prepare_data(DEFAULT_WORK)
        if (DEFAULT_WORK / "tokenizer.json").read_bytes() == tok_file.read_bytes():
            return np.load(DEFAULT_WORK / "train_ids.npy").astype(np.int64)
    from engine.train.corpus import build_corpus
    corpus = build_corpus()
    text = "\n\n".join(corpus.train)
    if tokenizer.chat_template:
        text += "".join(tokenizer.render_chat(c, add_generation_prompt=False) for c in corpus.train_chats)
    return np.asarray(tokenizer.encode(text), dtype=np.int64)


def document_batches(model_dir: Path, data: str | None, n_windows: int, window: int, per_batch: int,
                     seed: int, n_batches: int = 400) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Batches the way `engine eval` measures batch-wise balance, from --data's documents (a folder): every
    `window`-token window of each document (at most n_windows of them, drawn at random), and n_batches
    batches of one window from each of per_batch documents. Returns (windows [B, window], batches
    [n_batches, per_batch] indices into them), or None when there are fewer than per_batch documents
    (a single text, or the default training ids)."""
    from engine.tokenizer import Tokenizer

    if data is None or not Path(data).is_dir() or per_batch < 2:
        return None
    tokenizer = Tokenizer.from_dir(model_dir)
    docs = [tokenizer.encode(t) for t in data_texts(data)]
    rows = [(d, ids[i:i + window]) for d, ids in enumerate(docs) for i in range(0, len(ids) - window + 1, window)]
    g = np.random.default_rng([seed, 1])
    if len(rows) > n_windows:
        rows = [rows[i] for i in sorted(g.choice(len(rows), n_windows, replace=False))]
    doc_of = np.array([d for d, _ in rows])
    by_doc = [np.flatnonzero(doc_of == d) for d in np.unique(doc_of)]
    if len(by_doc) < per_batch:
        return None
    batches = [[g.choice(by_doc[d]) for d in g.choice(len(by_doc), per_batch, replace=False)]
               for _ in range(n_batches)]
    return torch.tensor([r for _, r in rows], dtype=torch.int64), torch.from_numpy(np.array(batches, dtype=np.int64))


def windows(ids: np.ndarray, batch: int, seq_len: int, seed: int, step: int) -> torch.Tensor:
    """B random windows of seq_len tokens, a function of (seed, step) (so a resumed run sees the same)."""
    if ids.size < seq_len + 1:
        raise ValueError(f"the tuning text has {ids.size} tokens; at least {seq_len + 1} are needed")
    g = np.random.default_rng([seed, step])
    starts = g.integers(0, ids.size - seq_len, batch)
    return torch.from_numpy(np.stack([ids[s:s + seq_len] for s in starts]).astype(np.int64))


# ---- checkpoints ----

def routers_of(model: Transformer) -> list[tuple[str, Router]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, Router)]


def save_state(out: Path, model: Transformer, opt: torch.optim.Optimizer, state: dict) -> None:
    tensors = {f"router.{n}.{k}": t.detach().contiguous() for n, r in routers_of(model)
               for k, t in (("weight", r.weight), ("bias", r.bias))}
    tensors |= optimizer_tensors(opt)
    d = out / STATE
    d.mkdir(exist_ok=True)
    save_file(tensors, str(d / "state.tmp"))
    (d / "state.tmp").replace(d / "state.safetensors")
    (d / "state.json").write_text(json.dumps(state))


def load_state(out: Path, model: Transformer, opt: torch.optim.Optimizer) -> dict | None:
    d = out / STATE
    if not (d / "state.json").is_file() or not (d / "state.safetensors").is_file():
        return None
    tensors = load_file(str(d / "state.safetensors"))
    with torch.no_grad():
        for n, r in routers_of(model):
            r.weight.copy_(tensors[f"router.{n}.weight"])
            r.bias.copy_(tensors[f"router.{n}.bias"])
    restore_optimizer(opt, tensors)
    return json.loads((d / "state.json").read_text())


def router_tensors(model: Transformer) -> dict[str, torch.Tensor]:
    """The routers' tensors under their checkpoint names."""
    L, out = model.cfg.num_hidden_layers, {}
    for n, r in routers_of(model):
        out[official_name(f"{n}.weight", L)] = r.weight.detach().float().cpu()
        out[official_name(f"{n}.bias", L)] = r.bias.detach().float().cpu()
    return out


def write_checkpoint(model: Transformer, src: Path, out: Path, healed: bool = False) -> None:
    """The input checkpoint's files with the router tensors replaced (stored dtype kept); after healing,
    every tensor."""
    new = router_tensors(model)
    if healed:
        new = {k: v.float() for k, v in checkpoint_state(model).items()} | new
    for f in checkpoint_files(src):
        tensors = load_file(str(f))
        with safe_open(str(f), "pt") as h:
            meta = h.metadata()
        for name in tensors:
            if name in new:
                tensors[name] = new[name].to(tensors[name].dtype)
        save_file(tensors, str(out / f"{f.name}.tmp"), metadata=meta)
        (out / f"{f.name}.tmp").replace(out / f.name)
    for f in src.iterdir():  # what loading needs; not the source's own logs, evaluations and model card,
        # which describe the untuned routers (this run's log is in `out` already)
        if f.is_file() and (f.name in MODEL_FILES or f.name.endswith(".safetensors.index.json")):
            shutil.copy2(f, out / f.name)
    if not healed:
        check_only_routers_differ(src, out)


def check_only_routers_differ(src: Path, out: Path) -> list[str]:
    """Raise unless both checkpoints hold the same tensors and only router tensors differ; returns
    the names that differ."""
    a = {k: v for f in checkpoint_files(src) for k, v in load_file(str(f)).items()}
    b = {k: v for f in checkpoint_files(out) for k, v in load_file(str(f)).items()}
    if a.keys() != b.keys():
        raise RuntimeError(f"tensor names differ: {sorted(a.keys() ^ b.keys())[:5]}")
    changed = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    bad = [k for k in changed if not k.endswith(ROUTER_SUFFIXES)]
    if bad:
        raise RuntimeError(f"tensors other than the routers' changed: {bad[:5]}")
    return changed


# ---- healing: the rest of the model learns the tuned routing ----

HEAL = "heal"  # in STATE: the model and the healing optimizer's state (default_model.save_checkpoint)


def heal_params(model: Transformer) -> list[tuple[str, torch.nn.Parameter]]:
    """What healing trains: every parameter but the routers' (whose decisions it must not move)."""
    routers = {id(r.weight) for _, r in routers_of(model)}
    return [(n, p) for n, p in model.named_parameters() if id(p) not in routers and p.is_floating_point()]


def soft_union(q: torch.Tensor, window: int) -> torch.Tensor:
    """A differentiable expert union: q [N, E] each token's selection probabilities (summing to 1), tokens
    in order; Σ_e max over each window of `window` tokens, averaged over the whole windows. 1 when a
    window's tokens agree, up to `window` when they share nothing."""
    n = q.shape[0] // window * window
    return q[:n].view(-1, window, q.shape[-1]).amax(dim=1).sum(-1).mean()


def routing_terms(seen: list, s: TuneSettings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The healing's routing terms from the main layers' (router, scores [N, E], ids [N, k]) of one
    forward pass: the mean soft union of the selection softmax((scores + bias) / τ) (τ: heal_temperature,
    else the policy's; a sharp softmax passes gradient only near ties), and the mean and the
    largest over the layers of Switch Transformer's balance loss E · Σ_e f_e · P_e (f: the share of
    choices expert e got, P: its mean selection probability; 1 when even). Gradients reach the hidden
    states, not the routers."""
    unions, balances = [], []
    for r, scores, ids in seen:
        E = scores.shape[-1]
        q = torch.softmax((scores + r.bias) / (s.heal_temperature or s.temperature), dim=-1)
        unions.append(soft_union(q, s.window))
        f = torch.bincount(ids.flatten(), minlength=E).float() / ids.numel()
        balances.append(E * (f * q.mean(0)).sum())
    balances = torch.stack(balances)
    return torch.stack(unions).mean(), balances.mean(), balances.max()


def heal(model: Transformer, ids: np.ndarray, s: TuneSettings, out: Path, state: dict, emit=print) -> None:
    """Recovery training after the routers are tuned: every weight but the routers' learns the LM + MTP
    loss (DeepSeek-V3's objective, as the model was trained) on windows of the tuning text, with the
    tuned routing and the bias held (calibrated just before), so that the experts learn the tokens they
    now get. Router tuning alone trades perplexity for the union (+6.7% for −7.2%, the bundled model);
    healing took that back to +0.3% while keeping the union's cut (docs/routing.md). AdamW as in
    pretraining, a short warm-up then a cosine decay to 30% of heal_lr, resumable from out/STATE/HEAL.
    With heal_union / heal_balance, the loss also takes the main layers' soft expert union per
    verification window and the batch's balance loss (routing_terms): the hidden states learn to route
    neighbouring tokens alike, evenly over a batch."""
    params = heal_params(model)
    for _, p in params:
        p.requires_grad_(True)
    opt = make_optimizer(params, TrainSettings(lr=s.heal_lr))
    # a resumed healing gets back every tensor, the bias it ran under (calibrated before it) included
    if not (state.get("heal_step", 0) and load_checkpoint(out / STATE, HEAL, model, opt) is not None):
        state["heal_step"] = 0
    main = [r for n, r in routers_of(model) if n.startswith("layers.")]
    seen: list = []  # this pass's (router, scores, ids), main layers only

    def observe(router, scores, chosen):
        if len(seen) < len(main):
            seen.append((router, scores, chosen))

    for r in main:
        r.observe = observe
    model.train()
    t0 = time.perf_counter() - state.get("heal_elapsed", 0.0)
    while state["heal_step"] < s.heal_steps:
        step = state["heal_step"]
        for g in opt.param_groups:
            g["lr"] = short_schedule(step, s.heal_steps, s.heal_lr)
        tokens = windows(ids, s.heal_batch, s.heal_seq_len + 1, s.seed + 2, step)
        seen.clear()
        loss, parts = mtp_training_loss(model, tokens, s.mtp_weight)
        if seen and (s.heal_union or s.heal_balance or s.heal_balance_worst):
            union, balance, worst = routing_terms(seen, s)
            loss = loss + s.heal_union * union + s.heal_balance * balance + s.heal_balance_worst * worst
            parts |= {"soft_union": union.item(), "balance": balance.item(), "balance_worst": worst.item()}
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in params], 1.0)
        opt.step()
        state.update(heal_step=step + 1, heal_elapsed=time.perf_counter() - t0, distill_step=0, distill_elapsed=0.0)
        record_step(HEAL, s.heal_steps, parts, {"lm": parts["lm"]}, s.heal_batch * s.heal_seq_len,
                    model, opt, s, out, state, emit)
    log("")
    model.eval()
    for r in main:
        r.observe = None
    for _, p in params:
        p.requires_grad_(False)


def record_step(stage: str, total: int, parts: dict, shown: dict, tokens: int, model: Transformer,
                opt: torch.optim.Optimizer, s: TuneSettings, out: Path, state: dict, emit) -> None:
    """After a step of the healing or the distillation (stage HEAL or DISTILL, its step and elapsed time
    already in state): its line in the log, the progress bar (with `shown`), a checkpoint when due."""
    step, elapsed = state[f"{stage}_step"], state[f"{stage}_elapsed"]
    line = json.dumps({f"{stage}_step": step, **{k: round(v, 5) for k, v in parts.items()},
                       "elapsed_s": round(elapsed, 1)})
    with (out / LOG).open("a") as logf:
        logf.write(line + "\n")
    emit(line)
    log(progress_line(stage, step, total, shown, step * tokens / max(elapsed, 1e-9),
                      elapsed / step * (total - step)), end="")
    if step % s.checkpoint_every == 0 or step == total:
        save_checkpoint(out / STATE, stage, model, opt, state)
        (out / STATE / "state.json").write_text(json.dumps(state))


def short_schedule(step: int, total: int, lr: float) -> float:
    """The learning rate of the runs after tuning: 20 warm-up steps, then a cosine down to 30% of lr."""
    return lr * min(1.0, (step + 1) / 20) * (0.3 + 0.7 * 0.5 * (1 + np.cos(np.pi * step / total)))


# ---- MTP self-distillation: the drafts follow the healed model ----

DISTILL = "distill"  # in STATE: the model and the distillation optimizer's state; distill_ids.npy its text


@torch.no_grad()
def own_text(model: Transformer, ids: np.ndarray, s: TuneSettings, out: Path, state: dict) -> torch.Tensor:
    """[distill_sequences, heal_seq_len]: the main model's greedy continuations of 32-token windows of
    the tuning text (no stop at end of text: every row full), kept in STATE for a resumed run."""
    from engine.generate import generate
    from engine.sampling import SamplingParams

    cache = out / STATE / "distill_ids.npy"
    if cache.is_file() and state.get("distill_step", 0):  # a fresh distillation follows a changed model
        return torch.from_numpy(np.load(cache).astype(np.int64))
    prompts = windows(ids, s.distill_sequences, 32, s.seed + 3, 0).tolist()
    model.setup_caches(1, s.heal_seq_len + 16)
    rows = []
    for i, p in enumerate(prompts):
        log(f"\rtune-routing: the model's own text for the MTP modules {i + 1}/{len(prompts)}", end="")
        rows.append(p + generate(model, p, SamplingParams(max_tokens=s.heal_seq_len - len(p))).token_ids)
    log("")
    text = torch.tensor(rows, dtype=torch.int64)
    np.save(cache, text.numpy())
    return text


def distill_mtp(model: Transformer, ids: np.ndarray, s: TuneSettings, out: Path, state: dict, emit=print) -> None:
    """The MTP modules (every weight but their routers') learn the main model's greedy choices again, as
    the bundled model's build did (default_model.distill): healing moved the main model away from what
    they predicted. Greedy acceptance of the first draft along 20 held-out prompts: 0.785 bundled, 0.735
    healed, 0.801 healed and then distilled for 150 steps (docs/routing.md). Half of each batch is the
    model's own greedy text, half windows of the tuning text; the schedule is the healing's; resumable
    from out/STATE/DISTILL."""
    params = [(n, p) for n, p in heal_params(model) if n.startswith("mtp.")]
    opt = make_optimizer(params, TrainSettings(lr=s.distill_lr))
    if not (state.get("distill_step", 0) and load_checkpoint(out / STATE, DISTILL, model, opt) is not None):
        state["distill_step"] = 0
    own = own_text(model.eval(), ids, s, out, state)
    for _, p in params:
        p.requires_grad_(True)
    model.train()
    half = max(1, s.heal_batch // 2)
    t0 = time.perf_counter() - state.get("distill_elapsed", 0.0)
    while state["distill_step"] < s.distill_steps:
        step = state["distill_step"]
        for g in opt.param_groups:
            g["lr"] = short_schedule(step, s.distill_steps, s.distill_lr)
        pick = torch.from_numpy(np.random.default_rng([s.seed + 4, step]).integers(0, own.shape[0], half))
        batch = torch.cat([own[pick], windows(ids, half, own.shape[1], s.seed + 5, step)])
        loss, parts = distill_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in params], 1.0)
        opt.step()
        state.update(distill_step=step + 1, distill_elapsed=time.perf_counter() - t0)
        record_step(DISTILL, s.distill_steps, {"loss": loss.item(), **parts}, parts, 2 * half * own.shape[1],
                    model, opt, s, out, state, emit)
    log("")
    model.eval()
    for _, p in params:
        p.requires_grad_(False)


# ---- the run ----

def log(msg: str, end: str = "\n") -> None:
    print(msg, end=end, file=sys.stderr, flush=True)


def progress_bar(step: int, total: int, parts: dict, elapsed: float) -> str:
    width, done = 24, min(24, int(24 * step / max(total, 1)))
    eta = elapsed / max(step, 1) * (total - step)
    return (f"\rtune-routing [{'#' * done}{'.' * (width - done)}] {step}/{total} reward {parts['reward']:.3f} "
            f"loss {parts['loss']:.3f} union {parts['union']:.2f} imb {parts['imbalance']:.2f} "
            f"kl {parts['kl']:.4f} eta {eta / 60:.1f}m")


@torch.no_grad()
def calibrate_bias(model: Transformer, tokens: torch.Tensor, batches: torch.Tensor | None = None) -> list[float]:
    """Set every V3 router's bias to the one that balances its load on windows tokens [B, T], deterministic
    routing, in one forward pass: a layer's bias is solved on the affinities of all the tokens (given the
    layers before it, already balanced), then the tokens go on routed by it. Given batches [nb, m] of
    window indices (`document_batches`), a main layer's bias is solved for batch-wise balance over them
    instead (`batch_balancing_bias`); the MTP modules' routers balance all their tokens. Returns each
    router's max/mean load on these tokens (batch-wise: averaged over the batches), in module order."""
    loads = []
    main = {id(r) for r in moe_routers(model)}

    def route(router: Router, scores: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
        if router.method == "noaux_tc":
            if batches is not None and id(router) in main:
                bias, load = batch_balancing_bias(router, scores.view(*tokens.shape, -1), batches)
            else:
                bias, load = balancing_bias(router, scores)
            router.bias.copy_(bias)
            loads.append(load)
            choice = router.mask_groups(scores + bias)
        return choice.topk(router.top_k, dim=-1, sorted=False).indices

    routers = [r for _, r in routers_of(model)]
    for r in routers:
        r.policy = route
    try:  # the main layers, then each MTP depth on the positions it is trained on; no logits
        for _ in mtp_hidden_states(model, model(tokens), tokens):
            pass
    finally:
        for r in routers:
            r.policy = None
    return loads


def tune(model_dir: str | Path, out: str | Path, s: TuneSettings, data: str | None = None,
         emit=print) -> Path:
    """Run (or resume) tuning; writes the tuned checkpoint to `out`; returns it."""
    model_dir, out = Path(model_dir), Path(out)
    if s.balance_scope not in ("rollout", "window"):
        raise ValueError("--balance-scope must be 'rollout' or 'window'")
    if s.credit not in ("layer", "shared"):
        raise ValueError("--credit must be 'layer' or 'shared'")
    if out.resolve() == model_dir.resolve():
        raise ValueError("--out must be another folder than --model")
    (out / STATE).mkdir(parents=True, exist_ok=True)  # heal and distill checkpoints, --steps 0 too
    torch.manual_seed(s.seed)
    model = load_model(model_dir, device="cpu", dtype="float32")
    if (s.heal_steps or s.distill_steps) and quantization_config(model) is not None:
        raise ValueError("--heal-steps and --distill-steps train the full-precision weights: tune, heal and "
                         "distill the model before quantizing it")
    routers = [r for _, r in routers_of(model)]
    if not routers:
        raise ValueError("this model has no MoE layers to tune")
    ref = [(r.weight.detach().clone(), None) for r in routers]  # KL to the starting weights, current bias
    params = [r.weight for r in routers]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=s.lr)
    state = load_state(out, model, opt)
    if state is not None:
        known = {f.name for f in fields(TuneSettings)}  # a state from an older version may name others
        saved = {k: v for k, v in state["settings"].items() if k in known}
        saved.setdefault("credit", "shared")  # what runs saved before per-layer credit existed used
        saved |= {k: getattr(s, k) for k in AFTER_STEPS}  # what happens after the steps may change
        if saved != asdict(s):
            log(f"resuming with the saved settings (given ones differ): {saved}")
            s = TuneSettings(**saved)
        state["settings"] = saved
        log(f"tune-routing: resuming at step {state['step']}")
    state = state or {"step": 0, "settings": asdict(s), "elapsed": 0.0}
    ids = default_ids(model_dir, data)
    if s.seq_len % s.chunk or s.chunk % s.window:
        raise ValueError("seq_len must be a multiple of chunk, and chunk of window")
    if (out / LOG).is_file():  # steps logged after the last checkpoint are run again: drop them
        done = {"step": state["step"], "heal_step": state.get("heal_step", 0),
                "distill_step": state.get("distill_step", 0)}
        kept = [ln for ln in (out / LOG).read_text().splitlines()
                if all(v <= done[k] for k, v in json.loads(ln).items() if k in done)]
        (out / LOG).write_text("".join(ln + "\n" for ln in kept))
    logf = (out / LOG).open("a")
    t0 = time.perf_counter() - state["elapsed"]
    for r in routers:
        r.track_load(True)
    with Sampler(routers, s.temperature) as sampler:
        while state["step"] < s.steps:
            step = state["step"]
            gen = torch.Generator().manual_seed(s.seed * 1_000_003 + step)
            parts = tune_step(model, sampler, ref, opt, windows(ids, s.batch, s.seq_len, s.seed, step), gen, s)
            state.update(step=step + 1, elapsed=time.perf_counter() - t0, heal_step=0, heal_elapsed=0.0,
                         distill_step=0, distill_elapsed=0.0)
            line = json.dumps({"step": step + 1, **{k: round(v, 5) for k, v in parts.items()},
                               "elapsed_s": round(state["elapsed"], 1)})
            logf.write(line + "\n")
            logf.flush()
            emit(line)
            log(progress_bar(step + 1, s.steps, parts, state["elapsed"]), end="")
            if (step + 1) % s.checkpoint_every == 0 or step + 1 == s.steps:
                save_state(out, model, opt, state)
    log("")
    for r in routers:
        r.track_load(False)
    for p in params:
        p.requires_grad_(False)
    n = min(s.calibrate_len, model.cfg.max_position_embeddings, ids.size - 1)

    by_document = document_batches(model_dir, data, s.calibrate_windows, n, s.calibrate_batch, s.seed + 1)

    def calibrate() -> None:
        if by_document is None:
            log(f"tune-routing: balancing the bias on {s.calibrate_windows} windows of {n} tokens")
            loads = calibrate_bias(model, windows(ids, s.calibrate_windows, n, s.seed + 1, 0))
        else:
            tokens, batches = by_document
            log(f"tune-routing: balancing the bias batch-wise on {len(batches)} batches of {batches.shape[1]} "
                f"documents' {n}-token windows ({len(tokens)} windows)")
            loads = calibrate_bias(model, tokens, batches)
        log(f"tune-routing: max/mean load on them {max(loads, default=1.0):.3f} at worst")

    if s.heal_steps:
        if s.calibrate_windows and state.get("heal_step", 0) == 0:
            calibrate()  # heal under the routing that will be used, not GRPO's running bias
        heal(model, ids, s, out, state, emit)
    if s.distill_steps:
        if s.calibrate_windows and state.get("distill_step", 0) == 0:
            calibrate()  # the drafts learn the main model's final routing
        distill_mtp(model, ids, s, out, state, emit)
    if s.calibrate_windows:
        calibrate()
    trained = s.heal_steps > 0 or s.distill_steps > 0
    write_checkpoint(model, model_dir, out, healed=trained)
    (out / "tuning.json").write_text(json.dumps({"source": str(model_dir), "settings": asdict(s),
                                                 "steps_done": state["step"],
                                                 "heal_steps_done": state.get("heal_step", 0),
                                                 "distill_steps_done": state.get("distill_step", 0)}, indent=1))
    return out


def settings_from(args) -> TuneSettings:
    """Argparse namespace → TuneSettings (fields of the same names, '-' as '_', None = default)."""
    given = {f.name: getattr(args, f.name) for f in fields(TuneSettings) if getattr(args, f.name, None) is not None}
    return TuneSettings(**given)
