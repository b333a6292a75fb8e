"""The gateway client: decision rules in memory, then the real embedded broker (late start,
live updates, lag, an unreachable broker, thread mode)."""

from __future__ import annotations

import asyncio
import time
import timeit
import uuid

import pytest

from streams.broker import create_topics, free_port
from streams.gateway import ALLOW, BreakerClient, command_json
from tests.kafka import produce

T0 = 1767225600.0  # 2026-01-01T00:00:00Z
LATER = "2026-01-01T01:00:00Z"


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def client(clock=None) -> BreakerClient:
    return BreakerClient("127.0.0.1:9092", clock=clock or Clock())


def put(c: BreakerClient, action: str, kind: str, key: str, **kw) -> str:
    kw.setdefault("expires_at", LATER)
    return c.apply(f"{kind}:{key}".encode(), command_json(action, kind, key, **kw))


# ----------------------------------------------------------------------------- rules, no broker


def test_no_commands_allows_everything():
    c = client()
    assert c.check() is ALLOW
    assert c.check(session="s", tenant="t", workflow="w", route="openai/gpt-4o", tool="search") is ALLOW


def test_each_scope_kind_is_looked_up():
    c = client()
    put(c, "halt", "session", "s1")
    put(c, "trip", "tenant", "acme")
    put(c, "halt", "workflow", "wf1")
    put(c, "hold", "tool", "delete_db")
    assert not c.check(session="s1").allow
    assert not c.check(tenant="acme").allow
    assert not c.check(workflow="wf1").allow
    assert not c.check(tool="delete_db").allow
    assert c.check(session="s2", tenant="globex", workflow="wf2", tool="search").allow
    # the kind is part of the key: a session named like the tenant is not the tenant
    assert c.check(session="acme").allow


def test_precedence_halt_trip_hold_then_throttle():
    c = client()
    put(c, "throttle", "route", "openai/gpt-4o", rate_limit_per_s=100)
    put(c, "hold", "workflow", "wf")
    put(c, "trip", "tenant", "acme")
    put(c, "halt", "session", "s1")
    d = c.check(session="s1", tenant="acme", workflow="wf", route="openai/gpt-4o")
    assert (d.allow, d.action, d.scope) == (False, "halt", "session:s1")
    assert c.check(session="s2", tenant="acme", workflow="wf", route="openai/gpt-4o").action == "trip"
    assert c.check(session="s2", tenant="globex", workflow="wf", route="openai/gpt-4o").action == "hold"
    d = c.check(session="s2", tenant="globex", route="openai/gpt-4o")
    assert (d.allow, d.action, d.rate_limit_per_s) == (True, "throttle", 100.0)


def test_tenant_scoped_route_applies_to_its_tenant_only():
    c = client()
    put(c, "hold", "route", "openai/gpt-4o", tenant="acme")  # a throttle at rate 0 is refused (bad_rate)
    assert not c.check(route="openai/gpt-4o", tenant="acme").allow
    assert c.check(route="openai/gpt-4o", tenant="globex").allow
    assert c.check(route="openai/gpt-4o").allow  # a caller that does not know its tenant
    # a session command's tenant is information only
    put(c, "halt", "session", "s1", tenant="acme")
    assert not c.check(session="s1", tenant="globex").allow
    # a global route command applies to everybody
    put(c, "hold", "route", "anthropic/claude")
    assert not c.check(route="anthropic/claude", tenant="globex").allow
    assert not c.check(route="anthropic/claude").allow


def test_token_bucket_rate_burst_and_retry_after():
    clock = Clock()
    c = client(clock)
    put(c, "throttle", "route", "openai/gpt-4o", rate_limit_per_s=5)
    allowed = sum(c.check(route="openai/gpt-4o").allow for _ in range(20))
    assert allowed == 5  # one second's burst
    d = c.check(route="openai/gpt-4o")
    assert (d.allow, d.action, d.retry_after_s) == (False, "throttle", 0.2)
    # over 10 s of steady calls every 10 ms, the allowed rate is the limit
    ok = 0
    for _ in range(1000):
        clock.t += 0.01
        ok += c.check(route="openai/gpt-4o").allow
    assert 49 <= ok <= 51
    # rate 0 would let nothing through with no retry time to promise: refused (publish a hold)
    assert put(c, "throttle", "tenant", "acme", rate_limit_per_s=0) == "bad"
    assert c.check(tenant="acme") is ALLOW and c.rejected["bad_rate"] == 1


