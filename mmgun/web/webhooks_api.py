"""
Mailgun's domain webhooks API (issue 14), routed by :class:`.mailgun.MailgunAPI`:

- ``GET /v3/domains/{domain}/webhooks``: ``{"webhooks": {"delivered": {"urls": [...]}, ...}}``,
  the kinds that have URLs;
- ``POST /v3/domains/{domain}/webhooks`` (form ``id=<kind>``, ``url=<url>`` up to 3 times):
  ``{"message": "Webhook has been created", "webhook": {"urls": [...]}}``;
- ``GET``, ``PUT`` (form ``url``, up to 3 times: the new list) and ``DELETE``
  ``/v3/domains/{domain}/webhooks/{kind}``: ``{"webhook": {"urls": [...]}}`` (with a
  ``message`` for PUT and DELETE).

The kinds are mmgun's :data:`mmgun.store.WEBHOOK_EVENTS` (delivered, permanent_fail,
temporary_fail); Mailgun's others (accepted, opened, clicked, unsubscribed, complained) are
refused with a 400 saying mmgun makes no such webhook. ``{domain}`` must be one of the
caller's sending domains (404 ``Domain not found`` otherwise). Each URL of a kind is one
stored webhook (id ``v3:{client}:{domain}:{kind}:{n}``, see ``mmgun webhooks list``) receiving
that kind's events of mail from that domain; changing a URL keeps its place in the feed. The
endpoints see and change only the caller's webhooks: after a domain moves to another client,
the new owner makes its own, and the old owner's (receiving only the old owner's events) are
left to it and the operator. Webhooks
the operator added for the domain (``mmgun webhooks add --domain``) are listed too, but are
changed and removed only by the operator. URLs are shown as the client gave them (a
``user:password`` included, as Mailgun does: the client's own credentials, to the client).
The client's webhook signing key is made with its first webhook if it has none (the operator
shows it with ``mmgun webhooks key``).
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from twisted.web.iweb import IRequest

from ..message import BadRequest
from ..store import WEBHOOK_EVENTS, Store, Webhook
from ..webhooks import WebhookURLError, new_signing_key, parse_url
from .errors import ErrorShape, HTTPError, json_response
from .forms import Field, read_form
from .site import read_body
from .submit import Pipeline
from .suppressions_api import answering, query

#: URLs of one kind, per domain (Mailgun's limit).
MAX_URLS = 3
#: Characters of one URL.
MAX_URL = 2048
MAX_BODY = 64 * 1024
#: Mailgun's webhook kinds that mmgun has no events for.
UNSUPPORTED = ("accepted", "opened", "clicked", "unsubscribed", "complained")


def _ident(client: str, domain: str, kind: str, n: int) -> str:
    # Client ids, clients-file labels and domain names have no ":".
    return f"v3:{client}:{domain}:{kind}:{n}"


def _own(hooks: Sequence[Webhook], client: str, domain: str, kind: str) -> list[tuple[int, Webhook]]:
    """
    The URLs of ``kind`` the client set through this API for ``domain`` (``hooks`` are the
    client's), with their numbers, in order; ids of the earlier form ``v3:{domain}:{kind}:{n}``
    (before ids named the client) count too.
    """
    found = []
    for webhook in hooks:
        parts = webhook.id.split(":")
        if parts[0] != "v3" or not parts[-1].isdigit():
            continue
        if parts[1:-1] in ([client, domain, kind], [domain, kind]):
            found.append((int(parts[-1]), webhook))
    return sorted(found, key=lambda pair: pair[0])


class V3Webhooks:
    """``/v3/domains/{domain}/webhooks[/{kind}]`` in Mailgun's shapes (errors in ``shape``)."""

    def __init__(self, pipeline: Pipeline, store: Store, *, wall: Callable[[], float], shape: ErrorShape) -> None:
        self._pipeline = pipeline
        self._store = store
        self._wall = wall
        self._shape = shape

    def collection(self, request: IRequest, domain: str) -> Coroutine[Any, Any, bytes]:
        """GET the domain's webhooks, POST a new kind's URLs."""
        return answering(request, self._collection(request, domain), self._store, self._shape)

    def one(self, request: IRequest, domain: str, kind: str) -> Coroutine[Any, Any, bytes]:
        """GET, PUT or DELETE one kind's URLs."""
        return answering(request, self._one(request, domain, kind), self._store, self._shape)

    async def _client(self, request: IRequest, domain: str) -> tuple[str, str]:
        from .mailgun import sending_domain

        client = await self._pipeline.authenticate(request)
        name = sending_domain(domain)
        # Mailgun's answer for a domain not in the account: the same for another client's.
        if not await self._pipeline.domains.owned(client, name):
            raise HTTPError(404, f"Domain not found: {name}")
        return client, name

    async def _hooks(self, client: str, domain: str) -> list[Webhook]:
        return [w for w in await self._store.webhooks(client) if w.domain == domain]

    async def _collection(self, request: IRequest, domain: str) -> bytes:
        client, name = await self._client(request, domain)
        query(request, ())
        if request.method == b"POST":
            return await self._create(request, client, name)
        hooks = await self._hooks(client, name)
        listing = {kind: {"urls": urls} for kind in WEBHOOK_EVENTS if (urls := _urls(hooks, kind))}
        return json_response(request, 200, {"webhooks": listing})

    async def _create(self, request: IRequest, client: str, domain: str) -> bytes:
        fields = _form(request)
        kinds = [f.text() for f in fields if f.name == "id"]
        if len(kinds) != 1:
            raise BadRequest("field 'id' (the webhook: delivered, permanent_fail or temporary_fail) is required, once")
        kind = _kind(kinds[0])
        urls = _url_fields(fields, {"id"})
        hooks = await self._hooks(client, domain)
        if _own(hooks, client, domain, kind):
            raise BadRequest(f"webhook {kind} of {domain} already exists: change its URLs with PUT")
        await self._ensure_key(client)
        for n, url in enumerate(urls):
            await self._store.add_webhook(Webhook(_ident(client, domain, kind, n), client, domain, url, (kind,), self._wall()))
        return json_response(request, 200, {"message": "Webhook has been created", "webhook": {"urls": urls}})

    async def _one(self, request: IRequest, domain: str, kind: str) -> bytes:
        client, name = await self._client(request, domain)
        query(request, ())
        if kind not in WEBHOOK_EVENTS:
            raise HTTPError(404, "Webhook not found")
        hooks = await self._hooks(client, name)
        own = [w for _, w in _own(hooks, client, name, kind)]
        if request.method == b"GET":
            urls = _urls(hooks, kind)
            if not urls:
                raise HTTPError(404, "Webhook not found")
            return json_response(request, 200, {"webhook": {"urls": urls}})
        if not own:
            raise HTTPError(404, "Webhook not found")
        if request.method == b"DELETE":
            for webhook in own:
                await self._store.remove_webhook(webhook.id)
            return json_response(request, 200, {"message": "Webhook has been deleted", "webhook": {"urls": [w.url for w in own]}})
        urls = _url_fields(_form(request), set())
        numbers = {n for n, _ in _own(hooks, client, name, kind)}
        fresh = (n for n in range(len(numbers) + len(urls)) if n not in numbers)
        for i, url in enumerate(urls):
            if i < len(own):
                # The same place in the feed: the events not POSTed yet go to the new URL.
                await self._store.update_webhook(own[i].id, url, (kind,))
            else:
                ident = _ident(client, name, kind, next(fresh))
                await self._store.add_webhook(Webhook(ident, client, name, url, (kind,), self._wall()))
        for webhook in own[len(urls):]:
            await self._store.remove_webhook(webhook.id)
        return json_response(request, 200, {"message": "Webhook has been updated", "webhook": {"urls": urls}})

    async def _ensure_key(self, client: str) -> None:
        if await self._store.webhook_key(client) is None:
            await self._store.set_webhook_key(client, new_signing_key(), self._wall(), replace=False)


def _urls(hooks: Sequence[Webhook], kind: str) -> list[str]:
    return list(dict.fromkeys(w.url for w in hooks if kind in w.events))


def _kind(value: str) -> str:
    if value in WEBHOOK_EVENTS:
        return value
    if value in UNSUPPORTED:
        raise BadRequest(
            f"mmgun makes no {value} webhook: a webhook is one of {', '.join(WEBHOOK_EVENTS)}"
        )
    raise BadRequest(f"field 'id' must be one of {', '.join(WEBHOOK_EVENTS)}")


def _form(request: IRequest) -> list[Field]:
    body = read_body(request, MAX_BODY)
    return read_form(request.getHeader(b"content-type"), body, lambda name: MAX_URL * 2, 0)


def _url_fields(fields: Sequence[Field], others: set[str]) -> list[str]:
    for field in fields:
        if field.name != "url" and field.name not in others:
            raise BadRequest(f"unknown field {field.name!r} (this endpoint takes {', '.join(sorted(others | {'url'}))})")
        if field.filename is not None:
            raise BadRequest(f"field {field.name!r} must be a text field, not a file")
    urls = list(dict.fromkeys(f.text().strip() for f in fields if f.name == "url"))
    if not urls or len(urls) > MAX_URLS:
        raise BadRequest(f"field 'url' is required, 1 to {MAX_URLS} times")
    for url in urls:
        if len(url) > MAX_URL:
            raise BadRequest(f"field 'url' must be at most {MAX_URL} characters")
        try:
            parse_url(url)
        except WebhookURLError as e:
            raise BadRequest(f"field 'url': {e}") from None
    return urls
