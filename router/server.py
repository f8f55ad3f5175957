"""Running the router in-process: what `kvrouter serve`, `make demo`, benchmarks and tests all use.

    config = RouterConfig(backends=(BackendConfig("r0", "http://127.0.0.1:8001"),), port=0)
    async with RouterServer(config) as router:
        ...  # router.url, router.fleet, router.metrics, await router.reload(new_config)

Rules:
- `start()` returns once the router listens and has probed every replica once (health and models),
  so the first request already sees which replicas are up. Port 0 picks a free port (`router.port`).
- The listening socket is created here (not by aiohttp) so the chosen port is known without private
  attributes. The runner cancels a handler whose client disconnects (`handler_cancellation`), which
  is how an abandoned stream closes its upstream connection at once rather than at the next chunk.
- `stop()` is graceful: it stops accepting, lets requests in flight finish for up to
  `shutdown_timeout_s`, then closes the session and background tasks (the app's cleanup context).
- `reload()` re-reads the configuration through `config_source` (the CLI passes one that re-reads
  the YAML file with the same flags) or takes a new `RouterConfig`, and applies it in place.
- Each replica's KV events are followed (router/kv_subscriber.py) from `start()` to `stop()`; the
  subscribers follow the replica set through reloads and the admin API (`router.kv_events`).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from types import TracebackType

from aiohttp import web

from router.config import RouterConfig
from router.fleet import Fleet
from router.kv_subscriber import KV_EVENTS, KVEventSubscribers
from router.metrics import RouterMetrics
from router.proxy import STATE, RouterState, apply_config, build_app, build_state
from router.upstream import ReloadDiff


class RouterServer:
    """One router listening on `config.host:config.port`, in the current event loop."""

    def __init__(
        self, config: RouterConfig, *, config_source: Callable[[], RouterConfig] | None = None
    ) -> None:
        self.config_source = config_source
        self.state: RouterState = build_state(config)
        self.app: web.Application = build_app(config, state=self.state)
        self.kv_events = KVEventSubscribers(self.state)
        self.app[KV_EVENTS] = self.kv_events  # for the admin API
        self._runner: web.AppRunner | None = None
        self._sock: socket.socket | None = None
        self.host = config.host
        self.port = config.port

    @property
    def url(self) -> str:
        """Base URL for clients on this machine (a wildcard address is reached via loopback)."""
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.host, self.host)
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    @property
    def fleet(self) -> Fleet:
        return self.state.fleet

    @property
    def metrics(self) -> RouterMetrics:
        return self.state.metrics

    @property
    def config(self) -> RouterConfig:
        return self.state.config

    async def start(self) -> RouterServer:
        if self._runner is not None:
            raise RuntimeError("router already started")
        cfg = self.state.config
        family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
        sock = socket.create_server((cfg.host, cfg.port), family=family, backlog=1024)
        runner = web.AppRunner(
            self.app, shutdown_timeout=cfg.shutdown_timeout_s, handler_cancellation=True, access_log=None
        )
        try:
            await runner.setup()  # runs the cleanup context: session, first probe round, loops
            site = web.SockSite(runner, sock)
            await site.start()
        except BaseException:
            await runner.cleanup()
            sock.close()
            raise
        self._runner, self._sock = runner, sock
        self.port = sock.getsockname()[1]
        await self.kv_events.start()  # after the first probe round: the replicas' models are known
        return self

    async def stop(self) -> None:
        await self.kv_events.stop()
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def reload(self, config: RouterConfig | None = None) -> ReloadDiff:
        """Apply `config`, or a fresh one from `config_source` (ConfigError leaves the old one running).

        Returns once the replicas that joined have had their first probe (they take traffic only
        after it succeeds)."""
        if config is None:
            if self.config_source is None:
                raise RuntimeError("no config source to reload from; pass a RouterConfig")
            config = self.config_source()
        state = self.app[STATE]
        before = set(state.probes)
        diff = apply_config(state, config)
        self.kv_events.sync()  # at once: no await between the replica set changing and this
        joining = [task for task in state.probes if task not in before]
        if joining:
            await asyncio.gather(*joining, return_exceptions=True)
        return diff

    async def __aenter__(self) -> RouterServer:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()
