"""
SMTP submission under attack (issue 16, "Hostile input"): each test performs the attack —
over a raw loopback socket, or in memory on a Clock where time matters — and checks what
the server answered and that nothing was queued that should not be.
"""

from __future__ import annotations

import socket
from typing import Any, cast

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport, StringTransportWithDisconnection
from twisted.trial.unittest import SynchronousTestCase

from mmgun.auth import key_hash, new_key
from mmgun.clients import Clients
from mmgun.submission import SubmissionProtocol, SubmissionServer, SubmissionSettings
from mmgun.web.app import Frontend

from .helpers import result, sync_store
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

    async def test_starttls_forgets_auth(self) -> None:
        """issue 16 review item 9 (RFC 3207 4.2): AUTH given in the clear on a loopback listener is forgotten at STARTTLS: MAIL is then 530."""
        port = self.listen(local=True, tls=True)

        def script() -> tuple[bytes | None, list[bytes]]:
            talk = Conversation(port)
            talk.send(b"EHLO c.test\r\n" + auth_plain(self.key) + b"STARTTLS\r\n")
            replies = talk.replies(3)
            assert replies[1] == b"235 2.7.0 authentication successful", replies
            tls = unverified().wrap_socket(talk.sock, server_hostname="mmgun.test")
            tls.sendall(b"EHLO c.test\r\nMAIL FROM:<ada@example.com>\r\nQUIT\r\n")
            data = b""
            while True:
                chunk = tls.recv(65536)
                if not chunk:
                    break
                data += chunk
            tls.close()
            return replies[2], data.split(b"\r\n")

        started, lines = await self.client(script)
        self.assertEqual(started, b"220 2.0.0 ready to start TLS")
        self.assertIn(b"250 AUTH PLAIN LOGIN", lines)  # offered again: nobody is authenticated
        self.assertIn(b"530 5.7.0 authentication required", lines)

    async def test_client_that_never_reads_cannot_fill_memory(self) -> None:
        """
        issue 16 review item 2: a client floods EHLO (a 140-octet reply for 8 octets; the junk
        limit raised for the test) and never reads: the server stops reading once its
        transport's buffer is full, so what it holds for that client stays bounded.
        """
        from twisted.internet import reactor

        from .helpers import wait_until

        server = self.server(SubmissionSettings(hostname="mmgun.test", max_junk_commands=10**9))
        port = self.listen(server=server)

        def script() -> int:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", port))
            sock.settimeout(2)
            self.flooder = sock
            sent = 0
            flood = b"EHLO a\r\n" * 8192
            try:
                while sent < 512 * 1024:
                    sock.sendall(flood)
                    sent += len(flood)
            except TimeoutError:
                pass
            return sent

        sent = await self.client(script)
        self.addCleanup(self.flooder.close)
        (protocol,) = server.connections
        transport: Any = protocol.transport

        def held() -> int:
            return len(transport.dataBuffer) - transport.offset + transport._tempDataLen

        # Either the server stopped reading from the client, or it holds over 1 MiB of replies.
        await wait_until(lambda: transport not in reactor.getReaders() or held() > 1 << 20, "the server to stop reading")
        self.assertLess(held(), 256 * 1024, f"client sent {sent} octets")

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
        key_id, self.key = new_key()
        result(self, store.add_client("acme", 1.0))
        result(self, store.add_key("acme", key_id, key_hash(self.key), 1.0))
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
        protocol.dataReceived(b"EHLO c.test\r\n" + auth_plain(self.key))
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



# -- issue 16 review fixes: in memory on a Clock, over a real SQLite store ---------------


