"""The OpenAI-compatible, cache-aware reverse proxy: the aiohttp application and its thin handlers.

Rules:
- A generation handler parses the body once (router/openai_request.py), asks the core for a replica
  (`Fleet.route`), forwards and streams (router/forward.py), and reports completion: `Fleet.done`
  runs in a `finally`, whatever happened.
- Errors are translated once, at the edge: the `edge` middleware turns a `ProxyError`, aiohttp's own
  HTTP errors (no route, wrong method) and anything unexpected into an OpenAI-style JSON error, and
  counts every answer in `router_requests_total{route,code}` (499 for a client that went away).
- Order of refusals for a generation request: 429 (over `max_inflight`, before reading the body),
  415 (a Content-Type that is not JSON), 413 (body over `max_body_bytes`), 400 (malformed), 404
  (no replica serves the model), 503 (none of those is healthy), then the replica's answer.
- State lives in one `RouterState` under a typed `web.AppKey`; the `cleanup_ctx` generator owns the
  pooled ClientSession and the background probe/scrape tasks, so they are cleaned up iff they started.
- Everything per request reads `state.config` when it needs it, so a reload (`apply_config`) takes
  effect for the next request; only host and port need a restart.
- Token-precise mode (`tokenizer` set, router/tokenize.py): a text prompt or a conversation is
  tokenized before routing and hashed in token blocks; token-id prompts need nothing more. The body
  sent to the replica is still the client's, byte for byte. A tokenization failure is counted
  (`router_tokenize_failures_total{reason}`) and the request is hashed as text: it never fails for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from router.config import RouterConfig
from router.errors import ProxyError, from_http_exception, json_response
from router.fleet import Fleet, FleetConfig
from router.forward import ClientGone, Exchange
from router.metrics import RouterMetrics
from router.migration import MigrationRunner, make_runner
from router.openai_request import SESSION_HEADER, Endpoint, ParsedRequest, parse_body
from router.policies.base import CHARS_PER_TOKEN
from router.tokenize import TokenizeError, Tokenizer, make_tokenizer
from router.upstream import ReloadDiff, ReplicaSet, UpstreamClient

log = logging.getLogger("kvrouter.proxy")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# A failing tokenizer fails every request alike; one warning a minute says so, the metric counts them.
TOKENIZE_WARN_EVERY_S = 60.0


@dataclass(slots=True)
class RouterState:
    """The running router: configuration, the core (Fleet), the replicas, metrics and I/O handles."""

    config: RouterConfig
    fleet: Fleet
    replicas: ReplicaSet
    metrics: RouterMetrics
    policy_name: str
    clock: Callable[[], float] = time.monotonic  # the Fleet's `now`: monotonic seconds
    session: aiohttp.ClientSession | None = None
    upstream: UpstreamClient | None = None
    inflight: int = 0
    request_seq: int = 0
    tasks: list[asyncio.Task[None]] = field(default_factory=list)  # the probe and scrape loops
    probes: set[asyncio.Task[None]] = field(default_factory=set)  # first probes of joining replicas
    migration: MigrationRunner | None = None  # the hot-prefix driver (kvaware with migration on)
    tokenizer: Tokenizer | None = None  # token-precise mode (router/tokenize.py); None: text hashing
    tokenize_warned_at: float = -math.inf


STATE = web.AppKey("kvrouter_state", RouterState)


def build_state(config: RouterConfig) -> RouterState:
    """The router's state for `config` (ConfigError if its local tokenizer cannot be loaded)."""
    # Tokens per index entry, to size the index from the replicas' KV capacity: a block in
    # token-precise mode, else a text chunk's estimated tokens.
    chunk_tokens = config.block_size if config.tokenizer is not None else config.chunk_chars / CHARS_PER_TOKEN
    fleet_config = FleetConfig(
        prefill_tokens_per_s=config.prefill_tokens_per_s,
        block_size=config.block_size,
        index_chunk_tokens=chunk_tokens,
    )
    fleet = Fleet(config.make_policy(), fleet_config)
    metrics = RouterMetrics(config.seen_chunks)
    replicas = ReplicaSet(fleet, config, metrics)
    for backend in config.backends:
        replicas.add(backend)
    state = RouterState(config, fleet, replicas, metrics, config.policy_name)
    state.migration = make_runner(fleet, replicas, metrics, state.clock, config.hot_prefix)
    state.tokenizer = _make_tokenizer(state, config)
    return state


