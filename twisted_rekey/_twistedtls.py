"""
Every touch of Twisted's TLS internals, in one place.

:class:`twisted.protocols.tls.TLSMemoryBIOProtocol` has no public API for
what rotating keys needs (sending a handshake message while the
application is idle, holding application data during a renegotiation,
seeing the bytes OpenSSL hands back, finishing a shutdown OpenSSL refused
mid-handshake).  The private attributes this takes are reached only through
the small functions below, so that the lines a Twisted release can break
are these; the suite runs against the oldest and the newest supported
Twisted.

It also holds the two touches of Twisted's TLS options that ALPN needs
(:func:`alpnProtocolsFor`, :func:`optionsProtocols`).

This module must never import the reactor.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, Callable, cast

from twisted.internet import _sslverify
from twisted.protocols.tls import TLSMemoryBIOProtocol

if TYPE_CHECKING:
    from OpenSSL import SSL
    from twisted.python.failure import Failure

__all__ = [
    "aborted",
    "alpnProtocolsFor",
    "bufferApplicationData",
    "connectionClosing",
    "factoryClock",
    "failConnection",
    "findTLS",
    "finishShutdown",
    "flushApplication",
    "flushSendBIO",
    "hasBufferedApplicationData",
    "optionsProtocols",
    "patchTLS",
    "shutdownTLS",
    "tlsConnection",
    "unbufferApplicationData",
    "webConnection",
]


def findTLS(transport: object) -> TLSMemoryBIOProtocol | None:
    """
    The :class:`TLSMemoryBIOProtocol` that owns the memory BIO: the
    protocol's transport itself (``listenSSL``, endpoints,
    ``wrapClientTLS``), or the TCP transport's protocol after ``startTLS``.
    """
    if isinstance(transport, TLSMemoryBIOProtocol):
        return transport
    inner = getattr(transport, "protocol", None)
    if isinstance(inner, TLSMemoryBIOProtocol):
        return inner
    return None


def webConnection(candidate: object) -> object | None:
    """
    The connection of a twisted.web HTTP/2 stream (a request's channel),
    which has no transport of its own; ``None`` for anything else.
    """
    return getattr(candidate, "_conn", None)


def tlsConnection(tls: Any) -> SSL.Connection | None:
    """The TLS protocol's OpenSSL Connection, ``None`` once it is gone."""
    conn: SSL.Connection | None = tls._tlsConnection
    return conn


def factoryClock(tls: Any) -> Any:
    """
    The clock Twisted's TLS factory was given (the buffering transport runs
    on it), or ``None``.
    """
    return getattr(tls.factory, "_clock", None)


#: What the watcher routes through it: the TLS protocol's method, and the
#: watcher's method that replaces it.
_PATCHED = (
    ("dataReceived", "dataReceived"),
    ("connectionLost", "connectionLost"),
    ("_write", "write"),
    ("_bufferedWrite", "bufferedWrite"),
    ("_shutdownTLS", "shutdownTLS"),
)


# The methods of a watched TLS protocol's class (see patchTLS): each goes to
# the watcher, the one attribute of ours on the instance.  On the data path,
# hence written out.
def _dataReceived(self: Any, data: bytes) -> None:
    self._rekeyTLSWatcher.dataReceived(data)


def _connectionLost(self: Any, reason: Failure) -> None:
    self._rekeyTLSWatcher.connectionLost(reason)


def _write(self: Any, data: bytes) -> None:
    self._rekeyTLSWatcher.write(data)


def _bufferedWrite(self: Any, data: bytes) -> None:
    self._rekeyTLSWatcher.bufferedWrite(data)


def _shutdownTLS(self: Any) -> None:
    self._rekeyTLSWatcher.shutdownTLS()


_ROUTED = {
    "dataReceived": _dataReceived,
    "connectionLost": _connectionLost,
    "_write": _write,
    "_bufferedWrite": _bufferedWrite,
    "_shutdownTLS": _shutdownTLS,
}

#: Each TLS protocol class, and its watched subclass (the subclass maps to
#: itself).
_watched: dict[type, type] = {}


def _watchedClass(base: type) -> type:
    """
    The subclass of *base* whose methods in :data:`_PATCHED` go to the
    instance's watcher, named as *base* (``isinstance`` unchanged), one per
    class.
    """
    cls = _watched.get(base)
    if cls is None:
        namespace: dict[str, Any] = {
            "__module__": base.__module__,
            "__qualname__": base.__qualname__,
            "__doc__": base.__doc__,
            **_ROUTED,
        }
        cls = type(base.__name__, (base,), namespace)
        _watched[base] = _watched[cls] = cls
    return cls


def _callBound(method: Callable[..., Any], tls: Any, *args: Any) -> Any:
    return method(*args)


def _unbound(tls: Any, base: type, name: str) -> Callable[..., Any]:
    # The class's function, called with the TLS protocol first: a bound
    # method kept per connection would cost 64 bytes each.  What an
    # instance attribute already replaced is kept as it is.
    shadowing = tls.__dict__.get(name)
    if shadowing is not None:
        return partial(_callBound, shadowing)
    return cast("Callable[..., Any]", getattr(base, name))


def patchTLS(tls: Any, watcher: object) -> tuple[Callable[..., Any], ...]:
    """
    Route the TLS protocol's read, loss, write, re-buffered write and
    shutdown through *watcher*'s ``dataReceived``, ``connectionLost``,
    ``write``, ``bufferedWrite`` and ``shutdownTLS``, for this connection
    only.

    *tls* becomes an instance of a subclass of its class (named as it,
    ``isinstance`` unchanged) that routes them, and carries one attribute
    of ours, the watcher: five bound methods set on the instance would cost
    some 400 bytes a connection.  A method an instance attribute already
    replaced (as ``BufferingTLSTransport`` does with ``write``) is replaced
    on the instance instead, as is every one of a class whose instances
    refuse a new ``__class__``.

    :returns: the methods replaced, in the same order, each to be called
        with *tls* as its first argument.
    """
    cls = type(tls)
    watched = _watched.get(cls) is cls
    base = cls.__mro__[1] if watched else cls
    originals = tuple(_unbound(tls, base, name) for name, _ in _PATCHED)
    onInstance = [pair for pair in _PATCHED if pair[0] in tls.__dict__]
    if not watched:
        try:
            tls.__class__ = _watchedClass(cls)
        except TypeError:
            onInstance = list(_PATCHED)
    tls._rekeyTLSWatcher = watcher
    for tlsName, watcherName in onInstance:
        setattr(tls, tlsName, getattr(watcher, watcherName))
    return originals


def connectionClosing(tls: Any) -> bool:
    """Whether the TLS connection is closing or closed."""
    return bool(
        tls.disconnecting
        or not tls.connected
        or tls._lostTLSConnection
        or tls._tlsConnection is None
    )


def aborted(tls: Any) -> bool:
    """Whether ``abortConnection()`` was called."""
    return bool(getattr(tls, "_aborted", False))


def finishShutdown(tls: Any) -> None:
    """Finish as Twisted does when a read meets the peer's close_notify."""
    tls._tlsShutdownFinished(None)


def shutdownTLS(tls: Any) -> None:
    """Send our close_notify (through whatever :func:`patchTLS` set)."""
    tls._shutdownTLS()


_MISSING = object()


def _readingKept(*args: object) -> None:
    """Stands in for a pause of this connection's reading: see below."""


def bufferApplicationData(tls: Any, data: bytes) -> None:
    """
    Put *data* in the TLS protocol's own buffer of application data, which
    it empties (in order) after the read that completes a handshake, and
    pause the application's producer: Twisted's own ``_bufferedWrite``
    does both (its class's, not the watcher's replacement on the
    instance), and Twisted resumes the producer once that buffer is empty.

    The handshake that empties the buffer must still be read, so the pause
    is not let through to this connection's own reading: an echo's
    producer is its transport, a protocol may pause its transport when it
    is paused itself, twisted.web's HTTP channel does between requests.
    Without that, the ClientHello would never be read.
    """
    readers = [tls]
    tcp = getattr(tls, "transport", None)
    if tcp is not None and hasattr(tcp, "__dict__"):
        readers.append(tcp)
    # For the length of the call only: instance attributes over the
    # pauseProducing of the TLS protocol and of its TCP transport, put
    # back as they were (normally: none) however the call ends.
    saved = [(r, r.__dict__.get("pauseProducing", _MISSING)) for r in readers]
    for reader, _ in saved:
        reader.pauseProducing = _readingKept
    try:
        TLSMemoryBIOProtocol._bufferedWrite(tls, data)  # type: ignore[no-untyped-call]
    finally:
        for reader, before in saved:
            if before is _MISSING:
                del reader.pauseProducing
            else:
                reader.pauseProducing = before


def hasBufferedApplicationData(tls: Any) -> bool:
    return bool(tls._appSendBuffer)


def unbufferApplicationData(tls: Any) -> None:
    """Write out what the TLS protocol buffered."""
    tls._unbufferPendingWrites()


def flushApplication(tls: Any) -> None:
    """
    Push the small writes ``BufferingTLSTransport`` holds until the next
    reactor turn into TLS now.
    """
    aggregator = getattr(tls, "_aggregator", None)
    if aggregator is not None:
        aggregator.flush()


def flushSendBIO(tls: Any) -> bool:
    """
    Hand what OpenSSL wrote into the memory BIO to the TCP transport.

    :returns: ``False`` if this Twisted's TLS protocol cannot.
    """
    flush = getattr(tls, "_flushSendBIO", None)
    if flush is None:
        return False
    flush()
    return True


def failConnection(tls: Any, failure: Failure) -> None:
    """
    Drop the connection, with *failure* as the reason the application's
    ``connectionLost`` receives.
    """
    failVerification = getattr(tls, "failVerification", None)
    if failVerification is not None:
        failVerification(failure)
    else:  # pragma: no cover - every TLSMemoryBIOProtocol has it
        tls.abortConnection()


# Twisted 26.x: the union of the factory's and the options' ALPN protocols
# for one TLS protocol.  Older releases have no such function.
_protosFromProtocol: Any = getattr(_sslverify, "protosFromProtocol", None)


def alpnProtocolsFor() -> Callable[[Any, Sequence[bytes]], Sequence[bytes]] | None:
    """
    Twisted 26.x's function from a TLS protocol (a Connection's app data)
    and the options' static protocols to the ALPN protocols the server
    speaks, in its order of preference; ``None`` on releases without it.
    """
    return cast(
        "Callable[[Any, Sequence[bytes]], Sequence[bytes]] | None", _protosFromProtocol
    )


def optionsProtocols(options: object) -> tuple[bytes, ...]:
    """
    The ALPN protocols given to Twisted's ``CertificateOptions``
    (``acceptableProtocols``), empty for none or for other options.
    """
    return tuple(getattr(options, "_acceptableProtocols", ()) or ())
