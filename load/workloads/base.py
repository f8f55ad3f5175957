"""What a workload yields, and what every workload shares: bounds, Poisson arrivals, the default rate.

Rules:
- A workload is a frozen dataclass of parameters (each default documented with its source) that
  turns `(seed, rate, bound, model)` into `WorkloadRequest`s in non-decreasing `arrival_s` order.
  It is pure: no clock, no I/O, no global `random` — every random stream is a `random.Random`
  seeded from `(seed, workload, stream name)`, so a different rate or bound never changes what the
  text streams draw, and the same arguments always give equal requests.
- A generation is bounded: at most `requests` requests and/or only arrivals before `duration_s`.
- Arrivals are open-loop offsets on a virtual clock starting at 0. Multi-turn sessions model the
  user's think time as an offset; the answer a session appends is synthetic (the same text whatever
  a live server replied), so the simulator and a live benchmark send identical requests.
- A prompt is kept as the tuple of its segments (`prompt_parts`), shared segments being the same
  `str` objects in every request, so 100,000 requests with 30K-character prompts cost megabytes,
  not gigabytes; `prompt` joins them on demand.

Default rate (so that round robin saturates the fleet while a cache-aware policy has room to spare):

    default_rate = overload x replicas / mean round-robin engine seconds per request

with `overload` = 1.2. The denominator is measured, not guessed: the first 4,000 requests for seed 0
at 1 request/s are dealt round-robin over `replicas` replicas with unbounded caches, and each request
costs the engine seconds of what round robin leaves it to do — the prompt tokens not already cached
on its replica (its leading 64-character chunks seen there before), and its decode — priced by
`service_s(prefill_tokens, prompt_tokens, output_tokens)`, normally the engine preset's
`Preset.service_s`. So round robin's demand is 1.2x what the fleet can serve and it queues without
bound, while a policy that keeps each prefix where it is cached does less work per request. Decode
counts: with 256 output tokens it is often most of a request's cost, and a rate set from prefill
alone would saturate every policy on decode. Without `service_s`, prefill alone is priced at
`prefill_tokens_per_s`. Round robin's share grows with `replicas` on shared-prefix workloads, since it
recomputes every prefix on every replica; with no sharing it is the whole prompt. (Cached per
parameter set.)
"""

from __future__ import annotations

import functools
import heapq
import itertools
import math
import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from load.workloads.text import CHARS_PER_TOKEN
from router.index.chunking import DEFAULT_CHUNK_CHARS, hash_text, render_chat
from router.index.seen import SeenChunks

RequestKind = Literal["completion", "chat"]
# Engine seconds of one request: (uncached prompt tokens, prompt tokens, output tokens) -> seconds.
ServiceSeconds = Callable[[float, float, float], float]
ChatMessage = Mapping[str, str]  # {"role": ..., "content": ...}; built as dicts, never mutated

DEFAULT_MODEL = "kvrouter-emulated"  # callers pass their fleet's served model name
DEFAULT_OVERLOAD = 1.2  # brief: no-reuse prefill demand 1.2x the fleet's prefill capacity
# anchors.md, "What an emulated replica should cost": prefill of 16K tokens takes ~0.5 s on an H200
# (120B MoE), i.e. ~32K tokens/s. Only a fallback: the simulator passes its engine preset's rate.
REFERENCE_PREFILL_TOKENS_PER_S = 32_000.0
_MEAN_SAMPLE_REQUESTS = 4_000  # enough that multi-turn's partial last sessions bias the mean < 3%


