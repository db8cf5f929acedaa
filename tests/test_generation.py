"""Tokenizer, chat template sandbox, sampling, streaming text and the command line."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.generate import TextStream, generate
from engine.pretrained import load_pretrained
from engine.sampling import SamplingParams, apply_repetition_penalty, probs_from_logits
from engine.tiny import write_tiny_model
from engine.tokenizer import ChatTemplateError, Tokenizer

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "m")


def test_chat_template_renders_with_bos_and_generation_prompt(tiny):
    tok = Tokenizer.from_dir(tiny)
    text = tok.render_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert text == "<|bos|><|system|>Be brief.<|eos|><|user|>Hi<|eos|><|assistant|>"
    ids = tok.encode_chat([{"role": "user", "content": "Hi"}])
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1  # the template's bos, not a second one


def test_continuing_the_final_message_drops_its_end_of_turn(tiny):
    """transformers' continue_final_message: the prompt ends with the kept reply text, no eos after it."""
    tok = Tokenizer.from_dir(tiny)
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Once upon"}]
    assert tok.render_chat(chat, continue_final_message=True) == "<|bos|><|user|>Hi<|eos|><|assistant|>Once upon"
    tok.chat_template = "{% for m in messages %}{{ m['content'] | upper }}{% endfor %}"
    tok._compiled = None
    with pytest.raises(ChatTemplateError, match="cannot be continued"):
        tok.render_chat(chat, continue_final_message=True)


def test_chat_template_errors_and_sandbox(tiny):
    tok = Tokenizer.from_dir(tiny)
    with pytest.raises(ChatTemplateError, match="unknown role"):
        tok.render_chat([{"role": "robot", "content": "x"}])
    tok.chat_template = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    tok._compiled = None
    with pytest.raises(ChatTemplateError):
        tok.render_chat([{"role": "user", "content": "x"}])


def test_think_tags_pass_through_and_special_tokens_are_dropped(tiny):
    tok = Tokenizer.from_dir(tiny)
    ids = tok.encode("<think>why</think>answer")
    assert tok.bos_id == ids[0]
    assert tok.decode(ids) == "<think>why</think>answer"


def test_stream_emits_whole_utf8_characters(tiny):
    tok = Tokenizer.from_dir(tiny)
    text = "naïve café ☕ 日本語 🙂 done"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.split())  # multi-byte characters span several byte-level tokens
    stream = TextStream(tok, [])
    chunks = [stream.push(i) for i in ids]
    assert "".join(chunks) + stream.flush() == text
    assert all("\ufffd" not in c for c in chunks)


def test_stop_strings_cut_and_are_held_back(tiny):
    tok = Tokenizer.from_dir(tiny)
    ids = tok.encode("alpha beta STOP gamma", add_special_tokens=False)
    stream = TextStream(tok, ["STOP"])
    shown = ""
    for i in ids:
        shown += stream.push(i)
        assert "STO" not in shown  # a possible start of the stop string is never shown early
        if stream.stopped:
            break
    shown += stream.flush()
    assert stream.stopped and shown == "alpha beta " == stream.text


def test_top_k_top_p_min_p():
    logits = torch.log(torch.tensor([0.5, 0.25, 0.15, 0.1]))
    p = probs_from_logits(logits, SamplingParams(temperature=1.0, top_k=2))
    assert torch.allclose(p, torch.tensor([2 / 3, 1 / 3, 0, 0]))
    p = probs_from_logits(logits, SamplingParams(temperature=1.0, top_p=0.7))
    assert torch.allclose(p, torch.tensor([2 / 3, 1 / 3, 0, 0]))  # 0.5 < 0.7, 0.75 ≥ 0.7: two kept
    p = probs_from_logits(logits, SamplingParams(temperature=1.0, min_p=0.25))
    assert torch.allclose(p, torch.tensor([0.5, 0.25, 0.15, 0]) / 0.9)
    p = probs_from_logits(logits, SamplingParams(temperature=0.5))
    assert torch.allclose(p, torch.tensor([0.25, 0.0625, 0.0225, 0.01]) / 0.345)
    assert probs_from_logits(logits, SamplingParams(temperature=0)).argmax() == 0


