"""Errors a person can act on (issue 13): one line on stderr naming the setting and its value, exit
code 2, no traceback unless ``--debug``; a closed stdout ends ``tail`` quietly; ``--since`` takes
relative durations; ``--version``, bare ``breakwater`` and help for every flag.

Every case runs the real ``breakwater`` console script (or ``python -m streams``) in a subprocess;
brokers are the real embedded broker (``broker`` fixture) or tiny 127.0.0.1 TCP servers of this
module that are not Kafka. Every process and server a test starts is stopped by the test.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from streams import __version__
from streams.broker import create_topics, free_port
from streams.cli import build_parser
from streams.tail import detector_names

BIN = Path(sys.executable).with_name("breakwater")
ROOT = Path(__file__).resolve().parents[1]
#: Commands that talk to Kafka, as run by a user (simulate without --out publishes to Kafka).
KAFKA_COMMANDS = {
    "tail": ["tail", "incidents"],
    "simulate": ["simulate", "--sessions", "1", "--loops", "0"],
    "breaker release": ["breaker", "release", "session:s1", "--reason", "test"],
    "worker": ["worker"],
}
#: "within a few seconds": the check allows 3 s per address, plus interpreter start-up
FAST_S = 12.0


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BREAKWATER_")}
    env.update(NO_COLOR="1", BREAKWATER_DATA_DIR=str(tmp_path / "data"), BREAKWATER_METRICS_PORT="0")
    env.update(extra)
    return env


def run(args: list[str], env: dict[str, str], *, timeout: float = 60, shell: bool = False,
        cwd: Path | None = None) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run ``breakwater ARGS`` (or a shell line); its process group is killed if it outlives ``timeout``."""
    argv = ["bash", "-c", args[0]] if shell else [str(BIN), *args]
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, env=env, cwd=cwd or ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    return subprocess.CompletedProcess(argv, proc.returncode, out, err), time.monotonic() - t0


