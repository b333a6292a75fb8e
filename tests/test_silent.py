"""silent_success core: trace assembly on event time, the three gap kinds, late spans (README "Detectors")."""

from __future__ import annotations

import pickle
import random

import orjson
import pytest

from streams.detectors.silent import SilentParams, SilentSuccess
from streams.models import Span

S = 10**9
L = 5 * S  # allowed lateness
END = 10**30
T = "a" * 32


def sp(t, sid, *, parent="r", trace=T, dur=0.5, status="OK", tool=None, args="h", op=None, session="s1",
       **attrs):
    """A span ending at ``t`` seconds with id ``sid`` (child of ``r`` unless told)."""
    a: dict[str, object] = {"session.id": session}
    if tool is not None:
        a["gen_ai.tool.name"] = tool
        a["gen_ai.operation.name"] = "execute_tool"
        if args is not None:
            a["tool.payload_hash"] = args
    if op is not None:
        a["gen_ai.operation.name"] = op
    a.update({k.replace("__", "."): v for k, v in attrs.items()})
    end = int(t * S)
    return Span(trace, sid, parent, tool or op or "span", "INTERNAL", end - int(dur * S), end, status, "", a,
                {"service.name": "svc", "tenant.id": "acme"})


def root(t=10, sid="r", *, parent=None, **kw):
    kw.setdefault("dur", t)
    return sp(t, sid, parent=parent, op="invoke_agent", **kw)


def fail(t, sid, tool="search", **kw):
    return sp(t, sid, tool=tool, status="ERROR", **kw)


def ok(t, sid, tool="search", **kw):
    return sp(t, sid, tool=tool, **kw)


def mut(t, sid, tool="deploy", verified=False, **kw):
    if verified:
        kw["tool__verification_status"] = "verified"
    return sp(t, sid, tool=tool, tool__action_class="mutation", **kw)


def drive(spans, det=None, lateness=L):
    """Replay spans in arrival order with watermark = max end − lateness; fire due timers after each
    span; advance past everything at the end. Returns the findings in output order."""
    det = det or SilentSuccess()
    states: dict[str, object] = {}
    out = []
    hi = None
    for s in spans:
        hi = s.end_ns if hi is None else max(hi, s.end_ns)
        wm = hi - lateness
        st, fs = det.step(states.get(s.trace_id) or det.new_state(), s, wm)
        states[s.trace_id] = st
        out += fs
        for k in sorted(states):
            d = det.next_deadline(states[k])
            if d is not None and d <= wm:
                states[k], fs = det.advance(states[k], wm)
                out += fs
    for k in sorted(states):
        _, fs = det.advance(states[k], END)
        out += fs
    return out


def brief(findings):
    return [(f.status, f.severity, [g["kind"] for g in f.evidence["gaps"]]) for f in findings]


def by_end(spans):
    return sorted(spans, key=lambda s: s.end_ns)


GAPS = [
    ("failed tool, never retried", [fail(3, "f1"), root()], [("open", "critical", ["failed_tool"])]),
    ("retry with other arguments is no recovery", [fail(3, "f1"), ok(4, "o1", args="other"), root()],
     [("open", "critical", ["failed_tool"])]),
    ("an earlier success is no recovery", [ok(2, "o1"), fail(3, "f1"), root()],
     [("open", "critical", ["failed_tool"])]),
    ("error.type counts as a failure", [sp(3, "f1", tool="search", error__type="timeout"), root()],
     [("open", "critical", ["failed_tool"])]),
    ("unverified mutation", [mut(3, "m1"), root()], [("open", "critical", ["unverified_mutation"])]),
    ("mutation with verification_status other than verified",
     [mut(3, "m1", tool__verification_status="skipped"), root()],
     [("open", "critical", ["unverified_mutation"])]),
    ("pending approval", [sp(3, "a1", approval__status="PENDING"), root()],
     [("open", "warning", ["approval_pending"])]),
    ("rejected approval", [sp(3, "a1", approval__status="REJECTED"), root()],
     [("open", "warning", ["approval_rejected"])]),
    ("explicit success outcome", [fail(3, "f1"), root(agent__outcome="success")],
     [("open", "critical", ["failed_tool"])]),
    ("all gap kinds at once",
     [fail(2, "f1"), mut(3, "m1"), sp(4, "a1", tool="pay", approval__status="pending"), root()],
     [("open", "critical", ["failed_tool", "unverified_mutation", "approval_pending"])]),
    ("root first", [root(), fail(3, "f1")], [("open", "critical", ["failed_tool"])]),
    ("no invoke_agent: the parentless span is the root",
     [fail(3, "f1"), sp(10, "r", parent=None, dur=10)], [("open", "critical", ["failed_tool"])]),
    ("a failing sub-agent under a successful root",
     [fail(3, "f1", parent="sub"), root(5, "sub", parent="r", status="ERROR", dur=3), root()],
     [("open", "critical", ["failed_tool"])]),
]

