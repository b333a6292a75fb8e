"""Route- and tenant-scoped detectors live, with two worker processes in one consumer group:
pre-aggregates are repartitioned by route / tenant, the incidents equal replay's on the same input,
and no incident opens twice."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections import Counter

import orjson
import pytest

from tests.kafka import collect, produce
from tests.scenarios import _chat

pytestmark = pytest.mark.broker
S = 10**9


def _retime(spans, base_ns):
    """Shift scenario spans so that the first one ends at ``base_ns``."""
    t0 = min(s["end_time_unix_nano"] for s in spans)
    for s in spans:
        d = s["end_time_unix_nano"] - t0 + base_ns
        s["start_time_unix_nano"] += d - s["end_time_unix_nano"]
        s["end_time_unix_nano"] = d
    return spans


def _by_session(spans):
    out: dict[str, list] = {}
    for s in spans:
        out.setdefault(s["attributes"]["gen_ai.conversation.id"], []).append(s)
    return [(k.encode(), orjson.dumps(v)) for k, v in out.items()]


def test_route_storm_and_tenant_spike_with_two_workers(isolated, tmp_path):
    settings, start_worker = isolated
    w1 = start_worker()
    w2 = start_worker()
    w1.wait_ready(60, marks=2)  # the first worker has rebalanced after the second joined
    now = time.time_ns()
    # a tenant learns ~$0.40/min for 20 minutes, then spends $5.40 in one minute (one session)
    tenant = _retime([_chat("spiky", m, m * 60, cost=0.4, tenant="spiky-co") for m in range(20)]
                     + [_chat("spiky", 20 + k, 20 * 60 + k * 8, cost=0.9, tenant="spiky-co") for k in range(6)],
                     now - 22 * 60 * S)
    # 6 sessions retry one route 4x each within half a minute
    storm = _retime([_chat(f"storm-{k}", i, k + i * 5, retry=1, tenant="storm-co", model="gpt-4.1")
                     for i in range(4) for k in range(6)], now - 40 * S)
    asyncio.run(produce(settings.bootstrap_servers, settings.topic_spans, _by_session(tenant)))
    asyncio.run(produce(settings.bootstrap_servers, settings.topic_spans,
                        [(k, v) for s in storm for k, v in _by_session([s])]))

    want_scopes = {("retry_storm", "route", "openai/gpt-4.1"), ("cost_velocity", "tenant", "spiky-co")}

    def seen(records):
        got = {(d["detector"], d["scope"]["kind"], d["scope"]["key"]) for d in (orjson.loads(m.value) for m in records)}
        return want_scopes <= got

    recs = asyncio.run(collect(settings.bootstrap_servers, settings.topic_incidents, seen, 90))
    live = [orjson.loads(m.value) for m in recs]
    assert seen(recs), [(d["detector"], d["scope"]) for d in live]
    time.sleep(3)  # let both workers publish whatever else they would
    live = [orjson.loads(m.value) for m in asyncio.run(
        collect(settings.bootstrap_servers, settings.topic_incidents, lambda rs: False, 4))]
    opens = Counter(d["incident_id"] for d in live if d["status"] == "open")
    assert all(n == 1 for n in opens.values()), f"an incident opened twice: {opens}"
    # the same input through replay gives the same incidents (ids included)
    f = tmp_path / "input.jsonl"
    f.write_bytes(b"".join(orjson.dumps(s) + b"\n" for s in sorted(tenant + storm, key=lambda s: s["end_time_unix_nano"])))
    r = subprocess.run([sys.executable, "-m", "streams", "replay", str(f)], capture_output=True, timeout=60, check=True)
    replayed = [orjson.loads(x) for x in r.stdout.splitlines()]
    key = lambda d: (d["incident_id"], d["detector"], d["scope"]["kind"], d["scope"]["key"])  # noqa: E731
    replay_open = {key(d) for d in replayed if d["status"] == "open"}
    live_open = {key(d) for d in live if d["status"] == "open"}
    assert live_open == replay_open
    route = next(d for d in live if d["scope"]["kind"] == "route")
    assert route["tenant"] == "storm-co"
    cmds = [orjson.loads(m.value) for m in asyncio.run(
        collect(settings.bootstrap_servers, settings.topic_breaker, lambda rs: False, 3))]
    throttle = next(c for c in cmds if c["scope"]["kind"] == "route" and c["action"] == "throttle")
    assert throttle["scope"] == {"kind": "route", "key": "openai/gpt-4.1", "tenant": "storm-co"}
    assert throttle["rate_limit_per_s"] >= 1
    assert any(c["scope"] == {"kind": "tenant", "key": "spiky-co", "tenant": "spiky-co"} and c["action"] == "throttle"
               for c in cmds)
