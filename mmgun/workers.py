"""
``--workers N``: the HTTP frontend in N processes, supervised by the one ``twistd mmgun`` the
operator started (issue 17, "every core from one command").

The frontend is the busy role (JSON, MIME, the store's writes, each request's Python on one
GIL-bound core); the sender, the cleaner and the webhooks child need a core between them. So
when a process would run the frontend with more than one worker (the default: one per CPU,
:func:`worker_count`), :func:`mmgun.service.make_service` gives it the other roles only, plus
a :class:`WorkerPool`:

- The pool binds ``--listen`` in this process (:class:`SharedListener`, before twistd starts:
  a port in use is one line at start, as without workers) and never accepts on it. Each worker
  inherits that socket as its descriptor 3 (:data:`LISTEN_FD`, named by :data:`INHERITED_LISTEN`
  in its environment) and accepts on it; the kernel hands each connection to one of them.
- Each worker is a :class:`mmgun.supervisor.ChildProcess` (``frontend-1`` ... ``frontend-N``):
  restarted with a log line when it dies, its log lines in this process's log, stopped with
  SIGTERM (requests in flight answered) when this process stops, gone when this one is killed.
- SIGHUP to this process is passed on to every worker (each reloads its clients file).
- Limits that are per client or per address and held in memory are divided by N in each worker
  (:func:`worker_config`), so that together the workers never allow more than one process did:
  ``--rate-limit`` and ``--rate-burst``, ``--max-auth-failures``,
  ``--max-http-connections-per-source``. ``--max-queued`` and ``--max-queued-bytes`` are counted
  in the store and hold as they are. ``--max-http-connections`` stays per process (it protects
  each process's open files).
- ``--metrics-listen``: this process (sender, cleaner) serves it as given; worker *i* on the
  next port, port + *i* (a ``unix:`` path: path + ``.i``), see :func:`worker_metrics_listen`.
- ``--smtp-listen``: SMTP submission runs in worker 1 only (its ports are bound once).
"""

from __future__ import annotations

import os
import re
import signal
import socket
from collections.abc import Mapping
from typing import Any

import attrs
from twisted.application.service import MultiService
from twisted.internet.endpoints import AdoptedStreamServerEndpoint
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from .config import Config, environment
from .service import Listener, _split_strport
from .signer import child_environment
from .supervisor import CHILD_ARGV, SUPERVISED, ChildProcess

__all__ = [
    "INHERITED_LISTEN",
    "LISTEN_FD",
    "SharedListener",
    "WorkerPool",
    "inherited_endpoint",
    "worker_config",
    "worker_count",
    "worker_metrics_listen",
    "workers_problem",
]

_log = Logger()

#: A worker's listening socket is its descriptor 3.
LISTEN_FD = 3
#: In a worker's environment: ``"FD:FAMILY"`` (e.g. ``"3:2"``, AF_INET), the inherited listening
#: socket its frontend accepts on instead of binding ``--listen``. Internal, like SUPERVISED.
INHERITED_LISTEN = "MMGUN_INHERITED_LISTEN"
#: Endpoint types whose listening socket a worker can accept on as it is (ssl: needs TLS on top).
SHAREABLE = ("tcp", "tcp6", "unix", "reuseport")


def shareable(description: str) -> bool:
    """Whether the listening socket of the strports ``description`` can be shared with workers."""
    return _split_strport(description)[0] in SHAREABLE


def worker_count(config: Config, cpus: int | None = None) -> int:
    """
    How many frontend worker processes ``config`` asks for; 0: the frontend runs in this
    process. 0 without the frontend role, and for ``--workers 1``; ``--workers N`` (N > 1) when
    given. Auto: 0 on one CPU (``cpus``: given by tests) or when ``--listen`` cannot be shared
    (:func:`workers_problem` refuses an explicit N then); else one per CPU this process may run
    on, less the one its sender needs when it has the sender role: on 2 CPUs, a frontend
    process beside the sender's, as the fastest `--role` split measured there (a second worker
    only made three processes take turns on SQLite's one writer).
    """
    if "frontend" not in config.roles:
        return 0
    if config.workers:
        return config.workers if config.workers > 1 else 0
    if not shareable(config.listen):
        return 0
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if cpus <= 1:
        return 0
    return cpus - 1 if "sender" in config.roles else cpus


def workers_problem(config: Config) -> str | None:
    """Why ``config`` cannot start, or None: more than one worker asked for on an endpoint that cannot be shared."""
    if "frontend" in config.roles and config.workers > 1 and not shareable(config.listen):
        return f"--workers {config.workers} needs a tcp:, tcp6:, unix: or reuseport: --listen, not {config.listen} (use --workers 1)"
    return None


_PORT = re.compile(r"(?i)((?:tcp6?|reuseport):(?:port=)?)(\d+)((?::.*)?)")
_BARE_PORT = re.compile(r"(\d+)((?::.*)?)")
_UNIX = re.compile(r"(?i)(unix:(?:address=)?)([^:]+)((?::.*)?)")


