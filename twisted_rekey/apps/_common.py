"""
What the ``rekey-echo`` and ``rekey-tunnel`` twistd plugins share: the
rotation and TLS options, the reading of certificates and endpoint strings,
the one-line descriptions of peers and connections for the log, the
``--metrics`` option, and a listening service that fails with one clear
line.  Like every module of :mod:`twisted_rekey.apps`, it uses only the
library's public API.

Everything a user can get wrong is checked in ``postOptions``, before
twistd starts anything, and reported as one line naming the option at fault.

This module must never listen, connect or write a file while options are
parsed (except making the default certificate, in its own state directory),
and never listen on anything but loopback unless told to by an endpoint
string.
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NoReturn, Optional, cast

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from twisted.application import service
from twisted.internet import error
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IAddress,
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
)
from twisted.internet.ssl import CertificateOptions, TLSVersion
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure
from zope.interface import implementer  # type: ignore[import-untyped]

from twisted_rekey import (
    RekeyMetrics,
    RekeyProtocolMixin,
    RotationPolicy,
    allowALPNWithoutProtocols,
    capabilities,
    set_max_proto_version,
    verify_cert_error_string,
)

from ._certs import DefaultCertificate, ensure_default_certificate, fingerprint

__all__ = [
    "AllowList",
    "CommandLineOptions",
    "EndpointSpec",
    "ListeningService",
    "MetricsOptionsMixin",
    "ReloadableServerTLS",
    "RotationOptionsMixin",
    "ServerCertificateMixin",
    "TLSVersionMixin",
    "checkCertificate",
    "clientRefusal",
    "describePeer",
    "describePolicy",
    "describeReason",
    "describeStats",
    "describeTLS",
    "loadCertificateAuthorities",
    "metricsService",
    "parseEndpoint",
    "requireClientCertificates",
]

_log = Logger()

DEFAULT_INTERVAL = 5.0
DEFAULT_MIN_INTERVAL = 1.0

_VERSIONS = {"1.2": TLSVersion.TLSv1_2, "1.3": TLSVersion.TLSv1_3}
_PROTOCOLS = {"1.2": SSL.TLS1_2_VERSION, "1.3": SSL.TLS1_3_VERSION}
_SIZE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}

# Keys of Twisted's ssl: endpoint strings that the plugins take as options
# instead (the TLS layer is the plugins' own, so that it can rotate keys).
_SERVER_TLS_KEYS = {"privateKey": "--key", "certKey": "--cert"}
_SERVER_TLS_REFUSED = {
    "extraCertChain": "put the chain in the --cert file, after the certificate",
    "dhParameters": "finite-field DH is not offered; ECDHE is",
    "sslmethod": "use --tls-min and --tls-max",
}
_CLIENT_TLS_REFUSED = {
    "caCertsDir": "use --cafile",
    "trustRoots": "use --cafile",
}
# The client certificate keys of ssl: and tls: client strings, taken as
# options (for rekey-tunnel: --client-cert and --client-key).
_CLIENT_TLS_KEYS = {
    "certKey": "--client-cert",
    "certificate": "--client-cert",
    "privateKey": "--client-key",
}
#: The endpoint types that mean TLS: Twisted's ``ssl:`` (server and client)
#: and ``tls:`` (client; taken for a server too, as the same ``ssl:``).
TLS_KINDS = ("ssl", "tls")


# -- small parsers ---------------------------------------------------------------


def parseSeconds(name: str, value: str) -> float:
    """A number of seconds > 0, for option *name*."""
    try:
        seconds = float(value)
    except ValueError:
        raise usage.UsageError(
            f"{name} must be a number of seconds, not {value!r}"
        ) from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise usage.UsageError(f"{name} must be more than 0 seconds, not {value}")
    return seconds


def parseSize(name: str, value: str) -> int:
    """A byte count > 0 such as ``1048576``, ``64K``, ``1MiB`` or ``2G``."""
    match = _SIZE.match(value)
    if match is None:
        raise usage.UsageError(
            f"{name} must be a number of bytes (such as 65536, 64K, 1M, 1GiB), "
            f"not {value!r}"
        )
    size = int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]
    if size <= 0:
        raise usage.UsageError(f"{name} must be more than 0 bytes, not {value}")
    return size


def _readable(option: str, path: str) -> Path:
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise usage.UsageError(f"{option} {path}: {e.strerror or e}".rstrip()) from None
    return Path(path)


# -- endpoint strings ------------------------------------------------------------


def _splitUnescaped(text: str, separator: str, limit: int = -1) -> list[str]:
    """Split on *separator* where not escaped by a backslash; keep escapes."""
    parts: list[str] = []
    current: list[str] = []
    escaped = False
    for ch in text:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\":
            current.append(ch)
            escaped = True
        elif ch == separator and (limit < 0 or len(parts) < limit):
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text)


@dataclass(frozen=True)
class EndpointSpec:
    """
    An endpoint string as the plugins use it.

    :ivar description: the string as given.
    :ivar plain: the string of the byte stream under TLS: an ``ssl:`` or
        ``tls:`` string becomes the ``tcp:`` string of the same address (or
        the ``endpoint=`` of a ``tls:`` one), so that the TLS
        layer (and its key rotation) is the plugin's own.
    :ivar tls: whether the string asked for TLS (``ssl:`` or ``tls:``).
    :ivar tlsArguments: the TLS keys taken out of an ``ssl:`` or ``tls:``
        string (``privateKey``, ``certKey``, ``certificate``, ``endpoint``),
        unescaped.
    :ivar host: a client string's host (``tcp:``/``ssl:``/``tls:``), else
        ``None``.
    """

    description: str
    plain: str
    tls: bool
    tlsArguments: dict[str, str]
    host: Optional[str] = None


def parseEndpoint(option: str, description: str, server: bool) -> EndpointSpec:
    """
    Check an endpoint string the way Twisted parses it, and take TLS out of
    an ``ssl:`` or ``tls:`` one (Twisted has ``tls:`` for clients only; for
    a server it is taken as the same as ``ssl:``).

    :param option: the option's name, for the error message.
    :param server: a server endpoint (``--endpoint``, ``--listen``) or a
        client one (``--connect``).
    :raises usage.UsageError: one line saying what is wrong.
    """
    from twisted.internet import endpoints, reactor

    if not description.strip():
        raise usage.UsageError(f"{option}: an empty endpoint string")
    segments = _splitUnescaped(description, ":")
    kind = segments[0].strip().lower()
    tls = kind in TLS_KINDS
    tlsArguments: dict[str, str] = {}
    plain = description
    if tls:
        kept = ["tcp"]
        refused = _SERVER_TLS_REFUSED if server else _CLIENT_TLS_REFUSED
        accepted = _SERVER_TLS_KEYS if server else _CLIENT_TLS_KEYS
        for segment in segments[1:]:
            pair = _splitUnescaped(segment, "=", 1)
            key = _unescape(pair[0]) if len(pair) == 2 else None
            if key in refused:
                raise usage.UsageError(
                    f"{option} {description}: {key}= is not supported here "
                    f"({refused[key]})"
                )
            if key in accepted:
                if accepted[key] in {accepted.get(k) for k in tlsArguments if k != key}:
                    raise usage.UsageError(
                        f"{option} {description}: two keys for {accepted[key]}"
                    )
                tlsArguments[key] = _unescape(pair[1])
                continue
            if key == "endpoint" and kind == "tls" and not server:
                # tls:HOST:PORT:endpoint=E: TLS over the stream E, HOST
                # being the name to verify.
                tlsArguments[key] = _unescape(pair[1])
                continue
            kept.append(segment)
        plain = ":".join(kept)
        if "endpoint" in tlsArguments:
            plain = tlsArguments["endpoint"]
    try:
        parse: Any = (
            endpoints.serverFromString if server else endpoints.clientFromString
        )
        parse(reactor, plain)
    except Exception as e:
        # Twisted's parsers raise ValueError, TypeError, KeyError,
        # IndexError, and a plugin's parser whatever it likes.
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise usage.UsageError(
            f"{option} {description}: not a valid endpoint string ({detail})"
        ) from None
    host = None
    if not server and kind in ("tcp", *TLS_KINDS):
        positional = [
            _unescape(seg)
            for seg in segments[1:]
            if len(_splitUnescaped(seg, "=")) == 1
        ]
        named = {
            _unescape(pair[0]): _unescape(pair[1])
            for pair in (_splitUnescaped(seg, "=", 1) for seg in segments[1:])
            if len(pair) == 2
        }
        host = named.get("host", positional[0] if positional else None)
    return EndpointSpec(description, plain, tls, tlsArguments, host)


def describePolicy(policy: Optional[RotationPolicy]) -> str:
    """One line saying what *policy* does, for the start-up log."""
    if policy is None:
        return "no rotation by policy"
    parts = []
    if policy.interval is not None:
        jitter = f" (±{policy.jitter:.0%})" if policy.jitter else ""
        idle = ", skipped while idle" if policy.skip_idle else ""
        parts.append(f"every {policy.interval:g} s{jitter}{idle}")
    if policy.max_bytes is not None:
        parts.append(f"after {policy.max_bytes} bytes sent")
    if policy.request_peer_interval is not None:
        parts.append(f"asking the peer every {policy.request_peer_interval:g} s")
    if policy.aead_limit:
        parts.append("before the cipher's AEAD limit")
    return (
        "rotate keys "
        + ", ".join(parts)
        + f"; at least {policy.min_interval:g} s apart"
    )


def describePeer(address: IAddress) -> str:
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is None:
        return str(address)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def describeStats(protocol: RekeyProtocolMixin) -> str:
    stats = protocol.rekeyStats
    return (
        f"KeyUpdates sent {stats.keyUpdatesSent} "
        f"(requested {stats.keyUpdatesRequested}), "
        f"received {stats.keyUpdatesReceived}; "
        f"renegotiations {stats.renegotiations}; "
        f"bytes received {stats.bytesReceived}, sent {stats.bytesSent}"
    )


def describeReason(reason: Failure) -> str:
    """
    Why a connection ended, in one line: a clean close, the TLS alert or
    failure OpenSSL reported (``tlsv1 alert internal error``), or the error.
    """
    if reason.check(ConnectionDone):  # type: ignore[no-untyped-call]
        return "closed cleanly"
    value = reason.value
    if isinstance(value, SSL.Error) and value.args and isinstance(value.args[0], list):
        # [(library, function, reason), ...]: the reasons say what happened.
        reasons = [str(e[-1]) for e in value.args[0] if isinstance(e, tuple) and e]
        if reasons:
            return "TLS failure: " + "; ".join(reasons)
    message = reason.getErrorMessage()
    return f"{type(value).__name__}: {message}" if message else type(value).__name__


def describeTLS(transport: Any) -> str:
    getHandle = getattr(transport, "getHandle", None)
    conn = getHandle() if getHandle is not None else None
    version = getattr(conn, "get_protocol_version_name", None)
    cipher = getattr(conn, "get_cipher_name", None)
    if version is None or cipher is None:
        return "TLS"
    return f"{version()} {cipher()}"


# -- options ---------------------------------------------------------------------


class CommandLineOptions(usage.Options):
    """
    Options that report a usage error on one line of stderr and exit 1,
    instead of twistd's whole help text followed by the error.

    Subclasses set :attr:`commandName`.  :meth:`check` raises the
    :class:`~twisted.python.usage.UsageError` the one line is made of, for
    code that parses options itself.
    """

    commandName = "twistd"

    def parseOptions(self, options: Optional[list[str]] = None) -> None:
        try:
            super().parseOptions(options)  # type: ignore[no-untyped-call]
        except usage.UsageError as e:
            self.exit(str(e))

    def exit(self, message: str) -> NoReturn:
        sys.stderr.write(f"twistd {self.commandName}: error: {message}\n")
        sys.stderr.flush()
        raise SystemExit(1)

    def check(self, options: list[str]) -> None:
        """Parse *options*, raising :class:`usage.UsageError` on bad input."""
        usage.Options.parseOptions(self, options)  # type: ignore[no-untyped-call]


class RotationOptionsMixin(usage.Options):
    """``--interval``, ``--bytes``, ``--min-interval``, ``--request-peer``."""

    optParameters: list[Any] = [
        [
            "interval",
            None,
            str(DEFAULT_INTERVAL),
            "Seconds between timed key rotations (with jitter of 10%), or "
            "'off'.  A connection that sent nothing since its last rotation "
            "skips one.",
        ],
        [
            "bytes",
            None,
            None,
            "Also rotate after this many application bytes sent under one key "
            "(such as 1048576, 64K, 1M, 1GiB).",
        ],
        [
            "min-interval",
            None,
            str(DEFAULT_MIN_INTERVAL),
            "The least seconds between two rotations, whatever triggered them "
            "(GnuTLS drops a peer at the 9th KeyUpdate within one second).",
        ],
    ]
    optFlags: list[Any] = [
        [
            "request-peer",
            None,
            "At each timed rotation, also ask the peer to rotate its keys "
            "(TLS 1.3 KeyUpdate with update_requested).",
        ],
    ]

    def makePolicy(self) -> RotationPolicy:
        """The :class:`RotationPolicy` these options describe."""
        text = str(self["interval"]).strip()
        interval = (
            None
            if text.lower() in ("off", "none")
            else parseSeconds("--interval", text)
        )
        minInterval = parseSeconds("--min-interval", str(self["min-interval"]))
        maxBytes = None
        if self["bytes"] is not None:
            maxBytes = parseSize("--bytes", str(self["bytes"]))
        requestPeer = None
        if self["request-peer"]:
            if interval is None:
                raise usage.UsageError("--request-peer needs an --interval")
            requestPeer = interval
        if interval is not None and interval < minInterval:
            raise usage.UsageError(
                f"--interval {text} is shorter than --min-interval "
                f"{self['min-interval']}"
            )
        try:
            return RotationPolicy(
                interval=interval,
                max_bytes=maxBytes,
                min_interval=minInterval,
                request_peer_interval=requestPeer,
            )
        except (TypeError, ValueError) as e:
            raise usage.UsageError(str(e)) from None


class TLSVersionMixin(usage.Options):
    """``--tls-min`` and ``--tls-max``."""

    optParameters: list[Any] = [
        ["tls-min", None, "1.2", "The oldest TLS version allowed: 1.2 or 1.3."],
        ["tls-max", None, "1.3", "The newest TLS version allowed: 1.2 or 1.3."],
    ]

    def tlsVersions(self) -> dict[str, Any]:
        """``CertificateOptions`` arguments for the allowed versions."""
        lowest, highest = (str(self[k]).strip() for k in ("tls-min", "tls-max"))
        for name, value in (("--tls-min", lowest), ("--tls-max", highest)):
            if value not in _VERSIONS:
                raise usage.UsageError(f"{name} must be 1.2 or 1.3, not {value!r}")
        if float(lowest) > float(highest):
            raise usage.UsageError(
                f"--tls-min {lowest} is newer than --tls-max {highest}"
            )
        # Only the minimum goes through CertificateOptions: Twisted 23.10's
        # lowerMaximumSecurityTo excludes the maximum itself (twisted#10232),
        # so the maximum is set on the Context (limitMaximum).
        return {"raiseMinimumTo": _VERSIONS[lowest]}

    def limitMaximum(self, context: SSL.Context) -> None:
        """
        Cap a server's *context* at ``--tls-max``.  Call before the Context
        makes its first connection.
        """
        context.set_max_proto_version(_PROTOCOLS[str(self["tls-max"]).strip()])

    def limitClientMaximum(self, creator: Any) -> Any:
        """
        Cap the connections a client connection creator (from
        ``optionsForClientTLS``) makes at ``--tls-max``: each connection
        separately, since Twisted does not expose the creator's Context.

        :raises usage.UsageError: if the cap cannot be set in this build.
        """
        highest = _PROTOCOLS[str(self["tls-max"]).strip()]
        if highest == SSL.TLS1_3_VERSION:
            return creator  # the newest is what OpenSSL offers anyway
        ctrl = {r.name: r for r in capabilities().functions}["SSL_ctrl"]
        if not ctrl.available:
            raise usage.UsageError(
                f"--tls-max {self['tls-max']} on a TLS client side is not "
                f"possible here: {ctrl.reason}"
            )
        return _CappedClientCreator(creator, highest)


@implementer(IOpenSSLClientConnectionCreator)
class _CappedClientCreator:
    """Caps the newest TLS version of every connection another creator makes."""

    def __init__(self, inner: Any, highest: int) -> None:
        self._inner = inner
        self._highest = highest

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        conn: SSL.Connection = self._inner.clientConnectionForTLS(tlsProtocol)
        set_max_proto_version(conn, self._highest)
        return conn


@dataclass(frozen=True)
class ServerCertificate:
    """A checked certificate chain and its key, ready for a TLS server."""

    certPath: Path
    keyPath: Path
    chain: list[x509.Certificate]
    key: Any
    fingerprint: str
    default: Optional[DefaultCertificate]

    def options(self, versions: dict[str, Any]) -> CertificateOptions:
        """
        Twisted's server ``CertificateOptions`` with this certificate,
        accepting clients that offer ALPN on every Twisted.
        """
        options = CertificateOptions(
            privateKey=crypto.PKey.from_cryptography_key(self.key),
            certificate=crypto.X509.from_cryptography(self.chain[0]),
            extraCertChain=[crypto.X509.from_cryptography(c) for c in self.chain[1:]],
            **versions,
        )
        # These servers speak no ALPN protocol: a default curl must still
        # connect on Twisted 26.x.
        allowALPNWithoutProtocols(options)
        return options

    def logStartup(self, command: str) -> None:
        if self.default is not None:
            _log.info(
                "{command}: {state} self-signed certificate for localhost, "
                "127.0.0.1 and ::1: {cert} (SHA-256 fingerprint {fingerprint}); "
                "clients can trust it with that file",
                command=command,
                state="made a new" if self.default.created else "reusing the",
                cert=str(self.certPath),
                fingerprint=self.fingerprint,
            )
        else:
            _log.info(
                "{command}: certificate {cert} (SHA-256 fingerprint {fingerprint})",
                command=command,
                cert=str(self.certPath),
                fingerprint=self.fingerprint,
            )


class ServerCertificateMixin(usage.Options):
    """``--cert``, ``--key`` and ``--state-dir``, for a TLS server."""

    optParameters: list[Any] = [
        [
            "cert",
            None,
            None,
            "PEM certificate (chain) file.  Default: a self-signed certificate "
            "for localhost, made once and kept in the state directory.",
        ],
        ["key", None, None, "PEM private key file (default: with --cert's file)."],
        [
            "state-dir",
            None,
            None,
            "Where the default certificate is kept.  Default: "
            "$XDG_STATE_HOME/twisted-rekey or ~/.local/state/twisted-rekey.",
        ],
    ]

    def loadCertificate(self, fromEndpoint: dict[str, str]) -> ServerCertificate:
        """
        Read and check the certificate and key (``--cert``/``--key``, or
        ``certKey=``/``privateKey=`` of an ``ssl:`` string), or make the
        default one.
        """
        certOption, keyOption = "--cert", "--key"
        cert, key = self["cert"], self["key"]
        for option, endpointKey, value in (
            ("--cert", "certKey", cert),
            ("--key", "privateKey", key),
        ):
            if endpointKey in fromEndpoint and value is not None:
                raise usage.UsageError(
                    f"give {option} or {endpointKey}= in the endpoint string, not both"
                )
        if "privateKey" in fromEndpoint:
            # As Twisted's ssl: strings: privateKey= may hold the certificate
            # too, and certKey= defaults to it.
            keyOption, key = "privateKey=", fromEndpoint["privateKey"]
            certOption, cert = "certKey=", fromEndpoint.get("certKey", key)
            if "certKey" not in fromEndpoint:
                certOption = "privateKey="
        elif "certKey" in fromEndpoint:
            certOption, cert = "certKey=", fromEndpoint["certKey"]
        default = None
        if cert is None and key is None:
            stateDir = self["state-dir"]
            try:
                default = ensure_default_certificate(
                    None if stateDir is None else Path(stateDir)
                )
            except OSError as e:
                where = e.filename or stateDir
                raise usage.UsageError(
                    f"cannot keep the default certificate in {where}: {e.strerror or e}"
                ) from None
            cert, key = str(default.cert_path), str(default.key_path)
        elif cert is None:
            raise usage.UsageError(f"{keyOption} needs --cert too")
        elif key is None:
            key, keyOption = cert, certOption
        return checkCertificate(certOption, str(cert), keyOption, str(key), default)


def checkCertificate(
    certOption: str,
    certPath: str,
    keyOption: str,
    keyPath: str,
    default: Optional[DefaultCertificate],
) -> ServerCertificate:
    """
    Read the certificate chain and key named by the options, and check that
    they belong together, as OpenSSL does before serving.

    :raises usage.UsageError: one line naming the option at fault.
    """
    certData = _readable(certOption, certPath).read_bytes()
    keyData = _readable(keyOption, keyPath).read_bytes()
    try:
        chain = x509.load_pem_x509_certificates(certData)
    except ValueError:
        raise usage.UsageError(
            f"{certOption} {certPath}: no PEM certificate in this file"
        ) from None
    try:
        key = serialization.load_pem_private_key(keyData, None)
    except TypeError:
        raise usage.UsageError(
            f"{keyOption} {keyPath}: the private key is encrypted; "
            "give an unencrypted one"
        ) from None
    except ValueError:
        raise usage.UsageError(
            f"{keyOption} {keyPath}: no PEM private key in this file"
        ) from None
    except Exception as e:  # an unsupported algorithm
        raise usage.UsageError(f"{keyOption} {keyPath}: {e}") from None
    # The check OpenSSL itself makes before serving (SSL_CTX_check_private_key).
    context = SSL.Context(SSL.TLS_METHOD)
    try:
        try:
            # pyOpenSSL >= 24.3 takes cryptography's objects (and deprecates
            # its own); older releases take only its own.
            context.use_certificate(chain[0])
            context.use_privatekey(key)  # type: ignore[arg-type]
        except TypeError:
            context.use_certificate(crypto.X509.from_cryptography(chain[0]))
            context.use_privatekey(crypto.PKey.from_cryptography_key(key))  # type: ignore[arg-type]
        context.check_privatekey()
    except (SSL.Error, TypeError, ValueError):
        raise usage.UsageError(
            f"{keyOption} {keyPath} does not match the certificate in "
            f"{certOption} {certPath}"
        ) from None
    return ServerCertificate(
        Path(certPath), Path(keyPath), chain, key, fingerprint(chain[0]), default
    )


def loadCertificateAuthorities(option: str, path: str) -> list[x509.Certificate]:
    """
    The PEM certificates in *path* (a CA bundle).

    :raises usage.UsageError: one line, if the file cannot be read or holds
        no PEM certificate.
    """
    data = _readable(option, path).read_bytes()
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise usage.UsageError(
            f"{option} {path}: no PEM certificate in this file"
        ) from None


@dataclass(frozen=True)
class AllowList:
    """
    Which verified client certificates a TLS server accepts, by name, as
    ghostunnel's ``--allow-dns``, ``--allow-uri`` and ``--allow-cn``: a
    certificate is accepted when any one of its names is on a list (DNS
    names compared without case, URIs and common names exactly).  With all
    lists empty every certificate the CA issued is accepted.
    """

    dns: tuple[str, ...] = ()
    uri: tuple[str, ...] = ()
    cn: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.dns or self.uri or self.cn)

    def describe(self) -> str:
        """One line naming what is allowed, for the start-up log."""
        names = [f"DNS:{n}" for n in self.dns] + [f"URI:{n}" for n in self.uri]
        names += [f"CN={n}" for n in self.cn]
        return "allowed: " + ", ".join(names) if names else "any name"

    def refusal(self, certificate: x509.Certificate) -> Optional[str]:
        """``None`` if *certificate* is allowed, else why it is not."""
        if not self:
            return None
        try:
            san = certificate.extensions.get_extension_for_class(
                x509.SubjectAlternativeName
            ).value
            dns = san.get_values_for_type(x509.DNSName)
            uri = san.get_values_for_type(x509.UniformResourceIdentifier)
        except x509.ExtensionNotFound:
            dns, uri = [], []
        cn = [
            str(a.value)
            for a in certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        ]
        allowedDNS = {name.lower() for name in self.dns}
        if (
            any(name.lower() in allowedDNS for name in dns)
            or any(name in self.uri for name in uri)
            or any(name in self.cn for name in cn)
        ):
            return None
        names = [f"DNS:{n}" for n in dns] + [f"URI:{n}" for n in uri]
        names += [f"CN={n}" for n in cn]
        return (
            f"{certificate.subject.rfc4514_string() or 'an empty subject'} "
            f"({', '.join(names) or 'no names'}) is not on the allow-list"
        )


def requireClientCertificates(
    context: SSL.Context, authorities: list[x509.Certificate], allow: AllowList
) -> None:
    """
    Make a server *context* (not yet used) require a client certificate
    issued by one of *authorities* and allowed by *allow*.  The handshake of
    a client without one fails; why is kept on the connection, for
    :func:`clientRefusal`.
    """
    store = context.get_cert_store()
    assert store is not None
    for authority in authorities:
        cert = crypto.X509.from_cryptography(authority)
        store.add_cert(cert)
        # Named in the CertificateRequest, for clients holding several.
        context.add_client_ca(cert)

    def verify(
        conn: SSL.Connection, cert: crypto.X509, errnum: int, depth: int, ok: int
    ) -> bool:
        # Inside OpenSSL: never raise (pyOpenSSL would re-raise it from the
        # handshake as if it were the peer's fault).
        try:
            if not ok:
                reason = verify_cert_error_string(errnum)
                conn.rekeyRefusal = (  # type: ignore[attr-defined]
                    f"certificate verification failed at depth {depth}: "
                    f"{reason} "
                    f"({cert.to_cryptography().subject.rfc4514_string()})"
                )
                return False
            if depth != 0:
                return True
            refusal = allow.refusal(cert.to_cryptography())
            if refusal is not None:
                conn.rekeyRefusal = refusal  # type: ignore[attr-defined]
                return False
            return True
        except Exception as e:
            conn.rekeyRefusal = f"the certificate could not be read: {e}"  # type: ignore[attr-defined]
            return False

    context.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, verify)
    # A client resuming a session on a context that verifies peers needs
    # one (OpenSSL refuses the resumption otherwise).
    context.set_session_id(b"twisted-rekey")


def clientRefusal(conn: Any) -> Optional[str]:
    """Why :func:`requireClientCertificates` refused *conn*'s client, if it did."""
    return getattr(conn, "rekeyRefusal", None)


