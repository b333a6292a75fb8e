"""plan_deadlock core: cycles, wait-for deadlocks, revisions, dangling steps (README "Detectors")."""

from __future__ import annotations

import pickle
import random

import orjson
import pytest

from streams import semconv
from streams.detectors.deadlock import DeadlockParams, PlanDeadlock
from streams.models import SpanEvent
from tests.spans import S, span

L = 5 * S  # allowed lateness
END = 10**30  # end of replay input: the watermark passes everything


def plan(t, steps, *, wf="wf", rev=None, **kw):
    """A span carrying ``plan.steps``; ``steps`` maps id -> list of what it needs."""
    entries = [{"id": k, "depends_on": v} for k, v in steps.items()]
    a = {"workflow__id": wf, "plan__steps": orjson.dumps(entries).decode()}
    if rev is not None:
        a["plan__revision"] = rev
    return span(t, op="chat", **a, **kw)


def events(t, steps, *, wf="wf", rev=None):
    """A span carrying ``plan.step`` events."""
    s = span(t, op="plan", workflow__id=wf)
    for k, v in steps.items():
        a = {"plan.step.id": k, "plan.step.depends_on": v}
        if rev is not None:
            a["plan.revision"] = rev
        s.events.append(SpanEvent("plan.step", s.end_ns, a))
    return s


def wait(t, step, on, *, wf="wf"):
    return span(t, tool="wait", workflow__id=wf, plan__step__id=step, plan__step__waiting_on=on)


def work(t, step, *, wf="wf"):
    return span(t, tool="work", workflow__id=wf, plan__step__id=step)


def drive(spans, det=None, lateness=L):
    """Replay ``spans`` in the given arrival order with a watermark = max end − lateness, firing
    timers after each span, then advancing past everything. Returns the findings in output order."""
    det = det or PlanDeadlock()
    states: dict[str, object] = {}
    out = []
    hi = None
    for s in spans:
        hi = s.end_ns if hi is None else max(hi, s.end_ns)
        wm = hi - lateness
        k = semconv.workflow_of(s)
        st, fs = det.step(states.get(k) or det.new_state(), s, wm)
        states[k] = st
        out += fs
        for k2 in sorted(states):
            d = det.next_deadline(states[k2])
            if d is not None and d <= wm:
                states[k2], fs = det.advance(states[k2], wm)
                out += fs
    for k in sorted(states):
        _, fs = det.advance(states[k], END)
        out += fs
    return out


def brief(findings):
    return [(f.status, f.evidence["reason"], f.evidence.get("graph"),
             f.evidence.get("cycle", f.evidence.get("missing"))) for f in findings]


