"""The GUI ↔ worker protocol: one JSON object per line, `"type"` naming the message.

Standard library only: both processes import this module and nothing else crosses the boundary.
Every request and event is a small dataclass with `to_json` / `from_json`; parsing validates field
types and values and raises ProtocolError with a stable `code`. Unknown fields are ignored, so either
side may add fields without breaking the other; the fields here are never renamed.
"""
from __future__ import annotations

import functools
import json
import math
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, ClassVar

PROTOCOL_VERSION = 1
MAX_LINE_BYTES = 8 * 2**20


class ProtocolError(Exception):
    """A line that is not a valid request or event. `code` is stable; `message` is for people."""

    def __init__(self, code: str, message: str, id: str | None = None, kind: str | None = None):
        super().__init__(message)
        self.code, self.message, self.id, self.kind = code, message, id, kind


def choice(*values) -> dict:
    return {"choices": values}


@dataclass
class Message:
    @classmethod
    def from_dict(cls, d: dict) -> "Message":
        kwargs = {}
        hints = _hints(cls)
        for f in fields(cls):
            if f.name == "type":
                continue
            if f.name not in d or (d[f.name] is None and f.default is None):
                if f.default is MISSING and f.default_factory is MISSING:
                    raise ProtocolError("bad_request", f"'{cls.type}' needs the field '{f.name}'", _id_of(d))
                continue
            kwargs[f.name] = _convert(d[f.name], hints[f.name], f"{cls.type}.{f.name}", d)
            allowed = f.metadata.get("choices")
            if allowed and kwargs[f.name] not in allowed:
                raise ProtocolError("bad_request", f"{cls.type}.{f.name} must be one of {list(allowed)}", _id_of(d))
        msg = cls(**kwargs)
        msg.validate()
        return msg

    def validate(self) -> None:
        """Checks across fields; raise ProtocolError."""

    def to_dict(self) -> dict:
        return {"type": self.type, **{k: v for k, v in asdict(self).items() if k != "type"}}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, allow_nan=False)


@functools.cache
def _hints(cls) -> dict:
    """Field types, evaluated once per class (get_type_hints compiles every string annotation anew)."""
    return typing.get_type_hints(cls)


def is_text(s: str) -> bool:
    """Whether s can travel as UTF-8: JSON's \\ud800-style escapes decode to lone surrogates, which cannot."""
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _id_of(d: dict) -> str | None:
    i = d.get("id")
    return i if isinstance(i, str) and is_text(i) else None  # an id that cannot be echoed back is not one


