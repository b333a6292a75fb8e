"""cost_velocity (README "Detectors"): a session spending too fast or too much, a tenant spending unusually.

Like retry_storm, in pure parts that know nothing of Kafka:

1. :func:`aggregate` — per batch (any sessions): spans → JSON-safe aggregates keyed by session
   (1-s buckets) and by tenant (1-min buckets): cost in integer **nano-USD** (so sums are exact and
   independent of merge order), model calls, unpriced spans, the 3 costliest spans. A span's cost is
   :func:`streams.pricing.span_cost`: reported, else tokens × the policy's price table; a span that
   cannot be priced is counted in ``unpriced``, never guessed. Agent spans (``invoke_agent``,
   ``create_agent``) summarize their children and are skipped unless ``count_agent_spans``.
   :func:`merge` combines aggregates associatively and commutatively.
2. :class:`SessionCostVelocity` (keyed by session; runs in the session pipeline):
   **rate** — more than $2 within a 60-s window sliding in 5-s steps (``bucket_s``; evaluated
   once the watermark passes each step); **budget** — more than $10 in total (``reason: budget``).
   Command: ``halt`` the session. The rate episode resolves (incident only —
   ``evidence["release"]`` is False: a halt is not lifted because the halted session went quiet) once a window ≥ one window after the opening spends below half the threshold; the
   budget episode never resolves. Both update when the figure has doubled since the last report.
3. :class:`TenantCostVelocity` (keyed by tenant; needs the tenant's aggregates of all partitions):
   a learned baseline of the tenant's **per-minute spend** — event-time minutes, tumbling, each
   evaluated once the watermark passes its end. Only *active* minutes (with at least one model
   call or cost) teach the baseline: a tenant's idle time says nothing about its spending rate
   while it works, and feeding idle zeros would make every bursty tenant look anomalous.
   The baseline is an exponentially weighted mean and variance (river ``EWMean``; see
   :class:`EWBaseline`). After 15 minutes of warm-up (and ≥ 5 learned minutes) a minute is
   *anomalous* when ``z = (spend − mean) / σ ≥ 4``, where σ is floored at 25 % of the mean and at
   $0.01 (a perfectly steady tenant has σ = 0, and a doubling of its spend is then z = 4). An
   anomalous minute **fires** when it also spends ≥ $1; anomalous minutes do not teach the
   baseline — unless they last ``relearn_after_min`` (60) minutes in a row: then the new level is
   accepted, the baseline restarts its warm-up there, and the episode resolves.
   Command: ``throttle`` the tenant, ``evidence["rate_limit_per_s"]`` = the minute's model-call
   rate scaled by baseline / spend (floor 1/s). The episode resolves (incident only) at the first
   minute that is no longer anomalous at half the thresholds, or that had no activity.

Evidence: the rate (USD per minute), baseline mean / σ, z, spend, total, budget and projected
seconds to it, model calls, unpriced spans, the costliest span ids (a session: its costliest so
far; a tenant: the minute's).

>>> from tests.spans import span
>>> spans = [span(10 + i, gen_ai__request__model="m", gen_ai__usage__cost=0.3) for i in range(8)]
>>> det = SessionCostVelocity()
>>> st, found = det.step(det.new_state(), aggregate(spans)["sessions"]["s1"], 30 * 10**9)
>>> [(f.status, f.reason, f.evidence["spend_usd"]) for f in found]
[('open', 'cost_velocity:rate', 2.4)]
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Any, Iterable

from river import stats

from streams import semconv
from streams.detectors.base import Core, Finding
from streams.detectors.window import S, Schema, Sliding, canonical_sample
from streams.models import Span
from streams.pricing import PriceTable, span_cost

NAME = "cost_velocity"
MIN_NS = 60 * S
NANO = 10**9
TOP = 3

_COUNTS = ("nusd", "calls", "unpriced")
SESSION_SCHEMA = Schema(sums=_COUNTS, samples=(("top", TOP, True),), mins=("first",), maxs=("last",),
                        firsts=("tenant",))
TENANT_SCHEMA = Schema(sums=_COUNTS, samples=(("top", TOP, True),), mins=("first",), maxs=("last",))
# what the session core keeps per bucket (tenant in the state; "top" folded into the state on entry)
_SESSION_STORE = Schema(sums=_COUNTS, samples=(("top", TOP, True),), mins=("first",), maxs=("last",))


def usd(nusd: int) -> float:
    """Nano-USD → USD, rounded for display.

    >>> usd(1_234_567_891)
    1.234568
    """
    return round(nusd / NANO, 6)


# ----------------------------------------------------------------------------- parameters


@dataclass(frozen=True, slots=True)
class CostParams:
    """Parameters of cost_velocity (README "Detectors" defaults), validated once.

    >>> CostParams(z_threshold=0)
    Traceback (most recent call last):
    ...
    ValueError: z_threshold must be > 0, got 0
    >>> CostParams(fading_factor=1.5)
    Traceback (most recent call last):
    ...
    ValueError: fading_factor must be in (0, 1), got 1.5
    """

    window_s: float = 60.0
    bucket_s: float = 5.0  # the session window slides in these steps
    session_rate_usd: float = 2.0  # per window
    session_budget_usd: float = 10.0
    release_fraction: float = 0.5
    session_ttl_s: float = 1800.0
    tenant_warmup_s: float = 900.0
    tenant_min_minutes: int = 5
    z_threshold: float = 4.0
    tenant_min_spend_usd_per_min: float = 1.0
    fading_factor: float = 0.1
    min_std_ratio: float = 0.25
    min_std_usd: float = 0.01
    relearn_after_min: int = 60
    tenant_budget_usd: float | None = None
    tenant_budget_period_s: float = 86400.0
    rate_limit_floor_per_s: float = 1.0
    tenant_ttl_s: float = 21600.0

    def __post_init__(self) -> None:
        if self.window_s < 1 or self.window_s != int(self.window_s):
            raise ValueError(f"window_s must be a whole number of seconds >= 1, got {self.window_s}")
        if self.bucket_s < 1 or self.bucket_s != int(self.bucket_s) or self.window_s % self.bucket_s:
            raise ValueError(f"bucket_s must be a whole number of seconds dividing window_s, got {self.bucket_s}")
        for name in ("session_rate_usd", "session_budget_usd", "z_threshold", "min_std_usd",
                     "rate_limit_floor_per_s", "tenant_budget_period_s"):
            v = getattr(self, name)
            if not v > 0:
                raise ValueError(f"{name} must be > 0, got {v}")
        for name in ("tenant_warmup_s", "tenant_min_spend_usd_per_min", "min_std_ratio"):
            v = getattr(self, name)
            if not v >= 0:
                raise ValueError(f"{name} must be >= 0, got {v}")
        if not 0 < self.fading_factor < 1:
            raise ValueError(f"fading_factor must be in (0, 1), got {self.fading_factor}")
        if not 0 < self.release_fraction < 1:
            raise ValueError(f"release_fraction must be in (0, 1), got {self.release_fraction}")
        for name in ("tenant_min_minutes", "relearn_after_min"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 2:
                raise ValueError(f"{name} must be an integer >= 2, got {v}")
        if self.tenant_budget_usd is not None and not self.tenant_budget_usd > 0:
            raise ValueError(f"tenant_budget_usd must be > 0, got {self.tenant_budget_usd}")
        if self.session_ttl_s < self.window_s:
            raise ValueError("session_ttl_s must be >= window_s")
        if self.tenant_ttl_s < 120:
            raise ValueError("tenant_ttl_s must be >= 120")


# ----------------------------------------------------------------------------- pre-aggregation


def aggregate(spans: Iterable[Span], prices: PriceTable | None = None, *,
              count_agent_spans: bool = False) -> dict[str, dict[str, Any]]:
    """One batch of spans (any sessions) → ``{"tenants": {tenant: agg}, "sessions": {session: agg}}``.

    ``agg`` is ``{"kind": "tenant" | "session", "key": k, "buckets": {"<second | minute>": bucket}}``
    (sessions: event-time seconds, tenants: event-time minutes); buckets are sparse (absent = zero):
    ``nusd`` (nano-USD), ``calls`` (model calls), ``unpriced``, ``first``/``last`` event times and
    ``top`` (the 3 costliest spans, ``[nusd, span_id, trace_id, session]``); session buckets also
    carry the ``tenant``. Spans that neither cost nor are model calls are skipped.

    >>> from streams.pricing import PriceTable
    >>> from tests.spans import span
    >>> t = PriceTable({"gpt-4o": {"input": 2.5, "output": 10}})
    >>> a = aggregate([span(61, gen_ai__request__model="gpt-4o", gen_ai__usage__input_tokens=1000),
    ...                span(62, gen_ai__request__model="other", gen_ai__usage__input_tokens=1000)], t)
    >>> b = a["tenants"]["acme"]["buckets"]["1"]
    >>> b["nusd"], b["calls"], b["unpriced"]
    (2500000, 2, 1)
    """
    # accumulate in lists [nusd, calls, unpriced, first, last, top, tenant]; sparse dicts at the end
    tacc: dict[str, dict[int, list[Any]]] = {}
    sacc: dict[str, dict[int, list[Any]]] = {}
    operation_of = semconv.operation_of
    is_model_call = semconv.is_model_call
    session_of = semconv.session_of
    tenant_of = semconv.tenant_of
    agent_ops = semconv.AGENT_OPERATIONS
    for span in spans:
        op = operation_of(span)
        if not count_agent_spans and op in agent_ops:
            continue
        call = is_model_call(span, op)
        c = span_cost(span, prices, model_call=call)
        if c is None:
            nusd, unpriced = 0, 1
        elif c > 0:
            nusd, unpriced = int(c * NANO + 0.5), 0
        elif call:
            nusd, unpriced = 0, 0
        else:
            continue
        session = session_of(span)
        tenant = tenant_of(span)
        t = span.end_ns
        entry = [nusd, span.span_id, span.trace_id, session] if nusd else None
        for acc, key, idx in ((sacc, session, t // S), (tacc, tenant, t // MIN_NS)):
            if key is None:  # (a tenant may be unknown)
                continue
            per = acc.get(key)
            if per is None:
                per = acc[key] = {}
            a = per.get(idx)
            if a is None:
                per[idx] = [nusd, call, unpriced, t, t, [entry] if entry else None, tenant]
                continue
            a[0] += nusd
            a[1] += call
            a[2] += unpriced
            if t < a[3]:
                a[3] = t
            if t > a[4]:
                a[4] = t
            if entry:
                if a[5] is None:
                    a[5] = [entry]
                else:
                    a[5].append(entry)
            if tenant is not None and (a[6] is None or tenant < a[6]):
                a[6] = tenant
    tenants: dict[str, Any] = {}
    for k, v in tacc.items():
        buckets = {}
        for m, a in v.items():
            buckets[str(m)] = _bucket(a, False)
        tenants[k] = {"kind": "tenant", "key": k, "buckets": buckets}
    sessions: dict[str, Any] = {}
    for k, v in sacc.items():
        buckets = {}
        for t, a in v.items():
            buckets[str(t)] = _bucket(a, True)
        sessions[k] = {"kind": "session", "key": k, "buckets": buckets}
    return {"tenants": tenants, "sessions": sessions}


def _bucket(a: list[Any], with_tenant: bool) -> dict[str, Any]:
    b: dict[str, Any] = {}
    if a[0]:
        b["nusd"] = a[0]
    if a[1]:
        b["calls"] = int(a[1])
    if a[2]:
        b["unpriced"] = a[2]
    b["first"] = a[3]
    b["last"] = a[4]
    top = a[5]
    if top:
        b["top"] = canonical_sample(top, TOP, True) if len(top) > 1 else top
    if with_tenant and a[6] is not None:
        b["tenant"] = a[6]
    return b


_SCHEMAS = {"tenant": TENANT_SCHEMA, "session": SESSION_SCHEMA}


def merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Merge two aggregates — keyed ones (same ``kind`` and ``key``) or whole batches
    (``{"tenants", "sessions"}``). Associative and commutative.

    >>> from tests.spans import span
    >>> x = aggregate([span(1, gen_ai__usage__cost=0.5, gen_ai__request__model="m")])
    >>> y = aggregate([span(2, gen_ai__usage__cost=0.25, gen_ai__request__model="m", session="s2")])
    >>> merge(x, y)["tenants"]["acme"]["buckets"]["0"]["nusd"], merge(x, y) == merge(y, x)
    (750000000, True)
    """
    if "key" in a:
        return _SCHEMAS[a["kind"]].merge_keyed(a, b)
    out: dict[str, Any] = {}
    for part, kind in (("tenants", "tenant"), ("sessions", "session")):
        sch = _SCHEMAS[kind]
        pa, pb = a.get(part, {}), b.get(part, {})
        out[part] = {k: sch.merge_keyed(pa.get(k) or {"kind": kind, "key": k, "buckets": {}},
                                        pb.get(k) or {"kind": kind, "key": k, "buckets": {}})
                     for k in (*pa, *(k for k in pb if k not in pa))}
    return out


