"""The chat session: what is shown, what is sent, what is saved. Widgets only display it and call it.

It owns the store and the worker client. The user message is committed before generation starts;
the reply is committed as `streaming` at once, its text every second while it streams, and finally
with its stats and status. Repaints are batched to at most ~30 per second.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from PySide6.QtCore import QObject, QTimer, Signal

from desktop.store import Store
from desktop.worker_client import WorkerClient, WorkerState
from engine.paths import BUNDLED_MODEL
from engine.protocol import (Cancel, ChatMessage, Done, Error, Generate, GenerateParams, Load, Loaded, Progress,
                             Speculative, Token)

REPAINT_MS = 33
SAVE_EVERY_S = 1.0
FINISH_STATUS = {"stop": "complete", "length": "complete", "cancelled": "cancelled", "error": "error"}
MODE_NAMES = {"off": "Speculation off", "mtp": "MTP speculation", "lookup": "Prompt lookup", "draft": "Draft model"}


def backend_for(path: str) -> str:
    return "llamacpp" if path.lower().endswith(".gguf") else "native"


def speculative_modes(model: dict | None) -> list[str]:
    """The speculation modes the loaded model offers, as its backend reports them in `loaded`."""
    if not model:
        return ["off"]
    modes = list(model.get("speculative_modes") or ["off"])
    if model.get("backend") == "llamacpp" and "draft" not in modes:
        modes.append("draft")  # offered before a draft is chosen: choosing one reloads with it
    return modes


@dataclass
class Settings:
    system_prompt: str = ""
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 256
    seed: int = 0
    speculative: str = "mtp"  # "off" | "mtp" (native) | "lookup" | "draft" (GGUF models)
    k: int | str = "auto"
    draft_model: str = ""  # a second, smaller .gguf with the same vocabulary, for speculative mode "draft"
    color_accepted: bool = True
    quant: str = "none"  # weights of native models: "none" | "int8" | "int4" (quantized while loading)

    def params(self, speculative: str | None = None) -> GenerateParams:
        mode = speculative or self.speculative
        return GenerateParams(temperature=self.temperature, top_p=self.top_p, max_tokens=self.max_tokens,
                              seed=self.seed, speculative=Speculative(mode=mode, k=self.k))


@dataclass
class Stream:
    """A reply being generated."""
    request_id: str
    message_id: str | None  # None for comparison runs, which are not chat messages
    text: str = ""
    accepted: list[tuple[int, int]] = field(default_factory=list)  # char spans from accepted drafts
    started: float = field(default_factory=time.monotonic)
    timeline: list[tuple[float, int]] = field(default_factory=list)  # (seconds, tokens so far)
    saved_at: float = field(default_factory=time.monotonic)
    dirty: bool = False

    def add(self, tok: Token) -> None:
        if tok.accepted and tok.text:
            self.accepted.append((len(self.text), len(self.text) + len(tok.text)))
        self.text += tok.text
        self.timeline.append((time.monotonic() - self.started, len(self.timeline) + 1))
        self.dirty = True


class ChatSession(QObject):
    sig_conversations = Signal()
    """The list of conversations changed."""
    sig_thread = Signal()
    """The shown conversation or its active branch changed: redraw it."""
    sig_stream = Signal(str, str, object)
    """(message id, text so far, accepted spans): a streaming reply grew."""
    sig_busy = Signal(bool)
    """A reply started (True) or ended (False)."""
    sig_model = Signal(object)
    """The `loaded` model description (dict), or None when none is loaded."""
    sig_progress = Signal(str, float)
    """Loading progress."""
    sig_notice = Signal(str, str)
    """(level, text): something the user should read: "error", "worker_died", "info"."""
    sig_live_speed = Signal(float)
    """Tokens per second of the reply streaming now."""
    sig_compare = Signal(object)
    """A finished comparison (dict with off/on runs, speedup, identical)."""
    sig_expert_load = Signal(object)
    """Expert load per layer of the last reply."""

    def __init__(self, store: Store, worker: WorkerClient | None = None, parent: QObject | None = None):
        super().__init__(parent)
        self.store = store
        self.worker = worker or WorkerClient(self)
        self.settings = Settings(**{k: v for k, v in (store.get_setting("generation") or {}).items()
                                    if k in Settings.__dataclass_fields__})
        self.conversation_id: str | None = None
        self.model: dict | None = None
        self.model_path: str | None = None
        self.load_on_ready = False
        self.stream: Stream | None = None
        self.compare_runs: dict | None = None
        self.worker.sig_event.connect(self.on_event)
        self.worker.sig_died.connect(self.on_worker_died)
        self.worker.sig_state.connect(self.on_worker_state)
        self.repaint = QTimer(self)
        self.repaint.setInterval(REPAINT_MS)
        self.repaint.timeout.connect(self.flush_stream)
        self.interrupted_at_start = store.mark_interrupted()  # replies a crash cut off; the window says so

    # ---- worker and model ----

    def start(self, model_path: str | None = None) -> None:
        """Start the worker; once it is ready, load the given, last-used or bundled model."""
        self.model_path = model_path or self.store.get_setting("last_model") or str(BUNDLED_MODEL)
        self.load_on_ready = True
        self.worker.start()

    def on_worker_state(self, state: WorkerState) -> None:
        if state == WorkerState.READY and self.load_on_ready and self.model_path:
            self.load_on_ready = False
            self.load_model(self.model_path)

    def load_model(self, path: str) -> None:
        self.model_path = path
        self.model = None
        self.sig_model.emit(None)
        backend = backend_for(path)
        quant = self.settings.quant if backend == "native" and self.settings.quant != "none" else None
        # The draft model is loaded beside the main one, so only when its mode is chosen: a bad draft
        # then fails only that mode's load, and switching speculation off loads the model alone.
        wants_draft = backend == "llamacpp" and self.settings.speculative == "draft"
        draft = (self.settings.draft_model or None) if wants_draft else None
        if not self.worker.send(Load(path=path, backend=backend, quant=quant, draft=draft)):
            self.sig_notice.emit("error", "The model worker is not running.")

    def restart_worker(self) -> None:
        self.model = None
        self.sig_model.emit(None)
        self.load_on_ready = True
        self.worker.restart()

    def needs_reload(self, old: Settings) -> bool:
        """Settings that are applied while loading: weight quantization (native), the draft model (GGUF)."""
        if not self.model_path or self.busy():
            return False
        if backend_for(self.model_path) == "native":
            return old.quant != self.settings.quant
        uses_draft = lambda s: s.draft_model if s.speculative == "draft" else ""  # noqa: E731
        return uses_draft(old) != uses_draft(self.settings)

    def speculative_modes(self) -> list[str]:
        return speculative_modes(self.model)

    def chat_mode(self) -> str:
        """The chosen speculation where the loaded model offers it (a GGUF has no MTP), else off."""
        mode = self.settings.speculative
        if mode == "draft" and not (self.model or {}).get("draft"):
            return "off"
        return mode if mode in self.speculative_modes() else "off"

    def save_settings(self) -> None:
        self.store.set_setting("generation", vars(self.settings))

    # ---- conversations ----

    def new_conversation(self) -> str:
        self.conversation_id = self.store.create_conversation()
        self.sig_conversations.emit()
        self.sig_thread.emit()
        return self.conversation_id

    def open_conversation(self, cid: str) -> None:
        self.conversation_id = cid
        self.sig_thread.emit()

    def delete_conversation(self, cid: str) -> None:
        self.store.delete_conversation(cid)
        if cid == self.conversation_id:
            self.conversation_id = None
        self.sig_conversations.emit()
        self.sig_thread.emit()

    def rename_conversation(self, cid: str, title: str) -> None:
        self.store.rename_conversation(cid, title)
        self.sig_conversations.emit()

    def thread(self) -> list[dict]:
        return self.store.active_thread(self.conversation_id) if self.conversation_id else []

    def versions(self, mid: str) -> tuple[int, int]:
        """(index, count) of a message among its versions."""
        sib = self.store.siblings(mid)
        return next(i for i, m in enumerate(sib) if m["id"] == mid), len(sib)

    def switch_version(self, mid: str, step: int) -> None:
        sib = self.store.siblings(mid)
        i = next(i for i, m in enumerate(sib) if m["id"] == mid) + step
        if 0 <= i < len(sib) and not self.stream:
            self.store.set_active_leaf(self.conversation_id, self.store.deepest_leaf(sib[i]["id"]))
            self.sig_thread.emit()

    # ---- sending ----

    def busy(self) -> bool:
        return self.stream is not None

    def can_send(self) -> bool:
        return self.model is not None and not self.busy() and self.worker.state == WorkerState.READY

    def send(self, text: str) -> str | None:
        """Commit the user's message, then ask for a reply. Returns the reply's message id."""
        text = text.strip()
        if not text or self.busy():
            return None
        if self.conversation_id is None:
            self.new_conversation()
        thread = self.thread()
        parent = thread[-1]["id"] if thread else None
        user = self.store.add_message(self.conversation_id, "user", text, parent=parent)
        if not thread:
            self.store.rename_conversation(self.conversation_id, text[:48])
            self.sig_conversations.emit()
        return self.reply_to(user)

    def regenerate(self, assistant_id: str) -> str | None:
        m = self.store.message(assistant_id)
        return self.reply_to(m["parent_id"]) if m and m["parent_id"] and not self.busy() else None

    def edit(self, user_id: str, text: str) -> str | None:
        """A new version of a user message (its sibling), then a reply to it; the old branch stays."""
        m = self.store.message(user_id)
        if m is None or self.busy() or not text.strip():
            return None
        new = self.store.add_message(self.conversation_id, "user", text.strip(), parent=m["parent_id"])
        return self.reply_to(new)

    def reply_to(self, user_id: str) -> str | None:
        if self.model is None:
            self.sig_notice.emit("error", "No model is loaded yet.")
            self.sig_thread.emit()
            return None
        history = self.store.thread(user_id)
        mid = self.store.add_message(self.conversation_id, "assistant", "", parent=user_id, status="streaming",
                                     model=self.model.get("name"), settings=vars(self.settings))
        self.sig_thread.emit()
        self.begin(Stream(request_id=mid, message_id=mid), history, self.settings.params(self.chat_mode()))
        return mid

    def messages_for(self, history: list[dict]) -> list[ChatMessage]:
        msgs = [ChatMessage(role="system", content=self.settings.system_prompt)] if self.settings.system_prompt else []
        return msgs + [ChatMessage(role=m["role"], content=m["content"]) for m in history]

    def begin(self, stream: Stream, history: list[dict], params: GenerateParams) -> None:
        self.stream = stream
        ok = self.worker.send(Generate(id=stream.request_id, messages=self.messages_for(history), params=params))
        if not ok:
            self.end_stream("error", {}, "The model worker is not running.")
            return
        self.repaint.start()
        self.sig_busy.emit(True)

    def stop(self) -> None:
        if self.stream is not None:
            self.worker.send(Cancel(id=self.stream.request_id))

    # ---- events ----

    def on_event(self, ev) -> None:
        if isinstance(ev, Token) and self.stream and ev.id == self.stream.request_id:
            self.stream.add(ev)
        elif isinstance(ev, Done) and self.stream and ev.id == self.stream.request_id:
            self.stream.text = ev.text
            self.end_stream(FINISH_STATUS.get(ev.finish_reason, "complete"), ev.stats)
        elif isinstance(ev, Progress):
            self.sig_progress.emit(ev.stage, ev.fraction)
        elif isinstance(ev, Loaded):
            self.model = ev.model
            self.store.set_setting("last_model", self.model_path)
            recent = [p for p in self.store.get_setting("recent_models", []) if p != self.model_path]
            self.store.set_setting("recent_models", [self.model_path, *recent][:8])
            self.sig_model.emit(ev.model)
        elif isinstance(ev, Error):
            # For our reply a `done` (finish_reason "error") follows and closes it; the notice says why.
            self.sig_notice.emit("error", f"{ev.message} ({ev.code})")

    def flush_stream(self) -> None:
        s = self.stream
        if s is None or not s.dirty:
            return
        s.dirty = False
        elapsed = s.timeline[-1][0] - s.timeline[0][0] if len(s.timeline) > 1 else 0
        if elapsed > 0:
            self.sig_live_speed.emit((len(s.timeline) - 1) / elapsed)
        if s.message_id is None:
            return
        self.sig_stream.emit(s.message_id, s.text, list(s.accepted))
        if time.monotonic() - s.saved_at >= SAVE_EVERY_S:
            self.store.update_content(s.message_id, s.text)
            s.saved_at = time.monotonic()

    def end_stream(self, status: str, stats: dict, notice: str | None = None) -> None:
        s, self.stream = self.stream, None
        self.repaint.stop()
        if s is None:
            return
        stats = dict(stats, accepted_spans=s.accepted)
        if s.message_id is not None:
            self.store.finish_message(s.message_id, s.text, status, stats)
            self.store.touch(self.conversation_id)
            self.sig_stream.emit(s.message_id, s.text, list(s.accepted))
            self.sig_thread.emit()
        if stats.get("expert_load"):
            self.sig_expert_load.emit(stats["expert_load"])
        self.sig_busy.emit(False)
        if notice:
            self.sig_notice.emit("error", notice)
        if self.compare_runs is not None:
            self.compare_step(s, stats)

    def on_worker_died(self, text: str) -> None:
        self.model = None
        self.sig_model.emit(None)
        if self.stream is not None:
            self.compare_runs = None
            self.end_stream("interrupted", {})
        self.sig_notice.emit("worker_died", text)

    # ---- speed comparison ----

    def compare_mode(self) -> str | None:
        """The speculation the comparison measures: the chosen one, else the model's first."""
        modes = [m for m in self.speculative_modes() if m != "off"]
        if self.settings.speculative in modes:
            return self.settings.speculative
        usable = [m for m in modes if m != "draft" or self.model.get("draft")]  # a draft must be loaded
        return usable[0] if usable else None

    def compare(self, prompt: str | None = None) -> bool:
        """Run the prompt twice with the same seed and settings, speculation off then on."""
        if self.busy() or self.model is None or self.compare_mode() is None:
            return False
        if prompt is None:
            users = [m for m in self.thread() if m["role"] == "user"]
            if not users:
                return False
            prompt = users[-1]["content"]
        self.compare_runs = {"prompt": prompt, "model": self.model.get("name"), "settings": vars(self.settings),
                             "on_mode": self.compare_mode(), "runs": {}}
        self.compare_next()
        return True

    def compare_next(self) -> None:
        run = "off" if "off" not in self.compare_runs["runs"] else "on"
        mode = "off" if run == "off" else self.compare_runs["on_mode"]
        rid = f"compare-{mode}-{time.monotonic_ns()}"
        self.compare_runs["run"] = run
        history = [{"role": "user", "content": self.compare_runs["prompt"]}]
        self.begin(Stream(request_id=rid, message_id=None), history, self.settings.params(speculative=mode))

    def compare_step(self, stream: Stream, stats: dict) -> None:
        runs = self.compare_runs
        mode = "off" if runs["run"] == "off" else runs["on_mode"]
        runs["runs"][runs["run"]] = {"text": stream.text, "stats": stats, "timeline": stream.timeline, "mode": mode}
        if len(runs["runs"]) < 2:
            self.compare_next()
            return
        self.compare_runs = None
        off, on = runs["runs"]["off"], runs["runs"]["on"]
        cid = self.store.add_comparison(self.conversation_id, runs["prompt"], runs["model"], runs["settings"], off, on)
        self.sig_compare.emit(self.store.comparisons()[-1] | {"id": cid})
