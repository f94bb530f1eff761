#!/usr/bin/env python3
"""
mmgun's throughput benchmark: `make bench`, or `.venv/bin/python bench/bench.py [options]`.

Starts mmgun (one or more `twistd mmgun` processes on a fresh SQLite database in a temp
folder) relaying everything through ``--relay-host`` to a fast SMTP sink on 127.0.0.1
(bench/sink.py), drives it with a load generator in its own process (bench/loadgen.py),
and reports, as a table and as JSON in bench/out/<timestamp>.json:

  relay    N POSTs over C keep-alive connections: ingest rate and latency, end-to-end rate
           (first POST to the moment the sink holds every accepted recipient), CPU seconds
           per 1000 messages and peak RSS of every mmgun process, duplicates and losses.
  ingest   the same POSTs to the frontend(s) alone (no sender): the API's rate.
  --dkim none,rsa,rsa+ed25519
           relay and ingest with DKIM signing (issue 13): each run's fresh database gets a
           client, an API key and (rsa, rsa+ed25519) the sending domain of the load's sender
           (`mmgun domains add [--ed25519]`) before mmgun starts; the load authenticates with
           the key. none is the same without the domain (unsigned). The variants of a run
           index run back to back (interleaved), so a busier machine hits them alike.
  --webhook [off,on,no-role]
           relay with issue 14's webhooks: "on" gives the run's database (before mmgun
           starts) a webhook of the load's client (an API-key client, as --dkim none) for
           delivered, permanent_fail and temporary_fail, POSTing to bench/webhook_sink.py on
           127.0.0.1 (mmgun runs with --webhook-allow-private); the run also reports the POSTs
           received and the webhook lag (last delivery to last POST). The rate still ends at
           the last delivery. "off": the same client, no webhook (the webhooks role idles);
           "no-role": no webhooks role at all; "on-apart": "on" with the webhooks role in a
           process of its own beside the topology's. `--webhook` alone is "on"; several
           variants run interleaved, as --dkim's.
  --content text,rich
           relay and ingest with the ~1 KB text message (text, the default), and/or with
           issue 12's rich one (rich: that text as the alternative of a ~30 KB HTML part,
           and a ~100 KB attachment; --rich-messages of them per run).
  --backend sqlite,postgres
           relay and ingest on each backend (issue 15), interleaved run by run: "postgres"
           starts one private PostgreSQL cluster for the bench (tests/pgcluster.py: fsync and
           synchronous_commit on, a Unix socket, no TCP) and gives each run a fresh database on
           it; its server processes' CPU is reported as "postgres".
  --backend postgres-2hosts
           (alone; needs root) relay and ingest on two mmgun hosts sharing one PostgreSQL,
           each in a network namespace of its own (the namespace suite's harness,
           e2e-tests/netns/run.sh): see bench/netns.py, which runs it.
  backlog  envelopes already queued (written through mmgun's store) before the sender
           starts: drain rate, CPU and peak RSS, at each --backlog-sizes (1k and 100k).
  --compare-postfix
           the same message count through a private Postfix instance (smtp-source in, the
           same sink out), and the ratio of the end-to-end rates.
  smtp     SMTP submission (issue 16): --messages in smtp-source's shape (--smtp-sessions
           sessions, default 20, one message at a time on each, one recipient each) to mmgun's
           --smtp-listen with AUTH PLAIN (bench/smtpload.py: smtp-source cannot AUTH), for each
           --topology; and to a private Postfix's smtpd twice, by smtp-source itself and by
           smtpload.py without AUTH; run by run, interleaved. Ingest and end-to-end rates.
  handoff  hand-off latency (issue 17): a light load (--handoff-rate, default 10 POSTs a
           second; --handoff-messages, default 300, one recipient each; bench/handoff.py) and,
           for each message, the time from /send's 200 to the sink's 250 for it: p50, p90,
           p99 and max per --topology (target p50 < 20 ms, p99 < 100 ms).

Each figure is the median of --runs runs. Everything listens on 127.0.0.1 only; every
loop is bounded in count and in time. See docs/performance.md for the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CLIENT_ID = "demo-client-0123456789abcdef"
TOPOLOGIES = ("all", "split", "two-senders", "two-frontends")
MODES = ("relay", "ingest", "backlog", "smtp", "handoff")
CONTENTS = ("text", "rich")
#: --dkim variants: the keys `mmgun domains add` makes (RSA 2048 always; Ed25519 alongside with --ed25519).
DKIM_VARIANTS = ("none", "rsa", "rsa+ed25519")
#: The client that owns the signing domain in a --dkim run (clients-file ids cannot own domains).
DKIM_CLIENT = "bench"
DKIM_SENDER = "bench@sender.bench.test"
#: --backend variants: the embedded default, and a private PostgreSQL cluster (issue 15).
BACKENDS = ("sqlite", "postgres")
#: --backend postgres-2hosts: two hosts in network namespaces, run alone by bench/netns.py (needs root).
NETNS_BACKEND = "postgres-2hosts"
#: --webhook variants: a webhook subscribed to every event, none (the role idles), no webhooks role.
WEBHOOK_VARIANTS = ("off", "on", "no-role", "on-apart")
#: What the bench's webhook subscribes to: every event a relay run can make after acceptance.
WEBHOOK_EVENTS = "delivered,permanent_fail,temporary_fail"
#: Options that throttle a client; set to "off" when this mmgun has them (they guard
#: production from abuse and would measure the limiter instead of the relay).
LIMITS_OFF = {"rate-limit": "0", "max-queued": "0"}


def _in_project_venv() -> None:
    """
    Run under the project's venv, installed and up to date: `make bench` sees to that
    before starting us; when started by hand, `make .venv/.installed` does it here (a
    no-op when nothing changed), then the script re-runs under the venv's Python.
    """
    venv = REPO / ".venv" / "bin" / "python"
    if not os.environ.get("MAKELEVEL") and not os.environ.get("MMGUN_BENCH_NO_MAKE"):
        os.environ["MMGUN_BENCH_NO_MAKE"] = "1"
        if subprocess.run(["make", "-s", "-C", str(REPO), ".venv/.installed"], check=False).returncode != 0:
            sys.exit("bench: `make .venv/.installed` failed")
    # (The venv's python is a symlink to the base interpreter: compare prefixes, not paths.)
    if venv.exists() and Path(sys.prefix).resolve() != (REPO / ".venv").resolve():
        os.execv(str(venv), [str(venv), __file__, *sys.argv[1:]])
    try:
        import twisted  # noqa: F401
    except ImportError:
        sys.exit("bench: mmgun's venv is missing: run `make bench` (it installs .venv first)")


_in_project_venv()

sys.path.insert(0, str(HERE))

import postfix  # noqa: E402
import procs  # noqa: E402
import pyspy  # noqa: E402

PYTHON = sys.executable
TWISTD = str(Path(sys.executable).parent / "twistd")
MMGUN = str(Path(sys.executable).parent / "mmgun")


# -- the sink and the daemons ------------------------------------------------------------


class Sink:
    """bench/sink.py (or another ``script`` of its protocol) in its own process, driven over its stdin/stdout."""

    def __init__(self, folder: Path, script: str = "sink.py") -> None:
        self._err = open(folder / f"{Path(script).stem}.err", "w")
        self.process = subprocess.Popen(
            [PYTHON, str(HERE / script)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._err,
            text=True,
            bufsize=1,
        )
        self.port = int(self._answer()["port"])

    def _answer(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the sink exited (status {self.process.poll()}); see {self._err.name}")
        return json.loads(line)

    def command(self, text: str) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(text + "\n")
        self.process.stdin.flush()
        return self._answer()

    def stats(self) -> dict[str, Any]:
        return self.command("stats")

    def dump(self, path: Path) -> int:
        return int(self.command(f"dump {path}")["dumped"])

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                assert self.process.stdin is not None
                self.process.stdin.write("quit\n")
                self.process.stdin.close()
                self.process.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                procs.stop_process(self.process, 5)
        self._err.close()


@dataclass
class Daemon:
    """One `twistd mmgun` process."""

    name: str
    roles: tuple[str, ...]
    process: subprocess.Popen[bytes]
    log: Path
    port: int | None = None
    #: Listening with SO_REUSEPORT on a port other frontends share.
    shared_port: bool = False

    @property
    def pid(self) -> int:
        return self.process.pid


def mmgun_options() -> set[str]:
    """The option names `twistd mmgun --help` lists (this mmgun's, not the README's)."""
    result = subprocess.run([TWISTD, "mmgun", "--help"], capture_output=True, text=True, timeout=60, cwd=REPO)
    names = set()
    for line in result.stdout.splitlines():
        stripped = line.strip()
        if stripped.startswith("--"):
            names.add(stripped[2:].split("=", 1)[0].split()[0])
    if "relay-host" not in names:
        raise SystemExit(f"bench: `twistd mmgun --help` does not list --relay-host:\n{result.stdout}{result.stderr}")
    return names


@dataclass
class Setup:
    """What every run shares: the folder, this mmgun's options, the command-line choices."""

    folder: Path
    options: set[str]
    args: argparse.Namespace
    extra: list[str] = field(default_factory=list)
    #: The private PostgreSQL cluster of a --backend postgres bench (tests.pgcluster.Cluster), started once.
    postgres: Any = None

    def limit_flags(self) -> list[str]:
        flags = []
        for name, value in LIMITS_OFF.items():
            if name in self.options:
                flags.append(f"--{name}={value}")
        return flags

    def postgres_database(self, name: str) -> str:
        """The URL of a new, empty database on the bench's cluster (started at the first call)."""
        if self.postgres is None:
            sys.path.insert(0, str(REPO))
            from tests import pgcluster

            self.postgres = pgcluster.start()
            print(f"PostgreSQL: a private cluster started in {self.postgres.startup_seconds:.1f} s", flush=True)
        database = "bench_" + "".join(c if c.isalnum() else "_" for c in name.lower())
        self._psql(self.postgres.url, 'CREATE DATABASE :"database";', {"database": database})
        return str(self.postgres.url).replace("/postgres?", f"/{database}?", 1)

    def drop_postgres_database(self, name: str) -> None:
        database = "bench_" + "".join(c if c.isalnum() else "_" for c in name.lower())
        self._psql(self.postgres.url, 'DROP DATABASE IF EXISTS :"database";', {"database": database})

    def postgres_tree(self) -> dict[str, int]:
        pid = self.postgres.postmaster_pid() if self.postgres is not None else None
        return {"postgres": pid} if pid is not None else {}

    def query(self, database: Path | str, sql: str) -> list[tuple[str, ...]]:
        """Rows of ``sql`` on a run's database (SQLite file or PostgreSQL URL), as text."""
        if isinstance(database, Path):
            import sqlite3

            with sqlite3.connect(database) as conn:
                return [tuple(str(v) for v in row) for row in conn.execute(sql)]
        out = self._psql(database, sql + ";")
        return [tuple(line.split("|")) for line in out.splitlines() if line]

    def _psql(self, url: str, script: str, variables: dict[str, str] | None = None) -> str:
        from tests import pgcluster

        return str(pgcluster.psql(url, script, variables))


def topology_processes(topology: str) -> list[tuple[str, tuple[str, ...]]]:
    """(name, roles) of each process; an empty roles tuple means mmgun's default (all three)."""
    if topology == "all":
        return [("all", ())]
    if topology == "frontend":  # --mode ingest: the API alone
        return [("frontend", ("frontend",))]
    if topology == "two-frontends":
        # Two frontends on one port (--listen reuseport:…), the kernel spreading the connections.
        return [("frontend-1", ("frontend", "cleaner")), ("frontend-2", ("frontend",)), ("sender", ("sender",))]
    senders = 1 if topology == "split" else 2
    processes: list[tuple[str, tuple[str, ...]]] = [("frontend", ("frontend", "cleaner"))]
    processes += [(f"sender-{i + 1}" if senders > 1 else "sender", ("sender",)) for i in range(senders)]
    return processes


