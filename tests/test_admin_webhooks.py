"""
Issue 14, webhooks: ``mmgun webhooks add|list|remove|key`` in-process through main() on a
real database.
"""

from __future__ import annotations

import json
import re

from mmgun.clients import client_label
from mmgun.store import Webhook

from .helpers import result
from .test_admin import NOW, AdminCase, make_store
from .test_store_events import submission


class WebhooksAdminTests(AdminCase):
    def setUp(self) -> None:
        self.directory, self.path, self.store = make_store(self)
        for client in ("acme", "zeta"):
            result(self, self.store.add_client(client, NOW))

    def webhooks(self, *args: str) -> str:
        return self.ok("webhooks", *args, "--database", self.path)

    def webhooks_fail(self, *args: str) -> str:
        return self.fails("webhooks", *args, "--database", self.path)

    def stored(self) -> list[Webhook]:
        found: list[Webhook] = result(self, self.store.webhooks())
        return found

    def test_add_stores_the_webhook_and_prints_the_new_key_once(self) -> None:
        """
        issue 14 dispatcher item 3: add stores the webhook (all three events by
        default) and, the client having no signing key, makes one and prints it; a
        second add does not print the key again.
        """
        out = self.webhooks("add", "--client", "acme", "--url", "https://app.example/hooks/mail")
        (hook,) = self.stored()
        key = result(self, self.store.webhook_key("acme"))
        self.assertEqual((hook.client, hook.domain, hook.url), ("acme", None, "https://app.example/hooks/mail"))
        self.assertEqual(hook.events, ("delivered", "permanent_fail", "temporary_fail"))
        self.assertRegex(hook.id, r"^wh-[0-9a-f]{12}$")
        self.assertIn(f"added webhook {hook.id} for client acme: https://app.example/hooks/mail\n", out)
        self.assertIn("POSTed to https://app.example:443", out)
        self.assertRegex(key, r"^[0-9a-f]{64}$")
        self.assertTrue(out.endswith(f"\n{key}\n"))
        again = self.webhooks("add", "--client", "acme", "--url", "https://app.example/other", "--events", "delivered")
        self.assertNotIn(key, again)
        self.assertNotIn("signing key", again)
        self.assertEqual(result(self, self.store.webhook_key("acme")), key)

    def test_bad_urls_and_events_refused(self) -> None:
        """
        issue 14 dispatcher item 3: a URL that is not http(s) with a host, or with a
        user name alone, and event names mmgun never makes (opened, clicked, accepted)
        are refused in one line, naming what is allowed; nothing is stored.
        """
        for url in ("ftp://app.example/", "https:///nohost", "https://user@app.example/", "app.example/hooks"):
            line = self.webhooks_fail("add", "--client", "acme", "--url", url)
            self.assertTrue(line.startswith("mmgun: --url: "), line)
        for events in ("opened", "delivered,clicked", "accepted", ","):
            line = self.webhooks_fail("add", "--client", "acme", "--url", "https://app.example/", "--events", events)
            self.assertIn("a webhook receives delivered, permanent_fail, temporary_fail", line)
        self.assertEqual(self.stored(), [])
        self.assertIsNone(result(self, self.store.webhook_key("acme")))

    def test_domain_of_another_client_refused(self) -> None:
        """issue 14 dispatcher item 3: --domain may not be a sending domain registered to another client."""
        result(self, self.store.add_domain("other.example", "zeta", NOW))
        line = self.webhooks_fail("add", "--client", "acme", "--domain", "Other.Example", "--url", "https://app.example/")
        self.assertEqual(line, "mmgun: sending domain other.example is client zeta's, not acme's")
        self.webhooks("add", "--client", "zeta", "--domain", "Other.Example.", "--url", "https://app.example/")
        self.assertEqual([h.domain for h in self.stored()], ["other.example"])

    def test_list_hides_passwords_and_remove(self) -> None:
        """
        issue 14 dispatcher item 3 (lead's change): list shows a URL's password as ***
        (table and JSON), filters by client; remove deletes, and says so for an
        unknown id.
        """
        self.webhooks("add", "--client", "acme", "--url", "https://anymail:s3cret@app.example/anymail/mailgun/tracking/")
        self.webhooks("add", "--client", "zeta", "--url", "http://zeta.example/h", "--events", "permanent_fail", "--domain", "z.example")
        table = self.webhooks("list")
        self.assertNotIn("s3cret", table)
        self.assertIn("https://anymail:***@app.example/anymail/mailgun/tracking/", table)
        self.assertEqual(table.splitlines()[0].split(), ["ID", "CLIENT", "DOMAIN", "EVENTS", "CREATED", "URL"])
        documents = json.loads(self.webhooks("list", "--client", "zeta", "--json"))
        self.assertEqual(
            [(d["client"], d["domain"], d["events"], d["url"]) for d in documents],
            [("zeta", "z.example", ["permanent_fail"], "http://zeta.example/h")],
        )
        hook_id = documents[0]["id"]
        self.assertEqual(self.webhooks("remove", hook_id), f"removed webhook {hook_id}: its events are no longer POSTed, its retries are dropped\n")
        self.assertEqual([h.client for h in self.stored()], ["acme"])
        self.assertEqual(self.webhooks_fail("remove", hook_id), f"mmgun: no webhook {hook_id} (see mmgun webhooks list); nothing changed")
        self.assertEqual(self.webhooks("list", "--client", "zeta"), "client zeta has no webhook\n")

    def test_key_made_shown_again_and_rotated(self) -> None:
        """
        issue 14 dispatcher item 3, issue 14 (review): key makes and prints a key for a
        client that has none; asked again it prints the same stored key (the database is
        the operator's); --rotate replaces and prints the new one.
        """
        made = self.webhooks("key", "--client", "acme")
        first = result(self, self.store.webhook_key("acme"))
        self.assertIn(f"\n{first}\n", made)
        again = self.webhooks("key", "--client", "acme")
        self.assertEqual(again, f"webhook signing key of client acme (stored in the database; --rotate replaces it):\n{first}\n")
        self.assertEqual(result(self, self.store.webhook_key("acme")), first)
        rotated = self.webhooks("key", "--client", "acme", "--rotate")
        second = result(self, self.store.webhook_key("acme"))
        self.assertNotEqual(first, second)
        self.assertEqual(re.findall(r"^[0-9a-f]{64}$", rotated, re.MULTILINE), [second])

    def test_key_made_by_the_api_is_shown(self) -> None:
        """
        issue 14 (review): a key made elsewhere (by the v3 API or the dispatcher, at a
        client's first webhook) is shown by ``mmgun webhooks key`` as it is stored, not
        replaced: receivers already checking it keep working.
        """
        stored = result(self, self.store.set_webhook_key("acme", "ab" * 32, NOW, replace=False))
        out = self.webhooks("key", "--client", "acme")
        self.assertEqual(out.splitlines()[-1], stored)
        self.assertEqual(result(self, self.store.webhook_key("acme")), "ab" * 32)

    def test_unknown_client_refused(self) -> None:
        """
        issue 14 (review): ``webhooks add`` and ``webhooks key`` with a --client that is
        not in the clients table (e.g. a clients-file id, which is a secret, pasted as
        the client) fail in one line and store nothing: no webhook, no key.
        """
        secret = "s3cret-clients-file-id-0123456789"
        for args in (("add", "--client", secret, "--url", "https://app.example/h"), ("key", "--client", secret)):
            line = self.webhooks_fail(*args)
            self.assertEqual(
                line,
                "mmgun: no such client in the database: --client is an id added with mmgun clients add (or a"
                " clients-file client's label, c- and 16 hex digits), never an API key or a clients-file id",
            )
            self.assertNotIn(secret, line)  # not echoed: it may be a secret
        self.assertEqual(self.stored(), [])
        self.assertIsNone(result(self, self.store.webhook_key(secret)))
        self.assertFalse(result(self, self.store.client_exists(secret)))
        self.assertTrue(result(self, self.store.client_exists("acme")))
        # A clients-file client, by the label mmgun knows it by (as its events carry it), is accepted.
        label = client_label(secret)
        self.webhooks("add", "--client", label, "--url", "https://app.example/h")
        self.assertEqual([h.client for h in self.stored()], [label])


