"""The gateway side of the breaker topic: :class:`BreakerClient`.

An LLM gateway (or an agent runtime) embeds one client per process. It reads the compacted
``agent.breaker`` topic from the beginning on boot (no consumer group, every partition assigned),
keeps the current command per key ``"{scope.kind}:{scope.key}"`` in memory, and answers
:meth:`BreakerClient.check` from a dict without any I/O::

    client = BreakerClient(Settings())            # or BreakerClient("kafka-1:9092", topic=...)
    await client.start()                          # returns once caught up (or after timeout_s)
    d = client.check(session="sess-1", tenant="acme", route="openai/gpt-4o")
    if not d.allow:
        reject(429 if d.action == "throttle" else 403, d.message())

Rules (schemas/agent.breaker.schema.json):

* the latest record per key wins (a key always lives on one partition, so offset order is
  enough); a ``release`` command or a tombstone (value ``None``) removes the key; a command whose
  ``expires_at`` has passed is ignored (checked again at every :meth:`~BreakerClient.check` with
  the injected clock, so an expiry needs no record);
* ``halt`` / ``trip`` / ``hold`` deny; ``throttle`` allows at ``rate_limit_per_s`` through a token
  bucket per throttled key (burst: one second's worth, at least 1), so callers just obey
  ``allow``; deny beats throttle; ``enforce`` beats ``shadow``;
* ``mode: shadow`` commands never deny: the decision says ``shadow=True`` and ``would_deny``;
* ``route`` and ``tool`` commands with a ``scope.tenant`` apply to that tenant's calls only
  (commands of the other kinds carry the tenant for information only);
* every record goes through :func:`validate_record` before it can touch the state: its key must be
  exactly ``"{scope.kind}:{scope.key}"`` (valid UTF-8; a record without a key takes the scope's),
  the scope key non-empty and at most :data:`MAX_SCOPE_KEY_CHARS` characters (so is a narrowing
  tenant), a ``rate_limit_per_s`` finite and ``>= 0`` on any action and ``> 0`` on a throttle,
  ``expires_at`` RFC 3339 with a zone (or null). A rejected record changes nothing (the key keeps
  its current command), is counted in :attr:`BreakerClient.rejected` by reason, and is logged
  with its reason and its key's length and SHA-256 prefix only, never its content.

The client never raises from :meth:`~BreakerClient.check`, and a broker outage never breaks it: the
consumer reconnects in the background with backoff, resuming where it stopped, while ``check``
keeps answering from memory (expiry still applies). Run it on the gateway's event loop
(:meth:`~BreakerClient.start` / :meth:`~BreakerClient.stop`) or, for synchronous code and code
that runs several event loops, in a thread of its own (:meth:`~BreakerClient.start_in_thread` /
:meth:`~BreakerClient.close`); ``check`` may then be called from any thread.

>>> c = BreakerClient("127.0.0.1:9092", topic="agent.breaker", clock=lambda: 1767225600.0)
>>> c.apply(b"session:s1", command_json("halt", "session", "s1", expires_at="2026-01-01T00:15:00Z"))
'set'
>>> c.check(session="s1").allow, c.check(session="s2").allow
(False, True)
>>> c.check(session="s1", now=1767226500.0).allow      # 00:15:00: expired locally
True
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import orjson
from pydantic import ValidationError

from streams.models import BreakerCommand
from streams.settings import kafka_client_kwargs

if TYPE_CHECKING:  # pragma: no cover
    from streams.settings import Settings

__all__ = ["BreakerClient", "ClientStats", "Decision", "Lag", "command_json", "ALLOW", "BadRecord", "ValidRecord",
           "validate_record", "MAX_SCOPE_KEY_CHARS", "REJECT_REASONS"]

log = logging.getLogger("breakwater.gateway")

DENY_ACTIONS = ("halt", "trip", "hold")
_RANK = {"halt": 0, "trip": 1, "hold": 2}
_SCOPE_ORDER = {"session": 0, "workflow": 1, "tenant": 2, "route": 3, "tool": 4}

MAX_SCOPE_KEY_CHARS = 512
"""Longest ``scope.key`` (and narrowing ``scope.tenant``) a gateway accepts, in characters."""

REJECT_REASONS = ("not_json", "schema", "bad_key", "key_mismatch", "empty_scope_key", "scope_key_too_long",
                  "bad_tenant", "bad_rate", "bad_expiry")
"""Why :func:`validate_record` refuses a record (the keys of :attr:`BreakerClient.rejected`)."""

_LOG_FIRST = 10      # rejections logged per reason before the log thins out ...
_LOG_EVERY = 1000    # ... to one line per this many


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer of :meth:`BreakerClient.check`.

    ``allow`` is all a caller has to obey. ``action`` is the command that decided (``None``: no
    command applies); ``scope`` its key; ``rate_limit_per_s`` the throttle's rate;
    ``retry_after_s`` how long until a throttled caller has a token again; ``expires_at`` the
    command's expiry (RFC 3339, event time). ``shadow`` is True when the deciding command is in
    shadow mode (then ``allow`` is always True and ``would_deny`` says what enforcing would do).

    >>> ALLOW
    Decision(allow=True)
    >>> d = Decision(False, "halt", "no_progress_loop:repeat", "cmd-1", scope="session:s1",
    ...              expires_at="2026-01-01T00:15:00.000000Z", would_deny=True)
    >>> d.message()
    'Breakwater halt on session:s1 (no_progress_loop:repeat), command cmd-1, expires 2026-01-01T00:15:00.000000Z'
    """

    allow: bool
    action: str | None = None
    reason: str | None = None
    command_id: str | None = None
    rate_limit_per_s: float | None = None
    expires_at: str | None = None
    scope: str | None = None
    shadow: bool = False
    would_deny: bool = False
    retry_after_s: float | None = None
    detector: str | None = None
    incident_id: str | None = None

    def __repr__(self) -> str:
        shown = [f"allow={self.allow!r}"]
        for name in ("action", "reason", "command_id", "rate_limit_per_s", "expires_at", "scope", "shadow",
                     "would_deny", "retry_after_s"):
            v = getattr(self, name)
            if v is not None and v is not False:
                shown.append(f"{name}={v!r}")
        return f"Decision({', '.join(shown)})"

    def message(self) -> str:
        """One sentence for an error body or a log line (no payload content, only ids)."""
        if self.action is None:
            return "Breakwater: allowed"
        what = "shadow " if self.shadow else ""
        s = f"Breakwater {what}{self.action} on {self.scope} ({self.reason}), command {self.command_id}"
        if self.action == "throttle" and self.rate_limit_per_s is not None:
            s += f", limit {self.rate_limit_per_s:g}/s"
        if self.retry_after_s is not None:
            s += f", retry after {self.retry_after_s:.3g} s"
        if self.expires_at:
            s += f", expires {self.expires_at}"
        return s


