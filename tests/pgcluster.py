"""
A private PostgreSQL cluster for the tests (issue 15): initdb in a temporary directory,
reachable only through a Unix socket in that directory (no TCP port), fsync on.

- :func:`start` makes a cluster and returns its :class:`Cluster` handle (``url``,
  ``stop``, ``restart``, ``kill``): for a test that restarts or kills PostgreSQL, which
  must not do it to the cluster other tests share.
- :func:`new_database` returns the URL of a fresh, empty database on the shared cluster:
  the one named by ``MMGUN_TEST_POSTGRES`` (set by ``python -m tests.pgcluster -- …``,
  which ``make unit`` runs trial under), else one started on first use by this process
  and stopped when it exits.

Every cluster is stopped, and its directory removed, when the process that started it
exits, however it exits: ``atexit`` and SIGTERM/SIGHUP for the ordinary ways, and for
the others (SIGKILL, a crash) a small watchdog process that waits for its parent's end
of a pipe to close, then stops the postmaster by the PID in ``postmaster.pid``. Nothing
is ever stopped by name.

Running as root, initdb and the postmaster run as the ``postgres`` system user
(``runuser``): initdb refuses root. Without PostgreSQL's server binaries, every use
fails with one line naming the fix; the tests are never skipped.
"""

from __future__ import annotations

import atexit
import glob
import itertools
import os
import pwd
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

#: The environment variable through which a test run shares one cluster: the URL of its ``postgres`` database.
ENVIRONMENT = "MMGUN_TEST_POSTGRES"
#: The superuser initdb makes (trust authentication: no password).
SUPERUSER = "mmgun"
#: The system user that owns the cluster when the tests run as root.
SYSTEM_USER = "postgres"
#: How long starting or stopping the postmaster may take.
TIMEOUT = 60
#: Server settings: no TCP at all, durable commits (the store's durability claims are tested on it),
#: connections enough for the contract suite's 50 concurrent replays under trial --jobs=2.
SETTINGS = (
    "listen_addresses=",
    "fsync=on",
    "synchronous_commit=on",
    "max_connections=300",
    "shared_buffers=32MB",
    "log_min_messages=warning",
    "log_line_prefix=%m [%p] ",
)

INSTALL_HINT = (
    "PostgreSQL's server binaries (initdb, pg_ctl) were not found in /usr/lib/postgresql/*/bin nor in "
    "`pg_config --bindir`: install them (as root: apt-get update && apt-get install -y postgresql); "
    "the PostgreSQL tests are not skipped"
)


class ClusterError(Exception):
    """The cluster could not be made, started or stopped: one line for whoever runs the tests."""


def bindir() -> str:
    """The newest PostgreSQL's server binaries: /usr/lib/postgresql/<newest>/bin, else ``pg_config --bindir``."""
    found = sorted(
        (os.path.dirname(path) for path in glob.glob("/usr/lib/postgresql/*/bin/initdb")),
        key=lambda d: [int(part) for part in re.findall(r"\d+", d.split("/")[-2])],
    )
    if found:
        return found[-1]
    try:
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        out = ""
    if out and os.path.exists(os.path.join(out, "initdb")) and os.path.exists(os.path.join(out, "pg_ctl")):
        return out
    raise ClusterError(INSTALL_HINT)


