"""Speculative decoding with the model's own Multi-Token-Prediction modules.

Each step: the MTP chain drafts k tokens, the main model verifies [last token, draft_1..draft_k] in
one pass, the longest valid prefix is kept plus one token from the main model, and the caches simply
continue from the new length (rejected positions are overwritten later, never read).

Greedy: a draft is kept while it equals the main model's argmax, so the output is identical to plain
decoding. Sampling: a draft x ~ q is kept with probability min(1, p(x)/q(x)); on rejection the token is
drawn from normalize(max(0, p − q)), so the output follows p exactly (Leviathan et al., Chen et al.).

MTP bookkeeping. Depth j (1-based) at position i combines depth j-1's hidden state at i (depth 0: the
main model's) with the token at i+j and predicts token i+j+1. Its cache entry at i is final once token
i+j is committed; `valid[j]` counts those. Each round first brings every depth up to date over the
positions that became final, which is also the pass that yields its draft at the newest position; after
a run of plain steps the bulk of that catching up runs as a pass of its own (`MTPDrafter.catch_up`).
Drafts beyond the number of modules D reuse module D autoregressively, feeding it its own hidden state.
"""
from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch

from engine import cuda_graphs
from engine.expert_windows import ExpertWindows
from engine.generate import Emitter, TokenPicker
from engine.model.transformer import Transformer
from engine.routing import online_balancing
from engine.sampling import sample

AcceptRule = Callable[[float, float], float]


def accept_probability(p: float, q: float) -> float:
    """Chance of keeping a draft token that the draft gave probability q and the target p."""
    return min(1.0, p / q) if q > 0 else 1.0


@dataclass
class SpeculativeConfig:
    mode: str = "mtp"  # "off" | "mtp"
    k: int | str = "auto"  # drafts per step, or "auto" to choose each step
    k_max: int = 4  # upper bound for "auto"
    accept_rule: AcceptRule = field(default=accept_probability, repr=False)

    def __post_init__(self):
        if self.mode not in ("off", "mtp"):
            raise ValueError(f"unknown speculative mode {self.mode!r}")
        if self.k != "auto" and (not isinstance(self.k, int) or self.k < 1):
            raise ValueError("k must be a positive integer or 'auto'")

    @property
    def max_drafts(self) -> int:
        return self.k_max if self.k == "auto" else int(self.k)


def draft_room(cfg: SpeculativeConfig | None) -> int:
    """Cache positions needed beyond the generated tokens for drafts under verification."""
    return cfg.max_drafts + 1 if cfg else 0


