"""The embedded Tansu broker, exercised over real TCP with aiokafka.

Every test stops what it started, also when it fails (fixtures and ``finally``).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from streams.broker import EmbeddedBroker, create_topics, free_port, ping, stop_pid

pytestmark = pytest.mark.broker

REPO = Path(__file__).resolve().parent.parent
# Short group timeouts: Tansu joins groups slowly otherwise (README "The embedded broker").
GROUP_TIMEOUTS = dict(session_timeout_ms=3000, heartbeat_interval_ms=500, rebalance_timeout_ms=3000)


def _gone(pid: int) -> bool:
    """The pid no longer names a live process (a not-yet-reaped zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def _wait_gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _gone(pid):
            return True
        time.sleep(0.05)
    return _gone(pid)


@pytest.fixture
def broker() -> Iterator[EmbeddedBroker]:
    b = EmbeddedBroker()
    try:
        b.start(timeout=20)
        yield b
    finally:
        b.stop()


def _topic() -> str:
    return f"t.{uuid.uuid4().hex[:8]}"


async def _consume_one(bootstrap: str, topic: str, timeout: float = 30.0):
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=f"g.{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        **GROUP_TIMEOUTS,
    )
    await consumer.start()
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500)
            for records in batches.values():
                if records:
                    return records[0]
        raise AssertionError(f"no message on {topic} within {timeout}s")
    finally:
        await consumer.stop()


def test_start_gives_address_and_answers(broker: EmbeddedBroker) -> None:
    assert broker.running
    assert broker.bootstrap == f"127.0.0.1:{broker.port}"
    assert broker.url == f"kafka://127.0.0.1:{broker.port}"
    assert isinstance(broker.pid, int) and not _gone(broker.pid)
    assert ping(broker.bootstrap)
    assert broker.startup_seconds is not None and broker.startup_seconds < 20
    assert broker.start() == broker.bootstrap  # idempotent while running


async def test_produce_and_consume(broker: EmbeddedBroker) -> None:
    topic = _topic()
    assert await create_topics(broker.bootstrap, [(topic, 1, {})]) == [topic]
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(topic, b'{"hello": 1}', key=b"session-1")
    finally:
        await producer.stop()
    record = await _consume_one(broker.bootstrap, topic)
    assert (record.key, record.value) == (b"session-1", b'{"hello": 1}')


async def test_compacted_topic_is_listed_and_existing_topics_are_fine(
    broker: EmbeddedBroker,
) -> None:
    specs = [("agent.breaker", 1, {"cleanup.policy": "compact"}), ("agent.spans", 3, {})]
    assert sorted(await create_topics(broker.url, specs)) == ["agent.breaker", "agent.spans"]
    # Creating them again is not an error; nothing new is created.
    assert await create_topics(broker.bootstrap, specs) == []
    admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
    await admin.start()
    try:
        assert {"agent.breaker", "agent.spans"} <= set(await admin.list_topics())
        described = {t["topic"]: t for t in await admin.describe_topics(["agent.spans"])}
        assert len(described["agent.spans"]["partitions"]) == 3
        configs = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, "agent.breaker")]
        )
        entries = {e[0]: e[1] for e in configs[0].resources[0][4]}
        assert entries.get("cleanup.policy") == "compact"
    finally:
        await admin.close()


async def test_pause_and_resume(broker: EmbeddedBroker) -> None:
    topic = _topic()
    await create_topics(broker.bootstrap, [(topic, 1, {})])
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, request_timeout_ms=15000)
    await producer.start()
    try:
        await producer.send_and_wait(topic, b"before")
        broker.pause()
        try:
            assert broker.paused
            assert not await asyncio.to_thread(ping, broker.bootstrap, 0.5)
            await asyncio.sleep(2)
        finally:
            broker.resume()
        assert not broker.paused
        meta = await asyncio.wait_for(producer.send_and_wait(topic, b"after"), timeout=20)
        assert meta.topic == topic
    finally:
        await producer.stop()
    assert ping(broker.bootstrap)


def test_stop_kills_the_pid_and_is_idempotent() -> None:
    b = EmbeddedBroker()
    try:
        bootstrap = b.start()
        pid = b.pid
        assert pid is not None
        assert b.stop() is not None
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        assert not b.running and b.pid is None
        assert b.stop() is None  # second stop: no-op
        assert not ping(bootstrap, timeout=0.3)
    finally:
        b.stop()


