"""Faults only a real Kafka has (Kafka only: the embedded broker keeps data in memory, on one node).

* a broker restart mid-stream on Kafka's durable log storage (a node of the module's own, killed
  with SIGKILL and started again on its data and port): nothing lost, nothing opened twice;
* the leader of the input, repartition and changelog partitions killed (SIGKILL) in a cluster of
  three combined broker+controller nodes (replication factor 3, 2 in sync): the same worker
  process keeps detecting within ``FAILOVER_BOUND_S``, nothing lost;
* faust's recovery consistency check on (it is off by default for the embedded broker, whose
  end offsets undershoot): a worker restarts on its own data dir after SIGKILL and after a
  graceful stop.

Every worker here runs with ``BREAKWATER_RECOVERY_CONSISTENCY_CHECK=true``. The single node and
the cluster are started once per module (``deploy/kafka.sh``; ``--nodes 3`` for the cluster) and
stopped by pid at its end, whatever happened. Needs a local Kafka (Java 17+): skipped without one
unless ``BREAKWATER_TEST_REQUIRE_KAFKA=1`` (CI), where that is an error, and skipped when the tests
point at an existing cluster (``BREAKWATER_TEST_BROKER=kafka://...``: these tests kill brokers).
"""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from streams.app import ensure_topics, stage_topic, topic_specs
from streams.dev import WorkerProcess
from streams.settings import Settings
from tests.kafka import collect, produce
from tests.kafka_broker import KafkaBroker, KafkaCluster, partition_leaders, worker_env_for
from tests.test_broker_restart import read_all
from tests.test_faults import assert_no_duplicate_opens, commands, incidents, loop_rounds, loop_sessions, sigkill

pytestmark = [pytest.mark.broker, pytest.mark.kafka]

FAILOVER_BOUND_S = 60.0  # leader killed -> every loop completed after the kill detected (measured: see report line)
RESTART_BOUND_S = 60.0  # broker back -> every loop completed after the restart detected


def require_local_kafka() -> None:
    from tests.conftest import BROKER_KINDS, EXISTING_KAFKA, require_local_kafka_jars

    if "kafka" not in BROKER_KINDS:
        pytest.skip("Kafka only: BREAKWATER_TEST_BROKER excludes kafka")
    if EXISTING_KAFKA is not None:
        pytest.skip("kills brokers: needs Kafka nodes of its own, not an existing cluster")
    require_local_kafka_jars()


@pytest.fixture(scope="module")
def single():
    """A Kafka node of this module's own (the test kills and restarts it)."""
    require_local_kafka()
    b = KafkaBroker()
    try:
        b.start()
        yield b
    finally:
        b.stop()


@pytest.fixture(scope="module")
def cluster():
    """Three KRaft nodes, each broker and controller, replication factor 3 (started once per module)."""
    require_local_kafka()
    c = KafkaCluster(3)
    try:
        c.start()
        print(f"cluster of 3 up in {c.startup_seconds:.1f} s")
        yield c
    finally:
        c.stop()


def worker_setup(broker, tmp_path, replication: int = 1):
    """Topic names and app id of the test's own; returns ``(settings, env, start_worker, workers)``."""
    tag = uuid.uuid4().hex[:8]
    env = {
        "BREAKWATER_PARTITIONS": "2", "BREAKWATER_REPLICATION_FACTOR": str(replication),
        "BREAKWATER_TOPIC_SPANS": f"spans-{tag}", "BREAKWATER_TOPIC_OTLP": f"otlp-{tag}",
        "BREAKWATER_TOPIC_INCIDENTS": f"incidents-{tag}", "BREAKWATER_TOPIC_BREAKER": f"breaker-{tag}",
        "BREAKWATER_TOPIC_DLQ": f"dlq-{tag}", "BREAKWATER_RECOVERY_CONSISTENCY_CHECK": "true",
        **worker_env_for(broker),  # Kafka's group timeouts
    }
    settings = Settings(broker=broker.url, partitions=2, replication_factor=replication, app_id=f"bw-{tag}",
                        topic_spans=env["BREAKWATER_TOPIC_SPANS"], topic_otlp=env["BREAKWATER_TOPIC_OTLP"],
                        topic_incidents=env["BREAKWATER_TOPIC_INCIDENTS"], topic_breaker=env["BREAKWATER_TOPIC_BREAKER"],
                        topic_dlq=env["BREAKWATER_TOPIC_DLQ"])
    workers: list[WorkerProcess] = []

    def start_worker(data_dir) -> WorkerProcess:
        w = WorkerProcess(broker.bootstrap, app_id=settings.app_id, extra_env=env, data_dir=str(data_dir))
        workers.append(w)
        w.start(90)
        return w

    return settings, env, start_worker, workers


