"""``breakwater dev``: the one-command demo, and the worker-process helper the tests share.

Starts the embedded broker (Tansu) on a free 127.0.0.1 port and a worker subprocess (policy
``deploy/demo-policy.toml``: default thresholds, short breaker TTLs), prints what a second terminal
needs, then runs simulated agents behind the real gateway client (:class:`streams.simulate.AgentFleet`
with :class:`streams.gateway.BreakerClient`): healthy traffic plus every detector's pattern, agents
that obey the breaker. The terminal shows incidents, breaker commands and what the agents do
("halted → agent stopped → released"); the end prints a summary per detector. Ctrl-C (or
``--duration``) stops it; everything started is stopped by its pid on the way out.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


DEMO_POLICY = Path(__file__).resolve().parents[1] / "deploy" / "demo-policy.toml"
DETECTORS = ("no_progress_loop", "retry_storm", "cost_velocity", "plan_deadlock", "silent_success")


def _say(msg: str) -> None:
    print(f"\033[2m[dev]\033[0m {msg}" if sys.stdout.isatty() else f"[dev] {msg}", flush=True)


def run_dev(duration_s: float | None = None, seed: int = 7) -> int:
    from streams.app import ensure_topics
    from streams.broker import EmbeddedBroker
    from streams.settings import Settings

    broker = EmbeddedBroker()
    worker: WorkerProcess | None = None
    try:
        bootstrap = broker.start()
        _say(f"embedded broker (Tansu) on {bootstrap}, pid {broker.pid}")
        settings = Settings(broker=f"kafka://{bootstrap}", partitions=2)
        asyncio.run(ensure_topics(settings))
        extra = {"BREAKWATER_PARTITIONS": "2"}
        if DEMO_POLICY.exists():
            extra["BREAKWATER_POLICY_FILE"] = str(DEMO_POLICY)
        worker = WorkerProcess(bootstrap, extra_env=extra)
        _say(f"starting worker (log: {worker.log_path}, policy: {extra.get('BREAKWATER_POLICY_FILE', 'defaults')}) …")
        worker.start()
        _say(f"worker ready, pid {worker.proc.pid if worker.proc else '?'}")
        root = Path(__file__).resolve().parents[1]
        _say("in a second terminal:")
        print(f"      cd {root} && source .venv/bin/activate\n"
              f"      export BREAKWATER_BROKER=kafka://{bootstrap}\n"
              f"      breakwater tail incidents --follow        # or: breakwater tail breaker --follow\n"
              f"      curl -s http://127.0.0.1:{worker.metrics_port}/metrics | grep ^breakwater_   "
              f"# metrics (also /healthz, /readyz)", flush=True)
        try:
            asyncio.run(_with_console(settings, _demo(settings, seed, duration_s, worker.metrics_port)))
        except KeyboardInterrupt:
            pass
        return 0
    finally:
        _say("stopping worker and broker …")
        if worker is not None:
            worker.stop()
        broker.stop()
        _say("stopped.")


async def _with_console(settings: Any, demo: Any) -> None:
    """Run the demo with the live console (``breakwater console``) beside it, on a free port."""
    from streams.console import serve

    url: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    console = asyncio.create_task(serve(settings, "127.0.0.1", 0, url), name="breakwater-console")
    try:
        done, _ = await asyncio.wait({url, console}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        if url.done():
            _say(f"live console: {url.result()}   (open it in a browser)")
        else:
            _say("live console did not start; the demo goes on without it")
        await demo
    finally:
        console.cancel()
        with contextlib.suppress(BaseException):
            await console


def spans_in(metrics_port: int, timeout_s: float = 1.0) -> float:
    """``breakwater_spans_in_total`` summed over formats, read from the worker's /metrics (0 if unreadable)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=timeout_s) as r:
            text = r.read().decode()
    except OSError:
        return 0.0
    return sum(float(m.group(1)) for m in re.finditer(r"^breakwater_spans_in_total(?:\{[^}]*\})? (\S+)$", text, re.M))


