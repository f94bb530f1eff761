"""
The mail transactions of one SMTP session (MAIL, RCPT, DATA, RSET), without
I/O: a L{Driver} is given each reply and says what to do next (an L{Action}).

The driver keeps two queues of L{_Command}s, each a command line with the
handler of its reply: those still to be written and those written and not yet
answered. Replies come in the order the commands went out (RFC 2920 3.1), so
each reply goes to the handler at the head of the second queue. With
PIPELINING every queued command is written at once (a transaction's MAIL
FROM, RCPT TOs and DATA, after a failed transaction with RSET first); without
it, one at a time, each once the previous one is answered. Which commands
make up a transaction, and what each reply means, is the same either way.

When the server's EHLO reply lists PIPELINING, a message of up to
C{ONE_WRITE_MAX} goes out in one write with its final "." and the next
transaction's commands (L{Driver.end_of_body} with C{then_next}): RFC 2920 3.1
lets message content lead a group.

A transaction that must not go to this server (L{refusal}: today an
8-bit message to a server without 8BITMIME) fails permanently before any of
its commands is written. A new check of that kind is one more case there; a
new MAIL FROM parameter goes in L{mmgun.smtp.wire.mail_command}.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Callable, Sequence
from typing import Literal

import attrs
from twisted.logger import Logger

from .outcome import RecipientResult, Reply, Status, TransactionResult, parse_reply
from .wire import Extensions, Transaction, mail_command, rcpt_command

__all__ = ["Action", "Done", "Driver", "GiveUp", "SendBody", "Write"]

_log = Logger(namespace="mmgun.smtp")


@attrs.frozen
class Write:
    """Write C{data} (whole command lines)."""

    data: bytes


@attrs.frozen
class SendBody:
    """
    The server said 354: write the message (C{transaction.payload()}), then what
    L{Driver.end_of_body} returns. A reply that comes before that is a protocol
    error the driver handles.
    """

    transaction: Transaction


@attrs.frozen
class Done:
    """Every transaction has its result. C{rset_due}: the server still has a transaction open."""

    rset_due: bool


@attrs.frozen
class GiveUp:
    """End the session: what is not settled gets C{reason} (see L{Driver.abandon})."""

    reason: Reply
    then: Literal["quit", "close", "abort"]


#: What to do after a reply; None: wait for the next one.
Action = Write | SendBody | Done | GiveUp | None

_Handler = Callable[[int, bytes | str], Action]


@attrs.frozen
class _Command:
    line: bytes
    #: What the session is waiting for while this is unanswered ("during RCPT TO").
    name: str
    handler: _Handler


@attrs.define(eq=False)
class _Progress:
    """One transaction's state."""

    transaction: Transaction
    recipients: tuple[str, ...] = attrs.field(init=False)
    outcomes: dict[str, RecipientResult] = attrs.Factory(dict)
    accepted: list[str] = attrs.Factory(list)
    #: The server has this transaction open (MAIL FROM accepted): RSET before the next one.
    mail_accepted: bool = False
    #: Every recipient has its result.
    settled: bool = False
    #: The body and its final "." went out: a reply now is the reply to ".".
    body_sent: bool = False
    last_reply: Reply | None = None

    def __attrs_post_init__(self) -> None:
        self.recipients = self.transaction.distinct_recipients()


def _ok(code: int) -> bool:
    return 200 <= code < 300


def refusal(transaction: Transaction, extensions: Extensions, host: str) -> Reply | None:
    """
    Why C{transaction} must not be sent at all to C{host}, whose EHLO reply listed
    C{extensions} (its recipients then fail permanently, nothing sent); None when it
    may go. The one place for such checks.

    RFC 6152 3 forbids sending an 8-bit message to a server that does not offer
    8BITMIME (or was greeted with HELO); converting it to 7 bit, as Postfix does,
    is not done here. RFC 6531 3.2: internationalized mail to a server without
    SMTPUTF8 is refused, never sent with a mangled address. RFC 1870 6.1: a message
    larger than the server's declared SIZE is not sent.
    """
    if transaction.smtputf8 and not extensions.smtputf8:
        utf8 = [a for a in (transaction.mail_from, *transaction.recipients) if not a.isascii()]
        what = f"<{utf8[0]}>" if utf8 else "a message with UTF-8 header fields"
        return Reply(553, f"5.6.7 {what}: the receiving MX {host} does not support SMTPUTF8 (RFC 6531)")
    if extensions.size and transaction.size > extensions.size:
        return Reply(552, f"5.3.4 message size {transaction.size} exceeds the limit {extensions.size} of {host}")
    if transaction.eight_bit and not extensions.eight_bit_mime:
        return Reply(554, f"5.6.3 message has 8-bit content and {host} does not offer 8BITMIME")
    return None


