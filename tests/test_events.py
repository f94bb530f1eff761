"""
issue 14, the event log: what each state change of a message records, read through
``GET /events`` (the JSON API) and ``GET /v3/{domain}/events`` (Mailgun's) — Mailgun's
event-data (mmgun.events), Mailgun's paging, one client's events never another's — and
the feed's promise under concurrent writers from two processes.

Deliveries are real: the real Sender and ESMTP client on a MemoryReactorClock, wired in
memory to mmgun's scriptable ESMTP server (mmgun.testing.smtpserver: ``tempfail-1@``
greylists once, ``reject@`` is 550 5.1.1), over a real SQLite file, with the requests
made through StubTreq against the frontend's real root resource.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from typing import Any
from urllib.parse import urlsplit

from treq.testing import StubTreq
from twisted.trial.unittest import SynchronousTestCase

from mmgun.admin import DELETED_REPLY
from mmgun.auth import key_hash, new_key
from mmgun.cleaner import Cleaner
from mmgun.clients import Clients
from mmgun.events import event_data
from mmgun.mx import MXHost
from mmgun.sender import SenderSettings
from mmgun.store import FEED_START, Event, EventCursor
from mmgun.store.sqlite import SQLiteStore
from mmgun.web.app import Frontend

from .fakes import HARNESS_SETTINGS as SETTINGS, FakeRouter, Harness, smtp_server
from .helpers import result
from .test_mailgun_api import basic, form_data

MX = MXHost("mx.a.example", "127.0.0.2", 25)


class EventsHarness:
    """A frontend and a real sender on one store and one memory reactor; clients acme and globex with keys and domains."""

    def __init__(self, case: SynchronousTestCase, settings: SenderSettings = SETTINGS) -> None:
        self.case = case
        self.h = Harness(case)
        self.h.net.default = smtp_server(self.h.reactor, self.h.mailbox)
        self.store = self.h.store
        now = self.h.wall()
        self.keys: dict[str, str] = {}
        for client in ("acme", "globex"):
            result(case, self.store.add_client(client, now))
            key_id, key = new_key()
            result(case, self.store.add_key(client, key_id, key_hash(key), now))
            self.keys[client] = key
        for domain, client in (("example.com", "acme"), ("globex.example", "globex")):
            result(case, self.store.add_domain(domain, client, now))
        clients = Clients.from_ids([])
        self.frontend = Frontend(self.store, lambda: clients, self.h.reactor, hostname="mmgun.test", wall=self.h.wall)
        self.treq = StubTreq(self.frontend.resource())
        self.settings = settings
        self.sender: Any = None

    def start_sender(self) -> None:
        self.sender = self.h.sender(router=FakeRouter({"a.example": [MX]}), settings=self.settings)

    def request(self, method: str, url: str, *, client: str = "acme", body: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, Any]:
        if url.startswith("/"):
            url = "http://mmgun.test" + url
        all_headers = {**basic(self.keys[client]), **(headers or {})}
        d = self.treq.request(method, url, data=body, headers=all_headers)  # type: ignore[attr-defined]
        self.treq.flush()
        response = self.case.successResultOf(d)
        content = self.case.successResultOf(response.content())
        self.case.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/json"])
        return response.code, json.loads(content)

    def get(self, url: str, client: str = "acme", code: int = 200) -> Any:
        got, document = self.request("GET", url, client=client)
        self.case.assertEqual(got, code, document)
        return document

    def send(self, *to: str, client: str = "acme", domain: str = "example.com", **options: str) -> str:
        """A message from the v3 API; its Message-ID."""
        fields = [("from", f"ada@{domain}"), ("to", ", ".join(to)), ("subject", "s"), ("text", "hello"), *options.items()]
        body, content_type = form_data(fields)
        code, answer = self.request(
            "POST", f"/v3/{domain}/messages", client=client, body=body, headers={"Content-Type": content_type}
        )
        self.case.assertEqual(code, 200, answer)
        return str(answer["id"])

    def status(self, message_id: str, client: str = "acme") -> Any:
        code, answer = self.request("POST", "/status", client=client, body=json.dumps({"message_id": message_id}).encode())
        self.case.assertEqual(code, 200, answer)
        return answer

    def feed(self, client: str = "acme", after: str = "", limit: int = 1000) -> list[dict[str, Any]]:
        """Every event of the JSON API's feed after ``after``, following ``next``."""
        items: list[dict[str, Any]] = []
        while True:
            page = self.get(f"/events?after={after}&limit={limit}", client=client)
            items += page["items"]
            if not page["items"]:
                self.case.assertEqual(page["next"], after or str(FEED_START))
                return items
            after = page["next"]

    def v3_walk(self, url: str, link: str = "next", client: str = "acme") -> tuple[list[dict[str, Any]], str]:
        """Follow ``link`` from ``url`` until an empty page: every item, and the URL of that empty page."""
        items: list[dict[str, Any]] = []
        for _ in range(1000):
            page = self.get(url, client=client)
            if not page["items"]:
                return items, url
            items += page["items"]
            url = page["paging"][link]
        raise AssertionError("the walk never ended")


