"""Helpers for integration tests: real aiokafka clients against the test broker (Tansu or Kafka)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition


async def produce(bootstrap: str, topic: str, records: list[tuple[bytes | None, bytes]]) -> None:
    p = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await p.start()
    try:
        for key, value in records:
            await p.send_and_wait(topic, value, key=key)
    finally:
        await p.stop()


async def collect(
    bootstrap: str,
    topic: str,
    until: Callable[[list[Any]], bool],
    timeout_s: float = 45.0,
) -> list[Any]:
    """Read ``topic`` from the beginning (no group) until ``until(records)`` or the timeout."""
    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest")
    await c.start()
    got: list[Any] = []
    try:
        parts = None
        deadline = time.monotonic() + timeout_s
        while parts is None and time.monotonic() < deadline:
            parts = c.partitions_for_topic(topic)
            if not parts:
                parts = None
                await c._client.force_metadata_update()  # noqa: SLF001
                await asyncio.sleep(0.2)
        if parts is None:
            return got
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        c.assign(tps)
        await c.seek_to_beginning(*tps)
        while time.monotonic() < deadline:
            batch = await c.getmany(timeout_ms=300)
            for msgs in batch.values():
                got.extend(msgs)
            if until(got):
                break
    finally:
        await c.stop()
    return got
