"""Routing statistics (engine/routing_stats.py), their report in `engine eval`, and bias balancing."""
from __future__ import annotations

import json
import math

import pytest
import torch

from engine.model.config import parse_config
from engine.routing import Router, balanced_online, balancing_bias, batch_balancing_bias, batch_loads, moe_routers
from engine.routing_stats import (RoutingRecorder, expert_counts, expert_union, layer_stats, load_balance,
                                  routing_entropy)
from engine.tiny import tiny_config, write_tiny_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny"), seed=0, num_hidden_layers=3)


def test_counts_load_and_cv_of_known_routing():
    ids = torch.tensor([[0, 1], [0, 2], [0, 1], [3, 0]])  # 4 experts, top-2
    counts = expert_counts(ids, 4)
    assert counts.tolist() == [4, 2, 1, 1]
    lb = load_balance(counts)
    assert lb["max_mean_load"] == pytest.approx(4 / 2)
    std = math.sqrt(((4 - 2) ** 2 + 0 + 1 + 1) / 4)  # population std of [4, 2, 1, 1], mean 2
    assert lb["cv"] == pytest.approx(std / 2)
    assert load_balance(torch.tensor([3, 3, 3])) == {"max_mean_load": 1.0, "cv": 0.0}
    assert load_balance(torch.zeros(3, dtype=torch.long)) == {"max_mean_load": None, "cv": None}


def test_expert_union_of_known_routing():
    ids = torch.tensor([[0, 1], [0, 2], [0, 1], [3, 4], [3, 4]])
    # windows of 2: {0,1,2} {0,1,2} {0,1,3,4} {3,4} → 3, 3, 4, 2
    assert expert_union(ids, 5, 1) == pytest.approx((3 + 3 + 4 + 2) / 4)
    # windows of 3: {0,1,2} {0,1,2,3,4} {0,1,3,4} → 3, 5, 4
    assert expert_union(ids, 5, 2) == pytest.approx(4.0)
    assert expert_union(ids, 5, 3) == pytest.approx((5 + 5) / 2)  # {0,1,2,3,4} {0,1,2,3,4}
    assert expert_union(ids, 5, 4) == pytest.approx(5.0)
    assert expert_union(ids[:3], 5, 4) is None  # shorter than one window
    same = torch.tensor([[2, 5]] * 6)
    assert all(expert_union(same, 8, k) == 2.0 for k in (1, 2, 3, 4))  # one token's set: top_k


def test_entropy_definition():
    uniform = torch.full((1, 8), 0.3)  # sigmoid affinities all equal: normalized, uniform over 8
    assert routing_entropy(uniform).item() == pytest.approx(math.log(8))
    peaked = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    assert routing_entropy(peaked).item() == pytest.approx(0.0, abs=1e-6)
    two = torch.tensor([[0.5, 0.5, 0.0, 0.0]])
    assert routing_entropy(two).item() == pytest.approx(math.log(2))
    s = layer_stats(torch.tensor([[0, 1], [2, 3]]), torch.tensor([1.0, 2.0]), 4)
    assert s["entropy"] == pytest.approx(1.5) and s["tokens_per_expert"] == [1, 1, 1, 1]
    assert s["max_mean_load"] == 1.0 and s["expert_union"] == {"1": 4.0, "2": None, "3": None, "4": None}


