"""
The queue: the one interface through which every role reads and writes state.

Everything that speaks SQL lives in this package. The rest of mmgun sees the
:class:`Store` protocol and the plain records below, and gets its store from
:func:`open_store` or :func:`open_admin_store`, which choose the backend from
``--database``; so that a PostgreSQL implementation is a subpackage next to
:mod:`mmgun.store.sqlite`, not a rewrite. What every backend shares lives here
(the records, the protocol) and in :mod:`mmgun.store.group` (group commit).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import attrs

__all__ = [
    "ClaimedEnvelope",
    "DatabaseFull",
    "DatabaseGone",
    "DatabaseUnavailable",
    "DomainKey",
    "EnvelopeOutcome",
    "Event",
    "EventCursor",
    "Suppression",
    "Webhook",
    "WebhookRetry",
    "IdempotencyConflict",
    "InDelivery",
    "MTASTSPolicy",
    "Backoff",
    "NewSubmission",
    "NotInQueue",
    "QueueDepth",
    "QueueEntry",
    "QueueStats",
    "RecipientOutcome",
    "RecipientState",
    "SendingDomain",
    "Store",
    "StorageError",
    "SubmissionState",
    "UnsupportedDatabase",
    "is_postgresql",
    "open_admin_store",
    "open_store",
    "submission_status",
]


#: How long an Idempotency-Key is remembered: a replay within it gets the original submission.
IDEMPOTENCY_WINDOW = 24 * 3600.0


class StorageError(Exception):
    """The database failed; raised ``from`` the driver's own exception."""


class DatabaseGone(StorageError):
    """
    The database file this process opened is no longer the file at its path: it was
    deleted or replaced while mmgun ran. Nothing written now would be found again after a
    restart, so no write is committed (the transaction is rolled back) until it is back.
    """


class DatabaseFull(StorageError):
    """The database or its file system is full (SQLITE_FULL); the write was rolled back and may be retried."""


class DatabaseUnavailable(StorageError):
    """
    The database server cannot be reached: no connection could be made, or the one in use
    was lost (PostgreSQL restarted, the network cut). Nothing was committed, except when the
    connection broke while committing, when nobody can know: a record is guarded by its
    lease, and a submission retried with its Idempotency-Key is queued once. The store's
    write_problem() says so until a transaction succeeds again.
    """


class UnsupportedDatabase(StorageError):
    """``--database`` names a kind of database this mmgun cannot use (yet): one line for the operator."""


class Conflict(Exception):
    """The operator's change contradicts what is stored (a duplicate client, an unknown key); one line."""


@attrs.frozen
class StoredKey:
    """What authentication needs of an API key."""

    client: str
    key_hash: bytes
    revoked: bool


@attrs.frozen
class KeyInfo:
    """An API key as ``mmgun keys list`` shows it (never the key itself)."""

    key_id: str
    client: str
    created_at: float
    last_used_at: float | None
    revoked_at: float | None


@attrs.frozen
class SendingDomain:
    """A domain a client may send as (issue 13): the ``d=`` of its DKIM signatures."""

    #: IDNA-encoded, lower case, no trailing dot.
    name: str
    client: str
    created_at: float


#: The DKIM algorithms of a DomainKey: RFC 6376's rsa-sha256 and RFC 8463's ed25519-sha256.
DKIM_ALGORITHMS = ("rsa-sha256", "ed25519-sha256")


@attrs.frozen
class DomainKey:
    """
    A sending domain's DKIM key. ``private_key`` is left out of the repr, so that logging
    or printing a key never shows it; the admin command never lists it.
    """

    domain: str
    #: The ``s=`` tag, e.g. "mmgun20261205-k3f9q2" (RFC 6376 selector syntax).
    selector: str
    #: "rsa-sha256" or "ed25519-sha256".
    algorithm: str
    #: PKCS#8 PEM.
    private_key: bytes = attrs.field(repr=False)
    #: The ``p=`` value: base64 of the DER SubjectPublicKeyInfo (RSA) or of the raw 32-byte key (Ed25519).
    public_key: str
    created_at: float
    retired_at: float | None


