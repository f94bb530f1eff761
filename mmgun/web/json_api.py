"""
The seed's JSON API: ``GET /``, ``POST /send``, ``POST /status``, ``GET /healthz``,
``GET /metrics`` (routed by :mod:`.app`). Its shapes are a contract (docs/openapi.yaml):
every answer is JSON, and every error ``{"result": "error", "message": ...}`` with the
right status code (:func:`error_document`); an error changes nothing.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import attrs
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource

from ..health import Health, database_problem
from ..message import BadRequest, check_fields, parse_json_object, parse_send
from ..metrics import Metrics
from ..store import Store, SubmissionState
from .errors import HTTPError, json_response
from .events_api import EventsAPI
from .mailgun import _MSG_ID as MESSAGE_ID
from .settings import WebSettings
from .site import read_body
from .submit import NO_CLIENT_ID, Pipeline, idempotency_key
from .suppressions_api import JSONSuppressions

API_VERSION = "1"
STATUS_FIELDS = ("submission_id", "message_id")
#: Longer than any Message-ID mmgun makes (make_msgid's are about 60 characters and a host name).
MAX_MESSAGE_ID = 998


def error_document(message: str) -> dict[str, Any]:
    """The JSON API's shape of an error."""
    return {"result": "error", "message": message}


def iso8601(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def status_document(state: SubmissionState, *more: SubmissionState) -> dict[str, Any]:
    """
    One submission's status; with ``more`` (the submissions of one batch send, found by
    their shared Message-ID), one document: every recipient of them all, in order.
    """
    if more:
        recipients = tuple(r for s in (state, *more) for r in s.recipients)
        state = attrs.evolve(state, recipients=recipients)
    return {
        "result": "success",
        "status": state.status,
        "tags": list(state.tags),
        "metadata": json.loads(state.metadata) if state.metadata else {},
        "send_at": iso8601(state.send_at) if state.send_at is not None else None,
        "recipients": [
            {
                "address": r.address,
                "status": r.status,
                "attempts": r.attempts,
                "last_reply": r.last_reply,
                "updated_at": iso8601(r.updated_at),
            }
            for r in state.recipients
        ],
    }


def _looks_like_id(value: str) -> bool:
    return len(value) == 32 and all(c in "0123456789abcdef" for c in value)


class JSONAPI:
    """The JSON API's handlers; each answers a body, or raises for :mod:`.errors` to answer."""

    def __init__(
        self,
        pipeline: Pipeline,
        store: Store,
        settings: WebSettings,
        *,
        metrics: Metrics,
        health: Health | None,
        wall: Callable[[], float],
    ) -> None:
        #: Wall-clock time: /status tells scheduled recipients by it.
        self._wall = wall
        self._pipeline = pipeline
        self._store = store
        self._settings = settings
        self._metrics = metrics
        #: Whether this process can accept mail now (free space, the database's file); None: ask only the store.
        self._health = health
        self._events = EventsAPI(pipeline, store)
        #: issue 14: /suppressions (routed by .app with its own methods).
        self.suppressions = JSONSuppressions(pipeline, store, wall=wall)

    async def index(self, request: IRequest) -> bytes:
        return json_response(
            request,
            200,
            {
                "service": "mmgun",
                "api_version": API_VERSION,
                "endpoints": {"POST /send": "queue a message", "POST /status": "a submission's status"},
            },
        )

    async def send(self, request: IRequest) -> bytes:
        """POST /send: the one route that has to be fast (see :class:`.app.Root`)."""
        obj = self._read_json(request)
        client = await self._pipeline.authenticate(request, obj.pop("client_id", NO_CLIENT_ID))
        key = idempotency_key(request)
        send = parse_send(obj, self._settings.max_recipients)
        submission_id = await self._pipeline.submit(client, send, key)
        return json_response(request, 200, {"result": "queued", "submission_id": submission_id})

    async def status(self, request: IRequest) -> bytes:
        obj = self._read_json(request)
        client = await self._pipeline.authenticate(request, obj.pop("client_id", NO_CLIENT_ID))
        check_fields(obj, STATUS_FIELDS, ())
        if not obj:
            raise BadRequest("missing field 'submission_id' (or 'message_id')")
        if len(obj) > 1:
            raise BadRequest("give either field 'submission_id' or field 'message_id', not both")
        ((field, value),) = obj.items()
        if not isinstance(value, str):
            raise BadRequest(f"field {field!r} must be a string")
        if field == "message_id":
            # The Message-ID the v3 API answers ("<...@host>"); accepted without its brackets too.
            message_id = value if value.startswith("<") else f"<{value}>"
            states = []
            # Only a Message-ID's shape can find one (and text the database cannot
            # encode, a lone surrogate, never reaches it).
            if len(message_id) <= MAX_MESSAGE_ID and MESSAGE_ID.fullmatch(message_id):
                states = await self._store.submissions_by_message_id(client, message_id, now=self._wall())
            if not states:
                raise HTTPError(404, "no such submission")
            return json_response(request, 200, status_document(*states))
        state = None
        if _looks_like_id(value):
            state = await self._store.submission(client, value, now=self._wall())
        if state is None:
            raise HTTPError(404, "no such submission")
        return json_response(request, 200, status_document(state))

    async def healthz(self, request: IRequest) -> bytes:
        """200 only if this process can accept mail now (see :class:`mmgun.health.Health`); else 503 with the reason."""
        if self._health is not None:
            problem = await self._health.check()
        else:
            problem = await database_problem(self._store)
        if problem is not None:
            return json_response(request, 503, {"status": "unavailable", "message": problem})
        return json_response(request, 200, {"status": "ok"})

    async def events(self, request: IRequest) -> bytes:
        """GET /events?after=CURSOR&limit=N: the caller's event feed (issue 14; :mod:`.events_api`)."""
        return await self._events.feed(request)

    def prometheus(self, request: IRequest) -> IResource:
        """GET /metrics: prometheus_client's resource renders it (from a thread)."""
        from prometheus_client.twisted import MetricsResource

        return MetricsResource(self._metrics.registry)

    def _read_json(self, request: IRequest) -> dict[str, Any]:
        return parse_json_object(read_body(request, self._settings.max_message_size))
