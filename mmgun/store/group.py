"""
Group commit, for any backend: the items that arrive while one transaction commits all
go into the next one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Generic, Protocol, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

T = TypeVar("T")
ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")

#: Most items committed in one transaction.
MAX_GROUP = 512


class WriteRunner(Protocol):
    """What group commit needs of a backend: run ``fn(connection, *args)`` in one write transaction."""

    def write(self, fn: Callable[..., T], *args: Any) -> Deferred[T]: ...


class GroupCommit(Generic[ItemT, ResultT]):
    """
    Group commit: the items that arrive while one transaction commits all go into
    the next one, and each caller hears back after the commit that holds its item.
    Under load, one fsync and one thread hand-off serve many requests; alone, an
    item is written at once. ``txn`` (run by ``runner.write`` on the backend's
    connection) returns one result per item, an exception instance for an item that
    failed on its own (the others still commit).
    """

    def __init__(
        self,
        runner: WriteRunner,
        txn: Callable[[Any, list[ItemT]], Sequence[ResultT | Exception]],
        clock: IReactorTime | None = None,
    ) -> None:
        """
        With ``clock``, an idle group commit starts its transaction at the end of the
        reactor turn, not at the first item: the items submitted in the same turn (the
        requests a burst of DKIM signatures resumes together) share one commit instead of
        the first taking one of its own.
        """
        self._runner = runner
        self._txn = txn
        self._clock = clock
        self._pending: list[tuple[ItemT, Deferred[ResultT]]] = []
        self._busy = False

    def submit(self, item: ItemT) -> Deferred[ResultT]:
        waiter: Deferred[ResultT] = Deferred()
        self._pending.append((item, waiter))
        if not self._busy:
            if self._clock is None:
                self._flush()
            else:
                self._busy = True  # the turn's later items only join
                self._clock.callLater(0, self._flush)
        return waiter

    def _flush(self) -> None:
        batch, self._pending = self._pending[:MAX_GROUP], self._pending[MAX_GROUP:]
        self._busy = True
        d = self._runner.write(self._txn, [item for item, _ in batch])

        def done(results: Sequence[ResultT | Exception]) -> None:
            for (_, waiter), result in zip(batch, results, strict=True):
                if isinstance(result, Exception):
                    waiter.errback(result)
                else:
                    waiter.callback(result)

        def failed(failure: Any) -> None:
            for _, waiter in batch:
                waiter.errback(failure)

        def next_batch(_: object) -> None:
            self._busy = False
            if self._pending:
                self._flush()

        d.addCallbacks(done, failed).addBoth(next_batch)
