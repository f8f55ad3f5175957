"""The router's configuration: command-line flags and an optional YAML file, into one frozen value.

Rules:
- `RouterConfig` is frozen and fully validated: every error is found at startup (or at a reload,
  which then keeps the running configuration) as a `ConfigError` that says which key and why.
- The YAML file's top-level keys are the field names below; an unknown key is an error listing the
  known ones (a typo must not silently leave a default in force). `backends` is a list of mappings
  with `name`, `url`, and optionally `models`, `kv_events`, `kv_capacity_tokens`, `kv_transfer`
  ("p2p", "warmup", "lmcache" or "nixl"; absent = warm-up, which works on any vLLM: how hot-prefix
  migrations reach it; router/executors.py), `lmcache_instance_id` (with "lmcache": the replica's
  LMCache `lmcache_instance_id`), `nixl_host` and `nixl_port` (with "nixl": where the replica's
  OffloadingConnector P2P tier listens, for peers to pull from). Each is an error without its
  `kv_transfer`, and "lmcache" needs `lmcache_controller_url` (the LMCache controller).
- `kv_events` (absent: subscribe if the replica's GET /kv_event_sources names a source; "auto": the
  same, insisting; "off"; or the PUB endpoint), `kv_events_replay` and `kv_events_topic` say where a
  replica's KV events come from (router/kv_subscriber.py); a malformed endpoint is a ConfigError.
- `migration_interval_s` (0.5): how often the hot-prefix controller ticks; it runs only when the policy
  is kvaware with `migration` true (router/migration.py). `hot_prefix`: a mapping of the controller's
  parameters (router/hot_prefix.py `TUNABLE_PARAMS`: cooldown_s, migration_timeout_s, the hysteresis
  thresholds in idle engine steps, max_concurrent, ...), each optional, over `HotPrefixParams`'
  defaults; an unknown key is an error listing the known ones (a former name, `hot_wait_s` and the
  like in seconds, names its replacement), a value of the wrong type or out of range one naming the
  key. A reload applies a changed `hot_prefix` to the running controller (router/migration.py `retune`).
- Precedence: a flag given on the command line > the file > the default. `--backend` flags add to
  the file's backends (names must stay unique).
- The admin token comes from the file's `admin_token` or, if absent, from the environment variable
  named by `admin_token_env` (default KVROUTER_ADMIN_TOKEN); it is never printed (`repr=False`).
  Without a token the admin API does not exist.
- A backend without `models` serves whatever its `/v1/models` says (discovered at run time).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from yarl import URL

from router.hot_prefix import RENAMED_PARAMS, TUNABLE_PARAMS, HotPrefixParams
from router.policies.base import Policy
from router.policies.registry import DEFAULT_POLICY, build_policy, parse_policy_spec

DEFAULT_ADMIN_TOKEN_ENV = "KVROUTER_ADMIN_TOKEN"
# Replica names appear in metric labels, the x-kvrouter-replica header and admin URL paths.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
_BACKEND_KEYS = (
    "name",
    "url",
    "models",
    "kv_events",
    "kv_events_replay",
    "kv_events_topic",
    "kv_capacity_tokens",
    "kv_transfer",
    "lmcache_instance_id",
    "nixl_host",
    "nixl_port",
    "prefill_tokens_per_s",
)
KV_TRANSFERS = ("p2p", "warmup", "lmcache", "nixl")
# `kv_events`: absent = subscribe if the replica's GET /kv_event_sources names a source; "auto" = the
# same, and keep asking (warning) while it names none; "off" = never; else the PUB endpoint itself.
KV_EVENTS_AUTO, KV_EVENTS_OFF = "auto", "off"
_TCP_ENDPOINT_RE = re.compile(r"^tcp://(\*|\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.:-]+):(\d{1,5})$")
TOKENIZER_REPLICA = "replica"  # `tokenizer: replica`: ask a replica's POST /tokenize
_FLOAT_RE = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")  # a number YAML may have kept as text


class ConfigError(ValueError):
    """A configuration the router refuses to start (or reload) with."""


@dataclass(frozen=True, slots=True)
class BackendConfig:
    """One replica: where it is, what it serves, and what the router should assume about it."""

    name: str
    url: str  # base URL: http(s)://host:port[/prefix]; request paths are appended to it
    models: tuple[str, ...] = ()  # empty: discovered from the replica's /v1/models
    # KV events (router/kv_subscriber.py): None (discover), "auto", "off" or a ZMQ endpoint such as
    # tcp://10.0.0.1:5557; `kv_events_replay` its replay endpoint (else discovered, else none);
    # `kv_events_topic` the topic to subscribe to (None: discovered, else "", all).
    kv_events: str | None = None
    kv_events_replay: str | None = None
    kv_events_topic: str | None = None
    kv_capacity_tokens: int | None = None  # else from vllm:cache_config_info when scraped
    # How hot-prefix migrations reach this replica: "p2p" (KV export/import, the emulator's
    # /kvrouter/kv/*; the source must be "p2p" too) or "warmup"/None (a 1-token prefill, any vLLM).
    kv_transfer: str | None = None
    # "lmcache": copies go through the LMCache controller, which names this replica by its LMCache
    # instance id. "nixl": peers pull from this replica's P2P tier at (nixl_host, nixl_port).
    lmcache_instance_id: str | None = None
    nixl_host: str | None = None
    nixl_port: int | None = None
    # How fast this replica prefills (tokens/s), which turns queued and uncached tokens into seconds of
    # TTFT for kvaware; None: the router's `prefill_tokens_per_s`.
    prefill_tokens_per_s: float | None = None

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.name):
            raise ConfigError(
                f"backend name {self.name!r} must be 1-128 characters of letters, digits, '.', '_', ':' "
                "or '-', starting with a letter or digit"
            )
        check_url(self.url, f"backend {self.name!r} url")
        if any(not isinstance(m, str) or not m for m in self.models):
            raise ConfigError(f"backend {self.name!r}: models must be non-empty strings")
        if self.kv_capacity_tokens is not None and self.kv_capacity_tokens <= 0:
            raise ConfigError(f"backend {self.name!r}: kv_capacity_tokens must be positive")
        if self.kv_events not in (None, KV_EVENTS_AUTO, KV_EVENTS_OFF):
            check_zmq_endpoint(self.kv_events, f"backend {self.name!r} kv_events")
        if self.kv_events_replay is not None:
            if self.kv_events == KV_EVENTS_OFF:
                raise ConfigError(f"backend {self.name!r}: kv_events_replay is set but kv_events is off")
            check_zmq_endpoint(self.kv_events_replay, f"backend {self.name!r} kv_events_replay")
        if self.kv_events_topic is not None and not isinstance(self.kv_events_topic, str):
            raise ConfigError(f"backend {self.name!r}: kv_events_topic must be a string")
        if self.kv_transfer is not None and self.kv_transfer not in KV_TRANSFERS:
            raise ConfigError(
                f"backend {self.name!r}: kv_transfer must be one of {', '.join(KV_TRANSFERS)} "
                f"(or absent), got {self.kv_transfer!r}"
            )
        _check_transfer_keys(self)
        if self.prefill_tokens_per_s is not None:
            _check_rate(self.prefill_tokens_per_s, f"backend {self.name!r} prefill_tokens_per_s")


@dataclass(frozen=True, slots=True)
class RouterConfig:
    """Everything `kvrouter serve` runs with. Defaults are the CLI's defaults."""

    backends: tuple[BackendConfig, ...] = ()
    policy: str = DEFAULT_POLICY  # a spec, `name` or `name:key=value,...`
    policy_params: Mapping[str, object] | None = None  # from YAML `policy: {name, params}`
    host: str = "127.0.0.1"
    port: int = 8080
    replica_header: bool = True  # send `x-kvrouter-replica: NAME` on proxied responses
    max_inflight: int = 1024  # proxied requests at once; above it, 429
    max_body_bytes: int = 8 * 1024 * 1024
    max_retries: int = 2  # extra replicas tried while nothing was sent to the client
    # Seconds without a byte from a replica (before the first byte: 504; after: SSE error event).
    # Generous because a non-streaming answer sends nothing until the whole generation is done.
    upstream_timeout_s: float = 300.0
    connect_timeout_s: float = 5.0
    scrape_interval_s: float = 1.0  # /metrics scrapes (the simulator assumes the same, load/sim.py)
    health_interval_s: float = 2.0  # active /health probes (and /v1/models discovery)
    breaker_failures: int = 3  # consecutive failures that eject a replica
    breaker_cooldown_s: float = 5.0  # first ejection length; doubles per failed probe
    breaker_max_cooldown_s: float = 60.0
    shutdown_timeout_s: float = 30.0  # graceful shutdown: how long in-flight requests may finish
    migration_interval_s: float = 0.5  # hot-prefix controller ticks (kvaware with migration=true)
    # The hot-prefix controller's parameters that differ from their defaults (`check_hot_prefix`).
    hot_prefix: Mapping[str, object] = field(default_factory=dict)
    # The LMCache controller (`python -m lmcache.v1.api_server --port 9000`) through which backends
    # with kv_transfer "lmcache" copy KV; required when one has it.
    lmcache_controller_url: str | None = None
    chunk_chars: int = 64  # text chunk for the prefix index (router/index/chunking.py)
    block_size: int = 16  # token-id prompts are chunked in blocks of this many tokens
    # The replicas' prefill speed, tokens/s, unless a backend says its own: kvaware turns queued and
    # uncached tokens into seconds with it. The default is an 8B model on an H200 (router/fleet.py,
    # from anchors.md); a replica several times slower than assumed looks drained too early.
    prefill_tokens_per_s: float = 25_000.0
    # Token-precise mode (router/tokenize.py): None hashes text in `chunk_chars` chunks; "replica" asks
    # a replica's POST /tokenize; anything else is a local tokenizer (a tokenizer.json, or a folder with
    # tokenizer.json and tokenizer_config.json for the chat template). Requests are then hashed in
    # token blocks of `block_size`, as the replicas' KV events describe their blocks.
    tokenizer: str | None = None
    seen_chunks: int = 1 << 20  # memory of the amnesia-tax meter (chunk hashes, LRU-ish)
    # A replica is "silent" (its KV events lost: routing-time inserts take over) when requests we sent it
    # finished since its last event batch and none came for this long. vLLM publishes a step's events
    # at the end of that step, so a finished request's blocks are announced within milliseconds; 10 s
    # covers a stalled publisher queue or a slow link many times over, while a lost stream costs at most
    # 10 s of routing blind to that replica's new prefixes (router/kv_subscriber.py).
    kv_events_silence_s: float = 10.0
    admin_token: str | None = field(default=None, repr=False)
    admin_token_env: str = DEFAULT_ADMIN_TOKEN_ENV
    config_path: str | None = None  # the YAML file, re-read on SIGHUP

    def __post_init__(self) -> None:
        for name, kind in (
            ("host", str),
            ("policy", str),
            ("admin_token_env", str),
            ("replica_header", bool),
        ):
            if not isinstance(getattr(self, name), kind):
                raise ConfigError(f"{name} must be a {kind.__name__}, got {getattr(self, name)!r}")
        if self.tokenizer is not None:
            if not isinstance(self.tokenizer, str) or not self.tokenizer:
                raise ConfigError(f"tokenizer must be 'replica' or a path, got {self.tokenizer!r}")
            if self.tokenizer != TOKENIZER_REPLICA and not Path(self.tokenizer).exists():
                raise ConfigError(
                    f"tokenizer {self.tokenizer!r}: no such file or folder (give a tokenizer.json, a folder "
                    f"holding one, or {TOKENIZER_REPLICA!r} to use the replicas' /tokenize)"
                )
        if self.admin_token is not None and not isinstance(self.admin_token, str):
            raise ConfigError("admin_token must be a string")
        if not isinstance(self.port, int) or isinstance(self.port, bool):
            raise ConfigError(f"port must be an integer, got {self.port!r}")
        _positive_ints(self, "max_inflight", "max_body_bytes", "breaker_failures", "chunk_chars")
        _positive_ints(self, "block_size", "seen_chunks")
        _check_rate(self.prefill_tokens_per_s, "prefill_tokens_per_s")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be within 0..65535, got {self.port}")
        if self.max_retries < 0:
            raise ConfigError(f"max_retries must be >= 0, got {self.max_retries}")
        for name in (
            "upstream_timeout_s",
            "connect_timeout_s",
            "scrape_interval_s",
            "health_interval_s",
            "breaker_cooldown_s",
            "breaker_max_cooldown_s",
            "shutdown_timeout_s",
            "migration_interval_s",
            "kv_events_silence_s",
        ):
            value = getattr(self, name)
            # bool is an int to Python; `migration_interval_s: yes` in YAML must not mean 1 s.
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if not (number and math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be a positive number of seconds, got {value!r}")
        names = [b.name for b in self.backends]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"backend names must be unique; repeated: {', '.join(dupes)}")
        check_transfer_peers(self.backends, self.lmcache_controller_url)
        check_hot_prefix(self.hot_prefix)
        self.make_policy()  # an unknown policy or parameter fails here, at startup

    def make_policy(self) -> Policy:
        """A fresh policy object from the spec (ConfigError listing known names/params)."""
        try:
            if self.policy_params is None:
                return parse_policy_spec(self.policy)
            return build_policy(self.policy, self.policy_params)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    @property
    def policy_name(self) -> str:
        return self.policy.partition(":")[0].strip()