def worker_metrics_listen(description: str | None, index: int) -> str | None:
    """
    The ``--metrics-listen`` of worker ``index`` (1, 2 ...) when the supervising process has
    ``description``: the port + ``index``, or a ``unix:`` path + ``.index``; None when there is
    none or it cannot be derived (port 0, another endpoint type).
    """
    if description is None:
        return None
    for pattern in (_PORT, _BARE_PORT):
        match = pattern.fullmatch(description)
        if match is not None:
            groups = match.groups()
            head, port, tail = ("", *groups) if pattern is _BARE_PORT else groups
            number = int(port)
            if number == 0 or number + index > 65535:
                return None
            return f"{head}{number + index}{tail}"
    match = _UNIX.fullmatch(description)
    if match is not None:
        head, path, tail = match.groups()
        return f"{head}{path}.{index}{tail}"
    return None


def worker_config(config: Config, index: int, count: int) -> Config:
    """
    The Config of frontend worker ``index`` (1 ... ``count``) of a process configured with
    ``config``: the frontend role only, one process, a JSON log (parsed by the parent), its own
    metrics port, SMTP submission in worker 1 only, and the in-memory per-client and
    per-address limits divided by ``count`` (rounded down, at least 1).
    """
    return attrs.evolve(
        config,
        roles=("frontend",),
        workers=1,
        log_format="json",
        metrics_listen=worker_metrics_listen(config.metrics_listen, index),
        smtp_listen=config.smtp_listen if index == 1 else (),
        rate_limit=config.rate_limit / count,
        rate_burst=max(1, config.rate_burst // count),
        max_auth_failures=max(1, config.max_auth_failures // count),
        max_http_connections_per_source=max(1, config.max_http_connections_per_source // count),
    )


def worker_environment(
    config: Config, index: int, count: int, family: int, environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment of worker ``index``: as the webhooks child's (mmgun.supervisor), plus the inherited socket."""
    base = {k: v for k, v in child_environment(environ).items() if not k.startswith("MMGUN_")}
    return {
        **base,
        **environment(worker_config(config, index, count)),
        SUPERVISED: "1",
        INHERITED_LISTEN: f"{LISTEN_FD}:{int(family)}",
    }


def inherited_endpoint(reactor: Any, environ: Mapping[str, str] | None = None) -> IStreamServerEndpoint | None:
    """In a worker (:data:`INHERITED_LISTEN` set): the endpoint accepting on the inherited socket; else None."""
    value = (os.environ if environ is None else environ).get(INHERITED_LISTEN)
    if not value:
        return None
    fd, family = (int(part) for part in value.split(":", 1))
    return AdoptedStreamServerEndpoint(reactor, fd, socket.AddressFamily(family))


class SharedListener(Listener):
    """
    ``--listen`` bound (and listening: the kernel queues connections) in the supervising
    process, which never accepts on it (its port stops reading at once); the workers do.
    """

    def __init__(self, description: str, reactor: Any) -> None:
        factory = Factory()
        factory.noisy = False  # it never builds a protocol: its start and stop are no news
        super().__init__(description, factory, reactor)
        self.port: Any = None

    def privilegedStartService(self) -> None:
        bound = self._waitingForPort is not None
        super().privilegedStartService()
        if not bound and self._waitingForPort is not None:
            self._waitingForPort.addCallback(self._hold)

    def _hold(self, port: Any) -> Any:
        port.stopReading()
        self.port = port
        return port

    def fileno(self) -> int:
        return int(self.port.fileno())

    def family(self) -> int:
        return int(self.port.socket.family)


class WorkerPool(MultiService):
    """
    ``count`` frontend workers on one :class:`SharedListener` (see the module docstring).
    ``reactor`` listens; ``spawner`` (default: ``reactor``) starts the processes and ``clock``
    (default: ``reactor``) times their restarts.
    """

    def __init__(self, config: Config, reactor: Any, count: int, *, spawner: Any = None, clock: Any = None) -> None:
        super().__init__()
        self._config = config
        self._reactor = reactor
        self._spawner = spawner if spawner is not None else reactor
        self._clock = clock if clock is not None else reactor
        self.count = count
        self.listener = SharedListener(config.listen, reactor)
        self.listener.setServiceParent(self)
        self.workers: list[ChildProcess] = []
        self._previous_sighup: Any = None

    def startService(self) -> None:
        self.listener.privilegedStartService()  # no-op when bind_listeners did it
        if not self.workers:
            for index in range(1, self.count + 1):
                worker = ChildProcess(
                    f"frontend-{index}",
                    self._spawner,
                    argv=[*CHILD_ARGV, "--role=frontend"],
                    env=worker_environment(self._config, index, self.count, self.listener.family()),
                    stop_timeout=self._config.shutdown_timeout,
                    clock=self._clock,
                    extra_fds={LISTEN_FD: self.listener.fileno()},
                )
                worker.setServiceParent(self)
                self.workers.append(worker)
        super().startService()
        _log.info(
            "{count} frontend workers accept on {listen}",
            count=self.count,
            listen=self._config.listen,
        )
        if hasattr(signal, "SIGHUP") and hasattr(self._reactor, "callFromThread"):
            self._previous_sighup = signal.signal(signal.SIGHUP, self._on_sighup)

    def _on_sighup(self, signum: int, frame: Any) -> None:
        self._reactor.callFromThread(self.forward_sighup)

    def forward_sighup(self) -> None:
        """Pass SIGHUP on to every worker running now (each reloads its clients file)."""
        sent = sum(worker.send_signal("HUP") for worker in self.workers)
        _log.info("SIGHUP passed on to {count} frontend workers", count=sent)

    def stopService(self) -> Any:
        if self._previous_sighup is not None:
            signal.signal(signal.SIGHUP, self._previous_sighup)
            self._previous_sighup = None
        return super().stopService()
