"""``breakwater backtest``: a policy tried on recorded traffic before it touches live traffic.

One pass over the input — the input topics from the offsets of a time range, or files as ``replay``
reads them — feeds the same decoded batches to two :class:`streams.replay.Replayer` instances (the
keyed runner of every stage, in memory, on event time): one under the NEW policy, one under the
CURRENT one (the built-in defaults unless ``--against``). Nothing is published and no offset is
committed (no consumer group). The report compares what each policy would have done (README
"Backtest: try a policy on recorded traffic"):

* incidents by ``incident_id`` — only under NEW, only under CURRENT, under both — per detector and
  tenant. Incident ids hash (detector, scope, episode start) and never the policy mode, so the
  same episode has the same id under both policies; a changed threshold that moves an episode's
  start makes two different episodes, and the report counts them so;
* breaker commands (not releases) the same way by ``command_id``, with the ones whose mode differs;
* per policy, the scopes each action would have held (sessions halted / held / throttled, …) and
  the breaker-minutes: per Kafka key of the breaker topic, from a command's ``issued_at`` until the
  next record of that key (a release or a newer command) or its ``expires_at``, as a gateway sees it;
* spend in the sessions a policy would have stopped (an enforced ``halt``/``hold``/``trip`` on the
  session): everything those sessions spent in the input, and what they spent while stopped — the
  most that enforcement would have saved. A span's cost is what ``cost_velocity`` counts
  (reported cost, else tokens × that policy's prices; agent spans skipped; unpriced spans counted,
  never guessed);
* a few examples of each kind with their evidence, and a timeline of opened incidents per detector.

The report is deterministic: the same input range and policies give the same bytes (Kafka records
are merged across partitions in (timestamp, topic, partition, offset) order, never arrival order;
no wall clock enters it). It names exactly what it covered: topic/partition/offset ranges, or
files with their size and SHA-256, and the policies with their SHA-256.
"""

from __future__ import annotations

import hashlib
import heapq
import html
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import orjson

from streams.detectors.cost import NANO
from streams.ingest import Limits, decode
from streams.ingest.decode import iter_numbered
from streams.models import Span
from streams.policy import Policy, rfc3339
from streams.pricing import span_cost
from streams.replay import REPLAY_BATCH_SPANS, REPLAY_LIMITS, Replayer, young_gc_threshold
from streams.semconv import AGENT_OPERATIONS, is_model_call, operation_of, session_of

SCHEMA_VERSION = 1
SIDES = ("new", "current")
KINDS = ("only_new", "only_current", "both")
DETECTORS = ("no_progress_loop", "retry_storm", "cost_velocity", "plan_deadlock", "silent_success")
DENY = ("halt", "trip", "hold")  # actions that stop a scope (a throttle slows it)
EXAMPLES_PER_DETECTOR = 3
SESSION_SPEND_TTL_NS = 1800 * 10**9  # spend of a session idle this long (event time) and never stopped is dropped
MIN_NS = 60 * 10**9


# ----------------------------------------------------------------------------- one policy's outcome


@dataclass
class _Incident:
    first: dict[str, Any]  # its first record (normally ``open``)
    detected_ns: int
    records: int = 1
    last_status: str = ""
    resolved_ns: int | None = None


class Side:
    """One policy: its replayer, the incidents and commands it produced, the spend it saw."""

    def __init__(self, name: str, policy: Policy) -> None:
        self.name = name
        self.policy = policy
        self.rep = Replayer(policy)
        self.incidents: dict[str, _Incident] = {}
        self.commands: dict[str, dict[str, Any]] = {}  # command_id -> command (not releases)
        self.records: list[tuple[int, int, str, dict[str, Any]]] = []  # (t, seq, kafka key, command or release)
        self.prices = policy.price_table()
        self.spend: dict[str, list[int]] = {}  # session -> [nano-USD, last end_ns]
        self.unpriced = 0
        self.stopped_at: dict[str, int] = {}  # session -> first issued_at of a deny on it (either mode)
        self.after: dict[str, dict[tuple[str, str], tuple[int, int]]] = {}  # session -> span -> (end_ns, nusd)
        self._seq = 0

    # outputs -------------------------------------------------------------------------------
    def absorb(self, outputs: list) -> None:
        for o in outputs:
            d = orjson.loads(o.value)
            if o.kind == "incident":
                iid = d["incident_id"]
                rec = self.incidents.get(iid)
                if rec is None:
                    rec = self.incidents[iid] = _Incident(d, o.detected_at_ns)
                else:
                    rec.records += 1
                rec.last_status = d.get("status", "")
                if rec.last_status == "resolved" and rec.resolved_ns is None:
                    rec.resolved_ns = o.detected_at_ns
                continue
            self._seq += 1
            self.records.append((o.detected_at_ns, self._seq, o.key.decode(), d))
            if d["action"] == "release":
                continue
            self.commands.setdefault(d["command_id"], d)
            sc = d["scope"]
            if d["action"] in DENY and sc["kind"] == "session" and sc["key"] not in self.stopped_at:
                self.stopped_at[sc["key"]] = o.detected_at_ns
                self.after[sc["key"]] = {}

    # spend ---------------------------------------------------------------------------------
    def account(self, costs: list[tuple[str, str, str, int, int]]) -> None:
        """``costs``: (session, trace id, span id, end_ns, nano-USD) of the batch's priced spans."""
        spend, stopped, after = self.spend, self.stopped_at, self.after
        for session, tid, sid, t, nusd in costs:
            acc = spend.get(session)
            if acc is None:
                spend[session] = [nusd, t]
            else:
                acc[0] += nusd
                if t > acc[1]:
                    acc[1] = t
            at = stopped.get(session)
            if at is not None and t > at:
                after[session][(tid, sid)] = (t, nusd)

    def sweep(self, watermark_ns: int) -> None:
        """Forget the spend of sessions idle for :data:`SESSION_SPEND_TTL_NS` that were never stopped."""
        cut = watermark_ns - SESSION_SPEND_TTL_NS
        gone = [s for s, (_, last) in self.spend.items() if last < cut and s not in self.stopped_at]
        for s in gone:
            del self.spend[s]


