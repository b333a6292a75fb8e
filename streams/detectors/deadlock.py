"""plan_deadlock (README "Detectors"): plan steps that wait on each other, so none of them can ever run.

Scope: workflow (``workflow.id``, ``workflow.run_id``, else the trace id). Each workflow has two
graphs of "step *u* needs step *v*" edges:

* **plan** — from ``plan.steps`` (a JSON list of ``{"id", "depends_on": [...]}``), from span events
  named ``plan.step`` (``plan.step.id`` + ``plan.step.depends_on``), or from the same two attributes on
  a span. ``plan.revision`` (on the entry, the event or the span; default 0) versions a step's edges:
  a higher revision replaces them, the same revision adds to them, a lower revision is ignored.
* **wait_for** — runtime waits: ``plan.step.id`` + ``plan.step.waiting_on`` on a span (or a
  ``plan.step`` event). The latest span of a step (by end time) replaces that step's waits; an empty
  ``waiting_on`` clears them.

Rules:

* **cycle** — a cycle in either graph (self-dependency included) opens an episode at the span that
  closes it: severity ``critical``, breaker ``halt`` workflow. Evidence: the cycle rotated to start at
  its smallest step id (``a`` needs ``b``, …, the last needs ``a``), the graph, and the ids of the spans
  that declared its edges. One episode per distinct cycle (episode = workflow + graph + canonical
  cycle); a later revision or wait that removes one of its edges resolves it.
* **dangling** — a step needed but never seen as a step id (``id`` of an entry or event, or a span's
  ``plan.step.id``) once the watermark passes the workflow's last span end + ``dangling_after_s``
  (5 min): ``reason: dangling``, severity ``warning``, no breaker action. Judged again after every
  later deadline: ``updated`` when the missing set changes, ``resolved`` when it empties.

Event time. Every span waits in a small buffer (its end, id and edge updates only) until the watermark
passes its end; buffered spans are then applied in event-time order (end, span id), and a dangling
deadline that falls between two of them is judged in between. So the findings do not depend on the
arrival order of spans within the allowed lateness: a cycle is reported at most the lateness after its
closing span ended and is stamped with that span's end. Late spans (end already behind the watermark)
apply at once; revisions and wait versions keep them from undoing newer edges.

Incremental cycle detection (no rescans): each graph keeps a topological order (Pearce–Kelly, 2006).
A new edge that agrees with the order costs O(1); otherwise only the region of the order between its two
ends is searched and re-ordered. New steps are placed at the end of the order and steps first seen as
dependencies at its front, so plans declared forwards or backwards cost O(1) per edge; pieces arriving in
random order search small regions, and the edge that closes a cycle searches once for the shortest path
back. The closing edge of a reported cycle is kept out of the order (a cycle has no order) until the cycle
is broken; a second cycle that needs that very edge is only reported after the first one is resolved.

Timers: :meth:`PlanDeadlock.next_deadline` is the earliest event time at which
:meth:`PlanDeadlock.advance` has work (a buffered span to apply, a dangling deadline, or expiry); the
driver keeps it in a timer heap and calls ``advance(state, watermark)`` when the watermark passes it.

Bounds per workflow: ``max_steps`` steps per graph (edges to further steps are dropped and counted in
``dropped``), ``max_cycles`` remembered cycles, ``max_pending`` buffered spans, ``max_sources`` span ids
kept for evidence; the workflow expires ``workflow_ttl_s`` of event time after its last span.

>>> import orjson
>>> from streams.models import Span
>>> det = PlanDeadlock()
>>> st = det.new_state()
>>> steps = [{"id": "b", "depends_on": ["c"]}, {"id": "c", "depends_on": ["a"]}, {"id": "a", "depends_on": ["b"]}]
>>> plan = Span("t" * 32, "0" * 15 + "1", None, "chat", "INTERNAL", 0, 10**9, "OK", "",
...             {"workflow.id": "wf", "plan.steps": orjson.dumps(steps).decode()}, {})
>>> st, found = det.step(st, plan, 10**9)   # the watermark has reached the span's end
>>> [(f.status, f.severity, f.evidence["cycle"], f.action) for f in found]
[('open', 'critical', ['a', 'b', 'c'], 'halt')]
"""

