"""The policy: detector parameters, per-tenant overrides, modes, and finding → incident/command.

A policy file is TOML::

    [detectors.no_progress_loop]
    mode = "enforce"            # enforce | shadow | off
    repeat_threshold = 3

    [tenants.acme.detectors.no_progress_loop]
    mode = "shadow"

Unknown keys are errors that name the key (a typo must not silently keep a default). So is a
per-tenant key that no detector reads per tenant (:data:`TENANT_KEYS`): the route- and
tenant-scoped cores, and the trace and workflow cores, are built once from the global section, so
only modes and breaker TTLs (and every ``no_progress_loop`` key) can differ by tenant.

>>> p = Policy.from_toml('[detectors.no_progress_loop]\\nrepeat_threshold = 4\\n'
...                      '[tenants.acme.detectors.no_progress_loop]\\nmode = "shadow"\\n')
>>> p.loop_params("acme").repeat_threshold, p.mode("no_progress_loop", "acme")
(4, 'shadow')
>>> p.mode("no_progress_loop", "other")
'enforce'
"""

from __future__ import annotations

import hashlib
import tomllib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from streams.detectors.base import Finding
from streams.detectors.cost import CostParams
from streams.detectors.deadlock import DeadlockParams
from streams.detectors.loop import LoopParams
from streams.detectors.retry import RetryParams
from streams.detectors.silent import SilentParams
from streams.pricing import PriceTable
from streams.models import BreakerCommand, CommandScope, Incident, IncidentScope

Mode = Literal["enforce", "shadow", "off"]


