"""API keys, isolation between clients, and the abuse limits, through the real Klein app."""

from __future__ import annotations

import base64

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from mmgun.auth import KEY_CACHE_SECONDS, key_hash, new_key
from mmgun.clients import Clients
from mmgun.limits import QueueCap, RateLimiter
from mmgun.web.app import Frontend

from .helpers import CLIENT, APIClient, result, sync_store

MESSAGE = {"sender": "me@example.com", "recipients": ["a@x.example"], "subject": "s", "body": "b"}
UNAUTHORIZED = (401, {"result": "error", "message": "authentication failed"})


class KeyTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.store, _ = sync_store(self)
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        clients = Clients.from_ids([CLIENT])
        self.frontend = Frontend(self.store, lambda: clients, self.clock, hostname="mmgun.test", **self.options())
        self.api = APIClient(self, self.frontend)
        self.keys = {}
        for client in ("acme", "globex"):
            result(self, self.store.add_client(client, self.clock.seconds()))
            key_id, key = new_key()
            result(self, self.store.add_key(client, key_id, key_hash(key), self.clock.seconds()))
            self.keys[client] = (key_id, key)

    def options(self) -> dict:
        return {}

    def bearer(self, client: str = "acme") -> dict:
        return {"Authorization": "Bearer " + self.keys[client][1]}

    def basic(self, user: str, password: str) -> dict:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}

    def send(self, headers: dict, **fields) -> tuple[int, dict]:
        return self.api.request("POST", "/send", {**MESSAGE, **fields}, headers=headers)

    def status(self, headers: dict, submission_id: str) -> tuple[int, dict]:
        return self.api.request("POST", "/status", {"submission_id": submission_id}, headers=headers)


class AuthenticationTests(KeyTests):
    def test_bearer_key(self) -> None:
        code, sent = self.send(self.bearer())
        self.assertEqual(code, 200)
        code, status = self.status(self.bearer(), sent["submission_id"])
        self.assertEqual((code, status["status"]), (200, "queued"))

    def test_basic_auth_with_user_api(self) -> None:
        code, _ = self.send(self.basic("api", self.keys["acme"][1]))
        self.assertEqual(code, 200)

    def test_every_failure_looks_the_same(self) -> None:
        key_id, key = self.keys["acme"]
        for headers in (
            self.basic("admin", key),
            {"Authorization": "Bearer " + key[:-1] + ("A" if key[-1] != "A" else "B")},
            {"Authorization": "Bearer mmk_0000000000000000_" + "x" * 43},
            {"Authorization": "Bearer not-a-key"},
            {"Authorization": "Basic !!!"},
            {"Authorization": "Digest abc"},
        ):
            self.assertEqual(self.send(headers), UNAUTHORIZED, headers)
        self.assertEqual(self.api.request("POST", "/send", {**MESSAGE, "client_id": "unknown-client-xxxxxx"}), UNAUTHORIZED)

    def test_header_and_client_id_together_is_400(self) -> None:
        code, body = self.send(self.bearer(), client_id=CLIENT)
        self.assertEqual(code, 400)
        self.assertIn("not both", body["message"])

    def test_legacy_client_id_still_works(self) -> None:
        code, _ = self.api.request("POST", "/send", {**MESSAGE, "client_id": CLIENT})
        self.assertEqual(code, 200)

    def test_revoked_key_refused_within_seconds(self) -> None:
        self.assertEqual(self.send(self.bearer())[0], 200)
        self.assertTrue(result(self, self.store.revoke_key(self.keys["acme"][0], self.clock.seconds())))
        self.clock.advance(KEY_CACHE_SECONDS)
        self.assertEqual(self.send(self.bearer()), UNAUTHORIZED)

    def test_last_used_recorded(self) -> None:
        self.send(self.bearer())
        (info,) = result(self, self.store.list_keys("acme"))
        self.assertEqual(info.last_used_at, self.clock.seconds())


