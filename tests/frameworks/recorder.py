"""Record the spans a real agent framework's own OpenTelemetry instrumentation emits.

Used by the ``record_*.py`` scripts beside it (each runs one framework offline, with a scripted
model) and by nothing at test time: tests read the committed fixtures under
``tests/fixtures/frameworks/<framework>/``.

A fixture directory holds, per scenario, ``<scenario>.flat.jsonl`` (one flat span JSON object per
line, OTel's own field names) and ``<scenario>.otlp.json`` (one OTLP/JSON
``ExportTraceServiceRequest`` per line: camelCase, hex ids, ``AnyValue`` wrappers, int64 as
strings), and ``manifest.json``: the framework and instrumentation versions, and per scenario the
detectors a correct reading must report (an empty list: nothing).

Needs ``opentelemetry-sdk`` and ``opentelemetry-exporter-otlp-proto-common`` (and protobuf).
"""

from __future__ import annotations

import base64
import importlib.metadata
import json
from pathlib import Path
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "frameworks"
SCENARIOS = ("loop", "paging", "silent", "cost", "retry")


class Recorder:
    """One TracerProvider with an in-memory exporter; ``take()`` returns and clears finished spans.

    Install ``rec.provider`` as the global tracer provider (or pass it to the framework's
    instrumentor) before instrumenting.
    """

    def __init__(self, service: str, **resource: Any) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider(resource=Resource.create({"service.name": service, **resource}))
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))

    def take(self) -> list[ReadableSpan]:
        self.provider.force_flush()
        spans = list(self.exporter.get_finished_spans())
        self.exporter.clear()
        return spans


def _plain(v: Any) -> Any:
    if isinstance(v, tuple | list):
        return [_plain(x) for x in v]
    return v


def to_flat(span: ReadableSpan) -> dict[str, Any]:
    """A ReadableSpan in flat JSON (OTel's own field names, flat dotted attributes)."""
    ctx = span.get_span_context()
    out: dict[str, Any] = {
        "trace_id": f"{ctx.trace_id:032x}",
        "span_id": f"{ctx.span_id:016x}",
        "parent_span_id": f"{span.parent.span_id:016x}" if span.parent else None,
        "name": span.name,
        "kind": span.kind.name,
        "start_time_unix_nano": span.start_time,
        "end_time_unix_nano": span.end_time,
        "status": {"code": span.status.status_code.name, "message": span.status.description or ""},
        "attributes": {k: _plain(v) for k, v in (span.attributes or {}).items()},
        "resource": {k: _plain(v) for k, v in span.resource.attributes.items()},
    }
    if span.events:
        out["events"] = [
            {"name": e.name, "time_unix_nano": e.timestamp,
             "attributes": {k: _plain(v) for k, v in (e.attributes or {}).items()}}
            for e in span.events
        ]
    return out


def _hex_ids(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: (base64.b64decode(v).hex() if k in ("traceId", "spanId", "parentSpanId") and isinstance(v, str)
                    else _hex_ids(v)) for k, v in x.items()}
    if isinstance(x, list):
        return [_hex_ids(v) for v in x]
    return x


def to_otlp_json(spans: list[ReadableSpan]) -> dict[str, Any]:
    """An OTLP/JSON ExportTraceServiceRequest (hex ids, integer enums, int64 as strings)."""
    from google.protobuf.json_format import MessageToDict
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    d = MessageToDict(encode_spans(spans), use_integers_for_enums=True)
    return _hex_ids(d)


def versions(*dists: str) -> dict[str, str]:
    out = {}
    for d in dists:
        try:
            out[d] = importlib.metadata.version(d)
        except importlib.metadata.PackageNotFoundError:
            out[d] = "not installed"
    return out


def write_scenario(framework: str, scenario: str, spans: list[ReadableSpan]) -> Path:
    """Write ``<scenario>.flat.jsonl`` and ``<scenario>.otlp.json`` (spans in end-time order)."""
    d = FIXTURES / framework
    d.mkdir(parents=True, exist_ok=True)
    spans = sorted(spans, key=lambda s: (s.end_time, s.start_time))
    with open(d / f"{scenario}.flat.jsonl", "w") as f:
        for s in spans:
            f.write(json.dumps(to_flat(s), sort_keys=True) + "\n")
    with open(d / f"{scenario}.otlp.json", "w") as f:
        f.write(json.dumps(to_otlp_json(spans), sort_keys=True) + "\n")
    return d


def write_manifest(framework: str, dists: list[str], expect: dict[str, list[str]], notes: str = "") -> None:
    """``expect``: scenario → detectors that must report (``[]``: none may)."""
    d = FIXTURES / framework
    d.mkdir(parents=True, exist_ok=True)
    doc = {"framework": framework, "versions": versions(*dists), "expect": expect, "notes": notes}
    (d / "manifest.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
