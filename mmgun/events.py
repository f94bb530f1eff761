"""
Mailgun's event-data: the one JSON form of an :class:`mmgun.store.Event`, for the events
APIs (``GET /v3/{domain}/events``, ``GET /events``) and for the webhooks, which POST it
as ``{"signature": ..., "event-data": ...}``.

The fields are Mailgun's names and types, so that what reads Mailgun's events (anymail's
``MailgunTrackingWebhookView``, Mailgun's SDKs, hand-written handlers) reads mmgun's:

- ``id`` (the event's feed cursor: unique and stable), ``event`` (accepted, delivered,
  failed), ``timestamp`` (float seconds), ``log-level`` (info, warn for a temporary
  failure, error for a permanent one), ``recipient``, ``recipient-domain``, ``tags``,
  ``user-variables`` (the submission's metadata), ``message.headers.message-id`` (without
  its angle brackets, as Mailgun gives it), ``envelope`` (``sender``, ``targets``,
  ``transport``), ``flags.is-test-mode``;
- delivered and failed: ``delivery-status`` — ``code`` (the SMTP reply's code, an int),
  ``message`` (the reply without its code), ``description`` (why, in mmgun's words, when
  no SMTP reply said it), ``mx-host``, ``attempt-no``, ``enhanced-code``;
- failed: ``severity`` (temporary, permanent) and ``reason`` (generic for a temporary
  failure; bounce, generic, expired, deleted, suppress-bounce, suppress-complaint or
  suppress-unsubscribe for a permanent one).

mmgun's own fields: ``submission-id`` (the id ``POST /send`` answered).
"""

from __future__ import annotations

import json
import re
from typing import Any

from .store import Event

#: Mailgun's codes for a recipient it did not try because of a suppression list.
SUPPRESSED_CODES = {"suppress-bounce": 605, "suppress-unsubscribe": 606, "suppress-complaint": 607}

_REPLY = re.compile(r"\A([2-5]\d\d)(?:[ -](.*))?\Z", re.DOTALL)
_ENHANCED = re.compile(r"\A([245]\.\d{1,3}\.\d{1,3})\b")
#: mmgun's own words around an MX's reply: "expired: …; last reply: 451 4.3.0 …".
_LAST_REPLY = re.compile(r"last reply: ([2-5]\d\d(?:[ -].*)?)\Z", re.DOTALL)


def _log_level(event: Event) -> str:
    if event.event != "failed":
        return "info"
    return "warn" if event.severity == "temporary" else "error"


def delivery_status(event: Event) -> dict[str, Any]:
    """
    Mailgun's ``delivery-status`` of a delivered or failed event. An SMTP reply
    ("550 5.1.1 no such user") gives ``code`` 550, ``enhanced-code`` "5.1.1" and ``message``
    "5.1.1 no such user"; mmgun's own words (expired, deleted by operator, suppressed)
    are the ``description``, with the code of the last SMTP reply they quote, Mailgun's
    605/606/607 for a suppressed address, else 0.
    """
    reply = event.reply or ""
    code = 0
    message = ""
    description = ""
    smtp = _REPLY.match(reply)
    if smtp is not None:
        code, message = int(smtp.group(1)), smtp.group(2) or ""
    else:
        description = reply
        quoted = _LAST_REPLY.search(reply)
        if quoted is not None:
            last = _REPLY.match(quoted.group(1))
            if last is not None:
                code, message = int(last.group(1)), last.group(2) or ""
        elif event.reason in SUPPRESSED_CODES:
            code = SUPPRESSED_CODES[event.reason]
    enhanced = _ENHANCED.match(message)
    return {
        "code": code,
        "message": message,
        "description": description,
        "mx-host": event.mx_host,
        "attempt-no": event.attempt,
        "enhanced-code": enhanced.group(1) if enhanced else None,
    }


def event_data(event: Event) -> dict[str, Any]:
    """``event`` as Mailgun's event-data (see the module's docstring for each field)."""
    message_id = event.message_id
    if message_id is not None and message_id.startswith("<") and message_id.endswith(">"):
        message_id = message_id[1:-1]
    test_mode = event.reason == "testmode"
    data: dict[str, Any] = {
        "id": str(event.cursor),
        "event": event.event,
        "timestamp": event.created_at,
        "log-level": _log_level(event),
        "recipient": event.recipient,
        "recipient-domain": event.recipient.rpartition("@")[2].lower(),
        "tags": list(event.tags),
        "user-variables": json.loads(event.metadata) if event.metadata else {},
        "message": {"headers": {"message-id": message_id}},
        "envelope": {"sender": event.sender, "targets": event.recipient, "transport": "smtp"},
        "flags": {"is-test-mode": test_mode},
        "submission-id": event.submission_id,
    }
    if event.event in ("delivered", "failed"):
        data["delivery-status"] = delivery_status(event)
    if event.event == "failed":
        data["severity"] = event.severity
        # Mailgun gives a temporary failure a reason too ("generic"), and anymail reads it.
        data["reason"] = event.reason or "generic"
    return data
