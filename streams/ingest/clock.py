"""Event-time plausibility: a span whose end time is far from the stream's time is an outlier.

A single span dated in 2100 must not move a watermark (it would expire every breaker and evict
every pending state), and a single span dated at 0 or an hour off must not empty a detector's
window. Such spans are rejected at ingest with reason ``clock_skew`` (counted, routed to the
dead-letter topic live, counted on stderr in replay), before any detector sees them.

* Live, the reference is the wall clock: a span ending more than ``max_clock_skew_s`` ahead of it,
  or more than ``max_span_age_s`` behind it, is an outlier (a span less old than that is late data:
  each detector judges it against its own window, and a late span never evicts newer state).
* In replay there is no wall clock: the reference is a robust estimate of the stream's own time —
  the median end time of the last :data:`RING` spans, outliers included, so a single outlier never
  moves it, while a real jump in the data (a file that resumes hours later) moves it after about
  ``RING / 2`` spans (those few are counted as outliers).

>>> c = RobustClock(max_ahead_ns=60 * 10**9, max_behind_ns=60 * 10**9)
>>> [c.admit(t * 10**9) for t in (100, 101, 102, 4_000_000_000, 0, 103)]
[True, True, True, False, False, True]
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections import deque

from streams.models import Rejection, Span

RING = 31
MIN_SAMPLES = 3


class RobustClock:
    """The median of the last :data:`RING` end times; :meth:`admit` says whether ``t`` is plausible."""

    __slots__ = ("max_ahead_ns", "max_behind_ns", "_ring", "_sorted")

    def __init__(self, max_ahead_ns: int, max_behind_ns: int) -> None:
        self.max_ahead_ns = max_ahead_ns
        self.max_behind_ns = max_behind_ns
        self._ring: deque[int] = deque()
        self._sorted: list[int] = []

    def admit(self, t: int) -> bool:
        s = self._sorted
        ok = len(s) < MIN_SAMPLES or -self.max_behind_ns <= t - s[len(s) // 2] <= self.max_ahead_ns
        self._ring.append(t)
        insort(s, t)
        if len(self._ring) > RING:
            old = self._ring.popleft()
            del s[bisect_left(s, old)]
        return ok


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
