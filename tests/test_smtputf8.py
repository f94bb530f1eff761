"""
issue 18 (SMTPUTF8), the side before the SMTP client: addresses with UTF-8 local parts
(RFC 6531 3.3) accepted by /send and by Mailgun's v3 form API, each checked (UTF-8, no
control, format or separator characters, a local part of at most 64 octets, an IDNA-valid
domain kept as its A-labels); an internationalized message built with its addresses in
UTF-8 (RFC 6532), DKIM-signed by mmgun's signer and verified by dkimpy; which messages and
transactions need SMTPUTF8. Through StubTreq against the real root resource and a real
SQLite file. (SMTP submission's side is in tests/test_submission.py, SmtpUtf8Tests.)
"""

from __future__ import annotations

import base64
import email
import email.policy
import json
import uuid
from typing import Any
from urllib.parse import quote

import dkim as dkimpy
from twisted.trial.unittest import SynchronousTestCase

from mmgun import dkim
from mmgun.auth import key_hash, new_key
from mmgun.message import (
    BadRequest,
    SendRequest,
    build_message,
    header_needs_smtputf8,
    needs_smtputf8,
    normalize_address,
    parse_send,
    transaction_needs_smtputf8,
)
from mmgun.signer import InProcessSigner
from mmgun.smtp import Status, Transaction, message_size, wire_form
from mmgun.smtp.wire import Extensions, mail_command
from mmgun.store import DomainKey, NewSubmission

from .fakes import FakeMX, Harness
from .helpers import make_api, result

#: The frontend's wall clock (Date, DKIM t=): in the past, as dkimpy refuses a t= in the future.
NOW = 1_700_000_000.0

#: (given, normalized): the local part kept as given, the domain as its A-labels.
ACCEPTED = [
    ("josé@example.com", "josé@example.com"),
    ("用户@例子.example", "用户@xn--fsqu00a.example"),
    ("Δοκιμή.test@παράδειγμα.example", "Δοκιμή.test@xn--hxajbheg2az3al.example"),
    ("ada@例子.example", "ada@xn--fsqu00a.example"),  # ASCII local part: no SMTPUTF8 needed
    ("é" * 32 + "@example.com", "é" * 32 + "@example.com"),  # 64 octets exactly
]

#: (given, why it is refused).
REFUSED = [
    ("jo\x01sé@example.com", "a C0 control"),
    ("jo\x85sé@example.com", "a C1 control (NEL)"),
    ("jo\x7fsé@example.com", "DEL"),
    ("jos\u202eé@example.com", "a bidirectional override"),
    ("jos\u200bé@example.com", "a zero-width space (a format character)"),
    ("jos\u3000é@example.com", "an ideographic space"),
    ("jos\u2028é@example.com", "a line separator"),
    ("jos\udce9@example.com", "a lone surrogate (bad UTF-8 decoded with surrogateescape)"),
    ("jos\ue000@example.com", "a private-use character"),
    ("é" * 33 + "@example.com", "a local part of 66 octets (33 characters)"),
    ("用户..x@example.com", "an empty dot-atom part"),
    ('"用户"@example.com', "a quoted local part"),
    ("用户@☃.example", "a domain IDNA 2008 disallows"),
    ("用户@-例子.example", "a label starting with a hyphen"),
    ("用户@xn--zz.example", "an invalid A-label"),
    ("用户@例子", "a single-label domain"),
    ("用户@", "no domain"),
]


