"""What scripts/gpu_check.sh runs: the native engine on CUDA against transformers and against itself
on the CPU, the GPU-only expert paths, and decode speed with MTP speculation off and on."""
from __future__ import annotations

import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

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
    pre = load_pretrained(BUNDLED_MODEL, device="cuda")
    res = run_bench(pre, BUILTIN_PROMPTS, configurations(["mtp"], ["1", "2", "3", "auto"]), max_tokens=128, repeat=3)
    return {name: {k: v for k, v in c.items() if k in ("median_decode_tokens_per_s", "speedup", "min_prompt_speedup",
                                                        "identical_to_off", "mean_accepted_length")}
            for name, c in res["configs"].items()}


print(json.dumps({k: v for k, v in results.items() if not k.endswith("_s")})[:2000])
