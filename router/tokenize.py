"""Token-precise mode: the token ids a vLLM replica will compute for a request, before routing it.

With `tokenizer` set in the configuration, the proxy hashes every text prompt and chat conversation in
token blocks of `block_size` (`hash_tokens`, router/index/chunking.py), the same blocks the replicas'
KV events describe, instead of in character chunks. Two ways to get the ids, behind one Protocol:

- `LocalTokenizer(path)`: the model's own `tokenizer.json` (HF `tokenizers`), and the chat template of
  `tokenizer_config.json` (or `chat_template.jinja`) rendered as transformers' `apply_chat_template`
  renders it. No network hop; exact for what it covers (see below); costs router CPU.
- `ReplicaTokenizer`: vLLM's own `POST /tokenize` on a healthy replica serving the model. Exact by
  construction (the replica's tokenizer, template and defaults), at the price of one HTTP round trip.

Rules:
- What vLLM does, and so what `LocalTokenizer` reproduces: a completions prompt is encoded WITH special
  tokens (`add_special_tokens` defaults to true on /v1/completions, so the tokenizer.json post-processor
  adds its BOS); a chat conversation is rendered by the template (which writes its own BOS) and encoded
  WITHOUT special tokens (`add_special_tokens` defaults to false on /v1/chat/completions). Before
  rendering, vLLM turns each message into its "string" content format: text parts joined by "\\n", null
  content as "", assistant `tool_calls` arguments parsed from JSON (vllm/entrypoints/chat_utils.py).
- Request fields that change the ids are honoured or refused, never ignored: `add_special_tokens`,
  `add_generation_prompt`, `chat_template_kwargs` locally; everything vLLM's /tokenize accepts
  (those, plus `continue_final_message`, `chat_template`, `tools`) by the replica. Anything else that
  changes the ids (`truncate_prompt_tokens`; locally also tools, documents, a per-request template,
  `continue_final_message`, non-text content parts) raises `TokenizeError("unsupported")`.
- Every failure is a `TokenizeError` with a `reason` from `FAILURE_REASONS` (a bounded metric label).
  The proxy then hashes that request as text, as if token-precise mode were off, and counts the reason;
  a tokenizer never fails a client's request.
- Long inputs are encoded on a small thread pool: `tokenizers` releases the GIL while encoding, so the
  event loop keeps serving (see `THREAD_ABOVE_CHARS` for where the hop starts paying).
- Memory: a tokenizer keeps nothing per request. The replica's answer is read up to a bound derived from
  the request size (`_max_answer_bytes`).
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from router.config import TOKENIZER_REPLICA, ConfigError
from router.openai_request import TOKEN_ID_FIELDS

log = logging.getLogger("kvrouter.tokenize")

FAILURE_REASONS = (
    "no_replica",  # replica mode: no healthy replica serves the model
    "connect_error",  # replica mode: could not reach it, or it dropped the connection
    "timeout",  # replica mode: no answer within the timeout
    "http_status",  # replica mode: an answer other than 200 (e.g. a server without /tokenize: 404)
    "bad_response",  # replica mode: not the {"tokens": [int, ...]} vLLM answers
    "unsupported",  # a request field or content this tokenizer cannot reproduce (module docstring)
    "template_error",  # local: the chat template raised (raise_exception, or a Jinja error)
    "encode_error",  # local: tokenizers failed to encode
    "internal",  # anything else: a bug, logged with its traceback by the proxy
)
# vLLM's /tokenize of an 8 KB prompt answers in about 12 ms here, p90 under 30 ms (docs/OPERATIONS.md,
# "Token-precise mode"). An API server that needs 40x that is overloaded, and a request should not
# wait longer than this for its routing: past it, the request is hashed as text.
REPLICA_TIMEOUT_S = 1.0
# Up to this many characters a prompt is encoded on the event loop, above it in a thread. Measured
# here (docs/OPERATIONS.md, "Token-precise mode"; a 32K-vocabulary byte-level BPE, 2 shared cores):
# encoding costs about 0.4-0.7 µs a character (512 characters: 0.2 ms; 8 KB: 3-6 ms), the thread hop
# (run_in_executor on uvloop) 56 µs. So a prompt of this size stalls the loop for at most ~0.2 ms,
# while for a longer one the hop costs under a quarter of the encode it takes off the loop.
THREAD_ABOVE_CHARS = 512
# Threads for long encodes: tokenizers releases the GIL, so up to this many encode in parallel; more
# would only compete with the event loop's own core on the small machines routers run on.
MAX_THREADS = 4
_MAX_TOKEN_ID = 2**32  # hash_tokens packs ids as uint32
_TEXT_PART_KEYS = {"text": "text", "input_text": "text", "output_text": "text", "refusal": "refusal"}
# Fields of a request that change its token ids, by endpoint, that vLLM's /tokenize accepts: all of
# TOKEN_ID_FIELDS (router/openai_request.py) but those /tokenize has no field for (vLLM's
# TokenizeCompletionRequest and TokenizeChatRequest).
_NOT_IN_TOKENIZE = frozenset({"truncate_prompt_tokens", "documents"})
REPLICA_OPTIONS = {
    endpoint: tuple(f for f in fields if f not in _NOT_IN_TOKENIZE)
    for endpoint, fields in TOKEN_ID_FIELDS.items()
}
LOCAL_OPTIONS = {
    "completions": ("add_special_tokens",),
    "chat": ("add_generation_prompt", "add_special_tokens", "chat_template_kwargs"),
}
# transformers passes the special tokens map to the template (apply_chat_template: special_tokens_map).
_SPECIAL_TOKEN_KEYS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


class TokenizeError(Exception):
    """Tokenization failed; `reason` is one of FAILURE_REASONS (a metric label)."""

    def __init__(self, reason: str, message: str) -> None:
        assert reason in FAILURE_REASONS, reason
        super().__init__(message)
        self.reason = reason


class Tokenizer(Protocol):
    """Token ids of a completions prompt or a chat conversation, as the replica will compute them.

    `options` holds the request's fields that change its ids (`TOKEN_ID_FIELDS` of
    router/openai_request.py) that it set; one the tokenizer cannot honour is refused ("unsupported"),
    never ignored. Raises TokenizeError."""

    async def completion_ids(self, model: str, prompt: str, options: Mapping[str, object]) -> list[int]: ...

    async def chat_ids(
        self, model: str, messages: Sequence[Mapping[str, object]], options: Mapping[str, object]
    ) -> list[int]: ...

    async def close(self) -> None: ...


def _check_options(options: Mapping[str, object], allowed: Sequence[str], who: str) -> None:
    unsupported = sorted(k for k in options if k not in allowed)
    if unsupported:
        raise TokenizeError("unsupported", f"{who} cannot reproduce a request with {', '.join(unsupported)}")


def _flag(options: Mapping[str, object], key: str, default: bool) -> bool:
    value = options.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise TokenizeError("unsupported", f"{key} must be a boolean")
    return value


# -- local ------------------------------------------------------------------------------------------


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` renders its body: transformers' AssistantTracker does
    only that when no assistant mask is asked for, and some templates use the tag."""

    tags = {"generation"}  # noqa: RUF012 (jinja2's own class attribute)

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: object,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # transformers' own filter (not Jinja's, which HTML-escapes): templates render tools with it.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)  # Llama 3.1+ templates print today's date, as transformers does


