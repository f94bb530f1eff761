"""
MTA-STS (RFC 8461) for outgoing delivery: mmgun.mtasts and its use by the sender (issue 18).

The parsers and the cache run in memory (a real SQLite store, a Clock); the fetcher runs
against a real HTTPS policy server on 127.0.0.1 whose certificates a test CA issued (names
resolved by the in-process zone resolver, the port injected, the name still verified);
enforcement runs real SMTP sessions against the stub MX with a certificate for its name
and with one for another name.
"""

from __future__ import annotations

import datetime
import functools
import random
import uuid
from typing import Any, cast

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, CertificateOptions, trustRootFromCertificates
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.names import dns
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from mmgun.mtasts import (
    FetchFailed,
    MTASTSRefusal,
    MTASTSRouter,
    ParsedPolicy,
    PolicyCache,
    PolicyError,
    PolicyFetcher,
    PolicyState,
    PolicyUnknown,
    apply_policy,
    enforced_settings,
    enforcing,
    lookup_policy_id,
    mx_matches,
    parse_policy,
    parse_record,
)
from mmgun.mx import ANY_ADDRESS, MXHost, MXResolver, PublicOnly
from mmgun.sender import Sender, SenderSettings
from mmgun.smtp import (
    RecipientResult,
    Reply,
    SessionFailed,
    SMTPSettings,
    TLSMode,
    Transaction,
    TransactionResult,
    send_session,
)
from mmgun.store import MTASTSPolicy, NewSubmission, StorageError
from mmgun.testing.dnsserver import ZoneResolver
from mmgun.testing.ports import port_number
from mmgun.testing.smtpserver import Mailbox, smtp_server_factory
from mmgun.webhooks import DNSHostResolver

from .helpers import result, sync_store, wait_until

T0 = 1_800_000_000.0
DAY = 86400

ENFORCE = b"version: STSv1\r\nmode: enforce\r\nmx: mx.enforce.test\r\nmx: *.backup.enforce.test\r\nmax_age: 86400\r\n"


def txt(text: str) -> dns.Record_TXT:
    return dns.Record_TXT(text.encode("ascii"), ttl=60)


def stored(domain: str, mode: str = "enforce", mx: tuple[str, ...] = ("mx.enforce.test",), policy_id: str = "1", fetched_at: float = T0, max_age: int = DAY) -> MTASTSPolicy:
    return MTASTSPolicy(domain, policy_id, mode, mx, max_age, fetched_at)


