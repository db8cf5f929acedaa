"""GRPO routing tuning (engine/train/tune_routing.py): the policy maths, a toy problem with a known best
expert per token, and `engine tune-routing` end to end on a tiny model (checkpoint, resume, loading)."""
from __future__ import annotations

import inspect
import json
import textwrap

import numpy as np
import pytest
import torch

from engine.model.config import parse_config
from engine.routing import Router
from engine.tiny import tiny_config, write_tiny_model
from engine.train.tune_routing import (
    Sampler,
    TuneSettings,
    check_only_routers_differ,
    group_advantages,
    load_imbalance,
    plackett_luce,
    policy_loss,
    sequence_balance,
    window_union,
)


def test_plackett_luce_matches_enumeration():
    logits = torch.tensor([[0.3, -1.0, 2.0, float("-inf"), 0.5]])
    p = logits.softmax(-1)[0]
    total = 0.0
    for a in range(5):
        for b in range(5):
            if a != b and p[a] > 0 and p[b] > 0:
                lp = plackett_luce(logits, torch.tensor([[a, b]]))
                expected = p[a] * p[b] / (1 - p[a])
                assert torch.allclose(lp.exp(), expected, atol=1e-6)
                total += float(lp.exp())
    assert abs(total - 1.0) < 1e-5


def test_window_union_counts_distinct_experts():
    ids = torch.tensor([[[0, 1], [1, 0], [2, 3], [0, 1], [4, 5], [4, 5], [4, 5], [4, 5]]])  # [1, 8, 2]
    assert window_union(ids, 8, 4).tolist() == [[4.0, 2.0]]
    assert window_union(ids, 8, 4, step=1)[0].tolist() == [4.0, 6.0, 6.0, 4.0, 2.0]


def test_grpo_learns_the_best_expert_per_token():
    """One router on random inputs; reward 1 when its (sampled) expert is the token's hidden best
    expert, a fixed random linear function of the input. GRPO must raise the mean reward and make the
    deterministic choice match the best expert far above chance (1/8)."""
    torch.manual_seed(0)
    cfg = parse_config(tiny_config(hidden_size=16, num_experts_per_tok=1, n_group=1, topk_group=1))
    router = Router(cfg)
    with torch.no_grad():
        router.weight.normal_(0, 0.02)
    teacher = torch.randn(8, 16)
    x_all = torch.randn(2048, 16)
    best_all = (x_all @ teacher.T).argmax(-1)
    s = TuneSettings(group=8, chunk=1, temperature=0.05, lr=2e-2, epochs=2, kl=0.0)
    ref = [(router.weight.detach().clone(), router.bias.detach().clone())]
    params = [router.weight, router.bias]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=s.lr)
    gen = torch.Generator().manual_seed(0)
    rewards = []

    def matches() -> float:
        with torch.no_grad():
            return float((router(x_all)[1][:, 0] == best_all).float().mean())

    before = matches()
    with Sampler([router], s.temperature) as sampler:
        sampler.gen = gen
        for step in range(150):
            idx = torch.randint(0, 2048, (64,), generator=gen)
            x, best = x_all[idx], best_all[idx]
            with torch.no_grad():
                _, ids = router(x.repeat(s.group, 1))
            reward = (ids[:, 0] == best.repeat(s.group)).float().view(s.group, -1, 1)  # [G, B, C=1]
            rewards.append(float(reward.mean()))
            for _ in range(s.epochs):
                loss, _ = policy_loss(sampler, ref, group_advantages(reward), s)
                opt.zero_grad()
                loss.backward()
                opt.step()
    after = matches()
    assert np.mean(rewards[-20:]) > np.mean(rewards[:5]) + 0.3
    assert before < 0.3 and after > 0.7, (before, after)