def _template_environment() -> ImmutableSandboxedEnvironment:
    """The environment transformers compiles chat templates in (its _compile_jinja_template)."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _special_token(value: object) -> str | None:
    """A special token as tokenizer_config.json stores it: a string, or an AddedToken's mapping."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def _chat_template(config: Mapping[str, object], folder: Path) -> str | None:
    """The default chat template: `chat_template.jinja` when present (transformers' current layout,
    which wins over the config's), else tokenizer_config.json's `chat_template` (a string, or a list of
    {name, template} of which "default" is the one vLLM uses without a per-request choice)."""
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        try:
            return jinja_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"tokenizer: cannot read {str(jinja_file)!r}: {exc}") from None
    raw = config.get("chat_template")
    if raw is None or isinstance(raw, str):
        return raw
    if isinstance(raw, list):
        for item in raw:
            if (
                isinstance(item, Mapping)
                and item.get("name") == "default"
                and isinstance(item.get("template"), str)
            ):
                return str(item["template"])
    raise ConfigError(
        f"tokenizer: {str(folder / 'tokenizer_config.json')!r}: chat_template must be a string or a list "
        "with a {name: default, template: ...} entry"
    )


def vllm_conversation(messages: Sequence[Mapping[str, object]]) -> list[dict[str, Any]]:
    """The messages as vLLM hands them to the template in its "string" content format.

    vLLM (chat_utils._parse_chat_message_content): content becomes one string, text parts joined by "\\n"
    and null as ""; `name` is kept when a string, `tool_calls` for assistants (arguments parsed from
    JSON, {} when they do not parse), `tool_call_id` for tools; other keys are dropped. TokenizeError
    ("unsupported") for content parts that are not text (images, audio: a multimodal prompt)."""
    out: list[dict[str, Any]] = []
    for message in messages:
        role = message.get("role")
        content = message.get("content")
        if content is None:
            text = ""
        elif isinstance(content, str):
            text = content
        elif isinstance(content, list):
            texts: list[str] = []
            for part in content:
                if isinstance(part, str):
                    texts.append(part)
                    continue
                kind = part.get("type") if isinstance(part, Mapping) else None
                key = _TEXT_PART_KEYS.get(kind) if isinstance(kind, str) else None
                if key is None:
                    raise TokenizeError("unsupported", "a content part that is not text (multimodal)")
                value = part.get(key)
                if isinstance(value, str):  # vLLM skips a text part without text
                    texts.append(value)
            text = "\n".join(texts)
        else:
            raise TokenizeError("unsupported", "message content must be a string, a list or null")
        item: dict[str, Any] = {"role": role, "content": text}
        if role == "assistant" and message.get("tool_calls") is not None:
            calls = copy.deepcopy(message["tool_calls"])  # never change the client's request
            if not isinstance(calls, list):
                raise TokenizeError("unsupported", "tool_calls must be a list")
            if calls:
                for call in calls:
                    function = call.get("function") if isinstance(call, dict) else None
                    if isinstance(function, dict):
                        args = function.get("arguments")
                        if isinstance(args, str):
                            try:
                                function["arguments"] = json.loads(args)
                            except ValueError:
                                function["arguments"] = {}
                        elif not isinstance(args, dict | list):
                            function["arguments"] = {}
                item["tool_calls"] = calls
        if role == "tool" and "tool_call_id" in message:
            item["tool_call_id"] = message["tool_call_id"]
        if isinstance(message.get("name"), str):
            item["name"] = message["name"]
        out.append(item)
    return out


