"""Keyed stages: which spans each detector family needs, keyed how, and the in-memory runner.

A stage is the unit both drivers share:

* ``session`` — :class:`streams.pipeline.SessionPipeline` (``no_progress_loop``), keyed by session;
* ``trace`` — ``silent_success``, keyed by trace id (every span of the trace);
* ``workflow`` — ``plan_deadlock``, keyed by workflow id (only spans that carry plan facts).

Live, each stage has its own repartition topic and faust table (``streams.app``); in replay,
:class:`MemoryRunner` keeps the states in a dict and the timers in a heap. Both call the same
``step`` / ``advance`` / ``next_deadline`` / ``expired`` methods below.

>>> from streams.policy import Policy
>>> [s.name for s in build_stages(Policy())]
['session', 'trace', 'workflow', 'scope']
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import orjson

from streams import semconv
from streams.detectors import cost, deadlock, retry, silent
from streams.models import Span
from streams.pipeline import Output, SessionPipeline, breakers_deadline, expire_breakers, outputs_for
from streams.policy import Policy

STAGE_STATE_VERSION = 1
SWEEP_EVERY_NS = 60 * 10**9
END_OF_TIME = 2**63 - 1


class Stage(Protocol):
    name: str

    def key_of(self, span: Span) -> str | None: ...
    def new_state(self) -> Any: ...
    def step(self, state: Any, spans: list[Span], watermark_ns: int) -> tuple[Any, list[Output]]: ...
    def advance(self, state: Any, watermark_ns: int) -> tuple[Any, list[Output]]: ...
    def next_deadline(self, state: Any) -> int | None: ...
    def expired(self, state: Any, watermark_ns: int) -> bool: ...
    def last_seen(self, state: Any) -> int: ...
    def dump(self, state: Any) -> bytes: ...
    def load(self, raw: bytes) -> Any: ...


class SessionStage(SessionPipeline):
    """The session stage: :class:`SessionPipeline` plus its key."""

    name = "session"

    def key_of(self, span: Span) -> str | None:
        return semconv.session_of(span)

    def last_seen(self, state: Any) -> int:
        return state.last_seen_ns


@dataclass(slots=True)
class StageState:
    """A detector's state plus the breaker commands this key issued and has not released."""

    det: Any
    breakers: dict[str, list] = field(default_factory=dict)


class DetectorStage:
    """One span-fed detector keyed by ``key_of``; policy mode and TTLs apply per tenant."""

    def __init__(self, name: str, policy: Policy, detector: Any,
                 key_of: Callable[[Span], str | None]) -> None:
        self.name = name
        self.policy = policy
        self.det = detector
        self.key_of = key_of  # type: ignore[method-assign]

    def new_state(self) -> StageState:
        return StageState(self.det.new_state())

    def step(self, state: StageState, spans: list[Span], watermark_ns: int) -> tuple[StageState, list[Output]]:
        # Buffer the whole batch first, then move the watermark once: a batch is "these spans
        # arrived, then time advanced", so the outcome does not depend on how input was batched.
        findings = []
        det_state = state.det
        for s in spans:
            det_state, fs = self.det.step(det_state, s, -1)
            if fs:
                findings.extend(fs)
        det_state, fs = self.det.advance(det_state, watermark_ns)
        findings.extend(fs)
        state.det = det_state
        out = outputs_for(self.policy, findings, state.breakers) if findings else []
        if state.breakers:
            out.extend(expire_breakers(self.policy, state.breakers, watermark_ns))
        return state, out

    def advance(self, state: StageState, watermark_ns: int) -> tuple[StageState, list[Output]]:
        state.det, fs = self.det.advance(state.det, watermark_ns)
        out = outputs_for(self.policy, fs, state.breakers) if fs else []
        if state.breakers:
            out.extend(expire_breakers(self.policy, state.breakers, watermark_ns))
        return state, out

    def next_deadline(self, state: StageState) -> int | None:
        d = self.det.next_deadline(state.det)
        b = breakers_deadline(state.breakers) if state.breakers else None
        if d is None:
            return b
        return d if b is None else min(d, b)

    def expired(self, state: StageState, watermark_ns: int) -> bool:
        return not state.breakers and self.det.expired(state.det, watermark_ns)

    def last_seen(self, state: StageState) -> int:
        """Latest span end this key has received (buffered spans included)."""
        st = state.det
        v = int(getattr(st, "last_seen_ns", 0) or getattr(st, "max_end_ns", 0) or 0)
        pending = getattr(st, "pending", None)
        return max(v, int(pending[-1][0])) if pending else v

    def dump(self, state: StageState) -> bytes:
        return orjson.dumps({"v": STAGE_STATE_VERSION, "s": self.det.dump(state.det), "b": state.breakers})

    def load(self, raw: bytes) -> StageState:
        d = orjson.loads(raw)
        if d.get("v") != STAGE_STATE_VERSION:
            return self.new_state()
        return StageState(self.det.load(d["s"]), d.get("b") or {})


