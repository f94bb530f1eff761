"""
Suppression lists over HTTP (issue 14): the addresses a client's mail is no longer sent to,
in three lists — ``bounce`` (the mailbox does not exist: added by the sender when an MX says
so, see :mod:`mmgun.bounces`), ``unsubscribe`` and ``complaint`` (added through these APIs).
A submission's recipient on one of its client's lists is failed at once with ``last_reply``
"suppressed: ..." (:mod:`mmgun.store.sqlite`), while its other recipients proceed.

- :class:`V3Suppressions`: Mailgun's ``/v3/{domain}/bounces``, ``/unsubscribes`` and
  ``/complaints`` (list with Mailgun's paging, get one, add one or many, delete one, delete
  all), routed by :class:`.mailgun.MailgunAPI`. ``{domain}`` must be one of the caller's
  sending domains (404 ``Domain not found`` otherwise, as for ``/messages``); the lists are
  the client's, shared by all of its domains (Mailgun keeps one per domain).
- :class:`JSONSuppressions`: the JSON API's ``GET``, ``POST`` and ``DELETE /suppressions``
  (literal path; the list and the address are query parameters), routed by :mod:`.app`.

Addresses are checked as recipients are (:func:`mmgun.message.normalize_address`) and kept
lower case; a recipient matches case-insensitively. A bad entry is a 4xx naming it and
nothing is stored (a list of entries is stored in one transaction, or not at all).
Authentication: an API key only (no deprecated ``client_id``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Coroutine, Mapping, Sequence
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any
from urllib.parse import quote, urlencode

from twisted.python.failure import Failure
from twisted.web.iweb import IRequest

from ..message import BadRequest, check_tags, normalize_address, parse_date, parse_json
from ..store import SUPPRESSION_KINDS, Store, Suppression
from .errors import ErrorShape, HTTPError, error_answer, json_response, render_error
from .forms import Field, read_form
from .site import read_body
from .submit import Pipeline

#: Mailgun's table names, and the list each is.
TABLES = {"bounces": "bounce", "unsubscribes": "unsubscribe", "complaints": "complaint"}
#: Entries one request may add (Mailgun's limit).
MAX_ENTRIES = 1000
#: A request body: 1000 entries of an address, an error text and tags fit well within.
MAX_BODY = 4 * 1024 * 1024
#: A bounce's error text, in characters.
MAX_ERROR = 1000
#: Tags of one unsubscribe.
MAX_UNSUBSCRIBE_TAGS = 100
#: Mailgun's page size: default and largest; the JSON API's largest.
V3_LIMIT, V3_MAX_LIMIT = 100, 10000
JSON_LIMIT, JSON_MAX_LIMIT = 100, 1000
#: An unsubscribe's tag that stops all mail (also what an unsubscribe without tags shows).
ALL_TAGS = "*"

#: Fields of an entry, per list. Mailgun's own examples send tag/tags with complaints: ignored.
_FIELDS = {
    "bounce": frozenset({"address", "code", "error", "created_at"}),
    "unsubscribe": frozenset({"address", "tag", "tags", "created_at"}),
    "complaint": frozenset({"address", "created_at"}),
}
_IGNORED = {"complaint": frozenset({"tag", "tags"})}
_CODE = re.compile(r"[2-5][0-9][0-9]")
#: A Host header's value as it may go into a paging URL (a name or an IP literal, and a port).
_HOST = re.compile(r"[A-Za-z0-9.-]{1,253}(?::[0-9]{1,5})?|\[[0-9A-Fa-f:.]{2,45}\](?::[0-9]{1,5})?")

# Mailgun's answers (https://documentation.mailgun.com/en/latest/api-suppressions.html).
_TABLE = {"bounce": "bounces", "unsubscribe": "unsubscribes", "complaint": "complaints"}
_NOT_FOUND = {
    "bounce": "Address not found in bounces table",
    "unsubscribe": "Address not found in unsubscribers table",
    "complaint": "No spam complaints found for this address",
}
_REMOVED = {
    "bounce": "Bounced address has been removed",
    "unsubscribe": "Unsubscribe event has been removed",
    "complaint": "Spam complaint has been removed",
}
_CLEARED = {
    "bounce": "Bounced addresses for this domain have been removed",
    "unsubscribe": "Unsubscribe addresses for this domain have been removed",
    "complaint": "Complaint addresses for this domain have been removed",
}


def _added(kind: str, count: int | None) -> str:
    """Mailgun's answer to an add: of one entry (``count`` None), or of several."""
    if count is None:
        return f"Address has been added to the {_TABLE[kind]} table"
    if kind == "complaint":
        return f"{count} complaint addresses have been added to the complaints table"
    return f"{count} addresses have been added to the {_TABLE[kind]} table"


