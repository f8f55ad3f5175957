"""Each replica's vLLM KV events, followed over ZMQ into the PrefixIndex: the I/O shell around
router/index/event_indexer.py (which holds the rules for what an event does to the index) and
router/kv_event_sources.py (where the events come from).

Rules:
- One `ReplicaEvents` per replica, one SUB socket each (subscribed to the topic; "" = all) on one
  zmq.asyncio.Context per router. `KVEventSubscribers` starts and stops them with the replicas
  (`sync()`: at start, after an admin add/remove and a reload, and every second as a safety net).
- Source: the backend's `kv_events` endpoint (with `kv_events_replay`, `kv_events_topic`), or the
  replica's `GET /kv_event_sources` (vLLM 0.32+: `{"<dp_rank>": {"endpoint", "replay_endpoint",
  "topic", ...}}`; the lowest rank is followed, one stream per replica). A bound address (`*`,
  0.0.0.0, `::`) or a loopback one is reached at the replica URL's host, same port. Absent `kv_events`:
  events if the replica names a source, else none (asked again every `_REDISCOVER_S`).
- Sequence (`SequenceTracker`): in order → apply; duplicate → drop; reset (engine restart) → clear the
  replica's entries, then apply; gap → ask the replay endpoint (DEALER `[b"", start]`; both reply
  shapes, vllm-interfaces.md) from the last applied batch (re-reading it proves the stream is the same
  one), apply what is missing in order, bounded by `_REPLAY_IDLE_S` between frames. A replay that
  cannot close the gap (too far back, failed, none configured) is a resync: the event-derived entries
  go (the index then under-reports, which only costs a cache hit) and the stream goes on. On connect,
  a replay from 0 fetches what the replica published before we subscribed.
- Silence: vLLM publishes nothing while idle, so quiet is not silence. Silent = requests we sent there
  finished (`ReplicaState.served_requests`) since the last batch and none arrived within
  `kv_events_silence_s`. A replay then probes the publisher: if it answers, we were merely caught
  without news (a fully cached request stores no block) or had lost batches, which it returns; if it
  does not (or there is none), the replica is **approximate**: `event_fed` False, so routing-time
  inserts take over. When batches flow again, the routing-time entries are dropped (the index is
  rebuilt from the events' own map) and the sequence check replays whatever was missed.
- `event_fed` is True only in token-precise mode (`config.tokenizer` set) while connected: text
  requests are hashed in character chunks no event can name, so in text mode events are applied (they
  serve token-id prompts, and AllBlocksCleared / restarts clear) but routing keeps inserting.
- State changes (connected, approximate, back, off) are logged once each; gaps, replays and resyncs at
  most once per `_LOG_EVERY_S` per replica and kind (the metrics count every one).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Literal

import aiohttp
import zmq
import zmq.asyncio
from aiohttp import web

from router.config import KV_EVENTS_AUTO, KV_EVENTS_OFF, BackendConfig
from router.index.event_indexer import EventIndexer, SequenceTracker
from router.index.kv_events import KVEventBatch, KVEventDecodeError, decode_batch, decode_seq, encode_seq
from router.kv_event_sources import EventSource, connect_address, parse_event_sources
from router.proxy import RouterState
from router.upstream import Replica

log = logging.getLogger("kvrouter.kv_events")

# The most batches a SUB socket queues: vLLM's replay buffer (`buffer_steps`) holds 10000, so a
# backlog past that could not be replayed anyway, and the cap bounds the router's memory.
_RCVHWM = 10_000
_REPLAY_IDLE_S = 2.0  # vLLM's replay thread answers from memory: 2 s without a frame, it is not there
_REPLAY_MAX_BATCHES = 100_000  # 10x vLLM's buffer_steps: a replay that never ends is cut here
_REDISCOVER_S = 30.0  # re-ask /kv_event_sources of a replica naming none (or silent): 1 GET / 30 s
_DISCOVERY_BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)  # while the replica cannot be asked at all
_DRAIN_MAX = 1000  # messages handled before yielding to the event loop
# How long a new SUB waits for its connection before replaying what it missed (a loopback or LAN
# handshake takes about a millisecond; a publisher not there yet is left to the silence rule).
_JOIN_WAIT_S = 1.0
_LOG_EVERY_S = 60.0

State = Literal["discovering", "off", "connected", "approximate", "stopped"]


def replica_model(replica: Replica) -> str | None:
    """The model a replica's chains are seeded with: its first configured model, else the base model it
    lists (vLLM lists LoRA adapters with a `parent`), else None (not known yet)."""
    if replica.config.models:
        return replica.config.models[0]
    cards = replica.discovered or ()
    for card in cards:
        if card.get("parent") is None:
            return str(card["id"])
    return str(cards[0]["id"]) if cards else None


class _Unreachable(Exception):
    """/kv_event_sources could not be asked (the replica is down, or answered an error)."""


class _ReplayFailed(Exception):
    """A replay that did not answer, or answered nonsense."""


class ReplicaEvents:
    """Follows one replica's KV events (see the module rules)."""

    def __init__(self, owner: KVEventSubscribers, replica: Replica) -> None:
        self.owner = owner
        self.replica = replica
        self.name = replica.name
        self.backend: BackendConfig = replica.config
        self.state: State = "discovering"
        self.source: EventSource | None = None
        self.tracker = SequenceTracker()
        self.indexer: EventIndexer | None = None
        self._task: asyncio.Task[None] | None = None
        self._served_mark = 0  # served_requests when the last batch (or proof of life) came
        self._served_since: float | None = None  # when served_requests first passed the mark
        self._logged_at: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._warned_block_size = False

    # -- lifecycle and reads ------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"kv-events-{self.name}")
        self._set_state("discovering")  # sets the gauge: approximate until a stream is followed

    def cancel(self) -> asyncio.Task[None] | None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
        self.state = "stopped"
        return task

    def describe(self) -> dict[str, object]:
        source = self.source
        return {
            "state": self.state,
            "source": None if source is None else source.origin,
            "endpoint": None if source is None else source.endpoint,
            "replay_endpoint": None if source is None else source.replay_endpoint,
            "topic": None if source is None else source.topic,
            "last_seq": self.tracker.last_seq,
            "event_fed": self._fleet_state_event_fed(),
            "mapped_blocks": 0 if self.indexer is None else len(self.indexer),
            "map_evictions": 0 if self.indexer is None else self.indexer.map_evictions,
        }

    # -- the task -----------------------------------------------------------------------------

    async def _run(self) -> None:
        failures = 0
        while True:
            try:
                source = await self._find_source()
            except _Unreachable:  # back off and ask again
                self._set_state("discovering")
                await asyncio.sleep(_DISCOVERY_BACKOFF_S[min(failures, len(_DISCOVERY_BACKOFF_S) - 1)])
                failures += 1
                continue
            failures = 0
            if source is None:
                self._set_state("off")
                if self.backend.kv_events == KV_EVENTS_OFF:
                    return
                await asyncio.sleep(_REDISCOVER_S)
                continue
            try:
                await self._follow(source)
            except (zmq.ZMQError, OSError) as exc:
                self._log_limited("error", logging.WARNING, "KV events of %s: %s", self.name, exc)
                self._set_state("discovering")
                await asyncio.sleep(_DISCOVERY_BACKOFF_S[0])
            except Exception:  # a bug must not end event following for good (nor go unlogged)
                log.exception("KV events of %s: unexpected error; starting over", self.name)
                self._set_state("discovering")
                await asyncio.sleep(_DISCOVERY_BACKOFF_S[-1])

    async def _find_source(self) -> EventSource | None:
        b = self.backend
        if b.kv_events == KV_EVENTS_OFF:
            return None
        if b.kv_events not in (None, KV_EVENTS_AUTO):
            replay = b.kv_events_replay
            return EventSource(
                connect_address(b.kv_events, b.url, reported=False),
                None if replay is None else connect_address(replay, b.url, reported=False),
                b.kv_events_topic or "",
                "config",
            )
        session = self.owner.state.session
        if session is None:
            raise _Unreachable("no HTTP session yet")
        timeout = aiohttp.ClientTimeout(total=max(1.0, min(self.owner.state.config.health_interval_s, 5.0)))
        try:
            async with session.get(b.url + "/kv_event_sources", timeout=timeout) as resp:
                if resp.status == 404:  # vLLM before 0.32: no such endpoint
                    found, ranks = None, 0
                elif resp.status != 200:
                    raise _Unreachable(f"/kv_event_sources answered {resp.status}")
                else:
                    found, ranks = parse_event_sources(json.loads(await resp.read()), b.url)
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            raise _Unreachable(str(exc)) from None
        if found is None:
            level = logging.WARNING if b.kv_events == KV_EVENTS_AUTO else logging.INFO
            self._log_limited("none", level, "replica %s names no KV-event source", self.name)
            return None
        if ranks > 1:
            self._log_limited(
                "ranks",
                logging.WARNING,
                "replica %s has %d data-parallel event streams; only the lowest rank's is "
                "followed, the other ranks' blocks are not indexed",
                self.name,
                ranks,
            )
        replay = found.replay_endpoint
        if b.kv_events_replay is not None:
            replay = connect_address(b.kv_events_replay, b.url, reported=False)
        topic = found.topic if b.kv_events_topic is None else b.kv_events_topic
        return EventSource(found.endpoint, replay, topic, "discovered")

    async def _follow(self, source: EventSource) -> None:
        ctx = self.owner.ctx
        sub = ctx.socket(zmq.SUB)
        try:
            sub.setsockopt(zmq.LINGER, 0)
            sub.setsockopt(zmq.RCVHWM, _RCVHWM)
            if source.endpoint.startswith("tcp://["):
                sub.setsockopt(zmq.IPV6, 1)
            sub.setsockopt(zmq.SUBSCRIBE, source.topic.encode())
            monitor = sub.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
            sub.connect(source.endpoint)
            self._begin(source)
            try:  # ZMQ's slow joiner: a SUB misses what is published before its connection is up
                await monitor.poll(timeout=int(_JOIN_WAIT_S * 1000))
            finally:
                sub.disable_monitor()
                monitor.close(linger=0)
            if source.replay_endpoint is not None:
                await self._replay(0, initial=True)
            self._drop_routing_time_entries()  # inserted while we were not following
            rediscover_at = self.owner.state.clock() + _REDISCOVER_S
            while True:
                tick_ms = int(1000 * min(1.0, max(0.05, self.owner.state.config.kv_events_silence_s / 4)))
                if await sub.poll(timeout=tick_ms):  # POLLIN by default
                    for _ in range(_DRAIN_MAX):
                        await self._on_frames(await sub.recv_multipart())
                        events = sub.get(zmq.EVENTS)
                        if not (isinstance(events, int) and events & zmq.POLLIN):
                            break
                await self._check_silence()
                now = self.owner.state.clock()
                if self.state == "approximate" and source.origin == "discovered" and now >= rediscover_at:
                    rediscover_at = now + _REDISCOVER_S
                    with contextlib.suppress(_Unreachable):
                        if await self._find_source() != source:
                            return  # the replica now names another source: follow that one
        finally:
            sub.close(linger=0)

    def _begin(self, source: EventSource) -> None:
        """A fresh stream: what older streams put in the index goes, the sequence starts over."""
        if self.indexer is not None and self._current():
            self.indexer.forget()
        self.indexer = None
        self.tracker.forget()
        self.source = source
        self._mark_alive()
        self._set_state("connected")
        log.info(
            "KV events of %s: subscribed to %s (replay %s, topic %r, %s)",
            self.name,
            source.endpoint,
            source.replay_endpoint,
            source.topic,
            source.origin,
        )

    # -- batches ------------------------------------------------------------------------------

    async def _on_frames(self, frames: list[bytes]) -> None:
        source = self.source
        if source is None or len(frames) != 3 or (source.topic and frames[0] != source.topic.encode()):
            self._log_limited(
                "frames",
                logging.WARNING,
                "KV events of %s: ignoring a %d-frame message",
                self.name,
                len(frames),
            )
            return
        try:
            seq, batch = decode_seq(frames[1]), decode_batch(frames[2])
        except KVEventDecodeError as exc:  # skipped: the next batch shows the gap, and the replay
            self._log_limited("decode", logging.WARNING, "KV events of %s: %s", self.name, exc)
            return
        if not self._current():
            return  # a replica that left (its successor has its own subscriber)
        self._mark_alive()
        if self._model() is None:
            return  # its model is not known yet: skipped, so the next batch after discovery shows a gap
        if self.state == "approximate":
            self._back()
        check = self.tracker.check(seq, batch.ts)
        if check.kind == "reset":
            self._resync(
                "restart", "sequence went back from %d to %d: the engine restarted", check.expected, seq
            )
            check = self.tracker.check(seq, batch.ts)
        if check.kind == "duplicate":
            return
        if check.kind == "gap":
            self.owner.state.metrics.kv_event_gaps.labels(self.name).inc()
            self._log_limited(
                "gap",
                logging.WARNING,
                "KV events of %s: missed batches %d to %d",
                self.name,
                check.expected,
                seq - 1,
            )
            if source.replay_endpoint is None:
                if self.tracker.expected is not None:
                    self._resync(
                        "no_replay", "no replay endpoint to fetch batches %d-%d", check.expected, seq - 1
                    )
                self.tracker.resume_at(seq)
            else:
                replayed = await self._replay(check.expected, initial=self.tracker.expected is None)
                after = self.tracker.check(seq, batch.ts)
                if after.kind == "duplicate":
                    return
                if after.kind != "in_order":
                    if replayed and self.tracker.expected is not None:
                        self._resync("replay_incomplete", "the replay ended before batch %d", seq)
                    self.tracker.resume_at(seq)
        self._apply(seq, batch)

    def _apply(self, seq: int, batch: KVEventBatch) -> None:
        indexer = self._indexer()
        if indexer is None or not self._current():
            return
        report = indexer.apply(batch.events, self.owner.state.clock())
        self.tracker.applied(seq, batch.ts)
        m, name = self.owner.state.metrics, self.name
        m.kv_event_batches.labels(name).inc()
        for kind, n in report.events.items():
            m.kv_events.labels(name, kind).inc(n)
        for reason, n in report.skipped.items():
            m.kv_event_skipped_blocks.labels(name, reason).inc(n)
        if report.foreign_block_size is not None and not self._warned_block_size:
            self._warned_block_size = True
            log.warning(
                "KV events of %s use block size %d but the router hashes blocks of %d: those blocks can "
                "match no request and are skipped (set the router's block_size to the replicas')",
                name,
                report.foreign_block_size,
                indexer.block_size,
            )

    async def _replay(self, expected: int, *, initial: bool = False, probe: bool = False) -> bool:
        """Fetch and apply batches from `expected` on (from the one before it, which proves the stream
        is the same); False if the replay failed. A failed replay meant to close a gap is a resync; an
        `initial` one had nothing to drop, and a silence `probe` none to close."""
        source = self.source
        assert source is not None and source.replay_endpoint is not None
        self.owner.state.metrics.kv_event_replays.labels(self.name).inc()
        restarted = False
        for _ in range(2):  # a second pass from 0 if the publisher turned out to have restarted
            start = expected - 1 if expected > 0 and self.tracker.last_ts is not None else expected
            try:
                restarted = await self._replay_from(source, start, initial)
            except (_ReplayFailed, zmq.ZMQError, TimeoutError) as exc:
                self._log_limited(
                    "replay",
                    logging.WARNING,
                    "KV events of %s: replay from %d failed: %s",
                    self.name,
                    start,
                    exc,
                )
                if not (initial or probe) and self.tracker.expected is not None:
                    self._resync("replay_failed", "the replay endpoint did not answer")
                return False
            if not restarted:
                return True
            expected = 0
        return True

    async def _replay_from(self, source: EventSource, start: int, initial: bool) -> bool:
        """One replay round; True if it found the publisher restarted (the caller asks again from 0)."""
        assert source.replay_endpoint is not None
        dealer = self.owner.ctx.socket(zmq.DEALER)
        try:
            dealer.setsockopt(zmq.LINGER, 0)
            if source.replay_endpoint.startswith("tcp://["):
                dealer.setsockopt(zmq.IPV6, 1)
            dealer.connect(source.replay_endpoint)
            # asyncio.timeout, not wait_for: Python 3.11's wait_for returns the result when the inner
            # future completes in the same loop turn as a cancellation, swallowing the CancelledError
            # (CPython gh-86296); a router stopping mid-replay then kept following the stream forever.
            async with asyncio.timeout(_REPLAY_IDLE_S):
                await dealer.send_multipart((b"", encode_seq(start)))
            for _ in range(_REPLAY_MAX_BATCHES):
                async with asyncio.timeout(_REPLAY_IDLE_S):
                    frames = await dealer.recv_multipart()
                if not frames or frames[0] != b"" or len(frames) not in (3, 4):
                    raise _ReplayFailed(f"a malformed replay reply of {len(frames)} frames")
                seq_frame, payload = frames[-2], frames[-1]
                seq = decode_seq(seq_frame)
                if seq < 0 or not payload:
                    return False  # the end marker
                try:
                    batch = decode_batch(payload)
                except KVEventDecodeError:
                    continue  # skipped: the next one shows the gap
                if not self._current() or self._model() is None:
                    return False
                self._mark_alive()
                check = self.tracker.check(seq, batch.ts)
                if check.kind == "reset":
                    self._resync("restart", "the replay shows the engine restarted (seq %d)", seq)
                    if seq != 0:
                        return True
                    check = self.tracker.check(seq, batch.ts)
                if check.kind == "duplicate":
                    continue
                if check.kind == "gap":  # the buffer does not reach back that far
                    if not initial and self.tracker.expected is not None:
                        self._resync(
                            "replay_incomplete", "the replay starts at %d, after %d", seq, check.expected
                        )
                    self.tracker.resume_at(seq)
                self._apply(seq, batch)
            raise _ReplayFailed(f"more than {_REPLAY_MAX_BATCHES} batches")
        except KVEventDecodeError as exc:
            raise _ReplayFailed(str(exc)) from None
        finally:
            dealer.close(linger=0)

    # -- silence, approximate mode, resyncs ----------------------------------------------------

    async def _check_silence(self) -> None:
        state = self.owner.state.fleet.replicas.get(self.name)
        if state is None or not self._current():
            return
        self._sync_event_fed()
        if state.served_requests <= self._served_mark or self.state != "connected":
            return
        now = self.owner.state.clock()
        if self._served_since is None:
            self._served_since = now
            return
        if now - self._served_since < self.owner.state.config.kv_events_silence_s:
            return
        source = self.source
        if source is not None and source.replay_endpoint is not None:
            expected = 0 if self.tracker.expected is None else self.tracker.expected
            if await self._replay(expected, initial=self.tracker.expected is None, probe=True):
                self._mark_alive()  # the publisher answered: no news, or missed news now applied
                return
        self._set_state("approximate")

    def _mark_alive(self) -> None:
        state = self.owner.state.fleet.replicas.get(self.name)
        self._served_mark = 0 if state is None else state.served_requests
        self._served_since = None

    def _back(self) -> None:
        self._drop_routing_time_entries()
        self._set_state("connected")

    def _drop_routing_time_entries(self) -> None:
        """In token-precise mode, make the index hold what events put there and nothing else (text mode
        keeps its routing-time entries: they are its index)."""
        if not self._token_mode() or not self._current():
            return
        indexer = self._indexer()
        if indexer is not None:
            indexer.rebuild(self.owner.state.clock())
        else:
            self.owner.state.fleet.index.clear(self.name)

    def _resync(self, reason: str, detail: str, *args: object) -> None:
        """Drop the event-derived entries (all of the replica's on a restart) and start the map over."""
        self.owner.state.metrics.kv_event_resyncs.labels(self.name, reason).inc()
        self._log_limited(
            f"resync-{reason}",
            logging.WARNING,
            "KV events of %s: resync (%s): " + detail,
            self.name,
            reason,
            *args,
        )
        if self.indexer is not None:
            if reason == "restart":
                self.indexer.clear()
            else:
                self.indexer.forget()
        if reason == "restart":
            self.tracker.forget()

    def _set_state(self, new: State) -> None:
        old, self.state = self.state, new
        if self._current():
            approximate = self.owner.state.metrics.kv_events_approximate
            approximate.labels(self.name).set(0 if new == "connected" else 1)
            self._sync_event_fed()
        if old == new:
            return
        if new == "approximate":
            log.warning(
                "KV events of %s: silent for %.1fs after requests finished there: approximate mode "
                "(routing-time index inserts)",
                self.name,
                self.owner.state.config.kv_events_silence_s,
            )
        elif new == "connected" and old == "approximate":
            log.info("KV events of %s: batches flow again; the index follows them", self.name)
        elif new == "off":
            log.info("KV events of %s: none (routing-time index inserts)", self.name)

    def _sync_event_fed(self) -> None:
        fed = self.state == "connected" and self._token_mode()
        fleet = self.owner.state.fleet
        if self.name in fleet.replicas and fleet.replicas[self.name].event_fed != fed:
            fleet.set_event_fed(self.name, fed)

    # -- helpers ------------------------------------------------------------------------------

    def _current(self) -> bool:
        return self.owner.state.replicas.get(self.name) is self.replica and self._task is not None

    def _token_mode(self) -> bool:
        return self.owner.state.config.tokenizer is not None

    def _fleet_state_event_fed(self) -> bool:
        state = self.owner.state.fleet.replicas.get(self.name)
        return state is not None and state.event_fed

    def _model(self) -> str | None:
        return replica_model(self.replica)

    def _indexer(self) -> EventIndexer | None:
        model = self._model()
        if model is None:
            return None
        if self.indexer is None or self.indexer.model != model:
            if self.indexer is not None:
                self.indexer.forget()  # hashed with another model's seed
            self.indexer = EventIndexer(self.owner.state.fleet.index, self.name, model, self.owner.block_size)
        return self.indexer

    def _log_limited(self, kind: str, level: int, msg: str, *args: object) -> None:
        now = asyncio.get_running_loop().time()
        last = self._logged_at.get(kind)
        if last is not None and now - last < _LOG_EVERY_S:
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return
        self._logged_at[kind] = now
        more = self._suppressed.pop(kind, 0)
        log.log(level, msg + (f" ({more} more like it since)" if more else ""), *args)