class AddressTests(SynchronousTestCase):
    def test_utf8_local_parts_accepted_domain_as_a_labels(self) -> None:
        """issue 18 (SMTPUTF8) item 1: UTF-8 local parts are accepted as given; the domain becomes its A-labels (what DNS and routing use)."""
        for given, normalized in ACCEPTED:
            self.assertEqual(normalize_address(given, "to"), normalized, given)
        self.assertEqual([needs_smtputf8(n) for _, n in ACCEPTED], [True, True, True, False, True])
        self.assertFalse(needs_smtputf8(normalize_address("Ada@Example.COM", "to")))

    def test_bad_utf8_addresses_refused_naming_the_field(self) -> None:
        """issue 18 (SMTPUTF8) item 1: controls, format characters, separators, an over-long local part (in octets), invalid IDNA are each a BadRequest naming the field."""
        for given, why in REFUSED:
            with self.assertRaises(BadRequest, msg=why) as caught:
                normalize_address(given, "recipients[0]")
            self.assertIn("field 'recipients[0]'", str(caught.exception), why)
        with self.assertRaises(BadRequest) as caught:
            normalize_address("é" * 33 + "@example.com", "to")
        self.assertIn("local part longer than 64 octets", str(caught.exception))

    def test_needs_smtputf8_for_addresses_and_headers(self) -> None:
        """issue 18 (SMTPUTF8) item 3: a transaction needs SMTPUTF8 for a UTF-8 reverse or forward path, or a UTF-8 header; never for an 8-bit body."""
        ascii_head = b"From: a@example.com\r\nSubject: =?utf-8?b?aMOpbGxv?=\r\n\r\ncaf\xc3\xa9\r\n"
        utf8_head = "From: josé@example.com\r\n\r\nbody\r\n".encode()
        self.assertFalse(header_needs_smtputf8(ascii_head))
        self.assertTrue(header_needs_smtputf8(utf8_head))
        self.assertTrue(header_needs_smtputf8("Subject: é".encode()))  # no empty line: all of it is header
        self.assertFalse(transaction_needs_smtputf8("a@example.com", ["b@xn--fsqu00a.example"], False))
        self.assertTrue(transaction_needs_smtputf8("josé@example.com", ["b@example.com"], False))
        self.assertTrue(transaction_needs_smtputf8("a@example.com", ["b@example.com", "用户@example.com"], False))
        self.assertTrue(transaction_needs_smtputf8("a@example.com", ["b@example.com"], True))


def utf8_request(**fields: Any) -> SendRequest:
    obj = {
        "sender": "José Núñez <josé@example.com>",
        "recipients": ["用户@例子.example", "bob@example.org"],
        "cc": ["Ünïcode Çc <çc@example.org>"],
        "bcc": ["秘密@example.org"],
        "reply_to": "répondre@example.com",
        "subject": "héllo",
        "body": "café\n",
        **fields,
    }
    return parse_send(obj, 50)


class BuildTests(SynchronousTestCase):
    def test_utf8_addresses_written_raw_in_utf8(self) -> None:
        """
        issue 18 (SMTPUTF8) item 2: an internationalized message has its addresses as raw UTF-8 in From, To, Cc and
        Reply-To (RFC 6532: an address has no encoded form); display names and Subject stay RFC 2047 words; no Bcc.
        The email package (policy SMTPUTF8) reads every address back.
        """
        request = utf8_request()
        self.assertTrue(request.smtputf8())
        self.assertEqual(request.recipients, ("用户@xn--fsqu00a.example", "bob@example.org", "çc@example.org", "秘密@example.org"))
        message = build_message(request, hostname="mmgun.test", now=NOW)
        head, _, body = message.partition(b"\r\n\r\n")
        self.assertIn("From: =?utf-8?b?Sm9zw6kgTsO6w7Fleg==?= <josé@example.com>\r\n".encode(), head)
        self.assertIn("To: 用户@xn--fsqu00a.example, bob@example.org\r\n".encode(), head)
        self.assertIn("Reply-To: répondre@example.com\r\n".encode(), head)
        self.assertIn(b"Subject: =?utf-8?b?aMOpbGxv?=\r\n", head)
        self.assertNotIn("秘密".encode(), message)
        self.assertTrue(body.isascii())  # quoted-printable as before
        parsed = email.message_from_string(message.decode("utf-8"), policy=email.policy.SMTPUTF8)
        self.assertEqual([a.addr_spec for a in parsed["From"].addresses], ["josé@example.com"])
        self.assertEqual([a.display_name for a in parsed["From"].addresses], ["José Núñez"])
        self.assertEqual([a.addr_spec for a in parsed["To"].addresses], ["用户@xn--fsqu00a.example", "bob@example.org"])
        self.assertEqual([a.addr_spec for a in parsed["Cc"].addresses], ["çc@example.org"])
        self.assertEqual(parsed.get_content(), "café\r\n")  # parsed from a str: its CRLF kept
        self.assertTrue(header_needs_smtputf8(message))

    def test_ascii_message_stays_7bit(self) -> None:
        """issue 18 (SMTPUTF8) item 2: ASCII addresses (an IDN domain too) with UTF-8 names and Subject: the header is 7-bit as before."""
        request = utf8_request(sender="José <jose@例子.example>", recipients=["bob@example.org"], cc=None, bcc=None, reply_to=None)
        self.assertFalse(request.smtputf8())
        message = build_message(request, hostname="mmgun.test", now=NOW)
        self.assertFalse(header_needs_smtputf8(message))
        self.assertTrue(message.isascii())

    def test_folding_counts_octets(self) -> None:
        """issue 18 (SMTPUTF8) item 2: a To of many UTF-8 addresses is folded between addresses, each line at most 78 octets (not characters)."""
        recipients = [f"收件人{n}@例子.example" for n in range(12)]
        message = build_message(utf8_request(recipients=recipients, cc=None), hostname="mmgun.test", now=NOW)
        head = message.partition(b"\r\n\r\n")[0]
        to = head[head.index(b"\r\nTo: ") + 2 :].split(b"\r\nReply-To:")[0]
        lines = to.split(b"\r\n")
        self.assertGreater(len(lines), 3)
        self.assertTrue(all(len(line) <= 78 for line in lines), [len(line) for line in lines])
        unfolded = b" ".join(line.strip() for line in lines).decode()
        self.assertEqual(unfolded, "To: " + ", ".join(normalize_address(r, "r") for r in recipients))