def summary(items: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """What tells the events of a delivery apart: kind, recipient, severity, reason, attempt, code, MX."""
    out = []
    for item in items:
        status = item.get("delivery-status", {})
        out.append(
            (item["event"], item["recipient"], item.get("severity"), item.get("reason"), status.get("attempt-no"), status.get("code"), status.get("mx-host"))
        )
    return out


class DeliveryEventsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.e = EventsHarness(self)
        self.e.start_sender()

    def test_greylisted_then_delivered(self) -> None:
        """issue 14 (event log): accepted, failed temporary (attempt 1, the 451, the MX), delivered (attempt 2) — in both APIs, in Mailgun's event-data."""
        message_id = self.e.send("tempfail-1@a.example", **{"o:tag": "welcome", "v:order": "42"})
        self.e.h.net.advance(1)
        self.assertEqual(self.e.status(message_id)["recipients"][0]["status"], "deferred")
        self.e.h.net.advance(SETTINGS.retry_max + 60, step=10)
        self.assertEqual(self.e.status(message_id)["status"], "sent")
        items = self.e.feed()
        self.assertEqual(
            summary(items),
            [
                ("accepted", "tempfail-1@a.example", None, None, None, None, None),
                ("failed", "tempfail-1@a.example", "temporary", "generic", 1, 451, "mx.a.example"),
                ("delivered", "tempfail-1@a.example", None, None, 2, 250, "mx.a.example"),
            ],
        )
        accepted, deferred, delivered = items
        bare_id = message_id.strip("<>")
        for item in items:
            self.assertEqual(item["message"]["headers"]["message-id"], bare_id)
            self.assertEqual(item["tags"], ["welcome"])
            self.assertEqual(item["user-variables"], {"order": "42"})
            self.assertEqual(item["envelope"]["sender"], "ada@example.com")
            self.assertEqual(item["recipient-domain"], "a.example")
            self.assertEqual(item["flags"], {"is-test-mode": False})
            self.assertIsInstance(item["timestamp"], float)
            self.assertRegex(item["submission-id"], "^[0-9a-f]{32}$")
        self.assertEqual([i["log-level"] for i in items], ["info", "warn", "info"])
        self.assertEqual(deferred["delivery-status"]["message"], "4.3.0 try again later")
        self.assertEqual(deferred["delivery-status"]["enhanced-code"], "4.3.0")
        self.assertGreater(delivered["timestamp"], deferred["timestamp"])
        self.assertNotIn("delivery-status", accepted)
        # The same events, the same documents, through Mailgun's API.
        v3, _ = self.e.v3_walk("/v3/example.com/events?ascending=yes")
        self.assertEqual(v3, items)
        # anymail's MailgunTrackingWebhookView reads these fields: the message id gets its brackets back there.
        self.assertEqual("<" + delivered["message"]["headers"]["message-id"] + ">", message_id)

    def test_hard_bounce_then_suppressed(self) -> None:
        """
        issue 14 (event log, suppression): 550 5.1.1 is failed permanent reason bounce and puts the
        address on the bounce list; the next message to it (any case) fails it at once,
        "suppressed: …", with a suppress-bounce event, while its other recipient is delivered.
        """
        first = self.e.send("reject@a.example")
        self.e.h.net.advance(1)
        self.assertEqual(self.e.status(first)["status"], "failed")
        entry = result(self, self.e.store.suppression("acme", "bounce", "reject@a.example"))
        self.assertIsNotNone(entry)
        self.assertEqual((entry.code, entry.error), ("550", "550 5.1.1 no such user"))
        bounce = self.e.feed()[-1]
        self.assertEqual(summary([bounce]), [("failed", "reject@a.example", "permanent", "bounce", 1, 550, "mx.a.example")])
        self.assertEqual(bounce["delivery-status"]["enhanced-code"], "5.1.1")
        self.assertEqual(bounce["log-level"], "error")
        seen = len(self.e.feed())

        second = self.e.send("REJECT@a.example", "friend@a.example")
        status = self.e.status(second)
        by_address = {r["address"]: r for r in status["recipients"]}
        self.assertEqual(by_address["REJECT@a.example"]["status"], "failed")
        self.assertEqual(by_address["REJECT@a.example"]["attempts"], 0)
        self.assertTrue(by_address["REJECT@a.example"]["last_reply"].startswith("suppressed: "), by_address)
        self.e.h.net.advance(1)
        self.assertEqual(self.e.status(second)["status"], "partial")
        self.assertEqual([sorted(m.recipients) for m in self.e.h.mailbox], [["friend@a.example"]])
        later = self.e.feed()[seen:]
        self.assertEqual(
            summary(later),
            [
                ("accepted", "REJECT@a.example", None, None, None, None, None),
                ("accepted", "friend@a.example", None, None, None, None, None),
                ("failed", "REJECT@a.example", "permanent", "suppress-bounce", 0, 605, None),
                ("delivered", "friend@a.example", None, None, 1, 250, "mx.a.example"),
            ],
        )
        self.assertIn("bounce list", later[2]["delivery-status"]["description"])
        # Mailgun's filter for permanent failures finds both.
        failed, _ = self.e.v3_walk("/v3/example.com/events?event=failed&severity=permanent&ascending=yes")
        self.assertEqual([i["reason"] for i in failed], ["bounce", "suppress-bounce"])

    def test_operator_delete_is_reason_deleted(self) -> None:
        """issue 14 (event log): `mmgun queue delete` fails a deferred recipient permanently: reason deleted, the operator's words."""
        message_id = self.e.send("tempfail-9@a.example")
        self.e.h.net.advance(1)
        (submission,) = {i["submission-id"] for i in self.e.feed()}
        self.e.h.net.advance(SETTINGS.retry_max + 60, step=10)  # past the lease of the second attempt
        result(self, self.e.store.fail_queued([submission], self.e.h.wall(), DELETED_REPLY))
        self.assertEqual(self.e.status(message_id)["status"], "failed")
        *earlier, last = self.e.feed()
        self.assertEqual((last["event"], last["severity"], last["reason"]), ("failed", "permanent", "deleted"))
        self.assertEqual(last["delivery-status"]["description"], DELETED_REPLY)
        # The attempts made before the operator gave up, each a temporary failure numbered 1, 2, …
        tries = [i["delivery-status"]["attempt-no"] for i in earlier if i.get("severity") == "temporary"]
        self.assertGreaterEqual(len(tries), 2)
        self.assertEqual(tries, list(range(1, len(tries) + 1)))
        self.assertEqual(last["delivery-status"]["attempt-no"], len(tries))


class ExpiryTests(SynchronousTestCase):
    def test_expiry_is_reason_expired(self) -> None:
        """issue 14 (event log): a recipient still deferred at the end of the queue lifetime fails permanently: reason expired, with the last reply's code."""
        e = EventsHarness(self, SenderSettings(poll_interval=1.0, retry_min=300.0, retry_max=600.0, lease_time=60.0, queue_lifetime=1000.0))
        e.start_sender()
        message_id = e.send("tempfail-99@a.example")
        e.h.net.advance(1200, step=10)
        self.assertEqual(e.status(message_id)["status"], "failed")
        items = e.feed()
        self.assertEqual([i.get("severity") for i in items[1:-1]], ["temporary"] * (len(items) - 2))
        last = items[-1]
        self.assertEqual((last["event"], last["severity"], last["reason"]), ("failed", "permanent", "expired"))
        self.assertEqual(last["delivery-status"]["code"], 451)
        self.assertTrue(last["delivery-status"]["description"].startswith("expired: "))


class IsolationTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.e = EventsHarness(self)
        self.e.send("a@a.example", **{"o:testmode": "yes"})
        self.e.send("b@a.example", client="globex", domain="globex.example", **{"o:testmode": "yes"})

    def test_each_client_sees_only_its_own(self) -> None:
        """issue 14 (event log): a client sees only its own events, through both APIs."""
        self.assertEqual({i["recipient"] for i in self.e.feed("acme")}, {"a@a.example"})
        self.assertEqual({i["recipient"] for i in self.e.feed("globex")}, {"b@a.example"})
        acme, _ = self.e.v3_walk("/v3/example.com/events?ascending=yes")
        self.assertEqual({i["recipient"] for i in acme}, {"a@a.example"})
        globex, _ = self.e.v3_walk("/v3/globex.example/events", client="globex")
        self.assertEqual({i["recipient"] for i in globex}, {"b@a.example"})

    def test_test_mode_is_flagged(self) -> None:
        """issue 14 (event log): a test-mode message is accepted then delivered with flags.is-test-mode, attempt 0."""
        items = self.e.feed("acme")
        self.assertEqual([i["event"] for i in items], ["accepted", "delivered"])
        self.assertEqual(items[1]["flags"], {"is-test-mode": True})
        self.assertEqual(items[1]["delivery-status"]["attempt-no"], 0)

    def test_another_clients_domain_is_not_found(self) -> None:
        """issue 14 (event log): /v3/{domain}/events of another client's domain, or an unknown one, is Mailgun's 404."""
        self.assertEqual(self.e.get("/v3/globex.example/events", code=404), {"message": "Domain not found: globex.example"})
        self.assertEqual(self.e.get("/v3/nobody.example/events", code=404), {"message": "Domain not found: nobody.example"})

    def test_a_page_token_carries_no_authority(self) -> None:
        """issue 14 (event log): another client's paging URL, replayed with one's own key and domain, shows one's own events only."""
        page = self.e.get("/v3/example.com/events?ascending=yes")
        token = urlsplit(page["paging"]["first"]).path.rpartition("/")[2]
        theirs = self.e.get(f"/v3/globex.example/events/{token}", client="globex")
        self.assertEqual({i["recipient"] for i in theirs["items"]}, {"b@a.example"})
        self.e.get(f"/v3/example.com/events/{token}", client="globex", code=404)

    def test_unauthenticated_is_401(self) -> None:
        """issue 14 (event log): no key, no events."""
        for path in ("/events", "/v3/example.com/events"):
            d = self.e.treq.get("http://mmgun.test" + path)  # type: ignore[attr-defined]
            self.e.treq.flush()
            self.assertEqual(self.successResultOf(d).code, 401)


class PagingTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.e = EventsHarness(self)
        for i in range(7):
            self.e.send(f"user{i}@a.example", **{"o:testmode": "yes"})
        self.all = self.e.feed()
        self.assertEqual(len(self.all), 14)

    def ids(self, items: list[dict[str, Any]]) -> list[str]:
        return [i["id"] for i in items]

    def test_next_and_previous_walk_every_event_once_ascending(self) -> None:
        """issue 14 (event log): limit=3 ascending: the next URLs give every event once in feed order; previous URLs walk back over all of them once."""
        forward, tail = self.e.v3_walk("/v3/example.com/events?ascending=yes&limit=3")
        self.assertEqual(self.ids(forward), self.ids(self.all))
        last_page = self.e.get(tail)
        self.assertEqual(last_page["items"], [])
        self.assertEqual(last_page["paging"]["next"], tail, "an empty tail answers the same next URL")
        back, _ = self.e.v3_walk(last_page["paging"]["previous"], "previous")
        # Each page in the walk's order, the pages from the newest: [11 12 13] [8 9 10] … [0 1].
        pages = [self.all[max(0, end - 3) : end] for end in range(14, 0, -3)]
        self.assertEqual(self.ids(back), self.ids([item for page in pages for item in page]))

    def test_descending_walk(self) -> None:
        """issue 14 (event log): ascending=no walks newest first, every event once; its previous URLs walk back to the newest."""
        backward, tail = self.e.v3_walk("/v3/example.com/events?ascending=no&limit=4")
        self.assertEqual(self.ids(backward), self.ids(self.all)[::-1])
        again, _ = self.e.v3_walk(self.e.get(tail)["paging"]["previous"], "previous")
        # Newest first within a page, the pages from the oldest: [3 2 1 0] [7 6 5 4] … [13 12].
        pages = [self.all[start : start + 4][::-1] for start in range(0, 14, 4)]
        self.assertEqual(self.ids(again), self.ids([item for page in pages for item in page]))

    def test_first_and_last(self) -> None:
        """issue 14 (event log): paging.first is the first page of the walk, paging.last its last."""
        page = self.e.get("/v3/example.com/events?ascending=yes&limit=5")
        self.assertEqual(self.ids(self.e.get(page["paging"]["first"])["items"]), self.ids(self.all[:5]))
        self.assertEqual(self.ids(self.e.get(page["paging"]["last"])["items"]), self.ids(self.all[-5:]))

    def test_polling_the_next_url_finds_new_events(self) -> None:
        """issue 14 (event log): Mailgun's polling: the empty tail's next URL later answers the events committed since."""
        _, tail = self.e.v3_walk("/v3/example.com/events?ascending=yes&limit=300")
        self.e.send("late@a.example", **{"o:testmode": "yes"})
        page = self.e.get(tail)
        self.assertEqual([i["recipient"] for i in page["items"]], ["late@a.example"] * 2)

    def test_urls_are_absolute_from_the_host(self) -> None:
        """issue 14 (event log): paging URLs are absolute, built from the request's Host, as Mailgun's /v3/{domain}/events/{token}."""
        code, page = self.e.request("GET", "http://relay.example:8080/v3/example.com/events?limit=2")
        self.assertEqual(code, 200)
        for link in ("first", "last", "next", "previous"):
            self.assertRegex(page["paging"][link], r"^http://relay\.example:8080/v3/example\.com/events/[A-Za-z0-9_-]+$")

    def test_filters(self) -> None:
        """issue 14 (event log): event, recipient, begin/end (epoch or RFC 2822) filter the v3 walk."""
        delivered, _ = self.e.v3_walk("/v3/example.com/events?event=delivered&ascending=yes&limit=2")
        self.assertEqual(self.ids(delivered), [i["id"] for i in self.all if i["event"] == "delivered"])
        one, _ = self.e.v3_walk("/v3/example.com/events?recipient=user3@a.example")
        self.assertEqual({i["recipient"] for i in one}, {"user3@a.example"})
        self.assertEqual(len(one), 2)
        when = self.all[0]["timestamp"]
        inside, _ = self.e.v3_walk(f"/v3/example.com/events?begin={when - 1}&end={when + 1}")
        self.assertEqual(len(inside), 14)
        rfc2822 = time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime(when + 10))
        after, _ = self.e.v3_walk(f"/v3/example.com/events?begin={rfc2822.replace(' ', '%20').replace('+', '%2B')}&ascending=yes")
        self.assertEqual(after, [])
        none, _ = self.e.v3_walk("/v3/example.com/events?event=opened")
        self.assertEqual(none, [])

    def test_bad_requests(self) -> None:
        """issue 14 (event log): a bad token, limit, date, filter or cursor is a 400 naming it, in each API's shape."""
        cases = [
            ("/v3/example.com/events/not-a-token", "page token"),
            ("/v3/example.com/events/" + base64.urlsafe_b64encode(b'{"p":"1-1"}').decode().rstrip("="), "page token"),
            # Crafted tokens whose fields have the wrong types (once a 500).
            ("/v3/example.com/events/" + base64.urlsafe_b64encode(b'{"p":1,"a":true,"b":false,"l":1,"f":{}}').decode().rstrip("="), "page token"),
            ("/v3/example.com/events/" + base64.urlsafe_b64encode(b'[1,2]').decode().rstrip("="), "page token"),
            ("/v3/example.com/events?limit=301", "'limit'"),
            ("/v3/example.com/events?limit=0", "'limit'"),
            ("/v3/example.com/events?begin=yesterday", "'begin'"),
            ("/v3/example.com/events?event=bounced", "'event'"),
            ("/v3/example.com/events?severity=bad", "'severity'"),
            ("/v3/example.com/events?ascending=maybe", "'ascending'"),
            ("/v3/example.com/events?subject=x", "not supported"),
            ("/v3/example.com/events?limit=1&limit=2", "more than once"),
        ]
        for path, words in cases:
            answer = self.e.get(path, code=400)
            self.assertEqual(list(answer), ["message"])
            self.assertIn(words, answer["message"], path)
        for path, words in [("/events?after=nope", "'after'"), ("/events?limit=1001", "'limit'"), ("/events?x=1", "unknown")]:
            answer = self.e.get(path, code=400)
            self.assertEqual(answer["result"], "error")
            self.assertIn(words, answer["message"], path)

    def test_json_feed_pages(self) -> None:
        """issue 14 (event log): /events?after=&limit=: next is the last item's cursor, or the given after when nothing is new."""
        first = self.e.get("/events?limit=5")
        self.assertEqual(self.ids(first["items"]), self.ids(self.all[:5]))
        self.assertEqual(first["next"], self.all[4]["id"])
        end = self.e.get(f"/events?after={self.all[-1]['id']}")
        self.assertEqual(end["items"], [])
        self.assertEqual(end["next"], self.all[-1]["id"])


