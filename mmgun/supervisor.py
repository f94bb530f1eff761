"""
The webhooks role in a child process that the daemon starts and supervises (issue 14's speed
target, the first step of issue 17's "every core from one command").

Why a process: each webhook POST costs ~0.35 ms of CPU in treq and twisted.web's client; in
the one default process that CPU is taken from the relay's GIL-bound core (the relay kept 54%
of its rate with a webhook on every event), in a process of its own it runs on another core
(92-98%). So when a process runs the webhooks role beside another role (the default: all
four), :func:`mmgun.service.make_service` puts a :class:`ChildProcess` where the dispatcher
would be, unless ``--webhooks-in-process``; ``--role webhooks`` alone is that process itself.

The child is the same twistd plugin (:data:`CHILD_ARGV`), configured by the ``MMGUN_*``
variables of the parent's resolved Config (:func:`webhooks_environment`: the webhooks role
only, no metrics port, JSON log). It logs JSON lines on its stdout; the parent parses each
(:func:`twisted.logger.eventFromJSON`) and publishes it to its own log with
``mmgun_process`` (the child's role) and ``mmgun_pid`` fields, so the parent's
``--log-format`` decides how every line looks. Its stderr lines are logged as warnings (at
most :data:`MAX_STDERR_LINES` per child).

It dies with its parent: its stdin is a pipe from the parent, and a supervised child
(:data:`SUPERVISED` in its environment) stops its reactor in order when that pipe reaches end
of file (:class:`ParentWatch`): at the parent's stop, and when the parent was killed with
SIGKILL. A supervised child ignores SIGINT and SIGHUP (a terminal sends them to the whole
process group: the parent decides when its child ends); SIGTERM still stops it in order.

Supervision (as :class:`mmgun.signer.SignerProcess` does for the DKIM child): a child that
exits while the service runs is started again after 1 s, then 2, 4 ... up to 30 s while it
keeps dying; one that lived 60 s starts the count over. At stop the parent closes the child's
stdin and sends it SIGTERM, waits up to ``stop_timeout`` (``--shutdown-timeout``) for it to
exit, then kills it with SIGKILL.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet import fdesc
from twisted.internet.abstract import FileDescriptor
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessExitedAlready, ReactorNotRunning
from twisted.internet.interfaces import IDelayedCall, IReactorProcess, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import ILogObserver, LogEvent, Logger, eventFromJSON, globalLogPublisher
from twisted.python.failure import Failure

from .config import Config, environment
from .signer import BACKOFF_MAX, STABLE_AFTER, child_environment

__all__ = [
    "CHILD_ARGV",
    "SUPERVISED",
    "ChildProcess",
    "ParentWatch",
    "webhooks_environment",
    "webhooks_process",
]

_log = Logger()

#: In a child's environment ("1"): it was started by :class:`ChildProcess`, its stdin is a pipe
#: from that parent, and it stops when that pipe closes (:class:`ParentWatch`, added by
#: :func:`mmgun.tap.makeService`). Internal: not an option, nothing for operators to set.
SUPERVISED = "MMGUN_SUPERVISED"

#: The child: ``twistd -n --pidfile= --logger mmgun.logs.json_observer mmgun`` with this
#: Python (``python -m twisted`` would be ``twist``, whose options differ). Its role is on
#: the command line too, so that ``ps`` shows what the process is.
CHILD_ARGV = (
    sys.executable,
    "-c",
    "from twisted.scripts.twistd import run; run()",
    "--pidfile=",
    "-n",
    "--logger",
    "mmgun.logs.json_observer",
    "mmgun",
)

#: Back-off before the first restart of a child that died; doubles up to signer.BACKOFF_MAX.
BACKOFF_FIRST = 1.0
#: Lines a child may write on stderr (or non-JSON lines on stdout) that are logged, each cut to _MAX_LINE characters.
MAX_STDERR_LINES = 50
_MAX_LINE = 500
#: A log line (JSON) longer than this is dropped, with a warning: a child gone wrong cannot fill the parent's memory.
MAX_LOG_LINE = 1 << 20


def webhooks_environment(config: Config, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """
    The environment of the webhooks child of a process configured with ``config``: ``environ``
    (default: this process's, with PYTHONPATH finding this ``mmgun``) without its ``MMGUN_*``
    variables, then :func:`mmgun.config.environment` of ``config`` with the webhooks role
    only, no ``--metrics-listen`` (the parent's port; the dispatcher has no metrics of its
    own) and a JSON log (parsed by the parent), and :data:`SUPERVISED`.
    """
    base = {k: v for k, v in child_environment(environ).items() if not k.startswith("MMGUN_")}
    child = attrs.evolve(config, roles=("webhooks",), metrics_listen=None, log_format="json")
    return {**base, **environment(child), SUPERVISED: "1"}


def webhooks_process(config: Config, reactor: Any, *, publisher: ILogObserver | None = None) -> ChildProcess:
    """The webhooks role of a process that runs others too: a supervised child (see the module docstring)."""
    return ChildProcess(
        "webhooks",
        reactor,
        argv=[*CHILD_ARGV, "--role=webhooks"],
        env=webhooks_environment(config),
        stop_timeout=config.shutdown_timeout,
        publisher=publisher,
    )


class _Child(ProcessProtocol):
    """One child process: its log lines (stdout, JSON) and its stderr lines, and how it ended."""

    def __init__(self, owner: ChildProcess, started_at: float) -> None:
        self.owner = owner
        self.started_at = started_at
        self.stopping = False
        self.ended = False
        self.stopped: list[Deferred[None]] = []
        self.kill_call: IDelayedCall | None = None
        #: Why it ended (ProcessDone, ProcessTerminated), once it has.
        self.reason: Failure | None = None
        self._buffers = {1: bytearray(), 2: bytearray()}
        self._lines_logged = 0
        #: Whether it has written a log line yet: twistd logs only once the service is made,
        #: after a supervised child has set SIGHUP aside (mmgun.tap). Before that, SIGHUP's
        #: default action would end it, so a SIGHUP is held back until then.
        self.spoke = False
        self._hup_held = False

    #: Kept once started: the transport forgets it when the process is reaped.
    pid: int | None = None

    def connectionMade(self) -> None:
        self.pid = getattr(self.transport, "pid", None)

    def signal(self, name: str) -> None:
        if name == "HUP" and not self.spoke:
            self._hup_held = True
            return
        try:
            self.transport.signalProcess(name)  # type: ignore[union-attr]
        except (ProcessExitedAlready, OSError):
            pass

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        buffer = self._buffers.get(childFD)
        if buffer is None:
            return
        if childFD == 1 and not self.spoke:
            self.spoke = True
            if self._hup_held:
                self._hup_held = False
                self.signal("HUP")
        buffer += data
        if b"\n" not in data:
            if len(buffer) > MAX_LOG_LINE:
                self._other_line(b"(a line of more than %d octets, dropped)" % MAX_LOG_LINE)
                buffer.clear()
            return
        *lines, rest = buffer.split(b"\n")
        buffer[:] = rest
        for line in lines:
            self._line(childFD, bytes(line))

    def _line(self, fd: int, line: bytes) -> None:
        if fd == 1:
            event = self._event(line)
            if event is not None:
                self.owner.publish(event, self.pid)
                return
        if line.strip():
            self._other_line(line)

    @staticmethod
    def _event(line: bytes) -> LogEvent | None:
        try:
            event = eventFromJSON(line.decode("utf-8"))
        except Exception:  # not UTF-8, not JSON, or JSON the log reader chokes on: logged as a plain line
            return None
        return event if isinstance(event, dict) and "log_time" in event else None

    def _other_line(self, line: bytes) -> None:
        self._lines_logged += 1
        name = self.owner.name
        if self._lines_logged <= MAX_STDERR_LINES:
            _log.warn(
                "{process} process {pid}: {line}",
                process=name,
                pid=self.pid,
                line=line[:_MAX_LINE].decode("utf-8", "replace"),
            )
        elif self._lines_logged == MAX_STDERR_LINES + 1:
            _log.warn("{process} process {pid}: more output, not logged", process=name, pid=self.pid)

    def processEnded(self, reason: Failure) -> None:
        for fd, buffer in self._buffers.items():
            if buffer:
                self._line(fd, bytes(buffer))
                buffer.clear()
        self.ended = True
        self.reason = reason
        self.owner._ended(self, reason)


class ChildProcess(Service):
    """
    A child process started with the service, started again when it exits, stopped with it
    (see the module docstring). ``reactor`` spawns it; ``clock`` (default: ``reactor``)
    times the back-off and the stop timeout; ``publisher`` receives the child's log events
    (default: the global log publisher); ``extra_fds`` maps descriptors of the child to
    this process's (e.g. ``{3: listening_socket}``), inherited at every start.
    """

    def __init__(
        self,
        name: str,
        reactor: IReactorProcess,
        *,
        argv: Sequence[str],
        env: Mapping[str, str],
        stop_timeout: float,
        clock: IReactorTime | None = None,
        publisher: ILogObserver | None = None,
        extra_fds: Mapping[int, int] | None = None,
    ) -> None:
        self.name = name  # type: ignore[assignment]  # Service.name is None until named
        self._reactor = reactor
        self._clock: IReactorTime = clock if clock is not None else reactor  # type: ignore[assignment]
        self._argv = list(argv)
        self._env = dict(env)
        self._stop_timeout = stop_timeout
        #: The child's descriptor → this process's, passed on at every start (a shared listening socket).
        self._extra_fds = dict(extra_fds or {})
        # The folder relative paths (the database, the clients file) mean: where mmgun was
        # started. twistd --rundir changes folder before the service starts; the child must not.
        self._cwd = os.getcwd()
        self._publisher: ILogObserver = publisher if publisher is not None else globalLogPublisher
        self._child: _Child | None = None
        #: The wait before the next start after a death (None: the first death, or after a stable run).
        self._delay: float | None = None
        self._respawn: IDelayedCall | None = None
        #: The pid of the last child that ended, and why (ProcessDone: it exited with status 0).
        self.last_exit: tuple[int | None, Failure] | None = None

    @property
    def pid(self) -> int | None:
        """The pid of the running child (None: none runs now)."""
        child = self._child
        return child.pid if child is not None and not child.ended else None

    def send_signal(self, name: str) -> bool:
        """Send the running child the signal ``name`` (e.g. "HUP"); False when none runs."""
        child = self._child
        if child is None or child.ended or child.stopping:
            return False
        child.signal(name)
        return True

    def startService(self) -> None:
        super().startService()
        self._shutting_down = False
        add_trigger = getattr(self._reactor, "addSystemEventTrigger", None)
        if add_trigger is not None:
            # From here on a child that ends is not started again: under systemd's default
            # KillMode the child gets SIGTERM too, while this process still drains HTTP.
            add_trigger("before", "shutdown", self.shutting_down)
        self._spawn()

    def shutting_down(self) -> None:
        """The process is stopping: a child that ends now is not started again."""
        self._shutting_down = True

    def _spawn(self) -> None:
        self._respawn = None
        if not self.running:
            return
        child = _Child(self, self._clock.seconds())
        try:
            self._reactor.spawnProcess(
                child,
                self._argv[0],
                self._argv,
                env=self._env,
                path=self._cwd,
                childFDs={0: "w", 1: "r", 2: "r", **self._extra_fds},
            )
        except Exception:
            _log.failure("could not start the {process} process", process=self.name)
            self._start_again(self._next_delay(0.0))
            return
        self._child = child
        _log.info("{process} process {pid} started", process=self.name, pid=child.pid)

    def publish(self, event: LogEvent, pid: int | None) -> None:
        """Log an event of the child's here, saying whose it is."""
        event["mmgun_process"] = self.name
        event["mmgun_pid"] = pid
        if isinstance(event.get("mmgun_traceback"), str):
            # The child's failure came as text (mmgun.logs.json_observer): JSON keeps no
            # exception, so the failure object here says only "unpersistable".
            event.pop("log_failure", None)
        self._publisher(event)

    def _ended(self, child: _Child, reason: Failure) -> None:
        self.last_exit = (child.pid, reason)
        if self._child is child:
            self._child = None
        if child.kill_call is not None and child.kill_call.active():
            child.kill_call.cancel()
        if child.stopping:
            waiting, child.stopped = child.stopped, []
            for d in waiting:
                d.callback(None)
            return
        if getattr(self, "_shutting_down", False):
            _log.info("{process} process {pid} ended during shutdown ({reason})", process=self.name, pid=child.pid, reason=reason.getErrorMessage())
            return
        lived = self._clock.seconds() - child.started_at
        delay = self._next_delay(lived)
        _log.warn(
            "{process} process {pid} ended unexpectedly after {lived:.1f} s ({reason}): starting it again in {delay:g} s",
            process=self.name,
            pid=child.pid,
            lived=lived,
            reason=reason.getErrorMessage(),
            delay=delay,
        )
        self._start_again(delay)

    def _next_delay(self, lived: float) -> float:
        """1 s after the first death (or one after a stable run), then doubling up to BACKOFF_MAX."""
        if lived >= STABLE_AFTER or self._delay is None:
            self._delay = BACKOFF_FIRST
        delay, self._delay = self._delay, min(self._delay * 2, BACKOFF_MAX)
        return delay

    def _start_again(self, delay: float) -> None:
        if self.running:
            self._respawn = self._clock.callLater(delay, self._spawn)

    def stopService(self) -> Deferred[None] | None:
        """
        Close the child's stdin and send it SIGTERM: it stops in order and exits. Fires once it
        has exited; killed with SIGKILL if it has not within ``stop_timeout`` seconds.
        """
        super().stopService()
        if self._respawn is not None and self._respawn.active():
            self._respawn.cancel()
        self._respawn = None
        child = self._child
        if child is None or child.ended:
            return None
        stopped: Deferred[None] = Deferred()
        child.stopped.append(stopped)
        if not child.stopping:
            child.stopping = True
            assert child.transport is not None
            child.transport.closeStdin()
            child.signal("TERM")
            child.kill_call = self._clock.callLater(self._stop_timeout, self._kill_on_stop, child)
        return stopped

    def _kill_on_stop(self, child: _Child) -> None:
        _log.warn(
            "{process} process {pid} did not exit within {timeout:g} s of SIGTERM: killing it",
            process=self.name,
            pid=child.pid,
            timeout=self._stop_timeout,
        )
        child.signal("KILL")


# -- the child's side --------------------------------------------------------------------------


class _EndOfInput(FileDescriptor):
    """Reads (and drops) a file descriptor until end of file, then calls ``ended``."""

    def __init__(self, reactor: Any, fd: int, ended: Callable[[], None]) -> None:
        super().__init__(reactor)
        self._fd = fd
        self._on_end = ended
        fdesc.setNonBlocking(fd)

    def fileno(self) -> int:
        return self._fd

    def doRead(self) -> Any:
        return fdesc.readFromFD(self._fd, lambda data: None)

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        self._on_end()


class ParentWatch(Service):
    """
    In a supervised child: stops the reactor (the service tree stops in order) when ``fd``
    (stdin, a pipe from the parent) reaches end of file, which it does when the parent closes
    it and when the parent is gone, even killed with SIGKILL. ``stop`` (default: the
    reactor's) is called once.
    """

    def __init__(self, reactor: Any, fd: int = 0, stop: Callable[[], None] | None = None) -> None:
        self._reactor = reactor
        self._fd = fd
        self._stop = stop if stop is not None else reactor.stop
        self._reader: _EndOfInput | None = None

    def startService(self) -> None:
        super().startService()
        self._reader = _EndOfInput(self._reactor, self._fd, self._parent_gone)
        self._reader.startReading()

    def _parent_gone(self) -> None:
        if not self.running:
            return
        self.running = False
        _log.info("the supervising process closed this process's input (it stopped or is gone): stopping")
        try:
            self._stop()
        except ReactorNotRunning:
            pass  # already stopping (a SIGTERM came first)

    def stopService(self) -> None:
        super().stopService()
        reader, self._reader = self._reader, None
        if reader is not None and not reader.disconnected:
            reader.stopReading()


def ignore_terminal_signals(*, keep_sighup: bool = False) -> None:
    """
    A supervised child leaves SIGINT and SIGHUP (sent by a terminal to the whole process
    group) to its parent. With ``keep_sighup`` (a frontend worker, whose SIGHUP reloads the
    clients file and which its parent forwards SIGHUP to) SIGHUP keeps its handler.
    """
    for signum in (signal.SIGINT,) if keep_sighup else (signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)


def supervised(environ: Mapping[str, str] | None = None) -> bool:
    """Whether this process is a supervised child (:data:`SUPERVISED` is "1" in ``environ``, default: this process's)."""
    return (os.environ if environ is None else environ).get(SUPERVISED) == "1"
