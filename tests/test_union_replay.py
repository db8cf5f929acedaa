"""engine/union_replay.py: verification traces of two models replayed on larger experts."""
from __future__ import annotations

import pytest
import torch

from engine.pretrained import load_pretrained
from engine.tiny import write_tiny_model
from engine.union_replay import SPREAD, mapped, replay, trace


def test_mapping_spreads_each_expert_over_three():
    assert mapped(torch.tensor([[0, 2]])).tolist() == [[0, 1, 2, 6, 7, 8]]


def test_traces_replay_with_their_own_unions(tmp_path):
    a = load_pretrained(write_tiny_model(tmp_path / "a", seed=1, num_hidden_layers=3), device="cpu")
    b = load_pretrained(write_tiny_model(tmp_path / "b", seed=2, num_hidden_layers=3), device="cpu")
    prompts = [{"name": "p", "prompt": "def f(x):"}]
    traces = {"before": trace(a, k=3, max_tokens=12, prompts=prompts), "after": trace(b, k=3, max_tokens=12, prompts=prompts)}
    for t in traces.values():
        assert t["tokens"] == 11 and all(len(p) == 2 for p in t["passes"])  # 2 MoE layers per pass
        assert all(p[0].shape[0] <= 4 for p in t["passes"])  # verification windows, not the prefill
    r = replay(traces, n_layers=2, hidden=64, inter=32)
    for name, t in traces.items():
        e = r[name]
        distinct = sum(len(set(mapped(ids).flatten().tolist())) for p in t["passes"] for ids in p)
        assert e["verify_steps"] == len(t["passes"])
        assert e["bytes_per_step"] * e["verify_steps"] == pytest.approx(distinct * r["target"]["expert_bytes"])
        assert e["bytes_per_token"] == pytest.approx(distinct * r["target"]["expert_bytes"] / 11)
        assert SPREAD * 2 <= e["experts_per_layer_step"] <= min(r["target"]["experts"], 4 * 2 * SPREAD)
        assert e["median_step_s"] > 0
