"""The proxy's pure parts, without an event loop: breaker, usage scanning, seen chunks, parsing, headers."""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict
from prometheus_client.parser import text_string_to_metric_families

from router.breaker import Breaker, BreakerState
from router.errors import ProxyError
from router.fleet import Fleet
from router.forward import HOP_BY_HOP, filter_headers, route_excluding
from router.hot_prefix import GroupView
from router.index.seen import SeenChunks
from router.metrics import TOP_GROUPS, RouterMetrics
from router.openai_request import parse_body
from router.policies.base import make_request
from router.policies.registry import parse_policy_spec
from router.upstream import parse_engine_metrics
from router.usage import SSEUsageScanner, Usage, usage_from_body

# -- breaker ------------------------------------------------------------------------------------------


def test_breaker_opens_after_consecutive_failures_only() -> None:
    b = Breaker(failure_threshold=3, base_cooldown_s=1.0, max_cooldown_s=4.0)
    assert not b.record_failure(0.0) and not b.record_failure(0.1)
    b.record_success(0.2)  # resets the count
    assert not b.record_failure(0.3) and not b.record_failure(0.4)
    assert b.record_failure(0.5) and b.state is BreakerState.OPEN and not b.available
    assert not b.record_failure(0.6) and not b.record_success(0.7)  # late outcomes are ignored
    assert b.state is BreakerState.OPEN


def test_breaker_half_open_probe_closes_or_backs_off() -> None:
    b = Breaker(failure_threshold=1, base_cooldown_s=1.0, max_cooldown_s=3.0)
    b.record_failure(0.0)
    assert not b.probe_due(0.5)
    assert b.probe_due(1.0) and b.state is BreakerState.HALF_OPEN and not b.available
    assert b.record_failure(1.1) and b.cooldown_s == 2.0  # failed probe: doubled
    assert not b.probe_due(2.0) and b.probe_due(3.1)
    b.record_failure(3.2)
    assert b.cooldown_s == 3.0  # capped
    assert b.probe_due(6.2) and b.record_success(6.3)
    assert b.available and b.cooldown_s == 1.0 and b.ejections == 3


def test_breaker_trip_opens_at_once() -> None:
    b = Breaker(failure_threshold=5)
    assert b.trip(0.0) and not b.trip(0.1) and b.state is BreakerState.OPEN


# -- usage --------------------------------------------------------------------------------------------


def _usage_chunk(prompt: int, cached: int) -> bytes:
    usage = {"prompt_tokens": prompt, "prompt_tokens_details": {"cached_tokens": cached}}
    return b"data: " + json.dumps({"choices": [], "usage": usage}).encode() + b"\n\n"


@given(cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=8))
def test_sse_scanner_finds_usage_however_the_stream_is_cut(cuts: list[int]) -> None:
    stream = (
        b'data: {"choices":[{"text":"a"}],"usage":null}\n\n' + _usage_chunk(120, 96) + b"data: [DONE]\n\n"
    )
    points = sorted({min(c, len(stream)) for c in cuts} | {0, len(stream)})
    scanner = SSEUsageScanner()
    for start, end in itertools.pairwise(points):
        scanner.feed(stream[start:end])
    assert scanner.usage == Usage(120, 96)


def test_usage_parsing_tolerates_absence_and_garbage() -> None:
    assert usage_from_body(b'{"usage": {"prompt_tokens": 7}}') == Usage(7, None)
    assert usage_from_body(b'{"usage": {"prompt_tokens": "7"}}') is None
    assert usage_from_body(b'not json but "prompt_tokens"') is None
    assert usage_from_body(b"{}") is None
    scanner = SSEUsageScanner(max_line_bytes=10)
    scanner.feed(b"data: " + b"x" * 100)  # an over-long partial line is dropped, not kept
    scanner.feed(b"\n\n" + _usage_chunk(5, 0))
    assert scanner.usage == Usage(5, 0)


# -- seen chunks ----------------------------------------------------------------------------------


def test_seen_chunks_counts_a_seen_prefix_and_stays_bounded() -> None:
    seen = SeenChunks(capacity=8)
    assert seen.match_and_add([1, 2, 3]) == 0
    assert seen.match_and_add([1, 2, 3, 4]) == 3
    assert seen.match_and_add([9, 2, 3]) == 0  # a prefix that differs at the start matches nothing
    for h in range(100, 200):
        seen.match_and_add([h])
    assert len(seen) <= 8
    assert seen.match_and_add([1]) == 0  # long forgotten
    assert seen.match_and_add([199]) == 1  # recent


class TwoGenerations:
    """SeenChunks' documented rule, chunk by chunk: the model its shortcuts must agree with."""

    def __init__(self, capacity: int) -> None:
        self.half, self.young, self.old = capacity // 2, set[int](), set[int]()

    def match_and_add(self, chained: list[int]) -> int:
        matched, counting = 0, True
        for h in chained:
            counting = counting and (h in self.young or h in self.old)
            matched += counting
            if h not in self.young:
                self.young.add(h)
                if len(self.young) >= self.half:
                    self.old, self.young = self.young, set()
        return matched


@given(
    st.integers(min_value=2, max_value=12),
    st.lists(st.lists(st.integers(min_value=0, max_value=15), max_size=8), max_size=40),
)
def test_seen_chunks_agrees_with_its_rule_chunk_by_chunk(capacity: int, prompts: list[list[int]]) -> None:
    seen, model = SeenChunks(capacity=capacity), TwoGenerations(capacity)
    for chained in prompts:
        assert seen.match_and_add(chained) == model.match_and_add(chained)


# -- /metrics parsing ---------------------------------------------------------------------------------


