"""
The store's transactions, for every backend: plain functions on a connection
(:class:`mmgun.store.sql.Db`), run inside ``BEGIN … COMMIT`` by a backend's runner,
one per store method (:class:`mmgun.store.sql.SQLStore`). Every statement comes from
the backend's queries module, ``db.q`` (:mod:`mmgun.store.sqlite.queries`,
:mod:`mmgun.store.postgres.queries`): the same names, each in its dialect.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import attrs
from twisted.logger import Logger

from . import (
    IDEMPOTENCY_WINDOW,
    LAST_ID,
    Backoff,
    ClaimedEnvelope,
    Conflict,
    DomainKey,
    EnvelopeOutcome,
    Event,
    EventCursor,
    IdempotencyConflict,
    InDelivery,
    KeyInfo,
    MTASTSPolicy,
    NewSubmission,
    NotInQueue,
    QueueDepth,
    QueueEntry,
    QueueStats,
    RecipientOutcome,
    RecipientState,
    SendingDomain,
    StoredKey,
    SubmissionState,
    Suppression,
    Webhook,
    WebhookRetry,
)

if TYPE_CHECKING:
    from .sql import Db

_log = Logger()

#: Most submissions one /status by Message-ID reads (a batch has one per recipient).
MAX_BY_MESSAGE_ID = 10_000


class _Events:
    """
    The events one transaction writes, all in one statement at its end (:meth:`write`),
    numbered then with the feed's next commit number (NEXT_FEED_SEQ). That number is a lock
    on feed_clock's one row held until the commit, so that seq order is commit order
    wherever several writers commit at once (PostgreSQL): taken last, it is held only for
    the insert and the commit, not for the whole transaction. A transaction that writes no
    event takes none.
    """

    def __init__(self, db: Db) -> None:
        self._db = db
        self._rows: list[tuple[Any, ...]] = []
        #: Mail due now was queued (set with its events): :meth:`write` then wakes the senders.
        self.due_now = False

    def add(self, rows: list[tuple[Any, ...]]) -> None:
        """Rows made by :func:`_event`, written by :meth:`write`."""
        self._rows += rows

    def write(self) -> None:
        """Number and insert the rows added; the last thing a transaction does before it commits."""
        if self._rows:
            (seq,) = self._db.execute(self._db.q.NEXT_FEED_SEQ).fetchone()
            self._db.executemany(self._db.q.INSERT_EVENT, [(seq, *row) for row in self._rows])
            self._rows = []
        if self.due_now and self._db.q.WAKE_SENDERS is not None:
            # PostgreSQL's NOTIFY, delivered to every listening sender at the commit (issue 17).
            self._db.execute(self._db.q.WAKE_SENDERS)
            self.due_now = False


def _event(
    client: str,
    submission_id: str,
    domain: str,
    recipient: str,
    event: str,
    at: float,
    *,
    severity: str | None = None,
    reason: str | None = None,
    attempt: int | None = None,
    reply: str | None = None,
    mx_host: str | None = None,
) -> tuple[Any, ...]:
    """An event row for :meth:`_Events.add`: INSERT_EVENT's parameters after seq."""
    return (client, domain, submission_id, recipient, event, severity, reason, attempt, reply, mx_host, at)


def _sender_domain(sender: str) -> str:
    return sender.rpartition("@")[2].lower()


def _add_submissions_txn(db: Db, batch: list[NewSubmission]) -> list[str | Exception]:
    results: list[str | Exception] = []
    events = _Events(db)
    # A submission with an Idempotency-Key on its own, in a savepoint: a replay of it fails
    # alone. The others (nothing but a replayed key fails one submission alone) together, each
    # run of them at once; in the batch's order, events included.
    plain: list[NewSubmission] = []
    for submission in batch:
        if submission.idempotency_key is None:
            plain.append(submission)
            results.append(submission.id)
            continue
        _add_many(db, plain, events)
        plain = []
        db.execute(db.q.SAVEPOINT)
        try:
            results.append(_add_keyed(db, submission, events))
        except IdempotencyConflict as e:
            db.execute(db.q.ROLLBACK_TO)
            results.append(e)
        except db.IntegrityError:
            # Another connection stored this Idempotency-Key between our look-up and our insert
            # (the unique index said so): look again, now that its commit is visible.
            db.execute(db.q.ROLLBACK_TO)
            try:
                results.append(_add_keyed(db, submission, events))
            except IdempotencyConflict as e:
                db.execute(db.q.ROLLBACK_TO)
                results.append(e)
        db.execute(db.q.RELEASE)
    _add_many(db, plain, events)
    events.write()
    return results


def _add_batch_txn(db: Db, batch: list[NewSubmission]) -> list[str]:
    events = _Events(db)
    _add_many(db, batch, events)
    events.write()
    return [s.id for s in batch]


#: The last_reply of a test-mode recipient.
TEST_MODE_REPLY = "not delivered: test mode (o:testmode)"


