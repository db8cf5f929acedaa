"""`python -m desktop [--model PATH] [--screenshot FILE]`: the moedesk window."""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path


def sample_conversation(store) -> str:
    """A short chat for the screenshot of an empty database (written to a throwaway database)."""
    store.create_conversation("Explain asyncio.gather")
    cid = store.create_conversation("What does json.dumps do?")
    u = store.add_message(cid, "user", "What does `json.dumps` do?")
    text = ("`json.dumps(obj, *, skipkeys=False, ensure_ascii=True, indent=None, ...)`\n\n"
            "Serialize ``obj`` to a JSON formatted ``str``.\n\n```python\nimport json\n"
            "print(json.dumps({\"a\": 1}, indent=2))  # pretty-printed\n```")
    a = store.add_message(cid, "assistant", "", parent=u, model="moedesk-mini")
    store.finish_message(a, text, "complete", {"time_to_first_token_s": 0.04, "decode_tokens_per_s": 61.3,
                                               "generated_tokens": 58, "acceptance_rate": 0.71,
                                               "mean_accepted_length": 2.4})
    return cid


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m desktop", description="moedesk")
    parser.add_argument("--model", default=None, help="model folder or .gguf file to load")
    parser.add_argument("--screenshot", default=None, help="render the main window to this PNG and exit")
    parser.add_argument("--theme", choices=("system", "light", "dark"), default=None,
                        help="colours (default: the saved choice, else the system's)")
    args = parser.parse_args(argv)

    from PySide6.QtWidgets import QApplication, QMessageBox

    from desktop.qt_binding import immortal_singletons, problem, refcount_probe

    app = QApplication(sys.argv[:1])
    app.setApplicationName("moedesk")
    why = problem(None if immortal_singletons() else refcount_probe(20))  # a short probe: ~200 Qt calls
    if why:
        print(why, file=sys.stderr, flush=True)
        if not args.screenshot:
            QMessageBox.critical(None, "moedesk cannot start", why)
        os._exit(3)  # not sys.exit: finalizing with the broken counts would abort after the message

    from desktop.chat import ChatSession
    from desktop.main_window import MainWindow
    from desktop.store import Store
    from desktop.theme import apply_theme

    store = Store()
    apply_theme(app, args.theme or store.get_setting("theme", "system"))
    app.styleHints().colorSchemeChanged.connect(  # "system" follows the desktop when it switches
        lambda _: args.theme is None and store.get_setting("theme", "system") == "system" and apply_theme(app, "system"))
    if args.screenshot:
        if store.conversations():
            show = store.conversations()[0]["id"]
        else:  # show a sample, without writing it into the user's database
            store = Store(Path(tempfile.mkdtemp()) / "sample.db")
            show = sample_conversation(store)
        session = ChatSession(store)
        window = MainWindow(session)
        window.resize(1240, 780)
        session.open_conversation(show)
        window.show()
        for _ in range(20):
            app.processEvents()
        ok = window.grab().save(args.screenshot)
        print(args.screenshot if ok else "could not write the screenshot", file=sys.stderr)
        return 0 if ok else 1
    session = ChatSession(store)
    window = MainWindow(session)
    window.show()
    session.start(args.model)
    return app.exec()


if __name__ == "__main__":
    sys.exit(main())
