"""The admin API under /admin: see and change the fleet at run time. Bearer-token guarded.

Rules:
- Without an admin token configured (`admin_token` in the file, or the variable named by
  `admin_token_env`, default KVROUTER_ADMIN_TOKEN) the admin API does not exist: every /admin path
  answers 404 like any unknown route. A reload that sets a token turns it on.
- With one, every request needs `Authorization: Bearer <token>`, compared with `hmac.compare_digest`
  on bytes (constant time, and safe for non-ASCII input); anything else is a 401.
- Endpoints: GET /admin/replicas (state, load and KV-event stream, `kv_event_state`, of each); POST
  /admin/replicas {name, url, models?, kv_capacity_tokens?, kv_events?, kv_events_replay?,
  kv_events_topic?, kv_transfer?, lmcache_instance_id?, nixl_host?, nixl_port?} → 201
  (400 when its kv_transfer cannot work among the others: "lmcache" without the router's
  `lmcache_controller_url`, or an LMCache instance id or NIXL address another replica has); DELETE
  /admin/replicas/{name}; POST /admin/replicas/{name}/drain (optional body {"draining": false} to
  undrain); GET /admin/index.
- Hot-prefix migration (only with kvaware and `migration` on; else 404): GET /admin/hot (the hottest groups,
  keys as strings, each hot one's `waiting_for` when no migration starts, the migrations in flight, the
  controller's `hot_prefix` parameters in force, and `idle_step_s`: each replica's idle engine step in
  seconds, the unit of the `*_wait_steps` thresholds); POST /admin/migrations {"group": "KEY", "target":
  NAME} → 202 with the plan, which runs in the background (404 for an unknown group or target, 400 for a
  forbidden group, a target that already holds it, or a spent budget); POST /admin/hot/{group}/forbid
  (optional body {"forbidden": false} to allow again). A plan's `mechanism` is the one that runs it, "copy"
  or "warmup" (the controller knows which backends can copy to which, router/migration.py).
- Replicas added here live until deleted here or a reload's configuration removes that name; a
  reload leaves alone the replicas it never configured.
"""

from __future__ import annotations

import hmac
import json

from aiohttp import web

from router.config import ConfigError, backend_from_mapping, check_transfer_peers
from router.errors import ProxyError, json_response
from router.kv_subscriber import KV_EVENTS
from router.migration import MigrationRunner, plan_json
from router.proxy import STATE, Handler, RouterState, read_json_body
from router.upstream import Replica

_ADMIN_BODY_MAX = 64 * 1024


def _token_ok(header: str, token: str) -> bool:
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.strip().encode("utf-8", "surrogateescape"), token.encode("utf-8"))


@web.middleware
async def require_token(request: web.Request, handler: Handler) -> web.StreamResponse:
    token = request.config_dict[STATE].config.admin_token
    if not token:
        raise web.HTTPNotFound()
    if not _token_ok(request.headers.get("Authorization", ""), token):
        exc = ProxyError(
            401,
            "a valid admin bearer token is required",
            err_type="authentication_error",
            code="invalid_admin_token",
        )
        response = exc.response()
        response.headers["WWW-Authenticate"] = 'Bearer realm="kvrouter-admin"'
        return response
    return await handler(request)


def _describe(state: RouterState, replica: Replica) -> dict[str, object]:
    fs = state.fleet.replicas[replica.name]
    now = state.clock()
    return {
        "name": replica.name,
        "url": replica.url,
        "models": sorted(fs.models),
        "configured_models": list(replica.config.models),
        "kv_events": replica.config.kv_events,
        "kv_transfer": replica.config.kv_transfer,
        "lmcache_instance_id": replica.config.lmcache_instance_id,
        "nixl_host": replica.config.nixl_host,
        "nixl_port": replica.config.nixl_port,
        "healthy": fs.healthy,
        "draining": fs.draining,
        "available": fs.available,
        "breaker": {
            "state": replica.breaker.state.value,
            "consecutive_failures": replica.breaker.failures,
            "ejections": replica.breaker.ejections,
            "cooldown_s": replica.breaker.cooldown_s,
        },
        "load": {
            "inflight_requests": fs.inflight_requests,
            "prefill_requests": fs.prefill_requests,
            "inflight_prefill_tokens": fs.inflight_prefill_tokens,
            "inflight_decode_tokens": fs.inflight_decode_tokens,
            "active_kv_tokens": round(fs.active_kv_tokens),
        },
        "engine": {
            "num_requests_waiting": fs.num_requests_waiting,
            "num_requests_running": fs.num_requests_running,
            "kv_cache_usage_perc": fs.kv_cache_usage_perc,
            "kv_capacity_tokens": fs.kv_capacity_tokens,
            "block_size": fs.block_size,
            "scrape_age_s": None if fs.scraped_at is None else round(now - fs.scraped_at, 3),
        },
        "index_entries": state.fleet.index.size(replica.name),
    }


def _replica(state: RouterState, request: web.Request) -> Replica:
    name = request.match_info["name"]
    replica = state.replicas.get(name)
    if replica is None:
        raise ProxyError(404, f"no replica named {name!r}", code="replica_not_found", param="name")
    return replica


async def _json(request: web.Request, *, required: bool) -> object:
    if not required and (not request.body_exists or request.content_length == 0):
        return {}  # a bare POST (curl -X POST, or a client that labels it octet-stream)
    raw = await read_json_body(request, _ADMIN_BODY_MAX)
    if not raw.strip() and not required:
        return {}
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        raise ProxyError(400, "request body is not valid JSON", code="invalid_json") from None


