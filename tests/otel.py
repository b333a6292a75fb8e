"""Spans made with the real OpenTelemetry SDK, encoded as producers send them."""

from __future__ import annotations

import orjson
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Status, StatusCode


def agent_spans(session: str, calls: list[tuple[str, str]], *, tenant: str = "acme", fail: bool = False):
    """A root invoke_agent span with one execute_tool child per (tool, arguments JSON)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "test-agent", "tenant.id": tenant}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("breakwater-tests")
    with tracer.start_as_current_span("invoke_agent", attributes={
        "gen_ai.operation.name": "invoke_agent", "gen_ai.conversation.id": session,
    }):
        for tool, args in calls:
            with tracer.start_as_current_span(f"execute_tool {tool}", attributes={
                "gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": tool,
                "gen_ai.tool.call.arguments": args, "gen_ai.conversation.id": session,
            }) as sp:
                if fail:
                    sp.set_status(Status(StatusCode.ERROR, "boom"))
    provider.shutdown()
    return list(exporter.get_finished_spans())


def to_flat(span) -> dict:
    """A ReadableSpan in Breakwater's flat JSON (README "What producers send": OTel's own names)."""
    ctx = span.get_span_context()
    return {
        "trace_id": f"{ctx.trace_id:032x}",
        "span_id": f"{ctx.span_id:016x}",
        "parent_span_id": f"{span.parent.span_id:016x}" if span.parent else None,
        "name": span.name,
        "kind": span.kind.name,
        "start_time_unix_nano": span.start_time,
        "end_time_unix_nano": span.end_time,
        "status": {"code": span.status.status_code.name, "message": span.status.description},
        "attributes": dict(span.attributes or {}),
        "resource": dict(span.resource.attributes),
    }


def flat_json(spans) -> bytes:
    return orjson.dumps([to_flat(s) for s in spans])


def otlp_proto(spans) -> bytes:
    return encode_spans(spans).SerializeToString()


def traced(session: str, children: list[tuple[str, dict, bool]], *, root_attrs: dict | None = None,
           tenant: str = "acme"):
    """A root invoke_agent span with children given as (name, attributes, failed)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "test-agent", "tenant.id": tenant}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("breakwater-tests")
    with tracer.start_as_current_span("invoke_agent", attributes={
        "gen_ai.operation.name": "invoke_agent", "gen_ai.conversation.id": session, **(root_attrs or {}),
    }):
        for name, attrs, failed in children:
            with tracer.start_as_current_span(name, attributes={"gen_ai.conversation.id": session, **attrs}) as sp:
                if failed:
                    sp.set_status(Status(StatusCode.ERROR, "failed"))
    provider.shutdown()
    return list(exporter.get_finished_spans())