# ----------------------------------------------------------------------------- the baseline


class EWBaseline:
    """Exponentially weighted mean and variance whose state is three plain numbers.

    ``river.stats.EWVar`` computes ``Var = EWMean(x²) − EWMean(x)²`` with two EW means inside a Rust
    object whose fields cannot be read back; so the baseline keeps the two ``river.stats.EWMean``
    itself (bit-for-bit the same variance as ``EWVar``, checked by a test) and persists
    ``{"mean", "sq", "n"}``. A river ``EWMean`` takes its first value as is, so one ``update``
    rebuilds it exactly: a restored baseline yields identical z-scores.

    >>> b = EWBaseline(0.5)
    >>> for x in (1, 3, 5, 4, 6, 8, 7, 9, 11):
    ...     b.update(x)
    >>> b.mean, b.var, b.n
    (9.4296875, 3.56536865234375, 9)
    >>> c = EWBaseline.from_dict(0.5, b.to_dict())
    >>> c.update(2.0); b.update(2.0); (c.mean, c.var) == (b.mean, b.var)
    True
    """

    __slots__ = ("_m", "_q", "n", "ff")

    def __init__(self, fading_factor: float) -> None:
        self.ff = fading_factor
        self._m = stats.EWMean(fading_factor=fading_factor)
        self._q = stats.EWMean(fading_factor=fading_factor)
        self.n = 0

    def update(self, x: float) -> None:
        self._m.update(x)
        self._q.update(x * x)
        self.n += 1

    @property
    def mean(self) -> float:
        return self._m.get()

    @property
    def var(self) -> float:
        m = self._m.get()
        return self._q.get() - m * m

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self._m.get(), "sq": self._q.get(), "n": self.n}

    @classmethod
    def from_dict(cls, fading_factor: float, d: dict[str, Any] | None) -> EWBaseline:
        b = cls(fading_factor)
        if d and d.get("n"):
            b._m.update(float(d["mean"]))
            b._q.update(float(d["sq"]))
            b.n = int(d["n"])
        return b


