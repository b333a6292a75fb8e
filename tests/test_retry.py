"""retry_storm: pre-aggregation, implicit retries and the route / session cores (README "Detectors")."""

from __future__ import annotations

import pickle

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streams.detectors import retry
from streams.detectors.retry import (
    ImplicitRetryParams,
    ImplicitRetryTracker,
    RetryParams,
    RouteRetryStorm,
    SessionRetryStorm,
    aggregate,
    merge,
)
from tests.aggdrive import brief, canon, run
from tests.spans import span

S = 10**9
ROUTE = "openai/gpt-4o"


def llm(t, session="s1", *, tenant="acme", resend=0, status="OK", model="gpt-4o", **kw):
    a = dict(gen_ai__provider__name="openai", gen_ai__request__model=model, **kw)
    if resend:
        a["http__request__resend_count"] = resend
    return span(t, session=session, op="chat", status=status, tenant=tenant, **a)


def retry_only(fs):
    return [b for b in brief(fs) if b[3].startswith("retry_storm")]


def storm(t0=100.0, sessions=5, per_session=4, ok_per_session=4, tenant_of=lambda i: "acme", every=1.0):
    """``sessions`` sessions, each making ``ok_per_session`` clean calls and ``per_session`` retries."""
    out = []
    for i in range(sessions):
        for j in range(ok_per_session + per_session):
            out.append(llm(t0 + j * every + i * 0.1, f"s{i}", tenant=tenant_of(i),
                           resend=1 if j >= ok_per_session else 0))
    return sorted(out, key=lambda s: s.end_ns)


def fail_chain(t0, n, session="s1", gap=2.0, tool="flaky"):
    """n failing calls of one tool with the same arguments, ``gap`` s apart (n−1 implicit retries)."""
    return [span(t0 + i * gap, session=session, tool=tool, args="a", status="ERROR") for i in range(n)]


# ----------------------------------------------------------------------------- table-driven cases

STORMS = [
    ("route storm, one tenant → tenant-scoped", storm(),
     [("route", ROUTE, "open", "retry_storm:route"), ("route", ROUTE, "resolved", "retry_storm:route")]),
    ("route storm from 10 sessions", storm(sessions=10, per_session=2, ok_per_session=2),
     [("route", ROUTE, "open", "retry_storm:route"), ("route", ROUTE, "resolved", "retry_storm:route")]),
    ("session storm: 10 retries", [llm(100 + i * 3, resend=1) for i in range(10)],
     [("session", "s1", "open", "retry_storm:session"), ("session", "s1", "resolved", "retry_storm:session")]),
    # ordinals are never summed: each span is a new request's 2nd resend, the 1st not exported
    ("resend_count 2, first resend not exported, counts twice", [llm(100 + i * 3, resend=2) for i in range(5)],
     [("session", "s1", "open", "retry_storm:session"), ("session", "s1", "resolved", "retry_storm:session")]),
    ("retry.attempt on tool spans", [span(100 + i, tool="search", retry__attempt=1) for i in range(10)],
     [("session", "s1", "open", "retry_storm:session"), ("session", "s1", "resolved", "retry_storm:session")]),
    ("implicit: a failing tool called 11 times", fail_chain(100, 11),
     [("session", "s1", "open", "retry_storm:session"), ("session", "s1", "resolved", "retry_storm:session")]),
]

BENIGN = [
    ("sparse retries: one every 10 s", [llm(100 + i * 10, resend=1) for i in range(60)]),
    ("many sessions, 1 retry each, below 20", storm(sessions=15, per_session=1, ok_per_session=1)),
    ("many sessions, 1 retry each, low ratio",
     storm(sessions=40, per_session=1, ok_per_session=5, every=0.5)),
    ("20 retries from 4 sessions only", storm(sessions=4, per_session=5, ok_per_session=5)),
    ("9 retries per session", [llm(100 + i * 3, resend=1) for i in range(9)]),
    ("retries spread beyond the window",
     [llm(100 + i, resend=1) for i in range(9)] + [llm(200 + i, resend=1) for i in range(9)]),
    ("a failure retried after 31 s is no implicit retry", fail_chain(100, 11, gap=31.0)),
    ("failures of different calls are no retries",
     [span(100 + i, tool="flaky", args=f"a{i}", status="ERROR") for i in range(12)]),
    ("successful repeats are no retries", [span(100 + i, tool="search", args="a") for i in range(30)]),
    ("agent spans are no calls",
     [span(100 + i, op="invoke_agent", status="ERROR", gen_ai__request__model="gpt-4o") for i in range(30)]),
]


