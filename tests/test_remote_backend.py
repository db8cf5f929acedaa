"""The remote backend against a real OpenAI-compatible server started here on a loopback port
(llama-cpp-python's own `llama_cpp.server` on a GGUF export of a tiny model), and against a small
scripted server for the faults a real one rarely shows on demand (401, 429, 5xx, a stream cut
mid-reply, a server that stops sending)."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from gguf_fixtures import exported_tiny

from engine.backends import remote
from engine.backends.base import BackendError
from engine.backends.llamacpp import LlamaCppBackend
from engine.backends.remote import RemoteBackend, check_url, spec_counters
from engine.protocol import ChatMessage, Generate, GenerateParams, Load
from engine.worker import Worker

pytest.importorskip("llama_cpp.server", reason="llama-cpp-python's server extra (the bootstrap installs it)")
QUIET = lambda stage, fraction: None  # noqa: E731


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chat(text: str = "def main(): return", id: str = "r", **params) -> Generate:
    params.setdefault("max_tokens", 24)
    return Generate(id=id, messages=[ChatMessage(role="user", content=text)], params=GenerateParams(**params))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """llama_cpp.server on a tiny model's GGUF, on a free loopback port → (base URL, .gguf path)."""
    _, gguf = exported_tiny(tmp_path_factory.mktemp("remote"), "f32")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
                             "--port", str(port), "--n_ctx", "256", "--n_threads", "1", "--model_alias", "tiny"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}/v1"
    import httpx
    deadline = time.time() + 90
    while True:
        try:
            if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"llama_cpp.server did not start: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.3)
    yield url, gguf
    proc.terminate()
    proc.wait(10)


@pytest.fixture()
def backend(served):
    b = RemoteBackend()
    b.load(Load(backend="remote", url=served[0]), QUIET)
    yield b
    b.unload()


def test_load_lists_the_servers_models_and_measures_latency(backend, served):
    info = backend.info()
    assert info["name"] == "tiny" and info["models"] == ["tiny"] and info["backend"] == "remote"
    assert info["url"] == served[0] and info["latency_ms"] > 0


def test_greedy_stream_equals_the_llamacpp_backend_on_the_same_file(backend, served):
    tokens = []
    done = backend.generate(chat(), tokens.append, lambda: False)
    assert done.finish_reason in ("stop", "length") and len(tokens) > 1
    assert done.text == "".join(t.text for t in tokens)
    s = done.stats
    assert s["generated_tokens"] > 1 and s["time_to_first_token_s"] > 0 and s["decode_tokens_per_s"] > 0
    assert s["speculative_metrics"] is None  # llama.cpp's server publishes no speculative counters
    local = LlamaCppBackend()
    local.load(Load(path=str(served[1]), backend="llamacpp"), QUIET)
    try:
        here = local.generate(chat(), lambda t: None, lambda: False).text
    finally:
        local.unload()
    # The random model emits byte tokens that do not form UTF-8: the server renders each as U+FFFD,
    # moedesk's backends only whole characters. The tokens themselves are the same.
    assert here.replace("\ufffd", "") == done.text.replace("\ufffd", "") and len(here) > 10


def test_cancel_closes_the_stream_and_the_server_goes_on_serving(backend):
    seen = []
    done = backend.generate(chat(max_tokens=64, ignore_eos=True), seen.append, lambda: len(seen) >= 2)
    assert done.finish_reason == "cancelled" and len(seen) == 2
    assert backend.generate(chat(id="again"), lambda t: None, lambda: False).finish_reason in ("stop", "length")


def test_connection_and_url_faults_are_clear_errors(served):
    cases = [(Load(backend="remote", url=f"http://127.0.0.1:{free_port()}/v1"), "connection_refused"),
             (Load(backend="remote", url="https://no-such-host.invalid/v1"), "dns"),
             (Load(backend="remote", url="http://192.0.2.1:8000/v1"), "insecure_url"),  # not loopback, not confirmed
             (Load(backend="remote", url="ftp://127.0.0.1/v1"), "bad_request"),
             (Load(backend="remote", url=served[0], model="nope"), "model_not_found"),
             (Load(backend="remote", url=served[0], api_key_env="MOEDESK_TEST_UNSET_KEY"), "auth")]
    for request, code in cases:
        with pytest.raises(BackendError) as e:
            RemoteBackend().load(request, QUIET)
        assert e.value.code == code, (request.url, e.value.message)
    assert check_url("https://example.org/v1/", False) == "https://example.org/v1"
    assert check_url("http://[::1]:8000/v1", False) == "http://[::1]:8000/v1"