CASES = [
    ("self-dependency", [plan(1, {"a": ["a"]})], [("open", "cycle", "plan", ["a"])]),
    ("2-cycle in one plan", [plan(1, {"b": ["a"], "a": ["b"]})], [("open", "cycle", "plan", ["a", "b"])]),
    (
        "3-cycle across three spans",
        [plan(1, {"b": ["c"]}), plan(2, {"c": ["a"]}), plan(3, {"a": ["b"]})],
        [("open", "cycle", "plan", ["a", "b", "c"])],
    ),
    (
        "cycle from plan.step events",
        [events(1, {"x": ["y"], "y": ["z"]}), events(2, {"z": ["x"]})],
        [("open", "cycle", "plan", ["x", "y", "z"])],
    ),
    (
        "cycle from plan.step attributes on spans",
        [span(1, plan__step__id="p", plan__step__depends_on=["q"], workflow__id="wf"),
         span(2, plan__step__id="q", plan__step__depends_on=["p"], workflow__id="wf")],
        [("open", "cycle", "plan", ["p", "q"])],
    ),
    (
        "revision adds the closing edge later",
        [plan(1, {"a": ["b"], "b": ["c"], "c": []}), work(2, "a"), plan(3, {"c": ["a"]}, rev=1)],
        [("open", "cycle", "plan", ["a", "b", "c"])],
    ),
    (
        "revision breaks the cycle: resolved",
        [plan(1, {"a": ["b"], "b": ["a"]}), plan(2, {"a": []}, rev=1)],
        [("open", "cycle", "plan", ["a", "b"]), ("resolved", "cycle", "plan", ["a", "b"])],
    ),
    (
        "revision order beats event order: an older revision ending later is ignored",
        [plan(1, {"a": ["b"], "b": []}), plan(2, {"b": []}, rev=2), plan(3, {"b": ["a"]}, rev=1)],
        [],
    ),
    (
        "same revision adds edges",
        [plan(1, {"a": ["b"]}), plan(2, {"b": []}), plan(3, {"b": ["a"]})],
        [("open", "cycle", "plan", ["a", "b"])],
    ),
    (
        "wait-for 2-cycle",
        [wait(1, "a", ["b"]), wait(2, "b", ["a"])],
        [("open", "cycle", "wait_for", ["a", "b"])],
    ),
    (
        "wait-for 3-cycle",
        [wait(1, "s3", ["s1"]), wait(2, "s1", ["s2"]), wait(3, "s2", ["s3"])],
        [("open", "cycle", "wait_for", ["s1", "s2", "s3"])],
    ),
    (
        "a wait that ended is no deadlock",
        [wait(1, "a", ["b"]), wait(2, "a", []), wait(3, "b", ["a"]), work(4, "a")],
        [],
    ),
    (
        "a released wait resolves",
        [wait(1, "a", ["b"]), wait(2, "b", ["a"]), wait(20, "a", [])],
        [("open", "cycle", "wait_for", ["a", "b"]), ("resolved", "cycle", "wait_for", ["a", "b"])],
    ),
    (
        "plan and wait-for graphs stay apart",
        [plan(1, {"a": ["b"], "b": []}), wait(2, "b", ["a"])],
        [],
    ),
    (
        "one incident per cycle, also when re-sent",
        [plan(1, {"a": ["b"], "b": ["a"]}), plan(2, {"a": ["b"], "b": ["a"]}), plan(3, {"a": ["b"], "b": ["a"]})],
        [("open", "cycle", "plan", ["a", "b"])],
    ),
    (
        "two distinct cycles, two incidents",
        [plan(1, {"a": ["b"], "b": ["a"]}), plan(2, {"c": ["d"], "d": ["c"]})],
        [("open", "cycle", "plan", ["a", "b"]), ("open", "cycle", "plan", ["c", "d"])],
    ),
    (
        "two cycles in one plan; breaking one leaves the other",
        [plan(1, {"a": ["b"], "b": ["a", "c"], "c": ["a"]}), plan(2, {"b": ["c"]}, rev=1)],
        [("open", "cycle", "plan", ["a", "b"]), ("open", "cycle", "plan", ["a", "b", "c"]),
         ("resolved", "cycle", "plan", ["a", "b"])],
    ),
    (
        "a second cycle through the first one's closing edge shows once the first is broken",
        [plan(1, {"a": ["b"], "b": ["a"]}), plan(2, {"a": ["b", "c"], "c": ["b"]}), plan(3, {"a": ["c"]}, rev=1)],
        [("open", "cycle", "plan", ["a", "b"]), ("resolved", "cycle", "plan", ["a", "b"]),
         ("open", "cycle", "plan", ["a", "c", "b"])],
    ),
    (
        "cycles are per workflow",
        [plan(1, {"a": ["b"]}, wf="w1"), plan(2, {"b": ["a"]}, wf="w2")],
        [("open", "dangling", None, ["b"]), ("open", "dangling", None, ["a"])],
    ),
]

BENIGN = [
    ("chain", [plan(1, {f"s{i}": [f"s{i - 1}"] if i else [] for i in range(50)})]),
    ("chain declared backwards", [plan(i, {f"s{i}": [f"s{i + 1}"] if i < 49 else []}) for i in range(50)]),
    ("diamond", [plan(1, {"a": [], "b": ["a"], "c": ["a"], "d": ["b", "c"]})]),
    ("diamond across spans and events",
     [events(1, {"d": ["b", "c"]}), plan(2, {"b": ["a"]}), events(3, {"c": ["a"]}), plan(4, {"a": []})]),
    ("fan-in and fan-out", [plan(1, {"root": [], **{f"m{i}": ["root"] for i in range(20)},
                                     "sink": [f"m{i}" for i in range(20)]})]),
    ("the simulator's plans", [plan(1, {"step1": [], "step2": ["step1"], "step3": ["step2"]}),
                               work(2, "step1"), work(3, "step2"), work(4, "step3")]),
    ("waits that form a chain", [wait(1, "a", ["b"]), wait(2, "b", ["c"]), work(3, "c")]),
    ("spans without plans", [span(i, tool="search", workflow__id="wf") for i in range(10)]),
    ("unparseable plan", [span(1, op="chat", workflow__id="wf", plan__steps="{not json")]),
]


@pytest.mark.parametrize(("name", "seq", "want"), CASES, ids=[c[0] for c in CASES])
def test_cycles(name, seq, want):
    assert brief(drive(seq)) == want