class RetentionTests(SynchronousTestCase):
    def test_cleaner_removes_events_with_their_submission(self) -> None:
        """issue 14 (event log): events expire with --retention: the cleaner deletes them with their submission."""
        e = EventsHarness(self)
        e.send("old@a.example", **{"o:testmode": "yes"})
        e.h.reactor.advance(3600)
        e.send("new@a.example", **{"o:testmode": "yes"})
        cleaner = Cleaner(e.store, e.h.reactor, interval=60, retention=1800, wall=e.h.wall)
        self.assertEqual(self.successResultOf(cleaner.clean()), 1)
        self.assertEqual({i["recipient"] for i in e.feed()}, {"new@a.example"})


class EventDataTests(SynchronousTestCase):
    def event(self, **changes: Any) -> Event:
        base = dict(
            cursor=EventCursor(3, 9), client="acme", domain="example.com", submission_id="f" * 32, recipient="Bob@X.example",
            event="failed", severity="permanent", reason="expired", attempt=4,
            reply="expired: not delivered within the queue lifetime; last reply: 451 4.7.1 greylisted", mx_host=None,
            created_at=1.5, message_id="<a@b>", sender="ada@example.com", tags=("t",), metadata='{"k": 1}',
        )
        base.update(changes)
        return Event(**base)  # type: ignore[arg-type]

    def test_mmgun_words_are_the_description_with_the_quoted_code(self) -> None:
        """issue 14 (event-data): mmgun's own reason text goes to description; the quoted SMTP reply gives code and message."""
        status = event_data(self.event())["delivery-status"]
        self.assertEqual((status["code"], status["message"], status["enhanced-code"]), (451, "4.7.1 greylisted", "4.7.1"))
        self.assertTrue(status["description"].startswith("expired: "))

    def test_suppressed_codes_are_mailguns(self) -> None:
        """issue 14 (event-data): a suppressed recipient gets Mailgun's 605/606/607."""
        for reason, code in (("suppress-bounce", 605), ("suppress-unsubscribe", 606), ("suppress-complaint", 607)):
            data = event_data(self.event(reason=reason, reply="suppressed: the address is on this client's x list", attempt=0))
            self.assertEqual(data["delivery-status"]["code"], code)

    def test_is_json_and_names_every_mailgun_field(self) -> None:
        """issue 14 (event-data): the fields anymail and Mailgun's handlers read are all there, JSON-serializable."""
        data = json.loads(json.dumps(event_data(self.event())))
        for field in ("id", "event", "timestamp", "log-level", "recipient", "recipient-domain", "tags", "user-variables", "message", "envelope", "delivery-status", "severity", "reason", "flags"):
            self.assertIn(field, data)
        self.assertEqual(data["recipient-domain"], "x.example")
        self.assertEqual(data["message"]["headers"]["message-id"], "a@b")
        self.assertEqual(data["id"], "3-9")


