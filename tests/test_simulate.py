"""The simulator: deterministic, well-shaped, realistic, and honest about its ground truth.

The loop rules of README "Detectors" are re-implemented here by a deliberately naive checker, independent of
the detector, so a healthy session that looks like a loop (or an injected one that does not) fails
the test whatever the detector does.
"""

from __future__ import annotations

import asyncio
import base64
import io
import re
import time
from collections import defaultdict

import orjson
import pytest

from streams import semconv, simulate as sim
from streams.models import FlatSpanIn, Span
from streams.settings import Settings

T0 = 1_767_225_600_000_000_000
S = 10**9
HEX = re.compile(r"^[0-9a-f]+$")


@pytest.fixture(scope="module")
def spans() -> list[dict]:
    return list(sim.generate(11, 300, T0, loops=12))


@pytest.fixture(scope="module")
def by_session(spans) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = defaultdict(list)
    for s in spans:
        out[s["attributes"]["gen_ai.conversation.id"]].append(s)
    return out


def fp(s: dict) -> tuple[str, str | None] | None:
    a = s["attributes"]
    if "gen_ai.tool.name" not in a:
        return None
    if "gen_ai.tool.call.arguments" not in a:  # a tool without arguments: no argument hash
        return a["gen_ai.tool.name"], None
    return a["gen_ai.tool.name"], orjson.dumps(orjson.loads(a["gen_ai.tool.call.arguments"]),
                                               option=orjson.OPT_SORT_KEYS).decode()


def loop_violations(session: list[dict]) -> set[str]:
    """Naive README "Detectors" checker over one session's spans in end-time order."""
    found: set[str] = set()
    state = None
    calls: dict[tuple, list[int]] = defaultdict(list)
    seq: list[tuple] = []
    chat_hash, streak = None, 0
    mutated: set[tuple] = set()
    for s in sorted(session, key=lambda s: s["end_time_unix_nano"]):
        a, t = s["attributes"], s["end_time_unix_nano"]
        f = fp(s)
        progress = False
        sh = a.get("agent.state_hash")
        if sh is not None:
            progress = state is not None and sh != state
            state = sh
        if f and a.get("tool.action_class") in semconv.MUTATION_CLASSES and s["status"]["code"] == "OK" \
                and f not in mutated:
            mutated.add(f)
            progress = True
        if progress:
            calls.clear()
            seq.clear()
            chat_hash, streak = None, 0
        if a.get("gen_ai.operation.name") == "chat":
            streak = 0 if sh is None else streak + 1 if sh == chat_hash else 1  # no hash: carries none
            chat_hash = sh
            if streak >= 5:
                found.add("stagnation")
        if f:
            calls[f] = [x for x in calls[f] if t - x <= 600 * S] + [t]
            if len(calls[f]) >= (3 if f[1] is not None else 6):  # the threshold doubles without a hash
                found.add("repeat")
            seq.append(f)
            for p in (2, 3, 4):
                tail = seq[-3 * p:]
                if len(tail) == 3 * p and len(set(tail[:p])) > 1 and all(tail[i] == tail[i % p] for i in range(3 * p)):
                    found.add("cycle")
    return found


# ----------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("fmt", sim.FORMATS)
def test_same_seed_same_bytes(fmt):
    a, b = io.BytesIO(), io.BytesIO()
    na = sim.write_file(a, sim.generate(5, 40, T0, loops=3), fmt)
    nb = sim.write_file(b, sim.generate(5, 40, T0, loops=3), fmt)
    assert na == nb > 0
    assert a.getvalue() == b.getvalue()


def test_other_seed_other_traffic():
    a = list(sim.generate(1, 10, T0, loops=0))
    b = list(sim.generate(2, 10, T0, loops=0))
    assert {s["trace_id"] for s in a}.isdisjoint({s["trace_id"] for s in b})


