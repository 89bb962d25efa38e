"""
Shared fixtures: test certificates, pyOpenSSL contexts, and the hygiene
checks every test gets.

Two checks run after every test (they must never be switched off wholesale):

- a Twisted failure logged during the test (``log_failure`` events, legacy
  ``isError`` events, "Unhandled error in Deferred") fails it; a test that
  expects one takes it out with :meth:`LoggedFailures.flush`.  Under pytest a
  logged failure otherwise passes silently.
- the global reactor must be left clean: no pending delayed calls, no readers
  or writers except the reactor's own (its waker).  Like trial, the reactor
  gets one iteration first so that ``callLater(0)`` clean-ups can finish;
  whatever is left fails the test and is then removed, so the next test starts
  clean.

A foreign peer (openssl, gnutls) that is missing skips the test, except when
the ``CI`` environment variable is set: then it fails (see
:func:`peers.require_tool`).
"""

from __future__ import annotations

import gc
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from peers import CertFiles, make_cert_files

pytest_plugins = ["pytester"]


def _tool_version(argv: list[str]) -> str:
    if shutil.which(argv[0]) is None:
        return "missing"
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unusable ({e})"
    return (done.stdout or done.stderr).splitlines()[0].strip()


def pytest_report_header(config: pytest.Config) -> list[str]:
    return [
        f"foreign peers: {_tool_version(['openssl', 'version'])}; "
        f"{_tool_version(['gnutls-cli', '--version'])}"
        + ("; CI: missing peers fail" if os.environ.get("CI") else "")
    ]


# -- certificates and contexts ------------------------------------------------


@pytest.fixture(scope="session")
def cert_files(tmp_path_factory: pytest.TempPathFactory) -> CertFiles:
    """A trustme CA, a server certificate for localhost/127.0.0.1/::1 and a
    client certificate, written as PEM files."""
    return make_cert_files(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="session")
def ca(cert_files: CertFiles) -> Any:
    """The session's :class:`trustme.CA`."""
    return cert_files.ca


def _make_context(cert_files: CertFiles, side: str, version: str | None) -> Any:
    from OpenSSL import SSL

    context = SSL.Context(SSL.TLS_METHOD)
    if version is not None:
        number = {"1.2": SSL.TLS1_2_VERSION, "1.3": SSL.TLS1_3_VERSION}[version]
        context.set_min_proto_version(number)
        context.set_max_proto_version(number)
    if side == "server":
        context.use_certificate_chain_file(str(cert_files.server_cert))
        context.use_privatekey_file(str(cert_files.server_key))
    elif side == "client":
        context.load_verify_locations(str(cert_files.ca_cert))
        context.set_verify(SSL.VERIFY_PEER)
    else:
        raise ValueError(f"side must be 'server' or 'client', not {side!r}")
    return context


@pytest.fixture
def make_context(cert_files: CertFiles) -> Callable[..., Any]:
    """
    A factory of fresh pyOpenSSL contexts: ``make_context("server", "1.3")``.

    Servers use the test certificate; clients verify against the test CA
    (chain only: host names are Twisted's or the test's business).  Fresh per
    test because pyOpenSSL freezes a Context once it has been used.
    """
    return lambda side, version="1.3": _make_context(cert_files, side, version)


@pytest.fixture
def server_context_tls13(make_context: Callable[..., Any]) -> Any:
    return make_context("server", "1.3")


@pytest.fixture
def server_context_tls12(make_context: Callable[..., Any]) -> Any:
    return make_context("server", "1.2")


@pytest.fixture
def client_context_tls13(make_context: Callable[..., Any]) -> Any:
    return make_context("client", "1.3")


@pytest.fixture
def client_context_tls12(make_context: Callable[..., Any]) -> Any:
    return make_context("client", "1.2")


# -- logged failures -------------------------------------------------------------