@pytest.mark.parametrize(("name", "spans", "want"), STORMS, ids=[c[0] for c in STORMS])
def test_storms(name, spans, want):
    assert retry_only(run(spans)) == want


@pytest.mark.parametrize(("name", "spans"), BENIGN, ids=[c[0] for c in BENIGN])
def test_benign(name, spans):
    assert retry_only(run(spans)) == []


# ----------------------------------------------------------------------------- route storm details


def test_route_storm_evidence_and_command():
    fs = [f for f in run(storm()) if f.scope_kind == "route"]
    op, res = fs
    assert op.status == "open" and op.action == "throttle"
    assert (op.command_scope_kind, op.command_scope_key, op.tenant) == ("route", ROUTE, "acme")
    ev = op.evidence
    assert ev["retries"] == 20 and ev["sessions"] == 5 and ev["tenant_scoped"]
    assert ev["retry_ratio"] == round(20 / 60, 4)  # each resent span is 2 attempts
    assert ev["dominant_share"] == 1.0
    assert ev["rate_limit_per_s"] == 1.0  # 20 ok calls / 60 s < the 1/s floor
    assert len(ev["span_ids"]) == 5 and ev["release"] is False
    assert op.first_seen_ns <= op.last_seen_ns <= op.detected_at_ns
    assert res.status == "resolved" and res.evidence["release"] is True
    assert res.episode == op.episode
    # released only after a full window: at least 60 s after the opening
    assert res.detected_at_ns - op.detected_at_ns >= 60 * S


@pytest.mark.parametrize(
    ("tenants", "scoped"),
    [(["a"] * 5, "a"), (["a"] * 4 + ["b"], "a"), (["a"] * 3 + ["b"] * 2, None)],
    ids=["one tenant", "80 % one tenant", "60/40"],
)
def test_tenant_scoping_at_80_percent(tenants, scoped):
    fs = [f for f in run(storm(tenant_of=lambda i: tenants[i])) if f.scope_kind == "route"]
    assert fs[0].tenant == scoped
    assert fs[0].evidence["tenant_scoped"] is (scoped is not None)


def test_rate_limit_is_the_successful_call_rate():
    # 10 sessions x (10 clean calls + 4 calls resent twice) in 56 s: > 60 successful calls / 60 s
    spans = [llm(100 + j * 4 + i * 0.1, f"s{i}", resend=2 if j >= 10 else 0) for i in range(10) for j in range(14)]
    spans.sort(key=lambda s: s.end_ns)
    op = next(f for f in run(spans) if f.scope_kind == "route")
    ev = op.evidence
    assert ev["ok_calls"] > 60 and ev["retries"] >= 20
    assert ev["rate_limit_per_s"] == round(ev["ok_calls"] / 60, 3) > 1.0


def test_growth_updates_only_on_doubling():
    # 20 retries, then 40, then 45: one update at 40
    spans = storm() + storm(t0=110.0, sessions=5, per_session=4, ok_per_session=0)
    spans += storm(t0=120.0, sessions=5, per_session=1, ok_per_session=0)
    fs = [(f.status, f.evidence["retries"]) for f in run(spans) if f.scope_kind == "route"]
    assert [s for s, _ in fs] == ["open", "updated", "resolved"]
    assert fs[1][1] >= 2 * fs[0][1]