def test_engine_metrics_are_summed_over_engines() -> None:
    text = "\n".join(
        [
            "# TYPE vllm:num_requests_waiting gauge",
            'vllm:num_requests_waiting{engine="0",model_name="m"} 2.0',
            'vllm:num_requests_waiting{engine="1",model_name="m"} 3.0',
            'vllm:num_requests_running{engine="0",model_name="m"} 4.0',
            'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.5',
            'vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.7',
            'vllm:cache_config_info{block_size="16",engine="0",num_gpu_blocks="100"} 1.0',
            'vllm:cache_config_info{block_size="16",engine="1",num_gpu_blocks="100"} 1.0',
            "# TYPE vllm:e2e_request_latency_seconds histogram",
            'vllm:e2e_request_latency_seconds_bucket{le="+Inf"} 3.0',
        ]
    )
    sample = parse_engine_metrics(text)
    assert (sample.num_requests_waiting, sample.num_requests_running) == (5, 4)
    assert sample.kv_cache_usage_perc == 0.7 and (sample.num_gpu_blocks, sample.block_size) == (200, 16)
    assert parse_engine_metrics("nothing here\n").num_requests_waiting is None
    with pytest.raises(ValueError):
        parse_engine_metrics("vllm:num_requests_waiting{ broken\n")


# -- the router's own metrics ---------------------------------------------------------------------------


def _group(key: int, rate: float, holders: int, hot: bool) -> GroupView:
    names = tuple(f"r{i}" for i in range(holders))
    return GroupView(key, "m", rate, rate * 100, 1024, names, (), hot, False, (), None)


def _top_series(metrics: RouterMetrics) -> dict[str, dict[tuple[str, str], float]]:
    families = text_string_to_metric_families(metrics.render().decode())
    return {
        f.name: {(s.labels["rank"], s.labels["group"]): s.value for s in f.samples}
        for f in families
        if f.name.startswith("router_top_group_")
    }


def test_top_groups_keep_the_busiest_few_and_drop_the_others() -> None:
    metrics = RouterMetrics()
    busiest_first = [_group(100 + i, 10.0 - i, holders=1 + i % 3, hot=i == 0) for i in range(TOP_GROUPS + 2)]
    metrics.observe_top_groups(busiest_first)
    series = _top_series(metrics)
    ranks = {(str(i + 1), str(100 + i)) for i in range(TOP_GROUPS)}
    assert set(series) == {
        "router_top_group_requests_per_second",
        "router_top_group_holders",
        "router_top_group_hot",
    }
    assert all(set(by_label) == ranks for by_label in series.values())  # bounded: TOP_GROUPS series each
    assert series["router_top_group_requests_per_second"][("1", "100")] == 10.0
    assert series["router_top_group_holders"][("3", "102")] == 3
    assert series["router_top_group_hot"] == {r: float(r == ("1", "100")) for r in ranks}
    metrics.observe_top_groups([_group(7, 1.0, holders=2, hot=True)])  # the next tick: one group left
    assert all(set(by_label) == {("1", "7")} for by_label in _top_series(metrics).values())


# -- request parsing ----------------------------------------------------------------------------------


def test_parse_body_reads_what_routing_needs() -> None:
    raw = json.dumps(
        {"model": "m", "prompt": ["abcd" * 40, "efgh" * 10], "max_tokens": 9, "user": "u1", "cache_salt": "s"}
    ).encode()
    parsed = parse_body(raw, "completions")
    assert parsed.prompt == "abcd" * 40 and parsed.prompt_tokens == 40 + 10
    assert (parsed.max_tokens, parsed.session_key, parsed.cache_salt, parsed.stream) == (9, "u1", "s", False)
    assert parse_body(raw, "completions", session_header="h").session_key == "h"
    ids = parse_body(b'{"model": "m", "prompt": [[1, 2, 3], [4]], "stream": true}', "completions")
    assert ids.prompt == (1, 2, 3) and ids.prompt_tokens == 4 and ids.stream
    view = ids.view("r1", chunk_chars=64, block_size=2)
    assert view.token_ids == (1, 2, 3) and len(view.hashes.chained) == 1
    chat = parse_body(
        b'{"model":"m","messages":[{"role":"user","content":null}],"max_completion_tokens":3}', "chat"
    )
    assert chat.messages is not None and chat.max_tokens == 3


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"null",
        b'"x"',
        b'{"model": ""}',
        b'{"model": "m", "prompt": [[]]}',
        b'{"model": "m", "prompt": [[1], 2]}',
    ],
)
def test_parse_body_refuses_with_400(raw: bytes) -> None:
    with pytest.raises(ProxyError) as err:
        parse_body(raw, "completions")
    assert err.value.status == 400


# -- headers and routing helpers ------------------------------------------------------------------


def test_filter_headers_drops_hop_by_hop_and_connection_named() -> None:
    headers = CIMultiDict([("Connection", "close, X-A"), ("X-A", "1"), ("X-B", "2"), ("Upgrade", "h2c")])
    headers.add("X-B", "3")
    out = filter_headers(headers, HOP_BY_HOP)
    assert list(out.items()) == [("X-B", "2"), ("X-B", "3")]


def test_route_excluding_leaves_failed_replicas_out_and_restores_them() -> None:
    fleet = Fleet(parse_policy_spec("round_robin"))
    for name in ("a", "b"):
        fleet.add_replica(name)
    view = make_request("r", "m", prompt="hello")
    assert route_excluding(fleet, view, 0.0, ["a"]).replica == "b"
    assert fleet.replicas["a"].healthy
    fleet.done("r", 0.0)
    with pytest.raises(LookupError):
        route_excluding(fleet, view, 0.0, ["a", "b"])
    assert fleet.replicas["a"].healthy and fleet.replicas["b"].healthy
