"""
What the SQL backends share: :class:`SQLStore`, the :class:`mmgun.store.Store` whose every
method is one transaction of :mod:`mmgun.store.transactions` on a runner, and the
:class:`Db` that a transaction is given. A backend (:mod:`mmgun.store.sqlite`,
:mod:`mmgun.store.postgres`) brings its queries module (every statement, in its dialect,
under the same names), its runner (where transactions run, which driver errors mean what)
and what only it can do (sender identity locks, upkeep, opening and closing).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

from twisted.internet.defer import Deferred

from . import (
    FEED_END,
    FEED_START,
    IDEMPOTENCY_WINDOW,
    Backoff,
    ClaimedEnvelope,
    DomainKey,
    EnvelopeOutcome,
    Event,
    EventCursor,
    KeyInfo,
    MTASTSPolicy,
    NewSubmission,
    QueueDepth,
    QueueEntry,
    QueueStats,
    SendingDomain,
    StoredKey,
    SubmissionState,
    Suppression,
    Webhook,
    WebhookRetry,
)
from .group import GroupCommit
from .transactions import (
    _add_batch_txn,
    _add_client_txn,
    _add_domain_key_txn,
    _add_domain_txn,
    _add_key_txn,
    _add_submissions_txn,
    _add_suppressions_txn,
    _add_webhook_txn,
    _advance_webhook_txn,
    _backoffs_txn,
    _claim_txn,
    _clean_txn,
    _client_exists_txn,
    _domain_keys_txn,
    _domain_txn,
    _domains_txn,
    _due_unattempted_txn,
    _due_webhook_retries_txn,
    _events_page_txn,
    _events_txn,
    _fail_queued_txn,
    _find_key_txn,
    _finish_webhook_retries_txn,
    _flush_deferred_txn,
    _flush_webhook_retries_txn,
    _key_ids_txn,
    _lease_webhooks_txn,
    _list_keys_txn,
    _mta_sts_policy_txn,
    _ping_txn,
    _queue_depth_txn,
    _queue_entries_txn,
    _queue_stats_txn,
    _queued_by_client_txn,
    _queued_bytes_by_client_txn,
    _reclaim_txn,
    _record_many_txn,
    _release_webhooks_txn,
    _remove_domain_txn,
    _renew_txn,
    _retire_domain_key_txn,
    _revoke_key_txn,
    _rowcount_txn,
    _save_backoffs_txn,
    _save_mta_sts_policy_txn,
    _set_webhook_key_txn,
    _signing_keys_txn,
    _submission_txn,
    _submissions_by_message_id_txn,
    _suppressions_txn,
    _touch_keys_txn,
    _webhook_key_txn,
    _webhooks_txn,
)

T = TypeVar("T")

#: Most suppression entries deleted in one transaction by clear_suppressions.
CLEAR_BATCH = 10_000


class Cursor(Protocol):
    """What a transaction reads from a statement (DB-API)."""

    rowcount: int

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Any: ...


class Db(Protocol):
    """
    A backend's connection as a transaction sees it: DB-API ``execute`` and ``executemany``
    (parameters in the dialect's style: a tuple for positional, a dict for named ones), and:
    """

    #: The backend's queries module: every statement of :mod:`mmgun.store.transactions`, by name.
    q: Any
    #: The driver's exception for a violated unique or foreign key.
    IntegrityError: type[Exception]

    def execute(self, query: str, parameters: Any = ..., /) -> Cursor: ...

    def executemany(self, query: str, rows: Any, /) -> Any: ...

    def clock_offset(self, now: float) -> float:
        """
        The database's clock minus ``now`` (the caller's): leases and due times are judged
        on the database's clock, so that hosts whose clocks disagree agree on them. 0 on
        SQLite, whose every process shares one machine's clock (and a test's Clock).
        """
        ...


class Runner(Protocol):
    """Where a backend runs transactions: ``fn(db, *args)`` inside ``BEGIN … COMMIT``."""

    def read(self, fn: Callable[..., T], *args: Any) -> Deferred[T]: ...

    def write(self, fn: Callable[..., T], *args: Any) -> Deferred[T]: ...

    def problem(self) -> str | None:
        """Why a write would fail now, or None: see :meth:`mmgun.store.Store.write_problem`."""
        ...

    def close(self) -> None: ...


class SQLStore:
    """
    The :class:`mmgun.store.Store` on a SQL backend: each method one transaction of
    :mod:`mmgun.store.transactions` on ``runner``, with the statements of ``queries``.
    Subclasses add what only their backend can do: lock_identity, upkeep, opening, close.
    """

    def __init__(self, runner: Runner, queries: Any, clock: Any = None) -> None:
        """``clock``: the daemon's reactor, so that submissions of one reactor turn share a commit (GroupCommit)."""
        self._runner = runner
        self._q = queries
        self._submissions: GroupCommit[NewSubmission, str] = GroupCommit(runner, _add_submissions_txn, clock)
        self._records: GroupCommit[tuple[Sequence[EnvelopeOutcome], float], None] = GroupCommit(
            runner, _record_many_txn
        )

    # -- submissions ---------------------------------------------------------

    async def add_submission(self, submission: NewSubmission) -> str:
        return await self._submissions.submit(submission)

    async def submission(self, client: str, submission_id: str, now: float | None = None) -> SubmissionState | None:
        return await self._runner.read(_submission_txn, client, submission_id, now)

    async def add_batch(self, submissions: Sequence[NewSubmission]) -> list[str]:
        if any(s.idempotency_key is not None for s in submissions):
            raise ValueError("a batch takes no idempotency keys")
        return await self._runner.write(_add_batch_txn, list(submissions))

    async def submissions_by_message_id(self, client: str, message_id: str, now: float | None = None) -> list[SubmissionState]:
        return await self._runner.read(_submissions_by_message_id_txn, client, message_id, now)

    # -- delivery ------------------------------------------------------------

    async def claim(
        self,
        owner: str,
        now: float,
        lease_seconds: float,
        limit: int,
        *,
        max_bytes: int | None = None,
        held: Sequence[str] = (),
        always_one: bool = True,
    ) -> list[ClaimedEnvelope]:
        lease = f"{owner}/{uuid.uuid4().hex}"
        return await self._runner.write(
            _claim_txn, lease, now, now + lease_seconds, limit, max_bytes, sorted(held), always_one
        )

    async def reclaim(self, identity: str, now: float) -> int:
        """
        Make every unfinished envelope leased under ``identity`` (``"<identity>/..."``) due
        at ``now`` and unleased; returns how many. Only for the holder of
        :meth:`lock_identity`: the process that leased them is gone.
        """
        prefix = f"{identity}/"
        return await self._runner.write(_reclaim_txn, now, prefix)

    async def due_unattempted(self, now: float) -> int:
        """Make never-attempted, unleased envelopes due at ``now`` if they were due later; returns how many."""
        return await self._runner.write(_due_unattempted_txn, now)

    async def renew(self, envelopes: Sequence[ClaimedEnvelope], now: float, until: float) -> None:
        await self._runner.write(_renew_txn, now, until, [(e.id, e.lease) for e in envelopes])

    async def record(self, outcomes: Sequence[EnvelopeOutcome], now: float) -> None:
        await self._records.submit((outcomes, now))

    async def release(self, envelopes: Sequence[ClaimedEnvelope], now: float) -> None:
        await self.record([EnvelopeOutcome(e, (), now, attempted=False) for e in envelopes], now)

    async def ping(self) -> None:
        await self._runner.read(_ping_txn)

    def write_problem(self) -> str | None:
        return self._runner.problem()

    def listen_for_wakeups(self, wake: Callable[[], None]) -> Any:
        """None: a backend without notifications (SQLite: mmgun.wakeup's datagrams instead)."""
        return None

    async def clean(self, before: float, limit: int, now: float) -> int:
        """
        Delete up to ``limit`` submissions finished before ``before``; return how many. One
        whose Idempotency-Key is younger than IDEMPOTENCY_WINDOW at ``now`` stays, whatever
        the retention: a client's retry must still find it.
        """
        return await self._runner.write(_clean_txn, before, limit, now - IDEMPOTENCY_WINDOW)

    async def clean_events(self, before: float, limit: int) -> int:
        parameters = {"before": before, "limit": limit, "window": 10 * limit}
        return await self._runner.write(_rowcount_txn, self._q.DELETE_OLD_EVENTS, parameters)

    async def queue_entries(self, now: float, status: str | None = None, domain: str | None = None) -> list[QueueEntry]:
        """Unfinished envelopes, oldest first; ``status`` is None, "queued", "scheduled" or "deferred"."""
        if status not in (None, "queued", "scheduled", "deferred"):
            raise ValueError(f"no queue status {status!r}")
        return await self._runner.read(_queue_entries_txn, now, status, domain)

    async def queue_stats(self, now: float, top_domains: int = 20) -> QueueStats:
        return await self._runner.read(_queue_stats_txn, now, top_domains)

    async def queue_depth(self, now: float) -> QueueDepth:
        """Like queue_stats without the finished history: for gauges polled every few seconds."""
        return await self._runner.read(_queue_depth_txn, now)

    async def flush_deferred(self, now: float, ids: Sequence[str] | None = None) -> tuple[int, int]:
        """
        Make deferred envelopes due at ``now``: all of them, or those named by envelope or
        submission id. Leased ones are left to their sender. Returns (flushed, in delivery);
        raises NotInQueue, changing nothing, if an id matches no unfinished envelope.
        """
        return await self._runner.write(_flush_deferred_txn, now, None if ids is None else list(ids))

    async def fail_queued(self, ids: Sequence[str], now: float, reply: str) -> tuple[int, int]:
        """
        Fail every pending recipient of the named envelopes (or submissions) with ``reply``
        and finish them, as a delivery that failed would. Returns (envelopes, recipients).
        All or nothing: raises NotInQueue or InDelivery and changes nothing.
        """
        return await self._runner.write(_fail_queued_txn, list(ids), now, reply)

    # -- clients and API keys ------------------------------------------------

    async def add_client(self, client: str, now: float) -> None:
        await self._runner.write(_add_client_txn, client, now)

    async def client_exists(self, client: str) -> bool:
        return await self._runner.read(_client_exists_txn, client)

    async def add_key(self, client: str, key_id: str, key_hash: bytes, now: float) -> None:
        await self._runner.write(_add_key_txn, client, key_id, key_hash, now)

    async def list_keys(self, client: str) -> list[KeyInfo]:
        return await self._runner.read(_list_keys_txn, client)

    async def revoke_key(self, key_id: str, now: float) -> bool:
        """True if the key was active and is now revoked; Conflict if there is no such key."""
        return await self._runner.write(_revoke_key_txn, key_id, now)

    async def find_key(self, key_id: str) -> StoredKey | None:
        return await self._runner.read(_find_key_txn, key_id)

    async def key_ids(self) -> set[str]:
        """The id of every API key, revoked ones too (one read, for :class:`mmgun.auth.Authenticator`)."""
        return await self._runner.read(_key_ids_txn)

    async def touch_keys(self, used: Sequence[tuple[str, float]]) -> None:
        """Record when keys were last used (batched by the caller)."""
        await self._runner.write(_touch_keys_txn, used)

    # -- sending domains and DKIM keys (issue 13) ------------------------------

    async def add_domain(self, name: str, client: str, now: float) -> None:
        await self._runner.write(_add_domain_txn, name, client, now)

    async def remove_domain(self, name: str) -> None:
        await self._runner.write(_remove_domain_txn, name)

    async def domains(self, client: str | None = None) -> list[SendingDomain]:
        return await self._runner.read(_domains_txn, client)

    async def domain(self, name: str) -> SendingDomain | None:
        return await self._runner.read(_domain_txn, name)

    async def add_domain_key(self, key: DomainKey) -> None:
        await self._runner.write(_add_domain_key_txn, key)

    async def domain_keys(self, name: str, include_retired: bool = False) -> list[DomainKey]:
        return await self._runner.read(_domain_keys_txn, name, include_retired)

    async def retire_domain_key(self, name: str, selector: str, now: float) -> bool:
        return await self._runner.write(_retire_domain_key_txn, name, selector, now)

    async def signing_keys(self, name: str) -> list[DomainKey]:
        return await self._runner.read(_signing_keys_txn, name)

    async def queued_by_client(self) -> dict[str, int]:
        """Pending (queued or deferred) recipients per client."""
        return await self._runner.read(_queued_by_client_txn)

    async def queued_bytes_by_client(self) -> dict[str, int]:
        """Message bytes of the unfinished submissions per client, each submission once."""
        return await self._runner.read(_queued_bytes_by_client_txn)

    # -- events and suppressions ------------------------------------------------------------------

    async def events(
        self,
        client: str,
        *,
        start: EventCursor | None = None,
        descending: bool = False,
        limit: int = 100,
        domain: str | None = None,
        event: str | None = None,
        severity: str | None = None,
        recipient: str | None = None,
        begin: float | None = None,
        end: float | None = None,
    ) -> list[Event]:
        parameters = _event_parameters(client, start, descending, limit, domain, event, severity, recipient, begin, end)
        return await self._runner.read(_events_txn, self._q.EVENTS_BEFORE if descending else self._q.EVENTS_AFTER, parameters)

    async def events_page(
        self,
        client: str,
        *,
        start: EventCursor | None = None,
        descending: bool = False,
        limit: int = 100,
        scan: int = 5000,
        domain: str | None = None,
        event: str | None = None,
        severity: str | None = None,
        recipient: str | None = None,
        begin: float | None = None,
        end: float | None = None,
    ) -> tuple[list[Event], EventCursor]:
        parameters = _event_parameters(client, start, descending, limit, domain, event, severity, recipient, begin, end)
        parameters["scan"] = max(scan, limit)
        return await self._runner.read(_events_page_txn, descending, parameters)

    async def suppressions(
        self, client: str, kind: str, *, after: str | None = None, limit: int = 100, descending: bool = False
    ) -> list[Suppression]:
        if descending:
            query, parameters = self._q.SUPPRESSIONS_BEFORE, {"client": client, "kind": kind, "before": after, "limit": limit}
        else:
            query, parameters = self._q.SUPPRESSIONS_AFTER, {"client": client, "kind": kind, "after": after or "", "limit": limit}
        return await self._runner.read(_suppressions_txn, query, parameters)

    async def suppression(self, client: str, kind: str, address: str) -> Suppression | None:
        found = await self._runner.read(_suppressions_txn, self._q.SUPPRESSION, (client, kind, address.lower()))
        return found[0] if found else None

    async def add_suppressions(self, entries: Sequence[Suppression]) -> None:
        await self._runner.write(_add_suppressions_txn, list(entries))

    async def remove_suppression(self, client: str, kind: str, address: str) -> bool:
        return bool(await self._runner.write(_rowcount_txn, self._q.DELETE_SUPPRESSION, (client, kind, address.lower())))

    async def clear_suppressions(self, client: str, kind: str) -> int:
        # In batches, each its own transaction: a list of millions never holds the write lock for long.
        total = 0
        while True:
            deleted = await self._runner.write(_rowcount_txn, self._q.CLEAR_SUPPRESSIONS, (client, kind, CLEAR_BATCH))
            total += deleted
            if deleted < CLEAR_BATCH:
                return total

    # -- webhooks ----------------------------------------------------------------------------------

    async def add_webhook(self, webhook: Webhook) -> Webhook:
        return await self._runner.write(_add_webhook_txn, webhook)

    async def webhooks(self, client: str | None = None) -> list[Webhook]:
        if client is None:
            return await self._runner.read(_webhooks_txn, self._q.ALL_WEBHOOKS, ())
        return await self._runner.read(_webhooks_txn, self._q.CLIENT_WEBHOOKS, (client,))

    async def webhook(self, webhook_id: str) -> Webhook | None:
        found = await self._runner.read(_webhooks_txn, self._q.FIND_WEBHOOK, (webhook_id,))
        return found[0] if found else None

    async def update_webhook(self, webhook_id: str, url: str, events: Sequence[str]) -> bool:
        changed = await self._runner.write(_rowcount_txn, self._q.UPDATE_WEBHOOK, (url, json.dumps(list(events)), webhook_id))
        return bool(changed)

    async def remove_webhook(self, webhook_id: str) -> bool:
        return bool(await self._runner.write(_rowcount_txn, self._q.DELETE_WEBHOOK, (webhook_id,)))

    async def webhook_key(self, client: str) -> str | None:
        return await self._runner.read(_webhook_key_txn, client)

    async def set_webhook_key(self, client: str, key: str, now: float, *, replace: bool = True) -> str:
        return await self._runner.write(_set_webhook_key_txn, client, key, now, replace)

    async def save_backoffs(self, entries: Sequence[Backoff], now: float) -> None:
        await self._runner.write(_save_backoffs_txn, list(entries), now)

    async def backoffs(self, now: float) -> list[Backoff]:
        return await self._runner.read(_backoffs_txn, now)

    async def mta_sts_policy(self, domain: str, now: float) -> MTASTSPolicy | None:
        return await self._runner.read(_mta_sts_policy_txn, domain, now)

    async def save_mta_sts_policy(self, policy: MTASTSPolicy) -> None:
        await self._runner.write(_save_mta_sts_policy_txn, policy)

    async def forget_expired_mta_sts_policies(self, now: float) -> int:
        return await self._runner.write(_rowcount_txn, self._q.FORGET_EXPIRED_MTA_STS_POLICIES, (now,))

    async def release_webhooks(self, lease: str, now: float) -> None:
        await self._runner.write(_release_webhooks_txn, lease, now)

    async def lease_webhooks(self, lease: str, now: float, until: float, *, renew: bool = True) -> list[Webhook]:
        return await self._runner.write(_lease_webhooks_txn, renew, lease, now, until)

    async def advance_webhook(
        self, webhook_id: str, lease: str, cursor: EventCursor, failed: Sequence[tuple[int, float, float, str]]
    ) -> bool:
        return await self._runner.write(_advance_webhook_txn, webhook_id, lease, cursor, list(failed))

    async def due_webhook_retries(self, lease: str, now: float, until: float, limit: int) -> list[WebhookRetry]:
        return await self._runner.write(_due_webhook_retries_txn, lease, now, until, limit)

    async def finish_webhook_retries(self, results: Sequence[tuple[WebhookRetry, float | None, str | None]], lease: str) -> None:
        await self._runner.write(_finish_webhook_retries_txn, list(results), lease)

    async def flush_webhook_retries(self, now: float, webhook_ids: Sequence[str] | None = None) -> tuple[int, int]:
        return await self._runner.write(_flush_webhook_retries_txn, now, None if webhook_ids is None else list(webhook_ids))


def _event_parameters(
    client: str,
    start: EventCursor | None,
    descending: bool,
    limit: int,
    domain: str | None,
    event: str | None,
    severity: str | None,
    recipient: str | None,
    begin: float | None,
    end: float | None,
) -> dict[str, Any]:
    """The named parameters of the event queries (Q.EVENTS_*); no ``start``: from the feed's end in the reading's direction."""
    if start is None:
        start = FEED_END if descending else FEED_START
    return {
        "client": client,
        "seq": start.seq,
        "id": start.id,
        "limit": limit,
        "domain": domain,
        "event": event,
        "severity": severity,
        "recipient": recipient,
        "begin": begin,
        "end": end,
    }
