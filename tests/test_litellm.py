"""The LiteLLM integration, with the real ``litellm`` package in mock-response mode (no network):
the proxy's pre-call hook and the SDK's ``acompletion`` against commands in memory, then against
commands published on the embedded broker (halt, release, expiry)."""

from __future__ import annotations

import os

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network: LiteLLM's bundled price map

import asyncio  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402

import litellm  # noqa: E402
import pytest  # noqa: E402
from litellm.caching.dual_cache import DualCache  # noqa: E402
from litellm.proxy._types import UserAPIKeyAuth  # noqa: E402

from streams.broker import create_topics, free_port  # noqa: E402
from streams.gateway import BreakerClient, command_json  # noqa: E402
from streams.integrations.litellm import (  # noqa: E402
    BreakwaterDenied,
    BreakwaterGuard,
    BreakwaterThrottled,
    BreakwaterUnavailable,
    scopes_of,
)
from streams.settings import Settings  # noqa: E402
from tests.kafka import produce  # noqa: E402

MSG = [{"role": "user", "content": "hello"}]
KEY = UserAPIKeyAuth(api_key="sk-test", team_id="team-1", metadata={"tenant": "acme"})


def iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}Z"


def rec(action, kind, key, *, expires_at: str | None = "2099-01-01T00:00:00Z", **kw):
    return (f"{kind}:{key}".encode(), command_json(action, kind, key, expires_at=expires_at, **kw))


@pytest.fixture
def sdk_callbacks():
    """litellm.callbacks is global: restore it after each test."""
    saved = list(litellm.callbacks)
    try:
        yield
    finally:
        litellm.callbacks = saved


def proxy_request(session: str, model: str = "gpt-4o", **meta) -> dict:
    return {"model": model, "messages": MSG, "metadata": {"session_id": session, **meta},
            "litellm_call_id": uuid.uuid4().hex}


async def proxy_hook(guard: BreakwaterGuard, data: dict) -> None:
    await guard.async_pre_call_hook(user_api_key_dict=KEY, cache=DualCache(), data=data, call_type="acompletion")


async def sdk_call(session: str, model: str = "gpt-4o", **meta) -> str:
    r = await litellm.acompletion(model=model, messages=MSG, mock_response="mocked",
                                  metadata={"session_id": session, **meta})
    return r.choices[0].message.content


def memory_guard(*commands: tuple[bytes, bytes]) -> BreakwaterGuard:
    client = BreakerClient("127.0.0.1:9092")
    for k, v in commands:
        client.apply(k, v)
    return BreakwaterGuard(client)


# ----------------------------------------------------------------------------- in memory


def test_scopes_from_proxy_and_sdk_requests():
    assert scopes_of(proxy_request("s1"), KEY) == {
        "tenant": "acme", "session": "s1", "workflow": None, "route": "openai/gpt-4o", "tool": None}
    assert scopes_of({"model": "anthropic/claude-3-5-sonnet", "litellm_session_id": "s2",
                      "litellm_metadata": {"tenant_id": "globex", "workflow_id": "wf-9"}}) == {
        "tenant": "globex", "session": "s2", "workflow": "wf-9", "route": "anthropic/claude-3-5-sonnet", "tool": None}
    # request metadata beats the key's metadata; an explicit route beats the model
    s = scopes_of(proxy_request("s3", tenant="initech", route="azure.ai.openai/gpt-4o"), KEY)
    assert (s["tenant"], s["route"]) == ("initech", "azure.ai.openai/gpt-4o")
    assert scopes_of({"model": "bedrock/anthropic.claude-3"})["route"] == "aws.bedrock/anthropic.claude-3"


def test_proxy_hook_denies_halted_session_with_a_clear_message():
    guard = memory_guard(rec("halt", "session", "s1", reason="no_progress_loop:repeat", command_id="cmd-abc"))
    data = proxy_request("s2")
    assert asyncio.run(proxy_hook(guard, data)) is None  # allowed: the request goes on unchanged
    with pytest.raises(BreakwaterDenied) as e:
        asyncio.run(proxy_hook(guard, proxy_request("s1")))
    err = e.value
    assert err.status_code == 403 and isinstance(err, litellm.PermissionDeniedError)
    assert "cmd-abc" in str(err) and "no_progress_loop:repeat" in str(err) and "session:s1" in str(err)
    assert err.decision.action == "halt"


def test_tripped_tenant_from_the_key_metadata():
    guard = memory_guard(rec("trip", "tenant", "acme", reason="cost_velocity:baseline"))
    with pytest.raises(BreakwaterDenied, match="trip on tenant:acme"):
        asyncio.run(proxy_hook(guard, proxy_request("any")))


