"""
Many connections on one reactor that really send: the CPU of the server and
of its clients with and without a rotation policy, and memory per idle
connection.

For each mode a server process (one reactor) accepts N TLS 1.3 connections
from a client process over loopback.  All modes run at the same time, so
their measurement windows are the same seconds of the machine's life and a
slow spell hits every mode alike:

``plain``
    Twisted TLS with an echo protocol: the baseline.
``watch``
    the same factory in :class:`twisted_rekey.RotatingFactory` with no
    policy.
``policy``
    :class:`twisted_rekey.RotatingFactory` with
    ``RotationPolicy(interval=...)``: every connection that sent something
    rotates about once per interval (N/interval KeyUpdates per second).
``bare``
    plain Twisted TLS whose server calls the resolved C function itself
    (``SSL_key_update``, ``SSL_do_handshake``, then Twisted's flush of the
    memory BIO to the socket) on every connection once per interval, spread
    evenly: the same KeyUpdates per second at the least cost any library on
    this OpenSSL and Twisted can have, the limit of the policy's figure.

First the memory: each server's RSS before listening and once all N
handshakes are done, the connections idle.  Then every client connection
sends a heartbeat (16 bytes, echoed) every *heartbeat* seconds, spread
evenly; after a warm-up longer than the interval (so that rotations have
begun), the CPU time (``getrusage``) of every server and client process is
taken over the same windows.  Then the clients may grow to the next number
of connections, and the warm-up and windows repeat.

The processes take their orders on stdin, one line each (``GROW n``,
``BEAT``, ``WINDOW``, ``STOP``), and answer on stdout.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MODES = ("plain", "watch", "policy", "bare")


def _raiseFileLimit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        sys.exit(
            f"RLIMIT_NOFILE hard limit {hard} < {needed} needed: use fewer "
            f"connections or raise the limit (ulimit -Hn)"
        )
    if soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _say(**fields: Any) -> None:
    print("RESULT " + json.dumps(fields), flush=True)


def _commands(reactor: Any, handle: Any) -> None:
    # Orders from the orchestrator, one per line on stdin.
    from twisted.internet import stdio
    from twisted.protocols.basic import LineReceiver

    class Orders(LineReceiver):
        delimiter = b"\n"

        def lineReceived(self, line: bytes) -> None:
            handle(*line.decode().split())

        def connectionLost(self, reason: object = None) -> None:
            if reactor.running:
                reactor.stop()

    stdio.StandardIO(Orders())


# -- the server: one reactor holding every connection ------------------------------


def server(args: argparse.Namespace) -> None:
    _raiseFileLimit(args.max_connections + 100)
    from twisted.internet import protocol, reactor, ssl
    from twisted.protocols.tls import TLSMemoryBIOFactory
    from twisted.protocols.wire import Echo

    from twisted_rekey import RotatingFactory, RotationPolicy, rekeyableFor

    pem = Path(args.certs, "server.pem").read_bytes()
    private = ssl.PrivateCertificate.loadPEM(pem)
    options = ssl.CertificateOptions(
        privateKey=private.privateKey.original, certificate=private.original
    )
    options.getContext()  # build the Context before the baseline
    inner = protocol.Factory.forProtocol(Echo)
    factory: Any = inner
    if args.mode == "watch":
        factory = RotatingFactory(inner, None)
    elif args.mode == "policy":
        policy = RotationPolicy(
            interval=args.interval, min_interval=min(1.0, args.interval)
        )
        factory = RotatingFactory(inner, policy)

    # Keep the TLS protocols (to count handshakes and rotations) without
    # touching the measured protocol: wrap buildProtocol only.
    built: list[Any] = []
    tlsFactory = TLSMemoryBIOFactory(options, False, factory)
    original = tlsFactory.buildProtocol

    def buildProtocol(addr: Any) -> Any:
        p = original(addr)
        built.append(p)
        return p

    tlsFactory.buildProtocol = buildProtocol  # type: ignore[method-assign]
    gc.collect()
    rssBefore = _rss()
    port = reactor.listenTCP(0, tlsFactory, backlog=1024, interface="127.0.0.1")
    print(f"PORT {port.getHost().port}", flush=True)

    bare = [0]  # KeyUpdates the bare mode sent
    if args.mode == "bare":
        _rotateBare(built, args.interval, bare)

    def rotations() -> int:
        total = bare[0]
        for p in built:
            # The TLS protocol itself: RotatingFactory puts nothing between
            # it and the application's Echo.
            rotation = rekeyableFor(p)
            schedule = None if rotation is None else rotation.rotationSchedule
            if schedule is not None:
                total += schedule.rotations
        return total

    window: dict[str, float] = {}
    # BENCH_PROFILE=path: cProfile this server's windows (not its
    # handshakes) and write the statistics to path.
    profilePath = os.environ.get("BENCH_PROFILE")
    profiler = None
    if profilePath and args.mode == "policy":
        import cProfile

        profiler = cProfile.Profile()

    def handle(order: str, *rest: str) -> None:
        if order == "COUNT":  # how many handshakes are done; memory with them
            done = sum(1 for p in built if p._handshakeDone)
            gc.collect()
            perConnection = (_rss() - rssBefore) / done if done else 0.0
            _say(handshakes=done, rss_per_connection=perConnection)
        elif order == "WINDOW":
            window.update(rotations=rotations(), cpu=_cpu(), wall=time.monotonic())
            if profiler is not None:
                profiler.enable()
        elif order == "END":
            cpu, wall = _cpu() - window["cpu"], time.monotonic() - window["wall"]
            if profiler is not None:
                profiler.disable()
                profiler.dump_stats(profilePath)
            rotated = rotations() - window["rotations"]
            open_ = sum(1 for p in built if not p._lostTLSConnection)
            _say(cpu=cpu, wall=wall, rotations=rotated, open=open_)
        elif order == "STOP":
            reactor.stop()

    _commands(reactor, handle)
    reactor.run()


def _rotateBare(built: list[Any], interval: float, sent: list[int]) -> None:
    """
    Every tick, a KeyUpdate on the next slice of the handshaken
    connections: each one about once per *interval*.
    """
    from twisted.internet import task

    from .bulk import _bare

    rotate = _bare("ku")
    tick = 0.1
    position, carry = [0], [0.0]

    # The connections handshaken, looked for again once a second while some
    # are not: a scan of all of them on every tick would cost more than the
    # KeyUpdates.
    live: list[Any] = []
    ticks = [0]

    def step() -> None:
        ticks[0] += 1
        if len(live) != len(built) and ticks[0] % 10 == 1:
            live[:] = [p for p in built if p._handshakeDone]
        if not live:
            return
        carry[0] += len(live) * tick / interval
        count, carry[0] = int(carry[0]), carry[0] % 1
        for _ in range(count):
            position[0] = (position[0] + 1) % len(live)
            p = live[position[0]]
            if p._lostTLSConnection:
                continue
            rotate(p._tlsConnection._ssl)
            p._flushSendBIO()
            sent[0] += 1

    task.LoopingCall(step).start(tick, now=False)


# -- the client: N connections, each sending a heartbeat --------------------------


def client(args: argparse.Namespace) -> None:
    _raiseFileLimit(args.max_connections + 100)
    from twisted.internet import protocol, reactor, ssl, task
    from twisted.internet.interfaces import IHandshakeListener
    from zope.interface import implementer

    options = ssl.optionsForClientTLS(
        "localhost", ssl.Certificate.loadPEM(Path(args.certs, "ca.pem").read_bytes())
    )
    state = {"wanted": 0, "started": 0, "done": 0, "failed": 0, "echoed": 0}
    live: list[Any] = []

    @implementer(IHandshakeListener)
    class Beating(protocol.Protocol):
        def handshakeCompleted(self) -> None:
            state["done"] += 1
            live.append(self)
            more()

        def dataReceived(self, data: bytes) -> None:
            state["echoed"] += len(data)

    class F(protocol.ClientFactory):
        protocol = Beating

        def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
            state["failed"] += 1
            more()

    factory = F()

    def more() -> None:
        while (
            state["started"] < state["wanted"]
            and state["started"] - state["done"] - state["failed"] < 100
        ):
            state["started"] += 1
            reactor.connectSSL("127.0.0.1", args.port, factory, options, timeout=30)

    # Heartbeats spread evenly: every tick, the next slice of connections.
    tick = 0.1
    cursor = [0, 0.0]

    def beat() -> None:
        if not live:
            return
        cursor[1] += len(live) * tick / args.heartbeat
        count, cursor[1] = int(cursor[1]), cursor[1] % 1
        for _ in range(count):
            cursor[0] = (cursor[0] + 1) % len(live)
            live[cursor[0]].transport.write(b"heartbeat 16 B\n\n")

    beating = task.LoopingCall(beat)
    window: dict[str, float] = {}

    def handle(order: str, *rest: str) -> None:
        if order == "GROW":
            state["wanted"] = int(rest[0])
            more()
        elif order == "COUNT":
            _say(done=state["done"], failed=state["failed"])
        elif order == "BEAT":
            if not beating.running:
                beating.start(tick, now=False)
        elif order == "WINDOW":
            window.update(cpu=_cpu(), wall=time.monotonic(), echoed=state["echoed"])
        elif order == "END":
            _say(
                cpu=_cpu() - window["cpu"],
                wall=time.monotonic() - window["wall"],
                echoed=state["echoed"] - window["echoed"],
            )
        elif order == "STOP":
            reactor.stop()

    _commands(reactor, handle)
    reactor.run()


# -- the orchestrator ---------------------------------------------------------------


class _Process:
    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )

    def tell(self, *order: object) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(" ".join(map(str, order)) + "\n")
        self.proc.stdin.flush()

    def read(self, prefix: str, timeout: float) -> str:
        # Bounded: a process that stops talking fails the run.
        import select

        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 1.0)
            if not ready:
                continue
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"process exited before {prefix!r}")
            if line.startswith(prefix):
                return line[len(prefix) :].strip()
            sys.stderr.write(f"  | {line}")
        raise RuntimeError(f"{prefix!r} not seen within {timeout} s")

    def result(self, timeout: float = 60) -> dict[str, Any]:
        return dict(json.loads(self.read("RESULT ", timeout)))

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.tell("STOP")
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.terminate()
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(10)


def measure(
    stages: tuple[int, ...],
    interval: float,
    heartbeat: float,
    warmup: float,
    windows: int,
    seconds: float,
) -> dict[str, Any]:
    """Run every mode at once; per stage and mode, the windows' figures."""
    from ._common import Certificates

    me = [sys.executable, "-m", "benchmarks.scale"]
    top = max(stages)
    out: dict[str, Any] = {"stages": {}, "memory": {}}
    with tempfile.TemporaryDirectory() as certs:
        Certificates().writeTo(certs)
        common = [f"--certs={certs}", f"--max-connections={top}"]
        servers: dict[str, _Process] = {}
        clients: dict[str, _Process] = {}
        try:
            for mode in MODES:
                servers[mode] = _Process(
                    [*me, "--role=server", f"--mode={mode}",
                     f"--interval={interval}", *common]
                )  # fmt: skip
            for mode in MODES:
                port = servers[mode].read("PORT ", 60)
                clients[mode] = _Process(
                    [*me, "--role=client", f"--port={port}",
                     f"--heartbeat={heartbeat}", *common]
                )  # fmt: skip
            for n in stages:
                _grow(servers, clients, n)
                if n == stages[0]:  # idle: nothing sent yet
                    for mode in MODES:
                        servers[mode].tell("COUNT")
                        out["memory"][mode] = servers[mode].result()
                    for c in clients.values():
                        c.tell("BEAT")
                time.sleep(warmup)
                rows: dict[str, dict[str, list[float]]] = {
                    m: {"server": [], "client": [], "rotations_per_s": []}
                    for m in MODES
                }
                for _ in range(windows):
                    everyone = [*servers.values(), *clients.values()]
                    for p in everyone:
                        p.tell("WINDOW")
                    time.sleep(seconds)
                    for p in everyone:
                        p.tell("END")
                    for m in MODES:
                        s, c = servers[m].result(), clients[m].result()
                        rows[m]["server"].append(100 * s["cpu"] / s["wall"])
                        rows[m]["client"].append(100 * c["cpu"] / c["wall"])
                        rows[m]["rotations_per_s"].append(s["rotations"] / s["wall"])
                        if s["open"] < n:
                            raise RuntimeError(f"{m}: {s['open']} of {n} open")
                out["stages"][n] = rows
        finally:
            for p in [*clients.values(), *servers.values()]:
                p.stop()
    return out


