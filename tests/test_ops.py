"""The worker's operations endpoint (streams/ops.py) and its metrics (streams/metrics.py).

Unit tests drive the HTTP server, the probes and the lag arithmetic with small fakes; the live
test scrapes a real worker on the embedded broker while real spans flow through it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import urllib.error
import urllib.request
import uuid
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from streams import metrics
from streams.broker import free_port
from streams.ops import Health, OpsServer, install, sample_lag
from streams.settings import Settings
from tests.kafka import collect, produce
from tests.otel import agent_spans, flat_json, otlp_proto

LOOP = [("search", '{"q": "status of order 42"}')] * 3


def get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - 127.0.0.1 only
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, body = get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    out = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


class FakeApp:
    def __init__(self, *, rebalancing_count=1, rebalancing=False, should_stop=False, actives=()):
        self.rebalancing_count = rebalancing_count
        self.rebalancing = rebalancing
        self.should_stop = should_stop
        self.crash_reason = None
        self.assignor = SimpleNamespace(assigned_actives=lambda: set(actives))


@pytest.fixture
def server():
    started = []

    def start(health: Health) -> OpsServer:
        s = OpsServer("127.0.0.1", 0, health)
        assert s.start()
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


# ------------------------------------------------------------------------------- HTTP + probes


def test_endpoints_answer_and_unknown_paths_404(server):
    h = Health(30.0, app=FakeApp(actives=[("t", 0)]))
    h.beat()
    s = server(h)
    base = f"http://127.0.0.1:{s.port}"
    status, body = get(base + "/metrics")
    assert status == 200 and b"breakwater_spans_in_total" in body
    assert get(base + "/healthz")[0] == 200
    status, body = get(base + "/readyz")
    assert status == 200 and json.loads(body)["ready"] is True and json.loads(body)["active_partitions"] == 1
    assert get(base + "/nope")[0] == 404


@pytest.mark.parametrize(("app", "reason"), [
    (None, "starting"),
    (FakeApp(rebalancing_count=0), "waiting for partition assignment"),
    (FakeApp(rebalancing=True), "rebalancing (recovering state)"),
    (FakeApp(should_stop=True), "stopping"),
])
def test_readyz_is_503_until_partitions_are_assigned_and_recovered(server, app, reason):
    h = Health(30.0, app=app)
    h.beat()
    status, body = get(f"http://127.0.0.1:{server(h).port}/readyz")
    assert status == 503 and json.loads(body) == {"ready": False, "reason": reason}


def test_healthz_fails_when_the_event_loop_stalls_or_faust_crashed(server):
    t = [1000.0]
    h = Health(10.0, app=FakeApp(), clock=lambda: t[0])
    h.beat()
    port = server(h).port
    assert get(f"http://127.0.0.1:{port}/healthz")[0] == 200
    t[0] += 10.5  # no beat for longer than health_stall_s
    status, body = get(f"http://127.0.0.1:{port}/healthz")
    assert status == 503 and "event loop has not run" in json.loads(body)["reason"]
    h.beat()
    assert get(f"http://127.0.0.1:{port}/healthz")[0] == 200
    h.app.crash_reason = RuntimeError("boom")
    status, body = get(f"http://127.0.0.1:{port}/healthz")
    assert status == 503 and json.loads(body)["reason"] == "crashed: RuntimeError"


def test_scrape_does_not_wait_for_a_blocked_event_loop(server):
    """The server has its own thread: a scrape answers while asyncio is blocked."""
    s = server(Health(30.0))

    async def blocked():
        t0 = time.monotonic()
        status, _ = await asyncio.to_thread(get, f"http://127.0.0.1:{s.port}/metrics")
        return status, time.monotonic() - t0

    async def main():
        task = asyncio.create_task(blocked())
        await asyncio.sleep(0)
        time.sleep(0.3)  # block the loop
        return await task

    status, _ = asyncio.run(main())
    assert status == 200


def test_port_in_use_is_logged_and_not_fatal(server, caplog):
    first = server(Health(30.0))
    second = OpsServer("127.0.0.1", first.port, Health(30.0))
    with caplog.at_level(logging.ERROR, logger="breakwater.ops"):
        assert second.start() is False
    assert "BREAKWATER_METRICS_PORT" in caplog.text
    second.stop()  # idempotent on a server that never started


def test_install_is_off_with_port_zero():
    assert install(object(), Settings(metrics_port=0)) is None
    assert Settings().metrics_port == 9464 and Settings().metrics_host == "127.0.0.1"


# ------------------------------------------------------------------------------- consumer lag


class FakeConsumer:
    def __init__(self, hw, committed, read):
        self._hw, self._committed_offset, self._read_offset = hw, committed, read

    def highwater(self, tp):
        if self._hw is None:
            raise RuntimeError("consumer not started")
        return self._hw.get(tp)


def TP(topic, p):  # noqa: N802 - mimics faust's TP namedtuple
    from faust.types import TP as _TP

    return _TP(topic, p)


def test_lag_is_highwater_minus_committed_per_input_partition():
    a0, a1, other = TP("agent.spans", 0), TP("agent.spans", 1), TP("bw-sessions-changelog", 0)
    app = SimpleNamespace(
        consumer=FakeConsumer(hw={a0: 100, a1: 7, other: 50}, committed={a0: 60, a1: 7}, read={a0: 79, a1: 6}),
        assignor=SimpleNamespace(assigned_actives=lambda: {a0, a1, other}),
    )
    assert sample_lag(app, {"agent.spans"}) == {("agent.spans", 0): 40, ("agent.spans", 1): 0}


def test_lag_tolerates_a_trailing_highwater_and_missing_commits():
    t0, t1, t2 = TP("in", 0), TP("in", 1), TP("in", 2)
    app = SimpleNamespace(
        # t0: Tansu-style high watermark behind what was read; t1: read, never committed;
        # t2: never fetched (no high watermark) and nothing read -> no sample
        consumer=FakeConsumer(hw={t0: 10, t1: 30, t2: None}, committed={t0: 12}, read={t0: 14, t1: 19}),
        assignor=SimpleNamespace(assigned_actives=lambda: {t0, t1, t2}),
    )
    assert sample_lag(app, {"in"}) == {("in", 0): 3, ("in", 1): 10}
    app.consumer = FakeConsumer(hw=None, committed={}, read={})
    assert sample_lag(app, {"in"}) == {}


# ------------------------------------------------------------------------------- naming


def test_metric_names_follow_prometheus_conventions():
    fams = list(metrics.REGISTRY.collect())
    assert fams and all(f.name.startswith("breakwater_") for f in fams)
    for f in fams:
        if f.type == "counter":
            assert not f.name.endswith("_total")  # the client adds it to the sample name
        if f.type == "histogram":
            assert f.name.endswith("_seconds"), f.name
    names = metrics.sample_names()
    for required in ("breakwater_spans_in_total", "breakwater_rejections_total", "breakwater_incidents_total",
                     "breakwater_breaker_commands_total", "breakwater_detection_latency_seconds_bucket",
                     "breakwater_state_evictions_total", "breakwater_unpriced_spans_total",
                     "breakwater_worker_ready", "breakwater_rebalances_total", "breakwater_build_info"):
        assert required in names, required
    # lag and tracked keys have series only once a worker samples them, but are declared
    assert {"breakwater_consumer_lag_messages", "breakwater_tracked_keys"} <= metrics.declared_names()


def test_known_label_values_exist_before_the_first_event():
    """So increase() sees the first incident and "no spans" is a zero rate, not a missing series."""
    samples = {(s.name, tuple(sorted(s.labels.items()))) for f in metrics.REGISTRY.collect() for s in f.samples}
    assert ("breakwater_spans_in_total", (("format", "otlp_proto"),)) in samples
    assert ("breakwater_incidents_total",
            (("detector", "plan_deadlock"), ("severity", "warning"), ("status", "open"))) in samples
    assert ("breakwater_breaker_commands_total", (("action", "throttle"), ("mode", "shadow"))) in samples


# ------------------------------------------------------------------------------- live worker


@pytest.mark.broker
def test_running_worker_serves_metrics_health_and_readiness(isolated):
    settings, start_worker = isolated
    port = free_port()
    w = start_worker(extra_env={"BREAKWATER_METRICS_PORT": str(port), "BREAKWATER_LAG_SAMPLE_INTERVAL_S": "0.5"})
    base = f"http://127.0.0.1:{port}"

    deadline = time.monotonic() + 30
    while get(base + "/readyz")[0] != 200:
        assert time.monotonic() < deadline, f"/readyz never 200: {get(base + '/readyz')}\n{w.log_text()[-2000:]}"
        time.sleep(0.2)
    assert json.loads(get(base + "/readyz")[1])["ready"] is True
    status, body = get(base + "/healthz")
    assert status == 200 and json.loads(body)["alive"] is True

    before = scrape(port)
    s1, s2 = f"sess-{uuid.uuid4().hex[:6]}", f"sess-{uuid.uuid4().hex[:6]}"
    asyncio.run(produce(settings.bootstrap_servers, settings.topic_spans, [
        (s1.encode(), flat_json(agent_spans(s1, LOOP))),
        (b"bad", b'{"trace_id": "nope", '),
    ]))
    asyncio.run(produce(settings.bootstrap_servers, settings.topic_otlp,
                        [(None, otlp_proto(agent_spans(s2, LOOP)))]))
    got = asyncio.run(collect(settings.bootstrap_servers, settings.topic_incidents, lambda rs: len(rs) >= 2, 45))
    assert len(got) >= 2, w.log_text()[-2000:]

    def moved(m):
        return {
            "flat": value(m, "breakwater_spans_in_total", format="flat") - value(before, "breakwater_spans_in_total",
                                                                                 format="flat"),
            "otlp": value(m, "breakwater_spans_in_total", format="otlp_proto"),
            "rejected": value(m, "breakwater_rejections_total", reason="bad_json"),
            "incidents": value(m, "breakwater_incidents_total", detector="no_progress_loop", severity="critical",
                               status="open"),
            "halts": value(m, "breakwater_breaker_commands_total", action="halt", mode="enforce"),
            "latency": value(m, "breakwater_detection_latency_seconds_count", detector="no_progress_loop"),
            "tracked": value(m, "breakwater_tracked_keys", detector="no_progress_loop", scope="session"),
            "lag_series": sum(1 for (n, ls) in m if n == "breakwater_consumer_lag_messages"
                              and ("topic", settings.topic_spans) in ls),
            "lag": value(m, "breakwater_consumer_lag_messages", topic=settings.topic_spans),
            "ready": value(m, "breakwater_worker_ready"),
            "rebalances": value(m, "breakwater_rebalances_total"),
        }

    want = {"flat": 4, "otlp": 4, "rejected": 1, "incidents": 2, "halts": 2, "latency": 2, "tracked": 2,
            "lag_series": 2, "ready": 1, "rebalances": 1}
    deadline = time.monotonic() + 20
    while True:
        now = moved(scrape(port))
        if all(now[k] >= v for k, v in want.items()) and now["lag"] == 0:
            break
        assert time.monotonic() < deadline, f"metrics did not move as expected: {now}"
        time.sleep(0.3)
    # a latency histogram of a live worker: span end -> publish is seconds, not minutes
    m = scrape(port)
    total = value(m, "breakwater_detection_latency_seconds_sum", detector="no_progress_loop")
    assert 0 <= total / now["latency"] < 30