def test_stop_while_paused() -> None:
    b = EmbeddedBroker()
    try:
        b.start()
        pid = b.pid
        b.pause()
        t0 = time.monotonic()
        b.stop(timeout=5)
        assert time.monotonic() - t0 < 6
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    finally:
        b.stop()


def test_context_manager_stops() -> None:
    with EmbeddedBroker() as b:
        pid = b.pid
        assert ping(b.bootstrap)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_failed_start_raises_with_log_tail() -> None:
    # Not a broker: the "binary" exits at once complaining about its arguments.
    b = EmbeddedBroker(binary=sys.executable)
    try:
        with pytest.raises(RuntimeError) as err:
            b.start(timeout=5)
        assert "exited" in str(err.value) and "broker" in str(err.value)
        assert not b.running
    finally:
        b.stop()


def test_two_brokers_get_distinct_ports() -> None:
    a, b = EmbeddedBroker(), EmbeddedBroker()
    try:
        a.start()
        b.start()
        assert a.port != b.port
        assert ping(a.bootstrap) and ping(b.bootstrap)
    finally:
        a.stop()
        b.stop()


def _cli(*args: str, cwd: Path, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [*args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_cli_start_stop(tmp_path: Path) -> None:
    pidfile = tmp_path / "run" / "broker.pid"
    pid = None
    try:
        started = _cli(sys.executable, "-m", "streams.broker", "start", "--pidfile", str(pidfile),
                       cwd=tmp_path)
        assert started.returncode == 0, started.stderr
        bootstrap = started.stdout.strip()
        assert bootstrap.startswith("127.0.0.1:")
        pid = int(pidfile.read_text().split()[0])
        assert not _gone(pid)
        assert ping(bootstrap)  # the broker outlived the command that started it
        status = _cli(sys.executable, "-m", "streams.broker", "status", "--pidfile", str(pidfile),
                      cwd=tmp_path)
        assert (status.returncode, status.stdout.strip()) == (0, bootstrap)
        again = _cli(sys.executable, "-m", "streams.broker", "start", "--pidfile", str(pidfile),
                     cwd=tmp_path)
        assert (again.returncode, again.stdout.strip()) == (0, bootstrap)  # no second broker
        stopped = _cli(sys.executable, "-m", "streams.broker", "stop", "--pidfile", str(pidfile),
                       cwd=tmp_path)
        assert stopped.returncode == 0, stopped.stderr
        assert _wait_gone(pid)
        assert not pidfile.exists()
        assert not ping(bootstrap, timeout=0.3)
    finally:
        if pid is not None and not _gone(pid):
            stop_pid(pid)


def test_broker_sh_default_pidfile(tmp_path: Path) -> None:
    script = REPO / "deploy" / "broker.sh"
    pidfile = tmp_path / ".breakwater" / "broker.pid"
    env_py = dict(os.environ, PYTHON=sys.executable)
    pid = None
    try:
        started = subprocess.run(["bash", str(script), "start"], cwd=tmp_path, env=env_py,
                                 capture_output=True, text=True, timeout=30)
        assert started.returncode == 0, started.stderr
        bootstrap = started.stdout.strip()
        pid = int(pidfile.read_text().split()[0])
        assert ping(bootstrap)
        stopped = subprocess.run(["bash", str(script), "stop"], cwd=tmp_path, env=env_py,
                                 capture_output=True, text=True, timeout=30)
        assert stopped.returncode == 0, stopped.stderr
        assert _wait_gone(pid)
    finally:
        if pid is not None and not _gone(pid):
            stop_pid(pid)


def test_cli_stop_refuses_foreign_pid(tmp_path: Path) -> None:
    """A stale pidfile naming some other live process must not get that process killed."""
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        pidfile = tmp_path / "broker.pid"
        pidfile.write_text(f"{other.pid}\n")
        stopped = _cli(sys.executable, "-m", "streams.broker", "stop", "--pidfile", str(pidfile),
                       cwd=tmp_path)
        assert stopped.returncode == 0
        assert "not a Tansu broker" in stopped.stderr
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


def test_free_port_is_bindable() -> None:
    import socket

    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