from __future__ import annotations

import bisect
import hashlib
from dataclasses import dataclass, field
from sys import intern
from typing import Any

import orjson

from streams import semconv
from streams.detectors.base import Core, Finding
from streams.models import Span

NAME = "plan_deadlock"
PLAN = "plan"
WAIT = "wait_for"
_MAX_EVIDENCE_SPANS = 20
_MAX_TRACES = 10
_MAX_LISTED = 50  # missing steps / waiting steps listed in dangling evidence
_SHOW = 6  # steps named in a summary
_KEY_INLINE = 32  # cycles up to this length are spelled out in the episode; longer ones hashed


@dataclass(frozen=True, slots=True)
class DeadlockParams:
    """Parameters of the deadlock detector, validated once.

    >>> DeadlockParams(workflow_ttl_s=60)
    Traceback (most recent call last):
    ...
    ValueError: workflow_ttl_s must be >= dangling_after_s
    """

    dangling_after_s: float = 300.0
    workflow_ttl_s: float = 3600.0
    max_steps: int = 20_000
    max_cycles: int = 64
    max_pending: int = 10_000
    max_sources: int = 20_000
    max_cycle_evidence: int = 200

    def __post_init__(self) -> None:
        for name, lo in (("max_steps", 2), ("max_cycles", 1), ("max_pending", 1), ("max_sources", 1),
                         ("max_cycle_evidence", 2)):
            v = getattr(self, name)
            if v < lo:
                raise ValueError(f"{name} must be >= {lo}, got {v}")
        if self.dangling_after_s <= 0:
            raise ValueError("dangling_after_s must be > 0")
        if self.workflow_ttl_s < self.dangling_after_s:
            raise ValueError("workflow_ttl_s must be >= dangling_after_s")


@dataclass(slots=True)
class Graph:
    """One graph of "u needs v" edges plus the topological order that keeps cycle checks local.

    ``succ`` (v → the steps that need v, over ordered edges) is derived from ``deps`` and ``back``:
    it is not dumped and not compared.

    >>> g = Graph(PLAN)
    >>> g.name, g.deps
    ('plan', {})
    """

    name: str = PLAN
    deps: dict[str, list[str]] = field(default_factory=dict)  # u -> what u needs, as declared
    # plan graph: index into ``sources`` of the span that declared u's needs — one int when they all
    # come from one span (the usual case), else one per dependency
    srcs: dict[str, int | list[int]] = field(default_factory=dict)
    ver: dict[str, Any] = field(default_factory=dict)  # plan: revision; wait_for: [end_ns, span_id, trace_id]
    ord: dict[str, int] = field(default_factory=dict)  # v before u whenever u needs v (ordered edges)
    lo: int = 0
    hi: int = 0
    back: set[tuple[str, str]] = field(default_factory=set)  # closing edges of reported cycles
    succ: dict[str, list[str]] = field(default_factory=dict, compare=False, repr=False)

    def dump(self) -> dict[str, Any]:
        return {"name": self.name, "deps": self.deps, "srcs": self.srcs, "ver": self.ver, "ord": self.ord,
                "lo": self.lo, "hi": self.hi, "back": sorted([u, v] for u, v in self.back)}

    @classmethod
    def load(cls, d: dict[str, Any]) -> Graph:
        deps = {intern(u): [intern(v) for v in ds] for u, ds in d["deps"].items()}
        order = {intern(u): o for u, o in d["ord"].items()}
        g = cls(d["name"], deps, d["srcs"], d["ver"], order, d["lo"], d["hi"],
                {(intern(u), intern(v)) for u, v in d["back"]})
        for u, ds in g.deps.items():
            for v in ds:
                if (u, v) not in g.back:
                    g.succ.setdefault(v, []).append(u)
        return g