def _suppressed(db: Db, batch: list[NewSubmission]) -> dict[str, dict[str, tuple[str, str | None]]]:
    """
    The recipients of each submission of ``batch`` on one of its client's suppression lists,
    in one query: submission id → address → (kind, the entry's error). Test-mode submissions
    are not looked up (nothing of them is sent).
    """
    wanted = sorted({(s.client, address.lower()) for s in batch if not s.test_mode for address in s.recipients})
    if not wanted:
        return {}
    entries: dict[tuple[str, str], list[tuple[str, str | None, str | None]]] = {}
    for client, address, kind, error, tags in db.execute(db.q.SUPPRESSED_AMONG, (json.dumps(wanted),)):
        entries.setdefault((client, address), []).append((kind, error, tags))
    found: dict[str, dict[str, tuple[str, str | None]]] = {}
    for s in batch:
        if s.test_mode:
            continue
        for address in s.recipients:
            # Every spelling of an address is the address: "Bob@x" and "bob@x" are both stopped.
            for kind, error, tags in sorted(entries.get((s.client, address.lower()), ()), key=lambda e: SUPPRESSION_ORDER.get(e[0], 99)):
                if kind == "unsubscribe" and tags:
                    limited = set(json.loads(tags))
                    if "*" not in limited and not limited & set(s.tags):
                        continue
                found.setdefault(s.id, {})[address] = (kind, error)
                break
    return found


#: Which list a recipient on several is reported as failing on.
SUPPRESSION_ORDER = {"bounce": 0, "complaint": 1, "unsubscribe": 2}


def suppressed_reply(kind: str, error: str | None) -> str:
    """The last_reply of a recipient not sent to because it is on a suppression list."""
    reply = f"suppressed: the address is on this client's {kind} list"
    return f"{reply} ({error})" if error else reply


def _add_keyed(db: Db, s: NewSubmission, events: _Events) -> str:
    """Queue ``s``, which has an Idempotency-Key, unless a replay of it is remembered: its id then."""
    row = db.execute(db.q.FIND_IDEMPOTENT, (s.client, s.idempotency_key)).fetchone()
    if row is not None:
        existing_id, request_hash, created_at = row
        if created_at + IDEMPOTENCY_WINDOW > s.created_at:
            if request_hash != s.request_hash:
                raise IdempotencyConflict(s.idempotency_key)
            return str(existing_id)
        db.execute(db.q.FORGET_IDEMPOTENCY_KEY, (existing_id,))
    _add_many(db, [s], events)
    return s.id


def _add_many(db: Db, batch: list[NewSubmission], events: _Events) -> None:
    """
    Queue ``batch`` (Idempotency-Keys already dealt with) in a fixed number of statements,
    whatever its size: the suppressions looked up, then the submissions, their envelopes and
    their recipients each inserted at once, in ``batch``'s order.
    """
    if not batch:
        return
    suppressed = _suppressed(db, batch)
    submissions: list[tuple[Any, ...]] = []
    envelopes: list[list[Any]] = []
    due_now = False
    for s in batch:
        start = s.starts_at()
        stopped = suppressed.get(s.id, {})
        # Nothing left to deliver (test mode, or every recipient suppressed): finished when queued.
        finished = s.test_mode or all(a in stopped for a in s.recipients)
        due_now = due_now or (not finished and start <= s.created_at)
        submissions.append(
            (
                s.id,
                s.client,
                s.sender,
                s.created_at,
                s.idempotency_key,
                s.request_hash,
                None if finished else s.message,
                start if start > s.created_at else None,
                json.dumps(list(s.tags)) if s.tags else None,
                s.metadata,
                s.message_id,
                s.created_at if finished else None,
            )
        )
        for envelope_domain, addresses in s.envelopes().items():
            # A scheduled envelope enters the queue at send_at: not claimed before, and its queue
            # lifetime and age count from then. One with nothing to deliver (test mode, every
            # recipient suppressed) is done at once.
            done = s.test_mode or all(a in stopped for a in addresses)
            envelopes.append([s.id, envelope_domain, 1 if done else 0, start, start])
    db.executemany(db.q.INSERT_SUBMISSION, submissions)
    ids = {(sid, domain): eid for eid, sid, domain in db.execute(db.q.INSERT_ENVELOPES, (json.dumps(envelopes),))}
    queued: list[tuple[Any, ...]] = []
    failed: list[tuple[Any, ...]] = []
    tested: list[tuple[Any, ...]] = []
    accepted: list[tuple[Any, ...]] = []
    for s in batch:
        stopped = suppressed.get(s.id, {})
        domain = _sender_domain(s.sender)
        rows = [_event(s.client, s.id, domain, address, "accepted", s.created_at) for address in s.recipients]
        for envelope_domain, addresses in s.envelopes().items():
            envelope_id = ids[(s.id, envelope_domain)]
            for i, a in enumerate(addresses):
                if s.test_mode:
                    tested.append((envelope_id, i, s.id, a, TEST_MODE_REPLY, s.created_at))
                elif a in stopped:
                    kind, error = stopped[a]
                    reply = suppressed_reply(kind, error)
                    failed.append((envelope_id, i, s.id, a, reply, s.created_at))
                    rows.append(
                        _event(s.client, s.id, domain, a, "failed", s.created_at, severity="permanent", reason=f"suppress-{kind}", attempt=0, reply=reply)
                    )
                else:
                    queued.append((envelope_id, i, s.id, a, s.created_at))
        if s.test_mode:
            rows += [
                _event(s.client, s.id, domain, a, "delivered", s.created_at, reason="testmode", attempt=0, reply=TEST_MODE_REPLY)
                for a in s.recipients
            ]
        accepted += rows
    db.executemany(db.q.INSERT_RECIPIENT, queued)
    db.executemany(db.q.INSERT_RECIPIENT_FAILED, failed)
    db.executemany(db.q.INSERT_RECIPIENT_TEST_MODE, tested)
    # Last: a statement that fails (and is rolled back to a savepoint) leaves no event behind.
    events.add(accepted)
    events.due_now = events.due_now or due_now


