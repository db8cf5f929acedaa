"""The worker process: `python -m engine.worker`. JSON requests on stdin, JSON events on stdout.

The main thread reads requests and answers the quick ones (ping, cancel, hello) at once; loading and
generating run one at a time on a job thread, so the worker stays responsive while it works. Every
failure becomes an `error` event with a stable code; the worker keeps serving. Logs go to stderr, and
so does anything a library prints: stdout carries protocol lines only.
"""
from __future__ import annotations

import os
import re
import sys
import threading
import time
import traceback
from typing import Callable, TextIO

from engine.backends.base import Backend, BackendError
from engine.protocol import (PROTOCOL_VERSION, Cancel, Done, Error, Generate, Hello, Load, Loaded, Message, Ping,
                             Pong, Progress, ProtocolError, Ready, Shutdown, Token, Unload, Unloaded, is_text,
                             parse_request)


LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # what UTF-8 cannot carry in a str


def native_backend() -> Backend:
    from engine.backends.native import NativeBackend
    return NativeBackend()


def llamacpp_backend() -> Backend:
    from engine.backends.llamacpp import LlamaCppBackend  # imports llama_cpp: only when a GGUF is loaded
    return LlamaCppBackend()


def remote_backend() -> Backend:
    from engine.backends.remote import RemoteBackend  # imports httpx: only when a server is connected
    return RemoteBackend()


BACKENDS: dict[str, Callable[[], Backend]] = {"native": native_backend, "llamacpp": llamacpp_backend,
                                              "remote": remote_backend}


def is_out_of_memory(e: BaseException) -> bool:
    """MemoryError, torch's OutOfMemoryError (a RuntimeError), or an allocator message saying so."""
    return isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError" or "out of memory" in str(e).lower()


def log(msg: str) -> None:
    print(f"[worker {os.getpid()}] {msg}", file=sys.stderr, flush=True)