#: The kinds of event (Mailgun's names). "rejected" is not produced: mmgun refuses before it accepts.
EVENT_KINDS = ("accepted", "delivered", "failed")
#: The kinds of suppression list, in the order a recipient on several is reported.
SUPPRESSION_KINDS = ("bounce", "complaint", "unsubscribe")


@attrs.frozen(order=True)
class EventCursor:
    """A place in a client's event feed: the commit's number and the event's id within it."""

    seq: int
    id: int

    def __str__(self) -> str:
        return f"{self.seq}-{self.id}"

    @classmethod
    def parse(cls, text: str) -> EventCursor:
        """The cursor :meth:`__str__` made; ValueError for anything else."""
        seq, dash, ident = text.partition("-")
        if not (dash and seq.isascii() and seq.isdigit() and ident.isascii() and ident.isdigit()):
            raise ValueError(f"not an event cursor: {text!r}")
        if len(seq) > 18 or len(ident) > 18:
            raise ValueError(f"not an event cursor: {text!r}")
        return cls(int(seq), int(ident))


#: Before every event.
FEED_START = EventCursor(0, 0)
#: An id no event reaches (and the largest EventCursor.parse takes): (seq, LAST_ID) is after
#: every event of commit seq and before those of the next.
LAST_ID = 10**18 - 1
#: After every event.
FEED_END = EventCursor(LAST_ID, LAST_ID)


@attrs.frozen
class Event:
    """One state change of one recipient, with what its submission says about the message."""

    cursor: EventCursor
    client: str
    #: The sender's domain.
    domain: str
    submission_id: str
    recipient: str
    #: accepted, delivered or failed (:data:`EVENT_KINDS`).
    event: str
    #: failed: temporary or permanent.
    severity: str | None
    #: failed permanently: bounce, expired, generic, deleted, suppress-bounce, …; delivered in test mode: testmode.
    reason: str | None
    #: delivered or failed: which attempt this was (1 for the first).
    attempt: int | None
    #: The SMTP reply, or why in words.
    reply: str | None
    mx_host: str | None
    created_at: float
    message_id: str | None
    sender: str
    tags: tuple[str, ...] = ()
    #: The submission's metadata, a JSON object as the client gave it.
    metadata: str | None = None


@attrs.frozen
class Suppression:
    """An address a client's mail is no longer sent to."""

    client: str
    #: bounce, complaint or unsubscribe (:data:`SUPPRESSION_KINDS`).
    kind: str
    #: Lower case.
    address: str
    created_at: float
    #: bounce: the reply's code ("550") and the reply.
    code: str | None = None
    error: str | None = None
    #: unsubscribe: only mail with one of these tags is stopped; empty: all mail.
    tags: tuple[str, ...] = ()


#: What a webhook can subscribe to (Mailgun's webhook names), and the events each is. As at
#: Mailgun, "accepted" is in the event log but no webhook's: it would double the POSTs per message
#: for news the client already has (the 200 of its own request).
WEBHOOK_EVENTS = {
    "delivered": ("delivered", None),
    "permanent_fail": ("failed", "permanent"),
    "temporary_fail": ("failed", "temporary"),
}


def webhook_kind(event: str, severity: str | None) -> str | None:
    """The webhook name (:data:`WEBHOOK_EVENTS`) an event is delivered under, or None."""
    for name, (kind, level) in WEBHOOK_EVENTS.items():
        if kind == event and level == severity:
            return name
    return None


@attrs.frozen
class Webhook:
    """A receiver of a client's events: those of one sending domain (or all, domain None) of the kinds named."""

    id: str
    client: str
    domain: str | None
    url: str
    #: Names from :data:`WEBHOOK_EVENTS`.
    events: tuple[str, ...]
    created_at: float
    #: The last event of the feed this webhook has handled (posted, or put in its retries).
    cursor: EventCursor = attrs.field(default=FEED_START)

    def wants(self, event: Event) -> bool:
        """Whether ``event`` is one this webhook receives."""
        if self.domain is not None and event.domain != self.domain:
            return False
        return webhook_kind(event.event, event.severity) in self.events


@attrs.frozen
class WebhookRetry:
    """An event a webhook's receiver did not take, due again at ``next_attempt``."""

    webhook: Webhook
    event: Event
    #: Failed attempts so far (1 after the first).
    attempts: int
    first_attempt: float
    next_attempt: float
    last_error: str | None = None