class HeldCommits:
    """A store whose add_submission waits until the test releases it (a commit still pending); all else is the real store's."""

    def __init__(self, case: SynchronousTestCase, store: Any) -> None:
        self._case = case
        self._store = store
        self.held: list[tuple[Deferred[str], Any]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def add_submission(self, submission: Any) -> Deferred[str]:
        d: Deferred[str] = Deferred()
        self.held.append((d, submission))
        return d

    def release(self) -> None:
        d, submission = self.held.pop(0)
        d.callback(result(self._case, self._store.add_submission(submission)))


class MemoryCase(SynchronousTestCase):
    """Client ``acme`` and its key in a real SQLite store; connections on StringTransports; time on a Clock."""

    def setUp(self) -> None:
        self.store, self.path = sync_store(self)
        self.clock = Clock()
        self.key_id, self.key = new_key()
        result(self, self.store.add_client("acme", 1.0))
        result(self, self.store.add_key("acme", self.key_id, key_hash(self.key), 1.0))
        self.smtp: SubmissionServer | None = None

    def server(self, store: Any = None, **settings: Any) -> SubmissionServer:
        # The frontend's limits as the Config gives both (mmgun.service.make_service).
        shared = {name: settings[name] for name in ("max_message_size", "max_recipients") if name in settings}
        front = Frontend(store if store is not None else self.store, lambda: Clients.from_ids([]), self.clock, hostname="mmgun.test", **shared)
        self.smtp = SubmissionServer(front.pipeline, SubmissionSettings(hostname="mmgun.test", **settings), self.clock)
        return self.smtp

    def connect(self, *, host: str = "192.0.2.7", authenticated: bool = False) -> tuple[Any, StringTransport]:
        """A connection (greeting read); with ``authenticated``, after EHLO and AUTH PLAIN."""
        server = self.smtp if self.smtp is not None else self.server()
        address = IPv4Address("TCP", host, 4000)
        protocol = server.factory(local=True, tls=None).buildProtocol(address)
        transport = StringTransport(peerAddress=address)
        protocol.makeConnection(transport)
        if authenticated:
            protocol.dataReceived(b"EHLO c.test\r\n" + auth_plain(self.key))
            self.assertTrue(transport.value().endswith(b"235 2.7.0 authentication successful\r\n"), transport.value())
        transport.clear()
        return protocol, transport

    def replies(self, transport: StringTransport) -> list[bytes]:
        """The reply lines written since the last call."""
        lines = transport.value().split(b"\r\n")[:-1]
        transport.clear()
        return lines

    def submissions(self) -> int:
        import sqlite3

        conn = sqlite3.connect(self.path)
        try:
            return int(conn.execute("SELECT count(*) FROM submissions").fetchone()[0])
        finally:
            conn.close()


ENVELOPE = b"MAIL FROM:<ada@example.com>\r\nRCPT TO:<bob@another.example>\r\nDATA\r\n"


class DataMemoryTests(MemoryCase):
    def test_data_is_held_in_about_its_size(self) -> None:
        """issue 16 review item 1: 512 KiB of 4-octet lines in DATA cost about 512 KiB of memory while they arrive (were ~11 times that)."""
        import tracemalloc

        protocol, transport = self.connect(authenticated=True)
        protocol.dataReceived(ENVELOPE + MESSAGE)
        size = 512 * 1024
        chunk = b"ab\r\n" * 16384  # 64 KiB, as a socket read brings them
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)
        before, _ = tracemalloc.get_traced_memory()
        for _ in range(size // len(chunk)):
            protocol.dataReceived(chunk)
        held, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        self.assertLess(held - before, 1.5 * size)
        # At the peak, besides: one read (64 KiB) split into its 16,384 lines.
        self.assertLess(peak - before, 1.5 * size + 1024 * 1024)
        protocol.dataReceived(b".\r\n")
        self.assertEqual(self.replies(transport)[-1][:17], b"250 2.0.0 queued ")

    def test_data_in_flight_budget(self) -> None:
        """
        issue 16 review item 1: with 4 KiB of DATA in flight allowed server-wide, a message
        that would pass it is refused 452 4.3.1 at the dot (nothing of it kept), a DATA whose
        declared SIZE does not fit is 452 4.3.1 at once; when the messages in flight are
        queued, the budget is free again.
        """
        self.server(max_data_in_flight=4096)
        first, first_t = self.connect(authenticated=True)
        second, second_t = self.connect(host="192.0.2.8", authenticated=True)
        third, third_t = self.connect(host="192.0.2.9", authenticated=True)
        line = b"x" * 998 + b"\r\n"
        first.dataReceived(ENVELOPE + MESSAGE + line * 2)
        second.dataReceived(ENVELOPE + MESSAGE + line)
        self.assertEqual(self.replies(second_t)[-1][:3], b"354")
        second.dataReceived(line + b".\r\n")  # would pass the 4 KiB
        self.assertEqual(self.replies(second_t)[-1], b"452 4.3.1 too many messages arriving at once; try again later")
        first.dataReceived(line)
        sized = b"MAIL FROM:<ada@example.com> SIZE=1000\r\nRCPT TO:<bob@another.example>\r\nDATA\r\n"
        third.dataReceived(sized)
        self.assertEqual(self.replies(third_t)[-1], b"452 4.3.1 too many messages arriving at once; try again later")
        first.dataReceived(b".\r\n")
        self.assertEqual(self.replies(first_t)[-1][:17], b"250 2.0.0 queued ")
        self.assertEqual(cast(SubmissionServer, self.smtp).data_in_flight, 0)
        third.dataReceived(sized + MESSAGE + b".\r\n")
        self.assertEqual(self.replies(third_t)[-1][:17], b"250 2.0.0 queued ")
        self.assertEqual(self.submissions(), 2)

    def test_lost_connection_gives_its_data_budget_back(self) -> None:
        """issue 16 review item 1: a client that disconnects in the middle of DATA does not keep its share of the budget."""
        self.server(max_data_in_flight=4096)
        first, _ = self.connect(authenticated=True)
        first.dataReceived(ENVELOPE + (b"x" * 998 + b"\r\n") * 4)
        first.connectionLost(None)
        second, second_t = self.connect(host="192.0.2.8", authenticated=True)
        second.dataReceived(ENVELOPE + MESSAGE + b".\r\n")
        self.assertEqual(self.replies(second_t)[-1][:17], b"250 2.0.0 queued ")


class BackPressureTests(MemoryCase):
    def test_no_reply_written_while_the_transport_is_full(self) -> None:
        """
        issue 16 review item 2: while the transport says its buffer is full (pauseProducing
        on the protocol, its registered producer), pipelined commands wait unanswered and
        reading stops; when it drains, the replies come in order.
        """
        protocol, transport = self.connect()
        self.assertIs(transport.producer, protocol)
        self.assertTrue(transport.streaming)
        protocol.pauseProducing()
        protocol.dataReceived(b"NOOP\r\nEHLO c.test\r\nRSET\r\n")
        self.assertEqual(transport.value(), b"")
        self.assertEqual(transport.producerState, "paused")
        protocol.resumeProducing()
        self.assertEqual(transport.producerState, "producing")
        replies = self.replies(transport)
        self.assertEqual(replies[0], b"250 2.0.0 OK")
        self.assertEqual(replies[-1], b"250 2.0.0 OK")
        self.assertEqual(len(replies), 9)  # NOOP, EHLO's 7 lines (SMTPUTF8 among them since issue 18), RSET

    def test_junk_commands_limited(self) -> None:
        """issue 16 review item 2: past 100 NOOP/RSET/EHLO/HELO/VRFY/HELP since the last message queued, 421 4.7.0 and dropped."""
        protocol, transport = self.connect(authenticated=True)  # its EHLO counts: 1
        protocol.dataReceived(b"NOOP\r\nRSET\r\nHELP\r\n" * 32 + b"VRFY x\r\nHELO c.test\r\nNOOP\r\n")  # 100 in all
        self.assertFalse(transport.disconnecting)
        protocol.dataReceived(ENVELOPE + MESSAGE + b".\r\n")  # a message queued starts the count again
        self.assertEqual(self.replies(transport)[-1][:17], b"250 2.0.0 queued ")
        protocol.dataReceived(b"NOOP\r\n" * 100)
        self.assertFalse(transport.disconnecting)
        protocol.dataReceived(b"NOOP\r\nNOOP\r\n")
        self.assertEqual(self.replies(transport)[-1], b"421 4.7.0 too many junk commands (NOOP, RSET, EHLO, HELO, VRFY, HELP); closing the connection")
        self.assertTrue(transport.disconnecting)

    def test_dropped_connection_is_aborted_if_it_does_not_close(self) -> None:
        """
        issue 16 review item 2: after a drop (here the error limit), a peer that never reads
        cannot hold the connection open: it is aborted 5 s later, and the idle timer does
        not fire again with a second 421.
        """
        protocol, transport = self.connect()
        protocol.dataReceived(b"BOGUS\r\n" * 25)
        self.assertEqual(self.replies(transport)[-1], b"421 4.7.0 too many errors; closing the connection")
        self.assertTrue(transport.disconnecting)
        self.assertIsNone(transport.producer)  # else loseConnection waits for the producer forever
        self.clock.advance(4.9)
        self.assertFalse(transport.disconnected)
        self.clock.advance(0.1)
        self.assertTrue(transport.disconnected)  # abortConnection
        self.clock.advance(3600)
        self.assertEqual(transport.value(), b"")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_idle_timeout_fires_once(self) -> None:
        """issue 16 review item 2: the idle timeout of a connection that cannot close says 421 once, then aborts it."""
        self.server(command_timeout=60.0)
        protocol, transport = self.connect()
        self.clock.advance(60)
        self.assertEqual(self.replies(transport), [b"421 4.4.2 mmgun.test timeout: closing the connection"])
        for _ in range(5):
            self.clock.advance(60)
        self.assertEqual(transport.value(), b"")
        self.assertTrue(transport.disconnected)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class SessionLimitTests(MemoryCase):
    def test_revoked_key_stops_an_open_session(self) -> None:
        """issue 16 review item 3: a key revoked after AUTH is refused at the next MAIL (after the 2 s key cache): 421 4.7.0, dropped."""
        protocol, transport = self.connect(authenticated=True)
        protocol.dataReceived(ENVELOPE + MESSAGE + b".\r\n")
        self.assertEqual(self.replies(transport)[-1][:17], b"250 2.0.0 queued ")
        result(self, self.store.revoke_key(self.key_id, 2.0))
        self.clock.advance(3)
        protocol.dataReceived(ENVELOPE + MESSAGE + b".\r\n")
        self.assertEqual(self.replies(transport), [b"421 4.7.0 the API key of this session was revoked; closing the connection"])
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.submissions(), 1)

    def test_transactions_per_connection_capped(self) -> None:
        """issue 16 review item 3: past --smtp-max-transactions MAIL commands on one connection, 421 4.7.0 and dropped."""
        self.server(max_transactions=2)
        protocol, transport = self.connect(authenticated=True)
        for _ in range(2):
            protocol.dataReceived(ENVELOPE + MESSAGE + b".\r\n")
            self.assertEqual(self.replies(transport)[-1][:17], b"250 2.0.0 queued ")
        protocol.dataReceived(ENVELOPE)
        self.assertEqual(self.replies(transport), [b"421 4.7.0 too many messages on one connection (at most 2); reconnect to send more"])
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.submissions(), 2)


