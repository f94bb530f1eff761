"""
Issue 13, sending domains: ``mmgun domains add|list|show|remove|dns|rotate|retire`` in-process
through main() on a real database, and ``mmgun domains verify`` as a process asking a real DNS
server on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from typing import Any

from twisted.internet.defer import ensureDeferred
from twisted.internet.utils import getProcessOutputAndValue
from twisted.names import dns
from twisted.trial.unittest import TestCase

from mmgun import dkim
from mmgun.store import DomainKey, NewSubmission
from mmgun.testing.dnsserver import listen_dns
from mmgun.testing.ports import port_number

from .helpers import result
from .test_admin import NOW, AdminCase, make_store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class DomainsCase(AdminCase):
    def setUp(self) -> None:
        self.directory, self.path, self.store = make_store(self)
        result(self, self.store.add_client("acme", NOW))
        result(self, self.store.add_client("other", NOW))

    def domains(self, *args: str, now: float = NOW) -> str:
        return self.ok("domains", *args, "--database", self.path, now=now)

    def domains_fail(self, *args: str) -> str:
        return self.fails("domains", *args, "--database", self.path)

    def keys(self, domain: str = "example.com", include_retired: bool = False) -> list[DomainKey]:
        keys: list[DomainKey] = result(self, self.store.domain_keys(domain, include_retired))
        return keys

    def assertNoPrivateKey(self, text: str) -> None:
        self.assertNotIn("PRIVATE KEY", text)
        for key in self.keys(include_retired=True):
            body = b"".join(key.private_key.splitlines()[1:-1]).decode()
            for i in range(0, len(body) - 40, 40):
                self.assertNotIn(body[i : i + 40], text)


class AddTests(DomainsCase):
    def test_add_creates_an_rsa_key_and_prints_its_record(self) -> None:
        """issue 13 sending domains: add registers the domain, makes an RSA 2048 key, prints the DNS record (never the private key)."""
        out = self.domains("add", "example.com", "--client", "acme")
        (key,) = self.keys()
        self.assertEqual(key.algorithm, "rsa-sha256")
        self.assertIn(f"added sending domain example.com for client acme\nDKIM keys: {key.selector} (rsa-sha256)\n", out)
        self.assertIn(f"{key.selector}._domainkey.example.com. IN TXT", out)
        for string in dkim.split_txt(dkim.expected_txt(key)):
            self.assertIn(f'"{string}"', out)
        self.assertIn(dkim.dns_records("example.com", [key]), out)
        self.assertNoPrivateKey(out)

    def test_ed25519_signed_alongside_rsa(self) -> None:
        """issue 13 keys: --ed25519 adds an Ed25519 key, and both keys sign (RSA first)."""
        self.domains("add", "example.com", "--client", "acme", "--ed25519")
        signing = result(self, self.store.signing_keys("example.com"))
        self.assertEqual([k.algorithm for k in signing], ["rsa-sha256", "ed25519-sha256"])
        self.assertEqual(len({k.selector for k in signing}), 2)

    def test_domain_name_is_idna_lower_case(self) -> None:
        """issue 13 sending domains: a Unicode, mixed-case, dot-terminated name is stored as DNS has it."""
        self.domains("add", "Bücher.Example.", "--client", "acme")
        self.assertEqual([d.name for d in result(self, self.store.domains())], ["xn--bcher-kva.example"])
        self.assertIn("xn--bcher-kva.example", self.domains("show", "BÜCHER.example"))

    def test_malformed_names_refused(self) -> None:
        """issue 13 sending domains: names that are no host name (IP, underscore, one label, spaces, too long) are refused."""
        for bad in ("1.2.3.4", "bad_name.com", "localhost", "exa mple.com", "x-.com", "a.-x.com", "a..com", "a" * 64 + ".com", ""):
            self.assertIn("not a domain name", self.domains_fail("add", bad, "--client", "acme"))
        self.assertEqual(result(self, self.store.domains()), [])

    def test_unknown_client_refused(self) -> None:
        """issue 13 sending domains: a domain for a client that was never added is refused, nothing stored."""
        self.assertEqual(
            self.domains_fail("add", "example.com", "--client", "nobody"),
            "mmgun: no client nobody (add it first: mmgun clients add nobody)",
        )
        self.assertEqual(result(self, self.store.domains()), [])

    def test_domain_of_another_client_refused(self) -> None:
        """issue 13 sending domains: a second client cannot take a registered domain; its keys are unchanged."""
        self.domains("add", "example.com", "--client", "acme")
        before = self.keys()
        self.assertIn("already registered", self.domains_fail("add", "EXAMPLE.com", "--client", "other"))
        self.assertEqual(result(self, self.store.domain("example.com")).client, "acme")
        self.assertEqual(self.keys(), before)


class ListingTests(DomainsCase):
    def setUp(self) -> None:
        super().setUp()
        self.domains("add", "example.com", "--client", "acme", "--ed25519")
        self.domains("add", "example.org", "--client", "other")

    def test_list_json_and_client_filter(self) -> None:
        """issue 13 sending domains: list shows each domain's client and keys; --client filters."""
        documents = json.loads(self.domains("list", "--json"))
        self.assertEqual([(d["domain"], d["client"]) for d in documents], [("example.com", "acme"), ("example.org", "other")])
        self.assertEqual(
            sorted(k["algorithm"] for k in documents[0]["keys"]), ["ed25519-sha256", "rsa-sha256"]
        )
        self.assertEqual(set(documents[0]["keys"][0]), {"selector", "algorithm", "created_at", "retired_at"})
        self.assertEqual([d["domain"] for d in json.loads(self.domains("list", "--client", "other", "--json"))], ["example.org"])
        self.assertEqual(self.domains("list", "--client", "nobody"), "client nobody has no sending domain\n")

    def test_no_listing_shows_a_private_or_public_key(self) -> None:
        """issue 13 keys: private keys are excluded from every listing (list, show, their JSON, stats)."""
        outputs = [
            self.domains("list"),
            self.domains("list", "--json"),
            self.domains("show", "example.com"),
            self.domains("show", "example.com", "--json"),
            self.ok("stats", "--json", "--database", self.path),
        ]
        for out in outputs:
            self.assertNoPrivateKey(out)
            self.assertNotIn(self.keys()[0].public_key[:40], out)

    def test_show_text(self) -> None:
        """issue 13 sending domains: show names the client and each key's selector, algorithm, state."""
        out = self.domains("show", "example.com")
        self.assertIn("client   acme\n", out)
        for key in self.keys():
            self.assertRegex(out, rf"{key.selector}\s+{key.algorithm}\s+\S+\s+signing\n")

    def test_unknown_domain_is_one_line(self) -> None:
        """issue 13 sending domains: show/dns/rotate/remove of an unknown domain: one line, exit 1."""
        for action in ("show", "dns", "rotate", "remove"):
            self.assertIn("example.net", self.domains_fail(action, "example.net"))