@dataclass
class Tally:
    """What the demo saw, per detector: the end-of-run summary.

    >>> t = Tally()
    >>> t.incident({"incident_id": "i1", "detector": "retry_storm", "status": "open"})
    True
    >>> t.incident({"incident_id": "i1", "detector": "retry_storm", "status": "open"})  # a re-publish
    False
    >>> t.command({"command_id": "c1", "detector": "retry_storm", "action": "throttle"})
    True
    >>> "retry_storm" in t.table(0, 0, 0)
    True
    """

    incidents: dict[str, set[str]] = field(default_factory=dict)
    resolved: dict[str, set[str]] = field(default_factory=dict)
    commands: dict[str, set[str]] = field(default_factory=dict)
    releases: dict[str, set[str]] = field(default_factory=dict)
    stopped: dict[str, list[Any]] = field(default_factory=dict)
    seen: set[tuple[str, str]] = field(default_factory=set)

    def incident(self, d: dict[str, Any]) -> bool:
        key = (str(d.get("incident_id")), str(d.get("status")))
        if key in self.seen:
            return False
        self.seen.add(key)
        det = str(d.get("detector"))
        bucket = self.resolved if d.get("status") == "resolved" else self.incidents
        bucket.setdefault(det, set()).add(str(d.get("incident_id")))
        return True

    def command(self, d: dict[str, Any]) -> bool:
        key = ("cmd", str(d.get("command_id")))
        if key in self.seen:
            return False
        self.seen.add(key)
        det = str(d.get("detector") or "manual")
        bucket = self.releases if d.get("action") == "release" else self.commands
        bucket.setdefault(det, set()).add(str(d.get("command_id")))
        return True

    def table(self, elapsed_s: float, agents: int, injected: int) -> str:
        rows = [("detector", "incidents", "resolved", "commands", "releases", "agents stopped", "spend of stopped")]
        tot = [0, 0, 0, 0, 0, 0.0]
        for det in DETECTORS:
            st = self.stopped.get(det, [])
            spend = sum(a.spend_usd for a in st)
            vals = [len(self.incidents.get(det, ())), len(self.resolved.get(det, ())), len(self.commands.get(det, ())),
                    len(self.releases.get(det, ())), len(st), spend]
            tot = [a + b for a, b in zip(tot, vals)]
            rows.append((det, *map(str, vals[:5]), f"${spend:,.2f}"))
        rows.append(("total", *map(str, tot[:5]), f"${tot[5]:,.2f}"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [f"summary after {elapsed_s:.0f} s: {agents} simulated agents ({injected} with an injected pattern)"]
        for k, r in enumerate(rows):
            lines.append("  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
            if k == 0 or k == len(rows) - 2:
                lines.append("  " + "  ".join("-" * w for w in widths))
        return "\n".join(lines)


class _Lines(io.TextIOBase):
    """A text sink that hands every complete JSON line written to it to ``handle`` (as a dict)."""

    def __init__(self, handle) -> None:  # noqa: ANN001
        super().__init__()
        self.handle, self.buf = handle, ""

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        import orjson

        self.buf += s
        *lines, self.buf = self.buf.split("\n")
        for line in lines:
            try:
                d = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if isinstance(d, dict):
                self.handle(d)
        return len(s)


async def _watch(settings, what: str, handle) -> None:  # noqa: ANN001
    """Follow ``incidents`` or ``breaker`` from the beginning (``breakwater tail … --json --follow``),
    handing each record to ``handle``."""
    from streams import tail

    await tail.tail(settings, what, follow=True, as_json=True, out=_Lines(handle), err=sys.stderr, color=False)


async def _demo(settings, seed: int, duration_s: float | None, metrics_port: int) -> None:  # noqa: ANN001
    from streams import simulate, tail
    from streams.gateway import BreakerClient

    color = sys.stdout.isatty()
    t0 = time.monotonic()
    tally = Tally()
    by_scope: dict[str, list[simulate.Agent]] = {}

    def stamp() -> str:
        return tail._stamp(time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{int(time.time() * 1000) % 1000:03d}Z")

    def agent_line(text: str) -> None:
        tag = tail._paint("AGENT   ", "1;35", color)
        print(f"{stamp()}  {tag}  {text}", flush=True)

    def on_incident(d: dict[str, Any]) -> None:
        if tally.incident(d):
            print(tail.format_incident(d, color), flush=True)

    def on_command(d: dict[str, Any]) -> None:
        if not tally.command(d):
            return
        print(tail.format_command(d, color), flush=True)
        if d.get("action") == "release":
            scope = d.get("scope") or {}
            key = f"{scope.get('kind')}:{scope.get('key')}"
            for a in by_scope.pop(key, []):
                took = time.time() - (a.stopped_at or time.time())
                agent_line(f"{a.sid}  released ({d.get('reason')}): {a.stopped.action} -> agent stopped -> "
                           f"released {took:.0f} s after it stopped")

    def on_event(event: str, a: simulate.Agent, d: Any) -> None:
        what = f"[{a.kind}]" if a.kind else "[healthy]"
        if event == "stopped":
            tally.stopped.setdefault(str(d.detector or (d.reason or "").split(":")[0]), []).append(a)
            by_scope.setdefault(str(d.scope), []).append(a)
            agent_line(f"{a.sid}  stopped by its {d.action} on {d.scope} ({d.reason}) after {a.calls} calls, "
                       f"${a.spend_usd:.2f} spent  {what}")
        elif event == "throttled":
            agent_line(f"{a.sid}  slowed down by the throttle on {d.scope} ({d.reason}, "
                       f"{d.rate_limit_per_s or 0:g}/s): waits {d.retry_after_s or 0:.2f} s per call  {what}")

    producer = simulate._producer(settings)
    await producer.start()
    breaker = BreakerClient(settings)
    watchers = [asyncio.create_task(_watch(settings, "incidents", on_incident)),
                asyncio.create_task(_watch(settings, "breaker", on_command))]
    fleet = simulate.AgentFleet(settings, breaker, seed=seed, producer=producer, on_event=on_event)
    try:
        await breaker.start(timeout_s=10)
        n = await fleet.publish_history()
        deadline = time.monotonic() + 20
        while spans_in(metrics_port) < n and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        _say(f"pre-seeded {n} spans of tenant {simulate.SPIKE_TENANT}'s last {simulate.HISTORY_MINUTES} minutes "
             "(its cost baseline needs 15 minutes of warm-up)")
        _say(f"simulated agents start now ({time.strftime('%H:%M:%S', time.gmtime())}Z, {time.monotonic() - t0:.0f} s "
             "after the broker and worker), behind the gateway client: healthy traffic plus every detector's pattern")
        _say("incidents, breaker commands and what the agents do follow (Ctrl-C to stop)\n")
        left = None if duration_s is None else max(1.0, duration_s - (time.monotonic() - t0) - 2.0)
        try:
            await fleet.run(left)
            await asyncio.sleep(1.5)  # the last incidents and commands
        except asyncio.CancelledError:
            pass
    finally:
        for w in watchers:
            w.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)
        await breaker.stop()
        await producer.stop()
        st = fleet.stats
        print("", flush=True)
        print(tally.table(time.monotonic() - t0, st.sessions, st.injected), flush=True)
