"""What the test servers share: serving an aiohttp app on 127.0.0.1 at a port the kernel picks, and the
length of the common prefix of two token-id lists (what a KV store can reuse of one for the other)."""

from __future__ import annotations

import socket

from aiohttp import web


async def serve_loopback(app: web.Application, *, shutdown_timeout: float = 0.5) -> tuple[web.AppRunner, int]:
    """Start `app` on 127.0.0.1:0; returns its runner (for `cleanup()`) and the port it got."""
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    sock = socket.create_server(("127.0.0.1", 0))
    await web.SockSite(runner, sock).start()
    port: int = sock.getsockname()[1]
    return runner, port


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
