"""The router's own errors and their one translation to HTTP: OpenAI-style JSON error bodies.

Rules:
- Everything the proxy refuses or fails at is a `ProxyError` carrying its HTTP status, an OpenAI error
  `type` and `code`, and the offending `param` when there is one. Handlers raise; one middleware
  (router/proxy.py) turns it into a response, so the body shape is decided here and only here.
- The body is OpenAI's: `{"error": {"message", "type", "param", "code"}}` — what the `openai` client
  parses into `APIStatusError.body`. (vLLM's own errors are flat `{"object": "error", ...}`; replica
  responses are passed through unchanged, so a client sees vLLM's shape for errors a replica made and
  this one for errors the router made.)
- Statuses that invite a retry (429, 503) carry `Retry-After` in whole seconds.
- An error inside an SSE stream (after the first byte, when the status line is long gone) is the
  event `data: {"error": {...}}` followed by `data: [DONE]`, as vLLM itself ends a failed stream.
"""

from __future__ import annotations

import json
import math

from aiohttp import web

JSON_CONTENT_TYPE = "application/json"


class ProxyError(Exception):
    """A request the router refuses or could not complete, mapped to one HTTP error response."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        err_type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.err_type = err_type
        self.code = code
        self.param = param
        self.retry_after_s = retry_after_s

    def body(self) -> dict[str, object]:
        return error_body(self.message, self.err_type, code=self.code, param=self.param)

    def response(self) -> web.Response:
        headers = {}
        if self.retry_after_s is not None:
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after_s)))
        return json_response(self.body(), status=self.status, headers=headers)


def error_body(
    message: str, err_type: str, *, code: str | None = None, param: str | None = None
) -> dict[str, object]:
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}


def json_response(
    payload: object, *, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    # ASCII escapes: a message may quote client text, lone surrogates included, which UTF-8 cannot carry.
    body = json.dumps(payload, separators=(",", ":")).encode()
    return web.Response(body=body, status=status, headers=headers, content_type=JSON_CONTENT_TYPE)


def bad_request(message: str, *, param: str | None = None, code: str = "invalid_value") -> ProxyError:
    return ProxyError(400, message, param=param, code=code)


def sse_error_event(message: str, *, code: str, err_type: str = "upstream_error") -> bytes:
    """The SSE events that end a stream which failed after its first byte."""
    payload = json.dumps(error_body(message, err_type, code=code), separators=(",", ":"))
    return f"data: {payload}\n\ndata: [DONE]\n\n".encode()


# The error type and code for each status aiohttp itself may raise before a handler runs
# (no route, wrong method, body too large...), so those answers have the same JSON shape.
HTTP_ERROR_TYPES: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "bad_request"),
    401: ("authentication_error", "invalid_api_key"),
    403: ("permission_error", "forbidden"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "request_too_large"),
    415: ("invalid_request_error", "unsupported_media_type"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
}


def from_http_exception(exc: web.HTTPException) -> ProxyError:
    """aiohttp's own HTTP error (404 no route, 405, 413...) as a ProxyError with a JSON body."""
    err_type, code = HTTP_ERROR_TYPES.get(exc.status, ("server_error", "http_error"))
    message = exc.reason if exc.status != 404 else "Not found: no such route on this router"
    return ProxyError(exc.status, message, err_type=err_type, code=code)
