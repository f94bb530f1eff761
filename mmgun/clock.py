"""
Time in an mmgun process: durations on a monotonic clock, stored timestamps on the wall clock.

Twisted's reactor schedules every ``callLater`` (and so every LoopingCall, TimeoutMixin
timeout and ``deferLater``) on ``reactor.seconds()``, which is ``time.time()``: a step of
the wall clock (an operator's ``date -s``, a virtual machine resumed, NTP stepping instead
of slewing) fires a 10-minute SMTP timeout at once, or holds a 1-second poll for an hour.
:func:`use_monotonic_time` makes the reactor measure time on ``time.monotonic()`` instead.

Timestamps written to the database and compared between processes (``created_at``,
``next_attempt``, leases, ``updated_at``, retention cut-offs) stay wall-clock time: the
roles that write them take a ``wall`` function (``time.time`` in production).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

__all__ = ["use_monotonic_time"]


def use_monotonic_time(
    reactor: Any,
    *,
    monotonic: Callable[[], float] = time.monotonic,
    wall: Callable[[], float] = time.time,
) -> None:
    """
    Make ``reactor.seconds()`` monotonic, starting from the wall-clock time of now.

    ``reactor.seconds`` becomes ``monotonic() + offset`` with ``offset = wall() -
    monotonic()`` taken once, here: it reads like ``time.time()`` until the wall clock
    is stepped, and from then on only measures elapsed time.

    Enough for Twisted's timers (twisted/internet/base.py): ``ReactorBase.callLater``
    computes a call's time from ``self.seconds()`` and hands ``self.seconds`` to the
    ``DelayedCall`` (for ``reset``/``delay``); ``timeout()`` (how long the reactor
    sleeps) and ``runUntilCurrent()`` (what is due) read ``self.seconds()`` too. An
    instance attribute wins over the class's ``seconds = staticmethod(runtimeSeconds)``.
    Call it before anything schedules a timer (``tap.makeService`` does, before the
    service tree is built); a timer scheduled earlier still fires, measured against the
    same clock (the two agree at the moment of the switch).
    """
    offset = wall() - monotonic()

    def seconds() -> float:
        return monotonic() + offset

    reactor.seconds = seconds
