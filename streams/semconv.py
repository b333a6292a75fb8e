"""What the detectors read from a span (README "What producers send" attribute table), in one place.

Every function takes a normalized :class:`~streams.models.Span` and applies "first present wins",
span attributes before resource attributes.

>>> from streams.models import Features, Span
>>> s = Span("ab" * 16, "cd" * 8, None, "execute_tool search", "INTERNAL", 0, 10, "OK", "",
...          {"gen_ai.tool.name": "search", "tool.payload_hash": "h1", "session.id": "s1"},
...          {"service.name": "svc"})
>>> session_of(s), tenant_of(s), fingerprint_of(s)
('s1', 'svc', ('search', 'h1'))
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

from streams.models import Span

MUTATION_CLASSES = frozenset({"mutation", "non_idempotent_mutation", "high_risk_mutation"})

# Attributes that carry raw content. Ingest drops them (after hashing tool arguments), so they never
# reach detector state, incidents, logs or metrics.
SENSITIVE_KEYS = frozenset(
    {
        "gen_ai.prompt",
        "gen_ai.completion",
        "gen_ai.input.messages",
        "gen_ai.output.messages",
        "gen_ai.system_instructions",
        "gen_ai.tool.call.arguments",
        "gen_ai.tool.call.result",
        "gen_ai.tool.definitions",
        "llm.prompts",
        "llm.completions",
        "input.value",
        "output.value",
        "traceloop.entity.input",
        "traceloop.entity.output",
        "llm.prompt_template.variables",
        # exception and error details carry prompts, keys and paths in practice (the type stays)
        "exception.message",
        "exception.stacktrace",
        "error.message",
        "error.stack_trace",
        "litellm.provider.error.stack_trace",
        # pydantic-ai / Logfire
        "tool_arguments",
        "tool_response",
        "final_result",
        "all_messages_events",
        "pydantic_ai.all_messages",
    }
)
SENSITIVE_PREFIXES = (
    "gen_ai.prompt.",
    "gen_ai.completion.",
    "gen_ai.input.messages.",
    "gen_ai.output.messages.",
    "gen_ai.tool.call.arguments.",
    "gen_ai.tool.call.result.",
    "llm.input_messages.",
    "llm.output_messages.",
    "llm.prompts.",
    "llm.completions.",
    "gen_ai.system_instructions.",
    "gen_ai.tool.definitions.",
    "input.value.",
    "output.value.",
)


def is_sensitive(key: str) -> bool:
    """True for attribute keys that carry raw prompts, completions or tool arguments.

    >>> is_sensitive("gen_ai.prompt.0.content"), is_sensitive("gen_ai.tool.name")
    (True, False)
    """
    return key in SENSITIVE_KEYS or key.startswith(SENSITIVE_PREFIXES)


def canonical_hash(value: Any) -> str:
    """Stable 16-hex-digit hash of a value; JSON strings are parsed and canonicalized first.

    >>> canonical_hash('{"b": 1, "a": 2}') == canonical_hash({"a": 2, "b": 1})
    True
    """
    if isinstance(value, str | bytes):
        try:
            value = orjson.loads(value)
        except orjson.JSONDecodeError:
            pass
    try:
        data = orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    except TypeError:
        data = repr(value).encode()
    return hashlib.blake2b(data, digest_size=8).hexdigest()


# Every accessor below reads the span's :class:`~streams.models.Features` record, made once per
# span from whichever dialect it speaks (:mod:`streams.ingest.dialects`); none reads raw attributes.


def features(span: Span) -> Features:
    """The span's features record, made on first use and kept on the span.

    >>> from streams.models import Span
    >>> s = Span("t", "s", None, "x", "CLIENT", 0, 1, "OK", "", {"llm.token_count.prompt": 7}, {})
    >>> features(s).input_tokens, features(s) is s.feat
    (7, True)
    """
    f = span.feat
    if f is None:
        f = span.feat = _extract(span.attributes, span.resource, span.status, span.name, span.trace_id,
                                 span.events)
    return f


def session_of(span: Span) -> str:
    f = span.feat
    return (f if f is not None else features(span)).session


def tenant_of(span: Span) -> str | None:
    f = span.feat
    return (f if f is not None else features(span)).tenant


def workflow_of(span: Span) -> str:
    f = span.feat
    return (f if f is not None else features(span)).workflow


def operation_of(span: Span) -> str | None:
    f = span.feat
    return (f if f is not None else features(span)).op


def tool_name_of(span: Span) -> str | None:
    return features(span).tool


def is_tool_call(span: Span) -> bool:
    f = span.feat
    if f is None:
        f = features(span)
    return f.tool is not None or f.op == "execute_tool"


def requested_call_of(span: Span) -> tuple[str, str | None] | None:
    """(tool name, argument hash) of the tool call(s) a model span's output requested, or None
    (tool and agent spans requested nothing). A request is not an execution: it is no tool call
    (:func:`is_tool_call` stays False, the span stays a model call for cost).

    >>> from streams.models import Span
    >>> s = Span("t", "s", None, "chat", "CLIENT", 0, 1, "OK", "", {"gen_ai.operation.name": "chat",
    ...          "tool.requested.name": "get", "tool.requested.payload_hash": "h1"}, {})
    >>> requested_call_of(s), is_tool_call(s), is_model_call(s)
    (('get', 'h1'), False, True)
    """
    f = span.feat
    if f is None:
        f = features(span)
    return None if f.req_tool is None else (f.req_tool, f.req_hash)


def fingerprint_of(span: Span) -> tuple[str, str | None]:
    """(tool name, argument hash or None). Ingest has already hashed raw arguments."""
    f = features(span)
    return (f.tool or span.name, f.arg_hash)


def state_hash_of(span: Span) -> str | None:
    return features(span).state_hash


def is_error(span: Span) -> bool:
    f = span.feat
    return (f if f is not None else features(span)).error


def is_mutation(span: Span) -> bool:
    return features(span).mutation


def _num(v: Any) -> float | None:
    if v is None:
        return None
    t = type(v)
    if t is int or t is float:
        return float(v)
    if isinstance(v, bool):
        return None
    if isinstance(v, int | float):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return None
    return None


def tokens_of(span: Span) -> tuple[int, int]:
    f = features(span)
    return f.input_tokens, f.output_tokens


def reported_cost_of(span: Span) -> float | None:
    """Cost in USD as reported on the span (any dialect), or None (pricing by tokens is the policy's job)."""
    return features(span).cost


def is_retry(span: Span) -> bool:
    f = features(span)
    return f.resend > 0 or f.attempt > 0


def _route(f: Features) -> str | None:
    if f.tool is not None:
        return f"tool:{f.tool}"
    model = f.request_model or f.response_model
    if f.provider is None and model is None:
        return None
    return f"{f.provider or '-'}/{model or '-'}"


def route_of(span: Span) -> str | None:
    return _route(features(span))


# ----------------------------------------------------------------------------- retries and cost
# (added for retry_storm and cost_velocity, README "Detectors")

AGENT_OPERATIONS = frozenset({"invoke_agent", "create_agent"})
MODEL_OPERATIONS = frozenset({"chat", "text_completion", "generate_content", "embeddings"})


def retry_count_of(span: Span) -> int:
    """Retries one span stands for by its own attributes: 1 when its retry ordinal
    (``http.request.resend_count`` or ``retry.attempt``) is > 0, whatever the ordinal — an ordinal
    numbers one request's resends, so summing ordinals would count 1 + 2 + 3 for three retries.
    (A chain whose earlier attempts were not exported counts its highest ordinal: the session's
    retry tracker adds the missing ones, see :class:`streams.detectors.retry.ImplicitRetryTracker`.)

    >>> from streams.models import Span
    >>> mk = lambda a: Span("t", "s", None, "x", "CLIENT", 0, 1, "OK", "", a, {})
    >>> retry_count_of(mk({"http.request.resend_count": 2})), retry_count_of(mk({"retry.attempt": 3}))
    (1, 1)
    >>> retry_count_of(mk({})), retry_count_of(mk({"http.request.resend_count": 0}))
    (0, 0)
    """
    f = span.feat
    if f is None:
        f = features(span)
    return 1 if f.resend > 0 or f.attempt > 0 else 0


def retry_ordinal_of(span: Span) -> int:
    """The span's retry ordinal (the larger of resend count and attempt), -1 when it has none."""
    f = features(span)
    return f.resend if f.resend >= f.attempt else f.attempt


def is_agent_span(span: Span) -> bool:
    """``invoke_agent`` / ``create_agent`` spans: they summarize their children, they are no call."""
    return features(span).op in AGENT_OPERATIONS


def call_route_of(span: Span) -> str | None:
    """The route of a *call* (a tool or model call), or None; agent spans are no call.

    >>> from streams.models import Span
    >>> mk = lambda a: Span("t", "s", None, "x", "CLIENT", 0, 1, "OK", "", a, {})
    >>> call_route_of(mk({"gen_ai.provider.name": "openai", "gen_ai.request.model": "gpt-4o"}))
    'openai/gpt-4o'
    >>> call_route_of(mk({"gen_ai.operation.name": "invoke_agent", "gen_ai.request.model": "gpt-4o"})) is None
    True
    """
    f = span.feat
    if f is None:
        f = features(span)
    if f.op in AGENT_OPERATIONS:
        return None
    if f.tool is None and f.op == "execute_tool":
        return f"tool:{span.name}"
    return _route(f)


def call_key_of(span: Span, sep: str) -> str | None:
    """What "the same call" means for implicit retries (see ``retry.call_key``): for a tool call
    ``tool:<name><sep><argument hash or ''>``, else the model route; None for agent spans."""
    f = span.feat
    if f is None:
        f = features(span)
    op = f.op
    if op in AGENT_OPERATIONS:
        return None
    if f.tool is not None or op == "execute_tool":
        return f"tool:{f.tool or span.name}{sep}{f.arg_hash or ''}"
    return _route(f)


def provider_of(span: Span) -> str | None:
    return features(span).provider


def model_of(span: Span) -> str | None:
    """The model that served the call: the response model, else the request model."""
    f = features(span)
    return f.response_model or f.request_model


def is_model_call(span: Span, op: str | None | bool = False) -> bool:
    """A call to a model (something that should cost money): a model operation, or a model
    attribute on a span that is neither an agent span nor a tool call. ``op``: the operation,
    when the caller has it already."""
    f = features(span)
    if op is False:
        op = f.op
    if op in MODEL_OPERATIONS:
        return True
    if op in AGENT_OPERATIONS or f.tool is not None or op == "execute_tool":
        return False
    return (f.response_model or f.request_model) is not None


def cached_tokens_of(span: Span) -> int:
    """Input tokens served from a provider cache (OTel: included in ``input_tokens``)."""
    return features(span).cached_tokens


# -- helpers for plan_deadlock and silent_success (README "Detectors")


def outcome_of(span: Span) -> str | None:
    """``agent.outcome`` lower-cased (``success`` | ``failure`` | ``partial``), or None.

    >>> outcome_of(Span("t", "s", None, "a", "INTERNAL", 0, 1, "OK", "", {"agent.outcome": "Success"}, {}))
    'success'
    """
    return features(span).outcome


def is_verified(span: Span) -> bool:
    """``tool.verification_status`` is ``verified`` (anything else, or absent, is not)."""
    return features(span).verified


def approval_status_of(span: Span) -> str | None:
    """``approval.status`` upper-cased (``PENDING``, ``REJECTED``, ``APPROVED``, …), or None.

    >>> approval_status_of(Span("t", "s", None, "a", "INTERNAL", 0, 1, "OK", "", {"approval.status": "pending"}, {}))
    'PENDING'
    """
    return features(span).approval


def int_of(v: Any, default: int = 0) -> int:
    """An integer attribute value (int, integral float or numeric string), else ``default``.

    >>> int_of("3"), int_of(2.0), int_of(True), int_of("x", -1)
    (3, 2, 0, -1)
    """
    if isinstance(v, bool):
        return default
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, str):
        try:
            return int(v.strip())
        except ValueError:
            return default
    return default


def id_list_of(v: Any) -> list[str]:
    """A list of step ids from an attribute value: a string array, a JSON array string, or one id.

    Order is kept, duplicates and empty ids dropped.

    >>> id_list_of(["a", "b", "a"]), id_list_of('["x", 2]'), id_list_of("y"), id_list_of(None)
    (['a', 'b'], ['x', '2'], ['y'], [])
    """
    if v is None:
        return []
    if isinstance(v, str):
        s = v.strip()
        if s.startswith("["):
            try:
                v = orjson.loads(s)
            except orjson.JSONDecodeError:
                return [s] if s else []
        else:
            return [s] if s else []
    if not isinstance(v, list | tuple):
        v = [v]
    out: dict[str, None] = {}
    for x in v:
        if x is None or isinstance(x, bool | dict | list):
            continue
        s = str(x)
        if s:
            out[s] = None
    return list(out)


# at the end: dialects import this module's neighbours (ingest → semconv for the privacy rule)
from streams.ingest.dialects import FEATURES as _FEATURES  # noqa: E402
from streams.ingest.dialects import extract as _extract  # noqa: E402

SESSION_KEYS = tuple(k for _, k in _FEATURES["session"])
"""Every dialect's session-id attribute, in precedence order."""
