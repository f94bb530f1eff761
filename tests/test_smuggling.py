"""
No SMTP smuggling: whatever a body holds, the real sender writes one DATA payload with
CRLF line ends only, dot-stuffed once, and one end-of-data sequence.

Bodies go in through POST /send and out through mmgun's own sender and ESMTP client
over real loopback sockets to mmgun.testing.smtpserver, which records the exact wire
bytes of each DATA payload (``Received.raw``). The server ends DATA only on
CRLF "." CRLF, so a body that another server would read as two messages shows up here
as a bare CR or LF, or a second end-of-data sequence, in ``raw``; a body read as two
messages by this server would show up as an unexpected message in the mailbox.
"""

from __future__ import annotations

import email
import email.policy
import json
from typing import Any

import treq
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool

from mmgun.config import Options
from mmgun.service import make_service
from mmgun.testing.ports import port_number
from mmgun.testing.smtpserver import Mailbox, Received, smtp_server_factory

from .helpers import CLIENT, http_url

DEADLINE = 30.0
#: twisted.protocols.basic.FileSender's chunk: where the wire form is cut into writes.
CHUNK = 2**14
#: Enough repetitions of ".\n.x\n" for nine chunks of wire (9 bytes each there, 7 in the message).
DOTS = 22_000

#: Smuggling attempts: each would end DATA early at a server lenient about line ends,
#: and then start a second transaction of the attacker's choosing.
SMUGGLED = (
    "MAIL FROM:<evil@attacker.example>{eol}RCPT TO:<victim@gamma.example>{eol}DATA{eol}"
    "From: ceo@bank.example{eol}{eol}smuggled{eol}.{eol}"
)

BODIES: dict[str, str] = {
    "bare-lf": "one\ntwo\n.\nthree",
    "bare-cr": "one\rtwo\r.\rthree",
    "lf-dot-lf": "hello\n.\n" + SMUGGLED.format(eol="\n"),
    "crlf-dot-crlf": "hello\r\n.\r\n" + SMUGGLED.format(eol="\r\n"),
    "cr-dot-cr": "hello\r.\r" + SMUGGLED.format(eol="\r"),
    "lf-dot-crlf": "hello\n.\r\n" + SMUGGLED.format(eol="\r\n"),
    "crlf-dot-lf": "hello\r\n.\n" + SMUGGLED.format(eol="\n"),
    "cr-dot-crlf": "hello\r.\r\n" + SMUGGLED.format(eol="\r\n"),
    "mixed": "\n.\r\n.\r.\n\r\n..\n\r\r\n\n.",
    "dot-first": ".\nstarts with a dot",
    "only-dot": ".",
    "dot-last": "ends with a dot\n.",
    "empty": "",
    "long-lines": "x" * 10_000 + "\n" + "é" * 10_000 + "\r\n" + "." * 10_000 + "\r" + ". " * 5_000,
    "long-line-then-dot": "y" * 10_000 + "\n.\n" + "z" * 9_999 + "\r\n.\r\n",
    # "." lines at every chunk boundary: lines of 3 and 4 octets in the message (7,
    # coprime with 2**14) and 4 and 5 on the wire (9, too) put some "." line exactly at
    # an offset 16384*k among k = 1..9, whatever the length of the headers.
    "dots-at-chunk-boundaries": ".\n.x\n" * DOTS,
}


def normalized(body: str) -> str:
    """The body as the recipient's parser should give it back."""
    text = body.replace("\r\n", "\n").replace("\r", "\n")
    return text if text.endswith("\n") else text + "\n"


def dot_line_at(data: bytes, offset: int, line: bytes) -> bool:
    """Whether a line ``line`` (CRLF included) starts at ``offset`` of ``data``."""
    return data[offset - 2 : offset] == b"\r\n" and data[offset : offset + len(line)] == line


