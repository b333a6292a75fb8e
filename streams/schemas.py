"""JSON Schemas of every topic, generated from :mod:`streams.models` (``breakwater schemas``).

>>> "incident_id" in render()["agent.incidents.schema.json"]
True
"""

from __future__ import annotations

from pathlib import Path

import orjson

from streams.models import TOPIC_MODELS


def render() -> dict[str, str]:
    """File name → schema text, byte-stable (sorted keys, trailing newline)."""
    out = {}
    for topic, model in TOPIC_MODELS.items():
        schema = model.model_json_schema(by_alias=True)
        schema["$id"] = f"breakwater:{topic}"
        schema["title"] = f"{topic} — {schema.get('title', model.__name__)}"
        text = orjson.dumps(schema, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode() + "\n"
        out[f"{topic}.schema.json"] = text
    return out


def write_schemas(out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in render().items():
        p = out_dir / name
        p.write_text(text, encoding="utf-8")
        written.append(p)
    return written
