"""The one processing path that both ``replay`` and the faust agents drive.

``SessionPipeline.step(state, spans, watermark_ns)`` runs every session-scoped detector core over
one session's spans (in arrival order), applies the policy, and returns the serialized outputs;
``advance(state, watermark_ns)`` fires the timers that the watermark has passed. Replay keeps the
states in a dict; the live worker keeps them in a faust table (RocksDB + changelog) and calls the
very same methods, so live and replay cannot drift apart.

>>> from streams.models import Span
>>> from streams.policy import Policy
>>> pipe = SessionPipeline(Policy())
>>> st = pipe.new_state()
>>> spans = [Span("a" * 32, f"{i:016x}", None, "t", "INTERNAL", i, i, "OK", "",
...               {"gen_ai.tool.name": "ls", "tool.payload_hash": "h"}, {}) for i in range(1, 4)]
>>> st, out = pipe.step(st, spans, 0)
>>> [o.kind for o in out]   # + the route aggregate for the route / tenant stage
['incident', 'breaker', 'forward']
>>> pipe.load(pipe.dump(st)).last_seen_ns == st.last_seen_ns
True
"""

from __future__ import annotations

import hashlib
from array import array

from dataclasses import dataclass, field
from typing import Any

import orjson

from streams.detectors import cost, retry
from streams.detectors.base import Finding
from streams.detectors.loop import NoProgressLoop
from streams.models import Span
from streams.policy import Policy, apply, release

STATE_VERSION = 2


@dataclass(slots=True)
class Output:
    """One record to publish: ``kind`` is ``incident`` or ``breaker``."""

    kind: str
    key: bytes
    value: bytes
    detector: str = ""
    status: str = ""  # incident status, or the command's action
    detected_at_ns: int = 0
    severity: str = ""
    mode: str = ""
    payload: Any = None  # kind "forward": an aggregate for a route / tenant keyed stage
    group: str = ""  # the incident id an incident or command belongs to (for a stable output order)

    def order(self) -> tuple[int, str, str, int, bytes]:
        """Sort key: event time, then detector and incident, the incident before its commands."""
        return (self.detected_at_ns, self.detector, self.group, 0 if self.kind == "incident" else 1, self.key)


def _command_output(command: Any, at_ns: int) -> Output:
    return Output("breaker", command.kafka_key(), command.model_dump_json().encode(),
                  command.detector or "", command.action, at_ns, "", command.mode, None,
                  command.incident_id or "")


@dataclass(slots=True)
class ActiveCommand:
    """A breaker command a key issued and has not released (stored as a list, in field order).

    >>> c = ActiveCommand("cmd-1", 5, "inc-1", "no_progress_loop", "session", "s1", "t", "enforce")
    >>> ActiveCommand.from_list(c.to_list()) == c
    True
    """

    command_id: str
    expires_ns: int
    incident_id: str | None
    detector: str
    scope_kind: str
    scope_key: str
    tenant: str | None
    mode: str

    def to_list(self) -> list:
        return [self.command_id, self.expires_ns, self.incident_id, self.detector, self.scope_kind,
                self.scope_key, self.tenant, self.mode]

    @classmethod
    def from_list(cls, a: list) -> ActiveCommand:
        return cls(str(a[0]), int(a[1]), a[2], str(a[3]), str(a[4]), str(a[5]), a[6], str(a[7]))


