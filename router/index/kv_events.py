"""vLLM KV-cache events: the wire format, decoded and encoded in one place.

Facts (../shared/design/vllm-interfaces.md): a ZMQ PUB message of three frames — topic, an 8-byte
big-endian sequence number (one per batch, from 0 per publisher), and a msgpack payload — where the
payload is the array `[ts, events, data_parallel_rank]`. Events changed encoding between releases:
- vLLM 0.26 to 0.33: each event is a map with `"type"` set to the class name and fields with default
  values omitted (`{"type": "BlockStored", "block_hashes": [...], ...}`);
- vLLM 0.11 to 0.24: each event is an array, tag first
  (`["BlockStored", block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium, ...]`).
The decoder accepts both, and unknown fields or event types (0.33 adds some) without failing; the
encoder writes either, so the emulator can stand in for both generations of vLLM.

Hash values are unsigned 64-bit ints (`VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1`, vLLM's default) or raw
digest bytes; bytes are folded to their low 64 bits (little-endian of the last 8 bytes, as vLLM
takes the low 64 bits of the digest) so the index has one key type.

Pure: bytes in, dataclasses out, and back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import msgpack

SEQ_BYTES = 8
REPLAY_END_SEQ = -1  # 0.26+: the replay's end marker is seq -1 as 8-byte signed big-endian


class KVEventDecodeError(ValueError):
    """A payload that is not a KV event batch of any known vLLM release."""


@dataclass(frozen=True, slots=True)
class BlockStored:
    block_hashes: tuple[int, ...]
    parent_block_hash: int | None
    token_ids: tuple[int, ...]
    block_size: int
    medium: str | None = "GPU"
    lora_id: int | None = None
    lora_name: str | None = None
    # One entry per block (None: no extra keys), as vLLM hashed them: the LoRA name, multimodal
    # identifiers, the cache salt (first block only), prompt-embedding hashes. Arrays become tuples.
    extra_keys: tuple[object, ...] | None = None
    group_idx: int = 0  # the KV cache group (hybrid models have several); absent on the wire = 0


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    block_hashes: tuple[int, ...]
    medium: str | None = "GPU"
    group_idx: int = 0


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    pass


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


@dataclass(frozen=True, slots=True)
class KVEventBatch:
    ts: float
    events: tuple[KVEvent, ...]
    data_parallel_rank: int | None = None


Encoding = Literal["map", "array"]


def encode_seq(seq: int) -> bytes:
    return seq.to_bytes(SEQ_BYTES, "big", signed=seq < 0)


def decode_seq(frame: bytes) -> int:
    if len(frame) != SEQ_BYTES:
        raise KVEventDecodeError(f"sequence frame must be {SEQ_BYTES} bytes, got {len(frame)}")
    value = int.from_bytes(frame, "big")
    # All ones is the replay's end marker (-1 signed); every other value is an unsigned sequence.
    return REPLAY_END_SEQ if value == 0xFFFFFFFFFFFFFFFF else value


def _hash(value: Any) -> int:
    if isinstance(value, bool):
        raise KVEventDecodeError("block hash must be an int or bytes, got a bool")
    if isinstance(value, int):
        return value & 0xFFFFFFFFFFFFFFFF
    if isinstance(value, (bytes, bytearray)):
        return int.from_bytes(bytes(value[-8:]), "little")
    raise KVEventDecodeError(f"block hash must be an int or bytes, got {type(value).__name__}")


def _hashes(value: Any) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)):
        raise KVEventDecodeError("block_hashes must be an array")
    return tuple(_hash(v) for v in value)


def _ints(value: Any, name: str) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) for v in value):
        raise KVEventDecodeError(f"{name} must be an array of ints")
    return tuple(value)


def _opt_int(value: Any, name: str) -> int | None:
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise KVEventDecodeError(f"{name} must be an int or null")


def _opt_str(value: Any, name: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise KVEventDecodeError(f"{name} must be a string or null")


def _frozen(value: Any) -> Any:
    return tuple(_frozen(v) for v in value) if isinstance(value, (list, tuple)) else value


def _extra_keys(value: Any) -> tuple[object, ...] | None:
    if value is None or value == []:  # 0.32 sends [] for "none"
        return None
    if not isinstance(value, (list, tuple)):
        raise KVEventDecodeError("extra_keys must be an array (one entry per block) or null")
    return tuple(_frozen(v) for v in value)


def _decode_event(raw: Any) -> KVEvent | None:
    """One event of either encoding; None for an event type this router does not use."""
    if isinstance(raw, dict):
        kind = raw.get("type")
        if kind == "BlockStored":
            parent = raw.get("parent_block_hash")
            return BlockStored(
                block_hashes=_hashes(raw.get("block_hashes", [])),
                parent_block_hash=None if parent is None else _hash(parent),
                token_ids=_ints(raw.get("token_ids", []), "token_ids"),
                block_size=_opt_int(raw.get("block_size"), "block_size") or 0,
                medium=raw.get("medium", "GPU"),
                lora_id=_opt_int(raw.get("lora_id"), "lora_id"),
                lora_name=_opt_str(raw.get("lora_name"), "lora_name"),
                extra_keys=_extra_keys(raw.get("extra_keys")),
                group_idx=_opt_int(raw.get("group_idx"), "group_idx") or 0,
            )
        if kind == "BlockRemoved":
            return BlockRemoved(
                _hashes(raw.get("block_hashes", [])),
                raw.get("medium", "GPU"),
                _opt_int(raw.get("group_idx"), "group_idx") or 0,
            )
        if kind == "AllBlocksCleared":
            return AllBlocksCleared()
        if isinstance(kind, str):
            return None
        raise KVEventDecodeError("event map without a string 'type'")
    if isinstance(raw, (list, tuple)) and raw and isinstance(raw[0], str):
        kind, fields = raw[0], raw[1:]
        if kind == "BlockStored":
            if len(fields) < 4:
                raise KVEventDecodeError("BlockStored array needs at least 4 fields")
            parent = fields[1]
            return BlockStored(
                block_hashes=_hashes(fields[0]),
                parent_block_hash=None if parent is None else _hash(parent),
                token_ids=_ints(fields[2], "token_ids"),
                block_size=_opt_int(fields[3], "block_size") or 0,
                lora_id=_opt_int(fields[4], "lora_id") if len(fields) > 4 else None,
                medium=fields[5] if len(fields) > 5 else "GPU",
                lora_name=_opt_str(fields[6], "lora_name") if len(fields) > 6 else None,
                extra_keys=_extra_keys(fields[7]) if len(fields) > 7 else None,
                group_idx=(_opt_int(fields[8], "group_idx") or 0) if len(fields) > 8 else 0,
            )
        if kind == "BlockRemoved":
            if not fields:
                raise KVEventDecodeError("BlockRemoved array needs block_hashes")
            return BlockRemoved(
                _hashes(fields[0]),
                fields[1] if len(fields) > 1 else "GPU",
                (_opt_int(fields[2], "group_idx") or 0) if len(fields) > 2 else 0,
            )
        if kind == "AllBlocksCleared":
            return AllBlocksCleared()
        return None
    raise KVEventDecodeError(f"an event must be a map or a tagged array, got {type(raw).__name__}")


def decode_batch(payload: bytes) -> KVEventBatch:
    """Decode a msgpack `[ts, events, data_parallel_rank]` payload of any supported release."""
    try:
        raw = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except (ValueError, msgpack.UnpackException) as exc:
        raise KVEventDecodeError(f"not msgpack: {exc}") from None
    if not isinstance(raw, (list, tuple)) or len(raw) < 2:
        raise KVEventDecodeError("a batch must be an array [ts, events, data_parallel_rank]")
    ts, events = raw[0], raw[1]
    if not isinstance(ts, (int, float)) or not isinstance(events, (list, tuple)):
        raise KVEventDecodeError("a batch must start with a timestamp and an event array")
    rank = _opt_int(raw[2], "data_parallel_rank") if len(raw) > 2 else None
    decoded = tuple(e for e in (_decode_event(item) for item in events) if e is not None)
    return KVEventBatch(float(ts), decoded, rank)


def _encode_event(event: KVEvent, encoding: Encoding) -> Any:
    if isinstance(event, BlockStored):
        extra = None if event.extra_keys is None else list(event.extra_keys)
        if encoding == "array":
            fields: list[Any] = [
                "BlockStored",
                list(event.block_hashes),
                event.parent_block_hash,
                list(event.token_ids),
                event.block_size,
                event.lora_id,
                event.medium,
            ]
            # The optional trailing fields, only as far as needed (0.11 ends at medium).
            if event.lora_name is not None or extra is not None or event.group_idx:
                fields.append(event.lora_name)
            if extra is not None or event.group_idx:
                fields += [extra, event.group_idx]
            return fields
        out: dict[str, Any] = {
            "type": "BlockStored",
            "block_hashes": list(event.block_hashes),
            "parent_block_hash": event.parent_block_hash,
            "token_ids": list(event.token_ids),
            "block_size": event.block_size,
            # vLLM declares these BlockStored fields without defaults, so msgspec's omit_defaults
            # never drops them: 0.32 sends "lora_id": null and "lora_name": null (the live sample in
            # vllm-interfaces.md), and decoders that require them (vllm-router 0.1.17's kv_aware)
            # reject a map without them.
            "lora_id": event.lora_id,
            "medium": event.medium,
            "lora_name": event.lora_name,
        }
        if extra is not None:
            out["extra_keys"] = extra
        if event.group_idx:
            out["group_idx"] = event.group_idx
        return out
    if isinstance(event, BlockRemoved):
        if encoding == "array":
            tail = [event.group_idx] if event.group_idx else []
            return ["BlockRemoved", list(event.block_hashes), event.medium, *tail]
        removed: dict[str, Any] = {
            "type": "BlockRemoved",
            "block_hashes": list(event.block_hashes),
            "medium": event.medium,
        }
        if event.group_idx:
            removed["group_idx"] = event.group_idx
        return removed
    return ["AllBlocksCleared"] if encoding == "array" else {"type": "AllBlocksCleared"}


def encode_batch(
    events: Sequence[KVEvent], ts: float, *, data_parallel_rank: int = 0, encoding: Encoding = "map"
) -> bytes:
    """The msgpack payload vLLM would publish for these events (`encoding`: "map" 0.26+, "array" older)."""
    body = [ts, [_encode_event(e, encoding) for e in events], data_parallel_rank]
    return bytes(msgpack.packb(body, use_bin_type=True))
