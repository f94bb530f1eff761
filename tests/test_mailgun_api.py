"""
issue 12, Mailgun's v3 API on mmgun's port: every field, error and limit of
POST /v3/{domain}/messages and /messages.mime, batch sending, test mode, /status by the
answered Message-ID — through StubTreq against the real root resource (the Klein app
mounted under /v3/) and a real SQLite file; the messages read back from the queue.
"""

from __future__ import annotations

import base64
import email
import json
import os
import sys
import time
import tracemalloc
from collections.abc import Callable
from email.message import EmailMessage
from email.policy import default
from typing import Any
from urllib.parse import quote

from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from mmgun.auth import key_hash, new_key
from mmgun.message import MAX_PARTS, BadRequest, MessageTooLarge
from mmgun.metrics import Metrics
from mmgun.web.forms import MAX_FIELDS, Field, read_urlencoded
from mmgun.web.mailgun import Batch, check_mime, parse_messages

from .helpers import make_api, result

#: A field's value: text, bytes, or a file (filename, content[, content type]).
FieldValue = Any


def basic(key: str) -> dict[str, str]:
    """What Mailgun's clients send: HTTP Basic, user "api"."""
    return {"Authorization": "Basic " + base64.b64encode(f"api:{key}".encode()).decode()}


def form_data(fields: list[tuple[str, FieldValue]], boundary: str | None = None) -> tuple[bytes, str]:
    """A multipart/form-data body (RFC 7578) of ``fields``, and its Content-Type; a file without a type gets no Content-Type."""
    boundary = boundary or "----mmgun-test-" + os.urandom(8).hex()
    out = []
    for name, value in fields:
        head = f'Content-Disposition: form-data; name="{name}"'
        if isinstance(value, tuple):
            head += f'; filename="{value[0]}"'
            if len(value) > 2:
                head += f"\r\nContent-Type: {value[2]}"
            data = value[1]
        else:
            data = value.encode("utf-8") if isinstance(value, str) else value
        out.append(b"--" + boundary.encode() + b"\r\n" + head.encode("utf-8") + b"\r\n\r\n" + data + b"\r\n")
    body = b"".join(out) + b"--" + boundary.encode() + b"--\r\n"
    return body, f"multipart/form-data; boundary={boundary}"


def like_the_frontend(stub: StubTreq) -> StubTreq:
    """
    A StubTreq whose Site, like the frontend's (mmgun.web.site), leaves form bodies to the
    API: twisted.web's own parsing would answer a malformed multipart body before mmgun sees it.
    """
    stub._agent._serverFactory._parsePOSTFormSubmission = False
    return stub


def urlencoded(fields: list[tuple[str, str]]) -> bytes:
    return "&".join(f"{quote(n, safe='')}={quote(v, safe='')}" for n, v in fields).encode("ascii")


def form_fields(fields: list[tuple[str, FieldValue]]) -> list[Field]:
    """``fields`` as the form reader gives them to the API."""
    out = []
    for name, value in fields:
        if isinstance(value, tuple):
            out.append(Field(name, value[1], value[0], value[2] if len(value) > 2 else None))
        else:
            out.append(Field(name, value.encode("utf-8") if isinstance(value, str) else value))
    return out


