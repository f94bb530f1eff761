"""
issue 14, suppression lists: Mailgun's /v3/{domain}/bounces, /unsubscribes and /complaints
and the JSON API's /suppressions through StubTreq against the real root resource over a real
SQLite file; what a suppressed recipient becomes at submission (/status and the queue);
``mmgun suppressions``; :func:`mmgun.bounces.mailbox_gone` on real-world replies; and, end to
end, Mailgun's official Python SDK against the whole relay (real sender, in-process DNS and
SMTP servers on 127.0.0.1): a 550 5.1.1 puts the address on the bounce list, the next send
to it fails at once while its other recipient is delivered.
"""

from __future__ import annotations

import base64
import json
from typing import Any
from urllib.parse import parse_qs, urlsplit

from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase

from mmgun.auth import key_hash, new_key
from mmgun.bounces import mailbox_gone
from mmgun.store import Suppression

from .helpers import make_api, result
from .test_admin import AdminCase, make_store
from .test_mailgun_api import form_data, like_the_frontend
from .test_mailgun_sdk import RelayTestCase, _reactor

SUPPRESSED_BOUNCE = "suppressed: the address is on this client's bounce list"


def basic(key: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"api:{key}".encode()).decode()}


class APICase(SynchronousTestCase):
    """Two clients with keys: acme (sending domain example.com) and globex (globex.example)."""

    def setUp(self) -> None:
        self.api, self.store, self.clock = make_api(self)
        like_the_frontend(self.api.treq)
        self.keys: dict[str, str] = {}
        for client in ("acme", "globex"):
            result(self, self.store.add_client(client, self.clock.seconds()))
            key_id, key = new_key()
            result(self, self.store.add_key(client, key_id, key_hash(key), self.clock.seconds()))
            self.keys[client] = key
        result(self, self.store.add_domain("example.com", "acme", self.clock.seconds()))
        result(self, self.store.add_domain("globex.example", "globex", self.clock.seconds()))

    def call(
        self, method: str, path: str, *, client: str = "acme", body: bytes | None = None, content_type: str | None = None
    ) -> tuple[int, Any]:
        headers = basic(self.keys[client])
        if content_type is not None:
            headers["Content-Type"] = content_type
        d = self.api.treq.request(method, "http://mmgun.test" + path, data=body, headers=headers)  # type: ignore[attr-defined]
        self.api.treq.flush()
        response = self.successResultOf(d)
        content = self.successResultOf(response.content())
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/json"])
        return response.code, json.loads(content)

    def form(self, path: str, fields: list[tuple[str, str]], client: str = "acme") -> tuple[int, Any]:
        body, content_type = form_data(list(fields))
        return self.call("POST", path, client=client, body=body, content_type=content_type)

    def post_json(self, path: str, document: Any, client: str = "acme") -> tuple[int, Any]:
        return self.call("POST", path, client=client, body=json.dumps(document).encode(), content_type="application/json")

    def entries(self, kind: str, client: str = "acme") -> list[Suppression]:
        found: list[Suppression] = result(self, self.store.suppressions(client, kind, limit=10_000))
        return found

    def addresses(self, kind: str, client: str = "acme") -> list[str]:
        return [e.address for e in self.entries(kind, client)]

    def send(self, recipients: list[str], **fields: Any) -> str:
        document = {"sender": "ada@example.com", "recipients": recipients, "subject": "s", "body": "b", **fields}
        code, answer = self.call("POST", "/send", body=json.dumps(document).encode())
        self.assertEqual(code, 200, answer)
        submission_id: str = answer["submission_id"]
        return submission_id

    def status(self, submission_id: str) -> dict[str, Any]:
        code, answer = self.call("POST", "/status", body=json.dumps({"submission_id": submission_id}).encode())
        self.assertEqual(code, 200, answer)
        return answer

    def queued_recipients(self) -> list[str]:
        claimed = result(self, self.store.claim("test", self.clock.seconds(), 60, 1000))
        return sorted(r for envelope in claimed for r in envelope.recipients)


