"""
SMTP submission (issue 16): Python's smtplib against a real listener on 127.0.0.1 port 0
(plain on loopback, STARTTLS, implicit TLS; AUTH PLAIN and LOGIN; several messages per
connection), the refusal codes, and a message relayed to the SMTP stub byte for byte.

smtplib blocks, so each client script runs in a thread while the reactor serves; the
store is a real SQLite file whose Deferreds fire at once (:func:`.helpers.sync_store`).
"""

from __future__ import annotations

import base64
import datetime
import os
import smtplib
import ssl
from collections.abc import Callable
from typing import Any, TypeVar, cast

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import endpoints, reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.threads import deferToThread
from twisted.names import dns
from twisted.trial.unittest import TestCase

from mmgun.auth import key_hash, new_key
from mmgun.clients import Clients
from mmgun.store.sqlite import SQLiteStore
from mmgun.submission import SubmissionServer, SubmissionSettings, tls_options
from mmgun.testing.dnsserver import listen_dns
from mmgun.testing.ports import port_number
from mmgun.testing.smtpserver import Mailbox, smtp_server_factory
from mmgun.web.app import Frontend

from .helpers import APIClient, sync_store, wait_until

T = TypeVar("T")

MESSAGE = (
    b"From: Ada <ada@example.com>\r\n"
    b"To: bob@another.example\r\n"
    b"Subject: hello\r\n"
    b"Date: Sat, 05 Dec 2026 17:32:15 +0000\r\n"
    b"Message-ID: <1@example.com>\r\n"
    b"\r\n"
    b"line 1\r\n"
    b".leading dot\r\n"
    b"caf\xc3\xa9 in 8 bits\r\n"
)


def write_self_signed(directory: str, hostname: str = "mmgun.test") -> tuple[str, str]:
    """A throwaway self-signed certificate and its key, as PEM files in ``directory``: (cert, key)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    os.makedirs(directory, exist_ok=True)
    cert_path, key_path = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return cert_path, key_path


def unverified() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


class SubmissionCase(TestCase):
    """A store with client ``acme`` and its key, the frontend's pipeline, and submission listeners on demand."""

    def setUp(self) -> None:
        self.store, self.path = sync_store(self)
        self.key_id, self.key = self.add_key("acme")
        self.settings = SubmissionSettings(hostname="mmgun.test")

    def add_key(self, client: str) -> tuple[str, str]:
        key_id, key = new_key()
        self.successResultOf(ensureDeferred(self.store.add_client(client, 1.0)))
        self.successResultOf(ensureDeferred(self.store.add_key(client, key_id, key_hash(key), 1.0)))
        return key_id, key

    def frontend(self, **fields: Any) -> Frontend:
        self.front = Frontend(self.store, lambda: Clients.from_ids([]), reactor, hostname="mmgun.test", **fields)
        return self.front

    def server(self, settings: SubmissionSettings | None = None, **fields: Any) -> SubmissionServer:
        front = self.frontend(**fields)
        self.smtp = SubmissionServer(front.pipeline, settings or self.settings, reactor)
        return self.smtp

    def listen(
        self, *, local: bool = True, tls: bool = False, implicit: bool = False, interface: str = "127.0.0.1", server: SubmissionServer | None = None
    ) -> int:
        """A listener of ``server`` (default: a new one) on ``interface`` port 0; its port."""
        smtp = server if server is not None else self.server()
        context = None
        if tls or implicit:
            self.cert, self.cert_key = write_self_signed(self.mktemp())
            context = tls_options(self.cert, self.cert_key)
        factory = smtp.factory(local=local, tls=None if implicit else context)
        if implicit:
            endpoint = endpoints.serverFromString(
                reactor, f"ssl:0:interface={interface}:privateKey={self.cert_key}:certKey={self.cert}"
            )
            port = self.successResultOf(endpoint.listen(factory))
        else:
            port = reactor.listenTCP(0, factory, interface=interface)
        self.addCleanup(self._close, port, smtp)
        return port_number(port)

    async def _close(self, port: Any, smtp: SubmissionServer) -> None:
        stopped = port.stopListening()
        if stopped is not None:
            await stopped
        for protocol in list(smtp.connections):
            cast(Any, protocol.transport).abortConnection()
        await wait_until(lambda: not smtp.connections, "submission connections to close", deadline=5)

    def client(self, script: Callable[[], T]) -> Deferred[T]:
        """``script`` (blocking socket work) in a thread, while the reactor serves."""
        return deferToThread(script)

    def transaction(self, port: int, sender: str, recipients: list[str], message: bytes, *, mail_options: tuple[str, ...] = ()) -> Deferred[list[tuple[int, bytes]]]:
        """Every reply of one authenticated transaction, stopping at the first refusal."""

        def script() -> list[tuple[int, bytes]]:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
                smtp.ehlo("client.test")
                smtp.login("api", self.key)
                replies = [smtp.mail(sender, list(mail_options))]
                for recipient in recipients:
                    if replies[0][0] == 250:
                        replies.append(smtp.rcpt(recipient))
                if all(code == 250 for code, _ in replies):
                    code, text = smtp.docmd("DATA")
                    replies.append((code, text))
                    if code == 354:
                        smtp.send(message.replace(b"\r\n.", b"\r\n..") + b".\r\n")
                        replies.append(smtp.getreply())
                return replies

        return self.client(script)

    def submissions(self) -> list[str]:
        """The ids of every stored submission, oldest first."""
        return [row[0] for row in self._read("SELECT id FROM submissions ORDER BY rowid")]

    def stored(self, submission_id: str) -> bytes:
        """The message stored for ``submission_id``."""
        ((message,),) = self._read("SELECT message FROM submissions WHERE id = ?", submission_id)
        return bytes(message)

    def _read(self, sql: str, *parameters: object) -> list[Any]:
        import sqlite3

        conn = sqlite3.connect(self.path)
        try:
            return conn.execute(sql, parameters).fetchall()
        finally:
            conn.close()


