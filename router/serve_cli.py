"""`kvrouter serve`: the cache-aware, OpenAI-compatible reverse proxy in front of vLLM replicas."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from router.config import DEFAULT_ADMIN_TOKEN_ENV, ConfigError, RouterConfig, build_config, parse_backend_flag

DESCRIPTION = """\
Serve an OpenAI-compatible API (/v1/completions, /v1/chat/completions, /v1/models) and send each
request to the replica whose KV cache most likely holds its prompt's prefix, keeping load balanced.
Also: /health (router up), /ready (>= 1 healthy replica, else 503), /metrics (Prometheus), and
/admin (only with an admin token). SIGHUP re-reads --config; SIGTERM/SIGINT shut down gracefully."""

EPILOG = f"""\
examples:
  kvrouter serve --backend http://10.0.0.1:8000 --backend b=http://10.0.0.2:8000
  kvrouter serve --config router.yaml --port 8080

config file (YAML; every key optional, flags given on the command line win):
  backends:
    - name: a                      # unique; used in metrics, x-kvrouter-replica, /admin
      url: http://10.0.0.1:8000
      models: [llama-3.1-8b]       # default: whatever its /v1/models lists
      kv_capacity_tokens: 500000   # default: from vllm:cache_config_info
      kv_events: tcp://*:5557      # its KV-event PUB endpoint (`*`: the url's host), or auto | off;
                                   # default: whatever its GET /kv_event_sources names (vLLM 0.32+)
      kv_events_replay: tcp://*:5558   # its replay endpoint, to recover missed batches (optional)
      kv_events_topic: ""          # default: all topics (or the discovered one)
      kv_transfer: warmup          # hot-prefix migrations: warmup (default), p2p (the emulator's KV
                                   # export/import), lmcache (+ lmcache_instance_id) or nixl (+ nixl_host,
                                   # nixl_port); see docs/OPERATIONS.md
      prefill_tokens_per_s: 12000  # this replica's prefill speed (default: the router's)
  policy: kvaware                  # or "name:key=value,..." or {{name: ..., params: {{...}}}}
  host: 127.0.0.1
  port: 8080
  max_inflight: 1024
  max_body_bytes: 8388608
  max_retries: 2
  upstream_timeout_s: 300
  connect_timeout_s: 5
  scrape_interval_s: 1.0
  health_interval_s: 2.0
  breaker_failures: 3
  breaker_cooldown_s: 5
  breaker_max_cooldown_s: 60
  shutdown_timeout_s: 30
  migration_interval_s: 0.5        # hot-prefix controller tick (kvaware with migration=true only)
  hot_prefix:                      # the hot-prefix controller (router/hot_prefix.py); defaults shown;
                                   # SIGHUP applies changes to the running controller from its next tick
    half_life_s: 5.0               # half-life of each prefix group's decayed request rate
    hot_wait_steps: 5.0            # a group turns hot when its least-loaded holder's wait reaches this
                                   # many idle engine steps of that replica (an idle one waits 1)
    cool_wait_steps: 2.5           # ... and cool again only below this (< hot_wait_steps: hysteresis)
    headroom_wait_steps: 2.5       # a target's wait must be at most this many of its idle steps
    min_rate_rps: 1.0              # a group needs this many requests/s to turn hot
    cooldown_s: 2.0                # between two migrations of one group (0: none)
    max_concurrent: 2              # migrations in flight fleet-wide (0: none at all)
    max_holders: 8                 # no migration once a group has this many holders
    shrink_after_s: 10.0           # a cool group forgets one added holder per this many seconds
    shrink_margin: 1.5             # ... while it keeps more than its demand x this
    kv_bytes_per_token: 131072     # the model's KV size (Llama-3.1-8B), for copy-or-recompute
    copy_bytes_per_s: 2.5e+10      # the copy link, bytes/s (null: never copy, warm up only)
    copy_overhead_s: 0.005         # fixed cost of one copy
    warmup: true                   # recompute the prefix on the target when a copy cannot pay
    migration_timeout_s: 30.0      # a migration not confirmed by then counts as failed
    max_groups: 1024               # prefix groups tracked (the coldest are dropped)
    forget_rps: 0.01               # a group below this rate, with nothing in flight, is dropped
    typical_tokens: 512.0          # prefill tokens priced for each engine-waiting request not ours
  replica_header: true
  chunk_chars: 64
  block_size: 16                   # the replicas' --block-size (token ids are hashed in such blocks)
  prefill_tokens_per_s: 25000      # the replicas' prefill speed (kvaware prices queues with it)
  lmcache_controller_url: http://10.0.0.9:9000   # only with kv_transfer: lmcache backends
  tokenizer: replica               # token-precise mode: replica (POST /tokenize) or a tokenizer path
  seen_chunks: 1048576
  kv_events_silence_s: 10          # requests finished, no KV-event batch this long: approximate mode
  admin_token_env: {DEFAULT_ADMIN_TOKEN_ENV}   # or admin_token: ... (prefer the environment)"""

