"""``breakwater replay``: the live detector cores on files, without Kafka, on event time.

Deterministic: the same input gives byte-identical output (no wall clock, no randomness, outputs in
input order). Bad lines are counted on stderr by reason and never stop the run.

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
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import BinaryIO, Iterable

from streams.ingest import Limits, decode, iter_documents
from streams.ingest.clock import RobustClock
from streams.ingest.dialects import BAD_VALUES
from streams.models import Span
from streams.stages import MemoryRunner, build_stages, group, merge_forwards
from streams.pipeline import Output
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
    rejected: Counter[str] = field(default_factory=Counter)
    bad_values: Counter[str] = field(default_factory=Counter)


class Replayer:
    """Every stage's states in memory, one event-time watermark for the whole input."""

    def __init__(self, policy: Policy | None = None) -> None:
        self.policy = policy or Policy()
        self.stages = build_stages(self.policy)
        self.runners = [MemoryRunner(st) for st in self.stages]
        self.pipe = self.stages[0]
        self.max_event_ns = 0
        self.stats = ReplayStats()
        self.clock = RobustClock(self.policy.max_clock_skew_ns, self.policy.max_span_age_ns)

    @property
    def states(self) -> dict:
        """Session states (the loop detector's)."""
        return self.runners[0].states

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
        for s in spans:
            if s.end_ns > self.max_event_ns:
                self.max_event_ns = s.end_ns
        wm = self.watermark_ns
        outputs = []
        for r in self.runners[:-1]:
            outputs.extend(r.feed(group(r.stage, spans), wm))
        forwards = merge_forwards(outputs)
        if forwards:
            outputs = [o for o in outputs if o.kind != "forward"]
            outputs.extend(self.runners[-1].feed(forwards, wm))
        for r in self.runners:
            fired = r.fire(wm)
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
        return outputs


def run(
    inputs: Iterable[BinaryIO],
    out: BinaryIO,
    commands_out: BinaryIO | None = None,
    policy: Policy | None = None,
    limits: Limits | None = None,
) -> ReplayStats:
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
    with young_gc_threshold():
        for fp in inputs:
            for doc in iter_documents(fp):
                rep.stats.documents += 1
                decoded = decode(doc, **kw)
                for r in decoded.rejections:
                    rep.stats.rejected[r.reason] += 1
                if decoded.spans:
                    emit(rep.feed(decoded.spans))
        emit(rep.finish())
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
    if stats.bad_values:
        extra += ", values ignored: " + ", ".join(f"{k}={v}" for k, v in sorted(stats.bad_values.items()))
    w.write(
        f"replay: {stats.documents} documents, {stats.spans} spans, {stats.incidents} incidents, "
        f"{stats.commands} commands, {rejected} rejected{' (' + reasons + ')' if reasons else ''}{extra}\n".encode()
    )
    w.flush()
