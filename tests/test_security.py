"""Security (README "Topics", §3): SASL/SSL settings reach every Kafka client, misconfiguration fails with a
message naming the env var, and raw prompts, completions, tool arguments and secrets never appear in
any output (incidents, breaker commands, logs, metrics) of replay or of a live worker.

The client tests need no broker: each module's client constructor is replaced by a recorder that
captures the keyword arguments and stops the code right there.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import ssl
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import orjson
import pytest
from pydantic import ValidationError

from streams.settings import Settings, config_reference, kafka_client_kwargs
from tests.kafka import collect, produce
from tests.otel import flat_json, otlp_proto, to_flat, traced

PASSWORD = "pw-Very-s3cret-4242"


# ----------------------------------------------------------------------------- certificates


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA certificate and a client certificate + key (PEM), made with the openssl CLI."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl CLI not available to make test certificates")
    d = tmp_path_factory.mktemp("pki")
    for name in ("ca", "client"):
        subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                        "-subj", f"/CN=breakwater-test-{name}", "-keyout", str(d / f"{name}.key"),
                        "-out", str(d / f"{name}.pem")], check=True, capture_output=True, timeout=60)
    return d


@pytest.fixture
def secure(pki) -> Settings:
    return Settings(
        broker="kafka://127.0.0.1:1", security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512",
        sasl_username="svc-breakwater", sasl_password=PASSWORD, ssl_cafile=pki / "ca.pem",
        ssl_certfile=pki / "client.pem", ssl_keyfile=pki / "client.key",
    )


def assert_secure(kw: dict, *, password: str = PASSWORD) -> None:
    assert kw["bootstrap_servers"] == "127.0.0.1:1"
    assert kw["security_protocol"] == "SASL_SSL"
    assert kw["sasl_mechanism"] == "SCRAM-SHA-512"
    assert kw["sasl_plain_username"] == "svc-breakwater"
    assert kw["sasl_plain_password"] == password
    ctx = kw["ssl_context"]
    assert isinstance(ctx, ssl.SSLContext)
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert any("breakwater-test-ca" in str(c.get("subject")) for c in ctx.get_ca_certs())


# ------------------------------------------------------------------ every client gets the options


class Captured(BaseException):  # noqa: N818 - BaseException: no ``except Exception`` retry loop swallows it
    def __init__(self, cls: str, kwargs: dict) -> None:
        super().__init__(cls)
        self.cls, self.kwargs = cls, kwargs


@pytest.fixture
def recorder(monkeypatch):
    """Replace aiokafka's producer, consumer and admin client with recorders."""
    import aiokafka
    import aiokafka.admin

    def fake(name: str):
        class Fake:
            def __init__(self, *args, **kwargs) -> None:
                raise Captured(name, kwargs)

        return Fake

    monkeypatch.setattr(aiokafka, "AIOKafkaProducer", fake("producer"))
    monkeypatch.setattr(aiokafka, "AIOKafkaConsumer", fake("consumer"))
    monkeypatch.setattr(aiokafka.admin, "AIOKafkaAdminClient", fake("admin"))

    def capture(fn, *args, **kwargs) -> Captured:
        with pytest.raises(Captured) as e:
            result = fn(*args, **kwargs)
            if asyncio.iscoroutine(result):
                asyncio.run(result)
        return e.value

    return capture


def test_worker_admin_client_ensure_topics(secure, recorder):
    from streams.app import ensure_topics

    c = recorder(ensure_topics, secure)
    assert c.cls == "admin"
    assert_secure(c.kwargs)


def test_worker_faust_app_gets_the_same_credentials(secure):
    from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

    from streams.app import create_app
    from streams.policy import Policy

    bw = create_app(secure, Policy.load(None))
    assert bw.app.conf.broker_credentials is not None
    # what faust's aiokafka driver gives its consumer, producer and admin client
    kw = {"bootstrap_servers": secure.bootstrap_servers,
          **credentials_to_aiokafka_auth(bw.app.conf.broker_credentials, bw.app.conf.ssl_context)}
    assert_secure(kw)
    assert PASSWORD not in repr(bw.app.conf.broker_credentials)


def test_manual_release_producer(secure, recorder):
    from streams.admin import manual_release_command, publish_release

    c = recorder(publish_release, secure, manual_release_command("session:s1", reason="test"))
    assert c.cls == "producer" and c.kwargs["acks"] == "all"
    assert_secure(c.kwargs)


def test_tail_consumer(secure, recorder):
    from streams.tail import tail

    c = recorder(tail, secure, "incidents")
    assert c.cls == "consumer" and c.kwargs["group_id"] is None
    assert_secure(c.kwargs)