def peak_memory(work: Callable[[], Any]) -> tuple[Any, int]:
    """``work()``'s result, and the most memory it held at once beyond what it started with (tracemalloc)."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        start = tracemalloc.get_traced_memory()[0]
        value = work()
        return value, tracemalloc.get_traced_memory()[1] - start
    finally:
        tracemalloc.stop()


def regex_calls(work: Callable[[], Any]) -> tuple[Any, int]:
    """``work()``'s result, and how many times it called a compiled regular expression's search, match or findall."""
    calls = 0
    names = {"search", "match", "fullmatch", "findall", "finditer", "sub", "subn"}

    def profile(frame: Any, event: str, arg: Any) -> None:
        nonlocal calls
        if event == "c_call" and getattr(arg, "__name__", "") in names and type(getattr(arg, "__self__", None)).__name__ == "Pattern":
            calls += 1

    sys.setprofile(profile)
    try:
        value = work()
    finally:
        sys.setprofile(None)
    return value, calls


PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) + b"\r\n--not-a-boundary\r\n"
PDF = b"%PDF-1.4\n" + os.urandom(3000)


class V3Tests(SynchronousTestCase):
    def setUp(self) -> None:
        self.api, self.store, self.clock = make_api(self, **self.options())
        like_the_frontend(self.api.treq)
        self.keys = {}
        for client in ("acme", "globex"):
            result(self, self.store.add_client(client, self.clock.seconds()))
            key_id, key = new_key()
            result(self, self.store.add_key(client, key_id, key_hash(key), self.clock.seconds()))
            self.keys[client] = key
        # issue 13: /v3/{domain} must be one of the client's sending domains.
        for domain, client in (("example.com", "acme"), ("xn--bcher-kva.example", "acme"), ("globex.example", "globex")):
            result(self, self.store.add_domain(domain, client, self.clock.seconds()))

    def options(self) -> dict[str, Any]:
        return {"max_message_size": 64 * 1024, "max_recipients": 50}

    def post(
        self,
        fields: list[tuple[str, FieldValue]] | None = None,
        *,
        path: str = "/v3/example.com/messages",
        raw: bytes | None = None,
        content_type: str | None = None,
        client: str | None = "acme",
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        body, ctype = form_data(fields or []) if raw is None else (raw, content_type or "")
        all_headers = {"Content-Type": content_type or ctype, **(basic(self.keys[client]) if client else {}), **(headers or {})}
        d = self.api.treq.request("POST", "http://mmgun.test" + path, data=body, headers=all_headers)  # type: ignore[attr-defined]
        self.api.treq.flush()
        response = self.successResultOf(d)
        content = self.successResultOf(response.content())
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/json"])
        return response.code, json.loads(content)

    def message(self, **extra: Any) -> list[tuple[str, FieldValue]]:
        fields: list[tuple[str, FieldValue]] = [
            ("from", "Ada Lovelace <ada@example.com>"),
            ("to", "bob@x.example"),
            ("subject", "Hello"),
            ("text", "Hello, Bob."),
        ]
        extra_fields = [(name.replace("__", ":").replace("_", "-"), value) for name, value in extra.items()]
        given = {name for name, _ in extra_fields}
        return [f for f in fields if f[0] not in given] + extra_fields

    def queued(self) -> list[Any]:
        """Every envelope due now, with its message."""
        return result(self, self.store.claim("test", self.clock.seconds(), 60, 1000))

    def refused(self, fields: list[tuple[str, FieldValue]] | None = None, code: int = 400, **kwargs: Any) -> str:
        """The request is refused with ``code`` and nothing is queued; its message."""
        got, answer = self.post(fields, **kwargs)
        self.assertEqual(got, code, answer)
        self.assertEqual(list(answer), ["message"])
        self.assertEqual(self.queued(), [])
        return str(answer["message"])

    def status(self, message_id: str, client: str = "acme") -> tuple[int, Any]:
        return self.api.request("POST", "/status", {"message_id": message_id}, headers=basic(self.keys[client]))


class MessagesTests(V3Tests):
    def test_every_field_arrives_in_the_message(self) -> None:
        """issue 12 (v3 API): from, to, cc, bcc (repeated, comma-separated, display names), subject, text, html, attachment, inline, h:, v:, o:tag."""
        fields = [
            ("from", '"Lovelace, Ada" <ada@EXAMPLE.com>'),
            ("to", "Bob <bob@x.example>, carol@y.example"),
            ("to", "dave@x.example"),
            ("cc", "Émile <emile@z.example>"),
            ("bcc", "secret@hidden.example, Other <other@hidden.example>"),
            ("subject", "Grüße"),
            ("text", "Hello\nworld"),
            ("html", '<p>Hello <img src="cid:logo.png"></p>'),
            ("attachment", ("report.pdf", PDF, "application/pdf")),
            ("attachment", ("notes.txt", b"plain\x00bytes\xff")),
            ("inline", ("logo.png", PNG)),
            ("h:List-Unsubscribe", "<mailto:unsub@example.com>"),
            ("h:Reply-To", "Help <help@example.com>"),
            ("v:order", "42"),
            ("v:user", '{"id": 7}'),
            ("o:tag", "welcome"),
            ("o:tag", "newsletter"),
        ]
        code, answer = self.post(fields)
        self.assertEqual(code, 200, answer)
        self.assertEqual(answer["message"], "Queued. Thank you.")
        self.assertRegex(answer["id"], r"^<[^<>@]+@mmgun\.test>$")
        envelopes = self.queued()
        self.assertEqual(
            sorted(r for e in envelopes for r in e.recipients),
            ["bob@x.example", "carol@y.example", "dave@x.example", "emile@z.example", "other@hidden.example", "secret@hidden.example"],
        )
        raw = envelopes[0].message
        self.assertNotIn(b"hidden.example", raw)  # Bcc: in no header
        parsed = email.message_from_bytes(raw, policy=default)
        self.assertEqual(parsed["Message-ID"], answer["id"])
        self.assertEqual(str(parsed["From"]), '"Lovelace, Ada" <ada@example.com>')
        self.assertEqual(str(parsed["To"]), "Bob <bob@x.example>, carol@y.example, dave@x.example")
        self.assertEqual(str(parsed["Cc"]), "Émile <emile@z.example>")
        self.assertEqual(str(parsed["Reply-To"]), "Help <help@example.com>")
        self.assertEqual(parsed["Subject"], "Grüße")
        self.assertEqual(parsed["List-Unsubscribe"], "<mailto:unsub@example.com>")
        parts = {part.get_content_type(): part for part in parsed.walk() if not part.is_multipart()}
        (text,) = [p for p in parsed.walk() if p.get_content_type() == "text/plain" and p.get_filename() is None]
        self.assertEqual(text.get_content().replace("\r\n", "\n"), "Hello\nworld\n")
        self.assertEqual(parts["application/pdf"].get_content(), PDF)
        self.assertEqual(parts["application/pdf"].get_filename(), "report.pdf")
        (notes,) = [p for p in parsed.walk() if p.get_filename() == "notes.txt"]
        self.assertEqual(notes.get_payload(decode=True), b"plain\x00bytes\xff")  # typed by its name: text/plain
        self.assertEqual(parts["image/png"].get_content(), PNG)
        self.assertEqual(parts["image/png"]["Content-ID"], "<logo.png>")
        status = self.status(answer["id"])[1]
        self.assertEqual((status["tags"], status["metadata"]), (["welcome", "newsletter"], {"order": "42", "user": '{"id": 7}'}))

    def test_urlencoded_form(self) -> None:
        """issue 12 (v3 API): application/x-www-form-urlencoded, repeated fields included."""
        body = urlencoded([("from", "ada@example.com"), ("to", "b@x.example"), ("to", "c@y.example"), ("subject", "Hi & bye"), ("html", "<b>100%</b>")])
        code, answer = self.post(raw=body, content_type="application/x-www-form-urlencoded")
        self.assertEqual(code, 200, answer)
        envelopes = self.queued()
        self.assertEqual(sorted(r for e in envelopes for r in e.recipients), ["b@x.example", "c@y.example"])
        parsed = email.message_from_bytes(envelopes[0].message, policy=default)
        self.assertEqual((parsed["Subject"], parsed.get_content_type()), ("Hi & bye", "text/html"))
        self.assertEqual(parsed.get_content().replace("\r\n", "\n"), "<b>100%</b>\n")

    def test_domain_must_be_the_senders(self) -> None:
        """issue 12 (v3 API): {domain} must be the from address's domain (case-insensitive, IDNA-normalized); 400 otherwise."""
        message = self.refused(self.message(), path="/v3/xn--bcher-kva.example/messages")
        self.assertEqual(message, "field 'from': the sender's domain (example.com) is not the sending domain of the URL (xn--bcher-kva.example)")
        fields = [("from", "ada@BÜCHER.example"), ("to", "b@x.example"), ("subject", "s"), ("text", "t")]
        self.assertEqual(self.post(fields, path="/v3/xn--bcher-kva.example/messages")[0], 200)
        self.assertEqual(self.post(fields, path="/v3/b%C3%BCcher.EXAMPLE/messages")[0], 200)
        self.assertEqual(len(self.queued()), 2)
        self.assertIn("not a valid domain name", self.refused(self.message(), path="/v3/not_a_domain/messages"))

    def test_authentication(self) -> None:
        """issue 12 (v3 API): HTTP Basic api:<key>; no key, a wrong key or a wrong user is 401 in Mailgun's shape."""
        self.assertEqual(self.refused(self.message(), 401, client=None), "authentication failed")
        wrong = {"Authorization": "Basic " + base64.b64encode(b"api:mmk_0123456789abcdef_" + b"x" * 43).decode()}
        self.refused(self.message(), 401, client=None, headers=wrong)
        user = {"Authorization": "Basic " + base64.b64encode(f"root:{self.keys['acme']}".encode()).decode()}
        self.refused(self.message(), 401, client=None, headers=user)

    def test_status_by_message_id_only_for_its_client(self) -> None:
        """issue 12: the answered Message-ID finds the submission in /status (with or without brackets); another client gets 404."""
        _, answer = self.post(self.message())
        code, status = self.status(answer["id"])
        self.assertEqual((code, status["status"], [r["address"] for r in status["recipients"]]), (200, "queued", ["bob@x.example"]))
        self.assertEqual(self.status(answer["id"][1:-1]), (200, status))
        self.assertEqual(self.status(answer["id"], client="globex"), (404, {"result": "error", "message": "no such submission"}))
        self.assertEqual(self.status("<nothing@mmgun.test>")[0], 404)
        code, both = self.api.request("POST", "/status", {"message_id": answer["id"], "submission_id": "0" * 32}, headers=basic(self.keys["acme"]))
        self.assertEqual(code, 400)

    def test_send_message_id_is_stored_too(self) -> None:
        """issue 12: a /send submission's Message-ID (in its message) finds it in /status too."""
        code, sent = self.api.request(
            "POST", "/send", {"sender": "a@example.com", "recipients": ["b@x.example"], "subject": "s", "body": "b"}, headers=basic(self.keys["acme"])
        )
        (envelope,) = self.queued()
        message_id = email.message_from_bytes(envelope.message, policy=default)["Message-ID"]
        self.assertEqual(self.status(message_id)[1]["recipients"][0]["address"], "b@x.example")

    def test_deliverytime_schedules(self) -> None:
        """issue 12 (v3 API): o:deliverytime (RFC 2822, as Mailgun's docs write it) is send_at: scheduled until then; more than 7 days is 400."""
        when = "Fri, 15 Jan 2027 09:00:00 +0000"  # the clock is at 08:00
        code, answer = self.post(self.message(o__deliverytime=when))
        self.assertEqual(code, 200)
        self.assertEqual(self.status(answer["id"])[1]["status"], "scheduled")
        self.assertEqual(self.queued(), [])
        self.clock.advance(3600)
        self.assertEqual(len(self.queued()), 1)
        self.assertEqual(self.refused(self.message(o__deliverytime="Fri, 29 Jan 2027 09:00:00 +0000")), "field 'o:deliverytime' is more than 7 days ahead")
        self.assertEqual(self.refused(self.message(o__deliverytime="tomorrow")), "field 'o:deliverytime' must be an ISO 8601 or RFC 5322 date")

    def test_testmode_is_recorded_never_delivered(self) -> None:
        """issue 12 (v3 API): o:testmode=yes answers as Mailgun does, queues nothing, and /status shows each recipient finished at once as a test."""
        code, answer = self.post(self.message(o__testmode="yes", cc="c@y.example"))
        self.assertEqual((code, answer["message"]), (200, "Queued. Thank you."))
        self.assertEqual(self.queued(), [])
        status = self.status(answer["id"])[1]
        self.assertEqual(status["status"], "sent")
        self.assertEqual(
            [(r["address"], r["status"], r["attempts"], r["last_reply"]) for r in status["recipients"]],
            [(a, "sent", 0, "not delivered: test mode (o:testmode)") for a in ("bob@x.example", "c@y.example")],
        )
        self.assertEqual(result(self, self.store.queued_bytes_by_client()), {})
        self.assertEqual(self.post(self.message(o__testmode="no"))[0], 200)
        self.assertEqual(len(self.queued()), 1)
        self.assertEqual(self.refused(self.message(o__testmode="maybe")), "field 'o:testmode' must be yes or no (or true or false)")

    def test_batch_sending_one_message_per_recipient(self) -> None:
        """issue 12 (v3 API): recipient-variables: each To address gets its own message addressed to it alone, %recipient.x% substituted; one Message-ID finds them all."""
        variables = {"bob@x.example": {"name": "Bob", "n": 1}, "carol@Y.example": {"name": "Carol"}}
        fields = [
            ("from", "ada@example.com"),
            ("to", "Bob <bob@x.example>, carol@y.example"),
            ("to", "dave@z.example"),
            ("subject", "Hi %recipient.name%"),
            ("text", "Dear %recipient.name%, #%recipient.n%."),
            ("html", "<p>%recipient.name%</p>"),
            ("recipient-variables", json.dumps(variables)),
            ("o:tag", "batch"),
        ]
        code, answer = self.post(fields)
        self.assertEqual(code, 200, answer)
        messages = {e.recipients: email.message_from_bytes(e.message, policy=default) for e in self.queued()}
        self.assertEqual(sorted(messages), [("bob@x.example",), ("carol@y.example",), ("dave@z.example",)])
        seen = {}
        for (address,), parsed in messages.items():
            text = next(p for p in parsed.walk() if p.get_content_type() == "text/plain").get_content().replace("\r\n", "\n")
            html = next(p for p in parsed.walk() if p.get_content_type() == "text/html").get_content().replace("\r\n", "\n")
            seen[address] = (str(parsed["To"]), parsed["Subject"], text, html, parsed["Message-ID"])
        self.assertEqual(seen, {
            "bob@x.example": ("Bob <bob@x.example>", "Hi Bob", "Dear Bob, #1.\n", "<p>Bob</p>\n", answer["id"]),
            "carol@y.example": ("carol@y.example", "Hi Carol", "Dear Carol, #.\n", "<p>Carol</p>\n", answer["id"]),
            "dave@z.example": ("dave@z.example", "Hi ", "Dear , #.\n", "<p></p>\n", answer["id"]),
        })
        status = self.status(answer["id"])[1]
        self.assertEqual([r["address"] for r in status["recipients"]], ["bob@x.example", "carol@y.example", "dave@z.example"])
        self.assertEqual(status["tags"], ["batch"])

    def test_batch_variable_cannot_inject_a_header(self) -> None:
        """issue 12 (v3 API): a recipient variable with CR/LF substituted into the subject is a 400 naming the recipient; nothing queued."""
        fields = self.message(subject="Hi %recipient.name%", recipient_variables=json.dumps({"bob@x.example": {"name": "x\r\nBcc: evil@example.net"}}))
        message = self.refused(fields)
        self.assertIn("field 'subject' must not contain CR, LF", message)
        self.assertIn("bob@x.example", message)

    def test_recipient_variables_must_be_an_object_of_objects(self) -> None:
        """issue 12 (limits): recipient-variables that is not a JSON object of objects is a 400 naming it."""
        for value in ("[]", '{"bob@x.example": "Bob"}', "{", '{"not an address": {}}', "NaN"):
            self.assertIn("'recipient-variables'", self.refused(self.message(recipient_variables=value)), value)
        self.assertIn("cannot be combined", self.refused(self.message(cc="c@y.example", recipient_variables="{}")))

    def test_options(self) -> None:
        """issue 12 (v3 API): harmless o: options are ignored; those mmgun cannot honour, and unknown fields, are a 400 naming them."""
        ok = self.message(o__tracking="yes", o__tracking_clicks="htmlonly", o__dkim="no", o__require_tls="false", o__skip_verification="False")
        self.assertEqual(self.post(ok)[0], 200)
        self.queued()
        for name, value in (("o:require-tls", "yes"), ("o:sending-ip", "1.2.3.4"), ("template", "welcome"), ("t:version", "1"), ("amp-html", "<p>")):
            self.assertIn(f"field {name!r}", self.refused(self.message() + [(name, value)]))
        self.assertEqual(self.refused(self.message() + [("o:unknown", "1")]), "unknown field 'o:unknown'")
        self.assertEqual(self.refused(self.message() + [("sender", "x")]), "unknown field 'sender'")

    def test_invalid_fields_are_named(self) -> None:
        """issue 12 (limits): each invalid field is a 400 naming it, nothing queued."""
        cases: list[tuple[list[tuple[str, FieldValue]], str]] = [
            (self.message()[1:], "missing field 'from'"),
            ([f for f in self.message() if f[0] != "to"], "missing field 'to'"),
            ([f for f in self.message() if f[0] != "text"], "missing field 'text' (or 'html')"),
            (self.message(h__Subject="x"), "field 'h:' may not set Subject: mmgun writes it"),
            (self.message(h__X_Evil="a\r\nBcc: x@y.example"), "field 'h:X-Evil' must not contain CR, LF, NUL or other control characters or line separators"),
            (self.message(o__tag=("t.txt", b"x")), "field 'o:tag' must be a text field, not a file"),
            (self.message() + [("from", "b@example.com")], "field 'from' is given more than once"),
            (self.message(attachment="not a file"), "field 'attachment[0]' must be a file (a part with a filename)"),
            (self.message(attachment=("../../etc/passwd", b"x")), "field 'attachment[0].filename' must be a file name, not a path"),
            (self.message(attachment=("C:\\x\\evil.exe", b"x")), "field 'attachment[0].filename' must be a file name, not a path"),
            (self.message(attachment=("a\x07.txt", b"x")), "field 'attachment[0].filename' must not contain control, line separator or bidirectional override characters"),
            (self.message(attachment=("a.bin", b"x", "not a type")), "field 'attachment[0].content_type' is not a MIME type (type/subtype)"),
            (self.message(inline=("logo.png", PNG)), "field 'inline[0]': content_id 'logo.png' is not referenced as cid:logo.png in 'html'"),
            (self.message(html="<img src='cid:my logo.png'>", inline=("my logo.png", PNG)), "field 'inline[0].filename' must be 1 to 200 letters, digits and !#$&'*+/=?^_`{|}~.@-"),
            (self.message(to="bob@x.example, <broken"), "field 'to' has an unclosed quote or angle bracket"),
            (self.message(cc="not an address"), "field 'cc' is not a valid email address (local@domain)"),
            (self.message(subject="a\nb"), "field 'subject' must not contain CR, LF, NUL or other control characters or line separators"),
            (self.message(o__tag="a") + [("o:tag", "b"), ("o:tag", "c"), ("o:tag", "d")], "field 'o:tag' holds more than 3 tags"),
            (self.message(v__big="x" * 5000), "field 'v:big' is longer than 4096 bytes"),
        ]
        for fields, expected in cases:
            self.assertEqual(self.refused(fields), expected)

    def test_non_utf8_fields(self) -> None:
        """issue 12 (limits): a text field (or field name) that is not UTF-8 is a 400 naming it, in both encodings."""
        fields = [f for f in self.message() if f[0] != "subject"] + [("subject", b"caf\xe9")]
        self.assertEqual(self.refused(fields), "field 'subject' is not valid UTF-8 text")
        body = urlencoded([(n, v) for n, v in self.message() if n != "text"]) + b"&text=%FF"
        self.assertEqual(self.refused(raw=body, content_type="application/x-www-form-urlencoded"), "field 'text' is not valid UTF-8 text")
        raw, ctype = form_data(self.message())
        raw = raw.replace(b'name="text"', b'name="t\xffext"')
        self.assertIn("not valid multipart/form-data", self.refused(raw=raw, content_type=ctype))


    def test_malformed_multipart(self) -> None:
        """issue 12 (limits): a missing boundary, a body without its boundary, a boundary inside a part, no final boundary, bytes after it: each 400, nothing queued."""
        body, ctype = form_data(self.message(), boundary="XYZ")
        self.assertEqual(self.refused(raw=body, content_type="multipart/form-data"), "header 'Content-Type' is multipart/form-data without a boundary")
        self.assertIn("request body is not valid multipart/form-data", self.refused(raw=body, content_type="multipart/form-data; boundary=OTHER"))
        inside = body.replace(b"Hello, Bob.", b"Hello\r\n--XYZ, Bob.")
        self.assertEqual(self.refused(raw=inside, content_type=ctype), "field 'text' is not valid multipart/form-data: Unexpected bytes after boundary")
        self.assertIn("not valid multipart/form-data", self.refused(raw=body[: -len(b"--XYZ--\r\n")], content_type=ctype))
        self.assertIn("not valid multipart/form-data", self.refused(raw=body + b"trailing", content_type=ctype))
        self.assertIn("not valid multipart/form-data", self.refused(raw=body.replace(b"\r\n", b"\n"), content_type=ctype))
        self.assertEqual(
            self.refused(raw=body, content_type="text/plain"),
            "header 'Content-Type' must be multipart/form-data or application/x-www-form-urlencoded",
        )

    def test_too_large(self) -> None:
        """issue 12 (limits): a body over --max-message-size is 413 (not buffered); a message built over it is 413."""
        self.refused(self.message(text="x" * 70_000), 413)
        # 48 KiB of attachment is 64 KiB of base64: the request fits, the message does not.
        message = self.refused(self.message(attachment=("a.bin", os.urandom(48 * 1024))), 413)
        self.assertRegex(message, r"^the message built from this request would be [0-9]+ octets, more than the maximum of 65536$")

    def test_batch_total_is_bounded(self) -> None:
        """
        issue 12 review (C1, low): a batch of 50 messages of 60 KB (3 MB, more than ten
        times --max-message-size of 64 KiB) is refused before any of them is made: 413,
        nothing queued, and the request's peak memory stays far below the 3 MB it asked for.
        """
        to = ", ".join(f"r{i}@x.example" for i in range(50))
        fields = [("from", "ada@example.com"), ("to", to), ("subject", "s"), ("text", "%recipient.n%" + "y" * 60_000), ("recipient-variables", "{}")]
        message, peak = peak_memory(lambda: self.refused(fields, 413))
        self.assertEqual(message, "the 50 messages of this batch would be more than 655360 octets together (10 times the maximum message size)")
        self.assertLess(peak, 1_500_000)

    def test_batch_built_total_refused_before_the_next_message(self) -> None:
        """
        issue 12 review (C1): when only the built messages pass the batch total (UTF-8
        text grows as quoted-printable), the batch is refused as soon as they do: the
        messages after that one are never made.
        """
        to = ", ".join(f"r{i}@x.example" for i in range(20))
        fields = [("from", "ada@example.com"), ("to", to), ("subject", "s"), ("text", "\u00e9" * 10_000), ("recipient-variables", "{}")]
        batch, options = parse_messages(form_fields(fields), "example.com", 50, 64 * 1024)
        assert isinstance(batch, Batch)
        made = []

        def counted() -> Any:
            for send in batch:
                made.append(send)
                yield send

        pipeline = self.api.frontend.pipeline
        d = Deferred.fromCoroutine(pipeline.submit_batch("acme", counted(), sender="ada@example.com", send_at=None))
        self.assertIn("messages of this batch would be more than 655360 octets", str(self.failureResultOf(d, MessageTooLarge).value))
        self.assertLess(len(made), 20)
        self.assertEqual(self.queued(), [])

    def test_idempotency_key_refused(self) -> None:
        """issue 12 (v3 API): an Idempotency-Key is not silently ignored on the v3 API: 400."""
        self.assertIn("Idempotency-Key", self.refused(self.message(), headers={"Idempotency-Key": "k"}))

    def test_errors_in_mailgun_shape(self) -> None:
        """issue 12 (frontend): under /v3/ a 404 and a 405 (with Allow) are Mailgun's {"message"}; counted as rejections, a 404 not."""
        self.assertEqual(self.post(self.message(), path="/v3/example.com/nothing"), (404, {"message": "no such endpoint"}))
        self.assertEqual(self.post(self.message(), path="/v3/example.com/messages/"), (404, {"message": "no such endpoint"}))
        d = self.api.treq.get("http://mmgun.test/v3/example.com/messages.mime")  # type: ignore[attr-defined]
        self.api.treq.flush()
        response = self.successResultOf(d)
        self.assertEqual((response.code, response.headers.getRawHeaders(b"allow")), (405, [b"POST"]))
        self.assertEqual(json.loads(self.successResultOf(response.content())), {"message": "method GET not allowed here"})

    def test_latency_labelled_by_endpoint_pattern(self) -> None:
        """issue 12: the v3 endpoints' latencies are labelled by their pattern, not by domain."""
        from mmgun.metrics import endpoint_label

        self.assertEqual(endpoint_label("/v3/example.com/messages"), "/v3/{domain}/messages")
        self.assertEqual(endpoint_label("/v3/x.example/messages.mime"), "/v3/{domain}/messages.mime")
        self.assertEqual([endpoint_label(p) for p in ("/send", "/v3//messages", "/v3/a/b/messages", "/v3/a/other")], ["/send", "other", "other", "other"])
        metrics = Metrics()
        metrics.http_request(b"/v3/example.com/messages", 200, 0.001)
        labels = {tuple(s.labels.values()) for m in metrics.http_latency.collect() for s in m.samples if s.name.endswith("_count")}
        self.assertEqual(labels, {("/v3/{domain}/messages", "200")})


