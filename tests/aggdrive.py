"""A reference driver for the aggregate-fed cores (retry_storm, cost_velocity), as the wiring runs
them: per batch, the session pipeline marks implicit retries (per session, arrival order) and
pre-aggregates; the keyed aggregates go to the route / session / tenant cores with the watermark
(max event time − lateness); keys not in the batch are advanced when their deadline is due.

Used by the unit tests to check that findings do not depend on batching.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Iterable

from streams import semconv
from streams.detectors import cost, retry
from streams.detectors.base import Finding
from streams.models import Span
from streams.pricing import PriceTable

S = 10**9
END = 1 << 62


class Drive:
    def __init__(self, retry_params: retry.RetryParams | None = None, cost_params: cost.CostParams | None = None,
                 prices: PriceTable | None = None, lateness_s: float = 5.0, timers: bool = True) -> None:
        self.tracker = retry.ImplicitRetryTracker()
        self.cores: dict[str, Any] = {
            "route_retry": retry.RouteRetryStorm(retry_params),
            "session_retry": retry.SessionRetryStorm(retry_params),
            "session_cost": cost.SessionCostVelocity(cost_params),
            "tenant_cost": cost.TenantCostVelocity(cost_params),
        }
        self.prices = prices
        self.lateness_ns = int(lateness_s * S)
        self.timers = timers  # True: advance idle keys only when next_deadline() is due
        self.trk: dict[str, Any] = {}
        self.states: dict[tuple[str, str], Any] = {}
        self.max_ns = 0
        self.findings: list[Finding] = []

    def feed(self, batch: list[Span]) -> None:
        implicit: dict[str, tuple[int, int]] = {}
        for s in batch:
            sid = semconv.session_of(s)
            st = self.trk.get(sid) or self.tracker.new_state()
            st, marks = self.tracker.mark(st, [s])
            self.trk[sid] = st
            implicit.update(marks)
            self.max_ns = max(self.max_ns, s.end_ns)
        wm = self.max_ns - self.lateness_ns
        ra = retry.aggregate(batch, implicit)
        ca = cost.aggregate(batch, self.prices)
        touched = set()
        for core, part in (("route_retry", ra["routes"]), ("session_retry", ra["sessions"]),
                           ("session_cost", ca["sessions"]), ("tenant_cost", ca["tenants"])):
            for key, agg in part.items():
                self._step(core, key, agg, wm)
                touched.add((core, key))
        self.tick(wm, skip=touched)

    def _step(self, core: str, key: str, agg: dict[str, Any], wm: int) -> None:
        det = self.cores[core]
        st = self.states.get((core, key)) or det.new_state()
        st, fs = det.step(st, agg, wm)
        self.states[(core, key)] = st
        self.findings.extend(fs)

    def tick(self, wm: int, skip: Iterable[tuple[str, str]] = ()) -> None:
        skip = set(skip)
        for k, st in list(self.states.items()):
            if k in skip:
                continue
            det = self.cores[k[0]]
            if self.timers:
                d = det.next_deadline(st)
                if d is None or d > wm:
                    continue
            st, fs = det.advance(st, wm)
            self.states[k] = st
            self.findings.extend(fs)

    def finish(self) -> list[Finding]:
        self.tick(END)
        return self.findings


def run(spans: list[Span], batch: int | None = None, **kw: Any) -> list[Finding]:
    d = Drive(**kw)
    n = batch or max(1, len(spans))
    for i in range(0, len(spans), n):
        d.feed(spans[i:i + n])
    return d.finish()


def canon(findings: list[Finding]) -> list[dict[str, Any]]:
    """Findings in a batching-independent order (what a wiring would sort its outputs by)."""
    rows = [asdict(f) for f in findings]
    return sorted(rows, key=lambda r: (r["detected_at_ns"], r["detector"], r["scope_kind"], r["scope_key"],
                                       r["episode"], r["status"]))


def brief(findings: list[Finding]) -> list[tuple[str, str, str, str]]:
    return [(r["scope_kind"], r["scope_key"], r["status"], r["reason"]) for r in canon(findings)]