def _make_tokenizer(state: RouterState, config: RouterConfig) -> Tokenizer | None:
    def replica_urls(model: str) -> Sequence[str]:
        # The Fleet's candidates: healthy, not draining, serving the model, sorted by name.
        found = (state.replicas.get(s.name) for s in state.fleet.candidates(model))
        return [r.url for r in found if r is not None]

    return make_tokenizer(config.tokenizer, session=lambda: state.session, replica_urls=replica_urls)


def apply_config(state: RouterState, new: RouterConfig) -> ReloadDiff:
    """Make a running router use `new` (a SIGHUP reload or an in-process call): backends are diffed
    against the previous configuration's, a changed policy starts fresh, breakers take the new limits."""
    old = state.config
    if (new.host, new.port, new.seen_chunks) != (old.host, old.port, old.seen_chunks):
        log.warning("host, port and seen_chunks changes take effect at the next restart")
    if new.tokenizer != old.tokenizer:
        # Loaded first: a tokenizer that cannot load refuses the reload before anything changed.
        # The index keeps its entries of the other hashing; they match nothing and age out.
        tokenizer, old_tokenizer = _make_tokenizer(state, new), state.tokenizer
        state.tokenizer = tokenizer
        if old_tokenizer is not None:
            task = asyncio.create_task(old_tokenizer.close())
            state.probes.add(task)
            task.add_done_callback(state.probes.discard)
    if (new.policy, new.policy_params) != (old.policy, old.policy_params):
        state.fleet.attach(new.make_policy())
        state.policy_name = new.policy_name
        old_runner = state.migration
        state.migration = make_runner(state.fleet, state.replicas, state.metrics, state.clock, new.hot_prefix)
        if state.migration is not None:
            state.migration.session = state.session
        if old_runner is not None:  # its migrations report to a controller nobody reads any more
            task = asyncio.create_task(old_runner.stop())
            state.probes.add(task)
            task.add_done_callback(state.probes.discard)
    elif state.migration is not None and new.hot_prefix != old.hot_prefix:
        state.migration.retune(new.hot_prefix)  # in place: the groups' state and migrations are kept
    state.config = state.replicas.config = new
    diff = state.replicas.apply(new.backends, old.backends)
    if state.upstream is not None:
        # A replica that joins at run time takes no traffic until a first probe has seen it up and
        # learned its models (at startup the first probe round runs before serving).
        for name in (*diff.added, *diff.updated):
            replica = state.replicas.get(name)
            if name in diff.added:
                state.fleet.set_healthy(name, False)
            if replica is not None:
                task = asyncio.create_task(state.upstream.probe(replica, initial=True))
                state.probes.add(task)
                task.add_done_callback(state.probes.discard)
    for replica in state.replicas.all():
        breaker = replica.breaker
        breaker.failure_threshold = new.breaker_failures
        breaker.base_cooldown_s = new.breaker_cooldown_s
        breaker.max_cooldown_s = new.breaker_max_cooldown_s
    log.info(
        "configuration applied: added %s, removed %s, updated %s", diff.added, diff.removed, diff.updated
    )
    return diff