@dataclass(slots=True)
class ScopeState:
    """State of one route or tenant key: which core, its state, and its active commands."""

    kind: str = "route"
    det: Any = None
    breakers: dict[str, list] = field(default_factory=dict)


class ScopeStage:
    """Route- and tenant-scoped detectors, fed by pre-aggregates forwarded from the session stage
    (never by spans): ``route:<route>`` → retry_storm's route core, ``tenant:<t>`` → cost_velocity's
    tenant core. Aggregates of one key are merged per batch, then stepped once.
    """

    name = "scope"

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.cores = {
            "route": retry.RouteRetryStorm(policy.section("retry_storm", None).params()),
            "tenant": cost.TenantCostVelocity(policy.section("cost_velocity", None).params()),
        }
        self.schemas = {"route": retry.ROUTE_SCHEMA, "tenant": cost.TENANT_SCHEMA}

    def key_of(self, span: Span) -> str | None:  # noqa: ARG002
        return None

    def new_state(self) -> ScopeState:
        return ScopeState()

    def step_key(self, state: ScopeState, key: str, aggs: list[dict], watermark_ns: int) -> tuple[ScopeState, list[Output]]:
        kind = key.partition(":")[0]
        core = self.cores[kind]
        # (retry.merge / cost.merge of keyed aggregates, all at once)
        merged = aggs[0] if len(aggs) == 1 else self.schemas[kind].merge_keyed_all(aggs)
        if state.det is None:
            state.kind, state.det = kind, core.new_state()
        state.det, fs = core.step(state.det, merged, watermark_ns)
        return state, outputs_for(self.policy, fs, state.breakers) if fs else []

    def advance(self, state: ScopeState, watermark_ns: int) -> tuple[ScopeState, list[Output]]:
        if state.det is None:
            return state, []
        state.det, fs = self.cores[state.kind].advance(state.det, watermark_ns)
        out = outputs_for(self.policy, fs, state.breakers) if fs else []
        if state.breakers:
            out.extend(expire_breakers(self.policy, state.breakers, watermark_ns))
        return state, out

    def next_deadline(self, state: ScopeState) -> int | None:
        if state.det is None:
            return None
        d = self.cores[state.kind].next_deadline(state.det)
        bd = breakers_deadline(state.breakers) if state.breakers else None
        if d is None:
            return bd
        return d if bd is None else min(d, bd)

    def expired(self, state: ScopeState, watermark_ns: int) -> bool:
        if state.det is None:
            return True
        return not state.breakers and self.cores[state.kind].expired(state.det, watermark_ns)

    def last_seen(self, state: ScopeState) -> int:
        st = state.det
        return int(getattr(st, "last_seen_ns", 0) or getattr(st, "last_ns", 0) or 0) if st is not None else 0

    def dump(self, state: ScopeState) -> bytes:
        det = self.cores[state.kind].dump(state.det) if state.det is not None else None
        return orjson.dumps({"v": STAGE_STATE_VERSION, "k": state.kind, "s": det, "b": state.breakers})

    def load(self, raw: bytes) -> ScopeState:
        d = orjson.loads(raw)
        if d.get("v") != STAGE_STATE_VERSION or d.get("k") not in self.cores:
            return self.new_state()
        det = self.cores[d["k"]].load(d["s"]) if d.get("s") is not None else None
        return ScopeState(d["k"], det, d.get("b") or {})


def merge_forwards(outputs: list[Output]) -> dict[str, list[dict]]:
    """Forwarded aggregates of one batch, by scope key (``route:…``, ``tenant:…``), in order."""
    out: dict[str, list[dict]] = {}
    for o in outputs:
        if o.kind == "forward":
            out.setdefault(o.key.decode(), []).append(o.payload)
    return out