class SmtplibTests(SubmissionCase):
    async def test_plain_loopback_auth_plain_several_messages(self) -> None:
        """issue 16 item 1-2: AUTH PLAIN on a loopback listener, three messages over one connection, each queued after its commit."""
        port = self.listen()

        def script() -> list[tuple[int, bytes]]:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
                smtp.ehlo("client.test")
                assert smtp.has_extn("auth") and smtp.has_extn("pipelining") and smtp.has_extn("8bitmime")
                assert smtp.has_extn("enhancedstatuscodes") and smtp.esmtp_features["size"] == str(10 * 1024 * 1024)
                smtp.login("api", self.key)
                replies = []
                for n in range(3):
                    smtp.mail("ada@example.com", ["BODY=8BITMIME", f"SIZE={len(MESSAGE)}"])
                    smtp.rcpt(f"bob{n}@another.example")
                    smtp.rcpt("carol@third.example")
                    replies.append(smtp.data(MESSAGE))
                return replies

        replies = await self.client(script)
        self.assertEqual([code for code, _ in replies], [250, 250, 250])
        ids = [text.decode().removeprefix("2.0.0 queued as ") for _, text in replies]
        self.assertEqual(len(set(ids)), 3)
        api = APIClient(self, self.front)
        for n, submission_id in enumerate(ids):
            code, status = api.request("POST", "/status", {"submission_id": submission_id}, headers={"Authorization": ["Bearer " + self.key]})
            self.assertEqual(code, 200)
            self.assertEqual([r["address"] for r in status["recipients"]], [f"bob{n}@another.example", "carol@third.example"])
            stored = self.stored(submission_id)
            received, _, rest = stored.partition(b"\r\n\t")
            self.assertTrue(received.startswith(b"Received: from client.test ([127.0.0.1])"), stored[:200])
            self.assertTrue(stored.endswith(b"\r\n" + MESSAGE), stored)
            self.assertNotIn(b"bob", stored.split(b"From:")[0])  # no "for <recipient>": Bcc stays secret

    async def test_auth_login_with_the_clients_name(self) -> None:
        """issue 16 item 1: AUTH LOGIN, the user name being the client's own id."""
        port = self.listen()

        def script() -> tuple[int, bytes]:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
                smtp.ehlo("client.test")
                smtp.user, smtp.password = "acme", self.key
                code, text = smtp.auth("LOGIN", smtp.auth_login)
                assert code == 235, (code, text)
                return smtp.data(MESSAGE) if smtp.mail("ada@example.com")[0] == 250 and smtp.rcpt("x@y.example")[0] == 250 else (0, b"")

        code, text = await self.client(script)
        self.assertEqual(code, 250)
        self.assertTrue(text.startswith(b"2.0.0 queued as "))

    async def test_starttls_then_auth(self) -> None:
        """issue 16 item 1: on a public listener AUTH is offered only after STARTTLS; then PLAIN works."""
        port = self.listen(local=False, tls=True)

        def script() -> tuple[bool, bool, tuple[int, bytes]]:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
                smtp.ehlo("client.test")
                before = smtp.has_extn("auth")
                assert smtp.has_extn("starttls")
                smtp.starttls(context=unverified())
                smtp.ehlo("client.test")
                after = smtp.has_extn("auth") and not smtp.has_extn("starttls")
                smtp.login("api", self.key)
                smtp.mail("ada@example.com")
                smtp.rcpt("x@y.example")
                return before, after, smtp.data(MESSAGE)

        before, after, (code, _) = await self.client(script)
        self.assertEqual((before, after, code), (False, True, 250))
        (submission,) = self.submissions()
        self.assertIn(b"with ESMTPSA;", self.stored(submission))

    async def test_implicit_tls(self) -> None:
        """issue 16 item 1: an ssl: listener (RFC 8314 implicit TLS) offers AUTH at once, even when public."""
        port = self.listen(local=False, implicit=True)

        def script() -> tuple[int, bytes]:
            with smtplib.SMTP_SSL("127.0.0.1", port, timeout=10, context=unverified()) as smtp:
                smtp.ehlo("client.test")
                assert not smtp.has_extn("starttls")
                smtp.login("api", self.key)
                smtp.mail("ada@example.com")
                smtp.rcpt("x@y.example")
                return smtp.data(MESSAGE)

        code, _ = await self.client(script)
        self.assertEqual(code, 250)

    async def test_bad_and_revoked_keys_are_535(self) -> None:
        """issue 16 item 3: a wrong key, a revoked key, and a good key under another client's name: 535 5.7.8."""
        _, other = self.add_key("other")
        port = self.listen()
        self.successResultOf(ensureDeferred(self.store.revoke_key(self.key_id, 2.0)))

        def script() -> list[tuple[int, bytes]]:
            replies = []
            for user, password in (("api", self.key), ("api", "mmk_0123456789abcdef_" + "A" * 43), ("acme", other)):
                with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
                    smtp.ehlo("client.test")
                    smtp.user, smtp.password = user, password
                    try:
                        smtp.auth("PLAIN", smtp.auth_plain)
                        replies.append((235, b""))
                    except smtplib.SMTPAuthenticationError as e:
                        replies.append((e.smtp_code, cast(bytes, e.smtp_error)))
            return replies

        # The revoked key is refused once the 2 s key cache has passed: a fresh frontend has no cache.
        replies = await self.client(script)
        self.assertEqual(replies, [(535, b"5.7.8 authentication credentials invalid")] * 3)

    async def test_failed_auth_limit_per_source(self) -> None:
        """issue 16 item 1: after --max-auth-failures failures from one address, 454 4.7.0; a valid key still works (as HTTP)."""
        port = self.listen(server=self.server(max_auth_failures=2))

        def script() -> list[int]:
            codes = []
            for password in ("wrong1", "wrong2", "wrong3", self.key):
                with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
                    smtp.ehlo("client.test")
                    smtp.user, smtp.password = "api", password
                    try:
                        # One attempt each (login() would try LOGIN after a failed PLAIN).
                        codes.append(smtp.auth("PLAIN", smtp.auth_plain)[0])
                    except smtplib.SMTPAuthenticationError as e:
                        codes.append(e.smtp_code)
            return codes

        self.assertEqual(await self.client(script), [535, 535, 454, 235])