# -- entries ---------------------------------------------------------------------------------


def suppression_address(value: Any, field: str) -> str:
    """An address as the lists keep it: checked as a recipient is, then lower case."""
    if not isinstance(value, str):
        raise BadRequest(f"field {field!r} must be a string")
    return normalize_address(value, field).lower()


def _text(value: Any, field: str, most: int) -> str:
    if not isinstance(value, str):
        raise BadRequest(f"field {field!r} must be a string")
    if len(value) > most or any(not c.isprintable() for c in value):
        raise BadRequest(f"field {field!r} must be at most {most} printable characters")
    return value


def _code(value: Any, field: str) -> str:
    text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(text, str) or not _CODE.fullmatch(text):
        raise BadRequest(f"field {field!r} must be an SMTP reply code (three digits, like 550)")
    return text


def _tags(value: Any, field: str) -> tuple[str, ...]:
    """An unsubscribe's tags; () for all mail ("*" among them, or none given)."""
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or len(values) > MAX_UNSUBSCRIBE_TAGS:
        raise BadRequest(f"field {field!r} must be a tag or a list of at most {MAX_UNSUBSCRIBE_TAGS} tags")
    tags: dict[str, None] = {}
    for i, tag in enumerate(values):
        tags.update(dict.fromkeys(check_tags([tag], f"{field}[{i}]")))
    return () if not tags or ALL_TAGS in tags else tuple(tags)


def make_entry(client: str, kind: str, values: Mapping[str, Any], prefix: str, now: float) -> Suppression:
    """
    One entry of ``kind``'s list from ``values`` (field name to JSON value), each checked;
    errors name the field as ``prefix`` + name. ``created_at`` defaults to ``now``.
    """
    for name in values:
        if name not in _FIELDS[kind] and name not in _IGNORED.get(kind, ()):
            raise BadRequest(f"unknown field {prefix + name!r} (a {kind} has {', '.join(sorted(_FIELDS[kind]))})")
    if "address" not in values:
        raise BadRequest(f"missing field {prefix + 'address'!r}")
    address = suppression_address(values["address"], prefix + "address")
    created_at = now
    if values.get("created_at") is not None:
        created_at = parse_date(values["created_at"], prefix + "created_at")
    if kind == "bounce":
        code = _code(values["code"], prefix + "code") if values.get("code") is not None else "550"
        error = _text(values["error"], prefix + "error", MAX_ERROR) if values.get("error") is not None else None
        return Suppression(client, kind, address, created_at, code=code, error=error or None)
    if kind == "unsubscribe":
        if "tag" in values and "tags" in values:
            raise BadRequest(f"give field {prefix + 'tag'!r} or field {prefix + 'tags'!r}, not both")
        given = values.get("tags", values.get("tag"))
        tags = _tags(given, prefix + ("tags" if "tags" in values else "tag")) if given is not None else ()
        return Suppression(client, kind, address, created_at, tags=tags)
    return Suppression(client, kind, address, created_at)


def _entries(client: str, kind: str, items: Any, prefix: str, now: float) -> list[Suppression]:
    if not isinstance(items, list) or not items:
        raise BadRequest(f"field {prefix or 'body'!r} must be a non-empty list of entries")
    if len(items) > MAX_ENTRIES:
        raise BadRequest(f"at most {MAX_ENTRIES} entries at once, not {len(items)}")
    entries = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise BadRequest(f"entry {prefix}[{i}] must be a JSON object")
        entries.append(make_entry(client, kind, item, f"{prefix}[{i}].", now))
    return entries


def query(request: IRequest, allowed: Sequence[str]) -> dict[str, str]:
    """The query parameters, each at most once and UTF-8; 400 for any other than ``allowed``."""
    parameters: dict[str, str] = {}
    for raw_name, values in (request.args or {}).items():
        try:
            name = raw_name.decode("utf-8")
            texts = [value.decode("utf-8") for value in values]
        except UnicodeDecodeError:
            raise BadRequest("the query string is not valid UTF-8") from None
        if name not in allowed:
            raise BadRequest(f"unknown parameter {name!r} (this endpoint takes {', '.join(allowed)})")
        if len(texts) != 1:
            raise BadRequest(f"parameter {name!r} is given more than once")
        parameters[name] = texts[0]
    return parameters


