"""Ingest decoding (streams.ingest): every encoding, every rejection reason, privacy, limits."""

from __future__ import annotations

import base64
import io
import json

import orjson
import pytest
from google.protobuf import json_format
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue, KeyValueList
from opentelemetry.proto.resource.v1.resource_pb2 import Resource as PbResource
from opentelemetry.proto.trace.v1 import trace_pb2
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, Status, StatusCode

from streams.ingest import DEFAULT_LIMITS, FORMATS, Decoded, Limits, decode, iter_documents
from streams.models import Span
from streams.semconv import canonical_hash, is_sensitive

TID = "0af7651916cd43dd8448eb211c80319c"
SID = "b7ad6b7169203331"
PID = "00f067aa0ba902b7"
T0 = 1_700_000_000_000_000_000
SECRET = "S3CR3T-do-not-leak"  # never hex, so a hash can never contain it
ARGS = '{"city": "Paris", "units": "metric"}'


# ----------------------------------------------------------------------------------- builders


def flat(**over: object) -> dict:
    d: dict = {
        "trace_id": TID, "span_id": SID, "parent_span_id": PID, "name": "execute_tool weather",
        "kind": "SPAN_KIND_CLIENT", "start_time_unix_nano": T0, "end_time_unix_nano": T0 + 500,
        "status": {"code": "ERROR", "message": "timeout"},
        "attributes": {"gen_ai.tool.name": "weather", "gen_ai.usage.input_tokens": 12,
                       "gen_ai.usage.cost": 0.5, "retry.attempt": 1, "ok": True},
        "resource": {"service.name": "agent", "tenant.id": "acme"},
        "events": [{"name": "plan.step", "time_unix_nano": T0 + 1,
                    "attributes": {"plan.step.id": "a", "plan.step.depends_on": ["b", "c"]}}],
    }
    for k, v in over.items():
        if v is ...:
            d.pop(k, None)
        else:
            d[k] = v
    return d


def av(v: object) -> dict:
    """Python value to an OTLP JSON AnyValue."""
    if isinstance(v, bool):
        return {"boolValue": v}
    if isinstance(v, int):
        return {"intValue": str(v)}
    if isinstance(v, float):
        return {"doubleValue": v}
    if isinstance(v, list):
        return {"arrayValue": {"values": [av(x) for x in v]}}
    if isinstance(v, dict):
        return {"kvlistValue": {"values": kvs(v)}}
    return {"stringValue": v}


def kvs(d: dict) -> list[dict]:
    return [{"key": k, "value": av(v)} for k, v in d.items()]


def ospan(**over: object) -> dict:
    d: dict = {
        "traceId": TID, "spanId": SID, "parentSpanId": PID, "name": "execute_tool weather",
        "kind": 3, "startTimeUnixNano": str(T0), "endTimeUnixNano": str(T0 + 500),
        "status": {"code": 2, "message": "timeout"},
        "attributes": kvs({"gen_ai.tool.name": "weather", "gen_ai.usage.input_tokens": 12,
                           "gen_ai.usage.cost": 0.5, "retry.attempt": 1, "ok": True}),
        "events": [{"name": "plan.step", "timeUnixNano": str(T0 + 1),
                    "attributes": kvs({"plan.step.id": "a", "plan.step.depends_on": ["b", "c"]})}],
    }
    for k, v in over.items():
        if v is ...:
            d.pop(k, None)
        else:
            d[k] = v
    return d


def oreq(*spans: dict, resource: dict | None = None) -> dict:
    res = {"service.name": "agent", "tenant.id": "acme"} if resource is None else resource
    return {"resourceSpans": [{"resource": {"attributes": kvs(res)},
                               "scopeSpans": [{"scope": {"name": "t"}, "spans": list(spans)}]}]}


def pbv(v: object) -> AnyValue:
    if isinstance(v, bool):
        return AnyValue(bool_value=v)
    if isinstance(v, int):
        return AnyValue(int_value=v)
    if isinstance(v, float):
        return AnyValue(double_value=v)
    if isinstance(v, bytes):
        return AnyValue(bytes_value=v)
    if isinstance(v, list):
        return AnyValue(array_value=ArrayValue(values=[pbv(x) for x in v]))
    if isinstance(v, dict):
        return AnyValue(kvlist_value=KeyValueList(values=pbkvs(v)))
    return AnyValue(string_value=v)


def pbkvs(d: dict) -> list[KeyValue]:
    return [KeyValue(key=k, value=pbv(v)) for k, v in d.items()]


def pspan(**over: object) -> trace_pb2.Span:
    kw: dict = {
        "trace_id": bytes.fromhex(TID), "span_id": bytes.fromhex(SID),
        "parent_span_id": bytes.fromhex(PID), "name": "execute_tool weather", "kind": 3,
        "start_time_unix_nano": T0, "end_time_unix_nano": T0 + 500,
        "status": trace_pb2.Status(code=2, message="timeout"),
        "attributes": pbkvs({"gen_ai.tool.name": "weather", "gen_ai.usage.input_tokens": 12,
                             "gen_ai.usage.cost": 0.5, "retry.attempt": 1, "ok": True}),
        "events": [trace_pb2.Span.Event(name="plan.step", time_unix_nano=T0 + 1, attributes=pbkvs(
            {"plan.step.id": "a", "plan.step.depends_on": ["b", "c"]}))],
    }
    for k, v in over.items():
        if v is ...:
            kw.pop(k, None)
        else:
            kw[k] = v
    return trace_pb2.Span(**kw)