def ingest_processes(topology: str) -> list[tuple[str, tuple[str, ...]]]:
    """A topology's frontends alone (no sender, no cleaner), for --mode ingest."""
    return [(name, ("frontend",)) for name, roles in topology_processes(topology) if "frontend" in roles]


def start_daemon(
    setup: Setup,
    run: Path,
    name: str,
    roles: tuple[str, ...],
    database: Path | str,
    sink_port: int,
    shared_port: int | None = None,
    extra: tuple[str, ...] = (),
) -> Daemon:
    """One mmgun process; frontends given a ``shared_port`` listen on it with SO_REUSEPORT; ``extra``: more options."""
    port = (shared_port or procs.free_port()) if (not roles or "frontend" in roles) else None
    command = [
        TWISTD,
        "-n",
        "--pidfile=",
        "mmgun",
        f"--database={database}",
        f"--clients={run / 'clients'}",
        f"--relay-host=127.0.0.1:{sink_port}",
        "--helo=mmgun.bench.test",
        *[f"--role={role}" for role in roles],
        # A topology naming roles is today's split: one process each. "all" (no role options) is the
        # default command, with its frontend workers (--workers auto, issue 17).
        *(["--workers=1"] if roles and "workers" in setup.options else []),
        *setup.limit_flags(),
        *setup.extra,
        *extra,
    ]
    if port is not None:
        command.append(f"--listen={'reuseport' if shared_port else 'tcp'}:{port}:interface=127.0.0.1")
    log = run / f"mmgun-{name}.log"
    with open(os.devnull if setup.args.discard_logs else log, "wb") as out:
        process = subprocess.Popen(command, cwd=run, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if setup.args.discard_logs:
        log.write_text("(discarded: --discard-logs)\n")
    (run / f"mmgun-{name}.cmd").write_text(" ".join(command) + "\n")
    return Daemon(name, roles, process, log, port, port is not None and shared_port is not None)


def wait_ready(daemon: Daemon, timeout: float = 60.0) -> None:
    """The frontend answers /healthz; any other role has logged the reactor's start."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon.process.poll() is not None:
            raise RuntimeError(f"mmgun {daemon.name} exited with {daemon.process.returncode}: {tail(daemon.log)}")
        text = daemon.log.read_bytes()
        if daemon.shared_port and b"FrontendSite starting on" not in text and not text.startswith(b"(discarded"):
            pass  # /healthz may be answered by another frontend on the port: wait for this one's listener
        elif daemon.port is not None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{daemon.port}/healthz", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
        else:
            if b"reactor class" in text:
                time.sleep(0.2)
                return
            if text.startswith(b"(discarded"):
                # No log to watch: give the process the time it usually needs to start.
                time.sleep(2.0)
                return
        time.sleep(0.1)
    raise RuntimeError(f"mmgun {daemon.name} not ready within {timeout:g} s: {tail(daemon.log)}")


def tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


LOG_PROBLEMS = ("#error]", "#critical]", "#warn]", "Traceback", "Unhandled")


def scan_log(path: Path) -> dict[str, Any]:
    """Counts of warning/error lines in a daemon's log, with a few samples."""
    counts: dict[str, int] = {}
    samples: list[str] = []
    with open(path, errors="replace") as f:
        for line in f:
            for marker in LOG_PROBLEMS:
                if marker in line:
                    counts[marker] = counts.get(marker, 0) + 1
                    if len(samples) < 8:
                        samples.append(line.rstrip()[:300])
                    break
    return {"problems": counts, "samples": samples}


def stop_daemons(daemons: list[Daemon]) -> dict[str, Any]:
    """Senders first (they release leases), then the rest; exit status and log findings of each."""
    report = {}
    for daemon in sorted(daemons, key=lambda d: 0 if "sender" in d.name else 1):
        status = procs.stop_process(daemon.process)
        report[daemon.name] = {"exit_status": status, **scan_log(daemon.log)}
    return report


# -- measuring ------------------------------------------------------------------------------


def helper_pids(daemons: list[Daemon]) -> dict[str, int]:
    """
    The live child processes of the daemons (a frontend's DKIM signing process, the
    supervised webhooks process), by "<daemon>-signer" and "<daemon>-webhooks" (then
    -signer2, …): watched like the daemons, as /proc/PID/stat's cutime/cstime count a
    child only once it has been reaped.
    """
    found: dict[str, int] = {}
    for daemon in daemons:
        counts: dict[str, int] = {}
        for pid in procs.descendants(daemon.pid):
            # The webhooks role beside others is a supervised `twistd mmgun --role=webhooks` child (issue 14);
            # the default command's frontend workers are `--role=frontend` children (issue 17, --workers).
            cmdline = procs.cmdline(pid)
            kind = "webhooks" if b"--role=webhooks" in cmdline else "worker" if b"--role=frontend" in cmdline else "signer"
            counts[kind] = counts.get(kind, 0) + 1
            found[f"{daemon.name}-{kind}{counts[kind] if counts[kind] > 1 else ''}"] = pid
    return found


class Snapshot:
    """CPU of the watched processes and of the whole machine at one moment."""

    def __init__(self, pids: dict[str, int], tree: dict[str, int] | None = None) -> None:
        self.time = time.monotonic()
        self.cpu = {name: procs.cpu_seconds(pid) or 0.0 for name, pid in pids.items()}
        #: Seconds each watched process waited for a CPU (runnable, not running): contention.
        self.waited = {name: procs.run_queue_wait(pid) or 0.0 for name, pid in pids.items()}
        for name, pid in (tree or {}).items():
            self.cpu[name] = procs.tree_cpu_seconds(pid)
        self.machine_busy, _ = procs.system_cpu()

    def since(self, earlier: Snapshot) -> dict[str, float]:
        return {name: round(self.cpu[name] - earlier.cpu.get(name, 0.0), 3) for name in self.cpu}

    def waited_since(self, earlier: Snapshot) -> dict[str, float]:
        """Seconds each process (by name) waited for a CPU since ``earlier``."""
        return {name: round(self.waited[name] - earlier.waited.get(name, 0.0), 3) for name in self.waited}


def wait_delivered(
    sink: Sink, expected: int, stall: float, limit: float, on_first: Callable[[], None] | None = None
) -> dict[str, Any]:
    """Poll the sink until it holds ``expected`` recipients, it stalls ``stall`` s, or ``limit`` s pass."""
    deadline = time.monotonic() + limit
    last_count, last_progress = -1, time.monotonic()
    stats = sink.stats()
    first_seen = False
    while True:
        stats = sink.stats()
        if stats["messages"] and not first_seen:
            first_seen = True
            if on_first is not None:
                on_first()
        if stats["recipients"] >= expected:
            stats["outcome"] = "complete"
            return stats
        now = time.monotonic()
        if stats["recipients"] != last_count:
            last_count, last_progress = stats["recipients"], now
        elif now - last_progress > stall:
            stats["outcome"] = f"stalled for {stall:g} s"
            return stats
        if now > deadline:
            stats["outcome"] = f"time limit of {limit:g} s"
            return stats
        time.sleep(0.05 if not first_seen else 0.1)


def analyse(dump: Path, expected: set[str] | None, check_submissions: bool = True) -> dict[str, Any]:
    """
    Duplicates (a Message-ID + recipient pair seen twice), losses (an expected recipient
    never seen), strays (seen but never accepted), messages whose recipients come from
    several submissions (``mixed``), and when the last expected recipient arrived.
    """
    seen: set[tuple[str, str]] = set()
    first: dict[str, float] = {}
    submissions_of: dict[str, set[str]] = {}
    times: list[float] = []
    duplicates = 0
    with open(dump, errors="replace") as f:
        for line in f:
            stamp, message_id, recipients = line.rstrip("\n").split("\t")
            t = float(stamp)
            times.append(t)
            for rcpt in recipients.split(","):
                key = (message_id, rcpt)
                if key in seen:
                    duplicates += 1
                else:
                    seen.add(key)
                first.setdefault(rcpt, t)
                if check_submissions:
                    submissions_of.setdefault(message_id, set()).add(rcpt.partition("x")[0])
    delivered = set(first)
    lost = sorted(expected - delivered) if expected is not None else []
    strays = sorted(delivered - expected) if expected is not None else []
    wanted = [first[r] for r in (expected if expected is not None else delivered) if r in first]
    return {
        "messages": len(times),
        "recipients_delivered": len(delivered),
        "duplicates": duplicates,
        "lost": len(lost),
        "lost_sample": lost[:5],
        "strays": len(strays),
        "strays_sample": strays[:5],
        "message_ids": len(submissions_of) if check_submissions else None,
        "mixed": sum(1 for s in submissions_of.values() if len(s) > 1),
        "first_arrival": min(times) if times else None,
        "complete_at": max(wanted) if wanted else None,
        "times": sorted(times),
    }


def _delivery_fields(delivery: dict, found: dict, logs: Any, profile: Any) -> dict:
    """What every run's result says about the sink's view: delivery counts, losses, duplicates, logs."""
    return {
        "delivery": {k: delivery[k] for k in ("outcome", "messages", "recipients", "duplicates", "connections", "errors")},
        "duplicates": found["duplicates"],
        "lost": found["lost"],
        "lost_sample": found["lost_sample"],
        "strays": found["strays"],
        "mixed": found["mixed"],
        "daemons": logs,
        "profile": profile,
    }


def window_rate(times: list[float], start: int, stop: int) -> float | None:
    """Messages per second between the start-th and stop-th arrival."""
    stop = min(stop, len(times))
    if stop - start < 2 or times[stop - 1] <= times[start]:
        return None
    return (stop - 1 - start) / (times[stop - 1] - times[start])


def mib(kib: int | None) -> float | None:
    return None if kib is None else round(kib / 1024, 1)


class Profiles:
    """py-spy recorders for the daemons of one run, when --profile is on."""

    def __init__(self, setup: Setup, run: Path, daemons: list[Daemon], children: dict[str, int] | None = None) -> None:
        self._recorders: dict[str, pyspy.Recorder] = {}
        py_spy = pyspy.find_py_spy(setup.args.py_spy) if setup.args.profile else None
        if setup.args.profile and py_spy is None:
            print(
                "bench: --profile needs py-spy (pip install py-spy, or --py-spy PATH); not profiling", file=sys.stderr
            )
        if py_spy is not None:
            for daemon in daemons:
                self._recorders[daemon.name] = pyspy.Recorder(py_spy, daemon.pid, run / f"profile-{daemon.name}.txt")
            # The daemons' Python children (the default command's frontend workers, issue 17; signers, webhooks).
            for name, pid in (children or {}).items():
                self._recorders[name] = pyspy.Recorder(py_spy, pid, run / f"profile-{name}.txt")

    def stop(self) -> dict[str, Any]:
        summaries = {}
        for name, recorder in self._recorders.items():
            output = recorder.stop()
            if output is not None:
                summaries[name] = {"raw": str(output), **pyspy.summarize(output)}
        return summaries


# -- the relay run ------------------------------------------------------------------------------


def mmgun_admin(run: Path, database: Path | str, *words: str) -> str:
    """Run `mmgun WORDS --database=DATABASE` (an admin command) in ``run``; its output."""
    command = [MMGUN, *words, f"--database={database}"]
    result = subprocess.run(command, cwd=run, capture_output=True, text=True, timeout=60, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])} failed ({result.returncode}): {result.stderr.strip()[-300:]}")
    return result.stdout


def prepare_webhook(run: Path, database: Path | str, port: int) -> None:
    """The --dkim client's webhook for every relay event, to the webhook sink on ``port`` (issue 14)."""
    mmgun_admin(
        run,
        database,
        "webhooks",
        "add",
        f"--client={DKIM_CLIENT}",
        f"--url=http://127.0.0.1:{port}/hooks/mail",
        f"--events={WEBHOOK_EVENTS}",
    )


