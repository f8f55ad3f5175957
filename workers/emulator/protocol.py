"""The OpenAI-compatible wire of one emulated replica, without I/O: bodies in, typed requests or
`ApiError`s out; response bodies and stream chunks out. Shapes follow vLLM's OpenAI server
(vllm/entrypoints/openai/protocol.py, serving_completion.py, serving_chat.py; vllm-interfaces.md).

Rules:
- One prompt and one choice a request: a list of several prompts, or `n` other than 1, is a 400 here
  (vLLM serves them; no router sends them, and refusing keeps usage and aborts one-to-one).
- Types are checked strictly (an int is an int, not a bool, float or numeric string): stricter than
  pydantic's lax mode, never looser, so a client that works here sends what vLLM accepts.
- Unknown fields are ignored, as vLLM ignores them (with a warning). Sampling fields (temperature,
  top_p, stop, seed...) are accepted and have no effect: output is deterministic and always runs to
  max_tokens (the engine ignores EOS, as with `ignore_eos: true`), so `finish_reason` is "length".
- `max_tokens` defaults to 16 for both endpoints (OpenAI's completions default). vLLM's chat default is
  "the rest of the context", which would make an emulated chat answer thousands of tokens.
- `usage.prompt_tokens_details.cached_tokens` is always present: the emulator behaves like vLLM started
  with `--enable-prompt-tokens-details`, the flag a cache-aware fleet runs with.
- Errors are vLLM's flat `ErrorResponse`: {"object": "error", "message", "type", "param": null, "code"};
  an unknown model is a 404 NotFoundError with vLLM's message, everything else malformed a 400.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from workers.engine import tokenizer
from workers.engine.tokenizer import VOCAB_SIZE

DEFAULT_MAX_TOKENS = 16
RequestKind = Literal["completion", "chat"]


class ApiError(Exception):
    """A request the server refuses; mapped to a vLLM-like JSON error at the HTTP edge."""

    def __init__(self, message: str, *, status: int = 400, err_type: str = "BadRequestError") -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.err_type = err_type


def error_body(message: str, err_type: str, status: int) -> dict[str, Any]:
    return {"object": "error", "message": message, "type": err_type, "param": None, "code": status}


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """A validated /v1/completions or /v1/chat/completions request."""

    kind: RequestKind
    model: str
    prompt_token_ids: list[int]
    max_tokens: int
    stream: bool
    include_usage: bool


def parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise ApiError(f"Invalid JSON body: {exc}") from None


def _object(body: Any) -> Mapping[str, Any]:
    if not isinstance(body, dict):
        raise ApiError(f"The request body must be a JSON object, got {type(body).__name__}")
    return body


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _opt_int(body: Mapping[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is not None and not _is_int(value):
        raise ApiError(f"{name} must be an integer, got {json.dumps(value)[:50]}")
    return value


def _opt_bool(body: Mapping[str, Any], name: str, default: bool) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(f"{name} must be a boolean")
    return value


def check_model(body: Mapping[str, Any], served_model: str) -> str:
    """The served model name; a 404 for any other (vLLM's `_check_model`); absent means the served one."""
    model = body.get("model")
    if model is None:
        return served_model
    if not isinstance(model, str):
        raise ApiError("model must be a string")
    if model != served_model:
        raise ApiError(f"The model `{model}` does not exist.", status=404, err_type="NotFoundError")
    return model


def check_token_ids(ids: Sequence[Any]) -> list[int]:
    if not all(_is_int(t) for t in ids):
        raise ApiError("a token-id prompt must be a list of integers")
    if ids and (min(ids) < 0 or max(ids) >= VOCAB_SIZE):
        bad = next(t for t in ids if t < 0 or t >= VOCAB_SIZE)
        raise ApiError(f"Token id {bad} is out of vocabulary")
    return list(ids)


def prompt_token_ids(prompt: Any) -> list[int]:
    """A completions prompt as token ids: text, token ids, or a batch of exactly one of either."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # the batch form with one prompt: ["text"] or [[1, 2, 3]]
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    if isinstance(prompt, list):
        if prompt and isinstance(prompt[0], (str, list)):
            raise ApiError("the emulator serves one prompt a request; send the prompts separately")
        return check_token_ids(prompt)
    raise ApiError("prompt must be a string, a list of token ids, or a list of one of either")


def messages_text(messages: Any, *, add_generation_prompt: bool = True) -> str:
    """Chat messages rendered by the engine tokenizer's chat template."""
    if not isinstance(messages, list) or not messages:
        raise ApiError("messages must be a non-empty list")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError("each message must be an object with a string 'role'")
        content = m.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise ApiError("a message's content must be a string, a list of content parts, or null")
    return tokenizer.render_chat(messages, add_generation_prompt=add_generation_prompt)


def _check_lengths(num_prompt: int, max_tokens: int, max_model_len: int) -> int:
    """vLLM 0.32's length rules and messages; returns the max_tokens the engine will use.

    A prompt longer than the context is refused; a max_tokens reaching past the context is clamped to
    what is left (vllm/entrypoints/serve/utils/api_utils.py, get_max_tokens), not refused as releases
    before ~0.10 did; a prompt that fills the whole context leaves 0, which SamplingParams refuses.
    """
    if num_prompt == 0:
        raise ApiError("The prompt cannot be empty.")
    if max_tokens < 1:
        raise ApiError(f"max_tokens must be at least 1, got {max_tokens}.")
    if num_prompt > max_model_len:
        raise ApiError(
            f"Input length ({num_prompt}) exceeds model's maximum context length ({max_model_len})."
        )
    if num_prompt == max_model_len:
        raise ApiError("max_tokens must be at least 1, got 0.")
    return min(max_tokens, max_model_len - num_prompt)


def _stream_flags(body: Mapping[str, Any]) -> tuple[bool, bool]:
    stream = _opt_bool(body, "stream", False)
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not isinstance(options, dict):
        raise ApiError("stream_options must be an object")
    if not stream:  # vLLM's validate_stream_options
        raise ApiError("Stream options can only be defined when `stream=True`.")
    return stream, _opt_bool(options, "include_usage", False)


def _common(body: Mapping[str, Any]) -> None:
    n = _opt_int(body, "n")
    if n is not None and n != 1:
        raise ApiError("the emulator serves n=1 only")
    _opt_bool(body, "ignore_eos", False)  # accepted: the engine never stops early anyway


def parse_completion(raw: Any, served_model: str, max_model_len: int) -> GenerationRequest:
    body = _object(raw)
    model = check_model(body, served_model)
    if "prompt" not in body:
        raise ApiError("prompt is required")
    _common(body)
    max_tokens = _opt_int(body, "max_tokens")
    max_tokens = DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
    stream, include_usage = _stream_flags(body)
    ids = prompt_token_ids(body["prompt"])
    max_tokens = _check_lengths(len(ids), max_tokens, max_model_len)
    return GenerationRequest("completion", model, ids, max_tokens, stream, include_usage)


def parse_chat(raw: Any, served_model: str, max_model_len: int) -> GenerationRequest:
    body = _object(raw)
    model = check_model(body, served_model)
    _common(body)
    # vLLM: max_completion_tokens (the current OpenAI name) wins over the deprecated max_tokens.
    max_tokens = _opt_int(body, "max_completion_tokens")
    if max_tokens is None:
        max_tokens = _opt_int(body, "max_tokens")
    max_tokens = DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
    stream, include_usage = _stream_flags(body)
    text = messages_text(
        body.get("messages"), add_generation_prompt=_opt_bool(body, "add_generation_prompt", True)
    )
    ids = tokenizer.encode(text)
    max_tokens = _check_lengths(len(ids), max_tokens, max_model_len)
    return GenerationRequest("chat", model, ids, max_tokens, stream, include_usage)


def parse_tokenize(raw: Any, served_model: str) -> list[int]:
    """/tokenize: `{prompt}` (text) or `{messages, add_generation_prompt}` (vLLM defaults it to true)."""
    body = _object(raw)
    check_model(body, served_model)
    if "messages" in body:
        add = _opt_bool(body, "add_generation_prompt", True)
        return tokenizer.encode(messages_text(body["messages"], add_generation_prompt=add))
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise ApiError("prompt (a string) or messages is required")
    return tokenizer.encode(prompt)


# -- responses -----------------------------------------------------------------------------------------


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def response_body(
    req: GenerationRequest,
    request_id: str,
    created: int,
    text: str,
    usage_: dict[str, Any],
    finish_reason: str = "length",
) -> dict[str, Any]:
    """The non-streaming response of either endpoint."""
    if req.kind == "completion":
        choice: dict[str, Any] = {
            "index": 0,
            "text": text,
            "logprobs": None,
            "finish_reason": finish_reason,
            "stop_reason": None,
            "prompt_logprobs": None,
        }
        obj = "text_completion"
    else:
        message: dict[str, Any] = {"role": "assistant", "content": text}
        message.update(reasoning_content=None, tool_calls=[])
        choice = {
            "index": 0,
            "message": message,
            "logprobs": None,
            "finish_reason": finish_reason,
            "stop_reason": None,
        }
        obj = "chat.completion"
    return {
        "id": request_id,
        "object": obj,
        "created": created,
        "model": req.model,
        "choices": [choice],
        "usage": usage_,
        "prompt_logprobs": None,
        "kv_transfer_params": None,
    }


def sse(payload: Mapping[str, Any]) -> bytes:
    """One server-sent event line pair, as vLLM writes it."""
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def chunk_body(
    req: GenerationRequest, request_id: str, created: int, text: str, finish_reason: str | None
) -> dict[str, Any]:
    """A streamed choice chunk carrying `text` (vLLM sends one per engine step)."""
    if req.kind == "completion":
        choice: dict[str, Any] = {
            "index": 0,
            "text": text,
            "logprobs": None,
            "finish_reason": finish_reason,
            "stop_reason": None,
        }
        # vLLM dumps completion chunks with exclude_unset=False, so "usage": null is in every chunk.
        return {
            "id": request_id,
            "object": "text_completion",
            "created": created,
            "model": req.model,
            "choices": [choice],
            "usage": None,
        }
    choice = {"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": finish_reason}
    return {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": req.model,
        "choices": [choice],
    }


def chat_role_chunk(req: GenerationRequest, request_id: str, created: int) -> dict[str, Any]:
    """vLLM's first chat chunk: the assistant role with empty content, before any token."""
    choice = {
        "index": 0,
        "delta": {"role": "assistant", "content": ""},
        "logprobs": None,
        "finish_reason": None,
    }
    return {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": req.model,
        "choices": [choice],
    }


def usage_chunk(
    req: GenerationRequest, request_id: str, created: int, usage_: dict[str, Any]
) -> dict[str, Any]:
    """The last chunk under `stream_options.include_usage`: no choices, the usage."""
    obj = "text_completion" if req.kind == "completion" else "chat.completion.chunk"
    return {
        "id": request_id,
        "object": obj,
        "created": created,
        "model": req.model,
        "choices": [],
        "usage": usage_,
    }
