"""Every producer's dialect, as data: which attribute carries which span feature.

Agent frameworks instrument themselves in different conventions — the OpenTelemetry GenAI
semantic conventions (today's names and the legacy ones still emitted), OpenInference,
OpenLLMetry/Traceloop, pydantic-ai/Logfire, LiteLLM's OTel loggers, LangSmith's OTel export.
Ingest reads all of them here, once per span, into one :class:`~streams.models.Features` record;
the detectors read only that record.

The module has three parts, all data except two small functions:

* :data:`FEATURES` — per feature, the attribute keys that carry it, in precedence order, each
  tagged with its dialect ("first present wins"; span attributes before resource attributes for
  the identity features).
* :data:`KIND_MARKERS` — dialect span-kind markers that say what a span *is* when it has no
  ``gen_ai.operation.name`` (OpenInference ``TOOL`` → ``execute_tool``, …), and
  :data:`ARGUMENTS` — where each dialect puts a tool call's arguments, and which envelope wraps
  them (per-call noise — call ids, step counters, checkpoint ids — is not part of a fingerprint);
  :data:`REQUESTED` — where a model span's output carries the tool calls the model requested.
* :func:`argument_hash` and :func:`requested_call` (used by the privacy rule at ingest, before
  content is dropped) and :func:`extract` (attributes → :class:`~streams.models.Features`).

:func:`conformance` renders the dialect × feature table the README carries (a test checks that
the README matches it).

>>> from streams.models import Features
>>> f = extract({"openinference.span.kind": "TOOL", "tool.name": "search", "session.id": "s1",
...              "tool.payload_hash": "h"}, {"service.name": "svc"}, "OK", "search", "t1")
>>> f.op, f.tool, f.session, f.tenant, f.arg_hash, f.error
('execute_tool', 'search', 's1', 'svc', 'h', False)
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter
from typing import Any

import orjson

from streams.models import Features

# dialect ids (column order of the README table)
GENAI = "otel-genai"
LEGACY = "otel-genai-legacy"
OI = "openinference"
OLL = "openllmetry"
PAI = "pydantic-ai"
LITELLM = "litellm"
LS = "langsmith"
BW = "breakwater"
DIALECTS = (GENAI, LEGACY, OI, OLL, PAI, LITELLM, LS, BW)
DIALECT_NAMES = {
    GENAI: "OTel GenAI semconv (current)",
    LEGACY: "OTel GenAI semconv (legacy names)",
    OI: "OpenInference",
    OLL: "OpenLLMetry / Traceloop",
    PAI: "pydantic-ai / Logfire",
    LITELLM: "LiteLLM OTel loggers",
    LS: "LangSmith OTel export",
    BW: "Breakwater extensions",
}

# feature -> ((dialect, key), ...) in precedence order.  Several dialects share a key (pydantic-ai
# and LiteLLM emit GenAI semconv names); a key is listed once, under the dialect that defines it,
# and ``SHARED`` says which other dialects emit it.
FEATURES: dict[str, tuple[tuple[str, str], ...]] = {
    "session": (
        (GENAI, "gen_ai.conversation.id"),
        (OI, "session.id"),
        (OLL, "traceloop.association.properties.session_id"),
        (OLL, "traceloop.association.properties.thread_id"),
        (LS, "langsmith.metadata.session_id"),
        (LS, "langsmith.metadata.thread_id"),
        (LS, "langsmith.metadata.conversation_id"),
        (LITELLM, "metadata.session_id"),
        (LITELLM, "litellm.session_id"),
        (LITELLM, "litellm.trace_id"),
    ),
    "tenant": (
        (BW, "tenant.id"),
        (BW, "tenant.hash"),
        (OLL, "traceloop.association.properties.tenant_id"),
        (LS, "langsmith.metadata.tenant_id"),
    ),
    "workflow": (
        (BW, "workflow.id"),
        (BW, "workflow.run_id"),
    ),
    "operation": (
        (GENAI, "gen_ai.operation.name"),
    ),
    "tool": (
        (GENAI, "gen_ai.tool.name"),
        (OI, "tool.name"),
        (OI, "tool_call.function.name"),
    ),
    "arguments": (
        (BW, "tool.payload_hash"),
    ),
    "requested": (
        (BW, "tool.requested.name"),
        (BW, "tool.requested.payload_hash"),
    ),
    "provider": (
        (GENAI, "gen_ai.provider.name"),
        (LEGACY, "gen_ai.system"),
        (OI, "llm.provider"),
        (OI, "llm.system"),
    ),
    "request_model": (
        (GENAI, "gen_ai.request.model"),
    ),
    "response_model": (
        (GENAI, "gen_ai.response.model"),
        (OI, "llm.model_name"),
    ),
    "input_tokens": (
        (GENAI, "gen_ai.usage.input_tokens"),
        (LEGACY, "gen_ai.usage.prompt_tokens"),
        (OI, "llm.token_count.prompt"),
    ),
    "output_tokens": (
        (GENAI, "gen_ai.usage.output_tokens"),
        (LEGACY, "gen_ai.usage.completion_tokens"),
        (OI, "llm.token_count.completion"),
    ),
    "cached_tokens": (
        (GENAI, "gen_ai.usage.cache_read.input_tokens"),
        (GENAI, "gen_ai.usage.cache_read_input_tokens"),
        (GENAI, "gen_ai.usage.input_tokens.cached"),
        (OI, "llm.token_count.prompt_details.cache_read"),
    ),
    "cost": (
        (GENAI, "gen_ai.usage.cost"),
        (GENAI, "gen_ai.usage.cost.amount"),
        (BW, "usage.cost.total"),
        (OI, "llm.cost.total"),
        (PAI, "operation.cost"),
        (LITELLM, "gen_ai.cost.total_cost"),
        (LITELLM, "litellm.cost.total"),
        (LITELLM, "llm.response.cost"),
    ),
    "resend": (
        (GENAI, "http.request.resend_count"),
    ),
    "attempt": (
        (BW, "retry.attempt"),
        (PAI, "pydantic_ai.model_request.attempt"),
    ),
    "error": (
        (GENAI, "error.type"),
    ),
    "mutation": (
        (BW, "tool.action_class"),
    ),
    "verified": (
        (BW, "tool.verification_status"),
    ),
    "outcome": (
        (BW, "agent.outcome"),
    ),
    "approval": (
        (BW, "approval.status"),
    ),
    "state_hash": (
        (BW, "agent.state_hash"),
    ),
}
# Identity features: span attributes first, then resource attributes.
RESOURCE_TOO = frozenset({"session", "tenant", "workflow", "operation", "provider"})

# A key listed under one dialect that other dialects emit as well (for the conformance table).
SHARED: dict[str, tuple[str, ...]] = {
    "gen_ai.operation.name": (PAI, LITELLM, LS),
    "gen_ai.tool.name": (PAI,),
    "gen_ai.provider.name": (PAI, LITELLM),
    "gen_ai.system": (OLL, PAI, LITELLM, LS),
    "gen_ai.request.model": (LEGACY, OLL, PAI, LITELLM, LS),
    "gen_ai.response.model": (LEGACY, OLL, PAI, LITELLM, LS),
    "gen_ai.usage.input_tokens": (OLL, PAI, LITELLM, LS),
    "gen_ai.usage.output_tokens": (OLL, PAI, LITELLM, LS),
    "gen_ai.usage.prompt_tokens": (OLL, LITELLM),
    "gen_ai.usage.completion_tokens": (OLL, LITELLM),
    "error.type": (PAI,),
    "gen_ai.conversation.id": (PAI, LITELLM),
    "llm.cost.total": (LITELLM,),
    "llm.token_count.prompt": (LITELLM,),
    "llm.token_count.completion": (LITELLM,),
    "llm.model_name": (LITELLM,),
}

# Span-kind markers: (dialect, key, {value (lower-cased): canonical operation}).  A value mapped to
# "" says "known, but no operation the detectors care about" (a chain, a retriever…).
KIND_MARKERS: tuple[tuple[str, str, dict[str, str]], ...] = (
    (OI, "openinference.span.kind", {
        "llm": "chat", "tool": "execute_tool", "agent": "invoke_agent", "embedding": "embeddings",
        "chain": "", "retriever": "", "reranker": "", "guardrail": "", "evaluator": "",
    }),
    (OLL, "traceloop.span.kind", {
        "tool": "execute_tool", "agent": "invoke_agent", "workflow": "", "task": "",
    }),
    (OLL, "llm.request.type", {
        "chat": "chat", "completion": "text_completion", "embedding": "embeddings", "rerank": "",
    }),
    (LS, "langsmith.span.kind", {
        "llm": "chat", "tool": "execute_tool", "chain": "", "retriever": "", "prompt": "",
        "parser": "", "embedding": "embeddings",
    }),
)

# Tool names some dialects only carry as the entity / span name of a tool span.
TOOL_NAME_FALLBACK: tuple[tuple[str, str], ...] = (
    (OLL, "traceloop.entity.name"),
    (LS, "langsmith.trace.name"),
)

# Where a dialect puts a tool call's arguments: (dialect, key, only on tool spans?, envelope).
# envelope: "" = the value is the arguments (JSON text or a value); "traceloop" = OpenLLMetry's
# ``{"inputs": …, "tags": …, "metadata": …, "kwargs": …}`` (the arguments are ``inputs``);
# "inputs" = LangSmith's ``{"inputs": …}`` / ``{"input": …}``.
ARGUMENTS: tuple[tuple[str, str, bool, str], ...] = (
    (GENAI, "gen_ai.tool.call.arguments", False, ""),
    (PAI, "tool_arguments", False, ""),
    (OI, "input.value", True, ""),
    (OLL, "traceloop.entity.input", True, "traceloop"),
    (LS, "gen_ai.prompt", True, "inputs"),
)
# Keys inside an argument envelope that differ per call although the call is the same.
# Only names no tool would take as a real argument: a tool's own ``id`` or ``step`` must stay part of
# its fingerprint, or two different calls would look identical (a false loop).
NOISE_KEYS = frozenset({
    "tool_call_id", "run_id", "parent_run_id", "callbacks", "run_manager", "langgraph_step",
    "langgraph_node", "langgraph_triggers", "langgraph_path", "langgraph_checkpoint_ns",
    "checkpoint_id", "checkpoint_ns",
})
NOISE_PREFIXES = ("__pregel_", "langgraph_", "checkpoint_")

# Where a model span carries the tool calls the model *requested* (its output), in precedence order:
# (dialect, key or key prefix, shape).  "messages": a JSON list of output messages, OpenAI's raw
# ``{"role", "content", "tool_calls": [{"id", "type", "function": {"name", "arguments"}}]}`` (also its
# older ``function_call``) or GenAI's ``{"role", "parts": [{"type": "tool_call", "name", "arguments"}]}``;
# "flat": flattened ``….<n>.name`` / ``….<n>.arguments`` keys under the prefix.  The first source that
# holds a call wins.  Derived at ingest, inside the privacy rule (the sources are content), into
# ``tool.requested.name`` / ``tool.requested.payload_hash``.
REQUESTED: tuple[tuple[str, str, str], ...] = (
    (GENAI, "gen_ai.output.messages", "messages"),
    (OI, "llm.output_messages.", "flat"),
    (LEGACY, "gen_ai.completion.", "flat"),
)
REQ_NAME_KEY = "tool.requested.name"
REQ_HASH_KEY = "tool.requested.payload_hash"
MAX_REQUESTED = 64  # calls read per span (in document order); more is no agent, it is an attack
_REQ_FLAT = re.compile(
    r"(?:llm\.output_messages\.\d+\.message\.tool_calls\.\d+\.tool_call\.function"
    r"|gen_ai\.completion\.\d+\.(?:function_call|tool_calls\.\d+))\.name"
).fullmatch

# Derived features (what a dialect gives only indirectly), for the conformance table.
DERIVED: dict[tuple[str, str], str] = {
    (OI, "operation"): "from `openinference.span.kind`",
    (OLL, "operation"): "from `traceloop.span.kind`, `llm.request.type`",
    (LS, "operation"): "from `langsmith.span.kind`",
    (OLL, "tool"): "`traceloop.entity.name` of a tool span",
    (LS, "tool"): "the name of a tool span",
    (OI, "arguments"): "hash of `input.value` of a TOOL span",
    (OLL, "arguments"): "hash of `traceloop.entity.input` → `inputs` of a tool span",
    (PAI, "arguments"): "hash of `tool_arguments` / `gen_ai.tool.call.arguments`",
    (GENAI, "arguments"): "hash of `gen_ai.tool.call.arguments`",
    (LS, "arguments"): "hash of `gen_ai.prompt` → inputs of a tool span",
    (GENAI, "error"): "status `ERROR`, or an `exception` event",
    (OI, "error"): "status `ERROR`, or an `exception` event",
    (OLL, "error"): "status `ERROR`, or an `exception` event",
    (PAI, "error"): "status `ERROR`, or an `exception` event",
    (LITELLM, "error"): "status `ERROR`, or an `exception` event",
    (LS, "error"): "an `exception` event (its roots can end `OK` after failing), or status `ERROR`",
    (LEGACY, "error"): "status `ERROR`, or an `exception` event",
    (OI, "request_model"): "`model` in `llm.invocation_parameters` (failed calls have no `llm.model_name`)",
    (PAI, "attempt"): "`pydantic_ai.model_request.attempt` k (0-based, a failed attempt that was retried) is retry k + 1",
    (GENAI, "cost"): "else tokens × default prices (genai-prices) or the policy's table",
    (GENAI, "requested"): "name and argument hash of the `tool_calls` / `tool_call` parts in `gen_ai.output.messages`",
    (LEGACY, "requested"): "from `gen_ai.completion.N.function_call.*`, `gen_ai.completion.N.tool_calls.M.*`",
    (OI, "requested"): "from `llm.output_messages.N.message.tool_calls.M.tool_call.function.*`",
    (OLL, "requested"): "from `gen_ai.output.messages`",
    (PAI, "requested"): "from `gen_ai.output.messages`",
    (LITELLM, "requested"): "from `gen_ai.output.messages` (V2, with content capture), "
                            "`llm.output_messages.*` (Arize/Phoenix), `gen_ai.completion.N.function_call.*`",
}
for _d in (LEGACY, OI, OLL, PAI, LITELLM, LS):
    DERIVED.setdefault((_d, "cost"), "else tokens × prices")

MUTATION_CLASSES = frozenset({"mutation", "non_idempotent_mutation", "high_risk_mutation"})
MAX_TOKENS = 10**9  # tokens per span beyond this are no count (a corrupt or hostile value)
MAX_SPAN_COST_USD = 1e5  # a reported cost per span beyond this is no cost (1e300 would overflow sums)
MAX_ORDINAL = 10**6
MAX_IDENT = 128  # identifiers that can reach incidents (tool, session, route parts…) are capped here

BAD_VALUES: Counter[str] = Counter()
"""Values ingest refused, by feature (non-numeric, negative, non-finite or absurd numbers): the
span is kept, the value is treated as absent. Replay reports them; the worker exports them."""

# Secret-shaped tokens that must not become an identifier in an incident (API keys, bearer tokens,
# JWTs, cloud keys): the identifier is replaced by a hash of itself.
_SECRET = re.compile(
    r"(?:\bsk-[A-Za-z0-9_-]{8,}|\bBearer\s+\S{8,}|\beyJ[A-Za-z0-9_-]{10,}\.|\bAKIA[0-9A-Z]{12,}"
    r"|\bgh[pousr]_[A-Za-z0-9]{20,}|\bxox[abprs]-[A-Za-z0-9-]{10,}|\bAIza[0-9A-Za-z_-]{20,})"
).search


def _digest(s: str) -> str:
    return hashlib.blake2b(s.encode("utf-8", "surrogatepass"), digest_size=6).hexdigest()


def ident(v: Any) -> str | None:
    """An identifier safe to put in an incident: at most ``MAX_IDENT`` characters (a longer one
    keeps its head and a hash of the whole), and never a secret-shaped token (replaced by
    ``redacted-<hash>``).

    >>> ident("search"), len(ident("x" * 10_000)), ident("key sk-proj-abcdefghijkl")
    ('search', 128, 'redacted-f4d59d091637')
    """
    if v is None:
        return None
    s = v if type(v) is str else str(v)
    if len(s) > 16 and _SECRET(s):
        return "redacted-" + _digest(s)
    if len(s) > MAX_IDENT:
        return s[: MAX_IDENT - 14] + "~" + _digest(s) + "~"
    return s

_K = {f: tuple(k for _, k in srcs) for f, srcs in FEATURES.items()}
_MARKERS = tuple((k, m) for _, k, m in KIND_MARKERS)
_MARKER_KEYS = frozenset(k for k, _ in _MARKERS)
_TOOL_FALLBACK = tuple(k for _, k in TOOL_NAME_FALLBACK)
_ARG_KEYS = frozenset(k for _, k, _, _ in ARGUMENTS)


# ------------------------------------------------------------------------------ tool arguments


def _is_tool_attrs(a: dict[str, Any]) -> bool:
    if a.get("gen_ai.operation.name") == "execute_tool":
        return True
    for k, m in _MARKERS:
        v = a.get(k)
        if v is not None and type(v) is str and m.get(v.lower()) == "execute_tool":
            return True
    return False


def _loads(v: Any) -> Any:
    if isinstance(v, str | bytes):
        s = v.strip() if isinstance(v, str) else v.strip()
        if s[:1] in ("{", "[", b"{", b"[") or s[:1] == '"':
            try:
                return orjson.loads(s)
            except orjson.JSONDecodeError:
                return v
    return v


def _denoise(v: Any) -> Any:
    """Drop per-call noise keys from an argument object (one level, and a LangChain ToolCall)."""
    if type(v) is dict:
        if "args" in v and "name" in v and ("id" in v or v.get("type") == "tool_call"):
            v = v["args"]  # a LangChain ToolCall: only its args are the call
            if type(v) is not dict:
                return v
        return {k: x for k, x in v.items() if k not in NOISE_KEYS and not k.startswith(NOISE_PREFIXES)}
    return v


_TRACELOOP_ENVELOPE = frozenset({"inputs", "input_str", "tags", "metadata", "kwargs"})


def _unwrap(v: Any, envelope: str) -> Any:
    v = _loads(v)
    if type(v) is dict and "inputs" in v and len(v.keys() & _TRACELOOP_ENVELOPE) > 1:
        # OpenLLMetry's LangChain envelope, under any key (it also copies it into
        # gen_ai.tool.call.arguments): per-call step counters and ids around the real ``inputs``
        v = _loads(v["inputs"])
    elif envelope == "traceloop" and type(v) is dict:
        if "inputs" in v:
            v = _loads(v["inputs"])
        elif v.keys() <= {"args", "kwargs"}:  # Traceloop's decorators: the call's args and kwargs
            args, kw = v.get("args"), v.get("kwargs")
            v = {"args": args or [], "kwargs": _denoise(kw) if type(kw) is dict else kw}
    elif envelope == "inputs" and type(v) is dict:
        for k in ("inputs", "input"):
            if k in v:
                v = _loads(v[k])
                break
    if type(v) is dict and len(v) == 1:
        (k, inner), = v.items()
        if k in ("input", "inputs", "tool_input", "arguments"):  # a one-key wrapper of the real args
            v = _loads(inner)
    return _denoise(v)


def argument_hash(a: dict[str, Any], canonical_hash: Any) -> str | None:
    """The fingerprint of a tool call's arguments from whichever dialect carries them, or None.

    Runs at ingest on the raw attributes (before content is dropped).

    >>> from streams.semconv import canonical_hash as h
    >>> oll = {"traceloop.span.kind": "tool", "traceloop.entity.input":
    ...        '{"inputs": {"q": "x", "tool_call_id": "c1"}, "tags": [], "metadata": {"langgraph_step": 3}}'}
    >>> argument_hash(oll, h) == h({"q": "x"})
    True
    >>> argument_hash({"openinference.span.kind": "LLM", "input.value": "a prompt"}, h) is None
    True
    """
    tool = None
    for _, key, tool_only, envelope in ARGUMENTS:
        v = a.get(key)
        if v is None:
            continue
        if tool_only:
            if tool is None:
                tool = _is_tool_attrs(a)
            if not tool:
                continue
        return canonical_hash(_unwrap(v, envelope))
    return None


def _message_calls(v: Any, out: list[tuple[Any, Any]]) -> None:
    v = _loads(v)
    if type(v) is dict:
        v = [v]
    if type(v) is not list:
        return
    for m in v:
        if type(m) is not dict:
            continue
        tcs = m.get("tool_calls")
        if type(tcs) is list:
            for tc in tcs:
                if type(tc) is dict:
                    fn = tc.get("function")
                    if type(fn) is dict:
                        out.append((fn.get("name"), fn.get("arguments")))
                    elif "name" in tc:
                        out.append((tc.get("name"), tc.get("arguments", tc.get("args"))))
        fc = m.get("function_call")
        if type(fc) is dict:
            out.append((fc.get("name"), fc.get("arguments")))
        parts = m.get("parts")
        if type(parts) is list:
            for p in parts:
                if type(p) is dict and p.get("type") == "tool_call":
                    out.append((p.get("name"), p.get("arguments")))


def requested_call(a: dict[str, Any], canonical_hash: Any,
                   keys: Any = None) -> tuple[str, str] | None:
    """The tool call(s) a model span's output requested, as (name, argument hash), or None.

    Runs at ingest on the raw attributes (before content is dropped); ``keys``: the span's content
    keys when the caller has them (the flat sources are only looked for among them).  One call:
    its name and ``canonical_hash`` of its parsed arguments (what a tool span of the same call would
    hash).  Several calls in one output: one combined fingerprint — the names joined by ``+`` and a
    hash of the (name, argument hash) pairs, both sorted, so a turn counts as a repeat only when it
    requests the same set of calls again (in any order); the first call alone would make a model
    paging with parallel calls (``get(A), get(B)`` then ``get(A), get(C)``) look like a loop.

    >>> from streams.semconv import canonical_hash as h
    >>> oai = [{"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
    ...         "function": {"name": "get", "arguments": '{"id": 1}'}}]}]
    >>> requested_call({"gen_ai.output.messages": oai}, h) == ("get", h({"id": 1}))
    True
    >>> oi = {"llm.output_messages.0.message.tool_calls.0.tool_call.function.name": "get",
    ...       "llm.output_messages.0.message.tool_calls.0.tool_call.function.arguments": '{"id": 1}'}
    >>> requested_call(oi, h) == ("get", h({"id": 1}))
    True
    >>> requested_call({"gen_ai.output.messages": '[{"role": "assistant", "content": "hi"}]'}, h) is None
    True
    """
    calls: list[tuple[Any, Any]] = []
    for _, key, shape in REQUESTED:
        if shape == "messages":
            v = a.get(key)
            if v is not None:
                _message_calls(v, calls)
        else:
            for k in a if keys is None else keys:
                if k.startswith(key) and k.endswith(".name") and _REQ_FLAT(k):
                    calls.append((a[k], a.get(k[:-4] + "arguments")))
        if calls:
            break
    pairs = []
    for name, args in calls[:MAX_REQUESTED]:
        if name is None or name == "" or type(name) in (dict, list):
            continue
        pairs.append((ident(name), canonical_hash(args)))
    if not pairs:
        return None
    if len(pairs) == 1:
        return pairs[0]  # type: ignore[return-value]
    pairs.sort()
    return ident("+".join(n for n, _ in pairs)), canonical_hash(pairs)  # type: ignore[return-value]


# ------------------------------------------------------------------------------ the record


def _first(keys: tuple[str, ...], a: dict[str, Any]) -> Any:
    for k in keys:
        v = a.get(k)
        if v is not None and v != "":
            return v
    return None


def _str(v: Any) -> str | None:
    if v is None:
        return None
    return v if type(v) is str else str(v)


def _count(v: Any, feature: str) -> int:
    """A non-negative token count, or 0 (non-numeric, negative, non-finite or absurd values are
    counted in :data:`BAD_VALUES`)."""
    if v is None:
        return 0
    t = type(v)
    if t is int and 0 <= v <= MAX_TOKENS:
        return v
    if t is float or t is str:
        try:
            f = float(v)
        except ValueError:
            f = -1.0
        if 0 <= f <= MAX_TOKENS:
            return int(f)
    BAD_VALUES[feature] += 1
    return 0


def _money(v: Any) -> float | None:
    if v is None:
        return None
    t = type(v)
    f = -1.0
    if t is int or t is float:
        f = float(v) if v < 1e300 or t is float else -1.0
    elif t is str:
        try:
            f = float(v)
        except ValueError:
            pass
    if 0 <= f <= MAX_SPAN_COST_USD and math.isfinite(f):
        return f
    BAD_VALUES["cost"] += 1
    return None


def _ordinal(v: Any) -> int:
    if v is None:
        return -1
    t = type(v)
    if t is int and 0 <= v <= MAX_ORDINAL:
        return v
    if t is not bool:
        try:
            f = float(v)
        except (TypeError, ValueError):
            f = -1.0
        if 0 <= f <= MAX_ORDINAL:
            return int(f)
    BAD_VALUES["retry_ordinal"] += 1
    return -1


def operation_of(a: dict[str, Any], r: dict[str, Any]) -> str | None:
    """The canonical operation: ``gen_ai.operation.name``, else a dialect's span-kind marker."""
    v = a.get("gen_ai.operation.name")
    if v is not None and v != "":
        return _str(v)
    if _MARKER_KEYS.isdisjoint(a):
        v = r.get("gen_ai.operation.name")
        return _str(v) if v is not None and v != "" else None
    for k, m in _MARKERS:
        v = a.get(k)
        if v is not None:
            op = m.get(str(v).lower())
            if op:
                return op
    v = r.get("gen_ai.operation.name")
    return _str(v) if v is not None and v != "" else None


