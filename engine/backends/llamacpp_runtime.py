"""The thin layer over llama.cpp's C API that the llama.cpp backend stands on: a GGUF checked before
llama.cpp reads it, a loaded model with its vocabulary, a context whose KV cache moedesk feeds and rolls
back itself (logits per row, and for MTP the hidden states), and llama.cpp's log kept so that a failed
load can say why.

It calls llama-cpp-python's ctypes bindings of llama.h rather than its Llama class, which hides what we
need (logits of chosen rows, the cache, load_mtp, MTP contexts), and whose quiet load redirects the
process's file descriptors 1 and 2 while the worker's other threads write.
"""
from __future__ import annotations

import ctypes
import os
import struct
import sys
from collections import deque
from pathlib import Path
from typing import Callable

import gguf
import llama_cpp
import numpy as np
import torch

from engine.backends.base import BackendError

try:  # llama.cpp's MTP calls (llama-ext.h, C++ linkage), bound only in llama-cpp-python's private module
    from llama_cpp import llama_cpp_ext as nextn
except (ImportError, AttributeError):  # a build without them: no MTP drafting
    nextn = None

BATCH = 512  # tokens per llama_decode call; a long prompt goes in chunks, checking for cancel between


# ---- the file, before llama.cpp sees it ----

def check_gguf(path: Path, what: str = "model") -> str:
    """The file's general.architecture, or a BackendError saying why it is not a GGUF we can load."""
    if not path.exists():
        raise BackendError("not_found", f"{what} file not found: {path}")
    if path.is_dir():
        raise BackendError("bad_format", f"{path} is a folder; the llama.cpp backend loads one .gguf file")
    try:
        with open(path, "rb") as f:
            arch = read_architecture(f, path.name)
    except (OSError, struct.error, ValueError, UnicodeDecodeError) as e:
        raise BackendError("bad_format", f"{path.name} is not a readable GGUF file ({e})") from e
    if arch not in gguf.MODEL_ARCH_NAMES.values():
        raise BackendError("unsupported", f"{path.name}: llama.cpp does not know the architecture {arch!r}")
    return arch


