"""OTLP ``ExportTraceServiceRequest`` to :class:`~streams.models.Span`, JSON and protobuf.

OTLP JSON follows the OTLP/JSON mapping (camelCase, hex ids, ``AnyValue`` wrappers, int64 as
strings); the protobuf JSON mapping's variants (snake_case field names, base64 ids, enum names
such as ``SPAN_KIND_SERVER``) and the legacy ``instrumentationLibrarySpans`` are accepted too.
``kvlistValue`` attributes are flattened to dotted keys; arrays of scalars become lists;
``bytesValue`` is kept as its base64 string.

Both walkers share :class:`Sink`: spans and rejections in message order, and ``n``, the running
position of the next span in the message (the ``index`` of its rejection).

>>> sink = Sink("")
>>> req = {"resourceSpans": [{"resource": {"attributes": [
...     {"key": "service.name", "value": {"stringValue": "svc"}}]},
...     "scopeSpans": [{"spans": [{"traceId": "ab" * 16, "spanId": "cd" * 8, "name": "x",
...         "startTimeUnixNano": "1", "endTimeUnixNano": "2", "kind": 3,
...         "attributes": [{"key": "n", "value": {"intValue": "7"}}]}, {"spanId": "zz"}]}]}]}
>>> json_request(req, Ctx(DEFAULT_LIMITS, 0), sink)
>>> [(s.kind, s.attributes, s.resource) for s in sink.spans]
[('CLIENT', {'n': 7}, {'service.name': 'svc'})]
>>> sink.rejections
[Rejection(reason='bad_id', detail='traceId is missing', index=1)]
"""

from __future__ import annotations

import base64
import re
from typing import Any

import orjson

from streams.ingest.flat import (
    HEX16,
    HEX32,
    KIND,
    STATUS,
    U64,
    Z16,
    Z32,
    _SAFE,
    Bad,
    Ctx,
    attrs_dict,
    norm_id,
    norm_kind,
    norm_parent,
    norm_status,
    norm_ts,
    scrub,
    trunc_str,
    trunc_values,
)
from streams.ingest.limits import DEFAULT_LIMITS  # noqa: F401  (doctests)
from streams.models import Rejection, Span, SpanEvent
from streams.semconv import is_sensitive

_S, _B, _I, _D, _BY, _A, _KV = range(7)
_TAG = {}
for _code, _names in enumerate(
    (("stringValue", "string_value"), ("boolValue", "bool_value"), ("intValue", "int_value"),
     ("doubleValue", "double_value"), ("bytesValue", "bytes_value"),
     ("arrayValue", "array_value"), ("kvlistValue", "kvlist_value"))
):
    for _n in _names:
        _TAG[_n] = _code
_FLOATS = {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}
_I64_MIN = -(1 << 63)
_INT = re.compile(r"-?[0-9]{1,20}").fullmatch
_SCALAR_TYPES = (str, int, float, bool)


class Sink:
    """Collects what one message yields; ``where`` prefixes details (e.g. ``"line 3: "``).

    >>> s = Sink("line 2: "); s.reject("bad_span", "name is not a string", 0); s.rejections[0]
    Rejection(reason='bad_span', detail='line 2: name is not a string', index=0)
    """

    __slots__ = ("spans", "rejections", "n", "where")

    def __init__(self, where: str = "") -> None:
        self.spans: list[Span] = []
        self.rejections: list[Rejection] = []
        self.n = 0
        self.where = where

    def reject(self, reason: str, detail: str, index: int | None = None) -> None:
        """Record a rejection (the position of a span goes into ``index``, not the detail).

        >>> s = Sink(); s.reject("bad_otlp", "resourceSpans is not an array"); s.rejections[0].index
        """
        self.rejections.append(Rejection(reason, self.where + detail, index))

    def bad_span(self, e: Exception, index: int) -> None:
        """Record the failure of the span at ``index`` (a :class:`Bad` or an unexpected error).

        >>> s = Sink(); s.bad_span(KeyError("secret"), 4); s.rejections
        [Rejection(reason='bad_span', detail='malformed span (KeyError)', index=4)]
        """
        if isinstance(e, Bad):
            self.reject(e.reason, e.detail, index)
        else:
            self.reject("bad_span", f"malformed span ({type(e).__name__})", index)