class RefusalTests(SubmissionCase):
    async def test_too_many_recipients(self) -> None:
        """issue 16 item 3: a recipient past --max-recipients is 452 4.5.3; the others stay accepted."""
        port = self.listen(server=self.server(SubmissionSettings(hostname="mmgun.test", max_recipients=2)))
        replies = await self.transaction(port, "ada@example.com", ["a@x.example", "b@x.example", "c@x.example"], MESSAGE)
        self.assertEqual([code for code, _ in replies], [250, 250, 250, 452])
        self.assertEqual(replies[-1][1][:5], b"4.5.3")

    async def test_declared_size_too_large(self) -> None:
        """issue 16 item 3: MAIL FROM SIZE= over --max-message-size is 552 5.3.4."""
        port = self.listen(server=self.server(SubmissionSettings(hostname="mmgun.test", max_message_size=1000)))
        replies = await self.transaction(port, "ada@example.com", ["a@x.example"], MESSAGE, mail_options=("SIZE=1001",))
        self.assertEqual(replies, [(552, b"5.3.4 message size exceeds the maximum of 1000 octets")])

    async def test_message_too_large(self) -> None:
        """issue 16 item 3: a message over --max-message-size (no SIZE given) is 552 5.3.4 after the dot; nothing queued."""
        port = self.listen(server=self.server(SubmissionSettings(hostname="mmgun.test", max_message_size=1000)))
        big = MESSAGE + b"x" * 900 + b"\r\n"
        replies = await self.transaction(port, "ada@example.com", ["a@x.example"], big)
        self.assertEqual(replies[-1][0], 552)
        self.assertEqual(replies[-1][1][:5], b"5.3.4")
        self.assertEqual(self.submissions(), [])

    async def test_sender_outside_the_clients_domains(self) -> None:
        """issue 16 item 3: under --sender-policy domains, a From outside the client's domains is 550 5.7.1; its own domain queues."""
        self.successResultOf(ensureDeferred(self.store.add_domain("mine.example", "acme", 1.0)))
        port = self.listen(server=self.server(sender_policy="domains"))
        refused = await self.transaction(port, "ada@example.com", ["a@x.example"], MESSAGE)
        self.assertEqual(refused[-1][0], 550)
        self.assertEqual(refused[-1][1][:5], b"5.7.1")
        # MAIL FROM in the client's domain does not excuse a From outside it.
        header = await self.transaction(port, "ada@mine.example", ["a@x.example"], MESSAGE)
        self.assertEqual(header[-1][0], 550)
        mine = MESSAGE.replace(b"ada@example.com", b"ada@mine.example")
        accepted = await self.transaction(port, "ada@mine.example", ["a@x.example"], mine)
        self.assertEqual(accepted[-1][0], 250)

    async def test_rate_limit(self) -> None:
        """issue 16 item 3: past the client's --rate-limit burst, 451 4.7.1."""
        port = self.listen(server=self.server(rate_limit=0.001, rate_burst=1))
        first = await self.transaction(port, "ada@example.com", ["a@x.example"], MESSAGE)
        second = await self.transaction(port, "ada@example.com", ["a@x.example"], MESSAGE)
        self.assertEqual(first[-1][0], 250)
        self.assertEqual(second[-1][0], 451)
        self.assertEqual(second[-1][1][:5], b"4.7.1")

    async def test_queue_cap(self) -> None:
        """issue 16 item 3: past the client's --max-queued recipients, 452 4.3.1."""
        from mmgun.limits import QueueCap

        cap = QueueCap(self.store, reactor, 2)
        port = self.listen(server=self.server(queue_cap=cap))
        first = await self.transaction(port, "ada@example.com", ["a@x.example", "b@x.example"], MESSAGE)
        second = await self.transaction(port, "ada@example.com", ["c@x.example"], MESSAGE)
        self.assertEqual(first[-1][0], 250)
        self.assertEqual(second[-1][0], 452)
        self.assertEqual(second[-1][1][:5], b"4.3.1")

    async def test_message_without_from_is_refused(self) -> None:
        """issue 16 item 2: the message is checked as messages.mime's (a From field is required): 550 5.6.0."""
        port = self.listen()
        replies = await self.transaction(port, "ada@example.com", ["a@x.example"], b"Subject: no author\r\n\r\nbody\r\n")
        self.assertEqual(replies[-1][0], 550)
        self.assertEqual(replies[-1][1][:5], b"5.6.0")