class V3Tests(APICase):
    def test_each_table_add_get_delete_one(self) -> None:
        """issue 14 item 1 (v3): each table adds one entry from form fields, shows it, deletes it, then 404s with Mailgun's message."""
        cases = [
            ("bounces", [("address", "bob@x.example"), ("code", "550"), ("error", "No such mailbox")],
             {"address": "bob@x.example", "code": "550", "error": "No such mailbox"}, "Address not found in bounces table",
             "Bounced address has been removed"),
            ("unsubscribes", [("address", "bob@x.example"), ("tag", "newsletter")],
             {"address": "bob@x.example", "tags": ["newsletter"]}, "Address not found in unsubscribers table",
             "Unsubscribe event has been removed"),
            ("complaints", [("address", "bob@x.example")], {"address": "bob@x.example"},
             "No spam complaints found for this address", "Spam complaint has been removed"),
        ]
        for table, fields, shown, missing, removed in cases:
            code, answer = self.form(f"/v3/example.com/{table}", fields)
            self.assertEqual((code, answer), (200, {"message": f"Address has been added to the {table} table", "address": "bob@x.example"}))
            code, item = self.call("GET", f"/v3/example.com/{table}/bob%40x.example")
            self.assertEqual(code, 200, item)
            self.assertEqual(item.pop("created_at"), "Fri, 15 Jan 2027 08:00:00 UTC")
            self.assertEqual(item, shown)
            self.assertEqual(self.call("DELETE", f"/v3/example.com/{table}/bob@x.example"), (200, {"message": removed, "address": "bob@x.example"}))
            self.assertEqual(self.call("GET", f"/v3/example.com/{table}/bob@x.example"), (404, {"message": missing}))
            self.assertEqual(self.call("DELETE", f"/v3/example.com/{table}/bob@x.example"), (404, {"message": missing}))

    def test_many_from_json_then_pages_walk_both_ways(self) -> None:
        """
        issue 14 item 1 (v3): a JSON array adds many in one request; Mailgun's paging
        (page=next&address=…&limit=…) walks the list in address order, every entry once,
        forward and back; page=last ends it; past the end the page is empty.
        """
        entries = [{"address": f"user{i}@x.example", "code": 550, "error": f"e{i}", "created_at": "Thu, 13 Oct 2011 18:02:00 UTC"} for i in (4, 0, 3, 1, 2)]
        self.assertEqual(self.post_json("/v3/example.com/bounces", entries), (200, {"message": "5 addresses have been added to the bounces table"}))
        code, page = self.call("GET", "/v3/example.com/bounces?limit=2")
        self.assertEqual(code, 200, page)
        self.assertEqual(page["items"][0], {"address": "user0@x.example", "code": "550", "error": "e0", "created_at": "Thu, 13 Oct 2011 18:02:00 UTC"})
        seen = [i["address"] for i in page["items"]]
        self.assertEqual(page["paging"]["first"], "http://mmgun.test/v3/example.com/bounces?page=first&limit=2")
        self.assertEqual(page["paging"]["next"], "http://mmgun.test/v3/example.com/bounces?page=next&address=user1%40x.example&limit=2")
        pages = 1
        while True:
            url = urlsplit(page["paging"]["next"])
            code, page = self.call("GET", url.path + "?" + url.query)
            self.assertEqual(code, 200, page)
            if not page["items"]:
                break
            seen += [i["address"] for i in page["items"]]
            pages += 1
        self.assertEqual((seen, pages), ([f"user{i}@x.example" for i in range(5)], 3))
        code, page = self.call("GET", "/v3/example.com/bounces?page=last&limit=2")
        self.assertEqual([i["address"] for i in page["items"]], ["user3@x.example", "user4@x.example"])
        back = [i["address"] for i in page["items"]]
        while True:
            url = urlsplit(page["paging"]["previous"])
            self.assertEqual(parse_qs(url.query)["page"], ["previous"])
            code, page = self.call("GET", url.path + "?" + url.query)
            if not page["items"]:
                break
            back = [i["address"] for i in page["items"]] + back
        self.assertEqual(back, seen)

    def test_bad_entry_in_array_stores_nothing(self) -> None:
        """issue 14 item 1 (validation): one bad entry of an array is a 400 naming it, and none of the array is stored."""
        entries: list[dict[str, Any]] = [{"address": "a@x.example"}, {"address": "b@x.example"}, {"address": "not an address"}]
        code, answer = self.post_json("/v3/example.com/bounces", entries)
        self.assertEqual(code, 400)
        self.assertIn("'[2].address'", answer["message"])
        for bad, field in (({"address": "c@x.example", "code": "5500"}, "'[1].code'"), ({"address": "c@x.example", "color": "red"}, "'[1].color'"),
                           ({"address": "c@x.example", "error": "a\r\nb"}, "'[1].error'"), ({"address": "c@x.example", "created_at": "yesterday"}, "'[1].created_at'")):
            code, answer = self.post_json("/v3/example.com/bounces", [{"address": "a@x.example"}, bad])
            self.assertEqual(code, 400, bad)
            self.assertIn(field, answer["message"])
        self.assertEqual(self.addresses("bounce"), [])

    def test_at_most_1000_entries(self) -> None:
        """issue 14 item 1 (limits): 1000 entries are added at once; 1001 are refused, none stored."""
        entries = [{"address": f"u{i}@x.example"} for i in range(1001)]
        code, answer = self.post_json("/v3/example.com/unsubscribes", entries)
        self.assertEqual(code, 400)
        self.assertIn("1000", answer["message"])
        self.assertEqual(self.addresses("unsubscribe"), [])
        self.assertEqual(self.post_json("/v3/example.com/unsubscribes", entries[:1000])[0], 200)
        self.assertEqual(len(self.addresses("unsubscribe")), 1000)
        code, answer = self.call("GET", "/v3/example.com/unsubscribes?limit=10001")
        self.assertEqual(code, 400)
        self.assertEqual(len(self.call("GET", "/v3/example.com/unsubscribes?limit=10000")[1]["items"]), 1000)

    def test_addresses_are_lower_case_and_match_any_case(self) -> None:
        """issue 14 item 1 (validation): an address is stored lower case (domain IDNA-encoded) and found in any case."""
        self.assertEqual(self.form("/v3/example.com/complaints", [("address", "Bob.Smith@MÜNCHEN.example")])[1]["address"], "bob.smith@xn--mnchen-3ya.example")
        self.assertEqual(self.call("GET", "/v3/example.com/complaints/BOB.smith%40xn--MNCHEN-3ya.example")[0], 200)
        self.assertEqual(self.addresses("complaint"), ["bob.smith@xn--mnchen-3ya.example"])

    def test_delete_all_empties_only_that_list(self) -> None:
        """issue 14 item 1 (v3): DELETE /v3/{domain}/bounces removes every bounce, no unsubscribe."""
        self.post_json("/v3/example.com/bounces", [{"address": "a@x.example"}, {"address": "b@x.example"}])
        self.form("/v3/example.com/unsubscribes", [("address", "a@x.example")])
        self.assertEqual(self.call("DELETE", "/v3/example.com/bounces"), (200, {"message": "Bounced addresses for this domain have been removed"}))
        self.assertEqual((self.addresses("bounce"), self.addresses("unsubscribe")), ([], ["a@x.example"]))

    def test_another_clients_domain_is_not_found_and_lists_are_per_client(self) -> None:
        """
        issue 14 item 3 (isolation): another client's domain answers 404 "Domain not found"
        for every operation and changes nothing; the same address on two clients' lists is
        two entries, each seen and removed only by its own client.
        """
        self.form("/v3/example.com/bounces", [("address", "bob@x.example")])
        for method, path in (("GET", "/v3/example.com/bounces"), ("GET", "/v3/example.com/bounces/bob@x.example"),
                             ("DELETE", "/v3/example.com/bounces/bob@x.example"), ("DELETE", "/v3/example.com/bounces"),
                             ("GET", "/v3/unknown.example/bounces")):
            self.assertEqual(self.call(method, path, client="globex")[0], 404)
        code, answer = self.form("/v3/example.com/bounces", [("address", "eve@x.example")], client="globex")
        self.assertEqual((code, answer), (404, {"message": "Domain not found: example.com"}))
        self.assertEqual(self.call("GET", "/v3/globex.example/bounces", client="globex")[1]["items"], [])
        self.assertEqual(self.call("GET", "/v3/globex.example/bounces/bob@x.example", client="globex")[0], 404)
        self.form("/v3/globex.example/bounces", [("address", "bob@x.example")], client="globex")
        self.assertEqual(self.call("DELETE", "/v3/globex.example/bounces", client="globex")[0], 200)
        self.assertEqual((self.addresses("bounce"), self.addresses("bounce", "globex")), (["bob@x.example"], []))

    def test_unsubscribe_tags_and_removing_one_tag(self) -> None:
        """issue 14 item 1 (v3): an unsubscribe keeps its tags ("*" or none: all mail); DELETE ?tag= removes one tag, the last one the entry."""
        self.post_json("/v3/example.com/unsubscribes", [{"address": "a@x.example", "tags": ["news", "promo"]}, {"address": "b@x.example", "tag": "*"}, {"address": "c@x.example"}])
        items = {i["address"]: i["tags"] for i in self.call("GET", "/v3/example.com/unsubscribes")[1]["items"]}
        self.assertEqual(items, {"a@x.example": ["news", "promo"], "b@x.example": ["*"], "c@x.example": ["*"]})
        self.assertEqual(self.call("DELETE", "/v3/example.com/unsubscribes/a@x.example?tag=news")[0], 200)
        self.assertEqual(self.call("GET", "/v3/example.com/unsubscribes/a@x.example")[1]["tags"], ["promo"])
        self.assertEqual(self.call("DELETE", "/v3/example.com/unsubscribes/a@x.example?tag=news")[0], 404)
        self.assertEqual(self.call("DELETE", "/v3/example.com/unsubscribes/a@x.example?tag=promo")[0], 200)
        self.assertEqual(self.addresses("unsubscribe"), ["b@x.example", "c@x.example"])

    def test_bad_requests_are_mailgun_errors(self) -> None:
        """issue 14 item 1 (validation): unknown parameters or fields, a file, a bad page: 400 in Mailgun's shape, nothing stored."""
        for path in ("/v3/example.com/bounces?page=next", "/v3/example.com/bounces?page=sideways", "/v3/example.com/bounces?limit=0",
                     "/v3/example.com/bounces?term=a", "/v3/example.com/bounces?limit=1&limit=2"):
            code, answer = self.call("GET", path)
            self.assertEqual((code, list(answer)), (400, ["message"]), path)
        body, content_type = form_data([("address", "a@x.example"), ("code", "550"), ("code", "551")])
        self.assertEqual(self.call("POST", "/v3/example.com/bounces", body=body, content_type=content_type)[0], 400)
        body, content_type = form_data([("address", ("a.txt", b"a@x.example"))])
        self.assertEqual(self.call("POST", "/v3/example.com/bounces", body=body, content_type=content_type)[0], 400)
        self.assertEqual(self.form("/v3/example.com/complaints", [("address", "a@x.example"), ("code", "550")])[0], 400)
        self.assertEqual(self.call("POST", "/v3/example.com/bounces", body=b"[{", content_type="application/json")[0], 400)
        self.assertEqual(self.call("PUT", "/v3/example.com/bounces")[0], 405)
        self.assertEqual([self.addresses(k) for k in ("bounce", "complaint")], [[], []])