class LargeBodyTests(V3Tests):
    """Bodies of megabytes, under a --max-message-size of 4 MiB."""

    def options(self) -> dict[str, Any]:
        return {"max_message_size": 4 * 1024 * 1024}

    def test_one_megabyte_header_value(self) -> None:
        """issue 12 (limits): a 1 MB h: value is refused while it is read (400 naming it), nothing queued."""
        message = self.refused(self.message(h__X_Big="x" * 1024 * 1024))
        self.assertEqual(message, "field 'h:X-Big' is longer than 3992 bytes")

    def test_ten_thousand_tiny_attachments(self) -> None:
        """issue 12 (limits): 10,000 one-byte attachments are a 400 naming the field at the 101st; 10,000 tiny fields at the 2001st."""
        files = [("attachment", (f"a{i}.txt", b"x")) for i in range(10_000)]
        self.assertEqual(self.refused(self.message() + files), f"field 'attachment' holds more than {MAX_PARTS} files")
        tiny = [("v:x", "y")] * 10_000
        self.assertEqual(self.refused(self.message() + tiny), f"request body holds more than {MAX_FIELDS} form fields")
        self.assertEqual(self.refused(raw=b"&".join([b"a=b"] * 10_000), content_type="application/x-www-form-urlencoded"), f"request body holds more than {MAX_FIELDS} form fields")


