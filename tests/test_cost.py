"""cost_velocity: pre-aggregation, the session core and the tenant baseline (README "Detectors")."""

from __future__ import annotations

import math
import pickle
import random

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from river import stats

from streams.detectors.cost import (
    CostParams,
    EWBaseline,
    SessionCostVelocity,
    TenantCostVelocity,
    aggregate,
    merge,
)
from streams.pricing import PriceTable
from tests.aggdrive import brief, canon, run
from tests.spans import span

S = 10**9
M = 60 * S
PRICES = PriceTable({"gpt-4o": {"input": 2.5, "output": 10.0, "cached": 1.25}})


def call(t, usd=None, session="s1", tenant="acme", **kw):
    a = {"gen_ai__provider__name": "openai", "gen_ai__request__model": "gpt-4o", **kw}
    if usd is not None:
        a["gen_ai__usage__cost"] = usd
    return span(t, session=session, op="chat", tenant=tenant, **a)


def cost_only(fs):
    return [b for b in brief(fs) if b[3].startswith("cost_velocity")]


def per_minute(usd_of_minute, minutes, *, tenant="acme", calls=4, t0_min=0, sessions=3):
    """A tenant's traffic: ``calls`` calls per minute spread over sessions, costing ``usd_of_minute(m)``."""
    out = []
    for m in range(minutes):
        usd = usd_of_minute(m)
        if usd is None:
            continue
        for k in range(calls):
            out.append(call((t0_min + m) * 60 + 3 + k * 14, round(usd / calls, 6),
                            session=f"{tenant}-{m // 20}-{k % sessions}", tenant=tenant))
    return out


def noisy(level, spread=0.1, seed=1):
    """Spend around ``level``, ± ``spread``, deterministic per minute."""
    return lambda m: round(level * (1 + random.Random(seed * 100_003 + m).uniform(-spread, spread)), 4)


# ----------------------------------------------------------------------------- session rules

SESSION_CASES = [
    ("rate: $2.10 in 8 s", [call(100 + i, 0.3) for i in range(7)],
     [("session", "s1", "open", "cost_velocity:rate"), ("session", "s1", "resolved", "cost_velocity:rate")]),
    ("budget: $0.50 every 20 s for 7.5 min", [call(100 + i * 20, 0.5) for i in range(22)],
     [("session", "s1", "open", "cost_velocity:budget")]),
    ("rate and budget", [call(100 + i, 1.0) for i in range(11)],
     [("session", "s1", "open", "cost_velocity:rate"), ("session", "s1", "updated", "cost_velocity:rate"),
      ("session", "s1", "open", "cost_velocity:budget"), ("session", "s1", "resolved", "cost_velocity:rate")]),
    ("priced by tokens", [call(100 + i, gen_ai__usage__input_tokens=100_000, gen_ai__usage__output_tokens=20_000)
                          for i in range(5)],  # $0.45 each
     [("session", "s1", "open", "cost_velocity:rate"), ("session", "s1", "resolved", "cost_velocity:rate")]),
]

SESSION_BENIGN = [
    ("costly but steady: $1.80/min for 5 min", [call(100 + i * 10, 0.3) for i in range(30)]),
    ("exactly $2 in a window is not more than $2", [call(100 + i, 0.4) for i in range(5)]),
    ("$2 spread over 61 s", [call(100, 1.0), call(161, 1.0)]),
    ("unpriced spans are never guessed",
     [call(100 + i, gen_ai__request__model="mystery", gen_ai__usage__input_tokens=10**7) for i in range(20)]),
    ("tool spans cost nothing", [span(100 + i, tool="search") for i in range(50)]),
]


@pytest.mark.parametrize(("name", "spans", "want"), SESSION_CASES, ids=[c[0] for c in SESSION_CASES])
def test_session_cases(name, spans, want):
    assert [b for b in cost_only(run(spans, prices=PRICES)) if b[0] == "session"] == want


@pytest.mark.parametrize(("name", "spans"), SESSION_BENIGN, ids=[c[0] for c in SESSION_BENIGN])
def test_session_benign(name, spans):
    assert cost_only(run(spans, prices=PRICES)) == []


