"""faust wiring: topics declared once, two agents, one table. No detection logic lives here.

Data flow (SPEC §2)::

    agent.spans ─┐                         ┌─► agent.incidents
                 ├─► ingest ─► <app>.spans-by-session ─► detect ─┤
    otlp_spans  ─┘     │        (keyed by session)      (table)  └─► agent.breaker (compacted)
                       └─► agent.spans.dlq

* ``ingest`` decodes a batch of Kafka messages (each carrying many spans), groups the spans by
  session and sends **one** message per session per batch to the repartition topic; bad input goes
  to the DLQ with reason headers.
* ``detect`` takes a batch of repartitioned messages, and for every session in it loads the state
  once, runs :class:`streams.pipeline.SessionPipeline`, and stores the state once (RocksDB +
  changelog). So faust's per-event and per-table-write costs are paid per (session, batch), never
  per span (SPEC §9).
* Offsets are committed by faust only after the producer has flushed what the batch sent
  (at-least-once); incident and command ids are deterministic, so a replayed batch re-publishes the
  same records and consumers de-duplicate by key.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import faust
import orjson
from aiokafka.partitioner import murmur2
from faust.streams import _current_event

from streams import metrics, semconv
from streams.ingest import Limits, decode
from streams.models import Span
from streams.pipeline import SessionPipeline
from streams.policy import Policy
from streams.settings import Settings

log = logging.getLogger("breakwater")

TABLE_NAME = "sessions"


def topic_specs(settings: Settings) -> list[tuple[str, int, dict[str, str]]]:
    """Every topic the worker needs, with partitions and configs, created before faust starts.

    Creating them up front matters: a broker that auto-creates topics on first metadata request
    would otherwise pick its own partition count, and the session table's changelog must have as
    many partitions as the repartition topic.
    """
    n = settings.partitions
    return [
        (settings.topic_spans, n, {}),
        (settings.topic_otlp, n, {}),
        (settings.topic_incidents, n, {}),
        (settings.topic_breaker, n, {"cleanup.policy": "compact"}),
        (settings.topic_dlq, n, {}),
        (settings.repartition_topic, n, {}),
        (f"{settings.app_id}-{TABLE_NAME}-changelog", n, {"cleanup.policy": "compact"}),
    ]


def _credentials(settings: Settings) -> Any:
    kw = settings.kafka_client_kwargs()
    if settings.security_protocol == "PLAINTEXT":
        return None
    if settings.security_protocol.startswith("SASL"):
        return faust.SASLCredentials(
            username=settings.sasl_username,
            password=settings.sasl_password.get_secret_value() if settings.sasl_password else None,
            mechanism=settings.sasl_mechanism,
            ssl_context=kw.get("ssl_context"),
        )
    return faust.SSLCredentials(kw["ssl_context"])


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
        web_enabled=False,
        producer_acks=-1,
        producer_linger=0.005,
        logging_config=None,
    )
    raw = {"key_type": bytes, "value_type": bytes, "key_serializer": "raw", "value_serializer": "raw"}
    inputs = app.topic(settings.topic_spans, settings.topic_otlp, **raw)
    by_session = app.topic(settings.repartition_topic, partitions=settings.partitions, **raw)
    incidents = app.topic(settings.topic_incidents, **raw)
    breaker = app.topic(settings.topic_breaker, **raw)
    dlq = app.topic(settings.topic_dlq, **raw)
    table = app.Table(TABLE_NAME, default=None, key_type=bytes, value_type=bytes,
                      partitions=settings.partitions)
    limits = Limits(max_message_bytes=settings.max_message_bytes)
    pipe = SessionPipeline(policy)
    lateness_ns = policy.allowed_lateness_ns
    ttl_ns = int(max([policy.loop_policy(None).session_ttl_s]
                     + [policy.loop_policy(t).session_ttl_s for t in policy.spec.tenants]) * 1e9)
    n_parts = settings.partitions

    # per partition: max event time seen, and sessions in order of last update (for TTL eviction)
    max_event: dict[int, int] = {}
    index: dict[int, OrderedDict[bytes, int]] = {}
    needs_scan = {"flag": True}

    @app.on_partitions_revoked.connect
    async def _on_revoked(app_: Any, revoked: Any, **_: Any) -> None:  # noqa: ARG001
        index.clear()
        needs_scan["flag"] = True

    @app.on_partitions_assigned.connect
    async def _on_assigned(app_: Any, assigned: Any, **_: Any) -> None:  # noqa: ARG001
        needs_scan["flag"] = True

    def rebuild_index() -> None:
        """After a (re)assignment, learn every stored session so TTL eviction covers it too."""
        index.clear()
        found = 0
        for key, value in table.items():
            try:
                last = orjson.loads(value)["last_seen_ns"]
            except Exception:  # a corrupt value is evicted at once
                last = 0
            index.setdefault(partition_for(key, n_parts), OrderedDict())[key] = last
            found += 1
        for od in index.values():  # oldest first, so eviction pops from the front
            for k, _ in sorted(od.items(), key=lambda kv: kv[1]):
                od.move_to_end(k)
        metrics.TRACKED_KEYS.labels(scope="session").set(found)
        needs_scan["flag"] = False

    async def send_dlq(ev: Any, rejections: list) -> None:
        first = rejections[0]
        detail = "; ".join(
            (f"span {r.index}: " if r.index is not None else "") + r.detail for r in rejections[:20]
        )[:1000]
        msg = ev.message
        await dlq.send(
            key=ev.key,
            value=ev.value if ev.value is not None else b"",
            headers=[
                ("error.reason", first.reason.encode()),
                ("error.detail", detail.encode()),
                ("error.count", str(len(rejections)).encode()),
                ("source.topic", msg.topic.encode()),
                ("source.partition", str(msg.partition).encode()),
                ("source.offset", str(msg.offset).encode()),
            ],
        )

    @app.agent(inputs, name="ingest")
    async def ingest(stream: Any) -> None:
        async for events in stream.take_events(settings.batch_max, within=settings.batch_within_s):
            t0 = time.perf_counter()
            groups: dict[str, list] = {}
            for ev in events:
                try:
                    d = decode(ev.value or b"", limits=limits)
                except Exception as exc:  # decode never raises (fuzzed); this is the last guard
                    log.error("ingest: decoder failed on %s[%d]@%d: %s", ev.message.topic,
                              ev.message.partition, ev.message.offset, type(exc).__name__)
                    from streams.models import Rejection

                    d_rej = [Rejection("internal_error", type(exc).__name__)]
                    metrics.REJECTIONS.labels(reason="internal_error").inc()
                    await send_dlq(ev, d_rej)
                    continue
                if d.rejections:
                    for r in d.rejections:
                        metrics.REJECTIONS.labels(reason=r.reason).inc()
                    await send_dlq(ev, d.rejections)
                if d.spans:
                    metrics.SPANS_IN.labels(format=d.format).inc(len(d.spans))
                    for s in d.spans:
                        groups.setdefault(semconv.session_of(s), []).append(s.to_wire())
            for session, wires in groups.items():
                await by_session.send(key=session.encode(), value=orjson.dumps(wires))
            metrics.BATCH_SECONDS.labels(stage="ingest").observe(time.perf_counter() - t0)

    @app.agent(by_session, name="detect")
    async def detect(stream: Any) -> None:
        async for events in stream.take_events(settings.batch_max, within=settings.batch_within_s):
            t0 = time.perf_counter()
            if needs_scan["flag"]:
                rebuild_index()
            by_part: dict[int, list] = {}
            for ev in events:
                by_part.setdefault(ev.message.partition, []).append(ev)
            token = None
            try:
                for part, evs in by_part.items():
                    # faust routes table writes (RocksDB db + changelog partition) by the "current
                    # event"; a batch spans partitions, so make one of this partition current.
                    token = _current_event.set(weakref.ref(evs[-1]))
                    await process_partition(part, evs)
                    _current_event.reset(token)
                    token = None
            finally:
                if token is not None:
                    _current_event.reset(token)
            metrics.BATCH_SECONDS.labels(stage="detect").observe(time.perf_counter() - t0)

    async def process_partition(part: int, evs: list) -> None:
        sessions: dict[bytes, list[Span]] = {}
        hi = max_event.get(part, 0)
        for ev in evs:
            spans = [Span.from_wire(w) for w in orjson.loads(ev.value)]
            for s in spans:
                if s.end_ns > hi:
                    hi = s.end_ns
            sessions.setdefault(ev.key, []).extend(spans)
        max_event[part] = hi
        wm = hi - lateness_ns
        idx = index.setdefault(part, OrderedDict())
        now = time.time()
        for key, spans in sessions.items():
            raw = table.get(key)
            st = pipe.load(raw) if raw else pipe.new_state()
            st, outs = pipe.step(st, spans, wm)
            table[key] = pipe.dump(st)
            idx[key] = st.last_seen_ns
            idx.move_to_end(key)
            for o in outs:
                if o.kind == "incident":
                    await incidents.send(key=o.key, value=o.value)
                    metrics.INCIDENTS.labels(detector=o.detector, status=o.status).inc()
                    metrics.DETECTION_LATENCY.observe(max(0.0, now - o.detected_at_ns / 1e9))
                else:
                    await breaker.send(key=o.key, value=o.value)
                    mode = "shadow" if b'"mode":"shadow"' in o.value else "enforce"
                    metrics.COMMANDS.labels(action=o.status, mode=mode).inc()
        # TTL eviction on event time: oldest-updated sessions sit at the front
        evicted = 0
        while idx:
            key, last = next(iter(idx.items()))
            if last + ttl_ns >= wm:
                break
            idx.popitem(last=False)
            if table.get(key) is not None:
                del table[key]
            evicted += 1
        if evicted:
            metrics.EVICTIONS.labels(scope="session").inc(evicted)
        metrics.TRACKED_KEYS.labels(scope="session").set(sum(len(v) for v in index.values()))

    return Breakwater(app=app, settings=settings, policy=policy)


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


def run_worker(settings: Settings, policy: Policy) -> None:
    """Create topics, then run the faust worker until SIGINT/SIGTERM."""
    from faust.worker import Worker

    asyncio.run(ensure_topics(settings))
    bw = create_app(settings, policy)
    Worker(bw.app, loglevel=settings.log_level, quiet=True).execute_from_commandline()