def urlencoded(fields: list[tuple[str, str]]) -> bytes:
    return "&".join(f"{quote(n, safe='')}={quote(v, safe='')}" for n, v in fields).encode("ascii")


class APITests(SynchronousTestCase):
    """acme owns example.com, with an RSA and an Ed25519 key: its mail is DKIM-signed before it is stored."""

    keys: list[DomainKey] = []

    def setUp(self) -> None:
        self.api, self.store, self.clock = make_api(self, signer=InProcessSigner(), wall=lambda: NOW)
        # twisted.web would parse form bodies itself; the frontend's Site leaves them to the API.
        self.api.treq._agent._serverFactory._parsePOSTFormSubmission = False
        result(self, self.store.add_client("acme", NOW))
        key_id, self.key = new_key()
        result(self, self.store.add_key("acme", key_id, key_hash(self.key), NOW))
        result(self, self.store.add_domain("example.com", "acme", NOW))
        if not APITests.keys:  # RSA generation is slow: once per run
            for n, algorithm in enumerate(dkim.ALGORITHMS):
                private, public = dkim.generate_key(algorithm)
                APITests.keys.append(DomainKey("example.com", f"s{n}", algorithm, private, public, NOW, None))
        for key in APITests.keys:
            result(self, self.store.add_domain_key(key))

    def send(self, **fields: Any) -> tuple[int, Any]:
        body = {"sender": "josé@example.com", "recipients": ["用户@例子.example"], "subject": "s", "body": "hello", **fields}
        return self.api.request("POST", "/send", body, headers={"Authorization": f"Bearer {self.key}"})

    def v3(self, body: bytes) -> tuple[int, Any]:
        headers = {
            "Content-Type": "application/x-www-form-urlencoded",
            "Authorization": "Basic " + base64.b64encode(f"api:{self.key}".encode()).decode(),
        }
        d = self.api.treq.request("POST", "http://mmgun.test/v3/example.com/messages", data=body, headers=headers)  # type: ignore[attr-defined]
        self.api.treq.flush()
        response = self.successResultOf(d)
        return response.code, json.loads(self.successResultOf(response.content()))

    def queued(self) -> list[tuple[str, tuple[str, ...], bytes]]:
        """(sender, recipients, message) of every envelope due."""
        return [(e.sender, tuple(e.recipients), e.message) for e in result(self, self.store.claim("test", self.clock.seconds() + 1, 60, 1000))]

    def verdicts(self, message: bytes) -> list[tuple[bool, bytes]]:
        """dkimpy's verdict on each DKIM signature, and its d= (DNS answered from the test keys)."""

        def txt(name: bytes, timeout: int = 5) -> bytes | None:
            for key in APITests.keys:
                if name.decode().rstrip(".") == f"{key.selector}._domainkey.{key.domain}":
                    return dkim.expected_txt(key).encode()
            return None

        verifier = dkimpy.DKIM(message)
        count = sum(1 for name, _ in verifier.headers if name.lower() == b"dkim-signature")
        return [(bool(verifier.verify(idx=index, dnsfunc=txt)), verifier.domain) for index in range(count)]

    def test_send_utf8_addresses_queued_and_signed(self) -> None:
        """
        issue 18 (SMTPUTF8) items 1-2: /send with UTF-8 addresses in sender, recipients, cc, bcc and reply_to is
        queued; the envelope keeps each local part as given with the domain's A-labels; the stored message has its
        addresses in UTF-8 and both DKIM signatures (RSA, Ed25519) of mmgun's signer verify with dkimpy.
        """
        code, answer = self.send(
            sender="José <josé@example.com>",
            recipients=["用户@例子.example"],
            cc=["çc@example.org"],
            bcc=["秘密@example.org"],
            reply_to="répondre@example.com",
            subject="héllo wörld",
            body="café\n",
        )
        self.assertEqual(code, 200, answer)
        envelopes = self.queued()
        self.assertEqual({(s, r) for s, r, _ in envelopes}, {
            ("josé@example.com", ("用户@xn--fsqu00a.example",)),
            ("josé@example.com", ("çc@example.org", "秘密@example.org")),
        })
        message = envelopes[0][2]
        self.assertTrue(message.startswith(b"DKIM-Signature: "), message[:40])
        self.assertTrue(header_needs_smtputf8(message))
        self.assertIn("From: =?utf-8?b?Sm9zw6k=?= <josé@example.com>\r\n".encode(), message)
        self.assertIn("To: 用户@xn--fsqu00a.example\r\n".encode(), message)
        self.assertEqual(self.verdicts(message), [(True, b"example.com"), (True, b"example.com")])
        # A byte changed in a UTF-8 address breaks both signatures: they cover the raw UTF-8.
        tampered = message.replace("josé@".encode(), "josè@".encode())
        self.assertEqual(self.verdicts(tampered), [(False, b"example.com"), (False, b"example.com")])

    def test_v3_form_utf8_addresses_queued(self) -> None:
        """issue 18 (SMTPUTF8) item 1: Mailgun's v3 form API takes UTF-8 addresses in from, to, cc and bcc."""
        body = urlencoded([
            ("from", "José <josé@example.com>"),
            ("to", "用户@例子.example, Bob <bob@example.org>"),
            ("cc", "çc@example.org"),
            ("bcc", "秘密@example.org"),
            ("subject", "héllo"),
            ("text", "café"),
        ])
        code, answer = self.v3(body)
        self.assertEqual(code, 200, answer)
        queued = self.queued()
        recipients = sorted(r for _, rs, _ in queued for r in rs)
        self.assertEqual(recipients, sorted(["用户@xn--fsqu00a.example", "bob@example.org", "çc@example.org", "秘密@example.org"]))
        self.assertEqual({sender for sender, _, _ in queued}, {"josé@example.com"})
        self.assertIn("To: 用户@xn--fsqu00a.example, Bob <bob@example.org>\r\n".encode(), queued[0][2])

    def test_bad_addresses_are_400_and_nothing_queued(self) -> None:
        """issue 18 (SMTPUTF8) item 1: invalid IDNA, a bidi override, a 65-octet local part, bad UTF-8 in JSON or a form: 400 JSON naming the problem, nothing queued."""
        for fields, expected in (
            ({"recipients": ["用户@☃.example"]}, "field 'recipients[0]' has an invalid domain"),
            ({"cc": ["jos\u202eé@example.com"]}, "field 'cc[0]' is not a valid email address"),
            ({"bcc": ["é" * 33 + "@example.org"]}, "field 'bcc[0]' has a local part longer than 64 octets"),
            ({"sender": "jos\x85é@example.com"}, "field 'sender' is not a valid email address"),
        ):
            code, answer = self.send(**fields)
            self.assertEqual(code, 400, (fields, answer))
            self.assertIn(expected, json.dumps(answer, ensure_ascii=False), fields)
        raw = b'{"sender": "jos\xe9@example.com", "recipients": ["a@example.org"], "subject": "s", "body": "b"}'
        code, answer = self.api.request("POST", "/send", raw=raw, headers={"Authorization": f"Bearer {self.key}"})
        self.assertEqual(code, 400)
        self.assertIn("not valid UTF-8", json.dumps(answer))
        code, answer = self.v3(b"from=a%40example.com&to=jos%E9%40example.org&subject=s&text=t")
        self.assertEqual(code, 400)
        self.assertIn("'to' is not valid UTF-8", json.dumps(answer))
        code, answer = self.v3(urlencoded([("from", "a@example.com"), ("to", "用户@-例子.example"), ("subject", "s"), ("text", "t")]))
        self.assertEqual(code, 400)
        self.assertIn("invalid domain", json.dumps(answer))
        self.assertEqual(self.queued(), [])