def _as_owner() -> list[str]:
    """The prefix that runs a server command as the cluster's owner: ``runuser -u postgres --`` as root, else nothing."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        raise ClusterError(
            f"running as root, the PostgreSQL tests need the {SYSTEM_USER!r} system user (initdb refuses root): "
            "install Debian's postgresql package, which makes it, or run the tests as another user"
        ) from None
    return ["runuser", "-u", SYSTEM_USER, "--"]


class Cluster:
    """A running private cluster; ``url`` is its ``postgres`` database's URL (libpq, socket directory as ``host``)."""

    def __init__(self, directory: str, bindir: str) -> None:
        self.directory = directory
        self.bindir = bindir
        self.data = os.path.join(directory, "data")
        self.log = os.path.join(directory, "postgresql.log")
        self.url = database_url(directory, "postgres")
        #: Seconds the last start took (initdb included for the first).
        self.startup_seconds = 0.0
        self._watchdog: subprocess.Popen[bytes] | None = None
        self._stopped = False

    def _run(self, *command: str, timeout: float = TIMEOUT) -> None:
        try:
            subprocess.run(
                [*_as_owner(), *command],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                check=True,
                timeout=timeout,
                # Its own session: a Ctrl-C meant for trial does not stop the cluster under the tests.
                start_new_session=True,
            )
        except subprocess.CalledProcessError as e:
            output = (e.stderr or e.stdout or b"").decode(errors="replace").strip().splitlines()
            raise ClusterError(f"{os.path.basename(command[0])} failed: {' / '.join(output[-3:])}; log: {self.log_tail()}") from None
        except subprocess.TimeoutExpired:
            raise ClusterError(f"{os.path.basename(command[0])} did not finish in {timeout} s; log: {self.log_tail()}") from None

    def log_tail(self) -> str:
        try:
            with open(self.log, errors="replace") as f:
                return " / ".join(f.read().strip().splitlines()[-3:]) or "(empty)"
        except OSError:
            return "(none)"

    def _initdb(self) -> None:
        # --no-sync: initdb's closing sync of a throwaway cluster buys nothing (the server's fsync stays on).
        self._run(
            os.path.join(self.bindir, "initdb"),
            "--pgdata", self.data, "--auth=trust", f"--username={SUPERUSER}", "--encoding=UTF8", "--locale=C",
            "--no-sync", "--no-instructions",
        )

    def _options(self) -> str:
        # pg_ctl hands --options to a shell.
        settings = (*SETTINGS, f"unix_socket_directories={self.directory}")
        return " ".join(f"-c {shlex.quote(setting)}" for setting in settings)

    def _start(self) -> None:
        options = self._options()
        began = time.monotonic()
        self._run(os.path.join(self.bindir, "pg_ctl"), "start", "--wait", f"--timeout={TIMEOUT}",
                  "--pgdata", self.data, "--log", self.log, "--options", options)
        self.startup_seconds = time.monotonic() - began

    def postmaster_pid(self) -> int | None:
        """The postmaster's PID from ``postmaster.pid`` (its first line), or None when it is not running."""
        try:
            with open(os.path.join(self.data, "postmaster.pid")) as f:
                return int(f.readline().strip())
        except (OSError, ValueError):
            return None

    def stop(self) -> None:
        """Stop the postmaster (``pg_ctl stop -m fast``, else SIGKILL by its PID) and remove the directory. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        if self in _clusters:
            _clusters.remove(self)
        try:
            _stop(self.bindir, self.data, _as_owner())
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)
            if self._watchdog is not None:
                # Its work is done: closing our end of its pipe makes it exit at once.
                self._watchdog.stdin.close()  # type: ignore[union-attr]
                self._watchdog.wait(TIMEOUT)
                self._watchdog = None

    def restart(self) -> None:
        """``pg_ctl restart -m fast``: every connection is broken; the data stays."""
        began = time.monotonic()
        options = self._options()
        self._run(os.path.join(self.bindir, "pg_ctl"), "restart", "--wait", f"--timeout={TIMEOUT}", "-m", "fast",
                  "--pgdata", self.data, "--log", self.log, "--options", options)
        self.startup_seconds = time.monotonic() - began

    def kill(self) -> None:
        """SIGKILL the postmaster (a crash): its children exit and the next :meth:`start_again` recovers."""
        pid = self.postmaster_pid()
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            _wait_gone(pid, self.data, reaped=True)

    def start_again(self) -> None:
        """Start the postmaster after :meth:`kill` (crash recovery) or a stop of the server alone."""
        self._start()


def database_url(directory: str, database: str) -> str:
    """The libpq URL of ``database`` through the socket in ``directory`` (URL-encoded as ``host``)."""
    return f"postgresql://{SUPERUSER}@/{database}?host={quote(directory, safe='')}"


def _postmaster_alive(pid: int, data: str) -> bool:
    """Whether ``pid`` is still the running postmaster of ``data`` (a zombie is not; a reused PID is not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            arguments = f.read().split(b"\0")
    except (OSError, IndexError):
        return False
    return state != "Z" and os.fsencode(data) in arguments


def _wait_gone(pid: int, data: str, timeout: float = TIMEOUT, *, reaped: bool = False) -> bool:
    """
    Whether the postmaster ``pid`` exited within ``timeout`` (polled: it is not our child).
    ``reaped``: wait until the PID is gone altogether, not only dead: a new postmaster
    refuses to start while the old PID in postmaster.pid answers ``kill -0`` (a zombie does).
    """
    deadline = time.monotonic() + timeout
    while _exists(pid) if reaped else _postmaster_alive(pid, data):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stop(bindir: str, data: str, prefix: Sequence[str]) -> None:
    """Stop the postmaster of ``data``, if it runs: fast shutdown, else SIGKILL by the PID in postmaster.pid."""
    try:
        with open(os.path.join(data, "postmaster.pid")) as f:
            pid = int(f.readline().strip())
    except (OSError, ValueError):
        return
    try:
        done = subprocess.run(
            [*prefix, os.path.join(bindir, "pg_ctl"), "stop", "--wait", f"--timeout={TIMEOUT}", "-m", "fast", "--pgdata", data],
            stdin=subprocess.DEVNULL, capture_output=True, timeout=TIMEOUT + 5, start_new_session=True,
        )
        if done.returncode == 0:
            return
    except (OSError, subprocess.TimeoutExpired):
        pass
    if _postmaster_alive(pid, data):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        _wait_gone(pid, data)


def _watchdog(directory: str, bindir: str, data: str, prefix: Sequence[str]) -> subprocess.Popen[bytes]:
    """
    A process that stops the cluster once the pipe on its stdin reaches end of file: when
    this process closes its end, or dies (SIGKILL included). In its own session, so that
    signals sent to the test run's process group reach it only through that pipe.
    """
    code = (
        "import sys, shutil\n"
        "from tests.pgcluster import _stop\n"
        "sys.stdin.buffer.read()\n"
        f"_stop({bindir!r}, {data!r}, {list(prefix)!r})\n"
        f"shutil.rmtree({directory!r}, ignore_errors=True)\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=root,
        start_new_session=True,
    )


def start() -> Cluster:
    """A new private cluster, running; it is stopped (and removed) when this process exits, if not before."""
    binaries = bindir()
    prefix = _as_owner()
    began = time.monotonic()
    directory = tempfile.mkdtemp(prefix="mmgun-pg-")
    if prefix:
        pw = pwd.getpwnam(SYSTEM_USER)
        os.chown(directory, pw.pw_uid, pw.pw_gid)
    cluster = Cluster(directory, binaries)
    cluster._watchdog = _watchdog(directory, binaries, cluster.data, prefix)
    atexit.register(cluster.stop)
    _stop_on_signals()
    try:
        cluster._initdb()
        cluster._start()
    except BaseException:
        cluster.stop()
        raise
    cluster.startup_seconds = time.monotonic() - began
    _clusters.append(cluster)
    return cluster


#: Every cluster this process started and has not stopped: what the signal handlers stop.
_clusters: list[Cluster] = []
_handled = False


def _stop_on_signals() -> None:
    """On SIGTERM or SIGHUP (when nothing else handles it), stop the clusters, then die of the signal as before."""
    global _handled
    if _handled:
        return
    _handled = True

    def handler(signum: int, frame: Any) -> None:
        for cluster in list(_clusters):
            cluster.stop()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    for signum in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) == signal.SIG_DFL:
            signal.signal(signum, handler)


