"""The dialect table: each dialect's keys become the same features; tool-argument envelopes;
retry ordinals; default prices; and no attribute value can make extraction raise."""

from __future__ import annotations

import json

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streams import semconv
from streams.detectors.retry import ImplicitRetryTracker, aggregate
from streams.ingest import decode
from streams.ingest.dialects import FEATURES, argument_hash, extract
from streams.policy import Policy
from streams.pricing import PriceTable, span_cost
from streams.semconv import canonical_hash
from tests.spans import span

TID, SID = "ab" * 16, "cd" * 8


def flat(attrs, resource=None, status="OK", events=None):
    d = {"trace_id": TID, "span_id": SID, "name": "x", "start_time_unix_nano": 10**18,
         "end_time_unix_nano": 10**18 + 1, "status": {"code": status}, "attributes": attrs,
         "resource": resource or {"service.name": "svc"}}
    if events:
        d["events"] = events
    got = decode(orjson.dumps(d))
    assert not got.rejections, got.rejections
    return got.spans[0]


# the same tool call, as each dialect's instrumentation sends it
TOOL_CALLS = {
    "otel-genai": {"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "lookup",
                   "gen_ai.tool.call.arguments": '{"order": "A1"}', "gen_ai.conversation.id": "s"},
    "openinference": {"openinference.span.kind": "TOOL", "tool.name": "lookup",
                      "input.value": '{"order": "A1"}', "session.id": "s"},
    "openllmetry-langchain": {
        "traceloop.span.kind": "tool", "gen_ai.tool.name": "lookup", "gen_ai.operation.name": "execute_tool",
        "traceloop.association.properties.session_id": "s",
        "gen_ai.tool.call.arguments": orjson.dumps({
            "input_str": "{'order': 'A1'}", "tags": [], "inputs": {"order": "A1"},
            "metadata": {"langgraph_step": 7, "checkpoint_ns": "tools:1f0"},
            "kwargs": {"tool_call_id": "call_9"}}).decode()},
    "openllmetry-decorator": {"traceloop.span.kind": "tool", "traceloop.entity.name": "lookup",
                              "traceloop.association.properties.session_id": "s",
                              "traceloop.entity.input": '{"args": [], "kwargs": {"order": "A1"}}'},
    "pydantic-ai": {"gen_ai.tool.name": "lookup", "tool_arguments": '{"order":"A1"}',
                    "gen_ai.conversation.id": "s", "logfire.msg": "running tool: lookup"},
    "langsmith": {"langsmith.span.kind": "tool", "gen_ai.operation.name": "execute_tool",
                  "gen_ai.tool.name": "lookup", "gen_ai.prompt": '{"order":"A1"}',
                  "langsmith.metadata.session_id": "s"},
}


@pytest.mark.parametrize("dialect", list(TOOL_CALLS))
def test_a_tool_call_reads_the_same_in_every_dialect(dialect):
    s = flat(TOOL_CALLS[dialect])
    f = semconv.features(s)
    assert (f.op, f.tool, f.session, f.tenant) == ("execute_tool", "lookup", "s", "svc")
    if dialect == "openllmetry-decorator":  # its envelope keeps the args/kwargs split
        assert f.arg_hash == canonical_hash({"args": [], "kwargs": {"order": "A1"}})
    else:
        assert f.arg_hash == canonical_hash({"order": "A1"}), dialect
    # content never survives ingest
    assert not any(k in s.attributes for k in ("input.value", "gen_ai.tool.call.arguments", "tool_arguments",
                                               "traceloop.entity.input", "gen_ai.prompt"))


def test_envelope_noise_does_not_split_identical_calls():
    def call(step, call_id):
        return {"traceloop.span.kind": "tool", "gen_ai.tool.name": "lookup",
                "traceloop.entity.input": orjson.dumps({"inputs": {"order": "A1", "tool_call_id": call_id},
                                                        "metadata": {"langgraph_step": step}, "tags": []}).decode()}
    h = {argument_hash(call(i, f"c{i}"), canonical_hash) for i in range(5)}
    assert len(h) == 1


def test_a_tools_own_id_argument_stays_in_its_fingerprint():
    a = {"gen_ai.tool.name": "get", "gen_ai.tool.call.arguments": '{"id": 1}'}
    b = {"gen_ai.tool.name": "get", "gen_ai.tool.call.arguments": '{"id": 2}'}
    assert argument_hash(a, canonical_hash) != argument_hash(b, canonical_hash)


