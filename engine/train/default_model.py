"""`python -m engine train-default`: build the bundled model from nothing, resumably.

Stages, each skipped when its output exists in the work folder:
  data     corpus from the standard library → BPE tokenizer → token ids (train / held-out)
  pretrain main model + MTP modules jointly (LM + λ·MTP loss), bias balanced without auxiliary loss
  distill  MTP modules alone, taught to predict the main model's own greedy choices
  export   assets/models/<name>/ (config, safetensors, tokenizer, model card with measured figures)
Checkpoints (safetensors + a JSON state) are written every few minutes; rerunning continues.
"""
from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from engine.model.config import parse_config
from engine.model.transformer import Transformer
from engine.paths import BUNDLED_MODEL, ROOT
from engine.routing import Router
from engine.train.architecture import MAX_POSITIONS, VOCAB_SIZE, default_config
from engine.train.corpus import build_corpus
from engine.train.mtp_loss import mtp_training_loss
from engine.train.tokenizer_train import BOS_ID, EOS_ID, train_bpe, write_tokenizer_files

DEFAULT_OUT = BUNDLED_MODEL
DEFAULT_WORK = ROOT / ".cache" / "train-default"


@dataclass
class TrainSettings:
    minutes: float = 80.0  # whole build, all stages
    seed: int = 0
    batch: int = 16
    seq_len: int = 256
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup: int = 150
    weight_decay: float = 0.1
    mtp_weight: float = 0.3
    bias_step: float = 1e-3  # γ of the auxiliary-loss-free balancing
    chat_repeat: int = 2  # the chat part is small and what the app is for: seen twice per epoch
    distill_share: float = 0.12  # of the minutes, for MTP self-distillation
    distill_sequences: int = 96  # greedy continuations generated for it
    checkpoint_every_s: float = 240.0


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- data ----

def prepare_data(work: Path) -> dict:
    meta_path = work / "data.json"
    if meta_path.exists():
        return json.loads(meta_path.read_text())
    work.mkdir(parents=True, exist_ok=True)
    log("data: building the corpus from the standard library")
    corpus = build_corpus()
    tok = train_bpe(corpus.train + [m["content"] for c in corpus.train_chats for m in c], VOCAB_SIZE)
    write_tokenizer_files(tok, work, MAX_POSITIONS)
    from engine.tokenizer import Tokenizer
    tokenizer = Tokenizer.from_dir(work)

    def encode(docs, chats, repeat=1):
        ids: list[int] = []
        for enc in tok.encode_batch(docs, add_special_tokens=False):
            ids += [BOS_ID, *enc.ids, EOS_ID]
        rendered = [tokenizer.render_chat(c, add_generation_prompt=False) for c in chats]
        for _ in range(repeat):
            for enc in tok.encode_batch(rendered, add_special_tokens=False):
                ids += enc.ids
        return np.asarray(ids, dtype=np.uint16)

    train = encode(corpus.train, corpus.train_chats, TrainSettings.chat_repeat)
    held = encode(corpus.held_out, corpus.held_out_chats)
    np.save(work / "train_ids.npy", train)
    np.save(work / "held_out_ids.npy", held)
    (work / "held_out.txt").write_text("\n\n".join(corpus.held_out), encoding="utf-8")
    meta = {"corpus": corpus.describe(), "train_tokens": int(train.size), "held_out_tokens": int(held.size),
            "vocab_size": VOCAB_SIZE}
    meta_path.write_text(json.dumps(meta, indent=1))
    log(f"data: {train.size:,} training tokens, {held.size:,} held-out tokens")
    return meta