def test_repetition_penalty():
    logits = torch.tensor([2.0, -1.0, 0.5])
    out = apply_repetition_penalty(logits, torch.tensor([0, 1]), 2.0)
    assert torch.allclose(out, torch.tensor([1.0, -2.0, 0.5]))


def test_sampling_is_reproducible_with_a_seed_and_varies_without(tiny):
    pre = load_pretrained(tiny)
    ids = pre.encode_prompt(prompt="import os")
    params = dict(temperature=1.0, top_p=0.95, max_tokens=20)
    a = generate(pre.model, ids, SamplingParams(seed=5, **params)).token_ids
    b = generate(pre.model, ids, SamplingParams(seed=5, **params)).token_ids
    c = generate(pre.model, ids, SamplingParams(seed=6, **params)).token_ids
    assert a == b and a != c


def test_eos_and_cancel(tiny):
    pre = load_pretrained(tiny)
    ids = pre.encode_prompt(prompt="x = 1")
    first = generate(pre.model, ids, SamplingParams(max_tokens=5)).token_ids
    r = generate(pre.model, ids, SamplingParams(max_tokens=5), eos_ids=(first[2],))
    assert r.finish_reason == "stop" and r.token_ids == first[:3]
    calls = []
    r = generate(pre.model, ids, SamplingParams(max_tokens=50), should_stop=lambda: len(calls) >= 4,
                 on_token=lambda t, from_draft: calls.append(t))
    assert r.finish_reason == "cancelled" and len(r.token_ids) == 4


def test_context_limit(tiny):
    pre = load_pretrained(tiny)
    r = generate(pre.model, [5] * 500, SamplingParams(max_tokens=100))
    assert len(r.token_ids) == 12 and r.finish_reason == "length"  # 512-token context
    with pytest.raises(ValueError, match="context"):
        generate(pre.model, [5] * 600, SamplingParams(max_tokens=10))


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "engine", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def test_cli_generate_json_matches_transformers_greedy(tiny):
    from transformers import AutoModelForCausalLM

    out = run_cli("generate", "--model", tiny, "--prompt-ids", "0,17,42,99,7", "--max-tokens", "16", "--json")
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    ref_model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    with torch.no_grad():
        prompt = torch.tensor([[0, 17, 42, 99, 7]])  # explicit mask: transformers would mask bos=0 as padding
        ref = ref_model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16,
                                 do_sample=False, eos_token_id=None, pad_token_id=511)[0, 5:].tolist()
    assert res["token_ids"] == ref
    assert {"prefill_tokens_per_s", "decode_tokens_per_s", "time_to_first_token_s"} <= set(res["stats"])


def test_cli_chat_and_eval(tiny, tmp_path):
    out = run_cli("generate", "--model", tiny, "--chat", "Hello", "--max-tokens", "8", "--json")
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert len(res["token_ids"]) <= 8 and isinstance(res["text"], str)

    text_file = tmp_path / "t.txt"
    text_file.write_text("def add(a, b):\n    return a + b\n")
    out = run_cli("eval", "--model", tiny, "--text-file", text_file, "--json")
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    # independent check: transformers' loss on the same ids
    from transformers import AutoModelForCausalLM
    pre = load_pretrained(tiny)
    ids = torch.tensor([pre.tokenizer.encode(text_file.read_text())])
    ref_model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    with torch.no_grad():
        loss = ref_model(ids, labels=ids).loss.item()
    assert res["perplexity"] == pytest.approx(math.exp(loss), rel=1e-4)


def test_cli_bad_model_is_one_clear_line(tmp_path):
    out = run_cli("generate", "--model", tmp_path / "missing", "--prompt", "hi")
    assert out.returncode == 2
    assert out.stderr.startswith("error:") and "Traceback" not in out.stderr and "not found" in out.stderr
