"""The llama.cpp backend on small GGUF exports of random tiny models: plain greedy output against
llama-cpp-python's own greedy generation, the speculative modes against plain output with their
acceptance figures, stop strings, cancel, bad files, and the worker protocol with backend "llamacpp"."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from conftest import write_agreeing_mtp_model
from gguf_fixtures import exported_tiny, open_llama

from engine.backends.base import BackendError
from engine.backends.llamacpp import LlamaCppBackend, vocab_mismatch
from engine.client import WorkerClient
from engine.export.gguf import export_gguf
from engine.protocol import ChatMessage, Done, Error, Generate, GenerateParams, Load, Speculative, Token

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "def main(): return json.dumps(x)"
ONE_THREAD = {"MOEDESK_LLAMA_THREADS": "1"}  # llama.cpp's OpenMP barriers crawl on a busy 2-core machine


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOEDESK_LLAMA_THREADS", "1")
        yield


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny model as F32 GGUF, the same weights as Q8_0 (a draft that mostly agrees: different
    rounding rejects some drafts), a model with another vocabulary, and one exported without MTP."""
    tmp = tmp_path_factory.mktemp("gguf")
    model_dir, f32 = exported_tiny(tmp, "f32")
    q8 = export_gguf(model_dir, tmp / "tiny-q8_0.gguf", "q8_0")
    _, other = exported_tiny(tmp, "f32", seed=1, vocab_size=384)
    no_mtp = export_gguf(model_dir, tmp / "tiny-no-mtp.gguf", "f32", mtp=False)
    agreeing = write_agreeing_mtp_model(tmp / "agree", depth=1, with_tokenizer=True)
    two_mtp = write_agreeing_mtp_model(tmp / "two", depth=2, with_tokenizer=True)
    return {"f32": f32, "q8": q8, "other": other, "no_mtp": no_mtp, "dir": tmp,
            "agree": export_gguf(agreeing, tmp / "agree.gguf", "f32"),
            "two_mtp": export_gguf(two_mtp, tmp / "two.gguf", "f32", mtp=2)}


@pytest.fixture(scope="module")
def backend(files):
    b = LlamaCppBackend()
    b.load(Load(path=str(files["f32"]), backend="llamacpp", draft=str(files["q8"])), lambda stage, f: None)
    yield b
    b.unload()


def chat(text: str = PROMPT, id: str = "r", mode: str = "off", k: int | str = 3, **params) -> Generate:
    params.setdefault("max_tokens", 48)
    return Generate(id=id, messages=[ChatMessage(role="user", content=text)],
                    params=GenerateParams(speculative=Speculative(mode=mode, k=k), **params))


def run(b: LlamaCppBackend, request: Generate, cancelled=lambda: False) -> tuple[Done, list[Token]]:
    tokens: list[Token] = []
    done = b.generate(request, tokens.append, cancelled)
    assert "".join(t.text for t in tokens) == done.text  # the stream is the reply
    return done, tokens


def assert_consistent_acceptance(stats: dict, mode: str) -> None:
    proposed, accepted = stats["draft_tokens_proposed"], stats["draft_tokens_accepted"]
    assert stats["speculative"] == mode and 0 <= accepted <= proposed
    assert sum(stats["accepted_per_position"]) == accepted
    for a, r in zip(stats["accepted_per_position"], stats["reached_per_position"]):
        assert 0 <= a <= r <= stats["verify_steps"]
    steps = stats["verify_steps"]
    assert stats["mean_accepted_length"] == pytest.approx((accepted + steps) / steps)
    assert stats["generated_tokens"] <= accepted + steps + stats["plain_steps"] + 1


def test_load_reports_the_gguf(backend, files):
    info = backend.info()
    assert info["backend"] == "llamacpp" and info["architecture"] == "deepseek2" and info["quantization"] == "F32"
    assert info["vocab_size"] == 512 and info["context_length"] == 512 and info["experts"] == 8
    assert info["experts_per_token"] == 2 and info["mtp_modules"] == 1 and info["has_chat_template"]
    assert info["draft"] == files["q8"].name and info["gpu_offload"] in (True, False)
    assert info["speculative_modes"] == ["off", "lookup", "draft", "mtp"]


