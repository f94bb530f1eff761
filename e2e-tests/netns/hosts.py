"""
The harness of the network-namespace suite (issue 15): mmgun hosts in their namespaces, the
shared PostgreSQL, the load generator and the maildirs that judge delivery.

run.sh made the namespaces, started PostgreSQL and the stubs, and runs the tests (in the
load generator's namespace) with these in the environment:

    NETNS_H1, NETNS_H2, NETNS_DB, NETNS_LG   the namespaces
    NETNS_MX                                 the MX host's (the tests don't need it; bench/netns.py's sink runs there)
    NETNS_PGBIN, NETNS_PGDATA                PostgreSQL's binaries and data directory
    NETNS_PGSOCKET                           the directory of its Unix socket (the judge's way in:
                                             a Unix socket crosses namespaces, the cuts don't touch it)
    NETNS_STATE, NETNS_LOGS                  maildirs, clients file; one log per process
    NETNS_TEST_PIDS                          every process started here, one PID a line, for run.sh
                                             to stop if a test could not
    NETNS_ROOT                               the checkout (its .venv runs mmgun)

Nothing here sleeps to wait for something: every wait polls a condition until a deadline.
"""

from __future__ import annotations

import http.client
import json
import os
import queue
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psycopg

T = TypeVar("T")

POLL = 0.05
#: The leases of the hosts, in seconds: short, so that a takeover happens within the test.
LEASE = 6.0
HTTP_PORT = 8080
DB_HOST = "198.51.100.1"
#: What every host's --database URL carries after the "?" (NETNS_URL_OPTIONS replaces it, to
#: try others): a shorter connect_timeout. The rest is mmgun's own libpq and server-side
#: settings (runners.CONNECT_DEFAULTS, server_options), among them an
#: idle_in_transaction_session_timeout of a quarter of the 6 s lease (1.5 s, from --lease-time):
#: a fixed 10 s let a host cut off in the middle of a transaction hold its row locks for longer
#: than the other host's leases — that host's records and renewals waited, its leases ran out,
#: and it sent its own envelopes twice.
URL_OPTIONS = os.environ.get("NETNS_URL_OPTIONS", "connect_timeout=3")


def env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise RuntimeError(f"{name} is not set: run the suite with e2e-tests/netns/run.sh")
    return value


def now() -> float:
    """The wall clock: what the SMTP stubs name their files with, so moments compare with deliveries."""
    return time.time()


def eventually(what: str, probe: Callable[[], T | None], seconds: float, poll: float = POLL) -> T:
    """Call C{probe} until it returns something other than None; fail after C{seconds}."""
    deadline = time.monotonic() + seconds
    while True:
        result = probe()
        if result is not None:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds:g}s waiting for {what}")
        time.sleep(poll)


def record_pid(pid: int) -> None:
    with open(env("NETNS_TEST_PIDS"), "a") as f:
        f.write(f"{pid}\n")


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except OSError:
        return False


