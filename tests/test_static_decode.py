"""The static decode step that CUDA graphs capture, checked on the CPU: it computes what the eager path
computes, it traces as one graph (no host read inside), and generation through it is token-for-token
the normal path's."""
from __future__ import annotations

import copy
import logging
from functools import partial

import pytest
import torch

from kernels import cpu as cpu_kernels
from conftest import write_agreeing_mtp_model

from engine import cuda_graphs
from engine.generate import generate
from engine.model.checkpoint import load_model
from engine.model.config import parse_config
from engine.model.moe import Experts
from engine.model.transformer import Transformer
from engine.sampling import SamplingParams
from engine.speculative import SpeculativeConfig
from engine.tiny import tiny_config

PROMPT = 11
# (start, T) after a prompt of 11 tokens: decode steps, verification chunks, and rollbacks (a chunk that
# starts before the end of the previous one, whose later positions are now stale)
CHUNKS = [(11, 1), (12, 4), (14, 5), (19, 1), (16, 3), (19, 2), (21, 1)]


@pytest.fixture(scope="module")
def model():
    cfg = parse_config(tiny_config(vocab_size=128, num_hidden_layers=3, num_nextn_predict_layers=2))
    m = Transformer(cfg, n_mtp=2).eval()
    m.init_weights(seed=1, std=0.15)
    return m


