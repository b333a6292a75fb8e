"""Policy file validation, per-tenant overrides, and finding → incident/command."""

from __future__ import annotations

from datetime import datetime

import pytest

from streams.detectors.loop import NoProgressLoop
from streams.policy import Policy, PolicyError, apply
from tests.spans import span


def loop_finding():
    det = NoProgressLoop()
    st = det.new_state()
    out = []
    for i in range(3):
        st, f = det.step(st, span(i, tool="search"), i)
        out += f
    return out[0]


def test_unknown_key_is_named():
    with pytest.raises(PolicyError, match="detectors.no_progress_loop.repeat_treshold"):
        Policy.from_toml("[detectors.no_progress_loop]\nrepeat_treshold = 3\n")


def test_bad_value_is_named():
    with pytest.raises(PolicyError, match="tenants.acme.detectors.no_progress_loop"):
        Policy.from_toml('[tenants.acme.detectors.no_progress_loop]\nmode = "loud"\n')


def test_bad_toml():
    with pytest.raises(PolicyError, match="not valid TOML"):
        Policy.from_toml("[detectors\n")


def test_missing_file(tmp_path):
    with pytest.raises(PolicyError, match="policy file"):
        Policy.load(tmp_path / "nope.toml")


def test_enforce_gives_incident_and_command():
    f = loop_finding()
    inc, cmd = apply(Policy(), f)
    assert inc.status == "open" and inc.policy_mode == "enforce"
    assert cmd.action == "halt" and cmd.mode == "enforce" and cmd.scope.key == "s1"
    assert inc.breaker_command_id == cmd.command_id
    assert cmd.expires_at > cmd.issued_at
    # deterministic ids: the same episode gives the same ids
    inc2, cmd2 = apply(Policy(), f)
    assert (inc2.incident_id, cmd2.command_id) == (inc.incident_id, cmd.command_id)
    assert inc.model_dump_json() == inc2.model_dump_json()


def test_shadow_and_off_per_tenant():
    p = Policy.from_toml('[tenants.acme.detectors.no_progress_loop]\nmode = "shadow"\n'
                         '[tenants.quiet.detectors.no_progress_loop]\nmode = "off"\n')
    f = loop_finding()
    inc, cmd = apply(p, f)
    assert inc.policy_mode == "shadow" and cmd.mode == "shadow"
    f.tenant = "quiet"
    assert apply(p, f) == (None, None)


def test_ttl_override():
    p = Policy.from_toml("[detectors.no_progress_loop]\nbreaker_ttl_s = 60\n")
    _, cmd = apply(p, loop_finding())
    issued = datetime.fromisoformat(cmd.issued_at.replace("Z", "+00:00"))
    expires = datetime.fromisoformat(cmd.expires_at.replace("Z", "+00:00"))
    assert (expires - issued).total_seconds() == 60


def test_the_shipped_policy_file_is_valid_and_complete():
    from pathlib import Path

    from streams.policy import DETECTOR_POLICIES

    p = Policy.load(Path(__file__).resolve().parent.parent / "deploy" / "policy.toml")
    assert set(DETECTOR_POLICIES) == {"no_progress_loop", "retry_storm", "cost_velocity", "plan_deadlock",
                                      "silent_success"}
    assert p.mode("cost_velocity", "sandbox") == "shadow" and p.mode("cost_velocity", "acme") == "enforce"
    assert p.price_table().lookup("gpt-4o", "openai") is not None
    assert p.breaker_ttl_s("cost_velocity", None, "tenant") == 600
