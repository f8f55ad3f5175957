"""The HTTP surface of one emulated replica (aiohttp): parse, call the engine driver, stream. Thin.

Routes (vLLM's OpenAI server unless marked; shapes in `protocol`):
    POST /v1/completions, /v1/chat/completions      generation, streaming or not
    GET  /v1/models, /health, /version, /load, /metrics, /kv_event_sources
    POST /tokenize, /reset_prefix_cache
    POST /kvrouter/kv/export, /kvrouter/kv/import    P2P KV transfer (emulator only; see p2p.py)
    GET|POST /kvrouter/faults                        fault injection (emulator only; see faults.py)

Rules:
- A request id is `cmpl-<uuid4 hex>` / `chatcmpl-<uuid4 hex>`, as vLLM's; `created` is Unix seconds.
- A request leaves the engine when its handler ends, however it ends: the runner cancels a handler
  whose client disconnected (`handler_cancellation=True`), and `finally` aborts the request, releasing
  its KV blocks at once, as vLLM does on a disconnect.
- Streams are written one chunk per engine step (vLLM's granularity). The chat role chunk goes out with
  the first token, not before it, so a client's time to first chunk is the time to first token.
- `/kv_event_sources` answers `{}` when the replica publishes no KV events; `/version` reports the vLLM
  release whose KV-event wire it speaks (0.32.0 for the map encoding, 0.24.0 for the array one).
- Every error is a vLLM-like JSON body (`protocol.error_body`); nothing a client sends yields a 500.
  Request bodies are bounded (`ReplicaConfig.max_body_bytes`, 413 beyond).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from workers.emulator import p2p, protocol
from workers.emulator.driver import RequestStream
from workers.emulator.faults import Faults
from workers.emulator.metrics import CONTENT_TYPE, render
from workers.emulator.protocol import ApiError, GenerationRequest, error_body
from workers.engine import tokenizer

if TYPE_CHECKING:
    from workers.emulator.replica import Replica

logger = logging.getLogger(__name__)

REPLICA: web.AppKey[Replica] = web.AppKey("replica")
GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
ENGINE_PATHS = GENERATION_PATHS | {"/kvrouter/kv/export", "/kvrouter/kv/import"}
FAULTS_PATH = "/kvrouter/faults"
# What /version reports: the vLLM release whose KV-event wire this replica speaks.
EMULATED_VLLM_VERSION = {"map": "0.32.0", "array": "0.24.0"}
_ENGINE_DEAD = "EngineCore encountered an issue. See stack trace (above) for the root cause."
_STATUS_TYPES = {400: "BadRequestError", 404: "NotFoundError", 500: "InternalServerError"}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(body: object, status: int = 200) -> web.Response:
    return web.json_response(body, status=status, dumps=_compact)


def _compact(obj: object) -> str:
    return json.dumps(obj, separators=(",", ":"))  # vLLM's pydantic output is compact too


def _error(message: str, err_type: str, status: int) -> web.Response:
    return _json(error_body(message, err_type, status), status)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return _error(exc.message, exc.err_type, exc.status)
    except web.HTTPException as exc:  # aiohttp's own: unknown route, wrong method, body too large
        if exc.status < 400:
            raise
        return _error(exc.text or exc.reason, _STATUS_TYPES.get(exc.status, "BadRequestError"), exc.status)
    except (asyncio.CancelledError, ConnectionError):
        raise  # the client went away: nothing to answer
    except Exception:
        logger.exception("unhandled error serving %s %s", request.method, request.path)
        return _error("Internal server error", "InternalServerError", 500)


@web.middleware
async def fault_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Applies the replica's injected faults (faults.py); the faults endpoint itself is exempt."""
    if request.path == FAULTS_PATH:
        return await handler(request)
    replica = request.app[REPLICA]
    if replica.faults.hang:
        await replica.wait_unhung()  # cancelled with the handler if the client goes away
    if replica.faults.latency_s > 0:
        await asyncio.sleep(replica.faults.latency_s)
    path = request.path
    if (
        path in GENERATION_PATHS
        and replica.faults.error_rate > 0
        and replica.draw() < replica.faults.error_rate
    ):
        return _error("injected fault: internal server error", "InternalServerError", 500)
    if path in ENGINE_PATHS and not replica.healthy:
        return _error(_ENGINE_DEAD, "EngineDeadError", 500)
    return await handler(request)


async def _body(request: web.Request) -> Any:
    return protocol.parse_json(await request.read())  # read() enforces client_max_size (413)


def _drop_connection(request: web.Request) -> None:
    """Close the connection without a proper end, as a crashed server does."""
    if request.transport is not None:
        request.transport.abort()


async def _generate(request: web.Request, req: GenerationRequest) -> web.StreamResponse:
    replica = request.app[REPLICA]
    request_id = f"{'cmpl' if req.kind == 'completion' else 'chatcmpl'}-{uuid.uuid4().hex}"
    try:
        stream = replica.driver.submit(request_id, req.prompt_token_ids, req.max_tokens, stream=req.stream)
    except ValueError as exc:  # the engine's own checks (parse already applied vLLM's)
        raise ApiError(str(exc)) from None
    try:
        if req.stream:
            return await _stream(request, req, request_id, stream)
        return await _collect(request, req, request_id, stream)
    finally:
        replica.driver.abort(request_id)  # a no-op when it finished