def assert_one_line_error(r: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr[-3000:]
    line = lines[0]
    assert line.startswith("breakwater: "), line
    for n in needles:
        assert n in line, (n, line)
    return line


# ------------------------------------------------------------------------ not-Kafka servers


class FakeServer:
    """A 127.0.0.1 TCP server that is not Kafka: ``silent`` accepts and never answers, ``garbage``
    answers every connection with an HTTP error. Stopped (socket closed, thread joined) by the test."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.accepted = 0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            self.conns.append(conn)
            if self.mode == "garbage":
                try:
                    conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                except OSError:
                    pass

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(5)
        self.sock.close()
        for c in self.conns:
            c.close()


@pytest.fixture
def fake_server(request) -> Iterator[FakeServer]:
    server = FakeServer(request.param)
    try:
        yield server
    finally:
        server.stop()


# ------------------------------------------------------------------------------ the broker


@pytest.mark.parametrize("command", list(KAFKA_COMMANDS))
def test_closed_port_is_one_line_naming_the_broker_setting(command, tmp_path):
    url = f"kafka://127.0.0.1:{free_port()}"
    r, took = run(KAFKA_COMMANDS[command], _env(tmp_path, BREAKWATER_BROKER=url))
    assert_one_line_error(r, f"BREAKWATER_BROKER={url}", "connection refused")
    assert took < FAST_S, took


@pytest.mark.parametrize("fake_server", ["garbage"], indirect=True)
@pytest.mark.parametrize("command", list(KAFKA_COMMANDS))
def test_a_port_that_answers_something_else_is_not_kafka(command, fake_server, tmp_path):
    url = f"kafka://127.0.0.1:{fake_server.port}"
    r, took = run(KAFKA_COMMANDS[command], _env(tmp_path, BREAKWATER_BROKER=url))
    assert_one_line_error(r, f"BREAKWATER_BROKER={url}", "not with the Kafka protocol")
    assert took < FAST_S, took
    assert fake_server.accepted >= 1


@pytest.mark.parametrize("fake_server", ["silent"], indirect=True)
@pytest.mark.parametrize("command", ["tail", "worker"])
def test_a_silent_port_is_reported_within_seconds(command, fake_server, tmp_path):
    url = f"kafka://127.0.0.1:{fake_server.port}"
    r, took = run(KAFKA_COMMANDS[command], _env(tmp_path, BREAKWATER_BROKER=url))
    assert_one_line_error(r, f"BREAKWATER_BROKER={url}", "no Kafka reply within")
    assert took < FAST_S, took


def test_the_broker_flag_is_named_when_it_was_the_source(tmp_path):
    url = f"kafka://127.0.0.1:{free_port()}"
    r, _ = run(["tail", "breaker", "--broker", url], _env(tmp_path))
    assert_one_line_error(r, f"--broker={url}")


def test_debug_shows_the_traceback(tmp_path):
    url = f"kafka://127.0.0.1:{free_port()}"
    for args in (["--debug", "tail", "incidents"], ["tail", "incidents", "--debug"]):
        r, _ = run(args, _env(tmp_path, BREAKWATER_BROKER=url))
        assert r.returncode == 2
        assert "Traceback (most recent call last)" in r.stderr and "UserError" in r.stderr, r.stderr
        assert r.stderr.rstrip().splitlines()[-1].startswith(f"breakwater: cannot reach Kafka at BREAKWATER_BROKER={url}")


@pytest.mark.broker
def test_a_running_broker_passes_the_check(broker, tmp_path):
    """The check must not get in the way of a real broker (Tansu answers ApiVersions)."""
    r, _ = run(["tail", "incidents"], _env(tmp_path, BREAKWATER_BROKER=broker.url,
                                           BREAKWATER_TOPIC_INCIDENTS=f"none-{uuid.uuid4().hex[:8]}"))
    assert r.returncode == 0, r.stderr
    assert "does not exist" in r.stderr and "Traceback" not in r.stderr


# ------------------------------------------------------------------------- bad env values


@pytest.mark.parametrize(("env", "needles"), [
    ({"BREAKWATER_PARTITIONS": "abc"}, ["BREAKWATER_PARTITIONS", "'abc'"]),
    ({"BREAKWATER_BATCH_WITHIN_S": "soon"}, ["BREAKWATER_BATCH_WITHIN_S", "'soon'"]),
    ({"BREAKWATER_LOG_LEVEL": "loud"}, ["BREAKWATER_LOG_LEVEL", "'loud'"]),
    ({"BREAKWATER_BROKER": "localhost"}, ["BREAKWATER_BROKER", "'localhost'"]),
])
def test_config_validates_the_environment(env, needles, tmp_path):
    r, _ = run(["config"], _env(tmp_path, **env))
    assert_one_line_error(r, "configuration error", *needles)
    assert r.stdout == ""


def test_config_prints_the_reference_when_the_environment_is_valid(tmp_path):
    r, _ = run(["config"], _env(tmp_path, BREAKWATER_PARTITIONS="8"))
    assert r.returncode == 0, r.stderr
    assert "`BREAKWATER_PARTITIONS`" in r.stdout


def test_bad_env_value_stops_kafka_commands_before_any_connection(tmp_path):
    r, took = run(["tail", "incidents"], _env(tmp_path, BREAKWATER_PARTITIONS="abc"))
    assert_one_line_error(r, "BREAKWATER_PARTITIONS", "'abc'")


def test_a_secret_value_is_never_echoed(tmp_path):
    r, _ = run(["config"], _env(tmp_path, BREAKWATER_SECURITY_PROTOCOL="SASL_SSL", BREAKWATER_SASL_MECHANISM="PLAIN",
                                BREAKWATER_SASL_USERNAME="u", BREAKWATER_SASL_PASSWORD="hunter2-secret",
                                BREAKWATER_PARTITIONS="x"))
    assert r.returncode == 2 and "hunter2-secret" not in r.stderr + r.stdout


# ---------------------------------------------------------------------------- tail's flags


def test_unknown_detector_lists_the_valid_ones(tmp_path):
    r, _ = run(["tail", "incidents", "--detector", "no_such_detector"], _env(tmp_path))
    line = assert_one_line_error(r, "--detector", "'no_such_detector'")
    assert all(d in line for d in detector_names()) and len(detector_names()) == 5


@pytest.mark.parametrize("since", ["garbage", "10x", "-5m", "2026-13-45T00:00:00Z", "5 minutes"])
def test_since_garbage_is_a_clear_error(since, tmp_path):
    r, _ = run(["tail", "incidents", f"--since={since}"], _env(tmp_path))
    assert_one_line_error(r, "--since", "30s, 10m, 2h, 1d", "RFC 3339")


@pytest.mark.broker
def test_since_takes_relative_durations(broker, tmp_path):
    from tests.test_tail_live import incident, send

    topic = f"incidents-{uuid.uuid4().hex[:8]}"
    asyncio.run(create_topics(broker.bootstrap, [(topic, 1, {})]))
    now_ms = int(time.time() * 1000)
    asyncio.run(send(broker.bootstrap, topic, [
        (b"inc-1", incident(1), now_ms - 3 * 86_400_000),  # 3 days ago
        (b"inc-2", incident(2), now_ms - 3 * 3_600_000),  # 3 hours ago
        (b"inc-3", incident(3), now_ms - 5 * 60_000),  # 5 minutes ago
    ]))
    env = _env(tmp_path, BREAKWATER_BROKER=broker.url, BREAKWATER_TOPIC_INCIDENTS=topic)
    want = {"10m": ["session:s3"], "2h30m": ["session:s3"], "4h": ["session:s2", "session:s3"],
            "4d": ["session:s1", "session:s2", "session:s3"]}
    procs = {}
    try:  # side by side: each tail waits for 2 quiet seconds before it exits
        for since in want:
            procs[since] = subprocess.Popen([str(BIN), "tail", "incidents", "--since", since], env=env,
                                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                            start_new_session=True)
        seen = {}
        for since, proc in procs.items():
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err
            seen[since] = [ln.split()[3] for ln in out.splitlines()]
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
    assert seen == want


@pytest.mark.broker
def test_tail_into_head_exits_cleanly(broker, tmp_path):
    """`breakwater tail breaker --json | head -1`: head leaves after one line, tail must not trace back."""
    from streams.gateway import command_json

    topic = f"breaker-{uuid.uuid4().hex[:8]}"
    asyncio.run(create_topics(broker.bootstrap, [(topic, 1, {})]))
    now_ms = int(time.time() * 1000)
    pad = "x" * 300  # ~0.6 MB in all: far more than a pipe buffer, so tail is still writing when head leaves
    asyncio.run(_produce(broker.bootstrap, topic, [
        (f"session:s{i}".encode(), command_json("halt", "session", f"s{i}", reason=f"no_progress_loop {pad}"))
        for i in range(1500)], now_ms))
    env = _env(tmp_path, BREAKWATER_BROKER=broker.url, BREAKWATER_TOPIC_BREAKER=topic,
               PATH=f"{BIN.parent}{os.pathsep}{os.environ.get('PATH', '')}")
    r, _ = run(["set -o pipefail; breakwater tail breaker --json | head -1"], env, shell=True, timeout=90)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr and "Exception ignored" not in r.stderr, \
        r.stderr[-3000:]
    (line,) = r.stdout.splitlines()
    assert orjson.loads(line)["action"] == "halt"


async def _produce(bootstrap: str, topic: str, records: list[tuple[bytes, bytes]], timestamp_ms: int) -> None:
    from aiokafka import AIOKafkaProducer

    p = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await p.start()
    try:
        for key, value in records:
            await p.send(topic, value, key=key, timestamp_ms=timestamp_ms)
        await p.flush()
    finally:
        await p.stop()


# ----------------------------------------------------------------------- version and help


def test_version(tmp_path):
    r, _ = run(["--version"], _env(tmp_path))
    assert r.returncode == 0 and r.stdout.strip() == f"breakwater {__version__}"


@pytest.mark.parametrize("args", [[], ["breaker"]])
def test_a_command_without_its_subcommand_prints_help(args, tmp_path):
    r, _ = run(args, _env(tmp_path))
    assert r.returncode in (0, 2)
    assert "Traceback" not in r.stderr and "error:" not in r.stderr, r.stderr
    assert r.stdout.startswith(f"usage: breakwater {' '.join(args)}".rstrip()), r.stdout
    assert "show this help message" in r.stdout


def _all_parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...],
                                                                                                  argparse.ArgumentParser]]:
    yield path, parser
    for action in parser._actions:  # noqa: SLF001
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            for name, sub in action.choices.items():
                yield from _all_parsers(sub, (*path, name))


def test_every_flag_and_argument_has_help():
    missing = []
    for path, parser in _all_parsers(build_parser()):
        for action in parser._actions:  # noqa: SLF001
            if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
                missing += [f"{' '.join((*path, c.dest))}" for c in action._choices_actions if not c.help]  # noqa: SLF001
            elif not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{' '.join(path) or 'breakwater'} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, f"flags without help: {missing}"


def test_every_command_help_runs(tmp_path):
    paths = [p for p, _ in _all_parsers(build_parser())]
    for path in paths:
        r, _ = run([*path, "--help"], _env(tmp_path))
        assert r.returncode == 0 and r.stdout.startswith("usage: breakwater"), (path, r.stderr)
        assert "--debug" in r.stdout, path
