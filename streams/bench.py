"""``breakwater bench``: throughput as ratios against a ceiling measured in the same run.

* replay: spans/s of ``breakwater replay`` on a large OTLP JSON file of simulated mixed traffic,
  next to ``orjson.loads`` of the same lines (the decode-only ceiling) and ingest's ``decode``;
* memory: RSS delta and persisted-state bytes per tracked session, over many sessions, and per
  key of each kind of state (session, pending trace, route, tenant);
* live, through a broker with one worker subprocess: end-to-end spans/s next to a raw aiokafka
  consume + ``orjson.loads`` of the same topic on the same broker (:func:`bench_e2e`), and
  detection latency (span sent → incident readable) at a fixed offered load (:func:`bench_latency`),
  and span → gateway deny: an agent instrumented with the OpenTelemetry SDK loops on one tool call
  until the LiteLLM hook denies its next call, over repeated trials at a stated background load
  (:func:`bench_deny`).
  The broker is :class:`LiveBroker`: the embedded Tansu broker (default), Apache Kafka started by
  ``deploy/kafka.sh``, or an existing Kafka cluster (``breakwater bench --broker``).

``breakwater bench`` prints it all as markdown tables headed by the command that made them and by
issue 11's goals next to this run's figures (:func:`goals_table`: goal / measured / met?).

Absolute figures depend on the machine; the ratios are what to compare between runs. A ratio is
always taken against a ceiling measured in the same run on the same broker.
"""

from __future__ import annotations

