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


def outputs_for(policy: Policy, findings: list[Finding], breakers: dict[str, list] | None = None) -> list[Output]:
    """Findings → serialized incidents and commands (the incident precedes its command).

    ``breakers`` (part of the caller's state) tracks the commands this key has issued and not yet
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
            if breakers is not None:
                if incident is not None and incident.breaker_command_id != command.command_id:
                    breakers.pop(incident.breaker_command_id or "", None)  # a renewal replaces it
                ttl_ns = int(policy.breaker_ttl_s(f.detector, f.tenant, f.command_scope_kind) * 1e9)
                breakers[command.command_id] = [
                    command.command_id, f.detected_at_ns + ttl_ns, command.incident_id, f.detector,
                    command.scope.kind, command.scope.key, command.scope.tenant, command.mode]
        elif (f.status == "resolved" and breakers and incident is not None
              and f.evidence.get("release", True)):  # cost episodes keep their halt until it expires
            cid = next((c for c, a in breakers.items() if a[2] == incident.incident_id), None)
            if cid is None:
                continue
            active = breakers.pop(cid)
            out.append(_command_output(release(policy, active, f.detected_at_ns, f"resolved: {f.reason}"),
                                       f.detected_at_ns))
    return out


def expire_breakers(policy: Policy, breakers: dict[str, list], watermark_ns: int) -> list[Output]:
    """Release every command whose TTL the watermark has passed (release at expiry)."""
    out: list[Output] = []
    for cid in sorted(c for c, a in breakers.items() if a[1] <= watermark_ns):
        active = breakers.pop(cid)
        out.append(_command_output(release(policy, active, active[1], "expired"), active[1]))
    return out


def breakers_deadline(breakers: dict[str, list]) -> int | None:
    return min((a[1] for a in breakers.values()), default=None)


@dataclass(slots=True)
class SessionState:
    """Everything Breakwater keeps about one session, across all session-scoped detectors."""

    last_seen_ns: int = 0
    loop: Any = None
    extra: dict[str, Any] = field(default_factory=dict)
    implicit: Any = None  # implicit-retry tracker
    retry: Any = None  # session retry storm
    cost: Any = None  # session cost velocity
    seen: list[int] = field(default_factory=list)  # the last SEEN_IDS span ids applied (60-bit ints)


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
                            retry=self.session_retry.new_state(), cost=self.session_cost.new_state())

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
                state.retry, fs = self.session_retry.step(state.retry, agg, watermark_ns)
                findings.extend(fs)
            for route, agg in ra["routes"].items():
                forwards.append(Output("forward", f"route:{route}".encode(), b"", payload=agg))
        if self.cost_on:
            ca = cost.aggregate(spans, self.prices)
            for agg in ca["sessions"].values():
                state.cost, fs = self.session_cost.step(state.cost, agg, watermark_ns)
                findings.extend(fs)
            for tenant, agg in ca["tenants"].items():
                forwards.append(Output("forward", f"tenant:{tenant}".encode(), b"", payload=agg))
        out = outputs_for(self.policy, findings, state.extra.setdefault("breakers", {})) if findings else []
        return state, out + forwards if forwards else out

    def advance(self, state: SessionState, watermark_ns: int) -> tuple[SessionState, list[Output]]:
        """Fire timers the watermark has passed: window closes, releases of expired commands."""
        findings: list[Finding] = []
        if self.session_retry.next_deadline(state.retry) is not None:
            state.retry, fs = self.session_retry.advance(state.retry, watermark_ns)
            findings.extend(fs)
        if self.session_cost.next_deadline(state.cost) is not None:
            state.cost, fs = self.session_cost.advance(state.cost, watermark_ns)
            findings.extend(fs)
        b = state.extra.setdefault("breakers", {})
        out = outputs_for(self.policy, findings, b) if findings else []
        if b:
            out.extend(expire_breakers(self.policy, b, watermark_ns))
        return state, out

    def next_deadline(self, state: SessionState) -> int | None:
        """Event time at which :meth:`advance` has work for this session, if any."""
        d = self.session_retry.next_deadline(state.retry)
        c = self.session_cost.next_deadline(state.cost)
        if c is not None and (d is None or c < d):
            d = c
        b = state.extra.get("breakers")
        if b:
            c = breakers_deadline(b)
            if c is not None and (d is None or c < d):
                d = c
        return d

    def expired(self, state: SessionState, watermark_ns: int) -> bool:
        if state.extra.get("breakers"):
            return False
        return (self._loop(state.loop.tenant).expired(state.loop, watermark_ns)
                and self.session_retry.expired(state.retry, watermark_ns)
                and self.session_cost.expired(state.cost, watermark_ns)
                and self.tracker.expired(state.implicit, watermark_ns))

    # -- persistence (faust table values, and the conformance test)
    def dump(self, state: SessionState) -> bytes:
        return orjson.dumps(
            {"v": STATE_VERSION, "last_seen_ns": state.last_seen_ns,
             "loop": self._default_loop.dump(state.loop), "extra": state.extra,
             "implicit": self.tracker.dump(state.implicit), "retry": self.session_retry.dump(state.retry),
             "cost": self.session_cost.dump(state.cost), "seen": state.seen}
        )

    def load(self, data: bytes) -> SessionState:
        d = orjson.loads(data)
        if d.get("v") != STATE_VERSION:
            return self.new_state()
        return SessionState(d["last_seen_ns"], self._default_loop.load(d["loop"]), d.get("extra") or {},
                            self.tracker.load(d["implicit"]), self.session_retry.load(d["retry"]),
                            self.session_cost.load(d["cost"]), list(d.get("seen") or ()))