UTF8_MESSAGE = (
    "From: José <josé@example.com>\r\n"
    "To: 用户@例子.example\r\n"
    "Subject: héllo\r\n"
    "Date: Sat, 05 Dec 2026 17:32:15 +0000\r\n"
    "Message-ID: <2@example.com>\r\n"
    "\r\n"
    "café\r\n"
).encode()


class SmtpUtf8Tests(SubmissionCase):
    """
    issue 18 (SMTPUTF8): SMTPUTF8 (RFC 6531) is offered; with its MAIL parameter UTF-8 addresses and header
    fields are taken, without it they are refused (RFC 6531 3.3), saying why. (Issue 16 refused every way in.)
    """

    def session(self, port: int, *lines: bytes) -> Deferred[tuple[dict[str, str], list[tuple[int, bytes]]]]:
        """The EHLO extensions, then the reply to each raw line sent after AUTH."""

        def script() -> tuple[dict[str, str], list[tuple[int, bytes]]]:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
                smtp.ehlo("client.test")
                smtp.login("api", self.key)
                replies = []
                for line in lines:
                    smtp.send(line + b"\r\n")
                    replies.append(smtp.getreply())
                return dict(smtp.esmtp_features), replies

        return self.client(script)

    def envelope(self, submission_id: str) -> tuple[str, list[str]]:
        """The stored sender and recipients of a submission."""
        ((sender,),) = self._read("SELECT sender FROM submissions WHERE id = ?", submission_id)
        rows = self._read("SELECT address FROM recipients WHERE submission_id = ? ORDER BY envelope_id, position", submission_id)
        return sender, [row[0] for row in rows]

    async def test_utf8_message_queued_with_smtputf8(self) -> None:
        """
        issue 18 (SMTPUTF8): EHLO lists SMTPUTF8; smtplib's sendmail(..., mail_options=["SMTPUTF8"]) with a UTF-8
        sender, a UTF-8 recipient at an IDN domain and UTF-8 header fields is queued: the header bytes as sent,
        the recipient's domain as its A-label (what DNS is asked), its local part as given.
        """
        port = self.listen()

        def script() -> tuple[dict[str, str], dict[str, tuple[int, bytes]]]:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
                smtp.ehlo("client.test")
                smtp.login("api", self.key)
                refused = smtp.sendmail("josé@example.com", ["用户@例子.example", "bob@another.example"], UTF8_MESSAGE, mail_options=["SMTPUTF8"])
                return dict(smtp.esmtp_features), refused

        features, refused = await self.client(script)
        self.assertIn("smtputf8", features)
        self.assertEqual(refused, {})
        [submission] = self.submissions()
        self.assertEqual(self.envelope(submission), ("josé@example.com", ["用户@xn--fsqu00a.example", "bob@another.example"]))
        stored = self.stored(submission)
        self.assertTrue(stored.startswith(b"Received: "), stored[:40])
        self.assertTrue(stored.endswith(UTF8_MESSAGE), stored)

    async def test_utf8_addresses_without_smtputf8_refused(self) -> None:
        """issue 18 (SMTPUTF8): without the SMTPUTF8 parameter a UTF-8 sender or recipient is 553 5.6.7 (RFC 6531 3.3), saying so."""
        port = self.listen()
        _, replies = await self.session(
            port,
            "MAIL FROM:<josé@example.com>".encode(),
            b"MAIL FROM:<ada@example.com>",
            "RCPT TO:<用户@例子.广告>".encode(),
        )
        self.assertEqual([code for code, _ in replies], [553, 250, 553])
        for _, text in (replies[0], replies[2]):
            self.assertTrue(text.startswith(b"5.6.7 non-ASCII address without SMTPUTF8"), text)
            self.assertIn(b"SMTPUTF8 parameter on MAIL FROM (RFC 6531)", text)

    async def test_utf8_header_without_smtputf8_refused_and_not_stored(self) -> None:
        """issue 18 (SMTPUTF8): a raw UTF-8 Subject in a transaction without SMTPUTF8 is 550 5.6.7 at the final dot; nothing is stored."""
        port = self.listen()
        message = MESSAGE.replace(b"Subject: hello", "Subject: héllo".encode())
        replies = await self.transaction(port, "ada@example.com", ["bob@another.example"], message)
        self.assertEqual(replies[-1][0], 550)
        self.assertTrue(replies[-1][1].startswith(b"5.6.7 non-ASCII octets in a header field without SMTPUTF8"), replies[-1])
        self.assertEqual(self.submissions(), [])
        # The same message with SMTPUTF8 queues; so does MESSAGE's 8-bit body without it (8BITMIME).
        accepted = await self.transaction(port, "ada@example.com", ["bob@another.example"], message, mail_options=("SMTPUTF8",))
        self.assertEqual(accepted[-1][0], 250, accepted)
        accepted = await self.transaction(port, "ada@example.com", ["bob@another.example"], MESSAGE)
        self.assertEqual(accepted[-1][0], 250, accepted)
        self.assertEqual(len(self.submissions()), 2)

    async def test_smtputf8_still_checks_addresses_and_headers(self) -> None:
        """
        issue 18 (SMTPUTF8): SMTPUTF8 is no way around the checks: an address that is not UTF-8 or holds a
        bidirectional override is refused at MAIL/RCPT, a parameter value on SMTPUTF8 is 555, and a header
        line with invalid UTF-8 or a C1 control is 550 5.6.0 at the final dot; nothing is stored.
        """
        port = self.listen()
        _, replies = await self.session(
            port,
            b"MAIL FROM:<jos\xe9@example.com> SMTPUTF8",
            b"MAIL FROM:<ada@example.com> SMTPUTF8=yes",
            "MAIL FROM:<ad\u202ea@example.com> SMTPUTF8".encode(),
            b"MAIL FROM:<ada@example.com> SMTPUTF8",
            b"RCPT TO:<\xff\xfe@example.com>",
            "RCPT TO:<b\u0085b@example.com>".encode(),
        )
        self.assertEqual([code for code, _ in replies], [553, 555, 553, 250, 553, 553], replies)
        self.assertTrue(replies[0][1].startswith(b"5.6.7 the address is not valid UTF-8"), replies[0])
        self.assertTrue(replies[2][1].startswith(b"5.1.7 "), replies[2])
        for bad in (b"Subject: caf\xe9\r\n", "Subject: a\u0085b\r\n".encode(), "Subject: a\u2028b\r\n".encode()):
            message = MESSAGE.replace(b"Subject: hello\r\n", bad)
            refused = await self.transaction(port, "ada@example.com", ["bob@another.example"], message, mail_options=("SMTPUTF8",))
            self.assertEqual(refused[-1][0], 550, (bad, refused))
            self.assertTrue(refused[-1][1].startswith(b"5.6.0 the message: header line 3 is not UTF-8 text"), refused[-1])
        self.assertEqual(self.submissions(), [])