def test_prefix_stable_when_more_sessions_requested():
    truth_small = sim.injected_sessions(3, 5, 2)
    truth_big = sim.injected_sessions(3, 50, 2)
    assert truth_small == truth_big
    small = {s["span_id"] for s in sim.generate(3, 5, T0, loops=2)}
    big = {s["span_id"] for s in sim.generate(3, 50, T0, loops=2)}
    assert small <= big


# ----------------------------------------------------------------------------- shape


def test_flat_span_shape(spans):
    ids = set()
    for s in spans:
        FlatSpanIn.model_validate(s)
        assert len(s["trace_id"]) == 32 and HEX.match(s["trace_id"])
        assert len(s["span_id"]) == 16 and HEX.match(s["span_id"])
        assert s["span_id"] not in ids
        ids.add(s["span_id"])
        assert s["status"]["code"] in ("OK", "ERROR")
        assert set(s["resource"]) == {"service.name", "tenant.id"}
        assert s["start_time_unix_nano"] <= s["end_time_unix_nano"]
        for k, v in s["attributes"].items():
            assert "." in k or k.startswith("gen_ai")
            assert isinstance(v, str | int | float | bool), k


def test_event_time_order_and_interleaving(spans):
    ends = [s["end_time_unix_nano"] for s in spans]
    assert ends == sorted(ends)
    order = [s["attributes"]["gen_ai.conversation.id"] for s in spans]
    switches = sum(1 for a, b in zip(order, order[1:]) if a != b)
    assert switches > len(spans) // 2  # sessions really run concurrently


def test_session_structure(by_session):
    for sid, ss in by_session.items():
        root = ss[-1]
        assert root["parent_span_id"] is None
        assert root["attributes"]["gen_ai.operation.name"] == "invoke_agent"
        assert {s["trace_id"] for s in ss} == {root["trace_id"]}
        assert all(s["parent_span_id"] == root["span_id"] for s in ss[:-1])
        dur = (root["end_time_unix_nano"] - root["start_time_unix_nano"]) / S
        assert 55 <= dur <= 200, (sid, dur)
        ends = [s["end_time_unix_nano"] for s in ss]
        gaps = [(b - a) / S for a, b in zip(ends, ends[1:])]
        assert max(gaps) < 45, sid  # spans a few seconds apart
        ops = [s["attributes"]["gen_ai.operation.name"] for s in ss]
        assert ops[0] == "chat" and "chat" in ops
        for s in ss:
            a = s["attributes"]
            if a["gen_ai.operation.name"] == "chat":
                for k in ("gen_ai.provider.name", "gen_ai.request.model", "gen_ai.usage.input_tokens",
                          "gen_ai.usage.output_tokens", "gen_ai.usage.cost", "agent.state_hash"):
                    assert k in a, k
            elif a["gen_ai.operation.name"] == "execute_tool":
                if "gen_ai.tool.call.arguments" in a:
                    assert isinstance(orjson.loads(a["gen_ai.tool.call.arguments"]), dict)
                else:  # the tools that take no arguments
                    assert a["gen_ai.tool.name"] in ("get_queue_depth", "list_open_alerts", "check_deploy_status")
                if a["tool.action_class"] in semconv.MUTATION_CLASSES:
                    assert a["tool.verification_status"] == "verified"
                    assert s["status"]["code"] == "OK"


def test_realistic_variety(spans):
    tools = {s["attributes"].get("gen_ai.tool.name") for s in spans} - {None}
    assert {"search", "read_file", "http_get", "run_sql", "write_file", "send_email"} <= tools
    args = {s["attributes"]["gen_ai.tool.call.arguments"] for s in spans if "gen_ai.tool.call.arguments" in s["attributes"]}
    assert len(args) > 500
    assert any('"page":' in a for a in args) and any('"query":' in a for a in args) and any('"path":' in a for a in args)
    assert len({s["resource"]["tenant.id"] for s in spans}) == 3
    assert len({s["attributes"].get("gen_ai.request.model") for s in spans}) >= 4
    assert any(s["attributes"].get("http.request.resend_count") for s in spans)
    assert any(s["attributes"].get("retry.attempt") for s in spans)
    assert any(s["status"]["code"] == "ERROR" and "gen_ai.tool.name" in s["attributes"] for s in spans)