def preq(*spans: trace_pb2.Span, resource: dict | None = None) -> bytes:
    res = {"service.name": "agent", "tenant.id": "acme"} if resource is None else resource
    return ExportTraceServiceRequest(resource_spans=[trace_pb2.ResourceSpans(
        resource=PbResource(attributes=pbkvs(res)),
        scope_spans=[trace_pb2.ScopeSpans(spans=list(spans))],
    )]).SerializeToString()


def dumps(x: object) -> bytes:
    return orjson.dumps(x)


EXPECTED = Span(
    TID, SID, PID, "execute_tool weather", "CLIENT", T0, T0 + 500, "ERROR", "",  # the status message never passes ingest
    {"gen_ai.tool.name": "weather", "gen_ai.usage.input_tokens": 12, "gen_ai.usage.cost": 0.5,
     "retry.attempt": 1, "ok": True},
    {"service.name": "agent", "tenant.id": "acme"},
)


def expected() -> Span:
    from streams.models import SpanEvent

    s = Span.from_wire(EXPECTED.to_wire())
    s.events = [SpanEvent("plan.step", T0 + 1, {"plan.step.id": "a", "plan.step.depends_on": ["b", "c"]})]
    return s


def reasons(d: Decoded) -> list[str]:
    return [r.reason for r in d.rejections]


def check_invariants(d: Decoded) -> None:
    """What every decode result must satisfy."""
    assert isinstance(d, Decoded)
    assert d.format in FORMATS
    assert d.spans or d.rejections or d.format == "empty"
    for s in d.spans:
        assert len(s.trace_id) == 32 and s.trace_id == s.trace_id.lower() and int(s.trace_id, 16)
        assert len(s.span_id) == 16 and int(s.span_id, 16)
        assert s.parent_span_id is None or len(s.parent_span_id) == 16
        assert 0 <= s.start_ns <= s.end_ns
        assert s.status in ("OK", "ERROR", "UNSET")
        assert s.kind in ("INTERNAL", "SERVER", "CLIENT", "PRODUCER", "CONSUMER", "UNSPECIFIED")
        for attrs in (s.attributes, s.resource, *(e.attributes for e in s.events)):
            assert not any(is_sensitive(k) for k in attrs)
        orjson.dumps(s.to_wire())  # serializable for the repartition topic
    for r in d.rejections:
        assert isinstance(r.reason, str) and isinstance(r.detail, str) and r.detail


# ------------------------------------------------------------------------------ happy paths


ENCODINGS = {
    "flat_object": (lambda: dumps(flat()), "flat"),
    "flat_array": (lambda: dumps([flat()]), "flat"),
    "flat_jsonl": (lambda: dumps(flat()) + b"\n", "flat"),
    "flat_pretty": (lambda: json.dumps(flat(), indent=2).encode(), "flat"),
    "flat_leading_ws": (lambda: b"\n  \t" + dumps([flat()]), "flat"),
    "flat_bom": (lambda: b"\xef\xbb\xbf" + dumps(flat()), "flat"),
    "otlp_json": (lambda: dumps(oreq(ospan())), "otlp_json"),
    "otlp_json_in_array": (lambda: dumps([oreq(ospan())]), "otlp_json"),
    "otlp_json_snake": (lambda: dumps({"resource_spans": oreq(ospan())["resourceSpans"]}), "otlp_json"),
    "otlp_json_legacy_ils": (lambda: dumps({"resourceSpans": [{
        "resource": {"attributes": kvs({"service.name": "agent", "tenant.id": "acme"})},
        "instrumentationLibrarySpans": [{"spans": [ospan()]}]}]}), "otlp_json"),
    "otlp_json_protobuf_mapping": (lambda: json_format.MessageToJson(
        ExportTraceServiceRequest.FromString(preq(pspan()))).encode(), "otlp_json"),
    "otlp_proto": (lambda: preq(pspan()), "otlp_proto"),
}


@pytest.mark.parametrize("name", ENCODINGS)
def test_every_encoding_gives_the_same_span(name: str) -> None:
    make, fmt = ENCODINGS[name]
    d = decode(make())
    check_invariants(d)
    assert (d.format, d.rejections) == (fmt, [])
    assert d.spans == [expected()]


def test_protobuf_json_mapping_uses_base64_ids_and_enum_names() -> None:
    text = json_format.MessageToJson(ExportTraceServiceRequest.FromString(preq(pspan())))
    assert TID not in text and "SPAN_KIND_CLIENT" in text and "STATUS_CODE_ERROR" in text
    assert decode(text.encode()).spans == [expected()]


def test_empty_and_none() -> None:
    for payload in (b"", b"   \n\t ", None, b"[]", b'{"resourceSpans": []}', b"\n\n"):
        d = decode(payload)  # type: ignore[arg-type]
        assert (d.spans, d.rejections, d.format) == ([], [], "empty"), payload


