"""
Tests for mmgun.dkim (issue 13, "Signing" and the key/record helpers of "Sending domains").

Every signature is checked by an independent verifier, dkimpy's ``dkim.DKIM.verify``, each
signature of a message by its index: RSA through dkimpy's own RSA code, Ed25519 through
PyNaCl. Its key lookup is answered with the TXT values that :func:`mmgun.dkim.dns_records`
prints (parsed back from the zone text), in memory, or by a real DNS server on loopback
(mmgun.testing.listen_dns) queried with dnspython. Messages are built by mmgun's own
builder from /send requests, and also cross mmgun's SMTP client (send_session, wired in
memory to mmgun's ESMTP server) before they are verified.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import dkim
import dns.resolver as dnspython_resolver
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from dkim.canonicalization import Relaxed
from hypothesis import HealthCheck, given, settings, strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.internet.threads import deferToThread
from twisted.names import dns as twisted_dns
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mmgun import dkim as mdkim
from mmgun.message import BadRequest, build_message, parse_send
from mmgun.smtp import SMTPSettings, Transaction, send_session, wire_form
from mmgun.testing import Mailbox, listen_dns, port_number, smtp_server_factory

NOW = 1_764_950_400.0  # 2025-12-05T16:00:00Z: dkimpy refuses a t= in the future
DOMAIN = "example.com"

PROPERTY = settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@attrs.frozen
class Key:
    """A stand-in for mmgun.store.DomainKey with the attributes mmgun.dkim reads."""

    domain: str
    selector: str
    algorithm: str
    private_key: bytes
    public_key: str
    retired_at: float | None = None


def make_key(algorithm: str, selector: str, domain: str = DOMAIN) -> Key:
    pem, p = mdkim.generate_key(algorithm)
    return Key(domain, selector, algorithm, pem, p)


RSA = make_key(mdkim.RSA_SHA256, "mmgun20251205-k3f9q2")
ED = make_key(mdkim.ED25519_SHA256, "mmgun20251205-p7x0m4")
KEYS = (ED, RSA)  # deliberately not RSA first: sign() orders them


def published(zone: str) -> dict[str, list[bytes]]:
    """The TXT records of zone-file text as dns_records writes it: owner name -> character-strings."""
    records: dict[str, list[bytes]] = {}
    owner: str | None = None
    for line in zone.splitlines():
        if line.startswith(";") or not line.strip():
            continue
        if not line.startswith(" "):
            fields = line.split()
            assert fields[1:3] == ["IN", "TXT"], line
            owner = fields[0].lower()
            records[owner] = []
        assert owner is not None
        records[owner] += [s.encode("ascii") for s in re.findall(r'"([^"]*)"', line)]
    return records


def txt_lookup(keys: Sequence[Key]) -> Callable[..., bytes | None]:
    """A dkimpy dnsfunc answering from the zone text of dns_records (strings concatenated, RFC 6376 3.6.2.2)."""
    records: dict[str, list[bytes]] = {}
    for domain in {key.domain for key in keys}:
        records.update(published(mdkim.dns_records(domain, [k for k in keys if k.domain == domain])))

    def lookup(name: bytes, timeout: float = 5) -> bytes | None:
        strings = records.get(name.decode("ascii").lower())
        return b"".join(strings) if strings is not None else None

    return lookup


def verify_each(message: bytes, keys: Sequence[Key] = KEYS, dnsfunc: Callable[..., Any] | None = None) -> list[bool]:
    """dkimpy's verdict on each DKIM-Signature of ``message``, topmost first."""
    dnsfunc = dnsfunc if dnsfunc is not None else txt_lookup(keys)
    count = sum(name.lower() == b"dkim-signature" for name, _ in dkim.DKIM(message).headers)
    verdicts = []
    for index in range(count):
        try:
            verdicts.append(bool(dkim.DKIM(message, minkey=2048).verify(idx=index, dnsfunc=dnsfunc)))
        except dkim.DKIMException:
            verdicts.append(False)
    return verdicts


def tags(message: bytes, index: int = 0) -> dict[bytes, bytes]:
    """The tags of the index-th DKIM-Signature, whitespace removed."""
    fields = [v for n, v in dkim.DKIM(message).headers if n.lower() == b"dkim-signature"]
    return {k: re.sub(rb"\s+", b"", v) for k, v in dkim.util.parse_tag_value(fields[index]).items()}


def unstuff(wire: bytes) -> bytes:
    """What a receiver stores from a DATA payload: dot-stuffing undone (RFC 5321 4.5.2)."""
    return b"".join(line[1:] if line.startswith(b".") else line for line in wire.splitlines(keepends=True))


def send(request: dict[str, Any], **kwargs: Any) -> bytes:
    """The message mmgun builds for a /send request."""
    return build_message(parse_send(request, 100), hostname="relay.test", now=NOW, **kwargs)


def request(**fields: Any) -> dict[str, Any]:
    return {"sender": "alice@example.com", "recipients": ["bob@example.org"], "subject": "hello", "body": "hi\n"} | fields


PNG = bytes(range(256)) * 20


# -- keys and records ---------------------------------------------------------------------------


