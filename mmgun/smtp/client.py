"""
L{send_session}: connect to one MX address and run transactions over one SMTP
session (or over a session a L{SessionCache} kept open), reporting each
transaction's result once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from twisted.internet import error
from twisted.internet.abstract import isIPv6Address
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IReactorTCP,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from .outcome import Reply, SessionFailed, Status, TransactionResult
from .session import ESMTPSession, Outcome, ReusableSession
from .settings import SMTPSettings, TLSMode
from .tls import tls_creator
from .wire import Transaction, check_address

if TYPE_CHECKING:
    from .cache import SessionCache

__all__ = ["send_session"]

_log = Logger(namespace="mmgun.smtp")


def _endpoint(reactor: IReactorTCP, address: str, port: int, timeout: float) -> IStreamClientEndpoint:
    if isIPv6Address(address):
        return TCP6ClientEndpoint(reactor, address, port, timeout=timeout)
    return TCP4ClientEndpoint(reactor, address, port, timeout=timeout)


def _connect_failed(host: str, address: str, exc: Exception, timed_out: bool) -> Reply:
    if timed_out or isinstance(exc, error.TimeoutError):
        return Reply(421, f"4.4.1 connection to {host} [{address}] timed out")
    if isinstance(exc, error.ConnectionRefusedError):
        return Reply(421, f"4.4.1 connection refused by {host} [{address}]")
    return Reply(421, f"4.4.1 cannot connect to {host} [{address}]: {exc}")


class _OneSession(Factory):
    """connectProtocol's factory, without its two "Starting/Stopping factory" log lines a connection."""

    noisy = False

    def __init__(self, session: ESMTPSession) -> None:
        self._session = session

    def buildProtocol(self, addr: object) -> ESMTPSession:
        return self._session


async def _attempt(
    reactor: IReactorTCP, session: ESMTPSession, host: str, address: str, port: int, settings: SMTPSettings
) -> Outcome:
    """Connect C{session} to C{address}:C{port} and wait for its outcome."""
    clock = IReactorTime(reactor)
    connecting = _endpoint(reactor, address, port, settings.connect_timeout).connect(_OneSession(session))
    # Also enforced here, on the injected clock, whatever the reactor does
    # with the endpoint's timeout.
    timed_out = False

    def time_out() -> None:
        nonlocal timed_out
        timed_out = True
        connecting.cancel()

    timer = clock.callLater(settings.connect_timeout, time_out)
    try:
        await connecting
    except Exception as e:
        raise SessionFailed(_connect_failed(host, address, e, timed_out=timed_out), connected=False) from e
    finally:
        if timer.active():
            timer.cancel()
    return await session.ended


async def send_session(
    reactor: IReactorTCP,
    host: str,
    address: str,
    port: int,
    transactions: Sequence[Transaction],
    settings: SMTPSettings,
    on_result: Callable[[TransactionResult], object] | None = None,
    may_start: Callable[[Transaction], bool] | None = None,
    on_dot_sent: Callable[[Transaction], object] | None = None,
) -> list[TransactionResult]:
    """
    One SMTP session to C{address}:C{port} (the MX C{host} name is for TLS,
    logs and synthesized replies), running C{transactions} one after another
    over the same connection, then QUIT.

    Returns one L{TransactionResult} per transaction, in order, as soon as all
    outcomes are known. C{on_result}, if given, is called once with each of
    them: a started transaction's the moment it is known (e.g. right after the
    250 to the final "."), so that the caller can commit it before the next
    transaction ends; those of the transactions not started at the end of the
    session. A caller that gives C{on_result} needs nothing else.

    Raises L{SessionFailed} if no transaction was started (C{on_result} is then
    not called). Never reconnects once a transaction has started, so nothing is
    sent twice; the only reconnection is the retry in clear text after a failed
    TLS handshake in L{TLSMode.OPPORTUNISTIC}.

    C{may_start}, if given, is asked before each transaction's MAIL FROM goes
    out (with PIPELINING, also before it would go out behind the previous
    final "."): when it answers False, that transaction and the rest are not
    started (their results have C{started} False) and the session ends. So a
    caller that must stop sending (its database is gone, a lease may have run
    out) stops between two transactions rather than at the end of the session.
    C{on_dot_sent}, if given, is called with each transaction whose final "."
    is being written: from then on the peer may have taken the message, even
    if the connection is lost before its reply.

    Through L{SessionCache.send_session}, the same, except that the session
    may run over a connection a previous session left open, and is left open
    in its turn (no QUIT) for the next.

    @param reactor: provides L{IReactorTCP} and L{IReactorTime}.
    @raise ValueError: an address is not ASCII or contains control characters
        or angle brackets, or a transaction has no recipients.
    """
    return await run_session(
        reactor, host, address, port, transactions, settings, on_result, may_start, on_dot_sent, cache=None
    )


