"""
mmgun's SMTP client against a real MTA that is not ours (issue 18: "other real MTAs will be
tried against it"): a private Postfix smtpd on 127.0.0.1 (Debian's postfix, as the bench runs
it: bench/postfix.py), with a small ``message_size_limit``. Plain ASCII mail, internationalized
mail (SMTPUTF8, RFC 6531) and a message over the limit (SIZE, RFC 1870) in one pipelined
session. Postfix's daemons need root; skipped where that or Postfix is missing.
"""

from __future__ import annotations

import importlib.util
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from mmgun.smtp import SMTPSettings, Status, TLSMode, Transaction, send_session

from .helpers import wait_until

#: Postfix refuses larger messages; mmgun should not even start sending one.
SIZE_LIMIT = 4000


def _bench_postfix() -> Any:
    """bench/postfix.py (the bench is not a package): the private instance the comparison runs use."""
    path = Path(__file__).resolve().parent.parent / "bench" / "postfix.py"
    spec = importlib.util.spec_from_file_location("mmgun_bench_postfix", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def message(recipient: str, body: bytes = b"hello\r\n") -> bytes:
    return (
        b"From: ada@example.com\r\nTo: " + recipient.encode("utf-8") + b"\r\nSubject: real MTA\r\n"
        b"Date: Sun, 06 Dec 2026 00:00:00 +0000\r\nMessage-ID: <real-mta@example.com>\r\n\r\n" + body
    )


class PostfixTests(TestCase):
    def setUp(self) -> Any:  # a Deferred: trial waits for it
        postfix = _bench_postfix()
        why_not = postfix.available()
        if why_not is not None:
            raise SkipTest(why_not)
        # Postfix's daemons run as the postfix user: a folder it can search (not trial's _trial_temp under /root).
        folder = Path(tempfile.mkdtemp(prefix="mmgun-postfix-", dir="/tmp"))
        folder.chmod(0o755)
        self.addCleanup(shutil.rmtree, folder, True)
        self.port = _free_port()
        # Its relay host is a closed port: what it queues stays in its queue, deferred, until it is stopped.
        self.instance = postfix.PostfixInstance(folder / "postfix", self.port, _free_port())
        with open(self.instance.config / "main.cf", "a") as f:
            f.write(f"message_size_limit = {SIZE_LIMIT}\nsmtputf8_enable = yes\n")
        self.addCleanup(lambda: deferToThread(self.instance.stop))
        return deferToThread(self.instance.start)

    async def test_ascii_utf8_and_oversized_mail_against_postfix(self) -> None:
        """
        issue 18 (SMTPUTF8, SIZE, against a real MTA): Postfix offers PIPELINING, SIZE 4000 and
        SMTPUTF8; mmgun's client queues an ASCII message and one to a UTF-8 local part (MAIL FROM
        with SMTPUTF8, Postfix answers 250 queued) and fails the 5 KB one permanently with 552 5.3.4
        naming Postfix's limit, before sending it — in one session.
        """
        transactions = [
            Transaction("ascii", "ada@example.com", ["bob@example.net"], message("bob@example.net")),
            Transaction("utf8", "ada@example.com", ["josé@example.net"], message("josé@example.net")),
            Transaction("big", "ada@example.com", ["carol@example.net"], message("carol@example.net", b"x" * 5000 + b"\r\n")),
        ]
        settings = SMTPSettings(helo="mmgun.test", tls=TLSMode.OPPORTUNISTIC, command_timeout=30, connect_timeout=10)
        results = await Deferred.fromCoroutine(
            send_session(reactor, "postfix.test", "127.0.0.1", self.port, transactions, settings)
        )
        outcome = {r.key: next(iter(r.recipients.items())) for r in results}
        address, ascii_result = outcome["ascii"]
        self.assertEqual((address, ascii_result.status), ("bob@example.net", Status.SENT), ascii_result.reply)
        self.assertIn("queued as", str(ascii_result.reply))
        address, utf8_result = outcome["utf8"]
        self.assertEqual((address, utf8_result.status), ("josé@example.net", Status.SENT), utf8_result.reply)
        address, big_result = outcome["big"]
        self.assertEqual(big_result.status, Status.FAILED)
        self.assertEqual(big_result.reply.code, 552)
        self.assertIn(f"exceeds the limit {SIZE_LIMIT}", str(big_result.reply))
        # Postfix's own count of the session's commands: two transactions, not three — the
        # oversized one never got as far as its MAIL FROM.
        await wait_until(lambda: "disconnect from unknown[127.0.0.1] ehlo=" in self._log(), "Postfix's disconnect line", deadline=20)
        log = self._log()
        self.assertIn(" ehlo=1 mail=2 rcpt=2 data=2 quit=1 ", log)
        self.assertEqual(log.count("message-id=<real-mta@example.com>"), 2)

    def _log(self) -> str:
        maillog: Path = self.instance.maillog
        return maillog.read_text(errors="replace") if maillog.exists() else ""
