"""Real Apache Kafka for the test session: one KRaft node started by ``deploy/kafka.sh`` (and
:class:`KafkaCluster`, three nodes, for the tests of faults only a cluster has).

Same surface as :class:`streams.broker.EmbeddedBroker` where the tests use it (``bootstrap``,
``url``, ``port``, ``pid``, ``running``, ``start``/``stop``/``pause``/``resume``, ``log_tail``), so
one broker fixture can hand out either. ``deploy/kafka.sh`` does the work (fetch the jars with
Maven, format KRaft storage, start on free 127.0.0.1 ports, wait until it answers); this class
gives it a private run dir and stops the JVM by its pid. The script's ``--watch-pid`` stops the
broker when the test process dies without running its finalizers (SIGKILL).

``KafkaBroker(existing="kafka://host:port")`` wraps a cluster someone else runs: nothing is
started or stopped.

    >>> KafkaBroker(existing="kafka://127.0.0.1:19092,127.0.0.1:19093").bootstrap
    '127.0.0.1:19092,127.0.0.1:19093'
    >>> KafkaBroker(existing="127.0.0.1:19092").url
    'kafka://127.0.0.1:19092'
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from streams.broker import _alive, _bootstrap_servers, _proc_cmdline, ping
from streams.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "deploy" / "kafka.sh"
KAFKA_HOME = Path(os.environ.get("BREAKWATER_KAFKA_HOME") or ROOT / ".kafka")


def java_major(java: str = "java") -> int | None:
    """Major version of ``java`` on PATH (17 for OpenJDK 17), None when there is none."""
    exe = shutil.which(java)
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "-version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if not m:
        return None
    major = int(m.group(1))
    return int(m.group(2) or 0) if major == 1 else major


def unavailable_reason() -> str | None:
    """Why a local Kafka cannot run here (no Java 17+, or no jars and no Maven), else None."""
    major = java_major(os.environ.get("JAVA", "java"))
    if major is None:
        return "no `java` on PATH: the Kafka tier needs OpenJDK 17+ (Debian: openjdk-17-jre-headless)"
    if major < 17:
        return f"java {major} on PATH: Kafka 4 needs Java 17+"
    if not (KAFKA_HOME / "libs" / ".pom.sha256").is_file() and shutil.which("mvn") is None:
        return ("Kafka's jars are not fetched and there is no `mvn` to fetch them "
                "(Debian: maven; then `bash deploy/kafka.sh fetch`)")
    return None


def worker_env_for(broker) -> dict[str, str]:
    """Worker environment a broker kind needs on top of ``WorkerProcess``'s.

    ``WorkerProcess`` shortens the group session/rebalance timeouts to 3 s for Tansu's slow joins;
    Kafka refuses a session timeout under its ``group.min.session.timeout.ms`` (6 s by default) with
    InvalidSessionTimeoutError, so on Kafka the worker keeps the product's defaults.
    """
    if not isinstance(broker, (KafkaBroker, KafkaCluster)):
        return {}
    fields = Settings.model_fields
    return {
        "BREAKWATER_GROUP_SESSION_TIMEOUT_S": str(fields["group_session_timeout_s"].default),
        "BREAKWATER_GROUP_REBALANCE_TIMEOUT_S": str(fields["group_rebalance_timeout_s"].default),
    }


class KafkaBroker:
    """One Apache Kafka node (KRaft, broker+controller) in a private run dir, or an existing cluster."""

    kind = "kafka"

    def __init__(self, *, run_dir: str | os.PathLike[str] | None = None, existing: str | None = None,
                 heap: str = "384m", watch_pid: int | None = None) -> None:
        self.existing = _bootstrap_servers(existing) if existing else None
        self._run_arg = Path(run_dir) if run_dir is not None else None
        self._run: Path | None = self._run_arg
        self._tmpdir: str | None = None
        self._heap = heap
        self._watch_pid = os.getpid() if watch_pid is None else watch_pid
        self._bootstrap: str | None = self.existing
        self._pid: int | None = None
        self._paused = False
        self.startup_seconds: float | None = None

    # ---- addresses
    @property
    def bootstrap(self) -> str:
        if self._bootstrap is None:
            raise RuntimeError("broker not started: no address yet")
        return self._bootstrap

    @property
    def url(self) -> str:
        return ",".join(f"kafka://{hp}" for hp in self.bootstrap.split(","))

    @property
    def port(self) -> int | None:
        return int(self._bootstrap.split(",")[0].rsplit(":", 1)[1]) if self._bootstrap else None

    @property
    def pid(self) -> int | None:
        return self._pid

    @property
    def run_dir(self) -> Path | None:
        return self._run

    @property
    def log_path(self) -> Path | None:
        return self._run / "kafka.log" if self._run is not None else None

    @property
    def running(self) -> bool:
        if self.existing:
            return True
        return self._pid is not None and _alive(self._pid) and self._is_ours(self._pid)

    @property
    def paused(self) -> bool:
        return self._paused

    def _is_ours(self, pid: int) -> bool:
        argv = _proc_cmdline(pid) or []
        return "kafka.Kafka" in argv and str(self._run / "server.properties") in argv

    def log_tail(self, lines: int = 30) -> str:
        path = self.log_path
        if path is None or not path.is_file():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    # ---- life cycle
    def _script(self, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, BREAKWATER_KAFKA_HEAP=self._heap, BREAKWATER_KAFKA_HOME=str(KAFKA_HOME))
        return subprocess.run(["bash", str(SCRIPT), *args, "--run-dir", str(self._run)], env=env,
                              capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)

    def start(self, timeout: float = 180.0, *, keep_data: bool = False) -> str:
        """Start (fetching the jars first if need be); returns ``host:port`` once it answers.

        ``keep_data=True`` restarts on the storage and ports of the previous ``start`` (a broker
        restart); the default formats a fresh node."""
        if self.existing:
            if not ping(self.existing, timeout=5):
                raise RuntimeError(f"no Kafka answers at {self.existing}")
            return self.existing
        if self.running:
            return self.bootstrap
        if self._run is None:
            self._tmpdir = tempfile.mkdtemp(prefix="breakwater-kafka-")
            self._run = Path(self._tmpdir)
        t0 = time.monotonic()
        args = ["start", "--timeout", str(int(timeout)), "--watch-pid", str(self._watch_pid)]
        if keep_data:
            args.append("--keep-data")
        proc = self._script(*args, timeout=timeout + 120)  # + a first fetch from Maven Central
        if proc.returncode != 0:
            raise RuntimeError(f"deploy/kafka.sh start failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        self._bootstrap = proc.stdout.strip().splitlines()[-1]
        self._pid = int((self._run / "pid").read_text().split()[0])
        self._paused = False
        self.startup_seconds = time.monotonic() - t0
        return self._bootstrap

    def kill(self) -> int:
        """SIGKILL the JVM by its pid (a crash) and wait until it is gone; returns the old pid."""
        pid = self._pid
        if pid is None:
            raise RuntimeError("the broker is not running")
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        return pid

    def stop(self, timeout: float = 30.0, *, keep_data: bool = False) -> None:
        """Stop the JVM by its pid (SIGTERM, SIGKILL after ``timeout`` s). Idempotent.

        The run dir (a temporary one) is removed unless ``keep_data``."""
        if self.existing:
            return
        if self._run is not None and self._pid is not None:
            if self._paused and self.running:
                os.kill(self._pid, signal.SIGCONT)
            self._script("stop", "--timeout", str(int(timeout)), timeout=timeout + 30)
        self._pid = None
        self._paused = False
        if self._tmpdir is not None and not keep_data:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None
            self._run = self._run_arg

    def pause(self) -> None:
        """Freeze the broker (SIGSTOP to its pid): connections stay open, nothing answers."""
        if self.existing or not self.running:
            raise RuntimeError("no local Kafka broker running")
        assert self._pid is not None
        os.kill(self._pid, signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        if self.existing or not self.running:
            raise RuntimeError("no local Kafka broker running")
        assert self._pid is not None
        os.kill(self._pid, signal.SIGCONT)
        self._paused = False

    def __enter__(self) -> KafkaBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = self.existing or (self._bootstrap or "?")
        return f"<KafkaBroker {where} pid={self._pid} {'existing' if self.existing else ''}>"


class KafkaCluster:
    """A cluster of ``n`` Apache Kafka nodes (KRaft, each broker+controller, replication factor
    ``n``, 2 in sync) in a private run dir, started by ``deploy/kafka.sh start --nodes n``.

    ``bootstrap`` lists every node; node ``i`` (1..n) has ``node.id=i``. One node can be killed
    (SIGKILL by its pid), stopped and started again on its storage and ports; ``stop()`` stops them
    all. The script's ``--watch-pid`` stops the nodes when the test process dies without cleaning up.
    """

    kind = "kafka"

    def __init__(self, n: int = 3, *, heap: str = "256m", watch_pid: int | None = None) -> None:
        self.n = n
        self._heap = heap
        self._watch_pid = os.getpid() if watch_pid is None else watch_pid
        self._tmpdir: str | None = None
        self._run: Path | None = None
        self._bootstrap: str | None = None
        self.startup_seconds: float | None = None

    @property
    def bootstrap(self) -> str:
        if self._bootstrap is None:
            raise RuntimeError("cluster not started: no address yet")
        return self._bootstrap

    @property
    def url(self) -> str:
        return ",".join(f"kafka://{hp}" for hp in self.bootstrap.split(","))

    @property
    def run_dir(self) -> Path | None:
        return self._run

    def node_dir(self, i: int) -> Path:
        assert self._run is not None and 1 <= i <= self.n
        return self._run / f"node{i}"

    def node_bootstrap(self, i: int) -> str:
        return self.bootstrap.split(",")[i - 1]

    def node_pid(self, i: int) -> int | None:
        """The pid of node ``i`` if it is running (checked against its command line), else None."""
        try:
            pid = int((self.node_dir(i) / "pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        argv = _proc_cmdline(pid) or []
        ours = "kafka.Kafka" in argv and str(self.node_dir(i) / "server.properties") in argv
        return pid if ours and _alive(pid) else None

    def running_nodes(self) -> list[int]:
        return [i for i in range(1, self.n + 1) if self.node_pid(i) is not None]

    def log_tail(self, i: int, lines: int = 30) -> str:
        path = self.node_dir(i) / "kafka.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.is_file() else ""

    def _script(self, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, BREAKWATER_KAFKA_HEAP=self._heap, BREAKWATER_KAFKA_HOME=str(KAFKA_HOME))
        return subprocess.run(["bash", str(SCRIPT), *args, "--run-dir", str(self._run)], env=env,
                              capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)

    def start(self, timeout: float = 180.0) -> str:
        if self._run is None:
            self._tmpdir = tempfile.mkdtemp(prefix="breakwater-kafka-cluster-")
            self._run = Path(self._tmpdir)
        t0 = time.monotonic()
        proc = self._script("start", "--nodes", str(self.n), "--timeout", str(int(timeout)),
                            "--watch-pid", str(self._watch_pid), timeout=timeout + 120)
        if proc.returncode != 0:
            raise RuntimeError(f"deploy/kafka.sh start --nodes {self.n} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        self._bootstrap = proc.stdout.strip().splitlines()[-1]
        self.startup_seconds = time.monotonic() - t0
        return self._bootstrap

    def kill_node(self, i: int) -> int:
        """SIGKILL node ``i`` by its pid (a crash: no controlled shutdown, no leadership handed over)."""
        pid = self.node_pid(i)
        if pid is None:
            raise RuntimeError(f"node {i} is not running")
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        return pid

    def stop_node(self, i: int, timeout: float = 30.0) -> None:
        """Stop node ``i`` (SIGTERM, a controlled shutdown; SIGKILL after ``timeout`` s)."""
        self._script("stop", "--node", str(i), "--timeout", str(int(timeout)), timeout=timeout + 30)

    def start_node(self, i: int, timeout: float = 120.0) -> None:
        """Start node ``i`` again on its storage and ports; returns once it answers."""
        proc = self._script("start", "--node", str(i), "--timeout", str(int(timeout)), timeout=timeout + 30)
        if proc.returncode != 0:
            raise RuntimeError(f"deploy/kafka.sh start --node {i} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")

    def stop(self, timeout: float = 30.0) -> None:
        """Stop every node by its pid and remove the run dir. Idempotent."""
        if self._run is not None and self._run.exists():
            self._script("stop", "--timeout", str(int(timeout)), timeout=timeout + 60)
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None
            self._run = None

    def __enter__(self) -> KafkaCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<KafkaCluster {self._bootstrap or '?'} nodes={self.n}>"


async def partition_leaders(bootstrap: str, topics: list[str]) -> dict[tuple[str, int], int]:
    """``{(topic, partition): leader node id}`` from fresh cluster metadata."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    c = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await c.start()
    try:
        c.subscribe(topics)  # metadata of these topics only
        await c._client.force_metadata_update()  # noqa: SLF001
        cluster = c._client.cluster  # noqa: SLF001
        out: dict[tuple[str, int], int] = {}
        for t in topics:
            for p in sorted(cluster.partitions_for_topic(t) or ()):
                out[(t, p)] = cluster.leader_for_partition(TopicPartition(t, p))
        return out
    finally:
        await c.stop()
