"""
The event log's two read APIs (issue 14), on the store's gap-free feed
(:meth:`mmgun.store.Store.events`), each event in Mailgun's event-data form
(:func:`mmgun.events.event_data`):

- ``GET /v3/{domain}/events`` and ``GET /v3/{domain}/events/{page}`` (Mailgun's; routed by
  :mod:`.mailgun`, which checks that ``{domain}`` is the caller's): the events of mail
  from that sending domain, a page at a time, ``{"items": [...], "paging": {"first",
  "next", "previous", "last"}}`` with absolute URLs. The query's filters and direction
  travel in the opaque page token of each URL, with the position it stands for.
- ``GET /events?after=CURSOR&limit=N`` (the JSON API's; routed by :mod:`.app`): the
  caller's events of every domain after ``CURSOR``, ``{"items": [...], "next": CURSOR}``,
  ``next`` the cursor to pass as ``after`` next time — the last item's, or ``after``
  itself when there was none, so that a poller loops without a gap.

Both read only the caller's events, in feed (commit) order: an event that commits later
never appears before one that committed earlier, so a reader following ``next`` (or the
``next`` URLs of an ascending query) sees every event once.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any

from twisted.web.iweb import IRequest

from ..events import event_data
from ..message import BadRequest, parse_date
from ..store import FEED_END, FEED_START, Event, EventCursor, Store
from .errors import json_response
from .submit import Pipeline

#: Mailgun's largest page, and its default.
V3_MAX_LIMIT = 300
#: The most events one v3 page's filters look at: a page may hold fewer than its limit (or
#: none) and still have a next page, as Mailgun's may.
V3_SCAN = 10_000
V3_DEFAULT_LIMIT = 100
#: The JSON API's.
FEED_MAX_LIMIT = 1000
FEED_DEFAULT_LIMIT = 100
#: Mailgun's event kinds: those mmgun never produces are accepted as filters and match nothing.
MAILGUN_EVENTS = frozenset(
    {"accepted", "rejected", "delivered", "failed", "opened", "clicked", "unsubscribed", "complained", "stored"}
)
SEVERITIES = frozenset({"temporary", "permanent"})
V3_PARAMETERS = frozenset({"begin", "end", "ascending", "limit", "event", "severity", "recipient"})
FEED_PARAMETERS = frozenset({"after", "limit"})
#: Mailgun's filters that mmgun does not implement: refused (400) rather than silently ignored.
UNSUPPORTED_FILTERS = frozenset(
    {"list", "attachment", "from", "message-id", "subject", "to", "size", "recipients", "tags", "pretty"}
)
_EPOCH = re.compile(r"\A\d{1,12}(\.\d{1,9})?\Z")
_LIMIT = re.compile(r"\A\d{1,6}\Z")
#: A Host header fit to put in a URL: a DNS name or an IP literal, and a port.
_HOST = re.compile(r"\A(?:[A-Za-z0-9](?:[A-Za-z0-9.-]{0,253})|\[[0-9A-Fa-f:.]{2,45}\])(?::\d{1,5})?\Z")
#: A page token is at most this long (filters included).
MAX_TOKEN = 2048


def _parameters(request: IRequest, allowed: frozenset[str]) -> dict[str, str]:
    """The query's parameters, each at most once, UTF-8, and known; 400 otherwise."""
    found: dict[str, str] = {}
    for raw_name, values in (request.args or {}).items():
        try:
            name = raw_name.decode("utf-8")
            texts = [value.decode("utf-8") for value in values]
        except UnicodeDecodeError:
            raise BadRequest("the query is not UTF-8") from None
        if name in UNSUPPORTED_FILTERS and "recipient" in allowed:
            raise BadRequest(f"parameter {name!r} is not supported by mmgun")
        if name not in allowed:
            raise BadRequest(f"unknown parameter {name!r}")
        if len(texts) != 1:
            raise BadRequest(f"parameter {name!r} is given more than once")
        found[name] = texts[0]
    return found


def _limit(value: str | None, default: int, most: int) -> int:
    if value is None:
        return default
    if not _LIMIT.fullmatch(value) or not 1 <= int(value) <= most:
        raise BadRequest(f"parameter 'limit' must be a whole number from 1 to {most}")
    return int(value)


def _time(value: str, name: str) -> float:
    """Epoch seconds ("1733420000", "1733420000.5") or an RFC 2822 date, as Mailgun takes."""
    if _EPOCH.fullmatch(value):
        return float(value)
    try:
        return parse_date(value, name)
    except BadRequest:
        raise BadRequest(f"parameter {name!r} must be epoch seconds or an RFC 2822 date") from None


