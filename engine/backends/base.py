"""The interface every backend implements; the worker drives it and knows nothing else about models."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable

from engine.protocol import Done, Generate, GenerateParams, Load, Token

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


def sampling_params(p: GenerateParams):
    """The protocol's generation parameters as engine.sampling's, or a bad_request error naming the value."""
    from engine.sampling import SamplingParams  # imported here: engine.sampling needs torch

    try:
        return SamplingParams(temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, min_p=p.min_p,
                              repetition_penalty=p.repetition_penalty, seed=p.seed, max_tokens=p.max_tokens,
                              stop=p.stop, ignore_eos=p.ignore_eos)
    except ValueError as e:
        raise BackendError("bad_request", str(e)) from e
