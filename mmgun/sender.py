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
another. The only window in which a crash duplicates mail is between the peer's
250 to the final "." and our commit of it (milliseconds): the lease then expires
and the envelope is sent again.
"""

from __future__ import annotations

import os
import random
import socket
import uuid
from typing import Any, Awaitable, Callable, Protocol

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, DeferredSemaphore
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from .metrics import Metrics
from .mx import MXHost, PermanentDNSError, TemporaryDNSError
from .smtp import SessionFailed, SMTPSettings, Transaction, TransactionResult, send_session
from .store import ClaimedEnvelope, EnvelopeOutcome, RecipientOutcome, Store

_log = Logger()


class Router(Protocol):
    """Where mail for a domain goes: :class:`mmgun.mx.MXResolver` or :class:`mmgun.mx.RelayHost`."""

    async def hosts(self, domain: str) -> list[MXHost]: ...

    def mark_bad(self, host: MXHost) -> None: ...

    def mark_good(self, host: MXHost) -> None: ...


SessionFunction = Callable[..., Awaitable[list[TransactionResult]]]


@attrs.frozen
class SenderSettings:
    poll_interval: float = 1.0
    retry_min: float = 300.0
    retry_max: float = 3600.0
    queue_lifetime: float = 5 * 86400.0
    max_connections: int = 100
    max_per_destination: int = 10
    #: How long a claim is ours; renewed every third of it while we work.
    lease_time: float = 60.0
    #: Most transactions sent over one SMTP session.
    per_session: int = 100
    #: Most envelopes held in memory (claimed, not yet recorded).
    max_in_flight: int = 2000
    shutdown_timeout: float = 30.0


def retry_delay(attempts: int, settings: SenderSettings, rng: random.Random) -> float:
    """Doubling from retry_min after each attempt, capped at retry_max, with ±10% jitter."""
    base = min(settings.retry_max, settings.retry_min * 2 ** max(0, attempts - 1))
    return min(settings.retry_max, base * rng.uniform(0.9, 1.1))


def owner_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


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
        session: SessionFunction = send_session,
        rng: random.Random | None = None,
        owner: str | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._metrics = metrics if metrics is not None else Metrics()
        self._store = store
        self._router = router
        self._reactor = reactor
        self._clock: IReactorTime = reactor
        self._smtp = smtp
        self._settings = settings
        self._session = session
        self._rng = rng or random.Random()
        self.owner = owner or owner_name()
        self._connections = DeferredSemaphore(settings.max_connections)
        self._per_host: dict[str, DeferredSemaphore] = {}
        #: Claimed envelopes not yet recorded, by id.
        self.in_flight: dict[int, ClaimedEnvelope] = {}
        self._batches: set[Deferred[None]] = set()
        self._claiming = False
        self._stopping = False
        self._poller = LoopingCall(self.poll)
        self._poller.clock = reactor
        self._renewer = LoopingCall(self._renew)
        self._renewer.clock = reactor

    # -- lifecycle -------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        self._poller.start(self._settings.poll_interval, now=True).addErrback(
            lambda f: _log.failure("sender poll loop stopped", f)
        )
        self._renewer.start(self._settings.lease_time / 3, now=False).addErrback(
            lambda f: _log.failure("lease renewal loop stopped", f)
        )

    def stopService(self) -> Deferred[None]:
        """Stop claiming, let deliveries in flight finish up to shutdown_timeout, release the rest."""
        super().stopService()
        self._stopping = True
        for loop in (self._poller, self._renewer):
            if loop.running:
                loop.stop()
        return Deferred.fromCoroutine(self._drain())

    async def _drain(self) -> None:
        if self._batches:
            # Wait for the batches without cancelling them: a delivery cut short
            # mid-DATA would be worse than one that finishes after we stop waiting.
            gate: Deferred[None] = Deferred()
            DeferredList(list(self._batches)).addBoth(lambda _: gate.called or gate.callback(None))
            timer = self._clock.callLater(self._settings.shutdown_timeout, lambda: gate.called or gate.callback(None))
            await gate
            if timer.active():
                timer.cancel()
        if self.in_flight:
            left = list(self.in_flight.values())
            _log.info("releasing {count} unfinished envelopes at shutdown", count=len(left))
            self.in_flight.clear()
            try:
                await self._store.release(left, self._clock.seconds())
            except Exception:
                _log.failure("could not release leases at shutdown; they expire by themselves")

    # -- the loop --------------------------------------------------------------

    def poll(self) -> Deferred[None]:
        """Claim what is due (as much as there is room for) and start delivering it. Never raises."""
        return Deferred.fromCoroutine(self._poll())

    async def _poll(self) -> None:
        if self._claiming or self._stopping:
            return
        self._claiming = True
        try:
            while not self._stopping:
                room = self._settings.max_in_flight - len(self.in_flight)
                if room <= 0:
                    return
                now = self._clock.seconds()
                claimed = await self._store.claim(self.owner, now, self._settings.lease_time, min(room, 500))
                if not claimed:
                    return
                for envelope in claimed:
                    self.in_flight[envelope.id] = envelope
                self._dispatch(claimed)
                if len(claimed) < min(room, 500):
                    return
        except Exception:
            _log.failure("claiming envelopes failed; will try again")
        finally:
            self._claiming = False

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
        until = self._clock.seconds() + self._settings.lease_time
        try:
            await self._store.renew(list(self.in_flight.values()), until)
        except Exception:
            _log.failure("renewing leases failed")

    # -- routing: domains to MX hosts ------------------------------------------

    async def _route(self, envelopes: list[ClaimedEnvelope]) -> None:
        """
        Resolve every domain of a claim, then group the envelopes by the hosts they go
        to, so that domains sharing their MX (or a relay host) share SMTP sessions.
        """
        by_domain: dict[str, list[ClaimedEnvelope]] = {}
        for envelope in envelopes:
            by_domain.setdefault(envelope.domain, []).append(envelope)
        failed: list[EnvelopeOutcome] = []
        by_hosts: dict[tuple[MXHost, ...], list[ClaimedEnvelope]] = {}
        lookups = [Deferred.fromCoroutine(self._router.hosts(domain)) for domain in by_domain]
        for (domain, group), lookup in zip(by_domain.items(), lookups):
            try:
                hosts = await lookup
            except PermanentDNSError as e:
                _log.info("no mail exchanger for {domain}: {reply}", domain=domain, reply=e.reply)
                failed += [self._outcome(env, {a: ("failed", e.reply) for a in env.recipients}) for env in group]
            except TemporaryDNSError as e:
                _log.info("DNS lookup for {domain} failed temporarily: {reply}", domain=domain, reply=e.reply)
                failed += [self._outcome(env, {a: ("deferred", e.reply) for a in env.recipients}) for env in group]
            except Exception:
                _log.failure("resolving {domain} failed unexpectedly", domain=domain)
                reply = "451 4.3.0 internal error in mmgun; will retry"
                failed += [self._outcome(env, {a: ("deferred", reply) for a in env.recipients}) for env in group]
            else:
                by_hosts.setdefault(tuple(hosts), []).extend(group)
        size = self._settings.per_session
        for hosts, group in by_hosts.items():
            for start in range(0, len(group), size):
                self._track(Deferred.fromCoroutine(self._deliver_batch(hosts, group[start : start + size])))
        if failed:
            await self._record(failed)

    # -- one batch: envelopes for the same hosts, over one session -------------

    async def _deliver_batch(self, hosts: tuple[MXHost, ...], envelopes: list[ClaimedEnvelope]) -> None:
        """
        Deliver, and commit each envelope's result as soon as it is known — right after
        the peer's reply to its final "." — rather than at the end of the session: a
        crash then duplicates at most the messages whose commit was under way.
        """
        commits: list[Deferred[None]] = []
        settled: set[int] = set()

        def settle(envelope: ClaimedEnvelope, results: dict[str, tuple[str, str]]) -> None:
            settled.add(envelope.id)
            commits.append(Deferred.fromCoroutine(self._record([self._outcome(envelope, results)])))

        try:
            await self._attempt(hosts, envelopes, settled, settle)
        except Exception:
            _log.failure("delivery to {mx} failed unexpectedly", mx=hosts[0].name if hosts else "?")
            reply = "451 4.3.0 internal error in mmgun; will retry"
            for envelope in envelopes:
                if envelope.id not in settled:
                    settle(envelope, {a: ("deferred", reply) for a in envelope.recipients})
        await DeferredList(commits)

    async def _record(self, outcomes: list[EnvelopeOutcome]) -> None:
        try:
            await self._store.record(outcomes, self._clock.seconds())
        except Exception:
            _log.failure("recording delivery results failed; leases will expire and the envelopes retry")
        else:
            now = self._clock.seconds()
            for outcome in outcomes:
                for r in outcome.recipients:
                    self._metrics.recipient(r.status, now - outcome.envelope.created_at)
        finally:
            for outcome in outcomes:
                self.in_flight.pop(outcome.envelope.id, None)

    async def _attempt(
        self,
        hosts: tuple[MXHost, ...],
        envelopes: list[ClaimedEnvelope],
        settled: set[int],
        settle: Callable[[ClaimedEnvelope, dict[str, tuple[str, str]]], None],
    ) -> None:
        domains = ", ".join(sorted({e.domain for e in envelopes}))
        last_reply = f"451 4.4.0 no mail exchanger of {domains} could be reached"
        for host in hosts:
            remaining = [e for e in envelopes if e.id not in settled]
            if not remaining:
                break
            by_id = {env.id: env for env in remaining}

            def on_result(result: TransactionResult, host: MXHost = host) -> None:
                envelope = by_id[result.key]  # type: ignore[index]
                if not result.started or envelope.id in settled:
                    return
                for r in result.recipients.values():
                    self._metrics.smtp_reply(r.reply.code)
                _log.info(
                    "delivery attempt for envelope {envelope} via {mx}: {outcomes}",
                    envelope=envelope.id,
                    mx=host.name,
                    outcomes={a: str(r.reply.code) for a, r in result.recipients.items()},
                )
                settle(envelope, {a: (r.outcome, str(r.reply)) for a, r in result.recipients.items()})

            try:
                session_results = await self._send(host, remaining, on_result)
            except SessionFailed as e:
                self._router.mark_bad(host)
                last_reply = str(e.reply)
                _log.info(
                    "could not deliver to {mx} ({address}): {reply}",
                    mx=host.name,
                    address=host.address,
                    reply=last_reply,
                )
                continue
            self._router.mark_good(host)
            for result in session_results:
                if result.started:
                    on_result(result)  # a no-op when the session already reported it
                else:
                    # Never started because the session ended early: try the next host.
                    last_reply = str(next(iter(result.recipients.values())).reply)
        for envelope in envelopes:
            if envelope.id not in settled:
                settle(envelope, {a: ("deferred", last_reply) for a in envelope.recipients})

    async def _send(
        self, host: MXHost, envelopes: list[ClaimedEnvelope], on_result: Callable[[TransactionResult], None]
    ) -> list[TransactionResult]:
        per_host = self._per_host.setdefault(host.address, DeferredSemaphore(self._settings.max_per_destination))
        await per_host.acquire()
        try:
            await self._connections.acquire()
            try:
                transactions = [Transaction(e.id, e.sender, e.recipients, e.message) for e in envelopes]
                return await self._session(
                    self._reactor, host.name, host.address, host.port, transactions, self._smtp, on_result=on_result
                )
            finally:
                self._connections.release()
        finally:
            per_host.release()
            if not per_host.waiting and per_host.tokens == per_host.limit:
                self._per_host.pop(host.address, None)

    def _outcome(self, envelope: ClaimedEnvelope, results: dict[str, tuple[str, str]]) -> EnvelopeOutcome:
        """Apply the retry schedule and the queue lifetime to one envelope's results."""
        now = self._clock.seconds()
        expires = envelope.created_at + self._settings.queue_lifetime
        recipients = []
        for address in envelope.recipients:
            status, reply = results.get(address, ("deferred", "451 4.3.0 no result; will retry"))
            if status == "deferred" and now >= expires:
                status, reply = "failed", f"expired: not delivered within the queue lifetime; last reply: {reply}"
            recipients.append(RecipientOutcome(address, status, reply))
        next_attempt = min(now + retry_delay(envelope.attempts + 1, self._settings, self._rng), expires)
        return EnvelopeOutcome(envelope, tuple(recipients), next_attempt)
