"""
Delivery end to end inside one process, over real loopback sockets: the HTTP API,
a real twisted.names DNS server and real Twisted ESMTP servers with scripted faults.
"""

from __future__ import annotations

import json
from typing import Any, cast

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.names import dns
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool

from mmgun.testing.dnsserver import Records, listen_dns
from mmgun.testing.ports import port_number
from mmgun.testing.smtpserver import Mailbox, smtp_server_factory

from .helpers import CLIENT, start_mmgun

ZONE: Records = {
    "alpha.example": [dns.Record_MX(10, b"mx.alpha.example", ttl=60)],
    "mx.alpha.example": [dns.Record_A("127.0.0.2", ttl=60)],
    "beta.example": [dns.Record_MX(10, b"mx.beta.example", ttl=60)],
    "mx.beta.example": [dns.Record_A("127.0.0.3", ttl=60)],
    # The preferred MX is dead: nothing listens on 127.0.0.9.
    "gamma.example": [dns.Record_MX(10, b"dead.gamma.example", ttl=60), dns.Record_MX(20, b"backup.gamma.example", ttl=60)],
    "dead.gamma.example": [dns.Record_A("127.0.0.9", ttl=60)],
    "backup.gamma.example": [dns.Record_A("127.0.0.2", ttl=60)],
    "nullmx.example": [dns.Record_MX(0, b"", ttl=60)],
    "amx.example": [dns.Record_A("127.0.0.3", ttl=60)],
}

DEADLINE = 30.0


class DeliveryTests(TestCase):
    def setUp(self) -> None:
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        # The global reactor is typed as the interfaces every reactor provides; this one also does UDP.
        udp, tcp = listen_dns(cast(Any, reactor), ZONE)
        self.addCleanup(udp.stopListening)
        self.addCleanup(tcp.stopListening)
        self.dns_port = port_number(udp)
        self.mail = {"127.0.0.2": Mailbox(), "127.0.0.3": Mailbox()}
        first = reactor.listenTCP(0, smtp_server_factory(reactor, self.mail["127.0.0.2"], tls=True), interface="127.0.0.2")
        self.addCleanup(first.stopListening)
        self.smtp_port = port_number(first)
        second = reactor.listenTCP(self.smtp_port, smtp_server_factory(reactor, self.mail["127.0.0.3"], tls=False), interface="127.0.0.3")
        self.addCleanup(second.stopListening)

    async def post(self, url: str, body: dict[str, Any]) -> tuple[int, Any]:
        response = await treq.post(url, data=json.dumps(body).encode(), pool=self.pool)
        return response.code, json.loads(await response.content())

    async def wait_final(self, url: str, submission_id: str) -> dict[str, Any]:
        """Poll /status until the submission is finished, up to DEADLINE seconds."""
        deadline = reactor.seconds() + DEADLINE
        while True:
            code, status = await self.post(url + "/status", {"client_id": CLIENT, "submission_id": submission_id})
            self.assertEqual(code, 200)
            if status["status"] != "queued":
                return status
            if reactor.seconds() > deadline:
                self.fail(f"submission still queued after {DEADLINE}s: {status}")
            await deferLater(reactor, 0.05, lambda: None)

    async def _three_domains(self) -> None:
        url = start_mmgun(self, self.dns_port, self.smtp_port, allow_private_mx=True)
        recipients = ["ok@alpha.example", "tempfail-1@beta.example", "reject@beta.example", "x@gamma.example", "y@nullmx.example", "z@amx.example"]
        code, sent = await self.post(url + "/send", {
            "client_id": CLIENT, "sender": "me@example.com", "recipients": recipients,
            "subject": "Grüße", "body": "line 1\n.\nline 3\n",
        })
        self.assertEqual(code, 200)
        status = await self.wait_final(url, sent["submission_id"])
        self.assertEqual(status["status"], "partial")
        by_address = {r["address"]: r for r in status["recipients"]}
        self.assertEqual([r["address"] for r in status["recipients"]], recipients)
        summary = {a: (r["status"], r["attempts"], (r["last_reply"] or "")[:3]) for a, r in by_address.items()}
        self.assertEqual(summary, {
            "ok@alpha.example": ("sent", 1, "250"),
            "tempfail-1@beta.example": ("sent", 2, "250"),
            "reject@beta.example": ("failed", 1, "550"),
            "x@gamma.example": ("sent", 1, "250"),
            "y@nullmx.example": ("failed", 1, "556"),
            "z@amx.example": ("sent", 1, "250"),
        })
        self.assertEqual(by_address["reject@beta.example"]["last_reply"], "550 5.1.1 no such user")
        # What the servers got: the right envelope per domain, exactly once each.
        alpha_host = sorted(tuple(m.recipients) for m in self.mail["127.0.0.2"].messages)
        beta_host = sorted(tuple(m.recipients) for m in self.mail["127.0.0.3"].messages)
        self.assertEqual(alpha_host, [("ok@alpha.example",), ("x@gamma.example",)])
        self.assertEqual(beta_host, [("tempfail-1@beta.example",), ("z@amx.example",)])
        message = self.mail["127.0.0.2"].messages[0]
        self.assertEqual(message.mail_from, "me@example.com")
        self.assertTrue(message.tls)
        self.assertIn(b"Subject: =?utf-8?", message.data)
        # A plain ASCII body travels as it is: its "." line is dot-stuffed on the wire only.
        self.assertIn(b"\r\n\r\nline 1\r\n.\r\nline 3\r\n", message.data)
        self.assertIn(b"\r\n..\r\nline 3", message.raw)

    def test_three_domains_with_faults(self) -> Deferred:
        return Deferred.fromCoroutine(self._three_domains())

    async def _relay_host(self) -> None:
        url = start_mmgun(self, self.dns_port, self.smtp_port, "--relay-host", f"127.0.0.3:{self.smtp_port}", allow_private_mx=True)
        code, sent = await self.post(url + "/send", {
            "client_id": CLIENT, "sender": "me@example.com", "recipients": ["a@alpha.example", "b@nullmx.example"],
            "subject": "s", "body": "b",
        })
        status = await self.wait_final(url, sent["submission_id"])
        self.assertEqual(status["status"], "sent")
        self.assertEqual(sorted(tuple(m.recipients) for m in self.mail["127.0.0.3"].messages), [("a@alpha.example",), ("b@nullmx.example",)])

    def test_relay_host_skips_mx_lookup(self) -> Deferred:
        return Deferred.fromCoroutine(self._relay_host())