def test_recorder_records_in_order_and_keep_trims(tiny_dir):
    from engine.model.checkpoint import load_model
    model = load_model(tiny_dir, device="cpu")
    tokens = torch.randint(0, model.cfg.vocab_size, (1, 20), generator=torch.Generator().manual_seed(0))
    routers = moe_routers(model)
    assert len(routers) == 2  # layers 1 and 2 (layer 0 is dense)
    with torch.inference_mode(), RoutingRecorder(model) as rec:
        model(tokens)
        whole = [rec.layer(j)[0].clone() for j in range(2)]
        rec.clear()
        model(tokens[:, :12])
        model(tokens[:, :12])
        rec.keep(slice(3, 15))  # of the 24 rows of both passes: 3..11 of the first, 0..2 of the second
        assert rec.tokens == 12
        ids, ent = rec.layer(0)
        assert ids.shape == (12, 2) and ent.shape == (12,)
        model(tokens[:, :5])  # after a keep, new rows add to what was kept
        assert rec.tokens == 17
    assert all(r.observe is None for r in routers)  # detached on exit
    ids, whole = ids.sort(-1).values, whole[0].sort(-1).values  # (top-k leaves each row unsorted)
    assert torch.equal(ids[:9], whole[3:12]) and torch.equal(ids[9:], whole[:3])  # causal: same routing
    summary = rec.summary()
    assert summary["tokens"] == 17 and [s["layer"] for s in summary["layers"]] == [1, 2]
    assert all(sum(s["tokens_per_expert"]) == 17 * 2 for s in summary["layers"])
    assert summary["max_mean_load"] == pytest.approx(
        sum(s["max_mean_load"] for s in summary["layers"]) / 2)
    with torch.inference_mode():
        model(tokens)  # recorder detached: nothing more recorded
    assert rec.tokens == 17

    from engine.evaluate import score_ids
    ids = list(range(2, 40))
    plain, routed = score_ids(model, ids, window=16), score_ids(model, ids, window=16, routing=True)
    assert "routing" not in plain and routed["perplexity"] == pytest.approx(plain["perplexity"])
    assert routed["routing"]["tokens"] == routed["tokens"] == len(ids) - 1


def test_eval_json_reports_routing(tiny_dir, capsys):
    from engine.__main__ import main

    text = "def read(path):\n    with open(path) as f:\n        return json.load(f)\n" * 12
    f = tiny_dir / "text.txt"
    f.write_text(text)
    assert main(["eval", "--model", str(tiny_dir), "--text-file", str(f), "--json", "--window", "64"]) == 0
    res = json.loads(capsys.readouterr().out)
    r = res["routing"]
    assert {"perplexity", "tokens", "routing"} <= set(res)
    assert {"tokens", "experts", "top_k", "max_entropy", "max_mean_load", "max_mean_load_worst", "cv", "entropy",
            "expert_union", "layers"} <= set(r)
    assert r["tokens"] == res["tokens"]  # each scored position routed once, despite overlapping windows
    assert r["experts"] == 8 and r["top_k"] == 2 and len(r["layers"]) == 2
    assert 1.0 <= r["max_mean_load"] <= r["max_mean_load_worst"] <= 8 / 2 and r["cv"] >= 0
    assert 0 < r["entropy"] <= r["max_entropy"] == pytest.approx(math.log(8))
    unions = [r["expert_union"][str(k)] for k in (1, 2, 3, 4)]
    assert 2 <= unions[0] <= unions[1] <= unions[2] <= unions[3] <= 8  # a wider window never touches fewer
    for layer in r["layers"]:
        assert sum(layer["tokens_per_expert"]) == 2 * res["tokens"]
        assert set(layer["expert_union"]) == {"1", "2", "3", "4"}
    assert main(["eval", "--model", str(tiny_dir), "--text-file", str(f), "--window", "64"]) == 0
    assert "max/mean load" in capsys.readouterr().out


