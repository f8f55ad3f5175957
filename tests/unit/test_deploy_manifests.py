"""deploy/kubernetes and deploy/docker checked against the code they deploy (no cluster, no container engine).

The vLLM flags must be what `kvrouter vllm command` prints, the router's config must load with kvrouter's
own loader and name every replica of the StatefulSet where its events come from, the router container's
arguments must parse with `kvrouter serve`'s parser, probes must hit routes the router serves, and the
Dockerfile must copy what the package is built from.
"""

from __future__ import annotations

import json
import shlex
import tomllib
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from router.cli import build_parser
from router.config import DEFAULT_ADMIN_TOKEN_ENV, RouterConfig, build_config
from router.proxy import build_app
from workers.vllm.launch import ReplicaSpec, gpu_command

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
MODEL = "meta-llama/Llama-3.1-8B-Instruct"


def _documents(name: str) -> dict[str, dict[str, Any]]:
    """The manifests of one file, by kind (one of each kind a file)."""
    found = [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]
    kinds = {d["kind"]: d for d in found}
    assert len(kinds) == len(found), f"{name}: two manifests of one kind"
    return kinds


def _container(workload: dict[str, Any]) -> dict[str, Any]:
    (container,) = workload["spec"]["template"]["spec"]["containers"]
    return container


def _ports(container: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container["ports"]}


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def _vllm_spec() -> ReplicaSpec:
    return ReplicaSpec(
        name="vllm",
        model=MODEL,
        served_model_name=MODEL,
        port=8000,
        host="0.0.0.0",
        block_size=16,
        max_model_len=32768,
        events_port=5557,
        replay_port=5558,
    )


def test_the_vllm_replicas_run_what_kvrouter_vllm_command_prints() -> None:
    vllm = _documents("vllm.yaml")
    container, spec = _container(vllm["StatefulSet"]), _vllm_spec()
    assert container["args"] == spec.serve_args()
    assert _env(container)["PYTHONHASHSEED"] == spec.hash_seed
    assert shlex.split(gpu_command(spec)) == [
        f"PYTHONHASHSEED={spec.hash_seed}",
        *container["command"],
        *container["args"],
    ]
    assert _ports(container) == {
        "http": spec.port,
        "kv-events": spec.events_port,
        "kv-replay": spec.replay_port,
    }
    service = vllm["Service"]
    assert service["spec"]["clusterIP"] == "None"  # headless: the per-pod names the router uses
    assert vllm["StatefulSet"]["spec"]["serviceName"] == service["metadata"]["name"]
    assert {p["targetPort"] for p in service["spec"]["ports"]} == set(_ports(container))


def _router_config(tmp_path: Path) -> RouterConfig:
    data = _documents("kvrouter.yaml")["ConfigMap"]["data"]
    path = tmp_path / "router.yaml"
    path.write_text(data["router.yaml"])
    return build_config(config_path=path, environ={})


def test_the_router_config_loads_and_names_every_replica_where_its_events_are(tmp_path: Path) -> None:
    config = _router_config(tmp_path)
    statefulset = _documents("vllm.yaml")["StatefulSet"]
    service, replicas = statefulset["spec"]["serviceName"], statefulset["spec"]["replicas"]
    events = json.loads(_container(statefulset)["args"][-1])
    assert len(config.backends) == replicas
    for i, backend in enumerate(config.backends):
        host = f"vllm-{i}.{service}"  # the StatefulSet's pod names
        assert backend.name == f"vllm-{i}"
        assert backend.url == f"http://{host}:8000"
        assert backend.kv_events == events["endpoint"].replace("*", host)
        assert backend.kv_events_replay == events["replay_endpoint"].replace("*", host)
        assert backend.kv_events_topic == events["topic"]
    # Token blocks the size of the engines' own, the blocks their KV events describe.
    args = _container(statefulset)["args"]
    assert config.tokenizer == "replica"
    assert config.block_size == int(args[args.index("--block-size") + 1])
    assert (config.host, config.port) == ("0.0.0.0", 8080)


def test_the_router_container_runs_kvrouter_serve_on_its_config(tmp_path: Path) -> None:
    router = _documents("kvrouter.yaml")
    deployment, service = router["Deployment"], router["Service"]
    container = _container(deployment)
    args = build_parser().parse_args(container["args"])
    assert args.command == "serve"
    (mount,) = container["volumeMounts"]
    assert Path(args.config).parent == Path(mount["mountPath"])
    (volume,) = deployment["spec"]["template"]["spec"]["volumes"]
    assert volume["name"] == mount["name"]
    assert volume["configMap"]["name"] == router["ConfigMap"]["metadata"]["name"]
    assert Path(args.config).name in router["ConfigMap"]["data"]
    config = _router_config(tmp_path)
    assert _ports(container) == {"http": config.port}
    assert DEFAULT_ADMIN_TOKEN_ENV in _env(container)
    # The probes ask routes the router serves.
    app = build_app(RouterConfig())
    served = {
        r.resource.canonical for r in app.router.routes() if r.method == "GET" and r.resource is not None
    }
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] in served
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    assert service["metadata"]["annotations"]["prometheus.io/port"] == str(config.port)
    assert service["metadata"]["annotations"]["prometheus.io/path"] in served
    assert isinstance(app, web.Application)


def test_the_dockerfile_builds_the_package_from_what_it_copies() -> None:
    lines = [line.split(maxsplit=1) for line in (ROOT / "deploy/docker/Dockerfile").read_text().splitlines()]
    instructions = [
        (words[0], words[1]) for words in lines if len(words) == 2 and not words[0].startswith("#")
    ]
    copied = {
        Path(source)
        for kind, rest in instructions
        if kind == "COPY"
        for source in rest.split()[:-1]  # COPY SOURCE... DESTINATION
    }
    assert all((ROOT / path).exists() for path in copied), copied
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert {Path(p) for p in packages} | {
        Path("pyproject.toml"),
        Path(project["project"]["readme"]),
    } == copied
    (script,) = project["project"]["scripts"]
    assert ("ENTRYPOINT", json.dumps([script])) in instructions
    assert ("EXPOSE", "8080") in instructions
    image = _container(_documents("kvrouter.yaml")["Deployment"])["image"]
    assert image == f"kvrouter:{project['project']['version']}"
