"""The one keyed runner (streams.runner), over both stores: the replay store (live objects in a
dict) and the live worker's store (streams.app.TableStore: a table of bytes behind a write-behind
cache). The same mixed traffic — every detector's pattern among healthy sessions — must give the
same records over both stores and for any batch size; timers, the sweep, the key cap and a rebuild
after a rebalance behave alike."""

from __future__ import annotations

import orjson
import pytest

from streams.app import TableStore
from streams.pipeline import Output
from streams.policy import Policy
from streams.runner import EventClock, KeyedRunner, MemoryStore
from streams.stages import build_stages, group, merge_forwards, runner_for
from tests.spans import S, mixed_traffic, span

STORES = ["memory", "table"]


def make_store(kind: str, stage):
    return MemoryStore() if kind == "memory" else TableStore(stage, {})


class Pipeline:
    """Every stage through its runner: what replay and the live worker both do per batch."""

    def __init__(self, kind: str, policy: Policy | None = None, key=lambda k: k) -> None:
        self.policy = policy or Policy()
        self.stages = build_stages(self.policy)
        self.runners = [runner_for(st, self.policy, make_store(kind, st)) for st in self.stages]
        self.clock = EventClock(self.policy.allowed_lateness_ns)
        self.key = key  # the live store keys by bytes, replay by str

    def settle(self) -> None:
        for r in self.runners:
            if isinstance(r.store, TableStore):
                r.store.settle(0)

    def feed(self, spans: list) -> list[Output]:
        wm = self.clock.observe(0, max(s.end_ns for s in spans))
        out: list[Output] = []
        for r in self.runners[:-1]:
            out += r.feed(0, {self.key(k): v for k, v in group(r.stage, spans).items()}, wm)
        fwd = merge_forwards(out)
        out = [o for o in out if o.kind != "forward"]
        out += self.runners[-1].feed(0, {self.key(k): v for k, v in fwd.items()}, wm)
        for r in self.runners:
            out += [o for o in r.fire(0, wm) if o.kind != "forward"]
        self.settle()
        return out

    def finish(self) -> list[Output]:
        out = [o for r in self.runners for o in r.finish()]
        self.settle()
        return out


def records(kind: str, spans: list, batch: int) -> list[bytes]:
    p = Pipeline(kind, key=(lambda k: k.encode()) if kind == "table" else (lambda k: k))
    out: list[Output] = []
    for i in range(0, len(spans), batch):
        out += p.feed(spans[i:i + batch])
    out += p.finish()
    return sorted(o.value for o in out)


@pytest.fixture(scope="module")
def spans() -> list:
    return mixed_traffic()


@pytest.fixture(scope="module")
def reference(spans) -> list[bytes]:
    out = records("memory", spans, 50)
    assert len(out) > 20  # every pattern opened something
    return out


@pytest.mark.parametrize("kind", STORES)
@pytest.mark.parametrize("batch", [1, 7, 400])
def test_same_records_over_both_stores_for_any_batch_size(spans, reference, kind, batch):
    assert records(kind, spans, batch) == reference


def test_every_detector_is_exercised(reference):
    detectors = {orjson.loads(v).get("detector") for v in reference}
    assert {"no_progress_loop", "retry_storm", "cost_velocity", "plan_deadlock", "silent_success"} <= detectors


@pytest.mark.parametrize("kind", STORES)
def test_a_timer_fires_once_and_the_sweep_drops_expired_keys(kind):
    policy = Policy()
    stage = build_stages(policy)[0]
    r = runner_for(stage, policy, make_store(kind, stage))
    key = b"s1" if kind == "table" else "s1"
    outs = r.feed(0, {key: [span(i, tool="search") for i in range(3)]}, 2 * S)
    assert [o.kind for o in outs if o.kind != "forward"] == ["incident", "breaker"]
    d = r.due[key]  # the halt's expiry
    assert r.fire(0, d - 1) == []
    released = [o for o in r.fire(0, d) if o.kind == "breaker"]
    assert [orjson.loads(o.value)["action"] for o in released] == ["release"]
    assert [o for o in r.fire(0, d) if o.kind == "breaker"] == []  # never twice
    # idle past the session TTL: the sweep drops the key and counts it
    r.fire(0, d + r.idle_ns + 60 * S)
    assert r.tracked() == 0 and len(r.store) == 0 and r.evicted == 1


