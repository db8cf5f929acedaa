"""A plain-Python client for the worker: starts `python -m engine.worker`, sends requests, yields events.

Tests and command-line tools use it; the GUI speaks the same protocol through QProcess. A dead worker
(killed, crashed, out of memory) shows up as an `error` event with code `worker_died`, carrying the
exit status and the last lines the worker wrote to stderr, as soon as its stdout closes.
"""
from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
from collections import deque
from typing import Iterator

from engine.paths import ROOT
from engine.protocol import Error, Hello, Message, ProtocolError, Ready, parse_event



class WorkerDied(Exception):
    pass


class WorkerClient:
    def __init__(self, python: str = sys.executable, env: dict | None = None):
        self.python = python
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.events: queue.Queue[Message] = queue.Queue()
        self.stderr_tail: deque[str] = deque(maxlen=50)

    # ---- lifecycle ----

    def start(self, timeout: float = 60.0) -> Ready:
        env = dict(os.environ if self.env is None else self.env, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
        self.events = queue.Queue()
        self.proc = subprocess.Popen([self.python, "-m", "engine.worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env=env)
        threading.Thread(target=self._read_stdout, args=(self.proc,), daemon=True).start()
        threading.Thread(target=self._read_stderr, args=(self.proc,), daemon=True).start()
        self.send(Hello())
        ready = self.wait_for("ready", timeout)
        if not isinstance(ready, Ready):
            raise WorkerDied(getattr(ready, "message", "the worker did not start"))
        return ready

    def restart(self, timeout: float = 60.0) -> Ready:
        self.close()
        return self.start(timeout)

    def close(self, timeout: float = 5.0) -> None:
        proc = self.proc
        if proc is None:
            return
        try:
            if proc.poll() is None and proc.stdin:
                proc.stdin.close()  # EOF: the worker exits cleanly
            proc.wait(timeout)
        except (subprocess.TimeoutExpired, OSError):
            proc.kill()
            proc.wait()
        self.proc = None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # ---- pipes ----

    def _read_stdout(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            try:
                self.events.put(parse_event(line))
            except ProtocolError as e:
                self.events.put(Error(code="bad_event", message=f"unreadable line from the worker: {e.message}"))
        status = proc.wait()
        tail = "".join(self.stderr_tail).strip().splitlines()[-5:]
        self.events.put(Error(code="worker_died", message=f"the worker exited with status {status}"
                              + (": " + " | ".join(tail) if tail and status else "")))

    def _read_stderr(self, proc: subprocess.Popen) -> None:
        for line in proc.stderr:
            self.stderr_tail.append(line.decode("utf-8", "replace"))

    def send(self, request: Message | dict | str) -> None:
        if self.proc is None or self.proc.stdin is None:
            raise WorkerDied("the worker is not running")
        if isinstance(request, Message):
            line = request.to_json()
        elif isinstance(request, dict):
            import json
            line = json.dumps(request)
        else:
            line = request
        try:
            self.proc.stdin.write(line.encode("utf-8") + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as e:
            raise WorkerDied(f"the worker is gone ({e})") from e

    # ---- events ----

    def next_event(self, timeout: float | None = None) -> Message:
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no event from the worker within {timeout}s") from None

    def iter_events(self, timeout: float = 60.0) -> Iterator[Message]:
        """Events until the worker dies; each wait is at most `timeout` seconds."""
        while True:
            ev = self.next_event(timeout)
            yield ev
            if isinstance(ev, Error) and ev.code == "worker_died":
                return

    def wait_for(self, kind: str, timeout: float = 60.0, collect: list | None = None) -> Message:
        """The next event of type `kind`, or the first `error` event (the worker's death included)."""
        deadline = time.monotonic() + timeout
        while True:
            ev = self.next_event(max(0.0, deadline - time.monotonic()))
            if collect is not None:
                collect.append(ev)
            if ev.type == kind or isinstance(ev, Error):
                return ev