def webhook_processes(processes: list[tuple[str, tuple[str, ...]]], webhook: str | None) -> list[tuple[str, tuple[str, ...]]]:
    """
    A topology's processes for a --webhook variant: "no-role" takes the webhooks role
    from a one-process topology (whose empty roles mean all four); "on" and "off" give it
    to the first process of the others (which list their roles without it); "on-apart"
    takes it from every process and adds a "webhooks" process with that role alone.
    """
    if webhook is None:
        return processes
    result = []
    for n, (name, roles) in enumerate(processes):
        if webhook in ("no-role", "on-apart") and not roles:
            roles = ("frontend", "sender", "cleaner")
        elif webhook in ("on", "off") and roles and n == 0 and "webhooks" not in roles:
            roles = (*roles, "webhooks")
        result.append((name, roles))
    if webhook == "on-apart":
        result.append(("webhooks", ("webhooks",)))
    return result


def wait_posts(sink: Sink, expected: int, stall: float, limit: float) -> dict[str, Any]:
    """Poll the webhook sink until it has ``expected`` POSTs, it stalls ``stall`` s, or ``limit`` s pass."""
    deadline = time.monotonic() + limit
    last_count, last_progress = -1, time.monotonic()
    while True:
        stats = sink.stats()
        if stats["posts"] >= expected:
            stats["outcome"] = "complete"
            return stats
        now = time.monotonic()
        if stats["posts"] != last_count:
            last_count, last_progress = stats["posts"], now
        elif now - last_progress > stall:
            stats["outcome"] = f"stalled for {stall:g} s"
            return stats
        if now > deadline:
            stats["outcome"] = f"time limit of {limit:g} s"
            return stats
        time.sleep(0.05)


def prepare_dkim(run: Path, database: Path | str, dkim: str) -> str:
    """
    A client, an API key and (unless ``dkim`` is none) the sender's domain with its keys,
    made with `mmgun` in the run's database (which the first command creates) before the
    daemons start. Returns the key (a throwaway: the database goes with the run).
    """

    def admin(*words: str) -> str:
        return mmgun_admin(run, database, *words)

    admin("clients", "add", DKIM_CLIENT)
    key = next(
        (line.split()[1] for line in admin("keys", "create", DKIM_CLIENT).splitlines() if line.startswith("key:")),
        None,
    )
    if key is None:
        raise RuntimeError("`mmgun keys create` printed no key")
    if dkim != "none":
        domain = DKIM_SENDER.rpartition("@")[2]
        flags = ["--ed25519"] if dkim == "rsa+ed25519" else []
        admin("domains", "add", domain, f"--client={DKIM_CLIENT}", *flags)
    return key


def signed_in_database(setup: Setup, database: Path | str) -> dict[str, int]:
    """How many stored messages carry an rsa-sha256 and an ed25519-sha256 signature (a --dkim run's check)."""
    counts = {}
    for algorithm in ("rsa-sha256", "ed25519-sha256"):
        if isinstance(database, Path):
            query = f"SELECT count(*) FROM submissions WHERE instr(message, CAST('a={algorithm};' AS BLOB)) > 0"
        else:
            query = f"SELECT count(*) FROM submissions WHERE position('a={algorithm};'::bytea in message) > 0"
        ((count,),) = setup.query(database, query)
        counts[algorithm] = int(count)
    return counts


