"""Hostile records on the breaker topic (issue 14, finding 7): a gateway client must never let a
record's Kafka key disagree with the command it carries, must refuse empty or oversized scope
keys and non-finite / negative / zero throttle rates, must count every rejected record by reason,
and must log a rejection without any of the record's content. Unit tests on the validation, one
test through the LiteLLM hook, then the same hostile records on the real embedded broker."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from collections import Counter

import orjson
import pytest

from streams.broker import create_topics
from streams.gateway import ALLOW, MAX_SCOPE_KEY_CHARS, BadRecord, BreakerClient, command_json, validate_record
from tests.kafka import produce

T0 = 1767225600.0  # 2026-01-01T00:00:00Z
LATER = "2099-01-01T00:00:00Z"
SECRET = "sk-live-DO-NOT-LOG-0123456789abcdef"


def client() -> BreakerClient:
    return BreakerClient("127.0.0.1:9092", clock=lambda: T0)


def cmd(action: str, kind: str, key: str, **kw) -> bytes:
    kw.setdefault("expires_at", LATER)
    return command_json(action, kind, key, **kw)


def rec(action: str, kind: str, key: str, **kw) -> tuple[bytes, bytes]:
    return f"{kind}:{key}".encode(), cmd(action, kind, key, **kw)


def with_rate(action: str, kind: str, key: str, literal: str, **kw) -> bytes:
    """A command whose ``rate_limit_per_s`` is a raw JSON literal (NaN, Infinity, -1, 1e400 …):
    pydantic parses these, but no JSON encoder of ours writes them."""
    value = cmd(action, kind, key, rate_limit_per_s=7.0, **kw)
    assert b'"rate_limit_per_s":7.0' in value
    return value.replace(b'"rate_limit_per_s":7.0', b'"rate_limit_per_s":' + literal.encode())


def edit(value: bytes, **fields) -> bytes:
    d = orjson.loads(value)
    d.update(fields)
    return orjson.dumps(d)


# ----------------------------------------------------------------------------- the key is the scope


def test_a_record_keyed_for_one_session_cannot_halt_another_or_the_key():
    c = client()
    assert c.apply(b"session:victim", cmd("halt", "session", "other")) == "bad"
    assert c.check(session="victim") is ALLOW       # today: denied (the key was trusted)
    assert c.check(session="other") is ALLOW
    assert c.rejected == Counter({"key_mismatch": 1})
    assert c.stats.bad == 1 and c.stats.commands == 0


def test_a_mismatched_release_cannot_release_the_key_it_rides_on():
    c = client()
    assert c.apply(*rec("halt", "session", "victim")) == "set"
    assert c.apply(b"session:victim", cmd("release", "session", "other", expires_at=None)) == "bad"
    assert not c.check(session="victim").allow       # the halt stays in force
    assert c.rejected["key_mismatch"] == 1 and c.stats.removals == 0


@pytest.mark.parametrize("key,kind,scope_key", [
    (b"tenant:acme", "session", "acme"),          # same key, other kind
    (b"session:s1 ", "session", "s1"),            # trailing space
    (b"SESSION:s1", "session", "s1"),             # case
    (b"session:s1", "session", "s1\u200b"),       # invisible character in the scope
    (b"route:openai/gpt-4o", "route", "openai/gpt-4o-mini"),
])
def test_every_key_that_is_not_exactly_kind_colon_key_is_rejected(key, kind, scope_key):
    c = client()
    assert c.apply(key, cmd("halt", kind, scope_key)) == "bad"
    assert c.active() == {} and c.rejected == Counter({"key_mismatch": 1})


def test_a_key_that_is_not_utf8_is_rejected_not_replaced():
    c = client()
    # today the key is decoded with errors="replace" and trusted: "session:\ufffd" is halted
    assert c.apply(b"session:\xff", cmd("halt", "session", "\ufffd")) == "bad"
    assert c.check(session="\ufffd") is ALLOW
    assert c.rejected == Counter({"bad_key": 1})


def test_a_record_without_a_key_takes_the_scope_key():
    c = client()
    assert c.apply(None, cmd("halt", "session", "s1")) == "set"
    assert list(c.active()) == ["session:s1"] and not c.rejected


# ----------------------------------------------------------------------------- scope keys


def test_an_empty_scope_key_is_rejected():
    c = client()
    assert c.apply(b"session:", cmd("halt", "session", "")) == "bad"
    assert c.apply(None, cmd("trip", "tenant", "")) == "bad"
    assert c.check(session="", tenant="") is ALLOW   # today: denied
    assert c.rejected == Counter({"empty_scope_key": 2})


def test_scope_keys_are_capped():
    c = client()
    ok = "k" * MAX_SCOPE_KEY_CHARS
    assert c.apply(*rec("halt", "session", ok)) == "set"
    long = "k" * (MAX_SCOPE_KEY_CHARS + 1)
    assert c.apply(*rec("halt", "session", long)) == "bad"
    assert c.check(session=long) is ALLOW and not c.check(session=ok).allow
    assert c.rejected == Counter({"scope_key_too_long": 1})


def test_a_tenant_that_narrows_a_route_must_be_a_real_tenant():
    c = client()
    # an empty tenant would narrow the route to callers whose tenant is "" (a typo, or an attack)
    assert c.apply(*rec("throttle", "route", "openai/gpt-4o", tenant="", rate_limit_per_s=1)) == "bad"
    assert c.apply(*rec("hold", "tool", "rm", tenant="t" * (MAX_SCOPE_KEY_CHARS + 1))) == "bad"
    assert c.active() == {} and c.rejected == Counter({"bad_tenant": 2})
    # on a session the tenant is information only: never a reason to drop a halt
    assert c.apply(*rec("halt", "session", "s1", tenant="")) == "set"


# ----------------------------------------------------------------------------- rates


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400", "-1", "-0.5", "0", "0.0", "-0.0"])
def test_a_throttle_rate_must_be_finite_and_positive(literal):
    c = client()
    assert c.apply(b"route:r/m", with_rate("throttle", "route", "r/m", literal)) == "bad"
    # today: NaN / negative / zero deny forever, Infinity allows everything as a "throttle"
    assert c.check(route="r/m") is ALLOW
    assert c.active() == {} and c.rejected == Counter({"bad_rate": 1})


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-1"])
def test_a_hostile_rate_on_any_action_is_rejected_and_keeps_the_key_state(literal):
    c = client()
    assert c.apply(*rec("halt", "session", "s1")) == "set"
    # the newest record of s1 is hostile: it is skipped, the halt stays in force
    assert c.apply(b"session:s1", with_rate("release", "session", "s1", literal, expires_at=None)) == "bad"
    assert not c.check(session="s1").allow
    assert c.rejected == Counter({"bad_rate": 1})


def test_a_rate_on_a_deny_command_is_ignored_when_sane():
    c = client()
    assert c.apply(*rec("halt", "session", "s1", rate_limit_per_s=0)) == "set"
    assert c.check(session="s1").rate_limit_per_s is None


def test_a_sane_throttle_still_works():
    c = client()
    assert c.apply(b"route:r/m", with_rate("throttle", "route", "r/m", "2.5")) == "set"
    assert [c.check(route="r/m").allow for _ in range(3)] == [True, True, False]


@pytest.mark.parametrize("rate", [0, -1, float("nan"), float("inf")])
def test_the_default_rate_must_be_finite_and_positive(rate):
    with pytest.raises(ValueError, match="default_rate_per_s"):
        BreakerClient("127.0.0.1:9092", default_rate_per_s=rate)


# ----------------------------------------------------------------------------- schema


@pytest.mark.parametrize("field,value", [("action", "explode"), ("action", "HALT"), ("mode", "audit"),
                                         ("mode", None), ("scope", {"kind": "planet", "key": "earth"}),
                                         ("scope", {"kind": "session"})])
def test_unknown_actions_modes_and_kinds_are_rejected(field, value):
    c = client()
    assert c.apply(b"session:s1", edit(cmd("halt", "session", "s1"), **{field: value})) == "bad"
    assert c.check(session="s1") is ALLOW and c.rejected == Counter({"schema": 1})


@pytest.mark.parametrize("value,reason", [(b"{not json", "not_json"), (b"\xff\xfe", "not_json"), (b"", "not_json"),
                                          (b"[]", "schema"),
                                          (cmd("halt", "session", "s1", expires_at="tomorrow"), "bad_expiry"),
                                          (cmd("halt", "session", "s1", expires_at="2099-01-01T00:00:00"), "bad_expiry"),
                                          (cmd("halt", "session", "s1", expires_at=""), "bad_expiry")])  # "" ≠ no expiry
def test_every_rejection_has_a_reason(value, reason):
    c = client()
    assert c.apply(b"session:s1", value) == "bad"
    assert c.rejected == Counter({reason: 1}) and c.stats.bad == 1


def test_validate_record_is_the_one_check():
    ok = validate_record(b"session:s1", cmd("halt", "session", "s1"))
    assert ok.key == "session:s1" and ok.command.action == "halt" and ok.until is not None
    assert validate_record(None, cmd("halt", "session", "s1")).key == "session:s1"
    for key, value, reason in [
        (b"session:victim", cmd("halt", "session", "other"), "key_mismatch"),
        (b"session:", cmd("halt", "session", ""), "empty_scope_key"),
        (b"route:r", with_rate("throttle", "route", "r", "NaN"), "bad_rate"),
        (b"session:\xff", cmd("halt", "session", "x"), "bad_key"),
    ]:
        with pytest.raises(BadRecord) as e:
            validate_record(key, value)
        assert e.value.reason == reason


# ----------------------------------------------------------------------------- tombstones


def test_a_tombstone_releases_exactly_its_key():
    c = client()
    c.apply(*rec("halt", "session", "s1"))
    c.apply(*rec("halt", "session", "s10"))
    assert c.apply(b"session:s1", None) == "removed"
    assert c.check(session="s1") is ALLOW and not c.check(session="s10").allow
    assert c.apply(b"session:nobody", None) == "removed" and c.stats.removals == 1
    assert c.apply(b"session:\xff", None) == "bad" and c.rejected == Counter({"bad_key": 1})
    assert not c.check(session="s10").allow


# ----------------------------------------------------------------------------- logging


def test_a_rejection_is_logged_with_reason_and_key_digest_never_content(caplog):
    c = client()
    key = f"session:{SECRET}".encode()
    hostile = [
        (key, cmd("halt", "session", "other", reason=SECRET)),                       # key_mismatch
        (key, b'{"command_id": "' + SECRET.encode() + b'", "action": "halt"}'),      # schema
        (key, SECRET.encode() + b"{"),                                                # not_json
        (key, edit(cmd("halt", "session", SECRET), expires_at=SECRET)),              # bad_expiry
    ]
    with caplog.at_level(logging.DEBUG, logger="breakwater.gateway"):
        for k, v in hostile:
            assert c.apply(k, v) == "bad"
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert len(caplog.records) == 4, text
    assert "sk-" not in text and "DO-NOT-LOG" not in text and "other" not in text, text
    digest = hashlib.sha256(key).hexdigest()[:12]
    for r, reason in zip(caplog.records, ["key_mismatch", "schema", "not_json", "bad_expiry"]):
        m = r.getMessage()
        assert f"reason={reason}" in m and f"key_len={len(key)}" in m and f"key_sha256={digest}" in m, m


def test_a_flood_of_bad_records_does_not_flood_the_log(caplog):
    c = client()
    with caplog.at_level(logging.WARNING, logger="breakwater.gateway"):
        for i in range(5000):
            c.apply(f"session:v{i}".encode(), cmd("halt", "session", "other"))
    assert c.rejected["key_mismatch"] == 5000
    assert len(caplog.records) <= 20


# ----------------------------------------------------------------------------- through the LiteLLM hook


def test_litellm_hook_obeys_only_valid_commands():
    from litellm.caching.dual_cache import DualCache
    from litellm.proxy._types import UserAPIKeyAuth

    from streams.integrations.litellm import BreakwaterDenied, BreakwaterGuard

    bc = BreakerClient("127.0.0.1:9092")
    bc.apply(b"session:victim", cmd("halt", "session", "other"))                  # mismatch
    bc.apply(b"route:openai/gpt-4o", with_rate("throttle", "route", "openai/gpt-4o", "NaN"))
    bc.apply(*rec("halt", "session", "looping"))
    guard = BreakwaterGuard(bc)

    async def call(session: str) -> None:
        data = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}],
                "metadata": {"session_id": session}, "litellm_call_id": uuid.uuid4().hex}
        await guard.async_pre_call_hook(user_api_key_dict=UserAPIKeyAuth(api_key="sk-test"), cache=DualCache(),
                                        data=data, call_type="acompletion")

    for _ in range(3):  # today: 429 (NaN throttle = deny forever) or 403 (victim halted by the key)
        asyncio.run(call("victim"))
        asyncio.run(call("other"))
    with pytest.raises(BreakwaterDenied, match="session:looping"):
        asyncio.run(call("looping"))
    assert bc.rejected == Counter({"key_mismatch": 1, "bad_rate": 1})


# ----------------------------------------------------------------------------- on the embedded broker


@pytest.mark.broker
def test_hostile_records_on_the_broker(broker, caplog):
    topic = f"breaker-{uuid.uuid4().hex[:8]}"
    asyncio.run(create_topics(broker.bootstrap, [(topic, 2, {"cleanup.policy": "compact"})]))
    long = "x" * (MAX_SCOPE_KEY_CHARS + 88)
    hostile = [
        rec("halt", "session", "victim2"),                                              # legit, first
        (b"session:victim", cmd("halt", "session", "other")),                           # key_mismatch
        (b"session:victim2", cmd("release", "session", "other2", expires_at=None)),     # key_mismatch
        (b"session:", cmd("halt", "session", "")),                                      # empty_scope_key
        (b"route:r/nan", with_rate("throttle", "route", "r/nan", "NaN")),               # bad_rate
        (b"route:r/neg", with_rate("throttle", "route", "r/neg", "-1")),                # bad_rate
        (b"route:r/inf", with_rate("throttle", "route", "r/inf", "Infinity")),          # bad_rate
        (b"route:r/zero", with_rate("throttle", "route", "r/zero", "0")),               # bad_rate
        rec("halt", "session", long),                                                   # scope_key_too_long
        (b"session:weird", edit(cmd("halt", "session", "weird"), action="explode")),   # schema
        (b"session:\xff", cmd("halt", "session", "\ufffd")),                            # bad_key
        rec("halt", "session", "gone"),
        (b"session:gone", None),                                                        # tombstone
        rec("throttle", "route", "r/ok", rate_limit_per_s=2),
        rec("halt", "session", "good"),
    ]
    expected = Counter({"key_mismatch": 2, "empty_scope_key": 1, "bad_rate": 4, "scope_key_too_long": 1,
                        "schema": 1, "bad_key": 1})

    def verify(c: BreakerClient) -> None:
        assert c.check(session="victim") is ALLOW and c.check(session="other") is ALLOW
        assert c.check(session="other2") is ALLOW
        assert not c.check(session="victim2").allow                  # the hostile release did not release it
        assert c.check(session="") is ALLOW and c.check(session=long) is ALLOW
        assert c.check(session="weird") is ALLOW and c.check(session="\ufffd") is ALLOW
        for r in ("r/nan", "r/neg", "r/inf", "r/zero"):
            assert c.check(route=r) is ALLOW, r                      # no command: neither "deny forever" nor "unlimited"
        assert c.check(session="gone") is ALLOW
        assert not c.check(session="good").allow
        d = c.check(route="r/ok")
        assert d.allow and d.action == "throttle" and d.rate_limit_per_s == 2.0
        assert sorted(c.active()) == ["route:r/ok", "session:good", "session:victim2"]
        assert c.rejected == expected and c.stats.bad == sum(expected.values())

    async def until(pred, timeout=15.0) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if pred():
                return True
            await asyncio.sleep(0.05)
        return pred()

    async def run() -> None:
        live = BreakerClient(broker.bootstrap, topic=topic)
        try:
            assert await live.start(timeout_s=20)
            await produce(broker.bootstrap, topic, hostile)
            assert await until(lambda: live.stats.records == len(hostile)), live.stats
            verify(live)
            late = BreakerClient(broker.bootstrap, topic=topic)  # a gateway started afterwards agrees
            try:
                assert await late.start(timeout_s=20)
                assert await until(lambda: late.stats.records == len(hostile)), late.stats
                verify(late)
            finally:
                await late.stop()
        finally:
            await live.stop()

    with caplog.at_level(logging.WARNING, logger="breakwater.gateway"):
        asyncio.run(asyncio.wait_for(run(), 90))
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "other" not in text and "explode" not in text and "xxxx" not in text, text
