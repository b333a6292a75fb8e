"""``breakwater simulate``: realistic LLM-agent traffic with injected loops, deterministic for a seed.

Every session is one agent run (one trace): a root ``invoke_agent`` span with ``chat`` spans (one per
LLM turn, carrying tokens, cost and an ``agent.state_hash`` that changes when the agent learns
something) and ``execute_tool`` spans (search, http_get, read_file, run_sql, write_file,
send_email, …, with realistic, varied JSON arguments). Healthy sessions page, poll, fail and retry
like real agents do, but never look like a loop under SPEC §4.1. The first ``loops`` sessions are
injected failures, round-robin over :data:`LOOP_KINDS`:

* ``repeat`` — the same tool with identical arguments 6–9 times, state hash unchanged;
* ``cycle`` — tools A, B, C with identical arguments each, repeated 4 times, no progress;
* ``stagnation`` — 7 ``chat`` spans with the same state hash and no tool calls.

The root span of an injected session carries ``sim.injected`` (the kind) and ends with
``agent.outcome = failure``; :func:`injected_sessions` returns the same ground truth.

Spans come out in event-time order (``end_time_unix_nano``, the order an OTel exporter emits them),
sessions interleaved. Output: :func:`write_file` (``jsonl``, ``json``, ``otlp_json``),
:func:`publish` (Kafka, JSON arrays keyed by session id), :func:`run_live` (the demo's wall-clock
traffic).

>>> spans = list(generate(7, sessions=4, start_ns=1_767_225_600_000_000_000, loops=1))
>>> truth = injected_sessions(7, 4, 1)
>>> list(truth.values())
['repeat']
>>> [s["attributes"]["sim.injected"] for s in spans if "sim.injected" in s["attributes"]]
['repeat']
>>> ends = [s["end_time_unix_nano"] for s in spans]
>>> ends == sorted(ends)
True
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import io
import itertools
import random
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:  # pragma: no cover
    from streams.settings import Settings

LOOP_KINDS: tuple[str, ...] = ("repeat", "cycle", "stagnation")
"""Injected failure kinds, assigned round-robin to the first ``loops`` sessions."""

FORMATS: tuple[str, ...] = ("jsonl", "json", "otlp_json")
"""File formats of :func:`write_file`."""

FILE_START_NS = 1_767_225_600_000_000_000
"""Default event time of the first session written to a file: 2026-01-01T00:00:00Z, fixed so that
the same seed gives the same bytes."""

OTLP_SPANS_PER_REQUEST = 100
_SCOPE = {"name": "breakwater.simulate", "version": "0.1.0"}
_KIND_NUM = {"UNSPECIFIED": 0, "INTERNAL": 1, "SERVER": 2, "CLIENT": 3, "PRODUCER": 4, "CONSUMER": 5}
_STATUS_NUM = {"UNSET": 0, "OK": 1, "ERROR": 2}
_S = 1_000_000_000

# ----------------------------------------------------------------------------- the world

_TENANTS = ("acme", "globex", "initech", "umbrella", "hooli", "stark", "wayne", "tyrell")

# provider, model, server, USD per million input tokens, per million output tokens, tokens/s
_MODELS = (
    ("openai", "gpt-4o", "api.openai.com", 2.50, 10.00, 90),
    ("openai", "gpt-4o-mini", "api.openai.com", 0.15, 0.60, 140),
    ("anthropic", "claude-sonnet-4-20250514", "api.anthropic.com", 3.00, 15.00, 70),
    ("anthropic", "claude-3-5-haiku-20241022", "api.anthropic.com", 0.80, 4.00, 120),
    ("gcp.vertex_ai", "gemini-2.0-flash", "us-central1-aiplatform.googleapis.com", 0.10, 0.40, 180),
)

# agent name -> (service.name, scenario)
_AGENTS = (
    ("research_assistant", "research-agent", "research"),
    ("support_triage", "support-agent", "triage"),
    ("data_analyst", "analytics-agent", "analysis"),
    ("data_exporter", "analytics-agent", "export"),
    ("coding_agent", "dev-agent", "coding"),
)

# tool -> (tool.action_class, typical duration range in s, can fail transiently)
_TOOLS: dict[str, tuple[str, tuple[float, float], bool]] = {
    "search": ("read", (0.3, 1.6), True),
    "http_get": ("read", (0.2, 2.5), True),
    "read_file": ("read", (0.01, 0.2), False),
    "list_directory": ("read", (0.01, 0.1), False),
    "run_sql": ("read", (0.4, 6.0), True),
    "get_job_status": ("read", (0.1, 0.5), True),
    "run_tests": ("read", (2.0, 9.0), False),
    "write_file": ("mutation", (0.03, 0.3), False),
    "send_email": ("non_idempotent_mutation", (0.3, 1.2), False),
    "create_ticket": ("non_idempotent_mutation", (0.3, 1.0), False),
    "start_export": ("non_idempotent_mutation", (0.4, 1.5), False),
}

_TOPICS = (
    "kafka consumer lag alerting", "postgres autovacuum tuning", "EU AI Act obligations for providers",
    "vector database benchmarks", "kubernetes pod disruption budgets", "OpenTelemetry GenAI conventions",
    "rust async runtime comparison", "scope 3 emissions accounting", "SOC 2 evidence collection",
    "LLM prompt caching pricing", "zero-downtime schema migrations", "S3 lifecycle policies cost",
)
_QUERY_SUFFIX = ("best practices", "postmortem", "2025", "vs alternatives", "pricing", "limitations",
                 "tutorial", "benchmarks", "common pitfalls", "reference architecture")
_DOMAINS = ("docs.example.com", "engineering.example.org", "en.wikipedia.org/wiki", "arxiv.org/abs",
            "github.com/example-org", "blog.example.net", "learn.example.io")
_REGIONS = ("EMEA", "APAC", "NA", "LATAM")
_TABLES = ("orders", "subscriptions", "invoices", "sessions", "refunds", "shipments")
_MODULES = ("config", "parser", "scheduler", "storage", "auth", "billing", "retry", "metrics")
_PEOPLE = ("ops", "finance-team", "oncall", "product", "dana", "li.wei", "sam", "a.kowalski")
_FAILURES = (
    ("TimeoutError", "tool call timed out after 10 s"),
    ("503", "upstream returned HTTP 503 Service Unavailable"),
    ("ConnectionResetError", "connection reset by peer"),
    ("429", "upstream returned HTTP 429 Too Many Requests"),
)


def session_id(seed: int, index: int, salt: str = "") -> str:
    """The session id (``gen_ai.conversation.id``) of session ``index`` for ``seed``.

    >>> session_id(7, 0) == session_id(7, 0), session_id(7, 0) != session_id(7, 1)
    (True, True)
    >>> session_id(7, 0).startswith("sess-")
    True
    """
    h = hashlib.blake2b(f"{seed}:{salt}:{index}".encode(), digest_size=6).hexdigest()
    return f"sess-{h}"


def injected_kind(index: int, loops: int) -> str | None:
    """The failure injected into session ``index`` (round-robin over :data:`LOOP_KINDS`), or None.

    >>> [injected_kind(i, 4) for i in range(5)]
    ['repeat', 'cycle', 'stagnation', 'repeat', None]
    """
    return LOOP_KINDS[index % len(LOOP_KINDS)] if index < loops else None


def injected_sessions(seed: int, sessions: int, loops: int) -> dict[str, str]:
    """Ground truth: ``{session_id: kind}`` of the injected sessions of :func:`generate`.

    >>> truth = injected_sessions(7, 10, 3)
    >>> sorted(truth.values())
    ['cycle', 'repeat', 'stagnation']
    >>> session_id(7, 0) in truth, session_id(7, 3) in truth
    (True, False)
    """
    return {session_id(seed, i): k for i in range(min(loops, sessions)) if (k := injected_kind(i, loops))}


# ----------------------------------------------------------------------------- one session


def _slug(rng: random.Random, words: str) -> str:
    return "-".join(words.lower().split()[:4]) + f"-{rng.randrange(100, 999)}"


class _Session:
    """Builds one agent run; spans are appended in end-time order."""

    def __init__(self, rng: random.Random, sid: str, tenant: str, agent: tuple[str, str, str],
                 model: tuple[Any, ...], start_ns: int, scale: float) -> None:
        self.rng = rng
        self.sid = sid
        self.agent, self.service, self.scenario = agent
        self.provider, self.model, self.server, self.p_in, self.p_out, self.tps = model
        self.resource = {"service.name": self.service, "tenant.id": tenant}
        self.trace_id = f"{rng.getrandbits(128) | 1:032x}"
        self.root_id = self._span_id()
        self.start_ns = start_ns
        self.t = start_ns
        self.scale = scale
        self.spans: list[dict[str, Any]] = []
        self.context = rng.randrange(900, 2400)  # system prompt + task, tokens
        self.epoch = 0
        self.streak = 0
        self.progress = True  # the task itself is new information for the first turn

    # -- plumbing
    def _span_id(self) -> str:
        return f"{self.rng.getrandbits(64) | 1:016x}"

    def wait(self, lo: float, hi: float) -> None:
        self.t += max(1_000_000, int(self.rng.uniform(lo, hi) * self.scale * _S))

    def _emit(self, name: str, kind: str, start: int, end: int, attrs: dict[str, Any],
              error: tuple[str, str] | None = None) -> dict[str, Any]:
        attrs["gen_ai.conversation.id"] = self.sid
        span = {
            "trace_id": self.trace_id,
            "span_id": self._span_id(),
            "parent_span_id": self.root_id,
            "name": name,
            "kind": kind,
            "start_time_unix_nano": start,
            "end_time_unix_nano": end,
            "status": {"code": "ERROR", "message": error[1]} if error else {"code": "OK", "message": ""},
            "attributes": attrs,
            "resource": dict(self.resource),
        }
        self.spans.append(span)
        return span

    def _state_hash(self) -> str:
        return hashlib.blake2b(f"{self.sid}:state:{self.epoch}".encode(), digest_size=8).hexdigest()

    # -- the two kinds of child spans
    def chat(self, state: str = "auto", *, out_tokens: int | None = None,
             attrs: dict[str, Any] | None = None) -> None:
        """One LLM turn. ``state``: ``auto`` (new hash after progress, and at least every 2
        turns), ``new`` or ``same``."""
        rng = self.rng
        if state == "new" or (state == "auto" and (self.progress or self.streak >= 2)):
            self.epoch += 1
            self.streak = 1
        else:
            self.streak += 1
        self.progress = False
        self.wait(0.05, 0.4)
        start = self.t
        out = out_tokens if out_tokens is not None else rng.randrange(40, 700)
        inp = self.context
        secs = 0.35 + inp / 40_000 + out / self.tps * rng.uniform(0.8, 1.3)
        a: dict[str, Any] = {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": self.provider,
            "gen_ai.request.model": self.model,
            "gen_ai.response.model": self.model,
            "server.address": self.server,
            "gen_ai.usage.input_tokens": inp,
            "gen_ai.usage.output_tokens": out,
            "gen_ai.usage.cost": round((inp * self.p_in + out * self.p_out) / 1e6, 6),
            "agent.state_hash": self._state_hash(),
        }
        if rng.random() < 0.04:  # the HTTP client resent after a 429/529
            a["http.request.resend_count"] = 1 if rng.random() < 0.75 else 2
            secs += rng.uniform(1.0, 4.0) * a["http.request.resend_count"]
        if attrs:
            a.update(attrs)
        self.t += max(1_000_000, int(secs * self.scale * _S))
        self._emit(f"chat {self.model}", "CLIENT", start, self.t, a)
        self.context += out

    def tool(self, name: str, args: dict[str, Any], *, fail: bool | None = None) -> None:
        """One tool call; a transient failure is retried once with identical arguments."""
        rng = self.rng
        action, (lo, hi), flaky = _TOOLS[name]
        if fail is None:
            fail = flaky and rng.random() < 0.06
        payload = orjson.dumps(args).decode()
        for attempt in range(2 if fail else 1):
            self.wait(0.02, 0.3) if attempt == 0 else self.wait(0.5, 3.0)  # retry backoff
            start = self.t
            self.t += max(1_000_000, int(rng.uniform(lo, hi) * self.scale * _S))
            a: dict[str, Any] = {
                "gen_ai.operation.name": "execute_tool",
                "gen_ai.tool.name": name,
                "gen_ai.tool.type": "function",
                "gen_ai.tool.call.id": f"call_{rng.getrandbits(96):024x}",
                "gen_ai.tool.call.arguments": payload,
                "tool.action_class": action,
            }
            if action != "read":
                a["tool.verification_status"] = "verified"
            error = None
            if fail and attempt == 0:
                error = rng.choice(_FAILURES)
                a["error.type"] = error[0]
            elif attempt:
                a["retry.attempt"] = attempt
            self._emit(f"execute_tool {name}", "INTERNAL", start, self.t, a, error)
        self.context += rng.randrange(150, 2500)  # the tool result enters the context
        self.progress = True

    def finish(self, injected: str | None) -> list[dict[str, Any]]:
        self.wait(0.02, 0.3)
        attrs: dict[str, Any] = {
            "gen_ai.operation.name": "invoke_agent",
            "gen_ai.agent.name": self.agent,
            "gen_ai.agent.id": f"{self.agent}-v{1 + self.rng.randrange(3)}",
            "gen_ai.provider.name": self.provider,
            "gen_ai.request.model": self.model,
            "gen_ai.conversation.id": self.sid,
            "agent.outcome": "failure" if injected else "success",
        }
        error = None
        if injected:
            attrs["sim.injected"] = injected
            attrs["error.type"] = "max_iterations_exceeded"
            error = ("max_iterations_exceeded", "agent stopped: iteration limit reached")
        root = {
            "trace_id": self.trace_id,
            "span_id": self.root_id,
            "parent_span_id": None,
            "name": f"invoke_agent {self.agent}",
            "kind": "INTERNAL",
            "start_time_unix_nano": self.start_ns,
            "end_time_unix_nano": self.t,
            "status": {"code": "ERROR", "message": error[1]} if error else {"code": "OK", "message": ""},
            "attributes": attrs,
            "resource": dict(self.resource),
        }
        self.spans.append(root)
        return self.spans


# -- healthy scenarios: lists of turns; a turn is a list of (tool, args, wait-before-s)

Turn = list[tuple[str, dict[str, Any], float]]


def _research(rng: random.Random) -> list[Turn]:
    topic = rng.choice(_TOPICS)
    sfx = rng.sample(_QUERY_SUFFIX, 3)
    urls = [f"https://{rng.choice(_DOMAINS)}/{_slug(rng, topic)}" for _ in range(rng.randrange(3, 6))]
    turns: list[Turn] = [[("search", {"query": f"{topic} {sfx[0]}", "top_k": rng.choice((5, 8, 10))}, 0)]]
    turns.append([("http_get", {"url": u, "timeout_s": 10}, 0) for u in urls[:2]])
    turns.append([("search", {"query": f"{topic} {sfx[1]}", "top_k": 10, "recency_days": rng.choice((30, 90, 365))}, 0)])
    turns += [[("http_get", {"url": u, "timeout_s": 10}, 0)] for u in urls[2:]]
    if rng.random() < 0.5:
        turns.append([("search", {"query": f"{topic} {sfx[2]}", "top_k": 5}, 0)])
    path = f"reports/{_slug(rng, topic)}.md"
    turns.append([("write_file", {"path": path, "content": f"# {topic.title()}\n\nSummary of {len(urls)} sources.",
                                  "overwrite": False}, 0)])
    return turns


def _triage(rng: random.Random) -> list[Turn]:
    queue = rng.choice(("billing", "platform", "mobile", "integrations"))
    base = f"https://api.helpdesk.example.com/v2/queues/{queue}/tickets"
    pages = rng.randrange(2, 6)
    turns: list[Turn] = [[("http_get", {"url": base, "params": {"status": "open", "page": p, "per_page": 50}}, 0)]
                         for p in range(1, pages + 1)]
    tid = rng.randrange(10_000, 99_999)
    turns.append([("http_get", {"url": f"https://api.helpdesk.example.com/v2/tickets/{tid}", "params": {"include": "comments"}}, 0)])
    turns.append([("create_ticket", {"project": rng.choice(("OPS", "BILL", "PLAT")),
                                     "title": f"Recurring {queue} failures linked to #{tid}",
                                     "priority": rng.choice(("P2", "P3")), "links": [tid]}, 0)])
    turns.append([("send_email", {"to": f"{rng.choice(_PEOPLE)}@example.com",
                                  "subject": f"{queue} queue triage: {pages * 50 - rng.randrange(49)} open tickets",
                                  "body": "Triage summary attached."}, 0)])
    return turns


def _analysis(rng: random.Random) -> list[Turn]:
    table = rng.choice(_TABLES)
    region = rng.choice(_REGIONS)
    month = rng.randrange(1, 13)
    turns: list[Turn] = [[("run_sql", {"database": "analytics", "query":
                           f"SELECT column_name, data_type FROM information_schema.columns WHERE table_name = '{table}'"}, 0)]]
    for q in rng.sample((
        f"SELECT date_trunc('day', created_at) d, count(*) FROM {table} WHERE region = '{region}' GROUP BY 1 ORDER BY 1",
        f"SELECT status, count(*), sum(amount_usd) FROM {table} WHERE created_at >= '2025-{month:02d}-01' GROUP BY 1",
        f"SELECT customer_id, sum(amount_usd) s FROM {table} WHERE region = '{region}' GROUP BY 1 ORDER BY s DESC LIMIT 20",
        f"SELECT percentile_cont(0.95) WITHIN GROUP (ORDER BY latency_ms) FROM {table} WHERE region = '{region}'",
        f"SELECT count(*) FILTER (WHERE refunded) * 1.0 / count(*) FROM {table} WHERE created_at >= now() - interval '30 days'",
    ), rng.randrange(2, 5)):
        turns.append([("run_sql", {"database": "analytics", "query": q, "timeout_s": 60}, 0)])
    turns.append([("write_file", {"path": f"out/{table}_{region.lower()}_2025_{month:02d}.csv",
                                  "content": "date,count,amount_usd\n", "overwrite": True}, 0)])
    return turns


def _export(rng: random.Random) -> list[Turn]:
    table = rng.choice(_TABLES)
    job = f"job-{rng.getrandbits(40):010x}"
    turns: list[Turn] = [[("run_sql", {"database": "warehouse", "query": f"SELECT count(*) FROM {table}"}, 0)]]
    turns.append([("start_export", {"dataset": f"warehouse.{table}", "format": rng.choice(("parquet", "csv")),
                                    "partition_by": "month"}, 0)])
    # polling: identical arguments, but each answer shows progress (the state hash changes)
    turns += [[("get_job_status", {"job_id": job}, rng.uniform(4.0, 12.0))] for _ in range(rng.randrange(2, 5))]
    turns.append([("http_get", {"url": f"https://exports.example.com/{job}/manifest.json"}, 0)])
    turns.append([("send_email", {"to": f"{rng.choice(_PEOPLE)}@example.com", "subject": f"Export of {table} ready",
                                  "body": f"Manifest: https://exports.example.com/{job}/manifest.json"}, 0)])
    return turns


def _coding(rng: random.Random) -> list[Turn]:
    mod = rng.choice(_MODULES)
    other = rng.choice([m for m in _MODULES if m != mod])
    turns: list[Turn] = [[("list_directory", {"path": "src/", "recursive": False}, 0)]]
    turns.append([("read_file", {"path": f"src/{mod}.py"}, 0), ("read_file", {"path": f"tests/test_{mod}.py"}, 0)])
    turns.append([("search", {"query": f"def load_{other}", "source": "codebase", "top_k": 5}, 0)])
    turns.append([("read_file", {"path": f"src/{other}.py", "start_line": rng.randrange(1, 200), "max_lines": 120}, 0)])
    for attempt in range(rng.randrange(1, 3)):
        turns.append([("write_file", {"path": f"src/{mod}.py", "patch": f"@@ -{rng.randrange(10, 300)},7 +{rng.randrange(10, 300)},9 @@ fix #{attempt}"}, 0)])
        turns.append([("run_tests", {"target": f"tests/test_{mod}.py", "args": "-q"}, 0)])
    return turns


_SCENARIOS = {"research": _research, "triage": _triage, "analysis": _analysis, "export": _export, "coding": _coding}


def _healthy_turns(s: _Session, turns: list[Turn]) -> None:
    for turn in turns:
        if s.rng.random() < 0.15:  # a reasoning-only turn (same state: nothing new was learned)
            s.chat(out_tokens=s.rng.randrange(100, 900))
        s.chat()
        for name, args, wait_s in turn:
            if wait_s:
                s.wait(wait_s, wait_s * 1.5)
            s.tool(name, args)


def _inject(s: _Session, kind: str) -> None:
    rng = s.rng
    if kind == "repeat":
        name, args = rng.choice((
            ("http_get", {"url": "https://api.helpdesk.example.com/v2/tickets", "params": {"page": 3, "per_page": 50}}),
            ("search", {"query": f"{rng.choice(_TOPICS)} {rng.choice(_QUERY_SUFFIX)}", "top_k": 10}),
            ("get_job_status", {"job_id": f"job-{rng.getrandbits(40):010x}"}),
            ("read_file", {"path": f"src/{rng.choice(_MODULES)}.py"}),
        ))
        for i in range(rng.randrange(6, 10)):
            s.chat("new" if i == 0 else "same", out_tokens=rng.randrange(30, 120))
            s.tool(name, args, fail=False)
    elif kind == "cycle":
        mod = rng.choice(_MODULES)
        calls = (
            ("read_file", {"path": f"config/{mod}.yaml"}),
            ("run_tests", {"target": f"tests/test_{mod}.py", "args": "-q"}),
            ("search", {"query": f"{mod} KeyError 'timeout'", "source": "codebase", "top_k": 5}),
        )
        for i in range(4):
            s.chat("new" if i == 0 else "same", out_tokens=rng.randrange(60, 200))
            for name, args in calls:
                s.tool(name, args, fail=False)
    elif kind == "stagnation":
        for i in range(7):
            s.chat("new" if i == 0 else "same", out_tokens=rng.randrange(200, 800))
    else:
        raise ValueError(f"unknown injected kind {kind!r}; expected one of {LOOP_KINDS}")


def build_session(seed: int, index: int, start_ns: int, *, kind: str | None = None, tenants: int = 3,
                  time_scale: float = 1.0, salt: str = "") -> list[dict[str, Any]]:
    """All spans of one agent run (session ``index``), in end-time order, root span last.

    >>> spans = build_session(7, 0, 10**18, kind="stagnation")
    >>> root = spans[-1]
    >>> root["parent_span_id"] is None, root["attributes"]["sim.injected"]
    (True, 'stagnation')
    >>> 60 <= (root["end_time_unix_nano"] - root["start_time_unix_nano"]) / 1e9 <= 240
    True
    """
    if tenants < 1:
        raise ValueError("tenants must be >= 1")
    rng = random.Random(f"breakwater-sim:{seed}:{salt}:{index}")
    names = [_TENANTS[i] if i < len(_TENANTS) else f"tenant-{i:02d}" for i in range(tenants)]
    tenant = rng.choice(names)
    agent = rng.choice(_AGENTS)
    model = rng.choice(_MODELS)
    s = _Session(rng, session_id(seed, index, salt), tenant, agent, model, start_ns, time_scale)
    target_s = rng.uniform(60.0, 180.0)
    turns = _SCENARIOS[agent[2]](rng)
    if kind is not None:
        turns = turns[: rng.randrange(1, 3)]
    # the first chat often carries the plan (acyclic, every dependency known)
    plan = None
    if rng.random() < 0.3:
        steps = [{"id": f"step{i + 1}", "depends_on": [f"step{i}"] if i else []} for i in range(len(turns))]
        plan = {"plan.steps": orjson.dumps(steps).decode()}
    s.chat("new", attrs=plan)
    _healthy_turns(s, turns)
    if kind is not None:
        _inject(s, kind)
    else:
        s.chat(out_tokens=rng.randrange(200, 1200))  # the final answer
    # stretch short runs to a realistic 1–3 minutes: user think time / queueing between steps
    natural = s.t - start_ns
    want = int(target_s * time_scale * _S)
    if natural < want and len(s.spans) > 1:
        extra = (want - natural) // len(s.spans)
        shift = 0
        for sp in s.spans:
            shift += extra
            sp["start_time_unix_nano"] += shift
            sp["end_time_unix_nano"] += shift
        s.t += shift
    return s.finish(kind)


def _arrivals(seed: int, mean_gap_s: float, salt: str = "") -> Iterator[int]:
    rng = random.Random(f"breakwater-sim:{seed}:{salt}:arrivals")
    t = 0
    while True:
        yield t
        t += int(rng.expovariate(1.0 / mean_gap_s) * _S) + 1


def generate(seed: int, sessions: int, start_ns: int, *, loops: int, tenants: int = 3,
             mean_gap_s: float = 2.0, time_scale: float = 1.0) -> Iterator[dict[str, Any]]:
    """Yield the flat spans (SPEC §3) of ``sessions`` agent runs in event-time order.

    Sessions start ``mean_gap_s`` apart on average (Poisson arrivals) and last 1–3 minutes
    (times ``time_scale``), so many run concurrently. The first ``loops`` sessions are injected
    failures (see :func:`injected_sessions`). Same arguments → same spans, byte for byte.

    >>> a = list(generate(1, 5, 0, loops=0))
    >>> a == list(generate(1, 5, 0, loops=0))
    True
    >>> len({s["attributes"]["gen_ai.conversation.id"] for s in a})
    5
    >>> sorted(a[0])  # doctest: +NORMALIZE_WHITESPACE
    ['attributes', 'end_time_unix_nano', 'kind', 'name', 'parent_span_id', 'resource', 'span_id',
     'start_time_unix_nano', 'status', 'trace_id']
    """
    if sessions < 0 or loops < 0:
        raise ValueError("sessions and loops must be >= 0")
    if mean_gap_s <= 0 or time_scale <= 0:
        raise ValueError("mean_gap_s and time_scale must be > 0")
    arrivals = _arrivals(seed, mean_gap_s * time_scale)
    heap: list[tuple[int, int, dict[str, Any]]] = []
    seq = itertools.count()
    i = 0
    next_start = start_ns + next(arrivals)
    while True:
        # a session starting after the earliest pending end cannot emit anything before it
        while i < sessions and (not heap or next_start <= heap[0][0]):
            for sp in build_session(seed, i, next_start, kind=injected_kind(i, loops), tenants=tenants,
                                    time_scale=time_scale):
                heapq.heappush(heap, (sp["end_time_unix_nano"], next(seq), sp))
            i += 1
            next_start = start_ns + next(arrivals)
        if not heap:
            return
        yield heapq.heappop(heap)[2]


# ----------------------------------------------------------------------------- OTLP JSON


def _any_value(v: Any) -> dict[str, Any]:
    if isinstance(v, bool):
        return {"boolValue": v}
    if isinstance(v, int):
        return {"intValue": str(v)}
    if isinstance(v, float):
        return {"doubleValue": v}
    if isinstance(v, list | tuple):
        return {"arrayValue": {"values": [_any_value(x) for x in v if x is not None]}}
    if isinstance(v, dict):
        return {"kvlistValue": {"values": _kvs(v)}}
    return {"stringValue": str(v)}


def _kvs(d: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"key": k, "value": _any_value(v)} for k, v in d.items() if v is not None]


def _otlp_span(s: dict[str, Any]) -> dict[str, Any]:
    st = s.get("status") or {}
    code = st.get("code", "UNSET") if isinstance(st, dict) else st
    status: dict[str, Any] = {"code": _STATUS_NUM.get(str(code).removeprefix("STATUS_CODE_"), 0)}
    if isinstance(st, dict) and st.get("message"):
        status["message"] = st["message"]
    kind = s.get("kind", "INTERNAL")
    out: dict[str, Any] = {"traceId": s["trace_id"], "spanId": s["span_id"]}
    if s.get("parent_span_id"):
        out["parentSpanId"] = s["parent_span_id"]
    out.update(
        name=s["name"],
        kind=kind if isinstance(kind, int) else _KIND_NUM.get(str(kind).removeprefix("SPAN_KIND_"), 0),
        startTimeUnixNano=str(s["start_time_unix_nano"]),
        endTimeUnixNano=str(s["end_time_unix_nano"]),
        attributes=_kvs(s.get("attributes") or {}),
    )
    if s.get("events"):
        out["events"] = [{"timeUnixNano": str(e["time_unix_nano"]), "name": e["name"],
                          "attributes": _kvs(e.get("attributes") or {})} for e in s["events"]]
    out["status"] = status
    return out


def to_otlp_json(spans: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """An OTLP JSON ``ExportTraceServiceRequest`` of flat spans, grouped by resource.

    >>> req = to_otlp_json(build_session(3, 0, 10**18)[:1])
    >>> rs = req["resourceSpans"][0]
    >>> sorted(a["key"] for a in rs["resource"]["attributes"])
    ['service.name', 'tenant.id']
    >>> span = rs["scopeSpans"][0]["spans"][0]
    >>> len(span["traceId"]), span["kind"], span["status"], type(span["endTimeUnixNano"]).__name__
    (32, 3, {'code': 1}, 'str')
    >>> [a["value"] for a in span["attributes"] if a["key"] == "gen_ai.usage.input_tokens"][0].keys()
    dict_keys(['intValue'])
    """
    groups: dict[bytes, tuple[dict[str, Any], list[dict[str, Any]]]] = {}
    for s in spans:
        res = s.get("resource") or {}
        key = orjson.dumps(res, option=orjson.OPT_SORT_KEYS)
        g = groups.get(key)
        if g is None:
            g = groups[key] = (res, [])
        g[1].append(_otlp_span(s))
    return {
        "resourceSpans": [
            {"resource": {"attributes": _kvs(res)}, "scopeSpans": [{"scope": dict(_SCOPE), "spans": out}]}
            for res, out in groups.values()
        ]
    }


# ----------------------------------------------------------------------------- files


def _encode(spans: Iterable[dict[str, Any]], fmt: str) -> Iterator[bytes]:
    if fmt == "jsonl":
        for s in spans:
            yield orjson.dumps(s) + b"\n"
    elif fmt == "json":
        first = True
        yield b"["
        for s in spans:
            yield (b"" if first else b",\n") + orjson.dumps(s)
            first = False
        yield b"]\n"
    elif fmt == "otlp_json":
        it = iter(spans)
        while chunk := list(itertools.islice(it, OTLP_SPANS_PER_REQUEST)):
            yield orjson.dumps(to_otlp_json(chunk)) + b"\n"
    else:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")


def write_file(path_or_fp: str | Path | IO[Any], spans: Iterable[dict[str, Any]], fmt: str = "jsonl") -> int:
    """Write spans as ``jsonl`` (a flat span per line), ``json`` (one array) or ``otlp_json``
    (JSON lines, one ExportTraceServiceRequest of up to 100 spans each); returns the span count.

    ``path_or_fp`` is a path, ``-`` (stdout), or a binary or text file object. Streams: the spans
    are never all held in memory.

    >>> buf = io.BytesIO()
    >>> write_file(buf, generate(1, 3, 0, loops=0), "otlp_json") > 0
    True
    >>> req = orjson.loads(buf.getvalue().splitlines()[0])
    >>> list(req), sum(len(r["scopeSpans"][0]["spans"]) for r in req["resourceSpans"]) <= 100
    (['resourceSpans'], True)
    >>> txt = io.StringIO(); write_file(txt, build_session(1, 0, 0)[:2], "json")
    2
    >>> len(orjson.loads(txt.getvalue()))
    2
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    n = 0

    def counted() -> Iterator[dict[str, Any]]:
        nonlocal n
        for s in spans:
            n += 1
            yield s

    if isinstance(path_or_fp, str | Path) and str(path_or_fp) != "-":
        with open(path_or_fp, "wb") as fp:
            for chunk in _encode(counted(), fmt):
                fp.write(chunk)
        return n
    fp = sys.stdout.buffer if isinstance(path_or_fp, str | Path) else path_or_fp
    text = isinstance(fp, io.TextIOBase)
    for chunk in _encode(counted(), fmt):
        fp.write(chunk.decode() if text else chunk)
    fp.flush()
    return n


