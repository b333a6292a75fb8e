"""Shared machinery of the aggregate-fed cores (retry_storm, cost_velocity).

Two things live here:

* :class:`Schema` — how one *bucket* (the counts of one key in one event-time second or minute)
  merges with another. Every field kind merges associatively and commutatively, so the order and
  grouping in which per-batch aggregates arrive never changes a result:

  - ``sums``: integers, added (money is in integer nano-USD, so sums are exact);
  - ``maps``: ``{key: int}`` added, then capped to the ``cap`` smallest keys, the rest summed under
    the overflow key ``""`` (the smallest-N rule keeps merging associative);
  - ``samples``: short lists of entries (``[end_ns, span_id, trace_id]`` …), de-duplicated, sorted,
    truncated to ``k`` (smallest first, or largest first);
  - ``mins`` / ``maxs``: event times, ``None`` when unknown;
  - ``firsts``: a label such as the tenant — the smallest non-``None`` value.

* :class:`Sliding` — a window of ``window_s`` seconds sliding over buckets of ``bucket_s`` seconds
  (1 s by default) aligned on event time (bucket ``T`` holds spans with ``T·u ≤ end_ns < (T+1)·u``,
  ``u`` the bucket width). The window *at* ``T`` covers buckets ``T−n+1 … T`` and is evaluated once
  the watermark reaches ``(T+1)·u``. Windows
  are evaluated only at *change points* (a bucket enters or leaves, or a core deadline), which is
  exact because nothing else changes the window, and cheap after long quiet stretches. Data for a
  second already evaluated but still inside the window is added to it (later evaluations see it);
  data older than the window is dropped and counted as late.

>>> sch = Schema(sums=("n",), maps=(("by", 2),), samples=(("ids", 2, False),))
>>> a = {"n": 1, "by": {"x": 1}, "ids": [[5, "a"]]}
>>> b = {"n": 2, "by": {"y": 1, "z": 4}, "ids": [[3, "b"], [9, "c"]]}
>>> sch.merge(a, b)
{'n': 3, 'by': {'x': 1, 'y': 1, '': 4}, 'ids': [[3, 'b'], [5, 'a']]}
"""

from __future__ import annotations

from operator import itemgetter
from typing import Any

S = 10**9
OVERFLOW = ""


