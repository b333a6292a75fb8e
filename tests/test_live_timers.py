"""Timer-driven detectors live on the embedded broker: silent_success (judged when the watermark,
advanced by the wall clock, passes root end + grace) and plan_deadlock (cycle across two spans)."""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime

import orjson
import pytest

from tests.kafka import collect, produce
from tests.otel import flat_json, otlp_proto, traced

pytestmark = pytest.mark.broker

POLICY = """
allowed_lateness_s = 1
[detectors.silent_success]
grace_s = 2
breaker_ttl_s = 120
"""


def _secs(a: str, b: str) -> float:
    p = lambda s: datetime.fromisoformat(s.replace("Z", "+00:00"))  # noqa: E731
    return (p(b) - p(a)).total_seconds()


def _wait(settings, topic, pred, timeout_s=45.0):
    recs = asyncio.run(collect(settings.bootstrap_servers, topic,
                               lambda rs: any(pred(orjson.loads(m.value)) for m in rs), timeout_s))
    return [orjson.loads(m.value) for m in recs if pred(orjson.loads(m.value))]


@pytest.fixture
def worker(isolated, tmp_path):
    settings, start_worker = isolated
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    start_worker(extra_env={"BREAKWATER_POLICY_FILE": str(policy)})
    return settings


def test_silent_success_hold_and_its_ttl(worker):
    settings = worker
    session = f"sess-{uuid.uuid4().hex[:6]}"
    bad = traced(session, [("execute_tool charge_card", {"gen_ai.operation.name": "execute_tool",
                                                         "gen_ai.tool.name": "charge_card",
                                                         "gen_ai.tool.call.arguments": '{"card": "4111"}'}, True)])
    ok_session = f"ok-{uuid.uuid4().hex[:6]}"
    ok = traced(ok_session, [("execute_tool http_get", {"gen_ai.operation.name": "execute_tool",
                                                        "gen_ai.tool.name": "http_get"}, True),
                             ("execute_tool http_get", {"gen_ai.operation.name": "execute_tool",
                                                        "gen_ai.tool.name": "http_get"}, False)])
    # children and root in separate messages, root first: assembly across batches and encodings
    root = [s for s in bad if s.parent is None]
    kids = [s for s in bad if s.parent is not None]
    asyncio.run(produce(settings.bootstrap_servers, settings.topic_spans, [(session.encode(), flat_json(root))]))
    asyncio.run(produce(settings.bootstrap_servers, settings.topic_otlp, [(None, otlp_proto(kids))]))
    asyncio.run(produce(settings.bootstrap_servers, settings.topic_spans, [(ok_session.encode(), flat_json(ok))]))
    found = _wait(settings, settings.topic_incidents,
                  lambda d: d["detector"] == "silent_success" and d["session_id"] == session)
    assert found, "no silent_success incident"
    inc = found[0]
    assert inc["status"] == "open" and inc["scope"]["kind"] == "trace"
    assert [g["kind"] for g in inc["evidence"]["gaps"]] == ["failed_tool"]
    cmds = _wait(settings, settings.topic_breaker, lambda d: d["incident_id"] == inc["incident_id"], 20)
    assert cmds and cmds[0]["action"] == "hold" and cmds[0]["scope"] == {"kind": "session", "key": session,
                                                                         "tenant": "acme"}
    assert _secs(cmds[0]["issued_at"], cmds[0]["expires_at"]) == 120  # the policy's TTL
    # the retried-successfully session never produced one (judged by now: same grace, same batch)
    others = _wait(settings, settings.topic_incidents, lambda d: d["session_id"] == ok_session, 3)
    assert others == []
    assert b"4111" not in orjson.dumps(found)


def test_plan_deadlock_halts_the_workflow(worker):
    settings = worker
    wf = f"wf-{uuid.uuid4().hex[:6]}"
    session = f"sess-{uuid.uuid4().hex[:6]}"
    first = traced(session, [("plan", {"workflow.id": wf, "gen_ai.operation.name": "plan",
                                       "plan.steps": orjson.dumps([{"id": "fetch", "depends_on": ["parse"]},
                                                                   {"id": "parse", "depends_on": ["store"]}]).decode()},
                              False)], root_attrs={"workflow.id": wf})
    second = traced(session, [("plan", {"workflow.id": wf, "gen_ai.operation.name": "plan", "plan.revision": 2,
                                        "plan.steps": orjson.dumps([{"id": "store", "depends_on": ["fetch"]}]).decode()},
                               False)], root_attrs={"workflow.id": wf})
    asyncio.run(produce(settings.bootstrap_servers, settings.topic_spans, [(session.encode(), flat_json(first))]))
    asyncio.run(produce(settings.bootstrap_servers, settings.topic_spans, [(session.encode(), flat_json(second))]))
    found = _wait(settings, settings.topic_incidents, lambda d: d["detector"] == "plan_deadlock" and d["workflow_id"] == wf)
    assert found, "no plan_deadlock incident"
    inc = found[0]
    assert inc["scope"] == {"kind": "workflow", "key": wf}
    assert inc["evidence"]["cycle"] == ["fetch", "parse", "store"]
    cmds = _wait(settings, settings.topic_breaker, lambda d: d["incident_id"] == inc["incident_id"], 20)
    assert cmds[0]["action"] == "halt" and cmds[0]["scope"]["kind"] == "workflow"
    assert _secs(cmds[0]["issued_at"], cmds[0]["expires_at"]) == 1800