def test_throttled_route_raises_429_with_retry_after():
    guard = memory_guard(rec("throttle", "route", "openai/gpt-4o", rate_limit_per_s=2, reason="retry_storm:route"))
    asyncio.run(proxy_hook(guard, proxy_request("s1")))
    asyncio.run(proxy_hook(guard, proxy_request("s2")))
    with pytest.raises(BreakwaterThrottled) as e:
        asyncio.run(proxy_hook(guard, proxy_request("s3")))
    err = e.value
    assert err.status_code == 429 and isinstance(err, litellm.RateLimitError)
    assert err.headers == {"retry-after": "1"} and "limit 2/s" in str(err)
    # another model is another route
    asyncio.run(proxy_hook(guard, proxy_request("s3", model="anthropic/claude-3-5-sonnet")))


def test_shadow_commands_never_deny():
    guard = memory_guard(rec("halt", "session", "s1", mode="shadow"))
    asyncio.run(proxy_hook(guard, proxy_request("s1")))


def test_sdk_acompletion_is_guarded(sdk_callbacks):
    guard = memory_guard(rec("halt", "session", "bad", command_id="cmd-sdk"))
    litellm.callbacks = [guard]

    async def run():
        assert await sdk_call("good") == "mocked"
        with pytest.raises(BreakwaterDenied, match="cmd-sdk"):
            await sdk_call("bad")

    asyncio.run(run())


def test_a_request_checked_by_the_proxy_hook_is_not_checked_again(sdk_callbacks):
    """Behind the proxy both hooks run; a throttle must charge one token per request, not two."""
    guard = memory_guard(rec("throttle", "route", "openai/gpt-4o", rate_limit_per_s=1))
    litellm.callbacks = [guard]

    async def run():
        data = proxy_request("s1")
        await proxy_hook(guard, data)  # takes the only token
        r = await litellm.acompletion(**{**data, "mock_response": "mocked"})  # what the router does next
        assert r.choices[0].message.content == "mocked"
        with pytest.raises(BreakwaterThrottled):
            await sdk_call("s2")  # an unchecked SDK call finds the bucket empty

    asyncio.run(run())


def test_sync_callers_use_enforce():
    guard = memory_guard(rec("hold", "session", "s1"))
    assert guard.enforce({"model": "gpt-4o", "metadata": {"session_id": "s2"}}).allow
    with pytest.raises(BreakwaterDenied):
        guard.enforce({"model": "gpt-4o", "metadata": {"session_id": "s1"}})


def test_fail_open_and_fail_closed_when_the_broker_is_unreachable():
    settings = Settings(broker=f"kafka://127.0.0.1:{free_port()}")
    open_guard = BreakwaterGuard(settings=settings, ready_timeout_s=0.5)
    closed_guard = BreakwaterGuard(settings=settings, ready_timeout_s=0.5, fail_open=False)
    try:
        t = time.monotonic()
        asyncio.run(proxy_hook(open_guard, proxy_request("s1")))
        assert time.monotonic() - t < 3
        with pytest.raises(BreakwaterUnavailable) as e:
            asyncio.run(proxy_hook(closed_guard, proxy_request("s1")))
        assert e.value.status_code == 503
    finally:
        open_guard.close()
        closed_guard.close()


# ----------------------------------------------------------------------------- the real broker


@pytest.mark.broker
def test_commands_on_the_broker_drive_the_hook(broker, sdk_callbacks):
    topic = f"breaker-{uuid.uuid4().hex[:8]}"
    asyncio.run(create_topics(broker.bootstrap, [(topic, 2, {"cleanup.policy": "compact"})]))
    halted, other = f"sess-{uuid.uuid4().hex[:6]}", f"sess-{uuid.uuid4().hex[:6]}"
    guard = BreakwaterGuard(settings=Settings(broker=broker.url, topic_breaker=topic), ready_timeout_s=20)
    litellm.callbacks = [guard]

    async def until(pred, timeout=10.0) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if await pred():
                return True
            await asyncio.sleep(0.05)
        return False

    async def allowed(session: str) -> bool:
        try:
            await proxy_hook(guard, proxy_request(session))
            return await sdk_call(session) == "mocked"
        except BreakwaterDenied:
            return False

    async def denied(session: str) -> bool:
        return not await allowed(session)

    async def run():
        assert await allowed(halted)  # starts the guard's client; nothing published yet
        await produce(broker.bootstrap, topic, [rec("halt", "session", halted, command_id="cmd-live",
                                                    reason="no_progress_loop:repeat")])
        assert await until(lambda: denied(halted)), "halt not obeyed"
        with pytest.raises(BreakwaterDenied, match="cmd-live"):
            await sdk_call(halted)
        assert await allowed(other)
        await produce(broker.bootstrap, topic, [rec("release", "session", halted, expires_at=None)])
        assert await until(lambda: allowed(halted)), "release not obeyed"
        # a short TTL: denied now, allowed again after the expiry, with no record in between
        ttl_end = time.time() + 4
        await produce(broker.bootstrap, topic, [rec("halt", "session", halted, expires_at=iso(ttl_end))])
        assert await until(lambda: denied(halted)), "second halt not obeyed"
        assert await until(lambda: allowed(halted), timeout=15), "expiry not honoured"
        assert time.time() >= ttl_end - 0.01

    try:
        asyncio.run(asyncio.wait_for(run(), 90))
    finally:
        guard.close()