def _asked(may_start: Callable[[Transaction], bool], transaction: Transaction, host: str) -> bool:
    try:
        return bool(may_start(transaction))
    except Exception:
        _log.failure("may_start callback failed; starting no more transactions on {host}", host=host)
        return False


class CommandQueue:
    """
    Commands and the handlers of their replies, in order. With C{pipelining}, every
    queued command is written at once (L{flush}); without, one at a time, each once
    the previous one is answered. That is all PIPELINING changes.
    """

    def __init__(self, *, pipelining: bool) -> None:
        self._pipelining = pipelining
        self._to_send: deque[_Command] = deque()
        self._awaiting: deque[_Command] = deque()

    def queue(self, line: bytes, name: str, handler: _Handler) -> None:
        """C{line} (without CRLF) is to be written; its reply goes to C{handler}."""
        self._to_send.append(_Command(line, name, handler))

    def expect(self, name: str, handler: _Handler) -> None:
        """A reply is due to what was written otherwise (the message and its "."): to C{handler}."""
        self._awaiting.append(_Command(b"", name, handler))

    def flush(self) -> Write | None:
        """What may be written now, if anything."""
        if self._pipelining:
            batch = list(self._to_send)
            self._to_send.clear()
        elif self._to_send and not self._awaiting:
            batch = [self._to_send.popleft()]
        else:
            return None
        self._awaiting.extend(batch)
        return Write(b"".join(command.line + b"\r\n" for command in batch)) if batch else None

    def answered(self) -> _Handler | None:
        """The handler of the reply that came (to the oldest unanswered command); None if none is due."""
        return self._awaiting.popleft().handler if self._awaiting else None

    def drop_unsent(self) -> None:
        self._to_send.clear()

    @property
    def unanswered(self) -> bool:
        return bool(self._awaiting)

    @property
    def waiting_for(self) -> str | None:
        return self._awaiting[0].name if self._awaiting else None

    def clear(self) -> None:
        self._to_send.clear()
        self._awaiting.clear()


