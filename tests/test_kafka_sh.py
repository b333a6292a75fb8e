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


def test_cluster_options_are_checked_before_anything_starts(tmp_path: Path) -> None:
    r = sh("start", "--nodes", "2", "--run-dir", str(tmp_path))
    assert r.returncode == 1 and "3 nodes or more" in r.stderr
    r = sh("start", "--nodes", "three", "--run-dir", str(tmp_path))
    assert r.returncode == 2 and "a number" in r.stderr
    r = sh("stop", "--node", "1", "--run-dir", str(tmp_path))  # not a cluster's run dir
    assert r.returncode == 1 and "no node 1" in r.stderr
    r = sh("start", "--node", "1", "--run-dir", str(tmp_path))
    assert r.returncode == 1 and "no node 1" in r.stderr


def test_status_of_a_cluster_names_the_nodes_that_are_down(tmp_path: Path) -> None:
    (tmp_path / "nodes").write_text("3\n")
    (tmp_path / "bootstrap").write_text("127.0.0.1:1,127.0.0.1:2,127.0.0.1:3\n")
    for i in (1, 2, 3):
        (tmp_path / f"node{i}").mkdir()
        (tmp_path / f"node{i}" / "server.properties").write_text(f"advertised.listeners=PLAINTEXT://127.0.0.1:{i}\n")
    r = sh("status", "--run-dir", str(tmp_path))
    assert r.returncode == 1 and all(f"node {i}: not running" in r.stderr for i in (1, 2, 3))
    r = sh("stop", "--run-dir", str(tmp_path))
    assert r.returncode == 0 and "stopped 0 of 3 nodes" in r.stderr


def test_a_cluster_id_never_starts_with_a_dash():
    """The storage tool reads ``--cluster-id -…`` as a missing value (a format failed in CI once)."""
    script = (Path(__file__).resolve().parent.parent / "deploy" / "kafka.sh").read_text()
    fn = script[script.index("new_cluster_id() {"):]
    fn = fn[:fn.index("\n}\n") + 3]
    out = subprocess.run(["bash", "-c", fn + "for i in $(seq 2000); do new_cluster_id; done"],
                         capture_output=True, text=True, timeout=60, check=True).stdout.split()
    assert len(out) == 2000 and all(len(x) == 22 and not x.startswith("-") for x in out)