@implementer(IOpenSSLServerConnectionCreator)
class ReloadableServerTLS:
    """
    A server connection creator whose TLS configuration can be replaced
    while it serves: each new connection is made by the configuration in
    force (a ``CertificateOptions``, or anything with ``getContext``), the
    connections already made keep theirs.  (A Context cannot be changed
    once used: pyOpenSSL 26 refuses; so a new one is made each time.)
    """

    def __init__(self, options: Any) -> None:
        self.current = options

    def replace(self, options: Any) -> None:
        """New connections use *options* from now on."""
        self.current = options

    def getContext(self) -> SSL.Context:
        """The Context of the configuration in force."""
        return cast(SSL.Context, self.current.getContext())

    def serverConnectionForTLS(self, protocol: Any) -> SSL.Connection:
        current = self.current
        if IOpenSSLServerConnectionCreator.providedBy(current):
            # Twisted >= 24: per connection (ALPN from the protocol).
            return cast(SSL.Connection, current.serverConnectionForTLS(protocol))
        return SSL.Connection(current.getContext(), None)


# -- the listening service -------------------------------------------------------


class ListeningService(service.Service):
    """
    Listens on an endpoint when twistd starts it, logs where, and turns a
    failure to listen (a port in use, an address not here, no permission)
    into one line on stderr and exit status 1, instead of a traceback.

    Listening happens in :meth:`privilegedStartService`, before twistd
    drops privileges, as ``strports.service`` does; the error is raised
    there, so twistd stops before the reactor runs and removes its pid file.
    """

    def __init__(
        self,
        command: str,
        description: str,
        endpoint: Any,
        factory: Any,
        what: str,
    ) -> None:
        self.command = command
        self.description = description
        self.endpoint = endpoint
        self.factory = factory
        self.what = what
        # Any: Twisted's interfaces declare their methods without self.
        self.port: Any = None
        self._listening: Optional[Deferred[Any]] = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()  # type: ignore[no-untyped-call]
        self._listen()

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        if self._listening is None:
            self._listen()

    def _listen(self) -> None:
        outcome: list[Any] = []
        self._listening = self.endpoint.listen(self.factory)
        self._listening.addBoth(outcome.append)
        if not outcome:
            # Endpoints that listen later (systemd:, some plugins): report
            # when they do.
            self._listening.addCallback(self._listened)
            self._listening.addErrback(self._failedLater)
            return
        result = outcome[0]
        if isinstance(result, Exception) or hasattr(result, "value"):
            reason = getattr(result, "value", result)
            raise ListenFailed(self._describe(reason))
        self._listened(result)

    def _listened(self, port: Any) -> Any:
        self.port = port
        host = port.getHost()
        address = getattr(host, "host", None)
        where = (
            f"[{address}]:{host.port}"  # type: ignore[attr-defined]
            if address is not None and ":" in address
            else (
                f"{address}:{host.port}"  # type: ignore[attr-defined]
                if address is not None
                else str(host)
            )
        )
        _log.info(
            "{command}: listening on {where} ({what}; from {description})",
            command=self.command,
            where=where,
            what=self.what,
            description=self.description,
        )
        return port

    def _failedLater(self, failure: Any) -> None:
        _log.error(
            "{command}: {message}",
            command=self.command,
            message=self._describe(failure.value),
        )
        from twisted.internet import reactor

        cast(Any, reactor).stop()

    def _describe(self, reason: BaseException) -> str:
        if isinstance(reason, error.CannotListenError):
            cause = reason.socketError
            detail = getattr(cause, "strerror", None) or str(cause)
            return f"cannot listen on {self.description}: {detail}"
        return f"cannot listen on {self.description}: {reason}"

    def stopService(self) -> Optional[Deferred[None]]:  # type: ignore[override]
        super().stopService()  # type: ignore[no-untyped-call]
        listening, self._listening = self._listening, None
        if listening is None:
            return None
        listening.cancel()
        port, self.port = self.port, None
        if port is not None:
            return cast("Optional[Deferred[None]]", port.stopListening())
        return None


