"""silent_success (README "Detectors"): an agent run that reports success over a gap it did not close.

Scope: trace. Spans of a trace arrive in any order (children before or after the root, across
batches). The **root agent span** is the topmost ``invoke_agent`` span (earliest start, then longest,
then smallest span id); a trace without ``invoke_agent`` uses its parentless span. The root *claims
success* when it ended without ERROR (status or ``error.type``) and ``agent.outcome`` is absent or
``success``; ``failure`` / ``partial`` or an ERROR root claim nothing and never open an incident.

Event time. Each span waits in a small buffer (a few fields, not the span) until the watermark
passes its end; buffered spans are applied in event-time order (end, span id). The trace is judged once
the watermark passes ``grace_s`` (30 s) after both the root's end and the latest span end applied (a
trace still emitting spans after a sub-agent ended is not done); a span ending after that deadline is
applied after the judgement. So the verdict does not depend on arrival order within the allowed
lateness, and is stamped with the deadline (``detected_at``). :meth:`SilentSuccess.next_deadline` gives
the driver the event time of the next timer (buffered span, judgement, eviction or expiry).

Gaps, each named in the evidence with its span ids:

* ``failed_tool`` — a tool span failed (ERROR or ``error.type``) and no later call (by end time) with
  the same fingerprint (tool name, argument hash) succeeded;
* ``unverified_mutation`` — a successful mutation (``tool.action_class`` mutation, non_idempotent_mutation,
  high_risk_mutation) without ``tool.verification_status = verified`` on itself, on a child span, or on a
  later span with the same fingerprint (failed mutations are ``failed_tool`` gaps instead);
* ``approval_pending`` / ``approval_rejected`` — the latest ``approval.status`` (by end time) of a
  fingerprint is ``PENDING`` / ``REJECTED``.

Severity: ``critical`` when a failed tool or an unverified mutation is involved (work the agent claims
was done may not have happened, or may have changed the world unchecked); ``warning`` when only approvals
are open (nothing was executed behind the user's back; the claim is premature). Breaker: ``hold``
session (of the root span), on every status.

Late spans re-judge the trace (once the watermark passes the grace after them): a different set of gaps
emits ``updated``, no gap left ``resolved``; a gap reappearing after resolution re-opens (``open``).
Judged traces are kept ``retention_s`` (10 min) after the grace to allow this, then expire. Traces whose
root never arrives are evicted ``orphan_ttl_s`` (30 min) after their last span and counted in
:attr:`SilentSuccess.evicted_without_root`.

Memory: only what the verdict needs — per fingerprint ``[latest success end, latest verified end,
latest approval]``, and per failed call / mutation ``[span id, end, fingerprint]``; once applied, plain
spans (chats) cost nothing but a counter. Capped at ``max_records`` failures + mutations (and buffered
spans) and ``max_fingerprints`` fingerprints per trace. A 20-span trace awaiting its judgement takes
≈ 5 KB of Python memory and ≈ 1.4 KB as JSON.

>>> from streams.models import Span
>>> det = SilentSuccess()
>>> st = det.new_state()
>>> def sp(sid, parent, end_s, **a):
...     return Span("t" * 32, sid, parent, "x", "INTERNAL", 0, end_s * 10**9, "OK", "", a, {})
>>> write = sp("w1", "r1", 5, **{"gen_ai.tool.name": "deploy", "tool.action_class": "mutation"})
>>> root = sp("r1", None, 10, **{"gen_ai.operation.name": "invoke_agent", "session.id": "s1"})
>>> for s in (root, write):            # any order; the watermark has reached the root's end
...     st, found = det.step(st, s, 10 * 10**9)
>>> det.next_deadline(st) == 40 * 10**9   # root end + 30 s grace
True
>>> st, found = det.advance(st, 40 * 10**9)
>>> [(f.status, f.severity, f.evidence["gaps"][0]["kind"], f.action, f.command_scope_key) for f in found]
[('open', 'critical', 'unverified_mutation', 'hold', 's1')]
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any

from streams import semconv
from streams.detectors.base import Core, Finding
from streams.models import Span

NAME = "silent_success"
_SEP = "\x1f"
_MAX_EVIDENCE_SPANS = 20
_MAX_VERIFIED_PARENTS = 256
_CLAIMS = (None, "success")
_BAD_APPROVALS = {"PENDING": "approval_pending", "REJECTED": "approval_rejected"}
_CRITICAL = frozenset({"failed_tool", "unverified_mutation"})
_KINDS = ("failed_tool", "unverified_mutation", "approval_pending", "approval_rejected")

# fingerprint record: [tool, latest ok end, latest verified end, [approval end, span id, status] | None]
_OK, _VERIFIED, _APPROVAL = 1, 2, 3


@dataclass(frozen=True, slots=True)
class SilentParams:
    """Parameters of the silent-success detector, validated once.

    >>> SilentParams(grace_s=0)
    Traceback (most recent call last):
    ...
    ValueError: grace_s must be > 0
    """

    grace_s: float = 30.0
    retention_s: float = 600.0
    orphan_ttl_s: float = 1800.0
    max_records: int = 512
    max_fingerprints: int = 256

    def __post_init__(self) -> None:
        for name in ("grace_s", "retention_s", "orphan_ttl_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        if self.orphan_ttl_s < self.grace_s:
            raise ValueError("orphan_ttl_s must be >= grace_s")
        for name in ("max_records", "max_fingerprints"):
            if getattr(self, name) < 8:
                raise ValueError(f"{name} must be >= 8, got {getattr(self, name)}")


@dataclass(slots=True)
class SilentState:
    """Per-trace state. Plain containers only, so it pickles and round-trips through JSON."""

    trace_id: str | None = None
    pending: list[list[Any]] = field(default_factory=list)  # spans not yet behind the watermark, sorted
    span_count: int = 0
    min_start_ns: int | None = None
    max_end_ns: int = 0
    # [rank, span_id, start_ns, end_ns, claims_success, outcome, session, tenant, workflow]
    root: list[Any] | None = None
    fps: dict[str, list[Any]] = field(default_factory=dict)
    failures: list[list[Any]] = field(default_factory=list)  # [span_id, end_ns, fp]
    mutations: list[list[Any]] = field(default_factory=list)  # [span_id, end_ns, fp, verified]
    verified_parents: list[str] = field(default_factory=list)
    overflow: int = 0  # failures / mutations / fingerprints not recorded (caps)
    judged: bool = False
    dirty: bool = False  # a span arrived after the last judgement
    incident: str | None = None  # None (never opened) | "open" | "resolved"
    verdict: list[Any] | None = None  # gap signature last reported while open
    severity: str | None = None  # severity last reported (a resolution keeps it)
    evicted: bool = False


def _fp_key(span: Span) -> str:
    tool, h = semconv.fingerprint_of(span)
    return f"{tool}{_SEP}{h}" if h is not None else tool


def _tool(key: str) -> str:
    return key.partition(_SEP)[0]


_F_TOOL, _F_ERR, _F_MUT, _F_VER = 1, 2, 4, 8


def _pkey(e: list[Any]) -> tuple[int, str]:
    return e[0], e[1]


def extract(span: Span) -> list[Any]:
    """What the verdict needs from one span: ``[end_ns, span_id, start_ns, parent, flags, fingerprint,
    approval, root]`` (fingerprint and approval None when irrelevant; root None unless the span is a
    root candidate, else ``[rank, span_id, start, end, claims_success, outcome, session, tenant,
    workflow]``).

    >>> s = Span("t", "s1", None, "x", "INTERNAL", 0, 9, "ERROR", "", {"gen_ai.tool.name": "ls"}, {})
    >>> e = extract(s)
    >>> e[:7], e[7][4]
    ([9, 's1', 0, None, 3, 'ls', None], False)
    """
    flags = 0
    f = semconv.features(span)
    op = f.op
    if op == "execute_tool" or f.tool is not None:
        flags |= _F_TOOL
    if f.error:
        flags |= _F_ERR
    if f.mutation:
        flags |= _F_MUT
    if f.verified:
        flags |= _F_VER
    approval = f.approval
    relevant = flags & (_F_TOOL | _F_MUT | _F_VER) or approval is not None
    root = None
    is_agent = op == "invoke_agent"
    if is_agent or not span.parent_span_id:
        outcome = f.outcome
        root = [[0 if is_agent else 1, span.start_ns, -span.end_ns, span.span_id], span.span_id,
                span.start_ns, span.end_ns, not flags & _F_ERR and outcome in _CLAIMS, outcome,
                f.session, f.tenant, f.workflow]
    return [span.end_ns, span.span_id, span.start_ns, span.parent_span_id or None, flags,
            _fp_key(span) if relevant else None, approval, root]


class SilentSuccess(Core[SilentState]):
    """The silent-success detector core; see the module docstring for the rules.

    >>> det = SilentSuccess()
    >>> det.name, det.scope, det.evicted_without_root
    ('silent_success', 'trace', 0)
    >>> from streams.models import Span
    >>> child = Span("t", "c", "missing-root", "x", "INTERNAL", 0, 10**9, "OK", "", {}, {})
    >>> st, _ = det.step(det.new_state(), child, 10**9)
    >>> det.next_deadline(st) == 10**9 + 1800 * 10**9 + 1   # 30 min after its last span
    True
    >>> st, _ = det.advance(st, det.next_deadline(st))     # the root never came: evicted, counted
    >>> det.expired(st, 0), det.evicted_without_root
    (True, 1)
    """

    name = NAME
    State = SilentState
    scope = "trace"

    def __init__(self, params: SilentParams | None = None) -> None:
        self.p = params or SilentParams()
        self._grace_ns = int(self.p.grace_s * 1e9)
        self._keep_ns = int(self.p.retention_s * 1e9)
        self._orphan_ns = int(self.p.orphan_ttl_s * 1e9)
        self.evicted_without_root = 0

    # -- state plumbing
    def new_state(self) -> SilentState:
        return SilentState()

    def dump(self, state: SilentState) -> dict[str, Any]:
        return {k: getattr(state, k) for k in SilentState.__slots__}

    def load(self, data: dict[str, Any]) -> SilentState:
        return SilentState(**{k: data[k] for k in SilentState.__slots__ if k in data})

    def due(self, state: SilentState) -> int | None:
        """Event time at which the trace is (re)judged: grace after the root's end and the last span."""
        if state.root is None:
            return None
        return max(state.root[3], state.max_end_ns) + self._grace_ns

    def expired(self, state: SilentState, watermark_ns: int) -> bool:
        """Judged traces after the retention; rootless traces after the orphan TTL (counted once).
        Call :meth:`advance` first, so buffered spans and a due judgement are not lost."""
        if state.evicted:
            return True
        if state.pending:
            return False
        if state.root is None:
            if state.trace_id is not None and watermark_ns > state.max_end_ns + self._orphan_ns:
                self._evict(state)
                return True
            return False
        due = self.due(state)
        return due is not None and watermark_ns > due + self._keep_ns

    def next_deadline(self, state: SilentState) -> int | None:
        """Earliest event time at which :meth:`advance` (or :meth:`expired`) has something to do."""
        if state.evicted or state.trace_id is None:
            return None
        if state.root is None:
            due = state.max_end_ns + self._orphan_ns + 1 if state.span_count else None
        else:
            due = max(state.root[3], state.max_end_ns) + self._grace_ns
            if state.judged and not state.dirty:
                due += self._keep_ns + 1
        if state.pending and (due is None or state.pending[0][0] < due):
            due = state.pending[0][0]
        return due

    # -- the core
    def step(self, state: SilentState, span: Span, now_ns: int) -> tuple[SilentState, list[Finding]]:
        out: list[Finding] = []
        st = state
        if st.trace_id is None:
            st.trace_id = span.trace_id
        if not st.evicted:
            e = extract(span)
            p = st.pending
            if not p or (e[0], e[1]) >= (p[-1][0], p[-1][1]):
                p.append(e)  # in order: the usual case
            else:
                bisect.insort(p, e, key=_pkey)
            if len(st.pending) > self.p.max_records:  # overload: apply the oldest early
                self._drain(st, st.pending[len(st.pending) - self.p.max_records - 1][0], out)
            self._drain(st, now_ns, out)
        return st, out

    def advance(self, state: SilentState, watermark_ns: int) -> tuple[SilentState, list[Finding]]:
        """Fire the timers the watermark has passed: buffered spans, the (re)judgement, or the
        eviction of a trace whose root never came."""
        out: list[Finding] = []
        if state.evicted:
            return state, out
        self._drain(state, watermark_ns, out)
        if state.root is None and state.span_count and not state.pending and \
                watermark_ns > state.max_end_ns + self._orphan_ns:
            self._evict(state)
        return state, out

    # -- applying spans in event-time order
    def _drain(self, st: SilentState, wm: int, out: list[Finding]) -> None:
        p = st.pending
        n = 0
        while n < len(p) and p[n][0] <= wm:
            n += 1
        if n:
            batch = p[:n]
            del p[:n]
            for e in batch:
                due = self.due(st)
                if due is not None and e[0] > due:
                    self._judge(st, due, out)  # the grace ran out before this span ended
                self._apply(st, e)
        due = self.due(st)
        if due is not None and wm >= due:
            self._judge(st, due, out)

    def _apply(self, st: SilentState, e: list[Any]) -> None:
        end, sid, start, parent, flags, key, approval, root = e
        st.span_count += 1
        if end > st.max_end_ns:
            st.max_end_ns = end
        if st.min_start_ns is None or start < st.min_start_ns:
            st.min_start_ns = start
        if root is not None and (st.root is None or root[0] <= st.root[0]):
            st.root = root
        if key is not None:
            rec = st.fps.get(key)
            if rec is None:
                if len(st.fps) >= self.p.max_fingerprints:
                    st.overflow += 1
                else:
                    rec = st.fps[key] = [_tool(key), -1, -1, None]
            tool, error, verified = flags & _F_TOOL, flags & _F_ERR, flags & _F_VER
            if rec is not None:
                if tool and not error and end > rec[_OK]:
                    rec[_OK] = end
                if verified and end > rec[_VERIFIED]:
                    rec[_VERIFIED] = end
                if approval is not None and (rec[_APPROVAL] is None or [end, sid] > rec[_APPROVAL][:2]):
                    rec[_APPROVAL] = [end, sid, approval]
            if tool and error:
                self._record(st, st.failures, [sid, end, key])
            elif flags & _F_MUT and not error:
                m = next((m for m in st.mutations if m[0] == sid), None)
                if m is not None:
                    m[3] = m[3] or bool(verified)  # the same span re-sent, perhaps now verified
                else:
                    self._record(st, st.mutations, [sid, end, key, bool(verified)])
            if verified and parent and parent not in st.verified_parents:
                if len(st.verified_parents) < _MAX_VERIFIED_PARENTS:
                    st.verified_parents.append(parent)
        if st.judged:
            st.dirty = True

    # -- helpers
    def _evict(self, st: SilentState) -> None:
        if not st.evicted:
            st.evicted = True
            self.evicted_without_root += 1

    def _record(self, st: SilentState, where: list[list[Any]], rec: list[Any]) -> None:
        if any(r[0] == rec[0] for r in where):
            return  # the same span delivered twice
        if len(st.failures) + len(st.mutations) >= self.p.max_records:
            st.overflow += 1
            return
        where.append(rec)

    def gaps(self, st: SilentState) -> list[dict[str, Any]]:
        """The gaps of the trace as it stands (empty when the root claims nothing)."""
        root = st.root
        if root is None or not root[4]:
            return []
        found: dict[str, list[list[Any]]] = {k: [] for k in _KINDS}
        for sid, end, key in st.failures:
            rec = st.fps.get(key)
            if rec is None or rec[_OK] <= end:
                found["failed_tool"].append([end, sid, key])
        for sid, end, key, verified in st.mutations:
            rec = st.fps.get(key)
            if verified or sid in st.verified_parents or (rec is not None and rec[_VERIFIED] > end):
                continue
            found["unverified_mutation"].append([end, sid, key])
        for key, rec in st.fps.items():
            ap = rec[_APPROVAL]
            if ap is not None and ap[2] in _BAD_APPROVALS:
                found[_BAD_APPROVALS[ap[2]]].append([ap[0], ap[1], key])
        out = []
        for kind in _KINDS:
            hits = sorted(found[kind])
            if hits:
                out.append({
                    "kind": kind,
                    "count": len(hits),
                    "span_ids": [h[1] for h in hits[:_MAX_EVIDENCE_SPANS]],
                    "tools": sorted({_tool(h[2]) for h in hits}),
                })
        return out

    def _judge(self, st: SilentState, due: int, out: list[Finding]) -> None:
        if st.judged and not st.dirty:
            return
        st.judged = True
        st.dirty = False
        gaps = self.gaps(st)
        sig = [[g["kind"], g["count"], g["span_ids"]] for g in gaps]
        if gaps:
            if st.incident != "open":
                status = "open"
            elif sig != st.verdict:
                status = "updated"
            else:
                return
            st.incident = "open"
            st.verdict = sig
        elif st.incident == "open":
            status = "resolved"
            st.incident = "resolved"
            st.verdict = None
        else:
            return
        out.append(self._finding(st, gaps, status, due))

    def _finding(self, st: SilentState, gaps: list[dict[str, Any]], status: str, due: int) -> Finding:
        root = st.root
        assert root is not None and st.trace_id is not None
        session, tenant, workflow = root[6], root[7], root[8]
        tid = st.trace_id
        kinds = {g["kind"]: g["count"] for g in gaps}
        if status == "resolved":
            if not root[4]:
                summary = f"Trace {tid} in session {session} no longer claims success, so no gap remains."
            else:
                summary = f"Trace {tid} in session {session}: late spans closed every gap in its success claim."
        else:
            parts = []
            if n := kinds.get("failed_tool"):
                parts.append(f"{n} tool call{'s' if n > 1 else ''} failed without a successful retry")
            if n := kinds.get("unverified_mutation"):
                parts.append(f"{n} mutation{'s were' if n > 1 else ' was'} not verified")
            if n := kinds.get("approval_pending"):
                parts.append(f"{n} approval{'s are' if n > 1 else ' is'} still pending")
            if n := kinds.get("approval_rejected"):
                parts.append(f"{n} approval{'s were' if n > 1 else ' was'} rejected")
            listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
            summary = f"Trace {tid} in session {session} reported success, but {listed}."
        if status == "resolved":
            severity = st.severity or "warning"
        else:
            severity = st.severity = "critical" if _CRITICAL & kinds.keys() else "warning"
        evidence: dict[str, Any] = {
            "gaps": gaps,
            "root_span_id": root[1],
            "root_outcome": root[5],
            "span_count": st.span_count,
            "grace_s": self.p.grace_s,
        }
        if st.overflow:
            evidence["records_dropped"] = st.overflow
        return Finding(
            detector=NAME,
            status=status,
            severity=severity,
            scope_kind="trace",
            scope_key=tid,
            episode=tid,
            tenant=tenant,
            session_id=session,
            workflow_id=workflow,
            trace_ids=[tid],
            first_seen_ns=st.min_start_ns if st.min_start_ns is not None else root[2],
            last_seen_ns=st.max_end_ns,
            detected_at_ns=due,
            summary=summary,
            evidence=evidence,
            action="hold",
            command_scope_kind="session",
            command_scope_key=session,
            reason="silent_success:" + "+".join(g["kind"] for g in gaps) if gaps else "silent_success:resolved",
        )
