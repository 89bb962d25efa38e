"""
The project's own proof under load: many connections rotating both ways
through one reactor with every byte checked, the fault cases, hostile
peers against a server while a bystander keeps echoing, and (full size)
memory after 100,000 KeyUpdates and 10,000 connection cycles.

Everything runs in one process on loopback: one Twisted reactor holds the
servers and the well-behaved clients; the hostile peers are hand-driven
pyOpenSSL memory-BIO connections on blocking sockets in worker threads, so
that they can pack what a polite stack never would into one write.  CPU
per connection is the *reactor thread's* CPU time
(``pthread_getcpuclockid``), so the peers' own work is not counted.

Usage::

    python benchmarks/stress.py          # the small size, under a minute
    python benchmarks/stress.py --full   # 500 connections, memory runs

The small size is what ``tests/test_stress.py`` runs in CI (it checks the
outcomes, never the timings).  Not a timing test: figures depend on the
machine.  Measured here (2-core shared machine), see ``docs/security.rst``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trustme
from OpenSSL import SSL
from twisted.internet import defer, protocol, ssl, task
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure

from twisted_rekey import (
    ConnectionStateError,
    KeyUpdateFlood,
    PeerRefused,
    RekeyProtocolMixin,
    RenegotiationRateLimited,
    RotationPolicy,
    key_update,
)

TIMEOUT = 30.0
CHUNK = 16384


@dataclass(frozen=True)
class Size:
    name: str
    connections: int  # per TLS version
    seconds: float  # how long each client streams
    stream: int  # bytes each client sends (and gets back), spread over that
    hostile_repeats: int
    key_updates: int  # on one connection, for the memory figure (0: skip)
    cycles: int  # connection cycles, for the memory figure (0: skip)


SMALL = Size("small", 8, 3.0, 512 * 1024, 3, 0, 0)
FULL = Size("full", 250, 60.0, 2 * 1024 * 1024, 20, 100_000, 10_000)


@dataclass
class Results:
    size: str = ""
    connections: int = 0
    bytes_checked: int = 0
    digests_matched: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    rotations: dict[str, int] = field(default_factory=dict)
    faults: dict[str, str] = field(default_factory=dict)
    hostile: dict[str, dict[str, Any]] = field(default_factory=dict)
    normal_cpu_ms: float = 0.0
    bystander_echoes: int = 0
    bystander_lost: bool = False
    memory: dict[str, Any] = field(default_factory=dict)
    delayed_calls_left: int = 0

    def report(self) -> str:
        lines = [
            f"size: {self.size}",
            f"connections: {self.connections} (half TLS 1.3, half TLS 1.2), "
            f"{self.bytes_checked / 1e6:.1f} MB checked, "
            f"{self.digests_matched} SHA-256 digests matched",
            "failed connections: "
            + (", ".join(f"TLS {k} ({v})" for k, v in self.failed.items()) or "none"),
            "rotations: "
            + ", ".join(f"{k} {v}" for k, v in sorted(self.rotations.items())),
            "faults: " + ", ".join(f"{k}: {v}" for k, v in self.faults.items()),
            f"normal short connection: {self.normal_cpu_ms:.2f} ms server CPU",
        ]
        for name, h in self.hostile.items():
            ratio = h["cpu_ms"] / self.normal_cpu_ms if self.normal_cpu_ms else 0
            lines.append(
                f"hostile {name}: {h['outcome']}, {h['cpu_ms']:.2f} ms server CPU "
                f"per connection ({ratio:.1f}x normal), server processed "
                f"{h['processed']} of {h['sent']}"
            )
        lines.append(
            f"bystander: {self.bystander_echoes} echoes checked, "
            f"lost={self.bystander_lost}"
        )
        for k, v in self.memory.items():
            lines.append(f"memory {k}: {v}")
        lines.append(f"delayed calls left: {self.delayed_calls_left}")
        return "\n".join(lines)


# -- certificates and options ---------------------------------------------------


class Certs:
    def __init__(self) -> None:
        self.ca = trustme.CA()
        self.server = self.ca.issue_cert("localhost", "127.0.0.1")
        self.directory = tempfile.TemporaryDirectory(prefix="twisted-rekey-stress-")
        self.ca_file = os.path.join(self.directory.name, "ca.pem")
        self.ca.cert_pem.write_to_path(self.ca_file)

    def serverOptions(self, version: str) -> Any:
        private = ssl.PrivateCertificate.loadPEM(
            self.server.private_key_and_cert_chain_pem.bytes()
        )
        options = ssl.CertificateOptions(
            privateKey=private.privateKey.original, certificate=private.original
        )
        if version == "1.2":
            options.getContext().set_max_proto_version(SSL.TLS1_2_VERSION)
        return options

    def clientOptions(self) -> Any:
        return ssl.optionsForClientTLS(
            "localhost", ssl.Certificate.loadPEM(self.ca.cert_pem.bytes())
        )


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


async def _sleep(seconds: float) -> None:
    await task.deferLater(_reactor(), seconds, lambda: None)


async def _until(
    check: Callable[[], bool], what: str, timeout: float = TIMEOUT
) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await _sleep(0.01)


def _serverCPU() -> float:
    """Seconds of CPU the reactor (main) thread used so far."""
    clock = time.pthread_getcpuclockid(threading.main_thread().ident or 0)
    return time.clock_gettime(clock)


# -- the well-behaved side ------------------------------------------------------


class EchoServer(RekeyProtocolMixin, protocol.Protocol):
    # Both directions' keys renewed by their own traffic: ours by bytes,
    # the peer's by request (TLS 1.3) or renegotiation (TLS 1.2).
    rotationPolicy = RotationPolicy(
        max_bytes=256 * 1024, request_peer_interval=0.4, min_interval=0.2
    )
    rotationGranularity = 0.05
    # The clients are OpenSSL's, which hold their writes while a
    # renegotiation runs: renegotiate under their traffic, without waiting
    # for a pause that a stream never makes (Java's JSSE is what needs it).
    renegotiationQuietPeriod = None

    def connectionMade(self) -> None:
        self.factory.built.append(self)  # type: ignore[attr-defined]
        self.lost: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.lost = reason


class StreamClient(RekeyProtocolMixin, protocol.Protocol):
    """Streams *total* bytes, checks their echo by SHA-256, then closes."""

    total = 0
    seconds = 0.0
    version = ""
    rotationGranularity = 0.05

    def connectionMade(self) -> None:
        self.sentHash = hashlib.sha256()
        self.receivedHash = hashlib.sha256()
        self.sent = 0
        self.received = 0
        self.done: defer.Deferred[None] = defer.Deferred()
        self.lostWith: Failure | None = None
        self.seed = os.urandom(CHUNK)

    def handshakeCompleted(self) -> None:
        super().handshakeCompleted()
        self.started = time.monotonic()
        self.ticker = task.LoopingCall(self.pump)
        if self.total:
            self.ticker.start(0.02)

    def pump(self) -> None:
        # Spread over self.seconds, at most 128 KiB in flight.
        due = self.total
        if self.seconds:
            elapsed = time.monotonic() - self.started
            due = min(self.total, int(self.total * elapsed / self.seconds) + CHUNK)
        while self.sent < due and self.sent - self.received < 128 * 1024:
            chunk = self.seed[: min(CHUNK, self.total - self.sent)]
            self.seed = self.seed[1:] + self.seed[:1]
            self.sentHash.update(chunk)
            self.sent += len(chunk)
            self.transport.write(chunk)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.receivedHash.update(data)
        self.received += len(data)
        if self.received >= self.total and not self.done.called:
            if self.ticker.running:
                self.ticker.stop()
            self.done.callback(None)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.lostWith = reason
        if self.ticker.running:
            self.ticker.stop()
        if not self.done.called:
            if self.total:
                self.done.errback(reason)
            else:
                self.done.callback(None)


class _Factory(protocol.ClientFactory):
    def __init__(self, proto: type[protocol.Protocol], **attrs: Any) -> None:
        self.protocol = proto
        self.attrs = attrs
        self.built: list[Any] = []

    def buildProtocol(self, addr: Any) -> Any:
        p = super().buildProtocol(addr)
        for k, v in self.attrs.items():
            setattr(p, k, v)
        return p


async def _connect(certs: Certs, port: int, cls: type[Any], **attrs: Any) -> Any:
    factory = _Factory(cls, **attrs)
    made: defer.Deferred[Any] = defer.Deferred()

    class Client(cls):  # type: ignore[valid-type, misc]
        def handshakeCompleted(self) -> None:
            super().handshakeCompleted()
            if not made.called:
                made.callback(self)

    factory.protocol = Client
    _reactor().connectSSL("127.0.0.1", port, factory, certs.clientOptions(), timeout=5)
    return await made.addTimeout(TIMEOUT, _reactor())


# -- part 1: many connections ---------------------------------------------------


async def _streams(size: Size, certs: Certs, ports: dict[str, Any], r: Results) -> None:
    policies = [
        # Requests on: both keys renewed by time, from the client side too.
        RotationPolicy(interval=0.2, request_peer_interval=0.4, min_interval=0.2),
        # Requests off: our key by bytes only.
        RotationPolicy(max_bytes=64 * 1024, min_interval=0.2),
    ]
    pending = []
    for version in ("1.3", "1.2"):
        for i in range(size.connections):
            attrs = {
                "total": size.stream,
                "seconds": size.seconds,
                "version": version,
                "rotationPolicy": policies[i % 2],
            }
            pending.append(
                defer.ensureDeferred(
                    _connect(
                        certs, ports[version].getHost().port, StreamClient, **attrs
                    )
                )
            )
    clients = list(await defer.gatherResults(pending))
    deadline = size.seconds + TIMEOUT
    for c in clients:
        try:
            await c.done.addTimeout(deadline, _reactor())
        except Exception as e:
            # Counted and named, not hidden: the report says what failed.
            name = f"{c.version}: {e}"
            r.failed[name] = r.failed.get(name, 0) + 1
    r.connections = len(clients)
    for c in clients:
        r.bytes_checked += c.sent + c.received
        if c.sentHash.digest() == c.receivedHash.digest():
            r.digests_matched += 1
        stats = c.rekeyStats
        key = f"TLS {c.version} client"
        r.rotations[key] = r.rotations.get(key, 0) + stats.keyUpdatesSent
    for version, port in ports.items():
        for s in port.app.built:
            st = s.rekeyStats
            key = f"TLS {version} server"
            r.rotations[key] = (
                r.rotations.get(key, 0) + st.keyUpdatesSent + st.renegotiations
            )
            r.rotations[f"TLS {version} server requests"] = (
                r.rotations.get(f"TLS {version} server requests", 0)
                + st.keyUpdatesRequested
            )
    for c in clients:
        c.transport.loseConnection()  # type: ignore[union-attr]
    await _until(lambda: all(c.lostWith is not None for c in clients), "the closes")


# -- part 2: faults -------------------------------------------------------------


async def _faults(certs: Certs, ports: dict[str, Any], r: Results) -> None:
    async def fresh(version: str) -> tuple[Any, Any]:
        port = ports[version]
        before = len(port.app.built)
        client = await _connect(certs, port.getHost().port, StreamClient, total=0)
        await _until(lambda: len(port.app.built) > before, "the server side")
        return client, port.app.built[-1]

    async def closed(*protos: Any) -> None:
        await _until(
            lambda: all(
                getattr(p, "lostWith", None) is not None or getattr(p, "lost", None)
                for p in protos
            ),
            "the connection to end",
        )

    # The peer resets while our request waits for its answer.
    client, server = await fresh("1.3")
    waiting = client.keyUpdate(requestPeer=True)
    got: list[Any] = []
    waiting.addBoth(got.append)
    server.transport.abortConnection()
    await closed(client)
    await _until(lambda: bool(got), "the waiting Deferred")
    r.faults["reset while a request waits"] = (
        "PeerRefused"
        if isinstance(got[0], Failure) and got[0].check(PeerRefused)
        else repr(got[0])
    )

    # keyUpdate() racing loseConnection().
    client, server = await fresh("1.3")
    client.transport.loseConnection()
    got = []
    client.keyUpdate().addBoth(got.append)
    r.faults["keyUpdate after loseConnection"] = (
        "ConnectionStateError"
        if got and isinstance(got[0], Failure) and got[0].check(ConnectionStateError)
        else repr(got)
    )
    await closed(client)

    # A client renegotiation the server refuses (OpenSSL 3's default).
    client, server = await fresh("1.2")
    got = []
    client.renegotiate(timeout=10).addBoth(got.append)
    await _until(lambda: bool(got), "the refusal")
    r.faults["client renegotiation refused"] = (
        "PeerRefused"
        if isinstance(got[0], Failure) and got[0].check(PeerRefused)
        else repr(got[0])
    )
    if client.lostWith is None:
        client.transport.abortConnection()
    await closed(client)

    # loseConnection() while the server's renegotiation runs, both sides.
    for closer in ("client", "server"):
        client, server = await fresh("1.2")
        server.renegotiate(timeout=10).addErrback(lambda f: None)
        started = time.monotonic()
        (client if closer == "client" else server).transport.loseConnection()
        await closed(client, server)
        r.faults[f"{closer} closes during renegotiation"] = (
            f"closed in {(time.monotonic() - started) * 1000:.0f} ms"
        )


# -- part 3: hostile peers ------------------------------------------------------


class Scripted:
    """
    A hand-driven pyOpenSSL client over a memory BIO and a blocking socket:
    it sends exactly the bytes it is told to, in one write if asked.
    """

    def __init__(self, port: int, version: str) -> None:
        ctx = SSL.Context(SSL.TLS_METHOD)
        if version == "1.2":
            ctx.set_max_proto_version(SSL.TLS1_2_VERSION)
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.conn = SSL.Connection(ctx, None)
        self.conn.set_connect_state()
        self.handshake()

    def handshake(self) -> None:
        while True:
            try:
                self.conn.do_handshake()
                break
            except SSL.WantReadError:
                self.flush()
                data = self.sock.recv(65536)
                if not data:
                    raise ConnectionError("closed during the handshake") from None
                self.conn.bio_write(data)
        self.flush()

    def pending(self) -> bytes:
        out = bytearray()
        while True:
            try:
                out += self.conn.bio_read(65536)
            except SSL.WantReadError:
                return bytes(out)

    def flush(self) -> None:
        data = self.pending()
        if data:
            self.sock.sendall(data)

    def echo(self, line: bytes) -> bytes:
        self.conn.send(line)
        self.flush()
        got = b""
        while len(got) < len(line):
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed")
            self.conn.bio_write(data)
            try:
                got += self.conn.recv(65536)
            except SSL.WantReadError:
                pass
            # A renegotiation's own messages go out as they come.
            self.flush()
        return got

    def waitClosed(self) -> bool:
        """Whether the server closed the connection within TIMEOUT."""
        self.sock.settimeout(TIMEOUT)
        try:
            while self.sock.recv(65536):
                pass
        except OSError:
            pass  # reset: closed all the same
        return True

    def close(self) -> None:
        self.sock.close()


def _pack(client: Scripted, count: int, requested: bool, data: bool) -> bytes:
    blob = bytearray()
    for _ in range(count):
        key_update(client.conn, requested)
        if data:
            client.conn.send(b"x")
        blob += client.pending()
    return bytes(blob)


def _hostileRun(port: int, version: str, case: str) -> tuple[int, int]:
    """One hostile connection; returns (messages sent, checked later)."""
    client = Scripted(port, version)
    try:
        if case == "one write of 2427 KeyUpdates":
            blob = _pack(client, 2427, False, False)
            client.sock.sendall(blob)
            sent = 2427
        elif case == "update_requested on every record":
            blob = _pack(client, 2000, True, True)
            client.sock.sendall(blob)
            sent = 2000
        elif case == "renegotiating in a loop":
            sent = 0
            for _ in range(50):
                try:
                    client.conn.renegotiate()
                    client.handshake()
                except (OSError, SSL.Error, ConnectionError):
                    break  # the server had enough
                sent += 1
        elif case == "garbage after the handshake":
            client.sock.sendall(os.urandom(65536))
            sent = 65536
        else:  # a normal short connection
            assert client.echo(b"hello\n") == b"hello\n"
            client.conn.shutdown()
            client.flush()
            sent = 1
        client.waitClosed()
        return sent, 0
    finally:
        client.close()


class Bystander(RekeyProtocolMixin, protocol.Protocol):
    """Keeps echoing through the hostile phase, checking every echo."""

    def connectionMade(self) -> None:
        self.expected = bytearray()
        self.received = bytearray()
        self.echoes = 0
        self.lostWith: Failure | None = None

    def tick(self) -> None:
        line = b"%08d bystander\n" % self.echoes
        self.expected += line
        self.transport.write(line)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        assert bytes(self.expected).startswith(bytes(self.received))
        self.echoes = self.received.count(b"\n")

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.lostWith = reason


CASES = (
    ("1.3", "one write of 2427 KeyUpdates", KeyUpdateFlood, 2427),
    ("1.3", "update_requested on every record", KeyUpdateFlood, 2000),
    ("1.2", "renegotiating in a loop", RenegotiationRateLimited, 50),
    ("1.3", "garbage after the handshake", SSL.Error, 0),
)


async def _hostile(size: Size, certs: Certs, ports: dict[str, Any], r: Results) -> None:

    async def measure(version: str, case: str) -> tuple[float, list[Any]]:
        port = ports[version]
        spent = 0.0
        servers: list[Any] = []
        for _ in range(size.hostile_repeats):
            before = len(port.app.built)
            cpu = _serverCPU()
            await deferToThread(_hostileRun, port.getHost().port, version, case)
            await _until(
                lambda before=before: (  # type: ignore[misc]
                    len(port.app.built) > before and port.app.built[-1].lost is not None
                ),
                f"the server to end {case}",
            )
            spent += _serverCPU() - cpu
            servers.append(port.app.built[-1])
        return spent / size.hostile_repeats * 1000, servers

    # The CPU figures first, with nothing else running in the reactor.
    r.normal_cpu_ms, _ = await measure("1.3", "normal")
    for version, case, _expected, sent in CASES:
        cpu, _servers = await measure(version, case)
        r.hostile[case] = {"cpu_ms": cpu, "sent": sent}
    # Then all of it again while a bystander keeps echoing.
    bystander = await _connect(certs, ports["1.3"].getHost().port, Bystander)
    ticker = task.LoopingCall(bystander.tick)
    ticker.start(0.01)
    try:
        for version, case, expected, _sent in CASES:
            _, servers = await measure(version, case)
            outcomes = {
                type(s.lost.value).__name__ for s in servers if s.lost is not None
            }
            processed = max(
                s.rekeyStats.keyUpdatesReceived + s.rekeyStats.renegotiations
                for s in servers
            )
            r.hostile[case].update(
                outcome="dropped: " + ", ".join(sorted(outcomes)),
                ok=all(s.lost is not None and s.lost.check(expected) for s in servers),
                processed=processed,
            )
        await _sleep(0.1)
    finally:
        ticker.stop()
    await _until(lambda: bystander.echoes == bystander.expected.count(b"\n"), "echoes")
    r.bystander_echoes = bystander.echoes
    r.bystander_lost = bystander.lostWith is not None
    bystander.transport.loseConnection()
    await _until(lambda: bystander.lostWith is not None, "the bystander to close")


# -- part 4: memory (full size) -------------------------------------------------


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Counting(EchoServer):
    # The guard has its own figures: here only memory counts.
    keyUpdateFloodLimit = None
    keyUpdateRateLimit = None
    rotationPolicy = None


async def _memory(size: Size, certs: Certs, r: Results) -> None:
    reactor = _reactor()
    if size.key_updates:
        factory = _Factory(Counting)
        port = reactor.listenSSL(
            0, factory, certs.serverOptions("1.3"), interface="127.0.0.1"
        )
        client = await _connect(certs, port.getHost().port, StreamClient, total=0)
        conn = client.transport.getHandle()
        await _until(lambda: bool(factory.built), "the server side")
        server = factory.built[0]
        # A round trip first: the client's handshake is over for OpenSSL
        # only once the server's post-handshake messages were read.
        client.transport.write(b"x")
        await _until(lambda: client.received >= 1, "the first echo")
        before = _rss()
        sent = 0
        while sent < size.key_updates:
            for _ in range(50):
                key_update(conn, False)
            sent += 50
            client.transport.write(b"x")
            await _until(
                lambda sent=sent: server.rekeyStats.keyUpdatesReceived >= sent,  # type: ignore[misc]
                "the updates",
                60,
            )
        r.memory["100k KeyUpdates (RSS)"] = (
            f"{before / 2**20:.1f} MiB -> {_rss() / 2**20:.1f} MiB "
            f"({server.rekeyStats.keyUpdatesReceived} received)"
        )
        client.transport.loseConnection()
        await _until(lambda: client.lostWith is not None, "the close")
        await port.stopListening()
    if size.cycles:
        factory = _Factory(EchoServer)
        port = reactor.listenSSL(
            0, factory, certs.serverOptions("1.3"), interface="127.0.0.1"
        )
        before = 0
        for i in range(0, size.cycles, 50):
            if i == 1000:
                before = _rss()  # after warm-up
            batch = [
                await _connect(certs, port.getHost().port, StreamClient, total=1024)
                for _ in range(50)
            ]
            await defer.gatherResults([c.done for c in batch]).addTimeout(
                TIMEOUT, reactor
            )
            for c in batch:
                c.transport.loseConnection()
            await _until(
                lambda batch=batch: all(c.lostWith is not None for c in batch),  # type: ignore[misc]
                "closes",
            )
            factory.built.clear()
        r.memory["10k connection cycles (RSS, after 1000)"] = (
            f"{before / 2**20:.1f} MiB -> {_rss() / 2**20:.1f} MiB"
        )
        await port.stopListening()


# -- the whole run ---------------------------------------------------------------


async def run(size: Size) -> Results:
    reactor = _reactor()
    certs = Certs()
    r = Results(size=size.name)
    ports: dict[str, Any] = {}

    class Allowing(EchoServer):
        # The hostile renegotiation loop needs a server that allows some.
        allowClientRenegotiation = True

    for version in ("1.3", "1.2"):
        cls = Allowing if version == "1.2" else EchoServer
        app = _Factory(cls)
        ports[version] = reactor.listenSSL(
            0, app, certs.serverOptions(version), interface="127.0.0.1"
        )
        ports[version].app = app
    try:
        await _streams(size, certs, ports, r)
        for port in ports.values():
            port.app.built.clear()
        ports["1.2"].app.protocol = EchoServer  # faults: refusing server
        await _faults(certs, ports, r)
        ports["1.2"].app.protocol = Allowing
        await _hostile(size, certs, ports, r)
        await _memory(size, certs, r)
    finally:
        for port in ports.values():
            await port.stopListening()
    await _sleep(0.2)
    r.delayed_calls_left = len(
        [c for c in reactor.getDelayedCalls() if "twisted_rekey" in repr(c.func)]
    )
    return r


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="the full size")
    args = parser.parse_args(argv)
    size = FULL if args.full else SMALL

    async def body(reactor: Any) -> None:
        print((await run(size)).report(), flush=True)

    # react() exits the process with the run's outcome.
    task.react(lambda reactor: defer.ensureDeferred(body(reactor)))  # type: ignore[no-untyped-call]
    return 0


if __name__ == "__main__":
    sys.exit(main())
