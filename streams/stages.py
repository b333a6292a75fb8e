"""Keyed stages: which spans each detector family needs, keyed how, and the in-memory runner.

A stage is the unit both drivers share:

* ``session`` — :class:`streams.pipeline.SessionPipeline` (``no_progress_loop``), keyed by session;
* ``trace`` — ``silent_success``, keyed by trace id (every span of the trace);
* ``workflow`` — ``plan_deadlock``, keyed by workflow id (only spans that carry plan facts).

Live, each stage has its own repartition topic and faust table (``streams.app``); replay keeps
the states in memory. Both drive a stage through the same :class:`streams.runner.KeyedRunner`
(:func:`runner_for`), which calls the ``step`` / ``advance`` / ``next_deadline`` / ``expired``
methods below.

>>> from streams.policy import Policy
>>> [s.name for s in build_stages(Policy())]
['session', 'trace', 'workflow', 'scope']
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import orjson

from streams import semconv
from streams.detectors import cost, deadlock, retry, silent
from streams.models import Span
from streams.pipeline import Ledger, Output, SessionPipeline, earliest, with_ledger
from streams.policy import Policy
from streams.runner import KeyedRunner, Store

STAGE_STATE_VERSION = 1


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
    ledger: Ledger = field(default_factory=Ledger)


class DetectorStage:
    """One span-fed detector keyed by ``key_of``; policy mode and TTLs apply per tenant."""

    def __init__(self, name: str, policy: Policy, detector: Any,
                 key_of: Callable[[Span], str | None]) -> None:
        self.name = name
        self.policy = policy
        self.det = detector
        self.key_of = key_of  # type: ignore[method-assign]
        self.tap: Any = None  # tests: called with every batch of findings
        self.resets = 0  # stored states of another version, discarded on load

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
        return state, with_ledger(self.policy, state.ledger, findings, watermark_ns, self.tap)

    def advance(self, state: StageState, watermark_ns: int) -> tuple[StageState, list[Output]]:
        state.det, fs = self.det.advance(state.det, watermark_ns)
        return state, with_ledger(self.policy, state.ledger, fs, watermark_ns, self.tap)

    def next_deadline(self, state: StageState) -> int | None:
        return earliest(self.det.next_deadline(state.det), state.ledger.deadline())

    def expired(self, state: StageState, watermark_ns: int) -> bool:
        return not state.ledger and self.det.expired(state.det, watermark_ns)

    def last_seen(self, state: StageState) -> int:
        """Latest span end this key has received (buffered spans included)."""
        st = state.det
        v = int(getattr(st, "last_seen_ns", 0) or getattr(st, "max_end_ns", 0) or 0)
        pending = getattr(st, "pending", None)
        return max(v, int(pending[-1][0])) if pending else v

    def dump(self, state: StageState) -> bytes:
        return orjson.dumps({"v": STAGE_STATE_VERSION, "s": self.det.dump(state.det), "b": state.ledger.dump()})

    def load(self, raw: bytes) -> StageState:
        d = orjson.loads(raw)
        if d.get("v") != STAGE_STATE_VERSION:
            self.resets += 1
            return self.new_state()
        return StageState(self.det.load(d["s"]), Ledger.load(d.get("b")))


@dataclass(slots=True)
class ScopeState:
    """State of one route or tenant key: which core, its state, and its active commands."""

    kind: str = "route"
    det: Any = None
    ledger: Ledger = field(default_factory=Ledger)


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
        self.tap: Any = None  # tests: called with every batch of findings
        self.resets = 0  # stored states of another version, discarded on load

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
        return state, with_ledger(self.policy, state.ledger, fs, None, self.tap)

    def advance(self, state: ScopeState, watermark_ns: int) -> tuple[ScopeState, list[Output]]:
        if state.det is None:
            return state, []
        state.det, fs = self.cores[state.kind].advance(state.det, watermark_ns)
        return state, with_ledger(self.policy, state.ledger, fs, watermark_ns, self.tap)

    def next_deadline(self, state: ScopeState) -> int | None:
        if state.det is None:
            return None
        return earliest(self.cores[state.kind].next_deadline(state.det), state.ledger.deadline())

    def expired(self, state: ScopeState, watermark_ns: int) -> bool:
        if state.det is None:
            return True
        return not state.ledger and self.cores[state.kind].expired(state.det, watermark_ns)

    def last_seen(self, state: ScopeState) -> int:
        st = state.det
        return int(getattr(st, "last_seen_ns", 0) or getattr(st, "last_ns", 0) or 0) if st is not None else 0

    def dump(self, state: ScopeState) -> bytes:
        det = self.cores[state.kind].dump(state.det) if state.det is not None else None
        return orjson.dumps({"v": STAGE_STATE_VERSION, "k": state.kind, "s": det, "b": state.ledger.dump()})

    def load(self, raw: bytes) -> ScopeState:
        d = orjson.loads(raw)
        if d.get("v") != STAGE_STATE_VERSION or d.get("k") not in self.cores:
            self.resets += 1
            return self.new_state()
        det = self.cores[d["k"]].load(d["s"]) if d.get("s") is not None else None
        return ScopeState(d["k"], det, Ledger.load(d.get("b")))


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


ROUTE_IDLE_NS = 600 * 10**9  # a route's window is 60 s: 10 min of silence and its state can go


def idle_ttl_ns(policy: Policy, stage: str) -> int:
    """Event time after its last span past which a stage's state may be gone (the sweep's bound)."""
    if stage == "session":
        return int(policy.max_ttl_s("no_progress_loop", "session_ttl_s") * 1e9)
    if stage == "trace":
        return int((policy.max_ttl_s("silent_success", "orphan_ttl_s")
                    + policy.max_ttl_s("silent_success", "retention_s")) * 1e9)
    if stage == "scope":  # tenants keep their learned spend baseline through quiet hours
        return int(max(policy.max_ttl_s("cost_velocity", "tenant_breaker_ttl_s"), 21600.0) * 1e9)
    return int(policy.max_ttl_s("plan_deadlock", "workflow_ttl_s") * 1e9)


def _route_or_tenant(idle_ns: int) -> Callable[[Any], int]:
    def idle(key: Any) -> int:
        return ROUTE_IDLE_NS if key[:6] in (b"route:", "route:") else idle_ns
    return idle


def runner_for(stage: Any, policy: Policy, store: Store, max_keys: int = 0) -> KeyedRunner:
    """The runner of one stage with its idle bounds: the scope stage's route keys go after
    :data:`ROUTE_IDLE_NS` of silence (a route holds a 60-s window), its tenant keys after 6 h (the
    spend baseline); other stages' keys after their detectors' longest TTL.

    >>> from streams.runner import MemoryStore
    >>> r = runner_for(build_stages(Policy())[0], Policy(), MemoryStore())
    >>> r.feed(0, {}, 0), r.fire(0, 0), r.finish()
    ([], [], [])
    """
    idle_ns = idle_ttl_ns(policy, stage.name)
    if stage.name == "scope":
        return KeyedRunner(stage, store, idle_ns=idle_ns, idle_of=_route_or_tenant(idle_ns),
                           min_idle_ns=ROUTE_IDLE_NS, max_keys=max_keys)
    return KeyedRunner(stage, store, idle_ns=idle_ns, max_keys=max_keys)
