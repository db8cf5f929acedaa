"""The worker process through real pipes, its faults, and the protocol parser under fuzzing."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.backends.base import Backend
from engine.client import WorkerClient
from engine.protocol import (REQUESTS, Cancel, ChatMessage, Done, Error, Generate, GenerateParams, Load, Message,
                             Ping, ProtocolError, Speculative, Token, parse_event, parse_request)
from engine.tiny import write_tiny_model
from engine.worker import Worker

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("w") / "m")


@pytest.fixture(scope="module")
def endless(tmp_path_factory):
    """A slower model with a long context that never ends a reply by itself (its eos logit is 0)."""
    from safetensors.torch import load_file, save_file
    path = long_prompt_model(tmp_path_factory.mktemp("e"))
    state = load_file(path / "model.safetensors")
    state["lm_head.weight"][1] = 0.0
    save_file(state, str(path / "model.safetensors"))
    return path


@pytest.fixture
def client():
    c = WorkerClient()
    c.start()
    yield c
    c.close()


def load(c: WorkerClient, path) -> dict:
    c.send(Load(path=str(path)))
    ev = c.wait_for("loaded", 120)
    assert ev.type == "loaded", ev
    return ev.model


def chat(id: str, text: str, **params) -> Generate:
    return Generate(id=id, messages=[ChatMessage(role="user", content=text)], params=GenerateParams(**params))


def test_reply_streams_and_equals_the_command_line(client, tiny):
    info = load(client, tiny)
    assert info["backend"] == "native" and info["mtp_modules"] == 1 and info["context_length"] == 512
    assert info["parameters"] > info["active_parameters"] > 0 and info["memory_bytes"] > 0
    client.send(chat("r1", "Hello there", max_tokens=24))
    events = []
    done = client.wait_for("done", 60, collect=events)
    tokens = [e for e in events if isinstance(e, Token)]
    assert done.finish_reason == "length" and len(tokens) > 3
    assert "".join(t.text for t in tokens) == done.text
    assert {"time_to_first_token_s", "decode_tokens_per_s", "prefill_tokens_per_s", "expert_load"} <= set(done.stats)
    assert len(done.stats["expert_load"]) == 1 and sum(done.stats["expert_load"][0]) > 0

    cli = subprocess.run([sys.executable, "-m", "engine", "generate", "--model", str(tiny), "--chat", "Hello there",
                          "--max-tokens", "24", "--json"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert json.loads(cli.stdout)["text"] == done.text

    # the same request with MTP speculation: same text, drafts accounted for
    client.send(Generate(id="r2", messages=[ChatMessage(role="user", content="Hello there")],
                         params=GenerateParams(max_tokens=24, speculative=Speculative(mode="mtp", k=2))))
    spec = client.wait_for("done", 60)
    assert spec.text == done.text and spec.stats["draft_tokens_proposed"] > 0


def test_quantized_load_through_the_worker_equals_the_command_line(client, tiny):
    client.send(Load(path=str(tiny), quant="int4"))
    info = client.wait_for("loaded", 120).model
    assert info["quantization"] == "int4 (group 64)" and info["dtype"] == "float32"
    client.send(chat("q1", "Hello there", max_tokens=16))
    done = client.wait_for("done", 60)
    cli = subprocess.run([sys.executable, "-m", "engine", "generate", "--model", str(tiny), "--chat", "Hello there",
                          "--max-tokens", "16", "--json", "--quant", "int4"], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert done.finish_reason == "length" and json.loads(cli.stdout)["text"] == done.text


def test_cancel_ping_and_busy_while_generating(client, endless):
    load(client, endless)
    client.send(chat("long", "Tell me everything", max_tokens=3000))
    first = client.wait_for("token", 60)
    assert first.id == "long"
    client.send(chat("second", "Me too"))
    client.send(Ping())
    events = []
    while len([e for e in events if e.type in ("pong", "error") or (e.type == "done" and e.id == "second")]) < 3:
        events.append(client.next_event(10))
    busy = next(e for e in events if isinstance(e, Error))
    assert busy.code == "busy" and busy.id == "second"
    refused = next(e for e in events if isinstance(e, Done))
    assert refused.id == "second" and refused.finish_reason == "error"
    assert any(e.type == "pong" for e in events)
    client.send(Cancel(id="long"))
    after = []
    done = client.wait_for("done", 10, collect=after)
    assert done.id == "long" and done.finish_reason == "cancelled"
    streamed = first.text + "".join(e.text for e in events + after if isinstance(e, Token))
    assert done.text == streamed and done.stats["generated_tokens"] < 3000  # the partial reply is kept
    # Stopped within a few steps of the cancel: the tokens after it are those already in the pipe when it
    # was sent plus a step or two (a decode step of this model is under a millisecond on the CPU kernels).
    assert sum(isinstance(e, Token) for e in after) <= 16
    client.send(chat("third", "Again", max_tokens=5))
    assert client.wait_for("done", 60).finish_reason in ("length", "stop")


def test_bad_requests_get_error_events_and_the_worker_keeps_serving(client, tiny, tmp_path):
    bad = ["{oops", "[1, 2]", json.dumps({"type": "launch"}), json.dumps({"type": "load", "path": 5}),
           json.dumps({"type": "generate", "id": "x", "messages": "hi"}),
           json.dumps({"type": "generate", "id": "x", "messages": [{"role": "user", "content": "a"}],
                       "params": {"temperature": -1}})]
    for line in bad:
        client.send(line)
        ev = client.next_event(10)
        assert isinstance(ev, Error) and ev.code in ("bad_json", "unknown_type", "bad_request"), (line, ev)
        if '"generate"' in line:  # a refused generate is still closed by its done
            done = client.next_event(10)
            assert isinstance(done, Done) and done.id == "x" and done.finish_reason == "error"
    client.send(chat("early", "hi"))
    assert client.next_event(10).code == "not_loaded"
    assert client.next_event(10).finish_reason == "error"
    client.send(Load(path=str(tmp_path / "nowhere")))
    assert client.wait_for("loaded", 60).code == "not_found"
    broken = write_tiny_model(tmp_path / "broken", with_tokenizer=False)
    (broken / "model.safetensors").write_bytes(b"\x00" * 100)
    client.send(Load(path=str(broken)))
    ev = client.wait_for("loaded", 60)
    assert ev.code == "load_failed" and "model.safetensors" in ev.message
    client.send(Ping())
    assert client.next_event(10).type == "pong"
    load(client, tiny)  # and a good model still loads afterwards


class FakeBackend(Backend):
    """Fails the way a machine out of memory does."""
    name = "fake"
    fail_load = fail_generate = False

    def load(self, request, progress):
        if FakeBackend.fail_load:
            raise MemoryError("cannot allocate 40 GiB")
        return {"name": "fake"}

    def generate(self, request, emit, cancelled):
        emit(Token(id=request.id, text="partial "))
        if FakeBackend.fail_generate:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return Done(id=request.id, finish_reason="length", text="partial ", stats={})

    def unload(self):
        pass

    def info(self):
        return {"name": "fake"}


def run_worker(lines: list[str]) -> list[Message]:
    out = io.StringIO()
    w = Worker(out, backends={"native": FakeBackend})
    for line in lines:
        w.handle_line(line)
        if w.job:
            w.job.join(10)
    return [parse_event(x) for x in out.getvalue().splitlines()]


def test_out_of_memory_is_an_error_event_and_the_worker_stays_usable():
    load_line = json.dumps({"type": "load", "path": "x"})
    gen_line = chat("g", "hi").to_json()
    FakeBackend.fail_load = True
    events = run_worker([load_line, json.dumps({"type": "ping"})])
    assert events[0].code == "out_of_memory" and events[1].type == "pong"
    FakeBackend.fail_load, FakeBackend.fail_generate = False, True
    events = run_worker([load_line, gen_line])
    err = next(e for e in events if isinstance(e, Error))
    done = next(e for e in events if isinstance(e, Done))
    assert err.code == "out_of_memory" and err.id == "g"
    assert done.finish_reason == "error" and done.text == "partial "  # what streamed is not lost
    FakeBackend.fail_generate = False
    events = run_worker([load_line, gen_line, gen_line])
    assert [e.finish_reason for e in events if isinstance(e, Done)] == ["length", "length"]


def long_prompt_model(tmp_path):
    return write_tiny_model(tmp_path / "big", hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
                            num_hidden_layers=4, max_position_embeddings=4096)


def assert_dies_quickly(c: WorkerClient):
    os.kill(c.proc.pid, signal.SIGKILL)
    ev = c.wait_for("never", 5)  # the exit is an event, not a poll: a hang would time out here instead
    assert isinstance(ev, Error) and ev.code == "worker_died" and "-9" in ev.message


def test_sigkill_during_load_prefill_and_decode_is_noticed_and_a_new_worker_works(tiny, endless):
    big = endless
    c = WorkerClient()
    try:
        c.start()
        c.send(Load(path=str(big)))
        c.wait_for("progress", 60)  # loading has begun
        assert_dies_quickly(c)

        c.restart()
        load(c, big)
        c.send(chat("p", "word " * 3000, max_tokens=5))  # a long prompt: prefill takes a while
        time.sleep(0.15)
        assert c.events.empty()  # no token yet: still in prefill
        assert_dies_quickly(c)

        c.restart()
        load(c, big)
        c.send(chat("d", "Hello", max_tokens=3000))
        c.wait_for("token", 60)
        assert_dies_quickly(c)

        c.restart()
        load(c, tiny)
        c.send(chat("ok", "Hello", max_tokens=5))
        assert c.wait_for("done", 60).finish_reason in ("length", "stop")
    finally:
        c.close()


def test_worker_exits_cleanly_on_stdin_eof(tiny):
    proc = subprocess.run([sys.executable, "-m", "engine.worker"], input=b'{"type": "ping"}\n', capture_output=True,
                          cwd=ROOT, timeout=60)
    assert proc.returncode == 0 and json.loads(proc.stdout)["type"] == "pong"


# ---- fuzzing the parser ----

VALID_LINES = [chat("a", "hi", temperature=0.7).to_json(), Load(path="/m", quant="int8").to_json(),
               Cancel(id="a").to_json(), json.dumps({"type": "hello", "protocol": 1}), json.dumps({"type": "ping"})]


def mutate(line: str, data) -> str:
    d = json.loads(line)
    key = data.draw(st.sampled_from(sorted(d)))
    d[key] = data.draw(st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                                    max_leaves=6))
    return json.dumps(d)


def check_line(line: str) -> None:
    try:
        req = parse_request(line)
    except ProtocolError as e:
        assert e.code in ("bad_json", "unknown_type", "bad_request", "invalid_request") and e.message
        return
    assert req.type in REQUESTS
    assert parse_request(req.to_json()) == req  # a valid request round-trips


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=200))
def test_fuzz_random_text(line):
    check_line(line)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(VALID_LINES), st.data())
def test_fuzz_mutated_requests(line, data):
    check_line(mutate(line, data))


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(VALID_LINES), st.data())
def test_fuzz_through_the_worker(line, data):
    """Whatever arrives, the worker answers with events it can parse back, and never raises."""
    out = io.StringIO()
    w = Worker(out, backends={"native": FakeBackend})
    w.handle_line(mutate(line, data))
    if w.job:
        w.job.join(10)
    for x in out.getvalue().splitlines():
        parse_event(x)


def test_a_failed_load_keeps_the_loaded_model_serving(client, tiny, tmp_path):
    """Garbage config.json, random bytes as a .gguf: each an error event, and the model loaded before
    still answers, with the same output as before the failed loads."""
    load(client, tiny)
    client.send(chat("before", "Hello", max_tokens=6))
    before = client.wait_for("done", 60)
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "config.json").write_text("{ this is not json")
    noise = tmp_path / "noise.gguf"
    noise.write_bytes(os.urandom(4096))
    for request in (Load(path=str(garbage)), Load(path=str(noise), backend="llamacpp")):
        client.send(request)
        ev = client.wait_for("loaded", 60)
        assert isinstance(ev, Error) and ev.code in ("load_failed", "bad_format"), ev
    client.send(chat("after", "Hello", max_tokens=6))
    after = client.wait_for("done", 60)
    assert after.finish_reason == before.finish_reason and after.text == before.text


def test_ignore_eos_runs_to_max_tokens(client, tmp_path):
    """A model that soon picks end-of-text (it wins wherever its logit is positive) stops early, unless
    ignore_eos is set."""
    from safetensors.torch import load_file, save_file
    path = write_tiny_model(tmp_path / "eos")
    state = load_file(path / "model.safetensors")
    state["lm_head.weight"].zero_()
    state["lm_head.weight"][1] = 1.0  # eos (id 1) against all-zero logits
    save_file(state, str(path / "model.safetensors"))
    load(client, path)
    client.send(chat("a", "hi", max_tokens=7))
    done = client.wait_for("done", 60)
    assert done.finish_reason == "stop" and done.stats["generated_tokens"] < 7
    client.send(chat("b", "hi", max_tokens=7, ignore_eos=True))
    done = client.wait_for("done", 60)
    assert done.finish_reason == "length" and done.stats["generated_tokens"] == 7


def test_continue_final_message_is_checked():
    line = json.dumps({"type": "generate", "id": "c", "continue_final_message": True,
                       "messages": [{"role": "user", "content": "hi"}]})
    with pytest.raises(ProtocolError, match="assistant message last"):
        parse_request(line)
    ok = json.loads(line)
    ok["messages"].append({"role": "assistant", "content": "Once"})
    assert parse_request(json.dumps(ok)).continue_final_message