def test_hysteresis_a_storm_at_the_threshold_does_not_flap():
    # 5 sessions, each retrying every 12 s for 5 minutes: ≈ 25 retries per window, then every 25 s
    # (≈ 12 per window: above half the threshold) for 3 minutes, then nothing.
    spans = []
    for i in range(5):
        spans += [llm(100 + k * 12 + i, f"s{i}", resend=1) for k in range(25)]
        spans += [llm(400 + k * 25 + i, f"s{i}", resend=1) for k in range(8)]
    spans.sort(key=lambda s: s.end_ns)
    fs = [f for f in run(spans, retry_params=RetryParams(renew=False)) if f.scope_kind == "route"]
    assert [f.status for f in fs] == ["open", "resolved"]
    assert fs[1].detected_at_ns > 590 * S  # not before the hovering part has left the window


def test_long_storm_renews_the_throttle_before_it_expires():
    spans = []
    for i in range(5):
        spans += [llm(100 + k * 3 + i * 0.1, f"s{i}", resend=1) for k in range(100)]  # 300 s
    spans.sort(key=lambda s: s.end_ns)
    fs = [f for f in run(spans) if f.scope_kind == "route"]
    renew = [f for f in fs if f.evidence["renew"]]
    assert fs[0].status == "open" and fs[-1].status == "resolved"
    assert len(renew) >= 2 and all(f.status == "updated" for f in renew)
    issued = [fs[0], *renew]  # each command must be renewed before its 120-s TTL runs out
    gaps = [(b.detected_at_ns - a.detected_at_ns) / S for a, b in zip(issued, issued[1:])]
    assert all(g <= 120 - 30 for g in gaps)
    assert fs[-1].detected_at_ns - issued[-1].detected_at_ns <= 120 * S  # released before expiry
    assert len({f.episode for f in fs}) == 1  # one incident


# ----------------------------------------------------------------------------- implicit retries


def test_implicit_tracker_rules():
    tr = ImplicitRetryTracker()
    st = tr.new_state()
    seq = [
        (span(1, tool="a", args="x", status="ERROR"), False),
        (span(3, tool="a", args="y"), False),  # other arguments
        (span(5, tool="a", args="x"), True),  # retry of the failure at 1
        (span(7, tool="a", args="x"), False),  # the failure was retried once already
        (span(10, tool="b", status="ERROR"), False),
        (span(12, tool="b", retry__attempt=1), False),  # explicit: counted once, as explicit
        (span(20, tool="c", status="ERROR"), False),
        (span(51, tool="c"), False),  # 31 s later
        (llm(60, status="ERROR"), False),
        (llm(62), True),  # model calls: same route
    ]
    for s, want in seq:
        st, got = tr.step(st, s)
        assert got is want, s
    assert st.failures == {}


def test_implicit_tracker_state_is_bounded_and_expires():
    tr = ImplicitRetryTracker(ImplicitRetryParams(max_keys=8))
    st = tr.new_state()
    for i in range(100):
        st, _ = tr.step(st, span(i, tool="t", args=f"a{i}", status="ERROR"))
    assert len(st.failures) <= 8
    assert not tr.expired(st, 100 * S)
    assert tr.expired(st, 200 * S)
    assert tr.load(orjson.loads(orjson.dumps(tr.dump(st)))) == st


def test_implicit_retries_are_counted_in_the_aggregate():
    spans = fail_chain(100, 3)
    tr = ImplicitRetryTracker()
    st, ids = tr.mark(tr.new_state(), spans)
    assert ids == {spans[1].span_id: (1, 1), spans[2].span_id: (1, 1)}
    agg = aggregate(spans, ids)
    tot = sum(b.get("implicit", 0) for b in agg["sessions"]["s1"]["buckets"].values())
    assert tot == 2


# ----------------------------------------------------------------------------- aggregation


def test_aggregate_shape_is_json_safe():
    spans = storm() + fail_chain(100, 3)
    agg = aggregate(spans, {spans[-1].span_id})
    assert orjson.loads(orjson.dumps(agg)) == agg
    b = agg["routes"][ROUTE]["buckets"]
    assert all(k.isdigit() for k in b)
    assert sum(x.get("retries", 0) for x in b.values()) == 20
    assert all(len(x.get("spans", ())) <= retry.BUCKET_SAMPLE for x in b.values())