class Driver:
    """
    Runs C{transactions} in order over a session whose EHLO reply listed
    C{extensions}. Each finished transaction's L{TransactionResult} is appended to
    L{results} and given to C{on_result} at once (a transaction is started once
    its MAIL FROM is written as the next command, or, written behind the previous
    final ".", once that "." is answered).

    C{may_start} is asked before each transaction's MAIL FROM is written (and again
    when it was written behind the previous "."): False holds that transaction
    and the rest back, and the session ends.
    """

    def __init__(
        self,
        host: str,
        transactions: Sequence[Transaction],
        extensions: Extensions,
        *,
        may_start: Callable[[Transaction], bool] | None = None,
        on_result: Callable[[TransactionResult], object] | None = None,
    ) -> None:
        self._host = host
        self._transactions = transactions
        self._extensions = extensions
        self._may_start = may_start
        self._on_result = on_result
        self._next = 0  # the first transaction not yet started
        self._current: _Progress | None = None
        self._behind: _Progress | None = None  # queued behind the current one's "."
        self._commands = CommandQueue(pipelining=extensions.pipelining)
        #: How many transactions were started (or refused before sending).
        self.started = 0
        #: Whether C{may_start} held a transaction back.
        self.held = False
        self.results: list[TransactionResult] = []
        self.last_replies: list[Reply | None] = []

    # -- the session's calls ---------------------------------------------------

    def start(self, *, rset: bool = False) -> Action:
        """The first action; C{rset}: the server has a transaction open from before."""
        return self._proceed(rset) or self._commands.flush()

    def reply(self, code: int, text: bytes | str) -> Action:
        """A reply (its text lines joined by "\\n") to the oldest unanswered command."""
        handler = self._commands.answered()
        if handler is None:
            return GiveUp(self.synthesized(f"4.5.0 unexpected reply from {self._host}"), "abort")
        return handler(code, text) or self._commands.flush()

    def end_of_body(self, *, then_next: bool) -> bytes:
        """
        The message of L{SendBody} is written: what follows it, the final "." and,
        if C{then_next} and the server pipelines, the next transaction's commands.
        """
        progress = self._progress()
        progress.body_sent = True
        data = b".\r\n"
        if then_next and self._extensions.pipelining and self._next < len(self._transactions):
            transaction = self._transactions[self._next]
            if refusal(transaction, self._extensions, self._host) is None and self._may_open(transaction):
                # No RSET: the reply to "." ends this transaction whatever it is (RFC 5321 4.1.1.4).
                self._behind = _Progress(transaction)
                self._queue_transaction(self._behind)
                write = self._commands.flush()
                assert write is not None
                data += write.data
        return data

    def abandon(self, reason: Reply, *, stale: bool = False) -> list[TransactionResult]:
        """
        The session ends now: the transaction under way gets C{reason} for every
        recipient without a result (deferred); the ones not started are returned
        (started False, deferred), not given to C{on_result}. C{stale}: nothing was
        answered on a reused connection, so the one under way was not started either.
        """
        if stale:
            self._current = None
            self._next = len(self.results)
        progress = self._current
        if progress is not None:
            for recipient in progress.recipients:
                progress.outcomes.setdefault(recipient, RecipientResult(Status.DEFERRED, reason))
            progress.last_reply = reason
            self._complete(progress)
        deferred = RecipientResult(Status.DEFERRED, reason)
        unstarted = [
            TransactionResult(t.key, False, dict.fromkeys(t.recipients, deferred))
            for t in self._transactions[self._next :]
        ]
        self._next = len(self._transactions)
        self._behind = None
        self._commands.clear()
        return unstarted

    @property
    def waiting_for(self) -> str | None:
        """The command whose reply is awaited, for messages ("MAIL FROM", "RCPT TO", "DATA", "RSET")."""
        return self._commands.waiting_for

    def synthesized(self, text: str) -> Reply:
        """A reply made up here: 421 while nothing was attempted (SessionFailed), else 451."""
        return Reply(451 if self.started else 421, text)

    # -- moving on -----------------------------------------------------------

    def _proceed(self, rset: bool) -> Action:
        """The current transaction is settled (or none was started): on to the next one."""
        if self._behind is not None:
            # Its commands went out behind the final "."; their replies come next.
            progress, self._behind = self._behind, None
            if not self._may_open(progress.transaction):
                # A QUIT would now be read as message data: the peer gets nothing from this.
                return self._hold_back("abort")
            self._open(progress)
            return None
        self._refuse_unsendable()
        if self._next >= len(self._transactions):
            return Done(rset)
        if rset and not self._extensions.pipelining:
            # The next transaction is chosen once the RSET is answered.
            self._commands.queue(b"RSET", "RSET", self._rset_reply)
            return None
        if not self._may_open(self._transactions[self._next]):
            return self._hold_back("quit")
        progress = _Progress(self._transactions[self._next])
        self._open(progress)
        if rset:
            # RFC 2920 3.1: RSET may lead a group.
            self._commands.queue(b"RSET", "RSET", self._rset_reply)
        self._queue_transaction(progress)
        return None

    def _refuse_unsendable(self) -> None:
        """Settle the transactions next in line that L{refusal} refuses: failed, nothing sent."""
        while self._next < len(self._transactions):
            reply = refusal(self._transactions[self._next], self._extensions, self._host)
            if reply is None:
                return
            progress = _Progress(self._transactions[self._next])
            self._open(progress)
            self._settle(progress, progress.recipients, RecipientResult(Status.FAILED, reply))

    def _open(self, progress: _Progress) -> None:
        self._current = progress
        self._next += 1
        self.started += 1

    def _may_open(self, transaction: Transaction) -> bool:
        return self._may_start is None or _asked(self._may_start, transaction, self._host)

    def _hold_back(self, then: Literal["quit", "abort"]) -> GiveUp:
        self.held = True
        return GiveUp(self.synthesized(f"4.3.0 transaction held back by mmgun; nothing sent ({self._host})"), then)

    # -- commands and their replies ------------------------------------------

    def _queue_transaction(self, progress: _Progress) -> None:
        """MAIL FROM, a RCPT TO per distinct recipient, DATA (RFC 2920 3.1: DATA last in a group)."""
        queue, partial = self._commands.queue, functools.partial
        queue(mail_command(progress.transaction, self._extensions), "MAIL FROM", partial(self._mail_reply, progress))
        for recipient in progress.recipients:
            queue(rcpt_command(recipient), "RCPT TO", partial(self._rcpt_reply, progress, recipient))
        queue(b"DATA", "DATA", partial(self._data_reply, progress))

    def _rset_reply(self, code: int, text: bytes | str) -> Action:
        if not _ok(code):
            # With PIPELINING the next transaction's commands are already out (it then
            # ends deferred): no QUIT behind them.
            reply = self.synthesized(f"4.5.0 {self._host} refused RSET ({parse_reply(code, text)})")
            return GiveUp(reply, "close" if self._current is not None else "quit")
        return self._proceed(rset=False) if self._current is None else None

    def _mail_reply(self, progress: _Progress, code: int, text: bytes | str) -> Action:
        if _ok(code):
            progress.mail_accepted = True
            return None
        reply = parse_reply(code, text)
        self._settle(progress, progress.recipients, RecipientResult(Status.for_code(code), reply))
        return self._after_early_end(progress)

    def _rcpt_reply(self, progress: _Progress, recipient: str, code: int, text: bytes | str) -> Action:
        if progress.settled:
            return None  # sent with a refused MAIL FROM: a 503, read and ignored
        if _ok(code):
            progress.accepted.append(recipient)
        else:
            reply = parse_reply(code, text)
            progress.outcomes[recipient] = RecipientResult(Status.for_code(code), reply, at_rcpt=True)
            progress.last_reply = reply
        if len(progress.outcomes) == len(progress.recipients):
            self._complete(progress)  # every recipient refused
            return self._after_early_end(progress)
        return None

    def _after_early_end(self, progress: _Progress) -> Action:
        """
        The transaction ended before its message: its commands not yet written are
        dropped; once the ones written are answered, on to the next.
        """
        self._commands.drop_unsent()
        if self._commands.unanswered:
            return None  # its DATA's reply (_data_reply) moves on
        return self._proceed(rset=progress.mail_accepted)

    def _data_reply(self, progress: _Progress, code: int, text: bytes | str) -> Action:
        if progress.settled:
            # A pipelined DATA with no recipient accepted. RFC 2920 3.1: read its reply
            # rather than assume a refusal, and after a 354 send a single ".".
            if code == 354:
                self._commands.queue(b".", "DATA", lambda code, text: self._proceed(rset=True))
                return None
            return self._proceed(rset=progress.mail_accepted)
        if code == 354:
            self._commands.expect("DATA", functools.partial(self._end_of_data, progress))
            return SendBody(progress.transaction)
        reply = parse_reply(code, text)
        if _ok(code):
            reply = Reply(451, f"4.5.0 {self._host} answered DATA with {reply}")
        self._settle(progress, progress.accepted, RecipientResult(Status.for_code(reply.code), reply))
        return self._proceed(rset=True)

    def _end_of_data(self, progress: _Progress, code: int, text: bytes | str) -> Action:
        """The reply to the final "." (or one that came while sending the body)."""
        reply = parse_reply(code, text)
        if not progress.body_sent:
            # The rest of the body is still on its way: the session can't go on.
            if _ok(code):
                reply = Reply(451, f"4.5.0 {self._host} replied {reply} before the end of the message data")
            self._settle(progress, progress.accepted, RecipientResult(Status.for_code(reply.code), reply))
            return GiveUp(self.synthesized(f"4.5.0 {self._host} replied during the message data"), "abort")
        status = Status.SENT if _ok(code) else Status.for_code(code)
        self._settle(progress, progress.accepted, RecipientResult(status, reply))
        return self._proceed(rset=status is not Status.SENT)

    # -- results ---------------------------------------------------------------

    def _settle(self, progress: _Progress, recipients: Sequence[str], result: RecipientResult) -> None:
        for recipient in recipients:
            progress.outcomes[recipient] = result
        progress.last_reply = result.reply
        self._complete(progress)

    def _complete(self, progress: _Progress) -> None:
        progress.settled = True
        outcomes = {r: progress.outcomes[r] for r in progress.recipients}
        result = TransactionResult(progress.transaction.key, True, outcomes)
        self.results.append(result)
        self.last_replies.append(progress.last_reply)
        self._current = None
        if self._on_result is not None:
            self._on_result(result)

    def _progress(self) -> _Progress:
        assert self._current is not None
        return self._current