def _workflow_key(span: Span) -> str | None:
    return semconv.workflow_of(span) if deadlock.carries_plan(span) else None


def _trace_key(span: Span) -> str | None:
    return span.trace_id


def build_stages(policy: Policy) -> list[Any]:
    """Every stage, in the order their outputs are emitted for one batch."""
    return [
        SessionStage(policy),
        DetectorStage("trace", policy, silent.SilentSuccess(policy.section("silent_success", None).params()),
                      _trace_key),
        DetectorStage("workflow", policy,
                      deadlock.PlanDeadlock(policy.section("plan_deadlock", None).params()), _workflow_key),
        ScopeStage(policy),
    ]


def group(stage: Any, spans: list[Span]) -> dict[str, list[Span]]:
    """Spans of one batch by the stage's key, in arrival order (spans the stage ignores dropped)."""
    out: dict[str, list[Span]] = {}
    for s in spans:
        k = stage.key_of(s)
        if k is not None:
            out.setdefault(k, []).append(s)
    return out


class MemoryRunner:
    """A stage's states in a dict, its timers in a heap: the replay driver.

    ``due`` holds each key's scheduled deadline (its state's ``next_deadline``); heap entries that
    no longer match it are stale and skipped without touching the state.

    >>> from streams.policy import Policy
    >>> r = MemoryRunner(build_stages(Policy())[0])
    >>> r.feed({}, 0), r.fire(0), r.finish()
    ([], [], [])
    """

    def __init__(self, stage: Any) -> None:
        self.stage = stage
        self.states: dict[str, Any] = {}
        self.heap: list[tuple[int, str]] = []
        self.due: dict[str, int] = {}
        self.next_sweep_ns = 0
        self.evicted = 0

    def _schedule(self, key: str, d: int | None) -> None:
        due = self.due
        if d is None:
            due.pop(key, None)
        elif due.get(key) != d:
            due[key] = d
            heapq.heappush(self.heap, (d, key))

    def feed(self, groups: dict[str, list[Any]], watermark_ns: int) -> list[Output]:
        out: list[Output] = []
        states = self.states
        stage = self.stage
        st_new = stage.new_state
        next_deadline = stage.next_deadline
        schedule = self._schedule
        step_key = getattr(stage, "step_key", None)
        step = getattr(stage, "step", None)
        for key, items in groups.items():
            st = states.get(key)
            if st is None:
                st = st_new()
            if step_key is not None:
                st, o = step_key(st, key, items, watermark_ns)
            else:
                st, o = step(st, items, watermark_ns)
            states[key] = st
            if o:
                out.extend(o)
            schedule(key, next_deadline(st))
        return out

    def fire(self, watermark_ns: int) -> list[Output]:
        out: list[Output] = []
        heap = self.heap
        due = self.due
        stage = self.stage
        while heap and heap[0][0] <= watermark_ns:
            d, key = heapq.heappop(heap)
            if due.get(key) != d:
                continue  # a stale timer: the key's real deadline is scheduled separately
            del due[key]
            st = self.states[key]
            st, o = stage.advance(st, watermark_ns)
            out.extend(o)
            if stage.expired(st, watermark_ns):
                del self.states[key]
                self.evicted += 1
                continue
            d = stage.next_deadline(st)
            if d is not None:
                self._schedule(key, max(d, watermark_ns + 1) if d <= watermark_ns else d)
        if watermark_ns >= self.next_sweep_ns:
            self.next_sweep_ns = watermark_ns + SWEEP_EVERY_NS
            expired = stage.expired
            dead = [k for k, st in self.states.items() if k not in due and expired(st, watermark_ns)]
            for k in dead:
                del self.states[k]
            self.evicted += len(dead)
        return out

    def finish(self) -> list[Output]:
        """End of input: the watermark passes everything; timers fire in key order, state is dropped."""
        out: list[Output] = []
        for key in sorted(self.states):
            _, o = self.stage.advance(self.states[key], END_OF_TIME)
            out.extend(o)
        self.evicted += len(self.states)
        self.states.clear()
        self.heap.clear()
        self.due.clear()
        return out