def _submission_txn(
    db: Db, client: str, submission_id: str, now: float | None
) -> SubmissionState | None:
    head = db.execute(db.q.SUBMISSION_OWNER, (submission_id, client)).fetchone()
    if head is None:
        return None
    send_at, tags, metadata = head
    rows = db.execute(db.q.SUBMISSION_RECIPIENTS, (submission_id,)).fetchall()
    recipients = tuple(RecipientState(*row) for row in rows)
    if send_at is not None and now is not None and send_at > now:
        # Nothing is attempted before send_at: a queued recipient is waiting for it.
        recipients = tuple(attrs.evolve(r, status="scheduled") if r.status == "queued" else r for r in recipients)
    return SubmissionState(
        submission_id, recipients, tags=tuple(json.loads(tags)) if tags else (), metadata=metadata, send_at=send_at
    )


def _submissions_by_message_id_txn(
    db: Db, client: str, message_id: str, now: float | None
) -> list[SubmissionState]:
    parameters = {"client": client, "message_id": message_id, "limit": MAX_BY_MESSAGE_ID}
    ids = [row[0] for row in db.execute(db.q.SUBMISSIONS_BY_MESSAGE_ID, parameters)]
    return [state for state in (_submission_txn(db, client, i, now) for i in ids) if state is not None]


def _claim_txn(
    db: Db,
    lease: str,
    now: float,
    expires: float,
    limit: int,
    max_bytes: int | None,
    held: list[str],
    always_one: bool,
) -> list[ClaimedEnvelope]:
    # Leases are judged on the database's clock: a host whose clock is off neither takes a live lease early nor keeps a dead one.
    shift = db.clock_offset(now)
    now, expires = now + shift, expires + shift
    candidates = db.execute(db.q.CLAIM_CANDIDATES, (now, limit)).fetchall()
    if not candidates:
        return []
    chosen: list[int] = []
    counted = set(held)
    total = 0
    for eid, sid, size in candidates:
        if sid not in counted:
            # In next_attempt order, up to the first message that does not fit (skipping it
            # for smaller ones would starve it); with always_one, the first envelope goes anyway.
            if max_bytes is not None and total + size > max_bytes and (chosen or not always_one):
                break
            counted.add(sid)
            total += size
        chosen.append(eid)
    claimed = db.execute(db.q.CLAIM, (lease, expires, json.dumps(chosen))).fetchall()
    ids = json.dumps([row[0] for row in claimed])
    submissions = json.dumps(sorted({row[1] for row in claimed}))
    # One bytes object per submission, shared by all its envelopes.
    details = {
        sid: (sender, message or b"", client)
        for sid, sender, client, message in db.execute(db.q.CLAIMED_SUBMISSIONS, {"ids": submissions, "held": json.dumps(held)})
    }
    pending: dict[int, list[str]] = {}
    for eid, address in db.execute(db.q.PENDING_RECIPIENTS, (ids,)):
        pending.setdefault(eid, []).append(address)
    claimed.sort()
    return [
        ClaimedEnvelope(
            id=eid,
            submission_id=sid,
            domain=domain,
            sender=details[sid][0],
            recipients=tuple(pending.get(eid, ())),
            message=details[sid][1],
            attempts=attempts,
            created_at=created_at,
            lease=lease,
            client=details[sid][2],
        )
        for eid, sid, domain, attempts, created_at in claimed
    ]


def _reclaim_txn(db: Db, now: float, prefix: str) -> int:
    now += db.clock_offset(now)
    return db.execute(db.q.RECLAIM_IDENTITY, (now, len(prefix), prefix)).rowcount


def _due_unattempted_txn(db: Db, now: float) -> int:
    now += db.clock_offset(now)
    return db.execute(db.q.DUE_UNATTEMPTED, {"now": now}).rowcount


def _renew_txn(db: Db, now: float, until: float, envelopes: list[tuple[int, str]]) -> None:
    until += db.clock_offset(now)
    # In id order, as every other writer locks envelopes: never a deadlock with a record.
    db.executemany(db.q.RENEW, [(until, envelope_id, lease) for envelope_id, lease in sorted(envelopes)])


def _record_many_txn(db: Db, batches: list[tuple[Sequence[EnvelopeOutcome], float]]) -> list[None]:
    # Every batch of the group at once: a fixed number of statements, whatever the group's size.
    shifted = []
    for outcomes, now in batches:
        shift = db.clock_offset(now)
        shifted += [(outcome, now + shift, shift) for outcome in outcomes]
    events = _Events(db)
    _record_txn(db, shifted, events)
    events.write()
    return [None] * len(batches)


