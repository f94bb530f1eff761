"""
issue 17 part K (``--workers``): one ``twistd mmgun`` supervising N HTTP frontend processes
(:mod:`mmgun.workers`) on one inherited listening socket, beside the sender, the cleaner and
the webhooks child.

How many workers, each worker's Config (limits divided, never multiplied; its own metrics
port; SMTP submission in one), options refused; the pool on a stub spawner and a Clock (the
socket handed down as descriptor 3, a dead worker restarted with a line, SIGHUP passed on,
SIGTERM at stop); and a real ``twistd mmgun --workers 2`` on loopback: both workers accept
on the one port, kill -9 of one is survived, SIGHUP reloads the clients file in each, and
SIGTERM ends everything with status 0.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from functools import partial
from typing import Any, cast
from urllib.request import Request, urlopen

from twisted.internet import reactor as _reactor
from twisted.internet.error import ProcessTerminated
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mmgun import supervisor as supervisor_module, workers as workers_module
from mmgun.config import Config, Options, resolve
from mmgun.tap import Options as TapOptions
from mmgun.workers import (
    INHERITED_LISTEN,
    LISTEN_FD,
    WorkerPool,
    inherited_endpoint,
    worker_config,
    worker_count,
    worker_environment,
    worker_metrics_listen,
    workers_problem,
)

from .helpers import CLIENT, wait_until
from .test_webhooks_process import TWISTD, alive, children, read

reactor: Any = _reactor


def config_of(*argv: str) -> Config:
    options = Options({})
    options.parseOptions(list(argv))
    return options.config


class CountTests(SynchronousTestCase):
    def test_auto_is_one_per_cpu_less_the_senders(self) -> None:
        """
        issue 17 part K: by default (auto) the frontend runs in one process per CPU, less the one
        the sender (in the supervising process) needs: on 2 CPUs one frontend process beside the
        sender's, as the fastest split; none (all in one process) on one CPU or with --workers 1.
        """
        self.assertEqual(config_of().workers, 0)
        self.assertEqual(worker_count(config_of(), cpus=4), 3)
        self.assertEqual(worker_count(config_of(), cpus=2), 1)
        self.assertEqual(worker_count(config_of(), cpus=1), 0)
        self.assertEqual(worker_count(config_of("--role", "frontend", "--role", "cleaner"), cpus=2), 2)
        self.assertEqual(worker_count(config_of("--workers", "1"), cpus=4), 0)
        self.assertEqual(worker_count(config_of("--workers", "3"), cpus=1), 3)
        self.assertEqual(resolve({}, {"MMGUN_WORKERS": "auto"}).workers, 0)

    def test_no_workers_without_the_frontend_role(self) -> None:
        """issue 17 part K: a sender-only process (or a worker itself: roles frontend, workers 1) starts no workers."""
        self.assertEqual(worker_count(config_of("--role", "sender", "--workers", "4"), cpus=4), 0)
        self.assertEqual(worker_count(worker_config(config_of(), 1, 4), cpus=4), 0)

    def test_an_endpoint_that_cannot_be_shared(self) -> None:
        """
        issue 17 part K: ssl: --listen (the inherited socket would carry no TLS): auto falls back
        to one process, an explicit --workers 2 is refused at start with one line.
        """
        listen = "ssl:8443:privateKey=k.pem:certKey=c.pem:interface=127.0.0.1"
        self.assertEqual(worker_count(config_of("--listen", listen), cpus=8), 0)
        self.assertIsNone(workers_problem(config_of("--listen", listen)))
        self.assertIn("--workers 2 needs a tcp:", workers_problem(config_of("--listen", listen, "--workers", "2")) or "")
        options = TapOptions({})
        with self.assertRaises(SystemExit) as raised:
            options.parseOptions(["--listen", listen, "--workers", "2", "--clients", os.devnull])
        self.assertIn("--workers 2 needs a tcp:", str(raised.exception))

    def test_bad_values(self) -> None:
        """issue 17 part K: --workers -1 or two is refused naming the option."""
        for bad in ("-1", "two"):
            with self.assertRaises(SystemExit) as raised:
                TapOptions({}).parseOptions(["--workers", bad])
            self.assertIn("--workers", str(raised.exception))


class WorkerConfigTests(SynchronousTestCase):
    def test_in_memory_limits_are_divided_not_multiplied(self) -> None:
        """
        issue 17 part K: the per-client rate limit and burst, the failed-auth limit and the
        per-address connection cap are divided among N workers, so N workers together allow
        at most what one process did; the store-held queue caps stay whole.
        """
        config = config_of(
            "--rate-limit", "200", "--rate-burst", "1000", "--max-auth-failures", "10",
            "--max-http-connections-per-source", "1000", "--max-queued", "500",
        )  # fmt: skip
        for count in (2, 3, 4, 10):
            configs = [worker_config(config, i, count) for i in range(1, count + 1)]
            self.assertLessEqual(sum(c.rate_limit for c in configs), 200 + 1e-9)
            self.assertGreater(sum(c.rate_limit for c in configs), 199)
            self.assertLessEqual(sum(c.rate_burst for c in configs), 1000)
            self.assertLessEqual(sum(c.max_auth_failures for c in configs), 10)
            self.assertLessEqual(sum(c.max_http_connections_per_source for c in configs), 1000)
            self.assertEqual({c.max_queued for c in configs}, {500})
            self.assertEqual({c.roles for c in configs}, {("frontend",)})
            self.assertEqual({c.workers for c in configs}, {1})
        self.assertEqual(worker_config(config, 1, 2).rate_limit, 100)
        self.assertEqual(worker_config(config, 1, 2).max_auth_failures, 5)
        # Never below one: a limit smaller than the number of workers is 1 in each (documented), not 0 (which would refuse all).
        self.assertEqual(worker_config(config_of("--max-auth-failures", "1"), 1, 16).max_auth_failures, 1)

    def test_smtp_submission_in_the_first_worker_only(self) -> None:
        """issue 17 part K: --smtp-listen ports are bound once: worker 1 serves SMTP submission, the others none."""
        config = config_of("--smtp-listen", "tcp:2587:interface=127.0.0.1")
        self.assertEqual(worker_config(config, 1, 3).smtp_listen, ("tcp:2587:interface=127.0.0.1",))
        self.assertEqual(worker_config(config, 2, 3).smtp_listen, ())

    def test_metrics_port_per_worker(self) -> None:
        """issue 17 part K: each worker's /metrics is on --metrics-listen's port + its number (a unix: path + .N)."""
        self.assertEqual(worker_metrics_listen("tcp:9100:interface=127.0.0.1", 2), "tcp:9102:interface=127.0.0.1")
        self.assertEqual(worker_metrics_listen("tcp:port=9100", 1), "tcp:port=9101")
        self.assertEqual(worker_metrics_listen("9100", 1), "9101")
        self.assertEqual(worker_metrics_listen("reuseport:9100:interface=::1", 3), "reuseport:9103:interface=::1")
        self.assertEqual(worker_metrics_listen("unix:/run/mmgun/metrics:mode=660", 1), "unix:/run/mmgun/metrics.1:mode=660")
        self.assertIsNone(worker_metrics_listen("tcp:0:interface=127.0.0.1", 1))
        self.assertIsNone(worker_metrics_listen("tcp:65535", 1))
        self.assertIsNone(worker_metrics_listen(None, 1))
        self.assertEqual(
            worker_config(config_of("--metrics-listen", "tcp:9100"), 2, 2).metrics_listen, "tcp:9102"
        )

    def test_environment_round_trips_and_names_the_socket(self) -> None:
        """issue 17 part K: a worker's MMGUN_* variables resolve to its Config, and name descriptor 3 as its listening socket."""
        config = config_of("--rate-limit", "9", "--metrics-listen", "tcp:9100")
        env = worker_environment(config, 2, 3, socket.AF_INET, environ={"MMGUN_LISTEN": "tcp:1", "PATH": "/bin"})
        self.assertEqual(resolve({}, env), worker_config(config, 2, 3))
        self.assertEqual(env[INHERITED_LISTEN], f"{LISTEN_FD}:{int(socket.AF_INET)}")
        self.assertEqual(env["MMGUN_SUPERVISED"], "1")
        endpoint = cast(Any, inherited_endpoint(reactor, env))
        self.assertEqual((endpoint.fileno, endpoint.addressFamily), (LISTEN_FD, socket.AF_INET))
        self.assertIsNone(inherited_endpoint(reactor, {}))


