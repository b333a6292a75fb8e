"""``breakwater replay``: the live detector cores on files, without Kafka, on event time.

Deterministic: the same input gives byte-identical output (no wall clock, no randomness). Spans
are processed in batches of consecutive documents (at least ``batch_spans`` spans, a document never
split); within a batch outputs come in event-time order, so the records do not depend on the batch
size and their order only within a batch. Bad lines are counted on stderr by reason, the first ones
with their file and line number, and never stop the run; a long run prints its progress on stderr.

>>> import io
>>> line = b'{"trace_id": "%s", "span_id": "%s", "name": "t", "start_time_unix_nano": %d, "end_time_unix_nano": %d, "attributes": {"gen_ai.tool.name": "ls", "tool.payload_hash": "h", "session.id": "s"}}'
>>> data = b"\\n".join(line % (b"a" * 32, b"%016x" % i, i, i) for i in range(1, 4)) + b"\\n{not json\\n"
>>> out, cmds = io.BytesIO(), io.BytesIO()
>>> stats = run([io.BytesIO(data)], out, cmds)
>>> stats.spans, stats.incidents, stats.commands, dict(stats.rejected)
(3, 1, 2, {'bad_json': 1})
"""

from __future__ import annotations

import gc
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import BinaryIO, Callable, Iterable

from streams.ingest import Limits, decode
from streams.ingest.decode import iter_numbered
from streams.ingest.clock import RobustClock
from streams.ingest.dialects import BAD_VALUES
from streams.models import Span
from streams.pipeline import Output
from streams.runner import EventClock, MemoryStore
from streams.stages import build_stages, group, merge_forwards, runner_for
from streams.policy import Policy

REPLAY_LIMITS = Limits(max_message_bytes=1 << 40, max_spans_per_message=1 << 40)
GC_YOUNG_THRESHOLD = 50_000


@contextmanager
def young_gc_threshold(n: int = GC_YOUNG_THRESHOLD) -> Iterator[None]:
    """Run the cyclic garbage collector's young generation every ``n`` allocations, not 700.

    Replay allocates many short-lived objects per span (decoded JSON, spans, aggregates) while it
    keeps a large live state; with the default threshold the collector ran ~1,500 times per 35k
    spans and took about a fifth of the run. Cyclic garbage is still collected, only in larger
    batches. The previous thresholds are restored afterwards.
    """
    old = gc.get_threshold()
    gc.set_threshold(max(n, old[0]), *old[1:])
    try:
        yield
    finally:
        gc.set_threshold(*old)


@dataclass
class ReplayStats:
    spans: int = 0
    documents: int = 0
    incidents: int = 0
    commands: int = 0
    evicted: int = 0
    duplicates: int = 0
    unpriced: int = 0  # model calls that could not be priced (their cost is never guessed)
    rejected: Counter[str] = field(default_factory=Counter)
    bad_values: Counter[str] = field(default_factory=Counter)
    examples: list[tuple[str, int, str]] = field(default_factory=list)  # (file, line, reason), the first few
    event_time_ns: int = 0  # the highest event time reached


REJECTED_EXAMPLES = 10  # rejected documents named by file and line in the summary
REPLAY_BATCH_SPANS = 1000


class Replayer:
    """Every stage's states in memory, one event-time watermark for the whole input."""

    def __init__(self, policy: Policy | None = None) -> None:
        self.policy = policy or Policy()
        self.stages = build_stages(self.policy)
        self.runners = [runner_for(st, self.policy, MemoryStore()) for st in self.stages]
        self.pipe = self.stages[0]
        self.events = EventClock(self.policy.allowed_lateness_ns)  # one partition: the whole input
        self.stats = ReplayStats()
        self.clock = RobustClock(self.policy.max_clock_skew_ns, self.policy.max_span_age_ns)

    @property
    def states(self) -> dict:
        """Session states (the loop detector's)."""
        return self.runners[0].store.states

    @property
    def max_event_ns(self) -> int:
        return self.events.high(0)

    @property
    def watermark_ns(self) -> int:
        return self.max_event_ns - self.policy.allowed_lateness_ns

    def feed(self, spans: list[Span]) -> list:
        """Process one batch (one input document); returns the outputs in event-time order.

        Spans whose time is implausible for the stream (:mod:`streams.ingest.clock`) are counted as
        ``clock_skew`` rejections and never reach a detector or the watermark."""
        n = len(spans)
        spans, rejected = self.clock.sift(spans)
        if rejected:
            self.stats.rejected["clock_skew"] += rejected
        self.stats.spans += n
        hi = 0
        for s in spans:
            if s.end_ns > hi:
                hi = s.end_ns
        wm = self.events.observe(0, hi)
        outputs = []
        for r in self.runners[:-1]:
            outputs.extend(r.feed(0, group(r.stage, spans), wm))
        forwards = merge_forwards(outputs)
        if forwards:
            outputs = [o for o in outputs if o.kind != "forward"]
            outputs.extend(self.runners[-1].feed(0, forwards, wm))
        for r in self.runners:
            fired = r.fire(0, wm)
            outputs.extend(o for o in fired if o.kind != "forward")
        # event-time order, so the output does not depend on how the input was batched
        outputs.sort(key=Output.order)
        return outputs

    def finish(self) -> list:
        """End of input: the watermark passes everything; pending timers fire, state is dropped."""
        held = self.clock.finish()
        if held:
            self.stats.rejected["clock_skew"] += held
        outputs = []
        for r in self.runners:
            outputs.extend(r.finish())
        outputs.sort(key=Output.order)
        self.stats.evicted = sum(r.evicted for r in self.runners)
        self.stats.duplicates = self.pipe.duplicates
        self.stats.unpriced = self.pipe.unpriced
        return outputs


