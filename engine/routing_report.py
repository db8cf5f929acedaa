"""`python -m engine routing-report`: a routing change judged on held-out text, before against after.

For two checkpoints of one model (typically the input and output of `engine tune-routing`), on held-out
documents:
  text     perplexity and routing statistics of the documents taken as one text (engine.evaluate,
           engine.routing_stats), the MTP modules' teacher-forced acceptance on it (`mtp_acceptance`), and
           the batch-wise load over the documents (routing_stats.batch_load: one window from each)
  bench    decode speed with MTP speculation off and on, both models interleaved in one run (engine.bench,
           greedy): speedups, acceptance per draft position, whether speculative output equals plain
  checks   the routing-tuning targets: expert union per 4-token window at least 15% lower, perplexity at
           most 2% higher, batch-wise max/mean expert load at most 1.3 (DeepSeek-V3 balances whole
           batches; the load within one text is reported, not bounded), speculative output identical
"""
from __future__ import annotations

import torch

from engine.bench import BUILTIN_PROMPTS, configurations, run_bench
from engine.evaluate import score_ids
from engine.pretrained import Pretrained
from engine.routing_stats import BATCH_DOCUMENTS, BATCH_WINDOW, batch_load
from engine.train.mtp_loss import mtp_hidden_states

UNION_K = "3"  # a verification window of 4 tokens: 3 drafts and the token before them
TARGETS = {"union_drop": 0.15, "perplexity_rise": 0.02, "batch_max_mean_load": 1.3}


@torch.inference_mode()
def mtp_acceptance(model, ids: list[int], window: int = 512) -> list[float]:
    """Teacher-forced acceptance of greedy MTP drafts over a text, per draft position (conditional: of
    the positions whose earlier drafts all held, the share where this one does too).

    At position i, depth d drafts token i+d+1 from the true tokens up to i+d; the draft holds when it is
    the main model's greedy choice for that token given the same tokens. Decoding feeds the drafts
    themselves instead of the text's tokens, so this is the text-side counterpart of the acceptance
    `engine bench` measures on generated text. Windows of `window` tokens, scored independently."""
    device = model.norm.weight.device
    window = min(window, model.cfg.max_position_embeddings)
    reached, held = [0] * len(model.mtp), [0] * len(model.mtp)
    for start in range(0, max(len(ids) - 1, 1), window):
        tokens = torch.tensor([ids[start:start + window]], device=device)
        hidden = model(tokens)
        main = model.logits(hidden)[0].argmax(-1)  # main[i]: greedy token i+1
        alive = None
        for d, h in mtp_hidden_states(model, hidden, tokens):  # h: positions i = 0..n-1, drafting token i+d+1
            n = h.shape[1]
            ok = model.mtp_logits(d - 1, h)[0].argmax(-1) == main[d:d + n]
            alive = torch.ones_like(ok) if alive is None else alive[:n]
            reached[d - 1] += int(alive.sum())
            held[d - 1] += int((ok & alive).sum())
            alive = alive & ok
    return [h / r if r else None for h, r in zip(held, reached)]


def text_figures(pre: Pretrained, documents: list[str], window: int = 512) -> dict:
    ids = pre.tokenizer.encode("\n\n".join(documents))
    res = score_ids(pre.model, ids, window, routing=True)
    r = res["routing"]
    if r is None:
        raise ValueError(f"{pre.path} has no MoE layers: there is no routing to report on")
    return {"perplexity": res["perplexity"], "tokens": res["tokens"],
            "max_mean_load": r["max_mean_load"], "max_mean_load_worst": r["max_mean_load_worst"],
            "cv": r["cv"], "entropy": r["entropy"], "expert_union": r["expert_union"],
            "load_per_layer": [x["max_mean_load"] for x in r["layers"]],
            # U(4)/top_k: how many single tokens' worth of experts a 4-token verification reads, per layer
            "union_per_top_k_layers": [x["expert_union"][UNION_K] / r["top_k"] for x in r["layers"]],
            "mtp_acceptance_per_position": mtp_acceptance(pre.model, ids, window),
            **batch_load(pre.model, [pre.tokenizer.encode(d) for d in documents], BATCH_WINDOW,
                         min(BATCH_DOCUMENTS, len(documents)))}


def bench_figures(before: Pretrained, after: Pretrained, ks: list[str], max_tokens: int, repeat: int,
                  progress=None) -> dict:
    """Both models' plain and MTP decoding in one interleaved run; per model and k: speedup over its own
    plain decoding, acceptance per position, identical_to_off."""
    models = {"before": before, "after": after}
    configs = configurations(["off", "mtp"], ks, list(models))
    result = run_bench(models, BUILTIN_PROMPTS, configs, max_tokens, repeat, progress)
    out = {}
    for name in models:
        for c in configs:
            if c.variant == name:
                e = result["configs"][c.name]
                out.setdefault(name, {})[c.name.removeprefix(f"{name} ")] = {
                    k: e.get(k) for k in ("median_decode_tokens_per_s", "speedup", "min_prompt_speedup",
                                          "mean_accepted_length", "acceptance_per_position", "identical_to_off")}
    out["after_vs_before_plain"] = result["configs"]["after off"]["speedup_vs_first_variant_off"]
    return out


