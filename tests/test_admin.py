"""
The ``mmgun`` command on a real database: listing, flushing and deleting queued mail,
stats, the clients check, one-line errors; in-process through main() and as the installed
console script, also while another connection (the daemon) holds the database.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any
from unittest import SkipTest

import attrs
from twisted.trial.unittest import SynchronousTestCase

from mmgun.admin import main
from mmgun.store import ClaimedEnvelope, EnvelopeOutcome, NewSubmission, RecipientOutcome
from mmgun.store.sqlite import SQLiteStore, connect

from .helpers import CLIENT_LABEL, result

OTHER_LABEL = "c-0000111122223333"
#: 2027-01-15T08:00:00Z
T0 = 1_800_000_000.0
NOW = T0 + 300
MMGUN = os.path.join(os.path.dirname(sys.executable), "mmgun")


def iso(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(timestamp)) + f".{int(timestamp * 1000) % 1000:03d}Z"


@attrs.define
class Queue:
    """
    A database with one of everything, as of ``t0 + 300``:

    - s1 (CLIENT): envelope x (a sent, b deferred until t0+600) and envelope y (c failed, done);
    - s3 (CLIENT): envelope w, leased until t0+3610, never attempted (in delivery);
    - s4 (CLIENT): envelope v (f deferred until t0+900);
    - s2 (OTHER): envelope z (d1, d2), never attempted.
    """

    directory: str
    path: str
    store: SQLiteStore
    t0: float
    s1: NewSubmission
    s2: NewSubmission
    s3: NewSubmission
    s4: NewSubmission
    x: int
    y: int
    w: int
    v: int
    z: int


def new_submission(recipients: tuple[str, ...], at: float, client: str = CLIENT_LABEL) -> NewSubmission:
    return NewSubmission(uuid.uuid4().hex, client, "me@example.com", recipients, b"Subject: hi\r\n\r\nbody\r\n", at)


def make_store(case: SynchronousTestCase) -> tuple[str, str, SQLiteStore]:
    # tempfile rather than mktemp: the same files under trial and pytest, nothing left in the checkout.
    directory = tempfile.mkdtemp(prefix="mmgun-admin-")
    case.addCleanup(shutil.rmtree, directory, True)
    path = os.path.join(directory, "mmgun.sqlite3")
    store = SQLiteStore.open_sync(path)
    case.addCleanup(lambda: result(case, store.close()))
    return directory, path, store


def build_queue(case: SynchronousTestCase, t0: float = T0) -> Queue:
    directory, path, store = make_store(case)

    def add(recipients: tuple[str, ...], at: float, client: str = CLIENT_LABEL) -> NewSubmission:
        s = new_submission(recipients, at, client)
        result(case, store.add_submission(s))
        return s

    def claim(at: float, lease: float = 60.0) -> list[ClaimedEnvelope]:
        return result(case, store.claim("sender-1", at, lease, 10))

    s1 = add(("a@x.example", "b@x.example", "c@y.example"), t0)
    x, y = claim(t0)
    result(case, store.record([
        EnvelopeOutcome(x, (RecipientOutcome("a@x.example", "sent", "250 2.0.0 ok"), RecipientOutcome("b@x.example", "deferred", "451 4.7.1 greylisted")), t0 + 600),
        EnvelopeOutcome(y, (RecipientOutcome("c@y.example", "failed", "550 5.1.1 no such user"),)),
    ], t0 + 1))
    s3 = add(("e@w.example",), t0 + 10)
    (w,) = claim(t0 + 10, lease=3600)
    s4 = add(("f@v.example",), t0 + 20)
    (v,) = claim(t0 + 20)
    result(case, store.record([EnvelopeOutcome(v, (RecipientOutcome("f@v.example", "deferred", "421 4.3.0 try again"),), t0 + 900)], t0 + 21))
    s2 = add(("d1@z.example", "d2@z.example"), t0 + 60, OTHER_LABEL)
    return Queue(directory, path, store, t0, s1, s2, s3, s4, x.id, y.id, w.id, v.id, envelope_ids(path, s2.id)[0])


def envelope_ids(path: str, submission_id: str) -> list[int]:
    conn = sqlite3.connect(path)
    try:
        return [eid for (eid,) in conn.execute("SELECT id FROM envelopes WHERE submission_id = ? ORDER BY id", (submission_id,))]
    finally:
        conn.close()


def submission_row(path: str, submission_id: str) -> tuple[Any, ...]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("SELECT finished_at, message IS NULL FROM submissions WHERE id = ?", (submission_id,)).fetchone()
    finally:
        conn.close()


class AdminCase(SynchronousTestCase):
    """Runs main() in-process with an injected clock, environment and streams."""

    def admin(self, *args: str, now: float = NOW, environ: dict[str, str] | None = None) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        code = main(list(args), now=lambda: now, environ={} if environ is None else environ, stdout=out, stderr=err)
        return code, out.getvalue(), err.getvalue()

    def ok(self, *args: str, **kwargs: Any) -> str:
        code, out, err = self.admin(*args, **kwargs)
        self.assertEqual((code, err), (0, ""))
        return out

    def fails(self, *args: str, code: int = 1, **kwargs: Any) -> str:
        """Runs a command that must fail; returns its one stderr line."""
        got, out, err = self.admin(*args, **kwargs)
        self.assertEqual((got, out), (code, ""))
        self.assertEqual(len(err.splitlines()), 1, err)
        self.assertTrue(err.endswith("\n"))
        return err.strip()

    def listing(self, q: Queue, *args: str, now: float = NOW) -> dict[int, dict[str, Any]]:
        entries = json.loads(self.ok("queue", "--json", "--database", q.path, *args, now=now))
        return {e["envelope_id"]: e for e in entries}


class QueueListTests(AdminCase):
    def setUp(self) -> None:
        self.q = build_queue(self)

    def test_table_lists_unfinished_envelopes_oldest_first(self) -> None:
        lines = self.ok("queue", "--database", self.q.path).splitlines()
        self.assertEqual(lines[0].split()[:3], ["ENVELOPE", "SUBMISSION", "CLIENT"])
        self.assertEqual([int(line.split()[0]) for line in lines[1:-1]], [self.q.x, self.q.w, self.q.v, self.q.z])
        self.assertEqual(lines[-1], "-- 4 envelopes, 5 pending recipients, 1 in delivery")

    def test_table_row_shows_envelope_state(self) -> None:
        lines = self.ok("queue", "--database", self.q.path).splitlines()
        x = lines[1].split()
        self.assertEqual(x[:7], [str(self.q.x), self.q.s1.id, CLIENT_LABEL, "x.example", "deferred", "1", "2027-01-15T08:10:00Z"])
        self.assertEqual(" ".join(x[7:]), "b@x.example 451 4.7.1 greylisted")
        self.assertIn("d1@z.example, d2@z.example", lines[4])

    def test_table_columns_aligned(self) -> None:
        header, *rows, _ = self.ok("queue", "--database", self.q.path).splitlines()
        for row in rows:
            fields = row.split()
            self.assertEqual(len(row[: header.index("SUBMISSION")].rstrip()), len("ENVELOPE"))
            self.assertEqual(row.index(fields[1]), header.index("SUBMISSION"))
            self.assertEqual(row.index(fields[6], header.index("ATTEMPTS")), header.index("NEXT ATTEMPT"))

    def test_leased_envelope_shown_in_delivery(self) -> None:
        (line,) = [row for row in self.ok("queue", "--database", self.q.path).splitlines() if "w.example" in row]
        self.assertIn("  in delivery  ", line)
        w = self.listing(self.q)[self.q.w]
        self.assertEqual((w["leased"], w["status"], w["next_attempt"]), (True, "queued", iso(T0 + 3610)))

    def test_expired_lease_is_not_in_delivery(self) -> None:
        w = self.listing(self.q, now=T0 + 3610)[self.q.w]
        self.assertFalse(w["leased"])

    def test_json_has_every_field(self) -> None:
        self.assertEqual(self.listing(self.q)[self.q.x], {
            "envelope_id": self.q.x,
            "submission_id": self.q.s1.id,
            "client": CLIENT_LABEL,
            "domain": "x.example",
            "status": "deferred",
            "recipients": ["b@x.example"],
            "attempts": 1,
            "next_attempt": "2027-01-15T08:10:00.000Z",
            "leased": False,
            "last_reply": "451 4.7.1 greylisted",
            "created_at": "2027-01-15T08:00:00.000Z",
        })
        z = self.listing(self.q)[self.q.z]
        self.assertEqual((z["client"], z["recipients"], z["attempts"], z["last_reply"]), (OTHER_LABEL, ["d1@z.example", "d2@z.example"], 0, None))

    def test_status_filter(self) -> None:
        self.assertEqual(list(self.listing(self.q, "--status", "deferred")), [self.q.x, self.q.v])
        self.assertEqual(list(self.listing(self.q, "--status", "queued")), [self.q.w, self.q.z])

    def test_domain_filter_normalizes_the_domain(self) -> None:
        self.assertEqual(list(self.listing(self.q, "--domain", "X.Example.")), [self.q.x])
        result(self, self.q.store.add_submission(new_submission(("j@xn--mnchen-3ya.example",), T0)))
        (entry,) = self.listing(self.q, "--domain", "MÜNCHEN.example").values()
        self.assertEqual(entry["recipients"], ["j@xn--mnchen-3ya.example"])

    def test_filters_combine(self) -> None:
        self.assertEqual(self.listing(self.q, "--domain", "z.example", "--status", "deferred"), {})
        self.assertEqual(self.ok("queue", "--database", self.q.path, "--domain", "nowhere.example"), "no unfinished envelope matches\n")

    def test_latest_reply_among_pending_recipients(self) -> None:
        s = new_submission(("p@r.example", "q@r.example", "s@r.example"), T0 + 30)
        result(self, self.q.store.add_submission(s))
        (e,) = result(self, self.q.store.claim("s", T0 + 30, 60, 10))
        result(self, self.q.store.record([EnvelopeOutcome(e, (
            RecipientOutcome("p@r.example", "deferred", "450 mailbox busy"),
            RecipientOutcome("q@r.example", "sent", "250 ok"),
            RecipientOutcome("s@r.example", "deferred", "452 mailbox full"),
        ), T0 + 40)], T0 + 31))
        (e,) = result(self, self.q.store.claim("s", T0 + 40, 60, 10))
        result(self, self.q.store.record([EnvelopeOutcome(e, (RecipientOutcome("p@r.example", "deferred", "421 later"),), T0 + 400)], T0 + 41))
        entry = self.listing(self.q)[e.id]
        self.assertEqual((entry["recipients"], entry["attempts"], entry["last_reply"]), (["p@r.example", "s@r.example"], 2, "421 later"))

    def test_remote_reply_cannot_reach_the_terminal(self) -> None:
        s = new_submission(("t@evil.example",), T0 + 30)
        result(self, self.q.store.add_submission(s))
        (e,) = [e for e in result(self, self.q.store.claim("s", T0 + 30, 60, 10)) if e.submission_id == s.id]
        reply = "451-first\r\n451 \x1b[2Jsecond"
        result(self, self.q.store.record([EnvelopeOutcome(e, (RecipientOutcome("t@evil.example", "deferred", reply),), T0 + 400)], T0 + 31))
        (line,) = [row for row in self.ok("queue", "--database", self.q.path).splitlines() if "evil.example" in row]
        self.assertTrue(line.endswith("451-first 451 ?[2Jsecond"), line)
        self.assertEqual(self.listing(self.q)[e.id]["last_reply"], reply)

    def test_empty_queue(self) -> None:
        _, path, _ = make_store(self)
        self.assertEqual(self.ok("queue", "--database", path), "queue is empty\n")
        self.assertEqual(json.loads(self.ok("queue", "--json", "--database", path)), [])


class FlushTests(AdminCase):
    def setUp(self) -> None:
        self.q = build_queue(self)

    def next_attempts(self) -> dict[int, str]:
        return {eid: e["next_attempt"] for eid, e in self.listing(self.q).items()}

    def test_flush_all_makes_deferred_due_now(self) -> None:
        before = self.next_attempts()
        self.assertEqual(self.ok("queue", "flush", "--database", self.q.path), "flushed 2 deferred envelopes; 1 in delivery, left to the sender\n")
        after = self.next_attempts()
        self.assertEqual((after[self.q.x], after[self.q.v]), (iso(NOW), iso(NOW)))
        self.assertEqual((after[self.q.w], after[self.q.z]), (before[self.q.w], before[self.q.z]))
        claimed = result(self, self.q.store.claim("sender-2", NOW, 60, 10))
        self.assertEqual(sorted(e.id for e in claimed), [self.q.x, self.q.v, self.q.z])

    def test_flush_named_envelope_only(self) -> None:
        self.assertEqual(self.ok("queue", "flush", str(self.q.x), "--database", self.q.path), "flushed 1 deferred envelope\n")
        after = self.next_attempts()
        self.assertEqual((after[self.q.x], after[self.q.v]), (iso(NOW), iso(T0 + 900)))

    def test_flush_by_submission_id(self) -> None:
        self.assertEqual(self.ok("queue", "--database", self.q.path, "flush", self.q.s4.id), "flushed 1 deferred envelope\n")
        after = self.next_attempts()
        self.assertEqual((after[self.q.x], after[self.q.v]), (iso(T0 + 600), iso(NOW)))

    def test_flush_leaves_leased_envelope_to_its_sender(self) -> None:
        before = self.next_attempts()
        out = self.ok("queue", "flush", str(self.q.w), "--database", self.q.path)
        self.assertEqual(out, "flushed 0 deferred envelopes; 1 in delivery, left to the sender\n")
        self.assertEqual(self.next_attempts(), before)

    def test_flush_unknown_id_changes_nothing(self) -> None:
        before = self.next_attempts()
        line = self.fails("queue", "flush", str(self.q.x), "nope", "--database", self.q.path)
        self.assertEqual(line, "mmgun: not in the queue: nope (no unfinished envelope or submission has that id); nothing changed")
        self.assertEqual(self.next_attempts(), before)

    def test_flush_finished_envelope_is_not_in_queue(self) -> None:
        self.assertIn(f"not in the queue: {self.q.y} ", self.fails("queue", "flush", str(self.q.y), "--database", self.q.path))


class DeleteTests(AdminCase):
    def setUp(self) -> None:
        self.q = build_queue(self)

    def state(self, submission_id: str, client: str = CLIENT_LABEL) -> Any:
        return result(self, self.q.store.submission(client, submission_id))

    def test_delete_submission_fails_its_pending_recipients(self) -> None:
        out = self.ok("queue", "delete", self.q.s1.id, "--database", self.q.path)
        self.assertEqual(out, "deleted 1 envelope: 1 recipient failed (deleted by operator)\n")
        state = self.state(self.q.s1.id)
        self.assertEqual(
            [(r.address, r.status, r.last_reply, r.updated_at) for r in state.recipients],
            [
                ("a@x.example", "sent", "250 2.0.0 ok", T0 + 1),
                ("b@x.example", "failed", "deleted by operator", NOW),
                ("c@y.example", "failed", "550 5.1.1 no such user", T0 + 1),
            ],
        )
        self.assertEqual(state.status, "partial")
        self.assertEqual(submission_row(self.q.path, self.q.s1.id), (NOW, 1))
        self.assertNotIn(self.q.x, self.listing(self.q))

    def test_delete_by_envelope_id(self) -> None:
        self.ok("queue", "delete", str(self.q.z), "--database", self.q.path)
        state = self.state(self.q.s2.id, OTHER_LABEL)
        self.assertEqual(state.status, "failed")
        self.assertEqual({r.last_reply for r in state.recipients}, {"deleted by operator"})
        self.assertEqual(sorted(self.listing(self.q)), [self.q.x, self.q.w, self.q.v])

    def test_deleted_envelope_is_never_claimed(self) -> None:
        self.ok("queue", "delete", str(self.q.x), str(self.q.z), "--database", self.q.path)
        claimed = result(self, self.q.store.claim("sender-2", T0 + 100_000, 60, 10))
        self.assertEqual(sorted(e.id for e in claimed), [self.q.w, self.q.v])

    def test_submission_finished_only_with_its_last_envelope(self) -> None:
        s = new_submission(("m@one.example", "n@two.example"), T0 + 50)
        result(self, self.q.store.add_submission(s))
        first, second = envelope_ids(self.q.path, s.id)
        self.ok("queue", "delete", str(first), "--database", self.q.path)
        self.assertEqual(submission_row(self.q.path, s.id), (None, 0))
        self.assertEqual(self.state(s.id).status, "queued")
        self.ok("queue", "delete", str(second), "--database", self.q.path, now=NOW + 5)
        self.assertEqual(submission_row(self.q.path, s.id), (NOW + 5, 1))
        self.assertEqual(self.state(s.id).status, "failed")

    def test_unknown_id_changes_nothing(self) -> None:
        before = self.listing(self.q)
        missing = uuid.uuid4().hex
        line = self.fails("queue", "delete", str(self.q.x), missing, "999", "--database", self.q.path)
        self.assertEqual(line, f"mmgun: not in the queue: {missing}, 999 (no unfinished envelope or submission has that id); nothing changed")
        self.assertEqual(self.listing(self.q), before)
        self.assertEqual(self.state(self.q.s1.id).recipients[1].status, "deferred")

    def test_envelope_in_delivery_refused_and_nothing_changed(self) -> None:
        before = self.listing(self.q)
        line = self.fails("queue", "delete", str(self.q.z), self.q.s3.id, "--database", self.q.path)
        self.assertEqual(line, f"mmgun: envelope {self.q.w} is being delivered now (lease until 2027-01-15T09:00:10Z); nothing deleted, try again then")
        self.assertEqual(self.listing(self.q), before)

    def test_delete_needs_an_id(self) -> None:
        line = self.fails("queue", "delete", "--database", self.q.path, code=2)
        self.assertEqual(line, "mmgun queue delete: the following arguments are required: ID (see mmgun queue delete --help)")


class StatsTests(AdminCase):
    def test_stats_json(self) -> None:
        q = build_queue(self)
        self.assertEqual(json.loads(self.ok("stats", "--json", "--database", q.path)), {
            "recipients": {"queued": 3, "deferred": 2, "sent": 1, "failed": 1},
            "unfinished_envelopes": 4,
            "in_delivery": 1,
            "oldest_queued_age": 300,
            "domains": [
                {"domain": "z.example", "pending_recipients": 2},
                {"domain": "v.example", "pending_recipients": 1},
                {"domain": "w.example", "pending_recipients": 1},
                {"domain": "x.example", "pending_recipients": 1},
            ],
            "backed_off": [],
        })

    def test_stats_text(self) -> None:
        q = build_queue(self)
        self.assertEqual(self.ok("stats", "--database", q.path), (
            "queued recipients     3\n"
            "deferred recipients   2\n"
            "sent recipients       1\n"
            "failed recipients     1\n"
            "unfinished envelopes  4\n"
            "in delivery           1\n"
            "oldest queued age     300 s (5m 0s)\n"
            "pending recipients by domain (top 20):\n"
            "  z.example  2\n"
            "  v.example  1\n"
            "  w.example  1\n"
            "  x.example  1\n"
        ))

    def test_oldest_age_follows_the_queue(self) -> None:
        q = build_queue(self)
        self.ok("queue", "delete", q.s1.id, "--database", q.path)
        self.assertEqual(json.loads(self.ok("stats", "--json", "--database", q.path))["oldest_queued_age"], 290)

    def test_at_most_20_domains(self) -> None:
        _, path, store = make_store(self)
        for i in range(25):
            result(self, store.add_submission(new_submission(tuple(f"r{j}@d{i:02d}.example" for j in range(i + 1)), T0)))
        domains = json.loads(self.ok("stats", "--json", "--database", path))["domains"]
        self.assertEqual([d["domain"] for d in domains], [f"d{i:02d}.example" for i in range(24, 4, -1)])

    def test_empty_database(self) -> None:
        _, path, _ = make_store(self)
        document = json.loads(self.ok("stats", "--json", "--database", path))
        self.assertEqual((document["recipients"], document["oldest_queued_age"], document["domains"]), (dict.fromkeys(("queued", "deferred", "sent", "failed"), 0), None, []))
        self.assertIn("oldest queued age     -\n", self.ok("stats", "--database", path))


class ClientsCheckTests(AdminCase):
    def write(self, text: str) -> str:
        directory = tempfile.mkdtemp(prefix="mmgun-admin-")
        self.addCleanup(shutil.rmtree, directory, True)
        path = os.path.join(directory, "clients")
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_valid_file(self) -> None:
        path = self.write("# ops\nfirst-client-0123456789\n\nsecond-client-0123456789\n")
        self.assertEqual(self.ok("clients", "check", "--clients", path), "ok: 2 clients\n")

    def test_path_from_environment(self) -> None:
        path = self.write("only-client-0123456789\n")
        self.assertEqual(self.ok("clients", "check", environ={"MMGUN_CLIENTS": path}), "ok: 1 client\n")

    def test_bad_line(self) -> None:
        path = self.write("ok-client-0123456789\nshort\n")
        self.assertEqual(self.fails("clients", "check", "--clients", path), f"mmgun: {path} line 2: a client id must be at least 16 characters")

    def test_missing_file(self) -> None:
        self.assertEqual(self.fails("clients", "check", "--clients", "/nonexistent/clients"), "mmgun: clients file /nonexistent/clients does not exist")


class ErrorTests(AdminCase):
    def test_missing_database_is_an_error_and_not_created(self) -> None:
        path = os.path.join(tempfile.gettempdir(), f"mmgun-absent-{uuid.uuid4().hex}.sqlite3")
        for args in (["queue"], ["stats"], ["queue", "flush"], ["queue", "delete", "1"]):
            self.assertEqual(self.fails(*args, "--database", path), f"mmgun: database {path} does not exist")
        self.assertFalse(os.path.exists(path))

    def test_database_from_environment(self) -> None:
        q = build_queue(self)
        self.assertIn("-- 4 envelopes", self.ok("queue", environ={"MMGUN_DATABASE": q.path}))
        self.assertIn("-- 4 envelopes", self.ok("queue", "--database", q.path, environ={"MMGUN_DATABASE": "/nonexistent"}))

    def test_default_database_is_the_daemons(self) -> None:
        directory = tempfile.mkdtemp(prefix="mmgun-admin-")
        self.addCleanup(shutil.rmtree, directory, True)
        self.addCleanup(os.chdir, os.getcwd())
        os.chdir(directory)
        self.assertEqual(self.fails("stats"), "mmgun: database var/mmgun.sqlite3 does not exist")
        os.mkdir("var")
        result(self, SQLiteStore.open_sync("var/mmgun.sqlite3").close())
        self.assertIn("unfinished envelopes  0\n", self.ok("stats"))

    def test_not_a_database_left_untouched(self) -> None:
        directory = tempfile.mkdtemp(prefix="mmgun-admin-")
        self.addCleanup(shutil.rmtree, directory, True)
        path = os.path.join(directory, "empty")
        open(path, "w").close()
        self.assertEqual(self.fails("queue", "--database", path), f"mmgun: {path} is not an mmgun database (not an SQLite file)")
        self.assertEqual(os.path.getsize(path), 0)

    def test_bad_arguments_are_one_line_exit_2(self) -> None:
        line = self.fails("queue", "--status", "sent", "--database", "x", code=2)
        self.assertEqual(line, "mmgun queue: argument --status: invalid choice: 'sent' (choose from 'queued', 'scheduled', 'deferred') (see mmgun queue --help)")
        self.assertEqual(self.fails(code=2), "mmgun: the following arguments are required: COMMAND (see mmgun --help)")
        self.assertIn("invalid choice: 'mailq'", self.fails("mailq", code=2))

    def test_help(self) -> None:
        code, out, err = self.admin("--help")
        self.assertEqual((code, err), (0, ""))
        self.assertIn("queue", out)


class CommandTests(SynchronousTestCase):
    """The installed console script, as an operator runs it next to a live daemon."""

    def setUp(self) -> None:
        if not os.access(MMGUN, os.X_OK):
            raise SkipTest(f"{MMGUN} is not installed")
        # Real time: the console script reads the clock itself.
        self.q = build_queue(self, t0=time.time() - 300)

    def mmgun(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MMGUN_")}
        env["MMGUN_DATABASE"] = self.q.path
        return subprocess.run([MMGUN, *args], capture_output=True, text=True, timeout=60, env=env, cwd=self.q.directory)

    def ok(self, *args: str) -> str:
        run = self.mmgun(*args)
        self.assertEqual((run.returncode, run.stderr), (0, ""))
        return run.stdout

    def test_queue_listing(self) -> None:
        lines = self.ok("queue").splitlines()
        self.assertEqual([int(line.split()[0]) for line in lines[1:-1]], [self.q.x, self.q.w, self.q.v, self.q.z])
        entries = json.loads(self.ok("queue", "--json", "--status", "deferred"))
        self.assertEqual([e["envelope_id"] for e in entries], [self.q.x, self.q.v])

    def test_flush(self) -> None:
        self.assertEqual(self.ok("queue", "flush", self.q.s1.id), "flushed 1 deferred envelope\n")
        self.assertEqual(self.ok("queue", "flush"), "flushed 1 deferred envelope; 1 in delivery, left to the sender\n")

    def test_delete(self) -> None:
        self.assertEqual(self.ok("queue", "delete", str(self.q.z)), "deleted 1 envelope: 2 recipients failed (deleted by operator)\n")
        state = result(self, self.q.store.submission(OTHER_LABEL, self.q.s2.id))
        self.assertEqual([(r.status, r.last_reply) for r in state.recipients], [("failed", "deleted by operator")] * 2)

    def test_stats(self) -> None:
        document = json.loads(self.ok("stats", "--json"))
        self.assertEqual((document["unfinished_envelopes"], document["in_delivery"]), (4, 1))
        self.assertIn("pending recipients by domain (top 20):\n  z.example  2\n", self.ok("stats"))

    def test_clients_check(self) -> None:
        path = os.path.join(self.q.directory, "clients")
        with open(path, "w") as f:
            f.write("a-client-id-0123456789\n")
        self.assertEqual(self.ok("clients", "check", "--clients", path), "ok: 1 client\n")
        with open(path, "a") as f:
            f.write("bad id\n")
        run = self.mmgun("clients", "check", "--clients", path)
        self.assertEqual((run.returncode, run.stdout, run.stderr), (1, "", f"mmgun: {path} line 2: a client id is printable ASCII without spaces\n"))

    def test_error_is_one_line(self) -> None:
        run = self.mmgun("queue", "delete", "12345")
        self.assertEqual((run.returncode, run.stdout), (1, ""))
        self.assertEqual(run.stderr, "mmgun: not in the queue: 12345 (no unfinished envelope or submission has that id); nothing changed\n")
        run = self.mmgun("stats", "--database", os.path.join(self.q.directory, "absent.sqlite3"))
        self.assertEqual((run.returncode, run.stderr.count("\n")), (1, 1))
        run = self.mmgun("queue", "--bogus")
        self.assertEqual((run.returncode, run.stderr.count("\n")), (2, 1))

    def test_works_while_the_daemon_holds_the_database(self) -> None:
        # The daemon: a reader inside a transaction (its snapshot pins the WAL: no checkpoint
        # can reset it), and a writer that has just committed more into the WAL.
        reader = connect(self.q.path)
        self.addCleanup(reader.close)
        reader.execute("BEGIN")
        (seen,) = reader.execute("SELECT count(*) FROM envelopes").fetchone()
        late = new_submission(("late@u.example",), self.q.t0 + 200)
        result(self, self.q.store.add_submission(late))
        self.assertGreater(os.path.getsize(self.q.path + "-wal"), 0)

        listed = [e["submission_id"] for e in json.loads(self.ok("queue", "--json"))]
        self.assertIn(late.id, listed)
        self.assertEqual(self.ok("queue", "flush"), "flushed 2 deferred envelopes; 1 in delivery, left to the sender\n")
        self.assertEqual(self.ok("queue", "delete", late.id), "deleted 1 envelope: 1 recipient failed (deleted by operator)\n")
        self.assertEqual(json.loads(self.ok("stats", "--json"))["recipients"]["failed"], 2)

        # A writer mid-transaction does not hold up the command's reads either.
        writer = connect(self.q.path)
        self.addCleanup(writer.close)
        writer.execute("BEGIN IMMEDIATE")
        writer.execute("UPDATE envelopes SET attempts = attempts WHERE id = ?", (self.q.x,))
        self.assertIn("-- 4 envelopes", self.ok("queue"))
        writer.rollback()

        self.assertEqual(reader.execute("SELECT count(*) FROM envelopes").fetchone(), (seen,))
        reader.execute("COMMIT")
        self.assertEqual(result(self, self.q.store.submission(CLIENT_LABEL, late.id)).recipients[0].last_reply, "deleted by operator")
