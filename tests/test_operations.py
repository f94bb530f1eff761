"""Operations: /healthz, /metrics, clients reload, graceful shutdown of a real daemon, JSON logs."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys

import treq
from prometheus_client.parser import text_string_to_metric_families
from twisted.application.service import IServiceCollection
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import HTTPConnectionPool

from mmgun.config import Options
from mmgun.metrics import Metrics
from mmgun.service import ClientsHolder, ClientsReloader, QueueGauges, make_service
from mmgun.testing.ports import port_number
from mmgun.testing.smtpserver import Mailbox, smtp_server_factory

from .helpers import CLIENT, OTHER_CLIENT, http_url, make_api, result, sync_store, wait_until

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


def metric_values(text: str) -> dict[tuple[str, tuple], float]:
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


class HealthTests(SynchronousTestCase):
    def test_healthz_ok(self) -> None:
        api, _, _ = make_api(self)
        self.assertEqual(api.request("GET", "/healthz"), (200, {"status": "ok"}))

    def test_healthz_503_when_database_fails(self) -> None:
        api, store, _ = make_api(self)
        result(self, store.close())
        code, body = api.request("GET", "/healthz")
        self.assertEqual((code, body["status"]), (503, "unavailable"))
        self.flushLoggedErrors()


class MetricsTests(TestCase):
    """/metrics served by prometheus_client's Twisted resource on a real port, parsed with its parser."""

    async def _scrape(self) -> None:
        clients = self.mktemp()
        with open(clients, "w") as f:
            f.write(CLIENT + "\n")
        options = Options({})
        options.parseOptions(["--listen", "tcp:0:interface=127.0.0.1", "--database", self.mktemp(), "--clients", clients, "--role", "frontend"])
        service = make_service(options.config, reactor)
        service.startService()
        self.addCleanup(service.stopService)
        url = http_url(service)
        pool = HTTPConnectionPool(reactor, persistent=False)
        good = {"client_id": CLIENT, "sender": "a@b.example", "recipients": ["c@d.example", "e@f.example"], "subject": "s", "body": "b"}
        for body in (good, good, {**good, "sender": "bad"}, {**good, "client_id": "nobody-xxxxxxxxxxxx"}):
            await (await treq.post(url + "/send", json=body, pool=pool)).content()
        gauges = [s for s in IServiceCollection(service) if isinstance(s, QueueGauges)][0]
        await gauges.refresh()
        response = await treq.get(url + "/metrics", pool=pool)
        self.assertEqual(response.code, 200)
        values = metric_values((await response.content()).decode())
        self.assertEqual(values[("mmgun_submissions_accepted_total", ())], 2)
        self.assertEqual(values[("mmgun_submissions_rejected_total", (("reason", "invalid"),))], 1)
        self.assertEqual(values[("mmgun_submissions_rejected_total", (("reason", "unauthorized"),))], 1)
        self.assertEqual(values[("mmgun_queue_recipients", (("status", "queued"),))], 4)
        self.assertEqual(values[("mmgun_queue_envelopes", ())], 4)
        self.assertGreaterEqual(values[("mmgun_queue_oldest_age_seconds", ())], 0)
        self.assertEqual(values[("mmgun_http_request_duration_seconds_count", (("code", "200"), ("endpoint", "/send")))], 2)
        self.assertEqual(values[("mmgun_http_request_duration_seconds_count", (("code", "400"), ("endpoint", "/send")))], 1)

    def test_metrics_scraped_and_parsed(self) -> Deferred:
        return Deferred.fromCoroutine(self._scrape())


class SenderMetricsTests(SynchronousTestCase):
    def test_delivery_outcomes_counted(self) -> None:
        import random
        import uuid

        from mmgun.sender import Sender
        from mmgun.smtp import Reply, SMTPSettings
        from mmgun.store import NewSubmission

        from .test_sender import SETTINGS, FakeRouter, ScriptedSessions, mx

        store, _ = sync_store(self)
        clock = Clock()
        clock.advance(1000)
        sessions = ScriptedSessions()
        sessions.replies = {"no": [Reply(550, "5.1.1 no")]}
        metrics = Metrics()
        sender = Sender(store, FakeRouter({"a.example": [mx("mx.a.example")]}), clock, SMTPSettings(helo="h"), SETTINGS, session=sessions, rng=random.Random(0), metrics=metrics)
        result(self, store.add_submission(NewSubmission(uuid.uuid4().hex, "c", "me@x.example", ("yes@a.example", "no@a.example"), b"m", 990.0)))
        self.successResultOf(sender.poll())
        get = metrics.registry.get_sample_value
        self.assertEqual(get("mmgun_recipients_total", {"status": "sent"}), 1)
        self.assertEqual(get("mmgun_recipients_total", {"status": "failed"}), 1)
        self.assertEqual(get("mmgun_smtp_replies_total", {"class": "2xx"}), 1)
        self.assertEqual(get("mmgun_smtp_replies_total", {"class": "5xx"}), 1)
        self.assertEqual(get("mmgun_delivery_latency_seconds_count"), 1)
        self.assertEqual(get("mmgun_delivery_latency_seconds_sum"), 10)


class ClientsReloadTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = self.mktemp()
        self.write(CLIENT)
        self.holder = ClientsHolder(self.path)
        self.clock = Clock()
        self.reloader = ClientsReloader(self.holder, self.clock, interval=2.0)
        self.reloader.startService()
        self.addCleanup(self.reloader.stopService)

    def write(self, text: str, mtime: int | None = None) -> None:
        with open(self.path, "w") as f:
            f.write(text + "\n")
        if mtime is not None:
            os.utime(self.path, ns=(mtime, mtime))

    def test_changed_file_reloaded_by_timer(self) -> None:
        self.assertTrue(self.holder().authenticate(CLIENT))
        self.write(OTHER_CLIENT, mtime=10**18)
        self.assertIsNone(self.holder().authenticate(OTHER_CLIENT))
        self.clock.advance(2)
        self.assertTrue(self.holder().authenticate(OTHER_CLIENT))
        self.assertIsNone(self.holder().authenticate(CLIENT))

    def test_broken_file_keeps_old_set(self) -> None:
        self.write("short", mtime=10**18)
        self.clock.advance(2)
        self.assertTrue(self.holder().authenticate(CLIENT))
        self.assertEqual(len(self.flushLoggedErrors()), 0)

    def test_sighup_reloads(self) -> None:
        if not hasattr(signal, "SIGHUP"):
            self.skipTest("no SIGHUP here")
        calls: list = []
        # A Clock has no callFromThread: the reloader's signal handler gets this stand-in.
        self.clock.callFromThread = lambda f, *a: calls.append(f)  # type: ignore[attr-defined]
        self.reloader.stopService()
        self.reloader.startService()
        self.write(OTHER_CLIENT)
        os.kill(os.getpid(), signal.SIGHUP)
        self.assertEqual(len(calls), 1)
        calls[0]()
        self.assertTrue(self.holder().authenticate(OTHER_CLIENT))


class DaemonShutdownTests(TestCase):
    """
    A real twistd process with a delivery in flight stops cleanly on SIGTERM; the envelope
    whose final "." went out without a reply keeps its lease (issue 15, sender bug B).
    """

    async def _shutdown(self) -> None:
        mailbox = Mailbox()
        factory = smtp_server_factory(reactor, mailbox, tls=False, slow_seconds=3600)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.addCleanup(factory.server.abort_connections)
        folder = self.mktemp()
        os.makedirs(folder)
        clients = os.path.join(folder, "clients")
        with open(clients, "w") as f:
            f.write(CLIENT + "\n")
        database = os.path.join(folder, "mmgun.sqlite3")
        log = open(os.path.join(folder, "twistd.log"), "w+")
        self.addCleanup(log.close)
        process = subprocess.Popen(
            [TWISTD, "--pidfile=", "-n", "mmgun", "--database", database, "--clients", clients,
             "--listen", "tcp:0:interface=127.0.0.1", "--relay-host", f"127.0.0.1:{port_number(port)}",
             "--poll-interval", "0.05", "--shutdown-timeout", "1s", "--log-format", "json", "--role", "sender"],
            stdout=log, stderr=subprocess.STDOUT,
        )
        self.addCleanup(process.kill)  # a no-op once the process has exited
        store, _ = sync_store(self)
        from mmgun.store import NewSubmission

        shared = __import__("mmgun.store.sqlite", fromlist=["SQLiteStore"]).SQLiteStore.open_sync(database)
        self.addCleanup(lambda: result(self, shared.close()))
        result(self, shared.add_submission(NewSubmission("b" * 32, "c", "me@x.example", ("fast@b.example",), b"Subject: y\r\n\r\nbody\r\n", reactor.seconds() - 1)))
        result(self, shared.add_submission(NewSubmission("a" * 32, "c", "me@x.example", ("slowdata@a.example",), b"Subject: x\r\n\r\nsecret body\r\n", reactor.seconds())))
        conn = sqlite3.connect(database)
        self.addCleanup(conn.close)
        leased = lambda: conn.execute("SELECT count(*) FROM envelopes WHERE lease IS NOT NULL").fetchone()[0]  # noqa: E731
        # Both go over one session to the relay: the first is accepted (and committed at
        # once), the second waits for the reply to its final "." when SIGTERM comes.
        await wait_until(lambda: len(mailbox.messages) == 1 and leased() == 1, "one delivery done and one in flight")
        process.send_signal(signal.SIGTERM)
        await wait_until(lambda: process.poll() is not None, "the daemon to exit")
        self.assertEqual(process.returncode, 0)
        # Past its final ".", its reply may have been a 250: not released to another sender,
        # it goes out again when its lease expires (or when this sender starts again).
        self.assertEqual(leased(), 1)
        states = dict(conn.execute("SELECT r.address, r.status FROM recipients r").fetchall())
        self.assertEqual(states, {"slowdata@a.example": "queued", "fast@b.example": "sent"})
        log.seek(0)
        lines = log.read().splitlines()
        events = [json.loads(line) for line in lines]
        self.assertTrue(any(e.get("log_namespace") == "mmgun.sender" for e in events))
        self.assertTrue(any("not releasing" in e.get("log_format", "") and e.get("count") == 1 for e in events))
        self.assertFalse(any("secret body" in line for line in lines))

    def test_sigterm_with_delivery_in_flight(self) -> Deferred:
        return Deferred.fromCoroutine(self._shutdown())


