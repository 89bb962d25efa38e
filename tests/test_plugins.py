"""
The twistd plugins, run as a user runs them: ``twistd -n rekey-echo`` and
``twistd -n rekey-tunnel`` as real subprocesses on loopback, driven by a
client, checked from the server's log (rotations by policy, answers to the
client's requests) and the client's counters (every byte back, every
rotation answered); and every bad input answered with one line on stderr and
a non-zero exit, before anything listens.

Each twistd runs in a temporary directory (no pid or log file in the
checkout), with ``--pidfile=`` and its log on stdout, on port 0 (it logs the
port it got); it is stopped in ``finally``, killed if SIGTERM is not enough.
Every wait is bounded.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from peers import require_tool

ROOT = Path(__file__).resolve().parent.parent
TWISTD = str(Path(sys.executable).parent / "twistd")
ECHO_CLIENT = ROOT / "examples" / "echo_client.py"
START_TIMEOUT = 30.0
RUN_TIMEOUT = 60

# Short rotations, so that a few seconds of traffic see several.
FAST = ["--interval", "1", "--min-interval", "0.5"]


class Twistd:
    """A running ``twistd -n`` and the lines it logged so far."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.process = process
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._lock:
                self.lines.append(line.rstrip("\n"))

    @property
    def log(self) -> str:
        with self._lock:
            return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = START_TIMEOUT) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(pattern, self.log)
            if match is not None:
                return match
            if self.process.poll() is not None:
                time.sleep(0.2)  # let the reader drain what is left
                match = re.search(pattern, self.log)
                if match is not None:
                    return match
                break
            time.sleep(0.05)
        stderr = ""
        if self.process.poll() is not None and self.process.stderr is not None:
            stderr = self.process.stderr.read()
        pytest.fail(f"twistd never logged {pattern!r}:\n{self.log}\n{stderr}")

    @property
    def port(self) -> int:
        return int(self.wait_for(r"listening on 127\.0\.0\.1:(\d+)").group(1))

    def count(self, text: str) -> int:
        return self.log.count(text)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        self._reader.join(10)