# flag dest -> RouterConfig field (flags default to None so that the file's value stands)
_OVERRIDES = {
    "policy": "policy",
    "host": "host",
    "port": "port",
    "replica_header": "replica_header",
    "max_inflight": "max_inflight",
    "max_body_bytes": "max_body_bytes",
    "max_retries": "max_retries",
    "upstream_timeout": "upstream_timeout_s",
    "connect_timeout": "connect_timeout_s",
    "scrape_interval": "scrape_interval_s",
    "health_interval": "health_interval_s",
    "breaker_failures": "breaker_failures",
    "breaker_cooldown": "breaker_cooldown_s",
    "shutdown_timeout": "shutdown_timeout_s",
    "admin_token_env": "admin_token_env",
    "tokenizer": "tokenizer",
    "block_size": "block_size",
    "prefill_rate": "prefill_tokens_per_s",
}


def register(commands: Any) -> None:
    from router.policies.registry import describe_policies

    d = RouterConfig.__dataclass_fields__
    p = commands.add_parser(
        "serve",
        help="run the cache-aware OpenAI-compatible proxy in front of vLLM replicas",
        description=DESCRIPTION,
        epilog=EPILOG
        + "\n\npolicies (name: what it does (parameters=defaults)):\n  "
        + describe_policies().replace("\n", "\n  "),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", type=Path, metavar="FILE", help="YAML configuration (re-read on SIGHUP)")
    p.add_argument(
        "--backend",
        action="append",
        default=[],
        metavar="[NAME=]URL",
        help="a replica's base URL, e.g. http://10.0.0.1:8000 (named host:port unless NAME= is given); "
        "repeat for each replica; adds to the config file's backends",
    )
    p.add_argument(
        "--kv-transfer",
        choices=["warmup", "p2p"],
        help="how hot-prefix migrations put a prefix on a --backend replica: warmup (a 1-token prefill "
        "on the target, works on any vLLM; the default) or p2p (a KV copy from the holder, the export/"
        "import of `kvrouter emulate` replicas); lmcache and nixl need keys of their own: use --config",
    )
    p.add_argument(
        "--policy",
        metavar="SPEC",
        help=f"routing policy, NAME or NAME:key=value,... (default {d['policy'].default}; the policies are "
        "listed below)",
    )
    p.add_argument("--host", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, help="port to listen on (default 8080; 0 picks a free one)")
    p.add_argument(
        "--no-replica-header",
        dest="replica_header",
        action="store_const",
        const=False,
        help="do not add the x-kvrouter-replica: NAME header to proxied responses",
    )
    p.add_argument(
        "--max-inflight",
        type=int,
        metavar="N",
        help="proxied requests at once; more are refused with 429 + Retry-After (default 1024)",
    )
    p.add_argument(
        "--max-body-bytes",
        type=int,
        metavar="N",
        help="largest request body; larger is refused with 413 (default 8 MiB)",
    )
    p.add_argument(
        "--max-retries",
        type=int,
        metavar="K",
        help="other replicas tried when one fails before any byte reached the client (default 2)",
    )
    p.add_argument(
        "--upstream-timeout",
        type=float,
        metavar="S",
        help="seconds a replica may stay silent: before the first byte a 504, after it an SSE "
        "error event ending the stream (default 300)",
    )
    p.add_argument(
        "--connect-timeout",
        type=float,
        metavar="S",
        help="seconds to open a connection to a replica before trying another (default 5)",
    )
    p.add_argument(
        "--scrape-interval",
        type=float,
        metavar="S",
        help="seconds between scrapes of each replica's /metrics for load (default 1.0)",
    )
    p.add_argument(
        "--health-interval",
        type=float,
        metavar="S",
        help="seconds between /health probes of each replica (default 2.0)",
    )
    p.add_argument(
        "--breaker-failures",
        type=int,
        metavar="N",
        help="consecutive failures (errors, 5xx, timeouts) that eject a replica (default 3)",
    )
    p.add_argument(
        "--breaker-cooldown",
        type=float,
        metavar="S",
        help="seconds an ejected replica rests before a probe; doubles while it fails (default 5)",
    )
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        metavar="S",
        help="on SIGTERM/SIGINT, seconds requests in flight may take to finish (default 30)",
    )
    p.add_argument(
        "--tokenizer",
        metavar="PATH|replica",
        help="token-precise mode: hash requests in token blocks, as vLLM's KV events describe them; "
        "PATH is a tokenizer.json (or a folder with it and tokenizer_config.json for chat), 'replica' "
        "asks a replica's POST /tokenize (default: none, text chunks of chunk_chars characters)",
    )
    p.add_argument(
        "--block-size",
        type=int,
        metavar="N",
        help="tokens per block when hashing token ids: the replicas' --block-size (default 16; "
        "the vLLM CPU build's default is 128)",
    )
    p.add_argument(
        "--prefill-rate",
        type=float,
        metavar="TOKENS_PER_S",
        help="the replicas' prefill speed, which kvaware turns queued and uncached tokens into seconds "
        "with (default 25000: an 8B model on an H200); a backend's own prefill_tokens_per_s wins",
    )
    p.add_argument(
        "--admin-token-env",
        metavar="NAME",
        help=f"environment variable holding the /admin bearer token (default {DEFAULT_ADMIN_TOKEN_ENV}); "
        "without a token the admin API does not exist",
    )
    p.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="(default INFO)"
    )
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> RouterConfig:
    """The configuration the flags and the file describe (ConfigError if it is unusable)."""
    backends = [replace(parse_backend_flag(b), kv_transfer=args.kv_transfer) for b in args.backend]
    overrides = {field: getattr(args, dest) for dest, field in _OVERRIDES.items()}
    config = build_config(config_path=args.config, backends=backends, overrides=overrides)
    if not config.backends and not config.admin_token:
        raise ConfigError(
            "no backends: give --backend URL, or --config FILE with backends (or an admin token)"
        )
    return config


