"""`kvrouter bench vllm`: the physical hit rate kvrouter reaches on REAL vLLM replicas, against the limit.

What it measures (issue #6's claim): over a shared-prefix workload sent through kvrouter to real vLLM
replicas (the CPU build with the tiny local model, workers/vllm), the physical hit rate the replicas
report — the increase of `vllm:prefix_cache_hits_total / vllm:prefix_cache_queries_total` over the run,
summed over replicas (load/replica_metrics.py) — against the logical limit, what a perfect cache
shared by the whole fleet would reuse of the same token sequences. Both for chat requests and for
token-id prompts, for each `--policies` entry, in one run on one fleet.

With --peers (issue #7), the same for the routers users would pick instead (load/peers.py, installed by
`make peers`): `smg:cache_aware` (the SGLang model gateway), `vllm-router:cache_aware` and
`vllm-router:kv_aware` (vLLM's router, fed by the replicas' ZMQ KV events: one `--kv-event-source
URL=tcp://127.0.0.1:PORT` and `--kv-event-replay-source` per replica), each as a process of its own,
on the same fleet, with the same kind of fresh prefix set per row, both prompt kinds sent to each. A
peer that cannot run a row (not installed, exits, refuses that kind of request) keeps the row, with
an `error` that says why.

How:
- One fleet of `--replicas` vLLM replicas for the whole run (a start costs about a minute), each with
  KV events on the empty topic (vllm-router saw no events on a named one; kvrouter takes any);
  `--num-gpu-blocks-override N` makes their caches too small to hold every prefix everywhere, where
  routing decides the hit rate.
- Per row (prompt kind x router): a fresh prefix set (a nonce in the seed), so no row reuses what an
  earlier row cached. kvrouter's rows: kvrouter in this process (RouterServer) in token-precise mode
  with the model's own tokenizer (`tokenizer: <model dir>`, block size = the replicas'), KV events
  from every replica. A peer's row: the peer started, and ready once it answers a request of the
  row's kind (a 4xx is its refusal), stopped at the end of the row. Requests sent open-loop (load/live.py
  `drive`) at `--rate`, groups interleaved at random.
- Every row's figures are measured the same way, never read from a router: the hit rate and the
  requests per replica from the replicas' /metrics (increase over the row), TTFT and
  `request_hit_rate` (the answers' `cached_tokens`) from the client. A peer's own counters (its KV
  lookups and why it skipped them, say) are kept in the JSON as `router_own_counters`, for diagnosis.
- The logical limit is computed on the token ids vLLM sees (its /tokenize): a request can reuse the
  longest prefix of full blocks that any earlier request had, and never its last token (vLLM always
  computes at least one), so `min(seen_blocks, (n - 1) // block) * block` of its n tokens.
Goals (issue #6): kvaware >= 0.98x the logical limit while the caches hold the working set, >= 0.9x
with small caches, where round robin collapses. SIGINT and SIGTERM stop every process the run started.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import re
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from load.peers import PEER_SPECS, add_peer_arguments
from workers.vllm.cli import add_fleet_arguments, fleet_from_args

if TYPE_CHECKING:
    from load.live import LiveResult
    from load.peers import KvEventSources, Target
    from load.replica_metrics import ReplicaCounters
    from workers.vllm.launch import VLLMFleet

DEFAULT_POLICIES = "kvaware,round_robin"
OWN_COUNTERS = re.compile(r"kv_|cache_hit|cache_miss|policy_decisions")  # a peer's, see own_counters
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


def register(commands: Any) -> None:
    p = commands.add_parser(
        "vllm",
        help="physical vs logical hit rate through kvrouter on real vLLM replicas (CPU build)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--policies", default=DEFAULT_POLICIES, help=f"(default {DEFAULT_POLICIES})")
    p.add_argument("--prompts", default="chat,tokens", help="chat, tokens or both (default chat,tokens)")
    add_peer_arguments(p)
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


@dataclass(frozen=True, slots=True)
class Row:
    """One row of the table: a prompt kind through one router."""

    kind: str  # "chat" | "tokens"
    spec: str  # a kvrouter policy, or a peer's ROUTER:POLICY
    router: str  # kvrouter, smg or vllm-router

    @property
    def path(self) -> str:
        return CHAT if self.kind == "chat" else COMPLETIONS


def rows_for(kinds: Sequence[str], policies: Sequence[str], peers: bool) -> list[Row]:
    """Per prompt kind: kvrouter's policies, then (with `peers`) every peer of PEER_SPECS."""
    specs = [(p, "kvrouter") for p in policies]
    if peers:
        specs += [(spec, spec.partition(":")[0]) for spec in PEER_SPECS]
    return [Row(kind, spec, router) for kind in kinds for spec, router in specs]