def test_session_rate_evidence():
    spans = [call(100 + i, 0.3) for i in range(7)]
    op = next(f for f in run(spans) if f.reason == "cost_velocity:rate")
    ev = op.evidence
    assert op.action == "halt" and op.command_scope_kind == "session" and op.command_scope_key == "s1"
    assert op.tenant == "acme" and op.severity == "critical"
    assert ev["spend_usd"] == 2.1 and ev["rate_usd_per_min"] == 2.1 and ev["total_usd"] == 2.1
    # $7.90 left at $2.10/min
    assert ev["projected_s_to_budget"] == pytest.approx(7.9 / (2.1 / 60), abs=0.1)
    assert len(ev["costliest"]) == 3 and ev["span_ids"] == [c["span_id"] for c in ev["costliest"]]
    assert op.detected_at_ns == 110 * S  # the window ending with the 5-s bucket 105–110, closed


def test_unpriced_spans_are_counted_in_evidence():
    spans = [call(100 + i, 0.5) for i in range(5)]
    spans += [call(101.5, gen_ai__request__model="mystery", gen_ai__usage__input_tokens=10)]
    spans += [call(102.5, gen_ai__request__model="gpt-4o")]  # a model call without tokens
    op = next(f for f in run(spans, prices=PRICES) if f.reason == "cost_velocity:rate")
    assert op.evidence["unpriced_spans"] == 2 and op.evidence["spend_usd"] == 2.5


def test_agent_spans_are_not_double_counted():
    spans = [call(100 + i, 0.3) for i in range(5)]
    spans.append(span(106, op="invoke_agent", gen_ai__usage__cost=1.5, gen_ai__request__model="gpt-4o"))
    assert cost_only(run(spans)) == []
    agg = aggregate(spans, count_agent_spans=True)
    assert sum(b["nusd"] for b in agg["sessions"]["s1"]["buckets"].values()) == 3_000_000_000


def test_budget_updates_at_doubling_and_never_resolves():
    spans = [call(100 + i * 30, 0.9) for i in range(60)]  # $54 over 30 min, $1.80/min
    fs = [(f.status, f.evidence["total_usd"]) for f in run(spans) if f.reason == "cost_velocity:budget"]
    assert [s for s, _ in fs] == ["open", "updated", "updated"]
    assert fs[0][1] > 10 and fs[1][1] >= 2 * fs[0][1] and fs[2][1] >= 2 * fs[1][1]


# ----------------------------------------------------------------------------- tenant baseline

TENANT_CASES = [
    ("spike after warm-up",
     per_minute(lambda m: 10.0 if m == 30 else noisy(0.6)(m), 40),
     [("tenant", "acme", "open", "cost_velocity:tenant"), ("tenant", "acme", "resolved", "cost_velocity:tenant")]),
    ("spike, then silence",
     per_minute(lambda m: 10.0 if m == 30 else (noisy(0.6)(m) if m < 30 else None), 40),
     [("tenant", "acme", "open", "cost_velocity:tenant"), ("tenant", "acme", "resolved", "cost_velocity:tenant")]),
    ("a rising spike updates at doubling",
     per_minute(lambda m: {30: 5.0, 31: 12.0, 32: 13.0}.get(m, 0.5), 40),
     [("tenant", "acme", "open", "cost_velocity:tenant"), ("tenant", "acme", "updated", "cost_velocity:tenant"),
      ("tenant", "acme", "resolved", "cost_velocity:tenant")]),
]

TENANT_BENIGN = [
    ("steady $3/min", per_minute(noisy(3.0), 60)),
    ("slow drift $0.50 → $4 over 2 h", per_minute(lambda m: round(0.5 + 3.5 * m / 120, 4), 120)),
    ("exponential drift 2 %/min", per_minute(lambda m: round(0.3 * 1.02 ** m, 4), 120)),
    ("bursty: active every 5th minute", per_minute(lambda m: noisy(2.0, 0.3)(m) if m % 5 == 0 else None, 120)),
    ("spike during warm-up", per_minute(lambda m: 10.0 if m == 10 else 0.5, 30)),
    ("spike below the $1/min floor", per_minute(lambda m: 0.9 if m == 30 else 0.05, 40)),
    ("noisy tenant", per_minute(noisy(2.0, 0.6, seed=3), 120)),
]


@pytest.mark.parametrize(("name", "spans", "want"), TENANT_CASES, ids=[c[0] for c in TENANT_CASES])
def test_tenant_cases(name, spans, want):
    assert [b for b in cost_only(run(spans)) if b[0] == "tenant"] == want


