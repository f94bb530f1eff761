"""
Issue 13, sending domains: the store's domains and DKIM keys on a real SQLite file, and
the database file's permissions (it holds the private keys).
"""

from __future__ import annotations

import os
import stat
from typing import Any

from twisted.internet.defer import ensureDeferred
from twisted.trial.unittest import SynchronousTestCase

from mmgun.store import Conflict, DomainKey, SendingDomain
from mmgun.store.sqlite import SQLiteStore, prepare

from .helpers import result, sync_store

T0 = 1_800_000_000.0
PEM = b"-----BEGIN PRIVATE KEY-----\nTUFZIE5PVCBCRSBTSE9XTg==\n-----END PRIVATE KEY-----\n"


def key(selector: str, algorithm: str = "rsa-sha256", at: float = T0, domain: str = "example.com") -> DomainKey:
    return DomainKey(domain, selector, algorithm, PEM + selector.encode(), "cHVibGlj" + selector, at, None)


def mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


class DomainCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.store, self.path = sync_store(self)
        self.call(self.store.add_client("acme", T0))
        self.call(self.store.add_client("other", T0))

    def call(self, coroutine: Any) -> Any:
        return result(self, coroutine)

    def fails(self, coroutine: Any) -> str:
        return str(self.failureResultOf(ensureDeferred(coroutine), Conflict).value)


class DomainTests(DomainCase):
    def test_added_domain_is_listed_for_its_client(self) -> None:
        """issue 13 sending domains: add_domain keeps the domain, its client and when."""
        self.call(self.store.add_domain("example.com", "acme", T0))
        self.call(self.store.add_domain("example.org", "other", T0 + 1))
        self.assertEqual(self.call(self.store.domain("example.com")), SendingDomain("example.com", "acme", T0))
        self.assertEqual([d.name for d in self.call(self.store.domains())], ["example.com", "example.org"])
        self.assertEqual(self.call(self.store.domains("other")), [SendingDomain("example.org", "other", T0 + 1)])
        self.assertIsNone(self.call(self.store.domain("example.net")))

    def test_unknown_client_refused(self) -> None:
        """issue 13 sending domains: a domain for a client that does not exist is refused, nothing stored."""
        self.assertIn("no client nobody", self.fails(self.store.add_domain("example.com", "nobody", T0)))
        self.assertEqual(self.call(self.store.domains()), [])

    def test_domain_of_another_client_refused(self) -> None:
        """issue 13 sending domains: one domain belongs to one client; a second add (any client) is a Conflict."""
        self.call(self.store.add_domain("example.com", "acme", T0))
        self.assertIn("already registered", self.fails(self.store.add_domain("example.com", "other", T0)))
        self.assertIn("already registered", self.fails(self.store.add_domain("example.com", "acme", T0)))
        self.assertEqual(self.call(self.store.domain("example.com")), SendingDomain("example.com", "acme", T0))

    def test_remove_forgets_the_domain_and_its_keys(self) -> None:
        """issue 13 sending domains: removing a domain deletes its private keys; adding it again starts keyless."""
        self.call(self.store.add_domain("example.com", "acme", T0))
        self.call(self.store.add_domain_key(key("s1")))
        self.call(self.store.remove_domain("example.com"))
        self.assertIsNone(self.call(self.store.domain("example.com")))
        self.call(self.store.add_domain("example.com", "other", T0))
        self.assertEqual(self.call(self.store.domain_keys("example.com", include_retired=True)), [])
        self.assertIn("no sending domain", self.fails(self.store.remove_domain("example.net")))


