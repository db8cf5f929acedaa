"""The GPU decode path: the model's static steps captured as CUDA graphs and replayed.

A decode step of a MoE model is hundreds of small kernels; launched one by one from Python, the
launches cost more than the work. Captured once per token count T, a step is one graph launch. The
static steps (`Transformer.decode_step`, `Transformer.mtp_step`) take their positions as a device tensor
and attend over the whole fixed-size cache under a mask, so one graph serves every position, and they
read nothing back to the host (a capture could not hold a host read anyway).

A step is captured on its first call, from that call's real inputs: warm-up and capture execute the
step, which writes the caches, and only the step's real values are harmless to write there. Graphs hold
the caches' addresses, so they are kept on the caches and new or dropped caches drop them too. On the
CPU the static step runs eagerly (the tests take that path); a capture that fails logs a warning and
leaves that step eager, so a generation never fails for want of a graph.

Outputs of a graphed step live in the graphs' shared memory pool: they are valid until the model's next
step, so callers use or copy them right away.
"""
from __future__ import annotations

import logging
import os
import statistics
import time
from collections.abc import Callable
from contextlib import contextmanager
from functools import partial

import torch

from engine.model.transformer import Transformer
from engine.routing import Router

log = logging.getLogger(__name__)

# Steps of more tokens (an MTP module's first, prompt-long pass, or a catch-up after many plain steps)
# run eagerly like a prefill: rare, and long enough that launch overhead does not matter.
GRAPH_MAX_TOKENS = 8
WARMUP_RUNS = 2  # before capture, as PyTorch advises: lazy initialisations (cuBLAS, autotuning) happen here
# MOEDESK_CUDA_GRAPHS=0 keeps the static steps eager on CUDA: to measure what graphs gain, or rule them out.
CAPTURE = os.environ.get("MOEDESK_CUDA_GRAPHS", "1") != "0"


def wants_static(device: torch.device) -> bool:
    """Whether decoding takes the static-step path: on CUDA. The CPU keeps the eager path, which reads
    only the cache it needs and has no launch overhead worth removing."""
    return device.type == "cuda"


def to_device(values: list[int], device: torch.device) -> torch.Tensor:
    """Host token ids → a long tensor on `device`. To CUDA through pinned memory without waiting: a plain
    copy would first wait for all queued GPU work, a host synchronisation in every step."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=torch.long, device=device)
    return torch.tensor(values, dtype=torch.long, pin_memory=True).to(device, non_blocking=True)


@contextmanager
def load_counting_paused(model: torch.nn.Module):
    """Expert-load counting (Router.load) adds into a buffer that each `track_load` replaces: a graph would
    keep adding into the buffer it was captured with, freed by then, so captures (and their warm-ups) run
    without it and graphed steps go uncounted. (The counting itself no longer reads the device.) Routing
    observers (engine.routing_stats) pause too: the warm-ups would record the step's tokens twice more."""
    routers = [m for m in model.modules() if isinstance(m, Router)]
    saved = [(r.load, r.observe) for r in routers]
    for r in routers:
        r.load = r.observe = None
    try:
        yield
    finally:
        for r, (load, observe) in zip(routers, saved):
            r.load, r.observe = load, observe


class GraphedStep:
    """A function of fixed-shape device tensors, captured as a CUDA graph on its first call and replayed
    after copying the inputs into its static buffers; eager where capture is off or failed."""

    def __init__(self, model: torch.nn.Module, fn: Callable, pool, name: str):
        self.model, self.fn, self.pool, self.name = model, fn, pool, name
        self.capture = CAPTURE and pool is not None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: list[torch.Tensor] = []
        self.outputs = None

    def __call__(self, *inputs: torch.Tensor):
        if self.graph is not None:
            for buf, x in zip(self.inputs, inputs):
                buf.copy_(x)
            self.graph.replay()
            return self.outputs
        if self.capture:
            self.capture = False  # one try: a failure stays eager
            with load_counting_paused(self.model):
                if self._capture(inputs):
                    self.graph.replay()
                    return self.outputs
        return self.fn(*inputs)

    def _capture(self, inputs) -> bool:
        self.inputs = [x.clone() for x in inputs]
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(WARMUP_RUNS):
                    self.fn(*self.inputs)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # The outer stream context puts the current stream back even when a failed capture leaves
            # torch.cuda.graph's exit half done. thread_local: another thread's CUDA calls (a status
            # request, say) must not void the capture.
            with torch.cuda.stream(torch.cuda.current_stream()), \
                    torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                self.outputs = self.fn(*self.inputs)
        except Exception as e:  # noqa: BLE001 - any failure: this step stays eager, generation goes on
            log.warning("CUDA graph capture of %s failed, running it eagerly: %s: %s", self.name,
                        type(e).__name__, e)
            self.inputs, self.outputs = [], None
            return False
        self.graph = graph
        return True


