"""``breakwater console``: a live, read-only page in the browser for the demo and small deployments.

One asyncio process: an aiokafka consumer reads ``agent.incidents`` and ``agent.breaker`` from the
beginning (no consumer group, every partition assigned, as ``breakwater tail`` and the gateway's
:class:`~streams.gateway.BreakerClient` do) into memory, and an aiohttp server answers:

* ``GET /`` — one self-contained HTML page (inline CSS and script, no external asset, no CDN);
* ``GET /api/state`` — the current state as JSON (what the page shows);
* ``GET /api/events`` — the same state as Server-Sent Events, pushed at most every
  ``PUSH_INTERVAL_S`` while something changes and every ``HEARTBEAT_S`` otherwise;
* ``GET /healthz`` — ``ok``.

The page loads ``/api/state``, then follows ``/api/events`` (the browser reconnects by itself; it
falls back to polling ``/api/state`` while the stream is down) and counts the breakers' remaining
TTL down every second between pushes.

What it keeps (bounded, in memory):

* **open incidents**: the latest record of each incident whose last status is ``open`` or
  ``updated``; a ``resolved`` record removes it. At most ``max_incidents`` (default 1000): past
  that the least recently updated is dropped (counted in ``incidents_dropped``). The page lists the
  newest ``show_incidents`` (default 200); evidence larger than ``EVIDENCE_MAX_BYTES`` is cut.
* **breakers in force**: the latest command per key ``"{scope.kind}:{scope.key}"``; a ``release``
  or a tombstone removes it, so does its ``expires_at`` passing on the wall clock (as in the
  gateway). At most ``max_breakers`` (default 5000; the soonest to expire is dropped first).
* **per-detector counts**: distinct incidents seen and resolved (ids remembered up to
  ``max_seen``, default 50,000, so a re-published incident is not counted twice), commands
  issued, open incidents and breakers in force now.

It shows only what the records carry, and drops content-carrying keys (raw prompts, tool
arguments) from evidence anyway, as ``tail --json`` does. It serves GET/HEAD only, binds
127.0.0.1 by default, and — bound to a loopback address — answers only requests whose ``Host`` is
a loopback name (no DNS rebinding from a web page). It has no authentication: bind another address
only on a trusted network.

>>> st = ConsoleState(clock=lambda: 1767225600.0)      # 2026-01-01T00:00:00Z
>>> st.apply_incident(_demo_incident("inc-1", status="open"))
'open'
>>> st.apply_breaker(b"session:s1", _demo_command("halt", "s1", expires_at="2026-01-01T00:15:00Z"))
'set'
>>> snap = st.snapshot()
>>> [i["incident_id"] for i in snap["incidents"]], [(b["key"], b["expires_in_s"]) for b in snap["breakers"]]
(['inc-1'], [('session:s1', 900.0)])
>>> snap["counts"]["no_progress_loop"]
{'open': 1, 'incidents': 1, 'resolved': 0, 'commands': 1, 'breakers': 1}
>>> st.apply_incident(_demo_incident("inc-1", status="resolved"))
'resolved'
>>> st.apply_breaker(b"session:s1", _demo_command("release", "s1"))
'removed'
>>> snap = st.snapshot(); (snap["incidents"], snap["breakers"], snap["counts"]["no_progress_loop"]["resolved"])
([], [], 1)
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import html
import ipaddress
import logging
import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson
from pydantic import ValidationError

from streams.models import BreakerCommand, Incident
from streams.tail import _scrub

if TYPE_CHECKING:  # pragma: no cover
    from streams.settings import Settings

__all__ = ["ConsoleState", "serve", "main", "page_html"]

log = logging.getLogger("breakwater.console")

DETECTORS = ("no_progress_loop", "retry_storm", "cost_velocity", "plan_deadlock", "silent_success")
MAX_INCIDENTS = 1000
SHOW_INCIDENTS = 200
MAX_BREAKERS = 5000
MAX_SEEN = 50_000
EVIDENCE_MAX_BYTES = 4096
PUSH_INTERVAL_S = 0.5
HEARTBEAT_S = 5.0
MAX_STREAMS = 32


def _epoch_s(ts: str | None) -> float | None:
    from streams.tail import _parse_time  # one RFC 3339 reader for tail and the console

    dt = _parse_time(ts)
    return None if dt is None else dt.timestamp()


def _demo_incident(incident_id: str, *, status: str = "open", detector: str = "no_progress_loop",
                   session: str = "s1", evidence: dict[str, Any] | None = None) -> bytes:
    """An Incident record as the worker publishes it (doctests and tests)."""
    return Incident(
        incident_id=incident_id, detector=detector, severity="critical", status=status,  # type: ignore[arg-type]
        scope={"kind": "session", "key": session}, tenant="acme", session_id=session,  # type: ignore[arg-type]
        workflow_id=None, trace_ids=["t1"], first_seen="2026-01-01T00:00:00.000000Z",
        last_seen="2026-01-01T00:00:01.000000Z", detected_at="2026-01-01T00:00:01.000000Z",
        summary=f"Session {session} called tool 'search' 3 times.",
        evidence=evidence if evidence is not None else {"tool": "search", "count": 3},
        breaker_command_id="cmd-1", policy_mode="enforce",
    ).model_dump_json().encode()


def _demo_command(action: str, session: str, *, expires_at: str | None = None,
                  detector: str = "no_progress_loop") -> bytes:
    """A BreakerCommand record on a session (doctests and tests)."""
    return BreakerCommand(
        command_id=f"cmd-{action}-{session}", action=action,  # type: ignore[arg-type]
        scope={"kind": "session", "key": session}, mode="enforce",  # type: ignore[arg-type]
        reason=f"{detector}:repeat", detector=detector, incident_id="inc-1",
        issued_at="2026-01-01T00:00:00.000000Z", expires_at=expires_at,
    ).model_dump_json().encode()


class _Counts:
    __slots__ = ("incidents", "resolved", "commands")

    def __init__(self) -> None:
        self.incidents = 0
        self.resolved = 0
        self.commands = 0


class ConsoleState:
    """What the console shows, folded from the two topics; every collection is capped.

    ``clock`` (epoch seconds) decides which breakers are still in force and their remaining TTL.

    >>> st = ConsoleState(max_incidents=2, clock=lambda: 0.0)
    >>> [st.apply_incident(_demo_incident(f"inc-{i}", session=f"s{i}")) for i in range(3)]
    ['open', 'open', 'open']
    >>> [i["incident_id"] for i in st.snapshot()["incidents"]], st.incidents_dropped
    (['inc-2', 'inc-1'], 1)
    >>> st.apply_incident(b"{not json"), st.apply_incident(_demo_incident("inc-1")), st.bad
    ('bad', 'open', 1)
    >>> st.snapshot()["counts"]["no_progress_loop"]["incidents"]     # a re-publish is not a new incident
    3
    """

    def __init__(self, *, max_incidents: int = MAX_INCIDENTS, show_incidents: int = SHOW_INCIDENTS,
                 max_breakers: int = MAX_BREAKERS, max_seen: int = MAX_SEEN,
                 clock: Callable[[], float] = time.time) -> None:
        self.max_incidents = max(1, max_incidents)
        self.show_incidents = max(1, show_incidents)
        self.max_breakers = max(1, max_breakers)
        self.max_seen = max(self.max_incidents, max_seen)
        self.clock = clock
        self.open: OrderedDict[str, dict[str, Any]] = OrderedDict()  # least recently updated first
        self.breakers: dict[str, dict[str, Any]] = {}
        self._seen: OrderedDict[str, bool] = OrderedDict()  # incident id -> resolved
        self._counts: dict[str, _Counts] = {d: _Counts() for d in DETECTORS}
        self._seen_commands: OrderedDict[str, None] = OrderedDict()
        self.incidents_dropped = 0
        self.breakers_dropped = 0
        self.records = {"incidents": 0, "breaker": 0}
        self.bad = 0
        self.version = 0  # bumped on every change the page should see
        self.connected = False
        self.caught_up = False
        self.last_error: str | None = None
        self.last_record_at: float | None = None

    # ------------------------------------------------------------------------- folding records

    def _count(self, detector: str | None) -> _Counts:
        key = detector if isinstance(detector, str) and detector else "other"
        c = self._counts.get(key)
        if c is None:
            if len(self._counts) >= len(DETECTORS) + 20:  # unknown names from the topic: capped
                key = "other"
                c = self._counts.setdefault(key, _Counts())
            else:
                c = self._counts[key] = _Counts()
        return c

    def apply_incident(self, value: bytes | None) -> str:
        """Fold one ``agent.incidents`` record; returns ``open``, ``resolved``, ``tombstone`` or ``bad``."""
        self.records["incidents"] += 1
        self.last_record_at = self.clock()
        if value is None:
            return "tombstone"
        try:
            inc = Incident.model_validate_json(value)
        except (ValidationError, ValueError):
            self.bad += 1
            return "bad"
        d = inc.model_dump(mode="json")
        d["evidence"], d["evidence_truncated"] = _cap_evidence(d.get("evidence"))
        iid = inc.incident_id
        counts = self._count(inc.detector)
        was_resolved = self._seen.get(iid)
        if was_resolved is None:
            counts.incidents += 1
        resolved = inc.status == "resolved"
        if resolved and not was_resolved:
            counts.resolved += 1
        self._seen[iid] = bool(resolved or was_resolved)
        self._seen.move_to_end(iid)
        while len(self._seen) > self.max_seen:
            self._seen.popitem(last=False)
        self.version += 1
        if resolved:
            self.open.pop(iid, None)
            return "resolved"
        self.open[iid] = d
        self.open.move_to_end(iid)
        while len(self.open) > self.max_incidents:
            self.open.popitem(last=False)
            self.incidents_dropped += 1
        return "open"

    def apply_breaker(self, key: bytes | str | None, value: bytes | None) -> str:
        """Fold one ``agent.breaker`` record; returns ``set``, ``removed``, ``expired`` or ``bad``."""
        self.records["breaker"] += 1
        self.last_record_at = self.clock()
        k = key.decode("utf-8", "replace") if isinstance(key, bytes) else key
        if value is None:
            if k is not None and self.breakers.pop(k, None) is not None:
                self.version += 1
            return "removed"
        try:
            cmd = BreakerCommand.model_validate_json(value)
        except (ValidationError, ValueError):
            self.bad += 1
            return "bad"
        entry_key = k or f"{cmd.scope.kind}:{cmd.scope.key}"
        self.version += 1
        if cmd.action == "release":
            self.breakers.pop(entry_key, None)
            return "removed"
        if cmd.command_id not in self._seen_commands:
            self._count(cmd.detector).commands += 1
        self._seen_commands[cmd.command_id] = None
        self._seen_commands.move_to_end(cmd.command_id)
        while len(self._seen_commands) > self.max_seen:
            self._seen_commands.popitem(last=False)
        d = cmd.model_dump(mode="json")
        d["key"] = entry_key
        d["expires_epoch"] = _epoch_s(cmd.expires_at)
        if d["expires_epoch"] is not None and self.clock() >= d["expires_epoch"]:
            self.breakers.pop(entry_key, None)  # the newest record of this key is already over
            return "expired"
        self.breakers[entry_key] = d
        if len(self.breakers) > self.max_breakers:
            victim = min(self.breakers, key=lambda x: self.breakers[x]["expires_epoch"] or float("inf"))
            del self.breakers[victim]
            self.breakers_dropped += 1
        return "set"

    def sweep(self, now: float | None = None) -> int:
        """Drop breakers whose ``expires_at`` has passed; returns how many.

        >>> st = ConsoleState(clock=lambda: 0.0)
        >>> st.apply_breaker(None, _demo_command("hold", "s1", expires_at="1970-01-01T00:00:10Z"))
        'set'
        >>> st.sweep(now=5.0), st.sweep(now=10.0), st.breakers
        (0, 1, {})
        """
        t = self.clock() if now is None else now
        gone = [k for k, d in self.breakers.items() if d["expires_epoch"] is not None and t >= d["expires_epoch"]]
        for k in gone:
            del self.breakers[k]
        if gone:
            self.version += 1
        return len(gone)

    # ------------------------------------------------------------------------- what the page reads

    def snapshot(self) -> dict[str, Any]:
        """The state as one JSON-ready dict (``/api/state`` and every pushed event)."""
        now = self.clock()
        incidents = list(reversed(self.open.values()))[: self.show_incidents]
        open_by: dict[str, int] = {}
        for d in self.open.values():
            open_by[d["detector"]] = open_by.get(d["detector"], 0) + 1
        breakers = []
        brk_by: dict[str, int] = {}
        for d in self.breakers.values():
            exp = d["expires_epoch"]
            if exp is not None and now >= exp:
                continue
            b = {k: v for k, v in d.items() if k != "expires_epoch"}
            b["expires_in_s"] = None if exp is None else round(exp - now, 3)
            breakers.append(b)
            det = d.get("detector") or "other"
            brk_by[det] = brk_by.get(det, 0) + 1
        breakers.sort(key=lambda b: (b["expires_in_s"] is None, b["expires_in_s"] or 0.0, b["key"]))
        counts = {name: {"open": open_by.get(name, 0), "incidents": c.incidents, "resolved": c.resolved,
                         "commands": c.commands, "breakers": brk_by.get(name, 0)}
                  for name, c in self._counts.items()}
        return {
            "now": now,
            "version": self.version,
            "connected": self.connected,
            "caught_up": self.caught_up,
            "last_error": self.last_error,
            "counts": counts,
            "incidents": incidents,
            "incidents_open": len(self.open),
            "incidents_dropped": self.incidents_dropped,
            "breakers": breakers,
            "breakers_dropped": self.breakers_dropped,
            "records": dict(self.records),
            "bad_records": self.bad,
            "limits": {"max_incidents": self.max_incidents, "show_incidents": self.show_incidents,
                       "max_breakers": self.max_breakers},
        }


def _cap_evidence(evidence: Any) -> tuple[Any, bool]:
    """Evidence without content-carrying keys, cut to ``EVIDENCE_MAX_BYTES`` of JSON.

    >>> _cap_evidence({"count": 3, "gen_ai.tool.call.arguments": "secret"})
    ({'count': 3}, False)
    >>> ev, cut = _cap_evidence({"calls": ["x" * 100] * 100}); cut, sorted(ev)
    (True, ['json_prefix'])
    """
    ev = _scrub(evidence if isinstance(evidence, dict) else {})
    raw = orjson.dumps(ev)
    if len(raw) <= EVIDENCE_MAX_BYTES:
        return ev, False
    return {"json_prefix": raw[:EVIDENCE_MAX_BYTES].decode("utf-8", "ignore") + "…"}, True


# ----------------------------------------------------------------------------- the Kafka side


async def _consume(settings: Settings, state: ConsoleState, *, ready_idle_s: float = 1.0) -> None:
    """Read both topics from the beginning into ``state``, forever; reconnect with backoff."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    topics = {settings.topic_incidents: "incidents", settings.topic_breaker: "breaker"}
    backoff = 0.2
    while True:
        consumer = AIOKafkaConsumer(**settings.kafka_client_kwargs(), group_id=None, enable_auto_commit=False,
                                    auto_offset_reset="earliest", client_id="breakwater-console")
        positions: dict[Any, int] = getattr(state, "_positions", {})
        state._positions = positions  # type: ignore[attr-defined]  # resume after a reconnect
        try:
            await consumer.start()
            state.connected, state.last_error = True, None
            backoff = 0.2
            tps: list[Any] = []
            last_sweep = last_activity = time.monotonic()
            last_meta = 0.0
            while True:
                have = {tp.topic for tp in tps}
                if len(have) < len(topics) and time.monotonic() - last_meta >= 1.0:
                    # a topic still missing (the worker creates them): look again, once a second
                    last_meta = time.monotonic()
                    await consumer._client.force_metadata_update()  # noqa: SLF001 - Kafka lists none at first
                    found = [TopicPartition(t, p) for t in topics
                             for p in sorted(consumer.partitions_for_topic(t) or ())]
                    if len(found) > len(tps):
                        tps = found
                        consumer.assign(tps)
                        for tp in tps:
                            if tp in positions:
                                consumer.seek(tp, positions[tp])
                            else:
                                await consumer.seek_to_beginning(tp)
                if not tps:
                    state.caught_up = True
                    await asyncio.sleep(1.0)
                    continue
                batch = await consumer.getmany(*tps, timeout_ms=200, max_records=2000)
                now = time.monotonic()
                records = sorted((r for recs in batch.values() for r in recs),
                                 key=lambda r: (r.timestamp, r.partition, r.offset))
                for r in records:
                    what = topics.get(r.topic)
                    if what == "incidents":
                        state.apply_incident(r.value)
                    elif what == "breaker":
                        state.apply_breaker(r.key, r.value)
                    positions[TopicPartition(r.topic, r.partition)] = r.offset + 1
                if records:
                    last_activity = now
                elif not state.caught_up and now - last_activity >= ready_idle_s:
                    state.caught_up = True
                    state.version += 1
                if now - last_sweep >= 1.0:
                    state.sweep()
                    last_sweep = now
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the console must outlive any broker trouble
            state.connected = False
            state.last_error = f"{type(exc).__name__}: {str(exc)[:200]}"
            state.version += 1
            log.warning("breakwater console: Kafka consumer failed (%s); retrying in %.1f s",
                        state.last_error, backoff)
            state.sweep()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)
        finally:
            with contextlib.suppress(Exception):
                await consumer.stop()