class MTPDrafter:
    """The MTP chain's per-depth hidden states and how far each depth's cache is final.

    static: the passes run as the model's static steps (graphed on CUDA). resident: greedy drafts are
    taken by argmax on the device and stay there as tensors [1], so drafting reads nothing back to the
    host; `verify_resident` reads them back once, with the main model's choices.
    """

    def __init__(self, model: Transformer, prompt_hidden: torch.Tensor, static: bool = False,
                 resident: bool = False):
        self.model = model
        self.static, self.resident = static, resident
        self.depth = len(model.mtp)
        S, H = model.max_seq_len, model.cfg.hidden_size
        p = prompt_hidden
        self.hidden = [p.new_zeros(1, S, H) for _ in range(self.depth + 1)]  # [0]: main model
        self.hidden[0][:, :p.shape[1]] = p
        self.valid = [0] * (self.depth + 1)

    def draft(self, tokens: list[int], k: int, picker: TokenPicker) -> tuple[list, list]:
        """tokens: committed, the last one not yet fed to the main model → k drafts and their q."""
        D, N = self.depth, len(tokens) - 1
        drafts, qs = [], []
        for j in range(1, min(k, D) + 1):
            start = self.valid[j]
            ids = self.ids(tokens, drafts, start + j, N + j)  # the token at i+j for positions i = start..N-1
            h, logits = self._pass(j - 1, self.hidden[j - 1][:, start:N], ids, start)
            self.hidden[j][:, start:N] = h
            self.valid[j] = N - j + 1
            self._propose(logits, picker, drafts, qs)
        for j in range(D + 1, k + 1):  # beyond the chain: module D again, one position further each time
            pos = N - 1 + j - D
            ids = self.ids(tokens, drafts, pos + D, pos + D + 1)  # the newest draft
            h, logits = self._pass(D - 1, self.hidden[D][:, pos - 1:pos], ids, pos)
            self.hidden[D][:, pos:pos + 1] = h
            self._propose(logits, picker, drafts, qs)
        return drafts, qs

    def catch_up(self, tokens: list[int], k: int, lag: int) -> None:
        """Bring the depths a k-draft uses up to the committed tokens where they trail by more than `lag`
        positions (after a run of plain steps, or at a reply's first draft), leaving depth j's last j
        positions to the drafting pass. The same passes drafting would run, split in two so that the
        draft-length controller can time the catch-up apart from the step: it is the price of the plain
        steps before, not of the draft length chosen now."""
        N = len(tokens) - 1
        for j in range(1, min(k, self.depth) + 1):
            # positions whose token i+j is committed, all but the last j, and whose depth j-1 state is final
            start, end = self.valid[j], N - j if j == 1 else min(N - j, self.valid[j - 1])
            if end - start <= lag:
                continue
            ids = self.ids(tokens, [], start + j, end + j)
            self.hidden[j][:, start:end] = self._pass(j - 1, self.hidden[j - 1][:, start:end], ids, start)[0]
            self.valid[j] = end

    def ids(self, tokens: list[int], drafts: list, a: int, b: int) -> torch.Tensor:
        """Entries a..b-1 of committed tokens followed by drafts, as [1, b-a] on the model's device."""
        device = self.hidden[0].device
        committed, pending = tokens[a:b], drafts[max(a - len(tokens), 0):max(b - len(tokens), 0)]
        if not self.resident:
            return cuda_graphs.to_device([committed + pending], device)
        parts = [cuda_graphs.to_device(committed, device)] if committed else []
        return torch.cat(parts + pending)[None]

    def _pass(self, depth: int, hidden: torch.Tensor, ids: torch.Tensor, start: int):
        """MTP module `depth` over positions start.. → (hidden states, logits [V] of the last position)."""
        if self.static:
            return cuda_graphs.mtp_step(self.model, depth, hidden, ids, start)
        return self.model.mtp_draft(depth, hidden, ids, start)

    def _propose(self, logits, picker: TokenPicker, drafts: list, qs: list) -> None:
        if self.resident:
            drafts.append(logits.argmax(-1, keepdim=True))
            qs.append(None)
        else:
            propose(logits, picker, drafts, qs)


def commit(kept: list[int], tokens: list[int], picker: TokenPicker, emitter) -> bool:
    """Append a verification's kept tokens (accepted drafts, then the target's own token) and stream
    them; True when generation ends (the emitter's budget, an end token or a stop string)."""
    for i, t in enumerate(kept):
        picker.commit(t)
        tokens.append(t)
        if emitter.push(t, from_draft=i < len(kept) - 1):
            return True
    return False


def propose(logits: torch.Tensor, picker: TokenPicker, drafts: list, qs: list) -> None:
    """One draft token from a drafter's logits [V]: its argmax (after the picker's penalties) when greedy,
    else a sample from its distribution q under the same settings, kept for the acceptance test."""
    if picker.params.greedy:
        drafts.append(picker.choose(logits, drafts))
        qs.append(None)
    else:
        q = picker.probs(logits, drafts)
        drafts.append(int(sample(q, picker.generator)))
        qs.append(q)


def verify(logits: torch.Tensor, drafts: list[int], qs: list, picker: TokenPicker,
           rule: AcceptRule = accept_probability) -> tuple[int, int]:
    """logits [k+1, V] of the main model over [last, drafts] → (drafts accepted, the next token)."""
    for i, d in enumerate(drafts):
        if picker.params.greedy:
            target = picker.choose(logits[i], drafts[:i])
            if d != target:
                return i, target
            continue
        p, q = picker.probs(logits[i], drafts[:i]), qs[i]
        u = float(torch.rand((), generator=picker.generator, device=p.device))
        if u < rule(float(p[d]), float(q[d])):
            continue
        residual = (p - q).clamp(min=0)
        residual = residual / residual.sum() if residual.sum() > 0 else p
        return i, int(sample(residual, picker.generator))
    return len(drafts), picker.choose(logits[len(drafts)], drafts)


def verify_resident(logits: torch.Tensor, drafts: list[torch.Tensor]) -> tuple[int, int, list[int]]:
    """Greedy verification of drafts kept on the device: logits [k+1, V] → (drafts accepted, the next
    token, the drafts as ints). The main model's choices and the drafts come back in one read."""
    k = len(drafts)
    back = torch.cat([logits.argmax(-1), *drafts]).tolist()
    targets, drafts = back[:k + 1], back[k + 1:]
    accepted = next((i for i, d in enumerate(drafts) if d != targets[i]), k)
    return accepted, targets[accepted], drafts


