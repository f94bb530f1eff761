"""
issue 12, end to end: the whole relay in this process (frontend, store, sender) with an
in-process DNS server and an in-process SMTP server on 127.0.0.1, and two real clients:

- Mailgun's official Python SDK (``mailgun`` on PyPI), pointed at mmgun's base URL on a
  real loopback port, sends a message with text, HTML, two attachments, an inline image,
  cc, bcc and tags;
- ``POST /send`` sends a message with every feature of the JSON API at once.

Each test checks the message that reaches the SMTP server part by part, byte-exact, and
(issue 13) verifies its DKIM signatures — RSA and Ed25519, for the sending domain
example.com — with dkimpy, whose DNS lookups go to the in-process DNS server serving the
published TXT records. The SDK is synchronous: it runs in a thread (deferToThread), as do
the verifications; the tests poll with a deadline.
"""

from __future__ import annotations

import base64
import email
import json
import time
from email.message import Message
from email.policy import default
from typing import Any

import dkim as dkimpy
import dns.message as dns_message
import dns.query as dns_query
import dns.rdatatype as dns_rdatatype
import treq
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.names import dns
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool

from mmgun import dkim
from mmgun.auth import key_hash, new_key
from mmgun.config import Options
from mmgun.service import make_service
from mmgun.store import DomainKey
from mmgun.store.sqlite import SQLiteStore
from mmgun.testing.dnsserver import listen_dns
from mmgun.testing.ports import port_number
from mmgun.testing.smtpserver import Mailbox, Received, smtp_server_factory

from .helpers import CLIENT, http_url

DEADLINE = 30.0

ZONE: dict[str, Any] = {
    "to.example": [dns.Record_MX(10, b"mx.loop.example", ttl=60)],
    "cc.example": [dns.Record_MX(10, b"mx.loop.example", ttl=60)],
    "bcc.example": [dns.Record_MX(10, b"mx.loop.example", ttl=60)],
    "mx.loop.example": [dns.Record_A("127.0.0.1", ttl=60)],
}

PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 4 + b"\r\n.\r\n--=_mmgun_\r\n"
PDF = b"%PDF-1.7\n" + bytes((i * 37) % 256 for i in range(20_000)) + b"\n%%EOF\n"
CSV = "name,city\nZoë,Zürich\r\nBob,Berlin\n".encode()


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


def leaves(message: Message) -> list[Message]:
    return [part for part in message.walk() if not part.is_multipart()]


def text_of(part: Message) -> str:
    """A text part's content with its line breaks made LF (mmgun sends them CRLF, as MIME's canonical form)."""
    payload = part.get_payload(decode=True)
    assert isinstance(payload, bytes)
    return payload.decode(part.get_content_charset() or "ascii").replace("\r\n", "\n")


def domain_keys(domain: str, now: float) -> list[DomainKey]:
    """A new RSA and a new Ed25519 key for ``domain``, as ``mmgun domains add`` makes them."""
    keys: list[DomainKey] = []
    for algorithm in dkim.ALGORITHMS:
        private, public = dkim.generate_key(algorithm)
        selector = dkim.new_selector(now, [k.selector for k in keys])
        keys.append(DomainKey(domain, selector, algorithm, private, public, now, None))
    return keys


def published(keys: list[DomainKey]) -> dict[str, Any]:
    """The DKIM TXT records of ``keys``, as the zone of the DNS server serves them."""
    return {
        f"{key.selector}._domainkey.{key.domain}": [dns.Record_TXT(*(p.encode() for p in dkim.split_txt(dkim.expected_txt(key))), ttl=60)]
        for key in keys
    }


