"""
What the SMTP client reports: one L{Status} and one L{Reply} per recipient,
gathered per transaction in a L{TransactionResult}, or L{SessionFailed} when
nothing was attempted on a host. The same types go on from the sender to the
store, where a L{Status} is stored as its value ("sent", "failed", "deferred").
"""

from __future__ import annotations

import enum
import re

import attrs

__all__ = ["RecipientResult", "Reply", "SessionFailed", "Status", "TransactionResult"]


class Status(enum.StrEnum):
    """A recipient's outcome; the value is what the store and the events say."""

    #: The MX took the message for this recipient (a 2xx to the final ".").
    SENT = "sent"
    #: Permanently refused (a 5xx): not tried again.
    FAILED = "failed"
    #: Not delivered this time (a 4xx, a lost connection, a timeout): tried again later.
    DEFERRED = "deferred"

    @classmethod
    def for_code(cls, code: int) -> Status:
        """FAILED for a 5xx reply, DEFERRED for anything else that is not a success."""
        return cls.FAILED if 500 <= code < 600 else cls.DEFERRED


@attrs.frozen
class Reply:
    """
    An SMTP reply, as received or as synthesized by this package.

    C{text} is the reply without its code; the lines of a multi-line reply
    are joined with a space. C{received}: it is the peer's own reply (made by
    L{parse_reply}), not one made up here or wrapping another; only a received
    reply's text is worth reading for what the peer means (L{mmgun.backoff.classify}:
    a synthesized one names hosts, which may contain any word).
    """

    code: int
    text: str
    #: Not part of equality: where a reply came from does not change what it says.
    received: bool = attrs.field(default=False, eq=False, kw_only=True)

    def __str__(self) -> str:
        return f"{self.code} {self.text}" if self.text else str(self.code)

    @classmethod
    def parse(cls, reply: str) -> Reply:
        """The inverse of C{str()}: C{"451 4.4.3 lookup failed"} is C{Reply(451, "4.4.3 lookup failed")}."""
        code, _, text = reply.partition(" ")
        return cls(int(code), text)


def _status(value: str) -> Status:
    return Status(value)


@attrs.frozen
class RecipientResult:
    """
    One recipient's L{Status} and the reply that decided it.

    C{at_rcpt}: the reply answered this recipient's own RCPT TO (not MAIL FROM or the
    message, whose refusal says nothing about the address).
    """

    status: Status = attrs.field(converter=_status)
    reply: Reply
    #: Not part of equality: a result is its status and reply; this says which command drew it.
    at_rcpt: bool = attrs.field(default=False, eq=False)


@attrs.frozen
class TransactionResult:
    """
    The outcome of one L{mmgun.smtp.Transaction}: one entry per (distinct) recipient.
    C{started} is C{False} when the session ended before its MAIL FROM was
    sent, or (with PIPELINING) while its MAIL FROM, RCPT TOs and DATA, sent
    behind the previous message's final ".", were still unanswered: none of
    its message went out, so another host can be tried at once without risk
    of a duplicate. All its recipients are then deferred.
    """

    key: object
    started: bool
    recipients: dict[str, RecipientResult]


class SessionFailed(Exception):
    """
    Nothing was attempted on this host: connect failure or timeout, 4xx/5xx
    greeting, EHLO and HELO refused, TLS required but not offered or failed.
    The caller then tries the next MX.

    @ivar reply: the peer's reply, or one synthesized here (code 421).
    @ivar connected: C{False} when no connection was made (refused, timed
        out): no SMTP session took place.
    """

    def __init__(self, reply: Reply, *, connected: bool = True) -> None:
        super().__init__(str(reply))
        self.reply = reply
        self.connected = connected


_ENHANCED_STATUS = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}(?= |$)")
# What a peer's reply must not carry into last_reply and the logs: C0 and C1
# controls, DEL, and the other characters str.splitlines() and log viewers
# break lines at (U+2028, U+2029; U+0085 is C1), and bidirectional overrides
# that make a logged line read differently from what it says.
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def parse_reply(code: int, resp: bytes | str) -> Reply:
    """
    Turn a reply's text lines (joined with "\\n", without codes, as
    L{twisted.mail.smtp.SMTPClient} hands them to its state callbacks) into a
    L{Reply}. An enhanced status code repeated on every line of a multi-line
    reply is kept only once.
    """
    text = resp.decode("utf-8", "replace") if isinstance(resp, bytes) else resp
    lines = [CONTROL.sub(" ", line).strip() for line in text.split("\n")]
    status = _ENHANCED_STATUS.match(lines[0])
    if status is not None:
        prefix = status.group(0)
        lines[1:] = [line[len(prefix) :].lstrip() if line.startswith(prefix) else line for line in lines[1:]]
    return Reply(code, " ".join(line for line in lines if line), received=True)
