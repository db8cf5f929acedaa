"""A model served elsewhere through the OpenAI-compatible HTTP API (vLLM, SGLang, llama.cpp's server).

load: GET {url}/models → the server's models, the chosen one (`model`, or the first); the round trip is
the reported latency. generate: POST {url}/chat/completions with `stream: true`, read as server-sent
events; cancel closes the stream. Stats are measured here: time to first token, decode tok/s from the
first to the last content chunk, tokens from the server's `usage` when it sends one (else the chunks
counted), and speculative acceptance where the server publishes counters on /metrics (vLLM's
`vllm:spec_decode_*`, SGLang's `sglang:spec_*`): read before and after the request, the difference
reported; a server without them says so (`speculative_metrics: null`).

Security: the API key comes from an environment variable named in the request or from the OS keyring
(never from the request itself, never stored by moedesk or logged); plain http is refused for hosts other than loopback unless the request
says `allow_insecure`; https certificates are verified.
"""
from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
import ssl
import time
from typing import Callable
from urllib.parse import urlsplit

from engine.backends.base import Backend, BackendError, EmitFn, ProgressFn
from engine.protocol import Done, Generate, Load, Token

CONNECT_S, READ_S = 10.0, 60.0  # a server that sends nothing for READ_S seconds mid-reply has stopped
METRIC = re.compile(r"^(vllm:spec_decode_\w+|sglang:spec_\w+)(?:\{[^}]*\})?\s+([0-9.eE+-]+)\s*$")


def is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_url(url: str, allow_insecure: bool) -> str:
    """The base URL without a trailing slash, or a bad_request error saying what is wrong with it."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BackendError("bad_request", f"not an http(s) URL: {url!r} (e.g. http://127.0.0.1:8000/v1)")
    if parts.scheme == "http" and not is_loopback(parts.hostname) and not allow_insecure:
        raise BackendError("insecure_url", f"{parts.hostname} is not this machine: plain http would send the "
                                           "conversation unencrypted. Use https, or confirm to allow http.")
    return url.strip().rstrip("/")


KEYRING_SERVICE = "moedesk"  # keyring entries: service "moedesk", user name = the server's URL


def api_key(env: str | None, use_keyring: bool = False, url: str = "") -> str | None:
    """The key from the environment variable named `env`, or from the OS keyring; never from anywhere else."""
    if use_keyring:
        try:
            import keyring
            key = keyring.get_password(KEYRING_SERVICE, url)
        except Exception as e:  # noqa: BLE001 - no keyring backend on this machine, a locked keyring
            raise BackendError("auth", f"the OS keyring could not be read: {type(e).__name__}: {e}") from None
        if not key:
            raise BackendError("auth", f"the OS keyring has no API key for {url} (service {KEYRING_SERVICE!r})")
        return key
    if env is None:
        return None
    key = os.environ.get(env)
    if not key:
        raise BackendError("auth", f"the environment variable {env} holding the API key is not set")
    return key


def http_error(status: int, body: str, model: str | None) -> BackendError:
    detail = body.strip().replace("\n", " ")[:300]
    if status in (401, 403):
        return BackendError("auth", f"the server refused the credentials (HTTP {status}): {detail}")
    if status == 404:
        return BackendError("model_not_found", f"the server has no model {model!r} (HTTP 404): {detail}")
    if status == 429:
        return BackendError("rate_limited", f"the server is rate-limiting requests (HTTP 429): {detail}")
    if status >= 500:
        return BackendError("server_error", f"the server failed (HTTP {status}): {detail}")
    return BackendError("bad_request", f"the server rejected the request (HTTP {status}): {detail}")


def transport_error(e: Exception, url: str) -> BackendError:
    """httpx's connection failures as what the user can act on."""
    import httpx

    text = str(e)
    cause = e.__cause__ or e.__context__
    if isinstance(e, httpx.TimeoutException):
        return BackendError("timeout", f"the server at {url} stopped answering ({type(e).__name__})")
    if isinstance(cause, ssl.SSLError) or "CERTIFICATE" in text.upper() or "SSL" in text.upper():
        return BackendError("tls", f"TLS failed with {url}: {text}")
    if isinstance(e, httpx.ConnectError):
        if isinstance(cause, socket.gaierror) or "Name or service not known" in text or "nodename" in text:
            return BackendError("dns", f"cannot resolve the server's name in {url}: {text}")
        return BackendError("connection_refused", f"cannot connect to {url}: {text}")
    if isinstance(e, (httpx.RemoteProtocolError, httpx.ReadError)):
        return BackendError("stream_cut", f"the connection to {url} broke mid-reply: {text}")
    return BackendError("remote_failed", f"{type(e).__name__}: {text}")


