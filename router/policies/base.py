"""What a policy sees and returns: `RequestView` in, `Decision` out, behind the `Policy` Protocol.

Rules:
- `RequestView` carries no web-framework type: the proxy, the simulator and the tests build the same
  frozen value (usually with `make_request`), so a policy measured in simulation is the one in production.
- `choose(request, fleet, now)` must not change the Fleet. Everything that happens because a request
  was sent somewhere happens in `Fleet.routed`, which then calls `on_routed`; so a driver that asks
  and then fails to send leaves no trace, and policy state that mirrors routings (a radix tree, a
  round-robin position) changes only for requests that really went out. (A seeded random draw in
  `choose` is fine: it mirrors nothing.)
- Lifecycle hooks are no-ops in `PolicyBase`; a policy overrides only what it needs, and nothing ever
  downcasts to a concrete policy (the SGLang gateway's mistake, docs style-by-example.md).
- `choose` raises `NoReplicaAvailable` when no healthy, non-draining replica serves the model: the
  driver turns it into a 503 (proxy) or a rejected request (simulator).
- `Decision.reason` is a short string from a small fixed set per policy, fit for a metric label.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from router.index.chunking import DEFAULT_CHUNK_CHARS, ChunkHashes, hash_text, hash_tokens, render_chat

if TYPE_CHECKING:
    from router.fleet import Fleet, ReplicaState

# The usual rule of thumb for English text with BPE tokenizers, and the ratio llm-d's approximate
# prefix scorer assumes (16 tokens x 4 characters per block, docs anchors.md).
CHARS_PER_TOKEN = 4


class NoReplicaAvailable(LookupError):
    """No healthy, non-draining replica serves the request's model."""


@dataclass(frozen=True, slots=True)
class RequestView:
    """One request as the policies see it.

    `text` is the rendered prompt (chat messages through `render_chat`; token ids as space-separated
    numbers, so that text-based baselines can still match them as vllm-router's cache_aware does).
    `prompt_tokens` is exact when token ids are known, else estimated as characters / 4.
    `first_user_text` is the first user message's content for chat requests (KubeAI's CHWBL key).
    """

    request_id: str
    model: str
    text: str
    hashes: ChunkHashes
    prompt_tokens: int
    max_tokens: int
    session_key: str | None = None
    token_ids: tuple[int, ...] | None = None
    first_user_text: str | None = None

    @property
    def tokens_per_chunk(self) -> float:
        """Tokens in one chunk: the block size for token chunks, else prorated from characters."""
        h = self.hashes
        if h.unit == "token" or h.total_units <= 0:
            return float(h.chunk_units)
        return h.chunk_units * self.prompt_tokens / h.total_units

    def cached_tokens(self, matched_chunks: int) -> int:
        """Prompt tokens covered by the first `matched_chunks` chunks (at most the whole prompt)."""
        if matched_chunks <= 0:
            return 0
        return min(self.prompt_tokens, round(matched_chunks * self.tokens_per_chunk))

    def uncached_tokens(self, matched_chunks: int) -> int:
        """Prompt tokens a replica holding `matched_chunks` chunks still has to prefill."""
        return self.prompt_tokens - self.cached_tokens(matched_chunks)


@dataclass(frozen=True, slots=True)
class Decision:
    """Where a request goes, how many prompt tokens the policy expects there to be cached, and why."""

    replica: str
    expected_cached_tokens: int
    reason: str


class Policy(Protocol):
    """A routing policy: `choose` plus lifecycle hooks (see `PolicyBase` for the no-op defaults)."""

    name: str

    def choose(self, request: RequestView, fleet: Fleet, now: float) -> Decision: ...

    def on_routed(self, request: RequestView, decision: Decision, fleet: Fleet, now: float) -> None: ...

    def on_first_token(self, request_id: str, replica: str, now: float) -> None: ...

    def on_done(self, request_id: str, replica: str, now: float) -> None: ...

    def on_replica_added(self, replica: str) -> None: ...

    def on_replica_removed(self, replica: str) -> None: ...


