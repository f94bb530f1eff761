"""
End-to-end tests: mmgun as four twistd processes (frontend, sender, cleaner, webhooks) on
one SQLite file, a DNS stub serving zone.txt and two SMTP stubs (127.0.0.2, 127.0.0.3) that
write what they accept to one maildir each; the webhook test starts its own receiver
(webhookstub.py).

run.sh starts all of that and runs this file in a pytest session of its own:

    e2e-tests/run.sh                     # or: make e2e

It hands over what the tests need in E2E_* environment variables (see L{Run}). The tests
talk to mmgun over HTTP and with the operator's command (mmgun webhooks …), and read the
maildirs; they start and stop extra sender processes themselves, with run.sh's exact
command line, and restart the webhooks process with its own.

Every test tags its addresses with a fresh C{+tag}, so the maildirs can be shared (and the
SMTP stubs' per-address fault counters start from zero). Nothing waits a fixed time: every
wait polls, with a short pause between polls, until its condition holds or DEADLINE passes.
"""

from __future__ import annotations

import base64
import email
import email.policy
import hashlib
import hmac
import json
import os
import re
import signal
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any, TypeVar

import pytest
import pytest_twisted
import treq
from twisted.internet.defer import Deferred, DeferredSemaphore, gatherResults, succeed
from twisted.internet.task import deferLater
from twisted.web.client import HTTPConnectionPool
from twisted.web.http_headers import Headers

# run.sh's readiness poller, beside this file (pytest puts its folder on sys.path).
from waitfor import alive, free_port

from mmgun.clients import client_label

T = TypeVar("T")

#: The longest any one wait may take. Normal runs need a few seconds at most.
DEADLINE = 60.0
#: Pause between two polls.
POLL = 0.05
#: Requests in flight at once when a test sends or polls many submissions.
CONCURRENCY = 8

ROOT = Path(__file__).resolve().parent.parent


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


# -- the run: what run.sh started ---------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """What run.sh hands over, from the E2E_* environment variables."""

    #: Base URL of the frontend (E2E_URL).
    url: str
    #: Two accepted client ids (E2E_CLIENT, E2E_OTHER_CLIENT).
    client: str
    other_client: str
    #: A third, whose events only the webhook test makes (E2E_WEBHOOK_CLIENT).
    webhook_client: str
    #: The maildir of each SMTP stub, by its address (E2E_MAILDIR_A, E2E_MAILDIR_B).
    maildirs: dict[str, Path]
    #: The PID of the sender run.sh started (in the file E2E_SENDER_PIDFILE).
    sender_pid: int
    #: That sender's command line (NUL-separated in the file E2E_SENDER_ARGV).
    sender_argv: list[str]
    #: The PID of run.sh's --role webhooks process (in the file E2E_WEBHOOKS_PIDFILE).
    webhooks_pid: int
    #: Its command line (NUL-separated in the file E2E_WEBHOOKS_ARGV).
    webhooks_argv: list[str]
    #: The folder of the run's database, port files and maildirs (E2E_STATE).
    state: Path
    #: Where the tests list the PIDs of processes they started and have not stopped yet
    #: (E2E_TEST_PIDS), so that run.sh stops them if a test could not.
    test_pids: Path
    #: The folder of the processes' logs (E2E_LOGS).
    logs: Path

    @classmethod
    def from_environment(cls) -> Run:
        env = os.environ
        if "E2E_URL" not in env:
            pytest.exit("run the end-to-end tests with e2e-tests/run.sh (or make e2e)", returncode=2)

        def argv(name: str) -> list[str]:
            return [os.fsdecode(arg) for arg in Path(env[name]).read_bytes().split(b"\0")[:-1]]

        return cls(
            url=env["E2E_URL"],
            client=env["E2E_CLIENT"],
            other_client=env["E2E_OTHER_CLIENT"],
            webhook_client=env["E2E_WEBHOOK_CLIENT"],
            maildirs={"127.0.0.2": Path(env["E2E_MAILDIR_A"]), "127.0.0.3": Path(env["E2E_MAILDIR_B"])},
            sender_pid=int(Path(env["E2E_SENDER_PIDFILE"]).read_text()),
            sender_argv=argv("E2E_SENDER_ARGV"),
            webhooks_pid=int(Path(env["E2E_WEBHOOKS_PIDFILE"]).read_text()),
            webhooks_argv=argv("E2E_WEBHOOKS_ARGV"),
            state=Path(env["E2E_STATE"]),
            test_pids=Path(env["E2E_TEST_PIDS"]),
            logs=Path(env["E2E_LOGS"]),
        )


# -- waiting ---------------------------------------------------------------------------------


class Deadline:
    """One overall time limit shared by the polls of one wait."""

    def __init__(self, seconds: float = DEADLINE) -> None:
        self.seconds = seconds
        self.end = _reactor().seconds() + seconds

    def passed(self) -> bool:
        return _reactor().seconds() > self.end