def test_bytes_like_inputs() -> None:
    raw = dumps(flat())
    assert decode(bytearray(raw)).spans == decode(memoryview(raw)).spans == [expected()]


def test_protobuf_whose_length_byte_is_a_brace_is_still_protobuf() -> None:
    # b"\n" (field 1, LEN) is JSON whitespace; a ResourceSpans of 123 bytes makes byte 2 a "{".
    for want in (0x7B, 0x5B):
        for pad in range(120):
            payload = preq(pspan(attributes=[], events=[], name="x" * pad), resource={})
            if payload[1] == want:
                break
        else:
            pytest.fail("no padding gives the wanted length byte")
        d = decode(payload)
        assert d.format == "otlp_proto" and len(d.spans) == 1 and not d.rejections


def test_flat_aliases_and_normalization() -> None:
    s = decode(dumps(flat(
        trace_id="0x" + TID.upper(), span_id=SID.upper(), parent_span_id="0" * 16, kind=2,
        start_time_unix_nano=str(T0), end_time_unix_nano=float(T0 + 1024), status="STATUS_CODE_OK",
        attributes={"a": {"b": {"c": 1}, "d": None}, "plan.steps": [{"id": "a", "depends_on": []}]},
        resource={"attributes": {"service.name": "svc"}, "schema_url": ""},
    ))).spans[0]
    assert (s.trace_id, s.span_id, s.parent_span_id, s.kind) == (TID, SID.lower(), None, "SERVER")
    assert (s.start_ns, s.end_ns, s.status, s.status_message) == (T0, T0 + 1024, "OK", "")
    assert s.attributes == {"a.b.c": 1, "plan.steps": '[{"id":"a","depends_on":[]}]'}
    assert s.resource == {"service.name": "svc"}


def test_flat_span_with_otlp_style_fields() -> None:
    """A bare OTLP-JSON span object (camelCase, key/value lists) on agent.spans also decodes."""
    for _ in range(2):  # the second pass goes through the resource cache
        d = decode(dumps([flat(attributes=kvs({"a": {"b": 1}}), resource={"attributes": kvs({"r": "x"})}),
                          {**ospan(), "resource": kvs({"service.name": "agent", "tenant.id": "acme"})}]))
        assert not d.rejections
        assert (d.spans[0].attributes, d.spans[0].resource) == ({"a.b": 1}, {"r": "x"})
        assert d.spans[1] == expected()


def test_flat_resource_cache_is_exact() -> None:
    d = decode(dumps([flat(resource={"n": 1}), flat(resource={"n": True}), flat(resource={"n": 1.0}),
                      flat(resource={"s": "a", "gen_ai.prompt": SECRET}), flat(resource={"s": "a"}),
                      flat(resource={"s": "a", "gen_ai.prompt": SECRET})]))
    assert [s.resource for s in d.spans] == [{"n": 1}, {"n": True}, {"n": 1.0}] + [{"s": "a"}] * 3
    assert [type(s.resource["n"]) for s in d.spans[:3]] == [int, bool, float]


@pytest.mark.parametrize(("kind", "want"), [
    ("SPAN_KIND_SERVER", "SERVER"), ("CLIENT", "CLIENT"), ("producer", "PRODUCER"),
    ("SpanKind.CONSUMER", "CONSUMER"), (1, "INTERNAL"), (0, "UNSPECIFIED"), (None, "UNSPECIFIED"),
    ("weird", "UNSPECIFIED"), (99, "UNSPECIFIED"),
])
def test_kinds(kind: object, want: str) -> None:
    assert decode(dumps(flat(kind=kind))).spans[0].kind == want
    assert decode(dumps(oreq(ospan(kind=kind)))).spans[0].kind == want


@pytest.mark.parametrize(("status", "want"), [
    # the message is parsed but never leaves ingest (it carries prompts, keys and stack traces)
    ({"code": "OK"}, ("OK", "")), ({"code": "STATUS_CODE_ERROR", "message": "m"}, ("ERROR", "")),
    ({"code": 2}, ("ERROR", "")), ({"code": 1}, ("OK", "")), ({}, ("UNSET", "")),
    ("ERROR", ("ERROR", "")), ("error", ("ERROR", "")), (None, ("UNSET", "")),
    ({"status_code": "ERROR", "description": "boom"}, ("ERROR", "")), ({"code": "??"}, ("UNSET", "")),
])
def test_status(status: object, want: tuple[str, str]) -> None:
    s = decode(dumps(flat(status=status))).spans[0]
    assert (s.status, s.status_message) == want


@pytest.mark.parametrize(("code", "want"), [
    (0, "UNSET"), (1, "OK"), (2, "ERROR"), (7, "UNSET"), ("STATUS_CODE_OK", "OK"),
    ("STATUS_CODE_ERROR", "ERROR"), ("STATUS_CODE_UNSET", "UNSET"), (None, "UNSET"),
])
def test_otlp_json_status(code: object, want: str) -> None:
    assert decode(dumps(oreq(ospan(status={"code": code})))).spans[0].status == want
    if isinstance(code, int):
        assert decode(preq(pspan(status=trace_pb2.Status(code=code)))).spans[0].status == want


