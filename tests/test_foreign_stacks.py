"""
Rotation under traffic against Go's ``crypto/tls``, Java's JSSE and Node's
``tls`` (drivers in ``tests/drivers/``, see :mod:`foreign`), in both roles,
on TLS 1.3 (KeyUpdate) and TLS 1.2 (renegotiation), and OpenSSL's and
GnuTLS's command-line clients under traffic (their other uses are in
``test_connection_peers.py`` and ``test_protocol_peers.py``).

What proves a rotation here, on the other side:

- TLS 1.2: the driver's own count of handshakes (a renegotiation is one
  more).
- TLS 1.3: none of these stacks tells its application about a KeyUpdate.
  Our side logs each one it sent; every byte the driver then decrypts and
  checks (by SHA-256) was sealed under the new key, which the driver could
  only have installed by reading that KeyUpdate.  When we ask the peer to
  answer (the example client does), its answer is counted on our side.

Every driver and twistd is stopped by its pid; every wait is bounded.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from foreign import ForeignPeer
from peers import CertFiles, GnuTLSClient, OpenSSLClient
from test_plugins import client_stats, rekey_echo, run_echo_client

# Rotations every second while data flows, for ~3 s per client.
FAST = ["--interval", "1", "--min-interval", "0.5"]
STREAM = {"nbytes": 2_400_000, "chunk": 8192, "pace": 0.01}
# Bursts with pauses between them, which TLS 1.2 rotation waits for.
BURSTS = {"nbytes": 800_000, "chunk": 100_000, "pace": 0.5}
# Java's JSSE fails if it writes while a renegotiation runs (docs/security.rst):
# each burst's echo is read in full before a pause long enough for the
# server's quiet period (QUIET) and a renegotiation on a loaded machine.
JAVA_BURSTS = {"nbytes": 400_000, "chunk": 100_000, "pace": 1.0, "lockstep": True}
QUIET = ["--renegotiation-quiet", "0.1"]


def _trusting(tmp_path: Path) -> CertFiles:
    """Files for a client that trusts rekey-echo's self-signed certificate."""
    ca = tmp_path / "state" / "localhost.pem"
    return CertFiles(None, tmp_path, ca, ca, ca, ca, ca)


