"""What the test servers share: serving an aiohttp app on 127.0.0.1 at a port the kernel picks (a
function, and `LoopbackServer`, the base of the fake servers), and the length of the common prefix of two
token-id lists (what a KV store can reuse of one for the other)."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from typing import ClassVar, Self

from aiohttp import web


async def serve_loopback(app: web.Application, *, shutdown_timeout: float = 0.5) -> tuple[web.AppRunner, int]:
    """Start `app` on 127.0.0.1:0; returns its runner (for `cleanup()`) and the port it got."""
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    sock = socket.create_server(("127.0.0.1", 0))
    await web.SockSite(runner, sock).start()
    port: int = sock.getsockname()[1]
    return runner, port


@dataclass
class LoopbackServer:
    """A fake server on 127.0.0.1: a subclass adds its routes in `routes`; `start` serves them at a port
    the kernel picks (`port`, `url`), `stop` ends it (again: nothing)."""

    port: int = field(default=0, init=False)
    _runner: web.AppRunner | None = field(default=None, init=False, repr=False)
    shutdown_timeout: ClassVar[float] = 0.5  # seconds in-flight handlers get at `stop`

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def routes(self, app: web.Application) -> None:
        raise NotImplementedError

    async def start(self) -> Self:
        app = web.Application()
        self.routes(app)
        self._runner, self.port = await serve_loopback(app, shutdown_timeout=self.shutdown_timeout)
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