# ----------------------------------------------------------------------------- the page

_STYLE = """
:root{--bg:#0f1419;--panel:#182029;--ink:#e6e9ef;--dim:#8a96a8;--line:#2a3542;--red:#ff5d5d;
--amber:#ffb547;--green:#4cd07d;--blue:#5aa9ff;--violet:#c792ea}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--ink);font:14px/1.4 system-ui,-apple-system,"Segoe UI",
Roboto,"DejaVu Sans",sans-serif}
header{display:flex;align-items:center;gap:16px;padding:12px 20px;border-bottom:1px solid var(--line)}
h1{font-size:18px;margin:0}
h2{font-size:15px;margin:20px 0 8px;color:var(--dim);font-weight:600;text-transform:uppercase;letter-spacing:.05em}
main{padding:0 20px 30px}
#status{padding:2px 10px;border-radius:10px;background:var(--panel);font-size:12px}
#status.live{color:var(--green)} #status.down{color:var(--red)} #status.wait{color:var(--amber)}
#meta{color:var(--dim);font-size:12px;margin-left:auto}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(190px,1fr));gap:10px}
.card{background:var(--panel);border:1px solid var(--line);border-radius:8px;padding:10px 12px}
.card .name{font-weight:600;color:var(--blue);font-family:ui-monospace,monospace;font-size:13px}
.card .big{font-size:26px;font-weight:700}
.card .big.hot{color:var(--red)}
.card .small{color:var(--dim);font-size:12px}
table{width:100%;border-collapse:collapse;background:var(--panel);border:1px solid var(--line);border-radius:8px}
th,td{text-align:left;padding:6px 10px;border-bottom:1px solid var(--line);vertical-align:top}
th{color:var(--dim);font-weight:600;font-size:12px}
td.mono,.mono{font-family:ui-monospace,"DejaVu Sans Mono",monospace;font-size:12.5px;overflow-wrap:anywhere}
.empty{color:var(--dim);padding:14px;background:var(--panel);border:1px dashed var(--line);border-radius:8px}
.sev-critical{color:var(--red);font-weight:700} .sev-warning{color:var(--amber);font-weight:700}
.act-halt,.act-trip{color:var(--red);font-weight:700} .act-throttle{color:var(--amber);font-weight:700}
.act-hold{color:var(--violet);font-weight:700}
.shadow{color:var(--dim);font-style:italic}
details summary{cursor:pointer;color:var(--blue)}
pre{margin:6px 0 0;white-space:pre-wrap;overflow-wrap:anywhere;font-size:12px;color:var(--ink)}
.ttl{font-variant-numeric:tabular-nums;font-weight:600}
.note{color:var(--dim);font-size:12px;margin-top:6px}
.evidence{color:var(--amber);margin-top:4px}
"""

