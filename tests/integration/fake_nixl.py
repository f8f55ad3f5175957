"""FAKE: stands in for a vLLM replica whose OffloadingConnector has a P2P tier (the target of a NIXL pull,
vLLM >= 0.27), which needs GPUs and NIXL; none of it can run on this machine.

A real aiohttp server on 127.0.0.1 (port 0) answering `POST /v1/completions`. It checks that a request
is exactly the router's pull: `{model, prompt: [token ids], max_tokens: 1, kv_transfer_params:
{"remote_kv_source": {"kv_request_id", "remote_host", "remote_port"}}}` naming a source it knows
(`sources`, keyed by (host, port)) with a `kv_request_id` never seen before; anything else is answered
400 (vLLM's status for a bad request) and recorded in `errors`, which tests assert empty.

It answers like vLLM run with `--enable-prompt-tokens-details`: `usage.prompt_tokens_details.cached_tokens`
is the full blocks (`block_size`) of the prompt that the named source holds, never reaching the prompt's
last token (vLLM computes at least that one itself); the pulled blocks are then held here (`held`).

Failure knobs: `fail_status`, `malformed` (a 200 whose body is not JSON), `hang`, `details` (False:
no `prompt_tokens_details`, as vLLM without --enable-prompt-tokens-details answers).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from loopback import LoopbackServer, common_prefix


@dataclass
class FakeNixlTarget(LoopbackServer):
    """See the module docstring. `sources`: (host, port) → the token ids that source's CPU tier holds."""

    shutdown_timeout = 0.2  # a hung handler (the `hang` fault) must not hold a test up

    model: str
    sources: dict[tuple[str, int], list[int]] = field(default_factory=dict)
    block_size: int = 16
    fail_status: int | None = None
    malformed: bool = False
    hang: bool = False
    details: bool = True
    held: list[int] = field(default_factory=list)
    requests: list[Any] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    request_ids: set[str] = field(default_factory=set)

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/completions", self._complete)

    def _invalid(self, message: str) -> web.Response:
        self.errors.append(message)
        return web.json_response({"object": "error", "message": message, "code": 400}, status=400)

    async def _complete(self, request: web.Request) -> web.StreamResponse:
        body = json.loads(await request.read())
        self.requests.append(body)
        if self.hang:
            await asyncio.Event().wait()
        if self.fail_status is not None:
            return web.json_response({"object": "error", "message": "fake failure"}, status=self.fail_status)
        if self.malformed:
            return web.Response(text='{"usage": {"prompt_tok', content_type="application/json")
        keys = {"model", "prompt", "max_tokens", "kv_transfer_params"}
        if not isinstance(body, dict) or set(body) != keys:
            return self._invalid(f"the body must have exactly {sorted(keys)}")
        prompt = body["prompt"]
        if body["model"] != self.model or body["max_tokens"] != 1:
            return self._invalid(f"model must be {self.model!r} and max_tokens 1")
        if not isinstance(prompt, list) or not prompt or not all(type(t) is int for t in prompt):
            return self._invalid("prompt must be a non-empty list of token ids")
        params = body["kv_transfer_params"]
        if not isinstance(params, dict) or set(params) != {"remote_kv_source"}:
            return self._invalid("kv_transfer_params must be exactly {remote_kv_source}")
        source = params["remote_kv_source"]
        fields = {"kv_request_id", "remote_host", "remote_port"}
        if not isinstance(source, dict) or set(source) != fields:
            return self._invalid(f"remote_kv_source must have exactly {sorted(fields)}")
        rid, host, port = source["kv_request_id"], source["remote_host"], source["remote_port"]
        if not isinstance(rid, str) or not rid or rid in self.request_ids:
            return self._invalid(f"kv_request_id must be a new non-empty string, got {rid!r}")
        self.request_ids.add(rid)
        if not isinstance(host, str) or type(port) is not int or (host, port) not in self.sources:
            return self._invalid(f"unknown source {host!r}:{port!r}")
        reachable = min(common_prefix(prompt, self.sources[(host, port)]), len(prompt) - 1)
        cached = reachable // self.block_size * self.block_size
        if cached > len(self.held):
            self.held = prompt[:cached]
        usage: dict[str, Any] = {
            "prompt_tokens": len(prompt),
            "completion_tokens": 1,
            "total_tokens": len(prompt) + 1,
        }
        if self.details:
            usage["prompt_tokens_details"] = {"cached_tokens": cached}
        choice = {"index": 0, "text": " x", "logprobs": None, "finish_reason": "length"}
        return web.json_response(
            {
                "id": f"cmpl-{len(self.requests)}",
                "object": "text_completion",
                "created": 0,
                "model": self.model,
                "choices": [choice],
                "usage": usage,
                "kv_transfer_params": None,
            }
        )
