"""Reading `usage` from replica responses without touching what the client receives.

The physical half of the amnesia-tax meter is `usage.prompt_tokens_details.cached_tokens`, which vLLM
reports when started with `--enable-prompt-tokens-details` (vllm-interfaces.md): in a non-streaming
body, and in a stream's last chunk when the client asked for `stream_options.include_usage`.

Rules:
- The scanner sees a stream's bytes *after* they were written to the client, so passthrough never
  waits for it; it keeps only the unfinished last line (bounded by `max_line_bytes`) and parses JSON
  only for `data:` lines that mention `"prompt_tokens"`, so a long stream costs a byte search per chunk.
- Absent, null or malformed usage is simply no report (`None`), never an error.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from router import json_codec

_MARK = b'"prompt_tokens"'


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    cached_tokens: int | None  # None when the replica does not report prompt_tokens_details


def usage_from_object(payload: object) -> Usage | None:
    """The usage of a decoded response body or stream chunk, if it carries one."""
    if not isinstance(payload, Mapping):
        return None
    usage = payload.get("usage")
    if not isinstance(usage, Mapping):
        return None
    prompt = usage.get("prompt_tokens")
    if not isinstance(prompt, int) or isinstance(prompt, bool) or prompt < 0:
        return None
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, Mapping) else None
    if not isinstance(cached, int) or isinstance(cached, bool) or cached < 0:
        cached = None
    return Usage(prompt, cached)


def usage_from_body(body: bytes) -> Usage | None:
    """Usage of a non-streaming JSON response body (skips the parse when it cannot be there)."""
    if _MARK not in body:
        return None
    try:
        return usage_from_object(json_codec.loads(body))
    except (ValueError, RecursionError):
        return None


class SSEUsageScanner:
    """Feed it a stream's chunks as they pass; `usage` is the last usage seen."""

    __slots__ = ("_tail", "max_line_bytes", "usage")

    def __init__(self, max_line_bytes: int = 1 << 20) -> None:
        self._tail = b""
        self.max_line_bytes = max_line_bytes
        self.usage: Usage | None = None

    def feed(self, chunk: bytes) -> None:
        if self._tail:
            chunk = self._tail + chunk
        cut = chunk.rfind(b"\n")
        if cut < 0:
            self._tail = chunk if len(chunk) <= self.max_line_bytes else b""
            return
        self._tail = chunk[cut + 1 :]
        if len(self._tail) > self.max_line_bytes:
            self._tail = b""  # a line that long is not a usage chunk worth holding memory for
        if _MARK not in chunk:
            return
        for line in chunk[:cut].split(b"\n"):
            if _MARK in line and line.startswith(b"data:"):
                try:
                    found = usage_from_object(json_codec.loads(line[5:]))
                except (ValueError, RecursionError):
                    continue
                if found is not None:
                    self.usage = found
