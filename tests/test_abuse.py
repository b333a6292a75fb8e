"""Hostile *values* in well-formed input (issue: nothing a producer sends can switch the kill switch
off). Each test reproduces one finding through replay — the same ingest and detector cores the
live worker runs — or through ingest alone, and failed before the fix it guards."""

from __future__ import annotations

import io

import orjson

from streams import semconv
from streams.ingest import decode
from streams.replay import run

T0 = 1_767_225_600 * 10**9  # 2026-01-01T00:00:00Z
S = 10**9
TID = "ab" * 16


def flat(i, t_ns, *, session="s1", tool="search", args='{"q": 1}', status="OK", trace=TID, **extra):
    a = {"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": tool, "gen_ai.tool.call.arguments": args,
         "gen_ai.conversation.id": session}
    a.update(extra)
    return {"trace_id": trace, "span_id": f"{i:016x}", "name": f"execute_tool {tool}",
            "start_time_unix_nano": t_ns - S // 10, "end_time_unix_nano": t_ns, "status": {"code": status},
            "attributes": a, "resource": {"service.name": "svc"}}


def replay_docs(docs):
    data = b"\n".join(orjson.dumps(d) for d in docs) + b"\n"
    out, cmds = io.BytesIO(), io.BytesIO()
    stats = run([io.BytesIO(data)], out, cmds)
    return ([orjson.loads(x) for x in out.getvalue().splitlines()],
            [orjson.loads(x) for x in cmds.getvalue().splitlines()], stats)


def opened(incidents, detector="no_progress_loop"):
    return [i for i in incidents if i["detector"] == detector and i["status"] == "open"]


# ------------------------------------------------------------------ 1. duplicates are one call


def test_two_calls_each_delivered_twice_as_messages_are_two_calls():
    a, b = flat(1, T0 + S), flat(2, T0 + 2 * S)
    incidents, _, stats = replay_docs([a, a, b, b, flat(99, T0 + 60 * S, tool="other")])
    assert opened(incidents) == []
    assert stats.duplicates == 2


def test_the_same_span_twice_in_one_message_is_one_call():
    a, b = flat(1, T0 + S), flat(2, T0 + 2 * S)
    incidents, _, stats = replay_docs([[a, a, b, b]])
    assert opened(incidents) == [] and stats.duplicates == 2


def test_an_otlp_request_sent_twice_counts_once():
    from tests.frameworks.recorder import FIXTURES

    req = (FIXTURES / "openai-openinference" / "paging.otlp.json").read_bytes().strip()
    out = io.BytesIO()
    stats = run([io.BytesIO(req + b"\n" + req + b"\n")], out)
    once = io.BytesIO()
    run([io.BytesIO(req + b"\n")], once)
    assert out.getvalue() == once.getvalue()  # paging: nothing, however often it is re-sent
    assert stats.duplicates > 0


def test_a_real_loop_is_still_found_with_duplicates_around_it():
    spans = [flat(i, T0 + i * S) for i in range(1, 4)]
    incidents, _, _ = replay_docs([spans[0], spans[0], spans[1], spans[2], spans[2]])
    (inc,) = opened(incidents)
    assert inc["evidence"]["repeats"] == 3 and len(set(inc["evidence"]["span_ids"])) == 3


# --------------------------------------------------- 2./3. clock outliers never move the clock


def _traffic_with_loops(n_loops, outlier=None, at=5):
    docs, i = [], 0
    for k in range(n_loops):
        for rep in range(3):
            i += 1
            docs.append(flat(i, T0 + (k * 60 + rep * 5) * S, session=f"loop-{k}", trace=f"{k + 1:032x}"))
        if outlier is not None and k == at:
            docs.append(outlier)
    return docs


def test_one_span_dated_2100_does_not_release_every_halt():
    from streams.replay import Replayer

    year_2100 = 4_102_444_800 * 10**9
    docs = _traffic_with_loops(12, flat(10_000, year_2100, session="evil", tool="x"))
    rep = Replayer()
    outs = []
    for d in docs:
        outs.extend(rep.feed(decode(orjson.dumps(d)).spans))
    actions = [orjson.loads(o.value)["action"] for o in outs if o.kind != "incident"]
    # every loop halted, and (before the end of the input) no halt released: 15 min TTLs, 12 min of data
    assert actions.count("halt") == 12 and "release" not in actions
    assert rep.watermark_ns < T0 + 3600 * S
    assert rep.stats.rejected["clock_skew"] == 1


