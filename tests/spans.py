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
