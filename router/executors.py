"""Executors of hot-prefix migration plans (router/hot_prefix.py): thin I/O, one mechanism each.

Rules:
- An executor gets a `MigrationPlan` and the replicas' base URLs and returns the prefix tokens the target
  holds afterwards (its confirmation); any refusal, error answer or malformed answer raises
  `MigrationFailed`. The caller (router/migration.py) bounds it with the controller's
  `migration_timeout_s`, then reports `HotPrefixController.completed(plan_id, fleet, now, held)` or
  `failed(plan_id, now)`, so the index learns the new holder only once the copy is done.
- Token ids: executors that need the prefix as token ids (all but P2P) take the plan's own ids (token
  chunks) or turn its text into ids with the target's `POST /tokenize` (`prefix_token_ids`), so the
  ids are the target's tokenizer's.
- `P2PExecutor` ("p2p"): the emulator's export/import (`workers.emulator.p2p.transfer_prefix`), for
  plans whose mechanism is "copy"; the held count is the target's own answer.
- `WarmupExecutor` (any vLLM): `POST /v1/completions` to the target with the prefix as token ids and
  `max_tokens: 1` (vLLM refuses `max_tokens: 0` without echo, vllm-interfaces.md). vLLM does not say
  what it cached: the confirmation is the prompt's full blocks (the reply's `usage.prompt_tokens`,
  rounded down to `block_size`), the blocks a prefill caches until LRU evicts them.
- `LMCacheExecutor` ("lmcache"): drives the LMCache controller (0.5.6, `lmcache.v1.api_server`):
  `/lookup {tokens}` finds where the source's LMCache instance holds the prefix, `/move` copies it
  (`should_copy: true`, so the overloaded source keeps it) into the target instance's
  `LocalCPUBackend` (the only destination LMCache's worker accepts), then `/check_finish` is polled
  until it says "completed". The target's vLLM loads those chunks on its next matching request.
  Only whole LMCache chunks move (`chunk_size`, 256 tokens by default in LMCache's config). Held =
  the tokens `/move` reports as moved.
- `NixlExecutor` ("nixl"): vLLM's OffloadingConnector P2P tier. A 1-token completion to the target
  with the prefix as token ids and `kv_transfer_params: {"remote_kv_source": {"kv_request_id",
  "remote_host", "remote_port"}}` naming the source's P2P endpoint makes the target pull the matching
  blocks from the source's CPU tier over NIXL before prefilling. Held = the reply's
  `usage.prompt_tokens_details.cached_tokens` rounded down to `block_size`; zero (nothing pulled) or
  an answer without it (the target lacks `--enable-prompt-tokens-details`) is a failure.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import aiohttp

from router.hot_prefix import MigrationPlan
from workers.emulator.p2p import transfer_prefix

# LMCache's default `chunk_size` (lmcache/v1/config.py in 0.5.6: "chunk_size" default 256). It stores,
# looks up and moves KV in chunks of this many tokens; a partial last chunk never moves.
LMCACHE_CHUNK_TOKENS = 256
# The only destination LMCache 0.5.6's worker accepts for a cross-instance move
# (cache_controller/worker.py: assert new_position[1] == "LocalCPUBackend").
LMCACHE_DESTINATION = "LocalCPUBackend"
# `/check_finish` answers `{"status": str}` (api_server CheckFinishResponse). The only value in
# LMCache's source is "completed" (its message round-trip test); the failure words are assumptions,
# and any other status counts as still running, bounded by the migration timeout.
LMCACHE_DONE = frozenset({"completed"})
LMCACHE_FAILED = frozenset({"failed", "error", "aborted", "cancelled", "canceled", "not_found"})


class MigrationFailed(RuntimeError):
    """The backend refused or could not carry out a migration."""


async def post_json(session: aiohttp.ClientSession, url: str, body: Mapping[str, Any]) -> dict[str, Any]:
    """POST `body`; the answer as a JSON object, or MigrationFailed naming the URL and why."""
    async with session.post(url, json=body) as resp:
        text = await resp.text(errors="replace")
        if resp.status != 200:
            raise MigrationFailed(f"{url}: HTTP {resp.status}: {text[:200]}")
    try:
        data = json.loads(text)
    except ValueError:
        raise MigrationFailed(f"{url}: the answer is not JSON: {text[:200]!r}") from None
    if not isinstance(data, dict):
        raise MigrationFailed(f"{url}: the answer is not a JSON object: {text[:200]!r}")
    return data


def _int(value: object, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise MigrationFailed(f"{what} is not an integer: {value!r}")
    return value


def _str(value: object, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise MigrationFailed(f"{what} is not a non-empty string: {value!r}")
    return value


async def prefix_token_ids(session: aiohttp.ClientSession, plan: MigrationPlan, url: str) -> list[int]:
    """The plan's prefix as token ids: its own (token chunks), or its text tokenized by the replica at
    `url` (vLLM's `POST /tokenize {model, prompt}` → `{count, max_model_len, tokens}`)."""
    if plan.prefix_token_ids is not None:
        return list(plan.prefix_token_ids)
    reply = await post_json(session, f"{url}/tokenize", {"model": plan.model, "prompt": plan.prefix_text})
    tokens = reply.get("tokens")
    if not isinstance(tokens, list):
        raise MigrationFailed(f"{url}/tokenize: no token list in the answer")
    return [_int(t, f"{url}/tokenize: a token id") for t in tokens]


class P2PExecutor:
    """Copy by the emulator's P2P export/import."""

    mechanism = "copy"

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self._session = session

    async def execute(self, plan: MigrationPlan, urls: Mapping[str, str]) -> int:
        if plan.source is None:
            raise MigrationFailed("a copy needs a source replica")
        try:
            if plan.prefix_token_ids is not None:
                result = await transfer_prefix(
                    self._session, urls[plan.source], urls[plan.target], list(plan.prefix_token_ids)
                )
            else:
                result = await transfer_prefix(
                    self._session, urls[plan.source], urls[plan.target], prompt=plan.prefix_text or ""
                )
        except (aiohttp.ClientError, RuntimeError, KeyError) as exc:
            raise MigrationFailed(f"P2P transfer failed: {exc}") from exc
        return result.held_tokens


class WarmupExecutor:
    """Recompute the prefix once on the target with a 1-token completion."""

    mechanism = "warmup"

    def __init__(self, session: aiohttp.ClientSession, block_size: int = 16) -> None:
        self._session = session
        self._block_size = block_size

    async def execute(self, plan: MigrationPlan, urls: Mapping[str, str]) -> int:
        try:
            url = urls[plan.target]
            ids = await prefix_token_ids(self._session, plan, url)
            body = {"model": plan.model, "prompt": ids, "max_tokens": 1}
            reply = await post_json(self._session, f"{url}/v1/completions", body)
            prompt_tokens = _int(reply["usage"]["prompt_tokens"], "usage.prompt_tokens")
        except (aiohttp.ClientError, KeyError, TypeError) as exc:
            raise MigrationFailed(f"warm-up prefill failed: {exc!r}") from exc
        return prompt_tokens // self._block_size * self._block_size


class LMCacheExecutor:
    """Copy through the LMCache controller's /lookup, /move and /check_finish (module docstring)."""

    mechanism = "copy"

    def __init__(
        self,
        session: aiohttp.ClientSession,
        controller_url: str | None,
        instance_ids: Mapping[str, str],
        *,
        chunk_tokens: int = LMCACHE_CHUNK_TOKENS,
        poll_s: float = 0.05,
    ) -> None:
        self._session = session
        self._controller = controller_url.rstrip("/") if controller_url else None
        self._instances = dict(instance_ids)
        self._chunk = chunk_tokens
        self._poll_s = poll_s

    async def execute(self, plan: MigrationPlan, urls: Mapping[str, str]) -> int:
        if self._controller is None:
            raise MigrationFailed("kv_transfer lmcache needs lmcache_controller_url in the router config")
        if plan.source is None:
            raise MigrationFailed("a copy needs a source replica")
        src, dst = self._instances.get(plan.source), self._instances.get(plan.target)
        if src is None or dst is None:
            raise MigrationFailed("both replicas need an lmcache_instance_id")
        try:
            ids = await prefix_token_ids(self._session, plan, urls[plan.target])
            whole = len(ids) // self._chunk * self._chunk
            if whole == 0:
                raise MigrationFailed(
                    f"the prefix ({len(ids)} tokens) is shorter than one LMCache chunk "
                    f"({self._chunk} tokens); only whole chunks move"
                )
            location, held = await self._lookup(ids[:whole], src, plan.source)
            body = {
                "old_position": [src, location],
                "new_position": [dst, LMCACHE_DESTINATION],
                "tokens": ids[:held],
                # True: copy, the source keeps its chunks (the router still routes there). Named
                # `should_copy` in 0.5.6's MoveRequest (older releases called it `copy`).
                "should_copy": True,
            }
            moved = await post_json(self._session, f"{self._controller}/move", body)
            event_id = _str(moved.get("event_id"), "/move event_id")
            num_tokens = _int(moved.get("num_tokens"), "/move num_tokens")
            if num_tokens <= 0:
                raise MigrationFailed(f"LMCache moved nothing from {plan.source} (num_tokens {num_tokens})")
            await self._wait_finished(event_id)
        except (aiohttp.ClientError, KeyError) as exc:
            raise MigrationFailed(f"LMCache move failed: {exc!r}") from exc
        return min(num_tokens, held)

    async def _lookup(self, ids: list[int], instance: str, name: str) -> tuple[str, int]:
        """Where `instance` holds the prefix (its storage location) and how many of its tokens, in whole
        chunks. LMCache answers `{event_id, layout_info: {instance_id: [location, matched_tokens]}}`."""
        reply = await post_json(self._session, f"{self._controller}/lookup", {"tokens": ids})
        layout = reply.get("layout_info")
        if not isinstance(layout, dict):
            raise MigrationFailed(f"/lookup: no layout_info object in the answer: {reply!r:.200}")
        entry = layout.get(instance)
        if entry is None:
            raise MigrationFailed(f"LMCache holds none of the prefix on {name} (instance {instance!r})")
        if not isinstance(entry, Sequence) or isinstance(entry, str) or len(entry) != 2:
            raise MigrationFailed(f"/lookup: layout_info[{instance!r}] is not [location, tokens]: {entry!r}")
        location = _str(entry[0], "/lookup location")
        matched = min(_int(entry[1], "/lookup matched tokens"), len(ids)) // self._chunk * self._chunk
        if matched <= 0:
            raise MigrationFailed(f"LMCache holds less than one chunk of the prefix on {name}")
        return location, matched

    async def _wait_finished(self, event_id: str) -> None:
        """Poll /check_finish until "completed" (bounded by the caller's migration timeout).

        LMCache 0.5.6 does not implement it: its ClusterExecutor.check_finish raises
        NotImplementedError, which the API server turns into HTTP 500 `{"detail": ""}` (the empty
        message of that exception). There /move itself is synchronous (the controller awaits its
        workers, and the source worker awaits the target's acknowledgement of the chunks it pushed),
        so /move's answer is the completion; exactly that answer is accepted as "done", any other
        error is a failure."""
        url = f"{self._controller}/check_finish"
        while True:
            async with self._session.post(url, json={"event_id": event_id}) as resp:
                text = await resp.text(errors="replace")
                status_code = resp.status
            if status_code == 500 and _fastapi_detail(text) == "":
                return
            if status_code != 200:
                raise MigrationFailed(f"{url}: HTTP {status_code}: {text[:200]}")
            try:
                data = json.loads(text)
            except ValueError:
                raise MigrationFailed(f"{url}: the answer is not JSON: {text[:200]!r}") from None
            status = _str(data.get("status") if isinstance(data, dict) else None, "/check_finish status")
            if status in LMCACHE_DONE:
                return
            if status in LMCACHE_FAILED:
                raise MigrationFailed(f"LMCache move {event_id} ended with status {status!r}")
            await asyncio.sleep(self._poll_s)


def _fastapi_detail(text: str) -> object:
    try:
        data = json.loads(text)
    except ValueError:
        return None
    return data.get("detail") if isinstance(data, dict) else None


class NixlExecutor:
    """Make the target pull the prefix from the source over NIXL (vLLM OffloadingConnector P2P tier)."""

    mechanism = "copy"

    def __init__(
        self, session: aiohttp.ClientSession, peers: Mapping[str, tuple[str, int]], block_size: int = 16
    ) -> None:
        self._session = session
        self._peers = dict(peers)  # replica name -> its P2P tier's (host, port)
        self._block_size = block_size

    async def execute(self, plan: MigrationPlan, urls: Mapping[str, str]) -> int:
        peer = self._peers.get(plan.source) if plan.source is not None else None
        if peer is None:
            raise MigrationFailed("a NIXL pull needs a source replica with nixl_host and nixl_port")
        try:
            url = urls[plan.target]
            ids = await prefix_token_ids(self._session, plan, url)
            if not ids:
                raise MigrationFailed("an empty prefix")
            body = {
                "model": plan.model,
                # vLLM computes at least the prompt's last token itself (its scheduler caps a cache hit
                # at num_tokens - 1), so a prompt of exactly the prefix could never take its last
                # block from the source; one more token (a valid id: the prefix's first) lets every
                # full block of the prefix be pulled.
                "prompt": [*ids, ids[0]],
                "max_tokens": 1,
                "kv_transfer_params": {
                    "remote_kv_source": {
                        # The pull's own id: the source names its transfer session by it.
                        "kv_request_id": f"kvrouter-migration-{plan.plan_id}-{uuid.uuid4().hex}",
                        "remote_host": peer[0],
                        "remote_port": peer[1],
                    }
                },
            }
            reply = await post_json(self._session, f"{url}/v1/completions", body)
            details = reply["usage"].get("prompt_tokens_details")
            if not isinstance(details, dict) or "cached_tokens" not in details:
                raise MigrationFailed(
                    f"{plan.target} reports no usage.prompt_tokens_details.cached_tokens: a NIXL pull "
                    "cannot be confirmed without --enable-prompt-tokens-details"
                )
            cached = _int(details["cached_tokens"], "usage.prompt_tokens_details.cached_tokens")
        except (aiohttp.ClientError, KeyError, TypeError, AttributeError) as exc:
            raise MigrationFailed(f"NIXL pull failed: {exc!r}") from exc
        # cached_tokens counts local and pulled hits alike (vLLM's num_cached_tokens: local plus
        # connector tokens). 0 means nothing was pulled and the target recomputed the prefix; that is
        # a failure, so a broken P2P setup shows in router_migrations_total{outcome="failed"}.
        held = min(cached, len(ids)) // self._block_size * self._block_size
        if held <= 0:
            raise MigrationFailed(
                f"{plan.target} pulled nothing from {plan.source} ({peer[0]}:{peer[1]}): cached_tokens 0"
            )
        return held