def test_tenants_parameter():
    spans = list(sim.generate(1, 60, T0, loops=0, tenants=10))
    assert len({s["resource"]["tenant.id"] for s in spans}) > 3
    with pytest.raises(ValueError):
        list(sim.generate(1, 1, T0, loops=0, tenants=0))


# ----------------------------------------------------------------------------- ground truth


def test_ground_truth(spans, by_session):
    truth = sim.injected_sessions(11, 300, 12)
    assert len(truth) == 12
    assert sorted(truth.values()) == sorted(["repeat", "cycle", "stagnation"] * 4)
    marked = {s["attributes"]["gen_ai.conversation.id"]: s["attributes"]["sim.injected"]
              for s in spans if "sim.injected" in s["attributes"]}
    assert marked == truth
    for sid in truth:
        root = by_session[sid][-1]
        assert root["attributes"]["agent.outcome"] == "failure"
    for sid in set(by_session) - set(truth):
        assert by_session[sid][-1]["attributes"]["agent.outcome"] == "success"
    assert sim.injected_sessions(1, 2, 5) == {sim.session_id(1, 0): "repeat", sim.session_id(1, 1): "cycle"}


def test_healthy_sessions_do_not_loop(by_session):
    truth = sim.injected_sessions(11, 300, 12)
    bad = {sid: v for sid, ss in by_session.items() if sid not in truth and (v := loop_violations(ss))}
    assert not bad


def test_injected_sessions_loop_as_labelled(by_session):
    for sid, kind in sim.injected_sessions(11, 300, 12).items():
        assert kind in loop_violations(by_session[sid]), (sid, kind)


def test_injected_loops_have_the_promised_shape(by_session):
    for sid, kind in sim.injected_sessions(11, 300, 12).items():
        ss = by_session[sid]
        if kind == "repeat":
            counts: dict = defaultdict(int)
            for s in ss:
                if f := fp(s):
                    counts[f] += 1
            assert max(counts.values()) >= 6
        elif kind == "stagnation":
            chats = [s["attributes"]["agent.state_hash"] for s in ss if s["attributes"]["gen_ai.operation.name"] == "chat"]
            assert chats[-7:] == [chats[-1]] * 7


def test_failed_tool_calls_are_retried_successfully(by_session):
    """No silent-success gap in healthy traffic: every failed call succeeds later, same arguments."""
    for ss in by_session.values():
        for i, s in enumerate(ss):
            if s["status"]["code"] == "ERROR" and "gen_ai.tool.name" in s["attributes"]:
                later = [x for x in ss[i + 1:] if fp(x) == fp(s) and x["status"]["code"] == "OK"]
                assert later and later[0]["attributes"]["retry.attempt"] == 1
                assert (later[0]["end_time_unix_nano"] - s["end_time_unix_nano"]) < 30 * S


def test_healthy_traffic_stays_under_other_detector_thresholds(by_session):
    for sid, ss in by_session.items():
        retries = [s for s in ss if s["attributes"].get("retry.attempt") or s["attributes"].get("http.request.resend_count")]
        assert len(retries) < 10, sid
        costs = [(s["end_time_unix_nano"], s["attributes"].get("gen_ai.usage.cost", 0.0)) for s in ss]
        assert sum(c for _, c in costs) < 10
        for t, _ in costs:
            assert sum(c for u, c in costs if t <= u < t + 60 * S) < 2


def test_plans_are_acyclic_and_complete(spans):
    plans = [orjson.loads(s["attributes"]["plan.steps"]) for s in spans if "plan.steps" in s["attributes"]]
    assert plans
    for steps in plans:
        ids = [st["id"] for st in steps]
        for k, st in enumerate(steps):
            assert all(d in ids[:k] for d in st["depends_on"])  # deps point backwards: no cycle


