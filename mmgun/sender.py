"""
The sender role: claim due envelopes, find their mail exchangers, relay them over
ESMTP, and commit what happened to every recipient.

Flow of one envelope::

    claim (lease) ─▶ resolve domain ─▶ MX 1 ─(can't connect)─▶ MX 2 … ─▶ record
                         │ NXDOMAIN / null MX: failed                 │ 2xx sent
                         │ SERVFAIL / timeout: deferred               │ 5xx failed
                                                                      │ 4xx, drop: deferred
                                                                      ▼
                                                           next attempt with backoff

Envelopes bound for the same MX go over one SMTP session, one transaction after
another; each domain's envelopes leave as soon as its lookup is done. The only window
in which a crash duplicates mail is between the peer's 250 to the final "." and our
commit of it (milliseconds): the lease then expires and the envelope is sent again.

A session whose transactions are done is kept open for ``cache_time`` (``--smtp-cache-time``,
2 s) rather than ended with QUIT (:class:`mmgun.smtp.SessionCache`, as Postfix's scache):
the next batch for that MX runs over it without TCP, EHLO or STARTTLS. At most
``max_per_destination`` idle sessions to one MX and ``cache_size`` in all, on top of the
``max_connections`` busy ones; they are closed with QUIT when idle that long and at stop.

Destination back-off (:mod:`mmgun.backoff`): sessions to one MX address are bounded by an
adaptive limit, ``max_per_destination`` at first, one less per 421, refused connection or
timeout (down to 1), raised again by successful transactions. A reply saying the receiver
rate-limits us pauses its recipient domain: while paused, that domain's claimed envelopes
are put back due at the pause's end (no attempt counted, no event), and no transaction for
it starts. Pauses and lowered limits are written to the store on change; other senders read
the pauses at most every BACKOFF_REFRESH seconds and honour them. Envelopes waiting for a
session slot of one MX whose limit was lowered are capped (:meth:`Sender._waiting_cap`):
beyond it a batch is put back, unattempted, due in retry_min/10, so that a slow MX cannot fill
max_in_flight (a healthy MX's backlog waits for its sessions, as a bulk send to one domain needs).

While the database cannot be reached (any write of this sender — a claim, a lease renewal,
a result — failed with :class:`mmgun.store.DatabaseUnavailable`: PostgreSQL down or cut
off), the sender claims nothing and pings it at each poll instead, logging one line when
that starts and one when it ends; and it starts no SMTP transaction: not a new session, nor
the next transaction of a session under way. Nor while one of its writes has gone
unanswered for more than UNANSWERED_LIMIT (a path that silently drops packets fails a write
only when TCP gives up). It also starts none for an envelope whose
lease may have run out by its own (monotonic) clock: a lease is taken as good until
lease_time after the claim or renewal that set it was *sent*, less LEASE_MARGIN of it, so a
sender that cannot renew (a database that does not even answer) stops by itself before
another host can take its envelopes over. Envelopes held back so are released (an
unattempted result, written under the lease like any other: kept and retried while the
database is gone, dropped if another sender took the envelope over meanwhile).

At shutdown, deliveries in flight get shutdown_timeout to finish; then the SMTP sessions
still open are aborted first, and only the envelopes whose message never went out to its
final "." are released. One whose "." was sent and whose reply (or the commit of it) never
came stays leased until its lease runs out: the reply may have been a 250.

A result the sender knows is never thrown away for a failing database: when its commit
fails with a StorageError (a full disk), the sender keeps it, keeps the lease renewed,
retries the commit with a backoff and claims nothing new until every such result is
recorded; after RECORD_GROUP_TRIES failed retries together, each result is retried on
its own, so that one that can never be committed holds back no other. Any other error
is a bug, not the disk: that result is dropped (logged critical with its envelope ids)
and its envelope sent again once its lease expires, rather than stopping every claim.

Leases are ``"<identity>/<random>"``. A sender locks its identity (``--sender-id``, by
default the host name) at start and takes back at once the envelopes its previous run
leased; when another live process holds that identity it runs under a fresh one instead.

Time: durations (timeouts, poll, renewal, retry timers) run on the reactor's clock,
which ``mmgun.tap`` makes monotonic; what is stored (leases, next_attempt, updated_at)
is wall-clock time from ``wall``. A step of the wall clock is noticed before every claim
(every batch of a poll): forward, every lease in flight is renewed and nothing is claimed for
two polls; backward, never-attempted envelopes queued "in the future" are made due now. A
claim that returns an envelope already in delivery here (a step between the check and the
claim, or renewals that failed for longer than a lease) does not send it again.
"""

from __future__ import annotations

import contextlib
import random
import re
import socket
import uuid
from collections import deque
from collections.abc import Callable, Coroutine, Iterator, Mapping
from typing import Any, Protocol, cast

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, DeferredSemaphore
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger, LogLevel

from .backoff import Backoff, Signal, classify, worst
from .bounces import mailbox_gone
from .message import header_needs_smtputf8, transaction_needs_smtputf8
from .metrics import Metrics
from .mtasts import enforced_settings, enforcing
from .mx import MXHost, PermanentDNSError, TemporaryDNSError
from .smtp import (
    RecipientResult,
    Reply,
    SessionCache,
    SessionFailed,
    SMTPSettings,
    Status,
    Transaction,
    TransactionResult,
    message_size,
    send_session,
    wire_form,
)
from .store import (
    Backoff as BackoffEntry,
    ClaimedEnvelope,
    DatabaseUnavailable,
    EnvelopeOutcome,
    RecipientOutcome,
    StorageError,
    Store,
)

_log = Logger()

#: A difference between wall-clock and monotonic elapsed time, between two polls, above
#: which the wall clock is taken to have been stepped (NTP slews far slower than this).
STEP_TOLERANCE = 1.0

#: The last part of a lease (a fraction of lease_time) in which no SMTP transaction is
#: started for its envelope: one started before has at least this long to finish before
#: another host can take the envelope over, even if no renewal succeeds meanwhile. Leases
#: are renewed every third of lease_time, so it never holds anything back while they succeed.
LEASE_MARGIN = 1 / 3

#: How long a write of this sender (a claim, a renewal, a result) may go unanswered before no
#: SMTP transaction is started until it is answered (at most this, and a sixth of lease_time):
#: a database whose network path was cut silently fails a write only when the connection's
#: TCP timeout runs out (10 s), and what this sender delivers meanwhile can never be recorded;
#: the host that takes its envelopes over would send it again.
UNANSWERED_LIMIT = 5.0

#: Failed retries of the unrecorded results together, after which each is retried on its
#: own: the store commits concurrent results in one transaction, so one result that can
#: never be committed would otherwise hold back every other.
RECORD_GROUP_TRIES = 3

#: Destination back-off (:mod:`mmgun.backoff`): the pauses other senders stored are read
#: again at most this often (monotonic seconds), in the background, when there is mail to route.
BACKOFF_REFRESH = 5.0


#: What a recipient without a result from the session gets.
_NO_RESULT = RecipientResult(Status.DEFERRED, Reply(451, "4.3.0 no result; will retry"))