class PolicyBase:
    """No-op lifecycle hooks, so a policy overrides only the ones it needs."""

    name: str = "base"

    def choose(self, request: RequestView, fleet: Fleet, now: float) -> Decision:
        raise NotImplementedError

    def on_routed(self, request: RequestView, decision: Decision, fleet: Fleet, now: float) -> None:
        return None

    def on_first_token(self, request_id: str, replica: str, now: float) -> None:
        return None

    def on_done(self, request_id: str, replica: str, now: float) -> None:
        return None

    def on_replica_added(self, replica: str) -> None:
        return None

    def on_replica_removed(self, replica: str) -> None:
        return None


def candidates_or_raise(fleet: Fleet, request: RequestView) -> list[ReplicaState]:
    """The replicas that may take this request (sorted by name), or NoReplicaAvailable."""
    found = fleet.candidates(request.model)
    if not found:
        raise NoReplicaAvailable(f"no healthy replica serves model {request.model!r}")
    return found


def index_cached_tokens(fleet: Fleet, request: RequestView, replica: str) -> int:
    """Prompt tokens the router believes `replica` holds (`Fleet.longest_match`), for policies that ignore it.

    Load-only baselines still report what the router knows, so the Fleet's prefill-token accounting
    means the same thing whichever policy runs.
    """
    matched = fleet.longest_match(request.hashes.chained).get(replica, 0)
    return request.cached_tokens(matched)


def estimate_tokens(text: str) -> int:
    """Prompt tokens estimated from characters (at least 1 for a non-empty prompt)."""
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def _first_user_text(messages: Sequence[Mapping[str, object]]) -> str | None:
    for message in messages:
        if message.get("role") == "user":
            content = message.get("content", "")
            if isinstance(content, str):
                return content
            return json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return None


def make_request(
    request_id: str,
    model: str,
    *,
    prompt: str | Sequence[int] | None = None,
    messages: Sequence[Mapping[str, object]] | None = None,
    max_tokens: int = 16,
    session_key: str | None = None,
    cache_salt: str | None = None,
    prompt_tokens: int | None = None,
    chunk_chars: int = DEFAULT_CHUNK_CHARS,
    block_size: int = 16,
) -> RequestView:
    """Build a RequestView from a completions prompt (text or token ids) or chat messages.

    Exactly one of `prompt` and `messages` must be given. Token-id prompts are chunked in blocks of
    `block_size` tokens, text in chunks of `chunk_chars` characters: a fleet must use one chunking for
    all its requests, since hashes of different chunkings never match. `prompt_tokens` overrides the
    estimate when the driver knows the exact count (e.g. from the replica's /tokenize).
    """
    if (prompt is None) == (messages is None):
        raise ValueError("give exactly one of prompt and messages")
    first_user: str | None = None
    token_ids: tuple[int, ...] | None = None
    if messages is not None:
        text = render_chat(messages)
        first_user = _first_user_text(messages)
        hashes = hash_text(text, model, cache_salt=cache_salt, chunk_chars=chunk_chars)
    elif isinstance(prompt, str):
        text = prompt
        hashes = hash_text(text, model, cache_salt=cache_salt, chunk_chars=chunk_chars)
    else:
        assert prompt is not None
        token_ids = tuple(prompt)
        text = " ".join(map(str, token_ids))
        hashes = hash_tokens(token_ids, model, block_size=block_size, cache_salt=cache_salt)
    if prompt_tokens is None:
        prompt_tokens = len(token_ids) if token_ids is not None else estimate_tokens(text)
    return RequestView(
        request_id=request_id,
        model=model,
        text=text,
        hashes=hashes,
        prompt_tokens=prompt_tokens,
        max_tokens=max_tokens,
        session_key=session_key,
        token_ids=token_ids,
        first_user_text=first_user,
    )