def test_detector_finds_exactly_the_injected_sessions(spans):
    """Cross-check with the real no_progress_loop core (tool arguments hashed as ingest does)."""
    from streams.detectors.loop import NoProgressLoop

    det = NoProgressLoop()
    states: dict = {}
    hit: set[str] = set()
    for d in spans:
        a = dict(d["attributes"])
        if "gen_ai.tool.call.arguments" in a:
            a["tool.payload_hash"] = semconv.canonical_hash(a.pop("gen_ai.tool.call.arguments"))
        sp = Span(d["trace_id"], d["span_id"], d["parent_span_id"], d["name"], d["kind"], d["start_time_unix_nano"],
                  d["end_time_unix_nano"], d["status"]["code"], d["status"]["message"], a, d["resource"])
        sid = semconv.session_of(sp)
        st, found = det.step(states.get(sid) or det.new_state(), sp, sp.end_ns)
        states[sid] = st
        hit.update(f.session_id for f in found if f.status == "open")
    assert hit == set(sim.injected_sessions(11, 300, 12))


@pytest.mark.parametrize("fmt", ["jsonl", "otlp_json"])
def test_replay_end_to_end_finds_the_injected_sessions(fmt):
    """simulate → file → ``breakwater replay``: incidents for exactly the injected sessions, no raw args."""
    from streams.replay import run

    buf = io.BytesIO()
    sim.write_file(buf, sim.generate(8, 120, T0, loops=6), fmt)
    out, cmds = io.BytesIO(), io.BytesIO()
    stats = run([io.BytesIO(buf.getvalue())], out, cmds)
    assert not stats.rejected
    incidents = [orjson.loads(line) for line in out.getvalue().splitlines()]
    assert {i["session_id"] for i in incidents if i["status"] == "open"} == set(sim.injected_sessions(8, 120, 6))
    assert b"call.arguments" not in out.getvalue() + cmds.getvalue()


# ----------------------------------------------------------------------------- OTLP JSON


def _from_otlp(req: dict) -> list[dict]:
    """Independent decoder of the OTLP JSON encoding back to flat spans."""

    def val(v):
        (k, x), = v.items()
        return {"stringValue": str, "boolValue": bool, "doubleValue": float, "intValue": int}[k](x)

    out = []
    for rs in req["resourceSpans"]:
        res = {a["key"]: val(a["value"]) for a in rs["resource"]["attributes"]}
        for ss in rs["scopeSpans"]:
            for s in ss["spans"]:
                out.append({
                    "trace_id": s["traceId"], "span_id": s["spanId"], "parent_span_id": s.get("parentSpanId"),
                    "name": s["name"], "kind": {1: "INTERNAL", 3: "CLIENT"}[s["kind"]],
                    "start_time_unix_nano": int(s["startTimeUnixNano"]),
                    "end_time_unix_nano": int(s["endTimeUnixNano"]),
                    "status": {"code": {1: "OK", 2: "ERROR"}[s["status"]["code"]],
                               "message": s["status"].get("message", "")},
                    "attributes": {a["key"]: val(a["value"]) for a in s["attributes"]},
                    "resource": res,
                })
    return out


def test_otlp_json_shape_and_round_trip(spans):
    chunk = spans[:100]
    req = sim.to_otlp_json(chunk)
    assert list(req) == ["resourceSpans"]
    for rs in req["resourceSpans"]:
        assert set(rs) == {"resource", "scopeSpans"}
        for sp in rs["scopeSpans"][0]["spans"]:
            assert isinstance(sp["startTimeUnixNano"], str) and isinstance(sp["kind"], int)
            assert sp["status"]["code"] in (1, 2)
            for a in sp["attributes"]:
                (typ, v), = a["value"].items()
                assert typ in ("stringValue", "intValue", "doubleValue", "boolValue")
                if typ == "intValue":
                    assert isinstance(v, str) and int(v) >= 0
    back = sorted(_from_otlp(req), key=lambda s: s["span_id"])
    assert back == sorted(chunk, key=lambda s: s["span_id"])