class Batches:
    """Random windows of seq_len+1 tokens from the training stream, from a seeded generator."""

    def __init__(self, ids: np.ndarray, batch: int, seq_len: int, seed: int):
        self.ids = torch.from_numpy(ids.astype(np.int64))
        self.batch, self.seq_len = batch, seq_len
        self.seed = seed

    def get(self, step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        starts = torch.randint(0, self.ids.numel() - self.seq_len - 1, (self.batch,), generator=g)
        return torch.stack([self.ids[s:s + self.seq_len + 1] for s in starts.tolist()])


# ---- checkpoints ----

def optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The optimizer's per-parameter state as flat tensors `opt.{param id}.{name}` (for safetensors)."""
    return {f"opt.{pid}.{k}": v.contiguous() for pid, entry in opt.state_dict()["state"].items()
            for k, v in entry.items()}


def restore_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    """The inverse of optimizer_tensors (other keys in `tensors` are ignored)."""
    sd = opt.state_dict()
    sd["state"] = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, pid, name = key.split(".", 2)
            sd["state"].setdefault(int(pid), {})[name] = v
    opt.load_state_dict(sd)


def save_checkpoint(work: Path, stage: str, model: Transformer, opt: torch.optim.Optimizer, state: dict) -> None:
    """Model and optimizer tensors in safetensors (nothing pickled), the rest in JSON; atomic."""
    tensors = {f"model.{k}": v.contiguous() for k, v in model.state_dict().items()} | optimizer_tensors(opt)
    tmp = work / f"{stage}.tmp.safetensors"
    save_file(tensors, str(tmp))
    tmp.replace(work / f"{stage}.safetensors")
    (work / f"{stage}.json").write_text(json.dumps(state))


def load_checkpoint(work: Path, stage: str, model: Transformer, opt: torch.optim.Optimizer) -> dict | None:
    path = work / f"{stage}.safetensors"
    if not path.exists() or not (work / f"{stage}.json").exists():
        return None
    tensors = load_file(str(path))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    restore_optimizer(opt, tensors)
    log(f"{stage}: resuming from its checkpoint")
    return json.loads((work / f"{stage}.json").read_text())


# ---- training ----

def new_model(seed: int) -> Transformer:
    cfg = parse_config(default_config())
    model = Transformer(cfg, n_mtp=cfg.num_nextn_predict_layers)
    model.init_weights(seed=seed, std=0.02)
    with torch.no_grad():  # scale residual-branch outputs down with depth (GPT-2 style)
        for block in [*model.layers, *(m.block for m in model.mtp)]:
            block.attn.out_proj.weight /= math.sqrt(2 * cfg.num_hidden_layers)
            ffn = block.ffn
            if hasattr(ffn, "experts"):
                ffn.experts.down /= math.sqrt(2 * cfg.num_hidden_layers)
                ffn.shared_experts.down_proj.weight /= math.sqrt(2 * cfg.num_hidden_layers)
            else:
                ffn.down_proj.weight /= math.sqrt(2 * cfg.num_hidden_layers)
    return model


def make_optimizer(params: list[tuple[str, torch.nn.Parameter]], s: TrainSettings) -> torch.optim.AdamW:
    decay = [p for n, p in params if p.dim() >= 2 and "router" not in n]
    other = [p for n, p in params if not (p.dim() >= 2 and "router" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": s.weight_decay},
                              {"params": other, "weight_decay": 0.0}], lr=s.lr, betas=(0.9, 0.95))


def lr_at(step: int, total: int, s: TrainSettings) -> float:
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    t = min(1.0, (step - s.warmup) / max(1, total - s.warmup))
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def progress_line(stage: str, step: int, total: int, parts: dict, tok_s: float, eta_s: float) -> str:
    width = 24
    done = min(width, int(width * step / total)) if total else 0
    losses = " ".join(f"{k} {v:.3f}" for k, v in parts.items())
    return f"\r{stage} [{'#' * done}{'.' * (width - done)}] {step}/{total} {losses} {tok_s:,.0f} tok/s eta {eta_s / 60:.0f}m"


def max_mean_load(routers: list[Router]) -> float | None:
    """The busiest expert's tokens over the mean, averaged over routers, from their counted loads."""
    loads = [r.load.float() for r in routers if r.load is not None and r.load.sum() > 0]
    return round(sum(float(x.max() / x.mean()) for x in loads) / len(loads), 4) if loads else None


def pretrain(work: Path, s: TrainSettings, budget_s: float) -> Transformer:
    torch.manual_seed(s.seed)
    model = new_model(s.seed).train()
    routers = [m for m in model.modules() if isinstance(m, Router)]
    params = [(n, p) for n, p in model.named_parameters()]
    opt = make_optimizer(params, s)
    state = load_checkpoint(work, "pretrain", model, opt) or {"step": 0, "total": None, "elapsed": 0.0}
    if state.get("done"):
        return model.eval()
    batches = Batches(np.load(work / "train_ids.npy"), s.batch, s.seq_len, s.seed)
    logf = (work / "pretrain_log.jsonl").open("a")
    for r in routers:
        r.track_load(True)
    t_start, last_ckpt = time.perf_counter() - state["elapsed"], time.perf_counter()
    step = state["step"]
    while True:
        elapsed = time.perf_counter() - t_start
        if state["total"] is None and step == 20:  # fix the schedule from the measured speed
            state["total"] = max(step + 1, int(budget_s / (elapsed / 20)))
            log(f"\npretrain: {state['total']} steps fit in {budget_s / 60:.0f} minutes")
        total = state["total"] or 10**9
        if step >= total:
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(step, state["total"] or 10**6, s)
        batch = batches.get(step)
        loss, parts = mtp_training_loss(model, batch, s.mtp_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        # auxiliary-loss-free balancing after each batch; first note the batch's imbalance for the log
        imbalance = max_mean_load(routers) if (step + 1) % 10 == 0 else None
        for r in routers:
            r.balance_bias(s.bias_step)
        step += 1
        tok_s = step * s.batch * s.seq_len / max(elapsed, 1e-9) if elapsed else 0
        if step % 10 == 0:
            logf.write(json.dumps({"step": step, "lr": opt.param_groups[0]["lr"], **parts,
                                   "max_mean_load": imbalance, "elapsed_s": round(elapsed, 1)}) + "\n")
            logf.flush()
            eta = (total - step) * elapsed / step if state["total"] else 0
            print(progress_line("pretrain", step, state["total"] or 0, parts, tok_s, eta),
                  end="", file=sys.stderr, flush=True)
        if time.perf_counter() - last_ckpt > s.checkpoint_every_s:
            state.update(step=step, elapsed=time.perf_counter() - t_start)
            save_checkpoint(work, "pretrain", model, opt, state)
            last_ckpt = time.perf_counter()
    for r in routers:
        r.track_load(False)
    state.update(step=step, elapsed=time.perf_counter() - t_start, done=True)
    save_checkpoint(work, "pretrain", model, opt, state)
    log("")
    return model.eval()


# ---- MTP self-distillation ----

@torch.inference_mode()
def greedy_continuations(model: Transformer, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """The main model's own greedy text: what the MTP modules will have to predict at run time."""
    from engine.generate import generate
    from engine.sampling import SamplingParams
    return [p + generate(model, p, SamplingParams(max_tokens=max_tokens), eos_ids=(EOS_ID,)).token_ids
            for p in prompts]


def distill_batches(work: Path, model: Transformer, s: TrainSettings) -> list[torch.Tensor]:
    """Sequences to distill on: the model's greedy continuations of training windows and chat prompts."""
    cache = work / "distill_ids.npy"
    if cache.exists():
        rows = np.load(cache)
        return [torch.from_numpy(r.astype(np.int64)) for r in rows]
    ids = np.load(work / "train_ids.npy")
    rng = random.Random(s.seed)
    prompts, n_generated = [], s.distill_sequences
    chat_starts = np.flatnonzero(ids == BOS_ID)
    for i in range(n_generated):
        if i % 2:  # a chat (or document) opening: bos + its first 24 tokens
            st = int(chat_starts[rng.randrange(len(chat_starts))])
            prompts.append(ids[st:st + 24].astype(np.int64).tolist())
        else:
            st = rng.randrange(len(ids) - 64)
            prompts.append(ids[st:st + 32].astype(np.int64).tolist())
    log(f"distill: generating {n_generated} greedy continuations")
    seqs = greedy_continuations(model, prompts, s.seq_len - 32)
    rows = np.zeros((len(seqs), s.seq_len), dtype=np.uint16)
    for i, sq in enumerate(seqs):
        sq = (sq + [EOS_ID] * s.seq_len)[:s.seq_len]
        rows[i] = sq
    np.save(cache, rows)
    return [torch.from_numpy(r.astype(np.int64)) for r in rows]


def distill_loss(model: Transformer, tokens: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Depth k at position i learns the main model's greedy choice at position i+k."""
    with torch.no_grad():
        hidden = model(tokens)
        teacher = model.logits(hidden).argmax(-1)  # [B, T]: main's prediction for token i+1
    T, losses = tokens.shape[1], {}
    total = 0.0
    for k in range(1, len(model.mtp) + 1):
        n = T - k
        hidden = model.mtp_forward(k - 1, hidden[:, :n], tokens[:, k:k + n])
        logits = model.mtp_logits(k - 1, hidden)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), teacher[:, k:k + n].flatten())
        with torch.no_grad():
            losses[f"agree{k}"] = (logits.argmax(-1) == teacher[:, k:k + n]).float().mean().item()
        total = total + loss
    return total, losses


def distill(work: Path, model: Transformer, s: TrainSettings, budget_s: float) -> Transformer:
    model.requires_grad_(False)
    params = [(n, p) for n, p in model.named_parameters() if n.startswith("mtp.")]
    for _, p in params:
        p.requires_grad_(True)
    opt = make_optimizer(params, s)
    state = load_checkpoint(work, "distill", model, opt) or {"step": 0, "elapsed": 0.0}
    if state.get("done"):
        return model.eval().requires_grad_(False)
    model.setup_caches(1, s.seq_len + 16)
    t_gen = time.perf_counter()
    generated = distill_batches(work, model.eval(), s)
    state.setdefault("generate_s", time.perf_counter() - t_gen)
    corpus = Batches(np.load(work / "train_ids.npy"), s.batch // 2, s.seq_len - 1, s.seed + 1)
    rng = random.Random(s.seed + state["step"])
    t_start, last_ckpt, step = time.perf_counter() - state["elapsed"], time.perf_counter(), state["step"]
    logf = (work / "distill_log.jsonl").open("a")
    model.train()
    while time.perf_counter() - t_start < budget_s:
        own = torch.stack(rng.sample(generated, min(len(generated), s.batch // 2)))
        batch = torch.cat([own, corpus.get(step)])  # half own greedy text, half corpus
        for g in opt.param_groups:
            g["lr"] = s.lr * 0.5 * min(1.0, (step + 1) / 50)
        loss, parts = distill_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in params], 1.0)
        opt.step()
        step += 1
        elapsed = time.perf_counter() - t_start
        if step % 5 == 0:
            logf.write(json.dumps({"step": step, "loss": loss.item(), **parts, "elapsed_s": round(elapsed, 1)}) + "\n")
            logf.flush()
            print(progress_line("distill", int(elapsed), int(budget_s), parts, 0, budget_s - elapsed),
                  end="", file=sys.stderr, flush=True)
        if time.perf_counter() - last_ckpt > s.checkpoint_every_s:
            state.update(step=step, elapsed=elapsed)
            save_checkpoint(work, "distill", model, opt, state)
            last_ckpt = time.perf_counter()
    state.update(step=step, elapsed=time.perf_counter() - t_start, done=True)
    save_checkpoint(work, "distill", model, opt, state)
    log("")
    return model.eval().requires_grad_(False)


def load_stage(work: Path, stage: str, s: TrainSettings) -> Transformer | None:
    """The model as a finished stage left it."""
    state_path = work / f"{stage}.json"
    if not state_path.exists() or not json.loads(state_path.read_text()).get("done"):
        return None
    model = new_model(s.seed)
    tensors = load_file(str(work / f"{stage}.safetensors"))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    return model.eval().requires_grad_(False)


def build(out: Path = DEFAULT_OUT, work: Path = DEFAULT_WORK, s: TrainSettings | None = None) -> Path:
    """All stages, resuming where an earlier run stopped; returns the exported model folder."""
    s = s or TrainSettings()
    torch.manual_seed(s.seed)
    work.mkdir(parents=True, exist_ok=True)
    meta = prepare_data(work)
    budget = s.minutes * 60
    t0 = time.perf_counter()  # this run's data preparation is counted in the export's share
    model = load_stage(work, "distill", s)
    if model is None:
        model = load_stage(work, "pretrain", s) or pretrain(work, s, max(60.0, budget * (1 - s.distill_share) - 240))
        model = distill(work, model, s, budget * s.distill_share)
    from engine.train.export import export_default
    stage_s = sum(json.loads((work / f"{st}.json").read_text()).get("elapsed", 0.0) for st in ("pretrain", "distill"))
    generate_s = json.loads((work / "distill.json").read_text()).get("generate_s", 0.0)
    return export_default(model, work, out, meta, s, stage_s + generate_s + time.perf_counter() - t0)
