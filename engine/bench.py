"""Speed measurements: every configuration on every prompt, interleaved so machine drift cancels.

Speedups are ratios taken in the same run: each speculative run is divided by the plain run of the same
prompt in the same round. Medians throughout, because these machines are noisy.
"""
from __future__ import annotations

import json
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.generate import generate
from engine.pretrained import Pretrained
from engine.quant import model_spec, weight_bytes
from engine.sampling import SamplingParams
from engine.speculative import SpeculativeConfig

BUILTIN_PROMPTS = [
    {"name": "chat", "chat": "What does the json module do? Give an example."},
    {"name": "code", "prompt": "def read_config(path):\n    \"\"\"Read a JSON config file and return a dict.\"\"\"\n"},
    {"name": "prose", "prompt": "The Python standard library is a collection of modules that"},
]


@dataclass
class BenchConfig:
    name: str
    speculative: SpeculativeConfig | None
    variant: str = ""  # which loaded model (e.g. its quantization); "" when the run has one


def configurations(modes: list[str], ks: list[str], variants: list[str] = ("",)) -> list[BenchConfig]:
    out = []
    for v in variants:
        prefix = f"{v} " if v else ""
        out.append(BenchConfig(f"{prefix}off", None, v))
        if "mtp" in modes:
            out += [BenchConfig(f"{prefix}mtp k={k}", SpeculativeConfig(k=k if k == "auto" else int(k)), v)
                    for k in ks]
    return out


def load_prompts(path: str | None) -> list[dict]:
    if path is None:
        return BUILTIN_PROMPTS
    text = Path(path).read_text(encoding="utf-8")
    if path.endswith(".json"):
        items = json.loads(text)
        return [p if isinstance(p, dict) else {"name": f"p{i}", "chat": p} for i, p in enumerate(items)]
    return [{"name": f"p{i}", "chat": line} for i, line in enumerate(l for l in text.splitlines() if l.strip())]


def prompt_ids(pre: Pretrained, prompt: dict) -> list[int]:
    if "ids" in prompt:
        return list(prompt["ids"])
    if pre.tokenizer is None:  # random-weight models for speed: the prompt's bytes as token ids
        text = prompt.get("prompt", prompt.get("chat", ""))
        return [b % pre.cfg.vocab_size for b in text.encode()]
    if "chat" in prompt and pre.tokenizer is not None and pre.tokenizer.chat_template:
        return pre.encode_prompt(chat=[{"role": "user", "content": prompt["chat"]}])
    return pre.encode_prompt(prompt=prompt.get("prompt", prompt.get("chat", "")))


def run_bench(models: Pretrained | dict[str, Pretrained], prompts: list[dict], configs: list[BenchConfig],
              max_tokens: int = 128, repeat: int = 3, progress=None, online_balance: float | None = None) -> dict:
    """models: one model, or variants of one model by name (BenchConfig.variant), all timed in one run.
    online_balance: γ of online bias balancing in every run (engine.generate); it can change the output, so
    `identical_to_off` may turn false, and on CUDA it decodes without graphs."""
    models = models if isinstance(models, dict) else {"": models}
    params = SamplingParams(max_tokens=max_tokens)  # greedy: outputs must be identical across configs
    first = next(iter(models.values()))
    encoded = [(p["name"], prompt_ids(first, p)) for p in prompts]
    for cfg in configs:  # warm-up, untimed: allocations, and the draft-length controller's first probes
        generate(models[cfg.variant].model, encoded[0][1], params, speculative=cfg.speculative,
                 online_balance=online_balance)
    runs = []
    for r in range(repeat):
        for name, ids in encoded:
            order = configs[r % len(configs):] + configs[:r % len(configs)]  # rotate to spread drift
            for cfg in order:
                pre = models[cfg.variant]
                res = generate(pre.model, ids, params, eos_ids=pre.eos_ids, speculative=cfg.speculative,
                               online_balance=online_balance)
                runs.append({"round": r, "prompt": name, "config": cfg.name, "variant": cfg.variant,
                             "token_ids": res.token_ids, "stats": res.stats})
                if progress:
                    progress(len(runs), repeat * len(encoded) * len(configs))
    result = summarize(runs, configs, encoded)
    for name, pre in models.items():
        result.setdefault("variants", {})[name] = {"quantization": _quantization(pre.model),
                                                   **weight_bytes(pre.model)}
    return result


def _quantization(model) -> str | None:
    spec = model_spec(model)
    return spec and spec.describe() + (" + int8 embedding/head" if spec.embed_head else "")