def test_model_call_features_across_dialects():
    oi = semconv.features(flat({"openinference.span.kind": "LLM", "llm.system": "openai",
                                "llm.model_name": "gpt-4o-2024-08-06", "llm.token_count.prompt": 100,
                                "llm.token_count.completion": 5, "llm.token_count.prompt_details.cache_read": 40,
                                "llm.cost.total": 0.25}))
    assert (oi.op, oi.provider, oi.response_model, oi.input_tokens, oi.output_tokens, oi.cached_tokens,
            oi.cost) == ("chat", "openai", "gpt-4o-2024-08-06", 100, 5, 40, 0.25)
    legacy = semconv.features(flat({"gen_ai.system": "anthropic", "llm.request.type": "chat",
                                    "gen_ai.request.model": "claude-3-5-sonnet", "gen_ai.usage.prompt_tokens": 7,
                                    "gen_ai.usage.completion_tokens": 3}))
    assert (legacy.op, legacy.provider, legacy.input_tokens, legacy.output_tokens) == ("chat", "anthropic", 7, 3)
    # OpenInference drops llm.model_name on failed calls: the request model is in the invocation parameters
    failed = semconv.features(flat({"openinference.span.kind": "LLM", "llm.system": "openai",
                                    "llm.invocation_parameters": '{"model": "gpt-4o", "temperature": 0}'},
                                   status="ERROR"))
    assert (failed.request_model, failed.error) == ("gpt-4o", True)
    cost = semconv.features(flat({"gen_ai.operation.name": "chat", "gen_ai.usage.cost.amount": "0.5"}))
    assert cost.cost == 0.5


def test_an_exception_event_is_an_error_even_on_an_ok_span():
    s = flat({"langsmith.span.kind": "chain"}, events=[{"name": "exception", "time_unix_nano": 10**18,
                                                        "attributes": {"exception.type": "Exception"}}])
    assert s.status == "OK" and semconv.is_error(s)


def test_agent_markers_make_agent_spans():
    for a in ({"openinference.span.kind": "AGENT"}, {"traceloop.span.kind": "agent"},
              {"gen_ai.operation.name": "invoke_agent"}):
        assert semconv.is_agent_span(flat(a)), a


# ------------------------------------------------------------------------------------ retries


def llm(t, resend=None, status="ERROR", session="s1"):
    kw = {"gen_ai__provider__name": "openai", "gen_ai__request__model": "gpt-4o"}
    if resend is not None:
        kw["http__request__resend_count"] = resend
    return span(t, session=session, status=status, op="chat", **kw)


def retries(spans):
    tr = ImplicitRetryTracker()
    st, marks = tr.mark(tr.new_state(), spans)
    agg = aggregate(spans, marks)["routes"]["openai/gpt-4o"]["buckets"]
    return sum(b.get("retries", 0) for b in agg.values()), sum(b.get("implicit", 0) for b in agg.values())


def test_ordinals_are_never_summed():
    assert retries([llm(1), llm(2, 1), llm(3, 2), llm(4, 3)]) == (3, 0)  # every attempt exported: 3


def test_a_chain_missing_its_earlier_attempts_counts_its_highest_ordinal():
    assert retries([llm(4, 3)]) == (3, 0)              # only the final failure exported
    assert retries([llm(2, 1), llm(4, 3)]) == (3, 0)   # the 2nd resend not exported
    assert retries([llm(4, 3), llm(9, 2)]) == (5, 0)   # a second request's chain, its 1st resend missing


def test_an_explicit_retry_is_not_also_implicit():
    assert retries([llm(1), llm(2, 1)]) == (1, 0)


def test_the_first_attempt_of_a_new_request_is_no_retry():
    assert retries([llm(1), llm(2, 0)]) == (0, 0)
    assert retries([llm(1), llm(2)]) == (1, 1)  # no ordinal at all: an implicit retry


# ------------------------------------------------------------------------------------- prices


def test_default_prices_price_known_models_and_the_policy_wins():
    s = span(1, op="chat", gen_ai__request__model="gpt-4o", gen_ai__usage__input_tokens=1_000_000,
             gen_ai__usage__output_tokens=0)
    assert span_cost(s, Policy().price_table()) == 2.5
    assert span_cost(s, PriceTable({"gpt-4o": {"input": 1, "output": 1}}, defaults=True)) == 1.0
    assert span_cost(s, PriceTable({}, defaults=False)) is None  # default_prices = false: unpriced


