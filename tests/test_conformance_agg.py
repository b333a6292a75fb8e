"""Every aggregate-fed detector core honours the same contract (the span-fed one is in
test_conformance.py): defaults and a doctest, states that pickle and round-trip through JSON,
restored states that behave the same, ``advance`` that does nothing before ``next_deadline``,
and expiry."""

from __future__ import annotations

import inspect
import pickle

import orjson
import pytest

from streams.detectors import cost, retry
from tests.spans import span

S = 10**9

DETECTORS = [retry.RouteRetryStorm, retry.SessionRetryStorm, cost.SessionCostVelocity, cost.TenantCostVelocity]


def _spans():
    out = []
    for i in range(6):
        for j in range(8):
            out.append(span(100 + j * 2 + i * 0.1, session=f"s{i}", op="chat", gen_ai__provider__name="p",
                            gen_ai__request__model="m", gen_ai__usage__cost=0.4, http__request__resend_count=j % 2))
    return sorted(out, key=lambda s: s.end_ns)


def _agg(cls):
    spans = _spans()
    if cls is retry.RouteRetryStorm:
        return retry.aggregate(spans)["routes"]["p/m"]
    if cls is retry.SessionRetryStorm:
        return retry.aggregate(spans)["sessions"]["s0"]
    if cls is cost.SessionCostVelocity:
        return cost.aggregate(spans)["sessions"]["s0"]
    return cost.aggregate(spans)["tenants"]["acme"]


def feed(det, cls, now=110 * S):
    return det.step(det.new_state(), _agg(cls), now)


@pytest.mark.parametrize("cls", DETECTORS, ids=lambda c: c.__name__)
def test_has_defaults_and_a_doctest(cls):
    det = cls()
    assert det.name and det.scope in {"session", "tenant", "route"}
    assert ">>>" in (inspect.getdoc(cls) or "")
    for m in ("new_state", "step", "advance", "next_deadline", "expired", "dump", "load"):
        assert callable(getattr(det, m))


@pytest.mark.parametrize("cls", DETECTORS, ids=lambda c: c.__name__)
def test_state_pickles_and_round_trips_json(cls):
    det = cls()
    st, _ = feed(det, cls)
    assert pickle.loads(pickle.dumps(st)) == st
    assert det.load(orjson.loads(orjson.dumps(det.dump(st)))) == st


@pytest.mark.parametrize("cls", DETECTORS, ids=lambda c: c.__name__)
def test_restored_state_behaves_the_same(cls):
    det = cls()
    a, _ = feed(det, cls)
    b = det.load(orjson.loads(orjson.dumps(det.dump(a))))
    a, fa = det.advance(a, 10**4 * S)
    b, fb = det.advance(b, 10**4 * S)
    assert fa == fb and a == b


@pytest.mark.parametrize("cls", DETECTORS, ids=lambda c: c.__name__)
def test_nothing_happens_before_the_deadline(cls):
    det = cls()
    st, _ = feed(det, cls, now=0)
    while (d := det.next_deadline(st)) is not None:
        before = det.dump(st)
        st2, fs = det.advance(det.load(orjson.loads(orjson.dumps(before))), d - 1)
        assert fs == [] and det.next_deadline(st2) == d
        st, _ = det.advance(st, d)
        assert det.dump(st) != before or det.next_deadline(st) != d
    assert det.advance(st, 10**6 * S)[1] == []


@pytest.mark.parametrize("cls", DETECTORS, ids=lambda c: c.__name__)
def test_state_expires(cls):
    det = cls()
    st, _ = feed(det, cls)
    st, _ = det.advance(st, 10**4 * S)
    assert not det.expired(st, 200 * S)
    assert det.expired(st, 10**9 * S)


@pytest.mark.parametrize("cls", DETECTORS, ids=lambda c: c.__name__)
def test_an_empty_aggregate_is_harmless(cls):
    det = cls()
    st, fs = det.step(det.new_state(), {"key": "k", "buckets": {}}, 10**4 * S)
    assert fs == [] and det.next_deadline(st) is None
