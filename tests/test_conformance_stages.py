"""Every stage — and every detector core — honours one contract, checked on discovered lists (a
new stage or core cannot skip it): snapshots round-trip and a restored state behaves the same,
the same input split into different batches gives the same records, inputs are never mutated,
``expired`` and ``next_deadline`` are pure, no wall-clock reads, and every record is valid.

Stages run through the one keyed runner (streams.runner) exactly as replay and the live worker
run them."""

from __future__ import annotations

import copy
import importlib
import inspect
import pkgutil
import time

import orjson
import pytest

import streams.detectors
from streams.pipeline import Output
from streams.policy import Policy
from streams.runner import EventClock, MemoryStore
from streams.stages import build_stages, group, merge_forwards, runner_for
from tests import test_conformance, test_conformance_agg
from tests.spans import mixed_traffic

STAGES = [s.name for s in build_stages(Policy())]
CORE_METHODS = ("new_state", "step", "expired", "dump", "load")


def discovered_cores() -> set[type]:
    """Every public class in streams.detectors.* that has a core's shape."""
    found = set()
    for info in pkgutil.iter_modules(streams.detectors.__path__):
        mod = importlib.import_module(f"streams.detectors.{info.name}")
        for _, cls in inspect.getmembers(mod, inspect.isclass):
            if cls.__module__ == mod.__name__ and not cls.__name__.startswith("_") \
                    and all(callable(getattr(cls, m, None)) for m in CORE_METHODS) and getattr(cls, "name", None):
                found.add(cls)
    return found


def test_every_core_derives_from_core():
    from streams.detectors.base import Core

    for cls in discovered_cores():
        if cls.__name__ in NOT_FINDING_CORES:
            continue
        assert issubclass(cls, Core), cls
        det = cls()
        st = det.new_state()
        assert isinstance(st, cls.State) and hasattr(cls.State, "__slots__"), cls  # a typed, slotted state
        assert det.load(det.dump(st)) == st


# core-shaped classes that emit no findings, with where they are tested instead
NOT_FINDING_CORES = {
    "ImplicitRetryTracker": "marks implicit retries for retry_storm's aggregates (tests/test_retry.py)",
}


def test_every_core_is_in_a_conformance_suite():
    listed = set(test_conformance.DETECTORS) | set(test_conformance_agg.DETECTORS)
    assert {c for c in discovered_cores() if c.__name__ not in NOT_FINDING_CORES} == listed


def test_every_stage_is_built_and_named():
    stages = build_stages(Policy())
    assert [s.name for s in stages] == STAGES and len(set(STAGES)) == len(STAGES)
    for s in stages:
        for m in ("new_state", "advance", "next_deadline", "expired", "last_seen", "dump", "load"):
            assert callable(getattr(s, m)), (s.name, m)
        assert callable(getattr(s, "step", None)) or callable(getattr(s, "step_key", None))


@pytest.fixture(scope="module")
def spans():
    return mixed_traffic(seed=5, sessions=120)


def run_all(spans, batch: int, snapshot_every: int = 0) -> list[bytes]:
    """All stages through their runners; with ``snapshot_every``, every state is dumped and loaded
    back every that many batches (a restart from the store)."""
    policy = Policy()
    stages = build_stages(policy)
    runners = [runner_for(st, policy, MemoryStore()) for st in stages]
    clock = EventClock(policy.allowed_lateness_ns)
    out: list[Output] = []
    for n, i in enumerate(range(0, len(spans), batch)):
        part = spans[i:i + batch]
        wm = clock.observe(0, max(s.end_ns for s in part))
        got: list[Output] = []
        for r in runners[:-1]:
            got += r.feed(0, group(r.stage, part), wm)
        fwd = merge_forwards(got)
        got = [o for o in got if o.kind != "forward"]
        got += runners[-1].feed(0, fwd, wm)
        for r in runners:
            got += [o for o in r.fire(0, wm) if o.kind != "forward"]
        out += got
        if snapshot_every and n % snapshot_every == 0:
            for r in runners:
                states = r.store.states
                for k in list(states):
                    states[k] = r.stage.load(r.stage.dump(states[k]))
    for r in runners:
        out += r.finish()
    return sorted(o.value for o in out)


