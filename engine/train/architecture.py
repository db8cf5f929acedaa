"""The default model's architecture, and the measurements that chose it.

`python -m engine.train.architecture` times candidate shapes with random weights on this machine:
training tokens/s, a 1-token decode step, a verification pass over k+1 tokens and one MTP draft, and
from those the decode speedup MTP speculation could reach at a given acceptance.
"""
from __future__ import annotations

import json
import statistics
import sys
import time

import torch

from engine.model.config import parse_config
from engine.model.transformer import Transformer
from engine.train.mtp_loss import mtp_training_loss
from engine.train.tokenizer_train import BOS_ID, EOS_ID

VOCAB_SIZE = 4096
MAX_POSITIONS = 1024


def default_config(layers: int = 12, hidden: int = 192, moe_inter: int = 128, vocab_size: int = VOCAB_SIZE,
                   mtp_depth: int = 2, shared: int = 2) -> dict:
    """config.json for a small DeepSeek-V3: MLA, 8 routed experts (top-2, 4 groups, 2 used) + 1 shared."""
    return {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "vocab_size": vocab_size, "hidden_size": hidden, "intermediate_size": 3 * hidden,
        "moe_intermediate_size": moe_inter, "num_hidden_layers": layers, "first_k_dense_replace": 1,
        "num_attention_heads": 4, "num_key_value_heads": 4, "q_lora_rank": hidden // 2,
        "kv_lora_rank": hidden // 4, "qk_nope_head_dim": hidden // 8, "qk_rope_head_dim": hidden // 16,
        "v_head_dim": hidden // 8, "n_routed_experts": 8, "n_shared_experts": shared, "num_experts_per_tok": 2,
        "n_group": 4, "topk_group": 2, "topk_method": "noaux_tc", "scoring_func": "sigmoid",
        "norm_topk_prob": True, "routed_scaling_factor": 1.0, "max_position_embeddings": MAX_POSITIONS,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "rope_interleave": True, "tie_word_embeddings": False,
        "bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "num_nextn_predict_layers": mtp_depth,
        "torch_dtype": "bfloat16", "hidden_act": "silu",
    }


def _median_time(fn, repeat: int = 15) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.inference_mode()
def decode_costs(model: Transformer, context: int = 200) -> dict:
    model.setup_caches(1, context + 16)
    ids = torch.randint(0, model.cfg.vocab_size, (1, context + 8))
    h = model(ids[:, :context], 0)
    step = lambda n: model.logits(model(ids[:, context:context + n], context))
    out = {"step_1_ms": 1e3 * _median_time(lambda: step(1))}
    for k in range(1, 5):
        out[f"verify_{k + 1}_ms"] = 1e3 * _median_time(lambda: step(k + 1))
    hid = h[:, -1:]
    draft = lambda: model.mtp_logits(0, model.mtp_forward(0, hid, ids[:, context:context + 1], context - 1))
    out["mtp_draft_ms"] = 1e3 * _median_time(draft)
    return out


def train_throughput(model: Transformer, batch: int = 8, seq: int = 256) -> float:
    model.train().requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, model.cfg.vocab_size, (batch, seq))

    def step():
        loss, _ = mtp_training_loss(model, ids)
        loss.backward()
        opt.step()
        opt.zero_grad()
    t = _median_time(step, repeat=4)
    model.eval().requires_grad_(False)
    return batch * seq / t


def predicted_speedup(costs: dict, acceptance: list[float]) -> dict:
    """Expected decode speedup for k = 1..4 given conditional acceptance per draft position."""
    out = {}
    for k in range(1, 5):
        tokens, run = 1.0, 1.0
        for a in acceptance[:k]:
            run *= a
            tokens += run
        cost = costs[f"verify_{k + 1}_ms"] + k * costs["mtp_draft_ms"]
        out[k] = round(tokens * costs["step_1_ms"] / cost, 2)
    return out


def main() -> None:
    torch.manual_seed(0)
    candidates = [dict(layers=8, hidden=256, moe_inter=192, shared=1), dict(layers=12, hidden=192, moe_inter=160, shared=1),
                  dict(layers=6, hidden=320, moe_inter=224, shared=1), dict(layers=12, hidden=192, moe_inter=128, shared=2),
                  dict(layers=16, hidden=160, moe_inter=112, shared=2), dict(layers=12, hidden=192, moe_inter=128, shared=2,
                                                                           vocab_size=3072)]
    acceptance = [0.8, 0.75, 0.7, 0.7]
    for shape in candidates:
        cfg = parse_config(default_config(**shape))
        model = Transformer(cfg, n_mtp=cfg.num_nextn_predict_layers)
        model.init_weights(seed=0, std=0.02)
        costs = decode_costs(model)
        row = {"shape": shape, "params": model.param_counts(), "decode": {k: round(v, 3) for k, v in costs.items()},
               "predicted_speedup_at": {"acceptance": acceptance, "k": predicted_speedup(costs, acceptance)},
               "train_tokens_per_s": round(train_throughput(model))}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    sys.exit(main())
