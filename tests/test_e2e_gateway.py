"""Issue 5's "done when", end to end on the embedded broker: an agent instrumented with the
OpenTelemetry SDK (spans published by :class:`~streams.exporter.KafkaSpanExporter`) loops on one
tool call and calls its model through LiteLLM (mock responses, no network) guarded by
:class:`~streams.integrations.litellm.BreakwaterGuard`; Breakwater (a real worker) publishes
``halt``; the LiteLLM hook denies that session's next call (SDK and proxy hook alike) while other
sessions go on; after the command's short TTL the call is allowed again."""

from __future__ import annotations

import os

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network: LiteLLM's bundled price map

import asyncio  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from datetime import datetime  # noqa: E402

import litellm  # noqa: E402
import pytest  # noqa: E402
from litellm.caching.dual_cache import DualCache  # noqa: E402
from litellm.proxy._types import UserAPIKeyAuth  # noqa: E402
from opentelemetry.sdk.resources import Resource  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import BatchSpanProcessor  # noqa: E402

from streams.exporter import KafkaSpanExporter  # noqa: E402
from streams.integrations.litellm import BreakwaterDenied, BreakwaterGuard  # noqa: E402

pytestmark = pytest.mark.broker

TTL_S = 5
MSG = [{"role": "user", "content": "where is order 42?"}]


async def llm(session: str) -> str:
    r = await litellm.acompletion(model="gpt-4o", messages=MSG, mock_response="call search(order 42)",
                                  metadata={"session_id": session, "tenant": "acme"})
    return r.choices[0].message.content


async def proxy_allows(guard: BreakwaterGuard, session: str) -> bool:
    data = {"model": "gpt-4o", "messages": MSG, "metadata": {"session_id": session}}
    try:
        await guard.async_pre_call_hook(user_api_key_dict=UserAPIKeyAuth(api_key="sk-e2e"), cache=DualCache(),
                                        data=data, call_type="acompletion")
        return True
    except BreakwaterDenied:
        return False


def test_otel_agent_loops_breakwater_halts_litellm_denies_then_expiry_allows(isolated, tmp_path):
    settings, start_worker = isolated
    policy = tmp_path / "policy.toml"
    policy.write_text(f"[detectors.no_progress_loop]\nbreaker_ttl_s = {TTL_S}\n")
    worker = start_worker(extra_env={"BREAKWATER_POLICY_FILE": str(policy)})

    session = f"agent-{uuid.uuid4().hex[:6]}"
    bystander = f"other-{uuid.uuid4().hex[:6]}"
    exporter = KafkaSpanExporter(settings)
    provider = TracerProvider(resource=Resource.create({"service.name": "support-agent", "tenant.id": "acme"}))
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=100))
    tracer = provider.get_tracer("e2e-agent")
    guard = BreakwaterGuard(settings=settings, ready_timeout_s=20)
    saved = list(litellm.callbacks)
    litellm.callbacks = [guard]

    third: list[float] = []

    async def agent() -> tuple[int, BreakwaterDenied | None, float]:
        t0 = time.monotonic()
        calls = 0
        with tracer.start_as_current_span("invoke_agent", attributes={
            "gen_ai.operation.name": "invoke_agent", "gen_ai.conversation.id": session,
        }):
            while time.monotonic() - t0 < 45:
                try:
                    await llm(session)
                except BreakwaterDenied as e:
                    return calls, e, time.monotonic() - t0
                with tracer.start_as_current_span("execute_tool search", attributes={
                    "gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "search",
                    "gen_ai.tool.call.arguments": '{"order": 42}', "gen_ai.conversation.id": session,
                }):
                    await asyncio.sleep(0.02)
                calls += 1
                if calls == 3:
                    third.append(time.monotonic())
                await asyncio.sleep(0.1)
        return calls, None, time.monotonic() - t0

    async def run():
        calls, denied, took = await agent()
        after_third = time.monotonic() - third[0] if third else None
        assert denied is not None, f"never denied after {calls} calls; worker log:\n{worker.log_text()[-3000:]}"
        d = denied.decision
        assert d.action == "halt" and d.scope == f"session:{session}"
        assert d.reason.startswith("no_progress_loop") and d.command_id in str(denied)
        assert calls >= 3 and took < 20, (calls, took)
        # the proxy hook denies that session too; other sessions are untouched
        assert not await proxy_allows(guard, session)
        assert await proxy_allows(guard, bystander) and await llm(bystander)
        # after the TTL (event time ≈ wall time with SDK spans) the session may call again
        expires = datetime.fromisoformat(d.expires_at.replace("Z", "+00:00")).timestamp()
        assert 0 < expires - time.time() <= TTL_S + 1
        deadline = time.monotonic() + TTL_S + 15
        while time.monotonic() < deadline:
            try:
                await llm(session)
                break
            except BreakwaterDenied:
                await asyncio.sleep(0.2)
        else:
            pytest.fail("still denied long after the command expired")
        assert time.time() >= expires - 0.05
        assert await proxy_allows(guard, session)
        return calls, took, after_third

    try:
        calls, took, after_third = asyncio.run(asyncio.wait_for(run(), 120))
        print(f"halted after {calls} loop iterations, {took:.2f} s ({after_third:.2f} s after the 3rd identical "
              f"call); allowed again after the {TTL_S} s TTL")
    finally:
        litellm.callbacks = saved
        guard.close()
        provider.shutdown()
