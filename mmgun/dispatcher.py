"""
The webhooks role: follow each webhook's event feed and POST the events it
wants, at least once, with Mailgun's retries.

Every ``interval`` the dispatcher leases the webhooks no dispatcher holds
(``"<sender-id>/<random>"``, for ``lease_time``), writing no other row; at most
every third of ``lease_time`` it also renews those it holds.  A webhook's row
is read again before each page, so a removal or a URL change counts at once.
For each one it holds and is not already following, it starts a task that
reads the webhook's feed from its cursor a page (at most ``page_size``
events) at a time, POSTs every event of the page the webhook wants (all at
once: the :class:`~mmgun.webhooks.WebhookClient` bounds how many go out per
receiver and in all), and only when every POST of the page has an outcome
moves the cursor past the page, keeping the failed events as retries (due
after :func:`~mmgun.webhooks.retry_delay`), in one transaction.  A crash or a
stop before that moves nothing: the page is POSTed again by the next run (at
least once; at most the pages in flight repeated).  The tasks are not
awaited by the tick, so a hanging receiver holds up only its own webhook.

Retries that are due are leased (their next attempt moved to the lease's
end, so a dispatcher that dies leaves them due again then) and POSTed, each
freeing its place as soon as its own POST ends; their outcomes are written in
groups (at most ``RECORD_GROUP`` per transaction, within ``RECORD_DELAY``
seconds, at once when no retry is left in flight), so a hanging receiver
holds up only its own retries: deleted when delivered or when Mailgun's 8
hours are used up (logged, at warn), else rescheduled.

A body is signed (with the client's webhook signing key, read through a
cache of ``key_ttl`` seconds, made at first need) when its POST's turn
comes, so its timestamp is fresh even after a wait.  No body, key or URL
credentials are logged.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, gatherResults
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from .events import event_data
from .store import LAST_ID, Event, EventCursor, Store, Webhook, WebhookRetry
from .webhooks import Delivery, WebhookClient, WebhookURLError, new_signing_key, parse_url, retry_delay, signed_body

_log = Logger()


#: A cursor with this id is the end of the feed (Store.events_page): no event's id reaches it.
CAUGHT_UP = LAST_ID

#: Retry outcomes are written at most this many per transaction, and at the latest this many
#: seconds after the first of a group is known (at once when no retry is left in flight).
RECORD_GROUP = 100
RECORD_DELAY = 0.1

#: A retry's outcome for Store.finish_webhook_retries: next attempt (None: delete) and reason.
_Outcome = tuple[WebhookRetry, float | None, str | None]


class WebhookDispatcher(Service):
    """
    @param store: Where the webhooks, their feeds, retries and keys are.
    @param client: POSTs the bodies (its limits bound the concurrency).
    @param clock: Runs the loop and measures the grace at stop (the reactor).
    @param wall: Wall-clock time, for stored times and signature timestamps.
    @param owner: This process's identity (C{--sender-id}); the lease is
        C{owner/<random>}.
    @param max_retries: Retries leased per tick, and in flight at most.
    @param grace: Seconds C{stopService} lets POSTs in flight finish before
        it cancels them (their pages are then POSTed again by the next run).
    """

    def __init__(
        self,
        store: Store,
        client: WebhookClient,
        clock: IReactorTime,
        *,
        wall: Callable[[], float],
        owner: str,
        interval: float = 1.0,
        lease_time: float = 30.0,
        page_size: int = 500,
        key_ttl: float = 5.0,
        max_retries: int = 500,
        grace: float = 10.0,
    ) -> None:
        self._store = store
        self._client = client
        self._clock = clock
        self._wall = wall
        self.lease = f"{owner}/{secrets.token_hex(6)}"
        self._interval = interval
        self._lease_time = lease_time
        self._page_size = page_size
        self._key_ttl = key_ttl
        self._max_retries = max_retries
        self._grace = grace
        #: The webhooks held, as the last renewal or take returned them.
        self._held: dict[str, Webhook] = {}
        #: Webhook id → where this run moved its cursor last (the held rows' cursors are as of the last renewal).
        self._cursors: dict[str, EventCursor] = {}
        #: Webhook id → the task following its feed.
        self._following: dict[str, Deferred[None]] = {}
        #: (webhook id, event id) → the task POSTing that retry, until its POST ends.
        self._retrying: dict[tuple[str, int], Deferred[Any]] = {}
        #: Outcomes of retries whose POSTs ended, not written yet (L{_record_soon}).
        self._outcomes: list[_Outcome] = []
        #: The write of outcomes under way, and the timer for the next one.
        self._recording: Deferred[None] | None = None
        self._record_timer: IDelayedCall | None = None
        self._keys: dict[str, tuple[str, float]] = {}
        #: When (C{clock}) the held leases were last renewed.
        self._renewed: float | None = None
        self._ticking: Deferred[None] | None = None
        #: No new page or retry is started.
        self._stopping = False
        #: The grace is over: what is in flight is being cancelled, and no outcome is recorded.
        self._cancelling = False
        self._loop = LoopingCall(self.tick)
        self._loop.clock = clock

    # -- lifecycle --------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._stopping = self._cancelling = False
        self._renewed = None
        self._loop.start(self._interval, now=True).addErrback(lambda f: _log.failure("webhook dispatcher loop stopped", f))
        _log.info("webhook dispatcher started as {lease}", lease=self.lease)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self._stopping = True
        if self._loop.running:
            self._loop.stop()
        return Deferred.fromCoroutine(self._drain())

    async def _drain(self) -> None:
        tasks = self._tasks()
        if tasks:
            gate: Deferred[None] = Deferred()

            def open_gate(_: object = None) -> None:
                if not gate.called:
                    gate.callback(None)

            DeferredList(tasks).addBoth(open_gate)
            timer = self._clock.callLater(self._grace, open_gate)
            await gate
            if timer.active():
                timer.cancel()
        left = self._tasks()
        if left:
            _log.info(
                "stopping with {count} webhook deliveries unfinished: they are POSTed again after the lease ends",
                count=len(left),
            )
            self._cancelling = True
            for task in left:
                task.cancel()
            await DeferredList(left, consumeErrors=True)
        if self._record_timer is not None and self._record_timer.active():
            self._record_timer.cancel()
        self._record_timer = None
        self._outcomes.clear()  # cut short: leased until their lease's end, when they are due again
        # What this run held is another dispatcher's at once (a restart need not wait for the lease to end).
        try:
            await self._store.release_webhooks(self.lease, self._wall())
        except Exception:
            _log.failure("could not give up the webhook leases; they end by themselves within {seconds} s", seconds=self._lease_time)

    def _tasks(self) -> list[Deferred[Any]]:
        tasks: list[Deferred[Any]] = list(self._following.values()) + list(self._retrying.values())
        if self._ticking is not None:
            tasks.append(self._ticking)
        if self._recording is not None:
            tasks.append(self._recording)
        return tasks

    def settled(self) -> Deferred[None]:
        """Fires when every task running now (and those they start) has ended: for tests and benchmarks."""

        async def wait() -> None:
            while tasks := self._tasks():
                await DeferredList(tasks, consumeErrors=True)

        return Deferred.fromCoroutine(wait())

    @property
    def busy(self) -> bool:
        """Whether a tick, a feed or a retry is under way."""
        return bool(self._tasks())

    # -- the loop ---------------------------------------------------------------------

    def tick(self) -> Deferred[None]:
        """Renew the leases, start following the webhooks not followed yet, start the retries due. Never fails."""
        if self._ticking is not None or self._stopping:
            return Deferred.fromCoroutine(_nothing())
        d = self._ticking = Deferred.fromCoroutine(self._tick())

        def done(_: object) -> None:
            self._ticking = None

        return d.addBoth(done)

    async def _tick(self) -> None:
        now = self._wall()
        until = now + self._lease_time
        started = self._clock.seconds()
        # Rewriting every held row each tick made a tick's cost grow with the webhooks: they are
        # renewed every third of the lease; other ticks take only new (or lapsed) ones.
        renew = self._renewed is None or started - self._renewed >= self._lease_time / 3
        try:
            held = await self._store.lease_webhooks(self.lease, now, until, renew=renew)
        except Exception:
            _log.failure("leasing webhooks failed; the next tick tries again")
            return
        if renew:
            self._held = {w.id: w for w in held}
            self._cursors = {i: c for i, c in self._cursors.items() if i in self._held}
            self._renewed = started
        else:
            self._held.update((w.id, w) for w in held)
        for webhook in list(self._held.values()):
            if webhook.id not in self._following and not self._stopping:
                # The later of the stored cursor and this run's: a renewal may have read the row just before an advance.
                cursor = max(webhook.cursor, self._cursors.get(webhook.id, webhook.cursor))
                self._start(self._following, webhook.id, self._follow(webhook, cursor))
        room = self._max_retries - len(self._retrying)
        if room <= 0 or self._stopping:
            return
        try:
            due = await self._store.due_webhook_retries(self.lease, now, until, room)
        except Exception:
            _log.failure("leasing webhook retries failed; the next tick tries again")
            return
        # A retry still waiting for its turn when its lease ran out is leased again: POSTed once.
        batch = [r for r in due if (r.webhook.id, r.event.cursor.id) not in self._retrying]
        for retry in batch:
            if self._stopping:
                break
            key = (retry.webhook.id, retry.event.cursor.id)
            task: Deferred[_Outcome | None] = Deferred.fromCoroutine(self._retry(retry))
            if not task.called:
                self._retrying[key] = task
            task.addCallback(self._retried, key, task)

    def _retried(self, outcome: _Outcome | None, key: tuple[str, int], task: Deferred[Any]) -> None:
        """One retry's POST ended: free its entry at once, and have its outcome recorded with others."""
        if self._retrying.get(key) is task:
            del self._retrying[key]
        if outcome is not None and not self._cancelling:
            self._outcomes.append(outcome)
        self._record_soon()

    def _record_soon(self, due: bool = False) -> None:
        """
        Write the outcomes kept so far, in groups: at once when no retry is in flight any
        more or C{RECORD_GROUP} are kept, else C{RECORD_DELAY} seconds after the first was
        kept (C{due}); one write at a time, what ends during it written by the next.
        """
        if self._recording is not None or not self._outcomes or self._cancelling:
            return
        if not due and self._retrying and len(self._outcomes) < RECORD_GROUP:
            if self._record_timer is None:
                self._record_timer = self._clock.callLater(RECORD_DELAY, self._record_due)
            return
        if self._record_timer is not None:
            if self._record_timer.active():
                self._record_timer.cancel()
            self._record_timer = None
        writing: Deferred[None] = Deferred.fromCoroutine(self._record())
        if not writing.called:
            self._recording = writing

    def _record_due(self) -> None:
        self._record_timer = None
        self._record_soon(due=True)

    async def _record(self) -> None:
        """Write kept outcomes, a group (at most C{RECORD_GROUP}) per transaction, until none is left. Never fails."""
        try:
            while self._outcomes and not self._cancelling:
                group = self._outcomes[:RECORD_GROUP]
                del self._outcomes[:RECORD_GROUP]
                try:
                    await self._store.finish_webhook_retries(group, self.lease)
                except Exception:
                    if self._cancelling:
                        return
                    _log.failure(
                        "recording the outcomes of {count} webhook retries failed; they are due again when their lease ends",
                        count=len(group),
                    )
        finally:
            self._recording = None

    def _start(self, tasks: dict[Any, Deferred[None]], key: Any, work: Any) -> None:
        d: Deferred[None] = Deferred.fromCoroutine(work)
        tasks[key] = d

        def done(_: object) -> None:
            tasks.pop(key, None)

        d.addBoth(done)

    # -- the feed ---------------------------------------------------------------------

    async def _follow(self, webhook: Webhook, cursor: EventCursor) -> None:
        """POST the webhook's events page by page until its feed is caught up. Never fails."""
        try:
            while not self._stopping:
                if webhook.id not in self._held:  # the lease was lost
                    return
                # Read afresh for each page (one row, by key): a removal or a new URL counts at once,
                # not at the next renewal of the lease.
                current = await self._store.webhook(webhook.id)
                if current is None:
                    self._held.pop(webhook.id, None)
                    return
                # A page of the events this webhook's domain filter keeps, out of a bounded
                # stretch of the client's feed, and how far that stretch went: the cursor
                # moves past other domains' events too, so they are never read again.
                page, reached = await self._store.events_page(
                    current.client, start=cursor, domain=current.domain, limit=self._page_size
                )
                if reached == cursor:
                    return
                failed = await self._post_page(current, page)
                if self._cancelling:
                    return  # the outcomes were cut short: the next run POSTs the page again
                if not await self._store.advance_webhook(current.id, self.lease, reached, failed):
                    _log.warn(
                        "webhook {webhook} was removed, or leased by another dispatcher (which POSTs these events again)",
                        webhook=current.id,
                    )
                    self._held.pop(current.id, None)
                    return
                cursor = self._cursors[current.id] = reached
                if reached.id >= CAUGHT_UP:
                    return  # the end of the feed as it was read: nothing more for now
        except Exception:
            if not self._cancelling:
                _log.failure("following the feed of webhook {webhook} failed; the next tick tries again", webhook=webhook.id)

    async def _post_page(self, webhook: Webhook, page: list[Event]) -> list[tuple[int, float, float, str]]:
        wanted = [e for e in page if webhook.wants(e)]
        if not wanted:
            return []
        first = self._wall()
        deliveries: list[Delivery] = await gatherResults(
            [Deferred.fromCoroutine(self._post(webhook, event)) for event in wanted], consumeErrors=True
        )
        failed = []
        delay = retry_delay(1)
        assert delay is not None
        for event, delivery in zip(wanted, deliveries, strict=True):
            if not delivery.ok:
                failed.append((event.cursor.id, first, self._wall() + delay, delivery.reason))
        if failed:
            _log.info(
                "webhook {webhook} to {receiver}: {failed} of {count} events not delivered (e.g. {reason}); retried from {delay:g}s",
                webhook=webhook.id,
                receiver=_receiver(webhook.url),
                failed=len(failed),
                count=len(wanted),
                reason=failed[0][3],
                delay=delay,
            )
        return failed

    async def _post(self, webhook: Webhook, event: Event) -> Delivery:
        try:
            key = await self._key(webhook.client)
        except Exception as e:
            _log.failure("reading the webhook signing key of client {client} failed", client=webhook.client)
            return Delivery(False, None, f"no signing key ({type(e).__name__})")
        data = event_data(event)
        return await self._client.post(webhook.url, lambda: signed_body(key, data, self._wall), client=webhook.client)

    async def _key(self, client: str) -> str:
        cached = self._keys.get(client)
        now = self._clock.seconds()
        if cached is not None and now - cached[1] < self._key_ttl:
            return cached[0]
        key = await self._store.webhook_key(client)
        if key is None:
            # Had another process made one at the same time, the one stored first is every process's.
            key = await self._store.set_webhook_key(client, new_signing_key(), self._wall(), replace=False)
            _log.info(
                "made a webhook signing key for client {client} (show it with: mmgun webhooks key --client {client})",
                client=client,
            )
        self._keys[client] = (key, now)
        return key

    # -- retries ----------------------------------------------------------------------

    async def _retry(self, retry: WebhookRetry) -> _Outcome | None:
        """POST one due retry; its outcome for L{finish_webhook_retries} (L{None}: left leased). Never fails."""
        try:
            delivery = await self._post(retry.webhook, retry.event)
        except Exception:
            if not self._cancelling:
                _log.failure(
                    "retrying webhook {webhook} event {event} failed; it is due again when its lease ends",
                    webhook=retry.webhook.id,
                    event=str(retry.event.cursor),
                )
            return None
        if delivery.ok:
            return (retry, None, None)
        attempts = retry.attempts + 1
        delay = retry_delay(attempts)
        if delay is None:
            _log.warn(
                "gave up webhook {webhook} event {event} to {receiver} after {attempts} attempts since"
                " {first_attempt}: {reason}",
                webhook=retry.webhook.id,
                event=str(retry.event.cursor),
                receiver=_receiver(retry.webhook.url),
                attempts=attempts,
                first_attempt=retry.first_attempt,
                reason=delivery.reason,
            )
            return (retry, None, delivery.reason)
        _log.info(
            "webhook {webhook} event {event} to {receiver} failed again ({attempts} attempts): {reason};"
            " next in {delay:g}s",
            webhook=retry.webhook.id,
            event=str(retry.event.cursor),
            receiver=_receiver(retry.webhook.url),
            attempts=attempts,
            reason=delivery.reason,
            delay=delay,
        )
        return (retry, self._wall() + delay, delivery.reason)


def _receiver(url: str) -> str:
    """What logs name a webhook's receiver by: scheme, host and port (never its credentials, path or query)."""
    try:
        return str(parse_url(url))
    except WebhookURLError:
        return "(invalid URL)"


async def _nothing() -> None:
    return None