class DraftLength:
    """Chooses k each step: the k that minimizes expected time per token, from the measured wall time
    of whole steps with k drafts (drafting, the k+1-token verification pass and the bookkeeping) and
    the recent acceptance per position. k = 0 is a plain step. Unmeasured k are estimated from the
    nearest measured one plus the measured cost per drafted token; after a run of plain steps it
    probes k = 1 to refresh its estimates, waiting twice as long after each probe that changed
    nothing, so a model whose drafts never pay costs at most a few percent.

    Routing-aware: where the routed experts' bytes of each pass are measured (engine/expert_windows.py),
    a step with k drafts is expected to cost its measured time plus the cost of the bytes by which the
    next window's union is expected to differ from the average behind that time: bytes(k) · (r − 1),
    r the recent windows' union relative to their k's average (text that routes coherently now reads
    fewer experts per window), priced at the seconds per byte fitted from how step times moved with
    the union at the same k. Where expert bytes decide the cost (a model that does not fit in cache)
    this moves k with the text; where they do not, the fitted price is about 0 and nothing changes."""

    EMA = 0.2  # weight of the newest step-time observation
    DECAY = 0.97  # acceptance counts of a position reached fade so that the estimate follows the text
    STALE = 0.99  # and at every verification that does not reach it, more slowly: evidence that is never
    # refreshed (a deep position after an unlucky start, while shorter drafts are chosen) gives way to
    # the prior, so that draft length is tried again instead of being shut out for the rest of the run
    PRIOR = (0.8, 2.0)  # acceptance assumed before any evidence, and how many observations it weighs
    PROBE_FIRST, PROBE_MAX = 16, 256
    VERIFY_GROWTH = 0.05  # assumed extra verification cost per extra token, relative to a 1-token step
    RECENT = 0.3  # weight of the newest window in r, the recent union relative to its k's average
    TRUSTED = 3  # observations of a k before its measured time alone decides (one can be a warm-up outlier)
    SPIKE = 3.0  # an observation above this multiple of the estimate counts as this multiple

    def __init__(self, cfg: SpeculativeConfig):
        self.fixed = None if cfg.k == "auto" else int(cfg.k)
        self.k_max = cfg.max_drafts
        self.accepted = [0.0] * self.k_max  # decayed counts per draft position
        self.reached = [0.0] * self.k_max
        self.t_step: dict[int, float] = {}  # k → seconds per step
        self.n_obs: dict[int, int] = {}  # k → steps observed
        self.t_draft: float | None = None  # seconds per drafted token (MTP passes, catch-up excluded)
        self.plain_streak = 0
        self.probe_every = self.PROBE_FIRST
        self.bytes: dict[int, float] = {}  # k → routed-expert bytes per pass, averaged like t_step
        self.recent: float | None = None  # r: recent windows' bytes over their k's average
        self.cov = self.var = 0.0  # decayed Σ Δt·Δbytes and Σ Δbytes² at equal k: the price of a byte

    def _ema(self, old, new):
        return new if old is None else (1 - self.EMA) * old + self.EMA * new

    def step_cost(self, k: int) -> float:
        """Expected seconds of a step with k drafts. A k seen fewer than TRUSTED times is taken at the
        lower of its measured time and the estimate from the nearest k seen more, so that a first
        measurement inflated by a warm-up (the first pass of a new shape) cannot shut that k out."""
        if k not in self.t_step:
            return self._estimate(k)
        measured = self.t_step[k] + self.union_cost(k)
        return measured if self.n_obs[k] >= self.TRUSTED else min(measured, self._estimate(k))

    def _estimate(self, k: int) -> float:
        """k's cost from the nearest other measured k (the nearest trusted one where there is one), plus or
        minus the measured cost per drafted token: optimistic until k itself is measured."""
        others = [j for j in self.t_step if j != k] or [k]
        trusted = [j for j in others if self.n_obs.get(j, 0) >= self.TRUSTED] or others
        known = min(trusted, key=lambda j: (abs(j - k), j))
        per_draft = (self.t_draft or 0.0) + self.VERIFY_GROWTH * self.t_step[0]
        return max(self.t_step[known] + self.union_cost(known) + (k - known) * per_draft, 1e-9)

    @property
    def seconds_per_byte(self) -> float:
        """How much a step's time grew with its window's expert bytes at the same k (≥ 0)."""
        return max(0.0, self.cov / self.var) if self.var > 0 else 0.0

    def union_cost(self, k: int) -> float:
        """Expected extra time of the next window with k drafts for reading more (or fewer) expert bytes
        than the windows its measured time averages."""
        if self.recent is None or k not in self.bytes:
            return 0.0
        return self.seconds_per_byte * self.bytes[k] * (self.recent - 1.0)

    @property
    def alpha(self) -> list[float]:
        """P(draft j accepted | drafts before it accepted): decayed counts plus a prior; a position
        never reached yet borrows the estimate of the one before it."""
        prior, weight = self.PRIOR
        out = []
        for a, r in zip(self.accepted, self.reached):
            base = out[-1] if out and r == 0 else prior
            out.append((a + base * weight) / (r + weight))
        return out

    def best_k(self, cap: int) -> int:
        """The k in 0..cap with the least expected time per token."""
        best, best_time, tokens, run = 0, self.step_cost(0), 1.0, 1.0
        for k, a in enumerate(self.alpha[:cap], start=1):
            run *= a
            tokens += run
            t = self.step_cost(k) / tokens
            if t < best_time:
                best, best_time = k, t
        return best

    def choose(self, cap: int) -> int:
        cap = max(0, min(cap, self.k_max))
        if self.fixed is not None:
            return min(self.fixed, cap)
        if 0 not in self.t_step or cap == 0:
            return 0  # measure a plain step first
        if 1 not in self.t_step:
            return 1  # then one draft, to measure what drafting costs
        best = self.best_k(cap)
        if best:
            self.probe_every = self.PROBE_FIRST
            return best
        self.plain_streak += 1
        if self.plain_streak < self.probe_every:
            return 0
        self.plain_streak = 0
        self.probe_every = min(2 * self.probe_every, self.PROBE_MAX)
        return 1

    def observe(self, k: int, accepted: int, step_s: float, draft_s: float, window_bytes: float | None = None) -> None:
        """One step: k drafts, how many were accepted, its wall time, the drafting part of it, and the
        routed-expert bytes its verification read (None where unmeasured)."""
        if window_bytes is not None:
            if k in self.bytes and k in self.t_step and self.bytes[k] > 0:
                db, dt = window_bytes - self.bytes[k], step_s - self.t_step[k]
                self.cov = self.DECAY * self.cov + dt * db
                self.var = self.DECAY * self.var + db * db
                ratio = window_bytes / self.bytes[k]
                self.recent = ratio if self.recent is None else (1 - self.RECENT) * self.recent + self.RECENT * ratio
            self.bytes[k] = self._ema(self.bytes.get(k), window_bytes)
        if k in self.t_step and self.n_obs.get(k, 0) < self.TRUSTED:
            self.t_step[k] = min(self.t_step[k], step_s)  # the first few: the least, past any warm-up
        else:
            if k in self.t_step:
                step_s = min(step_s, self.SPIKE * self.t_step[k])
            self.t_step[k] = self._ema(self.t_step.get(k), step_s)
        self.n_obs[k] = self.n_obs.get(k, 0) + 1
        if k:
            self.t_draft = self._ema(self.t_draft, draft_s / k)
            reached = min(accepted + 1, k)  # positions reached this step
            for j in range(self.k_max):
                fade = self.DECAY if j < reached else self.STALE
                self.reached[j] *= fade
                self.accepted[j] *= fade
                if j < reached:
                    self.reached[j] += 1.0
                    self.accepted[j] += j < accepted


