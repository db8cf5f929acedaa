"""Exporting a model folder to other runtimes' formats (GGUF for llama.cpp)."""
from engine.export.gguf import ExportError, export_gguf

__all__ = ["ExportError", "export_gguf"]