class DescriptorBudgetTests(SynchronousTestCase):
    def config(self, *args: str) -> Any:
        from mmgun.config import Options

        options = Options({})
        options.parseOptions(list(args))
        return options.config

    def test_smtp_connections_counted_in_the_open_files_limit(self) -> None:
        """
        issue 16 review item 4: with 1,024 descriptors, SMTP submission connections and HTTP
        connections together (with the reserve) fit under the limit; with plenty, neither is lowered.
        """
        from mmgun.service import FD_RESERVE, http_connection_cap, smtp_connection_cap

        config = self.config("--role", "frontend", "--smtp-listen", "tcp:587")
        smtp, http = smtp_connection_cap(config, 1024), http_connection_cap(config, 1024)
        self.assertLessEqual(smtp + http + FD_RESERVE, 1024)
        self.assertGreater(smtp, 100)
        self.assertGreater(http, 100)
        self.assertEqual(smtp_connection_cap(config, 1 << 20), 1000)
        self.assertEqual(http_connection_cap(config, 1 << 20), 4000)
        without = self.config("--role", "frontend")
        self.assertEqual(http_connection_cap(without, 1024), 1024 - FD_RESERVE)

    def test_make_service_gives_the_lowered_cap_to_the_server(self) -> None:
        """issue 16 review item 4: the running submission server uses the cap smtp_connection_cap allows."""
        import os
        import resource

        from twisted.application.service import MultiService
        from twisted.internet.testing import MemoryReactorClock

        from mmgun.service import make_service, smtp_connection_cap
        from mmgun.submission import SubmissionService

        folder = self.mktemp()
        os.makedirs(folder)
        clients = os.path.join(folder, "clients")
        open(clients, "w").close()
        config = self.config("--role", "frontend", "--database", os.path.join(folder, "db"), "--clients", clients, "--smtp-listen", "tcp:0:interface=127.0.0.1")
        service = cast(MultiService, make_service(config, MemoryReactorClock()))  # never started
        (submission,) = [s for s in service if isinstance(s, SubmissionService)]
        self.assertEqual(submission.server.settings.max_connections, smtp_connection_cap(config, resource.getrlimit(resource.RLIMIT_NOFILE)[0]))
        store = next(s.store for s in service if hasattr(s, "store"))
        result(self, store.close())