def limit_parameter(value: str | None, default: int, most: int) -> int:
    if value is None:
        return default
    if not (value.isascii() and value.isdigit() and len(value) <= 6 and 1 <= int(value) <= most):
        raise BadRequest(f"parameter 'limit' must be a number from 1 to {most}")
    return int(value)


def _rfc2822(timestamp: float) -> str:
    """Mailgun's dates: "Fri, 21 Oct 2011 11:02:55 UTC"."""
    return format_datetime(datetime.fromtimestamp(int(timestamp), UTC), usegmt=True).removesuffix("GMT") + "UTC"


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def answering(request: IRequest, work: Coroutine[Any, Any, bytes], store: Store, shape: ErrorShape) -> bytes:
    """
    ``work``'s answer, or its failure answered in the API's ``shape`` through the one mapping
    (:func:`.errors.error_answer`) — here, not by the app's error handler, which counts every
    error as a refused submission.
    """
    try:
        return await work
    except Exception:
        return render_error(request, error_answer(Failure(), store, request.path), shape)


# -- Mailgun's v3 API -----------------------------------------------------------------------


class V3Suppressions:
    """Mailgun's suppression endpoints, answered in Mailgun's shapes (errors in ``shape``)."""

    def __init__(self, pipeline: Pipeline, store: Store, *, wall: Callable[[], float], shape: ErrorShape) -> None:
        self._pipeline = pipeline
        self._store = store
        self._wall = wall
        self._shape = shape

    def table(self, request: IRequest, domain: str, table: str) -> Coroutine[Any, Any, bytes]:
        """``/v3/{domain}/{table}``: GET a page, POST entries, DELETE them all."""
        return answering(request, self._table(request, domain, TABLES[table]), self._store, self._shape)

    def entry(self, request: IRequest, domain: str, table: str, address: str) -> Coroutine[Any, Any, bytes]:
        """``/v3/{domain}/{table}/{address}``: GET or DELETE one entry."""
        return answering(request, self._entry(request, domain, TABLES[table], address), self._store, self._shape)

    async def _client(self, request: IRequest, domain: str) -> str:
        client = await self._pipeline.authenticate(request)
        try:
            name = normalize_address(f"postmaster@{domain}", "domain").rpartition("@")[2]
        except BadRequest:
            raise BadRequest(f"the domain in the URL ({domain!r}) is not a valid domain name") from None
        # Mailgun's answer for a domain not in the account: the same for another client's.
        if not await self._pipeline.domains.owned(client, name):
            raise HTTPError(404, f"Domain not found: {name}")
        return client

    async def _table(self, request: IRequest, domain: str, kind: str) -> bytes:
        client = await self._client(request, domain)
        if request.method == b"POST":
            return await self._add(request, client, kind)
        if request.method == b"DELETE":
            query(request, ())
            await self._store.clear_suppressions(client, kind)
            return json_response(request, 200, {"message": _CLEARED[kind]})
        return await self._page(request, client, kind, domain)

    async def _page(self, request: IRequest, client: str, kind: str, domain: str) -> bytes:
        parameters = query(request, ("page", "address", "limit"))
        limit = limit_parameter(parameters.get("limit"), V3_LIMIT, V3_MAX_LIMIT)
        page = parameters.get("page", "first")
        pivot = parameters.get("address")
        if page not in ("first", "last", "next", "previous", "prev"):
            raise BadRequest("parameter 'page' must be first, next, previous or last")
        if page in ("first", "last") and pivot is not None:
            raise BadRequest(f"parameter 'address' goes with page=next or page=previous, not page={page}")
        if page not in ("first", "last") and pivot is None:
            raise BadRequest(f"parameter 'address' is required with page={page}")
        after = pivot.lower() if pivot is not None else None
        if page in ("first", "next"):
            entries = await self._store.suppressions(client, kind, after=after, limit=limit)
        else:
            entries = await self._store.suppressions(client, kind, after=after, limit=limit, descending=True)
            entries.reverse()
        first = entries[0].address if entries else (after or "")
        last = entries[-1].address if entries else (after or "")
        base = f"{_base_url(request)}/v3/{quote(domain, safe='')}/{_TABLE[kind]}?"
        return json_response(
            request,
            200,
            {
                "items": [v3_item(entry) for entry in entries],
                "paging": {
                    "first": base + urlencode({"page": "first", "limit": limit}),
                    "last": base + urlencode({"page": "last", "limit": limit}),
                    "next": base + urlencode({"page": "next", "address": last, "limit": limit}),
                    "previous": base + urlencode({"page": "previous", "address": first, "limit": limit}),
                },
            },
        )

    async def _add(self, request: IRequest, client: str, kind: str) -> bytes:
        body = read_body(request, MAX_BODY)
        now = self._wall()
        content_type = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
        single = True
        if content_type == b"application/json":
            document = parse_json(body)
            if isinstance(document, list):
                entries, single = _entries(client, kind, document, "", now), False
            elif isinstance(document, dict):
                entries = [make_entry(client, kind, document, "", now)]
            else:
                raise BadRequest("a JSON body must be an entry (an object) or a list of at most 1000")
        else:
            fields = read_form(request.getHeader(b"content-type"), body, lambda name: MAX_ERROR * 4, 0)
            entries = [make_entry(client, kind, _form_values(fields), "", now)]
        await self._store.add_suppressions(entries)
        if single:
            return json_response(request, 200, {"message": _added(kind, None), "address": entries[0].address})
        return json_response(request, 200, {"message": _added(kind, len(entries))})

    async def _entry(self, request: IRequest, domain: str, kind: str, given: str) -> bytes:
        client = await self._client(request, domain)
        parameters = query(request, ("tag",) if kind == "unsubscribe" and request.method == b"DELETE" else ())
        try:
            address = suppression_address(given, "address")
        except BadRequest:
            raise HTTPError(404, _NOT_FOUND[kind]) from None
        if request.method == b"DELETE":
            if "tag" in parameters:
                removed = await self._remove_tag(client, address, parameters["tag"])
            else:
                removed = await self._store.remove_suppression(client, kind, address)
            if not removed:
                raise HTTPError(404, _NOT_FOUND[kind])
            return json_response(request, 200, {"message": _REMOVED[kind], "address": address})
        entry = await self._store.suppression(client, kind, address)
        if entry is None:
            raise HTTPError(404, _NOT_FOUND[kind])
        return json_response(request, 200, v3_item(entry))

    async def _remove_tag(self, client: str, address: str, tag: str) -> bool:
        """Mailgun's DELETE of one tag of an unsubscribe: the entry stays for its other tags."""
        entry = await self._store.suppression(client, "unsubscribe", address)
        if entry is None:
            return False
        if tag == ALL_TAGS or entry.tags == (tag,):
            return await self._store.remove_suppression(client, "unsubscribe", address)
        if tag not in entry.tags:
            return False
        await self._store.add_suppressions([Suppression(client, "unsubscribe", address, entry.created_at, tags=tuple(t for t in entry.tags if t != tag))])
        return True