def test_a_call_stamped_far_off_does_not_hide_a_loop():
    # at 0 and an hour ahead: outliers (rejected); an hour ago: late data, too old for the window
    for off, rejected in ((-T0, 1), (-3600 * S, 0), (3600 * S, 1)):
        docs = [flat(1, T0 + S), flat(2, T0 + 2 * S), flat(3, T0 + 3 * S + off), flat(4, T0 + 4 * S)]
        incidents, _, stats = replay_docs([flat(100 + j, T0 + j * S // 10, session="other", tool=f"t{j}")
                                           for j in range(1, 9)] + docs)
        assert len(opened(incidents)) == 1, off
        assert stats.rejected["clock_skew"] == rejected, off


def test_a_late_call_inside_the_window_still_counts():
    # late (out of order) but plausible: it is a call, not an outlier
    docs = [flat(1, T0 + 100 * S), flat(2, T0 + 110 * S), flat(3, T0 + 50 * S)]
    incidents, _, stats = replay_docs(docs)
    assert len(opened(incidents)) == 1 and not stats.rejected


# ------------------------------------------------------------------ 6. numbers stay numbers


def test_a_cost_of_1e300_does_not_crash_and_is_counted():
    docs = [flat(1, T0 + S, tool="t", **{"gen_ai.usage.cost": 1e300}),
            flat(2, T0 + 2 * S, tool="u", **{"gen_ai.usage.input_tokens": 1e30}),
            flat(3, T0 + 3 * S, tool="v", **{"gen_ai.usage.cost": 1e308})]
    incidents, _, stats = replay_docs(docs)
    assert [i for i in incidents if i["detector"] == "cost_velocity"] == []
    assert stats.bad_values["cost"] == 2 and stats.bad_values["input_tokens"] == 1


# --------------------------------------- 8. content never travels; identifiers capped and screened


def test_status_messages_and_exception_details_do_not_survive_ingest():
    d = flat(1, T0 + S, status="ERROR")
    d["status"]["message"] = "Error: prompt was 'my card is 4111…' key sk-live-abcdefghijklmnopqrstuvwx"
    d["events"] = [{"name": "exception", "time_unix_nano": T0 + S, "attributes": {
        "exception.type": "ValueError", "exception.message": "user said: secret",
        "exception.stacktrace": "Traceback …"}}]
    (s,) = decode(orjson.dumps(d)).spans
    wire = orjson.dumps(s.to_wire())
    for secret in (b"4111", b"sk-live", b"user said", b"Traceback"):
        assert secret not in wire, secret
    assert semconv.is_error(s) and s.events[0].attributes == {"exception.type": "ValueError"}


def test_identifiers_in_incidents_are_capped_and_screened():
    huge = "t" * 10_000
    secret = "sk-proj-" + "a1B2c3D4" * 6
    docs = [flat(i, T0 + i * S, tool=huge) for i in range(1, 4)]
    docs += [flat(10 + i, T0 + (10 + i) * S, tool=secret, session="s2") for i in range(1, 4)]
    incidents, commands, _ = replay_docs(docs)
    assert len(opened(incidents)) == 2
    blob = b"".join(orjson.dumps(x) for x in incidents + commands)
    assert huge.encode() not in blob and secret[:12].encode() not in blob
    for inc in opened(incidents):
        assert len(inc["evidence"]["fingerprint"]["tool"]) <= 128


def test_many_distinct_huge_tool_names_keep_the_session_state_small():
    from streams.replay import Replayer
    from streams.ingest import decode as dec

    rep = Replayer()
    for i in range(200):
        rep.feed(dec(orjson.dumps(flat(i + 1, T0 + i * S, tool=f"{i:04d}" + "x" * 10_000))).spans)
    (st,) = rep.states.values()
    assert len(rep.pipe.dump(st)) < 256 * 1024


# --------------------------------------------------------------- 9. nothing passes uncounted


def test_json_scalars_are_bad_json_not_bad_otlp():
    for v in (b"42", b'"a string"', b"true", b"null", b"-1.5e3"):
        d = decode(v)
        assert [r.reason for r in d.rejections] == ["bad_json"], v
        assert "not a span" in d.rejections[0].detail


def test_empty_inputs_decode_as_empty():
    for v in (b"", b"   ", b"[]", b'{"resourceSpans": []}', None):
        d = decode(v)
        assert d.spans == [] and d.rejections == [], v
