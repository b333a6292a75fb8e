"""``breakwater dev``: the one-command demo, and the worker-process helper the tests share.

Starts the embedded broker (Tansu) on a free 127.0.0.1 port, a worker subprocess, and the live
simulator with injected loops, then tails incidents and breaker commands to the terminal until
Ctrl-C (or ``--duration``). Everything started is stopped by its pid on the way out.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORKER_READY_MARK = "Worker ready"


class WorkerProcess:
    """A ``breakwater worker`` subprocess with its own data dir and log; stopped by pid.

    >>> WorkerProcess("127.0.0.1:1", app_id="x").env()["BREAKWATER_APP_ID"]
    'x'
    """

    def __init__(self, bootstrap: str, *, app_id: str = "breakwater", data_dir: str | None = None,
                 extra_env: dict[str, str] | None = None, log_path: str | None = None) -> None:
        self.bootstrap = bootstrap
        self.app_id = app_id
        self._tmp = None
        if data_dir is None:
            self._tmp = tempfile.mkdtemp(prefix="breakwater-worker-")
            data_dir = self._tmp
        self.data_dir = data_dir
        Path(data_dir).mkdir(parents=True, exist_ok=True)
        self.log_path = log_path or str(Path(data_dir) / "worker.log")
        self.extra_env = extra_env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        from streams.broker import free_port

        self.metrics_port = int((extra_env or {}).get("BREAKWATER_METRICS_PORT") or free_port())

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            BREAKWATER_BROKER=f"kafka://{self.bootstrap}",
            BREAKWATER_APP_ID=self.app_id,
            BREAKWATER_DATA_DIR=str(Path(self.data_dir) / "state"),
            BREAKWATER_GROUP_SESSION_TIMEOUT_S="3",
            BREAKWATER_GROUP_REBALANCE_TIMEOUT_S="3",
            BREAKWATER_METRICS_PORT=str(self.metrics_port),
        )
        env.update(self.extra_env)
        return env

    def start(self, wait_ready_s: float = 60.0) -> WorkerProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "streams", "worker"],
            env=self.env(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        if wait_ready_s:
            self.wait_ready(wait_ready_s)
        return self

    def log_text(self) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")
        except OSError:
            return ""

    def wait_ready(self, timeout_s: float, marks: int = 1) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.log_text().count(WORKER_READY_MARK) >= marks:
                return
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")
            time.sleep(0.1)
        raise RuntimeError(f"worker not ready after {timeout_s}s:\n{self.log_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL by pid (a crash, for fault tests)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM by pid, then SIGKILL after ``timeout_s``; idempotent."""
        p = self.proc
        if p is None or p.poll() is not None:
            return
        try:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(5)
        except ProcessLookupError:
            pass

    def __enter__(self) -> WorkerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_dev(duration_s: float | None = None, seed: int = 7) -> int:
    from streams.app import ensure_topics
    from streams.broker import EmbeddedBroker
    from streams.settings import Settings

    say = lambda msg: print(f"\033[2m[dev]\033[0m {msg}" if sys.stdout.isatty() else f"[dev] {msg}", flush=True)  # noqa: E731
    broker = EmbeddedBroker()
    worker: WorkerProcess | None = None
    try:
        bootstrap = broker.start()
        say(f"embedded broker (Tansu) on {bootstrap}, pid {broker.pid}")
        settings = Settings(broker=f"kafka://{bootstrap}", partitions=2)
        asyncio.run(ensure_topics(settings))
        worker = WorkerProcess(bootstrap, extra_env={"BREAKWATER_PARTITIONS": "2"})
        say(f"starting worker (log: {worker.log_path}) …")
        worker.start()
        say(f"worker ready, pid {worker.proc.pid if worker.proc else '?'}; simulating agents with injected loops")
        say("incidents and breaker commands follow (Ctrl-C to stop)\n")
        try:
            asyncio.run(_demo(settings, seed, duration_s))
        except KeyboardInterrupt:
            pass
        return 0
    finally:
        say("stopping worker and broker …")
        if worker is not None:
            worker.stop()
        broker.stop()
        say("stopped.")


async def _demo(settings, seed: int, duration_s: float | None) -> None:  # noqa: ANN001
    from streams import simulate, tail

    tasks = [
        asyncio.create_task(simulate.run_live(settings, seed=seed, sessions_per_s=1.0, loop_every=5, time_scale=0.1,
                                              duration_s=duration_s or 10**9)),
        asyncio.create_task(tail.tail(settings, "incidents", follow=True, as_json=False)),
        asyncio.create_task(tail.tail(settings, "breaker", follow=True, as_json=False)),
    ]
    try:
        if duration_s is not None:
            await asyncio.sleep(duration_s)
        else:
            await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
