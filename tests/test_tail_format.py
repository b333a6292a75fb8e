"""``breakwater tail`` formatting and filtering, without a broker."""

from __future__ import annotations

import io
import re

import orjson
import pytest

from streams import tail as tl
from streams.models import BreakerCommand, CommandScope, Incident, IncidentScope
from streams.tail import BadRecord, Filters, Printer, format_command, format_incident, render

ANSI = re.compile(r"\x1b\[[0-9;]*m")

INCIDENT = Incident(
    incident_id="inc-7a1c",
    detector="no_progress_loop",
    severity="critical",
    status="open",
    scope=IncidentScope(kind="session", key="sess-1"),
    tenant="acme",
    session_id="sess-1",
    workflow_id=None,
    trace_ids=["ab" * 16],
    first_seen="2026-01-01T12:00:00.000000Z",
    last_seen="2026-01-01T12:00:03.120456Z",
    detected_at="2026-01-01T12:00:03.120456Z",
    summary="Session sess-1 called tool 'search' 3 times with the same arguments in 3 s without progress.",
    evidence={"rule": "repeat", "fingerprint": {"tool": "search", "args_hash": "0f3e"}, "span_ids": ["cd" * 8]},
    breaker_command_id="cmd-51b2",
    policy_mode="enforce",
)
COMMAND = BreakerCommand(
    command_id="cmd-51b2",
    action="halt",
    scope=CommandScope(kind="session", key="sess-1", tenant="acme"),
    mode="enforce",
    reason="no_progress_loop:repeat",
    detector="no_progress_loop",
    incident_id="inc-7a1c",
    issued_at="2026-01-01T12:00:03.120456Z",
    expires_at="2026-01-01T12:15:03.120456Z",
)


def inc(**kw) -> dict:
    return {**orjson.loads(INCIDENT.model_dump_json()), **kw}


def cmd(**kw) -> dict:
    return {**orjson.loads(COMMAND.model_dump_json()), **kw}


# ----------------------------------------------------------------------------- formatting


def test_incident_line_from_the_real_model():
    line = render(INCIDENT.model_dump_json().encode(), "incidents")
    assert line == ("2026-01-01T12:00:03.120Z  CRITICAL  no_progress_loop  session:sess-1  open      "
                    "Session sess-1 called tool 'search' 3 times with the same arguments in 3 s without progress."
                    "  [cmd-51b2]")


def test_command_line_from_the_real_model():
    line = render(COMMAND.model_dump_json().encode(), "breaker")
    assert line == "2026-01-01T12:00:03.120Z  HALT      session:sess-1  enforce  expires 2026-01-01T12:15:03Z  no_progress_loop:repeat"


@pytest.mark.parametrize("status", ["open", "updated", "resolved"])
def test_incident_statuses_and_colour(status):
    plain = format_incident(inc(status=status), color=False)
    colored = format_incident(inc(status=status), color=True)
    assert f"  {status}" in plain
    assert ANSI.search(colored) and ANSI.sub("", colored) == plain


def test_warning_and_shadow_and_no_command():
    line = format_incident(inc(severity="warning", detector="plan_deadlock", policy_mode="shadow",
                               breaker_command_id=None, scope={"kind": "workflow", "key": "wf-9"}))
    assert line.startswith("2026-01-01T12:00:03.120Z  WARNING   plan_deadlock     workflow:wf-9  open")
    assert line.endswith("(shadow)") and "[cmd" not in line


def test_command_variants():
    thr = format_command(cmd(action="throttle", scope={"kind": "route", "key": "openai/gpt-4o", "tenant": "globex"},
                             mode="shadow", rate_limit_per_s=2.5, reason="retry_storm:route"))
    assert thr == ("2026-01-01T12:00:03.120Z  THROTTLE  route:openai/gpt-4o tenant:globex  shadow   expires 2026-01-01T12:15:03Z  "
                   "limit 2.5/s  retry_storm:route")
    rel = format_command(cmd(action="release", expires_at=None, reason="expired"))
    assert rel == "2026-01-01T12:00:03.120Z  RELEASE   session:sess-1  enforce  expired"
    colored = format_command(cmd(), color=True)
    assert ANSI.sub("", colored) == format_command(cmd())


def test_times_carry_date_and_zone():
    """Regression (issue 13): a bare 12:00:03 is ambiguous across days and zones."""
    stamp = r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}"
    inc_line = format_incident(inc(detected_at="2026-12-07T18:40:12.5Z"))
    assert re.match(stamp + r"\.\d{3}Z  ", inc_line) and inc_line.startswith("2026-12-07T18:40:12.500Z")
    cmd_line = format_command(cmd(issued_at="2026-12-07T23:59:59Z", expires_at="2026-12-08T00:14:59Z"))
    assert cmd_line.startswith("2026-12-07T23:59:59.000Z  HALT")
    assert re.search(r"  expires " + stamp + "Z  ", cmd_line) and "expires 2026-12-08T00:14:59Z" in cmd_line
    # a naive time is taken as UTC; a missing one keeps the column width
    assert format_incident(inc(detected_at="2026-01-01T12:00:03")).startswith("2026-01-01T12:00:03.000Z  ")
    missing = format_incident(inc(detected_at=None))
    assert missing.startswith("????-??-??T??:??:??.???Z  ") and len(missing) == len(format_incident(inc()))


