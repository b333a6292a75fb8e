"""Normalization shared by every encoding, and the flat-JSON span shape (README "What producers send").

Everything here is a pure function of already-parsed values.  Problems are raised as :class:`Bad`
(a stable ``reason`` code and a ``detail`` that names fields, positions and counts only, never
payload content); the caller turns them into :class:`~streams.models.Rejection` objects.

The privacy rule lives in :func:`scrub`: tool arguments are hashed into ``tool.payload_hash`` and
every key :func:`streams.semconv.is_sensitive` flags is dropped, from span, resource and event
attributes alike.

>>> ctx = Ctx(DEFAULT_LIMITS, 100)
>>> s = flat_span({"trace_id": "ab" * 16, "span_id": "cd" * 8, "name": "chat",
...                "start_time_unix_nano": 1, "end_time_unix_nano": "2",
...                "status": {"code": "STATUS_CODE_ERROR"}, "kind": "SPAN_KIND_CLIENT",
...                "attributes": {"gen_ai": {"operation.name": "chat"}, "gen_ai.prompt": "hi"}},
...               ctx)
>>> s.kind, s.status, s.end_ns, s.attributes
('CLIENT', 'ERROR', 2, {'gen_ai.operation.name': 'chat'})
"""

from __future__ import annotations

import base64
import binascii
import re
from datetime import datetime, timedelta, timezone
from typing import Any

import orjson

from streams.ingest.limits import DEFAULT_LIMITS, Limits  # noqa: F401  (doctests)
from streams.models import Span, SpanEvent
from streams.ingest.dialects import REQ_HASH_KEY, REQ_NAME_KEY, argument_hash, requested_call
from streams.semconv import canonical_hash, is_sensitive

ARGS_KEY = "gen_ai.tool.call.arguments"
HASH_KEY = "tool.payload_hash"
U64 = 1 << 64

Z32 = "0" * 32
Z16 = "0" * 16
HEX32 = re.compile(r"[0-9a-f]{32}").fullmatch
HEX16 = re.compile(r"[0-9a-f]{16}").fullmatch
_HEXN = {32: HEX32, 16: HEX16}
_B64N = {32: 16, 16: 8}  # hex digits -> raw bytes

SCALARS = frozenset({str, int, float, bool})

# Attribute keys already known not to be sensitive.  ``keys() <= _SAFE`` is one C-level call, so a
# span whose keys were all seen before pays no per-key Python work for the privacy rule.  Bounded
# (count and key length): other keys are simply classified every time (still correct, slower).
_SAFE: set[str] = set()
_SAFE_MAX = 1 << 16

KINDS = ("UNSPECIFIED", "INTERNAL", "SERVER", "CLIENT", "PRODUCER", "CONSUMER")
KIND: dict[Any, str] = {}
for _i, _k in enumerate(KINDS):
    for _alias in (_k, "SPAN_KIND_" + _k, "SpanKind." + _k):
        KIND[_alias] = KIND[_alias.lower()] = _k
    KIND[_i] = _k

STATUS: dict[Any, str] = {0: "UNSET", 1: "OK", 2: "ERROR"}
for _k in ("UNSET", "OK", "ERROR"):
    for _alias in (_k, "STATUS_CODE_" + _k, "StatusCode." + _k):
        STATUS[_alias] = STATUS[_alias.lower()] = _k