def _too_deep(what: str, ctx: Ctx) -> Bad:
    return Bad("too_deep", f"{what}: nesting deeper than max_depth {ctx.max_depth}")


def _too_many(what: str, ctx: Ctx) -> Bad:
    return Bad("too_many_attributes", f"{what}: more than max_attributes {ctx.max_attrs} attributes")


# ------------------------------------------------------------------------------ JSON AnyValue


def _json_scalar(kind: int, x: Any, ctx: Ctx, what: str) -> Any:
    t = type(x)
    if kind == _S or kind == _BY:  # bytesValue stays base64 text
        if t is str:
            return x
    elif kind == _I:
        if t is int:
            v = x
        elif t is str and _INT(x):
            v = int(x)
        else:
            raise Bad("bad_span", f"{what}: intValue is not an integer")
        if _I64_MIN <= v < U64:
            return v
        raise Bad("bad_span", f"{what}: intValue out of range")
    elif kind == _D:
        if t is float or t is int:
            return float(x)
        if t is str:
            f = _FLOATS.get(x)
            if f is not None:
                return f
            try:
                return float(x)
            except ValueError:
                pass
    elif kind == _B:
        if t is bool:
            return x
    raise Bad("bad_span", f"{what}: malformed AnyValue")


def _values(x: Any, what: str) -> list[Any]:
    if type(x) is dict:
        v = x.get("values")
        if v is None:
            return []
        if type(v) is list:
            return v
    raise Bad("bad_span", f"{what}: malformed arrayValue/kvlistValue")


def _kv(kv: Any, what: str) -> tuple[str, Any]:
    if type(kv) is dict:
        k = kv.get("key")
        if type(k) is str:
            return k, kv.get("value")
    raise Bad("bad_span", f"{what}: entry is not a {{key, value}} object")


def json_plain(av: Any, depth: int, ctx: Ctx, what: str) -> Any:
    """AnyValue (JSON) at ``depth`` to a plain Python value (kvlist → dict, array → list).

    >>> json_plain({"kvlistValue": {"values": [{"key": "a", "value": {"boolValue": True}}]}},
    ...            1, Ctx(DEFAULT_LIMITS, 0), "x")
    {'a': True}
    """
    if type(av) is not dict:
        if av is None:
            return None
        raise Bad("bad_span", f"{what}: AnyValue is not an object")
    for tag, x in av.items():
        kind = _TAG.get(tag)
        if kind is None:
            continue
        if kind == _KV:
            if depth > ctx.max_depth:
                raise _too_deep(what, ctx)
            out = {}
            for kv in _values(x, what):
                k, v = _kv(kv, what)
                out[k] = json_plain(v, depth + 1, ctx, what)
            return out
        if kind == _A:
            if depth > ctx.max_depth:
                raise _too_deep(what, ctx)
            return [json_plain(v, depth + 1, ctx, what) for v in _values(x, what)]
        return _json_scalar(kind, x, ctx, what)
    return None


def _array(key: str, lst: list[Any], ctx: Ctx) -> Any:
    """Attribute value from a plain list: scalars stay a list, anything nested becomes JSON."""
    for x in lst:
        if not (x is None or type(x) in _SCALAR_TYPES):
            break
    else:
        return lst
    if is_sensitive(key):
        return lst
    return orjson.dumps(lst).decode()


def _json_into(out: dict[str, Any], key: str, av: Any, depth: int, ctx: Ctx, what: str) -> None:
    """Put AnyValue ``av`` (at ``depth`` if a container) under ``key``; kvlists flatten."""
    if type(av) is not dict:
        if av is None:
            return
        raise Bad("bad_span", f"{what}: AnyValue is not an object")
    for tag, x in av.items():
        kind = _TAG.get(tag)
        if kind is None:
            continue
        if kind == _KV:
            if depth > ctx.max_depth:
                raise _too_deep(what, ctx)
            if is_sensitive(key):  # kept whole: hashed (tool arguments) and dropped by scrub()
                out[key] = json_plain(av, depth, ctx, what)
                return
            for kv in _values(x, what):
                k, v = _kv(kv, what)
                _json_into(out, f"{key}.{k}", v, depth + 1, ctx, what)
            if len(out) > ctx.max_attrs:
                raise _too_many(what, ctx)
            return
        if kind == _A:
            v = json_plain(av, depth, ctx, what)
            out[key] = _array(key, v, ctx)
            return
        out[key] = _json_scalar(kind, x, ctx, what)
        return


