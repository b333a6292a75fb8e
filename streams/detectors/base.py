"""What every detector core shares: the :class:`Finding` it emits and the :class:`Detector` shape.

A detector core is pure: ``step(state, span, now_ns) -> (state, findings)``, with the clock
injected (``now_ns`` is the stream's event-time watermark, never ``time.time()``). It knows nothing
of Kafka, faust, or output formats; :mod:`streams.policy` turns findings into incidents and commands.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

S = TypeVar("S")


@dataclass(slots=True)
class Finding:
    """One detector result about one episode.

    ``episode`` identifies the episode deterministically (same input → same value, also after a
    restart), so the incident id derived from it never duplicates.

    >>> f = Finding("no_progress_loop", "open", "critical", "session", "s1", "e1", "t", "s1", None,
    ...             ["t1"], 1, 2, 2, "loop", {}, "halt", "session", "s1", "loop")
    >>> f.status, f.action
    ('open', 'halt')
    """

    detector: str
    status: str  # open | updated | resolved
    severity: str  # warning | critical
    scope_kind: str
    scope_key: str
    episode: str
    tenant: str | None
    session_id: str | None
    workflow_id: str | None
    trace_ids: list[str]
    first_seen_ns: int
    last_seen_ns: int
    detected_at_ns: int
    summary: str
    evidence: dict[str, Any] = field(default_factory=dict)
    action: str | None = None  # breaker action when the episode opens
    command_scope_kind: str | None = None
    command_scope_key: str | None = None
    reason: str = ""


class Detector(Protocol[S]):
    """The shape every detector core has (checked by the conformance test)."""

    name: str
    scope: str

    def new_state(self) -> S: ...

    def step(self, state: S, span: Any, now_ns: int) -> tuple[S, list[Finding]]: ...

    def expired(self, state: S, watermark_ns: int) -> bool: ...

    def dump(self, state: S) -> dict[str, Any]: ...

    def load(self, data: dict[str, Any]) -> S: ...