class RelayTestCase(TestCase):
    """The whole relay, a DNS server and an SMTP server, all on 127.0.0.1 in this process."""

    def setUp(self) -> None:
        reactor = _reactor()
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        # issue 13: example.com is acme's sending domain, with both kinds of key published.
        self.domain_keys = domain_keys("example.com", time.time())
        udp, tcp = listen_dns(reactor, {**ZONE, **published(self.domain_keys)})
        self.dns_port = port_number(udp)
        self.addCleanup(udp.stopListening)
        self.addCleanup(tcp.stopListening)
        self.mailbox = Mailbox()
        smtp = reactor.listenTCP(0, smtp_server_factory(reactor, self.mailbox, tls=False), interface="127.0.0.1")
        self.addCleanup(smtp.stopListening)
        database = self.mktemp()
        store = SQLiteStore.open_sync(database)
        self.successResultOf(Deferred.fromCoroutine(store.add_client("acme", time.time())))
        key_id, self.key = new_key()
        self.successResultOf(Deferred.fromCoroutine(store.add_key("acme", key_id, key_hash(self.key), time.time())))
        for domain in ("example.com", "other.example"):
            self.successResultOf(Deferred.fromCoroutine(store.add_domain(domain, "acme", time.time())))
        for key in self.domain_keys:
            self.successResultOf(Deferred.fromCoroutine(store.add_domain_key(key)))
        self.successResultOf(Deferred.fromCoroutine(store.close()))
        clients = self.mktemp()
        with open(clients, "w") as f:
            f.write(CLIENT + "\n")
        options = Options({})
        options.parseOptions([
            "--listen", "tcp:0:interface=127.0.0.1", "--database", database, "--clients", clients,
            "--role", "frontend", "--role", "sender",
            "--nameserver", f"127.0.0.1:{port_number(udp)}", "--smtp-port", str(port_number(smtp)),
            "--helo", "mmgun.test", "--poll-interval", "0.05", "--retry-min", "0.2s", "--retry-max", "0.4s",
            "--smtp-timeout", "10s", "--allow-private-mx",
        ])
        service = make_service(options.config, reactor)
        service.startService()
        self.addCleanup(service.stopService)
        self.url = http_url(service)

    @property
    def auth(self) -> dict[bytes | str, bytes | str]:
        return {"Authorization": "Basic " + base64.b64encode(f"api:{self.key}".encode()).decode()}

    def txt(self, name: bytes, timeout: int = 5) -> bytes | None:
        """dkimpy's DNS lookup, answered by the test's DNS server (dnspython, in the verifying thread)."""
        query = dns_message.make_query(name.decode("ascii"), dns_rdatatype.TXT)
        answer = dns_query.udp(query, "127.0.0.1", port=self.dns_port, timeout=timeout)
        for rrset in answer.answer:
            for record in rrset:
                return b"".join(record.strings)
        return None

    def verify(self, data: bytes) -> list[tuple[bytes, bytes]]:
        """In a thread: every DKIM signature of ``data`` checked by dkimpy; (algorithm, selector) of each, top first."""
        verifier = dkimpy.DKIM(data)
        signatures = [value for name, value in verifier.headers if name.lower() == b"dkim-signature"]
        checked = []
        for index in range(len(signatures)):
            self.assertTrue(verifier.verify(idx=index, dnsfunc=self.txt), f"signature {index} does not verify")
            checked.append((verifier.signature_fields[b"a"], verifier.signature_fields[b"s"]))
        return checked

    async def assert_signed(self, data: bytes) -> None:
        """issue 13: signed for example.com with its RSA key then its Ed25519 key, both verified by dkimpy."""
        self.assertTrue(data.startswith(b"DKIM-Signature:"), data[:200])
        checked = await deferToThread(self.verify, data)
        self.assertEqual(checked, [(k.algorithm.encode(), k.selector.encode()) for k in self.domain_keys])

    async def status(self, document: dict[str, str]) -> dict[str, Any]:
        response = await treq.post(self.url + "/status", data=json.dumps(document).encode(), headers=self.auth, pool=self.pool)
        self.assertEqual(response.code, 200)
        answer: dict[str, Any] = json.loads(await response.content())
        return answer

    async def delivered(self, document: dict[str, str], count: int) -> tuple[dict[str, Any], list[Received]]:
        """Polls /status until the submission is final (up to DEADLINE), then the ``count`` messages the SMTP server got."""
        deadline = _reactor().seconds() + DEADLINE
        while True:
            status = await self.status(document)
            if status["status"] not in ("queued", "scheduled"):
                break
            if _reactor().seconds() > deadline:
                self.fail(f"submission not final after {DEADLINE}s: {status}")
            await deferLater(_reactor(), 0.05, lambda: None)
        self.assertEqual(status["status"], "sent", status)
        received = await self.mailbox.wait_for(count).addTimeout(DEADLINE, _reactor())
        return status, received