class MetricsTests(SubmissionCase):
    """issue 16 phase 2 item 4: refused submissions counted in mmgun_submissions_rejected_total, with HTTP's reasons."""

    def rejected(self) -> dict[str, float]:
        return {
            sample.labels["reason"]: sample.value
            for metric in self.front.pipeline.metrics.registry.collect()
            if metric.name == "mmgun_submissions_rejected"
            for sample in metric.samples
            if sample.name == "mmgun_submissions_rejected_total"
        }

    async def test_refusals_counted_by_reason(self) -> None:
        """issue 16 item 4: MAIL before AUTH, a bad key, SIZE too large, a bare LF, a message without From: one count each, labelled; a queued message none."""
        port = self.listen()

        def script() -> list[int]:
            codes = []
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
                smtp.ehlo("client.test")
                codes.append(smtp.mail("ada@example.com")[0])
                wrong = base64.b64encode(b"\0api\0mmk_0000000000000000_wrong").decode()
                codes.append(smtp.docmd("AUTH", "PLAIN " + wrong)[0])
                smtp.login("api", self.key)
                codes.append(smtp.mail("ada@example.com", [f"SIZE={10 * 1024 * 1024 + 1}"])[0])
                for data in (b"From: ada@example.com\r\n\r\nbare\nLF\r\n", b"Subject: no From\r\n\r\nx\r\n", MESSAGE):
                    smtp.mail("ada@example.com")
                    smtp.rcpt("bob@another.example")
                    smtp.putcmd("DATA")
                    smtp.getreply()
                    smtp.send(data + b".\r\n")
                    codes.append(smtp.getreply()[0])
            return codes

        self.assertEqual(await self.client(script), [530, 535, 552, 550, 550, 250])
        self.assertEqual(self.rejected(), {"unauthorized": 2.0, "too_large": 1.0, "invalid": 2.0})

    async def test_same_reason_as_http(self) -> None:
        """issue 16 item 4: a sender refused by --sender-policy domains counts as sender_refused over SMTP, as over HTTP's /send."""
        port = self.listen(server=self.server(sender_policy="domains"))
        replies = await self.transaction(port, "ada@example.com", ["bob@another.example"], MESSAGE)
        self.assertEqual(replies[-1][0], 550)
        self.assertEqual(self.rejected(), {"sender_refused": 1.0})
        api = APIClient(self, self.front)
        code, _ = api.request(
            "POST",
            "/send",
            {"sender": "ada@example.com", "recipients": ["bob@another.example"], "subject": "s", "body": "b"},
            headers={"Authorization": ["Bearer " + self.key]},
        )
        self.assertEqual(code, 403)
        self.assertEqual(self.rejected(), {"sender_refused": 2.0})