class IsolationTests(KeyTests):
    """A submission belongs to its client: every other credential sees a plain 404."""

    def test_other_clients_submission_is_404_like_unknown(self) -> None:
        _, sent = self.send(self.bearer("acme"))
        _, legacy = self.api.request("POST", "/send", {**MESSAGE, "client_id": CLIENT})
        unknown = self.status(self.bearer("globex"), "f" * 32)
        self.assertEqual(unknown[0], 404)
        self.assertEqual(self.status(self.bearer("globex"), sent["submission_id"]), unknown)
        self.assertEqual(self.status(self.bearer("globex"), legacy["submission_id"]), unknown)
        self.assertEqual(self.api.request("POST", "/status", {"client_id": CLIENT, "submission_id": sent["submission_id"]}), unknown)
        self.assertEqual(self.status(self.bearer("acme"), legacy["submission_id"]), unknown)
        self.assertEqual(self.status(self.bearer("acme"), sent["submission_id"])[0], 200)

    def test_idempotency_keys_do_not_cross_clients(self) -> None:
        _, a = self.api.request("POST", "/send", MESSAGE, headers={**self.bearer("acme"), "Idempotency-Key": "k1"})
        _, b = self.api.request("POST", "/send", MESSAGE, headers={**self.bearer("globex"), "Idempotency-Key": "k1"})
        self.assertNotEqual(a["submission_id"], b["submission_id"])


class FailedAuthenticationLimitTests(KeyTests):
    def test_source_address_limited_after_repeated_failures(self) -> None:
        bad = {"Authorization": "Bearer nope"}
        for _ in range(10):
            self.assertEqual(self.send(bad), UNAUTHORIZED)
        code, body = self.send(bad)
        self.assertEqual(code, 429)
        self.assertIn("failed authentication", body["message"])
        self.clock.advance(6)
        self.assertEqual(self.send(bad), UNAUTHORIZED)


class FailedAuthenticationOptionTests(KeyTests):
    def options(self) -> dict:
        return {"max_auth_failures": 3}

    def test_max_auth_failures_sets_the_limit(self) -> None:
        """--max-auth-failures: three failures, then 429 until a twentieth of a minute has passed."""
        bad = {"Authorization": "Bearer nope"}
        self.assertEqual([self.send(bad) for _ in range(3)], [UNAUTHORIZED] * 3)
        self.assertEqual(self.send(bad)[0], 429)
        self.clock.advance(19)
        self.assertEqual(self.send(bad)[0], 429)
        self.clock.advance(1)
        self.assertEqual(self.send(bad), UNAUTHORIZED)


class RateLimitTests(KeyTests):
    def options(self) -> dict:
        return {"rate_limit": 1.0, "rate_burst": 2}

    def test_token_bucket_per_client(self) -> None:
        self.assertEqual([self.send(self.bearer())[0] for _ in range(2)], [200, 200])
        # StubTreq copies treq's functions onto itself in __init__: type checkers do not see them.
        d = self.api.treq.post("http://mmgun.test/send", json=MESSAGE, headers=self.bearer())  # type: ignore[attr-defined]
        response = self.successResultOf(d)
        self.assertEqual(response.code, 429)
        self.assertEqual(response.headers.getRawHeaders(b"retry-after"), [b"1"])
        self.assertEqual(self.send(self.bearer("globex"))[0], 200)
        self.clock.advance(1)
        self.assertEqual(self.send(self.bearer())[0], 200)


class QueueCapTests(KeyTests):
    def options(self) -> dict:
        self.cap = QueueCap(None, self.clock, limit=3)
        return {"queue_cap": self.cap}

    def test_cap_on_queued_recipients(self) -> None:
        two = {"recipients": ["a@x.example", "b@x.example"]}
        self.assertEqual(self.send(self.bearer(), **two)[0], 200)
        code, body = self.send(self.bearer(), **two)
        self.assertEqual(code, 429)
        self.assertIn("more than 3 recipients queued", body["message"])
        self.assertEqual(self.send(self.bearer("globex"), **two)[0], 200)

    def test_counts_refreshed_from_store(self) -> None:
        self.cap._store = self.store
        self.send(self.bearer(), recipients=["a@x.example", "b@x.example"])
        self.cap.counts = {}
        self.successResultOf(self.cap.refresh())
        self.assertEqual(self.cap.counts, {"acme": 2})


