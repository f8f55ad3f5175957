"""The /metrics exposition: well-formed, named by convention, and the amnesia-tax counters moving."""

from __future__ import annotations

import re
import shutil
import subprocess

import aiohttp
import pytest
from fake_upstream import FakeFactory, RouterFactory, chat, completion, metric, post, scrape
from prometheus_client.parser import text_string_to_metric_families

PROMPT = "Summarize the following shipping manifest for the customs office, line by line. " * 10


async def test_amnesia_tax_counters_move(
    fakes: FakeFactory, routers: RouterFactory, http: aiohttp.ClientSession
) -> None:
    fake = await fakes("a")  # reports cached_tokens for a prompt it has seen before
    router = await routers(fake)
    for _ in range(2):
        status, _, _ = await post(http, router.url + "/v1/completions", completion(PROMPT))
        assert status == 200
    text = await scrape(http, router.url)
    prompt = metric(text, "router_prompt_tokens_total")
    assert prompt == 2 * len(PROMPT) // 4
    # The second request repeats the first: every full chunk of it was seen, and predicted cached.
    logical = metric(text, "router_logical_cached_tokens_total")
    assert 0 < logical <= prompt / 2
    assert metric(text, "router_expected_cached_tokens_total") == logical
    physical = metric(text, "router_physical_cached_tokens_total")
    assert physical > 0 and metric(text, "router_usage_prompt_tokens_total") == prompt

    # Streams: usage comes in the last chunk (include_usage) and is read without holding the stream.
    body = chat("a chat turn " * 40, stream=True, stream_options={"include_usage": True})
    for _ in range(2):
        status, _, _ = await post(http, router.url + "/v1/chat/completions", body)
        assert status == 200
    text = await scrape(http, router.url)
    assert metric(text, "router_physical_cached_tokens_total") > physical
    assert metric(text, "router_requests_total", route="/v1/chat/completions", code="200") == 2
    assert metric(text, "router_routing_decisions_total", policy="kvaware") == 4
    assert metric(text, "router_time_to_first_token_seconds_count", route="/v1/completions") == 2
    assert metric(text, "router_request_duration_seconds_count", route="/v1/chat/completions") == 2
    assert metric(text, "router_index_entries") > 0
    assert metric(text, "router_replica_inflight_requests", replica="a") == 0
    assert metric(text, "router_replica_healthy", replica="a") == 1


_NAME = re.compile(r"^router_[a-z][a-z0-9_]*$")
_UNITS = ("_seconds", "_tokens", "_requests", "_total", "_entries", "_replicas", "_healthy")


async def test_exposition_follows_prometheus_conventions(
    fakes: FakeFactory, routers: RouterFactory, http: aiohttp.ClientSession
) -> None:
    router = await routers(await fakes("a"))
    await post(http, router.url + "/v1/completions", completion())
    await post(http, router.url + "/v1/completions", b"{bad")
    async with http.get(router.url + "/metrics") as resp:
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = await resp.text()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert "router_requests" in families and "router_amnesia" not in families
    for name, family in families.items():
        assert _NAME.match(name), name
        assert family.documentation, name
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples), name
        if family.type == "histogram":
            assert name.endswith("_seconds"), name
    for label_set in (s.labels for f in families.values() for s in f.samples):
        assert set(label_set) <= {"route", "code", "policy", "reason", "replica", "kind", "outcome", "le"}
    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed (apt-get install prometheus); conventions checked above")
    result = subprocess.run(
        ["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
