"""
Fake peers shipped with mmgun so its unit tests and end-to-end scripts share
them: a scriptable ESMTP server that records what it accepts
(L{mmgun.testing.smtpserver}), a tiny authoritative DNS server
(L{mmgun.testing.dnsserver}), and L{port_number} for the port a listener got.
"""

from mmgun.testing.dnsserver import (
    SERVFAIL,
    TIMEOUT,
    TRUNCATED,
    ZoneResolver,
    dns_server_factory,
    listen_dns,
    parse_zone,
)
from mmgun.testing.ports import port_number
from mmgun.testing.smtpserver import (
    Mailbox,
    Maildir,
    Received,
    self_signed_context,
    smtp_server_factory,
)

__all__ = [
    "SERVFAIL",
    "TIMEOUT",
    "TRUNCATED",
    "Mailbox",
    "Maildir",
    "Received",
    "ZoneResolver",
    "dns_server_factory",
    "listen_dns",
    "parse_zone",
    "port_number",
    "self_signed_context",
    "smtp_server_factory",
]