def ready_body(kind: str, model: str) -> bytes:
    """The readiness request of a peer's row: one of the row's kind (chat, or a token-id prompt)."""
    body: dict[str, Any] = {"model": model, "max_tokens": 1}
    if kind == "chat":
        body["messages"] = [{"role": "user", "content": "kvrouter bench vllm: ready?"}]
    else:
        body["prompt"] = [1, 2, 3, 4]
    return json.dumps(body).encode()


def kv_event_sources(fleet: VLLMFleet) -> KvEventSources:
    """What vllm-router's kv_aware follows: every replica's PUB and replay endpoints."""
    from load.peers import KvEventSources

    return KvEventSources(
        fleet.served_model_name,
        fleet.block_size,
        tuple(
            (s.url, s.events_endpoint, s.replay_endpoint)
            for s in fleet.specs
            if s.events_endpoint is not None
        ),
    )


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


def workload_figures(prompts: Sequence[Prompt], block_size: int) -> dict[str, Any]:
    """What a row's prompts are, whatever router they went through (the limit included)."""
    ids = [p.token_ids for p in prompts]
    prompt_tokens = sum(len(t) for t in ids)
    return {
        "requests": len(prompts),
        "prompt_tokens_mean": prompt_tokens / len(prompts) if prompts else 0.0,
        "working_set_blocks": distinct_blocks(ids, block_size),
        "logical_hit_rate": logical_hits(ids, block_size) / prompt_tokens if prompt_tokens else 0.0,
    }