_shared: str | None = None
_counter = itertools.count(1)


def shared_url() -> str:
    """The shared cluster's ``postgres`` database: ``MMGUN_TEST_POSTGRES``, else a cluster of this process started now."""
    global _shared
    if _shared is None:
        _shared = os.environ.get(ENVIRONMENT) or start().url
    return _shared


def psql(url: str, script: str, variables: dict[str, str] | None = None) -> str:
    """Run ``script`` (psql's stdin; ``:"name"`` quotes a variable as an identifier) on ``url``; its output."""
    command = [os.path.join(bindir(), "psql"), "--no-psqlrc", "--quiet", "--tuples-only", "--no-align",
               "--set=ON_ERROR_STOP=1", f"--dbname={url}"]
    for name, value in (variables or {}).items():
        command.append(f"--set={name}={value}")
    done = subprocess.run(command, input=script, capture_output=True, text=True, timeout=TIMEOUT)
    if done.returncode:
        raise ClusterError(f"psql failed: {done.stderr.strip()}")
    return done.stdout


def new_database(name: str = "test") -> str:
    """
    The URL of a new, empty database on the shared cluster, named after ``name``, this
    process and a counter (trial's workers share the cluster). Not dropped: the cluster goes at the end of the run.
    """
    base = _shared_base(shared_url())
    label = re.sub(r"[^a-z0-9_]", "_", name.lower())[:40]
    database = f"{label}_{os.getpid()}_{next(_counter)}"
    psql(base, 'CREATE DATABASE :"database";\n', {"database": database})
    return base.replace("/postgres?", f"/{database}?", 1)


def _shared_base(url: str) -> str:
    if "/postgres?" not in url:
        raise ClusterError(f"{ENVIRONMENT} must be the URL of a cluster's postgres database (…/postgres?host=…), not {url!r}")
    return url


def main(argv: Sequence[str]) -> int:
    """``python -m tests.pgcluster [--] command …``: run ``command`` with a private cluster in ``MMGUN_TEST_POSTGRES``."""
    command = list(argv[1:] if argv[:1] == ["--"] else argv)
    if not command:
        print("usage: python -m tests.pgcluster -- command [argument …]", file=sys.stderr)
        return 2
    try:
        cluster = start()
    except ClusterError as e:
        print(f"tests.pgcluster: {e}", file=sys.stderr)
        return 1
    print(f"tests.pgcluster: PostgreSQL started in {cluster.startup_seconds:.2f} s at {cluster.directory}", file=sys.stderr)
    environment = dict(os.environ, **{ENVIRONMENT: cluster.url})
    child = subprocess.Popen(command, env=environment)

    def forward(signum: int, frame: Any) -> None:
        child.send_signal(signum)

    # While the command runs, signals are its business: passed on, and we wait for it to end.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, forward)
    try:
        status = child.wait()
    finally:
        cluster.stop()
    return status if status >= 0 else 128 - status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
