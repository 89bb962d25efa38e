"""
Foreign TLS peers for tests: ``openssl s_server``/``s_client``, GnuTLS's
``gnutls-serv``/``gnutls-cli`` and Python's ``ssl`` module.

A KeyUpdate or renegotiation test that only talks to our own code proves
little; these wrappers let a test talk to TLS stacks nobody here wrote, send
their interactive commands and read what *they* say they received.  Each peer
is a context manager; leaving it always terminates (then kills) the process
group, also when the test failed.  Every wait is bounded.

This module must never listen anywhere but loopback, never leave a process
behind, and never be imported by the library.

What the peers print (checked by running them against each other, Debian 12:
OpenSSL 3.0.19 CLI, GnuTLS 3.7.9)
-------------------------------------------------------------------------------

``openssl s_server`` / ``s_client`` with ``-msg`` (``<<<`` = received,
``>>>`` = sent; the hex line follows the message line)::

    <<< TLS 1.3, Handshake [length 0005], KeyUpdate
        18 00 00 01 00          (update_not_requested; ... 01 = update_requested)
    <<< TLS 1.2, Handshake [length 0004], HelloRequest    (client side, TLS 1.2)
    <<< TLS 1.2, Handshake [length 00c6], ClientHello     (server side; the
                                                           first one is the
                                                           initial handshake)
    >>> TLS 1.2, Alert [length 0002], warning no_renegotiation
                           (server refusing a client-initiated renegotiation)

with ``-trace`` instead::

    Received Record
    ...
        KeyUpdate, Length=1
          update_not_requested (0)        (or: update_requested (1))
        HelloRequest, Length=0
        ClientHello, Length=402

Without ``-msg``/``-trace`` neither prints anything when it *receives* a
KeyUpdate or a renegotiation.  Both write the message trace through C stdio,
which is block-buffered on a pipe: lines can lag until the next event, so the
CLIs are run under ``stdbuf -oL``.

Interactive commands, one letter alone on a line of stdin:

- ``s_server``: ``k`` KeyUpdate, ``K`` KeyUpdate(update_requested), ``r``
  renegotiate (TLS <= 1.2: sends HelloRequest), ``R`` renegotiate and request a
  client certificate, ``q``/``Q`` quit.  It prints ``SSL_do_handshake -> 1``.
  Not available with ``-rev`` (which echoes every line reversed) or ``-www``.
  Without either, s_server does *not* echo: it prints what it reads and sends
  what it is given on stdin.
- ``s_client``: ``k``/``K`` as above (prints ``KEYUPDATE``), ``R``
  renegotiate (prints ``RENEGOTIATING``; there is no ``r``), ``Q`` quit.
  Commands are off with ``-quiet``, ``-ign_eof`` or ``-nocommands``.
- OpenSSL 3 servers refuse client-initiated renegotiation (the client gets
  ``warning no_renegotiation`` and fails with ``no renegotiation``) unless
  started with ``-client_renegotiation``.  Other switches: ``-no_renegotiation``,
  ``-legacy_renegotiation``, ``-no_resumption_on_reneg`` (a server-initiated
  renegotiation resumes the session otherwise), ``-legacy_server_connect`` /
  ``-no_legacy_server_connect`` (client).
- ``-accept 127.0.0.1:0`` (or ``[::1]:0``) picks a free port and prints
  ``ACCEPT 127.0.0.1:42391``: no port guessing.

``gnutls-serv`` / ``gnutls-cli`` (``--priority NORMAL:-VERS-ALL:+VERS-TLS1.3``):

- Received KeyUpdate is printed only at ``-d 4`` (or more), on stderr, as
  ``|<4>| HSK[0x55...]: received TLS 1.3 key update (1)`` where the number is
  the update_requested flag; sending prints ``sending key update (N)``.  At
  ``-d 3`` and below nothing is printed.  GnuTLS answers update_requested only
  with its next write, like OpenSSL.  It closes the connection at the 9th
  KeyUpdate received within one second.
- ``gnutls-cli --inline-commands``: ``^rekey^`` sends KeyUpdate with
  update_requested, ``^rekey1^`` sends one *without* (both print
  ``- Rekey was completed``); ``^renegotiate^`` renegotiates (TLS 1.2, prints
  ``- ReHandshake was completed``); ``^resume^``.  On receiving a HelloRequest
  it prints ``*** Received rehandshake request``.
- ``gnutls-serv --echo`` echoes every line back.  When it receives a
  renegotiation ClientHello it prints ``*** Received hello message``.  A client
  that sends the line ``**REHANDSHAKE**`` makes it send a HelloRequest
  (``*** Sending rehandshake request``); it echoes the line too, which a
  gnutls-cli peer rejects mid-rehandshake.
- gnutls-serv has no option to choose its listening address: it always binds
  0.0.0.0 and ::.  It is therefore run inside a private network namespace
  (``unshare --net``), where only that namespace's loopback exists, behind a
  small relay whose listening socket is on 127.0.0.1 of the test's namespace.
  The relay copies bytes unchanged.

Python ``ssl``: never sends a KeyUpdate or renegotiation by itself; it answers
update_requested with its next write (the echo) and, being OpenSSL 3 too,
refuses client-initiated renegotiation.
"""

from __future__ import annotations

import array
import codecs
import fcntl
import ipaddress
import os
import re
import selectors
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

