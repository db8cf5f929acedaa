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
    before = {"expert_union": {"3": 5.0}, "perplexity": 100.0, "batch_max_mean_load": 1.5}
    after = {"expert_union": {"3": 4.2}, "perplexity": 101.5, "batch_max_mean_load": 1.31}
    bench = {"after": {"off": {"identical_to_off": True}, "mtp k=2": {"identical_to_off": True}}}
    c = checks(before, after, bench)
    assert c["union_drop"]["value"] == pytest.approx(0.16) and c["union_drop"]["met"]
    assert c["perplexity_rise"]["value"] == pytest.approx(0.015) and c["perplexity_rise"]["met"]
    assert c["batch_max_mean_load"]["value"] == 1.31 and not c["batch_max_mean_load"]["met"]
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
    docs = tmp_path / "docs"
    docs.mkdir()
    source = inspect.getsource(textwrap)
    for i in range(3):  # three documents, each more than one 64-token window
        (docs / f"d{i}.txt").write_text(source[i * 2000:(i + 1) * 2000])
    assert main(["routing-report", "--before", str(src), "--after", str(after), "--text-file", str(docs),
                 "--window", "128", "--k", "2", "--max-tokens", "8", "--repeat", "1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "expert union per 4-token window" in printed and "check batch_max_mean_load" in printed
    assert "U(4)/top_k per layer" in printed
    text.write_text("\n\n".join((docs / f"d{i}.txt").read_text() for i in range(3)))
    r = json.loads(out.read_text())
    for name, folder in (("before", src), ("after", after)):
        expected = perplexity(load_pretrained(folder, device="cpu"), text.read_text(), window=128, routing=True)
        got = r["text"][name]
        assert got["perplexity"] == pytest.approx(expected["perplexity"])
        assert got["max_mean_load"] == pytest.approx(expected["routing"]["max_mean_load"])
        assert got["expert_union"] == pytest.approx(expected["routing"]["expert_union"])
        assert got["union_per_top_k_layers"] == pytest.approx(
            [x["expert_union"]["3"] / expected["routing"]["top_k"] for x in expected["routing"]["layers"]])
        assert len(got["mtp_acceptance_per_position"]) == 1 and 0 <= got["mtp_acceptance_per_position"][0] <= 1
        assert got["documents"] == 3 and got["batches"] >= 1 and 1 <= got["batch_max_mean_load"] <= 4
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


def test_eval_over_several_documents_reports_the_batch_wise_load(tmp_path, capsys):
    """engine eval over a folder of documents: per-text figures, and the load of batches made of one
    window from each document, recomputed here from the router choices of the same windows."""
    import torch

    from engine.__main__ import main
    from engine.routing_stats import RoutingRecorder, batch_load, expert_counts, load_balance

    src = write_tiny_model(tmp_path / "src", seed=3)
    docs = tmp_path / "docs"
    docs.mkdir()
    source = inspect.getsource(textwrap)
    for i in range(4):
        (docs / f"d{i}.txt").write_text(source[i * 1500:(i + 1) * 1500])
    assert main(["eval", "--model", str(src), "--text-file", str(docs), "--batch-window", "64", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert len(r["texts"]) == 4 and r["routing"]["documents"] == 4 and r["routing"]["batches"] >= 2
    pre = load_pretrained(src, device="cpu")
    ids = [pre.tokenizer.encode((docs / f"d{i}.txt").read_text()) for i in range(4)]
    assert batch_load(pre.model, ids, 64, 4)["batch_max_mean_load"] == pytest.approx(r["routing"]["batch_max_mean_load"])
    first = torch.tensor([d[:64] for d in ids])  # the first batch by hand
    with torch.inference_mode(), RoutingRecorder(pre.model) as rec:
        pre.model(first)
    loads = [load_balance(expert_counts(rec.layer(j)[0], r_.n_experts))["max_mean_load"]
             for j, (_, _, r_) in enumerate(rec.routers)]
    one = batch_load(pre.model, [d[:64] for d in ids], 64, 4)
    assert one["batches"] == 1 and one["batch_max_mean_load_layers"] == pytest.approx(loads)