@pytest.mark.parametrize(("name", "seq"), BENIGN, ids=[c[0] for c in BENIGN])
def test_no_false_positive_on_dags(name, seq):
    assert drive(seq) == []


def test_cycle_evidence_and_breaker():
    seq = [plan(10, {"b": ["c"]}, trace="1" * 32), plan(11, {"c": ["a"]}, trace="2" * 32),
           plan(12, {"a": ["b"]}, trace="3" * 32)]
    (f,) = drive(seq)
    assert f.evidence == {"reason": "cycle", "graph": "plan", "cycle": ["a", "b", "c"], "cycle_length": 3,
                          "span_ids": [seq[2].span_id, seq[0].span_id, seq[1].span_id]}
    assert f.detector == "plan_deadlock" and f.severity == "critical"
    assert (f.action, f.command_scope_kind, f.command_scope_key) == ("halt", "workflow", "wf")
    assert (f.scope_kind, f.scope_key, f.workflow_id, f.session_id, f.tenant) == ("workflow", "wf", "wf", "s1", "acme")
    assert f.episode == "wf:plan:a>b>c" and f.reason == "plan_deadlock:cycle"
    # stamped with the closing span's end, not with when the watermark caught up
    assert (f.first_seen_ns, f.detected_at_ns) == (seq[0].end_ns, seq[2].end_ns)
    assert f.trace_ids == ["1" * 32, "2" * 32, "3" * 32]
    assert f.summary == ("Workflow wf cannot make progress: its plan steps depend on each other in the cycle "
                         "a → b → c → a.")


def test_fires_at_the_closing_span_once_the_watermark_passes_it():
    det = PlanDeadlock()
    st = det.new_state()
    st, f1 = det.step(st, plan(1, {"a": ["b"]}), 1 * S)
    st, f2 = det.step(st, plan(2, {"b": ["a"]}), 2 * S - L)  # within the lateness: buffered
    assert f1 == f2 == [] and det.next_deadline(st) == 2 * S
    st, f3 = det.advance(st, 2 * S)
    assert [f.detected_at_ns for f in f3] == [2 * S]


def test_dangling_only_after_the_deadline():
    det = PlanDeadlock()
    st = det.new_state()
    st, _ = det.step(st, plan(1, {"a": ["x", "y"], "b": ["a"]}), 1 * S)
    st, _ = det.step(st, work(2, "y"), 2 * S)
    assert det.next_deadline(st) == 302 * S
    st, fs = det.advance(st, 302 * S - 1)
    assert fs == []
    st, fs = det.advance(st, 302 * S)
    (f,) = fs
    assert (f.status, f.severity, f.action, f.reason) == ("open", "warning", None, "plan_deadlock:dangling")
    assert f.evidence["missing"] == ["x"] and f.evidence["waiting_steps"] == ["a"]
    assert f.evidence["span_ids"] == [st.sources[0][0]] and f.detected_at_ns == 302 * S
    assert f.episode == "wf:dangling" and "never appeared within 5 min" in f.summary
    st, fs = det.advance(st, 400 * S)
    assert fs == []  # judged once per deadline


def test_dependency_seen_later_is_not_dangling():
    assert drive([plan(1, {"a": ["b"]}), work(200, "b")]) == []
    # … but after a quiet gap of 5 min it was dangling, and is resolved when it shows up
    found = drive([plan(1, {"a": ["b"]}), work(400, "b")])
    assert [(f.status, f.detected_at_ns) for f in found] == [("open", 301 * S), ("resolved", 700 * S)]


def test_dangling_is_updated_when_the_missing_set_changes():
    found = drive([plan(1, {"a": ["x"]}), plan(400, {"b": ["y"]})])
    assert [(f.status, f.evidence["missing"]) for f in found] == [("open", ["x"]), ("updated", ["x", "y"])]


