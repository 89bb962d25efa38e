"""
Probe a real TLS server the way a scanner does, for what rotations need:
does it accept our TLS 1.3 KeyUpdate, does it answer a requested one (at once
or only with its next write), does it support secure renegotiation (RFC 5746)
and does it let a client renegotiate a TLS 1.2 connection (a denial-of-service
exposure for scanners)?  With ``limits``, how many KeyUpdates it accepts in a
row and per second before it drops the connection, and from that the rotation
floor a policy should keep against it.

It works over one plain socket per connection and a pyOpenSSL connection on
memory BIOs, so every byte on the wire passes through code here and every
socket operation is bounded by a deadline.  It needs no reactor, and several
probes may run at once in threads.

This module must never raise for anything the server or the network does:
each outcome becomes a :class:`Finding`, or a per-version or per-target
status, with a documented name, grade and exit code (only bad input raises
:class:`ProbeError`).  It must never rotate keys in a way the library would
not (no insecure renegotiation, at most one requested KeyUpdate outstanding),
and every measurement stops at the first drop or at a documented maximum.
"""

from __future__ import annotations

import errno
import ipaddress
import math
import os
import select
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import urlsplit

from OpenSSL import SSL

from twisted_rekey import (
    MIN_INTERVAL_LOWEST,
    RekeyConnection,
    capabilities,
    key_update,
    renegotiate,
    renegotiate_pending,
    secure_renegotiation_support,
    total_renegotiations,
)
from twisted_rekey.exceptions import RekeyError

__all__ = [
    "EXIT_EXPOSED",
    "EXIT_INTERNAL",
    "EXIT_KEY_UPDATE_UNAVAILABLE",
    "EXIT_NO_CONNECTION",
    "EXIT_OK",
    "EXIT_REKEY_BROKE",
    "EXIT_USAGE",
    "FINDINGS",
    "LIMITS_MAX",
    "RENEGOTIATIONS_MAX",
    "REPORT_SCHEMA",
    "SCHEMA_VERSION",
    "SEVERITIES",
    "Finding",
    "ProbeError",
    "ProbeOptions",
    "ProbeReport",
    "VersionResult",
    "batch_exit_code",
    "parse_target",
    "probe",
]

#: Probed, and nothing graded ``medium`` or ``high``.  A refused client
#: renegotiation, a version not offered, a KeyUpdate answered only with the
#: server's next write: findings, not failures.
EXIT_OK = 0
#: A rekey the server must handle broke the connection (graded ``fail``): an
#: alert or a close after our TLS 1.3 KeyUpdate, data without the KeyUpdate
#: it was asked for, or a renegotiation the server took up and then failed.
EXIT_REKEY_BROKE = 1
#: Bad command line (argparse's own code).
EXIT_USAGE = 2
#: No TLS connection: name not resolved, port closed, connection or handshake
#: timed out, not TLS at all, or no handshake succeeded (a certificate that
#: failed verification included).
EXIT_NO_CONNECTION = 3
#: This build cannot send a KeyUpdate (see ``twisted-rekey info``).
EXIT_KEY_UPDATE_UNAVAILABLE = 4
#: A bug in this program: please report it.
EXIT_INTERNAL = 5
#: Probed, and a finding is graded ``medium`` or ``high``, as scanners grade
#: them: client-initiated renegotiation allowed (a denial-of-service
#: exposure), no secure renegotiation (RFC 5746).
EXIT_EXPOSED = 6

# Which code wins when several apply (one target, or the worst of many).
_EXIT_PRECEDENCE = (
    EXIT_INTERNAL,
    EXIT_USAGE,
    EXIT_NO_CONNECTION,
    EXIT_REKEY_BROKE,
    EXIT_EXPOSED,
    EXIT_KEY_UPDATE_UNAVAILABLE,
    EXIT_OK,
)

#: The version of the JSON report's layout (``schema_version``): it changes
#: when a field is removed or changes meaning; added fields and names keep it.
SCHEMA_VERSION = 2

#: Grades, as scanners use them.  ``ok``: as it should be; ``info``: a fact;
#: ``note``: worth knowing, not a fault; ``warn``: the probe could not tell;
#: ``fail``: a rekey the server must handle broke; ``low``, ``medium``,
#: ``high``: security exposures graded as sslyze and testssl.sh do.
SEVERITIES = ("ok", "info", "note", "warn", "fail", "low", "medium", "high")

#: Every finding name, and the results it can have.
FINDINGS: dict[str, tuple[str, ...]] = {
    "certificate": ("verified", "not_verified"),
    "baseline": ("echo", "answers", "silent", "closed"),
    "key_update": ("accepted", "rejected", "not_tried"),
    "key_update_requested": (
        "answered",
        "answered_on_our_write",
        "silent",
        "ignored",
        "rejected",
        "not_tried",
    ),
    "after_key_update": ("same", "different", "missing", "not_checked"),
    "secure_renegotiation": ("supported", "not_supported", "unknown"),
    "client_renegotiation": (
        "allowed",
        "limited",
        "refused",
        "ignored",
        "failed",
        "not_tried",
    ),
    "after_renegotiation": ("same", "different", "missing", "not_checked", "closed"),
    "key_updates_per_second": ("limit", "no_limit", "not_measured"),
    "key_updates_in_a_row": ("limit", "no_limit", "not_measured"),
    "rotation_floor": ("floor",),
}

#: Per-version connection outcomes (``results[].status``).
VERSION_STATUSES = (
    "connected",
    "not_offered",
    "not_tls",
    "closed",
    "timeout",
    "certificate_failed",
    "handshake_failed",
    "refused",
    "unreachable",
)
#: Per-target outcomes (``status``): ``probed`` when a handshake succeeded.
TARGET_STATUSES = ("probed", "unresolved", *VERSION_STATUSES[1:])

#: The most KeyUpdates one ``limits`` measurement sends.  Above every cap
#: known (rustls and BoringSSL drop the 33rd in a row, Go's crypto/tls
#: counts 16 "useless" records, GnuTLS the 9th within one second).
LIMITS_MAX = 40
#: The most client-initiated renegotiations tried in a row (sslyze's figure).
RENEGOTIATIONS_MAX = 10

# Seconds one measurement waits, after each KeyUpdate that no echo confirms,
# for the server to drop the connection (a loopback or LAN round trip).
_LIMITS_GRACE = 0.02
# A floor must keep this margin over a per-second cap: GnuTLS counts on
# arrival, and gaps on the wire came out up to ~17 ms shorter than the
# sender's (0.125 s against 8 per second had no margin; 0.2 s held).
_FLOOR_MARGIN = 1.6

