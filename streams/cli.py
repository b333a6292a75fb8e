"""``breakwater`` command line (SPEC §7). Imports are lazy so ``replay`` starts fast."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path


def _settings(args: argparse.Namespace):  # noqa: ANN202
    from pydantic import ValidationError

    from streams.settings import Settings

    overrides = {}
    if getattr(args, "broker", None):
        overrides["broker"] = args.broker
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        for e in exc.errors():
            loc = ".".join(str(x) for x in e["loc"])
            msg = e["msg"].removeprefix("Value error, ")
            where = f"BREAKWATER_{loc.upper()}: " if loc else ""  # cross-field errors name their env vars
            print(f"breakwater: configuration error: {where}{msg}", file=sys.stderr)
        raise SystemExit(2) from exc


def _policy(path: str | None, settings=None):  # noqa: ANN001, ANN202
    from streams.policy import Policy, PolicyError

    path = path or (str(settings.policy_file) if settings is not None and settings.policy_file else None)
    try:
        return Policy.load(path)
    except PolicyError as exc:
        print(f"breakwater: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc


def cmd_replay(args: argparse.Namespace) -> int:
    from streams.replay import report, run

    policy = _policy(args.policy)
    inputs = []
    try:
        for name in args.files:
            inputs.append(sys.stdin.buffer if name == "-" else open(name, "rb"))  # noqa: SIM115
    except OSError as exc:
        print(f"breakwater replay: {exc}", file=sys.stderr)
        return 2
    cmd_out = open(args.commands, "wb") if args.commands else None  # noqa: SIM115
    try:
        stats = run(inputs, sys.stdout.buffer, cmd_out, policy=policy)
    finally:
        sys.stdout.buffer.flush()
        if cmd_out:
            cmd_out.close()
        for fp in inputs:
            if fp is not sys.stdin.buffer:
                fp.close()
    report(stats)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from streams.app import run_worker

    settings = _settings(args)
    policy = _policy(args.policy, settings)
    run_worker(settings, policy)
    return 0


def cmd_schemas(args: argparse.Namespace) -> int:
    from streams.schemas import write_schemas

    for p in write_schemas(Path(args.out)):
        print(p)
    return 0


def cmd_config(args: argparse.Namespace) -> int:  # noqa: ARG001
    from streams.settings import config_reference

    print(config_reference())
    return 0


def cmd_tail(args: argparse.Namespace) -> int:
    from streams.tail import tail

    settings = _settings(args)
    since_ns = None
    if args.since:
        from datetime import datetime

        since_ns = int(datetime.fromisoformat(args.since.replace("Z", "+00:00")).timestamp() * 1e9)
    try:
        asyncio.run(tail(settings, args.what, follow=args.follow, as_json=args.json, detector=args.detector,
                         tenant=args.tenant, severity=args.severity, since_ns=since_ns))
    except KeyboardInterrupt:
        pass
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from streams import simulate

    start_ns = args.start_ns
    spans = list(simulate.generate(args.seed, args.sessions, start_ns, loops=args.loops))
    if args.out:
        simulate.write_file(args.out if args.out != "-" else sys.stdout.buffer, spans, args.format)
        print(f"simulate: {len(spans)} spans, {args.sessions} sessions, {args.loops} injected loops",
              file=sys.stderr)
        return 0
    settings = _settings(args)
    asyncio.run(simulate.publish(settings, spans, rate=args.rate))
    print(f"simulate: published {len(spans)} spans to {settings.topic_spans}", file=sys.stderr)
    return 0


def cmd_dev(args: argparse.Namespace) -> int:
    from streams.dev import run_dev

    return run_dev(duration_s=args.duration, seed=args.seed)


def cmd_breaker_release(args: argparse.Namespace) -> int:
    from streams.admin import manual_release_command, publish_release

    settings = _settings(args)
    try:
        cmd = manual_release_command(args.scope, reason=args.reason, tenant=args.tenant)
    except ValueError as exc:
        print(f"breakwater breaker release: {exc}", file=sys.stderr)
        return 2
    asyncio.run(publish_release(settings, cmd))
    print(cmd.model_dump_json())
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from streams.bench import main as bench_main

    argv = ["breakwater", "bench", "--sessions", str(args.sessions), "--memory-sessions", str(args.memory_sessions),
            "--keys", str(args.keys)]
    if args.no_live:
        argv.append("--no-live")
    else:
        argv += ["--e2e-spans", str(args.e2e_spans), "--latency-rate", args.latency_rate,
                 "--latency-seconds", f"{args.latency_seconds:g}"]
    print(bench_main(sessions=args.sessions, memory_sessions=args.memory_sessions, e2e_spans=args.e2e_spans,
                     latency_rates=tuple(float(x) for x in args.latency_rate.split(",") if x),
                     latency_s=args.latency_seconds, keys=args.keys, live=not args.no_live,
                     command=" ".join(argv)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="breakwater", description="Stop runaway LLM agents while they run.")
    sub = p.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("replay", help="run the detectors on span files, print incidents (JSON lines)")
    r.add_argument("files", nargs="+", help="files of flat JSON / JSON arrays / JSON lines / OTLP JSON; - = stdin")
    r.add_argument("--policy", help="policy TOML file")
    r.add_argument("--commands", help="also write breaker commands (JSON lines) to this file")
    r.set_defaults(fn=cmd_replay)

    w = sub.add_parser("worker", help="run the faust worker (ingest, detect, publish)")
    w.add_argument("--policy", help="policy TOML file (else BREAKWATER_POLICY_FILE)")
    w.add_argument("--broker", help="override BREAKWATER_BROKER")
    w.set_defaults(fn=cmd_worker)

    s = sub.add_parser("schemas", help="write the JSON Schemas of every topic")
    s.add_argument("--out", default="schemas")
    s.set_defaults(fn=cmd_schemas)

    c = sub.add_parser("config", help="print the configuration reference (env vars)")
    c.set_defaults(fn=cmd_config)

    t = sub.add_parser("tail", help="print incidents or breaker commands")
    t.add_argument("what", choices=["incidents", "breaker"])
    t.add_argument("--json", action="store_true", help="raw JSON, one per line")
    t.add_argument("--follow", "-f", action="store_true")
    t.add_argument("--detector")
    t.add_argument("--tenant")
    t.add_argument("--severity", choices=["warning", "critical"])
    t.add_argument("--since", help="RFC 3339 time to start from")
    t.add_argument("--broker")
    t.set_defaults(fn=cmd_tail)

    m = sub.add_parser("simulate", help="realistic agent traffic with injected loops, to Kafka or a file")
    m.add_argument("--seed", type=int, default=7)
    m.add_argument("--sessions", type=int, default=50)
    m.add_argument("--loops", type=int, default=3)
    m.add_argument("--start-ns", type=int, default=1_767_225_600_000_000_000, help="event time of the first span")
    m.add_argument("--out", help="write to this file (- = stdout) instead of Kafka")
    m.add_argument("--format", choices=["jsonl", "json", "otlp_json"], default="jsonl")
    m.add_argument("--rate", type=float, help="spans/s when publishing")
    m.add_argument("--broker")
    m.set_defaults(fn=cmd_simulate)

    d = sub.add_parser("dev", help="the demo: embedded broker, worker, simulator, live tail")
    d.add_argument("--duration", type=float, help="stop after this many seconds (default: until Ctrl-C)")
    d.add_argument("--seed", type=int, default=7)
    d.set_defaults(fn=cmd_dev)
    br = sub.add_parser("breaker", help="operator actions on breaker commands")
    brs = br.add_subparsers(dest="breaker_cmd", required=True)
    rel = brs.add_parser("release", help="publish a manual release for a scope (KIND:KEY, e.g. session:abc)")
    rel.add_argument("scope")
    rel.add_argument("--reason", required=True, help="why (recorded in the command)")
    rel.add_argument("--tenant", help="tenant of a route/tool scope")
    rel.add_argument("--broker")
    rel.set_defaults(fn=cmd_breaker_release)

    b = sub.add_parser("bench", help="throughput and memory, as ratios to a ceiling measured in the same run")
    b.add_argument("--sessions", type=int, default=2000, help="simulated sessions in the replay file")
    b.add_argument("--memory-sessions", type=int, default=50_000)
    b.add_argument("--keys", type=int, default=100_000, help="keys per kind of state for memory per key")
    b.add_argument("--e2e-spans", type=int, default=100_000, help="spans pre-produced for the end-to-end run")
    b.add_argument("--latency-rate", default="5000,500", help="offered spans/s of the latency runs (comma separated)")
    b.add_argument("--latency-seconds", type=float, default=20.0, help="length of each latency run")
    b.add_argument("--no-live", action="store_true", help="skip the embedded-broker parts (replay and memory only)")
    b.set_defaults(fn=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.fn(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