@dataclass(slots=True)
class Ledger:
    """The breaker commands one key has in force, by command id — part of every stage's state.

    >>> led = Ledger()
    >>> led.add(ActiveCommand("cmd-1", 5, "inc-1", "no_progress_loop", "session", "s1", None, "enforce"))
    >>> led.deadline(), bool(led), Ledger.load(led.dump()) == led
    (5, True, True)
    >>> [c.command_id for c in led.due(5)], bool(led)
    (['cmd-1'], False)
    """

    active: dict[str, ActiveCommand] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.active)

    def add(self, c: ActiveCommand) -> None:
        self.active[c.command_id] = c

    def pop(self, command_id: str) -> ActiveCommand | None:
        return self.active.pop(command_id, None)

    def of_incident(self, incident_id: str) -> ActiveCommand | None:
        """Take out the command an incident issued, if it is still in force."""
        for cid, c in self.active.items():
            if c.incident_id == incident_id:
                return self.active.pop(cid)
        return None

    def due(self, watermark_ns: int) -> list[ActiveCommand]:
        """Take out the commands whose TTL the watermark has passed, in command-id order."""
        gone = sorted(cid for cid, c in self.active.items() if c.expires_ns <= watermark_ns)
        return [self.active.pop(cid) for cid in gone]

    def deadline(self) -> int | None:
        return min((c.expires_ns for c in self.active.values()), default=None)

    def dump(self) -> dict[str, list]:
        return {cid: c.to_list() for cid, c in self.active.items()}

    @classmethod
    def load(cls, data: dict[str, list] | None) -> Ledger:
        return cls({cid: ActiveCommand.from_list(a) for cid, a in (data or {}).items()})


def outputs_for(policy: Policy, findings: list[Finding], ledger: Ledger | None = None) -> list[Output]:
    """Findings → serialized incidents and commands (the incident precedes its command).

    ``ledger`` (part of the caller's state) tracks the commands this key has issued and not yet
    released: an episode that resolves releases its command at once (early release).
    """
    out: list[Output] = []
    for f in findings:
        incident, command = apply(policy, f)
        if incident is not None:
            out.append(Output("incident", incident.incident_id.encode(), incident.model_dump_json().encode(),
                              f.detector, f.status, f.detected_at_ns, incident.severity, incident.policy_mode,
                              None, incident.incident_id))
        if command is not None:
            out.append(_command_output(command, f.detected_at_ns))
            if ledger is not None:
                if incident is not None and incident.breaker_command_id != command.command_id:
                    ledger.pop(incident.breaker_command_id or "")  # a renewal replaces it
                ttl_ns = int(policy.breaker_ttl_s(f.detector, f.tenant, f.command_scope_kind) * 1e9)
                ledger.add(ActiveCommand(command.command_id, f.detected_at_ns + ttl_ns, command.incident_id,
                                         f.detector, command.scope.kind, command.scope.key, command.scope.tenant,
                                         command.mode))
        elif (f.status == "resolved" and ledger and incident is not None
              and f.evidence.get("release", True)):  # cost episodes keep their halt until it expires
            active = ledger.of_incident(incident.incident_id)
            if active is None:
                continue
            out.append(_command_output(release(policy, active, f.detected_at_ns, f"resolved: {f.reason}"),
                                       f.detected_at_ns))
    return out


def expire_commands(policy: Policy, ledger: Ledger, watermark_ns: int) -> list[Output]:
    """Release every command whose TTL the watermark has passed (release at expiry)."""
    return [_command_output(release(policy, c, c.expires_ns, "expired"), c.expires_ns)
            for c in ledger.due(watermark_ns)]


def with_ledger(policy: Policy, ledger: Ledger, findings: list[Finding], watermark_ns: int | None,
                tap: Any = None) -> list[Output]:
    """The one composition every stage uses: findings → records (the ledger issues and releases
    commands), then, with a watermark, the releases of commands it has passed. ``tap`` (tests)
    sees the findings first."""
    if tap is not None and findings:
        tap(findings)
    out = outputs_for(policy, findings, ledger) if findings else []
    if watermark_ns is not None and ledger:
        out.extend(expire_commands(policy, ledger, watermark_ns))
    return out


def earliest(*deadlines: int | None) -> int | None:
    """The earliest of some optional deadlines.

    >>> earliest(None, 5, 3), earliest(None, None)
    (3, None)
    """
    best = None
    for d in deadlines:
        if d is not None and (best is None or d < best):
            best = d
    return best