class KeyTests(SynchronousTestCase):
    def test_rsa_key(self) -> None:
        """
        issue 13 "Keys": RSA 2048 by default; the private key is PKCS#8 PEM and p= is the
        DER SubjectPublicKeyInfo of the same key.
        """
        pem, p = mdkim.generate_key(mdkim.RSA_SHA256)
        self.assertTrue(pem.startswith(b"-----BEGIN PRIVATE KEY-----"))
        private = serialization.load_pem_private_key(pem, None)
        assert isinstance(private, rsa.RSAPrivateKey)
        self.assertEqual(private.key_size, 2048)
        public = serialization.load_der_public_key(base64.b64decode(p))
        self.assertEqual(public.public_numbers(), private.public_key().public_numbers())  # type: ignore[union-attr]

    def test_ed25519_key(self) -> None:
        """
        issue 13 "Keys": Ed25519 (RFC 8463): p= is the raw 32-octet public key.
        """
        pem, p = mdkim.generate_key(mdkim.ED25519_SHA256)
        private = serialization.load_pem_private_key(pem, None)
        assert isinstance(private, ed25519.Ed25519PrivateKey)
        raw = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.assertEqual(base64.b64decode(p), raw)
        self.assertEqual(len(raw), 32)

    def test_unknown_algorithm(self) -> None:
        """
        issue 13 "Keys": an algorithm other than rsa-sha256 and ed25519-sha256 is refused.
        """
        for algorithm in ("rsa-sha1", "rsa", "ED25519-SHA256", ""):
            self.assertRaises(ValueError, mdkim.generate_key, algorithm)

    def test_keys_differ(self) -> None:
        """
        issue 13 "Keys": each call makes a new key (a rotation gets a new key, not the old one).
        """
        self.assertNotEqual(mdkim.generate_key(mdkim.ED25519_SHA256)[1], mdkim.generate_key(mdkim.ED25519_SHA256)[1])

    def test_new_selector(self) -> None:
        """
        issue 13 review, "rotate": a new selector is ``mmgun<date>-<random>``, never one already
        taken (case-insensitively), and has RFC 6376 3.1 selector syntax.
        """
        self.assertRegex(mdkim.new_selector(NOW, []), r"\Ammgun20251205-[a-z0-9]{6}\Z")
        tokens = iter(["k3f9q2", "K3F9Q2", "a0b1c2"])
        self.assertEqual(mdkim.new_selector(NOW, ["MMGUN20251205-K3F9Q2"], lambda: next(tokens)), "mmgun20251205-a0b1c2")
        taken = [mdkim.new_selector(NOW, [])]
        for _ in range(100):
            taken.append(mdkim.new_selector(NOW, taken))
        self.assertEqual(len(set(taken)), 101)
        for selector in taken:
            self.assertRegex(selector, r"\A[a-z0-9](?:[a-z0-9-]*[a-z0-9])?\Z")
            self.assertLessEqual(len(selector), 63)

    def test_selector_not_reused_the_same_day(self) -> None:
        """
        issue 13 review: a domain added, removed (its selectors forgotten) and added again the
        same day, or signed by two deployments that do not know each other's selectors, gets a
        new selector — a reused one would be answered from DNS caches with the old key's p=.
        """
        first = mdkim.new_selector(NOW, [])
        again = {mdkim.new_selector(NOW, []) for _ in range(20)}
        self.assertNotIn(first, again)
        self.assertEqual(len(again), 20)

    def test_selectors_run_out(self) -> None:
        """
        issue 13 "rotate": when the random part only gives taken selectors, an error, not a duplicate.
        """
        self.assertRaises(ValueError, mdkim.new_selector, NOW, ["mmgun20251205-aaaaaa"], lambda: "aaaaaa")

    def test_expected_txt(self) -> None:
        """
        issue 13 "verify": the TXT value names the key type and carries p=.
        """
        self.assertEqual(mdkim.expected_txt(RSA), f"v=DKIM1; k=rsa; p={RSA.public_key}")
        self.assertEqual(mdkim.expected_txt(ED), f"v=DKIM1; k=ed25519; p={ED.public_key}")


class DNSRecordsTests(SynchronousTestCase):
    def test_dkim_records_split_into_255_octet_strings(self) -> None:
        """
        issue 13 "domains dns": each key's TXT record is at <selector>._domainkey.<domain>, in
        strings of at most 255 octets whose concatenation is the key's record.
        """
        zone = mdkim.dns_records(DOMAIN, [RSA, ED])
        records = published(zone)
        self.assertEqual(set(records), {f"{RSA.selector}._domainkey.example.com.", f"{ED.selector}._domainkey.example.com."})
        rsa_strings = records[f"{RSA.selector}._domainkey.example.com."]
        self.assertGreater(len(rsa_strings), 1, "an RSA 2048 record is longer than one string")
        self.assertTrue(all(len(s) <= 255 for s in rsa_strings))
        self.assertEqual(b"".join(rsa_strings).decode(), mdkim.expected_txt(RSA))
        self.assertEqual(records[f"{ED.selector}._domainkey.example.com."], [mdkim.expected_txt(ED).encode()])

    def test_split_txt(self) -> None:
        """
        issue 13 "domains dns": split_txt cuts at 255 octets exactly.
        """
        self.assertEqual(mdkim.split_txt("a" * 511), ["a" * 255, "a" * 255, "a"])
        self.assertEqual(mdkim.split_txt("a" * 255), ["a" * 255])

    def test_spf_and_dmarc_are_commented_suggestions(self) -> None:
        """
        issue 13 "domains dns": SPF and DMARC are suggestions, commented out so that pasting
        the output cannot replace a domain's existing SPF record or set a policy by accident.
        """
        zone = mdkim.dns_records(DOMAIN, [RSA], relay_host="relay.example.net")
        spf = [line for line in zone.splitlines() if "v=spf1" in line]
        dmarc = [line for line in zone.splitlines() if "v=DMARC1" in line]
        self.assertEqual(spf, ['; example.com. IN TXT "v=spf1 a:relay.example.net ~all"'])
        self.assertEqual(len(dmarc), 1)
        self.assertTrue(dmarc[0].startswith("; _dmarc.example.com. IN TXT"))
        self.assertIn("p=none", dmarc[0])
        self.assertIn("Suggestions", zone)

    def test_retired_key_not_published(self) -> None:
        """
        issue 13 "rotate": a retired key's record is no longer listed to publish.
        """
        old = attrs.evolve(RSA, retired_at=NOW)
        new = make_key(mdkim.RSA_SHA256, "mmgun20251206-r2d8e5")
        records = published(mdkim.dns_records(DOMAIN, [new, old]))
        self.assertEqual(list(records), [f"{new.selector}._domainkey.example.com."])

    def test_no_private_key_in_records(self) -> None:
        """
        issue 13 "Keys": private keys are never printed after creation: not in the records.
        """
        zone = mdkim.dns_records(DOMAIN, [RSA, ED])
        for key in (RSA, ED):
            body = b"".join(key.private_key.splitlines()[1:-1]).decode()
            self.assertNotIn(body[:40], zone)
            self.assertNotIn("PRIVATE", zone)