@pytest.fixture(scope="module")
def reference(spans):
    return run_all(spans, 100)


@pytest.mark.parametrize("batch", [1, 13, 2000])
def test_batching_invariance(spans, reference, batch):
    assert run_all(spans, batch) == reference


def test_snapshots_restore_to_the_same_behaviour(spans, reference):
    assert run_all(spans, 100, snapshot_every=3) == reference


def test_records_are_valid(reference):
    """Every record validates against its topic's model (the published JSON Schemas' source)."""
    from streams.models import TOPIC_MODELS

    kinds = set()
    for v in reference:
        d = orjson.loads(v)
        if "action" in d:
            TOPIC_MODELS["agent.breaker"].model_validate_json(v)
        else:
            TOPIC_MODELS["agent.incidents"].model_validate_json(v)
            kinds.add(d["detector"])
    assert kinds == {"no_progress_loop", "retry_storm", "cost_velocity", "plan_deadlock", "silent_success"}


@pytest.mark.parametrize("name", STAGES)
def test_inputs_are_not_mutated_and_queries_are_pure(spans, name):
    policy = Policy()
    stage = next(s for s in build_stages(policy) if s.name == name)
    if name == "scope":  # fed by the session stage's pre-aggregates
        sess = build_stages(policy)[0]
        items_by_key: dict = {}
        st = {}
        for i in range(0, len(spans), 100):
            part = spans[i:i + 100]
            for k, v in group(sess, part).items():
                st[k], outs = sess.step(st.get(k) or sess.new_state(), v, part[-1].end_ns)
                for key, aggs in merge_forwards(outs).items():
                    items_by_key.setdefault(key, []).extend(aggs)
        batches = [items_by_key]
    else:
        batches = [group(stage, spans[i:i + 100]) for i in range(0, len(spans), 100)]
    before = copy.deepcopy(batches)
    states: dict = {}
    wm = 0
    for b in batches:
        for key, items in b.items():
            wm = max(wm, max((getattr(x, "end_ns", 0) for x in items), default=0))
            s0 = states.get(key) or stage.new_state()
            if hasattr(stage, "step_key"):
                states[key], _ = stage.step_key(s0, key, items, wm)
            else:
                states[key], _ = stage.step(s0, items, wm)
    assert batches == before, "a stage changed its input"
    for key, st in list(states.items())[:200]:
        dumped = stage.dump(st)
        for probe in (wm, wm + 10**12):
            stage.expired(st, probe)
            stage.next_deadline(st)
        assert stage.dump(st) == dumped, "expired / next_deadline changed the state"
        assert stage.dump(stage.load(dumped)) == dumped


@pytest.mark.parametrize("name", STAGES)
def test_stages_never_read_the_wall_clock(spans, name, monkeypatch):
    policy = Policy()
    stages = build_stages(policy)
    part = spans[:400]
    sess = stages[0]
    pre = {}
    st0 = {}
    for k, v in group(sess, part).items():
        st0[k], outs = sess.step(sess.new_state(), v, part[-1].end_ns)
        for key, aggs in merge_forwards(outs).items():
            pre.setdefault(key, []).extend(aggs)

    def boom(*a, **k):
        raise AssertionError("a stage read the wall clock")

    stage = next(s for s in stages if s.name == name)
    for fn in ("time", "time_ns", "monotonic", "monotonic_ns", "perf_counter"):
        monkeypatch.setattr(time, fn, boom)
    if name == "scope":
        for key, aggs in pre.items():
            st, _ = stage.step_key(stage.new_state(), key, aggs, part[-1].end_ns)
            stage.advance(st, 10**19)
    else:
        for key, items in group(stage, part).items():
            st, _ = stage.step(stage.new_state(), items, part[-1].end_ns)
            stage.advance(st, 10**19)
            stage.expired(st, 10**19)
