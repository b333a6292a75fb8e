"""Record the spans of a hand-written agent loop on the real ``openai`` client, instrumented two ways.

The agent loop (``chat.completions.create`` with tools; the loop runs the tools itself) talks to a
scripted OpenAI-compatible fake through ``httpx2.MockTransport`` (openai>=3 ships its HTTP stack on
the ``httpx2`` fork of httpx, so the transport must be httpx2's). No network: sockets are blocked.

* ``openinference``: ``openinference-instrumentation-openai`` emits the LLM spans; the agent and
  tool spans (the instrumentation emits none) come from OpenInference's own ``OITracer``
  decorators ``@tracer.agent`` / ``@tracer.tool``; session/user via ``using_attributes``.
* ``openllmetry``: ``opentelemetry-instrumentation-openai`` (through ``Traceloop.init`` with only the
  OpenAI instrument, exporting only to the Recorder's in-memory exporter) emits the LLM spans; the
  agent and tool spans come from Traceloop's ``@agent`` / ``@tool`` decorators; session/user via
  Traceloop association properties (``Associations.set``).

Environment (used to record the committed fixtures)::

    python3.11 -m venv /tmp/fw-openai
    /tmp/fw-openai/bin/pip install openai==3.63.0 httpx2==2.17.0 \
        openinference-instrumentation-openai==0.1.66 openinference-instrumentation==0.1.72 \
        openinference-semantic-conventions==0.1.42 \
        opentelemetry-instrumentation-openai==0.62.4 traceloop-sdk==0.62.4 \
        opentelemetry-sdk==1.45.2 opentelemetry-exporter-otlp-proto-common==1.45.2

Re-record (from /work/main)::

    /tmp/fw-openai/bin/python -m tests.frameworks.record_openai openinference
    /tmp/fw-openai/bin/python -m tests.frameworks.record_openai openllmetry
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from typing import Any, Callable

from tests.frameworks.recorder import Recorder, write_manifest, write_scenario

# ---- offline guard -------------------------------------------------------------------------------
os.environ.setdefault("TRACELOOP_TELEMETRY", "false")
os.environ.setdefault("TRACELOOP_METRICS_ENABLED", "false")
os.environ.setdefault("TRACELOOP_LOGGING_ENABLED", "false")
os.environ.setdefault("TRACELOOP_TRACE_CONTENT", "true")
os.environ.setdefault("OTEL_SDK_DISABLED", "false")


def _no_network(self: socket.socket, address: Any) -> None:
    if self.family == getattr(socket, "AF_UNIX", None):
        return _orig_connect(self, address)
    print(f"BLOCKED network access attempt: {address!r}", file=sys.stderr)
    raise RuntimeError(f"network access attempted: {address!r}")


_orig_connect = socket.socket.connect
socket.socket.connect = _no_network  # type: ignore[method-assign]

import httpx2  # noqa: E402  (openai>=3 uses the httpx2 fork)
import openai  # noqa: E402

MODEL = "gpt-4o"
RESPONSE_MODEL = "gpt-4o-2024-08-06"


# ---- scripted OpenAI-compatible model ------------------------------------------------------------
class ScriptedModel:
    """Pops one scripted turn per chat.completions request: ("tool", name, args) | ("text", s) | ("fail", status)."""

    def __init__(self) -> None:
        self.turns: list[tuple] = []
        self.usage = (60, 12)
        self.http_requests = 0
        self._n = 0

    def script(self, turns: list[tuple], usage: tuple[int, int] = (60, 12)) -> None:
        self.turns, self.usage = list(turns), usage

    def handler(self, request: httpx2.Request) -> httpx2.Response:
        self.http_requests += 1
        assert request.url.path.endswith("/chat/completions"), request.url
        turn = self.turns[0] if self.turns and self.turns[0][0] == "fail" else self.turns.pop(0)
        self._n += 1
        if turn[0] == "fail":
            return httpx2.Response(
                turn[1], headers={"retry-after-ms": "5", "x-request-id": f"req_{self._n:04d}"},
                json={"error": {"message": "Internal server error",
                                "type": "server_error", "param": None, "code": None}})
        prompt, completion = self.usage
        if turn[0] == "tool":
            message = {"role": "assistant", "content": None, "refusal": None,
                       "tool_calls": [{"id": f"call_{self._n:04d}", "type": "function",
                                       "function": {"name": turn[1], "arguments": json.dumps(turn[2])}}]}
            finish = "tool_calls"
        else:
            message = {"role": "assistant", "content": turn[1], "refusal": None}
            finish = "stop"
        body = {
            "id": f"chatcmpl-{self._n:04d}", "object": "chat.completion", "created": int(time.time()),
            "model": RESPONSE_MODEL, "system_fingerprint": "fp_test",
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                      "total_tokens": prompt + completion,
                      "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                      "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0}},
        }
        return httpx2.Response(200, json=body, headers={"x-request-id": f"req_{self._n:04d}"})


# ---- tools (plain functions; each instrumentation wraps them with its own tool decorator) --------
def get_order_status(order_id: str) -> str:
    """Look up the shipping status of an order."""
    return "in_transit"


def list_orders(page: int) -> str:
    """List the customer's orders, one page at a time."""
    return json.dumps({"page": page, "orders": 3})