def summarize(runs: list[dict], configs: list[BenchConfig], encoded) -> dict:
    """Speedups against plain decoding of the same variant, prompt and round; with several variants
    also against the first variant's plain decoding (e.g. int4 vs the unquantized model)."""
    off = {(x["variant"], x["round"], x["prompt"]): x for x in runs if x["config"].endswith("off")}
    reference = configs[0].variant
    summary = {}
    for cfg in configs:
        mine = [x for x in runs if x["config"] == cfg.name]
        tps = [x["stats"]["decode_tokens_per_s"] or 0.0 for x in mine]
        ratios, vs_reference = {}, []
        for x in mine:
            base = off[(x["variant"], x["round"], x["prompt"])]["stats"]["decode_tokens_per_s"]
            ratios.setdefault(x["prompt"], []).append((x["stats"]["decode_tokens_per_s"] or 0) / base if base else 0)
            ref = off[(reference, x["round"], x["prompt"])]["stats"]["decode_tokens_per_s"]
            vs_reference.append((x["stats"]["decode_tokens_per_s"] or 0) / ref if ref else 0)
        per_prompt = {p: statistics.median(v) for p, v in ratios.items()}
        entry = {
            "variant": cfg.variant,
            "speedup_vs_first_variant_off": statistics.median(vs_reference),
            "median_decode_tokens_per_s": statistics.median(tps),
            "speedup": statistics.median([v for vs in ratios.values() for v in vs]),
            "speedup_per_prompt": per_prompt,
            "min_prompt_speedup": min(per_prompt.values()),
            "identical_to_off": all(x["token_ids"] == off[(x["variant"], x["round"], x["prompt"])]["token_ids"]
                                    for x in mine),
            "median_time_to_first_token_s": statistics.median(x["stats"]["time_to_first_token_s"] or 0 for x in mine),
            "generated_tokens": sum(x["stats"]["generated_tokens"] for x in mine),
        }
        if cfg.speculative is not None:
            steps = sum(x["stats"]["verify_steps"] for x in mine)
            acc = sum(x["stats"]["draft_tokens_accepted"] for x in mine)
            prop = sum(x["stats"]["draft_tokens_proposed"] for x in mine)
            reached, accepted = _sum_lists(mine, "reached_per_position"), _sum_lists(mine, "accepted_per_position")
            entry.update({
                "mean_accepted_length": (acc + steps) / steps if steps else None,
                "acceptance_rate": acc / prop if prop else None,
                "acceptance_per_position": [a / r if r else None for a, r in zip(accepted, reached)],
                "verify_steps": steps,
                "plain_steps": sum(x["stats"]["plain_steps"] for x in mine),
            })
        summary[cfg.name] = entry
    return {"configs": summary, "prompts": [n for n, _ in encoded], "runs": runs}


def _sum_lists(runs, key):
    out: list[int] = []
    for x in runs:
        for i, v in enumerate(x["stats"][key]):
            if i == len(out):
                out.append(0)
            out[i] += v
    return out


def environment(pre: Pretrained) -> dict:
    dev = pre.model.norm.weight.device  # never quantized: the device and compute dtype
    return {"model": str(pre.path), "device": str(dev), "dtype": str(pre.model.norm.weight.dtype),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
            "processor": platform.processor(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None}


def format_table(result: dict) -> str:
    width = max([12] + [len(n) for n in result["configs"]])
    head = f"{'config':<{width}} {'tok/s':>8} {'speedup':>8} {'min/prompt':>10} {'acc.len':>8} {'identical':>9}  acceptance/position"
    lines = [head, "-" * len(head)]
    for name, e in result["configs"].items():
        acc = e.get("acceptance_per_position")
        acc_s = " ".join(f"{a:.2f}" if a is not None else "-" for a in acc) if acc else ""
        mal = e.get("mean_accepted_length")
        mal_s = "-" if mal is None else f"{mal:.2f}"
        lines.append(f"{name:<{width}} {e['median_decode_tokens_per_s']:>8.1f} {e['speedup']:>7.2f}x "
                     f"{e['min_prompt_speedup']:>9.2f}x {mal_s:>8} "
                     f"{str(e['identical_to_off']):>9}  {acc_s}")
    variants = result.get("variants", {})
    if len(variants) > 1:
        lines.append("")
        for name, v in variants.items():
            off = result["configs"][f"{name} off"]
            lines.append(f"{name:<10} weights {v['model_bytes'] / 2**20:8.1f} MiB, read per token "
                         f"{v['bytes_per_token'] / 2**20:7.2f} MiB, plain decode "
                         f"{off['speedup_vs_first_variant_off']:.2f}x of {next(iter(variants))}")
    return "\n".join(lines)
