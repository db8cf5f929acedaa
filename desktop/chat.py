"""The chat session: what is shown, what is sent, what is saved. Widgets only display it and call it.

It owns the store and the worker client. The user message is committed before generation starts;
the reply is committed as `streaming` at once, its text every second while it streams, and finally
with its stats and status. The view gets only the text that is new since its last update, at most
10 times a second, so an update costs the same however long the reply already is.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

from PySide6.QtCore import QObject, QTimer, Signal

from desktop.store import Store
from desktop.worker_client import WorkerClient, WorkerState
from engine.paths import BUNDLED_MODEL
from engine.protocol import (Cancel, ChatMessage, Done, Error, Generate, GenerateParams, Load, Loaded, Progress,
                             Speculative, Token)

REPAINT_MS = 100
SAVE_EVERY_S = 1.0
TITLE_CHARS = 40
FINISH_STATUS = {"stop": "complete", "length": "complete", "cancelled": "cancelled", "error": "error"}
MODE_NAMES = {"off": "Speculation off", "mtp": "MTP speculation", "lookup": "Prompt lookup", "draft": "Draft model"}


def auto_title(text: str, taken: list[str] = ()) -> str:
    """A chat's title from its first message: the first words, cut at a word boundary, made distinct
    from the titles already taken (so two chats that start alike still read apart in the sidebar)."""
    words = re.sub(r"\s+", " ", text).strip()
    if len(words) > TITLE_CHARS:
        cut = words[:TITLE_CHARS + 1].rsplit(" ", 1)[0] if " " in words[:TITLE_CHARS + 1] else words[:TITLE_CHARS]
        words = cut.rstrip(" ,.;:-") + "…"
    title, n = words or "New chat", 2
    while title in taken:
        title, n = f"{words} ({n})", n + 1
    return title


def backend_for(path: str) -> str:
    if is_server(path):
        return "remote"
    return "llamacpp" if path.lower().endswith(".gguf") else "native"


def is_server(path: str) -> bool:
    """A model "path" that is an OpenAI-compatible server's URL (the remote backend)."""
    return path.lower().startswith(("http://", "https://"))


RECENT_SERVERS = 8
KEYRING_SERVICE = "moedesk"  # as engine/backends/remote.py reads it: user name = the server's URL


def generated_tokens(stats: dict) -> int:
    """A reply's tokens, a continued one's parts added up."""
    return sum(seg.get("generated_tokens") or 0 for seg in stats.get("segments") or [stats])


def model_name(path: str) -> str:
    if is_server(path):
        return path.split("//", 1)[1].split("/", 1)[0]  # host:port
    return path.rstrip("/\\").replace("\\", "/").split("/")[-1] or path


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
    ignore_eos: bool = False  # not in the settings panel: fixed-length replies for soak tests and timing

    def params(self, speculative: str | None = None) -> GenerateParams:
        mode = speculative or self.speculative
        return GenerateParams(temperature=self.temperature, top_p=self.top_p, max_tokens=self.max_tokens,
                              seed=self.seed, ignore_eos=self.ignore_eos, speculative=Speculative(mode=mode, k=self.k))


@dataclass
class Stream:
    """A reply being generated."""
    request_id: str
    message_id: str | None  # None for comparison runs, which are not chat messages
    prefix: str = ""  # the kept text a continued reply goes on from
    text: str = ""
    accepted: list[tuple[int, int]] = field(default_factory=list)  # char spans from accepted drafts
    earlier_stats: dict | None = None  # a continued reply's stats so far
    started: float = field(default_factory=time.monotonic)
    timeline: list[tuple[float, int]] = field(default_factory=list)  # (seconds, tokens so far)
    pending: list[tuple[str, bool]] = field(default_factory=list)  # (text, from an accepted draft), not shown yet
    saved_at: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.text = self.text or self.prefix

    def add(self, tok: Token) -> None:
        if tok.accepted and tok.text:
            self.accepted.append((len(self.text), len(self.text) + len(tok.text)))
        self.text += tok.text
        self.pending.append((tok.text, tok.accepted))
        self.timeline.append((time.monotonic() - self.started, len(self.timeline) + 1))

    def take_pending(self) -> list[tuple[str, bool]]:
        pieces, self.pending = self.pending, []
        return pieces

    def live_speed(self) -> float | None:
        elapsed = self.timeline[-1][0] - self.timeline[0][0] if len(self.timeline) > 1 else 0
        return (len(self.timeline) - 1) / elapsed if elapsed > 0 else None

    def measured_stats(self) -> dict:
        """What the GUI saw itself, for a reply that never got its `done` (the worker died)."""
        if not self.timeline:
            return {"generated_tokens": 0}
        return {"time_to_first_token_s": round(self.timeline[0][0], 4), "generated_tokens": len(self.timeline),
                "decode_tokens_per_s": self.live_speed(), "measured_by": "gui"}

    def final_stats(self, stats: dict) -> dict:
        """The worker's stats; a continued reply's add up with the earlier part's."""
        stats = dict(stats, accepted_spans=self.accepted)
        if self.earlier_stats is None:
            return stats
        earlier = {k: v for k, v in self.earlier_stats.items() if k not in ("accepted_spans", "segments")}
        segments = [*(self.earlier_stats.get("segments") or [earlier]), {k: v for k, v in stats.items()
                                                                          if k != "accepted_spans"}]
        return dict(stats, generated_tokens=generated_tokens({"segments": segments}), segments=segments,
                    continued=True)


