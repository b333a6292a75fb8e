"""``breakwater tail incidents|breaker|dlq``: what an SRE runs.

Reads ``agent.incidents``, ``agent.breaker`` or ``agent.spans.dlq`` from the beginning (no consumer group, every
partition assigned; ``since_ns`` seeks by record timestamp) and prints one readable line per record::

    2026-01-01T12:00:03.120Z  CRITICAL  no_progress_loop  session:s1  open      Session s1 looped.  [cmd-1f…]
    2026-01-01T12:00:03.120Z  HALT      session:s1  enforce  expires 2026-01-01T12:15:03Z  no_progress_loop:repeat

Times are RFC 3339 in UTC, with the date and ``Z``.

``dlq`` prints what the worker rejected, from the record's headers (schemas/agent.spans.dlq.headers.schema.json)
and never its content: the time it was rejected, the reason, where the original message was
(``topic[partition]@offset``), its size, a SHA-256 prefix of the stored bytes, whether it was
truncated, how many rejections it carried and the detail sentence::

    2026-01-01T12:00:03.120Z  bad_json        agent.spans[0]@41  9 B  sha256:1f2e3d4c5b6a  not valid JSON (…)

Colours when the output is a terminal (and ``NO_COLOR`` is unset); ``--json`` prints each value
as one compact JSON line instead. Without ``follow`` it stops once the topic has been quiet for
``idle_timeout_s`` (the embedded broker's end offsets cannot be trusted, README "The embedded broker"). Records that
cannot be parsed are skipped with a counted warning on stderr; nothing a producer writes can crash
the tail or inject terminal escape sequences, and raw tool arguments are never printed.

>>> line = render(b'{"action": "halt", "scope": {"kind": "session", "key": "s1"}, "mode": "enforce",'
...               b' "reason": "no_progress_loop:repeat", "issued_at": "2026-01-01T12:00:03.120000Z",'
...               b' "expires_at": "2026-01-01T12:15:03.120000Z"}', "breaker")
>>> line
'2026-01-01T12:00:03.120Z  HALT      session:s1  enforce  expires 2026-01-01T12:15:03Z  no_progress_loop:repeat'
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TextIO

import orjson

from streams.semconv import is_sensitive

if TYPE_CHECKING:  # pragma: no cover
    from streams.settings import Settings

WHAT = ("incidents", "breaker", "dlq")
#: What :func:`render` formats from a record's value alone (a DLQ record is read from its headers).
VALUE_KINDS = ("incidents", "breaker")

_RESET = "\x1b[0m"
_BOLD = "\x1b[1m"
_DIM = "\x1b[2m"
_RED = "\x1b[31m"
_GREEN = "\x1b[32m"
_YELLOW = "\x1b[33m"
_MAGENTA = "\x1b[35m"
_CYAN = "\x1b[36m"

_SEVERITY_COLOR = {"CRITICAL": _BOLD + _RED, "WARNING": _YELLOW}
_STATUS_COLOR = {"open": _RED, "updated": _YELLOW, "resolved": _GREEN}
_ACTION_COLOR = {"HALT": _BOLD + _RED, "TRIP": _BOLD + _RED, "THROTTLE": _YELLOW, "HOLD": _MAGENTA,
                 "RELEASE": _GREEN}
_MODE_COLOR = {"shadow": _DIM}
_REASON_COLOR = _YELLOW

# C0/C1 controls, DEL, and bidi overrides ("Trojan Source"): never reach the terminal raw.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def clean(value: Any, limit: int = 300) -> str:
    """A field from the topic made safe for one terminal line: controls escaped, length capped.

    >>> clean("ok\\x1b[31m\\nred")
    'ok\\\\x1b[31m\\\\x0ared'
    >>> clean(None), clean(3), len(clean("x" * 500))
    ('-', '3', 300)
    """
    if value is None:
        return "-"
    s = _UNSAFE.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100 else f"\\u{ord(m.group()):04x}",
                    str(value))
    return s if len(s) <= limit else s[: limit - 1] + "…"


def _paint(text: str, code: str | None, color: bool) -> str:
    return f"{code}{text}{_RESET}" if color and code else text


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC)


def _stamp(value: Any, millis: bool = True) -> str:
    """An RFC 3339 UTC time with its date and ``Z``: ``2026-01-01T12:00:03.120Z`` (``millis``) or
    ``2026-01-01T12:00:03Z``; question marks of the same width when the value is not a time."""
    dt = _parse_time(value)
    if dt is None:
        return "????-??-??T??:??:??.???Z" if millis else "????-??-??T??:??:??Z"
    return dt.strftime("%Y-%m-%dT%H:%M:%S.%f")[:23] + "Z" if millis else dt.strftime("%Y-%m-%dT%H:%M:%SZ")


def _scope(d: dict[str, Any]) -> str:
    sc = d.get("scope")
    if not isinstance(sc, dict):
        return "?:?"
    s = f"{clean(sc.get('kind'), 20)}:{clean(sc.get('key'), 120)}"
    if sc.get("tenant") and sc.get("kind") in ("route", "tool"):
        s += f" tenant:{clean(sc['tenant'], 60)}"
    return s


def format_incident(d: dict[str, Any], color: bool = False) -> str:
    """One line for an incident (schemas/agent.incidents.schema.json); times are the event time, RFC 3339 in UTC.

    >>> inc = {"detected_at": "2026-01-01T12:00:03.120456Z", "severity": "critical",
    ...        "detector": "no_progress_loop", "scope": {"kind": "session", "key": "s1"},
    ...        "status": "open", "summary": "Session s1 called tool 'search' 3 times.",
    ...        "breaker_command_id": "cmd-9f2c", "policy_mode": "enforce"}
    >>> format_incident(inc)
    "2026-01-01T12:00:03.120Z  CRITICAL  no_progress_loop  session:s1  open      Session s1 called tool 'search' 3 times.  [cmd-9f2c]"
    >>> format_incident({**inc, "policy_mode": "shadow", "breaker_command_id": None, "status": "resolved"})
    "2026-01-01T12:00:03.120Z  CRITICAL  no_progress_loop  session:s1  resolved  Session s1 called tool 'search' 3 times.  (shadow)"
    >>> "\\x1b[" in format_incident(inc, color=True)
    True
    """
    sev = clean(d.get("severity"), 10).upper()
    status = clean(d.get("status"), 10)
    parts = [
        _paint(_stamp(d.get("detected_at")), _DIM, color),
        _paint(f"{sev:<8}", _SEVERITY_COLOR.get(sev), color),
        _paint(f"{clean(d.get('detector'), 30):<16}", _CYAN, color),
        _scope(d),
        _paint(f"{status:<8}", _STATUS_COLOR.get(status), color),
        clean(d.get("summary"), 400),
    ]
    cmd = d.get("breaker_command_id")
    if cmd:
        c = clean(cmd, 60)
        parts.append(f"[{c}]" if c.startswith("cmd") else f"[cmd {c}]")
    if d.get("policy_mode") == "shadow":
        parts.append(_paint("(shadow)", _DIM, color))
    return "  ".join(parts)


def format_command(d: dict[str, Any], color: bool = False) -> str:
    """One line for a breaker command (schemas/agent.breaker.schema.json); times are RFC 3339 in UTC.

    >>> cmd = {"action": "throttle", "scope": {"kind": "route", "key": "openai/gpt-4o", "tenant": "acme"},
    ...        "mode": "shadow", "reason": "retry_storm", "issued_at": "2026-01-01T12:00:03Z",
    ...        "expires_at": "2026-01-01T12:02:03Z", "rate_limit_per_s": 5.0}
    >>> format_command(cmd)
    '2026-01-01T12:00:03.000Z  THROTTLE  route:openai/gpt-4o tenant:acme  shadow   expires 2026-01-01T12:02:03Z  limit 5/s  retry_storm'
    >>> format_command({"action": "release", "scope": {"kind": "session", "key": "s1"}, "mode": "enforce",
    ...                 "reason": "expired", "issued_at": "2026-01-01T12:15:03Z", "expires_at": None})
    '2026-01-01T12:15:03.000Z  RELEASE   session:s1  enforce  expired'
    """
    action = clean(d.get("action"), 12).upper()
    mode = clean(d.get("mode"), 10)
    parts = [
        _paint(_stamp(d.get("issued_at")), _DIM, color),
        _paint(f"{action:<8}", _ACTION_COLOR.get(action), color),
        _scope(d),
        _paint(f"{mode:<7}", _MODE_COLOR.get(mode), color),
    ]
    if d.get("expires_at"):
        parts.append(f"expires {_stamp(d.get('expires_at'), millis=False)}")
    rate = d.get("rate_limit_per_s")
    if isinstance(rate, int | float) and not isinstance(rate, bool):
        parts.append(f"limit {rate:g}/s")
    parts.append(clean(d.get("reason"), 300))
    return "  ".join(parts)


def _scrub(v: Any) -> Any:
    """Drop content-carrying keys (raw prompts, tool arguments) anywhere in a value."""
    if isinstance(v, dict):
        return {k: _scrub(x) for k, x in v.items() if not (isinstance(k, str) and is_sensitive(k))}
    if isinstance(v, list):
        return [_scrub(x) for x in v]
    return v


def _json_line(d: Any) -> str:
    # orjson escapes C0 controls; escape DEL, C1 and bidi controls too (still valid JSON)
    s = orjson.dumps(_scrub(d)).decode()
    return re.sub("[\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]", lambda m: f"\\u{ord(m.group()):04x}", s)


@dataclass(frozen=True)
class Filters:
    """Record filters; each applies where the record has the field (``severity``: incidents only).

    ``tenant`` matches the incident's ``tenant`` or the command's ``scope.tenant``, and a
    ``tenant``-kind scope key. ``since_ns`` compares with the Kafka record timestamp. ``reason``
    (DLQ records only) matches the rejection reason.

    >>> f = Filters(detector="no_progress_loop", tenant="acme", severity="critical")
    >>> f.matches({"detector": "no_progress_loop", "tenant": "acme", "severity": "critical"}, "incidents")
    True
    >>> f.matches({"detector": "no_progress_loop", "tenant": "acme", "severity": "warning"}, "incidents")
    False
    >>> f.matches({"detector": "no_progress_loop", "scope": {"kind": "session", "key": "s", "tenant": "acme"}},
    ...           "breaker")
    True
    >>> Filters(since_ns=2_000_000).matches({}, "breaker", timestamp_ms=1)
    False
    >>> Filters(reason="bad_json").matches({"reason": "clock_skew"}, "dlq")
    False
    """

    detector: str | None = None
    tenant: str | None = None
    severity: str | None = None
    since_ns: int | None = None
    reason: str | None = None

    def matches(self, d: dict[str, Any], what: str, timestamp_ms: int | None = None) -> bool:
        if self.since_ns is not None and timestamp_ms is not None and timestamp_ms * 1_000_000 < self.since_ns:
            return False
        if self.detector is not None and d.get("detector") != self.detector:
            return False
        if self.severity is not None and what == "incidents" and d.get("severity") != self.severity:
            return False
        if self.reason is not None and what == "dlq" and d.get("reason") != self.reason:
            return False
        if self.tenant is not None:
            sc = d.get("scope") if isinstance(d.get("scope"), dict) else {}
            tenants = {d.get("tenant"), sc.get("tenant")}
            if sc.get("kind") == "tenant":
                tenants.add(sc.get("key"))
            if self.tenant not in tenants:
                return False
        return True


def detector_names() -> tuple[str, ...]:
    """The detectors a ``--detector`` filter may name (those of the policy file).

    >>> detector_names()
    ('no_progress_loop', 'retry_storm', 'cost_velocity', 'plan_deadlock', 'silent_success')
    """
    from streams.policy import DetectorPolicies

    return tuple(DetectorPolicies.model_fields)


_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)", re.IGNORECASE)
_UNIT_NS = {"ms": 10**6, "s": 10**9, "m": 60 * 10**9, "h": 3600 * 10**9, "d": 86400 * 10**9, "w": 7 * 86400 * 10**9}


def parse_since(value: str, now_ns: int | None = None) -> int:
    """``--since``: an RFC 3339 time, or a duration before ``now_ns`` (``30s``, ``10m``, ``2h``,
    ``1d``, ``1h30m``), as Unix nanoseconds. A time without a zone is UTC.

    >>> now = 1_767_225_600_000_000_000  # 2026-01-01T00:00:00Z
    >>> (now - parse_since("10m", now)) // 10**9, (now - parse_since("1h30m", now)) // 10**9
    (600, 5400)
    >>> (now - parse_since("1d", now)) // 10**9, (now - parse_since("30s", now)) // 10**9
    (86400, 30)
    >>> parse_since("2026-01-01T00:00:02Z") - now, parse_since("2026-01-01 01:00:00+01:00") - now
    (2000000000, 0)
    >>> parse_since("yesterday")
    Traceback (most recent call last):
    ...
    ValueError: expected a duration ago (30s, 10m, 2h, 1d) or an RFC 3339 time (2026-01-01T12:00:00Z), got 'yesterday'
    """
    text = value.strip()
    compact = text.replace(" ", "")
    if compact and _DURATION.sub("", compact) == "":
        total = sum(int(float(n) * _UNIT_NS[u.lower()]) for n, u in _DURATION.findall(compact))
        now_ns = time.time_ns() if now_ns is None else now_ns
        return now_ns - total
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ValueError("expected a duration ago (30s, 10m, 2h, 1d) or an RFC 3339 time "
                         f"(2026-01-01T12:00:00Z), got {clean(value, 60)!r}") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp()) * 10**9 + dt.microsecond * 1000


class BadRecord(ValueError):
    """A record value that is not a JSON object."""


def render(value: bytes | None, what: str, *, as_json: bool = False, color: bool = False,
           filters: Filters | None = None, timestamp_ms: int | None = None) -> str | None:
    """The line to print for one record value, or None when filtered out or a tombstone.

    Raises :class:`BadRecord` for values that are not a JSON object.

    >>> v = b'{"detector": "retry_storm", "severity": "warning", "summary": "x"}'
    >>> render(v, "incidents", filters=Filters(severity="critical")) is None
    True
    >>> render(v, "incidents", as_json=True)
    '{"detector":"retry_storm","severity":"warning","summary":"x"}'
    >>> render(None, "breaker") is None
    True
    >>> render(b"not json", "incidents")
    Traceback (most recent call last):
    ...
    streams.tail.BadRecord: not JSON
    """
    if what not in VALUE_KINDS:
        raise ValueError(f"what must be one of {VALUE_KINDS}, got {what!r}")
    if value is None:  # a tombstone on the compacted breaker topic
        return None
    try:
        d = orjson.loads(value)
    except orjson.JSONDecodeError:
        raise BadRecord("not JSON") from None
    if not isinstance(d, dict):
        raise BadRecord("not a JSON object")
    if filters is not None and not filters.matches(d, what, timestamp_ms):
        return None
    if as_json:
        return _json_line(d)
    try:
        return format_incident(d, color) if what == "incidents" else format_command(d, color)
    except Exception as exc:  # noqa: BLE001 - a hostile record must never crash the tail
        raise BadRecord(f"unformattable: {type(exc).__name__}") from None


def _header(headers: Any, name: str) -> str | None:
    """The last value of header ``name``, decoded (bad UTF-8 replaced), or None."""
    found = None
    for k, v in headers or ():
        if k == name:
            found = v
    if found is None:
        return None
    return found.decode("utf-8", "replace") if isinstance(found, bytes | bytearray) else str(found)


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def dlq_record(value: bytes | None, headers: Any, *, key: bytes | None = None, timestamp_ms: int | None = None,
               partition: int | None = None, offset: int | None = None) -> dict[str, Any]:
    """What ``tail dlq`` shows of one DLQ record: its headers, sizes and hashes, never its content.

    ``bytes`` and ``sha256`` (a 12-digit prefix) describe the stored value, which is the original
    cut to the DLQ's record budget when ``truncated`` (``original_bytes`` is then the full size);
    the key is shown the same way. Header values are made safe for a terminal.

    >>> d = dlq_record(b"{oops", [("error.reason", b"bad_json"), ("error.detail", b"not valid JSON"),
    ...                ("error.count", b"1"), ("source.topic", b"agent.spans"), ("source.partition", b"2"),
    ...                ("source.offset", b"41")], key=b"s1", timestamp_ms=1767225600000, partition=0, offset=7)
    >>> d["reason"], d["source"], d["bytes"], d["truncated"], d["sha256"]
    ('bad_json', {'topic': 'agent.spans', 'partition': 2, 'offset': 41}, 5, False, '935aaf3a54c0')
    >>> "oops" in repr(d) or "s1" in repr(d)
    False
    """
    import hashlib

    raw = bytes(value) if value is not None else b""
    truncated = _header(headers, "error.truncated")
    h = (lambda name: (lambda v: clean(v, 1000) if v is not None else None)(_header(headers, name)))
    return {
        "rejected_at": _stamp_ms(timestamp_ms),
        "reason": h("error.reason"),
        "detail": h("error.detail"),
        "count": _int(_header(headers, "error.count")),
        "source": {"topic": h("source.topic"), "partition": _int(_header(headers, "source.partition")),
                   "offset": _int(_header(headers, "source.offset"))},
        "bytes": len(raw),
        "sha256": hashlib.sha256(raw).hexdigest()[:12],
        "truncated": truncated is not None and truncated.strip() not in ("", "0", "false"),
        "original_bytes": _int(_header(headers, "error.original_bytes")),
        "key_bytes": len(key) if key is not None else None,
        "key_sha256": hashlib.sha256(bytes(key)).hexdigest()[:12] if key is not None else None,
        "dlq": {"partition": partition, "offset": offset},
    }


def _stamp_ms(timestamp_ms: int | None) -> str | None:
    if timestamp_ms is None:
        return None
    return datetime.fromtimestamp(timestamp_ms / 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:23] + "Z"


def format_dlq(d: dict[str, Any], color: bool = False) -> str:
    """One line for a DLQ record (a :func:`dlq_record`): when it was rejected, why, where from, how big.

    >>> format_dlq({"rejected_at": "2026-01-01T00:00:00.000Z", "reason": "oversized", "detail": "too big",
    ...             "count": 3, "source": {"topic": "otlp_spans", "partition": 1, "offset": 9}, "bytes": 983040,
    ...             "sha256": "0123456789ab", "truncated": True, "original_bytes": 2000000})
    '2026-01-01T00:00:00.000Z  oversized       otlp_spans[1]@9  983,040 B  sha256:0123456789ab  TRUNCATED from 2,000,000 B  3 rejections  too big'
    """
    src = d.get("source") or {}
    where = f"{clean(src.get('topic'), 120)}[{clean(src.get('partition'), 12)}]@{clean(src.get('offset'), 24)}"
    parts = [
        _paint(d.get("rejected_at") or "????-??-??T??:??:??.???Z", _DIM, color),
        _paint(f"{clean(d.get('reason'), 40):<14}", _REASON_COLOR, color),
        where,
        f"{d.get('bytes', 0):,} B",
        f"sha256:{d.get('sha256')}",
    ]
    if d.get("truncated"):
        orig = d.get("original_bytes")
        parts.append(_paint("TRUNCATED" + (f" from {orig:,} B" if isinstance(orig, int) else ""), _BOLD, color))
    count = d.get("count")
    if isinstance(count, int) and count > 1:
        parts.append(f"{count} rejections")
    parts.append(clean(d.get("detail"), 400))
    return "  ".join(parts)


@dataclass
class TailStats:
    """Counts of one :func:`tail` run.

    >>> TailStats()
    TailStats(printed=0, filtered=0, bad=0, tombstones=0)
    """

    printed: int = 0
    filtered: int = 0
    bad: int = 0
    tombstones: int = 0


class Printer:
    """Renders records to ``out`` and counts them; bad records become warnings on ``err``.

    >>> import io
    >>> out, err = io.StringIO(), io.StringIO()
    >>> p = Printer("breaker", out=out, err=err, color=False)
    >>> p.handle(b"{oops", topic="agent.breaker", partition=0, offset=7)
    False
    >>> p.handle(b'{"action": "hold", "scope": {"kind": "session", "key": "s9"}, "mode": "enforce",'
    ...          b' "reason": "silent_success", "issued_at": "2026-01-01T00:00:00Z", "expires_at": null}')
    True
    >>> out.getvalue()
    '2026-01-01T00:00:00.000Z  HOLD      session:s9  enforce  silent_success\\n'
    >>> err.getvalue()
    'breakwater tail: skipped unparseable record agent.breaker[0]@7 (not JSON); 1 so far\\n'
    >>> p.stats
    TailStats(printed=1, filtered=0, bad=1, tombstones=0)
    """

    def __init__(self, what: str, *, out: TextIO, err: TextIO, color: bool, as_json: bool = False,
                 filters: Filters | None = None) -> None:
        if what not in WHAT:
            raise ValueError(f"what must be one of {WHAT}, got {what!r}")
        self.what, self.out, self.err, self.color, self.as_json = what, out, err, color, as_json
        self.filters = filters or Filters()
        self.stats = TailStats()
        self.reasons: dict[str, int] = {}  # DLQ reasons seen (for "nothing matched --reason")

    def handle(self, value: bytes | None, *, timestamp_ms: int | None = None, topic: str = "",
               partition: int | None = None, offset: int | None = None, headers: Any = None,
               key: bytes | None = None) -> bool:
        """Print one record if it passes the filters; True when a line was printed."""
        if self.what == "dlq":
            return self._handle_dlq(value, timestamp_ms, partition, offset, headers, key)
        if value is None:
            self.stats.tombstones += 1
            return False
        try:
            line = render(value, self.what, as_json=self.as_json, color=self.color, filters=self.filters,
                          timestamp_ms=timestamp_ms)
        except BadRecord as exc:
            self.stats.bad += 1
            where = f" {topic}[{partition}]@{offset}" if topic else ""
            print(f"breakwater tail: skipped unparseable record{where} ({exc}); {self.stats.bad} so far",
                  file=self.err)
            return False
        if line is None:
            self.stats.filtered += 1
            return False
        self.out.write(line + "\n")
        self.stats.printed += 1
        return True

    def _handle_dlq(self, value: bytes | None, timestamp_ms: int | None, partition: int | None,
                    offset: int | None, headers: Any, key: bytes | None) -> bool:
        d = dlq_record(value, headers, key=key, timestamp_ms=timestamp_ms, partition=partition, offset=offset)
        reason = d["reason"] or "-"
        self.reasons[reason] = self.reasons.get(reason, 0) + 1
        if not self.filters.matches(d, "dlq", timestamp_ms):
            self.stats.filtered += 1
            return False
        self.out.write((_json_line(d) if self.as_json else format_dlq(d, self.color)) + "\n")
        self.stats.printed += 1
        return True


def use_color(out: TextIO, color: bool | None = None) -> bool:
    """``color`` if given, else: ``out`` is a terminal and ``NO_COLOR`` is not set.

    >>> import io
    >>> use_color(io.StringIO()), use_color(io.StringIO(), True)
    (False, True)
    """
    if color is not None:
        return color
    if os.environ.get("NO_COLOR"):
        return False
    try:
        return out.isatty()
    except (AttributeError, ValueError):
        return False


async def _partitions(consumer: Any, topic: str, follow: bool, err: TextIO) -> list[Any]:
    from aiokafka import TopicPartition

    warned = False
    while True:
        # a real Kafka's first metadata answer lists no topic: ask for a full refresh (never
        # subscribe to learn it: that could auto-create the topic with the wrong cleanup policy)
        await consumer._client.force_metadata_update()  # noqa: SLF001
        parts = consumer.partitions_for_topic(topic)
        if parts:
            return [TopicPartition(topic, p) for p in sorted(parts)]
        if not follow:
            print(f"breakwater tail: topic {topic} does not exist (yet); nothing to show", file=err)
            return []
        if not warned:
            print(f"breakwater tail: waiting for topic {topic} to exist…", file=err)
            warned = True
        await asyncio.sleep(1.0)


async def tail(settings: Settings, what: str, *, follow: bool = False, as_json: bool = False,
               detector: str | None = None, tenant: str | None = None, severity: str | None = None,
               since_ns: int | None = None, reason: str | None = None, out: TextIO | None = None, err: TextIO | None = None,
               color: bool | None = None, max_records: int | None = None,
               idle_timeout_s: float | None = None) -> TailStats:
    """Print incidents, breaker commands or DLQ records from the beginning of the topic (or ``since_ns``).

    Stops after ``max_records`` printed lines, or — without ``follow`` — after ``idle_timeout_s``
    (default 2 s) without new records. ``out``/``err`` default to stdout/stderr.

    >>> from streams.settings import Settings
    >>> asyncio.run(tail(Settings(), "nonsense"))
    Traceback (most recent call last):
    ...
    ValueError: what must be 'incidents', 'breaker' or 'dlq', got 'nonsense'
    """
    if what not in WHAT:
        raise ValueError(f"what must be 'incidents', 'breaker' or 'dlq', got {what!r}")
    from aiokafka import AIOKafkaConsumer

    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    idle = 2.0 if idle_timeout_s is None else idle_timeout_s
    topic = {"incidents": settings.topic_incidents, "breaker": settings.topic_breaker,
             "dlq": settings.topic_dlq}[what]
    printer = Printer(what, out=out, err=err, color=use_color(out, color), as_json=as_json,
                      filters=Filters(detector=detector, tenant=tenant, severity=severity, since_ns=since_ns,
                                      reason=reason))
    consumer = AIOKafkaConsumer(
        **settings.kafka_client_kwargs(),
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        client_id="breakwater-tail",
    )
    await consumer.start()
    try:
        tps = await _partitions(consumer, topic, follow, err)
        if not tps:
            return printer.stats
        consumer.assign(tps)
        if since_ns is not None:
            found = await consumer.offsets_for_times({tp: max(0, since_ns // 1_000_000) for tp in tps})
            for tp in tps:
                ot = found.get(tp)
                if ot is None:
                    await consumer.seek_to_end(tp)
                else:
                    consumer.seek(tp, ot.offset)
        else:
            await consumer.seek_to_beginning(*tps)
        last = time.monotonic()
        order = lambda r: (r.timestamp, r.partition, r.offset)  # noqa: E731
        backlog: list[Any] = []  # without --follow: everything up to now, printed in one time order
        while True:
            batch = await consumer.getmany(*tps, timeout_ms=200, max_records=1000)
            got = [r for recs in batch.values() for r in recs]
            if not follow:
                # partitions arrive in separate fetches (a real Kafka): sort across all of them
                backlog.extend(got)
                if got:
                    last = time.monotonic()
                    continue
                if time.monotonic() - last < idle:
                    continue
                got, backlog = backlog, []
            records = sorted(got, key=order)
            for r in records:
                if printer.handle(r.value, timestamp_ms=r.timestamp, topic=r.topic, partition=r.partition,
                                  offset=r.offset, headers=r.headers, key=r.key) and max_records is not None \
                        and printer.stats.printed >= max_records:
                    out.flush()
                    return printer.stats
            if not follow:
                out.flush()
                if reason is not None and not printer.stats.printed and printer.reasons:
                    seen = ", ".join(sorted(clean(r, 40) for r in printer.reasons))
                    print(f"breakwater tail: no DLQ record with reason {clean(reason, 40)!r}; reasons present: {seen}",
                          file=err)
                return printer.stats
            if records:
                out.flush()
                last = time.monotonic()
    finally:
        await consumer.stop()
