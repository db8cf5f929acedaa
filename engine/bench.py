"""Speed measurements: every configuration on every prompt, interleaved so machine drift cancels.

Speedups are ratios taken in the same run: each speculative run is divided by the plain run of the same
prompt in the same round. Medians throughout, because these machines are noisy.

What runs is a *variant*: a native model (one per quantization, say) or a GGUF file run by llama.cpp
(engine/backends/llamacpp.py). Variants see the same prompt token ids, so a native model and its GGUF
export are compared on identical work, and their greedy outputs can be compared token for token.
"""
from __future__ import annotations

import json
import os
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
    mode: str = "off"  # "off" | "mtp" | "lookup" | "draft" (the last two: llama.cpp variants)
    k: int | str = "auto"
    variant: str = ""  # which loaded model (e.g. its quantization); "" when the run has one


def configurations(modes: list[str], ks: list[str], variants: list[str] = ("",)) -> list[BenchConfig]:
    """Plain decoding, then each speculative mode at each k, for every variant. `modes` may be a list
    (every variant) or a dict variant → its modes."""
    out = []
    for v in variants:
        prefix = f"{v} " if v else ""
        out.append(BenchConfig(f"{prefix}off", variant=v))
        for mode in (modes.get(v, []) if isinstance(modes, dict) else modes):
            if mode != "off":
                out += [BenchConfig(f"{prefix}{mode} k={k}", mode, k if k == "auto" else int(k), v) for k in ks]
    return out


class NativeRunner:
    """A native model as a bench variant."""

    def __init__(self, pre: Pretrained, online_balance: float | None = None):
        self.pre, self.online_balance = pre, online_balance

    def encode(self, prompt: dict) -> list[int]:
        return prompt_ids(self.pre, prompt)

    def __call__(self, ids: list[int], params: SamplingParams, cfg: BenchConfig):
        spec = SpeculativeConfig(k=cfg.k) if cfg.mode == "mtp" else None
        if cfg.mode not in ("off", "mtp"):
            raise ValueError(f"speculative mode {cfg.mode!r} is llama.cpp's; native models have off and mtp")
        return generate(self.pre.model, ids, params, eos_ids=self.pre.eos_ids, speculative=spec,
                        online_balance=self.online_balance)

    def speculative_modes(self) -> list[str]:
        return ["off", "mtp"] if self.pre.model.mtp else ["off"]

    def describe(self) -> dict:
        return {"engine": "native", "quantization": _quantization(self.pre.model), **weight_bytes(self.pre.model)}


class LlamaRunner:
    """A GGUF file run by llama.cpp (a loaded LlamaCppBackend) as a bench variant. It prefills the
    whole prompt every run (the backend otherwise reuses a cached prefix between requests)."""

    def __init__(self, backend):
        self.backend = backend

    def encode(self, prompt: dict) -> list[int]:
        from engine.protocol import ChatMessage, Generate

        if "ids" in prompt:
            return list(prompt["ids"])
        if "chat" in prompt and self.backend.chat is not None:
            return self.backend.prompt_ids(Generate(id="bench", messages=[ChatMessage("user", prompt["chat"])]))
        return self.backend.model.tokenize(prompt.get("prompt", prompt.get("chat", "")), True, False)

    def __call__(self, ids: list[int], params: SamplingParams, cfg: BenchConfig):
        return self.backend.generate_ids(ids, params, cfg.mode, cfg.k, reuse_prefix=False)

    def speculative_modes(self) -> list[str]:
        return self.backend.info()["speculative_modes"]

    def describe(self) -> dict:
        info = self.backend.info()
        return {"engine": "llama.cpp", "quantization": info["quantization"], "model_bytes": info["weight_bytes"],
                "bytes_per_token": gguf_bytes_per_token(info["path"]), "threads": info["threads"],
                "draft": info["draft"]}


def gguf_bytes_per_token(path: str) -> int:
    """What one decoded token reads of a GGUF's tensors, counted as weight_bytes counts a native model's:
    one embedding row, the top-k of each layer's stacked experts, the MTP (nextn) layers left out."""
    import gguf

    reader = gguf.GGUFReader(path)
    field = lambda key: next((int(f.parts[f.data[0]][0]) for k, f in reader.fields.items() if k.endswith(key)), 0)  # noqa: E731
    layers, experts, k = field(".block_count"), field(".expert_count"), field(".expert_used_count")
    nextn = field(".nextn_predict_layers")
    total = 0
    for t in reader.tensors:
        parts = t.name.split(".")
        if parts[0] == "blk" and int(parts[1]) >= layers - nextn:
            continue
        n = int(t.n_bytes)
        if t.name.startswith("token_embd"):
            n //= int(t.shape[-1])  # one row of [vocab, hidden] (gguf lists the shape inner dimension first)
        elif "_exps" in t.name and experts:
            n = n * k // experts
        total += n
    return total


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