@pytest.mark.parametrize("kind", STORES)
def test_key_cap_evicts_least_recent_first(kind):
    policy = Policy()
    stage = build_stages(policy)[0]
    r = runner_for(stage, policy, make_store(kind, stage), max_keys=3)
    for i in range(5):
        key = f"s{i}".encode() if kind == "table" else f"s{i}"
        r.feed(0, {key: [span(i, session=f"s{i}", tool="search", args=str(i))]}, i * S)
        r.fire(0, i * S)
    assert list(r.index[0]) == ([b"s2", b"s3", b"s4"] if kind == "table" else ["s2", "s3", "s4"])
    assert r.evicted == 2 and len(r.store) == 3


def table_runner():
    """The session stage over the live store, its table a dict."""
    stage = build_stages(Policy())[0]
    table: dict = {}
    store = TableStore(stage, table)
    return table, store, KeyedRunner(stage, store, idle_ns=1800 * S)


def test_table_store_writes_an_emitting_state_only_after_delivery():
    table, store, r = table_runner()
    outs = r.feed(0, {b"s1": [span(i, tool="search") for i in range(3)]}, 2 * S)
    assert any(o.kind == "incident" for o in outs)
    assert b"s1" not in table and b"s1" in store.held[0]  # the records are not delivered yet
    assert store.settle(0) == 1 and b"s1" in table
    r.feed(0, {b"s2": [span(1, session="s2")]}, 3 * S)  # a span that makes no record, nor an aggregate
    assert b"s2" not in table and list(store.dirty[0]) == [b"s2"]  # written behind, at a flush


@pytest.mark.parametrize("kind", STORES)
def test_rebuild_restores_index_and_timers(kind):
    policy = Policy()
    stage = build_stages(policy)[0]
    store = make_store(kind, stage)
    r = runner_for(stage, policy, store)
    key = b"s1" if kind == "table" else "s1"
    r.feed(0, {key: [span(i, tool="search") for i in range(3)]}, 2 * S)
    if kind == "table":
        store.settle(0)
    due = dict(r.due)
    r2 = runner_for(stage, policy, store)
    r2.rebuild(store.items(), lambda k: 0)
    assert r2.due == due and list(r2.index[0]) == [key]


def test_event_clock_runs_on_wall_time_only_while_quiet():
    now = [1_000]
    c = EventClock(lateness_ns=5, wall=lambda: now[0])
    assert c.observe(0, 100) == 95
    now[0] = 1_050
    assert c.observe(0, 0, ticked=True) == 145  # a tick: event time moved with the wall clock
    assert c.observe(0, 120) == 145  # older data does not move it back
    assert c.observe(1, 0) == -5  # partitions are independent


def test_table_store_drains_least_recent_states_beyond_its_bound():
    table, store, r = table_runner()
    for i in range(6):
        store.batch += 1
        r.feed(0, {f"s{i}".encode(): [span(i, session=f"s{i}", state=str(i))]}, i * S)  # no records
    store.batch += 1
    r.feed(0, {b"s0": [span(7, session="s0", state="x")]}, 7 * S)  # s0 changed again, now
    assert store.drain(0, keep=2) == 4  # s1..s4: the least recently changed, never s0 (this batch)
    assert sorted(table) == [b"s1", b"s2", b"s3", b"s4"] and list(store.dirty[0]) == [b"s5", b"s0"]
    assert store.drain(0, keep=2) == 0


def test_unpriced_model_calls_are_counted_in_replay_and_live():
    import asyncio
    import io

    from streams import metrics
    from streams.app import KeyedStage
    from streams.replay import report, run
    from tests.stagedrive import Event

    line = orjson.dumps({"trace_id": "a" * 32, "span_id": "b" * 16, "name": "chat", "start_time_unix_nano": S,
                         "end_time_unix_nano": 2 * S,
                         "attributes": {"gen_ai.conversation.id": "s1", "gen_ai.operation.name": "chat",
                                        "gen_ai.request.model": "no-such-model-anywhere",
                                        "gen_ai.usage.input_tokens": 100}})
    stats = run([io.BytesIO(line)], io.BytesIO())
    err = io.BytesIO()
    report(stats, err)
    assert stats.unpriced == 1 and b"1 model calls unpriced" in err.getvalue()

    async def publish(outs):
        return []

    ks = KeyedStage(None, build_stages(Policy())[0], None, {}, 1, 5 * S, 1800 * S, publish)
    ks.needs_scan = False
    (span,) = decode_flat(line)
    before = metrics.UNPRICED_SPANS._value.get()
    msg = orjson.dumps({"keyed": {"s1": [["agent.spans/0", 1, [span.to_wire()]]]}})
    asyncio.run(ks.process([Event(0, msg)]))
    assert metrics.UNPRICED_SPANS._value.get() - before == 1