def test_arrival_order_within_the_lateness_does_not_matter():
    rng = random.Random(7)
    seq = (
        [plan(i * 0.5, {f"s{i}": [f"s{i - 1}"] if i else []}, wf="w1") for i in range(30)]
        + [plan(15.2, {"s0": ["s29"]}, wf="w1", rev=1), plan(15.9, {"s0": []}, wf="w1", rev=2)]
        + [wait(1 + i * 0.7, f"t{i}", [f"t{(i + 1) % 4}"], wf="w2") for i in range(4)]
        + [wait(4.1, "t1", [], wf="w2"), wait(4.3, "t1", ["t2"], wf="w2")]
        + [plan(2 + i, {f"d{i}": [f"d{i + 1}", "ghost"]}, wf="w3") for i in range(5)]
        + [plan(2.5, {"z": ["z"]}, wf="w3"), work(400, "ghost", wf="w3")]
    )
    seq.sort(key=lambda s: s.end_ns)
    want = drive(seq)
    assert {f.evidence["reason"] for f in want} == {"cycle", "dangling"}
    assert [f.status for f in want if f.workflow_id == "w1"] == ["open", "resolved"]
    for _ in range(30):
        shuffled = sorted(seq, key=lambda s: s.end_ns + rng.uniform(0, L - 1))
        got = drive(shuffled)
        assert sorted(got, key=_order) == sorted(want, key=_order)


def _order(f):
    return (f.workflow_id, f.detected_at_ns, f.episode, f.status)


def test_late_spans_cannot_undo_newer_revisions():
    det = PlanDeadlock()
    st = det.new_state()
    st, _ = det.step(st, plan(10, {"a": ["b"], "b": []}, rev=2), 10 * S)
    st, fs = det.step(st, plan(1, {"b": ["a"]}, rev=1), 10 * S)  # far behind the watermark
    assert fs == [] and st.plan.deps["b"] == []


def test_large_plan_is_incremental():
    det = PlanDeadlock()
    st = det.new_state()
    rng = random.Random(1)
    n = 10_000
    for chunk in range(100):
        steps = {}
        for i in range(chunk * 100, chunk * 100 + 100):
            steps[f"s{i:05d}"] = sorted({f"s{rng.randrange(i):05d}" for _ in range(3)}) if i else []
        st, fs = det.step(st, plan(chunk, steps), chunk * S)
        assert fs == []
    assert det.visits == 0  # every edge agreed with the order: O(1) each, no search at all
    st, fs = det.step(st, plan(100, {"s00000": [f"s{n - 1:05d}"]}, rev=1), 100 * S)
    (f,) = fs
    cyc = f.evidence["cycle"]
    assert cyc[:2] == ["s00000", f"s{n - 1:05d}"]  # s00000 needs s09999, which needs …, which needs s00000
    assert all(cyc[i + 1] in st.plan.deps[cyc[i]] for i in range(len(cyc) - 1)) and "s00000" in st.plan.deps[cyc[-1]]
    assert det.visits <= 2 * n  # the closing edge searches the region once (and once more for the path)


def test_backwards_and_shuffled_declarations_stay_cheap():
    for order in ("backwards", "shuffled"):
        det = PlanDeadlock()
        st = det.new_state()
        ids = list(range(5000))
        if order == "backwards":
            ids.reverse()
        else:
            random.Random(3).shuffle(ids)
        for j in range(0, 5000, 100):
            steps = {f"s{i}": [f"s{i - 1}"] if i else [] for i in ids[j:j + 100]}
            st, fs = det.step(st, plan(j, steps), j * S)
            assert fs == []
        assert det.visits < 200_000, order


def test_step_cap_bounds_state():
    det = PlanDeadlock(DeadlockParams(max_steps=10))
    st = det.new_state()
    st, _ = det.step(st, plan(1, {f"s{i}": [f"s{i + 1}"] for i in range(20)}), 1 * S)
    assert len(st.plan.ord) == 10 and st.dropped > 0


def test_expiry_uses_event_time_ttl():
    det = PlanDeadlock()
    st, _ = det.step(det.new_state(), plan(0, {"a": []}), 0)
    assert not det.expired(st, 3600 * S)
    assert det.expired(st, 3601 * S)


def test_params_validated_once():
    with pytest.raises(ValueError, match="max_steps"):
        DeadlockParams(max_steps=1)


def test_state_pickles_and_round_trips():
    det = PlanDeadlock()
    st = det.new_state()
    for s in [plan(1, {"a": ["b"], "b": ["a"], "c": ["x"]}), wait(2, "a", ["c"]), plan(3, {"d": ["e"]})]:
        st, _ = det.step(st, s, 2 * S)  # the last span stays buffered
    assert st.pending and st.cycles
    assert pickle.loads(pickle.dumps(st)) == st
    again = det.load(orjson.loads(orjson.dumps(det.dump(st))))
    assert again == st
    # the derived reverse edges are rebuilt, so both continue identically
    nxt = plan(4, {"b": []}, rev=1)
    st, f1 = det.step(st, nxt, 10 * S)
    again, f2 = det.step(again, nxt, 10 * S)
    assert f1 == f2 and [f.status for f in f1] == ["resolved"]
    assert again == st