def span_costs(spans: list[Span], prices: Any) -> tuple[list[tuple[str, str, str, int, int]], int]:
    """The batch's spans that cost money, as ``cost_velocity`` counts them, and the unpriced count.

    >>> mk = lambda sid, a: Span("t" * 32, sid, None, "chat", "CLIENT", 0, 5, "OK", "", a, {})
    >>> span_costs([mk("a" * 16, {"gen_ai.usage.cost": 0.25, "session.id": "s1"}),
    ...             mk("b" * 16, {"gen_ai.request.model": "mystery", "gen_ai.usage.input_tokens": 9})], None)
    ([('s1', 'tttttttttttttttttttttttttttttttt', 'aaaaaaaaaaaaaaaa', 5, 250000000)], 1)
    """
    out = []
    unpriced = 0
    for span in spans:
        op = operation_of(span)
        if op in AGENT_OPERATIONS:
            continue
        c = span_cost(span, prices, model_call=is_model_call(span, op))
        if c is None:
            unpriced += 1
        elif c > 0:
            out.append((session_of(span), span.trace_id, span.span_id, span.end_ns, int(c * NANO + 0.5)))
    return out, unpriced


# ----------------------------------------------------------------------------- the pass


@dataclass
class Progress:
    messages: int = 0
    spans: int = 0
    event_time_ns: int = 0
    incidents: dict[str, int] = field(default_factory=dict)


@dataclass
class Backtest:
    """Both policies over one stream of decoded batches."""

    new: Policy
    current: Policy
    batch_spans: int = REPLAY_BATCH_SPANS

    def __post_init__(self) -> None:
        self.sides = [Side("new", self.new), Side("current", self.current)]
        self.messages = 0
        self.spans = 0
        self.rejected: Counter[str] = Counter()
        self.first_event_ns: int | None = None
        self.last_event_ns = 0
        self._pending: list[Span] = []
        self._batches = 0
        same_prices = (self.new.spec.prices == self.current.spec.prices
                       and self.new.spec.default_prices == self.current.spec.default_prices)
        self._price_groups = [[0, 1]] if same_prices else [[0], [1]]

    def message(self, payload: bytes | None, limits: Limits) -> None:
        """One input message (a Kafka record value, or a file's document)."""
        self.messages += 1
        d = decode(payload if payload is not None else b"", limits=limits)
        for r in d.rejections:
            self.rejected[r.reason] += 1
        if d.spans:
            self._pending.extend(d.spans)
            if len(self._pending) >= self.batch_spans:
                self.flush()

    def flush(self) -> None:
        spans, self._pending = self._pending, []
        if not spans:
            return
        self.spans += len(spans)
        for s in spans:
            t = s.end_ns
            if self.first_event_ns is None or t < self.first_event_ns:
                self.first_event_ns = t
            if t > self.last_event_ns:
                self.last_event_ns = t
        for side in self.sides:
            side.absorb(side.rep.feed(spans))
        self._account(spans)
        self._batches += 1
        if not self._batches % 64:
            for side in self.sides:
                side.sweep(side.rep.watermark_ns)

    def _account(self, spans: list[Span]) -> None:
        for group in self._price_groups:
            costs, unpriced = span_costs(spans, self.sides[group[0]].prices)
            for i in group:
                self.sides[i].account(costs)
                self.sides[i].unpriced += unpriced

    def finish(self) -> None:
        self.flush()
        for side in self.sides:
            side.absorb(side.rep.finish())

    def progress(self) -> Progress:
        return Progress(self.messages, self.spans + len(self._pending), self.last_event_ns,
                        {s.name: len(s.incidents) for s in self.sides})


# ----------------------------------------------------------------------------- files