def decode_flat(raw: bytes):
    from streams.ingest import decode

    return decode(raw).spans


def test_a_stored_state_of_another_version_is_counted_when_discarded():
    import asyncio

    from streams import metrics
    from streams.app import KeyedStage
    from tests.stagedrive import Event

    async def publish(outs):
        return []

    table = {b"s1": b'{"v": 1, "last_seen_ns": 5}'}  # written by an older worker
    ks = KeyedStage(None, build_stages(Policy())[0], None, table, 1, 5 * S, 1800 * S, publish)
    resets = metrics.STATE_RESETS.labels(stage="session")
    before = resets._value.get()
    ks.scan()  # a rebalance reads every stored state: not counted yet
    assert resets._value.get() == before
    msg = orjson.dumps({"keyed": {"s1": [["agent.spans/0", 1, [span(1, tool="ls").to_wire()]]]}})
    asyncio.run(ks.process([Event(0, msg)]))
    assert resets._value.get() - before == 1


def test_sweep_keeps_idle_keys_that_are_not_expired_and_ends():
    """A quiet session whose halt outlives its TTL (a per-tenant breaker TTL longer than the
    session's) is kept by its stage: the sweep looks at it once per sweep and returns."""
    policy = Policy.from_toml('[detectors.no_progress_loop]\nbreaker_ttl_s = 3600\nsession_ttl_s = 600\n')
    stage = build_stages(policy)[0]
    r = runner_for(stage, policy, MemoryStore())
    r.feed(0, {"s1": [span(i, tool="search") for i in range(3)]}, 2 * S)
    out = r.fire(0, 2 * S + r.idle_ns + 60 * S)  # idle past the sweep's bound, the halt still in force
    assert out == [] and r.tracked() == 1 and len(r.store) == 1
    released = r.fire(0, 2 * S + 3600 * S + 60 * S)
    assert [orjson.loads(o.value)["action"] for o in released if o.kind == "breaker"] == ["release"]
    assert r.tracked() == 0


def test_a_state_of_the_batch_in_flight_is_not_flushed_before_its_deliveries():
    """A commit can flush while a batch waits for its deliveries: the session state that made
    forwarded pre-aggregates (not delivered yet) stays dirty until the next flush."""
    from tests.stagedrive import Event

    table, store, r = table_runner()
    store.ctx[0] = Event(0, b"")  # the partition's event (routes table writes in the worker)
    store.batch += 1
    store.in_flight = True
    outs = r.feed(0, {b"s1": [span(1, op="chat", gen_ai__request__model="m", gen_ai__usage__cost=0.1)]}, S)
    assert outs and {o.kind for o in outs} == {"forward"}  # route and tenant pre-aggregates only
    assert store.flush() == 0 and b"s1" not in table and list(store.dirty[0]) == [b"s1"]
    store.in_flight = False  # delivered
    assert store.flush() == 1 and b"s1" in table


def test_an_unreadable_stored_state_starts_afresh_and_is_counted():
    table, store, r = table_runner()
    table[b"s1"] = b"\xff not json"
    before = store.stage.resets
    assert store.get(b"s1") is None and store.stage.resets == before + 1
    outs = r.feed(0, {b"s1": [span(i, tool="search") for i in range(3)]}, 2 * S)
    assert any(o.kind == "incident" for o in outs)


def test_a_failed_delivery_forgets_the_batch_and_writes_nothing():
    import asyncio

    from streams.app import KeyedStage
    from tests.stagedrive import Event

    async def publish(outs):
        if any(o.kind == "incident" for o in outs):
            raise RuntimeError("broker gone")
        return []

    table: dict = {}
    ks = KeyedStage(None, build_stages(Policy())[0], None, table, 1, 5 * S, 1800 * S, publish)
    ks.needs_scan = False
    loop = [span(i, tool="search").to_wire() for i in range(3)]
    msg = orjson.dumps({"keyed": {"s1": [["agent.spans/0", 1, loop]]}})
    with pytest.raises(RuntimeError):
        asyncio.run(ks.process([Event(0, msg)]))
    assert table == {} and not ks.store.cache and not ks.store.hw and ks.needs_scan
    # re-delivered after the failure, the same input is applied again (nothing recorded it as done)
    async def ok(outs):
        return []

    ks.publish = ok
    ks.needs_scan = False
    asyncio.run(ks.process([Event(0, msg)]))
    ks.flush()
    assert b"s1" in table