class Schema:
    """Field kinds of one bucket; see the module doc. Buckets are *sparse*: a field is present only
    when it is non-zero / non-empty / not None, so equal contents are equal dicts however they were
    merged.

    >>> Schema(samples=(("ids", 0, False),))
    Traceback (most recent call last):
    ...
    ValueError: sample size of 'ids' must be >= 1
    """

    __slots__ = ("sums", "maps", "samples", "mins", "maxs", "firsts", "_kind", "_cap", "_sample",
                 "_sumset", "_mapset")

    def __init__(self, sums: tuple[str, ...] = (), maps: tuple[tuple[str, int], ...] = (),
                 samples: tuple[tuple[str, int, bool], ...] = (), mins: tuple[str, ...] = (),
                 maxs: tuple[str, ...] = (), firsts: tuple[str, ...] = ()) -> None:
        for name, cap in maps:
            if cap < 1:
                raise ValueError(f"map cap of {name!r} must be >= 1")
        for name, k, _ in samples:
            if k < 1:
                raise ValueError(f"sample size of {name!r} must be >= 1")
        self.sums, self.maps, self.samples = sums, maps, samples
        self.mins, self.maxs, self.firsts = mins, maxs, firsts
        kind: dict[str, int] = {}
        for k in sums:
            kind[k] = _SUM
        for k, _ in maps:
            kind[k] = _MAP
        for k, _, _ in samples:
            kind[k] = _SAMPLE
        for k in mins:
            kind[k] = _MIN
        for k in maxs:
            kind[k] = _MAX
        for k in firsts:
            kind[k] = _MIN
        self._kind = kind
        self._sumset = frozenset(k for k, c in kind.items() if c == _SUM)
        self._mapset = frozenset(k for k, c in kind.items() if c == _MAP)
        self._cap = dict(maps)
        self._sample = {k: (n, largest) for k, n, largest in samples}

    def empty(self) -> dict[str, Any]:
        return {}

    def merge_into(self, dst: dict[str, Any], src: dict[str, Any]) -> dict[str, Any]:
        """Merge ``src`` into ``dst`` (mutated and returned)."""
        kind = self._kind
        for k, v in src.items():
            c = kind.get(k)
            if c is None or v is None:
                continue
            if c == _SUM:
                if v:
                    dst[k] = dst.get(k, 0) + v
            elif c == _MIN:
                d = dst.get(k)
                if d is None or v < d:
                    dst[k] = v
            elif c == _MAX:
                d = dst.get(k)
                if d is None or v > d:
                    dst[k] = v
            elif c == _MAP:
                if v:
                    dv = dst.get(k)
                    if dv is None:
                        dv = dst[k] = {}
                    for kk, n in v.items():
                        dv[kk] = dv.get(kk, 0) + n
                    cap = self._cap[k]
                    if len(dv) > cap + (OVERFLOW in dv):
                        dst[k] = cap_map(dv, cap)
            elif v:  # sample (lists are replaced, never changed in place, so they may be shared)
                d = dst.get(k)
                if d:
                    n, largest = self._sample[k]
                    dst[k] = merge_sample(d, v, n, largest)
                else:
                    dst[k] = v
        return dst

    def copy(self, b: dict[str, Any]) -> dict[str, Any]:
        """A copy that shares nothing mutable with ``b`` (maps are copied; sample lists are never
        changed in place). ``b`` must be canonical, as :func:`aggregate`-style producers make it."""
        return {k: (dict(v) if type(v) is dict else v) for k, v in b.items()
                if k in self._kind and v is not None}

    def merge(self, a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        """A new bucket: ``a`` merged with ``b`` (neither is changed)."""
        return self.merge_into(self.copy(a), b)

    # -- keyed aggregates: {"kind": kind, "key": k, "buckets": {"<second or minute>": bucket}}
    def merge_keyed(self, a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        return self.merge_keyed_all((a, b))

    def merge_keyed_all(self, aggs: Any) -> dict[str, Any]:
        """Keyed aggregates (of one kind and key; at least one) merged into a new one, in one pass:
        the same result as merging them pairwise, left to right."""
        first = aggs[0]
        key, kind = first["key"], first.get("kind")
        copy, merge_into = self.copy, self.merge_into
        out = {t: copy(v) for t, v in first["buckets"].items()}
        for b in aggs[1:]:
            if b["key"] != key or b.get("kind") != kind:
                raise ValueError(f"cannot merge aggregates of {kind} {key!r} and "
                                 f"{b.get('kind')} {b['key']!r}")
            for t, v in b["buckets"].items():
                cur = out.get(t)
                out[t] = copy(v) if cur is None else merge_into(cur, v)
        return {"kind": kind, "key": key, "buckets": out}

    # -- window sums (add / subtract; samples, times and labels are not part of a window sum)
    def add(self, win: dict[str, Any], b: dict[str, Any], sign: int = 1) -> None:
        sums, maps = self._sumset, self._mapset
        for k, v in b.items():
            if k in sums:
                win[k] = win.get(k, 0) + sign * v
            elif k in maps:
                wv = win.get(k)
                if wv is None:
                    wv = win[k] = {}
                for kk, n in v.items():
                    m = wv.get(kk, 0) + sign * n
                    if m:
                        wv[kk] = m
                    else:
                        wv.pop(kk, None)


_SUM, _MAP, _SAMPLE, _MIN, _MAX = range(5)


def cap_map(m: dict[str, int], cap: int) -> dict[str, int]:
    """Keep the ``cap`` smallest keys; sum the rest under :data:`OVERFLOW`.

    >>> cap_map({"b": 1, "a": 2, "c": 3, "": 1}, 2)
    {'a': 2, 'b': 1, '': 4}
    """
    keys = sorted(k for k in m if k != OVERFLOW)
    out = {k: m[k] for k in keys[:cap]}
    rest = m.get(OVERFLOW, 0) + sum(m[k] for k in keys[cap:])
    if rest:
        out[OVERFLOW] = rest
    return out


def _desc(e: list[Any]) -> tuple[Any, ...]:
    return (-e[0], *e[1:])


_FIRST = itemgetter(0)


def _sort_desc(out: list[Any]) -> None:
    """Sort in place by ``_desc`` (largest first element, then the rest ascending), without a
    Python key function: sort ascending, then stably by the first element descending."""
    out.sort()
    out.sort(key=_FIRST, reverse=True)


def merge_sample(a: list[list[Any]], b: list[list[Any]], k: int, largest: bool) -> list[list[Any]]:
    """Union of two canonical samples (sorted, de-duplicated, ≤ ``k``): the ``k`` smallest, or
    the largest by first element. The result may share ``a`` or ``b``: samples are never changed
    in place.

    >>> merge_sample([[3, "x"]], [[5, "y"], [3, "x"]], 5, True)
    [[5, 'y'], [3, 'x']]
    """
    if not b:
        return a
    if not a:
        return b
    out = list(a)
    for e in b:
        if e not in out:
            out.append(e)
    if largest:
        _sort_desc(out)
    else:
        out.sort()
    del out[k:]
    return out


def canonical_sample(v: list[list[Any]], k: int, largest: bool) -> list[list[Any]]:
    """Any list of entries → a canonical sample (sorted, de-duplicated, ≤ ``k``).

    >>> canonical_sample([[2, "b"], [1, "a"], [2, "b"]], 5, False)
    [[1, 'a'], [2, 'b']]
    """
    items = sorted({tuple(e) for e in v}, key=_desc if largest else None)
    return [list(e) for e in items[:k]]


class Sliding:
    """Sliding event-time window of ``window_s`` seconds over buckets of ``bucket_s`` seconds.

    It operates on a state with ``buckets`` (``{bucket index: bucket}``), ``closed`` (the last
    evaluated bucket index, or None) and ``win`` (the window's sums). Bucket ``T`` holds the spans
    with ``T·u ≤ end_ns < (T+1)·u`` (``u`` = :attr:`unit_ns`); aggregates arrive per second and
    are re-bucketed here. The window at ``T`` covers buckets ``T−n+1 … T`` (``n`` = window_s /
    bucket_s): it always spans ``window_s`` and slides in steps of ``bucket_s``.

    ``fold`` names sample fields that are taken out of a bucket when it enters the window and
    merged into ``win[field]`` (largest-first when the flag is set): they describe what the window
    has seen so far (e.g. the latest retry spans, the costliest spans) without being kept per bucket.

    >>> from types import SimpleNamespace
    >>> sch = Schema(sums=("n",))
    >>> w = Sliding(sch, 3)
    >>> st = SimpleNamespace(buckets={}, closed=None, win={})
    >>> w.absorb(st, {"10": {"n": 1}, "11": {"n": 2}})
    ([], [])
    >>> seen = []
    >>> for t in w.points(st, 20 * S):
    ...     _ = w.move(st, t); seen.append((t, st.win["n"]))
    >>> w.finish(st, 20 * S); seen, st.closed, st.buckets
    ([(10, 1), (11, 3), (13, 2), (14, 0)], 19, {})
    >>> Sliding(sch, 60, 7)
    Traceback (most recent call last):
    ...
    ValueError: bucket_s must divide window_s, got 7 and 60
    """

    def __init__(self, schema: Schema, window_s: int, bucket_s: int = 1,
                 fold: tuple[tuple[str, int, bool], ...] = ()) -> None:
        window_s, bucket_s = int(window_s), int(bucket_s)
        if bucket_s < 1 or window_s % bucket_s:
            raise ValueError(f"bucket_s must divide window_s, got {bucket_s} and {window_s}")
        self.schema = schema
        self.bucket_s = bucket_s
        self.unit_ns = bucket_s * S
        self.w = window_s // bucket_s
        self.fold = fold

    def _fold(self, st: Any, b: dict[str, Any]) -> None:
        for name, k, largest in self.fold:
            v = b.pop(name, None)
            if v:
                st.win[name] = merge_sample(st.win.get(name) or [], v, k, largest)

    def absorb_keyed(self, st: Any, agg: dict[str, Any]) -> tuple[list[Any], list[Any], dict[str, Any]]:
        """One keyed aggregate into a per-key state (``key``, ``late``, ``last_seen_ns``, ``tenant``):
        :meth:`absorb` its buckets, count those too late, move ``last_seen_ns`` to the end of the
        newest bucket, keep the smallest tenant named. Returns ``(dropped, merged, buckets)``."""
        if st.key is None:
            st.key = agg["key"]
        buckets = agg.get("buckets") or {}
        if not buckets:
            return [], [], buckets
        dropped, merged = self.absorb(st, buckets)
        st.late += len(dropped)
        hi = (max(int(t) for t in buckets) + 1) * S
        if hi > st.last_seen_ns:
            st.last_seen_ns = hi
        for b in buckets.values():
            t = b.get("tenant")
            if t is not None and (st.tenant is None or t < st.tenant):
                st.tenant = t
        return dropped, merged, buckets

    def absorb(self, st: Any, buckets: dict[str, dict[str, Any]]) -> tuple[list[Any], list[Any]]:
        """Merge keyed-aggregate buckets (keyed by second) into the state.

        Returns ``(dropped, into_window)``: the incoming buckets older than the window (not kept),
        and those merged into buckets already evaluated (their sums are in the window now).
        """
        dropped: list[Any] = []
        merged: list[Any] = []
        sch = self.schema
        closed = st.closed
        k = self.bucket_s
        for key, b in buckets.items():
            t = int(key) // k
            cur = st.buckets.get(t)
            if closed is not None and t <= closed:
                if t <= closed - self.w:
                    dropped.append(b)
                    continue
                merged.append(b)
                # already inside the evaluated window: keep window sums equal to the buckets'
                if cur is None:
                    cur = st.buckets[t] = {}
                else:
                    sch.add(st.win, cur, -1)
                sch.merge_into(cur, b)
                sch.add(st.win, cur, 1)
                self._fold(st, cur)
                continue
            if cur is None:
                st.buckets[t] = sch.copy(b)
            else:
                sch.merge_into(cur, b)
        return dropped, merged

    def start(self, st: Any) -> int | None:
        if st.closed is not None:
            return st.closed
        if not st.buckets:
            return None
        return min(st.buckets) - 1

    def last_complete(self, watermark_ns: int) -> int:
        """The last bucket index complete at the watermark."""
        return watermark_ns // self.unit_ns - 1

    def points(self, st: Any, watermark_ns: int, extra: tuple[int, ...] = ()) -> list[int]:
        """Change points ``T`` to evaluate, in order, up to the last bucket complete at the watermark."""
        lo = st.closed
        if lo is None:
            if not st.buckets:
                return []
            lo = min(st.buckets) - 1
        hi = watermark_ns // self.unit_ns - 1
        if hi <= lo:
            return []
        w = self.w
        pts = set()
        add = pts.add
        for t in st.buckets:
            if lo < t <= hi:
                add(t)
            if lo < t + w <= hi:
                add(t + w)
        for t in extra:
            if lo < t <= hi:
                add(t)
        return sorted(pts)

    def move(self, st: Any, t: int) -> dict[str, Any] | None:
        """Slide the window so that it ends at bucket ``t`` (``t`` from :meth:`points`, in order);
        returns the bucket ``t`` when it brought data (the window gained something)."""
        buckets = st.buckets
        b = buckets.get(t)
        closed = st.closed
        entered = b if b is not None and (closed is None or t > closed) else None
        if entered is not None:
            self.schema.add(st.win, b, 1)
            if self.fold:
                self._fold(st, b)
        old = buckets.pop(t - self.w, None)
        if old is not None:
            self.schema.add(st.win, old, -1)
        st.closed = t
        return entered

    def finish(self, st: Any, watermark_ns: int) -> None:
        hi = self.last_complete(watermark_ns)
        lo = self.start(st)
        if lo is not None and hi > lo:
            st.closed = hi

    def in_window(self, st: Any) -> list[dict[str, Any]]:
        """Buckets of the current window (oldest first)."""
        c = st.closed
        if c is None:
            return []
        return [st.buckets[t] for t in sorted(st.buckets) if c - self.w < t <= c]

    def next_point(self, st: Any) -> int | None:
        """Event time (ns) at which the next change point becomes due, or None."""
        buckets = st.buckets
        lo = st.closed
        if lo is None:
            if not buckets:
                return None
            lo = min(buckets) - 1
        w = self.w
        best = None
        for t in buckets:  # the earliest bucket to enter (t > lo) or to leave (t + w > lo)
            if t <= lo:
                t += w
                if t <= lo:
                    continue
            if best is None or t < best:
                best = t
        if best is None:
            return None
        return (best + 1) * self.unit_ns