class SlowCountPacingTests(SynchronousTestCase):
    """issue 17 (flat cost with a large queue): a slow count over the queue is run less often, never back to back."""

    def test_slow_counts_are_spaced_by_twenty_times_their_duration(self) -> None:
        """
        With 100,000 envelopes queued each count held the frontend's one SQLite connection for
        0.2–0.4 s every 5 s: the next refresh now waits 20 × the last one's duration (at least 5 s),
        and a fast count brings the 5 s back.
        """
        from twisted.internet.defer import Deferred

        clock = Clock()
        pending: list[Deferred[dict[str, int]]] = []

        class Store:
            def queued_by_client(self) -> Deferred[dict[str, int]]:
                pending.append(Deferred())
                return pending[-1]

        cap = QueueCap(Store(), clock, limit=10)
        cap.startService()
        self.addCleanup(cap.stopService)
        self.assertEqual(len(pending), 1)  # at start
        clock.advance(1.0)  # the count takes 1 s of the connection
        pending[-1].callback({"acme": 1})
        self.assertEqual(cap.counts, {"acme": 1})
        clock.advance(18.9)
        self.assertEqual(len(pending), 1, "not before 20 × 1 s after the last one started")
        clock.advance(0.2)
        self.assertEqual(len(pending), 2)
        pending[-1].callback({"acme": 2})  # at once: fast again
        clock.advance(5.0)
        self.assertEqual(len(pending), 3, "back to every 5 s")

    def test_queue_gauges_are_paced_the_same(self) -> None:
        """issue 17: the /metrics queue gauges' count (queue_depth, also over every unfinished envelope) is paced alike."""
        from twisted.internet.defer import Deferred

        from mmgun.metrics import Metrics
        from mmgun.service import QueueGauges
        from mmgun.store import QueueDepth

        clock = Clock()
        pending: list[Deferred[QueueDepth]] = []

        class Store:
            def queue_depth(self, now: float) -> Deferred[QueueDepth]:
                pending.append(Deferred())
                return pending[-1]

        gauges = QueueGauges(Store(), Metrics(), clock)
        gauges.startService()
        self.addCleanup(gauges.stopService)
        clock.advance(0.5)
        pending[-1].callback(QueueDepth((), 0, 0, None))
        clock.advance(9.4)  # 9.9 s after it started: not yet
        self.assertEqual(len(pending), 1)
        clock.advance(0.2)
        self.assertEqual(len(pending), 2)


class RateLimiterTests(SynchronousTestCase):
    def test_refill_and_burst(self) -> None:
        clock = Clock()
        limiter = RateLimiter(rate=2.0, burst=4, clock=clock)
        self.assertEqual([limiter.take("k") for _ in range(4)], [0.0] * 4)
        self.assertAlmostEqual(limiter.take("k"), 0.5)
        clock.advance(0.5)
        self.assertEqual(limiter.take("k"), 0.0)
        clock.advance(100)
        self.assertEqual([limiter.take("k") for _ in range(4)], [0.0] * 4)

    def test_zero_rate_is_unlimited(self) -> None:
        limiter = RateLimiter(rate=0, burst=1, clock=Clock())
        self.assertEqual({limiter.take("k") for _ in range(1000)}, {0.0})


class HTTPHardeningTests(SynchronousTestCase):
    """Slow or oversized requests over a real twisted.web channel on a memory transport."""

    def setUp(self) -> None:
        store, _ = sync_store(self)
        self.clock = Clock()
        clients = Clients.from_ids([CLIENT])
        self.frontend = Frontend(store, lambda: clients, self.clock, hostname="h", max_message_size=1000, request_timeout=30)
        self.site = self.frontend.site()

    def connect(self) -> StringTransport:
        from twisted.internet.address import IPv4Address

        protocol = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 4000))
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.addCleanup(lambda: protocol.connectionLost(None) if not transport.disconnecting else None)
        self.protocol = protocol
        return transport

    def test_slow_request_is_dropped_at_deadline(self) -> None:
        transport = self.connect()
        self.protocol.dataReceived(b"POST /send HTTP/1.1\r\nHost: x\r\n")
        for _ in range(5):
            self.clock.advance(5)
            self.protocol.dataReceived(b"X-Slow: 1\r\n")  # each byte resets the idle timer, not the deadline
        self.assertFalse(transport.disconnecting)
        self.clock.advance(5)
        self.assertTrue(transport.disconnecting)

    def test_oversized_body_is_not_buffered(self) -> None:
        from mmgun.web.site import LimitedRequest

        buffered: list[int] = []

        class Recording(LimitedRequest):
            def handleContentChunk(self, data: bytes) -> None:
                super().handleContentChunk(data)
                # http.Request's class attribute "content = None" hides the file set when the body starts.
                buffered.append(self.content.tell())  # type: ignore[attr-defined]  # see above

        self.site.requestFactory = Recording
        transport = self.connect()
        body = b"x" * 5000
        head = b"POST /send HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        chunks = b"".join(b"%x\r\n%s\r\n" % (500, body[i : i + 500]) for i in range(0, len(body), 500))
        self.protocol.dataReceived(head + chunks + b"0\r\n\r\n")
        self.assertEqual(transport.value().split(b"\r\n")[0], b"HTTP/1.1 413 Request Entity Too Large")
        self.assertEqual(len(buffered), 10)
        self.assertLessEqual(max(buffered), 1000)
