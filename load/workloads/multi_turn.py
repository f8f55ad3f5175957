"""Multi-round QA (LMCache / vLLM production-stack `multi-round-qa`): chat sessions that grow.

Rules:
- Every request is a chat: one shared system message (the same dict in every session), then the
  session's rounds. Round r's messages are round r-1's plus the answer to it and a new question,
  so each round's messages extend the previous round's (append-only: the history is a prefix).
- The answer appended is synthetic text of `answer_tokens`, fixed by the seed, not what a live
  server said: the simulator and a live run send the same bytes (and LMCache's benchmark also caps
  answers at this length). `max_tokens` asks for exactly that many tokens.
- A session ends after `rounds` rounds or before a round whose history (everything after the system
  prompt) would pass `history_cap_tokens`; a new user then takes its place.
- Open loop: `users` concurrent user slots; a user's next round arrives one think time (exponential,
  mean `users / rate`) after the previous one, so the aggregate rate is `rate`. By default
  `users = ceil(rate x think_time_s)`, i.e. the think time is fixed and the user count follows the rate.
- The run starts in steady state: each slot's first user is met at a random round, its earlier
  rounds already in its history (never sent, so the first request of such a user is a cache miss,
  as for a user who began before the measurement window).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import count

from load.workloads.base import ChatMessage, Workload, WorkloadRequest, merge_by_arrival, stream_rng
from load.workloads.text import TextSource, tokens_to_chars


@dataclass(frozen=True)
class MultiTurn(Workload):
    """Sources: anchors.md (Standard workloads, "multi-round QA") unless marked otherwise."""

    name = "multi-turn"
    kind = "chat"

    system_tokens: int = 1000  # shared system prompt
    answer_tokens: int = 100  # answer length per round
    history_cap_tokens: int = 20_000  # a user's history is "up to 20,000 tokens"
    question_min_tokens: int = 100  # brief: questions of ~100-300 tokens
    question_max_tokens: int = 300
    # LMCache's per-user context ahead of the first question ("user_info_len"; its CI example uses
    # 2,000). Off by default: anchors.md describes the 20,000 tokens as history that grows.
    user_context_tokens: int = 0
    rounds: int = 10  # assumption: LMCache's CI example uses 5; 10 makes histories matter
    think_time_s: float = 20.0  # LMCache's CI example: 10 users at 0.5 QPS, one request per 20 s each
    users: int | None = None  # concurrent users; None: ceil(rate x think_time_s)

    def __post_init__(self) -> None:
        if not 1 <= self.question_min_tokens <= self.question_max_tokens:
            raise ValueError("need 1 <= question_min_tokens <= question_max_tokens")
        if self.user_context_tokens + self.question_max_tokens > self.history_cap_tokens:
            raise ValueError("history_cap_tokens leaves no room for a first round")
        if self.rounds < 1 or self.answer_tokens < 1 or not self.think_time_s > 0:
            raise ValueError("rounds, answer_tokens and think_time_s must be positive")
        if self.users is not None and self.users < 1:
            raise ValueError(f"users must be >= 1, got {self.users}")

    def concurrent_users(self, rate: float) -> int:
        return self.users if self.users is not None else max(1, math.ceil(rate * self.think_time_s))

    def stream(self, seed: int, rate: float, horizon_s: float, model: str) -> Iterator[WorkloadRequest]:
        system: ChatMessage = {
            "role": "system",
            "content": TextSource(stream_rng(seed, self.name, "system")).text(
                tokens_to_chars(self.system_tokens)
            ),
        }
        users = self.concurrent_users(rate)
        mean_gap = users / rate
        return merge_by_arrival(self._slot(seed, j, system, mean_gap, model) for j in range(users))

    def _slot(
        self, seed: int, slot: int, system: ChatMessage, mean_gap: float, model: str
    ) -> Iterator[WorkloadRequest]:
        """The users of one slot, one after another, in arrival order."""
        # One stream per slot: what a slot draws never depends on how the merge interleaves slots.
        rng = stream_rng(seed, self.name, f"slot{slot}")
        text = TextSource(rng)
        cap = tokens_to_chars(self.history_cap_tokens)
        answer_chars = tokens_to_chars(self.answer_tokens)
        context_chars = tokens_to_chars(self.user_context_tokens)
        # Each slot is a Poisson process (exponential gaps from t = 0), so the merged arrivals are
        # Poisson at `rate` from the start. The first user of a slot joins mid-session, at a random
        # round whose earlier rounds are built but not sent: the run starts in steady state, with
        # histories of every length, instead of every user at round 0.
        t = rng.expovariate(1.0 / mean_gap)
        first_round = rng.randrange(self.rounds)
        for k in count():
            user = f"u{slot}.{k}"
            messages: tuple[ChatMessage, ...] = (system,)
            history = context_chars
            for r in range(self.rounds):
                q_chars = tokens_to_chars(rng.randint(self.question_min_tokens, self.question_max_tokens))
                if history + q_chars > cap:
                    break
                question = text.text(q_chars)
                if r == 0 and context_chars:
                    question = text.text(context_chars) + question
                messages = (*messages, {"role": "user", "content": question})
                if k == 0 and r < first_round:  # before the run: history only
                    messages = (*messages, {"role": "assistant", "content": text.text(answer_chars)})
                    history += q_chars + answer_chars
                    continue
                yield WorkloadRequest(
                    request_id=f"{self.name}-{user}-r{r}",
                    arrival_s=t,
                    model=model,
                    kind="chat",
                    prompt_parts=None,
                    messages=messages,
                    max_tokens=self.answer_tokens,
                    group="g0",  # one shared system prompt: the whole workload is one prefix group
                    session=user,
                    turn=r,
                )
                messages = (*messages, {"role": "assistant", "content": text.text(answer_chars)})
                history += q_chars + answer_chars
                t += rng.expovariate(1.0 / mean_gap)