def test_simulate_producer(secure, recorder):
    from streams.simulate import _producer

    c = recorder(_producer, secure)
    assert c.cls == "producer"
    assert_secure(c.kwargs)


def test_gateway_breaker_client_consumer(secure, recorder):
    from streams.gateway import BreakerClient

    client = BreakerClient(secure)
    c = recorder(client._consume)  # noqa: SLF001 - the one place it builds its consumer
    assert c.cls == "consumer"
    assert_secure(c.kwargs)
    assert client.topic == secure.topic_breaker


def test_exporter_producer(secure, recorder):
    from streams.exporter import KafkaSpanExporter

    exp = KafkaSpanExporter(secure, connect=False)
    try:
        c = recorder(exp._main)  # noqa: SLF001 - the one place it builds its producer
    finally:
        exp.shutdown()
    assert c.cls == "producer"
    assert_secure(c.kwargs)
    assert exp.topic == secure.topic_spans


def test_bench_live_clients(secure, recorder):
    from streams.bench import _produce, _raw_consume

    c = recorder(_produce, secure, "t", [])
    assert c.cls == "producer"
    assert_secure(c.kwargs)
    c = recorder(_raw_consume, secure, "t", 1, 1.0)
    assert c.cls == "consumer"
    assert_secure(c.kwargs)