def test_sequence_balance_loss_evens_the_load_within_each_text():
    """Two "texts" whose tokens cluster around their own topic direction, so each text sends nearly all
    its tokens to the same few experts although both together are less skewed. Minimizing the
    sequence-wise balance loss alone must even the load inside each text; it is 1 when perfectly even."""
    torch.manual_seed(0)
    cfg = parse_config(tiny_config(hidden_size=16, n_group=1, topk_group=1))  # 8 experts, top-2
    router = Router(cfg)
    topics = torch.randn(2, 16)
    x = torch.cat([2 * topics[i] + torch.randn(256, 16) for i in range(2)])  # [2 texts × 256, 16]
    with torch.no_grad():
        router.weight.copy_(0.3 * torch.randn(8, 16))
        router.bias.zero_()

    def within_text_load() -> float:
        with torch.no_grad():
            ids = router(x)[1].view(2, 256, 2)
        return float(np.mean([load_imbalance(ids[i:i + 1], 8) for i in range(2)]))

    before = within_text_load()
    opt = torch.optim.Adam([router.weight], lr=3e-2)
    for _ in range(150):
        with torch.no_grad():
            ids = router(x)[1]
        loss = sequence_balance(router, x, ids, 2) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = within_text_load()
    assert before > 3.0 and after < 1.5, (before, after)  # measured 3.48 → 1.01
    even = torch.arange(16).remainder(8).view(8, 2)  # every expert twice over 8 tokens
    flat = torch.zeros(8, 16)  # equal affinities
    assert abs(float(sequence_balance(router, flat, even, 1).detach()) - 1.0) < 1e-6


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    from engine.__main__ import main

    root = tmp_path_factory.mktemp("grpo")
    src = write_tiny_model(root / "src", seed=1, num_nextn_predict_layers=1)
    text = root / "text.txt"
    text.write_text(inspect.getsource(textwrap))
    out = root / "tuned"
    args = ["tune-routing", "--model", str(src), "--data", str(text), "--out", str(out), "--group-size", "4",
            "--batch", "2", "--seq-len", "32", "--chunk", "16", "--checkpoint-every", "2", "--calibrate-windows", "2",
            "--calibrate-len", "32",
            "--lr", "0.05"]
    assert main(args + ["--steps", "2"]) == 0
    first = [json.loads(x) for x in (out / "tune_log.jsonl").read_text().splitlines()]
    assert main(args + ["--steps", "4"]) == 0  # resumes at step 2
    return src, out, first


def test_tune_routing_writes_a_checkpoint_where_only_routers_differ(tuned):
    src, out, _ = tuned
    changed = check_only_routers_differ(src, out)
    assert any(k.endswith("mlp.gate.weight") for k in changed)
    assert any(k.endswith("e_score_correction_bias") for k in changed)
    assert (out / "tokenizer.json").is_file() and (out / "config.json").read_text() == (src / "config.json").read_text()


