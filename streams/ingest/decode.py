"""Auto-detecting decoder for one Kafka message value, and the replay-file splitter (README "Topics", §7).

>>> d = decode(b'{"trace_id": "' + b"ab" * 16 + b'", "span_id": "' + b"cd" * 8
...            + b'", "name": "chat", "start_time_unix_nano": 1, "end_time_unix_nano": 2}')
>>> d.format, len(d.spans), d.rejections
('flat', 1, [])
"""

from __future__ import annotations

import re
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from streams.ingest.flat import Bad, Ctx, check_depth, flat_span, json_has_long_run
from streams.ingest.limits import DEFAULT_LIMITS, Limits
from streams.ingest.otlp import Sink, json_count, json_request, pb_count, pb_request
from streams.models import Rejection, Span

_BOM = b"\xef\xbb\xbf"
_SAFE_MSG = re.compile(r"[A-Za-z ,-]{1,80}").fullmatch
_WS = b" \t\r\n\x0b\x0c"


@dataclass(slots=True)
class Decoded:
    """What one message value yields.

    ``spans`` are normalized and scrubbed (README "What producers send"); ``rejections`` name what could not become a
    span (``index`` = position of the span candidate in the message, ``None`` for message-level
    problems).  ``format`` is ``"flat"``, ``"otlp_json"``, ``"otlp_proto"``, ``"empty"`` (a
    well-formed message without spans, e.g. an empty value or ``[]``) or ``"unknown"`` (not
    recognizable: oversized, broken JSON, protobuf garbage).  Spans of one OTLP resource share
    one ``resource`` dict: treat it as read-only.

    >>> decode(b"").format, decode(b"[]").format, decode(b"\\x00\\x01").format
    ('empty', 'empty', 'unknown')
    """

    spans: list[Span]
    rejections: list[Rejection]
    format: str


def decode(payload: bytes, *, limits: Limits = DEFAULT_LIMITS) -> Decoded:
    """Decode one message value: flat JSON, JSON array, JSON lines, OTLP JSON or OTLP protobuf.

    Never raises.  Detection: a value whose first non-whitespace byte is ``{`` or ``[`` is JSON
    (an object with ``resourceSpans`` is an OTLP JSON request, any other object one flat span, an
    array a list of either; if the whole value is not JSON but has several lines, each non-empty
    line is decoded on its own — if no line is valid JSON the message gets one rejection);
    anything else is an OTLP protobuf ``ExportTraceServiceRequest``.  ``None`` (a Kafka
    tombstone) and whitespace decode as ``"empty"``.

    >>> tid, sid = "ab" * 16, "cd" * 8
    >>> ok = {"trace_id": tid, "span_id": sid, "name": "t", "start_time_unix_nano": 5,
    ...       "end_time_unix_nano": 9, "attributes": {"gen_ai.tool.call.arguments": "{}"}}
    >>> d = decode(orjson.dumps([ok, {**ok, "span_id": "nope"}]))
    >>> d.spans[0].attributes
    {'tool.payload_hash': '01e7b720ff566d53'}
    >>> d.rejections
    [Rejection(reason='bad_id', detail='span_id: expected 16 hex digits, not all zero', index=1)]
    >>> [(r.reason, r.detail[:20]) for r in decode(b'{"a": 1}\\n{oops}\\n').rejections]
    [('bad_id', 'line 1: trace_id is '), ('bad_json', 'line 2: not valid JS')]
    >>> decode(b"x" * 11, limits=Limits(max_message_bytes=10)).rejections[0].reason
    'oversized'
    """
    try:
        d = _decode(payload, limits)
        for s in d.spans:  # status messages carry prompts, keys and stack traces: never past ingest
            if s.status_message:
                s.status_message = ""
        return d
    except Exception as e:  # defensive: decode() must never raise
        return Decoded([], [Rejection("internal_error", f"decoder error ({type(e).__name__})")],
                       "unknown")


