"""Minimal reproduction: faust-streaming's ``processing_guarantee="exactly_once"`` duplicates records
sent to a topic the app does not consume (real Apache Kafka, the pinned aiokafka).

The app is one agent: read ``<tag>-src``, send each value to ``<tag>-out``. ``<tag>-out`` is an
output topic, like ``agent.incidents`` and ``agent.breaker`` are for the worker. The run:

1. start the worker (exactly_once, commit interval 60 s, so nothing is committed during the run);
2. send N records to ``src``; wait until ``out`` holds N under ``isolation_level=read_committed``
   (with a transaction they could only appear there after the commit: they are already visible,
   so they were not sent in one);
3. ``kill -9`` the worker, start it again: it reprocesses the uncommitted input;
4. read ``out`` with ``read_committed``: 2 × N records, every value twice.

Why (faust-streaming 0.15.3, ``faust/transport/consumer.py`` ``TransactionManager.send``): the
transactional id of a send is picked from the *destination* topic's partition in the *consumer's*
metadata; a topic the app does not subscribe to is not in it, ``key_partition`` returns None, and
the record goes out on the plain (non-transactional) producer. Only sends to topics the app itself
consumes (repartition topics, changelogs) join a transaction.

    python -m tests.eos_repro                        # starts its own Kafka (deploy/kafka.sh)
    python -m tests.eos_repro --bootstrap HOST:PORT  # an existing Kafka
Prints one JSON line; exits 1 when duplicates were found (the failure reproduced), 0 when not.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

N = 5


def worker_main(bootstrap: str, tag: str, data_dir: str) -> None:
    """The faust app, run in a child process (so it can be killed with SIGKILL)."""
    import faust
    from faust.worker import Worker

    app = faust.App(f"eos-{tag}", broker=f"kafka://{bootstrap}", processing_guarantee="exactly_once",
                    broker_commit_interval=60.0, datadir=data_dir, web_enabled=False,
                    topic_partitions=1, consumer_auto_offset_reset="earliest",
                    broker_session_timeout=6.0, broker_rebalance_timeout=6.0)
    raw = {"key_type": bytes, "value_type": bytes, "key_serializer": "raw", "value_serializer": "raw"}
    src = app.topic(f"{tag}-src", **raw)
    out = app.topic(f"{tag}-out", **raw)

    @app.agent(src)
    async def forward(stream):  # noqa: ANN001
        async for key, value in stream.items():
            await out.send(key=key, value=value)
            print(f"forwarded {value!r}", flush=True)

    Worker(app, loglevel="info", quiet=True).execute_from_commandline()


async def _create(bootstrap: str, tag: str) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(f"{tag}-src", 1, 1), NewTopic(f"{tag}-out", 1, 1)])
    finally:
        await admin.close()


async def _send(bootstrap: str, topic: str, n: int) -> None:
    from aiokafka import AIOKafkaProducer

    p = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await p.start()
    try:
        for i in range(n):
            await p.send_and_wait(topic, b"v%d" % i, key=b"k%d" % i)
    finally:
        await p.stop()


async def read_committed(bootstrap: str, topic: str, want: int, timeout_s: float) -> list[bytes]:
    """``topic``'s values from the beginning, ``isolation_level=read_committed``, until ``want`` or the timeout."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, isolation_level="read_committed",
                         enable_auto_commit=False, auto_offset_reset="earliest")
    await c.start()
    try:
        tp = TopicPartition(topic, 0)
        c.assign([tp])
        await c.seek_to_beginning(tp)
        got: list[bytes] = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and len(got) < want:
            for msgs in (await c.getmany(timeout_ms=200)).values():
                got += [m.value for m in msgs]
        return got
    finally:
        await c.stop()


def _start(bootstrap: str, tag: str, data_dir: str, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as f:
        return subprocess.Popen([sys.executable, "-m", "tests.eos_repro", "--worker", "--bootstrap", bootstrap,
                                 "--tag", tag, "--data-dir", data_dir], stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                cwd=str(Path(__file__).resolve().parent.parent))


def _wait_forwarded(proc: subprocess.Popen[bytes], log: Path, n: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if log.read_text(errors="replace").count("forwarded ") >= n:
            return
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.1)
    raise RuntimeError(f"worker forwarded < {n} records in {timeout_s}s:\n{log.read_text(errors='replace')[-3000:]}")


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is not None and proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def reproduce(bootstrap: str, workdir: str) -> dict:
    """Run steps 1-4 on ``bootstrap``; returns what was read (``duplicated``: values seen twice)."""
    tag = "eos" + uuid.uuid4().hex[:8]
    asyncio.run(_create(bootstrap, tag))
    data_dir = str(Path(workdir) / "data")
    log = Path(workdir) / "worker.log"
    proc = None
    try:
        proc = _start(bootstrap, tag, data_dir, log)
        asyncio.run(_send(bootstrap, f"{tag}-src", N))
        _wait_forwarded(proc, log, N, 90)
        before = asyncio.run(read_committed(bootstrap, f"{tag}-out", N, 15))
        os.killpg(proc.pid, signal.SIGKILL)  # before the first commit (60 s away)
        proc.wait(10)
        proc = _start(bootstrap, tag, data_dir, log)
        _wait_forwarded(proc, log, 2 * N, 90)  # the restarted worker reprocessed the input
        time.sleep(2)
        after = asyncio.run(read_committed(bootstrap, f"{tag}-out", 2 * N, 10))
    finally:
        _stop(proc)
    counts = Counter(after)
    return {"visible_before_commit": len(before), "read_committed_after_restart": len(after),
            "distinct": len(counts), "duplicated": sorted(v.decode() for v, n in counts.items() if n > 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bootstrap", help="an existing Kafka (host:port); default: start one with deploy/kafka.sh")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tag", help=argparse.SUPPRESS)
    ap.add_argument("--data-dir", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        sys.argv = [sys.argv[0], "worker"]
        worker_main(a.bootstrap, a.tag, a.data_dir)
        return 0
    with tempfile.TemporaryDirectory(prefix="eos-repro-") as tmp:
        broker = None
        bootstrap = a.bootstrap
        if bootstrap is None:
            from tests.kafka_broker import KafkaBroker

            broker = KafkaBroker()
            bootstrap = broker.start()
        try:
            result = reproduce(bootstrap, tmp)
        finally:
            if broker is not None:
                broker.stop()
    print(json.dumps(result))
    return 1 if result["duplicated"] else 0


if __name__ == "__main__":
    sys.exit(main())