def test_otlp_anyvalue_shapes() -> None:
    attrs = [
        {"key": "s", "value": {"stringValue": "x"}}, {"key": "i", "value": {"intValue": "-5"}},
        {"key": "j", "value": {"intValue": 7}}, {"key": "d", "value": {"doubleValue": "NaN"}},
        {"key": "e", "value": {"doubleValue": 2}}, {"key": "b", "value": {"boolValue": False}},
        {"key": "by", "value": {"bytesValue": "AAE="}}, {"key": "empty", "value": {}},
        {"key": "novalue"},
        {"key": "arr", "value": {"arrayValue": {"values": [{"stringValue": "a"}, {"intValue": "1"}]}}},
        {"key": "kv", "value": {"kvlistValue": {"values": [
            {"key": "x", "value": {"kvlistValue": {"values": [{"key": "y", "value": {"boolValue": True}}]}}},
        ]}}},
        {"key": "mixed", "value": {"arrayValue": {"values": [
            {"kvlistValue": {"values": [{"key": "id", "value": {"stringValue": "a"}}]}}]}}},
    ]
    a = decode(dumps(oreq(ospan(attributes=attrs)))).spans[0].attributes
    nan = a.pop("d")
    assert nan != nan
    assert a == {"s": "x", "i": -5, "j": 7, "e": 2.0, "b": False, "by": "AAE=", "arr": ["a", 1],
                 "kv.x.y": True, "mixed": '[{"id":"a"}]'}


def test_proto_anyvalue_shapes() -> None:
    attrs = pbkvs({"s": "x", "i": -5, "b": False, "by": b"\x00\x01", "arr": ["a", 1],
                   "kv": {"x": {"y": True}}, "mixed": [{"id": "a"}]})
    attrs.append(KeyValue(key="empty", value=AnyValue()))
    s = decode(preq(pspan(attributes=attrs))).spans[0]
    assert s.attributes == {"s": "x", "i": -5, "b": False, "by": "AAE=", "arr": ["a", 1],
                            "kv.x.y": True, "mixed": '[{"id":"a"}]'}


def test_otlp_json_accepts_base64_ids_and_zero_parent() -> None:
    b64 = base64.b64encode
    s = decode(dumps(oreq(ospan(traceId=b64(bytes.fromhex(TID)).decode(),
                                spanId=b64(bytes.fromhex(SID)).decode().rstrip("="),
                                parentSpanId="")))).spans[0]
    assert (s.trace_id, s.span_id, s.parent_span_id) == (TID, SID, None)
    s = decode(preq(pspan(parent_span_id=b"\x00" * 8))).spans[0]
    assert s.parent_span_id is None


def test_resource_attributes_shared_and_span_wins() -> None:
    d = decode(dumps(oreq(ospan(attributes=kvs({"service.name": "span-level"})),
                          ospan(spanId="1" * 16))))
    a, b = d.spans
    assert a.attr("service.name") == "span-level" and b.attr("service.name") == "agent"
    assert a.resource is b.resource


# ------------------------------------------------------------------- real OpenTelemetry SDK


def sdk_spans() -> list:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "sdk-agent", "tenant.id": "t1"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("breakwater-tests")
    with tracer.start_as_current_span("invoke_agent", kind=SpanKind.SERVER,
                                      attributes={"gen_ai.operation.name": "invoke_agent"}):
        with tracer.start_as_current_span("execute_tool search", attributes={
            "gen_ai.tool.name": "search", "gen_ai.tool.call.arguments": ARGS,
            "gen_ai.prompt": SECRET, "tags": ["a", "b"], "n": 3,
        }) as sp:
            sp.add_event("plan.step", {"plan.step.id": "a", "gen_ai.completion": SECRET})
            sp.set_status(Status(StatusCode.ERROR, "boom"))
    provider.shutdown()
    return list(exporter.get_finished_spans())


def test_sdk_spans_in_every_encoding_agree() -> None:
    spans = sdk_spans()
    proto = encode_spans(spans).SerializeToString()
    payloads = {
        "otlp_proto": proto,
        "otlp_json": json_format.MessageToJson(ExportTraceServiceRequest.FromString(proto)).encode(),
        "flat_to_json_array": ("[" + ",".join(s.to_json() for s in spans) + "]").encode(),
        "flat_to_json_lines": "\n".join(s.to_json(indent=None) for s in spans).encode(),
    }
    results = {k: decode(v) for k, v in payloads.items()}
    for name, d in results.items():
        check_invariants(d)
        assert not d.rejections, name
        assert SECRET not in repr(d), name
    ref = sorted(results["otlp_proto"].spans, key=lambda s: s.name)
    assert [s.name for s in ref] == ["execute_tool search", "invoke_agent"]
    tool, root = ref
    assert tool.attributes["tool.payload_hash"] == canonical_hash(ARGS)
    assert tool.attributes["tags"] == ["a", "b"] and tool.parent_span_id == root.span_id
    assert (tool.status, tool.status_message, root.kind, tool.kind) == ("ERROR", "", "SERVER", "INTERNAL")
    assert tool.events[0].attributes == {"plan.step.id": "a"}
    assert root.parent_span_id is None and tool.resource["service.name"] == "sdk-agent"
    for name, d in results.items():
        got = sorted(d.spans, key=lambda s: s.name)
        for a, b in zip(got, ref, strict=True):
            if name.startswith("flat"):  # to_json() prints ISO times, microseconds via a float
                assert abs(a.start_ns - b.start_ns) < 2000 and abs(a.end_ns - b.end_ns) < 2000
                a.start_ns, a.end_ns, a.events[0:] = b.start_ns, b.end_ns, [
                    type(e)(e.name, b.events[i].time_ns, e.attributes) for i, e in enumerate(a.events)]
            assert a == b, name