def _decode(payload: Any, limits: Limits) -> Decoded:
    if type(payload) is not bytes:
        if payload is None:
            return Decoded([], [], "empty")
        if isinstance(payload, bytes | bytearray | memoryview):
            payload = bytes(payload)
        elif isinstance(payload, str):
            payload = payload.encode("utf-8", "surrogatepass")
        else:
            return Decoded([], [Rejection("bad_input", "payload is not bytes")], "unknown")
    n = len(payload)
    if n > limits.max_message_bytes:
        return Decoded([], [Rejection(
            "oversized", f"message is {n} bytes, max_message_bytes is {limits.max_message_bytes}"
        )], "unknown")
    if not n:
        return Decoded([], [], "empty")
    ctx = Ctx(limits, n)
    first = payload[0]
    if first == 0x7B or first == 0x5B:  # { [
        return _json(payload, ctx, limits, False)
    head = payload.lstrip(_WS)
    if head.startswith(_BOM):
        head = head[3:].lstrip(_WS)
    if not head:
        return Decoded([], [], "empty")
    if head[0] == 0x7B or head[0] == 0x5B:
        return _json(head, ctx, limits, payload)
    if head[0] in _SCALAR_START and len(head) <= 4096:
        try:
            v = orjson.loads(head)
        except orjson.JSONDecodeError:
            pass
        else:  # valid JSON, but a number / string / true / false / null: not spans, and not OTLP
            return Decoded([], [Rejection("bad_json", f"a JSON {_json_kind(v)}, not a span object or array")],
                           "unknown")
    return _proto(payload, ctx, limits, strict=False)


_SCALAR_START = frozenset(b'"-0123456789tfn')


def _json_kind(v: object) -> str:
    return {bool: "boolean", int: "number", float: "number", str: "string"}.get(type(v), "null")


# --------------------------------------------------------------------------------- protobuf


def _proto(payload: bytes, ctx: Ctx, limits: Limits, strict: bool) -> Decoded | None:
    """OTLP protobuf.  With ``strict`` (a JSON fallback), return None unless it clearly is one."""
    req = ExportTraceServiceRequest()
    try:
        req.ParseFromString(payload)
    except Exception:
        if strict:
            return None
        return Decoded([], [Rejection("bad_otlp", f"not an OTLP protobuf request ({len(payload)} "
                                      "bytes do not parse)")], "unknown")
    if not req.resource_spans:
        if strict:
            return None
        return Decoded([], [Rejection("bad_otlp", "not an OTLP protobuf request (no resourceSpans)")],
                       "unknown")
    total = pb_count(req)
    if strict and not total:
        return None
    if total > limits.max_spans_per_message:
        return _too_many(total, limits, "otlp_proto")
    sink = Sink()
    pb_request(req, ctx, sink)
    return _result(sink, "otlp_proto")


# ------------------------------------------------------------------------------------- JSON


def _json_error(data: bytes, e: orjson.JSONDecodeError, where: str) -> Rejection:
    """A content-free rejection for JSON that does not parse."""
    msg = e.msg
    if "UTF-8" in msg or "utf-8" in msg:
        try:
            data.decode()
        except UnicodeDecodeError as u:
            return Rejection("not_utf8", f"{where}not valid UTF-8 (at byte {u.start})")
    if "depth" in msg or "recursion" in msg:
        return Rejection("too_deep", f"{where}JSON nesting deeper than the parser limit")
    try:
        data.decode()
    except UnicodeDecodeError as u:
        return Rejection("not_utf8", f"{where}not valid UTF-8 (at byte {u.start})")
    if not _SAFE_MSG(msg):
        msg = "syntax error"
    pos = f"line {e.lineno}, column {e.colno}" if e.lineno > 1 else f"column {e.colno}"
    return Rejection("bad_json", f"{where}not valid JSON ({msg}, at {pos})")