@attrs.frozen
class MTASTSPolicy:
    """
    A recipient domain's MTA-STS policy (RFC 8461 section 3.2), as fetched (:mod:`mmgun.mtasts`)
    and cached in the store for ``max_age`` seconds from ``fetched_at`` (wall-clock time).
    """

    domain: str
    #: The ``id`` of the domain's ``_mta-sts`` TXT record it was fetched under (section 3.1).
    policy_id: str
    #: "enforce", "testing" or "none".
    mode: str
    #: The ``mx`` patterns, lower-case: host names, or ``*.`` and a domain.
    mx: tuple[str, ...]
    max_age: int
    fetched_at: float

    @property
    def expires_at(self) -> float:
        return self.fetched_at + self.max_age


@attrs.frozen
class Backoff:
    """
    A destination one sender backs off from (issue 18, :mod:`mmgun.backoff`): a recipient
    domain paused (``kind`` "domain": every sender holds its mail until ``until``), or an
    MX whose concurrency this sender lowered (``kind`` "mx", ``name`` "host [address]",
    ``concurrency`` its session limit now; shown until ``until`` unless renewed). Times
    are wall-clock.
    """

    kind: str
    name: str
    #: The identity of the sender that wrote it (``--sender-id``).
    sender: str
    until: float
    #: The reply that caused it.
    reply: str
    concurrency: int | None = None
    updated_at: float = 0.0


class IdempotencyConflict(Exception):
    """The client reused an Idempotency-Key with a different request."""


@attrs.frozen
class NewSubmission:
    """A validated submission, ready to be queued."""

    id: str
    client: str
    sender: str
    #: Normalized, de-duplicated recipient addresses, in request order.
    recipients: tuple[str, ...]
    #: The RFC 5322 message, CRLF line endings.
    message: bytes
    created_at: float
    idempotency_key: str | None = None
    #: Digest of the request, compared when an idempotency key is replayed.
    request_hash: str | None = None
    #: Do not deliver before this POSIX time; None (or a time not after created_at): at once.
    #: The envelopes enter the queue then: their first attempt, their queue lifetime and
    #: their age count from it.
    send_at: float | None = None
    #: The client's tags, kept with the submission and shown by /status.
    tags: tuple[str, ...] = ()
    #: The client's metadata: a JSON object as text (the store keeps it as it is), or None.
    metadata: str | None = None
    #: The message's Message-ID header ("<...@host>"): /status finds the submission by it.
    message_id: str | None = None
    #: Mailgun's o:testmode: recorded, never delivered. Finished at once: every recipient
    #: "sent" with a last_reply saying so, no envelope due, the message not kept.
    test_mode: bool = False

    def starts_at(self) -> float:
        """When the envelopes are first due: send_at when it is later than created_at."""
        return self.send_at if self.send_at is not None and self.send_at > self.created_at else self.created_at

    def envelopes(self) -> dict[str, list[str]]:
        """Recipients grouped by domain (already case-folded and IDNA-encoded)."""
        groups: dict[str, list[str]] = {}
        for address in self.recipients:
            groups.setdefault(address.rpartition("@")[2], []).append(address)
        return groups


@attrs.frozen
class RecipientState:
    address: str
    #: queued, deferred, sent or failed; scheduled: queued, its submission's send_at not reached yet.
    status: str
    attempts: int
    last_reply: str | None
    updated_at: float


@attrs.frozen
class SubmissionState:
    id: str
    recipients: tuple[RecipientState, ...]
    tags: tuple[str, ...] = ()
    #: The metadata JSON object as text, as it was queued; None when there was none.
    metadata: str | None = None
    #: The send_at it was queued with (a time later than its creation), else None.
    send_at: float | None = None

    @property
    def status(self) -> str:
        return submission_status(r.status for r in self.recipients)


def submission_status(statuses: Iterable[str]) -> str:
    """
    scheduled while every recipient waits for send_at; queued while any recipient is
    unfinished; then sent, failed or partial.
    """
    seen = set(statuses)
    if seen == {"scheduled"}:
        return "scheduled"
    if seen & {"queued", "deferred", "scheduled"}:
        return "queued"
    if seen == {"sent"}:
        return "sent"
    if seen == {"failed"}:
        return "failed"
    return "partial"