def _outcome_event(envelope: ClaimedEnvelope, r: RecipientOutcome, attempt: int, now: float) -> tuple[Any, ...]:
    if r.status == "sent":
        kind, severity, reason = "delivered", None, None
    elif r.status == "deferred":
        kind, severity, reason = "failed", "temporary", None
    else:
        kind, severity = "failed", "permanent"
        reason = r.reason if r.reason is not None else ("bounce" if r.reply[:1] == "5" else "generic")
    return _event(
        envelope.client,
        envelope.submission_id,
        _sender_domain(envelope.sender),
        r.address,
        kind,
        now,
        severity=severity,
        reason=reason,
        attempt=attempt,
        reply=r.reply,
        mx_host=r.mx_host,
    )


def _reply_code(reply: str) -> str | None:
    code = reply[:3]
    return code if len(code) == 3 and code.isdigit() else None


def _record_txn(db: Db, outcomes: list[tuple[EnvelopeOutcome, float, float]], events: _Events) -> None:
    """
    Record ``outcomes`` (each with its ``now`` and clock shift, ``now`` on the database's
    clock): the submissions locked first, then the envelopes whose lease still holds, then
    every write; so that of two hosts finishing a submission's last two envelopes at once,
    the second waits for the first's commit and sees its envelope done (FINISH_SUBMISSIONS).
    """
    if not outcomes:
        return
    submissions = json.dumps(sorted({o.envelope.submission_id for o, _, _ in outcomes}))
    db.execute(db.q.LOCK_SUBMISSIONS, (submissions,)).fetchall()
    leases = json.dumps([[o.envelope.id, o.envelope.lease] for o, _, _ in outcomes])
    # (id, lease), not id: a group may hold a stale outcome and the current one for one envelope.
    held = {(envelope_id, lease) for envelope_id, lease in db.execute(db.q.LEASES_HELD, (leases,))}
    updates: list[tuple[Any, ...]] = []
    bounces: list[dict[str, Any]] = []
    finishes: list[list[Any]] = []
    finished_at: dict[str, float] = {}
    for outcome, now, shift in outcomes:
        envelope = outcome.envelope
        if (envelope.id, envelope.lease) not in held:
            _log.warn("lease on envelope {envelope} was lost; result not recorded", envelope=envelope.id)
            continue
        # Its lease ends here: a second outcome for it in the same group finds it lost, as it would a commit later.
        held.discard((envelope.id, envelope.lease))
        attempted = 1 if outcome.attempted else 0
        updates += [(r.status, attempted, r.reply, now, envelope.id, r.address) for r in outcome.recipients]
        # The pending recipients of an envelope have been attempted as often as it has.
        attempt = envelope.attempts + attempted
        events.add(
            [
                _outcome_event(envelope, r, attempt, now)
                for r in outcome.recipients
                if outcome.attempted or r.status != "deferred"
            ]
        )
        bounces += [
            {"address": r.address.lower(), "code": _reply_code(r.reply), "error": r.reply, "at": now, "submission_id": envelope.submission_id}
            for r in outcome.recipients
            if r.bounce and r.status == "failed"
        ]
        next_attempt = outcome.next_attempt + shift if outcome.next_attempt is not None else now
        finishes.append([envelope.id, attempted, next_attempt, envelope.lease])
        finished_at[envelope.submission_id] = now
    if not finishes:
        return
    db.executemany(db.q.UPDATE_RECIPIENT, updates)
    # In one order everywhere: two recorders upserting the same entries never wait for each other in a cycle.
    db.executemany(db.q.ADD_BOUNCE_FROM_SUBMISSION, sorted(bounces, key=lambda b: (b["submission_id"], b["address"])))
    done = sorted({sid for _, sid, done in db.execute(db.q.FINISH_ENVELOPES, (json.dumps(finishes),)) if done})
    if done:
        db.execute(db.q.FINISH_SUBMISSIONS, (json.dumps([[sid, finished_at[sid]] for sid in done]),))


def _clean_txn(db: Db, before: float, limit: int, keys_before: float) -> int:
    # Two index ranges, neither of which skips rows it may not delete: a submission with a
    # key finished before the window began was created before it too (created <= finished).
    deleted = db.execute(db.q.DELETE_FINISHED, {"before": min(before, keys_before), "limit": limit}).rowcount
    if deleted < limit and before > keys_before:
        deleted += db.execute(
            db.q.DELETE_FINISHED_WITHOUT_KEY, {"before": before, "limit": limit - deleted}
        ).rowcount
    return deleted


def _ping_txn(db: Db) -> None:
    db.execute(db.q.PING).fetchone()