def netns_pids(ns: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", ns], check=True, capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


# ---- PostgreSQL ------------------------------------------------------------------------


class Postgres:
    """The shared database server in its namespace, and the judge's own connection to it."""

    def __init__(self) -> None:
        self.ns = env("NETNS_DB")
        self.bindir = env("NETNS_PGBIN")
        self.data = env("NETNS_PGDATA")
        self.socket = env("NETNS_PGSOCKET")

    def url(self, dbname: str) -> str:
        """The URL the hosts use: over the back network, by TCP."""
        return f"postgresql://mmgun@{DB_HOST}:5432/{dbname}?{URL_OPTIONS}"

    def connect(self, dbname: str) -> psycopg.Connection[Any]:
        """The judge's connection: through the Unix socket, which no cut reaches."""
        return psycopg.connect(host=self.socket, user="mmgun", dbname=dbname, autocommit=True, connect_timeout=10)

    def create_database(self, dbname: str) -> None:
        with self.connect("postgres") as conn:
            conn.execute(psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(dbname)))

    def query(self, dbname: str, text: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self.connect(dbname) as conn:
            return conn.execute(text.encode(), params).fetchall()

    def restart(self) -> float:
        """pg_ctl restart -m fast (waits until it accepts connections again); returns its seconds."""
        began = time.monotonic()
        subprocess.run(
            ["ip", "netns", "exec", self.ns, "runuser", "-u", "postgres", "--",
             f"{self.bindir}/pg_ctl", "-D", self.data, "-l", f"{self.socket}/postgres.log",
             "-m", "fast", "-w", "-t", "60", "restart"],
            check=True, capture_output=True, timeout=90,
        )  # fmt: skip
        return time.monotonic() - began


# ---- mmgun hosts ---------------------------------------------------------------------------


@dataclass
class Host:
    """One mmgun host: a namespace running one twistd with the frontend and the sender."""

    name: str  # h1, h2
    ns: str
    front: str  # its HTTP address
    nameserver: str  # its own DNS stub, whose MX is its own SMTP stub
    maildir: Path
    process: subprocess.Popen[bytes] | None = None
    log: Path | None = None

    @property
    def url(self) -> str:
        return f"http://{self.front}:{HTTP_PORT}"

    def argv(self, database: str, sender_id: str) -> list[str]:
        root = env("NETNS_ROOT")
        return [
            "ip", "netns", "exec", self.ns,
            f"{root}/.venv/bin/twistd", "-n", "--pidfile=", "mmgun",
            "--role", "frontend", "--role", "sender",
            "--database", database,
            "--clients", f"{env('NETNS_STATE')}/clients",
            "--listen", f"tcp:{HTTP_PORT}:interface={self.front}",
            "--helo", f"{self.name}.netns.test",
            "--sender-id", sender_id,
            "--nameserver", f"{self.nameserver}:53",
            "--smtp-port", "25",
            "--allow-private-mx",
            "--lease-time", f"{LEASE:g}s",
            "--poll-interval", "0.2",
            "--retry-min", "1s", "--retry-max", "2s",
            "--smtp-timeout", "10s",
            "--shutdown-timeout", "2s",
            # Two SMTP sessions at a time: with the stub's 50 ms a message, a batch takes seconds.
            "--max-per-destination", "2",
        ]  # fmt: skip

    def spawn(self, database: str, sender_id: str, tag: str) -> None:
        """Start it; L{wait_ready} then waits for it."""
        self.log = Path(env("NETNS_LOGS")) / f"{tag}-{self.name}.log"
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                self.argv(database, sender_id), stdout=out, stderr=subprocess.STDOUT, cwd=env("NETNS_ROOT")
            )
        record_pid(self.process.pid)

    def wait_ready(self) -> None:
        """Wait until GET / answers 200 (or fail at once if it exits)."""

        def up() -> bool | None:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"{self.name} exited during start-up:\n{self.tail()}")
            status, _ = request(self.url, "GET", "/", timeout=2)
            return True if status == 200 else None

        eventually(f"{self.name} to answer GET /", up, 30)

    def tail(self, lines: int = 20) -> str:
        if self.log is None or not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def kill9(self) -> list[int]:
        """SIGKILL every process in its namespace (all of them mmgun's: this host runs nothing else)."""
        pids = netns_pids(self.ns)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        eventually(f"{self.name}'s processes to die", lambda: True if not any(alive(p) for p in pids) else None, 10)
        if self.process is not None:
            self.process.wait(timeout=10)
        return pids

    def freeze(self) -> None:
        """SIGSTOP every process of this host: its sender claims nothing until L{thaw}."""
        for pid in netns_pids(self.ns):
            os.kill(pid, signal.SIGSTOP)

    def thaw(self) -> None:
        for pid in netns_pids(self.ns):
            os.kill(pid, signal.SIGCONT)

    def stop(self) -> None:
        """SIGTERM, and wait (SIGKILL after 15 s)."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)

    def link(self, state: str) -> None:
        """ip link set back STATE in this host's namespace: cut (down) or heal (up) its database path."""
        subprocess.run(["ip", "-n", self.ns, "link", "set", "back", state], check=True)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log is not None and self.log.exists() else ""


def make_hosts() -> tuple[Host, Host]:
    state = Path(env("NETNS_STATE"))
    return (
        Host("h1", env("NETNS_H1"), "203.0.113.11", "203.0.113.53", state / "mail-h1"),
        Host("h2", env("NETNS_H2"), "203.0.113.12", "203.0.113.54", state / "mail-h2"),
    )


def admin(ns: str, *args: str) -> str:
    """Run the mmgun admin command in namespace C{ns}; its output."""
    root = env("NETNS_ROOT")
    done = subprocess.run(
        ["ip", "netns", "exec", ns, f"{root}/.venv/bin/mmgun", *args],
        capture_output=True, text=True, timeout=60, cwd=root,
    )  # fmt: skip
    if done.returncode != 0:
        raise AssertionError(f"mmgun {' '.join(args[:2])} failed ({done.returncode}): {done.stdout}{done.stderr}")
    return done.stdout


def make_key(ns: str, database: str, client: str) -> str:
    admin(ns, "clients", "add", "--database", database, client)
    out = admin(ns, "keys", "create", "--database", database, client)
    match = re.search(r"^key:\s+(mmk_\S+)$", out, re.M)
    if match is None:
        raise AssertionError(f"no key in the output of mmgun keys create: {out!r}")
    return match.group(1)


# ---- HTTP ----------------------------------------------------------------------------------