BENIGN = [
    ("healthy run", [ok(2, "o1"), mut(3, "m1", verified=True), sp(4, "c1", op="chat"), root()]),
    ("failed tool retried successfully", [fail(3, "f1"), ok(5, "o1", retry__attempt=1), root()]),
    ("retry arrives before the failure", [ok(5, "o1"), fail(3, "f1"), root()]),
    ("verified mutation", [mut(3, "m1", verified=True), root()]),
    ("mutation verified by a child span",
     [mut(3, "m1"), sp(4, "v1", parent="m1", tool__verification_status="verified"), root()]),
    ("mutation verified by a later call with the same fingerprint",
     [mut(3, "m1"), sp(5, "v1", tool="deploy", tool__verification_status="verified"), root()]),
    ("failed mutation retried and verified", [mut(3, "m1", status="ERROR"), mut(5, "m2", verified=True), root()]),
    ("approval pending, later approved", [sp(3, "a1", approval__status="PENDING"),
                                         sp(6, "a2", approval__status="APPROVED"), root()]),
    ("root ended in ERROR", [fail(3, "f1"), root(status="ERROR")]),
    ("root with error.type", [fail(3, "f1"), root(error__type="max_iterations")]),
    ("outcome failure", [fail(3, "f1"), mut(4, "m1"), root(agent__outcome="failure")]),
    ("outcome partial", [sp(3, "a1", approval__status="PENDING"), root(agent__outcome="partial")]),
    ("the topmost agent decides",
     [fail(3, "f1", parent="sub"), root(5, "sub", parent="r", dur=3), root(agent__outcome="failure")]),
    ("a sub-agent's end is not the trace's end",
     [fail(3, "f1", parent="sub"), root(5, "sub", parent="r", dur=3), sp(30, "c1", op="chat"),
      ok(50, "o1"), root(60)]),
    ("no root ever: evicted, not judged", [fail(3, "f1", parent="remote")]),
]


@pytest.mark.parametrize(("name", "seq", "want"), GAPS, ids=[c[0] for c in GAPS])
def test_gaps(name, seq, want):
    assert brief(drive(seq)) == want
    assert brief(drive(by_end(seq))) == want  # root last, children first
    assert brief(drive(list(reversed(by_end(seq))), lateness=100 * S)) == want  # root first


@pytest.mark.parametrize(("name", "seq"), BENIGN, ids=[c[0] for c in BENIGN])
def test_benign(name, seq):
    assert drive(seq) == []
    assert drive(list(reversed(by_end(seq))), lateness=100 * S) == []