_controllers: "weakref.WeakKeyDictionary[Transformer, dict]" = weakref.WeakKeyDictionary()


def draft_length_for(model: Transformer, cfg: SpeculativeConfig) -> DraftLength:
    """One controller per model and setting, kept across requests: what it measured about this
    model's costs and acceptance still holds for the next reply."""
    per_model = _controllers.setdefault(model, {})
    key = (cfg.k, cfg.k_max)
    if key not in per_model:
        per_model[key] = DraftLength(cfg)
    return per_model[key]


@dataclass
class SpecStats:
    verify_steps: int = 0
    plain_steps: int = 0
    accepted_total: int = 0
    proposed: list[int] = field(default_factory=list)
    reached: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    draft_s: float = 0.0
    verify_s: float = 0.0

    def record(self, k: int, accepted: int, draft_s: float, verify_s: float) -> None:
        self.draft_s += draft_s
        self.verify_s += verify_s
        if k == 0:
            self.plain_steps += 1
            return
        self.verify_steps += 1
        self.accepted_total += accepted
        while len(self.proposed) < k:
            self.proposed.append(0), self.reached.append(0), self.accepted.append(0)
        for j in range(k):
            self.proposed[j] += 1
            self.reached[j] += j <= accepted
            self.accepted[j] += j < accepted

    def as_dict(self) -> dict:
        proposed = sum(self.proposed)
        return {
            "speculative": "mtp",
            "verify_steps": self.verify_steps,
            "plain_steps": self.plain_steps,
            "draft_tokens_proposed": proposed,
            "draft_tokens_accepted": self.accepted_total,
            "acceptance_rate": self.accepted_total / proposed if proposed else None,
            # P(draft j accepted | drafts before it accepted), j = 1..
            "acceptance_per_position": [a / r if r else None for a, r in zip(self.accepted, self.reached)],
            "accepted_per_position": list(self.accepted),
            "reached_per_position": list(self.reached),
            # tokens gained per verification pass: accepted drafts + the main model's own token
            "mean_accepted_length": (self.accepted_total + self.verify_steps) / self.verify_steps
            if self.verify_steps else None,
            "mean_draft_length": proposed / self.verify_steps if self.verify_steps else None,
            "draft_time_s": self.draft_s,
            "verify_time_s": self.verify_s,
        }


