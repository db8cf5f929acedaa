"""Command line: `python -m engine generate|eval|init-tiny ...`. Device, dtype and argument parsing live
here, at the edge; the modules below take plain values."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from engine.paths import ROOT

DEFAULT_TINY_DIR = ROOT / ".cache" / "tiny-model"
ONLINE_BALANCE_HELP = ("move each router's score-correction bias by GAMMA toward balance after every step "
                       "(off by default: it changes routing, so it can change greedy output; on CUDA it "
                       "decodes without graphs)")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="model folder (config.json + safetensors); default: the bundled model")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: bf16 on GPU, fp32 on CPU)")


def _add_quant_args(p: argparse.ArgumentParser, several: bool = False) -> None:
    if several:
        p.add_argument("--quant", default="none",
                       help="comma-separated weight variants to time in one run: none (--dtype), fp32, bf16, "
                            "int8, int4")
    else:
        p.add_argument("--quant", choices=["none", "int8", "int4"], default="none",
                       help="quantize the weights while loading (weight-only)")
    p.add_argument("--group", type=int, default=64, help="int4 group size: 32, 64 or 128")
    p.add_argument("--quant-embed-head", action="store_true", help="also store the embedding and head as int8")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m engine", description="moedesk's native engine")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text from a prompt")
    _add_model_args(g)
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="plain text prompt")
    src.add_argument("--chat", help="a user message, wrapped in the model's chat template")
    src.add_argument("--prompt-ids", help="comma-separated token ids")
    g.add_argument("--system", default=None, help="system message for --chat")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="generate --max-tokens tokens even past end-of-text")
    g.add_argument("--speculative", choices=["off", "mtp"], default="off",
                   help="mtp: draft with the model's own MTP modules and verify in one pass")
    g.add_argument("--k", default="auto", help="drafts per step (1, 2, ...) or auto")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    g.add_argument("--online-balance", type=float, default=None, metavar="GAMMA", help=ONLINE_BALANCE_HELP)
    _add_quant_args(g)

    b = sub.add_parser("bench", help="decode speed with speculation off and on, interleaved, medians")
    _add_model_args(b)
    b.add_argument("--gguf", default=None,
                   help="a .gguf run by llama.cpp beside --model (its export): both engines on the same prompt ids")
    b.add_argument("--draft", default=None, help="a draft .gguf for the llama.cpp variant's speculative mode 'draft'")
    b.add_argument("--prompts", default=None, help="a .json list or a text file with one prompt per line")
    b.add_argument("--max-tokens", type=int, default=128)
    b.add_argument("--speculative", default=None,
                   help="comma-separated modes: off,mtp,lookup,draft (default: every mode each model offers)")
    b.add_argument("--k", default="1,2,3,4,auto", help="comma-separated draft lengths")
    b.add_argument("--repeat", type=int, default=3)
    b.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    b.add_argument("--json", dest="json_out", default=None, help="write the full results to this file")
    b.add_argument("--online-balance", type=float, default=None, metavar="GAMMA", help=ONLINE_BALANCE_HELP)
    _add_quant_args(b, several=True)

    e = sub.add_parser("eval", help="perplexity of a text file, and routing statistics (engine/routing_stats.py)")
    _add_model_args(e)
    e.add_argument("--text-file", required=True, action="append",
                   help="a text file, or a folder of .txt files; repeat for several documents (with several, "
                        "routing.batch_max_mean_load: DeepSeek-V3's batch-wise balance, engine/routing_stats.py)")
    e.add_argument("--window", type=int, default=512, help="tokens scored per forward pass")
    e.add_argument("--batch-window", type=int, default=256, help="tokens per document in a balance batch")
    e.add_argument("--json", action="store_true")
    _add_quant_args(e)

    q = sub.add_parser("quantize", help="write a weight-only int8/int4 checkpoint (compressed-tensors layout)")
    q.add_argument("--model", default=None, help="model folder; default: the bundled model")
    q.add_argument("--to", required=True, choices=["int8", "int4"])
    q.add_argument("--group", type=int, default=64, help="int4 group size: 32, 64 or 128")
    q.add_argument("--quant-embed-head", action="store_true", help="also store the embedding and head as int8")
    q.add_argument("--out", required=True, help="folder to write (config.json, model.safetensors, tokenizer)")

    d = sub.add_parser("train-default", help="build the bundled default model from nothing (resumable)")
    d.add_argument("--out", default=None, help="model folder to write (default: assets/models/moedesk-mini)")
    d.add_argument("--work", default=None, help="data and checkpoints (default: .cache/train-default)")
    d.add_argument("--minutes", type=float, default=80.0, help="time budget for the whole build")
    d.add_argument("--seed", type=int, default=0)

    r = sub.add_parser("tune-routing", help="tune the MoE routers with GRPO, then optionally heal the rest of the model (resumable)")
    r.add_argument("--model", default=None, help="model folder; default: the bundled model")
    r.add_argument("--data", default=None, help="text file, or folder of .txt documents, to tune on (default: the "
                                                "bundled model's training data); a folder's documents also balance "
                                                "the bias batch-wise")
    r.add_argument("--out", required=True, help="folder for the tuned checkpoint, its log and resume state")
    r.add_argument("--steps", type=int, default=None,
                   help="GRPO steps (default 300; 0: only balance the --model's bias)")
    r.add_argument("--group-size", dest="group", type=int, default=None, help="G rollouts per batch (default 8)")
    for name, kind, what in [("batch", int, "token windows per step"), ("seq-len", int, "tokens per window"),
                             ("chunk", int, "tokens per scored unit"), ("window", int, "verification window (union)"),
                             ("temperature", float, "policy temperature τ"), ("lr", float, "Adam learning rate"),
                             ("epochs", int, "clipped updates per batch"), ("clip", float, "PPO ratio clip"),
                             ("kl", float, "β of the KL penalty to the starting router"),
                             ("lambda-bal", float, "weight of max/mean load − 1"),
                             ("balance-scope", str, "load measured over the whole rollout ('rollout', default) or per token window ('window')"),
                             ("credit", str, "a router's advantage from its own layer's routing cost ('layer', default) or the whole reward ('shared')"),
                             ("lambda-ent", float, "weight of the routing entropy"),
                             ("lambda-union", float, "weight of the expert union per window"),
                             ("seq-balance", float, "α of DeepSeek-V3's sequence-wise balance loss (default 0: off)"),
                             ("bias-step", float, "bias step γ after each GRPO step"),
                             ("heal-steps", int, "steps of recovery training after the GRPO steps: every weight but "
                                                 "the routers' learns the LM + MTP loss under the tuned routing (default 0)"),
                             ("heal-lr", float, "AdamW learning rate of the healing (default 2e-4)"),
                             ("heal-batch", int, "windows per healing step (default 16)"),
                             ("heal-seq-len", int, "tokens per healing window (default 256)"),
                             ("heal-union", float, "weight of the soft expert union per verification window in the "
                                                   "healing loss (default 0)"),
                             ("heal-balance", float, "weight of the batch's load-balance loss in the healing loss (default 0)"),
                             ("heal-balance-worst", float, "weight of the worst layer's balance loss in it (default 0)"),
                             ("heal-temperature", float, "τ of the selection softmax in the healing's routing terms "
                                                       "(default: --temperature)"),
                             ("distill-steps", int, "steps of MTP self-distillation after healing: the MTP modules "
                                                    "learn the healed model's greedy choices again (default 0)"),
                             ("distill-lr", float, "AdamW learning rate of the distillation (default 1e-3)"),
                             ("distill-sequences", int, "greedy continuations generated to distill on (default 64)"),
                             ("calibrate-windows", int, "windows the bias is then balanced on (default 512; 0: none)"),
                             ("calibrate-len", int, "tokens per calibration window (default 256)"),
                             ("calibrate-batch", int, "documents per batch when --data is a folder: the main layers' "
                                                      "bias is balanced batch-wise, as `engine eval` measures it "
                                                      "(default 16; 1: over all the tokens)"),
                             ("checkpoint-every", int, "steps between resume checkpoints"), ("seed", int, "")]:
        r.add_argument(f"--{name}", type=kind, default=None, help=what or None)

    ur = sub.add_parser("union-replay", help="what a lower expert union buys where experts stream from memory: "
                                             "both models' verification traces replayed on V2-Lite-shaped experts")
    ur.add_argument("--before", default=None, help="model folder before the change; default: the bundled model")
    ur.add_argument("--after", required=True, help="model folder after it")
    ur.add_argument("--k", type=int, default=3, help="drafts per verification")
    ur.add_argument("--max-tokens", type=int, default=128)
    ur.add_argument("--layers", type=int, default=4, help="target MoE layers (415 MiB of experts each)")
    ur.add_argument("--threads", type=int, default=None)
    ur.add_argument("--json", dest="json_out", default=None)

    rr = sub.add_parser("routing-report", help="a routing change judged before vs after on held-out text "
                                               "(perplexity, routing statistics, MTP acceptance, bench speedups)")
    rr.add_argument("--before", default=None, help="model folder before the change; default: the bundled model")
    rr.add_argument("--after", required=True, help="model folder after it (e.g. engine tune-routing's --out)")
    rr.add_argument("--text-file", required=True, action="append",
                    help="held-out documents: files or folders of .txt files (repeat; ≥ 16 for the batch-wise load)")
    rr.add_argument("--window", type=int, default=512, help="tokens scored per forward pass")
    rr.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    rr.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: bf16 on GPU, fp32 on CPU)")
    rr.add_argument("--k", default="2,auto", help="comma-separated draft lengths to bench")
    rr.add_argument("--max-tokens", type=int, default=128)
    rr.add_argument("--repeat", type=int, default=3)
    rr.add_argument("--no-bench", dest="bench", action="store_false", help="only the text figures")
    rr.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    rr.add_argument("--json", dest="json_out", default=None, help="write the full report to this file")

    x = sub.add_parser("export-gguf", help="write the model as a GGUF file for llama.cpp (deepseek2)")
    x.add_argument("--model", default=None, help="model folder; default: the bundled model")
    x.add_argument("--out", required=True, help="the .gguf file to write")
    x.add_argument("--type", dest="ftype", choices=["f32", "f16", "q8_0", "q4_k_m"], default="f16",
                   help="weight type (q4_k_m: llama.cpp's own quantizer; norms and routers stay f32)")
    x.add_argument("--mtp-layers", dest="mtp", type=int, default=1,
                   help="MTP modules to write as nextn layers (default 1: llama.cpp drafts with exactly one)")
    x.add_argument("--no-mtp", dest="mtp", action="store_const", const=0, help="leave the MTP modules out")

    t = sub.add_parser("init-tiny", help="write a small random-weight model (for tests and trying things)")
    t.add_argument("--out", default=str(DEFAULT_TINY_DIR))
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--shape", choices=["tiny", "v2-lite"], default="tiny",
                   help="v2-lite: DeepSeek-V2-Lite's layer shapes (random weights, bf16, no tokenizer)")
    t.add_argument("--layers", type=int, default=None, help="v2-lite: number of layers (default 27)")
    t.add_argument("--experts", type=int, default=None, help="v2-lite: routed experts per layer (default 64)")
    t.add_argument("--vocab", type=int, default=None, help="v2-lite: vocabulary size (default 102400)")
    return parser


def cmd_generate(args) -> int:
    from engine.generate import generate
    from engine.pretrained import load_pretrained
    from engine.sampling import SamplingParams
    from engine.speculative import SpeculativeConfig

    params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                            max_tokens=args.max_tokens, stop=args.stop, ignore_eos=args.ignore_eos)
    pre = load_pretrained(args.model, device=args.device, dtype=args.dtype, quant=quant_spec(args, args.quant))
    if args.prompt_ids is not None:
        prompt_ids = [int(x) for x in args.prompt_ids.split(",") if x.strip()]
        if any(not 0 <= i < pre.cfg.vocab_size for i in prompt_ids):
            raise ValueError(f"token ids must be in [0, {pre.cfg.vocab_size})")
    elif args.chat is not None:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
                   [{"role": "user", "content": args.chat}]
        prompt_ids = pre.encode_prompt(chat=messages)
    else:
        prompt_ids = pre.encode_prompt(prompt=args.prompt)

    def stream(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    spec = None if args.speculative == "off" else \
        SpeculativeConfig(mode=args.speculative, k=args.k if args.k == "auto" else int(args.k))
    result = generate(pre.model, prompt_ids, params, tokenizer=pre.tokenizer, eos_ids=pre.eos_ids,
                      on_text=None if args.json else stream, speculative=spec, online_balance=args.online_balance)
    if args.json:
        print(json.dumps({"token_ids": result.token_ids, "text": result.text, "prompt_ids": prompt_ids,
                          "finish_reason": result.finish_reason, "stats": result.stats}))
    else:
        if pre.tokenizer is None:
            print(",".join(map(str, result.token_ids)))
        s = result.stats
        tps = s["decode_tokens_per_s"]
        print(f"\n[{s['generated_tokens']} tokens, first after {s['time_to_first_token_s'] or 0:.3f}s, "
              f"{tps or 0:.1f} tok/s decode, finish: {result.finish_reason}]", file=sys.stderr)
    return 0


def cmd_eval(args) -> int:
    import math

    from engine.evaluate import perplexity, text_files
    from engine.pretrained import load_pretrained
    from engine.routing_stats import BATCH_DOCUMENTS, batch_load

    pre = load_pretrained(args.model, device=args.device, dtype=args.dtype, quant=quant_spec(args, args.quant))
    files = text_files(args.text_file)
    texts = [f.read_text(encoding="utf-8") for f in files]
    t0 = time.perf_counter()
    if len(texts) == 1:
        res = perplexity(pre, texts[0], window=args.window, routing=True)
    else:
        each = [{"file": str(f), **perplexity(pre, t, window=args.window, routing=True)} for f, t in zip(files, texts)]
        tokens = sum(r["tokens"] for r in each)
        nll = sum(r["nll_per_token"] * r["tokens"] for r in each) / tokens
        res = {"perplexity": math.exp(nll), "nll_per_token": nll, "tokens": tokens, "texts": each, "routing": None}
        if each[0]["routing"]:
            res["routing"] = batch_load(pre.model, [pre.tokenizer.encode(t) for t in texts], args.batch_window,
                                        min(BATCH_DOCUMENTS, len(texts)))
            res["routing"]["per_text_max_mean_load"] = [r["routing"]["max_mean_load"] for r in each]
    res["seconds"] = time.perf_counter() - t0
    res["quantization"] = args.quant
    if args.json:
        print(json.dumps(res))
        return 0
    print(f"perplexity {res['perplexity']:.3f} over {res['tokens']} tokens"
          + (f" in {len(texts)} documents" if len(texts) > 1 else ""))
    for r in res.get("texts", []):
        print(f"  {r['file']}: perplexity {r['perplexity']:.3f} over {r['tokens']} tokens")
    if res["routing"] and len(texts) == 1:
        print(format_routing(res["routing"]))
    elif res["routing"]:
        b = res["routing"]
        if b["batches"]:
            print(f"batch-wise max/mean load {b['batch_max_mean_load']:.3f} (worst layer "
                  f"{b['batch_max_mean_load_worst']:.3f}) over {b['batches']} batches of one {b['window']}-token "
                  f"window from each of {b['documents']} documents")
        else:
            print(f"batch-wise load: no batch (documents shorter than {b['window']} tokens)")
        if b["documents"] < BATCH_DOCUMENTS:
            print(f"  (fewer than {BATCH_DOCUMENTS} documents: the batches are smaller than DeepSeek-V3-style balance asks)")
    return 0


def format_routing(r: dict) -> str:
    """The overall routing statistics of `engine eval` in one line (engine/routing_stats.py defines them)."""
    union = " ".join(f"{v:.2f}" if v is not None else "-" for v in r["expert_union"].values())

    def f(v):
        return "-" if v is None else f"{v:.3f}"
    return (f"routing (top-{r['top_k']} of {r['experts']}, mean of {len(r['layers'])} MoE layers): "
            f"max/mean load {f(r['max_mean_load'])} (worst layer {f(r['max_mean_load_worst'])}), "
            f"cv {f(r['cv'])}, entropy {f(r['entropy'])} of {r['max_entropy']:.3f} nats, "
            f"experts per window of k+1 tokens, k={','.join(r['expert_union'])}: {union}")


def cmd_bench(args) -> int:
    import torch

    from engine.bench import configurations, environment, format_table, load_prompts, run_bench

    if args.threads:
        torch.set_num_threads(args.threads)
    gguf = args.gguf or (args.model if str(args.model or "").lower().endswith(".gguf") else None)
    models = {} if gguf == args.model else _bench_native_models(args)
    if gguf:  # the same threads as torch, so the engines are compared on equal footing
        os.environ.setdefault("MOEDESK_LLAMA_THREADS", str(args.threads or torch.get_num_threads()))
        models["llama.cpp"] = _bench_llama(gguf, args.draft)
    elif args.draft:
        raise ValueError("--draft drafts for a .gguf model: give --gguf FILE (or --model FILE.gguf)")
    wanted = [m.strip() for m in args.speculative.split(",") if m.strip()] if args.speculative else None
    modes = {name: _bench_modes(name, m, wanted) for name, m in models.items()}
    variants = list(models) if len(models) > 1 else [""]
    ks = [k.strip() for k in args.k.split(",") if k.strip()]
    configs = configurations(modes if len(models) > 1 else next(iter(modes.values())), ks, variants)

    def progress(done, total):
        print(f"\r{done}/{total} runs", end="", file=sys.stderr, flush=True)

    result = run_bench(models if len(models) > 1 else next(iter(models.values())), load_prompts(args.prompts),
                       configs, args.max_tokens, args.repeat, progress, online_balance=args.online_balance)
    print(file=sys.stderr)
    native = [m.pre for m in models.values() if hasattr(m, "pre")]
    result["environment"] = environment(native[0]) if native else {"model": gguf}
    result["environment"].update(threads=torch.get_num_threads(),
                                 llama_threads=os.environ.get("MOEDESK_LLAMA_THREADS") if gguf else None)
    result["settings"] = {"max_tokens": args.max_tokens, "repeat": args.repeat, "temperature": 0,
                          "online_balance": args.online_balance}
    print(format_table(result))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=1))
    return 0


def _bench_native_models(args) -> dict:
    """--quant variants of --model: {name: NativeRunner}; one variant is named "native" beside a GGUF."""
    from engine.bench import NativeRunner
    from engine.pretrained import load_pretrained

    names = [v.strip() for v in args.quant.split(",") if v.strip()] or ["none"]
    models = {}
    for name in names:  # a dtype name is the unquantized model in that dtype
        dtype = name if name in ("fp32", "bf16", "fp16") else args.dtype
        spec = None if dtype is not args.dtype else quant_spec(args, name)
        pre = load_pretrained(args.model, device=args.device, dtype=dtype, quant=spec)
        runner = NativeRunner(pre, args.online_balance)
        models[name if spec else str(pre.model.norm.weight.dtype).removeprefix("torch.")] = runner
    return {"native": runner} if len(models) == 1 and args.gguf else models


def _bench_llama(path: str, draft: str | None):
    from engine.backends.base import BackendError
    from engine.backends.llamacpp import LlamaCppBackend
    from engine.bench import LlamaRunner
    from engine.protocol import Load

    backend = LlamaCppBackend()
    try:
        backend.load(Load(path=path, backend="llamacpp", draft=draft), lambda stage, fraction: None)
    except BackendError as e:
        raise ValueError(e.message) from e
    return LlamaRunner(backend)


def _bench_modes(name: str, runner, wanted: list[str] | None) -> list[str]:
    """The speculative modes to time for one variant: those asked for that it offers."""
    offered = runner.speculative_modes()
    if wanted is None:
        return offered
    chosen = [m for m in wanted if m in offered]
    if set(wanted) - {"off"} and not set(chosen) - {"off"}:
        raise ValueError(f"{name or 'the model'} offers speculative modes {', '.join(offered)}; "
                         f"asked for {', '.join(wanted)}")
    return chosen


def quant_spec(args, name: str):
    """--quant NAME [--group G] [--quant-embed-head] → a QuantSpec, or None for full precision."""
    from engine.quant import QuantSpec

    if name in ("none", "off", ""):
        return None
    if name not in ("int8", "int4"):
        raise ValueError(f"unknown quantization {name!r}; choose none, int8 or int4")
    return QuantSpec(name, args.group, args.quant_embed_head)


def cmd_quantize(args) -> int:
    import shutil

    from engine.model.checkpoint import load_model, save_model
    from engine.quant import weight_bytes

    out = Path(args.out)
    if out.resolve() == Path(args.model).resolve():
        raise ValueError("--out must be another folder than --model")
    args.quant = args.to
    model = load_model(args.model, device="cpu", dtype="float32", quant=quant_spec(args, args.to))
    save_model(model, out)
    for f in Path(args.model).iterdir():  # tokenizer, chat template, generation settings, model card
        if f.is_file() and f.name not in ("config.json", "model.safetensors", "model.safetensors.index.json") \
                and not f.name.endswith(".safetensors"):
            shutil.copy2(f, out / f.name)
    b = weight_bytes(model)
    print(f"wrote {out} ({args.to}{f', group {args.group}' if args.to == 'int4' else ''}): "
          f"{b['model_bytes'] / 2**20:.1f} MiB of weights, {b['bytes_per_token'] / 2**20:.2f} MiB read per token")
    return 0


def cmd_train_default(args) -> int:
    from engine.train.default_model import DEFAULT_OUT, DEFAULT_WORK, TrainSettings, build

    out = build(Path(args.out) if args.out else DEFAULT_OUT, Path(args.work) if args.work else DEFAULT_WORK,
                TrainSettings(minutes=args.minutes, seed=args.seed))
    print((out / "MODEL_CARD.md").read_text())
    return 0


def cmd_tune_routing(args) -> int:
    from engine.train.tune_routing import settings_from, tune

    out = tune(args.model, args.out, settings_from(args), data=args.data, emit=lambda line: print(line, flush=True))
    print(f"wrote {out}", file=sys.stderr)
    return 0


def cmd_routing_report(args) -> int:
    import torch

    from engine.evaluate import text_files
    from engine.pretrained import BUNDLED_MODEL, load_pretrained
    from engine.routing_report import format_report, report

    if args.threads:
        torch.set_num_threads(args.threads)
    before, after = (load_pretrained(m, device=args.device, dtype=args.dtype)
                     for m in (args.before or BUNDLED_MODEL, args.after))
    ks = [k.strip() for k in args.k.split(",") if k.strip()]

    def progress(done, total):
        print(f"\rbench: {done}/{total} runs", end="", file=sys.stderr, flush=True)

    r = report(before, after, [f.read_text(encoding="utf-8") for f in text_files(args.text_file)], args.window, ks,
               args.max_tokens, args.repeat, args.bench, progress)
    if args.bench:
        print(file=sys.stderr)
    print(format_report(r))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(r, indent=1))
    return 0


def cmd_union_replay(args) -> int:
    import torch

    from engine.pretrained import BUNDLED_MODEL, load_pretrained
    from engine.union_replay import format_replay, replay, trace

    if args.threads:
        torch.set_num_threads(args.threads)
    traces = {}
    for name, folder in (("before", args.before or BUNDLED_MODEL), ("after", args.after)):
        traces[name] = trace(load_pretrained(folder, device="cpu", dtype="float32"), args.k, args.max_tokens)
        print(f"{name}: {len(traces[name]['passes'])} verification passes traced", file=sys.stderr)
    r = replay(traces, args.layers)
    print(format_replay(r))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(r, indent=1))
    return 0


def cmd_export_gguf(args) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is read from the folder; nothing downloads
    from engine.export.gguf import describe_gguf, export_gguf

    shown = [None]

    def progress(stage: str, fraction: float) -> None:
        step = (stage, int(fraction * 10))  # every 10%
        if step != shown[0]:
            shown[0] = step
            print(f"\r{stage} {fraction:4.0%}   ", end="", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    out = export_gguf(args.model, args.out, args.ftype, progress=progress, mtp=args.mtp)
    d = describe_gguf(out)
    types = ", ".join(f"{n} {k}" for k, n in sorted(d["types"].items(), key=lambda kv: -kv[1]))
    print(file=sys.stderr)
    print(f"wrote {out} ({args.ftype}, {d['bytes'] / 2**20:.1f} MiB) in {time.perf_counter() - t0:.1f}s: "
          f"{d['tensors']} tensors ({types}), {d['vocab']} tokens, {d['mtp_layers']} MTP layers, "
          f"chat template {'included' if d['chat_template'] else 'absent'}")
    return 0


def cmd_init_tiny(args) -> int:
    from engine.tiny import v2_lite_config, write_tiny_model

    if args.shape == "v2-lite":
        given = {"num_hidden_layers": args.layers, "n_routed_experts": args.experts, "vocab_size": args.vocab}
        cfg = v2_lite_config(**{k: v for k, v in given.items() if v is not None})
        import torch
        print(write_tiny_model(args.out, seed=args.seed, std=0.02, with_tokenizer=False, save_dtype=torch.bfloat16,
                               **cfg))
    else:
        print(write_tiny_model(args.out, seed=args.seed))
    return 0


def default_model(args) -> None:
    if getattr(args, "model", "") is None:
        from engine.pretrained import BUNDLED_MODEL
        if not (BUNDLED_MODEL / "config.json").is_file():
            raise FileNotFoundError(f"no --model given and the bundled model is missing ({BUNDLED_MODEL}); "
                                    "build it with `python -m engine train-default`")
        args.model = str(BUNDLED_MODEL)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from engine.model.errors import ModelLoadError
    from engine.tokenizer import ChatTemplateError

    try:
        default_model(args)
        return {"generate": cmd_generate, "eval": cmd_eval, "bench": cmd_bench,
                "train-default": cmd_train_default, "init-tiny": cmd_init_tiny,
                "quantize": cmd_quantize, "tune-routing": cmd_tune_routing,
                "export-gguf": cmd_export_gguf, "routing-report": cmd_routing_report,
                "union-replay": cmd_union_replay}[args.command](args)
    except (ModelLoadError, ChatTemplateError, ValueError, FileNotFoundError) as e:
        # A bad file or argument is the user's to fix: one clear line, no traceback.
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