class Scripted(BaseHTTPRequestHandler):
    """/MODE/v1/...: ok, 401, 429, 500, cut (two chunks, then the connection drops), slow (one chunk,
    then silence), key (needs `Authorization: Bearer sesame`)."""

    def log_message(self, *args):
        pass

    def chunk(self, text: str) -> None:
        self.wfile.write(f"data: {json.dumps({'choices': [{'delta': {'content': text}}]})}\n\n".encode())
        self.wfile.flush()

    def do_GET(self):
        mode = self.path.split("/")[1]
        if mode == "key" and self.headers.get("Authorization") != "Bearer sesame":
            return self.reply(401, {"error": "bad key"})
        if self.path.endswith("/metrics"):
            body = 'vllm:spec_decode_num_accepted_tokens_total{model="m"} 10\nvllm:spec_decode_num_draft_tokens_total 20\n'
            if mode == "key":
                body = body.replace("10", "13").replace("20", "24") if getattr(self.server, "calls", 0) else body
                self.server.calls = getattr(self.server, "calls", 0) + 1
            return self.reply(200, body, "text/plain")
        self.reply(200, {"data": [{"id": "m"}]})

    def do_POST(self):
        mode = self.path.split("/")[1]
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if mode in ("401", "429", "500"):
            return self.reply(int(mode), {"error": f"scripted {mode}"})
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        self.chunk("Hello")
        if mode == "slow":
            time.sleep(3)
            return
        self.chunk(" world")
        if mode == "cut":
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        usage = {"choices": [{"delta": {}, "finish_reason": "stop"}], "usage": {"completion_tokens": 2, "prompt_tokens": 5}}
        self.wfile.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())

    def reply(self, status: int, body, kind: str = "application/json") -> None:
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def run(worker: Worker, request) -> None:
    worker.handle(request)
    worker.job.join(30)


@pytest.fixture(scope="module")
def scripted():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_http_and_stream_faults_are_clear_errors_with_the_partial_reply_kept(scripted, monkeypatch):
    monkeypatch.setattr(remote, "READ_S", 1.0)
    for mode, code in (("401", "auth"), ("429", "rate_limited"), ("500", "server_error"), ("cut", "stream_cut"),
                       ("slow", "timeout")):
        lines = []
        worker = Worker(out=type("Out", (), {"write": lambda self, s: lines.append(s), "flush": lambda self: None})())
        run(worker, Load(backend="remote", url=f"{scripted}/{mode}/v1"))
        run(worker, chat(id=mode))
        events = [json.loads(x) for x in lines if x.strip()]
        error = next((e for e in events if e["type"] == "error"), None)
        done = next((e for e in events if e["type"] == "done"), None)
        assert error is not None and done is not None, (mode, events)
        assert error["code"] == code and error["id"] == mode, (mode, error)
        assert done["finish_reason"] == "error"
        if mode in ("cut", "slow"):  # what arrived before the fault is kept
            assert done["text"] in ("Hello", "Hello world"), (mode, done)
        run(worker, Load(backend="remote", url=f"{scripted}/ok/v1"))  # and the worker goes on serving
        assert json.loads(lines[-1])["type"] == "loaded"


def test_api_key_from_the_environment_and_speculative_counters(scripted, monkeypatch):
    with pytest.raises(BackendError) as e:
        RemoteBackend().load(Load(backend="remote", url=f"{scripted}/key/v1"), QUIET)
    assert e.value.code == "auth"
    monkeypatch.setenv("MOEDESK_TEST_KEY", "sesame")
    b = RemoteBackend()
    b.load(Load(backend="remote", url=f"{scripted}/key/v1", api_key_env="MOEDESK_TEST_KEY"), QUIET)
    done = b.generate(chat(), lambda t: None, lambda: False)
    assert done.text == "Hello world" and done.stats["generated_tokens"] == 2 and done.stats["tokens_from"] == "usage"
    assert done.stats["speculative_metrics"] == {"vllm:spec_decode_num_accepted_tokens_total": 3.0,
                                                 "vllm:spec_decode_num_draft_tokens_total": 4.0}
    assert "sesame" not in json.dumps(b.info()) and "sesame" not in json.dumps(done.stats)


def test_spec_counters_sum_labelled_series():
    text = ('# HELP x\nvllm:spec_decode_num_accepted_tokens_total{a="1"} 2\n'
            'vllm:spec_decode_num_accepted_tokens_total{a="2"} 3\nother_metric 5\n')
    assert spec_counters(text) == {"vllm:spec_decode_num_accepted_tokens_total": 5.0}


class MemoryKeyring:
    """A keyring backend in memory (keyring's KeyringBackend interface, the parts used)."""
    priority = 1

    def __init__(self):
        self.store = {}

    def get_password(self, service, user):
        return self.store.get((service, user))

    def set_password(self, service, user, password):
        self.store[(service, user)] = password


def test_api_key_from_the_os_keyring(scripted, monkeypatch):
    import keyring

    memory = MemoryKeyring()
    monkeypatch.setattr(keyring, "get_password", memory.get_password)
    monkeypatch.setattr(keyring, "set_password", memory.set_password)
    url = f"{scripted}/key/v1"
    with pytest.raises(BackendError) as e:
        RemoteBackend().load(Load(backend="remote", url=url, api_key_keyring=True), QUIET)
    assert e.value.code == "auth" and "keyring has no API key" in e.value.message
    keyring.set_password(remote.KEYRING_SERVICE, url, "sesame")
    b = RemoteBackend()
    b.load(Load(backend="remote", url=url, api_key_keyring=True), QUIET)
    assert b.generate(chat(), lambda t: None, lambda: False).text == "Hello world"


def test_an_untrusted_certificate_is_a_tls_error(tmp_path):
    """https is verified: a server with a self-signed certificate is refused with code tls."""
    import datetime
    import ssl

    pytest.importorskip("cryptography", reason="makes the self-signed certificate (installed with keyring)")
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(__import__("ipaddress").ip_address("127.0.0.1"))]),
                           critical=False).sign(key, hashes.SHA256()))
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    server = ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(BackendError) as e:
            RemoteBackend().load(Load(backend="remote", url=f"https://127.0.0.1:{server.server_address[1]}/ok/v1"), QUIET)
        assert e.value.code == "tls" and "certificate" in e.value.message.lower()
    finally:
        server.shutdown()
