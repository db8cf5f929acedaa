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
            verify_bytes = meter.last_bytes()
            model(tokens[:, 14:15], 14)
            plain_bytes = meter.last_bytes()
    per = meter.bytes[0]
    verify = plain = 0
    for j in range(len(rec.routers)):
        ids = rec.layer(j)[0]
        verify += len(set(ids[:4].flatten().tolist()))
        plain += len(set(ids[4:5].flatten().tolist()))
    assert verify_bytes == verify * per and plain_bytes == plain * per
    assert meter.summary(tokens=5)["expert_bytes_per_step"] == (verify + plain) * per / 2


def test_the_draft_length_follows_the_expected_union_where_bytes_set_the_cost():
    """A controller fed steps whose time is 1 ms plus 1 ns per expert byte (a bandwidth-bound model):
    it learns the price of a byte from the spread of windows at equal k, and picks shorter drafts when
    the recent windows read more experts than their average, longer ones when they read fewer."""
    import random

    from engine.speculative import DraftLength

    rng = random.Random(0)
    per_k = {0: 2e6, 1: 3.4e6, 2: 4.6e6, 3: 5.6e6, 4: 6.4e6}  # union bytes of a window with k drafts

    def trained(ratio: float) -> DraftLength:
        c = DraftLength(SpeculativeConfig(k="auto", k_max=4))
        for step in range(400):
            k = step % 5
            spread = 1.0 + rng.uniform(-0.2, 0.2)
            b = per_k[k] * spread * (ratio if step >= 380 else 1.0)
            accepted = next((j for j in range(k) if rng.random() > 0.8), k)
            c.observe(k, accepted, 1e-3 + 1e-9 * b, 0.2e-3 * k, b)
        return c

    even, coherent, scattered = trained(1.0), trained(0.6), trained(1.6)
    assert 0.5e-9 < even.seconds_per_byte < 2e-9
    assert abs(even.union_cost(3)) < 0.3e-3
    assert coherent.union_cost(3) < 0 < scattered.union_cost(3)
    assert coherent.best_k(4) >= even.best_k(4) >= scattered.best_k(4)
    assert coherent.best_k(4) > scattered.best_k(4)


def test_the_draft_length_ignores_bytes_that_do_not_move_the_time():
    """Step times that do not depend on the union (a model in cache): the fitted price stays near 0."""
    import random

    from engine.speculative import DraftLength

    rng = random.Random(1)
    c = DraftLength(SpeculativeConfig(k="auto", k_max=3))
    for step in range(300):
        k = step % 4
        c.observe(k, k, 1e-3 * (1 + 0.3 * k) * (1 + rng.uniform(-0.05, 0.05)), 1e-4 * k,
                  1e6 * (k + 1) * (1 + rng.uniform(-0.3, 0.3)))
    assert c.seconds_per_byte * 1e6 < 0.05e-3  # under 5% of a step per MB of union
