"""Property tests: ingest.decode never raises, always explains itself, never leaks content."""

from __future__ import annotations

import base64
import io

import orjson
from hypothesis import HealthCheck, event, given, settings
from hypothesis.control import currently_in_test_context
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue, KeyValueList
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1 import trace_pb2

from streams.ingest import FORMATS, Decoded, Limits, decode, iter_documents
from streams.semconv import SENSITIVE_KEYS, SENSITIVE_PREFIXES, is_sensitive

FUZZ = settings(max_examples=200, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SMALL = Limits(max_message_bytes=4096, max_spans_per_message=8, max_attributes=6, max_depth=3,
               max_string_bytes=12)
LIMITS = st.sampled_from([None, SMALL])
TID, SID = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
KINDS = {"INTERNAL", "SERVER", "CLIENT", "PRODUCER", "CONSUMER", "UNSPECIFIED"}


def check(d: Decoded) -> None:
    assert isinstance(d, Decoded) and d.format in FORMATS
    assert d.spans or d.rejections or d.format == "empty"
    for s in d.spans:
        assert len(s.trace_id) == 32 and int(s.trace_id, 16) and s.trace_id == s.trace_id.lower()
        assert len(s.span_id) == 16 and int(s.span_id, 16)
        assert s.parent_span_id is None or len(s.parent_span_id) == 16
        assert 0 <= s.start_ns <= s.end_ns and s.status in ("OK", "ERROR", "UNSET") and s.kind in KINDS
        assert isinstance(s.name, str) and isinstance(s.status_message, str)
        for attrs in (s.attributes, s.resource, *(e.attributes for e in s.events)):
            assert all(isinstance(k, str) and not is_sensitive(k) for k in attrs)
        orjson.dumps(s.to_wire())
    for r in d.rejections:
        assert r.reason and r.detail and isinstance(r.detail, str)
        assert r.index is None or r.index >= 0


def run(payload: bytes, limits: Limits | None) -> Decoded:
    d = decode(payload, limits=limits) if limits else decode(payload)
    check(d)
    if currently_in_test_context():  # visible with --hypothesis-show-statistics
        event(f"format={d.format}")
        event("spans" if d.spans else "no spans")
        for r in d.rejections[:1]:
            event(f"first rejection={r.reason}")
    return d


# --------------------------------------------------------------------------------- strategies

json_scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20))
json_values = st.recursive(json_scalars, lambda c: st.lists(c, max_size=4)
                           | st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=20)

