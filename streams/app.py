"""faust wiring: topics declared once, one ingest agent, one agent + table per keyed stage.

Data flow (README "Topics")::

    agent.spans ─┐            ┌─► <app>.spans-by-session  ─► detect-session  (loop)    ─┐
                 ├─► ingest ──┼─► <app>.spans-by-trace    ─► detect-trace    (silent)  ─┼─► agent.incidents
    otlp_spans  ─┘     │      └─► <app>.spans-by-workflow ─► detect-workflow (deadlock)─┘   agent.breaker
                       └─► agent.spans.dlq

* ``ingest`` decodes a batch of Kafka messages (each carrying many spans) and, for every stage,
  sends **one** message per key per batch to that stage's repartition topic; bad input goes to the
  DLQ with reason headers.
* each ``detect-*`` agent takes a batch of repartitioned messages, and for every key in it loads
  the state once, runs the stage (:mod:`streams.stages`, the same code replay runs), and stores the
  state once (RocksDB + changelog). So faust's per-event and per-table-write costs are paid per
  (key, batch), never per span (README "Measured"). Timers fire when the watermark passes them; a wall-clock
  tick keeps quiet partitions advancing.
* Offsets are committed by faust only after the producer has flushed what the batch sent
  (at-least-once); incident and command ids are deterministic, so a replayed batch re-publishes the
  same records and consumers de-duplicate by key.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import logging
import time
import weakref
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import faust
import orjson
from aiokafka.partitioner import murmur2
from faust.streams import _current_event

from streams import metrics, ops, semconv
from streams.ingest import Limits, decode
from streams.ingest.clock import check_wall
from streams.ingest.dialects import BAD_VALUES
from streams.models import Rejection, Span
from streams.runner import EventClock, KeyedRunner
from streams.stages import build_stages, group, idle_ttl_ns, runner_for
from streams.policy import Policy
from streams.settings import Settings

log = logging.getLogger("breakwater")

STAGE_TABLES = {"session": "sessions", "trace": "traces", "workflow": "workflows", "scope": "scopes"}


def stage_topic(settings: Settings, stage: str) -> str:
    """The internal repartition topic of a stage (spans keyed by session / trace / workflow)."""
    return f"{settings.app_id}.spans-by-{stage}"


def topic_specs(settings: Settings) -> list[tuple[str, int, dict[str, str]]]:
    """Every topic the worker needs, with partitions and configs, created before faust starts.

    Creating them up front matters: a broker that auto-creates topics on first metadata request
    would otherwise pick its own partition count, and each stage table's changelog must have as
    many partitions as its repartition topic.
    """
    n = settings.partitions
    specs = [
        (settings.topic_spans, n, {}),
        (settings.topic_otlp, n, {}),
        (settings.topic_incidents, n, {}),
        (settings.topic_breaker, n, {"cleanup.policy": "compact"}),
        (settings.topic_dlq, n, {}),
    ]
    for stage, table in STAGE_TABLES.items():
        specs.append((stage_topic(settings, stage), n, {}))
        specs.append((f"{settings.app_id}-{table}-changelog", n, {"cleanup.policy": "compact"}))
    return specs


def _credentials(settings: Settings) -> Any:
    return settings.faust_credentials()  # the same options every aiokafka client gets


def split_stored(raw: bytes) -> tuple[dict[str, int] | None, bytes]:
    """A stored value: its key's input offsets (if any) and the stage state's own bytes.

    >>> split_stored(b'H{"spans/0":41}\\n{"v":1}')
    ({'spans/0': 41}, b'{"v":1}')
    >>> split_stored(b'{"v":1}')
    (None, b'{"v":1}')
    """
    if raw[:1] == b"H":
        i = raw.index(b"\n")
        return orjson.loads(raw[1:i]), raw[i + 1:]
    return None, raw


def rocksdb_options(settings: Settings) -> dict[str, int]:
    """RocksDB sizes for one table partition, bounded by ``state_memory_mb``.

    Two write buffers of a quarter each and a block cache of half: a worker's RocksDB memory is at
    most ``state_memory_mb`` × tables × owned partitions (faust's defaults allow 64 MiB × 3 write
    buffers and a 2 GiB cache per partition, which a million short sessions do fill).

    >>> rocksdb_options(Settings(state_memory_mb=8))["block_cache_size"] == 4 * 2**20
    True
    """
    mb = settings.state_memory_mb * 2**20
    return {"write_buffer_size": mb // 4, "max_write_buffer_number": 2, "block_cache_size": mb // 2}


def partition_for(key: bytes, partitions: int) -> int:
    """The partition the default Kafka partitioner (murmur2) picks for a key.

    >>> partition_for(b"session-1", 4) == partition_for(b"session-1", 4)
    True
    """
    return (murmur2(key) & 0x7FFFFFFF) % partitions


@dataclass
class Breakwater:
    """The wired worker: faust app, its topics and the session table."""

    app: faust.App
    settings: Settings
    policy: Policy


_BAD_EXPORTED: dict[str, int] = {}


def _export_bad_values() -> None:
    """Move what ingest counted in :data:`BAD_VALUES` (per process) to the Prometheus counter."""
    for feature, n in list(BAD_VALUES.items()):
        done = _BAD_EXPORTED.get(feature, 0)
        if n > done:
            metrics.IGNORED_VALUES.labels(feature=feature).inc(n - done)
            _BAD_EXPORTED[feature] = n


def create_app(settings: Settings, policy: Policy) -> Breakwater:
    app = faust.App(
        settings.app_id,
        broker=settings.broker,
        broker_credentials=_credentials(settings),
        store="rocksdb://",
        datadir=str(settings.data_dir),
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication_factor,
        topic_allow_declare=True,
        broker_session_timeout=settings.group_session_timeout_s,
        broker_heartbeat_interval=settings.group_heartbeat_s,
        broker_rebalance_timeout=settings.group_rebalance_timeout_s,
        broker_commit_interval=settings.commit_interval_s,
        consumer_auto_offset_reset="earliest",
        stream_recovery_delay=0.0,
        # Off by default: the embedded broker's ListOffsets(latest) can trail the true end of a
        # changelog (README "The embedded broker"), so RocksDB's persisted offset can legitimately
        # exceed the reported highwater and faust's check would crash every restart; on Kafka, on.
        recovery_consistency_check=settings.recovery_consistency_check,
        processing_guarantee=settings.processing_guarantee,
        web_enabled=False,
        # a bounded prefetch: overload shows as consumer lag (a metric), not as seconds of queue
        stream_buffer_maxsize=settings.stream_buffer_max,
        producer_acks=-1,
        producer_linger=0.005,
        logging_config=None,
    )
    # faust's consumer long-polls fetches for 1.5 s; a broker that answers a fetch only when that
    # wait ends (Tansu does, README "The embedded broker") then adds up to 1.5 s per hop, and there are two hops
    # (input → ingest, repartition → stage). Poll about as often as a batch is cut instead.
    app.transport.Consumer = _fetch_wait_consumer(max(5, int(settings.batch_within_s * 500)))
    raw = {"key_type": bytes, "value_type": bytes, "key_serializer": "raw", "value_serializer": "raw"}
    inputs = app.topic(settings.topic_spans, settings.topic_otlp, **raw)
    incidents = app.topic(settings.topic_incidents, **raw)
    breaker = app.topic(settings.topic_breaker, **raw)
    dlq = app.topic(settings.topic_dlq, **raw)
    limits = Limits(max_message_bytes=settings.max_message_bytes)
    lateness_ns = policy.allowed_lateness_ns
    max_skew_ns = policy.max_clock_skew_ns
    max_age_ns = policy.max_span_age_ns
    n_parts = settings.partitions

    async def publish(outs: list) -> list:
        """Send the records; returns their delivery futures."""
        futs = []
        for o in outs:
            if o.kind == "forward":
                continue
            if o.kind == "incident":
                futs.append(await incidents.send(key=o.key, value=o.value))
                metrics.incident_published(o)
            else:
                futs.append(await breaker.send(key=o.key, value=o.value))
                metrics.COMMANDS.labels(action=o.status, mode=o.mode).inc()
        return futs

    wired = [
        KeyedStage(app, stage, app.topic(stage_topic(settings, stage.name), partitions=n_parts, **raw),
                   app.Table(STAGE_TABLES[stage.name], default=None, key_type=bytes, value_type=bytes,
                             partitions=n_parts, options=rocksdb_options(settings)),
                   n_parts, lateness_ns, idle_ttl_ns(policy, stage.name), publish,
                   settings.batch_max, settings.batch_within_s, settings.max_keys_per_partition,
                   settings.max_state_bytes, policy)
        for stage in build_stages(policy)
    ]

    app.breakwater_before_commit = [w.flush for w in wired]

    @app.on_partitions_revoked.connect
    async def _on_revoked(app_: Any, revoked: Any, **_: Any) -> None:  # noqa: ARG001
        for w in wired:
            w.flush()
            w.reset()

    @app.on_partitions_assigned.connect
    async def _on_assigned(app_: Any, assigned: Any, **_: Any) -> None:  # noqa: ARG001
        for w in wired:
            w.flush()
            w.reset()

    async def send_dlq(ev: Any, rejections: list) -> None:
        """Route a rejected message: its original bytes (truncated to ``DLQ_VALUE_BYTES``, with
        ``error.truncated`` and ``error.original_bytes`` headers) and the reasons. A send that
        fails is counted and logged without content; it never stops ingest."""
        first = rejections[0]
        detail = "; ".join(
            (f"span {r.index}: " if r.index is not None else "") + r.detail for r in rejections[:20]
        )[:1000]
        msg = ev.message
        value = ev.value if ev.value is not None else b""
        headers = [
            ("error.reason", first.reason.encode()),
            ("error.detail", detail.encode()),
            ("error.count", str(len(rejections)).encode()),
            ("source.topic", msg.topic.encode()),
            ("source.partition", str(msg.partition).encode()),
            ("source.offset", str(msg.offset).encode()),
        ]
        if len(value) > DLQ_VALUE_BYTES:
            headers += [("error.truncated", b"1"), ("error.original_bytes", str(len(value)).encode())]
            value = value[:DLQ_VALUE_BYTES]
        key = ev.key if ev.key is None or len(ev.key) <= 4096 else ev.key[:4096]
        try:
            await dlq.send(key=key, value=value, headers=headers)
        except Exception as exc:  # noqa: BLE001 - a DLQ failure must not lose the batch
            metrics.DLQ_FAILURES.inc()
            log.error("ingest: DLQ send failed for %s[%d]@%d (%s, %d bytes)", msg.topic, msg.partition,
                      msg.offset, type(exc).__name__, len(value))

    chunked: dict[int, Any] = {}  # id(span) -> wire, for spans of big messages
    chunk_of: dict[int, int] = {}  # id(span) -> internal offset (input offset << CHUNK_BITS | chunk)

    async def big_message(ev: Any, spans_: list[Span], source: dict) -> list[Span]:
        """A big message's spans: each measured once; one over ``SPAN_WIRE_BYTES`` is rejected
        (``oversized_span``, counted, the message to the DLQ); the rest are numbered in chunks of
        about ``PACK_BYTES``, so no internal message outgrows the record budget."""
        kept: list[Span] = []
        bad: list[Rejection] = []
        chunk, size = 0, 0
        for i, s in enumerate(spans_):
            semconv.features(s)  # made once, here: the wire carries it instead of the attributes
            wire = s.to_wire()
            n = len(orjson.dumps(wire))
            if n > SPAN_WIRE_BYTES:
                bad.append(Rejection("oversized_span", f"span is {n} bytes normalized, more than {SPAN_WIRE_BYTES}", i))
                source.pop(id(s), None)
                continue
            if size and size + n > PACK_BYTES and chunk < (1 << CHUNK_BITS) - 1:
                chunk, size = chunk + 1, 0
            size += n
            chunked[id(s)] = wire
            chunk_of[id(s)] = (ev.message.offset << CHUNK_BITS) | chunk
            kept.append(s)
        if bad:
            for r in bad:
                metrics.REJECTIONS.labels(reason=r.reason).inc()
            await send_dlq(ev, bad)
        return kept

    @app.agent(inputs, name="ingest")
    async def ingest(stream: Any) -> None:
        async for events in stream.take_events(settings.batch_max, within=settings.batch_within_s):
            t0 = time.perf_counter()
            spans: list[Span] = []
            source: dict[int, tuple[str, int]] = {}  # id(span) -> its input message
            chunked.clear()
            chunk_of.clear()
            for ev in events:
                try:
                    d = decode(ev.value or b"", limits=limits)
                except Exception as exc:  # decode never raises (fuzzed); this is the last guard
                    log.error("ingest: decoder failed on %s[%d]@%d: %s", ev.message.topic,
                              ev.message.partition, ev.message.offset, type(exc).__name__)
                    metrics.REJECTIONS.labels(reason="internal_error").inc()
                    await send_dlq(ev, [Rejection("internal_error", type(exc).__name__)])
                    continue
                rejections = d.rejections
                good = d.spans
                if not good and not rejections:
                    metrics.EMPTY_MESSAGES.inc()
                if good:  # event-time plausibility against the wall clock (streams.ingest.clock)
                    good, skewed = check_wall(good, time.time_ns(), max_skew_ns, max_age_ns)
                    if skewed:
                        rejections = rejections + skewed
                if rejections:
                    for r in rejections:
                        metrics.REJECTIONS.labels(reason=r.reason).inc()
                    await send_dlq(ev, rejections)
                if good:
                    metrics.SPANS_IN.labels(format=d.format).inc(len(good))
                    src = (f"{ev.message.topic}/{ev.message.partition}", ev.message.offset)
                    for s in good:
                        source[id(s)] = src
                    if ev.value is not None and len(ev.value) > BIG_MESSAGE:
                        good = await big_message(ev, good, source)
                    spans.extend(good)
            # one message per stage partition per batch ({key: spans}), not one per key: a faust
            # send and a faust event each cost ≈ 0.2 ms, a batch holds thousands of keys (README "Measured")
            wires: dict[int, Any] = chunked  # big messages' spans have their wires already
            for w in wired:
                parts: dict[int, dict[str, list]] = {}
                for key, group_spans in group(w.stage, spans).items():
                    payload: list[list] = []  # [[source, offset, [wire, …]], …]
                    for s in group_spans:
                        wire = wires.get(id(s))
                        if wire is None:
                            semconv.features(s)  # made once, here: the wire carries it instead of the attributes
                            wire = wires[id(s)] = s.to_wire()
                        src, off = source[id(s)]
                        off = chunk_of.get(id(s), off << CHUNK_BITS)
                        if payload and payload[-1][1] == off and payload[-1][0] == src:
                            payload[-1][2].append(wire)
                        else:
                            payload.append([src, off, [wire]])
                    part = partition_for(key.encode(), n_parts)
                    keyed = parts.get(part)
                    if keyed is None:
                        keyed = parts[part] = {}
                    keyed[key] = payload
                for part, keyed in parts.items():
                    for value in pack_keyed(b'{"keyed":', keyed.items()):
                        await w.topic.send(key=None, value=value, partition=part)
            metrics.BATCH_SECONDS.labels(stage="ingest").observe(time.perf_counter() - t0)

    by_name = {w.stage.name: w for w in wired}
    by_name["session"].forward_to = by_name["scope"]
    for w in wired:
        w.install()

    @app.timer(interval=settings.wall_tick_s)
    async def wall_clock_tick() -> None:
        """Quiet partitions still advance: an empty message to every owned stage partition."""
        assigned = app.consumer.assignment()
        for w in wired:
            for tp in assigned:
                if tp.topic == w.topic.get_topic_name():
                    await w.topic.send(key=None, value=TICK, partition=tp.partition)

    ops.install(app, settings)  # /metrics, /healthz, /readyz on their own port; lag sampling
    return Breakwater(app=app, settings=settings, policy=policy)


TICK = b""


def _fetch_wait_consumer(fetch_max_wait_ms: int) -> type:
    """faust's aiokafka consumer with its fetch long-poll set to ``fetch_max_wait_ms``."""
    from faust.transport.drivers import aiokafka as driver

    class ConsumerThread(driver.AIOKafkaConsumerThread):
        def _create_worker_consumer(self, transport: Any) -> Any:
            consumer = super()._create_worker_consumer(transport)
            consumer._fetch_max_wait_ms = fetch_max_wait_ms  # read when the consumer starts
            return consumer

    class Consumer(driver.Consumer):
        def _new_consumer_thread(self) -> Any:
            return ConsumerThread(self, loop=self.loop, beacon=self.beacon)

        async def force_commit(self, topics: Any = None, start_new_transaction: bool = True) -> bool:
            # state is written behind (KeyedStage.flush): what the acked events changed reaches
            # the tables and their changelogs before the offsets that cover those events commit
            for flush in getattr(self.app, "breakwater_before_commit", ()):
                flush()
            return await super().force_commit(topics, start_new_transaction=start_new_transaction)

    return Consumer