def _json(data: bytes, ctx: Ctx, limits: Limits, raw: bytes | bool) -> Decoded:
    """``raw`` is the original payload when leading bytes were skipped, else False."""
    try:
        docs: list[tuple[int | None, Any]] = [(None, orjson.loads(data))]
    except orjson.JSONDecodeError as e:
        if raw and raw[0] == 0x0A:  # protobuf's first tag byte is b"\n": maybe not JSON at all
            d = _proto(raw, ctx, limits, strict=True)
            if d is not None:
                return d
        if b"\n" not in data:
            return Decoded([], [_json_error(data, e, "")], "unknown")
        docs = _lines(data)
        if all(type(obj) is Rejection for _, obj in docs):
            # not JSON lines either (e.g. broken pretty-printed JSON): one rejection
            return Decoded([], [_json_error(data, e, "")], "unknown")
    if ctx.trunc:  # it is JSON: a cheap scan usually proves no string needs truncation
        ctx.trunc = json_has_long_run(data, limits.max_string_bytes)

    total = 0
    for _, obj in docs:
        if type(obj) is list:
            for el in obj:
                if type(el) is dict and ("resourceSpans" in el or "resource_spans" in el):
                    total += json_count(el)
                else:
                    total += 1
        elif type(obj) is dict:
            total += json_count(obj) if "resourceSpans" in obj or "resource_spans" in obj else 1
    kinds: set[str] = set()
    if total > limits.max_spans_per_message:
        for _, obj in docs:
            _json_kinds(obj, kinds)
        return _too_many(total, limits, _fmt(kinds))

    sink = Sink()
    for line, obj in docs:
        if type(obj) is Rejection:
            sink.rejections.append(obj)
        else:
            sink.where = "" if line is None else f"line {line}: "
            _json_doc(obj, ctx, sink, kinds)
    return _result(sink, _fmt(kinds))


def _lines(data: bytes) -> list[tuple[int | None, Any]]:
    """JSON lines: (line number, parsed object/array) or (line number, its Rejection)."""
    docs: list[tuple[int | None, Any]] = []
    loads = orjson.loads
    for no, line in enumerate(data.split(b"\n"), 1):
        if not line or line.isspace():
            continue
        try:
            obj = loads(line)
        except orjson.JSONDecodeError as e:
            docs.append((no, _json_error(line, e, f"line {no}: ")))
            continue
        if type(obj) is dict or type(obj) is list:
            docs.append((no, obj))
        else:
            docs.append((no, Rejection("bad_json", f"line {no}: expected a JSON object or array")))
    return docs


def _json_kinds(obj: Any, kinds: set[str]) -> None:
    if type(obj) is dict:
        kinds.add("otlp_json" if "resourceSpans" in obj or "resource_spans" in obj else "flat")
    elif type(obj) is list:
        for el in obj:
            if type(el) is dict:
                _json_kinds(el, kinds)
            else:
                kinds.add("flat")


def _json_doc(obj: Any, ctx: Ctx, sink: Sink, kinds: set[str]) -> None:
    """One parsed JSON document (a whole message, or one line of JSON lines) into ``sink``."""
    if type(obj) is dict:
        if "resourceSpans" in obj or "resource_spans" in obj:
            kinds.add("otlp_json")
            json_request(obj, ctx, sink)
            return
        kinds.add("flat")
        i = sink.n
        sink.n = i + 1
        try:
            sink.spans.append(flat_span(obj, ctx))
        except Exception as e:
            sink.bad_span(e, i)
        return
    if type(obj) is not list:
        sink.reject("bad_json", "expected a JSON object or array")
        return
    spans_append = sink.spans.append
    i = sink.n
    flat = False
    for el in obj:
        if type(el) is dict:
            if "resourceSpans" in el or "resource_spans" in el:
                sink.n = i
                kinds.add("otlp_json")
                json_request(el, ctx, sink)
                i = sink.n
                continue
            flat = True
            try:
                spans_append(flat_span(el, ctx))
            except Exception as e:
                sink.bad_span(e, i)
        else:
            flat = True
            sink.bad_span(_not_object(el, ctx), i)
        i += 1
    sink.n = i
    if flat:
        kinds.add("flat")


