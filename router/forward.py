"""Forwarding one routed request to a replica: retries before the first byte, streaming after it.

Rules (the failure contract users see):
- Nothing is sent to the client until the chosen replica has produced its first body byte (a stream)
  or its whole body (not a stream). Until then a failure — connection refused or reset, a 5xx, the
  connection dropped before a byte — is retried on another replica, at most `max_retries` times, never
  on a replica that already failed this request. After the retries, a replica's 5xx is passed through
  as it came; a connection failure is a 502.
- No byte from the replica for `upstream_timeout_s` before the first byte is a 504, not retried: the
  request may be running there, and sending it again would double the work of an overloaded fleet.
- After the first byte the response is the replica's: chunks are written to the client as they arrive
  (`readany`, never buffered). If the replica cuts the stream or stalls past the timeout, the stream
  ends with the SSE error event and `data: [DONE]` (router/errors.py), as vLLM ends a failed stream.
- A client that goes away (a failed write, or the handler cancelled on disconnect) closes the upstream
  connection, which makes vLLM abort the request (vllm-interfaces.md).
- Every outcome feeds the replica's circuit breaker: connection errors, 5xx, timeouts and cut streams
  are failures; any other status is a success (a 4xx is the client's fault, not the replica's).
- Hop-by-hop headers (and those named in Connection) are never forwarded, either way; Host and
  Content-Length are recomputed. Everything else passes, Authorization included. Bodies are not
  decompressed (`auto_decompress=False` on the session), so a compressed answer passes byte for byte.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from router.errors import ProxyError, sse_error_event
from router.fleet import Fleet
from router.metrics import RouterMetrics
from router.migration import MigrationRunner
from router.policies.base import Decision, NoReplicaAvailable, RequestView
from router.upstream import Replica, ReplicaSet
from router.usage import SSEUsageScanner, Usage, usage_from_body

log = logging.getLogger("kvrouter.forward")

REPLICA_HEADER = "x-kvrouter-replica"
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# Expect: the router has read the whole body already, so a 100-continue upstream means nothing.
_REQUEST_DROP = HOP_BY_HOP | {"host", "content-length", "expect"}
_RESPONSE_DROP = HOP_BY_HOP | {"content-length"}


class ClientGone(Exception):
    """The client went away mid-response; carries the response already started, for the middleware."""

    def __init__(self, response: web.StreamResponse) -> None:
        super().__init__("client disconnected")
        self.response = response


@dataclass(frozen=True, slots=True)
class Failure:
    """An attempt that sent nothing to the client. `status`/`body` are set for a replica's 5xx."""

    kind: str  # "connect_error" | "upstream_5xx" | "disconnected" | "timeout"
    message: str
    replica: str
    status: int | None = None
    headers: CIMultiDict[str] | None = None
    body: bytes | None = None