class RotateTests(DomainsCase):
    def setUp(self) -> None:
        super().setUp()
        self.domains("add", "example.com", "--client", "acme", "--ed25519")
        self.old = self.keys()

    def test_rotate_signs_with_new_and_old_keys_and_keeps_old_published(self) -> None:
        """
        issue 13 review, rotate: a new key per algorithm under new selectors; mail is signed with
        the new and the old key of each algorithm (the new record may not be in DNS yet) until the
        old one is retired; show calls both signing; the old stay in dns.
        """
        out = self.domains("rotate", "example.com", now=NOW + 86400)
        self.assertIn("signed with both the old and the new key until you retire the old one", out)
        signing = result(self, self.store.signing_keys("example.com"))
        self.assertEqual([k.algorithm for k in signing], ["rsa-sha256", "rsa-sha256", "ed25519-sha256", "ed25519-sha256"])
        new = [k for k in signing if k not in self.old]
        self.assertEqual(len(new), 2)
        self.assertFalse({k.selector for k in new} & {k.selector for k in self.old})
        self.assertEqual({k.selector for k in signing}, {k.selector for k in new + self.old})
        records = self.domains("dns", "example.com")
        for key in signing:
            self.assertIn(f"{key.selector}._domainkey.example.com. IN TXT", records)
            self.assertRegex(self.domains("show", "example.com"), rf"{key.selector}\s+{key.algorithm}\s+\S+\s+signing")
        for key in self.old:
            self.assertIn(f"mmgun domains retire example.com {key.selector}", out)
        self.assertNoPrivateKey(out)
        self.domains("retire", "example.com", self.old[0].selector, now=NOW + 2 * 86400)
        after = result(self, self.store.signing_keys("example.com"))
        self.assertNotIn(self.old[0].selector, {k.selector for k in after})
        self.assertEqual(len(after), 3)

    def test_retire_unpublishes_the_old_key(self) -> None:
        """issue 13 retire: after retire, the old key is no longer in dns, and show lists it as retired."""
        self.domains("rotate", "example.com", now=NOW + 86400)
        old = self.old[0]
        out = self.domains("retire", "example.com", old.selector, now=NOW + 2 * 86400)
        self.assertIn(f"remove its record, {old.selector}._domainkey.example.com, from DNS", out)
        self.assertNotIn(old.selector, self.domains("dns", "example.com"))
        self.assertRegex(self.domains("show", "example.com"), rf"{old.selector}\s+{old.algorithm}\s+\S+\s+retired ")
        self.assertIn("already retired", self.domains("retire", "example.com", old.selector))

    def test_retiring_the_signing_key_refused(self) -> None:
        """issue 13 retire: the key mail is signed with cannot be retired (mail would go unsigned); nothing changes."""
        self.assertIn("rotate", self.domains_fail("retire", "example.com", self.old[0].selector))
        self.assertEqual(self.keys(), self.old)
        self.assertIn("no key with selector nope", self.domains_fail("retire", "example.com", "nope"))