def test_otlp_json_parses_as_protobuf(spans):
    """OTLP JSON is protobuf JSON except for hex ids; with ids as base64 it must parse strictly."""
    from google.protobuf import json_format
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    req = sim.to_otlp_json(spans[:50])
    for rs in req["resourceSpans"]:
        for sp in rs["scopeSpans"][0]["spans"]:
            for k in ("traceId", "spanId", "parentSpanId"):
                if k in sp:
                    sp[k] = base64.b64encode(bytes.fromhex(sp[k])).decode()
    msg = json_format.ParseDict(req, ExportTraceServiceRequest())
    first = msg.resource_spans[0].scope_spans[0].spans[0]
    assert len(first.trace_id) == 16 and first.end_time_unix_nano > T0


def test_otlp_json_file_chunks(tmp_path):
    p = tmp_path / "otlp.jsonl"
    n = sim.write_file(p, sim.generate(2, 30, T0, loops=2), "otlp_json")
    lines = p.read_bytes().splitlines()
    counts = [sum(len(rs["scopeSpans"][0]["spans"]) for rs in orjson.loads(l)["resourceSpans"]) for l in lines]
    assert sum(counts) == n and max(counts) == sim.OTLP_SPANS_PER_REQUEST and len(lines) == -(-n // 100)


def test_file_formats(tmp_path):
    spans = list(sim.generate(4, 5, T0, loops=1))
    p = tmp_path / "a.jsonl"
    assert sim.write_file(p, spans, "jsonl") == len(spans)
    assert [orjson.loads(l) for l in p.read_bytes().splitlines()] == spans
    buf = io.BytesIO()
    sim.write_file(buf, iter(spans), "json")
    assert orjson.loads(buf.getvalue()) == spans
    with pytest.raises(ValueError, match="unknown format"):
        sim.write_file(io.BytesIO(), spans, "xml")


# ----------------------------------------------------------------------------- Kafka side (no broker)


def test_messages_group_by_session_and_keep_order(spans):
    seen: dict[bytes, list[str]] = defaultdict(list)
    total = 0
    for key, value, n in sim.messages(spans, batch=50):
        arr = orjson.loads(value)
        assert len(arr) == n and {s["attributes"]["gen_ai.conversation.id"] for s in arr} == {key.decode()}
        seen[key] += [s["span_id"] for s in arr]
        total += n
    assert total == len(spans)
    for key, ids in seen.items():
        expected = [s["span_id"] for s in spans if s["attributes"]["gen_ai.conversation.id"] == key.decode()]
        assert ids == expected


def test_messages_respect_max_bytes():
    spans = sim.build_session(1, 0, T0)
    msgs = list(sim.messages(spans, batch=1000, max_bytes=3000))
    assert len(msgs) > 1 and all(len(v) <= 3000 for _, v, _ in msgs)
    assert sum(n for *_, n in msgs) == len(spans)


class FakeProducer:
    def __init__(self):
        self.sent: list[tuple[str, bytes, bytes, int]] = []

    async def send(self, topic, value=None, key=None):
        self.sent.append((topic, key, value, time.time_ns()))


async def test_publish_paces_and_keys():
    spans = list(sim.generate(6, 20, T0, loops=1))[:120]
    fake = FakeProducer()
    t = time.monotonic()
    stats = await sim.publish(Settings(), spans, rate=600, producer=fake)
    elapsed = time.monotonic() - t
    assert stats.spans == 120 and stats.messages == len(fake.sent)
    assert 0.12 <= elapsed < 2.0  # ~0.2 s at 600 spans/s
    assert all(topic == "agent.spans" for topic, *_ in fake.sent)
    for _, key, value, _ in fake.sent:
        assert {s["attributes"]["gen_ai.conversation.id"] for s in orjson.loads(value)} == {key.decode()}


async def test_run_live_uses_wall_clock_and_never_sends_the_future():
    fake = FakeProducer()
    t0 = time.time_ns()
    stats = await sim.run_live(Settings(), seed=3, sessions_per_s=30, loop_every=3, duration_s=0.4,
                               time_scale=0.002, drain=True, producer=fake)
    assert stats.sessions >= 5 and stats.injected == stats.sessions // 3
    sent = [(s, at) for _, _, value, at in fake.sent for s in orjson.loads(value)]
    assert len(sent) == stats.spans
    for s, at in sent:
        assert t0 - S < s["start_time_unix_nano"] and s["end_time_unix_nano"] <= at
    injected = [s for s, _ in sent if "sim.injected" in s["attributes"]]
    assert len(injected) == stats.injected
    assert all(s["attributes"]["gen_ai.conversation.id"] != sim.session_id(3, 0) for s, _ in sent)


def test_bad_arguments():
    with pytest.raises(ValueError):
        asyncio.run(sim.publish(Settings(), [], rate=0, producer=FakeProducer()))
    with pytest.raises(ValueError):
        list(sim.generate(1, -1, T0, loops=0))
    with pytest.raises(ValueError):
        sim.build_session(1, 0, T0, kind="teleport")


# ----------------------------------------------------------------------------- default start time (issue 13)


def test_default_start_is_now_for_kafka_and_fixed_for_files():
    assert sim.default_start_ns(True) == sim.FILE_START_NS == T0
    assert sim.default_start_ns(True, now_ns=5) == T0
    assert sim.default_start_ns(False, now_ns=5) == 5
    before = time.time_ns()
    assert before <= sim.default_start_ns(False) <= time.time_ns()


def test_cli_publishing_stamps_current_times(monkeypatch):
    """Regression: ``breakwater simulate`` to Kafka stamped spans at 2026-01-01, so halts were born expired."""
    from streams import cli

    published: list[dict] = []

    async def fake_publish(settings, spans, *, rate, **kw):
        published.extend(spans)
        return sim.PublishStats()

    monkeypatch.setattr(cli, "_check_broker", lambda settings: None)
    monkeypatch.setattr(sim, "publish", fake_publish)
    before = time.time_ns()
    assert cli.main(["simulate", "--sessions", "3", "--loops", "1", "--broker", "127.0.0.1:9"]) == 0
    after = time.time_ns()
    assert published
    first = min(s["start_time_unix_nano"] for s in published)
    assert before <= first <= after  # start = now
    assert all(s["end_time_unix_nano"] - after < 30 * 60 * S for s in published)  # minutes ahead, not months behind
    # an explicit --start-ns still wins
    published.clear()
    assert cli.main(["simulate", "--sessions", "2", "--loops", "0", "--start-ns", str(T0),
                     "--broker", "127.0.0.1:9"]) == 0
    assert min(s["start_time_unix_nano"] for s in published) == T0


def test_cli_file_output_keeps_the_deterministic_default(tmp_path):
    from streams import cli

    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    for p in (a, b):
        assert cli.main(["simulate", "--sessions", "3", "--loops", "1", "--out", str(p)]) == 0
    assert a.read_bytes() == b.read_bytes()
    spans = [orjson.loads(line) for line in a.read_bytes().splitlines()]
    assert min(s["start_time_unix_nano"] for s in spans) == T0
    expected = io.BytesIO()
    sim.write_file(expected, sim.generate(7, 3, T0, loops=1), "jsonl")
    assert a.read_bytes() == expected.getvalue()


def test_cli_help_says_which_default_applies():
    from streams.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.choices and "simulate" in a.choices)
    helptext = " ".join(sub.choices["simulate"].format_help().split())
    assert "now when publishing to Kafka" in helptext and "with --out" in helptext


