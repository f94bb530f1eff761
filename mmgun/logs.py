"""
mmgun's log output: twistd's text log, formatted faster, and ``--log-format json``.

twistd formats each event of its text log with twisted.logger's pure-Python
``string.Formatter`` and recomputes the time zone for every timestamp; with an
event per submission and per delivery that was ~8 % of a busy process's CPU.
:func:`format_classic` writes the same line with ``str.format_map`` and a
timestamp cached per second, and hands any event it cannot format exactly
(failures, legacy ``log_system`` events, ``{callable()}`` fields, bad formats)
to twisted.logger's own formatter.
"""

from __future__ import annotations

import sys
from typing import Any, cast

from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    LogEvent,
    formatEventAsClassicLogText,
    formatTime,
    jsonFileLogObserver,
)
from zope.interface import directlyProvides


def json_observer() -> ILogObserver:
    """
    The log observer factory twistd's ``--logger`` takes; writes to standard output. A
    failure's traceback goes along as text (``mmgun_traceback``): JSON keeps no exception,
    and a supervised child's failures must still say what went wrong in its parent's log.
    """
    write = jsonFileLogObserver(sys.stdout, recordSeparator="")  # plain JSON Lines, no RS (RFC 7464) prefix

    def observe(event: LogEvent) -> None:
        failure = event.get("log_failure")
        if failure is not None and "mmgun_traceback" not in event:
            try:
                event = {**event, "mmgun_traceback": failure.getTraceback()}
            except Exception:
                pass
        write(event)

    directlyProvides(observe, ILogObserver)
    return cast(ILogObserver, observe)


class _SecondCache:
    """formatTime's RFC 3339 text, which has a resolution of one second, computed once a second."""

    def __init__(self) -> None:
        self._second: int | None = None
        self._text = "-"

    def __call__(self, when: float) -> str:
        second = int(when)
        if when - second >= 0.9999995:  # datetime rounds this up to the next second
            return formatTime(when)
        if second != self._second:
            self._text = formatTime(second)
            self._second = second
        return self._text


_timestamp = _SecondCache()


def format_classic(event: LogEvent) -> str | None:
    """Exactly :func:`twisted.logger.formatEventAsClassicLogText`'s line, ``{time} [{namespace}#{level}] {text}``."""
    if "mmgun_process" in event:
        return _format_child(event)
    fmt = event.get("log_format")
    level = event.get("log_level")
    when = event.get("log_time")
    if (
        not isinstance(fmt, str)
        or level is None
        or when is None
        or "()" in fmt
        or "log_failure" in event
        or "log_system" in event
        or "log_flattened" in event  # flattened by another observer first: twisted prints those values
    ):
        return formatEventAsClassicLogText(event)
    try:
        text = fmt.format_map(event)
    except Exception:
        return formatEventAsClassicLogText(event)
    if not text:
        return None
    line = f"{_timestamp(when)} [{event.get('log_namespace', '-')}#{level.name}] {text}"
    return line.replace("\n", "\n\t") + "\n"


def _format_child(event: LogEvent) -> str | None:
    """
    An event a supervised child logged (:mod:`mmgun.supervisor`): twistd's line with the
    child's role and pid after the namespace and level,
    ``{time} [{namespace}#{level}] [{process} {pid}] {text}``.
    """
    line = formatEventAsClassicLogText(event)  # the child's JSON carries its fields flattened
    if line is None:
        return None
    head, separator, text = line.partition("] ")
    traceback = event.get("mmgun_traceback")
    if isinstance(traceback, str):
        text = text.rstrip("\n") + "\n\t" + traceback.rstrip("\n").replace("\n", "\n\t") + "\n"
    return f"{head}{separator}[{event['mmgun_process']} {event.get('mmgun_pid')}] {text}"


def twistd_text_observer(twistd_options: Any) -> FileLogObserver | None:
    """
    The observer twistd would create for its text log (``--logfile``, ``--nodaemon``,
    SIGUSR1 rotation), writing with :func:`format_classic`; None where twistd logs
    otherwise (``--syslog``, ``--logger``) or builds its observer differently.
    """
    if twistd_options.get("logger") or twistd_options.get("syslog"):
        return None
    try:
        from twisted.scripts._twistd_unix import UnixAppLogger

        observer = UnixAppLogger(twistd_options)._getLogObserver()
    except (ImportError, AttributeError):
        return None
    if not isinstance(observer, FileLogObserver):
        return None
    observer.formatEvent = format_classic
    return observer