def skewed_router(seed: int = 0) -> Router:
    """A V3 router (16 experts, top-2, no groups) whose gate sends nearly every token to experts 0 and 1."""
    cfg = parse_config(tiny_config(n_routed_experts=16, num_experts_per_tok=2, n_group=1, topk_group=1))
    router = Router(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        router.weight.copy_(torch.randn(router.weight.shape, generator=g) * 0.05)
        router.weight[:2] += 0.1  # inputs have mean +1 in every dimension: experts 0, 1 score far higher
    return router


def inputs(router: Router, g: torch.Generator, n: int = 256) -> torch.Tensor:
    return torch.randn(n, router.weight.shape[1], generator=g) + 1.0


def imbalance(router: Router, g: torch.Generator) -> float:
    """max/mean load of fresh batches under the current bias."""
    router.track_load(True)
    for _ in range(8):
        router(inputs(router, g))
    counts = router.load
    router.track_load(False)
    return load_balance(counts)["max_mean_load"]


def test_bias_update_cuts_the_imbalance_of_a_skewed_router():
    router = skewed_router()
    g = torch.Generator().manual_seed(1)
    before = imbalance(router, g)
    assert before > 6  # nearly all tokens on 2 of 16 experts (8 would be all)
    router.track_load(True)
    for _ in range(300):  # training: count a batch, then move the bias by γ toward balance
        router(inputs(router, g))
        router.balance_bias(0.01)
    router.track_load(False)
    after = imbalance(router, g)
    assert after < 1.6 and before / after > 4, (before, after)
    assert router.bias[:2].max() < router.bias[2:].min()  # the favoured experts were pushed down


def test_balancing_bias_evens_a_skewed_routers_load_outright():
    """Solved on one set of tokens, the bias balances them (where γ-steps need hundreds of batches) and
    carries to fresh tokens from the same distribution; group-limited routing too."""
    g = torch.Generator().manual_seed(2)
    for cfg in ({"n_group": 1, "topk_group": 1}, {"n_group": 4, "topk_group": 2}):
        router = skewed_router()
        router.n_group, router.topk_group = cfg["n_group"], cfg["topk_group"]
        x = inputs(router, g, 4096)
        assert load_balance(router.count(router(x)[1]))["max_mean_load"] > 5
        bias, load = balancing_bias(router, router.scores(x))
        router.bias.copy_(bias)
        measured = load_balance(router.count(router(x)[1]))["max_mean_load"]
        assert measured == pytest.approx(load) and load < 1.03, cfg
        assert imbalance(router, g) < 1.15, cfg  # fresh batches
        assert bias[:2].max() < bias[2:].min()


def documents_scores(g: torch.Generator, docs: int = 64, windows: int = 4, tokens: int = 64) -> torch.Tensor:
    """Affinities [docs·windows, tokens, 8] of windows of documents: experts 1-7 are liked alike by every
    document; expert 0 only by one document in eight, and by those strongly (a specialist)."""
    scores = torch.rand(docs, windows, tokens, 8, generator=g) * 0.5
    scores[torch.randperm(docs, generator=g)[:docs // 8], :, :, 0] += 0.4
    return scores.view(docs * windows, tokens, 8)


def random_batches(g: torch.Generator, docs: int = 64, windows: int = 4, per_batch: int = 16, n: int = 200):
    """n batches of one window from each of per_batch documents (window index = doc · windows + w)."""
    return torch.stack([torch.randperm(docs, generator=g)[:per_batch] * windows
                        + torch.randint(windows, (per_batch,), generator=g) for _ in range(n)])


def test_batch_balancing_bias_lowers_the_busiest_expert_of_batches_of_documents():
    """Balanced over all tokens, a specialist expert (liked by few documents, strongly) tops the batches
    that hold several of its documents; solved batch-wise, its bias goes lower, and the mean max/mean load
    of batches of 16 documents falls, on fresh documents too."""
    cfg = parse_config(tiny_config(n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1))
    router = Router(cfg)
    g = torch.Generator().manual_seed(3)
    scores, batches = documents_scores(g), random_batches(g)
    flat_bias, _ = balancing_bias(router, scores.view(-1, 8))
    bias, worst = batch_balancing_bias(router, scores, batches)
    assert worst == pytest.approx(float(batch_loads(router, scores, bias, batches).max(dim=1).values.mean()))
    flat = float(batch_loads(router, scores, flat_bias, batches).max(dim=1).values.mean())
    assert worst < flat - 0.015, (worst, flat)
    assert bias[0] - bias[1:].mean() < flat_bias[0] - flat_bias[1:].mean() - 0.01  # the specialist pushed down
    fresh, fresh_batches = documents_scores(g), random_batches(g)
    on_fresh = {name: float(batch_loads(router, fresh, b, fresh_batches).max(dim=1).values.mean())
                for name, b in (("flat", flat_bias), ("batch", bias))}
    assert on_fresh["batch"] < on_fresh["flat"] - 0.005, on_fresh


def test_online_balance_moves_bias_per_pass_and_restores_it(tiny_dir):
    from engine.generate import generate
    from engine.model.checkpoint import load_model
    from engine.sampling import SamplingParams

    model = load_model(tiny_dir, device="cpu")
    routers = moe_routers(model)
    params = SamplingParams(max_tokens=12)
    plain = generate(model, [5, 6, 7, 8], params)
    saved = [r.bias.clone() for r in routers]
    with RoutingRecorder(model) as rec:
        online = generate(model, [5, 6, 7, 8], params, online_balance=0.5)
    assert online.stats["online_balance"] == 0.5 and len(online.token_ids) == 12
    assert all(torch.equal(r.bias, b) and r.online_step is None for r, b in zip(routers, saved))
    assert generate(model, [5, 6, 7, 8], params).token_ids == plain.token_ids  # the file's bias is back
    # a large γ changes the routing of the decode steps (the prompt's pass, first, is routed as usual)
    with RoutingRecorder(model) as again:
        generate(model, [5, 6, 7, 8], params)
    assert torch.equal(rec.layer(0)[0][:4], again.layer(0)[0][:4])
    assert not torch.equal(rec.layer(0)[0], again.layer(0)[0])

    router = skewed_router()
    g = torch.Generator().manual_seed(2)
    before = imbalance(router, g)
    router.online_step = 0.01  # the online rule on its own: one pass's counts at a time
    with torch.inference_mode():
        for _ in range(300):
            router(inputs(router, g, 16))
    router.online_step = None
    assert imbalance(router, g) < before / 3


def test_online_balance_needs_a_v3_router(tmp_path):
    from engine.model.transformer import Transformer

    cfg = parse_config(tiny_config(topk_method="greedy", scoring_func="softmax", n_group=1, topk_group=1,
                                   model_type="deepseek_v2", architectures=["DeepseekV2ForCausalLM"]))
    model = Transformer(cfg)
    with pytest.raises(ValueError, match="noaux_tc"):
        with balanced_online(model, 0.1):
            pass


def test_native_backend_reports_routing_of_the_generated_tokens(tiny_dir):
    from engine.backends.native import NativeBackend
    from engine.protocol import ChatMessage, Generate, GenerateParams, Load

    backend = NativeBackend()
    backend.load(Load(path=str(tiny_dir)), lambda *a, **k: None)
    done = backend.generate(Generate(id="r", messages=[ChatMessage(role="user", content="Hello there")],
                                     params=GenerateParams(max_tokens=10)), lambda ev: None, lambda: False)
    r = done.stats["routing"]
    assert len(done.stats["expert_load"]) == 2  # kept beside the new summary
    # the generated tokens fed back (all but the last), not the prompt
    assert r["tokens"] == done.stats["generated_tokens"] - 1 == 9
    assert [s["layer"] for s in r["layers"]] == [1, 2] and "tokens_per_expert" not in r["layers"][0]
    assert 2 <= r["expert_union"]["1"] <= r["expert_union"]["4"] <= 8
    json.dumps(done.stats)  # travels as JSON
    assert all(rt.observe is None for rt in moe_routers(backend.pre.model))


def test_graph_capture_pauses_counting_and_recording(tiny_dir):
    from engine.cuda_graphs import load_counting_paused
    from engine.model.checkpoint import load_model

    model = load_model(tiny_dir, device="cpu")
    routers = moe_routers(model)
    for r in routers:
        r.track_load(True)
    with RoutingRecorder(model) as rec:
        loads = [r.load for r in routers]
        with load_counting_paused(model), torch.inference_mode():
            assert all(r.load is None and r.observe is None for r in routers)
            model(torch.tensor([[3, 4, 5]]))
        assert all(r.load is l and r.observe is not None for r, l in zip(routers, loads))
        assert rec.tokens == 0 and sum(loads[0].tolist()) == 0