def _grow(servers: dict[str, _Process], clients: dict[str, _Process], n: int) -> None:
    for c in clients.values():
        c.tell("GROW", n)
    deadline = time.monotonic() + 60 + n / 50
    for mode in MODES:
        while True:
            clients[mode].tell("COUNT")
            got = clients[mode].result()
            if got["done"] + got["failed"] >= n:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{mode}: {got['done']} of {n} connected")
            time.sleep(1)
        if got["failed"]:
            raise RuntimeError(f"{mode}: {got['failed']} connections failed")
        servers[mode].tell("COUNT")
        handshakes = servers[mode].result()["handshakes"]
        while handshakes < n and time.monotonic() < deadline:
            time.sleep(0.5)
            servers[mode].tell("COUNT")
            handshakes = servers[mode].result()["handshakes"]


def figures(results: dict[str, Any]) -> list[Any]:
    from statistics import fmean

    from ._common import Figure

    # Connections that started together rotate together, in a burst once
    # per interval: a window's median can miss it.  The windows together
    # span one whole interval, so their mean is the steady-state figure;
    # the median and IQR over windows say how bursty and noisy it was.
    figs = []
    for n, rows in results["stages"].items():
        plain = rows["plain"]
        for mode in ("watch", "policy", "bare"):
            r = rows[mode]
            server = fmean(r["server"]) - fmean(plain["server"])
            limit = {}
            if mode == "policy":
                # The same KeyUpdates per second at the bare call's cost.
                bare = fmean(rows["bare"]["server"]) - fmean(plain["server"])
                limit = {"bare call": f"{bare:+.3f} pt"}
            client = fmean(r["client"]) - fmean(plain["client"])
            figs.append(
                Figure(
                    f"connections-{n}-{mode}-server-cpu",
                    f"{n} connections sending heartbeats, {mode}: server CPU "
                    "points of a core beyond plain, per window",
                    [a - b for a, b in zip(r["server"], plain["server"])],
                    "<= 0.5 (policy, 10000)" if mode == "policy" else "",
                    unit=" pt",
                    extra={
                        "whole interval": (
                            f"server {fmean(r['server']):.3f} % vs plain "
                            f"{fmean(plain['server']):.3f} % ({server:+.3f} pt), "
                            f"client {fmean(r['client']):.3f} % vs plain "
                            f"{fmean(plain['client']):.3f} % ({client:+.3f} pt), "
                            f"{fmean(r['rotations_per_s']):.1f} rotations/s"
                        ),
                        **limit,
                    },
                )
            )
    memory = results["memory"]
    base = memory["plain"]["rss_per_connection"]
    for mode in ("watch", "policy"):
        extraKiB = (memory[mode]["rss_per_connection"] - base) / 1024
        figs.append(
            Figure(
                f"memory-{mode}-per-idle-connection",
                f"RSS per idle connection beyond plain Twisted TLS, {mode}",
                [extraKiB],
                "<= 1 KiB",
                unit=" KiB",
                extra={
                    "plain": f"{base / 1024:.1f} KiB",
                    "connections": memory[mode]["handshakes"],
                },
            )
        )
    return figs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--role", choices=("server", "client"), required=True)
    parser.add_argument("--mode", choices=MODES)
    parser.add_argument("--certs", required=True)
    parser.add_argument("--port", type=int)
    parser.add_argument("--interval", type=float, default=60.0)
    parser.add_argument("--heartbeat", type=float, default=15.0)
    parser.add_argument("--max-connections", type=int, default=10_000)
    args = parser.parse_args()
    if args.role == "server":
        server(args)
    else:
        client(args)


if __name__ == "__main__":
    main()
