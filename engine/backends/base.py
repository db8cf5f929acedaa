"""The interface every backend implements; the worker drives it and knows nothing else about models."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable

from engine.protocol import Done, Generate, Load, Token

ProgressFn = Callable[[str, float], None]
EmitFn = Callable[[Token], None]


class BackendError(Exception):
    """A failure the user can act on, with a stable protocol error code."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


class Backend(ABC):
    name: str

    @abstractmethod
    def load(self, request: Load, progress: ProgressFn) -> dict:
        """Load the model; return what `loaded` reports (name, device, parameters, memory, ...)."""

    @abstractmethod
    def generate(self, request: Generate, emit: EmitFn, cancelled: Callable[[], bool]) -> Done:
        """Stream `token` events through `emit`; check `cancelled` between decode steps; return `done`."""

    @abstractmethod
    def unload(self) -> None:
        """Free the model's memory."""

    @abstractmethod
    def info(self) -> dict:
        """The `loaded` description of the current model."""