def _each(envelope: ClaimedEnvelope, status: Status, reply: str) -> dict[str, RecipientResult]:
    """The same result, from a reply such as C{"451 4.4.3 lookup failed"}, for every recipient."""
    result = RecipientResult(status, Reply.parse(reply))
    return dict.fromkeys(envelope.recipients, result)


class Router(Protocol):
    """Where mail for a domain goes: :class:`mmgun.mx.MXResolver` or :class:`mmgun.mx.RelayHost`."""

    async def hosts(self, domain: str) -> list[MXHost]: ...

    def mark_bad(self, host: MXHost) -> None: ...

    def mark_good(self, host: MXHost) -> None: ...


class HoldBack(Protocol):
    """Releases envelopes whose delivery may not start, unattempted: due at ``due`` (wall clock), or as Sender._deliver_batch decides."""

    def __call__(self, held: list[ClaimedEnvelope], reason: str, due: float | None = None) -> None: ...


#: send_session's signature: (reactor, host, address, port, transactions, settings, *,
#: on_result, may_start, on_dot_sent), a coroutine (cancelled to abort the session). Every
#: transaction's result comes once through on_result (a started one's at once, the others'
#: at the end of the session); it returns them too, in order.
SessionFunction = Callable[..., Coroutine[Any, Any, list[TransactionResult]]]


@attrs.frozen
class SenderSettings:
    poll_interval: float = 1.0
    retry_min: float = 300.0
    retry_max: float = 3600.0
    queue_lifetime: float = 5 * 86400.0
    max_connections: int = 100
    max_per_destination: int = 10
    #: A recipient domain whose MX says it rate-limits us is paused this long, doubling on
    #: repeat (:mod:`mmgun.backoff`); 0: never paused.
    destination_pause: float = 60.0
    #: How long a claim is ours; renewed every third of it while we work.
    lease_time: float = 60.0
    #: Most transactions sent over one SMTP session.
    per_session: int = 100
    #: Most envelopes held in memory (claimed, not yet recorded).
    max_in_flight: int = 2000
    #: Most message bytes held by claimed envelopes, each submission's message counted
    #: once (its wire form, made once per message, adds about as much again). A claim
    #: stops before the first new message that would pass it; holding nothing, it takes at least one envelope.
    max_bytes_in_flight: int = 64 * 1024 * 1024
    shutdown_timeout: float = 30.0
    #: Most MX addresses tried in one delivery attempt (Postfix: smtp_mx_address_limit).
    mx_address_limit: int = 5
    #: Most SMTP sessions opened in one delivery attempt; a host that could not be
    #: connected to is not a session (Postfix: smtp_mx_session_limit).
    mx_session_limit: int = 2
    #: A failed commit of delivery results is retried after this pause, doubling up to record_retry_max.
    record_retry_min: float = 0.5
    record_retry_max: float = 10.0
    #: SMTP sessions are kept open this long after their deliveries, for the next ones to the
    #: same MX (:class:`mmgun.smtp.SessionCache`), at most cache_size idle in all and
    #: max_per_destination to one MX; 0 (either): every session ends with QUIT.
    cache_time: float = 2.0
    cache_size: int = 100


def retry_delay(attempts: int, settings: SenderSettings, rng: random.Random) -> float:
    """Doubling from retry_min after each attempt, capped at retry_max, with ±10% jitter."""
    base = min(settings.retry_max, settings.retry_min * 2 ** max(0, attempts - 1))
    return min(settings.retry_max, base * rng.uniform(0.9, 1.1))


def default_identity() -> str:
    """This host's name, as a sender identity (``--sender-id``'s alphabet; never a "/")."""
    name = re.sub(r"[^A-Za-z0-9._:-]", "-", socket.gethostname())[:128].lstrip("._:-")
    return name or "sender"


@attrs.define
class _Message:
    """One submission's message, shared by its envelopes in flight."""

    message: bytes
    #: wire_form(message), made when the first of its envelopes is sent.
    wire: bytes | None = None
    #: Whether the message has a byte of 0x80 or more (Transaction.eight_bit), made with ``wire``.
    eight_bit: bool = False
    #: Whether its header is UTF-8 (RFC 6532: Transaction.smtputf8), made with ``wire``.
    header_utf8: bool = False
    #: Its size as SIZE declares it (RFC 1870: Transaction.size), made with ``wire``.
    size: int = 0
    #: Envelopes in flight that carry it.
    refs: int = 0