class JSONAPITests(APICase):
    def test_add_list_look_up_remove(self) -> None:
        """issue 14 item 1 (JSON API): POST one and many, GET a page and the next, GET by address, DELETE one and all."""
        self.assertEqual(self.post_json("/suppressions", {"kind": "bounce", "address": "Zed@X.example", "code": "550", "error": "550 5.1.1 no such user"}),
                         (200, {"result": "success", "added": 1}))
        self.assertEqual(self.post_json("/suppressions", {"kind": "bounce", "entries": [{"address": f"u{i}@x.example"} for i in range(3)]})[1]["added"], 3)
        self.post_json("/suppressions", {"kind": "unsubscribe", "address": "zed@x.example", "tags": ["news"]})
        code, page = self.call("GET", "/suppressions?kind=bounce&limit=3")
        self.assertEqual((code, [i["address"] for i in page["items"]], page["next"]), (200, ["u0@x.example", "u1@x.example", "u2@x.example"], "u2@x.example"))
        code, page = self.call("GET", "/suppressions?kind=bounce&limit=3&after=u2%40x.example")
        self.assertEqual(page["items"], [{"kind": "bounce", "address": "zed@x.example", "created_at": "2027-01-15T08:00:00.000Z", "code": "550", "error": "550 5.1.1 no such user"}])
        self.assertIsNone(page["next"])
        code, found = self.call("GET", "/suppressions?address=ZED%40x.example")
        self.assertEqual([(i["kind"], i.get("tags")) for i in found["items"]], [("bounce", None), ("unsubscribe", ["news"])])
        self.assertEqual(self.call("DELETE", "/suppressions?kind=bounce&address=zed@x.example"), (200, {"result": "success", "removed": 1}))
        self.assertEqual(self.call("DELETE", "/suppressions?kind=bounce&address=zed@x.example")[0], 404)
        self.assertEqual(self.call("DELETE", "/suppressions?kind=bounce&all=true"), (200, {"result": "success", "removed": 3}))
        self.assertEqual((self.addresses("bounce"), self.addresses("unsubscribe")), ([], ["zed@x.example"]))

    def test_bad_requests_change_nothing(self) -> None:
        """issue 14 item 1 (JSON API, validation): each mistake is a 400 naming it, in the JSON API's error shape; nothing stored or removed."""
        self.post_json("/suppressions", {"kind": "complaint", "address": "keep@x.example"})
        for method, path, document in [
            ("GET", "/suppressions", None),
            ("GET", "/suppressions?kind=spam", None),
            ("GET", "/suppressions?kind=bounce&limit=1001", None),
            ("GET", "/suppressions?kind=bounce&color=red", None),
            ("GET", "/suppressions?address=keep@x.example&after=a", None),
            ("DELETE", "/suppressions?kind=complaint", None),
            ("DELETE", "/suppressions?kind=complaint&all=yes", None),
            ("DELETE", "/suppressions?kind=complaint&all=true&address=keep@x.example", None),
            ("POST", "/suppressions", {"address": "a@x.example"}),
            ("POST", "/suppressions", {"kind": "bounce"}),
            ("POST", "/suppressions", {"kind": "bounce", "address": "a@x.example", "tags": ["x"]}),
            ("POST", "/suppressions", {"kind": "unsubscribe", "address": "a@x.example", "tags": ["x" * 129]}),
            ("POST", "/suppressions", {"kind": "bounce", "entries": []}),
            ("POST", "/suppressions", {"kind": "bounce", "entries": [{"address": "a@x.example"}, "b@x.example"]}),
            ("POST", "/suppressions", {"kind": "bounce", "entries": [{"address": "a@x.example"}], "code": "550"}),
            ("POST", "/suppressions", {"kind": "bounce", "address": "a@x.example", "client_id": "test-client-aaaaaaaaaaaaaaaa"}),
            ("POST", "/suppressions", [{"kind": "bounce", "address": "a@x.example"}]),
        ]:
            body = json.dumps(document).encode() if document is not None else None
            code, answer = self.call(method, path, body=body)
            self.assertEqual((code, answer["result"]), (400, "error"), (method, path, document, answer))
        self.assertEqual([self.addresses(k) for k in ("bounce", "complaint", "unsubscribe")], [[], ["keep@x.example"], []])

    def test_clients_never_see_or_change_each_others_lists(self) -> None:
        """issue 14 item 3 (isolation): globex's GET, DELETE and clear never show or touch acme's entries."""
        self.post_json("/suppressions", {"kind": "bounce", "address": "bob@x.example"})
        self.assertEqual(self.call("GET", "/suppressions?kind=bounce", client="globex")[1]["items"], [])
        self.assertEqual(self.call("GET", "/suppressions?address=bob@x.example", client="globex")[1]["items"], [])
        self.assertEqual(self.call("DELETE", "/suppressions?kind=bounce&address=bob@x.example", client="globex")[0], 404)
        self.assertEqual(self.call("DELETE", "/suppressions?kind=bounce&all=true", client="globex")[1]["removed"], 0)
        self.assertEqual(self.addresses("bounce"), ["bob@x.example"])

    def test_needs_a_key(self) -> None:
        """issue 14 item 1 (JSON API): without credentials every method is a 401."""
        for method in ("GET", "POST", "DELETE"):
            d = self.api.treq.request(method, "http://mmgun.test/suppressions?kind=bounce")  # type: ignore[attr-defined]
            self.api.treq.flush()
            self.assertEqual(self.successResultOf(d).code, 401)


