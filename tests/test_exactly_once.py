"""Exactly-once on real Apache Kafka: faust's ``processing_guarantee="exactly_once"`` against a
worker killed with SIGKILL mid-stream (Kafka only: the embedded broker has no transactions).

The question is whether a consumer reading ``agent.incidents`` and ``agent.breaker`` with
``isolation_level=read_committed`` ever sees a record twice. Verdict with faust-streaming 0.15 and
aiokafka 0.14: it does, so the worker stays at-least-once with deterministic ids (README "Design
decisions", At-least-once):

* faust's ``TransactionManager.send`` picks a send's transaction from the *destination* topic's
  partition in the *consumer's* metadata. Output topics the app does not consume (the incidents
  and breaker topics) are not in it, so those records go out on the plain producer, outside any
  transaction: visible to ``read_committed`` at once, and sent again when the uncommitted input is
  reprocessed after a crash. ``tests/eos_repro.py`` reproduces this with a one-agent app.
* the two ``xfail(strict=True)`` tests below turn into failures the day faust sends them in the
  transaction, which is when ``exactly_once`` becomes worth a default.

The worker's commit interval is raised to 5 s so that the kill lands inside an open transaction
that already sent incidents (exactly-once must not depend on the commit timing; with transactions
each internal hop waits for a commit, so detection then takes up to 2 × 5 s), and the worker is
restarted on a fresh data dir: its state then comes only from what the changelog committed, as
when a partition moves to another worker.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from tests.test_faults import Feeder, loop_rounds, loop_sessions, sigkill

pytestmark = [pytest.mark.broker, pytest.mark.kafka]

EOS_REASON = ("faust-streaming 0.15 sends records to topics the app does not consume (agent.incidents, "
              "agent.breaker) outside the transaction: a crash re-sends them (tests/eos_repro.py)")


@pytest.fixture
def kafka_broker(broker_pool):
    from tests.conftest import BROKER_KINDS

    if "kafka" not in BROKER_KINDS:
        pytest.skip("Kafka only (transactions): BREAKWATER_TEST_BROKER excludes kafka")
    return broker_pool.get("kafka")


@pytest.fixture
def on_kafka(kafka_broker, tmp_path):
    """``isolated`` on the session's Kafka: topics and app id of the test's own, workers stopped."""
    from tests.conftest import isolated_workers

    with isolated_workers(kafka_broker, tmp_path, start_timeout_s=90) as got:
        yield got


async def read_committed(bootstrap: str, topic: str, until, timeout_s: float, quiet_s: float = 3.0) -> list:
    """Every record of ``topic`` from the beginning with ``isolation_level=read_committed``, until
    ``until(records)`` holds and nothing new came for ``quiet_s``, or ``timeout_s``."""
    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, isolation_level="read_committed", enable_auto_commit=False,
                         auto_offset_reset="earliest", fetch_max_wait_ms=200)
    await c.start()
    try:
        parts = None
        deadline = time.monotonic() + timeout_s
        while not parts and time.monotonic() < deadline:
            await c._client.force_metadata_update()  # noqa: SLF001 - Kafka's bootstrap metadata lists no topic
            parts = c.partitions_for_topic(topic)
        tps = [TopicPartition(topic, p) for p in sorted(parts or ())]
        c.assign(tps)
        await c.seek_to_beginning(*tps)
        got: list = []
        last = time.monotonic()
        while time.monotonic() < deadline:
            new = [m for msgs in (await c.getmany(timeout_ms=300)).values() for m in msgs]
            got += new
            if new:
                last = time.monotonic()
            elif until(got) and time.monotonic() - last >= quiet_s:
                break
        return got
    finally:
        await c.stop()


def duplicates(records, id_field: str, state_field: str) -> dict:
    """Records seen more than once: the same bytes (key and value), or the same id in the same state."""
    same_bytes = Counter((m.key, m.value) for m in records)
    same_id = Counter((d[id_field], d[state_field]) for d in (orjson.loads(m.value) for m in records))
    return {"bytes": sum(n - 1 for n in same_bytes.values() if n > 1),
            "ids": {f"{k[0]}/{k[1]}": n for k, n in same_id.items() if n > 1}}


def kill_mid_stream_and_read(settings, start_worker, tmp_path, guarantee: str) -> dict:
    """30 loops fed at 10 messages/s; SIGKILL once 3 are detected; a new worker on a fresh data dir;
    every loop detected again; both output topics read with ``read_committed``."""
    extra = {"BREAKWATER_PROCESSING_GUARANTEE": guarantee, "BREAKWATER_COMMIT_INTERVAL_S": "5"}
    w1 = start_worker(tmp_path / "w1", extra)
    tag = uuid.uuid4().hex[:6]
    sessions = [f"eos-{tag}-{i:02d}" for i in range(30)]
    rounds, _ = loop_rounds(sessions)
    feed = Feeder(settings.bootstrap_servers, settings.topic_spans, rounds[0] + rounds[1] + rounds[2], per_s=10)
    feed.start()
    bs = settings.bootstrap_servers
    seen: set[str] = set()
    deadline = time.monotonic() + 45
    while len(seen) < 3 and time.monotonic() < deadline:
        seen = loop_sessions(asyncio.run(read_committed(bs, settings.topic_incidents,
                                                        lambda rs: len(loop_sessions(rs)) >= 3, 2, quiet_s=0)))
    assert len(seen) >= 3, w1.log_text()[-3000:]
    assert feed.is_alive(), "the feed finished before the kill: not mid-stream"
    sigkill(w1)
    killed_after = feed.sent
    start_worker(tmp_path / "w2", extra)  # fresh data dir: state from the changelog only
    feed.join(60)
    assert feed.error is None and feed.sent == 90, feed.error
    assert 0 < killed_after < 90
    incs = asyncio.run(read_committed(bs, settings.topic_incidents,
                                      lambda rs: set(sessions) <= loop_sessions(rs), 90))
    assert set(sessions) <= loop_sessions(incs), sorted(set(sessions) - loop_sessions(incs))
    cmds = asyncio.run(read_committed(bs, settings.topic_breaker,
                                      lambda rs: len(rs) >= len(sessions), 30))
    return {"incidents": len(incs), "commands": len(cmds), "killed_after": killed_after,
            "incident_dups": duplicates(incs, "incident_id", "status"),
            "command_dups": duplicates(cmds, "command_id", "action")}


@pytest.mark.xfail(strict=True, reason=EOS_REASON)
def test_exactly_once_sigkill_mid_stream_no_duplicate_record_read_committed(on_kafka, tmp_path):
    settings, start_worker = on_kafka
    r = kill_mid_stream_and_read(settings, start_worker, tmp_path, "exactly_once")
    print(f"exactly_once after SIGKILL: {r}")
    assert r["incident_dups"] == {"bytes": 0, "ids": {}}, r
    assert r["command_dups"] == {"bytes": 0, "ids": {}}, r


@pytest.mark.xfail(strict=True, reason=EOS_REASON)
def test_minimal_reproduction_faust_exactly_once_output_topic(kafka_broker, tmp_path):
    """The one-agent app of ``tests/eos_repro.py``: N records forwarded, SIGKILL before the first
    commit, restart: ``read_committed`` shows each forwarded record twice."""
    from tests.eos_repro import N, reproduce

    r = reproduce(kafka_broker.bootstrap, str(tmp_path))
    print(f"eos_repro: {r}")
    assert r["visible_before_commit"] == 0, f"records visible to read_committed before any commit: {r}"
    assert r["duplicated"] == [] and r["read_committed_after_restart"] == N, r
