"""
One SMTP session: L{ESMTPSession} runs a list of L{Transaction}s over one
connection, feeding the server's replies to a L{Driver} and doing what it says,
and ends in an L{Outcome}.

The message body: with PIPELINING, a body of up to C{ONE_WRITE_MAX} (256 KiB)
goes out in one write with its final "." and the next transaction's commands;
a larger one (or any without PIPELINING) is streamed through a producer, a
chunk at a time as the peer takes it, so that the idle timeout keeps measuring
the progress of the transfer. A session therefore holds at most about 256 KiB
of its own in the transport's buffer towards a slow MX: with
C{--max-connections} 100, about 25 MiB in all. The body is not run through
SMTPClient's C{transformChunk}, which dot-stuffs each 16 KiB chunk on its own
and turns CRLF into CR CR LF: it is already in its wire form (L{wire_form}).

A session may be parked when its transactions are done (no QUIT) and given
more with L{ESMTPSession.reuse}: see L{mmgun.smtp.cache.SessionCache}.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from io import BytesIO
from typing import Any, Protocol, runtime_checkable

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IOpenSSLClientConnectionCreator, IReactorTime, ITransport
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.mail.smtp import SMTPClient, SMTPClientError
from twisted.python.failure import Failure

from .driver import Action, Done, Driver, GiveUp, SendBody, Write
from .handshake import Handshake, Phase, Then
from .outcome import Reply, TransactionResult, parse_reply
from .settings import SMTPSettings
from .wire import Transaction

_log = Logger(namespace="mmgun.smtp")

# With PIPELINING, a body up to this size goes out with its final "." in one
# write; a larger one is streamed as without PIPELINING.
ONE_WRITE_MAX = 256 * 1024

#: How long a cached session's QUIT may wait for its reply before the connection is dropped.
QUIT_TIMEOUT = 5.0


@runtime_checkable
class _Abortable(Protocol):
    """
    A transport that can drop its connection without flushing. Every transport
    that carries a session has C{abortConnection} (TCP, TLS, the testing
    ones), but only L{twisted.internet.interfaces.ITCPTransport} declares it.
    """

    def abortConnection(self) -> None: ...


@attrs.frozen
class Outcome:
    #: The started transactions' results, in order (each already given to on_result).
    completed: list[TransactionResult]
    #: The transactions not started, deferred (not given to on_result).
    unstarted: list[TransactionResult]
    last_replies: list[Reply | None]  # per result, for the log
    failure: Reply | None  # set when no transaction was started
    tls_failed: bool
    #: A reused session whose connection was found dead before the peer answered anything:
    #: nothing of it was started, and a fresh connection may be tried at once.
    stale: bool = False
    #: The session, when it was kept open (SessionCache) rather than ended with QUIT.
    session: ReusableSession | None = None


class ESMTPSession(Handshake):
    """
    One connection's worth of L{Transaction}s. L{ended} fires with an L{Outcome}
    as soon as every outcome is known (possibly before the connection has closed,
    e.g. while QUIT is on its way); never errbacks except on cancellation.
    """

    def __init__(
        self,
        *,
        clock: IReactorTime,
        host: str,
        transactions: Sequence[Transaction],
        settings: SMTPSettings,
        tls: IOpenSSLClientConnectionCreator | None,
        on_result: Callable[[TransactionResult], object] | None = None,
        may_start: Callable[[Transaction], bool] | None = None,
        on_dot_sent: Callable[[Transaction], object] | None = None,
    ) -> None:
        super().__init__(clock=clock, host=host, settings=settings, tls=tls)
        self.ended: Deferred[Outcome] = Deferred(lambda d: self._cancel())
        self._transactions = transactions
        self._on_result = on_result
        self._may_start = may_start
        self._on_dot_sent = on_dot_sent
        self._driver: Driver | None = None
        self._finished = False
        # A 354 came in; the body goes out on the reactor's next turn (_body_turn).
        self._body: Transaction | None = None
        self._body_call: IDelayedCall | None = None
        # The message being streamed (without PIPELINING, or too large for one write).
        self._streamed: Transaction | None = None
        #: Set when the connection is gone (or going): never reused after that.
        self.gone = False

    def connectionMade(self) -> None:
        # Otherwise Nagle + the peer's delayed ACK can hold back the small
        # ".\r\n" after a body by ~40 ms, per message.
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)
        super().connectionMade()
        # SMTPClient.timeout is None: no timeout at all.
        self.setTimeout(self._settings.command_timeout)
        self._phase = Phase.GREETING

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        if self._body is not None and self._body_call is None and not self._finished:
            # Not now but on the reactor's next turn: a reply the server sent behind
            # its 354 (in the rest of this read, in the next TLS record of it, or as
            # half a line) was sent before it could have read the body, and must not
            # pass for the reply to the final ".".
            self._body_call = self._clock.callLater(0, self._body_turn)

    def replyReceived(self, code: int, resp: bytes) -> None:
        if self._finished:
            if self._phase is Phase.QUIT:
                self._dispatch(code, resp)
            return  # otherwise: lines already buffered when the session was given up
        if code == 421:
            # RFC 5321 3.8: the server is closing the channel.
            self._finish(parse_reply(code, resp), then="close")
        elif self._driver is None:
            self._dispatch(code, resp)
        else:
            if self.timeOut != self._settings.command_timeout:
                self.setTimeout(self._settings.command_timeout)  # it was data_timeout, for the reply to "."
            self._act(self._driver.reply(code, resp))

    def _during(self) -> str:
        waiting = self._driver.waiting_for if self._driver is not None else None
        return waiting or self._phase.value

    def timeoutConnection(self) -> None:
        if self._finished:
            self._abort()
        elif self._phase in (Phase.STARTTLS, Phase.TLS):
            self._tls_failed("timed out")
        else:
            waited = f"{self.timeOut:g}s" if self.timeOut is not None else ""
            text = f"4.4.2 timed out after {waited} waiting for {self._host} during {self._during()}"
            self._finish(self._synthesized(text), then="abort")

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        if self._finished:
            return
        if self._phase in (Phase.STARTTLS, Phase.TLS):
            self._tls_failed(reason.getErrorMessage())
        else:
            self._finish(self._synthesized(f"4.4.2 connection lost during {self._during()} with {self._host}"))

    def sendError(self, exc: BaseException) -> None:
        """
        SMTPClient's catch-all error path. What still reaches it here: the body
        producer failing (the connection dropped while sending DATA;
        connectionLost follows and reports it) and Twisted-generated
        L{SMTPClientError}s.
        """
        if self._finished or not isinstance(exc, SMTPClientError):
            self._abort()
            return
        detail = parse_reply(exc.code, exc.resp or b"").text
        self._finish(self._synthesized(f"4.5.0 {detail} ({self._host}, {self._during()})"), then="abort")

    # -- the mail transactions -------------------------------------------------

    def smtpState_from(self, code: int, resp: object) -> None:
        """EHLO (or HELO) done: the transactions start."""
        self._start(rset=False)

    def _start(self, *, rset: bool) -> None:
        self._phase = Phase.MAIL
        self._driver = Driver(
            self._host, self._transactions, self._extensions, may_start=self._may_start, on_result=self._report
        )
        self._act(self._driver.start(rset=rset))

    def _act(self, action: Action) -> None:
        if isinstance(action, Write):
            self._connected().write(action.data)
        elif isinstance(action, SendBody):
            if self._extensions.pipelining and len(action.transaction.message) <= ONE_WRITE_MAX:
                self._body = action.transaction  # sent by _body_turn, once whatever came with the 354 is parsed
            else:
                # SMTPClient streams getMailData() through transformChunk with a
                # FileSender, then calls finishedFileTransfer.
                self._streamed = action.transaction
                SMTPClient.smtpState_data(self, 354, b"")
        elif isinstance(action, Done):
            self._end_of_transactions(rset=action.rset_due)
        elif isinstance(action, GiveUp):
            self._finish(action.reason, then=action.then)

    def _body_turn(self) -> None:
        self._body_call = None
        transaction, self._body = self._body, None
        if transaction is None or self._finished or self._driver is None:
            return  # a premature reply already ended the transaction
        if self._buffer or self._reply_lines:
            # Part of a reply came after the 354: the session can't go on.
            self._finish(self._synthesized(f"4.5.0 {self._host} replied during the message data"), then="abort")
            return
        # The driver may append the next transaction's commands (RFC 2920 3.1).
        data = transaction.payload() + self._driver.end_of_body(then_next=True)
        self._dot_sent(transaction)
        self._connected().write(data)
        # For the reply to "."; replyReceived sets the command timeout back.
        self.setTimeout(self._settings.data_timeout)

    def getMailData(self) -> BytesIO:
        assert self._streamed is not None
        return BytesIO(self._streamed.payload())

    def transformChunk(self, chunk: bytes) -> bytes:
        # Already in wire form; keep the idle timeout from firing while a
        # large body is being sent.
        self.resetTimeout()
        return chunk

    def finishedFileTransfer(self, lastsent: bytes) -> None:
        if self._finished or self._driver is None:
            return
        # wire_form() output is empty or ends with CRLF.
        assert self._streamed is not None
        data = self._driver.end_of_body(then_next=False)
        self._dot_sent(self._streamed)
        self._connected().write(data)
        self.setTimeout(self._settings.data_timeout)

    def _dot_sent(self, transaction: Transaction) -> None:
        """Tell the caller that C{transaction}'s final "." is going out: from now on the peer may take the message."""
        if self._on_dot_sent is not None:
            try:
                self._on_dot_sent(transaction)
            except Exception:
                _log.failure("on_dot_sent callback failed for transaction {key}", key=transaction.key)

    def _report(self, result: TransactionResult) -> None:
        if self._on_result is not None:
            # At once, not at the end of the session: the caller commits each result
            # while the next transaction runs, which keeps the duplicate window short.
            try:
                self._on_result(result)
            except Exception:
                _log.failure("on_result callback failed for transaction {key}", key=result.key)

    # -- the end ---------------------------------------------------------------

    def _synthesized(self, text: str) -> Reply:
        return self._driver.synthesized(text) if self._driver is not None else Reply(421, text)

    def _protocol_error(self, detail: str) -> None:
        if self._finished:
            self._abort()
        else:
            text = f"4.5.0 {detail} from {self._host} during {self._during()}"
            self._finish(self._synthesized(text), then="abort")

    def _finish(self, reason: Reply | None, *, then: Then = "nothing", tls_failed: bool = False) -> None:
        """
        Settle every outcome (what is still open gets C{reason}, deferred),
        leave the session as C{then} says, and fire L{ended}.
        """
        if self._finished:
            return
        self._finished = True
        self._body = self._streamed = None
        # Ended before the transactions started: all of them are unstarted.
        driver = self._driver or Driver(self._host, self._transactions, self._extensions)
        stale = reason is not None and self._stale()
        unstarted = driver.abandon(reason, stale=stale) if reason is not None else []
        outcome = Outcome(
            completed=driver.results,
            unstarted=unstarted,
            last_replies=driver.last_replies + [reason] * len(unstarted),
            failure=reason if not driver.started or stale else None,
            tls_failed=tls_failed,
            stale=stale,
            session=self if isinstance(self, ReusableSession) and then == "park" else None,
        )
        if then == "park":
            self._park()
        elif then == "quit":
            self._phase = Phase.QUIT
            self._disconnectFromServer()
        elif then == "close" and self.transport is not None:
            self.transport.loseConnection()
        elif then == "abort":
            self._abort()
        self.ended.callback(outcome)

    def _abort(self) -> None:
        if isinstance(self.transport, _Abortable):
            self.transport.abortConnection()
        elif self.transport is not None:
            self.transport.loseConnection()

    def _cancel(self) -> None:
        self._finished = True
        self.gone = True
        self._abort()

    def _connected(self) -> ITransport:
        # Set by makeConnection before any reply can arrive, and never cleared.
        assert self.transport is not None
        return self.transport

    # -- what a reusable session does otherwise ------------------------------------

    def _end_of_transactions(self, *, rset: bool) -> None:
        """Every transaction has its outcome."""
        self._finish(None, then="quit")

    def _stale(self) -> bool:
        """Whether the session found its connection dead before anything was started (see ReusableSession)."""
        return False

    def _park(self) -> None:
        raise NotImplementedError("only a ReusableSession is parked")