_SCRIPT = r"""
"use strict";
const $ = (id) => document.getElementById(id);
let state = null, skew = 0, es = null, poll = null;

function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else e.setAttribute(k, v);
  }
  for (const k of kids) e.append(k instanceof Node ? k : document.createTextNode(k == null ? "-" : String(k)));
  return e;
}
function fmtTtl(s) {
  if (s == null) return "no expiry";
  s = Math.max(0, Math.floor(s));
  const h = Math.floor(s / 3600), m = Math.floor(s % 3600 / 60), r = s % 60;
  return (h ? h + "h " : "") + (h || m ? String(m).padStart(h ? 2 : 1, "0") + "m " : "") + String(r).padStart(2, "0") + "s";
}
function scopeText(sc) {
  if (!sc) return "?";
  let s = sc.kind + ":" + sc.key;
  if (sc.tenant && (sc.kind === "route" || sc.kind === "tool")) s += " (tenant " + sc.tenant + ")";
  return s;
}
function nowServer() { return Date.now() / 1000 + skew; }

function renderCounts(st) {
  const box = $("counts"); box.replaceChildren();
  const names = Object.keys(st.counts);
  for (const name of names) {
    const c = st.counts[name];
    box.append(el("div", {"class": "card", "data-detector": name},
      el("div", {"class": "name"}, name),
      el("div", {"class": "big" + (c.open ? " hot" : "")}, String(c.open)),
      el("div", {"class": "small"}, "open · " + c.incidents + " seen · " + c.resolved + " resolved"),
      el("div", {"class": "small"}, c.commands + " command" + (c.commands === 1 ? "" : "s") + " · " + c.breakers + " in force")));
  }
}
function renderBreakers(st) {
  const box = $("breakers"); box.replaceChildren();
  if (!st.breakers.length) { box.append(el("div", {"class": "empty"}, "No breaker in force.")); return; }
  const body = el("tbody");
  for (const b of st.breakers) {
    const until = b.expires_in_s == null ? null : st.now + b.expires_in_s;
    const ttl = el("td", {"class": "ttl", "data-until": until == null ? "" : String(until)},
                   fmtTtl(b.expires_in_s));
    body.append(el("tr", {"data-scope": b.key, "class": b.mode === "shadow" ? "shadow" : ""},
      el("td", {"class": "mono"}, scopeText(b.scope)),
      el("td", {"class": "act-" + b.action}, b.action.toUpperCase()),
      ttl,
      el("td", {}, b.mode),
      el("td", {}, b.rate_limit_per_s == null ? "" : b.rate_limit_per_s + "/s"),
      el("td", {"class": "mono"}, b.reason),
      el("td", {"class": "mono"}, b.incident_id || ""),
      el("td", {"class": "mono"}, (b.expires_at || "").replace(/\.\d+Z$/, "Z"))));
  }
  box.append(el("table", {}, el("thead", {}, el("tr", {},
    ...["scope", "action", "remaining", "mode", "limit", "reason", "incident", "expires at (UTC)"].map(h => el("th", {}, h)))), body));
}
function renderIncidents(st) {
  const box = $("incidents"); box.replaceChildren();
  if (!st.incidents.length) { box.append(el("div", {"class": "empty"}, "No open incident.")); return; }
  const body = el("tbody");
  for (const i of st.incidents) {
    const ev = el("details", {}, el("summary", {}, "evidence" + (i.evidence_truncated ? " (cut)" : "")),
                  el("pre", {}, JSON.stringify(i.evidence, null, 2)));
    const traces = (i.trace_ids || []).slice(0, 5).join(" ") + ((i.trace_ids || []).length > 5 ? " …" : "");
    const brief = Object.entries(i.evidence || {}).map(([k, v]) => k + "=" + (typeof v === "object" ? JSON.stringify(v) : v))
                        .join(" · ");
    body.append(el("tr", {"data-incident-id": i.incident_id, "class": i.policy_mode === "shadow" ? "shadow" : ""},
      el("td", {"class": "mono"}, (i.detected_at || "").replace(/(\.\d{3})\d*Z$/, "$1Z")),
      el("td", {"class": "sev-" + i.severity}, i.severity.toUpperCase()),
      el("td", {"class": "mono"}, i.detector),
      el("td", {"class": "mono"}, scopeText(i.scope)),
      el("td", {}, i.status + (i.policy_mode === "shadow" ? " (shadow)" : "")),
      el("td", {}, el("div", {}, i.summary),
                   el("div", {"class": "note mono"}, i.incident_id + (i.tenant ? " · tenant " + i.tenant : "") +
                      (i.breaker_command_id ? " · " + i.breaker_command_id : "") + (traces ? " · traces " + traces : "")),
                   el("div", {"class": "evidence mono"}, brief.length > 300 ? brief.slice(0, 299) + "…" : brief),
                   ev)));
  }
  box.append(el("table", {}, el("thead", {}, el("tr", {},
    ...["detected (UTC)", "severity", "detector", "scope", "status", "summary and evidence"].map(h => el("th", {}, h)))), body));
  if (st.incidents_open > st.incidents.length)
    box.append(el("div", {"class": "note"}, "Newest " + st.incidents.length + " of " + st.incidents_open + " open incidents shown."));
}
function render(st) {
  state = st;
  skew = st.now - Date.now() / 1000;
  renderCounts(st); renderBreakers(st); renderIncidents(st);
  const dropped = st.incidents_dropped ? " · " + st.incidents_dropped + " old incidents dropped (cap " + st.limits.max_incidents + ")" : "";
  $("meta").textContent = st.records.incidents + " incident records · " + st.records.breaker +
    " breaker records" + (st.bad_records ? " · " + st.bad_records + " unreadable" : "") + dropped +
    " · updated " + new Date(st.now * 1000).toISOString().replace(/\.\d+Z$/, "Z");
  setStatus(st.connected ? (st.caught_up ? "live" : "wait") : "down",
            st.connected ? (st.caught_up ? "live" : "catching up…") : "Kafka unreachable: " + (st.last_error || "?"));
  document.body.dataset.version = String(st.version);
}
function setStatus(cls, text) { const s = $("status"); s.className = cls; s.textContent = text; }
function tick() {
  const t = nowServer();
  for (const td of document.querySelectorAll("td.ttl[data-until]")) {
    const u = td.dataset.until;
    if (u) td.textContent = fmtTtl(Number(u) - t);
  }
}
async function load() {
  try {
    const r = await fetch("api/state", {cache: "no-store"});
    if (r.ok) render(await r.json());
  } catch (e) { setStatus("down", "console unreachable"); }
}
function follow() {
  if (!window.EventSource) { poll = poll || setInterval(load, 2000); return; }
  es = new EventSource("api/events");
  es.addEventListener("state", (ev) => { render(JSON.parse(ev.data)); if (poll) { clearInterval(poll); poll = null; } });
  es.onerror = () => { setStatus("down", "reconnecting…"); if (!poll) poll = setInterval(load, 2000); };
}
const initial = document.getElementById("initial");
if (initial) { try { render(JSON.parse(initial.textContent)); } catch (e) { /* the stream brings it */ } }
follow();
setInterval(tick, 1000);
"""


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def _embed(snapshot: dict[str, Any] | None) -> str:
    """The state as JSON safe inside ``<script type="application/json">`` (no ``<`` can close it).

    >>> e = _embed({"summary": "</script><b>"}); "<" in e, orjson.loads(e)["summary"]
    (False, '</script><b>')
    """
    return orjson.dumps(snapshot).decode().replace("<", "\\u003c")