@dataclass(frozen=True, slots=True)
class WorkloadRequest:
    """One request of a workload. Compare with ==; chat requests hold dicts, so do not hash them.

    - `prompt_parts` (completions): segments whose concatenation is the prompt; `None` for chat.
    - `messages` (chat): OpenAI-style messages, roles alternating user/assistant after one system
      message (strict chat templates reject anything else); `None` for completions.
    - `group`: the id of the shared prefix the request was built on (e.g. "g17"); requests of one
      group share at least that prefix. `session`: the user or task whose requests extend each
      other (`None` when requests are independent); `turn`: the request's round in its session.
    - `prompt_chars`: characters of prompt text (for chat, of message contents only: the role
      markup a chat template adds is the renderer's); tokens ≈ prompt_chars / 4.
    """

    request_id: str
    arrival_s: float
    model: str
    kind: RequestKind
    prompt_parts: tuple[str, ...] | None
    messages: tuple[ChatMessage, ...] | None
    max_tokens: int
    group: str
    session: str | None = None
    turn: int = 0
    prompt_chars: int = field(init=False)

    def __post_init__(self) -> None:
        if self.kind == "completion":
            if self.prompt_parts is None or self.messages is not None:
                raise ValueError(f"{self.request_id}: a completion has prompt_parts and no messages")
            chars = sum(map(len, self.prompt_parts))
        elif self.kind == "chat":
            if self.messages is None or self.prompt_parts is not None:
                raise ValueError(f"{self.request_id}: a chat request has messages and no prompt_parts")
            chars = sum(len(m["content"]) for m in self.messages)
        else:
            raise ValueError(f"{self.request_id}: unknown kind {self.kind!r}")
        if self.max_tokens < 1:
            raise ValueError(f"{self.request_id}: max_tokens must be >= 1, got {self.max_tokens}")
        object.__setattr__(self, "prompt_chars", chars)

    @property
    def prompt(self) -> str | None:
        """The completions prompt (joined on each access: keep it if you need it twice)."""
        return None if self.prompt_parts is None else "".join(self.prompt_parts)

    @property
    def prompt_tokens(self) -> int:
        """Prompt length in tokens at the emulator's 4 characters a token (rounded up)."""
        return -(-self.prompt_chars // CHARS_PER_TOKEN)

    def openai_body(self) -> dict[str, object]:
        """The JSON body for `/v1/completions` or `/v1/chat/completions` (callers add `stream`)."""
        body: dict[str, object] = {"model": self.model, "max_tokens": self.max_tokens}
        if self.messages is not None:
            body["messages"] = [dict(m) for m in self.messages]
        else:
            body["prompt"] = self.prompt
        return body


def stream_rng(seed: int, workload: str, stream: str) -> random.Random:
    """An independent, reproducible random stream (str seeds are hashed with SHA-512 by `random`)."""
    return random.Random(f"{seed}:{workload}:{stream}")


def poisson_times(rng: random.Random, rate: float, start_s: float = 0.0) -> Iterator[float]:
    """Endless arrival times of a Poisson process of `rate` per second after `start_s`."""
    t = start_s
    expovariate = rng.expovariate
    while True:
        t += expovariate(rate)
        yield t


def merge_by_arrival(streams: Iterable[Iterator[WorkloadRequest]]) -> Iterator[WorkloadRequest]:
    """Merge streams that are each in arrival order (e.g. one per concurrent user slot)."""
    return heapq.merge(*streams, key=lambda r: r.arrival_s)


@dataclass(frozen=True)
class Workload(ABC):
    """A workload's parameters; subclasses add fields with documented defaults."""

    name: ClassVar[str]
    kind: ClassVar[RequestKind]

    @abstractmethod
    def stream(self, seed: int, rate: float, horizon_s: float, model: str) -> Iterator[WorkloadRequest]:
        """Endless requests in arrival order at mean `rate`; `horizon_s` is the planned run length
        (only workloads whose rate changes over the run use it)."""

    def generate(
        self,
        *,
        seed: int,
        rate: float,
        requests: int | None = None,
        duration_s: float | None = None,
        model: str = DEFAULT_MODEL,
    ) -> list[WorkloadRequest]:
        """At most `requests` requests, all arriving before `duration_s` (at least one bound)."""
        if not rate > 0 or not math.isfinite(rate):
            raise ValueError(f"rate must be a positive number of requests/s, got {rate}")
        if requests is None and duration_s is None:
            raise ValueError("a workload must be bounded: give requests and/or duration_s")
        if requests is not None and requests < 0:
            raise ValueError(f"requests must be >= 0, got {requests}")
        if duration_s is not None and not duration_s > 0:
            raise ValueError(f"duration_s must be positive, got {duration_s}")
        horizon = duration_s if duration_s is not None else (requests or 1) / rate
        it: Iterator[WorkloadRequest] = self.stream(seed, rate, horizon, model)
        if duration_s is not None:
            end = duration_s
            it = itertools.takewhile(lambda r: r.arrival_s < end, it)
        return list(itertools.islice(it, requests))

    def mean_prompt_tokens(self) -> float:
        """Mean prompt length in tokens, measured on a fixed sample (see the module docstring)."""
        return _measured_mean_prompt_tokens(self)

    def default_rate(
        self,
        replicas: int,
        prefill_tokens_per_s: float = REFERENCE_PREFILL_TOKENS_PER_S,
        *,
        overload: float = DEFAULT_OVERLOAD,
        service_s: ServiceSeconds | None = None,
    ) -> float:
        """Requests/s at which round robin's demand is `overload` x the fleet's capacity (see module doc)."""
        if replicas < 1 or not prefill_tokens_per_s > 0 or not overload > 0:
            raise ValueError("replicas, prefill_tokens_per_s and overload must be positive")
        sample = _round_robin_sample(self, replicas)
        if service_s is None:
            seconds = sum(uncached for uncached, _, _ in sample) / prefill_tokens_per_s
        else:
            seconds = sum(service_s(uncached, prompt, output) for uncached, prompt, output in sample)
        return overload * replicas * len(sample) / seconds

    def round_robin_prefill_tokens(self, replicas: int) -> float:
        """Mean prompt tokens per request round robin must prefill over `replicas` (module docstring)."""
        sample = _round_robin_sample(self, replicas)
        return sum(uncached for uncached, _, _ in sample) / len(sample)


@functools.lru_cache(maxsize=256)
def _round_robin_sample(workload: Workload, replicas: int) -> tuple[tuple[float, float, int], ...]:
    """(uncached prompt tokens, prompt tokens, output tokens) per request, dealt round-robin."""
    sample = workload.generate(seed=0, rate=1.0, requests=_MEAN_SAMPLE_REQUESTS)
    seen = [SeenChunks(capacity=None) for _ in range(replicas)]
    out: list[tuple[float, float, int]] = []
    for i, req in enumerate(sample):
        text = render_chat(req.messages) if req.messages is not None else req.prompt or ""
        hit = seen[i % replicas].match_and_add(hash_text(text, req.model).chained)
        uncached = max(CHARS_PER_TOKEN, len(text) - hit * DEFAULT_CHUNK_CHARS) / CHARS_PER_TOKEN
        out.append((uncached, len(text) / CHARS_PER_TOKEN, req.max_tokens))
    return tuple(out)


@functools.lru_cache(maxsize=64)
def _measured_mean_prompt_tokens(workload: Workload) -> float:
    sample = workload.generate(seed=0, rate=1.0, requests=_MEAN_SAMPLE_REQUESTS)
    return sum(r.prompt_chars for r in sample) / len(sample) / CHARS_PER_TOKEN
