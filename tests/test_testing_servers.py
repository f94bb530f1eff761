"""
Tests for L{mmgun.testing}: the fake SMTP and DNS peers, and the e2e stubs.

Behaviour that depends on time runs on a L{Clock} over a L{StringTransport};
wire-level behaviour (TLS, sendmail, real DNS queries) runs on the real
reactor against loopback port 0.
"""

from __future__ import annotations

import email
import os
import shutil
import signal
import sys
import tempfile
from collections import deque
from io import BytesIO
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import ITCPTransport
from twisted.internet.protocol import ProcessProtocol, connectionDone
from twisted.internet.ssl import CertificateOptions
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.mail.smtp import ESMTPSenderFactory
from twisted.names import client, dns, error
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mmgun.testing import (
    SERVFAIL,
    TIMEOUT,
    Mailbox,
    Received,
    ZoneResolver,
    listen_dns,
    parse_zone,
    port_number,
    smtp_server_factory,
)

from .helpers import wait_until

ROOT = Path(__file__).resolve().parent.parent
ZONE_FILE = ROOT / "e2e-tests" / "zone.txt"

DEADLINE = 10.0


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


def scratch_path(case: SynchronousTestCase, name: str) -> str:
    """
    A path inside a fresh temporary folder removed after the test (not
    C{mktemp}, which under pytest writes into the working tree).
    """
    folder = tempfile.mkdtemp(prefix="mmgun-test-")
    case.addCleanup(shutil.rmtree, folder, ignore_errors=True)
    return os.path.join(folder, name)


async def send_with_twisted(
    port: int, mail_from: str, recipients: list[str], message: bytes, *, tls: bool
) -> None:
    """
    Send one message with Twisted's own ESMTP client (STARTTLS required, no
    certificate verification, if C{tls}) and wait until it has disconnected.
    """
    sent: Deferred[object] = Deferred()
    factory = ESMTPSenderFactory(
        None,
        None,
        mail_from,
        recipients,
        BytesIO(message),
        sent,
        contextFactory=CertificateOptions() if tls else None,
        requireAuthentication=False,
        requireTransportSecurity=tls,
    )
    connector = _reactor().connectTCP("127.0.0.1", port, factory)
    await sent
    await wait_until(
        lambda: connector.state == "disconnected",
        "the client to disconnect",
        deadline=DEADLINE,
        interval=0.01,
    )


class ScriptClient(LineOnlyReceiver):
    """
    A tiny SMTP client: send lines, await whole replies.
    """

    transport: ITCPTransport  # connected by TCP4ClientEndpoint

    def __init__(self) -> None:
        self.replies: deque[tuple[int, list[bytes]]] = deque()
        self._partial: list[bytes] = []
        self._waiting: deque[Deferred[tuple[int, list[bytes]]]] = deque()
        self.lost: Deferred[None] = Deferred()

    def lineReceived(self, line: bytes) -> None:
        self._partial.append(line[4:])
        if line[3:4] == b"-":
            return
        reply = (int(line[:3]), self._partial)
        self._partial = []
        if self._waiting:
            self._waiting.popleft().callback(reply)
        else:
            self.replies.append(reply)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost.callback(None)

    def reply(self) -> Deferred[tuple[int, list[bytes]]]:
        if self.replies:
            return defer.succeed(self.replies.popleft())
        d: Deferred[tuple[int, list[bytes]]] = Deferred()
        self._waiting.append(d)
        return d

    async def command(self, line: bytes) -> tuple[int, list[bytes]]:
        self.sendLine(line)
        return await self.reply()