def test_tune_routing_logs_every_component_and_resumes(tuned):
    _, out, first = tuned
    lines = [json.loads(x) for x in (out / "tune_log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in first] == [1, 2]
    assert [x["step"] for x in lines] == [1, 2, 3, 4]  # the second run went on from step 2
    for key in ("reward", "loss", "lm", "mtp1", "imbalance", "entropy", "union", "kl", "clip_frac"):
        assert all(np.isfinite(x[key]) for x in lines), key
    assert json.loads((out / "tuning.json").read_text())["steps_done"] == 4


def test_tuned_checkpoint_loads_in_engine_and_transformers(tuned):
    from transformers import AutoModelForCausalLM

    from engine.model.checkpoint import load_model

    _, out, _ = tuned
    model = load_model(out, device="cpu", dtype="float32")
    hf = AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    tokens = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.logits(model(tokens))
        theirs = hf(tokens).logits.float()
    torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=2e-4)


def test_steps_0_only_balances_the_bias_of_a_tuned_checkpoint(tuned, tmp_path):
    """`--steps 0 --model <tuned>`: no GRPO step, only the bias calibration; the router weights stay as
    they were, only bias tensors differ, and the calibration windows come out evenly loaded."""
    from safetensors.torch import load_file

    from engine.__main__ import main
    from engine.model.checkpoint import checkpoint_files, load_model
    from engine.routing_stats import RoutingRecorder
    from engine.train.tune_routing import default_ids, windows

    src, tuned_dir, _ = tuned
    out = tmp_path / "balanced"
    data = src.parent / "text.txt"
    assert main(["tune-routing", "--model", str(tuned_dir), "--data", str(data), "--out", str(out),
                 "--steps", "0", "--calibrate-windows", "8", "--calibrate-len", "64", "--batch", "2",
                 "--seq-len", "32", "--chunk", "16"]) == 0
    changed = check_only_routers_differ(tuned_dir, out)
    assert changed and all(k.endswith("e_score_correction_bias") for k in changed)
    check_only_routers_differ(src, out)
    assert json.loads((out / "tuning.json").read_text())["settings"]["calibrate_windows"] == 8
    assert not (out / "tune_log.jsonl").read_text().strip()
    tokens = windows(default_ids(out, str(data)), 8, 64, TuneSettings().seed + 1, 0)  # what it balanced on
    loads = {}
    for name, folder in (("before", tuned_dir), ("after", out)):
        model = load_model(folder, device="cpu", dtype="float32")
        with RoutingRecorder(model) as rec, torch.no_grad():
            model(tokens)
        loads[name] = rec.summary()["max_mean_load_worst"]
    assert loads["after"] < 1.1 and loads["after"] < loads["before"], loads
    assert len(checkpoint_files(out)) == len(checkpoint_files(tuned_dir))
    assert load_file(str(checkpoint_files(out)[0])).keys() == load_file(str(checkpoint_files(tuned_dir)[0])).keys()


def test_a_folder_of_documents_balances_the_bias_batch_wise(tuned, tmp_path, capsys):
    """--data FOLDER: batches of one window from each of 16 different documents, as `engine eval` forms
    them; the main layers' bias is solved for their mean max/mean load, and only bias tensors change."""
    import difflib
    import pydoc

    from engine.__main__ import main
    from engine.tokenizer import Tokenizer
    from engine.train.tune_routing import document_batches

    src, tuned_dir, _ = tuned
    docs = tmp_path / "docs"
    docs.mkdir()
    for i, module in enumerate((textwrap, inspect, json.decoder, json.encoder, difflib, pydoc) * 3):
        (docs / f"{i:02d}.txt").write_text(f"# document {i}\n" + inspect.getsource(module)[i * 300:i * 300 + 3000])
    tokens, batches = document_batches(tuned_dir, str(docs), n_windows=200, window=32, per_batch=16, seed=1)
    assert tokens.shape[1] == 32 and len(tokens) <= 200 and batches.shape == (400, 16)
    tok = Tokenizer.from_dir(tuned_dir)
    texts = [tok.encode(f.read_text()) for f in sorted(docs.glob("*.txt"))]

    def document_of(row: list[int]) -> int:
        return next(d for d, ids in enumerate(texts) if any(ids[i:i + 32] == row for i in range(0, len(ids), 32)))

    owner = [document_of(r) for r in tokens.tolist()]
    assert all(len({owner[w] for w in b}) == 16 for b in batches.tolist())  # 16 documents in each batch
    assert document_batches(tuned_dir, str(docs / "00.txt"), 200, 32, 16, 1) is None  # one text: all tokens
    out = tmp_path / "balanced"
    capsys.readouterr()
    assert main(["tune-routing", "--model", str(tuned_dir), "--data", str(docs), "--out", str(out),
                 "--steps", "0", "--calibrate-windows", "200", "--calibrate-len", "32"]) == 0
    assert "batch-wise on 400 batches of 16 documents' 32-token windows" in capsys.readouterr().err
    changed = check_only_routers_differ(tuned_dir, out)
    assert changed and all(k.endswith("e_score_correction_bias") for k in changed)
    assert json.loads((out / "tuning.json").read_text())["settings"]["calibrate_batch"] == 16


def test_default_tuning_text_keeps_the_chats(tmp_path, monkeypatch):
    """Without --data, a model whose tokenizer is not the bundled one tunes and heals on the corpus
    builder's documents and its chats in the model's own chat template: healing on documents alone
    unlearned the chat turns (the bundled model's replies stopped 0 times in 20 after it)."""
    import engine.train.corpus as corpus_mod
    from engine.tokenizer import Tokenizer
    from engine.train.corpus import Corpus
    from engine.train.tune_routing import default_ids

    src = write_tiny_model(tmp_path / "src", seed=1)
    chat = [{"role": "user", "content": "What is textwrap?"}, {"role": "assistant", "content": "Text wrapping."}]
    monkeypatch.setattr(corpus_mod, "build_corpus", lambda: Corpus(train=["def f():\n    return 1\n"],
                                                                    train_chats=[chat]))
    tok = Tokenizer.from_dir(src)
    assert tok.chat_template
    text = tok.decode(default_ids(src, None).tolist())
    assert "def f():" in text and tok.decode(tok.encode(tok.render_chat(chat, add_generation_prompt=False))) in text


def test_balance_scope_window_scores_each_window_load(tmp_path):
    """--balance-scope window: the imbalance is each token window's own max/mean load (so it differs
    between the B windows of a rollout); an unknown scope is refused."""
    from engine.model.checkpoint import load_model
    from engine.train.mtp_loss import lm_and_mtp_losses
    from engine.train.tune_routing import load_imbalance, rewards, routers_of, tune

    src = write_tiny_model(tmp_path / "src", seed=1, num_nextn_predict_layers=1)
    model = load_model(src, device="cpu", dtype="float32")
    routers = [r for _, r in routers_of(model)]
    s = TuneSettings(group=2, batch=3, seq_len=32, chunk=16, balance_scope="window")
    tokens = torch.randint(0, 512, (s.batch, s.seq_len), generator=torch.Generator().manual_seed(0))
    with Sampler(routers, s.temperature) as sampler, torch.no_grad():
        sampler.gen = torch.Generator().manual_seed(0)
        lm, mtp = lm_and_mtp_losses(model, tokens.repeat(s.group, 1), reduction="none")
        parts = rewards(model, sampler, lm, mtp, s)
        want = sum(load_imbalance(rec["ids"].view(s.group * s.batch, -1, r.top_k), r.n_experts)
                   for r, rec in zip(routers, sampler.records)) / len(routers)
    torch.testing.assert_close(parts["imbalance"][..., 0], want.view(s.group, s.batch))
    assert torch.equal(parts["imbalance"][..., 0], parts["imbalance"][..., 1])  # the same for every chunk
    with pytest.raises(ValueError, match="balance-scope"):
        tune(src, tmp_path / "x", TuneSettings(steps=1, balance_scope="both"))


def fp8_copy(src, out):
    """src's checkpoint in DeepSeek's FP8 layout (e4m3 weights, weight_scale_inv per 128×128 block) for
    every linear weight but the routers', norms, embedding and head."""
    from safetensors.torch import load_file, save_file

    from kernels.formats import quantize_fp8

    out.mkdir()
    state = {}
    for name, w in load_file(src / "model.safetensors").items():
        if w.dim() == 2 and not any(p in name for p in ("norm", "embed", "lm_head", "mlp.gate.weight", "eh_proj")):
            q = quantize_fp8(w)
            state[name], state[name + "_scale_inv"] = q.qweight, q.scale
        else:
            state[name] = w
    save_file(state, str(out / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": [128, 128]}
    (out / "config.json").write_text(json.dumps(cfg))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        if (src / f).is_file():
            (out / f).write_bytes((src / f).read_bytes())
    return out


@pytest.mark.parametrize("kind", ["int4", "fp8", "v2-softmax"])
def test_tune_routing_runs_on_other_deepseek_checkpoints(kind, tmp_path):
    """Not only the bundled model: an int4 checkpoint (compressed-tensors), DeepSeek's FP8 layout and a
    DeepSeek-V2 model (softmax router, no bias) tune, resume and load; only router tensors change."""
    from engine.__main__ import main
    from engine.model.checkpoint import load_model

    over = {"model_type": "deepseek_v2", "scoring_func": "softmax", "topk_method": "group_limited_greedy",
            "norm_topk_prob": False, "routed_scaling_factor": 1.0} if kind == "v2-softmax" else {}
    src = write_tiny_model(tmp_path / "src", seed=2, **over)
    if kind == "int4":
        assert main(["quantize", "--model", str(src), "--to", "int4", "--out", str(tmp_path / "q")]) == 0
        src = tmp_path / "q"
    elif kind == "fp8":
        src = fp8_copy(src, tmp_path / "q")
    text = tmp_path / "text.txt"
    text.write_text(inspect.getsource(textwrap))
    out = tmp_path / "tuned"
    args = ["tune-routing", "--model", str(src), "--data", str(text), "--out", str(out), "--group-size", "4",
            "--batch", "2", "--seq-len", "32", "--chunk", "16", "--checkpoint-every", "1", "--calibrate-windows", "2",
            "--calibrate-len", "32", "--lr", "0.05"]
    assert main(args + ["--steps", "1"]) == 0
    assert main(args + ["--steps", "2"]) == 0  # resumes at step 1
    assert [json.loads(x)["step"] for x in (out / "tune_log.jsonl").read_text().splitlines()] == [1, 2]
    changed = check_only_routers_differ(src, out)
    assert any(k.endswith("mlp.gate.weight") for k in changed)
    model = load_model(out)
    assert model.logits(model(torch.arange(2, 10)[None])).isfinite().all()


def test_layer_credit_gives_each_router_the_advantage_of_its_own_routing_cost(tmp_path):
    """credit="layer": router l's advantage is the group-normalized −loss − (its own λ_bal·load, λ_ent·entropy,
    λ_union·union); the mean of those costs over the routers is exactly the routing part of the total reward
    (a model without MTP, so every router is a main layer); credit="shared" gives every router the total's."""
    from engine.model.checkpoint import load_model
    from engine.train.mtp_loss import lm_and_mtp_losses
    from engine.train.tune_routing import advantages, rewards, routers_of, tune

    src = write_tiny_model(tmp_path / "src", seed=1, num_nextn_predict_layers=0, num_hidden_layers=3)
    model = load_model(src, device="cpu", dtype="float32")
    routers = [r for _, r in routers_of(model)]
    assert len(routers) >= 2
    s = TuneSettings(group=4, batch=2, seq_len=32, chunk=16, lambda_union=0.7, lambda_ent=0.2, lambda_bal=0.5)
    tokens = torch.randint(0, 512, (s.batch, s.seq_len), generator=torch.Generator().manual_seed(0))
    with Sampler(routers, s.temperature) as sampler, torch.no_grad():
        sampler.gen = torch.Generator().manual_seed(0)
        lm, mtp = lm_and_mtp_losses(model, tokens.repeat(s.group, 1), reduction="none")
        parts = rewards(model, sampler, lm, mtp, s)
    costs = parts["layer"]
    assert len(costs) == len(routers) and all(c.shape == parts["reward"].shape for c in costs)
    torch.testing.assert_close(sum(costs) / len(costs), -parts["reward"] - parts["loss"])
    for j, rec in enumerate(sampler.records):  # one router's union, from its own choices only
        r = routers[j]
        u = window_union(rec["ids"].view(s.group * s.batch, -1, r.top_k), r.n_experts, s.window)
        own = u.view(s.group, s.batch, 2, 4).mean(-1)  # 2 chunks of 4 windows
        imb = load_imbalance(rec["ids"].view(s.group, -1, r.top_k), r.n_experts)[:, None, None]
        ent = rec["entropy"].view(s.group, s.batch, 2, 16).mean(-1)
        torch.testing.assert_close(costs[j], 0.5 * (imb - 1) + 0.7 * own + 0.2 * ent)
    per_layer = advantages(parts, s)
    for adv, cost in zip(per_layer, costs):
        torch.testing.assert_close(adv, group_advantages(-parts["loss"] - cost))
    assert not torch.equal(per_layer[0], per_layer[1])
    shared = advantages(parts, TuneSettings(credit="shared"))
    torch.testing.assert_close(shared, group_advantages(parts["reward"]))
    with pytest.raises(ValueError, match="credit"):
        tune(src, tmp_path / "x", TuneSettings(steps=1, credit="both"))


def test_healing_trains_every_weight_but_the_routers_and_resumes(tmp_path, capsys):
    """--heal-steps: after the GRPO steps every full-precision weight but the routers' learns the LM + MTP
    loss (the routers keep their tuned weights), the run resumes mid-healing, the checkpoint keeps its
    tensor names and dtypes and loads in the engine and in transformers; a quantized model is refused."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from engine.__main__ import main
    from engine.model.checkpoint import checkpoint_files, load_model

    src = write_tiny_model(tmp_path / "src", seed=3, num_nextn_predict_layers=1)
    text = tmp_path / "text.txt"
    text.write_text(inspect.getsource(textwrap))
    out = tmp_path / "healed"
    def args(model=src, to=out):
        return ["tune-routing", "--model", str(model), "--data", str(text), "--out", str(to), "--group-size", "4",
                "--batch", "2", "--seq-len", "32", "--chunk", "16", "--checkpoint-every", "2", "--calibrate-windows",
                "2", "--calibrate-len", "32", "--steps", "2", "--heal-batch", "2", "--heal-seq-len", "32",
                "--heal-lr", "1e-3", "--heal-union", "0.5", "--heal-balance", "0.5"]

    assert main(args() + ["--heal-steps", "2"]) == 0
    assert main(args() + ["--heal-steps", "4"]) == 0  # resumes the healing at step 2
    lines = [json.loads(x) for x in (out / "tune_log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "step" in x] == [1, 2]
    assert [x["heal_step"] for x in lines if "heal_step" in x] == [1, 2, 3, 4]
    assert all(np.isfinite(x["lm"]) for x in lines)
    assert all(1 <= x["soft_union"] <= 4 and x["balance"] >= 1 - 1e-6 for x in lines if "heal_step" in x)
    assert json.loads((out / "tuning.json").read_text())["heal_steps_done"] == 4
    a, b = (load_file(str(checkpoint_files(d)[0])) for d in (src, out))
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype for k in a)
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert any(k.endswith("mlp.gate.weight") for k in changed)
    assert any(k.endswith("self_attn.o_proj.weight") for k in changed)
    assert any(".mlp.experts." in k for k in changed)
    tuned_only = tmp_path / "tuned"  # the same GRPO steps without healing: the same router weights
    assert main(args(to=tuned_only) + ["--heal-steps", "0"]) == 0
    c = load_file(str(checkpoint_files(tuned_only)[0]))
    gates = [k for k in a if k.endswith("mlp.gate.weight")]
    assert gates and all(torch.equal(b[k], c[k]) for k in gates)
    model = load_model(out, device="cpu", dtype="float32")
    hf = AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    tokens = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model.logits(model(tokens)), hf(tokens).logits.float(), atol=2e-4, rtol=2e-4)
    assert main(["quantize", "--model", str(src), "--to", "int8", "--out", str(tmp_path / "q")]) == 0
    capsys.readouterr()
    assert main(args(model=tmp_path / "q", to=tmp_path / "qh") + ["--heal-steps", "1"]) == 2
    assert "before quantizing" in capsys.readouterr().err


def test_distillation_trains_only_the_mtp_modules_and_resumes(tmp_path):
    """--distill-steps: after healing, the MTP modules (not their routers) learn the main model's greedy
    choices again; the main model's tensors are those of the same run without it, the run resumes
    mid-distillation, and the agreement with the main model rises on the model's own text."""
    from safetensors.torch import load_file

    from engine.__main__ import main
    from engine.model.checkpoint import checkpoint_files, load_model
    from engine.train.default_model import distill_loss

    src = write_tiny_model(tmp_path / "src", seed=4, num_nextn_predict_layers=1)
    text = tmp_path / "text.txt"
    text.write_text(inspect.getsource(textwrap))
    def args(to):
        return ["tune-routing", "--model", str(src), "--data", str(text), "--out", str(to), "--group-size", "4",
                "--batch", "2", "--seq-len", "32", "--chunk", "16", "--checkpoint-every", "3", "--calibrate-windows",
                "2", "--calibrate-len", "32", "--steps", "1", "--heal-steps", "1", "--heal-batch", "4",
                "--heal-seq-len", "48", "--distill-sequences", "4", "--distill-lr", "1e-2"]

    out, healed = tmp_path / "distilled", tmp_path / "healed"
    assert main(args(out) + ["--distill-steps", "3"]) == 0
    assert main(args(out) + ["--distill-steps", "12"]) == 0  # resumes at distillation step 3
    assert main(args(healed)) == 0
    lines = [json.loads(x) for x in (out / "tune_log.jsonl").read_text().splitlines()]
    assert [x["distill_step"] for x in lines if "distill_step" in x] == list(range(1, 13))
    assert json.loads((out / "tuning.json").read_text())["distill_steps_done"] == 12
    a, b = (load_file(str(checkpoint_files(d)[0])) for d in (healed, out))
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype for k in a)
    L = json.loads((src / "config.json").read_text())["num_hidden_layers"]
    mtp = tuple(f"model.layers.{L + i}." for i in range(1))
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert changed and all(k.startswith(mtp) for k in changed), sorted(changed)[:5]
    assert not any(k.endswith("mlp.gate.weight") for k in changed)
    own = torch.from_numpy(np.load(out / "tune_state" / "distill_ids.npy").astype(np.int64))
    assert own.shape == (4, 48)
    agree = []
    for d in (healed, out):
        model = load_model(d, device="cpu", dtype="float32")
        with torch.no_grad():
            agree.append(distill_loss(model, own)[1]["agree1"])
    assert agree[1] > agree[0], agree
    alone = tmp_path / "alone"  # the distillation alone, on a healed checkpoint: no GRPO state to resume
    assert main(["tune-routing", "--model", str(healed), "--data", str(text), "--out", str(alone), "--steps", "0",
                 "--distill-steps", "2", "--distill-sequences", "4", "--heal-seq-len", "48", "--calibrate-windows",
                 "2", "--calibrate-len", "32"]) == 0
    c = load_file(str(checkpoint_files(alone)[0]))
    changed = {k for k in a if not torch.equal(a[k], c[k])}
    assert any(k.startswith(mtp) for k in changed)
    assert all(k.startswith(mtp) or k.endswith("e_score_correction_bias") for k in changed), sorted(changed)[:5]


def test_soft_union_and_balance_terms():
    """The healing's routing terms: the soft union is 1 when a window's tokens choose alike and the window
    size when they share nothing; the balance loss is 1 when every expert gets the same share."""
    from types import SimpleNamespace

    from engine.train.tune_routing import routing_terms, soft_union

    alike = torch.zeros(8, 4)
    alike[:, 1] = 1
    apart = torch.eye(4).repeat(2, 1)  # token t chooses expert t % 4
    assert float(soft_union(alike, 4)) == 1.0 and float(soft_union(apart, 4)) == 4.0
    router = SimpleNamespace(bias=torch.zeros(4))  # what the terms read of a router
    ids = torch.arange(8).remainder(4)[:, None]
    scores = torch.zeros(8, 4)  # even selection probabilities
    union, balance, worst = routing_terms([(router, scores, ids)], TuneSettings(window=4))
    assert abs(float(union) - 1.0) < 1e-6 and abs(float(balance) - 1.0) < 1e-6 and float(worst) == float(balance)
    lopsided = torch.zeros(8, dtype=torch.long)[:, None]  # every token on expert 0, with all its probability
    sure = torch.zeros(8, 4)
    sure[:, 0] = 10.0
    _, balance, worst = routing_terms([(router, scores, ids), (router, sure, lopsided)], TuneSettings(window=4))
    assert abs(float(worst) - 4.0) < 1e-6 and abs(float(balance) - 2.5) < 1e-6  # E · 1 · 1; the mean of 1 and 4
