"""
SMTP submission (issues 16 and 18) driven by swaks, a real SMTP client that is not ours:
STARTTLS then AUTH on a public listener, PIPELINING, AUTH LOGIN, and a refused password —
each against a real listener on 127.0.0.1 port 0, the reactor serving while swaks runs
in a thread. Skipped where swaks is not installed (``.ci/run`` installs it).
"""

from __future__ import annotations

import shutil
import subprocess

from twisted.trial.unittest import SkipTest

from .test_submission import SubmissionCase

SWAKS = shutil.which("swaks")

BODY = (
    "From: Ada <ada@example.com>\r\nTo: bob@another.example\r\nSubject: from swaks\r\n"
    "Date: Sat, 05 Dec 2026 17:32:15 +0000\r\nMessage-ID: <swaks-1@example.com>\r\n"
    "\r\nhello from swaks\r\n.leading dot\r\n"
)


class SwaksTests(SubmissionCase):
    def setUp(self) -> None:
        if SWAKS is None:
            raise SkipTest("swaks is not installed")
        super().setUp()

    def swaks(self, port: int, *words: str) -> subprocess.CompletedProcess[str]:
        """swaks against ``port`` with ``words``, in a thread (it blocks); its exit status and transcript."""
        assert SWAKS is not None
        command = [SWAKS, "--server", "127.0.0.1", "--port", str(port), "--helo", "client.test", "--timeout", "10", *words]
        return subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)

    async def _send(self, port: int, *words: str) -> subprocess.CompletedProcess[str]:
        return await self.client(
            lambda: self.swaks(
                port,
                "--from", "ada@example.com", "--to", "bob@another.example,carol@third.example",
                "--data", BODY, *words,
            )  # fmt: skip
        )

    async def test_starttls_then_auth_plain(self) -> None:
        """issue 16 (swaks): on a public listener swaks upgrades with STARTTLS, then AUTH PLAIN, and the message is queued."""
        port = self.listen(local=False, tls=True)
        done = await self._send(port, "--tls", "--auth", "PLAIN", "--auth-user", "api", "--auth-password", self.key)
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        self.assertIn("<-  220 2.0.0 ready to start TLS", done.stdout)
        self.assertIn("=== TLS started", done.stdout)  # from here on, swaks marks lines inside TLS with ~
        self.assertNotIn("AUTH", done.stdout.split("=== TLS started")[0], "AUTH is offered only inside TLS")
        self.assertIn("~> AUTH PLAIN", done.stdout)
        self.assertIn("<~  235", done.stdout)
        self.assertIn("<~  250 2.0.0 queued as ", done.stdout)
        (submission,) = self.submissions()
        self.assertIn(submission, done.stdout)
        stored = self.stored(submission)
        # The stored message is what swaks sent, dot-unstuffed, after mmgun's Received field.
        self.assertIn(b"\r\n" + BODY.encode(), stored)

    async def test_auth_is_not_offered_in_clear_on_a_public_listener(self) -> None:
        """issue 16 (swaks): without STARTTLS a public listener offers no AUTH, so swaks cannot authenticate and nothing is queued."""
        port = self.listen(local=False, tls=True)
        done = await self._send(port, "--auth", "PLAIN", "--auth-user", "api", "--auth-password", self.key)
        self.assertNotEqual(done.returncode, 0)
        self.assertNotIn("235", done.stdout)
        self.assertEqual(self.submissions(), [])

    async def test_pipelining_auth_login(self) -> None:
        """issue 16 (swaks): AUTH LOGIN on loopback, then MAIL, RCPTs and DATA pipelined in one write (RFC 2920)."""
        port = self.listen()
        done = await self._send(port, "--pipeline", "--auth", "LOGIN", "--auth-user", "acme", "--auth-password", self.key)
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        self.assertIn("250-PIPELINING", done.stdout)
        self.assertIn("<-  250 2.0.0 queued as ", done.stdout)
        self.assertEqual(len(self.submissions()), 1)

    async def test_wrong_password_is_refused(self) -> None:
        """issue 16 (swaks): a wrong key gets 535 5.7.8 and swaks gives up; nothing is queued."""
        port = self.listen()
        done = await self._send(port, "--auth", "PLAIN", "--auth-user", "api", "--auth-password", "mk_wrong_key")
        self.assertNotEqual(done.returncode, 0)
        self.assertIn("535 5.7.8", done.stdout)
        self.assertEqual(self.submissions(), [])
