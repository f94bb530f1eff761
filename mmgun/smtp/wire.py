"""
What goes on the wire in a mail transaction: the L{Transaction} to send, its
body in wire form (L{wire_form}), the address checks that keep a command to
one line, and the MAIL FROM / RCPT TO command lines.

A mail-transaction parameter (RFC 5321 4.1.2 Mail-parameters: C{BODY=8BITMIME},
C{SMTPUTF8}, C{SIZE=}) is added in L{mail_command}; the server's EHLO keywords
that decide it are in L{Extensions}.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import attrs

from ..message import header_needs_smtputf8, transaction_needs_smtputf8

__all__ = ["Extensions", "Transaction", "check_address", "mail_command", "message_size", "rcpt_command", "wire_form"]


def _recipients(addresses: Iterable[str]) -> tuple[str, ...]:
    return tuple(addresses)


@attrs.frozen
class Transaction:
    """
    One message to send. Domains are already IDNA-encoded (A-labels); a local
    part may be UTF-8 (RFC 6531), and the transaction then needs SMTPUTF8. An
    empty C{mail_from} is the null reverse-path C{<>}. C{message} is the RFC 5322
    message with CRLF line endings, not dot-stuffed.
    """

    key: object
    mail_from: str
    recipients: tuple[str, ...] = attrs.field(converter=_recipients)
    message: bytes
    #: C{wire_form(message)}, when the caller already has it: the sender computes it
    #: once per message, not once per transaction (a 2 MB message to 1,000 domains).
    wire: bytes | None = attrs.field(default=None, kw_only=True, repr=False)
    #: Whether the message has a byte of 0x80 or more, so that it goes out only as
    #: C{BODY=8BITMIME} (RFC 6152), to a server that offers it. Like C{wire}, the sender
    #: gives it once per message; made from C{message} when not given.
    eight_bit: bool = attrs.field(
        default=attrs.Factory(lambda self: not self.message.isascii(), takes_self=True), kw_only=True
    )
    #: Whether it goes out only with C{SMTPUTF8} (RFC 6531), to a server that offers it: a
    #: UTF-8 address, or a UTF-8 header (RFC 6532). The sender gives the header's part once
    #: per message (L{mmgun.message.transaction_needs_smtputf8}); made here when not given.
    smtputf8: bool = attrs.field(
        default=attrs.Factory(
            lambda self: transaction_needs_smtputf8(self.mail_from, self.recipients, header_needs_smtputf8(self.message)),
            takes_self=True,
        ),
        kw_only=True,
    )
    #: The message's size as RFC 1870 counts it (L{message_size}), for C{SIZE=}; the sender
    #: gives it once per message; made from the payload when not given.
    size: int = attrs.field(default=attrs.Factory(lambda self: message_size(self.payload()), takes_self=True), kw_only=True)

    def payload(self) -> bytes:
        """The DATA payload: L{wire_form} of the message."""
        return self.wire if self.wire is not None else wire_form(self.message)

    def distinct_recipients(self) -> tuple[str, ...]:
        """The recipients in order, each once: one RCPT TO each."""
        return tuple(dict.fromkeys(self.recipients))


@attrs.frozen
class Extensions:
    """
    The service extensions of the server's last EHLO reply that matter to a
    transaction (none after HELO; RFC 3207 4.2: forgotten at STARTTLS).
    """

    #: RFC 2920: the commands of a transaction need not wait for each other's replies.
    pipelining: bool = False
    #: RFC 6152: an 8-bit message may go out, with C{BODY=8BITMIME}.
    eight_bit_mime: bool = False
    #: RFC 6531: a transaction with UTF-8 addresses or header fields may go out, with C{SMTPUTF8}.
    smtputf8: bool = False
    #: RFC 1870: None when SIZE is not offered; else the largest message the server takes,
    #: 0 for no fixed limit (SIZE without a number, or SIZE 0).
    size: int | None = None

    @classmethod
    def from_ehlo(cls, lines: Iterable[bytes]) -> Extensions:
        """
        From the EHLO reply's lines after the first, each a keyword and its parameters
        (RFC 5321 4.1.1.1: keywords are case-insensitive).
        """
        found: dict[bytes, bytes] = {}
        for line in lines:
            keyword, _, parameters = line.strip().partition(b" ")
            if keyword:
                found.setdefault(keyword.upper(), parameters.strip())
        size = found.get(b"SIZE")
        return cls(
            pipelining=b"PIPELINING" in found,
            eight_bit_mime=b"8BITMIME" in found,
            smtputf8=b"SMTPUTF8" in found,
            size=None if size is None else int(size) if size.isdigit() and len(size) <= 20 else 0,
        )


_ANY_LINE_BREAK = re.compile(rb"\r\n|\r|\n")


def wire_form(message: bytes) -> bytes:
    """
    The DATA payload as written on the wire: every line CRLF terminated (a
    stray CR or LF becomes CRLF), every line starting with "." dot-stuffed
    (RFC 5321 4.5.2). The client adds the terminating ".\\r\\n" once. Pure.

    Normalising bare CR and LF, rather than passing them on, is what keeps a
    body from ending the DATA early at servers that accept "\\n.\\n" as the
    end of data (SMTP smuggling).
    """
    if not message:
        return b""
    wire = _ANY_LINE_BREAK.sub(b"\r\n", message)
    if not wire.endswith(b"\r\n"):
        wire += b"\r\n"
    # Every line now starts at offset 0 or right after a CRLF.
    wire = wire.replace(b"\r\n.", b"\r\n..")
    if wire.startswith(b"."):
        wire = b"." + wire
    return wire


def message_size(wire: bytes) -> int:
    """
    The size RFC 1870 declares for L{wire_form} C{wire}: its octets, CRLFs
    included, but not the dots added by dot-stuffing (nor the final "." line).
    """
    return len(wire) - wire.count(b"\r\n..") - wire.startswith(b"..")


#: What no address on a command line may hold: angle brackets, C0 controls, DEL and C1, the
#: line and paragraph separators, lone surrogates (one search, not a Python loop per character).
_NOT_IN_ADDRESS = re.compile("[<>\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def check_address(address: str, what: str) -> None:
    """
    @raise ValueError: C{address} has a control character (C0, DEL, C1, a line
        separator) or an angle bracket (it would end or break the command line it
        goes in), or a lone surrogate (no UTF-8 form). Non-ASCII is otherwise
        allowed: a UTF-8 local part goes out with SMTPUTF8 (RFC 6531).
    """
    if _NOT_IN_ADDRESS.search(address):
        raise ValueError(f"{what} {address!r} is not an address without control characters or angle brackets")


def mail_command(transaction: Transaction, extensions: Extensions) -> bytes:
    """
    MAIL FROM with its parameters, for a server whose EHLO reply listed
    C{extensions}: C{BODY=8BITMIME} for an 8-bit message (RFC 6152 3; a 7-bit one
    has no BODY parameter), C{SMTPUTF8} for an internationalized one (RFC 6531 3.4),
    C{SIZE=} when the server offers SIZE (RFC 1870 6). The address in UTF-8 (ASCII
    unless SMTPUTF8; L{refusal<mmgun.smtp.driver.refusal>} keeps such a transaction
    from a server without it).
    """
    command = b"MAIL FROM:<" + transaction.mail_from.encode("utf-8") + b">"
    if transaction.eight_bit:
        command += b" BODY=8BITMIME"
    if transaction.smtputf8:
        command += b" SMTPUTF8"
    if extensions.size is not None:
        command += b" SIZE=%d" % transaction.size
    return command


def rcpt_command(recipient: str) -> bytes:
    return b"RCPT TO:<" + recipient.encode("utf-8") + b">"
