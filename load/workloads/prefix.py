"""Single-turn completion workloads built on per-group shared prefixes, and their no-sharing control.

Rules:
- A request's prompt is `(group prefix, question)`: the prefix is built once per group and shared as
  the same `str` object; every question is fresh, so two requests share exactly their group's prefix
  (plus, rarely, a few words of question start by chance, never a 64-character chunk in practice).
- When a run outlasts the published set of prompts (e.g. SGLang's 64 x 16 = 1,024), it continues with
  a new shuffled deck of the same shape and fresh questions: no prompt ever repeats whole.
- Arrivals are Poisson at `rate`; `llmd-prefix` ramps its rate over the run (mean still `rate`).
- Segment lengths follow the published token counts at 4 characters a token; the published shapes
  are mostly multiples of 16 tokens, so their boundaries fall on 64-character chunk boundaries.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import count

from load.workloads.base import Workload, WorkloadRequest, poisson_times, stream_rng
from load.workloads.text import TextSource, tokens_to_chars


def _build_prefixes(text: TextSource, groups: int, tokens: int) -> list[str]:
    return [text.text(tokens_to_chars(tokens)) for _ in range(groups)]


def _decks(seed: int, name: str, groups: int, per_group: int) -> Iterator[tuple[int, int]]:
    """Endless shuffled decks of (group, prompt-in-group), each deck holding every pair once."""
    rng = stream_rng(seed, name, "deck")
    pairs = [(g, p) for g in range(groups) for p in range(per_group)]
    while True:
        rng.shuffle(pairs)
        yield from pairs


@dataclass(frozen=True)
class SharedPrefix(Workload):
    """SGLang `generated-shared-prefix` (anchors.md, Standard workloads): every default below."""

    name = "shared-prefix"
    kind = "completion"

    groups: int = 64
    prompts_per_group: int = 16
    prefix_tokens: int = 2048  # the group's system prompt
    question_tokens: int = 128
    output_tokens: int = 256

    def stream(self, seed: int, rate: float, horizon_s: float, model: str) -> Iterator[WorkloadRequest]:
        text = TextSource(stream_rng(seed, self.name, "text"))
        prefixes = _build_prefixes(text, self.groups, self.prefix_tokens)
        question_chars = tokens_to_chars(self.question_tokens)
        times = poisson_times(stream_rng(seed, self.name, "arrival"), rate)
        for i, (g, _), t in zip(count(), _decks(seed, self.name, self.groups, self.prompts_per_group), times):
            yield WorkloadRequest(
                request_id=f"{self.name}-{i}",
                arrival_s=t,
                model=model,
                kind="completion",
                prompt_parts=(prefixes[g], text.text(question_chars)),
                messages=None,
                max_tokens=self.output_tokens,
                group=f"g{g}",
            )


@dataclass(frozen=True)
class LlmdPrefix(Workload):
    """llm-d "KV-cache wins you can see" (anchors.md): 150 groups x 5 users, 6,000 / 1,200 / 1,000
    tokens, Poisson 3→60 QPS. The published `_2` variant is `prefix_tokens=2000, question_tokens=500,
    output_tokens=500`. The ramp keeps its published shape, scaled so that its mean is `rate`:
    lambda(t) rises linearly from rate x 3/31.5 to rate x 60/31.5 over the planned run (`duration_s`,
    or `requests / rate`), then holds its peak if the run goes on."""

    name = "llmd-prefix"
    kind = "completion"

    groups: int = 150
    users_per_group: int = 5
    prefix_tokens: int = 6000
    question_tokens: int = 1200
    output_tokens: int = 1000
    ramp_start_qps: float = 3.0
    ramp_end_qps: float = 60.0

    def __post_init__(self) -> None:
        if not (self.ramp_start_qps > 0 and self.ramp_end_qps > 0):
            raise ValueError("the ramp's QPS must be positive")

    def stream(self, seed: int, rate: float, horizon_s: float, model: str) -> Iterator[WorkloadRequest]:
        text = TextSource(stream_rng(seed, self.name, "text"))
        prefixes = _build_prefixes(text, self.groups, self.prefix_tokens)
        question_chars = tokens_to_chars(self.question_tokens)
        times = _ramp_times(seed, self.name, rate, horizon_s, self.ramp_start_qps, self.ramp_end_qps)
        decks = _decks(seed, self.name, self.groups, self.users_per_group)
        for i, (g, u), t in zip(count(), decks, times):
            yield WorkloadRequest(
                request_id=f"{self.name}-{i}",
                arrival_s=t,
                model=model,
                kind="completion",
                prompt_parts=(prefixes[g], text.text(question_chars)),
                messages=None,
                max_tokens=self.output_tokens,
                group=f"g{g}",
                session=f"g{g}-u{u}",
            )


def _ramp_times(seed: int, name: str, rate: float, span: float, a: float, b: float) -> Iterator[float]:
    """Inhomogeneous Poisson arrivals by inversion: the cumulative intensity of
    lambda(t) = c (a + (b - a) t / span), c = rate / mean(a, b), is Lambda(t) = c (a t + (b - a) t² / 2 span);
    solve Lambda(t) = E for unit-rate exponential sums E. Past `span` the rate stays at c b."""
    c = rate / ((a + b) / 2)
    slope = (b - a) / span
    at_span = rate * span  # Lambda(span)
    for e in poisson_times(stream_rng(seed, name, "arrival"), 1.0):
        if e >= at_span:
            yield span + (e - at_span) / (c * b)
        elif slope == 0:
            yield e / (c * a)
        else:
            yield (-a + math.sqrt(a * a + 2 * slope * e / c)) / slope


@dataclass(frozen=True)
class HotPrefix(Workload):
    """A few groups with long prefixes, Zipf-popular, so one group dominates (brief; no published
    preset). With 16 groups and s = 1.1 the top group gets 1 / H(16, 1.1) = 33% of requests;
    parameters that give it less than `MIN_HOT_SHARE` are refused, as the workload would not be hot."""

    name = "hot-prefix"
    kind = "completion"
    MIN_HOT_SHARE = 0.30  # brief: the hottest group carries at least 30% of traffic

    groups: int = 16  # the largest power of two keeping the top share >= 30% at s = 1.1
    zipf_s: float = 1.1  # brief
    prefix_tokens: int = 4096  # brief: "long prefixes (~4K tokens)"
    question_tokens: int = 128  # assumption: SGLang's question length
    output_tokens: int = 256  # assumption: SGLang's output length

    def __post_init__(self) -> None:
        if self.groups < 1:
            raise ValueError(f"groups must be >= 1, got {self.groups}")
        if self.hot_share() < self.MIN_HOT_SHARE:
            raise ValueError(
                f"hot-prefix: groups={self.groups}, zipf_s={self.zipf_s} gives the top group "
                f"{self.hot_share():.1%} of traffic, below {self.MIN_HOT_SHARE:.0%}"
            )

    def weights(self) -> list[float]:
        """Zipf probability of each group, hottest ("g0") first."""
        raw = [(k + 1) ** -self.zipf_s for k in range(self.groups)]
        total = sum(raw)
        return [w / total for w in raw]

    def hot_share(self) -> float:
        return self.weights()[0]

    def stream(self, seed: int, rate: float, horizon_s: float, model: str) -> Iterator[WorkloadRequest]:
        text = TextSource(stream_rng(seed, self.name, "text"))
        prefixes = _build_prefixes(text, self.groups, self.prefix_tokens)
        question_chars = tokens_to_chars(self.question_tokens)
        pick = stream_rng(seed, self.name, "group")
        cum = list(_cumulative(self.weights()))
        ids = range(self.groups)
        times = poisson_times(stream_rng(seed, self.name, "arrival"), rate)
        for i, t in zip(count(), times):
            g = pick.choices(ids, cum_weights=cum)[0]
            yield WorkloadRequest(
                request_id=f"{self.name}-{i}",
                arrival_s=t,
                model=model,
                kind="completion",
                prompt_parts=(prefixes[g], text.text(question_chars)),
                messages=None,
                max_tokens=self.output_tokens,
                group=f"g{g}",
            )


def _cumulative(weights: list[float]) -> Iterator[float]:
    total = 0.0
    for w in weights:
        total += w
        yield total


@dataclass(frozen=True)
class NoSharing(Workload):
    """Control: unique prompts with no shared prefix at all, as long as a shared-prefix request
    (2,048 + 128 tokens, anchors.md) with its output (256), so only the sharing differs."""

    name = "no-sharing"
    kind = "completion"

    prompt_tokens: int = 2048 + 128
    output_tokens: int = 256

    def stream(self, seed: int, rate: float, horizon_s: float, model: str) -> Iterator[WorkloadRequest]:
        text = TextSource(stream_rng(seed, self.name, "text"))
        chars = tokens_to_chars(self.prompt_tokens)
        times = poisson_times(stream_rng(seed, self.name, "arrival"), rate)
        for i, t in zip(count(), times):
            yield WorkloadRequest(
                request_id=f"{self.name}-{i}",
                arrival_s=t,
                model=model,
                kind="completion",
                prompt_parts=(text.text(chars),),
                messages=None,
                max_tokens=self.output_tokens,
                group=f"u{i}",  # every request is its own group
            )
