"""The one keyed runner: every stage, in replay and in the live worker, runs through it.

A stage (:mod:`streams.stages`) is pure: ``step`` / ``advance`` / ``next_deadline`` / ``expired``
over one key's state. What a stream needs around it lives here, once:

* :class:`EventClock` — per partition, the highest event time seen and the watermark (that minus
  the allowed lateness); with a wall clock (live), a quiet partition's event time runs on at wall
  speed from its last span, so its timers still fire;
* :class:`KeyedRunner` — states in a :class:`Store`, per key timers (a heap plus each key's one
  due deadline, stale heap entries skipped), the TTL sweep of idle keys (oldest update first), the
  per-partition key cap, end-of-input;
* :class:`MemoryStore` — the replay store (live objects in a dict). The live worker's store is
  :class:`streams.app.TableStore` (a faust table behind a write-behind cache); both satisfy
  :class:`Store`, and the runner's tests run over both.

>>> from streams.policy import Policy
>>> from streams.stages import build_stages, group
>>> stage = build_stages(Policy())[0]
>>> r = KeyedRunner(stage, MemoryStore(), idle_ns=1800 * 10**9)
>>> r.feed(0, {}, 0), r.fire(0, 0), r.finish()
([], [], [])
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from typing import Any, Callable, Iterable, Iterator, Protocol

from streams.pipeline import Output

END_OF_TIME = 2**63 - 1
SWEEP_EVERY_NS = 10 * 10**9  # event time between two TTL sweeps of a partition


class Store(Protocol):
    """Where a runner keeps its states: ``get``/``put``/``drop`` by key, ``items`` for a rescan.

    ``put(key, state, emitted)``: ``emitted`` says the step that made ``state`` published records;
    a durable store writes such a state only after those records are delivered (``settle``)."""

    def get(self, key: Any) -> Any | None: ...
    def put(self, key: Any, state: Any, emitted: bool = False) -> None: ...
    def drop(self, key: Any) -> None: ...
    def items(self) -> Iterable[tuple[Any, Any | None]]: ...
    def __len__(self) -> int: ...


class MemoryStore:
    """States as live objects in a dict (replay, and the runner's tests).

    >>> s = MemoryStore(); s.put("k", 1); s.get("k"), len(s)
    (1, 1)
    >>> s.drop("k"); s.get("k") is None
    True
    """

    def __init__(self) -> None:
        self.states: dict[Any, Any] = {}

    def get(self, key: Any) -> Any | None:
        return self.states.get(key)

    def put(self, key: Any, state: Any, emitted: bool = False) -> None:  # noqa: ARG002
        self.states[key] = state

    def drop(self, key: Any) -> None:
        self.states.pop(key, None)

    def items(self) -> Iterator[tuple[Any, Any]]:
        return iter(list(self.states.items()))

    def __len__(self) -> int:
        return len(self.states)


class EventClock:
    """Event time per partition, and the watermark it implies.

    >>> c = EventClock(lateness_ns=5)
    >>> c.observe(0, 100), c.observe(0, 90), c.observe(1, 20)
    (95, 95, 15)
    >>> wall = iter([1000, 1000, 1030]).__next__
    >>> c = EventClock(lateness_ns=5, wall=wall)
    >>> c.observe(0, 100), c.observe(0, 0, ticked=True), c.observe(0, 0, ticked=True)
    (95, 95, 125)
    """

    def __init__(self, lateness_ns: int, wall: Callable[[], int] | None = None) -> None:
        self.lateness_ns = lateness_ns
        self.wall = wall
        self.max_event: dict[int, int] = {}
        self.wall_at: dict[int, int] = {}

    def observe(self, part: int, hi: int, ticked: bool = False) -> int:
        """Note the batch's highest event time ``hi`` (``ticked``: the batch held a wall tick);
        returns the partition's watermark."""
        prev = self.max_event.get(part, 0)
        wall = self.wall
        if hi > prev:
            if wall is not None:
                self.wall_at[part] = wall()
        else:
            hi = prev
            if ticked and hi > 0 and wall is not None:
                # a quiet partition: its event time runs on with the wall clock from its last span,
                # so timers still fire, while a burst of older data is still judged on its own time
                now = wall()
                hi += now - self.wall_at.get(part, now)
                self.wall_at[part] = now
        self.max_event[part] = hi
        return hi - self.lateness_ns

    def high(self, part: int) -> int:
        return self.max_event.get(part, 0)


class KeyedRunner:
    """One stage over keyed batches: step, timers, sweep, cap — the same in replay and live.

    ``feed(part, {key: items}, wm)`` steps every key of a batch (loading its state once);
    ``fire(part, wm)`` fires due timers, sweeps idle keys and enforces the cap; ``finish`` ends the
    input. Outputs come back in the order they were made; ``forward`` outputs (the session stage's
    pre-aggregates) are returned like the others for the caller to route.

    ``idle_ns`` bounds how long a key may go without input before the sweep looks at it (``idle_of``
    may give a key its own bound); the sweep drops a key only when its stage says it ``expired``.
    ``max_keys`` (0: none) caps a partition's keys: the least recently updated go first, after
    their due timers fired.
    """

    def __init__(self, stage: Any, store: Store, *, idle_ns: int, idle_of: Callable[[Any], int] | None = None,
                 min_idle_ns: int | None = None, max_keys: int = 0, sweep_every_ns: int = SWEEP_EVERY_NS) -> None:
        self.stage = stage
        self.store = store
        self.idle_ns = idle_ns
        self.idle_of = idle_of
        self.min_idle_ns = idle_ns if min_idle_ns is None else min(idle_ns, min_idle_ns)
        self.max_keys = max_keys
        self.sweep_every_ns = sweep_every_ns
        self.index: dict[int, OrderedDict[Any, int]] = {}  # partition -> key -> last event time, LRU
        self.heaps: dict[int, list[tuple[int, Any]]] = {}
        self.due: dict[Any, int] = {}  # key -> its scheduled deadline (heap entries that differ are stale)
        self.next_sweep: dict[int, int] = {}
        self.new_keys = 0
        self.evicted = 0
        step_key = getattr(stage, "step_key", None)
        if step_key is not None:  # keyed by "kind:…" strings (the scope stage)
            self._step = lambda st, key, items, wm: step_key(st, key.decode() if isinstance(key, bytes) else key,
                                                             items, wm)
        else:
            self._step = lambda st, key, items, wm: stage.step(st, items, wm)  # noqa: ARG005

    # -- bookkeeping
    def tracked(self) -> int:
        return sum(len(v) for v in self.index.values())

    def _schedule(self, part: int, key: Any, d: int | None) -> None:
        due = self.due
        if d is None:
            due.pop(key, None)
        elif due.get(key) != d:
            due[key] = d
            heap = self.heaps.get(part)
            if heap is None:
                heap = self.heaps[part] = []
            heapq.heappush(heap, (d, key))

    def _drop(self, part: int, key: Any) -> None:
        self.store.drop(key)
        self.due.pop(key, None)
        idx = self.index.get(part)
        if idx is not None:
            idx.pop(key, None)
        self.evicted += 1

    def _put(self, key: Any, st: Any, outs: list[Output]) -> None:
        """Keep ``st``; ``emitted`` when its step made records to publish (an incident, a command).
        Forwarded pre-aggregates do not hold a state: a durable store never writes a state of the
        batch in flight before the batch's deliveries (see ``TableStore.flush``)."""
        emitted = False
        for o in outs:
            if o.kind != "forward":
                emitted = True
                break
        self.store.put(key, st, emitted)

    def rebuild(self, entries: Iterable[tuple[Any, Any | None]], part_of: Callable[[Any], int]) -> None:
        """After a (re)assignment: learn every stored key, its last event time and its timer
        (``entries``: key and state, ``None`` for an unreadable one, evicted at the next sweep)."""
        self.index.clear()
        self.heaps.clear()
        self.due.clear()
        self.next_sweep.clear()
        stage = self.stage
        rows: dict[int, list[tuple[int, Any]]] = {}
        for key, st in entries:
            p = part_of(key)
            last, d = 0, None
            if st is not None:
                try:
                    last, d = stage.last_seen(st), stage.next_deadline(st)
                except Exception:  # noqa: BLE001 - an unreadable value is evicted at the next sweep
                    last, d = 0, None
            rows.setdefault(p, []).append((last, key))
            self._schedule(p, key, d)
        for p, r in rows.items():
            r.sort(key=lambda lk: lk[0])
            self.index[p] = OrderedDict((k, last) for last, k in r)

    # -- the three entry points
    def feed(self, part: int, groups: dict[Any, list], wm: int) -> list[Output]:
        """Step every key of one batch of one partition (items in arrival order)."""
        out: list[Output] = []
        if not groups:
            return out
        stage, store, step, schedule = self.stage, self.store, self._step, self._schedule
        idx = self.index.get(part)
        if idx is None:
            idx = self.index[part] = OrderedDict()
        new_state, last_seen, next_deadline = stage.new_state, stage.last_seen, stage.next_deadline
        for key, items in groups.items():
            st = store.get(key)
            if st is None:
                st = new_state()
                self.new_keys += 1
            st, o = step(st, key, items, wm)
            self._put(key, st, o)
            if o:
                out.extend(o)
            idx[key] = last_seen(st)
            idx.move_to_end(key)
            schedule(part, key, next_deadline(st))
        return out

    def fire(self, part: int, wm: int) -> list[Output]:
        """Timers the watermark passed, then the TTL sweep (every ``sweep_every_ns`` of event
        time), then the key cap."""
        out: list[Output] = []
        stage, store, due = self.stage, self.store, self.due
        heap = self.heaps.get(part)
        while heap and heap[0][0] <= wm:
            d, key = heapq.heappop(heap)
            if due.get(key) != d:
                continue  # stale: the key's real deadline is scheduled separately
            del due[key]
            st = store.get(key)
            if st is None:
                continue
            st, o = stage.advance(st, wm)
            out.extend(o)
            if stage.expired(st, wm):
                self._drop(part, key)
                continue
            self._put(key, st, o)
            d2 = stage.next_deadline(st)
            if d2 is not None:
                self._schedule(part, key, max(d2, wm + 1))
        if wm >= self.next_sweep.get(part, 0):
            self.next_sweep[part] = wm + self.sweep_every_ns
            out.extend(self._sweep(part, wm))
        if self.max_keys:
            idx = self.index.get(part)
            if idx is not None and len(idx) > self.max_keys:
                out.extend(self._evict_over_cap(part, idx, wm))
        return out

    def _sweep(self, part: int, wm: int) -> list[Output]:
        """Look at the keys idle past their bound (oldest update first): drop the expired ones."""
        out: list[Output] = []
        idx = self.index.get(part)
        if not idx:
            return out
        stage, store, idle_of = self.stage, self.store, self.idle_of
        min_idle = self.min_idle_ns
        younger: list[tuple[Any, int]] = []  # idle, but not for their own (longer) bound
        alive: list[tuple[Any, int]] = []  # idle, but their stage keeps them (a command in force, …)
        while idx:
            key, last = next(iter(idx.items()))
            if last + min_idle >= wm:
                break
            idx.popitem(last=False)
            if idle_of is not None and last + idle_of(key) >= wm:
                younger.append((key, last))
                continue
            st = store.get(key)
            if st is None:
                self.due.pop(key, None)
                continue
            st, o = stage.advance(st, wm)
            out.extend(o)
            if stage.expired(st, wm):
                self._drop(part, key)
            else:  # still alive: looked at again at a later sweep, from the back of the index
                self._put(key, st, o)
                alive.append((key, stage.last_seen(st)))
                self._schedule(part, key, stage.next_deadline(st))
        for key, last in alive:  # after the loop: a kept key is never looked at twice in one sweep
            idx[key] = last
        for key, last in reversed(younger):  # back at the front, in their order
            idx[key] = last
            idx.move_to_end(key, last=False)
        return out

    def _evict_over_cap(self, part: int, idx: OrderedDict, wm: int) -> list[Output]:
        """Keep at most ``max_keys`` keys in a partition, least recently updated first out. An
        evicted key's due timers fire first (what is due is published); then its state goes,
        whatever it still held — the price of a bounded worker. Its commands still expire on
        their own at the gateways."""
        out: list[Output] = []
        stage, store = self.stage, self.store
        while len(idx) > self.max_keys:
            key = next(iter(idx))
            st = store.get(key)
            if st is not None:
                _, o = stage.advance(st, wm)
                out.extend(o)
            self._drop(part, key)
        heap = self.heaps.get(part)
        if heap is not None and len(heap) > 2 * self.max_keys + 1024:  # drop the stale timers
            due = self.due
            heap[:] = [e for e in heap if due.get(e[1]) == e[0]]
            heapq.heapify(heap)
        return out

    def finish(self) -> list[Output]:
        """End of input: the watermark passes everything; timers fire in key order, states go."""
        out: list[Output] = []
        store, stage = self.store, self.stage
        for key, st in sorted(store.items(), key=lambda kv: kv[0]):
            if st is not None:
                _, o = stage.advance(st, END_OF_TIME)
                out.extend(o)
            store.drop(key)
            self.evicted += 1
        self.index.clear()
        self.heaps.clear()
        self.due.clear()
        return out