class _Process:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.signals: list[str] = []
        self.stdin_closed = False

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)

    def closeStdin(self) -> None:
        self.stdin_closed = True


class _Spawner:
    def __init__(self) -> None:
        self.spawned: list[tuple[Any, _Process, list[str], dict[str, str], dict[int, Any]]] = []

    def spawnProcess(self, protocol: Any, executable: str, args: Any, env: Any = None, path: Any = None, childFDs: Any = None) -> _Process:
        process = _Process(2000 + len(self.spawned))
        self.spawned.append((protocol, process, list(args), dict(env), dict(childFDs)))
        protocol.makeConnection(process)
        return process


class QueueGaugesPlacementTests(SynchronousTestCase):
    """Where the queue's gauges are read with workers: once, in the supervisor."""

    def _gauges(self, *argv: str, **kwargs: Any) -> int:
        from twisted.application.service import IServiceCollection

        from mmgun.service import QueueGauges, make_service

        clients = self.mktemp()
        with open(clients, "w") as f:
            f.write(CLIENT + "\n")
        config = config_of(
            "--database", self.mktemp(), "--clients", clients, "--listen", "tcp:0:interface=127.0.0.1", "--nameserver", "127.0.0.1:53", *argv
        )  # fmt: skip
        service = make_service(config, _reactor, **kwargs)
        return sum(isinstance(s, QueueGauges) for s in IServiceCollection(service))

    def test_the_supervisor_reads_the_queue_gauges_and_workers_do_not(self) -> None:
        """
        issue 17 part K: with N workers each worker read the whole queue for its gauges every 5 s
        (a 100,000-envelope queue took each worker from 50 to 100 MiB): the supervisor reads them
        once (its /metrics has them), a worker not at all, a lone frontend as before.
        """
        from twisted.internet.endpoints import TCP4ServerEndpoint

        self.assertEqual(self._gauges(workers=2), 1)
        worker = TCP4ServerEndpoint(_reactor, 0, interface="127.0.0.1")
        self.assertEqual(self._gauges("--role", "frontend", inherited=worker), 0)
        self.assertEqual(self._gauges("--role", "frontend"), 1)
        self.assertEqual(self._gauges("--role", "sender"), 0)


