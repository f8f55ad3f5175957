"""FAKE: stands in for the LMCache controller (LMCache 0.5.6, `python -m lmcache.v1.api_server`), which
needs LMCache workers inside vLLM replicas on GPUs; none of it can run on this machine.

A real aiohttp server on 127.0.0.1 (port 0) answering /lookup, /move and /check_finish with the shapes of
LMCache 0.5.6's lmcache/v1/api_server/__main__.py. It is stricter than LMCache on purpose, to check
exactly what the router sends: each body must have exactly the router's fields, of the right types,
naming known instances, with whole 256-token chunks, a `LocalCPUBackend` destination (the only one
LMCache's worker accepts) and `should_copy: true`. Anything else is answered 422 (FastAPI's status for a
body that fails validation) and recorded in `errors`, which tests assert empty.

What it answers, as LMCache does:
- `/lookup {tokens}` → `{event_id, layout_info: {instance_id: [location, matched_tokens]}}` for each
  instance holding a leading part of `tokens` (`held`), in whole chunks.
- `/move {old_position, new_position, tokens, should_copy}` → `{event_id, num_tokens}`.
- `/check_finish {event_id}`: with `check_finish="unimplemented"` LMCache 0.5.6's answer, HTTP 500
  `{"detail": ""}` (its ClusterExecutor.check_finish raises NotImplementedError), and the destination
  holds the chunks as soon as /move answers (0.5.6's /move is synchronous); with "polling",
  `{"status": "pending"}` `pending_polls` times, then `{"status": final_status}` ("completed" by
  default), and only then does the destination hold them.

Failure knobs: `fail` (path → (status, JSON body)), `malformed` (paths answered 200 with a body that is
not JSON), `hang` (paths never answered).
"""

from __future__ import annotations

import asyncio
import itertools
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web
from loopback import LoopbackServer, common_prefix

CHUNK = 256  # LMCache's default chunk_size (lmcache/v1/config.py)
CPU = "LocalCPUBackend"


class _Invalid(Exception):
    pass


class _Unimplemented(Exception):
    """LMCache 0.5.6's /check_finish: NotImplementedError, answered HTTP 500 {"detail": ""}."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise _Invalid(message)


def _token_list(value: object, what: str) -> list[int]:
    _check(isinstance(value, list) and len(value) > 0, f"{what} must be a non-empty list")
    assert isinstance(value, list)
    _check(all(isinstance(t, int) and not isinstance(t, bool) for t in value), f"{what}: ints only")
    return value


@dataclass
class FakeLMCacheController(LoopbackServer):
    """See the module docstring. `held`: instance id → (location, tokens it holds)."""

    shutdown_timeout = 0.2  # a hung handler (the `hang` fault) must not hold a test up

    held: dict[str, tuple[str, list[int]]] = field(default_factory=dict)
    check_finish: Literal["unimplemented", "polling"] = "unimplemented"
    pending_polls: int = 0
    final_status: str = "completed"
    fail: dict[str, tuple[int, Any]] = field(default_factory=dict)
    malformed: set[str] = field(default_factory=set)
    hang: set[str] = field(default_factory=set)
    requests: list[tuple[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    polls: int = 0
    _pending: dict[str, tuple[str, list[int], int]] = field(default_factory=dict)
    _ids: itertools.count[int] = field(default_factory=itertools.count)

    def paths(self) -> list[str]:
        return [path for path, _ in self.requests]

    def routes(self, app: web.Application) -> None:
        for path, handler in (
            ("/lookup", self._lookup),
            ("/move", self._move),
            ("/check_finish", self._finish),
        ):
            app.router.add_post(path, self._wrap(path, handler))

    def _wrap(self, path: str, handler: Any) -> Any:
        async def serve(request: web.Request) -> web.StreamResponse:
            raw = await request.read()
            try:
                body = json.loads(raw)
            except ValueError:
                body = raw
            self.requests.append((path, body))
            if path in self.hang:
                await asyncio.Event().wait()
            if path in self.fail:
                status, error = self.fail[path]
                return web.json_response(error, status=status)
            if path in self.malformed:
                return web.Response(text='{"event_id": "Move-1", "num_tok', content_type="application/json")
            try:
                _check(isinstance(body, dict), "the body must be a JSON object")
                return web.json_response(handler(body))
            except _Invalid as exc:
                self.errors.append(f"{path}: {exc}")
                return web.json_response({"detail": [{"msg": str(exc)}]}, status=422)
            except _Unimplemented:
                return web.json_response({"detail": ""}, status=500)

        return serve

    def _lookup(self, body: dict[str, Any]) -> dict[str, Any]:
        _check(set(body) == {"tokens"}, f"/lookup takes exactly tokens, got {sorted(body)}")
        tokens = _token_list(body["tokens"], "tokens")
        layout = {}
        for instance, (location, held) in self.held.items():
            matched = common_prefix(tokens, held) // CHUNK * CHUNK
            if matched:
                layout[instance] = [location, matched]
        return {"event_id": f"Lookup{next(self._ids)}", "layout_info": layout}

    def _move(self, body: dict[str, Any]) -> dict[str, Any]:
        keys = {"old_position", "new_position", "tokens", "should_copy"}
        _check(set(body) == keys, f"/move takes exactly {sorted(keys)}, got {sorted(body)}")
        old, new = body["old_position"], body["new_position"]
        for name, pos in (("old_position", old), ("new_position", new)):
            _check(
                isinstance(pos, list) and len(pos) == 2 and all(isinstance(x, str) for x in pos),
                f"{name} must be [instance_id, location]",
            )
        _check(old[0] in self.held, f"unknown source instance {old[0]!r}")
        _check(old[1] == self.held[old[0]][0], f"the source holds its chunks in {self.held[old[0]][0]}")
        _check(new[0] != old[0], "source and destination are the same instance")
        _check(new[1] == CPU, f"the destination location must be {CPU}, got {new[1]!r}")
        _check(body["should_copy"] is True, "should_copy must be true: a move would empty the source")
        tokens = _token_list(body["tokens"], "tokens")
        _check(len(tokens) % CHUNK == 0, f"{len(tokens)} tokens is not whole {CHUNK}-token chunks")
        num = common_prefix(tokens, self.held[old[0]][1]) // CHUNK * CHUNK
        event_id = f"Move{next(self._ids)}"
        if self.check_finish == "unimplemented":
            self.held[new[0]] = (CPU, tokens[:num])
        else:
            self._pending[event_id] = (new[0], tokens[:num], self.pending_polls)
        return {"event_id": event_id, "num_tokens": num}

    def _finish(self, body: dict[str, Any]) -> Any:
        _check(set(body) == {"event_id"}, f"/check_finish takes exactly event_id, got {sorted(body)}")
        event_id = body["event_id"]
        _check(isinstance(event_id, str), "event_id must be a string")
        self.polls += 1
        if self.check_finish == "unimplemented":
            raise _Unimplemented
        _check(event_id in self._pending, f"unknown event {event_id!r}")
        instance, tokens, left = self._pending[event_id]
        if left > 0:
            self._pending[event_id] = (instance, tokens, left - 1)
            return {"status": "pending"}
        if self.final_status == "completed":
            self.held[instance] = (CPU, tokens)
        return {"status": self.final_status}
