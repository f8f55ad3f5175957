"""Executors of hot-prefix migration plans (router/hot_prefix.py): thin I/O, one mechanism each.

Rules:
- An executor gets a `MigrationPlan` and the replicas' base URLs and returns the prefix tokens the target
  holds afterwards (its confirmation); any refusal raises `MigrationFailed`. The caller then reports
  `HotPrefixController.completed(plan_id, fleet, now, held)` or `failed(plan_id, now)`, so the index
  learns the new holder only once the copy is done.
- `P2PExecutor`: the emulator's export/import (`workers.emulator.p2p.transfer_prefix`), for plans whose
  mechanism is "copy"; the held count is the target's own answer.
- `WarmupExecutor`: for "warmup" plans, and anywhere: `POST /v1/completions` to the target with the
  prefix as token ids and `max_tokens: 1` (vLLM refuses `max_tokens: 0` without echo,
  vllm-interfaces.md). Text prefixes are turned into token ids by the target's own `/tokenize`. vLLM
  does not say what it cached: the confirmation is the prompt's full blocks (the reply's
  `usage.prompt_tokens`, rounded down to `block_size`), the blocks a prefill caches until LRU evicts them.
Not here yet: LMCache controller `/move` and vLLM NIXL `remote_kv_source` executors.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import aiohttp

from router.hot_prefix import MigrationPlan
from workers.emulator.p2p import transfer_prefix


class MigrationFailed(RuntimeError):
    """The backend refused or could not carry out a migration."""


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
            ids = list(plan.prefix_token_ids) if plan.prefix_token_ids is not None else None
            if ids is None:
                tokenized = await self._post(
                    f"{url}/tokenize", {"model": plan.model, "prompt": plan.prefix_text}
                )
                ids = [int(t) for t in tokenized["tokens"]]
            body = {"model": plan.model, "prompt": ids, "max_tokens": 1}
            reply = await self._post(f"{url}/v1/completions", body)
            prompt_tokens = int(reply["usage"]["prompt_tokens"])
        except (aiohttp.ClientError, KeyError, TypeError, ValueError) as exc:
            raise MigrationFailed(f"warm-up prefill failed: {exc}") from exc
        return prompt_tokens // self._block_size * self._block_size

    async def _post(self, url: str, body: Mapping[str, Any]) -> dict[str, Any]:
        async with self._session.post(url, json=body) as resp:
            if resp.status != 200:
                raise MigrationFailed(f"{url}: HTTP {resp.status}: {(await resp.text())[:200]}")
            data: dict[str, Any] = await resp.json()
            return data
