"""The worker refuses to start on protobuf's pure-python backend, with one line and exit 2."""

from __future__ import annotations

import os
import subprocess
import sys


def test_worker_refuses_pure_python_protobuf() -> None:
    env = dict(os.environ, PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION="python",
               BREAKWATER_BROKER="kafka://127.0.0.1:1")
    p = subprocess.run([sys.executable, "-m", "streams.cli", "worker"], env=env, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 2
    assert "'python' backend" in p.stderr and "upb" in p.stderr
    assert "Traceback" not in p.stderr