# ----------------------------------------------------------------------------- Kafka


def default_start_ns(to_file: bool, now_ns: int | None = None) -> int:
    """Event time of the first session when ``--start-ns`` is not given.

    A file gets :data:`FILE_START_NS` (deterministic: same seed, same bytes). Traffic published to
    Kafka starts now (``now_ns``, default the wall clock), so a live worker sees current event times
    and the halts it issues are not already expired.

    >>> default_start_ns(True) == FILE_START_NS
    True
    >>> default_start_ns(False, now_ns=42)
    42
    """
    if to_file:
        return FILE_START_NS
    return time.time_ns() if now_ns is None else now_ns



def _key_of(span: dict[str, Any]) -> str:
    attrs = span.get("attributes") or {}
    for k in ("gen_ai.conversation.id", "session.id"):
        if attrs.get(k):
            return str(attrs[k])
    return str(span.get("trace_id", ""))


def messages(spans: Iterable[dict[str, Any]], batch: int = 50,
             max_bytes: int = 1_000_000) -> Iterator[tuple[bytes, bytes, int]]:
    """Group spans into Kafka messages: ``(key, JSON array value, span count)``.

    Spans are taken ``batch`` at a time; within a batch, each session's spans become one message
    keyed by the session id (in first-seen order, so per-session order is kept), split further
    when a value would exceed ``max_bytes``.

    >>> spans = [{"trace_id": "t", "attributes": {"gen_ai.conversation.id": s}, "n": i}
    ...          for i, s in enumerate("aabab")]
    >>> [(k, n) for k, _, n in messages(spans, batch=4)]
    [(b'a', 3), (b'b', 1), (b'b', 1)]
    >>> [s["n"] for s in orjson.loads(next(messages(spans, batch=4))[1])]
    [0, 1, 3]
    """
    if batch < 1:
        raise ValueError("batch must be >= 1")
    it = iter(spans)
    while chunk := list(itertools.islice(it, batch)):
        groups: dict[str, list[bytes]] = {}
        for s in chunk:
            groups.setdefault(_key_of(s), []).append(orjson.dumps(s))
        for key, encoded in groups.items():
            part: list[bytes] = []
            size = 2
            for e in encoded:
                if part and size + len(e) + 1 > max_bytes:
                    yield key.encode(), b"[" + b",".join(part) + b"]", len(part)
                    part, size = [], 2
                part.append(e)
                size += len(e) + 1
            yield key.encode(), b"[" + b",".join(part) + b"]", len(part)


