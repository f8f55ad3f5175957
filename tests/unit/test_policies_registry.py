"""The policy registry and spec parsing: configured policies, and errors that list what is known."""

from __future__ import annotations

import dataclasses
import sys

import pytest

from router.policies.registry import (
    DEFAULT_POLICY,
    POLICIES,
    build_policy,
    checked_policy_specs,
    describe_params,
    describe_policies,
    parse_policy_spec,
    split_policy_specs,
)

ALL_NAMES = [
    "chwbl",
    "dynamo",
    "kvaware",
    "least_load",
    "llmd",
    "power_of_two",
    "random",
    "round_robin",
    "sglang",
]


def params_of(policy: object) -> object:
    return policy.params  # type: ignore[attr-defined]


def test_registry_holds_exactly_the_documented_policies() -> None:
    assert sorted(POLICIES) == ALL_NAMES
    assert DEFAULT_POLICY == "kvaware"


@pytest.mark.parametrize("name", ALL_NAMES)
def test_each_policy_builds_with_defaults_and_reports_its_name(name: str) -> None:
    policy = parse_policy_spec(name)
    assert policy.name == name
    assert params_of(policy) == POLICIES[name].params_type()


@pytest.mark.parametrize("name", ALL_NAMES)
def test_each_policy_module_documents_algorithm_params_and_config(name: str) -> None:
    entry = POLICIES[name]
    doc = sys.modules[entry.factory.__module__].__doc__ or ""
    assert f"`{name}`" in doc and "Config example" in doc
    for field in dataclasses.fields(entry.params_type):
        assert f"`{field.name}`" in doc, f"{name}: parameter {field.name} is not documented"


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("kvaware:migration=false", {"migration": False}),
        ("kvaware: migration = off , group_chunks=8", {"migration": False, "group_chunks": 8}),
        ("kvaware:ring_slack=0.25,", {"ring_slack": 0.25}),
        ("kvaware:", {}),
        (
            "sglang:cache_threshold=0.3,balance_abs_threshold=64,miss=least_load",
            {
                "cache_threshold": 0.3,
                "balance_abs_threshold": 64,
                "miss": "least_load",
            },
        ),
        ("llmd:prefix_weight=2", {"prefix_weight": 2.0}),
        ("random:seed=42", {"seed": 42}),
        ("dynamo:temperature=0.5,overlap_weight=2", {"temperature": 0.5, "overlap_weight": 2.0}),
        ("chwbl:replication=64,mean_load_factor=150", {"replication": 64, "mean_load_factor": 150}),
    ],
)
def test_spec_parameters_are_typed_and_applied(spec: str, expected: dict[str, object]) -> None:
    params = params_of(parse_policy_spec(spec))
    for key, value in expected.items():
        got = getattr(params, key)
        assert got == value and type(got) is type(value)


@pytest.mark.parametrize("spec", ["nope", "kv-aware:migration=false", "", "   ", ":x=1"])
def test_unknown_or_missing_name_lists_known_policies(spec: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_policy_spec(spec)
    assert all(name in str(err.value) for name in ALL_NAMES)


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("sglang:foo=1", "no parameter 'foo'"),
        ("sglang:balance_abs_threshold=1.5", "expects int"),
        ("sglang:cache_threshold=high", "expects float"),
        ("sglang:cache_threshold=nan", "expects float"),
        ("sglang:cache_threshold=", "expects float"),
        ("sglang:miss=random", "miss must be one of"),
        ("sglang:cache_threshold", "malformed parameter"),
        ("sglang:cache_threshold=0.3,cache_threshold=0.4", "given twice"),
        ("sglang:max_tree_size=0", "must be positive"),
    ],
)
def test_bad_parameters_list_that_policys_parameters_with_defaults(spec: str, fragment: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_policy_spec(spec)
    message = str(err.value)
    assert fragment in message
    assert "cache_threshold=0.5" in message and "balance_abs_threshold=32" in message
    assert "miss='smallest_tree'" in message


def test_bad_bool_lists_kvaware_parameters() -> None:
    with pytest.raises(ValueError, match=r"expects bool.*migration=True"):
        parse_policy_spec("kvaware:migration=maybe")


@pytest.mark.parametrize(
    ("params", "ok"),
    [
        ({"balance_abs_threshold": 64, "cache_threshold": 1}, True),  # an int is fine for a float
        ({"miss": "least_load"}, True),
        ({"balance_abs_threshold": True}, False),  # a bool is not an int
        ({"balance_abs_threshold": 1.0}, False),
        ({"cache_threshold": "0.4"}, True),  # strings are parsed like a spec
        ({"cache_threshold": None}, False),
    ],
)
def test_build_policy_from_typed_config_values(params: dict[str, object], ok: bool) -> None:
    if ok:
        assert build_policy("sglang", params).name == "sglang"
    else:
        with pytest.raises(ValueError, match="its parameters"):
            build_policy("sglang", params)


def test_descriptions_list_every_policy_and_default() -> None:
    text = describe_policies()
    assert all(line.split(":")[0] in ALL_NAMES for line in text.splitlines())
    assert len(text.splitlines()) == len(ALL_NAMES)
    assert describe_params("round_robin") == "no parameters"
    assert "migration=True" in describe_params("kvaware")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("round_robin,kvaware", ["round_robin", "kvaware"]),
        (
            "round_robin,kvaware:recompute_weight=2,ring_slack=0.1,sglang",
            ["round_robin", "kvaware:recompute_weight=2,ring_slack=0.1", "sglang"],
        ),
        (
            " kvaware:migration=false , dynamo:overlap_weight=2 ",
            ["kvaware:migration=false", "dynamo:overlap_weight=2"],
        ),
        ("", []),
    ],
)
def test_split_policy_specs(text: str, expected: list[str]) -> None:
    assert split_policy_specs(text) == expected
    for spec in expected:
        parse_policy_spec(spec)


def test_checked_policy_specs_rejects_bad_or_empty_lists() -> None:
    assert checked_policy_specs("round_robin,kvaware:migration=false") == [
        "round_robin",
        "kvaware:migration=false",
    ]
    with pytest.raises(ValueError, match="known policies"):
        checked_policy_specs("round_robin,nope")
    with pytest.raises(ValueError, match="no policy given"):
        checked_policy_specs(" , ")
