"""Smoke run of ``breakwater bench`` with tiny sizes: every result field is there and positive.
No timing assertions: the figures depend on the machine and its load.

The live parts run on each broker kind of the session (``broker`` fixture: Tansu and real Kafka,
see conftest); ``--broker`` picks the broker of ``breakwater bench`` itself."""

from __future__ import annotations

import pytest

from streams import bench, cli
from streams.broker import ping
from tests.kafka_broker import KafkaBroker, worker_env_for


def test_memory_keys_fields():
    r = bench.bench_memory_keys(2_000)
    assert {"session", "pending trace", "route", "tenant", "live index"} <= set(r)
    for kind, v in r.items():
        assert v["rss_bytes"] >= 0, kind
        if kind != "live index":
            assert v["state_bytes"] > 0, kind


@pytest.mark.broker
def test_live_bench_smoke(broker, broker_kind):
    lb = bench.LiveBroker(broker_kind, bootstrap=broker.bootstrap)
    assert lb.worker_env() == worker_env_for(broker)  # Kafka: session timeouts it accepts (≥ 6 s)
    label, e, lat = bench.bench_live(lb, e2e_spans=3_000, latency_rates=(200,), latency_s=4.0, per_message=20,
                                     loops_per_s=2, storms_per_s=0, partitions=2, drain_s=20)
    assert broker.running  # a broker the bench did not start is not stopped by it
    for k in ("raw_spans_per_s", "worker_spans_per_s", "ratio", "worker_rss_bytes"):
        assert e[k] > 0, k
    assert e["spans"] == 3_000
    (x,) = lat
    assert x["triggers"] > 0 and x["incidents"] > 0
    assert x["p50_ms"] > 0 and x["p99_ms"] > 0 and x["offered_spans_per_s"] > 0
    md = "\n".join(bench.live_tables([(label, e, lat)]))
    assert label == ("Tansu (embedded)" if broker_kind == "tansu" else "Apache Kafka")
    assert f"| {label} | raw aiokafka consumer + `orjson.loads` (ceiling) |" in md
    assert f"| {label} | 200 |" in md


@pytest.mark.broker
def test_bench_starts_and_stops_its_broker(fresh_broker):
    """``--broker tansu`` / ``--broker kafka``: the bench starts that broker itself (Kafka through
    deploy/kafka.sh) and stops it by its pid. ``fresh_broker`` is only used for its kind and skip rules."""
    kind = "kafka" if isinstance(fresh_broker, KafkaBroker) else "tansu"
    lb = bench.LiveBroker(kind)
    with lb:
        assert lb.owned and ping(lb.bootstrap, timeout=5)
        bootstrap = lb.bootstrap
        if kind == "kafka":
            assert lb.label.startswith("Apache Kafka 4.") and "KRaft" in lb.label
            assert lb.worker_env()["BREAKWATER_GROUP_SESSION_TIMEOUT_S"] == "6.0"
        else:
            assert lb.label == "Tansu (embedded)" and lb.worker_env() == {}
    assert not ping(bootstrap, timeout=1)


def test_broker_option_selects_the_broker(monkeypatch, capsys):
    seen = {}

    def fake_main(**kw):
        seen.update(kw)
        return "tables"

    monkeypatch.setattr(bench, "main", fake_main)
    small = ["--sessions", "5", "--memory-sessions", "5", "--keys", "5"]
    assert cli.main(["bench", *small]) == 0
    assert seen["brokers"] == ["tansu"] and "--broker tansu" in seen["command"]  # the default
    assert cli.main(["bench", "--broker", "kafka", *small]) == 0
    assert seen["brokers"] == ["kafka"] and "--broker kafka " in seen["command"]
    assert cli.main(["bench", "--broker", "tansu,kafka", *small]) == 0
    assert seen["brokers"] == ["tansu", "kafka"]
    assert cli.main(["bench", "--broker", "kafka://127.0.0.1:19092,127.0.0.1:19093", *small]) == 0
    assert seen["brokers"] == ["kafka://127.0.0.1:19092,kafka://127.0.0.1:19093"]
    (existing,) = [bench.LiveBroker(b) for b in seen["brokers"]]
    assert existing.kind == "kafka" and existing.bootstrap == "127.0.0.1:19092,127.0.0.1:19093"
    assert not existing.owned and existing.worker_env() == worker_env_for(KafkaBroker(existing=existing.spec))
    capsys.readouterr()
    assert cli.main(["bench", "--broker", "redpanda", *small]) == 2
    assert "--broker: expected tansu, kafka" in capsys.readouterr().err


def test_existing_cluster_that_does_not_answer():
    from streams.broker import free_port
    from streams.errors import UserError

    with pytest.raises(UserError, match="no Kafka answers"):
        with bench.LiveBroker(f"kafka://127.0.0.1:{free_port()}"):
            pass


def test_main_prints_markdown(monkeypatch):
    out = bench.main(sessions=20, memory_sessions=200, keys=200, live=False, command="breakwater bench --no-live")
    assert "`breakwater bench --no-live`" in out
    assert "| replay (decode + detectors + policy + output) |" in out
    assert "| pending trace |" in out