_READ_STATE = "read server key update"
_CHUNK = 1 << 16

# The X509_V_ERR_* codes people meet when probing; anything else by number.
_VERIFY_ERRORS = {
    2: "unable to get issuer certificate",
    9: "certificate is not yet valid",
    10: "certificate has expired",
    18: "self-signed certificate",
    19: "self-signed certificate in certificate chain",
    20: "unable to get local issuer certificate",
    21: "unable to verify the first certificate",
    23: "certificate revoked",
    62: "hostname mismatch",
}

# Default ports of URL schemes that start with TLS.
_URL_PORTS = {
    "https": 443,
    "wss": 443,
    "ldaps": 636,
    "imaps": 993,
    "pop3s": 995,
    "smtps": 465,
    "ftps": 990,
}

# OpenSSL reasons that mean the server does not speak the version we asked.
_NOT_OFFERED = (
    "protocol version",
    "unsupported protocol",
    "no protocols available",
    "wrong ssl version",
    "version too low",
    "version too high",
)


class ProbeError(Exception):
    """
    Bad input that stops the probe before it starts: a CA file that does not
    exist or holds no certificate.

    :ivar exit_code: the command line's exit code for it.
    """

    def __init__(self, message: str, exit_code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class Finding:
    """
    One fact about the server.

    :ivar name: a stable machine name, one of :data:`FINDINGS`.
    :ivar result: a stable machine value, one of ``FINDINGS[name]``.
    :ivar severity: its grade, one of :data:`SEVERITIES`.
    :ivar text: one human-readable line.
    :ivar detail: machine-readable values (milliseconds, counts, the alert).
    """

    name: str
    result: str
    severity: str
    text: str
    detail: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.result not in FINDINGS.get(self.name, ()):
            raise ValueError(f"unknown finding {self.name}={self.result}")
        if self.severity not in SEVERITIES:
            raise ValueError(f"unknown severity {self.severity!r}")

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "result": self.result,
            "severity": self.severity,
            "text": self.text,
            "detail": self.detail,
        }


@dataclass
class VersionResult:
    """What one protocol version's connection(s) found."""

    requested: str
    status: str = "handshake_failed"
    protocol: str | None = None
    cipher: str | None = None
    error: str | None = None
    findings: list[Finding] = field(default_factory=list)

    @property
    def connected(self) -> bool:
        return self.status == "connected"

    def add(self, finding: Finding) -> None:
        self.findings.append(finding)

    def find(self, name: str) -> Finding | None:
        return next((f for f in self.findings if f.name == name), None)

    def as_dict(self) -> dict[str, Any]:
        return {
            "version": self.requested,
            "status": self.status,
            "protocol": self.protocol,
            "cipher": self.cipher,
            "error": self.error,
            "findings": [f.as_dict() for f in self.findings],
        }


@dataclass
class ProbeOptions:
    """The probe's inputs, as the command line collects them."""

    host: str
    port: int
    servername: str | None = None
    cafile: str | None = None
    insecure: bool = False
    versions: Sequence[str] = ("1.3", "1.2")
    timeout: float = 5.0
    #: How long to wait for an answer the server may never send (to data it
    #: does not echo, or for alerts after a key change); at most *timeout*.
    wait: float = 1.0
    payload: bytes = b"twisted-rekey probe\n"
    #: Measure the server's KeyUpdate limits (TLS 1.3; two more connections).
    limits: bool = False
    #: The target as given (``HOST:PORT`` or a URL), for the report.
    target: str | None = None


@dataclass
class ProbeReport:
    """Everything the probe found about one target, and its exit code."""

    target: str
    host: str
    port: int
    servername: str | None
    verified: bool
    key_update_available: bool
    results: list[VersionResult]
    status: str = "probed"
    error: str | None = None
    limits: bool = False

    @property
    def label(self) -> str:
        return _label(self.host, self.port)

    @property
    def findings(self) -> list[Finding]:
        return [f for r in self.results for f in r.findings]

    @property
    def worst_severity(self) -> str | None:
        found = {f.severity for f in self.findings}
        order = ("high", "medium", "low", "fail", "warn", "note", "info", "ok")
        return next((s for s in order if s in found), None)

    @property
    def exit_code(self) -> int:
        if self.status != "probed":
            return EXIT_NO_CONNECTION
        severities = {f.severity for f in self.findings}
        if "fail" in severities:
            return EXIT_REKEY_BROKE
        if severities & {"medium", "high"}:
            return EXIT_EXPOSED
        if "1.3" in [r.requested for r in self.results] and not (
            self.key_update_available
        ):
            return EXIT_KEY_UPDATE_UNAVAILABLE
        return EXIT_OK

    def as_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "target": {"input": self.target, "host": self.host, "port": self.port},
            "servername": self.servername,
            "verification": {
                "certificate": self.verified,
                "name": self.servername if self.verified else None,
            },
            "status": self.status,
            "error": self.error,
            "key_update_available": self.key_update_available,
            "limits_measured": self.limits,
            "results": [r.as_dict() for r in self.results],
            "worst_severity": self.worst_severity,
            "exit_code": self.exit_code,
        }


def batch_exit_code(codes: Sequence[int]) -> int:
    """The exit code of several probes: the one that matters most."""
    return next((c for c in _EXIT_PRECEDENCE if c in codes), EXIT_OK)


def _label(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_target(text: str) -> tuple[str, int]:
    """
    Split ``HOST:PORT``, ``[v6addr]:PORT`` or a URL such as
    ``https://host[:port]/`` (the scheme's default port when it has none).

    :raises ValueError: with a one-line explanation.
    """
    text = text.strip()
    if "://" in text:
        return _parse_url(text)
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"expected [ADDRESS]:PORT, got {text!r}")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError(f"expected HOST:PORT, got {text!r} (no port)")
        if ":" in host:
            raise ValueError(f"write an IPv6 address in brackets: [{host}]:{port_text}")
    if not host:
        raise ValueError(f"expected HOST:PORT, got {text!r} (no host)")
    return host, _port(port_text)


def _port(text: str) -> int:
    if not text.isdigit():
        raise ValueError(f"the port must be a number, got {text!r}")
    port = int(text)
    if not 0 < port < 65536:
        raise ValueError(f"the port must be between 1 and 65535, got {port}")
    return port


