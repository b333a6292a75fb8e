"""``deploy/kafka.sh``: the real Apache Kafka the kafka tier runs on (the session's own node)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from streams.broker import ping
from tests.kafka_broker import SCRIPT, KafkaBroker

pytestmark = [pytest.mark.broker, pytest.mark.kafka]


@pytest.fixture
def kafka(broker_pool) -> KafkaBroker:
    from tests.conftest import BROKER_KINDS, EXISTING_KAFKA

    if "kafka" not in BROKER_KINDS or EXISTING_KAFKA is not None:
        pytest.skip("tests the Kafka node deploy/kafka.sh starts (BREAKWATER_TEST_BROKER excludes it)")
    return broker_pool.get("kafka")


def sh(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60)


def test_status_prints_the_address_of_the_running_node(kafka: KafkaBroker) -> None:
    assert kafka.running and ping(kafka.bootstrap)
    r = sh("status", "--run-dir", str(kafka.run_dir))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == kafka.bootstrap
    assert kafka.bootstrap.startswith("127.0.0.1:")
    props = (kafka.run_dir / "server.properties").read_text()
    assert "process.roles=broker,controller" in props
    cmdline = Path(f"/proc/{kafka.pid}/cmdline").read_bytes().split(b"\0")
    assert b"kafka.Kafka" in cmdline and b"-Xmx384m" in cmdline


def test_status_and_stop_of_a_run_dir_without_a_broker(tmp_path: Path) -> None:
    r = sh("status", "--run-dir", str(tmp_path))
    assert r.returncode == 1 and "not running" in r.stderr
    (tmp_path / "pid").write_text("1\n")  # a pid that is not our Kafka: never signalled
    r = sh("stop", "--run-dir", str(tmp_path))
    assert r.returncode == 0 and "not running" in r.stderr


def test_unknown_command_prints_usage() -> None:
    r = sh("frobnicate")
    assert r.returncode == 2 and "start" in r.stderr and "--run-dir" in r.stderr