PACK_BYTES = 256 * 1024  # internal messages stay well under the producer's request size

# One size budget from input to every output (the producer's request size is faust's default,
# 1,000,000 bytes, which a default Kafka broker also accepts):
RECORD_BYTES = 1_000_000
DLQ_VALUE_BYTES = RECORD_BYTES - 64 * 1024  # a longer original is truncated, and its headers say so
SPAN_WIRE_BYTES = RECORD_BYTES - 64 * 1024  # a span bigger than this on the internal topics: rejected
STATE_BYTES = RECORD_BYTES // 2  # a state bigger than this is reset (counted), never written
BIG_MESSAGE = PACK_BYTES // 2  # spans of messages above this are measured and chunked
CHUNK_BITS = 10  # internal offsets are ``input offset << CHUNK_BITS | chunk`` (a big message in chunks)


def pack_keyed(head: bytes, items: Iterable[tuple[str, list]], budget: int = PACK_BYTES) -> Iterator[bytes]:
    """``head + {key: list, …} + "}"`` JSON documents of about ``budget`` bytes at most.

    Keys keep their list order; a key whose list alone is over the budget is split across
    consecutive documents (in order), so one key's items never need one huge message.

    >>> [orjson.loads(v) for v in pack_keyed(b'{"keys":', [("a", [1, 2]), ("b", [3])], budget=12)]
    [{'keys': {'a': [1, 2]}}, {'keys': {'b': [3]}}]
    >>> [orjson.loads(v)["keys"]["a"] for v in pack_keyed(b'{"keys":', [("a", [1, 2, 3, 4])], budget=10)]
    [[1, 2], [3, 4]]
    """
    parts: list[bytes] = []
    size = 0
    for key, vals in items:
        entry = orjson.dumps(key) + b":" + orjson.dumps(vals)
        if len(entry) > budget and len(vals) > 1:
            half = len(vals) // 2
            yield from pack_keyed(head, ((key, vals[:half]), (key, vals[half:])), budget)
            continue
        if parts and size + len(entry) > budget:
            yield head + b"{" + b",".join(parts) + b"}}"
            parts, size = [], 0
        parts.append(entry)
        size += len(entry) + 1
    if parts:
        yield head + b"{" + b",".join(parts) + b"}}"