def run_bench(models, prompts: list[dict], configs: list[BenchConfig], max_tokens: int = 128, repeat: int = 3,
              progress=None, online_balance: float | None = None) -> dict:
    """models: one model, or variants by name (BenchConfig.variant), all timed in one run: each a
    Pretrained (a native model) or a runner (NativeRunner, LlamaRunner). The prompts are encoded once,
    by the first variant. online_balance: γ of online bias balancing in the native runs of models given
    as Pretrained (a NativeRunner carries its own; engine.generate); it can change the output, so `identical_to_off` may turn false, and on CUDA it
    decodes without graphs."""
    models = models if isinstance(models, dict) else {"": models}
    runners = {n: m if callable(m) else NativeRunner(m, online_balance) for n, m in models.items()}
    params = SamplingParams(max_tokens=max_tokens)  # greedy: outputs must be identical across configs
    encoded = [(p["name"], next(iter(runners.values())).encode(p)) for p in prompts]
    for cfg in configs:  # warm-up, untimed: allocations, and the draft-length controller's first probes
        runners[cfg.variant](encoded[0][1], params, cfg)
    runs, bandwidth = [], []
    for r in range(repeat):
        bandwidth.append(read_bandwidth())  # each round: the machine's bandwidth drifts as its timings do
        for name, ids in encoded:
            order = configs[r % len(configs):] + configs[:r % len(configs)]  # rotate to spread drift
            for cfg in order:
                res = runners[cfg.variant](ids, params, cfg)
                runs.append({"round": r, "prompt": name, "config": cfg.name, "variant": cfg.variant,
                             "token_ids": res.token_ids, "stats": res.stats})
                if progress:
                    progress(len(runs), repeat * len(encoded) * len(configs))
    result = summarize(runs, configs, encoded)
    result["read_bandwidth_bytes_per_s"] = statistics.median(bandwidth)
    result["read_bandwidth_per_round"] = bandwidth
    result["huge_page_bytes"] = huge_page_bytes()
    result["thp_mem_alloc_enable"] = os.environ.get("THP_MEM_ALLOC_ENABLE")
    result["variants"] = {name: runner.describe() for name, runner in runners.items()}
    for name, v in result["variants"].items():  # what each variant's plain decoding reads per second
        off = result["configs"].get(f"{name} off" if name else "off")
        if off and v.get("bytes_per_token"):
            v["plain_read_bytes_per_s"] = v["bytes_per_token"] * off["median_decode_tokens_per_s"]
            v["bandwidth_fraction"] = v["plain_read_bytes_per_s"] / result["read_bandwidth_bytes_per_s"]
    if len(runners) > 1:
        result["engines"] = compare_variants(result, configs)
    return result


