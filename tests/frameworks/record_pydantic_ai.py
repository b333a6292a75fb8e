"""Record pydantic-ai's own OpenTelemetry instrumentation (``Agent.instrument_all()``), offline.

The model is the real ``OpenAIChatModel`` over the real ``openai`` client, whose HTTP client is an
``httpx2.AsyncClient`` on an ``httpx2.MockTransport`` that plays a scripted Chat Completions
conversation (model ``gpt-4o``, with ``usage``). Sessions: pydantic-ai's native ``conversation_id``
run argument (emitted as ``gen_ai.conversation.id``). Instrumentation data format: the default
``InstrumentationSettings`` version (5 in pydantic-ai 2.78.0).

Retries: pydantic-ai's native ``RetryOnModelErrors`` capability (the openai SDK's own retries set
to 0, as pydantic-ai's docs advise when something else owns retrying).

Environment used (outside the repository)::

    python3.11 -m venv /tmp/fw-pydantic-ai
    /tmp/fw-pydantic-ai/bin/pip install "pydantic-ai-slim[openai]==2.78.0" openai==3.63.0 httpx2==2.17.0 \
        opentelemetry-sdk==1.45.2 opentelemetry-exporter-otlp-proto-common==1.45.2

Re-record from /work/main::

    /tmp/fw-pydantic-ai/bin/python -m tests.frameworks.record_pydantic_ai
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx2
from opentelemetry import trace
from opentelemetry.sdk.trace import Event, ReadableSpan

from tests.frameworks.recorder import Recorder, write_manifest, write_scenario

FRAMEWORK = "pydantic-ai"
MODEL = "gpt-4o"

rec = Recorder("pydantic-ai-fixture-agent")
trace.set_tracer_provider(rec.provider)

from openai import AsyncOpenAI  # noqa: E402
from pydantic_ai import Agent  # noqa: E402
from pydantic_ai.capabilities import RetryOnModelErrors  # noqa: E402
from pydantic_ai.exceptions import ToolFailed  # noqa: E402
from pydantic_ai.models.openai import OpenAIChatModel  # noqa: E402
from pydantic_ai.providers.openai import OpenAIProvider  # noqa: E402

# pydantic-ai's own instrumentation for every agent, default InstrumentationSettings (global provider).
Agent.instrument_all()


class Script:
    """A scripted Chat Completions server: each request pops the next step.

    A step is ``("tool", name, args)``, ``("final", text)`` or ``("error", http_status)``.
    """

    def __init__(self, steps: list[tuple], prompt_tokens: int = 60, completion_tokens: int = 12) -> None:
        self.steps = list(steps)
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = completion_tokens
        self.n = 0
        self.requests = 0

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        self.requests += 1
        step = self.steps.pop(0) if len(self.steps) > 1 else self.steps[0]
        self.n += 1
        if step[0] == "error":
            return httpx2.Response(step[1], json={"error": {"message": "upstream overloaded", "type": "server_error",
                                                            "code": None, "param": None}})
        if step[0] == "tool":
            message = {"role": "assistant", "content": None, "tool_calls": [{
                "id": f"call_{self.n:03d}", "type": "function",
                "function": {"name": step[1], "arguments": json.dumps(step[2])}}]}
            finish = "tool_calls"
        else:
            message = {"role": "assistant", "content": step[1]}
            finish = "stop"
        body = {
            "id": f"chatcmpl-{self.n:04d}", "object": "chat.completion", "created": 1767225600 + self.n,
            "model": "gpt-4o-2024-08-06", "system_fingerprint": "fp_fixture",
            "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
            "usage": {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                      "total_tokens": self.prompt_tokens + self.completion_tokens},
        }
        return httpx2.Response(200, json=body)


def make_model(script: Script, max_retries: int = 0) -> OpenAIChatModel:
    client = AsyncOpenAI(api_key="test", base_url="http://mock/v1", max_retries=max_retries,
                         http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(script)))
    return OpenAIChatModel(MODEL, provider=OpenAIProvider(openai_client=client))


def get_order_status(order_id: str) -> str:
    """Look up an order's status."""
    return "pending"


def list_orders(page: int) -> str:
    """List the customer's orders, one page at a time."""
    return json.dumps({"page": page, "orders": [f"o-{page}-1", f"o-{page}-2"], "has_more": page < 8})


def issue_refund(order_id: str, amount: float) -> str:
    """Issue a refund."""
    # pydantic-ai's native terminal tool failure: the model sees it and the run goes on.
    raise ToolFailed("payment gateway rejected the refund: card account closed")


def search_kb(query: str) -> str:
    """Search the knowledge base."""
    return "Article about " + query + "."


def make_agent(script: Script, tools: list, capabilities: list | None = None) -> Agent:
    return Agent(
        make_model(script),
        name="support_agent",
        instructions="You are a customer-support agent. Use the tools.",
        tools=tools,
        capabilities=capabilities or [],
    )