def page_html(snapshot: dict[str, Any] | None = None, title: str = "Breakwater console") -> str:
    """The one page: inline style and script, nothing fetched but ``api/state`` and ``api/events``.

    ``snapshot`` (the state when the page is served) is embedded as JSON data and rendered by the
    page's script before the page has loaded, so the first paint already shows it; the event
    stream then keeps it current.

    >>> p = page_html(); ("<script>" in p, "http://" in p or "https://" in p)
    (True, False)
    """
    t = html.escape(title)
    data = "" if snapshot is None else f"<script type=\"application/json\" id=\"initial\">{_embed(snapshot)}</script>"
    return (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">"
        f"<title>{t}</title><style>{_STYLE}</style></head><body>"
        f"<header><h1>{t}</h1><span id=\"status\" class=\"wait\">connecting…</span>"
        "<span id=\"meta\"></span></header><main>"
        "<h2>Per detector</h2><div id=\"counts\" class=\"cards\"></div>"
        "<h2>Breakers in force</h2><div id=\"breakers\"><div class=\"empty\">Loading…</div></div>"
        "<h2>Open incidents</h2><div id=\"incidents\"><div class=\"empty\">Loading…</div></div>"
        "<p class=\"note\">Read-only. Incidents leave this list when resolved; breakers when released or "
        "expired.</p></main>"
        f"{data}<script>{_SCRIPT}</script></body></html>"
    )


