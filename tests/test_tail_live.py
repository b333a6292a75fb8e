"""``breakwater tail`` against the real embedded broker: from the beginning or a chosen time,
filters, ``--json``, ``--follow``, and the CLI itself."""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
import time
import uuid

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from streams.broker import create_topics
from streams.gateway import command_json
from streams.settings import Settings
from streams.tail import tail

pytestmark = pytest.mark.broker

T0_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z


def incident(i: int, *, severity="critical", detector="no_progress_loop", tenant="acme") -> bytes:
    return orjson.dumps({
        "incident_id": f"inc-{i}", "detector": detector, "severity": severity, "status": "open",
        "scope": {"kind": "session", "key": f"s{i}"}, "tenant": tenant, "session_id": f"s{i}",
        "workflow_id": None, "trace_ids": ["t"], "first_seen": "2026-01-01T00:00:00.000000Z",
        "last_seen": "2026-01-01T00:00:01.000000Z", "detected_at": f"2026-01-01T00:00:0{i}.000000Z",
        "summary": f"Session s{i} looped.", "evidence": {"gen_ai.tool.call.arguments": "secret"},
        "breaker_command_id": f"cmd-{i}", "policy_mode": "enforce", "schema_version": 1,
    })


async def send(bootstrap: str, topic: str, records: list[tuple[bytes, bytes, int]]) -> None:
    p = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await p.start()
    try:
        for key, value, ts in records:
            await p.send_and_wait(topic, value, key=key, timestamp_ms=ts)
    finally:
        await p.stop()


@pytest.fixture
def topics(broker):
    tag = uuid.uuid4().hex[:8]
    s = Settings(broker=broker.url, topic_incidents=f"incidents-{tag}", topic_breaker=f"breaker-{tag}")
    asyncio.run(create_topics(broker.bootstrap, [(s.topic_incidents, 2, {}),
                                                 (s.topic_breaker, 1, {"cleanup.policy": "compact"})]))
    asyncio.run(send(broker.bootstrap, s.topic_incidents, [
        (b"inc-1", incident(1), T0_MS + 1000),
        (b"inc-2", incident(2, severity="warning", detector="retry_storm", tenant="globex"), T0_MS + 2000),
        (b"inc-3", incident(3), T0_MS + 3000),
        (b"bad", b"{not json", T0_MS + 3500),
    ]))
    asyncio.run(send(broker.bootstrap, s.topic_breaker, [
        (b"session:s1", command_json("halt", "session", "s1", expires_at="2026-01-01T00:15:01Z",
                                     reason="no_progress_loop:repeat"), T0_MS + 1000),
        (b"session:s1", command_json("release", "session", "s1", reason="expired"), T0_MS + 4000),
    ]))
    return s


def run_tail(settings, what, **kw):
    out, err = io.StringIO(), io.StringIO()
    stats = asyncio.run(asyncio.wait_for(tail(settings, what, out=out, err=err, color=False,
                                              idle_timeout_s=kw.pop("idle_timeout_s", 1.5), **kw), 30))
    return out.getvalue().splitlines(), err.getvalue(), stats


def test_incidents_from_the_beginning_in_time_order_bad_record_warned(topics):
    lines, err, stats = run_tail(topics, "incidents")
    assert [ln.split()[0] for ln in lines] == ["2026-01-01T00:00:01.000Z", "2026-01-01T00:00:02.000Z", "2026-01-01T00:00:03.000Z"]
    assert "CRITICAL  no_progress_loop  session:s1  open" in lines[0] and lines[0].endswith("[cmd-1]")
    assert "skipped unparseable record" in err and (stats.printed, stats.bad) == (3, 1)


def test_since_and_filters(topics):
    lines, _, _ = run_tail(topics, "incidents", since_ns=(T0_MS + 2000) * 1_000_000)
    assert [ln.split()[3] for ln in lines] == ["session:s2", "session:s3"]
    lines, _, _ = run_tail(topics, "incidents", severity="critical")
    assert [ln.split()[3] for ln in lines] == ["session:s1", "session:s3"]
    lines, _, _ = run_tail(topics, "incidents", detector="retry_storm")
    assert len(lines) == 1 and "WARNING" in lines[0]
    lines, _, _ = run_tail(topics, "incidents", tenant="globex")
    assert len(lines) == 1 and "session:s2" in lines[0]


def test_json_lines_never_carry_raw_arguments(topics):
    lines, _, _ = run_tail(topics, "incidents", as_json=True)
    docs = [orjson.loads(ln) for ln in lines]
    assert [d["incident_id"] for d in docs] == ["inc-1", "inc-2", "inc-3"]
    assert all("gen_ai.tool.call.arguments" not in d["evidence"] for d in docs)


def test_breaker_lines(topics):
    lines, _, _ = run_tail(topics, "breaker")
    assert lines == [
        "2026-01-01T00:00:00.000Z  HALT      session:s1  enforce  expires 2026-01-01T00:15:01Z  no_progress_loop:repeat",
        "2026-01-01T00:00:00.000Z  RELEASE   session:s1  enforce  expired",
    ]


def test_follow_prints_new_records_as_they_arrive(topics, broker):
    async def run():
        out, err = io.StringIO(), io.StringIO()
        task = asyncio.create_task(tail(topics, "breaker", follow=True, out=out, err=err, color=False,
                                        max_records=3, since_ns=(T0_MS + 3000) * 1_000_000))
        await asyncio.sleep(2.0)
        assert not task.done()  # following: it waits for more
        assert out.getvalue().count("\n") == 1  # only the release is after the chosen time
        now = int(time.time() * 1000)
        await send(broker.bootstrap, topics.topic_breaker, [
            (b"tenant:acme", command_json("trip", "tenant", "acme"), now),
            (b"route:openai/gpt-4o", command_json("throttle", "route", "openai/gpt-4o", rate_limit_per_s=2,
                                                  tenant="acme"), now),
        ])
        stats = await asyncio.wait_for(task, 15)
        return out.getvalue().splitlines(), stats

    lines, stats = asyncio.run(run())
    assert stats.printed == 3
    assert "TRIP" in lines[1] and "tenant:acme" in lines[1]
    assert "THROTTLE  route:openai/gpt-4o tenant:acme" in lines[2] and "limit 2/s" in lines[2]


def test_the_cli(topics):
    env = dict(os.environ, BREAKWATER_BROKER=topics.broker, BREAKWATER_TOPIC_INCIDENTS=topics.topic_incidents,
               NO_COLOR="1")
    r = subprocess.run([sys.executable, "-m", "streams", "tail", "incidents", "--severity", "critical",
                        "--since", "2026-01-01T00:00:02Z"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert [ln.split()[3] for ln in r.stdout.splitlines()] == ["session:s3"]
    assert "\x1b[" not in r.stdout