def database_mib(setup: Setup, database: Path | str) -> float | None:
    """The size of a run's database: its SQLite files, or PostgreSQL's pg_database_size."""
    if isinstance(database, Path):
        return mib(sum(f.stat().st_size for f in database.parent.glob(database.name + "*")) // 1024)
    ((size,),) = setup.query(database, "SELECT pg_database_size(current_database())")
    return mib(int(size) // 1024)


def start_loadgen(args: argparse.Namespace, result: Path, *options: str, prefix: Sequence[str] = ()) -> subprocess.Popen[str]:
    """
    bench/loadgen.py with ``options`` (its target, count, content, credentials) and the run's
    concurrency, body size and deadline, started and waiting: it has said "ready" and sends
    its load when it reads "go". ``prefix``: a command it runs under (ip netns exec …).
    """
    loadgen = subprocess.Popen(
        [
            *prefix,
            PYTHON,
            str(HERE / "loadgen.py"),
            *options,
            f"--concurrency={args.concurrency}",
            f"--body-size={args.body_size}",
            f"--deadline={args.time_limit}",
            f"--result={result}",
            "--ready",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert loadgen.stdin is not None and loadgen.stdout is not None
    if loadgen.stdout.readline().strip() != "ready":
        loadgen.kill()
        raise RuntimeError("the load generator did not start")
    return loadgen


def go(loadgen: subprocess.Popen[str]) -> None:
    """Start the load of a load generator :func:`start_loadgen` made ready."""
    assert loadgen.stdin is not None
    loadgen.stdin.write("go\n")
    loadgen.stdin.flush()


def relay_run(
    setup: Setup,
    topology: str,
    index: int,
    recipients: str,
    label: str = "relay",
    content: str = "text",
    dkim: str | None = None,
    webhook: str | None = None,
    backend: str = "sqlite",
) -> dict[str, Any]:
    """
    POST --messages messages (--rich-messages of the rich ``content``) and wait until the
    sink holds every accepted recipient. With label "ingest" only a frontend runs (no
    sender): the ingest path alone, checked against the database instead of the sink.
    With ``dkim`` (a --dkim variant) the load authenticates with an API key whose client
    owns (unless none) the sender's domain: see :func:`prepare_dkim`. With ``webhook`` (a
    --webhook variant) the client is made as for --dkim none if need be, and "on" gives it
    a webhook to a bench/webhook_sink.py, whose POSTs are awaited after the last delivery.
    """
    args = setup.args
    deliver = label != "ingest"
    messages = args.rich_messages if content == "rich" else args.messages
    run = Path(tempfile.mkdtemp(prefix=f"{label}-{content}-{topology}-{index}-", dir=setup.folder))
    (run / "clients").write_text(CLIENT_ID + "\n")
    database: Path | str = run / "mmgun.sqlite3" if backend == "sqlite" else setup.postgres_database(run.name)
    if webhook is not None and dkim is None:
        dkim = "none"  # the webhook's client must be a stored one, whose API key the load uses
    api_key = prepare_dkim(run, database, dkim) if dkim is not None else None
    sink = Sink(run)
    hooks = Sink(run, "webhook_sink.py") if webhook in ("on", "on-apart") else None
    daemons: list[Daemon] = []
    loadgen = None
    try:
        if hooks is not None:
            prepare_webhook(run, database, int(hooks.port))
        processes = topology_processes(topology) if deliver else ingest_processes(topology)
        processes = webhook_processes(processes, webhook if deliver else None)
        extra = ("--webhook-allow-private",) if webhook is not None else ()
        frontends = [name for name, roles in processes if not roles or "frontend" in roles]
        shared_port = procs.free_port() if len(frontends) > 1 else None
        for name, roles in processes:
            daemons.append(start_daemon(setup, run, name, roles, database, sink.port, shared_port, extra))
            # The first process creates the schema; the others start once it answers.
            wait_ready(daemons[-1])
        frontend = next(d for d in daemons if d.port is not None)
        background = procs.wait_quiet(args.wait_quiet) if args.wait_quiet else None
        result_file = run / "loadgen.json"
        loadgen = start_loadgen(
            args,
            result_file,
            f"--port={frontend.port}",
            f"--messages={messages}",
            f"--recipients={recipients}",
            f"--content={content}",
            *([f"--api-key={api_key}", f"--sender={DKIM_SENDER}"] if api_key else [f"--client-id={CLIENT_ID}"]),
        )
        # A frontend's DKIM signing process (mmgun.signer) and the webhooks process of a daemon with other
        # roles are its children: their CPU is counted as "<name>-signer" and "<name>-webhooks".
        helpers = helper_pids(daemons)
        pids = {d.name: d.pid for d in daemons} | helpers | {"sink": sink.process.pid, "loadgen": loadgen.pid}
        if hooks is not None:
            pids["webhook-sink"] = hooks.process.pid
        # PostgreSQL's server: the postmaster and its backends (one per connection), children and all.
        server = setup.postgres_tree() if backend == "postgres" else {}
        profiles = Profiles(setup, run, daemons, helpers)
        before = Snapshot(pids, server)
        go(loadgen)
        try:
            loadgen.wait(args.time_limit + 120)
        except subprocess.TimeoutExpired:
            loadgen.kill()
            raise RuntimeError("the load generator overran its time limit") from None
        after_ingest = Snapshot({d.name: d.pid for d in daemons} | helpers, server)
        if loadgen.returncode != 0:
            raise RuntimeError(f"the load generator failed with status {loadgen.returncode}")
        ingest = json.loads(result_file.read_text())
        expected = {rcpt for _, rcpts in ingest.pop("recipients") for rcpt in rcpts}
        if deliver:
            delivery = wait_delivered(sink, len(expected), args.stall, args.time_limit)
        else:
            delivery = {"outcome": "not delivered (ingest only)", **sink.stats()}
        # The webhook's POSTs (one delivered event per recipient) come after the deliveries:
        # the CPU figures include them; the rate does not wait for them.
        posted = wait_posts(hooks, len(expected), args.stall, args.time_limit) if hooks is not None else None
        after = Snapshot(
            {d.name: d.pid for d in daemons}
            | helpers
            | {"sink": sink.process.pid}
            | ({"webhook-sink": hooks.process.pid} if hooks is not None else {}),
            server,
        )
        # The load generator exited before the drain ended: it reported its own total.
        after.cpu["loadgen"] = ingest.get("cpu_seconds", before.cpu.get("loadgen", 0.0))
        peak = {d.name: mib(procs.status_kib(d.pid, "VmHWM")) for d in daemons} | {
            name: mib(procs.status_kib(pid, "VmHWM")) for name, pid in helpers.items()
        }
        profile = profiles.stop()
        logs = stop_daemons(daemons)
        dump = run / "sink.tsv"
        sink.dump(dump)
        found = analyse(dump, expected if deliver else set())
        if not deliver:
            found.update(queued_in_database(setup, database, expected))
        signed = signed_in_database(setup, database) if dkim is not None and not deliver else None
        times = found.pop("times")
        accepted = ingest["accepted"]
        end = found["complete_at"] if found["lost"] == 0 else delivery.get("last")
        e2e_seconds = end - ingest["first_send"] if end and ingest["first_send"] else None
        cpu = after.since(before)
        machine_busy = after.machine_busy - before.machine_busy
        ours = sum(cpu.values())
        webhook_lag = (
            posted["last"] - found["complete_at"]
            if posted is not None and posted.get("last") is not None and found["complete_at"] is not None
            else None
        )
        return {
            "label": label,
            "content": content,
            "dkim": dkim,
            "webhook": webhook,
            "webhook_posts": posted["posts"] if posted is not None else None,
            "webhook_outcome": posted["outcome"] if posted is not None else None,
            "webhook_connections": posted["connections"] if posted is not None else None,
            "webhook_keepalive_reuses": posted["keepalive_reuses"] if posted is not None else None,
            "webhook_lag_s": round(webhook_lag, 3) if webhook_lag is not None else None,
            "webhook_first_post_after_first_delivery_s": round(posted["first"] - found["first_arrival"], 3)
            if posted is not None and posted.get("first") is not None and found["first_arrival"] is not None
            else None,
            "signed": signed,
            "topology": topology,
            "run": index,
            "folder": str(run),
            "messages": messages,
            "backend": backend,
            "database_mib": database_mib(setup, database),
            "concurrency": args.concurrency,
            "recipients_per_message": recipients,
            "accepted": accepted,
            "accepted_recipients": len(expected),
            "envelopes_delivered": found["messages"],
            "http_errors": ingest["errors"],
            "ingest_rate": round(ingest["rate"], 1) if ingest["rate"] else None,
            "latency_ms": {k: round(v * 1000, 2) if v is not None else None for k, v in ingest["latency"].items()},
            "e2e_seconds": round(e2e_seconds, 3) if e2e_seconds else None,
            "e2e_rate": round(accepted / e2e_seconds, 1) if e2e_seconds else None,
            "e2e_recipient_rate": round(len(expected) / e2e_seconds, 1) if e2e_seconds else None,
            "drain_after_ingest_s": round(end - ingest["last_answer"], 3) if end and ingest["last_answer"] else None,
            "sink_rate_window": round(window_rate(times, 0, len(times)) or 0, 1),
            "cpu_seconds": cpu,
            "cpu_during_ingest": after_ingest.since(before),
            "cpu_wait_during_ingest": after_ingest.waited_since(before),
            "cpu_per_1000": {name: round(seconds / accepted * 1000, 3) for name, seconds in cpu.items()}
            if accepted
            else {},
            "peak_rss_mib": peak,
            "machine_busy_cores": round(machine_busy / (after.time - before.time), 2),
            "other_cpu_seconds": round(machine_busy - ours, 2),
            "background_before": background,
            **_delivery_fields(delivery, found, logs, profile),
            "message_ids": found["message_ids"],
        }
    finally:
        if loadgen is not None and loadgen.poll() is None:
            loadgen.kill()
        for daemon in daemons:
            if daemon.process.poll() is None:
                procs.stop_process(daemon.process)
        sink.stop()
        if hooks is not None:
            hooks.stop()
        if not args.keep:
            # A rich run's database is ~170 KB a message: free the disk now, not at the end.
            for path in run.glob("mmgun.sqlite3*"):
                # mmgun.sqlite3.wake is a directory: the senders' wake-up sockets (mmgun.wakeup).
                shutil.rmtree(path) if path.is_dir() else path.unlink()
            if backend == "postgres":
                setup.drop_postgres_database(run.name)


def latency_distribution(values: list[float]) -> dict[str, float | int | None]:
    """count, p50, p90, p99 and max of ``values`` (seconds), in milliseconds."""
    ordered = sorted(values)

    def at(q: float) -> float | None:
        if not ordered:
            return None
        return round(1000 * ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))], 1)

    return {"count": len(ordered), "p50_ms": at(50), "p90_ms": at(90), "p99_ms": at(99), "max_ms": at(100)}


def handoff_run(setup: Setup, topology: str, index: int) -> dict[str, Any]:
    """
    Issue 17's hand-off latency: a light load (--handoff-rate a second, one recipient each)
    and, for every message, the time from /send's 200 (bench/handoff.py) to the sink's
    acceptance of it (its 250 to the final "."), both on the system's monotonic clock.
    """
    args = setup.args
    run = Path(tempfile.mkdtemp(prefix=f"handoff-{topology}-{index}-", dir=setup.folder))
    (run / "clients").write_text(CLIENT_ID + "\n")
    database = run / "mmgun.sqlite3"
    sink = Sink(run)
    daemons: list[Daemon] = []
    try:
        processes = topology_processes(topology)
        frontends = [name for name, roles in processes if not roles or "frontend" in roles]
        shared_port = procs.free_port() if len(frontends) > 1 else None
        for name, roles in processes:
            daemons.append(start_daemon(setup, run, name, roles, database, sink.port, shared_port))
            wait_ready(daemons[-1])
        frontend = next(d for d in daemons if d.port is not None)
        result_file = run / "handoff.json"
        subprocess.run(
            [
                PYTHON,
                str(HERE / "handoff.py"),
                f"--port={frontend.port}",
                f"--messages={args.handoff_messages}",
                f"--rate={args.handoff_rate}",
                f"--client-id={CLIENT_ID}",
                f"--result={result_file}",
            ],
            check=True,
            timeout=args.handoff_messages / args.handoff_rate + 120,
        )
        load = json.loads(result_file.read_text())
        answered: dict[str, float] = load["answered"]
        delivery = wait_delivered(sink, len(answered), args.stall, args.time_limit)
        dump = run / "sink.tsv"
        sink.dump(dump)
        arrived: dict[str, float] = {}
        duplicates = 0
        for line in dump.read_text().splitlines():
            at, _, rcpts = line.split("\t")
            for rcpt in rcpts.split(","):
                if rcpt in arrived:
                    duplicates += 1
                else:
                    arrived[rcpt] = float(at)
        latencies = [arrived[r] - t for r, t in answered.items() if r in arrived]
        daemon_report = stop_daemons(daemons)
        daemons = []
        return {
            "label": "handoff",
            "topology": topology,
            "run": index,
            "rate": args.handoff_rate,
            "errors": load["errors"],
            "lost": sum(1 for r in answered if r not in arrived),
            "duplicates": duplicates,
            "delivery": delivery,
            "handoff": latency_distribution(latencies),
            "daemons": daemon_report,
        }
    finally:
        if daemons:
            stop_daemons(daemons)
        sink.stop()


def queued_in_database(setup: Setup, database: Path | str, expected: set[str]) -> dict[str, Any]:
    """Losses and duplicates of an ingest-only run, read from the queue itself."""
    stored = [address for (address,) in setup.query(database, "SELECT address FROM recipients")]
    unique = set(stored)
    return {
        "duplicates": len(stored) - len(unique),
        "lost": len(expected - unique),
        "lost_sample": sorted(expected - unique)[:5],
        "strays": len(unique - expected),
    }


# -- the backlog run ----------------------------------------------------------------------------


def backlog_template(setup: Setup, envelopes: int) -> tuple[Path, set[str]]:
    """A database holding ``envelopes`` queued envelopes (made once, copied for each run)."""
    import backlog

    path = setup.folder / f"backlog-{envelopes}.sqlite3"
    expected_file = path.with_suffix(".recipients")
    if not path.exists():
        print(f"  filling a backlog of {envelopes:,} envelopes through mmgun's store …", flush=True)
        filled = backlog.fill(
            str(path), envelopes, recipients=_range(setup.args.recipients), body_size=setup.args.body_size
        )
        print(
            f"  filled in {filled['seconds']:.1f} s: {filled['submissions']:,} submissions, {filled['recipients']:,} recipients",
            flush=True,
        )
        import sqlite3

        with sqlite3.connect(path) as conn:
            expected_file.write_text("\n".join(r for (r,) in conn.execute("SELECT address FROM recipients")) + "\n")
    return path, set(expected_file.read_text().split())


def _range(text: str) -> tuple[int, int]:
    low, _, high = text.partition("-")
    return int(low), int(high or low)


def backlog_run(setup: Setup, topology: str, envelopes: int, index: int) -> dict[str, Any]:
    args = setup.args
    template, expected = backlog_template(setup, envelopes)
    run = Path(tempfile.mkdtemp(prefix=f"backlog-{envelopes}-{topology}-{index}-", dir=setup.folder))
    (run / "clients").write_text(CLIENT_ID + "\n")
    database = run / "mmgun.sqlite3"
    shutil.copy(template, database)
    sink = Sink(run)
    daemons: list[Daemon] = []
    try:
        background = procs.wait_quiet(args.wait_quiet) if args.wait_quiet else None
        machine_before, _ = procs.system_cpu()
        started = time.monotonic()
        # Frontend first (idle here); the senders find the whole backlog due at once.
        for name, roles in sorted(topology_processes(topology), key=lambda p: 0 if "sender" not in p[1] else 1):
            daemons.append(start_daemon(setup, run, name, roles, database, sink.port))
        pids = {d.name: d.pid for d in daemons} | {"sink": sink.process.pid}
        profiles = Profiles(setup, run, daemons)
        at_first: list[Snapshot] = []

        def first_delivery() -> None:
            # The default command's frontend workers, signers and webhooks process are running by now.
            pids.update(helper_pids(daemons))
            at_first.append(Snapshot(pids))

        delivery = wait_delivered(sink, len(expected), args.stall, args.time_limit, on_first=first_delivery)
        after = Snapshot(pids)
        before = at_first[0] if at_first else after
        peak = {d.name: mib(procs.status_kib(d.pid, "VmHWM")) for d in daemons}
        peak |= {name: mib(procs.status_kib(pid, "VmHWM")) for name, pid in pids.items() if name not in peak and name != "sink"}
        profile = profiles.stop()
        logs = stop_daemons(daemons)
        dump = run / "sink.tsv"
        sink.dump(dump)
        found = analyse(dump, expected)
        times = found.pop("times")
        delivered = found["messages"]
        cpu = after.since(before)
        tenth = max(2, delivered // 10)
        drain_seconds = (times[-1] - times[0]) if len(times) > 1 else None
        return {
            "label": "backlog",
            "topology": topology,
            "queued_envelopes": envelopes,
            "run": index,
            "folder": str(run),
            "envelopes_delivered": delivered,
            "recipients_expected": len(expected),
            "first_message_after_s": round(times[0] - started, 3) if times else None,
            "drain_seconds": round(drain_seconds, 3) if drain_seconds else None,
            "drain_rate": round((delivered - 1) / drain_seconds, 1) if drain_seconds else None,
            "rate_first_10pct": _round(window_rate(times, 0, tenth)),
            "rate_last_10pct": _round(window_rate(times, len(times) - tenth, len(times))),
            "cpu_seconds": cpu,
            "cpu_per_1000": {name: round(s / delivered * 1000, 3) for name, s in cpu.items()} if delivered else {},
            "peak_rss_mib": peak,
            "machine_busy_cores": round((after.machine_busy - machine_before) / (after.time - started), 2),
            # Between the first and the last message: CPU used by processes other than the bench's.
            "other_cpu_seconds": round(after.machine_busy - before.machine_busy - sum(cpu.values()), 2),
            "background_before": background,
            **_delivery_fields(delivery, found, logs, profile),
        }
    finally:
        for daemon in daemons:
            if daemon.process.poll() is None:
                procs.stop_process(daemon.process)
        sink.stop()


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


# -- the Postfix run ----------------------------------------------------------------------------


def postfix_run(setup: Setup, index: int, *, sessions: int | None = None, load: str = "smtp-source") -> dict[str, Any]:
    """
    --messages through a private Postfix, injected by smtp-source over ``sessions``
    (default --concurrency) sessions, or (``load`` "smtpload") by bench/smtpload.py with
    the same shape and no AUTH (the SMTP mode's check that the two loads are alike).
    """
    import resource

    args = setup.args
    sessions = sessions if sessions is not None else args.concurrency
    run = Path(tempfile.mkdtemp(prefix=f"postfix-{load}-{index}-", dir=setup.folder))
    os.chmod(run, 0o755)
    sink = Sink(run)
    instance = None
    try:
        port = procs.free_port()
        instance = postfix.PostfixInstance(run / "postfix", port, sink.port)
        instance.start()
        master = instance.master_pid()
        if master is None:
            raise RuntimeError("the private postfix has no master pid")
        background = procs.wait_quiet(args.wait_quiet) if args.wait_quiet else None
        before = Snapshot({"sink": sink.process.pid}, tree={"postfix": master})
        children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.monotonic()
        # -d: many messages per session (as the HTTP keep-alive connections); -N: unique recipients.
        if load == "smtp-source":
            command = [
                postfix.SMTP_SOURCE,
                "-4",
                "-d",
                "-N",
                f"-s{sessions}",
                f"-m{args.messages}",
                f"-l{args.body_size + 300}",
                "-fbench@sender.bench.test",
                "-tbench@alpha.bench.test",
                "-Msource.bench.test",
                f"127.0.0.1:{port}",
            ]
        else:
            command = smtpload_command(setup, run, port, sessions, None)
        source = subprocess.run(command, capture_output=True, text=True, timeout=args.time_limit + 60, check=False)
        injected = time.monotonic()
        children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if source.returncode != 0:
            raise RuntimeError(f"{load} failed ({source.returncode}): {source.stderr.strip()[-300:]}")
        loaded = json.loads((run / "smtpload.json").read_text()) if load != "smtp-source" else None
        if loaded is not None and (loaded["errors"] or loaded["accepted"] != args.messages):
            raise RuntimeError(f"smtpload: {loaded['accepted']} accepted, errors {loaded['errors']}: {loaded['error_samples']}")
        expected = {f"{i}bench@alpha.bench.test" for i in range(1, args.messages + 1)}
        delivery = wait_delivered(sink, len(expected), args.stall, args.time_limit)
        after = Snapshot({"sink": sink.process.pid}, tree={"postfix": master})
        peak_kib = sum(procs.status_kib(pid, "VmHWM") or 0 for pid in [master, *procs.descendants(master)])
        by_daemon = procs.tree_cpu_by_name(master)
        left_in_queue = instance.queue_files()
        instance.stop()
        dump = run / "sink.tsv"
        sink.dump(dump)
        found = analyse(dump, expected, check_submissions=False)
        found.pop("times")
        end = found["complete_at"] if found["lost"] == 0 else delivery.get("last")
        e2e_seconds = end - started if end else None
        cpu = after.since(before)
        cpu[load] = round(
            (children_after.ru_utime + children_after.ru_stime) - (children_before.ru_utime + children_before.ru_stime),
            3,
        )
        return {
            "label": "postfix" if load == "smtp-source" else f"postfix-{load}",
            "load": load,
            "run": index,
            "folder": str(run),
            "messages": args.messages,
            "concurrency": sessions,
            "injected": args.messages,
            # smtp-source: its whole run; smtpload: its first MAIL to its last 250 (as for mmgun).
            "ingest_rate": round(args.messages / (injected - started), 1) if loaded is None else round(loaded["rate"], 1),
            "latency_ms": {k: round(v * 1000, 2) for k, v in loaded["latency"].items()} if loaded is not None else None,
            "e2e_seconds": round(e2e_seconds, 3) if e2e_seconds else None,
            "e2e_rate": round(args.messages / e2e_seconds, 1) if e2e_seconds else None,
            "cpu_seconds": cpu,
            "cpu_per_1000": {name: round(s / args.messages * 1000, 3) for name, s in cpu.items()},
            "peak_rss_mib_sum": mib(peak_kib),
            "postfix_cpu_by_daemon": by_daemon,
            "left_in_queue": left_in_queue,
            "machine_busy_cores": round((after.machine_busy - before.machine_busy) / (after.time - before.time), 2),
            "other_cpu_seconds": round(after.machine_busy - before.machine_busy - sum(cpu.values()), 2),
            "background_before": background,
            "delivery": {
                k: delivery[k] for k in ("outcome", "messages", "recipients", "duplicates", "connections", "errors")
            },
            "duplicates": found["duplicates"],
            "lost": found["lost"],
            "lost_sample": found["lost_sample"],
            "strays": found["strays"],
            "postfix_log_problems": _postfix_problems(instance.maillog),
        }
    finally:
        if instance is not None:
            instance.stop()
        sink.stop()


# -- the SMTP submission run (issue 16) ------------------------------------------------------------


def smtpload_command(setup: Setup, run: Path, port: int, sessions: int, api_key: str | None, ready: bool = False) -> list[str]:
    """bench/smtpload.py sending smtp-source's load (--messages over ``sessions``) to ``port``; AUTH with ``api_key``."""
    args = setup.args
    return [
        PYTHON,
        str(HERE / "smtpload.py"),
        f"--port={port}",
        f"--sessions={sessions}",
        f"--messages={args.messages}",
        f"--length={args.body_size + 300}",
        f"--sender={DKIM_SENDER}",
        f"--deadline={args.time_limit}",
        f"--result={run / 'smtpload.json'}",
        *([f"--api-key={api_key}"] if api_key else []),
        *(["--ready"] if ready else []),
    ]


def smtp_run(setup: Setup, topology: str, index: int) -> dict[str, Any]:
    """
    --messages submitted over SMTP (``--smtp-listen`` on the frontend, a loopback listener:
    AUTH PLAIN with an API key, no TLS) by bench/smtpload.py in smtp-source's shape
    (--smtp-sessions sessions, one message at a time on each, one recipient each), and
    relayed to the sink: the SMTP ingest rate (first MAIL to last ``250 queued``) and the
    end-to-end rate, as :func:`postfix_run` measures Postfix's.
    """
    args = setup.args
    run = Path(tempfile.mkdtemp(prefix=f"smtp-{topology}-{index}-", dir=setup.folder))
    (run / "clients").write_text(CLIENT_ID + "\n")
    database = run / "mmgun.sqlite3"
    api_key = prepare_dkim(run, database, "none")
    sink = Sink(run)
    daemons: list[Daemon] = []
    load = None
    try:
        smtp_port = procs.free_port()
        for name, roles in topology_processes(topology):
            extra = (f"--smtp-listen=tcp:{smtp_port}:interface=127.0.0.1",) if not roles or "frontend" in roles else ()
            daemons.append(start_daemon(setup, run, name, roles, database, sink.port, extra=extra))
            wait_ready(daemons[-1])
        background = procs.wait_quiet(args.wait_quiet) if args.wait_quiet else None
        load = subprocess.Popen(
            smtpload_command(setup, run, smtp_port, args.smtp_sessions, api_key, ready=True),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert load.stdin is not None and load.stdout is not None
        if load.stdout.readline().strip() != "ready":
            raise RuntimeError("smtpload did not start")
        helpers = helper_pids(daemons)
        pids = {d.name: d.pid for d in daemons} | helpers | {"sink": sink.process.pid, "smtpload": load.pid}
        before = Snapshot(pids)
        go(load)
        try:
            load.wait(args.time_limit + 120)
        except subprocess.TimeoutExpired:
            load.kill()
            raise RuntimeError("smtpload overran its time limit") from None
        if load.returncode != 0:
            raise RuntimeError(f"smtpload failed with status {load.returncode}")
        ingest = json.loads((run / "smtpload.json").read_text())
        expected = {rcpt for _, rcpts in ingest.pop("recipients") for rcpt in rcpts}
        delivery = wait_delivered(sink, len(expected), args.stall, args.time_limit)
        after = Snapshot({d.name: d.pid for d in daemons} | helpers | {"sink": sink.process.pid})
        after.cpu["smtpload"] = ingest.get("cpu_seconds", before.cpu.get("smtpload", 0.0))
        peak = {d.name: mib(procs.status_kib(d.pid, "VmHWM")) for d in daemons}
        logs = stop_daemons(daemons)
        dump = run / "sink.tsv"
        sink.dump(dump)
        found = analyse(dump, expected, check_submissions=False)
        found.pop("times")
        accepted = ingest["accepted"]
        end = found["complete_at"] if found["lost"] == 0 else delivery.get("last")
        e2e_seconds = end - ingest["first_send"] if end and ingest["first_send"] else None
        cpu = after.since(before)
        machine_busy = after.machine_busy - before.machine_busy
        return {
            "label": "smtp",
            "topology": topology,
            "run": index,
            "folder": str(run),
            "messages": args.messages,
            "concurrency": args.smtp_sessions,
            "accepted": accepted,
            "smtp_errors": ingest["errors"],
            "smtp_error_samples": ingest["error_samples"],
            "http_errors": {},
            "ingest_rate": round(ingest["rate"], 1) if ingest["rate"] else None,
            "latency_ms": {k: round(v * 1000, 2) if v is not None else None for k, v in ingest["latency"].items()},
            "e2e_seconds": round(e2e_seconds, 3) if e2e_seconds else None,
            "e2e_rate": round(accepted / e2e_seconds, 1) if e2e_seconds else None,
            "cpu_seconds": cpu,
            "cpu_per_1000": {name: round(seconds / accepted * 1000, 3) for name, seconds in cpu.items()} if accepted else {},
            "peak_rss_mib": peak,
            "machine_busy_cores": round(machine_busy / (after.time - before.time), 2),
            "other_cpu_seconds": round(machine_busy - sum(cpu.values()), 2),
            "background_before": background,
            **_delivery_fields(delivery, found, logs, None),
        }
    finally:
        if load is not None and load.poll() is None:
            load.kill()
        for daemon in daemons:
            if daemon.process.poll() is None:
                procs.stop_process(daemon.process)
        sink.stop()
        if not args.keep:
            for path in run.glob("mmgun.sqlite3*"):
                # mmgun.sqlite3.wake is a directory: the senders' wake-up sockets (mmgun.wakeup).
                shutil.rmtree(path) if path.is_dir() else path.unlink()


def summarize_smtp(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The medians of a series of SMTP runs, mmgun's or Postfix's."""
    names = [n for n in (runs[0]["cpu_per_1000"] if runs else {}) if n not in ("sink", "smtpload", "smtp-source")]
    return {
        "runs": len(runs),
        "ingest_rate": median_of(runs, "ingest_rate"),
        "ingest_rate_range": _spread(runs, "ingest_rate"),
        "p50_ms": median_of(runs, "latency_ms.p50"),
        "p99_ms": median_of(runs, "latency_ms.p99"),
        "e2e_rate": median_of(runs, "e2e_rate"),
        "cpu_per_1000": {n: median_of(runs, f"cpu_per_1000.{n}") for n in names},
        "load_cpu_per_1000": median_of(runs, f"cpu_per_1000.{runs[0].get('load', 'smtpload')}") if runs else None,
        "duplicates": sum(r["duplicates"] for r in runs),
        "lost": sum(r["lost"] for r in runs),
        "smtp_errors": sum(sum(r.get("smtp_errors", {}).values()) for r in runs),
    }


def _postfix_problems(maillog: Path) -> dict[str, Any]:
    counts: dict[str, int] = {}
    samples: list[str] = []
    try:
        with open(maillog, errors="replace") as f:
            for line in f:
                for marker in ("warning:", "error:", "fatal:", "panic:", "status=deferred", "status=bounced"):
                    if marker in line:
                        counts[marker] = counts.get(marker, 0) + 1
                        if len(samples) < 5:
                            samples.append(line.rstrip()[:300])
    except OSError:
        pass
    return {"problems": counts, "samples": samples}


# -- medians and the report ---------------------------------------------------------------------


def content_key(
    name: str, content: str, dkim: str | None = None, webhook: str | None = None, backend: str = "sqlite"
) -> str:
    """
    A summary's row: the topology (or process) alone for the text message, as before;
    marked for the rich one, with the --dkim and --webhook variants when there are, and
    with the backend when it is not SQLite.
    """
    key = name if content == "text" else f"{name}, rich"
    key = key if dkim is None else f"{key}, dkim {dkim}"
    key = key if webhook is None else f"{key}, webhook {webhook}"
    return key if backend == "sqlite" else f"{key}, {backend}"


def median_of(runs: list[dict[str, Any]], path: str) -> Any:
    values = []
    for run in runs:
        value: Any = run
        for part in path.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if isinstance(value, (int, float)):
            values.append(value)
    return round(statistics.median(values), 3) if values else None


def _spread(runs: list[dict[str, Any]], key: str) -> list[float] | None:
    """The lowest and highest of a figure over the runs (what the median hides)."""
    values = [r[key] for r in runs if isinstance(r.get(key), (int, float))]
    return [min(values), max(values)] if values else None


def summarize_relay(runs: list[dict[str, Any]]) -> dict[str, Any]:
    names = list(runs[0]["peak_rss_mib"]) if runs else []
    # The daemons, their helper processes ("frontend-signer"), then the sink and the load generator.
    cpu_names = list(dict.fromkeys([*names, *(runs[0]["cpu_per_1000"] if runs else {}), "sink", "loadgen"]))
    return {
        "runs": len(runs),
        "ingest_rate": median_of(runs, "ingest_rate"),
        "ingest_rate_range": _spread(runs, "ingest_rate"),
        "p50_ms": median_of(runs, "latency_ms.p50"),
        "p99_ms": median_of(runs, "latency_ms.p99"),
        "e2e_rate": median_of(runs, "e2e_rate"),
        "e2e_rate_range": _spread(runs, "e2e_rate"),
        "e2e_recipient_rate": median_of(runs, "e2e_recipient_rate"),
        "cpu_per_1000": {n: median_of(runs, f"cpu_per_1000.{n}") for n in cpu_names},
        "peak_rss_mib": {n: max((r["peak_rss_mib"].get(n) or 0) for r in runs) for n in names},
        "machine_busy_cores": median_of(runs, "machine_busy_cores"),
        "other_cpu_seconds": median_of(runs, "other_cpu_seconds"),
        "duplicates": sum(r["duplicates"] for r in runs),
        "lost": sum(r["lost"] for r in runs),
        "strays": sum(r["strays"] for r in runs),
        "http_errors": sum(sum(r["http_errors"].values()) for r in runs),
        "accepted": sum(r["accepted"] for r in runs),
        **(
            {
                "webhook_posts": [r.get("webhook_posts") for r in runs],
                "webhook_expected": [r["accepted_recipients"] for r in runs],
                "webhook_lag_s": median_of(runs, "webhook_lag_s"),
                "webhook_lag_s_range": _spread(runs, "webhook_lag_s"),
                "webhook_connections": [r.get("webhook_connections") for r in runs],
            }
            if runs and runs[0].get("webhook_posts") is not None
            else {}
        ),
    }


def summarize_backlog(runs: list[dict[str, Any]]) -> dict[str, Any]:
    names = list(runs[0]["peak_rss_mib"]) if runs else []
    return {
        "runs": len(runs),
        "drain_rate": median_of(runs, "drain_rate"),
        "rate_first_10pct": median_of(runs, "rate_first_10pct"),
        "rate_last_10pct": median_of(runs, "rate_last_10pct"),
        "first_message_after_s": median_of(runs, "first_message_after_s"),
        "cpu_per_1000": {n: median_of(runs, f"cpu_per_1000.{n}") for n in names},
        "peak_rss_mib": {n: max((r["peak_rss_mib"].get(n) or 0) for r in runs) for n in names},
        "machine_busy_cores": median_of(runs, "machine_busy_cores"),
        "other_cpu_seconds": median_of(runs, "other_cpu_seconds"),
        "duplicates": sum(r["duplicates"] for r in runs),
        "lost": sum(r["lost"] for r in runs),
        "strays": sum(r["strays"] for r in runs),
    }


def summarize_postfix(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "runs": len(runs),
        "ingest_rate": median_of(runs, "ingest_rate"),
        "e2e_rate": median_of(runs, "e2e_rate"),
        "cpu_per_1000": {
            n: median_of(runs, f"cpu_per_1000.{n}") for n in ("postfix", "sink", runs[0].get("load", "smtp-source") if runs else "")
        },
        "peak_rss_mib_sum": max((r["peak_rss_mib_sum"] or 0) for r in runs) if runs else None,
        "duplicates": sum(r["duplicates"] for r in runs),
        "lost": sum(r["lost"] for r in runs),
        "left_in_queue": sum(r["left_in_queue"] for r in runs),
    }


def fmt(value: Any, digits: int = 0) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=False))) for row in rows]
    return "\n".join(lines)


def per_process(values: dict[str, Any], digits: int) -> str:
    return " ".join(f"{name}={fmt(v, digits)}" for name, v in values.items() if v is not None)


def render(summary: dict[str, Any]) -> str:
    out = []
    handoff = summary.get("handoff", {})
    if handoff:
        rows = [
            [topology, fmt(h["count"]), fmt(h["p50_ms"], 1), fmt(h["p90_ms"], 1), fmt(h["p99_ms"], 1), fmt(h["max_ms"], 1)]
            for topology, h in handoff.items()
        ]
        out.append("Hand-off latency, /send's 200 to the sink's 250 (median of runs; target p50 < 20 ms, p99 < 100 ms):")
        out.append(table(["topology", "messages", "p50 ms", "p90 ms", "p99 ms", "max ms"], rows))
        out.append("")
    relay = summary.get("relay", {})
    if relay:
        rows = []
        for topology, s in relay.items():
            rows.append(
                [
                    topology,
                    fmt(s["runs"]),
                    fmt(s["ingest_rate"]),
                    fmt(s["p50_ms"], 1),
                    fmt(s["p99_ms"], 1),
                    fmt(s["e2e_rate"]),
                    per_process({k: v for k, v in s["cpu_per_1000"].items() if k not in ("sink", "loadgen")}, 2),
                    per_process(s["peak_rss_mib"], 0),
                    fmt(s["duplicates"]),
                    fmt(s["lost"]),
                    fmt(s["http_errors"]),
                ]
            )
        out.append("relay (median of runs; CPU s/1000 messages and peak RSS MiB per mmgun process)")
        out.append(
            table(
                [
                    "topology",
                    "runs",
                    "ingest/s",
                    "p50 ms",
                    "p99 ms",
                    "e2e msg/s",
                    "CPU s/1k",
                    "peak RSS MiB",
                    "dup",
                    "lost",
                    "http err",
                ],
                rows,
            )
        )
    hooked = {k: s for k, s in relay.items() if "webhook_posts" in s}
    if hooked:
        out.append("\nwebhooks (POSTs received of expected per run; lag: last delivery to last POST, median and min–max)")
        out.append(
            table(
                ["topology", "e2e msg/s (min–max)", "POSTs", "expected", "connections", "lag s", "lag min–max s"],
                [
                    [
                        key,
                        f"{fmt(s['e2e_rate'])} ({'–'.join(fmt(v) for v in s['e2e_rate_range'] or [])})",
                        ",".join(fmt(v) for v in s["webhook_posts"]),
                        ",".join(fmt(v) for v in s["webhook_expected"]),
                        ",".join(fmt(v) for v in s["webhook_connections"]),
                        fmt(s["webhook_lag_s"], 2),
                        "–".join(fmt(v, 2) for v in s["webhook_lag_s_range"] or []),
                    ]
                    for key, s in hooked.items()
                ],
            )
        )
    ingest = summary.get("ingest", {})
    if ingest:
        rows = [
            [
                name,
                fmt(s["runs"]),
                fmt(s["ingest_rate"]),
                "–".join(fmt(v) for v in s["ingest_rate_range"]) if s.get("ingest_rate_range") else "—",
                fmt(s["p50_ms"], 1),
                fmt(s["p99_ms"], 1),
                per_process({k: v for k, v in s["cpu_per_1000"].items() if k not in ("sink", "loadgen")}, 2),
                per_process(s["peak_rss_mib"], 0),
                fmt(s["duplicates"]),
                fmt(s["lost"]),
                fmt(s["http_errors"]),
            ]
            for name, s in ingest.items()
        ]
        out.append("\ningest only (no sender running; losses and duplicates counted in the database)")
        out.append(
            table(
                [
                    "process",
                    "runs",
                    "ingest/s",
                    "min–max/s",
                    "p50 ms",
                    "p99 ms",
                    "CPU s/1k",
                    "peak RSS MiB",
                    "dup",
                    "lost",
                    "http err",
                ],
                rows,
            )
        )
    backlog = summary.get("backlog", {})
    if backlog:
        rows = []
        for key, s in backlog.items():
            rows.append(
                [
                    key,
                    fmt(s["runs"]),
                    fmt(s["drain_rate"]),
                    fmt(s["rate_first_10pct"]),
                    fmt(s["rate_last_10pct"]),
                    fmt(s["first_message_after_s"], 2),
                    per_process(s["cpu_per_1000"], 2),
                    per_process(s["peak_rss_mib"], 0),
                    fmt(s["duplicates"]),
                    fmt(s["lost"]),
                ]
            )
        out.append("\nbacklog drain (envelopes/s at the sink; CPU s/1000 envelopes; peak RSS MiB)")
        out.append(
            table(
                [
                    "queued/topology",
                    "runs",
                    "drain/s",
                    "first 10%",
                    "last 10%",
                    "1st msg s",
                    "CPU s/1k",
                    "peak RSS MiB",
                    "dup",
                    "lost",
                ],
                rows,
            )
        )
    smtp = summary.get("smtp", {})
    if smtp:
        out.append("\nSMTP submission (smtp-source's load; median of runs; CPU s/1000 messages of the relay's processes)")
        out.append(
            table(
                ["server, load", "runs", "ingest/s", "min–max/s", "p50 ms", "p99 ms", "e2e msg/s", "CPU s/1k", "load CPU s/1k", "dup", "lost", "refused"],
                [
                    [
                        key,
                        fmt(s["runs"]),
                        fmt(s["ingest_rate"]),
                        "–".join(fmt(v) for v in s["ingest_rate_range"] or []),
                        fmt(s["p50_ms"], 1),
                        fmt(s["p99_ms"], 1),
                        fmt(s["e2e_rate"]),
                        per_process(s["cpu_per_1000"], 2),
                        fmt(s["load_cpu_per_1000"], 2),
                        fmt(s["duplicates"]),
                        fmt(s["lost"]),
                        fmt(s["smtp_errors"]),
                    ]
                    for key, s in smtp.items()
                ],
            )
        )
    if summary.get("smtp_postfix_skipped"):
        out.append(f"Postfix's side of the SMTP mode skipped: {summary['smtp_postfix_skipped']}")
    compare = summary.get("compare")
    if compare:
        m, p = compare["mmgun"], compare["postfix"]
        out.append("\nmmgun vs Postfix (same sink, same message count and concurrency, 1 recipient per message)")
        out.append(
            table(
                ["relay", "runs", "ingest/s", "e2e msg/s", "CPU s/1k", "dup", "lost"],
                [
                    [
                        "mmgun",
                        fmt(m["runs"]),
                        fmt(m["ingest_rate"]),
                        fmt(m["e2e_rate"]),
                        per_process({k: v for k, v in m["cpu_per_1000"].items() if k not in ("sink", "loadgen")}, 2),
                        fmt(m["duplicates"]),
                        fmt(m["lost"]),
                    ],
                    [
                        "postfix",
                        fmt(p["runs"]),
                        fmt(p["ingest_rate"]),
                        fmt(p["e2e_rate"]),
                        per_process({"postfix": p["cpu_per_1000"]["postfix"]}, 2),
                        fmt(p["duplicates"]),
                        fmt(p["lost"]),
                    ],
                ],
            )
        )
        out.append(f"end-to-end ratio mmgun/postfix: {fmt(compare['ratio'], 2)}")
    elif summary.get("compare_skipped"):
        out.append(f"\nPostfix comparison skipped: {summary['compare_skipped']}")
    targets = summary.get("targets", [])
    if targets:
        out.append("\ntargets")
        out.append(table(["target", "measured", "met"], [[t["target"], t["measured"], t["met"]] for t in targets]))
    return "\n".join(out)


def evaluate(summary: dict[str, Any], all_runs: list[dict[str, Any]]) -> list[dict[str, str]]:
    targets = []
    compare = summary.get("compare")
    if compare and compare.get("ratio") is not None:
        ratio = compare["ratio"]
        targets.append(
            {"target": "end-to-end ≥ 2× Postfix", "measured": f"{ratio:.2f}×", "met": "yes" if ratio >= 2 else "NO"}
        )
    smtp = summary.get("smtp", {})
    for key, ours in smtp.items():
        for load in ("smtp-source", "smtpload"):
            theirs = smtp.get(f"postfix, {load}")
            if not key.startswith("mmgun") or not theirs or not ours["ingest_rate"] or not theirs["ingest_rate"]:
                continue
            ratio = ours["ingest_rate"] / theirs["ingest_rate"]
            targets.append(
                {
                    "target": f"SMTP ingest ≥ Postfix's smtpd ({key} vs Postfix with {load})",
                    "measured": f"{ours['ingest_rate']:,.0f} vs {theirs['ingest_rate']:,.0f}/s ({ratio:.2f}×)",
                    "met": "yes" if ratio >= 1 else "NO",
                }
            )
    relay = {**summary.get("relay", {}), **summary.get("ingest", {})}
    for topology, s in relay.items():
        if ", rich" in topology:
            continue  # the targets are the ~1 KB text message's
        if s["ingest_rate"] is not None and s["p99_ms"] is not None:
            ok = s["ingest_rate"] >= 3000 and s["p99_ms"] < 50
            targets.append(
                {
                    "target": f"ingest ≥ 3,000/s, p99 < 50 ms ({topology})",
                    "measured": f"{s['ingest_rate']:,.0f}/s, p99 {s['p99_ms']:.1f} ms",
                    "met": "yes" if ok else "NO",
                }
            )
    for key, s in relay.items():
        base, _, variant = key.partition(", dkim ")
        unsigned = relay.get(f"{base}, dkim none")
        if variant in ("", "none") or ", " in variant or not unsigned or not s["ingest_rate"] or not unsigned["ingest_rate"]:
            continue
        ratio = s["ingest_rate"] / unsigned["ingest_rate"]
        targets.append(
            {
                "target": f"ingest signed ≥ 80% of unsigned ({key})",
                "measured": f"{s['ingest_rate']:,.0f} vs {unsigned['ingest_rate']:,.0f}/s ({ratio:.0%})",
                "met": "yes" if ratio >= 0.8 else "NO",
            }
        )
    for key, s in summary.get("relay", {}).items():
        base, _, variant = key.partition(", webhook ")
        if variant not in ("on", "on-apart") or not s["e2e_rate"]:
            continue
        for other in ("off", "no-role"):
            without = relay.get(f"{base}, webhook {other}")
            if without and without["e2e_rate"]:
                ratio = s["e2e_rate"] / without["e2e_rate"]
                targets.append(
                    {
                        "target": f"end-to-end with webhook {variant} ≥ 85% of webhook {other} ({base})",
                        "measured": f"{s['e2e_rate']:,.0f} vs {without['e2e_rate']:,.0f}/s ({ratio:.0%})",
                        "met": "yes" if ratio >= 0.85 else "NO",
                    }
                )
        expected = sum(s["webhook_expected"])
        received = sum(v or 0 for v in s["webhook_posts"])
        targets.append(
            {
                "target": f"every delivered event POSTed to the webhook ({base}, {variant})",
                "measured": f"{received:,} POSTs for {expected:,} delivered recipients",
                "met": "yes" if received >= expected else "NO",
            }
        )
    for key, s in summary.get("relay", {}).items():
        base, _, backend = key.rpartition(", ")
        sqlite = summary["relay"].get(base)
        if backend != "postgres" or not sqlite or not s["e2e_rate"] or not sqlite["e2e_rate"]:
            continue
        ratio = s["e2e_rate"] / sqlite["e2e_rate"]
        targets.append(
            {
                "target": f"relay on PostgreSQL ≥ 70% of SQLite ({base})",
                "measured": f"{s['e2e_rate']:,.0f} vs {sqlite['e2e_rate']:,.0f}/s ({ratio:.0%})",
                "met": "yes" if ratio >= 0.7 else "NO",
            }
        )
    backlog = summary.get("backlog", {})
    for key, s in backlog.items():
        queued = int(key.split("/")[0])
        if queued >= 100_000:
            senders = {n: v for n, v in s["peak_rss_mib"].items() if n.startswith("sender") or n == "all"}
            worst = max(senders.values()) if senders else None
            if worst is not None:
                targets.append(
                    {
                        "target": f"sender peak RSS < 150 MB, {queued:,} backlog ({key.split('/')[1]})",
                        "measured": f"{worst * 1.048576:.0f} MB",
                        "met": "yes" if worst * 1.048576 < 150 else "NO",
                    }
                )
        if queued >= 100_000 and s["peak_rss_mib"]:
            total = sum(v or 0 for v in s["peak_rss_mib"].values()) * 1.048576
            targets.append(
                {
                    "target": f"peak RSS of every mmgun process together < 300 MB, {queued:,} backlog ({key.split('/')[1]})",
                    "measured": f"{total:.0f} MB ({len(s['peak_rss_mib'])} processes)",
                    "met": "yes" if total < 300 else "NO",
                }
            )
    sizes = sorted({int(k.split("/")[0]) for k in backlog})
    if len(sizes) >= 2:
        for topology in sorted({k.split("/")[1] for k in backlog}):
            small, large = backlog.get(f"{sizes[0]}/{topology}"), backlog.get(f"{sizes[-1]}/{topology}")
            if small and large:
                cost = [sum(v or 0 for n, v in b["cpu_per_1000"].items() if n != "sink") for b in (small, large)]
                if cost[0]:
                    targets.append(
                        {
                            "target": f"CPU per message at {sizes[-1]:,} within 20% of {sizes[0]:,} ({topology})",
                            "measured": f"{cost[1]:.2f} vs {cost[0]:.2f} CPU-s/1k ({cost[1] / cost[0] - 1:+.0%})",
                            "met": "yes" if cost[1] <= cost[0] * 1.2 else "NO",
                        }
                    )
        for topology in sorted({k.split("/")[1] for k in backlog}):
            small, large = backlog.get(f"{sizes[0]}/{topology}"), backlog.get(f"{sizes[-1]}/{topology}")
            if small and large and small["drain_rate"] and large["drain_rate"]:
                change = large["drain_rate"] / small["drain_rate"] - 1
                targets.append(
                    {
                        "target": f"drain at {sizes[-1]:,} within 20% of {sizes[0]:,} ({topology})",
                        "measured": f"{large['drain_rate']:,.0f} vs {small['drain_rate']:,.0f}/s ({change:+.0%})",
                        "met": "yes" if abs(change) <= 0.2 or change > 0 else "NO",
                    }
                )
    for topology, h in summary.get("handoff", {}).items():
        if h["p50_ms"] is None or h["p99_ms"] is None:
            continue
        targets.append(
            {
                "target": f"hand-off ({topology}, light load): p50 < 20 ms, p99 < 100 ms",
                "measured": f"p50 {h['p50_ms']:.1f} ms, p99 {h['p99_ms']:.1f} ms",
                "met": "yes" if h["p50_ms"] < 20 and h["p99_ms"] < 100 else "NO",
            }
        )
    bad = [r for r in all_runs if r.get("duplicates") or r.get("lost")]
    if not all_runs:
        return targets
    targets.append(
        {
            "target": "0 lost, 0 duplicated (every run)",
            "measured": f"{sum(r.get('lost', 0) for r in all_runs)} lost, {sum(r.get('duplicates', 0) for r in all_runs)} dup in {len(all_runs)} runs",
            "met": "yes" if not bad else "NO",
        }
    )
    return targets


def git_state() -> dict[str, Any]:
    def git(*args: str) -> str:
        result = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30, check=False)
        # Only the end: porcelain lines start with a significant space.
        return result.stdout.rstrip()

    import hashlib

    import mmgun

    # What actually ran: the installed package (make reinstalls it when a source changes).
    digest = hashlib.sha256()
    installed = Path(mmgun.__file__).parent
    for path in sorted(installed.rglob("*.py")):
        digest.update(str(path.relative_to(installed)).encode() + b"\0" + path.read_bytes())
    return {
        "commit": git("rev-parse", "HEAD"),
        "dirty_files": [line[3:] for line in git("status", "--porcelain", "mmgun").splitlines()],
        "installed_mmgun": str(installed),
        "installed_mmgun_sha256": digest.hexdigest()[:16],
    }


# -- the command ----------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench.py", description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, help="runs of each measurement; the report shows the median (default 3)")
    parser.add_argument("--messages", type=int, help="POSTs per relay run (default 20,000)")
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent HTTP connections (default 32)")
    parser.add_argument(
        "--topology", default="all", help=f"comma-separated: {', '.join(TOPOLOGIES)}, or 'every' (default all)"
    )
    parser.add_argument(
        "--mode",
        help=f"comma-separated: {', '.join(MODES)} (default relay; with --compare-postfix alone, none)",
    )
    parser.add_argument(
        "--handoff-messages", type=int, default=300, help="POSTs per hand-off run, one recipient each (default 300)"
    )
    parser.add_argument(
        "--handoff-rate", type=float, default=10.0, help="POSTs a second in the hand-off mode (default 10)"
    )
    parser.add_argument("--backlog-sizes", help="queued envelopes for the backlog mode (default 1000,100000)")
    parser.add_argument(
        "--smtp-sessions", type=int, default=20, help="SMTP sessions at once in the smtp mode (smtp-source -s; default 20)"
    )
    parser.add_argument(
        "--compare-postfix", action="store_true", help="also run the same load through a private Postfix"
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2,000 messages, 1 run, backlog 1000,10000")
    parser.add_argument("--recipients", default="1-3", help="recipients per message, N or LOW-HIGH (default 1-3)")
    parser.add_argument("--body-size", type=int, default=1000, help="characters of message body (default 1000)")
    parser.add_argument(
        "--content",
        default="text",
        help="comma-separated, for relay and ingest: text (a ~1 KB text body), rich (that text beside a ~30 KB "
        "HTML part, and a ~100 KB attachment) (default text)",
    )
    parser.add_argument(
        "--dkim",
        help=f"comma-separated, for relay and ingest: {', '.join(DKIM_VARIANTS)} — sign with the sender domain's "
        "keys (none: the same API-key client, no domain), the variants interleaved run by run (default: "
        "no domain, no key: the clients-file id)",
    )
    parser.add_argument(
        "--webhook",
        nargs="?",
        const="on",
        help=f"comma-separated, for relay: {', '.join(WEBHOOK_VARIANTS)} — on: a webhook for every event to "
        "bench/webhook_sink.py (issue 14); off: the same API-key client, no webhook; no-role: no webhooks role; "
        "on-apart: on, with the webhooks role in a process of its own; "
        "interleaved run by run (default: none of these, as make bench; alone: on)",
    )
    parser.add_argument(
        "--backend",
        default="sqlite",
        help=f"comma-separated, for relay and ingest: {', '.join(BACKENDS)} — postgres on a private cluster "
        f"(issue 15), interleaved run by run (default sqlite); or {NETNS_BACKEND} alone (as root): two hosts "
        "in network namespaces, see bench/netns.py",
    )
    parser.add_argument("--rich-messages", type=int, help="POSTs per run of the rich content (default 5,000)")
    parser.add_argument(
        "--stall", type=float, default=30.0, help="give up waiting for deliveries after this many seconds without one"
    )
    parser.add_argument(
        "--time-limit", type=float, default=600.0, help="longest ingest, and longest drain, of one run (seconds)"
    )
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        help="before each run, wait up to this many seconds for an idle machine",
    )
    parser.add_argument(
        "--mmgun-arg",
        action="append",
        default=[],
        metavar="--OPTION=VALUE",
        help="extra option for every mmgun process",
    )
    parser.add_argument(
        "--workdir",
        default=str(HERE / "out"),
        help="where the temp folder goes (default bench/out: the project's disk)",
    )
    parser.add_argument(
        "--discard-logs",
        action="store_true",
        help="send mmgun's log to /dev/null (diagnostic: what logging to a file costs; no log checks then)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (databases, logs, sink dumps)")
    parser.add_argument("--profile", action="store_true", help="record py-spy profiles of every mmgun process")
    parser.add_argument("--py-spy", help="path of py-spy (default: from PATH or the venv)")
    parser.add_argument("--output", help="JSON report path (default bench/out/<timestamp>.json)")
    args = parser.parse_args(argv)
    # --quick changes the defaults only: an explicit flag still wins.
    if args.runs is None:
        args.runs = 1 if args.quick else 3
    if args.messages is None:
        args.messages = 2000 if args.quick else 20_000
    if args.rich_messages is None:
        args.rich_messages = 500 if args.quick else 5_000
    args.contents = [c.strip() for c in args.content.split(",") if c.strip()]
    for content in args.contents:
        if content not in CONTENTS:
            parser.error(f"--content: {content!r} is not one of {', '.join(CONTENTS)}")
    args.dkims = [None] if args.dkim is None else [v.strip() for v in args.dkim.split(",") if v.strip()]
    for dkim in args.dkims:
        if dkim is not None and dkim not in DKIM_VARIANTS:
            parser.error(f"--dkim: {dkim!r} is not one of {', '.join(DKIM_VARIANTS)}")
    args.webhooks = [None] if args.webhook is None else [v.strip() for v in args.webhook.split(",") if v.strip()]
    for webhook in args.webhooks:
        if webhook is not None and webhook not in WEBHOOK_VARIANTS:
            parser.error(f"--webhook: {webhook!r} is not one of {', '.join(WEBHOOK_VARIANTS)}")
    args.backends = [b.strip() for b in args.backend.split(",") if b.strip()]
    for backend in args.backends:
        if backend not in BACKENDS and args.backends != [NETNS_BACKEND]:
            parser.error(f"--backend: {backend!r} is not one of {', '.join(BACKENDS)} (or {NETNS_BACKEND}, alone)")
    if args.backlog_sizes is None:
        args.backlog_sizes = "1000,10000" if args.quick else "1000,100000"
    args.topologies = (
        list(TOPOLOGIES) if args.topology == "every" else [t.strip() for t in args.topology.split(",") if t.strip()]
    )
    if args.mode is None:
        args.mode = "" if args.compare_postfix else "relay"
    args.modes = [m.strip() for m in args.mode.split(",") if m.strip()]
    for topology in args.topologies:
        if topology not in TOPOLOGIES:
            parser.error(f"--topology: {topology!r} is not one of {', '.join(TOPOLOGIES)}")
    for mode in args.modes:
        if mode not in MODES:
            parser.error(f"--mode: {mode!r} is not one of {', '.join(MODES)}")
    if args.runs < 1 or args.messages < 1 or args.rich_messages < 1 or args.concurrency < 1:
        parser.error("--runs, --messages, --rich-messages and --concurrency must be at least 1")
    args.sizes = [int(s) for s in args.backlog_sizes.split(",") if s.strip()]
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.backends == [NETNS_BACKEND]:
        import netns

        return netns.main(argv)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="run-", dir=workdir))
    # Postfix's daemons (the postfix user) must be able to reach their queue inside it.
    folder.chmod(0o755)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    output = Path(args.output) if args.output else HERE / "out" / f"{stamp}.json"
    setup = Setup(folder, mmgun_options(), args, list(args.mmgun_arg))
    report: dict[str, Any] = {
        "started": stamp,
        "command": " ".join([Path(sys.argv[0]).name, *argv]),
        "machine": procs.machine(folder),
        "git": git_state(),
        "durability": "SQLite WAL, synchronous=FULL (mmgun's only setting): each acknowledged POST is fsync'd; "
        "PostgreSQL (--backend postgres): fsync=on, synchronous_commit=on, the same promise",
        "mmgun_flags": setup.limit_flags() + setup.extra,
        "options": {
            k: v
            for k, v in vars(args).items()
            if k not in ("topologies", "modes", "sizes", "contents", "dkims", "webhooks", "backends")
        },
        "runs": [],
        "summary": {},
    }
    print(
        f"mmgun bench: {args.runs} run(s), modes {','.join(args.modes)}, topologies {','.join(args.topologies)}, temp folder {folder}"
    )
    print(
        f"machine: {report['machine']['nproc']} cores, {report['machine']['cpu_model']}, {report['machine']['memory_gib']} GiB, fdatasync {report['machine']['fdatasync_ms']} ms on {report['machine']['filesystem']}"
    )
    if setup.limit_flags():
        print(f"mmgun options: {' '.join(setup.limit_flags())} (client limits off for the measurement)")
    summary: dict[str, Any] = report["summary"]
    runs: list[dict[str, Any]] = report["runs"]

    def record(run: dict[str, Any]) -> dict[str, Any]:
        runs.append(run)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(report, indent=1, default=str))
        return run

    try:
        if "relay" in args.modes:
            summary["relay"] = {}
            for content, topology in [(c, t) for c in args.contents for t in args.topologies]:
                variants = [(v, w, b) for v in args.dkims for w in args.webhooks for b in args.backends]
                relay_done: dict[tuple[str | None, str | None, str], list[dict[str, Any]]] = {v: [] for v in variants}
                for index, (dkim, webhook, backend) in [(i, v) for i in range(args.runs) for v in variants]:
                    name = content_key(topology, content, dkim, webhook, backend)
                    run = record(
                        relay_run(
                            setup,
                            topology,
                            index + 1,
                            args.recipients,
                            content=content,
                            dkim=dkim,
                            webhook=webhook,
                            backend=backend,
                        )
                    )
                    relay_done[(dkim, webhook, backend)].append(run)
                    print(
                        f"  relay {name} #{index + 1}: {run['accepted']:,} accepted at {fmt(run['ingest_rate'])}/s "
                        f"(p50 {fmt(run['latency_ms']['p50'], 1)} ms, p99 {fmt(run['latency_ms']['p99'], 1)} ms), "
                        f"end-to-end {fmt(run['e2e_rate'])}/s, dup {run['duplicates']}, lost {run['lost']}, "
                        f"{run['delivery']['outcome']}; machine {run['machine_busy_cores']} cores busy, "
                        f"{run['other_cpu_seconds']} CPU-s not ours"
                        + (
                            f"; webhook {run['webhook_posts']:,} POSTs of {run['accepted_recipients']:,} "
                            f"({run['webhook_outcome']}) on {run['webhook_connections']} connections, "
                            f"lag {fmt(run['webhook_lag_s'], 2)} s"
                            if run["webhook_posts"] is not None
                            else ""
                        ),
                        flush=True,
                    )
                for (dkim, webhook, backend), done in relay_done.items():
                    summary["relay"][content_key(topology, content, dkim, webhook, backend)] = summarize_relay(done)
        if "ingest" in args.modes:
            summary["ingest"] = {}
            ingest = {"frontend only": "frontend"}
            if "two-frontends" in args.topologies:
                ingest["two frontends only"] = "two-frontends"
            for content, (title, topology) in [(c, i) for c in args.contents for i in ingest.items()]:
                ingest_variants = [(v, b) for v in args.dkims for b in args.backends]
                ingest_done: dict[tuple[str | None, str], list[dict[str, Any]]] = {v: [] for v in ingest_variants}
                for index, (dkim, backend) in [(i, v) for i in range(args.runs) for v in ingest_variants]:
                    name = content_key(title, content, dkim, backend=backend)
                    run = record(
                        relay_run(
                            setup,
                            topology,
                            index + 1,
                            args.recipients,
                            label="ingest",
                            content=content,
                            dkim=dkim,
                            backend=backend,
                        )
                    )
                    ingest_done[(dkim, backend)].append(run)
                    frontend_cpu = sum(v for k, v in run["cpu_per_1000"].items() if k.startswith("frontend"))
                    frontend_wait = sum(v for k, v in run["cpu_wait_during_ingest"].items() if k.startswith("frontend"))
                    signed = run["signed"]
                    print(
                        f"  ingest ({name}) #{index + 1}: {run['accepted']:,} accepted at {fmt(run['ingest_rate'])}/s "
                        f"(p50 {fmt(run['latency_ms']['p50'], 1)} ms, p99 {fmt(run['latency_ms']['p99'], 1)} ms), "
                        f"frontend CPU {frontend_cpu:.2f} s/1k (waited for a CPU {frontend_wait:.1f} s), "
                        + (f"signed rsa {signed['rsa-sha256']:,} ed25519 {signed['ed25519-sha256']:,}, " if signed else "")
                        + f"dup {run['duplicates']}, lost {run['lost']} (in the database); "
                        f"{run['other_cpu_seconds']} CPU-s not ours",
                        flush=True,
                    )
                for (dkim, backend), done in ingest_done.items():
                    summary["ingest"][content_key(title, content, dkim, backend=backend)] = summarize_relay(done)
        if "backlog" in args.modes:
            summary["backlog"] = {}
            for size in args.sizes:
                for topology in args.topologies:
                    done = []
                    for index in range(args.runs):
                        run = record(backlog_run(setup, topology, size, index + 1))
                        done.append(run)
                        print(
                            f"  backlog {size:,} {topology} #{index + 1}: {run['envelopes_delivered']:,} envelopes at "
                            f"{fmt(run['drain_rate'])}/s, peak RSS {per_process(run['peak_rss_mib'], 0)} MiB, "
                            f"dup {run['duplicates']}, lost {run['lost']}, {run['delivery']['outcome']}; "
                            f"{run['other_cpu_seconds']} CPU-s not ours",
                            flush=True,
                        )
                    summary["backlog"][f"{size}/{topology}"] = summarize_backlog(done)
        if "handoff" in args.modes:
            summary["handoff"] = {}
            for topology in args.topologies:
                done = []
                for index in range(args.runs):
                    run = record(handoff_run(setup, topology, index + 1))
                    done.append(run)
                    h = run["handoff"]
                    print(
                        f"  handoff {topology} #{index + 1}: {h['count']} messages at {run['rate']:g}/s, 200 → 250 "
                        f"p50 {h['p50_ms']} ms, p90 {h['p90_ms']} ms, p99 {h['p99_ms']} ms, max {h['max_ms']} ms; "
                        f"dup {run['duplicates']}, lost {run['lost']}, errors {run['errors']}",
                        flush=True,
                    )
                summary["handoff"][topology] = {
                    key: median_of(done, f"handoff.{key}") for key in ("count", "p50_ms", "p90_ms", "p99_ms", "max_ms")
                }
        if "smtp" in args.modes:
            summary["smtp"] = {}
            why_not = postfix.available()
            if why_not:
                summary["smtp_postfix_skipped"] = why_not
                print(f"smtp: Postfix's side skipped: {why_not}")
            series: dict[str, list[dict[str, Any]]] = {f"mmgun ({topology})": [] for topology in args.topologies}
            if not why_not:
                series["postfix, smtp-source"] = []
                series["postfix, smtpload"] = []
            for index in range(args.runs):
                for key, done in series.items():
                    if key.startswith("mmgun"):
                        run = record(smtp_run(setup, key[len("mmgun (") : -1], index + 1))
                    else:
                        load = key.partition(", ")[2]
                        run = record(postfix_run(setup, index + 1, sessions=args.smtp_sessions, load=load))
                    done.append(run)
                    print(
                        f"  smtp {key} #{index + 1}: {args.messages:,} in {args.smtp_sessions} sessions, ingest "
                        f"{fmt(run['ingest_rate'])}/s, end-to-end {fmt(run['e2e_rate'])}/s, dup {run['duplicates']}, "
                        f"lost {run['lost']}; {run['other_cpu_seconds']} CPU-s not ours",
                        flush=True,
                    )
            for key, done in series.items():
                summary["smtp"][key] = summarize_smtp(done)
        if args.compare_postfix:
            why_not = postfix.available()
            if why_not:
                summary["compare_skipped"] = why_not
                print(f"Postfix comparison skipped: {why_not}")
            else:
                mmgun_runs, postfix_runs = [], []
                for index in range(args.runs):
                    run = record(relay_run(setup, args.topologies[0], index + 1, "1", label="compare-mmgun"))
                    mmgun_runs.append(run)
                    print(
                        f"  compare mmgun #{index + 1}: end-to-end {fmt(run['e2e_rate'])}/s, dup {run['duplicates']}, "
                        f"lost {run['lost']}; {run['other_cpu_seconds']} CPU-s not ours",
                        flush=True,
                    )
                    prun = record(postfix_run(setup, index + 1))
                    postfix_runs.append(prun)
                    print(
                        f"  compare postfix #{index + 1}: end-to-end {fmt(prun['e2e_rate'])}/s, dup {prun['duplicates']}, "
                        f"lost {prun['lost']}; {prun['other_cpu_seconds']} CPU-s not ours",
                        flush=True,
                    )
                m, p = summarize_relay(mmgun_runs), summarize_postfix(postfix_runs)
                summary["compare"] = {
                    "topology": args.topologies[0],
                    "mmgun": m,
                    "postfix": p,
                    "ratio": round(m["e2e_rate"] / p["e2e_rate"], 3) if m["e2e_rate"] and p["e2e_rate"] else None,
                }
        summary_targets = evaluate(summary, runs)
        summary["targets"] = summary_targets
        problems = {
            f"{r['label']} {r.get('topology', '')} #{r['run']} {name}": d["problems"]
            for r in runs
            for name, d in r.get("daemons", {}).items()
            if d["problems"] or d["exit_status"] not in (0, None)
        }
        summary["log_problems"] = problems
    finally:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(report, indent=1, default=str))
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    print()
    print(render(summary))
    if summary.get("log_problems"):
        print("\nmmgun logged problems (see the JSON for samples):")
        for where, counts in summary["log_problems"].items():
            print(f"  {where}: {counts}")
    for run in runs:
        for name, profile in (run.get("profile") or {}).items():
            print(
                f"\nprofile {run['label']} {run.get('topology', '')} #{run['run']} {name}: {profile['samples']} samples; top self:"
            )
            for function, share in profile["self"][:10]:
                print(f"  {share:5.1f}%  {function}")
    print(f"\nJSON: {output}")
    failed = any(r.get("lost") or r.get("duplicates") for r in runs)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
