"""Write the trained default model into assets/, measure it as the app will load it, write its card."""
from __future__ import annotations

import json
import math
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from engine.bench import BUILTIN_PROMPTS, configurations, run_bench
from engine.evaluate import token_nll
from engine.generate import generate
from engine.model.checkpoint import save_model
from engine.model.transformer import Transformer
from engine.pretrained import Pretrained, load_pretrained
from engine.sampling import SamplingParams
from engine.speculative import SpeculativeConfig

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def unigram_perplexity(train_ids: np.ndarray, held_ids: np.ndarray, vocab: int) -> float:
    counts = np.bincount(train_ids.astype(np.int64), minlength=vocab).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(math.exp(-logp[held_ids[1:].astype(np.int64)].mean()))


@torch.inference_mode()
def mtp_agreement(model: Transformer, held_ids: np.ndarray, windows: int = 16, length: int = 256) -> list[float]:
    """Teacher-forced: how often depth k's argmax equals the main model's at the same position."""
    rng = np.random.default_rng(0)
    agree = [0.0] * len(model.mtp)
    for _ in range(windows):
        st = int(rng.integers(0, len(held_ids) - length))
        tokens = torch.from_numpy(held_ids[st:st + length].astype(np.int64))[None]
        hidden = model(tokens)
        teacher = model.logits(hidden).argmax(-1)
        for k in range(1, len(model.mtp) + 1):
            n = length - k
            hidden = model.mtp_forward(k - 1, hidden[:, :n], tokens[:, k:k + n])
            agree[k - 1] += (model.mtp_logits(k - 1, hidden).argmax(-1) == teacher[:, k:k + n]).float().mean().item()
    return [a / windows for a in agree]


def greedy_acceptance(pre: Pretrained, held_ids: np.ndarray, prompts: int = 20, k: int = 3) -> dict:
    """Acceptance per draft position along the model's own greedy continuations of held-out prompts."""
    rng = np.random.default_rng(1)
    reached, accepted = [0] * k, [0] * k
    for _ in range(prompts):
        st = int(rng.integers(0, len(held_ids) - 64))
        ids = held_ids[st:st + 48].astype(np.int64).tolist()
        r = generate(pre.model, ids, SamplingParams(max_tokens=128), speculative=SpeculativeConfig(k=k))
        for j in range(k):
            reached[j] += r.stats["reached_per_position"][j]
            accepted[j] += r.stats["accepted_per_position"][j]
    return {"k": k, "prompts": prompts, "acceptance_per_position": [a / r if r else None for a, r in zip(accepted, reached)]}


CHAT_QUESTIONS = (
    "What does `json.dumps` do?", "What is `os.path.join`?", "Explain `collections.Counter`.",
    "What does `argparse.ArgumentParser.add_argument` do?", "What is `queue.Queue`?", "Describe `warnings.warn`.",
    "What does `filecmp.cmp` do?", "What is `netrc.netrc`?", "What does `shutil.copy` do?", "What is `re.compile`?",
    "What does `itertools.chain` do?", "What is `functools.partial`?", "What does `math.sqrt` do?",
    "What is `pathlib.Path`?", "What does `random.choice` do?", "What is `subprocess.run`?",
    "What does `time.sleep` do?", "What is `datetime.timedelta`?", "What does `heapq.heappush` do?",
    "What is `threading.Lock`?")


def chat_endings(pre: Pretrained, max_tokens: int = 128) -> dict:
    """How many greedy replies to CHAT_QUESTIONS end (the model's end-of-turn) within max_tokens. A model
    that has lost its chat turns runs every reply to the limit: healing on the library's documents alone
    did that (0 of 20), where the model as built ended 11."""
    ended, lengths = 0, []
    for q in CHAT_QUESTIONS:
        r = generate(pre.model, pre.encode_prompt(chat=[{"role": "user", "content": q}]),
                     SamplingParams(max_tokens=max_tokens), eos_ids=pre.eos_ids)
        ended += r.finish_reason == "stop"
        lengths.append(len(r.token_ids))
    return {"ended": ended, "questions": len(CHAT_QUESTIONS), "max_tokens": max_tokens,
            "mean_tokens": sum(lengths) / len(lengths)}


def measure(pre: Pretrained, work: Path) -> dict:
    held = np.load(work / "held_out_ids.npy")
    train = np.load(work / "train_ids.npy")
    nll, n = token_nll(pre.model, held.astype(np.int64).tolist(), window=512)
    figures = {"held_out_perplexity": math.exp(nll / n), "held_out_tokens": n,
               "unigram_perplexity": unigram_perplexity(train, held, pre.cfg.vocab_size),
               "mtp_teacher_forced_agreement": mtp_agreement(pre.model, held),
               "mtp_greedy_acceptance": greedy_acceptance(pre, held), "chat_endings": chat_endings(pre)}
    configs = configurations(["mtp"], ["1", "2", "3", "auto"])
    bench = run_bench(pre, BUILTIN_PROMPTS, configs, max_tokens=128, repeat=3)
    figures["bench"] = bench["configs"]
    return figures