@dataclass
class PublishStats:
    """What :func:`publish` / :func:`run_live` sent.

    >>> PublishStats(spans=3, messages=1)
    PublishStats(spans=3, messages=1, sessions=0, injected=0)
    """

    spans: int = 0
    messages: int = 0
    sessions: int = 0
    injected: int = 0


def _producer(settings: Settings) -> Any:
    from aiokafka import AIOKafkaProducer

    return AIOKafkaProducer(
        **settings.kafka_client_kwargs(),
        client_id="breakwater-simulate",
        linger_ms=5,
        max_request_size=max(settings.max_message_bytes, 1_048_576),
    )


class _Sender:
    """Sends through a producer, awaiting delivery futures in bounded groups."""

    def __init__(self, producer: Any, topic: str, stats: PublishStats) -> None:
        self.producer, self.topic, self.stats = producer, topic, stats
        self.pending: list[Any] = []

    async def send(self, key: bytes, value: bytes, n: int) -> None:
        fut = await self.producer.send(self.topic, value=value, key=key)
        self.pending.append(fut)
        self.stats.messages += 1
        self.stats.spans += n
        if len(self.pending) >= 200:
            await self.drain()

    async def drain(self) -> None:
        pending, self.pending = self.pending, []
        for f in pending:
            if asyncio.isfuture(f) or asyncio.iscoroutine(f):
                await f