@attrs.frozen
class ClaimedEnvelope:
    """An envelope leased to one sender for one delivery attempt."""

    id: int
    submission_id: str
    domain: str
    sender: str
    #: Only the recipients still pending (never one that was already sent or failed).
    recipients: tuple[str, ...]
    message: bytes
    attempts: int
    created_at: float
    #: Guards every later write: a sender whose lease was lost cannot overwrite the new owner's work.
    lease: str
    #: The client whose submission this is (its events are the client's).
    client: str = ""


@attrs.frozen
class RecipientOutcome:
    address: str
    #: sent, failed or deferred.
    status: str
    reply: str
    #: Why a failed recipient failed, as its event says (bounce, expired, generic, …);
    #: None: "bounce" for a 5xx reply, else "generic".
    reason: str | None = None
    #: The MX host that gave the reply, when one did.
    mx_host: str | None = None
    #: The reply says that the mailbox does not exist: the address joins the client's bounce list.
    bounce: bool = False


@attrs.frozen
class EnvelopeOutcome:
    """The result of one attempt on a claimed envelope."""

    envelope: ClaimedEnvelope
    recipients: tuple[RecipientOutcome, ...]
    #: When to try the deferred recipients again; ignored when none is deferred.
    next_attempt: float | None = None
    #: Whether this counts as a delivery attempt (False for e.g. a released lease).
    attempted: bool = True


@attrs.frozen
class QueueEntry:
    """One unfinished envelope, as the operator's ``mmgun queue`` shows it."""

    envelope_id: int
    submission_id: str
    client: str
    domain: str
    recipients: tuple[str, ...]
    attempts: int
    next_attempt: float
    last_reply: str | None
    created_at: float
    leased: bool
    #: Never attempted and its submission's send_at is still ahead.
    scheduled: bool = False

    @property
    def status(self) -> str:
        if self.attempts:
            return "deferred"
        return "scheduled" if self.scheduled else "queued"


@attrs.frozen
class QueueStats:
    """The numbers of ``mmgun stats``, read in one transaction."""

    #: (status, count) over every recipient still in the database (finished ones until retention).
    recipients: tuple[tuple[str, int], ...]
    unfinished_envelopes: int
    #: Unfinished envelopes whose lease has not expired: a sender is delivering them now.
    in_delivery: int
    #: created_at of the oldest unfinished envelope (a scheduled one counts from its send_at, once
    #: reached); None when there is none.
    oldest_created_at: float | None
    #: (domain, pending recipients), the largest backlogs first.
    domains: tuple[tuple[str, int], ...]


@attrs.frozen
class QueueDepth:
    """The queue gauges of /metrics: unfinished work only, so reading them costs as much as the queue, not the history."""

    #: (status, count) of pending recipients, "queued" and "deferred" only; a status with none is left out.
    recipients: tuple[tuple[str, int], ...]
    unfinished_envelopes: int
    #: Unfinished envelopes whose lease has not expired.
    in_delivery: int
    #: created_at of the oldest unfinished envelope (a scheduled one counts from its send_at, once
    #: reached); None when there is none.
    oldest_created_at: float | None


class NotInQueue(LookupError):
    """Ids named by the operator that match no unfinished envelope nor submission; nothing was changed."""

    def __init__(self, ids: Sequence[str]) -> None:
        super().__init__(", ".join(ids))
        self.ids = tuple(ids)


class InDelivery(Exception):
    """
    The operator asked to change envelopes a sender is delivering right now; nothing was changed.

    Failing them under the sender's feet could record "deleted" for mail that was in fact
    delivered a moment later; once the lease ends (``until``) the change can be made.
    """

    def __init__(self, envelopes: Sequence[int], until: float) -> None:
        super().__init__(", ".join(str(e) for e in envelopes))
        self.envelopes = tuple(envelopes)
        self.until = until