class LoggedFailures:
    """Twisted log events that carry a failure, seen during one test."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.paused = False

    def __call__(self, event: dict[str, Any]) -> None:
        if self.paused:
            return
        if event.get("log_failure") is not None or event.get("isError"):
            self.events.append(event)

    def flush(self, *types: type[BaseException]) -> list[Any]:
        """
        Remove and return the logged failures (of *types*, if given), like
        trial's ``flushLoggedErrors``: for tests that expect them.
        """
        gc.collect()
        kept, flushed = [], []
        for event in self.events:
            failure = event.get("log_failure") or event.get("failure")
            if not types or (failure is not None and failure.check(*types)):
                flushed.append(failure if failure is not None else event)
            else:
                kept.append(event)
        self.events = kept
        return flushed

    def describe(self) -> str:
        from twisted.logger import formatEvent

        parts = []
        for event in self.events:
            text = formatEvent(event)
            failure = event.get("log_failure") or event.get("failure")
            if failure is not None:
                text += "\n" + failure.getTraceback()
            parts.append(text)
        return "\n---\n".join(parts)


@pytest.fixture
def events() -> Iterator[Any]:
    """twisted_rekey's log events during this test (twistedharness.Events)."""
    from twisted.logger import globalLogPublisher
    from twistedharness import Events

    observer = Events()
    globalLogPublisher.addObserver(observer)
    yield observer
    globalLogPublisher.removeObserver(observer)


@pytest.fixture
def logged_failures() -> Iterator[LoggedFailures]:
    """The failures Twisted logged during this test; flush the expected ones."""
    from twisted.logger import globalLogPublisher

    observer = LoggedFailures()
    globalLogPublisher.addObserver(observer)
    try:
        yield observer
    finally:
        globalLogPublisher.removeObserver(observer)


# -- reactor hygiene -------------------------------------------------------------


def _installed_reactor() -> Any:
    return sys.modules.get("twisted.internet.reactor")


def _spin_once(reactor: Any) -> None:
    """Let the reactor run one iteration, from outside it (pytest-twisted)."""
    import pytest_twisted
    from twisted.internet import task

    if not getattr(reactor, "running", False):
        return
    try:
        pytest_twisted.blockon(task.deferLater(reactor, 0, lambda: None))
    except AssertionError:
        # Already inside the reactor greenlet: nothing to spin from here.
        pass


def _internal(reactor: Any) -> set[Any]:
    internal = set(getattr(reactor, "_internalReaders", ()))
    for name in ("waker", "_childWaker"):
        waker = getattr(reactor, name, None)
        if waker is not None:
            internal.add(waker)
    return internal


def _reactor_leftovers(reactor: Any) -> list[str]:
    problems = []
    calls = [c for c in reactor.getDelayedCalls() if c.active()]
    if calls:
        problems.append(
            "pending delayed calls:\n" + "\n".join(f"  {c!r}" for c in calls)
        )
    internal = _internal(reactor)
    for kind, selectables in (
        ("readers", reactor.getReaders()),
        ("writers", reactor.getWriters()),
    ):
        leftover = [s for s in selectables if s not in internal]
        if leftover:
            problems.append(f"open {kind}:\n" + "\n".join(f"  {s!r}" for s in leftover))
    return problems


def _clean_reactor(reactor: Any) -> None:
    from twisted.internet import error, interfaces
    from twisted.python.failure import Failure

    for call in reactor.getDelayedCalls():
        if call.active():
            call.cancel()
    internal = _internal(reactor)
    selectables = [s for s in reactor.removeAll() if s not in internal]
    for selectable in selectables:
        try:
            if interfaces.IProcessTransport.providedBy(selectable):
                selectable.signalProcess("KILL")
            selectable.connectionLost(
                Failure(error.ConnectionDone("left open by a previous test"))
            )
        except Exception:
            pass
    for call in reactor.getDelayedCalls():
        if call.active():
            call.cancel()


@pytest.fixture(autouse=True)
def _twisted_hygiene(logged_failures: LoggedFailures) -> Iterator[None]:
    yield
    problems = []
    reactor = _installed_reactor()
    if reactor is not None:
        _spin_once(reactor)
        leftovers = _reactor_leftovers(reactor)
        if leftovers:
            logged_failures.paused = True
            _clean_reactor(reactor)
            problems.append(
                "the test left the reactor dirty (cleaned up now):\n"
                + "\n".join(leftovers)
            )
    # Unhandled errors in Deferreds are logged when the Deferred is collected.
    gc.collect()
    logged_failures.paused = True
    if logged_failures.events:
        problems.append(
            f"{len(logged_failures.events)} failure(s) logged during the test "
            "(flush expected ones with logged_failures.flush()):\n"
            + logged_failures.describe()
        )
    if problems:
        pytest.fail("\n\n".join(problems), pytrace=False)