@pytest.mark.parametrize(("name", "spans"), TENANT_BENIGN, ids=[c[0] for c in TENANT_BENIGN])
def test_tenant_benign(name, spans):
    assert [b for b in cost_only(run(spans)) if b[0] == "tenant"] == []


def test_tenant_evidence_and_command():
    spans = per_minute(lambda m: 10.0 if m == 30 else 0.6, 40)
    op = next(f for f in run(spans) if f.scope_kind == "tenant")
    ev = op.evidence
    assert (op.action, op.command_scope_kind, op.command_scope_key, op.tenant) == ("throttle", "tenant", "acme", "acme")
    assert op.detected_at_ns == 31 * M and ev["minute_start"] == 30 * M
    assert ev["rate_usd_per_min"] == 10.0
    assert ev["baseline_mean_usd"] == pytest.approx(0.6) and ev["baseline_std_usd"] == pytest.approx(0, abs=1e-6)
    assert ev["std_used_usd"] == pytest.approx(0.15)  # the 25 % floor
    assert ev["z"] == pytest.approx((10 - 0.6) / 0.15, rel=1e-3) and ev["z"] >= 4
    assert ev["learned_minutes"] == 30 and ev["calls"] == 4
    assert ev["rate_limit_per_s"] == 1.0  # 4 calls/min scaled down: the floor
    assert len(ev["costliest"]) == 3 and all(c["usd"] == 2.5 for c in ev["costliest"])
    assert ev["projected_s_to_budget"] is None and ev["projected_usd_per_day"] == 14400.0


def test_tenant_budget_projection():
    p = CostParams(tenant_budget_usd=100.0)
    spans = per_minute(lambda m: 10.0 if m == 30 else 0.6, 40)
    op = next(f for f in run(spans, cost_params=p) if f.scope_kind == "tenant")
    spent = 30 * 0.6 + 10
    assert op.evidence["period_spend_usd"] == pytest.approx(spent)
    assert op.evidence["projected_s_to_budget"] == pytest.approx((100 - spent) / (10 / 60), abs=0.1)


def test_anomalous_minutes_do_not_teach_the_baseline():
    det = TenantCostVelocity()
    spans = per_minute(lambda m: 0.6, 30)
    st, _ = det.step(det.new_state(), aggregate(spans)["tenants"]["acme"], 31 * M)
    before = dict(st.base)
    spike = per_minute(lambda m: 9.0, 3, t0_min=31)
    st, fs = det.step(st, aggregate(spike)["tenants"]["acme"], 34 * M)
    assert [f.status for f in fs] == ["open"]
    assert st.base == before and st.streak == 3


def test_a_held_new_level_is_learned_after_an_hour():
    p = CostParams()
    spans = per_minute(lambda m: 0.5 if m < 30 else 3.0, 30 + p.relearn_after_min + 40)
    fs = [f for f in run(spans) if f.scope_kind == "tenant"]
    assert [f.status for f in fs] == ["open", "resolved"]
    assert fs[1].evidence["new_level"] is True
    assert fs[1].detected_at_ns == (30 + p.relearn_after_min) * M


def test_tenant_late_minute_is_counted_in_the_next_open_minute():
    det = TenantCostVelocity()
    st, _ = det.step(det.new_state(), aggregate(per_minute(lambda m: 0.5, 3))["tenants"]["acme"], 3 * M)
    late = aggregate([call(60 + 30, 2.0)])["tenants"]["acme"]  # minute 1, already closed
    st, _ = det.step(st, late, 3 * M)
    assert st.late == 1 and st.minutes[3]["nusd"] == 2 * 10**9


# ----------------------------------------------------------------------------- river baseline


def test_ew_baseline_is_bit_for_bit_river_ewvar():
    rng = random.Random(5)
    b = EWBaseline(0.1)
    v = stats.EWVar(fading_factor=0.1)
    m = stats.EWMean(fading_factor=0.1)
    for _ in range(5000):
        x = rng.random() * rng.choice([0.01, 1.0, 100.0])
        b.update(x)
        v.update(x)
        m.update(x)
        assert (b.mean, b.var) == (m.get(), v.get())