class KeyTests(DomainCase):
    def setUp(self) -> None:
        super().setUp()
        self.call(self.store.add_domain("example.com", "acme", T0))

    def test_keys_survive_a_reopen_byte_for_byte(self) -> None:
        """issue 13 keys: the private key read back (by another process) is the one stored."""
        self.call(self.store.add_domain_key(key("s1")))
        other = SQLiteStore.open_existing(self.path)
        self.addCleanup(lambda: result(self, other.close()))
        self.assertEqual(self.call(other.domain_keys("example.com")), [key("s1")])

    def test_newest_first_and_signing_keys_newest_two_of_each_algorithm_rsa_first(self) -> None:
        """
        issue 13 review, rotate: messages are signed with every active key, the newest two of each
        algorithm, RSA before Ed25519 — right after a rotate the new record may not be in DNS yet,
        and the old key's signature keeps DMARC passing until it is.
        """
        for k in (key("a"), key("b", "ed25519-sha256"), key("c", at=T0 + 10), key("d", "ed25519-sha256", T0 + 10)):
            self.call(self.store.add_domain_key(k))
        self.assertEqual([k.selector for k in self.call(self.store.domain_keys("example.com"))], ["d", "c", "b", "a"])
        self.assertEqual([k.selector for k in self.call(self.store.signing_keys("example.com"))], ["c", "a", "d", "b"])
        # A third rotate without retiring: the oldest stays published but is no longer signed with.
        self.call(self.store.add_domain_key(key("e", at=T0 + 20)))
        self.assertEqual([k.selector for k in self.call(self.store.signing_keys("example.com"))], ["e", "c", "d", "b"])

    def test_retired_key_not_published_nor_signed_with(self) -> None:
        """issue 13 rotate/retire: a retired key leaves domain_keys (what dns publishes) but stays listed with include_retired."""
        self.call(self.store.add_domain_key(key("old")))
        self.call(self.store.add_domain_key(key("new", at=T0 + 10)))
        self.assertTrue(self.call(self.store.retire_domain_key("example.com", "old", T0 + 20)))
        self.assertEqual([k.selector for k in self.call(self.store.domain_keys("example.com"))], ["new"])
        keys = self.call(self.store.domain_keys("example.com", include_retired=True))
        self.assertEqual([(k.selector, k.retired_at) for k in keys], [("new", None), ("old", T0 + 20)])
        self.assertEqual([k.selector for k in self.call(self.store.signing_keys("example.com"))], ["new"])
        self.assertFalse(self.call(self.store.retire_domain_key("example.com", "old", T0 + 30)))

    def test_the_key_signed_with_cannot_be_retired(self) -> None:
        """issue 13 retire: retiring the newest active key of an algorithm would leave mail unsigned: refused."""
        self.call(self.store.add_domain_key(key("rsa1")))
        self.call(self.store.add_domain_key(key("ed1", "ed25519-sha256")))
        self.assertIn("rotate", self.fails(self.store.retire_domain_key("example.com", "ed1", T0)))
        self.assertEqual(len(self.call(self.store.signing_keys("example.com"))), 2)
        self.assertIn("no key with selector nope", self.fails(self.store.retire_domain_key("example.com", "nope", T0)))

    def test_duplicate_selector_and_unknown_domain_refused(self) -> None:
        """issue 13 keys: a selector names one key of a domain; a key needs a registered domain."""
        self.call(self.store.add_domain_key(key("s1")))
        self.assertIn("already has a key", self.fails(self.store.add_domain_key(key("s1", "ed25519-sha256"))))
        self.assertIn("no sending domain", self.fails(self.store.add_domain_key(key("s1", domain="example.net"))))

    def test_private_key_not_in_repr(self) -> None:
        """issue 13 keys: logging or printing a DomainKey never shows the private key."""
        self.assertNotIn("PRIVATE", repr(key("s1")))
        self.assertNotIn("TUFZ", repr(key("s1")))


class PermissionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.umask = os.umask(0o022)
        self.addCleanup(os.umask, self.umask)

    def test_new_database_and_its_wal_readable_by_owner_only(self) -> None:
        """issue 13 keys: a new database file (with its -wal, -shm and -lock) is mode 0600 under umask 022."""
        store, path = sync_store(self)
        result(self, store.add_client("acme", T0))
        for name in (path, path + "-wal", path + "-shm", path + "-lock"):
            self.assertEqual(mode(name), 0o600, name)

    def test_existing_database_open_to_all_loses_others_permissions(self) -> None:
        """issue 13 keys: a database made world-readable by an older mmgun is closed to others at start (group kept)."""
        store, path = sync_store(self)
        result(self, store.add_client("acme", T0))
        for name in (path, path + "-wal"):
            os.chmod(name, 0o664)
        prepare(path)
        self.assertEqual(mode(path), 0o660)
        self.assertEqual(mode(path + "-wal"), 0o660)