class FramingTests(MemoryCase):
    def test_1000_octet_line_with_cr_and_lf_apart(self) -> None:
        """issue 16 review item 5: a legal 1000-octet line (998 + CRLF) whose CR and LF come in separate reads is accepted."""
        protocol, transport = self.connect(authenticated=True)
        protocol.dataReceived(ENVELOPE + MESSAGE + b"x" * 998 + b"\r")
        protocol.dataReceived(b"\n.\r\n")
        self.assertEqual(self.replies(transport)[-1][:17], b"250 2.0.0 queued ")

    def test_line_length_boundary(self) -> None:
        """issue 16 review item 11: 998 octets before the CRLF are accepted, 999 refused — in a command and in DATA, however it is split."""
        protocol, transport = self.connect(authenticated=True)
        noop = b"NOOP " + b"x" * 993
        protocol.dataReceived(noop + b"\r\n" + noop + b"x\r\n")
        self.assertEqual(self.replies(transport), [b"250 2.0.0 OK", b"500 5.5.2 line longer than 1000 octets"])
        for split in (997, 998, 999, 1000):
            protocol.dataReceived(ENVELOPE + MESSAGE)
            line = b"y" * 999 + b"\r\n"
            protocol.dataReceived(line[:split])
            protocol.dataReceived(line[split:] + b".\r\n")
            self.assertEqual(self.replies(transport)[-1], b"500 5.5.2 a line of the message is longer than 1000 octets", f"split at {split}")

    def test_overlong_line_cancels_auth(self) -> None:
        """issue 16 review item 6: an overlong line as an AUTH response cancels the exchange (501); the next line is a command."""
        protocol, transport = self.connect()
        protocol.dataReceived(b"EHLO c.test\r\nAUTH LOGIN\r\n")
        self.assertEqual(self.replies(transport)[-1], b"334 VXNlcm5hbWU6")
        protocol.dataReceived(b"A" * 1200 + b"\r\nNOOP\r\n")
        self.assertEqual(self.replies(transport), [b"501 5.5.2 line longer than 1000 octets: authentication cancelled", b"250 2.0.0 OK"])

    def test_endless_line_is_not_buffered(self) -> None:
        """issue 16 item 4 (review item 11): a command line that never ends is not kept as it comes — checked before its CRLF arrives."""
        protocol, transport = self.connect()
        for _ in range(64):
            protocol.dataReceived(b"A" * 65536)
            self.assertLessEqual(len(protocol._buffer), 1)
        self.assertEqual(transport.value(), b"")
        protocol.dataReceived(b"\r\nNOOP\r\n")
        self.assertEqual(self.replies(transport), [b"500 5.5.2 line longer than 1000 octets", b"250 2.0.0 OK"])