def check_hot_prefix(raw: object) -> HotPrefixParams:
    """The `hot_prefix` mapping as controller parameters (the kvaware policy's own `group_chunks` and
    step model at their defaults; the runner puts the policy's in, router/migration.py). ConfigError
    for anything else than a mapping of known keys to valid values."""
    known = ", ".join(TUNABLE_PARAMS)
    if not isinstance(raw, Mapping):
        raise ConfigError(f"hot_prefix must be a mapping of hot-prefix controller parameters ({known})")
    renamed = sorted(str(k) for k in raw if k in RENAMED_PARAMS)
    if renamed:
        moves = ", ".join(f"{k} is now {RENAMED_PARAMS[k]}" for k in renamed)
        raise ConfigError(
            f"hot_prefix: {moves}: the thresholds are in idle engine steps of each replica, not seconds "
            "(one step: the kvaware step model's step_base_tokens at the replica's prefill rate, 150 / "
            "25,000 tokens/s = 6 ms; e.g. 0.03 s is 5 steps there; router/hot_prefix.py)"
        )
    unknown = sorted(str(k) for k in raw if k not in TUNABLE_PARAMS)
    if unknown:
        hint = ""
        if "group_chunks" in unknown:  # a HotPrefixParams field, but it must equal the policy's
            hint = " (group_chunks is the kvaware policy's: set it there, e.g. kvaware:group_chunks=4)"
        raise ConfigError(f"hot_prefix: unknown key(s) {', '.join(unknown)}; known: {known}{hint}")
    try:
        return HotPrefixParams(**raw)
    except ValueError as exc:
        hint = ""
        if any(isinstance(v, str) and _FLOAT_RE.match(v) for v in raw.values()):
            # PyYAML (YAML 1.1) reads a float only with a dot and a signed exponent.
            hint = " (YAML reads 25e9 or 1e-3 as a string: write 2.5e+10, 1.0e-3 or 0.001)"
        raise ConfigError(f"hot_prefix: {exc}{hint}") from None