class SubmissionTests(APICase):
    def test_suppressed_recipient_fails_at_once_the_others_are_queued(self) -> None:
        """
        issue 14 item 3: a recipient on the bounce list (added in another case) is `failed`
        at once, 0 attempts, last_reply "suppressed: … (the bounce's error)"; the other
        recipient is queued, and only it is in the queue.
        """
        self.post_json("/suppressions", {"kind": "bounce", "address": "bob@x.example", "error": "550 5.1.1 no such user"})
        submission_id = self.send(["BOB@X.example", "carol@y.example"])
        status = self.status(submission_id)
        self.assertEqual(status["status"], "queued")
        bob, carol = status["recipients"]
        self.assertEqual((bob["address"], bob["status"], bob["attempts"], bob["last_reply"]),
                         ("BOB@x.example", "failed", 0, f"{SUPPRESSED_BOUNCE} (550 5.1.1 no such user)"))
        self.assertEqual((carol["status"], carol["last_reply"]), ("queued", None))
        self.assertEqual(self.queued_recipients(), ["carol@y.example"])

    def test_every_recipient_suppressed_is_failed_at_once(self) -> None:
        """issue 14 item 3: a submission whose every recipient is on a list is finished `failed` at once; nothing is queued."""
        self.post_json("/suppressions", {"kind": "complaint", "entries": [{"address": "a@x.example"}, {"address": "b@y.example"}]})
        status = self.status(self.send(["a@x.example", "b@y.example"]))
        self.assertEqual(status["status"], "failed")
        self.assertEqual({r["last_reply"] for r in status["recipients"]}, {"suppressed: the address is on this client's complaint list"})
        self.assertEqual(self.queued_recipients(), [])

    def test_unsubscribe_limited_to_a_tag(self) -> None:
        """issue 14 item 3: an unsubscribe from tag "news" stops mail tagged news only; mail with other tags or none is queued."""
        self.post_json("/v3/example.com/unsubscribes", {"address": "bob@x.example", "tag": "news"})
        news = self.status(self.send(["bob@x.example"], tags=["weekly", "news"]))
        self.assertEqual((news["status"], news["recipients"][0]["last_reply"]), ("failed", "suppressed: the address is on this client's unsubscribe list"))
        for tags in (["receipt"], None):
            status = self.status(self.send(["bob@x.example"], tags=tags))
            self.assertEqual(status["recipients"][0]["status"], "queued", tags)
        self.assertEqual(self.queued_recipients(), ["bob@x.example", "bob@x.example"])

    def test_another_clients_list_does_not_suppress(self) -> None:
        """issue 14 item 3 (isolation): globex's bounce of an address does not stop acme's mail to it; removing acme's entry resumes delivery."""
        self.post_json("/suppressions", {"kind": "bounce", "address": "bob@x.example"}, client="globex")
        self.assertEqual(self.status(self.send(["bob@x.example"]))["recipients"][0]["status"], "queued")
        self.post_json("/suppressions", {"kind": "bounce", "address": "bob@x.example"})
        self.assertEqual(self.status(self.send(["bob@x.example"]))["recipients"][0]["status"], "failed")
        self.call("DELETE", "/v3/example.com/bounces/bob@x.example")
        self.assertEqual(self.status(self.send(["bob@x.example"]))["recipients"][0]["status"], "queued")


