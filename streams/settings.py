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

from pathlib import Path
from typing import Literal

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
        "PLAINTEXT", description="Kafka security protocol for every client."
    )
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        None, description="SASL mechanism (required with SASL_* protocols)."
    )
    sasl_username: str | None = Field(None, description="SASL user name.")
    sasl_password: SecretStr | None = Field(None, description="SASL password (never logged).")
    ssl_cafile: Path | None = Field(None, description="CA bundle for SSL / SASL_SSL.")
    ssl_certfile: Path | None = Field(None, description="Client certificate for mutual TLS.")
    ssl_keyfile: Path | None = Field(None, description="Client key for mutual TLS.")

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
    commit_interval_s: float = Field(1.0, gt=0, description="Offset commit interval (s).")
    group_session_timeout_s: float = Field(
        6.0, gt=0, description="Consumer group session timeout (s); short suits the embedded broker."
    )
    group_heartbeat_s: float = Field(0.5, gt=0, description="Consumer group heartbeat interval (s).")
    group_rebalance_timeout_s: float = Field(6.0, gt=0, description="Consumer group rebalance timeout (s).")
    wall_tick_s: float = Field(
        1.0, gt=0, description="Live mode: how often timers also advance on wall clock (s)."
    )
    max_message_bytes: int = Field(1_048_576, ge=1024, description="Larger input messages go to the DLQ.")
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

    @model_validator(mode="after")
    def _check_security(self) -> Settings:
        if self.security_protocol.startswith("SASL"):
            if not self.sasl_mechanism:
                raise ValueError("sasl_mechanism: required when security_protocol is SASL_*")
            if not self.sasl_username or self.sasl_password is None:
                raise ValueError("sasl_username/sasl_password: required when security_protocol is SASL_*")
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            p = getattr(self, name)
            if p is not None and not p.exists():
                raise ValueError(f"{name}: file {p} does not exist")
        return self

    @property
    def bootstrap_servers(self) -> str:
        return ",".join(p.strip().removeprefix("kafka://") for p in self.broker.split(","))

    @property
    def repartition_topic(self) -> str:
        return f"{self.app_id}.spans-by-session"

    def kafka_client_kwargs(self) -> dict[str, object]:
        """Security options for every aiokafka client (producer, consumer, admin)."""
        kw: dict[str, object] = {"bootstrap_servers": self.bootstrap_servers}
        if self.security_protocol != "PLAINTEXT":
            kw["security_protocol"] = self.security_protocol
        if self.security_protocol in ("SSL", "SASL_SSL"):
            from aiokafka.helpers import create_ssl_context

            kw["ssl_context"] = create_ssl_context(
                cafile=str(self.ssl_cafile) if self.ssl_cafile else None,
                certfile=str(self.ssl_certfile) if self.ssl_certfile else None,
                keyfile=str(self.ssl_keyfile) if self.ssl_keyfile else None,
            )
        if self.security_protocol.startswith("SASL"):
            kw["sasl_mechanism"] = self.sasl_mechanism
            kw["sasl_plain_username"] = self.sasl_username
            kw["sasl_plain_password"] = self.sasl_password.get_secret_value() if self.sasl_password else None
        return kw


def config_reference() -> str:
    """Markdown table of every setting, its env var, default and meaning (for the README)."""
    rows = ["| env var | default | meaning |", "|---|---|---|"]
    for name, f in Settings.model_fields.items():
        default = f.default if f.default is not None else ""
        rows.append(f"| `BREAKWATER_{name.upper()}` | `{default}` | {f.description} |")
    return "\n".join(rows)
