"""
The self-signed certificate the twistd plugins use when given none: one for
``localhost``, ``127.0.0.1`` and ``::1``, made with cryptography, kept in a
per-user state directory and reused while it is valid.

This module must never write anywhere but the state directory it is given
(or the per-user default), never leave a private key readable by others, and
never import Twisted or pyOpenSSL: the services load the files it returns.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "DefaultCertificate",
    "default_state_dir",
    "ensure_default_certificate",
    "fingerprint",
]

_CERT_NAME = "localhost.pem"
_KEY_NAME = "localhost-key.pem"
_NAMES = ("localhost",)
_ADDRESSES = ("127.0.0.1", "::1")
_LIFETIME = datetime.timedelta(days=365)
# Renew a certificate that would expire within this margin, so that a server
# started now does not present an expired one before it is restarted.
_RENEW_BEFORE = datetime.timedelta(days=7)


@dataclass(frozen=True)
class DefaultCertificate:
    """
    The default certificate's files, and whether this call made them.

    :ivar cert_path: the PEM certificate (also the file a client trusts).
    :ivar key_path: the PEM private key, readable by its owner only.
    :ivar fingerprint: SHA-256 of the certificate, colon-separated hex.
    :ivar created: ``True`` when a new certificate was written, ``False``
        when a valid one was reused.
    """

    cert_path: Path
    key_path: Path
    fingerprint: str
    created: bool


def default_state_dir() -> Path:
    """
    ``$XDG_STATE_HOME/twisted-rekey``, or ``~/.local/state/twisted-rekey``.
    """
    base = os.environ.get("XDG_STATE_HOME")
    if not base or not os.path.isabs(base):
        # The XDG spec says to ignore a relative value.
        base = os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "twisted-rekey"


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER certificate, as ``AB:CD:...`` (as openssl prints it)."""
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def _usable(cert_path: Path, key_path: Path, now: datetime.datetime) -> str | None:
    """The fingerprint of a reusable certificate there, else ``None``."""
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    except (OSError, ValueError, TypeError):
        return None
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    encoding = serialization.Encoding.DER
    if key.public_key().public_bytes(
        encoding, public
    ) != cert.public_key().public_bytes(encoding, public):
        return None
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc - _RENEW_BEFORE:
        return None
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return None
    names = set(san.value.get_values_for_type(x509.DNSName))
    addresses = {str(a) for a in san.value.get_values_for_type(x509.IPAddress)}
    if not (set(_NAMES) <= names and set(_ADDRESSES) <= addresses):
        return None
    return fingerprint(cert)


def _make(
    now: datetime.datetime,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "twisted-rekey"),
            x509.NameAttribute(NameOID.COMMON_NAME, "localhost"),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + _LIFETIME)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(n) for n in _NAMES]
                + [x509.IPAddress(ipaddress.ip_address(a)) for a in _ADDRESSES]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _write(path: Path, data: bytes, mode: int) -> None:
    # Write beside the target and rename, so that a concurrent reader never
    # sees half a file and the key is never readable by others, not even
    # for an instant.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def ensure_default_certificate(state_dir: Path | None = None) -> DefaultCertificate:
    """
    The default certificate and key in *state_dir*: reused when both files
    are there, match, name ``localhost``, ``127.0.0.1`` and ``::1``, and stay
    valid for at least another week; made afresh (valid one year) otherwise.

    :param state_dir: where to keep them; :func:`default_state_dir` when
        ``None``.  Created (mode 0700) if missing.
    :raises OSError: if the directory or the files cannot be written.
    """
    where = default_state_dir() if state_dir is None else Path(state_dir)
    where.mkdir(mode=0o700, parents=True, exist_ok=True)
    cert_path = where / _CERT_NAME
    key_path = where / _KEY_NAME
    now = datetime.datetime.now(datetime.timezone.utc)
    reused = _usable(cert_path, key_path, now)
    if reused is not None:
        return DefaultCertificate(cert_path, key_path, reused, created=False)
    cert, key = _make(now)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # The key first: a certificate is never on disk without its key.
    _write(key_path, key_pem, 0o600)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return DefaultCertificate(cert_path, key_path, fingerprint(cert), created=True)
