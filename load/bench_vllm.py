"""`kvrouter bench vllm`: the physical hit rate kvrouter reaches on REAL vLLM replicas, against the limit.

What it measures (issue #6's claim): over a shared-prefix workload sent through kvrouter to real vLLM
replicas (the CPU build with the tiny local model, workers/vllm), the physical hit rate the replicas
report — the increase of `vllm:prefix_cache_hits_total / vllm:prefix_cache_queries_total` over the run,
summed over replicas (load/replica_metrics.py) — against the logical limit, what a perfect cache
shared by the whole fleet would reuse of the same token sequences. Both for chat requests and for
token-id prompts, for each `--policies` entry, in one run on one fleet.

How:
- One fleet of `--replicas` vLLM replicas for the whole run (a start costs about a minute), each with
  KV events; `--num-gpu-blocks-override N` makes their caches too small to hold every prefix
  everywhere, where routing decides the hit rate.
- Per row (prompt kind x policy): a fresh prefix set (a nonce in the seed), so no row reuses what an
  earlier row cached; kvrouter in this process (RouterServer) in token-precise mode with the model's
  own tokenizer (`tokenizer: <model dir>`, block size = the replicas'), KV events from every replica;
  requests sent open-loop (load/live.py `drive`) at `--rate`, groups interleaved at random.
- The logical limit is computed on the token ids vLLM sees (its /tokenize): a request can reuse the
  longest prefix of full blocks that any earlier request had, and never its last token (vLLM always
  computes at least one), so `min(seen_blocks, (n - 1) // block) * block` of its n tokens.
Goals (issue #6): kvaware >= 0.98x the logical limit while the caches hold the working set, >= 0.9x
with small caches, where round robin collapses.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workers.vllm.cli import add_fleet_arguments, fleet_from_args

DEFAULT_POLICIES = "kvaware,round_robin"


def register(commands: Any) -> None:
    p = commands.add_parser(
        "vllm",
        help="physical vs logical hit rate through kvrouter on real vLLM replicas (CPU build)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--policies", default=DEFAULT_POLICIES, help=f"(default {DEFAULT_POLICIES})")
    p.add_argument("--prompts", default="chat,tokens", help="chat, tokens or both (default chat,tokens)")
    p.add_argument("--groups", type=int, default=8, help="shared prefixes (default 8)")
    # SGLang's generated-shared-prefix sends 16 prompts per group (anchors.md); fewer groups than its 64,
    # so that a row takes under a minute on the CPU build.
    p.add_argument("--per-group", type=int, default=16, help="requests per prefix (default 16, as SGLang's)")
    p.add_argument("--prefix-tokens", type=int, default=1024, help="about this many tokens (default 1024)")
    p.add_argument("--question-tokens", type=int, default=48, help="about this many tokens (default 48)")
    p.add_argument("--max-tokens", type=int, default=4, help="output tokens a request (default 4)")
    p.add_argument("--rate", type=float, default=4.0, help="requests/s, Poisson (default 4)")
    p.add_argument("--seed", type=int, default=0, help="(default 0)")
    add_fleet_arguments(p)  # --replicas, --model, --python, --block-size, --num-gpu-blocks-override
    p.add_argument("--json", type=Path, help="write the results here")
    p.set_defaults(func=run)


@dataclass(frozen=True, slots=True)
class Prompt:
    """One request of the bench: its body and the token ids vLLM computes for it."""

    request_id: str
    kind: str  # "chat" | "tokens"
    group: int
    body: dict[str, Any]
    token_ids: tuple[int, ...]


def distinct_blocks(prompts: Sequence[Sequence[int]], block_size: int) -> int:
    """Full blocks of distinct content over `prompts`: the working set a fleet-wide cache must hold."""
    return len({tuple(ids[: (b + 1) * block_size]) for ids in prompts for b in range(len(ids) // block_size)})


def logical_hits(prompts: Sequence[Sequence[int]], block_size: int) -> int:
    """Tokens a perfect fleet-wide cache reuses over `prompts` in order (never a prompt's last token)."""
    seen: set[tuple[int, ...]] = set()
    hits = 0
    for ids in prompts:
        full = len(ids) // block_size
        matched = 0
        while matched < full and tuple(ids[: (matched + 1) * block_size]) in seen:
            matched += 1
        hits += min(matched, (len(ids) - 1) // block_size) * block_size
        seen.update(tuple(ids[: (b + 1) * block_size]) for b in range(full))
    return hits


async def make_prompts(
    session: Any, url: str, model: str, kind: str, args: argparse.Namespace, nonce: str
) -> list[Prompt]:
    from load.workloads.text import text_from, tokens_to_chars
    from router.tokenize import ReplicaTokenizer

    # The token ids vLLM itself computes (its /tokenize), the router's own replica tokenizer asking;
    # a generous timeout, as a loaded CPU replica may take a while.
    tokenizer = ReplicaTokenizer(lambda: session, lambda _model: [url], timeout_s=60.0)
    rng = random.Random(f"{args.seed}-{nonce}")
    prefixes = [
        f"[{nonce}-{g}] " + text_from(f"{args.seed}-{nonce}-p{g}", tokens_to_chars(args.prefix_tokens))
        for g in range(args.groups)
    ]
    order = [g for g in range(args.groups) for _ in range(args.per_group)]
    rng.shuffle(order)
    prompts = []
    for i, g in enumerate(order):
        question = text_from(f"{args.seed}-{nonce}-q{i}", tokens_to_chars(args.question_tokens))
        body: dict[str, Any] = {"model": model, "max_tokens": args.max_tokens, "ignore_eos": True}
        if kind == "chat":
            messages = [{"role": "system", "content": prefixes[g]}, {"role": "user", "content": question}]
            ids = tuple(await tokenizer.chat_ids(model, messages, {}))
            body["messages"] = messages
        else:
            ids = tuple(await tokenizer.completion_ids(model, prefixes[g] + question, {}))
            body["prompt"] = list(ids)
        prompts.append(Prompt(f"{kind}-{i}", kind, g, body, ids))
    return prompts


async def run_row(fleet: Any, policy: str, kind: str, args: argparse.Namespace, nonce: str) -> dict[str, Any]:
    import aiohttp

    from load.live import Outgoing, drive
    from load.replica_metrics import hit_rate, scrape
    from router.config import BackendConfig, RouterConfig
    from router.server import RouterServer

    model = fleet.served_model_name
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        prompts = await make_prompts(session, fleet.urls[0], model, kind, args, nonce)
        backends = tuple(
            BackendConfig(
                name=s.name,
                url=s.url,
                models=(model,),
                kv_events=s.events_endpoint,
                kv_events_replay=s.replay_endpoint,
            )
            for s in fleet.specs
        )
        config = RouterConfig(
            backends=backends,
            policy=policy,
            port=0,
            tokenizer=str(args.model),
            block_size=args.block_size,
        )
        server = await RouterServer(config).start()
        try:
            await asyncio.sleep(1.0)  # subscriptions reach the publishers (ZMQ's slow joiner)
            before = await scrape(session, fleet.urls)
            rng = random.Random(f"{args.seed}-{nonce}-arrivals")
            t, outgoing = 0.0, []
            for p in prompts:
                path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
                outgoing.append(Outgoing(p.request_id, path, p.body, t))
                t += rng.expovariate(args.rate)
            started = time.perf_counter()
            results = await drive(server.url, outgoing, concurrency=16, deadline_s=300.0)
            wall = time.perf_counter() - started
            await asyncio.sleep(0.5)  # the last requests' counters reach /metrics
            after = await scrape(session, fleet.urls)
            async with session.get(f"{server.url}/metrics") as resp:
                reasons = decision_reasons(await resp.text())
        finally:
            await server.stop()
    deltas = [a.since(b) for a, b in zip(after, before, strict=True)]
    prompt_tokens = sum(len(p.token_ids) for p in prompts)
    logical = logical_hits([p.token_ids for p in prompts], args.block_size) / prompt_tokens
    physical = hit_rate(deltas)
    ok = [r for r in results if r.error is None]
    ttfts = sorted(r.first_token_s - r.scheduled_s for r in ok if r.first_token_s is not None)
    per_replica: dict[str, int] = {}
    group_of = {p.request_id: p.group for p in prompts}
    per_group: dict[int, dict[str, int]] = {}
    for r in ok:
        per_replica[r.replica] = per_replica.get(r.replica, 0) + 1
        counts = per_group.setdefault(group_of[r.request_id], {})
        counts[r.replica] = counts.get(r.replica, 0) + 1
    return {
        "policy": policy,
        "prompts": kind,
        "requests": len(prompts),
        "prompt_tokens_mean": prompt_tokens / len(prompts),
        "working_set_blocks": distinct_blocks([p.token_ids for p in prompts], args.block_size),
        "errors": len(results) - len(ok),
        "hit_rate": physical,
        "logical_hit_rate": logical,
        "ratio": physical / logical if logical else None,
        "request_hit_rate": sum(r.cached_tokens for r in ok) / max(1, sum(r.prompt_tokens for r in ok)),
        "ttft_mean_s": sum(ttfts) / len(ttfts) if ttfts else None,
        "ttft_p50_s": ttfts[len(ttfts) // 2] if ttfts else None,
        "requests_per_replica": dict(sorted(per_replica.items())),
        "decisions": reasons,
        "requests_per_group": {str(g): dict(sorted(c.items())) for g, c in sorted(per_group.items())},
        "wall_s": wall,
    }


def decision_reasons(metrics_text: str) -> dict[str, int]:
    """The router's routing decisions by reason (`router_routing_decisions_total`), for the record."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, int] = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == "router_routing_decisions_total" and sample.value:
                reason = sample.labels.get("reason", "?")
                out[reason] = out.get(reason, 0) + int(sample.value)
    return out


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| prompts | policy | physical hit | logical hit | ratio | TTFT mean (s) | per replica | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.3f}"
        ttft = "-" if r["ttft_mean_s"] is None else f"{r['ttft_mean_s']:.3f}"
        lines.append(
            f"| {r['prompts']} | {r['policy']} | {r['hit_rate']:.3f} | {r['logical_hit_rate']:.3f} | "
            f"{ratio} | {ttft} | {r['requests_per_replica']} | {r['errors']} |"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    kinds = [k.strip() for k in args.prompts.split(",") if k.strip()]
    if not kinds or any(k not in ("chat", "tokens") for k in kinds):
        print("kvrouter bench vllm: error: --prompts takes chat, tokens or both", file=sys.stderr)
        return 2
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    fleet = fleet_from_args(args, "kvrouter bench vllm")
    if fleet is None:
        return 2
    print(f"starting {args.replicas} vLLM replica(s) (about a minute; logs in reports/vllm/)", flush=True)
    rows: list[dict[str, Any]] = []
    try:
        with fleet:
            for kind in kinds:
                for policy in policies:
                    nonce = f"{kind}-{policy}"
                    row = asyncio.run(run_row(fleet, policy, kind, args, nonce))
                    rows.append(row)
                    print(
                        f"{kind:6} {policy:20} physical {row['hit_rate']:.3f} logical "
                        f"{row['logical_hit_rate']:.3f} ratio {row['ratio'] or 0:.3f} errors {row['errors']} "
                        f"(prompts of {row['prompt_tokens_mean']:.0f} tokens, working set "
                        f"{row['working_set_blocks']} blocks)",
                        flush=True,
                    )
    except RuntimeError as exc:
        print(f"kvrouter bench vllm: error: {exc}", file=sys.stderr)
        return 1
    print(format_table(rows))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        out = {
            "bench": "vllm",
            "args": {k: str(v) for k, v in vars(args).items() if k != "func"},
            "rows": rows,
        }
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0