#: The writer of the two-process test: adds submissions and records each one's delivery, in a bounded loop.
WRITER = r"""
import sys, uuid
from twisted.internet.defer import ensureDeferred
from mmgun.store import EnvelopeOutcome, NewSubmission, RecipientOutcome
from mmgun.store.sqlite import SQLiteStore

path, name, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
store = SQLiteStore.open_sync(path)

def run(coroutine):
    box = []
    ensureDeferred(coroutine).addBoth(box.append)
    (value,) = box
    if hasattr(value, "raiseException"):
        value.raiseException()
    return value

for i in range(count):
    sid = run(store.add_submission(NewSubmission(uuid.uuid4().hex, "acme", "w@example.com", (f"{name}-{i}@a.example",), b"Subject: x\r\n\r\nhi\r\n", 1.0e9 + i)))
    print(sid, flush=True)
    for envelope in run(store.claim(name, 1.0e9 + i, 60, 5)):
        outcome = EnvelopeOutcome(envelope, tuple(RecipientOutcome(a, "sent", "250 ok", mx_host="mx") for a in envelope.recipients), None)
        run(store.record([outcome], 1.0e9 + i))
# What is left (the other writer's newest, claimed by neither yet): drained, each recorded once.
while True:
    envelopes = run(store.claim(name, 2.0e9, 60, 50))
    if not envelopes:
        break
    run(store.record([EnvelopeOutcome(e, tuple(RecipientOutcome(a, "sent", "250 ok", mx_host="mx") for a in e.recipients), None) for e in envelopes], 2.0e9))
run(store.close())
"""