class MailgunSDKTests(RelayTestCase):
    def send_with_sdk(self) -> Any:
        """In a thread: Mailgun's own client, as its README shows it, but for the base URL."""
        from mailgun.client import Client

        data = {
            "from": "Ada Lovelace <ada@example.com>",
            "to": ["Bob <bob@to.example>", "carol@to.example"],
            "cc": "Dave Düsentrieb <dave@cc.example>",
            "bcc": "eve@bcc.example",
            "subject": "Your report, Zoë",
            "text": "Hello Bob,\nthe report is attached.\n-- \nAda\n",
            "html": '<html><body><p>Hello <b>Bob</b></p><img src="cid:logo.png"></body></html>',
            "o:tag": ["reports", "monthly"],
            "v:customer": "42",
            "h:List-Unsubscribe": "<https://example.com/unsubscribe?u=42>",
            "h:List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
        }
        files = [
            ("attachment", ("report.pdf", PDF)),
            ("attachment", ("données.csv", CSV, "text/csv")),
            ("inline", ("logo.png", PNG)),
        ]
        with Client(auth=("api", self.key), api_url=self.url) as client:
            return client.messages.create(data=data, files=files, domain="example.com")

    async def test_sdk_message_arrives_part_by_part(self) -> None:
        """
        issue 12 (v3 API, Done when): Mailgun's official Python SDK sends text, HTML, two
        attachments, an inline image, cc, bcc and tags; every part reaches the SMTP server
        decoding to exactly the bytes sent, Cc in a header, Bcc in none, and the answered
        Message-ID finds tags and metadata in /status.
        """
        response = await deferToThread(self.send_with_sdk)
        self.assertEqual(response.status_code, 200, response.text)
        answer = response.json()
        self.assertEqual(answer["message"], "Queued. Thank you.")
        status, received = await self.delivered({"message_id": answer["id"]}, 2)
        self.assertEqual((status["tags"], status["metadata"]), (["reports", "monthly"], {"customer": "42"}))
        self.assertEqual(
            sorted(r for m in received for r in m.recipients),
            ["bob@to.example", "carol@to.example", "dave@cc.example", "eve@bcc.example"],
        )
        self.assertEqual({m.mail_from for m in received}, {"ada@example.com"})
        self.assertEqual(received[0].data, received[1].data)
        data = received[0].data
        await self.assert_signed(data)
        self.assertNotIn(b"eve@", data)
        self.assertNotIn(b"\nBcc", data)
        message = email.message_from_bytes(data, policy=default)
        self.assertEqual(message["Message-ID"], answer["id"])
        self.assertEqual(str(message["From"]), "Ada Lovelace <ada@example.com>")
        self.assertEqual(str(message["To"]), "Bob <bob@to.example>, carol@to.example")
        self.assertEqual(str(message["Cc"]), "Dave Düsentrieb <dave@cc.example>")
        self.assertEqual(message["Subject"], "Your report, Zoë")
        self.assertEqual(message["List-Unsubscribe"], "<https://example.com/unsubscribe?u=42>")
        self.assertEqual(message["List-Unsubscribe-Post"], "List-Unsubscribe=One-Click")
        self.assertEqual(message.get_content_type(), "multipart/mixed")
        parts = leaves(message)
        self.assertEqual(
            [(p.get_content_type(), p.get_filename(), p["Content-ID"]) for p in parts],
            [
                ("text/plain", None, None),
                ("text/html", None, None),
                ("image/png", "logo.png", "<logo.png>"),
                ("application/pdf", "report.pdf", None),
                ("text/csv", "données.csv", None),
            ],
        )
        self.assertEqual(text_of(parts[0]), "Hello Bob,\nthe report is attached.\n-- \nAda\n")
        self.assertEqual(text_of(parts[1]), '<html><body><p>Hello <b>Bob</b></p><img src="cid:logo.png"></body></html>\n')
        self.assertEqual(parts[2].get_payload(decode=True), PNG)
        self.assertEqual(parts[3].get_payload(decode=True), PDF)
        self.assertEqual(parts[4].get_payload(decode=True), CSV)
        # Every line 7-bit and at most 78 octets where a line may be broken.
        self.assertTrue(data.isascii())
        self.assertLessEqual(max(map(len, data.split(b"\r\n"))), 78)

    async def test_sdk_error_answers(self) -> None:
        """
        issue 12 (v3 API): the SDK gets Mailgun's {"message"} errors: 401 for a wrong key, 400 for
        a domain mismatch; issue 13: 404 for a domain that is not the client's.
        """
        from mailgun.client import Client

        def send(key: str, domain: str) -> Any:
            data = {"from": "ada@example.com", "to": "bob@to.example", "subject": "s", "text": "t"}
            with Client(auth=("api", key), api_url=self.url) as client:
                return client.messages.create(data=data, domain=domain)

        wrong = await deferToThread(send, new_key()[1], "example.com")
        self.assertEqual((wrong.status_code, wrong.json()), (401, {"message": "authentication failed"}))
        mismatch = await deferToThread(send, self.key, "other.example")
        self.assertEqual(mismatch.status_code, 400)
        self.assertIn("sending domain", mismatch.json()["message"])
        unknown = await deferToThread(send, self.key, "unknown.example")
        self.assertEqual((unknown.status_code, unknown.json()), (404, {"message": "Domain not found: unknown.example"}))
        self.assertEqual(self.mailbox.messages, [])


