"""retry_storm (README "Detectors"): many retries on one route, or by one session, within 60 s.

Spans are partitioned by session, but a route storm needs all of a route's retries in one place.
So the detector comes in three pure parts, none of which knows Kafka:

1. :class:`ImplicitRetryTracker` — session-scoped, runs per span in the session pipeline: a failed
   call followed within 30 s by a call with the same fingerprint in the same session is a retry
   even without a retry attribute. Its state is ≤ ``max_keys`` pending failures.
2. :func:`aggregate` — per batch (any sessions): turns spans into small JSON-safe aggregates keyed
   by route and by session, one bucket per event-time second. Buckets merge associatively and
   commutatively (:func:`merge`), so the route aggregates of many session partitions can be
   repartitioned by route and combined in any order.
3. The cores, fed with aggregates: :class:`RouteRetryStorm` (keyed by route) and
   :class:`SessionRetryStorm` (keyed by session). ``step(state, aggregate, watermark_ns)``
   merges and then advances to the watermark; ``advance`` evaluates a **60-s window sliding
   in 1-s steps** (routes) or **5-s steps** (sessions: many more keys, so coarser and smaller
   state) at every step that changes it, once the watermark has passed that step. Results
   therefore depend only on event times — not on how spans were batched — as long as spans are no
   later than the allowed lateness.

Rules (defaults of :class:`RetryParams`):

* **route storm** — window has ≥ 20 retries from ≥ 5 sessions and retries / attempts ≥ 0.25.
  Command: ``throttle`` the route; scoped to the tenant (``Finding.tenant``) when one tenant has
  ≥ 80 % of the window's retries, else to everyone (``Finding.tenant`` is None).
* **session storm** — window has ≥ 10 retries by one session. Command: ``throttle`` the session,
  at the floor rate (1/s).
* ``evidence["span_ids"]`` — the latest 5 retry spans the window has seen.
* ``evidence["rate_limit_per_s"]`` — the rate a route throttle should allow: the successful calls
  per second in the storm window (times the tenant's share of the retries, when tenant-scoped),
  floor 1/s. That is what the upstream is accepting right now; in an outage (nothing succeeds) it
  is the floor.
* **one incident per episode**: ``open`` at the first hot window that ends with new data (a window
  that only lost old calls at its start is not a new storm); ``updated`` when the window's
  retries have doubled since the last report, and (``renew``) ``breaker_ttl_s − renew_before_s``
  after each command while the storm is not quiet — ``evidence["renew"]`` is then True, so the
  throttle can be re-issued before it expires; ``resolved`` (``evidence["release"]`` True: publish a
  ``release``) at the first window ending ≥ one window after the opening whose retries are below
  half the threshold (or whose ratio is below half) — the hysteresis that keeps a storm hovering at
  the threshold from flapping.

Retries: a span whose retry ordinal (``http.request.resend_count`` or ``retry.attempt``) is > 0 is
one retry, whatever the ordinal — ordinals number the resends of one request, so they are never
summed; when a chain's earlier attempts were not exported (a client that exports only the final
failure), the chain counts its highest ordinal (:class:`ImplicitRetryTracker` adds the gap). A span
without a retry attribute that repeats a failed call is an implicit retry (1); a span that says it
is attempt 0 is the first attempt of a new request, never a retry; no span counts twice.
A *call* is a span with a route (README "What producers send": provider/model, or the tool name) that is no agent span.
Implicit retries are decided in a session's arrival order (a session's spans stay in one partition,
in order, so live and replay agree); everything after that depends on event time only.

Wiring (the same for :mod:`streams.detectors.cost`): in the session pipeline, per batch, mark
implicit retries per session, run :func:`aggregate` once over the batch, feed the ``sessions``
aggregates to the session cores right there, and send each ``routes`` (``tenants``) aggregate to a
topic keyed by route (tenant), where the keyed core runs with that stream's watermark. Call
``advance`` on keys that got no aggregate when ``next_deadline`` is due, and before ``expired``.

>>> from tests.spans import span
>>> spans = [span(10 + i * 0.5, session=f"s{i % 5}", gen_ai__provider__name="openai",
...               gen_ai__request__model="gpt-4o", http__request__resend_count=1) for i in range(20)]
>>> agg = aggregate(spans)
>>> det = RouteRetryStorm()
>>> st, found = det.step(det.new_state(), agg["routes"]["openai/gpt-4o"], 30 * 10**9)
>>> [(f.status, f.scope_key, f.tenant, f.evidence["retries"], f.evidence["rate_limit_per_s"]) for f in found]
[('open', 'openai/gpt-4o', 'acme', 20, 1.0)]
>>> st, found = det.advance(st, 200 * 10**9)
>>> [(f.status, f.evidence["release"]) for f in found]
[('resolved', True)]
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Any, Iterable

from streams import semconv
from streams.detectors.base import Core, Finding
from streams.detectors.window import OVERFLOW, S, Schema, Sliding, canonical_sample, cap_map
from streams.models import Span

NAME = "retry_storm"
_SEP = "\x1f"
MAX_SESSIONS_PER_BUCKET = 64
MAX_TENANTS_PER_BUCKET = 32
MAX_ROUTES_PER_BUCKET = 16
SAMPLE = 5  # retry spans named in evidence
RING_SLACK = 4  # a session's ring of recent retries holds session_min_retries + this many
BUCKET_SAMPLE = 3  # earliest retry spans kept per bucket until it enters the window

ROUTE_SCHEMA = Schema(
    sums=("attempts", "calls", "ok", "retries", "implicit"),
    maps=(("sessions", MAX_SESSIONS_PER_BUCKET), ("tenants", MAX_TENANTS_PER_BUCKET)),
    samples=(("spans", BUCKET_SAMPLE, False),),
    mins=("first",),
    maxs=("last",),
)
SESSION_SCHEMA = Schema(
    sums=("retries", "implicit"),
    maps=(("routes", MAX_ROUTES_PER_BUCKET),),
    samples=(("spans", BUCKET_SAMPLE, False),),
    mins=("first",),
    maxs=("last",),
    firsts=("tenant",),
)
# what a session core keeps per bucket (the tenant lives in the state)
_SESSION_STORE = Schema(
    sums=("retries", "implicit"),
    maps=(("routes", MAX_ROUTES_PER_BUCKET),),
    samples=(("spans", BUCKET_SAMPLE, False),),
    mins=("first",),
    maxs=("last",),
)
_FOLD = (("spans", SAMPLE, True),)  # the latest retry spans the window has seen, for evidence


# ----------------------------------------------------------------------------- parameters


@dataclass(frozen=True, slots=True)
class RetryParams:
    """Parameters of retry_storm (README "Detectors" defaults), validated once.

    >>> RetryParams(route_min_ratio=1.5)
    Traceback (most recent call last):
    ...
    ValueError: route_min_ratio must be in (0, 1], got 1.5
    >>> RetryParams(window_s=60.5)
    Traceback (most recent call last):
    ...
    ValueError: window_s must be a whole number of seconds >= 1, got 60.5
    """

    window_s: float = 60.0
    bucket_s: float = 1.0  # route windows slide in these steps
    session_bucket_s: float = 5.0  # session windows (many more keys: coarser, smaller state)
    route_min_retries: int = 20
    route_min_sessions: int = 5
    route_min_ratio: float = 0.25
    session_min_retries: int = 10
    tenant_share: float = 0.8
    release_fraction: float = 0.5
    breaker_ttl_s: float = 120.0
    renew: bool = True
    renew_before_s: float = 30.0
    rate_limit_floor_per_s: float = 1.0
    idle_ttl_s: float = 600.0

    def __post_init__(self) -> None:
        if self.window_s < 1 or self.window_s != int(self.window_s):
            raise ValueError(f"window_s must be a whole number of seconds >= 1, got {self.window_s}")
        for name in ("bucket_s", "session_bucket_s"):
            v = getattr(self, name)
            if v < 1 or v != int(v) or self.window_s % v:
                raise ValueError(f"{name} must be a whole number of seconds dividing window_s, got {v}")
        for name in ("route_min_retries", "route_min_sessions", "session_min_retries"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v}")
        for name in ("route_min_ratio", "tenant_share"):
            v = getattr(self, name)
            if not 0 < v <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {v}")
        if not 0 < self.release_fraction < 1:
            raise ValueError(f"release_fraction must be in (0, 1), got {self.release_fraction}")
        if self.rate_limit_floor_per_s <= 0:
            raise ValueError("rate_limit_floor_per_s must be > 0")
        if self.breaker_ttl_s < 1:
            raise ValueError("breaker_ttl_s must be >= 1")
        if not 0 <= self.renew_before_s < self.breaker_ttl_s:
            raise ValueError("renew_before_s must be >= 0 and < breaker_ttl_s")
        if self.idle_ttl_s < self.window_s:
            raise ValueError("idle_ttl_s must be >= window_s")


@dataclass(frozen=True, slots=True)
class ImplicitRetryParams:
    """How long after a failure a repeat of the same call counts as a retry; state cap.

    >>> ImplicitRetryParams(max_keys=0)
    Traceback (most recent call last):
    ...
    ValueError: max_keys must be >= 1, got 0
    """

    window_s: float = 30.0
    max_keys: int = 64

    def __post_init__(self) -> None:
        if self.window_s <= 0:
            raise ValueError(f"window_s must be > 0, got {self.window_s}")
        if self.max_keys < 1:
            raise ValueError(f"max_keys must be >= 1, got {self.max_keys}")


# ----------------------------------------------------------------------------- implicit retries


def call_key(span: Span) -> str | None:
    """What "the same call" means for implicit retries: the tool fingerprint, or the model route.

    >>> from tests.spans import span
    >>> call_key(span(1, tool="search", args="h1")), call_key(span(1, op="invoke_agent"))
    ('tool:search\\x1fh1', None)
    """
    return semconv.call_key_of(span, _SEP)


@dataclass(slots=True)
class ImplicitRetryState:
    """Per-session: the latest not-yet-retried failure per call key, ``[start_ns, end_ns]``, and
    the latest retry ordinal per call key, ``[ordinal, end_ns]`` (to count chains, not ordinals)."""

    last_seen_ns: int = 0
    failures: dict[str, list[int]] = field(default_factory=dict)
    chains: dict[str, list[int]] = field(default_factory=dict)


class ImplicitRetryTracker:
    """Marks implicit retries in one session's spans (arrival order); run it in the session pipeline.

    A call is an implicit retry when an earlier call with the same :func:`call_key` failed, it starts
    no earlier than that failure started, ends after it, and starts ≤ ``window_s`` after the failure
    ended. Each failure is retried at most once (a chain of failures counts each link). A call that
    already carries a retry attribute consumes the failure but is not marked (it is counted once).

    >>> from tests.spans import span
    >>> tr = ImplicitRetryTracker()
    >>> st = tr.new_state()
    >>> st, a = tr.step(st, span(1, tool="search", status="ERROR"), 0)
    >>> st, b = tr.step(st, span(5, tool="search"), 0)
    >>> st, c = tr.step(st, span(9, tool="search"), 0)
    >>> a, b, c
    (False, True, False)
    """

    name = "implicit_retry"
    scope = "session"

    def __init__(self, params: ImplicitRetryParams | None = None) -> None:
        self.p = params or ImplicitRetryParams()
        self._window_ns = int(self.p.window_s * S)

    def new_state(self) -> ImplicitRetryState:
        return ImplicitRetryState()

    def dump(self, state: ImplicitRetryState) -> dict[str, Any]:
        d: dict[str, Any] = {"last_seen_ns": state.last_seen_ns, "failures": state.failures}
        if state.chains:
            d["chains"] = state.chains
        return d

    def load(self, data: dict[str, Any]) -> ImplicitRetryState:
        return ImplicitRetryState(int(data.get("last_seen_ns", 0)),
                                  {k: [int(v[0]), int(v[1])] for k, v in data.get("failures", {}).items()},
                                  {k: [int(v[0]), int(v[1])] for k, v in data.get("chains", {}).items()})

    def expired(self, state: ImplicitRetryState, watermark_ns: int) -> bool:
        """Nothing pending can still be retried (no retry can start later than this)."""
        return state.last_seen_ns + self._window_ns < watermark_ns

    def step(self, state: ImplicitRetryState, span: Span, now_ns: int = 0) -> tuple[ImplicitRetryState, bool]:
        return self._step(state, span)[:2]  # type: ignore[return-value]

    def _step(self, state: ImplicitRetryState, span: Span) -> tuple[ImplicitRetryState, bool, int, int]:
        """``(state, implicit, retries, attempts)``: what an explicit retry span stands for — its
        ordinal minus the chain's previous ordinal (the attempts between were not exported), and
        as attempts that plus the original request when it starts a chain; 0, 0 for a span that is
        no explicit retry."""
        if span.end_ns > state.last_seen_ns:
            state.last_seen_ns = span.end_ns
        key = call_key(span)
        if key is None:
            return state, False, 0, 0
        ordinal = semconv.retry_ordinal_of(span)
        implicit = False
        f = state.failures.get(key)
        if f is not None:
            if (span.start_ns >= f[0] and span.end_ns > f[1]
                    and span.start_ns - f[1] <= self._window_ns):
                del state.failures[key]
                # an explicit ordinal (even 0: the first attempt of a new request) is never implicit
                implicit = ordinal < 0
            elif span.start_ns - f[1] > self._window_ns:
                del state.failures[key]
        retries = attempts = 0
        if ordinal >= 0:
            c = state.chains.get(key)
            prev = c[0] if c is not None and span.start_ns - c[1] <= self._window_ns else -1
            if ordinal > 0:
                if ordinal > prev >= 0:  # the chain goes on
                    retries = attempts = ordinal - prev
                else:  # a new chain (no earlier ordinal, or a lower one): its original request too
                    retries, attempts = ordinal, ordinal + 1
            state.chains[key] = [ordinal, span.end_ns]
            if len(state.chains) > self.p.max_keys:
                self._evict(state)
        if semconv.is_error(span):
            state.failures[key] = [span.start_ns, span.end_ns]
            if len(state.failures) > self.p.max_keys:
                self._evict(state)
        return state, implicit, retries, attempts

    def mark(self, state: ImplicitRetryState,
             spans: Iterable[Span]) -> tuple[ImplicitRetryState, dict[str, tuple[int, int]]]:
        """:meth:`step` over one session's spans; returns ``{span_id: (retries, attempts)}`` for
        implicit retries (1, 1) and explicit ones (the gap to the chain's previous ordinal).

        >>> from tests.spans import span
        >>> tr = ImplicitRetryTracker()
        >>> spans = [span(1, tool="t", http__request__resend_count=1), span(2, tool="t", http__request__resend_count=3)]
        >>> list(tr.mark(tr.new_state(), spans)[1].values())   # 1, 3: three retries, not four
        [(1, 2), (2, 2)]
        """
        ids: dict[str, tuple[int, int]] = {}
        for s in spans:
            state, imp, n, att = self._step(state, s)
            if imp:
                ids[s.span_id] = (1, 1)
            elif n:
                ids[s.span_id] = (n, att)
        return state, ids

    def _evict(self, state: ImplicitRetryState) -> None:
        horizon = state.last_seen_ns - self._window_ns
        for k in [k for k, v in state.failures.items() if v[1] < horizon]:
            del state.failures[k]
        while len(state.failures) > self.p.max_keys:
            victim = min(state.failures, key=lambda k: (state.failures[k][1], k))
            del state.failures[victim]
        for k in [k for k, v in state.chains.items() if v[1] < horizon]:
            del state.chains[k]
        while len(state.chains) > self.p.max_keys:
            victim = min(state.chains, key=lambda k: (state.chains[k][1], k))
            del state.chains[victim]


# ----------------------------------------------------------------------------- pre-aggregation


def aggregate(spans: Iterable[Span], implicit: Iterable[str] = ()) -> dict[str, dict[str, Any]]:
    """One batch of spans (any sessions) → ``{"routes": {route: agg}, "sessions": {session: agg}}``.

    Each ``agg`` is ``{"kind": "route" | "session", "key": k, "buckets": {"<second>": bucket}}``;
    buckets are sparse (absent = zero / empty). A route bucket counts every call: ``attempts``,
    ``calls``, ``ok`` (successful calls), and its retries: ``retries``, ``implicit``, retries per
    session (``sessions``) and per tenant (``tenants``), the first/last retry time and the 3 earliest
    retry spans ``[end_ns, span_id, trace_id]``. A session bucket exists only for retries: the
    retry counts, retries per route, the sample and the tenant. ``implicit`` holds the span ids
    :class:`ImplicitRetryTracker` marked. Spans that are neither a call nor a retry are skipped.

    >>> from tests.spans import span
    >>> a = aggregate([span(3.2, tool="search", retry__attempt=1), span(3.7, tool="search")])
    >>> b = a["routes"]["tool:search"]["buckets"]["3"]
    >>> b["calls"], b["retries"], b["sessions"], b["tenants"]
    (2, 1, {'s1': 1}, {'acme': 1})
    >>> sorted(a["sessions"]["s1"]["buckets"]["3"])
    ['first', 'last', 'retries', 'routes', 'spans', 'tenant']
    """
    counts = implicit if isinstance(implicit, dict) else None
    if counts is None and not isinstance(implicit, set | frozenset):
        implicit = set(implicit)
    racc: dict[str, dict[int, dict[str, Any]]] = {}
    sacc: dict[str, dict[int, dict[str, Any]]] = {}
    sev: dict[str, list[list[Any]]] = {}  # session -> its retries, one entry each (never forwarded)
    call_route_of = semconv.call_route_of
    features = semconv.features
    for span in spans:
        f = span.feat
        if f is None:
            f = features(span)
        r = imp = 0
        att = 1
        if f.resend > 0 or f.attempt > 0:  # explicit: without the tracker, 1 retry of 2 attempts
            r, att = 1, 2
            if counts is not None:
                m = counts.get(span.span_id)
                if m is not None:
                    r, att = m
        elif implicit and span.span_id in implicit:
            r = imp = 1
        route = call_route_of(span)
        if route is None and not r:
            continue
        t = span.end_ns
        sec = t // S
        rb: dict[str, Any] | None = None
        if route is not None:
            per = racc.get(route)
            if per is None:
                per = racc[route] = {}
            rb = per.get(sec)
            if rb is None:
                rb = per[sec] = {"attempts": 0, "calls": 0}
            rb["calls"] += 1
            rb["attempts"] += att  # a chain's unexported attempts count too
            if not f.error:
                rb["ok"] = rb.get("ok", 0) + 1
        if not r:
            continue
        session = f.session
        tenant = f.tenant
        entry = [t, span.span_id, span.trace_id]
        ev = sev.get(session)
        if ev is None:
            ev = sev[session] = []
        ev.append([t, r, imp, span.span_id, span.trace_id, route])
        per = sacc.get(session)
        if per is None:
            per = sacc[session] = {}
        sb = per.get(sec)
        if sb is None:
            sb = per[sec] = {}
        _add_retry(sb, r, imp, t, entry)
        if tenant is not None and (sb.get("tenant") is None or tenant < sb["tenant"]):
            sb["tenant"] = tenant
        if rb is not None:
            _add_retry(rb, r, imp, t, entry)
            m = rb.setdefault("sessions", {})
            m[session] = m.get(session, 0) + r
            if tenant is not None:
                m = rb.setdefault("tenants", {})
                m[tenant] = m.get(tenant, 0) + r
            m = sb.setdefault("routes", {})
            m[route] = m.get(route, 0) + r
    routes: dict[str, Any] = {}
    for k, v in racc.items():
        buckets: dict[str, Any] = {}
        for t, b in v.items():  # maps and samples exist only in buckets with retries
            buckets[str(t)] = _tidy(b, ROUTE_SCHEMA) if "retries" in b else b
        routes[k] = {"kind": "route", "key": k, "buckets": buckets}
    sessions: dict[str, Any] = {}
    for k, v in sacc.items():
        buckets = {}
        for t, b in v.items():
            buckets[str(t)] = _tidy(b, SESSION_SCHEMA)
        sessions[k] = {"kind": "session", "key": k, "buckets": buckets}
        ev = sev[k]
        ev.sort(key=_EVENT_ORDER)  # event-time order (then span id: one order however batched)
        sessions[k]["events"] = ev
    return {"routes": routes, "sessions": sessions}


def _EVENT_ORDER(e: list[Any]) -> tuple[int, str]:
    return e[0], e[3]


def _add_retry(b: dict[str, Any], r: int, imp: int, t: int, entry: list[Any]) -> None:
    b["retries"] = b.get("retries", 0) + r
    if imp:
        b["implicit"] = b.get("implicit", 0) + imp
    f = b.get("first")
    if f is None or t < f:
        b["first"] = t
    f = b.get("last")
    if f is None or t > f:
        b["last"] = t
    sp = b.get("spans")
    if sp is None:
        b["spans"] = [entry]
    else:
        sp.append(entry)


def _tidy(b: dict[str, Any], sch: Schema) -> dict[str, Any]:
    for k, cap in sch.maps:
        m = b.get(k)
        if m is not None and len(m) > cap:
            b[k] = cap_map(m, cap)
    for k, size, largest in sch.samples:
        v = b.get(k)
        if v is not None and len(v) > 1:
            b[k] = canonical_sample(v, size, largest)
    return b


_SCHEMAS = {"route": ROUTE_SCHEMA, "session": SESSION_SCHEMA}


def merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Merge two aggregates — keyed ones (same ``kind`` and ``key``) or whole batches
    (``{"routes", "sessions"}``). Associative and commutative.

    >>> from tests.spans import span
    >>> x = aggregate([span(1, tool="t", retry__attempt=1)])
    >>> y = aggregate([span(1.5, tool="t", session="s2", retry__attempt=1)])
    >>> m = merge(x, y)
    >>> m["routes"]["tool:t"]["buckets"]["1"]["sessions"]
    {'s1': 1, 's2': 1}
    >>> merge(x, y) == merge(y, x)
    True
    """
    if "key" in a:
        return _merge_events(_SCHEMAS[a["kind"]].merge_keyed(a, b), a, b)
    out: dict[str, Any] = {}
    for part, kind in (("routes", "route"), ("sessions", "session")):
        sch = _SCHEMAS[kind]
        pa, pb = a.get(part, {}), b.get(part, {})
        out[part] = {}
        for k in (*pa, *(k for k in pb if k not in pa)):
            x = pa.get(k) or {"kind": kind, "key": k, "buckets": {}}
            y = pb.get(k) or {"kind": kind, "key": k, "buckets": {}}
            out[part][k] = _merge_events(sch.merge_keyed(x, y), x, y)
    return out


def _merge_events(out: dict[str, Any], a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """A session aggregate's retries (``events``): both lists, in event-time order."""
    if "events" in a or "events" in b:
        out["events"] = sorted((a.get("events") or []) + (b.get("events") or []), key=_EVENT_ORDER)
    return out


# ----------------------------------------------------------------------------- the cores


@dataclass(slots=True)
class StormState:
    """State of one route or one session. Plain containers only (pickles; JSON via dump/load).

    ``buckets`` maps event-time seconds to buckets still in (or ahead of) the window, ``closed``
    is the last second evaluated, ``win`` the window's sums.
    """

    key: str | None = None
    tenant: str | None = None
    last_seen_ns: int = 0
    closed: int | None = None
    buckets: dict[int, dict[str, Any]] = field(default_factory=dict)
    win: dict[str, Any] = field(default_factory=dict)
    late: int = 0
    episode: dict[str, Any] | None = None
    ring: list[list[Any]] = field(default_factory=list)  # sessions: the latest retries, see SessionRetryStorm


class _StormCore(Core[StormState]):
    name = NAME
    State = StormState
    scope = "route"
    schema = ROUTE_SCHEMA
    severity = "critical"

    def __init__(self, params: RetryParams | None = None) -> None:
        self.p = params or RetryParams()
        self._w = int(self.p.window_s)
        bucket_s = int(self._bucket_s())
        self._slide = Sliding(self.schema, self._w, bucket_s, fold=_FOLD)
        self._u = self._slide.unit_ns
        self._bs = bucket_s
        self._renew_every = max(1, int((self.p.breaker_ttl_s - self.p.renew_before_s) // bucket_s))
        self._idle_ns = int(self.p.idle_ttl_s * S)

    def _bucket_s(self) -> float:
        return self.p.bucket_s

    # -- state plumbing
    def new_state(self) -> StormState:
        return StormState()

    def dump(self, state: StormState) -> dict[str, Any]:
        return {
            "key": state.key,
            "tenant": state.tenant,
            "last_seen_ns": state.last_seen_ns,
            "closed": state.closed,
            "buckets": {str(t): b for t, b in state.buckets.items()},
            "win": state.win,
            "late": state.late,
            "episode": state.episode,
            **({"ring": state.ring} if state.ring else {}),
        }

    def load(self, data: dict[str, Any]) -> StormState:
        return StormState(
            key=data.get("key"),
            tenant=data.get("tenant"),
            last_seen_ns=int(data.get("last_seen_ns", 0)),
            closed=data.get("closed"),
            buckets={int(t): b for t, b in (data.get("buckets") or {}).items()},
            win=data.get("win") or {},
            late=int(data.get("late", 0)),
            episode=data.get("episode"),
            ring=[list(e) for e in data.get("ring") or ()],
        )

    def expired(self, state: StormState, watermark_ns: int) -> bool:
        """Idle for ``idle_ttl_s`` with no open episode (an open one ends by :meth:`advance` first)."""
        return state.episode is None and state.last_seen_ns + self._idle_ns < watermark_ns

    def next_deadline(self, state: StormState) -> int | None:
        """Earliest watermark (ns) at which :meth:`advance` can emit or change the window."""
        cands = []
        nxt = self._slide.next_point(state)
        if nxt is not None:
            cands.append(nxt)
        ep = state.episode
        if ep is not None:
            for t in (ep["quiet_T"], ep.get("renew_T")):
                if t is not None and (state.closed is None or t > state.closed):
                    cands.append((t + 1) * self._u)
        return min(cands) if cands else None

    # -- the core
    def step(self, state: StormState, agg: dict[str, Any], now_ns: int) -> tuple[StormState, list[Finding]]:
        """Merge one keyed aggregate, then :meth:`advance` to ``now_ns`` (the watermark)."""
        self._slide.absorb_keyed(state, agg)
        return self.advance(state, now_ns)

    def advance(self, state: StormState, watermark_ns: int) -> tuple[StormState, list[Finding]]:
        """Evaluate every window that the watermark has closed since the last call."""
        findings: list[Finding] = []
        hi = self._slide.last_complete(watermark_ns)
        ep = state.episode
        extra = () if ep is None else tuple(t for t in (ep["quiet_T"], ep.get("renew_T")) if t is not None)
        heap = self._slide.points(state, watermark_ns, extra)
        heapq.heapify(heap)
        last = None
        while heap:
            t = heapq.heappop(heap)
            if t == last:
                continue
            last = t
            entered = self._slide.move(state, t)
            f = self._evaluate(state, t, entered)
            if f is not None:
                findings.append(f)
            ep = state.episode
            if ep is not None:  # deadlines of a new or renewed episode
                for d in (ep["quiet_T"], ep.get("renew_T")):
                    if d is not None and t < d <= hi:
                        heapq.heappush(heap, d)
        self._slide.finish(state, watermark_ns)
        return state, findings

    # -- rules
    def _hot(self, win: dict[str, Any]) -> bool:
        raise NotImplementedError

    def _quiet(self, win: dict[str, Any]) -> bool:
        raise NotImplementedError

    def _evaluate(self, st: StormState, t: int, entered: dict[str, Any] | None) -> Finding | None:
        win = st.win
        ep = st.episode
        if ep is None:
            # A storm opens when new data arrives: a window that only lost data (its start slid
            # past old calls) could show a higher ratio than any window that ended with new data.
            if entered is None or not self._hot(win):
                return None
            first = min((b["first"] for b in self._slide.in_window(st) if b.get("first") is not None),
                        default=t * self._u)
            ep = st.episode = {
                "open_T": t,
                "first_ns": first,
                "last_ns": self._last(st, first),
                "reported": win.get("retries", 0),
                "quiet_T": t + self._slide.w,
                "renew_T": t + self._renew_every if self.p.renew else None,
                "renewals": 0,
                "tenant": self._command_tenant(st),
                "peak": win.get("retries", 0),
            }
            return self._finding(st, t, "open")
        retries = win.get("retries", 0)
        if entered is not None and entered.get("last", 0) > ep["last_ns"]:
            ep["last_ns"] = entered["last"]
        if retries > ep["peak"]:
            ep["peak"] = retries
        quiet = self._quiet(win)
        if quiet and t >= ep["quiet_T"]:
            f = self._finding(st, t, "resolved")
            st.episode = None
            return f
        grew = entered is not None and retries >= 2 * ep["reported"] and retries > 0
        renew = ep.get("renew_T") is not None and t >= ep["renew_T"] and not quiet
        if ep.get("renew_T") is not None and t >= ep["renew_T"]:
            ep["renew_T"] = t + self._renew_every
        if not (grew or renew):
            return None
        if grew:
            ep["reported"] = retries
        if renew:
            ep["renewals"] += 1
        return self._finding(st, t, "updated", renew=renew)

    def _last(self, st: StormState, default: int) -> int:
        return max((b["last"] for b in self._slide.in_window(st) if b.get("last") is not None), default=default)

    def _command_tenant(self, st: StormState) -> str | None:
        return st.tenant

    def _evidence(self, st: StormState, t: int) -> dict[str, Any]:
        win = st.win
        spans = win.get("spans") or []  # the latest retry spans seen, newest first
        return {
            "rule": self.scope,
            "window_s": self._w,
            "window_end": (t + 1) * self._u,
            "retries": win.get("retries", 0),
            "implicit_retries": win.get("implicit", 0),
            "span_ids": [s[1] for s in spans],
            "late_buckets": st.late,
            "_traces": sorted({s[2] for s in spans}),
        }

    def _rate_limit(self, ok: float) -> float:
        return round(max(self.p.rate_limit_floor_per_s, ok / self._w), 3)

    def _finding(self, st: StormState, t: int, status: str, renew: bool = False) -> Finding:
        raise NotImplementedError


def _top(m: dict[str, int], n: int) -> list[list[Any]]:
    items = sorted(((k, v) for k, v in m.items() if k != OVERFLOW), key=lambda kv: (-kv[1], kv[0]))
    return [[k, v] for k, v in items[:n]]


class RouteRetryStorm(_StormCore):
    """The route-keyed core (feed it ``aggregate(...)["routes"][route]``); see the module doc.

    >>> det = RouteRetryStorm()
    >>> det.name, det.scope, det.next_deadline(det.new_state())
    ('retry_storm', 'route', None)
    """

    scope = "route"
    schema = ROUTE_SCHEMA
    severity = "critical"

    def _hot(self, win: dict[str, Any]) -> bool:
        p = self.p
        r = win.get("retries", 0)
        a = win.get("attempts", 0)
        return (r >= p.route_min_retries and a > 0 and r / a >= p.route_min_ratio
                and len(win.get("sessions") or ()) >= p.route_min_sessions)

    def _quiet(self, win: dict[str, Any]) -> bool:
        p = self.p
        r = win.get("retries", 0)
        a = win.get("attempts", 0)
        return r < p.route_min_retries * p.release_fraction or (
            a > 0 and r / a < p.route_min_ratio * p.release_fraction)

    def _dominant(self, st: StormState) -> tuple[str | None, float]:
        tenants = st.win.get("tenants") or {}
        retries = st.win.get("retries", 0)
        top = _top(tenants, 1)
        if not top or not retries:
            return None, 0.0
        return top[0][0], top[0][1] / retries

    def _command_tenant(self, st: StormState) -> str | None:
        t, share = self._dominant(st)
        return t if t is not None and share >= self.p.tenant_share else None

    def _finding(self, st: StormState, t: int, status: str, renew: bool = False) -> Finding:
        ep = st.episode
        assert ep is not None
        ev = self._evidence(st, t)
        traces = ev.pop("_traces")
        win = st.win
        tenant = ep["tenant"]
        dom, share = self._dominant(st)
        ok = win.get("ok", 0)
        if tenant is not None:  # the tenant's part of what the upstream accepts
            ok = ok * share if tenant == dom else 0
        sessions = win.get("sessions") or {}
        attempts = win.get("attempts", 0)
        ev.update(
            attempts=attempts,
            calls=win.get("calls", 0),
            ok_calls=win.get("ok", 0),
            retry_ratio=round(ev["retries"] / attempts, 4) if attempts else None,
            sessions=len(sessions),
            sessions_capped=OVERFLOW in sessions,
            top_sessions=_top(sessions, 5),
            tenants=_top(win.get("tenants") or {}, 5),
            dominant_tenant=dom,
            dominant_share=round(share, 4),
            tenant_scoped=tenant is not None,
            rate_limit_per_s=self._rate_limit(ok),
            renew=renew,
            renewals=ep["renewals"],
            release=status == "resolved",
            peak_retries=ep["peak"],
        )
        route = st.key or ""
        who = f"tenant {tenant}" if tenant is not None else f"{len(sessions)} sessions"
        if status == "resolved":
            summary = f"Retry storm on route {route} is over: {ev['retries']} retries in the last {self._w} s."
        else:
            summary = (f"Retry storm on route {route}: {ev['retries']} retries "
                       f"({ev['retry_ratio']:.0%} of attempts) in {self._w} s from {who}.")
        return Finding(
            detector=NAME,
            status=status,
            severity=self.severity,
            scope_kind="route",
            scope_key=route,
            episode=str(ep["open_T"] * self._bs),
            tenant=tenant,
            session_id=None,
            workflow_id=None,
            trace_ids=traces,
            first_seen_ns=ep["first_ns"],
            last_seen_ns=ep["last_ns"],
            detected_at_ns=(t + 1) * self._u,
            summary=summary,
            evidence=ev,
            action="throttle",
            command_scope_kind="route",
            command_scope_key=route,
            reason="retry_storm:route",
        )


class SessionRetryStorm(_StormCore):
    """The session-keyed core (feed it ``aggregate(...)["sessions"][session]``; it can run in the
    session pipeline, no repartition needed).

    >>> from tests.spans import span
    >>> spans = [span(i, tool="search", retry__attempt=1) for i in range(10)]
    >>> det = SessionRetryStorm()
    >>> st, found = det.step(det.new_state(), aggregate(spans)["sessions"]["s1"], 20 * 10**9)
    >>> [(f.status, f.scope_key, f.command_scope_kind, f.evidence["retries"]) for f in found]
    [('open', 's1', 'session', 10)]
    """

    scope = "session"
    schema = _SESSION_STORE
    severity = "warning"

    def _bucket_s(self) -> float:
        return self.p.session_bucket_s

    # -- firing at the crossing
    def step(self, state: StormState, agg: dict[str, Any], now_ns: int) -> tuple[StormState, list[Finding]]:
        """Merge one keyed aggregate; open at the retry that crosses the threshold; then advance.

        A session storm opens at the retry whose window ``(t − window_s, t]`` first holds
        ``session_min_retries`` retries — at that span, not when the watermark closes its bucket
        (retries in a window only grow as data arrives: a threshold crossed is crossed). The state
        keeps its latest retries of the last window (``ring``: at most ``session_min_retries`` + 4
        short entries, for sessions that retry at all), so the check is O(1) per retry and its
        result depends on event times only. Window closes still report growth, renewals and
        the end of the episode."""
        self._slide.absorb_keyed(state, agg)
        events = agg.get("events")
        crossed = self._cross(state, events) if events else None
        state, found = self.advance(state, now_ns)
        if crossed is not None:
            found.insert(0, crossed)
        return state, found

    def _cross(self, st: StormState, events: list[list[Any]]) -> Finding | None:
        """Insert the batch's retries into the ring (event-time order); open at the earliest
        retry whose window now holds ``session_min_retries`` retries. A late retry also counts in
        the windows of later retries, so those are checked again; one in a window the watermark
        has already evaluated is left to the window path (as late buckets are)."""
        ring = st.ring
        k = self.p.session_min_retries
        cap = k + RING_SLACK
        w_ns = self._w * S
        floor = None if st.closed is None else (st.closed + 1) * self._u
        out = None
        for e in events:
            t = e[0]
            i = len(ring)
            while i and ring[i - 1][0] > t:
                i -= 1
            ring.insert(i, e)
            # no window ending at t or later holds a retry at or before t − window (earlier windows
            # were checked when their retries came): prune relative to t, never to the newest
            lo = t - w_ns
            drop = 0
            while drop < len(ring) and ring[drop][0] <= lo:
                drop += 1
            if len(ring) - drop > cap:
                drop = len(ring) - cap
            if drop:
                del ring[:drop]
            if st.episode is not None or out is not None:
                continue
            start = next((j for j, x in enumerate(ring) if x is e), None)
            if start is None:
                continue
            for j in range(start, len(ring)):
                tj = ring[j][0]
                if floor is not None and tj < floor:
                    continue
                total = 0
                for x in ring:
                    if tj - w_ns < x[0] <= tj:
                        total += x[1]
                if total >= k:
                    out = self._open_at(st, tj, total)
                    break
        return out

    def _open_at(self, st: StormState, t_ns: int, total: int) -> Finding:
        """Open the episode at the crossing retry (end time ``t_ns``), with the ring as evidence."""
        w_ns = self._w * S
        inside = [x for x in st.ring if t_ns - w_ns < x[0] <= t_ns]
        T = t_ns // self._u
        st.episode = {
            "open_T": T,
            "first_ns": inside[0][0],
            "last_ns": t_ns,
            "reported": total,
            "quiet_T": T + self._slide.w,
            "renew_T": T + self._renew_every if self.p.renew else None,
            "renewals": 0,
            "tenant": self._command_tenant(st),
            "peak": total,
        }
        routes: dict[str, int] = {}
        for x in inside:
            if x[5] is not None:
                routes[x[5]] = routes.get(x[5], 0) + x[1]
        latest = sorted(inside, key=lambda x: (-x[0], x[3]))[:SAMPLE]
        ev = {
            "rule": self.scope,
            "window_s": self._w,
            "window_end": t_ns,
            "retries": total,
            "implicit_retries": sum(x[2] for x in inside),
            "span_ids": [x[3] for x in latest],
            "late_buckets": st.late,
            "routes": _top(routes, 5),
            "rate_limit_per_s": self.p.rate_limit_floor_per_s,
            "renew": False,
            "renewals": 0,
            "release": False,
            "peak_retries": total,
            "crossed": True,
        }
        session = st.key or ""
        return Finding(
            detector=NAME,
            status="open",
            severity=self.severity,
            scope_kind="session",
            scope_key=session,
            episode=str(T * self._bs),
            tenant=st.tenant,
            session_id=session,
            workflow_id=None,
            trace_ids=sorted({x[4] for x in latest}),
            first_seen_ns=inside[0][0],
            last_seen_ns=t_ns,
            detected_at_ns=t_ns,
            summary=f"Session {session} retried {total} times in {self._w} s.",
            evidence=ev,
            action="throttle",
            command_scope_kind="session",
            command_scope_key=session,
            reason="retry_storm:session",
        )

    def _hot(self, win: dict[str, Any]) -> bool:
        return win.get("retries", 0) >= self.p.session_min_retries

    def _quiet(self, win: dict[str, Any]) -> bool:
        return win.get("retries", 0) < self.p.session_min_retries * self.p.release_fraction

    def _finding(self, st: StormState, t: int, status: str, renew: bool = False) -> Finding:
        ep = st.episode
        assert ep is not None
        ev = self._evidence(st, t)
        traces = ev.pop("_traces")
        ev.update(
            routes=_top(st.win.get("routes") or {}, 5),
            rate_limit_per_s=self.p.rate_limit_floor_per_s,
            renew=renew,
            renewals=ep["renewals"],
            release=status == "resolved",
            peak_retries=ep["peak"],
        )
        session = st.key or ""
        if status == "resolved":
            summary = f"Session {session} stopped retrying: {ev['retries']} retries in the last {self._w} s."
        else:
            summary = f"Session {session} retried {ev['retries']} times in {self._w} s."
        return Finding(
            detector=NAME,
            status=status,
            severity=self.severity,
            scope_kind="session",
            scope_key=session,
            episode=str(ep["open_T"] * self._bs),
            tenant=st.tenant,
            session_id=session,
            workflow_id=None,
            trace_ids=traces,
            first_seen_ns=ep["first_ns"],
            last_seen_ns=ep["last_ns"],
            detected_at_ns=(t + 1) * self._u,
            summary=summary,
            evidence=ev,
            action="throttle",
            command_scope_kind="session",
            command_scope_key=session,
            reason="retry_storm:session",
        )