class MailboxGoneTests(SynchronousTestCase):
    def test_real_world_replies(self) -> None:
        """issue 14 item 3 (bounces.mailbox_gone): only replies that say the mailbox does not exist put an address on the bounce list."""
        gone = [
            "550 5.1.1 The email account that you tried to reach does not exist. Please try double-checking the recipient's email address",
            "550 5.1.1 <bob@example.com>: Recipient address rejected: User unknown in virtual mailbox table",
            "550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup",
            "550-5.1.1 The email account that you tried to reach does not exist.",
            "550 Requested action not taken: mailbox unavailable",
            "553 sorry, that domain isn't in my list of allowed rcpthosts",
            "551 User not local; please try <forward@example.org>",
            "550 5.2.1 The email account that you tried to reach is disabled.",
            "554 5.1.1 Unknown recipient",
        ]
        not_gone = [
            "550 5.7.1 Service unavailable, Client host [192.0.2.1] blocked using Spamhaus",
            "554 5.7.1 Message rejected as spam",
            "552 5.2.2 The email account that you tried to reach is over quota",
            "452 4.2.2 The email account that you tried to reach is over quota",
            "450 4.1.1 <bob@example.com>: Recipient address rejected: unverified address",
            "421 4.7.0 Try again later, closing connection.",
            "451 4.3.0 greylisted",
            "550 5.7.26 This mail is unauthenticated, which poses a security risk to the sender",
            "554 5.6.0 Message content rejected",
            "552 message size exceeds fixed maximum message size",
            "250 2.0.0 Ok: queued",
            "",
            "garbage",
        ]
        self.assertEqual([r for r in gone if not mailbox_gone(r)], [])
        self.assertEqual([r for r in not_gone if mailbox_gone(r)], [])


