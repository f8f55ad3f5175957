"""`kvrouter bench vllm` (load/bench_vllm.py): the logical limit against counts done by hand, and the
plumbing of --peers (rows, readiness by prompt kind, kv_aware's event sources, figures, the table)."""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest

from load.bench_vllm import (
    Prompt,
    distinct_blocks,
    format_table,
    kv_event_sources,
    logical_hits,
    own_counters,
    ready_body,
    row_figures,
    rows_for,
)
from load.live import LiveResult
from load.peers import Target, peer_target, start_target
from load.replica_metrics import ReplicaCounters
from router.cli import build_parser, main
from workers.vllm.launch import ReplicaSpec


def test_logical_hits_reuse_full_blocks_of_earlier_prompts_and_never_the_last_token() -> None:
    a = list(range(10))  # blocks of 4: [0-3] [4-7], 2 tokens over
    b = [*range(8), 99, 98, 97]  # shares both full blocks of a
    c = list(range(8))  # all of a's blocks, but its last token must be computed: 1 block reusable
    d = [0, 1, 2, 5, 6, 7, 8, 9]  # differs inside the first block: nothing
    assert logical_hits([a], 4) == 0
    assert logical_hits([a, b], 4) == 8
    assert logical_hits([a, c], 4) == 4
    assert logical_hits([a, d], 4) == 0
    assert logical_hits([a, b, c, d], 4) == 8 + 4 + 0


def test_distinct_blocks_count_prefixes_not_contents() -> None:
    a = [1, 2, 3, 4, 5, 6, 7, 8]
    b = [9, 9, 9, 9, 5, 6, 7, 8]  # same second block content, other prefix: another block
    assert distinct_blocks([a], 4) == 2
    assert distinct_blocks([a, a], 4) == 2
    assert distinct_blocks([a, b], 4) == 4
    assert distinct_blocks([[1, 2, 3]], 4) == 0


# ---------------------------------------------------------------- --peers: rows, requests and figures


def _spec(name: str, events: bool) -> ReplicaSpec:
    port = {"vllm-0": 8100, "vllm-1": 8101, "vllm-2": 8102}[name]
    return ReplicaSpec(
        name, "build/tiny-llama", "tiny", port, events_port=port + 100 if events else None,
        replay_port=port + 200 if events else None,
    )  # fmt: skip


def test_peer_rows_follow_kvrouters_for_each_prompt_kind() -> None:
    rows = rows_for(["chat", "tokens"], ["kvaware"], peers=True)
    assert [(r.kind, r.spec, r.router) for r in rows] == [
        (kind, spec, router)
        for kind in ("chat", "tokens")
        for spec, router in [
            ("kvaware", "kvrouter"),
            ("smg:cache_aware", "smg"),
            ("vllm-router:cache_aware", "vllm-router"),
            ("vllm-router:kv_aware", "vllm-router"),
        ]
    ]
    assert [r.path for r in rows_for(["chat", "tokens"], ["kvaware"], peers=False)] == [
        "/v1/chat/completions",
        "/v1/completions",
    ]


def test_a_peer_is_ready_only_once_it_answers_a_request_of_the_rows_kind() -> None:
    chat = json.loads(ready_body("chat", "tiny"))
    tokens = json.loads(ready_body("tokens", "tiny"))
    assert chat["model"] == tokens["model"] == "tiny"  # smg refuses a body without one
    assert chat["messages"][0]["role"] == "user" and "prompt" not in chat
    assert all(isinstance(t, int) for t in tokens["prompt"]) and "messages" not in tokens


def test_kv_aware_follows_every_replica_that_publishes_events() -> None:
    fleet = SimpleNamespace(
        served_model_name="tiny",
        block_size=32,
        specs=[_spec("vllm-0", True), _spec("vllm-1", True), _spec("vllm-2", False)],
    )
    sources = kv_event_sources(fleet)  # type: ignore[arg-type]
    assert sources.model == "tiny" and sources.block_size == 32
    assert sources.replicas == (
        ("http://127.0.0.1:8100", "tcp://127.0.0.1:8200", "tcp://127.0.0.1:8300"),
        ("http://127.0.0.1:8101", "tcp://127.0.0.1:8201", "tcp://127.0.0.1:8301"),
    )
    urls = [s.url for s in fleet.specs]
    command = peer_target("tokens-kv", "vllm-router:kv_aware", urls, Path("/nowhere"), sources).command
    pairs = [(a, b) for a, b in itertools.pairwise(command) if a.startswith("--kv-event")]
    assert pairs == [
        ("--kv-event-model", "tiny"),
        ("--kv-event-block-size", "32"),
        ("--kv-event-source", "http://127.0.0.1:8100=tcp://127.0.0.1:8200"),
        ("--kv-event-replay-source", "http://127.0.0.1:8100=tcp://127.0.0.1:8300"),
        ("--kv-event-source", "http://127.0.0.1:8101=tcp://127.0.0.1:8201"),
        ("--kv-event-replay-source", "http://127.0.0.1:8101=tcp://127.0.0.1:8301"),
    ]


def _result(i: int, replica: str = "direct", error: str | None = None) -> LiveResult:
    first = None if error else 0.3 + i
    return LiveResult(f"r{i}", replica, float(i), first, i + 1.0, 64, 32, 4, 0.01, error)


def _prompts() -> list[Prompt]:
    ids = [(*range(64), 100 + i) for i in range(4)]  # 2 shared blocks of 32, then one token
    return [Prompt(f"r{i}", "tokens", 0, {}, t) for i, t in enumerate(ids)]


