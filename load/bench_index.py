"""`kvrouter bench index`: the index's memory per block and the latency of its hot operations.

What each figure means (the goals are issue #2's):
- `bytes_per_block`: tracemalloc-measured bytes per (chunk hash, replica) entry in a PrefixIndex of
  `--blocks` entries spread over `--replicas`, the hash ints included (goal <= 200).
- `hash_128kb_ms_p50`: chunk-hashing a 128 KB prompt (131,072 characters, about 32K tokens).
- `match_128kb_ms_p50`: hashing plus `longest_match` for that prompt against the full index, with
  the prompt's prefix held by two replicas (goal <= 2).
- `insert_128kb_ms_p50`: inserting that prompt's 2,048 chunk hashes for one replica.
- `ring_pick_us_p50`: `BoundedLoadRing.pick` with 256 replicas of 256 virtual nodes and random loads
  (goal <= 50).
- `similarity_query_ms_p50`: building a MinHash signature for a 128 KB prompt and querying the LSH
  index holding 64 signatures for each replica.
Each latency is the median of `--repeat` runs after one warm-up; the machine is shared and noisy,
so medians, not means.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

from router.index import BoundedLoadRing, PrefixIndex, SimilarityIndex, hash_text

GOALS = {"bytes_per_block": 200.0, "match_128kb_ms_p50": 2.0, "ring_pick_us_p50": 50.0}
_WORDS = (
    "the of and to in is was for on that with as by at from his her an are were this which be or "
    "have had not but one all their they there been has when who will more no if out so said what "
    "up its about into than them can only other new some could time these two may then do first"
).split()


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "index",
        help="memory per block and latency of hashing, matching, inserting, ring picks, similarity",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--blocks", type=int, default=1_000_000, help="index entries to build (default 1,000,000)"
    )
    parser.add_argument(
        "--replicas", type=int, default=16, help="replicas the entries are spread over (default 16)"
    )
    parser.add_argument("--repeat", type=int, default=50, help="timed runs per latency figure (default 50)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--json", type=Path, help="write the results as JSON to this path")
    parser.set_defaults(func=run)


def _prompt(rng: random.Random, chars: int) -> str:
    out: list[str] = []
    n = 0
    while n < chars:
        word = rng.choice(_WORDS)
        out.append(word)
        n += len(word) + 1
    return " ".join(out)[:chars]


def _p50_ms(fn: Callable[[], object], repeat: int) -> float:
    fn()
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1000.0


def measure(blocks: int, replicas: int, repeat: int, seed: int) -> dict[str, Any]:
    if blocks <= 0 or replicas <= 0 or repeat <= 0:
        raise ValueError("--blocks, --replicas and --repeat must be positive")
    rng = random.Random(seed)
    model = "bench-model"
    names = [f"replica-{i}" for i in range(replicas)]
    index = PrefixIndex(default_capacity=blocks)
    for name in names:
        index.add_replica(name)

    # Memory: entries arrive as prompts of 1,000 chunks, round-robin over replicas, as routing
    # would write them; the hash ints are allocated inside the measurement, as real ones would be.
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    written = 0
    turn = 0
    while written < blocks:
        n = min(1000, blocks - written)
        index.insert(names[turn % replicas], [rng.getrandbits(64) for _ in range(n)], 0.0)
        written += n
        turn += 1
    bytes_per_block = (tracemalloc.get_traced_memory()[0] - before) / blocks
    tracemalloc.stop()

    prompt = _prompt(rng, 128 * 1024)
    hashes = hash_text(prompt, model)
    index.insert(names[0], hashes.chained, 1.0)
    index.insert(names[1], hashes.chained[: len(hashes) // 2], 1.0)

    hash_ms = _p50_ms(lambda: hash_text(prompt, model), repeat)
    match_ms = _p50_ms(lambda: index.longest_match(hash_text(prompt, model).chained), repeat)
    scratch = PrefixIndex()
    insert_ms = _p50_ms(lambda: scratch.insert("r", hashes.chained, 2.0), repeat)

    ring = BoundedLoadRing(vnodes=256)
    ring_names = [f"replica-{i}" for i in range(256)]
    for name in ring_names:
        ring.add(name)
    loads = {name: float(rng.randint(0, 20)) for name in ring_names}
    keys = [rng.getrandbits(64) for _ in range(repeat + 1)]
    key_iter = iter(keys * 4)
    ring_us = _p50_ms(lambda: ring.pick(next(key_iter), loads), repeat) * 1000.0

    similarity = SimilarityIndex()
    for name in names:
        for _ in range(similarity.per_replica):
            sig = similarity.signature(hash_text(_prompt(rng, 4096), model).content)
            if sig is not None:
                similarity.add(name, sig)

    def similarity_query() -> object:
        sig = similarity.signature(hashes.content)
        return similarity.query(sig) if sig is not None else {}

    similarity_ms = _p50_ms(similarity_query, repeat)
    return {
        "blocks": blocks,
        "replicas": replicas,
        "bytes_per_block": round(bytes_per_block, 1),
        "hash_128kb_ms_p50": round(hash_ms, 3),
        "match_128kb_ms_p50": round(match_ms, 3),
        "insert_128kb_ms_p50": round(insert_ms, 3),
        "ring_pick_us_p50": round(ring_us, 2),
        "similarity_query_ms_p50": round(similarity_ms, 3),
        "chunks_per_128kb_prompt": len(hashes),
        "goals": GOALS,
    }


def format_table(results: dict[str, Any]) -> str:
    rows = [("metric", "value", "goal", "met")]
    for key, value in results.items():
        if key == "goals":
            continue
        goal = GOALS.get(key)
        met = "" if goal is None else ("yes" if value <= goal else "NO")
        rows.append(
            (
                key,
                f"{value:,}" if isinstance(value, int) else str(value),
                "" if goal is None else f"<= {goal:g}",
                met,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows
    )


def run(args: argparse.Namespace) -> int:
    try:
        results = measure(args.blocks, args.replicas, args.repeat, args.seed)
    except ValueError as exc:
        print(f"kvrouter bench index: {exc}")
        return 2
    print(format_table(results))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0