@dataclass(slots=True)
class Exchange:
    """One proxied request's forwarding: what it needs from the router, and where it reports."""

    request: web.Request
    body: bytes
    view: RequestView
    route: str
    started: float
    fleet: Fleet
    replicas: ReplicaSet
    metrics: RouterMetrics
    clock: Callable[[], float]
    session: aiohttp.ClientSession
    policy_name: str
    migration: MigrationRunner | None = None  # counts routed requests for the hot-prefix controller

    async def run(self) -> web.StreamResponse:
        cfg = self.replicas.config
        tried: list[str] = []
        failure: Failure | None = None
        for attempt in range(cfg.max_retries + 1):
            try:
                decision = route_excluding(self.fleet, self.view, self.clock(), tried)
            except NoReplicaAvailable:
                break
            replica = self.replicas.get(decision.replica)
            if replica is None:  # the Fleet and the ReplicaSet move together; this would be a bug
                raise RuntimeError(f"fleet chose {decision.replica!r}, which the replica set lacks")
            if attempt and failure is not None:
                self.metrics.retries.labels(failure.kind).inc()
            self.metrics.decisions.labels(self.policy_name, decision.reason).inc()
            if self.migration is not None and not attempt:  # once a request, not once an attempt
                self.migration.observe(self.view, decision)
            tried.append(replica.name)
            result = await self._attempt(replica, decision)
            if not isinstance(result, Failure):
                return result
            failure = result
            self.metrics.upstream_errors.labels(failure.kind).inc()
            self.fleet.done(self.view.request_id, self.clock())
            if failure.kind == "timeout":
                break
        if failure is None:
            raise ProxyError(
                503,
                f"no healthy replica available for model {self.view.model!r}",
                err_type="service_unavailable",
                code="no_healthy_replica",
                retry_after_s=max(1.0, cfg.health_interval_s),
            )
        return self._failure_response(failure)

    def _failure_response(self, failure: Failure) -> web.StreamResponse:
        if failure.kind == "upstream_5xx" and failure.status is not None:
            headers = CIMultiDict(failure.headers or {})
            if self.replicas.config.replica_header:
                headers[REPLICA_HEADER] = failure.replica
            return web.Response(status=failure.status, body=failure.body, headers=headers)
        if failure.kind == "timeout":
            raise ProxyError(504, failure.message, err_type="timeout_error", code="upstream_timeout")
        raise ProxyError(502, failure.message, err_type="upstream_error", code="upstream_unavailable")

    async def _attempt(self, replica: Replica, decision: Decision) -> web.StreamResponse | Failure:
        cfg = self.replicas.config
        headers = filter_headers(self.request.headers, _REQUEST_DROP)
        headers.setdefault("Content-Type", "application/json")
        url = URL(replica.url + self.request.rel_url.raw_path_qs, encoded=True)
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=cfg.connect_timeout_s, sock_read=cfg.upstream_timeout_s
        )
        name = replica.name
        try:
            resp = await self.session.post(url, data=self.body, headers=headers, timeout=timeout)
        except aiohttp.SocketTimeoutError:
            return self._failed(
                replica, "timeout", f"replica {name} sent nothing for {cfg.upstream_timeout_s}s"
            )
        except (aiohttp.ClientError, OSError) as exc:
            return self._failed(replica, "connect_error", f"could not reach replica {name}", exc)
        complete = False
        try:
            if resp.status >= 500:
                body = await resp.read()
                complete = True
                self.replicas.record_failure(replica, self.clock())
                out = filter_headers(resp.headers, _RESPONSE_DROP)
                message = f"replica {name} answered {resp.status}"
                return Failure("upstream_5xx", message, name, resp.status, out, body)
            if resp.content_type != "text/event-stream":
                body = await resp.read()
                complete = True
                self._first_byte(replica, decision, resp.status)
                if resp.status == 200 and "Content-Encoding" not in resp.headers:
                    self._record_usage(usage_from_body(body))
                return web.Response(status=resp.status, body=body, headers=self._response_headers(resp, name))
            first = await resp.content.readany()
            if not first:
                return self._failed(
                    replica, "disconnected", f"replica {name} closed the stream before a byte"
                )
            self._first_byte(replica, decision, resp.status)
            response, complete = await self._stream(replica, resp, first)
            return response
        except aiohttp.SocketTimeoutError:
            return self._failed(
                replica, "timeout", f"replica {name} sent nothing for {cfg.upstream_timeout_s}s"
            )
        except (aiohttp.ClientError, OSError) as exc:
            return self._failed(replica, "disconnected", f"replica {name} dropped the connection", exc)
        finally:
            if complete:
                resp.release()
            else:
                resp.close()  # an unfinished exchange: closing the connection aborts it in vLLM

    def _response_headers(self, resp: aiohttp.ClientResponse, name: str) -> CIMultiDict[str]:
        headers = filter_headers(resp.headers, _RESPONSE_DROP)
        if self.replicas.config.replica_header:
            headers[REPLICA_HEADER] = name
        return headers

    def _failed(self, replica: Replica, kind: str, message: str, exc: BaseException | None = None) -> Failure:
        # The client's message names the replica only; addresses and exception details go to the log.
        detail = "" if exc is None else f": {exc!r}"
        log.warning("%s (%s %s)%s", message, self.request.method, self.request.path, detail)
        self.replicas.record_failure(replica, self.clock())
        return Failure(kind, message, replica.name)

    def _first_byte(self, replica: Replica, decision: Decision, status: int) -> None:
        """The replica answered (first stream byte, or whole body): prefill is over, it is healthy,
        and a successful request enters the TTFT histogram and the amnesia-tax meter (all of whose
        counters therefore cover the same requests: those a replica served)."""
        now = self.clock()
        self.fleet.first_token(self.view.request_id, now)
        self.replicas.record_success(replica, now)
        if status >= 400:
            return
        metrics, view = self.metrics, self.view
        metrics.ttft.labels(self.route).observe(now - self.started)
        metrics.prompt_tokens.inc(view.prompt_tokens)
        metrics.logical_cached.inc(view.cached_tokens(metrics.seen.match_and_add(view.hashes.chained)))
        metrics.expected_cached.inc(decision.expected_cached_tokens)

    def _record_usage(self, usage: Usage | None) -> None:
        if usage is not None and usage.cached_tokens is not None:
            self.metrics.physical_cached.inc(usage.cached_tokens)
            self.metrics.usage_prompt_tokens.inc(usage.prompt_tokens)

    async def _stream(
        self, replica: Replica, resp: aiohttp.ClientResponse, first: bytes
    ) -> tuple[web.StreamResponse, bool]:
        """Pass the stream through; True if the replica finished it, False if it was cut (then the
        client got the SSE error event). ClientGone if the client went away."""
        out = web.StreamResponse(status=resp.status, headers=self._response_headers(resp, replica.name))
        scanner = SSEUsageScanner()
        chunk, last = first, b""
        try:
            await out.prepare(self.request)
            while chunk:
                await out.write(chunk)
                scanner.feed(chunk)
                last = chunk
                try:
                    chunk = await resp.content.readany()
                except (aiohttp.ClientError, OSError) as exc:  # SocketTimeoutError included
                    await self._end_cut_stream(replica, out, last, exc)
                    self._record_usage(scanner.usage)
                    return out, False
            await out.write_eof()
        except ConnectionError as exc:  # aiohttp's ClientConnectionResetError: the client is gone
            self._record_usage(scanner.usage)
            raise ClientGone(out) from exc
        self._record_usage(scanner.usage)
        return out, True

    async def _end_cut_stream(
        self, replica: Replica, out: web.StreamResponse, last: bytes, exc: BaseException
    ) -> None:
        self.metrics.stream_interruptions.inc()
        self.replicas.record_failure(replica, self.clock())
        timed_out = isinstance(exc, aiohttp.SocketTimeoutError)
        what = "stalled" if timed_out else "cut the stream"
        # End a partly received event first, so the error event is parsed on its own.
        prefix = b"" if last.endswith(b"\n\n") else b"\n\n"
        await out.write(
            prefix
            + sse_error_event(
                f"replica {replica.name} {what} after it started: {type(exc).__name__}",
                code="upstream_timeout" if timed_out else "upstream_stream_interrupted",
            )
        )
        await out.write_eof()


def route_excluding(fleet: Fleet, view: RequestView, now: float, excluded: Iterable[str]) -> Decision:
    """`Fleet.route`, leaving out the replicas that already failed this request.

    They are marked unhealthy for this one synchronous call and restored after it: there is no await
    in between, so no other request can observe the change (the event loop runs one task at a time),
    and the core needs no "exclude" parameter threaded through every policy.
    """
    saved = [(name, fleet.replicas[name].healthy) for name in excluded if name in fleet.replicas]
    for name, _ in saved:
        fleet.set_healthy(name, False)
    try:
        return fleet.route(view, now)
    finally:
        for name, healthy in saved:
            fleet.set_healthy(name, healthy)


def filter_headers(
    headers: CIMultiDictProxy[str] | CIMultiDict[str], drop: frozenset[str]
) -> CIMultiDict[str]:
    """A copy without `drop` (lower-case names) and without the headers named in Connection."""
    named = {
        token.strip().lower() for value in headers.getall("Connection", ()) for token in value.split(",")
    }
    out: CIMultiDict[str] = CIMultiDict()
    for key, value in headers.items():
        lower = key.lower()
        if lower not in drop and lower not in named:
            out.add(key, value)
    return out
