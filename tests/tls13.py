"""
Wire-level proof toolkit for TLS 1.3: decrypt captured records with logged secrets.

A KeyUpdate changes nothing an application can observe, so the only honest
proof that one happened is on the wire: the records that follow it must be
encrypted under the *next* traffic secret (RFC 8446 §7.2).  This module turns a
captured byte stream plus a key log (NSS format, as written by
``SSLKEYLOGFILE``, ``ssl.SSLContext.keylog_filename``, ``openssl -keylogfile``
or pyOpenSSL's ``Context.set_keylog_callback``) into plaintext, so a test can
check which secret each record was encrypted with.

It is test code: it must never be imported by the library, never be used to
protect anything, and it knows only the three TLS 1.3 AEAD cipher suites that
OpenSSL enables by default.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

__all__ = [
    "CIPHER_SUITES",
    "CONTENT_ALERT",
    "CONTENT_APPLICATION_DATA",
    "CONTENT_CHANGE_CIPHER_SPEC",
    "CONTENT_HANDSHAKE",
    "HANDSHAKE_KEY_UPDATE",
    "CipherSuite",
    "DecryptedRecord",
    "DecryptionError",
    "KeyLog",
    "Record",
    "TrafficKeys",
    "cipher_suite",
    "decrypt_record",
    "decrypt_stream",
    "derive_key_iv",
    "hkdf_expand_label",
    "key_updates_in",
    "next_traffic_secret",
    "parse_key_log",
    "parse_records",
    "read_key_log",
]

CONTENT_CHANGE_CIPHER_SPEC = 20
CONTENT_ALERT = 21
CONTENT_HANDSHAKE = 22
CONTENT_APPLICATION_DATA = 23

HANDSHAKE_KEY_UPDATE = 24

_RECORD_HEADER = 5
# RFC 8446 §5.2: 2^14 bytes of plaintext + 256 of expansion.
_MAX_CIPHERTEXT = 2**14 + 256


@dataclass(frozen=True)
class CipherSuite:
    """
    What record protection needs to know about a TLS 1.3 cipher suite.

    :ivar name: IANA name, as Python's ``ssl`` and OpenSSL report it.
    :ivar code: the two-byte IANA code point.
    :ivar hash: the suite's transcript/HKDF hash.
    :ivar key_length: AEAD key length in bytes.
    :ivar aead: the ``cryptography`` AEAD class.
    """

    name: str
    code: int
    hash: hashes.HashAlgorithm
    key_length: int
    aead: type[AESGCM] | type[ChaCha20Poly1305]

    iv_length = 12
    tag_length = 16


CIPHER_SUITES: dict[str, CipherSuite] = {
    suite.name: suite
    for suite in (
        CipherSuite("TLS_AES_128_GCM_SHA256", 0x1301, hashes.SHA256(), 16, AESGCM),
        CipherSuite("TLS_AES_256_GCM_SHA384", 0x1302, hashes.SHA384(), 32, AESGCM),
        CipherSuite(
            "TLS_CHACHA20_POLY1305_SHA256",
            0x1303,
            hashes.SHA256(),
            32,
            ChaCha20Poly1305,
        ),
    )
}


def cipher_suite(suite: str | int | CipherSuite) -> CipherSuite:
    """
    Look a cipher suite up by IANA name or code point.

    :raises KeyError: for anything but the three TLS 1.3 AEAD suites above.
    """
    if isinstance(suite, CipherSuite):
        return suite
    if isinstance(suite, int):
        for candidate in CIPHER_SUITES.values():
            if candidate.code == suite:
                return candidate
        raise KeyError(f"unknown TLS 1.3 cipher suite 0x{suite:04x}")
    return CIPHER_SUITES[suite]


# -- records -----------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    """
    One TLS record as it was on the wire.

    :ivar content_type: the outer type (23 for every protected TLS 1.3 record).
    :ivar version: legacy_record_version (0x0303 in TLS 1.3, 0x0301 is allowed
        on the very first ClientHello).
    :ivar payload: the fragment, still encrypted when protected.
    :ivar offset: where the record header starts in the captured stream.
    """

    content_type: int
    version: int
    payload: bytes
    offset: int

    @property
    def header(self) -> bytes:
        """The 5-byte header, which is the AEAD additional data in TLS 1.3."""
        return (
            bytes([self.content_type])
            + self.version.to_bytes(2, "big")
            + len(self.payload).to_bytes(2, "big")
        )

    @property
    def raw(self) -> bytes:
        return self.header + self.payload


def parse_records(data: bytes) -> tuple[list[Record], bytes]:
    """
    Split a captured byte stream into TLS records.

    A capture taken mid-stream usually ends inside a record: that partial
    record is not an error, it is returned as the second item so the caller
    can prepend it to the next chunk.

    :param data: bytes one side wrote, starting at a record boundary.
    :returns: ``(records, leftover)``.
    :raises ValueError: if a header is not a TLS record header at all (the
        stream is not at a record boundary, or is not TLS).
    """
    records = []
    offset = 0
    view = memoryview(data)
    while len(data) - offset >= _RECORD_HEADER:
        content_type = data[offset]
        version = int.from_bytes(data[offset + 1 : offset + 3], "big")
        length = int.from_bytes(data[offset + 3 : offset + 5], "big")
        if content_type not in (20, 21, 22, 23, 24) or version >> 8 != 3:
            raise ValueError(
                f"no TLS record header at offset {offset}: "
                f"{bytes(data[offset : offset + 5]).hex()}"
            )
        if length > _MAX_CIPHERTEXT:
            raise ValueError(f"record at offset {offset} is too long: {length}")
        end = offset + _RECORD_HEADER + length
        if end > len(data):
            break
        records.append(
            Record(content_type, version, bytes(view[offset + 5 : end]), offset)
        )
        offset = end
    return records, bytes(data[offset:])


# -- key schedule ------------------------------------------------------------


def hkdf_expand_label(
    secret: bytes,
    label: bytes | str,
    context: bytes,
    length: int,
    hash: hashes.HashAlgorithm,
) -> bytes:
    """
    HKDF-Expand-Label of RFC 8446 §7.1.

    :param label: without the ``"tls13 "`` prefix, which is added here.
    """
    if isinstance(label, str):
        label = label.encode("ascii")
    full_label = b"tls13 " + label
    hkdf_label = (
        length.to_bytes(2, "big")
        + bytes([len(full_label)])
        + full_label
        + bytes([len(context)])
        + context
    )
    return HKDFExpand(algorithm=hash, length=length, info=hkdf_label).derive(secret)


@dataclass(frozen=True)
class TrafficKeys:
    """Record-protection key and IV derived from one traffic secret."""

    key: bytes
    iv: bytes


def derive_key_iv(secret: bytes, suite: str | int | CipherSuite) -> TrafficKeys:
    """The ``[sender]_write_key`` and ``_iv`` of RFC 8446 §7.3."""
    s = cipher_suite(suite)
    return TrafficKeys(
        key=hkdf_expand_label(secret, "key", b"", s.key_length, s.hash),
        iv=hkdf_expand_label(secret, "iv", b"", s.iv_length, s.hash),
    )


def next_traffic_secret(
    secret: bytes, hash: hashes.HashAlgorithm | str | int | CipherSuite
) -> bytes:
    """
    ``application_traffic_secret_N+1`` of RFC 8446 §7.2: what a KeyUpdate
    switches the sender's direction to.

    :param hash: the suite's hash, or the suite itself.
    """
    if not isinstance(hash, hashes.HashAlgorithm):
        hash = cipher_suite(hash).hash
    return hkdf_expand_label(secret, "traffic upd", b"", hash.digest_size, hash)


# -- record protection -------------------------------------------------------


class DecryptionError(ValueError):
    """A record did not authenticate under the key and sequence number tried."""


@dataclass(frozen=True)
class DecryptedRecord:
    """
    A protected record opened.

    :ivar content_type: the real (inner) content type.
    :ivar plaintext: the content, padding removed.
    :ivar seq: the sequence number it decrypted at.
    :ivar generation: which traffic secret opened it: 0 for
        ``*_TRAFFIC_SECRET_0``, 1 after the first KeyUpdate, and so on.
    :ivar record: the record as captured.
    """

    content_type: int
    plaintext: bytes
    seq: int
    generation: int
    record: Record


def decrypt_record(
    record: Record | bytes,
    keys: TrafficKeys,
    seq: int,
    suite: str | int | CipherSuite,
) -> tuple[int, bytes]:
    """
    Open one TLS 1.3 protected record (RFC 8446 §5.2-5.4).

    :param record: a parsed record, or the raw bytes of exactly one record.
    :returns: ``(inner content type, plaintext without padding)``.
    :raises DecryptionError: if authentication fails (wrong key, wrong
        sequence number, tampered bytes) or the plaintext is all padding.
    """
    if isinstance(record, (bytes, bytearray, memoryview)):
        records, rest = parse_records(bytes(record))
        if len(records) != 1 or rest:
            raise ValueError("expected the bytes of exactly one record")
        record = records[0]
    s = cipher_suite(suite)
    nonce = bytes(a ^ b for a, b in zip(keys.iv, seq.to_bytes(s.iv_length, "big")))
    try:
        inner = s.aead(keys.key).decrypt(nonce, record.payload, record.header)
    except InvalidTag:
        raise DecryptionError(
            f"record at offset {record.offset} does not authenticate at seq {seq}"
        ) from None
    stripped = inner.rstrip(b"\x00")
    if not stripped:
        raise DecryptionError(f"record at offset {record.offset} is all padding")
    return stripped[-1], stripped[:-1]


def decrypt_stream(
    data: bytes | Iterable[Record],
    secret: bytes,
    suite: str | int | CipherSuite,
    *,
    max_key_updates: int = 64,
) -> list[DecryptedRecord]:
    """
    Decrypt the application-traffic records of one direction of a TLS 1.3
    connection, following KeyUpdates.

    The capture may start at the connection's first byte: the records before
    the first one that opens under ``secret`` at sequence number 0 (the
    plaintext hellos, the compatibility ChangeCipherSpec and the records under
    the handshake secret) are skipped.  From there every protected record must
    open at the next sequence number; a KeyUpdate in the plaintext switches to
    :func:`next_traffic_secret` and sequence number 0, exactly as the receiver
    does.

    :param data: bytes one side wrote, or records already parsed.
    :param secret: that side's ``*_TRAFFIC_SECRET_0`` from the key log.
    :returns: every record from the first application-traffic one on.
    :raises DecryptionError: if no record opens under ``secret``, or a later
        record does not open where the key schedule says it must: the proof
        fails rather than skipping it.
    """
    s = cipher_suite(suite)
    if isinstance(data, (bytes, bytearray, memoryview)):
        records, _ = parse_records(bytes(data))
    else:
        records = list(data)
    keys = derive_key_iv(secret, s)
    it = iter(records)
    out: list[DecryptedRecord] = []
    for record in it:
        if record.content_type != CONTENT_APPLICATION_DATA:
            continue
        try:
            content_type, plaintext = decrypt_record(record, keys, 0, s)
        except DecryptionError:
            continue
        out.append(DecryptedRecord(content_type, plaintext, 0, 0, record))
        break
    else:
        raise DecryptionError(
            f"none of {len(records)} records opens under the given secret"
        )

    generation = 0
    seq = 1
    if _ends_with_key_update(out[-1]):
        secret, generation, seq = next_traffic_secret(secret, s.hash), 1, 0
        keys = derive_key_iv(secret, s)
    for record in it:
        if record.content_type == CONTENT_CHANGE_CIPHER_SPEC:
            continue
        if record.content_type != CONTENT_APPLICATION_DATA:
            raise DecryptionError(
                f"unprotected record of type {record.content_type} at offset "
                f"{record.offset} after the handshake"
            )
        content_type, plaintext = decrypt_record(record, keys, seq, s)
        decrypted = DecryptedRecord(content_type, plaintext, seq, generation, record)
        out.append(decrypted)
        seq += 1
        if _ends_with_key_update(decrypted):
            if generation >= max_key_updates:
                raise DecryptionError(f"more than {max_key_updates} KeyUpdates")
            secret = next_traffic_secret(secret, s.hash)
            keys = derive_key_iv(secret, s)
            generation += 1
            seq = 0
    return out


def _handshake_messages(plaintext: bytes) -> Iterator[tuple[int, bytes]]:
    offset = 0
    while len(plaintext) - offset >= 4:
        msg_type = plaintext[offset]
        length = int.from_bytes(plaintext[offset + 1 : offset + 4], "big")
        yield msg_type, plaintext[offset + 4 : offset + 4 + length]
        offset += 4 + length


def key_updates_in(record: DecryptedRecord) -> list[bool]:
    """
    The KeyUpdate messages in a decrypted record.

    :returns: one ``update_requested`` flag per KeyUpdate, in order.
    """
    if record.content_type != CONTENT_HANDSHAKE:
        return []
    return [
        body == b"\x01"
        for msg_type, body in _handshake_messages(record.plaintext)
        if msg_type == HANDSHAKE_KEY_UPDATE
    ]


def _ends_with_key_update(record: DecryptedRecord) -> bool:
    # RFC 8446 §5.1: a KeyUpdate must be the last message in its record, so
    # the key changes exactly at the next record.
    return bool(key_updates_in(record))


# -- key log -----------------------------------------------------------------

_KEYLOG_LINE = re.compile(r"^([A-Z0-9_]+) ([0-9a-fA-F]{64}) ([0-9a-fA-F]+)$")


@dataclass
class KeyLog:
    """
    Secrets of an NSS key log, by client random.

    ``secrets[client_random][label]`` is the secret for a label such as
    ``CLIENT_TRAFFIC_SECRET_0`` or ``SERVER_HANDSHAKE_TRAFFIC_SECRET``.
    """

    secrets: dict[bytes, dict[str, bytes]]

    def connection(self, client_random: bytes | None = None) -> dict[str, bytes]:
        """
        The secrets of one connection.

        :param client_random: which one; may be left out when the log holds
            exactly one connection.
        :raises KeyError: if it is not in the log, or the log holds several
            connections and none was named.
        """
        if client_random is None:
            if len(self.secrets) != 1:
                raise KeyError(
                    f"the key log holds {len(self.secrets)} connections: "
                    "name one by client random"
                )
            return next(iter(self.secrets.values()))
        return self.secrets[client_random]

    def client_traffic_secret(self, client_random: bytes | None = None) -> bytes:
        return self.connection(client_random)["CLIENT_TRAFFIC_SECRET_0"]

    def server_traffic_secret(self, client_random: bytes | None = None) -> bytes:
        return self.connection(client_random)["SERVER_TRAFFIC_SECRET_0"]


def parse_key_log(text: str | bytes) -> KeyLog:
    """
    Parse the text of an NSS key log.

    Comment lines, blank lines and a truncated last line (the writer may still
    be appending) are ignored; every label is kept.
    """
    if isinstance(text, bytes):
        text = text.decode("ascii", "replace")
    secrets: dict[bytes, dict[str, bytes]] = {}
    for line in text.splitlines():
        match = _KEYLOG_LINE.match(line.strip())
        if match is None or len(match.group(3)) % 2:
            continue
        label, client_random, secret = match.groups()
        secrets.setdefault(bytes.fromhex(client_random), {})[label] = bytes.fromhex(
            secret
        )
    return KeyLog(secrets)


def read_key_log(path: str | os.PathLike[str]) -> KeyLog:
    """Parse the NSS key log file at *path*."""
    with open(path, "rb") as f:
        return parse_key_log(f.read())
