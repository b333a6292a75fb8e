"""Record the spans LangGraph (with LangChain) emits under two instrumentations, offline.

1. OpenInference (``openinference-instrumentation-langchain``)
   -> ``fixtures/frameworks/langgraph-openinference/``
2. OpenLLMetry / Traceloop (``opentelemetry-instrumentation-langchain``)
   -> ``fixtures/frameworks/langgraph-openllmetry/``

Each instrumentation runs in its own process (both instrument LangChain's callback manager).

Agent: a ReAct-style ``StateGraph`` (model node "agent" + ``ToolNode`` "tools" + ``tools_condition``),
compiled with ``name="support_agent"``. Model: the real ``ChatOpenAI(model="gpt-4o")`` whose
``openai`` client talks to an ``httpx.MockTransport`` returning scripted chat completions (tool
calls, usage). Nothing goes to the network.

Sessions: OpenInference -> ``openinference.instrumentation.using_session(sid)`` (``session.id``);
OpenLLMetry -> LangChain run metadata ``{"session_id": sid}`` which the instrumentation alone turns
into ``traceloop.association.properties.session_id`` (no traceloop-sdk needed).

Retry: ``llm.bind_tools(tools).with_retry(stop_after_attempt=5, wait_exponential_jitter=False)``
with ``max_retries=0`` on the client: every attempt is its own LangChain LLM run, hence its own span.

Environment (outside the repository):

    python3.11 -m venv /tmp/fw-langgraph
    /tmp/fw-langgraph/bin/pip install langgraph==1.2.24 langgraph-prebuilt==1.1.3 \
        langchain-core==1.8.3 langchain-openai==1.8.1 openai==3.63.0 httpx==0.29.0 \
        openinference-instrumentation-langchain==0.1.80 openinference-instrumentation==0.1.72 \
        opentelemetry-instrumentation-langchain==0.62.4 \
        opentelemetry-sdk==1.45.2 opentelemetry-exporter-otlp-proto-common==1.45.2 protobuf

Size: ~2.6 MB (OpenInference) / ~3.3 MB (OpenLLMetry) untruncated - LangGraph re-serializes the
whole message history on every node span, and the retry spans carry full tracebacks. Setting the
SDK's own ``OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT`` would truncate attribute values (not status
descriptions); not done, to keep the dialect intact.

Re-record (from /work/main):

    /tmp/fw-langgraph/bin/python -m tests.frameworks.record_langgraph            # both, two processes
    /tmp/fw-langgraph/bin/python -m tests.frameworks.record_langgraph openinference
    /tmp/fw-langgraph/bin/python -m tests.frameworks.record_langgraph openllmetry
"""

from __future__ import annotations

import contextlib
import itertools
import json
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from tests.frameworks.recorder import Recorder, write_manifest, write_scenario

MODEL = "gpt-4o"
RESPONSE_MODEL = "gpt-4o-2024-08-06"

EXPECT = {
    "loop": ["no_progress_loop"],
    "paging": [],
    "silent": ["silent_success"],
    "cost": ["cost_velocity"],
    "retry": ["retry_storm"],
}


# --------------------------------------------------------------------------- scripted OpenAI API

_ids = itertools.count(1)


def _completion(message: dict[str, Any], usage: tuple[int, int], finish: str) -> dict[str, Any]:
    n = next(_ids)
    prompt, completion = usage
    cached = 20_000 if prompt >= 100_000 else 0  # the cost scenario also reports cached prompt tokens
    return {
        "id": f"chatcmpl-mock{n:04d}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": RESPONSE_MODEL,
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": {  # kept minimal: every AI message's metadata is re-serialized on later spans
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
        },
    }


def tool_call(name: str, args: dict[str, Any], usage: tuple[int, int] = (180, 20)) -> dict[str, Any]:
    n = next(_ids)
    msg = {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"id": f"call_mock{n:04d}", "type": "function",
                        "function": {"name": name, "arguments": json.dumps(args)}}],
    }
    return _completion(msg, usage, "tool_calls")


def answer(text: str, usage: tuple[int, int] = (220, 30)) -> dict[str, Any]:
    return _completion({"role": "assistant", "content": text}, usage, "stop")


class Script:
    """The mock OpenAI endpoint: pops one scripted reply per request (or fails with a status)."""

    def __init__(self) -> None:
        self.replies: list[dict[str, Any]] = []
        self.fail_status: int | None = None
        self.requests = 0

    def handler(self, request: Any) -> Any:
        import httpx

        self.requests += 1
        assert request.url.path.endswith("/chat/completions"), request.url
        if self.fail_status is not None:
            return httpx.Response(self.fail_status, json={"error": {
                "message": "The server is overloaded. Please retry.", "type": "server_error",
                "param": None, "code": None}})
        if not self.replies:
            raise AssertionError("script exhausted")
        return httpx.Response(200, json=self.replies.pop(0))


# --------------------------------------------------------------------------- the agent

