"""Every knob of Breakwater, read once from the environment (``BREAKWATER_*``).

One frozen pydantic-settings object; every field is documented, so the README's configuration
reference is generated from it (``breakwater config``).

>>> s = Settings(broker="kafka://127.0.0.1:19092")
>>> s.bootstrap_servers
'127.0.0.1:19092'
>>> s.topic_breaker
'agent.breaker'
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BREAKWATER_", frozen=True, extra="ignore")

    # --- broker
    broker: str = Field(
        "kafka://127.0.0.1:9092",
        description="Kafka bootstrap URL(s), comma separated, `kafka://host:port`.",
    )
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT",
        description="Kafka security protocol of every client (worker, gateway, exporter, tail, simulate, admin).",
    )
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        None, description="SASL mechanism: `PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512` (required with SASL_*)."
    )
    sasl_username: str | None = Field(None, description="SASL user name (required with SASL_*).")
    sasl_password: SecretStr | None = Field(
        None, description="SASL password (required with SASL_*; never logged or printed)."
    )
    ssl_cafile: Path | None = Field(
        None, description="CA bundle (PEM) that signs the brokers' certificates; system CAs when unset (SSL / SASL_SSL)."
    )
    ssl_certfile: Path | None = Field(
        None, description="Client certificate (PEM) for mutual TLS; needs `BREAKWATER_SSL_KEYFILE`."
    )
    ssl_keyfile: Path | None = Field(None, description="Client private key (PEM) for mutual TLS.")

    # --- topics
    topic_spans: str = Field("agent.spans", description="Input: flat JSON spans.")
    topic_otlp: str = Field("otlp_spans", description="Input: OTLP requests (Collector kafka exporter).")
    topic_incidents: str = Field("agent.incidents", description="Output: incidents.")
    topic_breaker: str = Field("agent.breaker", description="Output: breaker commands (compacted).")
    topic_dlq: str = Field("agent.spans.dlq", description="Output: rejected input with reason headers.")
    partitions: int = Field(4, ge=1, description="Partitions of topics Breakwater creates.")
    replication_factor: int = Field(1, ge=1, description="Replication of topics Breakwater creates.")

    # --- worker
    app_id: str = Field("breakwater", description="Consumer group / faust app id; prefixes internal topics.")
    data_dir: Path = Field(Path(".breakwater/data"), description="RocksDB state directory of the worker.")
    policy_file: Path | None = Field(None, description="Policy TOML (defaults apply when unset).")
    batch_max: int = Field(2000, ge=1, description="Max Kafka messages per processing batch.")
    batch_within_s: float = Field(0.05, gt=0, description="Max wait to fill a processing batch (s).")
    stream_buffer_max: int = Field(
        256, ge=16,
        description="Messages a worker prefetches per stream before it pauses fetching: a small buffer keeps "
        "latency low under overload, which then shows as consumer lag.")
    commit_interval_s: float = Field(1.0, gt=0, description="Offset commit interval (s).")
    processing_guarantee: Literal["at_least_once", "exactly_once"] = Field(
        "at_least_once",
        description="Worker processing guarantee: `at_least_once` (deterministic ids, consumers de-duplicate "
        "by key) or `exactly_once` (Kafka transactions; needs a broker with transactions, not the embedded one).")
    recovery_consistency_check: bool = Field(
        False,
        description="Check on start that each table's stored offset is not past its changelog's end (faust); "
        "off by default because the embedded broker under-reports a changelog's end.")
    group_session_timeout_s: float = Field(
        6.0, gt=0, description="Consumer group session timeout (s); short suits the embedded broker."
    )
    group_heartbeat_s: float = Field(0.5, gt=0, description="Consumer group heartbeat interval (s).")
    group_rebalance_timeout_s: float = Field(6.0, gt=0, description="Consumer group rebalance timeout (s).")
    wall_tick_s: float = Field(
        1.0, gt=0, description="Live mode: how often timers also advance on wall clock (s)."
    )
    max_message_bytes: int = Field(1_048_576, ge=1024, description="Larger input messages go to the DLQ.")
    max_state_bytes: int = Field(
        500_000, ge=1024, le=900_000,
        description="A per-key state larger than this (serialized) is reset, counted, and never written: "
        "the changelog record stays under the 1,000,000-byte record budget.")
    state_memory_mb: int = Field(
        8, ge=2,
        description="RocksDB memory per stage table partition (MiB): half write buffers, half block "
        "cache (faust's defaults allow ~2.7 GiB each).")
    max_keys_per_partition: int = Field(
        100_000, ge=0,
        description="Live state cap: keys (sessions, traces, workflows, routes/tenants) one stage tracks per "
        "partition; past it the least recently seen key is evicted early (counted in "
        "breakwater_state_evictions_total). 0 = no cap (TTL only).",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Worker log level.")
    metrics_port: int = Field(
        9464, ge=0, le=65535,
        description="Port of the worker's own HTTP server: /metrics (Prometheus), /healthz, /readyz; 0 = off.",
    )
    metrics_host: str = Field(
        "127.0.0.1", description="Address that server binds (0.0.0.0 in containers, so probes and Prometheus reach it)."
    )
    lag_sample_interval_s: float = Field(
        5.0, gt=0, description="How often consumer lag per assigned partition is sampled (s)."
    )
    health_stall_s: float = Field(
        30.0, gt=0, description="/healthz fails once the worker's event loop has not run for this long (s)."
    )

    @field_validator("broker")
    @classmethod
    def _check_broker(cls, v: str) -> str:
        for part in v.split(","):
            hostport = part.strip().removeprefix("kafka://")
            if ":" not in hostport or not hostport.rsplit(":", 1)[1].isdigit():
                raise ValueError(f"broker: expected kafka://host:port, got {part.strip()!r}")
        return v

    @field_validator("sasl_mechanism", "sasl_username", "sasl_password", "ssl_cafile", "ssl_certfile",
                     "ssl_keyfile", mode="before")
    @classmethod
    def _empty_is_unset(cls, v: object) -> object:
        return None if isinstance(v, str) and not v.strip() else v  # `FOO=` in an env file means unset

    @field_validator("ssl_cafile", "ssl_certfile", "ssl_keyfile")
    @classmethod
    def _check_file(cls, v: Path | None) -> Path | None:
        if v is not None and not v.is_file():
            raise ValueError(f"file {str(v)!r} does not exist or is not a file")
        return v

    @model_validator(mode="after")
    def _check_security(self) -> Settings:
        """Half-configured security is an error that names the env vars to fix, never a silent downgrade."""
        proto = self.security_protocol
        is_sasl, is_ssl = proto.startswith("SASL"), proto in ("SSL", "SASL_SSL")
        sasl_set = [env for env, v in (("BREAKWATER_SASL_MECHANISM", self.sasl_mechanism),
                                       ("BREAKWATER_SASL_USERNAME", self.sasl_username),
                                       ("BREAKWATER_SASL_PASSWORD", self.sasl_password)) if v is not None]
        ssl_set = [env for env, v in (("BREAKWATER_SSL_CAFILE", self.ssl_cafile),
                                      ("BREAKWATER_SSL_CERTFILE", self.ssl_certfile),
                                      ("BREAKWATER_SSL_KEYFILE", self.ssl_keyfile)) if v is not None]
        if is_sasl:
            if not self.sasl_mechanism:
                raise ValueError(f"BREAKWATER_SASL_MECHANISM is required when BREAKWATER_SECURITY_PROTOCOL={proto} "
                                 "(PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512)")
            missing = [env for env, v in (("BREAKWATER_SASL_USERNAME", self.sasl_username),
                                          ("BREAKWATER_SASL_PASSWORD", self.sasl_password)) if not v]
            if missing:
                raise ValueError(f"{' and '.join(missing)} required when BREAKWATER_SECURITY_PROTOCOL={proto}")
        elif sasl_set:
            raise ValueError(f"{', '.join(sasl_set)} set, but BREAKWATER_SECURITY_PROTOCOL={proto} does not use SASL "
                             "(set it to SASL_SSL or SASL_PLAINTEXT)")
        if ssl_set and not is_ssl:
            raise ValueError(f"{', '.join(ssl_set)} set, but BREAKWATER_SECURITY_PROTOCOL={proto} does not use TLS "
                             "(set it to SSL or SASL_SSL)")
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            have, need = (("BREAKWATER_SSL_CERTFILE", "BREAKWATER_SSL_KEYFILE") if self.ssl_keyfile is None
                          else ("BREAKWATER_SSL_KEYFILE", "BREAKWATER_SSL_CERTFILE"))
            raise ValueError(f"{need} is required with {have}: mutual TLS needs both the client certificate "
                             "and its key (the same path for a combined PEM file)")
        if is_ssl:
            self.ssl_context()  # unreadable CA / certificate / key: fail now, naming the env vars
        return self

    @property
    def bootstrap_servers(self) -> str:
        return ",".join(p.strip().removeprefix("kafka://") for p in self.broker.split(","))

    @property
    def repartition_topic(self) -> str:
        return f"{self.app_id}.spans-by-session"

    def kafka_client_kwargs(self, **extra: object) -> dict[str, object]:
        """Connection and security options for every aiokafka client (producer, consumer, admin).

        The one place they are built: every Kafka client of Breakwater is constructed from this
        (``extra`` adds client-specific options such as ``client_id`` or ``acks``); the faust app
        gets the same options through :meth:`faust_credentials`.

        >>> Settings(broker="kafka://127.0.0.1:19092").kafka_client_kwargs(client_id="x")
        {'bootstrap_servers': '127.0.0.1:19092', 'client_id': 'x'}
        """
        kw: dict[str, object] = {"bootstrap_servers": self.bootstrap_servers}
        if self.security_protocol != "PLAINTEXT":
            kw["security_protocol"] = self.security_protocol
        if self.security_protocol in ("SSL", "SASL_SSL"):
            kw["ssl_context"] = self.ssl_context()
        if self.security_protocol.startswith("SASL"):
            kw["sasl_mechanism"] = self.sasl_mechanism
            kw["sasl_plain_username"] = self.sasl_username
            kw["sasl_plain_password"] = self.sasl_password.get_secret_value() if self.sasl_password else None
        kw.update(extra)
        return kw

    def ssl_context(self) -> ssl.SSLContext:
        """A verifying TLS context: the CA bundle (or the system CAs) and the client cert/key if set."""
        from aiokafka.helpers import create_ssl_context

        try:
            return create_ssl_context(
                cafile=str(self.ssl_cafile) if self.ssl_cafile else None,
                certfile=str(self.ssl_certfile) if self.ssl_certfile else None,
                keyfile=str(self.ssl_keyfile) if self.ssl_keyfile else None,
            )
        except (ssl.SSLError, OSError) as exc:
            files = ", ".join(f"{env}={p}" for env, p in (("BREAKWATER_SSL_CAFILE", self.ssl_cafile),
                                                           ("BREAKWATER_SSL_CERTFILE", self.ssl_certfile),
                                                           ("BREAKWATER_SSL_KEYFILE", self.ssl_keyfile)) if p)
            raise ValueError(f"TLS files unusable ({files or 'system CAs'}): {exc}") from exc

    def faust_credentials(self) -> Any:
        """The same security options as :meth:`kafka_client_kwargs`, as faust broker credentials."""
        if self.security_protocol == "PLAINTEXT":
            return None
        import faust

        kw = self.kafka_client_kwargs()
        if self.security_protocol.startswith("SASL"):
            return faust.SASLCredentials(
                username=self.sasl_username,
                password=self.sasl_password.get_secret_value() if self.sasl_password else None,
                mechanism=self.sasl_mechanism,
                ssl_context=kw.get("ssl_context"),
            )
        return faust.SSLCredentials(kw["ssl_context"])


def kafka_client_kwargs(source: Settings | str, **extra: object) -> dict[str, object]:
    """Client options from a :class:`Settings` (with its security options) or a bare bootstrap string
    (``host:port`` or ``kafka://host:port``, comma separated: PLAINTEXT, for tests and local brokers).

    >>> kafka_client_kwargs("kafka://127.0.0.1:1, kafka://127.0.0.1:2", acks=1)
    {'bootstrap_servers': '127.0.0.1:1,127.0.0.1:2', 'acks': 1}
    """
    if isinstance(source, str):
        kw: dict[str, object] = {
            "bootstrap_servers": ",".join(p.strip().removeprefix("kafka://") for p in source.split(","))
        }
        kw.update(extra)
        return kw
    return source.kafka_client_kwargs(**extra)


def config_reference() -> str:
    """Markdown table of every setting, its env var, default and meaning (for the README)."""
    rows = ["| env var | default | meaning |", "|---|---|---|"]
    for name, f in Settings.model_fields.items():
        default = f.default if f.default is not None else ""
        rows.append(f"| `BREAKWATER_{name.upper()}` | `{default}` | {f.description} |")
    return "\n".join(rows)
