"""
Webhook delivery, the HTTP side (issue 14, webhooks): Mailgun's signature
checked by an independent implementation and by the Mailgun SDK's verifier;
fault receivers (500, redirects, a hang, a reset, a slow body, a refused
connection); server-side request forgery through webhook URLs; concurrency
bounds; HTTPS verification.  Real twisted.web receivers on 127.0.0.1 where
the network is at stake; a MemoryReactorClock where the point is that no
connection is even attempted.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any, cast

from cryptography.hazmat.primitives.serialization import Encoding
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHostnameResolver, IHostResolution, IResolutionReceiver
from twisted.internet.protocol import Factory, Protocol, ServerFactory
from twisted.internet.ssl import Certificate
from twisted.internet.task import LoopingCall
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import ILogObserver, formatEvent, globalLogPublisher
from twisted.names import dns
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from mmgun.testing.ports import port_number
from mmgun.testing.smtpserver import self_signed_context
from mmgun.webhooks import (
    RESPONSE_LIMIT,
    RETRY_SCHEDULE,
    Delivery,
    FairSlots,
    WebhookClient,
    WebhookURLError,
    parse_url,
    redact_url,
    retry_delay,
    sign_payload,
    signed_body,
    url_credentials,
)

from .helpers import wait_until

KEY = "key-3ax6xnjp29jd6fds4gc373sgvjxteol0"
EVENT = {
    "event": "delivered",
    "id": "G9Bn5sl1TC6nu79C8C0bwg",
    "recipient": "alice@example.com",
    "timestamp": 1521472262.9,
}
PUBLIC = "93.184.216.34"  # a public address: nothing in these tests ever connects to it


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


def mailgun_verify(signing_key: str, body: bytes) -> bool:
    """
    Mailgun's documented rule, written from its "Securing Webhooks" page and
    nothing of mmgun's: concatenate timestamp and token, HMAC-SHA256 with the
    signing key, compare the hex digest with the signature.
    """
    document = json.loads(body)
    sig = document["signature"]
    digest = hmac.new(
        key=signing_key.encode(),
        msg=(sig["timestamp"] + sig["token"]).encode(),
        digestmod=hashlib.sha256,
    ).hexdigest()
    return hmac.compare_digest(digest, sig["signature"])


def post(client: WebhookClient, url: str, body: bytes = b"{}") -> Deferred[Delivery]:
    return Deferred.fromCoroutine(client.post(url, body))


@implementer(IHostResolution)
class _Resolution:
    def __init__(self, name: str) -> None:
        self.name = name

    def cancel(self) -> None:
        pass


@implementer(IHostnameResolver)
class ScriptedResolver:
    """Answers each name from a script: a list of answers per name, one used up per lookup (the last repeats)."""

    def __init__(self, script: dict[str, list[list[str]]]) -> None:
        self.script = script
        self.asked: list[str] = []

    def resolveHostName(
        self,
        resolutionReceiver: IResolutionReceiver,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Any = None,
        transportSemantics: str = "TCP",
    ) -> IHostResolution:
        self.asked.append(hostName)
        resolution = _Resolution(hostName)
        resolutionReceiver.resolutionBegan(resolution)
        answers = self.script.get(hostName, [[]])
        answer = answers.pop(0) if len(answers) > 1 else answers[0]
        for address in answer:
            kind = IPv6Address if ":" in address else IPv4Address
            resolutionReceiver.addressResolved(kind("TCP", address, portNumber))
        resolutionReceiver.resolutionComplete()
        return resolution


# -- receivers -------------------------------------------------------------------


class Recorder(Resource):
    """
    A webhook receiver that records what it gets.  C{behaviour} decides the
    answer: "ok", "fail" (500), "redirect" (302 to C{location}), "moved"
    (301), "hold" (no answer until released), "trickle" (200 and a body
    dribbling out a byte at a time, never ending), "big" (200 and a body
    over the client's limit), "cookie" (200 setting a cookie).
    """

    isLeaf = True

    def __init__(self, behaviour: str = "ok", location: bytes = b"") -> None:
        super().__init__()
        self.behaviour = behaviour
        self.location = location
        self.requests: list[tuple[bytes, dict[bytes, list[bytes]], bytes]] = []
        self.held: list[Request] = []
        self.most_held = 0

    def render_POST(self, request: Request) -> bytes | int:
        assert request.content is not None
        headers = {name.lower(): values for name, values in request.requestHeaders.getAllRawHeaders()}
        self.requests.append((request.uri, headers, request.content.read()))
        if self.behaviour == "fail":
            request.setResponseCode(500)
            return b"internal error"
        if self.behaviour in ("redirect", "moved"):
            request.setResponseCode(302 if self.behaviour == "redirect" else 301)
            request.setHeader(b"location", self.location)
            return b""
        if self.behaviour == "hold":
            self.held.append(request)
            self.most_held = max(self.most_held, len(self.held))
            request.notifyFinish().addBoth(lambda _: self.held.remove(request) if request in self.held else None)
            return NOT_DONE_YET
        if self.behaviour == "trickle":
            request.setHeader(b"content-length", b"1000000")
            loop = LoopingCall(request.write, b"x")
            loop.clock = _reactor()
            loop.start(0.02)
            request.notifyFinish().addBoth(lambda _: loop.stop())
            return NOT_DONE_YET
        if self.behaviour == "big":
            return b"y" * (RESPONSE_LIMIT * 16)
        if self.behaviour == "cookie":
            request.addCookie(b"session", b"receiver-secret", path=b"/")
        return b"thanks"

    def release(self) -> None:
        request = self.held.pop(0)
        request.write(b"ok")
        request.finish()


class CountingSite(Site):
    """A Site that counts and keeps its connections, so a test can see them and close them."""

    def __init__(self, resource: Resource) -> None:
        super().__init__(resource)
        self.connections: list[Any] = []
        self.opened = 0

    def buildProtocol(self, addr: Any) -> Any:
        protocol = super().buildProtocol(addr)
        self.opened += 1
        self.connections.append(protocol)
        return protocol


def _connected(protocol: Any) -> bool:
    """Whether a Site's connection is open (its protocol wraps the HTTP channel, which has the transport)."""
    transport = protocol._channel.transport
    return transport is not None and bool(transport.connected)


class Counter(ServerFactory):
    """A listener that counts connections and closes each at once."""

    def __init__(self) -> None:
        self.opened = 0

    def buildProtocol(self, addr: Any) -> Protocol:
        self.opened += 1
        return Protocol()


class _Resetter(Protocol):
    """Resets the connection (RST) as soon as the request starts to arrive."""

    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.abortConnection()  # type: ignore[attr-defined]  # ITCPTransport


class _Cutter(Protocol):
    """
    Answers with a 200 promising 100 bytes, sends 9 and closes the connection.
    (Closes rather than resets: a reset right after the write would make the
    client's kernel discard the unread answer, and the test would only
    repeat test_reset_before_response.)
    """

    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part")
        self.transport.loseConnection()


class Receivers:
    """Real listeners on 127.0.0.1 for one trial TestCase; the cleanup closes them and waits."""

    def __init__(self, case: TestCase) -> None:
        self.case = case
        self.sites: list[CountingSite] = []

    def web(self, resource: Resource, *, tls: Any = None) -> tuple[CountingSite, int]:
        site = CountingSite(resource)
        reactor = _reactor()
        if tls is None:
            port = reactor.listenTCP(0, site, interface="127.0.0.1")
        else:
            port = reactor.listenSSL(0, site, tls, interface="127.0.0.1")
        self.sites.append(site)
        self.case.addCleanup(self._close, site, port)
        return site, port_number(port)

    def web_on(self, resource: Resource, port_number_: int) -> CountingSite:
        """A receiver on a given port of 127.0.0.1 (e.g. one that refused connections until now)."""
        site = CountingSite(resource)
        port = _reactor().listenTCP(port_number_, site, interface="127.0.0.1")
        self.sites.append(site)
        self.case.addCleanup(self._close, site, port)
        return site

    def plain(self, factory: Factory) -> int:
        port = _reactor().listenTCP(0, factory, interface="127.0.0.1")
        self.case.addCleanup(port.stopListening)
        return port_number(port)

    def closed_port(self) -> int:
        """A port nothing listens on (bound, then released)."""
        port = _reactor().listenTCP(0, ServerFactory(), interface="127.0.0.1")
        number = port_number(port)
        port.stopListening()
        return number

    def _close(self, site: CountingSite, port: Any) -> Deferred[None]:
        async def close() -> None:
            await port.stopListening()
            for protocol in site.connections:
                if _connected(protocol):
                    protocol._channel.transport.abortConnection()
            await wait_until(
                lambda: not any(map(_connected, site.connections)),
                "receiver connections to close",
                deadline=5,
            )

        return Deferred.fromCoroutine(close())


def make_client(case: TestCase, **kwargs: Any) -> WebhookClient:
    kwargs.setdefault("allow_private", True)
    client = WebhookClient(_reactor(), **kwargs)
    case.addCleanup(client.close)
    return client


# -- the payload and the schedule --------------------------------------------------


class PayloadTests(SynchronousTestCase):
    def test_signature_follows_mailgun_rule(self) -> None:
        """
        issue 14 webhooks item 1: the body is Mailgun's {"signature",
        "event-data"} document, and an independent implementation of
        Mailgun's rule accepts its signature; the same check with another key
        refuses it (so the check can fail).
        """
        body = sign_payload(KEY, EVENT, timestamp=1700000000, token="ab" * 25)
        document = json.loads(body)
        self.assertEqual(document["event-data"], EVENT)
        self.assertEqual(document["signature"]["timestamp"], "1700000000")
        self.assertEqual(document["signature"]["token"], "ab" * 25)
        self.assertTrue(mailgun_verify(KEY, body))
        self.assertFalse(mailgun_verify(KEY + "x", body))

    def test_signed_body_new_token_each_time(self) -> None:
        """
        issue 14 webhooks item 1: each body gets a fresh 50-hex-character
        token and the injected wall clock's time (receivers refuse reused
        tokens and stale timestamps).
        """
        first = json.loads(signed_body(KEY, EVENT, lambda: 1700000123.9))["signature"]
        second = json.loads(signed_body(KEY, EVENT, lambda: 1700000123.9))["signature"]
        self.assertEqual(first["timestamp"], "1700000123")
        self.assertNotEqual(first["token"], second["token"])
        for sig in (first, second):
            self.assertRegex(sig["token"], r"^[0-9a-f]{50}$")

    def test_bad_token_refused(self) -> None:
        """issue 14 webhooks item 1: a token that is not 50 hex characters is a programming error, not a payload."""
        with self.assertRaises(ValueError):
            sign_payload(KEY, EVENT, timestamp=1, token="short")

    def test_retry_schedule_is_mailguns(self) -> None:
        """
        issue 14 webhooks item 4: after the 1st..6th failure wait 5 min, 10 min,
        15 min, 1 h, 2 h, 4 h (Mailgun's documented schedule); after the 7th,
        give up; the waits stay within Mailgun's 8 hours.
        """
        self.assertEqual([retry_delay(n) for n in range(1, 8)], [300.0, 600.0, 900.0, 3600.0, 7200.0, 14400.0, None])
        self.assertLessEqual(sum(RETRY_SCHEDULE), 8 * 3600)
        self.assertIsNone(retry_delay(100))
        with self.assertRaises(ValueError):
            retry_delay(0)

    def test_urls_checked(self) -> None:
        """
        issue 14 webhooks item 2: only http and https URLs with a host, and
        a user name only with its password; the receiver named in logs
        carries no credentials, path or query (where a receiver's own secret
        may be); listings show the password as ***.
        """
        self.assertEqual(str(parse_url("https://Hooks.Example.com/mail?secret=s3")), "https://hooks.example.com:443")
        self.assertEqual(str(parse_url("http://[::1]:8080/x")), "http://[::1]:8080")
        # user:password (Anymail's documented Mailgun setup) is allowed, and kept out of the loggable form.
        with_password = "https://anymail:s3cr%40t@hooks.example.com/anymail/mailgun/tracking/"
        self.assertEqual(str(parse_url(with_password)), "https://hooks.example.com:443")
        self.assertEqual(url_credentials(with_password), ("anymail", "s3cr@t"))
        self.assertEqual(redact_url(with_password), "https://anymail:***@hooks.example.com/anymail/mailgun/tracking/")
        self.assertIsNone(url_credentials("https://hooks.example.com/"))
        for bad in (
            "ftp://hooks.example.com/",
            "file:///etc/passwd",
            "gopher://127.0.0.1:25/",
            "https://user@hooks.example.com/",
            "https://user:pa@ss@hooks.example.com/",
            "https://:pass@hooks.example.com/",
            "https://hooks.example.com@127.0.0.1/",
            "http:///nohost",
            "http://hooks.example.com:0/",
            "http://hooks example.com/",
            "http://hooks.example.com/\r\nX-Injected: 1",
            "http://ex%41mple.com/",
            "hooks.example.com/path",
        ):
            with self.assertRaises(WebhookURLError, msg=bad):
                parse_url(bad)


# -- SSRF, without a network ------------------------------------------------------


class AddressPolicyTests(SynchronousTestCase):
    """What the client connects to, seen from a MemoryReactorClock: every attempt is in tcpClients."""

    def client(self, reactor: MemoryReactorClock, resolver: Any = None, **kwargs: Any) -> WebhookClient:
        kwargs.setdefault("allow_private", False)
        client = WebhookClient(reactor, resolver=resolver or ScriptedResolver({}), timeout=5.0, **kwargs)
        return client

    def test_private_literals_refused_without_connecting(self) -> None:
        """
        issue 14 webhooks item 2: URLs at loopback, private, link-local (the
        cloud metadata address), CGNAT, multicast, unspecified, reserved and
        IPv4-mapped IPv6 addresses end in a refusal that says why, and no
        connection is even attempted.
        """
        reactor = MemoryReactorClock()
        client = self.client(reactor)
        cases = {
            "http://127.0.0.1:8080/hook": "127.0.0.1 (loopback)",
            "http://10.0.0.1/hook": "10.0.0.1 (private)",
            "http://192.168.1.1/hook": "192.168.1.1 (private)",
            "http://169.254.169.254/latest/meta-data/": "169.254.169.254 (link-local)",
            "http://100.64.0.1/": "100.64.0.1 (shared (CGNAT))",
            "http://224.0.0.1/": "224.0.0.1 (multicast)",
            "http://0.0.0.0:80/": "0.0.0.0 (unspecified)",
            "http://240.0.0.1/": "240.0.0.1 (reserved)",
            "http://[::1]:8080/": "::1 (loopback)",
            "http://[fd00::1]/": "fd00::1 (private)",
            "http://[fe80::1]/": "fe80::1 (link-local)",
            "http://[::ffff:127.0.0.1]/": "::ffff:127.0.0.1 (loopback, embedded in IPv6)",
            "https://[::ffff:10.0.0.1]/": "::ffff:10.0.0.1 (private, embedded in IPv6)",
        }
        for url, why in cases.items():
            delivery = self.successResultOf(post(client, url))
            self.assertEqual((delivery.ok, delivery.status), (False, None), url)
            self.assertIn(why, delivery.reason, url)
            self.assertIn("see --webhook-allow-private", delivery.reason)
        self.assertEqual(reactor.tcpClients, [])

    def test_name_resolving_to_loopback_refused(self) -> None:
        """
        issue 14 webhooks item 2: a DNS name whose only address is 127.0.0.1
        is refused, naming the name and the address, without a connection.
        """
        reactor = MemoryReactorClock()
        resolver = ScriptedResolver({"evil.example": [["127.0.0.1"]]})
        delivery = self.successResultOf(post(self.client(reactor, resolver), "https://evil.example/hook"))
        self.assertFalse(delivery.ok)
        self.assertIn("evil.example: 127.0.0.1 (loopback)", delivery.reason)
        self.assertEqual(reactor.tcpClients, [])

    def test_connects_to_checked_address_only(self) -> None:
        """
        issue 14 webhooks item 2 (DNS rebinding): the name is looked up once;
        the client connects to the address it checked, not to the name, so a
        DNS server that answers 127.0.0.1 to a second lookup is never asked.
        Of a mixed answer, only the public address is used.
        """
        reactor = MemoryReactorClock()
        resolver = ScriptedResolver({"rebind.example": [["127.0.0.1", PUBLIC], ["127.0.0.1"]]})
        d = post(self.client(reactor, resolver), "http://rebind.example:8080/hook")
        self.assertEqual([(host, port) for host, port, *_ in reactor.tcpClients], [(PUBLIC, 8080)])
        self.assertEqual(resolver.asked, ["rebind.example"])
        reactor.advance(5.0)
        self.assertIn("within 5s", self.successResultOf(d).reason)

    def test_allow_private_lifts_refusal(self) -> None:
        """issue 14 webhooks item 2: with allow_private (--webhook-allow-private) a loopback receiver is connected to."""
        reactor = MemoryReactorClock()
        resolver = ScriptedResolver({"local.example": [["127.0.0.1"]]})
        client = self.client(reactor, resolver, allow_private=True)
        d = post(client, "http://local.example:8080/hook")
        self.assertEqual([(host, port) for host, port, *_ in reactor.tcpClients], [("127.0.0.1", 8080)])
        reactor.advance(5.0)
        self.assertFalse(self.successResultOf(d).ok)

    def test_concurrency_bounded_per_receiver_and_overall(self) -> None:
        """
        issue 14 webhooks item 3: with max_per_receiver=2 five POSTs to one
        receiver open two connections; another receiver gets its own two,
        within max_concurrent=3 overall; the waiting POSTs go out as the
        first ones end (here: time out), each once.
        """
        reactor = MemoryReactorClock()
        client = self.client(reactor, max_per_receiver=2, max_concurrent=3)
        first = [post(client, f"http://{PUBLIC}/hook/{n}") for n in range(5)]
        self.assertEqual(len(reactor.tcpClients), 2)
        self.assertEqual(client.in_flight(f"http://{PUBLIC}/"), 2)
        other = [post(client, "http://93.184.216.35/hook") for _ in range(2)]
        self.assertEqual([host for host, *_ in reactor.tcpClients], [PUBLIC, PUBLIC, "93.184.216.35"])
        for _ in range(10):
            reactor.advance(5.0)
        results = [self.successResultOf(d) for d in first + other]
        self.assertTrue(all(not r.ok and "within 5s" in r.reason for r in results))
        self.assertEqual(len(reactor.tcpClients), 7)


# -- real receivers ----------------------------------------------------------------


class DeliveryTests(TestCase):
    """Against real twisted.web receivers on 127.0.0.1, on the real reactor."""

    def setUp(self) -> None:
        self.receivers = Receivers(self)

    async def test_signed_post_verified_by_receiver(self) -> None:
        """
        issue 14 webhooks items 1 and 5: a real receiver gets a JSON POST
        whose signature both the independent implementation of Mailgun's rule
        and the Mailgun SDK's own verifier (mailgun.security, with its
        15-minute freshness check) accept, and whose event-data is the event.
        """
        from mailgun.security import SecurityGuard

        recorder = Recorder()
        _, port = self.receivers.web(recorder)
        client = make_client(self)
        delivery = await post(
            client, f"http://127.0.0.1:{port}/hooks/mail?x=1", signed_body(KEY, EVENT, _reactor().seconds)
        )
        self.assertEqual((delivery.ok, delivery.status, delivery.reason), (True, 200, "HTTP 200"))
        [(uri, headers, body)] = recorder.requests
        self.assertEqual(uri, b"/hooks/mail?x=1")
        self.assertEqual(headers[b"content-type"], [b"application/json"])
        self.assertTrue(mailgun_verify(KEY, body))
        sig = json.loads(body)["signature"]
        self.assertTrue(SecurityGuard.verify_webhook(KEY, sig["token"], sig["timestamp"], sig["signature"]))
        self.assertFalse(SecurityGuard.verify_webhook("other-key", sig["token"], sig["timestamp"], sig["signature"]))
        self.assertEqual(json.loads(body)["event-data"], EVENT)

    async def test_password_in_url_sent_as_basic_auth(self) -> None:
        """
        issue 14 webhooks (lead's change): a URL with user:password (Anymail's
        Mailgun setup) reaches the receiver with an Authorization: Basic
        header of the decoded pair, and neither the pair nor the URL's path
        appears in the logged reason; a URL without one sends no header.
        """
        recorder = Recorder()
        _, port = self.receivers.web(recorder)
        client = make_client(self)
        delivery = await post(client, f"http://anymail:s3cr%40t@127.0.0.1:{port}/anymail/mailgun/tracking/")
        self.assertEqual(delivery.reason, "HTTP 200")
        self.assertTrue((await post(client, f"http://127.0.0.1:{port}/plain")).ok)
        [(uri, headers, _), (_, plain, _)] = recorder.requests
        self.assertEqual(uri, b"/anymail/mailgun/tracking/")
        self.assertEqual(headers[b"authorization"], [b"Basic " + base64.b64encode(b"anymail:s3cr@t")])
        self.assertNotIn(b"authorization", plain)

    async def test_server_error_is_failure(self) -> None:
        """issue 14 webhooks item 5: a 500 is a failure with its status; the body sent is not in the reason."""
        _, port = self.receivers.web(Recorder("fail"))
        delivery = await post(make_client(self), f"http://127.0.0.1:{port}/", b'{"secret": "payload"}')
        self.assertEqual((delivery.ok, delivery.status, delivery.reason), (False, 500, "HTTP 500"))

    async def test_redirects_not_followed(self) -> None:
        """
        issue 14 webhooks item 5: a 302 or 301 is a failure and the client
        does not follow it: the redirect target (here a loopback listener, as
        an attacker would choose) gets no connection.
        """
        target = Counter()
        target_port = self.receivers.plain(target)
        for behaviour, code in (("redirect", 302), ("moved", 301)):
            recorder = Recorder(behaviour, location=f"http://127.0.0.1:{target_port}/internal".encode())
            _, port = self.receivers.web(recorder)
            delivery = await post(make_client(self), f"http://127.0.0.1:{port}/")
            self.assertEqual((delivery.ok, delivery.status), (False, code))
            self.assertIn("redirects are not followed", delivery.reason)
            self.assertEqual(len(recorder.requests), 1)
        self.assertEqual(target.opened, 0)

    async def test_hanging_receiver_times_out(self) -> None:
        """
        issue 14 webhooks item 5: a receiver that never answers costs the
        timeout (0.5 s here) and no more: the POST fails as timed out and the
        connection is closed.
        """
        recorder = Recorder("hold")
        site, port = self.receivers.web(recorder)
        reactor = _reactor()
        started = reactor.seconds()
        delivery = await post(make_client(self, timeout=0.5), f"http://127.0.0.1:{port}/")
        self.assertEqual((delivery.ok, delivery.status), (False, None))
        self.assertEqual(delivery.reason, "no complete response within 0.5s")
        self.assertLess(reactor.seconds() - started, 5.0)
        await wait_until(lambda: not _connected(site.connections[0]), "the receiver to see the connection closed")

    async def test_slow_body_times_out(self) -> None:
        """
        issue 14 webhooks item 3: the deadline covers the whole response, not
        only its headers: a 200 whose body dribbles out a byte every 20 ms
        (never ending) fails at 0.5 s and the connection is closed.
        """
        site, port = self.receivers.web(Recorder("trickle"))
        delivery = await post(make_client(self, timeout=0.5), f"http://127.0.0.1:{port}/")
        self.assertEqual((delivery.ok, delivery.reason), (False, "no complete response within 0.5s"))
        await wait_until(lambda: not _connected(site.connections[0]), "the receiver to see the connection closed")

    async def test_reset_before_response(self) -> None:
        """issue 14 webhooks item 5: a receiver that resets the connection on the request is a failure."""
        port = self.receivers.plain(Factory.forProtocol(_Resetter))
        delivery = await post(make_client(self), f"http://127.0.0.1:{port}/")
        self.assertEqual((delivery.ok, delivery.status), (False, None))
        self.assertEqual(delivery.reason, "the connection closed before a response")

    async def test_cut_mid_response(self) -> None:
        """
        issue 14 webhooks item 5: a 200 whose connection is cut in the middle
        of its body is not a delivery (the event will be sent again: at least
        once).
        """
        port = self.receivers.plain(Factory.forProtocol(_Cutter))
        delivery = await post(make_client(self), f"http://127.0.0.1:{port}/")
        self.assertEqual((delivery.ok, delivery.status), (False, 200))
        self.assertEqual(delivery.reason, "HTTP 200, then the connection closed during the response")

    async def test_connection_refused(self) -> None:
        """issue 14 webhooks item 5: nothing listening is "connection refused"."""
        port = self.receivers.closed_port()
        delivery = await post(make_client(self), f"http://127.0.0.1:{port}/")
        self.assertEqual((delivery.ok, delivery.reason), (False, "connection refused"))

    async def test_big_response_body_dropped(self) -> None:
        """
        issue 14 webhooks item 3: a 200 with a 1 MiB body is a delivery, but
        the client stops reading after 64 KiB and closes the connection.
        """
        site, port = self.receivers.web(Recorder("big"))
        delivery = await post(make_client(self), f"http://127.0.0.1:{port}/")
        self.assertEqual((delivery.ok, delivery.status), (True, 200))
        await wait_until(lambda: not _connected(site.connections[0]), "the receiver to see the connection closed")

    async def test_connection_reused_and_no_cookies(self) -> None:
        """
        issue 14 webhooks item 3: a receiver gets three POSTs over one
        persistent connection; a cookie it sets is not sent back.
        """
        recorder = Recorder("cookie")
        site, port = self.receivers.web(recorder)
        client = make_client(self)
        for _ in range(3):
            self.assertTrue((await post(client, f"http://127.0.0.1:{port}/")).ok)
        self.assertEqual(site.opened, 1)
        self.assertEqual(len(recorder.requests), 3)
        self.assertTrue(all(b"cookie" not in headers for _, headers, _ in recorder.requests))

    async def test_at_most_two_in_flight(self) -> None:
        """
        issue 14 webhooks item 3: with max_per_receiver=2 and a receiver that
        holds every request until released, six POSTs reach it at most two
        at a time, and all six are delivered as it lets them go.
        """
        recorder = Recorder("hold")
        site, port = self.receivers.web(recorder)
        client = make_client(self, max_per_receiver=2)
        posts = [post(client, f"http://127.0.0.1:{port}/{n}") for n in range(6)]
        for left in range(6, 0, -1):
            # Two held while at least two are left: had the bound failed, more would be there by now.
            share = min(2, left)
            await wait_until(lambda: len(recorder.held) >= share, "the receiver to hold its share")  # noqa: B023
            recorder.release()
        results = [await d for d in posts]
        self.assertTrue(all(r.ok for r in results))
        self.assertEqual(recorder.most_held, 2)
        self.assertLessEqual(site.opened, 2)

    async def test_name_resolving_to_loopback_reaches_no_listener(self) -> None:
        """
        issue 14 webhooks items 2 and 5: a DNS name answering 127.0.0.1, and
        127.0.0.1 itself, are refused and the listener there sees no
        connection; with allow_private the same URLs reach it.
        """
        recorder = Recorder()
        site, port = self.receivers.web(recorder)
        resolver = ScriptedResolver({"hooks.rebind.example": [["127.0.0.1"]]})
        urls = [f"http://hooks.rebind.example:{port}/", f"http://127.0.0.1:{port}/"]
        strict = make_client(self, allow_private=False, resolver=resolver)
        for url in urls:
            delivery = await post(strict, url)
            self.assertFalse(delivery.ok)
            self.assertIn("127.0.0.1 (loopback)", delivery.reason)
        self.assertEqual((site.opened, recorder.requests), (0, []))
        lenient = make_client(self, allow_private=True, resolver=resolver)
        for url in urls:
            self.assertTrue((await post(lenient, url)).ok)
        self.assertEqual(len(recorder.requests), 2)

    async def test_https_verified(self) -> None:
        """
        issue 14 webhooks items 2 and 5: an HTTPS receiver with a self-signed
        certificate for "localhost" is refused without a trust root that
        holds it, reached with one, and refused (certificate for another
        name) when the URL names it by address instead.
        """
        context = self_signed_context("localhost")
        recorder = Recorder()
        _, port = self.receivers.web(recorder, tls=context)
        resolver = ScriptedResolver({"localhost": [["127.0.0.1"]]})
        url = f"https://localhost:{port}/hook"

        untrusting = await post(make_client(self, resolver=resolver), url)
        self.assertFalse(untrusting.ok)
        self.assertIn("TLS handshake failed", untrusting.reason)
        self.assertEqual(recorder.requests, [])

        # self_signed_context gives CertificateOptions a cryptography certificate (see there).
        trust = Certificate.loadPEM(cast(Any, context.certificate).public_bytes(Encoding.PEM))
        trusting = make_client(self, resolver=resolver, trust_root=trust)
        self.assertEqual((await post(trusting, url)).reason, "HTTP 200")
        self.assertEqual(len(recorder.requests), 1)

        by_address = await post(trusting, f"https://127.0.0.1:{port}/hook")
        self.assertFalse(by_address.ok)
        self.assertIn("TLS handshake failed", by_address.reason)
        self.assertEqual(len(recorder.requests), 1)


# -- issue 14 (review): fairness, DNS, quiet logs ------------------------------------


class FairSlotsTests(SynchronousTestCase):
    def test_freed_slot_goes_to_the_client_holding_fewest(self) -> None:
        """
        issue 14 (review): with 4 slots, 3 per client, a client holding 3 with more
        queued cannot take a 4th, and a slot freed goes to the waiting client holding
        the fewest, though the other's request came first; a cancelled wait leaves the
        queue and is never granted.
        """
        slots = FairSlots(4, 3)
        hog = [slots.acquire("hog") for _ in range(6)]
        self.assertEqual([d.called for d in hog], [True] * 3 + [False] * 3)
        other = slots.acquire("acme")
        self.assertTrue(other.called)  # the 4th slot: the hog is at its cap
        late = [slots.acquire("acme"), slots.acquire("zeta")]
        gone = slots.acquire("zeta")
        gone.cancel()
        self.failureResultOf(gone)
        slots.release("hog")  # hog 2, acme 1, zeta 0: zeta's turn, though hog and acme asked first
        self.assertEqual([d.called for d in late], [False, True])
        slots.release("zeta")  # hog 2, acme 1: acme
        self.assertTrue(late[0].called)
        slots.release("acme")  # hog 2, acme 1, only the hog waiting: the hog's next
        self.assertEqual([d.called for d in hog[3:]], [True, False, False])
        slots.release("acme")  # the hog is at its cap: the slot stays free
        self.assertEqual([d.called for d in hog[3:]], [True, False, False])
        self.assertEqual((slots.in_use, slots.held, slots.waiting("hog")), (3, {"hog": 3}, 2))


class FairnessTests(SynchronousTestCase):
    def test_one_clients_hanging_receivers_do_not_starve_another(self) -> None:
        """
        issue 14 (review): one client's webhooks POST 36 events to 9 receivers that
        never answer (3 kinds x 3 URLs, 4 per receiver: more than the 32 slots). It
        holds 8 slots (its share), not 32; another client's POST connects at once.
        """
        reactor = MemoryReactorClock()
        client = WebhookClient(reactor, allow_private=True, resolver=ScriptedResolver({}), timeout=5.0)
        hog = [
            Deferred.fromCoroutine(client.post(f"http://127.0.0.{n}:8080/hook", b"{}", client="hog"))
            for n in range(1, 10)
            for _ in range(4)
        ]
        self.assertEqual(len(reactor.tcpClients), 8)
        self.assertEqual(client.slots.held, {"hog": 8})
        Deferred.fromCoroutine(client.post("http://127.0.1.1:8080/hook", b"{}", client="acme"))
        self.assertEqual(reactor.tcpClients[-1][:2], ("127.0.1.1", 8080))
        self.assertEqual(client.slots.held, {"hog": 8, "acme": 1})
        for _ in range(5):
            reactor.advance(5.0)
        self.assertTrue(all("within 5s" in self.successResultOf(d).reason for d in hog))
        self.assertEqual(len(reactor.tcpClients), 37)


class _DNSLookup:
    def __init__(self, owner: HangingDNS, name: str) -> None:
        self.name = name
        self.d: Deferred[Any] = Deferred(lambda _: owner.cancelled.append(name))


class HangingDNS:
    """A twisted.names-style resolver whose lookups never answer (a hostile nameserver); records cancellations."""

    def __init__(self) -> None:
        self.lookups: list[_DNSLookup] = []
        self.cancelled: list[str] = []

    @property
    def outstanding(self) -> int:
        return sum(1 for lookup in self.lookups if not lookup.d.called)

    def _lookup(self, name: str) -> Deferred[Any]:
        lookup = _DNSLookup(self, name)
        self.lookups.append(lookup)
        return lookup.d

    lookupAddress = lookupIPV6Address = _lookup


class _UDPTransport:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, Any]] = []

    def write(self, data: bytes, addr: Any = None) -> None:
        self.sent.append((data, addr))

    def stopListening(self) -> None:
        pass