def build(script: Script, tool_name: str, *, retry: bool = False) -> Any:
    import httpx
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI
    from langgraph.graph import START, MessagesState, StateGraph
    from langgraph.prebuilt import ToolNode, tools_condition

    @tool
    def lookup_order(order_id: str) -> str:
        """Look up an order's status."""
        return json.dumps({"order_id": order_id, "status": "processing"})

    @tool
    def list_orders(page: int) -> str:
        """List the customer's orders, one page at a time."""
        return json.dumps({"page": page, "orders": [f"A{page}01"], "more": page < 8})

    @tool
    def issue_refund(order_id: str, amount: float) -> str:
        """Issue a refund for an order."""
        raise RuntimeError(f"payment gateway rejected refund for {order_id}: card expired")

    @tool
    def search_docs(query: str) -> str:
        """Search the knowledge base."""
        return f"Section about {query!r}: refunds within 30 days."

    # Only the scenario's tool is bound, to keep the fixtures small (tool schemas ride on every LLM span).
    tools = [t for t in (lookup_order, list_orders, issue_refund, search_docs) if t.name == tool_name]
    llm = ChatOpenAI(
        model=MODEL, api_key="test", base_url="http://mock/v1", max_retries=0, timeout=5,
        http_client=httpx.Client(transport=httpx.MockTransport(script.handler)),
        http_async_client=httpx.AsyncClient(transport=httpx.MockTransport(script.handler)),
    )
    model = llm.bind_tools(tools)
    if retry:
        model = model.with_retry(stop_after_attempt=5, wait_exponential_jitter=False)

    def agent(state: MessagesState) -> dict[str, Any]:
        return {"messages": [model.invoke(state["messages"])]}

    g = StateGraph(MessagesState)
    g.add_node("agent", agent)
    g.add_node("tools", ToolNode(tools, handle_tool_errors=True))
    g.add_edge(START, "agent")
    g.add_conditional_edges("agent", tools_condition)
    g.add_edge("tools", "agent")
    return g.compile(name="support_agent")


# --------------------------------------------------------------------------- the two instrumentations

SessionCtx = Callable[[str], contextlib.AbstractContextManager]


def setup(which: str) -> tuple[Recorder, Callable[[str], Any], SessionCtx]:
    """Return (recorder, config_for(session) -> RunnableConfig, session_ctx(session))."""
    if which == "openinference":
        from openinference.instrumentation import using_session
        from openinference.instrumentation.langchain import LangChainInstrumentor

        rec = Recorder("langgraph-openinference-demo")
        LangChainInstrumentor().instrument(tracer_provider=rec.provider)
        return rec, (lambda sid: {"recursion_limit": 50}), using_session
    if which == "openllmetry":
        from opentelemetry.instrumentation.langchain import LangchainInstrumentor

        rec = Recorder("langgraph-openllmetry-demo")
        LangchainInstrumentor().instrument(tracer_provider=rec.provider)
        return rec, (lambda sid: {"recursion_limit": 50, "metadata": {"session_id": sid}}), \
            (lambda sid: contextlib.nullcontext())
    raise SystemExit(f"unknown instrumentation {which!r}")