class _HashingReader:
    """A binary file seen through :func:`iter_numbered` (lines, then ``read``), hashed as it is read."""

    def __init__(self, fp: BinaryIO) -> None:
        self.fp = fp
        self.sha = hashlib.sha256()
        self.size = 0

    def __iter__(self) -> Iterator[bytes]:
        for line in self.fp:
            self.sha.update(line)
            self.size += len(line)
            yield line

    def read(self, n: int = -1) -> bytes:
        b = self.fp.read(n)
        self.sha.update(b)
        self.size += len(b)
        return b


def run_files(bt: Backtest, inputs: Iterable[BinaryIO], names: list[str],
              tick: Callable[[], None] | None = None) -> list[dict[str, Any]]:
    """Feed files (each document a message, as ``replay`` reads them); returns what was covered."""
    covered = []
    with young_gc_threshold():
        for fp, name in zip(inputs, names, strict=True):
            r = _HashingReader(fp)
            for _, doc in iter_numbered(r):  # type: ignore[arg-type]
                bt.message(doc, REPLAY_LIMITS)
                if tick is not None and not bt.messages & 255:
                    tick()
            for _ in r:  # whatever iter_numbered left unread (trailing blank lines)
                pass
            covered.append({"file": name, "bytes": r.size, "sha256": r.sha.hexdigest()})
        bt.finish()
    return covered


# ----------------------------------------------------------------------------- Kafka


@dataclass
class _Part:
    topic: str
    partition: int
    start: int  # the first offset of the range (the first record at/after --since, once seen)
    end: int | None  # the offset after the range (the first record at/after --until, or the data's end)
    target: int = 0  # the end offset the broker reported at the start (open ranges read at least this far)
    buf: list[Any] = field(default_factory=list)
    head: int = 0
    done: bool = False
    messages: int = 0
    last: int | None = None  # the offset after the last record taken
    paused: bool = False
    begun: bool = False  # a record at/after --since was seen
    quiet_since: float = field(default_factory=time.monotonic)

    @property
    def tp(self) -> Any:
        from aiokafka import TopicPartition

        return TopicPartition(self.topic, self.partition)


