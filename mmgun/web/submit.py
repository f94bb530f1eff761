"""
What every API on the port does with a submission once it has read it, whatever its
wire format: authenticate the caller, admit the submission (free space, rate limit,
sender policy, queue caps), build the message, sign it (DKIM, for the client's own sending
domains: :mod:`.signing`), store it (with its Idempotency-Key), count and log it.
An API reads its request, calls :meth:`Pipeline.authenticate`, parses, then calls
:meth:`Pipeline.submit`; failures are raised for :mod:`.errors` to answer.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from typing import NoReturn

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.iweb import IRequest

from ..auth import AuthenticationFailed, Authenticator, KeyFailures
from ..clients import Clients
from ..health import Health
from ..limits import QueueCap, RateLimiter
from ..message import BadRequest, MessageTooLarge, SendRequest, build_message, new_message_id, schedule
from ..metrics import Metrics
from ..signer import Signer
from ..store import NewSubmission, Store
from .errors import HTTPError, too_many, unauthorized, unavailable
from .settings import WebSettings
from .signing import DomainState, SendingDomains
from .site import source_key

_log = Logger()

MAX_IDEMPOTENCY_KEY = 255
#: A batch's built messages together: at most this many times the maximum message size.
MAX_BATCH_FACTOR = 10
#: :meth:`Pipeline.authenticate`'s ``client_id`` when the request has no such field.
NO_CLIENT_ID: object = object()


def idempotency_key(request: IRequest) -> str | None:
    """The request's Idempotency-Key header, checked; None without one."""
    raw = request.getHeader(b"idempotency-key")
    if raw is None:
        return None
    if not 0 < len(raw) <= MAX_IDEMPOTENCY_KEY or not all(0x20 <= b < 0x7F for b in raw):
        raise BadRequest(f"header 'Idempotency-Key' must be 1 to {MAX_IDEMPOTENCY_KEY} printable ASCII characters")
    return raw.decode("ascii")


class QueueCapReached(HTTPError):
    """
    429: the client's queue caps (``--max-queued``, ``--max-queued-bytes``) are reached;
    answered as any 429 over HTTP, told apart from the rate limit by SMTP (452 4.3.1).
    """

    def __init__(self, message: str, wait: float) -> None:
        answer = too_many(message, wait)
        super().__init__(answer.code, answer.message, answer.headers)


@attrs.frozen
class RawMessage:
    """
    A complete message given by the client (Mailgun's messages.mime), already checked:
    queued as it is for these envelope addresses.
    """

    sender: str
    recipients: tuple[str, ...]
    message: bytes
    tags: tuple[str, ...] = ()
    metadata: str | None = None
    send_at: float | None = None
    #: The addresses of its Sender, Resent-From and Resent-Sender fields: the sender policy checks them too.
    other_senders: tuple[str, ...] = ()
    #: Its From field's address when that may differ from ``sender`` (SMTP's MAIL FROM, a bounce address):
    #: the message is DKIM-signed for this address's domain (DMARC aligns d= with From), not the sender's.
    author: str | None = None