def test_two_throttles_take_a_token_from_both_or_neither():
    clock = Clock()
    c = client(clock)
    put(c, "throttle", "route", "openai/gpt-4o", rate_limit_per_s=1)
    put(c, "throttle", "tenant", "acme", rate_limit_per_s=10)
    d = c.check(route="openai/gpt-4o", tenant="acme")
    assert d.allow and d.rate_limit_per_s == 1.0  # the tightest limit is reported
    assert not c.check(route="openai/gpt-4o", tenant="acme").allow  # route bucket empty
    # the tenant bucket was not charged by the refused call: 9 more tenant-only calls pass
    assert sum(c.check(tenant="acme").allow for _ in range(10)) == 9


def test_throttle_without_rate_uses_the_default():
    c = BreakerClient("127.0.0.1:9092", clock=Clock(), default_rate_per_s=3)
    put(c, "throttle", "tenant", "acme")
    assert sum(c.check(tenant="acme").allow for _ in range(10)) == 3


def test_shadow_never_denies_but_says_what_it_would_do():
    c = client()
    put(c, "halt", "session", "s1", mode="shadow")
    d = c.check(session="s1")
    assert (d.allow, d.shadow, d.would_deny, d.action) == (True, True, True, "halt")
    put(c, "throttle", "route", "openai/gpt-4o", mode="shadow", rate_limit_per_s=1)
    first, second = c.check(route="openai/gpt-4o"), c.check(route="openai/gpt-4o")
    assert first.allow and first.shadow and not first.would_deny
    assert second.allow and second.shadow and second.would_deny
    # an enforced command beats a shadow one
    put(c, "hold", "tenant", "acme")
    d = c.check(session="s1", tenant="acme")
    assert (d.allow, d.action, d.shadow) == (False, "hold", False)


def test_latest_record_wins_release_and_tombstone_remove():
    c = client()
    put(c, "halt", "session", "s1", command_id="cmd-a")
    put(c, "throttle", "session", "s1", command_id="cmd-b", rate_limit_per_s=10)
    assert c.check(session="s1").command_id == "cmd-b"
    assert put(c, "release", "session", "s1", expires_at=None) == "removed"
    assert c.check(session="s1") is ALLOW
    put(c, "halt", "session", "s2")
    assert c.apply(b"session:s2", None) == "removed"
    assert c.check(session="s2") is ALLOW
    assert c.stats.removals == 2


def test_expiry_is_local_and_an_expired_record_supersedes():
    clock = Clock()
    c = client(clock)
    put(c, "halt", "session", "s1", expires_at="2026-01-01T00:00:10Z")
    assert not c.check(session="s1").allow
    clock.t = T0 + 9.999
    assert not c.check(session="s1").allow
    clock.t = T0 + 10
    assert c.check(session="s1").allow
    assert c.sweep() == 1 and c.active() == {}
    # an already expired newest record means nothing is active for the key
    clock.t = T0
    put(c, "halt", "session", "s2")
    assert put(c, "halt", "session", "s2", expires_at="2025-12-31T23:59:00Z") == "expired"
    assert c.check(session="s2").allow
    # a command without expiry stays until released
    put(c, "hold", "session", "s3", expires_at=None)
    assert not c.check(session="s3", now=T0 + 10**9).allow


def test_republished_command_keeps_its_bucket():
    c = client()
    put(c, "throttle", "route", "r/m", rate_limit_per_s=2, command_id="cmd-t")
    assert c.check(route="r/m").allow and c.check(route="r/m").allow
    put(c, "throttle", "route", "r/m", rate_limit_per_s=2, command_id="cmd-t")  # re-published after a restart
    assert not c.check(route="r/m").allow
    put(c, "throttle", "route", "r/m", rate_limit_per_s=2, command_id="cmd-u")  # a new command: new bucket
    assert c.check(route="r/m").allow


