"""What every detector core shares: the :class:`Finding` it emits and the :class:`Detector` shape.

A detector core is pure: ``step(state, span, now_ns) -> (state, findings)``, with the clock
injected (``now_ns`` is the stream's event-time watermark, never ``time.time()``). It knows nothing
of Kafka, faust, or output formats; :mod:`streams.policy` turns findings into incidents and commands.
Every core derives from :class:`Core`, which gives the defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

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


class Core(Generic[S]):
    """The one interface of every detector core, with defaults so a simple core overrides little.

    A core has a typed state (``State``: a slotted dataclass of plain containers), a ``step`` over
    one input (a span, or a keyed pre-aggregate) at the watermark ``now_ns``, an ``advance`` to a
    later watermark (timers; default: nothing to do), the ``next_deadline`` at which ``advance``
    has work (default: never), ``expired`` (whether the state may be dropped: default after
    ``ttl_ns`` of event-time silence since ``state.last_seen_ns``), and a snapshot: ``dump`` to
    JSON-safe data and ``load`` back (default: the dataclass fields). Cores never read the wall
    clock and never mutate their input (tests/test_conformance*.py discover every core and check).

    >>> from dataclasses import dataclass
    >>> @dataclass(slots=True)
    ... class CountState:
    ...     last_seen_ns: int = 0
    ...     n: int = 0
    >>> class Count(Core[CountState]):
    ...     name, scope, State, ttl_ns = "count", "session", CountState, 10
    ...     def step(self, state, span, now_ns):
    ...         state.n += 1
    ...         state.last_seen_ns = max(state.last_seen_ns, span)
    ...         return state, []
    >>> c = Count()
    >>> st, _ = c.step(c.new_state(), 5, 5)
    >>> c.load(c.dump(st)) == st, c.expired(st, 15), c.expired(st, 16), c.next_deadline(st)
    (True, False, True, None)
    """

    name: str = ""
    scope: str = ""
    State: type = object
    ttl_ns: int = 0

    def new_state(self) -> S:
        return self.State()

    def step(self, state: S, item: Any, now_ns: int) -> tuple[S, list[Finding]]:
        raise NotImplementedError

    def advance(self, state: S, watermark_ns: int) -> tuple[S, list[Finding]]:  # noqa: ARG002
        return state, []

    def next_deadline(self, state: S) -> int | None:  # noqa: ARG002
        return None

    def expired(self, state: S, watermark_ns: int) -> bool:
        return state.last_seen_ns + self.ttl_ns < watermark_ns  # type: ignore[attr-defined]

    def dump(self, state: S) -> dict[str, Any]:
        return {k: getattr(state, k) for k in self.State.__slots__}

    def load(self, data: dict[str, Any]) -> S:
        return self.State(**{k: data[k] for k in self.State.__slots__ if k in data})


Detector = Core  # the name earlier code used