_HEADERS = {
    "Content-Security-Policy": (f"default-src 'none'; script-src {_csp_hash(_SCRIPT)}; style-src {_csp_hash(_STYLE)}; "
                                "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
                                "frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


# ----------------------------------------------------------------------------- the HTTP side


def _is_loopback(host: str) -> bool:
    """True for loopback addresses and ``localhost``.

    >>> _is_loopback("127.0.0.1"), _is_loopback("localhost"), _is_loopback("::1"), _is_loopback("0.0.0.0")
    (True, True, True, False)
    """
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _host_name(header: str) -> str:
    """The name part of a ``Host`` header.

    >>> _host_name("[::1]:80"), _host_name("localhost:8080"), _host_name("evil.example")
    ('::1', 'localhost', 'evil.example')
    """
    h = header.strip()
    if h.startswith("["):
        return h[1:h.find("]")] if "]" in h else h
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


def make_app(state: ConsoleState, *, loopback_only: bool) -> Any:
    from aiohttp import web

    streams: set[web.StreamResponse] = set()
    closing = asyncio.Event()

    @web.middleware
    async def guard(request: web.Request, handler: Callable[[web.Request], Any]) -> web.StreamResponse:
        if request.method not in ("GET", "HEAD"):
            return web.Response(status=405, text="read-only\n", headers={"Allow": "GET, HEAD"})
        if loopback_only and not _is_loopback(_host_name(request.host or "")):
            return web.Response(status=421, text="this console answers loopback host names only\n")
        resp = await handler(request)
        for k, v in _HEADERS.items():
            resp.headers.setdefault(k, v)
        return resp

    async def index(request: web.Request) -> web.Response:
        return web.Response(text=page_html(state.snapshot()), content_type="text/html", charset="utf-8")

    async def api_state(request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(state.snapshot()), content_type="application/json")

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def events(request: web.Request) -> web.StreamResponse:
        if len(streams) >= MAX_STREAMS:
            return web.Response(status=503, text="too many open event streams\n", headers={"Retry-After": "5"})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                           "X-Accel-Buffering": "no", **{k: v for k, v in _HEADERS.items()
                                                                          if k != "Cache-Control"}})
        await resp.prepare(request)
        streams.add(resp)
        try:
            await resp.write(b"retry: 2000\n\n")
            sent_version, sent_at = -1, 0.0
            while not closing.is_set():
                now = time.monotonic()
                if state.version != sent_version or now - sent_at >= HEARTBEAT_S:
                    sent_version, sent_at = state.version, now
                    await resp.write(b"event: state\ndata: " + orjson.dumps(state.snapshot()) + b"\n\n")
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(closing.wait(), PUSH_INTERVAL_S)
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            streams.discard(resp)
        return resp

    app = web.Application()
    app.middlewares.append(guard)
    app.router.add_get("/", index)
    app.router.add_get("/api/state", api_state)
    app.router.add_get("/api/events", events)
    app.router.add_get("/healthz", health)

    async def on_shutdown(app: web.Application) -> None:
        closing.set()

    app.on_shutdown.append(on_shutdown)
    return app