class AdminWithDaemonTests(TestCase):
    """The `mmgun` command works on the database of a daemon that is running on it."""

    def mmgun(self, *args: str) -> subprocess.CompletedProcess:
        command = os.path.join(os.path.dirname(sys.executable), "mmgun")
        return subprocess.run([command, *args, "--database", self.database], capture_output=True, text=True, timeout=60)

    async def _admin(self) -> None:
        from mmgun.store import NewSubmission
        from mmgun.store.sqlite import SQLiteStore

        folder = self.mktemp()
        os.makedirs(folder)
        self.database = os.path.join(folder, "mmgun.sqlite3")
        log = open(os.path.join(folder, "twistd.log"), "w")
        self.addCleanup(log.close)
        process = subprocess.Popen(
            [TWISTD, "--pidfile=", "-n", "mmgun", "--database", self.database, "--role", "sender",
             "--relay-host", "127.0.0.1:1", "--poll-interval", "0.05", "--retry-min", "1h", "--retry-max", "2h"],
            stdout=log, stderr=subprocess.STDOUT,
        )

        def stop() -> None:
            if process.poll() is None:
                process.terminate()
                process.wait(30)

        self.addCleanup(stop)
        await wait_until(lambda: os.path.exists(self.database), "the daemon to create its database")
        store = SQLiteStore.open_sync(self.database)
        self.addCleanup(lambda: result(self, store.close()))
        for sid, address in (("a" * 32, "x@one.example"), ("b" * 32, "y@two.example")):
            result(self, store.add_submission(NewSubmission(sid, "c-0123456789abcdef", "me@x.example", (address,), b"m", reactor.seconds())))
        deferred = lambda: json.loads(self.mmgun("queue", "--status", "deferred", "--json").stdout)  # noqa: E731
        await wait_until(lambda: len(deferred()) == 2, "both envelopes deferred by the daemon")
        self.assertIsNone(process.poll())
        (first, second) = deferred()
        self.assertEqual(first["attempts"], 1)
        self.assertIn("127.0.0.1", first["last_reply"])

        stats = self.mmgun("stats", "--json")
        self.assertEqual(stats.returncode, 0, stats.stderr)
        self.assertEqual(json.loads(stats.stdout)["unfinished_envelopes"], 2)

        flushed = self.mmgun("queue", "flush", "b" * 32)
        self.assertEqual(flushed.returncode, 0, flushed.stderr)
        await wait_until(lambda: {e["submission_id"]: e["attempts"] for e in deferred()}.get("b" * 32) == 2, "the flushed envelope retried")

        deleted = self.mmgun("queue", "delete", "a" * 32)
        self.assertEqual(deleted.returncode, 0, deleted.stderr)
        state = result(self, store.submission("c-0123456789abcdef", "a" * 32))
        self.assertEqual([(r.status, r.last_reply) for r in state.recipients], [("failed", "deleted by operator")])

        unknown = self.mmgun("queue", "delete", "nope")
        self.assertEqual(unknown.returncode, 1)
        self.assertEqual(len(unknown.stderr.strip().splitlines()), 1)
        self.assertIsNone(process.poll(), "the daemon kept running")

    def test_admin_commands_while_the_daemon_runs(self) -> Deferred:
        return Deferred.fromCoroutine(self._admin())


class MetricsListenTests(TestCase):
    """--metrics-listen: a process of any role serves its own /metrics on a port of its own."""

    async def _sender_metrics(self) -> None:
        from twisted.application.internet import StreamServerEndpointService

        options = Options({})
        options.parseOptions(
            ["--role", "sender", "--database", self.mktemp(), "--relay-host", "127.0.0.1:1", "--nameserver", "127.0.0.1:1",
             "--metrics-listen", "tcp:0:interface=127.0.0.1"]
        )
        service = make_service(options.config, reactor)
        service.startService()
        self.addCleanup(service.stopService)
        (listener,) = [s for s in IServiceCollection(service) if isinstance(s, StreamServerEndpointService)]
        port = await listener._waitingForPort
        url = f"http://127.0.0.1:{port.getHost().port}"
        pool = HTTPConnectionPool(reactor, persistent=False)
        response = await treq.get(url + "/metrics", pool=pool)
        self.assertEqual(response.code, 200)
        families = {f.name for f in text_string_to_metric_families((await response.content()).decode())}
        self.assertIn("mmgun_recipients", families)
        self.assertIn("mmgun_smtp_replies", families)
        for path in ("/", "/send", "/healthz"):
            response = await treq.get(url + path, pool=pool)
            await response.content()
            self.assertEqual(response.code, 404, path)

    def test_sender_serves_its_metrics(self) -> Deferred:
        return Deferred.fromCoroutine(self._sender_metrics())