def test_bucket_maps_are_capped():
    spans = [llm(100 + i / 1000, f"s{i:03d}", resend=1) for i in range(200)]
    b = aggregate(spans)["routes"][ROUTE]["buckets"]["100"]
    assert len(b["sessions"]) == retry.MAX_SESSIONS_PER_BUCKET + 1
    assert sum(b["sessions"].values()) == 200 and b["sessions"][""] == 200 - retry.MAX_SESSIONS_PER_BUCKET


_span_st = st.builds(
    lambda t, s, tn, r, err, tool: (span(t, session=f"s{s}", tool="search" if tool else None, tenant=f"t{tn}",
                                         status="ERROR" if err else "OK", retry__attempt=r)
                                    if tool else llm(t, f"s{s}", tenant=f"t{tn}", resend=r,
                                                     status="ERROR" if err else "OK")),
    st.floats(0, 5, allow_nan=False).map(lambda x: round(x, 3)), st.integers(0, 80), st.integers(0, 40),
    st.integers(0, 2), st.booleans(), st.booleans(),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(_span_st, max_size=60), st.integers(0, 60), st.integers(0, 60))
def test_merge_is_associative_commutative_and_equals_one_batch(spans, i, j):
    i, j = sorted((min(i, len(spans)), min(j, len(spans))))
    a, b, c = aggregate(spans[:i]), aggregate(spans[i:j]), aggregate(spans[j:])
    whole = aggregate(spans)
    assert merge(merge(a, b), c) == merge(a, merge(b, c)) == whole
    assert merge(a, b) == merge(b, a)
    for k, v in whole["routes"].items():  # keyed merges too
        parts = [x["routes"][k] for x in (a, b, c) if k in x["routes"]]
        acc = parts[0]
        for p in parts[1:]:
            acc = merge(acc, p)
        assert acc == v


# ----------------------------------------------------------------------------- batching, state


def _mixed():
    spans = storm() + storm(t0=300, sessions=6, per_session=4, tenant_of=lambda i: "globex")
    spans += [llm(150 + i * 2, "solo", resend=1, model="gpt-4o-mini") for i in range(15)]
    spans += fail_chain(170, 12, session="flaky")
    spans += [llm(100 + i * 7, f"bg{i % 3}") for i in range(60)]
    return sorted(spans, key=lambda s: s.end_ns)


@pytest.mark.parametrize("batch", [1, 3, 17, 100, None])
def test_findings_do_not_depend_on_batching(batch):
    spans = _mixed()
    want = canon(run(spans))
    assert len(retry_only(run(spans))) >= 6
    assert canon(run(spans, batch=batch)) == want
    assert canon(run(spans, batch=batch, timers=False)) == want  # deadlines are complete


def interleave(spans, seed=7, jitter_s=4.0):
    """Another arrival order: sessions interleaved differently (each shifted < ``jitter_s``, less
    than the lateness), each session's own order kept — as Kafka keeps it within a partition."""
    import random
    from collections import defaultdict, deque

    from streams import semconv

    rng = random.Random(seed)
    shift = defaultdict(lambda: rng.uniform(0, jitter_s * S))
    order = sorted(spans, key=lambda s: s.end_ns + shift[semconv.session_of(s)])
    own = defaultdict(deque)
    for s in spans:
        own[semconv.session_of(s)].append(s)
    return [own[semconv.session_of(s)].popleft() for s in order]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_disorder_within_lateness_does_not_matter(seed):
    spans = _mixed()
    other = interleave(spans, seed)
    assert other != spans
    assert canon(run(other, batch=5)) == canon(run(spans, batch=5))