def _not_object(el: Any, ctx: Ctx) -> Exception:
    if type(el) is list:
        try:
            check_depth(el, 1, ctx, "array element")
        except Bad as b:
            return b
    return Bad("bad_span", "array element is not an object")


def _fmt(kinds: set[str]) -> str:
    if "flat" in kinds:
        return "flat"
    return "otlp_json" if kinds else "unknown"


def _too_many(total: int, limits: Limits, fmt: str) -> Decoded:
    return Decoded([], [Rejection(
        "too_many_spans",
        f"message has {total} spans, max_spans_per_message is {limits.max_spans_per_message}",
    )], fmt)


def _result(sink: Sink, fmt: str) -> Decoded:
    if not sink.spans and not sink.rejections:
        fmt = "empty"
    return Decoded(sink.spans, sink.rejections, fmt)


# ------------------------------------------------------------------------------ replay files


def iter_documents(fp: typing.BinaryIO) -> Iterator[bytes]:
    """Split a replay file (opened in binary mode; ``sys.stdin.buffer`` for ``-``) into documents.

    One document per non-empty line (JSON lines, each auto-detected by :func:`decode`), read
    lazily line by line.  If the first non-blank line starts with ``{`` or ``[`` but is not JSON
    on its own (and the next non-blank line is not a JSON object/array on its own either), the
    file is one pretty-printed document: the rest is read and yielded whole — unless the whole is
    not JSON either, then its non-empty lines are yielded one by one (so a broken file still
    gives per-line errors).

    >>> import io
    >>> list(iter_documents(io.BytesIO(b'{"a": 1}\\n\\n[2]\\r\\n')))
    [b'{"a": 1}', b'[2]']
    >>> list(iter_documents(io.BytesIO(b'[\\n  {"a": 1},\\n  {"b": 2}\\n]\\n')))
    [b'[\\n  {"a": 1},\\n  {"b": 2}\\n]']
    """
    for _, doc in iter_numbered(fp):
        yield doc


def iter_numbered(fp: typing.BinaryIO) -> Iterator[tuple[int, bytes]]:
    """:func:`iter_documents` with the (1-based) line number each document starts on.

    >>> import io
    >>> list(iter_numbered(io.BytesIO(b'{"a": 1}\\n\\n[2]\\n')))
    [(1, b'{"a": 1}'), (3, b'[2]')]
    """
    it = iter(fp)
    n = 0
    for line in it:
        n += 1
        s = line.strip()
        if not s:
            continue
        if (s[0] == 0x7B or s[0] == 0x5B) and not _is_json(s):
            # Pretty-printed JSON, or JSON lines whose first line is broken?  Peek at the next
            # non-blank line: a JSON object/array on its own means JSON lines (keep streaming).
            first = n
            rest = [line]
            for nxt in it:
                n += 1
                rest.append(nxt)
                t = nxt.strip()
                if t:
                    if (t[0] == 0x7B or t[0] == 0x5B) and _is_json(t):
                        yield first, s
                        yield n, t
                        break
                    whole = b"".join(rest) + fp.read()
                    yield from _whole(whole.strip(), first)
                    return
            else:
                yield first, s
                return
        else:
            yield n, s
        break
    for line in it:
        n += 1
        s = line.strip()
        if s:
            yield n, s


def _is_json(s: bytes) -> bool:
    try:
        orjson.loads(s)
    except orjson.JSONDecodeError:
        return False
    return True


def _whole(doc: bytes, first: int) -> Iterator[tuple[int, bytes]]:
    """One pretty-printed document; if it is not JSON after all, its lines one by one."""
    if _is_json(doc):
        yield first, doc
        return
    for i, part in enumerate(doc.split(b"\n")):
        part = part.strip()
        if part:
            yield first + i, part
