"""schemas/ is generated from streams.models: this fails when they drift (run `breakwater schemas`)."""

from pathlib import Path

from streams.schemas import render

ROOT = Path(__file__).resolve().parent.parent


def test_schemas_match_models():
    want = render()
    have = {p.name: p.read_text(encoding="utf-8") for p in (ROOT / "schemas").glob("*.schema.json")}
    assert set(have) == set(want), "schema files differ from models: run `breakwater schemas`"
    for name, text in want.items():
        assert have[name] == text, f"{name} drifted from streams/models.py: run `breakwater schemas`"