class CommandTests(MemoryCase):
    def test_unknown_verbs_are_500_and_counted(self) -> None:
        """issue 16 review item 7: twisted's do_UNKNOWN (and any other do_ method) is unreachable: 500 5.5.2, counted toward the error limit."""
        protocol, transport = self.connect()
        protocol.dataReceived(b"UNKNOWN\r\nunknown x\r\nBDAT 10\r\nETRN x\r\nTURN\r\n")
        self.assertEqual(self.replies(transport), [b"500 5.5.2 command not recognized"] * 5)
        protocol.dataReceived(b"UNKNOWN\r\n" * 15)
        self.assertEqual(self.replies(transport)[-1], b"421 4.7.0 too many errors; closing the connection")

    def test_refused_data_resets_the_transaction(self) -> None:
        """issue 16 review item 8: DATA refused for want of recipients (554) ends the transaction: a later DATA is 503, a new MAIL is accepted."""
        protocol, transport = self.connect(authenticated=True)
        protocol.dataReceived(b"MAIL FROM:<ada@example.com>\r\nRCPT TO:<bad address>\r\nDATA\r\nDATA\r\nMAIL FROM:<ada@example.com>\r\n")
        replies = self.replies(transport)
        self.assertEqual([r[:9] for r in replies], [b"250 2.1.0", b"553 5.1.3", b"554 5.5.1", b"503 5.5.1", b"250 2.1.0"])

    def test_auth_edge_cases(self) -> None:
        """
        issue 16 review item 11: AUTH PLAIN = (an empty response) and garbage base64 are
        501, a * cancels (501), none of them authenticates; AUTH after AUTH is 503.
        """
        protocol, transport = self.connect()
        protocol.dataReceived(b"EHLO c.test\r\n")
        transport.clear()
        protocol.dataReceived(b"AUTH PLAIN =\r\nAUTH PLAIN\r\n*\r\nAUTH LOGIN\r\n!!!not base64\r\nAUTH PLAIN Zm9v\xff\r\nMAIL FROM:<a@example.com>\r\n")
        self.assertEqual(
            self.replies(transport),
            [
                b"501 5.5.2 cannot decode the AUTH response",
                b"334 ",
                b"501 5.0.0 authentication cancelled",
                b"334 VXNlcm5hbWU6",
                b"501 5.5.2 cannot decode the AUTH response",
                b"501 5.5.2 cannot decode the AUTH response",
                b"530 5.7.0 authentication required",
            ],
        )
        protocol.dataReceived(auth_plain(self.key) + auth_plain(self.key))
        self.assertEqual(self.replies(transport), [b"235 2.7.0 authentication successful", b"503 5.5.1 already authenticated"])

    def test_three_failed_auths_drop_the_connection(self) -> None:
        """issue 16 review item 11: the third failed AUTH on one connection is answered, then 421 4.7.0 and dropped."""
        protocol, transport = self.connect()
        protocol.dataReceived(b"EHLO c.test\r\n" + auth_plain("wrong") * 3 + b"NOOP\r\n")
        replies = self.replies(transport)
        self.assertEqual(
            replies[-4:],
            [b"535 5.7.8 authentication credentials invalid"] * 3 + [b"421 4.7.0 too many failed authentication attempts; closing the connection"],
        )
        self.assertTrue(transport.disconnecting)

    def test_global_connection_cap(self) -> None:
        """issue 16 review item 11: past --max-smtp-connections (all sources), 421 4.7.0 and closed; one closing lets the next in."""
        self.server(max_connections=2)
        first, _ = self.connect(host="192.0.2.1")
        self.connect(host="192.0.2.2")
        address = IPv4Address("TCP", "192.0.2.3", 4000)
        refused = cast(SubmissionServer, self.smtp).factory(local=True, tls=None).buildProtocol(address)
        transport = StringTransport(peerAddress=address)
        refused.makeConnection(transport)
        self.assertEqual(transport.value(), b"421 4.7.0 too many connections, try again later\r\n")
        self.assertTrue(transport.disconnecting)
        first.connectionLost(None)
        _, admitted = self.connect(host="192.0.2.3")
        self.assertFalse(admitted.disconnecting)