def test_greedy_equals_llama_cpp_greedy(backend, files):
    request = chat(max_tokens=40)
    done, _ = run(backend, request)
    ids = backend.prompt_ids(request)
    assert ids[0] == 0 and len(ids) > 10  # the GGUF's chat template wrote <|bos|> and the roles
    llm = open_llama(files["f32"], n_ctx=512, exact=False, n_threads=1, n_threads_batch=1)  # its own greedy
    reference = []
    for t in llm.generate(ids, temp=0.0, repeat_penalty=1.0):
        if t in backend.eog:
            break
        reference.append(t)
        if len(reference) == 40:
            break
    assert len(reference) > 10
    assert done.text == llm.detokenize(reference).decode("utf-8", "replace")
    assert done.stats["generated_tokens"] == len(reference) + (done.finish_reason == "stop")
    assert done.stats["time_to_first_token_s"] > 0 and done.stats["decode_tokens_per_s"] > 0
    assert done.stats["prefill_tokens_per_s"] > 0 and done.stats["prompt_tokens"] == len(ids)


def test_speculative_greedy_output_equals_plain(backend):
    plain, _ = run(backend, chat())
    for mode in ("lookup", "draft", "mtp"):
        done, tokens = run(backend, chat(mode=mode))
        assert done.text == plain.text, mode
        assert_consistent_acceptance(done.stats, mode)
    draft, tokens = run(backend, chat(mode="draft"))
    # the Q8_0 copy agrees often but not always: both the accept and the reject paths ran
    assert 0 < draft.stats["draft_tokens_accepted"] < draft.stats["draft_tokens_proposed"]
    assert draft.stats["draft_model"] == "tiny-q8_0.gguf" and any(t.accepted for t in tokens)
    assert len(draft.stats["acceptance_per_position"]) == 3


def test_mtp_drafts_from_the_models_own_mtp_layer(files):
    """A model whose MTP layer mostly predicts what the main model will (tests/conftest.py): llama.cpp's
    MTP graph, fed as MTPDrafter feeds it, must then get most drafts accepted."""
    b = LlamaCppBackend()
    b.load(Load(path=str(files["agree"]), backend="llamacpp"), lambda stage, f: None)
    try:
        plain, _ = run(b, chat(max_tokens=40))
        done, _ = run(b, chat(max_tokens=40, mode="mtp"))
        assert done.text == plain.text
        assert_consistent_acceptance(done.stats, "mtp")
        assert done.stats["acceptance_rate"] > 0.8
        again, _ = run(b, chat(max_tokens=40, mode="mtp"))  # the MTP cache is reused with the prompt
        assert again.text == plain.text and again.stats["acceptance_rate"] == done.stats["acceptance_rate"]
        sampled, _ = run(b, chat(max_tokens=40, mode="mtp", temperature=0.7, seed=3))
        assert_consistent_acceptance(sampled.stats, "mtp")
    finally:
        b.unload()


def test_sampling_is_seeded_in_every_mode(backend):
    for mode in ("off", "lookup", "draft"):
        a, _ = run(backend, chat(mode=mode, temperature=0.8, top_k=50, top_p=0.95, min_p=0.01, seed=7))
        b, _ = run(backend, chat(mode=mode, temperature=0.8, top_k=50, top_p=0.95, min_p=0.01, seed=7))
        assert a.text == b.text and a.stats["generated_tokens"] > 0, mode
        if mode != "off":
            assert_consistent_acceptance(a.stats, mode)
    penalized, _ = run(backend, chat(repetition_penalty=1.3))
    plain, _ = run(backend, chat())
    assert penalized.text != plain.text  # the penalty reaches the logits


def test_prompt_prefix_is_reused_and_changes_nothing(backend):
    first, _ = run(backend, chat("a fresh prompt for the cache"))
    second, _ = run(backend, chat("a fresh prompt for the cache"))
    assert second.stats["cached_prompt_tokens"] == second.stats["prompt_tokens"] - 1
    assert second.text == first.text


def test_stop_strings_end_the_reply(backend):
    plain, _ = run(backend, chat())
    stop = plain.text[10:13]
    assert len(stop) == 3
    done, _ = run(backend, chat(stop=[stop]))
    assert done.finish_reason == "stop" and done.text == plain.text[:plain.text.find(stop)]
    done, _ = run(backend, chat(mode="draft", stop=[stop]))
    assert done.finish_reason == "stop" and done.text == plain.text[:plain.text.find(stop)]