class PolicyError(ValueError):
    """A policy file that cannot be used; the message names the offending key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LoopPolicy(_Strict):
    mode: Mode = "enforce"
    repeat_threshold: int = Field(3, ge=2)
    window_s: float = Field(600.0, gt=0)
    cycle_min: int = Field(2, ge=2)
    cycle_max: int = Field(4, ge=2)
    cycle_repeats: int = Field(3, ge=2)
    stagnation_chats: int = Field(5, ge=2)
    breaker_ttl_s: float = Field(900.0, gt=0)
    session_ttl_s: float = Field(1800.0, gt=0)
    max_fingerprints: int = Field(256, ge=8)

    def params(self) -> LoopParams:
        return LoopParams(**self.model_dump(exclude={"mode", "breaker_ttl_s"}))


class DeadlockPolicy(_Strict):
    mode: Mode = "enforce"
    breaker_ttl_s: float = Field(1800.0, gt=0)
    dangling_after_s: float = Field(300.0, gt=0)
    workflow_ttl_s: float = Field(3600.0, gt=0)
    max_steps: int = Field(20_000, ge=10)

    def params(self) -> DeadlockParams:
        return DeadlockParams(**self.model_dump(exclude={"mode", "breaker_ttl_s"}))


class SilentPolicy(_Strict):
    mode: Mode = "enforce"
    breaker_ttl_s: float = Field(600.0, gt=0)
    grace_s: float = Field(30.0, gt=0)
    retention_s: float = Field(600.0, gt=0)
    orphan_ttl_s: float = Field(1800.0, gt=0)

    def params(self) -> SilentParams:
        return SilentParams(**self.model_dump(exclude={"mode", "breaker_ttl_s"}))


class RetryPolicy(_Strict):
    mode: Mode = "enforce"
    breaker_ttl_s: float = Field(120.0, gt=0)
    window_s: float = Field(60.0, ge=1)
    route_min_retries: int = Field(20, ge=1)
    route_min_sessions: int = Field(5, ge=1)
    route_min_ratio: float = Field(0.25, gt=0, le=1)
    session_min_retries: int = Field(10, ge=1)
    implicit_retry_window_s: float = Field(30.0, gt=0)
    tenant_share: float = Field(0.8, gt=0, le=1)
    release_fraction: float = Field(0.5, gt=0, le=1)
    renew: bool = True
    rate_limit_floor_per_s: float = Field(1.0, gt=0)

    def params(self) -> RetryParams:
        return RetryParams(**self.model_dump(exclude={"mode", "implicit_retry_window_s"}))


class CostPolicy(_Strict):
    mode: Mode = "enforce"
    breaker_ttl_s: float = Field(900.0, gt=0, description="session halt TTL")
    tenant_breaker_ttl_s: float = Field(600.0, gt=0, description="tenant throttle TTL")
    window_s: float = Field(60.0, gt=0)
    session_rate_usd: float = Field(2.0, gt=0)
    session_budget_usd: float = Field(10.0, gt=0)
    session_ttl_s: float = Field(1800.0, gt=0)
    tenant_warmup_s: float = Field(900.0, ge=0)
    z_threshold: float = Field(4.0, gt=0)
    tenant_min_spend_usd_per_min: float = Field(1.0, ge=0)
    fading_factor: float = Field(0.1, gt=0, lt=1)
    rate_limit_floor_per_s: float = Field(1.0, gt=0)

    def params(self) -> CostParams:
        return CostParams(**self.model_dump(exclude={"mode", "breaker_ttl_s", "tenant_breaker_ttl_s"}))


DETECTOR_POLICIES: dict[str, type[_Strict]] = {
    "no_progress_loop": LoopPolicy,
    "retry_storm": RetryPolicy,
    "cost_velocity": CostPolicy,
    "plan_deadlock": DeadlockPolicy,
    "silent_success": SilentPolicy,
}


#: The keys of each detector's section that take effect per tenant (``[tenants.T.detectors.D]``).
#: ``mode`` and the breaker TTLs are read with the finding's tenant (:func:`apply`); no_progress_loop
#: builds a core per tenant (``loop_params(tenant)``). The other detectors' thresholds and windows
#: are read once, from the global section (streams/stages.py, streams/pipeline.py), so a tenant value
#: would be accepted and silently ignored: loading it is an error that names it.
TENANT_KEYS: dict[str, frozenset[str]] = {
    "no_progress_loop": frozenset(LoopPolicy.model_fields),
    "retry_storm": frozenset({"mode", "breaker_ttl_s"}),
    "cost_velocity": frozenset({"mode", "breaker_ttl_s", "tenant_breaker_ttl_s"}),
    "plan_deadlock": frozenset({"mode", "breaker_ttl_s"}),
    "silent_success": frozenset({"mode", "breaker_ttl_s"}),
}


class DetectorPolicies(_Strict):
    no_progress_loop: LoopPolicy = LoopPolicy()
    retry_storm: RetryPolicy = RetryPolicy()
    cost_velocity: CostPolicy = CostPolicy()
    plan_deadlock: DeadlockPolicy = DeadlockPolicy()
    silent_success: SilentPolicy = SilentPolicy()


class PartialDetectorPolicies(_Strict):
    no_progress_loop: dict[str, Any] = {}
    retry_storm: dict[str, Any] = {}
    cost_velocity: dict[str, Any] = {}
    plan_deadlock: dict[str, Any] = {}
    silent_success: dict[str, Any] = {}


class TenantPolicy(_Strict):
    detectors: PartialDetectorPolicies = PartialDetectorPolicies()


class Price(_Strict):
    input: float = Field(ge=0, description="USD per million input tokens")
    output: float = Field(ge=0, description="USD per million output tokens")
    cached: float | None = Field(None, ge=0, description="USD per million cached input tokens")


class PolicyFile(_Strict):
    allowed_lateness_s: float = Field(5.0, ge=0)
    max_clock_skew_s: float = Field(
        900.0, gt=0, description="a span ending further than this AHEAD of the wall clock (live) or of the "
        "stream's median time (replay) is rejected as clock_skew")
    max_span_age_s: float = Field(
        86400.0, gt=0, description="a span ending further than this BEHIND the wall clock (live) or the "
        "stream's median time (replay) is rejected as clock_skew; a later one is late data, judged by "
        "each detector's own window")
    detectors: DetectorPolicies = DetectorPolicies()
    tenants: dict[str, TenantPolicy] = {}
    prices: dict[str, Price] = {}
    default_prices: bool = Field(
        True, description="price models the table lacks from the bundled genai-prices data")


def _fmt_errors(exc: ValidationError) -> str:
    parts = []
    for e in exc.errors():
        loc = ".".join(str(x) for x in e["loc"])
        parts.append(f"{loc}: {e['msg']}")
    return "; ".join(parts)


class Policy:
    """Validated policy with per-tenant views of every detector's section."""

    def __init__(self, spec: PolicyFile | None = None) -> None:
        self.spec = spec or PolicyFile()
        self._prices: PriceTable | None = None
        # (detector, tenant or None) -> merged section
        self._sections: dict[tuple[str, str | None], Any] = {}
        for det in DETECTOR_POLICIES:
            self._sections[(det, None)] = getattr(self.spec.detectors, det)
        for tenant, tp in self.spec.tenants.items():
            for det, cls in DETECTOR_POLICIES.items():
                override = getattr(tp.detectors, det)
                if not override:
                    continue
                try:
                    merged = {**getattr(self.spec.detectors, det).model_dump(), **override}
                    self._sections[(det, tenant)] = cls(**merged)
                except ValidationError as exc:
                    raise PolicyError(f"tenants.{tenant}.detectors.{det}: {_fmt_errors(exc)}") from exc
                ignored = sorted(k for k in override if k not in TENANT_KEYS[det])
                if ignored:
                    allowed = ", ".join(sorted(TENANT_KEYS[det]))
                    raise PolicyError(
                        f"tenants.{tenant}.detectors.{det}.{ignored[0]}: not applied per tenant (this detector "
                        f"reads it once, from [detectors.{det}]); per-tenant keys of {det}: {allowed}")

    @classmethod
    def from_toml(cls, text: str) -> Policy:
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise PolicyError(f"policy is not valid TOML: {exc}") from exc
        try:
            return cls(PolicyFile.model_validate(raw))
        except ValidationError as exc:
            raise PolicyError(_fmt_errors(exc)) from exc

    @classmethod
    def load(cls, path: str | Path | None) -> Policy:
        if path is None:
            return cls()
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as exc:
            raise PolicyError(f"policy file {p}: {exc.strerror}") from exc
        try:
            return cls.from_toml(text)
        except PolicyError as exc:
            raise PolicyError(f"policy file {p}: {exc}") from exc

    @property
    def max_clock_skew_ns(self) -> int:
        return int(self.spec.max_clock_skew_s * 1e9)

    @property
    def max_span_age_ns(self) -> int:
        return int(self.spec.max_span_age_s * 1e9)

    @property
    def allowed_lateness_ns(self) -> int:
        return int(self.spec.allowed_lateness_s * 1e9)

    def section(self, detector: str, tenant: str | None) -> Any:
        """The detector's policy section for a tenant (its overrides merged over the defaults)."""
        sec = self._sections.get((detector, tenant))
        return sec if sec is not None else self._sections[(detector, None)]

    def loop_policy(self, tenant: str | None) -> LoopPolicy:
        return self.section("no_progress_loop", tenant)

    def loop_params(self, tenant: str | None) -> LoopParams:
        return self.loop_policy(tenant).params()

    def mode(self, detector: str, tenant: str | None) -> Mode:
        return self.section(detector, tenant).mode

    def breaker_ttl_s(self, detector: str, tenant: str | None, scope_kind: str | None = None) -> float:
        sec = self.section(detector, tenant)
        if detector == "cost_velocity" and scope_kind == "tenant":
            return sec.tenant_breaker_ttl_s
        return sec.breaker_ttl_s

    def price_table(self) -> PriceTable:
        if self._prices is None:
            self._prices = PriceTable(self.spec.prices, defaults=self.spec.default_prices)
        return self._prices

    def max_ttl_s(self, detector: str, field_name: str) -> float:
        """The largest value of a TTL-like field over the defaults and every tenant (for eviction)."""
        return max(getattr(sec, field_name) for (det, _), sec in self._sections.items() if det == detector)