async def run_kafka(bt: Backtest, settings: Any, since_ms: int, until_ms: int, *,
                    tick: Callable[[], None] | None = None, idle_s: float = 1.0, err: Any = None,
                    timeout_s: float = 30.0) -> dict[str, Any]:
    """Read the input topics' records from ``since_ms`` up to ``until_ms`` (record timestamps), merged
    across partitions and topics in (timestamp, topic, partition, offset) order, and feed them.

    Per partition the range starts at the first record, in offset order, whose timestamp is at or
    after ``since_ms`` and ends before the first one at or after ``until_ms`` — what Kafka's
    ``offsets_for_times`` answers, decided here on the records' own timestamps (the broker's answer
    only says where to start looking: the embedded broker answers 0). When no record is at or after
    ``until_ms`` yet, the range ends where the partition's data ends (read until the partition has
    been quiet for ``idle_s``, past the end offset the broker reported: the embedded broker can
    under-report it). No group id, no commit, nothing published."""
    from aiokafka import AIOKafkaConsumer

    err = err or sys.stderr
    consumer = AIOKafkaConsumer(**settings.kafka_client_kwargs(), group_id=None, enable_auto_commit=False,
                                auto_offset_reset="earliest", client_id="breakwater-backtest",
                                max_partition_fetch_bytes=max(settings.max_message_bytes, 1_048_576))
    limits = Limits(max_message_bytes=settings.max_message_bytes)
    await consumer.start()
    topics = [settings.topic_spans, settings.topic_otlp]
    parts: list[_Part] = []
    absent: list[str] = []
    try:
        await consumer._client.force_metadata_update()  # noqa: SLF001 (never subscribe: no auto-creation)
        tps = []
        for topic in topics:
            ps = consumer.partitions_for_topic(topic)
            if not ps:
                absent.append(topic)
                print(f"breakwater backtest: topic {topic} does not exist; nothing read from it", file=err)
                continue
            tps.extend(_Part(topic, p, 0, None).tp for p in sorted(ps))
        if tps:
            consumer.assign(tps)
            # a hint only: Kafka answers the first offset at/after the time, the embedded broker may
            # answer 0; the range itself is decided on the records' own timestamps below
            starts = await consumer.offsets_for_times({tp: since_ms for tp in tps})
            highs = await consumer.end_offsets(tps)
            lows = await consumer.beginning_offsets(tps)
            for tp in tps:
                hi = highs.get(tp, 0)
                s = starts.get(tp)
                start = max(s.offset if s is not None else hi, lows.get(tp, 0))
                parts.append(_Part(tp.topic, tp.partition, start, None, target=hi))
                consumer.seek(tp, start)
        by_tp = {(p.topic, p.partition): p for p in parts}
        live = [p for p in parts if not p.done]
        last_progress = time.monotonic()
        heap: list[tuple[int, str, int, int, _Part]] = []

        def take(p: _Part) -> None:
            """Move the head of ``p`` onto the merge heap (one entry per partition at most)."""
            if p.head < len(p.buf):
                r = p.buf[p.head]
                heapq.heappush(heap, (r.timestamp, p.topic, p.partition, r.offset, p))

        while True:
            # merge: emit while every partition still open has a record waiting
            while heap and all(q.done or q.head < len(q.buf) for q in live):
                _, _, _, _, p = heapq.heappop(heap)
                r = p.buf[p.head]
                p.head += 1
                if p.head >= len(p.buf):
                    p.buf, p.head = [], 0
                p.messages += 1
                bt.message(r.value, limits)
                if tick is not None and not bt.messages & 255:
                    tick()
                take(p)
                if p.paused and len(p.buf) - p.head < 1000:
                    consumer.resume(p.tp)
                    p.paused = False
                    p.quiet_since = time.monotonic()  # quiet counts from the resume, not the pause
            if all(q.done for q in live):
                while heap:  # the last partitions' tails
                    _, _, _, _, p = heapq.heappop(heap)
                    r = p.buf[p.head]
                    p.head += 1
                    p.messages += 1
                    bt.message(r.value, limits)
                    if p.head < len(p.buf):
                        take(p)
                break
            batch = await consumer.getmany(timeout_ms=200, max_records=2000)
            got = False
            for tp, recs in batch.items():
                p = by_tp[(tp.topic, tp.partition)]
                if p.done:
                    continue
                was_empty = p.head >= len(p.buf)
                for r in recs:
                    if r.offset < p.start:
                        continue
                    if not p.begun:
                        if r.timestamp < since_ms:  # before the range (the offset hint can be early)
                            p.start = r.offset + 1
                            continue
                        p.begun, p.start = True, r.offset
                    if r.timestamp >= until_ms:
                        p.end = r.offset
                        p.done = True
                        consumer.pause(tp)
                        break
                    p.buf.append(r)
                    p.last = r.offset + 1
                    p.quiet_since = time.monotonic()
                    got = True
                if was_empty:
                    take(p)
                if not p.done and len(p.buf) - p.head > 5000 and not p.paused:
                    consumer.pause(tp)
                    p.paused = True
            now = time.monotonic()
            if got:
                last_progress = now
            for p in live:
                if p.done or p.paused:  # a paused partition is not quiet: it has more than it read
                    continue
                pos = await consumer.position(p.tp)
                if pos >= p.target and now - p.quiet_since >= idle_s:
                    if not p.begun:
                        p.start = max(pos, p.start)
                    p.end = p.start if p.last is None else p.last
                    p.done = True
                    consumer.pause(p.tp)
            if not got and now - last_progress > timeout_s and not any(q.paused for q in live):
                waiting = ", ".join(f"{q.topic}[{q.partition}]" for q in live if not q.done)
                raise TimeoutError(f"no records for {timeout_s:.0f} s while reading {waiting}")
        bt.finish()
    finally:
        await consumer.stop()
    ranges = [{"topic": p.topic, "partition": p.partition, "start": p.start,
               "end": p.end if p.end is not None else p.start, "messages": p.messages} for p in parts]
    return {"since": rfc3339(since_ms * 10**6), "until": rfc3339(until_ms * 10**6), "topics": topics,
            "absent_topics": absent, "ranges": ranges}


# ----------------------------------------------------------------------------- the report


def _usd(nusd: int) -> float:
    return round(nusd / NANO, 6)


def _timeline_of(side: Side) -> dict[str, list[int]]:
    out: dict[str, list[int]] = defaultdict(list)
    for rec in side.incidents.values():
        out[rec.first["detector"]].append(rec.detected_ns)
    return out


_BUCKETS_S = (60, 300, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400)