def read_architecture(f, name: str) -> str:
    """Walk the key/value header up to general.architecture (converters write it first). The gguf
    package's GGUFReader would do, but it parses every array up front: ~5 s for a 129k-token vocabulary."""
    magic = f.read(4)
    if magic != gguf.GGUF_MAGIC.to_bytes(4, "little"):
        raise BackendError("bad_format", f"{name} is not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    version, _n_tensors, n_kv = struct.unpack("<IQQ", f.read(20))
    if version not in (2, 3):
        raise BackendError("bad_format", f"{name} is GGUF version {version}; llama.cpp reads versions 2 and 3")
    for _ in range(n_kv):
        key = _gguf_string(f)
        vtype = gguf.GGUFValueType(struct.unpack("<I", f.read(4))[0])
        if key == "general.architecture" and vtype == gguf.GGUFValueType.STRING:
            return _gguf_string(f)
        _skip_value(f, vtype)
    raise BackendError("bad_format", f"{name} has no general.architecture key")


_SCALAR_SIZE = {gguf.GGUFValueType.UINT8: 1, gguf.GGUFValueType.INT8: 1, gguf.GGUFValueType.BOOL: 1,
                gguf.GGUFValueType.UINT16: 2, gguf.GGUFValueType.INT16: 2, gguf.GGUFValueType.UINT32: 4,
                gguf.GGUFValueType.INT32: 4, gguf.GGUFValueType.FLOAT32: 4, gguf.GGUFValueType.UINT64: 8,
                gguf.GGUFValueType.INT64: 8, gguf.GGUFValueType.FLOAT64: 8}


def _gguf_string(f) -> str:
    (n,) = struct.unpack("<Q", f.read(8))
    if n > 1 << 26:
        raise ValueError(f"a {n}-byte string in the header")
    data = f.read(n)
    if len(data) != n:
        raise ValueError("the file ends inside its header")
    return data.decode("utf-8")


def _skip_value(f, vtype) -> None:
    if vtype == gguf.GGUFValueType.STRING:
        f.seek(struct.unpack("<Q", f.read(8))[0], os.SEEK_CUR)
    elif vtype == gguf.GGUFValueType.ARRAY:
        item = gguf.GGUFValueType(struct.unpack("<I", f.read(4))[0])
        (count,) = struct.unpack("<Q", f.read(8))
        if item in _SCALAR_SIZE:
            f.seek(count * _SCALAR_SIZE[item], os.SEEK_CUR)
        else:
            for _ in range(count):
                _skip_value(f, item)
    else:
        f.seek(_SCALAR_SIZE[vtype], os.SEEK_CUR)


# ---- llama.cpp's log: kept so a failed load can say why ----

_log_tail: deque[str] = deque(maxlen=60)
_log_shown = [False]  # whether the line a GGML_LOG_LEVEL_CONT continues went to stderr
_backend_ready = [False]


@llama_cpp.llama_log_callback
def _on_log(level: int, text: bytes, _user) -> None:
    line = text.decode("utf-8", "replace")
    _log_tail.append(line)
    if level != 5:  # 5: continues the previous line
        _log_shown[0] = level >= 3  # GGML_LOG_LEVEL_WARN and _ERROR go to the worker's log
    if _log_shown[0]:
        sys.stderr.write(line)


def init_library() -> None:
    """Once: llama.cpp's backends. Every time: our log callback, which llama-cpp-python's own logger
    (or anyone else's) may have replaced since."""
    if not _backend_ready[0]:
        llama_cpp.llama_backend_init()
        _backend_ready[0] = True
    llama_cpp.llama_log_set(_on_log, ctypes.c_void_p(0))


def fresh_log() -> None:
    """Forget earlier lines, so that last_error() speaks of the call that follows."""
    _log_tail.clear()


def error_lines(lines, n: int = 2) -> list[str]:
    """The last n log lines that say what went wrong (else the last n lines)."""
    lines = [s.strip() for s in lines if s.strip()]
    bad = [s for s in lines if any(w in s.lower() for w in ("error", "failed", "invalid", "unknown", "wrong",
                                                             "not found"))]
    return (bad or lines)[-n:]


def last_error() -> str:
    return "; ".join(error_lines(_log_tail)) or "no reason given"


# ---- llama.cpp objects ----

class GGUFModel:
    """A loaded llama_model and its vocabulary."""

    def __init__(self, path: Path, gpu_layers: int, load_mtp: bool, progress: Callable[[float], None]):
        init_library()

        def on_progress(fraction: float, _user) -> bool:
            try:
                progress(fraction)
            except Exception:  # noqa: BLE001 - an exception here would read as "abort the load"
                pass
            return True

        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = gpu_layers
        params.load_mtp = load_mtp
        callback = llama_cpp.llama_progress_callback(on_progress)  # alive for the whole call
        params.progress_callback = callback
        fresh_log()
        self.ptr = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not self.ptr:
            raise BackendError("load_failed", f"llama.cpp could not load {path.name}: {last_error()}")
        self.path = path
        self.vocab = llama_cpp.llama_model_get_vocab(self.ptr)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.n_embd = llama_cpp.llama_model_n_embd(self.ptr)
        self._piece = ctypes.create_string_buffer(256)

    def meta(self, key: str) -> str | None:
        size = llama_cpp.llama_model_meta_val_str(self.ptr, key.encode(), None, 0)
        if size < 0:
            return None
        buf = ctypes.create_string_buffer(size + 1)
        llama_cpp.llama_model_meta_val_str(self.ptr, key.encode(), buf, size + 1)
        return buf.value.decode("utf-8", "replace")

    def token_text(self, token: int) -> bytes:
        return llama_cpp.llama_vocab_get_text(self.vocab, token) or b""

    def piece(self, token: int) -> bytes:
        """The bytes a generated token stands for; control tokens (special=False) stand for nothing."""
        n = llama_cpp.llama_token_to_piece(self.vocab, token, self._piece, len(self._piece), 0, False)
        if n < 0:
            self._piece = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, self._piece, len(self._piece), 0, False)
        return self._piece.raw[:n]

    def tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        data = text.encode("utf-8")
        room = len(data) + 8
        ids = (llama_cpp.llama_token * room)()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), ids, room, add_special, parse_special)
        if n < 0:  # never for byte-level vocabularies (one token per byte at most), but be exact
            room = -n
            ids = (llama_cpp.llama_token * room)()
            n = llama_cpp.llama_tokenize(self.vocab, data, len(data), ids, room, add_special, parse_special)
        return list(ids[:n])

    def end_of_generation_ids(self) -> frozenset[int]:
        return frozenset(t for t in range(self.n_vocab) if llama_cpp.llama_vocab_is_eog(self.vocab, t))

    def free(self) -> None:
        if self.ptr:
            llama_cpp.llama_model_free(self.ptr)
            self.ptr = None