class RealSMTPTests(TestCase):
    """
    The SMTP server on the real reactor and a loopback port.
    """

    def serve(self, **kwargs: Any) -> tuple[Mailbox, int]:
        mailbox = Mailbox()
        self.factory = smtp_server_factory(_reactor(), mailbox, **kwargs)
        port = _reactor().listenTCP(0, self.factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.addCleanup(self._server_idle)
        return mailbox, port.getHost().port

    async def _server_idle(self) -> None:
        connections = self.factory.server.connections
        self.factory.server.abort_connections()
        await wait_until(lambda: not connections, "server connections to close", deadline=DEADLINE, interval=0.01)

    async def connect(self, port: int) -> ScriptClient:
        endpoint = TCP4ClientEndpoint(_reactor(), "127.0.0.1", port)
        client = await connectProtocol(endpoint, ScriptClient())
        self.addCleanup(self._close, client)
        return client

    async def _close(self, client: ScriptClient) -> None:
        if not client.lost.called:
            client.transport.abortConnection()
        await client.lost

    async def open_session(self, port: int) -> ScriptClient:
        client = await self.connect(port)
        code, _ = await client.reply()
        self.assertEqual(code, 220)
        code, _ = await client.command(b"EHLO client.test")
        self.assertEqual(code, 250)
        return client

    async def transaction(
        self,
        client: ScriptClient,
        rcpt: bytes,
        body: bytes = b"Subject: t\r\n\r\nhi\r\n",
    ) -> tuple[int, list[bytes]]:
        """
        MAIL, one RCPT, then DATA if the RCPT was accepted.  Returns the RCPT
        reply if it was refused, else the reply to the end of data.
        """
        self.assertEqual((await client.command(b"MAIL FROM:<s@src.test>"))[0], 250)
        reply = await client.command(b"RCPT TO:<" + rcpt + b">")
        if reply[0] != 250:
            self.assertEqual((await client.command(b"RSET"))[0], 250)
            return reply
        self.assertEqual((await client.command(b"DATA"))[0], 354)
        client.transport.write(body + b".\r\n")
        return await client.reply()

    async def quit(self, client: ScriptClient) -> None:
        self.assertEqual((await client.command(b"QUIT"))[0], 221)
        await client.lost

    async def test_twisted_client_message_lands_in_mailbox(self) -> None:
        """
        A message sent with Twisted's ESMTP client over STARTTLS is recorded
        with its envelope, its data and tls=True.
        """
        mailbox, port = self.serve()
        await send_with_twisted(
            port,
            "sender@src.test",
            ["one@alpha.test", "Two@beta.test"],
            # Twisted's client turns LF into CRLF on the wire.
            b"Subject: hello\n\nbody\n",
            tls=True,
        )
        [received] = await mailbox.wait_for(1)
        self.assertEqual(received.mail_from, "sender@src.test")
        self.assertEqual(received.recipients, ("one@alpha.test", "Two@beta.test"))
        self.assertEqual(received.data, b"Subject: hello\r\n\r\nbody\r\n")
        self.assertTrue(received.tls)

    async def test_raw_keeps_dot_stuffing(self) -> None:
        """
        C{data} is un-dot-stuffed; C{raw} is the wire bytes up to and
        including the terminating dot line.
        """
        mailbox, port = self.serve(tls=False)
        client = await self.open_session(port)
        body = b"Subject: dots\r\n\r\n..leading\r\n.\r\n"
        reply = await self.transaction(
            client, b"r@alpha.test", b"Subject: dots\r\n\r\n..leading\r\n"
        )
        self.assertEqual(reply[0], 250)
        await self.quit(client)
        self.assertEqual(
            mailbox.messages,
            [
                Received(
                    mail_from="s@src.test",
                    recipients=("r@alpha.test",),
                    data=b"Subject: dots\r\n\r\n.leading\r\n",
                    raw=body,
                    tls=False,
                )
            ],
        )

    async def test_maildir_file_has_envelope_headers(self) -> None:
        """
        With a maildir, each message becomes one C{.eml} file whose
        X-Envelope headers carry the envelope, followed by the data.
        """
        maildir = scratch_path(self, "mail")
        mailbox, port = self.serve(tls=False, maildir=maildir)
        client = await self.open_session(port)
        self.assertEqual((await client.command(b"MAIL FROM:<s@src.test>"))[0], 250)
        self.assertEqual((await client.command(b"RCPT TO:<a@alpha.test>"))[0], 250)
        self.assertEqual((await client.command(b"RCPT TO:<b@beta.test>"))[0], 250)
        self.assertEqual((await client.command(b"DATA"))[0], 354)
        client.transport.write(b"Subject: file\r\n\r\nbody\r\n.\r\n")
        self.assertEqual((await client.reply())[0], 250)
        await self.quit(client)

        [name] = [n for n in os.listdir(maildir) if n.endswith(".eml")]
        content = Path(maildir, name).read_bytes()
        message = email.message_from_bytes(content)
        self.assertEqual(message["X-Envelope-From"], "<s@src.test>")
        self.assertEqual(
            message.get_all("X-Envelope-To"), ["<a@alpha.test>", "<b@beta.test>"]
        )
        self.assertTrue(content.endswith(b"\r\n" + mailbox.messages[0].data))
        self.assertEqual(os.listdir(os.path.join(maildir, ".tmp")), [])

    async def test_tempfail_counts_across_connections(self) -> None:
        """
        C{tempfail-2@} gets C{451} twice, on separate connections, then C{250}.
        """
        mailbox, port = self.serve(tls=False)
        replies = []
        for _ in range(3):
            client = await self.open_session(port)
            replies.append(await self.transaction(client, b"tempfail-2@alpha.test"))
            await self.quit(client)
        self.assertEqual(
            [(code, text[-1]) for code, text in replies[:2]],
            [(451, b"4.3.0 try again later")] * 2,
        )
        self.assertEqual(replies[2][0], 250)
        self.assertEqual(len(mailbox), 1)

    async def test_reject(self) -> None:
        """
        C{reject@} gets C{550 5.1.1} every time.
        """
        mailbox, port = self.serve(tls=False)
        client = await self.open_session(port)
        first = await self.transaction(client, b"Reject@alpha.test")
        second = await self.transaction(client, b"reject+x@alpha.test")
        await self.quit(client)
        self.assertEqual(first, (550, [b"5.1.1 no such user"]))
        self.assertEqual(second, first)
        self.assertEqual(len(mailbox), 0)

    async def test_drop_closes_during_data_once(self) -> None:
        """
        The first DATA for C{drop@} ends with the connection closed and no
        reply; the next one is accepted.
        """
        mailbox, port = self.serve(tls=False)
        client = await self.open_session(port)
        self.assertEqual((await client.command(b"MAIL FROM:<s@src.test>"))[0], 250)
        self.assertEqual((await client.command(b"RCPT TO:<drop@alpha.test>"))[0], 250)
        self.assertEqual((await client.command(b"DATA"))[0], 354)
        client.transport.write(b"Subject: x\r\n\r\nx\r\n.\r\n")
        await client.lost
        self.assertEqual(list(client.replies), [])
        self.assertEqual(len(mailbox), 0)

        client = await self.open_session(port)
        self.assertEqual((await self.transaction(client, b"drop@alpha.test"))[0], 250)
        await self.quit(client)
        self.assertEqual(len(mailbox), 1)

    async def test_starttls_offered(self) -> None:
        """
        EHLO lists STARTTLS (and PIPELINING) when tls is on.
        """
        _, port = self.serve()
        client = await self.connect(port)
        await client.reply()
        code, lines = await client.command(b"EHLO client.test")
        await self.quit(client)
        self.assertEqual(code, 250)
        self.assertIn(b"STARTTLS", lines)
        self.assertIn(b"PIPELINING", lines)

    async def test_starttls_not_offered_without_tls(self) -> None:
        """
        With tls=False there is no STARTTLS.
        """
        _, port = self.serve(tls=False)
        client = await self.open_session(port)
        code, lines = await client.command(b"EHLO client.test")
        await self.quit(client)
        self.assertNotIn(b"STARTTLS", lines)

    async def test_greeting_code_refuses_connection(self) -> None:
        """
        greeting_code=421 greets with 421 and hangs up.
        """
        _, port = self.serve(greeting_code=421)
        client = await self.connect(port)
        reply = await client.reply()
        await client.lost
        self.assertEqual(reply, (421, [b"4.3.2 service not available"]))


class MemorySMTPTests(SynchronousTestCase):
    """
    The SMTP server on a L{Clock} and a L{StringTransport}.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.mailbox = Mailbox()
        self.factory = smtp_server_factory(
            self.clock, self.mailbox, tls=False, slow_seconds=30
        )
        self.protocol = self.factory.buildProtocol(None)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)
        self.addCleanup(self.protocol.connectionLost, Failure(ConnectionDone()))

    def replies(self) -> list[bytes]:
        lines = self.transport.value().split(b"\r\n")[:-1]
        self.transport.clear()
        return [line[:3] for line in lines if line[3:4] == b" "]

    def send(self, *lines: bytes) -> None:
        self.protocol.dataReceived(b"".join(line + b"\r\n" for line in lines))

    def test_slow_rcpt_waits_on_the_clock(self) -> None:
        """
        The reply to RCPT for C{slow@} comes after slow_seconds, and
        pipelined commands wait for it, answered in order.
        """
        self.send(b"EHLO c.test")
        self.replies()
        self.send(
            b"MAIL FROM:<s@src.test>",
            b"RCPT TO:<slow@a.test>",
            b"RCPT TO:<b@a.test>",
            b"DATA",
        )
        self.assertEqual(self.replies(), [b"250"])
        self.clock.advance(29)
        self.assertEqual(self.replies(), [])
        self.clock.advance(1)
        self.assertEqual(self.replies(), [b"250", b"250", b"354"])

    def test_slowdata_delays_the_final_reply(self) -> None:
        """
        For C{slowdata@} the reply to the end of data (and the recording)
        waits slow_seconds.
        """
        self.send(
            b"HELO c.test", b"MAIL FROM:<>", b"RCPT TO:<slowdata@a.test>", b"DATA"
        )
        self.replies()
        self.send(b"Subject: s", b"", b"x", b".")
        self.assertEqual((self.replies(), len(self.mailbox)), ([], 0))
        self.clock.advance(30)
        self.assertEqual(self.replies(), [b"250"])
        self.assertEqual(self.mailbox.messages[0].mail_from, "")

    def test_pending_delay_cancelled_on_disconnect(self) -> None:
        """
        Losing the connection cancels a scripted delay.
        """
        self.send(b"HELO c.test", b"MAIL FROM:<s@src.test>", b"RCPT TO:<slow@a.test>")
        self.assertEqual(
            len(self.clock.getDelayedCalls()), 2
        )  # the delay, the idle timeout
        self.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_idle_timeout_uses_injected_clock(self) -> None:
        """
        An idle connection gets 421 and is closed after the timeout, on the
        injected clock.
        """
        self.replies()
        self.clock.advance(600)
        self.assertEqual(self.replies(), [b"421"])
        self.assertTrue(self.transport.disconnecting)

    def test_datareject(self) -> None:
        """
        C{datareject@} is refused after DATA with 554.
        """
        self.send(
            b"HELO c.test",
            b"MAIL FROM:<s@x.test>",
            b"RCPT TO:<datareject@a.test>",
            b"DATA",
        )
        self.replies()
        self.send(b"x", b".")
        self.assertEqual(self.replies(), [b"554"])
        self.assertEqual(len(self.mailbox), 0)

    def test_maildir_names_files_by_clock_and_counter(self) -> None:
        """
        Maildir files are named C{<unix-nanos>-<counter>.eml} from the
        injected clock, and nothing is left in C{.tmp}.
        """
        maildir = scratch_path(self, "mail")
        factory = smtp_server_factory(self.clock, Mailbox(), tls=False, maildir=maildir)
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(StringTransport())
        self.clock.advance(1.5)
        for _ in range(2):
            protocol.dataReceived(
                b"HELO c\r\nMAIL FROM:<s@x.test>\r\nRCPT TO:<r@a.test>\r\n"
                b"DATA\r\nx\r\n.\r\n"
            )
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(
            sorted(os.listdir(maildir)),
            [".tmp", "1500000000-0.eml", "1500000000-1.eml"],
        )
        self.assertEqual(os.listdir(os.path.join(maildir, ".tmp")), [])

    def test_wait_for(self) -> None:
        """
        L{Mailbox.wait_for} fires once enough messages have arrived.
        """
        d = self.mailbox.wait_for(1)
        self.assertNoResult(d)
        self.send(
            b"HELO c.test",
            b"MAIL FROM:<s@x.test>",
            b"RCPT TO:<r@a.test>",
            b"DATA",
            b"x",
            b".",
        )
        self.assertEqual([m.data for m in self.successResultOf(d)], [b"x\r\n"])


ZONE: dict[str, Any] = {
    "example.test": [dns.Record_MX(10, b"mx1.example.test", ttl=60)],
    "mx1.example.test": [
        dns.Record_A("127.0.0.2", ttl=60),
        dns.Record_AAAA("::1", ttl=60),
    ],
    "nullmx.test": [dns.Record_MX(0, b"", ttl=60)],
    "alias.test": [dns.Record_CNAME(b"mx1.example.test", ttl=60)],
    "broken.test": SERVFAIL,
    "silent.test": TIMEOUT,
}


class DNSServerTests(TestCase):
    """
    The DNS server on real loopback UDP and TCP, queried with Twisted's
    own resolver.
    """

    def setUp(self) -> None:
        udp, tcp = listen_dns(_reactor(), ZONE)
        self.addCleanup(udp.stopListening)
        self.addCleanup(tcp.stopListening)
        self.port = port_number(udp)
        self.resolver = client.Resolver(
            servers=[("127.0.0.1", self.port)], reactor=_reactor()
        )
        # The TCP port keeps its factory; IListeningPort does not declare it.
        self.addCleanup(self._close_tcp, tcp.factory)  # type: ignore[attr-defined]

    async def _close_tcp(self, server: Any) -> None:
        # client.Resolver declares "connections = None" in its class body; __init__ sets a list.
        for protocol in self.resolver.connections:  # type: ignore[attr-defined]
            protocol.transport.loseConnection()
        await wait_until(
            lambda: not self.resolver.connections and not server.connections,
            "DNS TCP connections to close",
            deadline=DEADLINE,
            interval=0.01,
        )

    def test_same_port_number(self) -> None:
        """
        UDP and TCP listen on the same port.
        """
        udp, tcp = listen_dns(_reactor(), ZONE)
        self.addCleanup(udp.stopListening)
        self.addCleanup(tcp.stopListening)
        self.assertEqual(port_number(udp), port_number(tcp))

    async def test_mx(self) -> None:
        answers, _, _ = await self.resolver.lookupMailExchange("example.test")
        self.assertEqual(
            [(a.payload.preference, a.payload.name.name) for a in answers],
            [(10, b"mx1.example.test")],
        )

    async def test_a(self) -> None:
        answers, _, _ = await self.resolver.lookupAddress("MX1.example.test")
        self.assertEqual([a.payload.dottedQuad() for a in answers], ["127.0.0.2"])

    async def test_aaaa(self) -> None:
        answers, _, _ = await self.resolver.lookupIPV6Address("mx1.example.test")
        self.assertEqual([a.payload for a in answers], [dns.Record_AAAA("::1", ttl=60)])

    async def test_null_mx(self) -> None:
        answers, _, _ = await self.resolver.lookupMailExchange("nullmx.test")
        self.assertEqual(
            [(a.payload.preference, a.payload.name.name) for a in answers], [(0, b"")]
        )

    async def test_cname_is_followed(self) -> None:
        answers, _, _ = await self.resolver.lookupAddress("alias.test")
        self.assertEqual([a.type for a in answers], [dns.CNAME, dns.A])

    async def test_nxdomain(self) -> None:
        with self.assertRaises(error.DNSNameError):
            await self.resolver.lookupMailExchange("missing.test")

    async def test_no_data(self) -> None:
        """
        A name that exists without records of the asked type is NOERROR with
        no answers, not NXDOMAIN.
        """
        answers, _, _ = await self.resolver.lookupMailExchange("mx1.example.test")
        self.assertEqual(answers, [])

    async def test_servfail(self) -> None:
        with self.assertRaises(error.DNSServerError):
            await self.resolver.lookupMailExchange("broken.test")

    async def test_tcp(self) -> None:
        message = await self.resolver.queryTCP([dns.Query(b"example.test", dns.MX)])
        self.assertEqual(
            [a.payload.name.name for a in message.answers], [b"mx1.example.test"]
        )


class ZoneTests(SynchronousTestCase):
    """
    L{parse_zone} and the in-memory L{ZoneResolver}.
    """

    def test_e2e_zone(self) -> None:
        """
        The end-to-end zone file parses into the domains the e2e tests use.
        """
        records = parse_zone(ZONE_FILE.read_text())

        def mx(name: str) -> list[tuple[int, bytes]]:
            value = records[name]
            assert not isinstance(value, str)
            return sorted(
                (r.preference, r.name.name) for r in value if isinstance(r, dns.Record_MX)
            )

        def a(name: str) -> list[str]:
            value = records[name]
            assert not isinstance(value, str)
            return [r.dottedQuad() for r in value if isinstance(r, dns.Record_A)]

        self.assertEqual(mx("alpha.test"), [(10, b"mx.alpha.test")])
        self.assertEqual(a("mx.alpha.test"), ["127.0.0.2"])
        self.assertEqual(a("mx.beta.test"), ["127.0.0.3"])
        [(_, dead), (_, backup)] = mx("gamma.test")
        self.assertEqual(
            (a(dead.decode()), a(backup.decode())), (["127.0.0.9"], ["127.0.0.2"])
        )
        self.assertEqual(mx("nullmx.test"), [(0, b"")])
        self.assertEqual((mx("amx.test"), a("amx.test")), ([], ["127.0.0.3"]))
        self.assertEqual(records["servfail.test"], SERVFAIL)

    def test_parse_zone_formats(self) -> None:
        records = parse_zone(
            "# comment\n"
            "\n"
            "Host.Test. 30 AAAA ::1   # trailing\n"
            "host.test 30 CNAME Other.Test.\n"
        )
        value = records["host.test"]
        assert not isinstance(value, str)
        [aaaa, cname] = value
        self.assertEqual((aaaa.TYPE, aaaa.ttl), (dns.AAAA, 30))
        assert isinstance(cname, dns.Record_CNAME)
        # Twisted declares SimpleRecord.name as a class attribute "= None"; __init__ sets a Name.
        self.assertEqual(cname.name.name, b"other.test")  # type: ignore[attr-defined]

    def test_parse_zone_rejects_bad_lines(self) -> None:
        for text in [
            "a.test 60 A 999.1.1.1",
            "a.test 60 MX 10",
            "a.test 60 SRV x",
            "a.test",
        ]:
            with self.assertRaises(ValueError) as raised:
                parse_zone("# ok\n" + text)
            self.assertIn("zone line 2", str(raised.exception))

    def test_zone_resolver_in_memory(self) -> None:
        """
        L{ZoneResolver} answers without a socket.
        """
        resolver = ZoneResolver(ZONE)
        answers, _, _ = self.successResultOf(
            resolver.lookupMailExchange("example.test")
        )
        self.assertEqual(answers[0].payload.name.name, b"mx1.example.test")
        self.failureResultOf(
            resolver.lookupAddress("missing.test"), dns.AuthoritativeDomainError
        )
        self.assertNoResult(resolver.lookupAddress("silent.test"))
        # An empty non-terminal exists: no data rather than NXDOMAIN.
        self.assertEqual(
            self.successResultOf(resolver.lookupAddress("test")), ([], [], [])
        )


class _Process(ProcessProtocol):
    def __init__(self) -> None:
        self.output = b""
        self.ended: Deferred[int | None] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(reason.value.exitCode)


class StubScriptTests(TestCase):
    """
    The e2e scripts start, serve, and stop cleanly on SIGTERM.
    """

    async def start(self, script: str, *args: str) -> tuple[_Process, int]:
        port_file = scratch_path(self, "port")
        process = _Process()
        transport = _reactor().spawnProcess(
            process,
            sys.executable,
            [
                sys.executable,
                str(ROOT / "e2e-tests" / script),
                *args,
                "--port-file",
                port_file,
            ],
            env=dict(os.environ),
        )

        async def stop() -> None:
            if not process.ended.called:
                transport.signalProcess("KILL")
                await process.ended

        self.addCleanup(stop)
        await wait_until(
            lambda: os.path.exists(port_file) or process.ended.called,
            f"{script} to start",
            deadline=DEADLINE,
            interval=0.01,
        )
        self.assertFalse(process.ended.called, process.output.decode())
        self.transport = transport
        return process, int(Path(port_file).read_text())

    async def terminate(self, process: _Process) -> None:
        self.transport.signalProcess(signal.SIGTERM)
        exit_code = await process.ended
        self.assertEqual(exit_code, 0, process.output.decode())

    async def test_dnsstub(self) -> None:
        process, port = await self.start(
            "dnsstub.py", "--listen", "127.0.0.1:0", "--zone", str(ZONE_FILE)
        )
        resolver = client.Resolver(servers=[("127.0.0.1", port)], reactor=_reactor())
        answers, _, _ = await resolver.lookupMailExchange("alpha.test")
        self.assertEqual([a.payload.name.name for a in answers], [b"mx.alpha.test"])
        await self.terminate(process)

    async def test_smtpstub(self) -> None:
        maildir = scratch_path(self, "mail")
        process, port = await self.start(
            "smtpstub.py", "--listen", "127.0.0.1:0", "--maildir", maildir, "--no-tls"
        )
        await send_with_twisted(
            port,
            "s@src.test",
            ["r@alpha.test"],
            b"Subject: e2e\n\nsecret body\n",
            tls=False,
        )
        await wait_until(
            lambda: any(n.endswith(".eml") for n in os.listdir(maildir)),
            "a message file",
            deadline=DEADLINE,
            interval=0.01,
        )
        await self.terminate(process)
        self.assertIn(b"accepted", process.output)
        self.assertNotIn(b"secret body", process.output)
