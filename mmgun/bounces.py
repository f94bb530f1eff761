"""
Which permanent refusals mean that a mailbox does not exist, so that the address joins its
client's bounce list (issue 14) and is not mailed again until someone removes it.

Only a receiving MX's reply to the recipient's own RCPT TO is judged (the sender knows which;
a refusal of MAIL FROM or of the message's content is about the sender or the message): a 5xx
that says the address is bad (enhanced status codes 5.1.1 bad mailbox, 5.1.2 bad domain,
5.1.3 bad syntax, 5.1.6 moved, 5.1.10 null MX, and 5.2.1 "mailbox disabled", RFC 3463 and
7505), or a bare 550, 551 or 553 without an enhanced code (receivers that give none mostly
mean "no such user"). A refusal for policy (5.7.x: spam, authentication), a full mailbox
(5.2.2), a message problem (5.6.x) or the ambiguous 5.1.0 (often about the sender) does not
make the address bad.
"""

from __future__ import annotations

import re

#: Enhanced status codes (RFC 3463) that say the address is bad.
MAILBOX_GONE = frozenset({"5.1.1", "5.1.2", "5.1.3", "5.1.6", "5.1.10", "5.2.1"})
#: Basic codes that, without an enhanced code, are taken to mean "no such mailbox".
BARE_CODES = frozenset({"550", "551", "553"})

_REPLY = re.compile(r"\A(\d{3})[ -](?:(\d\.\d{1,3}\.\d{1,3})\b)?")


def mailbox_gone(reply: str) -> bool:
    """Whether an MX's permanent refusal ``reply`` ("550 5.1.1 no such user") says the mailbox does not exist."""
    match = _REPLY.match(reply)
    if match is None or not match.group(1).startswith("5"):
        return False
    code, enhanced = match.groups()
    if enhanced is not None:
        return enhanced in MAILBOX_GONE
    return code in BARE_CODES