__all__ = [
    "DEFAULT_TIMEOUT",
    "GNUTLS_KEY_UPDATE_RECEIVED",
    "OPENSSL_KEY_UPDATE_RECEIVED",
    "CertFiles",
    "GnuTLSClient",
    "GnuTLSServer",
    "OpenSSLClient",
    "OpenSSLServer",
    "PeerProcess",
    "PySSLClient",
    "PySSLServer",
    "make_cert_files",
    "require_tool",
]

#: Upper bound for one wait on a peer; CI machines can be slow.
DEFAULT_TIMEOUT = float(os.environ.get("TWISTED_REKEY_PEER_TIMEOUT", "10"))

# A stopping process gets this long after SIGTERM before SIGKILL.
_TERMINATE_GRACE = 3.0

_PACKAGES = {
    "openssl": "openssl",
    "gnutls-serv": "gnutls-bin",
    "gnutls-cli": "gnutls-bin",
    "stdbuf": "coreutils",
    "unshare": "util-linux",
    "go": "golang-go",
    "java": "default-jdk-headless",
    "javac": "default-jdk-headless",
    "node": "nodejs",
    "curl": "curl",
}

#: ``-msg`` output of s_server/s_client on *receiving* a KeyUpdate.
OPENSSL_KEY_UPDATE_RECEIVED = (
    r"<<< TLS 1\.3, Handshake \[length 0005\], KeyUpdate\r?\n"
    r"\s+18 00 00 01 0(?P<requested>[01])"
)
#: ``-trace`` output of s_server/s_client for a KeyUpdate (either direction:
#: look at the preceding ``Received Record``/``Sent Record``).
OPENSSL_TRACE_KEY_UPDATE = (
    r"KeyUpdate, Length=1\r?\n\s+(?:update_not_requested|update_requested) "
    r"\((?P<requested>[01])\)"
)
OPENSSL_HELLO_REQUEST_RECEIVED = (
    r"<<< TLS 1\.2, Handshake \[length 0004\], HelloRequest"
)
OPENSSL_CLIENT_HELLO_RECEIVED = (
    r"<<< TLS 1\.[0-3], Handshake \[length [0-9a-f]{4}\], ClientHello"
)
OPENSSL_RENEGOTIATION_REFUSED = (
    r">>> TLS 1\.2, Alert \[length 0002\], warning no_renegotiation"
)
#: ``-d 4`` output of gnutls-serv/gnutls-cli on receiving a KeyUpdate.
GNUTLS_KEY_UPDATE_RECEIVED = (
    r"HSK\[0x[0-9a-f]+\]: received TLS 1\.3 key update \((?P<requested>[01])\)"
)
GNUTLS_HELLO_REQUEST_RECEIVED = r"\*\*\* Received rehandshake request"
GNUTLS_RENEGOTIATION_RECEIVED = r"\*\*\* Received hello message"

_GNUTLS_PRIORITIES = {
    None: "NORMAL",
    "1.2": "NORMAL:-VERS-ALL:+VERS-TLS1.2",
    "1.3": "NORMAL:-VERS-ALL:+VERS-TLS1.3",
}


def _in_ci() -> bool:
    return bool(os.environ.get("CI"))


def _unavailable(reason: str) -> None:
    import pytest

    if _in_ci():
        pytest.fail(
            f"{reason}. CI must run the foreign-peer tests, not skip them.",
            pytrace=False,
        )
    pytest.skip(reason)


def require_tool(name: str) -> str:
    """
    The path of a command-line tool a test needs.

    Skips the test when it is missing, or fails it when the ``CI``
    environment variable is set: in CI a skipped foreign-peer test would be a
    proof silently not made.
    """
    path = shutil.which(name)
    if path is None:
        package = _PACKAGES.get(name, name)
        _unavailable(
            f"{name} is not installed "
            f"(apt-get install -y --no-install-recommends {package})"
        )
    assert path is not None
    return path


def _version_flag(version: str | None) -> list[str]:
    if version is None:
        return []
    flags = {"1.2": "-tls1_2", "1.3": "-tls1_3"}
    if version not in flags:
        raise ValueError(f"TLS version must be '1.2', '1.3' or None, not {version!r}")
    return [flags[version]]


def _is_ipv6(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).version == 6
    except ValueError:
        return False


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if _is_ipv6(host) else f"{host}:{port}"


def _check_loopback(host: str) -> None:
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        raise ValueError(f"test peers use loopback addresses only, not {host!r}")


# -- certificates --------------------------------------------------------------


@dataclass(frozen=True)
class CertFiles:
    """
    A trustme CA and certificates, as the PEM files the CLIs need.

    :ivar ca: the :class:`trustme.CA`, for ``configure_trust`` on contexts.
    :ivar ca_cert: the CA certificate.
    :ivar server_cert: server certificate chain, valid for ``localhost``,
        ``127.0.0.1`` and ``::1``.
    :ivar server_key: its private key.
    :ivar client_cert: a client certificate chain from the same CA, for
        servers that request one (``s_server R``).
    :ivar client_key: its private key.
    """

    ca: Any
    directory: Path
    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    server: Any = None
    client: Any = None