def _with_events(request: web.Request, described: dict[str, object]) -> dict[str, object]:
    """Add the replica's KV-event stream state (router/kv_subscriber.py), when the router follows any."""
    subscribers = request.config_dict.get(KV_EVENTS)
    if subscribers is not None:
        described["kv_event_state"] = subscribers.describe(str(described["name"]))
    return described


def _sync_events(request: web.Request) -> None:
    subscribers = request.config_dict.get(KV_EVENTS)
    if subscribers is not None:
        subscribers.sync()


async def list_replicas(request: web.Request) -> web.StreamResponse:
    state = request.config_dict[STATE]
    return json_response(
        {"replicas": [_with_events(request, _describe(state, r)) for r in state.replicas.all()]}
    )


async def add_replica(request: web.Request) -> web.StreamResponse:
    state = request.config_dict[STATE]
    try:
        backend = backend_from_mapping(await _json(request, required=True), "replica")
    except ConfigError as exc:
        raise ProxyError(400, str(exc), code="invalid_replica") from None
    if backend.name in state.replicas:
        raise ProxyError(409, f"replica {backend.name!r} already exists", code="replica_exists", param="name")
    try:  # the fleet-wide rules of kv_transfer (router/config.py), with this replica among the others
        backends = (*(r.config for r in state.replicas.all()), backend)
        check_transfer_peers(backends, state.config.lmcache_controller_url)
    except ConfigError as exc:
        raise ProxyError(400, str(exc), code="invalid_replica") from None
    replica = state.replicas.add(backend)
    if state.upstream is not None:
        await state.upstream.probe(replica, initial=True)  # health and models before it takes traffic
    _sync_events(request)  # its KV events, now that its models are known
    return json_response(_with_events(request, _describe(state, replica)), status=201)


async def delete_replica(request: web.Request) -> web.StreamResponse:
    state = request.config_dict[STATE]
    replica = _replica(state, request)
    state.replicas.remove(replica.name)
    _sync_events(request)  # at once: no await since the removal
    return json_response({"deleted": replica.name})


async def drain_replica(request: web.Request) -> web.StreamResponse:
    state = request.config_dict[STATE]
    replica = _replica(state, request)
    body = await _json(request, required=False)
    draining = body.get("draining", True) if isinstance(body, dict) else None
    if not isinstance(draining, bool):
        raise ProxyError(
            400, 'body must be {} or {"draining": true|false}', code="invalid_value", param="draining"
        )
    if state.replicas.get(replica.name) is replica:
        state.fleet.set_draining(replica.name, draining)
    return json_response(_describe(state, replica))


async def index_stats(request: web.Request) -> web.StreamResponse:
    state = request.config_dict[STATE]
    stats = state.fleet.index.stats()
    return json_response(
        {
            "replicas": stats.replicas,
            "entries": stats.entries,
            "unique_hashes": stats.unique_hashes,
            "evictions": stats.evictions,
            "per_replica": dict(stats.per_replica),
            "capacity": dict(stats.capacity),
            "seen_chunks": len(state.metrics.seen),
            "inflight_requests": state.fleet.inflight_count(),
        }
    )


def _runner(state: RouterState) -> MigrationRunner:
    if state.migration is None:
        raise web.HTTPNotFound()
    return state.migration


def _group_key(raw: object) -> int:
    if isinstance(raw, str):
        try:
            return int(raw)
        except ValueError:
            pass
    raise ProxyError(
        400, "group must be a group key as a decimal string", code="invalid_value", param="group"
    )


async def hot_groups(request: web.Request) -> web.StreamResponse:
    return json_response(_runner(request.config_dict[STATE]).view())


async def start_migration(request: web.Request) -> web.StreamResponse:
    state = request.config_dict[STATE]
    runner = _runner(state)
    body = await _json(request, required=True)
    if not isinstance(body, dict):
        raise ProxyError(400, 'body must be {"group": "KEY", "target": NAME}', code="invalid_value")
    group, target = _group_key(body.get("group")), body.get("target")
    if not isinstance(target, str):
        raise ProxyError(400, "target must be a replica name", code="invalid_value", param="target")
    try:
        plan = runner.controller.plan_manual(group, target, state.fleet, state.clock())
    except ValueError as exc:
        status = 404 if str(exc).startswith("unknown") else 400
        raise ProxyError(status, str(exc), code="migration_refused") from None
    runner.launch(plan)
    return json_response(plan_json(plan), status=202)


async def forbid_group(request: web.Request) -> web.StreamResponse:
    state = request.config_dict[STATE]
    runner = _runner(state)
    group = _group_key(request.match_info["group"])
    body = await _json(request, required=False)
    forbidden = body.get("forbidden", True) if isinstance(body, dict) else None
    if not isinstance(forbidden, bool):
        raise ProxyError(
            400, 'body must be {} or {"forbidden": true|false}', code="invalid_value", param="forbidden"
        )
    runner.controller.forbid(group, forbidden)
    return json_response({"group": str(group), "forbidden": forbidden})


def build_admin_app() -> web.Application:
    app = web.Application(middlewares=[require_token])
    app.router.add_get("/replicas", list_replicas)
    app.router.add_post("/replicas", add_replica)
    app.router.add_delete("/replicas/{name}", delete_replica)
    app.router.add_post("/replicas/{name}/drain", drain_replica)
    app.router.add_get("/index", index_stats)
    app.router.add_get("/hot", hot_groups)
    app.router.add_post("/migrations", start_migration)
    app.router.add_post("/hot/{group}/forbid", forbid_group)
    return app