async def _collect(
    request: web.Request, req: GenerationRequest, request_id: str, stream: RequestStream
) -> web.StreamResponse:
    created = int(time.time())
    deltas = await stream.take()  # all of them: a non-streaming stream wakes once, at the end
    if stream.dead:
        _drop_connection(request)
        return web.Response(status=500)  # never reaches the client: its connection is gone
    tokens = [d.token_id for d in deltas]
    done = deltas[-1].finished
    assert done is not None
    usage = protocol.usage(done.prompt_tokens, done.completion_tokens, done.cached_tokens)
    text = tokenizer.detokenize(tokens)
    body = protocol.response_body(req, request_id, created, text, usage, done.finish_reason)
    return _json(body)


async def _stream(
    request: web.Request, req: GenerationRequest, request_id: str, stream: RequestStream
) -> web.StreamResponse:
    created = int(time.time())
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
    await resp.prepare(request)
    first = True
    while True:
        deltas = await stream.take()  # may already hold every delta: an instant engine outruns us
        if stream.dead:
            _drop_connection(request)
            return resp
        out = b""
        for delta in deltas:  # one chunk per engine step, written together if the handler lagged
            if first and req.kind == "chat":
                out += protocol.sse(protocol.chat_role_chunk(req, request_id, created))
            first = False
            done = delta.finished
            text = tokenizer.token_text(delta.token_id)
            finish = None if done is None else done.finish_reason
            out += protocol.sse(protocol.chunk_body(req, request_id, created, text, finish))
            if done is not None:
                if req.include_usage:
                    usage = protocol.usage(done.prompt_tokens, done.completion_tokens, done.cached_tokens)
                    out += protocol.sse(protocol.usage_chunk(req, request_id, created, usage))
                out += protocol.SSE_DONE
        await resp.write(out)
        if deltas and deltas[-1].finished is not None:
            break
    await resp.write_eof()
    return resp


async def completions(request: web.Request) -> web.StreamResponse:
    replica = request.app[REPLICA]
    body = await _body(request)
    return await _generate(
        request, protocol.parse_completion(body, replica.model, replica.engine.max_model_len)
    )


async def chat_completions(request: web.Request) -> web.StreamResponse:
    replica = request.app[REPLICA]
    body = await _body(request)
    return await _generate(request, protocol.parse_chat(body, replica.model, replica.engine.max_model_len))


async def tokenize(request: web.Request) -> web.Response:
    replica = request.app[REPLICA]
    tokens = protocol.parse_tokenize(await _body(request), replica.model)
    max_len = replica.engine.max_model_len
    return _json({"count": len(tokens), "max_model_len": max_len, "tokens": tokens, "token_strs": None})


async def models(request: web.Request) -> web.Response:
    replica = request.app[REPLICA]
    card = {
        "id": replica.model,
        "object": "model",
        "created": replica.started,
        "owned_by": "vllm",
        "root": replica.model,
        "parent": None,
        "max_model_len": replica.engine.max_model_len,
        "permission": [],
    }
    return _json({"object": "list", "data": [card]})


async def health(request: web.Request) -> web.Response:
    return web.Response(status=200 if request.app[REPLICA].healthy else 503)


async def version(request: web.Request) -> web.Response:
    return _json({"version": EMULATED_VLLM_VERSION[request.app[REPLICA].config.kv_events_encoding]})


async def load(request: web.Request) -> web.Response:
    return _json({"server_load": request.app[REPLICA].driver.num_streams})


async def metrics(request: web.Request) -> web.Response:
    body = render(request.app[REPLICA].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def kv_event_sources(request: web.Request) -> web.Response:
    publisher = request.app[REPLICA].publisher
    return _json({} if publisher is None else {"0": publisher.config()})


async def reset_prefix_cache(request: web.Request) -> web.Response:
    replica = request.app[REPLICA]
    if not replica.engine.reset_prefix_cache():
        raise ApiError("prefix cache reset refused while requests hold blocks")
    replica.driver.wake()  # publish AllBlocksCleared
    return web.Response(status=200)


async def get_faults(request: web.Request) -> web.Response:
    return _json(request.app[REPLICA].faults.to_json())


async def set_faults(request: web.Request) -> web.Response:
    replica = request.app[REPLICA]
    try:
        faults = Faults.from_json(await _body(request))
    except ValueError as exc:
        raise ApiError(str(exc)) from None
    await replica.set_faults(faults)
    return _json(replica.faults.to_json())


async def kv_export(request: web.Request) -> web.StreamResponse:
    return await p2p.handle_export(request, request.app[REPLICA])


async def kv_import(request: web.Request) -> web.Response:
    return await p2p.handle_import(request, request.app[REPLICA])


def build_app(replica: Replica) -> web.Application:
    app = web.Application(
        middlewares=[error_middleware, fault_middleware], client_max_size=replica.config.max_body_bytes
    )
    app[REPLICA] = replica
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/version", version)
    app.router.add_get("/load", load)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/kv_event_sources", kv_event_sources)
    app.router.add_post("/tokenize", tokenize)
    app.router.add_post("/reset_prefix_cache", reset_prefix_cache)
    app.router.add_post("/kvrouter/kv/export", kv_export)
    app.router.add_post("/kvrouter/kv/import", kv_import)
    app.router.add_get(FAULTS_PATH, get_faults)
    app.router.add_post(FAULTS_PATH, set_faults)
    return app
