"""L{SessionCache}: SMTP sessions kept open between deliveries, as Postfix's scache."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IDelayedCall, IReactorTCP, IReactorTime

from .client import run_session
from .outcome import TransactionResult
from .session import ReusableSession
from .settings import SMTPSettings
from .wire import Transaction

__all__ = ["SessionCache"]

#: A parked session's MX (host name, address, port) and how its TLS was checked (the TLS
#: mode and trust root it was opened with): a session opened without a verified certificate
#: never serves a delivery that requires one (an MTA-STS policy in enforce mode).
Key = tuple[str, str, int, object, object]


class SessionCache:
    """
    SMTP sessions kept open between deliveries, as Postfix's scache: a session that ends
    with every transaction settled is parked (no QUIT) for C{idle_time} seconds, and the
    next L{send_session} to the same MX (host name, address and port) runs over it without
    a new TCP connection, EHLO or STARTTLS. A parked session is closed with QUIT when its
    time is up, when it has been open C{max_age} seconds, or at L{close}; one that the
    peer closed or spoke on while idle is dropped from the cache at once and never reused,
    and one that turns out dead when reused (before any reply) has started nothing: the
    session goes on over another parked one, or a new connection.

    At most C{per_destination} sessions are parked for one MX, and C{size} in all: a
    session that would pass either bound is ended with QUIT instead, except that the one
    idle longest elsewhere is closed to make room under C{size}.
    """

    def __init__(
        self,
        clock: IReactorTime,
        *,
        idle_time: float = 2.0,
        per_destination: int = 10,
        size: int = 100,
        max_age: float = 300.0,
    ) -> None:
        self._clock = clock
        self._idle_time = idle_time
        self._per_destination = per_destination
        self._size = size
        self._max_age = max_age
        #: Parked sessions by MX, most recently parked last; each with its expiry timer.
        self._idle: dict[Key, list[tuple[ReusableSession, IDelayedCall]]] = {}
        self._closed = False

    def __len__(self) -> int:
        return sum(len(entries) for entries in self._idle.values())

    async def send_session(
        self,
        reactor: IReactorTCP,
        host: str,
        address: str,
        port: int,
        transactions: Sequence[Transaction],
        settings: SMTPSettings,
        on_result: Callable[[TransactionResult], object] | None = None,
        may_start: Callable[[Transaction], bool] | None = None,
        on_dot_sent: Callable[[Transaction], object] | None = None,
    ) -> list[TransactionResult]:
        """L{mmgun.smtp.send_session}, over a parked session when there is one, leaving its own parked."""
        return await run_session(
            reactor, host, address, port, transactions, settings, on_result, may_start, on_dot_sent, cache=self
        )

    def take(self, key: Key) -> ReusableSession | None:
        """The most recently parked live session to C{key}, out of the cache; None if there is none."""
        entries = self._idle.get(key)
        while entries:
            session, timer = entries.pop()
            if not entries:
                del self._idle[key]
            if timer.active():
                timer.cancel()
            session.on_idle_lost = None
            if not session.gone:
                return session
        return None

    def park(self, key: Key, session: ReusableSession) -> None:
        """Keep C{session} for the next send_session to C{key}, or QUIT it if it may not be kept."""
        if self._closed or session.gone or self._clock.seconds() - session.connected_at >= self._max_age:
            self._end(session)
            return
        entries = self._idle.setdefault(key, [])
        if len(entries) >= self._per_destination:
            self._end(session)
            return
        if len(self) >= self._size:
            oldest = min(
                (entry for k, es in self._idle.items() if k != key for entry in es[:1]),
                key=lambda entry: entry[1].getTime(),
                default=None,
            )
            if oldest is None:
                self._end(session)
                return
            self._drop(oldest[0])
            self._end(oldest[0])
        timer = self._clock.callLater(self._idle_time, self._expire, session)
        session.on_idle_lost = self._lost
        entries.append((session, timer))

    def _drop(self, session: ReusableSession) -> None:
        """Take C{session} out of the cache (its timer cancelled), wherever it is."""
        for key, entries in list(self._idle.items()):
            for index, (parked, timer) in enumerate(entries):
                if parked is session:
                    del entries[index]
                    if not entries:
                        del self._idle[key]
                    if timer.active():
                        timer.cancel()
                    session.on_idle_lost = None
                    return

    def _end(self, session: ReusableSession) -> None:
        """QUIT a session that is not (or no longer) in the cache."""
        session.quit()

    def _expire(self, session: ReusableSession) -> None:
        self._drop(session)
        self._end(session)

    def _lost(self, session: ReusableSession) -> None:
        """The peer closed a parked session, or spoke on it unasked: out of the cache, never reused."""
        self._drop(session)

    def close(self) -> Deferred[None]:
        """
        QUIT every parked session and park none from now on; fires once their connections
        are closed (a peer that does not answer QUIT is cut off after QUIT_TIMEOUT).
        """
        self._closed = True
        waits: list[Deferred[None]] = []
        for entries in list(self._idle.values()):
            for session, _ in list(entries):
                self._drop(session)
                closed: Deferred[None] = Deferred()
                session.on_idle_lost = None
                session.connection_closed = closed
                waits.append(closed)
                self._end(session)
        done: Deferred[None] = Deferred()
        if not waits:
            done.callback(None)
            return done
        DeferredList(waits).addBoth(lambda _: done.callback(None))
        return done