def test_times_are_utc_whatever_the_offset():
    assert format_incident(inc(detected_at="2026-01-01T13:00:03.5+01:00")).startswith("2026-01-01T12:00:03.500Z  ")


@pytest.mark.parametrize("d", [
    {},
    {"scope": "session:s1", "detected_at": 17, "severity": None, "summary": ["x"]},
    {"detected_at": "yesterday", "scope": {"kind": None}, "status": {"a": 1}},
])
def test_malformed_records_never_crash(d):
    assert isinstance(format_incident(d, True), str)
    assert isinstance(format_command(d, True), str)
    assert "??:??:??" in format_incident(d)


def test_hostile_strings_cannot_escape_the_line():
    evil = "boom\x1b]0;pwned\x07\n\r\u202eevil\x9b31m"
    line = format_incident(inc(summary=evil, scope={"kind": "session", "key": "s\x1b[2J"}), color=False)
    assert "\n" not in line and "\r" not in line and "\x1b" not in line and "\u202e" not in line
    assert "\x9b" not in line and "\x07" not in line
    assert "\\x1b" in line and "\\u202e" in line
    js = render(orjson.dumps(inc(summary=evil)), "incidents", as_json=True)
    assert "\n" not in js and "\x9b" not in js and "\u202e" not in js
    assert orjson.loads(js)["summary"] == evil  # still the same value, just escaped


def test_json_mode_never_prints_raw_arguments():
    d = inc(evidence={"rule": "repeat", "gen_ai.tool.call.arguments": '{"password": "hunter2"}',
                      "nested": [{"gen_ai.prompt.0.content": "secret prompt", "ok": 1}]})
    js = render(orjson.dumps(d), "incidents", as_json=True)
    assert "hunter2" not in js and "secret prompt" not in js
    assert orjson.loads(js)["evidence"] == {"rule": "repeat", "nested": [{"ok": 1}]}
    assert "hunter2" not in render(orjson.dumps(d), "incidents")


# ----------------------------------------------------------------------------- filters


@pytest.mark.parametrize(("filters", "shown"), [
    (Filters(), True),
    (Filters(detector="no_progress_loop"), True),
    (Filters(detector="retry_storm"), False),
    (Filters(tenant="acme"), True),
    (Filters(tenant="globex"), False),
    (Filters(severity="critical"), True),
    (Filters(severity="warning"), False),
    (Filters(since_ns=1_000 * 10**6), True),
    (Filters(since_ns=3_000 * 10**6), False),
])
def test_incident_filters(filters, shown):
    out = render(orjson.dumps(inc()), "incidents", filters=filters, timestamp_ms=2_000)
    assert (out is not None) == shown


@pytest.mark.parametrize(("filters", "shown"), [
    (Filters(detector="no_progress_loop"), True),
    (Filters(detector="cost_velocity"), False),
    (Filters(tenant="acme"), True),
    (Filters(tenant="globex"), False),
    (Filters(severity="warning"), True),  # commands have no severity: the filter does not apply
])
def test_command_filters(filters, shown):
    assert (render(orjson.dumps(cmd()), "breaker", filters=filters) is not None) == shown


def test_tenant_filter_on_tenant_scopes():
    d = cmd(action="throttle", scope={"kind": "tenant", "key": "globex", "tenant": None}, detector="cost_velocity")
    assert render(orjson.dumps(d), "breaker", filters=Filters(tenant="globex")) is not None
    manual = cmd(action="release", detector=None, scope={"kind": "session", "key": "s", "tenant": None})
    assert render(orjson.dumps(manual), "breaker", filters=Filters(detector="no_progress_loop")) is None


# ----------------------------------------------------------------------------- bad records, printer


@pytest.mark.parametrize(("value", "why"), [(b"{nope", "not JSON"), (b"[1, 2]", "not a JSON object"),
                                            (b"42", "not a JSON object"), (b"\xff\xfe", "not JSON")])
def test_bad_records(value, why):
    with pytest.raises(BadRecord, match=why):
        render(value, "incidents")


def test_printer_counts_and_warns():
    out, err = io.StringIO(), io.StringIO()
    p = Printer("incidents", out=out, err=err, color=False, filters=Filters(tenant="acme"))
    assert p.handle(orjson.dumps(inc())) is True
    assert p.handle(orjson.dumps(inc(tenant="globex"))) is False
    assert p.handle(b"garbage", topic="agent.incidents", partition=1, offset=9) is False
    assert p.handle(b"[]", topic="agent.incidents", partition=1, offset=10) is False
    assert p.handle(None) is False
    assert p.stats == tl.TailStats(printed=1, filtered=1, bad=2, tombstones=1)
    assert out.getvalue().count("\n") == 1
    assert err.getvalue().splitlines() == [
        "breakwater tail: skipped unparseable record agent.incidents[1]@9 (not JSON); 1 so far",
        "breakwater tail: skipped unparseable record agent.incidents[1]@10 (not a JSON object); 2 so far",
    ]


def test_what_is_checked():
    with pytest.raises(ValueError):
        render(b"{}", "spans")
    with pytest.raises(ValueError):
        Printer("spans", out=io.StringIO(), err=io.StringIO(), color=False)


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_colour_auto(monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    assert tl.use_color(Tty()) is True
    assert tl.use_color(io.StringIO()) is False
    assert tl.use_color(Tty(), False) is False
    monkeypatch.setenv("NO_COLOR", "1")
    assert tl.use_color(Tty()) is False