def spec_counters(text: str) -> dict[str, float]:
    """Prometheus text → {metric: value} of the speculative-decoding counters (labels summed)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = METRIC.match(line)
        if m:
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(2))
    return out


def request_body(model: str, req: Generate) -> dict:
    p = req.params
    body = {"model": model, "messages": [{"role": m.role, "content": m.content} for m in req.messages],
            "stream": True, "stream_options": {"include_usage": True}, "max_tokens": p.max_tokens,
            "temperature": p.temperature, "top_p": p.top_p, "stop": p.stop or None, "seed": p.seed}
    # Not in OpenAI's API, accepted by vLLM, SGLang and llama.cpp's server (which ignore what they lack).
    body |= {"top_k": p.top_k or None, "min_p": p.min_p, "repetition_penalty": p.repetition_penalty,
             "repeat_penalty": p.repetition_penalty}  # top_k left out when off: servers disagree on its "off" value
    if p.ignore_eos:
        body["ignore_eos"] = True
    if req.continue_final_message:
        body |= {"continue_final_message": True, "add_generation_prompt": False}
    return {k: v for k, v in body.items() if v is not None}


class RemoteBackend(Backend):
    name = "remote"

    def __init__(self):
        self.client = None
        self.url, self.model, self.models, self.latency_ms = "", None, [], None

    def load(self, request: Load, progress: ProgressFn) -> dict:
        import httpx

        url = check_url(request.url or "", request.allow_insecure)
        key = api_key(request.api_key_env, request.api_key_keyring, url)
        progress("connecting", 0.1)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        client = httpx.Client(base_url=url, headers=headers, verify=True,
                              timeout=httpx.Timeout(READ_S, connect=CONNECT_S))
        try:
            t0 = time.perf_counter()
            r = client.get("/models")
            latency = (time.perf_counter() - t0) * 1e3
        except httpx.HTTPError as e:
            client.close()
            raise transport_error(e, url) from None
        if r.status_code != 200:
            client.close()
            raise http_error(r.status_code, r.text, request.model)
        try:
            models = [m["id"] for m in r.json()["data"]]
        except (ValueError, KeyError, TypeError):
            client.close()
            raise BackendError("bad_response", f"{url}/models did not answer with an OpenAI model list") from None
        model = request.model or (models[0] if models else None)
        if model is None or model not in models:
            client.close()
            raise BackendError("model_not_found", f"the server has no model {request.model!r}; it serves {models}")
        self.client, self.url, self.model, self.models, self.latency_ms = client, url, model, models, latency
        progress("connected", 1.0)
        return self.info()

    def info(self) -> dict:
        return {"name": self.model, "backend": "remote", "url": self.url, "models": self.models,
                "latency_ms": round(self.latency_ms, 1) if self.latency_ms is not None else None,
                "speculative_modes": ["off"], "path": self.url}

    def metrics(self) -> dict[str, float] | None:
        """The server's speculative-decoding counters, or None where /metrics has none."""
        root = self.url[:-3] if self.url.endswith("/v1") else self.url
        try:
            r = self.client.get(f"{root}/metrics", timeout=5.0)
        except Exception:  # noqa: BLE001 - a server without /metrics is normal
            return None
        counters = spec_counters(r.text) if r.status_code == 200 else {}
        return counters or None

    def generate(self, request: Generate, emit: EmitFn, cancelled: Callable[[], bool]) -> Done:
        import httpx

        if self.client is None:
            raise BackendError("no_model", "no server connected")
        before = self.metrics()
        t0 = time.perf_counter()
        first = last = None
        pieces: list[str] = []
        chunks, usage, finish, ended = 0, None, None, False
        try:
            with self.client.stream("POST", "/chat/completions", json=request_body(self.model, request)) as r:
                if r.status_code != 200:
                    r.read()
                    raise http_error(r.status_code, r.text, self.model)
                for line in r.iter_lines():
                    if cancelled():
                        finish = "cancelled"
                        break  # leaving the block closes the stream: the server stops generating
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        ended = True
                        break
                    try:
                        event = json.loads(data)
                    except ValueError:
                        raise BackendError("bad_response", f"the server sent a malformed event: {data[:200]}") from None
                    usage = event.get("usage") or usage
                    for choice in event.get("choices") or []:
                        text = (choice.get("delta") or {}).get("content")
                        if text:
                            now = time.perf_counter()
                            first, last = first or now, now
                            chunks += 1
                            pieces.append(text)
                            emit(Token(id=request.id, text=text))
                        if choice.get("finish_reason"):
                            finish = "length" if choice["finish_reason"] == "length" else "stop"
        except httpx.HTTPError as e:
            raise transport_error(e, self.url) from None
        if finish != "cancelled" and not ended and finish is None:  # the body ended, the reply did not
            raise BackendError("stream_cut", f"the server at {self.url} closed the stream mid-reply")
        finish = finish or "stop"
        tokens = (usage or {}).get("completion_tokens") or chunks
        stats = {"backend": "remote", "server": self.url, "model": self.model, "generated_tokens": tokens,
                 "prompt_tokens": (usage or {}).get("prompt_tokens"),
                 "time_to_first_token_s": first - t0 if first else None,
                 "decode_tokens_per_s": (tokens - 1) / (last - first) if first and last and last > first else None,
                 "total_s": time.perf_counter() - t0, "tokens_from": "usage" if usage else "chunks"}
        after = self.metrics() if before is not None else None
        stats["speculative_metrics"] = ({k: after.get(k, 0.0) - v for k, v in before.items()}
                                        if before is not None and after is not None else None)
        return Done(id=request.id, finish_reason=finish, text="".join(pieces), stats=stats)

    def unload(self) -> None:
        if self.client is not None:
            self.client.close()
        self.client = None