def _parse_url(text: str) -> tuple[str, int]:
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme not in _URL_PORTS:
        known = ", ".join(f"{s}://" for s in _URL_PORTS)
        raise ValueError(f"not a TLS URL scheme: {parts.scheme}:// (known: {known})")
    host = parts.hostname
    if not host:
        raise ValueError(f"no host in {text!r}")
    netloc = parts.netloc.rpartition("@")[2]
    port_text = netloc.rpartition("]")[2] if netloc.startswith("[") else netloc
    if ":" in port_text:
        return host, _port(port_text.rpartition(":")[2])
    return host, _URL_PORTS[scheme]


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _ssl_error_text(e: BaseException) -> str:
    """One line from a pyOpenSSL error (its args are lists of tuples)."""
    if isinstance(e, SSL.SysCallError):
        code, text = [*e.args, None, None][:2]
        if code == -1 or text == "Unexpected EOF":
            return "the server closed the connection"
        return f"{text} (errno {code})"
    if isinstance(e, SSL.ZeroReturnError):
        return "the server closed the TLS session (close_notify)"
    if isinstance(e, SSL.Error) and e.args and isinstance(e.args[0], list):
        reasons = [str(item[-1]) for item in e.args[0] if item and item[-1]]
        if reasons:
            return "; ".join(reasons)
    return str(e) or type(e).__name__


def _alert_name(message: str) -> str | None:
    """The TLS alert an OpenSSL reason names (``sslv3 alert unexpected
    message`` is ``unexpected_message``), or ``None``."""
    for reason in message.split("; "):
        head, sep, alert = reason.rpartition("alert ")
        if sep and head.strip().endswith(("sslv3", "tlsv1", "tlsv13", "tls")):
            return alert.strip().replace(" ", "_")
    if "no renegotiation" in message:
        return "no_renegotiation"
    return None


def _looks_like_tls(data: bytes) -> bool:
    # A TLS record: content type 20-24, then protocol major version 3.
    return len(data) < 2 or (20 <= data[0] <= 24 and data[1] == 3)


def _preview(data: bytes, limit: int = 40) -> str:
    text = data[:limit].decode("latin-1")
    shown = "".join(c if 32 <= ord(c) < 127 else "." for c in text)
    return repr(shown + ("..." if len(data) > limit else ""))


class _Closed(Exception):
    """The server ended the TLS connection; ``str()`` says how."""

    def __init__(self, message: str, *, alert: bool, data: bytes = b"") -> None:
        super().__init__(message)
        self.alert = alert
        #: Application data read before the end.
        self.data = data


class _Channel:
    """
    One pyOpenSSL client connection on memory BIOs over a plain socket.

    Every method takes a monotonic *deadline*; nothing here blocks past it.
    """

    def __init__(self, sock: socket.socket, conn: SSL.Connection) -> None:
        self.sock = sock
        self.conn = conn
        self.states: list[tuple[float, str]] = []
        self.eof = False
        #: The first bytes each way, to tell a server that is not TLS.
        self.first_sent = b""
        self.first_received = b""
        conn.set_info_callback(self._info)

    def _info(self, conn: SSL.Connection, where: int, ret: int) -> None:
        # Runs inside OpenSSL: record, never raise.
        try:
            state = conn.get_state_string().decode("ascii", "replace")
        except Exception:  # pragma: no cover - defensive
            return
        self.states.append((time.monotonic(), state))

    def seen_after(self, text: str, since: float) -> float | None:
        """When *text* first appeared in a state string after *since*."""
        for when, state in self.states:
            if when >= since and text in state:
                return when
        return None

    def flush(self, deadline: float) -> None:
        """Write everything OpenSSL has produced to the socket."""
        while True:
            try:
                data = self.conn.bio_read(_CHUNK)
            except SSL.WantReadError:
                return
            if not data:
                return
            if len(self.first_sent) < 64:
                self.first_sent += data[: 64 - len(self.first_sent)]
            view = memoryview(data)
            while view:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("timed out writing to the server")
                self.sock.settimeout(remaining)
                try:
                    sent = self.sock.send(view)
                except OSError as e:
                    raise _Closed(
                        f"write failed: {e.strerror or e}", alert=False
                    ) from e
                view = view[sent:]

    def fill(self, deadline: float) -> bool:
        """
        Move what the server sent into OpenSSL; ``False`` if nothing
        arrived before *deadline*.
        """
        if self.eof:
            return False
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        ready, _, _ = select.select([self.sock], [], [], remaining)
        if not ready:
            return False
        self.sock.settimeout(max(deadline - time.monotonic(), 0.001))
        try:
            data = self.sock.recv(_CHUNK)
        except (TimeoutError, BlockingIOError):
            return False
        except OSError as e:
            if e.errno in (errno.ECONNRESET, errno.EPIPE):
                data = b""
            else:
                raise _Closed(f"read failed: {e.strerror or e}", alert=False) from e
        if data:
            if len(self.first_received) < 64:
                self.first_received += data[: 64 - len(self.first_received)]
            self.conn.bio_write(data)
        else:
            self.eof = True
            self.conn.bio_shutdown()
        return True

    def handshake(self, deadline: float) -> None:
        while True:
            try:
                self.conn.do_handshake()
            except SSL.WantReadError:
                self.flush(deadline)
                if not self.fill(deadline):
                    if self.eof:
                        raise _Closed(
                            "the server closed the connection during the handshake",
                            alert=False,
                        ) from None
                    raise TimeoutError("timed out during the handshake") from None
                continue
            self.flush(deadline)
            return

    def send(self, data: bytes, deadline: float) -> None:
        if data:
            self.conn.sendall(data)
        self.flush(deadline)

    def read(
        self,
        deadline: float,
        *,
        until: Any = None,
        quiet: float | None = None,
    ) -> bytes:
        """
        Read application data until ``until(received)`` is true, the
        *deadline* passes, or (with *quiet*) nothing arrives for *quiet*
        seconds.

        :raises _Closed: if the server ends the connection (with an alert or
            not); bytes read before that are on the exception's ``data``.
        """
        received = bytearray()
        while True:
            if until is not None and until(bytes(received)):
                return bytes(received)
            try:
                data = self.conn.recv(_CHUNK)
            except SSL.WantReadError:
                # A renegotiation writes its answers from inside SSL_read,
                # and may complete there without any application data.
                self.flush(deadline)
                if until is not None and until(bytes(received)):
                    return bytes(received)
                wait_until = deadline
                if quiet is not None:
                    wait_until = min(deadline, time.monotonic() + quiet)
                if not self.fill(wait_until):
                    if self.eof:
                        raise self._closed(
                            "the server closed the connection", received, alert=False
                        ) from None
                    return bytes(received)
                continue
            except SSL.ZeroReturnError:
                raise self._closed(
                    "the server closed the TLS session (close_notify)",
                    received,
                    alert=False,
                ) from None
            except SSL.SysCallError as e:
                raise self._closed(_ssl_error_text(e), received, alert=False) from None
            except SSL.Error as e:
                raise self._closed(_ssl_error_text(e), received, alert=True) from None
            received += data
            self.flush(deadline)

    def _closed(self, message: str, received: bytearray, *, alert: bool) -> _Closed:
        # Send the alert OpenSSL wrote for its side of the failure, if any:
        # the server then logs why we left instead of an unexpected EOF.
        self._flush_quietly()
        return _Closed(message, alert=alert, data=bytes(received))

    def _flush_quietly(self) -> None:
        try:
            self.flush(time.monotonic() + 0.2)
        except (_Closed, TimeoutError, OSError):
            pass

    def close(self) -> None:
        """Send close_notify if the connection is still good, then close."""
        try:
            self.conn.shutdown()
        except SSL.Error:
            pass
        self._flush_quietly()
        self.sock.close()


