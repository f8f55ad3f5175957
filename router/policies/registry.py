"""The policy registry: an explicit table name -> (typed params dataclass, factory), and spec parsing.

Rules:
- The table below is the only place a policy is registered: no decorators, no import-time side effects,
  nothing filled in from two places.
- A spec is `name` or `name:key=value,key=value` (e.g. `kvaware:migration=false`). Values are parsed by
  the parameter's declared type: int, float (finite), bool (true/false, 1/0, yes/no, on/off) or str.
- Everything fails at startup with a ValueError that says what is known: an unknown name lists the
  policy names; an unknown, repeated or badly typed parameter lists that policy's parameters with
  their defaults; a value its params dataclass rejects says why, with the same list.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from router.policies.base import Policy
from router.policies.chwbl import Chwbl, ChwblParams
from router.policies.dynamo import Dynamo, DynamoParams
from router.policies.kvaware import KvAware, KvAwareParams
from router.policies.least_load import LeastLoad, LeastLoadParams
from router.policies.llmd import Llmd, LlmdParams
from router.policies.power_of_two import PowerOfTwo, PowerOfTwoParams
from router.policies.random_choice import RandomChoice, RandomParams
from router.policies.round_robin import RoundRobin, RoundRobinParams
from router.policies.sglang import Sglang, SglangParams

DEFAULT_POLICY = "kvaware"


@dataclass(frozen=True, slots=True)
class PolicyEntry:
    name: str
    params_type: type[Any]
    factory: Callable[[Any], Policy]
    summary: str


def _entry(name: str, params_type: type[Any], factory: Callable[[Any], Policy], summary: str) -> PolicyEntry:
    return PolicyEntry(name, params_type, factory, summary)


POLICIES: Mapping[str, PolicyEntry] = MappingProxyType(
    {
        e.name: e
        for e in (
            _entry(
                "kvaware", KvAwareParams, KvAware, "smallest estimated TTFT; new groups by bounded-load ring"
            ),
            _entry("round_robin", RoundRobinParams, RoundRobin, "next replica in turn"),
            _entry("random", RandomParams, RandomChoice, "uniformly random replica"),
            _entry("least_load", LeastLoadParams, LeastLoad, "fewest in-flight requests"),
            _entry("power_of_two", PowerOfTwoParams, PowerOfTwo, "less loaded of two random replicas"),
            _entry("chwbl", ChwblParams, Chwbl, "KubeAI PrefixHash: consistent hashing with bounded loads"),
            _entry("sglang", SglangParams, Sglang, "SGLang cache_aware: char radix tree, imbalance fallback"),
            _entry("llmd", LlmdParams, Llmd, "llm-d: prefix 3 + queue 2 + kv-util 2, max-score picker"),
            _entry("dynamo", DynamoParams, Dynamo, "Dynamo KV router: lowest prefill + decode block cost"),
        )
    }
)

_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})


def known_policies() -> str:
    return ", ".join(sorted(POLICIES))


def _field_types(entry: PolicyEntry) -> dict[str, type[Any]]:
    hints = typing.get_type_hints(entry.params_type)
    return {f.name: hints[f.name] for f in dataclasses.fields(entry.params_type)}


def describe_params(name: str) -> str:
    """`key=default, ...` for one policy (or "no parameters")."""
    entry = _lookup(name)
    defaults = entry.params_type()
    parts = [f"{f.name}={getattr(defaults, f.name)!r}" for f in dataclasses.fields(entry.params_type)]
    return ", ".join(parts) if parts else "no parameters"


def describe_policies() -> str:
    """One line per policy: name, summary, parameters with defaults (for --help and errors)."""
    return "\n".join(f"{n}: {POLICIES[n].summary} ({describe_params(n)})" for n in sorted(POLICIES))


def _lookup(name: str) -> PolicyEntry:
    entry = POLICIES.get(name)
    if entry is None:
        raise ValueError(f"unknown policy {name!r}; known policies: {known_policies()}")
    return entry


def _coerce(name: str, key: str, kind: type[Any], value: object) -> object:
    def bad() -> ValueError:
        return ValueError(
            f"policy {name!r} parameter {key!r} expects {kind.__name__}, got {value!r}; "
            f"its parameters: {describe_params(name)}"
        )

    if isinstance(value, str):
        text = value.strip()
        if kind is str:
            return text
        if kind is bool:
            if text.lower() in _TRUE:
                return True
            if text.lower() in _FALSE:
                return False
            raise bad()
        try:
            number: int | float = int(text) if kind is int else float(text)
        except ValueError:
            raise bad() from None
        if isinstance(number, float) and not math.isfinite(number):
            raise bad()
        return number
    # Typed values (from a YAML config): exact types, with an int accepted for a float.
    if kind is bool and isinstance(value, bool):
        return value
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if (
        kind is float
        and isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
    ):
        return float(value)
    raise bad()


def build_policy(name: str, params: Mapping[str, object] | None = None) -> Policy:
    """A configured policy from a name and parameter values (strings, or already typed from YAML)."""
    entry = _lookup(name)
    types = _field_types(entry)
    values: dict[str, object] = {}
    for key, raw in (params or {}).items():
        if key not in types:
            raise ValueError(
                f"policy {name!r} has no parameter {key!r}; its parameters: {describe_params(name)}"
            )
        values[key] = _coerce(name, key, types[key], raw)
    try:
        configured = entry.params_type(**values)
    except ValueError as exc:
        raise ValueError(
            f"invalid parameters for policy {name!r}: {exc}; its parameters: {describe_params(name)}"
        ) from None
    return entry.factory(configured)


def split_policy_specs(specs: str) -> list[str]:
    """Split a comma-separated list of specs whose own parameters are comma-separated too.

    `round_robin,kvaware:a=1,b=2,sglang` -> ["round_robin", "kvaware:a=1,b=2", "sglang"]: a `key=value`
    item without a `:` continues the spec before it (policy names never contain `=`).
    """
    out: list[str] = []
    for item in (part.strip() for part in specs.split(",")):
        if not item:
            continue
        if "=" in item and ":" not in item and out and ":" in out[-1]:
            out[-1] = f"{out[-1]},{item}"
        else:
            out.append(item)
    return out


def checked_policy_specs(specs: str) -> list[str]:
    """`split_policy_specs`, each spec built once to check it: ValueError (listing what is known) for
    any bad one, or for none at all. For command lines that take a list of policies to compare."""
    out = split_policy_specs(specs)
    if not out:
        raise ValueError(f"no policy given; known policies: {known_policies()}")
    for spec in out:
        parse_policy_spec(spec)
    return out


def parse_policy_spec(spec: str) -> Policy:
    """`name` or `name:key=value,key=value` -> a configured policy (ValueError listing what is known)."""
    name, _, rest = spec.strip().partition(":")
    name = name.strip()
    if not name:
        raise ValueError(f"empty policy spec; known policies: {known_policies()}")
    _lookup(name)
    params: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ValueError(
                f"malformed parameter {item!r} in policy spec {spec!r} (expected name:key=value,...); "
                f"its parameters: {describe_params(name)}"
            )
        if key in params:
            raise ValueError(
                f"parameter {key!r} given twice in {spec!r}; its parameters: {describe_params(name)}"
            )
        params[key] = value
    return build_policy(name, params)
