"""The OpenTelemetry SDK span exporter: buffering and drop counts, the flat JSON it publishes, an
unreachable broker, and an instrumented agent loop that Breakwater halts (real worker)."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid

import orjson
import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.trace import Status, StatusCode

from streams.broker import create_topics, free_port
from streams.exporter import KafkaSpanExporter
from streams.gateway import BreakerClient
from streams.ingest import decode
from streams.semconv import canonical_hash
from tests.kafka import collect


def provider_with(exporter, *, batch=True, tenant="acme") -> TracerProvider:
    provider = TracerProvider(resource=Resource.create({"service.name": "test-agent", "tenant.id": tenant}))
    proc = BatchSpanProcessor(exporter, schedule_delay_millis=100) if batch else SimpleSpanProcessor(exporter)
    provider.add_span_processor(proc)
    return provider


def tool_call(tracer, session: str, tool: str = "search", args: str = '{"q": "order 42"}', fail=False) -> None:
    with tracer.start_as_current_span(f"execute_tool {tool}", attributes={
        "gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": tool,
        "gen_ai.tool.call.arguments": args, "gen_ai.conversation.id": session,
    }) as sp:
        sp.add_event("tool.start", {"attempt": 1, "gen_ai.prompt": "secret prompt"})
        if fail:
            sp.set_status(Status(StatusCode.ERROR, "boom"))


# ----------------------------------------------------------------------------- no broker


@pytest.mark.parametrize("drop,kept", [("oldest", [7, 8, 9]), ("newest", [0, 1, 2])])
def test_bounded_buffer_drop_policy(drop, kept):
    exp = KafkaSpanExporter("127.0.0.1:9", max_buffer_spans=3, drop=drop, connect=False)
    for i in range(10):
        assert exp.export([i]).name == "SUCCESS"
    assert list(exp._buf) == kept  # noqa: SLF001
    s = exp.stats
    assert (s.enqueued, s.dropped, s.buffered, s.sent) == (10, 7, 3, 0)
    exp.export(list(range(10, 20)))  # a batch bigger than the buffer
    s = exp.stats
    assert (s.enqueued, s.dropped, s.buffered) == (20, 17, 3)
    exp.shutdown()
    assert exp.stats.dropped == 20 and exp.export([1]).name == "FAILURE"


def test_bad_arguments():
    with pytest.raises(ValueError):
        KafkaSpanExporter("127.0.0.1:9", drop="random", connect=False)
    with pytest.raises(ValueError):
        KafkaSpanExporter("127.0.0.1:9", max_buffer_spans=0, connect=False)


def test_export_never_blocks_and_counts_drops_when_kafka_is_down():
    port = free_port()  # a closed port: connects are refused
    exp = KafkaSpanExporter(f"127.0.0.1:{port}", max_buffer_spans=500, send_timeout_s=1, shutdown_timeout_s=1)
    calls: list[float] = []
    real_export = exp.export

    def timed(spans):
        t = time.perf_counter()
        try:
            return real_export(spans)
        finally:
            calls.append(time.perf_counter() - t)

    exp.export = timed  # type: ignore[method-assign]
    provider = provider_with(exp)
    tracer = provider.get_tracer("t")
    t = time.perf_counter()
    for i in range(3000):
        tool_call(tracer, f"s{i % 7}")
    agent_s = time.perf_counter() - t
    provider.force_flush(5000)
    time.sleep(0.5)
    s = exp.stats
    assert calls, "the SDK never called export()"
    assert max(calls) < 0.05, f"export() blocked for {max(calls):.3f} s"
    assert s.enqueued == 3000 and s.sent == 0
    assert s.dropped >= 2500 and s.dropped + s.buffered == 3000
    assert s.errors >= 1 and "connect" in (exp.last_error or "")
    t = time.perf_counter()
    provider.shutdown()
    assert time.perf_counter() - t < 4
    s = exp.stats
    assert s.dropped == 3000 and s.buffered == 0
    print(f"agent: 3000 spans in {agent_s:.2f} s with Kafka down; export() max {max(calls) * 1e3:.2f} ms")


# ----------------------------------------------------------------------------- the real broker


def _topic(broker) -> str:
    name = f"spans-{uuid.uuid4().hex[:8]}"
    asyncio.run(create_topics(broker.bootstrap, [(name, 2, {})]))
    return name


@pytest.mark.broker
def test_spans_reach_the_topic_as_flat_json_keyed_by_session(broker):
    topic = _topic(broker)
    exp = KafkaSpanExporter(broker.bootstrap, topic=topic)
    provider = provider_with(exp)
    tracer = provider.get_tracer("t")
    try:
        for i in range(5):
            tool_call(tracer, "sess-a", args=f'{{"q": {i}}}')
        tool_call(tracer, "sess-b", fail=True)
        with tracer.start_as_current_span("no session here"):
            pass
        assert provider.force_flush(10_000)
        assert exp.force_flush(10_000)
        assert exp.stats.sent == 7 and exp.stats.dropped == 0, (exp.stats, exp.last_error)
        recs = asyncio.run(collect(broker.bootstrap, topic, lambda rs: sum(len(orjson.loads(r.value)) for r in rs) >= 7,
                                   20))
    finally:
        provider.shutdown()
    keys = {r.key for r in recs}
    assert {b"sess-a", b"sess-b"} <= keys and len(keys) == 3  # the third: a trace id
    spans = []
    for r in recs:
        assert b"order 42" not in r.value and b"secret prompt" not in r.value  # redacted at the source
        d = decode(r.value)
        assert d.format == "flat" and not d.rejections
        spans.extend(d.spans)
    by_name = {}
    for sp in spans:
        by_name.setdefault(sp.name, []).append(sp)
    a = [sp for sp in by_name["execute_tool search"] if sp.attributes["gen_ai.conversation.id"] == "sess-a"]
    assert len(a) == 5
    assert {sp.attributes["tool.payload_hash"] for sp in a} == {canonical_hash({"q": i}) for i in range(5)}
    b = next(sp for sp in by_name["execute_tool search"] if sp.attributes["gen_ai.conversation.id"] == "sess-b")
    assert b.status == "ERROR" and b.status_message == ""  # status messages never pass ingest
    assert b.resource["tenant.id"] == "acme" and b.events[0].attributes == {"attempt": 1}
    assert all(sp.end_ns >= sp.start_ns > 0 for sp in spans)


@pytest.mark.broker
def test_big_batches_are_split_under_the_message_limit(broker):
    topic = _topic(broker)
    exp = KafkaSpanExporter(broker.bootstrap, topic=topic, max_message_bytes=4000)
    provider = provider_with(exp, batch=False)
    tracer = provider.get_tracer("t")
    try:
        for i in range(40):
            tool_call(tracer, "sess-big", args=f'{{"i": {i}}}')
        with tracer.start_as_current_span("huge", attributes={"gen_ai.conversation.id": "sess-big",
                                                              "blob": "x" * 10_000}):
            pass
        assert exp.force_flush(10_000)
        s = exp.stats
        assert s.sent == 40 and s.dropped == 1 and s.messages > 1, (s, exp.last_error)
        recs = asyncio.run(collect(broker.bootstrap, topic, lambda rs: sum(len(orjson.loads(r.value)) for r in rs) >= 40,
                                   20))
    finally:
        provider.shutdown()
    assert all(len(r.value) <= 4000 and r.key == b"sess-big" for r in recs)
    assert sum(len(orjson.loads(r.value)) for r in recs) == 40


@pytest.mark.broker
def test_instrumented_agent_loop_is_halted_by_breakwater(isolated):
    """The issue's producer story: an agent instrumented with the OTel SDK and this exporter loops
    on one tool call; Breakwater (real worker) publishes halt; the agent's BreakerClient sees it and
    the agent stops within seconds."""
    settings, start_worker = isolated
    worker = start_worker()
    session = f"agent-{uuid.uuid4().hex[:6]}"
    exp = KafkaSpanExporter(settings)
    provider = provider_with(exp)
    tracer = provider.get_tracer("agent")
    breaker = BreakerClient(settings)
    try:
        assert breaker.start_in_thread(timeout_s=20)
        t0 = time.monotonic()
        calls = 0
        decision = None
        with tracer.start_as_current_span("invoke_agent", attributes={
            "gen_ai.operation.name": "invoke_agent", "gen_ai.conversation.id": session,
        }):
            while time.monotonic() - t0 < 45:
                decision = breaker.check(session=session, tenant="acme")
                if not decision.allow:
                    break
                tool_call(tracer, session)  # the same call, over and over: no progress
                calls += 1
                time.sleep(0.1)
        stopped_after = time.monotonic() - t0
        assert decision is not None and not decision.allow, worker.log_text()[-3000:]
        assert decision.action == "halt" and decision.reason.startswith("no_progress_loop")
        assert decision.command_id and decision.expires_at
        # the 3rd identical call fires the detector; the rest is export + detect + publish + consume
        assert stopped_after < 15, f"stopped after {stopped_after:.1f} s ({calls} calls)"
        assert exp.stats.dropped == 0 and exp.stats.errors == 0
        print(f"agent halted after {calls} tool calls, {stopped_after:.2f} s")
    finally:
        breaker.close()
        provider.shutdown()


def test_shutdown_is_bounded_with_spans_in_flight():
    port = free_port()
    exp = KafkaSpanExporter(f"127.0.0.1:{port}", send_timeout_s=1, shutdown_timeout_s=0.5)
    exp.export([object()] * 10)
    done = threading.Event()
    t = time.monotonic()
    threading.Thread(target=lambda: (exp.shutdown(), done.set()), daemon=True).start()
    assert done.wait(5)
    assert time.monotonic() - t < 3
    assert exp.stats.dropped == 10
