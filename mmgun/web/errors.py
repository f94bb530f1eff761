"""
The one place that turns a failure into an answer — a status code, a message safe to
show the client, and headers (:class:`ErrorAnswer`) — for every API on the port. Each
API gives the answer its own shape (:data:`ErrorShape`): the JSON API
``{"result": "error", "message": ...}``, a Mailgun-compatible one ``{"message": ...}``.

Anything not listed in :func:`error_answer` is a bug: a 500 that says nothing more, logged
with its traceback.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from typing import Any

import attrs
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest

from ..message import BadRequest
from ..store import DatabaseFull, DatabaseGone, DatabaseUnavailable, IdempotencyConflict, StorageError, Store
from .signing import SenderRefused

_log = Logger()

#: Retry-After of a 503: the database cannot take a submission now (full, gone, read-only, low on space).
STORAGE_RETRY_AFTER = 30
#: The ``reason`` label of mmgun_submissions_rejected_total, by status code.
REASONS = {
    400: "invalid",
    401: "unauthorized",
    403: "sender_refused",
    404: "not_found",
    405: "method",
    409: "idempotency_conflict",
    413: "too_large",
    429: "rate_limited",
    500: "internal",
    503: "unavailable",
}


class HTTPError(Exception):
    """An answer decided by the handler: ``code`` with ``message`` (shown to the client) and ``headers``."""

    def __init__(self, code: int, message: str, headers: Mapping[bytes, bytes] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.headers: Mapping[bytes, bytes] = headers or {}


def too_many(message: str, wait: float) -> HTTPError:
    """429, to be retried after ``wait`` seconds (rounded up, at least 1)."""
    return HTTPError(429, message, {b"Retry-After": str(max(1, math.ceil(wait))).encode("ascii")})


def unavailable(message: str) -> HTTPError:
    """503: this process cannot take a submission now; retry later."""
    return HTTPError(503, message, {b"Retry-After": str(STORAGE_RETRY_AFTER).encode("ascii")})


def unauthorized() -> HTTPError:
    """401, saying nothing more (which credential, or why)."""
    return HTTPError(401, "authentication failed", {b"WWW-Authenticate": b'Basic realm="mmgun", charset="UTF-8"'})


def no_such_endpoint() -> HTTPError:
    return HTTPError(404, "no such endpoint")


def method_not_allowed(method: bytes, allowed: tuple[bytes, ...]) -> HTTPError:
    return HTTPError(
        405, f"method {method.decode('ascii', 'replace')} not allowed here", {b"Allow": b", ".join(allowed)}
    )


@attrs.frozen
class ErrorAnswer:
    code: int
    message: str
    headers: Mapping[bytes, bytes] = attrs.field(factory=dict)

    @property
    def reason(self) -> str:
        """Its label in mmgun_submissions_rejected_total."""
        return REASONS.get(self.code, str(self.code))


def error_answer(failure: Failure, store: Store, path: bytes) -> ErrorAnswer:
    """
    What to answer a request for ``path`` that failed with ``failure``: 4xx for the
    client's mistakes, 503 when the database cannot take it now, else 500 (logged).
    """
    error = failure.value
    if isinstance(error, HTTPError):
        return ErrorAnswer(error.code, error.message, error.headers)
    if isinstance(error, BadRequest):
        # 400, or 413 for a message that would be larger than --max-message-size once built.
        return ErrorAnswer(error.status, str(error))
    if isinstance(error, SenderRefused):
        # The sender policy (--sender-policy domains): the message names the sender's domain.
        return ErrorAnswer(403, str(error))
    if isinstance(error, IdempotencyConflict):
        return ErrorAnswer(409, "Idempotency-Key was already used with a different request")
    if isinstance(error, StorageError):
        # Rolled back: nothing was acknowledged, and the client may retry. A lasting
        # cause (a full disk, a deleted database) was logged once by the store.
        if store.write_problem() is None:
            _log.warn("storage error handling {path}: {error}", path=path.decode("ascii", "replace"), error=str(error))
        return ErrorAnswer(503, _storage_message(error), {b"Retry-After": str(STORAGE_RETRY_AFTER).encode("ascii")})
    _log.failure("internal error handling {path}", failure, path=path.decode("ascii", "replace"))
    return ErrorAnswer(500, "internal error")


def _storage_message(error: StorageError) -> str:
    if isinstance(error, DatabaseFull):
        return "cannot store messages now: the disk is full; try again later"
    if isinstance(error, (DatabaseGone, DatabaseUnavailable)):
        return "cannot store messages now: the database is unavailable; try again later"
    return "cannot store messages now; try again later"


#: An API's error document for a message.
ErrorShape = Callable[[str], dict[str, Any]]


def render_error(request: IRequest, answer: ErrorAnswer, shape: ErrorShape) -> bytes:
    """Sets the answer's code and headers on ``request``; the body in the API's ``shape``."""
    for name, value in answer.headers.items():
        request.setHeader(name, value)
    return json_response(request, answer.code, shape(answer.message))


def json_response(request: IRequest, code: int, document: dict[str, Any]) -> bytes:
    """Sets ``code`` and the JSON headers on ``request``; the body (one line)."""
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Cache-Control", b"no-store")
    return json.dumps(document).encode("utf-8") + b"\n"