class KVEventSubscribers:
    """The router's KV-event subscribers, one per replica (see the module rules)."""

    def __init__(self, state: RouterState) -> None:
        self.state = state
        self.block_size = state.config.block_size
        self._ctx: zmq.asyncio.Context | None = None
        self._subs: dict[str, ReplicaEvents] = {}
        self._stopping: set[asyncio.Task[None]] = set()
        self._supervisor: asyncio.Task[None] | None = None

    @property
    def ctx(self) -> zmq.asyncio.Context:
        if self._ctx is None:
            raise RuntimeError("KV-event subscribers are not started")
        return self._ctx

    def get(self, name: str) -> ReplicaEvents | None:
        return self._subs.get(name)

    def describe(self, name: str) -> dict[str, object] | None:
        sub = self._subs.get(name)
        return None if sub is None else sub.describe()

    async def start(self) -> None:
        if self._ctx is not None:
            return
        self._ctx = zmq.asyncio.Context()
        self.sync()
        self._supervisor = asyncio.create_task(self._supervise(), name="kv-events-supervisor")

    def sync(self) -> None:
        """Start, stop or restart subscribers so that each replica has one for its current config."""
        if self._ctx is None:
            return
        replicas = {r.name: r for r in self.state.replicas.all()}
        if self.state.config.block_size != self.block_size:  # every own hash changes: start over
            self.block_size = self.state.config.block_size
            for name in list(self._subs):
                self._stop(name)
        for name, sub in list(self._subs.items()):
            replica = replicas.get(name)
            if replica is not sub.replica or replica.config != sub.backend:
                self._stop(name)
        for name, replica in replicas.items():
            if name not in self._subs:
                sub = self._subs[name] = ReplicaEvents(self, replica)
                sub.start()

    def _stop(self, name: str) -> None:
        sub = self._subs.pop(name)
        task = sub.cancel()
        fleet = self.state.fleet
        if self.state.replicas.get(name) is sub.replica and name in fleet.replicas:
            fleet.set_event_fed(name, False)  # now, not in the task: its successor may start at once
        if task is not None:
            self._stopping.add(task)
            task.add_done_callback(self._stopping.discard)

    async def _supervise(self) -> None:
        while True:
            await asyncio.sleep(1.0)  # a safety net: the admin API and reloads call sync() themselves
            self.sync()

    async def stop(self) -> None:
        tasks = [t for t in (self._supervisor,) if t is not None]
        self._supervisor = None
        for name in list(self._subs):
            task = self._subs.pop(name).cancel()
            if task is not None:
                tasks.append(task)
        tasks += list(self._stopping)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._ctx is not None:
            self._ctx.destroy(linger=0)  # not term(): it would wait for any socket left open
            self._ctx = None


KV_EVENTS = web.AppKey("kvrouter_kv_events", KVEventSubscribers)
