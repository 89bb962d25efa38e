"""
Probe a real TLS server: does it accept our TLS 1.3 KeyUpdate, does it answer
a requested one (and how fast), does it support secure renegotiation, and does
it let a client renegotiate a TLS 1.2 connection?

It works over one plain socket per protocol version and a pyOpenSSL
connection on memory BIOs, so every byte on the wire passes through code here
and every socket operation is bounded by a deadline.  It needs no reactor.

This module must never raise for anything the server or the network does:
each outcome becomes a :class:`Finding` (or a :class:`ProbeError` for
failures that end the probe before it starts), so that the command line can
print one line per fact and exit with a meaningful code.  It must never
rotate keys in a way the library would not (no insecure renegotiation, at
most one requested KeyUpdate outstanding).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import select
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from OpenSSL import SSL

from ._binding import capabilities
from ._connection import (
    RekeyConnection,
    key_update,
    renegotiate,
    renegotiate_pending,
    secure_renegotiation_support,
    total_renegotiations,
)
from .exceptions import RekeyError

__all__ = [
    "EXIT_INTERNAL",
    "EXIT_KEY_UPDATE_UNAVAILABLE",
    "EXIT_NO_CONNECTION",
    "EXIT_OK",
    "EXIT_REKEY_BROKE",
    "EXIT_USAGE",
    "Finding",
    "ProbeError",
    "ProbeOptions",
    "ProbeReport",
    "VersionResult",
    "parse_target",
    "probe",
]

#: Connected and probed; negative findings (such as a refused client
#: renegotiation, which is a server's policy) are reported, not failures.
EXIT_OK = 0
#: A rekey the server must handle broke the connection: an alert or a close
#: after our TLS 1.3 KeyUpdate, or a renegotiation that failed without the
#: ``no_renegotiation`` refusal.
EXIT_REKEY_BROKE = 1
#: Bad command line (argparse's own code).
EXIT_USAGE = 2
#: Could not resolve, connect, or complete any handshake (including a
#: certificate that failed verification).
EXIT_NO_CONNECTION = 3
#: This build cannot send a KeyUpdate (see ``twisted-rekey info``).
EXIT_KEY_UPDATE_UNAVAILABLE = 4
#: A bug in this program: please report it.
EXIT_INTERNAL = 5

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


class ProbeError(Exception):
    """
    The probe could not start or go on: bad target, name not resolved,
    connection refused or timed out, handshake failed.

    :ivar exit_code: the command line's exit code for it.
    """

    def __init__(self, message: str, exit_code: int = EXIT_NO_CONNECTION) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class Finding:
    """
    One fact about the server.

    :ivar name: a stable machine name, such as ``"key_update_requested"``.
    :ivar ok: ``True`` when the server behaved as a rekeying peer should,
        ``False`` when it did not, ``None`` when merely informative or not
        determined.
    :ivar text: one human-readable line.
    :ivar detail: machine-readable values (milliseconds, byte counts...).
    """

    name: str
    ok: bool | None
    text: str
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class VersionResult:
    """What one connection, restricted to one protocol version, found."""

    requested: str
    connected: bool = False
    protocol: str | None = None
    cipher: str | None = None
    error: str | None = None
    findings: list[Finding] = field(default_factory=list)
    broke: bool = False

    def add(self, finding: Finding) -> None:
        self.findings.append(finding)


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


@dataclass
class ProbeReport:
    """Everything the probe found, and the exit code it implies."""

    host: str
    port: int
    servername: str | None
    verification: str
    key_update_available: bool
    results: list[VersionResult]

    @property
    def exit_code(self) -> int:
        if not any(r.connected for r in self.results):
            return EXIT_NO_CONNECTION
        if any(r.broke for r in self.results):
            return EXIT_REKEY_BROKE
        if "1.3" in [r.requested for r in self.results] and not (
            self.key_update_available
        ):
            return EXIT_KEY_UPDATE_UNAVAILABLE
        return EXIT_OK

    def as_dict(self) -> dict[str, Any]:
        return {
            "target": {"host": self.host, "port": self.port},
            "servername": self.servername,
            "verification": self.verification,
            "key_update_available": self.key_update_available,
            "results": [
                {
                    "version": r.requested,
                    "connected": r.connected,
                    "protocol": r.protocol,
                    "cipher": r.cipher,
                    "error": r.error,
                    "findings": [
                        {"name": f.name, "ok": f.ok, "text": f.text, **f.detail}
                        for f in r.findings
                    ],
                }
                for r in self.results
            ],
            "exit_code": self.exit_code,
        }


def parse_target(text: str) -> tuple[str, int]:
    """
    Split ``HOST:PORT`` (``[v6addr]:PORT`` for IPv6).

    :raises ValueError: with a one-line explanation.
    """
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
    if not port_text.isdigit():
        raise ValueError(f"the port must be a number, got {port_text!r}")
    port = int(port_text)
    if not 0 < port < 65536:
        raise ValueError(f"the port must be between 1 and 65535, got {port}")
    return host, port


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


def _resolve(host: str, port: int, timeout: float) -> list[Any]:
    try:
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ProbeError(f"cannot resolve {host!r}: {e.strerror}") from None
    except UnicodeError as e:
        raise ProbeError(f"cannot resolve {host!r}: {e}") from None


def _connect(addresses: list[Any], timeout: float, label: str) -> socket.socket:
    last: str = "no address"
    for family, kind, proto, _, address in addresses:
        sock = socket.socket(family, kind, proto)
        sock.settimeout(timeout)
        try:
            sock.connect(address)
        except TimeoutError:
            sock.close()
            last = f"timed out after {timeout:g} s"
        except OSError as e:
            sock.close()
            last = e.strerror or str(e)
        else:
            return sock
    raise ProbeError(f"cannot connect to {label}: {last}")


def _context(options: ProbeOptions, version: str) -> tuple[SSL.Context, list[int]]:
    ctx = SSL.Context(SSL.TLS_METHOD)
    number = SSL.TLS1_3_VERSION if version == "1.3" else SSL.TLS1_2_VERSION
    ctx.set_min_proto_version(number)
    ctx.set_max_proto_version(number)
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
        raise ProbeError(f"no such CA file: {options.cafile}", EXIT_USAGE)
    try:
        if options.cafile:
            ctx.load_verify_locations(options.cafile)
        else:
            ctx.set_default_verify_paths()
    except SSL.Error as e:
        raise ProbeError(
            f"cannot load CA certificates from {options.cafile}: {_ssl_error_text(e)}",
            EXIT_USAGE,
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


def _open(
    options: ProbeOptions, version: str, addresses: list[Any], label: str
) -> tuple[_Channel, VersionResult]:
    result = VersionResult(requested=version)
    ctx, verify_errors = _context(options, version)
    sock = _connect(addresses, options.timeout, label)
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
        if verify_errors:
            code = verify_errors[0]
            why = _VERIFY_ERRORS.get(code, f"X509 verify error {code}")
            result.error = f"certificate verification failed: {why}"
        elif isinstance(e, SSL.Error):
            result.error = f"handshake failed: {_ssl_error_text(e)}"
        else:
            result.error = f"handshake failed: {e}"
        raise _HandshakeFailed(result) from None
    if not options.insecure:
        mismatch = _check_name(conn, name)
        if mismatch is not None:
            channel.close()
            result.error = f"certificate verification failed: {mismatch}"
            raise _HandshakeFailed(result)
    result.connected = True
    result.protocol = conn.get_protocol_version_name()
    result.cipher = conn.get_cipher_name()
    result.add(
        Finding(
            "negotiated",
            None,
            f"negotiated {result.protocol} {result.cipher}",
            {"protocol": result.protocol, "cipher": result.cipher},
        )
    )
    if options.insecure:
        result.add(
            Finding(
                "certificate",
                None,
                "certificate NOT verified (--insecure)",
                {"verified": False},
            )
        )
    else:
        result.add(
            Finding(
                "certificate",
                True,
                f"certificate verified for {name}",
                {"verified": True},
            )
        )
    return channel, result


class _HandshakeFailed(Exception):
    def __init__(self, result: VersionResult) -> None:
        super().__init__(result.error)
        self.result = result


class _Baseline:
    """How the server answers our payload before any key change."""

    def __init__(self, payload: bytes, reply: bytes) -> None:
        self.payload = payload
        self.reply = reply

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
    channel: _Channel, result: VersionResult, options: ProbeOptions
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
        result.add(
            Finding(
                "baseline",
                None,
                f"the server ended the connection before any key change: {e}",
            )
        )
        return None
    if reply == payload:
        text = f"echo server: our {len(payload)} bytes came back"
    elif reply:
        text = f"the server answers {len(reply)} bytes to our {len(payload)}"
    else:
        text = f"the server does not answer our data within {quiet:g} s"
    result.add(Finding("baseline", None, text, {"received": len(reply)}))
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


def _ended(name: str, what: str, e: BaseException) -> Finding:
    alert = bool(getattr(e, "alert", False))
    how = "with an alert" if alert else "without an alert"
    return Finding(
        name,
        False,
        f"{what} REJECTED: the connection ended {how}: {e}",
        {"alert": alert, "error": str(e)},
    )


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
        result.add(Finding("key_update", None, f"KeyUpdate not sent: {e}"))
        return
    except (_Closed, TimeoutError) as e:
        result.broke = True
        result.add(_ended("key_update", "KeyUpdate", e))
        return
    text, detail = base.describe(received)
    ok = detail.get("reply") in ("same", None)
    result.add(Finding("key_update", ok, f"KeyUpdate accepted: {text}", detail))

    # 2. A KeyUpdate that asks the server to update its own sending keys.  It
    # answers with its next write: at once if it answers our data.
    started = time.monotonic()

    def answered(received: bytes) -> bool:
        if channel.seen_after(_READ_STATE, started) is None:
            return False
        return not base.reply or base.complete(received)

    try:
        key_update(conn, True)
        received = _exchange(channel, options, base, answered)
    except RekeyError as e:
        result.add(Finding("key_update_requested", None, f"not sent: {e}"))
        return
    except (_Closed, TimeoutError) as e:
        result.broke = True
        result.add(_ended("key_update_requested", "requested KeyUpdate", e))
        return
    seen = channel.seen_after(_READ_STATE, started)
    if seen is not None:
        ms = (seen - started) * 1000
        result.add(
            Finding(
                "key_update_requested",
                True,
                f"requested KeyUpdate answered in {ms:.1f} ms",
                {"answered": True, "ms": round(ms, 3)},
            )
        )
    else:
        waited = time.monotonic() - started
        hint = (
            ""
            if received
            else " (the server wrote nothing: TLS stacks send the answer with "
            "their next write)"
        )
        result.add(
            Finding(
                "key_update_requested",
                None,
                f"requested KeyUpdate: no answer seen within {waited:.1f} s{hint}",
                {"answered": False},
            )
        )
    if seen is not None and base.reply:
        text, detail = base.describe(received)
        ok = detail.get("reply") == "same"
        result.add(
            Finding("after_key_update", ok, f"after both key changes: {text}", detail)
        )


def _probe_tls12(
    channel: _Channel, result: VersionResult, options: ProbeOptions
) -> None:
    conn = channel.conn
    try:
        secure = secure_renegotiation_support(conn)
    except RekeyError as e:
        result.add(Finding("secure_renegotiation", None, f"cannot tell: {e}"))
        return
    result.add(
        Finding(
            "secure_renegotiation",
            secure,
            "secure renegotiation (RFC 5746): "
            + ("supported" if secure else "NOT supported"),
            {"supported": secure},
        )
    )
    if not secure:
        result.add(
            Finding(
                "client_renegotiation",
                None,
                "client-initiated renegotiation: not tried (insecure renegotiation "
                "is never used)",
                {"allowed": None},
            )
        )
        return
    base = _baseline(channel, result, options)
    if base is None:
        return

    started = time.monotonic()
    try:
        renegotiate(conn)
        channel.flush(time.monotonic() + options.timeout)
        channel.read(
            time.monotonic() + options.timeout,
            until=lambda _: not renegotiate_pending(conn),
        )
    except RekeyError as e:
        result.add(Finding("client_renegotiation", None, f"not started: {e}"))
        return
    except (_Closed, TimeoutError) as e:
        if "no renegotiation" in str(e):
            result.add(
                Finding(
                    "client_renegotiation",
                    False,
                    "client-initiated renegotiation: refused (no_renegotiation)",
                    {"allowed": False},
                )
            )
        else:
            result.broke = True
            result.add(
                Finding(
                    "client_renegotiation",
                    False,
                    f"client-initiated renegotiation: the connection ended: {e}",
                    {"allowed": None, "error": str(e)},
                )
            )
        return
    if renegotiate_pending(conn):
        result.add(
            Finding(
                "client_renegotiation",
                None,
                "client-initiated renegotiation: no answer within "
                f"{options.timeout:g} s",
                {"allowed": None},
            )
        )
        return
    ms = (time.monotonic() - started) * 1000
    result.add(
        Finding(
            "client_renegotiation",
            True,
            f"client-initiated renegotiation: allowed, completed in {ms:.1f} ms "
            f"(renegotiations on this connection: {total_renegotiations(conn)})",
            {"allowed": True, "ms": round(ms, 3)},
        )
    )
    if not base.payload:
        return
    try:
        received = _exchange(channel, options, base)
    except (_Closed, TimeoutError) as e:
        result.broke = True
        result.add(_ended("after_renegotiation", "data after renegotiation", e))
        return
    text, detail = base.describe(received)
    ok = detail.get("reply") in ("same", None)
    result.add(
        Finding("after_renegotiation", ok, f"after renegotiation: {text}", detail)
    )


def probe(options: ProbeOptions) -> ProbeReport:
    """
    Run every probe *options* asks for, one connection per version.

    :raises ProbeError: when the name does not resolve or no TCP connection
        can be made (the probe stops at the first such failure).
    """
    caps = capabilities()
    addresses = _resolve(options.host, options.port, options.timeout)
    label = (
        f"[{options.host}]:{options.port}"
        if ":" in options.host
        else f"{options.host}:{options.port}"
    )
    report = ProbeReport(
        host=options.host,
        port=options.port,
        servername=options.servername or options.host,
        verification="disabled (--insecure)" if options.insecure else "verified",
        key_update_available=caps.key_update,
        results=[],
    )
    for version in options.versions:
        try:
            channel, result = _open(options, version, addresses, label)
        except _HandshakeFailed as e:
            report.results.append(e.result)
            continue
        report.results.append(result)
        try:
            if result.protocol == "TLSv1.3":
                if caps.key_update:
                    _probe_tls13(channel, result, options)
                else:
                    result.add(
                        Finding(
                            "key_update",
                            None,
                            "KeyUpdate not tried: unavailable in this build "
                            "(see `twisted-rekey info`)",
                        )
                    )
            else:
                _probe_tls12(channel, result, options)
        finally:
            channel.close()
    return report