def _cursor(value: str, name: str) -> EventCursor:
    try:
        return EventCursor.parse(value)
    except ValueError:
        raise BadRequest(f"parameter {name!r} is not an event cursor (give the 'next' of an earlier answer)") from None


class _Page:
    """
    Where a v3 page starts and what it shows; its token is base64url JSON (opaque to the
    client, checked when it comes back). ``ascending``: the walk's direction; ``back``:
    this page is the one before ``position`` in that direction (a ``previous`` URL).
    """

    def __init__(self, position: EventCursor, ascending: bool, back: bool, limit: int, filters: dict[str, Any]) -> None:
        self.position = position
        self.ascending = ascending
        self.back = back
        self.limit = limit
        self.filters = filters

    def token(self) -> str:
        document = {"p": str(self.position), "a": self.ascending, "b": self.back, "l": self.limit, "f": self.filters}
        packed = json.dumps(document, separators=(",", ":"), sort_keys=True).encode("utf-8")
        return base64.urlsafe_b64encode(packed).decode("ascii").rstrip("=")

    @classmethod
    def parse(cls, token: str) -> _Page:
        bad = BadRequest("the page token in the URL is not valid (take the paging URLs of an earlier answer)")
        if len(token) > MAX_TOKEN or not re.fullmatch(r"[A-Za-z0-9_-]+", token):
            raise bad
        try:
            document = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
            if not isinstance(document, dict) or not isinstance(document.get("p"), str):
                raise bad
            position = EventCursor.parse(document["p"])
            ascending, back, limit, filters = document["a"], document["b"], document["l"], document["f"]
        except (ValueError, KeyError, TypeError, binascii.Error):
            raise bad from None
        if not (isinstance(ascending, bool) and isinstance(back, bool) and isinstance(filters, dict)):
            raise bad
        if not (type(limit) is int and 1 <= limit <= V3_MAX_LIMIT):
            raise bad
        checked: dict[str, Any] = {}
        for name, value in filters.items():
            if name in ("event", "severity", "recipient") and isinstance(value, str):
                checked[name] = value
            elif name in ("begin", "end") and type(value) in (int, float):
                checked[name] = float(value)
            else:
                raise bad
        if checked.get("event", "accepted") not in MAILGUN_EVENTS or checked.get("severity", "permanent") not in SEVERITIES:
            raise bad
        return cls(position, ascending, back, limit, checked)

    def moved(self, position: EventCursor, back: bool) -> _Page:
        return _Page(position, self.ascending, back, self.limit, self.filters)


def _first_page(query: dict[str, str]) -> _Page:
    """The page a query without a token asks for: its filters, and a walk from one end."""
    filters: dict[str, Any] = {}
    event = query.get("event")
    if event is not None:
        if event not in MAILGUN_EVENTS:
            raise BadRequest(f"parameter 'event' must be one of {', '.join(sorted(MAILGUN_EVENTS))}")
        filters["event"] = event
    severity = query.get("severity")
    if severity is not None:
        if severity not in SEVERITIES:
            raise BadRequest("parameter 'severity' must be temporary or permanent")
        filters["severity"] = severity
    recipient = query.get("recipient")
    if recipient is not None:
        if not recipient or len(recipient) > 320:
            raise BadRequest("parameter 'recipient' must be an address")
        filters["recipient"] = recipient
    begin = _time(query["begin"], "begin") if "begin" in query else None
    end = _time(query["end"], "end") if "end" in query else None
    ascending_text = query.get("ascending")
    if ascending_text is not None:
        if ascending_text not in ("yes", "no"):
            raise BadRequest("parameter 'ascending' must be yes or no")
        ascending = ascending_text == "yes"
    else:
        # As Mailgun: an end before the beginning walks from the newest; without both, newest first too.
        ascending = begin is not None and end is not None and begin <= end
    if begin is not None and end is not None and end < begin:
        begin, end = end, begin
    if begin is not None:
        filters["begin"] = begin
    if end is not None:
        filters["end"] = end
    limit = _limit(query.get("limit"), V3_DEFAULT_LIMIT, V3_MAX_LIMIT)
    return _Page(FEED_START if ascending else FEED_END, ascending, False, limit, filters)


