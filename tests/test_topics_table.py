"""README's topic tables list every topic the worker creates (``topic_specs`` in streams/app.py):
the contract table under "Topics" names each one, and "Topics to create" gives each one's key,
partitions and cleanup policy as the worker creates it."""

from __future__ import annotations

from pathlib import Path

from streams.app import STAGE_TABLES, topic_specs
from streams.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
SPECS = {name: (n, cfg) for name, n, cfg in topic_specs(Settings(app_id="<app>"))}


def table_after(heading: str, header_start: str) -> list[list[str]]:
    at = README.index(header_start, README.index(heading))
    lines = README[at:].split("\n\n", 1)[0].splitlines()
    return [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines[2:]]


def test_specs_are_what_the_table_describes():
    assert len(SPECS) == 5 + 2 * len(STAGE_TABLES) == 13


def test_topics_to_create_is_complete_and_matches_the_worker():
    rows = table_after("\n### Topics to create\n", "| topic | key | partitions | `cleanup.policy` |")
    by_topic = {r[0].strip("`"): r for r in rows}
    assert len(by_topic) == len(rows), "a topic is listed twice"
    assert set(by_topic) == set(SPECS), (set(SPECS) - set(by_topic), set(by_topic) - set(SPECS))
    internal = {name for name in SPECS if name.startswith("<app>")}
    for name, (_, cfg) in SPECS.items():
        _, key, partitions, cleanup, retention, why = by_topic[name]
        assert key and retention and why, name
        assert cleanup == f"`{cfg.get('cleanup.policy', 'delete')}`", (name, cleanup)
        assert "`BREAKWATER_PARTITIONS`" in partitions, (name, partitions)  # what the worker creates
        if name in internal:  # each changelog is co-partitioned with its stage's repartition topic
            assert partitions.startswith("exactly"), (name, partitions)
        if cfg.get("cleanup.policy") == "compact" and name in internal:
            assert "never give it `delete`" in why, name


def test_the_contract_table_names_every_topic():
    rows = table_after("\n## Topics (the contract", "| topic | direction | key | value |")
    listed = {r[0].strip("`") for r in rows}
    assert listed == set(SPECS), (set(SPECS) - listed, listed - set(SPECS))
    for r in rows:
        name = r[0].strip("`")
        assert ("compacted" in r[1]) == (SPECS[name][1].get("cleanup.policy") == "compact"), r