class EveryFeatureTests(RelayTestCase):
    async def test_json_send_with_every_feature_arrives_byte_exact(self) -> None:
        """
        issue 12 (Done when): POST /send with every feature at once — display names (non-ASCII
        too), cc, bcc, reply_to, text and HTML, two attachments (one with a non-ASCII name),
        an inline image, List-Unsubscribe headers, tags, metadata, send_at — arrives at the
        SMTP server with every part decoding to exactly what was sent.
        """
        text = "Grüße, Ada!\r\nA line of exactly seventy-six characters follows, then a long one:\n" + "x" * 200 + "\n.\nend"
        html = '<p>Grüße</p><img src="cid:logo@example.com">' + "<span>y</span>" * 30
        document = {
            "sender": "Ada Lovelace <ada@example.com>",
            "recipients": ["Bob <bob@to.example>", "Zoë Ünïcödé <zoe@to.example>"],
            "cc": ["Carol <carol@cc.example>"],
            "bcc": ["eve@bcc.example"],
            "reply_to": "Help Desk <help@example.com>",
            "subject": "Every feature — all at once",
            "body": text,
            "html": html,
            "attachments": [
                {"filename": "report.pdf", "content_type": "application/pdf", "content": base64.b64encode(PDF).decode()},
                {"filename": "données € 2026.csv", "content_type": "text/csv; charset=utf-8", "content": base64.b64encode(CSV).decode()},
            ],
            "inline": [{"filename": "logo.png", "content_type": "image/png", "content_id": "logo@example.com", "content": base64.b64encode(PNG).decode()}],
            "headers": {"List-Unsubscribe": "<https://example.com/u/42>, <mailto:unsub@example.com>", "List-Unsubscribe-Post": "List-Unsubscribe=One-Click"},
            "tags": ["receipt", "2026"],
            "metadata": {"order": 42, "nested": {"a": [1, 2]}},
            "send_at": time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime(time.time() + 1)),
        }
        response = await treq.post(self.url + "/send", data=json.dumps(document).encode(), headers=self.auth, pool=self.pool)
        answer = json.loads(await response.content())
        self.assertEqual(response.code, 200, answer)
        status, received = await self.delivered({"submission_id": answer["submission_id"]}, 3)
        self.assertEqual((status["tags"], status["metadata"]), (["receipt", "2026"], {"order": 42, "nested": {"a": [1, 2]}}))
        self.assertIsNotNone(status["send_at"])
        self.assertEqual(sorted(r for m in received for r in m.recipients), ["bob@to.example", "carol@cc.example", "eve@bcc.example", "zoe@to.example"])
        self.assertEqual(len({m.data for m in received}), 1)
        data = received[0].data
        await self.assert_signed(data)
        self.assertNotIn(b"eve@", data)
        self.assertTrue(data.isascii())
        self.assertLessEqual(max(map(len, data.split(b"\r\n"))), 78)
        message = email.message_from_bytes(data, policy=default)
        self.assertEqual(str(message["From"]), "Ada Lovelace <ada@example.com>")
        self.assertEqual(str(message["To"]), "Bob <bob@to.example>, Zoë Ünïcödé <zoe@to.example>")
        self.assertEqual(str(message["Cc"]), "Carol <carol@cc.example>")
        self.assertEqual(str(message["Reply-To"]), "Help Desk <help@example.com>")
        self.assertEqual(message["Subject"], "Every feature — all at once")
        self.assertEqual(message["List-Unsubscribe"], "<https://example.com/u/42>, <mailto:unsub@example.com>")
        self.assertEqual(message["List-Unsubscribe-Post"], "List-Unsubscribe=One-Click")
        # multipart/mixed ⊃ multipart/related ⊃ multipart/alternative.
        self.assertEqual(
            [p.get_content_type() for p in message.walk()],
            ["multipart/mixed", "multipart/related", "multipart/alternative", "text/plain", "text/html", "image/png", "application/pdf", "text/csv"],
        )
        plain, rich, logo, pdf, csv = leaves(message)
        self.assertEqual(text_of(plain), text.replace("\r\n", "\n") + "\n")
        self.assertEqual(text_of(rich), html + "\n")
        self.assertEqual((logo.get_payload(decode=True), logo["Content-ID"]), (PNG, "<logo@example.com>"))
        self.assertEqual((pdf.get_payload(decode=True), pdf.get_filename()), (PDF, "report.pdf"))
        self.assertEqual((csv.get_payload(decode=True), csv.get_filename(), csv.get_content_charset()), (CSV, "données € 2026.csv", "utf-8"))