# ----------------------------------------------------------------------------- every detector's pattern (issue 13)

ALL = sim.PATTERNS[len(sim.LOOP_KINDS):]


def _replay(data: bytes) -> tuple[list[dict], bytes]:
    from streams.replay import run

    out, cmds = io.BytesIO(), io.BytesIO()
    stats = run([io.BytesIO(data)], out, cmds)
    assert not stats.rejected, stats.rejected
    return [orjson.loads(line) for line in out.getvalue().splitlines()], out.getvalue()


def test_injected_layout():
    assert sim.injected_count(3, ALL) == 3 + 1 + 8 + 1 + 4 + 1 + 1
    truth = sim.injected_sessions(4, 100, 3, ALL)
    assert sorted(set(truth.values())) == sorted(sim.PATTERNS)
    assert list(truth.values()).count("route_storm") == sim.GROUP_SIZE["route_storm"] >= 5
    assert sim.injected_sessions(4, 100, 3) == {k: v for k, v in truth.items() if v in sim.LOOP_KINDS}
    with pytest.raises(ValueError, match="unknown injected pattern"):
        sim.injected_sessions(4, 100, 0, ["teleport"])


@pytest.mark.parametrize("seed", [1, 7])
def test_replay_finds_every_injected_pattern_and_nothing_else(seed):
    """simulate (all patterns) → file → replay: each pattern is found by its detector, with the rule
    it was injected as (a cycle is reported as a cycle, not as repeats), and no healthy session is."""
    buf = io.BytesIO()
    sim.write_file(buf, sim.generate(seed, 120, T0, loops=3, inject=ALL), "jsonl")
    incidents, raw = _replay(buf.getvalue())
    opened = [i for i in incidents if i["status"] == "open"]
    truth = sim.injected_sessions(seed, 120, 3, ALL)
    by_session = defaultdict(list)
    for i in opened:
        by_session[i["session_id"]].append(i)
    for sid, kind in truth.items():
        det = sim.PATTERN_DETECTOR[kind]
        if kind == "route_storm":
            continue  # a route-scoped incident, below
        if kind == "tenant_cost":
            continue  # tenant-scoped, below
        found = [i for i in by_session[sid] if i["detector"] == det]
        assert found, (kind, sid, by_session[sid])
        if det == "no_progress_loop":
            assert found[0]["evidence"]["rule"] == kind, found[0]["summary"]
    scopes = {(i["detector"], i["scope"]["kind"], i["scope"]["key"]) for i in opened}
    route = f"{sim.STORM_MODEL[0]}/{sim.STORM_MODEL[1]}"
    assert ("retry_storm", "route", route) in scopes
    assert ("cost_velocity", "tenant", sim.SPIKE_TENANT) in scopes
    wf = [i for i in opened if i["detector"] == "plan_deadlock"]
    assert len(wf) == 1 and wf[0]["scope"]["kind"] == "workflow" and wf[0]["session_id"] in truth
    # nothing else: every open incident belongs to an injected pattern
    for i in opened:
        if i["scope"]["kind"] in ("route", "tenant"):
            continue
        assert truth.get(i["session_id"]) is not None, i["summary"]
    assert {i["detector"] for i in opened} == set(sim.PATTERN_DETECTOR.values())
    # deterministic per seed: the same traffic and the same incidents, byte for byte
    again = io.BytesIO()
    sim.write_file(again, sim.generate(seed, 120, T0, loops=3, inject=ALL), "jsonl")
    assert again.getvalue() == buf.getvalue()
    assert _replay(again.getvalue())[1] == raw