def run(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        print(f"kvrouter serve: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import uvloop

    try:
        uvloop.run(_serve(config, lambda: config_from_args(args)))
    except OSError as exc:  # the port is taken, or the address is not ours
        print(f"kvrouter serve: error: cannot listen on {config.host}:{config.port}: {exc}", file=sys.stderr)
        return 1
    except ConfigError as exc:  # found while building the router: a tokenizer that does not load
        print(f"kvrouter serve: error: {exc}", file=sys.stderr)
        return 2
    return 0


# Young-generation threshold of the cyclic garbage collector in `kvrouter serve` (CPython's default:
# 700). Requests leave few cycles (the tracked objects they make die by reference counting), but each
# young collection walks whatever is young then — in flight, the prompts' hash tuples and buffers —
# and cost ~0.5 ms here every ~20 requests: ~5% of the router's CPU under `bench proxy` load (measured
# with gc.callbacks). At 10,000, ~1%; the garbage a cycle can hold back is still bounded.
GC_YOUNG_THRESHOLD = 10_000


def tune_gc() -> None:
    """Once the server is up: freeze what start-up made, and collect the young generation less often.

    Start-up objects (modules, the app, the fleet) live as long as the process, yet every full
    collection walked them all (~85,000 objects, scipy's included: ~40 ms, a stall of every request
    in flight); frozen, full collections walk only what requests made since."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


async def _serve(config: RouterConfig, source: Any) -> None:
    from router.server import RouterServer

    log = logging.getLogger("kvrouter")
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    async def reload() -> None:
        try:
            diff = await server.reload()
            log.info("reloaded: +%s -%s ~%s", list(diff.added), list(diff.removed), list(diff.updated))
        except ConfigError as exc:
            log.error("reload refused, keeping the running configuration: %s", exc)

    reloads: set[asyncio.Task[None]] = set()

    def on_sighup() -> None:
        task = asyncio.create_task(reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    server = RouterServer(config, config_source=source)
    async with server:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, on_sighup)
        tune_gc()
        log.info(
            "kvrouter serving on %s: %d backend(s), policy %s",
            server.url,
            len(config.backends),
            config.policy,
        )
        await stop.wait()
        log.info("shutting down: waiting up to %.0fs for requests in flight", config.shutdown_timeout_s)