# ----------------------------------------------------------------------------- session core


@dataclass(slots=True)
class SessionCostState:
    """One session. ``buckets``/``closed``/``win`` are the sliding window (see window.py);
    ``total_nusd`` counts every evaluated second and every late bucket."""

    key: str | None = None
    tenant: str | None = None
    first_ns: int | None = None
    last_seen_ns: int = 0
    closed: int | None = None
    buckets: dict[int, dict[str, Any]] = field(default_factory=dict)
    win: dict[str, Any] = field(default_factory=dict)
    total_nusd: int = 0
    unpriced: int = 0
    late: int = 0
    rate_ep: dict[str, Any] | None = None
    budget_ep: dict[str, Any] | None = None


class SessionCostVelocity(Core[SessionCostState]):
    """The session-keyed core (feed it ``aggregate(...)["sessions"][session]``); see the module doc.

    >>> det = SessionCostVelocity()
    >>> det.name, det.scope, det.next_deadline(det.new_state())
    ('cost_velocity', 'session', None)
    """

    name = NAME
    State = SessionCostState
    scope = "session"

    def __init__(self, params: CostParams | None = None) -> None:
        self.p = params or CostParams()
        self._w = int(self.p.window_s)
        self._slide = Sliding(_SESSION_STORE, self._w, int(self.p.bucket_s), fold=(("top", TOP, True),))
        self._u = self._slide.unit_ns
        self._rate = int(round(self.p.session_rate_usd * NANO))
        self._budget = int(round(self.p.session_budget_usd * NANO))
        self._ttl_ns = int(self.p.session_ttl_s * S)

    def new_state(self) -> SessionCostState:
        return SessionCostState()

    def dump(self, state: SessionCostState) -> dict[str, Any]:
        d = {k: getattr(state, k) for k in SessionCostState.__slots__}
        d["buckets"] = {str(t): b for t, b in state.buckets.items()}
        return d

    def load(self, data: dict[str, Any]) -> SessionCostState:
        d = {k: data[k] for k in SessionCostState.__slots__ if k in data}
        d["buckets"] = {int(t): b for t, b in (d.get("buckets") or {}).items()}
        return SessionCostState(**d)

    def expired(self, state: SessionCostState, watermark_ns: int) -> bool:
        return state.rate_ep is None and state.last_seen_ns + self._ttl_ns < watermark_ns

    def next_deadline(self, state: SessionCostState) -> int | None:
        cands = []
        nxt = self._slide.next_point(state)
        if nxt is not None:
            cands.append(nxt)
        ep = state.rate_ep
        if ep is not None and (state.closed is None or ep["quiet_T"] > state.closed):
            cands.append((ep["quiet_T"] + 1) * self._u)
        return min(cands) if cands else None

    def step(self, state: SessionCostState, agg: dict[str, Any], now_ns: int) -> tuple[SessionCostState, list[Finding]]:
        dropped, merged, buckets = self._slide.absorb_keyed(state, agg)
        if buckets:
            for b in (*dropped, *merged):  # already past evaluation: count them in the total now
                state.total_nusd += b.get("nusd", 0)
                state.unpriced += b.get("unpriced", 0)
            for b in buckets.values():
                f = b.get("first")
                if f is not None and (state.first_ns is None or f < state.first_ns):
                    state.first_ns = f
        return self.advance(state, now_ns)

    def advance(self, state: SessionCostState, watermark_ns: int) -> tuple[SessionCostState, list[Finding]]:
        """Evaluate every window the watermark has closed since the last call."""
        findings: list[Finding] = []
        hi = self._slide.last_complete(watermark_ns)
        ep = state.rate_ep
        heap = self._slide.points(state, watermark_ns, () if ep is None else (ep["quiet_T"],))
        heapq.heapify(heap)
        last = None
        while heap:
            t = heapq.heappop(heap)
            if t == last:
                continue
            last = t
            b = state.buckets.get(t)
            if b is not None and (state.closed is None or t > state.closed):
                state.total_nusd += b.get("nusd", 0)
                state.unpriced += b.get("unpriced", 0)
            entered = self._slide.move(state, t)
            findings.extend(self._evaluate(state, t, entered))
            ep = state.rate_ep
            if ep is not None and t < ep["quiet_T"] <= hi:
                heapq.heappush(heap, ep["quiet_T"])
        self._slide.finish(state, watermark_ns)
        return state, findings

    def _evaluate(self, st: SessionCostState, t: int, entered: dict[str, Any] | None) -> list[Finding]:
        out: list[Finding] = []
        spend = st.win.get("nusd", 0)
        ep = st.rate_ep
        last = None if entered is None else entered.get("last")
        if ep is None:
            if spend > self._rate:
                st.rate_ep = {"open_T": t, "first_ns": self._first(st, t), "last_ns": self._last(st, t),
                              "reported": spend, "quiet_T": t + self._slide.w}
                out.append(self._finding(st, t, "rate", "open"))
        else:
            if last is not None and last > ep["last_ns"]:
                ep["last_ns"] = last
            if spend < self._rate * self.p.release_fraction and t >= ep["quiet_T"]:
                out.append(self._finding(st, t, "rate", "resolved"))
                st.rate_ep = None
            elif spend >= 2 * ep["reported"]:
                ep["reported"] = spend
                out.append(self._finding(st, t, "rate", "updated"))
        bep = st.budget_ep
        if bep is None:
            if st.total_nusd > self._budget:
                first = st.first_ns if st.first_ns is not None else self._first(st, t)
                st.budget_ep = {"open_T": t, "first_ns": first, "last_ns": self._last(st, t),
                                "reported": st.total_nusd}
                out.append(self._finding(st, t, "budget", "open"))
        else:
            if last is not None and last > bep["last_ns"]:
                bep["last_ns"] = last
            if st.total_nusd >= 2 * bep["reported"]:
                bep["reported"] = st.total_nusd
                out.append(self._finding(st, t, "budget", "updated"))
        return out

    def _first(self, st: SessionCostState, t: int) -> int:
        return min((b["first"] for b in self._slide.in_window(st) if b.get("first") is not None), default=t * self._u)

    def _last(self, st: SessionCostState, default: int) -> int:
        return max((b["last"] for b in self._slide.in_window(st) if b.get("last") is not None), default=default)

    def _finding(self, st: SessionCostState, t: int, rule: str, status: str) -> Finding:
        ep = st.rate_ep if rule == "rate" else st.budget_ep
        assert ep is not None
        spend = st.win.get("nusd", 0)
        top = st.win.get("top") or []  # the session's costliest spans so far
        calls = st.win.get("calls", 0)
        unpriced = st.win.get("unpriced", 0)
        per_s = spend / NANO / self._w
        left = (self._budget - st.total_nusd) / NANO
        if left <= 0:
            projected: float | None = 0.0
        elif per_s > 0:
            projected = round(left / per_s, 1)
        else:
            projected = None
        ev = {
            "rule": rule,
            "window_s": self._w,
            "spend_usd": usd(spend),
            "rate_usd_per_min": round(spend / NANO * 60 / self._w, 6),
            "rate_threshold_usd": self.p.session_rate_usd,
            "total_usd": usd(st.total_nusd),
            "budget_usd": self.p.session_budget_usd,
            "projected_s_to_budget": projected,
            "calls": calls,
            "unpriced_spans": unpriced,
            "unpriced_total": st.unpriced,
            "costliest": [{"span_id": e[1], "usd": usd(e[0])} for e in top],
            "span_ids": [e[1] for e in top],
            "release": False,  # a resolved cost episode closes the incident; the halt stays
        }
        session = st.key or ""
        if rule == "budget":
            summary = (f"Session {session} has spent ${ev['total_usd']:.2f}, over its "
                       f"${self.p.session_budget_usd:.2f} budget.")
        elif status == "resolved":
            summary = f"Session {session} slowed down: ${ev['spend_usd']:.2f} in the last {self._w} s."
        else:
            summary = (f"Session {session} spent ${ev['spend_usd']:.2f} in {self._w} s "
                       f"(limit ${self.p.session_rate_usd:.2f}); ${ev['total_usd']:.2f} in total.")
        return Finding(
            detector=NAME,
            status=status,
            severity="critical",
            scope_kind="session",
            scope_key=session,
            episode=f"{rule}:{ep['open_T'] * int(self.p.bucket_s)}",
            tenant=st.tenant,
            session_id=session,
            workflow_id=None,
            trace_ids=sorted({e[2] for e in top}),
            first_seen_ns=ep["first_ns"],
            last_seen_ns=ep["last_ns"],
            detected_at_ns=(t + 1) * self._u,
            summary=summary,
            evidence=ev,
            action="halt",
            command_scope_kind="session",
            command_scope_key=session,
            reason=f"cost_velocity:{rule}",
        )