def url_for(host: str, port: int) -> str:
    """The URL to print for a bound address (a wildcard address is shown as loopback).

    >>> url_for("127.0.0.1", 8080), url_for("::1", 1), url_for("0.0.0.0", 2)
    ('http://127.0.0.1:8080/', 'http://[::1]:1/', 'http://127.0.0.1:2/')
    """
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


async def serve(settings: Settings, host: str = "127.0.0.1", port: int = 0,
                ready: Callable[[str], Any] | asyncio.Future[str] | None = None, *,
                state: ConsoleState | None = None) -> None:
    """Run the console until cancelled: the Kafka consumer and the HTTP server on ``host:port``.

    ``port=0`` picks a free port. Once listening, ``ready`` gets the page's URL: a callable is
    called with it, an asyncio Future gets it as its result. The consumer reconnects by itself when
    the broker goes away (the page says so meanwhile). ``state`` lets a caller (a test, the demo)
    read what the console holds.
    """
    from aiohttp import web

    st = state if state is not None else ConsoleState()
    app = make_app(st, loopback_only=_is_loopback(host))
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    consumer: asyncio.Task[None] | None = None
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        sockets = getattr(site._server, "sockets", None) or []  # noqa: SLF001 - the port actually bound
        bound = sockets[0].getsockname()[1] if sockets else port
        consumer = asyncio.create_task(_consume(settings, st), name="breakwater-console-consumer")
        url = url_for(host, bound)
        if isinstance(ready, asyncio.Future):
            if not ready.done():
                ready.set_result(url)
        elif ready is not None:
            ready(url)
        await asyncio.Event().wait()  # until cancelled
    finally:
        if consumer is not None:
            consumer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await consumer
        await runner.cleanup()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="breakwater console",
        description="A live, read-only page of open incidents, breakers in force and per-detector counts.",
        epilog="Settings come from BREAKWATER_* environment variables (see `breakwater config`).")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; the console has no authentication, bind another "
                        "address only on a trusted network)")
    p.add_argument("--port", type=int, default=0, help="port to bind (default 0: a free port; the URL is printed)")
    p.add_argument("--broker", metavar="URL",
                   help="Kafka bootstrap URL(s), kafka://host:port[,…] (overrides BREAKWATER_BROKER)")
    p.add_argument("--max-incidents", type=int, default=MAX_INCIDENTS,
                   help=f"open incidents kept in memory; the least recently updated go first (default {MAX_INCIDENTS})")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error instead of one line")
    return p