class AdminTests(AdminCase):
    def setUp(self) -> None:
        self.directory, self.path, self.store = make_store(self)

    def run_ok(self, *args: str) -> str:
        return self.ok("suppressions", *args, "--database", self.path)

    def test_add_list_remove(self) -> None:
        """issue 14 item 2: mmgun suppressions add (lower case, tags), list (table and JSON, per client and kind), remove."""
        self.assertEqual(self.run_ok("add", "--client", "acme", "--kind", "unsubscribe", "Bob@X.example", "--tag", "news", "--tag", "promo"),
                         "added bob@x.example to client acme's unsubscribe list (only mail tagged news, promo)\n")
        self.run_ok("add", "--client", "acme", "--kind", "bounce", "carol@x.example")
        self.run_ok("add", "--client", "other", "--kind", "unsubscribe", "dave@x.example")
        listed = json.loads(self.run_ok("list", "--client", "acme", "--kind", "unsubscribe", "--json"))
        self.assertEqual(listed, [{"kind": "unsubscribe", "address": "bob@x.example", "created_at": "2027-01-15T08:05:00.000Z", "tags": ["news", "promo"]}])
        table = self.run_ok("list", "--client", "acme", "--kind", "bounce")
        self.assertEqual(table.splitlines()[1].split()[:2], ["carol@x.example", "2027-01-15T08:05:00Z"])
        self.assertEqual(self.run_ok("remove", "--client", "acme", "--kind", "unsubscribe", "BOB@x.example"),
                         "removed bob@x.example from client acme's unsubscribe list\n")
        self.assertEqual(result(self, self.store.suppressions("acme", "unsubscribe")), [])
        self.assertEqual(len(result(self, self.store.suppressions("other", "unsubscribe"))), 1)
        self.assertEqual(self.run_ok("list", "--client", "acme", "--kind", "unsubscribe"), "client acme's unsubscribe list is empty\n")

    def test_mistakes_are_one_line_and_change_nothing(self) -> None:
        """issue 14 item 2: a bad address, a missing entry, --tag on a bounce, a bad kind: one line on stderr, non-zero, nothing changed."""
        self.run_ok("add", "--client", "acme", "--kind", "bounce", "keep@x.example")
        self.assertIn("not a valid email address", self.fails("suppressions", "add", "--client", "acme", "--kind", "bounce", "not an address", "--database", self.path))
        self.assertIn("not on client acme's complaint list", self.fails("suppressions", "remove", "--client", "acme", "--kind", "complaint", "keep@x.example", "--database", self.path))
        self.assertIn("--tag", self.fails("suppressions", "add", "--client", "acme", "--kind", "bounce", "a@x.example", "--tag", "t", "--database", self.path))
        self.fails("suppressions", "list", "--client", "acme", "--kind", "spam", "--database", self.path, code=2)
        self.assertEqual([e.address for e in result(self, self.store.suppressions("acme", "bounce"))], ["keep@x.example"])