class Pipeline:
    """
    Authentication and admission, shared by every API. ``clients`` is a callable so the
    set can be reloaded while running; ``wall`` (default ``clock.seconds``) is the time
    stored as ``created_at`` and written in the Date header (the reactor's clock is
    monotonic: :mod:`mmgun.clock`).
    """

    def __init__(
        self,
        store: Store,
        clients: Callable[[], Clients],
        clock: IReactorTime,
        settings: WebSettings,
        *,
        metrics: Metrics,
        queue_cap: QueueCap | None = None,
        auth_failures: RateLimiter | None = None,
        health: Health | None = None,
        wall: Callable[[], float] | None = None,
        signer: Signer | None = None,
        wake: Callable[[], None] | None = None,
    ) -> None:
        """
        ``signer`` DKIM-signs messages (:class:`mmgun.signer.SignerProcess`; default: in this process).
        ``wake`` is called after the commit of mail due now (:class:`mmgun.wakeup.Wakeup`).
        """
        self._wake = wake
        self._store = store
        self._settings = settings
        self._metrics = metrics
        self._wall = wall if wall is not None else clock.seconds
        self._auth = Authenticator(store, clients, clock, self._wall)
        self._rate = RateLimiter(settings.rate_limit, settings.rate_burst, clock)
        self._queue_cap = queue_cap
        # Ten failures in a row (by default), then one try every six seconds, per source address.
        failures = settings.max_auth_failures
        self._auth_failures = auth_failures if auth_failures is not None else RateLimiter(failures / 60, failures, clock)
        self._key_failures = KeyFailures(clock)
        #: Whether this process can accept mail now (free space); None: ask only the store.
        self._health = health
        self.domains = SendingDomains(store, clock, policy=settings.sender_policy, signer=signer)

    @property
    def metrics(self) -> Metrics:
        """The process's metrics (SMTP submission counts its refusals there too)."""
        return self._metrics

    async def authenticate(self, request: IRequest, client_id: object = NO_CLIENT_ID) -> str:
        """
        The caller's client label, from the request's Authorization header or else from
        ``client_id`` (the value of the JSON API's deprecated field; a request may not
        carry both: 400). 401 says nothing more.

        Failed attempts are limited per source address (ten in a row, then one every
        six seconds: 429), to slow down guessing without locking out the clients that
        hold valid credentials behind the same address (a NAT, a proxy):

        - An API key is always checked, even from a blocked address, and a valid one is
          admitted. Its secret is 256 random bits: being told whether a guess was right
          helps nobody, so the block need not hide the answer. A failed key attempt
          counts against the address (and, for an existing key id, is logged as a
          warning naming the key id); from a blocked address it answers 429. The store
          reads a blocked address can cause with random key ids are bounded
          (:class:`mmgun.auth.Authenticator`).
        - A ``client_id`` of the deprecated clients file may be short and chosen by a
          person: from a blocked address it is not even checked (429), or the block
          would not slow the guessing down. A client using one behind a shared address
          can be locked out by a neighbour's failures: one more reason to move to keys.
        """
        address = source_key(request.getClientAddress()) or "local"
        authorization = request.getHeader(b"authorization")
        if authorization is not None and client_id is not NO_CLIENT_ID:
            raise BadRequest("use either an Authorization header or the client_id field, not both")
        return await self._authenticate(address, authorization, client_id)

    async def authenticate_key(self, user: str, key: str, address: str) -> str:
        """
        :meth:`authenticate` for a protocol without HTTP requests (SMTP AUTH,
        :mod:`mmgun.submission`): ``key`` (an API key) given by ``user``, which must be
        ``api`` or the key's own client id, from ``address`` (:func:`.site.source_key` of
        the peer). The same keys, revocation and failed-attempt limit per address as
        HTTP; raises the same 401 and 429 :class:`.errors.HTTPError`.
        """
        if not key.isascii():
            key = ""  # no API key: fails as any wrong one does
        # As if sent as a bearer token: the one check of a key, shared with HTTP.
        client = await self._authenticate(address, b"Bearer " + key.encode("ascii"), NO_CLIENT_ID)
        if user not in ("api", client):
            self._failed(address, None)
        return client

    async def _authenticate(self, address: str, authorization: bytes | None, client_id: object) -> str:
        blocked = self._auth_failures.blocked(address)
        if authorization is None and blocked:
            raise too_many("too many failed authentication attempts", blocked)
        try:
            return await self._auth.authenticate(
                authorization, None if client_id is NO_CLIENT_ID else client_id, blocked_source=address if blocked else None
            )
        except AuthenticationFailed as e:
            self._failed(address, e.key_id)

    def _failed(self, address: str, key_id: str | None) -> NoReturn:
        """A failed attempt from ``address`` (with the existing API key id ``key_id``): counted, then 401 or 429."""
        if key_id is not None:
            self._key_failures.failed(key_id, address)
        wait = self._auth_failures.take(address)
        if wait:
            raise too_many("too many failed authentication attempts", wait) from None
        raise unauthorized() from None

    async def submit(
        self,
        client: str,
        send: SendRequest | RawMessage,
        key: str | None,
        *,
        message_id: str | None = None,
        test_mode: bool = False,
        schedule_field: str = "send_at",
    ) -> str:
        """
        Admit, build, sign and store ``send`` for ``client``; the submission's id (an
        earlier one's for a replay of ``key``). Raises what :func:`.errors.error_answer`
        answers: 503 (no room now), 403 (the sender policy), 429 (rate limit, queue caps),
        413 (too large once signed), 409 (``key`` used for another request), StorageError.

        The message is signed before it is stored (:meth:`.signing.SendingDomains.sign`):
        what is queued is final, and no crash can leave it half-signed.

        ``message_id`` (:func:`mmgun.message.new_message_id`) is the message's Message-ID,
        stored with it (/status finds the submission by it); None: a fresh one.
        ``test_mode``: recorded, never delivered (see :class:`mmgun.store.NewSubmission`).
        ``schedule_field`` names ``send_at`` in the error for one too far ahead.
        """
        (submission_id,) = await self._submit(
            client,
            send.sender,
            [send],
            key,
            send.send_at,
            message_id=message_id,
            test_mode=test_mode,
            schedule_field=schedule_field,
            other_senders=send.other_senders if isinstance(send, RawMessage) else (),
        )
        return submission_id

    async def submit_batch(
        self,
        client: str,
        sends: Iterable[SendRequest],
        *,
        sender: str,
        send_at: float | None,
        message_id: str | None = None,
        test_mode: bool = False,
        schedule_field: str = "send_at",
    ) -> list[str]:
        """
        :meth:`submit` for several messages of one request (Mailgun's batch sending), all
        from ``sender`` and to be sent at ``send_at`` (theirs): one rate-limit token, one
        check of the sender policy, every message admitted by the queue caps, all of them
        stored in one transaction or none; they share ``message_id``.

        ``sends`` is iterated once, after admission, and each message built before the next
        is taken: an iterable that makes them on demand (:class:`.mailgun.Batch`) holds one
        at a time, beside the built bytes. Those together may not pass
        :data:`MAX_BATCH_FACTOR` times the maximum message size: 413 as soon as they would,
        before another is made, so a request's memory stays bounded.
        """
        return await self._submit(
            client, sender, sends, None, send_at, message_id=message_id, test_mode=test_mode, schedule_field=schedule_field
        )

    async def _signing_domain(self, state: DomainState, sender: str, send: SendRequest | RawMessage) -> DomainState:
        """
        The domain whose keys sign ``send``: its From's (``author``) when that is not the
        sender's domain, else the sender's (``state``, already looked up). Signed only if
        that domain is the client's (:meth:`.signing.SendingDomains.sign`).
        """
        author = send.author if isinstance(send, RawMessage) else None
        if author is None:
            return state
        domain = author.rpartition("@")[2]
        return state if domain == sender.rpartition("@")[2] else await self.domains.lookup(domain)

    async def _submit(
        self,
        client: str,
        sender: str,
        sends: Iterable[SendRequest | RawMessage],
        key: str | None,
        send_at: float | None,
        *,
        message_id: str | None,
        test_mode: bool,
        schedule_field: str,
        other_senders: Sequence[str] = (),
    ) -> list[str]:
        now = self._wall()
        at = schedule(send_at, now, schedule_field)  # 400 before any limit is spent
        if self._health is not None:
            problem = self._health.admission()
            if problem is not None:
                raise unavailable(f"cannot queue messages now: {problem}")
        # The rate token first: the sender policy reads the store (once per domain, then its
        # cache), so a refused sender spends a token too, or random sender domains would make
        # unlimited store reads and churn the domain cache.
        wait = self._rate.take(client)
        if wait:
            raise too_many("rate limit exceeded for this client", wait)
        domain = await self.domains.admit(client, sender)
        await self.domains.admit_others(client, other_senders)
        hostname = self._settings.hostname
        message_id = message_id if message_id is not None else new_message_id(hostname)
        limit = self._settings.max_message_size
        submissions: list[NewSubmission] = []
        total = 0
        for send in sends:
            if send.sender != sender:
                raise ValueError("the messages of one submission have one sender")
            if isinstance(send, RawMessage):
                message = send.message  # its Message-ID is message_id: the caller checked it
            else:
                message = build_message(send, hostname=hostname, now=now, max_size=limit, message_id=message_id)
            message = await self.domains.sign(client, await self._signing_domain(domain, sender, send), message, now)
            if len(message) > limit:
                raise MessageTooLarge(
                    f"the message would be {len(message)} octets once signed (DKIM), more than the maximum of {limit}"
                )
            total += len(message)
            if total > MAX_BATCH_FACTOR * limit:
                raise MessageTooLarge(
                    f"the messages of this batch would be more than {MAX_BATCH_FACTOR * limit} octets together"
                    f" ({MAX_BATCH_FACTOR} times the maximum message size)"
                )
            submissions.append(
                NewSubmission(
                    id=os.urandom(16).hex(),
                    client=client,
                    sender=send.sender,
                    recipients=send.recipients,
                    message=message,
                    created_at=now,
                    idempotency_key=key,
                    request_hash=send.digest() if key is not None and isinstance(send, SendRequest) else None,
                    send_at=at,
                    tags=send.tags,
                    metadata=send.metadata,
                    message_id=message_id,
                    test_mode=test_mode,
                )
            )
        # A test-mode message queues nothing: the queue caps do not count it.
        cap = None if test_mode else self._queue_cap
        admitted: list[NewSubmission] = []
        if cap is not None:
            for submission in submissions:
                refused = cap.admit(client, len(submission.recipients), len(submission.message))
                if refused is not None:
                    for earlier in admitted:
                        cap.forget(client, len(earlier.recipients), len(earlier.message))
                    raise QueueCapReached(refused, cap.step)
                admitted.append(submission)
        try:
            if len(submissions) == 1:
                ids = [await self._store.add_submission(submissions[0])]
            else:
                ids = await self._store.add_batch(submissions)
        except BaseException:
            for submission in admitted:
                cap.forget(client, len(submission.recipients), len(submission.message))  # type: ignore[union-attr]
            raise
        if self._wake is not None and at is None and not test_mode and any(
            new.id == i for new, i in zip(submissions, ids, strict=True)
        ):
            # Committed and due now: the sender need not wait for its next poll (issue 17).
            self._wake()
        for submission, submission_id in zip(submissions, ids, strict=True):
            if submission_id != submission.id:
                if cap is not None:
                    cap.forget(client, len(submission.recipients), len(submission.message))  # a replay queues nothing
                _log.info("idempotent replay of submission {submission} from {client}", submission=submission_id, client=client)
                continue
            self._metrics.accepted.inc()
            _log.info(
                "accepted submission {submission} from {client}: {recipients} recipients{test}",
                submission=submission_id,
                client=client,
                recipients=len(submission.recipients),
                test=" (test mode: not delivered)" if test_mode else "",
            )
        return ids
