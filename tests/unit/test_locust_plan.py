"""load/locust_plan.py: the SSE meter, the pools, the load shapes, and the CSV checker."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from load.check_locust import check
from load.loadtest import shape_env
from load.locust_plan import LocustSettings, RequestPool, SessionPool, StreamMeter, generate, shape_tick


def _chunk(payload: object) -> bytes:
    return b"data: " + json.dumps(payload).encode()


def test_stream_meter_times_tokens_and_reads_usage() -> None:
    meter = StreamMeter(started=10.0)
    usage = {"prompt_tokens": 100, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": 64}}
    for line, now in [
        (b": keep-alive", 10.1),
        (_chunk({"choices": [{"text": "a"}]}), 10.5),
        (_chunk({"choices": [{"text": "b"}]}), 10.7),
        (b"", 10.75),
        (_chunk({"choices": [{"text": "c"}]}), 10.9),
        (_chunk({"choices": [], "usage": usage}), 11.0),
        (b"data: [DONE]", 11.0),
    ]:
        meter.feed(line, now)
    assert meter.failure() is None
    assert meter.ttft_s == pytest.approx(0.5)
    assert meter.inter_token_s == pytest.approx(0.2)
    assert (meter.prompt_tokens, meter.cached_tokens) == (100, 64)


@pytest.mark.parametrize(
    ("lines", "reason"),
    [
        ([], "without a token"),
        ([_chunk({"choices": [{"text": "a"}]})], "without usage"),
        ([_chunk({"error": {"message": "boom"}})], "boom"),
        ([b"data: {not json"], "bad SSE chunk"),
    ],
)
def test_stream_meter_failures(lines: list[bytes], reason: str) -> None:
    meter = StreamMeter(started=0.0)
    for line in lines:
        meter.feed(line, 1.0)
    failure = meter.failure()
    assert failure is not None and reason in failure


def test_session_pool_walks_each_session_in_order_with_bursts_as_one_step() -> None:
    settings = LocustSettings(pool_requests=300)
    pool = SessionPool.from_requests(generate("agentic", settings))
    assert any(len(step) > 1 for steps in pool.sessions for step in steps)  # sub-agent bursts
    for steps in pool.sessions:
        turns = [step[0].turn for step in steps]
        assert turns == sorted(turns) and len(set(turns)) == len(turns)
        assert all(len({r.turn for r in step}) == 1 for step in steps)
        assert len({r.session for step in steps for r in step}) == 1
    multi = SessionPool.from_requests(generate("multi-turn", settings))
    steps = multi.claim()
    lengths = [len(step[0].messages or ()) for step in steps]
    assert lengths == sorted(lengths)  # the history grows round by round


def test_request_pool_wraps_and_offsets_by_worker() -> None:
    requests = generate("shared-prefix", LocustSettings(pool_requests=5))
    pool = RequestPool(requests, offset=3)
    assert [pool.draw().request_id for _ in range(6)] == [requests[i % 5].request_id for i in range(3, 9)]


def test_settings_from_env_and_errors() -> None:
    s = LocustSettings.from_env({"KVROUTER_LOCUST_SHAPE": "Ramp", "KVROUTER_LOCUST_USERS": "8"})
    assert s.shape == "ramp" and s.users == 8 and s.max_tokens == 16
    with pytest.raises(ValueError, match="step or ramp"):
        LocustSettings.from_env({"KVROUTER_LOCUST_SHAPE": "sine"})
    with pytest.raises(ValueError):
        LocustSettings.from_env({"KVROUTER_LOCUST_USERS": "0"})


@pytest.mark.parametrize(
    ("shape", "t", "expected"),
    [
        (None, 0.0, None),
        ("step", 0.0, (5, 5.0)),
        ("step", 10.0, (10, 5.0)),
        ("step", 59.0, (20, 5.0)),
        ("step", 60.0, None),
        ("ramp", 0.0, (1, 1.0)),
        ("ramp", 15.0, (10, 1.0)),
        ("ramp", 45.0, (20, 1.0)),
    ],
)
def test_shape_tick(shape: str | None, t: float, expected: tuple[int, float] | None) -> None:
    settings = LocustSettings(shape=shape, users=20, step_users=5, step_s=10.0, duration_s=60.0)  # type: ignore[arg-type]
    assert shape_tick(settings, t) == expected


@pytest.mark.parametrize(("users", "duration_s"), [(1, 4.0), (5, 6.0), (10, 20.0), (13, 60.0)])
def test_loadtest_shape_env_steps_to_every_user_by_the_last_quarter(users: int, duration_s: float) -> None:
    step = LocustSettings.from_env(shape_env("step", users, duration_s))
    assert (step.shape, step.users, step.duration_s) == ("step", users, duration_s)
    counts = [shape_tick(step, t / 10) for t in range(int(duration_s * 10))]
    assert all(c is not None for c in counts) and shape_tick(step, duration_s) is None
    users_over_time = [c[0] for c in counts if c is not None]
    assert users_over_time == sorted(users_over_time)
    assert users_over_time[0] < users or users == 1
    assert shape_tick(step, duration_s * 0.75)[0] == users  # type: ignore[index]
    ramp = LocustSettings.from_env(shape_env("ramp", users, duration_s))
    assert shape_tick(ramp, duration_s / 2)[0] == users  # type: ignore[index]


HEADER = (
    "Type,Name,Request Count,Failure Count,Median Response Time,Average Response Time,"
    "Min Response Time,Max Response Time,Average Content Size,Requests/s,Failures/s,50%,99%\n"
)


def _stats(tmp_path: Path, rows: str) -> Path:
    prefix = tmp_path / "run"
    (tmp_path / "run_stats.csv").write_text(HEADER + rows)
    return prefix


def test_check_passes_and_reports_the_hit_rate(tmp_path: Path) -> None:
    prefix = _stats(
        tmp_path,
        "POST,/v1/completions [rag],4,0,100,100,1,1,0,1,0,100,200\n"
        "TTFT,rag,4,0,90,90,1,1,0,1,0,90,150\n"
        "PROMPT_TOKENS,rag,4,0,1000,1000,1,1,1000,1,0,1000,1000\n"
        "CACHED_TOKENS,rag,4,0,250,250,1,1,250,1,0,250,250\n"
        ",Aggregated,16,0,90,90,1,1,0,1,0,90,150\n",
    )
    passed, lines = check(prefix)
    assert passed, lines
    assert "hit 0.250" in lines[0]


@pytest.mark.parametrize(
    "rows",
    [
        "POST,/v1/completions [rag],4,1,100,100,1,1,0,1,0,100,200\nTTFT,rag,3,0,90,90,1,1,0,1,0,90,150\n",
        "POST,/v1/completions [rag],4,0,100,100,1,1,0,1,0,100,200\n",
    ],
)
def test_check_fails_on_failures_or_without_ttft(tmp_path: Path, rows: str) -> None:
    passed, _ = check(_stats(tmp_path, rows))
    assert not passed
    assert not check(tmp_path / "missing")[0]
