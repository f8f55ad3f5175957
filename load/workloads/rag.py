"""Retrieval-augmented generation: a fixed pool of documents, a few per request, in varying order.

Rules:
- The pool is built once per seed; each document is one `str` object reused verbatim wherever it is
  retrieved, so requests share document *content* at any position (what content-similarity routing
  and CacheBlend-style reuse look for) but share a *prefix* only through the system prompt and,
  when their first document agrees, that document.
- Each request = system prompt + k distinct documents (k uniform in [docs_min, docs_max], drawn
  uniformly from the pool, in random order) + a fresh question. `group` names the first document
  ("d17"): requests of one group share system prompt + that document.
- Document lengths vary (uniform in [doc_min_tokens, doc_max_tokens]) and are not 64-character
  multiples, so document boundaries fall mid-chunk as they do in real prompts.
- Poisson arrivals at `rate`.

For `default_rate`: with ideal position-independent reuse only the question is new; with prefix-only
reuse the system prompt and (usually) the first document are saved, about 29% of a default prompt,
which leaves a round-robin fleet near 85% of its prefill capacity: this workload is where prefix
caching alone cannot save the fleet.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from itertools import count

from load.workloads.base import Workload, WorkloadRequest, poisson_times, stream_rng
from load.workloads.text import TextSource, tokens_to_chars


@dataclass(frozen=True)
class Rag(Workload):
    """Pool size, document length and k are the brief's (200 docs of ~1,000 tokens, k = 3..5);
    anchors.md has no published RAG shape. The rest are assumptions, marked."""

    name = "rag"
    kind = "completion"

    documents: int = 200
    doc_min_tokens: int = 750  # "~1,000 tokens": uniform in [750, 1250], mean 1,000
    doc_max_tokens: int = 1250
    docs_min: int = 3
    docs_max: int = 5
    system_tokens: int = 256  # assumption: a short answering instruction
    question_tokens: int = 128  # assumption: SGLang's question length
    output_tokens: int = 256  # assumption: SGLang's output length

    def __post_init__(self) -> None:
        if not 1 <= self.docs_min <= self.docs_max <= self.documents:
            raise ValueError("need 1 <= docs_min <= docs_max <= documents")
        if not 1 <= self.doc_min_tokens <= self.doc_max_tokens:
            raise ValueError("need 1 <= doc_min_tokens <= doc_max_tokens")

    def stream(self, seed: int, rate: float, horizon_s: float, model: str) -> Iterator[WorkloadRequest]:
        pool_rng = stream_rng(seed, self.name, "pool")
        pool_text = TextSource(pool_rng)
        system = pool_text.text(tokens_to_chars(self.system_tokens))
        docs = []
        for d in range(self.documents):
            chars = tokens_to_chars(pool_rng.randint(self.doc_min_tokens, self.doc_max_tokens))
            title = f"Document {d}:\n"
            docs.append(title + pool_text.text(chars - len(title)))
        pick = stream_rng(seed, self.name, "retrieve")
        question = TextSource(stream_rng(seed, self.name, "question"))
        question_chars = tokens_to_chars(self.question_tokens)
        ids = range(self.documents)
        times = poisson_times(stream_rng(seed, self.name, "arrival"), rate)
        for i, t in zip(count(), times):
            chosen = pick.sample(ids, pick.randint(self.docs_min, self.docs_max))  # random order
            yield WorkloadRequest(
                request_id=f"{self.name}-{i}",
                arrival_s=t,
                model=model,
                kind="completion",
                prompt_parts=(system, *(docs[d] for d in chosen), question.text(question_chars)),
                messages=None,
                max_tokens=self.output_tokens,
                group=f"d{chosen[0]}",
            )