def _form_values(fields: Sequence[Field]) -> dict[str, Any]:
    """A form's fields as an entry's values: text, each once (``tag`` may repeat: a list)."""
    values: dict[str, Any] = {}
    for field in fields:
        if field.filename is not None:
            raise BadRequest(f"field {field.name!r} must be a text field, not a file")
        text = field.text()
        if field.name == "tag":
            values.setdefault("tag", []).append(text)
        elif field.name in values:
            raise BadRequest(f"field {field.name!r} is given more than once")
        else:
            values[field.name] = text
    return values


def _base_url(request: IRequest) -> str:
    """scheme://host[:port] the client asked (its Host header when that is a host name), for Mailgun's absolute paging URLs."""
    scheme = "https" if request.isSecure() else "http"
    host = (request.getHeader(b"host") or b"").decode("latin-1")
    if not _HOST.fullmatch(host):
        address = request.getHost()
        host = f"{getattr(address, 'host', '127.0.0.1')}:{getattr(address, 'port', 80)}"
    return f"{scheme}://{host}"


def v3_item(entry: Suppression) -> dict[str, Any]:
    """An entry as Mailgun shows it."""
    item: dict[str, Any] = {"address": entry.address}
    if entry.kind == "bounce":
        item.update(code=entry.code or "550", error=entry.error or "")
    elif entry.kind == "unsubscribe":
        item["tags"] = list(entry.tags) or [ALL_TAGS]
    item["created_at"] = _rfc2822(entry.created_at)
    return item


# -- the JSON API ---------------------------------------------------------------------------


def json_item(entry: Suppression) -> dict[str, Any]:
    """An entry as the JSON API shows it."""
    item: dict[str, Any] = {"kind": entry.kind, "address": entry.address, "created_at": _iso(entry.created_at)}
    if entry.kind == "bounce":
        item.update(code=entry.code, error=entry.error)
    elif entry.kind == "unsubscribe":
        item["tags"] = list(entry.tags) or [ALL_TAGS]
    return item


