"""``twistd mmgun``: options and the service tree. The only place that touches the global reactor."""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from twisted.application.service import IService
from twisted.internet.error import ReactorNotRunning
from twisted.logger import ILogObserver, Logger
from twisted.python import usage

from . import config as _config
from .clients import ClientsFileError, load_clients
from .logs import twistd_text_observer

_log = Logger()


class Options(_config.Options):
    """twistd's options for mmgun; a bad value ends the process with one clear line, not a usage dump."""

    def parseOptions(self, options: list[str] | None = None) -> None:
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            raise SystemExit(f"mmgun: {e}") from None

    def postOptions(self) -> None:
        super().postOptions()
        if self.config.log_format == "json" and self.parent is not None and not self.parent.get("logger"):
            # twistd resolves this name after we return (ServerOptions.postOptions).
            self.parent["logger"] = "mmgun.logs.json_observer"
        from .workers import workers_problem

        problem = workers_problem(self.config)
        if problem is not None:
            raise usage.UsageError(problem)
        if "frontend" in self.config.roles:
            from .service import demo_id_problem

            try:
                self.clients = load_clients(self.config.clients)
            except ClientsFileError as e:
                raise usage.UsageError(str(e)) from None
            problem = demo_id_problem(self.config, self.clients)
            if problem is not None:
                raise usage.UsageError(problem)


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    from .clock import use_monotonic_time
    from .service import ListenError, bind_listeners, make_service, raise_open_files_limit
    from .store import StorageError

    # Before anything schedules a timer: durations must not jump with the wall clock.
    use_monotonic_time(reactor)
    raise_open_files_limit()
    try:
        from .workers import inherited_endpoint, worker_count

        service = make_service(
            options.config,
            reactor,
            clients=getattr(options, "clients", None),
            workers=worker_count(options.config),
            inherited=inherited_endpoint(reactor),
        )
        # Bound now, before twistd starts logging and the service tree: a port in use is
        # one line and exit status 1, not a traceback from privilegedStartService.
        bind_listeners(service)
    except (StorageError, ListenError) as e:
        sys.stderr.write(f"mmgun: {e}\n")
        raise SystemExit(1) from None
    reactor.callWhenRunning(_stop_cleanly_on_signals, reactor)
    from .supervisor import ParentWatch, ignore_terminal_signals, supervised

    if supervised():
        # A child of another mmgun process (mmgun.supervisor): it ends when that one closes our stdin or is gone.
        ParentWatch(reactor).setServiceParent(service)
        # Until a frontend worker's clients reloader installs its handler (at start), a SIGHUP
        # passed on by the parent must not end it (the default action).
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        # A frontend worker (mmgun.workers) keeps SIGHUP: its parent passes it on, and it reloads the clients file.
        reactor.callWhenRunning(ignore_terminal_signals, keep_sighup="frontend" in options.config.roles)
    parent = options.parent
    if options.config.log_format == "text" and parent is not None and "logfile" in parent and "nodaemon" in parent:
        # twistd's options (`twist` has neither and logs to standard output itself).
        _log_through(service, twistd_text_observer(parent))
    return service


def _log_through(service: IService, observer: ILogObserver | None) -> None:
    """
    Have twistd log through ``observer``: it uses the application's ILogObserver
    component when no ``--logger`` is given, and the application is only known once
    it adopts our service.
    """
    if observer is None:
        return
    set_parent = service.setServiceParent

    def setServiceParent(parent: Any) -> None:
        parent.setComponent(ILogObserver, observer)
        set_parent(parent)

    # Wrapped on this instance only, whatever its class (a test passes a plain MultiService).
    service.setServiceParent = setServiceParent  # type: ignore[method-assign]


def _stop_cleanly_on_signals(reactor: Any) -> None:
    """
    SIGTERM and SIGINT stop the reactor (and so the services, gracefully) and exit 0.

    The reactor's own handlers make twistd re-raise the signal after a clean
    shutdown, so the exit status would say "killed by SIGTERM" even when every
    delivery in flight finished and every lease was released. Installed once the
    reactor runs, after its own handlers.
    """

    def stop_reactor() -> None:
        try:
            reactor.stop()
        except ReactorNotRunning:
            pass  # already stopping: a second signal, or (a supervised child) its input closed too

    def stop(signum: int, frame: object) -> None:
        _log.info("received signal {signal}: stopping", signal=signal.Signals(signum).name)
        reactor.callFromThread(stop_reactor)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)
    # From here on a SIGTERM stops the process cleanly (status 0): supervisors and tests wait for this line.
    _log.info("mmgun running (pid {pid}): SIGTERM or SIGINT stops it gracefully", pid=os.getpid())
