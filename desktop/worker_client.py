"""The worker process seen from the GUI: a QProcess speaking engine.protocol, as a small state machine.

States: stopped → starting → ready ⇄ busy (loading or generating); any of them → crashed when the
process exits unexpectedly or fails to start (QProcess never emits `finished` for FailedToStart).
The crash text (exit status and the worker's last stderr lines) is kept for the GUI to show.
"""
from __future__ import annotations

import enum
import os
import sys
from collections import deque

from PySide6.QtCore import QObject, QProcess, QProcessEnvironment, QTimer, Signal

from engine.paths import ROOT
from engine.protocol import Error, Hello, Message, ProtocolError, parse_event

HEARTBEAT_MS = 3000
HEARTBEAT_MISSES = 4  # pings unanswered while the worker is alive: shown as unresponsive
# The worker answers pings from its main thread while a job runs (decode steps, loads), so a worker
# silent this long is hung, not busy: it is killed and reported like a crash. MOEDESK_WORKER_HUNG_S
# overrides it (a machine slow enough that one step of a big model takes longer).
HUNG_S = float(os.environ.get("MOEDESK_WORKER_HUNG_S", "30"))
READ_MS = 15  # the worker's output is read at most this often


class WorkerState(enum.Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    BUSY = "busy"
    CRASHED = "crashed"


class WorkerClient(QObject):
    sig_events = Signal(object)
    """Events (engine.protocol messages) from the worker, in order: all that one read found (one signal
    per read, not per streamed token)."""
    sig_state = Signal(object)
    """The WorkerState changed."""
    sig_died = Signal(str)
    """The worker exited unexpectedly or could not start; the text says why."""

    def __init__(self, parent: QObject | None = None, python: str = sys.executable, hung_after_s: float = HUNG_S):
        super().__init__(parent)
        self.python, self.hung_after_s = python, hung_after_s
        self.proc: QProcess | None = None
        self.state = WorkerState.STOPPED
        self.crash_text = ""
        self.stderr_tail: deque[str] = deque(maxlen=40)
        self._buffer = b""
        self._expect_exit = False
        self._missed = 0
        self.heartbeat = QTimer(self)
        self.heartbeat.setInterval(HEARTBEAT_MS)
        self.heartbeat.timeout.connect(self._ping)
        # Output is read at most every READ_MS: a worker streaming hundreds of tokens a second would
        # otherwise wake the GUI for every one of them, and its CPU time is taken from the model.
        self.reader = QTimer(self)
        self.reader.setSingleShot(True)
        self.reader.setInterval(READ_MS)
        self.reader.timeout.connect(self._read_stdout)

    # ---- lifecycle ----

    def start(self) -> None:
        if self.proc is not None and self.proc.state() != QProcess.NotRunning:
            return
        self.crash_text, self._buffer, self._expect_exit, self._missed = "", b"", False, 0
        self.stderr_tail.clear()  # a crash report shows this worker's last lines, not an earlier one's
        proc = QProcess(self)
        env = QProcessEnvironment.systemEnvironment()
        env.insert("HF_HUB_OFFLINE", "1")
        env.insert("PYTHONUNBUFFERED", "1")
        proc.setProcessEnvironment(env)
        proc.setWorkingDirectory(str(ROOT))
        proc.readyReadStandardOutput.connect(lambda: self.reader.isActive() or self.reader.start())
        proc.readyReadStandardError.connect(self._read_stderr)
        proc.finished.connect(self._finished)
        proc.errorOccurred.connect(self._error)
        self.proc = proc
        self._set_state(WorkerState.STARTING)
        proc.start(self.python, ["-m", "engine.worker"])
        self.send(Hello())
        self.heartbeat.start()

    def stop(self, wait_ms: int = 3000) -> None:
        """Ask the worker to exit (close its stdin); kill it if it does not."""
        self.heartbeat.stop()
        proc = self.proc
        if proc is None:
            return
        self._expect_exit = True
        if proc.state() != QProcess.NotRunning:
            proc.closeWriteChannel()
            if not proc.waitForFinished(wait_ms):
                proc.kill()
                proc.waitForFinished(1000)
        self.proc = None
        self._set_state(WorkerState.STOPPED)

    def restart(self) -> None:
        self.stop()
        self.start()

    def pid(self) -> int | None:
        return int(self.proc.processId()) if self.proc is not None and self.proc.processId() else None

    # ---- requests ----

    def send(self, request: Message) -> bool:
        if self.proc is None or self.state in (WorkerState.STOPPED, WorkerState.CRASHED):
            return False
        self.proc.write((request.to_json() + "\n").encode("utf-8"))
        if request.type in ("load", "generate"):
            self._set_state(WorkerState.BUSY)
        return True

    def _ping(self) -> None:
        if self.state in (WorkerState.READY, WorkerState.BUSY) and self.proc is not None:
            if self._missed * self.heartbeat.interval() >= self.hung_after_s * 1000:
                return self._hung()
            self._missed += 1
            self.proc.write(b'{"type": "ping"}\n')

    def _hung(self) -> None:
        """Unanswered pings for hung_after_s: the worker is killed and reported like a crash, so the GUI
        keeps the partial reply and offers a restart."""
        self.heartbeat.stop()
        self._expect_exit = True  # its exit is ours, not a second crash report
        seconds = self._missed * self.heartbeat.interval() / 1000
        if self.proc is not None:
            self.proc.kill()
        self._died(f"The model worker stopped answering for {seconds:.0f} s (hung) and was stopped.")

    # ---- process output ----

    def _read_stdout(self) -> None:
        if self.proc is None:
            return
        self._buffer += bytes(self.proc.readAllStandardOutput())
        *lines, self._buffer = self._buffer.split(b"\n")
        events = []
        for line in lines:
            if not line.strip():
                continue
            try:
                event = parse_event(line)
            except ProtocolError as e:
                event = Error(code="bad_event", message=f"unreadable line from the worker: {e.message}")
            if self._on_event(event):
                events.append(event)
        if events:
            self.sig_events.emit(events)

    def _on_event(self, event: Message) -> bool:
        """The client's own bookkeeping of an event; False for those the GUI never sees (pong)."""
        if event.type == "pong":
            self._missed = 0
            return False
        if event.type == "ready":
            self._set_state(WorkerState.READY)
        elif event.type in ("loaded", "done", "unloaded") or (event.type == "error" and event.code != "busy"):
            if self.state == WorkerState.BUSY:
                self._set_state(WorkerState.READY)
        return True

    def _read_stderr(self) -> None:
        text = bytes(self.proc.readAllStandardError()).decode("utf-8", "replace")
        for line in text.splitlines():
            self.stderr_tail.append(line)

    def _finished(self, code: int, status) -> None:
        self.heartbeat.stop()
        self._read_stdout()  # what the worker wrote before it went (a reply's last tokens, its done)
        if self._expect_exit:
            return
        how = "was killed" if status == QProcess.CrashExit else f"exited with status {code}"
        self._died(f"The model worker {how}.")

    def _error(self, error) -> None:
        if error == QProcess.FailedToStart:  # `finished` never comes in this case
            self._died(f"The model worker could not start ({self.python} -m engine.worker).")

    def _died(self, headline: str) -> None:
        tail = [l for l in self.stderr_tail if l.strip()][-6:]
        self.crash_text = headline + ("\n" + "\n".join(tail) if tail else "")
        self._set_state(WorkerState.CRASHED)
        self.sig_died.emit(self.crash_text)

    def responsive(self) -> bool:
        return self._missed < HEARTBEAT_MISSES

    def _set_state(self, state: WorkerState) -> None:
        if state != self.state:
            self.state = state
            self.sig_state.emit(state)