def attrs_kv(lst: Any, ctx: Ctx, what: str, hash_args: bool) -> dict[str, Any]:
    """OTLP JSON ``[{"key", "value": AnyValue}]`` to a flat, scrubbed attribute dict.

    >>> attrs_kv([{"key": "a", "value": {"kvlistValue": {"values": [
    ...     {"key": "b", "value": {"arrayValue": {"values": [{"intValue": 1}]}}}]}}},
    ...     {"key": "gen_ai.completion", "value": {"stringValue": "secret"}}],
    ...     Ctx(DEFAULT_LIMITS, 0), "attributes", True)
    {'a.b': [1]}
    """
    if type(lst) is not list:
        if not lst:
            return {}
        return attrs_dict(lst, ctx, what, hash_args)  # a plain object: accept it as flat
    if len(lst) > ctx.max_attrs:
        raise _too_many(what, ctx)
    out: dict[str, Any] = {}
    for kv in lst:
        try:
            k = kv["key"]
            av = kv["value"]
            v = av.get("stringValue")
        except Exception:  # not {key, value: {...}}: the careful path names the problem
            k, av = _kv(kv, what)
            _json_into(out, k, av, 1, ctx, what)
            continue
        # fast paths for the common scalar encodings; a non-str key fails later as bad_span
        if v is not None:
            if type(v) is str:
                out[k] = v
                continue
        else:
            v = av.get("intValue")
            if v is not None:
                if type(v) is str and len(v) < 19 and v.isdigit() and v.isascii():
                    out[k] = int(v)
                    continue
            else:
                v = av.get("doubleValue")
                if type(v) is float:
                    out[k] = v
                    continue
        _json_into(out, k, av, 1, ctx, what)
    if len(out) > ctx.max_attrs:
        raise _too_many(what, ctx)
    if not out.keys() <= _SAFE:
        scrub(out, hash_args)
    return trunc_values(out, ctx.max_str) if ctx.trunc else out


def _ts(v: Any, field: str) -> int:
    """OTLP timestamp: int or digit string; 0 (proto3 default) means missing."""
    if type(v) is str and v.isdigit() and v.isascii() and len(v) <= 20:
        v = int(v)
    if type(v) is not int or not 0 < v < U64:
        if v == 0:
            raise Bad("bad_timestamp", f"{field} is missing or zero")
        v = norm_ts(v, field)
        if not v:
            raise Bad("bad_timestamp", f"{field} is missing or zero")
    return v


def _events_json(evs: Any, ctx: Ctx) -> list[SpanEvent]:
    if type(evs) is not list:
        raise Bad("bad_span", "events is not an array")
    out = []
    for j, e in enumerate(evs):
        if type(e) is not dict:
            raise Bad("bad_span", f"events[{j}] is not an object")
        g = e.get
        name = g("name")
        if type(name) is not str:
            if name is not None:
                raise Bad("bad_span", f"events[{j}].name is not a string")
            name = ""
        t = g("timeUnixNano")
        if t is None:
            t = g("time_unix_nano")
        t = _ts(t, f"events[{j}].timeUnixNano")
        a = g("attributes")
        attrs = attrs_kv(a, ctx, f"events[{j}].attributes", False) if a else {}
        if ctx.trunc:
            name = trunc_str(name, ctx.max_str)
        out.append(SpanEvent(name, t, attrs))
    return out


