"""
A sender's ear for PostgreSQL's wake-ups (issue 17): on a connection of its own, idle and
listening (``LISTEN mmgun_wake``), it hears the NOTIFY that every transaction queueing
mail due now sends at its commit (:data:`.queries.WAKE_SENDERS`), from any process on any
host, and calls the sender's ``wake`` once per read however many arrived. The connection's
socket is a reader of the reactor: nothing blocks, nothing polls. Connecting (and
reconnecting) runs in the reactor's thread pool. A lost connection (the database restarted,
an administrator's ``pg_terminate_backend``, a cut network, found within ~11 s by the
keepalives of :func:`.runners.connect`) is one warning, then tried again with back-off
(``BACKOFF``) until one succeeds, which is one line more; meanwhile the sender polls, as
it always does. Each (re)connection wakes the sender once: mail may have been queued while
nobody listened.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg
from psycopg.pq import ConnStatus
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReadDescriptor
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from . import queries as Q
from .runners import connect, masked, one_line

_log = Logger()

#: Seconds between tries to connect again: doubled from the first to the last, then the last.
BACKOFF = (1.0, 30.0)


def _listening(url: str) -> psycopg.Connection[Any]:
    """A new connection listening for wake-ups (blocking: run in a thread)."""
    conn = connect(url)
    try:
        conn.execute(Q.LISTEN_WAKE)
    except BaseException:
        conn.close()
        raise
    return conn


@implementer(IReadDescriptor)
class NotifyListener(Service):
    """
    Listens for ``mmgun_wake`` on ``url`` while running, calling ``wake`` (never raising).
    ``reactor``: IReactorFDSet and IReactorTime; ``in_thread(fn, *args)`` runs the blocking
    connect and returns a Deferred (default: the reactor's thread pool).
    """

    def __init__(
        self,
        url: str,
        wake: Callable[[], None],
        reactor: Any,
        in_thread: Callable[..., Deferred[Any]] | None = None,
    ) -> None:
        self._url = url
        self._wake = wake
        self._reactor = reactor
        self._in_thread = in_thread or (
            lambda fn, *args: deferToThreadPool(reactor, reactor.getThreadPool(), fn, *args)
        )
        self._conn: psycopg.Connection[Any] | None = None
        self._fd = -1
        self._retry: IDelayedCall | None = None
        self._delay = BACKOFF[0]
        self._connecting = False
        #: The connection was lost (or never made) and that was logged: its return is logged too.
        self._lost = False

    @property
    def listening(self) -> bool:
        return self._conn is not None

    def startService(self) -> None:
        super().startService()
        self._connect()

    def stopService(self) -> None:
        super().stopService()
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        self._drop()

    # -- connecting ------------------------------------------------------------

    def _connect(self) -> None:
        self._retry = None
        if not self.running or self._connecting:
            return
        self._connecting = True
        self._in_thread(_listening, self._url).addBoth(self._connected)

    def _connected(self, result: psycopg.Connection[Any] | Failure) -> None:
        self._connecting = False
        if isinstance(result, Failure):
            self._failed(one_line(result.value))
            return
        if not self.running:
            result.close()
            return
        self._conn = result
        self._fd = result.pgconn.socket
        self._reactor.addReader(self)
        self._delay = BACKOFF[0]
        if self._lost:
            self._lost = False
            _log.info("listening for wake-ups on {database} again", database=masked(self._url))
        # Mail queued while nobody listened (or while LISTEN was answered) is claimed now.
        self._call_wake()

    def _failed(self, error: str) -> None:
        """The connection is gone or could not be made: say so once, try again after the back-off."""
        self._drop()
        if not self.running:
            return
        if not self._lost:
            self._lost = True
            _log.warn(
                "not listening for wake-ups on {database} ({error}): the sender finds new mail by polling until "
                "the connection is back; trying again",
                database=masked(self._url),
                error=error,
            )
        delay, self._delay = self._delay, min(self._delay * 2, BACKOFF[1])
        self._retry = self._reactor.callLater(delay, self._connect)

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        self._reactor.removeReader(self)
        self._fd = -1
        try:
            conn.close()
        except psycopg.Error:
            pass

    # -- IReadDescriptor ---------------------------------------------------------

    def fileno(self) -> int:
        return self._fd

    def doRead(self) -> None:
        conn = self._conn
        if conn is None:
            return
        pgconn = conn.pgconn
        woken = False
        try:
            pgconn.consume_input()
            while pgconn.notifies() is not None:
                woken = True
            gone = pgconn.status != ConnStatus.OK
            error = "the connection was closed"
        except psycopg.Error as e:
            gone, error = True, one_line(e)
        if woken:
            self._call_wake()  # before a loss: what arrived is still worth a claim
        if gone:
            self._failed(error)

    def connectionLost(self, reason: Failure) -> None:
        if self._conn is not None:
            self._failed(one_line(reason.value))

    def logPrefix(self) -> str:
        return "NotifyListener"

    def _call_wake(self) -> None:
        try:
            self._wake()
        except Exception:
            _log.failure("waking the sender failed; it finds the mail at its next poll")


__all__ = ["BACKOFF", "NotifyListener"]