class Bad(Exception):
    """A value that cannot be normalized: stable ``reason`` code plus a content-free ``detail``.

    >>> Bad("bad_id", "trace_id: expected 32 hex digits").reason
    'bad_id'
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail


class Ctx:
    """Per-message decoding context: the limits as plain attributes, plus ``trunc``.

    ``trunc`` is false when the whole message is no longer than ``max_string_bytes``: then no
    string inside it can be longer either, and truncation checks are skipped entirely.

    >>> Ctx(DEFAULT_LIMITS, 10).trunc, Ctx(Limits(max_string_bytes=4), 10).trunc
    (False, True)
    """

    __slots__ = ("max_attrs", "max_depth", "max_str", "trunc", "res_raw", "res")

    def __init__(self, limits: Limits, size: int) -> None:
        self.max_attrs = limits.max_attributes
        self.max_depth = limits.max_depth
        self.max_str = limits.max_string_bytes
        self.trunc = size > limits.max_string_bytes
        self.res_raw: Any = None  # last flat-span resource (raw) and its normalized dict
        self.res: dict[str, Any] = {}


def json_has_long_run(data: bytes, m: int) -> bool:
    """False only if no JSON string in ``data`` can decode to more than ``m`` UTF-8 bytes.

    A string never decodes to more bytes than its JSON encoding, and its encoding contains no
    unescaped ``"``.  So if every window of ``m // 2`` bytes holds an unescaped quote, no
    quote-free run (and no string) reaches ``m`` bytes.  That is a few ``bytes.find`` calls per
    message instead of a length check per attribute value.  Conservative: True when unsure.

    >>> json_has_long_run(b'["' + b"x" * 10 + b'"]', 8), json_has_long_run(b'["a", "b"]' * 4, 8)
    (True, False)
    """
    n = len(data)
    if n <= m:
        return False
    k = m // 2
    if k < 2:
        return True
    find = data.find
    for a in range(0, n - k + 1, k):
        b = a + k
        p = find(b'"', a, b)
        tries = 0
        while p >= 0:
            q = p
            while q > 0 and data[q - 1] == 0x5C:  # backslashes before the quote
                q -= 1
                if p - q > 64:
                    return True
            if not (p - q) & 1:
                break  # an unescaped quote: this window is fine
            tries += 1
            if tries > 32:
                return True
            p = find(b'"', p + 1, b)
        else:
            return True
    return False


# ----------------------------------------------------------------------------------- values


def trunc_str(s: str, n: int) -> str:
    """``s`` cut to at most ``n`` UTF-8 bytes, at a character boundary.

    >>> trunc_str("héllo", 2), trunc_str("abc", 5)
    ('h', 'abc')
    """
    if len(s) <= n >> 2:  # at most 4 bytes per character
        return s
    b = s.encode("utf-8", "surrogatepass")
    if len(b) <= n:
        return s
    return b[:n].decode("utf-8", "ignore")


def trunc_values(a: dict[str, Any], n: int) -> dict[str, Any]:
    """Truncate over-long strings (also inside lists) of a flat attribute dict, in place.

    Runs after :func:`scrub`, so tool arguments are hashed whole.

    >>> trunc_values({"a": "xyz", "b": ["xyz", 1], "c": 5}, 2)
    {'a': 'xy', 'b': ['xy', 1], 'c': 5}
    """
    m = n >> 2
    for k, v in a.items():
        if type(v) is str:
            if len(v) > m:
                a[k] = trunc_str(v, n)
        elif type(v) is list:
            a[k] = [trunc_str(x, n) if type(x) is str else x for x in v]
    return a


def check_depth(v: Any, depth: int, ctx: Ctx, what: str) -> None:
    """Raise ``too_deep`` if container ``v`` (itself at ``depth``) nests deeper than allowed.

    >>> check_depth({"a": [1]}, 1, Ctx(Limits(max_depth=2), 0), "x")
    >>> check_depth({"a": [[1]]}, 1, Ctx(Limits(max_depth=2), 0), "x")
    Traceback (most recent call last):
    ...
    streams.ingest.flat.Bad: ('too_deep', 'x: nesting deeper than max_depth 2')
    """
    lim = ctx.max_depth
    stack = [(v, depth)]
    while stack:
        x, d = stack.pop()
        if d > lim:
            raise Bad("too_deep", f"{what}: nesting deeper than max_depth {lim}")
        for y in x.values() if type(x) is dict else x:
            if type(y) is dict or type(y) is list:
                stack.append((y, d + 1))


def list_value(key: str, v: list[Any], depth: int, ctx: Ctx, what: str) -> Any:
    """An attribute value that is a list (at ``depth``).

    Lists of scalars stay lists.  A list holding objects or lists is not an OTel attribute value:
    it becomes its compact JSON string (so ``plan.steps`` sent as a real array reads like the
    documented JSON string), unless the key is sensitive (kept as is, to be hashed or dropped).

    >>> ctx = Ctx(DEFAULT_LIMITS, 0)
    >>> list_value("tags", ["a", 1], 1, ctx, "x"), list_value("plan.steps", [{"id": "a"}], 1, ctx, "x")
    (['a', 1], '[{"id":"a"}]')
    """
    if depth > ctx.max_depth:
        raise Bad("too_deep", f"{what}: nesting deeper than max_depth {ctx.max_depth}")
    for x in v:
        if type(x) is dict or type(x) is list:
            break
    else:
        return v
    check_depth(v, depth, ctx, what)
    if is_sensitive(key):
        return v
    return orjson.dumps(v).decode()


def _flatten_into(out: dict[str, Any], prefix: str, d: dict[str, Any], depth: int, ctx: Ctx,
                  what: str) -> None:
    max_attrs = ctx.max_attrs
    for k, v in d.items():
        if prefix:
            k = prefix + k
        t = type(v)
        if t is str:
            pass
        elif t is dict:
            if depth + 1 > ctx.max_depth:
                raise Bad("too_deep", f"{what}: nesting deeper than max_depth {ctx.max_depth}")
            if is_sensitive(k):
                # kept whole: hashed (tool arguments) and dropped by scrub()
                check_depth(v, depth + 1, ctx, what)
            else:
                _flatten_into(out, k + ".", v, depth + 1, ctx, what)
                continue
        elif t is list:
            v = list_value(k, v, depth + 1, ctx, what)
        elif v is None:
            continue
        elif t not in SCALARS:
            raise Bad("bad_span", f"{what}: unsupported attribute value type")
        out[k] = v
        if len(out) > max_attrs:
            raise Bad("too_many_attributes",
                      f"{what}: more than max_attributes {max_attrs} attributes")


def flatten(a: dict[str, Any], ctx: Ctx, what: str) -> dict[str, Any]:
    """Flatten nested objects to dotted keys, drop ``null`` values, enforce depth/count limits.

    >>> flatten({"a": {"b": 1, "c": None}, "d": [1, {"e": 2}]}, Ctx(DEFAULT_LIMITS, 0), "x")
    {'a.b': 1, 'd': '[1,{"e":2}]'}
    """
    out: dict[str, Any] = {}
    _flatten_into(out, "", a, 0, ctx, what)
    return out


def scrub(a: dict[str, Any], hash_args: bool) -> dict[str, Any]:
    """The privacy rule, in place: hash tool arguments, then drop every sensitive key.

    With ``hash_args`` (span attributes), ``gen_ai.tool.call.arguments`` becomes
    ``tool.payload_hash`` (unless the producer already sent one), and the tool call(s) a model
    span's output requested become ``tool.requested.name`` / ``tool.requested.payload_hash``.

    >>> a = scrub({"gen_ai.tool.call.arguments": '{"q": 1}', "gen_ai.prompt": "x", "k": 1}, True)
    >>> a == {"k": 1, "tool.payload_hash": canonical_hash({"q": 1})}
    True
    """
    safe = _SAFE
    drop = None
    for k in a.keys() - safe:  # only keys never classified before
        if is_sensitive(k):
            if drop is None:
                drop = [k]
            else:
                drop.append(k)
        elif len(safe) < _SAFE_MAX and len(k) <= 200:
            safe.add(k)
    if drop:
        if hash_args and HASH_KEY not in a:
            try:  # any dialect's tool arguments (streams.ingest.dialects.ARGUMENTS)
                h = argument_hash(a, canonical_hash)
            except Exception:  # pathological value (e.g. recursion): never let it escape
                raise Bad("bad_span", "tool arguments could not be hashed") from None
            if h is not None:
                a[HASH_KEY] = h
        if hash_args and REQ_NAME_KEY not in a:
            try:  # the tool call(s) a model span's output requested (dialects.REQUESTED)
                req = requested_call(a, canonical_hash, drop)
            except Exception:
                raise Bad("bad_span", "requested tool calls could not be read") from None
            if req is not None:
                a[REQ_NAME_KEY], a[REQ_HASH_KEY] = req
        for k in drop:
            del a[k]
    return a


def attrs_dict(a: Any, ctx: Ctx, what: str, hash_args: bool) -> dict[str, Any]:
    """Normalize a flat-JSON attribute object (also accepts an OTLP key/value list).

    The returned dict may be ``a`` itself, modified in place (it is freshly parsed, so ours).

    >>> attrs_dict({"a": 1, "input.value": "secret"}, Ctx(DEFAULT_LIMITS, 0), "attributes", True)
    {'a': 1}
    """
    if type(a) is dict:
        if not (len(a) <= ctx.max_attrs and set(map(type, a.values())) <= SCALARS):
            a = flatten(a, ctx, what)
        if not a.keys() <= _SAFE:
            scrub(a, hash_args)
        return trunc_values(a, ctx.max_str) if ctx.trunc else a
    if a is None:
        return {}
    if type(a) is list:
        from streams.ingest.otlp import attrs_kv  # OTLP-style list inside a flat span

        return attrs_kv(a, ctx, what, hash_args)
    raise Bad("bad_span", f"{what} is not an object")


# ---------------------------------------------------------------------------- ids and times


def norm_id(v: Any, n: int, field: str) -> str:
    """Slow path for an id of ``n`` hex digits: ``0x`` prefix, upper case, base64, int.

    >>> norm_id("0xABCDEF0123456789", 16, "span_id"), norm_id("q83vASNFZ4k=", 16, "spanId")
    ('abcdef0123456789', 'abcdef0123456789')
    """
    s = None
    if type(v) is str:
        t = v.strip()
        if t[:2] in ("0x", "0X"):
            t = t[2:]
        t = t.lower()
        if len(t) == n and _HEXN[n](t):
            s = t
        elif 0 < len(v) <= 2 * n:
            s = _b64_id(v.strip(), _B64N[n])
    elif type(v) is int and 0 <= v < 1 << (4 * n):
        s = format(v, f"0{n}x")
    if s is None or s == "0" * n:
        if v is None:
            raise Bad("bad_id", f"{field} is missing")
        raise Bad("bad_id", f"{field}: expected {n} hex digits, not all zero")
    return s


def _b64_id(s: str, nbytes: int) -> str | None:
    try:
        s = s.replace("-", "+").replace("_", "/")
        raw = base64.b64decode(s + "=" * (-len(s) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw.hex() if len(raw) == nbytes else None


def norm_parent(v: Any, field: str) -> str | None:
    """Parent span id: missing, empty or all-zero means root (``None``).

    >>> norm_parent("", "parent_span_id"), norm_parent("0x00000000000000AB", "parent_id")
    (None, '00000000000000ab')
    """
    if v is None or v == "" or v == 0:
        return None
    try:
        return norm_id(v, 16, field)
    except Bad:
        if type(v) is str and v.strip().lower().removeprefix("0x") == Z16:
            return None
        raise


_ISO = re.compile(
    r"(\d{4})-(\d\d)-(\d\d)[Tt ](\d\d):(\d\d):(\d\d)(?:[.,](\d{1,9})\d*)?"
    r"(?:([Zz])|([+-])(\d\d):?(\d\d))?"
).fullmatch
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_SEC = timedelta(seconds=1)


def iso_ns(s: str) -> int | None:
    """RFC 3339 / ISO 8601 time (naive = UTC) to Unix nanoseconds, or None.

    >>> iso_ns("1970-01-01T00:00:01.5Z"), iso_ns("1970-01-01T01:00:00+01:00"), iso_ns("x")
    (1500000000, 0, None)
    """
    m = _ISO(s)
    if m is None:
        return None
    y, mo, d, h, mi, se, frac, _z, sign, oh, om = m.groups()
    try:
        dt = datetime(int(y), int(mo), int(d), int(h), int(mi), int(se), tzinfo=timezone.utc)
    except ValueError:
        return None
    secs = (dt - _EPOCH) // _SEC
    if sign:
        off = int(oh) * 3600 + int(om) * 60
        secs = secs - off if sign == "+" else secs + off
    ns = secs * 1_000_000_000 + (int(frac.ljust(9, "0")) if frac else 0)
    return ns if 0 <= ns < U64 else None


def norm_ts(v: Any, field: str) -> int:
    """Slow path for a timestamp: int, integral float, digit string or RFC 3339 string.

    >>> norm_ts("17", "t"), norm_ts(17.0, "t"), norm_ts("1970-01-01T00:00:00.000001Z", "t")
    (17, 17, 1000)
    """
    t = type(v)
    if t is int:
        if 0 <= v < U64:
            return v
    elif t is str:
        s = v.strip()
        if s.isascii() and s.isdigit():
            if len(s) <= 20:
                n = int(s)
                if n < U64:
                    return n
        else:
            n2 = iso_ns(s)
            if n2 is not None:
                return n2
    elif t is float:
        if v.is_integer() and 0 <= v < U64:
            return int(v)
    elif v is None:
        raise Bad("bad_timestamp", f"{field} is missing")
    raise Bad("bad_timestamp", f"{field}: expected non-negative integer nanoseconds")


def norm_kind(k: Any) -> str:
    """Span kind from a string (``SPAN_KIND_CLIENT``, ``client``, ``SpanKind.CLIENT``) or int.

    >>> norm_kind("SPAN_KIND_CLIENT"), norm_kind(2), norm_kind(None), norm_kind([1])
    ('CLIENT', 'SERVER', 'UNSPECIFIED', 'UNSPECIFIED')
    """
    t = type(k)
    if t is str or t is int:
        r = KIND.get(k)
        if r is None and t is str:
            r = KIND.get(k.strip().upper())
        if r is not None:
            return r
    return "UNSPECIFIED"


def norm_status(c: Any) -> str:
    """Status code from a string (``ERROR``, ``STATUS_CODE_ERROR``, ``error``) or int.

    Unknown codes read as ``UNSET``.

    >>> norm_status("STATUS_CODE_ERROR"), norm_status(1), norm_status("weird")
    ('ERROR', 'OK', 'UNSET')
    """
    t = type(c)
    if t is str or t is int:
        r = STATUS.get(c)
        if r is None and t is str:
            r = STATUS.get(c.strip().upper())
        if r is not None:
            return r
    return "UNSET"


def _status_flat(s: Any) -> tuple[str, str]:
    if type(s) is dict:
        c = s.get("code")
        if c is None:
            c = s.get("status_code")
        m = s.get("message")
        if m is None:
            m = s.get("description")
        return norm_status(c), m if type(m) is str else ""
    if s is None:
        return "UNSET", ""
    return norm_status(s), ""


def _all_str(d: dict[str, Any]) -> bool:
    """True if every value is a str, or a dict of str (the SDK ``{"attributes": {...}}`` shape)."""
    for v in d.values():
        if type(v) is not str:
            if type(v) is not dict:
                return False
            for x in v.values():
                if type(x) is not str:
                    return False
    return True


def _events_flat(evs: Any, ctx: Ctx) -> list[SpanEvent]:
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
        t = g("time_unix_nano")
        if t is None:
            t = g("timeUnixNano")
            if t is None:
                t = g("timestamp")
        if type(t) is not int or t < 0:
            t = norm_ts(t, f"events[{j}].time_unix_nano")
        a = g("attributes")
        attrs = attrs_dict(a, ctx, f"events[{j}].attributes", False) if a else {}
        if ctx.trunc:
            name = trunc_str(name, ctx.max_str)
        out.append(SpanEvent(name, t, attrs))
    return out


def flat_span(d: dict[str, Any], ctx: Ctx) -> Span:
    """One flat-JSON span object to a :class:`Span` (raises :class:`Bad`).

    Accepts OTel's own snake_case names, the OpenTelemetry SDK's ``ReadableSpan.to_json()``
    shape (``context``, ``parent_id``, ISO ``start_time``/``end_time``, ``status_code``,
    ``resource.attributes``) and camelCase OTLP-JSON names for a bare span.

    >>> s = flat_span({"context": {"trace_id": "0x" + "ab" * 16, "span_id": "0x" + "cd" * 8},
    ...     "parent_id": None, "name": "x", "kind": "SpanKind.SERVER",
    ...     "start_time": "2024-01-01T00:00:00.000001Z", "end_time": "2024-01-01T00:00:00.000002Z",
    ...     "status": {"status_code": "OK"}, "resource": {"attributes": {"service.name": "s"}}},
    ...     Ctx(DEFAULT_LIMITS, 0))
    >>> s.trace_id == "ab" * 16, s.kind, s.end_ns - s.start_ns, s.resource
    (True, 'SERVER', 1000, {'service.name': 's'})
    """
    g = d.get
    tid = g("trace_id")
    sid = g("span_id")
    if tid is None or sid is None:
        c = g("context")
        if type(c) is dict:
            if tid is None:
                tid = c.get("trace_id")
            if sid is None:
                sid = c.get("span_id")
        if tid is None:
            tid = g("traceId")
        if sid is None:
            sid = g("spanId")
    if not (type(tid) is str and len(tid) == 32 and HEX32(tid) and tid != Z32):
        tid = norm_id(tid, 32, "trace_id")
    if not (type(sid) is str and len(sid) == 16 and HEX16(sid) and sid != Z16):
        sid = norm_id(sid, 16, "span_id")
    p = g("parent_span_id")
    if p is None:
        p = g("parent_id")
        if p is None:
            p = g("parentSpanId")
    if p is not None and not (type(p) is str and len(p) == 16 and HEX16(p) and p != Z16):
        p = norm_parent(p, "parent_span_id")

    name = g("name")
    if type(name) is not str:
        if name is not None:
            raise Bad("bad_span", "name is not a string")
        name = ""
    k = g("kind")
    kind = KIND.get(k) if type(k) is str else None
    if kind is None:
        kind = norm_kind(k)

    st = g("start_time_unix_nano")
    if st is None:
        st = g("startTimeUnixNano")
        if st is None:
            st = g("start_time")
    if type(st) is not int or st < 0:
        st = norm_ts(st, "start_time_unix_nano")
    en = g("end_time_unix_nano")
    if en is None:
        en = g("endTimeUnixNano")
        if en is None:
            en = g("end_time")
    if type(en) is not int or en < 0:
        en = norm_ts(en, "end_time_unix_nano")
    if en < st:
        raise Bad("bad_timestamp", "end_time_unix_nano is before start_time_unix_nano")

    s = g("status")
    if s is None:
        status, msg = "UNSET", ""
    elif type(s) is dict and type(c := s.get("code")) is str and c in STATUS and len(s) == 1:
        status, msg = STATUS[c], ""
    else:
        status, msg = _status_flat(s)

    a = g("attributes")
    attrs = attrs_dict(a, ctx, "attributes", True) if a is not None else {}
    r = g("resource")
    if r is None:
        res: dict[str, Any] = {}
    elif r == ctx.res_raw:  # same resource as the previous span: share its normalized dict
        res = ctx.res
    else:
        raw = r
        if type(r) is dict:
            ra = r.get("attributes")
            if type(ra) is dict or type(ra) is list:  # SDK / OTLP shape {"attributes": {...}}
                r = ra
        res = attrs_dict(r, ctx, "resource", False)
        # Cache only all-string resources: == on str is exact (1 == 1.0 == True is not).  If
        # normalization changed the dict in place, the next original simply will not match.
        if type(raw) is dict and _all_str(raw):
            ctx.res_raw = raw
            ctx.res = res
    e = g("events")
    events = _events_flat(e, ctx) if e else []
    if ctx.trunc:
        name = trunc_str(name, ctx.max_str)
        msg = trunc_str(msg, ctx.max_str)
    return Span(tid, sid, p, name, kind, st, en, status, msg, attrs, res, events)