class _UDPReactor(MemoryReactorClock):
    """A MemoryReactorClock that also takes UDP listeners (twisted.names' query sockets) and records what they send."""

    def __init__(self) -> None:
        super().__init__()
        self.udp: list[_UDPTransport] = []

    def listenUDP(self, port: int, protocol: Any, interface: str = "", maxPacketSize: int = 8192) -> _UDPTransport:
        transport = _UDPTransport()
        self.udp.append(transport)
        protocol.makeConnection(transport)
        return transport


class DNSTests(SynchronousTestCase):
    def test_hostile_lookups_are_bounded_and_cancelled_with_their_post(self) -> None:
        """
        issue 14 (review): 36 POSTs to names whose lookups never answer hold no
        thread and at most max_lookups lookups at once; each POST ends at its deadline,
        which covers the lookup, and cancels its lookups: none is left outstanding.
        """
        reactor = MemoryReactorClock()
        dns = HangingDNS()
        client = WebhookClient(reactor, allow_private=False, dns=cast(Any, dns), max_lookups=3, timeout=5.0)
        posts = [Deferred.fromCoroutine(client.post(f"http://h{n}.hostile.example/hook", b"{}")) for n in range(36)]
        self.assertEqual(dns.outstanding, 3 * 2)  # 3 names (A and AAAA each) of the 8 POSTs in flight
        for _ in range(5):
            reactor.advance(5.0)
            self.assertLessEqual(dns.outstanding, 6)
        reasons = {self.successResultOf(d).reason for d in posts}
        self.assertEqual(reasons, {"no complete response within 5s"})
        self.assertEqual(dns.outstanding, 0)
        self.assertEqual(len(dns.cancelled), len(dns.lookups))
        self.assertEqual(reactor.tcpClients, [])
        self.assertEqual(reactor.getDelayedCalls(), [])  # no deadline left behind either

    def test_names_from_twisted_names_checked_and_connected_to(self) -> None:
        """
        issue 14 (review): names resolved by twisted.names (here its /etc/hosts-format
        resolver) are still screened: a name at a loopback address is refused without
        connecting; a public one is connected to at the address looked up.
        """
        from twisted.names import hosts

        path = self.mktemp()
        with open(path, "w") as f:
            f.write(f"{PUBLIC} hooks.test\n127.0.0.1 evil.test\n")
        reactor = MemoryReactorClock()
        client = WebhookClient(reactor, allow_private=False, dns=hosts.Resolver(path.encode()), timeout=5.0)
        refused = self.successResultOf(post(client, "http://evil.test/hook"))
        self.assertIn("evil.test: 127.0.0.1 (loopback)", refused.reason)
        self.assertEqual(reactor.tcpClients, [])
        d = post(client, "http://hooks.test:8080/hook")
        self.assertEqual([(host, port) for host, port, *_ in reactor.tcpClients], [(PUBLIC, 8080)])
        reactor.advance(5.0)
        self.assertFalse(self.successResultOf(d).ok)

    def test_default_resolver_is_twisted_names_not_the_thread_pool(self) -> None:
        """
        issue 14 (review): by default a name is looked up by twisted.names over UDP
        (a query socket on the reactor), not with getaddrinfo on the reactor's threads;
        close() leaves no resolver timer behind.
        """
        reactor = _UDPReactor()
        reactor.getThreadPool = lambda: self.fail("the thread pool was used")  # type: ignore[attr-defined]
        client = WebhookClient(reactor, allow_private=False, timeout=5.0)
        d = post(client, "http://nowhere.invalid/hook")
        asked = set()
        for transport in reactor.udp:
            for data, _ in transport.sent:
                message = dns.Message()
                message.fromStr(data)
                asked |= {(q.name.name, q.type) for q in message.queries}
        self.assertEqual(asked, {(b"nowhere.invalid", dns.A), (b"nowhere.invalid", dns.AAAA)})
        reactor.advance(5.0)
        self.assertIn("within 5s", self.successResultOf(d).reason)
        client.close()
        reactor.advance(60)
        self.assertEqual([c for c in reactor.getDelayedCalls() if c.active()], [])