def export_default(model: Transformer, work: Path, out: Path, meta: dict, settings, wall_s: float) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    save_model(model, out, dtype=torch.bfloat16)
    for f in TOKENIZER_FILES:
        shutil.copy(work / f, out / f)
    pre = load_pretrained(out, device="cpu")
    t0 = time.perf_counter()
    figures = measure(pre, work)
    figures["measure_s"] = time.perf_counter() - t0
    logs = {stage: _last_log(work / f"{stage}_log.jsonl") for stage in ("pretrain", "distill")}
    info = {"name": out.name, "params": pre.model.param_counts(), "corpus": meta["corpus"],
            "train_tokens": meta["train_tokens"], "held_out_tokens": meta["held_out_tokens"],
            "settings": vars(settings) if hasattr(settings, "__dict__") else settings, "last_log": logs,
            "build_wall_s": wall_s, "machine": {"cpu": platform.processor() or platform.machine(),
                                                "threads": torch.get_num_threads(), "torch": torch.__version__},
            "figures": figures, "size_bytes": (out / "model.safetensors").stat().st_size}
    (out / "figures.json").write_text(json.dumps(info, indent=1))
    (out / "MODEL_CARD.md").write_text(model_card(info))
    return out


def _last_log(path: Path) -> dict | None:
    if not path.exists():
        return None
    lines = path.read_text().strip().splitlines()
    return json.loads(lines[-1]) if lines else None


def model_card(info: dict) -> str:
    f, p, c = info["figures"], info["params"], info["corpus"]
    auto = f["bench"].get("mtp k=auto", {})
    acc = f["mtp_greedy_acceptance"]["acceptance_per_position"]
    rows = "\n".join(
        f"| {name} | {e['median_decode_tokens_per_s']:.1f} | {e['speedup']:.2f}x | {e['min_prompt_speedup']:.2f}x | "
        f"{e.get('mean_accepted_length') or 1:.2f} | {e['identical_to_off']} |" for name, e in f["bench"].items())
    s = info["settings"]
    return f"""# {info['name']}

The default model bundled with moedesk: a small DeepSeek-V3-architecture Mixture-of-Experts language
model with two Multi-Token-Prediction modules, trained from nothing on this project's own scripts
(`python -m engine train-default`), on the Python standard library. It knows Python's standard library
a little and chats in a simple template; it is here so the app works offline out of the box and so
MTP speculative decoding has a model of the right architecture to run on.

## Architecture

DeepSeek-V3 (`model_type: deepseek_v3`, loadable by transformers): MLA attention, DeepSeekMoE with
8 routed experts (top-2, sigmoid scores, 4 groups of which 2 are used, score-correction bias balanced
by the auxiliary-loss-free update during training) plus 2 shared experts, first layer dense,
2 MTP modules (DeepSeek's naming: `model.layers.12.*`, `model.layers.13.*`).

- Parameters: {p['total']:,} in all ({p['main']:,} main model, {p['mtp']:,} MTP modules);
  {p['active_per_token']:,} active per token in the main model (without the embedding table).
- Weights: bfloat16 safetensors, {info['size_bytes'] / 2**20:.1f} MiB.

## Data

Built deterministically from the standard library of Python {c['python']} (sources read with `ast`,
never imported): source files of {c['modules_train']} top-level modules, plus {c['chats_train']:,}
chat-formatted questions about modules, classes and functions answered with their signatures and
docstrings. Held out by module: {', '.join(c['held_out_modules'])}.
Corpus sha256 `{c['sha256']}`. {info['train_tokens']:,} training tokens, {info['held_out_tokens']:,}
held-out tokens; byte-level BPE tokenizer with 4,096 tokens trained on the training part.

## Training

Seed {s['seed']}; batch {s['batch']} × {s['seq_len']} tokens; AdamW, peak lr {s['lr']}, cosine decay;
loss = LM + {s['mtp_weight']}·mean(MTP losses); bias step γ = {s['bias_step']}. Then the MTP modules
alone were distilled on the main model's own greedy choices (half its own greedy continuations, half
corpus windows). Last logged values: {json.dumps(info['last_log'])}.
Whole build: {info['build_wall_s'] / 60:.0f} minutes on {info['machine']['threads']} CPU threads
({info['machine']['cpu']}, torch {info['machine']['torch']}).

## Measured figures

Measured on the exported files as the app loads them (fp32 on the CPU):

- Held-out perplexity: **{f['held_out_perplexity']:.2f}** over {f['held_out_tokens']:,} tokens
  (unigram baseline: {f['unigram_perplexity']:.1f}; ratio {f['held_out_perplexity'] / f['unigram_perplexity']:.3f}).
- Greedy MTP acceptance along the model's own continuations of {f['mtp_greedy_acceptance']['prompts']}
  held-out prompts, per draft position (conditional on the earlier drafts accepted):
  {', '.join(f'{a:.2f}' for a in acc if a is not None)}; position 1: **{acc[0]:.2f}**.
- Teacher-forced agreement of MTP depth k with the main model on held-out text: {', '.join(f'{a:.2f}' for a in f['mtp_teacher_forced_agreement'])}.
{chat_line(f.get('chat_endings'))}- Decode speed, `engine bench` (greedy, 128 tokens, built-in chat/code/prose prompts, 3 interleaved
  rounds, medians; speedups against speculation off in the same run):

| config | decode tok/s | speedup | worst prompt | tokens per verify step | identical output |
|---|---|---|---|---|---|
{rows}

MTP speculation with automatic draft length: **{auto.get('speedup', 0):.2f}×** over plain decoding.
{routing_section(info.get('routing'))}{quantization_section(f.get('quantization'))}"""