async def publish(settings: Settings, spans: Iterable[dict[str, Any]], *, rate: float | None,
                  batch: int = 50, producer: Any = None) -> PublishStats:
    """Publish spans to ``settings.topic_spans`` as JSON arrays keyed by session id.

    ``rate`` (spans/s) paces the sends with short, bounded sleeps; ``None`` sends as fast as the
    broker takes them. ``producer`` (an object with ``async send(topic, value=, key=)``) replaces the
    aiokafka producer, for tests; otherwise one is created from the settings and stopped at the end.
    The topic must exist (the worker creates it).

    >>> class Fake:
    ...     def __init__(self): self.sent = []
    ...     async def send(self, topic, value=None, key=None): self.sent.append((topic, key))
    >>> from streams.settings import Settings
    >>> fake = Fake()
    >>> stats = asyncio.run(publish(Settings(), build_session(1, 0, 0), rate=None, producer=fake))
    >>> stats.messages, {t for t, _ in fake.sent}, stats.spans == len(build_session(1, 0, 0))
    (1, {'agent.spans'}, True)
    """
    if rate is not None and rate <= 0:
        raise ValueError("rate must be > 0 spans/s")
    # at low rates, send small groups often rather than big bursts
    step = batch if rate is None else max(1, min(batch, int(rate / 10)))
    stats = PublishStats()
    own = producer is None
    prod = _producer(settings) if own else producer
    if own:
        await prod.start()
    try:
        sender = _Sender(prod, settings.topic_spans, stats)
        t0 = time.monotonic()
        for key, value, n in messages(spans, step, settings.max_message_bytes):
            await sender.send(key, value, n)
            if rate is not None:
                ahead = stats.spans / rate - (time.monotonic() - t0)
                if ahead > 0:
                    await asyncio.sleep(min(ahead, 1.0))
        await sender.drain()
        if own:
            await prod.flush()
    finally:
        if own:
            await prod.stop()
    return stats