class Store(Protocol):
    """What the frontend, sender, cleaner and admin command need from a queue."""

    async def add_submission(self, submission: NewSubmission) -> str:
        """
        Queue a submission durably; return its id once committed.

        A replayed idempotency key with the same request hash returns the
        original id and queues nothing; with another hash it raises
        :class:`IdempotencyConflict`. So do replays that race each other, from any number
        of connections and hosts: all get the one submission's id, none a StorageError.
        """

    async def submission(self, client: str, submission_id: str, now: float | None = None) -> SubmissionState | None:
        """
        The state of one of ``client``'s submissions, or None (also for another client's).
        With ``now``, a queued recipient whose submission's send_at is after it is "scheduled".
        """

    async def add_batch(self, submissions: Sequence[NewSubmission]) -> list[str]:
        """
        Queue several submissions (without idempotency keys) in one transaction: all of
        them or, raising, none. Their ids, once committed.
        """

    async def submissions_by_message_id(self, client: str, message_id: str, now: float | None = None) -> list[SubmissionState]:
        """
        The states of ``client``'s submissions whose message has this Message-ID (several
        for a batch send), in the order they were queued; empty for another client's.
        """

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
        """
        Lease up to ``limit`` due envelopes to ``owner`` (as ``"<owner>/<random>"``) in one
        transaction, in next_attempt order.

        The envelopes of one submission share one ``message`` bytes object. ``held``:
        submissions whose message the caller already has; their envelopes come with an
        empty ``message`` (not read) and cost nothing against ``max_bytes``. ``max_bytes``:
        stop before the first envelope whose (not yet counted) submission's message would
        take the total past it; with ``always_one`` the first envelope is taken anyway (a
        caller holding nothing must make progress whatever the size of the message).

        What several hosts on one database rely on (every backend keeps it):

        - Concurrent claims, from any number of processes and hosts, never lease one
          envelope twice: an envelope is claimed when due and unleased, or when its lease
          has run out.
        - Leases and due times are judged on the database's clock (``now`` is shifted by
          the database's clock minus the caller's): a host whose clock is off never takes a
          live lease early. ``next_attempt`` values of :meth:`record` are shifted likewise.
        - Every later write of a claimed envelope (:meth:`record`, :meth:`renew`,
          :meth:`release`) is guarded by its lease: a result recorded after the lease was
          lost and the envelope claimed again is dropped (and logged), never applied twice.
        """

    async def lock_identity(self, identity: str) -> bool:
        """
        Hold ``identity`` exclusively while this store is open (for SQLite a ``flock``
        beside the database; for PostgreSQL a session advisory lock, held by a connection
        of its own, on every host). False if a live holder has it.
        """

    async def reclaim(self, identity: str, now: float) -> int:
        """Make the unfinished envelopes leased under ``identity`` due now, unleased; how many."""

    async def due_unattempted(self, now: float) -> int:
        """
        Make never-attempted unleased envelopes due later than ``now`` due now (after a
        wall-clock step back); never one whose submission's send_at is after ``now``.
        """

    async def renew(self, envelopes: Sequence[ClaimedEnvelope], now: float, until: float) -> None:
        """
        Extend the leases of envelopes still being delivered to ``until`` (``now`` is the
        caller's clock, by which ``until`` is measured; envelopes whose lease was lost are left).
        """

    async def record(self, outcomes: Sequence[EnvelopeOutcome], now: float) -> None:
        """
        Commit attempt results and release the leases, all or nothing. The envelope that
        finishes a submission's last pending recipient finishes the submission and erases
        its message, even when two hosts finish its last two envelopes at the same moment.
        """

    async def release(self, envelopes: Sequence[ClaimedEnvelope], now: float) -> None:
        """Give up leases without an attempt: the envelopes are due again at once."""

    async def ping(self) -> None:
        """Raise StorageError unless the database answers."""

    def write_problem(self) -> str | None:
        """
        Why a write would fail now, or None: the database file is no longer the one at its
        path (checked now), or the last write failed for a reason that lasts (disk full,
        read-only) and none has succeeded since. Cheap (one stat); call it on the reactor thread.
        """

    def listen_for_wakeups(self, wake: Callable[[], None]) -> Any:
        """
        A service (twisted's IService) to run beside a sender, calling ``wake`` when any
        process on any host queued mail due now (PostgreSQL: LISTEN/NOTIFY on a connection of
        its own, reconnected after a loss); None where the backend has no such thing (SQLite,
        whose senders are woken through :mod:`mmgun.wakeup`'s wake directory).
        """

    # -- the cleaner ------------------------------------------------------------

    async def clean(self, before: float, limit: int, now: float) -> int:
        """
        Delete up to ``limit`` submissions finished before ``before``, except those whose
        Idempotency-Key is still honoured at ``now`` (24 h); return how many.
        """

    async def clean_events(self, before: float, limit: int) -> int:
        """Delete up to ``limit`` of the oldest events, those from before ``before``; return how many."""

    async def upkeep(self) -> None:
        """
        The backend's own housekeeping, run by the cleaner after a pass that deleted
        something; bounded, so writers wait for it only briefly. SQLite hands a bounded
        number of free pages back to the file system (incremental vacuum); a backend whose
        database does its own (PostgreSQL's autovacuum) may do nothing.
        """

    # -- the operator (mmgun queue / stats) and the metrics -----------------------

    async def queue_entries(self, now: float, status: str | None = None, domain: str | None = None) -> list[QueueEntry]:
        """Unfinished envelopes, oldest first; ``status``: None, queued, scheduled or deferred (as QueueEntry.status)."""

    async def queue_stats(self, now: float, top_domains: int = 20) -> QueueStats:
        """Counts by status, queue age, backlog per domain, in one read."""

    async def queue_depth(self, now: float) -> QueueDepth:
        """Pending recipients by status, unfinished envelopes, queue age, in one read; cheap enough to poll."""

    async def flush_deferred(self, now: float, ids: Sequence[str] | None = None) -> tuple[int, int]:
        """Make deferred envelopes due now: (flushed, left alone because in delivery)."""

    async def fail_queued(self, ids: Sequence[str], now: float, reply: str) -> tuple[int, int]:
        """Fail the pending recipients of the named envelopes or submissions."""

    async def queued_by_client(self) -> dict[str, int]:
        """Pending recipients per client (for --max-queued)."""

    async def queued_bytes_by_client(self) -> dict[str, int]:
        """Message bytes of the unfinished submissions per client, each counted once (for --max-queued-bytes)."""

    # -- clients and API keys ---------------------------------------------------

    async def add_client(self, client: str, now: float) -> None:
        """Conflict if the client exists."""

    async def client_exists(self, client: str) -> bool:
        """Whether ``client`` is in the clients table (``mmgun clients add``)."""

    async def add_key(self, client: str, key_id: str, key_hash: bytes, now: float) -> None:
        """Conflict if the client does not exist."""

    async def list_keys(self, client: str) -> list[KeyInfo]: ...

    async def revoke_key(self, key_id: str, now: float) -> bool:
        """True if the key was active; Conflict if there is no such key."""

    async def find_key(self, key_id: str) -> StoredKey | None: ...

    async def key_ids(self) -> set[str]:
        """The id of every API key, revoked ones too."""

    async def touch_keys(self, used: Sequence[tuple[str, float]]) -> None: ...

    # -- sending domains and DKIM keys (issue 13) --------------------------------

    async def add_domain(self, name: str, client: str, now: float) -> None:
        """Register ``name`` (already IDNA, lower case) for ``client``; Conflict if the client is unknown or the domain exists (for any client)."""

    async def remove_domain(self, name: str) -> None:
        """Forget the domain and its keys (private keys included); Conflict if unknown."""

    async def domains(self, client: str | None = None) -> list[SendingDomain]:
        """Every domain, or ``client``'s, by name."""

    async def domain(self, name: str) -> SendingDomain | None: ...

    async def add_domain_key(self, key: DomainKey) -> None:
        """Conflict if the domain is unknown or already has a key with that selector."""

    async def domain_keys(self, name: str, include_retired: bool = False) -> list[DomainKey]:
        """The domain's keys, newest first (empty for an unknown domain)."""

    async def retire_domain_key(self, name: str, selector: str, now: float) -> bool:
        """
        Stop signing with and publishing the key; True if it was active. Conflict if there
        is no such key, or if it is the newest active key of its algorithm (rotate first).
        """

    async def signing_keys(self, name: str) -> list[DomainKey]:
        """What to sign ``name``'s mail with now: the newest two active keys of each algorithm (a rotate signs with
        the old and the new key until the old is retired), RSA first, newest first within an algorithm."""

    # -- events and suppressions (issue 14) --------------------------------------------------------

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
        """
        Up to ``limit`` of ``client``'s events in feed (commit) order, those after ``start``
        (None: from the first); ``descending``: newest first, those before ``start`` (None:
        from the last). Filters: the sender's ``domain``, the ``event`` kind, ``severity``,
        ``recipient``, ``begin`` <= created_at <= ``end``. A reader that follows the feed
        with the last cursor it saw gets every event once, in commit order, whatever commits
        concurrently.
        """

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
        """
        As :meth:`events`, but the filters look at no more than ``scan`` of the client's
        events from ``start`` on (a filter that matches little never walks the whole log),
        and with the place the reading reached: the last event returned when ``limit`` were
        found; else the last event looked at when ``scan`` were; else the end of the feed as
        it was when read (ascending: after every event committed then, so that a reader that
        starts there again misses nothing and rereads nothing; descending: the start).
        """

    async def suppressions(
        self, client: str, kind: str, *, after: str | None = None, limit: int = 100, descending: bool = False
    ) -> list[Suppression]:
        """``client``'s ``kind`` list in address order, from after the address ``after`` (before it, descending)."""

    async def suppression(self, client: str, kind: str, address: str) -> Suppression | None:
        """One entry of a list (``address`` in any case), or None."""

    async def add_suppressions(self, entries: Sequence[Suppression]) -> None:
        """Add (or replace) entries, in one transaction."""

    async def remove_suppression(self, client: str, kind: str, address: str) -> bool:
        """Remove one entry; whether there was one."""

    async def clear_suppressions(self, client: str, kind: str) -> int:
        """Empty one list; how many entries it had."""

    # -- webhooks (issue 14) -----------------------------------------------------------------------

    async def add_webhook(self, webhook: Webhook) -> Webhook:
        """
        Store a new webhook (its cursor ignored); it receives the events committed from now
        on. Returns it with its starting cursor. Conflict if its id is taken.
        """

    async def webhooks(self, client: str | None = None) -> list[Webhook]:
        """Every webhook (of ``client``), by creation."""

    async def webhook(self, webhook_id: str) -> Webhook | None: ...

    async def update_webhook(self, webhook_id: str, url: str, events: Sequence[str]) -> bool:
        """Change a webhook's URL and events; whether it exists."""

    async def remove_webhook(self, webhook_id: str) -> bool:
        """Remove a webhook and the retries waiting for it; whether it existed."""

    async def webhook_key(self, client: str) -> str | None:
        """The client's webhook signing key, or None before one was made."""

    async def set_webhook_key(self, client: str, key: str, now: float, *, replace: bool = True) -> str:
        """
        Set (or replace: rotate) the client's webhook signing key; the key in effect. With
        ``replace`` False a key the client already has stays (two processes making a first
        key at once agree on one).
        """

    # -- destination back-off (issue 18) -----------------------------------------------------------

    async def save_backoffs(self, entries: Sequence[Backoff], now: float) -> None:
        """
        Write each entry (one per kind, name and sender: the latest replaces the one before; an
        ``until`` at or before ``now`` ends it) and delete every entry ended at ``now``.
        """

    async def backoffs(self, now: float) -> list[Backoff]:
        """The entries of every sender not ended at ``now``, domains first, each by name then sender."""

    # -- MTA-STS policies (issue 18) -----------------------------------------------------------

    async def mta_sts_policy(self, domain: str, now: float) -> MTASTSPolicy | None:
        """``domain``'s cached MTA-STS policy if it has not expired at ``now``, else None."""

    async def save_mta_sts_policy(self, policy: MTASTSPolicy) -> None:
        """Cache a freshly fetched policy, replacing the domain's previous one."""

    async def forget_expired_mta_sts_policies(self, now: float) -> int:
        """Delete the policies expired at ``now``; how many there were."""

    async def release_webhooks(self, lease: str, now: float) -> None:
        """
        Give up ``lease``'s webhooks and the retries it holds (a clean stop): another
        dispatcher takes them at once; the leased retries are due at ``now``.
        """

    async def lease_webhooks(self, lease: str, now: float, until: float, *, renew: bool = True) -> list[Webhook]:
        """
        Lease, until ``until``, every webhook not leased by another dispatcher (or whose
        lease ran out before ``now``), renewing those already ``lease``'s; return them, with
        their cursors: one dispatcher follows a webhook's feed at a time. With ``renew``
        False, only the webhooks no dispatcher holds are taken and returned (those already
        ``lease``'s are neither written nor returned).
        """

    async def advance_webhook(
        self, webhook_id: str, lease: str, cursor: EventCursor, failed: Sequence[tuple[int, float, float, str]]
    ) -> bool:
        """
        In one transaction: move the webhook's cursor to ``cursor`` and keep each failed
        event (event id, first attempt, next attempt, error) in its retries. False (and
        nothing changed) when the lease is no longer ``lease``.
        """

    async def due_webhook_retries(self, lease: str, now: float, until: float, limit: int) -> list[WebhookRetry]:
        """Lease up to ``limit`` retries due at ``now`` until ``until``; return them, oldest first."""

    async def finish_webhook_retries(self, results: Sequence[tuple[WebhookRetry, float | None, str | None]], lease: str) -> None:
        """
        The outcome of leased retries: (retry, None, _) delivered or given up (deleted);
        (retry, next attempt, error) failed again (attempts + 1). Only rows still under ``lease``.
        """

    async def flush_webhook_retries(self, now: float, webhook_ids: Sequence[str] | None = None) -> tuple[int, int]:
        """
        Make the waiting retries (of the webhooks ``webhook_ids``, else of all) due at ``now``
        (``mmgun webhooks flush``); those a dispatcher holds are left to it. Returns
        (flushed, in delivery).
        """

    async def close(self) -> None: ...


