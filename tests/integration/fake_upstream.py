"""A FAKE OpenAI-like upstream for the router's integration tests, and small request helpers.

`FakeReplica` is a fake, not vLLM and not the emulator (workers/emulator): a few dozen lines of aiohttp
answering /v1/completions, /v1/chat/completions, /v1/models, /health and /metrics with deterministic
bytes (the same request body always gets the same response bytes), whose behaviour tests steer through
plain attributes: fail with a status, hang, stream slowly, wait on a gate after the first chunk, cut
or stall a stream. It records what it received and whether the client (the router) went away.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from loopback import LoopbackServer
from multidict import CIMultiDict
from prometheus_client.parser import text_string_to_metric_families

from router.config import BackendConfig
from router.server import RouterServer

FakeFactory = Callable[..., Awaitable["FakeReplica"]]  # the `fakes` fixture (conftest.py)
RouterFactory = Callable[..., Awaitable[RouterServer]]  # the `routers` fixture


@dataclass
class Recorded:
    path: str
    headers: CIMultiDict[str]
    body: bytes


@dataclass
class FakeReplica(LoopbackServer):
    """A fake OpenAI-compatible replica for router tests (see the module docstring)."""

    name: str
    models: tuple[str, ...] = ("fake-model",)
    fail_status: int | None = None  # answer generation requests with this status
    hang: bool = False  # accept generation requests and never answer
    health_status: int = 200
    stream_tokens: int = 4  # chunks per stream unless max_tokens says otherwise
    chunk_delay_s: float = 0.0
    gate: asyncio.Event | None = None  # streams wait for it after the first chunk
    cut_after: int | None = None  # streams: drop the connection after this many chunks
    stall_after: int | None = None  # streams: go silent (connection open) after this many chunks
    waiting: int = 0  # reported as vllm:num_requests_waiting
    requests: list[Recorded] = field(default_factory=list)
    aborted: int = 0
    completed: int = 0
    seen_prompts: set[str] = field(default_factory=set)

    @property
    def generation_requests(self) -> list[Recorded]:
        return [r for r in self.requests if r.path.startswith("/v1/") and r.path != "/v1/models"]

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/completions", self._generate)
        app.router.add_post("/v1/chat/completions", self._generate)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)

    async def _models(self, request: web.Request) -> web.StreamResponse:
        data = [
            {"id": m, "object": "model", "created": 0, "owned_by": "fake", "max_model_len": 4096}
            for m in self.models
        ]
        return web.json_response({"object": "list", "data": data})

    async def _health(self, request: web.Request) -> web.StreamResponse:
        return web.Response(status=self.health_status)

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        text = (
            "# HELP vllm:num_requests_waiting Waiting.\n# TYPE vllm:num_requests_waiting gauge\n"
            f'vllm:num_requests_waiting{{engine="0",model_name="{self.models[0]}"}} {self.waiting}.0\n'
            "# TYPE vllm:num_requests_running gauge\n"
            f'vllm:num_requests_running{{engine="0",model_name="{self.models[0]}"}} 0.0\n'
            "# TYPE vllm:kv_cache_usage_perc gauge\n"
            f'vllm:kv_cache_usage_perc{{engine="0",model_name="{self.models[0]}"}} 0.25\n'
            "# TYPE vllm:cache_config_info gauge\n"
            'vllm:cache_config_info{block_size="16",engine="0",num_gpu_blocks="4096"} 1.0\n'
            "# TYPE vllm:time_to_first_token_seconds histogram\n"
            'vllm:time_to_first_token_seconds_bucket{le="+Inf",model_name="x"} 0.0\n'
        )
        return web.Response(text=text, content_type="text/plain")

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        self.requests.append(Recorded(request.path, CIMultiDict(request.headers), raw))
        try:
            if self.hang:
                await asyncio.Event().wait()
            if self.fail_status is not None:
                error = {
                    "object": "error",
                    "message": "fake failure",
                    "type": "InternalServerError",
                    "param": None,
                    "code": self.fail_status,
                }
                return web.json_response(
                    error, status=self.fail_status, headers={"X-Fake-Replica": self.name}
                )
            return await self._answer(request, raw)
        except asyncio.CancelledError:
            self.aborted += 1
            raise

    async def _answer(self, request: web.Request, raw: bytes) -> web.StreamResponse:
        body: dict[str, Any] = json.loads(raw)
        chat = request.path.endswith("/chat/completions")
        text = json.dumps(body["messages"]) if chat else json.dumps(body["prompt"])
        prompt_tokens = max(1, len(text) // 4)
        cached = prompt_tokens - prompt_tokens % 16 if text in self.seen_prompts else 0
        self.seen_prompts.add(text)
        rid = "cmpl-" + hashlib.sha256(raw).hexdigest()[:16]
        n = min(int(body.get("max_tokens") or self.stream_tokens), 64)  # bounded, whatever a fuzzer sends
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": n,
            "total_tokens": prompt_tokens + n,
            "prompt_tokens_details": {"cached_tokens": cached},
        }
        model = body["model"]
        headers = {"X-Fake-Replica": self.name, "X-Upstream-Extra": "1", "Proxy-Authenticate": "Basic"}
        if not body.get("stream"):
            if chat:
                choice: dict[str, Any] = {
                    "index": 0,
                    "message": {"role": "assistant", "content": "tok " * n},
                    "finish_reason": "length",
                }
            else:
                choice = {"index": 0, "text": "tok " * n, "logprobs": None, "finish_reason": "length"}
            obj = "chat.completion" if chat else "text_completion"
            payload = {
                "id": rid,
                "object": obj,
                "created": 0,
                "model": model,
                "choices": [choice],
                "usage": usage,
            }
            self.completed += 1
            return web.Response(
                body=json.dumps(payload).encode(), content_type="application/json", headers=headers
            )
        resp = web.StreamResponse(
            headers={**headers, "Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await resp.prepare(request)
        for i in range(n):
            if self.cut_after is not None and i == self.cut_after:
                assert request.transport is not None
                request.transport.abort()
                return resp
            if self.stall_after is not None and i == self.stall_after:
                await asyncio.Event().wait()
            finish = "length" if i == n - 1 else None
            if chat:
                delta = {"role": "assistant", "content": f"tok{i} "} if i == 0 else {"content": f"tok{i} "}
                chunk: dict[str, Any] = {
                    "id": rid,
                    "object": "chat.completion.chunk",
                    "created": 0,
                    "model": model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                }
            else:
                chunk = {
                    "id": rid,
                    "object": "text_completion",
                    "created": 0,
                    "model": model,
                    "choices": [{"index": 0, "text": f"tok{i} ", "logprobs": None, "finish_reason": finish}],
                }
            await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            if i == 0 and self.gate is not None:
                await self.gate.wait()
            if self.chunk_delay_s:
                await asyncio.sleep(self.chunk_delay_s)
        if (body.get("stream_options") or {}).get("include_usage"):
            obj = "chat.completion.chunk" if chat else "text_completion"
            last = {"id": rid, "object": obj, "created": 0, "model": model, "choices": [], "usage": usage}
            await resp.write(b"data: " + json.dumps(last).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        self.completed += 1
        return resp


def dead_url() -> str:
    """A loopback URL where nothing listens (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def backend_of(target: FakeReplica | tuple[str, str] | BackendConfig) -> BackendConfig:
    if isinstance(target, BackendConfig):
        return target
    if isinstance(target, FakeReplica):
        return BackendConfig(target.name, target.url)
    return BackendConfig(*target)


# Fast loops for tests: probes and scrapes every 0.1 s, short cool-downs and timeouts.
TEST_DEFAULTS: dict[str, Any] = {
    "port": 0,
    "health_interval_s": 0.1,
    "scrape_interval_s": 0.1,
    "breaker_cooldown_s": 0.2,
    "upstream_timeout_s": 5.0,
    "connect_timeout_s": 1.0,
    "shutdown_timeout_s": 1.0,
}


async def post(
    http: aiohttp.ClientSession, url: str, body: Any, headers: dict[str, str] | None = None
) -> tuple[int, CIMultiDict[str], bytes]:
    """POST a JSON body (or raw bytes) and read the whole answer."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with http.post(
        url, data=data, headers={"Content-Type": "application/json", **(headers or {})}
    ) as r:
        return r.status, CIMultiDict(r.headers), await r.read()


def completion(prompt: Any = "hello world", *, model: str = "fake-model", **extra: Any) -> dict[str, Any]:
    return {"model": model, "prompt": prompt, "max_tokens": 4, **extra}


def chat(content: str = "hello", *, model: str = "fake-model", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 4, **extra}


async def eventually(check: Callable[[], bool], *, timeout_s: float = 5.0, step_s: float = 0.02) -> None:
    """Wait until `check()` is true, polling, for at most `timeout_s` (then fail)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s")
        await asyncio.sleep(step_s)


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels`, in a /metrics text."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


async def scrape(http: aiohttp.ClientSession, url: str) -> str:
    async with http.get(url + "/metrics") as resp:
        assert resp.status == 200
        return await resp.text()