def test_cancel_stops_between_steps(backend):
    for mode in ("off", "draft"):
        tokens: list[Token] = []
        done = backend.generate(chat(max_tokens=200, mode=mode), tokens.append, lambda t=tokens: len(t) >= 5)
        assert done.finish_reason == "cancelled" and 5 <= len(tokens) < 20, mode
    done, _ = run(backend, chat(max_tokens=200), cancelled=lambda: True)  # stops before the first decode step
    assert done.finish_reason == "cancelled" and done.stats["generated_tokens"] == 1
    after, _ = run(backend, chat())  # and the next request is whole
    assert after.finish_reason in ("length", "stop") and after.stats["generated_tokens"] > 1


def bad_files(tmp: Path) -> dict[str, Path]:
    (tmp / "notes.gguf").write_text("not a model at all")
    whole = (tmp / "tiny-0-f32.gguf").read_bytes()
    (tmp / "truncated.gguf").write_bytes(whole[:len(whole) // 2])
    w = gguf.GGUFWriter(str(tmp / "alien.gguf"), "alienformer")
    w.add_tensor("x", np.zeros(4, np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return {"not_found": tmp / "nowhere.gguf", "bad_format": tmp / "notes.gguf",
            "load_failed": tmp / "truncated.gguf", "unsupported": tmp / "alien.gguf"}


def test_bad_files_are_clear_errors(files):
    b = LlamaCppBackend()
    for code, path in bad_files(files["dir"]).items():
        with pytest.raises(BackendError) as e:
            b.load(Load(path=str(path), backend="llamacpp"), lambda stage, f: None)
        assert e.value.code == code and path.name in e.value.message, (code, e.value.message)
        b.unload()
    with pytest.raises(BackendError) as e:
        b.load(Load(path=str(files["f32"]), backend="llamacpp", draft=str(files["other"])), lambda s, f: None)
    assert e.value.code == "incompatible_draft" and "384" in e.value.message
    b.unload()
    # No MTP layers, and two (llama.cpp's deepseek2 MTP graph asserts one: making its context would abort)
    for name, why in (("no_mtp", "no MTP"), ("two_mtp", "exactly one nextn layer")):
        b.load(Load(path=str(files[name]), backend="llamacpp"), lambda stage, f: None)
        assert b.info()["speculative_modes"] == ["off", "lookup"]
        for mode in ("mtp", "draft"):
            with pytest.raises(BackendError) as e:
                b.generate(chat(mode=mode), lambda t: None, lambda: False)
            assert e.value.code == "unsupported" and (why in e.value.message or mode == "draft")
        assert run(b, chat())[0].stats["generated_tokens"] > 0
        b.unload()


def test_a_draft_vocabulary_must_match_token_by_token():
    class Vocab:
        def __init__(self, texts):
            self.texts, self.n_vocab = texts, len(texts)

        def token_text(self, t):
            return self.texts[t]

    assert vocab_mismatch(Vocab([b"a", b"b"]), Vocab([b"a", b"b"])) is None
    assert "token 1" in vocab_mismatch(Vocab([b"a", b"b"]), Vocab([b"a", b"c"]))
    assert "3 tokens" in vocab_mismatch(Vocab([b"a", b"b"]), Vocab([b"a", b"b", b"c"]))


def test_worker_serves_gguf_and_survives_bad_files(files):
    c = WorkerClient(env=dict(os.environ, **ONE_THREAD))
    try:
        c.start()
        for code, path in [*bad_files(files["dir"]).items(), ("incompatible_draft", files["f32"])]:
            draft = str(files["other"]) if code == "incompatible_draft" else None
            c.send(Load(path=str(path), backend="llamacpp", draft=draft))
            ev = c.wait_for("loaded", 60)
            assert isinstance(ev, Error) and ev.code == code, (code, ev)
        c.send(Load(path=str(files["f32"]), backend="llamacpp", draft=str(files["q8"])))
        assert c.wait_for("loaded", 60).model["backend"] == "llamacpp"
        events: list = []
        c.send(chat(id="w", mode="draft"))
        done = c.wait_for("done", 60, collect=events)
        assert isinstance(done, Done) and done.finish_reason in ("length", "stop")
        assert "".join(e.text for e in events if isinstance(e, Token)) == done.text
        assert_consistent_acceptance(done.stats, "draft")
        c.send(chat(id="m", mode="mtp", max_tokens=5))
        assert c.wait_for("done", 60).stats["speculative"] == "mtp"
    finally:
        c.close()


def test_the_worker_imports_llama_cpp_only_for_a_gguf():
    code = "import sys, engine.worker; sys.exit('llama_cpp' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=120).returncode == 0
