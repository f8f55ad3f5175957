"""An OpenAI request body, parsed once and checked in what the router reads; bytes in, `ParsedRequest` out.

Rules:
- Only the fields the router reads are checked (model, prompt / messages, max_tokens, stream, user,
  cache_salt, stream_options); the rest is the replica's business, and the original bytes are what
  is forwarded, so a field the router does not know passes through untouched.
- Types are strict, as the replica's are: an int is an int, not a bool or a float; a bad field is a
  400 naming it in `param` (a `ProxyError` from router/errors.py), never a 500.
- Completions accept a prompt as text, token ids, a list of texts or a list of token-id lists (a
  batch). A batch goes to one replica, so it is routed by its first prompt, counting every prompt's
  tokens as load.
- The session key (stickiness for policies that use one) is the `x-session-id` header, else `user`.
- Token-precise mode (router/tokenize.py): the fields that change the token ids vLLM computes
  (`TOKEN_ID_FIELDS`) are kept, unchecked, for the tokenizer; `view(token_ids=...)` then hashes the
  ids in blocks of `block_size` and counts them exactly. Without ids the view is the text one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

from router import json_codec
from router.errors import ProxyError, bad_request
from router.index.chunking import hash_tokens
from router.policies.base import RequestView, estimate_tokens, make_request

Endpoint = Literal["completions", "chat"]
# OpenAI's completions default; vLLM's chat default is "the rest of the context", unknowable here,
# so chat uses the same small number as the emulator (workers/emulator/protocol.py).
DEFAULT_MAX_TOKENS = 16
SESSION_HEADER = "x-session-id"
_MAX_TOKEN_ID = 2**32  # hash_tokens packs ids as uint32; no vocabulary is larger
# Request fields that change the token ids vLLM computes for a text prompt or a conversation (vLLM's
# CompletionRequest / ChatCompletionRequest), kept for token-precise mode when set and not null.
TOKEN_ID_FIELDS: dict[Endpoint, tuple[str, ...]] = {
    "completions": ("add_special_tokens", "truncate_prompt_tokens"),
    "chat": (
        "add_generation_prompt",
        "continue_final_message",
        "add_special_tokens",
        "chat_template",
        "chat_template_kwargs",
        "tools",
        "documents",
        "truncate_prompt_tokens",
    ),
}
# A chunk longer than any prompt: text hashing that yields no chunk (for views whose hashes are then
# replaced by token hashes), so the text is not hashed for nothing.
_NO_TEXT_CHUNKS = 1 << 60


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    """What the router needs of one request; `prompt` or `messages` is set, never both."""

    endpoint: Endpoint
    model: str
    stream: bool
    max_tokens: int
    prompt: str | tuple[int, ...] | None = None
    messages: tuple[Mapping[str, object], ...] | None = None
    prompt_tokens: int | None = None  # set for batches: every prompt's tokens
    session_key: str | None = None
    cache_salt: str | None = None
    token_options: Mapping[str, object] | None = None  # the TOKEN_ID_FIELDS it set, if any

    @property
    def needs_tokens(self) -> bool:
        """Whether token-precise mode must tokenize it: text or chat (token ids are already ids)."""
        return self.messages is not None or isinstance(self.prompt, str)

    def view(
        self,
        request_id: str,
        *,
        chunk_chars: int,
        block_size: int,
        token_ids: Sequence[int] | None = None,
    ) -> RequestView:
        """The sans-I/O core's view of this request (router/policies/base.py).

        With `token_ids` (what the replica will compute for the text prompt or the conversation, from
        router/tokenize.py) the request is hashed in token blocks, exactly as `hash_tokens(token_ids,
        model, block_size=..., cache_salt=...)`, and its prompt tokens are counted exactly; the text
        (for text-matching policies) and the first user message stay those of the request."""
        if token_ids is not None:
            return self._token_view(request_id, block_size, token_ids)
        try:
            return make_request(
                request_id,
                self.model,
                prompt=self.prompt,
                messages=self.messages,
                max_tokens=self.max_tokens,
                session_key=self.session_key,
                cache_salt=self.cache_salt,
                prompt_tokens=self.prompt_tokens,
                chunk_chars=chunk_chars,
                block_size=block_size,
            )
        except ValueError as exc:  # token ids outside uint32, already checked; kept as a 400
            raise bad_request(str(exc), param="prompt") from None

    def _token_view(self, request_id: str, block_size: int, token_ids: Sequence[int]) -> RequestView:
        ids = tuple(token_ids)
        text_view = make_request(
            request_id,
            self.model,
            prompt=self.prompt if isinstance(self.prompt, str) else None,
            messages=self.messages,
            max_tokens=self.max_tokens,
            session_key=self.session_key,
            cache_salt=self.cache_salt,
            chunk_chars=_NO_TEXT_CHUNKS,
        )
        prompt_tokens = len(ids)
        if self.prompt_tokens is not None and isinstance(self.prompt, str):
            # A batch: the first prompt's tokens are now known; the others stay estimated.
            prompt_tokens += self.prompt_tokens - estimate_tokens(self.prompt)
        hashes = hash_tokens(ids, self.model, block_size=block_size, cache_salt=self.cache_salt)
        return replace(text_view, hashes=hashes, prompt_tokens=prompt_tokens, token_ids=ids)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _token_ids(value: list[object], param: str) -> tuple[int, ...]:
    for item in value:
        if not _is_int(item):
            raise bad_request(f"{param} must be text or a list of integer token ids", param=param)
        if not 0 <= item < _MAX_TOKEN_ID:  # type: ignore[operator]
            raise bad_request(f"{param} has a token id outside [0, 2**32): {item}", param=param)
    return tuple(value)  # type: ignore[arg-type]


def _prompt(body: Mapping[str, object]) -> tuple[str | tuple[int, ...], int | None]:
    """The prompt to route by, and the batch's total token estimate when it is a batch."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return prompt, None
    if not isinstance(prompt, list):
        what = "is required" if prompt is None else "must be a string or a list"
        raise bad_request(
            f"prompt {what}", param="prompt", code="missing" if prompt is None else "invalid_type"
        )
    if not prompt:
        raise bad_request("prompt must not be an empty list", param="prompt")
    if all(isinstance(p, str) for p in prompt):
        texts: list[str] = prompt
        return texts[0], sum(estimate_tokens(t) for t in texts) if len(texts) > 1 else None
    if all(isinstance(p, list) for p in prompt):
        batch = [_token_ids(p, "prompt") for p in prompt]
        if not batch[0]:
            raise bad_request("prompt token-id lists must not be empty", param="prompt")
        return batch[0], sum(map(len, batch)) if len(batch) > 1 else None
    ids = _token_ids(prompt, "prompt")
    return ids, None


