"""
What every API on the port does with a submission once it has read it, whatever its
wire format: authenticate the caller, admit the submission (free space, rate limit,
queue caps), build the message, store it (with its Idempotency-Key), count and log it.
An API reads its request, calls :meth:`Pipeline.authenticate`, parses, then calls
:meth:`Pipeline.submit`; failures are raised for :mod:`.errors` to answer.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.iweb import IRequest

from ..auth import AuthenticationFailed, Authenticator, KeyFailures
from ..clients import Clients
from ..health import Health
from ..limits import QueueCap, RateLimiter
from ..message import BadRequest, SendRequest, build_message
from ..metrics import Metrics
from ..store import NewSubmission, Store
from .errors import too_many, unauthorized, unavailable
from .settings import WebSettings
from .site import source_key

_log = Logger()

MAX_IDEMPOTENCY_KEY = 255
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
    ) -> None:
        self._store = store
        self._settings = settings
        self._metrics = metrics
        self._wall = wall if wall is not None else clock.seconds
        self._auth = Authenticator(store, clients, clock, self._wall)
        self._rate = RateLimiter(settings.rate_limit, settings.rate_burst, clock)
        self._queue_cap = queue_cap
        # Ten failures in a row, then one try every six seconds, per source address.
        self._auth_failures = auth_failures if auth_failures is not None else RateLimiter(10 / 60, 10, clock)
        self._key_failures = KeyFailures(clock)
        #: Whether this process can accept mail now (free space); None: ask only the store.
        self._health = health

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
          warning naming the key id); from a blocked address it answers 429.
        - A ``client_id`` of the deprecated clients file may be short and chosen by a
          person: from a blocked address it is not even checked (429), or the block
          would not slow the guessing down. A client using one behind a shared address
          can be locked out by a neighbour's failures: one more reason to move to keys.
        """
        address = source_key(request.getClientAddress()) or "local"
        authorization = request.getHeader(b"authorization")
        if authorization is not None and client_id is not NO_CLIENT_ID:
            raise BadRequest("use either an Authorization header or the client_id field, not both")
        if authorization is None:
            wait = self._auth_failures.blocked(address)
            if wait:
                raise too_many("too many failed authentication attempts", wait)
        try:
            return await self._auth.authenticate(authorization, None if client_id is NO_CLIENT_ID else client_id)
        except AuthenticationFailed as e:
            if e.key_id is not None:
                self._key_failures.failed(e.key_id, address)
            wait = self._auth_failures.take(address)
            if wait:
                raise too_many("too many failed authentication attempts", wait) from None
            raise unauthorized() from None

    async def submit(self, client: str, send: SendRequest, key: str | None) -> str:
        """
        Admit, build and store ``send`` for ``client``; the submission's id (an earlier
        one's for a replay of ``key``). Raises what :func:`.errors.error_answer` answers:
        503 (no room now), 429 (rate limit, queue caps), 409 (``key`` used for another
        request), StorageError.
        """
        now = self._wall()
        send_at = send.schedule(now)  # 400 when more than 7 days ahead: before any limit is spent
        if self._health is not None:
            problem = self._health.admission()
            if problem is not None:
                raise unavailable(f"cannot queue messages now: {problem}")
        wait = self._rate.take(client)
        if wait:
            raise too_many("rate limit exceeded for this client", wait)
        message = build_message(send, hostname=self._settings.hostname, now=now, max_size=self._settings.max_message_size)
        if self._queue_cap is not None:
            refused = self._queue_cap.admit(client, len(send.recipients), len(message))
            if refused is not None:
                raise too_many(refused, self._queue_cap.step)
        submission = NewSubmission(
            id=os.urandom(16).hex(),
            client=client,
            sender=send.sender,
            recipients=send.recipients,
            message=message,
            created_at=now,
            idempotency_key=key,
            request_hash=send.digest() if key is not None else None,
            send_at=send_at,
            tags=send.tags,
            metadata=send.metadata,
        )
        try:
            submission_id = await self._store.add_submission(submission)
        except BaseException:
            if self._queue_cap is not None:
                self._queue_cap.forget(client, len(send.recipients), len(message))
            raise
        if submission_id != submission.id and self._queue_cap is not None:
            self._queue_cap.forget(client, len(send.recipients), len(message))  # a replay queues nothing
        if submission_id == submission.id:
            self._metrics.accepted.inc()
            _log.info(
                "accepted submission {submission} from {client}: {recipients} recipients",
                submission=submission_id,
                client=client,
                recipients=len(send.recipients),
            )
        else:
            _log.info("idempotent replay of submission {submission} from {client}", submission=submission_id, client=client)
        return submission_id
