"""
Fake peers shipped with mmgun so its unit tests and end-to-end scripts share
them: a scriptable ESMTP server that records what it accepts
(L{mmgun.testing.smtpserver}) and a tiny authoritative DNS server
(L{mmgun.testing.dnsserver}).
"""

from mmgun.testing.dnsserver import (
    SERVFAIL,
    TIMEOUT,
    ZoneResolver,
    dns_server_factory,
    listen_dns,
    parse_zone,
)
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
    "Mailbox",
    "Maildir",
    "Received",
    "ZoneResolver",
    "dns_server_factory",
    "listen_dns",
    "parse_zone",
    "self_signed_context",
    "smtp_server_factory",
]
