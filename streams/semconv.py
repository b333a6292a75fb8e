"""What the detectors read from a span (SPEC §3 attribute table), in one place.

Every function takes a normalized :class:`~streams.models.Span` and applies "first present wins",
span attributes before resource attributes.

>>> from streams.models import Span
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

SESSION_KEYS = ("gen_ai.conversation.id", "session.id")
TENANT_KEYS = ("tenant.id", "tenant.hash")
WORKFLOW_KEYS = ("workflow.id", "workflow.run_id")
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


# These run several times per span on the hot path: lookups are spelled out, and a ``str`` value
# (the usual case) is returned without calling ``str``.


def _first(span: Span, keys: tuple[str, ...]) -> Any:
    a = span.attributes
    for k in keys:
        v = a.get(k)
        if v is not None and v != "":
            return v
    r = span.resource
    if r:
        for k in keys:
            v = r.get(k)
            if v is not None and v != "":
                return v
    return None


def session_of(span: Span) -> str:
    v = _first(span, SESSION_KEYS)
    if v is None:
        return span.trace_id
    return v if type(v) is str else str(v)


def tenant_of(span: Span) -> str | None:
    v = _first(span, TENANT_KEYS)
    if v is None:
        v = span.attributes.get("service.name")
        if v is None:
            v = span.resource.get("service.name")
            if v is None:
                return None
    return v if type(v) is str else str(v)


def workflow_of(span: Span) -> str:
    v = _first(span, WORKFLOW_KEYS)
    if v is None:
        return span.trace_id
    return v if type(v) is str else str(v)


_OP = "gen_ai.operation.name"
_TOOL = "gen_ai.tool.name"


def operation_of(span: Span) -> str | None:
    v = span.attributes.get(_OP)
    if v is None:
        v = span.resource.get(_OP)
        if v is None:
            return None
    return v if type(v) is str else str(v)


def tool_name_of(span: Span) -> str | None:
    v = span.attributes.get(_TOOL)
    if v is None:
        return None
    return v if type(v) is str else str(v)


def is_tool_call(span: Span) -> bool:
    return span.attributes.get(_TOOL) is not None or operation_of(span) == "execute_tool"


def fingerprint_of(span: Span) -> tuple[str, str | None]:
    """(tool name, argument hash or None). Ingest has already hashed raw arguments."""
    name = tool_name_of(span) or span.name
    h = span.attributes.get("tool.payload_hash")
    return (name, str(h) if h is not None else None)


def state_hash_of(span: Span) -> str | None:
    v = span.attributes.get("agent.state_hash")
    return str(v) if v is not None else None


def is_error(span: Span) -> bool:
    return span.status == "ERROR" or span.attributes.get("error.type") is not None


def is_mutation(span: Span) -> bool:
    return span.attributes.get("tool.action_class") in MUTATION_CLASSES


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
    i = _num(span.attributes.get("gen_ai.usage.input_tokens")) or 0.0
    o = _num(span.attributes.get("gen_ai.usage.output_tokens")) or 0.0
    return int(i), int(o)


def reported_cost_of(span: Span) -> float | None:
    """Cost in USD as reported on the span, or None (pricing by tokens is the policy's job)."""
    for k in ("gen_ai.usage.cost", "usage.cost.total"):
        v = _num(span.attributes.get(k))
        if v is not None:
            return v
    return None


def is_retry(span: Span) -> bool:
    for k in ("http.request.resend_count", "retry.attempt"):
        v = _num(span.attributes.get(k))
        if v is not None and v > 0:
            return True
    return False


def route_of(span: Span) -> str | None:
    tool = tool_name_of(span)
    if tool is not None:
        return f"tool:{tool}"
    prov = span.attr("gen_ai.provider.name")
    model = span.attributes.get("gen_ai.request.model")
    if prov is None and model is None:
        return None
    return f"{prov or '-'}/{model or '-'}"


# ----------------------------------------------------------------------------- retries and cost
# (added for retry_storm and cost_velocity, SPEC §4.2–4.3)

AGENT_OPERATIONS = frozenset({"invoke_agent", "create_agent"})
MODEL_OPERATIONS = frozenset({"chat", "text_completion", "generate_content", "embeddings"})
CACHED_INPUT_KEYS = (
    "gen_ai.usage.cache_read.input_tokens",
    "gen_ai.usage.cache_read_input_tokens",
    "gen_ai.usage.input_tokens.cached",
)


def retry_count_of(span: Span) -> int:
    """Retries one span stands for: ``http.request.resend_count`` (an HTTP client resent the
    request that many times), else 1 when ``retry.attempt`` > 0 (each attempt is its own span).

    >>> from streams.models import Span
    >>> mk = lambda a: Span("t", "s", None, "x", "CLIENT", 0, 1, "OK", "", a, {})
    >>> retry_count_of(mk({"http.request.resend_count": 2})), retry_count_of(mk({"retry.attempt": 3}))
    (2, 1)
    >>> retry_count_of(mk({}))
    0
    """
    v = _num(span.attributes.get("http.request.resend_count"))
    if v is not None and v > 0:
        return int(v)
    v = _num(span.attributes.get("retry.attempt"))
    if v is not None and v > 0:
        return 1
    return 0


def is_agent_span(span: Span) -> bool:
    """``invoke_agent`` / ``create_agent`` spans: they summarize their children, they are no call."""
    v = span.attributes.get(_OP)
    if v is None:
        v = span.resource.get(_OP)
    return v in AGENT_OPERATIONS if type(v) is str else operation_of(span) in AGENT_OPERATIONS


def call_route_of(span: Span) -> str | None:
    """The route of a *call* (a tool or model call), or None; agent spans are no call.

    >>> from streams.models import Span
    >>> mk = lambda a: Span("t", "s", None, "x", "CLIENT", 0, 1, "OK", "", a, {})
    >>> call_route_of(mk({"gen_ai.provider.name": "openai", "gen_ai.request.model": "gpt-4o"}))
    'openai/gpt-4o'
    >>> call_route_of(mk({"gen_ai.operation.name": "invoke_agent", "gen_ai.request.model": "gpt-4o"})) is None
    True
    """
    a = span.attributes
    op = a.get(_OP)
    if op is None:
        op = span.resource.get(_OP)
    if op is not None and (op if type(op) is str else str(op)) in AGENT_OPERATIONS:
        return None
    tool = a.get(_TOOL)
    if tool is not None:
        return f"tool:{tool if type(tool) is str else str(tool)}"
    return _model_route(span)


def _model_route(span: Span) -> str | None:
    """:func:`route_of` of a span without a tool name."""
    prov = span.attributes.get("gen_ai.provider.name")
    if prov is None:
        prov = span.resource.get("gen_ai.provider.name")
    model = span.attributes.get("gen_ai.request.model")
    if prov is None and model is None:
        return None
    return f"{prov or '-'}/{model or '-'}"


def call_key_of(span: Span, sep: str) -> str | None:
    """What "the same call" means for implicit retries (see ``retry.call_key``): for a tool call
    ``tool:<name><sep><argument hash or ''>``, else the model route; None for agent spans."""
    a = span.attributes
    op = a.get(_OP)
    if op is None:
        op = span.resource.get(_OP)
    if op is not None and type(op) is not str:
        op = str(op)
    if op in AGENT_OPERATIONS:
        return None
    tool = a.get(_TOOL)
    if tool is not None or op == "execute_tool":
        name = (tool if type(tool) is str else str(tool)) if tool is not None else None
        h = a.get("tool.payload_hash")
        if h is not None and type(h) is not str:
            h = str(h)
        return f"tool:{name or span.name}{sep}{h or ''}"
    return _model_route(span)


def provider_of(span: Span) -> str | None:
    v = span.attr("gen_ai.provider.name")
    return str(v) if v is not None else None


def model_of(span: Span) -> str | None:
    """The model that served the call: ``gen_ai.response.model``, else ``gen_ai.request.model``."""
    for k in ("gen_ai.response.model", "gen_ai.request.model"):
        v = span.attributes.get(k)
        if v is not None and v != "":
            return str(v)
    return None


def is_model_call(span: Span, op: str | None | bool = False) -> bool:
    """A call to a model (something that should cost money): a model operation, or a model
    attribute on a span that is neither an agent span nor a tool call. ``op``: the operation,
    when the caller has it already."""
    if op is False:
        op = operation_of(span)
    if op in MODEL_OPERATIONS:
        return True
    if op in AGENT_OPERATIONS or is_tool_call(span):
        return False
    return model_of(span) is not None


def cached_tokens_of(span: Span) -> int:
    """Input tokens served from a provider cache (OTel: included in ``input_tokens``)."""
    for k in CACHED_INPUT_KEYS:
        v = _num(span.attributes.get(k))
        if v is not None:
            return max(int(v), 0)
    return 0


# -- helpers for plan_deadlock and silent_success (SPEC §4.4–4.5)


def outcome_of(span: Span) -> str | None:
    """``agent.outcome`` lower-cased (``success`` | ``failure`` | ``partial``), or None.

    >>> outcome_of(Span("t", "s", None, "a", "INTERNAL", 0, 1, "OK", "", {"agent.outcome": "Success"}, {}))
    'success'
    """
    v = span.attributes.get("agent.outcome")
    return str(v).lower() if v is not None and v != "" else None


def is_verified(span: Span) -> bool:
    """``tool.verification_status`` is ``verified`` (anything else, or absent, is not)."""
    v = span.attributes.get("tool.verification_status")
    return isinstance(v, str) and v.lower() == "verified"


def approval_status_of(span: Span) -> str | None:
    """``approval.status`` upper-cased (``PENDING``, ``REJECTED``, ``APPROVED``, …), or None.

    >>> approval_status_of(Span("t", "s", None, "a", "INTERNAL", 0, 1, "OK", "", {"approval.status": "pending"}, {}))
    'PENDING'
    """
    v = span.attributes.get("approval.status")
    return str(v).upper() if v is not None and v != "" else None


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
