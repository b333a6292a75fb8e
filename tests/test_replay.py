"""``breakwater replay`` end to end (a subprocess, as a user runs it): every loop kind of README "Detectors"
found, nothing in the benign cases, in every encoding, byte-identical on a second run."""

from __future__ import annotations

import subprocess
import sys

import orjson
import pytest

from tests.scenarios import scenarios, write_all


def _label(incident: dict) -> str:
    ev = incident["evidence"]
    if incident["detector"] == "no_progress_loop":
        return ev["rule"]
    if incident["detector"] == "silent_success":
        return ev["gaps"][0]["kind"]
    if incident["detector"] == "retry_storm":
        return f"{incident['scope']['kind']}_storm"
    if incident["detector"] == "cost_velocity":
        return "tenant_spike" if incident["scope"]["kind"] == "tenant" else ev["rule"]
    return "deadlock"


def _who(incident: dict) -> str:
    if incident["scope"]["kind"] in ("route", "tenant"):
        return incident["tenant"] or incident["scope"]["key"]
    return incident["session_id"]


def _who_span(span: dict) -> str:
    if span["attributes"].get("http.request.resend_count") and span["resource"]["tenant.id"] == "storm-co":
        return "storm-co"
    if span["resource"]["tenant.id"] == "spiky-co":
        return "spiky-co"
    return span["attributes"]["gen_ai.conversation.id"]


def replay(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "streams", "replay", *args], input=stdin,
                          capture_output=True, timeout=120, check=False)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_all(tmp_path_factory.mktemp("replay"))


@pytest.mark.parametrize("fmt", ["jsonl", "array", "otlp"])
def test_finds_each_loop_and_nothing_benign(files, fmt, tmp_path):
    cmds = tmp_path / "cmds.jsonl"
    r = replay(str(files[fmt]), "--commands", str(cmds))
    assert r.returncode == 0, r.stderr.decode()
    incidents = [orjson.loads(line) for line in r.stdout.splitlines()]
    opened = {_who(i): _label(i) for i in incidents if i["status"] == "open"}
    want = {_who_span(spans[-1]): rule for spans, rule in scenarios().values() if rule is not None}
    assert opened == want
    every = [orjson.loads(line) for line in cmds.read_bytes().splitlines()]
    commands = [c for c in every if c["action"] != "release"]
    releases = [c for c in every if c["action"] == "release"]
    # every command is released exactly once: early when its episode resolves (loops, storms),
    # else at its expiry (at the end of input the watermark passes every TTL)
    assert sorted(r["incident_id"] for r in releases) == sorted(c["incident_id"] for c in commands)
    expires = {c["incident_id"]: c["expires_at"] for c in commands}
    for rel in releases:
        assert rel["expires_at"] is None
        if rel["reason"] == "expired":
            assert rel["issued_at"] == expires[rel["incident_id"]]
        else:
            assert rel["reason"].startswith("resolved") and rel["issued_at"] < expires[rel["incident_id"]]
    actions = {(c["detector"], c["action"], c["scope"]["kind"]) for c in commands}
    assert actions == {("no_progress_loop", "halt", "session"), ("silent_success", "hold", "session"),
                       ("plan_deadlock", "halt", "workflow"), ("retry_storm", "throttle", "route"),
                       ("retry_storm", "throttle", "session"), ("cost_velocity", "halt", "session"),
                       ("cost_velocity", "throttle", "tenant")}
    route = next(c for c in commands if c["scope"]["kind"] == "route")
    assert route["scope"]["tenant"] == "storm-co" and route["rate_limit_per_s"] >= 1
    assert {c["scope"]["key"] for c in commands if c["scope"]["kind"] == "workflow"} == {"wf-dead"}
    assert all(c["mode"] == "enforce" for c in commands)
    # privacy: no raw tool arguments anywhere in the outputs
    assert b"SECRET" not in r.stdout + cmds.read_bytes() + r.stderr
    assert b"0 rejected" in r.stderr


@pytest.mark.parametrize("fmt", ["jsonl", "array", "otlp"])
def test_byte_identical_on_second_run(files, fmt):
    a, b = replay(str(files[fmt])), replay(str(files[fmt]))
    assert a.stdout and a.stdout == b.stdout


def test_same_incidents_in_every_encoding(files):
    outs = {fmt: replay(str(p)).stdout for fmt, p in files.items()}
    assert outs["jsonl"] == outs["array"] == outs["otlp"]


def test_bad_lines_are_counted_not_fatal(files):
    data = files["jsonl"].read_bytes()
    lines = data.splitlines()
    noisy = b"\n".join(lines[:5] + [b"{not json", b"\xff\xfe", b'{"trace_id": 1}'] + lines[5:]) + b"\n"
    r = replay("-", stdin=noisy)
    assert r.returncode == 0
    assert r.stdout == replay(str(files["jsonl"])).stdout
    assert b"3 rejected" in r.stderr


def test_missing_file_is_a_clear_error(tmp_path):
    r = replay(str(tmp_path / "nope.jsonl"))
    assert r.returncode == 2 and b"nope.jsonl" in r.stderr


def test_rejected_lines_are_named_by_file_and_line(files, tmp_path):
    good = files["jsonl"].read_bytes().splitlines()
    bad = tmp_path / "noisy.jsonl"
    bad.write_bytes(b"\n".join(good[:2] + [b"", b"{not json"] + good[2:4] + [b'{"trace_id": 1}']) + b"\n")
    r = replay(str(files["jsonl"]), str(bad))
    assert r.returncode == 0
    assert f"rejected at {bad}:4 (bad_json), {bad}:7 (".encode() in r.stderr, r.stderr


def test_batch_size_changes_only_the_order_within_a_batch(files):
    whole = replay(str(files["otlp"]))
    one = replay("--batch", "1", str(files["otlp"]))
    assert whole.returncode == one.returncode == 0
    assert sorted(whole.stdout.splitlines()) == sorted(one.stdout.splitlines())
    assert replay("--batch", "0", str(files["otlp"])).returncode == 2


def test_progress_goes_to_stderr_and_never_changes_the_output(files):
    import io

    from streams.replay import progress_line, run

    seen = []
    out_a, out_b = io.BytesIO(), io.BytesIO()
    with open(files["jsonl"], "rb") as fp:
        run([fp], out_a, progress=seen.append, progress_every_s=0)
    with open(files["jsonl"], "rb") as fp:
        stats = run([fp], out_b)
    assert out_a.getvalue() == out_b.getvalue()
    err = io.BytesIO()
    progress_line(stats, 0.0, err)
    assert err.getvalue().startswith(b"replay: \xe2\x80\xa6 ") and b"spans/s" in err.getvalue()
    assert len(seen) == stats.documents // 256