async def pause() -> None:
    await deferLater(_reactor(), POLL, lambda: None)


async def eventually(what: str, probe: Callable[[], Awaitable[T | None]], deadline: Deadline | None = None) -> T:
    """Poll C{probe} until it returns something other than None; fail after the deadline."""
    deadline = deadline or Deadline()
    while True:
        result = await probe()
        if result is not None:
            return result
        if deadline.passed():
            pytest.fail(f"timed out after {deadline.seconds:g}s waiting for {what}")
        await pause()


# -- HTTP --------------------------------------------------------------------------------------


class API:
    """The two endpoints, over one pool of persistent connections, as one client (default: the first)."""

    def __init__(self, run: Run, client: str | None = None, pool: HTTPConnectionPool | None = None) -> None:
        self.run = run
        self.client = client or run.client
        if pool is None:
            pool = HTTPConnectionPool(_reactor(), persistent=True)
            pool.maxPersistentPerHost = CONCURRENCY
            pool.retryAutomatically = False
        self.pool = pool

    def as_client(self, client: str) -> API:
        """The same endpoints, over the same connections, as another client."""
        return API(self.run, client, self.pool)

    async def post(self, path: str, document: dict[str, Any]) -> tuple[int, bytes]:
        response = await treq.post(
            self.run.url + path,
            data=json.dumps(document).encode("utf-8"),
            headers=Headers({b"Content-Type": [b"application/json"]}),
            pool=self.pool,
            timeout=10,
        )
        return response.code, await response.content()

    async def post_json(self, path: str, document: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        code, body = await self.post(path, document)
        return code, json.loads(body)

    async def send(self, sender: str, recipients: Sequence[str], subject: str = "e2e", body: str = "hello\n") -> str:
        """Queue one message as this client; return its submission id."""
        code, answer = await self.post_json(
            "/send",
            {
                "client_id": self.client,
                "sender": sender,
                "recipients": list(recipients),
                "subject": subject,
                "body": body,
            },
        )
        assert (code, answer.get("result")) == (200, "queued"), (code, answer)
        return str(answer["submission_id"])

    async def send_many(self, messages: Iterable[tuple[str, Sequence[str]]]) -> list[str]:
        """Queue (sender, recipients) messages, a few requests at a time; ids in the same order."""
        limit = DeferredSemaphore(CONCURRENCY)
        return list(
            await gatherResults(
                [limit.run(self.send, s, r) for s, r in messages],
                consumeErrors=True,
            )
        )

    async def status(self, submission_id: str) -> dict[str, Any]:
        code, answer = await self.post_json(
            "/status", {"client_id": self.client, "submission_id": submission_id}
        )
        assert code == 200, (code, answer)
        return answer

    async def statuses(self, submission_ids: Sequence[str]) -> list[dict[str, Any]]:
        """The current status of each submission, a few requests at a time."""
        limit = DeferredSemaphore(CONCURRENCY)
        return list(
            await gatherResults(
                [limit.run(self.status, i) for i in submission_ids],
                consumeErrors=True,
            )
        )

    async def final_status(self, submission_id: str, deadline: Deadline | None = None) -> dict[str, Any]:
        """The status once the submission is finished (not C{queued} any more)."""

        async def finished() -> dict[str, Any] | None:
            answer = await self.status(submission_id)
            return answer if answer["status"] != "queued" else None

        return await eventually(f"submission {submission_id} to finish", finished, deadline)

    async def final_statuses(self, submission_ids: Sequence[str]) -> list[dict[str, Any]]:
        """Every submission's final status, under one deadline."""
        deadline = Deadline()
        return [await self.final_status(i, deadline) for i in submission_ids]


# -- maildirs --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mail:
    """One message an SMTP stub accepted: one file of its maildir."""

    path: Path
    #: The stub that accepted it (127.0.0.2 or 127.0.0.3).
    mx: str
    mail_from: str
    recipients: tuple[str, ...]
    message: EmailMessage


def _angle(value: str) -> str:
    assert value.startswith("<") and value.endswith(">"), value
    return value[1:-1]


def read_mail(mx: str, path: Path) -> Mail:
    message = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return Mail(
        path=path,
        mx=mx,
        mail_from=_angle(str(message["X-Envelope-From"])),
        recipients=tuple(_angle(str(v)) for v in message.get_all("X-Envelope-To", [])),
        message=message,
    )


def mail_files(run: Run, mx: str) -> list[Path]:
    return sorted(run.maildirs[mx].glob("*.eml"))


def tagged(run: Run, tag: str, mx: str | None = None) -> list[Mail]:
    """Every accepted message with a recipient carrying C{tag}, at one stub or at both."""
    found = []
    for host in [mx] if mx else sorted(run.maildirs):
        for path in mail_files(run, host):
            # The envelope lines come first: a cheap filter before parsing.
            if f"+{tag}@".encode() in path.read_bytes().split(b"\r\n\r\n", 1)[0]:
                found.append(read_mail(host, path))
    return found


def recipient_counts(mails: Iterable[Mail]) -> Counter[str]:
    return Counter(r for mail in mails for r in mail.recipients)


def envelopes(mails: Iterable[Mail]) -> list[tuple[str, str, tuple[str, ...]]]:
    return sorted((m.mx, m.mail_from, m.recipients) for m in mails)


# -- processes -------------------------------------------------------------------------------


@dataclass
class Senders:
    """
    The sender processes: run.sh's and those the tests start (with the same command line);
    and the other processes the tests start (L{spawn}: a webhook receiver, a webhooks role).

    A test that needs a quiet queue stops all the senders; a test that starts a process also
    stops it, else the session's end does.
    """

    run: Run
    #: Sender processes running now: PID → the Popen if a test started it.
    running: dict[int, subprocess.Popen[bytes] | None] = field(default_factory=dict)
    #: Other processes a test started, running now: PID → its Popen.
    others: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.running[self.run.sender_pid] = None

    def start(self, name: str, *options: str) -> int:
        """Start one more sender (run.sh's command line, then C{options}), logging to logs/NAME.log; return its PID."""
        process = self._popen(name, [*self.run.sender_argv, *options])
        self.running[process.pid] = process
        self._save()
        return process.pid

    def spawn(self, name: str, argv: Sequence[str]) -> int:
        """Start another process (not a sender: L{stop_all} leaves it), logging to logs/NAME.log; return its PID."""
        process = self._popen(name, argv)
        self.others[process.pid] = process
        self._save()
        return process.pid

    def _popen(self, name: str, argv: Sequence[str]) -> subprocess.Popen[bytes]:
        with open(self.run.logs / f"{name}.log", "ab") as log:
            return subprocess.Popen(list(argv), cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)

    async def stop(self, pid: int, sig: signal.Signals = signal.SIGTERM) -> None:
        """Send C{sig} to a process (a sender, or one run.sh or L{spawn} started) and wait until it has exited."""
        process = self.running.pop(pid, None) or self.others.pop(pid, None)
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

        async def gone() -> bool | None:
            if process is not None:
                return True if process.poll() is not None else None
            return True if not alive(pid) else None

        await eventually(f"process {pid} to exit after {sig.name}", gone)
        self._save()

    async def stop_all(self) -> None:
        for pid in list(self.running):
            await self.stop(pid)

    def _save(self) -> None:
        started = [pid for pid, process in self.running.items() if process is not None] + list(self.others)
        self.run.test_pids.write_text("".join(f"{pid}\n" for pid in started))


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def run() -> Run:
    return Run.from_environment()


@pytest.fixture(scope="session")
def api(run: Run) -> Iterable[API]:
    api = API(run)
    yield api
    pytest_twisted.blockon(api.pool.closeCachedConnections())


@pytest.fixture(scope="session")
def senders(run: Run) -> Iterable[Senders]:
    senders = Senders(run)
    yield senders
    started = [pid for pid, process in senders.running.items() if process is not None] + list(senders.others)
    for pid in started:
        pytest_twisted.blockon(Deferred.fromCoroutine(senders.stop(pid)))


@pytest.fixture
def tag() -> str:
    """A fresh tag for this test's addresses: local+TAG@domain."""
    return uuid.uuid4().hex[:10]


# -- delivery ----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_one_envelope_per_domain_at_its_mx(run: Run, api: API, tag: str) -> None:
    """Recipients are grouped by domain; each group goes to its domain's MX with one envelope."""
    sender = f"from+{tag}@example.test"
    recipients = [f"a+{tag}@alpha.test", f"b+{tag}@beta.test", f"c+{tag}@alpha.test", f"d+{tag}@amx.test"]
    status = await api.final_status(await api.send(sender, recipients))

    assert status["status"] == "sent", status
    for r in status["recipients"]:
        assert (r["status"], r["attempts"], r["last_reply"][:4]) == ("sent", 1, "250 "), r
    assert envelopes(tagged(run, tag)) == [
        ("127.0.0.2", sender, (f"a+{tag}@alpha.test", f"c+{tag}@alpha.test")),
        ("127.0.0.3", sender, (f"b+{tag}@beta.test",)),
        # amx.test has no MX record: its A record is the implicit MX.
        ("127.0.0.3", sender, (f"d+{tag}@amx.test",)),
    ]


@pytest_twisted.ensureDeferred
async def test_dead_first_mx_falls_back_to_the_second(run: Run, api: API, tag: str) -> None:
    """gamma.test's preferred MX (127.0.0.9) refuses connections; its backup (127.0.0.2) gets the mail."""
    status = await api.final_status(await api.send(f"from+{tag}@example.test", [f"g+{tag}@gamma.test"]))

    assert status["status"] == "sent", status
    assert [(r["status"], r["attempts"]) for r in status["recipients"]] == [("sent", 1)]
    assert envelopes(tagged(run, tag)) == [("127.0.0.2", f"from+{tag}@example.test", (f"g+{tag}@gamma.test",))]


#: Every line-break flavour, dots, "From ", trailing blanks, "=", long lines, control
#: characters, non-BMP and other Unicode line separators; and no final line break.
BODY = (
    "Grüße aus München!\r\n"
    ".\n"
    "..two dots\r"
    "From the start of a line\n"
    "\n\n"
    "trailing blanks \t \r\n"
    "equals = sign =\n"
    "=3D is not an escape here\n"
    + "long line " * 30
    + "\n"
    + "ünïcödé " * 20
    + "\n"
    "control \x01\x07\x0b\x0c\x1b\x7f and NEL \x85 LS \u2028 PS \u2029 BOM \ufeff\n"
    "snow ☃ emoji 🙂📬 CJK 日本語 RTL עברית\r\n"
    "no final line break"
)
SUBJECT = "Grüße — ☃ 🙂 " + "a subject long enough to be folded " * 3 + "=?utf-8?q?not-encoded?="


def expected_body(body: str) -> bytes:
    """What the README promises: line breaks become CRLF, and the body ends with one."""
    text = body.replace("\r\n", "\n").replace("\r", "\n")
    if not text.endswith("\n"):
        text += "\n"
    return text.replace("\n", "\r\n").encode("utf-8")


@pytest_twisted.ensureDeferred
async def test_body_and_subject_arrive_exactly(run: Run, api: API, tag: str) -> None:
    """Every byte of the body (normalized to CRLF) and the decoded Subject reach both MXs."""
    sender = f"from+{tag}@example.test"
    recipients = [f"text+{tag}@alpha.test", f"text+{tag}@beta.test"]
    status = await api.final_status(await api.send(sender, recipients, subject=SUBJECT, body=BODY))
    assert status["status"] == "sent", status

    mails = tagged(run, tag)
    assert sorted(m.mx for m in mails) == ["127.0.0.2", "127.0.0.3"]
    for mail in mails:
        message = mail.message
        assert message["Subject"] == SUBJECT
        assert message["From"] == sender
        assert message.get_content_type() == "text/plain"
        assert message.get_content_charset() == "utf-8"
        assert message["Content-Transfer-Encoding"] == "quoted-printable"
        assert message.get_payload(decode=True) == expected_body(BODY)
        assert message.get_content() == expected_body(BODY).decode("utf-8")


@pytest_twisted.ensureDeferred
async def test_faults_end_the_submission_partial(run: Run, api: API, tag: str) -> None:
    """
    tempfail-2@ is refused with 451 twice, then delivered on the third attempt; reject@ gets a
    550 and the null MX domain a 556: both fail at once, with the peer's (or DNS's) reply.
    """
    sender = f"from+{tag}@example.test"
    ok, tempfail, reject, nullmx = (
        f"ok+{tag}@alpha.test",
        f"tempfail-2+{tag}@alpha.test",
        f"reject+{tag}@alpha.test",
        f"x+{tag}@nullmx.test",
    )
    status = await api.final_status(await api.send(sender, [ok, tempfail, reject, nullmx]))

    assert status["status"] == "partial", status
    by_address = {r["address"]: r for r in status["recipients"]}
    assert [r["address"] for r in status["recipients"]] == [ok, tempfail, reject, nullmx]
    assert (by_address[ok]["status"], by_address[ok]["attempts"]) == ("sent", 1)
    assert (by_address[tempfail]["status"], by_address[tempfail]["attempts"]) == ("sent", 3)
    assert by_address[tempfail]["last_reply"].startswith("250 ")
    assert (by_address[reject]["status"], by_address[reject]["attempts"]) == ("failed", 1)
    assert by_address[reject]["last_reply"] == "550 5.1.1 no such user"
    assert (by_address[nullmx]["status"], by_address[nullmx]["attempts"]) == ("failed", 1)
    assert by_address[nullmx]["last_reply"].startswith("556 "), by_address[nullmx]
    assert envelopes(tagged(run, tag)) == [("127.0.0.2", sender, (ok,)), ("127.0.0.2", sender, (tempfail,))]


# -- the API's access rules --------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_unknown_client_gets_401(api: API, tag: str) -> None:
    send: dict[str, Any] = {"sender": "a@example.test", "recipients": [f"a+{tag}@alpha.test"], "subject": "s", "body": "b"}
    documents: list[dict[str, Any]] = [
        {"client_id": "not-a-client-0123456789", **send},
        send,
        {"client_id": "not-a-client-0123456789", "submission_id": uuid.uuid4().hex},
    ]
    for document in documents:
        path = "/send" if "sender" in document else "/status"
        code, answer = await api.post_json(path, document)
        assert (code, answer["result"]) == (401, "error"), (path, document, answer)


@pytest_twisted.ensureDeferred
async def test_another_clients_submission_is_like_an_unknown_id(run: Run, api: API, tag: str) -> None:
    """Asking for someone else's submission leaks nothing: the answer is that of an unknown id."""
    submission_id = await api.send(f"from+{tag}@example.test", [f"own+{tag}@alpha.test"])
    mine = await api.post("/status", {"client_id": run.client, "submission_id": submission_id})
    theirs = await api.post("/status", {"client_id": run.other_client, "submission_id": submission_id})
    unknown = await api.post("/status", {"client_id": run.other_client, "submission_id": uuid.uuid4().hex})

    assert mine[0] == 200
    assert theirs[0] == 404
    assert theirs == unknown
    await api.final_status(submission_id)


# -- several senders, and a crash -------------------------------------------------------------


def mentions(log: Path, tag: str) -> int:
    """How many lines of a sender's log mention one of the test's addresses."""
    needle = f"+{tag}@"
    with open(log, encoding="utf-8", errors="replace") as f:
        return sum(needle in line for line in f)


@pytest_twisted.ensureDeferred
async def test_second_sender_started_mid_run_delivers_nothing_twice(
    run: Run, api: API, senders: Senders, tag: str, report: Callable[[str], None]
) -> None:
    """
    A second sender process joins while mail keeps arriving: both deliver some of it (their
    leases keep them apart) and every recipient gets exactly one copy.
    """
    sender = f"from+{tag}@example.test"
    counter = iter(range(1_000_000))

    def batch(size: int) -> list[tuple[str, list[str]]]:
        return [
            (sender, [f"m{n}+{tag}@alpha.test", f"m{n}+{tag}@beta.test"])
            for n in (next(counter) for _ in range(size))
        ]

    # A first batch, delivered by run.sh's sender alone.
    ids = await api.send_many(batch(20))
    await api.final_statuses(ids)
    second_log = run.logs / "sender-second.log"
    second = senders.start("sender-second")

    # twistd logs the reactor class just before it starts the reactor, and with it the sender.
    async def second_started() -> bool | None:
        return True if second_log.exists() and "reactor class" in second_log.read_text() else None

    await eventually("the second sender to start", second_started)

    # Keep mail coming until the second sender has delivered some of it.
    async def second_delivered() -> bool | None:
        ids.extend(await api.send_many(batch(5)))
        return True if second_log.exists() and mentions(second_log, tag) > 0 else None

    await eventually("the second sender to deliver", second_delivered)
    ids.extend(await api.send_many(batch(20)))
    statuses = await api.final_statuses(ids)
    await senders.stop(second)

    assert {s["status"] for s in statuses} == {"sent"}
    expected = {r["address"] for s in statuses for r in s["recipients"]}
    counts = recipient_counts(tagged(run, tag))
    report(
        f"{len(ids)} submissions, {len(expected)} recipients; sender log lines about them: "
        f"first {mentions(run.logs / 'sender.log', tag)}, second {mentions(second_log, tag)}"
    )
    assert set(counts) == expected
    assert {a: n for a, n in counts.items() if n != 1} == {}
    assert all(r["attempts"] == 1 for s in statuses for r in s["recipients"])


BATCH = 200
#: The README's duplicate window is the milliseconds between the MX's 250 and the commit
#: of that result: at most about one message per SMTP session in flight (the batch goes
#: over two sessions of 100), with room for a slow commit.
WINDOW_LIMIT = 10
#: The senders these tests kill and restart hold their leases this long (run.sh's: 3 s), so
#: that "resumed at once" and "resumed when the lease ran out" cannot be mistaken.
LONG_LEASE = 30.0
#: A restarted sender must have finished the batch well within one lease: the rest of the
#: batch takes about 5 s to deliver (slowdata@, 50 ms a message, two sessions).
RESUME_LIMIT = LONG_LEASE / 2


def started(log: Path) -> Callable[[], Awaitable[bool | None]]:
    """twistd logs the reactor class just before it starts the reactor, and with it the sender."""

    async def probe() -> bool | None:
        return True if log.exists() and "reactor class" in log.read_text(errors="replace") else None

    return probe


@pytest_twisted.ensureDeferred
async def test_kill_9_mid_batch_loses_nothing(
    run: Run, api: API, senders: Senders, tag: str, report: Callable[[str], None]
) -> None:
    """
    issue 11 item 5: kill -9 of the sender in the middle of a batch of 200 messages, then
    the same sender (same --sender-id) restarted at once: it takes back its envelopes without
    waiting for their leases (30 s here), every message arrives, and the only ones that arrive
    twice are those whose 250 the MX had given when the sender died but whose result was not
    committed yet (README: "the one duplicate window").

    The batch is queued while no sender runs, so that one sender claims all of it; slowdata@
    recipients are accepted 50 ms after their data (run.sh: --slow-seconds 0.05), so the batch
    takes seconds and the kill lands in its middle.
    """
    await senders.stop_all()
    sender = f"from+{tag}@example.test"
    addresses = [f"slowdata+n{i}-{tag}@beta.test" for i in range(BATCH)]
    ids = await api.send_many((sender, [a]) for a in addresses)
    options = ("--sender-id", f"e2e-kill-{tag}", "--lease-time", f"{LONG_LEASE:g}s")

    clock = _reactor()
    began = clock.seconds()
    doomed = senders.start("sender-killed", *options)

    async def some_arrived() -> int | None:
        count = len(tagged(run, tag, "127.0.0.3"))
        return count if count >= 20 else None

    await eventually("the first messages of the batch to arrive", some_arrived)
    await senders.stop(doomed, signal.SIGKILL)
    killed = clock.seconds()

    # The killed sender's state, frozen until its leases run out (or its identity comes back).
    at_kill = await api.statuses(ids)
    committed = {s["recipients"][0]["address"] for s in at_kill if s["status"] == "sent"}
    arrived = set(recipient_counts(tagged(run, tag)))
    window = arrived - committed
    report(
        f"kill -9 after {len(arrived)} of {BATCH} messages had arrived, {len(committed)} of them "
        f"committed as sent: {len(window)} in the duplicate window"
    )
    assert len(arrived) < BATCH, "the whole batch was delivered before the kill"
    assert committed <= arrived, f"committed as sent but never arrived: {sorted(committed - arrived)}"

    restarted = clock.seconds()
    log = run.logs / "sender-restarted.log"
    senders.start("sender-restarted", *options)
    statuses = await api.final_statuses(ids)
    resumed = clock.seconds() - restarted
    report(
        f"killed {killed - began:.1f}s after the start of its sender; all sent {resumed:.1f}s after "
        f"the restart under the same --sender-id (lease: {LONG_LEASE:g}s)"
    )

    assert {s["status"] for s in statuses} == {"sent"}
    assert resumed < RESUME_LIMIT, f"the restarted sender needed {resumed:.1f}s: it waited for the leases"
    assert "took back" in log.read_text(errors="replace")
    counts = recipient_counts(tagged(run, tag))
    lost = set(addresses) - set(counts)
    duplicates = {a for a, n in counts.items() if n > 1}
    report(f"after the restart: {len(counts)} of {BATCH} arrived, {len(duplicates)} of them twice")
    assert not lost, f"{len(lost)} messages lost: {sorted(lost)[:10]}"
    assert set(counts) == set(addresses)
    assert max(counts.values()) <= 2, counts.most_common(3)
    assert duplicates == window
    # Each result is committed the moment the MX answers, so the window holds at most
    # the messages whose commit was under way when the sender died.
    assert len(window) <= WINDOW_LIMIT, f"{len(window)} duplicates after kill -9 (more than {WINDOW_LIMIT})"


@pytest_twisted.ensureDeferred
async def test_two_senders_with_one_identity_deliver_nothing_twice(
    run: Run, api: API, senders: Senders, tag: str, report: Callable[[str], None]
) -> None:
    """
    issue 11 item 5: a second sender started by mistake with the --sender-id of one that is
    mid-batch must not take back that one's envelopes (it is alive): it warns and runs under
    a fresh identity, and every message arrives exactly once.
    """
    await senders.stop_all()
    sender = f"from+{tag}@example.test"
    addresses = [f"slowdata+n{i}-{tag}@beta.test" for i in range(BATCH)]
    ids = await api.send_many((sender, [a]) for a in addresses)
    options = ("--sender-id", f"e2e-twin-{tag}", "--lease-time", f"{LONG_LEASE:g}s")
    first = senders.start("sender-twin-1", *options)

    async def some_arrived() -> int | None:
        count = len(tagged(run, tag, "127.0.0.3"))
        return count if count >= 20 else None

    await eventually("the first messages of the batch to arrive", some_arrived)
    second_log = run.logs / "sender-twin-2.log"
    second = senders.start("sender-twin-2", *options)
    await eventually("the second sender to start", started(second_log))
    # More mail, for both of them.
    more = [f"m{i}+{tag}@alpha.test" for i in range(40)]
    ids += await api.send_many((sender, [a]) for a in more)
    statuses = await api.final_statuses(ids)
    await senders.stop(second)
    await senders.stop(first)

    assert "held by another running process" in second_log.read_text(errors="replace")
    assert {s["status"] for s in statuses} == {"sent"}
    counts = recipient_counts(tagged(run, tag))
    report(
        f"{len(ids)} messages, two senders with one --sender-id: "
        f"{sum(1 for n in counts.values() if n > 1)} delivered twice; second sender's log lines about them: "
        f"{mentions(second_log, tag)}"
    )
    assert set(counts) == set(addresses) | set(more)
    assert {a: n for a, n in counts.items() if n != 1} == {}
    assert all(r["attempts"] == 1 for s in statuses for r in s["recipients"])


# -- webhooks ------------------------------------------------------------------------------------

#: Messages of the webhook test, one recipient each: every tenth is refused (550: a
#: permanent_fail event), every tenth but five is greylisted once (a temporary_fail event,
#: then a delivered one), the others are delivered.
WEBHOOK_MESSAGES = 30
#: The receiver answers each POST this long after it arrived: with mmgun's 4 POSTs at a time
#: per receiver, the retries take about 2 s, so the kill -9 lands while some are in flight.
WEBHOOK_ANSWER_SECONDS = 0.2
#: POSTs the receiver must have seen before the kill.
WEBHOOK_KILL_AFTER = 8
#: The restarted webhooks process must have POSTed everything well before run.sh's
#: --lease-time of 3 s had run out five times (the dispatcher's old fixed lease was 30 s).
WEBHOOK_RESUME_LIMIT = 15.0
#: The events POSTed twice after the kill -9: at most those in flight (4 per receiver) and
#: those answered whose outcome was not committed yet, with room for a slow commit.
WEBHOOK_DUPLICATE_LIMIT = 8


async def mmgun_admin(run: Run, *args: str) -> str:
    """Run the operator's command (``mmgun ARGS --database <the run's>``); its stdout, failing on an error."""
    from twisted.internet.utils import getProcessOutputAndValue

    database = run.sender_argv[run.sender_argv.index("--database") + 1]
    command = str(ROOT / ".venv" / "bin" / "mmgun")
    out, err, code = await getProcessOutputAndValue(command, [*args, "--database", database], env=dict(os.environ), path=str(ROOT))
    assert code == 0, (args, code, err.decode(errors="replace"))
    return out.decode()


def mailgun_signature_ok(key: str, signature: dict[str, str]) -> bool:
    """Mailgun's rule, written here from its documentation: hex HMAC-SHA256 of timestamp + token under the key."""
    expected = hmac.new(key.encode(), (signature["timestamp"] + signature["token"]).encode(), hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, signature["signature"])


def received(path: Path) -> list[dict[str, Any]]:
    """The receiver's records so far (a line being written is not one yet)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines(keepends=True) if line.endswith("\n")]


def expected_events(statuses: Iterable[dict[str, Any]]) -> Counter[tuple[str, str, str | None]]:
    """What each recipient's final status says the webhook must have received: (recipient, event, severity)."""
    expected: Counter[tuple[str, str, str | None]] = Counter()
    for status in statuses:
        for r in status["recipients"]:
            expected[(r["address"], "failed", "temporary")] += r["attempts"] - 1
            final = ("delivered", None) if r["status"] == "sent" else ("failed", "permanent")
            expected[(r["address"], *final)] += 1
    return +expected


@pytest_twisted.ensureDeferred
async def test_webhooks_survive_receiver_outage_and_kill_9(
    run: Run, api: API, senders: Senders, tag: str, report: Callable[[str], None]
) -> None:
    """
    issue 14 (Proof: "retries across a receiver outage and across a mmgun restart"): a
    webhook's events are made while its receiver is down (port closed) and wait in the
    store; the receiver comes back and ``mmgun webhooks flush`` makes them due now (not in
    Mailgun's 5 minutes); the --role webhooks process is killed -9 while those POSTs are in
    flight and restarted with its command line. The receiver gets every event at least once,
    each body signed with the key ``mmgun webhooks add`` printed (checked with Mailgun's rule,
    written here), with the URL's password as Basic authentication; the only events it gets
    twice are some of those that had reached it before the kill.
    """
    port = free_port()
    password = uuid.uuid4().hex
    url = f"http://e2e:{password}@127.0.0.1:{port}/hook/{tag}"
    # Inside mmgun a clients-file client is known by its label, never by its (secret) id.
    added = await mmgun_admin(run, "webhooks", "add", "--client", client_label(run.webhook_client), "--url", url)
    hook_id = re.search(r"^added webhook (wh-[0-9a-f]+) ", added, re.MULTILINE)
    key = re.search(r"^[0-9a-f]{64}$", added, re.MULTILINE)
    assert hook_id and key, "mmgun webhooks add printed no webhook id or no new signing key"
    assert password not in added
    # For scan-logs.py: neither may ever be in a log.
    with open(run.state / "secrets", "a") as secrets_file:
        secrets_file.write(f"{key[0]}\n{password}\n")
    receiver_url = f"http://127.0.0.1:{port}"
    webhooks_log = run.logs / "webhooks.log"
    if not senders.running:  # an earlier test stopped them
        senders.start("sender-webhooks")

    # The outage: nothing listens on the port.
    sender = f"from+{tag}@example.test"

    def address(i: int) -> str:
        local = "reject" if i % 10 == 0 else "tempfail-1" if i % 10 == 5 else "ok"
        return f"{local}+n{i}-{tag}@alpha.test"

    # The webhook client's own mail: no other test's events go to its webhook.
    hooks_api = api.as_client(run.webhook_client)
    ids = await hooks_api.send_many((sender, [address(i)]) for i in range(WEBHOOK_MESSAGES))
    statuses = await hooks_api.final_statuses(ids)
    expected = expected_events(statuses)
    total = sum(expected.values())

    not_delivered = re.compile(
        rf"webhook {hook_id[1]} to {re.escape(receiver_url)}: (\d+) of (\d+) events not delivered"
    )

    async def all_refused() -> int | None:
        failed = sum(int(m[0]) for m in not_delivered.findall(webhooks_log.read_text(errors="replace")))
        return failed if failed >= total else None

    refused = await eventually(f"the webhook's {total} POSTs to fail (receiver down)", all_refused)
    assert refused == total, f"{refused} POSTs failed, {total} events expected"

    # The receiver comes back; the waiting events are made due now.
    record = run.state / f"webhooks-{tag}.jsonl"
    port_file = run.state / f"webhookstub-{tag}.port"
    receiver = senders.spawn(
        "webhookstub",
        [sys.executable, str(ROOT / "e2e-tests" / "webhookstub.py"), "--listen", f"127.0.0.1:{port}",
         "--record", str(record), "--delay-seconds", f"{WEBHOOK_ANSWER_SECONDS:g}", "--port-file", str(port_file)],
    )
    await eventually("the webhook receiver to listen", lambda: succeed(True if port_file.exists() else None))
    assert received(record) == [], "the receiver got POSTs before the flush: the retries were due already"
    flushed = await mmgun_admin(run, "webhooks", "flush", hook_id[1])
    assert flushed == f"flushed {total} waiting webhook events: due now\n", flushed

    # kill -9 of the webhooks process while the retries are POSTed.
    async def some_received() -> int | None:
        count = len(received(record))
        return count if count >= WEBHOOK_KILL_AFTER else None

    await eventually("the first retried POSTs to arrive", some_received)
    await senders.stop(run.webhooks_pid, signal.SIGKILL)
    clock = _reactor()
    killed = clock.seconds()
    at_kill = {json.loads(r["body"])["event-data"]["id"] for r in received(record)}
    assert len(at_kill) < total, "every event was delivered before the kill"
    senders.spawn("webhooks-restarted", run.webhooks_argv)

    # Everything arrives; then nothing is left waiting (so nothing more will come).
    async def all_received() -> int | None:
        count = len({json.loads(r["body"])["event-data"]["id"] for r in received(record)})
        return count if count >= total else None

    await eventually("every event to reach the receiver", all_received)
    resumed = clock.seconds() - killed

    async def outbox_empty() -> bool | None:
        answer = await mmgun_admin(run, "webhooks", "flush", hook_id[1])
        return True if answer == "flushed 0 waiting webhook events: due now\n" else None

    await eventually("the webhook's retries to be finished", outbox_empty)
    records = received(record)
    await senders.stop(receiver)
    await mmgun_admin(run, "webhooks", "remove", hook_id[1])

    authorization = "Basic " + base64.b64encode(f"e2e:{password}".encode()).decode()
    tokens = set()
    by_id: dict[str, dict[str, Any]] = {}
    copies: Counter[str] = Counter()
    for r in records:
        assert (r["method"], r["path"], r["authorization"]) == ("POST", f"/hook/{tag}", authorization)
        body = json.loads(r["body"])
        assert mailgun_signature_ok(key[0], body["signature"]), body["signature"]
        assert re.fullmatch(r"[0-9a-f]{50}", body["signature"]["token"])
        tokens.add(body["signature"]["token"])
        data = body["event-data"]
        assert by_id.setdefault(data["id"], data) == data, "one event id, two different bodies"
        copies[data["id"]] += 1
    got = Counter((d["recipient"], d["event"], d.get("severity")) for d in by_id.values())
    duplicates = {i for i, n in copies.items() if n > 1}
    report(
        f"{WEBHOOK_MESSAGES} messages, {total} webhook events refused during the outage, flushed; "
        f"kill -9 after {len(at_kill)} had reached the receiver; all {len(by_id)} received "
        f"{resumed:.1f}s after the kill (--lease-time 3s), {len(duplicates)} of them twice"
    )
    assert resumed < WEBHOOK_RESUME_LIMIT, f"{resumed:.1f}s from the kill to the last event: the leases were not --lease-time's"
    assert len(tokens) == len(records), "a token was used twice"
    assert got == expected, f"missing: {expected - got}, unexpected: {got - expected}"
    assert max(copies.values()) <= 2, copies.most_common(3)
    assert duplicates <= at_kill, f"POSTed twice but not in flight at the kill: {sorted(duplicates - at_kill)}"
    assert len(duplicates) <= WEBHOOK_DUPLICATE_LIMIT, f"{len(duplicates)} events POSTed twice after the kill -9"
