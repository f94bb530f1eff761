"""The text log: mmgun's faster formatter writes exactly twistd's lines, and twistd uses it."""

from __future__ import annotations

import os
import signal
import subprocess

from hypothesis import given, settings, strategies as st
from twisted.internet.defer import Deferred
from twisted.logger import LogLevel, formatEventAsClassicLogText
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mmgun.logs import _SecondCache, format_classic, twistd_text_observer
from mmgun.tap import _log_through

from .helpers import wait_until
from .test_operations import TWISTD

T = 1_764_400_000.25


def event(fmt: object, /, **fields: object) -> dict:
    # fmt positional-only: hypothesis makes fields of any name, "fmt" too.
    return {"log_format": fmt, "log_level": LogLevel.info, "log_namespace": "mmgun.test", "log_time": T, **fields}


class FormatTests(SynchronousTestCase):
    def same(self, e: dict) -> str | None:
        ours = format_classic(e)
        self.assertEqual(ours, formatEventAsClassicLogText(e))
        return ours

    def test_plain_event(self) -> None:
        line = self.same(event("accepted submission {submission} from {client}: {recipients} recipients", submission="ab", client="c", recipients=3))
        assert line is not None
        self.assertRegex(line, r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} \[mmgun\.test#info\] accepted submission ab from c: 3 recipients\n$")

    def test_conversions_attributes_and_items(self) -> None:
        self.same(event("{a!r} {b.real} {c[k]} {d:>5}", a="x", b=3, c={"k": "v"}, d=7))

    def test_multiline_text_is_indented(self) -> None:
        self.assertIn("\n\tsecond", self.same(event("first\n{x}", x="second")))

    def test_levels_and_missing_namespace(self) -> None:
        e = event("warned")
        del e["log_namespace"]
        e["log_level"] = LogLevel.warn
        self.assertIn("[-#warn]", self.same(e))

    def test_fallbacks(self) -> None:
        """Events the fast path cannot write exactly go to twisted.logger's formatter."""
        self.same(event("{missing}"))  # "Unable to format event …"
        self.same(event("{f()}", f=lambda: "called"))
        self.same(event(None))
        self.same(event("legacy {x}", x=1, log_system="-"))
        self.same(event("{x:.2f}", x=3.14159, log_flattened={"x:.2f": "3.14159"}))  # flattened by a JSON observer first
        self.same({"log_format": "no time or level"})
        try:
            _ = 1 / 0
        except ZeroDivisionError:
            self.same(event("boom", log_failure=Failure()))

    @settings(max_examples=200, deadline=None)
    @given(st.text(), st.dictionaries(st.from_regex(r"[a-z]{1,5}", fullmatch=True), st.one_of(st.text(), st.integers(), st.none())), st.floats(0, 4e9))
    def test_any_format_and_fields(self, fmt: str, fields: dict, when: float) -> None:
        e = event(fmt, **fields)
        e["log_time"] = when
        self.same(e)

    def test_timestamp_cached_per_second_only(self) -> None:
        cache = _SecondCache()
        from twisted.logger import formatTime

        for when in (T, T + 0.5, T + 1, T + 86400 * 180, T + 0.1, 1.9999999, 2.0, 2.9999994):
            self.assertEqual(cache(when), formatTime(when))


class TwistdTests(TestCase):
    def test_no_text_observer_for_syslog_or_a_custom_logger(self) -> None:
        self.assertIsNone(twistd_text_observer({"syslog": True, "logfile": "x", "nodaemon": True}))
        self.assertIsNone(twistd_text_observer({"logger": object(), "logfile": "x", "nodaemon": True}))

    def test_observer_writes_to_the_logfile(self) -> None:
        path = os.path.abspath(self.mktemp())
        observer = twistd_text_observer({"logfile": path, "nodaemon": True})
        assert observer is not None
        self.addCleanup(observer._outFile.close)
        observer(event("hello {who}", who="file"))
        with open(path) as f:
            self.assertIn("[mmgun.test#info] hello file\n", f.read())

    def test_application_gets_the_observer(self) -> None:
        """twistd asks the application for an ILogObserver; the service sets it on adoption."""
        from twisted.application.service import Application, MultiService
        from twisted.logger import ILogObserver

        observer = twistd_text_observer({"logfile": os.path.abspath(self.mktemp()), "nodaemon": True})
        assert observer is not None
        self.addCleanup(observer._outFile.close)
        service, application = MultiService(), Application("mmgun")
        _log_through(service, observer)
        service.setServiceParent(application)
        self.assertIs(application.getComponent(ILogObserver), observer)
        self.assertIs(observer.formatEvent, format_classic)

    async def _daemon(self) -> None:
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        logfile = os.path.join(folder, "mmgun.log")
        process = subprocess.Popen(
            [TWISTD, "--pidfile=", "-n", f"--logfile={logfile}", "mmgun", "--database", os.path.join(folder, "db"),
             "--role", "sender", "--relay-host", "127.0.0.1:1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )
        self.addCleanup(process.kill)  # a no-op once the process has exited

        def text() -> str:
            with open(logfile) as f:
                return f.read()

        await wait_until(lambda: os.path.exists(logfile) and "starting up." in text(), "the daemon's first events")
        # SIGUSR1 still rotates twistd's log file.
        process.send_signal(signal.SIGUSR1)
        await wait_until(lambda: os.path.exists(logfile + ".1"), "the rotated log")

        def running() -> bool:
            with open(logfile + ".1") as f:
                return "mmgun running" in f.read() + text()

        await wait_until(running, "mmgun's own signal handlers")
        process.send_signal(signal.SIGTERM)
        await wait_until(lambda: process.poll() is not None, "the daemon to exit")
        self.assertEqual(process.returncode, 0)
        with open(logfile + ".1") as f:
            first = f.read()
        self.assertRegex(first, r"\[twisted\.scripts\._twistd_unix\.UnixAppLogger#info\] twistd [\d.]+ \(.*\) starting up\.")
        self.assertRegex(text(), r"(?m)^\S+ \[mmgun\.tap#info\] received signal SIGTERM: stopping$")
        self.assertIn("Server Shut Down.", text())

    def test_twistd_logs_through_it(self) -> Deferred:
        return Deferred.fromCoroutine(self._daemon())

    async def _twist(self) -> None:
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        out = os.path.join(os.path.dirname(folder), "twist.out")
        with open(out, "wb") as f:
            process = subprocess.Popen(
                [os.path.join(os.path.dirname(TWISTD), "twist"), "mmgun", "--database", os.path.join(folder, "db"),
                 "--role", "sender", "--relay-host", "127.0.0.1:1"],
                cwd=folder, stdout=f, stderr=subprocess.STDOUT,
            )
        self.addCleanup(process.kill)  # a no-op once the process has exited

        def output() -> str:
            with open(out) as f:
                return f.read()

        # Not "Starting reactor": that is logged before mmgun's own signal handlers are installed.
        await wait_until(lambda: "mmgun running" in output(), "the reactor to start")
        process.send_signal(signal.SIGTERM)
        await wait_until(lambda: process.poll() is not None, "the daemon to exit")
        self.assertEqual(process.returncode, 0, output())
        self.assertIn("received signal {signal}: stopping", output())  # `twist` logs to standard output itself
        self.assertNotIn("twistd.log", os.listdir(folder))

    def test_twist_keeps_its_own_log(self) -> Deferred:
        """Under `twist` (no --logfile option) mmgun leaves logging alone: no twistd.log appears."""
        return Deferred.fromCoroutine(self._twist())