def test_sdk_to_json_shape() -> None:
    tool = [s for s in sdk_spans() if s.name.startswith("execute_tool")][0]
    raw = json.loads(tool.to_json())
    assert raw["context"]["trace_id"].startswith("0x") and raw["kind"] == "SpanKind.INTERNAL"
    s = decode(tool.to_json().encode()).spans[0]
    assert s.trace_id == f"{tool.context.trace_id:032x}" and s.parent_span_id == f"{tool.parent.span_id:016x}"


# ----------------------------------------------------------------------------- rejections

M = "MARKER-XYZ"  # planted in bad values: details must never echo it


REJECTIONS = [
    # (case, payload, limits, expected reasons, expected index of first rejection)
    ("oversized", b"[" + b" " * 100 + b"]", Limits(max_message_bytes=50), ["oversized"], None),
    ("not_utf8", b'{"name": "\xff\xfe' + M.encode() + b'"}', None, ["not_utf8"], None),
    ("bad_json", b'{"trace_id": "' + M.encode() + b'", oops}', None, ["bad_json"], None),
    ("bad_json_truncated", dumps([flat()])[:-5], None, ["bad_json"], None),
    ("json_scalar_line", dumps(flat()) + b'\n"' + M.encode() + b'"\n', None, ["bad_json"], None),
    ("too_deep_parser", b"[" * 2000 + b"]" * 2000, None, ["too_deep"], None),
    ("bad_otlp_garbage", b"\x00\x01\x02" + M.encode(), None, ["bad_otlp"], None),
    ("bad_otlp_truncated", preq(pspan())[:-7], None, ["bad_otlp"], None),
    ("bad_otlp_not_array", dumps({"resourceSpans": M}), None, ["bad_otlp"], None),
    ("bad_otlp_rs_not_object", dumps({"resourceSpans": [M]}), None, ["bad_otlp"], None),
    ("bad_otlp_spans_not_array", dumps({"resourceSpans": [{"scopeSpans": [{"spans": M}]}]}), None,
     ["bad_otlp"], None),
    ("too_many_spans_flat", dumps([flat()] * 3), Limits(max_spans_per_message=2), ["too_many_spans"], None),
    ("too_many_spans_otlp_json", dumps(oreq(ospan(), ospan(), ospan())), Limits(max_spans_per_message=2),
     ["too_many_spans"], None),
    ("too_many_spans_proto", preq(pspan(), pspan(), pspan()), Limits(max_spans_per_message=2),
     ["too_many_spans"], None),
    ("too_many_spans_jsonl", b"\n".join([dumps([flat()] * 2)] * 2), Limits(max_spans_per_message=3),
     ["too_many_spans"], None),
    ("too_many_attributes_flat", dumps(flat(attributes={f"k{i}": M for i in range(5)})),
     Limits(max_attributes=4), ["too_many_attributes"], 0),
    ("too_many_attributes_after_flattening", dumps(flat(attributes={"a": {f"k{i}": M for i in range(5)}})),
     Limits(max_attributes=4), ["too_many_attributes"], 0),
    ("too_many_attributes_resource", dumps(flat(resource={f"k{i}": M for i in range(5)})),
     Limits(max_attributes=4), ["too_many_attributes"], 0),
    ("too_many_attributes_event", dumps(flat(events=[{"name": "e", "time_unix_nano": 1,
                                                       "attributes": {f"k{i}": M for i in range(5)}}])),
     Limits(max_attributes=4), ["too_many_attributes"], 0),
    ("too_many_attributes_otlp_kvlist", dumps(oreq(ospan(attributes=kvs({"a": {f"k{i}": M for i in range(5)}})))),
     Limits(max_attributes=4), ["too_many_attributes"], 0),
    ("too_many_attributes_proto", preq(pspan(attributes=pbkvs({f"k{i}": M for i in range(5)}))),
     Limits(max_attributes=4), ["too_many_attributes"], 0),
    ("too_many_attributes_proto_resource", preq(pspan(), resource={f"k{i}": M for i in range(5)}),
     Limits(max_attributes=4), ["too_many_attributes"], 0),
    ("too_deep_flat", dumps(flat(attributes={"a": {"b": {"c": {"d": M}}}})), Limits(max_depth=2), ["too_deep"], 0),
    ("too_deep_flat_list", dumps(flat(attributes={"a": [[[M]]]})), Limits(max_depth=2), ["too_deep"], 0),
    ("too_deep_otlp_json", dumps(oreq(ospan(attributes=kvs({"a": {"b": {"c": {"d": M}}}})))),
     Limits(max_depth=2), ["too_deep"], 0),
    ("too_deep_proto", preq(pspan(attributes=pbkvs({"a": [[[M]]]}))), Limits(max_depth=2), ["too_deep"], 0),
    ("too_deep_array_element", dumps([[[[[M]]]]]), Limits(max_depth=2), ["too_deep"], 0),
    ("bad_id_missing_trace", dumps(flat(trace_id=...)), None, ["bad_id"], 0),
    ("bad_id_short", dumps(flat(trace_id=M)), None, ["bad_id"], 0),
    ("bad_id_zero_trace", dumps(flat(trace_id="0" * 32)), None, ["bad_id"], 0),
    ("bad_id_non_hex", dumps(flat(span_id="g" * 16)), None, ["bad_id"], 0),
    ("bad_id_parent", dumps(flat(parent_span_id=M)), None, ["bad_id"], 0),
    ("bad_id_type", dumps(flat(span_id=[M])), None, ["bad_id"], 0),
    ("bad_id_otlp_json", dumps(oreq(ospan(traceId=M))), None, ["bad_id"], 0),
    ("bad_id_proto", preq(pspan(trace_id=b"\x01" * 15)), None, ["bad_id"], 0),
    ("bad_id_proto_zero_span", preq(pspan(span_id=b"\x00" * 8)), None, ["bad_id"], 0),
    ("bad_timestamp_missing", dumps(flat(start_time_unix_nano=...)), None, ["bad_timestamp"], 0),
    ("bad_timestamp_negative", dumps(flat(start_time_unix_nano=-1)), None, ["bad_timestamp"], 0),
    ("bad_timestamp_text", dumps(flat(end_time_unix_nano=M)), None, ["bad_timestamp"], 0),
    ("bad_timestamp_end_before_start", dumps(flat(end_time_unix_nano=T0 - 1)), None, ["bad_timestamp"], 0),
    ("bad_timestamp_event", dumps(flat(events=[{"name": "e"}])), None, ["bad_timestamp"], 0),
    ("bad_timestamp_otlp_json_zero", dumps(oreq(ospan(startTimeUnixNano="0"))), None, ["bad_timestamp"], 0),
    ("bad_timestamp_otlp_json_text", dumps(oreq(ospan(endTimeUnixNano=M))), None, ["bad_timestamp"], 0),
    ("bad_timestamp_proto_missing", preq(pspan(end_time_unix_nano=0)), None, ["bad_timestamp"], 0),
    ("bad_timestamp_proto_order", preq(pspan(end_time_unix_nano=T0 - 1)), None, ["bad_timestamp"], 0),
    ("bad_span_name", dumps(flat(name=[M])), None, ["bad_span"], 0),
    ("bad_span_attributes", dumps(flat(attributes=M)), None, ["bad_span"], 0),
    ("bad_span_events", dumps(flat(events={"x": M})), None, ["bad_span"], 0),
    ("bad_span_element", dumps([M]), None, ["bad_span"], 0),
    ("bad_span_anyvalue", dumps(oreq(ospan(attributes=[{"key": "a", "value": {"intValue": M}}]))), None,
     ["bad_span"], 0),
    ("bad_span_kv_entry", dumps(oreq(ospan(attributes=[M]))), None, ["bad_span"], 0),
    ("bad_span_otlp_not_object", dumps(oreq(M)), None, ["bad_span"], 0),
]


