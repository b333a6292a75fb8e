"""Tiny span builders for unit tests (no broker, no SDK)."""

from __future__ import annotations

from itertools import count

from streams.models import Span

S = 10**9
_ids = count(1)


def span(
    t_s: float,
    *,
    session: str = "s1",
    tool: str | None = None,
    args: str | None = "h",
    op: str | None = None,
    state: str | None = None,
    status: str = "OK",
    trace: str = "a" * 32,
    tenant: str = "acme",
    **attrs: object,
) -> Span:
    a: dict[str, object] = {"session.id": session}
    if tool is not None:
        a["gen_ai.tool.name"] = tool
        a["gen_ai.operation.name"] = "execute_tool"
        if args is not None:
            a["tool.payload_hash"] = args
    if op is not None:
        a["gen_ai.operation.name"] = op
    if state is not None:
        a["agent.state_hash"] = state
    a.update({k.replace("__", "."): v for k, v in attrs.items()})
    end = int(t_s * S)
    return Span(trace, f"{next(_ids):016x}", None, tool or op or "span", "INTERNAL", end - S // 10, end, status,
                "", a, {"service.name": "svc", "tenant.id": tenant})


MIXED_START = 1_767_225_600 * S  # 2026-01-01T00:00:00Z


def mixed_traffic(seed: int = 11, sessions: int = 160) -> list[Span]:
    """Simulated healthy sessions with every detector's pattern injected among them, decoded as
    ingest decodes them (event-time order)."""
    import orjson

    from streams.ingest import decode
    from streams.replay import REPLAY_LIMITS
    from streams.simulate import generate

    flat = list(generate(seed, sessions, MIXED_START, loops=6,
                         inject=("session_storm", "route_storm", "session_cost", "deadlock", "silent")))
    d = decode(orjson.dumps(flat), limits=REPLAY_LIMITS)
    assert not d.rejections
    return d.spans