def checks(before: dict, after: dict, bench: dict | None) -> dict:
    values = {"union_drop": 1 - after["expert_union"][UNION_K] / before["expert_union"][UNION_K],
              "perplexity_rise": after["perplexity"] / before["perplexity"] - 1,
              "batch_max_mean_load": after["batch_max_mean_load"]}
    out = {}
    for name, v in values.items():
        at_least = name == "union_drop"  # the others are ceilings
        limit = TARGETS[name]
        out[name] = {"value": v, "target": f"{'>=' if at_least else '<='} {limit}",
                     "met": v >= limit if at_least else v <= limit}
    if bench is not None:
        same = all(e["identical_to_off"] for k, e in bench["after"].items() if k != "off")
        out["speculative_identical"] = {"value": same, "target": "true", "met": same}
    return out


def report(before: Pretrained, after: Pretrained, documents: list[str], window: int = 512, ks=("2", "auto"),
           max_tokens: int = 128, repeat: int = 3, bench: bool = True, progress=None) -> dict:
    if before.cfg.n_routed_experts != after.cfg.n_routed_experts or before.cfg.vocab_size != after.cfg.vocab_size:
        raise ValueError("the two checkpoints are not the same model (experts or vocabulary differ)")
    if before.tokenizer is None or after.tokenizer is None:
        raise ValueError("both model folders need their tokenizer.json to read the text")
    if bench and not (before.model.mtp and after.model.mtp):
        raise ValueError("both models need MTP modules to bench speculative decoding (or give --no-bench)")
    figures = {"before": text_figures(before, documents, window), "after": text_figures(after, documents, window)}
    speed = bench_figures(before, after, list(ks), max_tokens, repeat, progress) if bench else None
    return {"models": {"before": str(before.path), "after": str(after.path)}, "text": figures,
            "bench": speed, "checks": checks(figures["before"], figures["after"], speed)}


def format_report(r: dict) -> str:
    b, a = r["text"]["before"], r["text"]["after"]

    def acc(v):
        return "/".join("-" if x is None else f"{x:.2f}" for x in v) or "-"

    def batch(x):
        if x["batch_max_mean_load"] is None:
            return "-"
        return f"{x['batch_max_mean_load']:.3f} ({x['batch_max_mean_load_worst']:.2f}), {x['documents']} docs"
    rows = [("perplexity", f"{b['perplexity']:.3f}", f"{a['perplexity']:.3f}"),
            ("expert union per 4-token window", f"{b['expert_union'][UNION_K]:.3f}", f"{a['expert_union'][UNION_K]:.3f}"),
            ("batch-wise max/mean load (worst layer)", batch(b), batch(a)),
            ("max/mean load within the text (worst layer)", f"{b['max_mean_load']:.3f} ({b['max_mean_load_worst']:.2f})",
             f"{a['max_mean_load']:.3f} ({a['max_mean_load_worst']:.2f})"),
            ("routing entropy, nats", f"{b['entropy']:.3f}", f"{a['entropy']:.3f}"),
            ("MTP acceptance per position (text)", acc(b["mtp_acceptance_per_position"]),
             acc(a["mtp_acceptance_per_position"]))]
    if r["bench"]:
        for cfg, e in r["bench"]["before"].items():
            if cfg != "off":
                ea = r["bench"]["after"][cfg]
                rows.append((f"bench {cfg}: speedup, acceptance",
                             f"{e['speedup']:.2f}x {acc(e['acceptance_per_position'])}",
                             f"{ea['speedup']:.2f}x {acc(ea['acceptance_per_position'])}"))
    width = max(len(x[0]) for x in rows)
    lines = [f"{'':<{width}}  {'before':>26}  {'after':>26}"]
    lines += [f"{n:<{width}}  {x:>26}  {y:>26}" for n, x, y in rows]
    lines.append("U(4)/top_k per layer, before → after: " + ", ".join(
        f"{x:.2f}→{y:.2f}" for x, y in zip(b["union_per_top_k_layers"], a["union_per_top_k_layers"])))
    for name, c in r["checks"].items():
        v = c["value"]
        lines.append(f"check {name}: {v if isinstance(v, bool) else round(v, 4)} (target {c['target']}): "
                     f"{'met' if c['met'] else 'NOT met'}")
    return "\n".join(lines)