class ChatSession(QObject):
    sig_conversations = Signal()
    """The list of conversations changed."""
    sig_thread = Signal()
    """The shown conversation or its active branch changed: redraw it."""
    sig_stream = Signal(str, object)
    """(message id, [(text, accepted), ...]): a streaming reply grew by these pieces."""
    sig_busy = Signal(bool)
    """A reply started (True) or ended (False)."""
    sig_model = Signal(object)
    """The `loaded` model description (dict), or None when none is loaded."""
    sig_progress = Signal(str, float)
    """Loading progress."""
    sig_notice = Signal(str, str)
    """(level, text): something the user should read: "error", "worker_died", "info"."""
    sig_live_speed = Signal(object)
    """Tokens per second of the reply streaming now; None clears it."""
    sig_status = Signal(str)
    """What the worker is doing, in words: starting, loading a model, generating, ready, crashed."""
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
        self.model_path: str | None = None  # the loaded model's (or, at start, the one to load)
        self.loading: str | None = None  # the model being loaded now; the loaded one serves until it is ready
        self.load_on_ready = False
        self.stream: Stream | None = None
        self.compare_runs: dict | None = None
        self.worker.sig_events.connect(self.on_events)
        self.worker.sig_died.connect(self.on_worker_died)
        self.worker.sig_state.connect(self.on_worker_state)
        self.repaint = QTimer(self)
        self.repaint.setInterval(REPAINT_MS)
        self.repaint.timeout.connect(self.flush_stream)
        # Replies a crash cut off: the window says so and opens the chat it happened in.
        self.reopen = store.streaming_conversation() or store.get_setting("last_conversation")
        self.interrupted_at_start = store.mark_interrupted()

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
        self.emit_status()

    def status_text(self) -> str:
        state = self.worker.state
        if state == WorkerState.CRASHED:
            return "worker stopped unexpectedly"
        if state == WorkerState.STOPPED:
            return "worker stopped"
        if state == WorkerState.STARTING:
            return "starting the worker…"
        if self.loading:
            return f"loading {model_name(self.loading)}…"
        if self.stream is not None:
            return "generating"
        return "ready" if self.model else "no model loaded"

    def emit_status(self) -> None:
        self.sig_status.emit(self.status_text())

    def load_model(self, path: str) -> None:
        """Load `path`; the model loaded now stays loaded (and in use) until the new one is ready."""
        if self.busy():
            self.sig_notice.emit("info", "Wait for the reply to finish (or stop it) before loading a model.")
            return
        backend = backend_for(path)
        quant = self.settings.quant if backend == "native" and self.settings.quant != "none" else None
        # The draft model is loaded beside the main one, so only when its mode is chosen: a bad draft
        # then fails only that mode's load, and switching speculation off loads the model alone.
        wants_draft = backend == "llamacpp" and self.settings.speculative == "draft"
        draft = (self.settings.draft_model or None) if wants_draft else None
        if backend == "remote":  # the server's settings as last connected; the key stays in its variable
            server = next((x for x in self.recent_servers() if x["url"] == path), {"url": path})
            request = Load(backend="remote", url=path, model=server.get("model"),
                           api_key_env=server.get("api_key_env"), api_key_keyring=bool(server.get("api_key_keyring")),
                           allow_insecure=bool(server.get("allow_insecure")))
        else:
            request = Load(path=path, backend=backend, quant=quant, draft=draft)
        if not self.worker.send(request):
            self.sig_notice.emit("error", "The model worker is not running.")
            return
        self.loading = path
        self.emit_status()

    def recent_servers(self) -> list[dict]:
        """Servers connected to before, newest first: url, model, api_key_env (a variable's name, never
        a key), allow_insecure."""
        return list(self.store.get_setting("recent_servers") or [])

    def connect_server(self, url: str, model: str | None = None, api_key_env: str | None = None,
                       allow_insecure: bool = False, api_key_keyring: bool = False, key: str | None = None) -> None:
        """Use the model `model` (None: the server's first) of an OpenAI-compatible server at `url`. The API
        key is read by the worker from the environment variable api_key_env, or from the OS keyring; a
        `key` typed in now goes to the keyring (never to the database)."""
        url = url.strip().rstrip("/")
        if api_key_keyring and key:
            try:
                import keyring
                keyring.set_password(KEYRING_SERVICE, url, key)
            except Exception as e:  # noqa: BLE001 - no keyring backend, a locked keyring
                self.sig_notice.emit("error", f"The API key could not be stored in the OS keyring: {e}")
                return
        entry = {"url": url, "model": model or None, "api_key_env": None if api_key_keyring else api_key_env or None,
                 "api_key_keyring": api_key_keyring, "allow_insecure": allow_insecure}
        rest = [x for x in self.recent_servers() if x["url"] != url]
        self.store.set_setting("recent_servers", [entry] + rest[:RECENT_SERVERS - 1])
        self.load_model(url)

    def restart_worker(self) -> None:
        self.model, self.loading = None, None
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
        self.store.set_setting("last_conversation", self.conversation_id)
        self.sig_conversations.emit()
        self.sig_thread.emit()
        return self.conversation_id

    def open_conversation(self, cid: str) -> None:
        if self.store.conversation(cid) is None:
            return
        self.conversation_id = cid
        self.store.set_setting("last_conversation", cid)
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

    def cannot_send(self) -> str | None:
        """Why a message cannot be sent now (shown to the user), or None."""
        if self.busy():
            return "A reply is still being generated; stop it (Esc) or wait for it to finish."
        if self.worker.state in (WorkerState.CRASHED, WorkerState.STOPPED):
            return "The model worker is not running; restart it first."
        if self.loading:
            return f"{model_name(self.loading)} is still loading; send when it is ready."
        if self.model is None:
            return "No model is loaded yet. Open one with Model → Open model folder… or Open .gguf file…"
        return None

    def refuse(self) -> bool:
        """Tell the user why nothing can be sent now; True if so."""
        why = self.cannot_send()
        if why:
            self.sig_notice.emit("info", why)
        return why is not None

    def send(self, text: str) -> str | None:
        """Commit the user's message, then ask for a reply. Returns the reply's message id, or None
        (nothing stored, the text stays with the caller) when no reply can be generated now."""
        text = text.strip()
        if not text or self.refuse():
            return None
        if self.conversation_id is None:
            self.new_conversation()
        thread = self.thread()
        parent = thread[-1]["id"] if thread else None
        user = self.store.add_message(self.conversation_id, "user", text, parent=parent)
        if not thread:
            taken = [c["title"] for c in self.store.conversations() if c["id"] != self.conversation_id]
            self.store.rename_conversation(self.conversation_id, auto_title(text, taken))
            self.sig_conversations.emit()
        return self.reply_to(user)

    def regenerate(self, assistant_id: str) -> str | None:
        m = self.store.message(assistant_id)
        if not m or not m["parent_id"] or self.refuse():
            return None
        return self.reply_to(m["parent_id"])

    def edit(self, user_id: str, text: str) -> str | None:
        """A new version of a user message (its sibling), then a reply to it; the old branch stays."""
        m = self.store.message(user_id)
        if m is None or not text.strip() or self.refuse():
            return None
        new = self.store.add_message(self.conversation_id, "user", text.strip(), parent=m["parent_id"])
        return self.reply_to(new)

    def can_continue(self, message: dict) -> bool:
        return (message["role"] == "assistant" and message["status"] in ("interrupted", "cancelled", "error")
                and bool(message["content"]))

    def continue_reply(self, assistant_id: str) -> bool:
        """Generate more of a cut-off reply, from its kept text, into the same message."""
        m = self.store.message(assistant_id)
        if m is None or not self.can_continue(m) or self.refuse():
            return False
        history = self.store.thread(assistant_id)  # ends with the partial reply, which the model continues
        self.store.finish_message(assistant_id, m["content"], "streaming", m["stats"])
        self.sig_thread.emit()
        stream = Stream(request_id=f"{assistant_id}-{time.monotonic_ns()}", message_id=assistant_id,
                        prefix=m["content"], accepted=list(map(tuple, m["stats"].get("accepted_spans", []))),
                        earlier_stats=m["stats"])
        params = self.settings.params(self.chat_mode())
        # The rest of the reply's budget: continuing a cut-off reply ends where the whole one would have.
        left = params.max_tokens - generated_tokens(m["stats"])
        params.max_tokens = left if left > 0 else params.max_tokens
        self.begin(stream, history, params, continue_final_message=True)
        return True

    def reply_to(self, user_id: str) -> str | None:
        history = self.store.thread(user_id)
        mid = self.store.add_message(self.conversation_id, "assistant", "", parent=user_id, status="streaming",
                                     model=self.model.get("name"), settings=vars(self.settings))
        self.sig_thread.emit()
        self.begin(Stream(request_id=mid, message_id=mid), history, self.settings.params(self.chat_mode()))
        return mid

    def messages_for(self, history: list[dict]) -> list[ChatMessage]:
        msgs = [ChatMessage(role="system", content=self.settings.system_prompt)] if self.settings.system_prompt else []
        return msgs + [ChatMessage(role=m["role"], content=m["content"]) for m in history]

    def begin(self, stream: Stream, history: list[dict], params: GenerateParams,
              continue_final_message: bool = False) -> None:
        self.stream = stream
        ok = self.worker.send(Generate(id=stream.request_id, messages=self.messages_for(history), params=params,
                                       continue_final_message=continue_final_message))
        if not ok:
            self.end_stream("error", {}, "The model worker is not running.")
            return
        self.repaint.start()
        self.sig_live_speed.emit(None)
        self.sig_busy.emit(True)
        self.emit_status()

    def stop(self) -> None:
        if self.stream is not None:
            self.worker.send(Cancel(id=self.stream.request_id))

    # ---- events ----

    def on_events(self, events: list) -> None:
        for ev in events:
            self.on_event(ev)

    def on_event(self, ev) -> None:
        if isinstance(ev, Token) and self.stream and ev.id == self.stream.request_id:
            self.stream.add(ev)
        elif isinstance(ev, Done) and self.stream and ev.id == self.stream.request_id:
            self.stream.text = self.stream.prefix + ev.text
            self.end_stream(FINISH_STATUS.get(ev.finish_reason, "complete"), ev.stats)
        elif isinstance(ev, Progress):
            self.sig_progress.emit(ev.stage, ev.fraction)
        elif isinstance(ev, Loaded):
            self.model, self.model_path, self.loading = ev.model, self.loading or self.model_path, None
            self.store.set_setting("last_model", self.model_path)
            recent = [p for p in self.store.get_setting("recent_models", []) if p != self.model_path]
            self.store.set_setting("recent_models", [self.model_path, *recent][:8])
            self.sig_model.emit(ev.model)
            self.emit_status()
            runs = self.compare_runs
            if runs is not None and runs.get("phase") == "loading":  # a comparison's second model is ready
                runs["phase"] = None
                runs["labels"][1] = f"{ev.model['name']} · {ev.model['backend']}"
                runs["model"] = f"{runs['labels'][0]} vs {runs['labels'][1]}"
                self.compare_next()
        elif isinstance(ev, Error) and ev.id is None and self.loading:
            if self.compare_runs is not None and self.compare_runs.get("phase") == "loading":
                self.compare_runs = None  # the model in use stays loaded: the comparison ends here
            failed, self.loading = self.loading, None
            still = f" {self.model['name']} stays loaded." if self.model else ""
            self.sig_notice.emit("error", f"Could not load {model_name(failed)}: {ev.message} ({ev.code}).{still}")
            self.sig_model.emit(self.model)  # the picker shows the model still in use
            self.emit_status()
        elif isinstance(ev, Error):
            # For our reply a `done` (finish_reason "error") follows and closes it; the notice says why.
            self.sig_notice.emit("error", f"{ev.message} ({ev.code})")

    def flush_stream(self) -> None:
        s = self.stream
        if s is None or not s.pending:
            return
        pieces = s.take_pending()
        speed = s.live_speed()
        if speed is not None:
            self.sig_live_speed.emit(speed)
        if s.message_id is None:
            return
        self.sig_stream.emit(s.message_id, pieces)
        if time.monotonic() - s.saved_at >= SAVE_EVERY_S:
            self.store.update_content(s.message_id, s.text)
            s.saved_at = time.monotonic()

    def end_stream(self, status: str, stats: dict, notice: str | None = None) -> None:
        self.flush_stream()  # the last pieces too, before the finished message is drawn
        s, self.stream = self.stream, None
        self.repaint.stop()
        if s is None:
            return
        stats = s.final_stats(stats)
        if s.message_id is not None:
            self.store.finish_message(s.message_id, s.text, status, stats)
            self.store.touch(self.conversation_id)
            self.sig_thread.emit()
        if stats.get("expert_load"):
            self.sig_expert_load.emit(stats["expert_load"])
        self.sig_busy.emit(False)
        self.emit_status()
        if notice:
            self.sig_notice.emit("error", notice)
        if self.compare_runs is not None:
            self.compare_step(s, stats)

    def on_worker_died(self, text: str) -> None:
        self.model, self.loading = None, None
        self.sig_model.emit(None)
        if self.stream is not None:
            self.compare_runs = None
            self.end_stream("interrupted", self.stream.measured_stats())
        self.sig_live_speed.emit(None)
        self.sig_notice.emit("worker_died", text)
        self.emit_status()

    # ---- speed comparison ----

    def compare_mode(self) -> str | None:
        """The speculation the comparison measures: the chosen one, else the model's first."""
        modes = [m for m in self.speculative_modes() if m != "off"]
        if self.settings.speculative in modes:
            return self.settings.speculative
        usable = [m for m in modes if m != "draft" or self.model.get("draft")]  # a draft must be loaded
        return usable[0] if usable else None

    def last_prompt(self) -> str | None:
        """The open chat's last user message: what a comparison runs when given no prompt."""
        users = [m for m in self.thread() if m["role"] == "user"]
        return users[-1]["content"] if users else None

    def compare(self, prompt: str | None = None) -> bool:
        """Run the prompt twice with the same seed and settings, speculation off then on."""
        if self.cannot_send() or self.compare_mode() is None:
            return False
        prompt = prompt if prompt is not None else self.last_prompt()
        if prompt is None:
            return False
        self.compare_runs = {"prompt": prompt, "model": self.model.get("name"), "settings": vars(self.settings),
                             "on_mode": self.compare_mode(), "runs": {}}
        self.compare_next()
        return True

    def compare_models(self, other: str, prompt: str | None = None) -> bool:
        """The prompt on the loaded model, then on `other` (a model folder, a .gguf or a server's URL), side
        by side: `other` is loaded for its run (each with its own speculation setting) and the model in
        use now is loaded back afterwards."""
        if self.cannot_send() or not other or other == self.model_path:
            return False
        prompt = prompt if prompt is not None else self.last_prompt()
        if prompt is None:
            return False
        first = f"{self.model['name']} · {self.model['backend']}"
        self.compare_runs = {"kind": "models", "prompt": prompt, "paths": [self.model_path, other],
                             "labels": [first, model_name(other)], "model": f"{first} vs {model_name(other)}",
                             "settings": vars(self.settings), "runs": {}}
        self.compare_next()
        return True

    def compare_next(self) -> None:
        run = "off" if "off" not in self.compare_runs["runs"] else "on"
        if self.compare_runs.get("kind") == "models":  # each model with the speculation chosen for it
            mode = self.chat_mode()
            self.compare_runs["run"], self.compare_runs["mode"] = run, mode
            history = [{"role": "user", "content": self.compare_runs["prompt"]}]
            self.begin(Stream(request_id=f"compare-{run}-{time.monotonic_ns()}", message_id=None), history,
                       self.settings.params(speculative=mode))
            return
        mode = "off" if run == "off" else self.compare_runs["on_mode"]
        rid = f"compare-{mode}-{time.monotonic_ns()}"
        self.compare_runs["run"] = run
        history = [{"role": "user", "content": self.compare_runs["prompt"]}]
        self.begin(Stream(request_id=rid, message_id=None), history, self.settings.params(speculative=mode))

    def compare_step(self, stream: Stream, stats: dict) -> None:
        runs = self.compare_runs
        across = runs.get("kind") == "models"
        mode = runs["mode"] if across else "off" if runs["run"] == "off" else runs["on_mode"]
        runs["runs"][runs["run"]] = {"text": stream.text, "stats": stats, "timeline": stream.timeline, "mode": mode}
        if across:
            runs["runs"][runs["run"]]["label"] = runs["labels"][0 if runs["run"] == "off" else 1]
        if len(runs["runs"]) < 2:
            if across:  # the second model loads; its `loaded` starts its run
                runs["phase"] = "loading"
                self.load_model(runs["paths"][1])
            else:
                self.compare_next()
            return
        self.compare_runs = None
        if across:
            self.load_model(runs["paths"][0])  # back to the model in use before the comparison
        off, on = runs["runs"]["off"], runs["runs"]["on"]
        cid = self.store.add_comparison(self.conversation_id, runs["prompt"], runs["model"], runs["settings"], off, on)
        self.sig_compare.emit(self.store.comparisons()[-1] | {"id": cid})