class _NoConnection(Exception):
    """No TCP connection or no handshake; *status* is one of
    :data:`VERSION_STATUSES`."""

    def __init__(self, status: str, message: str, *, connect: bool = False) -> None:
        super().__init__(message)
        self.status = status
        #: No TCP connection at all (rather than a failed handshake).
        self.connect = connect


def _resolve(host: str, port: int) -> list[Any]:
    try:
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise _NoConnection(
            "unresolved", f"cannot resolve {host!r}: {e.strerror}"
        ) from None
    except UnicodeError as e:
        raise _NoConnection("unresolved", f"cannot resolve {host!r}: {e}") from None


def _connect(addresses: list[Any], timeout: float, label: str) -> socket.socket:
    status, last = "unreachable", "no address"
    for family, kind, proto, _, address in addresses:
        sock = socket.socket(family, kind, proto)
        sock.settimeout(timeout)
        try:
            sock.connect(address)
        except TimeoutError:
            sock.close()
            status, last = "timeout", f"timed out after {timeout:g} s"
        except OSError as e:
            sock.close()
            status = "refused" if e.errno == errno.ECONNREFUSED else "unreachable"
            last = e.strerror or str(e)
        else:
            return sock
    raise _NoConnection(status, f"cannot connect to {label}: {last}", connect=True)


def _context(options: ProbeOptions, version: str) -> tuple[SSL.Context, list[int]]:
    ctx = SSL.Context(SSL.TLS_METHOD)
    number = SSL.TLS1_3_VERSION if version == "1.3" else SSL.TLS1_2_VERSION
    ctx.set_min_proto_version(number)
    ctx.set_max_proto_version(number)
    # Connect to a server without RFC 5746 so that it can be reported as
    # such; a renegotiation is never attempted then (that would need
    # OP_ALLOW_UNSAFE_LEGACY_RENEGOTIATION, which is never set).
    ctx.set_options(SSL.OP_LEGACY_SERVER_CONNECT)
    verify_errors: list[int] = []
    if options.insecure:
        ctx.set_verify(SSL.VERIFY_NONE)
        return ctx, verify_errors

    def verify(conn: SSL.Connection, cert: Any, err: int, depth: int, ok: int) -> bool:
        if not ok:
            verify_errors.append(err)
        return bool(ok)

    ctx.set_verify(SSL.VERIFY_PEER, verify)
    if options.cafile and not os.path.isfile(options.cafile):
        raise ProbeError(f"no such CA file: {options.cafile}")
    try:
        if options.cafile:
            ctx.load_verify_locations(options.cafile)
        else:
            ctx.set_default_verify_paths()
    except SSL.Error as e:
        raise ProbeError(
            f"cannot load CA certificates from {options.cafile}: {_ssl_error_text(e)}"
        ) from None
    return ctx, verify_errors


def _check_name(conn: SSL.Connection, name: str) -> str | None:
    """The reason *name* does not match the certificate, or ``None``."""
    try:
        from service_identity import VerificationError
        from service_identity.pyopenssl import verify_hostname, verify_ip_address
    except ImportError:  # pragma: no cover - a dependency of twisted[tls]
        return "service_identity is not installed: cannot check the name"
    try:
        if _is_ip(name):
            verify_ip_address(conn, name)
        else:
            verify_hostname(conn, name)
    except VerificationError:
        return f"the certificate is not valid for {name!r}"
    except Exception as e:
        return f"cannot check the name {name!r}: {e}"
    return None


def _handshake_failure(
    channel: _Channel, e: BaseException, verify_errors: list[int], version: str
) -> _NoConnection:
    """What a failed handshake means, from what crossed the wire."""
    received = channel.first_received
    if received and channel.first_sent and received.startswith(channel.first_sent[:16]):
        return _NoConnection(
            "not_tls",
            "handshake failed: not TLS: the server sent our ClientHello back "
            "(a plain TCP echo?)",
        )
    if not _looks_like_tls(received):
        return _NoConnection(
            "not_tls",
            f"handshake failed: not TLS: the server sent {_preview(received)}",
        )
    if verify_errors:
        code = verify_errors[0]
        why = _VERIFY_ERRORS.get(code, f"X509 verify error {code}")
        return _NoConnection(
            "certificate_failed", f"certificate verification failed: {why}"
        )
    if isinstance(e, TimeoutError):
        return _NoConnection("timeout", f"handshake failed: {e}")
    text = _ssl_error_text(e) if isinstance(e, SSL.Error) else str(e)
    if isinstance(e, _Closed) or text == "the server closed the connection":
        if not received:
            return _NoConnection("closed", f"handshake failed: {text}")
    lowered = text.lower()
    if any(reason in lowered for reason in _NOT_OFFERED):
        return _NoConnection(
            "not_offered", f"TLS {version} not offered by the server ({text})"
        )
    return _NoConnection("handshake_failed", f"handshake failed: {text}")


def _open(
    options: ProbeOptions, version: str, addresses: list[Any]
) -> tuple[_Channel, str | None, str | None]:
    """
    Connect and complete a handshake restricted to *version*.

    :returns: the channel, the negotiated protocol and cipher names.
    :raises _NoConnection: if there is no TCP connection or no handshake.
    """
    ctx, verify_errors = _context(options, version)
    sock = _connect(addresses, options.timeout, _label(options.host, options.port))
    conn = RekeyConnection(ctx, None)
    conn.set_connect_state()
    name = options.servername or options.host
    if not _is_ip(name):
        conn.set_tlsext_host_name(name.encode("idna"))
    channel = _Channel(sock, conn)
    try:
        channel.handshake(time.monotonic() + options.timeout)
    except (_Closed, TimeoutError, SSL.Error, OSError) as e:
        channel.sock.close()
        raise _handshake_failure(channel, e, verify_errors, version) from None
    if not options.insecure:
        mismatch = _check_name(conn, name)
        if mismatch is not None:
            channel.close()
            raise _NoConnection(
                "certificate_failed", f"certificate verification failed: {mismatch}"
            )
    return channel, conn.get_protocol_version_name(), conn.get_cipher_name()