import contextlib
import gc
import io
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def make_file(path: Path, sessions: int, seed: int = 11) -> int:
    from streams import simulate

    spans = list(simulate.generate(seed, sessions, 1_767_225_600 * 10**9, loops=max(1, sessions // 20)))
    simulate.write_file(str(path), spans, "otlp_json")
    return len(spans)


def bench_replay(sessions: int = 2000, repeat: int = 3) -> dict[str, float]:
    from streams.ingest import decode
    from streams.replay import REPLAY_LIMITS, run

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "traffic.otlp.jsonl"
        n_spans = make_file(path, sessions)
        lines = path.read_bytes().splitlines()
        size = path.stat().st_size

        def best(fn) -> float:  # noqa: ANN001
            times = []
            for _ in range(repeat):
                gc.collect()
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            return min(times)

        def loads_all() -> None:
            for x in lines:
                orjson.loads(x)

        def decode_all() -> None:
            for x in lines:
                decode(x, limits=REPLAY_LIMITS)

        t_orjson = best(loads_all)
        t_decode = best(decode_all)
        t_replay = best(lambda: run([open(path, "rb")], io.BytesIO(), io.BytesIO()))  # noqa: SIM115
    return {
        "spans": n_spans,
        "bytes": size,
        "orjson_spans_per_s": n_spans / t_orjson,
        "decode_spans_per_s": n_spans / t_decode,
        "replay_spans_per_s": n_spans / t_replay,
        "decode_ratio": t_orjson / t_decode,
        "replay_ratio": t_orjson / t_replay,
    }


def _history(i: int):  # noqa: ANN202
    from streams.models import Span

    sid = f"session-{i:08d}"
    trace = f"{i:032x}"
    base = 1_767_225_600 * 10**9 + i * 1000
    out = []
    for j in range(8):
        tool = ("search", "read_file", "http_get", "search")[j % 4]
        attrs = {"gen_ai.conversation.id": sid, "gen_ai.operation.name": "execute_tool",
                 "gen_ai.tool.name": tool, "tool.payload_hash": f"{(i * 31 + j) % 997:016x}"}
        if j % 3 == 2:
            attrs = {"gen_ai.conversation.id": sid, "gen_ai.operation.name": "chat",
                     "agent.state_hash": f"st{j // 3}", "gen_ai.usage.input_tokens": 900,
                     "gen_ai.usage.output_tokens": 120}
        out.append(Span(trace, f"{i * 16 + j:016x}", None, tool, "INTERNAL", base + j * 10**9,
                        base + j * 10**9 + 10**8, "OK", "", attrs, {"service.name": "svc", "tenant.id": "acme"}))
    return out


def bench_memory(sessions: int = 50_000) -> dict[str, float]:
    from streams.replay import Replayer

    rep = Replayer()
    rep.feed(_history(-1 % 10**9))  # warm caches
    gc.collect()
    before = _rss_bytes()
    for i in range(sessions):
        rep.feed(_history(i))
    gc.collect()
    after = _rss_bytes()
    n = len(rep.states)
    dumped = sum(len(rep.pipe.dump(st)) for st in list(rep.states.values())[:1000]) / min(n, 1000)
    return {"sessions": n, "rss_bytes_per_session": (after - before) / n, "state_bytes_per_session": dumped}


# ----------------------------------------------------------------------------- the broker of the live parts


def parse_brokers(value: str) -> list[str]:
    """A ``--broker`` value → the brokers to run the live parts on, in order.

    ``tansu`` (the embedded broker), ``kafka`` (Apache Kafka started by ``deploy/kafka.sh``), or
    the addresses of one existing Kafka cluster (``kafka://host:port``, comma separated; the
    scheme is optional); several choices are comma separated.

    >>> parse_brokers("kafka")
    ['kafka']
    >>> parse_brokers("tansu,kafka")
    ['tansu', 'kafka']
    >>> parse_brokers("tansu,kafka://127.0.0.1:19092,127.0.0.1:19093")
    ['tansu', 'kafka://127.0.0.1:19092,kafka://127.0.0.1:19093']
    >>> parse_brokers("redpanda")
    Traceback (most recent call last):
    ...
    ValueError: --broker: expected tansu, kafka or kafka://host:port[,host:port], got 'redpanda'
    """
    out: list[str] = []
    cluster: list[str] = []
    for raw in value.split(","):
        part = raw.strip()
        if not part:
            continue
        if part.lower() in ("tansu", "kafka"):
            if part.lower() not in out:
                out.append(part.lower())
            continue
        hostport = part.removeprefix("kafka://")
        host, _, port = hostport.rpartition(":")
        if "://" in hostport or not host or not port.isdigit():
            raise ValueError(f"--broker: expected tansu, kafka or kafka://host:port[,host:port], got {part!r}")
        cluster.append(f"kafka://{hostport}")
    if cluster:
        out.append(",".join(cluster))
    if not out:
        raise ValueError("--broker: no broker given")
    return out


def _kafka_script() -> Path:
    return Path(__file__).resolve().parent.parent / "deploy" / "kafka.sh"


class LiveBroker:
    """The broker the live parts run on; a context manager that starts and stops what it owns.

    * ``"tansu"``: the embedded Tansu broker (:class:`streams.broker.EmbeddedBroker`), started here;
    * ``"kafka"``: Apache Kafka (KRaft, one broker+controller node) started here by
      ``deploy/kafka.sh start`` in a private run dir, stopped by its pid (``deploy/kafka.sh stop``);
      the script fetches the broker's jars with Maven the first time and needs Java 17+;
    * ``"kafka://host:port[,…]"``: an existing Kafka cluster, neither started nor stopped;
    * ``bootstrap=``: a broker of that kind already running elsewhere (not stopped here).

    >>> b = LiveBroker("kafka://127.0.0.1:19092")
    >>> b.kind, b.bootstrap, b.label
    ('kafka', '127.0.0.1:19092', 'Kafka (an existing cluster)')
    >>> LiveBroker("tansu").worker_env()
    {}
    """

    def __init__(self, spec: str = "tansu", *, bootstrap: str | None = None) -> None:
        from streams.broker import _bootstrap_servers

        spec = spec.strip()
        if spec.lower() in ("tansu", "kafka"):
            self.kind, self.existing = spec.lower(), None
        else:
            (spec,) = parse_brokers(spec)
            self.kind, self.existing = "kafka", _bootstrap_servers(spec)
        self.spec = spec
        self._given = _bootstrap_servers(bootstrap) if bootstrap else None
        self._bootstrap: str | None = self.existing or self._given
        self._embedded: Any = None
        self._run_dir: str | None = None
        self.version: str | None = None
        self.startup_seconds: float | None = None
        self._entered = 0

    @property
    def owned(self) -> bool:
        """Started (and so stopped) here."""
        return self.existing is None and self._given is None

    @property
    def bootstrap(self) -> str:
        if self._bootstrap is None:
            raise RuntimeError(f"broker {self.spec!r} not started")
        return self._bootstrap

    @property
    def label(self) -> str:
        """How the tables name it."""
        if self.kind == "tansu":
            return "Tansu (embedded)"
        if self.existing is not None:
            return "Kafka (an existing cluster)"
        if self._given is not None:
            return "Apache Kafka"
        return f"Apache Kafka {self.version or ''} (KRaft, one node)".replace("  ", " ")

    def worker_env(self) -> dict[str, str]:
        """What the worker needs on top of :class:`streams.dev.WorkerProcess`'s environment.

        ``WorkerProcess`` shortens the group session and rebalance timeouts to 3 s for Tansu's slow
        group joins; Kafka refuses a session timeout under its ``group.min.session.timeout.ms``
        (6 s by default), so on Kafka the worker keeps the product's defaults."""
        if self.kind == "tansu":
            return {}
        from streams.settings import Settings

        fields = Settings.model_fields
        return {
            "BREAKWATER_GROUP_SESSION_TIMEOUT_S": str(fields["group_session_timeout_s"].default),
            "BREAKWATER_GROUP_REBALANCE_TIMEOUT_S": str(fields["group_rebalance_timeout_s"].default),
        }

    def start(self) -> str:
        from streams.broker import ping
        from streams.errors import UserError

        if self._bootstrap is not None:
            if self.existing is not None and not ping(self.existing, timeout=5):
                raise UserError(f"--broker: no Kafka answers at {self.spec}")
            return self._bootstrap
        t0 = time.monotonic()
        try:
            if self.kind == "tansu":
                from streams.broker import EmbeddedBroker

                self._embedded = EmbeddedBroker()
                self._bootstrap = self._embedded.start()
            else:
                self._bootstrap = self._start_kafka()
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0
        return self._bootstrap

    def _start_kafka(self) -> str:
        from streams.errors import UserError

        script = _kafka_script()
        if not script.is_file():
            raise UserError("--broker kafka: deploy/kafka.sh is not there (run bench from a checkout of the "
                            "project), or point it at a running cluster with --broker kafka://host:port")
        if shutil.which(os.environ.get("JAVA", "java")) is None:
            raise UserError("--broker kafka needs Java 17+ (Debian: openjdk-17-jre-headless), "
                            "or a running cluster: --broker kafka://host:port")
        self._run_dir = tempfile.mkdtemp(prefix="breakwater-bench-kafka-")
        proc = subprocess.run(  # noqa: S603
            ["bash", str(script), "start", "--run-dir", self._run_dir, "--watch-pid", str(os.getpid()),
             "--timeout", "180"],
            capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            raise RuntimeError(f"deploy/kafka.sh start failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        m = re.search(r"Kafka (\S+) up in", proc.stderr)
        self.version = m.group(1) if m else None
        return proc.stdout.strip().splitlines()[-1]

    def stop(self) -> None:
        """Stop what was started here, by its pid. Idempotent."""
        if self._embedded is not None:
            self._embedded.stop()
            self._embedded = None
            self._bootstrap = None
        if self._run_dir is not None:
            from streams.broker import _alive, _proc_cmdline, stop_pid

            run = self._run_dir
            try:
                pid = int(Path(run, "pid").read_text().split()[0])
            except (OSError, ValueError, IndexError):
                pid = None
            try:
                subprocess.run(  # noqa: S603
                    ["bash", str(_kafka_script()), "stop", "--run-dir", run, "--timeout", "30"],
                    capture_output=True, text=True, timeout=90, stdin=subprocess.DEVNULL)
            except (OSError, subprocess.TimeoutExpired):
                pass
            if pid is not None and _alive(pid) and f"{run}/server.properties" in (_proc_cmdline(pid) or []):
                stop_pid(pid, timeout=10)  # the script could not: still ours, by its own command line
            shutil.rmtree(run, ignore_errors=True)
            self._run_dir = None
            self._bootstrap = None

    def __enter__(self) -> LiveBroker:
        if self._entered == 0:
            self.start()
        self._entered += 1  # nested ``with`` blocks share one start and one stop (the outermost)
        return self

    def __exit__(self, *exc: object) -> None:
        self._entered -= 1
        if self._entered == 0:
            self.stop()

    def __repr__(self) -> str:
        return f"<LiveBroker {self.spec} {self._bootstrap or 'not started'}>"


# ----------------------------------------------------------------------------- live (one worker)


def _recent(traffic: list[dict]) -> list[dict]:
    """Shift simulated traffic so it ends a minute ago: a live worker rejects spans dated far from
    its wall clock (``max_clock_skew_s`` / ``max_span_age_s``)."""
    if not traffic:
        return traffic
    return _shift(traffic, time.time_ns() - 60 * 10**9 - max(s["end_time_unix_nano"] for s in traffic))


def _shift(spans: list[dict], ns: int) -> list[dict]:
    """Move flat spans (and their events) ``ns`` later in event time, in place."""
    for s in spans:
        s["start_time_unix_nano"] += ns
        s["end_time_unix_nano"] += ns
        for e in s.get("events") or ():
            if "time_unix_nano" in e:
                e["time_unix_nano"] += ns
    return spans


def _traffic(n_spans: int, seed: int, start_ns: int, **kw: float) -> list[dict]:
    """``n_spans`` flat spans of simulated mixed traffic (event-time order), no injected failures."""
    import itertools

    from streams import simulate

    return list(itertools.islice(simulate.generate(seed, 10**7, start_ns, loops=0, **kw), n_spans))


def _batches(spans: list[dict], per_message: int) -> list[tuple[bytes | None, bytes, int]]:
    """Mixed-session JSON arrays of ``per_message`` spans, as an SDK batch exporter sends them."""
    out = []
    for i in range(0, len(spans), per_message):
        chunk = spans[i:i + per_message]
        out.append((None, orjson.dumps(chunk), len(chunk)))
    return out


def _live_settings(bootstrap: str, tag: str, partitions: int):  # noqa: ANN202
    from streams.settings import Settings

    return Settings(
        broker=f"kafka://{bootstrap}", partitions=partitions, app_id=f"bench-{tag}",
        topic_spans=f"bench-spans-{tag}", topic_otlp=f"bench-otlp-{tag}",
        topic_incidents=f"bench-incidents-{tag}", topic_breaker=f"bench-breaker-{tag}",
        topic_dlq=f"bench-dlq-{tag}",
    )


def _worker_env(settings) -> dict[str, str]:  # noqa: ANN001
    return {
        "BREAKWATER_PARTITIONS": str(settings.partitions),
        "BREAKWATER_TOPIC_SPANS": settings.topic_spans,
        "BREAKWATER_TOPIC_OTLP": settings.topic_otlp,
        "BREAKWATER_TOPIC_INCIDENTS": settings.topic_incidents,
        "BREAKWATER_TOPIC_BREAKER": settings.topic_breaker,
        "BREAKWATER_TOPIC_DLQ": settings.topic_dlq,
    }


async def _produce(bootstrap: Any, topic: str, records: list[tuple[bytes | None, bytes, int]]) -> float:
    from aiokafka import AIOKafkaProducer

    from streams.settings import kafka_client_kwargs

    prod = AIOKafkaProducer(**kafka_client_kwargs(bootstrap, acks=1, linger_ms=5, max_request_size=4 << 20,
                                                  max_batch_size=1 << 20))  # Settings (security) or a bootstrap
    await prod.start()
    t0 = time.perf_counter()
    try:
        futs = []
        for key, value, _ in records:
            futs.append(await prod.send(topic, value, key=key))
            if len(futs) >= 500:
                for f in futs:
                    await f
                futs = []
        for f in futs:
            await f
        await prod.flush()
    finally:
        await prod.stop()
    return time.perf_counter() - t0


async def _raw_consume(bootstrap: Any, topic: str, n_msgs: int, timeout_s: float) -> tuple[int, float]:
    """A plain aiokafka consumer that only fetches and ``orjson.loads`` every message: the ceiling.

    Returns (spans, seconds from the first fetch request to the last message)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from streams.settings import kafka_client_kwargs

    c = AIOKafkaConsumer(**kafka_client_kwargs(bootstrap, enable_auto_commit=False, auto_offset_reset="earliest",
                                               fetch_max_wait_ms=100, max_partition_fetch_bytes=8 << 20,
                                               fetch_max_bytes=64 << 20))
    await c.start()
    try:
        parts = c.partitions_for_topic(topic)
        while not parts:
            await c._client.force_metadata_update()  # noqa: SLF001
            parts = c.partitions_for_topic(topic)
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        c.assign(tps)
        await c.seek_to_beginning(*tps)
        await c.position(tps[0])  # the seek happens now, not inside the timed loop
        got = spans = 0
        deadline = time.monotonic() + timeout_s
        t0 = time.perf_counter()
        while got < n_msgs and time.monotonic() < deadline:
            batch = await c.getmany(timeout_ms=200, max_records=10_000)
            for msgs in batch.values():
                for m in msgs:
                    spans += len(orjson.loads(m.value))
                got += len(msgs)
        if got < n_msgs:
            raise RuntimeError(f"raw consumer read {got} of {n_msgs} messages in {timeout_s}s")
        return spans, time.perf_counter() - t0
    finally:
        await c.stop()


def scrape(port: int, timeout_s: float = 2.0) -> dict[str, float]:
    """One scrape of a worker's ``/metrics``: sample name with labels → value (``_created`` dropped)."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout_s) as r:  # noqa: S310
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        name, _, value = line.rpartition(" ")
        if "_created" in name:
            continue
        try:
            out[name] = float(value)
        except ValueError:
            continue
    return out


def _stage_spans(sample: dict[str, float], stage: str) -> float:
    return sample.get(f'breakwater_stage_spans_total{{stage="{stage}"}}', 0.0)


def _spans_in(sample: dict[str, float]) -> float:
    return sum(v for k, v in sample.items() if k.startswith("breakwater_spans_in_total"))


class _Poller:
    """Scrapes a worker's metrics every ``interval_s`` in a thread, keeping (time, sample) pairs."""

    def __init__(self, port: int, interval_s: float = 0.2) -> None:
        import threading

        self.port, self.interval_s = port, interval_s
        self.samples: list[tuple[float, dict[str, float]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="bench-poller")

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                s = scrape(self.port, timeout_s=1.0)
                self.samples.append((time.perf_counter(), s))
            except OSError:
                pass
            self._stop.wait(self.interval_s)

    def __enter__(self) -> _Poller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def wait(self, done, timeout_s: float) -> tuple[float, dict[str, float]]:  # noqa: ANN001
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.samples and done(self.samples[-1][1]):
                return self.samples[-1]
            time.sleep(self.interval_s / 2)
        last = self.samples[-1][1] if self.samples else {}
        raise TimeoutError(f"worker did not finish in {timeout_s}s (last sample: spans in {_spans_in(last):.0f}, "
                           f"session stage {_stage_spans(last, 'session'):.0f})")


class _log_on_error:  # noqa: N801
    """Re-raise a failure with the tail of the worker's log (its data dir is about to go)."""

    def __init__(self, worker) -> None:  # noqa: ANN001
        self.worker = worker

    def __enter__(self) -> None:
        return None

    def __exit__(self, tp, exc, tb) -> None:  # noqa: ANN001
        if exc is not None and not isinstance(exc, KeyboardInterrupt):
            raise RuntimeError(f"{exc}\n--- worker log (tail) ---\n{self.worker.log_text()[-4000:]}") from exc


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_of(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def bench_e2e(spans: int = 100_000, *, per_message: int = 100, partitions: int = 4, bootstrap: str | None = None,
              seed: int = 11, timeout_s: float = 600.0, profile: str | None = None,
              worker_env: dict[str, str] | None = None) -> dict[str, float]:
    """Spans/s of one worker on pre-produced traffic, next to a raw consume+decode of the same topic.

    ``spans`` of simulated mixed traffic go to ``agent.spans`` as JSON arrays of ``per_message``
    spans (mixed sessions, as an SDK batch exporter sends them). A plain aiokafka consumer reads
    and ``orjson.loads`` every message (the ceiling); then one worker starts on the same topic and
    its rate is taken from its own metrics, from the first scrape that shows spans decoded to the
    scrape where the session and trace stages have processed every span. ``profile`` = a path:
    run ``py-spy record`` on the worker meanwhile (speedscope JSON written there).
    """
    import asyncio
    import uuid

    from streams.app import ensure_topics
    from streams.broker import EmbeddedBroker
    from streams.dev import WorkerProcess

    broker = None
    if bootstrap is None:
        broker = EmbeddedBroker()
        bootstrap = broker.start()
    worker = spy = None
    try:
        settings = _live_settings(bootstrap, uuid.uuid4().hex[:8], partitions)
        asyncio.run(ensure_topics(settings))
        records = _batches(_recent(_traffic(spans, seed, 0)), per_message)
        n_spans = sum(r[2] for r in records)
        t_produce = asyncio.run(_produce(settings, settings.topic_spans, records))
        raw_spans, raw_s = asyncio.run(_raw_consume(settings, settings.topic_spans, len(records), timeout_s))
        del records
        gc.collect()
        with tempfile.TemporaryDirectory(prefix="breakwater-bench-") as d:
            worker = WorkerProcess(bootstrap, app_id=settings.app_id, data_dir=d,
                                   extra_env={**_worker_env(settings), **(worker_env or {})})
            with _Poller(worker.metrics_port) as poll, _log_on_error(worker):
                worker.start(wait_ready_s=0)
                t_first, first = poll.wait(lambda s: _spans_in(s) > 0, timeout_s)
                if profile:  # the steady state only, not start-up
                    import subprocess

                    spy = subprocess.Popen(  # noqa: S603
                        ["py-spy", "record", "--pid", str(worker.proc.pid), "--format", "speedscope",
                         "--output", profile, "--rate", "100", "--nonblocking"],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                cpu0 = _cpu_s(worker.proc.pid)
                t_done, last = poll.wait(lambda s: _stage_spans(s, "session") >= n_spans
                                      and _stage_spans(s, "trace") >= n_spans, timeout_s)
                rss = _rss_of(worker.proc.pid)
                cpu = _cpu_s(worker.proc.pid) - cpu0
            counted = n_spans - min(_stage_spans(first, "session"), _stage_spans(first, "trace"))
            worker_s = t_done - t_first
            if spy is not None:
                spy.send_signal(2)
                spy.wait(30)
            worker.stop()
    finally:
        if spy is not None and spy.poll() is None:
            spy.kill()
            spy.wait(5)
        if worker is not None:
            worker.stop()
        if broker is not None:
            broker.stop()
    raw_rate = raw_spans / raw_s if raw_s > 0 else float("inf")
    worker_rate = counted / worker_s if worker_s > 0 else float("inf")
    return {
        "spans": n_spans,
        "messages": -(-n_spans // per_message),
        "spans_per_message": per_message,
        "partitions": partitions,
        "produce_spans_per_s": n_spans / t_produce,
        "raw_spans_per_s": raw_rate,
        "worker_spans_per_s": worker_rate,
        "ratio": worker_rate / raw_rate,
        "worker_seconds": worker_s,
        "worker_cpu_share": cpu / worker_s if worker_s > 0 else 0.0,
        "batches": {st: last.get(f'breakwater_batch_seconds_count{{stage="{st}"}}', 0.0)
                    for st in ("ingest", "session", "trace", "workflow", "scope")},
        "state_writes": {st: last.get(f'breakwater_state_writes_total{{stage="{st}"}}', 0.0)
                         for st in ("session", "trace", "workflow", "scope")},
        "worker_rss_bytes": rss,
    }


def _flat(trace: str, span: int, sid: str, t_ns: int, attrs: dict) -> dict:
    return {"trace_id": trace, "span_id": f"{span:016x}", "parent_span_id": None, "name": attrs.get(
        "gen_ai.tool.name", "chat"), "kind": "INTERNAL", "start_time_unix_nano": t_ns - 50_000_000,
        "end_time_unix_nano": t_ns, "status": {"code": "OK"},
        "attributes": {"gen_ai.conversation.id": sid, **attrs},
        "resource": {"service.name": "bench-agent", "tenant.id": "bench"}}


def _loop_spans(i: int, t_ns: int, n: int) -> list[dict]:
    """``n`` identical tool calls of session ``bench-loop-i`` (the 3rd opens no_progress_loop)."""
    a = {"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "search", "tool.payload_hash": f"{i:016x}"}
    return [_flat(f"{i + 1:032x}", (i << 8) + j + 1, f"bench-loop-{i}", t_ns + j, a) for j in range(n)]


def _storm_spans(i: int, t_ns: int, n: int, first: int = 0) -> list[dict]:
    """Retried chat calls of session ``bench-storm-i`` (the 10th opens a session retry_storm)."""
    a = {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai", "gen_ai.request.model": "gpt-4o",
         "http.request.resend_count": 1}
    return [_flat(f"{(1 << 120) + i:032x}", (1 << 40) + (i << 8) + first + j + 1, f"bench-storm-{i}",
                  t_ns + j, a) for j in range(n)]


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(round(q * (len(xs) - 1)))))] if xs else float("nan")


async def _keep_pace(futs: list, n: int, rate: float, t0: float, stop: Any = None) -> None:
    """After a send of a paced producer: await the acks every 50 messages (``futs`` is emptied), then
    sleep until ``n`` spans are due at ``rate`` spans/s from ``t0`` (or until ``stop``, an asyncio.Event)."""
    import asyncio

    if len(futs) >= 50:
        await asyncio.gather(*futs)
        futs.clear()
    ahead = n / rate - (time.perf_counter() - t0)
    if ahead <= 0:
        return
    if stop is None:
        await asyncio.sleep(ahead)
    else:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), ahead)


async def _watch_incidents(settings, got: dict[tuple[str, str], float], *,  # noqa: ANN001, ANN202
                           from_end: bool = False):
    """Read ``agent.incidents`` in a task, recording (detector, session) → ``perf_counter`` when first
    read; from the beginning of the topic, or from its end. Returns (consumer, task): cancel the task,
    then stop the consumer."""
    import asyncio

    from aiokafka import AIOKafkaConsumer, TopicPartition

    from streams.settings import kafka_client_kwargs

    c = AIOKafkaConsumer(**kafka_client_kwargs(settings, enable_auto_commit=False, fetch_max_wait_ms=20))
    await c.start()
    tps = [TopicPartition(settings.topic_incidents, p) for p in range(settings.partitions)]
    c.assign(tps)
    await (c.seek_to_end(*tps) if from_end else c.seek_to_beginning(*tps))

    async def read() -> None:
        while True:
            batch = await c.getmany(timeout_ms=50)
            now = time.perf_counter()
            for msgs in batch.values():
                for m in msgs:
                    inc = orjson.loads(m.value)
                    got.setdefault((inc["detector"], inc.get("session_id") or ""), now)

    return c, asyncio.create_task(read())


async def _paced(settings, rate: float, duration_s: float, per_message: int, loops_per_s: float,  # noqa: ANN001
                 storms_per_s: float, seed: int, drain_s: float) -> dict:
    import asyncio

    from aiokafka import AIOKafkaProducer

    from streams.settings import kafka_client_kwargs
    start_ns = time.time_ns() + 2 * 10**9
    spans = _traffic(int(rate * duration_s) + per_message, seed, start_ns, mean_gap_s=0.034, time_scale=0.1)
    sent: dict[tuple[str, str], float] = {}  # (detector, session) -> perf_counter at send of the trigger
    got: dict[tuple[str, str], float] = {}
    c, reader = await _watch_incidents(settings, got)
    prod = AIOKafkaProducer(**kafka_client_kwargs(settings, acks=1, linger_ms=1, max_request_size=4 << 20))
    await prod.start()
    try:
        await asyncio.sleep(max(0.0, (start_ns - time.time_ns()) / 1e9))
        t0 = time.perf_counter()
        n_sent = i = 0
        pending: list[tuple[float, list[dict], tuple[str, str] | None]] = []  # due, spans, trigger
        next_loop = next_storm = 0.0
        k_loop = k_storm = 0
        futs = []
        while i < len(spans):
            elapsed = time.perf_counter() - t0
            if elapsed > duration_s:
                break
            now_ns = time.time_ns()
            batch = spans[i:i + per_message]
            i += len(batch)
            if loops_per_s and elapsed >= next_loop:  # two calls now, the third 100 ms later
                next_loop += 1 / loops_per_s
                two = _loop_spans(k_loop, now_ns, 3)
                batch = batch + two[:2]
                pending.append((elapsed + 0.1, two[2:], ("no_progress_loop", f"bench-loop-{k_loop}")))
                k_loop += 1
            if storms_per_s and elapsed >= next_storm:  # nine retries now, the tenth 100 ms later
                next_storm += 1 / storms_per_s
                batch = batch + _storm_spans(k_storm, now_ns, 9)
                pending.append((elapsed + 0.1, _storm_spans(k_storm, now_ns + 10**8, 1, first=9),
                                ("retry_storm", f"bench-storm-{k_storm}")))
                k_storm += 1
            triggers = []
            while pending and pending[0][0] <= elapsed:
                _, extra, trig = pending.pop(0)
                for sp in extra:
                    sp["start_time_unix_nano"] = now_ns - 50_000_000
                    sp["end_time_unix_nano"] = now_ns
                batch = batch + extra
                triggers.append(trig)
            futs.append(await prod.send(settings.topic_spans, orjson.dumps(batch)))
            t_send = time.perf_counter()
            for trig in triggers:
                sent[trig] = t_send
            n_sent += len(batch)
            await _keep_pace(futs, n_sent, rate, t0)
        await asyncio.gather(*futs)
        wall = time.perf_counter() - t0
        deadline = time.perf_counter() + drain_s
        while time.perf_counter() < deadline and not set(sent) <= set(got):
            await asyncio.sleep(0.05)
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        await prod.stop()
        await c.stop()
    lat: dict[str, list[float]] = {}
    for trig, ts in sent.items():
        if trig in got:
            lat.setdefault(trig[0], []).append(got[trig] - ts)
    return {"offered_spans_per_s": n_sent / wall, "sent_spans": n_sent, "triggers": len(sent),
            "latencies": lat, "missed": sorted(t[1] for t in set(sent) - set(got))}


@contextlib.contextmanager
def _one_worker(bootstrap: str | None, partitions: int, worker_env: dict[str, str] | None = None, *,
                tag: str | None = None):  # noqa: ANN202
    """The bench's topics (``bench-…-{tag}``, a random tag by default) and one started worker on them;
    the embedded broker too unless ``bootstrap``. Yields (settings, worker); stops the worker, then
    a broker started here, by their pids, whatever happens. A failure carries the worker's log."""
    import asyncio
    import uuid

    from streams.app import ensure_topics
    from streams.broker import EmbeddedBroker
    from streams.dev import WorkerProcess

    broker = worker = None
    if bootstrap is None:
        broker = EmbeddedBroker()
        bootstrap = broker.start()
    try:
        settings = _live_settings(bootstrap, tag or uuid.uuid4().hex[:8], partitions)
        asyncio.run(ensure_topics(settings))
        with tempfile.TemporaryDirectory(prefix="breakwater-bench-") as d:
            worker = WorkerProcess(bootstrap, app_id=settings.app_id, data_dir=d,
                                   extra_env={**_worker_env(settings), **(worker_env or {})})
            with _log_on_error(worker):
                worker.start()
                yield settings, worker
            worker.stop()
    finally:
        if worker is not None:
            worker.stop()
        if broker is not None:
            broker.stop()


def bench_latency(rate: float = 5000.0, duration_s: float = 20.0, *, per_message: int = 50,
                  loops_per_s: float = 5.0, storms_per_s: float = 1.0, partitions: int = 4,
                  bootstrap: str | None = None, seed: int = 13, drain_s: float = 15.0,
                  worker_env: dict[str, str] | None = None) -> dict:
    """Span produced → incident readable on ``agent.incidents``, at a fixed offered load.

    One worker runs; a paced producer sends mixed traffic at ``rate`` spans/s (JSON arrays of
    ``per_message`` spans) and injects, ``loops_per_s`` times a second, a session whose third
    identical tool call arrives 100 ms after the first two (no_progress_loop fires on it), and
    ``storms_per_s`` times a second a session whose tenth retried call does the same
    (retry_storm, session scope). Latency is measured in this process: from the send of the
    message that carries the triggering span to the incident read back from the topic.
    """
    import asyncio

    with _one_worker(bootstrap, partitions, worker_env) as (settings, worker):
        cpu0, t_cpu0 = _cpu_s(worker.proc.pid), time.perf_counter()
        r = asyncio.run(_paced(settings, rate, duration_s, per_message, loops_per_s, storms_per_s, seed, drain_s))
        r["worker_cpu_share"] = (_cpu_s(worker.proc.pid) - cpu0) / (time.perf_counter() - t_cpu0)
        try:
            m = scrape(worker.metrics_port)
        except OSError:
            m = {}
    lats = r.pop("latencies")
    all_lat = [x for v in lats.values() for x in v]
    r["by_detector_p50_ms"] = {d: _pct(v, 0.5) * 1000 for d, v in lats.items()}
    r["_lat"] = lats
    r.update(rate=rate, per_message=per_message, incidents=len(all_lat),
             p50_ms=_pct(all_lat, 0.50) * 1000, p99_ms=_pct(all_lat, 0.99) * 1000,
             max_ms=max(all_lat) * 1000 if all_lat else float("nan"),
             spans_in=_spans_in(m))
    return r


def _shift_to_now(batch: list[dict]) -> list[dict]:
    """Move a batch of simulated spans so its last one ends now (a live worker keeps event time
    near its wall clock); durations and order inside the batch are kept."""
    return _shift(batch, time.time_ns() - max(s["end_time_unix_nano"] for s in batch))


async def _background(settings, load: float, per_message: int, seed: int, stop: Any) -> dict:  # noqa: ANN001
    """Paced mixed traffic on ``agent.spans`` at ``load`` spans/s until ``stop`` (an asyncio.Event)."""
    import asyncio
    import itertools

    from aiokafka import AIOKafkaProducer

    from streams import simulate
    from streams.settings import kafka_client_kwargs

    gen = simulate.generate(seed, 10**7, time.time_ns(), loops=0, mean_gap_s=0.034, time_scale=0.1)
    prod = AIOKafkaProducer(**kafka_client_kwargs(settings, acks=1, linger_ms=1, max_request_size=4 << 20))
    await prod.start()
    n = 0
    t0 = time.perf_counter()
    try:
        futs = []
        while load > 0 and not stop.is_set():
            batch = list(itertools.islice(gen, per_message))
            futs.append(await prod.send(settings.topic_spans, orjson.dumps(_shift_to_now(batch))))
            n += len(batch)
            await _keep_pace(futs, n, load, t0, stop)
        await asyncio.gather(*futs)
    finally:
        await prod.stop()
    wall = time.perf_counter() - t0
    return {"sent_spans": n, "offered_spans_per_s": n / wall if wall > 0 else 0.0}


async def _deny_trials(settings, guard, tracer, *, trials: int, warmup: int,  # noqa: ANN001
                       threshold: int, load: float, per_message: int, call_s: float, trial_timeout_s: float,
                       seed: int, tag: str) -> dict:
    import asyncio

    from streams.integrations.litellm import BreakwaterDenied

    incidents: dict[tuple[str, str], float] = {}  # (detector, session) -> perf_counter when read
    c, reader = await _watch_incidents(settings, incidents, from_end=True)

    async def agent(session: str) -> dict:
        """An agent stuck on one tool call: before each call its model call goes through the LiteLLM
        proxy hook; each tool call is an ``execute_tool`` span of the OpenTelemetry SDK."""
        calls = 0
        t_cross = None
        with tracer.start_as_current_span("invoke_agent", attributes={
            "gen_ai.operation.name": "invoke_agent", "gen_ai.conversation.id": session,
        }):
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < trial_timeout_s:
                data = {"model": "gpt-4o", "messages": [{"role": "user", "content": "where is order 42?"}],
                        "metadata": {"session_id": session, "tenant": "bench"}}
                try:
                    await guard.async_pre_call_hook(None, None, data, "acompletion")
                except BreakwaterDenied as exc:
                    t_deny = time.perf_counter()
                    return {"session": session, "calls": calls, "t_cross": t_cross, "t_deny": t_deny,
                            "action": exc.decision.action, "reason": exc.decision.reason}
                with tracer.start_as_current_span("execute_tool search", attributes={
                    "gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "search",
                    "gen_ai.tool.call.arguments": '{"order": 42}', "gen_ai.conversation.id": session,
                }):
                    await asyncio.sleep(call_s)
                calls += 1
                if calls == threshold:  # this span's end is what the detector fires on
                    t_cross = time.perf_counter()
        return {"session": session, "calls": calls, "t_cross": t_cross, "t_deny": None}

    stop = asyncio.Event()
    bg = asyncio.create_task(_background(settings, load, per_message, seed, stop))
    results = []
    try:
        await asyncio.sleep(2.0)  # the background load reaches its pace first
        for i in range(warmup + trials):
            r = await agent(f"bench-deny-{tag}-{i}")
            if i >= warmup:
                results.append(r)
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # incidents still on their way (they only split the figure)
    finally:
        stop.set()
        reader.cancel()
        try:
            background = await bg
        finally:
            await asyncio.gather(reader, return_exceptions=True)
            await c.stop()
    deny, to_incident, misses = [], [], []
    for r in results:
        if r["t_deny"] is None or r["t_cross"] is None:
            misses.append(r["session"])
            continue
        deny.append(r["t_deny"] - r["t_cross"])
        seen = incidents.get(("no_progress_loop", r["session"]))
        if seen is not None:
            to_incident.append(seen - r["t_cross"])
    return {"deny": deny, "to_incident": to_incident, "missed": misses, **background,
            "reasons": sorted({r.get("reason") or "" for r in results if r["t_deny"] is not None})}


def bench_deny(trials: int = 50, *, load: float = 500.0, per_message: int = 50, partitions: int = 4,
               bootstrap: str | None = None, worker_env: dict[str, str] | None = None, call_s: float = 0.01,
               warmup: int = 1, trial_timeout_s: float = 20.0, seed: int = 17) -> dict:
    """Span → gateway deny: an agent instrumented with the OpenTelemetry SDK loops on one tool call;
    the time from the end of the call that makes ``no_progress_loop`` fire (the policy's
    ``repeat_threshold``-th identical call) until the LiteLLM hook denies the agent's next call.

    One worker runs (default policy) while a paced producer offers ``load`` spans/s of simulated mixed
    traffic (JSON arrays of ``per_message`` spans) as background. The agent's tracer exports through
    :class:`streams.exporter.KafkaSpanExporter` (a ``SimpleSpanProcessor``: the exporter's own linger
    batches); before each model call it goes through
    :meth:`streams.integrations.litellm.BreakwaterGuard.async_pre_call_hook`, the guard owning its
    :class:`~streams.gateway.BreakerClient` as a LiteLLM proxy's does. Each tool call lasts ``call_s``,
    so a figure includes the wait for the agent's next call (at most ``call_s``). ``trials`` agents
    run one after another, each a new session, after ``warmup`` uncounted ones. The incident's
    arrival on ``agent.incidents`` (read by this process) splits the figure in two.
    """
    import asyncio
    import uuid

    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # LiteLLM's bundled price map, no network
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    from streams.exporter import KafkaSpanExporter
    from streams.integrations.litellm import BreakwaterGuard
    from streams.policy import Policy

    threshold = Policy().loop_params(None).repeat_threshold
    tag = uuid.uuid4().hex[:8]
    with _one_worker(bootstrap, partitions, worker_env, tag=tag) as (settings, worker):
        guard = provider = None
        try:
            guard = BreakwaterGuard(settings=settings, ready_timeout_s=30.0)
            guard.enforce({"model": "gpt-4o", "metadata": {"session_id": f"bench-deny-{tag}-ready"}})
            if not guard.client.ready:
                raise RuntimeError("the LiteLLM guard's breaker client did not catch up in 30 s")
            provider = TracerProvider(resource=Resource.create({"service.name": "bench-agent", "tenant.id": "bench"}))
            provider.add_span_processor(SimpleSpanProcessor(KafkaSpanExporter(settings)))
            tracer = provider.get_tracer("breakwater-bench")
            cpu0, t_cpu0 = _cpu_s(worker.proc.pid), time.perf_counter()
            r = asyncio.run(_deny_trials(settings, guard, tracer, trials=trials, warmup=warmup, threshold=threshold,
                                         load=load, per_message=per_message, call_s=call_s,
                                         trial_timeout_s=trial_timeout_s, seed=seed, tag=tag))
            r["worker_cpu_share"] = (_cpu_s(worker.proc.pid) - cpu0) / (time.perf_counter() - t_cpu0)
        finally:
            if provider is not None:
                provider.shutdown()
            if guard is not None:
                guard.close()
    deny, inc = r["deny"], r["to_incident"]
    r.update(load=load, trials=trials, warmup=warmup, threshold=threshold, call_s=call_s, per_message=per_message,
             p50_ms=_pct(deny, 0.50) * 1000,  # a trial never denied counts as late:
             p99_ms=_pct(deny + [float("inf")] * len(r["missed"]), 0.99) * 1000,
             max_ms=max(deny) * 1000 if deny else float("nan"),
             incident_p50_ms=_pct(inc, 0.50) * 1000, incident_p99_ms=_pct(inc, 0.99) * 1000)
    return r


def deny_table(runs: Sequence[tuple[str, dict]]) -> list[str]:
    """Markdown lines of span → gateway deny: one ``(broker label, bench_deny result)`` per broker."""
    if not runs:
        return []
    x0 = runs[0][1]
    lines = [
        "Span → gateway deny: an agent instrumented with the OpenTelemetry SDK (`SimpleSpanProcessor` → "
        "`KafkaSpanExporter`) repeats one tool call; from the end of its "
        f"{_ordinal(x0['threshold'])} identical call (where `no_progress_loop` fires) until the LiteLLM proxy "
        f"hook (`BreakwaterGuard`) denies its next model call. One worker, default policy; each tool call "
        f"takes {x0['call_s'] * 1000:.0f} ms, so a figure includes up to that wait for the next call; "
        "background: paced mixed traffic (JSON arrays of "
        f"{x0['per_message']} spans); one new session per trial, after {x0['warmup']} uncounted:",
        "",
        "| broker | background offered spans/s | delivered | trials | deny p50 | deny p99 | max | "
        "span → incident p50 | span → incident p99 | denied |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, x in runs:
        lines.append(
            f"| {label} | {x['load']:,.0f} | {x['offered_spans_per_s']:,.0f} | {x['trials']} | {_ms(x['p50_ms'])} | "
            f"{_ms(x['p99_ms'])} | "
            f"{_ms(x['max_ms'])} | {_ms(x['incident_p50_ms'])} | {_ms(x['incident_p99_ms'])} | "
            f"{len(x['deny'])} of {x['trials']} |")
    lines.append("")
    return lines


def deny_missing() -> str | None:
    """Why :func:`bench_deny` cannot run here (it needs LiteLLM and the OpenTelemetry SDK), or None."""
    import importlib.util

    need = {"litellm": "litellm", "opentelemetry.sdk": "opentelemetry-sdk"}
    missing = []
    for mod, dist in need.items():
        try:
            found = importlib.util.find_spec(mod) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            missing.append(dist)
    return f"needs {' and '.join(missing)}: pip install 'breakwater[litellm]' opentelemetry-sdk" if missing else None


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def bench_memory_keys(keys: int = 100_000) -> dict[str, dict[str, float]]:
    """RSS delta and persisted bytes per key, for each kind of state a worker keeps.

    In-process with the stage classes the worker runs: ``session`` (8 spans of loop / cost /
    retry state), ``pending trace`` (silent_success buffering a trace whose root has not ended),
    ``route`` and ``tenant`` (retry_storm / cost_velocity cores fed one forwarded aggregate).
    ``live index`` is what the worker itself holds per key besides the table (its least recently
    seen index and a timer): the states themselves live in RocksDB and the changelog.
    """
    import heapq
    from collections import OrderedDict

    from streams.models import Span
    from streams.policy import Policy
    from streams.stages import build_stages

    session, trace, _, scope = build_stages(Policy())
    wm = 1_767_225_600 * 10**9

    fwd: dict[str, dict] = {}
    st, outs = session.step(session.new_state(), _history(0), wm)
    for o in outs:
        if o.kind == "forward":
            fwd.setdefault(o.key.decode().partition(":")[0], o.payload)

    def child(i: int) -> list:
        return [Span(s.trace_id, s.span_id, f"{i + 1:016x}", s.name, s.kind, s.start_ns, s.end_ns, s.status,
                     s.status_message, s.attributes, s.resource) for s in _history(i)]

    def measure(make, dump) -> dict[str, float]:  # noqa: ANN001
        make(-1)
        gc.collect()
        before = _rss_bytes()
        held = [make(i) for i in range(keys)]
        gc.collect()
        after = _rss_bytes()
        sample = held[: min(1000, keys)]
        dumped = sum(len(dump(x)) for x in sample) / len(sample) if dump else 0.0
        del held
        gc.collect()
        return {"rss_bytes": (after - before) / keys, "state_bytes": dumped}

    res = {
        "session": measure(lambda i: session.step(session.new_state(), _history(i), wm)[0], session.dump),
        "pending trace": measure(lambda i: trace.step(trace.new_state(), child(i), wm)[0], trace.dump),
    }
    for kind in ("route", "tenant"):
        if kind in fwd:
            res[kind] = measure(lambda i, k=kind: scope.step_key(scope.new_state(), f"{k}:{k}-{i}", [fwd[k]], wm)[0],
                                scope.dump)

    def live_index(i: int) -> None:
        key = f"session-{i:08d}".encode()
        live_od[key] = wm + i
        heapq.heappush(live_heap, (wm + i, key))

    live_od: OrderedDict = OrderedDict()
    live_heap: list = []
    gc.collect()
    before = _rss_bytes()
    for i in range(keys):
        live_index(i)
    gc.collect()
    res["live index"] = {"rss_bytes": (_rss_bytes() - before) / keys, "state_bytes": 0.0}
    return res


def _ms(x: float) -> str:
    if x == float("inf"):
        return "not in time"
    return "n/a" if x != x else f"{x:,.0f} ms"  # noqa: PLR0124 - NaN check


def live_tables(runs: Sequence[tuple[str, dict, list[dict]]]) -> list[str]:
    """Markdown lines of the live parts: one ``(broker label, bench_e2e result, bench_latency
    results)`` per broker, each broker's ratio against the raw consumer on that broker in that run."""
    if not runs:
        return []
    e0 = runs[0][1]
    lines = [
        f"End to end, one worker, {e0['spans']:,} spans of simulated mixed traffic pre-produced to `agent.spans` "
        f"as JSON arrays of {e0['spans_per_message']} spans, {e0['partitions']} partitions; each broker's ratio is "
        "to the raw consumer on that broker, measured in the same run:",
        "",
        "| broker | consumer | spans/s | ratio to raw |",
        "|---|---|---:|---:|",
    ]
    for label, e, _ in runs:
        lines += [
            f"| {label} | raw aiokafka consumer + `orjson.loads` (ceiling) | {e['raw_spans_per_s']:,.0f} | 1.00 |",
            f"| {label} | one worker: ingest, repartition, 4 detector stages, state writes | "
            f"{e['worker_spans_per_s']:,.0f} | {e['ratio']:.3f} |",
        ]
    lines += ["", "The worker while it ran (state writes are written behind: a changed key once per offset "
              "commit):", ""]
    for label, e, _ in runs:
        lines.append(
            f"- {label}: CPU {e['worker_cpu_share']:.0%} of a core, RSS {e['worker_rss_bytes'] / 2**20:,.0f} MiB; "
            "state writes " + ", ".join(f"{k} {v:,.0f}" for k, v in e["state_writes"].items()) + ".")
    lines += [
        "",
        "Detection latency: span sent → incident readable on `agent.incidents`, one worker, paced producer "
        "(JSON arrays of 50 spans) with injected loops (5/s) and session retry storms (1/s):",
        "",
        "| broker | offered spans/s | delivered | loop p50 | loop p99 | retry storm p50 | incidents seen |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, _, lat in runs:
        for x in lat:
            loop = x["_lat"].get("no_progress_loop", [])
            storm = x["_lat"].get("retry_storm", [])
            lines.append(
                f"| {label} | {x['rate']:,.0f} | {x['offered_spans_per_s']:,.0f} | {_ms(_pct(loop, .5) * 1000)} | "
                f"{_ms(_pct(loop, .99) * 1000)} | {_ms(_pct(storm, .5) * 1000)} | "
                f"{x['incidents']} of {x['triggers']} |")
    lines += ["", "A retry storm is a window detector: it opens when the watermark (max event time − 5 s "
              "allowed lateness) closes the window, so its latency is the lateness, by design.", ""]
    return lines


# issue 11's goals that the bench measures (see goals_table)
GOAL_REPLAY_RATIO = 0.25
GOAL_E2E_RATIO = 0.12
GOAL_LOAD = 5000.0
GOAL_LOOP_P99_MS = 250.0
GOAL_STORM_P99_MS = 500.0
GOAL_SESSION_RSS_BYTES = 1024.0


def _p99_with_misses(x: dict, detector: str, prefix: str) -> tuple[float, int, int]:
    """p99 (ms) of one detector's latencies in a :func:`bench_latency` result, a trigger never seen
    counting as infinitely late; and (seen, triggered)."""
    seen = list(x["_lat"].get(detector, []))
    missed = sum(1 for s in x.get("missed", ()) if s.startswith(prefix))
    return _pct(seen + [float("inf")] * missed, 0.99) * 1000, len(seen), len(seen) + missed


def goals_table(replay: dict | None, memory_keys: dict | None,
                runs: Sequence[tuple[str, dict, list[dict]]] = ()) -> list[str]:
    """Markdown lines: issue 11's goals next to the figures of this run (``goal / measured / met?``).

    >>> print("\\n".join(goals_table({"replay_ratio": 0.3}, {"session": {"rss_bytes": 2048.0}})[2:6]))
    | goal (issue 11) | measured | met? |
    |---|---:|:---:|
    | replay ≥ 0.25 × `orjson.loads` of the same file | 0.30 | yes |
    | ≤ 1 KB (1,024 B) RSS per tracked session, all session-scoped detectors | 2,048 B | no |
    """
    def yes(ok: bool) -> str:
        return "yes" if ok else "no"

    rows: list[tuple[str, str, str]] = []
    if replay is not None:
        v = replay["replay_ratio"]
        rows.append((f"replay ≥ {GOAL_REPLAY_RATIO} × `orjson.loads` of the same file", f"{v:.2f}",
                     yes(v >= GOAL_REPLAY_RATIO)))
    if memory_keys is not None and "session" in memory_keys:
        v = memory_keys["session"]["rss_bytes"]
        rows.append((f"≤ 1 KB ({GOAL_SESSION_RSS_BYTES:,.0f} B) RSS per tracked session, all session-scoped "
                     "detectors", f"{v:,.0f} B", yes(v <= GOAL_SESSION_RSS_BYTES)))
    for label, e, lat in runs:
        rows.append((f"end to end, one worker ≥ {GOAL_E2E_RATIO} × raw consume + decode ({label})",
                     f"{e['ratio']:.3f}", yes(e["ratio"] >= GOAL_E2E_RATIO)))
        at = [x for x in lat if x["rate"] == GOAL_LOAD]
        for detector, prefix, name, goal in (("no_progress_loop", "bench-loop-", "`no_progress_loop`",
                                              GOAL_LOOP_P99_MS),
                                             ("retry_storm", "bench-storm-", "session retry storm",
                                              GOAL_STORM_P99_MS)):
            what = f"{name} p99 ≤ {goal:,.0f} ms at {GOAL_LOAD:,.0f} spans/s offered ({label})"
            if not at:
                rows.append((what, f"not measured (no latency run at {GOAL_LOAD:,.0f} spans/s)", "–"))
                continue
            p99, seen, triggered = _p99_with_misses(at[0], detector, prefix)
            if triggered == 0:
                rows.append((what, "not measured (none injected)", "–"))
                continue
            shown = _ms(p99).replace("not in time", "not seen in time")
            if seen < triggered:
                shown += f" ({seen} of {triggered} seen)"
            rows.append((what, shown, yes(p99 <= goal)))
    if not rows:
        return []
    return ["Against the goals of issue 11 (figures of this run; a latency goal counts a detection never "
            "seen as late):", "", "| goal (issue 11) | measured | met? |", "|---|---:|:---:|",
            *(f"| {g} | {m} | {ok} |" for g, m, ok in rows), ""]


def bench_live(broker: str | LiveBroker = "tansu", *, e2e_spans: int = 100_000,
               latency_rates: tuple[float, ...] = (5000.0, 500.0), latency_s: float = 20.0,
               **latency_kw: Any) -> tuple[str, dict, list[dict]]:
    """The live parts on one broker (started and stopped here unless it runs already):
    ``(label, bench_e2e result, [bench_latency result per rate])``."""
    lb = broker if isinstance(broker, LiveBroker) else LiveBroker(broker)
    with lb:
        env = lb.worker_env()
        e = bench_e2e(e2e_spans, bootstrap=lb.bootstrap, worker_env=env)
        lat = [bench_latency(rate, latency_s, bootstrap=lb.bootstrap, worker_env=env, **latency_kw)
               for rate in latency_rates]
        return lb.label, e, lat


def main(sessions: int = 2000, memory_sessions: int = 50_000, *, e2e_spans: int = 100_000,
         latency_rates: tuple[float, ...] = (5000.0, 500.0), latency_s: float = 20.0, keys: int = 100_000,
         live: bool = True, brokers: Sequence[str | LiveBroker] = ("tansu",),
         deny_trials: int = 50, deny_load: float = 500.0, command: str = "breakwater bench") -> str:
    """Every measurement as markdown tables ready for the README's "## Measured", headed by
    issue 11's goals next to this run's figures (:func:`goals_table`).

    The live parts run on each of ``brokers`` in turn (:class:`LiveBroker` specs: ``tansu``,
    ``kafka``, ``kafka://host:port``), one broker at a time; ``deny_trials`` > 0 adds span → gateway
    deny (:func:`bench_deny`) at ``deny_load`` spans/s of background on each."""
    chosen = [b if isinstance(b, LiveBroker) else LiveBroker(b) for b in brokers] if live else []
    r = bench_replay(sessions)
    m = bench_memory(memory_sessions)
    mk = bench_memory_keys(keys)
    runs: list[tuple[str, dict, list[dict]]] = []
    denies: list[tuple[str, dict]] = []
    missing = deny_missing() if chosen and deny_trials > 0 else None
    for lb in chosen:
        with lb:
            runs.append(bench_live(lb, e2e_spans=e2e_spans, latency_rates=latency_rates, latency_s=latency_s))
            if deny_trials > 0 and missing is None:
                denies.append((lb.label, bench_deny(deny_trials, load=deny_load, bootstrap=lb.bootstrap,
                                                    worker_env=lb.worker_env())))
    lines = [f"Made by `{command}` ({os.cpu_count()} cores; ratios compare between machines, absolute figures "
             "do not).", ""]
    lines += goals_table(r, mk, runs)
    lines += live_tables(runs)
    lines += deny_table(denies)
    if missing is not None:
        lines += [f"Span → gateway deny: not measured ({missing}).", ""]
    lines += [
        f"Replay on {r['spans']:,} spans of simulated mixed traffic ({r['bytes'] / 1e6:.1f} MB OTLP JSON lines):",
        "",
        "| stage | spans/s | ratio to orjson.loads |",
        "|---|---:|---:|",
        f"| orjson.loads only (ceiling) | {r['orjson_spans_per_s']:,.0f} | 1.00 |",
        f"| ingest decode | {r['decode_spans_per_s']:,.0f} | {r['decode_ratio']:.2f} |",
        f"| replay (decode + detectors + policy + output) | {r['replay_spans_per_s']:,.0f} | {r['replay_ratio']:.2f} |",
        "",
        f"Memory per key ({keys:,} keys each; RSS in the process that holds the states as objects, as replay "
        "does; persisted = bytes per key in the worker's RocksDB table and changelog):",
        "",
        "| state | RSS per key | persisted per key |",
        "|---|---:|---:|",
    ]
    for kind, v in mk.items():
        if kind == "live index":
            continue
        lines.append(f"| {kind} | {v['rss_bytes']:,.0f} B | {v['state_bytes']:,.0f} B |")
    lines += [
        f"| worker's own index + timer per tracked key | {mk['live index']['rss_bytes']:,.0f} B | – |",
        "",
        f"Replay memory per tracked session ({m['sessions']:,} sessions, 8 spans each, all stages): "
        f"{m['rss_bytes_per_session']:,.0f} B RSS, {m['state_bytes_per_session']:,.0f} B persisted state.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(main())
