"""The simplest possible aiohttp forwarder: the floor `kvrouter bench proxy` measures kvrouter against.

One aiohttp app, one pooled ClientSession; every POST goes to the next backend (round robin) with the
client's body and Content-Type, and the answer comes back as it arrives (`iter_any`, never buffered).
No parsing, routing, retries, header filtering, metrics or error handling: whatever kvrouter costs
beyond this is the price of being a router rather than a pipe.

    python -m load.bare_forwarder --port 8090 --backend http://127.0.0.1:8100 --backend ...
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import AsyncIterator

import aiohttp
import uvloop
from aiohttp import web

SESSION = web.AppKey("session", aiohttp.ClientSession)


def build_app(backends: list[str]) -> web.Application:
    urls = itertools.cycle(backends)

    async def forward(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {"Content-Type": request.headers.get("Content-Type", "application/json")}
        async with request.app[SESSION].post(next(urls) + request.path_qs, data=body, headers=headers) as up:
            out = web.StreamResponse(status=up.status, headers={"Content-Type": up.content_type})
            await out.prepare(request)
            async for chunk in up.content.iter_any():
                await out.write(chunk)
            await out.write_eof()
            return out

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        app[SESSION] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        yield
        await app[SESSION].close()

    app = web.Application()
    app.cleanup_ctx.append(lifecycle)
    app.router.add_post("/{path:.*}", forward)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--backend", action="append", required=True, metavar="URL", help="repeatable")
    args = parser.parse_args()
    backends = [url.rstrip("/") for url in args.backend]
    loop = uvloop.new_event_loop()
    web.run_app(build_app(backends), host=args.host, port=args.port, access_log=None, print=None, loop=loop)


if __name__ == "__main__":
    main()