@dataclass(slots=True)
class DeadlockState:
    """Per-workflow state. Plain containers only (sets are dumped as sorted lists)."""

    workflow_id: str | None = None
    tenant: str | None = None
    session_id: str | None = None
    first: list[Any] | None = None  # [end_ns, span_id] of the earliest span; tenant/session come from it
    last_seen_ns: int = 0  # latest span end received
    applied_ns: int | None = None  # latest span end applied (the watermark has passed it)
    seen: set[str] = field(default_factory=set)  # step ids seen as ids
    plan: Graph = field(default_factory=lambda: Graph(PLAN))
    wait: Graph = field(default_factory=lambda: Graph(WAIT))
    sources: list[list[Any]] = field(default_factory=list)  # [span_id, end_ns, trace_id] of plan spans
    pending: list[list[Any]] = field(default_factory=list)  # [end_ns, span_id, trace_id, ops], sorted
    cycles: dict[str, dict[str, Any]] = field(default_factory=dict)  # episode -> cycle record
    dangling: list[Any] | None = None  # signature of the open dangling episode, None when not open
    dangling_judged_ns: int | None = None  # the applied_ns whose dangling deadline was judged
    dropped: int = 0  # edges dropped by the max_steps cap
    src_index: dict[str, int] = field(default_factory=dict, compare=False, repr=False)


def _pkey(e: list[Any]) -> tuple[int, str]:
    return e[0], e[1]


def _step_id(v: Any) -> str | None:
    if v is None or isinstance(v, bool | dict | list):
        return None
    s = str(v)
    return intern(s) if s else None


def _ids(v: Any) -> list[str]:
    # interned: a step id is referenced from several maps and from the needs of other steps
    return [intern(x) for x in semconv.id_list_of(v)]


def _entries(raw: Any) -> list[Any]:
    if isinstance(raw, str | bytes):
        try:
            raw = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return []
    if isinstance(raw, dict):
        raw = raw.get("steps", [])
    return raw if isinstance(raw, list) else []


def extract(span: Span) -> list[list[Any]]:
    """The plan updates of one span: ``["s", step]`` (a step id seen), ``["p", step, revision, needs]``
    (plan edges) and ``["w", step, waits]`` (wait_for edges).

    >>> from streams.models import SpanEvent
    >>> s = Span("t", "s", None, "x", "INTERNAL", 0, 1, "OK", "",
    ...          {"plan.revision": 2, "plan.step.id": "a", "plan.step.waiting_on": ["b"]}, {},
    ...          [SpanEvent("plan.step", 0, {"plan.step.id": "c", "plan.step.depends_on": ["a", "b"]})])
    >>> extract(s)
    [['s', 'c'], ['s', 'a'], ['p', 'c', 2, ['a', 'b']], ['w', 'a', ['b']]]
    """
    a = span.attributes
    rev0 = semconv.int_of(a.get("plan.revision"), 0)
    seen: list[list[Any]] = []
    ops: list[list[Any]] = []
    raw = a.get("plan.steps")
    if raw is not None:
        for e in _entries(raw):
            if not isinstance(e, dict):
                continue
            sid = _step_id(e.get("id"))
            if sid is None:
                continue
            seen.append(["s", sid])
            rev = semconv.int_of(e.get("revision", e.get("plan.revision")), rev0)
            ops.append(["p", sid, rev, _ids(e.get("depends_on"))])
    for ev in span.events:
        if ev.name != "plan.step":
            continue
        ea = ev.attributes
        sid = _step_id(ea.get("plan.step.id"))
        if sid is None:
            continue
        seen.append(["s", sid])
        ops.append(["p", sid, semconv.int_of(ea.get("plan.revision"), rev0),
                    _ids(ea.get("plan.step.depends_on"))])
        if "plan.step.waiting_on" in ea:
            ops.append(["w", sid, _ids(ea["plan.step.waiting_on"])])
    sid = _step_id(a.get("plan.step.id"))
    if sid is not None:
        seen.append(["s", sid])
        if "plan.step.depends_on" in a:
            ops.append(["p", sid, rev0, _ids(a["plan.step.depends_on"])])
        if "plan.step.waiting_on" in a:
            ops.append(["w", sid, _ids(a["plan.step.waiting_on"])])
    return seen + ops


