"""``breakwater backtest`` (README "Backtest: try a policy on recorded traffic").

On the test broker: a day of simulated traffic (every detector's pattern, event times from
2026-01-01) is published to both input topics (JSON arrays on the spans topic, OTLP JSON on the
OTLP topic; record timestamps = the spans' event time), with records before and after the chosen
time range. The backtest of two policies that differ in one threshold must report exactly what two
separate ``replay`` runs of the same spans give: the incidents and commands only under NEW, only
under CURRENT and under both (counts per detector and tenant, and the example ids), and exactly
the records of the range. Its report is the same bytes twice (JSON and HTML), and the HTML page
renders in headless Chromium with both timelines drawn. Without a broker: files, a detector
switched ``off``, and the shadow → enforce step of the README workflow, against replay too.
"""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
import uuid
from collections import Counter, defaultdict
from pathlib import Path

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from streams import simulate
from streams.backtest import CURRENT_COLOR, NEW_COLOR
from streams.broker import create_topics
from streams.policy import Policy
from streams.replay import run as replay_run
from tests.test_console import CHROMIUM, chromium_args, png_pixels, run_chromium

T0 = simulate.FILE_START_NS  # 2026-01-01T00:00:00Z
DAY_S = 86_400
SEED = 11
SESSIONS = 360
NEW_TOML = "[detectors.no_progress_loop]\nrepeat_threshold = 2\n"  # one threshold lower than the default 3
ROOT = Path(__file__).resolve().parent.parent


def day_of_traffic() -> list[dict]:
    """About a day of sessions (one every 240 s on average) with every pattern injected."""
    return list(simulate.generate(SEED, SESSIONS, T0, loops=6, inject=simulate.PATTERNS[len(simulate.LOOP_KINDS):],
                                  mean_gap_s=DAY_S / SESSIONS))


def write_policy(tmp: Path, name: str, text: str) -> str:
    p = tmp / name
    p.write_text(text)
    return str(p)


# ----------------------------------------------------------------------------- what replay says


def replay_outputs(path: Path, policy: Policy) -> tuple[list[dict], list[dict]]:
    out, cmds = io.BytesIO(), io.BytesIO()
    with open(path, "rb") as fp:
        replay_run([fp], out, cmds, policy=policy)
    return ([orjson.loads(x) for x in out.getvalue().splitlines()],
            [orjson.loads(x) for x in cmds.getvalue().splitlines()])


def expected_diff(new: tuple[list[dict], list[dict]], cur: tuple[list[dict], list[dict]], examples: int = 3):
    """The diff computed independently from two replay runs' records."""
    def firsts(records):
        d = {}
        for r in records:
            d.setdefault(r["incident_id"], r)
        return d

    inc_n, inc_c = firsts(new[0]), firsts(cur[0])
    rows: dict[tuple[str, str], Counter] = defaultdict(Counter)
    kinds = {}
    for iid in set(inc_n) | set(inc_c):
        kind = "both" if iid in inc_n and iid in inc_c else "only_new" if iid in inc_n else "only_current"
        r = inc_n.get(iid) or inc_c[iid]
        rows[(r["detector"], r["tenant"] or "-")][kind] += 1
        kinds[iid] = (kind, r["detector"], r["detected_at"])
    ex = defaultdict(list)
    for iid, (kind, det, at) in kinds.items():
        ex[(kind, det)].append((at, iid))
    ex_ids = {k: sorted(v)[:examples] for k, v in ex.items()}
    cmd_n = {c["command_id"]: c for c in new[1] if c["action"] != "release"}
    cmd_c = {c["command_id"]: c for c in cur[1] if c["action"] != "release"}
    cmd_tot = Counter()
    for cid in set(cmd_n) | set(cmd_c):
        cmd_tot["both" if cid in cmd_n and cid in cmd_c else "only_new" if cid in cmd_n else "only_current"] += 1
        if cid in cmd_n and cid in cmd_c and cmd_n[cid]["mode"] != cmd_c[cid]["mode"]:
            cmd_tot["mode_changed"] += 1
    return rows, {k: [i for _, i in v] for k, v in ex_ids.items()}, cmd_tot