def graphed(model: Transformer, key: tuple, fn: Callable) -> GraphedStep:
    """The model's step for `key`, kept on its first layer's cache (see the module docstring)."""
    cache = model.layers[0].attn.cache
    store = getattr(cache, "graphed_steps", None)
    if store is None:
        cuda = cache.latent.is_cuda and CAPTURE
        # One memory pool for all of a model's graphs: they never run concurrently.
        store = cache.graphed_steps = {"pool": torch.cuda.graph_pool_handle() if cuda else None}
    if key not in store:
        store[key] = GraphedStep(model, fn, store["pool"], f"{key[0]} step {key[1:]}")
    return store[key]


def check_room(model: Transformer, end: int) -> None:
    # the static step writes the cache at device-side positions, which cannot be checked there
    if end > model.max_seq_len:
        raise ValueError(f"context full: position {end} exceeds the cache of {model.max_seq_len} tokens")


def positions(start: int, n: int, device: torch.device) -> torch.Tensor:
    return torch.arange(start, start + n, device=device)


def main_step(model: Transformer, tokens: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The main model over tokens [1, T] (on the model's device) at positions start.. → (hidden [1, T, H],
    logits [1, T, V]): graphed on CUDA, the static step run eagerly elsewhere."""
    T = tokens.shape[1]
    check_room(model, start + T)
    if T > GRAPH_MAX_TOKENS:
        hidden = model(tokens, start)
        return hidden, model.logits(hidden)
    return graphed(model, ("main", T), model.decode_step)(tokens, positions(start, T, tokens.device))


def mtp_step(model: Transformer, depth: int, hidden: torch.Tensor, tokens: torch.Tensor,
             start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """MTP module `depth` over hidden [1, T, H] and tokens [1, T] at positions start.. → (hidden [1, T, H],
    logits [V] of the last position)."""
    T = tokens.shape[1]
    check_room(model, start + T)
    if T > GRAPH_MAX_TOKENS:
        h = model.mtp_forward(depth, hidden, tokens, start)
        return h, model.mtp_logits(depth, h[:, -1])[0]
    step = graphed(model, ("mtp", depth, T), partial(model.mtp_step, depth))
    h, logits = step(hidden, tokens, positions(start, T, tokens.device))
    return h, logits[0]


def captured_steps(model: Transformer) -> dict[str, bool]:
    """Which steps exist and whether each runs from a graph (False: eager, by failure or on the CPU)."""
    store = getattr(model.layers[0].attn.cache, "graphed_steps", None) or {}
    return {s.name: s.graph is not None for k, s in store.items() if k != "pool"}


def median_ms(fn: Callable[[], object], n: int, cuda: bool, warmup: int = 3) -> float:
    """Median time of fn in milliseconds: CUDA events around each call on CUDA, wall time elsewhere."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(n):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


@torch.inference_mode()
def decode_step_times(model: Transformer, ks=(0, 1, 2, 3, 4), n: int = 50, context: int = 1024) -> dict:
    """For scripts/gpu_check.py: median ms of the main model's step over k+1 tokens (k = 0: a plain decode
    step; k > 0: the verification of k drafts), graphed and eager, and of one MTP draft step; and each
    graphed verification's cost relative to the graphed 1-token step. Sets up fresh caches of `context`
    positions (the static step attends over all of them) and writes them from the middle on."""
    device = model.norm.weight.device  # (the embedding may be quantized, without a .weight)
    cuda = device.type == "cuda"
    model.setup_caches(1, context)
    start = context // 2
    g = torch.Generator(device="cpu").manual_seed(0)
    tokens = torch.randint(0, model.cfg.vocab_size, (1, max(ks) + 1), generator=g).to(device)
    graphed_ms, eager_ms = {}, {}
    for k in ks:
        part = tokens[:, :k + 1]
        graphed_ms[k] = median_ms(partial(main_step, model, part, start), n, cuda)
        eager_ms[k] = median_ms(lambda part=part: model.logits(model(part, start)), n, cuda)
    out = {"context": context, "graphed_ms": graphed_ms, "eager_ms": eager_ms}
    if 0 in graphed_ms:
        out["verify_vs_1_token"] = {k: graphed_ms[k] / graphed_ms[0] for k in ks}
    if model.mtp:
        hidden = model(tokens[:, :1])  # a hidden state of the right dtype; no cache involved
        out["mtp_draft_ms"] = median_ms(lambda: mtp_step(model, 0, hidden, tokens[:, :1], start), n, cuda)
    out["captured"] = captured_steps(model)
    return out
