"""Event-time plausibility: a span whose end time is far from the stream's time is an outlier.

A single span dated in 2100 must not move a watermark (it would expire every breaker and evict
every pending state), and a single span dated at 0 or an hour off must not empty a detector's
window. Such spans are rejected at ingest with reason ``clock_skew`` (counted, routed to the
dead-letter topic live, counted on stderr in replay), before any detector sees them.

* Live, the reference is the wall clock: a span ending more than ``max_clock_skew_s`` ahead of it,
  or more than ``max_span_age_s`` behind it, is an outlier (a span less old than that is late data:
  each detector judges it against its own window, and a late span never evicts newer state).
* In replay there is no wall clock: the reference is a robust estimate of the stream's own time —
  the median end time of the last :data:`RING` applied spans. A span far from it is held until
  the stream shows whether it jumped (``CONFIRM`` spans agree with it: applied, nothing lost) or
  not (it is rejected).

>>> from streams.models import Span
>>> mk = lambda t: Span("t", "s", None, "x", "INTERNAL", t * 10**9, t * 10**9, "OK", "", {}, {})
>>> c = RobustClock(max_ahead_ns=60 * 10**9, max_behind_ns=60 * 10**9)
>>> kept, bad = c.sift([mk(t) for t in (100, 101, 102, 4_000_000_000, 103, 0, 104)])
>>> [s.end_ns // 10**9 for s in kept], bad
([100, 101, 102, 103, 104], 2)
>>> kept, bad = c.sift([mk(t) for t in (9000, 9001, 9002, 9003)])   # a real jump: nothing lost
>>> [s.end_ns // 10**9 for s in kept], bad
([9000, 9001, 9002, 9003], 0)
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections import deque

from streams.models import Rejection, Span

RING = 31
MIN_SAMPLES = 3
CONFIRM = 3


class RobustClock:
    """Replay's clock: the median of the last :data:`RING` admitted end times.

    :meth:`sift` takes a batch and returns the spans to apply and how many it rejected. A span too
    far from the median is held: when :data:`CONFIRM` spans agree with it, or the stream moves on
    even further (a file that resumes hours later, a sparse stream), the held spans are applied and
    the clock moves; when the stream goes on at the old time instead, they are rejected. So one
    outlier never moves the clock and a real jump loses nothing. Deterministic: input order only.
    """

    __slots__ = ("max_ahead_ns", "max_behind_ns", "_ring", "_sorted", "held")

    def __init__(self, max_ahead_ns: int, max_behind_ns: int) -> None:
        self.max_ahead_ns = max_ahead_ns
        self.max_behind_ns = max_behind_ns
        self._ring: deque[int] = deque()
        self._sorted: list[int] = []
        self.held: list[Span] = []

    def _near(self, t: int, ref: int) -> bool:
        return -self.max_behind_ns <= t - ref <= self.max_ahead_ns

    def _add(self, t: int) -> None:
        self._ring.append(t)
        insort(self._sorted, t)
        if len(self._ring) > RING:
            old = self._ring.popleft()
            del self._sorted[bisect_left(self._sorted, old)]

    def admit(self, t: int) -> bool:
        """Whether ``t`` is plausible now (and, if so, counted in the median). No holding."""
        s = self._sorted
        ok = len(s) < MIN_SAMPLES or self._near(t, s[len(s) // 2])
        if ok:
            self._add(t)
        return ok

    def sift(self, spans: list[Span]) -> tuple[list[Span], int]:
        """``(spans to apply, number rejected)`` for the next batch, in input order."""
        out: list[Span] = []
        rejected = 0
        s = self._sorted
        for sp in spans:
            t = sp.end_ns
            while True:
                if len(s) < MIN_SAMPLES or self._near(t, s[len(s) // 2]):
                    if self.held:  # the stream went on at its old time: what was held was an outlier
                        rejected += len(self.held)
                        self.held = []
                    self._add(t)
                    out.append(sp)
                elif not self.held:
                    self.held.append(sp)
                elif self._near(t, self.held[0].end_ns):
                    self.held.append(sp)
                    if len(self.held) >= CONFIRM:  # a real jump: the clock moves, nothing is lost
                        self._jump(out)
                elif t > self.held[-1].end_ns:
                    # the stream moved on even further: what was held was a step, not an outlier
                    self._jump(out)
                    continue  # judge this span against the moved clock
                else:
                    rejected += 1
                break
        return out, rejected

    def _jump(self, out: list[Span]) -> None:
        self._ring.clear()
        self._sorted.clear()
        for h in self.held:
            self._add(h.end_ns)
            out.append(h)
        self.held = []

    def finish(self) -> int:
        """End of input: spans still held are outliers (rejected); returns how many."""
        n, self.held = len(self.held), []
        return n


def check_wall(spans: list[Span], now_ns: int, max_ahead_ns: int,
               max_behind_ns: int) -> tuple[list[Span], list[Rejection]]:
    """Live: split ``spans`` into plausible ones and ``clock_skew`` rejections (one per outlier).

    >>> from streams.models import Span
    >>> mk = lambda t: Span("t", "s", None, "x", "INTERNAL", t, t, "OK", "", {}, {})
    >>> ok, bad = check_wall([mk(10**18), mk(4 * 10**18), mk(0)], 10**18, 60 * 10**9, 3600 * 10**9)
    >>> len(ok), [(b.reason, b.index) for b in bad]
    (1, [('clock_skew', 1), ('clock_skew', 2)])
    """
    lo, hi = now_ns - max_behind_ns, now_ns + max_ahead_ns
    if all(lo <= s.end_ns <= hi for s in spans):
        return spans, []
    ok: list[Span] = []
    bad: list[Rejection] = []
    for i, s in enumerate(spans):
        if lo <= s.end_ns <= hi:
            ok.append(s)
        else:
            off = (s.end_ns - now_ns) / 1e9
            bound = f"max_clock_skew_s {max_ahead_ns / 1e9:.0f}" if off > 0 else f"max_span_age_s {max_behind_ns / 1e9:.0f}"
            bad.append(Rejection("clock_skew", f"end time is {off:+.0f} s from the wall clock ({bound})", i))
    return ok, bad