@pytest.mark.parametrize("value", [b"", b"{", b"[]", b'{"action": "halt"}', b"\xff\xfe",
                                   command_json("halt", "session", "s0", expires_at="not a time")])
def test_bad_records_are_counted_never_raise(value):
    c = client()
    put(c, "halt", "session", "s0")
    assert c.apply(b"session:s0", value) == "bad"
    assert c.stats.bad == 1
    assert not c.check(session="s0").allow  # a bad record does not disturb the key's state


def test_bad_expiry_is_bad():
    c = client()
    assert c.apply(None, command_json("halt", "session", "s", expires_at="tomorrow")) == "bad"
    assert c.apply(None, command_json("halt", "session", "s", expires_at="2026-01-01T00:00:00")) == "bad"


def test_key_from_the_value_when_the_record_has_none():
    c = client()
    assert c.apply(None, command_json("halt", "session", "s1", expires_at=LATER)) == "set"
    assert list(c.active()) == ["session:s1"]


def test_check_cost_is_about_a_microsecond():
    """O(1): the cost does not grow with the number of active commands."""
    c = client()
    for i in range(20_000):
        put(c, "halt", "session", f"s{i}")
    n = 20_000
    miss = min(timeit.repeat(lambda: c.check(session="zz", tenant="acme", workflow="w", route="openai/gpt-4o"),
                             number=n, repeat=3)) / n
    hit = min(timeit.repeat(lambda: c.check(session="s77", tenant="acme", route="openai/gpt-4o"),
                            number=n, repeat=3)) / n
    print(f"check(): {miss * 1e6:.2f} µs no match, {hit * 1e6:.2f} µs halted (20k active)")
    assert miss < 50e-6 and hit < 50e-6  # generous: ≈1 µs on the reference machine


# ----------------------------------------------------------------------------- the real broker


def _topic(broker, partitions=2) -> str:
    name = f"breaker-{uuid.uuid4().hex[:8]}"
    asyncio.run(create_topics(broker.bootstrap, [(name, partitions, {"cleanup.policy": "compact"})]))
    return name


def _rec(action, kind, key, **kw):
    kw.setdefault("expires_at", "2099-01-01T00:00:00Z")
    return (f"{kind}:{key}".encode(), command_json(action, kind, key, **kw))



@pytest.mark.broker
def test_late_starting_client_sees_every_active_command(broker):
    topic = _topic(broker)
    asyncio.run(produce(broker.bootstrap, topic, [
        _rec("halt", "session", "s1"),
        _rec("halt", "session", "s2"),
        _rec("release", "session", "s2", expires_at=None),
        _rec("halt", "session", "s3"),
        (b"session:s3", None),  # tombstone
        _rec("halt", "session", "s4", expires_at="2020-01-01T00:00:00Z"),  # long expired
        _rec("throttle", "route", "openai/gpt-4o", rate_limit_per_s=3, tenant="acme"),
        _rec("trip", "tenant", "globex", mode="shadow"),
    ] + [_rec("halt", "session", f"bulk-{i}") for i in range(300)]))

    async def run():
        c = BreakerClient(broker.bootstrap, topic=topic)
        t = time.monotonic()
        try:
            assert await c.start(timeout_s=20)
            took = time.monotonic() - t
            assert not c.check(session="s1").allow
            assert c.check(session="s2").allow and c.check(session="s3").allow and c.check(session="s4").allow
            assert c.check(route="openai/gpt-4o", tenant="acme").rate_limit_per_s == 3.0
            d = c.check(tenant="globex")
            assert d.allow and d.shadow and d.would_deny
            assert all(not c.check(session=f"bulk-{i}").allow for i in range(300))
            assert len(c.active()) == 303
            lag = c.lag()
            assert lag.ready and lag.records_behind == 0 and lag.seconds_since_last_record is not None
            return took
        finally:
            await c.stop()

    took = asyncio.run(asyncio.wait_for(run(), 40))
    print(f"late client ready after {took:.2f} s (308 records)")
    assert took < 15, took


