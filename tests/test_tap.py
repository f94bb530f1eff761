"""The twistd plugin: installed, starts on a real port, refuses bad options with one line."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys

import treq
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from mmgun.config import Options
from mmgun.service import make_service

from .helpers import CLIENT, http_url

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


def twistd(*args: str, cwd: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([TWISTD, "--pidfile=", "-n", *args], capture_output=True, text=True, timeout=60, cwd=cwd, env=env)


class PluginTests(TestCase):
    def test_twistd_lists_mmgun(self) -> None:
        out = subprocess.run([TWISTD, "--help"], capture_output=True, text=True, timeout=60).stdout
        self.assertIn("mmgun", out)

    def test_bad_option_is_one_line(self) -> None:
        run = twistd("mmgun", "--smtp-port", "http")
        self.assertNotEqual(run.returncode, 0)
        self.assertEqual(run.stderr.strip().splitlines(), ["mmgun: --smtp-port: invalid literal for int() with base 10: 'http'"])

    def test_missing_clients_file_is_one_line(self) -> None:
        run = twistd("mmgun", "--clients", "/nonexistent/clients", "--database", self.mktemp())
        self.assertNotEqual(run.returncode, 0)
        self.assertEqual(run.stderr.strip().splitlines(), ["mmgun: clients file /nonexistent/clients does not exist"])

    def test_unopenable_database_is_one_line(self) -> None:
        clients = self.mktemp()
        with open(clients, "w") as f:
            f.write(CLIENT + "\n")
        run = twistd("mmgun", "--clients", clients, "--database", "/proc/nope/db.sqlite3")
        self.assertNotEqual(run.returncode, 0)
        self.assertEqual(len(run.stderr.strip().splitlines()), 1, run.stderr)
        self.assertIn("/proc/nope/db.sqlite3", run.stderr)


class ServiceTests(TestCase):
    """The real service tree on 127.0.0.1 port 0, driven over HTTP with treq."""

    def start(self, database: str, clients: str, roles: tuple[str, ...] = ("frontend",)) -> str:
        from twisted.internet import reactor

        options = Options({})
        args = ["--listen", "tcp:0:interface=127.0.0.1", "--database", database, "--clients", clients]
        for role in roles:
            args += ["--role", role]
        options.parseOptions(args)
        service = make_service(options.config, reactor)
        service.startService()
        self.addCleanup(service.stopService)
        return http_url(service)

    def setUp(self) -> None:
        from twisted.internet import reactor
        from twisted.web.client import HTTPConnectionPool

        self.pool = HTTPConnectionPool(reactor, persistent=False)

    def clients_file(self) -> str:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("# test clients\n" + CLIENT + "\n")
        return path

    @defer.inlineCallbacks
    def test_send_and_status_over_http(self):
        url = self.start(self.mktemp(), self.clients_file())
        response = yield treq.post(url + "/send", json={"client_id": CLIENT, "sender": "a@b.example", "recipients": ["c@d.example"], "subject": "s", "body": "b"}, pool=self.pool)
        self.assertEqual(response.code, 200)
        sent = yield response.json()
        response = yield treq.post(url + "/status", json={"client_id": CLIENT, "submission_id": sent["submission_id"]}, pool=self.pool)
        status = yield response.json()
        self.assertEqual((response.code, status["status"]), (200, "queued"))

    async def _concurrent_frontends(self) -> None:
        database, clients = self.mktemp(), self.clients_file()
        urls = [self.start(database, clients), self.start(database, clients)]
        requests = [
            treq.post(urls[i % 2] + "/send", json={"client_id": CLIENT, "sender": "a@b.example", "recipients": [f"r{i}@d.example", f"r{i}@e.example"], "subject": f"n{i}", "body": "b"}, pool=self.pool)
            for i in range(200)
        ]
        responses = await defer.gatherResults(requests)
        self.assertEqual({r.code for r in responses}, {200})
        ids = [(await r.json())["submission_id"] for r in responses]
        self.assertEqual(len(set(ids)), 200)
        conn = sqlite3.connect(database)
        self.addCleanup(conn.close)
        self.assertEqual(conn.execute("SELECT count(*) FROM submissions").fetchone(), (200,))
        self.assertEqual(conn.execute("SELECT count(*) FROM envelopes").fetchone(), (400,))
        stored = {row[0] for row in conn.execute("SELECT id FROM submissions")}
        self.assertEqual(stored, set(ids))

    def test_two_frontends_on_one_database_lose_nothing(self) -> Deferred:
        return Deferred.fromCoroutine(self._concurrent_frontends())