def main(argv: list[str] | None = None) -> int:
    """``breakwater console [--host H] [--port P] [--broker URL]``: prints the URL, serves until Ctrl-C.

    Errors a person can fix (a bad setting, an unreachable broker, a port in use) are one line on
    stderr and exit code 2.
    """
    from streams.errors import UserError, check_broker

    args = build_parser().parse_args(argv)
    try:
        if not 0 <= args.port <= 65535:
            raise UserError(f"console: --port must be 0..65535, got {args.port}")
        if args.max_incidents < 1:
            raise UserError(f"console: --max-incidents must be at least 1, got {args.max_incidents}")
        settings = _settings(args.broker)
        check_broker(settings, source="--broker" if args.broker else None)
        if not _is_loopback(args.host):
            print(f"breakwater console: listening on {args.host}, not loopback: anyone who can reach it can read "
                  "incidents (there is no authentication)", file=sys.stderr)

        def announce(url: str) -> None:
            print(f"Breakwater console: {url}", flush=True)

        try:
            asyncio.run(serve(settings, args.host, args.port, announce,
                              state=ConsoleState(max_incidents=args.max_incidents)))
        except OSError as exc:
            raise UserError(f"console: cannot listen on {args.host}:{args.port}: "
                            f"{exc.strerror or exc}") from exc
    except UserError as exc:
        if args.debug:
            import traceback

            traceback.print_exc()
        print(f"breakwater: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


def _settings(broker: str | None) -> Settings:
    from streams.errors import UserError
    from streams.settings import Settings

    try:
        return Settings(**({"broker": broker} if broker else {}))
    except ValidationError as exc:
        e = exc.errors()[0]
        loc = ".".join(str(x) for x in e["loc"])
        name = ("--broker" if loc == "broker" and broker else f"BREAKWATER_{loc.upper()}") if loc else "configuration"
        msg = e["msg"].removeprefix("Value error, ")
        raise UserError(f"configuration error: {name}: {msg}") from exc


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