def _queue_entries_txn(db: Db, now: float, status: str | None, domain: str | None) -> list[QueueEntry]:
    now += db.clock_offset(now)
    rows = db.execute(db.q.QUEUE_ENVELOPES, {"now": now, "status": status, "domain": domain}).fetchall()
    pending: dict[int, list[str]] = {}
    replies: dict[int, tuple[float, str]] = {}
    for eid, address, reply, updated_at in db.execute(db.q.QUEUE_RECIPIENTS, (json.dumps([row[0] for row in rows]),)):
        pending.setdefault(eid, []).append(address)
        if reply is not None and (eid not in replies or updated_at >= replies[eid][0]):
            replies[eid] = (updated_at, reply)
    return [
        QueueEntry(
            envelope_id=eid,
            submission_id=sid,
            client=client,
            domain=domain,
            recipients=tuple(pending.get(eid, ())),
            attempts=attempts,
            next_attempt=next_attempt,
            last_reply=replies[eid][1] if eid in replies else None,
            created_at=created_at,
            leased=bool(leased),
            scheduled=bool(scheduled),
        )
        for eid, sid, client, domain, attempts, next_attempt, leased, created_at, scheduled in rows
    ]


def _queue_stats_txn(db: Db, now: float, top_domains: int) -> QueueStats:
    now += db.clock_offset(now)
    recipients = tuple(db.execute(db.q.RECIPIENTS_BY_STATUS).fetchall())
    unfinished, in_delivery, oldest = db.execute(db.q.UNFINISHED_SUMMARY, {"now": now}).fetchone()
    domains = tuple(db.execute(db.q.BACKLOG_BY_DOMAIN, (top_domains,)).fetchall())
    return QueueStats(recipients, unfinished, in_delivery, oldest, domains)


def _queue_depth_txn(db: Db, now: float) -> QueueDepth:
    now += db.clock_offset(now)
    recipients = tuple(db.execute(db.q.PENDING_BY_STATUS).fetchall())
    unfinished, in_delivery, oldest = db.execute(db.q.UNFINISHED_SUMMARY, {"now": now}).fetchone()
    return QueueDepth(recipients, unfinished, in_delivery, oldest)


def _match_queued(db: Db, ids: list[str], now: float) -> list[tuple[int, str, bool, float]]:
    """The unfinished envelopes named by envelope or submission id; NotInQueue if any id matches none."""
    numbers = {i: str(int(i)) for i in ids if i.isascii() and i.isdigit()}
    rows = db.execute(db.q.MATCH_QUEUED, (now, json.dumps([int(n) for n in numbers.values()]), json.dumps(ids))).fetchall()
    found = {str(eid) for eid, *_ in rows} | {sid for _, sid, *_ in rows}
    missing = [i for i in dict.fromkeys(ids) if i not in found and numbers.get(i) not in found]
    if missing:
        raise NotInQueue(missing)
    return [(eid, sid, bool(leased), next_attempt) for eid, sid, leased, next_attempt in rows]


def _flush_deferred_txn(db: Db, now: float, ids: list[str] | None) -> tuple[int, int]:
    now += db.clock_offset(now)
    selection = None if ids is None else json.dumps(sorted({row[0] for row in _match_queued(db, ids, now)}))
    flushed = db.execute(db.q.FLUSH_DEFERRED, {"now": now, "ids": selection}).rowcount
    (in_delivery,) = db.execute(db.q.COUNT_IN_DELIVERY, {"now": now, "ids": selection}).fetchone()
    return flushed, in_delivery


def _fail_queued_txn(db: Db, ids: list[str], now: float, reply: str) -> tuple[int, int]:
    now += db.clock_offset(now)
    rows = _match_queued(db, ids, now)
    busy = sorted((eid, until) for eid, _, leased, until in rows if leased)
    if busy:
        raise InDelivery([eid for eid, _ in busy], max(until for _, until in busy))
    selection = json.dumps(sorted({row[0] for row in rows}))
    # As a record does (see _record_txn), though after the envelopes here: a deadlock with a
    # recording sender is possible, and PostgreSQL then aborts one of the two, which its runner runs again.
    db.execute(db.q.LOCK_SUBMISSIONS, (json.dumps(sorted({row[1] for row in rows})),)).fetchall()
    returned = db.execute(db.q.FAIL_PENDING_RECIPIENTS_RETURNING, {"reply": reply, "now": now, "ids": selection}).fetchall()
    # In the recipients' order (RETURNING's is not fixed on PostgreSQL): their events too.
    changed = [(sid, address, attempts) for sid, address, attempts, _, _ in sorted(returned, key=lambda row: (row[3], row[4]))]
    failed = len(changed)
    owners = {sid: db.execute(db.q.SUBMISSION_SENDER, (sid,)).fetchone() for sid in {row[0] for row in changed}}
    events = _Events(db)
    events.add(
        [
            _event(owners[sid][0], sid, _sender_domain(owners[sid][1]), address, "failed", now, severity="permanent", reason="deleted", attempt=attempts, reply=reply)
            for sid, address, attempts in changed
        ]
    )
    finished = db.execute(db.q.FINISH_FAILED_ENVELOPES, (selection,)).rowcount
    db.execute(db.q.FINISH_SUBMISSIONS, (json.dumps([[sid, now] for sid in sorted({row[1] for row in rows})]),))
    events.write()
    return finished, failed


def _add_client_txn(db: Db, client: str, now: float) -> None:
    if db.execute(db.q.CLIENT_EXISTS, (client,)).fetchone() is not None:
        raise Conflict(f"client {client} already exists")
    db.execute(db.q.INSERT_CLIENT, (client, now))