_SESSION, _TENANT, _WORKFLOW = _K["session"], _K["tenant"], _K["workflow"]
_TOOL, _PROVIDER, _REQ, _RESP = _K["tool"], _K["provider"], _K["request_model"], _K["response_model"]
_IN, _OUT, _CACHED, _COST = _K["input_tokens"], _K["output_tokens"], _K["cached_tokens"], _K["cost"]
_ATTEMPT = _K["attempt"]
_NOT_MODEL_OPS = frozenset({"execute_tool", "invoke_agent", "create_agent"})


def _invocation_model(a: dict[str, Any]) -> Any:
    v = a.get("llm.invocation_parameters")
    if type(v) is str and '"model"' in v:
        try:
            d = orjson.loads(v)
        except orjson.JSONDecodeError:
            return None
        return d.get("model") if type(d) is dict else None
    return None


def extract(a: dict[str, Any], r: dict[str, Any], status: str, name: str, trace_id: str,
            events: Any = ()) -> Features:
    """Attributes (already scrubbed) and resource of one span → its :class:`Features`.

    >>> f = extract({"gen_ai.system": "openai", "llm.request.type": "chat", "gen_ai.request.model": "gpt-4o",
    ...              "gen_ai.usage.prompt_tokens": 10, "gen_ai.usage.completion_tokens": "5"}, {}, "OK", "x", "t")
    >>> f.op, f.provider, f.request_model, f.input_tokens, f.output_tokens, f.session
    ('chat', 'openai', 'gpt-4o', 10, 5, 't')
    """
    session = _first(_SESSION, a)
    if session is None:
        session = _first(_SESSION, r) if r else None
    tenant = _first(_TENANT, a)
    if tenant is None:
        tenant = (_first(_TENANT, r) if r else None) or a.get("service.name") or r.get("service.name")
    workflow = _first(_WORKFLOW, a)
    if workflow is None and r:
        workflow = _first(_WORKFLOW, r)
    op = operation_of(a, r)
    tool = _first(_TOOL, a)
    if tool is None:
        if op == "execute_tool":
            tool = _first(_TOOL_FALLBACK, a) or name
    elif op is None:
        op = "execute_tool"  # a tool name and no operation (pydantic-ai before 1.0, …): a tool call
    provider = _first(_PROVIDER, a)
    if provider is None and r:
        provider = _first(_PROVIDER, r)
    resend = _ordinal(a.get("http.request.resend_count"))
    attempt = _ordinal(_first(_ATTEMPT, a))
    if attempt >= 0 and "pydantic_ai.model_request.attempt" in a and "retry.attempt" not in a:
        # pydantic-ai exports a span only for an attempt that failed and was retried (the last
        # attempt is the model span itself): its 0-based attempt k stands for retry k + 1
        attempt += 1
    ac = a.get("tool.action_class")
    vs = a.get("tool.verification_status")
    outcome = a.get("agent.outcome")
    approval = a.get("approval.status")
    sh = a.get("agent.state_hash")
    req_tool = req_hash = None
    if tool is None and op not in _NOT_MODEL_OPS:  # a tool or agent span requested nothing
        v = a.get(REQ_NAME_KEY)
        if v is not None and v != "":
            req_tool, req_hash = ident(v), ident(a.get(REQ_HASH_KEY))
    return Features(
        ident(session) if session is not None else trace_id,
        ident(tenant),
        ident(workflow) if workflow is not None else trace_id,
        ident(op),
        ident(tool),
        ident(a.get("tool.payload_hash")),
        ident(provider),
        ident(_first(_REQ, a) or _invocation_model(a) or a.get("llm.model_name")),
        ident(_first(_RESP, a)),
        _count(_first(_IN, a), "input_tokens"),
        _count(_first(_OUT, a), "output_tokens"),
        _count(_first(_CACHED, a), "cached_tokens"),
        _money(_first(_COST, a)),
        resend,
        attempt,
        status == "ERROR" or a.get("error.type") is not None
        or (bool(events) and any(e.name == "exception" for e in events)),
        type(ac) is str and ac in MUTATION_CLASSES,
        type(vs) is str and vs.lower() == "verified",
        ident(str(outcome).lower()) if outcome is not None and outcome != "" else None,
        ident(str(approval).upper()) if approval is not None and approval != "" else None,
        ident(sh),
        req_tool,
        req_hash,
    )


