"""No input may leave the worker silent: lone surrogates in every text field, invalid UTF-8, NUL, huge and
deeply nested lines, wrong types and extreme numbers, each followed by a ping that must be answered;
against a worker with no model, with a scripted backend and with the llama.cpp backend loaded."""
from __future__ import annotations

import io
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.client import WorkerClient
from engine.protocol import Cancel, ChatMessage, Generate, GenerateParams, Load, parse_event, parse_request
from engine.worker import Worker
from test_worker import FakeBackend

SURROGATES = ["\\ud800", "\\udc80", "\\udfff", "\\ud83d"]
# Each a raw protocol line (JSON escapes kept as written) and the field its error must name.
SURROGATE_LINES = [(f'{{"type":"cancel","id":"{s}"}}', "cancel.id") for s in SURROGATES] + [
    ('{"type":"load","path":"/tmp/\\udcff"}', "load.path"),
    ('{"type":"generate","id":"g1","messages":[{"role":"user","content":"hi \\ud800"}]}', "message.content"),
    ('{"type":"generate","id":"g2","messages":[{"role":"user","content":"hi"}],'
     '"params":{"stop":["a\\udfff"]}}', "params.stop"),
    ('{"type":"generate","id":"\\ud83d","messages":[{"role":"user","content":"hi"}]}', "generate.id"),
    ('{"type":"load","path":"/m","draft":"\\udc80.gguf"}', "load.draft"),
]


def test_lone_surrogates_are_refused_naming_the_field_and_the_worker_answers_the_next_ping():
    """The probe that hung the worker: with the bundled model loaded, each line gets invalid_request
    (with the field's name) and the ping after it a pong, then a normal reply still streams."""
    c = WorkerClient()
    try:
        c.start()
        c.send(Load(path="assets/models/moedesk-mini"))
        c.wait_for("loaded", timeout=120)
        for line, field in SURROGATE_LINES:
            c.send(line)
            c.send('{"type":"ping"}')
            seen = []
            while not seen or seen[-1].type != "pong":  # wait_for stops at errors too: go on to the pong
                c.wait_for("pong", timeout=10, collect=seen)
            errors = [e for e in seen if e.type == "error"]
            assert errors and errors[0].code == "invalid_request" and field in errors[0].message, (line, seen)
            assert all(e.id is None or e.id.isascii() for e in errors)
        c.send(Generate(id="ok", messages=[ChatMessage(role="user", content="def f():")],
                        params=GenerateParams(max_tokens=8)))
        done = c.wait_for("done", timeout=60)
        assert done.id == "ok" and done.finish_reason in ("stop", "length")
    finally:
        c.close()


def test_events_are_written_whatever_text_a_backend_returns():
    """A backend whose reply holds a lone surrogate still gets its events out (as U+FFFD), and the
    worker goes on: the writer cannot fail on content."""
    class Odd(FakeBackend):
        def generate(self, request, emit, cancelled):
            from engine.protocol import Done, Token
            emit(Token(id=request.id, text="a\ud800b"))
            return Done(id=request.id, finish_reason="stop", text="a\ud800b", stats={"note": "\udfff"})

    out = io.StringIO()
    w = Worker(out, backends={"native": Odd})
    for line in (Load(path="x").to_json(), Generate(id="g", messages=[ChatMessage(role="user", content="hi")]).to_json(),
                 '{"type":"ping"}'):
        w.handle_line(line)
        if w.job:
            w.job.join(10)
    events = [parse_event(x) for x in out.getvalue().splitlines()]
    assert [e.type for e in events] == ["loaded", "token", "done", "pong"]
    assert events[1].text == "a\ufffdb" and events[2].text == "a\ufffdb"


# ---- property-based fuzzing ----

LONE = st.integers(0xD800, 0xDFFF).map(chr)
TEXT = st.text(st.characters() | LONE | st.sampled_from(["\x00", "\ufffd", "\U0001f600"]), max_size=12)
NUMBERS = (st.integers(-2**70, 2**70) | st.floats(allow_nan=True, allow_infinity=True)
           | st.sampled_from([1e308, -1e308, -1, 0, 10**30]))
LEAF = st.none() | st.booleans() | NUMBERS | TEXT
VALUE = st.recursive(LEAF, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
                     max_leaves=8)
TEMPLATES = [Generate(id="a", messages=[ChatMessage(role="user", content="hi")], params=GenerateParams(max_tokens=4)),
             Load(path="/nonexistent/model"), Cancel(id="a")]


