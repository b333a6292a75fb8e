"""no_progress_loop (README "Detectors"): an agent repeating itself without making progress.

Scope: session. Rules, all reset by progress (a changed ``agent.state_hash``, or a successful
mutation with a fingerprint the session has not mutated with before):

* **repeat** — the Nth call (default 3) with the same fingerprint (tool name, argument hash) within
  the window (default 10 min); a fingerprint without argument hash needs twice as many;
* **cycle** — a cycle of 2–4 fingerprints repeating 3 times in a row, within the window;
* **stagnation** — 5 consecutive ``chat`` spans carrying the same ``agent.state_hash``.

A tool call is a tool span. A session that has never shown a tool span (LiteLLM emits none: the
caller runs the tools) counts instead the calls its *root* model spans requested
(``Features.req_tool``); the first tool span of a session withdraws the requested calls counted so
far and stops counting them, so a producer emitting both the request and the execution never
counts a call twice. Only root model spans: a model span inside a run (an agent or chain span above
it) belongs to a framework that can emit the tool spans too, and those can arrive after all the
model spans of their batch (an OTLP export groups spans by instrumentation scope), too late to
stop the requests from being counted — the outcome would depend on batching.

One episode per loop: the first hit opens it (incident ``open``, breaker ``halt`` session), later
hits update it (``updated`` at 2×, 4×, 8×… the opening count, so a fast loop cannot flood the
topic), progress resolves it (``resolved``).

Memory per tracked session: bounded by ``max_fingerprints`` call lists of at most 2×threshold
timestamps, a sequence of 3×``cycle_max`` calls, a capped mutation set and ≤ 20 span ids of
evidence; typically ≈ 1–3 KB (measured in the README).

>>> from streams.models import Span
>>> det = NoProgressLoop()
>>> st = det.new_state()
>>> def call(i):
...     return Span("a" * 32, f"{i:016x}", None, "tool", "INTERNAL", i * 10**9, i * 10**9 + 1, "OK",
...                 "", {"gen_ai.tool.name": "search", "tool.payload_hash": "h", "session.id": "s"}, {})
>>> for i in range(1, 4):
...     st, found = det.step(st, call(i), i * 10**9)
>>> [(f.status, f.evidence["rule"], f.evidence["repeats"]) for f in found]
[('open', 'repeat', 3)]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from streams import semconv
from streams.detectors.base import Core, Finding
from streams.models import Span

NAME = "no_progress_loop"
_SEP = "\x1f"
_MAX_EVIDENCE_SPANS = 20
_MAX_TRACES = 10
_MAX_MUTATIONS = 256


@dataclass(frozen=True, slots=True)
class LoopParams:
    """Parameters of the loop detector, validated once.

    >>> LoopParams(repeat_threshold=1)
    Traceback (most recent call last):
    ...
    ValueError: repeat_threshold must be >= 2, got 1
    """

    repeat_threshold: int = 3
    window_s: float = 600.0
    cycle_min: int = 2
    cycle_max: int = 4
    cycle_repeats: int = 3
    stagnation_chats: int = 5
    session_ttl_s: float = 1800.0
    max_fingerprints: int = 256

    def __post_init__(self) -> None:
        for name, lo in (("repeat_threshold", 2), ("cycle_min", 2), ("cycle_repeats", 2),
                         ("stagnation_chats", 2), ("max_fingerprints", 8)):
            v = getattr(self, name)
            if v < lo:
                raise ValueError(f"{name} must be >= {lo}, got {v}")
        if self.cycle_max < self.cycle_min:
            raise ValueError(f"cycle_max must be >= cycle_min, got {self.cycle_max}")
        if self.window_s <= 0 or self.session_ttl_s <= 0:
            raise ValueError("window_s and session_ttl_s must be > 0")
        if self.session_ttl_s < self.window_s:
            raise ValueError("session_ttl_s must be >= window_s")


@dataclass(slots=True)
class LoopState:
    """Per-session state. Plain containers only, so it pickles and round-trips through JSON."""

    last_seen_ns: int = 0
    tenant: str | None = None
    workflow_id: str | None = None
    state_hash: str | None = None
    # fingerprint key -> [[end_ns, span_id, trace_id], ...] since the last progress
    calls: dict[str, list[list[Any]]] = field(default_factory=dict)
    # recent tool calls since progress: [[fp_key, end_ns], ...], for cycles
    seq: list[list[Any]] = field(default_factory=list)
    chat_hash: str | None = None
    chat_streak: int = 0
    chat_first: list[Any] | None = None  # [end_ns, span_id] of the streak's first chat
    mutations: list[str] = field(default_factory=list)
    episode: dict[str, Any] | None = None
    saw_tool: bool = False  # a tool span was seen: requested calls are no longer counted


def _fp_key(span: Span) -> tuple[str, bool]:
    tool, h = semconv.fingerprint_of(span)
    if h is None:
        return tool, False
    return f"{tool}{_SEP}{h}", True


def _fp_public(key: str) -> dict[str, str | None]:
    tool, _, h = key.partition(_SEP)
    return {"tool": tool, "args_hash": h or None}


class NoProgressLoop(Core[LoopState]):
    """The loop detector core; see the module docstring for the rules.

    >>> NoProgressLoop().name, NoProgressLoop().scope
    ('no_progress_loop', 'session')
    """

    name = NAME
    scope = "session"
    State = LoopState

    def __init__(self, params: LoopParams | None = None) -> None:
        self.p = params or LoopParams()
        self._window_ns = int(self.p.window_s * 1e9)
        self.ttl_ns = self._ttl_ns = int(self.p.session_ttl_s * 1e9)
        self._seq_cap = self.p.cycle_max * self.p.cycle_repeats

    # -- the core
    def step(self, state: LoopState, span: Span, now_ns: int) -> tuple[LoopState, list[Finding]]:
        findings: list[Finding] = []
        t = span.end_ns
        if t > state.last_seen_ns:
            state.last_seen_ns = t
        if state.tenant is None:
            state.tenant = semconv.tenant_of(span)
        if state.workflow_id is None:
            state.workflow_id = semconv.workflow_of(span)
        ep = state.episode
        if ep is not None:
            self._account(ep, span)

        # 1. progress resets everything
        progress = False
        f = span.feat
        if f is None:
            f = semconv.features(span)
        sh = f.state_hash
        if sh is not None:
            if state.state_hash is not None and sh != state.state_hash:
                progress = True
            state.state_hash = sh
        op = f.op
        tool_call = f.tool is not None or op == "execute_tool"  # semconv.is_tool_call
        key = ""
        has_hash = True
        requested = False
        if tool_call:
            if not state.saw_tool:
                # the session's first tool span: whatever was counted so far were requested calls,
                # which this session's tool spans now stand for (else each call would count twice)
                state.saw_tool = True
                if state.calls or state.seq:
                    state.calls.clear()
                    state.seq.clear()
            key, has_hash = _fp_key(span)
            if f.mutation and not f.error and key not in state.mutations:
                state.mutations.append(key)
                if len(state.mutations) > _MAX_MUTATIONS:
                    del state.mutations[0]
                progress = True
        elif f.req_tool is not None and not state.saw_tool and not span.parent_span_id:
            requested = True
            h = f.req_hash
            key, has_hash = (f"{f.req_tool}{_SEP}{h}", True) if h is not None else (f.req_tool, False)
        if progress:
            if ep is not None:
                findings.append(self._finding(state, span, ep, "resolved"))
            state.calls.clear()
            state.seq.clear()
            state.chat_streak = 0
            state.chat_hash = None
            state.episode = ep = None

        hits: list[tuple[str, dict[str, Any], list[Any]]] = []  # (rule, evidence, first [ns, span_id])

        # 2. stagnation: consecutive chats with one state hash
        if op == "chat":
            if sh is None:
                state.chat_streak, state.chat_hash, state.chat_first = 0, None, None
            elif sh == state.chat_hash:
                state.chat_streak += 1
            else:
                state.chat_hash, state.chat_streak, state.chat_first = sh, 1, [t, span.span_id]
            if state.chat_streak >= self.p.stagnation_chats:
                hits.append(("stagnation", {"state_hash": sh, "repeats": state.chat_streak},
                             state.chat_first or [t, span.span_id]))

        # 3. repeats and cycles of tool calls
        if tool_call or requested:
            # the window ends at the session's latest time, not at this span's: a late span never
            # evicts newer calls (it counts if it is inside the window, else it is too old to count)
            lo = state.last_seen_ns - self._window_ns
            old = state.calls.get(key)
            calls = [c for c in old if lo <= c[0]] if old else []
            if t >= lo:
                calls.append([t, span.span_id, span.trace_id])
            threshold = self.p.repeat_threshold * (1 if has_hash else 2)
            if len(calls) > 2 * threshold:
                del calls[0]
            state.calls[key] = calls
            if len(state.calls) > self.p.max_fingerprints:
                self._evict_oldest_fingerprint(state, key)
            if len(calls) >= threshold:
                hits.append(("repeat", {"fingerprint": _fp_public(key), "repeats": len(calls)},
                             [calls[0][0], calls[0][1]]))
            state.seq.append([key, t, span.span_id])
            if len(state.seq) > self._seq_cap:
                del state.seq[0]
            cyc = self._cycle(state.seq, lo)
            if cyc is not None:
                period, first = cyc
                hits.append(("cycle", {"cycle": [_fp_public(k) for k in period],
                                       "repeats": self.p.cycle_repeats}, first))

        # 4. open or update the episode
        if hits:
            rule, ev, first = hits[0]
            if ep is None:
                ep = state.episode = {
                    "key": f"{first[0]}:{first[1]}",
                    "rule": rule,
                    "evidence": ev,
                    "first_ns": first[0],
                    "last_ns": t,
                    "hits": 1,
                    "next_update": 2,
                    "span_ids": [],
                    "trace_ids": [],
                    "cost_usd": 0.0,
                    "tokens": 0,
                }
                if requested:
                    ep["requested"] = True
                for c in state.calls.get(key, ()) if rule == "repeat" else ():
                    self._remember(ep, c[1], c[2])
                self._account(ep, span)
                findings.append(self._finding(state, span, ep, "open"))
            else:
                ep["hits"] += 1
                ep["last_ns"] = max(ep["last_ns"], t)
                if ep["rule"] == rule:
                    ep["evidence"] = ev
                if ep["hits"] >= ep["next_update"]:
                    ep["next_update"] *= 2
                    findings.append(self._finding(state, span, ep, "updated"))
        return state, findings

    # -- helpers
    def _cycle(self, seq: list[list[Any]], lo: int) -> tuple[list[str], list[Any]] | None:
        n = self.p.cycle_repeats
        for p in range(self.p.cycle_min, self.p.cycle_max + 1):
            need = p * n
            if len(seq) < need:
                break
            tail = seq[-need:]
            if tail[0][1] < lo:
                continue
            pattern = [c[0] for c in tail[:p]]
            if len(set(pattern)) < 2:
                continue
            if all(tail[i][0] == pattern[i % p] for i in range(need)):
                return pattern, [tail[0][1], tail[0][2]]
        return None

    @staticmethod
    def _evict_oldest_fingerprint(state: LoopState, keep: str) -> None:
        victim = min((k for k in state.calls if k != keep), key=lambda k: state.calls[k][-1][0])
        del state.calls[victim]

    @staticmethod
    def _remember(ep: dict[str, Any], span_id: str, trace_id: str) -> None:
        if span_id not in ep["span_ids"] and len(ep["span_ids"]) < _MAX_EVIDENCE_SPANS:
            ep["span_ids"].append(span_id)
        if trace_id not in ep["trace_ids"] and len(ep["trace_ids"]) < _MAX_TRACES:
            ep["trace_ids"].append(trace_id)

    def _account(self, ep: dict[str, Any], span: Span) -> None:
        self._remember(ep, span.span_id, span.trace_id)
        cost = semconv.reported_cost_of(span)
        if cost is not None:
            ep["cost_usd"] = round(ep["cost_usd"] + cost, 9)
        i, o = semconv.tokens_of(span)
        ep["tokens"] += i + o

    def _finding(self, state: LoopState, span: Span, ep: dict[str, Any], status: str) -> Finding:
        session = semconv.session_of(span)
        ev = dict(ep["evidence"])
        ev.update(
            rule=ep["rule"],
            hits=ep["hits"],
            window_s=self.p.window_s,
            span_ids=list(ep["span_ids"]),
            cost_usd_wasted=ep["cost_usd"],
            tokens_wasted=ep["tokens"],
        )
        requested = ep.get("requested", False)
        if requested:
            ev["requested_by_model"] = True  # model spans requesting calls (the session has no tool spans)
        secs = (ep["last_ns"] - ep["first_ns"]) / 1e9
        if status == "resolved":
            summary = f"Session {session} made progress again; the loop ({ep['rule']}) ended."
        elif ep["rule"] == "repeat":
            fp = ev["fingerprint"]
            same = "the same arguments" if fp["args_hash"] else "no argument hash"
            did = "'s model requested" if requested else " called"
            summary = (f"Session {session}{did} tool {fp['tool']!r} {ev['repeats']} times with "
                       f"{same} in {secs:.0f} s without progress.")
        elif ep["rule"] == "cycle":
            tools = " → ".join(c["tool"] for c in ev["cycle"])
            did = "'s model requested" if requested else " repeated"
            summary = f"Session {session}{did} the tool cycle {tools} {ev['repeats']} times without progress."
        else:
            summary = (f"Session {session} had {ev['repeats']} consecutive chat turns without its "
                       f"state changing.")
        return Finding(
            detector=NAME,
            status=status,
            severity="critical",
            scope_kind="session",
            scope_key=session,
            episode=ep["key"],
            tenant=state.tenant,
            session_id=session,
            workflow_id=state.workflow_id,
            trace_ids=list(ep["trace_ids"]),
            first_seen_ns=ep["first_ns"],
            last_seen_ns=max(ep["last_ns"], span.end_ns) if status == "resolved" else ep["last_ns"],
            detected_at_ns=span.end_ns,
            summary=summary,
            evidence=ev,
            action="halt",
            command_scope_kind="session",
            command_scope_key=session,
            reason=f"no_progress_loop:{ep['rule']}",
        )