hex_id = lambda n: st.one_of(  # noqa: E731
    st.just(TID[:n] if n == 32 else SID), st.binary(min_size=n // 2, max_size=n // 2).map(bytes.hex),
    st.text("0123456789abcdefABCDEFx", min_size=n - 2, max_size=n + 2), json_values)
timestamps = st.one_of(st.integers(-5, 2**64 - 1), st.integers(0, 2**40).map(str), json_values,
                       st.just("2024-01-01T00:00:00.123456Z"))
attr_keys = st.one_of(st.text(max_size=10), st.sampled_from(sorted(SENSITIVE_KEYS)),
                      st.sampled_from(SENSITIVE_PREFIXES).map(lambda p: p + "0.content"),
                      st.sampled_from(["gen_ai.tool.name", "tool.payload_hash", "a.b", "plan.steps"]))
attrs = st.dictionaries(attr_keys, json_values, max_size=8)


def optional(d: dict) -> st.SearchStrategy[dict]:
    return st.fixed_dictionaries({}, optional=d)


def near_valid(base: dict, fields: dict) -> st.SearchStrategy[dict]:
    """``base`` with a few fields replaced by fuzz and a few removed (deep paths get exercised)."""
    return st.builds(lambda over, drop: {k: v for k, v in {**base, **over}.items() if k not in drop},
                     optional(fields), st.sets(st.sampled_from(sorted(fields)), max_size=2))


FLAT_FIELDS = {
    "trace_id": hex_id(32), "span_id": hex_id(16), "parent_span_id": st.none() | hex_id(16),
    "name": st.text(max_size=10) | json_values, "kind": json_values | st.sampled_from(["CLIENT", 3]),
    "start_time_unix_nano": timestamps, "end_time_unix_nano": timestamps,
    "status": json_values | st.sampled_from([{"code": "ERROR"}, "OK"]),
    "attributes": attrs | json_values, "resource": attrs | json_values,
    "events": st.lists(optional({"name": json_values, "time_unix_nano": timestamps,
                                 "attributes": attrs | json_values}), max_size=2) | json_values,
    "context": optional({"trace_id": hex_id(32), "span_id": hex_id(16)}),
}
FLAT_BASE = {"trace_id": TID, "span_id": SID, "name": "n", "start_time_unix_nano": 1,
             "end_time_unix_nano": 2, "attributes": {"gen_ai.tool.name": "t"}}
flat_spans = near_valid(FLAT_BASE, FLAT_FIELDS) | optional(FLAT_FIELDS)

any_values = st.recursive(
    st.one_of(st.builds(lambda v: {"stringValue": v}, st.text(max_size=10) | json_values),
              st.builds(lambda v: {"intValue": v}, st.integers(-(2**70), 2**70).map(str) | json_values),
              st.builds(lambda v: {"doubleValue": v}, st.floats() | st.sampled_from(["NaN", "-Infinity"])),
              st.builds(lambda v: {"boolValue": v}, json_values),
              st.builds(lambda v: {"bytesValue": v}, st.binary(max_size=6).map(lambda b: base64.b64encode(b).decode())),
              json_values),
    lambda c: st.builds(lambda v: {"arrayValue": {"values": v}}, st.lists(c, max_size=3))
    | st.builds(lambda v: {"kvlistValue": {"values": v}},
                st.lists(st.fixed_dictionaries({"key": attr_keys, "value": c}), max_size=3)),
    max_leaves=10,
)
kv_lists = st.lists(st.fixed_dictionaries({"key": attr_keys | json_values, "value": any_values}), max_size=6)
OTLP_FIELDS = {
    "traceId": hex_id(32), "spanId": hex_id(16), "parentSpanId": hex_id(16), "name": json_values,
    "kind": json_values, "startTimeUnixNano": timestamps, "endTimeUnixNano": timestamps,
    "status": json_values | optional({"code": json_values, "message": json_values}),
    "attributes": kv_lists | json_values,
    "events": st.lists(optional({"timeUnixNano": timestamps, "attributes": kv_lists}), max_size=2),
}
OTLP_BASE = {"traceId": TID, "spanId": SID, "startTimeUnixNano": "1", "endTimeUnixNano": "2",
             "attributes": [{"key": "k", "value": {"stringValue": "v"}}]}
otlp_spans = near_valid(OTLP_BASE, OTLP_FIELDS) | optional(OTLP_FIELDS)
otlp_requests = st.builds(
    lambda rs: {"resourceSpans": rs},
    st.lists(optional({"resource": optional({"attributes": kv_lists | json_values}),
                       "scopeSpans": st.lists(optional({"spans": st.lists(otlp_spans, max_size=3)}), max_size=2)
                       | json_values}), max_size=2) | json_values,
)


def encode(doc: object, how: str) -> bytes:
    if how == "lines" and isinstance(doc, list):
        return b"\n".join(orjson.dumps(x) for x in doc)
    return orjson.dumps(doc)


# ------------------------------------------------------------------------------- properties


@FUZZ
@given(st.binary(max_size=600), st.sampled_from([b"", b"{", b"[", b"\n", b" \n{", b"\xef\xbb\xbf"]), LIMITS)
def test_arbitrary_bytes_never_raise(data: bytes, prefix: bytes, limits: Limits | None) -> None:
    run(prefix + data, limits)


@settings(FUZZ, max_examples=150)
@given(json_values, st.sampled_from(["one", "lines"]), LIMITS)
def test_arbitrary_json_never_raises(doc: object, how: str, limits: Limits | None) -> None:
    run(encode(doc, how), limits)


@FUZZ
@given(st.lists(flat_spans | otlp_requests, min_size=1, max_size=4), st.sampled_from(["one", "lines"]), LIMITS)
def test_span_shaped_json_never_raises(docs: list, how: str, limits: Limits | None) -> None:
    d = run(encode(docs if len(docs) > 1 or how == "lines" else docs[0], how), limits)
    assert all(r.index is None or r.index < 10_000 for r in d.rejections)


def valid_payloads() -> list[bytes]:
    span = {"trace_id": TID, "span_id": SID, "name": "n", "start_time_unix_nano": 1, "end_time_unix_nano": 2,
            "status": {"code": "ERROR"}, "attributes": {"gen_ai.tool.name": "t", "a": {"b": [1, 2]}},
            "resource": {"service.name": "s"},
            "events": [{"name": "e", "time_unix_nano": 1, "attributes": {"k": "v"}}]}
    kv = lambda k, v: KeyValue(key=k, value=v)  # noqa: E731
    pb = ExportTraceServiceRequest(resource_spans=[trace_pb2.ResourceSpans(
        resource=Resource(attributes=[kv("service.name", AnyValue(string_value="s"))]),
        scope_spans=[trace_pb2.ScopeSpans(spans=[trace_pb2.Span(
            trace_id=bytes.fromhex(TID), span_id=bytes.fromhex(SID), name="n", kind=2,
            start_time_unix_nano=1, end_time_unix_nano=2, status=trace_pb2.Status(code=2),
            attributes=[kv("a", AnyValue(kvlist_value=KeyValueList(values=[
                kv("b", AnyValue(array_value=ArrayValue(values=[AnyValue(int_value=1)])))]))),
                kv("gen_ai.prompt", AnyValue(string_value="p"))],
            events=[trace_pb2.Span.Event(name="e", time_unix_nano=1)])] * 2)])])
    otlp_json = {"resourceSpans": [{"resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "s"}}]},
                                    "scopeSpans": [{"spans": [{"traceId": TID, "spanId": SID, "startTimeUnixNano": "1",
                                                               "endTimeUnixNano": "2", "attributes": [
                                                                   {"key": "a", "value": {"intValue": "3"}}]}]}]}]}
    return [orjson.dumps(span), orjson.dumps([span, span]), orjson.dumps(span) + b"\n" + orjson.dumps(span),
            pb.SerializeToString(), orjson.dumps(otlp_json)]


VALID = valid_payloads()
mutation = st.tuples(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "dup"]),
                     st.integers(0, 10_000), st.integers(0, 255), st.integers(1, 40))