class SDKTests(RelayTestCase):
    """Mailgun's official Python SDK (in a thread) against the whole relay on 127.0.0.1."""

    def client(self) -> Any:
        from mailgun.client import Client

        return Client(auth=("api", self.key), api_url=self.url)

    async def test_sdk_manages_each_list(self) -> None:
        """issue 14 item 1 (SDK): client.bounces/unsubscribes/complaints add one and many, get, stream every page, delete one and all."""

        def work() -> dict[str, Any]:
            out: dict[str, Any] = {}
            with self.client() as client:
                out["add"] = client.bounces.create(data={"address": "Bob@To.example", "code": "550", "error": "No such mailbox"}, domain="example.com").json()
                many = [{"address": f"u{i}@to.example", "code": "550"} for i in range(5)]
                out["many"] = client.bounces.create(data=many, domain="example.com", headers={"Content-Type": "application/json"}).json()
                out["one"] = client.bounces.get(domain="example.com", bounce_address="bob@to.example").json()
                out["streamed"] = [item["address"] for item in client.bounces.stream(domain="example.com", filters={"limit": 2})]
                out["unsub"] = client.unsubscribes.create(data={"address": "carol@to.example", "tag": "news"}, domain="example.com").json()
                out["unsub_one"] = client.unsubscribes.get(domain="example.com", unsubscribe_address="carol@to.example").json()
                out["complaint"] = client.complaints.create(data={"address": "dave@to.example"}, domain="example.com").json()
                out["complaints"] = client.complaints.get(domain="example.com").json()["items"]
                out["delete_one"] = client.bounces.delete(domain="example.com", bounce_address="bob@to.example").json()
                missing = client.bounces.get(domain="example.com", bounce_address="bob@to.example")
                out["missing"] = (missing.status_code, missing.json())
                out["clear"] = client.unsubscribes.delete(domain="example.com").json()
                out["other"] = client.bounces.get(domain="unknown.example").status_code
            return out

        out = await deferToThread(work)
        self.assertEqual(out["add"], {"message": "Address has been added to the bounces table", "address": "bob@to.example"})
        self.assertEqual(out["many"], {"message": "5 addresses have been added to the bounces table"})
        self.assertEqual((out["one"]["address"], out["one"]["code"], out["one"]["error"]), ("bob@to.example", "550", "No such mailbox"))
        self.assertEqual(out["streamed"], ["bob@to.example"] + [f"u{i}@to.example" for i in range(5)])
        self.assertEqual(out["unsub"]["address"], "carol@to.example")
        self.assertEqual(out["unsub_one"]["tags"], ["news"])
        self.assertEqual(out["complaint"]["message"], "Address has been added to the complaints table")
        self.assertEqual([c["address"] for c in out["complaints"]], ["dave@to.example"])
        self.assertEqual(out["delete_one"], {"message": "Bounced address has been removed", "address": "bob@to.example"})
        self.assertEqual(out["missing"], (404, {"message": "Address not found in bounces table"}))
        self.assertEqual(out["clear"], {"message": "Unsubscribe addresses for this domain have been removed"})
        self.assertEqual(out["other"], 404)

    async def test_hard_bounce_is_suppressed_on_the_next_send(self) -> None:
        """
        issue 14 item 3 (end to end): the SMTP server answers 550 5.1.1 for reject@; the
        address joins the bounce list with that reply (the SDK shows it); the next message
        to reject@ and carol@ is delivered to carol@ only, reject@ `failed` at once with
        "suppressed: …" and no attempt.
        """

        def send(to: str) -> Any:
            data = {"from": "ada@example.com", "to": to, "subject": "hello", "text": "hello"}
            with self.client() as client:
                return client.messages.create(data=data, domain="example.com").json()

        first = await deferToThread(send, "reject@to.example, bob@to.example")
        status, _ = await self.final({"message_id": first["id"]})
        self.assertEqual({r["address"]: r["status"] for r in status["recipients"]}, {"reject@to.example": "failed", "bob@to.example": "sent"})

        def bounce() -> Any:
            with self.client() as client:
                return client.bounces.get(domain="example.com", bounce_address="reject@to.example")

        listed = await deferToThread(bounce)
        self.assertEqual(listed.status_code, 200, listed.text)
        self.assertEqual((listed.json()["code"], listed.json()["error"]), ("550", "550 5.1.1 no such user"))
        second = await deferToThread(send, "Reject@to.example, carol@to.example")
        status, received = await self.final({"message_id": second["id"]}, count=2)
        rejected, carol = status["recipients"]
        self.assertEqual((rejected["status"], rejected["attempts"], rejected["last_reply"]),
                         ("failed", 0, f"{SUPPRESSED_BOUNCE} (550 5.1.1 no such user)"))
        self.assertEqual(carol["status"], "sent")
        self.assertEqual([r.recipients for r in received], [("bob@to.example",), ("carol@to.example",)])
        self.assertEqual(self.mailbox.to("reject@to.example"), [])

    async def final(self, document: dict[str, str], count: int = 1) -> tuple[dict[str, Any], list[Any]]:
        """/status once no recipient is pending (polled for up to 30 s), and the first ``count`` messages the SMTP server accepted."""
        deadline = _reactor().seconds() + 30
        status = await self.status(document)
        while status["status"] in ("queued", "scheduled"):
            if _reactor().seconds() > deadline:
                self.fail(f"submission not final after 30 s: {status}")
            await deferLater(_reactor(), 0.05, lambda: None)
            status = await self.status(document)
        received = await self.mailbox.wait_for(count).addTimeout(30, _reactor())
        return status, received
