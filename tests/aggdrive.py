"""Run the aggregate-fed cores (retry_storm, cost_velocity) the way replay and the live worker do:
the session stage and the scope stage, each through the one keyed runner (streams.runner), with the
cores' parameters and prices given directly, and the cores' findings collected (before the policy
turns them into records).

Used by the unit tests to check rules and that findings do not depend on batching.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from streams.detectors import cost, retry
from streams.detectors.base import Finding
from streams.models import Span
from streams.policy import Policy
from streams.pricing import PriceTable
from streams.runner import EventClock, MemoryStore
from streams.stages import build_stages, group, merge_forwards, runner_for

S = 10**9


def run(spans: list[Span], batch: int | None = None, *, retry_params: retry.RetryParams | None = None,
        cost_params: cost.CostParams | None = None, prices: PriceTable | None = None, lateness_s: float = 5.0,
        timers: bool = True) -> list[Finding]:
    """Findings of every session / route / tenant core, in the order they were made.

    ``timers=False`` also advances every key at every batch (not only when its deadline is due):
    the same findings prove the deadlines complete."""
    policy = Policy()
    sess, scope = (s for s in build_stages(policy) if s.name in ("session", "scope"))
    if retry_params is not None:
        sess.session_retry = retry.SessionRetryStorm(retry_params)
        scope.cores["route"] = retry.RouteRetryStorm(retry_params)
    if cost_params is not None:
        sess.session_cost = cost.SessionCostVelocity(cost_params)
        scope.cores["tenant"] = cost.TenantCostVelocity(cost_params)
    sess.prices = prices
    found: list[Finding] = []
    sess.tap = scope.tap = found.extend
    runners = [runner_for(sess, policy, MemoryStore()), runner_for(scope, policy, MemoryStore())]
    clock = EventClock(int(lateness_s * S))
    n = batch or max(1, len(spans))
    for i in range(0, len(spans), n):
        part = spans[i:i + n]
        wm = clock.observe(0, max(s.end_ns for s in part))
        fwd = merge_forwards(runners[0].feed(0, group(sess, part), wm))
        runners[1].feed(0, fwd, wm)
        for r in runners:
            r.fire(0, wm)
            if not timers:
                states = r.store.states
                for key, st in list(states.items()):
                    states[key], _ = r.stage.advance(st, wm)
    for r in runners:
        r.finish()
    return found


def canon(findings: list[Finding]) -> list[dict[str, Any]]:
    """Findings in a batching-independent order (what a wiring would sort its outputs by)."""
    rows = [asdict(f) for f in findings]
    return sorted(rows, key=lambda r: (r["detected_at_ns"], r["detector"], r["scope_kind"], r["scope_key"],
                                       r["episode"], r["status"]))


def brief(findings: list[Finding]) -> list[tuple[str, str, str, str]]:
    return [(r["scope_kind"], r["scope_key"], r["status"], r["reason"]) for r in canon(findings)]