DIRTY_MAX = 512  # changed states a partition may hold between commits; beyond, written behind per batch


class TableStore:
    """The live :class:`streams.runner.Store`: a faust table (RocksDB + changelog) behind a
    write-behind cache.

    Live states stay in a bounded cache; a changed key is written to the table once per flush
    (before every offset commit and on rebalance, never ahead of the offsets), not once per batch,
    so a key busy in many batches costs one table write per flush (README "Measured": a table
    write ≈ 0.4–0.6 ms). A state whose step published a record is written only once the batch's
    records are delivered (:meth:`settle`), and a dropped key leaves the table then too: a crash in
    between makes the re-delivered input publish them again (the same ids: at-least-once), never
    lose a halt that was only in the producer's buffer while the store already said the episode
    was open.

    Each stored value carries the key's input offsets (``H{source: offset}\\n`` + the state), so
    input re-delivered after a crash or rebalance is not applied to a key twice.
    """

    CACHE_MAX = 2_000  # live states kept between flushes, beyond the dirty ones

    def __init__(self, stage: Any, table: Any, max_state_bytes: int = 0) -> None:
        self.stage = stage
        self.table = table
        self.max_state_bytes = max_state_bytes or STATE_BYTES
        self.part = 0  # the partition being processed (its keys' writes are routed to it)
        self.cache: dict[bytes, Any] = {}
        self.hw: dict[bytes, dict[str, int]] = {}  # key -> {input "topic/partition": highest offset}
        self.dirty: dict[int, dict[bytes, int]] = {}  # partition -> changed keys (least recent first) -> batch
        self.batch = 0  # batch counter: a key changed in this batch is not drained yet
        self.in_flight = False  # a batch is between its steps and its deliveries
        self.ctx: dict[int, Any] = {}  # partition -> an event of it: routes table writes at a flush
        self.held: dict[int, dict[bytes, None]] = {}  # partition -> keys written at settle (records in flight)
        self.dropped: dict[int, dict[bytes, None]] = {}  # partition -> keys deleted at settle

    def reset(self) -> None:
        for d in (self.cache, self.hw, self.dirty, self.ctx, self.held, self.dropped):
            d.clear()
        self.in_flight = False

    def __len__(self) -> int:
        """Live keys: stored or cached, not dropped (O(keys): for tests and reports)."""
        gone = set().union(*self.dropped.values()) if self.dropped else set()
        return len(set(self.table).union(self.cache).difference(gone))

    def get(self, key: bytes) -> Any | None:
        st = self.cache.get(key)
        if st is None:
            dropped = self.dropped.get(self.part)
            if dropped and key in dropped:
                return None
            raw = self.table.get(key)
            if raw is None:
                return None
            try:
                hw, raw = split_stored(raw)
                st = self.stage.load(raw)
            except Exception as exc:  # noqa: BLE001 - an unreadable value: the key starts afresh
                self.stage.resets += 1
                log.warning("%s: stored state of key #%s is unreadable (%s): reset", self.stage.name,
                            hashlib.sha256(key).hexdigest()[:12], type(exc).__name__)
                return None
            if hw:
                self.hw[key] = hw
            self.cache[key] = st
        return st

    def put(self, key: bytes, st: Any, emitted: bool = False) -> None:
        self.cache[key] = st
        dropped = self.dropped.get(self.part)
        if dropped:
            dropped.pop(key, None)
        held = self.held.get(self.part)
        if emitted:
            if held is None:
                held = self.held[self.part] = {}
            held[key] = None
            d = self.dirty.get(self.part)
            if d:
                d.pop(key, None)
        elif held is None or key not in held:
            d = self.dirty.get(self.part)
            if d is None:
                d = self.dirty[self.part] = {}
            elif key in d:
                del d[key]  # to the back: least recently changed first
            d[key] = self.batch

    def drop(self, key: bytes) -> None:
        self.cache.pop(key, None)
        self.hw.pop(key, None)
        held = self.held.get(self.part)
        if held:
            held.pop(key, None)
        d = self.dirty.get(self.part)
        if d:
            d.pop(key, None)
        self.dropped.setdefault(self.part, {})[key] = None

    def items(self) -> Iterator[tuple[bytes, Any | None]]:
        load = self.stage.load
        for key, value in self.table.items():
            try:
                st = load(split_stored(value)[1])
            except Exception:  # noqa: BLE001 - an unreadable value is evicted at the next sweep
                st = None
            yield key, st

    def settle(self, part: int) -> int:
        """After this batch's records are delivered: write the partition's states that emitted
        them, delete its dropped keys (called in the partition's event context). Returns the writes."""
        n = 0
        table = self.table
        for key in self.held.pop(part, ()):
            st = self.cache.get(key)
            if st is not None:
                table[key] = self.encode(key, st)
                n += 1
        for key in self.dropped.pop(part, ()):
            if key in table:
                del table[key]
        return n

    def encode(self, key: bytes, st: Any) -> bytes:
        """The stored value: ``H{source: offset}\\n`` (when the key has input offsets) + the state.

        A state over ``max_state_bytes`` is never written (its changelog record could outgrow the
        record budget and stop the worker): the key starts afresh, keeping the breakers it has in
        force so their releases still come, and the reset is counted and logged (key hash, size)."""
        hw = self.hw.get(key)
        raw = self.stage.dump(st)
        if len(raw) > self.max_state_bytes:
            st = self.reset_oversized(key, st, len(raw))
            raw = self.stage.dump(st)
        return b"H" + orjson.dumps(hw) + b"\n" + raw if hw else raw

    def reset_oversized(self, key: bytes, st: Any, size: int) -> Any:
        new = self.stage.new_state()
        new.ledger = st.ledger  # every stage's state has one: its commands' releases still come
        for attr in ("last_seen_ns",):
            if hasattr(st, attr) and hasattr(new, attr):
                setattr(new, attr, getattr(st, attr))
        self.cache[key] = new
        metrics.OVERSIZED_STATES.labels(stage=self.stage.name).inc()
        log.warning("%s: state of key #%s is %d bytes (max_state_bytes %d): reset", self.stage.name,
                    hashlib.sha256(key).hexdigest()[:12], size, self.max_state_bytes)
        return new

    def drain(self, part: int, keep: int) -> int:
        """Write behind in bounded chunks: while the partition holds more than ``keep`` changed
        states, write the least recently changed ones that no step of the current batch touched,
        so the commit's :meth:`flush` never has more than about ``keep`` per partition to write
        (no stop-the-world flush of thousands of states), while a key changed again and again
        between two commits is still written once. The written (coldest) states leave the cache:
        the table has them. Called in the partition's event context; returns the writes."""
        d = self.dirty.get(part)
        if not d or len(d) <= keep:
            return 0
        now, cache, table, encode = self.batch, self.cache, self.table, self.encode
        held = self.held.get(part) or ()
        budget = len(d) - keep
        done: list[bytes] = []
        for key, gen in d.items():
            if gen >= now or len(done) >= budget:
                break
            done.append(key)
        hw = self.hw
        for key in done:
            del d[key]
            st = cache.get(key)
            if st is not None and key not in held:
                table[key] = encode(key, st)
                del cache[key]  # the coldest keys: reloaded from the table if they come back
                hw.pop(key, None)
        return len(done)

    def flush(self) -> int:
        """Write every changed state to the table (and so to its changelog); returns the writes.

        A commit can run while a batch waits for its deliveries: the states that batch changed
        (its forwarded pre-aggregates may not be delivered yet) stay dirty until a later flush."""
        encode, table, n = self.encode, self.table, 0
        later: dict[int, dict[bytes, int]] = {}
        now = self.batch if self.in_flight else None
        for part, keys in self.dirty.items():
            ev = self.ctx.get(part)
            if ev is None or not keys:
                continue
            held = self.held.get(part) or ()
            token = _current_event.set(weakref.ref(ev))
            try:
                for key, gen in keys.items():
                    if now is not None and gen >= now:
                        later.setdefault(part, {})[key] = gen
                        continue
                    st = self.cache.get(key)
                    if st is not None and key not in held:
                        table[key] = encode(key, st)
                        n += 1
            finally:
                _current_event.reset(token)
        self.dirty = later
        if len(self.cache) > self.CACHE_MAX and not any(self.held.values()):
            self.cache.clear()  # all clean now: reloaded from the table on the next use
            self.hw.clear()
        return n


