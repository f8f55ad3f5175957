"""`kvrouter bench core`: the CPU of kvrouter's own per-request logic, in-process, without HTTP.

What `kvrouter bench proxy` cannot separate from aiohttp's share: the work the router does for each
request beyond forwarding it, run here in a loop on the same objects `kvrouter serve` builds
(`router.proxy.build_state`), in the order a proxied non-streaming request runs them:
    parse    the body, decoded and checked (router/openai_request.py `parse_body`)
    hash     the request view: chunk hashes of the prompt (`ParsedRequest.view`)
    route    the policy's choice and its bookkeeping (`Fleet.route`), the hot-prefix controller's
             observation and the decision counter
    meter    the first token: `Fleet.first_token` and the amnesia-tax meter (prompt, logical and
             expected cached tokens)
    usage    the answer's usage: `usage_from_body` and the physical counter
    done     `Fleet.done` of the request finished `--inflight` requests earlier
The load is bench proxy's: `--prompts` distinct prompts of `--prompt-bytes` (16 of 8 KB), in turn, over
`--replicas` replicas (4), with `--inflight` requests in flight (8). Each figure is the median over
`--batches` batches of µs a request (the machine is shared: medians, not means).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

STAGES = ("parse", "hash", "route", "meter", "usage", "done")
# A vLLM answer to a completions request of max_tokens 8, as the emulator sends it (usage included).
ANSWER = (
    b'{"id":"cmpl-a049f07df5c949c78793bd246ce3d317","object":"text_completion","created":1796494566,'
    b'"model":"m","choices":[{"index":0,"text":"too arm was did ago box now you ","logprobs":null,'
    b'"finish_reason":"length","stop_reason":null,"prompt_logprobs":null}],"usage":{"prompt_tokens":2048,'
    b'"total_tokens":2056,"completion_tokens":8,"prompt_tokens_details":{"cached_tokens":2000}},'
    b'"prompt_logprobs":null,"kv_transfer_params":null}'
)


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "core",
        help="CPU of kvrouter's own per-request logic (parse, hash, route, meter, usage, done), no HTTP",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--policy", default="kvaware", help="routing policy spec (default kvaware)")
    parser.add_argument("--replicas", type=int, default=4, help="replicas (default 4)")
    parser.add_argument("--prompts", type=int, default=16, help="distinct prompts, sent in turn (default 16)")
    parser.add_argument("--prompt-bytes", type=int, default=8192, help="prompt length (default 8192)")
    parser.add_argument("--inflight", type=int, default=8, help="requests in flight at once (default 8)")
    parser.add_argument("--requests", type=int, default=2000, help="requests a batch (default 2,000)")
    parser.add_argument("--batches", type=int, default=5, help="batches; figures are medians (default 5)")
    parser.add_argument("--json", type=Path, help="write the results as JSON to this path")
    parser.set_defaults(func=run)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from load.workloads.text import text_from
    from router.config import BackendConfig, build_config
    from router.openai_request import parse_body
    from router.proxy import build_state
    from router.usage import usage_from_body

    backends = [BackendConfig(f"r{i}", f"http://127.0.0.1:{9000 + i}", ("m",)) for i in range(args.replicas)]
    config = build_config(backends=backends, overrides={"policy": args.policy}, environ={})
    state = build_state(config)
    fleet, metrics = state.fleet, state.metrics
    bodies = [
        json.dumps(
            {"model": "m", "prompt": text_from(f"bench-proxy-{i}", args.prompt_bytes), "max_tokens": 8}
        ).encode()
        for i in range(args.prompts)
    ]
    clock = time.perf_counter
    pending: list[str] = []
    batches: list[dict[str, float]] = []
    n = 0
    for _ in range(args.batches):
        spent = dict.fromkeys(STAGES, 0.0)
        for _ in range(args.requests):
            n += 1
            now = n * 0.001  # the Fleet's clock: 1,000 requests a second
            t0 = clock()
            parsed = parse_body(bodies[n % len(bodies)], "completions")
            t1 = clock()
            view = parsed.view(f"kvr-{n}", chunk_chars=config.chunk_chars, block_size=config.block_size)
            t2 = clock()
            decision = fleet.route(view, now)
            if state.migration is not None:
                state.migration.observe(view, decision)
            metrics.decisions.labels(state.policy_name, decision.reason).inc()
            t3 = clock()
            fleet.first_token(view.request_id, now)
            metrics.prompt_tokens.inc(view.prompt_tokens)
            metrics.logical_cached.inc(view.cached_tokens(metrics.seen.match_and_add(view.hashes.chained)))
            metrics.expected_cached.inc(decision.expected_cached_tokens)
            t4 = clock()
            usage = usage_from_body(ANSWER)
            if usage is not None and usage.cached_tokens is not None:
                metrics.physical_cached.inc(usage.cached_tokens)
                metrics.usage_prompt_tokens.inc(usage.prompt_tokens)
            t5 = clock()
            pending.append(view.request_id)
            if len(pending) > args.inflight:
                fleet.done(pending.pop(0), now)
            t6 = clock()
            for stage, (start, end) in zip(
                STAGES, ((t0, t1), (t1, t2), (t2, t3), (t3, t4), (t4, t5), (t5, t6)), strict=True
            ):
                spent[stage] += end - start
        batches.append({stage: spent[stage] / args.requests * 1e6 for stage in STAGES})
    per_stage = {stage: statistics.median(b[stage] for b in batches) for stage in STAGES}
    return {
        "config": {k: getattr(args, k) for k in ("policy", "replicas", "prompts", "prompt_bytes", "inflight")}
        | {"requests": args.requests * args.batches, "batches": args.batches},
        "us_per_request": {**per_stage, "total": statistics.median(sum(b.values()) for b in batches)},
        "chunks_per_request": len(parsed.view("x", chunk_chars=config.chunk_chars, block_size=16).hashes),
    }


def run(args: argparse.Namespace) -> int:
    if (
        min(args.replicas, args.prompts, args.prompt_bytes, args.requests, args.batches) <= 0
        or args.inflight < 0
    ):
        print("kvrouter bench core: sizes must be positive", file=sys.stderr)
        return 2
    results = measure(args)
    figures = results["us_per_request"]
    print(
        f"kvrouter's own logic, {results['chunks_per_request']} chunks a request, policy {args.policy}, "
        f"{args.replicas} replicas (median of {args.batches} batches of {args.requests}):"
    )
    for stage, us in figures.items():
        print(f"  {stage:>6}  {us:8.1f} µs/request")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0
