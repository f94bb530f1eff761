"""
The outgoing ESMTP client: one SMTP session to one MX address, carrying one or
more mail transactions, each ending in a definite per-recipient outcome.

Built on L{twisted.mail.smtp.ESMTPClient}, which does the greeting, EHLO (with
the HELO fallback), STARTTLS and the idle timeout (L{mmgun.smtp.handshake}).
The mail transactions themselves (MAIL, RCPT, DATA, RSET) are driven by a
sans-I/O L{mmgun.smtp.driver.Driver} rather than through ESMTPClient's
C{getMailFrom}/C{getMailTo}/C{sentMail}, because the stock ones would lose
what this package has to report:

    - C{quoteaddr} runs every address through C{email.utils.parseaddr}, which
      rewrites some valid addresses (C{"a,b@c.example"} becomes C{<a>});
    - C{sentMail} gets the same C{code} for "MAIL FROM refused", "DATA
      refused" and "end of data refused", and C{successAddresses} is not reset
      between messages;
    - C{transformChunk} dot-stuffs each 16 KiB chunk on its own (a "." line at
      a chunk boundary goes out unstuffed) and turns CRLF into CR CR LF: the
      body is instead put in its wire form once, by L{wire_form};
    - its factories reconnect and re-send after a connection drops, even after
      the final "." went out; this package never reconnects once a transaction
      has started.

When the server's EHLO reply lists PIPELINING (RFC 2920), each transaction's
MAIL FROM, RCPT TOs and DATA (after a failed transaction: RSET first) go out
in one write, and the replies are then read in order; a body of up to 256 KiB
goes out in one more write with its final "." and the next transaction's
commands (L{mmgun.smtp.session}). Without PIPELINING, every command waits for
the previous one's reply.

A message with a byte of 0x80 or more goes out with C{MAIL FROM:<...>
BODY=8BITMIME} when the server's EHLO reply lists 8BITMIME (RFC 6152); when
it does not (or after the HELO fallback), that transaction is not sent: its
recipients fail permanently (554 5.6.3). It is not converted to 7 bit.

A transaction with a UTF-8 address or header field (RFC 6531, 6532) goes out with
C{SMTPUTF8} on MAIL FROM when the server offers it; when it does not, its
recipients fail permanently (553 5.6.7), nothing sent, no address converted. When
the server offers SIZE (RFC 1870), MAIL FROM carries C{SIZE=}; a message larger
than the server's declared limit fails permanently before anything is sent (552 5.3.4).

The caller gets one L{TransactionResult} per L{Transaction} (each recipient's
L{Status} and L{Reply}), or L{SessionFailed} when nothing was attempted on
this host.

L{SessionCache} keeps sessions open between calls (no QUIT) for the next
call to the same MX, which then skips TCP, EHLO and STARTTLS; a parked
session the peer closed, or spoke on, is dropped and never reused.

Modules: L{outcome} (what is reported), L{wire} (what is written), L{driver}
(the transactions), L{handshake} and L{session} (the protocol), L{tls},
L{settings}, L{client} (L{send_session}) and L{cache} (L{SessionCache}).
"""

from .cache import SessionCache
from .client import send_session
from .outcome import RecipientResult, Reply, SessionFailed, Status, TransactionResult, parse_reply
from .session import QUIT_TIMEOUT
from .settings import SMTPSettings, TLSMode
from .wire import Transaction, message_size, wire_form

__all__ = [
    "QUIT_TIMEOUT",
    "RecipientResult",
    "Reply",
    "SMTPSettings",
    "SessionCache",
    "SessionFailed",
    "Status",
    "TLSMode",
    "Transaction",
    "TransactionResult",
    "message_size",
    "parse_reply",
    "send_session",
    "wire_form",
]
