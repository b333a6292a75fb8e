"""A durable embedded broker killed (SIGKILL) and restarted mid-stream (issue 14, finding 10).

The broker is Tansu with its S3 storage engine over a local S3 server (moto's server mode, README "The embedded broker"):
``EmbeddedBroker(storage_engine="s3://tansu/", env=...)``; ``kill()`` then ``start()`` is a crash and
a restart on the same port and the same storage. Every process binds 127.0.0.1 on a free port and
is stopped by pid, even when a test fails.

What the broker guarantees across the restart (asserted, must pass):

* every acknowledged record is still there, at its offset, once; new records continue after it
  (Tansu writes ``watermark.json`` with a conditional PUT, so a restarted broker cannot reuse an
  offset: the stale create gets ``412`` and is retried on the stored watermark);
* a worker across two restarts loses nothing on the way in: every input message and every
  re-keyed span is in the topics, and no stage commits an offset past a record it has not read.

What it does not (documented, not asserted):

* ``ListOffsets(latest)`` is computed from the S3 objects' ``last_modified`` (one-second
  resolution), so it names the first batch written in the newest second: 25 records can report an
  end offset of 1. Lag gauges and faust's recovery highwater read that number
  (``recovery_consistency_check=False`` already tolerates it).
* Throughput: every Fetch lists *all* batch objects of the partition, and every produced batch is
  its own object, so fetch latency grows with the topic (≈30 ms → 250 ms within a minute here).
  After a restart a worker's stages fell 10-60 s behind, and in some runs did not catch up within
  150 s — the loops were not lost (their spans sat in the re-keyed topic past the stage's committed
  offset), they were late. That end-to-end bound is the ``xfail`` below: not strict, because it
  passes or fails by timing (about half the runs on this 2-core machine).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import Counter

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from streams.app import ensure_topics, stage_topic
from streams.broker import EmbeddedBroker, create_topics, free_port, stop_pid
from streams.dev import WorkerProcess
from streams.models import Span
from streams.settings import Settings
from tests.kafka import collect, produce
from tests.test_faults import loop_rounds, loop_sessions

pytestmark = pytest.mark.broker

moto_server = os.path.join(os.path.dirname(sys.executable), "moto_server")


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A local S3 server (moto) with a ``tansu`` bucket; yields the env Tansu needs to use it."""
    pytest.importorskip("moto", reason="needs moto[server] (test extra)")
    boto3 = pytest.importorskip("boto3")
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "ab")  # noqa: SIM115
    port = free_port()
    proc = subprocess.Popen([moto_server, "-H", "127.0.0.1", "-p", str(port)], stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(url + "/moto-api/", timeout=0.5)  # noqa: S310 - our own server
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"moto server did not start (exit {proc.poll()})")
                time.sleep(0.05)
        creds = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
        boto3.client("s3", endpoint_url=url, aws_access_key_id="test", aws_secret_access_key="test",
                     region_name="us-east-1").create_bucket(Bucket="tansu")
        yield {"AWS_ENDPOINT": url, "AWS_ALLOW_HTTP": "true", "AWS_REGION": "us-east-1", **creds}
    finally:
        stop_pid(proc.pid)
        log.close()


@pytest.fixture
def durable(s3, tmp_path):
    broker = EmbeddedBroker(storage_engine="s3://tansu/", env=s3, log_path=tmp_path / "tansu.log")
    try:
        broker.start()
        yield broker
    finally:
        broker.stop()


async def read_all(bootstrap: str, topic: str, partitions: int, quiet_s: float = 2.0, cap_s: float = 20.0) -> list:
    """Every record of ``topic`` from the beginning (stops after ``quiet_s`` without a new one)."""
    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest",
                         fetch_max_wait_ms=100)
    await c.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        c.assign(tps)
        await c.seek_to_beginning(*tps)
        got: list = []
        t0 = last = time.monotonic()
        while time.monotonic() - last < quiet_s and time.monotonic() - t0 < cap_s:
            for msgs in (await c.getmany(timeout_ms=200)).values():
                got += msgs
                last = time.monotonic() if msgs else last
        return got
    finally:
        await c.stop()


