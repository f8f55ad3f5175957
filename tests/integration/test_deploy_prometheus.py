"""deploy/prometheus and deploy/grafana against a real Prometheus (Debian's `prometheus` package).

promtool checks the config and the rules and runs the rules' unit tests; then a real Prometheus scrapes
a live router in front of emulated vLLM replicas, with the deploy config (targets and intervals changed
only) and rules: every rule must evaluate without error, the amnesia-tax ratios must come out of the
router's real counters, and every query of the Grafana dashboard must be valid PromQL, the core panels'
with data. `make test` installs Prometheus where apt-get can (Makefile, `prometheus`); without it these
tests are skipped and say so.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from fake_upstream import RouterFactory, post

from router.server import RouterServer
from workers.emulator import EmulatedFleet
from workers.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "kvrouter.json"
SYSTEM = "You are the help desk of a railway company. Answer with the timetable you are given. " * 12

pytestmark = pytest.mark.skipif(
    shutil.which("prometheus") is None or shutil.which("promtool") is None,
    reason="Prometheus is not installed: `make prometheus` (apt-get install prometheus) runs these tests",
)


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["promtool", *args], cwd=PROMETHEUS_DIR, capture_output=True, text=True, timeout=60, check=False
    )


def test_promtool_accepts_the_config_and_the_rules_pass_their_unit_tests() -> None:
    for args in (("check", "config", "prometheus.yml"), ("test", "rules", "kvrouter-rules.test.yml")):
        result = _promtool(*args)
        assert result.returncode == 0, result.stdout + result.stderr


def _build_dashboard() -> dict[str, Any]:
    spec = importlib.util.spec_from_file_location("build_dashboard", DASHBOARD.parent / "build_dashboard.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    built: dict[str, Any] = module.build()
    return built


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def test_the_dashboard_json_is_what_its_script_builds_and_lays_out() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard == _build_dashboard(), "run: python deploy/grafana/build_dashboard.py > " + str(
        DASHBOARD
    )
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        mine = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not mine & cells, f"{panel['title']} overlaps another panel"
        cells |= mine
    for panel in _panels(dashboard):
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}"
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    used = {"job", "instance", "engine_job"}
    assert used <= variables
    provisioning = yaml.safe_load((DASHBOARD.parent / "provisioning/dashboards/kvrouter.yml").read_text())
    assert provisioning["providers"][0]["type"] == "file"


# -- a real Prometheus ---------------------------------------------------------------------------


class Prometheus:
    """A Prometheus server of our own on loopback, with the deploy config pointed at live targets."""

    def __init__(self, workdir: Path, router: str, engines: list[str]) -> None:
        config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
        # 1 s instead of the deploy's 5 s and 15 s, so a test sees several scrapes and evaluations.
        config["global"].update(scrape_interval="1s", evaluation_interval="1s")
        targets = {"kvrouter": [router], "vllm": engines}
        assert {job["job_name"] for job in config["scrape_configs"]} == set(targets)
        for job in config["scrape_configs"]:
            job["static_configs"] = [{"targets": targets[job["job_name"]]}]
        for rules in config["rule_files"]:
            shutil.copy(PROMETHEUS_DIR / rules, workdir / rules)
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / "prometheus.log"
        self.command = [
            "prometheus",
            f"--config.file={workdir / 'prometheus.yml'}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self, http: aiohttp.ClientSession) -> None:
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT)
        for _ in range(300):
            assert self.proc.poll() is None, self.log.read_text()[-2000:]
            try:
                async with http.get(self.url + "/-/ready") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
        raise AssertionError(f"Prometheus not ready in 30 s: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    async def api(self, http: aiohttp.ClientSession, path: str, **params: str) -> Any:
        async with http.get(self.url + "/api/v1/" + path, params=params) as resp:
            body = await resp.json()
        assert body["status"] == "success", (path, params, body)
        return body["data"]

    async def query(self, http: aiohttp.ClientSession, expr: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = (await self.api(http, "query", query=expr))["result"]
        return result


@pytest.fixture
async def emulated() -> AsyncIterator[EmulatedFleet]:
    async with EmulatedFleet(2, "tiny", kv_events=True) as fleet:
        yield fleet


async def _requests(
    http: aiohttp.ClientSession, router: RouterServer, model: str, first: int, n: int
) -> None:
    """`n` requests sharing a system prompt (so caches hit), streamed with usage and not."""
    for i in range(first, first + n):
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Train {i}?"}]
        body: dict[str, Any] = {"model": model, "messages": messages, "max_tokens": 4}
        if i % 2:
            body |= {"stream": True, "stream_options": {"include_usage": True}}
        status, _, _ = await post(http, router.url + "/v1/chat/completions", body)
        assert status == 200


# What the assertions below read, once it is there: every rate needs two scrapes that differ, and a series
# the first request creates (the TTFT histogram's) needs a scrape with requests on both sides of it.
READY = "kvrouter:physical_hit_ratio:rate5m > 0 and on (job) kvrouter:ttft_seconds:p99_5m > 0"


def _instantiate(expr: str) -> str:
    """A dashboard query as Grafana sends it: its variables with values that select our targets."""
    for name, value in (
        ("$__rate_interval", "1m"),
        ("$engine_job", "vllm"),
        ("$instance", ".*"),
        ("$job", "kvrouter"),
    ):
        expr = expr.replace(name, value)
    assert "$" not in expr, expr
    return expr


# Panels whose every query must return data once requests went through the router (the others wait for
# what this traffic does not cause: failures, lost KV events, migrations).
WITH_DATA = {
    "Prompt-token hit ratio",
    "Amnesia tax: seen before, computed again",
    "Prompt tokens per second",
    "Requests per second, by status",
    "Time to first token",
    "Request duration",
    "In flight, by replica",
    "Routing decisions, by policy and reason",
    "Healthy replicas",
    "Prefix-index entries",
    "KV events applied per second, by type",
    "Hot groups, and why they wait",
    "Busiest prefix groups: requests per second",
    "Busiest prefix groups: holders",
    "Requests waiting and running, by replica",
    "KV-cache usage, by replica",
    "Engine prefix-cache hit ratio, by replica",
}


async def test_a_real_prometheus_evaluates_the_rules_and_the_dashboard_on_a_live_router(
    tmp_path: Path, emulated: EmulatedFleet, routers: RouterFactory, http: aiohttp.ClientSession
) -> None:
    router = await routers(*((f"vllm-{i}", url) for i, url in enumerate(emulated.urls)))
    address = router.url.removeprefix("http://")
    prometheus = Prometheus(tmp_path, address, [u.removeprefix("http://") for u in emulated.urls])
    try:
        await prometheus.start(http)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while len(await prometheus.query(http, "up == 1")) < 3:  # a first scrape of every target
            assert loop.time() < deadline, "Prometheus scraped nothing in 30 s"
            await asyncio.sleep(0.2)
        # Traffic in batches a scrape apart until Prometheus has what the assertions read: how many scrapes
        # fall within the traffic is up to the machine (a busy CI host once fitted them all in one).
        sent, deadline = 0, loop.time() + 60
        while True:
            await _requests(http, router, emulated.model, sent, 8)
            sent += 8
            if await prometheus.query(http, READY):
                break
            if loop.time() > deadline:
                targets = (await prometheus.api(http, "targets"))["activeTargets"]
                seen = {t["scrapeUrl"]: (t["health"], t["lastError"]) for t in targets}
                raise AssertionError(f"{READY!r} not true after {sent} requests in 60 s; targets: {seen}")
            await asyncio.sleep(1.0)

        targets = (await prometheus.api(http, "targets"))["activeTargets"]
        assert {(t["labels"]["job"], t["health"]) for t in targets} == {("kvrouter", "up"), ("vllm", "up")}

        groups = (await prometheus.api(http, "rules"))["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        in_file = yaml.safe_load((PROMETHEUS_DIR / "kvrouter-rules.yml").read_text())["groups"]
        assert len(rules) == sum(len(group["rules"]) for group in in_file)  # every rule loaded
        assert [r["name"] for r in rules if r["health"] != "ok"] == [], [r.get("lastError") for r in rules]
        firing = {r["name"] for r in rules if r["type"] == "alerting" and r["state"] != "inactive"}
        assert firing == set(), firing  # a healthy fleet that reuses what it saw alarms nobody

        def value(result: list[dict[str, Any]]) -> float:
            assert len(result) == 1, result
            return float(result[0]["value"][1])

        logical = value(await prometheus.query(http, "kvrouter:logical_hit_ratio:rate5m"))
        physical = value(await prometheus.query(http, "kvrouter:physical_hit_ratio:rate5m"))
        assert 0.5 < logical <= 1.0 and 0.5 < physical <= 1.0  # all but the first reuse the system prompt
        assert value(await prometheus.query(http, "kvrouter:healthy_replicas")) == 2
        assert value(await prometheus.query(http, "kvrouter:ttft_seconds:p99_5m")) > 0
        assert value(await prometheus.query(http, 'kvrouter:requests:rate5m{code="200"}')) > 0

        dashboard = json.loads(DASHBOARD.read_text())
        empty = []
        for panel in _panels(dashboard):
            results = [await prometheus.query(http, _instantiate(t["expr"])) for t in panel["targets"]]
            if panel["title"] in WITH_DATA:
                empty += [
                    f"{panel['title']} {t['refId']}"
                    for t, r in zip(panel["targets"], results, strict=True)
                    if not r
                ]
        assert empty == [], f"panels without data: {empty}"
        assert {p["title"] for p in _panels(dashboard)} >= WITH_DATA
        for variable, metric, expected in (
            ("job", "router_requests_total", "kvrouter"),
            ("job", "vllm:num_requests_running", "vllm"),
        ):
            values = await prometheus.api(http, f"label/{variable}/values", **{"match[]": metric})
            assert expected in values
    finally:
        prometheus.stop()
