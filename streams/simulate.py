"""``breakwater simulate``: realistic LLM-agent traffic with injected loops, deterministic for a seed.

Every session is one agent run (one trace): a root ``invoke_agent`` span with ``chat`` spans (one per
LLM turn, carrying tokens, cost and an ``agent.state_hash`` that changes when the agent learns
something) and ``execute_tool`` spans (search, http_get, read_file, run_sql, write_file,
send_email, …, with realistic, varied JSON arguments). Healthy sessions page, poll, fail and retry
like real agents do, but never look like a loop or any other detector's pattern. The first
``loops`` sessions are injected loops, round-robin over :data:`LOOP_KINDS`:

* ``repeat`` — the same tool with identical arguments 6–9 times, state hash unchanged;
* ``cycle`` — three tools that take no arguments, A, B, C, repeated 4 times, no progress (without an
  argument hash the repeat rule needs 6 calls, so the cycle rule closes first, at the 9th call);
* ``stagnation`` — 7 ``chat`` spans with the same state hash and no tool calls.

``inject`` adds every other detector's pattern, with the detectors' default thresholds:

* ``session_storm`` — one model request resent 11 times (``http.request.resend_count``) in ~30 s;
* ``route_storm`` — 8 sessions on one overloaded route (:data:`STORM_MODEL`), 6 resends each;
* ``session_cost`` — ~$0.5 per model call, several a minute (> $2 per 60 s);
* ``tenant_cost`` — 4 sessions of :data:`SPIKE_TENANT`, each under the session limits, ~$5 in a
  minute against a baseline of ~$0.1/min learned from :func:`tenant_history` (20 minutes before);
* ``deadlock`` — a plan revision makes step ``draft`` need ``review``, which needs ``draft``;
* ``silent`` — a tool call fails, is never retried, and the agent reports success.

The root span of an injected session carries ``sim.injected`` (the kind) and ends with
``agent.outcome = failure`` (``success`` for ``silent``); :func:`injected_sessions` returns the
same ground truth, :data:`PATTERN_DETECTOR` the detector that must find each.

Spans come out in event-time order (``end_time_unix_nano``, the order an OTel exporter emits them),
sessions interleaved. Output: :func:`write_file` (``jsonl``, ``json``, ``otlp_json``),
:func:`publish` (Kafka, JSON arrays keyed by session id), :func:`run_live` (wall-clock traffic),
:class:`AgentFleet` (the demo: live agents behind the gateway client, obeying the breaker).

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

PATTERNS: tuple[str, ...] = ("repeat", "cycle", "stagnation", "session_storm", "route_storm", "session_cost",
                             "tenant_cost", "deadlock", "silent")
"""Every injectable pattern (``generate(inject=…)``), one or more per detector (:data:`PATTERN_DETECTOR`)."""

PATTERN_DETECTOR: dict[str, str] = {
    "repeat": "no_progress_loop", "cycle": "no_progress_loop", "stagnation": "no_progress_loop",
    "session_storm": "retry_storm", "route_storm": "retry_storm",
    "session_cost": "cost_velocity", "tenant_cost": "cost_velocity",
    "deadlock": "plan_deadlock", "silent": "silent_success",
}
"""The detector that must find each injected pattern."""

GROUP_SIZE: dict[str, int] = {"route_storm": 8, "tenant_cost": 4}
"""Patterns made by several sessions together (a route storm needs ≥ 5 sessions); others take one."""

STORM_MODEL = ("mistral_ai", "mistral-large-latest", "api.mistral.ai", 2.00, 6.00, 80)
"""The route (provider/model) of an injected route storm: a provider in an outage, used by the storm's
agents only, so its retry ratio does not depend on how much healthy traffic runs."""

COST_MODEL = ("anthropic", "claude-sonnet-4-20250514", "api.anthropic.com", 3.00, 15.00, 70)

SPIKE_TENANT = "cyberdyne"
"""The tenant of an injected tenant cost spike; healthy traffic never uses it, and its baseline comes
from :func:`tenant_history` (the tenant detector needs 15 minutes of warm-up)."""

HISTORY_MINUTES = 20

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
    # tools that take no arguments (no argument hash: the repeat threshold doubles, cycles still count)
    "get_queue_depth": ("read", (0.05, 0.3), False),
    "list_open_alerts": ("read", (0.1, 0.5), False),
    "check_deploy_status": ("read", (0.1, 0.6), False),
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


def _check_inject(inject: Iterable[str]) -> tuple[str, ...]:
    inject = tuple(inject)
    bad = [k for k in inject if k not in PATTERNS]
    if bad:
        raise ValueError(f"unknown injected pattern {bad[0]!r}; expected one of {', '.join(PATTERNS)}")
    return inject


def injected_kind(index: int, loops: int, inject: Iterable[str] = ()) -> str | None:
    """The failure injected into session ``index``, or None.

    The first ``loops`` sessions loop (round-robin over :data:`LOOP_KINDS`); then each pattern of
    ``inject`` takes its group of sessions (:data:`GROUP_SIZE`, else one) in the order given.

    >>> [injected_kind(i, 4) for i in range(5)]
    ['repeat', 'cycle', 'stagnation', 'repeat', None]
    >>> [injected_kind(i, 1, ("silent", "route_storm")) for i in range(11)]  # doctest: +NORMALIZE_WHITESPACE
    ['repeat', 'silent', 'route_storm', 'route_storm', 'route_storm', 'route_storm', 'route_storm',
     'route_storm', 'route_storm', 'route_storm', None]
    """
    if index < loops:
        return LOOP_KINDS[index % len(LOOP_KINDS)]
    j = index - loops
    for kind in _check_inject(inject):
        n = GROUP_SIZE.get(kind, 1)
        if j < n:
            return kind
        j -= n
    return None


def injected_count(loops: int, inject: Iterable[str] = ()) -> int:
    """How many sessions :func:`injected_kind` marks.

    >>> injected_count(3, PATTERNS)
    22
    """
    return loops + sum(GROUP_SIZE.get(k, 1) for k in _check_inject(inject))


def injected_sessions(seed: int, sessions: int, loops: int, inject: Iterable[str] = ()) -> dict[str, str]:
    """Ground truth: ``{session_id: kind}`` of the injected sessions of :func:`generate`.

    >>> truth = injected_sessions(7, 10, 3)
    >>> sorted(truth.values())
    ['cycle', 'repeat', 'stagnation']
    >>> session_id(7, 0) in truth, session_id(7, 3) in truth
    (True, False)
    >>> sorted(set(injected_sessions(7, 30, 0, PATTERNS).values())) == sorted(PATTERNS)
    True
    """
    inject = _check_inject(inject)
    n = min(injected_count(loops, inject), sessions)
    return {session_id(seed, i): k for i in range(n) if (k := injected_kind(i, loops, inject))}


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
        self.extra: dict[str, Any] = {}  # attributes every span carries (e.g. workflow.id)

    # -- plumbing
    def _span_id(self) -> str:
        return f"{self.rng.getrandbits(64) | 1:016x}"

    def wait(self, lo: float, hi: float) -> None:
        self.t += max(1_000_000, int(self.rng.uniform(lo, hi) * self.scale * _S))

    def _emit(self, name: str, kind: str, start: int, end: int, attrs: dict[str, Any],
              error: tuple[str, str] | None = None) -> dict[str, Any]:
        attrs["gen_ai.conversation.id"] = self.sid
        if self.extra:
            attrs.update(self.extra)
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

    def model_call(self, *, secs: float, in_tokens: int, out_tokens: int, state: str = "new",
                   error: tuple[str, str] | None = None, resend: int = 0) -> None:
        """One LLM call with explicit duration and tokens (injected patterns). ``error``: the call
        failed (no output, no cost); ``resend``: the HTTP client's resend ordinal; ``state``:
        ``new``, ``same`` or ``none`` (no state hash: a failed attempt learned nothing)."""
        self.wait(0.05, 0.3)
        start = self.t
        self.t += max(1_000_000, int(secs * self.scale * _S))
        out = 0 if error else out_tokens
        a: dict[str, Any] = {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": self.provider,
            "gen_ai.request.model": self.model,
            "server.address": self.server,
            "gen_ai.usage.input_tokens": 0 if error else in_tokens,
            "gen_ai.usage.output_tokens": out,
            "gen_ai.usage.cost": 0.0 if error else round((in_tokens * self.p_in + out * self.p_out) / 1e6, 6),
        }
        if not error:
            a["gen_ai.response.model"] = self.model
        if state != "none":
            if state == "new":
                self.epoch += 1
            a["agent.state_hash"] = self._state_hash()
        if resend:
            a["http.request.resend_count"] = resend
        if error:
            a["error.type"] = error[0]
        self._emit(f"chat {self.model}", "CLIENT", start, self.t, a, error)
        self.progress = False

    def tool(self, name: str, args: dict[str, Any] | None, *, fail: bool | None = None,
             retry: bool = True) -> None:
        """One tool call; a transient failure is retried once with identical arguments (unless
        ``retry`` is False). ``args`` None: a tool without arguments."""
        rng = self.rng
        action, (lo, hi), flaky = _TOOLS[name]
        if fail is None:
            fail = flaky and rng.random() < 0.06
        payload = None if args is None else orjson.dumps(args).decode()
        for attempt in range(2 if fail and retry else 1):
            self.wait(0.02, 0.3) if attempt == 0 else self.wait(0.5, 3.0)  # retry backoff
            start = self.t
            self.t += max(1_000_000, int(rng.uniform(lo, hi) * self.scale * _S))
            a: dict[str, Any] = {
                "gen_ai.operation.name": "execute_tool",
                "gen_ai.tool.name": name,
                "gen_ai.tool.type": "function",
                "gen_ai.tool.call.id": f"call_{rng.getrandbits(96):024x}",
                "tool.action_class": action,
            }
            if payload is not None:
                a["gen_ai.tool.call.arguments"] = payload
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
            "agent.outcome": "failure" if injected and injected != "silent" else "success",
        }
        attrs.update(self.extra)
        error = None
        if injected:
            attrs["sim.injected"] = injected
        if injected and injected != "silent":  # a silent success claims success, by definition
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
        # an on-call agent polling three argument-less tools round and round: no argument hash, so
        # the repeat rule needs 6 calls of one tool while the cycle (period 3) closes at the 9th call
        calls = rng.sample(("get_queue_depth", "list_open_alerts", "check_deploy_status"), 3)
        for i in range(4):
            s.chat("new" if i == 0 else "same", out_tokens=rng.randrange(60, 200))
            for name in calls:
                s.tool(name, None, fail=False)
    elif kind == "stagnation":
        for i in range(7):
            s.chat("new" if i == 0 else "same", out_tokens=rng.randrange(200, 800))
    elif kind == "session_storm":
        # the provider rate-limits this session: the HTTP client resends one request 11 times
        for k in range(12):
            if k:
                s.wait(1.0, 2.5)  # client backoff
            s.model_call(secs=rng.uniform(0.2, 0.6), in_tokens=s.context, out_tokens=0, state="none",
                         error=("429", "upstream returned HTTP 429 Too Many Requests"), resend=k)
        s.chat("new", out_tokens=rng.randrange(100, 400))
    elif kind == "route_storm":
        # the storm route is overloaded: every agent on it resends; the 6th resend goes through
        for k in range(7):
            if k:
                s.wait(0.8, 2.0)
            ok = k == 6
            s.model_call(secs=rng.uniform(0.3, 0.9) if not ok else rng.uniform(1.5, 3.0), in_tokens=s.context,
                         out_tokens=rng.randrange(80, 400), state="new" if ok else "none",
                         error=None if ok else ("529", "upstream returned HTTP 529 Overloaded"), resend=k)
        for i in range(3):  # then it goes on working (slowed down by a route throttle)
            s.tool("search", {"query": f"{rng.choice(_TOPICS)} {rng.choice(_QUERY_SUFFIX)}", "top_k": 5 + i}, fail=False)
            s.chat("new", out_tokens=rng.randrange(80, 300))
    elif kind == "session_cost":
        # a summarizer re-reading a huge document every turn: each call is new work (the state
        # changes), but ~$0.5 per call, several calls a minute
        for i in range(14):
            s.model_call(secs=rng.uniform(3.0, 4.5), in_tokens=150_000 + 3_000 * i + rng.randrange(2_000),
                         out_tokens=rng.randrange(400, 900))
    elif kind == "tenant_cost":
        # one of several agents of the same tenant doing a bulk job: each session stays under the
        # session limits, together they spend far above the tenant's learned per-minute baseline
        for i in range(6):
            s.model_call(secs=rng.uniform(3.0, 4.5), in_tokens=60_000 + rng.randrange(20_000),
                         out_tokens=rng.randrange(800, 1500))
    elif kind == "deadlock":
        # a planner revises step "draft" to need "review", which already needs "draft": a cycle
        s.tool("search", {"query": f"{rng.choice(_TOPICS)} {rng.choice(_QUERY_SUFFIX)}", "top_k": 8}, fail=False)
        rev = [{"id": "draft", "depends_on": ["collect", "review"], "revision": 1}]
        s.chat("new", out_tokens=rng.randrange(100, 300), attrs={"plan.steps": orjson.dumps(rev).decode()})
        for i in range(6):  # the workers wait on each other, polling
            s.tool("get_job_status", {"job_id": f"job-{rng.getrandbits(40):010x}", "step": ("draft", "review")[i % 2]},
                   fail=False)
            s.chat("new", out_tokens=rng.randrange(40, 120))
    elif kind == "silent":
        # the export fails, the agent never retries it, and still reports success
        table = rng.choice(_TABLES)
        s.tool("run_sql", {"database": "warehouse", "query": f"INSERT INTO reports.{table}_daily SELECT * FROM staging.{table}"},
               fail=True, retry=False)
        s.chat("new", out_tokens=rng.randrange(100, 300))
        s.tool("send_email", {"to": f"{rng.choice(_PEOPLE)}@example.com", "subject": f"Daily {table} report published",
                              "body": "All done."}, fail=False)
        s.chat("new", out_tokens=rng.randrange(200, 600))
    else:
        raise ValueError(f"unknown injected kind {kind!r}; expected one of {LOOP_KINDS}")


def build_session(seed: int, index: int, start_ns: int, *, kind: str | None = None, tenants: int = 3,
                  time_scale: float = 1.0, salt: str = "", stretch: bool = True) -> list[dict[str, Any]]:
    """All spans of one agent run (session ``index``), in end-time order, root span last.

    Healthy and looping runs are stretched to 1–3 minutes (times ``time_scale``) unless ``stretch``
    is False (the live demo's injected agents get to the point at once).

    >>> spans = build_session(7, 0, 10**18, kind="stagnation")
    >>> root = spans[-1]
    >>> root["parent_span_id"] is None, root["attributes"]["sim.injected"]
    (True, 'stagnation')
    >>> 60 <= (root["end_time_unix_nano"] - root["start_time_unix_nano"]) / 1e9 <= 240
    True
    """
    if tenants < 1:
        raise ValueError("tenants must be >= 1")
    if kind is not None and kind not in PATTERNS:
        raise ValueError(f"unknown injected kind {kind!r}; expected one of {PATTERNS}")
    rng = random.Random(f"breakwater-sim:{seed}:{salt}:{index}")
    names = [_TENANTS[i] if i < len(_TENANTS) else f"tenant-{i:02d}" for i in range(tenants)]
    tenant = rng.choice(names)
    agent = rng.choice(_AGENTS)
    model = rng.choice(_MODELS)
    if kind == "route_storm":
        model = STORM_MODEL
    elif kind in ("session_cost", "tenant_cost"):
        model = COST_MODEL
    if kind == "tenant_cost":
        tenant = SPIKE_TENANT
    s = _Session(rng, session_id(seed, index, salt), tenant, agent, model, start_ns, time_scale)
    if kind == "deadlock":
        s.extra["workflow.id"] = f"wf-{s.sid.removeprefix('sess-')}"
    target_s = rng.uniform(60.0, 180.0)
    turns = _SCENARIOS[agent[2]](rng)
    if kind in LOOP_KINDS:
        turns = turns[: rng.randrange(1, 3)]
    elif kind == "silent":
        turns = turns[:1]
    elif kind is not None:
        turns = []
    # the first chat often carries the plan (acyclic, every dependency known)
    plan = None
    if kind == "deadlock":
        steps = [{"id": "collect", "depends_on": []}, {"id": "draft", "depends_on": ["collect"]},
                 {"id": "review", "depends_on": ["draft"]}, {"id": "publish", "depends_on": ["review"]}]
        plan = {"plan.steps": orjson.dumps(steps).decode()}
    elif rng.random() < 0.3:
        steps = [{"id": f"step{i + 1}", "depends_on": [f"step{i}"] if i else []} for i in range(len(turns))]
        plan = {"plan.steps": orjson.dumps(steps).decode()}
    s.chat("new", attrs=plan)
    _healthy_turns(s, turns)
    if kind is not None:
        _inject(s, kind)
    else:
        s.chat(out_tokens=rng.randrange(200, 1200))  # the final answer
    # stretch short runs to a realistic 1–3 minutes: user think time / queueing between steps
    # (not the injected storms, spikes, deadlocks and silent successes: their timing is the pattern)
    natural = s.t - start_ns
    want = int(target_s * time_scale * _S)
    if stretch and natural < want and len(s.spans) > 1 and (kind is None or kind in LOOP_KINDS):
        extra = (want - natural) // len(s.spans)
        shift = 0
        for sp in s.spans:
            shift += extra
            sp["start_time_unix_nano"] += shift
            sp["end_time_unix_nano"] += shift
        s.t += shift
    return s.finish(kind)


def tenant_history(seed: int, end_ns: int, *, minutes: int = HISTORY_MINUTES, salt: str = "") -> list[dict[str, Any]]:
    """Normal spending of :data:`SPIKE_TENANT` in the ``minutes`` before ``end_ns``: one small
    agent run per minute (≈ $0.1), so the tenant baseline of cost_velocity is warm (15 minutes) when
    the injected spike comes. Spans in end-time order, all ending before ``end_ns``.

    >>> h = tenant_history(1, 10**18)
    >>> len({s["trace_id"] for s in h}), {s["resource"]["tenant.id"] for s in h}
    (20, {'cyberdyne'})
    >>> max(s["end_time_unix_nano"] for s in h) < 10**18, 0.02 < sum(s["attributes"].get("gen_ai.usage.cost", 0) for s in h) / 20 < 0.2
    (True, True)
    """
    out: list[dict[str, Any]] = []
    for m in range(minutes, 0, -1):
        rng = random.Random(f"breakwater-sim:{seed}:{salt}:history:{m}")
        start = end_ns - m * 60 * _S + int(rng.uniform(2.0, 20.0) * _S)
        s = _Session(rng, session_id(seed, m, f"{salt}:history"), SPIKE_TENANT, _AGENTS[2], COST_MODEL, start, 1.0)
        s.model_call(secs=rng.uniform(1.0, 3.0), in_tokens=rng.randrange(8_000, 14_000), out_tokens=rng.randrange(200, 500))
        s.tool("run_sql", {"database": "analytics", "query": f"SELECT count(*) FROM {rng.choice(_TABLES)} WHERE day = current_date - {m}"},
               fail=False)
        s.model_call(secs=rng.uniform(1.0, 3.0), in_tokens=rng.randrange(8_000, 14_000), out_tokens=rng.randrange(200, 500))
        out.extend(s.finish(None))
    out.sort(key=lambda sp: sp["end_time_unix_nano"])
    return out


def _arrivals(seed: int, mean_gap_s: float, salt: str = "") -> Iterator[int]:
    rng = random.Random(f"breakwater-sim:{seed}:{salt}:arrivals")
    t = 0
    while True:
        yield t
        t += int(rng.expovariate(1.0 / mean_gap_s) * _S) + 1


def generate(seed: int, sessions: int, start_ns: int, *, loops: int, tenants: int = 3,
             mean_gap_s: float = 2.0, time_scale: float = 1.0, inject: Iterable[str] = ()) -> Iterator[dict[str, Any]]:
    """Yield the flat spans (README "What producers send") of ``sessions`` agent runs in event-time order.

    Sessions start ``mean_gap_s`` apart on average (Poisson arrivals) and last 1–3 minutes
    (times ``time_scale``), so many run concurrently. The first ``loops`` sessions are injected
    loops, the next ones the patterns of ``inject`` (see :func:`injected_sessions`); with
    ``tenant_cost`` the spike tenant's :func:`tenant_history` comes first, in the 20 minutes before
    ``start_ns``. Same arguments → same spans, byte for byte.

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
    inject = _check_inject(inject)
    if "tenant_cost" in inject and sessions > loops:
        yield from tenant_history(seed, start_ns)
    arrivals = _arrivals(seed, mean_gap_s * time_scale)
    heap: list[tuple[int, int, dict[str, Any]]] = []
    seq = itertools.count()
    i = 0
    next_start = start_ns + next(arrivals)
    while True:
        # a session starting after the earliest pending end cannot emit anything before it
        while i < sessions and (not heap or next_start <= heap[0][0]):
            for sp in build_session(seed, i, next_start, kind=injected_kind(i, loops, inject), tenants=tenants,
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


# ----------------------------------------------------------------------------- agents that obey the breaker

DEMO_SCHEDULE: tuple[tuple[float, str], ...] = (
    (1.0, "repeat"), (2.0, "silent"), (3.0, "session_cost"), (4.0, "cycle"), (5.0, "deadlock"),
    (6.0, "stagnation"), (7.0, "session_storm"),
    *((8.0 + 1.5 * i, "route_storm") for i in range(GROUP_SIZE["route_storm"])),
    *((9.0 + 2.5 * i, "tenant_cost") for i in range(GROUP_SIZE["tenant_cost"])),
)
"""When (seconds into each round) the live fleet starts each injected agent: every pattern once."""


@dataclass
class Agent:
    """One live simulated agent run, as :class:`AgentFleet` reports it."""

    sid: str
    kind: str | None
    tenant: str
    workflow: str | None
    started: float
    calls: int = 0
    spend_usd: float = 0.0
    throttled_s: float = 0.0
    stopped: Any = None  # the Decision that stopped it
    stopped_at: float | None = None
    finished_at: float | None = None


def _route_of(attrs: dict[str, Any]) -> str | None:
    if attrs.get("gen_ai.operation.name") == "chat":
        return f"{attrs.get('gen_ai.provider.name')}/{attrs.get('gen_ai.request.model')}"
    return attrs.get("gen_ai.tool.name")


class AgentFleet:
    """Simulated agents running live behind a gateway client (:class:`streams.gateway.BreakerClient`).

    Each agent run is planned by :func:`build_session` with event time = now; before each model or
    tool call the agent asks ``breaker.check(session, tenant, workflow, route, tool)`` and obeys:
    a deny (``halt``, ``hold``, ``trip``) stops the agent (its root span ends with the breaker's
    error), a ``throttle`` without a token makes it wait ``retry_after_s`` (the rest of its run
    shifts later). Spans are published once their end time has passed, in JSON arrays keyed by
    session. ``on_event(event, agent, decision)`` reports ``start``, ``throttled`` (once per agent
    and scope), ``stopped`` and ``finished``.
    """

    def __init__(self, settings: Settings, breaker: Any, *, seed: int = 7, producer: Any = None,
                 on_event: Any = None, healthy_per_s: float = 1.0, healthy_scale: float = 0.1,
                 injected_scale: float = 0.5, tenants: int = 3,
                 schedule: tuple[tuple[float, str], ...] = DEMO_SCHEDULE, round_s: float = 90.0) -> None:
        self.settings, self.breaker, self.seed = settings, breaker, seed
        self.producer = producer
        self.on_event = on_event or (lambda *a: None)
        self.healthy_per_s, self.healthy_scale, self.injected_scale = healthy_per_s, healthy_scale, injected_scale
        self.tenants, self.schedule, self.round_s = tenants, schedule, round_s
        self.nonce = f"{time.time_ns() // 1_000_000:x}"
        self.stats = PublishStats()
        self.agents: dict[str, Agent] = {}
        self._queue: list[dict[str, Any]] = []
        self._tasks: set[asyncio.Task[Any]] = set()

    async def publish_history(self, now_ns: int | None = None) -> int:
        """Publish :func:`tenant_history` (event times in the 20 minutes before now) for the tenant
        spike; returns the span count."""
        if self.producer is None:
            raise RuntimeError("publish_history needs a started producer (AgentFleet(producer=…))")
        spans = tenant_history(self.seed, time.time_ns() if now_ns is None else now_ns, salt=self.nonce)
        sender = _Sender(self.producer, self.settings.topic_spans, self.stats)
        for key, value, n in messages(spans, 500, self.settings.max_message_bytes):
            await sender.send(key, value, n)
        await sender.drain()
        return len(spans)

    async def run(self, duration_s: float | None) -> PublishStats:
        """Start agents for ``duration_s`` (None: until cancelled), then stop the ones still running."""
        own = self.producer is None
        if own:
            self.producer = _producer(self.settings)
            await self.producer.start()
        flusher = asyncio.create_task(self._flush_loop())
        try:
            await self._start_agents(duration_s)
        finally:
            for t in list(self._tasks):
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            flusher.cancel()
            await asyncio.gather(flusher, return_exceptions=True)
            await self._flush()
            if own:
                await self.producer.stop()
        return self.stats

    async def _start_agents(self, duration_s: float | None) -> None:
        t0 = time.monotonic()
        plan: list[tuple[float, str | None]] = []
        healthy = injected = 0
        rnd = 0
        while True:
            elapsed = time.monotonic() - t0
            if duration_s is not None and elapsed >= duration_s:
                return
            if not plan or plan[0][0] > elapsed:
                if not plan:  # the next round: the schedule, plus healthy arrivals
                    base = rnd * self.round_s
                    plan = sorted([(base + off, kind) for off, kind in self.schedule]
                                  + [(base + k / self.healthy_per_s, None)
                                     for k in range(int(self.round_s * self.healthy_per_s))],
                                  key=lambda x: x[0])
                    rnd += 1
                    continue
                await asyncio.sleep(min(0.2, plan[0][0] - elapsed))
                continue
            _, kind = plan.pop(0)
            now = time.time_ns()
            if kind is None:
                spans = build_session(self.seed, healthy, now, tenants=self.tenants, time_scale=self.healthy_scale,
                                      salt=f"{self.nonce}:h")
                healthy += 1
            else:
                spans = build_session(self.seed, injected, now, kind=kind, tenants=self.tenants,
                                      time_scale=self.injected_scale, salt=f"{self.nonce}:i", stretch=False)
                injected += 1
                self.stats.injected += 1
            self.stats.sessions += 1
            root = spans[-1]["attributes"]
            agent = Agent(sid=root["gen_ai.conversation.id"], kind=kind, tenant=spans[-1]["resource"]["tenant.id"],
                          workflow=root.get("workflow.id"), started=time.time())
            self.agents[agent.sid] = agent
            self.on_event("start", agent, None)
            task = asyncio.create_task(self._agent(agent, spans))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _sleep_until(self, t_ns: int) -> None:
        delay = (t_ns - time.time_ns()) / _S
        if delay > 0:
            await asyncio.sleep(delay)

    async def _agent(self, agent: Agent, spans: list[dict[str, Any]]) -> None:
        children, root = spans[:-1], spans[-1]
        shift = 0
        seen_throttle: set[str | None] = set()
        end = root["start_time_unix_nano"]
        for sp in children:
            a = sp["attributes"]
            await self._sleep_until(sp["start_time_unix_nano"] + shift)
            route, tool = _route_of(a), a.get("gen_ai.tool.name")
            while True:
                d = self.breaker.check(session=agent.sid, tenant=agent.tenant, workflow=agent.workflow,
                                       route=route, tool=tool)
                if d.allow:
                    break
                if d.action == "throttle":
                    wait = max(0.05, min(5.0, d.retry_after_s or 0.5))
                    if d.scope not in seen_throttle:
                        seen_throttle.add(d.scope)
                        self.on_event("throttled", agent, d)
                    agent.throttled_s += wait
                    await asyncio.sleep(wait)
                    continue
                agent.stopped, agent.stopped_at = d, time.time()
                now = time.time_ns()
                root["end_time_unix_nano"] = max(now, end)
                root["status"] = {"code": "ERROR", "message": f"stopped by the circuit breaker: {d.action} on {d.scope}"}
                root["attributes"].update({"agent.outcome": "failure", "error.type": f"breakwater.{d.action}"})
                self._queue.append(root)
                self.on_event("stopped", agent, d)
                return
            shift = max(shift, time.time_ns() - sp["start_time_unix_nano"])
            sp["start_time_unix_nano"] += shift
            sp["end_time_unix_nano"] += shift
            end = sp["end_time_unix_nano"]
            await self._sleep_until(end)
            self._queue.append(sp)
            agent.calls += 1
            agent.spend_usd += float(a.get("gen_ai.usage.cost") or 0.0)
        root["end_time_unix_nano"] += shift
        await self._sleep_until(root["end_time_unix_nano"])
        self._queue.append(root)
        agent.finished_at = time.time()
        self.on_event("finished", agent, None)

    async def _flush(self) -> None:
        ready, self._queue = self._queue, []
        if not ready:
            return
        ready.sort(key=lambda s: s["end_time_unix_nano"])
        sender = _Sender(self.producer, self.settings.topic_spans, self.stats)
        for key, value, n in messages(ready, 500, self.settings.max_message_bytes):
            await sender.send(key, value, n)
        await sender.drain()

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(0.05)
            await self._flush()
