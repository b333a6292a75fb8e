"""Per-tenant policy overrides: a key under ``[tenants.T.detectors.D]`` either takes effect for that
tenant or fails at load, naming it (README "Policy file"). Which keys take effect is not a
list kept by hand only: a replay of every pattern with a policy whose tenant sections record what is
read from them must read exactly :data:`streams.policy.TENANT_KEYS`.
"""

from __future__ import annotations

import io
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import orjson
import pytest

from streams import simulate
from streams.policy import DETECTOR_POLICIES, TENANT_KEYS, Policy, PolicyError
from streams.replay import run

ROOT = Path(__file__).resolve().parents[1]
T0 = 1_767_225_600_000_000_000

IGNORED = [(det, key) for det, cls in DETECTOR_POLICIES.items() for key in cls.model_fields
           if key not in TENANT_KEYS[det]]


def _value(det: str, key: str):  # noqa: ANN202
    v = DETECTOR_POLICIES[det].model_fields[key].default
    return "true" if v is True else "false" if v is False else f'"{v}"' if isinstance(v, str) else repr(v)


@pytest.mark.parametrize(("det", "key"), IGNORED)
def test_a_tenant_key_without_effect_fails_naming_it(det, key):
    with pytest.raises(PolicyError) as e:
        Policy.from_toml(f"[tenants.acme.detectors.{det}]\n{key} = {_value(det, key)}\n")
    msg = str(e.value)
    assert msg.startswith(f"tenants.acme.detectors.{det}.{key}: not applied per tenant"), msg
    assert f"[detectors.{det}]" in msg and all(k in msg for k in TENANT_KEYS[det])


def test_the_same_key_globally_is_fine():
    p = Policy.from_toml("[detectors.retry_storm]\nroute_min_retries = 40\n"
                         "[tenants.acme.detectors.retry_storm]\nmode = \"shadow\"\nbreaker_ttl_s = 30\n")
    assert p.section("retry_storm", "acme").route_min_retries == 40
    assert p.mode("retry_storm", "acme") == "shadow" and p.breaker_ttl_s("retry_storm", "acme") == 30


@pytest.mark.parametrize("det", sorted(TENANT_KEYS))
def test_every_effective_key_loads(det):
    lines = "".join(f"{k} = {_value(det, k) if k != 'mode' else chr(34) + 'shadow' + chr(34)}\n"
                    for k in sorted(TENANT_KEYS[det]))
    p = Policy.from_toml(f"[tenants.acme.detectors.{det}]\n{lines}")
    assert p.mode(det, "acme") == "shadow"


def test_a_typo_is_still_reported_as_unknown_first():
    with pytest.raises(PolicyError, match="repeat_treshold: Extra inputs are not permitted"):
        Policy.from_toml("[tenants.acme.detectors.no_progress_loop]\nrepeat_treshold = 4\n")


def test_the_shipped_policy_files_load():
    for path in ("deploy/policy.toml", "deploy/demo-policy.toml"):
        Policy.load(ROOT / path)


class _Spy:
    """A tenant's section that records every key read from it (``params()``: the keys it passes on)."""

    def __init__(self, sec, det: str, reads: set) -> None:  # noqa: ANN001
        self._sec, self._det, self._reads = sec, det, reads

    def __getattr__(self, name: str):  # noqa: ANN204
        v = getattr(self._sec, name)
        if name == "params":
            def params():  # noqa: ANN202
                r = v()
                self._reads.update((self._det, f) for f in r.__dataclass_fields__)
                return r
            return params
        self._reads.add((self._det, name))
        return v

    def __eq__(self, other: object) -> bool:
        return self._sec == (other._sec if isinstance(other, _Spy) else other)

    __hash__ = None  # type: ignore[assignment]


def test_tenant_keys_are_exactly_what_the_detectors_read_per_tenant():
    spans = list(simulate.generate(7, 30, T0, loops=3, inject=simulate.PATTERNS[len(simulate.LOOP_KINDS):]))
    tenants = {v for s in spans for v in ((s.get("attributes") or {}).get("tenant.id"),
                                          (s.get("resource") or {}).get("tenant.id")) if v}
    assert len(tenants) >= 2
    policy = Policy.from_toml("".join(f'[tenants.{t}.detectors.{d}]\nmode = "enforce"\n'
                                      for t in sorted(tenants) for d in TENANT_KEYS))
    reads: set[tuple[str, str]] = set()
    plain = dict(policy._sections)  # noqa: SLF001
    for (det, tenant), sec in plain.items():
        if tenant is not None:
            policy._sections[(det, tenant)] = _Spy(sec, det, reads)  # noqa: SLF001
    # the sweep's idle bound takes the largest TTL over all sections: it can keep a state longer,
    # never make a core expire it sooner (each core's own TTL is the global one), so it is no use
    policy.max_ttl_s = lambda det, name: max(getattr(s, name) for (d, _), s in plain.items() if d == det)
    out = io.BytesIO()
    run([io.BytesIO(b"\n".join(orjson.dumps(s) for s in spans))], out, io.BytesIO(), policy=policy)
    fired = {orjson.loads(line)["detector"] for line in out.getvalue().splitlines()}
    assert fired == set(TENANT_KEYS), fired  # every detector fired, for a tenant with overrides
    by_det: dict[str, set[str]] = defaultdict(set)
    for det, key in reads:
        by_det[det].add(key)
    assert {d: sorted(k) for d, k in by_det.items()} == {d: sorted(k) for d, k in TENANT_KEYS.items()}


def test_the_cli_says_it_in_one_line(tmp_path):
    pol = tmp_path / "p.toml"
    pol.write_text("[tenants.acme.detectors.cost_velocity]\nsession_budget_usd = 50\n")
    r = subprocess.run([sys.executable, "-m", "streams", "replay", "-", "--policy", str(pol)], input=b"",
                       capture_output=True, timeout=60, check=False)
    err = r.stderr.decode()
    assert r.returncode == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "tenants.acme.detectors.cost_velocity.session_budget_usd: not applied per tenant" in err


def test_the_readme_table_matches():
    text = (ROOT / "README.md").read_text()
    at = text.index("| detector | keys that take effect under `[tenants.T.detectors.D]` |")
    rows = text[at:].split("\n\n", 1)[0].splitlines()[2:]
    documented: dict[str, set[str]] = {}
    for row in rows:
        dets, keys = (c.strip() for c in row.strip("|").split("|"))
        for det in dets.replace("`", "").split(", "):
            documented[det] = (set(DETECTOR_POLICIES[det].model_fields) if keys == "all of them"
                               else set(keys.replace("`", "").split(", ")))
    assert documented == {d: set(k) for d, k in TENANT_KEYS.items()}
