"""
The one per-connection info callback of a Connection.

OpenSSL keeps one info callback per ``SSL``, and calls it *instead of* the
Context's.  Both the pyOpenSSL layer (:class:`RekeyConnection`'s counters
and inline policy) and the Twisted layer (the mixin's watcher) need it, so
this module installs it once per Connection and dispatches each call to
every observer, in the order they were added: a :class:`RekeyConnection`
used under :class:`RekeyProtocolMixin` keeps counting.

Each call first runs the callback that would be in effect without us (a
replacement set through :class:`RekeyConnection`'s ``set_info_callback``,
else pyOpenSSL >= 25.2's per-connection one, else the Context's; looked up
at each call, since an SNI callback may switch the Context), so that host
name checks living there (Twisted < 24) keep running.

Nothing raised here crosses into C: an error of the chained callback goes
to the observer added last that takes such errors (the layer closest to
the code running the connection decides whether it is re-raised or
logged), an observer's own error to that observer.

It also counts the application bytes a Connection's ``recv`` returns, for
the Twisted layer (:func:`countReceived`).

What this keeps per Connection is small on purpose, since a server holds
one per connection: the hub is the only attribute set on the Connection,
every Connection shares one C trampoline, and the count goes through a
subclass rather than an instance attribute (see :func:`countReceived`).

This module must never import Twisted.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

from OpenSSL import SSL

from ._binding import ffi, need

__all__ = ["InfoCallback", "Observer", "countReceived", "infoCallbackFor"]


class Observer(Protocol):
    """What :meth:`InfoCallback.add` takes: one layer's watching."""

    def observe(self, ssl: Any, where: int, ret: int) -> None:
        """One call of the info callback, inside OpenSSL: record, never
        re-enter the state machine."""

    def observeFailed(self, error: BaseException) -> None:
        """What :meth:`observe` raised."""

    def chainedFailed(self, error: BaseException) -> None:
        """What the chained callback raised (only if added to take it)."""


class InfoCallback:
    """
    The info callback installed on one Connection's ``SSL``.

    :ivar replacement: a callback run instead of the chained one, called
        with the Connection as pyOpenSSL's own are.
    :ivar counter: what :func:`countReceived` adds the bytes ``recv``
        returns to (its ``bytesReceived``), or ``None``.
    """

    __slots__ = (
        "callback",
        "chainTaker",
        "conn",
        "counter",
        "observers",
        "replacement",
    )

    def __init__(self, conn: SSL.Connection) -> None:
        self.conn = conn
        self.replacement: Callable[[SSL.Connection, int, int], object] | None = None
        self.observers: tuple[Observer, ...] = ()
        # The observer added last that takes the chained callback's errors.
        self.chainTaker: Observer | None = None
        self.counter: Any = None
        # The trampoline every Connection shares, else one of its own.
        self.callback = _sharedTrampoline()
        if self.callback is None:
            self.callback = ffi.callback("void (*)(const SSL *, int, int)", self.call)
        need("SSL_set_info_callback")(conn._ssl, self.callback)  # type: ignore[attr-defined]

    def add(self, observer: Observer, takesChainErrors: bool = False) -> None:
        """
        Call ``observer.observe`` with each ``(ssl, where, ret)``; what it
        raises goes to ``observer.observeFailed``.  With
        *takesChainErrors*, ``observer.chainedFailed`` gets the errors of
        the chained callback (unless an observer added later takes them).
        """
        self.observers += (observer,)
        if takesChainErrors:
            self.chainTaker = observer

    def observedBy(self, kind: type) -> bool:
        """
        Whether an observer owned by an instance of *kind* is installed.
        """
        return any(isinstance(o, kind) for o in self.observers)

    def call(self, ssl: Any, where: int, ret: int) -> None:
        # Inside OpenSSL: never raise, never re-enter the state machine.
        try:
            self.chain(ssl, where, ret)
            for observer in self.observers:
                try:
                    observer.observe(ssl, where, ret)
                except BaseException as e:
                    observer.observeFailed(e)
        except BaseException:  # pragma: no cover - the handlers only store
            pass

    def chain(self, ssl: Any, where: int, ret: int) -> None:
        conn = self.conn
        try:
            replacement = self.replacement
            if replacement is not None:
                replacement(conn, where, ret)
                return
            # pyOpenSSL >= 25.2 keeps a per-connection callback here.
            previous = conn.__dict__.get("_info_callback")
            if previous is None:
                previous = getattr(conn._context, "_info_callback", None)  # type: ignore[attr-defined]
            if previous is not None:
                previous(ssl, where, ret)
        except BaseException as e:
            if self.chainTaker is not None:
                self.chainTaker.chainedFailed(e)