class MimeTests(V3Tests):
    MIME = (
        b"From: Ada <ada@example.com>\n"
        b"To: Bob <bob@x.example>\n"
        b"Bcc: hidden@z.example\n"
        b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\n"
        b"X-Folded: one\n two\n"
        b"MIME-Version: 1.0\n"
        b"Content-Type: text/plain; charset=utf-8\n"
        b"Content-Transfer-Encoding: 8bit\n"
        b"\n"
        b"Gr\xc3\xbc\xc3\x9fe\n"
    )

    def mime(self, message: bytes, *to: str, **extra: Any) -> list[tuple[str, FieldValue]]:
        fields: list[tuple[str, FieldValue]] = [("to", t) for t in (to or ("bob@x.example",))]
        fields.append(("message", ("message.mime", message)))
        return fields + [(name.replace("__", ":"), value) for name, value in extra.items()]

    def post_mime(self, fields: list[tuple[str, FieldValue]], domain: str = "example.com") -> tuple[int, Any]:
        return self.post(fields, path=f"/v3/{domain}/messages.mime")

    def refused_mime(self, fields: list[tuple[str, FieldValue]], code: int = 400) -> str:
        return self.refused(fields, code, path="/v3/example.com/messages.mime")

    def test_queued_as_given(self) -> None:
        """issue 12 (messages.mime): the message is queued as given for the `to` envelope (line breaks made CRLF, Date and Message-ID added at the top, Bcc removed)."""
        code, answer = self.post_mime(self.mime(self.MIME, "bob@x.example, hidden@z.example", o__tag="mime", v__k="v"))
        self.assertEqual(code, 200, answer)
        envelopes = self.queued()
        self.assertEqual(sorted(r for e in envelopes for r in e.recipients), ["bob@x.example", "hidden@z.example"])
        self.assertEqual(envelopes[0].message, envelopes[1].message)
        message = envelopes[0].message
        date, message_id, rest = message.split(b"\r\n", 2)
        self.assertEqual(date, b"Date: Fri, 15 Jan 2027 08:00:00 +0000")
        self.assertEqual(message_id, b"Message-ID: " + answer["id"].encode())
        self.assertEqual(rest, self.MIME.replace(b"Bcc: hidden@z.example\n", b"").replace(b"\n", b"\r\n"))
        status = self.status(answer["id"])[1]
        self.assertEqual((status["tags"], status["metadata"]), (["mime"], {"k": "v"}))

    def test_own_message_id_kept(self) -> None:
        """issue 12 (messages.mime): a message's own Message-ID is kept and answered; it finds the submission."""
        message = b"Message-ID: <own.1@example.com>\r\nDate: Thu, 14 Jan 2027 08:00:00 +0000\r\n" + self.MIME
        code, answer = self.post_mime(self.mime(message))
        self.assertEqual((code, answer["id"]), (200, "<own.1@example.com>"))
        (envelope,) = self.queued()
        self.assertTrue(envelope.message.startswith(b"Message-ID: <own.1@example.com>\r\nDate: Thu"))
        self.assertEqual(self.status("<own.1@example.com>")[0], 200)

    def test_same_message_posted_twice_shows_the_later_post(self) -> None:
        """issue 12 (messages.mime): the same .eml (its own Message-ID) posted twice: /status shows the later post, not a merge of both."""
        message = b"Message-ID: <own.2@example.com>\r\nDate: Thu, 14 Jan 2027 08:00:00 +0000\r\n" + self.MIME
        self.assertEqual(self.post_mime(self.mime(message, "first@x.example", o__tag="first"))[0], 200)
        self.clock.advance(1)
        self.assertEqual(self.post_mime(self.mime(message, "second@x.example", o__tag="second"))[0], 200)
        code, status = self.status("<own.2@example.com>")
        self.assertEqual(code, 200)
        self.assertEqual([r["address"] for r in status["recipients"]], ["second@x.example"])
        self.assertEqual(status["tags"], ["second"])

    def test_headers_checked(self) -> None:
        """issue 12 (messages.mime): header lines checked as mmgun's own (8-bit, NUL, no From, two Froms, a bad Message-ID, a long line, the sender's domain): 400 naming 'message'."""
        cases = [
            (b"From: ada@example.com\r\nSubject: caf\xc3\xa9\r\n\r\nx", "field 'message': header line 2 holds octets other than printable ASCII (encode them as RFC 2047 says)"),
            (b"Subject: x\r\n\r\nbody", "field 'message' has no From header field"),
            (b"From: ada@example.com\r\nFrom: eve@example.com\r\n\r\nx", "field 'message' has more than one from header field"),
            (b"From: ada@example.com, eve@example.com\r\n\r\nx", "field 'message': its From header field must name exactly one mailbox"),
            (b"From: ada@example.com\r\nMessage-ID: nobrackets\r\n\r\nx", "field 'message': its Message-ID is not <id-left@id-right>"),
            (b"From: ada@example.com\r\nBad Header: x\r\n\r\nx", "field 'message': header line 2 is not a header field (Name: value)"),
            (b" folded\r\nFrom: ada@example.com\r\n\r\nx", "field 'message': its first header line is a continuation line"),
            (b"From: ada@example.com\r\n\r\n" + b"x" * 999, "field 'message' has a line longer than 998 octets"),
            (b"From: ada@example.com\r\n\r\nnul\x00", "field 'message' holds a NUL octet"),
            (b"From: eve@evil.example\r\n\r\nx", "field 'message': the sender's domain (evil.example) is not the sending domain of the URL (example.com)"),
        ]
        for message, expected in cases:
            self.assertEqual(self.refused_mime(self.mime(message)), expected)
        self.assertEqual(self.refused_mime([("to", "b@x.example")]), "missing field 'message'")
        self.assertEqual(self.refused_mime(self.mime(self.MIME)[1:]), "missing field 'to'")
        self.assertEqual(self.refused_mime(self.mime(self.MIME, h__X="y")), "fields 'h:*' are not taken by messages.mime: put the header fields in the message")
        self.assertEqual(self.refused_mime(self.mime(self.MIME, subject="y")), "unknown field 'subject'")

    def test_too_large(self) -> None:
        """issue 12 (messages.mime): a message over --max-message-size is 413 (its request is: it is not buffered)."""
        message = b"From: ada@example.com\r\n\r\n" + (b"x" * 900 + b"\r\n") * 73
        self.assertEqual(self.refused_mime(self.mime(message), 413), "request body larger than 65536 bytes")

    def test_added_headers_pass_the_limit(self) -> None:
        """issue 12 review (low): a message that fits the request, but not once its line breaks are CRLF and its Date and Message-ID added, is check_mime's own 413."""
        head = b"From: ada@example.com\n\n"
        lines = (65536 - 40 - len(head) - 2) // 3  # "x\n" becomes "x\r\n": 40 octets short of the limit
        message = head + b"x\n" * lines
        normalized = len(message) + message.count(b"\n")
        self.assertLessEqual(normalized, 65536)
        refused = self.refused_mime(self.mime(message), 413)
        size = int(refused.split()[4])
        self.assertEqual(refused, f"the message would be {size} octets, more than the maximum of 65536")
        # Only the Date and Message-ID lines were added (the Message-ID's length varies).
        self.assertGreater(size - normalized, len(b"Date: Fri, 15 Jan 2027 08:00:00 +0000\r\nMessage-ID: <@mmgun.test>\r\n"))
        self.assertLess(size - normalized, 200)

    def test_testmode(self) -> None:
        """issue 12 (messages.mime): o:testmode records it, never delivered."""
        code, answer = self.post_mime(self.mime(self.MIME, o__testmode="true"))
        self.assertEqual(code, 200)
        self.assertEqual(self.queued(), [])
        self.assertEqual(self.status(answer["id"])[1]["status"], "sent")


