"""Every detector core honours the same contract (river-style conformance)."""

from __future__ import annotations

import inspect
import pickle

import orjson
import pytest

from streams.detectors.base import Core
from streams.detectors.deadlock import PlanDeadlock
from streams.detectors.loop import NoProgressLoop
from streams.detectors.silent import SilentSuccess
from tests.spans import span

DETECTORS = [NoProgressLoop, PlanDeadlock, SilentSuccess]

# attributes that give each detector some state to keep (the loop detector's feed is unchanged)
_EXTRA = {
    PlanDeadlock: lambda i: {"workflow__id": "wf", "plan__step__id": f"s{i}",
                             "plan__step__depends_on": [f"s{i + 1}"] if i % 3 else [f"s{i}", "ghost"]},
    SilentSuccess: lambda i: {"tool__action_class": "mutation"} if i % 2 else
    {"approval__status": "PENDING", "status": "ERROR" if i == 2 else "OK"},
}


def feed(det):
    extra = _EXTRA.get(type(det), lambda i: {})
    st = det.new_state()
    for i in range(8):
        st, _ = det.step(st, span(i, tool="search", **extra(i)), i * 10**9)
    st, _ = det.step(st, span(9, op="chat", state="x"), 9 * 10**9)
    return st


@pytest.mark.parametrize("cls", DETECTORS, ids=lambda c: c.__name__)
def test_has_defaults_and_a_doctest(cls):
    det = cls()  # every parameter has a default
    assert det.name and det.scope in {"session", "tenant", "workflow", "trace", "route"}
    assert ">>>" in (inspect.getdoc(inspect.getmodule(cls)) or "") + (inspect.getdoc(cls) or "")


@pytest.mark.parametrize("cls", DETECTORS, ids=lambda c: c.__name__)
def test_state_pickles_and_round_trips_json(cls):
    det = cls()
    st = feed(det)
    assert pickle.loads(pickle.dumps(st)) == st
    again = det.load(orjson.loads(orjson.dumps(det.dump(st))))
    assert again == st


@pytest.mark.parametrize("cls", DETECTORS, ids=lambda c: c.__name__)
def test_restored_state_behaves_the_same(cls):
    det = cls()
    a = feed(det)
    b = det.load(orjson.loads(orjson.dumps(det.dump(a))))
    nxt = span(10, tool="search")
    a, fa = det.step(a, nxt, 10 * 10**9)
    b, fb = det.step(b, nxt, 10 * 10**9)
    assert fa == fb and a == b


@pytest.mark.parametrize("cls", DETECTORS, ids=lambda c: c.__name__)
def test_state_expires(cls):
    det = cls()
    st = feed(det)
    assert not det.expired(st, 10 * 10**9)
    assert det.expired(st, 10**9 * 10**9)


@pytest.mark.parametrize("cls", DETECTORS, ids=lambda c: c.__name__)
def test_steps_never_read_the_wall_clock(cls, monkeypatch):
    import time

    def boom(*a, **k):
        raise AssertionError("a detector core read the wall clock")

    for fn in ("time", "time_ns", "monotonic", "monotonic_ns", "perf_counter"):
        monkeypatch.setattr(time, fn, boom)
    det = cls()
    st = feed(det)
    if hasattr(det, "advance"):
        det.advance(st, 10**18)
    det.expired(st, 10**18)


@pytest.mark.parametrize("cls", [c for c in DETECTORS if c.advance is not Core.advance], ids=lambda c: c.__name__)
def test_timers_follow_next_deadline(cls):
    det = cls()
    st = feed(det)
    seen = []
    for _ in range(100):  # advancing to each deadline in turn reaches expiry in a few steps
        d = det.next_deadline(st)
        if d is None or det.expired(st, d):
            break
        assert isinstance(d, int) and (not seen or d >= seen[-1])
        seen.append(d)
        st, fs = det.advance(st, d)
        assert all(f.detector == det.name and f.status in {"open", "updated", "resolved"} for f in fs)
    else:
        raise AssertionError("next_deadline never reached expiry")
    assert seen


@pytest.mark.parametrize("cls", DETECTORS, ids=lambda c: c.__name__)
def test_same_input_same_findings(cls):
    extra = _EXTRA.get(cls, lambda i: {})
    spans = [span(i, tool="search", **extra(i)) for i in range(8)]

    def run():
        det = cls()
        st = det.new_state()
        out = []
        for s in spans:
            st, fs = det.step(st, s, s.end_ns)
            out += fs
        if hasattr(det, "advance"):
            st, fs = det.advance(st, 10**18)
            out += fs
        return out

    assert run() == run()
