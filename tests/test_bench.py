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


@pytest.mark.broker
def test_deny_bench_smoke(broker, broker_kind):
    """Span → gateway deny at tiny sizes: the OTel-instrumented agent is denied by the LiteLLM hook
    in every trial, for no_progress_loop, and the table row is there."""
    lb = bench.LiveBroker(broker_kind, bootstrap=broker.bootstrap)
    x = bench.bench_deny(3, load=100, per_message=20, partitions=2, bootstrap=lb.bootstrap,
                         worker_env=lb.worker_env(), trial_timeout_s=30)
    assert broker.running
    assert len(x["deny"]) == 3 and not x["missed"], x["missed"]
    assert x["reasons"] and all(r.startswith("no_progress_loop") for r in x["reasons"])
    assert 0 < x["p50_ms"] <= x["p99_ms"] and x["offered_spans_per_s"] > 0 and x["threshold"] >= 2
    md = "\n".join(bench.deny_table([(lb.label, x)]))
    assert f"| {lb.label} | 100 |" in md and "| 3 of 3 |" in md


def test_goals_table_marks_what_is_met():
    e = {"ratio": 0.13}
    at_goal = {"rate": 5000.0, "_lat": {"no_progress_loop": [0.1] * 9, "retry_storm": [0.2]},
               "missed": ["bench-loop-9"]}  # a loop never seen counts as late
    lines = bench.goals_table({"replay_ratio": 0.2}, {"session": {"rss_bytes": 900.0}},
                              [("Tansu (embedded)", e, [at_goal]), ("Apache Kafka", e, [{"rate": 500.0}])])
    rows = {ln.split(" | ")[0].lstrip("| "): ln.rsplit(" | ", 1)[1].rstrip(" |") for ln in lines if ln.startswith("| ")}
    assert rows["replay ≥ 0.25 × `orjson.loads` of the same file"] == "no"
    assert rows["≤ 1 KB (1,024 B) RSS per tracked session, all session-scoped detectors"] == "yes"
    assert rows["end to end, one worker ≥ 0.12 × raw consume + decode (Tansu (embedded))"] == "yes"
    assert rows["`no_progress_loop` p99 ≤ 250 ms at 5,000 spans/s offered (Tansu (embedded))"] == "no"
    assert rows["session retry storm p99 ≤ 500 ms at 5,000 spans/s offered (Tansu (embedded))"] == "yes"
    assert rows["`no_progress_loop` p99 ≤ 250 ms at 5,000 spans/s offered (Apache Kafka)"] == "–"
    assert "(9 of 10 seen)" in "\n".join(lines)


def test_main_heads_with_the_goals():
    out = bench.main(sessions=20, memory_sessions=200, keys=200, live=False, command="breakwater bench --no-live")
    assert "| goal (issue 11) | measured | met? |" in out
    assert out.index("| goal (issue 11) |") < out.index("| replay (decode + detectors + policy + output) |")


def test_deny_options_reach_the_bench(monkeypatch):
    seen = {}

    def fake_main(**kw):
        seen.update(kw)
        return "tables"

    monkeypatch.setattr(bench, "main", fake_main)
    assert cli.main(["bench", "--sessions", "5", "--deny-trials", "7", "--deny-load", "250"]) == 0
    assert seen["deny_trials"] == 7 and seen["deny_load"] == 250.0
    assert "--deny-trials 7 --deny-load 250" in seen["command"]


def test_live_broker_nests():
    """``main`` keeps a broker up across bench_live and bench_deny: nested ``with`` blocks start and stop once."""
    lb = bench.LiveBroker("tansu")
    calls = []
    lb.start = lambda: calls.append("start") or "127.0.0.1:1"  # type: ignore[method-assign]
    lb.stop = lambda: calls.append("stop")  # type: ignore[method-assign]
    with lb:
        with lb:
            pass
        assert calls == ["start"]
    assert calls == ["start", "stop"]