class ListenFailed(Exception):
    """
    Raised out of twistd's start-up when a service cannot listen; the
    plugins' excepthook prints it as one line.
    """


def installOneLineErrors(command: str) -> None:
    """
    Print a :class:`ListenFailed` escaping twistd as one line on stderr
    (exit status 1, the same as a traceback), every other exception as
    before.
    """
    previous: Callable[..., Any] = sys.excepthook

    def hook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
        if isinstance(value, ListenFailed):
            stream = sys.__stderr__ or sys.stderr
            stream.write(f"twistd {command}: error: {value}\n")
            stream.flush()
            return
        previous(kind, value, tb)

    sys.excepthook = hook


# -- the plugins' --metrics ------------------------------------------------------


class MetricsOptionsMixin(usage.Options):
    """``--metrics ENDPOINT``: serve Prometheus metrics over HTTP there."""

    optParameters: list[Any] = [
        [
            "metrics",
            None,
            None,
            "Serve Prometheus metrics (plain HTTP, /metrics) on this server "
            "endpoint string, such as tcp:9464:interface=127.0.0.1; needs "
            "prometheus_client (the 'metrics' extra).",
        ],
    ]

    def checkMetrics(self) -> None:
        """Check ``--metrics``; call from ``postOptions``."""
        self["metricsSpec"] = None
        if self["metrics"] is None:
            return
        spec = parseEndpoint("--metrics", self["metrics"], server=True)
        if spec.tls:
            raise usage.UsageError(
                f"--metrics {spec.description}: metrics are served over plain "
                "HTTP: give a tcp: (or unix:) endpoint, on loopback or behind "
                "a firewall"
            )
        try:
            import prometheus_client  # noqa: F401
        except ImportError:
            raise usage.UsageError(
                "--metrics needs prometheus_client: pip install "
                "'twisted_rekey[metrics]'"
            ) from None
        self["metricsSpec"] = spec

    def makeMetrics(self) -> Optional[RekeyMetrics]:
        """A collector observing the log, if ``--metrics`` was given."""
        if self["metricsSpec"] is None:
            return None
        metrics = RekeyMetrics()
        metrics.startObserving()
        return metrics


def metricsService(command: str, spec: Any, metrics: RekeyMetrics) -> service.IService:
    """A service serving *metrics* at ``/metrics`` on *spec*'s endpoint."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.twisted import MetricsResource
    from twisted.internet import endpoints, reactor
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    registry = CollectorRegistry(auto_describe=False)
    registry.register(metrics)  # type: ignore[arg-type]
    # Any: twisted.web is not typed.
    root: Any = Resource
    root = root()
    makeResource: Any = MetricsResource
    root.putChild(b"metrics", makeResource(registry=registry))
    makeSite: Any = Site
    site = makeSite(root)
    site.noisy = False

    def noAccessLog(request: Any) -> None:
        # Not a line in the twistd log for every scrape (every 15 s, say).
        return None

    site.log = noAccessLog
    parse: Any = endpoints.serverFromString
    listening: Any = ListeningService(
        command,
        spec.description,
        parse(reactor, spec.plain),
        site,
        "Prometheus metrics",
    )
    return cast(service.IService, listening)