class AlignmentTests(SubmissionCase):
    """issue 16 phase 2 item 2: DKIM's d= is the From domain (DMARC alignment), whatever MAIL FROM says."""

    def setUp(self) -> None:
        from .test_signing_pipeline import keys_for

        super().setUp()
        self.add_key("other")
        for domain, client in (("example.com", "acme"), ("bounces.acme.example", "acme"), ("theirs.example", "other")):
            self.successResultOf(ensureDeferred(self.store.add_domain(domain, client, 1.0)))
            for key in keys_for(domain):
                self.successResultOf(ensureDeferred(self.store.add_domain_key(key)))

    async def queued(self, mail_from: str, message: bytes) -> bytes:
        port = self.listen()
        replies = await self.transaction(port, mail_from, ["bob@another.example"], message)
        self.assertEqual(replies[-1][0], 250, replies)
        return self.stored(replies[-1][1].decode().removeprefix("2.0.0 queued as "))

    async def test_signed_for_the_from_domain_not_mail_from(self) -> None:
        """issue 16 item 2: MAIL FROM an unregistered bounce domain, From the client's example.com: signed d=example.com, verified by dkimpy."""
        from .test_signing_pipeline import verify_all

        stored = await self.queued("bounce+1@unregistered.example", MESSAGE)
        self.assertEqual(verify_all(stored), [b"example.com", b"example.com"])  # its RSA and Ed25519 keys

    async def test_mail_from_domain_with_keys_does_not_sign(self) -> None:
        """issue 16 item 2: MAIL FROM the client's bounces.acme.example (with keys), From example.com: only d=example.com signs."""
        from .test_signing_pipeline import verify_all

        stored = await self.queued("bounce@bounces.acme.example", MESSAGE)
        self.assertEqual(verify_all(stored), [b"example.com", b"example.com"])
        self.assertNotIn(b"d=bounces.acme.example", stored)

    async def test_from_another_clients_domain_is_not_signed(self) -> None:
        """issue 16 item 2: From another client's domain (policy any): no signature, not even with MAIL FROM's own keys."""
        message = MESSAGE.replace(b"ada@example.com", b"ada@theirs.example")
        stored = await self.queued("bounce@bounces.acme.example", message)
        self.assertNotIn(b"DKIM-Signature", stored)


