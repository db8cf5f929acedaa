"""engine/expert_windows.py: the routed-expert bytes each decode pass reads, checked against the choices a
RoutingRecorder saw in the same passes."""
from __future__ import annotations

import torch

from engine.expert_windows import ExpertWindows, expert_bytes, union_sizes
from engine.generate import generate
from engine.model.config import parse_config
from engine.model.transformer import Transformer
from engine.quant import QuantSpec, quantize_model
from engine.routing_stats import RoutingRecorder
from engine.sampling import SamplingParams
from engine.speculative import SpeculativeConfig
from engine.tiny import tiny_config


def tiny(n_mtp: int = 1, quant: str | None = None) -> Transformer:
    model = Transformer(parse_config(tiny_config(num_hidden_layers=3)), n_mtp=n_mtp)
    model.init_weights(seed=0, std=0.1)
    model.eval()
    if quant:
        quantize_model(model, QuantSpec(quant))
    return model


def test_union_sizes_count_distinct_experts_per_pass():
    windows = [torch.tensor([[0, 1]]), torch.tensor([[0, 1], [1, 2], [0, 2]]), torch.tensor([[3, 3]])]
    assert union_sizes(windows, 4).tolist() == [2, 3, 1]


def test_bytes_per_expert_follow_the_weights_precision():
    full, int8 = tiny(), tiny(quant="int8")
    ffn = full.layers[1].ffn
    E, I, H = ffn.router.n_experts, ffn.experts.inter, full.cfg.hidden_size
    assert expert_bytes(ffn.experts, E) == 3 * I * H * 4  # gate, up, down in fp32
    q = int8.layers[1].ffn
    assert expert_bytes(q.experts, E) == 3 * I * H + (2 * I + H) * 4  # int8 values and a scale per row


def test_plain_and_speculative_passes_report_the_experts_they_read():
    model = tiny()
    prompt = list(range(2, 12))
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    plain = generate(model, prompt, params).stats
    layers = 2  # 3 layers, the first dense
    top_k, per = model.cfg.num_experts_per_tok, expert_bytes(model.layers[1].ffn.experts, model.cfg.n_routed_experts)
    assert plain["experts_per_layer_step"] == top_k
    assert plain["expert_bytes_per_step"] == plain["expert_bytes_per_token"] == layers * top_k * per

    spec = generate(model, prompt, params, speculative=SpeculativeConfig(k=3)).stats
    assert top_k < spec["experts_per_layer_step"] <= min(model.cfg.n_routed_experts, 4 * top_k)
    steps, tokens = spec["verify_steps"] + spec["plain_steps"], spec["generated_tokens"] - 1
    assert abs(spec["expert_bytes_per_token"] * tokens - spec["expert_bytes_per_step"] * steps) < 1e-6 * per * steps


def test_windows_match_the_choices_a_recorder_saw():
    """A verification of 4 tokens and a plain step, measured, against the distinct experts in the ids a
    RoutingRecorder recorded for the same passes."""
    model = tiny()
    tokens = torch.arange(2, 18)[None]
    with torch.inference_mode(), RoutingRecorder(model) as rec:
        model.setup_caches(1, 32)
        model(tokens[:, :10], 0)
        rec.clear()
        with ExpertWindows(model) as meter:
            model(tokens[:, 10:14], 10)
            model(tokens[:, 14:15], 14)
    per = meter.bytes[0]
    expected = 0
    for j in range(len(rec.routers)):
        ids = rec.layer(j)[0]
        expected += len(set(ids[:4].flatten().tolist())) + len(set(ids[4:5].flatten().tolist()))
    assert meter.summary(tokens=5)["expert_bytes_per_step"] == expected * per / 2