class ReusableSession(ESMTPSession):
    """
    A session kept open for L{mmgun.smtp.cache.SessionCache}: at the end of its
    transactions it is parked (no QUIT), and L{reuse} runs more over it.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._parked = False
        # The server has a mail transaction open (all recipients refused): RSET before the next MAIL.
        self._rset_due = False
        #: Told when a parked session can no longer be used (the peer closed it or spoke unasked).
        self.on_idle_lost: Callable[[ReusableSession], object] | None = None
        # Since the last reuse(): whether any reply came.
        self._reused = False
        self._replied = False
        #: When the connection was made (the clock's time), for SessionCache's max_age.
        self.connected_at = 0.0
        #: Fired when the connection is closed, if set (SessionCache.close waits on it).
        self.connection_closed: Deferred[None] | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        self.connected_at = self._clock.seconds()

    def dataReceived(self, data: bytes) -> None:
        if self._parked:
            # Nothing is asked while idle: whatever comes (a 421 before the server's own idle
            # timeout, or garbage) makes the session unusable.
            self._idle_lost()
            self._connected().loseConnection()
            return
        super().dataReceived(data)

    def replyReceived(self, code: int, resp: bytes) -> None:
        self._replied = True
        super().replyReceived(code, resp)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._idle_lost()
        if self.connection_closed is not None and not self.connection_closed.called:
            self.connection_closed.callback(None)
        super().connectionLost(reason)

    def _end_of_transactions(self, *, rset: bool) -> None:
        """Every transaction has its outcome: park the session for the cache, or QUIT."""
        if not self.gone and not (self._buffer or self._reply_lines):
            self._rset_due = rset
            self._finish(None, then="park")
        else:
            self._finish(None, then="quit")

    def _stale(self) -> bool:
        # A reused session that died before the peer answered anything (it had closed the
        # idle connection meanwhile): the MAIL FROM may have gone out, but no message did
        # (its body waits for a 354), so nothing here was started.
        return self._reused and not self._replied and not (self._driver is not None and self._driver.held)

    def _park(self) -> None:
        self._parked = True
        self._phase = Phase.IDLE
        self.setTimeout(None)  # the cache's idle timer takes over
        # Hold no message or caller state while idle (the outcome keeps its own lists).
        self._transactions = ()
        self._driver = None
        self._on_result = self._may_start = self._on_dot_sent = None

    def _idle_lost(self) -> None:
        """The connection can no longer carry a session: never reused; the cache is told if it holds it."""
        if self.gone:
            return
        self.gone = True
        if self._parked:
            self._parked = False
            if self.on_idle_lost is not None:
                self.on_idle_lost(self)

    def reuse(
        self,
        transactions: Sequence[Transaction],
        on_result: Callable[[TransactionResult], object] | None,
        may_start: Callable[[Transaction], bool] | None,
        on_dot_sent: Callable[[Transaction], object] | None,
    ) -> Deferred[Outcome]:
        """
        Run more transactions over this parked session (no new TCP, EHLO or STARTTLS), as
        a fresh session would; L{ended} is a new Deferred for them. When the connection turns
        out dead before any reply, the outcome is C{stale}: nothing started.
        """
        assert self._parked and not self.gone, "only a parked, live session is reused"
        self._parked = False
        self._transactions = transactions
        self._on_result = on_result
        self._may_start = may_start
        self._on_dot_sent = on_dot_sent
        self._finished = False
        self._reused = True
        self._replied = False
        self.ended = Deferred(lambda d: self._cancel())
        self.setTimeout(self._settings.command_timeout)
        self._start(rset=self._rset_due)
        return self.ended

    def quit(self) -> None:
        """Close a parked session politely: QUIT, then close; aborted if the peer does not answer in time."""
        if not self._parked or self.gone:
            return
        self._parked = False
        self.gone = True
        self._phase = Phase.QUIT
        self.setTimeout(min(self._settings.command_timeout, QUIT_TIMEOUT))
        self._disconnectFromServer()