@pytest.mark.parametrize("cls", [RouteRetryStorm, SessionRetryStorm])
def test_state_round_trip_mid_storm(cls):
    det = cls()
    spans = storm()
    agg = aggregate(spans)
    part = agg["routes"] if cls is RouteRetryStorm else agg["sessions"]
    key = next(iter(part))
    a, fa = det.step(det.new_state(), part[key], 108 * S)
    assert [f.status for f in fa] == (["open"] if cls is RouteRetryStorm else [])
    b = det.load(orjson.loads(orjson.dumps(det.dump(a))))
    assert b == a and pickle.loads(pickle.dumps(a)) == a
    a2, f1 = det.advance(a, 400 * S)
    b2, f2 = det.advance(b, 400 * S)
    assert f1 == f2 and a2 == b2


def test_route_state_expires_after_idle_ttl_and_not_mid_episode():
    det = RouteRetryStorm()
    st, fs = det.step(det.new_state(), aggregate(storm())["routes"][ROUTE], 115 * S)
    assert st.episode is not None
    assert not det.expired(st, 10**6 * S)  # open episode: advance first
    st, _ = det.advance(st, 400 * S)
    assert st.episode is None and st.buckets == {}
    assert not det.expired(st, 500 * S) and det.expired(st, 800 * S)


def test_next_deadline_is_when_something_happens():
    det = RouteRetryStorm()
    st, fs = det.step(det.new_state(), aggregate(storm())["routes"][ROUTE], 0)
    assert fs == []
    d = det.next_deadline(st)
    assert d == 101 * S  # the first second, closed
    st2, fs = det.advance(st, d - 1)
    assert fs == [] and det.next_deadline(st2) == d


def test_params_validated_once():
    with pytest.raises(ValueError, match="renew_before_s"):
        RetryParams(breaker_ttl_s=30, renew_before_s=30)
    with pytest.raises(ValueError, match="route_min_sessions"):
        RetryParams(route_min_sessions=0)


@pytest.mark.parametrize(("bucket_s", "session_bucket_s"), [(1, 1), (5, 10), (60, 60)])
def test_other_bucket_widths_are_batching_independent_too(bucket_s, session_bucket_s):
    p = RetryParams(bucket_s=bucket_s, session_bucket_s=session_bucket_s)
    spans = _mixed()
    want = canon(run(spans, retry_params=p))
    assert {b[0] for b in retry_only(run(spans, retry_params=p))} == {"route", "session"}
    for batch in (1, 13):
        assert canon(run(spans, batch=batch, retry_params=p)) == want


def _retry_agg(times, session="s1"):
    return aggregate([span(t, session=session, tool="search", retry__attempt=1) for t in times])["sessions"][session]


def test_session_storm_crossing_does_not_depend_on_arrival_order():
    det = SessionRetryStorm(RetryParams(session_min_retries=2))
    one, fa = det.step(det.new_state(), _retry_agg([20, 30]), 0)
    two, fb = det.step(det.new_state(), _retry_agg([30]), 0)
    two, fc = det.step(two, _retry_agg([20]), 0)  # late: it completes the window ending at 30 s
    assert [(f.status, f.detected_at_ns) for f in fa] == [(f.status, f.detected_at_ns) for f in fb + fc] \
        == [("open", 30 * 10**9)]
    assert fa[0].episode == fc[0].episode


def test_a_future_skewed_retry_does_not_blind_the_crossing():
    det = SessionRetryStorm(RetryParams(session_min_retries=3))
    st, fs = det.step(det.new_state(), _retry_agg([700]), 0)  # ten minutes ahead of the others
    for t in (10, 11):
        st, fs = det.step(st, _retry_agg([t]), 0)
        assert fs == []
    st, fs = det.step(st, _retry_agg([12]), 0)
    assert [(f.status, f.detected_at_ns) for f in fs] == [("open", 12 * 10**9)]


def test_a_retry_inside_an_evaluated_window_is_left_to_the_window_path():
    det = SessionRetryStorm(RetryParams(session_min_retries=2))
    st, _ = det.step(det.new_state(), _retry_agg([10]), 200 * 10**9)  # the watermark is far past it
    st, fs = det.step(st, _retry_agg([11]), 200 * 10**9)  # late: its window was evaluated already
    assert all(f.detected_at_ns != 11 * 10**9 for f in fs)