def _close_wait(port: int) -> list[str]:
    """Sockets on *port* in CLOSE-WAIT: a peer left, and we never read it."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state = fields[1], fields[3]
            if int(local.rsplit(":", 1)[1], 16) == port and state == "08":
                found.append(line)
    return found


def _wait_closed(server: object, count: int, port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    log = ""
    while time.monotonic() < deadline:
        log = server.log  # type: ignore[attr-defined]
        if len(re.findall(r"rekey-echo: \S+ closed: ", log)) >= count and not (
            _close_wait(port)
        ):
            return
        time.sleep(0.1)
    raise AssertionError(
        f"connections not all closed (CLOSE-WAIT: {_close_wait(port)}):\n{log}"
    )


def _connection_stats(log: str) -> list[dict[str, int]]:
    stats = []
    for m in re.finditer(r"closed: KeyUpdates sent (\d+) .*renegotiations (\d+)", log):
        stats.append({"keyUpdatesSent": int(m[1]), "renegotiations": int(m[2])})
    return stats


def test_go_tls12_clients_survive_policy_renegotiations(tmp_path: Path) -> None:
    # Go writes from one goroutine while another reads through our
    # renegotiations, started without waiting for a quiet client; each echo
    # write meets them.  This used to hang the echo (its producer paused,
    # the socket no longer read, CLOSE-WAIT left behind) or end in Go's
    # unexpected_message (our data after the HelloRequest).
    with rekey_echo(
        tmp_path, "--tls-max", "1.2", "--renegotiation-quiet", "0", *FAST
    ) as server:
        port = server.port
        certs = _trusting(tmp_path)
        clients = [
            ForeignPeer(
                "go",
                "client",
                certs,
                port=port,
                tls_max="1.2",
                renegotiate="freely",
                **STREAM,  # type: ignore[arg-type]
            )
            for _ in range(3)
        ]
        try:
            for client in clients:
                client.start()
            for client in clients:
                client.result()
                assert set(client.handshakes()) == {"TLS1.2"}
                assert client.renegotiations() >= 1, client.output
        finally:
            for client in clients:
                client.stop()
        _wait_closed(server, 3, port)
        stats = _connection_stats(server.log)
        assert len(stats) == 3
        assert sum(s["renegotiations"] for s in stats) == sum(
            c.renegotiations() for c in clients
        )


@pytest.mark.parametrize("version", ["1.3", "1.2"])
def test_clients_of_our_server(tmp_path: Path, version: str) -> None:
    """Go, Java and Node clients at once, against ``rekey-echo``."""
    with rekey_echo(
        tmp_path, "--tls-max", version, "--tls-min", version, *FAST, *QUIET
    ) as server:
        port = server.port
        certs = _trusting(tmp_path)
        # TLS 1.2: the policy waits for a pause in the client's traffic.
        traffic = {"go": BURSTS, "java": JAVA_BURSTS, "node": BURSTS}
        if version == "1.3":
            traffic = dict.fromkeys(traffic, STREAM)
        clients = {
            stack: ForeignPeer(
                stack,
                "client",
                certs,
                port=port,
                tls_min=version,
                tls_max=version,
                **traffic[stack],  # type: ignore[arg-type]
                **({"renegotiate": "freely"} if stack == "go" else {}),  # type: ignore[arg-type]
            )
            for stack in traffic
        }
        try:
            for client in clients.values():
                client.start()
            for client in clients.values():
                client.result()
        finally:
            for client in clients.values():
                client.stop()
        _wait_closed(server, 3, port)
        stats = _connection_stats(server.log)
        assert len(stats) == 3
        if version == "1.2":
            for stack, client in clients.items():
                assert client.renegotiations() >= 1, (stack, client.output)
            assert all(s["renegotiations"] >= 1 for s in stats), server.log
        else:
            for client in clients.values():
                assert client.renegotiations() == 0
            assert all(s["keyUpdatesSent"] >= 1 for s in stats), server.log


@pytest.mark.parametrize("stack", ["gnutls-cli", "s_client"])
def test_cli_clients_under_traffic(tmp_path: Path, stack: str) -> None:
    # OpenSSL and GnuTLS clients hold their writes during their handshake:
    # the policy may renegotiate under their traffic without waiting.
    with rekey_echo(
        tmp_path, "--tls-max", "1.2", "--renegotiation-quiet", "0", *FAST
    ) as server:
        certs = _trusting(tmp_path)
        client: GnuTLSClient | OpenSSLClient
        if stack == "gnutls-cli":
            client = GnuTLSClient(certs, server.port, version="1.2")
            seen = r"Rehandshake was performed"
        else:
            client = OpenSSLClient(certs, server.port, version="1.2")
            seen = r"<<< TLS 1\.2, Handshake \[length 0004\], HelloRequest"
        with client:
            lines = [f"line {i} " + "x" * 2000 for i in range(120)]
            for line in lines:
                client.send_line(line)
                time.sleep(0.02)
            client.expect("^line 119 ")
            echoed = re.findall(r"^line \d+ x+$", client.output, re.M)
            assert echoed == lines
            assert client.count(seen) >= 1, client.output[-2000:]
        _wait_closed(server, 1, server.port)
        [stats] = _connection_stats(server.log)
        # The client may have seen one more start, as it was stopped.
        assert 1 <= stats["renegotiations"] <= client.count(seen)


# The example client rotates every other chunk: a KeyUpdate asking the
# server to answer (TLS 1.3) or a renegotiation (TLS 1.2), and waits for it.
SERVERS = [
    ("go", "1.3"),
    ("java", "1.3"),
    ("java", "1.2"),
    ("node", "1.2"),
]


@pytest.mark.parametrize(("stack", "version"), SERVERS)
def test_our_client_against_their_server(
    cert_files: CertFiles, stack: str, version: str
) -> None:
    with ForeignPeer(
        stack, "server", cert_files, tls_min=version, tls_max=version
    ) as server:
        lines = run_echo_client(
            server.port,
            cert_files.ca_cert,
            "--servername",
            "localhost",
            "--chunks",
            "6",
            "--chunk-size",
            "100000",
            "--rotate-every",
            "2",
            "--pause",
            "0.05",
        )
        assert lines[-1] == "OK: 600000 bytes echoed intact, 3 rotations answered"
        [closed] = server.closed()
        assert closed.nbytes == 600_000
        stats = client_stats(lines)
        if version == "1.2":
            # The server saw each of our renegotiations.
            assert server.renegotiations() == stats["renegotiations"] == 3
        else:
            # Each request answered by the server's own KeyUpdate.
            assert stats["keyUpdatesRequested"] == 3
            assert stats["keyUpdatesReceived"] >= 3


def test_go_server_refuses_renegotiation(cert_files: CertFiles) -> None:
    # Go's crypto/tls has no server-side renegotiation: it answers a
    # ClientHello after the handshake with no_renegotiation and closes.
    # Our client says so instead of hanging.
    with ForeignPeer("go", "server", cert_files, tls_max="1.2") as server:
        done = subprocess.run(
            [
                sys.executable,
                str(Path(__file__).parent.parent / "examples" / "echo_client.py"),
                "--port",
                str(server.port),
                "--cafile",
                str(cert_files.ca_cert),
                "--servername",
                "localhost",
                "--chunks",
                "2",
                "--rotate-every",
                "1",
                "--timeout",
                "20",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode != 0
        assert "PeerRefused" in done.stderr, done.stdout + done.stderr
