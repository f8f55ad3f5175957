"""Prefix caching as a router sees it: cached_tokens, /metrics counters and gauges, warm-up, abort."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client.parser import text_string_to_metric_families

if TYPE_CHECKING:
    from conftest import Target

GAUGES = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc")
COUNTERS = (
    "vllm:prefix_cache_queries",
    "vllm:prefix_cache_hits",
    "vllm:prompt_tokens",
    "vllm:generation_tokens",
    "vllm:request_success",
    "vllm:num_preemptions",
)
HISTOGRAMS = ("vllm:time_to_first_token_seconds", "vllm:e2e_request_latency_seconds")


async def test_metrics_parse_with_vllm_names_and_labels(target: Target) -> None:
    await target.complete(await target.unique_prompt(target.block_size + 1), 2)
    async with target.session.get(f"{target.url}/metrics") as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        text = await r.text()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in GAUGES:
        assert families[name].type == "gauge", name
    for name in COUNTERS:
        assert families[name].type == "counter", name
        assert all(
            s.name == f"{name}_total" for s in families[name].samples if not s.name.endswith("_created")
        )
    for name in HISTOGRAMS:
        assert families[name].type == "histogram", name
        count = [s for s in families[name].samples if s.name == f"{name}_count"]
        assert count and count[0].value >= 1
    for name in (*GAUGES, *COUNTERS, *HISTOGRAMS):
        for sample in families[name].samples:
            assert {"model_name", "engine"} <= set(sample.labels), (name, sample.labels)
    reasons = {s.labels.get("finished_reason") for s in families["vllm:request_success"].samples}
    assert "length" in reasons
    info = await target.cache_config()
    assert int(info["block_size"]) > 0 and int(info["num_gpu_blocks"]) > 0


async def test_prefix_reuse_shows_in_cached_tokens_and_hit_counters(target: Target) -> None:
    bs = target.block_size
    prompt = await target.unique_prompt(3 * bs + 5)
    before = await target.metrics()
    first = await target.complete(prompt, 1)
    second = await target.complete(prompt, 1)
    after = await target.metrics()
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == 3 * bs
    hits = after["vllm:prefix_cache_hits_total"] - before["vllm:prefix_cache_hits_total"]
    queries = after["vllm:prefix_cache_queries_total"] - before["vllm:prefix_cache_queries_total"]
    assert (hits, queries) == (3 * bs, 2 * len(prompt))
    prompt_tokens = after["vllm:prompt_tokens_total"] - before["vllm:prompt_tokens_total"]
    assert prompt_tokens == 2 * len(prompt)
    success = after["vllm:request_success_total/length"] - before["vllm:request_success_total/length"]
    assert success == 2


async def test_a_fully_cached_prompt_still_recomputes_its_last_block(target: Target) -> None:
    """vLLM recomputes at least the last token, and hits are block-aligned: 2 full blocks hit 1."""
    prompt = await target.unique_prompt(2 * target.block_size)
    await target.complete(prompt, 1)
    again = await target.complete(prompt, 1)
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == target.block_size


async def test_warm_up_prefill_caches_the_prefix(target: Target) -> None:
    """The portable replication: a token-id prompt with max_tokens 1 leaves its full blocks cached."""
    bs = target.block_size
    prefix = await target.unique_prompt(4 * bs)
    await target.complete(prefix, 1)
    follow_up = prefix + (await target.unique_prompt(7))
    result = await target.complete(follow_up, 1)
    assert result["usage"]["prompt_tokens_details"]["cached_tokens"] == 4 * bs


ABORT_ATTEMPTS = 5


@dataclass(frozen=True, slots=True)
class StreamClosed:
    """One attempt of the disconnect test: the metrics before and after, what was asked, and its timings."""

    before: dict[str, float]
    after: dict[str, float]
    max_tokens: int
    first_chunk_s: float  # from the request to its first chunk
    close_to_idle_s: float  # from the close to nothing running

    @property
    def generated(self) -> float:
        return self.after["vllm:generation_tokens_total"] - self.before["vllm:generation_tokens_total"]


async def test_client_disconnect_aborts_the_request(target: Target) -> None:
    """A dropped stream stops generating. The engine generates at its own pace whatever the client reads,
    so one attempt can end before the close reaches the server: on CI the CPU engine finished 4,000 tokens
    while a client read its first two chunks, and here, with three busy loops beside it on the 2 cores,
    vLLM 0.32's API server sent its 200 at once and the first chunk only with the last, 10 s later (its
    output loop falls behind the engine and does not catch up). Such an attempt says nothing about aborts
    and a fresh one runs. A server that never aborts runs every attempt to its end, or past the 10 s
    deadline, and fails."""
    ran_to_end: list[str] = []
    for _ in range(ABORT_ATTEMPTS):
        attempt = await _stream_then_close(target)
        if attempt.generated < attempt.max_tokens:
            for reason in ("length", "stop"):
                key = f"vllm:request_success_total/{reason}"
                assert attempt.after.get(key, 0) == attempt.before.get(key, 0), (
                    "an aborted request is not a success"
                )
            return
        ran_to_end.append(
            f"first chunk {attempt.first_chunk_s:.1f} s, close to idle {attempt.close_to_idle_s:.1f} s"
        )
    raise AssertionError(f"every attempt ran to its end: {ran_to_end}")


async def _stream_then_close(target: Target) -> StreamClosed:
    """Start a long streamed answer, read its first chunk, drop the connection, and wait until nothing runs.
    Nothing is asked of the server between the first chunk and the close: every request in between widens
    the window in which a fast engine finishes the answer first (whether it did is the caller's question,
    from the counters)."""
    prompt = await target.unique_prompt(target.block_size + 3)
    # As long an answer as the model allows (4,000 at most), for the widest window to close in.
    max_tokens = min(4000, target.max_model_len - len(prompt) - 1)
    before = await target.metrics()
    body = {
        "model": target.model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "stream": True,
        "ignore_eos": True,
    }
    loop = asyncio.get_running_loop()
    sent_at = loop.time()
    resp = await target.session.post(f"{target.url}/v1/completions", json=body)
    assert resp.status == 200
    assert (await resp.content.readuntil(b"\n\n")).startswith(b"data: ")  # it started
    resp.close()  # drop the connection mid-stream
    closed_at = loop.time()
    deadline = closed_at + 10
    while (await target.metrics())["vllm:num_requests_running"] > 0:
        assert loop.time() < deadline, "the aborted request kept running"
        await asyncio.sleep(0.05)
    after = await target.metrics()
    if target.emulated:  # alone on its replica: nothing else holds blocks, so the abort freed them all
        assert after["vllm:kv_cache_usage_perc"] == 0.0
    return StreamClosed(before, after, max_tokens, closed_at - sent_at, loop.time() - closed_at)
