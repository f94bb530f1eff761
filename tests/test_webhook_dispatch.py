"""
The webhook dispatcher (issue 14, dispatcher brief): real events of a real SQLite file,
POSTed by a WebhookDispatcher driven by a Clock (its loop, its leases, the retry schedule)
through a real WebhookClient to real twisted.web receivers on 127.0.0.1; every body's
signature checked by the test's own implementation of Mailgun's rule.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, cast

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from mmgun.dispatcher import RECORD_DELAY, WebhookDispatcher
from mmgun.store import EnvelopeOutcome, NewSubmission, RecipientOutcome, Webhook, WebhookRetry
from mmgun.store.sqlite import SQLiteStore
from mmgun.web.signing import DOMAIN_CACHE_SECONDS
from mmgun.webhooks import RETRY_SCHEDULE

from .helpers import result, wait_until
from .test_mailgun_api import form_data
from .test_suppressions import APICase
from .test_webhooks import Receivers, mailgun_verify, make_client

START = 1_700_000_000.0
ALL = ("delivered", "permanent_fail", "temporary_fail")


class Hooks(Resource):
    """
    A webhook receiver: checks each body's signature with the client's key (Mailgun's
    rule, the test's own code) and records the event-data. ``mode``: "ok" (200), "fail"
    (500) or "hold" (no answer until released); ``hold_after``: hold once that many
    events were answered.
    """

    isLeaf = True

    def __init__(self, key: Any, mode: str = "ok") -> None:
        super().__init__()
        self.key = key
        self.mode = mode
        self.hold_after: int | None = None
        self.received: list[dict[str, Any]] = []
        self.answered: list[dict[str, Any]] = []
        self.held: list[tuple[Request, dict[str, Any]]] = []
        self.headers: list[dict[bytes, list[bytes]]] = []

    def render_POST(self, request: Request) -> bytes | int:
        assert request.content is not None
        body = request.content.read()
        key = self.key() if callable(self.key) else self.key
        assert mailgun_verify(key, body), "the signature does not verify with the client's key"
        data = json.loads(body)["event-data"]
        self.received.append(data)
        self.headers.append({n.lower(): v for n, v in request.requestHeaders.getAllRawHeaders()})
        hold = self.mode == "hold" or (self.hold_after is not None and len(self.answered) >= self.hold_after)
        if hold:
            self.held.append((request, data))
            request.notifyFinish().addBoth(lambda _: self._forget(request))
            return NOT_DONE_YET
        if self.mode == "fail":
            request.setResponseCode(500)
            return b"down"
        self.answered.append(data)
        return b"ok"

    def _forget(self, request: Request) -> None:
        self.held = [(r, d) for r, d in self.held if r is not request]

    def release_all(self) -> None:
        for request, data in list(self.held):
            self.answered.append(data)
            request.write(b"ok")
            request.finish()

    def recipients(self, which: str = "answered") -> list[str]:
        return [d["recipient"] for d in getattr(self, which)]


class DispatchCase(TestCase):
    def setUp(self) -> None:
        self.path = self.mktemp() + "-mmgun.sqlite3"
        self.store = self.open_store()
        self.clock = Clock()
        self.clock.advance(START)
        self.receivers = Receivers(self)
        self.sent = 0

    def open_store(self) -> SQLiteStore:
        """A store on the test's file whose calls complete at once (no threads): usable with the Clock."""
        store = SQLiteStore.open_sync(self.path)
        self.addCleanup(lambda: result(self, store.close()))
        return store

    def serve(self, hooks: Hooks) -> str:
        _, port = self.receivers.web(hooks)
        return f"http://127.0.0.1:{port}/hooks"

    def webhook(self, url: str, ident: str = "w1", events: tuple[str, ...] = ALL, domain: str | None = None, client: str = "acme") -> Webhook:
        webhook: Webhook = result(self, self.store.add_webhook(Webhook(ident, client, domain, url, events, self.clock.seconds())))
        return webhook

    def key(self, client: str = "acme") -> str | None:
        key: str | None = result(self, self.store.webhook_key(client))
        return key

    def dispatcher(self, store: SQLiteStore | None = None, *, start: bool = True, **kwargs: Any) -> WebhookDispatcher:
        client_kwargs = {k: kwargs.pop(k) for k in ("allow_private", "max_per_receiver", "timeout") if k in kwargs}
        client_kwargs.setdefault("max_per_receiver", 1)  # one at a time: the order received is the order sent
        dispatcher = WebhookDispatcher(
            store or self.store, make_client(self, **client_kwargs), self.clock, wall=self.clock.seconds, owner="test", **kwargs
        )
        if start:
            dispatcher.startService()
            self.addCleanup(self.stop, dispatcher)
        return dispatcher

    def stop(self, dispatcher: WebhookDispatcher) -> Deferred[None] | None:
        if not dispatcher.running:
            return None
        d = dispatcher.stopService()
        self.clock.advance(60)  # past the grace
        return d

    async def tick(self, dispatcher: WebhookDispatcher, seconds: float = 1.0) -> None:
        """Let ``seconds`` pass on the Clock (the loop ticks), then wait for the POSTs it started."""
        self.clock.advance(seconds)
        await dispatcher.settled()

    def mail(self, outcomes: dict[str, tuple[str, str]], *, client: str = "acme", sender: str = "app@acme.example") -> None:
        """One submission to ``outcomes``' recipients, claimed and given those outcomes (status, reply)."""
        now = self.clock.seconds()
        recipients = tuple(outcomes)
        submission = NewSubmission(
            uuid.uuid4().hex, client, sender, recipients, b"Subject: s\r\n\r\nhi\r\n", now, message_id=f"<{uuid.uuid4().hex}@acme>"
        )
        result(self, self.store.add_submission(submission))
        for envelope in result(self, self.store.claim("sender-1", now, 60.0, 100)):
            results = tuple(
                RecipientOutcome(a, outcomes[a][0], outcomes[a][1], mx_host="mx.example", bounce=outcomes[a][1].startswith("550 5.1.1"))
                for a in envelope.recipients
            )
            result(self, self.store.record([EnvelopeOutcome(envelope, results, now + 300)], now))

    def delivered(self, *recipients: str, client: str = "acme") -> None:
        for recipient in recipients:
            self.mail({recipient: ("sent", "250 2.0.0 ok")}, client=client)

    def retries(self, when: float = START + 10**7) -> list[WebhookRetry]:
        """What waits in the retries (leased by a probe: call last)."""
        found: list[WebhookRetry] = result(self, self.store.due_webhook_retries("probe", when, when + 1, 1000))
        return found


class DeliveryTests(DispatchCase):
    async def test_real_events_posted_signed_and_filtered(self) -> None:
        """
        issue 14 dispatcher items 1 and 5: a delivery, a deferral and a hard bounce of
        real submissions reach a real receiver as delivered, temporary_fail and
        permanent_fail, in feed order, each body signed with the client's key (made at
        first need: the receiver checks every signature with it); accepted is never
        POSTed; a webhook for delivered only gets only that, one for another sending
        domain nothing, another client's nothing of acme's.
        """
        every = Hooks(lambda: self.key())
        only_delivered = Hooks(lambda: self.key())
        other_domain = Hooks(lambda: self.key())
        other_client = Hooks(lambda: self.key("zeta"))
        self.webhook(self.serve(every), "all")
        self.webhook(self.serve(only_delivered), "delivered-only", events=("delivered",))
        self.webhook(self.serve(other_domain), "other-domain", domain="other.example")
        self.webhook(self.serve(other_client), "zeta", client="zeta")
        self.assertIsNone(self.key())
        self.mail({"ann@x.example": ("sent", "250 2.0.0 queued as 1"), "bob@x.example": ("deferred", "451 4.7.1 greylisted")})
        self.mail({"cat@y.example": ("failed", "550 5.1.1 no such user")})
        dispatcher = self.dispatcher()
        await dispatcher.settled()
        self.assertIsNotNone(self.key())
        self.assertEqual(
            [(d["event"], d.get("severity"), d["recipient"]) for d in every.answered],
            [("delivered", None, "ann@x.example"), ("failed", "temporary", "bob@x.example"), ("failed", "permanent", "cat@y.example")],
        )
        events = result(self, self.store.events("acme", limit=100))
        self.assertEqual([d["id"] for d in every.answered], [str(e.cursor) for e in events if e.event != "accepted"])
        bounce = every.answered[2]
        self.assertEqual((bounce["reason"], bounce["delivery-status"]["code"], bounce["log-level"]), ("bounce", 550, "error"))
        self.assertEqual(only_delivered.recipients(), ["ann@x.example"])
        self.assertEqual((other_domain.received, other_client.received), ([], []))
        self.assertEqual(self.retries(), [])
        # The cursors moved past everything: nothing is POSTed twice.
        await self.tick(dispatcher)
        self.assertEqual(len(every.received), 3)

    async def test_a_domain_webhook_moves_past_other_domains_events(self) -> None:
        """issue 14 (review): a webhook of a quiet domain does not read a busy domain's events again every tick."""
        hooks = Hooks(lambda: self.key())
        self.webhook(self.serve(hooks), "quiet", domain="quiet.example")
        dispatcher = self.dispatcher()
        await dispatcher.settled()
        self.delivered("a@x.example", "b@x.example")
        await self.tick(dispatcher)
        events = result(self, self.store.events("acme", limit=100))
        cursor = result(self, self.store.webhook("quiet")).cursor
        self.assertGreater(cursor, events[-1].cursor)
        self.assertEqual(hooks.received, [])
        self.mail({"c@x.example": ("sent", "250 ok")}, sender="app@quiet.example")
        await self.tick(dispatcher)
        self.assertEqual(hooks.recipients(), ["c@x.example"])

    async def test_new_events_follow_within_a_tick(self) -> None:
        """issue 14 dispatcher item 1: an event committed after the dispatcher started is POSTed at the next tick."""
        hooks = Hooks(lambda: self.key())
        self.webhook(self.serve(hooks))
        dispatcher = self.dispatcher()
        await dispatcher.settled()
        self.delivered("one@x.example")
        await self.tick(dispatcher)
        self.assertEqual(hooks.recipients(), ["one@x.example"])


class OutageTests(DispatchCase):
    async def test_receiver_down_then_up_gets_every_event(self) -> None:
        """
        issue 14 dispatcher item 5: while one receiver answers 500 and another's port
        refuses connections, their events go to the retries (with why); once up, the
        events committed since arrive in feed order at once, and at the retry time
        exactly the missed ones arrive, each once, in feed order; nothing is left.
        """
        failing = Hooks(lambda: self.key(), mode="fail")
        self.webhook(self.serve(failing), "w500")
        closed = self.receivers.closed_port()
        self.webhook(f"http://127.0.0.1:{closed}/hooks", "refused")
        dispatcher = self.dispatcher()
        self.delivered("m1@x.example", "m2@x.example", "m3@x.example")
        await self.tick(dispatcher)
        self.assertEqual(failing.recipients("received"), ["m1@x.example", "m2@x.example", "m3@x.example"])
        waiting = self.retries(START + 299)
        self.assertEqual(waiting, [])
        # Up again: the 500 receiver answers 200; the refused port now listens.
        failing.mode = "ok"
        revived = Hooks(lambda: self.key())
        self.receivers.web_on(revived, closed)
        self.delivered("m4@x.example", "m5@x.example")
        await self.tick(dispatcher, 10)
        for hooks in (failing, revived):
            self.assertEqual(hooks.recipients(), ["m4@x.example", "m5@x.example"])
        await self.tick(dispatcher, 300)
        for hooks in (failing, revived):
            self.assertEqual(
                hooks.recipients(), ["m4@x.example", "m5@x.example", "m1@x.example", "m2@x.example", "m3@x.example"]
            )
        self.assertEqual(self.retries(), [])

    async def test_errors_kept_with_the_retries(self) -> None:
        """issue 14 dispatcher item 1: a failed event waits 5 minutes as a retry whose error says why (status, refusal)."""
        failing = Hooks(lambda: self.key(), mode="fail")
        self.webhook(self.serve(failing), "w500")
        closed = self.receivers.closed_port()
        self.webhook(f"http://127.0.0.1:{closed}/hooks", "refused")
        dispatcher = self.dispatcher()
        self.delivered("m1@x.example")
        await self.tick(dispatcher)
        now = self.clock.seconds()
        self.assertEqual(self.retries(now + 299), [])
        retries = self.retries(now + 300)
        self.assertEqual(
            sorted((r.webhook.id, r.event.recipient, r.attempts, r.last_error) for r in retries),
            [("refused", "m1@x.example", 1, "connection refused"), ("w500", "m1@x.example", 1, "HTTP 500")],
        )

    async def test_ssrf_refusal_waits_in_the_retries(self) -> None:
        """
        issue 14 dispatcher item 5: without --webhook-allow-private, a webhook at a
        loopback address gets no connection at all; its event waits in the retries
        with the refusal as its error.
        """
        hooks = Hooks(lambda: self.key())
        site, port = self.receivers.web(hooks)
        self.webhook(f"http://127.0.0.1:{port}/hooks")
        dispatcher = self.dispatcher(allow_private=False)
        self.delivered("m1@x.example")
        await self.tick(dispatcher)
        (retry,) = self.retries()
        self.assertIn("refused address 127.0.0.1 (loopback)", retry.last_error or "")
        self.assertEqual((site.opened, hooks.received), (0, []))

    async def test_given_up_after_eight_hours(self) -> None:
        """
        issue 14 dispatcher items 1 and 5: a receiver that always fails gets the event
        at 0, 5 min, 15 min, 30 min, 1.5 h, 3.5 h and 7.5 h (Mailgun's schedule), then
        it is given up: deleted, with one warning that names the webhook and the
        reason but holds neither the body nor the key.
        """
        logged: list[LogEvent] = []
        observer = cast(ILogObserver, logged.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        failing = Hooks(lambda: self.key(), mode="fail")
        self.webhook(self.serve(failing) + "?token=receiver-secret")
        dispatcher = self.dispatcher()
        self.delivered("m1@x.example")
        await self.tick(dispatcher)
        times = [self.clock.seconds()]
        for delay in RETRY_SCHEDULE:
            await self.tick(dispatcher, delay - 1)
            self.assertEqual(len(failing.received), len(times), "not before its time")
            await self.tick(dispatcher, 1)
            times.append(self.clock.seconds())
            self.assertEqual(len(failing.received), len(times))
        self.assertEqual([t - times[0] for t in times], [0, 300, 900, 1800, 5400, 12600, 27000])
        self.assertEqual(self.retries(), [])
        await self.tick(dispatcher, 86400)
        self.assertEqual(len(failing.received), 7)
        (warning,) = [e for e in logged if "gave up" in formatEvent(e)]
        text = formatEvent(warning)
        self.assertIn("gave up webhook w1 event", text)
        self.assertIn("after 7 attempts", text)
        self.assertIn("HTTP 500", text)
        key = self.key()
        assert key is not None
        # mmgun's own log events (the test receivers' access log names their URLs).
        everything = " ".join(formatEvent(e) + repr(e) for e in logged if str(e.get("log_namespace", "")).startswith("mmgun"))
        for secret in (key, "receiver-secret", "m1@x.example", "signature"):
            self.assertNotIn(secret, everything)


class RestartTests(DispatchCase):
    async def test_restart_loses_nothing_and_repeats_at_most_the_page_in_flight(self) -> None:
        """
        issue 14 dispatcher item 5 (across a restart): with pages of 2 events, the
        dispatcher is stopped while the second page's second POST hangs; a new
        dispatcher on a new connection to the same file (its own lease: the stopped
        one gave its lease up) POSTs from that page on at once: every event is answered,
        only the page in flight is repeated, the first page is not.
        """
        hooks = Hooks(lambda: self.key())
        hooks.hold_after = 3
        self.webhook(self.serve(hooks))
        recipients = [f"m{n}@x.example" for n in range(1, 7)]
        self.delivered(*recipients)
        # A page of 4 events: 2 accepted (never POSTed) and 2 delivered.
        first = self.dispatcher(page_size=4, grace=1.0)
        await wait_until(lambda: len(hooks.held) == 1, "the fourth POST to hang")
        self.assertEqual(hooks.recipients(), recipients[:3])
        stopping = first.stopService()
        self.clock.advance(1.0)  # the grace is over: the hanging POST is cut short
        await stopping
        self.assertFalse(first.busy)
        hooks.hold_after = None
        second = self.dispatcher(self.open_store(), page_size=4)
        self.assertNotEqual(second.lease, first.lease)
        await second.settled()
        self.assertEqual(hooks.recipients(), recipients[:3] + recipients[2:])
        self.assertEqual(self.retries(), [])


class IsolationTests(DispatchCase):
    async def test_hanging_receiver_does_not_delay_another_webhook(self) -> None:
        """
        issue 14 dispatcher item 1: one webhook's receiver holds every request; another
        webhook of the same client gets all of its events meanwhile, tick after tick;
        the hanging one's page waits, unadvanced, and gets its events once it answers.
        """
        hanging = Hooks(lambda: self.key(), mode="hold")
        healthy = Hooks(lambda: self.key())
        self.webhook(self.serve(hanging), "hanging")
        self.webhook(self.serve(healthy), "healthy")
        dispatcher = self.dispatcher(max_per_receiver=2)
        self.delivered("m1@x.example", "m2@x.example", "m3@x.example")
        self.clock.advance(1)
        await wait_until(lambda: len(healthy.answered) == 3 and len(hanging.held) == 2, "the healthy receiver's events")
        self.delivered("m4@x.example")
        self.clock.advance(1)
        await wait_until(lambda: len(healthy.answered) == 4, "the next event, at the next tick")
        self.assertEqual(len(hanging.received), 2)
        hanging.mode = "ok"
        hanging.release_all()
        await dispatcher.settled()
        await self.tick(dispatcher)
        self.assertEqual(sorted(hanging.recipients()), [f"m{n}@x.example" for n in range(1, 5)])
        self.assertEqual(self.retries(), [])

    async def test_password_in_url_reaches_receiver_as_basic_auth(self) -> None:
        """issue 14 dispatcher (lead's change): a webhook URL with user:password POSTs with Authorization: Basic."""
        hooks = Hooks(lambda: self.key())
        url = self.serve(hooks).replace("http://", "http://anymail:pa%24%24@")
        self.webhook(url)
        dispatcher = self.dispatcher()
        self.delivered("m1@x.example")
        await self.tick(dispatcher)
        self.assertEqual(hooks.headers[0][b"authorization"], [b"Basic YW55bWFpbDpwYSQk"])


class V3WebhooksAPITests(APICase):
    """Mailgun's /v3/domains/{domain}/webhooks through StubTreq against the real root resource."""

    def put(self, path: str, fields: list[tuple[str, str]], client: str = "acme") -> tuple[int, Any]:
        body, content_type = form_data(list(fields))
        return self.call("PUT", path, client=client, body=body, content_type=content_type)

    def stored(self, client: str = "acme") -> list[Webhook]:
        found: list[Webhook] = result(self, self.store.webhooks(client))
        return found

    def test_create_list_get_update_delete(self) -> None:
        """
        issue 14 dispatcher item 4: POST id=delivered with two urls creates two
        webhooks of that kind for the domain (and the client's signing key); GET lists
        them in Mailgun's shape; PUT replaces the list keeping the first webhook's place
        in the feed; DELETE removes them; a second POST of the same kind is a 400.
        """
        base = "/v3/domains/example.com/webhooks"
        self.assertEqual(self.call("GET", base), (200, {"webhooks": {}}))
        code, body = self.form(base, [("id", "delivered"), ("url", "https://a.example/h"), ("url", "https://u:p@b.example/h")])
        self.assertEqual((code, body), (200, {"message": "Webhook has been created", "webhook": {"urls": ["https://a.example/h", "https://u:p@b.example/h"]}}))
        self.assertIsNotNone(result(self, self.store.webhook_key("acme")))
        self.assertEqual([(w.domain, w.events) for w in self.stored()], [("example.com", ("delivered",))] * 2)
        self.form(base, [("id", "permanent_fail"), ("url", "https://a.example/h")])
        self.assertEqual(
            self.call("GET", base),
            (200, {"webhooks": {"delivered": {"urls": ["https://a.example/h", "https://u:p@b.example/h"]}, "permanent_fail": {"urls": ["https://a.example/h"]}}}),
        )
        self.assertEqual(self.call("GET", base + "/delivered"), (200, {"webhook": {"urls": ["https://a.example/h", "https://u:p@b.example/h"]}}))
        self.assertEqual(self.form(base, [("id", "delivered"), ("url", "https://c.example/")])[0], 400)
        before = {w.id: w.cursor for w in self.stored()}
        self.delivered_event()
        code, body = self.put(base + "/delivered", [("url", "https://c.example/new")])
        self.assertEqual((code, body["webhook"]), (200, {"urls": ["https://c.example/new"]}))
        delivered = [w for w in self.stored() if w.events == ("delivered",)]
        self.assertEqual([(w.url, w.cursor) for w in delivered], [("https://c.example/new", before[delivered[0].id])])
        code, body = self.call("DELETE", base + "/delivered")
        self.assertEqual((code, body), (200, {"message": "Webhook has been deleted", "webhook": {"urls": ["https://c.example/new"]}}))
        self.assertEqual(self.call("GET", base + "/delivered")[0], 404)
        self.assertEqual(self.call("DELETE", base + "/delivered")[0], 404)
        self.assertEqual([w.events for w in self.stored()], [("permanent_fail",)])

    def delivered_event(self) -> None:
        """An event of the client's (so a cursor kept or reset would show)."""
        result(self, self.store.add_submission(NewSubmission(uuid.uuid4().hex, "acme", "a@example.com", ("r@x.example",), b"\r\n", 1.0)))

    def test_refusals(self) -> None:
        """
        issue 14 dispatcher item 4: another client's domain is a 404 (and nothing is
        stored); opened/clicked/accepted are 400s saying mmgun makes no such webhook;
        more than 3 urls, a bad URL, an unknown field are 400s.
        """
        self.assertEqual(self.form("/v3/domains/globex.example/webhooks", [("id", "delivered"), ("url", "https://a.example/")])[0], 404)
        self.assertEqual(self.call("GET", "/v3/domains/globex.example/webhooks")[0], 404)
        base = "/v3/domains/example.com/webhooks"
        for kind in ("opened", "clicked", "accepted"):
            code, body = self.form(base, [("id", kind), ("url", "https://a.example/")])
            self.assertEqual(code, 400)
            self.assertIn(f"mmgun makes no {kind} webhook", body["message"])
        four = [("url", f"https://{n}.example/") for n in range(4)]
        for fields in (four, [("url", "ftp://a.example/")], [("url", "https://a.example/"), ("secret", "x")], []):
            self.assertEqual(self.form(base, [("id", "delivered"), *fields])[0], 400, fields)
        self.assertEqual(self.stored() + self.stored("globex"), [])
        self.assertEqual(self.call("GET", base + "/opened")[0], 404)

    def test_a_moved_domain_gets_the_new_owners_own_webhooks(self) -> None:
        """
        issue 14 (review): acme sets a delivered webhook for example.com; the domain then
        moves to globex. globex's POST for the same kind succeeds (the ids are the
        client's, so it no longer conflicts forever with acme's), its GET lists only its
        own URL, and its PUT and DELETE change only its own webhooks: acme's stays, whole.
        """
        base = "/v3/domains/example.com/webhooks"
        self.assertEqual(self.form(base, [("id", "delivered"), ("url", "https://acme.example/h")])[0], 200)
        (acme_hook,) = self.stored("acme")
        self.assertEqual(acme_hook.id, "v3:acme:example.com:delivered:0")
        result(self, self.store.remove_domain("example.com"))
        result(self, self.store.add_domain("example.com", "globex", self.clock.seconds()))
        self.clock.advance(DOMAIN_CACHE_SECONDS)  # the API's cache of owners
        self.assertEqual(self.call("GET", base)[0], 404)  # acme's no more
        self.assertEqual(self.form(base, [("id", "delivered"), ("url", "https://globex.example/h")], client="globex")[0], 200)
        self.assertEqual(self.call("GET", base, client="globex"), (200, {"webhooks": {"delivered": {"urls": ["https://globex.example/h"]}}}))
        code, body = self.put(base + "/delivered", [("url", "https://globex.example/1"), ("url", "https://globex.example/2")], client="globex")
        self.assertEqual((code, body["webhook"]), (200, {"urls": ["https://globex.example/1", "https://globex.example/2"]}))
        self.assertEqual(
            [(w.id, w.url) for w in self.stored("globex")],
            [("v3:globex:example.com:delivered:0", "https://globex.example/1"), ("v3:globex:example.com:delivered:1", "https://globex.example/2")],
        )
        self.assertEqual(self.call("DELETE", base + "/delivered", client="globex")[0], 200)
        self.assertEqual(self.stored("globex"), [])
        self.assertEqual(self.stored("acme"), [acme_hook])

    def test_ids_of_the_earlier_form_are_still_the_clients(self) -> None:
        """
        issue 14 (review): a webhook stored with an id of the earlier form
        (v3:{domain}:{kind}:{n}) is still the client's to list, change and remove; a URL
        added next to it gets a new, client-scoped id.
        """
        result(self, self.store.add_webhook(Webhook("v3:example.com:delivered:0", "acme", "example.com", "https://old.example/h", ("delivered",), 1.0)))
        base = "/v3/domains/example.com/webhooks"
        self.assertEqual(self.form(base, [("id", "delivered"), ("url", "https://x.example/")])[0], 400)  # exists
        self.assertEqual(self.put(base + "/delivered", [("url", "https://old.example/new"), ("url", "https://b.example/")])[0], 200)
        self.assertEqual(
            [(w.id, w.url) for w in self.stored()],
            [("v3:example.com:delivered:0", "https://old.example/new"), ("v3:acme:example.com:delivered:1", "https://b.example/")],
        )
        self.assertEqual(self.call("DELETE", base + "/delivered")[0], 200)
        self.assertEqual(self.stored(), [])


class ReviewTests(DispatchCase):
    """issue 14 (review): fairness between clients, retries written per tick, leases written only when needed."""

    async def test_one_clients_hanging_receivers_do_not_starve_another(self) -> None:
        """
        issue 14 (review): client "hog" has 9 webhooks on 9 receivers that hold every
        request, 4 events each (36 POSTs, more than the 32 slots); acme's webhook gets
        its event at once, the hog holding only its 8; when its receivers answer again,
        the hog's events all arrive.
        """
        hogs = [Hooks(lambda: self.key("hog"), mode="hold") for _ in range(9)]
        for n, hooks in enumerate(hogs):
            self.webhook(self.serve(hooks), f"hog{n}", client="hog")
        healthy = Hooks(lambda: self.key())
        self.webhook(self.serve(healthy), "acme")
        dispatcher = self.dispatcher(max_per_receiver=4)
        self.delivered(*(f"h{n}@x.example" for n in range(4)), client="hog")
        self.delivered("a1@x.example")
        self.clock.advance(1)
        await wait_until(lambda: len(healthy.answered) == 1 and sum(len(h.held) for h in hogs) == 8, "acme's event")
        self.assertEqual(sum(len(h.received) for h in hogs), 8)
        for hooks in hogs:
            hooks.mode = "ok"
            hooks.release_all()
        await dispatcher.settled()
        self.assertEqual([sorted(h.recipients()) for h in hogs], [[f"h{n}@x.example" for n in range(4)]] * 9)

    async def test_retry_outcomes_written_in_one_transaction_per_tick(self) -> None:
        """
        issue 14 (review): five events refused by a receiver wait as retries; when they
        are due, one tick POSTs them and records the five outcomes (two delivered, three
        failed again) with one store write, not five.
        """
        hooks = Hooks(lambda: self.key(), mode="fail")
        self.webhook(self.serve(hooks))
        dispatcher = self.dispatcher()
        self.delivered(*(f"m{n}@x.example" for n in range(5)))
        await self.tick(dispatcher)
        self.assertEqual(len(hooks.received), 5)
        writes: list[int] = []
        finish = self.store.finish_webhook_retries

        async def counted(results: Any, lease: str) -> None:
            writes.append(len(results))
            await finish(results, lease)

        self.store.finish_webhook_retries = counted  # type: ignore[method-assign]
        hooks.mode = "ok"
        hooks.hold_after = None
        refuse = {"m1@x.example", "m3@x.example", "m4@x.example"}
        original = hooks.render_POST

        def some_fail(request: Request) -> bytes | int:
            answer = original(request)
            if hooks.received[-1]["recipient"] in refuse:
                hooks.answered.pop()
                request.setResponseCode(500)
            return answer

        hooks.render_POST = some_fail  # type: ignore[method-assign]
        await self.tick(dispatcher, RETRY_SCHEDULE[0])
        self.assertEqual(writes, [5])
        self.assertEqual(sorted(hooks.recipients()), ["m0@x.example", "m2@x.example"])
        waiting = self.retries()
        self.assertEqual(sorted((r.event.recipient, r.attempts) for r in waiting), [(a, 2) for a in sorted(refuse)])

    async def test_retries_recorded_as_they_end_not_when_the_slowest_does(self) -> None:
        """
        review 2 item 2: acme's and zeta's events wait as retries; when they are due,
        acme's receiver holds its POST while zeta's answers 200.  zeta's retry leaves the
        in-flight set as soon as its POST ends and is recorded (deleted) within
        RECORD_DELAY, one write, while acme's still hangs; acme's is recorded when it ends.
        """
        acme = Hooks(lambda: self.key(), mode="fail")
        zeta = Hooks(lambda: self.key("zeta"), mode="fail")
        self.webhook(self.serve(acme), "wa")
        self.webhook(self.serve(zeta), "wz", client="zeta")
        dispatcher = self.dispatcher()
        self.delivered("a@x.example")
        self.delivered("z@x.example", client="zeta")
        await self.tick(dispatcher)
        self.assertEqual((len(acme.received), len(zeta.received)), (1, 1))
        writes: list[list[str]] = []
        finish = self.store.finish_webhook_retries

        async def counted(results: Any, lease: str) -> None:
            writes.append([r.webhook.id for r, _, _ in results])
            await finish(results, lease)

        self.store.finish_webhook_retries = counted  # type: ignore[method-assign]
        acme.mode, zeta.mode = "hold", "ok"
        self.clock.advance(RETRY_SCHEDULE[0])
        await wait_until(lambda: zeta.answered and not any(w == "wz" for w, _ in dispatcher._retrying), "zeta's retry to end")
        self.assertEqual([w for w, _ in dispatcher._retrying], ["wa"])  # zeta's place is free already
        self.assertEqual(writes, [])  # kept: acme's retry is still in flight
        self.clock.advance(RECORD_DELAY)
        self.assertEqual(writes, [["wz"]])
        self.assertEqual(len(acme.held), 1)  # still hanging
        db = result(self, self.store.due_webhook_retries("probe", START + 10**7, START + 10**7 + 1, 1000))
        self.assertEqual([r.webhook.id for r in db], ["wa"])  # zeta's is deleted (delivered)
        acme.release_all()
        await dispatcher.settled()
        self.assertEqual(writes, [["wz"], ["wa"]])
        self.assertEqual(self.retries(), [])

    async def test_ticks_take_new_webhooks_and_renew_held_ones_every_third_of_the_lease(self) -> None:
        """
        issue 14 (review): ticks every second do not rewrite the rows of the webhooks the
        dispatcher holds (their lease end moves only every lease/3, and never lapses); a
        webhook added meanwhile is taken at the next tick and its events POSTed; one
        another dispatcher holds is not touched.
        """
        import sqlite3

        hooks = Hooks(lambda: self.key())
        url = self.serve(hooks)
        self.webhook(url, "theirs")
        result(self, self.store.lease_webhooks("other", START, START + 10**6))
        self.webhook(url, "w1")
        db = sqlite3.connect(self.path)
        self.addCleanup(db.close)

        def leases() -> dict[str, tuple[str | None, float | None]]:
            return {i: (lease, until) for i, lease, until in db.execute("SELECT id, lease, lease_until FROM webhooks")}

        dispatcher = self.dispatcher(lease_time=30.0)
        await dispatcher.settled()
        ends: list[float | None] = [leases()["w1"][1]]
        for second in range(1, 25):
            await self.tick(dispatcher)
            now = self.clock.seconds()
            found = leases()
            end = found["w1"][1]
            assert end is not None
            self.assertGreater(end, now + 15)  # never close to lapsing
            ends.append(end)
            if second == 12:
                self.webhook(url, "w2")
                self.delivered("new@x.example")
            if second == 13:  # taken by the next tick
                self.assertEqual(found["w2"], (dispatcher.lease, START + 13 + 30))
        self.assertEqual(sorted(set(ends)), [START + 30, START + 40, START + 50])
        found = leases()
        self.assertEqual(found["w2"], (dispatcher.lease, START + 50))  # and renewed with the others
        self.assertEqual(found["theirs"], ("other", START + 10**6))
        self.assertEqual(hooks.recipients().count("new@x.example"), 2)  # w1 and w2