def request(
    base: str, method: str, path: str, body: dict[str, Any] | None = None, *,
    key: str | None = None, headers: dict[str, str] | None = None, timeout: float = 10,
) -> tuple[int | None, Any]:  # fmt: skip
    """One HTTP request on a connection of its own: (status, parsed JSON or text), (None, error) if none came."""
    host = base.removeprefix("http://")
    conn = http.client.HTTPConnection(host, timeout=timeout)
    sent = dict(headers or {})
    if key is not None:
        sent["Authorization"] = f"Bearer {key}"
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        sent["Content-Type"] = "application/json"
    try:
        conn.request(method, path, data, sent)
        response = conn.getresponse()
        raw = response.read()
    except (OSError, http.client.HTTPException) as e:
        return None, f"{type(e).__name__}: {e}"
    finally:
        conn.close()
    try:
        return response.status, json.loads(raw)
    except ValueError:
        return response.status, raw.decode(errors="replace")


def message(token: str) -> dict[str, Any]:
    """The submission for C{token}: the token in the recipient's tag and in the Subject."""
    return {
        "sender": "lg@netns.test",
        "recipients": [f"slowdata+{token}@netns.test"],
        "subject": f"netns {token}",
        "body": f"token {token}\n",
    }


@dataclass
class Answer:
    token: str
    host: str
    status: int | None  # None: no answer (connection refused, reset, timed out)
    detail: Any
    began: float  # time.time(): comparable with the stubs' clock (the same machine's)
    ended: float


@dataclass
class Ack:
    token: str
    submission_id: str
    host: str
    at: float


@dataclass
class LoadGenerator:
    """
    Submits C{count} messages over the frontends, C{concurrency} at a time: token i goes to
    frontend i % 2 first; a token without a 200 goes to the other frontend next, with the same
    Idempotency-Key (the token), until it gets a 200 or C{seconds} have passed since the start.
    Nothing that got a 200 is sent again. Every answer is kept, with its times.
    """

    hosts: Sequence[Host]
    key: str
    tag: str
    count: int
    concurrency: int = 8
    seconds: float = 60.0
    timeout: float = 10.0
    acks: dict[str, Ack] = field(default_factory=dict)
    answers: list[Answer] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)

    def tokens(self) -> list[str]:
        return [f"{self.tag}-{i:04d}" for i in range(self.count)]

    def start(self) -> LoadGenerator:
        work: queue.SimpleQueue[tuple[int, str]] = queue.SimpleQueue()
        for i, token in enumerate(self.tokens()):
            work.put((i, token))
        deadline = time.monotonic() + self.seconds

        def worker() -> None:
            while True:
                try:
                    i, token = work.get_nowait()
                except queue.Empty:
                    return
                self._submit(i, token, deadline)

        self._threads = [threading.Thread(target=worker, daemon=True) for _ in range(self.concurrency)]
        for thread in self._threads:
            thread.start()
        return self

    def _submit(self, i: int, token: str, deadline: float) -> None:
        turn = i % len(self.hosts)
        while time.monotonic() < deadline:
            host = self.hosts[turn % len(self.hosts)]
            turn += 1
            began = time.time()
            status, detail = request(
                host.url, "POST", "/send", message(token), key=self.key,
                headers={"Idempotency-Key": token}, timeout=self.timeout,
            )  # fmt: skip
            ended = time.time()
            with self._lock:
                self.answers.append(Answer(token, host.name, status, detail, began, ended))
                if status == 200:
                    self.acks[token] = Ack(token, detail["submission_id"], host.name, ended)
                    return
            if turn % len(self.hosts) == i % len(self.hosts):
                # Both frontends refused it: a short pause before the next round (a poll, not a wait
                # for an event: the load generator is a client that retries).
                time.sleep(0.1)

    def done(self) -> bool:
        return not any(t.is_alive() for t in self._threads)

    def join(self, seconds: float) -> None:
        eventually("the load generator to finish", lambda: True if self.done() else None, seconds)


# ---- the maildirs ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Delivery:
    token: str
    host: str  # the mmgun host that delivered it: each has an MX (and a maildir) of its own
    at: float  # the stub's clock (epoch seconds), from the file's name
    path: Path


_SUBJECT = re.compile(rb"^Subject: netns (\S+)\r?$", re.M)


def deliveries(hosts: Iterable[Host], tag: str) -> list[Delivery]:
    """Every message of this scenario (tokens starting with C{tag}) the stubs accepted."""
    found = []
    for host in hosts:
        if not host.maildir.exists():
            continue
        for path in host.maildir.glob("*.eml"):
            match = _SUBJECT.search(path.read_bytes())
            if match is None:
                continue
            token = match.group(1).decode()
            if token.startswith(tag + "-"):
                nanos = int(path.name.split("-", 1)[0])
                found.append(Delivery(token, host.name, nanos / 1e9, path))
    return sorted(found, key=lambda d: d.at)


def by_token(found: Iterable[Delivery]) -> dict[str, list[Delivery]]:
    result: dict[str, list[Delivery]] = {}
    for d in found:
        result.setdefault(d.token, []).append(d)
    return result
