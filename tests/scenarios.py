"""Replay scenarios of README "Detectors" as input files: each loop kind and the benign look-alikes,
written as flat JSON lines, one JSON array, and OTLP JSON (hex ids, AnyValue, int64 strings)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import orjson

S = 10**9
BASE = 1_767_225_600 * S  # 2026-01-01T00:00:00Z


def _hex(seed: str, n: int) -> str:
    return hashlib.blake2b(seed.encode(), digest_size=n // 2).hexdigest()


def flat(session: str, i: int, t_s: float, *, tool=None, args=None, op=None, state=None, status="OK",
         parent=None, trace=None, events=None, **attrs):
    a = {"gen_ai.conversation.id": session}
    if tool:
        a.update({"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": tool})
        if args is not None:
            a["gen_ai.tool.call.arguments"] = args
    if op:
        a["gen_ai.operation.name"] = op
    if state:
        a["agent.state_hash"] = state
    a.update(attrs)
    end = BASE + int(t_s * S)
    return {
        "trace_id": _hex(trace or session, 32),
        "span_id": _hex(f"{session}/{i}", 16),
        "parent_span_id": _hex(f"{session}/{parent}", 16) if parent is not None else None,
        "name": tool or op or "step",
        "kind": "INTERNAL",
        "start_time_unix_nano": end - S // 5,
        "end_time_unix_nano": end,
        "status": {"code": status},
        "attributes": a,
        "resource": {"service.name": "agent-svc", "tenant.id": "acme"},
        **({"events": events} if events else {}),
    }


def _seq(session, items):
    return [flat(session, i, t, **kw) for i, (t, kw) in enumerate(items)]


def _agent(session, base, children, *, outcome="success", root_status="OK"):
    """A root invoke_agent span (index 0, ending last) with children (t offset, kwargs)."""
    kids = [flat(session, i + 1, base + t, parent=0, **kw) for i, (t, kw) in enumerate(children)]
    end = base + max([t for t, _ in children] + [0]) + 1
    root = flat(session, 0, end, op="invoke_agent", status=root_status,
                **({"agent.outcome": outcome} if outcome else {}))
    return kids + [root]


def _chat(session, i, t, cost=None, retry=0, tenant=None, model="gpt-4o"):
    a = {"gen_ai.provider.name": "openai", "gen_ai.request.model": model,
         "gen_ai.usage.input_tokens": 1000, "gen_ai.usage.output_tokens": 200}
    if cost is not None:
        a["gen_ai.usage.cost"] = cost
    if retry:
        a["http.request.resend_count"] = retry
    sp = flat(session, i, t, op="chat", state=f"{session}-{i}", status="ERROR" if retry else "OK", **a)
    if tenant:
        sp["resource"] = {"service.name": "agent-svc", "tenant.id": tenant}
    return sp


def _plan(session, wf, steps, t):
    return flat(session, 100 + int(t), t, op="plan", **{"workflow.id": wf, "plan.steps": orjson.dumps(steps).decode()})


def scenarios() -> dict[str, tuple[list[dict], str | None]]:
    """name → (spans, expected rule or None for benign)."""
    q = '{"query": "weather in Paris", "api_key": "sk-SECRET-123"}'
    return {
        "repeat": (_seq("loop-repeat", [(i * 4, {"tool": "search", "args": q}) for i in range(4)]), "repeat"),
        "cycle": (_seq("loop-cycle", [(i * 3, {"tool": t}) for i, t in enumerate("ABCABCABC")]), "cycle"),
        "stagnation": (_seq("loop-stag", [(i * 5, {"op": "chat", "state": "s0"}) for i in range(6)]), "stagnation"),
        "paging": (_seq("ok-paging", [(i * 2, {"tool": "search", "args": f'{{"q": "x", "page": {i}}}'})
                                      for i in range(12)]), None),
        "polling": (_seq("ok-polling", [(i * 2, {"tool": "job_status", "args": '{"id": 7}'} if i % 2 == 0
                                         else {"op": "chat", "state": f"st{i}"}) for i in range(16)]), None),
        "spread": (_seq("ok-spread", [(i * 400, {"tool": "search", "args": q}) for i in range(4)]), None),
        # silent_success: the agent reports success although a tool failed and was never retried
        "silent-failed-tool": (_agent("silent-fail", 3000, [
            (1, {"tool": "charge_card", "args": '{"amount": 5}', "status": "ERROR"}),
            (2, {"op": "chat", "state": "a"})]), "failed_tool"),
        "silent-unverified": (_agent("silent-unver", 3100, [
            (1, {"tool": "delete_rows", "args": '{"t": 1}', "tool.action_class": "mutation"})]),
            "unverified_mutation"),
        "ok-retried": (_agent("ok-retried", 3200, [
            (1, {"tool": "http_get", "args": '{"u": 1}', "status": "ERROR"}),
            (3, {"tool": "http_get", "args": '{"u": 1}'})]), None),
        "ok-verified": (_agent("ok-verified", 3300, [
            (1, {"tool": "write_file", "args": '{"p": 1}', "tool.action_class": "mutation",
                 "tool.verification_status": "verified"})]), None),
        "ok-admitted-failure": (_agent("ok-admitted", 3400, [
            (1, {"tool": "charge_card", "args": '{"amount": 5}', "status": "ERROR"})], outcome="failure"), None),
        # plan_deadlock: a 3-cycle declared across two revisions of the plan; a diamond DAG is fine
        "deadlock": ([_plan("dl", "wf-dead", [{"id": "a", "depends_on": ["b"]}, {"id": "b", "depends_on": ["c"]}], 4000),
                      _plan("dl", "wf-dead", [{"id": "c", "depends_on": ["a"]}], 4005)], "deadlock"),
        # retry_storm: 6 sessions retry one route 4x each within a minute (24 retries, 6 sessions)
        "route-storm": ([_chat(f"storm-{k}", i, 5000 + k + i * 5, retry=1, tenant="storm-co", model="gpt-4.1")
                         for k in range(6) for i in range(4)], "route_storm"),
        # a session retrying 11 times alone
        "session-storm": ([_chat("hammer", i, 5200 + i * 3, retry=2, tenant="solo-co", model="o3")
                           for i in range(11)], "session_storm"),
        "ok-sparse-retries": ([_chat(f"sparse-{k}", 0, 5400 + k * 70, retry=1, tenant="calm-co", model="o4-mini")
                               for k in range(8)], None),
        # cost_velocity: $3 in 50 s; and $11 over 10 minutes at ~$1.1/min
        "cost-rate": ([_chat("spender", i, 6000 + i * 10, cost=0.5, tenant="cost-co") for i in range(6)], "rate"),
        "cost-budget": ([_chat("budget", i, 6200 + i * 30, cost=0.55, tenant="budget-co") for i in range(20)],
                        "budget"),
        # tenant spike: 20 minutes of ~$0.40/min (the learned baseline), then $5.40 in one minute
        # spread over 6 sessions (no single session is too fast)
        "tenant-spike": ([_chat(f"base-{m}", 0, 8000 + m * 60, cost=0.4, tenant="spiky-co") for m in range(20)]
                         + [_chat(f"spike-{k}", 0, 8000 + 20 * 60 + k * 5, cost=0.9, tenant="spiky-co")
                            for k in range(6)], "tenant_spike"),
        "ok-steady-cost": ([_chat("steady", i, 7000 + i * 20, cost=0.5, tenant="steady-co") for i in range(12)],
                           None),
        "ok-diamond": ([_plan("dia", "wf-ok", [{"id": "a", "depends_on": []}, {"id": "b", "depends_on": ["a"]},
                                               {"id": "c", "depends_on": ["a"]}, {"id": "d", "depends_on": ["b", "c"]}],
                              4100)], None),
    }


def _any(v):
    if isinstance(v, bool):
        return {"boolValue": v}
    if isinstance(v, int):
        return {"intValue": str(v)}
    if isinstance(v, float):
        return {"doubleValue": v}
    return {"stringValue": str(v)}


def to_otlp_json(spans: list[dict]) -> dict:
    out = []
    for s in spans:
        out.append({
            "traceId": s["trace_id"], "spanId": s["span_id"], "name": s["name"], "kind": 1,
            "startTimeUnixNano": str(s["start_time_unix_nano"]), "endTimeUnixNano": str(s["end_time_unix_nano"]),
            "attributes": [{"key": k, "value": _any(v)} for k, v in s["attributes"].items()],
            "status": {"code": 2 if s["status"]["code"] == "ERROR" else 1},
        })
    res = spans[0]["resource"]
    return {"resourceSpans": [{
        "resource": {"attributes": [{"key": k, "value": _any(v)} for k, v in res.items()]},
        "scopeSpans": [{"scope": {"name": "tests"}, "spans": out}],
    }]}


def write_all(dirpath: Path) -> dict[str, Path]:
    """Write every scenario mixed together in the three encodings; returns format → path."""
    allspans = [s for spans, _ in scenarios().values() for s in spans]
    allspans.sort(key=lambda s: s["end_time_unix_nano"])
    paths = {"jsonl": dirpath / "spans.jsonl", "array": dirpath / "spans.json", "otlp": dirpath / "spans.otlp.jsonl"}
    paths["jsonl"].write_bytes(b"".join(orjson.dumps(s) + b"\n" for s in allspans))
    paths["array"].write_bytes(orjson.dumps(allspans, option=orjson.OPT_INDENT_2))
    by_session: dict[str, list[dict]] = {}
    for s in allspans:
        by_session.setdefault(s["attributes"]["gen_ai.conversation.id"], []).append(s)
    # one OTLP request per span, in event-time order, so sessions interleave as they would live
    paths["otlp"].write_bytes(b"".join(orjson.dumps(to_otlp_json([s])) + b"\n" for s in allspans))
    return paths
