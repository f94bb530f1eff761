"""Every setting of the HTTP frontend, resolved once (``mmgun.service.make_service``) from the Config."""

from __future__ import annotations

import attrs

MiB = 1024 * 1024


@attrs.frozen(kw_only=True)
class WebSettings:
    """
    What the frontend's Site, connections, requests and APIs read; nothing of it is
    looked up anywhere else (no attribute stuck onto a Site and read back).
    """

    #: The host name of this relay: the domain of the Message-IDs it makes.
    hostname: str
    #: Recipients one submission may name.
    max_recipients: int = 1000
    #: Bytes of a request body; a longer body is not buffered (413).
    max_message_size: int = 10 * MiB
    #: Seconds for a whole request to arrive, from the accept (or a keep-alive request's first byte); 0: no deadline.
    request_timeout: float = 30.0
    #: Submissions per second per client (0: no limit), and the burst allowed above it.
    rate_limit: float = 0.0
    rate_burst: float = 1.0
    #: Open HTTP connections in all, and from one source (an IPv4 address or an IPv6 /64).
    max_connections: int = 4000
    max_connections_per_source: int = 1000
    #: Whose senders a client may use: "any" address, or only its own sending "domains" (403 otherwise).
    sender_policy: str = "any"
    #: Failed authentications from one address before it is slowed to this many a minute.
    max_auth_failures: int = 10