class RelayedTests(TestCase):
    async def test_relayed_byte_for_byte(self) -> None:
        """issue 16 item 2: what reaches the SMTP stub is the submitted message plus exactly a DKIM-Signature and a Received field."""
        from .test_signing_pipeline import keys_for, verify_all

        mailbox = Mailbox()
        stub = reactor.listenTCP(0, smtp_server_factory(reactor, mailbox, tls=False), interface="127.0.0.1")
        self.addCleanup(stub.stopListening)
        udp, tcp = listen_dns(cast(Any, reactor), {"another.example": [dns.Record_A("127.0.0.1", ttl=60)]})
        self.addCleanup(udp.stopListening)
        self.addCleanup(tcp.stopListening)
        database = self.mktemp()
        store = SQLiteStore.open_sync(database)
        key_id, key = new_key()
        for step in (
            store.add_client("acme", 1.0),
            store.add_key("acme", key_id, key_hash(key), 1.0),
            store.add_domain("example.com", "acme", 1.0),
            *(store.add_domain_key(k) for k in keys_for("example.com")[:1]),
        ):
            self.successResultOf(ensureDeferred(step))
        store._runner.close()
        port = self.start_mmgun(port_number(udp), port_number(stub), database)

        def script() -> tuple[int, bytes]:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
                smtp.ehlo("client.test")
                smtp.login("api", key)
                smtp.mail("ada@example.com", ["BODY=8BITMIME"])
                smtp.rcpt("bob@another.example")
                return smtp.data(MESSAGE)

        code, _ = await deferToThread(script)
        self.assertEqual(code, 250)
        await wait_until(lambda: len(mailbox.messages) == 1, "the message to reach the stub")
        (received,) = mailbox.messages
        self.assertEqual((received.mail_from, received.recipients), ("ada@example.com", ("bob@another.example",)))
        self.assertTrue(received.data.endswith(MESSAGE))
        added = received.data[: -len(MESSAGE)]
        fields = [f for f in added.split(b"\r\n") if f and f[:1] not in (b" ", b"\t")]
        self.assertEqual([f.partition(b":")[0] for f in fields], [b"DKIM-Signature", b"Received"])
        self.assertEqual(verify_all(received.data), [b"example.com"])

    def start_mmgun(self, dns_port: int, smtp_port: int, database: str) -> int:
        """mmgun (frontend and sender) as :func:`.helpers.start_mmgun` starts it, with SMTP submission on port 0: that port."""
        from mmgun.config import Options
        from mmgun.service import make_service
        from mmgun.submission import SubmissionService

        clients = self.mktemp()
        open(clients, "w").close()
        options = Options({})
        options.parseOptions([
            "--listen", "tcp:0:interface=127.0.0.1", "--database", database, "--clients", clients,
            "--role", "frontend", "--role", "sender", "--nameserver", f"127.0.0.1:{dns_port}",
            "--smtp-port", str(smtp_port), "--helo", "mmgun.test", "--poll-interval", "0.05",
            "--allow-private-mx", "--smtp-listen", "tcp:0:interface=127.0.0.1",
        ])  # fmt: skip
        service = make_service(options.config, reactor)
        service.startService()
        self.addCleanup(service.stopService)
        (submission,) = [s for s in service if isinstance(s, SubmissionService)]
        ports: list[Any] = []
        # Handing the port on: the listener's stopService finds it in the same Deferred.
        def keep(port: Any) -> Any:
            ports.append(port)
            return port

        submission.listeners[0]._waitingForPort.addCallback(keep)
        return port_number(ports[0])