@pytest.mark.parametrize("case", REJECTIONS, ids=[c[0] for c in REJECTIONS])
def test_rejections(case: tuple) -> None:
    name, payload, limits, want, index = case
    d = decode(payload, limits=limits or DEFAULT_LIMITS)
    check_invariants(d)
    assert reasons(d) == want
    assert d.rejections[0].index == index
    assert M not in repr(d.rejections)
    if name == "json_scalar_line":  # the good line still counts
        assert len(d.spans) == 1 and d.rejections[0].detail.startswith("line 2: ")
    elif want[0] in ("oversized", "not_utf8", "bad_json", "too_many_spans", "bad_otlp"):
        assert not d.spans


def test_jsonl_utf8_error_is_per_line() -> None:
    d = decode(dumps(flat()) + b"\n" + b'{"name": "\xff"}\n' + dumps(flat(span_id="1" * 16)))
    assert reasons(d) == ["not_utf8"] and len(d.spans) == 2
    assert d.rejections[0].detail.startswith("line 2: ")


def test_broken_pretty_json_is_one_rejection() -> None:
    text = json.dumps([flat(), flat()], indent=2).encode()[:-10]
    d = decode(text)
    assert reasons(d) == ["bad_json"] and d.format == "unknown"


# ------------------------------------------------------------------ bad span in good batch


