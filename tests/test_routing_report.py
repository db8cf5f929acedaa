"""`engine routing-report` (engine/routing_report.py): the before/after figures of a routing change and
the routing-tuning checks, on tiny models."""
from __future__ import annotations

import inspect
import json
import textwrap

import pytest
import torch

from conftest import write_agreeing_mtp_model
from engine.evaluate import perplexity
from engine.model.checkpoint import load_model
from engine.pretrained import load_pretrained
from engine.routing_report import checks, mtp_acceptance
from engine.tiny import write_tiny_model


def test_mtp_acceptance_is_exact_when_the_mtp_modules_compute_the_main_prediction(tmp_path):
    """With attention switched off, the main model's prediction at a position depends on that position's
    token alone, and each MTP module computes exactly that function of the token it is given: every
    teacher-forced draft holds. With attention on, the modules' context differs and some drafts fail."""
    ids = torch.randint(0, 512, (300,), generator=torch.Generator().manual_seed(0)).tolist()
    exact = load_model(write_agreeing_mtp_model(tmp_path / "exact", attn_scale=0.0), device="cpu", dtype="float32")
    assert mtp_acceptance(exact, ids, window=128) == [1.0, 1.0]
    usual = load_model(write_agreeing_mtp_model(tmp_path / "usual"), device="cpu", dtype="float32")
    acc = mtp_acceptance(usual, ids, window=128)
    assert len(acc) == 2 and all(0.3 < a < 1.0 for a in acc), acc


def test_checks_compare_the_after_model_with_the_before_model():
    before = {"expert_union": {"3": 5.0}, "perplexity": 100.0, "max_mean_load": 1.5}
    after = {"expert_union": {"3": 4.2}, "perplexity": 101.5, "max_mean_load": 1.31}
    bench = {"after": {"off": {"identical_to_off": True}, "mtp k=2": {"identical_to_off": True}}}
    c = checks(before, after, bench)
    assert c["union_drop"]["value"] == pytest.approx(0.16) and c["union_drop"]["met"]
    assert c["perplexity_rise"]["value"] == pytest.approx(0.015) and c["perplexity_rise"]["met"]
    assert c["max_mean_load"]["value"] == 1.31 and not c["max_mean_load"]["met"]
    assert c["speculative_identical"]["met"]
    bench["after"]["mtp k=2"]["identical_to_off"] = False
    assert not checks(before, after, bench)["speculative_identical"]["met"]
    assert "speculative_identical" not in checks(before, after, None)


def test_routing_report_cli_on_a_rebalanced_copy(tmp_path, capsys):
    from engine.__main__ import main

    src = write_tiny_model(tmp_path / "src", seed=1, num_nextn_predict_layers=1)
    text = tmp_path / "text.txt"
    text.write_text(inspect.getsource(textwrap))
    after = tmp_path / "after"
    assert main(["tune-routing", "--model", str(src), "--data", str(text), "--out", str(after), "--steps", "0",
                 "--calibrate-windows", "4", "--calibrate-len", "64"]) == 0
    out = tmp_path / "report.json"
    assert main(["routing-report", "--before", str(src), "--after", str(after), "--text-file", str(text),
                 "--window", "128", "--k", "2", "--max-tokens", "8", "--repeat", "1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "expert union per 4-token window" in printed and "check max_mean_load" in printed
    r = json.loads(out.read_text())
    for name, folder in (("before", src), ("after", after)):
        expected = perplexity(load_pretrained(folder, device="cpu"), text.read_text(), window=128, routing=True)
        got = r["text"][name]
        assert got["perplexity"] == pytest.approx(expected["perplexity"])
        assert got["max_mean_load"] == pytest.approx(expected["routing"]["max_mean_load"])
        assert got["expert_union"] == pytest.approx(expected["routing"]["expert_union"])
        assert len(got["mtp_acceptance_per_position"]) == 1 and 0 <= got["mtp_acceptance_per_position"][0] <= 1
        bench = r["bench"][name]
        assert set(bench) == {"off", "mtp k=2"} and bench["mtp k=2"]["identical_to_off"]
    assert r["checks"]["speculative_identical"]["met"]
    assert r["checks"]["union_drop"]["value"] == pytest.approx(
        1 - r["text"]["after"]["expert_union"]["3"] / r["text"]["before"]["expert_union"]["3"])


def test_routing_report_refuses_a_model_without_mtp_for_the_bench(tmp_path, capsys):
    from engine.__main__ import main

    src = write_tiny_model(tmp_path / "src", seed=1, num_nextn_predict_layers=0)
    text = tmp_path / "text.txt"
    text.write_text(inspect.getsource(textwrap))
    assert main(["routing-report", "--before", str(src), "--after", str(src), "--text-file", str(text),
                 "--window", "128", "--max-tokens", "4", "--repeat", "1"]) == 2
    assert "MTP" in capsys.readouterr().err
    assert main(["routing-report", "--before", str(src), "--after", str(src), "--text-file", str(text),
                 "--window", "128", "--no-bench"]) == 0
