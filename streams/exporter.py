"""The producer side: an OpenTelemetry SDK :class:`KafkaSpanExporter` that publishes to ``agent.spans``.

An agent instrumented with the OpenTelemetry SDK adds one span processor and its spans reach
Breakwater as flat JSON (README "What producers send"), one JSON array per session per batch, keyed by session::

    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from streams.exporter import KafkaSpanExporter

    provider = TracerProvider(resource=Resource.create({"service.name": "support-agent", "tenant.id": "acme"}))
    provider.add_span_processor(BatchSpanProcessor(KafkaSpanExporter(Settings()), schedule_delay_millis=500))

The agent is never blocked by Kafka: :meth:`KafkaSpanExporter.export` only appends the finished
spans to a bounded in-memory buffer and returns ``SUCCESS``; a background thread running its own
event loop converts them, groups them by session and sends them with an aiokafka producer. When
Kafka is down or slower than the agent, the buffer fills up and the **oldest** spans are dropped
first (``drop="oldest"``, the default: the newest spans describe what the agent is doing now, which
is what a breaker needs), or incoming spans are refused (``drop="newest"``). Every span is
counted exactly once: ``sent``, ``dropped`` (buffer overflow, a failed send after the producer's
own retries, a span larger than a message, or still buffered at shutdown) or still ``buffered``;
``errors`` counts failed connects and failed sends.

Privacy (``redact=True``, the default): the exporter applies Breakwater's ingest rule before a
span leaves the process: ``gen_ai.tool.call.arguments`` becomes ``tool.payload_hash`` (the same
hash ingest computes, so loop fingerprints do not change) and raw prompts, completions and tool
results are dropped.

>>> exp = KafkaSpanExporter("127.0.0.1:9", max_buffer_spans=2, connect=False)
>>> exp.export([object(), object(), object()]).name       # never blocks; the oldest one is dropped
'SUCCESS'
>>> exp.stats.dropped, exp.stats.buffered
(1, 2)
>>> exp.shutdown(); exp.stats.dropped                      # what never left counts as dropped
3
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from streams.semconv import SESSION_KEYS, canonical_hash, is_sensitive
from streams.settings import kafka_client_kwargs

if TYPE_CHECKING:  # pragma: no cover
    from opentelemetry.sdk.trace import ReadableSpan

    from streams.settings import Settings

__all__ = ["ExporterStats", "KafkaSpanExporter", "flat_span", "session_key"]

log = logging.getLogger("breakwater.exporter")

ARGS_KEY = "gen_ai.tool.call.arguments"
HASH_KEY = "tool.payload_hash"


_SAFE: set[str] = set()  # attribute keys known not to carry content (bounded)
_SAFE_MAX = 10_000


def _scrub(a: dict[str, Any], hash_args: bool) -> dict[str, Any]:
    """Breakwater's ingest privacy rule at the source (``a`` is ours: a fresh copy)."""
    drop = None
    for k in a.keys() - _SAFE:
        if is_sensitive(k):
            if drop is None:
                drop = [k]
            else:
                drop.append(k)
        elif len(_SAFE) < _SAFE_MAX:
            _SAFE.add(k)
    if drop:
        if hash_args and ARGS_KEY in a and HASH_KEY not in a:
            a[HASH_KEY] = canonical_hash(a[ARGS_KEY])
        for k in drop:
            del a[k]
    return a


def _copy(attrs: Any) -> dict[str, Any]:
    if not attrs:
        return {}
    copy = getattr(attrs, "copy", None)  # BoundedAttributes.copy() skips the per-item lock
    out = copy() if copy is not None else dict(attrs)
    return out if type(out) is dict else dict(out)


_RESOURCES: dict[tuple[int, bool], tuple[Any, dict[str, Any]]] = {}  # a provider has one resource


def _resource(resource: Any, redact: bool) -> dict[str, Any]:
    if resource is None:
        return {}
    key = (id(resource), redact)
    hit = _RESOURCES.get(key)
    if hit is not None and hit[0] is resource:
        return hit[1]
    d = _copy(resource.attributes)
    if redact:
        d = _scrub(d, False)
    if len(_RESOURCES) >= 64:
        _RESOURCES.clear()
    _RESOURCES[key] = (resource, d)
    return d


