"""The README's demo command works: `breakwater dev --duration N` shows incidents and breaker
commands from the live pipeline, then stops everything it started."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import pytest

pytestmark = pytest.mark.broker


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


def test_dev_demo_shows_incidents_and_stops_everything():
    proc = subprocess.Popen([sys.executable, "-m", "streams", "dev", "--duration", "30"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"demo did not stop by itself:\n{out.decode(errors='replace')[-3000:]}")
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text[-3000:]
    assert re.search(r"CRITICAL\s+no_progress_loop\s+session:\S+\s+open", text), text[-3000:]
    assert re.search(r"HALT\s+session:\S+\s+enforce\s+expires", text), text[-3000:]
    pids = [int(p) for p in re.findall(r"pid (\d+)", text)]
    assert len(pids) >= 2, text[:1000]
    assert all(_gone(p) for p in pids), "the demo left a process running"
    assert "stopped." in text