def make_cert_files(directory: Path | str, ca: Any = None) -> CertFiles:
    """Issue certificates with trustme and write them under *directory*."""
    import trustme

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if ca is None:
        ca = trustme.CA()
    server = ca.issue_cert("localhost", "127.0.0.1", "::1")
    client = ca.issue_cert("client.twisted-rekey.test")
    files = CertFiles(
        ca=ca,
        directory=directory,
        ca_cert=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
        client_cert=directory / "client.pem",
        client_key=directory / "client.key",
        server=server,
        client=client,
    )
    ca.cert_pem.write_to_path(str(files.ca_cert))
    server.private_key_pem.write_to_path(str(files.server_key))
    client.private_key_pem.write_to_path(str(files.client_key))
    for blob, path in ((server, files.server_cert), (client, files.client_cert)):
        path.write_bytes(b"".join(pem.bytes() for pem in blob.cert_chain_pems))
    return files


# -- output capture ------------------------------------------------------------


class _Output:
    """Text read from a pipe by a background thread, searchable while it grows."""

    def __init__(self, stream: Any, name: str) -> None:
        self._stream = stream
        self._text = ""
        self._eof = False
        self._cond = threading.Condition()
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._thread = threading.Thread(
            target=self._pump, name=f"{name} output", daemon=True
        )
        self._thread.start()

    def _pump(self) -> None:
        fd = self._stream.fileno()
        try:
            while True:
                try:
                    chunk = os.read(fd, 65536)
                except OSError:
                    chunk = b""
                with self._cond:
                    if chunk:
                        self._text += self._decoder.decode(chunk)
                    else:
                        self._text += self._decoder.decode(b"", final=True)
                        self._eof = True
                    self._cond.notify_all()
                if not chunk:
                    return
        finally:
            self._stream.close()

    @property
    def text(self) -> str:
        with self._cond:
            return self._text

    @property
    def eof(self) -> bool:
        with self._cond:
            return self._eof

    def search(self, pattern: re.Pattern[str], start: int) -> re.Match[str] | None:
        with self._cond:
            return pattern.search(self._text, start)

    def wait(
        self, pattern: re.Pattern[str], start: int, timeout: float
    ) -> tuple[re.Match[str] | None, bool]:
        """Wait for *pattern* after *start*; ``(match, eof)``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                match = pattern.search(self._text, start)
                if match is not None or self._eof:
                    return match, self._eof
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None, False
                self._cond.wait(remaining)

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


def _compile(pattern: str | re.Pattern[str]) -> re.Pattern[str]:
    if isinstance(pattern, re.Pattern):
        return pattern
    return re.compile(pattern, re.MULTILINE)


def _tail(text: str, limit: int = 4000) -> str:
    return text if len(text) <= limit else "[...]\n" + text[-limit:]


# -- subprocess peers ------------------------------------------------------------


class PeerProcess:
    """
    A foreign TLS peer running as a subprocess with piped stdin and output.

    Output (stdout and stderr merged, in order) is read by a thread.
    :meth:`expect` searches it from a per-pattern cursor that each match
    advances, so successive calls see successive events.  :meth:`send` returns
    only once the peer has read the bytes (see :meth:`_wait_drained`).

    The process leads its own process group; :meth:`stop` (also called by
    ``__exit__``) closes stdin, sends SIGTERM to the group, then SIGKILL, and
    reaps the process, all within a few seconds.
    """

    name = "peer"

    def __init__(self, argv: Sequence[str], *, pass_fds: Sequence[int] = ()) -> None:
        self.argv = list(argv)
        self._pass_fds = tuple(pass_fds)
        self._proc: subprocess.Popen[bytes] | None = None
        self._output: _Output | None = None
        self._cursors: dict[str, int] = {}
        self._floor = 0
        self.returncode: int | None = None

    # lifecycle

    def start(self) -> PeerProcess:
        if self._proc is not None:
            raise RuntimeError(f"{self.name} already started")
        self._proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            pass_fds=self._pass_fds,
        )
        self._output = _Output(self._proc.stdout, self.name)
        try:
            self._started()
        except BaseException:
            self.stop()
            raise
        return self

    def _started(self) -> None:
        """Wait until the peer is ready; subclasses override."""

    def stop(self, timeout: float = _TERMINATE_GRACE) -> int | None:
        """Stop the peer (idempotent); returns its exit status."""
        proc = self._proc
        if proc is None or self.returncode is not None:
            return self.returncode
        if proc.stdin is not None:
            try:
                proc.stdin.close()
            except OSError:
                pass
        # The leader is never reaped before this point, so its pid (the
        # group id) cannot have been reused: signalling the group is safe.
        for sig, grace in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                self.returncode = proc.wait(grace)
                break
            except subprocess.TimeoutExpired:
                continue
        if self._output is not None:
            self._output.join(2.0)
        return self.returncode

    def __enter__(self) -> Any:
        if self._proc is None:
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    # input

    def send(self, data: bytes) -> None:
        """Write raw bytes to the peer's stdin."""
        assert self._proc is not None and self._proc.stdin is not None
        try:
            self._proc.stdin.write(data)
            self._proc.stdin.flush()
        except BrokenPipeError:
            raise AssertionError(
                f"{self.name} no longer reads its input; output:\n" + _tail(self.output)
            ) from None
        self._wait_drained(self._proc.stdin.fileno())

    def _wait_drained(self, fd: int, timeout: float = DEFAULT_TIMEOUT) -> None:
        # The CLIs read whatever stdin holds in one read() and look only at
        # its first bytes for a command: "k\nafter\n" read at once would send
        # a KeyUpdate and drop "after".  Waiting until the pipe is empty (the
        # peer has read it) keeps every write a read of its own.
        deadline = time.monotonic() + timeout
        pending = array.array("i", [0])
        while True:
            fcntl.ioctl(fd, termios.FIONREAD, pending, True)
            if pending[0] == 0:
                return
            if time.monotonic() >= deadline or self.exited:
                raise AssertionError(
                    f"{self.name} did not read its input within {timeout:g} s; "
                    "output:\n" + _tail(self.output)
                )
            time.sleep(0.001)

    def send_line(self, line: str) -> None:
        """Write one line (data, or an interactive command) to stdin."""
        self.send(line.encode("utf-8") + b"\n")

    # output

    @property
    def output(self) -> str:
        """Everything the peer printed so far."""
        return self._output.text if self._output is not None else ""

    @property
    def exited(self) -> bool:
        """Whether the peer closed its output (it exited, normally)."""
        return self._output is not None and self._output.eof

    def count(self, pattern: str | re.Pattern[str]) -> int:
        """How many times *pattern* occurs in the whole output."""
        return len(_compile(pattern).findall(self.output))

    def expect(
        self,
        pattern: str | re.Pattern[str],
        timeout: float = DEFAULT_TIMEOUT,
        *,
        advance: bool = True,
    ) -> re.Match[str]:
        """
        Wait until *pattern* (a regular expression, ``re.MULTILINE``) appears
        in the output after this pattern's cursor.

        Each pattern has its own cursor, which a match moves past it: calling
        ``expect(p)`` twice waits for two occurrences of ``p``, while events
        of different kinds (a KeyUpdate, then the data it preceded) can be
        awaited in any order.  :meth:`skip_to_end` moves all cursors.

        :param advance: move this pattern's cursor past the match.
        :raises AssertionError: on timeout or when the peer exited first;
            the message holds the tail of the output.
        """
        assert self._output is not None, f"{self.name} not started"
        compiled = _compile(pattern)
        start = self._cursor(compiled)
        match, eof = self._output.wait(compiled, start, timeout)
        if match is None:
            why = "before the peer exited" if eof else f"within {timeout:g} s"
            raise AssertionError(
                f"{self.name}: {compiled.pattern!r} not seen {why} (searching "
                f"from offset {start}); output:\n" + _tail(self.output)
            )
        if advance:
            self._cursors[compiled.pattern] = match.end()
        return match

    def expect_absent(self, pattern: str | re.Pattern[str], wait: float = 0.5) -> None:
        """Assert *pattern* does not show up after the cursor within *wait* s."""
        assert self._output is not None
        compiled = _compile(pattern)
        match, _ = self._output.wait(compiled, self._cursor(compiled), wait)
        if match is not None:
            raise AssertionError(
                f"{self.name}: unexpected {match.group(0)!r}; output:\n"
                + _tail(self.output)
            )

    def when_seen(
        self,
        pattern: str | re.Pattern[str],
        timeout: float = DEFAULT_TIMEOUT,
        *,
        reactor: Any = None,
    ) -> Any:
        """
        Like :meth:`expect` but without blocking the reactor: a Deferred that
        fires with the match (or fails with AssertionError).  For
        ``pytest_twisted`` tests, whose reactor must keep running while the
        peer talks to our code.  It polls every 10 ms and leaves no delayed
        call behind once fired.
        """
        from twisted.internet import defer, task

        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        assert self._output is not None, f"{self.name} not started"
        compiled = _compile(pattern)
        deadline = time.monotonic() + timeout

        async def poll() -> re.Match[str]:
            while True:
                assert self._output is not None
                match = self._output.search(compiled, self._cursor(compiled))
                if match is not None or self._output.eof:
                    return self.expect(compiled, 0)
                if time.monotonic() >= deadline:
                    return self.expect(compiled, 0)
                await task.deferLater(reactor, 0.01, lambda: None)

        return defer.ensureDeferred(poll())

    def _cursor(self, compiled: re.Pattern[str]) -> int:
        return max(self._cursors.get(compiled.pattern, 0), self._floor)

    def _expect_flag(
        self, pattern: str, update_requested: bool | None, timeout: float
    ) -> bool:
        # One pattern (so one cursor) for both flags: the next KeyUpdate
        # received must carry the flag asked for.
        match = self.expect(pattern, timeout)
        received = match.group("requested") == "1"
        if update_requested is not None and received != update_requested:
            raise AssertionError(
                f"{self.name} received a KeyUpdate with update_requested="
                f"{received}, expected {update_requested}; output:\n"
                + _tail(self.output[: match.end()])
            )
        return received

    def skip_to(self, offset: int) -> None:
        """Make every later search start at *offset* or after."""
        self._floor = max(self._floor, offset)

    def skip_to_end(self) -> None:
        """Make every later search start after the output seen so far."""
        self.skip_to(len(self.output))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {' '.join(self.argv)!r}>"