# -- certificates: a test CA, and what it issues ------------------------------------------


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _ca(common_name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


@attrs.frozen
class CA:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(Encoding.PEM)

    @property
    def trust(self) -> Any:
        return trustRootFromCertificates([Certificate.loadPEM(self.pem)])

    def issue(self, *names: str) -> CertificateOptions:
        """Server TLS options with a certificate for ``names``, issued by this CA."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(names[0]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=365))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        # pyOpenSSL takes cryptography objects; Twisted's annotations still name its own types.
        return CertificateOptions(privateKey=key, certificate=cert)  # type: ignore[arg-type]


@functools.cache
def test_ca() -> CA:
    return CA(*_ca("mmgun MTA-STS test CA"))


@functools.cache
def other_ca() -> CA:
    return CA(*_ca("an unrelated CA"))


# -- section 3.1: the TXT record ----------------------------------------------------------


class RecordTests(SynchronousTestCase):
    def test_valid_records(self) -> None:
        """issue 18 MTA-STS (section 3.1): v=STSv1 records give their id, extensions and spacing allowed."""
        self.assertEqual(parse_record("v=STSv1; id=20160831085700Z;"), "20160831085700Z")
        self.assertEqual(parse_record("v=STSv1;id=abc"), "abc")
        self.assertEqual(parse_record("v=STSv1; ext_1=x.y; id=A1 ;"), "A1")
        self.assertEqual(parse_record("v=STSv1; id=first; id=second"), "first")

    def test_invalid_records(self) -> None:
        """issue 18 MTA-STS (section 3.1): a record without a valid id, or not STSv1, is no policy."""
        for text in (
            "v=STSv1;",
            "v=STSv1; id=",
            "v=STSv1; id=has-hyphen",
            "v=STSv1; id=" + "a" * 33,
            "v=STSv2; id=1",
            "v=stsv1; id=1",
            "v=STSv1; ext=1",
            "v=STSv1; id=1; bad field",
            "v=STSv1; id=1;\x00",
        ):
            with self.assertRaises(ValueError, msg=text):
                parse_record(text)

    def test_exactly_one_stsv1_record(self) -> None:
        """
        issue 18 MTA-STS (section 3.1): other TXT records are ignored, two STSv1 records mean
        no policy, a record split in several strings is joined, no record or no domain is None.
        """
        resolver = ZoneResolver(
            {
                "_mta-sts.one.test": [txt("spf1 -all"), txt("v=STSv1; id=one1;")],
                "_mta-sts.two.test": [txt("v=STSv1; id=a;"), txt("v=STSv1; id=b;")],
                "_mta-sts.split.test": [dns.Record_TXT(b"v=STSv1; ", b"id=split;", ttl=60)],
                "_mta-sts.prefix.test": [txt("v=STSv1 ; id=x;")],
                "_mta-sts.broken.test": "SERVFAIL",
                "nothing.test": [dns.Record_A("192.0.2.1")],
            }
        )
        self.assertEqual(result(self, lookup_policy_id(resolver, "one.test")), "one1")
        self.assertIsNone(result(self, lookup_policy_id(resolver, "two.test")))
        self.assertEqual(result(self, lookup_policy_id(resolver, "split.test")), "split")
        self.assertIsNone(result(self, lookup_policy_id(resolver, "prefix.test")))
        self.assertIsNone(result(self, lookup_policy_id(resolver, "broken.test")))
        self.assertIsNone(result(self, lookup_policy_id(resolver, "nothing.test")))
        self.assertIsNone(result(self, lookup_policy_id(resolver, "absent.test")))


# -- section 3.2: the policy -----------------------------------------------------------------


class PolicyParsingTests(SynchronousTestCase):
    def test_enforce_policy(self) -> None:
        """issue 18 MTA-STS (section 3.2): CRLF lines, several mx, patterns lower-cased."""
        self.assertEqual(parse_policy(ENFORCE), ParsedPolicy("enforce", ("mx.enforce.test", "*.backup.enforce.test"), DAY))
        lf = b"mode: testing\nmx: MX.Example.COM\nversion: STSv1\nmax_age: 0"
        self.assertEqual(parse_policy(lf), ParsedPolicy("testing", ("mx.example.com",), 0))

    def test_first_instance_counts_and_extensions_ignored(self) -> None:
        """issue 18 MTA-STS (section 3.2): a repeated field's first instance is used; unknown keys are ignored."""
        body = b"version: STSv1\nmode: testing\nmode: enforce\nmx: a.test\nmax_age: 60\nmax_age: 99999999999\nfuture_ext: anything goes\n"
        self.assertEqual(parse_policy(body), ParsedPolicy("testing", ("a.test",), 60))

    def test_mode_none_needs_no_mx(self) -> None:
        """issue 18 MTA-STS (sections 3.2, 8.3): mode none (removing a policy) has no mx."""
        self.assertEqual(parse_policy(b"version: STSv1\nmode: none\nmax_age: 600\n"), ParsedPolicy("none", (), 600))

    def test_malformed_policies_refused(self) -> None:
        """issue 18 MTA-STS (section 3.2): a policy that is not valid is refused whole, never half-applied."""
        base = {"version": "STSv1", "mode": "enforce", "mx": "mx.a.test", "max_age": "86400"}
        cases: dict[str, dict[str, str | None]] = {
            "no version": {**base, "version": None},
            "version 2": {**base, "version": "STSv2"},
            "unknown mode": {**base, "mode": "strict"},
            "no mode": {**base, "mode": None},
            "max_age not a number": {**base, "max_age": "1d"},
            "max_age negative": {**base, "max_age": "-1"},
            "max_age 11 digits": {**base, "max_age": "00000000001"},
            "no max_age": {**base, "max_age": None},
            "enforce without mx": {**base, "mx": None},
            "mx with a wildcard inside": {**base, "mx": "mx.*.a.test"},
            "mx with a bare wildcard": {**base, "mx": "*"},
            "mx with a space": {**base, "mx": "mx a.test"},
        }
        for what, fields in cases.items():
            body = "".join(f"{k}: {v}\r\n" for k, v in fields.items() if v is not None).encode()
            with self.assertRaises(PolicyError, msg=what):
                parse_policy(body)
        for what, body in {
            "not key: value": b"version: STSv1\nmode enforce\nmx: a.test\nmax_age: 1\n",
            "not UTF-8": b"version: STSv1\nmode: enforce\nmx: a.test\nmax_age: 1\nx: \xff\n",
            "an HTML page": b"<html><body>version: STSv1</body></html>",
        }.items():
            with self.assertRaises(PolicyError, msg=what):
                parse_policy(body)
        self.assertEqual(parse_policy(b"version: STSv1\nmode: enforce\nmx: a.test\nmax_age: 31557600\n").max_age, 31557600)

    def test_max_age_over_a_year_is_clamped(self) -> None:
        """
        issue 18 review MF item 5 (section 3.2, "up to 31557600"): a max_age over a year is
        clamped to 31557600 rather than the whole policy refused (which would leave the domain
        unprotected); 11 digits are still not a max_age.
        """
        for value in (b"31557601", b"9999999999"):
            body = b"version: STSv1\nmode: enforce\nmx: a.test\nmax_age: " + value + b"\n"
            self.assertEqual(parse_policy(body), ParsedPolicy("enforce", ("a.test",), 31557600), value)


class MXMatchingTests(SynchronousTestCase):
    def test_exact_and_wildcard(self) -> None:
        """
        issue 18 MTA-STS (section 4.1): a pattern matches its own name (any case, a final dot
        ignored); "*.example.com" matches one more label only — not example.com, not a.b.example.com.
        """
        self.assertTrue(mx_matches("mx.example.com", "MX.example.com."))
        self.assertFalse(mx_matches("mx.example.com", "mx.example.com.evil.test"))
        self.assertFalse(mx_matches("mx.example.com", "amx.example.com"))
        self.assertTrue(mx_matches("*.example.com", "mail.example.com"))
        self.assertFalse(mx_matches("*.example.com", "example.com"))
        self.assertFalse(mx_matches("*.example.com", "a.b.example.com"))
        self.assertFalse(mx_matches("*.example.com", "mail.evilexample.com"))
        self.assertFalse(mx_matches("*.example.com", ".example.com"))


# -- applying a policy to the MX hosts ------------------------------------------------------------


class ApplyTests(SynchronousTestCase):
    hosts = [
        MXHost("mx.enforce.test", "192.0.2.1", 25),
        MXHost("evil.attacker.test", "192.0.2.66", 25),
        MXHost("b1.backup.enforce.test", "192.0.2.2", 25),
    ]

    def test_enforce_keeps_matching_hosts_and_requires_verified_tls(self) -> None:
        """
        issue 18 MTA-STS (section 4.1, the attack: a spoofed MX record): in enforce mode an MX
        not matching the policy is never used; the others are marked to need a verified certificate.
        """
        policy = stored("enforce.test", mx=("mx.enforce.test", "*.backup.enforce.test"))
        kept = apply_policy("enforce.test", policy, self.hosts)
        self.assertEqual([(h.name, h.mta_sts) for h in kept], [("mx.enforce.test", "enforce.test"), ("b1.backup.enforce.test", "enforce.test")])

    def test_enforce_with_no_matching_host_defers_saying_why(self) -> None:
        """issue 18 MTA-STS: enforce mode and no MX matching: a temporary refusal naming the policy."""
        policy = stored("enforce.test", mx=("mx.elsewhere.test",))
        with self.assertRaises(MTASTSRefusal) as caught:
            apply_policy("enforce.test", policy, self.hosts)
        self.assertTrue(caught.exception.reply.startswith("451 4.7.5 MTA-STS policy of enforce.test: no MX host matches"), caught.exception.reply)

    def test_testing_and_none_change_nothing(self) -> None:
        """issue 18 MTA-STS (section 5): testing mode logs what enforce would refuse and delivers as before; none ignores the policy."""
        logged: list[dict[str, Any]] = []
        from twisted.logger import globalLogPublisher

        observer: Any = logged.append
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        testing = stored("enforce.test", mode="testing", mx=("mx.enforce.test",))
        self.assertEqual(apply_policy("enforce.test", testing, self.hosts), self.hosts)
        warnings = [e for e in logged if "would refuse" in e.get("log_format", "")]
        self.assertEqual(len(warnings), 1)
        self.assertIn("evil.attacker.test", warnings[0]["refused"])
        self.assertEqual(apply_policy("enforce.test", stored("enforce.test", mode="none", mx=()), self.hosts), self.hosts)
        self.assertEqual(apply_policy("enforce.test", None, self.hosts), self.hosts)


# -- the cache -------------------------------------------------------------------------------------------


class Zone:
    """A resolver whose records a test changes, counting the TXT lookups it answers."""

    def __init__(self, records: dict[str, Any]) -> None:
        self.records = records
        self.queries: list[str] = []

    def lookupText(self, name: str, timeout: Any = None) -> Deferred[Any]:
        self.queries.append(name)
        return ZoneResolver(self.records).lookupText(name)


class ScriptedFetcher:
    """Answers each fetch from ``answers`` (a ParsedPolicy, an exception, or a Deferred to wait on)."""

    def __init__(self) -> None:
        self.answers: dict[str, Any] = {}
        self.fetched: list[str] = []

    async def fetch(self, domain: str) -> ParsedPolicy:
        self.fetched.append(domain)
        answer = self.answers[domain]
        if isinstance(answer, Deferred):
            answer = await answer
        if isinstance(answer, Exception):
            raise answer
        assert isinstance(answer, ParsedPolicy)
        return answer


class CacheFixture:
    """A PolicyCache over a real SQLite store, a scripted zone and fetcher, a Clock and a wall time."""

    def setUp(self) -> None:
        case = cast(SynchronousTestCase, self)
        self.store, _ = sync_store(case)
        self.clock = Clock()
        self.wall = T0
        self.zone = Zone({"_mta-sts.enforce.test": [txt("v=STSv1; id=one;")]})
        self.fetcher = ScriptedFetcher()
        self.fetcher.answers["enforce.test"] = parse_policy(ENFORCE)

    def cache(self) -> PolicyCache:
        return PolicyCache(self.store, self.zone, self.fetcher, self.clock, lambda: self.wall)  # type: ignore[arg-type]

    def state(self, cache: PolicyCache, domain: str = "enforce.test") -> PolicyState:
        return cast(SynchronousTestCase, self).successResultOf(cache.policy(domain))

    def policy(self, cache: PolicyCache, domain: str = "enforce.test") -> MTASTSPolicy | None:
        policy = self.state(cache, domain)
        assert not isinstance(policy, PolicyUnknown), policy
        return policy


class CacheTests(CacheFixture, SynchronousTestCase):

    def test_fetched_once_then_shared_through_the_store(self) -> None:
        """
        issue 18 MTA-STS (cache): a fetched policy is stored; the same sender and another one
        (or this one restarted) use it without fetching again while the TXT id is unchanged.
        """
        first = self.policy(self.cache())
        assert first is not None
        self.assertEqual((first.policy_id, first.mode, first.mx, first.max_age), ("one", "enforce", ("mx.enforce.test", "*.backup.enforce.test"), DAY))
        self.assertEqual(result(self, self.store.mta_sts_policy("enforce.test", T0)), first)
        other = self.cache()
        self.assertEqual(self.policy(other), first)
        self.assertEqual(self.fetcher.fetched, ["enforce.test"])

    def test_new_txt_id_fetches_again(self) -> None:
        """issue 18 MTA-STS (sections 3.1, 5.1): a changed TXT id makes the sender fetch the policy again."""
        cache = self.cache()
        self.policy(cache)
        self.zone.records["_mta-sts.enforce.test"] = [txt("v=STSv1; id=two;")]
        self.fetcher.answers["enforce.test"] = parse_policy(b"version: STSv1\nmode: testing\nmx: mx.enforce.test\nmax_age: 600\n")
        second = self.policy(cache)
        assert second is not None
        self.assertEqual((second.policy_id, second.mode), ("two", "testing"))
        self.assertEqual(len(self.fetcher.fetched), 2)
        self.assertEqual(result(self, self.store.mta_sts_policy("enforce.test", T0)), second)

    def test_failed_refresh_keeps_the_cached_policy_until_it_expires(self) -> None:
        """
        issue 18 MTA-STS (section 3.3, the attack: an attacker who blocks the policy server
        or changes DNS to downgrade): a failed refetch, a vanished TXT record or a failing TXT
        lookup keeps the unexpired policy in force; only its expiry ends it.
        """
        cache = self.cache()
        self.policy(cache)
        self.zone.records["_mta-sts.enforce.test"] = [txt("v=STSv1; id=two;")]
        self.fetcher.answers["enforce.test"] = FetchFailed("HTTP 503")
        kept = self.policy(cache)
        assert kept is not None
        self.assertEqual((kept.policy_id, kept.mode), ("one", "enforce"))
        del self.zone.records["_mta-sts.enforce.test"]
        self.assertEqual(self.policy(self.cache()), kept, "a policy removed from DNS stopped applying before its max_age")
        self.zone.records["_mta-sts.enforce.test"] = "SERVFAIL"
        self.assertEqual(self.policy(self.cache()), kept)
        self.wall = T0 + DAY
        self.assertIsNone(self.policy(self.cache()), "an expired policy still applied")

    def test_no_policy_remembered_briefly(self) -> None:
        """issue 18 MTA-STS (cost for domains without a policy): one TXT lookup per NO_POLICY_TIME, no store read in between."""
        cache = self.cache()
        self.assertIsNone(self.policy(cache, "plain.test"))
        self.assertIsNone(self.policy(cache, "plain.test"))
        self.assertEqual(self.zone.queries, ["_mta-sts.plain.test"])
        self.clock.advance(300)
        self.assertIsNone(self.policy(cache, "plain.test"))
        self.assertEqual(self.zone.queries, ["_mta-sts.plain.test"] * 2)

    def test_failed_first_fetch_means_no_policy(self) -> None:
        """issue 18 MTA-STS (section 3.3): a TXT record but no fetchable policy and nothing cached: delivered as without MTA-STS."""
        self.fetcher.answers["enforce.test"] = FetchFailed("TLS handshake failed")
        self.assertIsNone(self.policy(self.cache()))
        self.assertIsNone(result(self, self.store.mta_sts_policy("enforce.test", T0)))

    def test_concurrent_lookups_share_one_fetch(self) -> None:
        """issue 18 MTA-STS: lookups of one domain while its fetch is under way wait for that fetch; there is only one."""
        held: Deferred[ParsedPolicy] = Deferred()
        self.fetcher.answers["enforce.test"] = held
        cache = self.cache()
        waiting = [cache.policy("enforce.test") for _ in range(5)]
        self.assertNoResult(waiting[0])
        held.callback(parse_policy(ENFORCE))
        policies = [self.successResultOf(d) for d in waiting]
        self.assertEqual(self.fetcher.fetched, ["enforce.test"])
        self.assertTrue(all(isinstance(p, MTASTSPolicy) and p.mode == "enforce" for p in policies))


class FailingReads:
    """The real store, but its MTA-STS policy reads raise StorageError while ``failing`` is set."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self.failing = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def mta_sts_policy(self, domain: str, now: float) -> MTASTSPolicy | None:
        if self.failing:
            raise StorageError("database is locked")
        return cast(MTASTSPolicy | None, await self._store.mta_sts_policy(domain, now))


class RefreshAndStoreErrorTests(CacheFixture, SynchronousTestCase):
    """The review of issue 18's MTA-STS: refreshing before expiry, and a store that cannot be read."""

    #: When a DAY-long policy fetched at T0 is in its refresh window (the last 8640 s).
    NEAR_EXPIRY = T0 + DAY - 3600

    def test_policy_near_expiry_is_refreshed_in_the_background(self) -> None:
        """
        issue 18 review MF item 1 (sections 5.1, 10.2, the attack: block the TXT lookup and wait
        for the cached policy to expire): a policy used in its last tenth (or last day) is fetched
        again although its TXT id is unchanged; the lookup does not wait for that fetch; the fresh
        copy (new fetched_at) is stored, and still applies after the first one's max_age, with DNS blocked.
        """
        cache = self.cache()
        first = self.policy(cache)
        assert first is not None
        self.wall = T0 + DAY / 2
        self.assertEqual(self.policy(cache), first)
        self.assertEqual(self.fetcher.fetched, ["enforce.test"], "refreshed although far from its expiry")
        held: Deferred[ParsedPolicy] = Deferred()
        self.fetcher.answers["enforce.test"] = held
        self.wall = self.NEAR_EXPIRY
        self.assertEqual(self.policy(cache), first, "the lookup waited for the refresh")
        self.assertEqual(self.fetcher.fetched, ["enforce.test"] * 2, "not refreshed before its expiry")
        self.assertEqual(self.policy(cache), first)
        self.assertEqual(len(self.fetcher.fetched), 2, "a second refresh while one is under way")
        held.callback(parse_policy(ENFORCE))
        refreshed = result(self, self.store.mta_sts_policy("enforce.test", self.NEAR_EXPIRY))
        self.assertEqual((refreshed.policy_id, refreshed.mode, refreshed.fetched_at), ("one", "enforce", self.NEAR_EXPIRY))
        self.zone.records["_mta-sts.enforce.test"] = "SERVFAIL"
        self.wall = T0 + DAY + 60
        self.assertEqual(self.policy(cache), refreshed, "the policy lapsed at its first max_age")
        self.assertEqual(self.policy(self.cache()), refreshed, "the refreshed policy was not shared through the store")
        self.assertEqual(len(self.fetcher.fetched), 2)

    def test_failed_refresh_keeps_the_policy_until_it_expires(self) -> None:
        """
        issue 18 review MF item 1: a refresh that fails keeps the policy in force until it really
        expires, tried again only after REFETCH_PAUSE (not on every message); at its expiry it is
        fetched as a new one would be.
        """
        cache = self.cache()
        first = self.policy(cache)
        self.fetcher.answers["enforce.test"] = FetchFailed("HTTP 503")
        self.wall = self.NEAR_EXPIRY
        self.assertEqual(self.policy(cache), first)
        self.assertEqual(self.policy(cache), first)
        self.assertEqual(len(self.fetcher.fetched), 2)
        self.clock.advance(300)
        self.wall += 300
        self.assertEqual(self.policy(cache), first)
        self.assertEqual(len(self.fetcher.fetched), 3)
        self.assertEqual(result(self, self.store.mta_sts_policy("enforce.test", self.wall)), first)
        self.wall = T0 + DAY
        self.assertIsNone(self.policy(cache), "an expired policy still applied")
        self.assertEqual(len(self.fetcher.fetched), 4)

    def test_unreadable_store_is_not_taken_for_no_policy(self) -> None:
        """
        issue 18 review MF item 2 (the attack: DNS blocked while the store hiccups, after a
        restart): an enforce policy is stored; the TXT lookup fails and the store read raises
        StorageError: the policy is unknown, not "none" — the domain's mail is deferred with a
        451 4.7.5, and nothing is remembered: once the store answers, the stored policy applies.
        """
        self.policy(self.cache())
        self.zone.records["_mta-sts.enforce.test"] = "SERVFAIL"
        store = FailingReads(self.store)
        store.failing = True
        cache = PolicyCache(store, self.zone, self.fetcher, self.clock, lambda: self.wall)  # type: ignore[arg-type]
        self.assertEqual(self.state(cache), PolicyUnknown("enforce.test"))
        router = MTASTSRouter(Hosts({"enforce.test": [MXHost("evil.attacker.test", "192.0.2.66", 25)]}), cache)
        refused = self.failureResultOf(defer.ensureDeferred(router.hosts("enforce.test")), MTASTSRefusal)
        self.assertEqual(
            refused.value.reply,
            "451 4.7.5 MTA-STS policy state of enforce.test unknown (its cached policy could not be read); not delivering",
        )
        store.failing = False
        applied = self.policy(cache)
        assert applied is not None
        self.assertEqual((applied.policy_id, applied.mode), ("one", "enforce"))
        self.assertEqual(self.fetcher.fetched, ["enforce.test"])

    def test_unreadable_store_with_a_txt_record(self) -> None:
        """
        issue 18 review MF item 2: the store cannot be read but the TXT record is there: a policy
        fetched now is used; if the fetch fails too, the policy is unknown (deferred), not "none".
        """
        store = FailingReads(self.store)
        store.failing = True
        cache = PolicyCache(store, self.zone, self.fetcher, self.clock, lambda: self.wall)  # type: ignore[arg-type]
        fetched = self.policy(cache)
        assert fetched is not None
        self.assertEqual(fetched.mode, "enforce")
        self.fetcher.answers["other.test"] = FetchFailed("no answer within 10 s")
        self.zone.records["_mta-sts.other.test"] = [txt("v=STSv1; id=7;")]
        self.assertEqual(self.state(cache, "other.test"), PolicyUnknown("other.test"))
        self.assertEqual(self.state(cache, "other.test"), PolicyUnknown("other.test"), "a negative answer was remembered")
        self.assertEqual(self.fetcher.fetched, ["enforce.test", "other.test", "other.test"])


class AddressLimitTests(SynchronousTestCase):
    """An enforced policy and the MX resolver's limits (--mx-address-limit, max_names)."""

    def router(self, mode: str, unlisted: int, **limits: Any) -> MTASTSRouter:
        records: dict[str, Any] = {
            "_mta-sts.enforce.test": [txt("v=STSv1; id=1;")],
            "enforce.test": [dns.Record_MX(10, f"mx{i}.attacker.test".encode()) for i in range(unlisted)]
            + [dns.Record_MX(20, b"mx.enforce.test")],
            "mx.enforce.test": [dns.Record_A("192.0.2.100")],
            **{f"mx{i}.attacker.test": [dns.Record_A(f"192.0.2.{i + 1}")] for i in range(unlisted)},
        }
        zone = ZoneResolver(records)
        store, _ = sync_store(self)
        result(self, store.save_mta_sts_policy(stored("enforce.test", mode=mode, fetched_at=T0)))
        self.mx = MXResolver(zone, Clock(), policy=ANY_ADDRESS, random=random.Random(1), **limits)
        cache = PolicyCache(store, zone, ScriptedFetcher(), Clock(), lambda: T0)
        return MTASTSRouter(self.mx, cache)

    def hosts(self, router: MTASTSRouter) -> list[tuple[str, str | None]]:
        return [(h.name, h.mta_sts) for h in self.successResultOf(defer.ensureDeferred(router.hosts("enforce.test")))]

    def test_unlisted_mx_hosts_ranking_first_do_not_crowd_out_the_listed_one(self) -> None:
        """
        issue 18 review MF item 4 (the attack: six MX records of better preference, none in the
        policy): the listed, lower-preference MX is still used — the policy's hosts go first before
        the 5-address cut — instead of the domain being deferred.
        """
        self.assertEqual(self.hosts(self.router("enforce", 6)), [("mx.enforce.test", "enforce.test")])

    def test_beyond_max_names_too(self) -> None:
        """issue 18 review MF item 4: eleven unlisted MX names ahead of the listed one (over max_names 10): still found."""
        self.assertEqual(self.hosts(self.router("enforce", 11)), [("mx.enforce.test", "enforce.test")])

    def test_listed_host_marked_bad_still_kept(self) -> None:
        """issue 18 review MF item 4: the listed MX marked bad (tried last) is not cut off behind unlisted good ones."""
        router = self.router("enforce", 6)
        self.mx.mark_bad(MXHost("mx.enforce.test", "192.0.2.100", 25))
        self.assertEqual(self.hosts(router), [("mx.enforce.test", "enforce.test")])

    def test_testing_mode_keeps_the_usual_order(self) -> None:
        """issue 18 review MF item 4: in testing mode delivery is as without a policy: the best five addresses, unlisted ones included."""
        hosts = self.hosts(self.router("testing", 6))
        self.assertEqual(len(hosts), 5)
        self.assertTrue(all(name.endswith(".attacker.test") and domain is None for name, domain in hosts), hosts)


# -- section 3.3: fetching over HTTPS --------------------------------------------------------------------

BIG = 70 * 1024

#: Each policy domain's answer: (status, content type, body, extra headers, stream the body without Content-Length).
ANSWERS: dict[str, tuple[int, bytes, bytes, dict[bytes, bytes], bool]] = {
    "enforce.test": (200, b"text/plain", ENFORCE, {}, False),
    "charset.test": (200, b"Text/Plain; charset=utf-8", ENFORCE, {}, False),
    "testing.test": (200, b"text/plain", b"version: STSv1\nmode: testing\nmx: mx.testing.test\nmax_age: 600\n", {}, False),
    "none.test": (200, b"text/plain", b"version: STSv1\nmode: none\nmax_age: 600\n", {}, False),
    "malformed.test": (200, b"text/plain", b"version: STSv1\nmode: enforce\nmax_age: 600\n", {}, False),
    "redirect.test": (301, b"text/plain", b"", {b"location": b"https://mta-sts.enforce.test/.well-known/mta-sts.txt"}, False),
    "missing.test": (404, b"text/plain", b"not found", {}, False),
    "html.test": (200, b"text/html", ENFORCE, {}, False),
    "big.test": (200, b"text/plain", ENFORCE + b"x: " + b"y" * BIG + b"\n", {}, False),
    "bigstream.test": (200, b"text/plain", ENFORCE + (b"x: " + b"y" * 1000 + b"\n") * 70, {}, True),
}


class PolicyServer(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[tuple[str, bytes]] = []

    def render_GET(self, request: Any) -> Any:
        host = request.getRequestHostname().decode("ascii")
        self.requests.append((host, request.path))
        status, content_type, body, headers, stream = ANSWERS[host.removeprefix("mta-sts.")]
        request.setResponseCode(status)
        request.setHeader(b"content-type", content_type)
        for name, value in headers.items():
            request.setHeader(name, value)
        if not stream:
            return body
        for start in range(0, len(body), 4096):
            request.write(body[start : start + 4096])
        request.finish()
        return NOT_DONE_YET


class FetchTests(TestCase):
    def setUp(self) -> None:
        from twisted.internet import reactor

        self.reactor: Any = reactor
        self.server = PolicyServer()
        names = [f"mta-sts.{domain}" for domain in ANSWERS]
        self.port = self.listen(test_ca().issue(*names))
        self.wrong_port = self.listen(test_ca().issue("mta-sts.someone-else.test"))
        self.zone = ZoneResolver({f"mta-sts.{d}": [dns.Record_A("127.0.0.1")] for d in [*ANSWERS, "someone-else.test"]})

    def listen(self, options: CertificateOptions) -> int:
        site = Site(self.server)
        site.noisy = False
        listening = self.reactor.listenSSL(0, site, options, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        return port_number(listening)

    def fetcher(self, *, port: int | None = None, trust: Any = None, policy: Any = ANY_ADDRESS, clock: Any = None) -> PolicyFetcher:
        return PolicyFetcher(
            self.reactor,
            clock if clock is not None else self.reactor,
            resolver=DNSHostResolver(self.zone),
            policy=policy,
            trust_root=trust if trust is not None else test_ca().trust,
            port=port or self.port,
        )

    async def failure(self, fetcher: PolicyFetcher, domain: str) -> str:
        try:
            await fetcher.fetch(domain)
        except FetchFailed as e:
            return str(e)
        self.fail(f"fetching {domain}'s policy succeeded")

    async def test_fetches_and_parses(self) -> None:
        """issue 18 MTA-STS (section 3.3): GET https://mta-sts.<domain>/.well-known/mta-sts.txt, the name verified, text/plain parsed."""
        fetcher = self.fetcher()
        self.assertEqual(await fetcher.fetch("enforce.test"), ParsedPolicy("enforce", ("mx.enforce.test", "*.backup.enforce.test"), DAY))
        self.assertEqual(self.server.requests, [("mta-sts.enforce.test", b"/.well-known/mta-sts.txt")])
        self.assertEqual((await fetcher.fetch("charset.test")).mode, "enforce")
        self.assertEqual((await fetcher.fetch("testing.test")).mode, "testing")
        self.assertEqual(await fetcher.fetch("none.test"), ParsedPolicy("none", (), 600))

    async def test_redirect_not_followed(self) -> None:
        """issue 18 MTA-STS (section 3.3, the attack: a redirect to a policy elsewhere): a 3xx is a failed fetch, nothing followed."""
        self.assertEqual(await self.failure(self.fetcher(), "redirect.test"), "HTTP 301")
        self.assertEqual([host for host, _ in self.server.requests], ["mta-sts.redirect.test"])
        self.assertEqual(await self.failure(self.fetcher(), "missing.test"), "HTTP 404")

    async def test_wrong_content_type_malformed_and_oversized_refused(self) -> None:
        """issue 18 MTA-STS (sections 3.2, 3.3, the attack: a huge body): not text/plain, invalid, or over 64 KiB (declared or streamed): no policy."""
        fetcher = self.fetcher()
        self.assertIn("not text/plain", await self.failure(fetcher, "html.test"))
        self.assertIn("invalid policy: mode enforce without any mx", await self.failure(fetcher, "malformed.test"))
        self.assertIn("over 65536", await self.failure(fetcher, "big.test"))
        self.assertIn("over 65536", await self.failure(fetcher, "bigstream.test"))

    async def test_certificate_verified_for_the_policy_host(self) -> None:
        """
        issue 18 MTA-STS (section 3.3, the attack: a man in the middle): a certificate for
        another name, or from a CA not trusted, fails the fetch, though the server answers.
        """
        wrong_name = await self.failure(self.fetcher(port=self.wrong_port), "enforce.test")
        self.assertIn("TLS handshake failed", wrong_name)
        untrusted = await self.failure(self.fetcher(trust=other_ca().trust), "enforce.test")
        self.assertIn("TLS handshake failed", untrusted)
        self.assertEqual(self.server.requests, [])

    async def test_policy_host_at_an_internal_address_refused(self) -> None:
        """issue 18 MTA-STS (the attack: mta-sts.<domain> pointed at this host's services): refused as MX addresses are."""
        self.assertIn("refused address", await self.failure(self.fetcher(policy=PublicOnly()), "enforce.test"))
        self.assertEqual(self.server.requests, [])

    async def test_fetch_times_out(self) -> None:
        """issue 18 MTA-STS (the attack: a policy server that accepts and never answers): the fetch fails after its timeout."""
        accepted: list[Protocol] = []

        class Silent(Protocol):
            def connectionMade(self) -> None:
                accepted.append(self)

        silent = self.reactor.listenTCP(0, Factory.forProtocol(Silent), interface="127.0.0.1")
        self.addCleanup(silent.stopListening)
        clock = Clock()
        fetcher = self.fetcher(port=port_number(silent), clock=clock)
        fetch = defer.ensureDeferred(fetcher.fetch("enforce.test"))
        await wait_until(lambda: accepted, "the policy server accepting the connection")
        clock.advance(9.9)
        self.assertFalse(fetch.called)
        clock.advance(0.1)
        error = await self.assertFailure(fetch, FetchFailed)
        self.assertEqual(str(error), "no answer within 10 s")
        await wait_until(lambda: not cast(Any, accepted[0].transport).connected, "the connection closed")


# -- enforcing: real SMTP sessions ---------------------------------------------------------------------------


class EnforcedSessionTests(TestCase):
    """An MX of an enforced policy, over real loopback SMTP sessions."""

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.reactor: Any = reactor
        self.mailbox = Mailbox()

    def mx(self, options: CertificateOptions | None, *, tls: bool = True) -> int:
        factory = smtp_server_factory(self.reactor, self.mailbox, hostname="mx.enforce.test", tls=tls, tls_context=options)
        listening = self.reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)

        def close_connections() -> None:
            for connection in list(factory.server.connections):
                cast(Any, connection.transport).abortConnection()

        self.addCleanup(close_connections)
        return port_number(listening)

    async def send(self, port: int) -> list[TransactionResult]:
        session = enforcing(send_session, "enforce.test")
        settings = enforced_settings(SMTPSettings(helo="mmgun.test", command_timeout=10, connect_timeout=10), test_ca().trust)
        transaction = Transaction(1, "me@mmgun.test", ("you@enforce.test",), b"Subject: hi\r\n\r\nhello\r\n")
        return await session(self.reactor, "mx.enforce.test", "127.0.0.1", port, [transaction], settings)

    async def test_certificate_for_the_mx_name_delivers(self) -> None:
        """issue 18 MTA-STS (section 4.2): STARTTLS with a certificate the trusted CA issued for the MX name: delivered."""
        results = await self.send(self.mx(test_ca().issue("mx.enforce.test")))
        self.assertTrue(results[0].started)
        self.assertEqual([r.reply.code for r in results[0].recipients.values()], [250])
        self.assertEqual([(m.recipients, m.tls) for m in self.mailbox], [(("you@enforce.test",), True)])

    async def failed(self, port: int) -> Reply:
        try:
            await self.send(port)
        except SessionFailed as e:
            return e.reply
        self.fail("the session succeeded")

    async def test_wrong_certificate_refused_with_an_mta_sts_reply(self) -> None:
        """
        issue 18 MTA-STS (section 4.2, the attack: a man in the middle with a certificate of
        its own): a certificate for another name, or self-signed, is refused; nothing is sent,
        and the reply says MTA-STS.
        """
        for options in (test_ca().issue("mx.attacker.test"), other_ca().issue("mx.enforce.test")):
            reply = await self.failed(self.mx(options))
            self.assertTrue(
                str(reply).startswith("421 4.7.5 MTA-STS policy of enforce.test requires TLS with a certificate valid for mx.enforce.test: 421 4.7.5 TLS with mx.enforce.test failed"),
                str(reply),
            )
        self.assertEqual(len(self.mailbox), 0)

    async def test_no_starttls_refused(self) -> None:
        """issue 18 MTA-STS (section 4.2, the attack: STARTTLS stripped from the EHLO reply): no clear-text fallback."""
        reply = await self.failed(self.mx(None, tls=False))
        self.assertIn("MTA-STS policy of enforce.test requires TLS", str(reply))
        self.assertIn("does not offer STARTTLS", str(reply))
        self.assertEqual(len(self.mailbox), 0)


# -- the sender ---------------------------------------------------------------------------------------------


class Sessions:
    """A scripted session function: records each session's host and TLS mode, answers 250 to all."""

    def __init__(self) -> None:
        self.sessions: list[tuple[str, TLSMode]] = []
        self.refuse: dict[str, Reply] = {}

    async def __call__(self, reactor: Any, host: str, address: str, port: int, transactions: Any, settings: SMTPSettings, on_result: Any = None, may_start: Any = None, on_dot_sent: Any = None) -> list[TransactionResult]:
        self.sessions.append((host, settings.tls))
        if host in self.refuse:
            raise SessionFailed(self.refuse[host])
        results = []
        for t in transactions:
            if on_dot_sent is not None:
                on_dot_sent(t)
            results.append(TransactionResult(t.key, True, dict.fromkeys(t.recipients, RecipientResult("sent", Reply(250, "2.0.0 Ok")))))
            if on_result is not None:
                on_result(results[-1])
        return results


class Hosts:
    """The inner router: fixed MX hosts per domain."""

    def __init__(self, routes: dict[str, list[MXHost]]) -> None:
        self.routes = routes

    async def hosts(self, domain: str) -> list[MXHost]:
        return self.routes[domain]

    def mark_bad(self, host: MXHost) -> None:
        pass

    def mark_good(self, host: MXHost) -> None:
        pass


class SenderTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.store, _ = sync_store(self)
        self.clock = Clock()
        self.clock.advance(T0)
        self.network = MemoryReactorClock()
        self.zone = ZoneResolver(
            {
                "_mta-sts.hung.test": [txt("v=STSv1; id=1;")],
                "mta-sts.hung.test": [dns.Record_A("127.0.0.1")],
                "_mta-sts.enforce.test": [txt("v=STSv1; id=1;")],
            }
        )
        self.fetcher = PolicyFetcher(self.network, self.clock, resolver=DNSHostResolver(self.zone), policy=ANY_ADDRESS)
        self.cache = PolicyCache(self.store, self.zone, self.fetcher, self.clock, self.clock.seconds)
        self.inner = Hosts(
            {
                "hung.test": [MXHost("mx.hung.test", "192.0.2.1", 25)],
                "fast.test": [MXHost("mx.fast.test", "192.0.2.2", 25)],
                "enforce.test": [MXHost("evil.attacker.test", "192.0.2.66", 25), MXHost("mx.enforce.test", "192.0.2.3", 25)],
            }
        )
        self.smtp = Sessions()
        settings = SenderSettings(poll_interval=1.0, lease_time=60.0)
        self.sender = Sender(
            self.store, MTASTSRouter(self.inner, self.cache), self.clock, SMTPSettings(helo="mmgun.test"), settings,
            session=self.smtp, rng=random.Random(1), owner="sender-1",
        )

    def submit(self, *recipients: str) -> str:
        sub = NewSubmission(uuid.uuid4().hex, "c1", "me@example.com", recipients, b"Subject: x\r\n\r\nhi\r\n", self.clock.seconds())
        return result(self, self.store.add_submission(sub))

    def statuses(self, submission_id: str) -> dict[str, tuple[str, str | None]]:
        state = result(self, self.store.submission("c1", submission_id))
        return {r.address: (r.status, r.last_reply) for r in state.recipients}

    def test_hung_policy_fetch_holds_back_only_its_domain(self) -> None:
        """
        issue 18 MTA-STS (the attack: a policy server that never answers): other domains'
        mail is delivered at once; the hung domain's goes out (without a policy) when the
        fetch times out, 10 s later.
        """
        hung = self.submit("x@hung.test")
        fast = self.submit("y@fast.test")
        self.successResultOf(self.sender.poll())
        self.clock.advance(0)
        self.assertEqual(self.statuses(fast), {"y@fast.test": ("sent", "250 2.0.0 Ok")})
        self.assertEqual(self.statuses(hung)["x@hung.test"][0], "queued")
        self.assertEqual(len(self.network.tcpClients), 1, "no connection attempt to the policy server")
        self.assertEqual(self.smtp.sessions, [("mx.fast.test", TLSMode.OPPORTUNISTIC)])
        # More mail to other domains meanwhile goes straight through.
        later = self.submit("z@fast.test")
        self.clock.advance(1)
        self.successResultOf(self.sender.poll())
        self.clock.advance(0)
        self.assertEqual(self.statuses(later)["z@fast.test"][0], "sent")
        self.assertEqual(self.statuses(hung)["x@hung.test"][0], "queued")
        self.clock.advance(9)
        self.clock.advance(0)
        self.assertEqual(self.statuses(hung), {"x@hung.test": ("sent", "250 2.0.0 Ok")})
        self.assertEqual(self.smtp.sessions[-1], ("mx.hung.test", TLSMode.OPPORTUNISTIC))

    def test_enforced_policy_verifies_tls_and_skips_unlisted_mx(self) -> None:
        """
        issue 18 MTA-STS (sections 4, 5): with an enforced policy (cached in the store) the
        MX not in the policy is never contacted, and the listed one only with a verified certificate.
        """
        result(self, self.store.save_mta_sts_policy(stored("enforce.test", fetched_at=T0)))
        sid = self.submit("a@enforce.test")
        self.successResultOf(self.sender.poll())
        self.clock.advance(0)
        self.assertEqual(self.statuses(sid), {"a@enforce.test": ("sent", "250 2.0.0 Ok")})
        self.assertEqual(self.smtp.sessions, [("mx.enforce.test", TLSMode.VERIFY)])

    def test_enforced_policy_failures_defer_saying_mta_sts(self) -> None:
        """issue 18 MTA-STS: no MX in the policy, or TLS verification failing on every allowed MX: deferred, with a reply naming MTA-STS."""
        result(self, self.store.save_mta_sts_policy(stored("enforce.test", mx=("mx.elsewhere.test",))))
        sid = self.submit("a@enforce.test")
        self.successResultOf(self.sender.poll())
        self.clock.advance(0)
        status, reply = self.statuses(sid)["a@enforce.test"]
        self.assertEqual(status, "deferred")
        assert reply is not None
        self.assertTrue(reply.startswith("451 4.7.5 MTA-STS policy of enforce.test: no MX host matches"), reply)
        self.assertEqual(self.smtp.sessions, [])

    def test_tls_failure_on_enforced_mx_defers_saying_mta_sts(self) -> None:
        """issue 18 MTA-STS: the allowed MX fails certificate verification: the recipient is deferred with the MTA-STS reply."""
        result(self, self.store.save_mta_sts_policy(stored("enforce.test")))
        self.smtp.refuse["mx.enforce.test"] = Reply(421, "4.7.5 TLS with mx.enforce.test failed: certificate verify failed")
        sid = self.submit("a@enforce.test")
        self.successResultOf(self.sender.poll())
        self.clock.advance(0)
        status, reply = self.statuses(sid)["a@enforce.test"]
        self.assertEqual(status, "deferred")
        self.assertIn("MTA-STS policy of enforce.test requires TLS with a certificate valid for mx.enforce.test", reply or "")


class CachedSessionTests(TestCase):
    """The sender's SMTP connection cache and enforced hosts, over real loopback sessions."""

    async def test_parked_unverified_session_never_serves_an_enforced_host(self) -> None:
        """
        issue 18 MTA-STS (the attack: the connection cache as a downgrade): a session to an MX
        opened for a domain without a policy (opportunistic, certificate unchecked) and
        parked in the cache is not reused for a domain whose enforced policy names the same
        MX: that delivery makes its own connection, verifies the certificate, and (the MX's
        certificate being self-signed) is deferred.
        """
        import time

        from twisted.internet import reactor

        mailbox = Mailbox()
        factory = smtp_server_factory(reactor, mailbox, hostname="mx.enforce.test")  # a self-signed certificate
        listening = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        port = port_number(listening)
        store, _ = sync_store(self)
        result(self, store.save_mta_sts_policy(stored("enforce.test", fetched_at=time.time())))
        zone = ZoneResolver({"_mta-sts.enforce.test": [txt("v=STSv1; id=1;")]})
        fetcher = ScriptedFetcher()  # never asked: the stored policy's id is the TXT record's
        cache = PolicyCache(store, zone, fetcher, reactor, time.time)
        same_mx = [MXHost("mx.enforce.test", "127.0.0.1", port)]
        router = MTASTSRouter(Hosts({"open.test": same_mx, "enforce.test": same_mx}), cache)
        settings = SenderSettings(poll_interval=0.05, lease_time=60.0, cache_time=30.0, shutdown_timeout=5.0)
        smtp = SMTPSettings(helo="mmgun.test", command_timeout=10, connect_timeout=10)
        sender = Sender(store, router, reactor, smtp, settings, owner="sender-1", mta_sts_trust_root=test_ca().trust, wall=time.time)
        sender.startService()
        self.addCleanup(sender.stopService)

        def submit(recipient: str) -> str:
            sub = NewSubmission(uuid.uuid4().hex, "c1", "me@example.com", (recipient,), b"Subject: x\r\n\r\nhi\r\n", time.time())
            return result(self, store.add_submission(sub))

        def status(submission_id: str) -> tuple[str, str | None]:
            state = result(self, store.submission("c1", submission_id))
            return state.recipients[0].status, state.recipients[0].last_reply

        first = submit("a@open.test")
        await wait_until(lambda: status(first)[0] == "sent", "delivery to open.test")
        self.assertEqual(len(factory.server.connections), 1, "the session was not parked")
        second = submit("b@enforce.test")
        await wait_until(lambda: status(second)[0] != "queued", "the attempt for enforce.test")
        state, reply = status(second)
        self.assertEqual(state, "deferred")
        self.assertIn("MTA-STS policy of enforce.test requires TLS with a certificate valid for mx.enforce.test", reply or "")
        self.assertEqual([m.recipients for m in mailbox], [("a@open.test",)])
        self.assertEqual(fetcher.fetched, [])


class WiringTests(SynchronousTestCase):
    def sender(self, *argv: str) -> Sender:
        from mmgun.config import Options
        from mmgun.service import make_sender

        options = Options({})
        options.parseOptions(list(argv))
        store, _ = sync_store(self)
        service = make_sender(options.config, store, MemoryReactorClock())
        return next(s for s in service if isinstance(s, Sender))

    def test_tls_mta_sts(self) -> None:
        """
        issue 18 MTA-STS (options): --tls mta-sts applies policies to MX delivery over
        opportunistic STARTTLS, trusting --mta-sts-ca when given; not with a relay host, nor by default.
        """
        ca = self.mktemp()
        with open(ca, "wb") as f:
            f.write(test_ca().pem)
        sender = self.sender("--tls", "mta-sts", "--mta-sts-ca", ca)
        self.assertIsInstance(sender._router, MTASTSRouter)
        self.assertEqual(sender._smtp.tls, TLSMode.OPPORTUNISTIC)
        self.assertIsNotNone(sender._mta_sts_trust_root)
        self.assertNotIsInstance(self.sender("--tls", "mta-sts", "--relay-host", "relay.test")._router, MTASTSRouter)
        self.assertNotIsInstance(self.sender()._router, MTASTSRouter)
        with self.assertRaises(ValueError):
            self.sender("--tls", "mta-sts", "--mta-sts-ca", self.mktemp())
