"""Operator actions on the bus: ``breakwater breaker release SCOPE``.

A manual release is a :class:`~streams.models.BreakerCommand` with ``action: release`` published
under the scope's key on the compacted breaker topic, so it replaces the active command there
(a gateway that starts later sees the release, not the halt). Its reason is recorded in the
command, with who/why given by the operator.

Before publishing, :func:`find_in_force` reads the breaker topic the way a gateway does
(:class:`~streams.gateway.BreakerClient`) and says what is in force under the scope's key; the CLI
publishes nothing, and says why, when nothing is (a typo in a session id must not look like a
successful release).

>>> cmd = manual_release_command("session:sess-1", reason="false positive, ticket 42", now_ns=0)
>>> cmd.action, cmd.scope.kind, cmd.scope.key, cmd.kafka_key()
('release', 'session', 'sess-1', b'session:sess-1')
>>> cmd.reason
'manual: false positive, ticket 42'
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import orjson

from streams.gateway import BreakerClient
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


@dataclass(frozen=True)
class InForce:
    """What :func:`find_in_force` found under one key of the breaker topic.

    ``command``: the command a gateway would enforce now (None when nothing is in force);
    ``last``: the newest record under the key (its JSON value, ``{}`` for a tombstone, None when
    the key never had a record); ``others``: the keys in force now (for "did you mean").
    """

    key: str
    command: BreakerCommand | None
    last: dict[str, Any] | None
    others: tuple[str, ...] = ()

    def why_not(self, now_s: float | None = None) -> str:
        """Why nothing is in force under the key, as one clause.

        >>> InForce("session:s1", None, None).why_not()
        'no command was ever published under that key'
        >>> InForce("session:s1", None, {"action": "release", "issued_at": "2026-01-01T00:00:00Z",
        ...         "reason": "expired"}).why_not()
        'its last command is a release issued 2026-01-01T00:00:00Z (expired)'
        >>> InForce("session:s1", None, {"action": "halt", "expires_at": "2026-01-01T00:15:00Z"}).why_not()
        'its last command, a halt, expired 2026-01-01T00:15:00Z'
        """
        from streams.tail import clean

        last = self.last
        if last is None:
            why = "no command was ever published under that key"
        elif not last:
            why = "its last record is a tombstone"
        elif last.get("action") == "release":
            why = (f"its last command is a release issued {clean(last.get('issued_at'), 40)} "
                   f"({clean(last.get('reason'), 120)})")
        elif last.get("expires_at"):
            why = f"its last command, a {clean(last.get('action'), 12)}, expired {clean(last.get('expires_at'), 40)}"
        else:
            why = "its last record is not a valid breaker command"
        return why


class _Probe(BreakerClient):
    """A gateway's view of the breaker topic that also remembers the newest record of one key."""

    def __init__(self, settings: Settings, key: str) -> None:
        super().__init__(settings, client_id="breakwater-admin")
        self.key = key
        self.last: dict[str, Any] | None = None

    def apply(self, key: bytes | str | None, value: bytes | None) -> str:
        result = super().apply(key, value)
        name = key.decode("utf-8", "replace") if isinstance(key, bytes | bytearray) else key
        if name == self.key:
            if value is None:
                self.last = {}
            else:
                try:
                    doc = orjson.loads(value)
                except orjson.JSONDecodeError:
                    doc = None
                self.last = doc if isinstance(doc, dict) else {"action": None}
        return result


async def find_in_force(settings: Settings, key: str, *, timeout_s: float = 20.0, quiet_s: float = 1.0) -> InForce:
    """Read the breaker topic to its end and report what is in force under ``key`` (``kind:key``).

    Waits until the client is caught up and no record arrived for ``quiet_s`` (the embedded
    broker's end offsets can trail the true end, README "The embedded broker"). Raises
    :class:`TimeoutError` naming the last client error when the topic cannot be read in ``timeout_s``.
    """
    probe = _Probe(settings, key)
    deadline = time.monotonic() + timeout_s
    try:
        ready = await probe.start(timeout_s=timeout_s)
        if not ready:
            raise TimeoutError(f"could not read {settings.topic_breaker} within {timeout_s:g} s"
                               + (f" ({probe.last_error})" if probe.last_error else ""))
        seen, quiet_since = probe.stats.records, time.monotonic()
        while time.monotonic() - quiet_since < quiet_s and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            if probe.stats.records != seen:
                seen, quiet_since = probe.stats.records, time.monotonic()
        active = probe.active()
    finally:
        await probe.stop()
    return InForce(key, active.get(key), probe.last, tuple(sorted(active)))