def _stdbuf() -> list[str]:
    # See the module docstring: without it -msg lines can lag behind.
    path = shutil.which("stdbuf")
    return [path, "-oL", "-eL"] if path else []


class _OpenSSLPeer(PeerProcess):
    def expect_key_update(
        self, update_requested: bool | None = None, timeout: float = DEFAULT_TIMEOUT
    ) -> bool:
        """
        Wait for the peer to report a KeyUpdate it *received* (needs ``msg``).

        :param update_requested: the flag expected, or ``None`` for either.
        :returns: the flag it received.
        """
        if not self._msg:
            raise RuntimeError(f"{self.name} was started without msg=True")
        return self._expect_flag(OPENSSL_KEY_UPDATE_RECEIVED, update_requested, timeout)

    def key_updates_received(self) -> list[bool]:
        """update_requested flags of all KeyUpdates received so far."""
        return [
            m.group("requested") == "1"
            for m in _compile(OPENSSL_KEY_UPDATE_RECEIVED).finditer(self.output)
        ]

    def key_update(self, request_peer: bool = False) -> None:
        """Send a KeyUpdate (``K``: with update_requested)."""
        self.send_line("K" if request_peer else "k")


class OpenSSLServer(_OpenSSLPeer):
    """
    ``openssl s_server`` on a free loopback port.

    :param certs: from :func:`make_cert_files`.
    :param version: ``"1.3"``, ``"1.2"`` or ``None`` (whatever is negotiated).
    :param msg: ``-msg``: print every protocol message (needed by the
        ``expect_*`` helpers).
    :param trace: ``-trace``: decoded messages instead.
    :param client_renegotiation: ``-client_renegotiation``; OpenSSL 3 refuses
        client-initiated renegotiation without it.
    :param no_resumption_on_reneg: make renegotiations full handshakes.
    :param rev: ``-rev``: send every line back reversed (proves data flows
        both ways; disables the interactive commands).
    :param request_client_cert: ``-verify 1`` with the test CA.
    :param keylog_file: ``-keylogfile``.
    :param naccept: exit after this many connections.
    :param ciphersuites: ``-ciphersuites`` (TLS 1.3).
    """

    name = "openssl s_server"

    def __init__(
        self,
        certs: CertFiles,
        *,
        version: str | None = "1.3",
        host: str = "127.0.0.1",
        msg: bool = True,
        trace: bool = False,
        client_renegotiation: bool = False,
        legacy_renegotiation: bool = False,
        no_renegotiation: bool = False,
        no_resumption_on_reneg: bool = False,
        rev: bool = False,
        request_client_cert: bool = False,
        keylog_file: Path | str | None = None,
        naccept: int | None = None,
        ciphersuites: str | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        openssl = require_tool("openssl")
        _check_loopback(host)
        self.host = host
        self.port: int = 0
        self._msg = msg
        argv = [*_stdbuf(), openssl, "s_server", "-accept", _host_port(host, 0)]
        argv += ["-cert", str(certs.server_cert), "-key", str(certs.server_key)]
        argv += _version_flag(version)
        options = {
            "-msg": msg,
            "-trace": trace,
            "-client_renegotiation": client_renegotiation,
            "-legacy_renegotiation": legacy_renegotiation,
            "-no_renegotiation": no_renegotiation,
            "-no_resumption_on_reneg": no_resumption_on_reneg,
            "-rev": rev,
        }
        argv += [flag for flag, on in options.items() if on]
        if request_client_cert:
            argv += ["-verify", "1", "-CAfile", str(certs.ca_cert)]
        if keylog_file is not None:
            argv += ["-keylogfile", str(keylog_file)]
        if naccept is not None:
            argv += ["-naccept", str(naccept)]
        if ciphersuites is not None:
            argv += ["-ciphersuites", ciphersuites]
        super().__init__([*argv, *extra_args])

    def _started(self) -> None:
        match = self.expect(r"^ACCEPT (?:\[[0-9a-fA-F:]+\]|[^\s:]+):(?P<port>\d+)$")
        self.port = int(match.group("port"))

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def expect_handshake(self, timeout: float = DEFAULT_TIMEOUT) -> str:
        """Wait for a completed handshake; returns the cipher name."""
        match = self.expect(r"^CIPHER is (?P<cipher>\S+)", timeout)
        # The initial ClientHello is not a renegotiation.
        self.skip_to(match.end())
        return match.group("cipher")

    def renegotiate(self, request_cert: bool = False) -> None:
        """Start a renegotiation (TLS <= 1.2): ``r``, or ``R`` to ask for a
        client certificate."""
        self.send_line("R" if request_cert else "r")

    def expect_renegotiation(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        """
        Wait for a ClientHello after the handshake: a renegotiation started by
        the client, or the answer to our HelloRequest.  Call after
        :meth:`expect_handshake`, which moves the cursor past the first one.
        """
        self.expect(OPENSSL_CLIENT_HELLO_RECEIVED, timeout)


class OpenSSLClient(_OpenSSLPeer):
    """
    ``openssl s_client`` connected to a loopback port; :meth:`start` returns
    once the handshake is done (the certificate chain verified against the
    test CA unless ``verify=False``).
    """

    name = "openssl s_client"

    def __init__(
        self,
        certs: CertFiles,
        port: int,
        *,
        host: str = "127.0.0.1",
        version: str | None = "1.3",
        msg: bool = True,
        trace: bool = False,
        verify: bool = True,
        servername: str | None = None,
        client_cert: bool = False,
        legacy_renegotiation: bool = False,
        no_legacy_server_connect: bool = False,
        keylog_file: Path | str | None = None,
        ciphersuites: str | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        openssl = require_tool("openssl")
        _check_loopback(host)
        self._msg = msg
        argv = [*_stdbuf(), openssl, "s_client", "-connect", _host_port(host, port)]
        argv += _version_flag(version)
        if verify:
            argv += ["-CAfile", str(certs.ca_cert), "-verify_return_error"]
            try:
                ipaddress.ip_address(host)
                argv += ["-verify_ip", host]
            except ValueError:
                argv += ["-verify_hostname", host]
        argv += ["-servername", servername] if servername else ["-noservername"]
        options = {
            "-msg": msg,
            "-trace": trace,
            "-legacy_renegotiation": legacy_renegotiation,
            "-no_legacy_server_connect": no_legacy_server_connect,
        }
        argv += [flag for flag, on in options.items() if on]
        if client_cert:
            argv += ["-cert", str(certs.client_cert), "-key", str(certs.client_key)]
        if keylog_file is not None:
            argv += ["-keylogfile", str(keylog_file)]
        if ciphersuites is not None:
            argv += ["-ciphersuites", ciphersuites]
        super().__init__([*argv, *extra_args])

    def _started(self) -> None:
        match = self.expect(
            r"^(?P<new>New|Reused), (?P<version>\S+), Cipher is (?P<cipher>\S+)"
        )
        self.version = match.group("version")
        self.cipher = match.group("cipher")
        verified = self.expect(r"^\s*Verify return code: (?P<code>\d+)")
        code = verified.group("code")
        assert code == "0", f"s_client could not verify the server: {code}"
        self.skip_to(verified.end())

    def renegotiate(self) -> None:
        """``R``: renegotiate (TLS <= 1.2; s_client has no ``r``)."""
        self.send_line("R")

    def expect_hello_request(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Wait for a HelloRequest from the server (needs ``msg``)."""
        self.expect(OPENSSL_HELLO_REQUEST_RECEIVED, timeout)

    def quit(self) -> None:
        """``Q``: close the connection and exit."""
        self.send_line("Q")


# -- GnuTLS --------------------------------------------------------------------

_NETNS_LOCK = threading.Lock()
_NETNS_PREFIX: list[str] | None = None


def _netns_prefix() -> list[str]:
    """``unshare`` arguments that run a command in a private network
    namespace, or skip/fail when this machine cannot do it."""
    global _NETNS_PREFIX
    with _NETNS_LOCK:
        if _NETNS_PREFIX is None:
            unshare = require_tool("unshare")
            _NETNS_PREFIX = []
            for prefix in ([unshare, "--net", "--map-root-user"], [unshare, "--net"]):
                try:
                    done = subprocess.run(
                        [*prefix, "true"], capture_output=True, timeout=10
                    )
                except (OSError, subprocess.TimeoutExpired):
                    continue
                if done.returncode == 0:
                    _NETNS_PREFIX = prefix
                    break
    if not _NETNS_PREFIX:
        _unavailable(
            "cannot create a private network namespace (unshare --net), which "
            "gnutls-serv needs because it always listens on every address"
        )
    return list(_NETNS_PREFIX)


_INNER_PORT = 4433


class GnuTLSServer(PeerProcess):
    """
    ``gnutls-serv`` (``--echo`` by default) reachable on a free port of
    ``host``.

    It runs in a private network namespace behind a byte-for-byte relay
    (see the module docstring), so :attr:`port` is the relay's.

    :param version: ``"1.3"``, ``"1.2"`` or ``None``; or give ``priority``.
    :param debug: ``-d`` level; 4 is the lowest that reports KeyUpdates.
    """

    name = "gnutls-serv"

    def __init__(
        self,
        certs: CertFiles,
        *,
        version: str | None = "1.3",
        priority: str | None = None,
        host: str = "127.0.0.1",
        debug: int = 4,
        echo: bool = True,
        request_client_cert: bool = False,
        extra_args: Sequence[str] = (),
    ) -> None:
        serv = require_tool("gnutls-serv")
        _check_loopback(host)
        prefix = _netns_prefix()
        family = socket.AF_INET6 if _is_ipv6(host) else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        self._listener.bind((host, 0))
        self._listener.listen(16)
        self.host = host
        self.port: int = self._listener.getsockname()[1]
        if priority is None:
            priority = _GNUTLS_PRIORITIES[version]
        inner = [serv, "-p", str(_INNER_PORT), "--priority", priority, "-d", str(debug)]
        inner += ["--x509certfile", str(certs.server_cert)]
        inner += ["--x509keyfile", str(certs.server_key)]
        if echo:
            inner.append("--echo")
        if request_client_cert:
            inner += ["-r", "--x509cafile", str(certs.ca_cert)]
        else:
            inner.append("--disable-client-cert")
        inner += list(extra_args)
        fd = self._listener.fileno()
        relay = [sys.executable, os.path.abspath(__file__), "--loopback-relay"]
        relay += [str(fd), str(_INNER_PORT), "--", *_stdbuf(), *inner]
        super().__init__([*prefix, *relay], pass_fds=(fd,))

    def _started(self) -> None:
        self.expect(r"Server listening on IPv4 \S+ port \d+\.\.\.done")
        # The relay inherited the socket; ours only keeps it alive.
        self._listener.close()

    def stop(self, timeout: float = _TERMINATE_GRACE) -> int | None:
        try:
            return super().stop(timeout)
        finally:
            self._listener.close()

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    #: A client that sends this line makes gnutls-serv send a HelloRequest.
    REHANDSHAKE_COMMAND = b"**REHANDSHAKE**\n"

    def expect_key_update(
        self, update_requested: bool | None = None, timeout: float = DEFAULT_TIMEOUT
    ) -> bool:
        """Wait for a KeyUpdate it received (needs ``debug >= 4``)."""
        return self._expect_flag(GNUTLS_KEY_UPDATE_RECEIVED, update_requested, timeout)

    def key_updates_received(self) -> list[bool]:
        return [
            m.group("requested") == "1"
            for m in _compile(GNUTLS_KEY_UPDATE_RECEIVED).finditer(self.output)
        ]

    def expect_renegotiation(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Wait for a renegotiation ClientHello (TLS <= 1.2)."""
        self.expect(GNUTLS_RENEGOTIATION_RECEIVED, timeout)


class GnuTLSClient(PeerProcess):
    """
    ``gnutls-cli --inline-commands`` connected to a loopback port;
    :meth:`start` returns once the handshake is done.
    """

    name = "gnutls-cli"

    def __init__(
        self,
        certs: CertFiles,
        port: int,
        *,
        host: str = "127.0.0.1",
        version: str | None = "1.3",
        priority: str | None = None,
        debug: int = 4,
        verify: bool = True,
        client_cert: bool = False,
        extra_args: Sequence[str] = (),
    ) -> None:
        cli = require_tool("gnutls-cli")
        _check_loopback(host)
        if priority is None:
            priority = _GNUTLS_PRIORITIES[version]
        argv = [*_stdbuf(), cli, "-p", str(port), "--priority", priority]
        argv += ["-d", str(debug), "--inline-commands"]
        if verify:
            argv += ["--x509cafile", str(certs.ca_cert)]
        else:
            argv.append("--insecure")
        if client_cert:
            argv += ["--x509certfile", str(certs.client_cert)]
            argv += ["--x509keyfile", str(certs.client_key)]
        super().__init__([*argv, *extra_args, host])

    def _started(self) -> None:
        self.skip_to(self.expect(r"^- Handshake was completed").end())

    def key_update(self, request_peer: bool = False) -> None:
        """
        Send a KeyUpdate.  Beware GnuTLS's names: ``^rekey^`` sets
        update_requested, ``^rekey1^`` does not.
        """
        self.send_line("^rekey^" if request_peer else "^rekey1^")

    def renegotiate(self) -> None:
        """``^renegotiate^`` (TLS <= 1.2)."""
        self.send_line("^renegotiate^")

    def expect_key_update(
        self, update_requested: bool | None = None, timeout: float = DEFAULT_TIMEOUT
    ) -> bool:
        """Wait for a KeyUpdate it received (needs ``debug >= 4``)."""
        return self._expect_flag(GNUTLS_KEY_UPDATE_RECEIVED, update_requested, timeout)

    def expect_hello_request(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.expect(GNUTLS_HELLO_REQUEST_RECEIVED, timeout)


# -- Python ssl ----------------------------------------------------------------


def _ssl_version(context: ssl.SSLContext, version: str | None) -> None:
    if version == "1.3":
        context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1_3
    elif version == "1.2":
        context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1_2
    elif version is not None:
        raise ValueError(f"TLS version must be '1.2', '1.3' or None, not {version!r}")


def _wait_until(
    predicate: Callable[[], bool], timeout: float, what: str, detail: Callable[[], str]
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what} not within {timeout:g} s; {detail()}")
        time.sleep(0.005)


class PySSLServer:
    """
    An echo server made with Python's ``ssl`` module, in threads.

    Every byte received is recorded in :attr:`received` and (with
    ``echo=True``) sent back.  Errors in the connection threads are kept in
    :attr:`errors`; :meth:`stop` joins every thread within a bounded time.
    """

    name = "python ssl server"

    def __init__(
        self,
        certs: CertFiles,
        *,
        version: str | None = "1.3",
        host: str = "127.0.0.1",
        echo: bool = True,
        keylog_file: Path | str | None = None,
        context: ssl.SSLContext | None = None,
    ) -> None:
        _check_loopback(host)
        if context is None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(str(certs.server_cert), str(certs.server_key))
            _ssl_version(context, version)
        if keylog_file is not None:
            context.keylog_filename = str(keylog_file)
        self.context = context
        self.host = host
        self.echo = echo
        self.port = 0
        self.errors: list[BaseException] = []
        self.connections = 0
        self._received = bytearray()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._sock: socket.socket | None = None

    def start(self) -> PySSLServer:
        family = socket.AF_INET6 if _is_ipv6(self.host) else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        self._sock.bind((self.host, 0))
        self._sock.listen(16)
        self._sock.settimeout(0.05)
        self.port = self._sock.getsockname()[1]
        self._spawn(self._accept_loop, "accept")
        return self

    def _spawn(self, target: Callable[..., None], what: str, *args: Any) -> None:
        thread = threading.Thread(
            target=target, args=args, name=f"{self.name} {what}", daemon=True
        )
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._stopping.is_set():
            try:
                raw, _ = self._sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with self._lock:
                self.connections += 1
            self._spawn(self._serve, "connection", raw)

    def _serve(self, raw: socket.socket) -> None:
        raw.settimeout(DEFAULT_TIMEOUT)
        try:
            with self.context.wrap_socket(raw, server_side=True) as conn:
                conn.settimeout(0.05)
                while not self._stopping.is_set():
                    try:
                        data = conn.recv(65536)
                    except socket.timeout:
                        continue
                    if not data:
                        return
                    with self._lock:
                        self._received += data
                    if self.echo:
                        conn.settimeout(DEFAULT_TIMEOUT)
                        conn.sendall(data)
                        conn.settimeout(0.05)
        except (ssl.SSLError, OSError) as e:
            if not self._stopping.is_set():
                with self._lock:
                    self.errors.append(e)
        finally:
            raw.close()

    @property
    def received(self) -> bytes:
        with self._lock:
            return bytes(self._received)

    def wait_received(self, data: bytes, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Wait until *data* is part of what was received."""
        _wait_until(
            lambda: data in self.received,
            timeout,
            f"{self.name}: {data[:60]!r}",
            lambda: f"received {self.received[-200:]!r}, errors {self.errors!r}",
        )

    def stop(self) -> None:
        self._stopping.set()
        if self._sock is not None:
            self._sock.close()
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(DEFAULT_TIMEOUT)
        alive = [t.name for t in threads if t.is_alive()]
        assert not alive, f"threads still running: {alive}"

    def __enter__(self) -> PySSLServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class PySSLClient:
    """A blocking Python ``ssl`` client with bounded reads."""

    name = "python ssl client"

    def __init__(
        self,
        certs: CertFiles,
        port: int,
        *,
        host: str = "127.0.0.1",
        version: str | None = "1.3",
        server_hostname: str | None = None,
        keylog_file: Path | str | None = None,
        context: ssl.SSLContext | None = None,
    ) -> None:
        _check_loopback(host)
        if context is None:
            context = ssl.create_default_context(cafile=str(certs.ca_cert))
            _ssl_version(context, version)
        if keylog_file is not None:
            context.keylog_filename = str(keylog_file)
        self.context = context
        self.address = (host, port)
        self.server_hostname = server_hostname or host
        self.conn: ssl.SSLSocket | None = None
        self._buffer = bytearray()

    def start(self) -> PySSLClient:
        raw = socket.create_connection(self.address, timeout=DEFAULT_TIMEOUT)
        try:
            self.conn = self.context.wrap_socket(
                raw, server_hostname=self.server_hostname
            )
        except BaseException:
            raw.close()
            raise
        return self

    def send(self, data: bytes) -> None:
        assert self.conn is not None
        self.conn.sendall(data)

    def recv_until(self, marker: bytes, timeout: float = DEFAULT_TIMEOUT) -> bytes:
        """Read until *marker*; returns everything up to and including it."""
        assert self.conn is not None
        deadline = time.monotonic() + timeout
        while marker not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"{self.name}: {marker!r} not received within {timeout:g} s; "
                    f"got {bytes(self._buffer[-200:])!r}"
                )
            self.conn.settimeout(remaining)
            try:
                chunk = self.conn.recv(65536)
            except socket.timeout:
                continue
            if not chunk:
                raise AssertionError(
                    f"{self.name}: connection closed before {marker!r}; "
                    f"got {bytes(self._buffer[-200:])!r}"
                )
            self._buffer += chunk
        end = self._buffer.index(marker) + len(marker)
        data = bytes(self._buffer[:end])
        del self._buffer[:end]
        return data

    def stop(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def __enter__(self) -> PySSLClient:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


# -- relay for gnutls-serv (runs inside the private network namespace) --------


def _bring_loopback_up() -> None:
    import struct

    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        request = struct.pack("16sH", b"lo", 0)
        flags = struct.unpack("16sH", fcntl.ioctl(s, siocgifflags, request))[1]
        fcntl.ioctl(s, siocsifflags, struct.pack("16sH", b"lo", flags | iff_up))


def _pump(pair: dict[socket.socket, socket.socket], sock: socket.socket) -> bool:
    """Copy what is readable on *sock* to its partner; False once done."""
    try:
        data = sock.recv(65536)
    except OSError:
        data = b""
    other = pair[sock]
    if data:
        try:
            other.sendall(data)
            return True
        except OSError:
            pass
    try:
        other.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    return False


def _relay_main(argv: list[str]) -> int:
    listen_fd, inner_port = int(argv[0]), int(argv[1])
    command = argv[argv.index("--") + 1 :]
    _bring_loopback_up()
    listener = socket.socket(fileno=listen_fd)
    listener.setblocking(False)
    child = subprocess.Popen(command, stdin=subprocess.DEVNULL)

    def terminate(signum: int, frame: object) -> None:
        child.terminate()
        try:
            child.wait(_TERMINATE_GRACE)
        except subprocess.TimeoutExpired:
            child.kill()
        os._exit(0)

    signal.signal(signal.SIGTERM, terminate)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    pair: dict[socket.socket, socket.socket] = {}
    open_halves: dict[socket.socket, int] = {}
    while child.poll() is None:
        for key, _ in selector.select(0.2):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            if sock is listener:
                try:
                    outer, _ = listener.accept()
                except BlockingIOError:
                    continue
                outer.setblocking(True)
                inner = None
                deadline = time.monotonic() + DEFAULT_TIMEOUT
                while inner is None and time.monotonic() < deadline:
                    try:
                        inner = socket.create_connection(("127.0.0.1", inner_port))
                    except OSError:
                        time.sleep(0.05)
                if inner is None:
                    outer.close()
                    continue
                pair[outer], pair[inner] = inner, outer
                for s in (outer, inner):
                    open_halves[s] = 2
                    selector.register(s, selectors.EVENT_READ)
            elif not _pump(pair, sock):
                selector.unregister(sock)
                other = pair[sock]
                for s in (sock, other):
                    open_halves[s] -= 1
                if open_halves[sock] <= 0 and open_halves[other] <= 0:
                    for s in (sock, other):
                        s.close()
                        del pair[s], open_halves[s]
    return child.returncode or 0


if __name__ == "__main__" and sys.argv[1:2] == ["--loopback-relay"]:
    sys.exit(_relay_main(sys.argv[2:]))