class _Baseline:
    """How the server answers our payload before any key change."""

    def __init__(self, payload: bytes, reply: bytes) -> None:
        self.payload = payload
        self.reply = reply

    @property
    def echo(self) -> bool:
        return bool(self.payload) and self.reply == self.payload

    def complete(self, received: bytes) -> bool:
        return bool(self.reply) and len(received) >= len(self.reply)

    def describe(self, received: bytes) -> tuple[str, dict[str, Any]]:
        if not self.payload:
            return "no alert (no data sent)", {"reply": None}
        if self.reply and received == self.reply:
            what = "echoed" if self.reply == self.payload else "answered"
            return (
                f"the server {what} our {len(self.payload)} bytes as before",
                {"reply": "same", "received": len(received)},
            )
        if received:
            return (
                f"the server answered {len(received)} bytes "
                f"(before the key change: {len(self.reply)})",
                {"reply": "different", "received": len(received)},
            )
        if self.reply:
            return (
                "no alert, but no answer within the timeout "
                f"(before the key change: {len(self.reply)} bytes)",
                {"reply": "missing", "received": 0},
            )
        return "no alert (the server does not answer our data)", {"reply": None}


def _baseline(
    channel: _Channel, result: VersionResult | None, options: ProbeOptions
) -> _Baseline | None:
    """
    Let what the server sends after the handshake (session tickets) arrive,
    then learn how it answers our payload while the keys are the original
    ones, so that what follows is about the key change only.
    """
    quiet = min(options.timeout, options.wait)
    payload = options.payload
    try:
        channel.read(time.monotonic() + quiet, quiet=min(quiet, 0.1))
        if not payload:
            return _Baseline(payload, b"")
        channel.send(payload, time.monotonic() + options.timeout)
        reply = channel.read(
            time.monotonic() + options.timeout,
            until=lambda r: r == payload,
            quiet=quiet,
        )
    except (_Closed, TimeoutError) as e:
        if result is not None:
            result.add(
                Finding(
                    "baseline",
                    "closed",
                    "warn",
                    f"the server ended the connection before any key change: {e} "
                    "(try another --send, or --send '')",
                    {"error": str(e)},
                )
            )
        return None
    if result is None:
        return _Baseline(payload, reply)
    if reply == payload:
        text, value = f"echo server: our {len(payload)} bytes came back", "echo"
    elif reply:
        text = f"the server answers {len(reply)} bytes to our {len(payload)}"
        value = "answers"
    else:
        text = f"the server does not answer our data within {quiet:g} s"
        value = "silent"
    result.add(Finding("baseline", value, "info", text, {"received": len(reply)}))
    return _Baseline(payload, reply)


def _exchange(
    channel: _Channel,
    options: ProbeOptions,
    base: _Baseline,
    until: Any = None,
) -> bytes:
    """Send the payload and read the answer the baseline leads us to expect."""
    channel.send(base.payload, time.monotonic() + options.timeout)
    if until is None:
        until = base.complete
    return channel.read(
        time.monotonic() + options.timeout,
        until=until,
        quiet=None if base.reply else min(options.timeout, options.wait),
    )


def _ended(name: str, result: str, what: str, e: BaseException) -> Finding:
    alert = _alert_name(str(e)) if getattr(e, "alert", False) else None
    if isinstance(e, TimeoutError):
        how = "timed out"
    else:
        how = f"with the alert {alert}" if alert else "without an alert"
        how = f"the connection ended {how}"
    return Finding(
        name,
        result,
        "fail",
        f"{what} REJECTED: {how}: {e}",
        {"alert": alert, "error": str(e)},
    )


def _reply_finding(name: str, what: str, base: _Baseline, received: bytes) -> Finding:
    text, detail = base.describe(received)
    reply = detail.get("reply")
    if reply is None:
        # Nothing to compare: no data sent, or a server that never answers.
        return Finding(name, "not_checked", "info", f"{what}: {text}", detail)
    result = {"same": "same", "different": "different"}.get(str(reply), "missing")
    severity = "ok" if reply == "same" else "warn"
    return Finding(name, result, severity, f"{what}: {text}", detail)