def wait_detected(settings: Settings, sessions: set[str], timeout_s: float) -> tuple[set[str], float]:
    """``(detected sessions, monotonic time when the last of them was seen)``."""
    recs = asyncio.run(collect(settings.bootstrap_servers, settings.topic_incidents,
                               lambda rs: sessions <= loop_sessions(rs), timeout_s))
    return loop_sessions(recs), time.monotonic()


def no_consistency_error(w: WorkerProcess) -> None:
    log = w.log_text()
    assert "ConsistencyError" not in log and "consistency check" not in log.lower(), log[-3000:]


# ------------------------------------------------------------------------- (a) broker restart


def test_broker_sigkill_and_restart_mid_stream_on_durable_storage(single, tmp_path):
    """Loops two calls in (some still being processed) when the broker is killed with SIGKILL and
    started again on its log dirs: the input is all there once, every loop is detected within
    RESTART_BOUND_S of the restart, and no incident or command is opened twice."""
    settings, _, start_worker, workers = worker_setup(single, tmp_path)
    try:
        asyncio.run(ensure_topics(settings))
        w = start_worker(tmp_path / "w")
        tag = uuid.uuid4().hex[:6]
        sessions = [f"krestart-{tag}-{i:02d}" for i in range(20)]
        rounds, _ = loop_rounds(sessions)
        asyncio.run(produce(single.bootstrap, settings.topic_spans, rounds[0] + rounds[1]))
        pid = single.kill()  # mid-stream: the worker is still working through those calls
        t_down = time.monotonic()
        single.start(keep_data=True)
        t_up = time.monotonic()
        assert single.pid != pid
        asyncio.run(produce(single.bootstrap, settings.topic_spans, rounds[2]))
        got, t_seen = wait_detected(settings, set(sessions), RESTART_BOUND_S + 30)
        assert set(sessions) <= got, (sorted(set(sessions) - got), w.log_text()[-3000:])
        print(f"broker restart: down {t_up - t_down:.1f} s, every loop detected {t_seen - t_up:.1f} s after it was back")
        assert t_seen - t_up <= RESTART_BOUND_S
        inputs = asyncio.run(read_all(single.bootstrap, settings.topic_spans, 2))
        assert len(inputs) == 60 and len({(m.partition, m.offset) for m in inputs}) == 60
        time.sleep(2)
        assert_no_duplicate_opens(incidents(settings), commands(settings))
        assert w.proc is not None and w.proc.poll() is None, w.log_text()[-3000:]
        no_consistency_error(w)
    finally:
        for w_ in workers:
            w_.stop()


# ------------------------------------------------------------------------ (b) leader failover


async def create_led_by(settings: Settings, leader: int, n: int) -> None:
    """Every topic of the worker, each partition's preferred leader (first replica) ``leader``."""
    others = [i for i in range(1, n + 1) if i != leader]
    admin = AIOKafkaAdminClient(**settings.kafka_client_kwargs())
    await admin.start()
    try:
        await admin.create_topics([
            NewTopic(name, -1, -1, replica_assignments={p: [leader, *others[p % 2:], *others[:p % 2]] for p in range(parts)},
                     topic_configs=cfg)
            for name, parts, cfg in topic_specs(settings)])
    finally:
        await admin.close()