class SmugglingTests(TestCase):
    def setUp(self) -> None:
        from twisted.internet import reactor

        self.reactor = reactor
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.mailbox = Mailbox()
        smtp = reactor.listenTCP(0, smtp_server_factory(reactor, self.mailbox, tls=False), interface="127.0.0.1")
        self.addCleanup(smtp.stopListening)
        self.url = self.start_mmgun(port_number(smtp))

    def start_mmgun(self, smtp_port: int) -> str:
        clients = self.mktemp()
        with open(clients, "w") as f:
            f.write(CLIENT + "\n")
        options = Options({})
        options.parseOptions(
            [
                "--listen", "tcp:0:interface=127.0.0.1", "--database", self.mktemp(), "--clients", clients,
                "--role", "frontend", "--role", "sender", "--relay-host", f"127.0.0.1:{smtp_port}",
                # Never asked (a relay host needs no MX); the default, /etc/resolv.conf,
                # leaves the resolver's re-read timer behind after stopService.
                "--nameserver", "127.0.0.1:9",
                "--helo", "mmgun.test", "--poll-interval", "0.05", "--retry-min", "0.2s", "--retry-max", "0.4s",
                "--smtp-timeout", "10s",
            ]
        )  # fmt: skip
        service = make_service(options.config, self.reactor)
        service.startService()
        self.addCleanup(service.stopService)
        return http_url(service)

    async def post(self, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        response = await treq.post(self.url + path, data=json.dumps(body).encode(), pool=self.pool)
        return response.code, json.loads(await response.content())

    async def send(self, name: str, body: str) -> tuple[int, Any]:
        return await self.post(
            "/send",
            {
                "client_id": CLIENT,
                "sender": "me@example.com",
                "recipients": [f"{name}@alpha.example", f"{name}@beta.example"],
                "subject": f"case {name}",
                "body": body,
            },
        )

    async def wait_final(self, submission_id: str) -> dict[str, Any]:
        deadline = self.reactor.seconds() + DEADLINE
        while True:
            code, status = await self.post("/status", {"client_id": CLIENT, "submission_id": submission_id})
            self.assertEqual(code, 200, status)
            if status["status"] != "queued":
                return status
            if self.reactor.seconds() > deadline:
                self.fail(f"submission still queued after {DEADLINE}s: {status}")
            await deferLater(self.reactor, 0.05, lambda: None)

    async def deliver(self, *names: str) -> dict[str, list[Received]]:
        """Send these bodies of BODIES, wait until each is final, return what arrived, by name."""
        submissions = {}
        for name in names:
            body = BODIES[name]
            code, answer = await self.send(name, body)
            self.assertEqual(code, 200, (name, answer))
            submissions[name] = answer["submission_id"]
        for name, submission_id in submissions.items():
            status = await self.wait_final(submission_id)
            self.assertEqual(status["status"], "sent", (name, status))
        by_name: dict[str, list[Received]] = {name: [] for name in names}
        for message in self.mailbox.messages:
            local_parts = {r.partition("@")[0] for r in message.recipients}
            self.assertEqual(len(local_parts), 1, message.recipients)
            self.assertIn(next(iter(local_parts)), by_name, f"a message nobody sent: {message.recipients}")
            by_name[local_parts.pop()].append(message)
        return by_name

    async def _every_body(self) -> None:
        by_name = await self.deliver(*BODIES)
        self.assertEqual(len(self.mailbox.messages), 2 * len(BODIES))
        for name, body in BODIES.items():
            messages = by_name[name]
            # One transaction per envelope (one per domain), nothing more.
            self.assertEqual(sorted(m.recipients for m in messages), [(f"{name}@alpha.example",), (f"{name}@beta.example",)])
            for message in messages:
                self.assert_one_clean_payload(name, message)
                parsed = email.message_from_bytes(message.data, policy=email.policy.default)
                self.assertEqual(parsed.defects, [], name)
                self.assertEqual(parsed["Subject"], f"case {name}")
                self.assertEqual(parsed.get_content().replace("\r\n", "\n"), normalized(body), name)
            self.assertEqual(messages[0].data, messages[1].data, name)

    def assert_one_clean_payload(self, name: str, message: Received) -> None:
        raw = message.raw
        self.assertTrue(raw.endswith(b"\r\n.\r\n"), name)
        self.assertEqual(raw.count(b"\r\n.\r\n"), 1, name)
        self.assertFalse(raw.startswith(b".\r\n"), name)
        bare = raw.replace(b"\r\n", b"")
        self.assertNotIn(b"\r", bare, name)
        self.assertNotIn(b"\n", bare, name)
        self.assertNotIn(b"\0", raw, name)
        self.assertTrue(raw.isascii(), name)
        lines = raw.split(b"\r\n")[:-1]
        self.assertLessEqual(max(len(line) for line in lines), 998, name)
        # Dot-stuffed exactly once: undoing it gives back what the server recorded.
        unstuffed = b"".join((line[1:] if line.startswith(b".") else line) + b"\r\n" for line in lines[:-1])
        self.assertEqual(unstuffed, message.data, name)

    def test_no_body_smuggles_a_second_message(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._every_body())

    async def _chunk_boundaries(self) -> None:
        by_name = await self.deliver("dots-at-chunk-boundaries")
        self.assertEqual(len(by_name["dots-at-chunk-boundaries"]), 2)
        for message in by_name["dots-at-chunk-boundaries"]:
            self.assertGreater(len(message.data), 9 * CHUNK)
            self.assertGreater(len(message.raw), 9 * CHUNK)
            at_message = [k for k in range(1, 10) if dot_line_at(message.data, k * CHUNK, b".\r\n")]
            at_wire = [k for k in range(1, 10) if dot_line_at(message.raw, k * CHUNK, b"..\r\n")]
            self.assertTrue(at_message, "no '.' line starts at a multiple of 16384 in the message")
            self.assertTrue(at_wire, "no '.' line starts at a multiple of 16384 on the wire")

    def test_dot_lines_at_chunk_boundaries_are_stuffed(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._chunk_boundaries())

    async def _nul(self) -> None:
        code, answer = await self.send("nul", "before\0after\r\n.\r\n")
        self.assertEqual((code, answer["result"]), (400, "error"))
        self.assertIn("body", answer["message"])
        code, answer = await self.send("nul-ok", "no nul")
        self.assertEqual(code, 200, answer)
        await self.wait_final(answer["submission_id"])
        delivered = sorted(r for m in self.mailbox.messages for r in m.recipients)
        self.assertEqual(delivered, ["nul-ok@alpha.example", "nul-ok@beta.example"])

    def test_nul_in_body_is_refused_and_nothing_is_sent(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._nul())