def chat_line(c: dict | None) -> str:
    """The card's line on chat replies that end (chat_endings), if measured."""
    if not c:
        return ""
    return (f"- Greedy chat replies to {c['questions']} fixed questions about standard-library names that end within "
            f"{c['max_tokens']} tokens: {c['ended']} (mean length {c['mean_tokens']:.0f} tokens).\n")


def routing_section(r: dict | None) -> str:
    """The card's account of the router tuning that produced these weights (scripts/ship_tuned.py)."""
    if not r:
        return ""
    t, before, after = r["settings"], r["before"], r["after"]
    rows = "\n".join(f"| {name} | {before[key]:{fmt}} | {after[key]:{fmt}} | {(after[key] / before[key] - 1) * 100:+.1f}% |"
                     for name, key, fmt in (("perplexity", "perplexity", ".2f"),
                                            ("expert union per 4-token window", "union", ".3f"),
                                            ("batch-wise max/mean load", "batch_load", ".3f")))
    return f"""
## Routing tuned for speculation

After the build above, the routers were tuned with GRPO for a smaller expert union per verification
window, the rest of the model healed under the tuned routing, and the MTP modules distilled again on the
healed model's own greedy text (`engine tune-routing --steps {t['steps']} --heal-steps {t['heal_steps']}
--heal-union {t['heal_union']} --heal-balance {t['heal_balance']} --distill-steps {t['distill_steps']}`,
then the bias balanced {r.get('calibration', 'on held-out development files')}; docs/routing.md).
{r['minutes']:.0f} minutes on 2 CPU threads. On {r['test_files']} held-out standard-library files never used
to choose anything (`engine eval --text-file DIR`), before (the model as built) and after:

| figure | before | after | change |
|---|---|---|---|
{rows}
"""


def quantization_section(q: dict | None) -> str:
    """The card's table of weight variants (scripts/quant_figures.py measures them), if measured."""
    if not q:
        return ""
    rows = "\n".join(
        f"| {name} | {v['perplexity']:.2f} ({v['perplexity_change_pct']:+.2f}%) | {v['model_bytes'] / 2**20:.1f} | "
        f"{v['bytes_per_token'] / 2**20:.2f} | " + (
            f"{v['decode_tokens_per_s']:.1f} | {v['decode_vs_fp32']:.2f}x | {v['mtp_auto_speedup']:.2f}x | "
            f"{v['identical']} |" if "decode_tokens_per_s" in v else "- | - | - | - |")
        for name, v in q["variants"].items())
    return f"""
## Quantized weights

Weight-only quantization while loading (`--quant`, see docs/quantization.md): perplexity on the same
held-out text ({q['tokens']:,} tokens, `engine.evaluate.perplexity`), bytes of weights in memory and read
per decoded token (top-2 experts per MoE layer), and `engine bench --quant {q['bench_variants']}` in one
run ({q['bench_settings']}): plain decode tok/s, against fp32 in the same run, MTP k=auto speedup over
plain decoding of the same variant, and whether greedy speculative output equals plain decoding.

| weights | perplexity | MiB | MiB read per token | decode tok/s | vs fp32 | MTP auto | identical |
|---|---|---|---|---|---|---|---|
{rows}

This model is small enough to sit in the CPU's caches, so fewer bytes barely change its speed here;
on a random-weight model with DeepSeek-V2-Lite's layer shapes (4 layers, 16 experts) the same kernels
decode {q['bandwidth_bound']}.
"""