def flat_span(span: ReadableSpan, *, redact: bool = True) -> dict[str, Any]:
    """A finished SDK span as Breakwater's flat JSON object (README "What producers send", OTel's own field names).

    >>> from opentelemetry.sdk.trace import TracerProvider
    >>> from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    >>> from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    >>> mem = InMemorySpanExporter(); provider = TracerProvider()
    >>> provider.add_span_processor(SimpleSpanProcessor(mem))
    >>> tracer = provider.get_tracer("doc")
    >>> with tracer.start_as_current_span("invoke_agent"):
    ...     with tracer.start_as_current_span("execute_tool search", attributes={
    ...             "gen_ai.tool.name": "search", "gen_ai.tool.call.arguments": '{"q": 1}'}):
    ...         pass
    >>> tool, root = mem.get_finished_spans()
    >>> d = flat_span(tool)
    >>> d["name"], d["kind"], d["status"], len(d["trace_id"]), d["parent_span_id"] == flat_span(root)["span_id"]
    ('execute_tool search', 'INTERNAL', {'code': 'UNSET', 'message': None}, 32, True)
    >>> "gen_ai.tool.call.arguments" in d["attributes"], d["attributes"]["tool.payload_hash"] == canonical_hash({"q": 1})
    (False, True)
    >>> flat_span(tool, redact=False)["attributes"]["gen_ai.tool.call.arguments"]
    '{"q": 1}'
    """
    ctx = span.get_span_context()
    parent = span.parent
    attrs = _copy(span.attributes)
    if redact:
        attrs = _scrub(attrs, True)
    events = []
    for ev in span.events or ():
        ea = _copy(ev.attributes)
        events.append({"name": ev.name, "time_unix_nano": ev.timestamp,
                       "attributes": _scrub(ea, False) if redact else ea})
    return {
        "trace_id": f"{ctx.trace_id:032x}",
        "span_id": f"{ctx.span_id:016x}",
        "parent_span_id": f"{parent.span_id:016x}" if parent is not None else None,
        "name": span.name,
        "kind": span.kind.name,
        "start_time_unix_nano": span.start_time,
        "end_time_unix_nano": span.end_time,
        "status": {"code": span.status.status_code.name, "message": span.status.description},
        "attributes": attrs,
        "resource": _resource(span.resource, redact),
        "events": events,
    }


def session_key(d: dict[str, Any]) -> str:
    """The Kafka key of a flat span: its session (span, then resource attributes), else its trace id.

    >>> session_key({"trace_id": "ab" * 16, "attributes": {"session.id": "s1"}, "resource": {}})
    's1'
    >>> session_key({"trace_id": "ab" * 16, "attributes": {}, "resource": {}})
    'abababababababababababababababab'
    """
    for where in (d.get("attributes") or {}, d.get("resource") or {}):
        for k in SESSION_KEYS:
            v = where.get(k)
            if v is not None and v != "":
                return str(v)
    return str(d["trace_id"])


@dataclass
class ExporterStats:
    """Counters of one exporter (spans, except ``errors`` and ``messages``).

    >>> ExporterStats()
    ExporterStats(enqueued=0, sent=0, dropped=0, buffered=0, messages=0, errors=0)
    """

    enqueued: int = 0
    sent: int = 0
    dropped: int = 0
    buffered: int = 0
    messages: int = 0
    errors: int = 0