def _probe_tls13(
    channel: _Channel, result: VersionResult, options: ProbeOptions
) -> None:
    conn = channel.conn
    base = _baseline(channel, result, options)
    if base is None:
        return

    # 1. A KeyUpdate that does not ask for one back, then data under the new key.
    try:
        key_update(conn, False)
        received = _exchange(channel, options, base)
    except RekeyError as e:
        result.add(
            Finding("key_update", "not_tried", "warn", f"KeyUpdate not sent: {e}")
        )
        return
    except (_Closed, TimeoutError) as e:
        result.add(_ended("key_update", "rejected", "KeyUpdate", e))
        return
    text, detail = base.describe(received)
    if detail.get("reply") in ("same", None):
        result.add(
            Finding(
                "key_update", "accepted", "ok", f"KeyUpdate accepted: {text}", detail
            )
        )
    else:
        # No alert, but the data we sent under the new key got no answer.
        result.add(
            Finding("key_update", "accepted", "warn", f"KeyUpdate: {text}", detail)
        )

    # 2. A KeyUpdate that asks the server to update its own sending keys.
    # Some stacks answer at once; others (OpenSSL, GnuTLS, Node) only with
    # their next write, so first wait without writing anything, then send.
    started = time.monotonic()

    def seen(since: float) -> Callable[[bytes], bool]:
        return lambda _: channel.seen_after(_READ_STATE, since) is not None

    try:
        key_update(conn, True)
        channel.flush(time.monotonic() + options.timeout)
        channel.read(
            time.monotonic() + min(options.wait, options.timeout), until=seen(started)
        )
    except RekeyError as e:
        result.add(
            Finding("key_update_requested", "not_tried", "warn", f"not sent: {e}")
        )
        return
    except (_Closed, TimeoutError) as e:
        result.add(_ended("key_update_requested", "rejected", "requested KeyUpdate", e))
        return
    when = channel.seen_after(_READ_STATE, started)
    if when is not None:
        ms = (when - started) * 1000
        result.add(
            Finding(
                "key_update_requested",
                "answered",
                "ok",
                f"requested KeyUpdate answered at once, in {ms:.1f} ms",
                {"answered": True, "on_our_write": False, "ms": round(ms, 3)},
            )
        )
        return
    # Said as configured: the measured wait only ever exceeds it.
    idle = min(options.wait, options.timeout)
    if not base.payload:
        result.add(
            Finding(
                "key_update_requested",
                "silent",
                "info",
                f"requested KeyUpdate: no answer within {idle:g} s while idle "
                "(TLS stacks may send it with their next write; no data sent)",
                {"answered": False, "on_our_write": None},
            )
        )
        return
    sent = time.monotonic()

    def answered(received: bytes) -> bool:
        if channel.seen_after(_READ_STATE, started) is None:
            return False
        return not base.reply or base.complete(received)

    try:
        received = _exchange(channel, options, base, answered)
    except (_Closed, TimeoutError) as e:
        result.add(_ended("key_update_requested", "rejected", "requested KeyUpdate", e))
        return
    when = channel.seen_after(_READ_STATE, started)
    if when is not None:
        ms = (when - sent) * 1000
        result.add(
            Finding(
                "key_update_requested",
                "answered_on_our_write",
                "note",
                "requested KeyUpdate answered only with the server's next write: "
                f"none within {idle:g} s while idle, then {ms:.1f} ms after our "
                "data (as OpenSSL, GnuTLS and Node do; a peer that waits for an "
                "answer must send data)",
                {"answered": True, "on_our_write": True, "ms": round(ms, 3)},
            )
        )
        if base.reply:
            result.add(
                _reply_finding(
                    "after_key_update", "after both key changes", base, received
                )
            )
    elif received:
        # RFC 8446 section 4.6.3: the answer MUST come before its next data.
        result.add(
            Finding(
                "key_update_requested",
                "ignored",
                "fail",
                f"requested KeyUpdate IGNORED: the server sent {len(received)} bytes "
                "of data without the KeyUpdate it must send first (RFC 8446 4.6.3)",
                {"answered": False, "on_our_write": False, "received": len(received)},
            )
        )
    else:
        waited = time.monotonic() - started
        result.add(
            Finding(
                "key_update_requested",
                "silent",
                "info",
                f"requested KeyUpdate: no answer seen within {waited:.1f} s (the "
                "server wrote nothing: TLS stacks send the answer with their next "
                "write)",
                {"answered": False, "on_our_write": None},
            )
        )


def _renegotiate_once(
    channel: _Channel, options: ProbeOptions
) -> tuple[str, str, str | None]:
    """
    One client-initiated renegotiation.

    :returns: ``("allowed", "", None)``, or the way it was refused or failed
        (``refused``, ``ignored``, ``failed``), how, and the alert if any.
    """
    conn = channel.conn
    started = time.monotonic()
    try:
        renegotiate(conn)
        channel.flush(time.monotonic() + options.timeout)
        channel.read(
            time.monotonic() + options.timeout,
            until=lambda _: not renegotiate_pending(conn),
        )
    except (_Closed, TimeoutError, RekeyError) as e:
        # A server that took the renegotiation up (its ServerHello came) and
        # then failed broke it; one that answered our ClientHello with an
        # alert or a close refused it.
        alert = _alert_name(str(e)) if getattr(e, "alert", False) else None
        if channel.seen_after("read server hello", started) is not None:
            return "failed", str(e), alert
        if alert:
            return "refused", f"by the alert {alert}", alert
        return "refused", f"by closing the connection ({e})", None
    if renegotiate_pending(conn):
        return "ignored", f"no answer within {options.timeout:g} s", None
    return "allowed", "", None


def _probe_tls12(
    channel: _Channel, result: VersionResult, options: ProbeOptions
) -> None:
    conn = channel.conn
    try:
        secure = secure_renegotiation_support(conn)
    except RekeyError as e:
        result.add(
            Finding("secure_renegotiation", "unknown", "warn", f"cannot tell: {e}")
        )
        return
    if secure:
        result.add(
            Finding(
                "secure_renegotiation",
                "supported",
                "ok",
                "secure renegotiation (RFC 5746): supported",
                {"supported": True},
            )
        )
    else:
        result.add(
            Finding(
                "secure_renegotiation",
                "not_supported",
                "high",
                "secure renegotiation (RFC 5746): NOT supported: VULNERABLE to "
                "renegotiation prefix injection (CVE-2009-3555) if it renegotiates",
                {"supported": False},
            )
        )
        result.add(
            Finding(
                "client_renegotiation",
                "not_tried",
                "info",
                "client-initiated renegotiation: not tried (insecure renegotiation "
                "is never used)",
                {"allowed": None, "count": 0},
            )
        )
        return
    base = _baseline(channel, result, options)
    if base is None:
        return

    started = time.monotonic()
    outcome, how, alert = _renegotiate_once(channel, options)
    if outcome != "allowed":
        severity = "fail" if outcome == "failed" else "ok"
        words = {
            "refused": f"refused {how}",
            "ignored": f"refused by silence ({how})",
            "failed": f"FAILED after the server took it up: {how}",
        }
        result.add(
            Finding(
                "client_renegotiation",
                outcome,
                severity,
                f"client-initiated renegotiation: {words[outcome]}",
                {
                    "allowed": False,
                    "count": 0,
                    "alert": alert,
                    "error": how,
                },
            )
        )
        return
    ms = (time.monotonic() - started) * 1000
    after: Finding | None = None
    if base.payload:
        try:
            received = _exchange(channel, options, base)
        except (_Closed, TimeoutError) as e:
            after = Finding(
                "after_renegotiation",
                "closed",
                "fail",
                f"data after renegotiation REJECTED: {e}",
                {"error": str(e)},
            )
        else:
            after = _reply_finding(
                "after_renegotiation", "after renegotiation", base, received
            )
    # As sslyze does: more in a row, to tell a server that limits them
    # (Node: 3 per 10 minutes) from one that renegotiates as often as asked.
    count, stopped = 1, ""
    while after is None or after.result != "closed":
        if count >= RENEGOTIATIONS_MAX:
            break
        outcome, how, _ = _renegotiate_once(channel, options)
        if outcome != "allowed":
            stopped = f"{outcome} {how}"
            break
        count += 1
    detail: dict[str, Any] = {"allowed": True, "count": count, "ms": round(ms, 3)}
    if stopped:
        detail["stopped"] = stopped
        result.add(
            Finding(
                "client_renegotiation",
                "limited",
                "low",
                f"client-initiated renegotiation: allowed {count} in a row, then "
                f"{stopped}: a limited denial-of-service exposure",
                detail,
            )
        )
    else:
        result.add(
            Finding(
                "client_renegotiation",
                "allowed",
                "medium",
                f"client-initiated renegotiation: ALLOWED ({count} in a row, the "
                f"first in {ms:.1f} ms; renegotiations on this connection: "
                f"{total_renegotiations(conn)}): a denial-of-service exposure "
                "(CVE-2011-1473); it is also what lets a TLS 1.2 client rotate",
                detail,
            )
        )
    if after is not None:
        result.add(after)