class KeyedStage:
    """One stage wired to faust: its repartition topic, its table, and the shared runner.

    The runner (:class:`streams.runner.KeyedRunner`, the one replay uses) steps the keys, fires
    timers, sweeps idle keys and enforces the key cap over a :class:`TableStore`. This class only
    does what is faust's: it reads the repartition messages (skipping input a key already applied),
    keeps each partition's clock (event time, plus the wall clock while a partition is quiet),
    publishes the outputs, forwards the session stage's pre-aggregates to the scope stage, and
    writes state behind.
    """

    def __init__(self, app: faust.App, stage: Any, topic: Any, table: Any, n_parts: int,
                 lateness_ns: int, idle_ns: int, publish: Any, batch_max: int = 2000,
                 batch_within_s: float = 0.05, max_keys: int = 0, max_state_bytes: int = STATE_BYTES,
                 policy: Policy | None = None) -> None:
        self.app = app
        self.batch_max = batch_max
        self.batch_within_s = batch_within_s
        self.stage = stage
        self.topic = topic
        self.n_parts = n_parts
        self.publish = publish
        self.store = TableStore(stage, table, max_state_bytes)
        if policy is not None:
            self.runner = runner_for(stage, policy, self.store, max_keys)
        else:
            self.runner = KeyedRunner(stage, self.store, idle_ns=idle_ns, max_keys=max_keys)
        self.clock = EventClock(lateness_ns, wall=time.time_ns)
        self.needs_scan = True
        self.forward_to: KeyedStage | None = None  # the route / tenant stage, for the session stage
        self._resets = 0

    @property
    def table(self) -> Any:
        return self.store.table

    @property
    def index(self) -> dict:
        return self.runner.index

    @property
    def heaps(self) -> dict:
        return self.runner.heaps

    def reset(self) -> None:
        self.store.reset()
        self.clock.wall_at.clear()  # a partition owned elsewhere meanwhile: no jump at its first tick
        self.needs_scan = True

    def flush(self) -> None:
        n = self.store.flush()
        if n:
            metrics.STATE_WRITES.labels(stage=self.stage.name).inc(n)

    def install(self) -> None:
        async def agent(stream: Any) -> None:
            async for events in stream.take_events(self.batch_max, within=self.batch_within_s):
                await self.process(events)

        agent.__name__ = f"detect_{self.stage.name}"
        self.app.agent(self.topic, name=f"detect-{self.stage.name}")(agent)

    def scan(self) -> None:
        """After a (re)assignment: learn every stored key, its last event time and its timer."""
        self.store.reset()
        n = self.n_parts
        resets = self.stage.resets  # a reset is counted when the key's state is loaded for use
        self.runner.rebuild(self.store.items(), lambda k: partition_for(k, n))
        self.stage.resets = resets
        self.report_keys()
        self.needs_scan = False

    def report_keys(self) -> None:
        """Tracked-keys gauges; the scope stage's keys by kind (``route:…`` / ``tenant:…``)."""
        if self.stage.name == "scope":
            n = {"route": 0, "tenant": 0}
            for od in self.runner.index.values():
                for k in od:
                    kind = k[:6]
                    if kind == b"route:":
                        n["route"] += 1
                    elif kind == b"tenant":
                        n["tenant"] += 1
            metrics.set_tracked_keys("route", n["route"])
            metrics.set_tracked_keys("tenant", n["tenant"])
        else:
            metrics.set_tracked_keys(self.stage.name, self.runner.tracked())

    async def process(self, events: list) -> None:
        t0 = time.perf_counter()
        if self.needs_scan:
            self.scan()
        self.store.batch += 1
        self.store.in_flight = True
        by_part: dict[int, list] = {}
        for ev in events:
            by_part.setdefault(ev.message.partition, []).append(ev)
        try:
            # faust routes table reads and writes (RocksDB db + changelog partition) by the
            # "current event"; a batch spans partitions, so make one of each current in turn
            futs: list = []
            for part, evs in by_part.items():
                self.store.ctx[part] = evs[-1]
                token = _current_event.set(weakref.ref(evs[-1]))
                try:
                    futs.extend(await self.process_partition(part, evs))
                finally:
                    _current_event.reset(token)
            for f in futs:
                await f  # every record of the batch delivered (one wait, not one per partition) …
            writes = 0
            for part, evs in by_part.items():  # … then the states that made them are written
                token = _current_event.set(weakref.ref(evs[-1]))
                try:
                    writes += self.store.settle(part) + self.store.drain(part, DIRTY_MAX)
                finally:
                    _current_event.reset(token)
            if writes:
                metrics.STATE_WRITES.labels(stage=self.stage.name).inc(writes)
            self.store.in_flight = False
        except BaseException:
            # the batch's records may not all be delivered: forget what it changed in memory
            # (held and dropped keys, cached states, input offsets) and start again from the
            # table, which holds only what was written after its records were delivered
            self.reset()
            raise
        metrics.BATCH_SECONDS.labels(stage=self.stage.name).observe(time.perf_counter() - t0)
        self.report_keys()

    async def forward(self, outs: list, hi: int) -> list:
        """Send the route / tenant pre-aggregates among ``outs`` to the scope stage: one message
        per scope partition (``{key: aggregates}``, merged downstream). Returns the delivery
        futures: the session states that made them are written only once they are delivered, so a
        crash re-sends them rather than losing them."""
        fwd = self.forward_to
        by_fwd_part: dict[int, dict[str, list]] = {}
        for o in outs:
            if o.kind == "forward":
                key = o.key.decode()
                keyed = by_fwd_part.setdefault(partition_for(o.key, fwd.n_parts), {})
                got = keyed.get(key)
                if got is None:
                    keyed[key] = [o.payload]
                else:
                    got.append(o.payload)
        futs = []
        head = b'{"hi":%d,"by_key":' % hi
        for fpart, keyed in by_fwd_part.items():
            for value in pack_keyed(head, keyed.items()):
                futs.append(await fwd.topic.send(key=None, value=value, partition=fpart))
        return futs

    def read(self, evs: list, hi: int) -> tuple[dict[bytes, list], int, bool, int]:
        """A partition's messages → ``{key: items}`` in arrival order, the highest event time, whether
        a wall tick came, and how many re-delivered spans were skipped."""
        groups: dict[bytes, list] = {}
        dups = 0
        ticked = False
        store = self.store
        scope = getattr(self.stage, "step_key", None) is not None
        from_wire = Span.from_wire
        for ev in evs:
            if not ev.value:
                ticked = True
                continue
            msg = orjson.loads(ev.value)
            if scope:  # pre-aggregates from the session stage
                hi = max(hi, int(msg["hi"]))
                if "by_key" in msg:
                    for k, aggs in msg["by_key"].items():
                        groups.setdefault(k.encode(), []).extend(aggs)
                else:  # one key per message (written by an older worker)
                    groups.setdefault(ev.key, []).extend(msg["aggs"])
                continue
            if isinstance(msg, dict) and "keyed" in msg:
                # {key: [[input source, input offset, [wire span, …]], …]}: skip what a key has
                # already applied from that source (re-delivered input)
                for k, entries in msg["keyed"].items():
                    bk = k.encode()
                    store.get(bk)  # loads the key's input offsets with its state
                    khw = store.hw.get(bk)
                    if khw is None:
                        khw = store.hw[bk] = {}
                    got = groups.get(bk)
                    if got is None:
                        got = groups[bk] = []
                    for src, off, wires in entries:
                        if off <= khw.get(src, -1):
                            dups += len(wires)
                            continue
                        khw[src] = off
                        for w in wires:
                            s_ = from_wire(w)
                            if s_.end_ns > hi:
                                hi = s_.end_ns
                            got.append(s_)
                    if not got:
                        del groups[bk]
                continue
            # {key: [wire span, …]} per partition; a bare array is one key's (an older worker's)
            for k, wires in (msg["keys"].items() if isinstance(msg, dict) else ((ev.key, msg),)):
                spans = [from_wire(w) for w in wires]
                for s in spans:
                    if s.end_ns > hi:
                        hi = s.end_ns
                bk = k.encode() if isinstance(k, str) else k
                got = groups.get(bk)
                if got is None:
                    groups[bk] = spans
                else:
                    got.extend(spans)
        return groups, hi, ticked, dups

    async def process_partition(self, part: int, evs: list) -> list:
        """Step one partition's messages; send what they made. Returns the delivery futures."""
        stage, runner = self.stage, self.runner
        groups, hi, ticked, dups = self.read(evs, self.clock.high(part))
        if groups:
            metrics.STAGE_SPANS.labels(stage=stage.name).inc(sum(len(v) for v in groups.values()))
        if dups:
            metrics.DUPLICATE_SPANS.labels(stage=stage.name).inc(dups)
        wm = self.clock.observe(part, hi, ticked)
        new0, ev0 = runner.new_keys, runner.evicted
        resent0 = getattr(stage, "duplicates", 0)
        unpriced0 = getattr(stage, "unpriced", 0)
        bad0 = sum(BAD_VALUES.values())
        self.store.part = part
        outs = runner.feed(part, groups, wm)
        outs.extend(runner.fire(part, wm))
        futs = (await self.publish(outs) or []) if outs else []
        if self.forward_to is not None:
            futs.extend(await self.forward(outs, hi))
        if runner.new_keys != new0:
            metrics.NEW_KEYS.labels(stage=stage.name).inc(runner.new_keys - new0)
        if runner.evicted != ev0:
            metrics.EVICTIONS.labels(scope=stage.name).inc(runner.evicted - ev0)
        resent = getattr(stage, "duplicates", 0) - resent0
        if resent:
            metrics.RESENT_SPANS.labels(stage=stage.name).inc(resent)
        unpriced = getattr(stage, "unpriced", 0) - unpriced0
        if unpriced:
            metrics.UNPRICED_SPANS.inc(unpriced)
        if stage.resets != self._resets:
            metrics.STATE_RESETS.labels(stage=stage.name).inc(stage.resets - self._resets)
            self._resets = stage.resets
        if sum(BAD_VALUES.values()) != bad0:
            _export_bad_values()
        return futs


