"""``breakwater tail dlq`` against the real embedded broker: every rejection's reason, detail, source
topic/partition/offset, size, hash and truncated flag from the headers, never the rejected content
(raw prompts and tool arguments must not reach a terminal), as lines or ``--json``.

The first tests write DLQ records with the header layout the worker writes (schemas/agent.spans.dlq.headers.schema.json,
plus ``error.count``, ``error.truncated`` and ``error.original_bytes``); the last runs a real worker
that rejects bad input and reads its DLQ with the CLI.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import subprocess
import sys
import time
import uuid

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from streams.broker import create_topics
from streams.settings import Settings
from streams.tail import tail

pytestmark = pytest.mark.broker

T0_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
SECRET = "SECRET-PROMPT-do-not-print"
BAD_JSON = ('{"name": "chat", "attributes": {"gen_ai.prompt": "' + SECRET + '"').encode()
BIG = b'[{"gen_ai.tool.call.arguments": "' + SECRET.encode() + b'", "pad": "' + b"x" * 4000


def headers(reason: str, detail: str, topic: str, partition: int, offset: int, *, count: int = 1,
            original: int | None = None) -> list[tuple[str, bytes]]:
    h = [("error.reason", reason.encode()), ("error.detail", detail.encode()), ("error.count", str(count).encode()),
         ("source.topic", topic.encode()), ("source.partition", str(partition).encode()),
         ("source.offset", str(offset).encode())]
    if original is not None:
        h += [("error.truncated", b"1"), ("error.original_bytes", str(original).encode())]
    return h


async def send(bootstrap: str, topic: str, records: list[tuple[bytes | None, bytes, list, int]]) -> None:
    p = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await p.start()
    try:
        for key, value, hdrs, ts in records:
            await p.send_and_wait(topic, value, key=key, headers=hdrs, timestamp_ms=ts)
    finally:
        await p.stop()


@pytest.fixture
def dlq(broker):
    tag = uuid.uuid4().hex[:8]
    s = Settings(broker=broker.url, topic_dlq=f"dlq-{tag}")
    asyncio.run(create_topics(broker.bootstrap, [(s.topic_dlq, 1, {})]))
    asyncio.run(send(broker.bootstrap, s.topic_dlq, [
        (f"sess-{SECRET}".encode(), BAD_JSON,
         headers("bad_json", "not valid JSON (unexpected end of data, at 1:60)", "agent.spans", 2, 41), T0_MS + 1000),
        (None, BIG, headers("oversized", "message is 2000000 bytes, more than 1048576", "otlp_spans", 0, 7,
                            count=3, original=2_000_000), T0_MS + 2000),
        (b"s3", b"\x1b[31m\xff", headers("not_utf8", "not valid UTF-8 (at byte 1)\x1b[2J", "agent.spans", 1, 9),
         T0_MS + 3000),
    ]))
    return s


def run_tail(settings, **kw):
    out, err = io.StringIO(), io.StringIO()
    stats = asyncio.run(asyncio.wait_for(tail(settings, "dlq", out=out, err=err, color=False,
                                              idle_timeout_s=1.5, **kw), 30))
    return out.getvalue(), err.getvalue(), stats


def test_lines_show_reason_source_size_and_truncation_never_content(dlq):
    out, err, stats = run_tail(dlq)
    lines = out.splitlines()
    assert stats.printed == 3 and stats.bad == 0, (out, err)
    assert lines[0] == ("2026-01-01T00:00:01.000Z  bad_json        agent.spans[2]@41  " f"{len(BAD_JSON)} B  "
                        f"sha256:{hashlib.sha256(BAD_JSON).hexdigest()[:12]}  "
                        "not valid JSON (unexpected end of data, at 1:60)")
    assert "oversized" in lines[1] and "otlp_spans[0]@7" in lines[1] and f"{len(BIG):,} B" in lines[1]
    assert "TRUNCATED from 2,000,000 B" in lines[1] and "3 rejections" in lines[1]
    assert "not_utf8" in lines[2] and "agent.spans[1]@9" in lines[2]
    # the rejected bytes, the key (a session id) and terminal escapes never reach the output
    assert SECRET not in out and "gen_ai.prompt" not in out and "\x1b" not in out and "pad" not in out
    assert "\\x1b[2J" in lines[2]


def test_json_lines_carry_headers_sizes_and_hashes_only(dlq):
    out, _, _ = run_tail(dlq, as_json=True)
    docs = [orjson.loads(ln) for ln in out.splitlines()]
    assert [d["reason"] for d in docs] == ["bad_json", "oversized", "not_utf8"]
    first, big = docs[0], docs[1]
    assert first["source"] == {"topic": "agent.spans", "partition": 2, "offset": 41}
    assert first["bytes"] == len(BAD_JSON) and first["truncated"] is False and first["original_bytes"] is None
    assert first["key_bytes"] == len(f"sess-{SECRET}") and len(first["key_sha256"]) == 12
    assert first["rejected_at"] == "2026-01-01T00:00:01.000Z" and first["dlq"] == {"partition": 0, "offset": 0}
    assert big["truncated"] is True and big["original_bytes"] == 2_000_000 and big["count"] == 3
    assert big["key_bytes"] is None
    assert SECRET not in out and "pad" not in out


def test_reason_and_since_filters(dlq):
    out, err, _ = run_tail(dlq, reason="oversized")
    assert len(out.splitlines()) == 1 and "oversized" in out
    out, _, _ = run_tail(dlq, since_ns=(T0_MS + 2500) * 1_000_000)
    assert len(out.splitlines()) == 1 and "not_utf8" in out
    out, err, _ = run_tail(dlq, reason="clock_skew")
    assert out == "" and "no DLQ record with reason 'clock_skew'" in err and "bad_json" in err


def test_the_cli_and_its_filter_errors(dlq):
    env = dict(os.environ, BREAKWATER_BROKER=dlq.broker, BREAKWATER_TOPIC_DLQ=dlq.topic_dlq, NO_COLOR="1")
    r = subprocess.run([sys.executable, "-m", "streams", "tail", "dlq", "--reason", "bad_json"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0].split()[1:3] == ["bad_json", "agent.spans[2]@41"]
    assert SECRET not in r.stdout + r.stderr
    for argv, flag in ((["tail", "dlq", "--detector", "retry_storm"], "--detector"),
                       (["tail", "dlq", "--severity", "critical"], "--severity"),
                       (["tail", "incidents", "--reason", "bad_json"], "--reason")):
        bad = subprocess.run([sys.executable, "-m", "streams", *argv], env=env, capture_output=True, text=True,
                             timeout=60)
        assert bad.returncode == 2 and flag in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1


def test_what_a_real_worker_rejected(isolated):
    """End to end: a worker routes bad input to the DLQ; ``breakwater tail dlq`` shows why, not what."""
    settings, start_worker = isolated
    start_worker()
    asyncio.run(send(settings.bootstrap_servers, settings.topic_spans, [
        (b"k-bad", BAD_JSON, [], int(time.time() * 1000)),
        (b"k-bad2", b"[1, 2]", [], int(time.time() * 1000)),
    ]))
    env = dict(os.environ, BREAKWATER_BROKER=settings.broker, BREAKWATER_TOPIC_DLQ=settings.topic_dlq, NO_COLOR="1")
    deadline, lines = time.monotonic() + 60, []
    while time.monotonic() < deadline:
        r = subprocess.run([sys.executable, "-m", "streams", "tail", "dlq", "--json"], env=env, capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        if len(lines) >= 2:
            break
        time.sleep(1.0)
    docs = [orjson.loads(ln) for ln in lines]
    assert len(docs) == 2, (lines, r.stderr)
    by_reason = {d["reason"]: d for d in docs}
    assert set(by_reason) == {"bad_json", "bad_span"}
    assert {d["source"]["topic"] for d in docs} == {settings.topic_spans}
    assert all(d["detail"] and d["truncated"] is False for d in docs)
    assert by_reason["bad_json"]["bytes"] == len(BAD_JSON) and by_reason["bad_span"]["count"] == 2
    assert by_reason["bad_json"]["sha256"] == hashlib.sha256(BAD_JSON).hexdigest()[:12]
    assert SECRET not in r.stdout
