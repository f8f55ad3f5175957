"""Seeded workload generators: the standard shapes of anchors.md, as lists of `WorkloadRequest`.

Rules:
- One explicit registry, `WORKLOADS` (name → parameter class); an unknown name or parameter fails
  with the known ones listed. Nothing registers itself from elsewhere.
- `make_workload` is bounded (`requests` and/or `duration_s`) and pure: the same arguments give equal
  requests, in non-decreasing `arrival_s`. With `rate=None` the rate is the workload's
  `default_rate(replicas, prefill_tokens_per_s)` (formula in `load/workloads/base.py`).

Workloads (defaults and their sources in each class):
    shared-prefix  SGLang generated-shared-prefix: 64 groups x 16, 2,048-token prefix, 128 / 256
    llmd-prefix    llm-d precise routing: 150 groups x 5 users, 6,000 / 1,200 / 1,000, ramped Poisson
    multi-turn     LMCache multi-round QA: 1,000-token system prompt, growing chat histories
    agentic        Preble ToolBench-like: tool definitions, growing task histories, sub-agent bursts
    rag            200 shared documents, 3-5 per request in random order
    hot-prefix     16 groups of 4,096-token prefixes, Zipf s = 1.1 (the top group >= 30%)
    no-sharing     control: unique prompts of shared-prefix's length
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from load.workloads.agentic import Agentic
from load.workloads.base import (
    DEFAULT_MODEL,
    DEFAULT_OVERLOAD,
    REFERENCE_PREFILL_TOKENS_PER_S,
    ChatMessage,
    RequestKind,
    ServiceSeconds,
    Workload,
    WorkloadRequest,
)
from load.workloads.multi_turn import MultiTurn
from load.workloads.prefix import HotPrefix, LlmdPrefix, NoSharing, SharedPrefix
from load.workloads.rag import Rag

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_OVERLOAD",
    "REFERENCE_PREFILL_TOKENS_PER_S",
    "WORKLOADS",
    "Agentic",
    "ChatMessage",
    "HotPrefix",
    "LlmdPrefix",
    "MultiTurn",
    "NoSharing",
    "Rag",
    "RequestKind",
    "ServiceSeconds",
    "SharedPrefix",
    "Workload",
    "WorkloadRequest",
    "make_workload",
    "workload_spec",
]

WORKLOADS: dict[str, type[Workload]] = {
    cls.name: cls for cls in (SharedPrefix, LlmdPrefix, MultiTurn, Agentic, Rag, HotPrefix, NoSharing)
}


def workload_spec(name: str, params: Mapping[str, Any] | None = None) -> Workload:
    """The named workload with `params` overriding its defaults (values already of the field's type)."""
    try:
        cls = WORKLOADS[name]
    except KeyError:
        raise ValueError(f"unknown workload {name!r}; known: {', '.join(sorted(WORKLOADS))}") from None
    params = dict(params or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ValueError(
            f"workload {name!r} has no parameter {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    return cls(**params)


def make_workload(
    name: str,
    *,
    seed: int,
    replicas: int,
    rate: float | None = None,
    requests: int | None = None,
    duration_s: float | None = None,
    model: str = DEFAULT_MODEL,
    prefill_tokens_per_s: float = REFERENCE_PREFILL_TOKENS_PER_S,
    service_s: ServiceSeconds | None = None,
    params: Mapping[str, Any] | None = None,
) -> list[WorkloadRequest]:
    """Requests of workload `name` in arrival order, at `rate` or the workload's default rate for
    `replicas` replicas of `prefill_tokens_per_s` each; at most `requests`, arriving before `duration_s`."""
    spec = workload_spec(name, params)
    if rate is None:
        rate = spec.default_rate(replicas, prefill_tokens_per_s, service_s=service_s)
    return spec.generate(seed=seed, rate=rate, requests=requests, duration_s=duration_s, model=model)