@pytest.mark.parametrize("encoding", ["flat_array", "jsonl", "otlp_json", "otlp_proto", "mixed_array"])
def test_bad_span_in_good_batch_rejects_only_that_span(encoding: str) -> None:
    ids = [f"{i + 1:016x}" for i in range(4)]
    if encoding == "flat_array":
        payload = dumps([flat(span_id=ids[0]), flat(span_id=ids[1], trace_id="x"),
                         flat(span_id=ids[2]), flat(span_id=ids[3], end_time_unix_nano=0)])
    elif encoding == "jsonl":
        payload = b"\n".join([dumps(flat(span_id=ids[0])), dumps(flat(span_id=ids[1], trace_id="x")),
                              b"", dumps(flat(span_id=ids[2])),
                              dumps(flat(span_id=ids[3], end_time_unix_nano=0))])
    elif encoding == "otlp_json":
        payload = dumps(oreq(ospan(spanId=ids[0]), ospan(spanId=ids[1], traceId="x"),
                             ospan(spanId=ids[2]), ospan(spanId=ids[3], endTimeUnixNano="1")))
    elif encoding == "otlp_proto":
        payload = preq(pspan(span_id=bytes.fromhex(ids[0])), pspan(span_id=bytes.fromhex(ids[1]), trace_id=b"x"),
                       pspan(span_id=bytes.fromhex(ids[2])), pspan(span_id=bytes.fromhex(ids[3]), end_time_unix_nano=1))
    else:
        payload = dumps([flat(span_id=ids[0]), oreq(ospan(spanId=ids[1], traceId="x"), ospan(spanId=ids[2])),
                         flat(span_id=ids[3], end_time_unix_nano=0)])
    d = decode(payload)
    check_invariants(d)
    assert [s.span_id for s in d.spans] == [ids[0], ids[2]]
    assert [(r.reason, r.index) for r in d.rejections] == [("bad_id", 1), ("bad_timestamp", 3)]
    if encoding == "jsonl":
        assert [r.detail[:8] for r in d.rejections] == ["line 2: ", "line 5: "]


def test_bad_resource_rejects_each_of_its_spans() -> None:
    d = decode(preq(pspan(), pspan(span_id=b"\x02" * 8), resource={f"k{i}": "v" for i in range(3)}),
               limits=Limits(max_attributes=2))
    assert [(r.reason, r.index) for r in d.rejections] == [("too_many_attributes", 0), ("too_many_attributes", 1)]


def test_jsonl_mixed_formats() -> None:
    d = decode(dumps(oreq(ospan())) + b"\n" + dumps([flat(span_id="1" * 16)]) + b"\n" + b"{bad\n")
    assert len(d.spans) == 2 and reasons(d) == ["bad_json"] and d.format == "flat"
    assert d.rejections[0].detail.startswith("line 3: ")


# --------------------------------------------------------------------------------- privacy


def secret_payloads() -> dict[str, bytes]:
    s = SECRET
    fa = {"gen_ai.tool.name": "weather", "gen_ai.tool.call.arguments": ARGS, "gen_ai.prompt": s,
          "gen_ai.completion": s, "gen_ai.input.messages": [{"role": "user", "content": s}],
          "gen_ai.prompt.0.content": s, "llm.input_messages.0.message.content": s, "input.value": s,
          "gen_ai.tool.call.result": {"out": s}, "gen_ai": {"output": {"messages": s}}}
    ev = [{"name": "gen_ai.choice", "time_unix_nano": T0, "attributes": {"gen_ai.completion": s, "ok": 1}}]
    res = {"service.name": "agent", "gen_ai.system_instructions": s}
    return {
        "flat": dumps(flat(attributes=fa, events=ev, resource=res)),
        "flat_args_object": dumps(flat(attributes={"gen_ai.tool.call.arguments": json.loads(ARGS),
                                                   "gen_ai.prompt": {"nested": [s]}})),
        "flat_args_dotted": dumps(flat(attributes={"gen_ai": {"tool": {"call": {"arguments": json.loads(ARGS)}}}})),
        "otlp_json": dumps(oreq(ospan(attributes=kvs(fa), events=[
            {"name": "e", "timeUnixNano": str(T0), "attributes": kvs(ev[0]["attributes"])}]), resource=res)),
        "otlp_json_args_kvlist": dumps(oreq(ospan(attributes=kvs({"gen_ai.tool.call.arguments": json.loads(ARGS),
                                                                   "gen_ai.prompt": s})))),
        "otlp_proto": preq(pspan(attributes=pbkvs(fa), events=[trace_pb2.Span.Event(
            name="e", time_unix_nano=T0, attributes=pbkvs(ev[0]["attributes"]))]), resource=res),
        "otlp_proto_args_kvlist": preq(pspan(attributes=pbkvs({"gen_ai.tool.call.arguments": json.loads(ARGS)}))),
    }


@pytest.mark.parametrize("name", list(secret_payloads()))
def test_privacy_secrets_never_survive(name: str) -> None:
    payload = secret_payloads()[name]
    for limits in (DEFAULT_LIMITS, Limits(max_string_bytes=16)):  # ARGS is longer: hash first
        d = decode(payload, limits=limits)
        check_invariants(d)
        assert len(d.spans) == 1 and not d.rejections
        assert SECRET not in repr(d) and "Paris" not in repr(d)
        if "args" in name or name in ("flat", "otlp_json", "otlp_proto"):
            assert d.spans[0].attributes["tool.payload_hash"] == canonical_hash(ARGS)


def test_privacy_producer_hash_wins_and_rejections_stay_clean() -> None:
    s = decode(dumps(flat(attributes={"gen_ai.tool.call.arguments": ARGS, "tool.payload_hash": "given"}))).spans[0]
    assert s.attributes == {"tool.payload_hash": "given"}
    d = decode(dumps([flat(trace_id="bad", attributes={"gen_ai.prompt": SECRET}), {"name": SECRET}]))
    assert len(d.rejections) == 2 and SECRET not in repr(d)