def assert_report_matches(report: dict, new, cur) -> None:
    rows, ex_ids, cmd_tot = expected_diff(new, cur)
    got_rows = {(r["detector"], r["tenant"]): {k: r[k] for k in ("only_new", "only_current", "both")}
                for r in report["incidents"]["by_detector_tenant"]}
    assert got_rows == {k: {x: c[x] for x in ("only_new", "only_current", "both")} for k, c in rows.items()}
    got_ex = defaultdict(list)
    for kind, lst in report["examples"].items():
        for e in lst:
            got_ex[(kind, e["detector"])].append(e["incident_id"])
    assert dict(got_ex) == ex_ids
    assert {k: report["commands"]["totals"][k] for k in ("only_new", "only_current", "both", "mode_changed")} == \
        {k: cmd_tot[k] for k in ("only_new", "only_current", "both", "mode_changed")}
    assert report["summary"]["new"]["incidents"] == len({r["incident_id"] for r in new[0]})
    assert report["summary"]["current"]["incidents"] == len({r["incident_id"] for r in cur[0]})


# ----------------------------------------------------------------------------- the broker test


def _ms(ns: int) -> int:
    return ns // 1_000_000


async def _publish(bootstrap: str, spans_topic: str, otlp_topic: str, spans: list[dict]) -> int:
    """Every third message as an OTLP JSON request on the OTLP topic, the rest as JSON arrays; the
    record timestamp is the latest event time of the message's spans. Returns the message count."""
    p = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await p.start()
    n = 0
    try:
        futs = []
        for i, (key, value, _) in enumerate(simulate.messages(spans, batch=50)):
            docs = orjson.loads(value)
            ts = _ms(max(d["end_time_unix_nano"] for d in docs))
            if i % 3 == 0:
                futs.append(await p.send(otlp_topic, orjson.dumps(simulate.to_otlp_json(docs)), key=key,
                                         timestamp_ms=ts))
            else:
                futs.append(await p.send(spans_topic, value, key=key, timestamp_ms=ts))
            n += 1
            if len(futs) >= 200:
                await asyncio.gather(*futs)
                futs = []
        await asyncio.gather(*futs)
    finally:
        await p.stop()
    return n


def _cli(args: list[str], env: dict, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streams", "backtest", *args], capture_output=True, env=env,
                          cwd=ROOT, timeout=timeout)


@pytest.fixture(scope="module")
def published(broker, tmp_path_factory):
    """The day of traffic on both input topics (2 partitions each), with records outside the range."""
    tmp = tmp_path_factory.mktemp("backtest")
    tag = uuid.uuid4().hex[:8]
    spans_topic, otlp_topic = f"spans-{tag}", f"otlp-{tag}"
    asyncio.run(create_topics(broker.bootstrap, [(spans_topic, 2, {}), (otlp_topic, 2, {})]))
    spans = day_of_traffic()
    before = list(simulate.generate(99, 4, T0 - 3 * DAY_S * 10**9, loops=2))  # older than --since
    after = list(simulate.generate(98, 4, T0 + 3 * DAY_S * 10**9, loops=2))  # at/after --until
    asyncio.run(_publish(broker.bootstrap, spans_topic, otlp_topic, before))
    n = asyncio.run(_publish(broker.bootstrap, spans_topic, otlp_topic, spans))
    asyncio.run(_publish(broker.bootstrap, spans_topic, otlp_topic, after))
    traffic = tmp / "traffic.jsonl"
    simulate.write_file(traffic, spans, "jsonl")
    env = dict(os.environ, BREAKWATER_BROKER=broker.url, BREAKWATER_TOPIC_SPANS=spans_topic,
               BREAKWATER_TOPIC_OTLP=otlp_topic)
    new = write_policy(tmp, "new.toml", NEW_TOML)
    since = "2025-12-31T12:00:00Z"  # the tenant history starts 20 min before T0
    until = "2026-01-03T00:00:00Z"
    return {"tmp": tmp, "spans": spans, "messages": n, "traffic": traffic, "env": env, "new": new,
            "range": ["--since", since, "--until", until], "topics": (spans_topic, otlp_topic)}