ALLOW = Decision(True)


@dataclass(frozen=True, slots=True)
class Lag:
    """How far behind the breaker topic the client is.

    ``records_behind``: sum over partitions of (high watermark − next offset to read), from the
    last fetch; ``seconds_since_last_record``: wall time since a record was read (None: none yet).

    >>> Lag(0, None, True).records_behind
    0
    """

    records_behind: int
    seconds_since_last_record: float | None
    ready: bool


@dataclass
class ClientStats:
    """Counters of one client (read them any time; only the consumer writes them).

    >>> ClientStats()
    ClientStats(records=0, commands=0, removals=0, expired=0, bad=0, errors=0, reconnects=0)
    """

    records: int = 0
    commands: int = 0
    removals: int = 0
    expired: int = 0
    bad: int = 0
    errors: int = 0
    reconnects: int = 0


def _epoch_s(ts: str | None) -> float | None:
    if ts is None:
        return None
    dt = datetime.fromisoformat(ts.replace("Z", "+00:00"))
    if dt.tzinfo is None:
        raise ValueError(f"timestamp without a time zone: {ts!r}")
    return dt.timestamp()


class BadRecord(ValueError):
    """A breaker record :func:`validate_record` refuses; ``reason`` is one of :data:`REJECT_REASONS`.

    The message is the reason only: nothing of the record's content.

    >>> str(BadRecord("key_mismatch"))
    'key_mismatch'
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ValidRecord:
    """A record that passed :func:`validate_record`: its key, command and expiry (epoch s, or None)."""

    key: str
    command: BreakerCommand
    until: float | None


def _decode_key(key: bytes | bytearray | str | None) -> str | None:
    if key is None or isinstance(key, str):
        return key
    try:
        return bytes(key).decode("utf-8")
    except UnicodeDecodeError:
        raise BadRecord("bad_key") from None


def validate_record(key: bytes | str | None, value: bytes | str) -> ValidRecord:
    """The one check of a breaker record (key + non-null value) before it may enter a client's state.

    Raises :class:`BadRecord` with the first rule the record breaks:

    * ``bad_key``: the key is not UTF-8 (it is never "repaired": a repaired key could name another scope);
    * ``not_json`` / ``schema``: not JSON, or not a BreakerCommand (unknown action, mode or scope
      kind, a field missing or of the wrong type);
    * ``empty_scope_key`` / ``scope_key_too_long``: ``scope.key`` empty or only whitespace, or longer
      than :data:`MAX_SCOPE_KEY_CHARS`;
    * ``key_mismatch``: the key is not exactly ``"{scope.kind}:{scope.key}"`` (a record without a
      key takes the scope's);
    * ``bad_tenant``: a ``route`` / ``tool`` command narrowed to an empty or over-long tenant;
    * ``bad_rate``: ``rate_limit_per_s`` not finite or negative (any action), or not ``> 0`` on a
      ``throttle`` (a throttle that lets nothing through is a ``hold`` without an honest retry time);
    * ``bad_expiry``: ``expires_at`` not RFC 3339 with a zone (``null`` means no expiry; ``""`` is bad).

    >>> validate_record(b"session:s1", command_json("halt", "session", "s1")).key
    'session:s1'
    >>> validate_record(b"session:victim", command_json("halt", "session", "other"))
    Traceback (most recent call last):
    ...
    streams.gateway.BadRecord: key_mismatch
    >>> validate_record(None, command_json("throttle", "route", "r/m", rate_limit_per_s=0)).key
    Traceback (most recent call last):
    ...
    streams.gateway.BadRecord: bad_rate
    """
    k = _decode_key(key)
    try:
        cmd = BreakerCommand.model_validate_json(value)
    except ValidationError as exc:
        kinds = {e.get("type") for e in exc.errors(include_url=False, include_context=False, include_input=False)}
        raise BadRecord("not_json" if "json_invalid" in kinds else "schema") from None
    scope = cmd.scope
    if not scope.key.strip():
        raise BadRecord("empty_scope_key")
    if len(scope.key) > MAX_SCOPE_KEY_CHARS:
        raise BadRecord("scope_key_too_long")
    expected = f"{scope.kind}:{scope.key}"
    if k is not None and k != expected:
        raise BadRecord("key_mismatch")
    if scope.kind in ("route", "tool") and scope.tenant is not None and (
            not scope.tenant.strip() or len(scope.tenant) > MAX_SCOPE_KEY_CHARS):
        raise BadRecord("bad_tenant")
    rate = cmd.rate_limit_per_s
    if rate is not None and (not math.isfinite(rate) or rate < 0 or (cmd.action == "throttle" and rate <= 0)):
        raise BadRecord("bad_rate")
    try:
        until = _epoch_s(cmd.expires_at)
    except ValueError:
        raise BadRecord("bad_expiry") from None
    return ValidRecord(expected, cmd, until)


class _Entry:
    """One active command, with its precomputed decisions and (throttles) its token bucket."""

    __slots__ = ("cmd", "key", "kind", "tenant", "until", "deny", "shadow", "rank", "rate", "cap", "tokens",
                 "stamp", "decision")

    def __init__(self, rec: ValidRecord, default_rate: float) -> None:
        cmd = self.cmd = rec.command
        self.key = rec.key
        self.kind = cmd.scope.kind
        self.tenant = cmd.scope.tenant if cmd.scope.kind in ("route", "tool") else None
        self.until = rec.until
        self.deny = cmd.action in DENY_ACTIONS
        self.shadow = cmd.mode == "shadow"
        self.rank = (_RANK.get(cmd.action, 9), _SCOPE_ORDER.get(cmd.scope.kind, 9))
        # validate_record and __init__ guarantee a finite rate, > 0 for a throttle
        rate = cmd.rate_limit_per_s if cmd.rate_limit_per_s is not None else default_rate
        self.rate = float(rate)
        self.cap = max(1.0, self.rate)
        self.tokens = self.cap if self.rate > 0 else 0.0
        self.stamp: float | None = None
        self.decision = self.make(allow=not self.deny or self.shadow, would_deny=self.deny)

    def make(self, *, allow: bool, would_deny: bool, retry_after_s: float | None = None) -> Decision:
        c = self.cmd
        return Decision(
            allow=allow, action=c.action, reason=c.reason, command_id=c.command_id,
            rate_limit_per_s=self.rate if c.action == "throttle" else None, expires_at=c.expires_at,
            scope=self.key, shadow=self.shadow, would_deny=would_deny, retry_after_s=retry_after_s,
            detector=c.detector, incident_id=c.incident_id,
        )

    def refill(self, t: float) -> None:
        if self.stamp is not None and t > self.stamp:
            self.tokens = min(self.cap, self.tokens + (t - self.stamp) * self.rate)
        if self.stamp is None or t > self.stamp:
            self.stamp = t


def command_json(action: str, kind: str, key: str, *, mode: str = "enforce", tenant: str | None = None,
                 expires_at: str | None = None, rate_limit_per_s: float | None = None,
                 command_id: str | None = None, reason: str = "test",
                 issued_at: str = "2026-01-01T00:00:00.000000Z") -> bytes:
    """A BreakerCommand as the worker publishes it (for tests, demos and manual commands).

    >>> orjson.loads(command_json("throttle", "route", "openai/gpt-4o", rate_limit_per_s=2))["scope"]
    {'kind': 'route', 'key': 'openai/gpt-4o', 'tenant': None}
    """
    cmd = BreakerCommand(
        command_id=command_id or f"cmd-{action}-{kind}-{key}", action=action,  # type: ignore[arg-type]
        scope={"kind": kind, "key": key, "tenant": tenant}, mode=mode,  # type: ignore[arg-type]
        reason=reason, detector=None, incident_id=None, issued_at=issued_at, expires_at=expires_at,
        rate_limit_per_s=rate_limit_per_s,
    )
    return cmd.model_dump_json().encode()


class BreakerClient:
    """Current breaker commands in memory, answered in O(1) by :meth:`check`.

    ``source``: a :class:`~streams.settings.Settings` (broker, security options and
    ``topic_breaker`` from it) or a bootstrap string (``host:port[,host:port]``, ``kafka://``
    prefixes allowed). ``clock`` (epoch seconds) decides expiry and refills throttle buckets.
    ``default_rate_per_s`` applies to a throttle that carries no ``rate_limit_per_s``.
    ``ready_idle_s``: the embedded broker's ListOffsets(latest) can trail the true end by a batch
    (README "The embedded broker"), so the client is also caught up after this long without a record.

    >>> c = BreakerClient("kafka://127.0.0.1:9092", topic="agent.breaker", clock=lambda: 100.0)
    >>> c.apply(b"route:openai/gpt-4o", command_json("throttle", "route", "openai/gpt-4o",
    ...         tenant="acme", rate_limit_per_s=2))
    'set'
    >>> [c.check(route="openai/gpt-4o", tenant="acme").allow for _ in range(3)]   # burst of 2
    [True, True, False]
    >>> c.check(route="openai/gpt-4o", tenant="acme").retry_after_s
    0.5
    >>> c.check(route="openai/gpt-4o", tenant="acme", now=100.5).allow             # refilled
    True
    >>> c.check(route="openai/gpt-4o", tenant="other").allow                       # not its tenant
    True
    >>> c.apply(b"session:s1", command_json("halt", "session", "s1", mode="shadow"))
    'set'
    >>> d = c.check(session="s1"); (d.allow, d.shadow, d.would_deny)
    (True, True, True)
    >>> c.apply(b"session:s1", None)                                               # tombstone
    'removed'
    >>> sorted(c.active())
    ['route:openai/gpt-4o']
    """

    def __init__(self, source: Settings | str, *, topic: str | None = None, clock: Callable[[], float] = time.time,
                 default_rate_per_s: float = 1.0, ready_idle_s: float = 1.0, client_id: str = "breakwater-gateway",
                 **consumer_kwargs: Any) -> None:
        if isinstance(source, str):
            self._kafka: dict[str, Any] = kafka_client_kwargs(source)
            self.topic = topic or "agent.breaker"
        else:
            self._kafka = kafka_client_kwargs(source)
            self.topic = topic or source.topic_breaker
        self._kafka.update(consumer_kwargs)
        if (isinstance(default_rate_per_s, bool) or not isinstance(default_rate_per_s, (int, float))
                or not math.isfinite(default_rate_per_s) or default_rate_per_s <= 0):
            raise ValueError(f"default_rate_per_s must be a finite number > 0, got {default_rate_per_s!r}")
        self._client_id = client_id
        self._clock = clock
        self._default_rate = default_rate_per_s
        self._ready_idle_s = ready_idle_s
        self._active: dict[str, _Entry] = {}
        self._lock = threading.Lock()  # token buckets only; the dict has one writer (the consumer)
        self.stats = ClientStats()
        self.rejected: Counter[str] = Counter()  # records refused by validate_record, by reason
        self.last_error: str | None = None
        self._ready = threading.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._consumer: Any = None
        self._positions: dict[Any, int] = {}
        self._last_record_mono: float | None = None

    # ------------------------------------------------------------------------------ state

    def apply(self, key: bytes | str | None, value: bytes | None) -> str:
        """Apply one record of the breaker topic; returns ``set``, ``removed``, ``expired`` or ``bad``.

        The consumer calls this for every record; tests and tools may call it directly. It is the
        only way into the state: a tombstone removes exactly its key, any other record must pass
        :func:`validate_record` first (``bad``: counted in :attr:`rejected` by reason, and nothing
        changes for the key).

        >>> c = BreakerClient("127.0.0.1:9092", clock=lambda: 0.0)
        >>> c.apply(b"tenant:acme", command_json("trip", "tenant", "acme"))
        'set'
        >>> c.apply(b"tenant:acme", command_json("release", "tenant", "acme"))
        'removed'
        >>> c.apply(b"session:s1", b"{not json"), c.stats.bad
        ('bad', 1)
        >>> c.apply(b"session:victim", command_json("halt", "session", "other")), c.rejected
        ('bad', Counter({'not_json': 1, 'key_mismatch': 1}))
        """
        self.stats.records += 1
        if value is None:  # a tombstone releases exactly its key
            try:
                k = _decode_key(key)
            except BadRecord as exc:
                return self._reject(exc.reason, key)
            if k is not None and self._active.pop(k, None) is not None:
                self.stats.removals += 1
            return "removed"
        try:
            rec = validate_record(key, value)
        except BadRecord as exc:
            return self._reject(exc.reason, key)
        cmd, entry_key = rec.command, rec.key
        if cmd.action == "release":
            if self._active.pop(entry_key, None) is not None:
                self.stats.removals += 1
            return "removed"
        entry = _Entry(rec, self._default_rate)
        if entry.until is not None and self._clock() >= entry.until:
            # the newest record of this key is over: nothing is active for it
            self._active.pop(entry_key, None)
            self.stats.expired += 1
            return "expired"
        old = self._active.get(entry_key)
        if old is not None and old.cmd.command_id == cmd.command_id and old.rate == entry.rate:
            entry.tokens, entry.stamp = old.tokens, old.stamp  # a re-publish keeps its bucket
        self._active[entry_key] = entry
        self.stats.commands += 1
        return "set"

    def _reject(self, reason: str, key: bytes | str | None) -> str:
        """Count a refused record; log its reason and its key's length and digest, never content."""
        self.stats.bad += 1
        self.rejected[reason] += 1
        n = self.rejected[reason]
        if n <= _LOG_FIRST or n % _LOG_EVERY == 0:
            if key is None:
                size, digest = 0, "none"
            else:
                raw = key.encode("utf-8", "surrogatepass") if isinstance(key, str) else bytes(key)
                size, digest = len(raw), hashlib.sha256(raw).hexdigest()[:12]
            log.warning("breakwater gateway: rejected a breaker record (reason=%s, key_len=%d, key_sha256=%s); "
                        "%d rejected for this reason so far%s", reason, size, digest, n,
                        "" if n < _LOG_FIRST else f" (logging one in {_LOG_EVERY} from now on)")
        return "bad"

    def active(self, now: float | None = None) -> dict[str, BreakerCommand]:
        """The commands in force now, by key (a copy; for admin pages and debugging).

        >>> BreakerClient("127.0.0.1:9092").active()
        {}
        """
        t = self._clock() if now is None else now
        return {k: e.cmd for k, e in list(self._active.items()) if e.until is None or t < e.until}

    def sweep(self, now: float | None = None) -> int:
        """Drop expired commands from memory (the consumer does this every second); returns how many.

        >>> c = BreakerClient("127.0.0.1:9092", clock=lambda: 0.0)
        >>> c.apply(None, command_json("hold", "session", "s1", expires_at="1970-01-01T00:00:10Z"))
        'set'
        >>> c.sweep(now=5.0), c.sweep(now=10.0)
        (0, 1)
        """
        t = self._clock() if now is None else now
        n = 0
        for k, e in list(self._active.items()):
            if e.until is not None and t >= e.until and self._active.get(k) is e:
                del self._active[k]
                n += 1
        self.stats.expired += n
        return n

    # ------------------------------------------------------------------------------ the hot path

    def check(self, *, tenant: str | None = None, session: str | None = None, workflow: str | None = None,
              route: str | None = None, tool: str | None = None, now: float | None = None) -> Decision:
        """The decision for one call: a dict lookup per given scope, no I/O, never raises.

        ``route`` is ``"{provider}/{model}"`` (as ``gen_ai.provider.name`` / ``gen_ai.request.model``
        give it), ``tool`` a tool name. Precedence: enforced halt > trip > hold (deny), then
        enforced throttle (token bucket), then shadow commands (never deny).

        >>> c = BreakerClient("127.0.0.1:9092", clock=lambda: 0.0)
        >>> c.check(session="s1")
        Decision(allow=True)
        >>> _ = c.apply(None, command_json("throttle", "tenant", "acme", rate_limit_per_s=100))
        >>> _ = c.apply(None, command_json("halt", "session", "s1", reason="no_progress_loop:repeat"))
        >>> c.check(session="s1", tenant="acme")
        Decision(allow=False, action='halt', reason='no_progress_loop:repeat', command_id='cmd-halt-session-s1', scope='session:s1', would_deny=True)
        >>> c.check(session="s2", tenant="acme").action
        'throttle'
        """
        active = self._active
        if not active:
            return ALLOW
        found: list[_Entry] = []
        if session is not None:
            e = active.get(f"session:{session}")
            if e is not None:
                found.append(e)
        if tenant is not None:
            e = active.get(f"tenant:{tenant}")
            if e is not None:
                found.append(e)
        if workflow is not None:
            e = active.get(f"workflow:{workflow}")
            if e is not None:
                found.append(e)
        if route is not None:
            e = active.get(f"route:{route}")
            if e is not None and (e.tenant is None or e.tenant == tenant):
                found.append(e)
        if tool is not None:
            e = active.get(f"tool:{tool}")
            if e is not None and (e.tenant is None or e.tenant == tenant):
                found.append(e)
        if not found:
            return ALLOW
        t = self._clock() if now is None else now
        deny: _Entry | None = None
        throttles: list[_Entry] = []
        shadows: list[_Entry] = []
        for e in found:
            if e.until is not None and t >= e.until:
                continue
            if e.shadow:
                shadows.append(e)
            elif e.deny:
                if deny is None or e.rank < deny.rank:
                    deny = e
            else:
                throttles.append(e)
        if deny is not None:
            return deny.decision
        if throttles:
            return self._throttle(throttles, t, shadow=False)
        if shadows:
            denies = [e for e in shadows if e.deny]
            if denies:
                return min(denies, key=lambda e: e.rank).decision
            return self._throttle(shadows, t, shadow=True)
        return ALLOW

    def _throttle(self, entries: list[_Entry], t: float, *, shadow: bool) -> Decision:
        with self._lock:
            wait = 0.0
            for e in entries:
                e.refill(t)
                if e.tokens < 1.0:
                    w = (1.0 - e.tokens) / e.rate if e.rate > 0 else float("inf")
                    wait = max(wait, w)
            tightest = min(entries, key=lambda e: e.rate)
            if wait > 0.0:
                retry = None if wait == float("inf") else round(wait, 6)
                return tightest.make(allow=shadow, would_deny=True, retry_after_s=retry)
            for e in entries:
                e.tokens -= 1.0
            return tightest.decision if not shadow else tightest.make(allow=True, would_deny=False)

    # ------------------------------------------------------------------------------ readiness, lag

    @property
    def ready(self) -> bool:
        """True once the client has read the topic up to its end at least once.

        >>> BreakerClient("127.0.0.1:1").ready
        False
        """
        return self._ready.is_set()

    def wait_ready(self, timeout_s: float | None = None) -> bool:
        """Block (a thread, not the event loop) until ready; True if ready.

        >>> BreakerClient("127.0.0.1:1").wait_ready(0.01)
        False
        """
        return self._ready.wait(timeout_s)

    async def wait_ready_async(self, timeout_s: float | None = None) -> bool:
        """Wait on an event loop until ready or ``timeout_s``; True if ready.

        >>> asyncio.run(BreakerClient("127.0.0.1:1").wait_ready_async(0.05))
        False
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not self._ready.is_set():
            if deadline is not None and time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    def lag(self) -> Lag:
        """Records behind the high watermark of the last fetch, and seconds since the last record.

        >>> BreakerClient("127.0.0.1:9092").lag()
        Lag(records_behind=0, seconds_since_last_record=None, ready=False)
        """
        behind = 0
        consumer = self._consumer
        if consumer is not None:
            for tp, pos in list(self._positions.items()):
                try:
                    hw = consumer.highwater(tp)
                except Exception:  # noqa: BLE001 - partition no longer assigned
                    hw = None
                if hw is not None:
                    behind += max(0, hw - pos)
        last = self._last_record_mono
        since = None if last is None else round(time.monotonic() - last, 3)
        return Lag(behind, since, self.ready)

    # ------------------------------------------------------------------------------ lifecycle

    async def start(self, *, timeout_s: float | None = 30.0) -> bool:
        """Start consuming on the running event loop; wait until caught up (at most ``timeout_s``).

        Returns :attr:`ready`. A broker that cannot be reached is not an error: the client keeps
        retrying in the background (``last_error`` says why) and answers ``check`` meanwhile.

        >>> async def demo():
        ...     c = BreakerClient("127.0.0.1:1", request_timeout_ms=500)   # nothing listens there
        ...     ready = await c.start(timeout_s=0.3)
        ...     allow = c.check(session="s1").allow
        ...     await c.stop()
        ...     return ready, allow
        >>> asyncio.run(demo())
        (False, True)
        """
        if self._task is not None:
            raise RuntimeError("BreakerClient already started")
        self._stopping = False
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self._run(), name="breakwater-breaker-client")
        if timeout_s is None or timeout_s > 0:
            await self.wait_ready_async(timeout_s)
        return self.ready

    async def stop(self) -> None:
        """Stop consuming (idempotent). The state stays readable.

        >>> asyncio.run(BreakerClient("127.0.0.1:1").stop())   # never started: nothing to do
        """
        self._stopping = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def start_in_thread(self, *, timeout_s: float | None = 30.0) -> bool:
        """Run the consumer on an event loop in a daemon thread of its own; wait until ready.

        For synchronous callers and for code that runs more than one event loop. Returns
        :attr:`ready`; stop with :meth:`close`.

        >>> c = BreakerClient("127.0.0.1:1", request_timeout_ms=500)
        >>> c.start_in_thread(timeout_s=0.2), c.check(tenant="acme").allow
        (False, True)
        >>> c.close()
        """
        if self._thread is not None:
            raise RuntimeError("BreakerClient already started")
        started = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.start(timeout_s=0))
                started.set()
                loop.run_until_complete(self._idle_until_stopped())
            finally:
                started.set()
                with contextlib.suppress(Exception):
                    loop.run_until_complete(self.stop())
                loop.close()

        self._thread = threading.Thread(target=run, name="breakwater-breaker-client", daemon=True)
        self._thread.start()
        started.wait()
        if timeout_s is None or timeout_s > 0:
            self._ready.wait(timeout_s)
        return self.ready

    async def _idle_until_stopped(self) -> None:
        while not self._stopping:
            await asyncio.sleep(0.05)

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop a client started with :meth:`start_in_thread` (idempotent).

        >>> BreakerClient("127.0.0.1:1").close()
        """
        self._stopping = True
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout_s)

    async def __aenter__(self) -> BreakerClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ------------------------------------------------------------------------------ the consumer

    async def _run(self) -> None:
        backoff = 0.2
        last_sweep = time.monotonic()
        while not self._stopping:
            try:
                await self._consume()
                backoff = 0.2
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the gateway must survive any broker trouble
                self.stats.errors += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("breakwater gateway: breaker consumer failed (%s); retrying in %.1f s",
                            self.last_error, backoff)
                if time.monotonic() - last_sweep >= 1.0:
                    self.sweep()
                    last_sweep = time.monotonic()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                self.stats.reconnects += 1

    async def _consume(self) -> None:
        from aiokafka import AIOKafkaConsumer, TopicPartition

        consumer = AIOKafkaConsumer(
            **self._kafka, group_id=None, enable_auto_commit=False, auto_offset_reset="earliest",
            client_id=self._client_id,
        )
        await consumer.start()
        self._consumer = consumer
        try:
            # a real Kafka's first metadata answer lists no topic: ask for a full refresh first
            await consumer._client.force_metadata_update()  # noqa: SLF001
            parts = consumer.partitions_for_topic(self.topic)
            if not parts:
                # no topic yet, so no command yet; look again with a fresh client (fresh metadata)
                self._ready.set()
                await asyncio.sleep(1.0)
                self.sweep()
                return
            tps = [TopicPartition(self.topic, p) for p in sorted(parts)]
            consumer.assign(tps)
            for tp in tps:
                pos = self._positions.get(tp)
                if pos is None:
                    await consumer.seek_to_beginning(tp)
                else:
                    consumer.seek(tp, pos)
            ends: dict[Any, int] = {}
            if not self._ready.is_set():
                ends = await consumer.end_offsets(tps)
            last_activity = time.monotonic()
            last_sweep = last_activity
            last_meta = last_activity
            while not self._stopping:
                batch = await consumer.getmany(*tps, timeout_ms=200)
                now = time.monotonic()
                for tp, records in batch.items():
                    for r in records:
                        self.apply(r.key, r.value)
                        self._positions[tp] = r.offset + 1
                    if records:
                        self._last_record_mono = now
                        last_activity = now
                if not self._ready.is_set():
                    done = True
                    for tp in tps:
                        if await consumer.position(tp) < ends.get(tp, 0):
                            done = False
                            break
                    if done or now - last_activity >= self._ready_idle_s:
                        self._ready.set()
                if now - last_sweep >= 1.0:
                    self.sweep()
                    last_sweep = now
                if now - last_meta >= 30.0:  # partitions added to the topic: read them from the start
                    last_meta = now
                    parts = consumer.partitions_for_topic(self.topic) or set()
                    if len(parts) > len(tps):
                        raise RuntimeError("breaker topic gained partitions; reassigning")
        finally:
            self._consumer = None
            with contextlib.suppress(Exception):
                await consumer.stop()
