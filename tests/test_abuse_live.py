"""Hostile values against a live worker on the embedded broker: a span dated in 2100 goes to the
dead-letter topic as ``clock_skew`` and does not release the partition's halts; a re-sent span is
one call, not two (the same cores as replay, ``tests/test_abuse.py``, behind the real ingest)."""

from __future__ import annotations

import asyncio
import time
import uuid

import orjson
import pytest

from tests.kafka import collect, produce

pytestmark = pytest.mark.broker
S = 10**9


def call(i, t_ns, session, tool="search", args='{"q": 1}'):
    return {"trace_id": uuid.uuid4().hex, "span_id": f"{i:016x}", "name": f"execute_tool {tool}",
            "start_time_unix_nano": t_ns - S // 10, "end_time_unix_nano": t_ns, "status": {"code": "OK"},
            "attributes": {"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": tool,
                           "gen_ai.tool.call.arguments": args, "gen_ai.conversation.id": session},
            "resource": {"service.name": "svc"}}


def test_a_span_from_2100_is_routed_and_halts_stay_in_force(isolated):
    settings, start_worker = isolated
    start_worker()
    tag = uuid.uuid4().hex[:6]
    now = time.time_ns()
    loop_a, dup, evil = f"a-{tag}", f"dup-{tag}", f"evil-{tag}"
    msgs = []
    # a real loop: halted
    msgs += [(loop_a.encode(), orjson.dumps(call(100 + i, now + i * S // 10, loop_a))) for i in range(3)]
    # one span dated in 2100 on the same partition key space
    msgs.append((evil.encode(), orjson.dumps(call(999, 4_102_444_800 * S, evil, tool="x"))))
    # two distinct calls, each re-sent (at-least-once): two calls, not a loop
    a, b = call(200, now + S // 2, dup), call(201, now + S // 2 + 1000, dup)
    msgs += [(dup.encode(), orjson.dumps(x)) for x in (a, a, b, b)]
    asyncio.run(produce(settings.bootstrap_servers, settings.topic_spans, msgs))

    dlq = asyncio.run(collect(settings.bootstrap_servers, settings.topic_dlq, lambda rs: len(rs) >= 1, 45))
    assert [dict(m.headers)["error.reason"] for m in dlq] == [b"clock_skew"]
    assert b"execute_tool x" in dlq[0].value  # the original bytes, for inspection
    incs = asyncio.run(collect(settings.bootstrap_servers, settings.topic_incidents,
                               lambda rs: any(orjson.loads(m.value)["session_id"] == loop_a for m in rs), 45))
    opened = {orjson.loads(m.value)["session_id"] for m in incs if orjson.loads(m.value)["status"] == "open"}
    assert loop_a in opened and dup not in opened
    time.sleep(3)  # several watermark ticks: with the 2100 span counted, the halt would be released now
    cmds = [orjson.loads(m.value) for m in asyncio.run(
        collect(settings.bootstrap_servers, settings.topic_breaker, lambda rs: False, 3))]
    mine = [c for c in cmds if c["scope"]["key"] == loop_a]
    assert [c["action"] for c in mine] == ["halt"], mine


def test_messages_between_the_size_limits_are_routed_and_nothing_else_is_lost(isolated):
    """An invalid message just under the input limit but over the record budget goes to the DLQ
    truncated (headers say so); a valid ≈1 MB span is rejected as oversized_span; a loop sent in
    the same burst is still found; the worker keeps running."""
    settings, start_worker = isolated
    w = start_worker()
    tag = uuid.uuid4().hex[:6]
    now = time.time_ns()
    loop = f"burst-{tag}"
    invalid = b"[" + b" " * 1_040_000 + b"{oops"  # 1,040,006 bytes: accepted size, bad JSON
    # a valid span whose plan (the one raw part that travels past ingest) is ≈ 990 KB normalized
    ids = [f"step-{j:05d}-xxxxxxxxxxxx" for j in range(2000)]
    big = call(300, now, f"big-{tag}")
    big["events"] = [{"name": "plan.step", "time_unix_nano": now,
                      "attributes": {"plan.step.id": f"s{i}", "plan.step.depends_on": ids}} for i in range(19)]
    big_bytes = orjson.dumps(big)
    assert 936_000 < len(big_bytes) < settings.max_message_bytes
    msgs = [(b"bad-" + tag.encode(), invalid), (b"big-" + tag.encode(), big_bytes)]
    msgs += [(loop.encode(), orjson.dumps(call(400 + i, now + i * S // 10, loop))) for i in range(3)]
    asyncio.run(produce(settings.bootstrap_servers, settings.topic_spans, msgs))
    incs = asyncio.run(collect(settings.bootstrap_servers, settings.topic_incidents,
                               lambda rs: any(orjson.loads(m.value)["session_id"] == loop for m in rs), 45))
    assert any(orjson.loads(m.value)["session_id"] == loop for m in incs)
    dlq = asyncio.run(collect(settings.bootstrap_servers, settings.topic_dlq, lambda rs: len(rs) >= 2, 30))
    by_reason = {dict(m.headers)["error.reason"]: m for m in dlq}
    assert set(by_reason) == {b"bad_json", b"oversized_span"}
    h = dict(by_reason[b"bad_json"].headers)
    assert h["error.truncated"] == b"1" and int(h["error.original_bytes"]) == len(invalid)
    assert len(by_reason[b"bad_json"].value) < len(invalid)
    assert w.proc.poll() is None  # still running


def test_a_state_over_its_budget_is_reset_never_written_and_detection_goes_on(isolated):
    settings, start_worker = isolated
    w = start_worker(extra_env={"BREAKWATER_MAX_STATE_BYTES": "4096"})
    tag = uuid.uuid4().hex[:6]
    now = time.time_ns()
    s = f"wide-{tag}"
    msgs = [(s.encode(), orjson.dumps([call(500 + i, now + i * 1000, s, tool=f"tool{i:03d}" + "n" * 100)
                                       for i in range(60)]))]
    asyncio.run(produce(settings.bootstrap_servers, settings.topic_spans, msgs))
    time.sleep(3)  # a commit: the oversized state is reset instead of written
    later = now + 5 * S
    msgs = [(s.encode(), orjson.dumps(call(600 + i, later + i * S // 10, s))) for i in range(3)]
    asyncio.run(produce(settings.bootstrap_servers, settings.topic_spans, msgs))
    incs = asyncio.run(collect(settings.bootstrap_servers, settings.topic_incidents,
                               lambda rs: any(orjson.loads(m.value)["session_id"] == s for m in rs), 45))
    assert any(orjson.loads(m.value)["session_id"] == s and orjson.loads(m.value)["status"] == "open"
               for m in incs)
    assert w.proc.poll() is None
    assert "max_state_bytes 4096" in w.log_text() and "reset" in w.log_text()