def json_span(d: Any, res: dict[str, Any], ctx: Ctx) -> Span:
    """One OTLP JSON span object to a :class:`Span` sharing the resource dict ``res``.

    >>> s = json_span({"traceId": "ab" * 16, "spanId": "cd" * 8, "startTimeUnixNano": "1",
    ...                "endTimeUnixNano": "2", "status": {"code": "STATUS_CODE_ERROR"}},
    ...               {"service.name": "svc"}, Ctx(DEFAULT_LIMITS, 0))
    >>> s.status, s.kind, s.attr("service.name")
    ('ERROR', 'UNSPECIFIED', 'svc')
    """
    if type(d) is not dict:
        raise Bad("bad_span", "span is not an object")
    g = d.get
    tid = g("traceId")
    if tid is None:
        tid = g("trace_id")
    if not (type(tid) is str and len(tid) == 32 and HEX32(tid) and tid != Z32):
        tid = norm_id(tid, 32, "traceId")
    sid = g("spanId")
    if sid is None:
        sid = g("span_id")
    if not (type(sid) is str and len(sid) == 16 and HEX16(sid) and sid != Z16):
        sid = norm_id(sid, 16, "spanId")
    p = g("parentSpanId")
    if p is None:
        p = g("parent_span_id")
    if not p:
        p = None
    elif not (type(p) is str and len(p) == 16 and HEX16(p) and p != Z16):
        p = norm_parent(p, "parentSpanId")
    name = g("name")
    if type(name) is not str:
        if name is not None:
            raise Bad("bad_span", "name is not a string")
        name = ""
    k = g("kind")
    kind = KIND.get(k) if type(k) is int or type(k) is str else None
    if kind is None:
        kind = norm_kind(k)
    st = g("startTimeUnixNano")
    if st is None:
        st = g("start_time_unix_nano")
    if type(st) is str and 0 < len(st) < 20 and st.isdigit() and st.isascii() and st[0] != "0":
        st = int(st)
    else:
        st = _ts(st, "startTimeUnixNano")
    en = g("endTimeUnixNano")
    if en is None:
        en = g("end_time_unix_nano")
    if type(en) is str and 0 < len(en) < 20 and en.isdigit() and en.isascii() and en[0] != "0":
        en = int(en)
    else:
        en = _ts(en, "endTimeUnixNano")
    if en < st:
        raise Bad("bad_timestamp", "endTimeUnixNano is before startTimeUnixNano")
    s = g("status")
    status, msg = "UNSET", ""
    if s:
        if type(s) is not dict:
            raise Bad("bad_span", "status is not an object")
        c = s.get("code")
        status = STATUS.get(c, "UNSET") if type(c) is int else norm_status(c)
        m = s.get("message")
        if type(m) is str:
            msg = trunc_str(m, ctx.max_str) if ctx.trunc else m
    a = g("attributes")
    attrs = attrs_kv(a, ctx, "attributes", True) if a else {}
    e = g("events")
    events = _events_json(e, ctx) if e else []
    if ctx.trunc:
        name = trunc_str(name, ctx.max_str)
    return Span(tid, sid, p, name, kind, st, en, status, msg, attrs, res, events)


def _scopes(rs: dict[str, Any]) -> list[Any]:
    out: list[Any] = []
    for key in ("scopeSpans", "scope_spans", "instrumentationLibrarySpans",
                "instrumentation_library_spans"):
        v = rs.get(key)
        if v is not None:
            if type(v) is not list:
                raise Bad("bad_otlp", f"{key} is not an array")
            out.extend(v)
    return out


def _resource_spans(req: dict[str, Any]) -> Any:
    rss = req.get("resourceSpans")
    return req.get("resource_spans") if rss is None else rss


def json_count(req: dict[str, Any]) -> int:
    """Number of spans an OTLP JSON request claims to carry (0 where malformed).

    >>> json_count({"resourceSpans": [{"scopeSpans": [{"spans": [{}, {}]}, {"spans": [{}]}]}]})
    3
    """
    rss = _resource_spans(req)
    n = 0
    if type(rss) is list:
        for rs in rss:
            if type(rs) is dict:
                try:
                    scopes = _scopes(rs)
                except Bad:
                    continue
                for ss in scopes:
                    if type(ss) is dict:
                        sps = ss.get("spans")
                        if type(sps) is list:
                            n += len(sps)
    return n