def test_an_unknown_model_stays_unpriced():
    s = span(1, op="chat", gen_ai__request__model="in-house-llm-7", gen_ai__usage__input_tokens=10)
    assert span_cost(s, Policy().price_table()) is None


def test_reported_cost_wins_over_prices():
    s = span(1, op="chat", gen_ai__request__model="gpt-4o", gen_ai__usage__input_tokens=1_000_000,
             llm__cost__total=0.01)
    assert span_cost(s, Policy().price_table()) == 0.01


# ------------------------------------------------------------------------------------- hostile

KEYS = sorted({k for srcs in FEATURES.values() for _, k in srcs}
              | {"openinference.span.kind", "traceloop.span.kind", "llm.request.type", "langsmith.span.kind",
                 "llm.invocation_parameters", "traceloop.entity.name"})
VALUES = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
                   st.text(max_size=20), st.lists(st.integers(), max_size=3),
                   st.sampled_from(["TOOL", "tool", "LLM", "agent", "chat", "{", "[1]", '{"model": 1}', "NaN",
                                    "1e400", "-5", "verified", "success"]))


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=12), st.sampled_from(["OK", "ERROR", "UNSET"]))
def test_extraction_never_raises_and_numbers_stay_sane(attrs, status):
    f = extract(attrs, {"service.name": "svc"}, status, "n", "t")
    assert f.session and f.workflow
    assert 0 <= f.input_tokens < 1 << 40 and 0 <= f.output_tokens < 1 << 40 and 0 <= f.cached_tokens < 1 << 40
    assert f.cost is None or (0 <= f.cost < float("inf"))
    assert f.resend >= -1 and f.attempt >= -1