def test_injected_patterns_stay_within_their_own_detector(by_session):
    """The storm and spike sessions do not loop, and each session stays under the session cost limits
    unless it is the session cost runaway."""
    spans = list(sim.generate(3, 40, T0, loops=0, inject=ALL))
    sessions = defaultdict(list)
    for s in spans:
        sessions[s["attributes"]["gen_ai.conversation.id"]].append(s)
    truth = sim.injected_sessions(3, 40, 0, ALL)
    for sid, kind in truth.items():
        assert not loop_violations(sessions[sid]), (sid, kind)
        costs = [(s["end_time_unix_nano"], s["attributes"].get("gen_ai.usage.cost", 0.0)) for s in sessions[sid]]
        worst = max(sum(c for u, c in costs if t <= u < t + 60 * S) for t, _ in costs)
        assert (worst > 2.0) == (kind == "session_cost"), (kind, worst)
        root = sessions[sid][-1]
        assert root["attributes"]["sim.injected"] == kind
        assert root["attributes"]["agent.outcome"] == ("success" if kind == "silent" else "failure")
    history = [s for s in spans if s["end_time_unix_nano"] < T0]
    assert history and {s["resource"]["tenant.id"] for s in history} == {sim.SPIKE_TENANT}
    assert min(s["end_time_unix_nano"] for s in history) >= T0 - sim.HISTORY_MINUTES * 60 * S


