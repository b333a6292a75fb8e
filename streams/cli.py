"""``breakwater`` command line (README "Commands"). Imports are lazy so ``replay`` starts fast.

Errors a person can act on (bad env values, an unreachable broker, bad flag values) are one line
on stderr and exit code 2 (:mod:`streams.errors`); ``--debug`` shows their traceback. A closed
stdout (``breakwater tail breaker --json | head -1``) ends the command quietly.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import traceback
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from streams.errors import UserError

#: Settings of the running command, so a Kafka error can name the broker it was talking to.
_CURRENT: dict[str, Any] = {}
_SECRET_FIELDS = ("sasl_password",)


def _settings(args: argparse.Namespace):  # noqa: ANN202
    from pydantic import ValidationError

    from streams.settings import Settings

    overrides = {}
    if getattr(args, "broker", None):
        overrides["broker"] = args.broker
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        lines = []
        for e in exc.errors():
            loc = ".".join(str(x) for x in e["loc"])
            msg = e["msg"].removeprefix("Value error, ").removeprefix(f"{loc}: ")
            name = ("--broker" if loc == "broker" and overrides else f"BREAKWATER_{loc.upper()}") if loc else ""
            where = f"{name}: " if name else ""  # cross-field errors name their env vars
            value = e.get("input")
            if loc and loc not in _SECRET_FIELDS and isinstance(value, str | int | float) \
                    and repr(str(value)) not in msg:
                msg += f" (got {str(value)!r})"
            lines.append(f"configuration error: {where}{msg}")
        raise UserError("\nbreakwater: ".join(lines)) from exc
    _CURRENT["settings"] = settings
    _CURRENT["source"] = "--broker" if overrides else None
    return settings


def _policy(path: str | None, settings=None):  # noqa: ANN001, ANN202
    from streams.policy import Policy, PolicyError

    path = path or (str(settings.policy_file) if settings is not None and settings.policy_file else None)
    try:
        return Policy.load(path)
    except PolicyError as exc:
        raise UserError(str(exc)) from exc


def _check_broker(settings) -> None:  # noqa: ANN001
    """Fail within seconds, with one line naming BREAKWATER_BROKER, when no Kafka answers there."""
    from streams.errors import check_broker

    check_broker(settings, source=_CURRENT.get("source"))


def _run_kafka(coro: Coroutine[Any, Any, Any]) -> Any:
    """``asyncio.run`` for a coroutine that talks to Kafka: client errors become one-line UserErrors."""
    from aiokafka.errors import KafkaError

    from streams.errors import kafka_failure

    try:
        return asyncio.run(coro)
    except KafkaError as exc:
        raise kafka_failure(exc, _CURRENT.get("settings"), _CURRENT.get("source")) from exc


def cmd_replay(args: argparse.Namespace) -> int:
    import time

    from streams.replay import progress_line, report, run

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
        started = time.monotonic()
        stats = run(inputs, sys.stdout.buffer, cmd_out, policy=policy, batch_spans=args.batch,
                    names=list(args.files),
                    progress=None if args.no_progress else (lambda st: progress_line(st, started)))
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

    from streams.errors import check_protobuf_backend

    check_protobuf_backend()
    settings = _settings(args)
    policy = _policy(args.policy, settings)
    _check_broker(settings)
    run_worker(settings, policy)
    return 0


def cmd_schemas(args: argparse.Namespace) -> int:
    from streams.schemas import write_schemas

    for p in write_schemas(Path(args.out)):
        print(p)
    return 0


def effective_config(settings) -> list[dict[str, Any]]:  # noqa: ANN001
    """The values in force, one per setting: env var, value (secrets masked), and where it came from.

    >>> from streams.settings import Settings
    >>> rows = {r["env"]: r for r in effective_config(Settings(partitions=8))}
    >>> rows["BREAKWATER_PARTITIONS"]["value"], rows["BREAKWATER_SASL_PASSWORD"]["value"]
    (8, None)
    """
    set_in_env = {k.upper() for k in os.environ if k.upper().startswith("BREAKWATER_")}
    rows = []
    for name in type(settings).model_fields:
        env = f"BREAKWATER_{name.upper()}"
        value = getattr(settings, name)
        if value is not None and name in _SECRET_FIELDS:
            value = "********"
        elif value is not None and not isinstance(value, bool | int | float):
            value = str(value)
        source = "default"
        if name in settings.model_fields_set:
            source = "--broker" if name == "broker" and _CURRENT.get("source") == "--broker" else \
                "environment" if env in set_in_env else "argument"
        rows.append({"env": env, "value": value, "from": source})
    return rows


def cmd_config(args: argparse.Namespace) -> int:
    import orjson

    from streams.settings import config_reference

    settings = _settings(args)  # the environment must be valid: a bad value is an error naming its env var
    rows = effective_config(settings)
    if args.json:
        print(orjson.dumps({r["env"]: r["value"] for r in rows}, option=orjson.OPT_INDENT_2).decode())
        return 0
    print("Values in force (BREAKWATER_* environment over the defaults; secrets masked):\n")
    print("| env var | value | from |\n|---|---|---|")
    for r in rows:
        value = "(unset)" if r["value"] is None else f"`{r['value']}`"
        print(f"| `{r['env']}` | {value} | {r['from']} |")
    print("\nReference (README \"Configuration reference\"):\n")
    print(config_reference())
    return 0


def cmd_tail(args: argparse.Namespace) -> int:
    from streams.tail import detector_names, parse_since, tail

    if args.detector is not None and args.detector not in detector_names():
        raise UserError(f"tail: unknown detector {args.detector!r} for --detector; "
                        f"valid: {', '.join(detector_names())}")
    # filters that cannot match the chosen topic are errors, never an empty output
    misplaced = [flag for flag, value, applies in (
        ("--detector", args.detector, args.what != "dlq"), ("--tenant", args.tenant, args.what != "dlq"),
        ("--severity", args.severity, args.what == "incidents"), ("--reason", args.reason, args.what == "dlq"),
    ) if value is not None and not applies]
    if misplaced:
        raise UserError(f"tail {args.what}: {misplaced[0]} does not apply to {args.what} records "
                        f"(--reason is for dlq; --detector and --tenant for incidents and breaker; "
                        f"--severity for incidents)")
    since_ns = None
    if args.since:
        try:
            since_ns = parse_since(args.since)
        except ValueError as exc:
            raise UserError(f"tail: --since: {exc}") from exc
    settings = _settings(args)
    _check_broker(settings)
    try:
        _run_kafka(tail(settings, args.what, follow=args.follow, as_json=args.json, detector=args.detector,
                        tenant=args.tenant, severity=args.severity, since_ns=since_ns, reason=args.reason))
    except KeyboardInterrupt:
        pass
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from streams import simulate

    start_ns = args.start_ns if args.start_ns is not None else simulate.default_start_ns(bool(args.out))
    inject: tuple[str, ...] = ()
    if args.inject:
        names = [x.strip() for x in args.inject.split(",") if x.strip()]
        inject = simulate.PATTERNS[len(simulate.LOOP_KINDS):] if names == ["all"] else tuple(names)
        bad = [x for x in inject if x not in simulate.PATTERNS]
        if bad:
            print(f"breakwater simulate: unknown pattern {bad[0]!r} in --inject; expected 'all' or a comma-separated "
                  f"list of {', '.join(simulate.PATTERNS)}", file=sys.stderr)
            return 2
    spans = list(simulate.generate(args.seed, args.sessions, start_ns, loops=args.loops, inject=inject))
    if args.out:
        simulate.write_file(args.out if args.out != "-" else sys.stdout.buffer, spans, args.format)
        extra = f", patterns {', '.join(inject)}" if inject else ""
        print(f"simulate: {len(spans)} spans, {args.sessions} sessions, {args.loops} injected loops{extra}",
              file=sys.stderr)
        return 0
    settings = _settings(args)
    _check_broker(settings)
    _run_kafka(simulate.publish(settings, spans, rate=args.rate))
    print(f"simulate: published {len(spans)} spans to {settings.topic_spans}", file=sys.stderr)
    return 0


def cmd_backtest(args: argparse.Namespace) -> int:
    """NEW policy against CURRENT on a time range of the input topics, or on files (README "Backtest:
    try a policy on recorded traffic"). Never publishes, never commits offsets."""
    import time

    from streams import backtest as bt_mod
    from streams.tail import parse_since

    new, current = _policy(args.policy), _policy(args.against)
    try:
        policies = {"new": bt_mod.policy_info(args.policy), "current": bt_mod.policy_info(args.against)}
    except OSError as exc:
        raise UserError(f"backtest: {exc}") from exc
    bt = bt_mod.Backtest(new, current)
    t0 = time.monotonic()
    next_at = [t0 + 5.0]

    def tick() -> None:
        if not args.no_progress and time.monotonic() >= next_at[0]:
            next_at[0] = time.monotonic() + 5.0
            bt_mod.progress_line(bt, t0)

    if args.files:
        if args.since or args.until:
            raise UserError("backtest: --since/--until select Kafka offsets by time; with FILE… the whole files "
                            "are read")
        inputs = []
        try:
            for name in args.files:
                inputs.append(sys.stdin.buffer if name == "-" else open(name, "rb"))  # noqa: SIM115
            covered = {"files": bt_mod.run_files(bt, inputs, list(args.files), tick)}
        except OSError as exc:
            raise UserError(f"backtest: {exc}") from exc
        finally:
            for fp in inputs:
                if fp is not sys.stdin.buffer:
                    fp.close()
    else:
        if not args.since:
            raise UserError("backtest: give --since (a time range of the input topics) or FILE…")
        try:
            now_ns = time.time_ns()
            since_ns = parse_since(args.since, now_ns)
            until_ns = parse_since(args.until, now_ns) if args.until else now_ns
        except ValueError as exc:
            raise UserError(f"backtest: {exc}") from exc
        if until_ns <= since_ns:
            raise UserError(f"backtest: --until ({args.until}) is not after --since ({args.since})")
        settings = _settings(args)
        _check_broker(settings)
        try:
            covered = _run_kafka(bt_mod.run_kafka(bt, settings, since_ns // 1_000_000, until_ns // 1_000_000,
                                                  tick=tick))
        except TimeoutError as exc:
            raise UserError(f"backtest: {exc}") from exc
    if not args.no_progress:
        bt_mod.progress_line(bt, t0, final=True)
    report = bt_mod.build_report(bt, covered, policies, examples=args.examples)
    if args.html:
        try:
            with open(args.html, "w", encoding="utf-8") as fp:
                fp.write(bt_mod.to_html(report))
        except OSError as exc:
            raise UserError(f"backtest: --html {args.html}: {exc.strerror}") from exc
        print(f"backtest: wrote {args.html}", file=sys.stderr)
    if args.json:
        sys.stdout.buffer.write(bt_mod.to_json(report))
    else:
        sys.stdout.write(bt_mod.to_text(report))
    return 0


def cmd_dev(args: argparse.Namespace) -> int:
    from streams.dev import run_dev

    return run_dev(duration_s=args.duration, seed=args.seed)


def cmd_breaker_release(args: argparse.Namespace) -> int:
    """Publish a manual release when a command is in force for the scope (README "Commands").

    Nothing in force (never commanded, already released, expired, or a mistyped key) is said in one
    line on stderr, with the keys in force that look alike, and exits 1 without publishing: the
    request was well formed (exit 2 stays for bad input and an unreachable broker), but a script
    must notice that it released nothing. ``--force`` publishes the release regardless.
    """
    import difflib

    from streams.admin import find_in_force, manual_release_command, publish_release
    from streams.tail import clean, format_command

    settings = _settings(args)
    try:
        cmd = manual_release_command(args.scope, reason=args.reason, tenant=args.tenant)
    except ValueError as exc:
        print(f"breakwater breaker release: {exc}", file=sys.stderr)
        return 2
    _check_broker(settings)
    key = cmd.kafka_key().decode()
    found = None
    if not args.force:
        try:
            found = _run_kafka(find_in_force(settings, key))
        except TimeoutError as exc:
            raise UserError(f"breaker release: {exc}; --force publishes without checking") from exc
        shown = clean(key, 200)
        if found.command is None:
            alike = difflib.get_close_matches(key, found.others, n=3, cutoff=0.6)
            hint = f"; in force with a similar key: {', '.join(clean(k, 200) for k in alike)}" if alike else ""
            print(f"breakwater breaker release: nothing in force for {shown} on {settings.topic_breaker} "
                  f"({found.why_not()}){hint}; nothing published (--force publishes a release anyway)",
                  file=sys.stderr)
            return 1
        held_by = found.command.scope.tenant
        if args.tenant and cmd.scope.kind in ("route", "tool") and held_by != args.tenant:
            print(f"breakwater breaker release: the command in force for {shown} is for tenant "
                  f"{clean(held_by, 120) if held_by else '(every tenant)'}, not {clean(args.tenant, 120)}; a release "
                  f"replaces it for everyone, so nothing published (--force publishes it anyway)", file=sys.stderr)
            return 1
    _run_kafka(publish_release(settings, cmd))
    print(cmd.model_dump_json())
    if found is not None and found.command is not None:
        print(f"breakwater breaker release: released  {format_command(found.command.model_dump(mode='json'))}",
              file=sys.stderr)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from streams.bench import main as bench_main
    from streams.bench import parse_brokers

    try:
        brokers = parse_brokers(args.broker)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    argv = ["breakwater", "bench", "--sessions", str(args.sessions), "--memory-sessions", str(args.memory_sessions),
            "--keys", str(args.keys)]
    if args.no_live:
        argv.append("--no-live")
    else:
        argv += ["--broker", ",".join(brokers), "--e2e-spans", str(args.e2e_spans), "--latency-rate",
                 args.latency_rate, "--latency-seconds", f"{args.latency_seconds:g}", "--deny-trials",
                 str(args.deny_trials), "--deny-load", f"{args.deny_load:g}"]
    print(bench_main(sessions=args.sessions, memory_sessions=args.memory_sessions, e2e_spans=args.e2e_spans,
                     latency_rates=tuple(float(x) for x in args.latency_rate.split(",") if x),
                     latency_s=args.latency_seconds, keys=args.keys, live=not args.no_live, brokers=brokers,
                     deny_trials=args.deny_trials, deny_load=args.deny_load, command=" ".join(argv)))
    return 0


def _common() -> argparse.ArgumentParser:
    """Options every subcommand also accepts after its name (``breakwater tail … --debug``)."""
    c = argparse.ArgumentParser(add_help=False)
    c.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show the full traceback of an error instead of one line")
    return c


def cmd_console(args: argparse.Namespace) -> int:
    from streams.console import main as console_main

    argv = ["--host", args.host, "--port", str(args.port), "--max-incidents", str(args.max_incidents)]
    if args.broker:
        argv += ["--broker", args.broker]
    if getattr(args, "debug", False):
        argv.append("--debug")
    return console_main(argv)


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive number")
    return n


def _broker_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--broker", metavar="URL",
                        help="Kafka bootstrap URL(s), kafka://host:port[,…] (overrides BREAKWATER_BROKER)")