#: The URL schemes of a PostgreSQL ``--database`` (libpq takes both).
_POSTGRESQL_SCHEMES = ("postgresql://", "postgres://")


def is_postgresql(database: str) -> bool:
    """Whether ``--database`` is a PostgreSQL URL (else it is the path of an SQLite file)."""
    return database.lower().startswith(_POSTGRESQL_SCHEMES)


def _check_backend(database: str) -> None:
    """Raise UnsupportedDatabase unless ``database`` names a backend this mmgun has: a file path (SQLite) or a PostgreSQL URL."""
    scheme, colon_slashes, _ = database.partition("://")
    if colon_slashes and not is_postgresql(database) and scheme.isascii() and scheme.isalpha():
        raise UnsupportedDatabase(
            f"{scheme}:// databases are not supported; give the path of an SQLite file or a postgresql:// URL"
        )


def open_store(database: str, reactor: Any, pool_size: int | None = None, lease_seconds: float | None = None) -> Store:
    """
    The daemon's store on ``database`` (``--database``): a ``postgresql://`` or
    ``postgres://`` URL (libpq's, its parameters passed through) is a PostgreSQL database,
    any other value the path of an SQLite file; either is created or migrated to the newest
    schema here, and its transactions run on ``reactor``'s threads (``pool_size``
    connections for PostgreSQL; SQLite has one). ``lease_seconds`` (``--lease-time``) bounds
    how long PostgreSQL lets a session of a vanished host hold its row locks (a quarter of it,
    1-10 s). Raises StorageError (one line for the operator, never with the URL's password)
    when it cannot be used.
    """
    _check_backend(database)
    if is_postgresql(database):
        from .postgres import DEFAULT_POOL_SIZE, PostgresStore

        return PostgresStore.open(database, reactor, pool_size or DEFAULT_POOL_SIZE, lease_seconds)
    from .sqlite import SQLiteStore

    return SQLiteStore.open(database, reactor)


def open_admin_store(database: str, *, create: bool = False) -> Store:
    """
    The ``mmgun`` command's store on ``database``. Without ``create`` it never creates the
    database nor changes its schema (a typo in a path must not leave an empty queue behind):
    StorageError unless the daemon has made it. With ``create`` (commands that add clients
    or keys, which may run before the daemon's first start) it is created or upgraded.
    Synchronous for now: its calls have finished when they return (the command runs no reactor).
    """
    _check_backend(database)
    if is_postgresql(database):
        from .postgres import PostgresStore

        return PostgresStore.open_sync(database) if create else PostgresStore.open_existing(database)
    from .sqlite import SQLiteStore

    return SQLiteStore.open_sync(database) if create else SQLiteStore.open_existing(database)