async def ensure_topics(settings: Settings, timeout_s: float = 30.0) -> None:
    """Create every topic of :func:`topic_specs` (existing ones are left alone)."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import TopicAlreadyExistsError

    admin = AIOKafkaAdminClient(**settings.kafka_client_kwargs(), request_timeout_ms=int(timeout_s * 1000))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        new = [
            NewTopic(name, n, settings.replication_factor, topic_configs=cfg)
            for name, n, cfg in topic_specs(settings)
            if name not in existing
        ]
        if new:
            try:
                await admin.create_topics(new)
            except TopicAlreadyExistsError:
                pass
    finally:
        await admin.close()


WORKER_GC_YOUNG = 50_000


def run_worker(settings: Settings, policy: Policy) -> None:
    """Create topics, then run the faust worker until SIGINT/SIGTERM."""
    from faust.worker import Worker

    asyncio.run(ensure_topics(settings))
    bw = create_app(settings, policy)
    # what start-up allocated (modules, the app) is never garbage: keep the collector off it, and
    # run its young generation every WORKER_GC_YOUNG allocations instead of 700 (as replay does):
    # a batch allocates thousands of short-lived objects per span it decodes
    gc.freeze()
    gc.set_threshold(WORKER_GC_YOUNG, *gc.get_threshold()[1:])
    Worker(bw.app, loglevel=settings.log_level, quiet=True).execute_from_commandline()