def test_leader_of_input_and_changelog_partitions_killed_worker_keeps_detecting(cluster, tmp_path):
    """Every partition the worker reads and writes (input, repartition, changelog, output) is led
    by node 1. Loops are two calls in when node 1 is killed with SIGKILL; their last calls and 8
    whole loops are sent after: the same worker process detects every one within FAILOVER_BOUND_S
    of the kill, and no incident or command is opened twice."""
    leader = 1
    settings, _, start_worker, workers = worker_setup(cluster, tmp_path, replication=3)
    try:
        asyncio.run(create_led_by(settings, leader, cluster.n))
        watched = [settings.topic_spans, stage_topic(settings, "session"), f"{settings.app_id}-sessions-changelog"]
        leaders: dict = {}
        deadline = time.monotonic() + 30
        while not leaders and time.monotonic() < deadline:  # new topics: metadata can lag creation
            leaders = asyncio.run(partition_leaders(cluster.bootstrap, watched))
            if not leaders:
                time.sleep(0.5)
        assert set(leaders.values()) == {leader}, leaders
        w = start_worker(tmp_path / "w")
        pid = w.proc.pid
        tag = uuid.uuid4().hex[:6]
        warm = [f"warm-{tag}-{i}" for i in range(4)]
        wr, _ = loop_rounds(warm)
        asyncio.run(produce(cluster.bootstrap, settings.topic_spans, wr[0] + wr[1] + wr[2]))
        got, _ = wait_detected(settings, set(warm), 60)
        assert set(warm) <= got, w.log_text()[-3000:]
        half = [f"half-{tag}-{i:02d}" for i in range(12)]
        after = [f"after-{tag}-{i}" for i in range(8)]
        hr, _ = loop_rounds(half)
        ar, _ = loop_rounds(after)
        asyncio.run(produce(cluster.bootstrap, settings.topic_spans, hr[0] + hr[1]))
        time.sleep(2)  # processed: the half-done loops' state is in the changelog
        cluster.kill_node(leader)
        t_kill = time.monotonic()
        asyncio.run(produce(cluster.bootstrap, settings.topic_spans, hr[2] + ar[0] + ar[1] + ar[2]))
        t_sent = time.monotonic()
        want = set(half + after)
        got, t_seen = wait_detected(settings, want, FAILOVER_BOUND_S + 30)
        assert want <= got, (sorted(want - got), w.log_text()[-3000:])
        moved = asyncio.run(partition_leaders(cluster.bootstrap, watched))
        print(f"leader failover: input sent {t_sent - t_kill:.1f} s after the kill, every loop detected "
              f"{t_seen - t_kill:.1f} s after the kill; leaders now {sorted(set(moved.values()))}")
        assert t_seen - t_kill <= FAILOVER_BOUND_S
        assert leader not in moved.values(), moved
        time.sleep(2)
        assert_no_duplicate_opens(incidents(settings), commands(settings))
        assert w.proc.pid == pid and w.proc.poll() is None, "the worker died or was restarted"
        inputs = asyncio.run(read_all(cluster.bootstrap, settings.topic_spans, 2))
        assert len(inputs) == 3 * (len(warm) + len(half) + len(after))
        no_consistency_error(w)
    finally:
        for w_ in workers:
            w_.stop()


# --------------------------------------------------------------- (c) recovery consistency check


def test_recovery_consistency_check_on_worker_restarts_on_its_own_data_dir(broker_pool, tmp_path):
    """With faust's check on, a worker restarts on its own RocksDB after SIGKILL mid-loop and after
    a graceful stop; the loops the restarts cut in half are still detected."""
    from tests.conftest import BROKER_KINDS

    if "kafka" not in BROKER_KINDS:
        pytest.skip("Kafka only: BREAKWATER_TEST_BROKER excludes kafka")
    kafka = broker_pool.get("kafka")
    settings, _, start_worker, workers = worker_setup(kafka, tmp_path)
    try:
        asyncio.run(ensure_topics(settings))
        tag = uuid.uuid4().hex[:6]
        sessions = [f"check-{tag}-{i:02d}" for i in range(10)]
        rounds, _ = loop_rounds(sessions)
        w1 = start_worker(tmp_path / "w")
        asyncio.run(produce(kafka.bootstrap, settings.topic_spans, rounds[0]))
        time.sleep(3)  # processed and committed: state in RocksDB and in the changelog
        sigkill(w1)
        w2 = start_worker(tmp_path / "w")  # the same data dir
        asyncio.run(produce(kafka.bootstrap, settings.topic_spans, rounds[1]))
        time.sleep(3)
        w2.stop()  # graceful (SIGTERM)
        w3 = start_worker(tmp_path / "w")
        asyncio.run(produce(kafka.bootstrap, settings.topic_spans, rounds[2]))
        got, _ = wait_detected(settings, set(sessions), 60)
        assert set(sessions) <= got, (sorted(set(sessions) - got), w3.log_text()[-3000:])
        for w in (w1, w2, w3):
            no_consistency_error(w)
    finally:
        for w_ in workers:
            w_.stop()
