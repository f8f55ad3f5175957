"""Mooncake trace replay: jsonl records of block hash ids turned into prompts that share as they did.

Format (anchors.md, "Mooncake trace format"), one JSON object a line:
    {"timestamp": ms, "input_length": tokens, "output_length": tokens, "hash_ids": [int, ...]}
Each hash id stands for one 512-token block *and all blocks before it*, so two requests share a prefix
exactly as far as their `hash_ids` agree. Other keys are ignored.

Rules:
- Block `id` becomes a fixed 2,048-character text (512 tokens at 4 characters a token) determined by
  the id alone: its first four words spell the id in the word list (so blocks of different ids differ
  within their first 64-character chunk), the rest is drawn from `random.Random(id)`. Two requests
  sharing their first k ids therefore share exactly their first k x 2,048 characters, and no
  64-character chunk after that.
- A prompt is its blocks concatenated, trimmed to `input_length` x 4 characters (the last block is
  usually partial). Ids missing for the tail are filled with text unique to the line, never shared;
  ids beyond `input_length` are ignored.
- `arrival_s` = (timestamp - the earliest timestamp) / 1000 / speedup; records are replayed in
  timestamp order (stable for equal timestamps). `output_length` 0 is sent as `max_tokens` 1 (vLLM
  refuses 0; the request still costs its prefill).
- Blank lines are skipped; any other malformed line raises `TraceFormatError` naming its line.
- `load/traces/sample-mooncake.jsonl` is `sample_mooncake_records()` written out (a test keeps them equal).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

from load.workloads.base import DEFAULT_MODEL, WorkloadRequest
from load.workloads.text import WORDS, TextSource, tokens_to_chars

MOONCAKE_BLOCK_TOKENS = 512  # anchors.md: one hash id per 512-token block
BLOCK_CHARS = tokens_to_chars(MOONCAKE_BLOCK_TOKENS)
SAMPLE_TRACE = Path(__file__).parent / "traces" / "sample-mooncake.jsonl"
_ID_WORDS = 4  # words spelling a block's id: len(WORDS)**4 > 6e9 distinct block heads


class TraceFormatError(ValueError):
    """A trace line that is not a valid record; `line` is 1-based."""

    def __init__(self, source: str, line: int, problem: str) -> None:
        super().__init__(f"{source}:{line}: {problem}")
        self.line = line


@dataclass(frozen=True, slots=True)
class MooncakeRecord:
    line: int  # 1-based line in its file: names the request and its unshared filler
    timestamp_ms: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]

    def to_json(self) -> str:
        return json.dumps(
            {
                "timestamp": int(self.timestamp_ms) if self.timestamp_ms.is_integer() else self.timestamp_ms,
                "input_length": self.input_length,
                "output_length": self.output_length,
                "hash_ids": list(self.hash_ids),
            }
        )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_mooncake(lines: Iterable[str], source: str = "<trace>") -> Iterator[MooncakeRecord]:
    """Records of the non-blank lines, in file order; raises `TraceFormatError` at a malformed one."""
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise TraceFormatError(source, number, f"not JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise TraceFormatError(source, number, "not a JSON object")
        missing = [k for k in ("timestamp", "input_length", "output_length", "hash_ids") if k not in obj]
        if missing:
            raise TraceFormatError(source, number, f"missing {', '.join(missing)}")
        ts, inp, out, ids = obj["timestamp"], obj["input_length"], obj["output_length"], obj["hash_ids"]
        if isinstance(ts, bool) or not isinstance(ts, int | float) or not math.isfinite(ts):
            raise TraceFormatError(source, number, f"timestamp must be a number of ms, got {ts!r}")
        if not _is_int(inp) or inp < 1:
            raise TraceFormatError(source, number, f"input_length must be an integer >= 1, got {inp!r}")
        if not _is_int(out) or out < 0:
            raise TraceFormatError(source, number, f"output_length must be an integer >= 0, got {out!r}")
        if not isinstance(ids, list) or not all(_is_int(i) and i >= 0 for i in ids):
            raise TraceFormatError(source, number, "hash_ids must be a list of integers >= 0")
        yield MooncakeRecord(number, float(ts), inp, out, tuple(ids))


def mooncake_block(hash_id: int) -> str:
    """The 2,048 characters that block `hash_id` stands for (same id, same text, everywhere)."""
    n, head = hash_id, []
    for _ in range(_ID_WORDS):
        n, digit = divmod(n, len(WORDS))
        head.append(WORDS[digit])
    spelled = " ".join(head) + " "
    return spelled + TextSource(random.Random(hash_id)).text(BLOCK_CHARS - len(spelled))


def mooncake_requests(
    records: Iterable[MooncakeRecord], model: str = DEFAULT_MODEL, *, speedup: float = 1.0
) -> list[WorkloadRequest]:
    """Completion requests for `records`, in timestamp order (see the module rules)."""
    if not speedup > 0:
        raise ValueError(f"speedup must be positive, got {speedup}")
    ordered = sorted(records, key=lambda r: r.timestamp_ms)
    if not ordered:
        return []
    start = ordered[0].timestamp_ms
    blocks: dict[int, str] = {}  # one str per id, shared by every prompt that holds the block
    out: list[WorkloadRequest] = []
    for rec in ordered:
        chars = tokens_to_chars(rec.input_length)
        used = min(len(rec.hash_ids), -(-chars // BLOCK_CHARS))
        parts = []
        for hid in rec.hash_ids[:used]:
            block = blocks.get(hid)
            if block is None:
                block = blocks[hid] = mooncake_block(hid)
            parts.append(block)
        have = used * BLOCK_CHARS
        if have > chars:
            parts[-1] = parts[-1][: chars - (have - BLOCK_CHARS)]
        elif have < chars:  # the trace gave fewer ids than blocks: unshared filler, unique per line
            parts.append(TextSource(random.Random(f"mooncake-filler:{rec.line}")).text(chars - have))
        out.append(
            WorkloadRequest(
                request_id=f"mooncake-{rec.line}",
                arrival_s=(rec.timestamp_ms - start) / 1000.0 / speedup,
                model=model,
                kind="completion",
                prompt_parts=tuple(parts),
                messages=None,
                max_tokens=max(1, rec.output_length),
                group=f"b{rec.hash_ids[0]}" if rec.hash_ids else f"line{rec.line}",
            )
        )
    return out


def load_mooncake(
    path: str | Path, model: str = DEFAULT_MODEL, limit: int | None = None, *, speedup: float = 1.0
) -> list[WorkloadRequest]:
    """Replay the first `limit` records (all when None) of a Mooncake jsonl trace."""
    with open(path, encoding="utf-8") as f:
        records = list(islice(parse_mooncake(f, str(path)), limit))
    return mooncake_requests(records, model, speedup=speedup)


def sample_mooncake_records(seed: int = 0, count: int = 200) -> list[MooncakeRecord]:
    """A small synthetic trace with Mooncake-like sharing (what `SAMPLE_TRACE` holds).

    Shape (assumptions, chosen to land in the published 40-66% cache ratio of Mooncake traces,
    anchors.md): Poisson arrivals at 2 requests/s; 55% of requests start a conversation under one of
    four system prompts of 1, 2, 3 and 6 blocks (popularity 50/25/15/10%) and add 1,000-8,000 tokens
    of their own; 45% continue one of the 30 latest requests, keeping its full blocks and adding
    256-2,048 tokens; outputs of 32-600 tokens. Its ideal block hit rate is 44%.
    """
    rng = random.Random(f"{seed}:mooncake-sample")
    next_id = 0

    def fresh(n: int) -> list[int]:
        nonlocal next_id
        next_id += n
        return list(range(next_id - n, next_id))

    systems = [fresh(n) for n in (1, 2, 3, 6)]
    records: list[MooncakeRecord] = []
    t = 0.0
    for line in range(1, count + 1):
        t += rng.expovariate(2.0) * 1000
        if records and rng.random() < 0.45:
            parent = rng.choice(records[-30:])
            kept = list(parent.hash_ids[: parent.input_length // MOONCAKE_BLOCK_TOKENS])
            input_length = len(kept) * MOONCAKE_BLOCK_TOKENS + rng.randint(256, 2048)
        else:
            kept = list(rng.choices(systems, weights=(50, 25, 15, 10))[0])
            input_length = len(kept) * MOONCAKE_BLOCK_TOKENS + rng.randint(1000, 8000)
        blocks = -(-input_length // MOONCAKE_BLOCK_TOKENS)
        ids = kept + fresh(blocks - len(kept))
        records.append(MooncakeRecord(line, float(round(t)), input_length, rng.randint(32, 600), tuple(ids)))
    return records