def test_row_figures_come_from_the_replicas_counters_and_the_client() -> None:
    deltas = [
        ReplicaCounters(prefix_cache_queries=130, prefix_cache_hits=64, requests_finished=2),
        ReplicaCounters(prefix_cache_queries=130, prefix_cache_hits=128, requests_finished=2),
    ]
    # A peer adds no x-kvrouter-replica header: where requests went is read from the replicas.
    results = [_result(i) for i in range(4)]
    figures = row_figures(_prompts(), results, deltas, ["vllm-0", "vllm-1"], 32)
    assert figures["requests_per_replica"] == {"vllm-0": 2, "vllm-1": 2}
    assert figures["hit_rate"] == 192 / 260
    assert figures["logical_hit_rate"] == 3 * 64 / 260
    assert figures["ratio"] == 1.0
    assert figures["request_hit_rate"] == 0.5
    assert figures["ttft_mean_s"] == pytest.approx(0.3) and figures["errors"] == 0
    assert figures["replica_ttft_mean_s"] is None  # the counters above saw no first token
    assert "error" not in figures

    failed = [_result(i, error="HTTP 400: token ids are not supported") for i in range(4)]
    figures = row_figures(_prompts(), failed, [ReplicaCounters()] * 2, ["vllm-0", "vllm-1"], 32)
    assert figures["errors"] == 4 and figures["ttft_mean_s"] is None
    assert figures["error"] == "no request completed: HTTP 400: token ids are not supported"


def test_a_row_that_did_not_run_keeps_its_line_with_the_reason() -> None:
    ran = {
        "prompts": "chat", "policy": "smg:cache_aware", "hit_rate": 0.5, "logical_hit_rate": 0.6,
        "ratio": 0.5 / 0.6, "ttft_mean_s": 0.25, "requests_per_replica": {"vllm-0": 3}, "errors": 1,
        "error": "exited with code 1 during the run: boom",
    }  # fmt: skip
    refused = {"prompts": "tokens", "policy": "smg:cache_aware", "error": "refused the request: HTTP 400"}
    lines = format_table([ran, refused]).splitlines()
    assert lines[2] == "| chat | smg:cache_aware | 0.500 | 0.600 | 0.833 | 0.250 | {'vllm-0': 3} | 1 |"
    assert lines[3] == "| tokens | smg:cache_aware | did not run: refused the request: HTTP 400 | | | | | |"
    assert lines[4] == "chat smg:cache_aware: exited with code 1 during the run: boom"


PEER_METRICS = b"""# TYPE vllm_router_kv_placement_lookups_total counter
vllm_router_kv_placement_lookups_total{reason="prefix_hit"} 5
vllm_router_kv_placement_lookups_total{reason="missing_tokens"} 0
# TYPE vllm_router_requests_total counter
vllm_router_requests_total{route="/v1/completions"} 6
"""


class _RefusesChat(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(PEER_METRICS)))
        self.end_headers()
        self.wfile.write(PEER_METRICS)

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        ok = self.path == "/v1/completions"
        answer = b'{"choices": [{"text": "x"}]}' if ok else b'{"detail": "chat is not supported"}'
        self.send_response(200 if ok else 400)
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def peer() -> Iterator[str]:
    """A stand-in peer: answers completions, refuses chat (400), serves a Prometheus page."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _RefusesChat)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_peer_that_refuses_the_rows_kind_of_request_says_so_at_once(tmp_path: Path, peer: str) -> None:
    tokens = Target("tokens", "a router", url=peer)
    start_target(tokens, tmp_path, ready_body("tokens", "tiny"), path="/v1/completions")
    assert tokens.failure is None
    chat = Target("chat", "a router", url=peer)
    began = time.monotonic()
    start_target(chat, tmp_path, ready_body("chat", "tiny"), path="/v1/chat/completions")
    assert chat.failure == 'refused the request: HTTP 400: {"detail": "chat is not supported"}'
    assert time.monotonic() - began < 5  # a 4xx is final: no waiting for readiness


async def test_a_peers_own_counters_are_kept_for_diagnosis_only(peer: str) -> None:
    async with aiohttp.ClientSession() as session:
        own = await own_counters(session, f"{peer}/metrics")
        assert own == {"vllm_router_kv_placement_lookups_total{reason=prefix_hit}": 5.0}
        assert await own_counters(session, "") == {}  # no page: nothing, and no error


def test_bench_vllm_takes_peers_and_says_what_is_missing(tmp_path: Path, capsys: Any) -> None:
    parser = build_parser()
    args = parser.parse_args(["bench", "vllm"])
    assert args.peers is False and args.peers_venv == Path(".venv-peers")
    args = parser.parse_args(["bench", "vllm", "--peers", "--peers-venv", str(tmp_path)])
    assert args.peers is True and args.peers_venv == tmp_path
    missing = tmp_path / "no-vllm" / "python"
    assert main(["bench", "vllm", "--peers", "--python", str(missing)]) == 2
    assert f"{missing}: no vLLM environment (make vllm-env)" in capsys.readouterr().err


@pytest.mark.parametrize(("topic", "published"), [(None, "kv"), ("", "")])
def test_a_fleet_publishes_its_events_on_the_topic_it_is_given(
    tmp_path: Path, topic: str | None, published: str
) -> None:
    """bench vllm's fleet publishes on the empty topic (vllm-router saw no events on a named one); a
    fleet given none keeps the launcher's default. No process is started."""
    from workers.vllm.launch import VLLMFleet

    python, model = tmp_path / "python", tmp_path / "model"
    python.touch()
    model.mkdir()
    (model / "config.json").write_text("{}")
    extra = {} if topic is None else {"topic": topic}
    fleet = VLLMFleet(python=python, model_dir=model, replicas=2, events=[True, False], **extra)
    configs = [spec.kv_events_config() for spec in fleet.specs]
    assert configs[1] is None  # a replica without events has no topic to publish on
    assert configs[0] is not None and configs[0]["topic"] == published
