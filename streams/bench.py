"""``breakwater bench``: throughput as ratios against a ceiling measured in the same run.

* replay: spans/s of ``breakwater replay`` on a large OTLP JSON file of simulated mixed traffic,
  next to ``orjson.loads`` of the same lines (the decode-only ceiling) and ingest's ``decode``;
* memory: RSS delta and persisted-state bytes per tracked session, over many sessions.

Absolute figures depend on the machine; the ratios are what to compare between runs.
"""

from __future__ import annotations

import gc
import io
import os
import tempfile
import time
from pathlib import Path

import orjson


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def make_file(path: Path, sessions: int, seed: int = 11) -> int:
    from streams import simulate

    spans = list(simulate.generate(seed, sessions, 1_767_225_600 * 10**9, loops=max(1, sessions // 20)))
    simulate.write_file(str(path), spans, "otlp_json")
    return len(spans)


def bench_replay(sessions: int = 2000, repeat: int = 3) -> dict[str, float]:
    from streams.ingest import decode
    from streams.replay import REPLAY_LIMITS, run

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "traffic.otlp.jsonl"
        n_spans = make_file(path, sessions)
        lines = path.read_bytes().splitlines()
        size = path.stat().st_size

        def best(fn) -> float:  # noqa: ANN001
            times = []
            for _ in range(repeat):
                gc.collect()
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            return min(times)

        def loads_all() -> None:
            for x in lines:
                orjson.loads(x)

        def decode_all() -> None:
            for x in lines:
                decode(x, limits=REPLAY_LIMITS)

        t_orjson = best(loads_all)
        t_decode = best(decode_all)
        t_replay = best(lambda: run([open(path, "rb")], io.BytesIO(), io.BytesIO()))  # noqa: SIM115
    return {
        "spans": n_spans,
        "bytes": size,
        "orjson_spans_per_s": n_spans / t_orjson,
        "decode_spans_per_s": n_spans / t_decode,
        "replay_spans_per_s": n_spans / t_replay,
        "decode_ratio": t_orjson / t_decode,
        "replay_ratio": t_orjson / t_replay,
    }


def _history(i: int):  # noqa: ANN202
    from streams.models import Span

    sid = f"session-{i:08d}"
    trace = f"{i:032x}"
    base = 1_767_225_600 * 10**9 + i * 1000
    out = []
    for j in range(8):
        tool = ("search", "read_file", "http_get", "search")[j % 4]
        attrs = {"gen_ai.conversation.id": sid, "gen_ai.operation.name": "execute_tool",
                 "gen_ai.tool.name": tool, "tool.payload_hash": f"{(i * 31 + j) % 997:016x}"}
        if j % 3 == 2:
            attrs = {"gen_ai.conversation.id": sid, "gen_ai.operation.name": "chat",
                     "agent.state_hash": f"st{j // 3}", "gen_ai.usage.input_tokens": 900,
                     "gen_ai.usage.output_tokens": 120}
        out.append(Span(trace, f"{i * 16 + j:016x}", None, tool, "INTERNAL", base + j * 10**9,
                        base + j * 10**9 + 10**8, "OK", "", attrs, {"service.name": "svc", "tenant.id": "acme"}))
    return out


def bench_memory(sessions: int = 50_000) -> dict[str, float]:
    from streams.replay import Replayer

    rep = Replayer()
    rep.feed(_history(-1 % 10**9))  # warm caches
    gc.collect()
    before = _rss_bytes()
    for i in range(sessions):
        rep.feed(_history(i))
    gc.collect()
    after = _rss_bytes()
    n = len(rep.states)
    dumped = sum(len(rep.pipe.dump(st)) for st in list(rep.states.values())[:1000]) / min(n, 1000)
    return {"sessions": n, "rss_bytes_per_session": (after - before) / n, "state_bytes_per_session": dumped}


def main(sessions: int = 2000, memory_sessions: int = 50_000) -> str:
    r = bench_replay(sessions)
    m = bench_memory(memory_sessions)
    lines = [
        f"replay on {r['spans']:,} spans of simulated mixed traffic ({r['bytes'] / 1e6:.1f} MB OTLP JSON lines):",
        "| stage | spans/s | ratio to orjson.loads |",
        "|---|---:|---:|",
        f"| orjson.loads only (ceiling) | {r['orjson_spans_per_s']:,.0f} | 1.00 |",
        f"| ingest decode | {r['decode_spans_per_s']:,.0f} | {r['decode_ratio']:.2f} |",
        f"| replay (decode + detectors + policy + output) | {r['replay_spans_per_s']:,.0f} | {r['replay_ratio']:.2f} |",
        "",
        f"memory per tracked session ({m['sessions']:,} sessions, 8 spans each): "
        f"{m['rss_bytes_per_session']:,.0f} B RSS in memory, {m['state_bytes_per_session']:,.0f} B persisted state",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(main())
