"""The metrics reference in README "Endpoints, metrics and alerts" is generated from the declarations
in streams/metrics.py, and deploy/grafana/dashboard.json graphs every declared metric."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from streams import metrics

ROOT = Path(__file__).resolve().parents[1]
BEGIN = re.compile(r"<!-- metrics-reference:[^\n]*-->\n")
END = "<!-- /metrics-reference -->"
METRIC_RE = re.compile(r"\bbreakwater_[a-z0-9_]+\b")

#: Declared metrics the dashboard deliberately does not graph, each with the reason. Empty today:
#: every metric is on a panel.
NOT_GRAPHED: dict[str, str] = {}


def readme_copy() -> str:
    text = (ROOT / "README.md").read_text()
    m = BEGIN.search(text)
    assert m, "README lacks the metrics-reference markers"
    return text[m.end():text.index(END, m.end())].rstrip("\n")


def test_readme_copy_is_the_generated_reference():
    assert readme_copy() == metrics.reference(), (
        "README is stale: paste the output of `python -m streams.metrics` between the metrics-reference markers")


def test_the_reference_lists_every_declared_metric_once():
    rows = [ln for ln in metrics.reference().splitlines()[2:]]
    names = [ln.split("|")[1].strip(" `") for ln in rows]
    assert len(names) == len(set(names)) == len(metrics._declared())  # noqa: SLF001
    declared = metrics.declared_names()
    assert all(n in declared or f"{n}_bucket" in declared for n in names), names


def test_python_dash_m_prints_it():
    r = subprocess.run([sys.executable, "-m", "streams.metrics"], capture_output=True, text=True, timeout=60,
                       check=True, cwd=ROOT)
    assert r.stdout.rstrip("\n") == metrics.reference()


def _families() -> dict[str, set[str]]:
    """Declared metric → the sample names a query may use for it."""
    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum"), "info": ("_info",)}
    return {m._name: {m._name + s for s in suffixes[m._type]} for m in metrics._declared()}  # noqa: SLF001


def test_every_declared_metric_is_on_the_dashboard_or_listed_with_a_reason():
    d = json.loads((ROOT / "deploy" / "grafana" / "dashboard.json").read_text())
    used = {n for p in d["panels"] for t in p.get("targets", []) for n in METRIC_RE.findall(t["expr"])}
    used |= set(METRIC_RE.findall(json.dumps(d["templating"])))
    families = _families()
    missing = sorted(name for name, samples in families.items() if not samples & used and name not in NOT_GRAPHED)
    assert not missing, f"declared but not on the dashboard (add a panel, or list it in NOT_GRAPHED): {missing}"
    for name, why in NOT_GRAPHED.items():
        assert name in families and why, name
        assert not families[name] & used, f"{name} is graphed now: drop it from NOT_GRAPHED"
