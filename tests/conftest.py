"""Shared fixtures. Every test that takes ``broker`` (directly or through ``isolated``) runs once
per broker kind: ``tansu`` (the embedded broker) and ``kafka`` (real Apache Kafka, KRaft, started
by ``deploy/kafka.sh``). Each broker is started once per test session, on first use.

``BREAKWATER_TEST_BROKER`` picks the kinds: unset or ``both`` = tansu and kafka; ``tansu``;
``kafka``; or ``kafka://host:port[,host:port]`` = only an existing Kafka cluster (nothing started).
Without Java the kafka variants skip with the reason, unless ``BREAKWATER_TEST_REQUIRE_KAFKA=1``
(CI) makes that an error. ``@pytest.mark.tansu("why")`` keeps a test off Kafka: only for tests that
exist because of a Tansu quirk.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid

import pytest

from streams.app import ensure_topics
from streams.broker import EmbeddedBroker
from streams.dev import WorkerProcess
from streams.settings import Settings
from tests.kafka_broker import KafkaBroker, unavailable_reason, worker_env_for


def _broker_choice() -> tuple[list[str], str | None]:
    """``(kinds, existing Kafka bootstrap or None)`` from ``BREAKWATER_TEST_BROKER``."""
    raw = os.environ.get("BREAKWATER_TEST_BROKER", "").strip()
    if raw.lower() in ("", "both", "all"):
        return ["tansu", "kafka"], None
    if raw.lower() in ("tansu", "kafka"):
        return [raw.lower()], None
    if raw.startswith("kafka://") or ":" in raw:
        return ["kafka"], raw
    raise pytest.UsageError(f"BREAKWATER_TEST_BROKER={raw!r}: use tansu, kafka, both or kafka://host:port")


BROKER_KINDS, EXISTING_KAFKA = _broker_choice()


def pytest_configure(config):
    config.addinivalue_line("markers", "kafka: runs on real Apache Kafka (the kafka variant of a broker test)")
    config.addinivalue_line("markers", "tansu(reason): exists because of a Tansu quirk; not run on Kafka")


_TIER_SECONDS: dict[str, float] = {}
_TIER_COUNT: dict[str, int] = {}


def _tier(item) -> str:
    params = getattr(getattr(item, "callspec", None), "params", {})
    if params.get("broker") == "kafka" or item.get_closest_marker("kafka"):
        return "kafka"
    if params.get("broker") == "tansu" or item.get_closest_marker("broker"):
        return "tansu"
    return "no broker"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):  # noqa: ARG001
    """Time each test (setup, call, teardown) by tier, for the summary below."""
    t0 = time.monotonic()
    yield
    tier = _tier(item)
    _TIER_SECONDS[tier] = _TIER_SECONDS.get(tier, 0.0) + time.monotonic() - t0
    _TIER_COUNT[tier] = _TIER_COUNT.get(tier, 0) + 1


def pytest_terminal_summary(terminalreporter):
    """How long each tier took: tests without a broker, on the embedded broker, on real Kafka."""
    if _TIER_SECONDS:
        parts = [f"{tier}: {_TIER_COUNT[tier]} tests, {secs:.0f} s" for tier, secs in sorted(_TIER_SECONDS.items())]
        terminalreporter.write_line("time by tier — " + "; ".join(parts))


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Drop the kafka variant of tests marked ``tansu`` (they test a Tansu quirk, not the product)."""
    keep, drop = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        (drop if params.get("broker") == "kafka" and item.get_closest_marker("tansu") else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def require_local_kafka_jars() -> None:
    """Skip a Kafka test that needs a local broker when none can run here — or fail, in CI
    (``BREAKWATER_TEST_REQUIRE_KAFKA=1``), where a Kafka tier that cannot run is an error."""
    reason = unavailable_reason()
    if reason is not None:
        if os.environ.get("BREAKWATER_TEST_REQUIRE_KAFKA") == "1":
            raise RuntimeError(f"Kafka tier required (BREAKWATER_TEST_REQUIRE_KAFKA=1) but {reason}")
        pytest.skip(f"Kafka tier skipped: {reason}")


@contextlib.contextmanager
def isolated_workers(broker, tmp_path, start_timeout_s: float | None = None):
    """Topic names and an app id of the test's own on ``broker`` (created), and a function that
    starts workers on them; every worker started is stopped on exit, whatever happened."""
    tag = uuid.uuid4().hex[:8]
    env = {
        "BREAKWATER_PARTITIONS": "2",
        "BREAKWATER_TOPIC_SPANS": f"spans-{tag}",
        "BREAKWATER_TOPIC_OTLP": f"otlp-{tag}",
        "BREAKWATER_TOPIC_INCIDENTS": f"incidents-{tag}",
        "BREAKWATER_TOPIC_BREAKER": f"breaker-{tag}",
        "BREAKWATER_TOPIC_DLQ": f"dlq-{tag}",
        **worker_env_for(broker),
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
        if start_timeout_s is None:
            w.start()
        else:
            w.start(start_timeout_s)
        return w

    try:
        yield settings, start_worker
    finally:
        for w in workers:
            w.stop()


class _BrokerPool:
    """The session's brokers, one per kind, started on first use and stopped at the end."""

    def __init__(self) -> None:
        self.brokers: dict[str, EmbeddedBroker | KafkaBroker] = {}
        self.failures: dict[str, BaseException] = {}

    def get(self, kind: str):
        if kind in self.brokers:
            return self.brokers[kind]
        if kind in self.failures:
            raise self.failures[kind]
        try:
            if kind == "kafka" and EXISTING_KAFKA is None:
                require_local_kafka_jars()
            b = EmbeddedBroker() if kind == "tansu" else KafkaBroker(existing=EXISTING_KAFKA)
            b.start()
        except BaseException as exc:  # pytest's Skipped too: remembered, never retried
            self.failures[kind] = exc
            raise
        self.brokers[kind] = b
        return b

    def stop_all(self) -> None:
        for b in self.brokers.values():
            b.stop()
        self.brokers.clear()


@pytest.fixture(scope="session")
def broker_pool():
    pool = _BrokerPool()
    try:
        yield pool
    finally:
        pool.stop_all()


_KIND_PARAMS = [pytest.param(k, marks=[pytest.mark.kafka] if k == "kafka" else []) for k in BROKER_KINDS]


@pytest.fixture(scope="session", params=_KIND_PARAMS)
def broker(request, broker_pool):
    """The session's broker of this kind (``request.param``: ``"tansu"`` or ``"kafka"``)."""
    return broker_pool.get(request.param)


@pytest.fixture
def broker_kind(broker) -> str:
    return "kafka" if isinstance(broker, KafkaBroker) else "tansu"


@pytest.fixture(params=_KIND_PARAMS)
def fresh_broker(request, broker_pool):
    """A broker of this kind of the test's own, not started yet (for tests that freeze or restart
    it); stopped after the test whatever happens."""
    if request.param == "kafka":
        if EXISTING_KAFKA is not None:
            pytest.skip("needs a Kafka broker of its own (it freezes it), not an existing cluster")
        require_local_kafka_jars()
    b = EmbeddedBroker() if request.param == "tansu" else KafkaBroker()
    try:
        yield b
    finally:
        b.stop()


def make_settings(broker, **kw) -> Settings:
    return Settings(broker=broker.url, partitions=2, **kw)


@pytest.fixture
def isolated(broker, tmp_path):
    """A worker with its own topic names and app id (so tests never see each other's data)."""
    with isolated_workers(broker, tmp_path) as got:
        yield got