def issue_refund(order_id: str, amount: float) -> str:
    """Issue a refund for an order."""
    raise RuntimeError("payment gateway timeout while refunding " + order_id)


def search_docs(query: str) -> str:
    """Search the knowledge base."""
    return "3 hits"


TOOL_FUNCS = [get_order_status, list_orders, issue_refund, search_docs]
TOOL_SCHEMAS = [
    {"type": "function", "function": {"name": "get_order_status", "description": get_order_status.__doc__,
     "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]}}},
    {"type": "function", "function": {"name": "list_orders", "description": list_orders.__doc__,
     "parameters": {"type": "object", "properties": {"page": {"type": "integer"}}, "required": ["page"]}}},
    {"type": "function", "function": {"name": "issue_refund", "description": issue_refund.__doc__,
     "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}, "amount": {"type": "number"}},
                    "required": ["order_id", "amount"]}}},
    {"type": "function", "function": {"name": "search_docs", "description": search_docs.__doc__,
     "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}},
]


# ---- the hand-written agent loop -----------------------------------------------------------------
def make_agent(client: openai.OpenAI, tools: dict[str, Callable[..., str]], tool_names: list[str],
               loop_retries: int) -> Callable[[str], str]:
    schemas = [t for t in TOOL_SCHEMAS if t["function"]["name"] in tool_names]

    def support_agent(question: str) -> str:
        messages: list[dict[str, Any]] = [
            {"role": "system", "content": "You are a support agent."},
            {"role": "user", "content": question},
        ]
        for _step in range(12):
            # per-attempt retry done by the loop itself: a failed model call is re-issued as a new call
            for attempt in range(loop_retries + 1):
                try:
                    resp = client.chat.completions.create(model=MODEL, messages=messages, tools=schemas, temperature=0)
                    break
                except openai.APIStatusError:
                    if attempt == loop_retries:
                        raise
                    time.sleep(0.05)
            msg = resp.choices[0].message
            if not msg.tool_calls:
                return msg.content or ""
            messages.append(msg.model_dump(exclude_none=True))
            for call in msg.tool_calls:
                args = json.loads(call.function.arguments)
                try:
                    result = tools[call.function.name](**args)
                except Exception as e:  # the loop reports tool errors back to the model and continues
                    result = f"ERROR: {type(e).__name__}: {e}"
                messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
        raise RuntimeError("agent exceeded max steps")

    return support_agent


# ---- scenarios ------------------------------------------------------------------------------------
COST_QUERIES = ["refund policy EU", "refund policy US", "shipping delays Q3", "warranty terms laptops",
                "return window electronics", "store credit rules", "chargeback process"]

SCENARIO_SCRIPTS: dict[str, dict[str, Any]] = {
    "loop": dict(question="Where is my order A-1001?",
                 turns=[("tool", "get_order_status", {"order_id": "A-1001"})] * 5
                 + [("text", "Your order A-1001 is in transit.")]),
    "paging": dict(question="List all my orders.",
                   turns=[("tool", "list_orders", {"page": n}) for n in range(1, 9)]
                   + [("text", "You have 24 orders across 8 pages.")]),
    "silent": dict(question="Refund order A-1001, please.",
                   turns=[("tool", "issue_refund", {"order_id": "A-1001", "amount": 25.0}),
                          ("text", "Done, the refund was issued.")]),
    "cost": dict(question="Summarise every policy that applies to my refund.",
                 turns=[("tool", "search_docs", {"query": q}) for q in COST_QUERIES]
                 + [("text", "Here is the summary of all applicable policies.")],
                 usage=(120_000, 4_000)),
}
RETRY_SESSIONS = 6
LOOP_RETRIES = 4          # the loop re-issues a failed model call 4 times (5 attempts, 5 LLM spans)
CLIENT_MAX_RETRIES = 2    # openai's own retries (hidden inside one LLM span)


def run_all(rec: Recorder, framework: str, agent_decorator: Callable, tool_decorator: Callable,
            session_scope: Callable[[str, str], Any]) -> dict[str, int]:
    model = ScriptedModel()
    client = openai.OpenAI(api_key="test", base_url="http://mock/v1", max_retries=CLIENT_MAX_RETRIES,
                           http_client=httpx2.Client(transport=httpx2.MockTransport(model.handler)))
    tools = {f.__name__: tool_decorator(f) for f in TOOL_FUNCS}
    http_counts: dict[str, int] = {}

    for scenario in ("loop", "paging", "silent", "cost"):
        s = SCENARIO_SCRIPTS[scenario]
        model.script(s["turns"], s.get("usage", (60, 12)))
        names = sorted({t[1] for t in s["turns"] if t[0] == "tool"})
        agent = agent_decorator(make_agent(client, tools, names, LOOP_RETRIES))
        before = model.http_requests
        with session_scope(f"sess-{framework}-{scenario}", "user-42"):
            answer = agent(s["question"])
        assert not model.turns, model.turns
        http_counts[scenario] = model.http_requests - before
        print(f"{scenario}: {answer!r}")
        write_scenario(framework, scenario, rec.take())

    before = model.http_requests
    for i in range(RETRY_SESSIONS):
        model.script([("fail", 500)])
        agent = agent_decorator(make_agent(client, tools, ["get_order_status"], LOOP_RETRIES))
        with session_scope(f"sess-{framework}-retry-{i}", f"user-{100 + i}"):
            try:
                agent("Where is my order A-2002?")
                raise AssertionError("expected failure")
            except openai.InternalServerError as e:
                print(f"retry session {i}: failed as expected ({e.status_code})")
    http_counts["retry"] = model.http_requests - before
    write_scenario(framework, "retry", rec.take())
    return http_counts


def record_openinference() -> None:
    from contextlib import contextmanager

    from openinference.instrumentation import OITracer, TraceConfig, using_attributes
    from openinference.instrumentation.openai import OpenAIInstrumentor

    framework = "openai-openinference"
    rec = Recorder("openai-agent-openinference")
    OpenAIInstrumentor().instrument(tracer_provider=rec.provider)
    tracer = OITracer(rec.provider.get_tracer("support-agent"), config=TraceConfig())

    def agent_decorator(fn: Callable[[str], str]) -> Callable[[str], str]:
        return tracer.agent(name="support_agent")(fn)

    def tool_decorator(fn: Callable[..., str]) -> Callable[..., str]:
        return tracer.tool(name=fn.__name__)(fn)

    @contextmanager
    def session_scope(session_id: str, user_id: str):
        with using_attributes(session_id=session_id, user_id=user_id):
            yield

    counts = run_all(rec, framework, agent_decorator, tool_decorator, session_scope)
    write_manifest(
        framework,
        ["openai", "httpx2", "openinference-instrumentation-openai", "openinference-instrumentation",
         "openinference-semantic-conventions", "opentelemetry-sdk", "opentelemetry-api"],
        expect={"loop": ["no_progress_loop"], "paging": [], "silent": ["silent_success"],
                "cost": ["cost_velocity"], "retry": ["retry_storm"]},
        notes=_notes("openinference", counts),
    )


def record_openllmetry() -> None:
    from contextlib import contextmanager

    from opentelemetry import context as otel_context
    from traceloop.sdk import Traceloop
    from traceloop.sdk.associations import AssociationProperty, Associations
    from traceloop.sdk.decorators import agent, tool
    from traceloop.sdk.instruments import Instruments

    framework = "openai-openllmetry"
    rec = Recorder("unused")  # Traceloop builds its own TracerProvider; it exports only to rec.exporter
    Traceloop.init(app_name="openai-agent-openllmetry", api_endpoint="http://127.0.0.1:9/unused",
                   exporter=rec.exporter, disable_batch=True, telemetry_enabled=False,
                   instruments={Instruments.OPENAI})

    def agent_decorator(fn: Callable[[str], str]) -> Callable[[str], str]:
        return agent(name="support_agent")(fn)

    def tool_decorator(fn: Callable[..., str]) -> Callable[..., str]:
        return tool(name=fn.__name__)(fn)

    @contextmanager
    def session_scope(session_id: str, user_id: str):
        token = otel_context.attach(otel_context.get_current())
        try:
            Associations.set([(AssociationProperty.SESSION_ID, session_id),
                              (AssociationProperty.USER_ID, user_id)])
            yield
        finally:
            otel_context.detach(token)

    counts = run_all(rec, framework, agent_decorator, tool_decorator, session_scope)
    write_manifest(
        framework,
        ["openai", "httpx2", "opentelemetry-instrumentation-openai", "traceloop-sdk",
         "opentelemetry-semantic-conventions-ai", "opentelemetry-sdk", "opentelemetry-api"],
        expect={"loop": ["no_progress_loop"], "paging": [], "silent": ["silent_success"],
                "cost": ["cost_velocity"], "retry": ["retry_storm"]},
        notes=_notes("openllmetry", counts),
    )


def _notes(which: str, counts: dict[str, int]) -> str:
    common = (
        "Hand-written agent loop on the real openai client (chat.completions with tools) against "
        "httpx2.MockTransport (openai>=3 uses httpx2). Request model gpt-4o, response model "
        f"{RESPONSE_MODEL}; every response carries usage (cost: 120000 prompt + 4000 completion tokens "
        "per call, 8 calls; other scenarios 60+12). The loop runs the tools itself; a raising tool is "
        "caught by the loop and its error text returned to the model (silent: the model then answers "
        "'Done, the refund was issued.' and the agent span ends OK). retry: 6 sessions, every model "
        f"request answers HTTP 500; openai's own max_retries={CLIENT_MAX_RETRIES} retries happen inside "
        "one instrumented call and are NOT visible as spans (nor as any attribute); the loop re-issues "
        f"the failed call {LOOP_RETRIES} times as new calls (5 LLM spans per session, each ERROR), then "
        "raises, so the agent span ends ERROR (not a silent success). HTTP requests per scenario: "
        f"{json.dumps(counts, sort_keys=True)}. "
    )
    if which == "openinference":
        return common + (
            "Instrumentation: openinference-instrumentation-openai emits only the LLM span (name "
            "'ChatCompletion'). It emits no agent or tool spans, so the agent span and tool spans come "
            "from OpenInference's own OITracer decorators (@tracer.agent -> openinference.span.kind=AGENT, "
            "@tracer.tool -> openinference.span.kind=TOOL with tool.name, tool.parameters, input.value = "
            "JSON of the bound kwargs); session and user via using_attributes(session_id=, user_id=) -> "
            "session.id / user.id on every span. A failed LLM span (HTTP 500) has no llm.model_name (it is "
            "taken from the response); the requested model is only inside llm.invocation_parameters / "
            "input.value JSON. Status: OK on success, ERROR + exception event on failure."
        )
    return common + (
        "Instrumentation: opentelemetry-instrumentation-openai via Traceloop.init(instruments={OPENAI}, "
        "exporter=<in-memory>, disable_batch=True); Traceloop builds its own TracerProvider (resource "
        "service.name=openai-agent-openllmetry) and exports only to the Recorder's in-memory exporter "
        "(sockets are blocked in the script; nothing is sent). LLM span name 'openai.chat'. Agent and "
        "tool spans come from Traceloop's @agent / @tool decorators (traceloop.span.kind=agent|tool, "
        "traceloop.entity.input = JSON {\"args\": [...], \"kwargs\": {...}}); session and user via "
        "Traceloop association properties (Associations.set SESSION_ID / USER_ID) -> "
        "traceloop.association.properties.session_id / .user_id on every span. Successful LLM, agent and "
        "tool spans keep status UNSET; failures are ERROR (+ error.type on LLM spans, exception events). "
        "Tool spans carry gen_ai.tool.name but no gen_ai.operation.name."
    )


if __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else ""
    if which == "openinference":
        record_openinference()
    elif which == "openllmetry":
        record_openllmetry()
    else:
        sys.exit("usage: python -m tests.frameworks.record_openai openinference|openllmetry")