@st.composite
def mutated(draw):
    """A valid request with one field (top level or in params) replaced by any JSON value."""
    d = json.loads(draw(st.sampled_from(TEMPLATES)).to_json())
    target = d["params"] if "params" in d and draw(st.booleans()) else d
    target[draw(st.sampled_from(sorted(target)))] = draw(VALUE)
    return json.dumps(d, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")


def request_lines():
    """Mutated requests, raw bytes, or a pathological line."""
    pathological = st.sampled_from([
        b"[" * 100_000, b'{"type":"ping"' + b" " * (11 * 2**20) + b"}", b'{"type":"load","path":"\x00"}',
        b'{"type":"cancel","id":"\xff\xfe"}', b"\xc3\x28" * 10, b'{"type":"generate"}', b"null", b"[]", b"1e999",
        b'{"type":"generate","id":"x","messages":[{"role":"user","content":"hi"}],"params":{"max_tokens":1e308}}',
        b'{"type":"generate","id":"x","messages":[{"role":"user","content":"hi"}],"params":{"temperature":NaN}}'])
    return mutated() | pathological | st.binary(max_size=64)


class Tally:
    def __init__(self):
        self.tried = self.answered = self.hung = self.crashed = 0


def answers_a_ping(w: Worker, out: io.StringIO, line: bytes, tally: Tally) -> None:
    """Feed a line, then a ping: the pong must come (the worker may still be busy with the line's job;
    that job is cancelled and awaited before the next line)."""
    tally.tried += 1
    try:
        w.handle_line(line)
        mark = len(out.getvalue())
        w.handle_line(b'{"type":"ping"}')
    except Exception:  # noqa: BLE001 - counted, then failed below
        tally.crashed += 1
        raise
    events = [parse_event(x) for x in out.getvalue()[mark:].splitlines()]
    if any(e.type == "pong" for e in events):
        tally.answered += 1
    else:
        tally.hung += 1
    if w.job is not None and w.job.is_alive():
        w.cancel.set()
        w.job.join(30)
    assert not (w.job and w.job.is_alive()), "a job did not end after its cancel"
    assert tally.hung == 0 and tally.crashed == 0, line[:200]
    for x in out.getvalue().splitlines():
        parse_event(x)  # every event written parses back


SCRIPTED = Tally()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(request_lines())
def test_fuzz_a_worker_with_a_scripted_backend(line):
    out = io.StringIO()
    w = Worker(out, backends={"native": FakeBackend})
    w.handle_line(Load(path="x").to_json())
    w.job.join(10)
    answers_a_ping(w, out, line, SCRIPTED)


@pytest.fixture(scope="module")
def llama_worker(tmp_path_factory):
    pytest.importorskip("llama_cpp")
    from gguf_fixtures import exported_tiny

    _, gguf = exported_tiny(tmp_path_factory.mktemp("fuzz"), "f32")
    out = io.StringIO()
    w = Worker(out)
    w.handle_line(Load(path=str(gguf), backend="llamacpp").to_json())
    w.job.join(60)
    assert '"loaded"' in out.getvalue(), out.getvalue()[-500:]
    return w, out


LLAMA = Tally()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                                   HealthCheck.function_scoped_fixture])
@given(line=request_lines())
def test_fuzz_a_worker_with_the_llamacpp_backend_loaded(llama_worker, line):
    w, out = llama_worker
    answers_a_ping(w, out, line, LLAMA)
    if w.backend is None or w.backend.name != "llamacpp":  # a fuzzed load may not replace it: check
        pytest.fail("the loaded model was lost")


def test_a_valid_request_still_parses_after_the_surrogate_check():
    assert parse_request(Generate(id="é😀", messages=[ChatMessage(role="user", content="naïve \u00e9 😀")]).to_json())


# ---- load faults ----