@pytest.mark.broker
def test_live_commands_release_and_expiry(broker):
    topic = _topic(broker)

    async def run():
        c = BreakerClient(broker.bootstrap, topic=topic)
        try:
            assert await c.start(timeout_s=20)  # an empty topic is caught up at once (or after 1 s)
            assert c.check(session="s1").allow

            async def until(pred, timeout=10.0):
                end = time.monotonic() + timeout
                while time.monotonic() < end:
                    if pred():
                        return True
                    await asyncio.sleep(0.02)
                return False

            soon = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(time.time() + 3)) + ".000000Z"
            t = time.monotonic()
            await produce(broker.bootstrap, topic, [_rec("halt", "session", "s1"),
                                                    _rec("hold", "session", "s2", expires_at=soon)])
            assert await until(lambda: not c.check(session="s1").allow), "halt not seen"
            seen = time.monotonic() - t
            # s2's record may sit in another partition, fetched a moment later (Kafka; Tansu hands both at once)
            assert await until(lambda: not c.check(session="s2").allow), "hold not seen"
            await produce(broker.bootstrap, topic, [_rec("release", "session", "s1", expires_at=None)])
            assert await until(lambda: c.check(session="s1").allow), "release not seen"
            # s2 expires by the clock, with no record
            assert await until(lambda: c.check(session="s2").allow, timeout=8), "expiry not honoured"
            assert c.stats.records == 3 and c.stats.bad == 0
            return seen
        finally:
            await c.stop()

    seen = asyncio.run(asyncio.wait_for(run(), 60))
    assert seen < 5, seen


@pytest.mark.broker
def test_topic_created_after_the_client_started(broker):
    topic = f"breaker-{uuid.uuid4().hex[:8]}"

    async def run():
        c = BreakerClient(broker.bootstrap, topic=topic)
        try:
            assert await c.start(timeout_s=10)  # no topic: no command can exist
            await create_topics(broker.bootstrap, [(topic, 1, {"cleanup.policy": "compact"})])
            await produce(broker.bootstrap, topic, [_rec("halt", "session", "late")])
            end = time.monotonic() + 15
            while c.check(session="late").allow and time.monotonic() < end:
                await asyncio.sleep(0.05)
            assert not c.check(session="late").allow
        finally:
            await c.stop()

    asyncio.run(asyncio.wait_for(run(), 40))


def test_unreachable_broker_does_not_break_check():
    port = free_port()  # nothing listens there

    async def run():
        c = BreakerClient(f"127.0.0.1:{port}", topic="agent.breaker", request_timeout_ms=1000)
        t = time.monotonic()
        try:
            ready = await c.start(timeout_s=1.5)
            assert not ready and time.monotonic() - t < 3
            assert c.check(session="s1") is ALLOW
            await asyncio.sleep(0.5)
            assert c.stats.errors >= 1 and c.last_error
            assert not c.lag().ready
        finally:
            t = time.monotonic()
            await c.stop()
            assert time.monotonic() - t < 3

    asyncio.run(asyncio.wait_for(run(), 20))


@pytest.mark.broker
def test_thread_mode_from_synchronous_code(broker):
    topic = _topic(broker, partitions=1)
    asyncio.run(produce(broker.bootstrap, topic, [_rec("trip", "tenant", "acme")]))
    c = BreakerClient(broker.bootstrap, topic=topic)
    try:
        assert c.start_in_thread(timeout_s=20)
        assert not c.check(tenant="acme").allow
        # check() from another event loop than the client's
        assert asyncio.run(asyncio.sleep(0, result=c.check(tenant="acme"))).action == "trip"
        asyncio.run(produce(broker.bootstrap, topic, [_rec("release", "tenant", "acme", expires_at=None)]))
        end = time.monotonic() + 10
        while not c.check(tenant="acme").allow and time.monotonic() < end:
            time.sleep(0.05)
        assert c.check(tenant="acme").allow
    finally:
        t = time.monotonic()
        c.close()
        assert time.monotonic() - t < 5