def _client_exists_txn(db: Db, client: str) -> bool:
    return db.execute(db.q.CLIENT_EXISTS, (client,)).fetchone() is not None


def _add_key_txn(db: Db, client: str, key_id: str, key_hash: bytes, now: float) -> None:
    if db.execute(db.q.CLIENT_EXISTS, (client,)).fetchone() is None:
        raise Conflict(f"no client {client} (add it first: mmgun clients add {client})")
    db.execute(db.q.INSERT_KEY, (key_id, client, key_hash, now))


def _list_keys_txn(db: Db, client: str) -> list[KeyInfo]:
    if db.execute(db.q.CLIENT_EXISTS, (client,)).fetchone() is None:
        raise Conflict(f"no client {client}")
    return [KeyInfo(*row) for row in db.execute(db.q.LIST_KEYS, (client,))]


def _revoke_key_txn(db: Db, key_id: str, now: float) -> bool:
    if db.execute(db.q.KEY_EXISTS, (key_id,)).fetchone() is None:
        raise Conflict(f"no API key {key_id}")
    return db.execute(db.q.REVOKE_KEY, (now, key_id)).rowcount == 1


def _find_key_txn(db: Db, key_id: str) -> StoredKey | None:
    row = db.execute(db.q.FIND_KEY, (key_id,)).fetchone()
    return None if row is None else StoredKey(row[0], bytes(row[1]), bool(row[2]))


def _key_ids_txn(db: Db) -> set[str]:
    return {key_id for (key_id,) in db.execute(db.q.ALL_KEY_IDS)}


def _touch_keys_txn(db: Db, used: Sequence[tuple[str, float]]) -> None:
    db.executemany(db.q.TOUCH_KEY, [(when, key_id) for key_id, when in used])


def _queued_by_client_txn(db: Db) -> dict[str, int]:
    return dict(db.execute(db.q.QUEUED_BY_CLIENT).fetchall())


def _queued_bytes_by_client_txn(db: Db) -> dict[str, int]:
    return {client: size or 0 for client, size in db.execute(db.q.QUEUED_BYTES_BY_CLIENT)}


def _add_domain_txn(db: Db, name: str, client: str, now: float) -> None:
    if db.execute(db.q.CLIENT_EXISTS, (client,)).fetchone() is None:
        raise Conflict(f"no client {client} (add it first: mmgun clients add {client})")
    row = db.execute(db.q.FIND_DOMAIN, (name,)).fetchone()
    if row is not None:
        raise Conflict(f"domain {name} is already registered (for client {row[1]})")
    db.execute(db.q.INSERT_DOMAIN, (name, client, now))


def _remove_domain_txn(db: Db, name: str) -> None:
    if db.execute(db.q.FIND_DOMAIN, (name,)).fetchone() is None:
        raise Conflict(f"no sending domain {name}")
    db.execute(db.q.DELETE_DOMAIN_KEYS, (name,))
    db.execute(db.q.DELETE_DOMAIN, (name,))


def _domains_txn(db: Db, client: str | None) -> list[SendingDomain]:
    rows = db.execute(db.q.ALL_DOMAINS) if client is None else db.execute(db.q.CLIENT_DOMAINS, (client,))
    return [SendingDomain(*row) for row in rows]


def _domain_txn(db: Db, name: str) -> SendingDomain | None:
    row = db.execute(db.q.FIND_DOMAIN, (name,)).fetchone()
    return None if row is None else SendingDomain(*row)


def _add_domain_key_txn(db: Db, key: DomainKey) -> None:
    if db.execute(db.q.FIND_DOMAIN, (key.domain,)).fetchone() is None:
        raise Conflict(f"no sending domain {key.domain}")
    if db.execute(db.q.DOMAIN_KEY_EXISTS, (key.domain, key.selector)).fetchone() is not None:
        raise Conflict(f"domain {key.domain} already has a key with selector {key.selector}")
    db.execute(
        db.q.INSERT_DOMAIN_KEY,
        (key.domain, key.selector, key.algorithm, key.private_key, key.public_key, key.created_at, key.retired_at),
    )


def _domain_key(row: tuple[Any, ...]) -> DomainKey:
    domain, selector, algorithm, private_key, public_key, created_at, retired_at = row
    return DomainKey(domain, selector, algorithm, bytes(private_key), public_key, created_at, retired_at)


def _domain_keys_txn(db: Db, name: str, include_retired: bool) -> list[DomainKey]:
    return [_domain_key(row) for row in db.execute(db.q.DOMAIN_KEYS if include_retired else db.q.ACTIVE_DOMAIN_KEYS, (name,))]


def _newest_by_algorithm(keys: list[DomainKey]) -> list[DomainKey]:
    """The first (newest) of each algorithm in newest-first ``keys``, RSA first."""
    newest: dict[str, DomainKey] = {}
    for key in keys:
        newest.setdefault(key.algorithm, key)
    return sorted(newest.values(), key=lambda k: k.algorithm != "rsa-sha256")