def test_evidence_names_each_gap_with_span_ids_and_holds_the_session():
    seq = [fail(2, "f1", tool="search"), fail(2.5, "f2", tool="fetch"), mut(3, "m1"),
           sp(4, "a1", approval__status="REJECTED"), ok(5, "o1", tool="fetch"), root(10, agent__outcome="success")]
    (f,) = drive(seq)
    assert f.evidence["gaps"] == [
        {"kind": "failed_tool", "count": 1, "span_ids": ["f1"], "tools": ["search"]},
        {"kind": "unverified_mutation", "count": 1, "span_ids": ["m1"], "tools": ["deploy"]},
        {"kind": "approval_rejected", "count": 1, "span_ids": ["a1"], "tools": ["span"]},
    ]
    assert f.evidence["root_span_id"] == "r" and f.evidence["root_outcome"] == "success"
    assert (f.detector, f.status, f.severity, f.reason) == (
        "silent_success", "open", "critical", "silent_success:failed_tool+unverified_mutation+approval_rejected")
    assert (f.scope_kind, f.scope_key, f.episode, f.trace_ids) == ("trace", T, T, [T])
    assert (f.action, f.command_scope_kind, f.command_scope_key) == ("hold", "session", "s1")
    assert (f.tenant, f.session_id) == ("acme", "s1")
    assert (f.first_seen_ns, f.last_seen_ns, f.detected_at_ns) == (0, 10 * S, 40 * S)
    assert f.summary == (f"Trace {T} in session s1 reported success, but 1 tool call failed without a successful "
                         "retry, 1 mutation was not verified and 1 approval was rejected.")


def test_judged_only_when_the_watermark_passes_the_grace():
    det = SilentSuccess()
    st = det.new_state()
    for s in (fail(3, "f1"), root(10)):
        st, fs = det.step(st, s, 10 * S)
        assert fs == []
    assert det.next_deadline(st) == 40 * S
    st, fs = det.advance(st, 40 * S - 1)
    assert fs == []
    st, fs = det.advance(st, 40 * S)
    assert brief(fs) == [("open", "critical", ["failed_tool"])]
    st, fs = det.advance(st, 100 * S)
    assert fs == []  # judged once
    assert det.next_deadline(st) == 640 * S + 1 and not det.expired(st, 640 * S) and det.expired(st, 640 * S + 1)


def test_late_spans_update_and_resolve():
    det = SilentSuccess()
    st = det.new_state()
    for s in (fail(3, "f1"), mut(4, "m1"), root(10)):
        st, _ = det.step(st, s, 10 * S)
    st, fs = det.advance(st, 40 * S)
    assert brief(fs) == [("open", "critical", ["failed_tool", "unverified_mutation"])]
    # a successful retry shows up late (ended before the root, arrived after the judgement)
    st, fs = det.step(st, ok(6, "o1"), 50 * S)
    assert brief(fs) == [("updated", "critical", ["unverified_mutation"])]
    assert fs[0].detected_at_ns == 40 * S
    # then its verification, as a child of the mutation
    st, fs = det.step(st, sp(7, "v1", parent="m1", tool__verification_status="verified"), 60 * S)
    assert [(f.status, f.severity, f.evidence["gaps"]) for f in fs] == [("resolved", "critical", [])]
    assert fs[0].summary == f"Trace {T} in session s1: late spans closed every gap in its success claim."
    # a late span that changes nothing emits nothing
    st, fs = det.step(st, sp(8, "c1", op="chat"), 70 * S)
    assert fs == []
    # a new gap re-opens the same incident
    st, fs = det.step(st, sp(9, "a1", approval__status="PENDING"), 80 * S)
    assert [(f.status, f.episode) for f in fs] == [("open", T)]


def test_late_span_after_the_grace_is_judged_at_its_own_grace():
    det = SilentSuccess()
    st = det.new_state()
    for s in (mut(4, "m1"), root(10)):
        st, _ = det.step(st, s, 10 * S)
    st, fs = det.advance(st, 45 * S)
    assert len(fs) == 1
    st, fs = det.step(st, sp(44, "v1", tool="deploy", tool__verification_status="verified"), 50 * S)
    assert fs == [] and det.next_deadline(st) == 74 * S
    st, fs = det.advance(st, 74 * S)
    assert [f.status for f in fs] == ["resolved"]


