"""Input re-delivered under at-least-once (after a crash or a rebalance) is not applied twice.

The ingest agent tags every key's spans with their input message (``topic/partition``, offset);
a stage keeps, with each key's state, the highest offset it applied per input partition and skips
spans at or below it. This drives :class:`streams.app.KeyedStage` in-process with the session
stage (a dict stands in for the RocksDB table; the broker path is covered by
``tests/test_faults.py``, where a worker leaves the group and its partitions are re-processed).
"""

from __future__ import annotations

import asyncio

import orjson

from streams import metrics
from streams.app import KeyedStage, split_stored
from streams.models import Span
from streams.policy import Policy
from streams.stages import build_stages
from tests.stagedrive import Event

T0 = 1_767_225_600 * 10**9


def _call(i: int, offset: int) -> list:
    attrs = {"gen_ai.conversation.id": "s1", "gen_ai.operation.name": "execute_tool",
             "gen_ai.tool.name": "search", "tool.payload_hash": f"page-{i}"}
    t = T0 + offset * 10**9
    return Span("a" * 32, f"{offset:08x}{i:08x}", None, "search", "INTERNAL", t, t + 10**8, "OK", "", attrs, {"service.name": "svc"}).to_wire()


def _message(offset: int, calls: list[int]) -> Event:
    return Event(0, orjson.dumps({"keyed": {"s1": [["agent.spans/0", offset, [_call(i, offset) for i in calls]]]}}))


def _stage() -> tuple[KeyedStage, dict, list]:
    published: list = []

    async def publish(outs: list) -> list:
        published.extend(o for o in outs if o.kind != "forward")
        return []

    table: dict = {}
    ks = KeyedStage(None, build_stages(Policy())[0], None, table, 1, 5 * 10**9, 1800 * 10**9, publish)
    ks.needs_scan = False
    return ks, table, published


def test_redelivered_input_is_skipped_and_counted():
    ks, table, published = _stage()
    dup = metrics.DUPLICATE_SPANS.labels(stage="session")
    before = dup._value.get()
    # two distinct pages: no loop. Re-delivering both messages must not turn them into repeats.
    asyncio.run(ks.process([_message(7, [0]), _message(8, [1])]))
    asyncio.run(ks.process([_message(7, [0]), _message(8, [1])]))
    assert dup._value.get() - before == 2
    ks.flush()
    hw, raw = split_stored(table[b"s1"])
    assert hw == {"agent.spans/0": 8}
    # the stored offsets survive a rebalance: a new owner that loads the state still skips them
    ks2, _, published2 = _stage()
    ks2.table.update(table)
    asyncio.run(ks2.process([_message(8, [1]), _message(9, [2])]))
    assert dup._value.get() - before == 3
    assert not published and not published2  # three distinct pages, each once: nothing fired


def test_new_input_still_detects_a_loop():
    ks, _, published = _stage()
    same = [_message(10 + i, [0]) for i in range(3)]  # the same call three times, three messages
    asyncio.run(ks.process(same))
    assert [o.kind for o in published if o.kind == "incident"] == ["incident"]
