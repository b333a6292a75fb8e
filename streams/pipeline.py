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
>>> [o.kind for o in out]
['incident', 'breaker']
>>> pipe.load(pipe.dump(st)).last_seen_ns == st.last_seen_ns
True
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from streams.detectors.base import Finding
from streams.detectors.loop import NoProgressLoop
from streams.models import Span
from streams.policy import Policy, apply, release

STATE_VERSION = 1


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


def _command_output(command: Any, at_ns: int) -> Output:
    return Output("breaker", command.kafka_key(), command.model_dump_json().encode(),
                  command.detector or "", command.action, at_ns, "", command.mode)


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
                              f.detector, f.status, f.detected_at_ns, incident.severity, incident.policy_mode))
        if command is not None:
            out.append(_command_output(command, f.detected_at_ns))
            if breakers is not None:
                ttl_ns = int(policy.breaker_ttl_s(f.detector, f.tenant) * 1e9)
                breakers[command.command_id] = [
                    command.command_id, f.detected_at_ns + ttl_ns, command.incident_id, f.detector,
                    command.scope.kind, command.scope.key, command.scope.tenant, command.mode]
        elif (f.status == "resolved" and breakers and incident is not None
              and incident.breaker_command_id in breakers):
            active = breakers.pop(incident.breaker_command_id)
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


class SessionPipeline:
    """Session-scoped detectors + policy. Detector instances are cached per tenant."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self._loops: dict[str | None, NoProgressLoop] = {}
        self._default_loop = NoProgressLoop(policy.loop_params(None))

    def _loop(self, tenant: str | None) -> NoProgressLoop:
        det = self._loops.get(tenant)
        if det is None:
            params = self.policy.loop_params(tenant)
            det = self._default_loop if params == self._default_loop.p else NoProgressLoop(params)
            self._loops[tenant] = det
        return det

    def new_state(self) -> SessionState:
        return SessionState(loop=self._default_loop.new_state())

    def step(self, state: SessionState, spans: list[Span], watermark_ns: int) -> tuple[SessionState, list[Output]]:
        findings: list[Finding] = []
        loop_state = state.loop
        for span in spans:
            if span.end_ns > state.last_seen_ns:
                state.last_seen_ns = span.end_ns
            det = self._loop(loop_state.tenant) if loop_state.tenant is not None else self._default_loop
            loop_state, fs = det.step(loop_state, span, watermark_ns)
            if fs:
                findings.extend(fs)
        state.loop = loop_state
        if not findings:
            return state, []
        return state, outputs_for(self.policy, findings, state.extra.setdefault("breakers", {}))

    def advance(self, state: SessionState, watermark_ns: int) -> tuple[SessionState, list[Output]]:
        """Fire timers the watermark has passed: releases of expired commands."""
        b = state.extra.get("breakers")
        return state, expire_breakers(self.policy, b, watermark_ns) if b else []

    def next_deadline(self, state: SessionState) -> int | None:
        """Event time at which :meth:`advance` has work for this session, if any."""
        b = state.extra.get("breakers")
        return breakers_deadline(b) if b else None

    def expired(self, state: SessionState, watermark_ns: int) -> bool:
        if state.extra.get("breakers"):
            return False
        return self._loop(state.loop.tenant).expired(state.loop, watermark_ns)

    # -- persistence (faust table values, and the conformance test)
    def dump(self, state: SessionState) -> bytes:
        return orjson.dumps(
            {"v": STATE_VERSION, "last_seen_ns": state.last_seen_ns,
             "loop": self._default_loop.dump(state.loop), "extra": state.extra}
        )

    def load(self, data: bytes) -> SessionState:
        d = orjson.loads(data)
        if d.get("v") != STATE_VERSION:
            return self.new_state()
        return SessionState(d["last_seen_ns"], self._default_loop.load(d["loop"]), d.get("extra") or {})