# -- delivery (phase 2): SMTPUTF8 and SIZE on MAIL FROM, and the refusals before anything is sent ------------

UTF8_MAIL = "From: José <josé@example.com>\r\nTo: 用户@a.example\r\nSubject: hi\r\n\r\ncafé\r\n".encode()
ASCII_MAIL = b"From: me@example.com\r\nTo: bob@a.example\r\nSubject: hi\r\n\r\nhello\r\n"
#: ASCII addresses, a raw UTF-8 header field (RFC 6532): still internationalized mail.
UTF8_HEADER_MAIL = "From: me@example.com\r\nTo: carol@a.example\r\nSubject: héllo\r\n\r\nhello\r\n".encode()


def ehlo(*extensions: str) -> bytes:
    lines = ["mx.example", *extensions]
    return b"".join(b"250-" + line.encode() + b"\r\n" for line in lines[:-1]) + b"250 " + lines[-1].encode()


class WireTests(SynchronousTestCase):
    def test_extensions_from_ehlo(self) -> None:
        """issue 18 (SMTPUTF8, SIZE): SMTPUTF8 and SIZE (with or without a limit) are read from the EHLO lines, case-insensitively."""
        self.assertEqual(Extensions.from_ehlo([b"smtputf8", b"Size 35882577", b"8BITMIME"]), Extensions(eight_bit_mime=True, smtputf8=True, size=35882577))
        self.assertEqual(Extensions.from_ehlo([b"SIZE"]).size, 0)
        self.assertEqual(Extensions.from_ehlo([b"SIZE 0"]).size, 0)
        self.assertEqual(Extensions.from_ehlo([b"SIZE lots"]).size, 0)
        self.assertEqual(Extensions.from_ehlo([b"PIPELINING"]), Extensions(pipelining=True))

    def test_size_counts_no_stuffing_dots(self) -> None:
        """issue 18 (SIZE): the declared size is the message's octets with CRLFs, not the dots added by dot-stuffing (RFC 1870)."""
        message = b"Subject: x\r\n\r\n.a\r\n..b\r\nc\r\n"
        self.assertEqual(message_size(wire_form(message)), len(message))
        self.assertEqual(message_size(wire_form(b".first\r\n")), len(b".first\r\n"))
        self.assertEqual(Transaction("k", "a@example.com", ["b@example.com"], message).size, len(message))

    def test_mail_command_parameters(self) -> None:
        """issue 18 (SMTPUTF8, SIZE): MAIL FROM in UTF-8 with SMTPUTF8 only when needed, SIZE= only when offered; ASCII mail as before."""
        utf8 = Transaction("k", "josé@example.com", ["b@example.com"], UTF8_MAIL)
        plain = Transaction("k", "a@example.com", ["b@example.com"], ASCII_MAIL)
        self.assertTrue(utf8.smtputf8 and utf8.eight_bit)
        self.assertFalse(plain.smtputf8)
        self.assertTrue(Transaction("k", "a@example.com", ["b@example.com"], UTF8_HEADER_MAIL).smtputf8)
        offered = Extensions(eight_bit_mime=True, smtputf8=True, size=0)
        self.assertEqual(mail_command(utf8, offered), "MAIL FROM:<josé@example.com> BODY=8BITMIME SMTPUTF8 SIZE=".encode() + str(len(UTF8_MAIL)).encode())
        self.assertEqual(mail_command(plain, Extensions()), b"MAIL FROM:<a@example.com>")