@dataclass(slots=True)
class SessionState:
    """Everything Breakwater keeps about one session, across all session-scoped detectors."""

    last_seen_ns: int = 0
    loop: Any = None
    ledger: Ledger = field(default_factory=Ledger)  # the breaker commands this session has in force
    implicit: Any = None  # implicit-retry tracker
    retry: Any = None  # session retry storm (None until the session's first retry)
    cost: Any = None  # session cost velocity
    seen: array = field(default_factory=lambda: array("q"))  # the last SEEN_IDS span ids applied (60-bit ints)


SEEN_IDS = 64
"""Span ids remembered per session to skip re-sent spans (at-least-once producers re-send): 64
ids ≈ 2.3 KB of Python objects, 1.3 KB persisted. A duplicate older than the last 64 spans of its
session is applied again (a re-send arrives within seconds, 64 spans later it is rare)."""


def _sid(span_id: str) -> int:
    try:
        return int(span_id[-15:], 16)
    except ValueError:
        return int.from_bytes(hashlib.blake2b(span_id.encode(), digest_size=8).digest()) >> 4


class SessionPipeline:
    """Session-scoped detectors + policy: no_progress_loop, the session parts of retry_storm and
    cost_velocity (their route / tenant parts are forwarded as pre-aggregates, ``kind="forward"``).
    Loop detector instances are cached per tenant."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self._loops: dict[str | None, NoProgressLoop] = {}
        self._default_loop = NoProgressLoop(policy.loop_params(None))
        rp = policy.section("retry_storm", None)
        self.tracker = retry.ImplicitRetryTracker(retry.ImplicitRetryParams(window_s=rp.implicit_retry_window_s))
        self.session_retry = retry.SessionRetryStorm(rp.params())
        self.session_cost = cost.SessionCostVelocity(policy.section("cost_velocity", None).params())
        self.prices = policy.price_table()
        self.duplicates = 0  # spans skipped as already applied (a counter for replay and metrics)
        self.resets = 0  # stored states of another version, discarded on load
        self.unpriced = 0  # model calls that could not be priced (a counter for replay and metrics)
        self.tap: Any = None  # tests: called with every batch of findings
        self.retry_on = policy.mode("retry_storm", None) != "off" or any(
            policy.mode("retry_storm", t) != "off" for t in policy.spec.tenants)
        self.cost_on = policy.mode("cost_velocity", None) != "off" or any(
            policy.mode("cost_velocity", t) != "off" for t in policy.spec.tenants)

    def _loop(self, tenant: str | None) -> NoProgressLoop:
        det = self._loops.get(tenant)
        if det is None:
            params = self.policy.loop_params(tenant)
            det = self._default_loop if params == self._default_loop.p else NoProgressLoop(params)
            self._loops[tenant] = det
        return det

    def new_state(self) -> SessionState:
        return SessionState(loop=self._default_loop.new_state(), implicit=self.tracker.new_state(),
                            cost=self.session_cost.new_state())

    def dedup(self, state: SessionState, spans: list[Span]) -> list[Span]:
        """Drop spans whose id the session applied already (within its last :data:`SEEN_IDS`)."""
        seen = state.seen
        fresh: list[Span] = []
        for s in spans:
            k = _sid(s.span_id)
            if k in seen:
                self.duplicates += 1
                continue
            seen.append(k)
            fresh.append(s)
        if len(seen) > SEEN_IDS:
            del seen[: len(seen) - SEEN_IDS]
        return fresh

    def step(self, state: SessionState, spans: list[Span], watermark_ns: int) -> tuple[SessionState, list[Output]]:
        spans = self.dedup(state, spans)
        if not spans:
            return state, []
        findings: list[Finding] = []
        loop_state = state.loop
        loops = self._loops
        last_seen = state.last_seen_ns
        for span in spans:
            if span.end_ns > last_seen:
                last_seen = span.end_ns
            tenant = loop_state.tenant
            if tenant is None:
                det = self._default_loop
            else:
                det = loops.get(tenant) or self._loop(tenant)
            loop_state, fs = det.step(loop_state, span, watermark_ns)
            if fs:
                findings.extend(fs)
        state.last_seen_ns = last_seen
        state.loop = loop_state
        forwards: list[Output] = []
        if self.retry_on:
            state.implicit, implicit = self.tracker.mark(state.implicit, spans)
            ra = retry.aggregate(spans, implicit)
            for agg in ra["sessions"].values():
                if state.retry is None:
                    state.retry = self.session_retry.new_state()
                state.retry, fs = self.session_retry.step(state.retry, agg, watermark_ns)
                findings.extend(fs)
            for route, agg in ra["routes"].items():
                forwards.append(Output("forward", f"route:{route}".encode(), b"", payload=agg))
        if self.cost_on:
            ca = cost.aggregate(spans, self.prices)
            for agg in ca["sessions"].values():
                for b in agg["buckets"].values():
                    self.unpriced += b.get("unpriced", 0)
                state.cost, fs = self.session_cost.step(state.cost, agg, watermark_ns)
                findings.extend(fs)
            for tenant, agg in ca["tenants"].items():
                forwards.append(Output("forward", f"tenant:{tenant}".encode(), b"", payload=agg))
        out = with_ledger(self.policy, state.ledger, findings, None, self.tap)
        return state, out + forwards if forwards else out

    def advance(self, state: SessionState, watermark_ns: int) -> tuple[SessionState, list[Output]]:
        """Fire timers the watermark has passed: window closes, releases of expired commands."""
        findings: list[Finding] = []
        if state.retry is not None and self.session_retry.next_deadline(state.retry) is not None:
            state.retry, fs = self.session_retry.advance(state.retry, watermark_ns)
            findings.extend(fs)
        if self.session_cost.next_deadline(state.cost) is not None:
            state.cost, fs = self.session_cost.advance(state.cost, watermark_ns)
            findings.extend(fs)
        return state, with_ledger(self.policy, state.ledger, findings, watermark_ns, self.tap)

    def next_deadline(self, state: SessionState) -> int | None:
        """Event time at which :meth:`advance` has work for this session, if any."""
        return earliest(None if state.retry is None else self.session_retry.next_deadline(state.retry),
                        self.session_cost.next_deadline(state.cost),
                        state.ledger.deadline())

    def expired(self, state: SessionState, watermark_ns: int) -> bool:
        if state.ledger:
            return False
        return (self._loop(state.loop.tenant).expired(state.loop, watermark_ns)
                and (state.retry is None or self.session_retry.expired(state.retry, watermark_ns))
                and self.session_cost.expired(state.cost, watermark_ns)
                and self.tracker.expired(state.implicit, watermark_ns))

    # -- persistence (faust table values, and the conformance test)
    def dump(self, state: SessionState) -> bytes:
        return orjson.dumps(
            {"v": STATE_VERSION, "last_seen_ns": state.last_seen_ns,
             "loop": self._default_loop.dump(state.loop), "extra": {"breakers": state.ledger.dump()},
             "implicit": self.tracker.dump(state.implicit),
             "retry": None if state.retry is None else self.session_retry.dump(state.retry),
             "cost": self.session_cost.dump(state.cost), "seen": state.seen.tolist()}
        )

    def load(self, data: bytes) -> SessionState:
        d = orjson.loads(data)
        if d.get("v") != STATE_VERSION:
            self.resets += 1
            return self.new_state()
        return SessionState(d["last_seen_ns"], self._default_loop.load(d["loop"]),
                            Ledger.load((d.get("extra") or {}).get("breakers")),
                            self.tracker.load(d["implicit"]),
                            None if d.get("retry") is None else self.session_retry.load(d["retry"]),
                            self.session_cost.load(d["cost"]), array("q", d.get("seen") or ()))