def run(which: str) -> None:
    framework = f"langgraph-{which}"
    rec, config_for, session = setup(which)

    def go(scenario: str, sid: str, prompt: str, script: Script, tool_name: str, *,
           retry: bool = False, expect_error: bool = False) -> None:
        graph = build(script, tool_name, retry=retry)
        with session(sid):
            try:
                out = graph.invoke({"messages": [("user", prompt)]}, config=config_for(sid))
                assert not expect_error, "expected the run to fail"
                print(f"  {scenario} {sid}: {out['messages'][-1].content!r}")
            except Exception as e:  # noqa: BLE001
                if not expect_error:
                    raise
                print(f"  {scenario} {sid}: failed as scripted: {type(e).__name__}")

    # loop: the same tool call with the same arguments, 5 times, then an answer.
    s = Script()
    s.replies = [tool_call("lookup_order", {"order_id": "A1001"}) for _ in range(5)]
    s.replies.append(answer("Your order A1001 is still processing."))
    go("loop", "sess-loop-1", "Where is my order A1001?", s, "lookup_order")
    write_scenario(framework, "loop", rec.take())

    # paging: list_orders(page=1..8), then a normal answer.
    s = Script()
    s.replies = [tool_call("list_orders", {"page": n}) for n in range(1, 9)]
    s.replies.append(answer("You have 16 orders in total."))
    go("paging", "sess-paging-1", "How many orders do I have?", s, "list_orders")
    write_scenario(framework, "paging", rec.take())

    # silent: the refund tool raises; ToolNode(handle_tool_errors=True) turns it into a ToolMessage;
    # the model then claims success and the run ends normally.
    s = Script()
    s.replies = [tool_call("issue_refund", {"order_id": "A1001", "amount": 42.5}),
                 answer("Done, the refund was issued.")]
    go("silent", "sess-silent-1", "Please refund order A1001.", s, "issue_refund")
    write_scenario(framework, "silent", rec.take())

    # cost: 8 gpt-4o calls of ~120k prompt + ~4k completion tokens, distinct tool args between.
    big = (120_000, 4_000)
    s = Script()
    s.replies = [tool_call("search_docs", {"query": f"refund policy section {n}"}, usage=big)
                 for n in range(1, 8)]
    s.replies.append(answer("Summary of the refund policy: ...", usage=big))
    go("cost", "sess-cost-1", "Summarise the whole refund policy.", s, "search_docs")
    write_scenario(framework, "cost", rec.take())

    # retry: 6 sessions; every model call gets HTTP 503; with_retry makes 5 attempts each.
    spans = []
    for i in range(1, 7):
        s = Script()
        s.fail_status = 503
        go("retry", f"sess-retry-{i}", "Where is my order A1001?", s, "lookup_order", retry=True,
           expect_error=True)
        assert s.requests == 5, s.requests
        spans += rec.take()
    write_scenario(framework, "retry", spans)

    common = (
        "LangGraph StateGraph (node 'agent' calling ChatOpenAI.bind_tools(...), node 'tools' = "
        "ToolNode(handle_tool_errors=True), tools_condition), compiled name 'support_agent'; "
        "ChatOpenAI(model='gpt-4o', max_retries=0) on httpx.MockTransport with scripted tool calls "
        "and usage (response model 'gpt-4o-2024-08-06'; cost: 120000 prompt (20000 cached) + 4000 "
        "completion tokens per call, 8 calls). Only the scenario's tool is bound. "
        "silent: issue_refund raises RuntimeError; the tool span ends ERROR with an exception "
        "event; ToolNode turns the error into ToolMessage(status='error'), the model answers "
        "'Done, the refund was issued.' and the root span ends without error. "
        "retry: 6 sessions, every model request answered HTTP 503; "
        "bind_tools(...).with_retry(stop_after_attempt=5, wait_exponential_jitter=False): each "
        "attempt is its own LangChain LLM run -> one model span per attempt (5 per session, "
        "ERROR), children of a RunnableRetry span; no attribute carries the attempt number; the "
        "root span ends ERROR. The openai client's own max_retries instead retries inside the "
        "HTTP client: checked, 5 HTTP requests -> ONE model span. "
    )
    if which == "openinference":
        dists = ["langgraph", "langgraph-prebuilt", "langchain-core", "langchain-openai", "openai",
                 "httpx", "openinference-instrumentation-langchain", "openinference-instrumentation",
                 "openinference-semantic-conventions", "opentelemetry-sdk"]
        notes = common + (
            "Instrumented by OpenInference LangChainInstrumentor. Session: using_session(sid) -> "
            "'session.id' on every span. All spans INTERNAL; kind in 'openinference.span.kind' "
            "(LLM / TOOL / CHAIN / AGENT - AGENT only because the run name contains 'agent': "
            "the root 'support_agent' and the node 'agent'). Tool args in the TOOL span's "
            "'input.value': a bare string when the tool has a single str argument "
            "(lookup_order -> 'A1001', no input.mime_type), else JSON of the kwargs. The "
            "RunnableRetry wrapper span is also named 'ChatOpenAI' (kind CHAIN)."
        )
    else:
        dists = ["langgraph", "langgraph-prebuilt", "langchain-core", "langchain-openai", "openai",
                 "httpx", "opentelemetry-instrumentation-langchain",
                 "opentelemetry-semantic-conventions-ai", "opentelemetry-sdk"]
        notes = common + (
            "Instrumented by OpenLLMetry LangchainInstrumentor alone (no traceloop-sdk). Session: "
            "LangChain run metadata {'session_id': sid} -> "
            "'traceloop.association.properties.session_id' on every span EXCEPT the root "
            "'invoke_agent support_agent' span (made by the LangGraph wrapper, no metadata). Two "
            "agent-level spans per run: root 'invoke_agent support_agent' and its child "
            "'support_agent.workflow' (both gen_ai.operation.name='invoke_agent'). Success "
            "status is UNSET, never OK. Tool args in 'gen_ai.tool.call.arguments' (and identical "
            "'traceloop.entity.input'): an envelope {input_str (Python repr), tags, metadata "
            "(langgraph_step, checkpoint ns uuids...), inputs (the kwargs), kwargs (tool_call_id...)} "
            "whose noise differs on every call: identical calls only match on 'inputs'."
        )
    write_manifest(framework, dists, EXPECT, notes)
    print(f"wrote fixtures/frameworks/{framework}")


def main(argv: list[str]) -> None:
    if argv:
        for which in argv:
            run(which)
        return
    for which in ("openinference", "openllmetry"):  # separate processes: both patch LangChain
        subprocess.run([sys.executable, "-m", "tests.frameworks.record_langgraph", which], check=True)


if __name__ == "__main__":
    main(sys.argv[1:])