def run(
    inputs: Iterable[BinaryIO],
    out: BinaryIO,
    commands_out: BinaryIO | None = None,
    policy: Policy | None = None,
    limits: Limits | None = None,
    batch_spans: int = REPLAY_BATCH_SPANS,
    progress: Callable[[ReplayStats], None] | None = None,
    progress_every_s: float = 5.0,
    names: list[str] | None = None,
) -> ReplayStats:
    """Replay ``inputs`` (files opened in binary mode; ``names`` label them in the summary).

    ``progress`` is called with the running stats about every ``progress_every_s`` seconds of
    wall time (a report to a person only: it never changes the output)."""
    rep = Replayer(policy)
    # A replay file may be one big JSON array: the Kafka message limits do not apply to it.
    kw = {"limits": limits or REPLAY_LIMITS}

    def emit(outputs: list) -> None:
        for o in outputs:
            if o.kind == "incident":
                out.write(o.value + b"\n")
                rep.stats.incidents += 1
            else:
                rep.stats.commands += 1
                if commands_out is not None:
                    commands_out.write(o.value + b"\n")

    bad_before = Counter(BAD_VALUES)
    pending: list[Span] = []
    stats = rep.stats
    next_report = time.monotonic() + progress_every_s
    with young_gc_threshold():
        for i, fp in enumerate(inputs):
            name = names[i] if names and i < len(names) else getattr(fp, "name", "-")
            if not isinstance(name, str) or name == "<stdin>":
                name = "-"
            for line, doc in iter_numbered(fp):
                stats.documents += 1
                decoded = decode(doc, **kw)
                if decoded.rejections:
                    for r in decoded.rejections:
                        stats.rejected[r.reason] += 1
                    if len(stats.examples) < REJECTED_EXAMPLES:
                        stats.examples.append((name, line, decoded.rejections[0].reason))
                if progress is not None and not stats.documents & 255 and time.monotonic() >= next_report:
                    next_report = time.monotonic() + progress_every_s
                    stats.event_time_ns = rep.max_event_ns
                    progress(stats)
                if decoded.spans:
                    pending.extend(decoded.spans)
                    if len(pending) >= batch_spans:
                        emit(rep.feed(pending))
                        pending = []
        if pending:
            emit(rep.feed(pending))
        emit(rep.finish())
    stats.event_time_ns = rep.max_event_ns
    rep.stats.bad_values = Counter(BAD_VALUES) - bad_before
    return rep.stats


def report(stats: ReplayStats, err: BinaryIO | None = None) -> None:
    """The stderr summary: spans, incidents, commands, and rejected lines by reason."""
    w = err or sys.stderr.buffer
    rejected = sum(stats.rejected.values())
    reasons = ", ".join(f"{k}={v}" for k, v in sorted(stats.rejected.items()))
    extra = ""
    if stats.duplicates:
        extra += f", {stats.duplicates} duplicate spans skipped"
    if stats.unpriced:
        extra += f", {stats.unpriced} model calls unpriced"
    if stats.bad_values:
        extra += ", values ignored: " + ", ".join(f"{k}={v}" for k, v in sorted(stats.bad_values.items()))
    w.write(
        f"replay: {stats.documents} documents, {stats.spans} spans, {stats.incidents} incidents, "
        f"{stats.commands} commands, {rejected} rejected{' (' + reasons + ')' if reasons else ''}{extra}\n".encode()
    )
    if stats.examples:
        more = " …" if len(stats.examples) < rejected else ""
        w.write(("replay: rejected at " + ", ".join(f"{f}:{n} ({r})" for f, n, r in stats.examples)
                 + more + "\n").encode())
    w.flush()


def progress_line(stats: ReplayStats, started: float, err: BinaryIO | None = None) -> None:
    """One progress line on stderr: documents, spans, incidents, the event time reached, the rate."""
    from datetime import datetime, timezone

    w = err or sys.stderr.buffer
    secs = max(time.monotonic() - started, 1e-9)
    at = "-"
    if stats.event_time_ns:
        at = datetime.fromtimestamp(stats.event_time_ns // 10**9, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    w.write(f"replay: … {stats.documents:,} documents, {stats.spans:,} spans, {stats.incidents:,} incidents, "
            f"event time {at}, {stats.spans / secs:,.0f} spans/s\n".encode())
    w.flush()
