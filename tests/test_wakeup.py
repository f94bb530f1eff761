"""Issue 17 (Part W): a queued message wakes the sender at once; the poll is only a safety net."""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import stat
import tempfile
from functools import partial
from typing import Any

import treq
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mmgun.sender import Sender
from mmgun.smtp import SMTPSettings
from mmgun.store.postgres.wake import NotifyListener
from mmgun.wakeup import LISTING_TTL, WakeListener, WakeNotifier, Wakeup, wake_directory

from .fakes import SENDER_SETTINGS as SETTINGS, FakeRouter, ScriptedSessions, mx
from .helpers import CLIENT_LABEL, make_api, result


class InProcessWakeTests(SynchronousTestCase):
    """A frontend and a sender in one process (``make run``): the commit wakes the sender directly."""

    def setUp(self) -> None:
        self.wakes = 0
        self.wakeup = Wakeup()
        self.wakeup.subscribe(self._count)
        self.api, self.store, self.clock = make_api(self, wake=self.wakeup)
        self.smtp = ScriptedSessions()
        self.sender = Sender(
            self.store,
            FakeRouter({"another.com": [mx("mx.another.com")], "third.com": [mx("mx.third.com")]}),
            self.clock,
            SMTPSettings(helo="mmgun.test"),
            SETTINGS,
            session=self.smtp,
            rng=random.Random(1),
            owner="sender-1",
        )

    def _count(self) -> None:
        self.wakes += 1

    def start_sender(self) -> None:
        self.sender.startService()
        self.addCleanup(lambda: self.successResultOf(self.sender.stopService()))
        self.assertEqual(self.smtp.sessions, [], "nothing queued yet")

    def test_send_is_delivered_without_waiting_for_the_poll(self) -> None:
        """issue 17 (W): the 200 of /send is followed by the delivery with the clock standing still (no poll interval)."""
        self.wakeup.subscribe(self.sender.wake)
        self.start_sender()
        code, answer = self.api.send()
        self.assertEqual(code, 200)
        self.assertEqual(self.wakes, 1)
        # Not one tick of the clock: only the wake can have started the claim.
        self.assertEqual(sorted(host for host, _ in self.smtp.sessions), ["mx.another.com", "mx.third.com"])
        self.assertEqual(result(self, self.store.submission(CLIENT_LABEL, answer["submission_id"])).status, "sent")

    def test_without_the_wake_the_poll_still_delivers(self) -> None:
        """issue 17 (W): the control: unwired, the same send waits for the next poll, which still finds it (the safety net)."""
        self.start_sender()
        code, _ = self.api.send()
        self.assertEqual(code, 200)
        self.assertEqual(self.smtp.sessions, [])
        self.clock.advance(SETTINGS.poll_interval)
        self.assertEqual(len(self.smtp.sessions), 2)

    def test_wake_before_start_claims_nothing(self) -> None:
        """issue 17 (W): a wake before the sender has reclaimed its previous run's envelopes is ignored, not an early claim."""
        self.wakeup.subscribe(self.sender.wake)
        code, _ = self.api.send()
        self.assertEqual(code, 200)
        self.assertEqual(self.wakes, 1)
        self.assertEqual(self.smtp.sessions, [])

    def test_scheduled_test_mode_and_refused_sends_do_not_wake(self) -> None:
        """issue 17 (W): only a commit of mail due now wakes: not a send_at ahead, not a 400, not an idempotent replay."""
        code, _ = self.api.send(send_at="2027-01-15T10:00:00Z")
        self.assertEqual(code, 200)
        code, _ = self.api.send(subject=None)
        self.assertEqual(code, 400)
        self.assertEqual(self.wakes, 0)
        code, _ = self.api.send(headers={"Idempotency-Key": "k1"})
        self.assertEqual((code, self.wakes), (200, 1))
        code, _ = self.api.send(headers={"Idempotency-Key": "k1"})
        self.assertEqual((code, self.wakes), (200, 1), "a replay queues nothing and wakes nobody")

    def test_a_failing_subscriber_does_not_fail_the_send(self) -> None:
        """issue 17 (W): the message is committed before the wake; a wake that raises is logged, the client still gets 200."""

        def broken() -> None:
            raise RuntimeError("boom")

        self.wakeup.subscribe(broken)
        code, _ = self.api.send()
        self.assertEqual(code, 200)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class CrossProcessWakeTests(SynchronousTestCase):
    """The wake directory: one Unix datagram socket per sender, a frontend sending one octet to each."""

    def setUp(self) -> None:
        # A short base (trial's mktemp paths are too long): a socket path has at most 107 octets.
        base = tempfile.mkdtemp(prefix="mmgun-wake-")
        self.addCleanup(shutil.rmtree, base, True)
        self.directory = os.path.join(base, "q.sqlite3.wake")
        self.reactor = MemoryReactorClock()
        self.clock = Clock()

    def listener(self, name: str, woken: list[str]) -> WakeListener:
        listener = WakeListener(self.directory, name, lambda: woken.append(name), self.reactor)
        listener.startService()
        def stop() -> None:
            if listener.running:
                listener.stopService()

        self.addCleanup(stop)
        return listener

    def notifier(self, own: str | None = None) -> WakeNotifier:
        notifier = WakeNotifier(self.directory, self.clock, own=own)
        self.addCleanup(notifier.close)
        return notifier

    def test_every_other_sender_is_woken_once_per_read(self) -> None:
        """issue 17 (W): three commits wake each sender of the directory; a sender's read drains them into one claim."""
        woken: list[str] = []
        first, second = self.listener("s1", woken), self.listener("s2", woken)
        self.assertIn(first, self.reactor.readers)
        notifier = self.notifier()
        self.assertEqual([notifier.notify() for _ in range(3)], [2, 2, 2])
        first.doRead()
        second.doRead()
        self.assertEqual(sorted(woken), ["s1", "s2"])
        first.doRead()
        self.assertEqual(sorted(woken), ["s1", "s2"], "nothing left to read: no second wake")

    def test_own_sender_is_not_sent_a_datagram(self) -> None:
        """issue 17 (W): the sender of the frontend's own process is woken directly, not once more by datagram."""
        woken: list[str] = []
        own = self.listener("mine", woken)
        self.listener("other", woken)
        self.assertEqual(self.notifier(own=own.path).notify(), 1)

    def test_directory_is_private(self) -> None:
        """issue 17 (W): the wake directory is made 0700: only who may write the queue may wake (or flood) its senders."""
        self.listener("s1", [])
        self.assertEqual(stat.S_IMODE(os.stat(self.directory).st_mode), 0o700)

    def test_dead_senders_socket_is_removed(self) -> None:
        """issue 17 (W): the socket a killed sender left behind refuses; the notifier removes it and stops sending there."""
        os.makedirs(self.directory, mode=0o700)
        stale = os.path.join(self.directory, "dead-1.sock")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(stale)
        sock.close()  # kill -9: the file stays, nobody reads it
        woken: list[str] = []
        live = self.listener("live", woken)
        notifier = self.notifier()
        self.assertEqual(notifier.notify(), 1)
        self.assertFalse(os.path.exists(stale))
        live.doRead()
        self.assertEqual(woken, ["live"])

    def test_full_buffer_never_blocks_the_frontend(self) -> None:
        """issue 17 (W): a sender that reads nothing fills its buffer; further wakes are dropped at once, never waited for."""
        listener = self.listener("slow", [])
        notifier = self.notifier()
        counts = [notifier.notify() for _ in range(100_000)]
        self.assertIn(0, counts, "the buffer filled up and the sends did not block")
        listener.doRead()

    def test_new_sender_is_found_after_the_listing_expires(self) -> None:
        """issue 17 (W): a sender started after the frontend is woken once the listing is read again (LISTING_TTL)."""
        notifier = self.notifier()
        self.assertEqual(notifier.notify(), 0)
        woken: list[str] = []
        late = self.listener("late", woken)
        self.clock.advance(LISTING_TTL)
        self.assertEqual(notifier.notify(), 1)
        late.doRead()
        self.assertEqual(woken, ["late"])

    def test_stop_removes_the_socket_and_the_reader(self) -> None:
        """issue 17 (W): a stopped sender leaves no socket behind for frontends to send to."""
        listener = self.listener("s1", [])
        listener.stopService()
        self.assertFalse(os.path.exists(listener.path))
        self.assertNotIn(listener, self.reactor.readers)

    def test_path_too_long_falls_back_to_polling(self) -> None:
        """issue 17 (W): a database path too deep for a Unix socket: one warning, no socket, the sender polls."""
        deep = os.path.join(self.directory, "x" * 120)
        listener = WakeListener(deep, "s1", lambda: None, self.reactor)
        from twisted.logger import capturedLogs

        with capturedLogs() as events:
            listener.startService()
        self.assertNotIn(listener, self.reactor.readers)
        self.assertTrue(any("not listening for wake-ups" in e.get("log_format", "") for e in events))
        listener.stopService()

    def test_wake_directory_is_beside_sqlite_only(self) -> None:
        """issue 17 (W): an SQLite database has its wake directory beside it; PostgreSQL has none (poll)."""
        self.assertEqual(wake_directory("var/mmgun.sqlite3"), os.path.abspath("var/mmgun.sqlite3") + ".wake")
        self.assertIsNone(wake_directory("postgresql://u@localhost/mmgun"))