def rand_tokens(n, seed):
    return torch.randint(0, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def positions(start, T):
    return torch.arange(start, start + T)


@torch.no_grad()
def test_static_step_equals_the_eager_path(model):
    """Two copies, one eager and one static, prefilled alike, then fed the same chunks."""
    eager, static = model, copy.deepcopy(model)
    for m in (eager, static):
        m.setup_caches(1, 40)
        m(rand_tokens(PROMPT, 0), 0)
    for i, (start, T) in enumerate(CHUNKS):
        tokens = rand_tokens(T, 10 + i)
        want = eager.logits(eager(tokens, start))
        hidden, got = static.decode_step(tokens, positions(start, T))
        assert hidden.shape == (1, T, 64) and got.shape == want.shape
        assert (got - want).abs().max() < 1e-5, (start, T)


@pytest.mark.parametrize("depth", [0, 1])
@torch.no_grad()
def test_static_mtp_step_equals_the_eager_path(model, depth):
    eager, static = model, copy.deepcopy(model)
    g = torch.Generator().manual_seed(depth)
    prompt_hidden = torch.randn(1, PROMPT, 64, generator=g)
    for m in (eager, static):
        m.setup_caches(1, 40)
        m.mtp_forward(depth, prompt_hidden, rand_tokens(PROMPT, 1), 0)
    for i, (start, T) in enumerate(CHUNKS):
        hidden, tokens = torch.randn(1, T, 64, generator=g), rand_tokens(T, 20 + i)
        want_h = eager.mtp_forward(depth, hidden, tokens, start)
        want = eager.mtp_logits(depth, want_h[:, -1])
        got_h, got = static.mtp_step(depth, hidden, tokens, positions(start, T))
        assert (got_h - want_h).abs().max() < 1e-5 and (got - want).abs().max() < 1e-5, (start, T)


def host_reads(fn, *args) -> list[str]:
    """Trace fn as one graph (fullgraph: a graph break raises) and list what in it reads the device from
    the host: .item()/.tolist() (traced, not broken on, by recent PyTorch) and values of data-dependent
    shape or value (unbacked symbols, as nonzero or a loop over a tensor's contents makes)."""
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    graphs = []
    torch._dynamo.reset()
    torch.compile(fn, backend=lambda gm, ex: graphs.append(gm) or gm, fullgraph=True, dynamic=False)(*args)
    torch._dynamo.reset()
    assert graphs
    return [n.format_node() for gm in graphs for n in gm.graph.nodes
            if getattr(n.target, "__name__", n.target) in ("item", "tolist", "_local_scalar_dense")
            or free_unbacked_symbols(n.meta.get("example_value"))]


def test_the_host_read_check_catches_host_reads():
    x = torch.arange(4)
    assert host_reads(lambda t: t * t.sum().item(), x)
    assert host_reads(lambda t: t[t.nonzero()], x)
    assert host_reads(lambda t: t * sum(t.tolist()), x)


@torch.no_grad()
def test_static_steps_trace_as_one_graph_without_host_reads(model, monkeypatch):
    """The steps CUDA graphs capture have no host synchronisation. The experts take their gather path,
    the static one the GPU uses (or moedesk's CPU kernel, one opaque op); the PyTorch loop over experts
    reads the counts on the host by design."""
    model.setup_caches(1, 40)
    model(rand_tokens(PROMPT, 0), 0)
    if cpu_kernels.available():
        assert host_reads(model.decode_step, rand_tokens(1, 3), positions(PROMPT, 1)) == []
    with monkeypatch.context() as m:
        m.setattr(Experts, "forward", Experts.forward_grouped)
        with pytest.raises(Exception, match="tolist"):  # control: the PyTorch expert loop
            host_reads(model.decode_step, rand_tokens(1, 3), positions(PROMPT, 1))
    monkeypatch.setattr(Experts, "forward", Experts.forward_gathered)
    for T in (1, 5):
        assert host_reads(model.decode_step, rand_tokens(T, 4), positions(PROMPT, T)) == []
    assert host_reads(partial(model.mtp_step, 1), torch.randn(1, 3, 64), rand_tokens(3, 5),
                      positions(PROMPT, 3)) == []


@pytest.fixture(scope="module")
def agreeing(tmp_path_factory):
    return load_model(write_agreeing_mtp_model(tmp_path_factory.mktemp("a") / "m", vocab_size=256))


def prompts(n):
    return [torch.randint(2, 256, (3 + 4 * i,), generator=torch.Generator().manual_seed(i)).tolist()
            for i in range(n)]


def generations(model, prompt, params, ks):
    out = {}
    for k in ks:
        spec = SpeculativeConfig(k=k) if k else None
        r = generate(model, prompt, SamplingParams(**params), speculative=spec)
        # "auto" picks k from measured step times, so only its tokens are comparable
        out[k] = (r.token_ids, None if k == "auto" else r.stats.get("draft_tokens_accepted"))
    return out


@pytest.mark.parametrize("params,ks", [
    ({"max_tokens": 40}, (0, 1, 2, 3, 4, "auto")),  # greedy: drafts and choices stay on the device
    ({"max_tokens": 24, "repetition_penalty": 1.3}, (0, 2)),  # greedy, picked on the host
    ({"max_tokens": 24, "temperature": 0.9, "top_p": 0.9, "seed": 7}, (0, 2)),  # sampling: same draws
])
def test_generation_through_the_static_path_equals_the_normal_path(agreeing, monkeypatch, params, ks):
    for prompt in prompts(3):
        normal = generations(agreeing, prompt, params, ks)
        with monkeypatch.context() as m:
            m.setattr(cuda_graphs, "wants_static", lambda device: True)
            static = generations(agreeing, prompt, params, ks)
        assert static == normal, prompt
        if "temperature" not in params:
            assert all(normal[k][0] == normal[0][0] for k in ks)
    if params == {"max_tokens": 40}:
        assert sum(normal[k][1] for k in ks if k and k != "auto") > 40  # drafts were accepted, several at a time


def test_the_static_path_checks_the_context_and_a_failed_capture_stays_eager(model, caplog):
    model.setup_caches(1, 16)
    with pytest.raises(ValueError, match="context full"):
        cuda_graphs.main_step(model, rand_tokens(3, 0), 14)
    assert cuda_graphs.captured_steps(model) == {}

    # A capture that fails (here: no CUDA at all) logs a warning, returns the eager result and stays eager.
    calls = []
    step = cuda_graphs.GraphedStep(model, lambda x: calls.append(1) or x * 2, pool=object(), name="test step")
    step.capture = True
    for r in model.modules():
        if hasattr(r, "track_load"):
            r.track_load(True)
    loads = [r.load for r in model.modules() if getattr(r, "load", None) is not None]
    with caplog.at_level(logging.WARNING):
        assert torch.equal(step(torch.ones(2)), torch.full((2,), 2.0))
        assert torch.equal(step(torch.ones(2)), torch.full((2,), 2.0))
    assert step.graph is None and len(calls) == 2 and "capture of test step failed" in caplog.text
    assert loads and [r.load for r in model.modules() if getattr(r, "load", None) is not None] == loads
    for r in model.modules():
        if hasattr(r, "track_load"):
            r.track_load(False)


def test_decode_step_times_runs(model):
    times = cuda_graphs.decode_step_times(model, ks=(0, 2), n=2, context=32)
    assert set(times["graphed_ms"]) == {0, 2} and times["verify_vs_1_token"][0] == 1.0
    assert times["mtp_draft_ms"] > 0
    assert times["captured"] == {"main step (1,)": False, "main step (3,)": False, "mtp step (0, 1)": False}
    model.setup_caches(1, 32)
    assert cuda_graphs.captured_steps(model) == {}  # new caches, no steps bound to them yet