@pytest.mark.broker
def test_backtest_on_kafka_equals_two_replays(published):
    p = published
    res = _cli(["--policy", p["new"], *p["range"], "--json"], p["env"])
    assert res.returncode == 0, res.stderr.decode()[-3000:]
    report = orjson.loads(res.stdout)
    err = res.stderr.decode()
    assert "backtest: done," in err and "spans/s" in err and "event time 2026-01-0" in err

    # exactly the range: every message of the day, none before or after it
    inp = report["input"]
    assert inp["spans"] == len(p["spans"]) and inp["messages"] == p["messages"]
    assert sum(r["messages"] for r in inp["ranges"]) == p["messages"]
    assert {(r["topic"], r["partition"]) for r in inp["ranges"]} == {(t, i) for t in p["topics"] for i in (0, 1)}
    assert all(r["end"] - r["start"] == r["messages"] for r in inp["ranges"])
    assert inp["since"] == "2025-12-31T12:00:00.000000Z" and inp["until"] == "2026-01-03T00:00:00.000000Z"
    assert inp["rejected"] == {}

    new = replay_outputs(p["traffic"], Policy.from_toml(NEW_TOML))
    cur = replay_outputs(p["traffic"], Policy())
    assert_report_matches(report, new, cur)
    t = report["incidents"]["totals"]
    assert t["only_new"] > 0 and t["both"] > 0  # the lower threshold finds more (and the same episodes)
    assert {r["detector"] for r in report["incidents"]["by_detector_tenant"]} == {
        "no_progress_loop", "retry_storm", "cost_velocity", "plan_deadlock", "silent_success"}
    stops = report["stops"]
    assert stops["new"]["enforce"]["stopped_sessions"] > stops["current"]["enforce"]["stopped_sessions"] > 0
    assert stops["new"]["enforce"]["breaker_minutes"]["halt"] > stops["current"]["enforce"]["breaker_minutes"]["halt"]
    assert stops["new"]["enforce"]["spend_usd"] >= stops["current"]["enforce"]["spend_usd"] > 0

    # the table names the same things
    res = _cli(["--policy", p["new"], *p["range"], "--no-progress"], p["env"])
    assert res.returncode == 0 and not res.stderr
    text = res.stdout.decode()
    for r in inp["ranges"]:
        assert f"{r['topic']}[{r['partition']}] offsets {r['start']}..{r['end']}" in text
    assert report["examples"]["only_new"][0]["incident_id"] in text


@pytest.mark.broker
def test_backtest_report_is_deterministic_and_renders_in_chromium(published):
    p = published
    html1, html2 = p["tmp"] / "r1.html", p["tmp"] / "r2.html"
    a = _cli(["--policy", p["new"], *p["range"], "--json", "--html", str(html1), "--no-progress"], p["env"])
    b = _cli(["--policy", p["new"], *p["range"], "--json", "--html", str(html2), "--no-progress"], p["env"])
    assert a.returncode == 0 and b.returncode == 0, (a.stderr + b.stderr).decode()[-3000:]
    assert a.stdout == b.stdout
    assert html1.read_bytes() == html2.read_bytes()
    page = html1.read_text()
    assert "http://" not in page and "https://" not in page and "<script" not in page  # self-contained
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"{CHROMIUM} not found: install Debian's Chromium (apt-get install -y chromium) for the "
                    "browser part")
    rc, dom, err = run_chromium(chromium_args(p["tmp"] / "prof1") + ["--dump-dom", html1.as_uri()])
    assert rc == 0, err[-2000:]
    for det in ("no_progress_loop", "retry_storm", "cost_velocity", "plan_deadlock", "silent_success"):
        assert f'data-detector="{det}"' in dom
    assert dom.count('data-side="new"') == 5 and dom.count('data-side="current"') == 5
    shot = p["tmp"] / "backtest.png"
    rc, _, err = run_chromium(chromium_args(p["tmp"] / "prof2") + ["--window-size=1000,900",
                                                                   f"--screenshot={shot}", html1.as_uri()])
    assert rc == 0 and shot.exists(), err[-2000:]
    w, h, rows, bpp = png_pixels(shot.read_bytes())
    seen = Counter()
    for r in rows:
        for i in range(0, len(r), bpp):
            seen[bytes(r[i:i + 3])] += 1
    for name, color in (("NEW", NEW_COLOR), ("CURRENT", CURRENT_COLOR)):
        rgb = bytes.fromhex(color[1:])
        assert seen[rgb] > 200, f"the {name} timeline is not visible ({seen[rgb]} pixels of {color})"


# ----------------------------------------------------------------------------- files (no broker)