def _retire_domain_key_txn(db: Db, name: str, selector: str, now: float) -> bool:
    keys = [_domain_key(row) for row in db.execute(db.q.DOMAIN_KEYS, (name,))]
    key = next((k for k in keys if k.selector == selector), None)
    if key is None:
        raise Conflict(f"domain {name} has no key with selector {selector}")
    if key.retired_at is not None:
        return False
    if key in _newest_by_algorithm([k for k in keys if k.retired_at is None]):
        # Retiring it would sign with an older key, or not at all.
        raise Conflict(
            f"{selector} is the key {name} is signed with ({key.algorithm}); "
            f"make a new one first (mmgun domains rotate {name}), then retire this one"
        )
    return db.execute(db.q.RETIRE_DOMAIN_KEY, (now, name, selector)).rowcount == 1


#: Active keys signed with per algorithm: the newest and the one before it, so that after a
#: rotate mail still passes at receivers whose DNS does not have the new record yet.
SIGNING_KEYS_PER_ALGORITHM = 2


def _signing_keys_txn(db: Db, name: str) -> list[DomainKey]:
    """The active keys to sign with: the newest two of each algorithm, RSA first, then newest first."""
    chosen: list[DomainKey] = []
    counts: dict[str, int] = {}
    for key in (_domain_key(row) for row in db.execute(db.q.ACTIVE_DOMAIN_KEYS, (name,))):
        if counts.get(key.algorithm, 0) < SIGNING_KEYS_PER_ALGORITHM:
            counts[key.algorithm] = counts.get(key.algorithm, 0) + 1
            chosen.append(key)
    return sorted(chosen, key=lambda k: k.algorithm != "rsa-sha256")


def _events_txn(db: Db, query: str, parameters: Any) -> list[Event]:
    # The columns of db.q._EVENT_COLUMNS: the cursor's two, Event's fields in order, then tags and metadata.
    events = []
    for seq, ident, *fields, tags, metadata in db.execute(query, parameters):
        events.append(Event(EventCursor(seq, ident), *fields, tuple(json.loads(tags)) if tags else (), metadata))  # type: ignore[call-arg]
    return events


def _suppressions_txn(db: Db, query: str, parameters: Any) -> list[Suppression]:
    return [
        Suppression(client, kind, address, created_at, code, error, tuple(json.loads(tags)) if tags else ())
        for client, kind, address, created_at, code, error, tags in db.execute(query, parameters)
    ]


def _add_suppressions_txn(db: Db, entries: list[Suppression]) -> None:
    db.executemany(
        db.q.UPSERT_SUPPRESSION,
        [
            (e.client, e.kind, e.address.lower(), e.code, e.error, json.dumps(list(e.tags)) if e.tags else None, e.created_at)
            for e in entries
        ],
    )


def _rowcount_txn(db: Db, query: str, parameters: Any) -> int:
    return db.execute(query, parameters).rowcount


def _mta_sts_policy_txn(db: Db, domain: str, now: float) -> MTASTSPolicy | None:
    row = db.execute(db.q.MTA_STS_POLICY, (domain, now)).fetchone()
    if row is None:
        return None
    domain, policy_id, mode, mx, max_age, fetched_at = row
    return MTASTSPolicy(domain, policy_id, mode, tuple(mx.split("\n")) if mx else (), int(max_age), float(fetched_at))


def _save_mta_sts_policy_txn(db: Db, policy: MTASTSPolicy) -> None:
    db.execute(
        db.q.SAVE_MTA_STS_POLICY,
        (policy.domain, policy.policy_id, policy.mode, "\n".join(policy.mx), policy.max_age, policy.fetched_at, policy.expires_at),
    )


def _save_backoffs_txn(db: Db, entries: list[Backoff], now: float) -> None:
    db.executemany(
        db.q.SAVE_BACKOFF,
        [(e.kind, e.name, e.sender, e.until, e.reply, e.concurrency, e.updated_at) for e in entries],
    )
    db.execute(db.q.FORGET_ENDED_BACKOFFS, (now,))


def _backoffs_txn(db: Db, now: float) -> list[Backoff]:
    return [
        Backoff(kind, name, sender, float(until), reply, None if concurrency is None else int(concurrency), float(updated_at))
        for kind, name, sender, until, reply, concurrency, updated_at in db.execute(db.q.BACKOFFS, (now,))
    ]


def _webhook(row: tuple[Any, ...]) -> Webhook:
    ident, client, domain, url, events, created_at, cursor_seq, cursor_id = row
    return Webhook(ident, client, domain, url, tuple(json.loads(events)), created_at, EventCursor(cursor_seq, cursor_id))


def _webhooks_txn(db: Db, query: str, parameters: Any) -> list[Webhook]:
    return [_webhook(row) for row in db.execute(query, parameters)]


def _lease_webhooks_txn(db: Db, renew: bool, lease: str, now: float, until: float) -> list[Webhook]:
    shift = db.clock_offset(now)
    parameters = {"lease": lease, "now": now + shift, "until": until + shift}
    return _webhooks_txn(db, db.q.LEASE_WEBHOOKS if renew else db.q.TAKE_WEBHOOKS, parameters)