def _check_rate(value: object, what: str) -> None:
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not (number and math.isfinite(value) and value > 0):  # type: ignore[arg-type, operator]
        raise ConfigError(f"{what} must be a positive number of tokens a second, got {value!r}")


def _positive_ints(cfg: RouterConfig, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def _check_transfer_keys(b: BackendConfig) -> None:
    """The keys of `kv_transfer: lmcache|nixl` are there when it is, and only then."""
    where = f"backend {b.name!r}"
    if b.kv_transfer == "lmcache":
        if not isinstance(b.lmcache_instance_id, str) or not b.lmcache_instance_id:
            raise ConfigError(
                f"{where}: kv_transfer lmcache needs lmcache_instance_id (the `lmcache_instance_id` of "
                "the replica's LMCache config, which the controller's /lookup answers with)"
            )
    elif b.lmcache_instance_id is not None:
        raise ConfigError(f"{where}: lmcache_instance_id is set but kv_transfer is not lmcache")
    if b.kv_transfer == "nixl":
        if not isinstance(b.nixl_host, str) or not b.nixl_host:
            raise ConfigError(
                f"{where}: kv_transfer nixl needs nixl_host (its P2P tier's host, as peers reach it)"
            )
        port = b.nixl_port
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port <= 65535:
            raise ConfigError(
                f"{where}: kv_transfer nixl needs nixl_port, its P2P tier's port (1-65535), got {port!r}"
            )
    elif b.nixl_host is not None or b.nixl_port is not None:
        raise ConfigError(f"{where}: nixl_host and nixl_port are set but kv_transfer is not nixl")


def check_transfer_peers(backends: Sequence[BackendConfig], url: object) -> None:
    """Fleet-wide rules of lmcache and nixl (at startup, and for a replica the admin API adds): the
    LMCache controller's URL, and no two backends sharing an LMCache instance or a NIXL address."""
    if url is not None:
        if not isinstance(url, str):
            raise ConfigError(f"lmcache_controller_url must be a URL string, got {url!r}")
        check_url(url, "lmcache_controller_url")
    lmcache = [b for b in backends if b.kv_transfer == "lmcache"]
    if lmcache and url is None:
        names = ", ".join(b.name for b in lmcache)
        raise ConfigError(
            f"backends {names} have kv_transfer lmcache: set lmcache_controller_url to the LMCache "
            "controller (python -m lmcache.v1.api_server), e.g. http://10.0.0.9:9000"
        )
    for what, keys in (
        ("lmcache_instance_id", [str(b.lmcache_instance_id) for b in lmcache]),
        (
            "nixl_host:nixl_port",
            [f"{b.nixl_host}:{b.nixl_port}" for b in backends if b.kv_transfer == "nixl"],
        ),
    ):
        dupes = sorted({k for k in keys if keys.count(k) > 1})
        if dupes:
            raise ConfigError(f"{what} must differ between backends; repeated: {', '.join(dupes)}")


def check_url(url: str, what: str) -> None:
    try:
        parsed = URL(url)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{what} {url!r} is not a URL: {exc}") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ConfigError(f"{what} {url!r} must be an absolute http:// or https:// URL")
    if parsed.query_string or parsed.fragment:
        raise ConfigError(f"{what} {url!r} must not have a query or fragment")


def check_zmq_endpoint(value: object, what: str) -> None:
    """A ZMQ endpoint the router can connect to: tcp://HOST:PORT (HOST may be `*`, a name, an IPv4
    address or a bracketed IPv6 one; a wildcard means the replica's own host) or ipc://PATH."""
    if not isinstance(value, str):
        raise ConfigError(f"{what} must be a string endpoint such as tcp://10.0.0.1:5557, got {value!r}")
    if value.startswith("ipc://") and len(value) > len("ipc://"):
        return
    match = _TCP_ENDPOINT_RE.match(value)
    if match is None or not 0 < int(match.group(2)) <= 65535:
        raise ConfigError(
            f"{what} {value!r} must be tcp://HOST:PORT (port 1-65535) or ipc://PATH, "
            f"or (kv_events only) {KV_EVENTS_AUTO!r} or {KV_EVENTS_OFF!r}"
        )


def parse_backend_flag(value: str) -> BackendConfig:
    """`--backend URL` or `--backend NAME=URL`; an unnamed backend is named host:port."""
    name, eq, url = value.partition("=")
    if not eq or "://" in name:
        name, url = "", value
    url = url.strip()
    check_url(url, "--backend")
    if not name:
        parsed = URL(url)
        name = f"{parsed.host}:{parsed.port}"
    return BackendConfig(name=name.strip(), url=url.rstrip("/"))


def backend_from_mapping(raw: object, where: str) -> BackendConfig:
    """One backend from YAML or an admin request body (ConfigError naming `where`)."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where} must be a mapping with name and url")
    unknown = sorted(str(k) for k in raw if k not in _BACKEND_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(_BACKEND_KEYS)}")
    name, url = raw.get("name"), raw.get("url")
    if not isinstance(url, str):
        raise ConfigError(f"{where}: url must be a string")
    if name is None:
        name = parse_backend_flag(url).name
    if not isinstance(name, str):
        raise ConfigError(f"{where}: name must be a string")
    models = raw.get("models", ())
    if isinstance(models, str):
        models = (models,)
    if not isinstance(models, Sequence) or not all(isinstance(m, str) for m in models):
        raise ConfigError(f"{where}: models must be a list of strings")
    kv_events = raw.get("kv_events")
    if kv_events is not None and not isinstance(kv_events, str):
        raise ConfigError(
            f"{where}: kv_events must be a string: an endpoint such as tcp://host:5557, "
            f"{KV_EVENTS_AUTO!r} or {KV_EVENTS_OFF!r}"
        )
    for key in ("kv_events_replay", "kv_events_topic"):
        if raw.get(key) is not None and not isinstance(raw.get(key), str):
            raise ConfigError(f"{where}: {key} must be a string")
    capacity = raw.get("kv_capacity_tokens")
    if capacity is not None and (not isinstance(capacity, int) or isinstance(capacity, bool)):
        raise ConfigError(f"{where}: kv_capacity_tokens must be an integer")
    kv_transfer = raw.get("kv_transfer")
    if kv_transfer is not None and not isinstance(kv_transfer, str):
        raise ConfigError(f"{where}: kv_transfer must be one of {', '.join(KV_TRANSFERS)}")
    for key in ("lmcache_instance_id", "nixl_host"):
        if raw.get(key) is not None and not isinstance(raw.get(key), str):
            raise ConfigError(f"{where}: {key} must be a string")
    nixl_port = raw.get("nixl_port")
    if nixl_port is not None and (not isinstance(nixl_port, int) or isinstance(nixl_port, bool)):
        raise ConfigError(f"{where}: nixl_port must be an integer")
    rate = raw.get("prefill_tokens_per_s")
    if rate is not None:
        _check_rate(rate, f"{where}: prefill_tokens_per_s")
    return BackendConfig(
        name=name,
        url=url.rstrip("/"),
        models=tuple(models),
        kv_events=kv_events,
        kv_events_replay=raw.get("kv_events_replay"),
        kv_events_topic=raw.get("kv_events_topic"),
        kv_capacity_tokens=capacity,
        kv_transfer=kv_transfer,
        lmcache_instance_id=raw.get("lmcache_instance_id"),
        nixl_host=raw.get("nixl_host"),
        nixl_port=nixl_port,
        prefill_tokens_per_s=None if rate is None else float(rate),
    )


_FILE_KEYS = tuple(
    f.name for f in dataclasses.fields(RouterConfig) if f.name not in ("config_path", "policy_params")
)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The YAML file as RouterConfig keyword arguments (ConfigError on anything unusable)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
        data = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read config file {str(path)!r}: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"config file {str(path)!r} must be a mapping of settings")
    unknown = sorted(str(k) for k in data if k not in _FILE_KEYS)
    if unknown:
        raise ConfigError(
            f"config file {str(path)!r}: unknown key(s) {', '.join(unknown)}; known: {', '.join(_FILE_KEYS)}"
        )
    kwargs: dict[str, Any] = dict(data)
    raw_backends = kwargs.pop("backends", None) or []
    if not isinstance(raw_backends, list):
        raise ConfigError("backends must be a list")
    kwargs["backends"] = tuple(backend_from_mapping(b, f"backends[{i}]") for i, b in enumerate(raw_backends))
    policy = kwargs.get("policy")
    if isinstance(policy, Mapping):
        name, params = policy.get("name"), policy.get("params", {})
        if not isinstance(name, str) or not isinstance(params, Mapping) or set(policy) - {"name", "params"}:
            raise ConfigError("policy must be a spec string or a mapping {name: str, params: {...}}")
        kwargs["policy"], kwargs["policy_params"] = name, dict(params)
    elif policy is not None and not isinstance(policy, str):
        raise ConfigError("policy must be a spec string or a mapping {name: str, params: {...}}")
    if "hot_prefix" in kwargs and kwargs["hot_prefix"] is None:
        kwargs["hot_prefix"] = {}  # `hot_prefix:` with every key commented out
    return kwargs


def build_config(
    *,
    config_path: str | Path | None = None,
    backends: Sequence[BackendConfig] = (),
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> RouterConfig:
    """File (if any) < overrides (flags given on the command line), plus `--backend` additions."""
    kwargs: dict[str, Any] = read_config_file(config_path) if config_path is not None else {}
    for key, value in (overrides or {}).items():
        if value is not None:
            kwargs[key] = value
    if "policy" in (overrides or {}) and overrides and overrides["policy"] is not None:
        kwargs.pop("policy_params", None)  # a --policy flag replaces the file's policy whole
    kwargs["backends"] = (*kwargs.get("backends", ()), *backends)
    if config_path is not None:
        kwargs["config_path"] = str(config_path)
    env = os.environ if environ is None else environ
    if not kwargs.get("admin_token"):
        token = env.get(kwargs.get("admin_token_env") or DEFAULT_ADMIN_TOKEN_ENV, "")
        kwargs["admin_token"] = token.strip() or None
    try:
        return RouterConfig(**kwargs)
    except TypeError as exc:  # a YAML value of the wrong type reaching a comparison
        raise ConfigError(f"invalid configuration: {exc}") from None