@contextmanager
def twistd(cwd: Path, *args: str) -> Iterator[Twistd]:
    process = subprocess.Popen(
        [TWISTD, "-n", "--pidfile=", *args],
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    running = Twistd(process)
    try:
        yield running
    finally:
        running.stop()
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()


def run_twistd(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [TWISTD, "-n", "--pidfile=", *args],
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
    )


@contextmanager
def rekey_echo(tmp_path: Path, *args: str) -> Iterator[Twistd]:
    with twistd(
        tmp_path,
        "rekey-echo",
        "--endpoint",
        "ssl:0:interface=127.0.0.1",
        "--state-dir",
        str(tmp_path / "state"),
        *args,
    ) as server:
        yield server


def run_echo_client(port: int, cafile: Path, *args: str) -> list[str]:
    done = subprocess.run(
        [
            sys.executable,
            str(ECHO_CLIENT),
            "--port",
            str(port),
            "--cafile",
            str(cafile),
            "--timeout",
            "20",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        cwd=ECHO_CLIENT.parent,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stderr == ""
    return done.stdout.splitlines()


def client_stats(lines: list[str]) -> dict[str, int]:
    (line,) = [x for x in lines if x.startswith("stats: ")]
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", line)}


def assert_one_line_error(
    done: subprocess.CompletedProcess[str], *fragments: str
) -> str:
    assert done.returncode != 0, done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


# -- discovery ---------------------------------------------------------------------


def test_twistd_lists_the_plugins(tmp_path: Path) -> None:
    done = run_twistd(tmp_path, "--help")
    assert done.returncode == 0, done.stderr
    assert re.search(r"^\s+rekey-echo\s+A TLS echo server", done.stdout, re.M)
    assert re.search(r"^\s+rekey-tunnel\s+A TLS tunnel", done.stdout, re.M)


def test_plugins_directory_is_a_namespace() -> None:
    # An __init__.py there would hide Twisted's own plugins.
    assert not (ROOT / "twisted" / "__init__.py").exists()
    assert not (ROOT / "twisted" / "plugins" / "__init__.py").exists()


@pytest.mark.parametrize("command", ["rekey-echo", "rekey-tunnel"])
def test_help(tmp_path: Path, command: str) -> None:
    done = run_twistd(tmp_path, command, "--help")
    assert done.returncode == 0, done.stderr
    for option in (
        "--interval",
        "--bytes",
        "--min-interval",
        "--request-peer",
        "--tls-min",
        "--tls-max",
        "--cert",
        "--key",
        "--state-dir",
    ):
        assert option in done.stdout
    assert list(tmp_path.iterdir()) == []  # no pid, log or certificate file


# -- rekey-echo --------------------------------------------------------------------


def test_echo_rotates_and_echoes_every_byte(tmp_path: Path) -> None:
    with rekey_echo(tmp_path, *FAST) as server:
        match = server.wait_for(
            r"made a new self-signed certificate for localhost, 127\.0\.0\.1 and "
            r"::1: (\S+) \(SHA-256 fingerprint ([0-9A-F:]+)\)"
        )
        cert_path = Path(match.group(1))
        assert cert_path == tmp_path / "state" / "localhost.pem"
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        assert cert.fingerprint(hashes.SHA256()).hex(":").upper() == match.group(2)
        key_mode = (tmp_path / "state" / "localhost-key.pem").stat().st_mode
        assert key_mode & 0o077 == 0

        lines = run_echo_client(
            server.port,
            cert_path,
            "--chunks",
            "10",
            "--chunk-size",
            "300000",
            "--rotate-every",
            "5",
            "--pause",
            "0.3",
        )
        assert lines[-1] == "OK: 3000000 bytes echoed intact, 2 rotations answered"
        stats = client_stats(lines)
        assert stats["bytesSent"] == stats["bytesReceived"] == 3_000_000
        assert stats["keyUpdatesRequested"] == 2
        # Our two requests were answered, and the server rotated by itself.
        assert stats["keyUpdatesReceived"] >= 3, lines

        server.wait_for(r"closed: KeyUpdates sent \d+")
        # Logged at most once a second per connection, with the numbers.
        requests = re.findall(
            r"KeyUpdate\(s\), (\d+) with update_requested", server.log
        )
        assert sum(map(int, requests)) == 2
        answered = re.findall(r"answered (\d+) KeyUpdate request", server.log)
        assert sum(map(int, answered)) == 2
        assert server.count("reason: policy: interval") >= 1, server.log
        server.wait_for(r"bytes received 3000000, sent 3000000")

    # A second run reuses the certificate the clients trust.
    with rekey_echo(tmp_path) as server:
        server.wait_for(
            "reusing the self-signed certificate .* fingerprint " + match.group(2)
        )


def test_echo_tls12_renegotiates(tmp_path: Path) -> None:
    with rekey_echo(
        tmp_path, *FAST, "--tls-max", "1.2", "--allow-client-renegotiation"
    ) as server:
        server.port  # noqa: B018 - wait until it listens
        lines = run_echo_client(
            server.port,
            tmp_path / "state" / "localhost.pem",
            "--chunks",
            "4",
            "--chunk-size",
            "100000",
            "--rotate-every",
            "2",
            "--pause",
            "0.4",
        )
        assert lines[0].startswith("connected: TLSv1.2 ")
        assert client_stats(lines)["renegotiations"] >= 2
        server.wait_for("closed: ")
        assert server.count("renegotiation completed (TLSv1.2)") >= 2


# -- rekey-tunnel ------------------------------------------------------------------


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.settimeout(30)
        while data := self.request.recv(65536):
            self.request.sendall(data)


@contextmanager
def plain_echo_server() -> Iterator[int]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@contextmanager
def tls_tunnel_to_plain_echo(tmp_path: Path, *args: str) -> Iterator[Twistd]:
    """``rekey-tunnel``, TLS in, to a plain TCP echo on loopback."""
    with (
        plain_echo_server() as backend,
        twistd(
            tmp_path,
            "rekey-tunnel",
            "--listen",
            "ssl:0:interface=127.0.0.1",
            "--connect",
            f"tcp:127.0.0.1:{backend}",
            "--state-dir",
            str(tmp_path / "state"),
            *args,
        ) as tunnel,
    ):
        yield tunnel


def test_tunnel_tls_in_front_of_plain_service(tmp_path: Path) -> None:
    with tls_tunnel_to_plain_echo(tmp_path, *FAST) as tunnel:
        lines = run_echo_client(
            tunnel.port,
            tmp_path / "state" / "localhost.pem",
            "--chunks",
            "8",
            "--chunk-size",
            "500000",
            "--rotate-every",
            "4",
            "--pause",
            "0.3",
        )
        assert lines[-1] == "OK: 4000000 bytes echoed intact, 2 rotations answered"
        assert client_stats(lines)["keyUpdatesReceived"] >= 3, lines
        tunnel.wait_for(r"closed: .*bytes received 4000000, sent 4000000")
        assert "(plain)" in tunnel.wait_for(r"relaying .*").group(0)
        assert tunnel.count("reason: policy: interval") >= 1, tunnel.log


def test_tunnel_plain_in_tls_out(tmp_path: Path) -> None:
    size = 4_000_000
    data = os.urandom(size)
    with (
        rekey_echo(tmp_path, *FAST) as server,
        twistd(
            tmp_path,
            "rekey-tunnel",
            "--listen",
            "tcp:0:interface=127.0.0.1",
            "--connect",
            f"ssl:127.0.0.1:{server.port}",
            "--servername",
            "localhost",
            "--cafile",
            str(tmp_path / "state" / "localhost.pem"),
            *FAST,
        ) as tunnel,
    ):
        received = bytearray()
        with socket.create_connection(("127.0.0.1", tunnel.port), timeout=20) as s:

            def read() -> None:
                while len(received) < size and (chunk := s.recv(65536)):
                    received.extend(chunk)

            reader = threading.Thread(target=read, daemon=True)
            reader.start()
            # About three seconds of traffic, for rotations to happen.
            for i in range(0, size, 250_000):
                s.sendall(data[i : i + 250_000])
                time.sleep(0.2)
            reader.join(30)
        assert bytes(received) == data
        tunnel.wait_for(r"closed: .*bytes received 4000000, sent 4000000")
        assert tunnel.count("reason: policy: interval") >= 1, tunnel.log
        server.wait_for(r"closed: .*bytes received 4000000, sent 4000000")
        # The server read the tunnel's rotations.
        assert server.count(" KeyUpdate(s), ") >= 1


# -- bad input ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def mismatched(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import trustme

    where = tmp_path_factory.mktemp("mismatched")
    ca = trustme.CA()
    one, other = ca.issue_cert("localhost"), ca.issue_cert("localhost")
    one.cert_chain_pems[0].write_to_path(str(where / "cert.pem"))
    one.private_key_pem.write_to_path(str(where / "key.pem"))
    other.private_key_pem.write_to_path(str(where / "other-key.pem"))
    (where / "junk.pem").write_text("not a certificate\n")
    return {p.stem: p for p in where.iterdir()}


BAD_ECHO = [
    (["--cert", "{missing}"], ["--cert", "No such file or directory"]),
    (["--cert", "{cert}", "--key", "{other-key}"], ["does not match the certificate"]),
    (["--cert", "{junk}", "--key", "{key}"], ["no PEM certificate"]),
    (
        ["--endpoint", "ssl:notaport"],
        ["--endpoint ssl:notaport", "not a valid endpoint"],
    ),
    (["--endpoint", "nosuch:1"], ["not a valid endpoint string", "nosuch"]),
    (["--endpoint", "tcp:0"], ["give an ssl: endpoint"]),
    (["--interval", "0"], ["--interval must be more than 0 seconds"]),
    (["--interval", "-5"], ["--interval must be more than 0 seconds"]),
    (["--interval", "soon"], ["--interval must be a number of seconds"]),
    (["--interval", "0.5", "--min-interval", "1"], ["shorter than --min-interval"]),
    (["--min-interval", "0.01"], ["min_interval must be at least"]),
    # Below what GnuTLS takes (8 KeyUpdates a second): an error, not a
    # floor silently raised.
    (
        ["--interval", "0.1", "--min-interval", "0.1"],
        ["min_interval must be at least 0.2 s", "GnuTLS"],
    ),
    (["--bytes", "lots"], ["--bytes must be a number of bytes"]),
    (
        ["--tls-min", "1.3", "--tls-max", "1.2"],
        ["--tls-min 1.3 is newer than --tls-max 1.2"],
    ),
    (["--tls-min", "1.1"], ["--tls-min must be 1.2 or 1.3"]),
    (["--no-such-option"], ["--no-such-option not recognized"]),
]


@pytest.mark.parametrize(("args", "fragments"), BAD_ECHO, ids=lambda x: " ".join(x))
def test_echo_bad_input(
    tmp_path: Path, mismatched: dict[str, Path], args: list[str], fragments: list[str]
) -> None:
    files = {name: str(path) for name, path in mismatched.items()}
    files["missing"] = str(tmp_path / "missing.pem")
    args = [a.format(**files) for a in args]
    done = run_twistd(
        tmp_path, "rekey-echo", "--state-dir", str(tmp_path / "state"), *args
    )
    line = assert_one_line_error(done, *fragments)
    assert line.startswith("twistd rekey-echo: error: ")
    assert done.returncode == 1
    assert "listening on" not in done.stdout


def test_echo_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_twistd(
            tmp_path,
            "rekey-echo",
            "--endpoint",
            f"ssl:{port}:interface=127.0.0.1",
            "--state-dir",
            str(tmp_path / "state"),
        )
    line = assert_one_line_error(done, "Address already in use")
    assert line == (
        f"twistd rekey-echo: error: cannot listen on "
        f"ssl:{port}:interface=127.0.0.1: Address already in use"
    )
    assert done.returncode == 1


BAD_TUNNEL = [
    (["--connect", "tcp:127.0.0.1:1"], ["--listen is required"]),
    (["--listen", "ssl:0"], ["--connect is required"]),
    (["--listen", "tcp:0", "--connect", "tcp:127.0.0.1:1"], ["no TLS to rotate"]),
    (["--listen", "ssl:0", "--connect", "tcp:127.0.0.1"], ["--connect tcp:127.0.0.1"]),
    (
        ["--listen", "tcp:0", "--connect", "ssl:localhost:1", "--cafile", "{missing}"],
        ["--cafile", "No such file or directory"],
    ),
    (
        [
            "--listen",
            "ssl:0",
            "--connect",
            "tcp:h:1",
            "--cert",
            "{cert}",
            "--key",
            "{other-key}",
        ],
        ["does not match"],
    ),
    (["--listen", "ssl:0", "--connect", "tcp:h:1", "--interval", "0"], ["--interval"]),
]


@pytest.mark.parametrize(("args", "fragments"), BAD_TUNNEL, ids=lambda x: " ".join(x))
def test_tunnel_bad_input(
    tmp_path: Path, mismatched: dict[str, Path], args: list[str], fragments: list[str]
) -> None:
    files = {name: str(path) for name, path in mismatched.items()}
    files["missing"] = str(tmp_path / "missing.pem")
    args = [a.format(**files) for a in args]
    done = run_twistd(
        tmp_path, "rekey-tunnel", "--state-dir", str(tmp_path / "state"), *args
    )
    line = assert_one_line_error(done, *fragments)
    assert line.startswith("twistd rekey-tunnel: error: ")


# -- in-process: options and the default certificate ---------------------------


def test_default_endpoint_is_loopback_8443(tmp_path: Path) -> None:
    from twisted_rekey.apps.echo import Options

    options = Options()
    options.check(["--state-dir", str(tmp_path)])
    spec = options["endpointSpec"]
    assert spec.description == "ssl:8443:interface=127.0.0.1"
    assert spec.plain == "tcp:8443:interface=127.0.0.1"
    policy = options["policy"]
    assert policy.interval == 5.0 and policy.min_interval == 1.0


def test_options_raise_usage_error_in_process(tmp_path: Path) -> None:
    from twisted.python import usage

    from twisted_rekey.apps.echo import Options

    with pytest.raises(usage.UsageError, match="more than 0 seconds"):
        Options().check(["--state-dir", str(tmp_path), "--interval", "0"])


def test_endpoint_keys_taken_from_ssl_string(
    tmp_path: Path, mismatched: dict[str, Path]
) -> None:
    from twisted_rekey.apps.echo import Options

    options = Options()
    cert = str(mismatched["cert"]).replace(":", "\\:")
    key = str(mismatched["key"]).replace(":", "\\:")
    options.check(
        ["--endpoint", f"ssl:0:interface=\\:\\:1:privateKey={key}:certKey={cert}"]
    )
    assert options["endpointSpec"].plain == "tcp:0:interface=\\:\\:1"
    assert options["certificate"].certPath == mismatched["cert"]


def test_default_certificate_reused_and_renewed(tmp_path: Path) -> None:
    from twisted_rekey.apps._certs import ensure_default_certificate

    first = ensure_default_certificate(tmp_path)
    assert first.created
    again = ensure_default_certificate(tmp_path)
    assert not again.created and again.fingerprint == first.fingerprint
    first.key_path.write_text("damaged\n")
    renewed = ensure_default_certificate(tmp_path)
    assert renewed.created and renewed.fingerprint != first.fingerprint
    cert = x509.load_pem_x509_certificate(renewed.cert_path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert {str(a) for a in san.get_values_for_type(x509.IPAddress)} == {
        "127.0.0.1",
        "::1",
    }


def default_curl(port: int, cafile: Path) -> None:
    """
    Fetch from a plugin's TLS side with curl's defaults (ALPN offering h2
    and http/1.1), through to an echo: the request must come back.
    """
    # The plugins speak no ALPN protocol, and must ignore the offer rather
    # than fail the handshake (Twisted 26.x alone answers internal_error).
    curl = require_tool("curl")
    done = subprocess.run(
        [
            curl,
            "--verbose",
            "--silent",
            "--http0.9",
            "--max-time",
            "3",
            "--cacert",
            str(cafile),
            f"https://127.0.0.1:{port}/echo-this",
        ],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
    )
    assert "ALPN: offers" in done.stderr, done.stderr
    assert "internal error" not in done.stderr, done.stderr
    assert "ALPN: server did not agree" in done.stderr, done.stderr
    # The request came back through TLS: an echo (no HTTP server) keeps
    # the connection open, so curl stops at --max-time.
    assert "GET /echo-this HTTP/1.1" in done.stdout, done.stderr
    assert done.returncode in (0, 28), done.stderr


def test_echo_accepts_a_default_curl(tmp_path: Path) -> None:
    with rekey_echo(tmp_path) as server:
        default_curl(server.port, tmp_path / "state" / "localhost.pem")
        # Why the connection ended is logged, not only its figures.
        server.wait_for(r"closed: KeyUpdates sent .*; closed cleanly")


def test_tunnel_accepts_a_default_curl(tmp_path: Path) -> None:
    with tls_tunnel_to_plain_echo(tmp_path) as tunnel:
        default_curl(tunnel.port, tmp_path / "state" / "localhost.pem")
        tunnel.wait_for(r"closed: KeyUpdates sent .*; closed cleanly")


def test_echo_logs_why_a_connection_failed(tmp_path: Path) -> None:
    # A client that does not trust the certificate aborts the handshake:
    # the echo names the alert it received.
    curl = require_tool("curl")
    with rekey_echo(tmp_path) as server:
        done = subprocess.run(
            [curl, "--silent", "--max-time", "5", f"https://127.0.0.1:{server.port}/"],
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
        )
        assert done.returncode != 0
        server.wait_for(r"closed: .*; TLS failure: .*alert")