# ----------------------------------------------------------------------------- tenant core


@dataclass(slots=True)
class TenantCostState:
    """One tenant: minutes not yet evaluated, the baseline as plain numbers, the open episode."""

    key: str | None = None
    last_seen_ns: int = 0
    closed: int | None = None  # last evaluated minute
    last_active: int | None = None  # last evaluated minute with activity
    first_minute: int | None = None  # start of the (re)learning, for the warm-up
    minutes: dict[int, dict[str, Any]] = field(default_factory=dict)
    base: dict[str, Any] | None = None  # EWBaseline.to_dict()
    streak: int = 0  # consecutive anomalous minutes
    period: list[int] = field(default_factory=lambda: [-1, 0])  # [budget period index, nano-USD]
    late: int = 0
    episode: dict[str, Any] | None = None


class TenantCostVelocity(Core[TenantCostState]):
    """The tenant-keyed core (feed it ``aggregate(...)["tenants"][tenant]``); see the module doc.

    >>> from tests.spans import span
    >>> det = TenantCostVelocity()
    >>> st = det.new_state()
    >>> spans = [span(m * 60 + 5, gen_ai__usage__cost=0.2 + 0.01 * (m % 3), gen_ai__request__model="m")
    ...          for m in range(20)] + [span(20 * 60 + 5, gen_ai__usage__cost=5.0, gen_ai__request__model="m")]
    >>> st, found = det.step(st, aggregate(spans)["tenants"]["acme"], 22 * 60 * 10**9)
    >>> [(f.status, f.scope_key, f.command_scope_kind, f.evidence["rate_usd_per_min"]) for f in found]
    [('open', 'acme', 'tenant', 5.0), ('resolved', 'acme', 'tenant', 0.0)]
    """

    name = NAME
    State = TenantCostState
    scope = "tenant"

    def __init__(self, params: CostParams | None = None) -> None:
        self.p = params or CostParams()
        self._ttl_ns = int(self.p.tenant_ttl_s * S)
        self._period_min = max(1, int(self.p.tenant_budget_period_s // 60))

    def new_state(self) -> TenantCostState:
        return TenantCostState()

    def dump(self, state: TenantCostState) -> dict[str, Any]:
        d = {k: getattr(state, k) for k in TenantCostState.__slots__}
        d["minutes"] = {str(m): b for m, b in state.minutes.items()}
        return d

    def load(self, data: dict[str, Any]) -> TenantCostState:
        d = {k: data[k] for k in TenantCostState.__slots__ if k in data}
        d["minutes"] = {int(m): b for m, b in (d.get("minutes") or {}).items()}
        return TenantCostState(**d)

    def expired(self, state: TenantCostState, watermark_ns: int) -> bool:
        return (state.episode is None and not state.minutes
                and state.last_seen_ns + self._ttl_ns < watermark_ns)

    def next_deadline(self, state: TenantCostState) -> int | None:
        if state.minutes:
            return (min(state.minutes) + 1) * MIN_NS
        if state.episode is not None and state.last_active is not None:
            return (state.last_active + 2) * MIN_NS  # the first idle minute resolves the episode
        return None

    def step(self, state: TenantCostState, agg: dict[str, Any], now_ns: int) -> tuple[TenantCostState, list[Finding]]:
        if state.key is None:
            state.key = agg["key"]
        for key, b in (agg.get("buckets") or {}).items():
            m = int(key)
            if state.closed is not None and m <= state.closed:
                m = state.closed + 1  # late: counted in the first open minute, never lost
                state.late += 1
            cur = state.minutes.get(m)
            if cur is None:
                state.minutes[m] = TENANT_SCHEMA.copy(b)
            else:
                TENANT_SCHEMA.merge_into(cur, b)
            end = (int(key) + 1) * MIN_NS
            if end > state.last_seen_ns:
                state.last_seen_ns = end
        return self.advance(state, now_ns)

    def advance(self, state: TenantCostState, watermark_ns: int) -> tuple[TenantCostState, list[Finding]]:
        """Evaluate every minute the watermark has closed, in order; an open episode resolves at
        the first closed minute without activity."""
        findings: list[Finding] = []
        hi = watermark_ns // MIN_NS - 1
        for m in sorted(k for k in state.minutes if k <= hi):
            if state.episode is not None and state.last_active is not None and m > state.last_active + 1:
                findings.append(self._idle_resolve(state))
            findings.extend(self._evaluate(state, m, state.minutes.pop(m)))
        if state.episode is not None and state.last_active is not None and state.last_active + 1 <= hi:
            findings.append(self._idle_resolve(state))
        if state.closed is None or hi > state.closed:
            state.closed = hi
        return state, findings

    def _idle_resolve(self, st: TenantCostState) -> Finding:
        assert st.last_active is not None and st.episode is not None
        base = EWBaseline.from_dict(self.p.fading_factor, st.base)
        f = self._finding(st, st.last_active + 1, "resolved", TENANT_SCHEMA.empty(), 0.0, base, None, None)
        st.episode = None
        st.streak = 0
        return f

    def _evaluate(self, st: TenantCostState, m: int, b: dict[str, Any]) -> list[Finding]:
        p = self.p
        out: list[Finding] = []
        st.last_active = m
        if st.first_minute is None:
            st.first_minute = m
        period = m // self._period_min
        if st.period[0] != period:
            st.period = [period, 0]
        st.period[1] += b.get("nusd", 0)
        x = b.get("nusd", 0) / NANO
        base = EWBaseline.from_dict(p.fading_factor, st.base)
        before = EWBaseline.from_dict(p.fading_factor, st.base)  # the baseline this minute is judged by
        warm = (m - st.first_minute) * 60 >= p.tenant_warmup_s and base.n >= p.tenant_min_minutes
        z: float | None = None
        std_used: float | None = None
        if warm:
            mean = base.mean
            std = math.sqrt(max(base.var, 0.0))
            std_used = max(std, p.min_std_ratio * abs(mean), p.min_std_usd)
            z = (x - mean) / std_used
        anomalous = z is not None and z >= p.z_threshold
        fire = anomalous and x >= p.tenant_min_spend_usd_per_min
        ep = st.episode
        if anomalous:
            st.streak += 1
        else:
            st.streak = 0
            base.update(x)
            st.base = base.to_dict()
        if ep is None:
            if fire:
                st.episode = {"open_m": m, "first_ns": b.get("first") or m * MIN_NS,
                              "last_ns": b.get("last") or m * MIN_NS, "reported": x, "z": z, "peak": x}
                out.append(self._finding(st, m, "open", b, x, before, z, std_used))
        else:
            ep["last_ns"] = max(ep["last_ns"], b.get("last") or 0)
            ep["peak"] = max(ep["peak"], x)
            quiet = (z is None or z < p.z_threshold * p.release_fraction
                     or x < p.tenant_min_spend_usd_per_min * p.release_fraction)
            if quiet:
                out.append(self._finding(st, m, "resolved", b, x, before, z, std_used))
                st.episode = None
            elif fire and x >= 2 * ep["reported"]:
                ep["reported"] = x
                ep["z"] = z
                out.append(self._finding(st, m, "updated", b, x, before, z, std_used))
        if st.streak >= p.relearn_after_min:
            # a level held this long is the new normal: learn it from here, warm-up again
            if st.episode is not None:
                out.append(self._finding(st, m, "resolved", b, x, before, z, std_used, new_level=True))
                st.episode = None
            fresh = EWBaseline(p.fading_factor)
            fresh.update(x)
            st.base = fresh.to_dict()
            st.first_minute = m
            st.streak = 0
        return out

    def _finding(self, st: TenantCostState, m: int, status: str, b: dict[str, Any], x: float,
                 base: EWBaseline, z: float | None, std_used: float | None,
                 new_level: bool = False) -> Finding:
        p = self.p
        ep = st.episode
        assert ep is not None
        mean = base.mean if base.n else None
        calls = b.get("calls", 0)
        if mean is not None and x > 0:
            rate = max(p.rate_limit_floor_per_s, calls / 60 * min(1.0, mean / x))
        else:
            rate = p.rate_limit_floor_per_s
        projected: float | None = None
        if p.tenant_budget_usd is not None:
            left = p.tenant_budget_usd - st.period[1] / NANO
            projected = 0.0 if left <= 0 else (round(left / (x / 60), 1) if x > 0 else None)
        top = b.get("top") or []
        ev = {
            "rule": "tenant_baseline",
            "minute_start": m * MIN_NS,
            "rate_usd_per_min": round(x, 6),
            "baseline_mean_usd": None if mean is None else round(mean, 6),
            "baseline_std_usd": None if mean is None else round(math.sqrt(max(base.var, 0.0)), 6),
            "std_used_usd": None if std_used is None else round(std_used, 6),
            "z": None if z is None else round(z, 3),
            "z_threshold": p.z_threshold,
            "min_spend_usd_per_min": p.tenant_min_spend_usd_per_min,
            "learned_minutes": base.n,
            "calls": calls,
            "unpriced_spans": b.get("unpriced", 0),
            "period_spend_usd": usd(st.period[1]),
            "budget_usd": p.tenant_budget_usd,
            "projected_s_to_budget": projected,
            "projected_usd_per_day": round(x * 1440, 2),
            "rate_limit_per_s": round(rate, 3),
            "costliest": [{"span_id": e[1], "session_id": e[3], "usd": usd(e[0])} for e in top],
            "span_ids": [e[1] for e in top],
            "peak_usd_per_min": round(ep["peak"], 6),
            "new_level": new_level,
            "release": False,  # a resolved cost episode closes the incident; the throttle stays
        }
        tenant = st.key or ""
        if status == "resolved":
            why = "its new spending level became the baseline" if new_level else "spend is back near its baseline"
            summary = f"Tenant {tenant}: {why} (${x:.2f} in the last minute)."
        else:
            base_txt = f"${mean:.2f}" if mean is not None else "n/a"
            summary = (f"Tenant {tenant} spent ${x:.2f} in one minute, {ev['z']}σ above its "
                       f"baseline of {base_txt}/min.")
        return Finding(
            detector=NAME,
            status=status,
            severity="critical",
            scope_kind="tenant",
            scope_key=tenant,
            episode=f"tenant:{ep['open_m']}",
            tenant=tenant,
            session_id=None,
            workflow_id=None,
            trace_ids=sorted({e[2] for e in top}),
            first_seen_ns=ep["first_ns"],
            last_seen_ns=ep["last_ns"],
            detected_at_ns=(m + 1) * MIN_NS,
            summary=summary,
            evidence=ev,
            action="throttle",
            command_scope_kind="tenant",
            command_scope_key=tenant,
            reason="cost_velocity:tenant",
        )
