"""Breaker lifecycle in the shared pipeline: every command expires by itself with a release at its
expiry (a timer on the watermark), and an episode that resolves releases its command at once."""

from __future__ import annotations

import orjson

from streams.policy import Policy
from streams.runner import MemoryStore
from streams.stages import build_stages, group, runner_for
from tests.spans import S, span


def drive(spans, policy=None, wm_after=None):
    policy = policy or Policy()
    stage = build_stages(policy)[0]
    r = runner_for(stage, policy, MemoryStore())
    out = []
    for s in spans:
        out += r.feed(0, group(stage, [s]), s.end_ns)
        out += r.fire(0, s.end_ns)
    if wm_after is not None:
        out += r.fire(0, wm_after)
    return r, [orjson.loads(o.value) for o in out if o.kind == "breaker"]


def test_release_at_expiry_on_the_watermark():
    r, cmds = drive([span(i, tool="search") for i in range(3)])
    assert [c["action"] for c in cmds] == ["halt"]
    assert len(r.store), "a session with an active command is not evicted"
    _, cmds = drive([span(i, tool="search") for i in range(3)], wm_after=2 * S + 900 * S - 1)
    assert [c["action"] for c in cmds] == ["halt"]  # one ns before expiry: still active
    _, cmds = drive([span(i, tool="search") for i in range(3)], wm_after=2 * S + 900 * S)
    halt, rel = cmds
    assert rel["action"] == "release" and rel["reason"] == "expired"
    assert rel["issued_at"] == halt["expires_at"] and rel["scope"] == halt["scope"]
    assert rel["incident_id"] == halt["incident_id"] and rel["command_id"] != halt["command_id"]


def test_early_release_when_the_episode_resolves():
    seq = [span(i, tool="search") for i in range(3)] + [span(5, op="chat", state="a"), span(6, op="chat", state="b")]
    _, cmds = drive(seq)
    assert [c["action"] for c in cmds] == ["halt", "release"]
    assert cmds[1]["reason"].startswith("resolved")
    # and nothing is released a second time at expiry
    _, cmds = drive(seq, wm_after=10**6 * S)
    assert [c["action"] for c in cmds] == ["halt", "release"]


def test_shadow_mode_end_to_end():
    p = Policy.from_toml('[detectors.no_progress_loop]\nmode = "shadow"\n')
    _, cmds = drive([span(i, tool="search") for i in range(3)], policy=p, wm_after=10**6 * S)
    assert [(c["action"], c["mode"]) for c in cmds] == [("halt", "shadow"), ("release", "shadow")]


def test_off_mode_publishes_nothing():
    p = Policy.from_toml('[detectors.no_progress_loop]\nmode = "off"\n')
    _, cmds = drive([span(i, tool="search") for i in range(3)], policy=p, wm_after=10**6 * S)
    assert cmds == []


def test_manual_release_cli_publishes_on_the_compacted_topic(broker):
    import asyncio
    import os
    import subprocess
    import sys
    import uuid

    from tests.kafka import collect

    topic = f"breaker-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "BREAKWATER_BROKER": broker.url, "BREAKWATER_TOPIC_BREAKER": topic}
    # nothing is in force on a fresh topic: --force publishes regardless (tests/test_breaker_release.py)
    r = subprocess.run([sys.executable, "-m", "streams", "breaker", "release", "session:sess-9",
                        "--reason", "false positive", "--force"], env=env, capture_output=True, timeout=60,
                       check=False)
    assert r.returncode == 0, r.stderr.decode()
    recs = asyncio.run(collect(broker.bootstrap, topic, lambda rs: len(rs) >= 1, 20))
    assert recs[0].key == b"session:sess-9"
    d = orjson.loads(recs[0].value)
    assert d["action"] == "release" and d["reason"] == "manual: false positive"
    bad = subprocess.run([sys.executable, "-m", "streams", "breaker", "release", "sess-9", "--reason", "x"],
                         env=env, capture_output=True, timeout=60, check=False)
    assert bad.returncode == 2 and b"KIND:KEY" in bad.stderr