def gpu_marks(device: torch.device) -> list | None:
    """Two CUDA timing events, the first recorded now; None off CUDA."""
    if device.type != "cuda":
        return None
    marks = [torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)]
    marks[0].record()
    return marks


def decode_mtp(model: Transformer, prompt_ids: list[int], hidden: torch.Tensor, picker: TokenPicker,
               emitter: Emitter, should_stop: Callable[[], bool] | None, cfg: SpeculativeConfig,
               meter: "ExpertWindows | None" = None) -> dict:
    """Speculative decoding loop; hidden [1, P, H] is the prefilled prompt's. meter: the expert windows
    being measured (engine/expert_windows.py), whose bytes per pass the draft-length controller weighs."""
    static = cuda_graphs.wants_static(hidden.device) and not online_balancing(model)
    # Greedy without a repetition penalty, every choice is an argmax: on the static path they are taken on
    # the device, and the accepted tokens are the step's only host read.
    resident = static and picker.params.greedy and picker.params.repetition_penalty == 1.0
    drafter = MTPDrafter(model, hidden, static, resident)
    control = draft_length_for(model, cfg)
    stats = SpecStats()
    tokens = list(prompt_ids)
    first = picker.pick(model.logits(hidden[:, -1])[0])
    tokens.append(first)
    done = emitter.push(first)
    while not done:
        if should_stop and should_stop():
            emitter.finish = "cancelled"
            break
        N = len(tokens) - 1  # the newest token, not yet seen by the main model
        k = control.choose(min(emitter.remaining - 1, model.max_seq_len - N - 1))
        tc = time.perf_counter()
        if k:
            drafter.catch_up(tokens, k, lag=cfg.max_drafts)  # a verification leaves at most k_max: plain steps
        t0 = time.perf_counter()
        marks = gpu_marks(hidden.device) if resident and k else None
        drafts, qs = drafter.draft(tokens, k, picker) if k else ([], [])
        if marks:
            marks[1].record()
        t1 = time.perf_counter()
        ids = drafter.ids(tokens, drafts, N, N + k + 1)  # [last token, drafts]
        if static:
            h, logits = cuda_graphs.main_step(model, ids, N)
        else:
            h, logits = model.decode(ids, N)  # [1, k+1, H], [1, k+1, V]
        drafter.hidden[0][:, N:N + k + 1] = h
        if resident:
            accepted, bonus, drafts = verify_resident(logits[0], drafts)
        else:
            accepted, bonus = verify(logits[0], drafts, qs, picker, cfg.accept_rule)
        t2 = time.perf_counter()
        done = commit(drafts[:accepted] + [bonus], tokens, picker, emitter)
        # drafts kept on the GPU leave the host before they are computed: time them there (done by now)
        draft_s = marks[0].elapsed_time(marks[1]) / 1000 if marks else t1 - t0
        control.observe(k, accepted, time.perf_counter() - t0, draft_s, meter.last_bytes() if meter else None)
        stats.record(k, accepted, t0 - tc + draft_s, t2 - t0 - draft_s)
    return stats.as_dict()