class RemoveTests(DomainsCase):
    def test_remove_deletes_keys_and_leaves_queued_mail_alone(self) -> None:
        """issue 13 remove: the domain and its private keys go; mail already queued (signed at queueing) is untouched."""
        self.domains("add", "example.com", "--client", "acme")
        message = b"DKIM-Signature: v=1; d=example.com\r\nFrom: a@example.com\r\n\r\nhi\r\n"
        submission = NewSubmission(uuid.uuid4().hex, "acme", "a@example.com", ("b@example.net",), message, NOW)
        result(self, self.store.add_submission(submission))
        out = self.domains("remove", "example.com")
        self.assertIn("removed sending domain example.com and its 1 DKIM key", out)
        self.assertIsNone(result(self, self.store.domain("example.com")))
        self.assertEqual(self.keys(include_retired=True), [])
        (claimed,) = result(self, self.store.claim("test", NOW, 60, 10))
        self.assertEqual(claimed.message, message)


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


VERIFY = "import sys; from mmgun.admin import main; sys.exit(main())"


class VerifyTests(TestCase):
    """``mmgun domains verify`` (a real process) against a DNS server on 127.0.0.1 serving published, missing and wrong records."""

    def setUp(self) -> None:
        self.directory, self.path, self.store = make_store(self)
        result(self, self.store.add_client("acme", NOW))

    def add(self, domain: str, *flags: str) -> list[DomainKey]:
        admin = AdminCase()
        code, _, err = admin.admin("domains", "add", domain, "--client", "acme", *flags, "--database", self.path)
        self.assertEqual((code, err), (0, ""))
        keys: list[DomainKey] = result(self, self.store.domain_keys(domain))
        return keys

    def serve(self, records: dict[str, Any]) -> str:
        udp, tcp = listen_dns(_reactor(), records)
        self.addCleanup(udp.stopListening)
        self.addCleanup(tcp.stopListening)
        return f"127.0.0.1:{port_number(udp)}"

    async def verify(self, domain: str, nameserver: str) -> tuple[int, str, str]:
        env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": ROOT}
        args = ["-c", VERIFY, "domains", "verify", domain, "--database", self.path, "--nameserver", nameserver]
        out, err, code = await getProcessOutputAndValue(sys.executable, args, env=env, path=ROOT, reactor=_reactor())
        return code, out.decode(), err.decode()

    @staticmethod
    def published(key: DomainKey) -> dns.Record_TXT:
        return dns.Record_TXT(*(s.encode() for s in dkim.split_txt(dkim.expected_txt(key))), ttl=60)

    def test_matching_missing_and_different_records(self) -> None:
        """issue 13 verify: record by record, a published key is ok, a missing one and another key's are reported; exit 1."""
        self.add("example.com", "--ed25519")
        rsa, ed = result(self, self.store.signing_keys("example.com"))
        (stranger,) = self.add("stranger.test")
        (good,) = self.add("good.test")
        records = {
            f"{rsa.selector}._domainkey.example.com": [self.published(attr_replace(stranger, rsa))],
            "example.com": [dns.Record_TXT(b"v=spf1 a:relay.test ~all", ttl=60)],
            f"{good.selector}._domainkey.good.test": [self.published(good)],
            "_dmarc.good.test": [dns.Record_TXT(b"v=DMARC1; p=none", ttl=60)],
        }
        nameserver = self.serve(records)

        async def check() -> None:
            code, out, err = await self.verify("example.com", nameserver)
            self.assertEqual((code, err), (1, ""), out)
            self.assertRegex(out, rf"DKIM\s+{rsa.selector}._domainkey.example.com\s+rsa-sha256\s+DIFFERS: p= is another key\n")
            self.assertRegex(out, rf"DKIM\s+{ed.selector}._domainkey.example.com\s+ed25519-sha256\s+MISSING")
            self.assertRegex(out, r"SPF\s+example.com\s+TXT\s+present: v=spf1 a:relay.test ~all\n")
            self.assertRegex(out, r"DMARC\s+_dmarc.example.com\s+TXT\s+none")
            self.assertIn("-- 2 of 2 DKIM records missing or different", out)

            code, out, err = await self.verify("good.test", nameserver)
            self.assertEqual((code, err), (0, ""), out)
            self.assertRegex(out, rf"DKIM\s+{good.selector}._domainkey.good.test\s+rsa-sha256\s+ok: matches the key\n")
            self.assertRegex(out, r"DMARC\s+_dmarc.good.test\s+TXT\s+present: v=DMARC1; p=none\n")

        return ensureDeferred(check())  # type: ignore[return-value]


def attr_replace(source: DomainKey, target: DomainKey) -> DomainKey:
    """``target`` published with ``source``'s public key: what DNS holds after a botched copy."""
    import attrs

    return attrs.evolve(target, public_key=source.public_key)
