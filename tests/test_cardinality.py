"""High cardinality: a real loop sent behind a flood of all-distinct sessions (each a new key: a
state read, a new state, a write) is still detected, within the bound the README states for that
load (README "Cardinality"); the new keys are visible in ``breakwater_new_keys_total``."""

from __future__ import annotations

import asyncio
import time
import uuid

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from tests.kafka import collect

pytestmark = pytest.mark.broker
S = 10**9
FLOOD_SESSIONS = 20_000
BOUND_S = 60.0  # README "Cardinality": a loop behind 20,000 new sessions, on 2 cores


def call(sid, t_ns, session, tool="search", args='{"q": 1}'):
    return {"trace_id": uuid.uuid4().hex, "span_id": sid, "name": f"execute_tool {tool}",
            "start_time_unix_nano": t_ns - S // 10, "end_time_unix_nano": t_ns, "status": {"code": "OK"},
            "attributes": {"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": tool,
                           "gen_ai.tool.call.arguments": args, "gen_ai.conversation.id": session},
            "resource": {"service.name": "svc"}}


def test_a_loop_behind_a_flood_of_new_sessions_is_detected_in_bound(isolated):
    settings, start_worker = isolated
    w = start_worker()
    tag = uuid.uuid4().hex[:6]
    now = time.time_ns()
    flood = [call(f"{i:016x}", now + i * 1000, f"new-{tag}-{i}", tool=f"t{i % 7}", args=f'{{"i": {i}}}')
             for i in range(FLOOD_SESSIONS)]
    loop = f"loop-{tag}"
    sent: dict[str, float] = {}

    async def send() -> None:
        p = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, acks=1, linger_ms=5,
                             max_request_size=4 << 20)
        await p.start()
        try:
            for j in range(0, len(flood), 100):  # JSON arrays of 100 spans, as exporters batch
                await p.send(settings.topic_spans, orjson.dumps(flood[j:j + 100]), key=str(j).encode())
            await p.flush()
            t = time.time_ns()
            for i in range(3):
                await p.send_and_wait(settings.topic_spans, orjson.dumps(call(f"{0xF0000 + i:016x}", t + i, loop)),
                                      key=loop.encode())
            sent["loop"] = time.time()
        finally:
            await p.stop()

    t0 = time.time()
    asyncio.run(send())
    recs = asyncio.run(collect(settings.bootstrap_servers, settings.topic_incidents,
                               lambda rs: any(orjson.loads(m.value)["session_id"] == loop for m in rs), BOUND_S + 30))
    hit = [m for m in recs if orjson.loads(m.value)["session_id"] == loop]
    assert hit, "the loop behind the flood was never detected"
    latency = hit[0].timestamp / 1000 - sent["loop"]
    print(f"cardinality: {FLOOD_SESSIONS} new sessions sent in {sent['loop'] - t0:.1f} s; "
          f"the loop behind them detected {latency:.1f} s after its last call")
    assert latency <= BOUND_S
    assert w.proc.poll() is None