def _add_webhook_txn(db: Db, webhook: Webhook) -> Webhook:
    (seq,) = db.execute(db.q.FEED_END).fetchone()
    # After every event of every commit so far.
    cursor = EventCursor(seq, LAST_ID)
    try:
        db.execute(
            db.q.INSERT_WEBHOOK,
            (webhook.id, webhook.client, webhook.domain, webhook.url, json.dumps(list(webhook.events)), webhook.created_at, cursor.seq, cursor.id),
        )
    except db.IntegrityError as e:
        raise Conflict(f"a webhook with id {webhook.id} exists") from e
    return attrs.evolve(webhook, cursor=cursor)


def _webhook_key_txn(db: Db, client: str) -> str | None:
    row = db.execute(db.q.WEBHOOK_KEY, (client,)).fetchone()
    return None if row is None else str(row[0])


def _set_webhook_key_txn(db: Db, client: str, key: str, now: float, replace: bool) -> str:
    db.execute(db.q.SET_WEBHOOK_KEY if replace else db.q.ADD_WEBHOOK_KEY, (client, key, now))
    return str(db.execute(db.q.WEBHOOK_KEY, (client,)).fetchone()[0])


def _release_webhooks_txn(db: Db, lease: str, now: float) -> None:
    now += db.clock_offset(now)
    db.execute(db.q.RELEASE_WEBHOOKS, (lease,))
    db.execute(db.q.RELEASE_WEBHOOK_RETRIES, (now, lease))


def _advance_webhook_txn(
    db: Db, webhook_id: str, lease: str, cursor: EventCursor, failed: list[tuple[int, float, float, str]]
) -> bool:
    if db.execute(db.q.ADVANCE_WEBHOOK, (cursor.seq, cursor.id, webhook_id, lease)).rowcount == 0:
        return False
    db.executemany(db.q.INSERT_WEBHOOK_RETRY, [(webhook_id, event_id, first, after, error) for event_id, first, after, error in failed])
    return True


def _due_webhook_retries_txn(db: Db, lease: str, now: float, until: float, limit: int) -> list[WebhookRetry]:
    shift = db.clock_offset(now)
    now, until = now + shift, until + shift
    rows = db.execute(db.q.LEASE_WEBHOOK_RETRIES, {"lease": lease, "now": now, "until": until, "limit": limit}).fetchall()
    if not rows:
        return []
    hooks = {w.id: w for w in _webhooks_txn(db, db.q.WEBHOOKS_AMONG, (json.dumps(sorted({r[0] for r in rows})),))}
    events = {e.cursor.id: e for e in _events_txn(db, db.q.EVENTS_BY_ID, (json.dumps(sorted({r[1] for r in rows})),))}
    retries = [
        WebhookRetry(hooks[hook_id], events[event_id], attempts, first_attempt, until, last_error)
        for hook_id, event_id, attempts, first_attempt, last_error in rows
        if hook_id in hooks and event_id in events
    ]
    return sorted(retries, key=lambda r: (r.first_attempt, r.event.cursor))


def _flush_webhook_retries_txn(db: Db, now: float, webhook_ids: list[str] | None) -> tuple[int, int]:
    selection = {"now": now, "ids": None if webhook_ids is None else json.dumps(sorted(set(webhook_ids)))}
    flushed = db.execute(db.q.FLUSH_WEBHOOK_RETRIES, selection).rowcount
    (in_delivery,) = db.execute(db.q.COUNT_WEBHOOK_RETRIES_IN_DELIVERY, selection).fetchone()
    return flushed, in_delivery


def _finish_webhook_retries_txn(
    db: Db, results: list[tuple[WebhookRetry, float | None, str | None]], lease: str
) -> None:
    for retry, next_attempt, error in results:
        key = (retry.webhook.id, retry.event.cursor.id, lease)
        if next_attempt is None:
            db.execute(db.q.DELETE_WEBHOOK_RETRY, key)
        else:
            db.execute(db.q.WEBHOOK_RETRY_AGAIN, (next_attempt, error, *key))


def _events_page_txn(db: Db, descending: bool, parameters: dict[str, Any]) -> tuple[list[Event], EventCursor]:
    if descending:
        events = _events_txn(db, db.q.EVENTS_PAGE_BEFORE, parameters)
    else:
        # Read first, in this transaction's snapshot: no commit numbered up to it can appear later.
        (feed_seq,) = db.execute(db.q.FEED_END).fetchone()
        events = _events_txn(db, db.q.EVENTS_PAGE_AFTER, parameters)
    if len(events) == parameters["limit"]:
        return events, events[-1].cursor
    (scanned,) = db.execute(db.q.EVENTS_SCANNED_COUNT_BEFORE if descending else db.q.EVENTS_SCANNED_COUNT_AFTER, parameters).fetchone()
    if scanned == parameters["scan"]:
        seq, ident = db.execute(db.q.EVENTS_SCANNED_LAST_BEFORE if descending else db.q.EVENTS_SCANNED_LAST_AFTER, parameters).fetchone()
        return events, EventCursor(seq, ident)
    if descending:
        return events, EventCursor(0, 0)
    return events, max(EventCursor(feed_seq, LAST_ID), EventCursor(parameters["seq"], parameters["id"]))

