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

This module must never import Twisted.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

from OpenSSL import SSL

from ._binding import ffi, need

__all__ = ["InfoCallback", "infoCallbackFor"]

Observe = Callable[[Any, int, int], None]
OnError = Callable[[BaseException], None]


class _Observer(NamedTuple):
    owner: object
    observe: Observe
    observeFailed: OnError
    chainFailed: OnError | None


class InfoCallback:
    """
    The info callback installed on one Connection's ``SSL``.

    :ivar replacement: a callback run instead of the chained one, called
        with the Connection as pyOpenSSL's own are.
    """

    def __init__(self, conn: SSL.Connection) -> None:
        self.conn = conn
        self.replacement: Callable[[SSL.Connection, int, int], object] | None = None
        self.observers: list[_Observer] = []
        self.callback = ffi.callback("void (*)(const SSL *, int, int)", self.call)
        need("SSL_set_info_callback")(conn._ssl, self.callback)  # type: ignore[attr-defined]

    def add(
        self,
        owner: object,
        observe: Observe,
        observeFailed: OnError,
        chainFailed: OnError | None = None,
    ) -> None:
        """
        Call *observe* with each ``(ssl, where, ret)``; what it raises goes
        to *observeFailed*.  With *chainFailed*, this observer takes the
        errors of the chained callback (unless one added later does).
        """
        self.observers.append(_Observer(owner, observe, observeFailed, chainFailed))

    def observedBy(self, kind: type) -> bool:
        """
        Whether an observer owned by an instance of *kind* is installed.
        """
        return any(isinstance(o.owner, kind) for o in self.observers)

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
            for observer in reversed(self.observers):
                if observer.chainFailed is not None:
                    observer.chainFailed(e)
                    return


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