class Sender(Service):
    """One sender process's delivery loop."""

    def __init__(
        self,
        store: Store,
        router: Router,
        reactor: Any,
        smtp: SMTPSettings,
        settings: SenderSettings,
        *,
        port: int = 25,
        session: SessionFunction | None = None,
        rng: random.Random | None = None,
        owner: str | None = None,
        metrics: Metrics | None = None,
        wall: Callable[[], float] | None = None,
        mta_sts_trust_root: object = None,
    ) -> None:
        """
        ``owner``: this sender's identity (default: the host name). ``wall``: the
        wall-clock time for what is stored (default: ``reactor.seconds``; production
        passes ``time.time``, the reactor's clock being monotonic). ``session``: what runs an SMTP
        session (default: :func:`mmgun.smtp.send_session`, through this sender's connection
        cache unless ``settings`` turn it off). ``mta_sts_trust_root``: what the certificates of
        MX hosts under an enforced MTA-STS policy are verified against (None: ``smtp``'s trust
        root, the platform's trust store by default; ``--mta-sts-ca`` in tests).
        """
        self._metrics = metrics if metrics is not None else Metrics()
        self._store = store
        self._router = router
        self._reactor = reactor
        self._clock: IReactorTime = reactor
        self._wall: Callable[[], float] = wall if wall is not None else reactor.seconds
        self._smtp = smtp
        self._settings = settings
        self._session_given = session
        self._mta_sts_trust_root = mta_sts_trust_root
        self._session: SessionFunction = session if session is not None else send_session
        #: Idle SMTP sessions kept for the next deliveries: made at each start, closed at the end of the stop.
        self._cache: SessionCache | None = None
        self._rng = rng or random.Random()
        #: The identity asked for, and the one in use (the prefix of every lease we take).
        self.identity = owner or default_identity()
        self.owner = self.identity
        self._connections = DeferredSemaphore(settings.max_connections)
        #: Destination back-off: each MX address's adaptive session limit (at most
        #: max_per_destination) and the paused recipient domains (:mod:`mmgun.backoff`).
        self.backoff = Backoff(settings.max_per_destination, settings.destination_pause, self.identity)
        #: When (monotonic) the stored back-offs were last read, and whether a read is under way.
        self._backoffs_read_at = float("-inf")
        self._backoffs_reading = False
        #: Claimed envelopes waiting for a session slot of an MX address (its adaptive limit), by address.
        self._waiting: dict[str, int] = {}
        #: Claimed envelopes not yet recorded, by id.
        self.in_flight: dict[int, ClaimedEnvelope] = {}
        #: The messages of the envelopes in flight, by submission id, and their total size.
        self._messages: dict[str, _Message] = {}
        self.held_bytes = 0
        #: Results whose commit failed, by envelope id: retried until recorded.
        self._unrecorded: dict[int, EnvelopeOutcome] = {}
        self._retrying: Deferred[None] | None = None
        self._holding_since = 0.0
        self._batches: set[Deferred[None]] = set()
        self._claiming = False
        self._poll_again = False
        self._stopping = False
        #: A write failed with DatabaseUnavailable and none sent since has succeeded: no claim
        #: (each poll pings the database first) and no SMTP transaction is started.
        self._database_lost = False
        #: Counts the losses: a write sent before the last one began says nothing by succeeding late.
        self._losses = 0
        #: For each envelope in flight, the monotonic time the claim or renewal that last
        #: extended its lease was sent: by our own clock the lease is good until lease_time after.
        self._lease_sent: dict[int, float] = {}
        #: The writes sent and not yet answered: token → monotonic time sent.
        self._unanswered: dict[int, float] = {}
        self._next_write = 0
        #: Envelopes whose message went out to its final "." and whose result is not recorded yet.
        self._past_dot: set[int] = set()
        #: The SMTP sessions under way: aborted at the end of the shutdown grace.
        self._sessions: set[Deferred[list[TransactionResult]]] = set()
        #: Set at the end of the shutdown grace: nothing is started any more.
        self._aborting = False
        #: (wall, monotonic) at the last poll: a step of the wall clock shows between two.
        self._marks: tuple[float, float] | None = None
        #: No claim before this (monotonic) time: after a forward step, the other senders
        #: on this host renew their leases before we could mistake them for expired ones.
        self._claim_after = float("-inf")
        self._poller = LoopingCall(self.poll)
        self._poller.clock = reactor
        self._renewer = LoopingCall(self._renew)
        self._renewer.clock = reactor

    # -- lifecycle -------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        self._aborting = False
        if self._session_given is None and self._settings.cache_time > 0 and self._settings.cache_size > 0:
            self._cache = SessionCache(
                self._clock,
                idle_time=self._settings.cache_time,
                per_destination=self._settings.max_per_destination,
                size=self._settings.cache_size,
            )
            self._session = self._cache.send_session
        self._track(Deferred.fromCoroutine(self._start()))

    async def _start(self) -> None:
        """Lock our identity and take back what its previous run leased, then start polling."""
        try:
            await self._take_identity()
        except Exception:
            _log.failure("taking back this sender's envelopes failed; they are sent again when their leases expire")
        if self._stopping or not self.running:
            return
        self._marks = (self._wall(), self._clock.seconds())
        self._poller.start(self._settings.poll_interval, now=True).addErrback(
            lambda f: _log.failure("sender poll loop stopped", f)
        )
        self._renewer.start(self._settings.lease_time / 3, now=False).addErrback(
            lambda f: _log.failure("lease renewal loop stopped", f)
        )

    async def _take_identity(self) -> None:
        if await self._store.lock_identity(self.identity):
            self.owner = self.identity
            count = await self._store.reclaim(self.identity, self._wall())
            if count:
                _log.info(
                    "took back {count} envelopes leased by the previous run of sender {identity}",
                    count=count,
                    identity=self.identity,
                )
            return
        fresh = f"{self.identity}-{uuid.uuid4().hex[:12]}"
        await self._store.lock_identity(fresh)
        self.owner = fresh
        _log.warn(
            "sender identity {identity} is held by another running process; running as {fresh}, "
            "whose envelopes wait for their leases to expire after a crash (give each sender its own --sender-id)",
            identity=self.identity,
            fresh=fresh,
        )

    def stopService(self) -> Deferred[None]:
        """
        Stop claiming, let deliveries in flight finish up to shutdown_timeout, then abort the
        SMTP sessions still open and release the envelopes whose message never went out.
        """
        super().stopService()
        self._stopping = True
        for loop in (self._poller, self._renewer):
            if loop.running:
                loop.stop()
        return Deferred.fromCoroutine(self._drain())

    async def _drain(self) -> None:
        # Wait for the batches (and for results waiting to be recorded) without cancelling
        # them: a delivery cut short mid-DATA would be worse than one that finishes after we
        # stop waiting. A batch may start another (a lookup done, a commit to retry).
        deadline = self._clock.seconds() + self._settings.shutdown_timeout
        while self._batches and self._clock.seconds() < deadline:
            await self._batches_done(deadline - self._clock.seconds())
        # First the connections: a reply that came in after the release below would be
        # a 250 for an envelope another sender may already be sending again.
        self._abort_sessions()
        # The idle ones carry nothing: QUIT (awaited at the end, bounded by smtp.QUIT_TIMEOUT).
        closing = self._cache.close() if self._cache is not None else None
        if self._retrying is not None:
            self._retrying.cancel()
        if self._unrecorded:
            # Still leased (not released): nobody sends them before the lease expires, but
            # the next run of this sender takes its envelopes back at once (reclaim).
            _log.critical(
                "stopping with the results of {count} envelopes not recorded (envelopes {envelopes}): "
                "they are delivered again, at once when a sender starts again as {owner}, "
                "otherwise when their leases expire",
                count=len(self._unrecorded),
                envelopes=sorted(self._unrecorded),
                owner=self.owner,
            )
        past_dot = sorted(i for i in self._past_dot if i in self.in_flight and i not in self._unrecorded)
        if past_dot:
            _log.warn(
                'not releasing {count} envelopes whose message went out to its final "." but whose result is '
                "not recorded (envelopes {envelopes}): the MX may have taken it, so they stay leased and are "
                "delivered again only when a sender starts again as {owner} or their leases expire",
                count=len(past_dot),
                envelopes=past_dot,
                owner=self.owner,
            )
        left = [e for e in self.in_flight.values() if e.id not in self._unrecorded and e.id not in self._past_dot]
        self.in_flight.clear()
        self._lease_sent.clear()
        self._past_dot.clear()
        self._messages.clear()
        self.held_bytes = 0
        self._unrecorded.clear()
        if left:
            _log.info("releasing {count} unfinished envelopes at shutdown", count=len(left))
            try:
                await self._store.release(left, self._wall())
            except Exception:
                _log.failure("could not release leases at shutdown; they expire by themselves")
        if closing is not None:
            await closing

    def _abort_sessions(self) -> None:
        """
        Start nothing more and drop every SMTP connection still open (no QUIT: a session
        waiting for the reply to its final "." would otherwise go on). The deliveries cut
        short record nothing: their envelopes are left to :meth:`_drain`.
        """
        self._aborting = True
        sessions = list(self._sessions)
        if sessions:
            _log.info("aborting {count} SMTP sessions still open at the end of the shutdown grace", count=len(sessions))
        for call in sessions:
            call.cancel()

    async def _batches_done(self, seconds: float) -> None:
        """Until every batch running now has ended, or ``seconds`` have passed."""
        gate: Deferred[None] = Deferred()

        def open_gate(_: object = None) -> None:
            if not gate.called:
                gate.callback(None)

        DeferredList(list(self._batches)).addBoth(open_gate)
        timer = self._clock.callLater(seconds, open_gate)
        await gate
        if timer.active():
            timer.cancel()

    # -- the loop --------------------------------------------------------------

    def poll(self) -> Deferred[None]:
        """Claim what is due (as much as there is room for) and start delivering it. Never raises."""
        return Deferred.fromCoroutine(self._poll())

    def wake(self) -> None:
        """
        Mail was queued that is due now (:mod:`mmgun.wakeup`): claim at once rather than at
        the next poll. Ignored before the poll loop has started (the identity is taken and
        the previous run's envelopes reclaimed first) and once stopping; wakes that come
        during a claim make one more claim after it, however many they are.
        """
        if self._poller.running and not self._stopping:
            self.poll()

    async def _poll(self) -> None:
        if self._stopping:
            return
        if self._claiming:
            # Asked while claiming (a batch ended): claim again once this claim is done.
            self._poll_again = True
            return
        self._claiming = True
        self._poll_again = False
        try:
            if self._database_lost:
                # No claim until the database answers; a failed ping is caught below, not logged again.
                losses = self._losses
                await self._store.ping()
                self._database_back(losses)
            while not self._stopping:
                # Before every claim, not once per poll: a claim reads the wall clock, and
                # a step between two batches would make our own leases look expired.
                await self._watch_clock()
                if self._stopping or self._unrecorded or self._clock.seconds() < self._claim_after:
                    return
                room = self._settings.max_in_flight - len(self.in_flight)
                budget = self._settings.max_bytes_in_flight - self.held_bytes
                if room <= 0 or (budget <= 0 and self.in_flight):
                    return
                limit = min(room, 500)
                # Held through the claim: an entry let go meanwhile is still there to share.
                held = dict(self._messages)
                sent, losses = self._clock.seconds(), self._losses
                with self._writing():
                    claimed = await self._store.claim(
                        self.owner,
                        self._wall(),
                        self._settings.lease_time,
                        limit,
                        max_bytes=max(budget, 0),
                        held=list(held),
                        # Holding nothing, a message larger than the budget still goes (alone).
                        always_one=not self.in_flight,
                    )
                self._database_back(losses)
                if not claimed:
                    return
                fresh = [e for e in (self._hold(envelope, held, sent) for envelope in claimed) if e is not None]
                if fresh:
                    self._dispatch(fresh)
                if len(claimed) < limit:
                    return
        except DatabaseUnavailable as e:
            self._database_gone("claiming envelopes", e)
            self._poll_again = False
        except Exception:
            _log.failure("claiming envelopes failed; will try again")
            self._poll_again = False  # at the next tick, not at once
        finally:
            self._claiming = False
            if self._poll_again and not self._stopping:
                self.poll()

    def _database_gone(self, what: str, error: DatabaseUnavailable) -> None:
        """A write failed because the database cannot be reached: one line when that starts, not one per write."""
        self._losses += 1
        if not self._database_lost:
            self._database_lost = True
            _log.error(
                "{what} failed: {error}; no claims until the database answers again, "
                "and no SMTP transaction is started meanwhile",
                what=what,
                error=str(error),
            )

    def _database_back(self, losses: int) -> None:
        """A request sent when the count of losses was ``losses`` succeeded: the database answers, if none began since."""
        if self._database_lost and losses == self._losses:
            self._database_lost = False
            _log.info("the database answers again; claiming resumes, and so do deliveries")

    def _hold(self, envelope: ClaimedEnvelope, held: dict[str, _Message], sent: float) -> ClaimedEnvelope | None:
        """
        Put a claimed envelope in flight, carrying its submission's one shared message; None
        for one already in flight here. That happens only when our own lease on it looked
        expired at the claim (a wall-clock step the checks missed, or renewals that failed
        for longer than a lease): the delivery under way goes on, under the new lease, which
        is the one now renewed and recorded against; nothing is sent twice. ``sent``: when
        the claim was sent (monotonic), from which its lease is judged.
        """
        self._lease_sent[envelope.id] = sent
        current = self.in_flight.get(envelope.id)
        if current is not None:
            _log.warn(
                "claimed envelope {envelope}, already in delivery here (its lease looked expired); "
                "not sending it again, keeping its new lease",
                envelope=envelope.id,
            )
            self.in_flight[envelope.id] = attrs.evolve(current, lease=envelope.lease)
            return None
        entry = self._messages.get(envelope.submission_id)
        if entry is None:
            entry = held.get(envelope.submission_id) or _Message(envelope.message)
            self._messages[envelope.submission_id] = entry
            self.held_bytes += len(entry.message)
        entry.refs += 1
        if envelope.message is not entry.message:
            envelope = attrs.evolve(envelope, message=entry.message)
        self.in_flight[envelope.id] = envelope
        return envelope

    def _let_go(self, envelope: ClaimedEnvelope) -> None:
        if self.in_flight.pop(envelope.id, None) is None:
            return
        self._lease_sent.pop(envelope.id, None)
        self._past_dot.discard(envelope.id)
        entry = self._messages.get(envelope.submission_id)
        if entry is not None:
            entry.refs -= 1
            if entry.refs <= 0:
                del self._messages[envelope.submission_id]
                self.held_bytes -= len(entry.message)

    def _dispatch(self, envelopes: list[ClaimedEnvelope]) -> None:
        self._track(Deferred.fromCoroutine(self._route(envelopes)))

    def _track(self, d: Deferred[None]) -> None:
        self._batches.add(d)

        def done(_: object) -> None:
            self._batches.discard(d)
            if not self._stopping and self.running:
                self.poll()

        d.addBoth(done)

    async def _renew(self) -> None:
        if not self.in_flight:
            return
        envelopes = list(self.in_flight.values())
        sent, losses = self._clock.seconds(), self._losses
        now = self._wall()
        try:
            with self._writing():
                await self._store.renew(envelopes, now, now + self._settings.lease_time)
        except DatabaseUnavailable as e:
            self._database_gone("renewing leases", e)
            return
        except Exception:
            _log.failure("renewing leases failed")
            return
        self._database_back(losses)
        for envelope in envelopes:
            current = self.in_flight.get(envelope.id)
            if current is not None and current.lease == envelope.lease:
                self._lease_sent[envelope.id] = max(sent, self._lease_sent.get(envelope.id, sent))

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """Around a store write: while it goes unanswered for too long, no transaction starts."""
        token, self._next_write = self._next_write, self._next_write + 1
        self._unanswered[token] = self._clock.seconds()
        try:
            yield
        finally:
            del self._unanswered[token]

    def _why_not_start(self, envelope_id: int) -> str | None:
        """Why no SMTP transaction may start now for this envelope, or None when one may."""
        if self._aborting:
            return "stopping"
        if self._database_lost:
            return "the database cannot be reached"
        if self._unanswered:
            # The oldest is the first: writes are numbered in the order they start, on a clock
            # that never goes back (min() here was a scan per envelope of every write in flight).
            waited = self._clock.seconds() - next(iter(self._unanswered.values()))
            if waited > min(UNANSWERED_LIMIT, self._settings.lease_time / 6):
                return f"the database has not answered a write for {waited:.0f} s"
        sent = self._lease_sent.get(envelope_id)
        if envelope_id not in self.in_flight or sent is None:
            return "not held"
        if self._clock.seconds() >= sent + self._settings.lease_time * (1 - LEASE_MARGIN):
            return "its lease may have run out (no renewal for too long)"
        return self._paused(self.in_flight[envelope_id].domain)

    def _paused(self, domain: str) -> str | None:
        """Why mail to ``domain`` waits, while it is paused (by us or another sender); else None."""
        paused = self.backoff.paused(domain, self._wall())
        if paused is None:
            return None
        until, reply = paused
        return f"mail to {domain} is paused for {until - self._wall():.0f} s more ({reply})"

    async def _watch_clock(self) -> None:
        """Notice a step of the wall clock since the last poll, and keep leases and the queue right."""
        wall, now = self._wall(), self._clock.seconds()
        marks, self._marks = self._marks, (wall, now)
        if marks is None:
            return
        step = (wall - marks[0]) - (now - marks[1])
        if abs(step) <= STEP_TOLERANCE:
            return
        _log.warn(
            "the wall clock was stepped {direction} by {seconds:.1f} s; renewing the leases of {count} envelopes in delivery",
            direction="forward" if step > 0 else "back",
            seconds=abs(step),
            step=step,
            count=len(self.in_flight),
        )
        # Forward: our leases now look expired to every sender, us included; renewed
        # before anything is claimed. Back: they would outlast a crash by the step.
        await self._renew()
        if step > 0:
            # Two polls: any other sender on this host sees the same step and renews its
            # own leases before we could claim them.
            self._claim_after = now + 2 * self._settings.poll_interval
            return
        try:
            count = await self._store.due_unattempted(wall)
        except Exception:
            _log.failure("making queued envelopes due after the clock step failed")
            return
        if count:
            _log.info("{count} envelopes queued before the clock step are due now", count=count)

    # -- routing: domains to MX hosts ------------------------------------------

    async def _route(self, envelopes: list[ClaimedEnvelope]) -> None:
        """
        Resolve every domain of a claim and send each domain's envelopes as soon as its
        lookup is done. Lookups done together (at once from the cache, or in the same
        reactor turn) are grouped by the hosts they go to, so that domains sharing their
        MX (or a relay host) share SMTP sessions.
        """
        self._read_backoffs()
        by_domain: dict[str, list[ClaimedEnvelope]] = {}
        for envelope in envelopes:
            by_domain.setdefault(envelope.domain, []).append(envelope)
        ready: dict[tuple[MXHost, ...], list[ClaimedEnvelope]] = {}
        flush_call: list[IDelayedCall] = []
        starting = [True]

        def flush() -> None:
            flush_call.clear()
            size = self._settings.per_session
            for hosts, group in ready.items():
                for start in range(0, len(group), size):
                    self._track(Deferred.fromCoroutine(self._deliver_batch(hosts, group[start : start + size])))
            ready.clear()

        def found(hosts: list[MXHost], group: list[ClaimedEnvelope]) -> None:
            ready.setdefault(tuple(hosts), []).extend(group)
            if not starting[0] and not flush_call:
                flush_call.append(self._clock.callLater(0, flush))

        lookups = [Deferred.fromCoroutine(self._lookup(domain, group, found)) for domain, group in by_domain.items()]
        starting[0] = False
        flush()
        await DeferredList(lookups)
        if flush_call:
            flush_call[0].cancel()
            flush()

    async def _lookup(
        self,
        domain: str,
        group: list[ClaimedEnvelope],
        found: Callable[[list[MXHost], list[ClaimedEnvelope]], None],
    ) -> None:
        paused = self.backoff.paused(domain, self._wall())
        if paused is not None:
            # Not attempted: put back, due when the pause ends, no attempt counted and no event.
            until, reply = paused
            _log.info(
                "mail to {domain} is paused for {seconds:.0f} s more ({reply}); {count} envelopes wait until then",
                domain=domain,
                seconds=until - self._wall(),
                until=until,
                reply=reply,
                count=len(group),
            )
            await self._record([EnvelopeOutcome(env, (), until, attempted=False) for env in group])
            return
        try:
            hosts = await self._router.hosts(domain)
        except PermanentDNSError as e:
            _log.info("no mail exchanger for {domain}: {reply}", domain=domain, reply=e.reply)
            await self._record([self._outcome(env, _each(env, Status.FAILED, e.reply)) for env in group])
        except TemporaryDNSError as e:
            _log.info("DNS lookup for {domain} failed temporarily: {reply}", domain=domain, reply=e.reply)
            await self._record([self._outcome(env, _each(env, Status.DEFERRED, e.reply)) for env in group])
        except Exception:
            _log.failure("resolving {domain} failed unexpectedly", domain=domain)
            reply = "451 4.3.0 internal error in mmgun; will retry"
            await self._record([self._outcome(env, _each(env, Status.DEFERRED, reply)) for env in group])
        else:
            found(hosts, group)

    # -- one batch: envelopes for the same hosts, over one session -------------

    async def _deliver_batch(self, hosts: tuple[MXHost, ...], envelopes: list[ClaimedEnvelope]) -> None:
        """
        Deliver, and commit each envelope's result as soon as it is known — right after
        the peer's reply to its final "." — rather than at the end of the session: a
        crash then duplicates at most the messages whose commit was under way.
        """
        commits: list[Deferred[None]] = []
        settled: set[int] = set()

        def settle(envelope: ClaimedEnvelope, results: Mapping[str, RecipientResult], mx_host: str | None = None) -> None:
            settled.add(envelope.id)
            commits.append(Deferred.fromCoroutine(self._record([self._outcome(envelope, results, mx_host)])))

        def hold_back(held: list[ClaimedEnvelope], reason: str, due: float | None = None) -> None:
            """
            Release envelopes whose delivery may not start (see _why_not_start): no attempt
            counted; due at ``due`` (wall clock) if given, else at the end of their domain's
            pause while it is paused (not claimed again meanwhile only to be put back), else now.
            """
            if not held:
                return
            _log.warn(
                "not starting delivery of {count} envelopes ({reason}); releasing them (envelopes {envelopes})",
                count=len(held),
                reason=reason,
                envelopes=sorted(e.id for e in held),
                due=due,
            )
            now = self._wall()
            outcomes = []
            for envelope in held:
                settled.add(envelope.id)
                at = due
                if at is None:
                    paused = self.backoff.paused(envelope.domain, now)
                    at = paused[0] if paused is not None else None
                outcomes.append(EnvelopeOutcome(envelope, (), at, attempted=False))
            commits.append(Deferred.fromCoroutine(self._record(outcomes)))

        try:
            await self._attempt(hosts, envelopes, settled, settle, hold_back)
        except Exception:
            # Unless cut short at the end of the shutdown grace: then _drain sees to the envelopes.
            if not self._aborting:
                _log.failure("delivery to {mx} failed unexpectedly", mx=hosts[0].name if hosts else "?")
                reply = "451 4.3.0 internal error in mmgun; will retry"
                for envelope in envelopes:
                    if envelope.id not in settled:
                        settle(envelope, _each(envelope, Status.DEFERRED, reply))
        await DeferredList(commits)

    # -- recording results: never thrown away ----------------------------------

    async def _record(self, outcomes: list[EnvelopeOutcome]) -> None:
        outcomes = self._under_current_leases(outcomes)
        losses = self._losses
        try:
            with self._writing():
                await self._store.record(outcomes, self._wall())
        except StorageError as e:
            if isinstance(e, DatabaseUnavailable):
                self._database_gone("recording delivery results", e)
            self._keep(outcomes, e)
        except Exception:
            self._drop(outcomes)
        else:
            self._database_back(losses)
            self._recorded(outcomes)

    def _under_current_leases(self, outcomes: list[EnvelopeOutcome]) -> list[EnvelopeOutcome]:
        """The outcomes, each against its envelope's lease now (see :meth:`_hold`)."""
        fresh = []
        for outcome in outcomes:
            current = self.in_flight.get(outcome.envelope.id)
            if current is not None and current.lease != outcome.envelope.lease:
                outcome = attrs.evolve(outcome, envelope=current)
            fresh.append(outcome)
        return fresh

    def _drop(self, outcomes: list[EnvelopeOutcome]) -> None:
        """
        A commit failed with something other than a StorageError: a bug, not the disk, and
        retrying would fail again and hold back every other result. The results are given
        up and their envelopes let go: their leases expire and they are sent again.
        """
        _log.failure(
            "recording the delivery results of envelopes {envelopes} failed unexpectedly; dropping them: "
            "they are delivered again when their leases expire",
            envelopes=sorted(o.envelope.id for o in outcomes),
            level=LogLevel.critical,
        )
        for outcome in outcomes:
            self._unrecorded.pop(outcome.envelope.id, None)
            self._let_go(outcome.envelope)

    def _recorded(self, outcomes: list[EnvelopeOutcome]) -> None:
        now = self._wall()
        for outcome in outcomes:
            for r in outcome.recipients:
                self._metrics.recipient(r.status, now - outcome.envelope.created_at)
            self._let_go(outcome.envelope)

    def _keep(self, outcomes: list[EnvelopeOutcome], error: Exception) -> None:
        """A commit failed: hold the results (and their leases) and retry until they are recorded."""
        for outcome in outcomes:
            self._unrecorded[outcome.envelope.id] = outcome
        if self._retrying is not None:
            return
        self._holding_since = self._clock.seconds()
        _log.error(
            "recording delivery results failed ({error}); keeping them, renewing their leases and retrying, "
            "and claiming no new envelopes until they are recorded",
            error=str(error) or type(error).__name__,
            count=len(self._unrecorded),
        )
        self._retrying = Deferred.fromCoroutine(self._retry_records())
        self._track(self._retrying)

    async def _retry_records(self) -> None:
        delay = self._settings.record_retry_min
        failures = 0
        try:
            while self._unrecorded:
                await deferLater(self._clock, delay, lambda: None)
                batch = self._under_current_leases(list(self._unrecorded.values()))
                if failures < RECORD_GROUP_TRIES:
                    parts = deque([batch])
                else:
                    # One at a time: a result that cannot be committed holds back no other.
                    parts = deque([outcome] for outcome in batch)
                failed = False
                while parts:
                    part = parts.popleft()
                    losses = self._losses
                    try:
                        with self._writing():
                            await self._store.record(part, self._wall())
                    except StorageError as e:
                        if isinstance(e, DatabaseUnavailable):
                            self._database_gone("recording delivery results", e)
                        failed = True
                        continue
                    except Exception:
                        if len(part) > 1:
                            # Not the disk: find the one at fault by asking each on its own, now.
                            parts.extend([outcome] for outcome in part)
                            failures = RECORD_GROUP_TRIES
                        else:
                            self._drop(part)
                        continue
                    self._database_back(losses)
                    for outcome in part:
                        self._unrecorded.pop(outcome.envelope.id, None)
                    self._recorded(part)
                if failed:
                    failures += 1
                    delay = min(2 * delay, self._settings.record_retry_max)
            _log.warn(
                "delivery results recorded after {seconds:.1f} s of failed commits; claiming again",
                seconds=self._clock.seconds() - self._holding_since,
            )
        finally:
            self._retrying = None

    # -- one delivery attempt ----------------------------------------------------

    async def _attempt(
        self,
        hosts: tuple[MXHost, ...],
        envelopes: list[ClaimedEnvelope],
        settled: set[int],
        settle: Callable[[ClaimedEnvelope, Mapping[str, RecipientResult], str | None], None],
        hold_back: HoldBack,
    ) -> None:
        """
        Try the hosts in order until every envelope has a result, at most
        mx_address_limit addresses and mx_session_limit sessions (a host that could not
        be connected to is not a session): enforced here whatever the router returns.

        No transaction starts for an envelope :meth:`_why_not_start` holds back: it is
        released (``hold_back``) and the attempt ends there. At the end of the shutdown
        grace (``_aborting``) the attempt ends at once, its envelopes left as they are.

        ``settled``: the envelopes that have their result (or were held back). Each
        transaction's result comes once, through the session's ``on_result``: a started
        one's is recorded at once; one not started leaves its envelope for the next host.
        """
        domains = ", ".join(sorted({e.domain for e in envelopes}))
        #: The reply the envelopes still without a result are deferred with in the end.
        last_reply = [f"451 4.4.0 no mail exchanger of {domains} could be reached"]
        addresses = sessions = 0
        for host in hosts:
            if self._aborting:
                return
            remaining = [e for e in envelopes if e.id not in settled]
            if not remaining:
                break
            if addresses >= self._settings.mx_address_limit or sessions >= self._settings.mx_session_limit:
                _log.info(
                    "attempt for {domains} stops after {addresses} addresses and {sessions} sessions "
                    "of {hosts} hosts: {reply}",
                    domains=domains,
                    addresses=addresses,
                    sessions=sessions,
                    hosts=len(hosts),
                    reply=last_reply[0],
                )
                break
            addresses += 1
            # Keyed like TransactionResult.key (object): each transaction's key is its envelope's id.
            by_id: dict[object, ClaimedEnvelope] = {env.id: env for env in remaining}

            def on_result(
                result: TransactionResult, host: MXHost = host, by_id: dict[object, ClaimedEnvelope] = by_id
            ) -> None:
                envelope = by_id[result.key]
                if not result.started:
                    # The session ended before it: the next host is tried.
                    last_reply[0] = str(next(iter(result.recipients.values())).reply)
                    return
                for r in result.recipients.values():
                    self._metrics.smtp_reply(r.reply.code)
                _log.info(
                    "delivery attempt for envelope {envelope} via {mx}: {outcomes}",
                    envelope=envelope.id,
                    mx=host.name,
                    outcomes={a: str(r.reply.code) for a, r in result.recipients.items()},
                )
                settle(envelope, result.recipients, host.name)

            #: Why the session held a transaction back (see send_session's may_start), if it did.
            stopped: list[str] = []

            def may_start(transaction: Transaction, stopped: list[str] = stopped) -> bool:
                reason = self._why_not_start(cast(int, transaction.key))
                if reason is not None and not stopped:
                    stopped.append(reason)
                return reason is None

            try:
                session_results = await self._send(host, remaining, on_result, may_start, hold_back)
            except SessionFailed as e:
                if self._aborting:
                    return
                if stopped:
                    # Held back before its first transaction: the host is not at fault.
                    hold_back([e for e in envelopes if e.id not in settled], stopped[0])
                    return
                if e.connected:
                    sessions += 1
                self._router.mark_bad(host)
                last_reply[0] = str(e.reply)
                _log.info(
                    "could not deliver to {mx} ({address}): {reply}",
                    mx=host.name,
                    address=host.address,
                    reply=last_reply[0],
                )
                continue
            except Exception:
                if self._aborting:
                    return  # the session was aborted (cancelled)
                raise
            if self._aborting or session_results is None:
                return  # stopping, or every envelope left was held back before a session opened
            sessions += 1
            self._router.mark_good(host)
            if stopped:
                hold_back([e for e in envelopes if e.id not in settled], stopped[0])
                return
        for envelope in envelopes:
            if envelope.id not in settled:
                settle(envelope, _each(envelope, Status.DEFERRED, last_reply[0]), None)

    async def _send(
        self,
        host: MXHost,
        envelopes: list[ClaimedEnvelope],
        on_result: Callable[[TransactionResult], None],
        may_start: Callable[[Transaction], bool],
        hold_back: HoldBack,
    ) -> list[TransactionResult] | None:
        """
        One session to ``host`` for the envelopes that may start once a connection slot is
        free (the others are held back); None, with no connection made, when none may.
        """
        # The MX's adaptive limit (mmgun.backoff): max_per_destination, less after 421s.
        per_host = self.backoff.limit(host.address, f"{host.name} [{host.address}]", self._wall())
        waiting = self._waiting.get(host.address, 0)
        lowered = per_host.limit < self._settings.max_per_destination
        if lowered and per_host.full and waiting and waiting + len(envelopes) > self._waiting_cap(per_host.limit):
            # Enough of in_flight waits for this MX already (a slow one, its limit lowered):
            # these go back to the queue for a while, leaving the room to other destinations.
            # Not while its limit is at the maximum: a healthy MX's backlog (one busy
            # destination, bulk mail) waits for its sessions as it always did.
            crowded = f"{waiting} envelopes already wait for a session to {per_host.label} (at most {per_host.limit} at once)"
            hold_back(envelopes, crowded, self._wall() + self._settings.retry_min / 10)
            return None
        self._waiting[host.address] = waiting + len(envelopes)
        try:
            await per_host.acquire()
        finally:
            left = self._waiting[host.address] - len(envelopes)
            if left > 0:
                self._waiting[host.address] = left
            else:
                del self._waiting[host.address]
        try:
            await self._connections.acquire()
            try:
                # Judged now, not before the wait for a slot (which may have been long).
                startable: list[ClaimedEnvelope] = []
                held: dict[str, list[ClaimedEnvelope]] = {}
                for envelope in envelopes:
                    reason = self._why_not_start(envelope.id)
                    if reason is None:
                        startable.append(envelope)
                    else:
                        held.setdefault(reason, []).append(envelope)
                if self._aborting:
                    return None
                for reason, group in held.items():
                    hold_back(group, reason)
                if not startable:
                    return None
                transactions = [self._transaction(e) for e in startable]
                domains: dict[object, str] = {e.id: e.domain for e in startable}
                #: Whether a started transaction drew a 421, a timeout or a rate limit.
                negative = [False]

                def reported_result(result: TransactionResult) -> None:
                    # The result first: a bug in the feedback must never lose a SENT one.
                    on_result(result)
                    if result.started:
                        try:
                            negative[0] |= self._feedback(host, domains, [result])
                        except Exception:
                            _log.failure("destination back-off feedback for {mx} failed", mx=host.name)

                session, smtp = self._session, self._smtp
                if host.mta_sts is not None:
                    # An MX of an enforced MTA-STS policy (RFC 8461 4.2): STARTTLS with a certificate
                    # valid for its name. The session cache keys sessions by their TLS settings too.
                    session = enforcing(self._session, host.mta_sts)
                    smtp = enforced_settings(self._smtp, self._mta_sts_trust_root)
                call = Deferred.fromCoroutine(
                    session(
                        self._reactor,
                        host.name,
                        host.address,
                        host.port,
                        transactions,
                        smtp,
                        on_result=reported_result,
                        may_start=may_start,
                        on_dot_sent=self._dot_sent,
                    )
                )
                self._sessions.add(call)
                try:
                    results = await call
                except SessionFailed as e:
                    self._feedback_failed(host, sorted(set(domains.values())), e.reply)
                    raise
                finally:
                    self._sessions.discard(call)
                # The session returns every result it gave on_result, the not-started ones included.
                self._after_session(host, domains, results, hold_back, negative[0])
                return results
            finally:
                self._connections.release()
        finally:
            per_host.release()
            self.backoff.done_with(host.address)

    # -- destination back-off (mmgun.backoff) -----------------------------------

    def _waiting_cap(self, limit: int) -> int:
        """
        Most claimed envelopes that may wait for a session to one MX address whose session
        limit is ``limit`` (one batch always may): a round of sessions at that limit or a
        tenth of max_in_flight, whichever is more, and never more than half of it. At the
        maximum a busy MX keeps its batches waiting as before; once its limit is lowered (a
        slow or tarpitting MX down to 1), its waiting mail shrinks with it and cannot fill the
        room other destinations need.
        """
        settings = self._settings
        return max(1, min(max(limit * settings.per_session, settings.max_in_flight // 10), settings.max_in_flight // 2))

    def _feedback(self, host: MXHost, domains: dict[object, str], results: list[TransactionResult]) -> bool:
        """
        Started transactions' replies: the MX's concurrency goes up or down; a rate limit
        pauses the domain. Whether any was negative (a 421, a timeout, a rate limit).
        """
        negative = False
        if not results:
            return negative
        now = self._wall()
        for result in results:
            replies = [r.reply for r in result.recipients.values()]
            signals = [classify(reply.code, reply.text, received=reply.received) for reply in replies]
            signal = worst(signals)
            reply = str(replies[signals.index(signal)]) if signals else ""
            negative |= signal in (Signal.OVERLOADED, Signal.RATE_LIMITED)
            self.backoff.session_feedback(host.address, signal, reply, now)
            domain = domains.get(result.key)
            if domain is not None:
                self._domain_feedback(domain, signal, reply, now)
        self._save_backoffs()
        return negative

    def _feedback_failed(self, host: MXHost, domains: list[str], failure: Reply) -> None:
        """A session that failed before any transaction (connection refused or timed out, a 421 greeting)."""
        signal = classify(failure.code, failure.text, received=failure.received)
        if signal not in (Signal.OVERLOADED, Signal.RATE_LIMITED):
            return  # a TLS policy failure, a 5xx greeting: not the MX's load
        now, reply = self._wall(), str(failure)
        self.backoff.session_feedback(host.address, signal, reply, now)
        for domain in domains:
            self._domain_feedback(domain, signal, reply, now)
        self._save_backoffs()

    def _domain_feedback(self, domain: str, signal: Signal, reply: str, now: float) -> None:
        until = self.backoff.domain_feedback(domain, signal, reply, now)
        if until is not None:
            _log.warn(
                "{domain} says it is rate-limiting us: pausing mail to it for {seconds:.0f} s ({reply})",
                domain=domain,
                seconds=until - now,
                until=until,
                reply=reply,
            )

    def _after_session(
        self,
        host: MXHost,
        domains: dict[object, str],
        results: list[TransactionResult],
        hold_back: HoldBack,
        negative: bool,
    ) -> None:
        """
        The transactions a session ended before starting: a 421 or a timeout that came between
        two of them lowers the MX's concurrency once, unless a started one already did
        (``negative``); and those of a domain now paused are held back (released, no attempt
        counted) rather than tried at the next MX.
        """
        unstarted = [r for r in results if not r.started]
        if not unstarted:
            return
        replies = [rr.reply for r in unstarted for rr in r.recipients.values()]
        signals = [classify(reply.code, reply.text, received=reply.received) for reply in replies]
        signal = worst(signals)
        if not negative and signal in (Signal.OVERLOADED, Signal.RATE_LIMITED):
            now, reply = self._wall(), str(replies[signals.index(signal)])
            self.backoff.session_feedback(host.address, signal, reply, now)
            for domain in sorted({domains[r.key] for r in unstarted if r.key in domains}):
                self._domain_feedback(domain, signal, reply, now)
            self._save_backoffs()
        held: dict[str, list[ClaimedEnvelope]] = {}
        for result in unstarted:
            envelope = self.in_flight.get(cast(int, result.key))
            reason = self._paused(envelope.domain) if envelope is not None else None
            if envelope is not None and reason is not None:
                held.setdefault(reason, []).append(envelope)
        for reason, group in held.items():
            hold_back(group, reason)

    def _save_backoffs(self) -> None:
        """Write what changed to the store (in the background; on change, not per message)."""
        changes = self.backoff.changes()
        if not changes:
            return
        for entry in changes:
            if entry.kind == "domain":
                self._metrics.destination_backoff("domain")
            elif entry.concurrency is not None and entry.until > entry.updated_at:
                self._metrics.destination_backoff("mx")
                _log.info(
                    "concurrency to {mx} is now {concurrency} sessions ({reply})",
                    mx=entry.name,
                    concurrency=entry.concurrency,
                    reply=entry.reply,
                )
            else:
                _log.info("concurrency to {mx} is back to {concurrency} sessions", mx=entry.name, concurrency=entry.concurrency)
        Deferred.fromCoroutine(self._write_backoffs(changes))

    async def _write_backoffs(self, changes: list[BackoffEntry]) -> None:
        try:
            await self._store.save_backoffs(changes, self._wall())
        except StorageError as e:
            _log.warn("could not store destination back-off ({error}); other senders do not see it", error=str(e))
        except Exception:
            _log.failure("storing destination back-off failed")

    def _read_backoffs(self) -> None:
        """Learn the pauses other senders stored: at most every BACKOFF_REFRESH seconds, in the background."""
        now = self._clock.seconds()
        if self._backoffs_reading or now < self._backoffs_read_at + BACKOFF_REFRESH:
            return
        self._backoffs_reading, self._backoffs_read_at = True, now
        self.backoff.sweep(self._wall())
        Deferred.fromCoroutine(self._read_backoffs_now())

    async def _read_backoffs_now(self) -> None:
        try:
            self.backoff.others(await self._store.backoffs(self._wall()))
        except StorageError as e:
            _log.warn("could not read the stored destination back-offs ({error})", error=str(e))
        except Exception:
            _log.failure("reading the stored destination back-offs failed")
        finally:
            self._backoffs_reading = False

    def _dot_sent(self, transaction: Transaction) -> None:
        """The session is writing this envelope's final ".": not released at shutdown until its result is recorded."""
        envelope_id = cast(int, transaction.key)
        if envelope_id in self.in_flight:
            self._past_dot.add(envelope_id)

    def _transaction(self, envelope: ClaimedEnvelope) -> Transaction:
        """
        An envelope's transaction, with its message's wire form, size, and whether it is
        8-bit or has a UTF-8 header, made once per submission in flight (whether the
        transaction needs SMTPUTF8 also depends on its own addresses).
        """
        entry = self._messages.get(envelope.submission_id)
        if entry is None or entry.message is not envelope.message:
            return Transaction(envelope.id, envelope.sender, envelope.recipients, envelope.message)
        if entry.wire is None:
            entry.wire = wire_form(entry.message)
            entry.eight_bit = not entry.message.isascii()
            entry.header_utf8 = entry.eight_bit and header_needs_smtputf8(entry.message)
            entry.size = message_size(entry.wire)
        return Transaction(
            envelope.id,
            envelope.sender,
            envelope.recipients,
            entry.message,
            wire=entry.wire,
            eight_bit=entry.eight_bit,
            smtputf8=transaction_needs_smtputf8(envelope.sender, envelope.recipients, entry.header_utf8),
            size=entry.size,
        )

    def _outcome(
        self, envelope: ClaimedEnvelope, results: Mapping[str, RecipientResult], mx_host: str | None = None
    ) -> EnvelopeOutcome:
        """
        Apply the retry schedule and the queue lifetime to one envelope's results (the
        replies of ``mx_host``, when an MX gave them: a "no such mailbox" in answer to a
        recipient's own RCPT TO — ``at_rcpt`` — puts the address on the client's bounce
        list; a refusal of MAIL FROM or of the message does not).
        """
        now = self._wall()
        expires = envelope.created_at + self._settings.queue_lifetime
        recipients = []
        for address in envelope.recipients:
            result = results.get(address, _NO_RESULT)
            status, reply = result.status, str(result.reply)
            reason = None
            if status is Status.DEFERRED and now >= expires:
                status, reply = Status.FAILED, f"expired: not delivered within the queue lifetime; last reply: {reply}"
                reason = "expired"
            bounce = status is Status.FAILED and reason is None and result.at_rcpt and mailbox_gone(reply)
            recipients.append(RecipientOutcome(address, status, reply, reason=reason, mx_host=mx_host, bounce=bounce))
        next_attempt = min(now + retry_delay(envelope.attempts + 1, self._settings, self._rng), expires)
        return EnvelopeOutcome(envelope, tuple(recipients), next_attempt)