def _step(position: EventCursor, ascending: bool, *, forward: bool) -> EventCursor:
    """
    The place just after (``forward``) or just before ``position`` in the walk's order: no
    event lies strictly between the two (an event's id within a commit is a whole number),
    so a page bounded by it includes the event at ``position``.
    """
    ident = position.id + (1 if ascending == forward else -1)
    return EventCursor(position.seq, min(max(ident, 0), FEED_END.id))


def _base_url(request: IRequest) -> str:
    """scheme://host[:port] the client reached, from its Host header (else the listening address)."""
    scheme = "https" if request.isSecure() else "http"
    host = request.getHeader(b"host")
    text = host.decode("ascii", "replace") if host is not None else ""
    if not _HOST.fullmatch(text):
        address = request.getHost()
        text = f"{getattr(address, 'host', 'localhost')}:{getattr(address, 'port', 80)}"
    return f"{scheme}://{text}"


class EventsAPI:
    """The handlers; each answers a body, or raises for :mod:`.errors` to answer in its API's shape."""

    def __init__(self, pipeline: Pipeline, store: Store) -> None:
        self._pipeline = pipeline
        self._store = store

    async def feed(self, request: IRequest) -> bytes:
        """``GET /events?after=&limit=``: the caller's events after ``after``, every domain."""
        client = await self._pipeline.authenticate(request)
        query = _parameters(request, FEED_PARAMETERS)
        after = _cursor(query["after"], "after") if query.get("after") else None
        limit = _limit(query.get("limit"), FEED_DEFAULT_LIMIT, FEED_MAX_LIMIT)
        events = await self._store.events(client, start=after, limit=limit)
        following = str(events[-1].cursor) if events else str(after or FEED_START)
        document = {"result": "success", "items": [event_data(e) for e in events], "next": following}
        return json_response(request, 200, document)

    async def v3(self, request: IRequest, client: str, domain: str, token: str | None) -> bytes:
        """
        ``GET /v3/{domain}/events[/{token}]`` for ``client``, whose sending domain ``domain``
        is (the caller checked). A URL with a token takes no query parameters: the token
        holds the query's filters, direction and limit, and where its page starts.
        """
        if token is None:
            page = _first_page(_parameters(request, V3_PARAMETERS))
        else:
            _parameters(request, frozenset())
            page = _Page.parse(token)
        events, reached = await self._read(client, domain, page)
        if events and page.back:
            # Read backwards from the position: the page before this one goes on from where
            # the reading stopped, the next one from this page's last event.
            following = page.moved(events[-1].cursor, False)
            preceding = page.moved(reached, True)
        elif events or reached != page.position:
            # The filters looked at a bounded stretch of the log: the next page goes on from
            # where that stretch ended (past events that did not match), even if it found
            # fewer than the limit — or none.
            following = page.moved(reached, False)
            preceding = page.moved(events[0].cursor, True) if events else page.moved(_step(page.position, page.ascending, forward=True), True)
        elif page.back:
            # Nothing before the position: the previous page is this one again, and the
            # next one starts with the event at the position (if there is one).
            preceding = page
            following = page.moved(_step(page.position, page.ascending, forward=False), False)
        else:
            # Nothing after the position (the tail of a walk): the next page is this one
            # again — Mailgun's polling URL — and the previous one ends with the position's event.
            following = page
            preceding = page.moved(_step(page.position, page.ascending, forward=True), True)
        base = f"{_base_url(request)}/v3/{domain}/events/"
        start = FEED_START if page.ascending else FEED_END
        end = FEED_END if page.ascending else FEED_START
        paging = {
            "first": base + page.moved(start, False).token(),
            "last": base + page.moved(end, True).token(),
            "next": base + following.token(),
            "previous": base + preceding.token(),
        }
        return json_response(request, 200, {"items": [event_data(e) for e in events], "paging": paging})

    async def _read(self, client: str, domain: str, page: _Page) -> tuple[list[Event], EventCursor]:
        """
        The page's events in the walk's order (a ``back`` page reads the other way and turns
        round), and where the reading stopped (:meth:`mmgun.store.Store.events_page`).
        """
        descending = page.ascending == page.back
        filters = page.filters
        events, reached = await self._store.events_page(
            client,
            start=page.position,
            descending=descending,
            limit=page.limit,
            domain=domain,
            event=filters.get("event"),
            severity=filters.get("severity"),
            recipient=filters.get("recipient"),
            begin=filters.get("begin"),
            end=filters.get("end"),
            scan=V3_SCAN,
        )
        return (events[::-1] if page.back else events), reached
