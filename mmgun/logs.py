"""``--log-format json``: one JSON object per line (twisted.logger's own format), for log shippers."""

from __future__ import annotations

import sys

from twisted.logger import ILogObserver, jsonFileLogObserver


def json_observer() -> ILogObserver:
    """The log observer factory twistd's ``--logger`` takes; writes to standard output."""
    return jsonFileLogObserver(sys.stdout, recordSeparator="")  # plain JSON Lines, no RS (RFC 7464) prefix