@dataclass
class _Run:
    """One KeyUpdate burst on its own connection."""

    sent: int = 0
    dropped: bool = False
    elapsed: float = 0.0
    error: str = ""
    #: Each KeyUpdate confirmed by an echo (exact count), not by timing.
    exact: bool = False
    with_data: bool = False

    @property
    def accepted(self) -> int:
        return self.sent - 1 if self.dropped else self.sent


def _burst(
    options: ProbeOptions,
    addresses: list[Any],
    *,
    with_data: bool,
    spacing: float,
    window: float | None,
) -> _Run | str:
    """
    Send up to :data:`LIMITS_MAX` KeyUpdates (update_not_requested) on a new
    connection, *spacing* seconds apart, each followed by our payload when
    *with_data* and the server echoes, until it drops the connection or
    *window* seconds pass.  A drop is charged to the last KeyUpdate sent.

    :returns: the run, or why it could not be made.
    """
    try:
        channel, protocol, _ = _open(options, "1.3", addresses)
    except _NoConnection as e:
        return str(e)
    try:
        if protocol != "TLSv1.3":
            return f"negotiated {protocol}"
        base = _baseline(channel, None, options)
        if base is None:
            return "the server ends the connection after our data"
        run = _Run(with_data=with_data and base.echo)
        run.exact = run.with_data
        conn = channel.conn
        start = time.monotonic()
        try:
            for i in range(LIMITS_MAX):
                if window is not None and time.monotonic() - start >= window:
                    break
                due = start + i * spacing
                if due > time.monotonic():
                    channel.read(due)
                key_update(conn, False)
                run.sent += 1
                if run.with_data:
                    received = _exchange(channel, options, base)
                    if not base.complete(received):
                        raise _Closed("no echo within the timeout", alert=False)
                else:
                    channel.flush(time.monotonic() + options.timeout)
                    channel.read(time.monotonic() + _LIMITS_GRACE)
            run.elapsed = time.monotonic() - start
            # A drop can come late; an echo proves the connection still works.
            if base.echo:
                received = _exchange(channel, options, base)
                if not base.complete(received):
                    raise _Closed("no echo within the timeout", alert=False)
            else:
                channel.read(time.monotonic() + min(options.wait, 0.5))
        except (_Closed, TimeoutError, RekeyError) as e:
            run.elapsed = run.elapsed or time.monotonic() - start
            run.dropped = True
            alert = _alert_name(str(e)) if getattr(e, "alert", False) else None
            run.error = f"the alert {alert}" if alert else str(e)
        return run
    finally:
        channel.close()


def _floor(per_second: int | None) -> float:
    if not per_second:
        return MIN_INTERVAL_LOWEST
    step = 0.05  # rounded up to 50 ms, never below what a policy accepts
    return max(MIN_INTERVAL_LOWEST, math.ceil(_FLOOR_MARGIN / per_second / step) * step)


