"""Errors a person can act on: one line naming the setting and its value, exit code 2.

The CLI raises :class:`UserError` for anything the user can fix (a bad env value, an unreachable
broker, a bad flag value); ``breakwater`` prints it as one line on stderr and exits 2, with the
traceback only under ``--debug``.

Before a command talks to Kafka it calls :func:`check_broker`: a raw Kafka ``ApiVersions``
request (the one request a broker answers before authentication) to every bootstrap address,
over TLS when the security protocol uses it, bounded by a few seconds. A closed port, an unknown
host, a port that accepts TCP but stays silent or answers something other than Kafka all become
one line naming ``BREAKWATER_BROKER`` (or ``--broker``) and its value, instead of a 25-line
``KafkaConnectionError`` traceback or a 40 s silence.

>>> from streams.broker import free_port
>>> from streams.settings import Settings
>>> port = free_port()
>>> check_broker(Settings(broker=f"kafka://127.0.0.1:{port}"), timeout_s=1)  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
streams.errors.UserError: cannot reach Kafka at BREAKWATER_BROKER=kafka://127.0.0.1:...: connection refused ...
"""

from __future__ import annotations

import socket
import ssl
import struct
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from streams.settings import Settings

#: Seconds a broker check may take per bootstrap address (connect + TLS + one request).
PROBE_TIMEOUT_S = 3.0

_API_VERSIONS = 18
_CORRELATION_ID = 0x0B7EA8


class UserError(Exception):
    """An error the user can fix; printed as ``breakwater: <message>`` and exit code 2."""


class ProbeError(OSError):
    """One bootstrap address did not answer as Kafka; ``str()`` says how."""


def broker_setting(source: str | None = None) -> str:
    """The name to show for the broker setting: ``--broker`` when given on the command line."""
    return source or "BREAKWATER_BROKER"


def _read_exact(sock: socket.socket, n: int, deadline: float) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        sock.settimeout(left)
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ProbeError("it closed the connection without a Kafka reply")
        buf += chunk
    return bytes(buf)


def probe(host: str, port: int, *, timeout_s: float = PROBE_TIMEOUT_S,
          ssl_context: ssl.SSLContext | None = None) -> int:
    """Send Kafka ``ApiVersions`` v0 to ``host:port``; return the number of APIs the broker lists.

    Raises :class:`ProbeError` with a reason a person can read.

    >>> from streams.broker import free_port
    >>> probe("127.0.0.1", free_port(), timeout_s=0.5)
    Traceback (most recent call last):
    ...
    streams.errors.ProbeError: connection refused
    """
    deadline = time.monotonic() + timeout_s
    client_id = b"breakwater-check"
    body = struct.pack(">hhih", _API_VERSIONS, 0, _CORRELATION_ID, len(client_id)) + client_id
    try:
        sock = socket.create_connection((host, port), timeout=timeout_s)
    except ConnectionRefusedError:
        raise ProbeError(f"connection refused") from None
    except socket.gaierror as exc:
        raise ProbeError(f"unknown host {host!r} ({exc.strerror})") from None
    except TimeoutError:
        raise ProbeError(f"no TCP connection within {timeout_s:g} s") from None
    except OSError as exc:
        raise ProbeError(f"cannot connect: {exc.strerror or exc}") from None
    try:
        if ssl_context is not None:
            try:
                sock.settimeout(max(0.1, deadline - time.monotonic()))
                sock = ssl_context.wrap_socket(sock, server_hostname=host)
            except TimeoutError:
                raise ProbeError(f"no TLS handshake within {timeout_s:g} s") from None
            except (ssl.SSLError, OSError) as exc:
                raise ProbeError(f"TLS handshake failed: {exc}") from None
        try:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            sock.sendall(struct.pack(">i", len(body)) + body)
            (size,) = struct.unpack(">i", _read_exact(sock, 4, deadline))
            if not 6 <= size <= 1024 * 1024:
                raise ProbeError("it answered, but not with the Kafka protocol")
            data = _read_exact(sock, size, deadline)
        except TimeoutError:
            raise ProbeError(f"it accepts connections but sent no Kafka reply within {timeout_s:g} s") from None
        except ProbeError:
            raise
        except OSError as exc:
            raise ProbeError(f"connection failed during the Kafka handshake: {exc.strerror or exc}") from None
    finally:
        sock.close()
    cid, error_code = struct.unpack_from(">ih", data, 0)
    if cid != _CORRELATION_ID:
        raise ProbeError("it answered, but not with the Kafka protocol")
    if error_code not in (0, 35):  # 35 = UNSUPPORTED_VERSION, still a Kafka broker
        raise ProbeError(f"the broker answered with Kafka error code {error_code}")
    (n,) = struct.unpack_from(">i", data, 6) if len(data) >= 10 else (0,)
    return max(0, n)


def _addresses(bootstrap_servers: str) -> list[tuple[str, int]]:
    out = []
    for part in bootstrap_servers.split(","):
        host, _, port = part.strip().rpartition(":")
        out.append((host.strip("[]") or "127.0.0.1", int(port)))
    return out


def check_broker(settings: Settings, *, source: str | None = None, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Raise :class:`UserError` unless at least one bootstrap address answers as Kafka in ``timeout_s``."""
    ctx = settings.ssl_context() if settings.security_protocol in ("SSL", "SASL_SSL") else None
    addresses = _addresses(settings.bootstrap_servers)
    reasons = []
    for host, port in addresses:
        try:
            probe(host, port, timeout_s=timeout_s, ssl_context=ctx)
            return
        except ProbeError as exc:
            reasons.append(f"{host}:{port}: {exc}" if len(addresses) > 1 else str(exc))
    name = broker_setting(source)
    if ctx is not None and any("TLS" in r for r in reasons):
        hint = (f"is that a TLS listener (BREAKWATER_SECURITY_PROTOCOL={settings.security_protocol})? "
                "check BREAKWATER_SSL_CAFILE, BREAKWATER_SSL_CERTFILE, BREAKWATER_SSL_KEYFILE")
    else:
        hint = f"is a Kafka broker running there? set {name} to its kafka://host:port"
    raise UserError(f"cannot reach Kafka at {name}={settings.broker}: {'; '.join(reasons)} - {hint}")


def kafka_failure(exc: BaseException, settings: Settings | None, source: str | None = None) -> UserError:
    """A Kafka client error (after the check passed) as one line naming the broker setting.

    >>> from aiokafka.errors import KafkaTimeoutError
    >>> from streams.settings import Settings
    >>> print(kafka_failure(KafkaTimeoutError("no metadata\\nmore"), Settings(broker="kafka://h:1")))
    Kafka error at BREAKWATER_BROKER=kafka://h:1: KafkaTimeoutError: no metadata
    """
    name = type(exc).__name__
    detail = str(exc).strip().splitlines()[0].removeprefix(f"{name}: ").removeprefix(name) if str(exc).strip() else ""
    where = f" at {broker_setting(source)}={settings.broker}" if settings is not None else ""
    return UserError(f"Kafka error{where}: {name}{': ' + detail if detail else ''}")


def check_protobuf_backend() -> None:
    """Refuse to run the worker on protobuf's pure-python backend (README "Measured": it decodes
    OTLP protobuf about 24× slower than the upb backend, so a worker would fall behind silently).

    >>> check_protobuf_backend() is None  # this environment loads upb
    True
    """
    from google.protobuf.internal import api_implementation

    kind = api_implementation.Type()
    if kind != "upb":
        raise UserError(
            f"protobuf's {kind!r} backend is loaded; the worker needs the fast 'upb' backend "
            "(unset PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION and install protobuf>=4.21 wheels)")