class CommitOrderTests(MemoryCase):
    def test_replies_wait_for_a_pending_commit(self) -> None:
        """
        issue 16 review item 11: while the store has not committed a message, its 250 is not
        written, a pipelined NOOP is not answered and reading is paused; when the commit
        lands, 250 queued then the NOOP's 250, in that order, and reading resumes.
        """
        store = HeldCommits(self, self.store)
        self.server(store)
        protocol, transport = self.connect(authenticated=True)
        protocol.dataReceived(ENVELOPE + MESSAGE + b".\r\nNOOP\r\n")
        self.assertEqual([r[:3] for r in self.replies(transport)], [b"250", b"250", b"354"])
        self.assertEqual(len(store.held), 1)
        self.assertEqual(transport.producerState, "paused")
        protocol.dataReceived(b"RSET\r\n")  # what a read already under way still brings
        self.assertEqual(transport.value(), b"")
        store.release()
        replies = self.replies(transport)
        self.assertEqual(replies[0][:20], b"250 2.0.0 queued as ")
        self.assertEqual(replies[1:], [b"250 2.0.0 OK", b"250 2.0.0 OK"])
        self.assertEqual(transport.producerState, "producing")
        self.assertEqual(self.submissions(), 1)


class MessageSizeTextTests(MemoryCase):
    def test_552_names_the_added_fields(self) -> None:
        """issue 16 review item 10: a message within the limit that the Received field pushes over it: 552 5.3.4 says so (no DKIM blamed)."""
        self.server(max_message_size=len(MESSAGE) + 20)
        protocol, transport = self.connect(authenticated=True)
        protocol.dataReceived(ENVELOPE + MESSAGE + b".\r\n")
        reply = self.replies(transport)[-1]
        self.assertEqual(reply[:10], b"552 5.3.4 ")
        self.assertNotIn(b"DKIM", reply)
        self.assertIn(b"Received", reply)
        self.assertEqual(self.submissions(), 0)
