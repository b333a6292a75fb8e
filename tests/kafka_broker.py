"""Real Apache Kafka for the test session: one KRaft node started by ``deploy/kafka.sh``.

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
    if not isinstance(broker, KafkaBroker):
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