class QuietLogTests(TestCase):
    def setUp(self) -> None:
        self.receivers = Receivers(self)

    async def test_no_log_line_per_connection_or_per_post(self) -> None:
        """
        issue 14 (review): a delivered POST and a refused one, then the idle connection
        closed: no "Starting factory"/"Stopping factory" line per connection and no line
        per POST (the dispatcher logs failures); the outcomes are counted instead.
        """
        recorder = Recorder()
        site, port = self.receivers.web(recorder)
        closed = self.receivers.closed_port()
        client = make_client(self)
        events: list[Any] = []
        observer = cast(ILogObserver, events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        self.assertTrue((await post(client, f"http://127.0.0.1:{port}/hook")).ok)
        self.assertFalse((await post(client, f"http://127.0.0.1:{closed}/hook")).ok)
        await client.close()
        await wait_until(lambda: not any(map(_connected, site.connections)), "the idle connection to close")
        await wait_until(lambda: not client._pool._connections, "the client side to see it closed")
        self.assertEqual(site.opened, 1)
        texts = [formatEvent(e) for e in events]
        # (The receivers' own server factories, the test's, may log.)
        self.assertEqual([t for t in texts if "ClientFactory" in t or "webhook POST" in t or str(port) in t], [])
        self.assertEqual((client.delivered, client.failed), (1, 1))


# -- review 2: recursion, fairness order, DNS turns ------------------------------------


class CachedAnswers:
    """
    A twisted.names-style upstream: every A question is answered C{address} (or
    NODATA when L{None}), every other type NODATA (an SOA), when the test calls
    L{answer_all}; records the names asked.
    """

    def __init__(self, address: str | None) -> None:
        self.address = address
        self.pending: list[Any] = []
        self.asked: list[bytes] = []

    def query(self, q: dns.Query, timeout: Any = None) -> Deferred[Any]:
        self.asked.append(q.name.name)
        d: Deferred[Any] = Deferred()
        soa = dns.RRHeader(q.name.name, dns.SOA, dns.IN, 300, dns.Record_SOA(b"ns", b"h", minimum=300, ttl=300))
        if q.type == dns.A and self.address is not None:
            answer: Any = ([dns.RRHeader(q.name.name, dns.A, dns.IN, 300, dns.Record_A(self.address, 300))], [], [])
        else:
            answer = ([], [soa], [])
        self.pending.append(lambda: d.callback(answer))
        return d

    def answer_all(self) -> None:
        while self.pending:
            self.pending.pop(0)()


class ReviewTwoTests(SynchronousTestCase):
    def _queued_posts_all_end(self, address: str | None, reason: str) -> None:
        from mmgun.mx import CachingResolver

        reactor = MemoryReactorClock()
        upstream = CachedAnswers(address)
        client = WebhookClient(reactor, allow_private=False, dns=CachingResolver(cast(Any, upstream), reactor))
        posts = [Deferred.fromCoroutine(client.post("http://hook.example/x", b"{}", client="a")) for _ in range(500)]
        posts += [Deferred.fromCoroutine(client.post(f"http://hook.example:{8000 + n}/x", b"{}", client="b")) for n in range(100)]
        self.assertEqual(client.slots.held, {"a": 4, "b": 8})  # the rest queued behind the first lookups
        upstream.answer_all()  # the first POSTs fail; every later one fails at once, from the cache
        reasons = {self.successResultOf(d).reason for d in posts}
        self.assertEqual(reasons, {reason})
        self.assertEqual((client.slots.in_use, client.slots.held, client.failed), (0, {}, 600))
        self.assertEqual((client._per_receiver, client._per_client), ({}, {}))
        self.assertEqual(reactor.tcpClients, [])

    def test_queued_posts_to_a_cached_refused_address_all_end(self) -> None:
        """
        review 2 item 1: 600 queued POSTs (two clients, one receiver and 100) to a name whose
        cached answer is 10.0.0.1 each fail at once when their turn comes; the hand-overs
        loop instead of recursing (no RecursionError), every POST ends refused and every
        slot and turn is free afterwards.
        """
        self._queued_posts_all_end("10.0.0.1", "refused address hook.example: 10.0.0.1 (private) (see --webhook-allow-private)")

    def test_queued_posts_to_a_cached_nodata_name_all_end(self) -> None:
        """review 2 item 1: the same with a cached NODATA answer: every POST ends "has no address", every slot free."""
        self._queued_posts_all_end(None, "hook.example has no address")

    def test_client_at_its_cap_holds_no_turn_of_a_shared_receiver(self) -> None:
        """
        review 2 item 3: client A holds its 8 slots with POSTs to two receivers that never
        answer and queues 4 more to a receiver it shares with B; A's queued POSTs take none
        of the shared receiver's 4 turns, so B's POST to it connects at once.
        """
        reactor = MemoryReactorClock()

        @implementer(IHostnameResolver)
        class Hang:
            def resolveHostName(
                self,
                receiver: IResolutionReceiver,
                host: str,
                portNumber: int = 0,
                addressTypes: Any = None,
                transportSemantics: str = "TCP",
            ) -> IHostResolution:
                resolution = _Resolution(host)
                receiver.resolutionBegan(resolution)
                if host == "shared.example":
                    receiver.addressResolved(IPv4Address("TCP", PUBLIC, 80))
                    receiver.resolutionComplete()
                return resolution  # the slow ones never answer

        client = WebhookClient(reactor, allow_private=True, resolver=Hang(), timeout=5.0)
        for n in range(8):
            Deferred.fromCoroutine(client.post(f"http://slow{n % 2}.example/", b"{}", client="A"))
        for _ in range(4):
            Deferred.fromCoroutine(client.post("http://shared.example/", b"{}", client="A"))
        self.assertEqual(client.in_flight("http://shared.example/"), 0)
        b = Deferred.fromCoroutine(client.post("http://shared.example/", b"{}", client="B"))
        self.assertEqual(client.slots.held, {"A": 8, "B": 1})
        self.assertEqual([host for host, *_ in reactor.tcpClients], [PUBLIC])
        reactor.advance(5.0)
        self.assertIn("within 5s", self.successResultOf(b).reason)

    def test_cached_names_need_no_lookup_turn_and_turns_match_the_slots(self) -> None:
        """
        review 2 item 4: two hostile clients fill 16 POST slots with names whose lookups
        never answer (32 lookups: A and AAAA); a third client's POST to a cached name is
        answered (refused) at once, and a fourth's to a new name is looked up at once:
        lookup turns default to the 32 slots, so the hostile names cannot use them all.
        """
        from mmgun.mx import CachingResolver

        reactor = MemoryReactorClock()
        upstream = CachedAnswers("10.0.0.1")
        client = WebhookClient(reactor, allow_private=False, dns=CachingResolver(cast(Any, upstream), reactor), timeout=5.0)
        cached = Deferred.fromCoroutine(client.post("http://cached.example/", b"{}", client="warm"))  # fills the cache
        upstream.answer_all()
        self.assertFalse(self.successResultOf(cached).ok)
        upstream.asked.clear()
        hostile = [
            Deferred.fromCoroutine(client.post(f"http://h{n}.{who}.example/", b"{}", client=who))
            for who in ("evil", "worse")
            for n in range(8)
        ]
        self.assertEqual(len(upstream.pending), 32)
        again = Deferred.fromCoroutine(client.post("http://cached.example/", b"{}", client="acme"))
        self.assertIn("refused address cached.example: 10.0.0.1", self.successResultOf(again).reason)
        self.assertNotIn(b"cached.example", upstream.asked)
        Deferred.fromCoroutine(client.post("http://new.example/", b"{}", client="zeta"))
        self.assertEqual(upstream.asked[-2:], [b"new.example", b"new.example"])
        reactor.advance(5.0)
        self.assertTrue(all("within 5s" in self.successResultOf(d).reason for d in hostile))