ENVELOPES = st.recursive(st.one_of(st.none(), st.integers(), st.text(max_size=8)),
                         lambda c: st.one_of(st.lists(c, max_size=3),
                                             st.dictionaries(st.sampled_from(["inputs", "input", "args", "kwargs",
                                                                              "tags", "metadata", "id", "name",
                                                                              "type", "q"]), c, max_size=4)),
                         max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(ENVELOPES, st.sampled_from(["gen_ai.tool.call.arguments", "traceloop.entity.input", "input.value",
                                   "tool_arguments", "gen_ai.prompt"]))
def test_argument_hash_never_raises(value, key):
    a = {"gen_ai.operation.name": "execute_tool", key: json.dumps(value)}
    h = argument_hash(a, canonical_hash)
    assert h is None or len(h) == 16


# ------------------------------------------------------------------------- requested tool calls
# LiteLLM emits no tool spans: a tool call shows only as a call the model requested in its output.

ARGS = '{"order_id": "A-1001"}'
WANT = ("get_order_status", canonical_hash({"order_id": "A-1001"}))
OPENAI_MSG = [{"role": "assistant", "content": None, "function_call": None,
               "tool_calls": [{"id": "call_1", "type": "function",
                               "function": {"name": "get_order_status", "arguments": ARGS}}]}]
REQUESTED = {
    "openai-json": {"gen_ai.output.messages": json.dumps(OPENAI_MSG)},
    "openai-array": {"gen_ai.output.messages": OPENAI_MSG},  # a real array in flat JSON
    "genai-parts": {"gen_ai.output.messages": json.dumps([{"role": "assistant", "parts": [
        {"type": "text", "content": "checking"},
        {"type": "tool_call", "id": "call_1", "name": "get_order_status", "arguments": {"order_id": "A-1001"}}]}])},
    "genai-parts-str-args": {"gen_ai.output.messages": json.dumps([{"role": "assistant", "parts": [
        {"type": "tool_call", "id": "call_1", "name": "get_order_status", "arguments": ARGS}]}])},
    "openinference": {"llm.output_messages.0.message.role": "assistant",
                      "llm.output_messages.0.message.tool_calls.0.tool_call.id": "call_1",
                      "llm.output_messages.0.message.tool_calls.0.tool_call.function.name": "get_order_status",
                      "llm.output_messages.0.message.tool_calls.0.tool_call.function.arguments": ARGS},
    "legacy-function-call": {"gen_ai.completion.0.function_call.name": "get_order_status",
                             "gen_ai.completion.0.function_call.arguments": ARGS,
                             # LiteLLM's legacy logger: empty parts there, the call in gen_ai.completion
                             "gen_ai.output.messages": '[{"role": "assistant", "parts": []}]'},
    "legacy-tool-calls": {"gen_ai.completion.0.role": "assistant",
                          "gen_ai.completion.0.tool_calls.0.id": "call_1",
                          "gen_ai.completion.0.tool_calls.0.name": "get_order_status",
                          "gen_ai.completion.0.tool_calls.0.arguments": ARGS},
}
CONTENT_KEYS = ("gen_ai.output.messages", "llm.output_messages.", "gen_ai.completion.")


def model_flat(attrs, i=0, parent=None, session="s", name="chat gpt-4o"):
    d = {"trace_id": f"{i + 1:032x}", "span_id": f"{i + 1:016x}", "parent_span_id": parent, "name": name,
         "start_time_unix_nano": 10**18 + i * 10**9, "end_time_unix_nano": 10**18 + i * 10**9 + 1000,
         "status": {"code": "UNSET"}, "resource": {"service.name": "svc"},
         "attributes": {"gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o",
                        "gen_ai.conversation.id": session, "gen_ai.usage.input_tokens": 60, **attrs}}
    got = decode(orjson.dumps(d))
    assert not got.rejections, got.rejections
    return got.spans[0]


@pytest.mark.parametrize("shape", list(REQUESTED))
def test_a_requested_tool_call_reads_the_same_in_every_shape(shape):
    s = model_flat(REQUESTED[shape])
    f = semconv.features(s)
    assert semconv.requested_call_of(s) == WANT, shape
    # a request is no execution: still a model call (for cost), no tool, no tool fingerprint
    assert (f.tool, f.arg_hash, semconv.is_tool_call(s), semconv.is_model_call(s)) == (None, None, False, True)
    # content never survives ingest: only the name and the hash are left
    assert not [k for k in s.attributes if k.startswith(CONTENT_KEYS)], s.attributes
    blob = orjson.dumps([s.attributes, s.resource])
    assert b"A-1001" not in blob and b"call_1" not in blob


def test_several_requested_calls_make_one_order_free_fingerprint():
    def out(*calls):
        return {"gen_ai.output.messages": json.dumps([{"role": "assistant", "parts": [
            {"type": "tool_call", "name": n, "arguments": a} for n, a in calls]}])}
    ab = semconv.requested_call_of(model_flat(out(("get", '{"p": 1}'), ("get", '{"p": 2}'))))
    ba = semconv.requested_call_of(model_flat(out(("get", '{"p": 2}'), ("get", '{"p": 1}'))))
    ac = semconv.requested_call_of(model_flat(out(("get", '{"p": 1}'), ("get", '{"p": 3}'))))
    assert ab == ba and ab[0] == "get+get"
    assert ac != ab  # paging with parallel calls is no repeat
    assert ab != semconv.requested_call_of(model_flat(out(("get", '{"p": 1}'))))


def test_requested_names_are_screened_and_capped():
    key = "sk-proj-" + "a" * 40
    s = model_flat({"llm.output_messages.0.message.tool_calls.0.tool_call.function.name": key})
    name, _ = semconv.requested_call_of(s)
    assert name.startswith("redacted-") and key not in orjson.dumps(s.attributes).decode()
    s = model_flat({"llm.output_messages.0.message.tool_calls.0.tool_call.function.name": "t" * 5000})
    assert len(semconv.requested_call_of(s)[0]) == 128


def test_no_request_without_a_call_and_none_on_tool_or_agent_spans():
    assert semconv.requested_call_of(model_flat({"gen_ai.output.messages": '[{"role": "assistant", '
                                                 '"content": "Your order shipped."}]'})) is None
    assert semconv.requested_call_of(model_flat({"gen_ai.output.messages": "not json"})) is None
    for op in ("execute_tool", "invoke_agent"):
        s = model_flat({**REQUESTED["openai-json"], "gen_ai.operation.name": op})
        assert semconv.requested_call_of(s) is None, op


def _loop(spans):
    from streams.detectors.loop import NoProgressLoop

    det = NoProgressLoop()
    st_, found = det.new_state(), []
    for s in spans:
        st_, fs = det.step(st_, s, s.end_ns)
        found += fs
    return det, st_, found


def _tool_span(i, parent=None, args=ARGS):
    d = {"trace_id": f"{i + 1:032x}", "span_id": f"{i + 1:016x}ff"[-16:], "parent_span_id": parent,
         "name": "execute_tool get_order_status", "start_time_unix_nano": 10**18 + i * 10**9 + 2000,
         "end_time_unix_nano": 10**18 + i * 10**9 + 3000, "status": {"code": "OK"},
         "resource": {"service.name": "svc"},
         "attributes": {"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "get_order_status",
                        "gen_ai.tool.call.arguments": args, "gen_ai.conversation.id": "s"}}
    return decode(orjson.dumps(d)).spans[0]


def test_requested_calls_make_a_loop_when_the_session_has_no_tool_spans():
    _, st_, found = _loop([model_flat(REQUESTED["openai-json"], i) for i in range(3)])
    assert [(f.status, f.evidence["repeats"], f.evidence["requested_by_model"]) for f in found] == [("open", 3, True)]
    assert "model requested tool 'get_order_status'" in found[0].summary
    # paging: distinct arguments, no loop
    pages = [model_flat({"gen_ai.completion.0.function_call.name": "list_orders",
                         "gen_ai.completion.0.function_call.arguments": json.dumps({"page": i})}, i)
             for i in range(8)]
    assert _loop(pages)[2] == []


def test_a_session_with_tool_spans_does_not_count_a_call_twice():
    # a framework emitting both the request (model span) and the execution (tool span), root spans,
    # in time order: the loop opens at the 3rd execution, not the 2nd
    spans = []
    for i in range(3):
        spans += [model_flat(REQUESTED["openai-json"], i), _tool_span(i)]
    _, st_, found = _loop(spans)
    assert st_.saw_tool
    assert [(f.status, f.evidence["repeats"], "requested_by_model" in f.evidence) for f in found] == [
        ("open", 3, False)]
    assert found[0].detected_at_ns == spans[-1].end_ns
    assert _loop(spans[:4])[2] == []  # two iterations: no loop (double counting would fire here)


def test_requests_inside_a_run_are_not_counted():
    # a model span under an agent/chain span: its framework can emit tool spans, and an OTLP export
    # can deliver them after all the batch's model spans — counting the requests would then depend
    # on batching
    model = [model_flat(REQUESTED["openai-json"], i, parent="ab" * 8) for i in range(5)]
    assert _loop(model)[2] == []
    # all the model spans first, then the tool spans (spans grouped by instrumentation scope)
    tools = [_tool_span(i, parent="ab" * 8) for i in range(5)]
    _, _, found = _loop(model + tools)
    assert [(f.status, f.evidence["repeats"]) for f in found] == [("open", 3), ("updated", 4)]
    assert found[0].detected_at_ns == tools[2].end_ns  # opened by the 3rd tool span
    assert "requested_by_model" not in found[0].evidence


def test_loop_state_keeps_the_tool_flag_and_loads_old_states():
    det, st_, _ = _loop([_tool_span(0)])
    again = det.load(orjson.loads(orjson.dumps(det.dump(st_))))
    assert again.saw_tool and again == st_
    old = det.dump(st_)
    del old["saw_tool"]
    assert det.load(old).saw_tool is False


@settings(max_examples=300, deadline=None)
@given(ENVELOPES, st.sampled_from(["gen_ai.output.messages",
                                   "llm.output_messages.0.message.tool_calls.0.tool_call.function.name",
                                   "gen_ai.completion.0.function_call.name"]))
def test_requested_call_never_raises(value, key):
    from streams.ingest.dialects import requested_call

    for v in (value, json.dumps(value), [{"role": "assistant", "tool_calls": value, "parts": value}]):
        r = requested_call({key: v}, canonical_hash)
        assert r is None or (len(r[1]) == 16 and len(r[0]) <= 128)


def test_the_wire_carries_features_not_attributes():
    """Past ingest a span travels as its features plus the plan attributes: nothing else."""
    from streams.models import Span

    s = flat({**TOOL_CALLS["openinference"], "user.email": "a@b.c", "plan.step.id": "p1",
              "metadata": '{"customer": "acme"}'}, resource={"service.name": "svc", "host.name": "h1"},
             events=[{"name": "plan.step", "time_unix_nano": 10**18, "attributes": {"plan.step.id": "p2"}},
                     {"name": "exception", "time_unix_nano": 10**18, "attributes": {"exception.type": "E"}}])
    f = semconv.features(s)
    w = orjson.loads(orjson.dumps(s.to_wire()))
    back = Span.from_wire(w)
    assert back.feat == f and back.attributes == {"plan.step.id": "p1"} and back.resource == {}
    assert [e.name for e in back.events] == ["plan.step"]
    blob = orjson.dumps(w)
    assert b"a@b.c" not in blob and b"acme" not in blob and b"h1" not in blob
