"""Faults on the embedded broker: a worker killed with SIGKILL and restarted, a worker leaving a
two-worker group, the broker frozen for 10 s, and a flood of bad input.

Every test starts its own worker processes (and, for the frozen broker, its own broker) and stops
them by pid even when it fails. Loops are sent as three messages per session (one tool call each),
interleaved across sessions, so a fault usually lands while sessions are half-way through their
loop and their state must survive it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from streams.app import ensure_topics
from streams.dev import WorkerProcess
from streams.settings import Settings
from tests.kafka import collect, produce
from tests.kafka_broker import worker_env_for
from tests.otel import agent_spans, flat_json, to_flat

pytestmark = pytest.mark.broker

LOOP = [("search", '{"q": "status of order 42"}')] * 3
DETECT_BOUND_S = 10.0  # under the flood: each loop's incident within 10 s of its last call (typ. < 2 s)


# ------------------------------------------------------------------------------------ helpers


def loop_rounds(sessions: list[str]) -> tuple[list[list[tuple[bytes, bytes]]], list[dict]]:
    """Three rounds of messages (call 1; call 2; call 3 + the agent span) and the flat spans."""
    rounds: list[list[tuple[bytes, bytes]]] = [[], [], []]
    flat: list[dict] = []
    for s in sessions:
        spans = agent_spans(s, LOOP)
        tools = [x for x in spans if x.name.startswith("execute_tool")]
        root = [x for x in spans if not x.name.startswith("execute_tool")]
        for i, part in enumerate((tools[:1], tools[1:2], tools[2:] + root)):
            rounds[i].append((s.encode(), flat_json(part)))
        flat.extend(to_flat(x) for x in spans)
    return rounds, flat


def benign(sessions: list[str]) -> tuple[list[tuple[bytes, bytes]], list[dict]]:
    """Sessions that page through results (distinct arguments): never an incident."""
    msgs, flat = [], []
    for s in sessions:
        spans = agent_spans(s, [("search", f'{{"q": "x", "page": {i}}}') for i in range(4)])
        msgs.append((s.encode(), flat_json(spans)))
        flat.extend(to_flat(x) for x in spans)
    return msgs, flat


def values(records) -> list[dict]:
    return [orjson.loads(m.value) for m in records]


def incidents(settings: Settings, until=lambda rs: False, timeout_s: float = 4.0) -> list[dict]:
    return values(asyncio.run(collect(settings.bootstrap_servers, settings.topic_incidents, until, timeout_s)))


def commands(settings: Settings, timeout_s: float = 4.0) -> list[dict]:
    return values(asyncio.run(collect(settings.bootstrap_servers, settings.topic_breaker, lambda rs: False,
                                      timeout_s)))


def loop_sessions(records) -> set[str]:
    return {d["session_id"] for d in values(records) if d["detector"] == "no_progress_loop"}


def wait_loops(settings: Settings, sessions: set[str], timeout_s: float) -> list[dict]:
    recs = asyncio.run(collect(settings.bootstrap_servers, settings.topic_incidents,
                               lambda rs: sessions <= loop_sessions(rs), timeout_s))
    return values(recs)


def assert_no_duplicate_opens(incs: list[dict], cmds: list[dict]) -> None:
    """At-least-once delivery may repeat a record, but never open an incident or issue a command twice."""
    opens = Counter(d["incident_id"] for d in incs if d["status"] == "open")
    assert not {k: n for k, n in opens.items() if n > 1}, f"incidents opened twice: {opens}"
    issued = Counter(c["command_id"] for c in cmds if c["action"] != "release")
    assert not {k: n for k, n in issued.items() if n > 1}, f"commands issued twice: {issued}"
    per_scope: dict[tuple, set[str]] = defaultdict(set)
    for c in cmds:
        if c["action"] != "release":
            per_scope[(c["scope"]["kind"], c["scope"]["key"], c["action"], c["incident_id"])].add(c["command_id"])
    assert all(len(ids) == 1 for ids in per_scope.values()), per_scope


def replay(tmp_path, flat: list[dict]) -> list[dict]:
    f = tmp_path / "replay-input.jsonl"
    f.write_bytes(b"".join(orjson.dumps(s) + b"\n" for s in sorted(flat, key=lambda s: s["end_time_unix_nano"])))
    r = subprocess.run([sys.executable, "-m", "streams", "replay", str(f)], capture_output=True, timeout=60,
                       check=True)
    return [orjson.loads(x) for x in r.stdout.splitlines()]


def opened(incs: list[dict]) -> set[tuple]:
    return {(d["incident_id"], d["detector"], d["scope"]["kind"], d["scope"]["key"])
            for d in incs if d["status"] == "open"}


class Feeder(threading.Thread):
    """Sends messages at a steady pace from a thread, so a fault can strike mid-stream."""

    def __init__(self, bootstrap: str, topic: str, messages: list[tuple[bytes, bytes]], per_s: float) -> None:
        super().__init__(daemon=True)
        self.bootstrap, self.topic, self.messages, self.per_s = bootstrap, topic, messages, per_s
        self.sent = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    async def _run(self) -> None:
        p = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all", request_timeout_ms=30_000)
        await p.start()
        try:
            t0 = time.monotonic()
            for i, (k, v) in enumerate(self.messages):
                await asyncio.sleep(max(0.0, t0 + i / self.per_s - time.monotonic()))
                await p.send_and_wait(self.topic, v, key=k)
                self.sent = i + 1
        finally:
            await p.stop()


def sigkill(w: WorkerProcess) -> None:
    assert w.proc is not None and w.proc.poll() is None
    os.kill(w.proc.pid, signal.SIGKILL)
    w.proc.wait(10)


# ------------------------------------------------------------------------------------- tests


def test_sigkill_mid_stream_then_restart_loses_nothing_and_opens_nothing_twice(isolated, tmp_path):
    """SIGKILL while a stream of half-finished loops is being processed, restart on the same data dir:
    every loop still gives its incident, and no incident or command is opened twice."""
    settings, start_worker = isolated
    t_start = time.monotonic()
    w1 = start_worker(tmp_path / "w")
    tag = uuid.uuid4().hex[:6]
    sessions = [f"kill-{tag}-{i:02d}" for i in range(30)]
    rounds, _ = loop_rounds(sessions)
    feed = Feeder(settings.bootstrap_servers, settings.topic_spans, rounds[0] + rounds[1] + rounds[2], per_s=10)
    feed.start()
    # strike once the worker is visibly mid-stream: some loops detected, more calls still coming
    deadline = time.monotonic() + 45
    seen: set[str] = set()
    while time.monotonic() < deadline and len(seen) < 3:
        seen = loop_sessions(asyncio.run(collect(settings.bootstrap_servers, settings.topic_incidents,
                                                 lambda rs: len(loop_sessions(rs)) >= 3, 2)))
    assert len(seen) >= 3, w1.log_text()[-3000:]
    assert feed.is_alive(), "the feed finished before the kill: not mid-stream"
    sigkill(w1)
    killed_after = feed.sent
    start_worker(tmp_path / "w")  # the same data dir: RocksDB as the killed process left it
    feed.join(60)
    assert feed.error is None and feed.sent == 90, feed.error
    incs = wait_loops(settings, set(sessions), 60)
    assert set(sessions) <= loop_sessions_from(incs), sorted(set(sessions) - loop_sessions_from(incs))
    time.sleep(3)  # anything the restarted worker would still re-publish
    incs, cmds = incidents(settings), commands(settings)
    assert_no_duplicate_opens(incs, cmds)
    halted = {c["scope"]["key"] for c in cmds if c["action"] == "halt"}
    assert set(sessions) <= halted
    assert 0 < killed_after < 90
    assert time.monotonic() - t_start < 150


def loop_sessions_from(incs: list[dict]) -> set[str]:
    return {d["session_id"] for d in incs if d["detector"] == "no_progress_loop"}


def test_worker_leaving_a_two_worker_group_gives_the_same_incidents_as_replay(isolated, tmp_path):
    """Two workers share the group; loops are two calls in when one worker stops (graceful leave,
    rebalance, its partitions' state restored by the other): the incidents equal replay's."""
    settings, start_worker = isolated
    w1 = start_worker()
    w2 = start_worker()
    w1.wait_ready(60, marks=2)  # rebalanced after the second worker joined
    tag = uuid.uuid4().hex[:6]
    sessions = [f"leave-{tag}-{i:02d}" for i in range(16)]
    rounds, flat = loop_rounds(sessions)
    calm, calm_flat = benign([f"calm-{tag}-{i}" for i in range(4)])
    asyncio.run(produce(settings.bootstrap_servers, settings.topic_spans, rounds[0] + calm + rounds[1]))
    # both workers hold state now: a barrier loop per partition shows the first rounds are processed
    probes = [f"probe-{tag}-{i}" for i in range(6)]
    prounds, pflat = loop_rounds(probes)
    asyncio.run(produce(settings.bootstrap_servers, settings.topic_spans, prounds[0] + prounds[1] + prounds[2]))
    wait_loops(settings, set(probes), 60)
    w2.stop()  # graceful: leaves the group, w1 takes over its partitions
    asyncio.run(produce(settings.bootstrap_servers, settings.topic_spans, rounds[2]))
    incs = wait_loops(settings, set(sessions), 75)
    assert set(sessions) <= loop_sessions_from(incs), (sorted(set(sessions) - loop_sessions_from(incs)),
                                                       w1.log_text()[-3000:])
    time.sleep(3)
    incs, cmds = incidents(settings), commands(settings)
    assert_no_duplicate_opens(incs, cmds)
    assert opened(incs) == opened(replay(tmp_path, flat + calm_flat + pflat))


def test_broker_frozen_for_10s_worker_recovers_without_restart(fresh_broker, tmp_path):
    """SIGSTOP the broker for 10 s (memory storage: it must not be restarted), then SIGCONT: the same
    worker process recovers, and loops sent before, during and after the freeze are all detected."""
    broker = fresh_broker  # its own broker (tansu or kafka): the session's is not frozen
    w: WorkerProcess | None = None
    try:
        broker.start()
        settings = Settings(broker=broker.url, partitions=2, app_id=f"bw-freeze-{uuid.uuid4().hex[:6]}")
        asyncio.run(ensure_topics(settings))
        w = WorkerProcess(broker.bootstrap, app_id=settings.app_id, data_dir=str(tmp_path / "w"),
                          extra_env={"BREAKWATER_PARTITIONS": "2", **worker_env_for(broker)}).start()
        pid = w.proc.pid
        tag = uuid.uuid4().hex[:6]
        groups = {when: [f"{when}-{tag}-{i}" for i in range(4)] for when in ("before", "during", "after")}
        rb, _ = loop_rounds(groups["before"])
        rd, _ = loop_rounds(groups["during"])
        ra, _ = loop_rounds(groups["after"])
        # before: whole loops, detected; 'during' loops get two calls in before the freeze
        asyncio.run(produce(broker.bootstrap, settings.topic_spans, rb[0] + rb[1] + rb[2] + rd[0] + rd[1]))
        wait_loops(settings, set(groups["before"]), 60)

        async def send_during_freeze() -> None:
            p = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, acks="all", request_timeout_ms=40_000)
            await p.start()
            # learn the topic's partitions now: Tansu's bootstrap metadata lists every topic, Kafka's
            # lists none, and a send would then wait on metadata from the frozen broker
            await p.partitions_for(settings.topic_spans)
            try:
                broker.pause()
                t_pause = time.monotonic()
                futs = [await p.send(settings.topic_spans, v, key=k) for k, v in rd[2]]
                await asyncio.sleep(max(0.0, 10.0 - (time.monotonic() - t_pause)))
                broker.resume()
                await asyncio.gather(*futs)
            finally:
                if broker.paused:
                    broker.resume()
                await p.stop()

        asyncio.run(send_during_freeze())
        asyncio.run(produce(broker.bootstrap, settings.topic_spans, ra[0] + ra[1] + ra[2]))
        want = set(groups["before"] + groups["during"] + groups["after"])
        incs = wait_loops(settings, want, 75)
        got = loop_sessions_from(incs)
        assert want <= got, (sorted(want - got), w.log_text()[-4000:])
        assert w.proc.pid == pid and w.proc.poll() is None, "the worker died or was restarted"
        time.sleep(2)
        assert_no_duplicate_opens(incidents(settings), commands(settings))
    finally:
        if w is not None:
            w.stop()
        broker.stop()


def test_flood_of_bad_input_at_10x_the_good_rate(isolated):
    """30 good loops at ~10 messages/s mixed with 10 bad messages per good one (truncated JSON, binary
    garbage, oversized, spans without ids; both input topics): every loop is detected within
    DETECT_BOUND_S of its last call being sent, and every bad message is in the DLQ with its reason."""
    settings, start_worker = isolated
    max_bytes = 4096
    start_worker(extra_env={"BREAKWATER_MAX_MESSAGE_BYTES": str(max_bytes)})
    tag = uuid.uuid4().hex[:6]
    sessions = [f"flood-{tag}-{i:02d}" for i in range(30)]
    good = {s: agent_spans(s, LOOP) for s in sessions}
    bad_kinds = [
        (settings.topic_spans, b'{"trace_id": "nope", ', "bad_json"),
        (settings.topic_spans, b"[" + b"1," * max_bytes + b"1]", "oversized"),
        (settings.topic_spans, b'{"name": "execute_tool search"}', "bad_id"),
        (settings.topic_otlp, b"\xff\xfe\x00garbage", "bad_otlp"),
        (settings.topic_otlp, b"\x00" * (max_bytes + 1), "oversized"),
    ]
    expected_reasons: Counter[str] = Counter()
    plan: list[tuple[str, bytes, bytes]] = []
    for i, s in enumerate(sessions):
        plan.append((settings.topic_spans, s.encode(), flat_json(good[s])))
        for j in range(10):
            topic, value, reason = bad_kinds[(i * 10 + j) % len(bad_kinds)]
            plan.append((topic, f"bad-{tag}-{i}-{j}".encode(), value))
            expected_reasons[reason] += 1
    sent_at: dict[str, float] = {}

    async def flood() -> None:
        p = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, acks="all", linger_ms=2)
        await p.start()
        try:
            t0 = time.monotonic()
            for n, (topic, key, value) in enumerate(plan):  # 110 messages/s: 10 good + 100 bad
                await asyncio.sleep(max(0.0, t0 + n / 110 - time.monotonic()))
                fut = await p.send(topic, value, key=key)
                if not key.startswith(b"bad-"):
                    await fut
                    sent_at[key.decode()] = time.time()
            await p.flush()
        finally:
            await p.stop()

    asyncio.run(flood())
    recs = asyncio.run(collect(settings.bootstrap_servers, settings.topic_incidents,
                               lambda rs: set(sessions) <= loop_sessions(rs), 60))
    first: dict[str, float] = {}
    for m in recs:
        d = orjson.loads(m.value)
        if d["detector"] == "no_progress_loop" and d["session_id"] in sent_at:
            first.setdefault(d["session_id"], m.timestamp / 1000)
    assert set(first) == set(sessions), sorted(set(sessions) - set(first))
    latency = {s: first[s] - sent_at[s] for s in sessions}
    print(f"flood: detection latency max {max(latency.values()):.2f} s, "
          f"mean {sum(latency.values()) / len(latency):.2f} s over {len(latency)} loops")
    assert max(latency.values()) <= DETECT_BOUND_S, sorted(latency.items(), key=lambda kv: -kv[1])[:5]
    n_bad = sum(expected_reasons.values())
    assert n_bad == 10 * len(sessions)
    dlq = asyncio.run(collect(settings.bootstrap_servers, settings.topic_dlq, lambda rs: len(rs) >= n_bad, 60))
    time.sleep(1)
    dlq = asyncio.run(collect(settings.bootstrap_servers, settings.topic_dlq, lambda rs: False, 3))
    keys = Counter(m.key for m in dlq)
    assert len(dlq) == n_bad and len(keys) == n_bad, (len(dlq), n_bad)  # each bad message once, no good one
    got_reasons = Counter(dict(m.headers)["error.reason"].decode() for m in dlq)
    assert got_reasons == expected_reasons
    for m in dlq:
        h = dict(m.headers)
        assert {"error.detail", "source.topic", "source.partition", "source.offset"} <= set(h)
        assert h["source.topic"].decode() in (settings.topic_spans, settings.topic_otlp)