def _email_message() -> bytes:
    message = EmailMessage()
    message["From"] = "ada@example.com"
    message["To"] = "bob@x.example"
    message["Subject"] = "made by Python's email package"
    message.set_content("Grüße\n")
    return bytes(message)


class PythonEmailTests(V3Tests):
    def test_python_email_message_passes(self) -> None:
        """issue 12 (messages.mime): a message made by Python's email package (8bit UTF-8 body) is queued as given."""
        raw = _email_message()
        code, answer = self.post([("to", "bob@x.example"), ("message", ("m.eml", raw))], path="/v3/example.com/messages.mime")
        self.assertEqual(code, 200, answer)
        (envelope,) = self.queued()
        self.assertTrue(envelope.message.endswith(raw.split(b"\n\n", 1)[1].replace(b"\n", b"\r\n")))


class ClientGoneTests(V3Tests):
    def test_client_gone_before_the_commit(self) -> None:
        """
        issue 12 (v3 API): Klein cancels a handler when its client goes away; the submission
        being committed is kept all the same (a retry would duplicate it otherwise), nothing
        is written to the request, and nothing is logged as an error.
        """
        from io import BytesIO

        from twisted.internet.defer import Deferred
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure
        from twisted.web.server import Request
        from twisted.web.test.requesthelper import DummyChannel

        committed: Deferred[None] = Deferred()
        stored: list[Any] = []

        original = self.store.add_submission

        async def add_submission(submission: Any) -> str:
            stored.append(submission)
            await committed
            return await original(submission)

        self.patch(self.store, "add_submission", add_submission)
        body, content_type = form_data(self.message())
        channel = DummyChannel()
        request = Request(channel)
        request.method, request.uri, request.path = b"POST", b"/v3/example.com/messages", b"/v3/example.com/messages"
        request.prepath, request.postpath = [], [b"v3", b"example.com", b"messages"]
        request.content = BytesIO(body)  # type: ignore[assignment]
        for name, value in {"Content-Type": content_type, **basic(self.keys["acme"])}.items():
            request.requestHeaders.setRawHeaders(name, [value])
        self.api.frontend.resource().render(request)
        self.assertEqual(len(stored), 1)
        request.connectionLost(Failure(ConnectionDone("client went away")))
        committed.callback(None)
        self.assertEqual((channel.transport.written.getvalue(), request.finished), (b"", 0))
        self.assertEqual([e.recipients for e in self.queued()], [("bob@x.example",)])
        self.assertEqual(self.flushLoggedErrors(), [])


