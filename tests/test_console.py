"""``breakwater console`` against the real embedded broker, and its page in a real headless Chromium.

The console runs as a subprocess (``python -m streams.console --port 0``), reading real Incident and
BreakerCommand records from isolated topics. Checked: the JSON endpoint (open incidents, resolved
ones gone, breakers in force with their remaining TTL, releases and expired commands gone,
per-detector counts, evidence scrubbed, bounded), read-only and loopback-only answers, the page
in Chromium (``--dump-dom`` and ``--screenshot``: incident ids and breaker scopes rendered, a
screenshot that is not blank), and live updates in an open page driven over the DevTools protocol
(new incident appears, resolved one and released breaker disappear, TTL counts down, without a
reload; a clipped screenshot of the new incident's row has text in it).

Every process a test starts is stopped by its pid (its own process group), even on failure.
Skips, with the reason, when ``/usr/bin/chromium`` is absent (``apt-get install -y chromium``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
import zlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest

from streams.broker import create_topics
from streams.models import BreakerCommand, Incident
from streams.settings import Settings
from tests.kafka import produce

pytestmark = pytest.mark.broker

CHROMIUM = os.environ.get("BREAKWATER_TEST_CHROMIUM", "/usr/bin/chromium")
needs_chromium = pytest.mark.skipif(
    not os.access(CHROMIUM, os.X_OK),
    reason=f"{CHROMIUM} not found: install Debian's Chromium (apt-get install -y chromium) for the browser tests")


# ----------------------------------------------------------------------------- records


def iso(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def incident(iid: str, *, detector: str = "no_progress_loop", status: str = "open", session: str = "s1",
             severity: str = "critical", evidence: dict | None = None) -> tuple[bytes, bytes]:
    now = datetime.now(UTC)
    inc = Incident(
        incident_id=iid, detector=detector, severity=severity, status=status,
        scope={"kind": "session", "key": session}, tenant="acme", session_id=session, workflow_id=None,
        trace_ids=[uuid.uuid4().hex], first_seen=iso(now - timedelta(seconds=5)), last_seen=iso(now),
        detected_at=iso(now), summary=f"Session {session}: {detector} fired.",
        evidence=evidence if evidence is not None else {"tool": "search", "repeats": 3},
        breaker_command_id=f"cmd-{iid}", policy_mode="enforce",
    )
    return iid.encode(), inc.model_dump_json().encode()


def command(action: str, kind: str, key: str, *, ttl_s: float | None = 900.0, detector: str = "no_progress_loop",
            incident_id: str | None = None, rate: float | None = None, tenant: str | None = None) -> tuple[bytes, bytes]:
    now = datetime.now(UTC)
    cmd = BreakerCommand(
        command_id=f"cmd-{action}-{kind}-{key}", action=action, scope={"kind": kind, "key": key, "tenant": tenant},
        mode="enforce", reason=f"{detector}:test", detector=detector, incident_id=incident_id,
        issued_at=iso(now), expires_at=None if ttl_s is None else iso(now + timedelta(seconds=ttl_s)),
        rate_limit_per_s=rate,
    )
    return f"{kind}:{key}".encode(), cmd.model_dump_json().encode()


# ----------------------------------------------------------------------------- processes


def stop(proc: subprocess.Popen | None) -> None:
    """Stop a process started in its own session, and its children, by its pid (= its group id)."""
    if proc is None or proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def http(url: str, *, method: str = "GET", host: str | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
    req = urllib.request.Request(url, method=method, headers={"Host": host} if host else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310 - loopback test server
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def state(url: str) -> dict:
    code, body = http(url + "api/state")
    assert code == 200
    return orjson.loads(body)


def wait_for(pred, timeout_s: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def topics(broker):
    tag = uuid.uuid4().hex[:8]
    s = Settings(broker=broker.url, topic_incidents=f"incidents-{tag}", topic_breaker=f"breaker-{tag}")
    asyncio.run(create_topics(broker.bootstrap, [(s.topic_incidents, 2, {}),
                                                 (s.topic_breaker, 1, {"cleanup.policy": "compact"})]))
    return s


def publish(settings: Settings, broker, *, incidents=(), commands=()) -> None:
    if incidents:
        asyncio.run(produce(broker.bootstrap, settings.topic_incidents, list(incidents)))
    if commands:
        asyncio.run(produce(broker.bootstrap, settings.topic_breaker, list(commands)))


@pytest.fixture
def console(topics, tmp_path):
    """Start ``python -m streams.console --port 0`` on 127.0.0.1; yields its URL; stopped by pid."""
    env = dict(os.environ, BREAKWATER_BROKER=topics.broker, BREAKWATER_TOPIC_INCIDENTS=topics.topic_incidents,
               BREAKWATER_TOPIC_BREAKER=topics.topic_breaker)
    log = tmp_path / "console.log"
    out = open(log, "wb")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "streams.console", "--port", "0", "--max-incidents", "50"],
                            env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, cwd=str(Path(__file__).resolve().parents[1]))
    out.close()
    try:
        def url():
            text = log.read_text(errors="replace")
            assert proc.poll() is None, f"console exited: {text}"
            for line in text.splitlines():
                if line.startswith("Breakwater console: http://"):
                    return line.split(": ", 1)[1].strip()
            return None

        yield wait_for(url, 30, "the console's URL")
    finally:
        stop(proc)


# ----------------------------------------------------------------------------- PNG (no Pillow)


def png_pixels(data: bytes) -> tuple[int, int, list[bytes], int]:
    """Decode an 8-bit RGB/RGBA PNG (what Chromium writes) into rows of RGB(A) bytes."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, w = 8, b"", 0
    while pos < len(data):
        (n,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            w, h, depth, ctype = struct.unpack(">IIBB", body[:10])
            assert depth == 8 and ctype in (2, 6), (depth, ctype)
            bpp = 3 if ctype == 2 else 4
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    raw = zlib.decompress(idat)
    stride = w * bpp
    rows, prev = [], bytearray(stride)
    for y in range(h):
        f = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        if f == 1:
            for i in range(bpp, stride):
                line[i] = (line[i] + line[i - bpp]) & 0xFF
        elif f == 2:
            line = bytearray((a + b) & 0xFF for a, b in zip(line, prev))
        elif f == 3:
            for i in range(stride):
                left = line[i - bpp] if i >= bpp else 0
                line[i] = (line[i] + ((left + prev[i]) >> 1)) & 0xFF
        elif f == 4:
            for i in range(stride):
                a = line[i - bpp] if i >= bpp else 0
                b, c = prev[i], (prev[i - bpp] if i >= bpp else 0)
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
        rows.append(bytes(line))
        prev = line
    return w, h, rows, bpp


def ink(data: bytes) -> tuple[int, int, float, int]:
    """(width, height, share of pixels that differ from the most common colour, distinct colours)."""
    w, h, rows, bpp = png_pixels(data)
    counts: dict[bytes, int] = {}
    for r in rows:
        for i in range(0, len(r), bpp):
            px = r[i:i + 3]
            counts[px] = counts.get(px, 0) + 1
    background = max(counts.values())
    return w, h, 1 - background / (w * h), len(counts)


# ----------------------------------------------------------------------------- Chromium


def chromium_args(profile: Path) -> list[str]:
    args = [CHROMIUM, "--headless", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
            "--disable-extensions", "--hide-scrollbars", "--mute-audio", f"--user-data-dir={profile}"]
    if os.geteuid() == 0:
        args.append("--no-sandbox")  # Chromium refuses to run as root with its sandbox (CI containers)
    return args


def run_chromium(args: list[str], timeout_s: float = 60.0) -> tuple[int, str, str]:
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
        return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")
    finally:
        stop(proc)


# ----------------------------------------------------------------------------- tests


def seed(topics, broker):
    """Two open incidents, one opened then resolved, one bad record; a halt and a throttle in force,
    a hold released, a hold already expired."""
    publish(topics, broker, incidents=[
        incident("inc-loop-7f3a", session="sess-loop", evidence={"tool": "search", "repeats": 3,
                                                                  "gen_ai.tool.call.arguments": "SECRET-ARGS"}),
        incident("inc-storm-91bc", detector="retry_storm", session="sess-storm", severity="warning"),
        incident("inc-gone-0001", detector="silent_success", session="sess-ok"),
        incident("inc-gone-0001", detector="silent_success", session="sess-ok", status="resolved"),
        (b"junk", b"{not json"),
    ], commands=[
        command("halt", "session", "sess-loop", ttl_s=900, incident_id="inc-loop-7f3a"),
        command("throttle", "route", "openai/gpt-4o", ttl_s=120, detector="retry_storm", rate=2.0, tenant="acme"),
        command("hold", "session", "sess-ok", ttl_s=600, detector="silent_success"),
        command("release", "session", "sess-ok", ttl_s=None, detector="silent_success"),
        command("hold", "session", "sess-old", ttl_s=-5, detector="silent_success"),
    ])


def test_json_state_open_incidents_breakers_ttl_counts(topics, broker, console):
    seed(topics, broker)
    st = wait_for(lambda: (s := state(console))["records"]["breaker"] >= 5 and s["records"]["incidents"] >= 5 and s,
                  30, "all records read")
    assert st["connected"] and st["bad_records"] == 1
    assert [i["incident_id"] for i in st["incidents"]] == ["inc-storm-91bc", "inc-loop-7f3a"]  # newest first
    loop = st["incidents"][1]
    assert loop["evidence"] == {"tool": "search", "repeats": 3}  # content keys dropped
    assert "SECRET-ARGS" not in json.dumps(st)
    brk = {b["key"]: b for b in st["breakers"]}
    assert sorted(brk) == ["route:openai/gpt-4o", "session:sess-loop"]  # released and expired ones gone
    assert 800 < brk["session:sess-loop"]["expires_in_s"] <= 900
    assert 60 < brk["route:openai/gpt-4o"]["expires_in_s"] <= 120
    assert brk["route:openai/gpt-4o"]["rate_limit_per_s"] == 2.0 and brk["route:openai/gpt-4o"]["scope"]["tenant"] == "acme"
    c = st["counts"]
    assert c["no_progress_loop"] == {"open": 1, "incidents": 1, "resolved": 0, "commands": 1, "breakers": 1}
    assert c["silent_success"] == {"open": 0, "incidents": 1, "resolved": 1, "commands": 2, "breakers": 0}
    assert c["retry_storm"]["breakers"] == 1 and c["cost_velocity"]["incidents"] == 0

    # live: a resolution and a release take effect; the bound on kept incidents holds (--max-incidents 50)
    publish(topics, broker, incidents=[incident("inc-loop-7f3a", session="sess-loop", status="resolved")]
            + [incident(f"inc-many-{i:03d}", detector="cost_velocity", session=f"c{i}") for i in range(60)],
            commands=[command("release", "session", "sess-loop", ttl_s=None)])
    st = wait_for(lambda: (s := state(console))["records"]["incidents"] >= 66 and s["records"]["breaker"] >= 6 and s,
                  30, "the second batch")
    ids = [i["incident_id"] for i in st["incidents"]]
    assert "inc-loop-7f3a" not in ids and st["incidents_open"] == 50 and st["incidents_dropped"] == 11
    assert all(i.startswith("inc-many-") for i in ids)  # the least recently updated went first
    assert [b["key"] for b in st["breakers"]] == ["route:openai/gpt-4o"]
    assert st["counts"]["cost_velocity"]["incidents"] == 60


def test_read_only_and_loopback_only(console):
    assert http(console + "healthz") == (200, b"ok\n")
    code, body = http(console + "api/state", method="POST")
    assert code == 405
    code, _ = http(console + "api/state", host="attacker.example")  # DNS rebinding: refused
    assert code == 421
    assert console.startswith("http://127.0.0.1:")
    code, page = http(console)
    assert code == 200 and b"https://" not in page and b"http://" not in page  # no external asset
    with urllib.request.urlopen(console, timeout=5) as r:  # noqa: S310
        csp = r.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp


@needs_chromium
def test_page_in_headless_chromium_dom_and_screenshot(topics, broker, console, tmp_path):
    seed(topics, broker)
    wait_for(lambda: state(console)["records"]["breaker"] >= 5 and state(console)["records"]["incidents"] >= 5,
             30, "all records read")
    # No --virtual-time-budget: the page's open event stream is a fetch that never ends, and virtual
    # time waits for pending fetches. The page renders the state embedded in it synchronously, so
    # the DOM dumped at load is the one its script built.
    rc, dom, err = run_chromium(chromium_args(tmp_path / "p1") + ["--dump-dom", console])
    assert rc == 0, err[-2000:]
    # rendered by the page's script (rows carry data attributes the server's HTML does not have)
    for iid in ("inc-loop-7f3a", "inc-storm-91bc"):
        assert f'data-incident-id="{iid}"' in dom
    assert 'data-incident-id="inc-gone-0001"' not in dom
    for scope in ("session:sess-loop", "route:openai/gpt-4o"):
        assert f'data-scope="{scope}"' in dom
    assert 'data-scope="session:sess-ok"' not in dom and "SECRET-ARGS" not in dom
    assert 'data-detector="plan_deadlock"' in dom and ">HALT<" in dom

    shot = tmp_path / "console.png"
    rc, _, err = run_chromium(chromium_args(tmp_path / "p2") + ["--window-size=1000,1300",
                                                                 f"--screenshot={shot}", console])
    assert rc == 0 and shot.exists(), err[-2000:]
    w, h, share, colours = ink(shot.read_bytes())
    assert (w, h) == (1000, 1300)
    assert share > 0.02 and colours > 20, f"screenshot looks blank: {share:.3%} ink, {colours} colours"


class DevTools:
    """A minimal Chrome DevTools protocol client over aiohttp's WebSocket (no extra dependency)."""

    def __init__(self, ws):
        self.ws, self.n = ws, 0

    async def call(self, method: str, **params):
        self.n += 1
        await self.ws.send_json({"id": self.n, "method": method, "params": params})
        while True:
            msg = await asyncio.wait_for(self.ws.receive_json(), 30)
            if msg.get("id") == self.n:
                assert "error" not in msg, msg
                return msg["result"]

    async def js(self, expr: str):
        r = await self.call("Runtime.evaluate", expression=expr, returnByValue=True)
        assert "exceptionDetails" not in r, r
        return r["result"].get("value")

    async def until(self, expr: str, timeout_s: float = 20.0):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            v = await self.js(expr)
            if v:
                return v
            await asyncio.sleep(0.2)
        raise AssertionError(f"page never satisfied: {expr}")


@needs_chromium
def test_open_page_updates_live(topics, broker, console, tmp_path):
    import aiohttp

    seed(topics, broker)
    profile = tmp_path / "live"
    proc = subprocess.Popen(chromium_args(profile) + ["--remote-debugging-port=0", "--window-size=1100,800", console],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        port_file = profile / "DevToolsActivePort"
        port = int(wait_for(lambda: port_file.exists() and port_file.read_text().split("\n")[0], 30,
                            "Chromium's DevTools port"))

        async def drive():
            async with aiohttp.ClientSession() as http_session:
                async def page_ws():
                    async with http_session.get(f"http://127.0.0.1:{port}/json/list") as r:
                        pages = [t for t in await r.json() if t["type"] == "page" and t["url"].startswith(console)]
                    return pages[0]["webSocketDebuggerUrl"] if pages else None

                ws_url = None
                for _ in range(100):
                    ws_url = await page_ws()
                    if ws_url:
                        break
                    await asyncio.sleep(0.2)
                assert ws_url, "no page target"
                async with http_session.ws_connect(ws_url, max_msg_size=0) as ws:
                    dt = DevTools(ws)
                    await dt.until("!!document.querySelector('[data-incident-id=\"inc-loop-7f3a\"]')")
                    await dt.until("!!document.querySelector('[data-scope=\"session:sess-loop\"]')")
                    await dt.js("window.__sameDocument = 42")
                    ttl1 = await dt.js("document.querySelector('[data-scope=\"session:sess-loop\"] td.ttl').textContent")
                    assert ttl1.startswith(("14m", "15m")), ttl1

                    await asyncio.to_thread(publish, topics, broker, incidents=[
                        incident("inc-new-cafe", detector="plan_deadlock", session="sess-dead"),
                        incident("inc-loop-7f3a", session="sess-loop", status="resolved"),
                    ], commands=[
                        command("halt", "workflow", "wf-dead", ttl_s=1800, detector="plan_deadlock"),
                        command("release", "session", "sess-loop", ttl_s=None),
                    ])
                    await dt.until("!!document.querySelector('[data-incident-id=\"inc-new-cafe\"]')")
                    await dt.until("!document.querySelector('[data-incident-id=\"inc-loop-7f3a\"]')")
                    await dt.until("!!document.querySelector('[data-scope=\"workflow:wf-dead\"]')")
                    await dt.until("!document.querySelector('[data-scope=\"session:sess-loop\"]')")
                    assert await dt.js("window.__sameDocument") == 42  # pushed, not reloaded
                    count = await dt.js("document.querySelector('[data-detector=\"plan_deadlock\"] .big').textContent")
                    assert count == "1"
                    sel = "document.querySelector('[data-scope=\"route:openai/gpt-4o\"] td.ttl').textContent"
                    t1 = await dt.js(sel)
                    await asyncio.sleep(2.2)
                    assert await dt.js(sel) != t1, "remaining TTL does not count down"
                    assert await dt.js("document.getElementById('status').textContent") == "live"

                    # the new incident's row, as pixels: a clipped screenshot with text in it
                    rect = await dt.js("(() => { const r = document.querySelector('[data-incident-id=\"inc-new-cafe\"]')"
                                       ".getBoundingClientRect(); return [r.x, r.y, r.width, r.height]; })()")
                    x, y, w, h = rect
                    assert w > 300 and h > 20
                    shot = await dt.call("Page.captureScreenshot", format="png",
                                         clip={"x": x, "y": y, "width": w, "height": h, "scale": 1})
                    import base64

                    png = base64.b64decode(shot["data"])
                    (tmp_path / "row.png").write_bytes(png)
                    _, _, share, colours = ink(png)
                    assert share > 0.03 and colours > 10, f"incident row looks empty: {share:.3%}, {colours} colours"

        asyncio.run(asyncio.wait_for(drive(), 90))
    finally:
        stop(proc)


def test_cli_errors_are_one_line_exit_2(broker):
    from streams.broker import free_port

    env = dict(os.environ, BREAKWATER_BROKER=f"kafka://127.0.0.1:{free_port()}")
    r = subprocess.run([sys.executable, "-m", "streams.console"], env=env, capture_output=True, text=True, timeout=60,
                       start_new_session=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "BREAKWATER_BROKER" in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "streams.console", "--port", "70000"], env=dict(os.environ,
                       BREAKWATER_BROKER=broker.url), capture_output=True, text=True, timeout=60, start_new_session=True)
    assert r.returncode == 2 and "--port" in r.stderr, r.stderr