def test_dev_builds_no_client_of_its_own_and_passes_the_environment_to_its_worker(monkeypatch, tmp_path):
    """``breakwater dev`` uses ensure_topics, simulate and tail (tested above); its worker subprocess
    inherits the environment, so BREAKWATER_SECURITY_* reach it too."""
    import streams.dev
    from streams.dev import WorkerProcess

    src = Path(streams.dev.__file__).read_text()
    assert not any(cls in src for cls in ("AIOKafkaProducer", "AIOKafkaConsumer", "AIOKafkaAdminClient"))
    monkeypatch.setenv("BREAKWATER_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("BREAKWATER_SASL_PASSWORD", PASSWORD)
    env = WorkerProcess("127.0.0.1:1", data_dir=str(tmp_path)).env()
    assert env["BREAKWATER_SECURITY_PROTOCOL"] == "SASL_SSL" and env["BREAKWATER_SASL_PASSWORD"] == PASSWORD


def test_every_client_construction_in_the_package_goes_through_the_helper():
    """Grep guard: every aiokafka client built in ``streams/`` takes its options from the helper
    (except the embedded-broker module, which only ever talks PLAINTEXT to its own local process)."""
    import re

    root = Path(__file__).resolve().parents[1] / "streams"
    for path in root.rglob("*.py"):
        if path.name == "broker.py":
            continue
        src = path.read_text()
        for m in re.finditer(r"AIOKafka(Producer|Consumer|AdminClient)\(", src):
            call = src[m.end():m.end() + 200]
            assert "kafka_client_kwargs(" in call or "self._kafka" in call, (path.name, call[:80])
        if "self._kafka" in src:
            assert "kafka_client_kwargs(source" in src, path.name


def test_plaintext_and_string_sources_carry_no_security_options():
    kw = kafka_client_kwargs(Settings(broker="kafka://127.0.0.1:1"), client_id="x")
    assert kw == {"bootstrap_servers": "127.0.0.1:1", "client_id": "x"}
    assert kafka_client_kwargs("kafka://a:1,b:2") == {"bootstrap_servers": "a:1,b:2"}
    assert Settings(broker="kafka://127.0.0.1:1").faust_credentials() is None


def test_ssl_only_and_sasl_plaintext(pki):
    kw = Settings(broker="kafka://127.0.0.1:1", security_protocol="SSL", ssl_cafile=pki / "ca.pem").kafka_client_kwargs()
    assert kw["security_protocol"] == "SSL" and isinstance(kw["ssl_context"], ssl.SSLContext)
    assert "sasl_mechanism" not in kw
    kw = Settings(broker="kafka://127.0.0.1:1", security_protocol="SASL_PLAINTEXT", sasl_mechanism="PLAIN",
                  sasl_username="u", sasl_password="p").kafka_client_kwargs()
    assert kw["security_protocol"] == "SASL_PLAINTEXT" and kw["sasl_mechanism"] == "PLAIN"
    assert "ssl_context" not in kw
    creds = Settings(broker="kafka://127.0.0.1:1", security_protocol="SSL").faust_credentials()
    assert type(creds).__name__ == "SSLCredentials"  # system CAs when no CA file is given


def test_settings_from_env_and_the_password_is_never_shown(pki, monkeypatch):
    for k, v in {"BREAKWATER_SECURITY_PROTOCOL": "SASL_SSL", "BREAKWATER_SASL_MECHANISM": "SCRAM-SHA-512",
                 "BREAKWATER_SASL_USERNAME": "svc-breakwater", "BREAKWATER_SASL_PASSWORD": PASSWORD,
                 "BREAKWATER_SSL_CAFILE": str(pki / "ca.pem"), "BREAKWATER_SSL_CERTFILE": str(pki / "client.pem"),
                 "BREAKWATER_SSL_KEYFILE": str(pki / "client.key"), "BREAKWATER_BROKER": "kafka://127.0.0.1:1"}.items():
        monkeypatch.setenv(k, v)
    s = Settings()
    assert_secure(s.kafka_client_kwargs())
    assert PASSWORD not in repr(s) and PASSWORD not in str(s) and PASSWORD not in s.model_dump_json()
    assert PASSWORD not in config_reference()


# ----------------------------------------------------------------------- configuration errors


def _error(**kw) -> str:
    with pytest.raises(ValidationError) as e:
        Settings(broker="kafka://127.0.0.1:1", **kw)
    return str(e.value)


@pytest.mark.parametrize(("kw", "must"), [
    ({"security_protocol": "SASL_SSL", "sasl_mechanism": "PLAIN"},
     "BREAKWATER_SASL_USERNAME and BREAKWATER_SASL_PASSWORD required when BREAKWATER_SECURITY_PROTOCOL=SASL_SSL"),
    ({"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN", "sasl_username": "u"},
     "BREAKWATER_SASL_PASSWORD required when BREAKWATER_SECURITY_PROTOCOL=SASL_PLAINTEXT"),
    ({"security_protocol": "SASL_SSL", "sasl_username": "u", "sasl_password": "p"},
     "BREAKWATER_SASL_MECHANISM is required when BREAKWATER_SECURITY_PROTOCOL=SASL_SSL"),
    ({"sasl_username": "u", "sasl_password": "p", "sasl_mechanism": "PLAIN"},
     "BREAKWATER_SECURITY_PROTOCOL=PLAINTEXT does not use SASL"),
    ({"security_protocol": "SSL", "sasl_username": "u"}, "BREAKWATER_SASL_USERNAME set"),
])
def test_sasl_misconfiguration_names_the_env_vars(kw, must):
    assert must in _error(**kw)


def test_empty_env_values_mean_unset(monkeypatch):
    for k in ("BREAKWATER_SASL_MECHANISM", "BREAKWATER_SASL_USERNAME", "BREAKWATER_SASL_PASSWORD",
              "BREAKWATER_SSL_CAFILE", "BREAKWATER_SSL_CERTFILE", "BREAKWATER_SSL_KEYFILE"):
        monkeypatch.setenv(k, "")
    s = Settings(broker="kafka://127.0.0.1:1")
    assert s.sasl_username is None and s.ssl_cafile is None and s.faust_credentials() is None


def test_unknown_mechanism_and_protocol_are_rejected_by_field():
    with pytest.raises(ValidationError) as e:
        Settings(broker="kafka://127.0.0.1:1", security_protocol="SASL_SSL", sasl_mechanism="GSSAPI",
                 sasl_username="u", sasl_password="p")
    assert e.value.errors()[0]["loc"] == ("sasl_mechanism",)
    assert "SCRAM-SHA-512" in str(e.value)
    with pytest.raises(ValidationError) as e:
        Settings(broker="kafka://127.0.0.1:1", security_protocol="TLS")
    assert e.value.errors()[0]["loc"] == ("security_protocol",)


def test_tls_misconfiguration_names_the_env_vars(pki, tmp_path):
    missing = tmp_path / "nope" / "ca.pem"
    err = _error(security_protocol="SSL", ssl_cafile=missing)
    assert "ssl_cafile" in err and str(missing) in err and "does not exist" in err
    assert "BREAKWATER_SSL_KEYFILE is required with BREAKWATER_SSL_CERTFILE" in _error(
        security_protocol="SSL", ssl_certfile=pki / "client.pem")
    assert "BREAKWATER_SSL_CERTFILE is required with BREAKWATER_SSL_KEYFILE" in _error(
        security_protocol="SSL", ssl_keyfile=pki / "client.key")
    assert "BREAKWATER_SSL_CAFILE set, but BREAKWATER_SECURITY_PROTOCOL=PLAINTEXT does not use TLS" in _error(
        ssl_cafile=pki / "ca.pem")
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    err = _error(security_protocol="SSL", ssl_cafile=junk)
    assert "TLS files unusable" in err and f"BREAKWATER_SSL_CAFILE={junk}" in err
    err = _error(security_protocol="SSL", ssl_certfile=pki / "client.pem", ssl_keyfile=pki / "ca.key")
    assert "BREAKWATER_SSL_CERTFILE" in err and "BREAKWATER_SSL_KEYFILE" in err  # key of another cert


@pytest.mark.parametrize(("env", "must"), [
    ({"BREAKWATER_SECURITY_PROTOCOL": "SASL_SSL", "BREAKWATER_SASL_MECHANISM": "PLAIN"},
     "BREAKWATER_SASL_USERNAME and BREAKWATER_SASL_PASSWORD required"),
    ({"BREAKWATER_SECURITY_PROTOCOL": "SASL_SSL", "BREAKWATER_SASL_MECHANISM": "KERBEROS",
      "BREAKWATER_SASL_USERNAME": "u", "BREAKWATER_SASL_PASSWORD": PASSWORD},
     "BREAKWATER_SASL_MECHANISM: Input should be 'PLAIN', 'SCRAM-SHA-256' or 'SCRAM-SHA-512'"),
    ({"BREAKWATER_SECURITY_PROTOCOL": "SSL", "BREAKWATER_SSL_CAFILE": "/nonexistent/ca.pem"},
     "BREAKWATER_SSL_CAFILE: file '/nonexistent/ca.pem' does not exist"),
])
def test_cli_reports_configuration_errors_by_env_var(env, must):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BREAKWATER_")}
    r = subprocess.run([sys.executable, "-m", "streams", "tail", "incidents"], env={**clean, **env},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert "breakwater: configuration error: " + must in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and PASSWORD not in r.stderr + r.stdout


# ------------------------------------------------------------------------------------ privacy

SECRETS = {
    "prompt": "PROMPT-tell-me-the-launch-codes-7731",
    "completion": "COMPLETION-the-codes-are-0000-7731",
    "tool_args": "ARGS-card-4111-1111-1111-1111",
    "messages": "MESSAGES-my-ssn-is-078-05-1120",
    "system": "SYSTEM-you-are-a-secret-agent-55",
    "result": "RESULT-balance-is-1234567-usd",
    "api_key": "sk-live-SECRETKEY0123456789abcdef",
    "bearer": "Bearer eyJSECRETTOKEN.abc.def",
}
# kept by ingest (not a known content key), so not required absent from internal topics
ARBITRARY = ("api_key", "bearer")


def secret_spans(session: str, tenant: str = "acme"):
    """A loop of tool calls with secret arguments, a failed unretried tool (silent success), and chat
    spans costing $3.60 within a minute, every span full of prompts, completions and credentials."""
    content = {
        "gen_ai.prompt": SECRETS["prompt"],
        "gen_ai.completion": SECRETS["completion"],
        "gen_ai.input.messages": json.dumps([{"role": "user", "parts": [{"type": "text",
                                                                        "content": SECRETS["messages"]}]}]),
        "gen_ai.output.messages": json.dumps([{"role": "assistant", "parts": [{"type": "text",
                                                                              "content": SECRETS["completion"]}]}]),
        "gen_ai.system_instructions": SECRETS["system"],
        "app.openai_api_key": SECRETS["api_key"],
        "http.request.header.authorization": SECRETS["bearer"],
    }
    tool = {"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "lookup",
            "gen_ai.tool.call.arguments": json.dumps({"card": SECRETS["tool_args"]}),
            "gen_ai.tool.call.result": SECRETS["result"], **content}
    chat = {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai", "gen_ai.request.model": "gpt-4o",
            "gen_ai.usage.input_tokens": 900, "gen_ai.usage.output_tokens": 100, "gen_ai.usage.cost": 0.6,
            **content}
    failed = {**tool, "gen_ai.tool.name": "charge_card"}
    children = ([("execute_tool lookup", tool, False)] * 3 + [("execute_tool charge_card", failed, True)]
                + [("chat gpt-4o", {**chat, "agent.state_hash": f"s{i}"}, False) for i in range(6)])
    return traced(session, children, root_attrs=content, tenant=tenant)


def assert_clean(where: str, blob: bytes | str, *, strict: bool = True) -> None:
    text = blob.decode(errors="replace") if isinstance(blob, bytes) else blob
    for name, secret in SECRETS.items():
        if not strict and name in ARBITRARY:
            continue
        assert secret not in text, f"{name} secret found in {where}"
        # the JSON-escaped form too (a prompt inside a JSON string inside JSON)
        assert json.dumps(secret)[1:-1] not in text, f"{name} secret (escaped) found in {where}"


def test_replay_outputs_carry_no_secrets(tmp_path):
    spans = secret_spans(f"priv-{uuid.uuid4().hex[:6]}")
    f = tmp_path / "in.jsonl"
    f.write_bytes(orjson.dumps(to_flat(spans[0])) + b"\n" + flat_json(spans[1:]) + b"\n")
    cmds = tmp_path / "commands.jsonl"
    r = subprocess.run([sys.executable, "-m", "streams", "replay", str(f), "--commands", str(cmds)],
                       capture_output=True, timeout=60, check=True)
    incidents = [orjson.loads(x) for x in r.stdout.splitlines()]
    assert {d["detector"] for d in incidents} >= {"no_progress_loop", "silent_success", "cost_velocity"}
    assert cmds.read_bytes().strip()
    for where, blob in (("replay stdout", r.stdout), ("replay stderr", r.stderr), ("commands", cmds.read_bytes())):
        assert_clean(where, blob)


@pytest.mark.broker
def test_live_worker_outputs_logs_and_metrics_carry_no_secrets(isolated, tmp_path):
    settings, start_worker = isolated
    policy = tmp_path / "policy.toml"
    policy.write_text("allowed_lateness_s = 1\n[detectors.silent_success]\ngrace_s = 2\n")
    w = start_worker(extra_env={"BREAKWATER_POLICY_FILE": str(policy)})
    flat_session, otlp_session = (f"priv-{k}-{uuid.uuid4().hex[:6]}" for k in ("flat", "otlp"))
    asyncio.run(produce(settings.bootstrap_servers, settings.topic_spans,
                        [(flat_session.encode(), flat_json(secret_spans(flat_session)))]))
    asyncio.run(produce(settings.bootstrap_servers, settings.topic_otlp,
                        [(None, otlp_proto(secret_spans(otlp_session, tenant="globex")))]))
    want = {(s, d) for s in (flat_session, otlp_session)
            for d in ("no_progress_loop", "silent_success", "cost_velocity")}

    def got(rs):
        return {(d["session_id"], d["detector"]) for d in (orjson.loads(m.value) for m in rs)}

    recs = asyncio.run(collect(settings.bootstrap_servers, settings.topic_incidents, lambda rs: want <= got(rs), 75))
    assert want <= got(recs), (sorted(want - got(recs)), w.log_text()[-2000:])
    time.sleep(2)
    outputs = {
        "incidents": settings.topic_incidents,
        "breaker commands": settings.topic_breaker,
    }
    for where, topic in outputs.items():
        records = asyncio.run(collect(settings.bootstrap_servers, topic, lambda rs: False, 3))
        assert records, where
        for m in records:
            assert_clean(where, (m.key or b"") + m.value + b"".join(v for _, v in (m.headers or ())))
    # the search does find the secrets where they are: in the input
    raw = b"".join(m.value for t in (settings.topic_spans, settings.topic_otlp)
                   for m in asyncio.run(collect(settings.bootstrap_servers, t, lambda rs: False, 2)))
    assert all(secret.encode() in raw for secret in SECRETS.values())
    # internal topics: re-keyed spans carry no prompt, completion or tool argument (other attributes
    # pass through ingest unchanged); detector state (changelogs) carries none of the secrets at all
    for stage in ("session", "trace", "workflow", "scope"):
        topic = f"{settings.app_id}.spans-by-{stage}"
        for m in asyncio.run(collect(settings.bootstrap_servers, topic, lambda rs: False, 2)):
            assert_clean(topic, (m.key or b"") + (m.value or b""), strict=False)
    for table in ("sessions", "traces", "workflows", "scopes"):
        topic = f"{settings.app_id}-{table}-changelog"
        for m in asyncio.run(collect(settings.bootstrap_servers, topic, lambda rs: False, 2)):
            assert_clean(topic, (m.key or b"") + (m.value or b""))
    with urllib.request.urlopen(f"http://127.0.0.1:{w.metrics_port}/metrics", timeout=10) as r:  # noqa: S310
        metrics_text = r.read()
    assert b"breakwater_incidents_total" in metrics_text
    assert_clean("metrics", metrics_text)
    assert_clean("worker stdout/stderr", w.log_text())
    # The DLQ is left out on purpose: it carries the original bytes of rejected input by contract.