class WebhooksFlushTests(AdminCase):
    """C{mmgun webhooks flush}: the webhook counterpart of C{mmgun queue flush} (issue 14, e2e-webhooks)."""

    def setUp(self) -> None:
        self.directory, self.path, self.store = make_store(self)

    def waiting(self, hook_id: str, client: str, recipients: tuple[str, ...], *, lease: str) -> list[int]:
        """A webhook whose receiver refused an event per recipient: each waits for its retry at NOW + 300."""
        hook = result(self, self.store.add_webhook(Webhook(hook_id, client, None, "https://app.example/h", ("delivered",), NOW - 10)))
        result(self, self.store.add_submission(submission(recipients, at=NOW - 5, client=client)))
        events = result(self, self.store.events(client, start=hook.cursor))
        result(self, self.store.lease_webhooks(lease, NOW - 5, NOW + 25))
        failed = [(e.cursor.id, NOW - 4, NOW + 300, "connection refused") for e in events]
        self.assertTrue(result(self, self.store.advance_webhook(hook_id, lease, events[-1].cursor, failed)))
        return [e.cursor.id for e in events]

    def due(self, at: float, lease: str = "d9") -> list[tuple[str, str]]:
        retries = result(self, self.store.due_webhook_retries(lease, at, at + 30, 100))
        return sorted((r.webhook.id, r.event.recipient) for r in retries)

    def test_flush_makes_waiting_retries_due_now_and_spares_those_in_delivery(self) -> None:
        """
        issue 14 (retries across a receiver outage): after an outage the operator makes
        the waiting events due now instead of in 5 minutes: all, or one webhook's; a
        retry a dispatcher is POSTing (leased) is left to it and counted; attempts are
        not touched; an unknown webhook id changes nothing.
        """
        self.waiting("w1", "acme", ("a@x.example", "b@x.example"), lease="d1")
        self.waiting("w2", "zeta", ("c@x.example",), lease="d1")
        self.assertEqual(self.due(NOW), [])
        self.assertEqual(
            self.webhooks_fail("flush", "w1", "nope"), "mmgun: no webhook nope (see mmgun webhooks list); nothing changed"
        )
        self.assertEqual(self.due(NOW), [])

        self.assertEqual(self.webhooks("flush", "w1"), "flushed 2 waiting webhook events: due now\n")
        self.assertEqual(self.due(NOW), [("w1", "a@x.example"), ("w1", "b@x.example")])  # leased by d9 now
        self.assertEqual(
            self.webhooks("flush"), "flushed 1 waiting webhook event: due now; 2 being POSTed, left to the dispatcher\n"
        )
        (retry,) = result(self, self.store.due_webhook_retries("d8", NOW, NOW + 30, 100))
        self.assertEqual((retry.webhook.id, retry.event.recipient, retry.attempts), ("w2", "c@x.example", 1))
        self.assertEqual(self.webhooks("flush"), "flushed 0 waiting webhook events: due now; 3 being POSTed, left to the dispatcher\n")

    def webhooks(self, *args: str) -> str:
        return self.ok("webhooks", *args, "--database", self.path)

    def webhooks_fail(self, *args: str) -> str:
        return self.fails("webhooks", *args, "--database", self.path)