def _message_chars(messages: Sequence[Mapping[str, object]]) -> int:
    """About how many characters the conversation renders to (string contents only: cheap)."""
    return sum(len(c) for m in messages if isinstance(c := m.get("content"), str))


class LocalTokenizer:
    """The model's tokenizer.json and chat template, in the router's process.

    `path` is a tokenizer.json, or a folder holding tokenizer.json and (for chat) tokenizer_config.json
    with `chat_template`, `bos_token`, `eos_token` (or a chat_template.jinja). ConfigError if it cannot
    be loaded. Without a chat template, chat requests fail with "unsupported" (and are hashed as text).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        thread_above_chars: int = THREAD_ABOVE_CHARS,
        max_threads: int = MAX_THREADS,
    ) -> None:
        path = Path(path)
        folder = path if path.is_dir() else path.parent
        json_file = path / "tokenizer.json" if path.is_dir() else path
        if not json_file.is_file():
            raise ConfigError(
                f"tokenizer {str(path)!r}: no tokenizer.json there (give the model's tokenizer.json, a "
                f"folder holding it, or {TOKENIZER_REPLICA!r})"
            )
        try:
            self.tokenizer = HFTokenizer.from_file(str(json_file))
        except Exception as exc:  # tokenizers raises a bare Exception for a malformed file
            raise ConfigError(f"tokenizer {str(json_file)!r}: not a loadable tokenizer.json: {exc}") from None
        config: Mapping[str, object] = {}
        config_file = folder / "tokenizer_config.json"
        if path.is_dir() and config_file.is_file():
            try:
                loaded = json.loads(config_file.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, ValueError) as exc:
                raise ConfigError(f"tokenizer {str(config_file)!r}: cannot read it: {exc}") from None
            if not isinstance(loaded, dict):
                raise ConfigError(f"tokenizer {str(config_file)!r}: must be a JSON object")
            config = loaded
        source = _chat_template(config, folder) if path.is_dir() else None
        self.template: jinja2.Template | None = None
        if source is not None:
            try:
                self.template = _template_environment().from_string(source)
            except jinja2.TemplateSyntaxError as exc:
                raise ConfigError(
                    f"tokenizer {str(folder)!r}: the chat template does not compile: {exc}"
                ) from None
        else:
            log.warning("tokenizer %s has no chat template: chat requests will be hashed as text", path)
        self.special_tokens = {
            key: token
            for key in _SPECIAL_TOKEN_KEYS
            if (token := _special_token(config.get(key))) is not None
        }
        self.thread_above_chars = thread_above_chars
        self._pool = ThreadPoolExecutor(
            max_workers=max(1, min(max_threads, os.cpu_count() or 1)), thread_name_prefix="kvrouter-tokenize"
        )

    def render_chat(
        self, messages: Sequence[Mapping[str, object]], options: Mapping[str, object] | None = None
    ) -> str:
        """The conversation as the template renders it for vLLM (TokenizeError on failure)."""
        options = options or {}
        if self.template is None:
            raise TokenizeError("unsupported", "this tokenizer has no chat template")
        extra = options.get("chat_template_kwargs") or {}
        if not isinstance(extra, Mapping):
            raise TokenizeError("unsupported", "chat_template_kwargs must be an object")
        context: dict[str, Any] = {**self.special_tokens, **extra}
        context.update(
            messages=vllm_conversation(messages),
            tools=None,
            documents=None,
            add_generation_prompt=_flag(options, "add_generation_prompt", True),
        )
        try:
            return self.template.render(**context)
        except jinja2.TemplateError as exc:
            raise TokenizeError("template_error", f"the chat template failed: {exc}") from None

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        try:
            return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)
        except Exception as exc:  # tokenizers' errors are bare Exceptions
            raise TokenizeError("encode_error", f"tokenizers failed: {exc}") from None

    def _chat_sync(
        self, messages: Sequence[Mapping[str, object]], options: Mapping[str, object]
    ) -> list[int]:
        return self._encode(self.render_chat(messages, options), _flag(options, "add_special_tokens", False))

    async def completion_ids(self, model: str, prompt: str, options: Mapping[str, object]) -> list[int]:
        _check_options(options, LOCAL_OPTIONS["completions"], "the local tokenizer")
        special = _flag(options, "add_special_tokens", True)
        if len(prompt) <= self.thread_above_chars:
            return self._encode(prompt, special)
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._encode, prompt, special)

    async def chat_ids(
        self, model: str, messages: Sequence[Mapping[str, object]], options: Mapping[str, object]
    ) -> list[int]:
        _check_options(options, LOCAL_OPTIONS["chat"], "the local tokenizer")
        if _message_chars(messages) <= self.thread_above_chars:
            return self._chat_sync(messages, options)
        # Rendering holds the GIL (pure Python) but is a small part of the cost; one hop for both.
        return await asyncio.get_running_loop().run_in_executor(
            self._pool, self._chat_sync, messages, options
        )

    async def close(self) -> None:
        # Encodes already queued still run: cancelling them would cancel their requests too.
        self._pool.shutdown(wait=False)


# -- replica ----------------------------------------------------------------------------------------


def _max_answer_bytes(payload_bytes: int) -> int:
    """The most a sane /tokenize answer to `payload_bytes` of request can weigh.

    A character is at most 4 UTF-8 bytes, a byte-level BPE gives at most one token a byte, and an id
    is at most 10 digits and a comma: 44 bytes a character, plus room for the other fields."""
    return 44 * payload_bytes + 65_536


def _ids_of(answer: object) -> list[int]:
    tokens = answer.get("tokens") if isinstance(answer, Mapping) else None
    if not isinstance(tokens, list):
        raise TokenizeError("bad_response", "the answer has no tokens list")
    for t in tokens:
        if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < _MAX_TOKEN_ID:
            raise TokenizeError("bad_response", f"the answer has a token id that is not a uint32: {t!r}")
    return tokens


class ReplicaTokenizer:
    """vLLM's `POST /tokenize` on one of the healthy replicas serving the model.

    `replica_urls(model)` gives the base URLs of the healthy replicas serving `model`, in a stable order
    (the proxy passes the Fleet's candidates, sorted by name); they take turns (round robin), a cheap,
    deterministic choice that spreads the tokenization work of a busy router over the fleet. `session`
    gives the proxy's pooled ClientSession. No retry on failure: the request is hashed as text instead,
    which costs far less than a second round trip.
    """

    def __init__(
        self,
        session: Callable[[], aiohttp.ClientSession | None],
        replica_urls: Callable[[str], Sequence[str]],
        *,
        timeout_s: float = REPLICA_TIMEOUT_S,
    ) -> None:
        self.session = session
        self.replica_urls = replica_urls
        self.timeout_s = timeout_s
        self._turn = 0

    def _pick(self, model: str) -> str:
        urls = self.replica_urls(model)
        if not urls:
            raise TokenizeError("no_replica", f"no healthy replica serves model {model!r}")
        url = urls[self._turn % len(urls)]
        self._turn += 1
        return url

    async def _tokenize(self, model: str, payload: dict[str, object]) -> list[int]:
        session = self.session()
        if session is None or session.closed:
            raise TokenizeError("internal", "the router's HTTP session is not open")
        url = self._pick(model) + "/tokenize"
        data = json.dumps(payload, separators=(",", ":")).encode()
        limit = _max_answer_bytes(len(data))
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        try:
            async with session.post(
                url, data=data, headers={"Content-Type": "application/json"}, timeout=timeout
            ) as resp:
                if resp.status != 200:
                    raise TokenizeError("http_status", f"{url} answered {resp.status}")
                if resp.content_length is not None and resp.content_length > limit:
                    raise TokenizeError("bad_response", f"{url} answered {resp.content_length} bytes")
                raw = await resp.content.read(limit + 1)
                if len(raw) > limit:
                    raise TokenizeError("bad_response", f"{url} answered more than {limit} bytes")
        except TimeoutError:  # aiohttp's ServerTimeoutError is one too
            raise TokenizeError("timeout", f"{url} did not answer within {self.timeout_s}s") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise TokenizeError("connect_error", f"{url}: {type(exc).__name__}: {exc}") from None
        try:
            answer = json.loads(raw)
        except (ValueError, RecursionError):
            raise TokenizeError("bad_response", f"{url} answered something that is not JSON") from None
        return _ids_of(answer)

    async def completion_ids(self, model: str, prompt: str, options: Mapping[str, object]) -> list[int]:
        _check_options(options, REPLICA_OPTIONS["completions"], "a replica's /tokenize")
        return await self._tokenize(model, {"model": model, "prompt": prompt, **options})

    async def chat_ids(
        self, model: str, messages: Sequence[Mapping[str, object]], options: Mapping[str, object]
    ) -> list[int]:
        _check_options(options, REPLICA_OPTIONS["chat"], "a replica's /tokenize")
        # add_generation_prompt: vLLM's default is true for /tokenize as for chat; said explicitly
        # because that is what a chat request means unless the client said otherwise.
        payload: dict[str, object] = {
            "model": model,
            "messages": list(messages),
            "add_generation_prompt": True,
        }
        payload.update(options)
        return await self._tokenize(model, payload)

    async def close(self) -> None:
        return None  # the session is the proxy's


def make_tokenizer(
    spec: str | None,
    *,
    session: Callable[[], aiohttp.ClientSession | None],
    replica_urls: Callable[[str], Sequence[str]],
) -> Tokenizer | None:
    """The tokenizer `RouterConfig.tokenizer` names (None: text mode). ConfigError if it cannot load."""
    if spec is None:
        return None
    if spec == TOKENIZER_REPLICA:
        return ReplicaTokenizer(session, replica_urls)
    return LocalTokenizer(spec)
