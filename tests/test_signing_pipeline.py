"""
issue 13, the frontend's side of sending domains: every message of a client's own sending
domain is signed once, before it is stored; the sender policy; the Mailgun endpoints'
``{domain}``; the size limit after signing; the domain cache. Through StubTreq against
the real root resource and a real SQLite file, with mmgun's real signer (checked with
dkimpy, its DNS lookup answered from the keys).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

import dkim as dkimpy
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mmgun import dkim
from mmgun.auth import key_hash, new_key
from mmgun.config import Options
from mmgun.service import web_settings
from mmgun.signer import InProcessSigner, SignerProcess
from mmgun.store import DomainKey
from mmgun.web import signing
from mmgun.web.signing import DomainState, SendingDomains

from .helpers import make_api, result
from .test_mailgun_api import basic, form_data, like_the_frontend

#: Wall-clock time of the frontend (its Date, DKIM t=): in the past, as dkimpy refuses a t= in the future.
NOW = 1_700_000_000.0
_KEYS: dict[str, list[DomainKey]] = {}


def keys_for(domain: str) -> list[DomainKey]:
    """An RSA and an Ed25519 key for ``domain`` (made once per test run: RSA generation is slow)."""
    if domain not in _KEYS:
        made: list[DomainKey] = []
        for algorithm in dkim.ALGORITHMS:
            private, public = dkim.generate_key(algorithm)
            made.append(DomainKey(domain, dkim.new_selector(NOW, [k.selector for k in made]), algorithm, private, public, NOW, None))
        _KEYS[domain] = made
    return _KEYS[domain]


def verify_all(message: bytes) -> list[bytes]:
    """The d= of every DKIM signature of ``message``, each verified by dkimpy (DNS answered from the test keys)."""

    def txt(name: bytes, timeout: int = 5) -> bytes | None:
        for key in (k for keys in _KEYS.values() for k in keys):
            if name.decode().rstrip(".") == f"{key.selector}._domainkey.{key.domain}":
                return dkim.expected_txt(key).encode()
        return None

    verifier = dkimpy.DKIM(message)
    count = sum(1 for name, _ in verifier.headers if name.lower() == b"dkim-signature")
    domains = []
    for index in range(count):
        assert verifier.verify(idx=index, dnsfunc=txt), f"signature {index} does not verify"
        domains.append(verifier.domain)
    return domains


class CountingSigner(InProcessSigner):
    """Signs in this process, and keeps the keys of each message it was given."""

    def __init__(self) -> None:
        self.batches: list[Sequence[Any]] = []

    def sign_message(self, message: bytes, keys: Sequence[Any], now: float) -> Any:
        self.batches.append(keys)
        return super().sign_message(message, keys, now)


class SigningTestCase(SynchronousTestCase):
    """acme owns example.com (with keys) and bare.example (no keys); globex owns globex.example (with keys)."""

    def setUp(self) -> None:
        self.signer = CountingSigner()
        self.signed = self.signer.batches
        self.use()

    def use(self, **options: Any) -> None:
        self.api, self.store, self.clock = make_api(self, signer=self.signer, wall=lambda: NOW, **{"max_message_size": 64 * 1024, **options})
        like_the_frontend(self.api.treq)
        self.keys = {}
        for client in ("acme", "globex"):
            result(self, self.store.add_client(client, NOW))
            key_id, key = new_key()
            result(self, self.store.add_key(client, key_id, key_hash(key), NOW))
            self.keys[client] = key
        for domain, client in (("example.com", "acme"), ("bare.example", "acme"), ("globex.example", "globex")):
            result(self, self.store.add_domain(domain, client, NOW))
        for domain_key in keys_for("example.com") + keys_for("globex.example"):
            result(self, self.store.add_domain_key(domain_key))

    def send(self, sender: str = "ada@example.com", client: str = "acme", **fields: Any) -> tuple[int, Any]:
        body = {"sender": sender, "recipients": ["bob@x.example"], "subject": "s", "body": "hello", **fields}
        return self.api.request("POST", "/send", body, headers={"Authorization": f"Bearer {self.keys[client]}"})

    def v3(self, fields: list[tuple[str, Any]], path: str, client: str = "acme") -> tuple[int, Any]:
        import json

        body, content_type = form_data(fields)
        headers = {"Content-Type": content_type, **basic(self.keys[client])}
        d = self.api.treq.request("POST", "http://mmgun.test" + path, data=body, headers=headers)  # type: ignore[attr-defined]
        self.api.treq.flush()
        response = self.successResultOf(d)
        return response.code, json.loads(self.successResultOf(response.content()))

    def queued(self) -> list[bytes]:
        return [e.message for e in result(self, self.store.claim("test", self.clock.seconds() + 1, 60, 1000))]


class SigningTests(SigningTestCase):
    def test_stored_message_is_signed_once(self) -> None:
        """issue 13 (signing): a message of the client's own domain is stored signed (RSA then Ed25519), signed once, and verifies."""
        code, answer = self.send()
        self.assertEqual(code, 200, answer)
        (stored,) = self.queued()
        self.assertEqual(len(self.signed), 1)
        self.assertEqual(sorted(k.algorithm for k in self.signed[0]), sorted([dkim.RSA_SHA256, dkim.ED25519_SHA256]))
        self.assertTrue(stored.startswith(b"DKIM-Signature: v=1; a=rsa-sha256"), stored[:80])
        self.assertEqual(stored.count(b"DKIM-Signature:"), 2)
        self.assertEqual(verify_all(stored), [b"example.com", b"example.com"])

    def test_rotated_domain_signed_with_old_and_new_keys(self) -> None:
        """
        issue 13 review (rotate): after a rotate the new selector's record may not be in DNS yet,
        so mail is signed with the new and the old RSA key (and the Ed25519 key): each signature
        verifies, the new RSA one topmost; a receiver that cannot find the new record still
        finds an aligned signature that passes.
        """
        (old_rsa, ed) = keys_for("example.com")
        private, public = dkim.generate_key(dkim.RSA_SHA256)
        taken = [k.selector for keys in _KEYS.values() for k in keys]
        new_rsa = DomainKey("example.com", dkim.new_selector(NOW, taken), dkim.RSA_SHA256, private, public, NOW + 1, None)
        _KEYS.setdefault("example.com (rotated)", []).append(new_rsa)
        result(self, self.store.add_domain_key(new_rsa))
        self.assertEqual(self.send()[0], 200)
        (stored,) = self.queued()
        self.assertEqual(verify_all(stored), [b"example.com"] * 3)
        selectors = re.findall(rb"\bs=([^;]+);", stored)
        self.assertEqual(selectors, [s.selector.encode() for s in (new_rsa, old_rsa, ed)])

    def test_signed_before_it_is_stored(self) -> None:
        """issue 13 (signing): what add_submission receives is already signed; a signer that fails stores nothing (no half-signed message)."""
        store = self.api.frontend.pipeline._store
        given: list[bytes] = []
        original = store.add_submission

        async def recording(submission: Any) -> str:
            given.append(submission.message)
            return await original(submission)

        self.patch(store, "add_submission", recording)
        self.assertEqual(self.send()[0], 200)
        self.assertTrue(given[0].startswith(b"DKIM-Signature:"))

        def broken(message: bytes, keys: Sequence[Any], now: float) -> Any:
            raise RuntimeError("signer crashed (test)")

        self.patch(self.signer, "sign_message", broken)
        self.assertEqual(self.send()[0], 500)
        self.flushLoggedErrors(RuntimeError)
        self.assertEqual(len(given), 1)
        self.assertEqual(len(self.queued()), 1)

    def test_unsigned_without_keys_or_registration(self) -> None:
        """issue 13 (signing): a registered domain without keys, and an unregistered one, are queued unsigned; the signer is not called."""
        self.assertEqual(self.send("ada@bare.example")[0], 200)
        self.assertEqual(self.send("ada@unregistered.example")[0], 200)
        self.assertEqual(self.signed, [])
        self.assertFalse(any(b"DKIM-Signature" in m for m in self.queued()))

    def test_another_clients_domain_is_never_signed(self) -> None:
        """issue 13 (signing, policy any): globex sending as acme's example.com is queued without acme's signature."""
        self.assertEqual(self.send(client="globex")[0], 200)
        self.assertEqual(self.signed, [])
        (stored,) = self.queued()
        self.assertNotIn(b"DKIM-Signature", stored)

    def test_batch_signs_each_message(self) -> None:
        """issue 13 (signing): a v3 batch send signs every message (one per To address), each verifying."""
        fields = [("from", "ada@example.com"), ("to", "a@x.example, b@y.example, c@z.example"), ("subject", "Hi %recipient.n%"), ("text", "t"), ("recipient-variables", "{}")]
        code, answer = self.v3(fields, "/v3/example.com/messages")
        self.assertEqual(code, 200, answer)
        stored = self.queued()
        self.assertEqual((len(stored), len(self.signed)), (3, 3))
        for message in stored:
            self.assertEqual(verify_all(message), [b"example.com", b"example.com"])

    def test_mime_with_foreign_signature_is_signed_in_addition(self) -> None:
        """issue 13 (signing): messages.mime already signed for another domain keeps that signature; ours is added on top."""
        foreign = b"DKIM-Signature: v=1; a=rsa-sha256; d=elsewhere.example; s=x; h=from; bh=AAAA; b=BBBB\r\n"
        raw = foreign + b"From: Ada <ada@example.com>\r\nTo: b@x.example\r\nSubject: s\r\n\r\nhello\r\n"
        code, answer = self.v3([("to", "b@x.example"), ("message", ("m.eml", raw))], "/v3/example.com/messages.mime")
        self.assertEqual(code, 200, answer)
        (stored,) = self.queued()
        self.assertTrue(stored.startswith(b"DKIM-Signature: v=1; a=rsa-sha256"))
        self.assertIn(foreign, stored)
        self.assertEqual(stored.count(b"DKIM-Signature:"), 3)

    def test_too_large_once_signed(self) -> None:
        """issue 13 (signing): a message that fits --max-message-size unsigned but not signed is 413; the same size unsigned is taken."""
        # Same lengths: example.com and examplf.com (unregistered: never signed).
        self.assertEqual(self.send("ada@examplf.com", body="x" * 2000)[0], 200)
        self.assertEqual(self.send(body="x" * 2000)[0], 200)
        unsigned, signed = (len(m) for m in self.queued())
        self.assertGreater(signed, unsigned + 500)
        self.use(max_message_size=unsigned + (signed - unsigned) // 2)
        self.assertEqual(self.send("ada@examplf.com", body="x" * 2000)[0], 200)
        code, answer = self.send(body="x" * 2000)
        self.assertEqual(code, 413, answer)
        self.assertIn("once signed", answer["message"])
        self.assertEqual(len(self.queued()), 1)


class SenderPolicyTests(SigningTestCase):
    def test_policy_domains_refuses_foreign_senders(self) -> None:
        """issue 13 (sender policy): with 'domains', an unregistered domain or another client's is 403 naming it; nothing queued."""
        self.use(sender_policy="domains")
        for sender, client in (("ada@unregistered.example", "acme"), ("ada@example.com", "globex")):
            code, answer = self.send(sender, client=client)
            self.assertEqual(code, 403, answer)
            domain = sender.partition("@")[2]
            self.assertEqual(answer["result"], "error")
            self.assertIn(f"({domain}) is not one of this client's sending domains", answer["message"])
        self.assertEqual(self.queued(), [])
        rejected = self.api.frontend.metrics.rejected.labels("sender_refused")._value.get()
        self.assertEqual(rejected, 2)

    def test_policy_domains_admits_own(self) -> None:
        """issue 13 (sender policy): with 'domains', the client's own domains are taken (signed or not), through both APIs."""
        self.use(sender_policy="domains")
        self.assertEqual(self.send()[0], 200)
        self.assertEqual(self.send("ada@BARE.example")[0], 200)
        mime = b"From: ada@example.com\r\nSubject: s\r\n\r\nhi\r\n"
        self.assertEqual(self.v3([("to", "b@x.example"), ("message", ("m.eml", mime))], "/v3/example.com/messages.mime")[0], 200)
        self.assertEqual(len(self.queued()), 3)

    def test_policy_any_admits_anyone(self) -> None:
        """issue 13 (sender policy): the default 'any' keeps the seed's quick start: any sender is taken."""
        self.assertEqual(self.send("me@anything.example")[0], 200)

    def test_refused_sender_spends_a_rate_token(self) -> None:
        """
        issue 13 review (sender policy): the rate token is taken before the policy check, so a
        refused sender spends one too. Were it free, a client could send random From domains
        without end, each a store read (and an entry churning the domain cache); now, once its
        burst is spent, it gets 429 without the store being asked.
        """
        self.use(sender_policy="domains", rate_limit=0.001, rate_burst=1)
        looked_up: list[str] = []
        original = self.store.domain

        async def counting(name: str) -> Any:
            looked_up.append(name)
            return await original(name)

        self.patch(self.store, "domain", counting)
        self.assertEqual(self.send("ada@random1.example")[0], 403)
        self.assertEqual(looked_up, ["random1.example"])
        for n in range(2, 5):
            self.assertEqual(self.send(f"ada@random{n}.example")[0], 429)
        self.assertEqual(looked_up, ["random1.example"])
        self.assertEqual(self.send()[0], 429)
        self.assertEqual(self.queued(), [])

    def test_mime_sender_and_resent_fields_checked(self) -> None:
        """
        issue 13 review (sender policy): with 'domains', messages.mime's Sender, Resent-From and
        Resent-Sender fields must be at the client's domains too (403 like From): a client may not
        claim another's domain in them; its own domains pass; the 'any' policy ignores them.
        """
        self.use(sender_policy="domains")

        def mime(extra: bytes) -> tuple[int, Any]:
            message = b"From: ada@example.com\r\n" + extra + b"Subject: s\r\n\r\nhi\r\n"
            return self.v3([("to", "b@x.example"), ("message", ("m.eml", message))], "/v3/example.com/messages.mime")

        for extra, domain in (
            (b"Sender: ada@globex.example\r\n", "globex.example"),
            (b"Resent-From: Ada <ada@example.com>, eve@unregistered.example\r\n", "unregistered.example"),
            (b"Resent-Sender:\r\n eve@GLOBEX.example\r\n", "globex.example"),
            (b"Resent-From: ada@example.com\r\nResent-From: eve@globex.example\r\n", "globex.example"),
        ):
            code, answer = mime(extra)
            self.assertEqual(code, 403, (extra, answer))
            self.assertIn(f"({domain}) is not one of this client's sending domains", answer["message"])
        self.assertEqual(self.queued(), [])
        own = b"Sender: ada@bare.example\r\nResent-From: A <a@EXAMPLE.com>\r\nResent-Sender: b@bare.example\r\n"
        self.assertEqual(mime(own)[0], 200)
        self.assertEqual(len(self.queued()), 1)
        self.use(sender_policy="any")
        self.assertEqual(mime(b"Sender: ada@globex.example\r\n")[0], 200)

    def test_option(self) -> None:
        """issue 13 (sender policy): --sender-policy / MMGUN_SENDER_POLICY reach the frontend's settings; any other value is refused."""
        options = Options({})
        options.parseOptions([])
        self.assertEqual(options.config.sender_policy, "any")
        options = Options({"MMGUN_SENDER_POLICY": "domains"})
        options.parseOptions([])
        self.assertEqual(web_settings(options.config, 10).sender_policy, "domains")
        with self.assertRaises(usage.UsageError):
            Options({}).parseOptions(["--sender-policy", "some"])


class DomainURLTests(SigningTestCase):
    FIELDS = [("from", "ada@globex.example"), ("to", "b@x.example"), ("subject", "s"), ("text", "t")]

    def test_other_clients_and_unknown_domains_are_not_found(self) -> None:
        """issue 13 (v3): /v3/{domain} of another client's domain and of an unknown one give the same 404; nothing queued."""
        for path in ("/v3/globex.example/messages", "/v3/globex.example/messages.mime"):
            self.assertEqual(self.v3(self.FIELDS, path), (404, {"message": "Domain not found: globex.example"}))
        fields = [("from", "ada@nowhere.example"), *self.FIELDS[1:]]
        self.assertEqual(self.v3(fields, "/v3/NOWHERE.example/messages"), (404, {"message": "Domain not found: nowhere.example"}))
        self.assertEqual(self.queued(), [])
        # Its owner sends from it, signed.
        self.assertEqual(self.v3(self.FIELDS, "/v3/globex.example/messages", client="globex")[0], 200)
        self.assertEqual(verify_all(self.queued()[0]), [b"globex.example", b"globex.example"])


class CacheTests(SigningTestCase):
    def test_changes_take_effect_within_the_cache_time(self) -> None:
        """issue 13 (signing): a domain's owner and keys are read at most once per DOMAIN_CACHE_SECONDS; a removal is seen after it."""
        self.use(sender_policy="domains")
        reads = []
        original = self.store.domain

        async def counted(name: str) -> Any:
            reads.append(name)
            return await original(name)

        self.patch(self.store, "domain", counted)
        for _ in range(3):
            self.assertEqual(self.send()[0], 200)
        self.assertEqual(reads, ["example.com"])
        result(self, self.store.remove_domain("example.com"))
        self.assertEqual(self.send()[0], 200)  # cached
        self.clock.advance(signing.DOMAIN_CACHE_SECONDS)
        self.assertEqual(self.send()[0], 403)
        self.assertEqual(reads, ["example.com"] * 2)

    def test_cache_is_bounded(self) -> None:
        """issue 13 (signing): senders from ever new domains cannot grow the domain cache past its bound."""
        self.patch(signing, "MAX_CACHED_DOMAINS", 5)
        for i in range(12):
            self.assertEqual(self.send(f"ada@d{i}.example")[0], 200)
        self.assertLessEqual(len(self.api.frontend.pipeline.domains._cache), 5)


class SignerProcessTests(TestCase):
    async def test_signs_in_the_helper_process(self) -> None:
        """
        issue 13 (speed): the frontend's SendingDomains with the service's SignerProcess: the
        private-key operations happen in the child (this process's sign_digest made to fail),
        and the message verifies with dkimpy.
        """
        from twisted.internet import reactor

        service = SignerProcess(reactor)
        service.startService()
        self.addCleanup(service.stopService)
        self.assertNotIn(service.pid, (None, os.getpid()))
        domains = SendingDomains(self.store(), reactor, signer=service)
        message = b"From: ada@example.com\r\nSubject: s\r\n\r\nhi\r\n"

        def not_here(*args: Any) -> bytes:
            raise AssertionError("signed in the frontend process")

        self.patch(dkim, "sign_digest", not_here)
        signed = await domains.sign("acme", DomainState("acme", tuple(keys_for("example.com"))), message, NOW)
        self.assertTrue(signed.endswith(message))
        self.assertEqual(verify_all(signed), [b"example.com", b"example.com"])

    def store(self) -> Any:
        from .helpers import sync_store

        return sync_store(self)[0]