async def committed(bootstrap: str, group: str, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await c.start()
    try:
        return {tp: (await c.committed(tp)) or 0 for tp in tps}
    finally:
        await c.stop()


def test_acknowledged_records_survive_a_broker_kill_and_restart(durable):
    """60 acked records on 2 partitions, SIGKILL, restart, 60 more: all 120 are read back at the offsets
    their acks named, each once, and the offsets of each partition are contiguous."""
    acked: dict[tuple[int, int], bytes] = {}

    async def send(lo: int, hi: int) -> None:
        p = AIOKafkaProducer(bootstrap_servers=durable.bootstrap, acks="all", linger_ms=5)
        await p.start()
        try:
            futs = [(i, await p.send("durable", b"v%d" % i, partition=i % 2)) for i in range(lo, hi)]
            for i, f in futs:
                md = await f
                acked[(md.partition, md.offset)] = b"v%d" % i
        finally:
            await p.stop()

    asyncio.run(create_topics(durable.bootstrap, [("durable", 2, {})]))
    asyncio.run(send(0, 60))
    pid = durable.pid
    assert durable.kill() == -9
    durable.start()
    assert durable.pid != pid and durable.port is not None
    before = {(m.partition, m.offset): m.value for m in asyncio.run(read_all(durable.bootstrap, "durable", 2))}
    assert before == acked, "acknowledged records changed across the restart"
    asyncio.run(send(60, 120))
    got = asyncio.run(read_all(durable.bootstrap, "durable", 2))
    assert len(acked) == 120
    assert {(m.partition, m.offset): m.value for m in got} == acked
    assert Counter(m.value for m in got).most_common(1)[0][1] == 1, "a record was read twice"
    for part in (0, 1):
        offs = sorted(o for p, o in acked if p == part)
        assert offs == list(range(len(offs))), f"offsets of partition {part} not contiguous: {offs}"


def test_worker_across_two_broker_restarts_loses_nothing_on_the_way_in(durable, tmp_path):
    """12 loops in 3 rounds (one call per session per round), the broker SIGKILLed and restarted after
    rounds 1 and 2: every input message and every re-keyed span is there once (by span id), and no
    stage's committed offset passes the end of its topic. Detection is checked separately below."""
    tag = uuid.uuid4().hex[:8]
    env = {"BREAKWATER_PARTITIONS": "2", "BREAKWATER_TOPIC_SPANS": f"spans-{tag}",
           "BREAKWATER_TOPIC_OTLP": f"otlp-{tag}", "BREAKWATER_TOPIC_INCIDENTS": f"incidents-{tag}",
           "BREAKWATER_TOPIC_BREAKER": f"breaker-{tag}", "BREAKWATER_TOPIC_DLQ": f"dlq-{tag}"}
    settings = Settings(broker=durable.url, partitions=2, app_id=f"bw-{tag}", topic_spans=env["BREAKWATER_TOPIC_SPANS"],
                        topic_otlp=env["BREAKWATER_TOPIC_OTLP"], topic_incidents=env["BREAKWATER_TOPIC_INCIDENTS"],
                        topic_breaker=env["BREAKWATER_TOPIC_BREAKER"], topic_dlq=env["BREAKWATER_TOPIC_DLQ"])
    asyncio.run(ensure_topics(settings))
    worker = WorkerProcess(durable.bootstrap, app_id=settings.app_id, extra_env=env, data_dir=str(tmp_path / "w"))
    try:
        worker.start()
        sessions = [f"restart-{tag}-{i:02d}" for i in range(12)]
        rounds, flat = loop_rounds(sessions)
        for i, msgs in enumerate(rounds):
            asyncio.run(produce(durable.bootstrap, settings.topic_spans, msgs))
            time.sleep(2)
            if i < 2:
                durable.kill()
                durable.start()
        # nothing lost on the way in: every input message, every span re-keyed (once per span id)
        inputs = asyncio.run(read_all(durable.bootstrap, settings.topic_spans, 2))
        assert len(inputs) == 36 and len({(m.partition, m.offset) for m in inputs}) == 36
        want = {s["span_id"] for s in flat}
        rekeyed: set[str] = set()
        deadline = time.monotonic() + 30
        while rekeyed != want and time.monotonic() < deadline:
            rekeyed = set()
            for m in asyncio.run(read_all(durable.bootstrap, stage_topic(settings, "session"), 2)):
                if m.value:
                    for entries in orjson.loads(m.value)["keyed"].values():
                        rekeyed.update(Span.from_wire(w).span_id for _, _, wires in entries for w in wires)
        assert rekeyed == want, f"{len(want - rekeyed)} spans never re-keyed"
        # no committed offset past what the topic holds (a reset or a skip would show here)
        topics = [settings.topic_spans, stage_topic(settings, "session")]
        tps = [TopicPartition(t, p) for t in topics for p in range(2)]
        ends: dict[TopicPartition, int] = {}
        for t in topics:
            for m in asyncio.run(read_all(durable.bootstrap, t, 2, quiet_s=1.0)):
                tp = TopicPartition(t, m.partition)
                ends[tp] = max(ends.get(tp, 0), m.offset + 1)
        done = asyncio.run(committed(durable.bootstrap, settings.app_id, tps))
        assert all(done[tp] <= ends.get(tp, 0) for tp in tps), (done, ends)
        assert worker.proc is not None and worker.proc.poll() is None, worker.log_text()[-3000:]
    finally:
        worker.stop()


@pytest.mark.xfail(strict=False, reason="Tansu's S3 engine: after a restart the worker's stages can fall "
                   "10-60 s behind (or longer); late, not lost (see the module docstring)")
def test_worker_across_a_broker_restart_detects_every_loop_once_within_20_s(durable, tmp_path):
    tag = uuid.uuid4().hex[:8]
    env = {"BREAKWATER_PARTITIONS": "2", "BREAKWATER_TOPIC_SPANS": f"spans-{tag}",
           "BREAKWATER_TOPIC_OTLP": f"otlp-{tag}", "BREAKWATER_TOPIC_INCIDENTS": f"incidents-{tag}",
           "BREAKWATER_TOPIC_BREAKER": f"breaker-{tag}", "BREAKWATER_TOPIC_DLQ": f"dlq-{tag}"}
    settings = Settings(broker=durable.url, partitions=2, app_id=f"bw-{tag}", topic_spans=env["BREAKWATER_TOPIC_SPANS"],
                        topic_otlp=env["BREAKWATER_TOPIC_OTLP"], topic_incidents=env["BREAKWATER_TOPIC_INCIDENTS"],
                        topic_breaker=env["BREAKWATER_TOPIC_BREAKER"], topic_dlq=env["BREAKWATER_TOPIC_DLQ"])
    asyncio.run(ensure_topics(settings))
    worker = WorkerProcess(durable.bootstrap, app_id=settings.app_id, extra_env=env, data_dir=str(tmp_path / "w"))
    try:
        worker.start()
        sessions = [f"late-{tag}-{i:02d}" for i in range(12)]
        rounds, _ = loop_rounds(sessions)
        for i, msgs in enumerate(rounds):
            asyncio.run(produce(durable.bootstrap, settings.topic_spans, msgs))
            if i == 0:
                time.sleep(2)
                durable.kill()
                durable.start()
        recs = asyncio.run(collect(durable.bootstrap, settings.topic_incidents,
                                   lambda rs: set(sessions) <= loop_sessions(rs), 20))
        got = loop_sessions(recs)
        assert set(sessions) <= got, f"{len(set(sessions) - got)}/12 loops not detected within 20 s"
        opens = Counter(orjson.loads(m.value)["incident_id"] for m in recs
                        if orjson.loads(m.value)["status"] == "open")
        assert max(opens.values()) == 1, opens
    finally:
        worker.stop()