@pytest.fixture(scope="module")
def traffic_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bt-files") / "traffic.jsonl"
    simulate.write_file(path, simulate.generate(7, 150, T0, loops=3, inject=simulate.PATTERNS[3:]), "jsonl")
    return path


def _run_files(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streams", "backtest", *args], capture_output=True, cwd=ROOT,
                          timeout=120)


def test_files_detector_off_equals_two_replays(traffic_file, tmp_path):
    off = "[detectors.silent_success]\nmode = \"off\"\n"
    res = _run_files([str(traffic_file), "--policy", write_policy(tmp_path, "off.toml", off), "--json"])
    assert res.returncode == 0, res.stderr.decode()[-2000:]
    report = orjson.loads(res.stdout)
    new = replay_outputs(traffic_file, Policy.from_toml(off))
    cur = replay_outputs(traffic_file, Policy())
    assert_report_matches(report, new, cur)
    rows = {r["detector"]: r for r in report["incidents"]["by_detector_tenant"]}
    assert rows["silent_success"]["only_current"] >= 1 and rows["silent_success"]["both"] == 0
    assert report["incidents"]["totals"]["only_new"] == 0
    f = report["input"]["files"][0]
    assert f["file"] == str(traffic_file) and f["bytes"] == traffic_file.stat().st_size
    again = _run_files([str(traffic_file), "--policy", str(tmp_path / "off.toml"), "--json"])
    assert again.stdout == res.stdout


def test_shadow_to_enforce_step(traffic_file, tmp_path):
    """The README workflow: CURRENT runs no_progress_loop in shadow, NEW enforces it. Same incidents
    and command ids; the commands' mode differs; only NEW stops the looping sessions."""
    shadow = write_policy(tmp_path, "shadow.toml", "[detectors.no_progress_loop]\nmode = \"shadow\"\n")
    enforce = write_policy(tmp_path, "enforce.toml", "[detectors.no_progress_loop]\nmode = \"enforce\"\n")
    res = _run_files([str(traffic_file), "--policy", enforce, "--against", shadow, "--json", "--no-progress"])
    assert res.returncode == 0, res.stderr.decode()[-2000:]
    report = orjson.loads(res.stdout)
    new = replay_outputs(traffic_file, Policy.load(enforce))
    cur = replay_outputs(traffic_file, Policy.load(shadow))
    assert_report_matches(report, new, cur)
    t = report["incidents"]["totals"]
    assert t["only_new"] == t["only_current"] == 0 and t["both"] > 0
    loops = [r for r in report["commands"]["by_detector_tenant"] if r["detector"] == "no_progress_loop"]
    assert sum(r["mode_changed"] for r in loops) == sum(r["both"] for r in loops) > 0
    st = report["stops"]
    assert st["current"]["shadow"]["scopes"]["halt"]["session"] == st["new"]["enforce"]["scopes"]["halt"]["session"] \
        - st["current"]["enforce"]["scopes"].get("halt", {}).get("session", 0)
    assert st["new"]["enforce"]["stopped_sessions"] > st["current"]["enforce"]["stopped_sessions"]
    assert report["policies"]["current"]["source"] == shadow


def test_errors_are_one_line(tmp_path):
    res = _run_files(["--policy", write_policy(tmp_path, "p.toml", "")])
    assert res.returncode == 2 and res.stderr.decode().strip().count("\n") == 0
    assert "--since" in res.stderr.decode()
    res = _run_files(["x.jsonl", "--policy", str(tmp_path / "p.toml"), "--since", "1h"])
    assert res.returncode == 2 and "--since/--until" in res.stderr.decode()
    bad = write_policy(tmp_path, "bad.toml", "[detectors.no_progress_loop]\nrepeat_treshold = 2\n")
    res = _run_files(["--policy", bad, str(tmp_path / "p.toml")])
    assert res.returncode == 2 and "repeat_treshold" in res.stderr.decode()
    env = dict(os.environ, BREAKWATER_BROKER="kafka://127.0.0.1:9")
    res = subprocess.run([sys.executable, "-m", "streams", "backtest", "--policy", str(tmp_path / "p.toml"),
                          "--since", "1h"], capture_output=True, env=env, cwd=ROOT, timeout=60)
    assert res.returncode == 2 and "BREAKWATER_BROKER" in res.stderr.decode()