class Context:
    """A llama_context on sequence 0. `tokens` is what its KV cache holds, at positions 0..len-1.

    mtp: a context of llama.cpp's MTP graph (ctx_type MTP) over the model's first nextn layer. Its rows
    carry a token and a hidden state (`states`); it outputs its own hidden state with the logits."""

    def __init__(self, model: GGUFModel, n_ctx: int, threads: tuple[int, int], gpu: bool, mtp: bool = False):
        init_library()
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = params.n_ubatch = BATCH
        params.n_threads, params.n_threads_batch = threads
        # Flash attention computes in F16 on the CPU (gguf_trial.md): no faster there, only less exact.
        params.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO if gpu
                                  else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        if mtp:
            params.ctx_type = llama_cpp.LLAMA_CONTEXT_TYPE_MTP
        self.ptr = llama_cpp.llama_init_from_model(model.ptr, params)
        if not self.ptr:
            raise BackendError("load_failed", f"llama.cpp could not make a context for {model.path.name}: "
                                              f"{last_error()}")
        self.n_ctx = llama_cpp.llama_n_ctx(self.ptr)
        self.n_vocab, self.n_embd = model.n_vocab, model.n_embd
        self.memory = llama_cpp.llama_get_memory(self.ptr)
        self.tokens: list[int] = []
        self.states: dict[int, np.ndarray] | None = None  # the hidden state per position, while kept
        self.batch = llama_cpp.llama_batch_init(BATCH, self.n_embd if mtp else 0, 1)
        self.embd = None
        if mtp:  # an embedding batch has no token array of its own; MTP rows need both
            self.token_ids = (llama_cpp.llama_token * BATCH)()
            self.batch.token = self.token_ids
            self.embd = np.ctypeslib.as_array(self.batch.embd, shape=(BATCH, self.n_embd))
            nextn.llama_set_embeddings_nextn(self.ptr, True, True)

    def keep_states(self, on: bool) -> None:
        """Record the hidden state of every token fed (the target's, for an MTP drafter), or stop."""
        nextn.llama_set_embeddings_nextn(self.ptr, on, False)
        self.states = {} if on else None

    def common_prefix(self, tokens: list[int]) -> int:
        n, limit = 0, min(len(self.tokens), len(tokens))
        while n < limit and self.tokens[n] == tokens[n]:
            n += 1
        return n

    def rewind(self, n: int) -> None:
        """Keep the first n tokens of the cache."""
        if n < len(self.tokens):
            if not llama_cpp.llama_memory_seq_rm(self.memory, 0, n, -1):
                raise RuntimeError("this model's cache cannot be rolled back (a recurrent architecture?)")
            del self.tokens[n:]
        if self.states:
            for pos in [p for p in self.states if p >= n]:
                del self.states[pos]

    def extend(self, tokens: list[int], all_logits: bool = False, should_stop: Callable[[], bool] | None = None,
               states: np.ndarray | None = None) -> bool:
        """Feed tokens (and, in an MTP context, their states [n, H]) after the cached ones; logits for
        every one (all_logits) or the last. False if stopped between chunks (the cache then holds the
        chunks fed so far)."""
        for start in range(0, len(tokens), BATCH):
            if start and should_stop and should_stop():
                return False
            chunk = tokens[start:start + BATCH]
            last = start + len(chunk) == len(tokens)
            self._decode(chunk, all_logits, last, None if states is None else states[start:start + len(chunk)])
        return True

    def _decode(self, chunk: list[int], all_logits: bool, last: bool, states: np.ndarray | None) -> None:
        b, pos, n = self.batch, len(self.tokens), len(chunk)
        if pos + n > self.n_ctx:
            raise BackendError("bad_request", f"the context of {self.n_ctx} tokens is full")
        b.n_tokens = n
        for i, t in enumerate(chunk):
            b.token[i], b.pos[i], b.n_seq_id[i] = t, pos + i, 1
            b.seq_id[i][0] = 0
            b.logits[i] = all_logits or (last and i == n - 1)
        if states is not None:
            self.embd[:n] = states
        rc = llama_cpp.llama_decode(self.ptr, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed ({rc}): {last_error()}")
        self.tokens += chunk
        if self.states is not None:
            rows = np.ctypeslib.as_array(nextn.llama_get_embeddings_nextn(self.ptr), shape=(n, self.n_embd))
            self.states.update((pos + i, row.copy()) for i, row in enumerate(rows))

    def logits(self, i: int = -1) -> torch.Tensor:
        """[V] logits of row i of the last decode (batch index; -1 the last row that has them)."""
        ptr = llama_cpp.llama_get_logits_ith(self.ptr, i)
        if not ptr:
            raise RuntimeError(f"no logits for row {i}")
        return torch.from_numpy(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy())

    def output_state(self) -> np.ndarray:
        """[H] the hidden state an MTP context computed for the last row of its last decode."""
        ptr = nextn.llama_get_embeddings_nextn_ith(self.ptr, self.batch.n_tokens - 1)
        if not ptr:
            raise RuntimeError("no hidden state for the last row")
        return np.ctypeslib.as_array(ptr, shape=(self.n_embd,)).copy()

    def free(self) -> None:
        if self.ptr:
            if self.embd is not None:
                self.batch.token = ctypes.POINTER(llama_cpp.llama_token)()  # ours, not llama_batch_free's
            llama_cpp.llama_batch_free(self.batch)
            llama_cpp.llama_free(self.ptr)
            self.ptr = None
