"""load/live.py `drive`: a cancelled run stops sending (a real aiohttp server on loopback counts)."""

from __future__ import annotations

import asyncio
import contextlib

from aiohttp import web
from loopback import serve_loopback

from load.live import Outgoing, drive


async def test_a_cancelled_drive_sends_nothing_more() -> None:
    """Ctrl-C or SIGTERM cancels the bench's task inside `drive`: the requests whose arrival time has not
    come must not go on being sent, one at each arrival time, while the bench stops its router."""
    received: list[str] = []

    async def completions(request: web.Request) -> web.StreamResponse:
        received.append(str((await request.json())["prompt"]))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'data: {"choices": [{"text": "x"}]}\n\ndata: [DONE]\n\n')
        return resp

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    runner, port = await serve_loopback(app)
    try:
        # 40 requests, one every 50 ms: 2 s of arrivals; cancelled after about 0.3 s.
        requests = [
            Outgoing(f"r{i}", "/v1/completions", {"model": "m", "prompt": f"p{i}", "max_tokens": 1}, i * 0.05)
            for i in range(40)
        ]
        run = asyncio.create_task(drive(f"http://127.0.0.1:{port}", requests, concurrency=8))
        await asyncio.sleep(0.3)
        run.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await run
        sent_by_cancel = len(received)
        assert 0 < sent_by_cancel < 40
        left = [t for t in asyncio.all_tasks() if "send_one" in t.get_coro().__qualname__ and not t.done()]
        assert not left, f"{len(left)} requests still scheduled after the cancellation"
        await asyncio.sleep(0.5)  # ten more arrival times
        assert len(received) == sent_by_cancel
    finally:
        await runner.cleanup()
