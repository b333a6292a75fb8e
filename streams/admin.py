"""Operator actions on the bus: ``breakwater breaker release SCOPE``.

A manual release is a :class:`~streams.models.BreakerCommand` with ``action: release`` published
under the scope's key on the compacted breaker topic, so it replaces the active command there
(a gateway that starts later sees the release, not the halt). Its reason is recorded in the
command, with who/why given by the operator.

>>> cmd = manual_release_command("session:sess-1", reason="false positive, ticket 42", now_ns=0)
>>> cmd.action, cmd.scope.kind, cmd.scope.key, cmd.kafka_key()
('release', 'session', 'sess-1', b'session:sess-1')
>>> cmd.reason
'manual: false positive, ticket 42'
"""

from __future__ import annotations

import time

from streams.models import BreakerCommand, CommandScope
from streams.policy import rfc3339, stable_id
from streams.settings import Settings

SCOPE_KINDS = ("session", "tenant", "workflow", "route", "tool")


def parse_scope(scope: str) -> tuple[str, str]:
    """``"kind:key"`` → (kind, key), with a clear error.

    >>> parse_scope("route:openai/gpt-4o")
    ('route', 'openai/gpt-4o')
    >>> parse_scope("sess-1")
    Traceback (most recent call last):
    ...
    ValueError: scope must look like KIND:KEY with KIND one of session, tenant, workflow, route, tool; got 'sess-1'
    """
    kind, sep, key = scope.partition(":")
    if not sep or kind not in SCOPE_KINDS or not key:
        raise ValueError(f"scope must look like KIND:KEY with KIND one of {', '.join(SCOPE_KINDS)}; got {scope!r}")
    return kind, key


def manual_release_command(scope: str, *, reason: str, tenant: str | None = None,
                           now_ns: int | None = None) -> BreakerCommand:
    kind, key = parse_scope(scope)
    now_ns = time.time_ns() if now_ns is None else now_ns
    return BreakerCommand(
        command_id=stable_id("cmd", "manual-release", kind, key, now_ns),
        action="release",
        scope=CommandScope(kind=kind, key=key, tenant=tenant),  # type: ignore[arg-type]
        mode="enforce",
        reason=f"manual: {reason}",
        detector=None,
        incident_id=None,
        issued_at=rfc3339(now_ns),
        expires_at=None,
    )


async def publish_release(settings: Settings, cmd: BreakerCommand) -> None:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(**settings.kafka_client_kwargs(), acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(settings.topic_breaker, cmd.model_dump_json().encode(), key=cmd.kafka_key())
    finally:
        await producer.stop()