def json_request(req: dict[str, Any], ctx: Ctx, sink: Sink) -> None:
    """Walk an OTLP JSON ``ExportTraceServiceRequest`` into ``sink`` (see the module example).

    >>> sink = Sink(); json_request({"resourceSpans": [{"scopeSpans": [{"spans": [{}]}]}]},
    ...                             Ctx(DEFAULT_LIMITS, 0), sink)
    >>> sink.spans, [(r.reason, r.index) for r in sink.rejections]
    ([], [('bad_id', 0)])
    """
    rss = _resource_spans(req)
    if type(rss) is not list:
        if rss is not None:
            sink.reject("bad_otlp", "resourceSpans is not an array")
        return
    spans_append = sink.spans.append
    for r, rs in enumerate(rss):
        what = f"resourceSpans[{r}]"
        if type(rs) is not dict:
            sink.reject("bad_otlp", f"{what} is not an object")
            continue
        try:
            scopes = _scopes(rs)
        except Bad as b:
            sink.reject(b.reason, f"{what}: {b.detail}")
            continue
        res_err: Exception | None = None
        res: dict[str, Any] = {}
        resource = rs.get("resource")
        try:
            if resource is not None:
                if type(resource) is not dict:
                    raise Bad("bad_otlp", f"{what}.resource is not an object")
                ra = resource.get("attributes")
                if ra:
                    res = attrs_kv(ra, ctx, f"{what}.resource.attributes", False)
        except Exception as e:  # every span of this resource inherits the failure
            res_err = e
        for s, ss in enumerate(scopes):
            if type(ss) is not dict:
                sink.reject("bad_otlp", f"{what}.scopeSpans[{s}] is not an object")
                continue
            sps = ss.get("spans")
            if not sps:
                continue
            if type(sps) is not list:
                sink.reject("bad_otlp", f"{what}.scopeSpans[{s}].spans is not an array")
                continue
            for sp in sps:
                i = sink.n
                sink.n = i + 1
                if res_err is not None:
                    sink.bad_span(res_err, i)
                    continue
                try:
                    spans_append(json_span(sp, res, ctx))
                except Exception as e:
                    sink.bad_span(e, i)


# ---------------------------------------------------------------------------------- protobuf


def _pb_plain(v: Any, depth: int, ctx: Ctx, what: str) -> Any:
    w = v.WhichOneof("value")
    if w == "string_value":
        return v.string_value
    if w == "int_value":
        return v.int_value
    if w == "double_value":
        return v.double_value
    if w == "bool_value":
        return v.bool_value
    if w == "bytes_value":
        return base64.b64encode(v.bytes_value).decode()
    if w is None:
        return None
    if depth > ctx.max_depth:
        raise _too_deep(what, ctx)
    if w == "array_value":
        return [_pb_plain(x, depth + 1, ctx, what) for x in v.array_value.values]
    return {kv.key: _pb_plain(kv.value, depth + 1, ctx, what) for kv in v.kvlist_value.values}


def _pb_into(out: dict[str, Any], key: str, v: Any, depth: int, ctx: Ctx, what: str) -> None:
    if v.WhichOneof("value") == "kvlist_value":
        if depth > ctx.max_depth:
            raise _too_deep(what, ctx)
        if is_sensitive(key):
            out[key] = _pb_plain(v, depth, ctx, what)
            return
        for kv in v.kvlist_value.values:
            _pb_into(out, f"{key}.{kv.key}", kv.value, depth + 1, ctx, what)
        if len(out) > ctx.max_attrs:
            raise _too_many(what, ctx)
        return
    x = _pb_plain(v, depth, ctx, what)
    if type(x) is list:
        x = _array(key, x, ctx)
    elif x is None:
        return
    out[key] = x


def pb_attrs(kvs: Any, ctx: Ctx, what: str, hash_args: bool) -> dict[str, Any]:
    """Repeated protobuf ``KeyValue`` to a flat, scrubbed attribute dict.

    >>> from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
    >>> pb_attrs([KeyValue(key="n", value=AnyValue(int_value=3)),
    ...           KeyValue(key="gen_ai.prompt", value=AnyValue(string_value="secret"))],
    ...          Ctx(DEFAULT_LIMITS, 0), "attributes", True)
    {'n': 3}
    """
    if len(kvs) > ctx.max_attrs:
        raise _too_many(what, ctx)
    out: dict[str, Any] = {}
    for kv in kvs:
        v = kv.value
        w = v.WhichOneof("value")
        if w == "string_value":
            out[kv.key] = v.string_value
        elif w == "int_value":
            out[kv.key] = v.int_value
        elif w == "double_value":
            out[kv.key] = v.double_value
        elif w == "bool_value":
            out[kv.key] = v.bool_value
        elif w is not None:
            _pb_into(out, kv.key, v, 1, ctx, what)
    if len(out) > ctx.max_attrs:
        raise _too_many(what, ctx)
    if not out.keys() <= _SAFE:
        scrub(out, hash_args)
    return trunc_values(out, ctx.max_str) if ctx.trunc else out