class ReviewAttackTests(V3Tests):
    """issue 12 review: the CPU and memory blow-ups found in the v3 API, each performed."""

    def options(self) -> dict[str, Any]:
        return {"max_message_size": 1024 * 1024, "max_recipients": 200}

    def test_variable_amplification_refused_before_it_is_built(self) -> None:
        """
        issue 12 review C1: a 126 KB request whose text names a 100 KB variable 2000 times
        (200 MB once substituted) is a 413 naming the recipient, found by measuring, never
        by building: the request's peak memory stays under 5 MB.
        """
        fields = self.message(
            text="%recipient.a%" * 2000,
            recipient_variables=json.dumps({"bob@x.example": {"a": "x" * 100_000}}),
        )
        message, peak = peak_memory(lambda: self.refused(fields, 413))
        self.assertEqual(
            message,
            "the message built from this request would be more than 1048576 octets, the maximum (with the 'recipient-variables' of bob@x.example)",
        )
        self.assertLess(peak, 5_000_000)

    def test_batch_of_large_copies_refused_before_they_are_made(self) -> None:
        """
        issue 12 review C1: 200 recipients of a 512 KB text with a variable (100 MB of
        per-recipient copies) are a 413 before the first copy is made: peak memory under 5 MB.
        """
        to = ", ".join(f"r{i}@x.example" for i in range(200))
        fields = self.message(to=to, text="%recipient.n%" + "y" * 512 * 1024, recipient_variables="{}")
        message, peak = peak_memory(lambda: self.refused(fields, 413))
        self.assertIn("the 200 messages of this batch would be more than 10485760 octets together", message)
        self.assertLess(peak, 5_000_000)

    def test_inline_references_scanned_once(self) -> None:
        """
        issue 12 review C2: 100 inline parts and a 200 KB HTML, sent to 100 recipients in
        a batch: the HTML is scanned for cid: references once, not once per part and
        recipient (10,000 scans before).
        """
        html = "<p>" + "x" * 200_000 + "".join(f'<img src="cid:i{i}.png">' for i in range(100))
        to = ", ".join(f"r{i}@x.example" for i in range(100))
        fields = self.message(to=to, html=html, recipient_variables="{}") + [("inline", (f"i{i}.png", b"\x89PNG")) for i in range(100)]
        (batch, _), plain = regex_calls(lambda: parse_messages(form_fields(fields), "example.com", 200, 64 * 1024 * 1024))
        assert isinstance(batch, Batch)
        self.assertEqual(len(batch), 100)
        self.assertLess(plain, 1000)  # the addresses' and fields' own checks; 10,000+ scans of the HTML before
        # What is left per recipient is one scan of its own HTML, when variables change it.
        html_fields = self.message(to=to, html=html + "%recipient.n%", recipient_variables="{}") + fields[-100:]
        _, calls = regex_calls(lambda: parse_messages(form_fields(html_fields), "example.com", 200, 64 * 1024 * 1024))
        self.assertLess(calls - plain, 300)

    def test_json_api_inline_references_scanned_once(self) -> None:
        """issue 12 review C2: compose with 100 inline parts scans the HTML once (it was once per part)."""
        from mmgun.message import Mailbox, Part, compose

        html = "x" * 100_000 + "".join(f"cid:i{i}.png " for i in range(100))
        inline = [Part(f"i{i}.png", "image/png", b"x", f"i{i}.png") for i in range(100)]
        send, calls = regex_calls(
            lambda: compose(sender=Mailbox("a@example.com"), to=[Mailbox("b@x.example")], subject="s", body=None, html=html, inline=inline, max_recipients=1)
        )
        self.assertEqual(len(send.inline), 100)
        self.assertLessEqual(calls, 2)

    def test_long_line_check_is_linear(self) -> None:
        """
        issue 12 review C3: messages.mime's line-length check on 1 MB of 998-octet lines
        (quadratic before: a scan of up to 999 octets from every offset, ~3 s here, 32 s
        for 10 MB) takes well under half a second of this thread's CPU.
        """
        raw = b"From: ada@example.com\r\n\r\n" + (b"x" * 998 + b"\r\n") * 1000
        started = time.thread_time()
        message, _, _ = check_mime(raw, hostname="mmgun.test", now=0, max_size=2 * 1024 * 1024)
        self.assertLess(time.thread_time() - started, 0.5)
        self.assertTrue(message.endswith(raw.split(b"\r\n\r\n", 1)[1]))
        raised = self.assertRaises(BadRequest, check_mime, raw + b"y" * 999, hostname="mmgun.test", now=0, max_size=2 * 1024 * 1024)
        self.assertEqual(str(raised), "field 'message' has a line longer than 998 octets")

    def test_address_fields_limited_while_read(self) -> None:
        """
        issue 12 review M1: a `to` longer than max_recipients x 320 bytes (+1 KB) is
        refused while it is read; repeated `to` fields under that limit each, but over it
        together, are refused before any is parsed.
        """
        most = 200 * 320 + 1024
        self.assertEqual(self.refused(self.message(to="," * (most + 1))), f"field 'to' is longer than {most} bytes")
        fields = self.message(to="," * 1000) + [("to", "," * 1000)] * 80
        self.assertEqual(self.refused(fields), f"field 'to' is longer than {most} characters (all its values together)")

    def test_recipient_variables_entries_limited(self) -> None:
        """issue 12 review M1: recipient-variables with more entries than max_recipients is a 400 before any key is normalized."""
        variables: dict[str, dict[str, str]] = {f"r{i}@x.example": {} for i in range(201)}
        self.assertEqual(
            self.refused(self.message(recipient_variables=json.dumps(variables))),
            "field 'recipient-variables' has more than 200 entries (one per To address)",
        )

    def test_non_finite_variable_refused(self) -> None:
        """issue 12 review (low): 1e400 in recipient-variables is a 400, not substituted as Infinity."""
        fields = self.message(text="n=%recipient.n%", recipient_variables='{"bob@x.example": {"n": 1e400}}')
        self.assertEqual(self.refused(fields), "field 'recipient-variables' holds a number too large for JSON (such as 1e400)")

    def test_urlencoded_fields_counted_before_split(self) -> None:
        """issue 12 review M2: a 1 MB urlencoded body of 'ab&ab&...' is refused without splitting it (12 MB of pieces before)."""
        body = b"ab&" * 350_000
        raised, peak = peak_memory(lambda: self.assertRaises(BadRequest, read_urlencoded, body))
        self.assertEqual(str(raised), f"request body holds more than {MAX_FIELDS} form fields")
        self.assertLess(peak, 100_000)

    def test_parser_errors_are_plain_sentences(self) -> None:
        """issue 12 review M4: a part header that is not UTF-8 is a plain sentence, without the parser's Python internals."""
        raw, ctype = form_data(self.message())
        raw = raw.replace(b'name="text"', b'name="t\xffext"')
        self.assertEqual(self.refused(raw=raw, content_type=ctype), "request body is not valid multipart/form-data: Segment header failed to decode")
