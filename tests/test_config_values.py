"""``breakwater config``: the values in force (environment over defaults, secrets masked) before
the reference it always printed; ``--json`` for scripts; a bad value is still one line, exit 2."""

from __future__ import annotations

import os
import subprocess
import sys

import orjson

from streams.settings import Settings, config_reference

SECRET = "hunter2-do-not-print"


def config(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.upper().startswith("BREAKWATER_")}
    return subprocess.run([sys.executable, "-m", "streams", "config", *args], env={**base, **env},
                          capture_output=True, text=True, timeout=60, check=False)


SASL = {"BREAKWATER_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "BREAKWATER_SASL_MECHANISM": "PLAIN",
        "BREAKWATER_SASL_USERNAME": "svc-breakwater", "BREAKWATER_SASL_PASSWORD": SECRET}


def test_values_in_force_then_the_reference():
    r = config(BREAKWATER_PARTITIONS="8", breakwater_app_id="bw-prod", **SASL)
    assert r.returncode == 0, r.stderr
    values, _, reference = r.stdout.partition("Reference (")
    rows = {ln.split("|")[1].strip(" `"): [c.strip() for c in ln.split("|")[2:4]]
            for ln in values.splitlines() if ln.startswith("| `BREAKWATER_")}
    assert set(rows) == {f"BREAKWATER_{n.upper()}" for n in Settings.model_fields}
    assert rows["BREAKWATER_PARTITIONS"] == ["`8`", "environment"]
    assert rows["BREAKWATER_APP_ID"] == ["`bw-prod`", "environment"]  # env names are case-insensitive
    assert rows["BREAKWATER_TOPIC_DLQ"] == ["`agent.spans.dlq`", "default"]
    assert rows["BREAKWATER_METRICS_PORT"] == ["`9464`", "default"]
    assert rows["BREAKWATER_SSL_CAFILE"] == ["(unset)", "default"]
    assert rows["BREAKWATER_SASL_PASSWORD"] == ["`********`", "environment"]
    assert rows["BREAKWATER_SASL_USERNAME"] == ["`svc-breakwater`", "environment"]
    assert SECRET not in r.stdout + r.stderr
    assert config_reference() in reference


def test_json_is_the_values_only():
    r = config("--json", BREAKWATER_BATCH_WITHIN_S="0.2", **SASL)
    assert r.returncode == 0, r.stderr
    d = orjson.loads(r.stdout)
    assert d["BREAKWATER_BATCH_WITHIN_S"] == 0.2 and d["BREAKWATER_PARTITIONS"] == 4
    assert d["BREAKWATER_SASL_PASSWORD"] == "********" and d["BREAKWATER_POLICY_FILE"] is None
    assert d["BREAKWATER_RECOVERY_CONSISTENCY_CHECK"] is False
    assert SECRET not in r.stdout


def test_a_bad_value_is_still_one_line_and_exit_2():
    r = config("--json", BREAKWATER_PARTITIONS="abc")
    assert r.returncode == 2 and r.stdout == "" and len(r.stderr.strip().splitlines()) == 1
    assert "BREAKWATER_PARTITIONS" in r.stderr and "'abc'" in r.stderr
