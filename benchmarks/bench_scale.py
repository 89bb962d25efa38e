"""
What rotating keys on a schedule costs a reactor that holds many idle TLS
connections: CPU at steady state and memory per connection.

One server process (one reactor) accepts N TLS 1.3 connections over
loopback from a client process and then sits idle; its own CPU time
(``getrusage``) is measured over a steady-state window, and its RSS before
and after the connections.  The same is run, one after the other, for:

``plain``
    Twisted TLS with an echo protocol: the baseline.
``mixin``
    the same factory wrapped in :class:`twisted_rekey.RotatingFactory` with
    no policy: what watching the connection costs.
``policy``
    :class:`twisted_rekey.RotatingFactory` with ``RotationPolicy(interval=60)``:
    the default ``skip_idle=True`` arms no timer for a connection that sent
    nothing, so idle connections cost nothing.
``policy-noskip``
    the same with ``skip_idle=False``: the worst case, every connection
    really sending a KeyUpdate every ~60 s (N/60 KeyUpdates per second).

Usage (the defaults take about ten minutes; ``--quick`` under a minute)::

    /tmp/venv/bin/python benchmarks/bench_scale.py [--connections 10000]
        [--warmup 65] [--duration 60] [--interval 60] [--modes ...] [--quick]

Needs one file descriptor per connection in each process: the script raises
``RLIMIT_NOFILE``'s soft limit to the hard one, which must exceed N + 100
(``ulimit -Hn``).  The window starts *warmup* seconds after the last
handshake, so that with ``policy-noskip`` the first rotations (due ~60 s
after each handshake) have begun.  Not a test: numbers depend on the machine.

Measured 2026-11-26 on a 2-core shared machine (Twisted 26.10,
pyOpenSSL 26.4, cryptography 50.0.2), 10,000 connections, 60 s policy,
60 s window after 65 s of warm-up, server CPU by getrusage:

=============  ===========  ==============  ============  ================
mode           CPU (core)   RSS/connection  rotations/s   vs plain
=============  ===========  ==============  ============  ================
plain          0.000%       36.1 KiB        0             --
mixin          0.000%       41.0 KiB        0             +0.000 pt, +4.9 KiB
policy         0.000%       41.7 KiB        0             +0.000 pt, +5.6 KiB
policy-noskip  0.96-1.09%   41.8 KiB        160           +1.03 pt, +5.7 KiB
=============  ===========  ==============  ============  ================

(``policy-noskip``: three runs, 0.957%, 1.038% and 1.088%, mean 1.03%;
the machine varies by that much from run to run.)

(An earlier version of this script counted the rotations of all 10,000
connections inside the window: that walk was the 0.016% it reported for
``mixin`` and ``policy``.  Idle connections cost nothing it can measure.)

The policy's own state is ~2.1 KiB per connection (driver and schedule,
``sys.getsizeof`` deep); the rest of the +5.6 KiB is the mixin's watcher
(info callback, wrapper, counters).  One pending delayed call for all
10,000 connections; with ``skip_idle=False``, 48 wake-ups in 60 s (one per
1 s bucket holding due deadlines).  That worst case spends ~65 µs of server
CPU per KeyUpdate (was ~73-76 µs; OpenSSL, Twisted's socket write path, the
log event's observers and the policy are most of what remains), so it
scales with N/interval: 1% of a core is ~155 rotations/s.
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

MODES = ("plain", "mixin", "policy", "policy-noskip")


def _raiseFileLimit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        sys.exit(
            f"RLIMIT_NOFILE hard limit {hard} < {needed} needed: lower "
            f"--connections or raise the limit (ulimit -Hn)"
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


def _deepSize(obj: Any, seen: set[int], stop: set[int]) -> int:
    # Only what belongs to one connection's rotation state: not the shared
    # policy, protocol, clock or scheduler (passed in *stop*).
    if id(obj) in seen or id(obj) in stop:
        return 0
    seen.add(id(obj))
    size = sys.getsizeof(obj)
    if isinstance(obj, (str, bytes, int, float, bool, type(None))):
        return size
    if isinstance(obj, dict):
        return size + sum(
            _deepSize(k, seen, stop) + _deepSize(v, seen, stop) for k, v in obj.items()
        )
    if isinstance(obj, (list, tuple, set, frozenset)):
        return size + sum(_deepSize(x, seen, stop) for x in obj)
    for slot in getattr(type(obj), "__slots__", ()):
        if slot != "__weakref__" and hasattr(obj, slot):
            size += _deepSize(getattr(obj, slot), seen, stop)
    if hasattr(obj, "__dict__"):
        size += _deepSize(vars(obj), seen, stop)
    return size


# -- the server: one reactor holding every connection ----------------------------


def server(args: argparse.Namespace) -> None:
    _raiseFileLimit(args.connections + 100)
    from twisted.internet import protocol, reactor, ssl
    from twisted.protocols.tls import TLSMemoryBIOFactory
    from twisted.protocols.wire import Echo

    from twisted_rekey import RotatingFactory, RotationPolicy, rekeyableFor

    certs = Path(args.certs)
    pem = (certs / "server.pem").read_bytes()
    private = ssl.PrivateCertificate.loadPEM(pem)
    options = ssl.CertificateOptions(
        privateKey=private.privateKey.original, certificate=private.original
    )
    options.getContext()  # build the Context before the baseline
    mode = args.mode
    inner = protocol.Factory.forProtocol(Echo)
    factory: Any = inner
    policy = None
    if mode == "mixin":
        factory = RotatingFactory(inner, None)
    elif mode in ("policy", "policy-noskip"):
        policy = RotationPolicy(
            interval=args.interval,
            min_interval=min(1.0, args.interval),
            skip_idle=mode == "policy",
        )
        factory = RotatingFactory(inner, policy)

    handshakes = 0
    wrappers: list[Any] = []
    result: dict[str, Any] = {"mode": mode, "connections": args.connections}

    # Count completed handshakes without touching the measured protocol:
    # wrap buildProtocol only, and poll the TLS protocols.
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

    progress = [0, time.monotonic()]

    def poll() -> None:
        nonlocal handshakes
        handshakes = sum(1 for p in built if p._handshakeDone)
        if handshakes != progress[0]:
            progress[:] = [handshakes, time.monotonic()]
            print(f"  | server: {handshakes} handshakes", file=sys.stderr)
        stalled = time.monotonic() - progress[1] > 15
        if handshakes < args.connections and not stalled:
            reactor.callLater(1.0, poll)
            return
        result["handshakes"] = handshakes
        gc.collect()
        result["rss_per_connection"] = (_rss() - rssBefore) / handshakes
        for p in built:
            wrappers.append(rekeyableFor(p.wrappedProtocol) or p.wrappedProtocol)
        if policy is not None:
            w = wrappers[0]
            driver = w._rekeyWatcher.rotation
            stop = {id(policy), id(w), id(driver._clock), id(driver._scheduler)}
            stop.add(id(driver._timer.__func__))
            # The connection's logger counts, not what it logs to or names.
            stop |= {id(driver._log.observer), id(driver._log.source)}
            result["rotation_state_bytes"] = _deepSize(driver, set(), stop)
        print("READY", flush=True)
        reactor.callLater(args.warmup, startWindow)

    def rotations() -> int:
        return sum(
            w.rotationSchedule.rotations
            for w in wrappers
            if getattr(w, "rotationSchedule", None) is not None
        )

    # BENCH_PROFILE=path: cProfile the steady-state window only (not the
    # handshakes), written to path.
    profilePath = os.environ.get("BENCH_PROFILE")
    profiler = None
    if profilePath:
        import cProfile

        profiler = cProfile.Profile()

    def startWindow() -> None:
        # Counting walks every connection: before the window, not in it.
        result["_rot0"] = rotations()
        if profiler is not None:
            profiler.enable()
        result["_cpu0"] = _cpu()
        result["_wall0"] = time.monotonic()
        reactor.callLater(args.duration, endWindow)

    def endWindow() -> None:
        cpu = _cpu() - result.pop("_cpu0")
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(profilePath)
        wall = time.monotonic() - result.pop("_wall0")
        result["cpu_percent"] = 100 * cpu / wall
        result["window_s"] = wall
        result["rotations_in_window"] = rotations() - result.pop("_rot0")
        result["rotations_per_s"] = result["rotations_in_window"] / wall
        result["open"] = sum(1 for p in built if not p._lostTLSConnection)
        from twisted_rekey import RotationScheduler

        if policy is not None:
            scheduler = wrappers[0]._rekeyWatcher.rotation._scheduler
            assert isinstance(scheduler, RotationScheduler)
            result["wake_ups"] = scheduler.wakeUps
        result["delayed_calls"] = len(reactor.getDelayedCalls())
        print("RESULT " + json.dumps(result), flush=True)
        reactor.stop()

    reactor.callLater(0.5, poll)
    reactor.run()


# -- the client: N connections, then quiet ------------------------------------------


def client(args: argparse.Namespace) -> None:
    _raiseFileLimit(args.connections + 100)
    from twisted.internet import protocol, reactor, ssl
    from twisted.internet.interfaces import IHandshakeListener
    from zope.interface import implementer

    certs = Path(args.certs)
    options = ssl.optionsForClientTLS(
        "localhost", ssl.Certificate.loadPEM((certs / "ca.pem").read_bytes())
    )
    state = {"started": 0, "done": 0, "failed": 0}
    keep: list[Any] = []

    @implementer(IHandshakeListener)
    class Quiet(protocol.Protocol):
        def handshakeCompleted(self) -> None:
            state["done"] += 1
            more()

    class F(protocol.ClientFactory):
        protocol = Quiet

        def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
            state["failed"] += 1
            if state["failed"] % 100 == 1:
                print(f"connection failed: {reason.getErrorMessage()}", flush=True)
            more()

    factory = F()

    def more() -> None:
        while (
            state["started"] < args.connections
            and state["started"] - state["done"] - state["failed"] < 100
        ):
            state["started"] += 1
            keep.append(
                reactor.connectSSL("127.0.0.1", args.port, factory, options, timeout=30)
            )
        if state["done"] + state["failed"] == args.connections:
            print(f"CONNECTED {state['done']} failed {state['failed']}", flush=True)

    reactor.callWhenRunning(more)
    reactor.run()


# -- the orchestrator -------------------------------------------------------------


def _readLine(proc: subprocess.Popen[str], prefix: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"process exited before {prefix!r}")
        if line.startswith(prefix):
            return line[len(prefix) :].strip()
        sys.stderr.write(f"  | {line}")
    raise RuntimeError(f"{prefix!r} not seen within {timeout} s")


def run(mode: str, args: argparse.Namespace, certs: str) -> dict[str, Any]:
    common = [
        f"--connections={args.connections}",
        f"--certs={certs}",
        f"--interval={args.interval}",
    ]
    me = [sys.executable, __file__]
    srv = subprocess.Popen(
        [
            *me,
            "--role=server",
            f"--mode={mode}",
            f"--warmup={args.warmup}",
            f"--duration={args.duration}",
            *common,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    cli: subprocess.Popen[str] | None = None
    try:
        port = _readLine(srv, "PORT ", 30)
        cli = subprocess.Popen(
            [*me, "--role=client", f"--port={port}", *common],
            stdout=sys.stderr,
            text=True,
        )
        setup = args.connections / 100 + 60
        _readLine(srv, "READY", setup)
        limit = args.warmup + args.duration + 60
        return dict(json.loads(_readLine(srv, "RESULT ", limit)))
    finally:
        for proc in (cli, srv):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--warmup", type=float, default=65.0)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--interval", type=float, default=60.0)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument(
        "--quick",
        action="store_true",
        help="1,000 connections, a 5 s policy, 8 s windows: under a minute",
    )
    parser.add_argument("--role", choices=("server", "client"), help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--certs", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "server":
        return server(args)
    if args.role == "client":
        return client(args)
    if args.quick:
        args.connections, args.interval = 1000, 5.0
        args.warmup, args.duration = 4.0, 6.0
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if m not in MODES:
            parser.error(f"unknown mode {m!r}; choose from {', '.join(MODES)}")

    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    with tempfile.TemporaryDirectory() as certs:
        cert.private_key_and_cert_chain_pem.write_to_path(
            str(Path(certs, "server.pem"))
        )
        ca.cert_pem.write_to_path(str(Path(certs, "ca.pem")))
        print(
            f"{args.connections} idle TLS 1.3 connections on one reactor, "
            f"{args.interval:g} s policy, window {args.duration:g} s after "
            f"{args.warmup:g} s warm-up; {os.cpu_count()} CPUs"
        )
        results = {}
        for mode in modes:
            print(f"running {mode} ...", flush=True)
            results[mode] = r = run(mode, args, certs)
            print(
                f"  {mode:14} CPU {r['cpu_percent']:6.3f}% of one core, "
                f"RSS {r['rss_per_connection'] / 1024:6.1f} KiB/connection, "
                f"{r['rotations_per_s']:7.1f} rotations/s, open {r['open']}, "
                f"delayed calls {r['delayed_calls']}, "
                f"wake-ups {r.get('wake_ups', '-')}, "
                f"rotation state {r.get('rotation_state_bytes', '-')} B",
                flush=True,
            )
    base = results.get("plain")
    if base is None:
        return
    print("\nrelative to plain Twisted TLS:")
    for mode, r in results.items():
        if mode == "plain":
            continue
        rss, baseRss = r["rss_per_connection"], base["rss_per_connection"]
        print(
            f"  {mode:14} CPU {r['cpu_percent'] - base['cpu_percent']:+7.3f} "
            f"points of one core, memory {(rss - baseRss) / 1024:+6.2f} "
            f"KiB/connection ({rss / baseRss:.3f}x)"
        )


if __name__ == "__main__":
    main()
