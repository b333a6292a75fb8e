"""The README's demo command works as written: `bash deploy/demo.sh --duration N` (the install step
is skipped while `.venv` is fresh) tells the whole story — incidents from all five detectors,
agents that obey the breaker ("halted → agent stopped → released"), a summary per detector, and
what a second terminal needs — then stops everything it started."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: The README's line, run verbatim (only the duration is shorter than its example's 90 s: every
#: detector's first incident comes within ~45 s of the agents' start, the tenant spike's at the close
#: of its event-time minute, so at most ~66 s; the agents start ~6 s after the command).
DEMO_LINE = "bash deploy/demo.sh --duration 90"  # the README's line, verbatim
DETECTORS = ("no_progress_loop", "retry_storm", "cost_velocity", "plan_deadlock", "silent_success")


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:  # a zombie awaiting its reaper counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def _stop(proc: subprocess.Popen[bytes], pids: list[int]) -> None:
    """Stop what the test started, by pid: the demo's process group, then the children it named
    (the worker and the broker run in process groups of their own)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        except ProcessLookupError:
            pass
    for pid in pids:
        if not _gone(pid):
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def test_readme_has_the_demo_line():
    """The line the live test runs is the README's (with a shorter duration)."""
    readme = (ROOT / "README.md").read_text()
    assert "bash deploy/demo.sh" in readme
    assert re.search(r"deploy/demo\.sh --duration \d+", readme)


def test_demo_passes_its_arguments_to_breakwater_dev_not_to_pip():
    """The old bug: `source setup.sh` without arguments handed it `--duration 60` as pip extras."""
    r = subprocess.run(["bash", "deploy/demo.sh", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert "usage: breakwater dev" in r.stdout and "--duration" in r.stdout
    assert "InvalidRequirement" not in r.stderr and "bad extras" not in r.stderr
    if "installing" in r.stderr:  # pyproject.toml is newer than .venv's install stamp: it says so first
        assert "setup: installing Breakwater into .venv (first run: about a minute)" in r.stderr, r.stderr
    leaked = subprocess.run(["bash", "-c", "source deploy/setup.sh --duration 60"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert leaked.returncode == 2 and "bad extras '--duration'" in leaked.stderr


@pytest.mark.broker
def test_readme_demo_line_tells_the_whole_story_and_stops_everything():
    proc = subprocess.Popen(shlex.split(DEMO_LINE), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    out = b""
    t0 = time.monotonic()
    chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: proc.stdout.readline(), b"")), daemon=True)
    reader.start()
    console_counts: dict = {}
    scraped = ""
    try:
        # while the demo runs, its live console (printed at start) shows incidents from every detector
        deadline = time.monotonic() + 150
        while proc.poll() is None and time.monotonic() < deadline:
            m = re.search(rb"live console: (http://127\.0\.0\.1:\d+/)", b"".join(chunks))
            if m and not all(console_counts.get(d, {}).get("incidents") for d in DETECTORS):
                try:
                    with urllib.request.urlopen(m.group(1).decode() + "api/state", timeout=2) as r:
                        console_counts = json.loads(r.read())["counts"]
                except (OSError, ValueError, KeyError):
                    pass
            mm = re.search(rb"(http://127\.0\.0\.1:\d+/metrics)", b"".join(chunks))
            if mm and all(console_counts.get(d, {}).get("incidents") for d in DETECTORS):
                try:  # the worker's metrics once the story has been told: every panel has data
                    with urllib.request.urlopen(mm.group(1).decode(), timeout=2) as r:
                        scraped = r.read().decode()
                except OSError:
                    pass
            time.sleep(2)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            reader.join(5)
            pytest.fail(f"demo did not stop by itself:\n{b''.join(chunks).decode(errors='replace')[-3000:]}")
        reader.join(10)
        out = b"".join(chunks)
        text = out.decode(errors="replace")
        for det in DETECTORS:
            assert console_counts.get(det, {}).get("incidents"), ("the console never showed", det, console_counts)
        assert proc.returncode == 0, text[-3000:]
        assert "Traceback" not in text, text[-3000:]
        assert re.search(r"CRITICAL\s+no_progress_loop\s+session:\S+\s+open", text), text[-3000:]
        assert re.search(r"HALT\s+session:\S+\s+enforce\s+expires", text), text[-3000:]
        # what a second terminal needs, printed before the story starts
        head = text[:text.index("simulated agents start")]
        assert re.search(r"export BREAKWATER_BROKER=kafka://127\.0\.0\.1:\d+", head), head
        assert "source .venv/bin/activate" in head
        assert re.search(r"http://127\.0\.0\.1:\d+/metrics", head), head
        # incidents from all five detectors
        for det in DETECTORS:
            assert re.search(rf"(CRITICAL|WARNING)\s+{det}\s+\w+:\S+\s+open", text), (det, text[-4000:])
        assert re.search(r"no_progress_loop\s+session:\S+\s+open\s+Session \S+ repeated the tool cycle", text), \
            "the injected cycle is reported as a cycle"
        # an agent stopped by its halt, and that halt released
        stopped = re.findall(r"AGENT\s+(sess-\S+)\s+stopped by its halt on (\S+) \((\w+):", text)
        assert stopped, text[-4000:]
        assert re.search(r"RELEASE\s+\w+:\S+\s+enforce", text), text[-4000:]
        released = re.findall(r"AGENT\s+(sess-\S+)\s+released \(.*\): halt -> agent stopped -> released", text)
        assert set(released) & {sid for sid, _, _ in stopped}, text[-4000:]
        # throttled agents slow down
        assert re.search(r"AGENT\s+sess-\S+\s+slowed down by the throttle on route:", text), text[-4000:]
        # the summary: one row per detector, with its incidents, commands, stopped agents and their spend
        summary = text[text.index("summary after"):]
        rows = {m[0]: m[1:] for m in re.findall(
            r"^\s+(\w+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+\$([\d,.]+)$", summary, re.M)}
        assert set(DETECTORS) | {"total"} <= set(rows), summary
        for det in DETECTORS:
            assert int(rows[det][0]) >= 1 and int(rows[det][2]) >= 1, (det, summary)
        assert int(rows["total"][4]) >= 1 and float(rows["total"][5].replace(",", "")) > 0, summary
        pids = [int(p) for p in re.findall(r"pid (\d+)", text)]
        assert len(pids) >= 2, text[:1000]
        assert all(_gone(p) for p in pids), "the demo left a process running"
        assert "stopped." in text
        assert time.monotonic() - t0 < 130, "the demo took far longer than its --duration"
        # every series the Grafana dashboard graphs has data in the demo's worker
        assert scraped, "the demo's metrics endpoint was never read"
        have = {line.split("{")[0].split(" ")[0] for line in scraped.splitlines() if line and line[0] != "#"}
        dash = (ROOT / "deploy" / "grafana" / "dashboard.json").read_text()
        graphed = set(re.findall(r"\bbreakwater_[a-z0-9_]+", dash))
        assert graphed and not sorted(graphed - have), ("dashboard series without data in the demo",
                                                          sorted(graphed - have))
    finally:
        _stop(proc, [int(p) for p in re.findall(rb"pid (\d+)", out)])