# ------------------------------------------------------------------------------ the table


FEATURE_NAMES = {
    "session": "session", "tenant": "tenant", "workflow": "workflow", "operation": "operation / span kind",
    "tool": "tool name", "arguments": "tool-argument fingerprint", "provider": "provider",
    "request_model": "model (request)", "response_model": "model (response)",
    "input_tokens": "input tokens", "output_tokens": "output tokens", "cached_tokens": "cached input tokens",
    "cost": "cost (USD)", "resend": "retry ordinal (HTTP resend)", "attempt": "retry attempt",
    "error": "error", "mutation": "mutation class", "verified": "verification", "outcome": "outcome",
    "approval": "approval", "state_hash": "state hash", "requested": "tool call requested by the model",
}


def conformance() -> str:
    """The dialect × feature table (Markdown): the keys read, what is derived, ``—`` not available.

    >>> conformance().splitlines()[0].startswith("| feature |")
    True
    """
    cells: dict[tuple[str, str], list[str]] = {}
    for feat, srcs in FEATURES.items():
        for d, k in srcs:
            cells.setdefault((feat, d), []).append(f"`{k}`")
            for other in SHARED.get(k, ()):
                cells.setdefault((feat, other), []).append(f"`{k}`")
    head = "| feature | " + " | ".join(DIALECT_NAMES[d] for d in DIALECTS) + " |"
    out = [head, "|" + "---|" * (len(DIALECTS) + 1)]
    for feat in FEATURES:
        row = [FEATURE_NAMES[feat]]
        for d in DIALECTS:
            parts = list(dict.fromkeys(cells.get((feat, d), [])))
            der = DERIVED.get((d, feat))
            txt = ", ".join(parts)
            if der:
                txt = f"{txt}; {der}" if txt else f"derived: {der}"
            row.append(txt or "—")
        out.append("| " + " | ".join(row) + " |")
    return "\n".join(out)