def _kind(value: str | None, required: bool = True) -> str | None:
    if value is None:
        if required:
            raise BadRequest(f"missing parameter 'kind' ({', '.join(SUPPRESSION_KINDS)})")
        return None
    if value not in SUPPRESSION_KINDS:
        raise BadRequest(f"parameter 'kind' must be one of {', '.join(SUPPRESSION_KINDS)}")
    return value


class JSONSuppressions:
    """
    ``/suppressions`` of the JSON API:

    - ``GET ?kind=K[&after=ADDRESS][&limit=N]``: a page of list K in address order;
      ``next`` is the ``after`` of the next page, null after the last one.
      ``GET ?address=A[&kind=K]``: the entries of A (on every list, or on K).
    - ``POST`` ``{"kind", "address", ...}`` adds one entry, ``{"kind", "entries": [...]}``
      up to 1000 (in one transaction); adding an address again replaces its entry.
    - ``DELETE ?kind=K&address=A`` removes one entry (404 if there is none);
      ``DELETE ?kind=K&all=true`` empties list K.
    """

    def __init__(self, pipeline: Pipeline, store: Store, *, wall: Callable[[], float]) -> None:
        self._pipeline = pipeline
        self._store = store
        self._wall = wall

    def methods(self) -> dict[bytes, Callable[[IRequest], Coroutine[Any, Any, bytes]]]:
        return {b"GET": self.get, b"POST": self.post, b"DELETE": self.delete}

    async def get(self, request: IRequest) -> bytes:
        client = await self._pipeline.authenticate(request)
        parameters = query(request, ("kind", "after", "limit", "address"))
        kind = _kind(parameters.get("kind"), required="address" not in parameters)
        if "address" in parameters:
            if "after" in parameters or "limit" in parameters:
                raise BadRequest("parameter 'address' looks one address up: not with 'after' or 'limit'")
            try:
                address = suppression_address(parameters["address"], "address")
            except BadRequest as e:
                raise BadRequest(str(e).replace("field", "parameter", 1)) from None
            found = [await self._store.suppression(client, k, address) for k in ([kind] if kind else SUPPRESSION_KINDS)]
            items = [json_item(entry) for entry in found if entry is not None]
            return json_response(request, 200, {"result": "success", "items": items, "next": None})
        assert kind is not None
        limit = limit_parameter(parameters.get("limit"), JSON_LIMIT, JSON_MAX_LIMIT)
        after = parameters.get("after")
        entries = await self._store.suppressions(client, kind, after=after.lower() if after else None, limit=limit)
        following = entries[-1].address if len(entries) == limit else None
        return json_response(request, 200, {"result": "success", "items": [json_item(e) for e in entries], "next": following})

    async def post(self, request: IRequest) -> bytes:
        client = await self._pipeline.authenticate(request)
        document = parse_json(read_body(request, MAX_BODY))
        if not isinstance(document, dict):
            raise BadRequest("request body must be a JSON object")
        values = dict(document)
        kind = values.pop("kind", None)
        if not isinstance(kind, str) or kind not in SUPPRESSION_KINDS:
            raise BadRequest(f"field 'kind' must be one of {', '.join(SUPPRESSION_KINDS)}")
        now = self._wall()
        if "entries" in values:
            entries_value = values.pop("entries")
            if values:
                raise BadRequest(f"with field 'entries', give each entry's fields in it (not {sorted(values)[0]!r})")
            entries = _entries(client, kind, entries_value, "entries", now)
        else:
            if "address" not in values:
                raise BadRequest("give field 'address' (one entry) or field 'entries' (a list of them)")
            entries = [make_entry(client, kind, values, "", now)]
        await self._store.add_suppressions(entries)
        return json_response(request, 200, {"result": "success", "added": len(entries)})

    async def delete(self, request: IRequest) -> bytes:
        client = await self._pipeline.authenticate(request)
        parameters = query(request, ("kind", "address", "all"))
        kind = _kind(parameters.get("kind"))
        assert kind is not None
        if ("address" in parameters) == ("all" in parameters):
            raise BadRequest("give parameter 'address' (one entry) or 'all=true' (the whole list), one of them")
        if "all" in parameters:
            if parameters["all"] != "true":
                raise BadRequest("parameter 'all' must be true")
            removed = await self._store.clear_suppressions(client, kind)
        else:
            try:
                address = suppression_address(parameters["address"], "address")
            except BadRequest as e:
                raise BadRequest(str(e).replace("field", "parameter", 1)) from None
            if not await self._store.remove_suppression(client, kind, address):
                raise HTTPError(404, "no such suppression")
            removed = 1
        return json_response(request, 200, {"result": "success", "removed": removed})
