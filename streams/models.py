"""Data contracts of Breakwater (README "What producers send", §5, §6).

Two kinds of types live here:

* :class:`Span` — the normalized span every detector reads.  It is a slotted dataclass, not a
  pydantic model, because it is built once per span on the hot path (README "Measured": a pydantic
  validation costs ≈7 µs, a slotted dataclass a fraction of that).  Its wire form on the internal
  repartition topic is :meth:`Span.to_wire` / :meth:`Span.from_wire` (plain orjson).
* pydantic models for everything that crosses a topic boundary to users: :class:`Incident`,
  :class:`BreakerCommand`, and :class:`FlatSpanIn` (the documented input shape of ``agent.spans``).
  ``breakwater schemas`` writes their JSON Schemas to ``schemas/``; a test fails on drift.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1

Status = Literal["OK", "ERROR", "UNSET"]


@dataclass(slots=True)
class SpanEvent:
    """One span event (``name``, ``time_ns``, flat ``attributes``).

    >>> SpanEvent("plan.step", 5, {"plan.step.id": "a"}).attributes["plan.step.id"]
    'a'
    """

    name: str
    time_ns: int
    attributes: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Features:
    """Everything a detector reads from one span, in one compact record, made once at ingest.

    :mod:`streams.ingest.dialects` fills it from whichever producer dialect the span speaks (OTel
    GenAI conventions, OpenInference, OpenLLMetry, pydantic-ai, LiteLLM, LangSmith); detectors never
    read raw attributes for these. ``resend`` / ``attempt`` are retry ordinals, -1 when absent
    (0: an explicit first attempt). ``cost`` is the cost the producer reported (None: not reported).
    ``req_tool`` / ``req_hash``: the tool call(s) a model span's output requested (name, argument
    hash; set on model spans only, never on tool or agent spans) — the only trace of a tool call for
    producers that emit no tool spans (LiteLLM).

    >>> f = Features("s1", "acme", "t1", "execute_tool", "search", "h1", None, None, None,
    ...              0, 0, 0, None, -1, -1, False, False, False, None, None, None)
    >>> f.fingerprint
    ('search', 'h1')
    """

    session: str
    tenant: str | None
    workflow: str
    op: str | None
    tool: str | None
    arg_hash: str | None
    provider: str | None
    request_model: str | None
    response_model: str | None
    input_tokens: int
    output_tokens: int
    cached_tokens: int
    cost: float | None
    resend: int
    attempt: int
    error: bool
    mutation: bool
    verified: bool
    outcome: str | None
    approval: str | None
    state_hash: str | None
    req_tool: str | None = None
    req_hash: str | None = None

    @property
    def fingerprint(self) -> tuple[str | None, str | None]:
        return (self.tool, self.arg_hash)


@dataclass(slots=True)
class Span:
    """A normalized span (README "What producers send").

    ``attributes`` and ``resource`` are flat dicts with dotted keys.  Raw prompts, completions and
    tool arguments never reach this object: ingest replaces tool arguments by their hash
    (``tool.payload_hash``) and drops content attributes.

    >>> s = Span("t1", "s1", None, "tool", "INTERNAL", 0, 1_000, "OK", "",
    ...          {"gen_ai.tool.name": "search"}, {"service.name": "svc"})
    >>> s.attr("gen_ai.tool.name"), s.attr("service.name")
    ('search', 'svc')
    >>> Span.from_wire(s.to_wire()) == s
    True
    """

    trace_id: str
    span_id: str
    parent_span_id: str | None
    name: str
    kind: str
    start_ns: int
    end_ns: int
    status: str  # OK | ERROR | UNSET
    status_message: str
    attributes: dict[str, Any]
    resource: dict[str, Any]
    events: list[SpanEvent] = field(default_factory=list)
    # what the detectors read, made once from the attributes (:func:`streams.semconv.features`)
    feat: Features | None = field(default=None, compare=False, repr=False)

    def attr(self, key: str, default: Any = None) -> Any:
        """Span attribute, else resource attribute, else ``default`` (span wins, README "What producers send")."""
        v = self.attributes.get(key)
        if v is None:
            v = self.resource.get(key, default)
        return v

    def to_wire(self) -> list[Any]:
        """Compact positional form for the internal repartition topics.

        With its features record made (ingest makes it before re-keying), a span travels as its
        features plus only the raw attributes a detector still reads (the plan ones,
        :data:`WIRE_ATTRIBUTES`, and ``plan.step`` events): no other attribute, resource attribute
        or status message leaves ingest, and the stages do not extract features again.

        >>> s = Span("t", "s", None, "x", "INTERNAL", 0, 1, "OK", "", {"a": 1, "plan.step.id": "p"}, {"r": 2})
        >>> s.feat = Features("s1", None, "t", None, None, None, None, None, None, 0, 0, 0, None, -1, -1,
        ...                   False, False, False, None, None, None)
        >>> w = Span.from_wire(s.to_wire())
        >>> w.attributes, w.resource, w.feat == s.feat
        ({'plan.step.id': 'p'}, {}, True)
        """
        f = self.feat
        if f is not None:
            a = self.attributes
            return [
                self.trace_id, self.span_id, self.parent_span_id, self.name, self.kind, self.start_ns,
                self.end_ns, self.status, "",
                {k: a[k] for k in WIRE_ATTRIBUTES if k in a} if not a.keys() <= WIRE_ATTRIBUTES else a,
                {},
                [[e.name, e.time_ns, e.attributes] for e in self.events if e.name == "plan.step"],
                [getattr(f, k) for k in _FEATURE_FIELDS],
            ]
        return [
            self.trace_id,
            self.span_id,
            self.parent_span_id,
            self.name,
            self.kind,
            self.start_ns,
            self.end_ns,
            self.status,
            self.status_message,
            self.attributes,
            self.resource,
            [[e.name, e.time_ns, e.attributes] for e in self.events],
        ]

    @classmethod
    def from_wire(cls, w: list[Any]) -> Span:
        """Inverse of :meth:`to_wire`."""
        s = cls(
            w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7], w[8], w[9], w[10],
            [SpanEvent(e[0], e[1], e[2]) for e in w[11]],
        )
        if len(w) > 12:
            s.feat = Features(*w[12])
        return s


WIRE_ATTRIBUTES = frozenset({"plan.steps", "plan.revision", "plan.step.id", "plan.step.depends_on",
                             "plan.step.waiting_on"})
"""The raw attributes that travel past ingest (plan_deadlock reads them); all else is features."""
_FEATURE_FIELDS = tuple(Features.__dataclass_fields__)


@dataclass(slots=True)
class Rejection:
    """Input that could not become a span: routed to the DLQ (live) or counted (replay).

    ``reason`` is a short stable code (``oversized``, ``not_utf8``, ``bad_json``, ``bad_span``,
    ``too_many_attributes``, ``too_deep``, ``bad_id``, ``bad_timestamp``, ``bad_otlp``, …);
    ``detail`` is a human sentence that never contains payload content.

    >>> Rejection("bad_json", "line 1: expected value").reason
    'bad_json'
    """

    reason: str
    detail: str
    index: int | None = None  # position of the bad span inside a batch, when known


# ----------------------------------------------------------------------------- user-facing models


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class IncidentScope(_Frozen):
    """What an incident is about."""

    kind: Literal["session", "tenant", "workflow", "trace", "route"]
    key: str


class CommandScope(_Frozen):
    """What a breaker command applies to; ``tenant`` narrows route/tool scopes."""

    kind: Literal["session", "tenant", "workflow", "route", "tool"]
    key: str
    tenant: str | None = None


class Incident(_Frozen):
    """Value on ``agent.incidents`` (schemas/agent.incidents.schema.json), keyed by ``incident_id``.

    >>> i = Incident(incident_id="inc-1", detector="no_progress_loop", severity="critical",
    ...     status="open", scope=IncidentScope(kind="session", key="s1"), tenant="t",
    ...     session_id="s1", workflow_id=None, trace_ids=["t1"],
    ...     first_seen="2026-01-01T00:00:00.000000Z", last_seen="2026-01-01T00:00:01.000000Z",
    ...     detected_at="2026-01-01T00:00:01.000000Z", summary="loop", evidence={},
    ...     breaker_command_id=None, policy_mode="enforce")
    >>> i.schema_version
    1
    """

    incident_id: str
    detector: Literal[
        "no_progress_loop", "retry_storm", "cost_velocity", "plan_deadlock", "silent_success"
    ]
    severity: Literal["warning", "critical"]
    status: Literal["open", "updated", "resolved"]
    scope: IncidentScope
    tenant: str | None
    session_id: str | None
    workflow_id: str | None
    trace_ids: list[str]
    first_seen: str = Field(description="RFC 3339 UTC, event time of the first span of the episode")
    last_seen: str = Field(description="RFC 3339 UTC, event time of the latest span of the episode")
    detected_at: str = Field(description="RFC 3339 UTC, event time at which the detector fired")
    summary: str
    evidence: dict[str, Any]
    breaker_command_id: str | None
    policy_mode: Literal["enforce", "shadow"]
    schema_version: int = SCHEMA_VERSION


class BreakerCommand(_Frozen):
    """Value on ``agent.breaker`` (schemas/agent.breaker.schema.json), keyed by ``"{scope.kind}:{scope.key}"``.

    >>> c = BreakerCommand(command_id="cmd-1", action="halt",
    ...     scope=CommandScope(kind="session", key="s1"), mode="enforce", reason="loop",
    ...     detector="no_progress_loop", incident_id="inc-1",
    ...     issued_at="2026-01-01T00:00:00.000000Z", expires_at="2026-01-01T00:15:00.000000Z")
    >>> c.kafka_key()
    b'session:s1'
    """

    command_id: str
    action: Literal["halt", "trip", "throttle", "hold", "release"]
    scope: CommandScope
    mode: Literal["enforce", "shadow"]
    reason: str
    detector: str | None
    incident_id: str | None
    issued_at: str
    expires_at: str | None
    rate_limit_per_s: float | None = None
    schema_version: int = SCHEMA_VERSION

    def kafka_key(self) -> bytes:
        return f"{self.scope.kind}:{self.scope.key}".encode()


class FlatStatusIn(BaseModel):
    code: Literal["OK", "ERROR", "UNSET", "STATUS_CODE_OK", "STATUS_CODE_ERROR", "STATUS_CODE_UNSET"] = "UNSET"
    message: str | None = None


class FlatEventIn(BaseModel):
    name: str
    time_unix_nano: int | str
    attributes: dict[str, Any] = {}


class FlatSpanIn(BaseModel):
    """One flat span on ``agent.spans`` (README "What producers send"): OTel's own field names, flat dotted attributes.

    A message value is one such object, a JSON array of them, or JSON lines.
    """

    model_config = ConfigDict(extra="allow")

    trace_id: str = Field(description="32 hex digits")
    span_id: str = Field(description="16 hex digits")
    parent_span_id: str | None = None
    name: str
    kind: str | int | None = None
    start_time_unix_nano: int | str
    end_time_unix_nano: int | str
    status: FlatStatusIn | None = None
    attributes: dict[str, Any] = {}
    resource: dict[str, Any] = {}
    events: list[FlatEventIn] = []


class DlqHeaders(BaseModel):
    """Headers on ``agent.spans.dlq``; the value is the original bytes, the key the original key."""

    error_reason: str = Field(alias="error.reason")
    error_detail: str = Field(alias="error.detail")
    source_topic: str = Field(alias="source.topic")
    source_partition: str = Field(alias="source.partition")
    source_offset: str = Field(alias="source.offset")


TOPIC_MODELS: dict[str, type[BaseModel]] = {
    "agent.spans": FlatSpanIn,
    "agent.incidents": Incident,
    "agent.breaker": BreakerCommand,
    "agent.spans.dlq.headers": DlqHeaders,
}
