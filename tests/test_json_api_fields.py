"""
Issue 12, "The JSON API grows": inputs to the new fields that the documentation promises
a 400 for (naming the field), found while documenting them. Each test sends the request
to the real app (StubTreq over a real SQLite file) and checks the answer.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mmgun.clients import Clients
from mmgun.web.app import Frontend

from .helpers import CLIENT, APIClient, sync_store


class SendAtTests(SynchronousTestCase):
    def setUp(self) -> None:
        store, _ = sync_store(self)
        clock = Clock()
        clock.advance(1_800_000_000)
        clients = Clients.from_ids([CLIENT])
        self.api = APIClient(self, Frontend(store, lambda: clients, clock, hostname="mmgun.test"))

    def test_rfc5322_date_past_year_9999_is_400_not_500(self) -> None:
        """
        issue 12 item "The JSON API grows" (send_at): an RFC 5322 date whose UTC time falls
        after year 9999 (31 Dec 9999 with a negative offset) is a bad send_at, answered 400
        naming the field; parse_date let the OverflowError of its UTC conversion escape
        (a 500, logged as an internal error).
        """
        for value in ("Fri, 31 Dec 9999 23:59:59 -0100", "31 Dec 9999 23:59:59 -2359"):
            code, answer = self.api.send(send_at=value)
            self.assertEqual((code, answer["result"]), (400, "error"), value)
            self.assertIn("send_at", answer["message"])
        self.assertEqual(self.flushLoggedErrors(OverflowError), [])