def _check(transactions: Sequence[Transaction]) -> None:
    for transaction in transactions:
        check_address(transaction.mail_from, "sender")
        if not transaction.recipients:
            raise ValueError(f"transaction {transaction.key!r} has no recipients")
        for recipient in transaction.recipients:
            check_address(recipient, "recipient")
            if not recipient:
                raise ValueError(f"transaction {transaction.key!r} has an empty recipient")


async def run_session(
    reactor: IReactorTCP,
    host: str,
    address: str,
    port: int,
    transactions: Sequence[Transaction],
    settings: SMTPSettings,
    on_result: Callable[[TransactionResult], object] | None,
    may_start: Callable[[Transaction], bool] | None,
    on_dot_sent: Callable[[Transaction], object] | None,
    *,
    cache: SessionCache | None,
) -> list[TransactionResult]:
    """L{send_session}, through C{cache} if given."""
    _check(transactions)
    if not transactions:
        return []
    clock = IReactorTime(reactor)
    key = (host, address, port, settings.tls, settings.trust_root)
    reused = False
    # Results of transactions settled over a reused session found dead afterwards (an
    # 8-bit message refused without a reply): already reported, not run again.
    done: list[TransactionResult] = []
    pending = list(transactions)

    def session(tls: IOpenSSLClientConnectionCreator | None) -> ESMTPSession:
        return (ESMTPSession if cache is None else ReusableSession)(
            clock=clock,
            host=host,
            transactions=pending,
            settings=settings,
            tls=tls,
            on_result=on_result,
            may_start=may_start,
            on_dot_sent=on_dot_sent,
        )

    try:
        outcome: Outcome | None = None
        while cache is not None and outcome is None:
            idle = cache.take(key)
            if idle is None:
                break
            outcome = await idle.reuse(pending, on_result, may_start, on_dot_sent)
            if outcome.stale:
                # The peer closed it while it was idle (or just then): nothing was started;
                # the next idle one, or a new connection.
                _log.info(
                    "cached session with {host} [{address}] was closed by the peer; not reused",
                    host=host,
                    address=address,
                    reply=str(outcome.failure),
                )
                done += outcome.completed
                pending = pending[len(outcome.completed) :]
                outcome = None
            else:
                reused = True
        if outcome is None and not pending:
            outcome = Outcome([], [], [], None, tls_failed=False)
        if outcome is None:
            outcome = await _attempt(reactor, session(tls_creator(settings, host)), host, address, port, settings)
        if outcome.tls_failed and settings.tls is TLSMode.OPPORTUNISTIC:
            _log.warn(
                "TLS with {host} [{address}] failed ({reply}); retrying in clear text",
                host=host,
                address=address,
                reply=str(outcome.failure),
            )
            outcome = await _attempt(reactor, session(None), host, address, port, settings)
        if outcome.failure is not None:
            raise SessionFailed(outcome.failure)
    except SessionFailed as e:
        _log.warn(
            "session with {host} [{address}]:{port} failed: {reply}",
            host=host,
            address=address,
            port=port,
            code=e.reply.code,
            reply=str(e.reply),
        )
        raise
    if on_result is not None:
        for result in outcome.unstarted:
            try:
                on_result(result)
            except Exception:
                _log.failure("on_result callback failed for transaction {key}", key=result.key)
    results = done + outcome.completed + outcome.unstarted
    if outcome.session is not None and cache is not None:
        cache.park(key, outcome.session)
    # One event per session (the caller logs each delivery attempt): a line per
    # transaction here too would double the logging cost of a busy sender.
    counts = dict.fromkeys(Status, 0)
    for result in results:
        for recipient_result in result.recipients.values():
            counts[recipient_result.status] += 1
    _log.info(
        "session with {host} [{address}]: {transactions} transactions, {sent} sent, {failed} failed, {deferred} deferred",
        host=host,
        address=address,
        reused=reused,
        transactions=len(results),
        started=sum(1 for r in results if r.started),
        codes=[r.code if r is not None else None for r in outcome.last_replies],
        **{status.value: count for status, count in counts.items()},
    )
    return results
