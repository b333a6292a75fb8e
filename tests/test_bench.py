"""Smoke run of ``breakwater bench`` with tiny sizes: every result field is there and positive.
No timing assertions: the figures depend on the machine and its load."""

from __future__ import annotations

import pytest

from streams import bench
from tests.kafka_broker import worker_env_for


def test_memory_keys_fields():
    r = bench.bench_memory_keys(2_000)
    assert {"session", "pending trace", "route", "tenant", "live index"} <= set(r)
    for kind, v in r.items():
        assert v["rss_bytes"] >= 0, kind
        if kind != "live index":
            assert v["state_bytes"] > 0, kind


@pytest.mark.broker
def test_live_bench_smoke(broker):
    e = bench.bench_e2e(3_000, per_message=100, partitions=2, bootstrap=broker.bootstrap, timeout_s=120,
                        worker_env=worker_env_for(broker))
    for k in ("raw_spans_per_s", "worker_spans_per_s", "ratio", "worker_rss_bytes"):
        assert e[k] > 0, k
    assert e["spans"] == 3_000
    lat = bench.bench_latency(200, 4.0, per_message=20, loops_per_s=2, storms_per_s=0, partitions=2,
                              bootstrap=broker.bootstrap, drain_s=20, worker_env=worker_env_for(broker))
    assert lat["triggers"] > 0 and lat["incidents"] > 0
    assert lat["p50_ms"] > 0 and lat["p99_ms"] > 0 and lat["offered_spans_per_s"] > 0


def test_main_prints_markdown(monkeypatch):
    out = bench.main(sessions=20, memory_sessions=200, keys=200, live=False, command="breakwater bench --no-live")
    assert "`breakwater bench --no-live`" in out
    assert "| replay (decode + detectors + policy + output) |" in out
    assert "| pending trace |" in out
