from __future__ import annotations

import asyncio
import uuid

import pytest

from streams.app import ensure_topics
from streams.broker import EmbeddedBroker
from streams.dev import WorkerProcess
from streams.settings import Settings


@pytest.fixture(scope="session")
def broker():
    b = EmbeddedBroker()
    try:
        b.start()
        yield b
    finally:
        b.stop()


def make_settings(broker, **kw) -> Settings:
    return Settings(broker=broker.url, partitions=2, **kw)


@pytest.fixture
def isolated(broker, tmp_path):
    """A worker with its own topic names and app id (so tests never see each other's data)."""
    tag = uuid.uuid4().hex[:8]
    env = {
        "BREAKWATER_PARTITIONS": "2",
        "BREAKWATER_TOPIC_SPANS": f"spans-{tag}",
        "BREAKWATER_TOPIC_OTLP": f"otlp-{tag}",
        "BREAKWATER_TOPIC_INCIDENTS": f"incidents-{tag}",
        "BREAKWATER_TOPIC_BREAKER": f"breaker-{tag}",
        "BREAKWATER_TOPIC_DLQ": f"dlq-{tag}",
    }
    settings = Settings(
        broker=broker.url, partitions=2, app_id=f"bw-{tag}", topic_spans=env["BREAKWATER_TOPIC_SPANS"],
        topic_otlp=env["BREAKWATER_TOPIC_OTLP"], topic_incidents=env["BREAKWATER_TOPIC_INCIDENTS"],
        topic_breaker=env["BREAKWATER_TOPIC_BREAKER"], topic_dlq=env["BREAKWATER_TOPIC_DLQ"],
    )
    asyncio.run(ensure_topics(settings))
    workers: list[WorkerProcess] = []

    def start_worker(data_dir=None, extra_env=None) -> WorkerProcess:
        w = WorkerProcess(broker.bootstrap, app_id=settings.app_id, extra_env={**env, **(extra_env or {})},
                          data_dir=str(data_dir or tmp_path / f"w{len(workers)}"))
        workers.append(w)
        w.start()
        return w

    try:
        yield settings, start_worker
    finally:
        for w in workers:
            w.stop()