class PoolTests(TestCase):
    """The pool binds a real socket on 127.0.0.1 (never accepting on it) and starts stub processes on a Clock."""

    def setUp(self) -> None:
        self.spawner = _Spawner()
        self.clock = Clock()
        self.events: list[dict[str, Any]] = []
        self.patch(supervisor_module, "_log", Logger(observer=self.events.append))  # type: ignore[arg-type]
        self.patch(workers_module, "_log", Logger(observer=self.events.append))  # type: ignore[arg-type]
        config = config_of("--listen", "tcp:0:interface=127.0.0.1", "--shutdown-timeout", "5s")
        self.pool = WorkerPool(config, reactor, 3, spawner=self.spawner, clock=self.clock)
        previous = signal.getsignal(signal.SIGHUP)
        self.pool.startService()
        self.addCleanup(self._stop, previous)

    async def _stop(self, previous: Any) -> None:
        if self.pool.running:
            stopped = self.pool.stopService()
            for protocol, *_ in self.spawner.spawned:
                if not protocol.ended:
                    protocol.processEnded(Failure(ProcessTerminated(exitCode=0)))
            await stopped
        self.assertEqual(signal.getsignal(signal.SIGHUP), previous)

    def test_workers_inherit_the_listening_socket(self) -> None:
        """
        issue 17 part K: N frontend processes are started, each with --role=frontend, the one
        bound socket as its descriptor 3 (a listening TCP socket on the configured interface)
        and told so in its environment; the supervisor itself does not accept on it.
        """
        self.assertEqual(len(self.spawner.spawned), 3)
        fd = self.pool.listener.fileno()
        sock = socket.socket(fileno=os.dup(fd))
        self.addCleanup(sock.close)
        self.assertEqual(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN), 1)
        self.assertEqual(sock.getsockname()[0], "127.0.0.1")
        self.assertNotIn(self.pool.listener.port, reactor.getReaders())
        for _, _, argv, env, fds in self.spawner.spawned:
            self.assertIn("--role=frontend", argv)
            self.assertEqual(fds[LISTEN_FD], fd)
            self.assertEqual(env[INHERITED_LISTEN], f"{LISTEN_FD}:{int(socket.AF_INET)}")
            self.assertEqual(env["MMGUN_WORKERS"], "1")
        self.assertEqual([w.name for w in self.pool.workers], ["frontend-1", "frontend-2", "frontend-3"])

    def test_a_dead_worker_is_started_again_with_a_line(self) -> None:
        """issue 17 part K: a worker killed (signal 9) is logged as a warning naming it and started again after 1 s, with the socket."""
        protocol, process, *_ = self.spawner.spawned[1]
        protocol.processEnded(Failure(ProcessTerminated(exitCode=None, signal=9)))
        warnings = [e for e in self.events if e["log_level"].name == "warn"]
        self.assertEqual(len(warnings), 1)
        self.assertEqual((warnings[0]["process"], warnings[0]["pid"]), ("frontend-2", process.pid))
        self.clock.advance(0.9)
        self.assertEqual(len(self.spawner.spawned), 3)
        self.clock.advance(0.1)
        self.assertEqual(len(self.spawner.spawned), 4)
        self.assertEqual(self.spawner.spawned[3][4][LISTEN_FD], self.pool.listener.fileno())
        self.assertEqual(self.pool.workers[1].pid, self.spawner.spawned[3][1].pid)

    def test_sighup_is_passed_on_to_every_worker(self) -> None:
        """issue 17 part K: SIGHUP to the supervisor reaches each running worker as SIGHUP (each reloads its clients file)."""
        # The handler (installed at start) schedules the forwarding on the reactor's thread.
        self.assertEqual(signal.getsignal(signal.SIGHUP), self.pool._on_sighup)
        for protocol, *_ in self.spawner.spawned:
            protocol.childDataReceived(1, b'{"log_level": "info", "log_format": "started"}\n')
        self.pool.forward_sighup()
        self.assertEqual([p.signals for _, p, *_ in self.spawner.spawned], [["HUP"], ["HUP"], ["HUP"]])

    def test_sighup_waits_for_a_new_worker_to_have_started(self) -> None:
        """
        issue 17 part K: a worker that has not yet logged a line may not have set SIGHUP aside
        (its default action ends the process): a SIGHUP passed on then is held, and sent once
        the worker writes its first log line — once, however many came meanwhile.
        """
        first, second, third = self.spawner.spawned
        first[0].childDataReceived(1, b'{"log_level": "info", "log_format": "started"}\n')
        self.pool.forward_sighup()
        self.pool.forward_sighup()
        self.assertEqual([p.signals for _, p, *_ in self.spawner.spawned], [["HUP", "HUP"], [], []])
        second[0].childDataReceived(2, b"a warning on stderr, before twistd logs\n")
        self.assertEqual(second[1].signals, [])
        second[0].childDataReceived(1, b'{"log_level": "info", "log_format": "started"}\n')
        self.assertEqual(second[1].signals, ["HUP"])
        second[0].childDataReceived(1, b'{"log_level": "info", "log_format": "more"}\n')
        self.assertEqual(second[1].signals, ["HUP"])
        self.assertEqual(third[1].signals, [])

    async def test_stop_terms_every_worker(self) -> None:
        """issue 17 part K: stopping the supervisor closes each worker's input and sends it SIGTERM; it waits for all."""
        stopped = self.pool.stopService()
        for _, process, *_ in self.spawner.spawned:
            self.assertEqual(process.signals, ["TERM"])
            self.assertTrue(process.stdin_closed)
        self.assertNoResult(stopped)
        for protocol, *_ in self.spawner.spawned:
            protocol.processEnded(Failure(ProcessTerminated(exitCode=0)))
        await stopped
        self.assertEqual(self.pool.listener.port.fileno(), -1, "the supervisor's copy of the socket is closed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def post(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    request = Request(url, data=json.dumps(body).encode(), method="POST")
    with urlopen(request, timeout=10) as response:
        return response.status, json.loads(response.read())


class RealWorkersTests(TestCase):
    async def test_two_workers_share_the_port_survive_a_kill_and_stop_cleanly(self) -> None:
        """
        issue 17 part K: a real ``twistd mmgun --workers 2`` (all roles): two frontend
        children accept on the one --listen port (40 fresh connections, both workers log
        accepted submissions); each worker's /metrics answers on its own port; kill -9 of a
        worker is logged and a new one starts, and /send works meanwhile; SIGHUP (the clients
        file unchanged) makes each worker reload it; SIGTERM: exit status 0, no child left.
        """
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        clients = os.path.join(folder, "clients")
        with open(clients, "w") as f:
            f.write(CLIENT + "\n")
        port, metrics = free_port(), free_port()
        log_path = os.path.join(folder, "twistd.log")
        with open(log_path, "w") as log:
            parent = subprocess.Popen(
                [TWISTD, "-n", "--pidfile=", "mmgun", "--workers", "2", "--database", os.path.join(folder, "db"),
                 "--clients", clients, "--listen", f"tcp:{port}:interface=127.0.0.1",
                 "--metrics-listen", f"tcp:{metrics}:interface=127.0.0.1",
                 "--relay-host", "127.0.0.1:1", "--nameserver", "127.0.0.1:9", "--shutdown-timeout", "5s"],
                cwd=folder, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        self.addCleanup(lambda: parent.poll() is None and (parent.kill() or parent.wait()))  # type: ignore[func-returns-value]

        def running() -> bool:
            if parent.poll() is not None:
                raise AssertionError(f"twistd exited with {parent.returncode}: {read(log_path)[-3000:]}")
            return True

        def workers() -> list[int]:
            found = []
            for pid in children(parent.pid):
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        if b"--role=frontend" in f.read().split(b"\0") and alive(pid):
                            found.append(pid)
                except OSError:
                    pass
            return found

        def cleanup_children() -> None:
            for pid in children(parent.pid):
                if alive(pid):
                    os.kill(pid, signal.SIGKILL)

        self.addCleanup(cleanup_children)
        await wait_until(lambda: running() and len(workers()) == 2, "two frontend workers", deadline=60)
        def worker_running(pid: int) -> bool:
            return running() and f" {pid}] mmgun running" in read(log_path)

        def scrape(port: int) -> str:
            with urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
                return str(response.read().decode())

        first = workers()
        for pid in first:
            await wait_until(partial(worker_running, pid), f"worker {pid} running", deadline=60)
        url = f"http://127.0.0.1:{port}/send"
        message = {"client_id": CLIENT, "sender": "a@example.com", "recipients": ["b@example.org"], "subject": "s", "body": "b"}

        async def send_many(count: int) -> None:
            for _ in range(count):
                status, answer = await deferToThread(post, url, message)
                self.assertEqual((status, answer["result"]), (200, "queued"))

        await send_many(40)
        log_text = read(log_path)
        served = {pid for pid in first if f" {pid}] accepted submission" in log_text}
        self.assertEqual(served, set(first), "the kernel handed connections to both workers")
        for index in (1, 2):
            text = await deferToThread(scrape, metrics + index)
            self.assertIn('mmgun_http_request_duration_seconds_count{code="200",endpoint="/send"}', text)

        victim = first[0]
        os.kill(victim, signal.SIGKILL)
        await wait_until(lambda: running() and f"process {victim} ended unexpectedly" in read(log_path), "the death's line")
        await send_many(5)  # the other worker still accepts on the shared socket
        await wait_until(lambda: running() and len(workers()) == 2 and victim not in workers(), "a new worker", deadline=60)
        (new,) = set(workers()) - set(first)
        await wait_until(partial(worker_running, new), "the new worker running", deadline=60)

        before = read(log_path).count("clients file reloaded")
        os.kill(parent.pid, signal.SIGHUP)
        await wait_until(lambda: running() and read(log_path).count("clients file reloaded") >= before + 2, "both workers reloading")
        self.assertIn("SIGHUP passed on to 2 frontend workers", read(log_path))

        remaining = workers()
        os.kill(parent.pid, signal.SIGTERM)
        await wait_until(lambda: parent.poll() is not None, "the supervisor's exit", deadline=60)
        self.assertEqual(parent.returncode, 0, read(log_path)[-3000:])
        await wait_until(lambda: not any(alive(pid) for pid in remaining), "the workers' exit")