# ----------------------------------------------------------------------------- finding → outputs


def rfc3339(ns: int) -> str:
    """Event time in ns → RFC 3339 UTC with microseconds (fixed width, so output is byte-stable).

    >>> rfc3339(1_700_000_000_123_456_789)
    '2023-11-14T22:13:20.123456Z'
    """
    return datetime.fromtimestamp(ns // 1000 / 1e6, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def stable_id(prefix: str, *parts: object) -> str:
    """Deterministic id from the parts of an episode.

    >>> stable_id("inc", "no_progress_loop", "session", "s1", 5) == stable_id("inc", "no_progress_loop", "session", "s1", 5)
    True
    """
    h = hashlib.blake2b("\x1f".join(str(p) for p in parts).encode(), digest_size=12).hexdigest()
    return f"{prefix}-{h}"


def apply(policy: Policy, f: Finding) -> tuple[Incident | None, BreakerCommand | None]:
    """Turn one finding into an incident and, when the episode opens, a breaker command.

    Mode ``off`` publishes nothing; ``shadow`` publishes the command with ``mode: shadow``.
    """
    mode = policy.mode(f.detector, f.tenant)
    if mode == "off":
        return None, None
    incident_id = stable_id("inc", f.detector, f.scope_kind, f.scope_key, f.episode)
    command: BreakerCommand | None = None
    command_id: str | None = None
    if f.action is not None:
        command_id = stable_id("cmd", incident_id, f.action, f.command_scope_kind, f.command_scope_key)
        renewal = f.status == "updated" and bool(f.evidence.get("renew"))
        if renewal:  # a storm outlasting its TTL: the same command again, with a later expiry
            command_id = stable_id("cmd", command_id, "renewal", f.detected_at_ns)
        if f.status == "open" or renewal:
            ttl_ns = int(policy.breaker_ttl_s(f.detector, f.tenant, f.command_scope_kind) * 1e9)
            rate = f.evidence.get("rate_limit_per_s") if f.action == "throttle" else None
            command = BreakerCommand(
                command_id=command_id,
                action=f.action,
                scope=CommandScope(kind=f.command_scope_kind, key=f.command_scope_key, tenant=f.tenant),
                mode=mode,
                reason=f.reason,
                detector=f.detector,
                incident_id=incident_id,
                issued_at=rfc3339(f.detected_at_ns),
                expires_at=rfc3339(f.detected_at_ns + ttl_ns),
                rate_limit_per_s=float(rate) if rate is not None else (1.0 if f.action == "throttle" else None),
            )
    incident = Incident(
        incident_id=incident_id,
        detector=f.detector,  # type: ignore[arg-type]
        severity=f.severity,  # type: ignore[arg-type]
        status=f.status,  # type: ignore[arg-type]
        scope=IncidentScope(kind=f.scope_kind, key=f.scope_key),  # type: ignore[arg-type]
        tenant=f.tenant,
        session_id=f.session_id,
        workflow_id=f.workflow_id,
        trace_ids=list(f.trace_ids),
        first_seen=rfc3339(f.first_seen_ns),
        last_seen=rfc3339(f.last_seen_ns),
        detected_at=rfc3339(f.detected_at_ns),
        summary=f.summary,
        evidence=f.evidence,
        breaker_command_id=command_id,
        policy_mode=mode,
    )
    return incident, command


def release(policy: Policy, active: Any, at_ns: int, reason: str) -> BreakerCommand:
    """The ``release`` of a command in force (``active``: a :class:`streams.pipeline.ActiveCommand`).

    >>> from streams.pipeline import ActiveCommand
    >>> active = ActiveCommand("cmd-1", 5, "inc-1", "no_progress_loop", "session", "s1", "t", "enforce")
    >>> c = release(Policy(), active, 10**9, "expired")
    >>> c.action, c.scope.key, c.reason, c.command_id == release(Policy(), active, 0, "resolved").command_id
    ('release', 's1', 'expired', True)
    """
    command_id, incident_id, detector = active.command_id, active.incident_id, active.detector
    kind, key, tenant, mode = active.scope_kind, active.scope_key, active.tenant, active.mode
    return BreakerCommand(
        command_id=stable_id("cmd", command_id, "release"),
        action="release",
        scope=CommandScope(kind=kind, key=key, tenant=tenant),
        mode=mode,
        reason=reason,
        detector=detector,
        incident_id=incident_id,
        issued_at=rfc3339(at_ns),
        expires_at=None,
    )
