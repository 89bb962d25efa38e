"""
TLS peers on Go's ``crypto/tls``, Java's JSSE and Node's ``tls``, for tests.

The drivers live in ``tests/drivers/`` (``tls_peer.go``, ``TlsPeer.java``,
``tls_peer.js``); this module builds them when first needed (``go build``,
``javac``) into a cache directory keyed by the source's digest, and runs them
as :class:`peers.PeerProcess` subprocesses: stopped by their process group id,
every wait bounded.  A missing toolchain skips the test locally and fails it
when ``CI`` is set (:func:`peers.require_tool`).

All three drivers take the same options and print the same lines::

    READY port=N                         server: listening on 127.0.0.1:N
    HANDSHAKE n=N version=V ...          a completed handshake; n > 1 is a
                                         renegotiation (Go and Node: seen
                                         from their key log lines; Java:
                                         HandshakeCompletedListener)
    REKEY n=N                            Java/Node: the driver itself
                                         renegotiated (Java on TLS 1.3: sent
                                         a KeyUpdate)
    CLOSED n=N bytes=N sha256=HEX        server: a connection's echo ended
    RESULT bytes=N sha256=HEX match=B    client: the echo, checked

and ``ERROR ...`` then exit status 1 on any failure.  The server echoes; the
client streams *nbytes* random bytes in *chunk*-sized writes (paced if asked)
while it reads the echo, and compares SHA-256 digests.

None of these stacks tells its application about a TLS 1.3 KeyUpdate it
received: a test proves those from our side's statistics plus the data that
still flows, or uses the OpenSSL/GnuTLS CLIs of :mod:`peers`, which print them.

This module must never be imported by the library, never listen anywhere but
loopback, and never leave a process behind.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from peers import (
    DEFAULT_TIMEOUT,
    CertFiles,
    PeerProcess,
    _check_loopback,
    require_tool,
)

__all__ = [
    "STACKS",
    "ForeignPeer",
    "Result",
    "driver_command",
]

#: The stacks with a driver here.
STACKS = ("go", "java", "node")

DRIVERS = Path(__file__).parent / "drivers"

_SOURCES = {
    "go": DRIVERS / "tls_peer.go",
    "java": DRIVERS / "TlsPeer.java",
    "node": DRIVERS / "tls_peer.js",
}

#: Building one driver: the first ``go build`` compiles the standard library.
BUILD_TIMEOUT = 300.0

HANDSHAKE = r"^HANDSHAKE n=(?P<n>\d+) version=(?P<version>\S+)"
READY = r"^READY port=(?P<port>\d+)$"
RESULT = (
    r"^RESULT bytes=(?P<bytes>\d+) sha256=(?P<sha256>[0-9a-f]{64})"
    r" match=(?P<match>\w+)"
)
CLOSED = r"^CLOSED n=(?P<n>\d+) bytes=(?P<bytes>\d+) sha256=(?P<sha256>[0-9a-f]{64})"
REKEY = r"^REKEY n=(?P<n>\d+)"
ERROR = r"^ERROR (?P<error>.*)$"


def _cache_dir() -> Path:
    root = os.environ.get("TWISTED_REKEY_DRIVER_CACHE")
    if root:
        path = Path(root)
    else:
        path = Path(tempfile.gettempdir()) / f"twisted-rekey-drivers-{os.getuid()}"
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def _built(stack: str, build: Sequence[str], product: str, env: dict[str, str]) -> Path:
    """Run *build* once per source digest, in a directory of its own."""
    source = _SOURCES[stack]
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:16]
    directory = _cache_dir() / f"{stack}-{digest}"
    target = directory / product
    lock = _cache_dir() / f"{stack}.lock"
    # Several pytest processes may build at once.
    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        if not target.exists():
            directory.mkdir(exist_ok=True)
            argv = [part.format(out=directory, src=source) for part in build]
            done = subprocess.run(
                argv,
                env=env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=BUILD_TIMEOUT,
                cwd=DRIVERS,
            )
            if done.returncode != 0:
                raise RuntimeError(
                    f"building the {stack} driver failed ({' '.join(argv)}):\n"
                    f"{done.stdout}{done.stderr}"
                )
    return target


def _go_env(cache: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        # Offline, as root, on a fresh machine with neither HOME nor a C
        # compiler: no module download, no cgo, caches in our directory.
        GOCACHE=str(cache / "gocache"),
        GOPATH=str(cache / "gopath"),
        GO111MODULE="off",
        GOFLAGS="",
        GOPROXY="off",
        GOTOOLCHAIN="local",
        CGO_ENABLED="0",
    )
    return env


def _pkcs8(key: Path) -> Path:
    """The key as PKCS#8 PEM, which JSSE reads (trustme writes SEC 1)."""
    from cryptography.hazmat.primitives import serialization

    target = key.with_suffix(".pk8")
    if not target.exists():
        loaded = serialization.load_pem_private_key(key.read_bytes(), None)
        target.write_bytes(
            loaded.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return target


def driver_command(stack: str) -> list[str]:
    """
    The command that runs *stack*'s driver, building it first if needed.

    Skips (or fails, under ``CI``) when the toolchain is missing.
    """
    if stack == "go":
        go = require_tool("go")
        binary = _built(
            "go",
            [go, "build", "-o", "{out}/tls_peer", "{src}"],
            "tls_peer",
            _go_env(_cache_dir()),
        )
        return [str(binary)]
    if stack == "java":
        javac = require_tool("javac")
        java = require_tool("java")
        classes = _built(
            "java",
            [javac, "-d", "{out}", "{src}"],
            "TlsPeer.class",
            dict(os.environ),
        )
        # Two threads of JIT are plenty for a driver on a small machine.
        return [java, "-XX:TieredStopAtLevel=1", "-cp", str(classes.parent), "TlsPeer"]
    if stack == "node":
        return [require_tool("node"), str(_SOURCES["node"])]
    raise ValueError(f"stack must be one of {STACKS}, not {stack!r}")


@dataclass(frozen=True)
class Result:
    """What a client driver checked: bytes echoed and their digest."""

    nbytes: int
    sha256: str


class ForeignPeer(PeerProcess):
    """
    One driver process: an echo server or a streaming client.

    :param stack: ``"go"``, ``"java"`` or ``"node"``.
    :param role: ``"server"`` (binds 127.0.0.1 port 0; :attr:`port` is set
        once it is listening) or ``"client"`` (connects to *port*).
    :param certs: from :func:`peers.make_cert_files`: a server presents
        ``server_cert``; a client trusts ``ca_cert`` and checks the name
        ``localhost``.
    :param tls_min: ``"1.2"`` or ``"1.3"``.
    :param tls_max: ``"1.2"`` or ``"1.3"``.
    :param nbytes: what a client streams.
    :param chunk: bytes per client write.
    :param pace: seconds between client writes (0: as fast as it can).
    :param accept: connections a server serves before exiting.
    :param renegotiate: Go client: ``"never"``, ``"once"`` or ``"freely"``
        (``tls.Config.Renegotiation``; Go refuses renegotiation by default).
    :param lockstep: Java client: write a chunk, read all of its echo, and
        only then pause for *pace* (one thread; by default a writer thread
        streams while the main thread reads).
    :param rekey_every: Java/Node: start a renegotiation (Java on TLS 1.3: a
        KeyUpdate) every so many seconds.
    :param timeout: the driver gives up (error, exit 1) after this long.
    """

    def __init__(
        self,
        stack: str,
        role: str,
        certs: CertFiles,
        *,
        port: int = 0,
        host: str = "127.0.0.1",
        tls_min: str = "1.2",
        tls_max: str = "1.3",
        nbytes: int = 1 << 20,
        chunk: int = 16384,
        pace: float = 0.0,
        accept: int = 1,
        renegotiate: str | None = None,
        rekey_every: float | None = None,
        lockstep: bool = False,
        timeout: float = 30.0,
    ) -> None:
        if role not in ("server", "client"):
            raise ValueError(f"role must be 'server' or 'client', not {role!r}")
        _check_loopback(host)
        self.stack = stack
        self.role = role
        self.name = f"{stack} {role}"
        self.host = host
        self.port = port
        self.nbytes = nbytes
        command = driver_command(stack)
        options: dict[str, object] = {
            "role": role,
            "host": host,
            "tls-min": tls_min,
            "tls-max": tls_max,
            "timeout": int(timeout) if stack != "go" else f"{timeout}s",
        }
        if role == "server":
            options["cert"] = certs.server_cert
            options["key"] = _pkcs8(certs.server_key)
            options["accept"] = accept
        else:
            options["ca"] = certs.ca_cert
            options["port"] = port
            options["bytes"] = nbytes
            options["chunk"] = chunk
            if stack == "go":
                options["pace"] = f"{pace}s"
            else:
                options["pace-ms"] = int(pace * 1000)
        if renegotiate is not None:
            if stack != "go":
                raise ValueError("renegotiate= is a Go client option")
            options["renegotiate"] = renegotiate
        if lockstep:
            if stack != "java" or role != "client":
                raise ValueError("lockstep= is a Java client option")
            options["lockstep"] = "true"
        if rekey_every is not None:
            if stack == "go":
                raise ValueError("Go's crypto/tls cannot start a rekey itself")
            if stack == "node" and tls_max == "1.3":
                raise ValueError(
                    "Node can renegotiate (TLS 1.2) but not send a KeyUpdate"
                )
            options["rekey-every"] = int(rekey_every * 1000)
        # Go's flag package takes -name value; the others --name value.
        dash = "-" if stack == "go" else "--"
        argv = list(command)
        for key, value in options.items():
            argv += [dash + key, str(value)]
        super().__init__(argv)

    def _started(self) -> None:
        if self.role == "server":
            # Java needs a while to start on a busy machine.
            match = self.expect(READY, 4 * DEFAULT_TIMEOUT)
            self.port = int(match.group("port"))

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def handshakes(self) -> list[str]:
        """The TLS version of each handshake seen so far, in order."""
        return [m.group("version") for m in re.finditer(HANDSHAKE, self.output, re.M)]

    def renegotiations(self) -> int:
        """Handshakes after the first one: renegotiations this side saw."""
        return max(0, len(self.handshakes()) - 1)

    def rekeys(self) -> int:
        """Rekeys the driver itself started (``rekey_every``)."""
        return len(re.findall(REKEY, self.output, re.M))

    def wait_exit(self, timeout: float = 4 * DEFAULT_TIMEOUT) -> int:
        """Wait until the driver exits by itself; its status."""
        assert self._proc is not None, f"{self.name} not started"
        try:
            self.returncode = self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.name} still running after {timeout:g} s; output:\n"
                + self.output[-4000:]
            ) from None
        if self._output is not None:
            self._output.join(2.0)
        return self.returncode

    def result(self, timeout: float = 4 * DEFAULT_TIMEOUT) -> Result:
        """
        Wait for a client to finish, and check it did: exit status 0 and an
        echo equal, by SHA-256, to the *nbytes* it sent.

        :raises AssertionError: otherwise, with the driver's output.
        """
        status = self.wait_exit(timeout)
        found = re.search(RESULT, self.output, re.M)
        if status != 0 or found is None or found.group("match") != "true":
            raise AssertionError(
                f"{self.name} failed (exit status {status}); output:\n"
                + self.output[-4000:]
            )
        result = Result(int(found.group("bytes")), found.group("sha256"))
        assert result.nbytes == self.nbytes, result
        return result

    def closed(self, timeout: float = 4 * DEFAULT_TIMEOUT) -> list[Result]:
        """Wait for a server to exit cleanly; what each connection echoed."""
        status = self.wait_exit(timeout)
        if status != 0:
            raise AssertionError(
                f"{self.name} failed (exit status {status}); output:\n"
                + self.output[-4000:]
            )
        return [
            Result(int(m.group("bytes")), m.group("sha256"))
            for m in re.finditer(CLOSED, self.output, re.M)
        ]