def faulty_models(tmp) -> list[tuple[str, object, str | None]]:
    """(what, Load request or a Generate after loading it, the error code expected or None: any clear one)."""
    import shutil
    import struct

    from gguf_fixtures import exported_tiny

    src, gguf = exported_tiny(tmp, "f32")
    cases = []

    def copy(name, edit):
        d = tmp / name
        shutil.copytree(src, d)
        edit(d)
        return d

    def truncate(d):
        f = d / "model.safetensors"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])

    def huge_header(d):  # the 8-byte header length claims ~1 TB
        f = d / "model.safetensors"
        f.write_bytes(struct.pack("<Q", 10**12) + f.read_bytes()[8:])

    def absurd_config(d):
        cfg = json.loads((d / "config.json").read_text())
        cfg["hidden_size"] = 10**9
        (d / "config.json").write_text(json.dumps(cfg))

    def garbage_tokenizer(d):
        (d / "tokenizer.json").write_bytes(b"\x00\x01 not json {{{" * 100)

    def template(text):
        def edit(d):
            cfg = json.loads((d / "tokenizer_config.json").read_text())
            cfg["chat_template"] = text
            (d / "tokenizer_config.json").write_text(json.dumps(cfg))
        return edit

    for name, edit in (("truncated", truncate), ("huge-header", huge_header), ("absurd-config", absurd_config),
                       ("garbage-tokenizer", garbage_tokenizer)):
        cases.append((name, Load(path=str(copy(name, edit))), None))
    for name, text in (("looping-template", "{% for x in range(10**9) %}x{% endfor %}"),
                       ("escaping-template", "{{ ''.__class__.__mro__[1].__subclasses__() }}")):
        cases.append((name, Load(path=str(copy(name, template(text)))), "template"))
    whole = gguf.read_bytes()
    for cut in (16, 300, len(whole) // 2, len(whole) - 100):
        f = tmp / f"cut-{cut}.gguf"
        f.write_bytes(whole[:cut])
        cases.append((f"gguf cut at {cut}", Load(path=str(f), backend="llamacpp"), None))
    rng = __import__("random").Random(0)
    for i in range(4):  # bytes flipped inside the metadata (after the 24-byte header, before the tensors)
        data = bytearray(whole)
        for _ in range(8):
            data[rng.randrange(24, 4096)] ^= 0xFF
        f = tmp / f"flipped-{i}.gguf"
        f.write_bytes(bytes(data))
        cases.append((f"gguf flipped {i}", Load(path=str(f), backend="llamacpp"), None))
    return cases


def test_load_faults_are_clear_errors_and_the_loaded_model_keeps_serving(tmp_path):
    """Each faulty file is refused with a clear error (or, for chat templates, its first reply is), the
    worker answers a ping after it, and the model loaded before serves the same reply as before."""
    pytest.importorskip("llama_cpp")
    c = WorkerClient(env=dict(__import__("os").environ, MOEDESK_LLAMA_THREADS="1"))
    probe = Generate(id="p", messages=[ChatMessage(role="user", content="def f():")], params=GenerateParams(max_tokens=8))
    try:
        c.start()
        c.send(Load(path="assets/models/moedesk-mini"))
        assert c.wait_for("loaded", timeout=120).type == "loaded"
        c.send(probe)
        reference = c.wait_for("done", timeout=60).text
        for what, request, code in faulty_models(tmp_path):
            c.send(request)
            event = c.wait_for("loaded", timeout=120)
            if code == "template":  # loads (the template is only rendered for a reply), and the reply is refused
                assert event.type == "loaded", (what, event)
                c.send(probe)
                seen = []
                while not seen or seen[-1].type != "done":
                    c.wait_for("done", timeout=60, collect=seen)
                errors = [e for e in seen if e.type == "error"]
                assert errors and errors[0].code == "bad_request" and "chat template" in errors[0].message, (what, seen)
                assert seen[-1].finish_reason == "error"
                c.send(Load(path="assets/models/moedesk-mini"))
                assert c.wait_for("loaded", timeout=120).type == "loaded"
            else:
                assert event.type == "error" and event.code != "worker_died" and event.message, (what, event)
                assert "Traceback" not in event.message
            c.send('{"type":"ping"}')
            assert c.wait_for("pong", timeout=10).type == "pong", what
            c.send(probe)
            done = c.wait_for("done", timeout=60)
            assert done.type == "done" and done.text == reference, (what, done)
    finally:
        c.close()


def test_a_bug_reached_by_one_line_is_an_internal_error_and_the_worker_goes_on(monkeypatch):
    out = io.StringIO()
    w = Worker(out, backends={"native": FakeBackend})
    real = w.handle

    def broken(req):
        if req.type == "cancel":
            raise RuntimeError("a bug")
        return real(req)
    monkeypatch.setattr(w, "handle", broken)
    w.serve(io.BytesIO(b'{"type":"cancel","id":"a"}\n{"type":"ping"}\n'))
    events = [parse_event(x) for x in out.getvalue().splitlines()]
    assert [e.type for e in events] == ["error", "pong"] and events[0].code == "internal"