class KafkaSpanExporter(SpanExporter):
    """Publishes finished spans to ``agent.spans`` (flat JSON arrays keyed by session), never blocking.

    ``source``: a :class:`~streams.settings.Settings` (broker, security options, ``topic_spans``)
    or a bootstrap string. ``max_buffer_spans`` bounds the memory; ``drop`` says which spans go
    when it is full (``oldest`` or ``newest``); a message holds at most ``max_batch_spans`` spans
    and ``max_message_bytes`` bytes; ``send_timeout_s`` bounds one send including the producer's
    retries; ``linger_s`` lets spans of one session gather into one message. ``connect=False``
    buffers only (tests, doctests). Extra keyword arguments go to ``AIOKafkaProducer``.

    >>> exp = KafkaSpanExporter("kafka://127.0.0.1:9", topic="agent.spans", connect=False)
    >>> exp.topic, exp.force_flush(timeout_millis=10)
    ('agent.spans', True)
    >>> exp.shutdown()
    >>> exp.export([]).name
    'FAILURE'
    """

    def __init__(self, source: Settings | str, *, topic: str | None = None, max_buffer_spans: int = 20_000,
                 drop: str = "oldest", max_batch_spans: int = 1000, max_message_bytes: int = 900_000,
                 linger_s: float = 0.02, send_timeout_s: float = 10.0, shutdown_timeout_s: float = 5.0,
                 redact: bool = True, compression_type: str | None = None, client_id: str = "breakwater-exporter",
                 connect: bool = True, **producer_kwargs: Any) -> None:
        if drop not in ("oldest", "newest"):
            raise ValueError(f"drop must be 'oldest' or 'newest', got {drop!r}")
        if max_buffer_spans < 1 or max_batch_spans < 1:
            raise ValueError("max_buffer_spans and max_batch_spans must be >= 1")
        if isinstance(source, str):
            self._kafka: dict[str, Any] = kafka_client_kwargs(source)
            self.topic = topic or "agent.spans"
        else:
            self._kafka = kafka_client_kwargs(source)
            self.topic = topic or source.topic_spans
        self._kafka.update(
            client_id=client_id, acks=1, linger_ms=5, compression_type=compression_type,
            request_timeout_ms=max(1000, int(send_timeout_s * 1000)),
            max_request_size=max(1_048_576, max_message_bytes + 65_536),
        )
        self._kafka.update(producer_kwargs)
        self.max_buffer_spans = max_buffer_spans
        self.drop = drop
        self.max_batch_spans = max_batch_spans
        self.max_message_bytes = max_message_bytes
        self.linger_s = linger_s
        self.shutdown_timeout_s = shutdown_timeout_s
        self.redact = redact
        self.last_error: str | None = None
        self._buf: collections.deque[Any] = collections.deque()
        self._lock = threading.Lock()
        self._stats = ExporterStats()
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._producer: Any = None
        self._inflight: set[asyncio.Future[Any]] = set()
        self._send_lock: asyncio.Lock | None = None
        if connect:
            started = threading.Event()
            self._thread = threading.Thread(target=self._thread_main, args=(started,),
                                            name="breakwater-span-exporter", daemon=True)
            self._thread.start()
            started.wait()

    # ------------------------------------------------------------------------------ agent side

    @property
    def stats(self) -> ExporterStats:
        """A consistent snapshot of the counters.

        >>> KafkaSpanExporter("127.0.0.1:1", connect=False).stats.sent
        0
        """
        with self._lock:
            s = self._stats
            return ExporterStats(s.enqueued, s.sent, s.dropped, len(self._buf), s.messages, s.errors)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        """Enqueue finished spans and return at once (``FAILURE`` only after :meth:`shutdown`).

        >>> exp = KafkaSpanExporter("127.0.0.1:1", connect=False)
        >>> exp.export([]).name, exp.stats.enqueued
        ('SUCCESS', 0)
        """
        if self._closed:
            return SpanExportResult.FAILURE
        n = len(spans)
        if n == 0:
            return SpanExportResult.SUCCESS
        with self._lock:
            buf = self._buf
            was_empty = not buf
            self._stats.enqueued += n
            room = self.max_buffer_spans - len(buf)
            if n <= room:
                buf.extend(spans)
            elif self.drop == "newest":
                if room > 0:
                    buf.extend(spans[:room])
                self._stats.dropped += n - max(room, 0)
            else:
                over = n - room
                if over >= len(buf):  # the batch alone fills the buffer
                    self._stats.dropped += len(buf) + (n - self.max_buffer_spans)
                    buf.clear()
                    buf.extend(spans[n - self.max_buffer_spans:])
                else:
                    for _ in range(over):
                        buf.popleft()
                    self._stats.dropped += over
                    buf.extend(spans)
        if was_empty:
            self._signal()
        return SpanExportResult.SUCCESS

    def _signal(self) -> None:
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(wake.set)

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        """Send everything buffered now and wait for the broker's acks; False on timeout.

        >>> exp = KafkaSpanExporter("127.0.0.1:1", send_timeout_s=1)   # nothing listens there
        >>> _ = exp.export([object()])
        >>> exp.force_flush(timeout_millis=200)
        False
        >>> exp.shutdown(timeout_s=0.2)
        """
        loop = self._loop
        if loop is None or self._closed or self._thread is None:
            return not self._buf
        fut = asyncio.run_coroutine_threadsafe(self._flush(), loop)
        try:
            fut.result(timeout_millis / 1000)
            return True
        except Exception:  # noqa: BLE001 - timeout or a failed send: not flushed
            fut.cancel()
            return False

    def shutdown(self, timeout_s: float | None = None) -> None:
        """Flush (at most ``timeout_s``, default ``shutdown_timeout_s``), stop the producer and the
        thread. Spans still buffered then are counted as dropped. Idempotent.

        >>> exp = KafkaSpanExporter("127.0.0.1:1", connect=False)
        >>> exp.shutdown(); exp.shutdown()
        """
        if self._closed:
            return
        timeout = self.shutdown_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout
        if self._thread is not None and self._buf:
            self.force_flush(int(timeout * 1000))
        self._closed = True
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(lambda: None)
            thread.join(max(0.5, deadline - time.monotonic() + 1.0))
        with self._lock:
            self._stats.dropped += len(self._buf)
            self._buf.clear()

    # ------------------------------------------------------------------------------ sender thread

    def _thread_main(self, started: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._wake = asyncio.Event()
        self._send_lock = asyncio.Lock()
        self._loop = loop
        started.set()
        try:
            loop.run_until_complete(self._main())
        finally:
            with contextlib.suppress(Exception):
                pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
                for t in pending:
                    t.cancel()
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()

    def _error(self, what: str, exc: BaseException) -> None:
        self.last_error = f"{what}: {type(exc).__name__}: {exc}"
        with self._lock:
            self._stats.errors += 1
        log.warning("breakwater exporter: %s", self.last_error)

    async def _main(self) -> None:
        from aiokafka import AIOKafkaProducer

        backoff = 0.2
        while not self._closed:
            producer = AIOKafkaProducer(**self._kafka)
            try:
                await producer.start()
            except Exception as exc:  # noqa: BLE001 - Kafka down: keep buffering (and dropping), retry
                self._error("connect", exc)
                with contextlib.suppress(Exception):
                    await producer.stop()
                await self._sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = 0.2
            self._producer = producer
            try:
                await self._pump()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001
                self._error("send", exc)
            finally:
                self._producer = None
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(producer.stop(), timeout=self.shutdown_timeout_s)

    async def _sleep(self, s: float) -> None:
        end = time.monotonic() + s
        while not self._closed and time.monotonic() < end:
            await asyncio.sleep(min(0.05, s))

    async def _pump(self) -> None:
        assert self._wake is not None
        while not self._closed:
            if not self._buf:
                self._wake.clear()
                if not self._buf:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), timeout=0.2)
                    continue
                if self.linger_s > 0:
                    await asyncio.sleep(self.linger_s)
            await self._send_some()

    def _take(self, n: int) -> list[Any]:
        with self._lock:
            buf = self._buf
            k = min(n, len(buf))
            return [buf.popleft() for _ in range(k)]

    async def _send_some(self) -> int:
        assert self._send_lock is not None
        async with self._send_lock:
            spans = self._take(self.max_batch_spans)
            if not spans:
                return 0
            by_key: dict[str, list[bytes]] = {}
            bad = 0
            for sp in spans:
                try:
                    d = flat_span(sp, redact=self.redact)
                    by_key.setdefault(session_key(d), []).append(orjson.dumps(d, option=orjson.OPT_NON_STR_KEYS))
                except Exception:  # noqa: BLE001 - a span we cannot encode is dropped, counted
                    bad += 1
            if bad:
                with self._lock:
                    self._stats.dropped += bad
            producer = self._producer
            for key, parts in by_key.items():
                for value, n in self._chunks(parts):
                    try:
                        fut = await producer.send(self.topic, value, key=key.encode())
                    except Exception as exc:  # noqa: BLE001 - e.g. no metadata within the timeout
                        self._error("send", exc)
                        with self._lock:
                            self._stats.dropped += n
                        continue
                    self._inflight.add(fut)
                    fut.add_done_callback(lambda f, n=n: self._done(f, n))
            return len(spans)

    def _chunks(self, parts: list[bytes]) -> list[tuple[bytes, int]]:
        out: list[tuple[bytes, int]] = []
        cur: list[bytes] = []
        size = 2
        for p in parts:
            if len(p) + 2 > self.max_message_bytes:
                with self._lock:
                    self._stats.dropped += 1
                log.warning("breakwater exporter: dropped a span of %d bytes (max_message_bytes %d)",
                            len(p), self.max_message_bytes)
                continue
            if cur and size + len(p) + 1 > self.max_message_bytes:
                out.append((b"[" + b",".join(cur) + b"]", len(cur)))
                cur, size = [], 2
            cur.append(p)
            size += len(p) + 1
        if cur:
            out.append((b"[" + b",".join(cur) + b"]", len(cur)))
        return out

    def _done(self, fut: asyncio.Future[Any], n: int) -> None:
        self._inflight.discard(fut)
        exc = None if fut.cancelled() else fut.exception()
        if fut.cancelled() or exc is not None:
            if exc is not None:
                self._error("send", exc)
            with self._lock:
                self._stats.dropped += n
        else:
            with self._lock:
                self._stats.sent += n
                self._stats.messages += 1

    async def _flush(self) -> None:
        while self._producer is None:  # not connected (yet): wait for it, within the caller's timeout
            await asyncio.sleep(0.05)
        while self._buf:
            await self._send_some()
        assert self._send_lock is not None
        async with self._send_lock:  # a send already under way (the linger loop's) has added its futures
            pass
        if self._inflight:
            await asyncio.gather(*list(self._inflight), return_exceptions=True)
