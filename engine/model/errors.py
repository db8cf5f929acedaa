"""The one exception a bad model file raises, naming the file, the tensor and the reason."""
from __future__ import annotations


class ModelLoadError(Exception):
    def __init__(self, file: str, tensor: str | None, reason: str):
        self.file, self.tensor, self.reason = file, tensor, reason
        where = f"{file}" + (f" [{tensor}]" if tensor else "")
        super().__init__(f"{where}: {reason}")
