"""The PySide6 desktop app. Never imports torch or llama_cpp."""