def pb_span(sp: Any, res: dict[str, Any], ctx: Ctx) -> Span:
    """One protobuf ``Span`` to a :class:`Span` sharing the resource dict ``res``.

    >>> from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan
    >>> s = pb_span(PbSpan(trace_id=b"\\xab" * 16, span_id=b"\\xcd" * 8, kind=2,
    ...                    start_time_unix_nano=1, end_time_unix_nano=2), {}, Ctx(DEFAULT_LIMITS, 0))
    >>> s.trace_id == "ab" * 16, s.kind, s.parent_span_id
    (True, 'SERVER', None)
    """
    tid = sp.trace_id
    if len(tid) != 16 or not any(tid):
        raise Bad("bad_id", "trace_id: expected 16 bytes, not all zero")
    sid = sp.span_id
    if len(sid) != 8 or not any(sid):
        raise Bad("bad_id", "span_id: expected 8 bytes, not all zero")
    p = sp.parent_span_id
    if p:
        if len(p) != 8:
            raise Bad("bad_id", "parent_span_id: expected 8 bytes")
        parent = p.hex() if any(p) else None
    else:
        parent = None
    st = sp.start_time_unix_nano
    en = sp.end_time_unix_nano
    if not st or not en:
        raise Bad("bad_timestamp", "start_time_unix_nano or end_time_unix_nano is missing")
    if en < st:
        raise Bad("bad_timestamp", "end_time_unix_nano is before start_time_unix_nano")
    status = STATUS.get(sp.status.code, "UNSET")
    name = sp.name
    msg = sp.status.message
    if ctx.trunc:
        name = trunc_str(name, ctx.max_str)
        msg = trunc_str(msg, ctx.max_str)
    attrs = pb_attrs(sp.attributes, ctx, "attributes", True) if sp.attributes else {}
    events = []
    if sp.events:
        for j, ev in enumerate(sp.events):
            if not ev.time_unix_nano:
                raise Bad("bad_timestamp", f"events[{j}].time_unix_nano is missing")
            ea = pb_attrs(ev.attributes, ctx, f"events[{j}].attributes", False) \
                if ev.attributes else {}
            en_ = trunc_str(ev.name, ctx.max_str) if ctx.trunc else ev.name
            events.append(SpanEvent(en_, ev.time_unix_nano, ea))
    return Span(tid.hex(), sid.hex(), parent, name, KIND.get(sp.kind, "UNSPECIFIED"), st, en,
                status, msg, attrs, res, events)


def pb_count(req: Any) -> int:
    """Number of spans in a parsed protobuf request.

    >>> from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ...     ExportTraceServiceRequest)
    >>> pb_count(ExportTraceServiceRequest())
    0
    """
    return sum(len(ss.spans) for rs in req.resource_spans for ss in rs.scope_spans)


def pb_request(req: Any, ctx: Ctx, sink: Sink) -> None:
    """Walk a parsed protobuf ``ExportTraceServiceRequest`` into ``sink``.

    >>> from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ...     ExportTraceServiceRequest)
    >>> req = ExportTraceServiceRequest.FromString(b"\\n\\x04\\x12\\x02\\x12\\x00")  # one empty span
    >>> sink = Sink(); pb_request(req, Ctx(DEFAULT_LIMITS, 0), sink); sink.rejections
    [Rejection(reason='bad_id', detail='trace_id: expected 16 bytes, not all zero', index=0)]
    """
    spans_append = sink.spans.append
    for r, rs in enumerate(req.resource_spans):
        res_err: Exception | None = None
        res: dict[str, Any] = {}
        try:
            ra = rs.resource.attributes
            if ra:
                res = pb_attrs(ra, ctx, f"resourceSpans[{r}].resource.attributes", False)
        except Exception as e:
            res_err = e
        for ss in rs.scope_spans:
            for sp in ss.spans:
                i = sink.n
                sink.n = i + 1
                if res_err is not None:
                    sink.bad_span(res_err, i)
                    continue
                try:
                    spans_append(pb_span(sp, res, ctx))
                except Exception as e:
                    sink.bad_span(e, i)

