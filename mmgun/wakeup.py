"""
Waking the sender the moment a message is queued (issue 17), the poll left as a safety net.

A frontend calls its :class:`Wakeup` after the commit of a submission that is due now.
Within one process (``make run``: every role) that calls :meth:`mmgun.sender.Sender.wake`
directly. Across processes on one host (a frontend and a sender started apart, or the
supervised workers) it sends a one-octet datagram to every sender's Unix datagram socket
in the *wake directory* beside the SQLite database (``<database>.wake/``, mode 0700, so
only who may write the queue may wake its senders); each sender binds its own socket
there (:class:`WakeListener`) and, on readable, drains it and claims once. Nothing waits
and nothing is promised: a datagram that finds a full socket buffer is dropped (that
sender has wakes pending already), one to a socket nobody listens on any more (a sender
killed with -9) removes that socket, and a sender that misses a wake still polls every
``--poll-interval``. PostgreSQL databases have no directory beside them: the submitting
transaction itself sends ``NOTIFY mmgun_wake`` (delivered at its commit), and every sender,
on any host, listens on a connection of its own (:mod:`mmgun.store.postgres.wake`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from collections.abc import Callable

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorFDSet, IReactorTime, IReadDescriptor
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

_log = Logger()

#: How long a frontend uses its listing of the wake directory before reading it again: a
#: sender started meanwhile misses at most this long of wakes (it polls at start anyway).
LISTING_TTL = 1.0
#: The longest socket path the kernel takes (sun_path, with its terminating NUL).
MAX_SOCKET_PATH = 107
SUFFIX = ".sock"


def wake_directory(database: str) -> str | None:
    """The wake directory of ``database`` (``--database``): beside an SQLite file; None for PostgreSQL."""
    from .store import is_postgresql

    if is_postgresql(database) or database == ":memory:":
        return None
    return os.path.abspath(database) + ".wake"


class Wakeup:
    """
    What a frontend calls after committing mail that is due now: every callback
    subscribed in this process (a sender's ``wake``), then the notifier of the senders
    in other processes, if any. Never raises.
    """

    def __init__(self, notifier: WakeNotifier | None = None) -> None:
        self._local: list[Callable[[], None]] = []
        self.notifier = notifier

    def subscribe(self, callback: Callable[[], None]) -> None:
        self._local.append(callback)

    def __call__(self) -> None:
        for callback in self._local:
            try:
                callback()
            except Exception:
                _log.failure("waking the sender failed; it finds the mail at its next poll")
        if self.notifier is not None:
            self.notifier.notify()


class WakeNotifier:
    """
    Sends one octet, without ever blocking, to each sender socket in ``directory`` except
    ``own`` (this process's sender, woken directly). The listing is read at most once a
    ``LISTING_TTL`` (on ``clock``); a socket that refuses (nobody bound to it: its sender
    died) is removed.
    """

    def __init__(self, directory: str, clock: IReactorTime, own: str | None = None) -> None:
        self._directory = directory
        self._clock = clock
        self._own = own
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.setblocking(False)
        self._targets: list[str] = []
        self._listed_at = float("-inf")

    def _listing(self) -> list[str]:
        now = self._clock.seconds()
        if now - self._listed_at >= LISTING_TTL:
            self._listed_at = now
            try:
                names = os.listdir(self._directory)
            except OSError:
                names = []
            paths = (os.path.join(self._directory, n) for n in names if n.endswith(SUFFIX))
            self._targets = [p for p in paths if p != self._own]
        return self._targets

    def notify(self) -> int:
        """Wake every other sender now; how many datagrams were sent."""
        sent = 0
        for path in list(self._listing()):
            try:
                self._socket.sendto(b"!", path)
                sent += 1
            except OSError as e:
                if e.errno in (errno.ECONNREFUSED, errno.ENOENT):
                    # No process holds it (a killed sender's leftover): stop sending there.
                    self._targets.remove(path)
                    if e.errno == errno.ECONNREFUSED:
                        with contextlib.suppress(OSError):
                            os.unlink(path)
                # EAGAIN: its buffer is full of wakes not yet read; anything else: its poll finds the mail.
        return sent

    def close(self) -> None:
        self._socket.close()


@implementer(IReadDescriptor)
class WakeListener(Service):
    """
    A sender's socket in the wake directory (``<directory>/<name>.sock``): on readable,
    every datagram waiting is read and ``wake`` is called once. Bound at start (the
    directory made with mode 0700 if missing), removed at stop. A socket that cannot be
    bound (a path longer than the kernel takes, a read-only directory) is one warning:
    the sender then relies on its poll.
    """

    def __init__(self, directory: str, name: str, wake: Callable[[], None], reactor: IReactorFDSet) -> None:
        self.path = os.path.join(directory, name + SUFFIX)
        self._directory = directory
        self._wake = wake
        self._reactor = reactor
        self._socket: socket.socket | None = None

    def startService(self) -> None:
        super().startService()
        if len(os.fsencode(self.path)) > MAX_SOCKET_PATH:
            _log.warn(
                "not listening for wake-ups at {path}: the path is longer than a Unix socket's {limit} octets; "
                "the sender finds new mail by polling",
                path=self.path,
                limit=MAX_SOCKET_PATH,
            )
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            os.makedirs(self._directory, mode=0o700, exist_ok=True)
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            sock.bind(self.path)
        except OSError as e:
            sock.close()
            _log.warn(
                "not listening for wake-ups at {path}: {error}; the sender finds new mail by polling",
                path=self.path,
                error=e.strerror or str(e),
            )
            return
        sock.setblocking(False)
        self._socket = sock
        self._reactor.addReader(self)

    def stopService(self) -> None:
        super().stopService()
        sock, self._socket = self._socket, None
        if sock is None:
            return
        self._reactor.removeReader(self)
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        sock.close()

    # IReadDescriptor

    def fileno(self) -> int:
        return self._socket.fileno() if self._socket is not None else -1

    def doRead(self) -> None:
        sock = self._socket
        if sock is None:
            return
        woken = False
        while True:
            try:
                sock.recv(16)
            except OSError:  # BlockingIOError: drained
                break
            woken = True
        if woken:
            self._wake()

    def connectionLost(self, reason: Failure) -> None:
        pass

    def logPrefix(self) -> str:
        return "WakeListener"


def listener_name(identity: str) -> str:
    """A socket name for a sender of ``identity``: unique to this process, safe as a file name."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in identity)[:40]
    return f"{safe}-{os.getpid()}"


__all__ = ["Wakeup", "WakeNotifier", "WakeListener", "wake_directory", "listener_name"]