def test_baseline_round_trip_gives_identical_z_scores():
    det = TenantCostVelocity()
    f = noisy(1.0, 0.3, seed=9)
    warm = per_minute(f, 40)
    st, _ = det.step(det.new_state(), aggregate(warm)["tenants"]["acme"], 41 * M)
    restored = det.load(orjson.loads(orjson.dumps(det.dump(st))))
    assert restored == st
    later = aggregate(per_minute(lambda m: f(m) if m % 7 else 6.0, 60, t0_min=41))["tenants"]["acme"]
    a, fa = det.step(st, later, 200 * M)
    b, fb = det.step(restored, later, 200 * M)
    assert fa and [x.evidence["z"] for x in fa] == [x.evidence["z"] for x in fb]
    assert fa == fb and a == b and a.base == b.base


# ----------------------------------------------------------------------------- aggregation, batching, state


_span_st = st.builds(
    lambda t, s, tn, c, tok: call(t, None if tok else c, session=f"s{s}", tenant=f"t{tn}",
                                  **({"gen_ai__usage__input_tokens": tok} if tok else {})),
    st.floats(0, 200, allow_nan=False).map(lambda x: round(x, 3)), st.integers(0, 9), st.integers(0, 3),
    st.floats(0, 3, allow_nan=False).map(lambda x: round(x, 4)), st.integers(0, 50_000),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(_span_st, max_size=60), st.integers(0, 60), st.integers(0, 60))
def test_merge_is_associative_commutative_and_equals_one_batch(spans, i, j):
    i, j = sorted((min(i, len(spans)), min(j, len(spans))))
    a, b, c = (aggregate(x, PRICES) for x in (spans[:i], spans[i:j], spans[j:]))
    whole = aggregate(spans, PRICES)
    assert merge(merge(a, b), c) == merge(a, merge(b, c)) == whole
    assert merge(a, b) == merge(b, a)


def _mixed():
    spans = per_minute(lambda m: 9.0 if m == 25 else noisy(0.7)(m), 35)
    spans += per_minute(lambda m: 6.0 if m == 20 else 0.3, 35, tenant="globex", calls=6)
    spans += [call(600 + i * 2, 0.35, session="hot") for i in range(40)]
    return sorted(spans, key=lambda s: s.end_ns)


@pytest.mark.parametrize("batch", [1, 7, 64, None])
def test_findings_do_not_depend_on_batching(batch):
    spans = _mixed()
    want = canon(run(spans))
    kinds = {(f["scope_kind"], f["status"]) for f in want}
    assert {("tenant", "open"), ("session", "open")} <= kinds
    assert canon(run(spans, batch=batch)) == want
    assert canon(run(spans, batch=batch, timers=False)) == want


@pytest.mark.parametrize("cls", [SessionCostVelocity, TenantCostVelocity])
def test_state_round_trip(cls):
    det = cls()
    agg = aggregate(_mixed())
    part = agg["sessions"]["hot"] if cls is SessionCostVelocity else agg["tenants"]["acme"]
    a, _ = det.step(det.new_state(), part, 610 * S)
    b = det.load(orjson.loads(orjson.dumps(det.dump(a))))
    assert a == b and pickle.loads(pickle.dumps(a)) == a
    a2, f1 = det.advance(a, 3000 * S)
    b2, f2 = det.advance(b, 3000 * S)
    assert f1 == f2 and a2 == b2 and f1


def test_expiry():
    sd, td = SessionCostVelocity(), TenantCostVelocity()
    s, _ = sd.step(sd.new_state(), aggregate([call(100, 0.1)])["sessions"]["s1"], 200 * S)
    assert not sd.expired(s, 1000 * S) and sd.expired(s, 2000 * S)
    t, _ = td.step(td.new_state(), aggregate([call(100, 0.1)])["tenants"]["acme"], 200 * S)
    assert not td.expired(t, 3600 * S) and td.expired(t, 30000 * S)


def test_params_validated_once():
    with pytest.raises(ValueError, match="relearn_after_min"):
        CostParams(relearn_after_min=1)
    with pytest.raises(ValueError, match="window_s"):
        CostParams(window_s=0.5)
    assert math.isclose(CostParams().session_rate_usd, 2.0)


@pytest.mark.parametrize("bucket_s", [1, 10, 60])
def test_other_bucket_widths_are_batching_independent_too(bucket_s):
    p = CostParams(bucket_s=bucket_s)
    spans = _mixed()
    want = canon(run(spans, cost_params=p))
    assert any(f["reason"] == "cost_velocity:rate" for f in want)
    for batch in (1, 13):
        assert canon(run(spans, batch=batch, cost_params=p)) == want