def carries_plan(span: Span) -> bool:
    """True when the span says something about a plan (steps, a step id, a wait).

    A driver need not create state for a workflow before its first such span: earlier spans only
    move the workflow's last-seen time, which later spans move anyway. Most workflows never carry a
    plan, so this keeps them free (an empty workflow state is ≈ 2.4 KB of Python, 0.4 KB of JSON).

    >>> carries_plan(Span("t", "s", None, "x", "INTERNAL", 0, 1, "OK", "", {"plan.step.id": "a"}, {}))
    True
    >>> carries_plan(Span("t", "s", None, "x", "INTERNAL", 0, 1, "OK", "", {"gen_ai.tool.name": "ls"}, {}))
    False
    """
    a = span.attributes
    if "plan.steps" in a or "plan.step.id" in a:
        return True
    return bool(span.events) and any(ev.name == "plan.step" for ev in span.events)


def _rotate(cyc: list[str]) -> list[str]:
    i = cyc.index(min(cyc))
    return cyc[i:] + cyc[:i]


def _short(s: str, n: int = 40) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"


class PlanDeadlock(Core[DeadlockState]):
    """The plan-deadlock detector core; see the module docstring for the rules.

    ``visits`` counts the nodes the incremental cycle search touched (a cost metric for tests).

    >>> PlanDeadlock().name, PlanDeadlock().scope
    ('plan_deadlock', 'workflow')
    >>> det = PlanDeadlock()
    >>> loop = Span("t", "s1", None, "x", "INTERNAL", 0, 5, "OK", "",
    ...             {"plan.step.id": "a", "plan.step.depends_on": ["a"]}, {})
    >>> st, found = det.step(det.new_state(), loop, 0)   # buffered: the watermark is behind the span
    >>> found, det.next_deadline(st)
    ([], 5)
    >>> st, found = det.advance(st, 5)
    >>> found[0].evidence["cycle"], found[0].summary
    (['a'], 'Workflow t cannot make progress: plan step a depends on itself.')
    """

    name = NAME
    State = DeadlockState
    scope = "workflow"

    def __init__(self, params: DeadlockParams | None = None) -> None:
        self.p = params or DeadlockParams()
        self._dangle_ns = int(self.p.dangling_after_s * 1e9)
        self._ttl_ns = int(self.p.workflow_ttl_s * 1e9)
        self.visits = 0

    # -- state plumbing
    def new_state(self) -> DeadlockState:
        return DeadlockState()

    def dump(self, state: DeadlockState) -> dict[str, Any]:
        d: dict[str, Any] = {k: getattr(state, k) for k in DeadlockState.__slots__
                             if k not in ("seen", "plan", "wait", "src_index")}
        d["seen"] = sorted(state.seen)
        d["plan"] = state.plan.dump()
        d["wait"] = state.wait.dump()
        return d

    def load(self, data: dict[str, Any]) -> DeadlockState:
        st = DeadlockState(**{k: data[k] for k in DeadlockState.__slots__
                              if k in data and k not in ("seen", "plan", "wait", "src_index")})
        st.seen = {intern(x) for x in data.get("seen", ())}
        if "plan" in data:
            st.plan = Graph.load(data["plan"])
        if "wait" in data:
            st.wait = Graph.load(data["wait"])
        st.src_index = {s[0]: i for i, s in enumerate(st.sources)}
        return st

    def expired(self, state: DeadlockState, watermark_ns: int) -> bool:
        """True once the workflow has been quiet for ``workflow_ttl_s`` of event time.
        Call :meth:`advance` first, so buffered spans and the dangling check are not lost."""
        return state.last_seen_ns + self._ttl_ns < watermark_ns

    def next_deadline(self, state: DeadlockState) -> int | None:
        """Earliest event time at which :meth:`advance` (or :meth:`expired`) has something to do."""
        if state.first is None:
            return None
        due = state.last_seen_ns + self._ttl_ns + 1
        if state.pending:
            due = min(due, state.pending[0][0])
        if state.applied_ns is not None and state.dangling_judged_ns != state.applied_ns:
            due = min(due, state.applied_ns + self._dangle_ns)
        return due

    # -- the core
    def step(self, state: DeadlockState, span: Span, now_ns: int) -> tuple[DeadlockState, list[Finding]]:
        out: list[Finding] = []
        st = state
        t = span.end_ns
        if t > st.last_seen_ns:
            st.last_seen_ns = t
        key = [t, span.span_id]
        if st.first is None or key < st.first:
            st.first = key
            st.tenant = semconv.tenant_of(span)
            st.session_id = semconv.session_of(span)
        if st.workflow_id is None:
            st.workflow_id = semconv.workflow_of(span)
        entry = [t, span.span_id, span.trace_id, extract(span)]
        p = st.pending
        if not p or (t, span.span_id) >= (p[-1][0], p[-1][1]):
            p.append(entry)  # in order: the usual case
        else:
            bisect.insort(p, entry, key=_pkey)
        if len(st.pending) > self.p.max_pending:  # overload: apply the oldest early
            self._drain(st, st.pending[len(st.pending) - self.p.max_pending - 1][0], out)
        self._drain(st, now_ns, out)
        return st, out

    def advance(self, state: DeadlockState, watermark_ns: int) -> tuple[DeadlockState, list[Finding]]:
        """Fire the timers the watermark has passed: buffered spans, then the dangling check."""
        out: list[Finding] = []
        self._drain(state, watermark_ns, out)
        return state, out

    # -- applying spans in event-time order
    def _drain(self, st: DeadlockState, wm: int, out: list[Finding]) -> None:
        p = st.pending
        n = 0
        while n < len(p) and p[n][0] <= wm:
            n += 1
        if n:
            batch = p[:n]
            del p[:n]
            for entry in batch:
                end = entry[0]
                if st.applied_ns is not None and end > st.applied_ns + self._dangle_ns:
                    self._judge_dangling(st, out)  # a quiet gap: its deadline falls before this span
                self._apply(st, entry, out)
                if st.applied_ns is None or end > st.applied_ns:
                    st.applied_ns = end
        if st.applied_ns is not None and wm >= st.applied_ns + self._dangle_ns:
            self._judge_dangling(st, out)

    def _apply(self, st: DeadlockState, entry: list[Any], out: list[Finding]) -> None:
        end, sid, tid, ops = entry
        cap = 2 * self.p.max_steps
        for op in ops:
            kind = op[0]
            if kind == "s":
                if len(st.seen) < cap:
                    st.seen.add(op[1])
            elif kind == "p":
                g = st.plan
                u, rev, needs = op[1], op[2], op[3]
                cur = g.ver.get(u)
                if cur is not None and rev < cur:
                    continue  # an older revision arriving late
                if not self._node(g, u, target=False):
                    st.dropped += len(needs)
                    continue
                src = self._source(st, sid, end, tid)
                if cur is None or rev > cur:
                    g.ver[u] = rev
                    self._replace(st, g, u, needs, src, end, sid, out)
                else:
                    have = set(g.deps[u])
                    for v in needs:
                        if v not in have:
                            self._link(st, g, u, v, src, end, out)
            else:
                g = st.wait
                u, waits = op[1], op[2]
                cur = g.ver.get(u)
                if cur is not None and [end, sid] < cur[:2]:
                    continue  # an older wait arriving late
                if not self._node(g, u, target=False):
                    st.dropped += len(waits)
                    continue
                g.ver[u] = [end, sid, tid]
                self._replace(st, g, u, waits, -1, end, sid, out)

    def _source(self, st: DeadlockState, span_id: str, end: int, trace_id: str) -> int:
        i = st.src_index.get(span_id)
        if i is None:
            if len(st.sources) >= self.p.max_sources:
                return -1
            i = st.src_index[span_id] = len(st.sources)
            st.sources.append([span_id, end, trace_id])
        return i

    def _node(self, g: Graph, n: str, *, target: bool) -> bool:
        if n in g.ord:
            return True
        if len(g.ord) >= self.p.max_steps:
            return False
        if target:  # first seen as a dependency: front of the order
            g.lo -= 1
            g.ord[n] = g.lo
        else:  # first seen as a step with needs: end of the order
            g.hi += 1
            g.ord[n] = g.hi
        g.deps.setdefault(n, [])
        if g.name == PLAN:
            g.srcs.setdefault(n, -1)
        return True

    def _replace(self, st: DeadlockState, g: Graph, u: str, needs: list[str], src: int, end: int,
                 span_id: str, out: list[Finding]) -> None:
        old = g.deps[u]
        new = set(needs)
        removed = [v for v in old if v not in new]
        kept = [v for v in old if v in new]
        for v in removed:
            if (u, v) in g.back:
                g.back.discard((u, v))
            else:
                g.succ[v].remove(u)
        g.deps[u] = kept
        if g.name == PLAN:
            g.srcs[u] = src  # the new revision declares them all again
        if removed:
            self._resolve(st, g, u, removed, end, span_id, out)
        have = set(kept)
        for v in needs:
            if v not in have:
                self._link(st, g, u, v, src, end, out)

    def _link(self, st: DeadlockState, g: Graph, u: str, v: str, src: int, end: int,
              out: list[Finding]) -> None:
        if not self._node(g, v, target=True):
            st.dropped += 1
            return
        deps = g.deps[u]
        deps.append(v)
        if g.name == PLAN:
            have = g.srcs[u]
            if isinstance(have, list):
                have.append(src)
            elif have != src:
                if len(deps) == 1:
                    g.srcs[u] = src
                else:
                    g.srcs[u] = [have] * (len(deps) - 1) + [src]
        cyc = self._order_add(g, u, v)
        if cyc is not None:
            self._open(st, g, cyc, u, v, end, out)

    # -- Pearce–Kelly: keep ord[v] < ord[u] for every ordered edge "u needs v"
    def _order_add(self, g: Graph, u: str, v: str) -> list[str] | None:
        """Insert "u needs v" into the order; return the cycle it closes (then kept as a back edge)."""
        if u == v:
            g.back.add((u, v))
            return [u]
        order = g.ord
        lb, ub = order[u], order[v]
        if ub < lb:
            g.succ.setdefault(v, []).append(u)
            return None
        succ = g.succ
        # forward from u over "needed by" edges, inside the region ord < ord[v]
        fwd = [u]
        seen = {u}
        stack = [u]
        while stack:
            for w in succ.get(stack.pop(), ()):
                if w in seen:
                    continue
                if w == v:
                    self.visits += len(fwd)
                    g.back.add((u, v))
                    return self._cycle(g, u, v, ub)
                if order[w] < ub:
                    seen.add(w)
                    fwd.append(w)
                    stack.append(w)
        # backward from v over "needs" edges, inside the region ord > ord[u]
        bwd = [v]
        seen = {v}
        stack = [v]
        back = g.back
        deps = g.deps
        while stack:
            n = stack.pop()
            for w in deps[n]:
                if w in seen or order[w] <= lb or (back and (n, w) in back):
                    continue
                seen.add(w)
                bwd.append(w)
                stack.append(w)
        self.visits += len(fwd) + len(bwd)
        bwd.sort(key=order.__getitem__)
        fwd.sort(key=order.__getitem__)
        nodes = bwd + fwd
        slots = sorted(order[n] for n in nodes)
        for n, o in zip(nodes, slots, strict=True):
            order[n] = o
        succ.setdefault(v, []).append(u)
        return None

    def _cycle(self, g: Graph, u: str, v: str, ub: int) -> list[str]:
        """Shortest "needed by" path u → … → v inside the region (ties: smallest ids), as a cycle."""
        parent = {u: u}
        frontier = [u]
        order = g.ord
        while frontier:
            nxt: list[str] = []
            for n in frontier:
                for w in sorted(g.succ.get(n, ())):
                    if w in parent or (w != v and order[w] >= ub):
                        continue
                    parent[w] = n
                    if w == v:
                        path = [v]
                        while path[-1] != u:
                            path.append(parent[path[-1]])
                        self.visits += len(parent)
                        return path  # v needs …, …, which needs u; and u needs v
                    nxt.append(w)
            frontier = nxt
        raise AssertionError("cycle path vanished")  # pragma: no cover

    # -- episodes
    def _edge_source(self, st: DeadlockState, g: Graph, a: str, b: str) -> list[Any] | None:
        """[span_id, end_ns, trace_id] of the span that declared "a needs b"."""
        if g.name == WAIT:
            w = g.ver.get(a)  # [end_ns, span_id, trace_id]
            return [w[1], w[0], w[2]] if w is not None else None
        try:
            i = g.srcs[a]
            if isinstance(i, list):
                i = i[g.deps[a].index(b)]
        except (KeyError, ValueError, IndexError):
            return None
        return st.sources[i] if i >= 0 else None

    def _episode(self, st: DeadlockState, graph: str, cyc: list[str]) -> str:
        if len(cyc) <= _KEY_INLINE:
            body = ">".join(cyc)
        else:
            h = hashlib.blake2b("\x1f".join(cyc).encode(), digest_size=12).hexdigest()
            body = f"{len(cyc)}#{h}"
        return f"{st.workflow_id}:{graph}:{body}"

    def _open(self, st: DeadlockState, g: Graph, raw: list[str], u: str, v: str, end: int,
              out: list[Finding]) -> None:
        cyc = _rotate(raw)
        key = self._episode(st, g.name, cyc)
        n = len(cyc)
        srcs = [self._edge_source(st, g, cyc[i], cyc[(i + 1) % n]) for i in range(n)]
        span_ids: list[str] = []
        traces: set[str] = set()
        ends: list[int] = []
        for s in srcs:
            if s is None:
                continue
            ends.append(s[1])
            if len(traces) < _MAX_TRACES:
                traces.add(s[2])
            if s[0] not in span_ids and len(span_ids) < _MAX_EVIDENCE_SPANS:
                span_ids.append(s[0])
        rec = st.cycles.get(key)
        if rec is not None and rec["open"]:
            return
        rec = {
            "graph": g.name,
            "cycle": cyc,
            "back": [u, v],
            "open": True,
            "first_ns": min(ends, default=end),
            "last_ns": max(ends, default=end),
            "span_ids": span_ids,
            "trace_ids": sorted(traces),
        }
        if key in st.cycles or self._room(st):
            st.cycles[key] = rec
        out.append(self._cycle_finding(st, key, rec, "open", rec["last_ns"], None))

    def _room(self, st: DeadlockState) -> bool:
        if len(st.cycles) < self.p.max_cycles:
            return True
        for k, r in st.cycles.items():
            if not r["open"]:
                del st.cycles[k]
                return True
        return False

    def _resolve(self, st: DeadlockState, g: Graph, u: str, removed: list[str], end: int, span_id: str,
                 out: list[Finding]) -> None:
        gone = set(removed)
        readd: list[tuple[str, str]] = []
        for key, rec in st.cycles.items():
            if not rec["open"] or rec["graph"] != g.name:
                continue
            cyc = rec["cycle"]
            n = len(cyc)
            if not any(cyc[i] == u and cyc[(i + 1) % n] in gone for i in range(n)):
                continue
            rec["open"] = False
            out.append(self._cycle_finding(st, key, rec, "resolved", end, span_id))
            b = (rec["back"][0], rec["back"][1])
            if b in g.back:
                readd.append(b)
        for a, b in readd:  # its closing edge can join the order now, or close another cycle
            g.back.discard((a, b))
            cyc = self._order_add(g, a, b)
            if cyc is not None:
                self._open(st, g, cyc, a, b, end, out)

    def _judge_dangling(self, st: DeadlockState, out: list[Finding]) -> None:
        """Judge the deadline ``applied_ns + dangling_after_s`` (once per applied_ns)."""
        if st.applied_ns is None or st.dangling_judged_ns == st.applied_ns:
            return
        st.dangling_judged_ns = st.applied_ns
        due = st.applied_ns + self._dangle_ns
        missing: set[str] = set()
        waiting: set[str] = set()
        edges: list[tuple[Graph, str, str]] = []
        for g in (st.plan, st.wait):
            for u, needs in g.deps.items():
                for v in needs:
                    if v not in st.seen:
                        missing.add(v)
                        waiting.add(u)
                        edges.append((g, u, v))
        ids = sorted(missing)
        sig = [len(ids), ids[:_MAX_LISTED]]
        if ids:
            if st.dangling is None:
                status = "open"
            elif st.dangling != sig:
                status = "updated"
            else:
                return
            st.dangling = sig
        elif st.dangling is not None:
            status = "resolved"
            st.dangling = None
        else:
            return
        edges.sort(key=lambda e: (e[2], e[1], e[0].name))
        span_ids: list[str] = []
        traces: set[str] = set()
        graphs: set[str] = set()
        for g, u, v in edges:
            graphs.add(g.name)
            s = self._edge_source(st, g, u, v)
            if s is None:
                continue
            if s[0] not in span_ids and len(span_ids) < _MAX_EVIDENCE_SPANS:
                span_ids.append(s[0])
            if len(traces) < _MAX_TRACES:
                traces.add(s[2])
        wf = st.workflow_id or ""
        mins = self.p.dangling_after_s / 60
        if status == "resolved":
            summary = f"Workflow {wf}: every step its plan depends on has now appeared."
        else:
            summary = (f"Workflow {wf} depends on {len(ids)} plan step(s) (such as {_short(ids[0])!r}) "
                       f"that never appeared within {mins:g} min of its last span.")
        evidence = {
            "reason": "dangling",
            "missing": ids[:_MAX_LISTED],
            "missing_count": len(ids),
            "waiting_steps": sorted(waiting)[:_MAX_LISTED],
            "graphs": sorted(graphs),
            "span_ids": span_ids,
            "dangling_after_s": self.p.dangling_after_s,
        }
        if st.dropped:
            evidence["edges_dropped"] = st.dropped
        out.append(Finding(
            detector=NAME,
            status=status,
            severity="warning",
            scope_kind="workflow",
            scope_key=wf,
            episode=f"{wf}:dangling",
            tenant=st.tenant,
            session_id=st.session_id,
            workflow_id=wf,
            trace_ids=sorted(traces),
            first_seen_ns=st.first[0],
            last_seen_ns=st.applied_ns,
            detected_at_ns=due,
            summary=summary,
            evidence=evidence,
            action=None,
            command_scope_kind=None,
            command_scope_key=None,
            reason="plan_deadlock:dangling",
        ))

    def _cycle_finding(self, st: DeadlockState, key: str, rec: dict[str, Any], status: str, at_ns: int,
                       resolved_by: str | None) -> Finding:
        wf = st.workflow_id or ""
        cyc = rec["cycle"]
        cap = self.p.max_cycle_evidence
        ev: dict[str, Any] = {
            "reason": "cycle",
            "graph": rec["graph"],
            "cycle": cyc[:cap],
            "cycle_length": len(cyc),
            "span_ids": list(rec["span_ids"]),
        }
        if len(cyc) > cap:
            ev["cycle_truncated"] = True
        if resolved_by is not None:
            ev["resolved_by_span_id"] = resolved_by
        if st.dropped:
            ev["edges_dropped"] = st.dropped
        shown = [_short(s) for s in cyc[:_SHOW]]
        path = " → ".join(shown + ([f"… ({len(cyc) - _SHOW} more)"] if len(cyc) > _SHOW else []) + [shown[0]])
        if status == "resolved":
            what = "a later plan revision" if rec["graph"] == PLAN else "a later wait update"
            summary = f"Workflow {wf}: {what} broke the cycle {path}."
        elif len(cyc) == 1:
            verb = "depends on" if rec["graph"] == PLAN else "is waiting on"
            summary = f"Workflow {wf} cannot make progress: plan step {shown[0]} {verb} itself."
        elif rec["graph"] == PLAN:
            summary = f"Workflow {wf} cannot make progress: its plan steps depend on each other in the cycle {path}."
        else:
            summary = f"Workflow {wf} is deadlocked: its steps wait on each other in the cycle {path}."
        return Finding(
            detector=NAME,
            status=status,
            severity="critical",
            scope_kind="workflow",
            scope_key=wf,
            episode=key,
            tenant=st.tenant,
            session_id=st.session_id,
            workflow_id=wf,
            trace_ids=list(rec["trace_ids"]),
            first_seen_ns=rec["first_ns"],
            last_seen_ns=max(at_ns, rec["last_ns"]),
            detected_at_ns=at_ns,
            summary=summary,
            evidence=ev,
            action="halt",
            command_scope_kind="workflow",
            command_scope_key=wf,
            reason="plan_deadlock:cycle",
        )