class TwoProcessesWakeTests(TestCase):
    """A frontend and a sender as two service trees (two stores on one file), on the real reactor."""

    async def test_frontend_wakes_a_sender_of_another_tree(self) -> None:
        """
        issue 17 (W): with a poll interval of an hour, mail queued by a frontend-only tree is
        delivered by a sender-only tree within seconds: only the datagram in the wake directory can
        have started that claim (the sender's one poll, at start, ended before the POST).
        """
        folder = tempfile.mkdtemp(prefix="mmgun-wake-")
        self.addCleanup(shutil.rmtree, folder, True)
        await self._wake_across_trees(folder, os.path.join(folder, "q.sqlite3"))

    async def test_frontend_wakes_a_sender_of_another_tree_on_postgresql(self) -> None:
        """
        issue 17 (W2): the same on PostgreSQL, where no directory is shared: the frontend's
        submitting transaction sends NOTIFY mmgun_wake, and the sender tree's listener (its own
        connection, as a sender on another host has) hears it; the poll is an hour away.
        """
        from . import pgcluster

        folder = tempfile.mkdtemp(prefix="mmgun-wake-")
        self.addCleanup(shutil.rmtree, folder, True)
        await self._wake_across_trees(folder, pgcluster.new_database("wake_trees"))

    async def test_one_process_on_postgresql_is_woken_once_per_submission(self) -> None:
        """
        issue 17 (W2): a process with every role on PostgreSQL hears its own submissions'
        NOTIFY, so its frontend must not wake its sender directly as well (each submission made
        two claims, the second one empty): every wake of the sender comes from the listener,
        and the mail is still delivered at once with the poll an hour away.
        """
        import sys

        from twisted.internet import reactor

        from mmgun.config import Options
        from mmgun.sender import Sender as SenderRole
        from mmgun.service import make_service
        from mmgun.testing.ports import port_number
        from mmgun.testing.smtpserver import Mailbox, smtp_server_factory

        from . import pgcluster
        from .helpers import CLIENT, http_url, wait_until

        folder = tempfile.mkdtemp(prefix="mmgun-wake-")
        self.addCleanup(shutil.rmtree, folder, True)
        callers: list[str] = []
        wake = SenderRole.wake

        def counted(sender: SenderRole) -> None:
            callers.append(sys._getframe(1).f_code.co_name)
            wake(sender)

        self.patch(SenderRole, "wake", counted)
        clients = os.path.join(folder, "clients")
        with open(clients, "w") as f:
            f.write(CLIENT + "\n")
        mailbox = Mailbox()
        smtp = reactor.listenTCP(0, smtp_server_factory(reactor, mailbox, tls=False), interface="127.0.0.1")
        self.addCleanup(smtp.stopListening)
        options = Options({})
        options.parseOptions([
            "--database", pgcluster.new_database("wake_one_process"), "--clients", clients, "--poll-interval", "1h",
            "--relay-host", f"127.0.0.1:{port_number(smtp)}", "--helo", "mmgun.test", "--nameserver", "127.0.0.1:53",
            "--listen", "tcp:0:interface=127.0.0.1",
        ])  # fmt: skip
        service = make_service(options.config, reactor)
        service.startService()
        self.addCleanup(service.stopService)
        (sender,) = [s for s in _walk(service) if isinstance(s, SenderRole)]
        (listener,) = [s for s in _walk(service) if isinstance(s, NotifyListener)]
        await wait_until(lambda: listener.listening, "the sender's LISTEN")
        await wait_until(lambda: sender._poller.running and not sender._claiming, "the sender's first poll")
        for n in range(3):
            response = await treq.post(http_url(service) + "/send", data=json.dumps({
                "client_id": CLIENT, "sender": "me@example.com", "recipients": [f"a{n}@x.example"], "subject": "s", "body": "b",
            }).encode(), persistent=False)  # fmt: skip
            self.assertEqual(response.code, 200)
            await response.content()
            await wait_until(partial(_count_is, mailbox.messages, n + 1), "the delivery", deadline=10.0)
        self.assertTrue(callers)
        self.assertEqual(set(callers), {"_call_wake"}, "every wake comes from the NOTIFY listener")

    async def _wake_across_trees(self, folder: str, database: str) -> None:
        from twisted.internet import reactor

        from mmgun.config import Options
        from mmgun.sender import Sender as SenderRole
        from mmgun.service import make_service
        from mmgun.testing.ports import port_number
        from mmgun.testing.smtpserver import Mailbox, smtp_server_factory

        from .helpers import CLIENT, wait_until

        clients = os.path.join(folder, "clients")
        with open(clients, "w") as f:
            f.write(CLIENT + "\n")
        mailbox = Mailbox()
        smtp = reactor.listenTCP(0, smtp_server_factory(reactor, mailbox, tls=False), interface="127.0.0.1")
        self.addCleanup(smtp.stopListening)
        common = [
            "--database", database, "--clients", clients, "--poll-interval", "1h",
            "--relay-host", f"127.0.0.1:{port_number(smtp)}", "--helo", "mmgun.test", "--nameserver", "127.0.0.1:53",
        ]  # fmt: skip

        def tree(*words: str) -> Any:
            options = Options({})
            options.parseOptions([*common, *words])
            service = make_service(options.config, reactor)
            service.startService()
            self.addCleanup(service.stopService)
            return service

        sender_tree = tree("--role", "sender")
        (sender,) = [s for s in _walk(sender_tree) if isinstance(s, SenderRole)]
        # Its poll at start has run (and found nothing): from now on, only a wake makes it claim.
        directory = wake_directory(database)
        if directory is None:
            (listener,) = [s for s in _walk(sender_tree) if isinstance(s, NotifyListener)]
            await wait_until(lambda: listener.listening, "the sender's LISTEN")
        else:
            self.assertEqual([s for s in _walk(sender_tree) if isinstance(s, NotifyListener)], [])
        await wait_until(lambda: sender._poller.running and not sender._claiming, "the sender's first poll")
        if directory is not None:
            self.assertEqual(len(os.listdir(directory)), 1)
        frontend_tree = tree("--role", "frontend", "--listen", "tcp:0:interface=127.0.0.1")
        from .helpers import http_url

        url = http_url(frontend_tree)
        response = await treq.post(url + "/send", data=json.dumps({
            "client_id": CLIENT, "sender": "me@example.com", "recipients": ["a@x.example"], "subject": "s", "body": "b",
        }).encode(), persistent=False)  # fmt: skip
        self.assertEqual(response.code, 200)
        await response.content()
        await wait_until(lambda: len(mailbox.messages) == 1, "the delivery", deadline=10.0)
        self.assertEqual([tuple(m.recipients) for m in mailbox.messages], [("a@x.example",)])


def _count_is(items: list[Any], count: int) -> bool:
    return len(items) == count


def _walk(service: Any) -> Any:
    from twisted.application.service import MultiService

    yield service
    if isinstance(service, MultiService):
        for child in service:
            yield from _walk(child)