def mutate(data: bytes, ops: list[tuple[str, int, int, int]]) -> bytes:
    b = bytearray(data)
    for op, pos, byte, n in ops:
        if not b:
            break
        i = pos % len(b)
        if op == "flip":
            b[i] ^= 1 << (byte % 8)
        elif op == "set":
            b[i] = byte
        elif op == "insert":
            b[i:i] = bytes([byte]) * (n % 4 + 1)
        elif op == "delete":
            del b[i:i + n]
        elif op == "truncate":
            del b[i:]
        else:
            b[i:i] = b[i:i + n]
    return bytes(b)


@settings(FUZZ, max_examples=500)
@given(st.sampled_from(range(len(VALID))), st.lists(mutation, min_size=1, max_size=4), LIMITS)
def test_mutated_valid_payloads_never_raise(which: int, ops: list, limits: Limits | None) -> None:
    run(mutate(VALID[which], ops), limits)


def test_unmutated_valid_payloads_decode_cleanly() -> None:
    for p in VALID:
        d = run(p, None)
        assert d.spans and not d.rejections, p[:40]


sensitive_keys = st.sampled_from(sorted(SENSITIVE_KEYS)) | st.builds(
    lambda p, s: p + s, st.sampled_from(SENSITIVE_PREFIXES), st.text(max_size=6))
SECRET = st.text("QWRTYUPSZXVNM", min_size=12, max_size=20).map(lambda s: "SeCrEt" + s)  # never hex


@FUZZ
@given(SECRET, st.lists(sensitive_keys, min_size=1, max_size=3, unique=True),
       st.sampled_from(["flat", "flat_nested", "otlp_json", "proto", "event", "resource"]), LIMITS)
def test_sensitive_values_never_survive(secret: str, keys: list[str], where: str, limits: Limits | None) -> None:
    base = {"trace_id": TID, "span_id": SID, "name": "n", "start_time_unix_nano": 1, "end_time_unix_nano": 2}
    a = {k: secret for k in keys}
    if where == "flat":
        payload = orjson.dumps({**base, "attributes": a})
    elif where == "flat_nested":
        payload = orjson.dumps({**base, "attributes": {k: {"x": [secret, {"y": secret}]} for k in keys}})
    elif where == "event":
        payload = orjson.dumps({**base, "events": [{"name": "e", "time_unix_nano": 1, "attributes": a}]})
    elif where == "resource":
        payload = orjson.dumps({**base, "resource": a})
    elif where == "otlp_json":
        payload = orjson.dumps({"resourceSpans": [{"resource": {"attributes": [
            {"key": k, "value": {"stringValue": secret}} for k in keys]}, "scopeSpans": [{"spans": [{
                "traceId": TID, "spanId": SID, "startTimeUnixNano": "1", "endTimeUnixNano": "2",
                "attributes": [{"key": k, "value": {"kvlistValue": {"values": [
                    {"key": "c", "value": {"stringValue": secret}}]}}} for k in keys]}]}]}]})
    else:
        payload = ExportTraceServiceRequest(resource_spans=[trace_pb2.ResourceSpans(scope_spans=[
            trace_pb2.ScopeSpans(spans=[trace_pb2.Span(
                trace_id=bytes.fromhex(TID), span_id=bytes.fromhex(SID), start_time_unix_nano=1,
                end_time_unix_nano=2, attributes=[KeyValue(key=k, value=AnyValue(array_value=ArrayValue(
                    values=[AnyValue(string_value=secret)]))) for k in keys])])])]).SerializeToString()
    d = run(payload, limits)
    assert secret not in repr(d)
    if not d.rejections:
        assert len(d.spans) == 1


@settings(FUZZ, max_examples=100)
@given(st.lists(st.binary(max_size=40) | flat_spans.map(orjson.dumps), max_size=6),
       st.sampled_from([b"\n", b"\r\n", b"\n\n"]))
def test_iter_documents_never_raises(lines: list[bytes], sep: bytes) -> None:
    for doc in iter_documents(io.BytesIO(sep.join(lines))):
        assert doc and doc == doc.strip()
        run(doc, None)