def _ordinal(n: int) -> str:
    suffix = (
        "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    )
    return f"{n}{suffix}"


def _probe_limits(
    result: VersionResult, options: ProbeOptions, addresses: list[Any]
) -> None:
    """How many KeyUpdates the server takes per second and in a row."""
    rate = _burst(options, addresses, with_data=True, spacing=0.0, window=1.0)
    if isinstance(rate, str):
        for name in ("key_updates_per_second", "key_updates_in_a_row"):
            result.add(
                Finding(name, "not_measured", "warn", f"{name}: not measured: {rate}")
            )
        return
    rate_cap = rate.accepted if rate.dropped else None
    spacing = _FLOOR_MARGIN / rate_cap if rate_cap else 0.0
    row = _burst(options, addresses, with_data=False, spacing=spacing, window=None)
    row_cap: int | None = None
    if isinstance(row, str):
        result.add(
            Finding(
                "key_updates_in_a_row",
                "not_measured",
                "warn",
                f"KeyUpdates in a row: not measured: {row}",
            )
        )
    else:
        row_cap = row.accepted if row.dropped else None
    # Without an echo nothing came between the first burst's KeyUpdates
    # either: a drop at the same count is the in-a-row limit.
    conflated = not rate.with_data and rate_cap is not None and rate_cap == row_cap
    ms = rate.elapsed * 1000
    how = "each confirmed by an echo" if rate.exact else "no echo to confirm each"
    if conflated:
        result.add(
            Finding(
                "key_updates_per_second",
                "not_measured",
                "info",
                "KeyUpdates per second: not told apart from the in-a-row limit "
                "(the server does not echo our data, which would reset it)",
                {"limit": None, "sent": rate.sent, "ms": round(ms, 3)},
            )
        )
        rate_cap = None
    elif rate_cap is not None:
        result.add(
            Finding(
                "key_updates_per_second",
                "limit",
                "note",
                f"KeyUpdates per second: the server dropped the connection at the "
                f"{_ordinal(rate.sent)} within {ms:.0f} ms ({rate.error}): it "
                f"accepts {rate_cap} per second ({how})",
                {
                    "limit": rate_cap,
                    "sent": rate.sent,
                    "ms": round(ms, 3),
                    "exact": rate.exact,
                    "error": rate.error,
                },
            )
        )
    else:
        result.add(
            Finding(
                "key_updates_per_second",
                "no_limit",
                "ok",
                f"KeyUpdates per second: no limit: {rate.sent} accepted in "
                f"{ms:.0f} ms ({how}; at most {LIMITS_MAX} within one second "
                "are tried)",
                {
                    "limit": None,
                    "sent": rate.sent,
                    "ms": round(ms, 3),
                    "exact": rate.exact,
                },
            )
        )
    if not isinstance(row, str):
        paced = (
            f"{row.sent} sent {spacing * 1000:.0f} ms apart"
            if spacing
            else (f"{row.sent} sent")
        )
        if row_cap is not None:
            result.add(
                Finding(
                    "key_updates_in_a_row",
                    "limit",
                    "note",
                    f"KeyUpdates in a row with no application data: the server "
                    f"dropped the connection at the {_ordinal(row.sent)} "
                    f"({row.error}): it accepts {row_cap}",
                    {"limit": row_cap, "sent": row.sent, "error": row.error},
                )
            )
        else:
            result.add(
                Finding(
                    "key_updates_in_a_row",
                    "no_limit",
                    "ok",
                    f"KeyUpdates in a row with no application data: no limit up "
                    f"to {LIMITS_MAX} ({paced})",
                    {"limit": None, "sent": row.sent},
                )
            )
    floor = _floor(rate_cap)
    text = f"rotation floor against this server: min_interval >= {floor:g} s"
    if rate_cap:
        text += f" (it accepts {rate_cap} KeyUpdates per second)"
    else:
        text += " (the lowest a RotationPolicy accepts)"
    if row_cap is not None:
        text += (
            f"; keep skip_idle=True (the default): an idle connection would be "
            f"dropped after {row_cap} rotations"
        )
    result.add(
        Finding(
            "rotation_floor",
            "floor",
            "info",
            text,
            {
                "min_interval": floor,
                "skip_idle_required": row_cap is not None,
                "per_second_limit": rate_cap,
                "in_a_row_limit": row_cap,
            },
        )
    )


def probe(options: ProbeOptions) -> ProbeReport:
    """
    Run every probe *options* asks for, one connection per version (two
    more for ``limits``).  Whatever the server or the network does ends in
    the report.

    :raises ProbeError: for bad input (the CA file).
    """
    caps = capabilities()
    name = options.servername or options.host
    report = ProbeReport(
        target=options.target or _label(options.host, options.port),
        host=options.host,
        port=options.port,
        servername=name,
        verified=not options.insecure,
        key_update_available=caps.key_update,
        results=[],
        limits=options.limits,
    )
    try:
        addresses = _resolve(options.host, options.port)
    except _NoConnection as e:
        report.status, report.error = e.status, str(e)
        return report
    for version in options.versions:
        result = VersionResult(requested=version)
        try:
            channel, result.protocol, result.cipher = _open(options, version, addresses)
        except _NoConnection as e:
            result.status, result.error = e.status, str(e)
            if e.connect:
                # Nothing listens, or nothing answers: no other version will.
                report.status, report.error = e.status, str(e)
                report.results.append(result)
                return report
            report.results.append(result)
            continue
        result.status = "connected"
        report.results.append(result)
        if options.insecure:
            result.add(
                Finding(
                    "certificate",
                    "not_verified",
                    "warn",
                    "certificate and name NOT verified (--insecure)",
                    {"verified": False},
                )
            )
        else:
            result.add(
                Finding(
                    "certificate",
                    "verified",
                    "ok",
                    f"certificate verified for {name}",
                    {"verified": True},
                )
            )
        try:
            if result.protocol == "TLSv1.3":
                if caps.key_update:
                    _probe_tls13(channel, result, options)
                else:
                    result.add(
                        Finding(
                            "key_update",
                            "not_tried",
                            "warn",
                            "KeyUpdate not tried: unavailable in this build "
                            "(see `twisted-rekey info`)",
                        )
                    )
            else:
                _probe_tls12(channel, result, options)
        finally:
            channel.close()
        if options.limits and result.protocol == "TLSv1.3" and caps.key_update:
            _probe_limits(result, options, addresses)
    if not any(r.connected for r in report.results):
        statuses = [r.status for r in report.results]
        report.status = statuses[0] if len(set(statuses)) == 1 else "handshake_failed"
        report.error = "; ".join(
            f"TLS {r.requested}: {r.error}" for r in report.results
        )
    return report


def _report_schema() -> dict[str, Any]:
    nullable_str = {"type": ["string", "null"]}
    finding = {
        "type": "object",
        "required": ["name", "result", "severity", "text", "detail"],
        "additionalProperties": False,
        "properties": {
            "name": {"enum": list(FINDINGS)},
            "result": {"enum": sorted({r for rs in FINDINGS.values() for r in rs})},
            "severity": {"enum": list(SEVERITIES)},
            "text": {"type": "string"},
            "detail": {"type": "object"},
        },
        # Each name with its own results only.
        "allOf": [
            {
                "if": {"properties": {"name": {"const": name}}},
                "then": {"properties": {"result": {"enum": list(results)}}},
            }
            for name, results in FINDINGS.items()
        ],
    }
    version = {
        "type": "object",
        "required": ["version", "status", "protocol", "cipher", "error", "findings"],
        "additionalProperties": False,
        "properties": {
            "version": {"enum": ["1.2", "1.3"]},
            "status": {"enum": list(VERSION_STATUSES)},
            "protocol": nullable_str,
            "cipher": nullable_str,
            "error": nullable_str,
            "findings": {"type": "array", "items": {"$ref": "#/$defs/finding"}},
        },
    }
    report = {
        "type": "object",
        "required": [
            "schema_version",
            "target",
            "servername",
            "verification",
            "status",
            "error",
            "key_update_available",
            "limits_measured",
            "results",
            "worst_severity",
            "exit_code",
        ],
        "additionalProperties": False,
        "properties": {
            "schema_version": {"const": SCHEMA_VERSION},
            "target": {
                "type": "object",
                "required": ["input", "host", "port"],
                "additionalProperties": False,
                "properties": {
                    "input": {"type": "string"},
                    "host": {"type": "string"},
                    "port": {"type": "integer", "minimum": 1, "maximum": 65535},
                },
            },
            "servername": nullable_str,
            "verification": {
                "type": "object",
                "required": ["certificate", "name"],
                "additionalProperties": False,
                "properties": {
                    "certificate": {"type": "boolean"},
                    "name": nullable_str,
                },
            },
            "status": {"enum": list(TARGET_STATUSES)},
            "error": nullable_str,
            "key_update_available": {"type": "boolean"},
            "limits_measured": {"type": "boolean"},
            "results": {"type": "array", "items": {"$ref": "#/$defs/version"}},
            "worst_severity": {"enum": [*SEVERITIES, None]},
            "exit_code": {"enum": [0, 1, 3, 4, 6]},
        },
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"urn:twisted-rekey:probe-report:{SCHEMA_VERSION}",
        "title": "twisted-rekey probe --json",
        "description": "One report per target; with --targets, an object "
        "holding them all.",
        "$defs": {"finding": finding, "version": version, "report": report},
        "oneOf": [
            {"$ref": "#/$defs/report"},
            {
                "type": "object",
                "required": ["schema_version", "reports", "exit_code"],
                "additionalProperties": False,
                "properties": {
                    "schema_version": {"const": SCHEMA_VERSION},
                    "reports": {"type": "array", "items": {"$ref": "#/$defs/report"}},
                    "exit_code": {"enum": [0, 1, 2, 3, 4, 5, 6]},
                },
            },
        ],
    }


#: The JSON Schema of ``probe --json`` (``twisted-rekey probe --schema``).
REPORT_SCHEMA = _report_schema()