# -- canonicalization -------------------------------------------------------------------------


def dkimpy_header(name: bytes, value: bytes) -> bytes:
    ((n, v),) = Relaxed.canonicalize_headers([(name, value + b"\r\n")])
    return bytes(n + b":" + v)


def dkimpy_body(body: bytes) -> bytes:
    return bytes(Relaxed.canonicalize_body(body))


def receiver_body(body: bytes) -> bytes:
    """What a receiver has of ``body`` after mmgun sent it: lines CRLF, a CRLF at the end."""
    wire = re.sub(rb"\r\n|\r|\n", b"\r\n", body)
    return wire if not wire or wire.endswith(b"\r\n") else wire + b"\r\n"


# Header field text: printable ASCII (no colon in names), WSP runs, folds (CRLF + WSP).
# Not \v or \f: dkimpy's bytes.strip() removes them at the ends, RFC 6376 3.4.2 does not
# (neither may appear in a header field, RFC 5322 2.2).
header_names = st.text("ABCXYZabcxyz-_0123456789!#", min_size=1, max_size=10).map(str.encode)
header_values = st.lists(
    st.one_of(
        st.text("aZ09<>@.\",;()=é", min_size=1, max_size=5).map(lambda s: s.encode("utf-8")),
        st.sampled_from([b" ", b"\t", b"  ", b" \t ", b"\r\n ", b"\r\n\t", b"\r\n  \t"]),
    ),
    max_size=12,
).map(b"".join)
bodies = st.lists(
    st.sampled_from([b"a", b"Z", b".", b" ", b"\t", b"  ", b"\r\n", b"\n", b"\r", b"\xc3\xa9", b"\x00", b"=\r\n"]),
    max_size=40,
).map(b"".join)
# Header sections with any line breaks, folds, and no blank line or several.
raw_heads = st.lists(
    st.sampled_from([b"A: b", b"C:", b" d", b"\t", b"\r\n", b"\n", b"\r", b"x"]),
    max_size=12,
).map(b"".join)
# Bodies heavy in what chunking must get right: WSP runs, line breaks, empty lines at the end.
wsp_bodies = st.tuples(
    st.lists(
        st.sampled_from([b"a", b"b", b" ", b"\t", b"   ", b" \t ", b"\r\n", b"\n", b"\r", b"\r\n\r\n", b" \r\n"]),
        max_size=60,
    ).map(b"".join),
    st.lists(st.sampled_from([b"\r\n", b"\n", b" \r\n", b"\t\r\n", b"\r"]), max_size=8).map(b"".join),
).map(b"".join)