async def run_live(settings: Settings, *, seed: int, sessions_per_s: float, loop_every: int | None,
                   duration_s: float | None, tenants: int = 3, time_scale: float = 1.0,
                   drain: bool = False, producer: Any = None) -> PublishStats:
    """The demo's traffic: sessions start at ``sessions_per_s`` with event time = wall clock now;
    each span is published once its end time has passed. Every ``loop_every``-th session is an
    injected loop (round-robin kinds; ``None``/0 = none). Runs ``duration_s`` seconds (``None`` =
    until cancelled); with ``drain`` it then waits for the running sessions to finish.
    Session ids carry a per-run nonce so reruns against the same broker never merge sessions.

    >>> class Fake:
    ...     def __init__(self): self.n = 0
    ...     async def send(self, topic, value=None, key=None): self.n += 1
    >>> from streams.settings import Settings
    >>> st = asyncio.run(run_live(Settings(), seed=1, sessions_per_s=20, loop_every=2,
    ...                           duration_s=0.3, time_scale=0.001, drain=True, producer=Fake()))
    >>> st.sessions > 0, st.injected == st.sessions // 2, st.spans > st.sessions
    (True, True, True)
    """
    if sessions_per_s <= 0:
        raise ValueError("sessions_per_s must be > 0")
    nonce = f"{time.time_ns() // 1_000_000:x}"
    stats = PublishStats()
    own = producer is None
    prod = _producer(settings) if own else producer
    if own:
        await prod.start()
    heap: list[tuple[int, int, dict[str, Any]]] = []
    seq = itertools.count()
    try:
        sender = _Sender(prod, settings.topic_spans, stats)
        t0 = time.monotonic()
        wall0 = time.time_ns()
        while True:
            elapsed = time.monotonic() - t0
            starting = duration_s is None or elapsed < duration_s
            if starting:
                due = int(elapsed * sessions_per_s) + 1
                while stats.sessions < due:
                    n = stats.sessions
                    kind = None
                    if loop_every and (n + 1) % loop_every == 0:
                        kind = LOOP_KINDS[(n // loop_every) % len(LOOP_KINDS)]
                        stats.injected += 1
                    start_ns = max(wall0 + int(n / sessions_per_s * _S), time.time_ns())
                    for sp in build_session(seed, n, start_ns, kind=kind, tenants=tenants,
                                            time_scale=time_scale, salt=nonce):
                        heapq.heappush(heap, (sp["end_time_unix_nano"], next(seq), sp))
                    stats.sessions += 1
            elif not drain or not heap:
                break
            now = time.time_ns()
            ready = []
            while heap and heap[0][0] <= now:
                ready.append(heapq.heappop(heap)[2])
            for key, value, k in messages(ready, 500, settings.max_message_bytes):
                await sender.send(key, value, k)
            await sender.drain()
            wake = 0.2
            if heap:
                wake = min(wake, max(0.0, (heap[0][0] - time.time_ns()) / _S))
            if starting:
                next_start = (stats.sessions / sessions_per_s) - (time.monotonic() - t0)
                wake = min(wake, max(0.0, next_start))
            await asyncio.sleep(max(wake, 0.005))
        await sender.drain()
        if own:
            await prod.flush()
    finally:
        if own:
            await prod.stop()
    return stats