def test_cli_simulate_inject_all_then_replay_finds_all_five_detectors(tmp_path, capsys):
    from streams import cli

    f = tmp_path / "all.otlp.jsonl"
    assert cli.main(["simulate", "--sessions", "60", "--loops", "3", "--inject", "all", "--format", "otlp_json",
                     "--out", str(f)]) == 0
    capsys.readouterr()
    assert cli.main(["replay", str(f)]) == 0
    out = capsys.readouterr().out
    opened = [orjson.loads(line) for line in out.splitlines() if line.strip()]
    assert {i["detector"] for i in opened if i["status"] == "open"} == set(sim.PATTERN_DETECTOR.values())
    assert cli.main(["simulate", "--inject", "teleport", "--out", str(f)]) == 2
    assert "unknown pattern 'teleport'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- agents that obey the breaker


async def test_fleet_agents_obey_halt_and_throttle():
    """Live agents check the real gateway client before every call: a halted session stops (its root
    span says why), a throttled route slows its callers down, other agents go on."""
    from streams.gateway import BreakerClient, command_json

    breaker = BreakerClient("127.0.0.1:1", topic="agent.breaker")
    events: list[tuple[str, str, str | None]] = []
    fake = FakeProducer()
    fleet = sim.AgentFleet(Settings(), breaker, seed=5, producer=fake, healthy_per_s=0.001,
                           injected_scale=0.05, schedule=((0.0, "repeat"), (0.0, "route_storm")),
                           on_event=lambda ev, a, d: events.append((ev, a.kind, d.action if d else None)))
    task = asyncio.create_task(fleet.run(4.0))
    await asyncio.sleep(0.3)
    looping = next(a for a in fleet.agents.values() if a.kind == "repeat")
    storm = next(a for a in fleet.agents.values() if a.kind == "route_storm")
    route = f"{sim.STORM_MODEL[0]}/{sim.STORM_MODEL[1]}"
    breaker.apply(f"session:{looping.sid}".encode(),
                  command_json("halt", "session", looping.sid, reason="no_progress_loop:repeat",
                               expires_at="2100-01-01T00:00:00Z"))
    breaker.apply(f"route:{route}".encode(),
                  command_json("throttle", "route", route, rate_limit_per_s=2, reason="retry_storm:route",
                               expires_at="2100-01-01T00:00:00Z"))
    await task
    assert ("stopped", "repeat", "halt") in events
    assert looping.stopped is not None and looping.stopped.action == "halt"
    assert ("throttled", "route_storm", "throttle") in events and storm.throttled_s > 0
    sent = [s for _, _, value, _ in fake.sent for s in orjson.loads(value)]
    mine = [s for s in sent if s["attributes"]["gen_ai.conversation.id"] == looping.sid]
    root = mine[-1]
    assert root["parent_span_id"] is None and root["status"]["code"] == "ERROR"
    assert root["attributes"]["error.type"] == "breakwater.halt"
    assert len(mine) == looping.calls + 1  # nothing after the halt but the root
    assert all(s["end_time_unix_nano"] <= root["end_time_unix_nano"] for s in mine)
