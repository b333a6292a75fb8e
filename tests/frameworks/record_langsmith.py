"""Record the OpenTelemetry spans of LangSmith's OTel export for a hand-written ``@traceable`` agent.

The agent (``@traceable(run_type="chain")``) drives the real ``openai`` client wrapped with
``langsmith.wrappers.wrap_openai`` (LLM runs) against a scripted OpenAI-compatible fake on
``httpx2.MockTransport``; its tools are ``@traceable(run_type="tool")`` functions. LangSmith runs in
OTel-only mode (``LANGSMITH_OTEL_ENABLED=true``, ``LANGSMITH_OTEL_ONLY=true``, no API key): the
client's ``OTELExporter`` turns each run into a span on the GLOBAL tracer provider when one is set
(``langsmith.Client.__init__`` reuses ``trace.get_tracer_provider()`` unless it is the no-op proxy),
so the Recorder's provider is installed globally first. The conversation id goes where LangSmith's
Threads view reads it: run metadata ``session_id`` (set on the root run via ``langsmith_extra``;
children inherit it). No network: sockets are blocked (see record_openai).

Environment (used to record the committed fixtures)::

    python3.11 -m venv /tmp/fw-langsmith
    /tmp/fw-langsmith/bin/pip install "langsmith[otel]==0.15.1" openai==3.63.0 httpx2==2.17.0 \
        opentelemetry-sdk==1.45.2 opentelemetry-exporter-otlp-proto-common==1.45.2

Re-record (from /work/main)::

    /tmp/fw-langsmith/bin/python -m tests.frameworks.record_langsmith
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable

for _k in ("LANGSMITH_API_KEY", "LANGCHAIN_API_KEY", "LANGSMITH_ENDPOINT", "LANGCHAIN_ENDPOINT"):
    os.environ.pop(_k, None)
os.environ["LANGSMITH_TRACING"] = "true"
os.environ["LANGSMITH_OTEL_ENABLED"] = "true"
os.environ["LANGSMITH_OTEL_ONLY"] = "true"
os.environ["LANGSMITH_PROJECT"] = "breakwater-fixtures"

from opentelemetry import trace  # noqa: E402

from tests.frameworks.recorder import Recorder, write_manifest, write_scenario  # noqa: E402
# The scripted model, the tools, the scenario scripts and the network guard are shared.
from tests.frameworks.record_openai import (  # noqa: E402
    LOOP_RETRIES, MODEL, RESPONSE_MODEL, RETRY_SESSIONS, SCENARIO_SCRIPTS, TOOL_FUNCS, TOOL_SCHEMAS,
    ScriptedModel,
)

import httpx2  # noqa: E402
import openai  # noqa: E402

FRAMEWORK = "langsmith-otel"
CLIENT_MAX_RETRIES = 2

rec = Recorder("langsmith-agent")
trace.set_tracer_provider(rec.provider)

import langsmith  # noqa: E402
from langsmith import traceable  # noqa: E402
from langsmith.wrappers import wrap_openai  # noqa: E402

ls_client = langsmith.Client()  # tracing_mode resolves to "otel" from LANGSMITH_OTEL_ONLY
assert ls_client.otel_exporter is not None, "LangSmith OTel exporter not enabled"


def make_agent(client: Any, tools: dict[str, Callable[..., str]], tool_names: list[str]) -> Callable[..., str]:
    schemas = [t for t in TOOL_SCHEMAS if t["function"]["name"] in tool_names]

    @traceable(run_type="chain", name="support_agent", client=ls_client)
    def support_agent(question: str) -> str:
        messages: list[dict[str, Any]] = [
            {"role": "system", "content": "You are a support agent."},
            {"role": "user", "content": question},
        ]
        for _step in range(12):
            for attempt in range(LOOP_RETRIES + 1):  # the loop re-issues a failed model call as a new call
                try:
                    resp = client.chat.completions.create(model=MODEL, messages=messages, tools=schemas,
                                                          temperature=0)
                    break
                except openai.APIStatusError:
                    if attempt == LOOP_RETRIES:
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
                except Exception as e:  # reported back to the model; the run continues
                    result = f"ERROR: {type(e).__name__}: {e}"
                messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
        raise RuntimeError("agent exceeded max steps")

    return support_agent


def main() -> None:
    model = ScriptedModel()
    raw = openai.OpenAI(api_key="test", base_url="http://mock/v1", max_retries=CLIENT_MAX_RETRIES,
                        http_client=httpx2.Client(transport=httpx2.MockTransport(model.handler)))
    client = wrap_openai(raw)
    tools = {f.__name__: traceable(run_type="tool", name=f.__name__, client=ls_client)(f) for f in TOOL_FUNCS}
    counts: dict[str, int] = {}

    def run(agent: Callable[..., str], question: str, session_id: str, user_id: str) -> str:
        return agent(question, langsmith_extra={"metadata": {"session_id": session_id, "user_id": user_id}})

    for scenario in ("loop", "paging", "silent", "cost"):
        s = SCENARIO_SCRIPTS[scenario]
        model.script(s["turns"], s.get("usage", (60, 12)))
        names = sorted({t[1] for t in s["turns"] if t[0] == "tool"})
        before = model.http_requests
        answer = run(make_agent(client, tools, names), s["question"], f"sess-{FRAMEWORK}-{scenario}", "user-42")
        assert not model.turns, model.turns
        counts[scenario] = model.http_requests - before
        print(f"{scenario}: {answer!r}")
        ls_client.flush()
        write_scenario(FRAMEWORK, scenario, rec.take())

    before = model.http_requests
    for i in range(RETRY_SESSIONS):
        model.script([("fail", 500)])
        try:
            run(make_agent(client, tools, ["get_order_status"]), "Where is my order A-2002?",
                f"sess-{FRAMEWORK}-retry-{i}", f"user-{100 + i}")
            raise AssertionError("expected failure")
        except openai.InternalServerError as e:
            print(f"retry session {i}: failed as expected ({e.status_code})")
    counts["retry"] = model.http_requests - before
    ls_client.flush()
    write_scenario(FRAMEWORK, "retry", rec.take())

    write_manifest(
        FRAMEWORK,
        ["langsmith", "openai", "httpx2", "opentelemetry-sdk", "opentelemetry-api"],
        expect={"loop": ["no_progress_loop"], "paging": [], "silent": ["silent_success"],
                "cost": ["cost_velocity"], "retry": ["retry_storm"]},
        notes=(
            "LangSmith SDK in OTel-only mode (LANGSMITH_OTEL_ENABLED=true, LANGSMITH_OTEL_ONLY=true, no API "
            "key; nothing sent anywhere, sockets blocked): the Client's OTELExporter converts each LangSmith "
            "run into an OTel span on the global TracerProvider (the Recorder's), AFTER the fact, from a "
            "background batch thread, with the run's own start/end times and span ids derived from run "
            "UUIDs. Agent: @traceable(run_type='chain', name='support_agent') root; LLM runs from "
            "wrap_openai on the real openai client (httpx2.MockTransport; request model gpt-4o, response "
            f"model {RESPONSE_MODEL}; usage on every response; cost: 120000+4000 tokens x 8 calls); tools "
            "@traceable(run_type='tool'). Conversation id as LangSmith threads read it: run metadata "
            "session_id (and user_id), passed on the root run via langsmith_extra={'metadata': {...}} and "
            "inherited by child runs -> langsmith.metadata.session_id on every span. NOTE: "
            "langsmith.trace.session_id / session_name are the LangSmith PROJECT (tracer session), not the "
            "conversation. silent: the tool raises; the loop catches it and returns the error text to the "
            "model, which answers 'Done, the refund was issued.'; root run ends OK. retry: 6 sessions, every "
            f"model request answers HTTP 500; openai's own max_retries={CLIENT_MAX_RETRIES} retries are "
            "invisible (inside one wrap_openai run); the loop re-issues the failed call "
            f"{LOOP_RETRIES} times (5 llm spans per session, each ERROR), then the root run fails. QUIRK: the "
            "root run's span is created (status OK) from its start 'post' in an earlier export batch, and the "
            "OTel SDK ignores the later set_status(ERROR) from the 'patch' because OK is final: the failed "
            "root spans carry status OK plus an 'exception' event (exception.type 'Exception'). Spans whose "
            "post and patch land in the same batch (short runs: the llm and tool spans here) get ERROR; "
            "which case applies is timing-dependent, so the exception event is the reliable failure marker. "
            "Expect no silent_success in retry anyway: it has no tool spans. "
            f"HTTP requests per scenario: {json.dumps(counts, sort_keys=True)}."
        ),
    )


if __name__ == "__main__":
    main()
