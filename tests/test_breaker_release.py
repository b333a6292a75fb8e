"""``breakwater breaker release`` on the real embedded broker: it releases what is in force, and
says so; with nothing in force for the scope (never commanded, already released, expired, a
mistyped key) it says which, publishes nothing and exits 1; ``--force`` publishes anyway.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta

import orjson
import pytest

from streams.broker import create_topics
from streams.gateway import command_json
from tests.kafka import collect, produce

pytestmark = pytest.mark.broker


def _at(delta_s: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=delta_s)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@pytest.fixture
def breaker_topic(broker):
    topic = f"breaker-{uuid.uuid4().hex[:8]}"
    asyncio.run(create_topics(broker.bootstrap, [(topic, 1, {"cleanup.policy": "compact"})]))
    asyncio.run(produce(broker.bootstrap, topic, [
        (b"session:sess-123", command_json("halt", "session", "sess-123", expires_at=_at(900),
                                           reason="no_progress_loop:repeat")),
        (b"session:old", command_json("halt", "session", "old", expires_at=_at(-60))),
        (b"session:done", command_json("hold", "session", "done", expires_at=_at(600))),
        (b"session:done", command_json("release", "session", "done", reason="expired")),
        (b"route:openai/gpt-4o", command_json("throttle", "route", "openai/gpt-4o", tenant="acme",
                                              rate_limit_per_s=2, expires_at=_at(120))),
    ]))
    return topic


def release(broker, topic, *args):
    env = {**os.environ, "BREAKWATER_BROKER": broker.url, "BREAKWATER_TOPIC_BREAKER": topic, "NO_COLOR": "1"}
    return subprocess.run([sys.executable, "-m", "streams", "breaker", "release", *args, "--reason", "on-call"],
                          env=env, capture_output=True, text=True, timeout=90, check=False)


def records(broker, topic, n):
    return asyncio.run(collect(broker.bootstrap, topic, lambda rs: len(rs) >= n, 10))


def one_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def test_release_of_a_command_in_force_publishes_and_says_what_it_released(broker, breaker_topic):
    r = release(broker, breaker_topic, "session:sess-123")
    assert r.returncode == 0, r.stderr
    line = one_line(r.stderr)
    assert "released" in line and "HALT" in line and "session:sess-123" in line
    cmd = orjson.loads(r.stdout)
    assert cmd["action"] == "release" and cmd["reason"] == "manual: on-call"
    recs = records(broker, breaker_topic, 6)
    assert recs[-1].key == b"session:sess-123" and orjson.loads(recs[-1].value)["action"] == "release"


@pytest.mark.parametrize(("scope", "why"), [
    ("session:never", "no command was ever published under that key"),
    ("session:done", "its last command is a release issued"),
    ("session:old", "its last command, a halt, expired"),
    ("session:sess-12", "in force with a similar key: session:sess-123"),
])
def test_nothing_in_force_is_said_exits_1_and_publishes_nothing(broker, breaker_topic, scope, why):
    started = time.monotonic()
    r = release(broker, breaker_topic, scope)
    assert r.returncode == 1, (r.stdout, r.stderr)
    line = one_line(r.stderr)
    assert line.startswith(f"breakwater breaker release: nothing in force for {scope} on {breaker_topic}"), line
    assert why in line and "nothing published" in line and "--force" in line
    assert r.stdout == ""
    assert time.monotonic() - started < 30
    assert len(records(broker, breaker_topic, 6)) == 5  # nothing was published


def test_force_publishes_a_release_anyway(broker, breaker_topic):
    r = release(broker, breaker_topic, "session:never", "--force")
    assert r.returncode == 0, r.stderr
    assert orjson.loads(r.stdout)["scope"]["key"] == "never"
    recs = records(broker, breaker_topic, 6)
    assert recs[-1].key == b"session:never"


def test_a_route_throttle_of_another_tenant_is_not_released_by_mistake(broker, breaker_topic):
    r = release(broker, breaker_topic, "route:openai/gpt-4o", "--tenant", "globex")
    assert r.returncode == 1
    line = one_line(r.stderr)
    assert "is for tenant acme, not globex" in line and "nothing published" in line
    r = release(broker, breaker_topic, "route:openai/gpt-4o", "--tenant", "acme")
    assert r.returncode == 0, r.stderr
    assert "THROTTLE" in r.stderr and "route:openai/gpt-4o tenant:acme" in r.stderr