class DeliveryTests(SynchronousTestCase):
    """End to end through the sender and the SMTP client, on a memory network, to a scripted MX."""

    def setUp(self) -> None:
        self.h = Harness(self)
        self.servers: list[FakeMX] = []

    def mx(self, *extensions: str) -> None:
        def make() -> FakeMX:
            server = FakeMX({b"EHLO": ehlo(*extensions)})
            self.servers.append(server)
            return server

        self.h.net.servers["127.0.0.2"] = make

    def submit(self, sender: str, recipient: str, message: bytes) -> str:
        s = NewSubmission(uuid.uuid4().hex, "c1", sender, (recipient,), message, self.h.wall())
        return str(result(self, self.h.store.add_submission(s)))

    def deliver(self) -> None:
        self.h.sender()
        self.h.net.advance(5)

    def outcome(self, submission_id: str) -> tuple[str, str]:
        (recipient,) = self.h.state(submission_id).recipients
        return recipient.status, recipient.last_reply

    def commands(self) -> list[bytes]:
        return [line for server in self.servers for _, line in server.commands]

    def test_utf8_mail_sent_with_smtputf8_to_a_capable_mx(self) -> None:
        """
        issue 18 (SMTPUTF8): to an MX offering SMTPUTF8, internationalized mail goes out with MAIL FROM:<josé@…> SMTPUTF8
        (and BODY=8BITMIME, SIZE=) and RCPT TO:<用户@…> in raw UTF-8, the message byte for byte; ASCII mail in the same
        session carries no SMTPUTF8.
        """
        self.mx("8BITMIME", "SMTPUTF8", "SIZE 1000000")
        utf8 = self.submit("josé@example.com", "用户@a.example", UTF8_MAIL)
        plain = self.submit("me@example.com", "bob@a.example", ASCII_MAIL)
        self.deliver()
        self.assertEqual(self.outcome(utf8)[0], "sent")
        self.assertEqual(self.outcome(plain)[0], "sent")
        commands = self.commands()
        self.assertIn(f"MAIL FROM:<josé@example.com> BODY=8BITMIME SMTPUTF8 SIZE={len(UTF8_MAIL)}".encode(), commands)
        self.assertIn("RCPT TO:<用户@a.example>".encode(), commands)
        self.assertIn(f"MAIL FROM:<me@example.com> SIZE={len(ASCII_MAIL)}".encode(), commands)
        self.assertIn(UTF8_MAIL + b".\r\n", self.servers[0].payloads)
        self.assertEqual(len(self.servers), 1)

    def test_no_smtputf8_fails_permanently_nothing_sent(self) -> None:
        """
        issue 18 (SMTPUTF8): to an MX without SMTPUTF8, a UTF-8 address and a UTF-8 header each fail permanently at once
        (553 5.6.7 naming the address, RFC 6531 3.2), no MAIL written for them, no address mangled; the address is not put
        on the bounce list (the mailbox is not at fault); ASCII mail in the same session is delivered.
        """
        self.mx("8BITMIME", "PIPELINING")
        utf8 = self.submit("me@example.com", "用户@a.example", UTF8_MAIL)
        header = self.submit("me@example.com", "carol@a.example", UTF8_HEADER_MAIL)
        plain = self.submit("me@example.com", "bob@a.example", ASCII_MAIL)
        self.deliver()
        self.assertEqual(self.outcome(utf8), ("failed", "553 5.6.7 <用户@a.example>: the receiving MX mx.a.example does not support SMTPUTF8 (RFC 6531)"))
        self.assertEqual(self.outcome(header), ("failed", "553 5.6.7 a message with UTF-8 header fields: the receiving MX mx.a.example does not support SMTPUTF8 (RFC 6531)"))
        self.assertEqual(self.outcome(plain)[0], "sent")
        self.assertEqual([line for line in self.commands() if line.startswith((b"MAIL", b"RCPT"))], [b"MAIL FROM:<me@example.com>", b"RCPT TO:<bob@a.example>"])
        self.assertEqual(self.servers[0].payloads, [ASCII_MAIL + b".\r\n"])
        self.assertIsNone(result(self, self.h.store.suppression("c1", "bounce", "用户@a.example")))

    def test_message_over_the_mx_size_fails_before_sending(self) -> None:
        """
        issue 18 (SIZE): an MX advertising SIZE 200: a larger message fails permanently with 552 5.3.4 naming both sizes,
        nothing written for it; a smaller one in the same session goes with SIZE= its size.
        """
        self.mx("8BITMIME", "SIZE 200")
        big_message = ASCII_MAIL + b"x" * 300 + b"\r\n"
        big = self.submit("me@example.com", "big@a.example", big_message)
        small = self.submit("me@example.com", "bob@a.example", ASCII_MAIL)
        self.deliver()
        self.assertEqual(self.outcome(big), ("failed", f"552 5.3.4 message size {len(big_message)} exceeds the limit 200 of mx.a.example"))
        self.assertEqual(self.outcome(small)[0], "sent")
        self.assertEqual([line for line in self.commands() if line.startswith(b"MAIL")], [f"MAIL FROM:<me@example.com> SIZE={len(ASCII_MAIL)}".encode()])
        self.assertNotIn(b"RCPT TO:<big@a.example>", self.commands())

    def test_size_without_a_limit_never_refuses(self) -> None:
        """issue 18 (SIZE): SIZE without a number (no fixed limit, RFC 1870 4) refuses nothing; SIZE= is still declared."""
        self.mx("8BITMIME", "SIZE")
        big_message = ASCII_MAIL + b"x" * 300 + b"\r\n"
        big = self.submit("me@example.com", "big@a.example", big_message)
        self.deliver()
        self.assertEqual(self.outcome(big)[0], "sent")
        self.assertIn(f"MAIL FROM:<me@example.com> SIZE={len(big_message)}".encode(), self.commands())
        self.assertEqual(Status.SENT, "sent")
