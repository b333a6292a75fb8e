"""Every detector core honours the same contract (river-style conformance)."""

from __future__ import annotations

import inspect
import pickle

import orjson
import pytest

from streams.detectors.loop import NoProgressLoop
from tests.spans import span

DETECTORS = [NoProgressLoop]


def feed(det):
    st = det.new_state()
    for i in range(8):
        st, _ = det.step(st, span(i, tool="search"), i * 10**9)
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