# ----------------------------------------------------------------------------- truncation


def test_long_strings_are_truncated_not_rejected() -> None:
    lim = Limits(max_string_bytes=10)
    long = "é" * 40  # 80 UTF-8 bytes
    for payload in (
        dumps(flat(name=long, attributes={"a": long, "l": [long, 1], "d": {"x": long}})),
        dumps(oreq(ospan(name=long, attributes=kvs({"a": long, "l": [long, 1], "d": {"x": long}})))),
        preq(pspan(name=long, attributes=pbkvs({"a": long, "l": [long, 1], "d": {"x": long}}))),
    ):
        d = decode(payload, limits=lim)
        assert not d.rejections
        s = d.spans[0]
        assert s.name == "é" * 5 and s.attributes["a"] == "é" * 5 and s.attributes["d.x"] == "é" * 5
        assert s.attributes["l"] == ["é" * 5, 1]
    s = decode(dumps(flat(attributes={"a": "x" * 11, "b": "y" * 10})), limits=lim).spans[0]
    assert s.attributes == {"a": "x" * 10, "b": "y" * 10}


def test_escaped_quotes_do_not_hide_long_strings() -> None:
    lim = Limits(max_string_bytes=16)
    s = decode(dumps(flat(attributes={"q": '"' * 100})), limits=lim).spans[0]
    assert s.attributes["q"] == '"' * 16


# ---------------------------------------------------------------------------------- limits


@pytest.mark.parametrize("field", ["max_message_bytes", "max_spans_per_message", "max_attributes",
                                   "max_depth", "max_string_bytes"])
@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "3", None])
def test_limits_validate(field: str, bad: object) -> None:
    with pytest.raises(ValueError, match=field):
        Limits(**{field: bad})


def test_limits_are_frozen_and_inclusive() -> None:
    with pytest.raises(AttributeError):
        DEFAULT_LIMITS.max_depth = 3  # type: ignore[misc]
    payload = dumps([flat(attributes={"a": {"b": 1}, "c": 2})] * 2)
    d = decode(payload, limits=Limits(max_message_bytes=len(payload), max_spans_per_message=2,
                                      max_attributes=2, max_depth=1))
    assert len(d.spans) == 2 and not d.rejections


# ------------------------------------------------------------------------------ replay files


def docs(data: bytes) -> list[bytes]:
    return list(iter_documents(io.BytesIO(data)))


def test_iter_documents_lines() -> None:
    assert docs(b"") == [] and docs(b"\n \n") == []
    assert docs(b'{"a":1}\r\n\n  [1]  \n\x00\x01\n') == [b'{"a":1}', b"[1]", b"\x00\x01"]


def test_iter_documents_pretty_printed() -> None:
    arr = json.dumps([flat(), flat(span_id="1" * 16)], indent=2).encode()
    assert docs(b"\n" + arr + b"\n") == [arr]
    obj = json.dumps(oreq(ospan()), indent=1).encode()
    assert docs(obj) == [obj]
    assert len(decode(docs(arr)[0]).spans) == 2


def test_iter_documents_broken_pretty_falls_back_to_lines() -> None:
    text = b'[\n  {"a": 1},\n  {"b": 2}\n'
    assert docs(text) == [b"[", b'{"a": 1},', b'{"b": 2}']


def test_iter_documents_broken_first_line_of_json_lines_keeps_streaming() -> None:
    good = [dumps(flat(span_id=f"{i + 1:016x}")) for i in range(3)]
    src = io.BytesIO(b'{"trace_id": "abc\n\n' + b"\n".join(good) + b"\n")
    src.read = None  # type: ignore[method-assign]  # whole-file mode would call it
    assert list(iter_documents(src)) == [b'{"trace_id": "abc', *good]


def test_iter_documents_streams_lazily() -> None:
    class Lines(io.RawIOBase):
        """A stream that counts how many lines were pulled and refuses read()."""

        def __init__(self) -> None:
            self.pulled = 0

        def readable(self) -> bool:
            return True

        def __iter__(self):  # noqa: ANN204
            return self

        def __next__(self) -> bytes:
            self.pulled += 1
            if self.pulled > 1000:
                raise StopIteration
            return dumps(flat()) + b"\n"

        def read(self, n: int = -1) -> bytes:
            raise AssertionError("JSON lines must not be read whole")

    src = Lines()
    it = iter_documents(src)  # type: ignore[arg-type]
    next(it)
    next(it)
    assert src.pulled == 2
    assert sum(1 for _ in it) == 998


def test_replay_file_end_to_end() -> None:
    lines = [dumps(flat(span_id=f"{i + 1:016x}")) for i in range(3)] + [b"{broken", dumps(oreq(ospan()))]
    got = [decode(doc) for doc in iter_documents(io.BytesIO(b"\n".join(lines) + b"\n"))]
    assert [len(d.spans) for d in got] == [1, 1, 1, 0, 1]
    assert reasons(got[3]) == ["bad_json"]