def _bucket_s(lo: int, hi: int, most: int = 96) -> int:
    """The timeline's bucket: the smallest round size that gives at most ``most`` buckets.

    >>> _bucket_s(0, 3600 * 10**9), _bucket_s(0, 86_400 * 10**9), _bucket_s(0, 30 * 86_400 * 10**9)
    (60, 1800, 43200)
    """
    span_s = max(1, (hi - lo) // 10**9 + 1)
    for b in _BUCKETS_S:
        if span_s / b <= most:
            return b
    return 86400 * ((span_s // (86400 * most)) + 1)


def _in_force(side: Side) -> dict[str, list[tuple[int, int, dict[str, Any]]]]:
    """Per breaker key: the intervals each command was in force, as a gateway sees the topic (the latest
    record of a key wins; a command ends at its ``expires_at``)."""
    by_key: dict[str, list[tuple[int, int, dict[str, Any]]]] = defaultdict(list)
    for t, seq, key, d in sorted(side.records, key=lambda r: (r[0], r[1])):
        by_key[key].append((t, seq, d))
    out: dict[str, list[tuple[int, int, dict[str, Any]]]] = {}
    for key, recs in by_key.items():
        cur: tuple[int, int, dict[str, Any]] | None = None  # (from, expires, command)
        spans: list[tuple[int, int, dict[str, Any]]] = []
        for t, _, d in recs:
            if cur is not None:
                spans.append((cur[0], min(cur[1], t), cur[2]))
                cur = None
            if d["action"] != "release":
                cur = (t, _ns(d.get("expires_at")) or t, d)
        if cur is not None:
            spans.append(cur)
        out[key] = [(a, b, d) for a, b, d in spans if b > a]
    return out


def _ns(value: str | None) -> int | None:
    if not value:
        return None
    from datetime import datetime

    dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return int(dt.timestamp()) * 10**9 + dt.microsecond * 1000


def _stops(side: Side) -> dict[str, Any]:
    forced = _in_force(side)
    scopes: dict[str, dict[str, dict[str, set[str]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(set)))
    minutes: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for cmd in side.commands.values():
        sc = cmd["scope"]
        scopes[cmd["mode"]][cmd["action"]][sc["kind"]].add(sc["key"])
    stopped_windows: dict[str, dict[str, list[tuple[int, int]]]] = {"enforce": {}, "shadow": {}}
    for key, spans in forced.items():
        for a, b, d in spans:
            minutes[d["mode"]][d["action"]] += (b - a) / MIN_NS
            if d["action"] in DENY and d["scope"]["kind"] == "session":
                stopped_windows[d["mode"]].setdefault(d["scope"]["key"], []).append((a, b))
    out: dict[str, Any] = {}
    for mode in ("enforce", "shadow"):
        total = during = 0
        for session, windows in stopped_windows[mode].items():
            total += side.spend.get(session, [0, 0])[0]
            for t, nusd in side.after.get(session, {}).values():
                if any(a < t <= b for a, b in windows):
                    during += nusd
        out[mode] = {
            "scopes": {action: {kind: len(keys) for kind, keys in sorted(kinds.items())}
                       for action, kinds in sorted(scopes[mode].items())},
            "breaker_minutes": {action: round(m, 3) for action, m in sorted(minutes[mode].items())},
            "stopped_sessions": len(stopped_windows[mode]),
            "spend_usd": _usd(total),
            "spend_while_stopped_usd": _usd(during),
        }
    return out


def _example(iid: str, recs: dict[str, _Incident | None], cmds: dict[str, dict[str, Any] | None]) -> dict[str, Any]:
    base = next(r for r in (recs["new"], recs["current"]) if r is not None)
    d = base.first
    ex: dict[str, Any] = {
        "incident_id": iid, "detector": d["detector"], "tenant": d.get("tenant"), "scope": d["scope"],
        "severity": d.get("severity"), "summary": d.get("summary"), "first_seen": d.get("first_seen"),
        "evidence": d.get("evidence"),
    }
    for side in SIDES:
        r = recs[side]
        c = cmds[side]
        ex[side] = None if r is None else {
            "detected_at": r.first.get("detected_at"), "status": r.last_status, "records": r.records,
            "policy_mode": r.first.get("policy_mode"),
            "command": None if c is None else {"command_id": c["command_id"], "action": c["action"],
                                               "mode": c["mode"], "scope": c["scope"],
                                               "expires_at": c.get("expires_at")},
        }
    return ex


def build_report(bt: Backtest, covered: dict[str, Any], policies: dict[str, dict[str, Any]],
                 examples: int = EXAMPLES_PER_DETECTOR) -> dict[str, Any]:
    new, cur = bt.sides
    # incidents
    ids = sorted(set(new.incidents) | set(cur.incidents))
    inc_rows: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
    kind_of: dict[str, str] = {}
    first_cmd = {s.name: {} for s in bt.sides}  # incident id -> its first (non-release) command
    for s in bt.sides:
        for cmd in sorted(s.commands.values(), key=lambda c: (c["issued_at"], c["command_id"])):
            if cmd.get("incident_id"):
                first_cmd[s.name].setdefault(cmd["incident_id"], cmd)
    for iid in ids:
        a, b = new.incidents.get(iid), cur.incidents.get(iid)
        kind = "both" if a and b else "only_new" if a else "only_current"
        kind_of[iid] = kind
        d = (a or b).first  # type: ignore[union-attr]
        inc_rows[(d["detector"], d.get("tenant") or "-")][kind] += 1
    # commands
    cids = sorted(set(new.commands) | set(cur.commands))
    cmd_rows: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
    for cid in cids:
        a, b = new.commands.get(cid), cur.commands.get(cid)
        kind = "both" if a and b else "only_new" if a else "only_current"
        d = a or b
        row = cmd_rows[(d["detector"] or "-", d["scope"].get("tenant") or "-")]  # type: ignore[index]
        row[kind] += 1
        if a and b and a["mode"] != b["mode"]:
            row["mode_changed"] += 1

    def rows(table: dict[tuple[str, str], Counter[str]], extra: tuple[str, ...] = ()) -> list[dict[str, Any]]:
        return [{"detector": det, "tenant": ten, **{k: c[k] for k in KINDS + extra}}
                for (det, ten), c in sorted(table.items(), key=lambda kv: (_det_order(kv[0][0]), kv[0][1]))]

    def totals(table: dict[tuple[str, str], Counter[str]], extra: tuple[str, ...] = ()) -> dict[str, Any]:
        t: Counter[str] = Counter()
        for c in table.values():
            t.update(c)
        return {k: t[k] for k in KINDS + extra}

    # examples: per kind, per detector, the first by detection time
    ex: dict[str, list[dict[str, Any]]] = {k: [] for k in KINDS}
    by_kind_det: dict[tuple[str, str], list[tuple[int, str]]] = defaultdict(list)
    for iid, kind in kind_of.items():
        r = new.incidents.get(iid) or cur.incidents[iid]
        by_kind_det[(kind, r.first["detector"])].append((r.detected_ns, iid))
    for (kind, det), lst in sorted(by_kind_det.items(), key=lambda kv: (KINDS.index(kv[0][0]), _det_order(kv[0][1]))):
        for _, iid in sorted(lst)[:examples]:
            ex[kind].append(_example(iid, {"new": new.incidents.get(iid), "current": cur.incidents.get(iid)},
                                     {s: first_cmd[s].get(iid) for s in SIDES}))
    # timeline
    tl = {s.name: _timeline_of(s) for s in bt.sides}
    times = [t for side in tl.values() for lst in side.values() for t in lst]
    lo = bt.first_event_ns if bt.first_event_ns is not None else (min(times) if times else 0)
    hi = max([bt.last_event_ns, *times]) if times or bt.last_event_ns else lo
    bucket = _bucket_s(lo, hi)
    start = lo // (bucket * 10**9) * bucket * 10**9
    n = (hi - start) // (bucket * 10**9) + 1 if hi >= start else 1
    series = {}
    for det in sorted({d for side in tl.values() for d in side} | set(), key=_det_order):
        series[det] = {}
        for s in SIDES:
            counts = [0] * n
            for t in tl[s].get(det, []):
                i = min(max((t - start) // (bucket * 10**9), 0), n - 1)
                counts[i] += 1
            series[det][s] = counts
    rejected = dict(sorted(bt.rejected.items()))
    return {
        "report": "breakwater backtest",
        "schema_version": SCHEMA_VERSION,
        "input": {**covered, "messages": bt.messages, "spans": bt.spans, "rejected": rejected,
                  "event_time": {"first": rfc3339(bt.first_event_ns) if bt.first_event_ns is not None else None,
                                 "last": rfc3339(bt.last_event_ns) if bt.last_event_ns else None}},
        "policies": policies,
        "summary": {s.name: {"incidents": len(s.incidents), "commands": len(s.commands),
                             "resolved": sum(1 for r in s.incidents.values() if r.last_status == "resolved"),
                             "unpriced_spans": s.unpriced, "duplicates_skipped": s.rep.stats.duplicates,
                             "clock_skew_rejected": s.rep.stats.rejected.get("clock_skew", 0)}
                    for s in bt.sides},
        "incidents": {"match": "incident_id", "totals": totals(inc_rows), "by_detector_tenant": rows(inc_rows)},
        "commands": {"match": "command_id", "totals": totals(cmd_rows, ("mode_changed",)),
                     "by_detector_tenant": rows(cmd_rows, ("mode_changed",))},
        "stops": {s.name: _stops(s) for s in bt.sides},
        "spend_rule": ("cost of the session's spans as cost_velocity counts it (reported, else tokens x that "
                       "policy's prices; agent spans skipped; unpriced spans not counted). spend_usd: everything "
                       "the stopped sessions spent in the input (a session idle 30 min before its stop counts "
                       "from its return); spend_while_stopped_usd: spans read after the command, ending while it "
                       "was in force"),
        "timeline": {"start": rfc3339(start), "bucket_s": bucket, "buckets": n, "opened": series},
        "examples": ex,
    }


def _det_order(det: str) -> tuple[int, str]:
    return (DETECTORS.index(det) if det in DETECTORS else len(DETECTORS), det)


def to_json(report: dict[str, Any]) -> bytes:
    return orjson.dumps(report, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"


# ----------------------------------------------------------------------------- terminal table


def _table(headers: list[str], rows: list[list[Any]], right: set[int]) -> list[str]:
    cells = [[str(c) for c in r] for r in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]

    def line(r: list[str]) -> str:
        return "  ".join(c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(r)).rstrip()

    return [line(headers), line(["-" * w for w in widths]), *(line(r) for r in cells)]


def to_text(report: dict[str, Any]) -> str:
    from streams.tail import clean

    inp = report["input"]
    out: list[str] = ["breakwater backtest"]
    pol = report["policies"]
    out.append(f"  NEW      {clean(pol['new']['source'], 200)}  sha256:{pol['new']['sha256'][:16]}")
    out.append(f"  CURRENT  {clean(pol['current']['source'], 200)}  sha256:{pol['current']['sha256'][:16]}")
    if "ranges" in inp:
        out.append(f"  input    Kafka records with timestamps from {inp['since']} to {inp['until']} (before)")
        for r in inp["ranges"]:
            out.append(f"           {clean(r['topic'], 120)}[{r['partition']}] offsets {r['start']}..{r['end']} "
                       f"({r['messages']:,} messages)")
        for t in inp.get("absent_topics", []):
            out.append(f"           {clean(t, 120)}: topic absent")
    else:
        for f in inp["files"]:
            out.append(f"  input    {clean(f['file'], 200)}  {f['bytes']:,} B  sha256:{f['sha256'][:16]}")
    ev = inp["event_time"]
    rej = ", ".join(f"{k}={v}" for k, v in inp["rejected"].items())
    out.append(f"  read     {inp['messages']:,} messages, {inp['spans']:,} spans, event time {ev['first'] or '-'} .. "
               f"{ev['last'] or '-'}" + (f", rejected: {rej}" if rej else ""))
    out.append("")
    out.append("Incidents (matched by incident_id)")
    rows = [[r["detector"], clean(r["tenant"], 40), r["only_new"], r["only_current"], r["both"]]
            for r in report["incidents"]["by_detector_tenant"]]
    t = report["incidents"]["totals"]
    rows.append(["all", "", t["only_new"], t["only_current"], t["both"]])
    out += _table(["detector", "tenant", "only NEW", "only CURRENT", "both"], rows, {2, 3, 4})
    out.append("")
    out.append("Breaker commands (matched by command_id; releases not counted)")
    rows = [[r["detector"], clean(r["tenant"], 40), r["only_new"], r["only_current"], r["both"], r["mode_changed"]]
            for r in report["commands"]["by_detector_tenant"]]
    t = report["commands"]["totals"]
    rows.append(["all", "", t["only_new"], t["only_current"], t["both"], t["mode_changed"]])
    out += _table(["detector", "tenant", "only NEW", "only CURRENT", "both", "mode differs"], rows, {2, 3, 4, 5})
    out.append("")
    out.append("What each policy would have done (enforce stops; shadow only reports)")
    rows = []
    for side in SIDES:
        for mode in ("enforce", "shadow"):
            st = report["stops"][side][mode]
            held = "; ".join(f"{a} " + ", ".join(f"{n} {k}" for k, n in kinds.items())
                             for a, kinds in st["scopes"].items()) or "-"
            mins = ", ".join(f"{a} {m:,.1f}" for a, m in st["breaker_minutes"].items()) or "-"
            rows.append([side.upper(), mode, held, mins, st["stopped_sessions"], f"${st['spend_usd']:,.2f}",
                         f"${st['spend_while_stopped_usd']:,.2f}"])
    out += _table(["policy", "mode", "scopes commanded", "breaker-minutes", "sessions stopped", "their spend",
                   "spent while stopped"], rows, {4, 5, 6})
    out.append("")
    for kind, title in (("only_new", "Only under NEW"), ("only_current", "Only under CURRENT"),
                        ("both", "Under both")):
        exs = report["examples"][kind]
        if not exs:
            out.append(f"{title}: none")
            out.append("")
            continue
        out.append(f"{title} (examples)")
        for e in exs:
            sides = []
            for s in SIDES:
                x = e[s]
                if x is None:
                    continue
                c = x["command"]
                cmd = f" {c['action']} {c['mode']}" if c else ""
                sides.append(f"{s.upper()} {x['detected_at']}{cmd}")
            out.append(f"  {e['incident_id']}  {e['detector']}  {clean(e['scope']['kind'], 20)}:"
                       f"{clean(e['scope']['key'], 80)}  tenant {clean(e['tenant'], 40)}  " + "  ".join(sides))
            out.append(f"      {clean(e['summary'], 300)}")
            evidence = orjson.dumps(e["evidence"], option=orjson.OPT_SORT_KEYS).decode()
            out.append(f"      evidence {clean(evidence, 300)}")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


# ----------------------------------------------------------------------------- HTML


NEW_COLOR = "#d9480f"
CURRENT_COLOR = "#1864ab"


def _svg(det: str, tl: dict[str, Any], series: dict[str, list[int]]) -> str:
    w, h, left, right, top, bottom = 900, 180, 48, 12, 14, 30
    n = tl["buckets"]
    peak = max([1, *series["new"], *series["current"]])
    pw, ph = w - left - right, h - top - bottom

    def x(i: float) -> float:
        return left + (pw * (i + 0.5) / n)

    def y(v: int) -> float:
        return top + ph - ph * v / peak

    parts = [f'<svg class="timeline" data-detector="{html.escape(det)}" viewBox="0 0 {w} {h}" width="{w}" '
             f'height="{h}" role="img" aria-label="{html.escape(det)} incidents opened over event time">']
    parts.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="#fff" stroke="#ccc"/>')
    for v in sorted({0, peak // 2, peak}):
        parts.append(f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end" class="ax">{v}</text>')
        parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#eee"/>')
    start_s = _ns(tl["start"]) // 10**9  # type: ignore[operator]
    for i in sorted({0, n // 2, n - 1}):
        label = rfc3339((start_s + i * tl["bucket_s"]) * 10**9)[:16].replace("T", " ")
        anchor = "start" if i == 0 else "end" if i == n - 1 else "middle"
        parts.append(f'<text x="{x(i):.1f}" y="{h - 10}" text-anchor="{anchor}" class="ax">{label}</text>')
    for side, color, dash in (("current", CURRENT_COLOR, ""), ("new", NEW_COLOR, ' stroke-dasharray="6 3"')):
        pts = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(series[side]))
        parts.append(f'<polyline class="series" data-side="{side}" points="{pts}" fill="none" stroke="{color}" '
                     f'stroke-width="3"{dash}/>')
        for i, v in enumerate(series[side]):
            if v:
                parts.append(f'<circle cx="{x(i):.1f}" cy="{y(v):.1f}" r="4" fill="{color}"/>')
    parts.append("</svg>")
    return "".join(parts)


def to_html(report: dict[str, Any]) -> str:
    """A self-contained page: the terminal report's tables, one timeline per detector, the examples.
    No script and no external asset (a Content-Security-Policy forbids loading any)."""
    e = html.escape
    text = to_text(report)
    tl = report["timeline"]
    plots = []
    for det, series in tl["opened"].items():
        tn, tc = sum(series["new"]), sum(series["current"])
        plots.append(f'<section class="plot"><h3>{e(det)} <span class="k new">NEW {tn}</span> '
                     f'<span class="k cur">CURRENT {tc}</span></h3>{_svg(det, tl, series)}</section>')
    if not plots:
        plots.append("<p>No incident under either policy.</p>")
    ex_html = []
    for kind in KINDS:
        for x in report["examples"][kind]:
            ev = orjson.dumps(x["evidence"], option=orjson.OPT_SORT_KEYS | orjson.OPT_INDENT_2).decode()
            ex_html.append(f'<details data-incident-id="{e(x["incident_id"])}" data-kind="{kind}"><summary>'
                           f'<b>{e(kind.replace("_", " "))}</b> {e(x["incident_id"])} {e(x["detector"])} '
                           f'{e(str(x["scope"]["kind"]))}:{e(str(x["scope"]["key"]))} — {e(str(x["summary"]))}'
                           f'</summary><pre>{e(ev)}</pre></details>')
    return (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">"
        "<title>breakwater backtest</title><style>"
        "body{font-family:system-ui,sans-serif;margin:24px;color:#222;background:#fafafa}"
        "pre{background:#fff;border:1px solid #ddd;padding:10px;overflow-x:auto;font-size:12px}"
        ".ax{font-size:11px;fill:#555}.k{font-size:13px;padding:2px 6px;border-radius:3px;color:#fff}"
        f".k.new{{background:{NEW_COLOR}}}.k.cur{{background:{CURRENT_COLOR}}}"
        "section.plot{margin:8px 0 18px}h3{margin:4px 0}"
        "</style></head><body>"
        "<h1>breakwater backtest</h1>"
        f'<p>Incidents opened per {tl["bucket_s"] // 60} min of event time: '
        f'<span class="k new">NEW</span> dashed, <span class="k cur">CURRENT</span> solid.</p>'
        + "".join(plots)
        + f"<h2>Report</h2><pre>{e(text)}</pre>"
        + "<h2>Examples with evidence</h2>" + "".join(ex_html)
        + "</body></html>\n"
    )


# ----------------------------------------------------------------------------- helpers for the CLI


def policy_info(path: str | None, label_default: str = "built-in defaults") -> dict[str, Any]:
    """What the report says about a policy: where it came from and the SHA-256 of its bytes (the
    defaults hash as an empty file)."""
    if path is None:
        return {"source": label_default, "sha256": hashlib.sha256(b"").hexdigest()}
    with open(path, "rb") as fp:
        return {"source": path, "sha256": hashlib.sha256(fp.read()).hexdigest()}


def progress_line(bt: Backtest, started: float, err: Any = None, final: bool = False) -> None:
    w = err or sys.stderr
    p = bt.progress()
    secs = max(time.monotonic() - started, 1e-9)
    at = rfc3339(p.event_time_ns)[:19] + "Z" if p.event_time_ns else "-"
    lead = "backtest: done," if final else "backtest: …"
    print(f"{lead} {p.messages:,} messages, {p.spans:,} spans, event time {at}, {p.spans / secs:,.0f} spans/s, "
          f"incidents NEW {p.incidents.get('new', 0):,} / CURRENT {p.incidents.get('current', 0):,}",
          file=w, flush=True)