# pyOpenSSL's own map from an SSL pointer to its Connection (weak values),
# through which its callbacks find their Connection; ``None`` if a release
# lacks it, and each Connection then gets a trampoline of its own.
_connections: Any = getattr(SSL.Connection, "_reverse_mapping", None)
_trampoline: Any = None


def _dispatch(ssl: Any, where: int, ret: int) -> None:
    # Inside OpenSSL, for every Connection: never raise.
    try:
        hub = _connections[ssl].__dict__["_rekeyInfo"]
    except BaseException:  # pragma: no cover - the hub is there first
        return
    hub.call(ssl, where, ret)


def _sharedTrampoline() -> Any:
    global _trampoline
    if _connections is None:
        return None
    if _trampoline is None:
        _trampoline = ffi.callback("void (*)(const SSL *, int, int)", _dispatch)
    return _trampoline


def infoCallbackFor(conn: SSL.Connection) -> InfoCallback:
    """
    The info callback of *conn*, installed on first use.  The Connection
    keeps it referenced: the ``SSL`` outlives nothing that does not hold the
    Connection.

    :raises FunctionUnavailable: if ``SSL_set_info_callback`` cannot be
        reached.
    """
    hub: InfoCallback | None = conn.__dict__.get("_rekeyInfo")
    if hub is None:
        hub = conn._rekeyInfo = InfoCallback(conn)  # type: ignore[attr-defined]
    return hub


# The recv-counting subclass of each Connection class met.
_counting: dict[type, type] = {}


def _countingClass(base: type) -> type:
    cls = _counting.get(base)
    if cls is None:
        baseRecv = base.recv  # type: ignore[attr-defined]

        def recv(self: Any, bufsiz: int, flags: int | None = None) -> bytes:
            data: bytes = baseRecv(self, bufsiz, flags)
            self._rekeyInfo.counter.bytesReceived += len(data)
            return data

        recv.__doc__ = baseRecv.__doc__
        cls = type(
            base.__name__,
            (base,),
            {
                "__slots__": (),
                "__module__": base.__module__,
                "__qualname__": base.__qualname__,
                "__doc__": base.__doc__,
                "recv": recv,
                "read": recv,
            },
        )
        _counting[base] = _counting[cls] = cls
    return cls


def countReceived(conn: SSL.Connection, counter: Any) -> None:
    """
    Add the size of everything ``conn.recv()`` returns to
    ``counter.bytesReceived`` from now on (one counter per Connection: a
    second call replaces the first).

    *conn* becomes an instance of a subclass of its class that only adds
    this count to ``recv`` (and its alias ``read``); ``isinstance`` checks
    and everything else are unchanged.  An instance attribute ``recv``
    would do the same, but on CPython it takes the Connection's attribute
    dict out of the layout instances of a class share, at ~0.8 KiB a
    connection; it is the fallback for a class whose instances refuse a
    new ``__class__``.
    """
    hub = infoCallbackFor(conn)
    hub.counter = counter
    cls = type(conn)
    if "recv" not in conn.__dict__:
        if _counting.get(cls) is cls:
            return  # counting already
        try:
            conn.__class__ = _countingClass(cls)
            return
        except TypeError:
            pass
    # An instance attribute recv, which a subclass's would not reach, or a
    # class that refuses the swap: wrap what is there.
    recv = conn.recv

    def counted(bufsiz: int, flags: int | None = None) -> bytes:
        data: bytes = recv(bufsiz, flags)
        hub.counter.bytesReceived += len(data)
        return data

    conn.recv = counted  # type: ignore[method-assign]
