"""Record LiteLLM's own OpenTelemetry loggers, offline, in each dialect the installed version offers.

LiteLLM is not an agent framework: the script drives a small agent loop itself
(``litellm.acompletion(model="gpt-4o", tools=...)``, the script executes the requested tool and
appends its result). The model is scripted at the HTTP layer: the real ``openai`` client LiteLLM
uses, handed in as ``client=AsyncOpenAI(..., http_client=httpx2.AsyncClient(transport=
httpx2.MockTransport(handler)))``, plays a scripted Chat Completions conversation (model
``gpt-4o`` with ``usage``). Sessions: LiteLLM's native ``litellm_session_id`` call argument, plus
``metadata={"session_id": ...}`` (the Langfuse-style trace control LiteLLM also reads) and
``user=`` (the OpenAI end-user field). Retries: LiteLLM's ``num_retries`` (openai client's own
``max_retries=0``).

Dialects (one fixture directory each, each recorded in a fresh subprocess because LiteLLM reads
its switches from the environment at import/construction time):

* ``litellm-otel`` -- the ``"otel"`` callback as it is by default: the legacy
  ``litellm.integrations.opentelemetry.OpenTelemetry`` logger (``litellm_request`` spans).
* ``litellm-otel-genai-latest`` -- the same logger with
  ``OTEL_SEMCONV_STABILITY_OPT_IN=gen_ai_latest_experimental`` (``chat gpt-4o`` CLIENT spans).
* ``litellm-otel-v2`` -- the ``"otel"`` callback with ``LITELLM_OTEL_V2=true``: the new
  ``litellm.integrations.otel`` package (``OpenTelemetryV2``, default mappers ``genai`` +
  ``legacy``), with ``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=span_only`` (its default,
  ``no_content``, drops every message, so no tool call would be visible at all).
* ``litellm-arize-phoenix`` -- the ``"arize_phoenix"`` callback (``ArizePhoenixLogger``, the
  OpenInference vocabulary; legacy generation, ``LITELLM_OTEL_V2`` unset).

Each logger is constructed exactly as LiteLLM's callback-name resolution builds it, except that the
Recorder's TracerProvider is injected (every one of them takes ``tracer_provider=``) instead of
the env-configured exporter.

Environment used (outside the repository)::

    python3.11 -m venv /tmp/fw-litellm
    /tmp/fw-litellm/bin/pip install litellm==1.110.2 openai==3.63.0 httpx2==2.17.0 tenacity==9.2.1 \
        opentelemetry-sdk==1.45.2 opentelemetry-exporter-otlp-proto-common==1.45.2 \
        opentelemetry-exporter-otlp-proto-http==1.45.2

Re-record from /work/main (runs every dialect; ``--dialect NAME`` runs one)::

    /tmp/fw-litellm/bin/python -m tests.frameworks.record_litellm
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
from typing import Any

DIALECTS = {
    "litellm-otel": {},
    "litellm-otel-genai-latest": {"OTEL_SEMCONV_STABILITY_OPT_IN": "gen_ai_latest_experimental"},
    "litellm-otel-v2": {"LITELLM_OTEL_V2": "true", "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT": "span_only"},
    "litellm-arize-phoenix": {},
}
MODEL = "gpt-4o"
USER = "customer-42"

TOOLS = {
    "get_order_status": {"order_id": {"type": "string"}},
    "list_orders": {"page": {"type": "integer"}},
    "issue_refund": {"order_id": {"type": "string"}, "amount": {"type": "number"}},
    "search_kb": {"query": {"type": "string"}},
}


def tool_schema(name: str) -> dict:
    props = TOOLS[name]
    return {"type": "function", "function": {"name": name, "description": f"The {name} tool.", "parameters": {
        "type": "object", "properties": props, "required": list(props)}}}


def run_tool(name: str, args: dict) -> str:
    if name == "get_order_status":
        return "pending"
    if name == "list_orders":
        p = args["page"]
        return json.dumps({"page": p, "orders": [f"o-{p}-1", f"o-{p}-2"], "has_more": p < 8})
    if name == "issue_refund":
        raise RuntimeError("payment gateway rejected the refund: card account closed")
    if name == "search_kb":
        return f"Article about {args['query']}."
    raise KeyError(name)


class Script:
    """A scripted Chat Completions server: each request pops the next step.

    A step is ``("tool", name, args)``, ``("final", text)`` or ``("error", http_status)``.
    """

    def __init__(self, steps: list[tuple], prompt_tokens: int = 60, completion_tokens: int = 12) -> None:
        self.steps = list(steps)
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = completion_tokens
        self.n = 0

    def __call__(self, request: Any) -> Any:
        import httpx2

        self.n += 1
        step = self.steps.pop(0) if len(self.steps) > 1 else self.steps[0]
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
        return httpx2.Response(200, json={
            "id": f"chatcmpl-{self.n:04d}", "object": "chat.completion", "created": 1767225600 + self.n,
            "model": "gpt-4o-2024-08-06", "system_fingerprint": "fp_fixture",
            "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
            "usage": {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                      "total_tokens": self.prompt_tokens + self.completion_tokens},
        })


def trimmed(spans: list) -> list:
    """The spans with stack traces (``exception.stacktrace`` event attributes, ``error.stack_trace``
    span attributes) cut to a marker and their last line, to keep the fixtures small."""
    from opentelemetry.sdk.trace import Event, ReadableSpan

    def cut(v: Any) -> Any:
        if isinstance(v, str) and len(v) > 200:
            return "Traceback (most recent call last):\n  [trimmed by the recorder]\n" + v.rstrip().splitlines()[-1]
        return v

    out = []
    for sp in spans:
        attrs = {k: (cut(v) if k in ("error.stack_trace", "litellm.provider.error.stack_trace") else v) for k, v in (sp.attributes or {}).items()}
        events = [Event(e.name, {k: (cut(v) if k == "exception.stacktrace" else v)
                                 for k, v in (e.attributes or {}).items()}, e.timestamp) for e in sp.events]
        out.append(ReadableSpan(
            name=sp.name, context=sp.context, parent=sp.parent, resource=sp.resource, attributes=attrs,
            events=events, links=sp.links, kind=sp.kind, status=sp.status, start_time=sp.start_time,
            end_time=sp.end_time, instrumentation_scope=sp.instrumentation_scope))
    return out


def record(dialect: str) -> None:
    os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"  # offline: the bundled price map
    from opentelemetry import trace

    from tests.frameworks.recorder import Recorder, write_manifest, write_scenario

    rec = Recorder("litellm-fixture-agent")
    trace.set_tracer_provider(rec.provider)

    import httpx2
    import litellm
    from openai import AsyncOpenAI

    if dialect in ("litellm-otel", "litellm-otel-genai-latest"):
        from litellm.integrations.opentelemetry import OpenTelemetry

        logger: Any = OpenTelemetry(tracer_provider=rec.provider)
    elif dialect == "litellm-otel-v2":
        from litellm.integrations.otel.logger import build_otel_v2_logger
        from litellm.integrations.otel.model.config import OpenTelemetryV2Config, is_otel_v2_enabled

        assert is_otel_v2_enabled()
        logger = build_otel_v2_logger(config=OpenTelemetryV2Config(), tracer_provider=rec.provider)
    elif dialect == "litellm-arize-phoenix":
        from litellm.integrations.arize.arize_phoenix import ArizePhoenixLogger
        from litellm.integrations.opentelemetry import OpenTelemetryConfig

        cfg = ArizePhoenixLogger.get_arize_phoenix_config()
        logger = ArizePhoenixLogger(config=OpenTelemetryConfig(exporter=cfg.protocol, endpoint=cfg.endpoint),
                                    callback_name="arize_phoenix", tracer_provider=rec.provider)
    else:
        raise SystemExit(f"unknown dialect {dialect}")
    litellm.callbacks = [logger]

    async def take() -> list:
        # LiteLLM logs from background tasks/threads: let them run until the span count settles.
        last, stable = -1, 0
        while stable < 6:
            await asyncio.sleep(0.25)
            n = len(rec.exporter.get_finished_spans())
            stable = stable + 1 if n == last else 0
            last = n
        return trimmed(rec.take())

    async def agent(script: Script, prompt: str, tools: list[str], session: str, num_retries: int = 0) -> str:
        client = AsyncOpenAI(api_key="test", base_url="http://mock/v1", max_retries=0,
                             http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(script)))
        messages: list[dict] = [{"role": "system", "content": "You are a customer-support agent. Use the tools."},
                                {"role": "user", "content": prompt}]
        for _ in range(20):
            resp = await litellm.acompletion(
                model=MODEL, messages=messages, tools=[tool_schema(t) for t in tools], client=client,
                num_retries=num_retries, litellm_session_id=session, metadata={"session_id": session}, user=USER)
            msg = resp.choices[0].message
            if not msg.tool_calls:
                return msg.content
            messages.append(msg.model_dump(exclude_none=True))
            for tc in msg.tool_calls:
                try:
                    result = run_tool(tc.function.name, json.loads(tc.function.arguments))
                except Exception as e:  # the agent reports the tool error to the model and goes on
                    result = f"Error: {type(e).__name__}: {e}"
                messages.append({"role": "tool", "tool_call_id": tc.id, "content": result})
        raise RuntimeError("too many steps")

    async def main() -> dict[str, Any]:
        facts: dict[str, Any] = {}
        s = Script([("tool", "get_order_status", {"order_id": "A-1001"})] * 5 + [("final", "Your order is pending.")])
        await agent(s, "Where is my order A-1001?", ["get_order_status"], "sess-loop-1")
        write_scenario(dialect, "loop", await take())

        s = Script([("tool", "list_orders", {"page": n}) for n in range(1, 9)] + [("final", "You have 16 orders.")])
        await agent(s, "How many orders do I have?", ["list_orders"], "sess-paging-1")
        write_scenario(dialect, "paging", await take())

        s = Script([("tool", "issue_refund", {"order_id": "A-1001", "amount": 42.5}),
                    ("final", "Done, the refund was issued.")])
        await agent(s, "Refund order A-1001.", ["issue_refund"], "sess-silent-1")
        write_scenario(dialect, "silent", await take())

        s = Script([("tool", "search_kb", {"query": f"refund policy section {n}"}) for n in range(1, 8)]
                   + [("final", "Here is the summary of the refund policy.")],
                   prompt_tokens=120_000, completion_tokens=4_000)
        await agent(s, "Summarise the whole refund policy.", ["search_kb"], "sess-cost-1")
        write_scenario(dialect, "cost", await take())

        spans, http_requests = [], []
        for i in range(1, 7):
            s = Script([("error", 503)])
            try:
                await agent(s, "Where is my order A-1001?", ["get_order_status"], f"sess-retry-{i}", num_retries=4)
            except Exception as e:
                facts["retry_error"] = type(e).__name__
            http_requests.append(s.n)
            spans += await take()
        facts["retry_http_requests"] = http_requests
        facts["retry_spans"] = len(spans)
        write_scenario(dialect, "retry", spans)
        return facts

    facts = asyncio.run(main())
    write_manifest(dialect, ["litellm", "openai", "httpx2", "opentelemetry-sdk"], EXPECT[dialect],
                   NOTES[dialect].format(**facts))
    print(dialect, facts)


COMMON_NOTES = (
    "LiteLLM is not an agent framework: the recorder drives the agent loop itself and LiteLLM's loggers "
    "emit no agent/run span and no tool span, so tool calls are only visible as the model span's output tool "
    "calls (and, on the next model call, as role=tool input messages); the failed tool in `silent` is just a "
    "tool message with an error text in the next request's input, nothing is marked as an error. "
    "Retries: litellm.acompletion(num_retries=4) against an HTTP 503 made {retry_http_requests} HTTP requests "
    "per session (more than the 5 attempts num_retries=4 implies; LiteLLM retries at more than one layer) but "
    "the logger "
    "emitted only one failed model span per session (the final failure, {retry_error}): the attempts are "
    "invisible, so `retry` expects []. "
)
_NO_SESSION = (
    "Sessions: this logger emits NO session key from litellm_session_id / metadata.session_id (only `user=` "
    "shows, as llm.user); every litellm call is its own root span in its own trace, so with no session key "
    "and trace-per-call a correct reader sees each model call as a separate one-call session: no loop, no "
    "cost velocity (each call costs $0.34), hence the empty expectations for loop and cost. "
)
NOTES = {
    "litellm-otel": COMMON_NOTES + _NO_SESSION + (
        "Dialect: the legacy `OpenTelemetry` logger (the `otel` callback without LITELLM_OTEL_V2): a root "
        "`litellm_request` span per call with a `raw_gen_ai_request` child. If a span is active when LiteLLM is "
        "called, this logger does NOT open its own span but stamps its attributes onto the active span (unless "
        "USE_OTEL_LITELLM_REQUEST_SPAN=true); the recorder opens no span of its own."),
    "litellm-otel-genai-latest": COMMON_NOTES + _NO_SESSION + (
        "Dialect: the legacy `OpenTelemetry` logger with OTEL_SEMCONV_STABILITY_OPT_IN=gen_ai_latest_experimental:"
        " a root CLIENT `chat gpt-4o` span per call, no raw_gen_ai_request child."),
    "litellm-otel-v2": COMMON_NOTES + (
        "Sessions: litellm_session_id is emitted as gen_ai.conversation.id on every model span, but each call "
        "is still its own trace; a reader grouping by gen_ai.conversation.id sees the loop (5 identical "
        "requested get_order_status calls) and the cost ($0.34 x 8 in one session). "
        "Dialect: LITELLM_OTEL_V2=true, `OpenTelemetryV2` with its default mappers (genai + legacy), and "
        "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=span_only: by default V2 captures no message content, "
        "and then the requested tool calls (names, arguments) are not on the spans at all and the loop could "
        "not be seen."),
    "litellm-arize-phoenix": COMMON_NOTES + (
        "Sessions: OpenInference `session.id` is NOT set (this logger fills it only from the proxy's end-user "
        "id); the caller's litellm_session_id lands in `litellm.trace_id` (LiteLLM's logical trace id, which "
        "groups the calls of one run) on every litellm_request span, while each call is its own OTel trace. "
        "A reader grouping by litellm.trace_id sees the loop (5 identical requested get_order_status calls in "
        "llm.output_messages) and the cost ($0.34 x 8); one that does not sees one-call sessions and nothing. "
        "Dialect: the `arize_phoenix` callback (`ArizePhoenixLogger`, OpenInference attribute names, legacy "
        "generation: LITELLM_OTEL_V2 unset)."),
}
_ALL_EMPTY = {"loop": [], "paging": [], "silent": [], "cost": [], "retry": []}
EXPECT = {
    "litellm-otel": _ALL_EMPTY,
    "litellm-otel-genai-latest": _ALL_EMPTY,
    "litellm-otel-v2": {"loop": ["no_progress_loop"], "paging": [], "silent": [], "cost": ["cost_velocity"],
                        "retry": []},
    "litellm-arize-phoenix": {"loop": ["no_progress_loop"], "paging": [], "silent": [], "cost": ["cost_velocity"],
                              "retry": []},
}


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--dialect", choices=list(DIALECTS))
    a = ap.parse_args()
    if a.dialect:
        record(a.dialect)
    else:
        for name, env in DIALECTS.items():
            clean = {k: v for k, v in os.environ.items()
                     if k not in ("LITELLM_OTEL_V2", "OTEL_SEMCONV_STABILITY_OPT_IN",
                                  "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT")}
            subprocess.run([sys.executable, "-m", "tests.frameworks.record_litellm", "--dialect", name],
                           env={**clean, **env}, check=True)