def _messages(body: Mapping[str, object]) -> tuple[Mapping[str, object], ...]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list of message objects", param="messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad_request(f"messages[{i}] must be an object", param=f"messages[{i}]")
        if not isinstance(message.get("role"), str):
            raise bad_request(f"messages[{i}].role must be a string", param=f"messages[{i}].role")
        content = message.get("content")
        if content is not None and not isinstance(content, str | list):
            raise bad_request(
                f"messages[{i}].content must be a string, a list of content parts or null",
                param=f"messages[{i}].content",
            )
    return tuple(messages)


def _optional(body: Mapping[str, object], key: str, kind: type, what: str) -> object:
    value = body.get(key)
    if value is not None and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
        raise bad_request(f"{key} must be {what}", param=key, code="invalid_type")
    return value


def parse_body(raw: bytes, endpoint: Endpoint, session_header: str | None = None) -> ParsedRequest:
    """Parse and check one /v1/completions or /v1/chat/completions body (ProxyError 400 if bad)."""
    try:
        body = json_codec.loads(raw)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ProxyError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ProxyError(400, "request body must be a JSON object", code="invalid_json")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        what = "is required" if model is None else "must be a non-empty string"
        raise bad_request(
            f"model {what}", param="model", code="invalid_type" if model is not None else "missing"
        )
    stream = _optional(body, "stream", bool, "a boolean")
    if _optional(body, "stream_options", dict, "an object") is not None and not stream:
        raise bad_request("stream_options is only allowed when stream is true", param="stream_options")
    max_key = (
        "max_completion_tokens" if endpoint == "chat" and "max_completion_tokens" in body else "max_tokens"
    )
    max_tokens = _optional(body, max_key, int, "a positive integer")
    if max_tokens is not None and max_tokens <= 0:  # type: ignore[operator]
        raise bad_request(f"{max_key} must be a positive integer", param=max_key)
    user = _optional(body, "user", str, "a string")
    salt = _optional(body, "cache_salt", str, "a string")
    messages: tuple[Mapping[str, object], ...] | None = None
    prompt: str | tuple[int, ...] | None = None
    total: int | None = None
    if endpoint == "chat":
        messages = _messages(body)
    else:
        prompt, total = _prompt(body)
    options = {k: body[k] for k in TOKEN_ID_FIELDS[endpoint] if body.get(k) is not None} or None
    return ParsedRequest(
        endpoint,
        model=model,
        stream=stream is True,
        max_tokens=max_tokens if isinstance(max_tokens, int) else DEFAULT_MAX_TOKENS,
        prompt=prompt,
        messages=messages,
        prompt_tokens=total,
        session_key=session_header or (user if isinstance(user, str) else None),
        cache_salt=salt if isinstance(salt, str) else None,
        token_options=options,
    )