def build_parser() -> argparse.ArgumentParser:
    from streams import __version__

    common = [_common()]
    p = argparse.ArgumentParser(
        prog="breakwater", description="Stop runaway LLM agents while they run.",
        epilog="Settings come from BREAKWATER_* environment variables (see `breakwater config`).")
    p.add_argument("--version", action="version", version=f"breakwater {__version__}",
                   help="print the version and exit")
    p.add_argument("--debug", action="store_true", default=False,
                   help="show the full traceback of an error instead of one line")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")

    r = sub.add_parser("replay", parents=common, help="run the detectors on span files, print incidents (JSON lines)")
    r.add_argument("files", nargs="+", help="files of flat JSON / JSON arrays / JSON lines / OTLP JSON; - = stdin")
    r.add_argument("--policy", help="policy TOML file")
    r.add_argument("--commands", help="also write breaker commands (JSON lines) to this file")
    r.add_argument("--batch", type=_positive_int, default=1000, metavar="SPANS",
                   help="spans per processing batch, from consecutive documents (default 1000; 1 = one "
                        "document per batch). Outputs are the same records; only their order within a batch "
                        "follows event time")
    r.add_argument("--no-progress", action="store_true",
                   help="do not print progress lines on stderr (printed every 5 s of a long run)")
    r.set_defaults(fn=cmd_replay)

    bk = sub.add_parser("backtest", parents=common,
                        help="try a policy on recorded traffic: NEW vs CURRENT policy on the input topics' time "
                             "range (or files); never publishes, never commits")
    bk.add_argument("files", nargs="*", help="files as replay reads them (- = stdin) instead of Kafka")
    bk.add_argument("--policy", required=True, metavar="NEW.toml", help="the policy to try")
    bk.add_argument("--against", metavar="CURRENT.toml", help="the policy in force (default: the built-in defaults)")
    bk.add_argument("--since", metavar="T",
                    help="Kafka: records from this time (record timestamps): RFC 3339 or a duration ago (24h, 1d)")
    bk.add_argument("--until", metavar="T", help="Kafka: records before this time (default: now)")
    bk.add_argument("--json", action="store_true", help="the report as JSON on stdout instead of the table")
    bk.add_argument("--html", metavar="OUT", help="also write the report as a self-contained HTML page with a "
                                                  "timeline per detector")
    bk.add_argument("--examples", type=_positive_int, default=3, metavar="N",
                    help="example incidents per kind and detector (default 3)")
    bk.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    _broker_flag(bk)
    bk.set_defaults(fn=cmd_backtest)

    w = sub.add_parser("worker", parents=common, help="run the faust worker (ingest, detect, publish)")
    w.add_argument("--policy", help="policy TOML file (else BREAKWATER_POLICY_FILE)")
    _broker_flag(w)
    w.set_defaults(fn=cmd_worker)

    s = sub.add_parser("schemas", parents=common, help="write the JSON Schemas of every topic")
    s.add_argument("--out", default="schemas", help="directory to write them to (default: schemas)")
    s.set_defaults(fn=cmd_schemas)

    c = sub.add_parser("config", parents=common,
                       help="validate the BREAKWATER_* environment, print the values in force and the reference")
    c.add_argument("--json", action="store_true",
                   help="only the values in force, as one JSON object by env var (secrets masked)")
    c.set_defaults(fn=cmd_config)

    t = sub.add_parser("tail", parents=common,
                       help="print incidents, breaker commands or rejected input (the DLQ: reasons, never content)")
    t.add_argument("what", choices=["incidents", "breaker", "dlq"],
                   help="which topic: incidents, breaker commands, or dlq (rejected input: reason, detail, source "
                        "topic/partition/offset, size, hash, truncated; never the content)")
    t.add_argument("--json", action="store_true", help="raw JSON, one per line")
    t.add_argument("--follow", "-f", action="store_true", help="keep waiting for new records (Ctrl-C stops)")
    t.add_argument("--detector", metavar="D", help="only this detector's records (e.g. no_progress_loop)")
    t.add_argument("--tenant", metavar="T", help="only records of this tenant")
    t.add_argument("--severity", choices=["warning", "critical"], help="only incidents of this severity")
    t.add_argument("--reason", metavar="R", help="dlq only: only rejections with this reason (e.g. bad_json)")
    t.add_argument("--since", metavar="T",
                   help="start from this time: RFC 3339 (2026-01-01T12:00:00Z) or a duration ago (30s, 10m, 2h, 1d)")
    _broker_flag(t)
    t.set_defaults(fn=cmd_tail)

    m = sub.add_parser("simulate", parents=common,
                       help="realistic agent traffic with injected loops, to Kafka or a file")
    m.add_argument("--seed", type=int, default=7, help="random seed (same seed, same traffic)")
    m.add_argument("--sessions", type=int, default=50, help="number of simulated agent sessions")
    m.add_argument("--loops", type=int, default=3, help="how many of them loop (no_progress_loop)")
    m.add_argument("--inject", metavar="PATTERNS",
                   help="also inject these patterns after the loops: 'all' (every detector: session_storm, "
                        "route_storm, session_cost, tenant_cost, deadlock, silent) or a comma-separated list; "
                        "tenant_cost adds 20 minutes of that tenant's normal spending before the start")
    m.add_argument("--start-ns", type=int, metavar="NS",
                   help="event time of the first session, Unix ns (default: now when publishing to Kafka, "
                        "so a live worker sees current times; 1767225600000000000 = 2026-01-01T00:00:00Z "
                        "with --out, so the same seed gives the same bytes)")
    m.add_argument("--out", help="write to this file (- = stdout) instead of Kafka")
    m.add_argument("--format", choices=["jsonl", "json", "otlp_json"], default="jsonl",
                   help="file format with --out (default: jsonl)")
    m.add_argument("--rate", type=float, help="spans/s when publishing")
    _broker_flag(m)
    m.set_defaults(fn=cmd_simulate)

    d = sub.add_parser("dev", parents=common,
                       help="the demo: embedded broker, worker, simulated agents obeying the breaker, live tail, summary")
    d.add_argument("--duration", type=float, help="stop after this many seconds (default: until Ctrl-C)")
    d.add_argument("--seed", type=int, default=7, help="random seed of the simulated traffic")
    d.set_defaults(fn=cmd_dev)
    br = sub.add_parser("breaker", parents=common, help="operator actions on breaker commands")
    brs = br.add_subparsers(dest="breaker_cmd", metavar="ACTION")
    br.set_defaults(fn=lambda args: _usage(br))
    rel = brs.add_parser("release", parents=common,
                         help="publish a manual release for a scope (KIND:KEY, e.g. session:abc)")
    rel.add_argument("scope", help="KIND:KEY with KIND one of session, tenant, workflow, route, tool")
    rel.add_argument("--reason", required=True, help="why (recorded in the command)")
    rel.add_argument("--tenant", help="tenant of a route/tool scope")
    rel.add_argument("--force", action="store_true",
                     help="publish the release even when nothing is in force for the scope (by default that is "
                          "reported and exits 1 without publishing)")
    _broker_flag(rel)
    rel.set_defaults(fn=cmd_breaker_release)

    co = sub.add_parser("console", parents=common,
                        help="a live, read-only browser page of open incidents, breakers in force and counts")
    co.add_argument("--host", default="127.0.0.1",
                    help="address to bind (default 127.0.0.1; there is no authentication: bind another address "
                         "only on a trusted network)")
    co.add_argument("--port", type=int, default=0, help="port to bind (default 0: a free port; the URL is printed)")
    co.add_argument("--max-incidents", type=int, default=1000,
                    help="open incidents kept in memory; the least recently updated go first (default 1000)")
    _broker_flag(co)
    co.set_defaults(fn=cmd_console)
    b = sub.add_parser("bench", parents=common,
                       help="throughput and memory, as ratios to a ceiling measured in the same run")
    b.add_argument("--sessions", type=int, default=2000, help="simulated sessions in the replay file")
    b.add_argument("--memory-sessions", type=int, default=50_000, help="sessions of the replay-memory run")
    b.add_argument("--keys", type=int, default=100_000, help="keys per kind of state for memory per key")
    b.add_argument("--e2e-spans", type=int, default=100_000, help="spans pre-produced for the end-to-end run")
    b.add_argument("--latency-rate", default="5000,500", help="offered spans/s of the latency runs (comma separated)")
    b.add_argument("--latency-seconds", type=float, default=20.0, help="length of each latency run")
    b.add_argument("--broker", default="tansu", metavar="tansu|kafka|kafka://host:port",
                   help="broker of the live parts: tansu (embedded, default), kafka (Apache Kafka started by "
                        "deploy/kafka.sh; needs Java 17+ and Maven), kafka://host:port[,…] (an existing cluster); "
                        "comma separate several to run on each in turn")
    b.add_argument("--deny-trials", type=int, default=50,
                   help="trials of span → gateway deny (an OTel-instrumented agent loops until the LiteLLM hook "
                        "denies it); 0 skips it")
    b.add_argument("--deny-load", type=float, default=500.0,
                   help="background spans/s offered during the span → gateway deny trials (default 500)")
    b.add_argument("--no-live", action="store_true", help="skip the broker parts (replay and memory only)")
    b.set_defaults(fn=cmd_bench)
    p.set_defaults(fn=lambda args: _usage(p))
    return p


def _usage(parser: argparse.ArgumentParser) -> int:
    """A command without its subcommand: the help, on stdout, exit 2."""
    parser.print_help()
    return 2


def _quiet_stdout() -> None:
    """After a closed pipe: point stdout at /dev/null so the interpreter's final flush cannot fail."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        debug = bool(getattr(args, "debug", False))
        rc = int(args.fn(args) or 0)
        sys.stdout.flush()
        return rc
    except BrokenPipeError:
        # the reader went away (`breakwater tail … | head -1`): that is how pipes end, not an error
        _quiet_stdout()
        return 0
    except UserError as exc:
        if debug:
            traceback.print_exc()
        print(f"breakwater: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        return 130


if __name__ == "__main__":
    sys.exit(main())