class Worker:
    def __init__(self, out: TextIO, backends: dict[str, Callable[[], Backend]] | None = None):
        self.out = out
        self.backends = backends or BACKENDS
        self.backend: Backend | None = None
        self.write_lock = threading.Lock()
        self.job: threading.Thread | None = None
        self.job_id: str | None = None  # the generate request running, if any
        self.cancel = threading.Event()
        self.running = threading.Event()
        self.closed = False

    # ---- output ----

    def emit(self, event: Message) -> None:
        """Write one event line. It cannot fail on content: text that UTF-8 cannot carry (a lone surrogate
        from a backend or an echoed field) goes out as U+FFFD. Only a closed pipe stops the output."""
        line = event.to_json() + "\n"
        if not is_text(line):
            line = LONE_SURROGATE.sub("\ufffd", line)
        with self.write_lock:
            if self.closed:
                return
            try:
                self.out.write(line)
                self.out.flush()
            except (BrokenPipeError, OSError, ValueError):
                self.closed = True  # nobody is listening any more

    # ---- input ----

    def handle_line(self, line: str | bytes) -> bool:
        """Handle one request line; False once the worker should exit."""
        if not line.strip():
            return True
        try:
            request = parse_request(line)
        except ProtocolError as e:
            self.emit(Error(code=e.code, message=e.message, id=e.id))
            if e.id is not None and e.kind == "generate":
                self.emit(Done(id=e.id, finish_reason="error", text=""))
            return True
        return self.handle(request)

    def handle(self, req: Message) -> bool:
        if isinstance(req, Ping):
            self.emit(Pong())
        elif isinstance(req, Hello):
            self.emit(Ready(protocol=PROTOCOL_VERSION, pid=os.getpid(), backends=sorted(self.backends)))
        elif isinstance(req, Cancel):
            if self.job_id == req.id:
                self.cancel.set()
            else:
                self.emit(Error(code="not_running", message=f"no generation {req.id!r} is running", id=req.id))
        elif isinstance(req, Shutdown):
            self.stop_job()
            return False
        elif self.busy():
            self.reject(req, "busy", "the worker is busy with another request; wait or cancel it")
        elif isinstance(req, Load):
            self.start_job(self.do_load, req)
        elif isinstance(req, Generate):
            if self.backend is None:
                self.reject(req, "not_loaded", "load a model first")
            else:
                self.job_id = req.id
                self.start_job(self.do_generate, req)
        elif isinstance(req, Unload):
            if self.backend is not None:
                self.backend.unload()
                self.backend = None
            self.emit(Unloaded())
        return True

    def reject(self, req: Message, code: str, message: str) -> None:
        """Refuse a request; a refused generate is still closed by its `done`, as every generate is."""
        rid = getattr(req, "id", None)
        self.emit(Error(code=code, message=message, id=rid))
        if isinstance(req, Generate):
            self.emit(Done(id=req.id, finish_reason="error", text=""))

    def busy(self) -> bool:
        return self.running.is_set()

    def start_job(self, fn, req) -> None:
        self.cancel.clear()
        self.running.set()
        self.job = threading.Thread(target=self.run_job, args=(fn, req), daemon=True, name=f"job-{req.type}")
        self.job.start()

    def stop_job(self, timeout: float = 10.0) -> None:
        self.cancel.set()
        if self.job is not None:
            self.job.join(timeout)

    def run_job(self, fn, req) -> None:
        """Run a job; its last events go out only after the worker is free again, so a client that
        answers `done` with a new request never finds the worker busy."""
        final: list[Message] = []
        try:
            fn(req, final)
        finally:
            self.job_id = None
            self.running.clear()
            for event in final:
                self.emit(event)

    # ---- jobs ----

    def do_load(self, req: Load, final: list[Message]) -> None:
        if req.backend not in self.backends:
            final.append(Error(code="unsupported", message=f"the {req.backend!r} backend is not available here"))
            return
        # The model loaded now keeps serving until the new one is ready: a failed load changes nothing.
        backend = self.backends[req.backend]()
        last = [0.0, -1.0]

        def progress(stage: str, fraction: float) -> None:
            now = time.monotonic()
            if fraction >= 1.0 or fraction - last[1] >= 0.02 or now - last[0] >= 0.25:
                last[:] = [now, fraction]
                self.emit(Progress(stage=stage, fraction=round(min(max(fraction, 0.0), 1.0), 4)))

        try:
            info = backend.load(req, progress)
        except BaseException as e:  # noqa: BLE001 - every failure must become an event
            backend.unload()
            final.append(self.error_event(e, None, "load_failed"))
            return
        old, self.backend = self.backend, backend
        if old is not None:
            old.unload()
        final.append(Loaded(model=info))

    def do_generate(self, req: Generate, final: list[Message]) -> None:
        streamed: list[str] = []

        def emit_token(tok: Token) -> None:
            streamed.append(tok.text)
            self.emit(tok)

        try:
            done = self.backend.generate(req, emit_token, self.cancel.is_set)
        except BaseException as e:  # noqa: BLE001
            final.append(self.error_event(e, req.id, "generation_failed"))
            if is_out_of_memory(e) and hasattr(self.backend, "recover_from_oom"):
                self.backend.recover_from_oom()
            # The reply so far is not lost: it comes back with the error's finish reason.
            final.append(Done(id=req.id, finish_reason="error", text="".join(streamed), stats={}))
            return
        final.append(done)

    @staticmethod
    def error_event(e: BaseException, id: str | None, fallback: str) -> Error:
        if isinstance(e, BackendError):
            return Error(code=e.code, message=e.message, id=id)
        if is_out_of_memory(e):
            return Error(code="out_of_memory", message=f"out of memory: {e}", id=id)
        log("".join(traceback.format_exception(e)))
        return Error(code=fallback, message=f"{type(e).__name__}: {e}", id=id)

    # ---- main loop ----

    def serve(self, inp) -> int:
        for line in inp:
            try:
                if not self.handle_line(line):
                    break
            except Exception as e:  # noqa: BLE001 - a bug reached for by one line must not end the service
                log("".join(traceback.format_exception(e)))
                self.emit(Error(code="internal", message=f"internal error: {type(e).__name__}: {e}"))
        self.stop_job()  # stdin closed or shutdown: stop what runs, then exit
        return 0


def protocol_stdout() -> TextIO:
    """A private handle on the real stdout; fd 1 (and sys.stdout) then point at stderr so nothing a
    library prints can corrupt the protocol stream."""
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.stdout = sys.stderr
    return out


def main() -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    worker = Worker(protocol_stdout())
    log("ready for requests")
    try:
        return worker.serve(sys.stdin.buffer)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
