"""no_progress_loop core: table-driven sequences, loops and their benign look-alikes (README "Detectors")."""

from __future__ import annotations

import pickle

import pytest

from streams.detectors.loop import LoopParams, NoProgressLoop
from tests.spans import span


def run(spans, params=None):
    det = NoProgressLoop(params)
    st = det.new_state()
    found = []
    for i, s in enumerate(spans):
        st, fs = det.step(st, s, s.end_ns)
        found += [(i, f.status, f.evidence["rule"]) for f in fs]
    return found


def calls(tool, n, *, every=5.0, start=0.0, args="h", **kw):
    return [span(start + i * every, tool=tool, args=args, **kw) for i in range(n)]


LOOPS = [
    ("same call 3x", calls("search", 3), [(2, "open", "repeat")]),
    ("same call 3x, state hash constant", calls("search", 3, state="x"), [(2, "open", "repeat")]),
    ("no arg hash needs 6", calls("search", 6, args=None), [(5, "open", "repeat")]),
    (
        "cycle of 2 (no arg hash) repeating 3x",
        [span(i, tool=t, args=None) for i, t in enumerate("ABABAB")],
        [(5, "open", "cycle")],
    ),
    (
        "cycle of 4 (no arg hash) repeating 3x",
        [span(i, tool=t, args=None) for i, t in enumerate("ABCDABCDABCD")],
        [(11, "open", "cycle")],
    ),
    (
        "5 chats with one state hash",
        [span(i, op="chat", state="x") for i in range(5)],
        [(4, "open", "stagnation")],
    ),
    (
        "repeat then progress resolves",
        calls("search", 3) + [span(20, op="chat", state="y")] + [span(21, op="chat", state="z")],
        [(2, "open", "repeat"), (4, "resolved", "repeat")],
    ),
    (
        "updates at 2x, 4x the opening hit",
        calls("search", 8),
        [(2, "open", "repeat"), (3, "updated", "repeat"), (5, "updated", "repeat")],
    ),
    (
        "failed mutation is no progress",
        calls("write", 3, tool__action_class="mutation", status="ERROR")[:1]
        + calls("write", 2, start=10, tool__action_class="mutation", status="ERROR"),
        [(2, "open", "repeat")],
    ),
]

BENIGN = [
    ("paging through results", [span(i, tool="search", args=f"page-{i}") for i in range(20)]),
    (
        "polling with progress",
        [s for i in range(10) for s in (span(2 * i, tool="status", args="same"),
                                        span(2 * i + 1, op="chat", state=f"st{i}"))],
    ),
    ("repeats spread beyond the window", calls("search", 5, every=301.0)),
    ("two calls only", calls("search", 2)),
    ("no arg hash, 5 calls", calls("search", 5, args=None)),
    (
        "new successful mutations are progress",
        [s for i in range(6) for s in (span(2 * i, tool="read", args="a"),
                                       span(2 * i + 1, tool="write", args=f"w{i}", tool__action_class="mutation"))],
    ),
    (
        "chats with a changing state",
        [span(i, op="chat", state=f"s{i // 2}") for i in range(20)],
    ),
    ("chats without a state hash", [span(i, op="chat") for i in range(10)]),
    (
        "cycle broken before the third round",
        [span(i, tool=t, args=None) for i, t in enumerate("ABABAC")],
    ),
    (
        "different sessions never mix",
        [span(i, tool="search", session=f"s{i}") for i in range(5)],
    ),
]


@pytest.mark.parametrize(("name", "seq", "want"), LOOPS, ids=[c[0] for c in LOOPS])
def test_loops(name, seq, want):
    assert run(seq) == want


@pytest.mark.parametrize(("name", "seq"), BENIGN, ids=[c[0] for c in BENIGN])
def test_benign(name, seq):
    if name == "different sessions never mix":
        det = NoProgressLoop()
        for s in seq:  # each session has its own state
            _, fs = det.step(det.new_state(), s, s.end_ns)
            assert fs == []
        return
    assert run(seq) == []


def test_episode_key_is_deterministic_and_evidence_has_no_raw_args():
    det = NoProgressLoop()
    st = det.new_state()
    seq = calls("search", 3, start=100.0)
    fs = []
    for s in seq:
        st, f = det.step(st, s, s.end_ns)
        fs += f
    (f,) = fs
    assert f.episode == f"{seq[0].end_ns}:{seq[0].span_id}"
    assert f.first_seen_ns == seq[0].end_ns and f.detected_at_ns == seq[2].end_ns
    assert f.evidence["fingerprint"] == {"tool": "search", "args_hash": "h"}
    assert f.evidence["span_ids"] == [s.span_id for s in seq]
    assert f.action == "halt" and f.command_scope_kind == "session" and f.command_scope_key == "s1"


def test_window_counts_only_recent_calls():
    # 2 old calls, then 2 recent: only 2 within 10 minutes at any time → no loop
    seq = calls("search", 2) + calls("search", 2, start=700.0)
    assert run(seq) == []
    # a third recent call makes three within the window
    assert run(seq + calls("search", 1, start=710.0)) == [(4, "open", "repeat")]


def test_state_is_bounded_by_fingerprint_cap():
    det = NoProgressLoop(LoopParams(max_fingerprints=8))
    st = det.new_state()
    for i in range(100):
        st, _ = det.step(st, span(i, tool="search", args=f"q{i}"), i)
    assert len(st.calls) <= 8
    assert len(st.seq) <= 12


def test_expiry_uses_event_time_ttl():
    det = NoProgressLoop()
    st, _ = det.step(det.new_state(), span(0, tool="x"), 0)
    assert not det.expired(st, 1000 * 10**9)
    assert det.expired(st, 1801 * 10**9)


def test_params_validated_once():
    with pytest.raises(ValueError, match="cycle_max"):
        LoopParams(cycle_min=4, cycle_max=3)


def test_state_pickles():
    det = NoProgressLoop()
    st = det.new_state()
    for s in calls("search", 4):
        st, _ = det.step(st, s, s.end_ns)
    assert pickle.loads(pickle.dumps(st)) == st
    assert det.load(det.dump(st)) == st