def trimmed(spans: list[ReadableSpan]) -> list[ReadableSpan]:
    """The spans with each exception event's ``exception.stacktrace`` cut to its last line (fixture size)."""
    out = []
    for sp in spans:
        events = []
        for e in sp.events:
            attrs = dict(e.attributes or {})
            st = attrs.get("exception.stacktrace")
            if isinstance(st, str) and len(st) > 200:
                attrs["exception.stacktrace"] = ("Traceback (most recent call last):\n  [trimmed by the recorder]\n"
                                                 + st.rstrip().splitlines()[-1])
            events.append(Event(e.name, attrs, e.timestamp))
        out.append(ReadableSpan(
            name=sp.name, context=sp.context, parent=sp.parent, resource=sp.resource, attributes=sp.attributes,
            events=events, links=sp.links, kind=sp.kind, status=sp.status, start_time=sp.start_time,
            end_time=sp.end_time, instrumentation_scope=sp.instrumentation_scope))
    return out


async def run(agent: Agent, prompt: str, session: str) -> Any:
    return await agent.run(prompt, conversation_id=session)


async def main() -> None:
    notes: list[str] = []

    # loop: same tool, same args, 5 times, then an answer.
    s = Script([("tool", "get_order_status", {"order_id": "A-1001"})] * 5 + [("final", "Your order is pending.")])
    await run(make_agent(s, [get_order_status]), "Where is my order A-1001?", "sess-loop-1")
    write_scenario(FRAMEWORK, "loop", trimmed(rec.take()))

    # paging: list_orders(page=1..8), then an answer.
    s = Script([("tool", "list_orders", {"page": n}) for n in range(1, 9)] + [("final", "You have 16 orders.")])
    await run(make_agent(s, [list_orders]), "How many orders do I have?", "sess-paging-1")
    write_scenario(FRAMEWORK, "paging", trimmed(rec.take()))

    # silent: the refund tool fails (ToolFailed: the model sees the failure), the model claims success.
    s = Script([("tool", "issue_refund", {"order_id": "A-1001", "amount": 42.5}),
                ("final", "Done, the refund was issued.")])
    await run(make_agent(s, [issue_refund]), "Refund order A-1001.", "sess-silent-1")
    write_scenario(FRAMEWORK, "silent", trimmed(rec.take()))

    # cost: 8 gpt-4o calls of ~120k prompt / ~4k completion tokens, distinct tool args in between.
    steps = [("tool", "search_kb", {"query": f"refund policy section {n}"}) for n in range(1, 8)]
    s = Script(steps + [("final", "Here is the summary of the refund policy.")],
               prompt_tokens=120_000, completion_tokens=4_000)
    await run(make_agent(s, [search_kb]), "Summarise the whole refund policy.", "sess-cost-1")
    write_scenario(FRAMEWORK, "cost", trimmed(rec.take()))

    # retry: 6 sessions, each model request fails with HTTP 503 and RetryOnModelErrors attempts it 5 times.
    spans = []
    for i in range(1, 7):
        s = Script([("error", 503)])
        agent = make_agent(s, [get_order_status], capabilities=[RetryOnModelErrors(max_attempts=5, initial_delay=0.0, max_delay=0.0)])
        try:
            await run(agent, "Where is my order A-1001?", f"sess-retry-{i}")
        except Exception as e:  # the run fails after the last attempt
            last = type(e).__name__
        assert s.requests == 5, s.requests
        spans += rec.take()
    write_scenario(FRAMEWORK, "retry", trimmed(spans))

    # Side check (not written): the openai SDK's own retries (max_retries=4) are invisible as spans.
    s = Script([("error", 503)])
    agent = Agent(make_model(s, max_retries=4))
    try:
        await agent.run("hi", conversation_id="sess-sdk-retry")
    except Exception:
        pass
    sdk_spans = rec.take()
    sdk_names = sorted(sp.name for sp in sdk_spans)
    notes.append(
        f"retry: recorded with pydantic-ai's native RetryOnModelErrors(max_attempts=5) capability (openai SDK "
        f"max_retries=0). Per session: one ERROR `chat gpt-4o` span (the final failure), plus one ERROR child span "
        f"`model request attempt gpt-4o` per earlier failed attempt (attribute pydantic_ai.model_request.attempt = "
        f"0-based index); the `invoke_agent` root ends in ERROR ({last}). So the attempts ARE visible as spans "
        f"(6 sessions x 5 attempts = 30 failed model requests). Side check, not recorded: with the openai SDK's "
        f"own retry instead (max_retries=4, {s.requests} HTTP requests), the spans were {sdk_names}: the SDK's "
        f"retries are invisible, only the final failure shows."
    )
    notes.append(
        "silent: the tool raises pydantic_ai.exceptions.ToolFailed (the native 'terminal tool failure the model "
        "sees'); the run continues and the model answers 'Done, the refund was issued.'"
    )
    notes.append("exception.stacktrace values are trimmed by the recorder to their last line (fixture size).")
    notes.append("sessions: agent.run(..., conversation_id=...) -> gen_ai.conversation.id on every span.")

    write_manifest(
        FRAMEWORK,
        ["pydantic-ai-slim", "openai", "httpx2", "opentelemetry-sdk"],
        {"loop": ["no_progress_loop"], "paging": [], "silent": ["silent_success"], "cost": ["cost_velocity"],
         "retry": ["retry_storm"]},
        " ".join(notes),
    )


if __name__ == "__main__":
    asyncio.run(main())