class ConcurrentWritersTests(SynchronousTestCase):
    COUNT = 1500

    def test_feed_has_no_gap_and_no_repeat_under_two_writer_processes(self) -> None:
        """
        issue 14 (event log): two OS processes commit submissions and deliveries to one SQLite
        file while this reader follows the feed from its last cursor: every event (2 × 1,500
        accepted + 2 × 1,500 delivered) is seen exactly once, in commit order.
        """
        path = self.mktemp() + "-feed.sqlite3"
        reader = SQLiteStore.open_sync(path)
        self.addCleanup(lambda: result(self, reader.close()))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), *sys.path])}
        writers = [
            subprocess.Popen([sys.executable, "-c", WRITER, path, name, str(self.COUNT)], stdout=subprocess.PIPE, env=env, text=True)
            for name in ("one", "two")
        ]
        for writer in writers:
            assert writer.stdout is not None
            self.addCleanup(writer.stdout.close)
            self.addCleanup(writer.wait)
            self.addCleanup(writer.kill)
        seen: list[Event] = []
        last = FEED_START
        deadline = time.monotonic() + 120
        finished = False
        reads_while_writing = 0
        while True:
            batch = result(self, reader.events("acme", start=last, limit=500))
            seen += batch
            if batch:
                last = batch[-1].cursor
                reads_while_writing += not finished
            elif finished:
                break
            else:
                # Checked after a read that found nothing: any commit before the exit is read next time round.
                finished = all(w.poll() is not None for w in writers)
            self.assertLess(time.monotonic(), deadline, "the writers did not finish in time")
        self.assertEqual([w.returncode for w in writers], [0, 0])
        submissions = {line.strip() for w in writers for line in w.stdout}  # type: ignore[union-attr]
        self.assertEqual(len(submissions), 2 * self.COUNT)
        keys = [(e.submission_id, e.event) for e in seen]
        self.assertEqual(len(keys), len(set(keys)), "an event was seen twice")
        self.assertEqual(set(keys), {(s, kind) for s in submissions for kind in ("accepted", "delivered")})
        cursors = [e.cursor for e in seen]
        self.assertEqual(cursors, sorted(cursors))
        self.assertEqual(len(set(cursors)), len(cursors))
        order = {key: n for n, key in enumerate(keys)}
        self.assertTrue(all(order[(s, "accepted")] < order[(s, "delivered")] for s in submissions))
        # The reader followed the writers (many reads found new events), not caught up once at the end.
        self.assertGreater(reads_while_writing, 10)
