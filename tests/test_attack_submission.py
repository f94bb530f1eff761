"""
SMTP submission under attack (issue 16, "Hostile input"): each test performs the attack —
over a raw loopback socket, or in memory on a Clock where time matters — and checks what
the server answered and that nothing was queued that should not be.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransportWithDisconnection
from twisted.trial.unittest import SynchronousTestCase

from mmgun.clients import Clients
from mmgun.submission import SubmissionProtocol, SubmissionServer, SubmissionSettings
from mmgun.web.app import Frontend

from .helpers import sync_store
from .test_submission import MESSAGE, SubmissionCase, unverified


def auth_plain(key: str) -> bytes:
    import base64

    return b"AUTH PLAIN " + base64.b64encode(b"\0api\0" + key.encode()) + b"\r\n"


class Conversation:
    """A raw client socket: send bytes as given, read replies (each up to its final line), with a deadline."""

    def __init__(self, port: int, *, source: str | None = None, greeting: bool = True) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0) if source else None)
        self.buffer = b""
        self.greeting = self.reply() if greeting else None

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> bytes | None:
        """The next reply (all its lines), or None at EOF."""
        lines = []
        while True:
            while b"\r\n" not in self.buffer:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return None
                self.buffer += chunk
            line, _, self.buffer = self.buffer.partition(b"\r\n")
            lines.append(line)
            if line[3:4] != b"-":
                return b"\r\n".join(lines)

    def replies(self, count: int) -> list[bytes | None]:
        return [self.reply() for _ in range(count)]

    def closed(self) -> bool:
        """Whether the server closed the connection (after whatever it still had to say)."""
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
                self.buffer += chunk
        except (TimeoutError, ConnectionResetError):
            return False

    def close(self) -> None:
        self.sock.close()


class RawSocketTests(SubmissionCase):
    def authenticated(self, port: int) -> Conversation:
        talk = Conversation(port)
        talk.send(b"EHLO attacker.test\r\n" + auth_plain(self.key))
        assert talk.reply().startswith(b"250-")  # type: ignore[union-attr]
        assert talk.reply() == b"235 2.7.0 authentication successful"
        return talk

    async def test_no_transaction_without_auth(self) -> None:
        """issue 16 item 4 (open relay): MAIL, RCPT and DATA pipelined without AUTH, for any recipient: refused, nothing queued."""
        port = self.listen()

        def script() -> list[bytes | None]:
            talk = Conversation(port)
            talk.send(
                b"EHLO relay.test\r\nMAIL FROM:<spam@example.com>\r\nRCPT TO:<victim@gmail.example>\r\n"
                b"DATA\r\nFrom: spam@example.com\r\n\r\nbuy now\r\n.\r\nQUIT\r\n"
            )
            replies = talk.replies(9)
            talk.close()
            return replies

        replies = await self.client(script)
        codes = [r[:9] if r is not None else None for r in replies]
        # The message's four lines are (unknown) commands: none of them is taken as mail.
        self.assertEqual(codes[1:], [b"530 5.7.0", b"503 5.5.1", b"503 5.5.1", *[b"500 5.5.2"] * 4, b"221 2.0.0"])
        self.assertEqual(self.submissions(), [])

    async def test_no_auth_in_the_clear_on_a_public_listener(self) -> None:
        """issue 16 item 1: on a non-loopback listener without TLS, AUTH is not offered and is refused 538 (the key never crosses in the clear)."""
        port = self.listen(local=False)

        def script() -> list[bytes | None]:
            talk = Conversation(port)
            talk.send(b"EHLO c.test\r\n" + auth_plain(self.key) + b"MAIL FROM:<a@example.com>\r\n")
            replies = talk.replies(3)
            talk.close()
            return replies

        ehlo, auth, mail = await self.client(script)
        self.assertNotIn(b"AUTH", ehlo or b"")
        self.assertTrue((auth or b"").startswith(b"538 5.7.11"))
        self.assertTrue((mail or b"").startswith(b"530 5.7.0"))

    async def test_smuggling_sequences_never_end_data(self) -> None:
        """
        issue 16 item 4 (SMTP smuggling, CVE-2023-51764/5/6): each of <LF>.<LF>, <CR>.<CR>,
        <LF>.<CRLF> and <CR><LF>.<LF> followed by a smuggled transaction is content of a
        message refused 550 5.6.11, never a second transaction; the connection goes on.
        """
        port = self.listen()
        smuggled = b"MAIL FROM:<admin@example.com>\r\nRCPT TO:<victim@another.example>\r\nDATA\r\nFrom: admin@example.com\r\n\r\nsmuggled\r\n"
        endings = [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n"]

        def script() -> list[list[bytes | None]]:
            talk = self.authenticated(port)
            results = []
            for ending in endings:
                talk.send(b"MAIL FROM:<ada@example.com>\r\nRCPT TO:<bob@another.example>\r\nDATA\r\n")
                talk.send(MESSAGE + b"first" + ending + smuggled + b".\r\nNOOP\r\n")
                results.append(talk.replies(5))
            talk.close()
            return results

        for ending, replies in zip(endings, await self.client(script), strict=True):
            codes = [r[:10] if r is not None else None for r in replies]
            self.assertEqual(
                codes, [b"250 2.1.0 ", b"250 2.1.5 ", b"354 end da", b"550 5.6.11", b"250 2.0.0 "], f"ending {ending!r}"
            )
        self.assertEqual(self.submissions(), [])

    async def test_long_line_in_data_does_not_leave_data(self) -> None:
        """issue 16 item 4: a line over 1000 octets refuses the message (500 5.5.2); the lines after it stay data, not commands."""
        port = self.listen()

        def script() -> list[bytes | None]:
            talk = self.authenticated(port)
            talk.send(b"MAIL FROM:<ada@example.com>\r\nRCPT TO:<bob@another.example>\r\nDATA\r\n")
            # In twisted.mail's server the line after an overlong one would be read as a command.
            talk.send(MESSAGE + b"y" * 5000 + b"\r\nRSET\r\nMAIL FROM:<evil@example.com>\r\n.\r\nNOOP\r\n")
            replies = talk.replies(5)
            talk.close()
            return replies

        replies = await self.client(script)
        self.assertEqual([r[:9] if r else None for r in replies], [b"250 2.1.0", b"250 2.1.5", b"354 end d", b"500 5.5.2", b"250 2.0.0"])
        self.assertEqual(replies[4], b"250 2.0.0 OK")
        self.assertEqual(self.submissions(), [])

    async def test_endless_line_is_not_buffered(self) -> None:
        """issue 16 item 4: a command line that never ends is discarded as it comes (memory stays bounded) and refused when it ends."""
        port = self.listen()

        def script() -> list[bytes | None]:
            talk = Conversation(port)
            for _ in range(64):
                talk.send(b"A" * 65536)
            talk.send(b"\r\nNOOP\r\n")
            replies = talk.replies(2)
            talk.close()
            return replies

        replies = await self.client(script)
        self.assertEqual(replies, [b"500 5.5.2 line longer than 1000 octets", b"250 2.0.0 OK"])
        # Nothing of the 4 MiB was kept: a client holds at most one line of buffer.
        self.assertTrue(all(len(p._buffer) <= 1 for p in self.smtp.connections))

    async def test_nul_and_bare_lf_in_commands(self) -> None:
        """issue 16 item 4: NUL, a bare LF or a bare CR inside a command is 500 5.5.2 (no command hides behind it); NUL in data is 550 5.6.0."""
        port = self.listen()

        def script() -> list[bytes | None]:
            talk = self.authenticated(port)
            talk.send(b"NOOP\0\r\nNOOP\nMAIL FROM:<x@example.com>\r\nRSET\rMAIL FROM:<y@example.com>\r\n")
            replies = talk.replies(3)
            talk.send(b"MAIL FROM:<ada@example.com>\r\nRCPT TO:<bob@another.example>\r\nDATA\r\n")
            talk.send(MESSAGE + b"nul \0 here\r\n.\r\n")
            replies += talk.replies(4)
            talk.close()
            return replies

        replies = await self.client(script)
        self.assertEqual([r[:10] if r else None for r in replies][:3], [b"500 5.5.2 "] * 3)
        self.assertEqual(replies[-1], b"550 5.6.0 NUL octet in the message")
        self.assertEqual(self.submissions(), [])

    async def test_starttls_injection_is_discarded(self) -> None:
        """issue 16 item 4 (CVE-2011-0411): commands sent in the same packet as STARTTLS are not run inside TLS."""
        port = self.listen(local=False, tls=True)

        def script() -> tuple[bytes | None, bytes | None]:
            talk = Conversation(port)
            talk.send(b"EHLO c.test\r\n")
            talk.reply()
            talk.send(b"STARTTLS\r\nRSET\r\nNOOP\r\n")
            started = talk.reply()
            tls = unverified().wrap_socket(talk.sock, server_hostname="mmgun.test")
            tls.sendall(b"EHLO c.test\r\n")
            first = b""
            while b"\r\n" not in first:
                first += tls.recv(65536)
            tls.close()
            return started, first.split(b"\r\n")[0]

        started, first = await self.client(script)
        self.assertEqual(started, b"220 2.0.0 ready to start TLS")
        # Had RSET and NOOP been kept, their "250 2.0.0 OK" would come first.
        self.assertEqual(first, b"250-mmgun.test Hello 127.0.0.1, nice to meet you")

    async def test_connections_per_source_capped(self) -> None:
        """issue 16 item 4: a source over --max-smtp-connections-per-source gets 421 and is closed; another address still gets in."""
        port = self.listen(
            server=self.server(SubmissionSettings(hostname="mmgun.test", max_connections_per_source=3)), interface="0.0.0.0"
        )

        def script() -> tuple[list[bytes | None], bytes | None, bool, bytes | None]:
            kept = [Conversation(port) for _ in range(3)]
            over = Conversation(port, greeting=False)
            refused = over.reply()
            closed = over.closed()
            other = Conversation(port, source="127.0.0.2")
            for talk in [*kept, over, other]:
                talk.close()
            return [t.greeting for t in kept], refused, closed, other.greeting

        greetings, refused, closed, other = await self.client(script)
        self.assertEqual(greetings, [b"220 mmgun.test ESMTP mmgun"] * 3)
        self.assertEqual(refused, b"421 4.7.0 too many connections, try again later")
        self.assertTrue(closed)
        self.assertEqual(other, b"220 mmgun.test ESMTP mmgun")


class ClockTests(SynchronousTestCase):
    """Timed defences, in memory on a Clock: no waiting."""

    def connect(self, **settings: Any) -> tuple[SubmissionProtocol, StringTransportWithDisconnection, Clock]:
        store, _ = sync_store(self)
        clock = Clock()
        front = Frontend(store, lambda: Clients.from_ids([]), clock, hostname="mmgun.test")
        server = SubmissionServer(front.pipeline, SubmissionSettings(hostname="mmgun.test", **settings), clock)
        protocol = server.factory(local=True, tls=None).buildProtocol(IPv4Address("TCP", "192.0.2.7", 4000))
        transport = StringTransportWithDisconnection(peerAddress=IPv4Address("TCP", "192.0.2.7", 4000))
        transport.protocol = protocol
        protocol.makeConnection(transport)
        self.addCleanup(lambda: transport.connected and transport.loseConnection())
        return protocol, transport, clock

    def test_early_talker_is_refused(self) -> None:
        """issue 16 item 4: a client that sends a command before the greeting (pause 1 s) gets 554 and is dropped."""
        protocol, transport, clock = self.connect(greet_pause=1.0)
        clock.advance(0.5)
        self.assertEqual(transport.value(), b"")
        protocol.dataReceived(b"EHLO spammer.test\r\nMAIL FROM:<x@example.com>\r\n")
        self.assertEqual(transport.value(), b"554 5.5.1 protocol error: commands sent before the greeting\r\n")
        self.assertFalse(transport.connected)
        clock.advance(10)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_patient_client_is_greeted(self) -> None:
        """issue 16 item 4: the same client, waiting for the greeting, is served."""
        protocol, transport, clock = self.connect(greet_pause=1.0)
        clock.advance(1.0)
        protocol.dataReceived(b"NOOP\r\n")
        self.assertEqual(transport.value(), b"220 mmgun.test ESMTP mmgun\r\n250 2.0.0 OK\r\n")

    def test_idle_client_is_dropped(self) -> None:
        """issue 16 item 4 (slow clients): silent for --smtp-command-timeout after a command: 421 4.4.2 and closed."""
        protocol, transport, clock = self.connect(command_timeout=60.0)
        clock.advance(59)
        protocol.dataReceived(b"NOOP\r\n")
        clock.advance(59)
        self.assertTrue(transport.connected)
        protocol.dataReceived(b"NOO")  # a partial line does not count as activity
        clock.advance(1)
        self.assertFalse(transport.connected)
        self.assertTrue(transport.value().endswith(b"421 4.4.2 mmgun.test timeout: closing the connection\r\n"))

    def test_slow_data_is_dropped(self) -> None:
        """issue 16 item 4 (slow clients): a DATA trickled a line every 50 s (under the idle timeout) is cut at --smtp-data-timeout."""
        protocol, transport, clock = self.connect(command_timeout=60.0, data_timeout=300.0)
        protocol.client = "acme"  # as if authenticated: only the timing is under test
        protocol.dataReceived(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@another.example>\r\nDATA\r\n")
        self.assertIn(b"354 ", transport.value())
        for _ in range(5):
            clock.advance(50)
            protocol.dataReceived(b"Header: x\r\n")
        self.assertTrue(transport.connected)
        clock.advance(50)
        self.assertFalse(transport.connected)
        self.assertTrue(transport.value().endswith(b"421 4.4.2 the message did not arrive in time; closing the connection\r\n"))
        self.assertEqual(clock.getDelayedCalls(), [])

