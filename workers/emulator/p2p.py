"""P2P KV transfer between emulated replicas: export a held prefix from A, import it into B.

vLLM has no push/pin API (vllm-interfaces.md); this is the emulator's stand-in for an OffloadingConnector
P2P pull, LMCache `/move` or a NIXL transfer, so that hot-prefix migration can be exercised end to end.

Wire:
- `POST /kvrouter/kv/export` with `{"token_ids": [...]}` (or `{"prompt": "text"}`): 200 with headers
  `X-KVRouter-Held-Tokens` (leading tokens of the prompt whose full blocks the replica caches now; no
  side effect on its LRU or counters), `X-KVRouter-Block-Size`, `X-KVRouter-KV-Bytes`
  (= held tokens x the preset's `kv_bytes_per_token`) and `X-KVRouter-Modeled`; the body is that many
  bytes, streamed.
- `POST /kvrouter/kv/import` with a framed body: 8-byte big-endian header length, a JSON header
  `{"token_ids": [...], "kv_bytes": N, "modeled": bool}`, then the N payload bytes (none when modeled).
  N must equal len(token_ids) x this replica's `kv_bytes_per_token` (same model shape on both ends).
  The replica then holds the prefix's full blocks as cached-and-free (`Engine.import_prefix`, LRU tail)
  and publishes their BlockStored events. Answers `{"imported_tokens", "held_tokens"}`.
- `transfer_prefix(session, source_url, target_url, token_ids)` pipes one into the other, streaming.

Cost of a transfer (what a migration controller measures):
- Default: the payload really crosses loopback twice (A -> helper -> B), so a transfer costs real time
  and CPU proportional to its size. Honest and self-checking, and cheap for the `tiny` preset (1 KiB a
  token) that tests and demos use.
- `--kv-bandwidth BYTES_PER_S` (ReplicaConfig.kv_bandwidth, set on the exporter): no bytes are sent;
  the export sleeps N / bandwidth before answering. For realistic presets (128 KiB a token: 1 GiB for
  8K tokens), where copying gigabytes through Python would both misstate an RDMA link's speed and eat
  the CPU the rest of the emulated fleet runs on.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from workers.emulator.protocol import ApiError, check_token_ids, parse_json
from workers.engine import tokenizer

if TYPE_CHECKING:
    from workers.emulator.replica import Replica

HELD_TOKENS = "X-KVRouter-Held-Tokens"
BLOCK_SIZE = "X-KVRouter-Block-Size"
KV_BYTES = "X-KVRouter-KV-Bytes"
MODELED = "X-KVRouter-Modeled"
_CHUNK = 256 * 1024  # bytes a write: large enough to amortise the per-write cost, small enough to stream
_ZEROS = bytes(_CHUNK)
_MAX_HEADER = 16 * 1024 * 1024  # a header of ~2M token ids: above any max_model_len here


def _export_tokens(body: Any) -> list[int]:
    if not isinstance(body, dict):
        raise ApiError("the export body must be a JSON object")
    if "token_ids" in body:
        if not isinstance(body["token_ids"], list):
            raise ApiError("token_ids must be a list of integers")
        return check_token_ids(body["token_ids"])
    if isinstance(body.get("prompt"), str):
        return tokenizer.encode(body["prompt"])
    raise ApiError("token_ids (a list of integers) or prompt (a string) is required")


async def handle_export(request: web.Request, replica: Replica) -> web.StreamResponse:
    token_ids = _export_tokens(parse_json(await request.read()))
    engine = replica.engine
    held = engine.held_prefix_tokens(token_ids)
    nbytes = held * engine.preset.kv_bytes_per_token
    bandwidth = replica.config.kv_bandwidth
    headers = {
        HELD_TOKENS: str(held),
        BLOCK_SIZE: str(engine.block_size),
        KV_BYTES: str(nbytes),
        MODELED: "1" if bandwidth else "0",
        "Content-Type": "application/octet-stream",
    }
    if bandwidth:
        await asyncio.sleep(nbytes / bandwidth)
        return web.Response(body=b"", headers=headers)
    resp = web.StreamResponse(headers=headers)
    resp.content_length = nbytes
    await resp.prepare(request)
    view = memoryview(_ZEROS)
    remaining = nbytes
    while remaining > 0:
        n = min(remaining, _CHUNK)
        await resp.write(view[:n])
        remaining -= n
    await resp.write_eof()
    return resp


async def handle_import(request: web.Request, replica: Replica) -> web.Response:
    content = request.content
    try:
        size = int.from_bytes(await content.readexactly(8), "big")
        if size > _MAX_HEADER:
            raise ApiError(f"import header of {size} bytes exceeds {_MAX_HEADER}")
        header = parse_json(await content.readexactly(size))
    except asyncio.IncompleteReadError:
        raise ApiError("truncated import body: expected an 8-byte length and a JSON header") from None
    if not isinstance(header, dict) or not isinstance(header.get("token_ids"), list):
        raise ApiError("the import header must be an object with token_ids")
    token_ids = check_token_ids(header["token_ids"])
    kv_bytes, modeled = header.get("kv_bytes"), header.get("modeled", False)
    if not isinstance(kv_bytes, int) or isinstance(kv_bytes, bool) or not isinstance(modeled, bool):
        raise ApiError("kv_bytes must be an integer and modeled a boolean")
    engine = replica.engine
    expected = len(token_ids) * engine.preset.kv_bytes_per_token
    if kv_bytes != expected:
        raise ApiError(
            f"KV layout mismatch: {kv_bytes} bytes for {len(token_ids)} tokens, this replica holds "
            f"{engine.preset.kv_bytes_per_token} bytes a token"
        )
    received = 0
    async for chunk in content.iter_chunked(_CHUNK):
        received += len(chunk)
        if received > (0 if modeled else expected):
            raise ApiError("the import payload is longer than kv_bytes")
    if not modeled and received != expected:
        raise ApiError(f"truncated import payload: {received} of {expected} bytes")
    held = engine.import_prefix(token_ids, asyncio.get_running_loop().time())
    replica.driver.wake()  # publish the import's BlockStored events
    return web.json_response({"imported_tokens": len(token_ids), "held_tokens": held})


@dataclass(frozen=True, slots=True)
class TransferResult:
    exported_tokens: int  # the source's held prefix of the requested tokens
    kv_bytes: int
    held_tokens: int  # the target's held prefix after the import
    seconds: float
    modeled: bool


async def transfer_prefix(
    session: aiohttp.ClientSession,
    source_url: str,
    target_url: str,
    token_ids: Sequence[int] | None = None,
    *,
    prompt: str | None = None,
) -> TransferResult:
    """Copy the prefix of `token_ids` (or of `prompt`, tokenized by the source) that `source_url` holds
    into `target_url`'s cache, streaming the payload through. RuntimeError if either side refuses."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    if token_ids is None:
        if prompt is None:
            raise ValueError("give token_ids or prompt")
        async with session.post(f"{source_url}/tokenize", json={"prompt": prompt}) as resp:
            await _check(resp, "tokenize")
            token_ids = (await resp.json())["tokens"]
    ids = list(token_ids)
    async with session.post(f"{source_url}/kvrouter/kv/export", json={"token_ids": ids}) as exp:
        await _check(exp, "export")
        held, nbytes = int(exp.headers[HELD_TOKENS]), int(exp.headers[KV_BYTES])
        modeled = exp.headers.get(MODELED) == "1"
        header = json.dumps({"token_ids": ids[:held], "kv_bytes": nbytes, "modeled": modeled}).encode()

        async def body() -> AsyncIterator[bytes]:
            yield len(header).to_bytes(8, "big") + header
            async for chunk in exp.content.iter_chunked(_CHUNK):
                yield chunk

        async with session.post(f"{target_url}/kvrouter/kv/import", data=body()) as imp:
            await _check(imp, "import")
            result = await imp.json()
    return TransferResult(held, nbytes, int(result["held_tokens"]), loop.time() - start, modeled)


async def _check(resp: aiohttp.ClientResponse, what: str) -> None:
    if resp.status != 200:
        raise RuntimeError(f"KV {what} at {resp.url} failed: HTTP {resp.status} {await resp.text()}")
