"""What scripts/gpu_check.sh runs (under 8 minutes on an H200, installs nothing): the kernels against
their references and their speed (scripts/gpu_kernels.py), the native engine on CUDA against
transformers, the bundled model's decode speed (bf16/int8/int4, speculation off and on), and a
random-weight model with DeepSeek-V2-Lite's shapes in bf16 and int4: graphed decode steps, the cost
of verifying k drafts relative to one token, and the weight bandwidth achieved."""
from __future__ import annotations

import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
H200_PEAK_GBPS = 4800.0  # HBM3e, NVIDIA's figure for the H200 SXM

OUT = Path(sys.argv[1] if len(sys.argv) > 1 else "gpu_out")
results: dict = {"torch": torch.__version__, "cuda": torch.cuda.is_available()}


def step(name):
    def wrap(fn):
        t0 = time.perf_counter()
        try:
            results[name] = fn()
        except Exception as e:  # record and go on: every check reports
            results[name] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
        results[name + "_s"] = round(time.perf_counter() - t0, 2)
        (OUT / "results.json").write_text(json.dumps(results, indent=1))
        print(name, json.dumps(results[name])[:400], flush=True)
    return wrap


@step("device")
def _():
    return {"name": torch.cuda.get_device_name(0), "capability": torch.cuda.get_device_capability(0)}


@step("kernels")
def _():
    from scripts.gpu_kernels import run_kernel_checks
    return run_kernel_checks({}, peak_gbps=H200_PEAK_GBPS)


@step("parity_vs_transformers")
def _():
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    from engine.model.checkpoint import load_model
    cfg = DeepseekV3Config(vocab_size=256, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
                           num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
                           q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                           n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
                           max_position_embeddings=256, rope_parameters={"rope_type": "default", "rope_theta": 1e4})
    torch.manual_seed(0)
    ref = DeepseekV3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.15)
    d = tempfile.mkdtemp()
    ref.save_pretrained(d)
    ids = torch.randint(0, 256, (1, 64))
    with torch.no_grad():
        want = ref(ids).logits[0]
        out = {}
        for dtype in ("float32", "bfloat16"):
            m = load_model(d, device="cuda", dtype=dtype)
            got = m.logits(m(ids.cuda()))[0].cpu()
            m.setup_caches(1, 128)
            steps = [m.logits(m(ids[:, :40].cuda(), 0))[0]] + [m.logits(m(ids[:, i:i + 1].cuda(), i))[0] for i in range(40, 64)]
            inc = torch.cat(steps).cpu()
            out[dtype] = {"max_abs_full": (got - want).abs().max().item(), "max_abs_cached": (inc - want).abs().max().item(),
                          "argmax_agree": (got.argmax(-1) == want.argmax(-1)).float().mean().item()}
    return out


@step("expert_paths")
def _():
    from engine.model.moe import Experts, grouped_swiglu_loop, grouped_swiglu_mm
    ex = Experts(16, 256, 128).cuda().to(torch.bfloat16)
    with torch.no_grad():
        ex.gate_up.normal_(0, 0.05)
        ex.down.normal_(0, 0.05)
        counts = torch.tensor([5, 0, 9, 1, 0, 0, 30, 2, 0, 4, 4, 4, 0, 1, 0, 3], device="cuda")
        xs = torch.randn(int(counts.sum()), 256, device="cuda", dtype=torch.bfloat16)
        a = grouped_swiglu_mm(xs, counts, ex.gate_up, ex.down, 128).float()
        b = grouped_swiglu_loop(xs.float(), counts, ex.gate_up.float(), ex.down.float(), 128)
        x = torch.randn(2, 256, device="cuda", dtype=torch.bfloat16)
        w, ids = torch.rand(2, 4, device="cuda"), torch.randint(0, 16, (2, 4), device="cuda")
        g = ex.forward_gathered(x, w, ids).float()
    return {"grouped_mm_rel_err": ((a - b).abs().max() / b.abs().max()).item(), "gathered_ok": bool(torch.isfinite(g).all())}


@step("bench_bundled")
def _():
    from engine.bench import BUILTIN_PROMPTS, configurations, run_bench
    from engine.pretrained import BUNDLED_MODEL, load_pretrained
    from engine.quant import QuantSpec
    models = {name: load_pretrained(BUNDLED_MODEL, device="cuda", quant=QuantSpec(name) if name != "bf16" else None)
              for name in ("bf16", "int8", "int4")}
    res = run_bench(models, BUILTIN_PROMPTS, configurations(["mtp"], ["2", "auto"], list(models)), max_tokens=96,
                    repeat=2)
    keep = ("median_decode_tokens_per_s", "speedup", "speedup_vs_first_variant_off", "identical_to_off",
            "mean_accepted_length")
    return {"configs": {name: {k: v for k, v in c.items() if k in keep} for name, c in res["configs"].items()},
            "variants": res["variants"]}


def v2_lite_model(layers: int = 27, experts: int = 64, vocab: int = 102400, device: str = "cuda"):
    """DeepSeek-V2-Lite's shapes with random weights, built on the GPU in bf16 (no file)."""
    from engine.model.config import parse_config
    from engine.model.transformer import Transformer
    from engine.routing import Router
    from engine.tiny import v2_lite_config
    cfg = parse_config(v2_lite_config(num_hidden_layers=layers, n_routed_experts=experts, vocab_size=vocab,
                                      num_nextn_predict_layers=1))
    with torch.device("meta"):
        model = Transformer(cfg, n_mtp=1)
    model = model.to_empty(device=device).to(torch.bfloat16).requires_grad_(False)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0, 0.02, generator=g)
        for m in model.modules():
            if isinstance(m, Router):
                m.float().bias.zero_()
    model.reset_rotary()
    return model.eval()


def decode_figures(model, label: str) -> dict:
    from engine.cuda_graphs import decode_step_times
    from engine.quant import weight_bytes
    times = decode_step_times(model, ks=(0, 1, 2, 3, 4), n=30, context=1024)
    wb = weight_bytes(model)
    one = times["graphed_ms"][0]
    # a step also reads the latent cache (whole, in the static step): small next to the weights here
    gbps = wb["bytes_per_token"] / (one / 1e3) / 1e9
    return {"label": label, "model_gib": wb["model_bytes"] / 2**30, "bytes_per_token_gib": wb["bytes_per_token"] / 2**30,
            "decode_tokens_per_s": 1e3 / one, "weight_gbps": gbps, "fraction_of_peak": gbps / H200_PEAK_GBPS,
            **times}


@step("v2_lite_shapes")
def _():
    from engine.quant import QuantSpec, quantize_model
    out = {}
    model = v2_lite_model()
    out["bf16"] = decode_figures(model, "bf16")
    quantize_model(model, QuantSpec("int4", 64))
    torch.cuda.empty_cache()
    out["int4"] = decode_figures(model, "int4 group 64")
    out["int4_vs_bf16_decode"] = out["int4"]["decode_tokens_per_s"] / out["bf16"]["decode_tokens_per_s"]
    return out


print(json.dumps({k: v for k, v in results.items() if not k.endswith("_s")})[:2000])