def huge_page_bytes() -> int | None:
    """This process's memory on transparent huge pages (engine/__init__.py asks torch for them), or None
    where the OS does not say: the native weights' share of it is what their reads gain."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def read_bandwidth(mib: int = 512, repeat: int = 5) -> float:
    """This machine's read bandwidth, bytes/s: the median time to sum a 512 MiB fp32 tensor with torch's
    threads (on the model's machine and in the same run, so the fractions below compare like with like)."""
    t = torch.ones(mib * 2**18)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        t.sum()
        times.append(time.perf_counter() - t0)
    return t.numel() * 4 / statistics.median(times)


def compare_variants(result: dict, configs: list[BenchConfig]) -> dict:
    """Each variant's plain decoding and its best speculation (highest median decode tokens/s),
    relative to the first variant: the side-by-side figures of `engine bench --gguf`."""
    out = {}
    for v in dict.fromkeys(c.variant for c in configs):
        mine = [c for c in configs if c.variant == v]
        off = result["configs"][mine[0].name]
        best = max(mine, key=lambda c: result["configs"][c.name]["median_decode_tokens_per_s"])
        b = result["configs"][best.name]
        out[v] = {"off_tokens_per_s": off["median_decode_tokens_per_s"],
                  "off_vs_first": off["speedup_vs_first_variant_off"],
                  "best": best.name, "best_tokens_per_s": b["median_decode_tokens_per_s"],
                  "best_speedup_vs_own_off": b["speedup"], "best_vs_first_off": b["speedup_vs_first_variant_off"],
                  "greedy_ids_equal_first_off": _same_ids(result["runs"], mine[0].name, configs[0].name)}
    first = next(iter(out.values()))
    for e in out.values():
        e["best_vs_first_best"] = e["best_tokens_per_s"] / first["best_tokens_per_s"] \
            if first["best_tokens_per_s"] else None
    return out


def _same_ids(runs: list[dict], a: str, b: str) -> bool:
    """Whether config a produced the same token ids as config b on every prompt and round."""
    ids = {(x["config"], x["round"], x["prompt"]): x["token_ids"] for x in runs}
    return all(ids[(a, r, p)] == ids[(b, r, p)] for (c, r, p) in ids if c == a)


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
        for key in ("expert_bytes_per_step", "expert_bytes_per_token", "experts_per_layer_step"):
            values = [x["stats"][key] for x in mine if x["stats"].get(key) is not None]
            entry[f"median_{key}"] = statistics.median(values) if values else None  # native runs only
        if cfg.mode != "off":
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
    head = (f"{'config':<{width}} {'tok/s':>8} {'speedup':>8} {'min/prompt':>10} {'acc.len':>8} {'identical':>9} "
            f"{'experts':>7} {'MiB/step':>8} {'MiB/tok':>7}  acceptance/position")
    lines = [head, "-" * len(head)]
    for name, e in result["configs"].items():
        acc = e.get("acceptance_per_position")
        acc_s = " ".join(f"{a:.2f}" if a is not None else "-" for a in acc) if acc else ""
        mal = e.get("mean_accepted_length")
        mal_s = "-" if mal is None else f"{mal:.2f}"
        fig = lambda key, scale, width: "-".rjust(width) if e.get(key) is None else f"{e[key] / scale:>{width}.2f}"  # noqa
        lines.append(f"{name:<{width}} {e['median_decode_tokens_per_s']:>8.1f} {e['speedup']:>7.2f}x "
                     f"{e['min_prompt_speedup']:>9.2f}x {mal_s:>8} {str(e['identical_to_off']):>9} "
                     f"{fig('median_experts_per_layer_step', 1, 7)} {fig('median_expert_bytes_per_step', 2**20, 8)} "
                     f"{fig('median_expert_bytes_per_token', 2**20, 7)}  {acc_s}")
    if any(e.get("median_experts_per_layer_step") for e in result["configs"].values()):
        lines.append("experts: distinct routed experts per MoE layer in a decode pass (its window: the last token "
                     "and the drafts); MiB/step, MiB/tok: their weights' bytes per pass and per generated token")
    variants = result.get("variants", {})
    if len(variants) > 1:
        lines.append("")
        first = next(iter(variants))
        for name, v in variants.items():
            off = result["configs"][f"{name} off"]
            what = f"{v['engine']}, {v.get('quantization') or 'full precision'}, weights {v['model_bytes'] / 2**20:.1f} MiB"
            if "bytes_per_token" in v:
                what += f", read per token {v['bytes_per_token'] / 2**20:.2f} MiB"
            if "bandwidth_fraction" in v:
                what += (f", plain decode reads {v['plain_read_bytes_per_s'] / 1e9:.1f} GB/s = "
                         f"{100 * v['bandwidth_fraction']:.0f}% of the measured "
                         f"{result['read_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s")
            lines.append(f"{name:<10} {what}; plain decode {off['speedup_vs_first_variant_off']:.2f}x of {first}")
    if result.get("read_bandwidth_bytes_per_s"):
        lines.append(f"read bandwidth: {result['read_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s "
                     f"(a 512 MiB fp32 sum, torch's threads, median of one measurement per round)")
    if result.get("huge_page_bytes") is not None:
        lines.append(f"on 2 MiB pages: {result['huge_page_bytes'] / 2**20:.0f} MiB of this process "
                     f"(THP_MEM_ALLOC_ENABLE={result.get('thp_mem_alloc_enable') or 'unset'})")
    for name, e in result.get("engines", {}).items():
        ratio = e["best_vs_first_best"]
        lines.append(f"{name:<10} best: {e['best']} {e['best_tokens_per_s']:.1f} tok/s "
                     f"({e['best_speedup_vs_own_off']:.2f}x its plain decode"
                     + (f", {ratio:.2f}x the first variant's best" if ratio else "")
                     + f"); greedy ids equal the first variant's: {e['greedy_ids_equal_first_off']}")
    return "\n".join(lines)