def row_figures(
    prompts: Sequence[Prompt],
    results: Sequence[LiveResult],
    deltas: Sequence[ReplicaCounters],
    names: Sequence[str],
    block_size: int,
) -> dict[str, Any]:
    """A row's figures: the replicas' counters' increase (`deltas`, one per name) and the answers."""
    from load.replica_metrics import hit_rate, replica_ttft_mean

    figures = workload_figures(prompts, block_size)
    logical = figures["logical_hit_rate"]
    physical = hit_rate(deltas)
    ok = [r for r in results if r.error is None]
    ttfts = sorted(r.first_token_s - r.scheduled_s for r in ok if r.first_token_s is not None)
    replica_ttft = replica_ttft_mean(deltas)
    figures.update(
        {
            "errors": len(results) - len(ok),
            "hit_rate": physical,
            "ratio": physical / logical if logical else None,
            "request_hit_rate": sum(r.cached_tokens for r in ok) / max(1, sum(r.prompt_tokens for r in ok)),
            "ttft_mean_s": sum(ttfts) / len(ttfts) if ttfts else None,
            "ttft_p50_s": ttfts[len(ttfts) // 2] if ttfts else None,
            "replica_ttft_mean_s": None if math.isnan(replica_ttft) else replica_ttft,
            # From the replicas' own counters (vllm:request_success_total), whatever router was in front.
            "requests_per_replica": {
                name: round(d.requests_finished) for name, d in zip(names, deltas, strict=True)
            },
        }
    )
    errors = [r.error for r in results if r.error is not None]
    if not ok:
        figures["error"] = f"no request completed: {errors[0] if errors else 'none was sent'}"
    return figures


def requests_per_group(prompts: Sequence[Prompt], results: Sequence[LiveResult]) -> dict[str, dict[str, int]]:
    """Where each group's requests went, by kvrouter's `x-kvrouter-replica` header (its rows only)."""
    group_of = {p.request_id: p.group for p in prompts}
    per_group: dict[int, dict[str, int]] = {}
    for r in results:
        if r.error is None:
            counts = per_group.setdefault(group_of[r.request_id], {})
            counts[r.replica] = counts.get(r.replica, 0) + 1
    return {str(g): dict(sorted(c.items())) for g, c in sorted(per_group.items())}


@dataclass
class RowContext:
    """What every row of one run shares: the fleet, the peers' binaries, and what was started."""

    fleet: VLLMFleet
    args: argparse.Namespace
    peers_bin: Path
    logs: Path
    started: list[Target]
    give_up: threading.Event


async def run_row(ctx: RowContext, row: Row) -> dict[str, Any]:
    """One row: fresh prompts, its router up, the prompts driven through it, the router stopped."""
    import aiohttp

    fleet, args = ctx.fleet, ctx.args
    nonce = f"{row.kind}-{row.spec}"
    head: dict[str, Any] = {"policy": row.spec, "router": row.router, "prompts": row.kind}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        prompts = await make_prompts(session, fleet.urls[0], fleet.served_model_name, row.kind, args, nonce)
        if row.router == "kvrouter":
            return {**head, **await _kvrouter_row(ctx, row, session, prompts)}
        return {**head, **await _peer_row(ctx, row, session, prompts)}


async def _drive(
    ctx: RowContext, row: Row, session: Any, url: str, prompts: Sequence[Prompt]
) -> tuple[list[LiveResult], list[ReplicaCounters], float]:
    """The prompts sent open-loop to `url`; the answers, the replicas' counters' increase, the wall time."""
    from load.live import Outgoing, drive
    from load.replica_metrics import scrape

    urls = ctx.fleet.urls
    before = await scrape(session, urls)
    rng = random.Random(f"{ctx.args.seed}-{row.kind}-{row.spec}-arrivals")
    t, outgoing = 0.0, []
    for p in prompts:
        outgoing.append(Outgoing(p.request_id, row.path, p.body, t))
        t += rng.expovariate(ctx.args.rate)
    started = time.perf_counter()
    results = await drive(url, outgoing, concurrency=16, deadline_s=300.0)
    wall = time.perf_counter() - started
    await asyncio.sleep(0.5)  # the last requests' counters reach /metrics
    after = await scrape(session, urls)
    return results, [a.since(b) for a, b in zip(after, before, strict=True)], wall


async def _kvrouter_row(ctx: RowContext, row: Row, session: Any, prompts: Sequence[Prompt]) -> dict[str, Any]:
    from router.config import BackendConfig, RouterConfig
    from router.server import RouterServer

    fleet, args = ctx.fleet, ctx.args
    backends = tuple(
        BackendConfig(
            name=s.name,
            url=s.url,
            models=(fleet.served_model_name,),
            kv_events=s.events_endpoint,
            kv_events_replay=s.replay_endpoint,
        )
        for s in fleet.specs
    )
    config = RouterConfig(
        backends=backends, policy=row.spec, port=0, tokenizer=str(args.model), block_size=args.block_size
    )
    server = await RouterServer(config).start()
    try:
        await asyncio.sleep(1.0)  # subscriptions reach the publishers (ZMQ's slow joiner)
        results, deltas, wall = await _drive(ctx, row, session, server.url, prompts)
        async with session.get(f"{server.url}/metrics") as resp:
            reasons = decision_reasons(await resp.text())
    finally:
        await server.stop()
    figures = row_figures(prompts, results, deltas, [s.name for s in fleet.specs], args.block_size)
    figures["decisions"] = reasons
    figures["requests_per_group"] = requests_per_group(prompts, results)
    figures["wall_s"] = wall
    return figures


async def _peer_row(ctx: RowContext, row: Row, session: Any, prompts: Sequence[Prompt]) -> dict[str, Any]:
    from load.peers import exit_problem, kv_aware_notes, peer_target, start_target, stop

    fleet, args = ctx.fleet, ctx.args
    name = f"{row.kind}-{row.spec}"  # its log: reports/vllm/peers/NAME.log
    target = peer_target(name, row.spec, fleet.urls, ctx.peers_bin, kv_event_sources(fleet))
    ctx.started.append(target)
    body = ready_body(row.kind, fleet.served_model_name)
    head: dict[str, Any] = {"what": target.what, "command": target.command}
    try:
        await asyncio.to_thread(start_target, target, ctx.logs, body, ctx.give_up, row.path)
        if target.failure is not None:
            return {**head, **workload_figures(prompts, args.block_size), "error": target.failure}
        if row.spec == "vllm-router:kv_aware":
            await asyncio.sleep(1.0)  # its subscriptions reach the publishers (ZMQ's slow joiner)
        results, deltas, wall = await _drive(ctx, row, session, target.url, prompts)
        problem = exit_problem(target)
        own = await own_counters(session, target.metrics_url)
    finally:
        stop(target.proc)
    figures = row_figures(prompts, results, deltas, [s.name for s in fleet.specs], args.block_size)
    figures["wall_s"] = wall
    if own:
        figures["router_own_counters"] = own
    notes = kv_aware_notes(target) if row.spec == "vllm-router:kv_aware" else []
    if notes:
        figures["notes"] = notes
    if problem is not None:
        figures["error"] = problem
    return {**head, **figures}


async def own_counters(session: Any, url: str) -> dict[str, float]:
    """A peer's own account of its routing, from its Prometheus page: vllm-router's KV lookups and why
    it skipped them, its tree's cache hits and misses, its decisions per worker. For diagnosis only:
    no figure of a row comes from a router. Empty when the page cannot be read."""
    import aiohttp
    from prometheus_client.parser import text_string_to_metric_families

    if not url:
        return {}
    try:
        async with session.get(url) as resp:
            text = await resp.text()
        families = list(text_string_to_metric_families(text))
    except (aiohttp.ClientError, OSError, TimeoutError, ValueError):
        return {}
    out: dict[str, float] = {}
    for family in families:
        for sample in family.samples:
            if sample.value and OWN_COUNTERS.search(sample.name) and not sample.name.endswith("_bucket"):
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


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
    """The rows as markdown; a row that did not run says why, one that failed midway notes it below."""
    lines = [
        "| prompts | policy | physical hit | logical hit | ratio | TTFT mean (s) | per replica | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for r in rows:
        if "hit_rate" not in r:
            lines.append(f"| {r['prompts']} | {r['policy']} | did not run: {r.get('error', '?')} | | | | | |")
            continue
        if "error" in r:
            notes.append(f"{r['prompts']} {r['policy']}: {r['error']}")
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.3f}"
        ttft = "-" if r["ttft_mean_s"] is None else f"{r['ttft_mean_s']:.3f}"
        lines.append(
            f"| {r['prompts']} | {r['policy']} | {r['hit_rate']:.3f} | {r['logical_hit_rate']:.3f} | "
            f"{ratio} | {ttft} | {r['requests_per_replica']} | {r['errors']} |"
        )
    return "\n".join([*lines, *notes])


def progress_line(row: dict[str, Any]) -> str:
    if "hit_rate" not in row:
        return f"{row['prompts']:6} {row['policy']:24} did not run: {row['error']}"
    ratio = row["ratio"] or 0.0
    line = (
        f"{row['prompts']:6} {row['policy']:24} physical {row['hit_rate']:.3f} logical "
        f"{row['logical_hit_rate']:.3f} ratio {ratio:.3f} errors {row['errors']} "
        f"(prompts of {row['prompt_tokens_mean']:.0f} tokens, working set "
        f"{row['working_set_blocks']} blocks)"
    )
    return line + (f"; {row['error']}" if "error" in row else "")


async def run_rows(ctx: RowContext, rows: Sequence[Row]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    try:
        for row in rows:
            out.append(await run_row(ctx, row))
            print(progress_line(out[-1]), flush=True)
    except BaseException:
        ctx.give_up.set()  # a peer's readiness wait, still running in its thread, stops waiting
        raise
    return out


def _interrupted(signum: int, frame: FrameType | None) -> None:
    """SIGTERM ends the run as Ctrl-C does (every `finally` runs); a second one is ignored meanwhile."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    from load.peers import stop

    kinds = [k.strip() for k in args.prompts.split(",") if k.strip()]
    if not kinds or any(k not in ("chat", "tokens") for k in kinds):
        print("kvrouter bench vllm: error: --prompts takes chat, tokens or both", file=sys.stderr)
        return 2
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    # The empty topic: vllm-router's kv_aware saw no events on a named one (anchors.md); kvrouter
    # subscribes to every topic, so its rows see the same fleet either way.
    fleet = fleet_from_args(args, "kvrouter bench vllm", topic="")
    if fleet is None:
        return 2
    rows_to_run = rows_for(kinds, policies, args.peers)
    print(f"starting {args.replicas} vLLM replica(s) (about a minute; logs in {fleet.log_dir}/)", flush=True)
    rows: list[dict[str, Any]] = []
    started: list[Target] = []
    previous = signal.signal(signal.SIGTERM, _interrupted)
    try:
        with fleet:
            logs = fleet.log_dir / "peers"
            logs.mkdir(parents=True, exist_ok=True)
            ctx = RowContext(fleet, args, args.peers_venv / "bin", logs, started, threading.Event())
            rows = asyncio.run(run_rows(ctx, rows_to_run))
    except RuntimeError as exc:
        print(f"kvrouter bench vllm: error: {exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("\nkvrouter bench vllm: interrupted; what it started is stopped", file=sys.stderr)
        return 130
    finally:
        for target in started:  # the rows stop their own; this catches one a crash left running
            stop(target.proc)
        signal.signal(signal.SIGTERM, previous)
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