class CanonicalizationTests(SynchronousTestCase):
    def test_rfc6376_example(self) -> None:
        """
        issue 13 "Speed": our relaxed canonicalization gives RFC 6376 3.4.5's example.
        """
        self.assertEqual(mdkim.relaxed_header(b"A", b" X"), b"a:X\r\n")
        self.assertEqual(mdkim.relaxed_header(b"B ", b" Y\t\r\n\tZ  "), b"b:Y Z\r\n")
        self.assertEqual(mdkim.relaxed_body(b" C \r\nD \t E\r\n\r\n\r\n"), b" C\r\nD E\r\n")

    def test_empty_body(self) -> None:
        """
        issue 13 "Signing": an empty body, or one of empty lines only, canonicalizes to nothing
        (RFC 6376 3.4.4 and its erratum 3304), as dkimpy has it.
        """
        for body in (b"", b"\r\n", b"\r\n\r\n", b" \t\r\n"):
            self.assertEqual(mdkim.relaxed_body(body), b"")
            self.assertEqual(mdkim.relaxed_body(body), dkimpy_body(receiver_body(body)))

    def test_body_without_final_newline(self) -> None:
        """
        issue 13 "Signing": a body ending without CRLF gets one, as on the wire.
        """
        self.assertEqual(mdkim.relaxed_body(b"hello"), b"hello\r\n")
        self.assertEqual(mdkim.relaxed_body(b"hello  \r\nworld \t"), b"hello\r\nworld\r\n")

    @PROPERTY
    @given(header_names, header_values)
    def test_header_as_dkimpy(self, name: bytes, value: bytes) -> None:
        """
        issue 13 "Speed": our relaxed header canonicalization equals dkimpy's on random fields.
        """
        self.assertEqual(mdkim.relaxed_header(name, value), dkimpy_header(name, value))

    @PROPERTY
    @given(bodies)
    def test_body_as_dkimpy(self, body: bytes) -> None:
        """
        issue 13 "Speed": our relaxed body canonicalization equals dkimpy's on random bodies,
        as the receiver gets them (line breaks CRLF, a final CRLF).
        """
        self.assertEqual(mdkim.relaxed_body(body), dkimpy_body(receiver_body(body)))

    @PROPERTY
    @given(bodies.map(lambda b: receiver_body(b).replace(b"\r\n", b"\n").replace(b"\r", b"").replace(b"\n", b"\r\n")))
    def test_crlf_body_as_dkimpy_unchanged(self, body: bytes) -> None:
        """
        issue 13 "Speed": on a body already in wire form, ours equals dkimpy's without any help.
        """
        self.assertEqual(mdkim.relaxed_body(body), dkimpy_body(body))

    @PROPERTY
    @given(wsp_bodies, st.integers(min_value=1, max_value=9))
    def test_chunked_body_as_whole(self, body: bytes, chunk_size: int) -> None:
        """
        issue 13 "Speed": the body canonicalized and hashed in tiny pieces (1 to 9 octets, so
        pieces end inside WSP runs, between CR and LF, and among the empty lines at the end)
        gives dkimpy's canonical body and its SHA-256, as the body in one piece does.
        """
        expected = dkimpy_body(receiver_body(body))
        pieces = list(mdkim.relaxed_body_chunks(body, chunk_size))
        self.assertNotIn(b"", pieces)
        self.assertEqual(b"".join(pieces), expected)
        self.assertEqual(mdkim.relaxed_body(body, chunk_size), expected)
        self.assertEqual(mdkim.body_hash(body, chunk_size), hashlib.sha256(expected).digest())

    def test_large_body_hashed_in_bounded_pieces(self) -> None:
        """
        issue 13 "Speed": a 1 MB body of whitespace-heavy lines (and a run of empty lines) is
        fed to the hash in many pieces of bounded size, never all at once, so signing it in a
        thread lets the reactor thread run between pieces; the hash is the whole body's.
        """
        lines = (b"word \t  word\t\t \r\n   \r\n" * 40_000)[:1_000_000]
        body = lines + b"\r\n" * 100_000 + b"end  \n\n"
        updates: list[int] = []

        class Recording:
            def __init__(self) -> None:
                self.hasher = hashlib.sha256()

            def update(self, data: bytes) -> None:
                updates.append(len(data))
                self.hasher.update(data)

            def digest(self) -> bytes:
                return self.hasher.digest()

        digest = mdkim.body_hash(body, new=Recording)  # type: ignore[arg-type]
        self.assertEqual(digest, hashlib.sha256(dkimpy_body(receiver_body(body))).digest())
        self.assertGreaterEqual(len(updates), len(body) // mdkim.BODY_CHUNK)
        self.assertGreaterEqual(len(updates), 16)
        # A piece is canonicalized from at most BODY_CHUNK + 2 octets (its line breaks made CRLF).
        self.assertLessEqual(max(updates), 2 * (mdkim.BODY_CHUNK + 2) + 2)

    @PROPERTY
    @given(raw_heads, wsp_bodies)
    def test_split_as_wire_form(self, head: bytes, body: bytes) -> None:
        """
        issue 13 "Signing": the header fields and body that sign() takes from a raw message
        (any line breaks) are those of its wire form, without making the whole body CRLF first.
        """
        message = head + body
        wire = receiver_body(message)
        if wire.startswith(b"\r\n"):
            fields, wire_body = [], wire[2:]
        elif (end := wire.find(b"\r\n\r\n")) >= 0:
            fields, wire_body = re.split(rb"\r\n(?![ \t])", wire[:end]), wire[end + 4 :]
        else:
            fields, wire_body = (re.split(rb"\r\n(?![ \t])", wire[:-2]) if wire else []), b""
        got_fields, got_body = mdkim._split(message)
        self.assertEqual(got_fields, fields)
        self.assertEqual(mdkim.relaxed_body(got_body), mdkim.relaxed_body(wire_body))
        self.assertEqual(mdkim.relaxed_body(got_body), dkimpy_body(wire_body))



# -- the signing child's shortcuts ----------------------------------------------------------------


def straightforward_fields(message: bytes, keys: Sequence[Key], now: float, signatures: Sequence[bytes]) -> tuple[list[bytes], bytes]:
    """
    What prepare did before its shortcuts (no field templates, the body in chunks, each field
    through relaxed_header, every hash from scratch): the digest each key signs, and the fields
    with ``signatures`` (in the RSA-first order) after their b=.
    """
    fields, body = mdkim._split(message)
    present: dict[bytes, list[bytes]] = {}
    for field in fields:
        name, colon, value = field.partition(b":")
        if colon and name.rstrip(b" \t").lower() in mdkim.SIGNED_HEADERS:
            present.setdefault(name.rstrip(b" \t").lower(), []).append(mdkim.relaxed_header(name, value))
    names: list[bytes] = []
    signed: list[bytes] = []
    for name in mdkim.SIGNED_HEADERS:
        instances = present.get(name, [])
        names += [name] * (len(instances) + (name in mdkim.OVERSIGNED_HEADERS))
        signed += reversed(instances)
    hasher = hashlib.sha256()
    for piece in mdkim.relaxed_body_chunks(body, 7):
        hasher.update(piece)
    bh = base64.b64encode(hasher.digest()).decode("ascii")
    ordered = sorted(keys, key=lambda key: mdkim.ALGORITHMS.index(key.algorithm))
    digests, out = [], []
    for key, signature in zip(ordered, signatures, strict=True):
        lines = mdkim._signature_lines(key.algorithm, key.domain, key.selector, str(int(now)), names, bh)
        name, _, value = "\r\n".join(lines).encode("ascii").partition(b":")
        digests.append(hashlib.sha256(b"".join(signed) + mdkim.relaxed_header(name, value)[:-2]).digest())
        b = base64.b64encode(signature).decode("ascii")
        room = max(78 - len(lines[-1]), 0)
        filled = [*lines[:-1], lines[-1] + b[:room]] + [" " + b[i : i + 77] for i in range(room, len(b), 77)]
        out.append(("\r\n".join(filled) + "\r\n").encode("ascii"))
    return digests, b"".join(out)


# Header sections of signed fields (names in any case, WSP before the colon), unsigned ones,
# folds and WSP runs in values, then a body; CRLF (the child's usual case) or any line break.
signed_names = st.sampled_from(
    [b"From", b"from \t", b"TO", b"Cc", b"Subject", b"DATE", b"Message-ID", b"Reply-To", b"MIME-Version", b"Content-Type",
     b"Content-Transfer-Encoding", b"List-Unsubscribe", b"List-Unsubscribe-Post", b"X-Other", b"DKIM-Signature", b" From"]
)  # fmt: skip
field_values = st.lists(
    st.sampled_from([b"a", b"Z", b" ", b"\t", b"  ", b"\r\n ", b"\r\n\t", b"<x@y.z>", b"\xc3\xa9", b":", b"\x00"]), max_size=10
).map(b"".join)
messages = st.tuples(
    st.lists(st.tuples(signed_names, field_values).map(lambda f: f[0] + b":" + f[1]), max_size=14),
    st.sampled_from([b"\r\n", b"\n", b"\r"]),
    wsp_bodies,
).map(lambda m: m[1].join(m[0]) + m[1] + m[1] + m[2])
# Domains and selectors of many lengths (so fields fold at every place), some holding the
# characters field templates stand t= and bh= in with.
labels = st.text("abcxyz0189-.\x00\x01", min_size=1, max_size=70)
signing_keys = st.lists(
    st.tuples(labels, labels, st.sampled_from([RSA, ED])).map(lambda k: attrs.evolve(k[2], domain=k[0], selector=k[1])),
    min_size=1,
    max_size=3,
)
# Times whose t= has 1 to 11 digits.
times = st.one_of(st.floats(0, 99_999_999_999, allow_nan=False), st.sampled_from([0.0, 9.9, NOW, 99_999_999_999.0]))


class ShortcutTests(SynchronousTestCase):
    @PROPERTY
    @given(st.one_of(messages, raw_heads.map(lambda h: h + b"\r\n\r\n"), st.binary(max_size=200)), signing_keys, times, st.data())
    def test_prepare_as_straightforward(self, message: bytes, keys: list[Key], now: float, data: st.DataObject) -> None:
        """
        issue 13 "Speed" (the signing child's cost): prepare's shortcuts (each field made from
        a cached template for its key, h= list and t= length; the body canonicalized in one
        piece; the signed fields hashed once for every key) change no byte: the digests signed
        and the fields are those made the straightforward way, for any header section, domain,
        selector (even holding a template's stand-in characters) and time.
        """
        signatures = [data.draw(st.binary(min_size=1, max_size=300)) for _ in keys]
        unsigned = mdkim.prepare(message, keys, now)
        digests, fields = straightforward_fields(message, keys, now, signatures)
        self.assertEqual([request.digest for request in unsigned.requests], digests)
        self.assertEqual(unsigned.fields(signatures), fields)

    @PROPERTY
    @given(wsp_bodies)
    def test_whole_body_as_chunks(self, body: bytes) -> None:
        """
        issue 13 "Speed" (the signing child's cost): a body of at most BODY_CHUNK octets,
        canonicalized in one piece, is what the chunked canonicalization and dkimpy make of it.
        """
        expected = dkimpy_body(receiver_body(body))
        self.assertEqual(mdkim.relaxed_body(body), expected)
        self.assertEqual(b"".join(mdkim.relaxed_body_chunks(body, 3)), expected)
        self.assertEqual(mdkim.body_hash(body), hashlib.sha256(expected).digest())

    def test_template_not_used_when_a_stand_in_is_in_the_field(self) -> None:
        """
        issue 13 "Speed" (the signing child's cost): a selector holding the character that
        stands in for t= in templates gets no template, and its field is still exact.
        """
        key = attrs.evolve(RSA, selector="a\x00b")
        names = (b"from", b"from")
        self.assertIsNone(mdkim._template(key.algorithm, key.domain, key.selector, names, 10, 44))
        self.assertIsNotNone(mdkim._template(RSA.algorithm, RSA.domain, RSA.selector, names, 10, 44))
        message = send(request())
        signature = b"\x07" * 256
        self.assertEqual(mdkim.prepare(message, [key], NOW).fields([signature]), straightforward_fields(message, [key], NOW, [signature])[1])

# -- signing ------------------------------------------------------------------------------------


class SigningTests(SynchronousTestCase):
    def assertVerifies(self, message: bytes, count: int = 2) -> None:
        self.assertEqual(verify_each(message), [True] * count)
        # And as a receiver gets it from mmgun's SMTP client.
        self.assertEqual(verify_each(unstuff(wire_form(message))), [True] * count)

    def test_plain_text(self) -> None:
        """
        issue 13 "Signing": the seed's plain message gets an rsa-sha256 and an ed25519-sha256
        signature, RSA topmost, both verified by dkimpy.
        """
        signed = mdkim.sign(send(request()), KEYS, NOW)
        self.assertVerifies(signed)
        self.assertEqual(tags(signed, 0)[b"a"], b"rsa-sha256")
        self.assertEqual(tags(signed, 1)[b"a"], b"ed25519-sha256")

    def test_tags(self) -> None:
        """
        issue 13 "Signing" (and review): c=relaxed/relaxed, d= the domain, s= the selector, t= now,
        From, To, Cc, Subject and Reply-To oversigned, the listed fields present signed, bh= over
        the whole body (no l=); dkimpy verifies it.
        """
        message = send(
            request(
                cc=["carol@example.net"],
                reply_to="replies@example.com",
                headers={"List-Unsubscribe": "<https://example.com/u/1>", "List-Unsubscribe-Post": "List-Unsubscribe=One-Click"},
            )
        )
        signed = mdkim.sign(message, [RSA], NOW)
        t = tags(signed)
        self.assertEqual(t[b"v"], b"1")
        self.assertEqual(t[b"c"], b"relaxed/relaxed")
        self.assertEqual(t[b"d"], b"example.com")
        self.assertEqual(t[b"s"], RSA.selector.encode())
        self.assertEqual(t[b"t"], str(int(NOW)).encode())
        self.assertNotIn(b"l", t)
        self.assertEqual(
            sorted(t[b"h"].split(b":")),
            sorted(
                [b"from", b"from", b"to", b"to", b"cc", b"cc", b"subject", b"subject", b"date", b"message-id"]
                + [b"reply-to", b"reply-to", b"mime-version"]
                + [b"content-type", b"content-transfer-encoding", b"list-unsubscribe", b"list-unsubscribe-post"]
            ),
        )
        self.assertEqual(verify_each(signed, [RSA]), [True])

    def test_message_unchanged_below_signatures(self) -> None:
        """
        issue 13 "Signing": signing only prepends header fields.
        """
        message = send(request())
        signed = mdkim.sign(message, KEYS, NOW)
        self.assertTrue(signed.endswith(message))
        self.assertTrue(signed.startswith(b"DKIM-Signature: "))
        self.assertEqual(mdkim.sign(message, [], NOW), message)

    def test_lines_folded(self) -> None:
        """
        issue 13 "Signing": the signature fields keep mmgun's 78-octet lines, CRLF only,
        continuation lines starting with whitespace.
        """
        message = send(request())
        head = mdkim.sign(message, KEYS, NOW)[: -len(message)]
        self.assertNotIn(b"\n", head.replace(b"\r\n", b""))
        self.assertNotIn(b"\r", head.replace(b"\r\n", b""))
        lines = head.split(b"\r\n")[:-1]
        self.assertEqual([line for line in lines if len(line) > 78], [])
        self.assertEqual(sum(line.startswith(b"DKIM-Signature:") for line in lines), 2)
        self.assertTrue(all(line[:1] in b" \t" for line in lines if not line.startswith(b"DKIM-Signature:")))

    def test_seven_bit_body(self) -> None:
        """
        issue 13 "Signing": a 7bit text body, with trailing spaces and lines starting with a dot.
        """
        message = send(request(body="line one  \n.leading dot\n..two dots\n.\nend\n\n\n"))
        self.assertIn(b"Content-Transfer-Encoding: 7bit", message)
        self.assertVerifies(mdkim.sign(message, KEYS, NOW))

    def test_quoted_printable_body(self) -> None:
        """
        issue 13 "Signing": a quoted-printable body (non-ASCII text, a line longer than 78).
        """
        message = send(request(body="Grüße aus Köln — " + "x" * 200 + "\n.dot\n"))
        self.assertIn(b"Content-Transfer-Encoding: quoted-printable", message)
        self.assertVerifies(mdkim.sign(message, KEYS, NOW))

    def test_multipart_with_attachments(self) -> None:
        """
        issue 13 "Signing": multipart/mixed with text, HTML, an inline image and attachments.
        """
        message = send(
            request(
                html='<p>hi <img src="cid:logo"></p>',
                inline=[{"filename": "logo.png", "content_type": "image/png", "content": base64.b64encode(PNG).decode(), "content_id": "logo"}],
                attachments=[
                    {"filename": "data.bin", "content_type": "application/octet-stream", "content": base64.b64encode(PNG).decode()},
                    {"filename": "résumé.txt", "content_type": "text/plain", "content": base64.b64encode(b"text\n").decode()},
                ],
            )
        )
        self.assertIn(b"multipart/mixed", message)
        self.assertVerifies(mdkim.sign(message, KEYS, NOW))

    def test_non_ascii_subject_and_names(self) -> None:
        """
        issue 13 "Signing": RFC 2047 subjects and display names.
        """
        message = send(
            request(
                sender="Zoë Ångström <alice@example.com>",
                recipients=["Пётр Ильич <bob@example.org>", "山田太郎 <taro@example.jp>"],
                subject="Ünïcödé 主题 🎉",
            )
        )
        self.assertIn(b"=?utf-8?", message)
        self.assertVerifies(mdkim.sign(message, KEYS, NOW))

    def test_long_header_lines(self) -> None:
        """
        issue 13 "Signing": long (folded) Subject and To fields, and a long extra header.
        """
        message = send(
            request(
                subject="word " * 60,
                recipients=[f"recipient{i}@example.org" for i in range(40)],
                headers={"X-Long": "v" * 300, "List-Unsubscribe": "<mailto:u@example.com?subject=" + "x" * 100 + ">"},
            )
        )
        self.assertIn(b"\r\n ", message.split(b"\r\n\r\n")[0])
        self.assertVerifies(mdkim.sign(message, KEYS, NOW))

    def test_body_without_final_newline(self) -> None:
        """
        issue 13 "Signing": a raw message whose body ends without a newline verifies as it is
        and after the SMTP client added the CRLF.
        """
        message = b"From: alice@example.com\r\nTo: bob@example.org\r\nSubject: raw\r\n\r\nno newline at the end"
        self.assertVerifies(mdkim.sign(message, KEYS, NOW))

    def test_bare_line_feeds(self) -> None:
        """
        issue 13 "Signing": a raw message with bare LF line ends (made CRLF on the wire).
        """
        message = b"From: alice@example.com\nTo: bob@example.org\nSubject: lf\n folded\n\n.hello  \nworld\n"
        signed = mdkim.sign(message, KEYS, NOW)
        self.assertEqual(verify_each(unstuff(wire_form(signed))), [True, True])

    def test_empty_body(self) -> None:
        """
        issue 13 "Signing": a message without a body.
        """
        for message in (b"From: alice@example.com\r\nSubject: x\r\n\r\n", b"From: alice@example.com\r\nSubject: x\r\n"):
            self.assertVerifies(mdkim.sign(message, KEYS, NOW))

    def test_existing_signature_kept(self) -> None:
        """
        issue 13 "Signing": a raw message already signed for another domain is signed in
        addition: its signature is kept byte for byte and still verifies, and ours verify.
        """
        other = make_key(mdkim.RSA_SHA256, "s1", domain="other.example")
        message = b"From: alice@example.com\r\nTo: bob@example.org\r\nSubject: both\r\nDate: Fri, 05 Dec 2025 16:00:00 +0000\r\n\r\nbody\r\n"
        theirs = mdkim.sign(message, [other], NOW - 60)
        ours = mdkim.sign(theirs, KEYS, NOW)
        self.assertTrue(ours.endswith(theirs))
        self.assertEqual(verify_each(ours, [*KEYS, other]), [True, True, True])
        self.assertEqual([tags(ours, i)[b"d"] for i in range(3)], [b"example.com", b"example.com", b"other.example"])

    def test_added_from_breaks_signature(self) -> None:
        """
        issue 13 "Signing" (attack): From is oversigned, so a second From added above or
        below the signed one breaks both signatures.
        """
        signed = mdkim.sign(send(request()), KEYS, NOW)
        head, body = signed.split(b"\r\n\r\n", 1)
        self.assertEqual(verify_each(b"From: ceo@example.com\r\n" + signed), [False, False])
        self.assertEqual(verify_each(head + b"\r\nFrom: ceo@example.com\r\n\r\n" + body), [False, False])

    def test_added_reply_to_subject_to_cc_break_signature(self) -> None:
        """
        issue 13 review (attack): To, Cc, Subject and Reply-To are oversigned too (listed in h=
        once more than they occur, absent ones once), so a Reply-To or Cc added to a message that
        had none, or a second Subject or To, breaks both signatures — a relay on the way cannot
        redirect replies or change what the reader sees and keep the signature.
        """
        signed = mdkim.sign(send(request()), KEYS, NOW)
        self.assertNotIn(b"\r\nReply-To:", signed)
        self.assertEqual(verify_each(signed), [True, True])
        head, body = signed.split(b"\r\n\r\n", 1)
        for added in (
            b"Reply-To: thief@evil.example",
            b"Subject: urgent: wire the money",
            b"To: someone@evil.example",
            b"Cc: someone@evil.example",
        ):
            self.assertEqual(verify_each(head + b"\r\n" + added + b"\r\n\r\n" + body), [False, False], added)
            self.assertEqual(verify_each(added + b"\r\n" + signed), [False, False], added)

    def test_tampering_detected(self) -> None:
        """
        issue 13 "Signing" (attack): a changed Subject, a changed body and text appended to the
        body (no l=) each break the signatures, so the checks above can fail.
        """
        signed = mdkim.sign(send(request()), KEYS, NOW)
        self.assertEqual(verify_each(signed.replace(b"Subject: hello", b"Subject: HELLO")), [False, False])
        self.assertEqual(verify_each(signed.replace(b"\r\n\r\nhi\r\n", b"\r\n\r\nho\r\n")), [False, False])
        self.assertEqual(verify_each(signed + b"PS: appended\r\n"), [False, False])

    def test_whitespace_changes_survive(self) -> None:
        """
        issue 13 "Signing": relaxed/relaxed survives refolding and trailing spaces a relay may add.
        """
        signed = mdkim.sign(send(request(body="one two\n")), KEYS, NOW)
        changed = signed.replace(b"Subject: hello", b"Subject:   \r\n\thello  ").replace(b"one two\r\n", b"one \t two   \r\n\r\n")
        self.assertEqual(verify_each(changed), [True, True])

    def test_wrong_key_type(self) -> None:
        """
        issue 13 "Keys": a key whose private key is not of its algorithm is refused, not used.
        """
        self.assertRaises(ValueError, mdkim.sign, send(request()), [attrs.evolve(ED, algorithm=mdkim.RSA_SHA256)], NOW)
        self.assertRaises(ValueError, mdkim.sign, send(request()), [attrs.evolve(RSA, algorithm=mdkim.ED25519_SHA256)], NOW)

    @settings(PROPERTY, max_examples=40)
    @given(
        subject=st.text(st.characters(blacklist_categories=["Cs", "Cc"]), max_size=120),
        body=st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"), max_size=300),
        name=st.text("abc XYZ.éü漢", max_size=30),
    )
    def test_random_messages_verify(self, subject: str, body: str, name: str) -> None:
        """
        issue 13 "Signing": any message mmgun builds from /send verifies, as built and off the wire.
        """
        sender = f'"{name}" <alice@example.com>' if name.strip() else "alice@example.com"
        try:
            message = send(request(sender=sender, subject=subject, body=body))
        except BadRequest:
            return  # a request mmgun refuses (e.g. control characters) has nothing to sign
        self.assertVerifies(mdkim.sign(message, KEYS, NOW))

    @settings(PROPERTY, max_examples=60)
    @given(data=st.binary(max_size=3000))
    def test_sign_digest_as_signing_the_data(self, data: bytes) -> None:
        """
        issue 13 (speed, the signing process): sign_digest over the SHA-256 of the data is the very
        signature cryptography makes over the data itself (RSA PKCS#1 v1.5: deterministic), and
        Ed25519's is over the 32-octet digest (RFC 8463 3), as before the split.
        """
        digest = hashlib.sha256(data).digest()
        rsa_key, ed_key = (serialization.load_pem_private_key(k.private_key, None) for k in (RSA, ED))
        assert isinstance(rsa_key, rsa.RSAPrivateKey) and isinstance(ed_key, ed25519.Ed25519PrivateKey)
        self.assertEqual(
            mdkim.sign_digest(RSA.private_key, mdkim.RSA_SHA256, digest), rsa_key.sign(data, padding.PKCS1v15(), hashes.SHA256())
        )
        self.assertEqual(mdkim.sign_digest(ED.private_key, mdkim.ED25519_SHA256, digest), ed_key.sign(digest))
        self.assertRaises(ValueError, mdkim.sign_digest, ED.private_key, mdkim.RSA_SHA256, digest)
        self.assertRaises(ValueError, mdkim.sign_digest, RSA.private_key, mdkim.RSA_SHA256, digest[:31])

    @settings(PROPERTY, max_examples=40)
    @given(
        subject=st.text(st.characters(blacklist_categories=["Cs", "Cc"]), max_size=80),
        body=st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"), max_size=300),
        keys=st.sampled_from([KEYS, (RSA,), (ED,), (RSA, ED)]),
    )
    def test_prepare_and_finish_as_sign(self, subject: str, body: str, keys: Sequence[Key]) -> None:
        """
        issue 13 (speed, the signing process): prepare, then the requests signed apart (as the
        child does), then finish gives dkim.sign's bytes, RSA request first, each signature in
        its own field's b=; finish refuses a missing signature.
        """
        try:
            message = send(request(subject=subject, body=body))
        except BadRequest:
            return
        unsigned = mdkim.prepare(message, keys, NOW)
        self.assertEqual([r.algorithm for r in unsigned.requests], sorted((k.algorithm for k in keys), key=mdkim.ALGORITHMS.index))
        signatures = [mdkim.sign_digest(*r) for r in unsigned.requests]
        signed = unsigned.finish(signatures)
        self.assertEqual(signed, mdkim.sign(message, keys, NOW))
        self.assertEqual(verify_each(signed), [True] * len(keys))
        self.assertEqual([tags(signed, i)[b"b"] for i in range(len(keys))], [base64.b64encode(s) for s in signatures])
        self.assertRaises(ValueError, unsigned.finish, signatures[:-1])


# -- across mmgun's SMTP client -----------------------------------------------------------------


class SMTPClientTests(SynchronousTestCase):
    def test_signatures_survive_smtp(self) -> None:
        """
        issue 13 "Signing": every signed message that reaches the SMTP stub through mmgun's
        SMTP client (dot-stuffing, CRLF) verifies with dkimpy.
        """
        messages = [
            send(request()),
            send(request(body=".dot\n..two\n" + "é" * 50 + "\n" + "x" * 100)),
            send(request(html="<p>.x</p>", attachments=[{"filename": "a.bin", "content_type": "application/pdf", "content": base64.b64encode(PNG).decode()}])),
            send(request(sender="Zoë <alice@example.com>", subject="Ünïcödé " + "long " * 40)),
            b"From: alice@example.com\r\nTo: bob@example.org\r\nSubject: raw\r\n\r\n.no newline",
        ]
        signed = [mdkim.sign(message, KEYS, NOW) for message in messages]
        reactor = MemoryReactorClock()
        mailbox = Mailbox()
        factory = smtp_server_factory(reactor, mailbox, tls=False, timeout=None)
        transactions = [Transaction(i, "alice@example.com", ("bob@example.org",), message) for i, message in enumerate(signed)]
        done = Deferred.fromCoroutine(
            send_session(reactor, "mx.example.org", "127.0.0.2", 25, transactions, SMTPSettings(helo="relay.test"))
        )
        address, port, client_factory, _, _ = reactor.tcpClients[0]
        server = factory.buildProtocol(None)
        client = client_factory.buildProtocol(IPv4Address("TCP", address, port))
        here, there = IPv4Address("TCP", "198.51.100.7", 40000), IPv4Address("TCP", address, port)
        pump = iosim.connect(
            server,
            iosim.FakeTransport(server, isServer=True, hostAddress=there, peerAddress=here),
            client,
            iosim.FakeTransport(client, isServer=False, hostAddress=here, peerAddress=there),
            greet=False,
            clock=reactor,
        )
        pump.flush()
        results = self.successResultOf(done)
        self.assertEqual(len(results), len(signed))
        received = list(mailbox)
        self.assertEqual(len(received), len(signed))
        self.assertTrue(any(b"\r\n.." in r.raw for r in received), "some line was dot-stuffed on the wire")
        for item in received:
            self.assertEqual(verify_each(item.data), [True, True])


# -- through a real DNS server ------------------------------------------------------------------


class RealDNSTests(TestCase):
    """dkimpy's key lookup goes to mmgun's DNS stub on loopback, serving the records dns_records prints."""

    def setUp(self) -> None:
        from twisted.internet import reactor as global_reactor

        reactor: Any = global_reactor
        zone = mdkim.dns_records(DOMAIN, [RSA, ED])
        records = {
            name: [twisted_dns.Record_TXT(*strings, ttl=60)] for name, strings in published(zone).items()
        }
        self.queries: list[tuple[str, int, str]] = []
        udp, tcp = listen_dns(reactor, records, queries=self.queries)
        self.addCleanup(udp.stopListening)
        self.addCleanup(tcp.stopListening)
        self.port = port_number(udp)

    def dnsfunc(self, name: bytes, timeout: float = 5) -> bytes | None:
        """dkimpy's dnspython lookup, pointed at the stub (runs in a thread: the reactor serves the query)."""
        resolver = dnspython_resolver.Resolver(configure=False)
        resolver.nameservers = ["127.0.0.1"]
        resolver.port = self.port
        try:
            answer = resolver.resolve(name.decode("ascii"), "TXT", lifetime=timeout, raise_on_no_answer=False)
        except dnspython_resolver.NXDOMAIN:
            return None  # as dkimpy's own lookup answers it
        for rrset in answer.response.answer:
            for rdata in rrset:
                return b"".join(rdata.strings)
        return None

    async def test_verify_through_dns(self) -> None:
        """
        issue 13 "Signing": both signatures verify with dkimpy looking the keys up in DNS, at
        the names and with the multi-string TXT records that `mmgun domains dns` publishes.
        """
        signed = mdkim.sign(unstuff(wire_form(send(request(body=".x\n" + "é" * 100)))), KEYS, NOW)
        verdicts = await deferToThread(verify_each, unstuff(wire_form(signed)), KEYS, self.dnsfunc)
        self.assertEqual(verdicts, [True, True])
        self.assertEqual(
            sorted(name for name, _, _ in self.queries),
            sorted(f"{key.selector}._domainkey.example.com" for key in KEYS),
        )

    async def test_unpublished_key_fails(self) -> None:
        """
        issue 13 "verify" (attack): a signature by a key whose record is not published fails
        the same lookup, so the test above could fail.
        """
        stranger = make_key(mdkim.ED25519_SHA256, "unpublished")
        signed = mdkim.sign(send(request()), [stranger], NOW)
        self.assertEqual(await deferToThread(verify_each, signed, KEYS, self.dnsfunc), [False])
