"""
issue 14 (speed): the webhooks role in a supervised child process (:mod:`mmgun.supervisor`).

The Config → environment round trip for every field; the real child (the twistd plugin, on
a real SQLite file, POSTing to a real receiver on 127.0.0.1) receiving the store's events,
restarted after kill -9, stopped in order with its parent's service, ending by itself when
its input pipe closes, and ending when a real ``twistd mmgun`` parent is killed with
SIGKILL; its log lines in the parent's log with the process named; the back-off, the stop
(SIGTERM, then SIGKILL after the timeout) and the line handling on a Clock with a stub
reactor; which topologies spawn a child.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Any, cast

import attrs
from hypothesis import given, strategies as st
from twisted.application.service import MultiService
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import Logger, LogLevel, eventAsJSON, formatEvent
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mmgun import supervisor as supervisor_module
from mmgun.config import FLAGS, OPTIONS, Config, Options, environment, resolve
from mmgun.dispatcher import WebhookDispatcher
from mmgun.logs import format_classic
from mmgun.service import OrderedService, make_service
from mmgun.supervisor import SUPERVISED, ChildProcess, webhooks_environment, webhooks_process

from .helpers import CLIENT, wait_until
from .test_signer import StubReactor
from .test_webhook_dispatch import DispatchCase, Hooks

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")

#: A value other than the default for every option (so that a field left out of the environment shows).
EVERY_OPTION = {
    "listen": "tcp:9999:interface=127.0.0.2",
    "metrics-listen": "tcp:9998:interface=127.0.0.1",
    "database": "/srv/mmgun/db.sqlite3",
    "clients": "/etc/mmgun/clients",
    "max-message-size": "3M",
    "max-recipients": "7",
    "rate-limit": "0.25",
    "rate-burst": "9",
    "max-queued": "0",
    "request-timeout": "0.05",
    "smtp-port": "2525",
    "relay-host": "relay.example:26",
    "helo": "mx.example",
    "poll-interval": "0.001",
    "retry-min": "1.5s",
    "retry-max": "2h",
    "queue-lifetime": "3d",
    "max-connections": "13",
    "max-per-destination": "3",
    "destination-pause": "45s",
    "smtp-timeout": "17s",
    "smtp-cache-time": "4s",
    "smtp-cache-size": "12",
    "lease-time": "19s",
    "tls": "verify",
    "mta-sts-ca": "/etc/mmgun/mta-sts-ca.pem",
    "clean-interval": "23s",
    "retention": "1d",
    "log-format": "json",
    "shutdown-timeout": "2.5s",
    "min-free-space": "1K",
    "max-queued-bytes": "0",
    "max-http-connections": "29",
    "max-http-connections-per-source": "5",
    "max-auth-failures": "31",
    "sender-id": "host-a.example",
    "mx-address-limit": "2",
    "mx-session-limit": "1",
    "sender-policy": "domains",
    "database-pool-size": "7",
    "tls-cert": "/etc/mmgun/cert.pem",
    "tls-key": "/etc/mmgun/key.pem",
    "smtp-command-timeout": "61s",
    "smtp-data-timeout": "62s",
    "smtp-greet-pause": "0.5",
    "max-smtp-connections": "11",
    "max-smtp-connections-per-source": "3",
    "workers": "3",
}


def config_of(*argv: str, environ: dict[str, str] | None = None) -> Config:
    options = Options(environ or {})
    options.parseOptions(list(argv))
    return options.config


def every_field_set() -> Config:
    argv = [f"--{name}={value}" for name, value in EVERY_OPTION.items()]
    argv += [f"--{name}" for name in FLAGS]
    argv += ["--role", "sender", "--role", "webhooks", "--nameserver", "127.0.0.1:5353", "--nameserver", "[::1]:53"]
    argv += ["--smtp-listen", "tcp:587:interface=127.0.0.1", "--smtp-listen", "tcp:2587"]
    return config_of(*argv)


class EnvironmentTests(SynchronousTestCase):
    def test_every_field_round_trips(self) -> None:
        """
        issue 14 (speed) item 1: a Config with every field away from its default, made into
        MMGUN_* variables, resolves (no command line) to an equal Config; a field the
        function forgot would come back as its default.
        """
        self.assertEqual(set(EVERY_OPTION), set(OPTIONS))
        config = every_field_set()
        defaults = config_of()
        same = [f.name for f in attrs.fields(Config) if getattr(config, f.name) == getattr(defaults, f.name)]
        self.assertEqual(same, [], "the test must set every field away from its default")
        env = environment(config)
        self.assertTrue(all(name.startswith("MMGUN_") for name in env))
        self.assertEqual(resolve({}, env), config)

    def test_defaults_round_trip(self) -> None:
        """issue 14 (speed) item 1: the default Config (None options left out, no nameservers) round-trips too."""
        config = config_of()
        self.assertEqual(resolve({}, environment(config)), config)

    @given(st.floats(min_value=0, max_value=1e12, allow_nan=False, allow_infinity=False))
    def test_any_duration_round_trips_exactly(self, seconds: float) -> None:
        """issue 14 (speed) item 1: a duration such as 1e-05 s is written without an exponent and read back exactly."""
        config = attrs.evolve(config_of(), poll_interval=seconds, rate_limit=seconds)
        self.assertEqual(resolve({}, environment(config)), config)

    def test_child_environment(self) -> None:
        """
        issue 14 (speed) item 1: the webhooks child gets the parent's Config with the
        webhooks role only, no metrics port (the parent's), a JSON log and the supervised
        mark; MMGUN_* variables the parent inherited do not leak into it (the Config
        already says what they said, or what the command line overrode).
        """
        config = every_field_set()
        inherited = {
            "MMGUN_RELAY_HOST": "evil.example",
            "MMGUN_WEBHOOKS_IN_PROCESS": "1",
            "MMGUN_X": "1",
            "HOME": "/home/m",
        }
        env = webhooks_environment(config, inherited)
        self.assertEqual(env[SUPERVISED], "1")
        self.assertEqual(env["HOME"], "/home/m")
        self.assertNotIn("MMGUN_X", env)
        self.assertNotIn("MMGUN_METRICS_LISTEN", env)
        child = resolve({}, env)
        self.assertEqual(child, attrs.evolve(config, roles=("webhooks",), metrics_listen=None, log_format="json"))


# -- the real child ------------------------------------------------------------------------------


class RealChildTests(DispatchCase):
    """A real webhooks child on the test's SQLite file, POSTing to a real receiver on 127.0.0.1."""

    def setUp(self) -> None:
        super().setUp()
        self.clock.advance(time.time() - self.clock.seconds())  # the child's times are wall-clock times
        self.logged: list[dict[str, Any]] = []
        self.supervisor_log: list[dict[str, Any]] = []
        self.patch(supervisor_module, "_log", Logger(observer=self.supervisor_log.append))  # type: ignore[arg-type]

    def child(self) -> ChildProcess:
        config = config_of(
            "--database", self.path, "--webhook-allow-private", "--lease-time", "3s", "--shutdown-timeout", "10s",
            "--role", "sender", "--role", "webhooks",
        )  # fmt: skip
        from twisted.internet import reactor

        service = webhooks_process(config, reactor, publisher=self.logged.append)  # type: ignore[arg-type]
        service.startService()
        self.addCleanup(lambda: service.stopService() if service.running else None)
        return service

    def child_events(self, pid: int | None, text: str) -> list[dict[str, Any]]:
        return [e for e in self.logged if e.get("mmgun_pid") == pid and text in (formatEvent(e) or "")]

    async def started(self, service: ChildProcess, not_pid: int | None = None) -> int:
        """The pid of the child once its dispatcher runs."""
        await wait_until(
            lambda: (
                service.pid not in (None, not_pid) and self.child_events(service.pid, "webhook dispatcher started as")
            ),
            "the webhooks child's dispatcher",
        )
        return cast(int, service.pid)

    async def test_events_posted_and_child_restarted_after_kill(self) -> None:
        """
        issue 14 (speed) item 2: the store's events reach the receiver through the child;
        kill -9 of the child: it is started again (one warning naming it) and later events
        still arrive.
        """
        hooks = Hooks(lambda: self.key())
        self.webhook(self.serve(hooks))
        self.delivered("ann@x.example")
        service = self.child()
        first = await self.started(service)
        await wait_until(lambda: "ann@x.example" in hooks.recipients(), "the first event")
        os.kill(first, signal.SIGKILL)
        second = await self.started(service, not_pid=first)
        self.assertNotEqual(first, second)
        (ended,) = [e for e in self.supervisor_log if "ended unexpectedly" in e["log_format"]]
        self.assertEqual((ended["pid"], ended["delay"], ended["log_level"]), (first, 1.0, LogLevel.warn))
        self.assertIsInstance(cast(Any, service.last_exit)[1].value, ProcessTerminated)
        self.delivered("bob@x.example")
        # The killed child's lease on the webhook ends after --lease-time (3 s); then the new one POSTs.
        await wait_until(lambda: "bob@x.example" in hooks.recipients(), "an event after the restart")
        self.assertEqual(set(hooks.recipients()), {"ann@x.example", "bob@x.example"})

    async def test_child_log_lines_reach_the_parent_with_the_process(self) -> None:
        """
        issue 14 (speed) item 2: the child's JSON log events are published in the parent
        with ``mmgun_process`` and ``mmgun_pid``, keep their namespace, level and text, and
        come out of the parent's text and JSON logs naming the process.
        """
        service = self.child()
        pid = await self.started(service)
        (event,) = self.child_events(pid, "webhook dispatcher started as")
        self.assertEqual(
            (event["mmgun_process"], event["log_namespace"], event["log_level"]),
            ("webhooks", "mmgun.dispatcher", LogLevel.info),
        )
        line = cast(str, format_classic(event))
        self.assertRegex(
            line, rf"^\S+ \[mmgun\.dispatcher#info\] \[webhooks {pid}\] webhook dispatcher started as \S+/[0-9a-f]+\n$"
        )
        as_json = json.loads(eventAsJSON(event))
        self.assertEqual(
            (as_json["mmgun_process"], as_json["mmgun_pid"], as_json["log_namespace"]),
            ("webhooks", pid, "mmgun.dispatcher"),
        )
        self.assertTrue(self.child_events(pid, f"mmgun running (pid {pid})"))

    async def test_stopping_the_service_stops_the_child_in_order(self) -> None:
        """
        issue 14 (speed) item 2: the parent's stop closes the child's input and sends
        SIGTERM; the child stops its services and exits 0 (not killed), and is not started again.
        """
        service = self.child()
        pid = await self.started(service)
        await service.stopService()  # type: ignore[misc]
        self.assertEqual(cast(Any, service.last_exit)[0], pid)
        self.assertIsInstance(cast(Any, service.last_exit)[1].value, ProcessDone)
        self.assertTrue(self.child_events(pid, "Server Shut Down."))
        self.assertFalse(os.path.exists(f"/proc/{pid}"))
        self.assertIsNone(service.pid)
        self.assertFalse([e for e in self.supervisor_log if "ended unexpectedly" in e["log_format"]])

    async def test_child_stops_by_itself_when_its_input_closes(self) -> None:
        """
        issue 14 (speed) item 2: the parent's end of the child's stdin pipe closed, as a
        parent's death closes it (no signal sent): the child notices, stops in order and exits 0.
        """
        service = self.child()
        pid = await self.started(service)
        child = cast(Any, service)._child
        child.transport.closeStdin()
        await wait_until(lambda: service.last_exit is not None, "the child's exit")
        self.assertEqual(cast(Any, service.last_exit)[0], pid)
        self.assertIsInstance(cast(Any, service.last_exit)[1].value, ProcessDone)
        self.assertTrue(self.child_events(pid, "the supervising process closed this process's input"))
        self.assertFalse(self.child_events(pid, "received signal"))


class KilledParentTests(TestCase):
    async def test_child_ends_when_its_twistd_parent_is_killed(self) -> None:
        """
        issue 14 (speed) item 2: a real ``twistd mmgun`` with the sender and webhooks roles
        spawns its webhooks child (the same plugin, ``--role=webhooks``), whose lines are in
        the parent's text log naming it; kill -9 of the parent: the child, reparented, exits
        on its own.
        """
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        log_path = os.path.join(folder, "twistd.log")
        with open(log_path, "w") as log:
            parent = subprocess.Popen(
                [TWISTD, "-n", "--pidfile=", "mmgun", "--database", os.path.join(folder, "db"), "--role", "sender",
                 "--role", "webhooks", "--relay-host", "127.0.0.1:1", "--nameserver", "127.0.0.1:9"],
                cwd=folder, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        self.addCleanup(lambda: parent.poll() is None and (parent.kill() or parent.wait()))  # type: ignore[func-returns-value]

        def running() -> bool:
            if parent.poll() is not None:
                raise AssertionError(f"twistd exited with {parent.returncode}: {read(log_path)[-2000:]}")
            return True

        await wait_until(lambda: running() and children(parent.pid), "the webhooks child")
        (child,) = children(parent.pid)
        self.addCleanup(lambda: alive(child) and os.kill(child, signal.SIGKILL))  # type: ignore[func-returns-value]
        with open(f"/proc/{child}/cmdline", "rb") as f:
            self.assertIn(b"--role=webhooks", f.read().split(b"\0"))
        await wait_until(
            lambda: running() and f"[webhooks {child}] webhook dispatcher started as" in read(log_path),
            "the child's line in the parent's log",
        )
        os.kill(parent.pid, signal.SIGKILL)
        await wait_until(lambda: parent.poll() is not None, "the parent's death")
        await wait_until(lambda: not alive(child), "the child's exit")


def read(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read()


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
                found.append(int(entry))
    return found


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its new parent to reap it has exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


# -- supervision on a Clock ----------------------------------------------------------------------


class SupervisionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = StubReactor()
        self.clock = Clock()
        self.logged: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self.patch(supervisor_module, "_log", Logger(observer=self.events.append))  # type: ignore[arg-type]
        self.service = ChildProcess(
            "webhooks", cast(Any, self.reactor), argv=["python", "child"], env={"A": "1"}, stop_timeout=7.0,
            clock=self.clock, publisher=self.logged.append,  # type: ignore[arg-type]
        )  # fmt: skip
        self.service.startService()

    def spawns(self) -> int:
        return len(self.reactor.spawned)

    def test_a_child_ending_during_shutdown_is_not_started_again(self) -> None:
        """issue 14 (review): once the process is shutting down (systemd signalled the child too), no new child."""
        self.service.shutting_down()
        self.reactor.end()
        self.clock.advance(60)
        self.assertEqual(self.spawns(), 1)
        self.assertEqual([e["log_level"].name for e in self.events if "ended" in e.get("log_format", "")], ["info"])

    def test_child_starts_in_the_folder_mmgun_started_in(self) -> None:
        """issue 14 (review): under twistd --rundir, a relative --database still means the parent's file for the child."""
        here = os.getcwd()
        elsewhere = self.mktemp()
        os.makedirs(elsewhere)
        os.chdir(elsewhere)  # as twistd --rundir does after makeService
        self.addCleanup(os.chdir, here)
        self.reactor.end()
        self.clock.advance(1)
        self.assertEqual(self.reactor.paths, [here, here])

    def test_a_line_the_log_reader_chokes_on_is_kept_as_text(self) -> None:
        """issue 14 (review): a JSON line eventFromJSON raises on (not ValueError) does not stop the reading of the child's log."""
        protocol = self.reactor.spawned[-1][0]
        # An unknown class UUID: eventFromJSON raises KeyError, not ValueError.
        protocol.childDataReceived(1, b'{"log_time": 1, "x": {"__class_uuid__": "02E59486-F24D-46AD-8224-3ACDF2A5732B"}}\n')
        protocol.childDataReceived(1, b'{"log_time": 2.0, "log_format": "after", "log_namespace": "n", "log_level": {"__class_uuid__": "02E59486-F24D-46AD-8224-3ACDF2A5732A", "name": "info"}}\n')
        self.assertIn("after", [e.get("log_format") for e in self.logged])

    def test_back_off_of_restarts(self) -> None:
        """
        issue 14 (speed) item 1: a child that keeps dying is started again after 1, 2, 4, 8,
        16, 30, 30 s, one warning each; one that lived 60 s is started again after 1 s.
        """
        self.assertEqual(self.spawns(), 1)
        for delay in (1, 2, 4, 8, 16, 30, 30):
            before = self.spawns()
            self.reactor.end()
            self.clock.advance(delay - 0.01)
            self.assertEqual(self.spawns(), before, f"before {delay} s")
            self.clock.advance(0.01)
            self.assertEqual(self.spawns(), before + 1, f"after {delay} s")
        warnings = [e for e in self.events if e["log_level"] == LogLevel.warn]
        self.assertEqual([e["delay"] for e in warnings], [1, 2, 4, 8, 16, 30, 30])
        self.clock.advance(60)
        self.reactor.end()
        self.clock.advance(1)
        self.assertEqual(self.spawns(), 9)

    def test_stop_closes_input_then_terms_then_kills(self) -> None:
        """
        issue 14 (speed) item 1: stop closes the child's stdin and sends SIGTERM; a child
        still running after the stop timeout gets SIGKILL; the stop fires when it has exited
        and nothing is started again.
        """
        _, process, _ = self.reactor.spawned[0]
        d = self.service.stopService()
        self.assertTrue(process.stdin_closed)
        self.assertEqual(process.signals, ["TERM"])
        self.clock.advance(6.9)
        self.assertEqual(process.signals, ["TERM"])
        self.assertNoResult(d)
        self.clock.advance(0.1)
        self.assertEqual(process.signals, ["TERM", "KILL"])
        self.reactor.end(code=0)
        self.successResultOf(d)  # type: ignore[arg-type]
        self.clock.advance(100)
        self.assertEqual(self.spawns(), 1)
        self.assertFalse([e for e in self.events if "ended unexpectedly" in e["log_format"]])

    def test_stop_during_back_off_starts_nothing(self) -> None:
        """issue 14 (speed) item 1: a stop while a restart waits cancels it."""
        self.reactor.end()
        self.assertIsNone(self.service.stopService())
        self.clock.advance(100)
        self.assertEqual(self.spawns(), 1)

    def test_log_lines_stderr_and_garbage(self) -> None:
        """
        issue 14 (speed) item 1: JSON log lines cut anywhere are published whole with the
        process and pid; stderr lines and non-JSON stdout lines are warnings, at most 50
        per child, each cut to 500 characters; an endless line is dropped, not kept.
        """
        protocol, process, _ = self.reactor.spawned[0]
        line = eventAsJSON(
            {
                "log_format": "hello {who}",
                "who": "you",
                "log_time": 1.0,
                "log_level": LogLevel.info,
                "log_namespace": "x",
            }
        )
        data = (line + "\n" + line + "\n").encode()
        for i in range(len(data)):
            protocol.childDataReceived(1, data[i : i + 1])
        self.assertEqual(
            [(formatEvent(e), e["mmgun_process"], e["mmgun_pid"]) for e in self.logged],
            [("hello you", "webhooks", process.pid)] * 2,
        )
        protocol.childDataReceived(1, b"not json\n")
        protocol.childDataReceived(2, b"".join(b"line %d: " % i + b"x" * 1000 + b"\n" for i in range(60)))
        protocol.childDataReceived(1, b"y" * (supervisor_module.MAX_LOG_LINE + 10))
        warnings = [e for e in self.events if e["log_level"] == LogLevel.warn]
        self.assertEqual(len(warnings), 51)
        self.assertEqual(warnings[0]["line"], "not json")
        self.assertEqual(len(warnings[1]["line"]), 500)
        self.assertIn("more output, not logged", warnings[-1]["log_format"])
        self.assertEqual(len(self.logged), 2)
        self.assertLess(len(cast(Any, protocol)._buffers[1]), 100)


# -- which topologies spawn a child ----------------------------------------------------------------


class TopologyTests(SynchronousTestCase):
    def roles_tree(self, *argv: str) -> list[Any]:
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        clients = os.path.join(folder, "clients")
        with open(clients, "w") as f:
            f.write(CLIENT + "\n")
        config = config_of("--database", os.path.join(folder, "db"), "--clients", clients, *argv)
        service = make_service(config, MemoryReactorClock())  # never started: nothing runs
        return list(walk(service))

    def test_default_spawns_a_child(self) -> None:
        """issue 14 (speed) item 1: all four roles (the default): the webhooks role is a supervised child, no dispatcher here."""
        tree = self.roles_tree()
        self.assertEqual([s.name for s in tree if isinstance(s, ChildProcess)], ["webhooks"])
        self.assertFalse([s for s in tree if isinstance(s, WebhookDispatcher)])

    def test_in_process_flag_and_webhooks_alone(self) -> None:
        """issue 14 (speed) item 1: --webhooks-in-process, MMGUN_WEBHOOKS_IN_PROCESS and --role webhooks alone keep the dispatcher here."""
        for argv in (("--webhooks-in-process",), ("--role", "webhooks")):
            tree = self.roles_tree(*argv)
            self.assertFalse([s for s in tree if isinstance(s, ChildProcess)], argv)
            self.assertEqual(len([s for s in tree if isinstance(s, WebhookDispatcher)]), 1, argv)
        self.assertTrue(config_of(environ={"MMGUN_WEBHOOKS_IN_PROCESS": "yes"}).webhooks_in_process)


def walk(service: Any) -> Any:
    yield service
    if isinstance(service, (MultiService, OrderedService)):
        for child in service:
            yield from walk(child)


class ChildFailureTextTests(SynchronousTestCase):
    def test_a_childs_failure_keeps_its_text_in_the_parents_log(self) -> None:
        """issue 14 (review): a failure the child logs reaches the parent's text log with its exception and message."""
        import io
        import json

        from twisted.logger import Logger as _Logger

        from mmgun import logs
        from mmgun.supervisor import ChildProcess

        out = io.StringIO()
        self.patch(logs.sys, "stdout", out)
        child_log = _Logger(namespace="mmgun.dispatcher", observer=logs.json_observer())
        try:
            raise ZeroDivisionError("division by zero")
        except ZeroDivisionError:
            child_log.failure("following the feed failed")
        line = out.getvalue().strip()
        self.assertIn("ZeroDivisionError", json.loads(line)["mmgun_traceback"])
        published: list[Any] = []
        owner = ChildProcess("webhooks", cast(Any, StubReactor()), argv=["x"], env={}, stop_timeout=1.0, publisher=published.append)  # type: ignore[arg-type]
        from twisted.logger import eventFromJSON

        owner.publish(eventFromJSON(line), 4321)
        text = logs.format_classic(published[0])
        assert text is not None
        self.assertIn("[webhooks 4321] following the feed failed", text)
        self.assertIn("ZeroDivisionError: division by zero", text)
        self.assertNotIn("unpersistable", text)