def _convert(value: Any, hint, where: str, d: dict) -> Any:
    """Check `value` against a type hint (str, int, float, bool, X | None, list[X], dict, a dataclass)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        others = [a for a in args if a is not type(None)]
        errors = []
        for a in others:
            try:
                return _convert(value, a, where, d)
            except ProtocolError as e:
                errors.append(e)
        raise errors[-1]
    if origin is list:
        if not isinstance(value, list):
            raise ProtocolError("bad_request", f"{where} must be a list", _id_of(d))
        return [_convert(v, args[0], f"{where}[]", d) for v in value] if args else value
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ProtocolError("bad_request", f"{where} must be an object", _id_of(d))
        return value
    if isinstance(hint, type) and issubclass(hint, Message):
        if not isinstance(value, dict):
            raise ProtocolError("bad_request", f"{where} must be an object", _id_of(d))
        return hint.from_dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ProtocolError("bad_request", f"{where} must be true or false", _id_of(d))
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ProtocolError("bad_request", f"{where} must be an integer", _id_of(d))
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ProtocolError("bad_request", f"{where} must be a number", _id_of(d))
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ProtocolError("bad_request", f"{where} must be a string", _id_of(d))
        if not is_text(value):
            raise ProtocolError("invalid_request", f"{where} is not valid text: it holds a lone UTF-16 surrogate "
                                                   "(an escape like \\ud800 with no pair), which UTF-8 cannot carry",
                                _id_of(d))
        return value
    if hint is Any:
        return value
    raise TypeError(f"unsupported field type {hint!r} at {where}")


# ---- requests (stdin) ----

@dataclass
class Hello(Message):
    type: ClassVar[str] = "hello"
    protocol: int | None = None


@dataclass
class Load(Message):
    type: ClassVar[str] = "load"
    path: str | None = None  # a model folder or .gguf (native, llamacpp)
    backend: str = field(default="native", metadata=choice("native", "llamacpp", "remote"))
    quant: str | None = field(default=None, metadata=choice(None, "int8", "int4"))
    device: str | None = field(default=None, metadata=choice(None, "cpu", "cuda"))
    dtype: str | None = field(default=None, metadata=choice(None, "float32", "bfloat16", "float16"))
    draft: str | None = None
    # remote: an OpenAI-compatible server's base URL, the model to use (None: its first), where the API
    # key is (an environment variable's name, or the OS keyring; the key itself never travels in the
    # protocol), and whether plain http to another machine was confirmed by the user.
    url: str | None = None
    model: str | None = None
    api_key_env: str | None = None
    api_key_keyring: bool = False  # the key is in the OS keyring under service "moedesk", user = url
    allow_insecure: bool = False

    def validate(self) -> None:
        if self.backend == "remote" and not self.url:
            raise ProtocolError("bad_request", "load.url is required for the remote backend")
        if self.backend != "remote" and not self.path:
            raise ProtocolError("bad_request", "load.path is required")


@dataclass
class ChatMessage(Message):
    type: ClassVar[str] = "message"
    role: str = field(metadata=choice("system", "user", "assistant"))
    content: str


@dataclass
class Speculative(Message):
    type: ClassVar[str] = "speculative"
    mode: str = field(default="off", metadata=choice("off", "mtp", "draft", "lookup"))
    k: int | str = "auto"

    def validate(self) -> None:
        if self.k != "auto" and (not isinstance(self.k, int) or not 1 <= self.k <= 16):
            raise ProtocolError("bad_request", "speculative.k must be 1..16 or \"auto\"")


@dataclass
class GenerateParams(Message):
    type: ClassVar[str] = "params"
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int = 256
    seed: int | None = 0
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False  # run to max_tokens (benchmarks, soak tests)
    speculative: Speculative = field(default_factory=Speculative)

    def validate(self) -> None:
        checks = [(self.temperature >= 0, "temperature must be >= 0"), (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
                  (self.top_k >= 0, "top_k must be >= 0"), (0 <= self.min_p < 1, "min_p must be in [0, 1)"),
                  (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
                  (1 <= self.max_tokens <= 1_000_000, "max_tokens must be 1..1000000")]
        for ok, why in checks:
            if not ok:
                raise ProtocolError("bad_request", f"params.{why}")


@dataclass
class Generate(Message):
    type: ClassVar[str] = "generate"
    id: str
    messages: list[ChatMessage]
    params: GenerateParams = field(default_factory=GenerateParams)
    # Continue the final (assistant) message instead of starting a new reply: the template is rendered
    # without its end-of-turn after that message, so an interrupted reply picks up where it stopped.
    continue_final_message: bool = False

    def validate(self) -> None:
        if not self.id:
            raise ProtocolError("bad_request", "generate.id must not be empty")
        if not self.messages:
            raise ProtocolError("bad_request", "generate.messages must not be empty", self.id)
        if self.continue_final_message and self.messages[-1].role != "assistant":
            raise ProtocolError("bad_request", "continue_final_message needs an assistant message last", self.id)


@dataclass
class Cancel(Message):
    type: ClassVar[str] = "cancel"
    id: str


@dataclass
class Unload(Message):
    type: ClassVar[str] = "unload"


@dataclass
class Ping(Message):
    type: ClassVar[str] = "ping"


@dataclass
class Shutdown(Message):
    type: ClassVar[str] = "shutdown"


# ---- events (stdout) ----

@dataclass
class Ready(Message):
    type: ClassVar[str] = "ready"
    protocol: int = PROTOCOL_VERSION
    pid: int = 0
    backends: list[str] = field(default_factory=list)


@dataclass
class Progress(Message):
    type: ClassVar[str] = "progress"
    stage: str
    fraction: float


@dataclass
class Loaded(Message):
    type: ClassVar[str] = "loaded"
    model: dict


@dataclass
class Token(Message):
    type: ClassVar[str] = "token"
    id: str
    text: str
    accepted: bool = False  # produced by an accepted speculative draft

    def to_dict(self) -> dict:  # one per generated token: no deep copy (asdict) of three plain fields
        return {"type": "token", "id": self.id, "text": self.text, "accepted": self.accepted}


@dataclass
class Done(Message):
    type: ClassVar[str] = "done"
    id: str
    finish_reason: str = field(metadata=choice("stop", "length", "cancelled", "error"))
    text: str
    stats: dict = field(default_factory=dict)


@dataclass
class Error(Message):
    type: ClassVar[str] = "error"
    code: str
    message: str
    id: str | None = None


@dataclass
class Pong(Message):
    type: ClassVar[str] = "pong"


@dataclass
class Unloaded(Message):
    type: ClassVar[str] = "unloaded"


REQUESTS = {c.type: c for c in (Hello, Load, Generate, Cancel, Unload, Ping, Shutdown)}
EVENTS = {c.type: c for c in (Ready, Progress, Loaded, Token, Done, Error, Pong, Unloaded)}


def _parse(line: str | bytes, table: dict) -> Message:
    if isinstance(line, bytes):
        if len(line) > MAX_LINE_BYTES:
            raise ProtocolError("bad_json", "line too long")
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("bad_json", "line is not UTF-8") from None
    if len(line) > MAX_LINE_BYTES:
        raise ProtocolError("bad_json", "line too long")
    try:
        d = json.loads(line)
    except (ValueError, RecursionError) as e:
        raise ProtocolError("bad_json", f"not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise ProtocolError("bad_json", "each line must be a JSON object")
    kind = d.get("type")
    if kind == "token" and table is EVENTS and type(d.get("id")) is str and type(d.get("text")) is str \
            and type(d.get("accepted", False)) is bool:
        return Token(id=d["id"], text=d["text"], accepted=d.get("accepted", False))  # the stream's hot path
    if not isinstance(kind, str) or kind not in table:
        raise ProtocolError("unknown_type", f"unknown message type {kind!r}", _id_of(d))
    try:
        return table[kind].from_dict(d)
    except ProtocolError as e:
        e.id = e.id or _id_of(d)  # errors in nested objects still name the request
        e.kind = kind
        raise


def parse_request(line: str | bytes) -> Message:
    return _parse(line, REQUESTS)


def parse_event(line: str | bytes) -> Message:
    return _parse(line, EVENTS)