def _route_label(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def edge(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Translate every error to an OpenAI JSON body, once, and count every answer."""
    state = request.config_dict[STATE]
    code = "500"
    try:
        response = await handler(request)
        code = str(response.status)
        return response
    except ProxyError as exc:
        code = str(exc.status)
        return exc.response()
    except ClientGone as exc:
        code = "499"
        state.metrics.client_disconnects.inc()
        return exc.response
    except web.HTTPException as exc:
        code = str(exc.status)
        if exc.status < 400:
            raise
        response = from_http_exception(exc).response()
        if "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except asyncio.CancelledError:  # the client went away (handler_cancellation) or shutdown
        code = "499"
        state.metrics.client_disconnects.inc()
        raise
    except Exception:
        log.exception("unexpected error on %s %s", request.method, request.path)
        return ProxyError(
            500, "internal router error", err_type="server_error", code="internal_error"
        ).response()
    finally:
        state.metrics.requests.labels(_route_label(request), code).inc()


async def read_json_body(request: web.Request, max_bytes: int) -> bytes:
    """The whole body, refusing a non-JSON Content-Type (415) and anything over `max_bytes` (413)."""
    if request.headers.get("Content-Type", "").strip():
        mime = request.content_type
        if mime != "application/json" and not mime.endswith("+json"):
            raise ProxyError(
                415, f"Content-Type must be application/json, got {mime!r}", code="unsupported_media_type"
            )
    too_large = ProxyError(413, f"request body is larger than {max_bytes} bytes", code="request_too_large")
    if request.content_length is not None and request.content_length > max_bytes:
        raise too_large
    parts: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > max_bytes:
            raise too_large
        parts.append(chunk)
    return b"".join(parts)


async def _generation(request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
    state = request.app[STATE]
    cfg = state.config
    started = state.clock()
    if state.inflight >= cfg.max_inflight:
        raise ProxyError(
            429,
            f"the router has {state.inflight} requests in flight (max_inflight {cfg.max_inflight})",
            err_type="rate_limit_error",
            code="too_many_requests",
            retry_after_s=1.0,
        )
    state.inflight += 1  # admitted: the slot is held from here, body reading included
    request_id = ""
    route = _route_label(request)
    try:
        body = await read_json_body(request, cfg.max_body_bytes)
        parsed = parse_body(body, endpoint, request.headers.get(SESSION_HEADER))
        if not state.replicas.knows_model(parsed.model):
            raise ProxyError(
                404, f"The model `{parsed.model}` does not exist.", code="model_not_found", param="model"
            )
        assert state.session is not None, "the cleanup context opens the session before requests arrive"
        state.request_seq += 1
        request_id = f"kvr-{state.request_seq}"
        token_ids = None
        if state.tokenizer is not None and parsed.needs_tokens:
            token_ids = await _token_ids(state, state.tokenizer, parsed)
        view = parsed.view(
            request_id, chunk_chars=cfg.chunk_chars, block_size=cfg.block_size, token_ids=token_ids
        )
        exchange = Exchange(
            request=request,
            body=body,
            view=view,
            route=route,
            started=started,
            fleet=state.fleet,
            replicas=state.replicas,
            metrics=state.metrics,
            clock=state.clock,
            session=state.session,
            policy_name=state.policy_name,
            migration=state.migration,
        )
        response = await exchange.run()
        state.metrics.e2e.labels(route).observe(state.clock() - started)
        return response
    finally:
        state.inflight -= 1
        if request_id:
            state.fleet.done(request_id, state.clock())


async def _token_ids(state: RouterState, tokenizer: Tokenizer, parsed: ParsedRequest) -> list[int] | None:
    """The ids the replica will compute for this request, or None (counted) to hash it as text."""
    started = state.clock()
    options = parsed.token_options or {}
    try:
        if parsed.messages is not None:
            return await tokenizer.chat_ids(parsed.model, parsed.messages, options)
        assert isinstance(parsed.prompt, str), "needs_tokens: text or chat"
        return await tokenizer.completion_ids(parsed.model, parsed.prompt, options)
    except TokenizeError as exc:
        reason, detail = exc.reason, str(exc)
    except Exception as exc:  # a bug must cost this request its precision, not its answer
        log.exception("tokenizer failed unexpectedly")
        reason, detail = "internal", repr(exc)
    finally:
        state.metrics.tokenize_seconds.observe(state.clock() - started)
    state.metrics.tokenize_failures.labels(reason).inc()
    now = state.clock()
    if now - state.tokenize_warned_at >= TOKENIZE_WARN_EVERY_S:
        state.tokenize_warned_at = now
        log.warning("tokenization failed (%s), hashing the request as text: %s", reason, detail)
    return None


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generation(request, "completions")


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generation(request, "chat")


async def models(request: web.Request) -> web.StreamResponse:
    return json_response({"object": "list", "data": request.app[STATE].replicas.model_objects()})


async def health(request: web.Request) -> web.StreamResponse:
    return json_response({"status": "ok"})


async def ready(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    available = sum(1 for s in state.fleet.replicas.values() if s.available)
    if not available:
        raise ProxyError(
            503,
            f"no healthy replica ({len(state.fleet.replicas)} configured)",
            err_type="service_unavailable",
            code="no_healthy_replica",
            retry_after_s=state.config.health_interval_s,
        )
    return json_response({"status": "ready", "replicas": len(state.fleet.replicas), "available": available})


async def metrics(request: web.Request) -> web.StreamResponse:
    # Text format 0.0.4, which every Prometheus release parses (all our names are legacy-valid).
    state = request.app[STATE]
    state.metrics.observe_fleet(state.fleet, state.inflight)
    return web.Response(body=state.metrics.render(), headers={"Content-Type": CONTENT_TYPE_PLAIN_0_0_4})


def _session(config: RouterConfig) -> aiohttp.ClientSession:
    # One pooled session for all replicas. The connection cap is sized for a proxy: every admitted
    # request may hold a connection (max_inflight), plus probes and scrapes; aiohttp's default of 100
    # would silently queue requests inside the router. No cookie jar: a proxy must not carry one
    # client's cookies into another's request. No decompression: bodies pass byte for byte.
    connector = aiohttp.TCPConnector(limit=config.max_inflight + 256, limit_per_host=0, keepalive_timeout=30)
    return aiohttp.ClientSession(
        connector=connector,
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
        trust_env=False,
    )


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    """Own the session and the background loops: opened before serving, closed after."""
    state = app[STATE]
    state.session = _session(state.config)
    if state.migration is not None:
        state.migration.session = state.session

    async def _migrate() -> None:  # the hot-prefix controller's tick (a no-op while migration is off)
        if state.migration is not None:
            state.migration.tick()

    upstream = state.upstream = UpstreamClient(state.session, state.replicas, state.clock)
    try:
        await upstream.health_round(initial=True)  # first health and models before the first request
        state.tasks = [
            asyncio.create_task(
                upstream.run_every(lambda: state.config.health_interval_s, upstream.health_round)
            ),
            asyncio.create_task(
                upstream.run_every(lambda: state.config.scrape_interval_s, upstream.scrape_round)
            ),
            asyncio.create_task(upstream.run_every(lambda: state.config.migration_interval_s, _migrate)),
        ]
        yield
    finally:
        if state.migration is not None:
            await state.migration.stop()
        if state.tokenizer is not None:
            await state.tokenizer.close()
        running = [*state.tasks, *state.probes]
        for task in running:
            task.cancel()
        for task in running:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        state.tasks = []
        await state.session.close()


def build_app(config: RouterConfig, *, state: RouterState | None = None) -> web.Application:
    """The router as an aiohttp application (serve it with an AppRunner; see router/server.py)."""
    from router.admin import build_admin_app

    app = web.Application(middlewares=[edge])
    app[STATE] = state if state is not None else build_state(config)
    app.cleanup_ctx.append(_lifecycle)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", metrics)
    app.add_subapp("/admin", build_admin_app())
    return app
