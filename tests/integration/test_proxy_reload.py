"""Configuration: `kvrouter serve` from a YAML file, SIGHUP reloads, SIGTERM shutdown, in-process reloads."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path

import aiohttp
import pytest
from fake_upstream import FakeFactory, FakeReplica, RouterFactory, completion, eventually, post

from router.config import BackendConfig, ConfigError, build_config
from router.forward import REPLICA_HEADER

TOKEN = "reload-test-token"


def write_config(path: Path, *replicas: FakeReplica, policy: str = "kvaware") -> None:
    lines = [f"policy: {policy}", "health_interval_s: 0.2", "scrape_interval_s: 0.2", "backends:"]
    for fake in replicas:
        lines += [f"  - name: {fake.name}", f"    url: {fake.url}", "    models: [fake-model]"]
    path.write_text("\n".join(lines) + "\n")


async def test_serve_reloads_on_sighup_and_stops_on_sigterm(
    fakes: FakeFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    a, b = await fakes("a"), await fakes("b")
    config = tmp_path / "router.yaml"
    write_config(config, a)
    env = {**os.environ, "KVROUTER_ADMIN_TOKEN": TOKEN}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "router.cli",
        "serve",
        "--config",
        str(config),
        "--port",
        "0",
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    assert proc.stderr is not None
    logs: list[str] = []
    try:
        url = None
        while url is None:
            line = (await asyncio.wait_for(proc.stderr.readline(), timeout=30)).decode()
            assert line, "kvrouter serve exited before listening:\n" + "".join(logs)
            logs.append(line)
            found = re.search(r"serving on (http://\S+):", line)
            url = found.group(1) if found else None
        drain = asyncio.create_task(_drain(proc.stderr, logs))

        async def replicas() -> list[dict[str, object]]:
            async with http.get(url + "/admin/replicas", headers={"Authorization": f"Bearer {TOKEN}"}) as r:
                found: list[dict[str, object]] = (await r.json())["replicas"]
                return found

        async def names() -> list[str]:
            return [str(x["name"]) for x in await replicas()]

        assert await names() == ["a"]
        status, headers, _ = await post(http, url + "/v1/completions", completion())
        assert status == 200 and headers[REPLICA_HEADER] == "a"

        write_config(config, b, policy="round_robin")
        proc.send_signal(signal.SIGHUP)
        current: list[dict[str, object]] = []
        for _ in range(250):  # at most ~5 s
            current = await replicas()
            # A joining replica takes traffic only once its first health probe passed.
            if [x["name"] for x in current] == ["b"] and current[0]["healthy"]:
                break
            await asyncio.sleep(0.02)
        assert [x["name"] for x in current] == ["b"] and current[0]["healthy"]
        status, headers, _ = await post(http, url + "/v1/completions", completion())
        assert status == 200 and headers[REPLICA_HEADER] == "b"

        config.write_text("backends: [{name: c}]\n")  # invalid: no url
        proc.send_signal(signal.SIGHUP)
        await eventually(lambda: any("reload refused" in line for line in logs))
        assert await names() == ["b"]

        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), timeout=15) == 0
        await drain
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def _drain(stream: asyncio.StreamReader, logs: list[str]) -> None:
    while line := await stream.readline():
        logs.append(line.decode())


async def test_in_process_reload_adds_removes_and_forgets_the_index(
    fakes: FakeFactory, routers: RouterFactory, http: aiohttp.ClientSession
) -> None:
    a, b = await fakes("a"), await fakes("b")
    router = await routers(a)
    await post(http, router.url + "/v1/completions", completion("warm the index " * 20))
    assert router.fleet.index.stats().per_replica["a"] > 0
    new = build_config(
        backends=[BackendConfig("b", b.url)],
        overrides={"port": 0, "health_interval_s": 0.1, "policy": "least_load"},
    )
    diff = await router.reload(new)
    assert (diff.added, diff.removed) == (("b",), ("a",))
    assert set(router.fleet.replicas) == {"b"} and "a" not in router.fleet.index.stats().per_replica
    # reload() returns after the joining replica's first probe: it is up and its models are known.
    assert router.fleet.replicas["b"].healthy and router.fleet.replicas["b"].models == frozenset(
        {"fake-model"}
    )
    assert router.state.policy_name == "least_load"
    status, headers, _ = await post(http, router.url + "/v1/completions", completion())
    assert status == 200 and headers[REPLICA_HEADER] == "b"
    # A changed URL replaces the replica (its cache is another one now); models alone keep it.
    diff = await router.reload(build_config(backends=[BackendConfig("b", b.url, models=("fake-model",))]))
    assert diff.updated == ("b",) and router.fleet.replicas["b"].models == frozenset({"fake-model"})


def test_config_file_errors_say_what_is_wrong(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    cases = {
        "backend: []\n": "unknown key(s) backend",
        "backends: [{name: a, url: 'http://h:1'}, {name: a, url: 'http://h:2'}]\n": "unique",
        "policy: nosuch\n": "unknown policy",
        "policy: 'kvaware:nosuch=1'\n": "no parameter",
        "port: many\n": "port must be an integer",
        "max_inflight: 0\n": "max_inflight must be a positive integer",
        "backends: [{name: 'bad name', url: 'http://h:1'}]\n": "backend name",
        "upstream_timeout_s: -1\n": "upstream_timeout_s",
        "replica_header: maybe\n": "replica_header must be a bool",
        "[1, 2]\n": "must be a mapping",
        "backends: [{name: a, url: 'http://h:1', models: 3}]\n": "models must be a list",
    }
    for text, message in cases.items():
        path.write_text(text)
        with pytest.raises(ConfigError, match=re.escape(message)):
            build_config(config_path=path, environ={})


def test_config_file_flags_and_environment_combine(tmp_path: Path) -> None:
    path = tmp_path / "router.yaml"
    path.write_text(
        "policy: {name: kvaware, params: {}}\nport: 9000\nmax_retries: 5\n"
        "backends:\n  - {name: a, url: 'http://10.0.0.1:8000/', models: [m], kv_capacity_tokens: 1000}\n"
    )
    cfg = build_config(
        config_path=path,
        backends=[BackendConfig("b", "http://10.0.0.2:8000")],
        overrides={"port": 9100, "max_retries": None},
        environ={"KVROUTER_ADMIN_TOKEN": " zq-secret "},
    )
    assert cfg.port == 9100 and cfg.max_retries == 5 and cfg.admin_token == "zq-secret"
    assert [b.name for b in cfg.backends] == ["a", "b"] and cfg.backends[0].url == "http://10.0.0.1:8000"
    assert cfg.backends[0].kv_capacity_tokens == 1000 and cfg.config_path == str(path)
    assert "zq-secret" not in repr(cfg)
    assert build_config(config_path=path, environ={}).admin_token is None


def test_serve_help_and_usage_errors(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from router.cli import main

    with pytest.raises(SystemExit) as helped:
        main(["serve", "--help"])
    out = capsys.readouterr().out
    assert helped.value.code == 0
    for flag in (
        "--backend",
        "--config",
        "--policy",
        "--no-replica-header",
        "--max-inflight",
        "--max-body-bytes",
        "--upstream-timeout",
        "--scrape-interval",
        "--admin-token-env",
        "kvaware",
        "backends:",
    ):
        assert flag in out, flag
    monkeypatch.delenv("KVROUTER_ADMIN_TOKEN", raising=False)
    for args, message in (
        ([], "no backends"),
        (["--backend", "http://127.0.0.1:1", "--policy", "nosuch"], "known policies"),
        (["--backend", "not a url"], "--backend"),
        (["--config", "/nonexistent/router.yaml"], "cannot read config file"),
    ):
        assert main(["serve", *args]) == 2, args
        assert message in capsys.readouterr().err, args