def test_orphans_are_evicted_and_counted():
    det = SilentSuccess(SilentParams(orphan_ttl_s=60))
    st = det.new_state()
    st, _ = det.step(st, fail(3, "f1", parent="remote"), 3 * S)
    assert det.next_deadline(st) == 63 * S + 1
    assert not det.expired(st, 63 * S) and det.evicted_without_root == 0
    st, fs = det.advance(st, 63 * S + 1)
    assert fs == [] and det.expired(st, 63 * S + 1) and det.evicted_without_root == 1
    assert det.expired(st, 10**12) and det.evicted_without_root == 1  # counted once
    st, fs = det.step(st, root(), 70 * S)  # too late: the trace is gone
    assert fs == []


def test_arrival_order_within_the_lateness_does_not_matter():
    rng = random.Random(11)
    seq = []
    for k in range(12):
        tr = f"{k:032x}"
        base = 20.0 * k
        spans = [
            sp(base + 1, "c1", trace=tr, op="chat"),
            fail(base + 2, "f1", trace=tr, tool=f"t{k % 3}"),
            ok(base + 2.2, "o1", trace=tr, tool=f"t{k % 3}") if k % 2 else sp(base + 2.2, "c2", trace=tr, op="chat"),
            mut(base + 3, "m1", trace=tr, verified=k % 3 == 0),
            sp(base + 3.5, "a1", trace=tr, approval__status="PENDING" if k % 4 == 1 else "APPROVED"),
            root(base + 6, trace=tr, dur=6, agent__outcome="partial" if k == 5 else None),
            # a late, verdict-changing verification for some traces, 40 s after the root
            sp(base + 46, "v1", trace=tr, tool="deploy", tool__verification_status="verified"),
        ]
        seq += spans if k % 3 == 1 else spans[:-1]
    seq.sort(key=lambda s: s.end_ns)
    want = drive(seq)
    assert {f.status for f in want} >= {"open", "updated", "resolved"}
    for _ in range(30):
        shuffled = sorted(seq, key=lambda s: s.end_ns + rng.uniform(0, L - 1))
        assert sorted(drive(shuffled), key=_order) == sorted(want, key=_order)


def _order(f):
    return (f.scope_key, f.detected_at_ns, f.status)


def test_duplicates_do_not_change_the_verdict():
    seq = [fail(3, "f1"), mut(4, "m1"), root()]
    assert brief(drive(seq + seq)) == brief(drive(seq))
    assert drive(seq + seq)[0].evidence["gaps"][0]["span_ids"] == ["f1"]


def test_pending_trace_is_small():
    det = SilentSuccess()
    st = det.new_state()
    for i in range(10):
        st, _ = det.step(st, sp(i, f"c{i}", op="chat"), i * S)
        st, _ = det.step(st, ok(i + 0.5, f"o{i}", tool=f"tool{i % 4}", args=f"{i:016x}"), i * S)
    st, _ = det.advance(st, 10 * S)
    assert len(orjson.dumps(det.dump(st))) < 2000
    assert st.span_count == 20 and len(st.fps) == 10 and not st.failures


def test_params_validated_once():
    with pytest.raises(ValueError, match="orphan_ttl_s"):
        SilentParams(grace_s=60, orphan_ttl_s=30)


def test_state_pickles_and_round_trips():
    det = SilentSuccess()
    st = det.new_state()
    for s in (fail(3, "f1"), mut(4, "m1"), sp(4.5, "a1", approval__status="PENDING"), root(10), ok(12, "o1")):
        st, _ = det.step(st, s, 8 * S)  # the last spans stay buffered
    assert st.pending and st.failures and st.mutations
    assert pickle.loads(pickle.dumps(st)) == st
    again = det.load(orjson.loads(orjson.dumps(det.dump(st))))
    assert again == st
    st, f1 = det.advance(st, 60 * S)
    again, f2 = det.advance(again, 60 * S)
    assert f1 == f2 and brief(f1) == [("open", "critical", ["unverified_mutation", "approval_pending"])]
