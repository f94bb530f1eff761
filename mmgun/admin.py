"""
``mmgun``: the operator's command, for the queue of a running (or stopped) daemon.

    mmgun queue [--status queued|scheduled|deferred] [--domain D] [--json]   unfinished envelopes (like mailq)
    mmgun queue flush [ID...]       deferred envelopes due now (like postqueue -f)
    mmgun queue delete ID...        fail pending recipients: "deleted by operator" (like postsuper -d)
    mmgun stats [--json]            recipients by status, queue age, backlog per domain
    mmgun clients check [--clients PATH]   validate the (deprecated) clients file
    mmgun clients add ID            a client with a stable id, e.g. acme
    mmgun keys create CLIENT        a new API key, printed once
    mmgun keys list CLIENT          key ids, created/last used/revoked (never the keys)
    mmgun keys revoke KEY_ID        refused by every running frontend within seconds

An ID is an envelope id (a number, as ``mmgun queue`` shows) or a submission id (all of its
unfinished envelopes). The command is one more connection to the daemon's SQLite file: in
WAL mode its reads never wait for the daemon, and its writes are short ``BEGIN IMMEDIATE``
transactions that wait out the daemon's (busy timeout). It never creates a database. Every
failure is one line on stderr and a non-zero exit status: 1 for an error, 2 for bad usage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NoReturn, TextIO, TypeVar

import attrs
import idna
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from .auth import check_client_id, key_hash, new_key
from .clients import ClientsFileError, load_clients
from .config import OPTIONS, env_name
from .store import Conflict, InDelivery, NotInQueue, QueueEntry, QueueStats, StorageError
from .store.sqlite import SQLiteStore

if TYPE_CHECKING:
    from _typeshed import SupportsWrite

T = TypeVar("T")

#: The last_reply of every recipient failed by ``mmgun queue delete``.
DELETED_REPLY = "deleted by operator"
#: Domains shown by ``mmgun stats``.
TOP_DOMAINS = 20
STATUSES = ("queued", "deferred", "sent", "failed")


class AdminError(Exception):
    """Stops the command: the message is the one line the operator sees."""


class _UsageError(Exception):
    pass


class _Exit(Exception):
    def __init__(self, status: int) -> None:
        self.status = status


@attrs.frozen
class _Context:
    out: TextIO
    now: Callable[[], float]
    environ: Mapping[str, str]


def main(
    argv: Sequence[str] | None = None,
    *,
    now: Callable[[], float] | None = None,
    environ: Mapping[str, str] | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Run one command; return its exit status. Tests inject the clock, environment and streams."""
    out = sys.stdout if stdout is None else stdout
    err = sys.stderr if stderr is None else stderr
    context = _Context(out, time.time if now is None else now, os.environ if environ is None else environ)
    try:
        args = _parser(out).parse_args(argv)
        return args.run(args, context)
    except _Exit as e:
        return e.status
    except _UsageError as e:
        _error(err, str(e))
        return 2
    except NotInQueue as e:
        _error(err, f"mmgun: not in the queue: {', '.join(e.ids)} (no unfinished envelope or submission has that id); nothing changed")
        return 1
    except (AdminError, StorageError, ClientsFileError) as e:
        _error(err, f"mmgun: {e}")
        return 1
    except BrokenPipeError:
        # The reader (e.g. `mmgun queue | head`) went away: not an error worth a traceback.
        if out is sys.stdout:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _error(err: TextIO, line: str) -> None:
    err.write(" ".join(line.split()) + "\n")


# -- command line ----------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """
    argparse that reports a mistake in one line and lets main() return instead of exiting;
    help goes to C{_out}, set by L{_parser_class}.
    """

    _out: TextIO

    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{self.prog}: {message} (see {self.prog} --help)")

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        raise _Exit(status)

    def print_help(self, file: SupportsWrite[str] | None = None) -> None:
        super().print_help(self._out if file is None else file)


def _parser_class(out: TextIO) -> type[_Parser]:
    """L{_Parser} writing help to C{out}, as a class: argparse makes sub-parsers from their C{parser_class}."""

    class _OutParser(_Parser):
        _out = out

    return _OutParser


def _parser(out: TextIO) -> _Parser:
    parser_class = _parser_class(out)
    default_database, _, _ = OPTIONS["database"]
    default_clients, _, _ = OPTIONS["clients"]
    database = parser_class(add_help=False)
    # SUPPRESS: a --database given before a sub-action is kept (see _database).
    database.add_argument(
        "--database",
        metavar="PATH",
        default=argparse.SUPPRESS,
        help=f"the daemon's SQLite database (default: ${env_name('database')}, else {default_database})",
    )

    parser = parser_class(prog="mmgun", description="Look at and act on the queue of an mmgun mail relay.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=parser_class)

    queue = commands.add_parser(
        "queue",
        parents=[database],
        help="list unfinished envelopes; flush or delete them",
        description="Without an action, list the unfinished envelopes (an envelope: one submission's recipients at one domain).",
    )
    queue.add_argument(
        "--status",
        choices=("queued", "scheduled", "deferred"),
        help="queued: never attempted; scheduled: never attempted, its send_at still ahead; deferred: attempted",
    )
    queue.add_argument("--domain", help="only envelopes to this recipient domain")
    queue.add_argument("--json", action="store_true", help="a JSON array instead of a table")
    queue.set_defaults(run=_queue)
    actions = queue.add_subparsers(dest="action", metavar="ACTION", parser_class=parser_class)
    flush = actions.add_parser("flush", parents=[database], help="make deferred envelopes due now")
    flush.add_argument("ids", nargs="*", metavar="ID", help="envelope or submission ids (default: every envelope)")
    flush.set_defaults(run=_flush)
    delete = actions.add_parser("delete", parents=[database], help=f'fail pending recipients: "{DELETED_REPLY}"')
    delete.add_argument("ids", nargs="+", metavar="ID", help="envelope or submission ids")
    delete.set_defaults(run=_delete)

    stats = commands.add_parser("stats", parents=[database], help="counts, queue age, backlog per domain")
    stats.add_argument("--json", action="store_true", help="a JSON object instead of text")
    stats.set_defaults(run=_stats)

    clients = commands.add_parser("clients", help="clients: add one; check the clients file")
    clients_actions = clients.add_subparsers(dest="action", metavar="ACTION", required=True, parser_class=parser_class)
    add = clients_actions.add_parser("add", parents=[database], help="add a client (a stable id such as acme)")
    add.add_argument("client", metavar="ID")
    add.set_defaults(run=_clients_add)

    keys = commands.add_parser("keys", help="API keys: create, list, revoke")
    keys_actions = keys.add_subparsers(dest="action", metavar="ACTION", required=True, parser_class=parser_class)
    create = keys_actions.add_parser("create", parents=[database], help="create a key for a client and print it (once)")
    create.add_argument("client", metavar="CLIENT")
    create.set_defaults(run=_keys_create)
    listing = keys_actions.add_parser("list", parents=[database], help="a client's keys (ids, never the keys)")
    listing.add_argument("client", metavar="CLIENT")
    listing.add_argument("--json", action="store_true", help="a JSON array instead of a table")
    listing.set_defaults(run=_keys_list)
    revoke = keys_actions.add_parser("revoke", parents=[database], help="revoke a key: refused within seconds")
    revoke.add_argument("key_id", metavar="KEY_ID")
    revoke.set_defaults(run=_keys_revoke)
    check = clients_actions.add_parser("check", help="validate the clients file")
    check.add_argument(
        "--clients",
        metavar="PATH",
        help=f"the clients file (default: ${env_name('clients')}, else {default_clients})",
    )
    check.set_defaults(run=_clients_check)
    return parser


def _default(option: str) -> str:
    """The daemon's default for C{option}, which has one."""
    default, _, _ = OPTIONS[option]
    if default is None:
        raise LookupError(f"--{option} has no default")
    return default


def _database(args: argparse.Namespace, context: _Context) -> str:
    path: str = getattr(args, "database", None) or context.environ.get(env_name("database")) or _default("database")
    return path


def _open(args: argparse.Namespace, context: _Context) -> SQLiteStore:
    return SQLiteStore.open_existing(_database(args, context))


def _wait(coroutine: Coroutine[Any, Any, T]) -> T:
    """The result of a call on a SQLiteStore.open_existing store, which has finished when it returns."""
    outcome: list[Any] = []
    Deferred.fromCoroutine(coroutine).addBoth(outcome.append)
    (result,) = outcome
    if isinstance(result, Failure):
        result.raiseException()
    return result


def _run(args: argparse.Namespace, context: _Context, call: Callable[[SQLiteStore], Coroutine[Any, Any, T]]) -> T:
    store = _open(args, context)
    try:
        return _wait(call(store))
    finally:
        _wait(store.close())


# -- queue -------------------------------------------------------------------------


def _queue(args: argparse.Namespace, context: _Context) -> int:
    domain = _domain(args.domain) if args.domain is not None else None
    now = context.now()
    entries = _run(args, context, lambda store: store.queue_entries(now, args.status, domain))
    if args.json:
        json.dump([_entry_document(e) for e in entries], context.out, indent=2)
        context.out.write("\n")
    elif not entries:
        filtered = args.status is not None or domain is not None
        context.out.write("no unfinished envelope matches\n" if filtered else "queue is empty\n")
    else:
        _write_queue_table(context.out, entries)
    return 0


def _domain(value: str) -> str:
    """The domain as the queue holds it: IDNA-encoded, lower case (see mmgun.message.normalize_address)."""
    try:
        return idna.encode(value.strip().rstrip("."), uts46=True).decode("ascii").lower()
    except (idna.IDNAError, UnicodeError):
        raise _UsageError(f"mmgun queue: argument --domain: not a domain: {value!r} (see mmgun queue --help)") from None


def _entry_document(entry: QueueEntry) -> dict[str, Any]:
    return {
        "envelope_id": entry.envelope_id,
        "submission_id": entry.submission_id,
        "client": entry.client,
        "domain": entry.domain,
        "status": entry.status,
        "recipients": list(entry.recipients),
        "attempts": entry.attempts,
        # While leased, the lease's expiry: when the envelope is due again if its sender dies.
        "next_attempt": _iso(entry.next_attempt, precise=True),
        "leased": entry.leased,
        "last_reply": entry.last_reply,
        "created_at": _iso(entry.created_at, precise=True),
    }


def _write_queue_table(out: TextIO, entries: list[QueueEntry]) -> None:
    header = ("ENVELOPE", "SUBMISSION", "CLIENT", "DOMAIN", "STATUS", "ATTEMPTS", "NEXT ATTEMPT", "RECIPIENTS", "LAST REPLY")
    rows = [
        (
            str(e.envelope_id),
            e.submission_id,
            e.client,
            e.domain,
            e.status,
            str(e.attempts),
            "in delivery" if e.leased else _iso(e.next_attempt),
            _recipients(e.recipients),
            e.last_reply or "-",
        )
        for e in entries
    ]
    _write_table(out, header, rows, right=(0, 5))
    pending = sum(len(e.recipients) for e in entries)
    in_delivery = sum(e.leased for e in entries)
    summary = f"-- {_count(len(entries), 'envelope')}, {_count(pending, 'pending recipient')}"
    out.write(summary + (f", {in_delivery} in delivery" if in_delivery else "") + "\n")


def _recipients(addresses: tuple[str, ...]) -> str:
    if len(addresses) <= 2:
        return ", ".join(addresses) or "-"
    return f"{addresses[0]}, {addresses[1]} (+{len(addresses) - 2} more)"


def _flush(args: argparse.Namespace, context: _Context) -> int:
    now = context.now()
    flushed, in_delivery = _run(args, context, lambda store: store.flush_deferred(now, args.ids or None))
    left = f"; {in_delivery} in delivery, left to the sender" if in_delivery else ""
    context.out.write(f"flushed {_count(flushed, 'deferred envelope')}{left}\n")
    return 0


def _delete(args: argparse.Namespace, context: _Context) -> int:
    now = context.now()
    try:
        envelopes, recipients = _run(args, context, lambda store: store.fail_queued(args.ids, now, DELETED_REPLY))
    except InDelivery as e:
        raise AdminError(
            f"envelope {e} is being delivered now (lease until {_iso(e.until)}); nothing deleted, try again then"
        ) from None
    context.out.write(f"deleted {_count(envelopes, 'envelope')}: {_count(recipients, 'recipient')} failed ({DELETED_REPLY})\n")
    return 0


# -- stats ---------------------------------------------------------------------------


def _stats(args: argparse.Namespace, context: _Context) -> int:
    now = context.now()
    stats = _run(args, context, lambda store: store.queue_stats(now, TOP_DOMAINS))
    document = _stats_document(stats, now)
    if args.json:
        json.dump(document, context.out, indent=2)
        context.out.write("\n")
        return 0
    rows = [(f"{status} recipients", str(count)) for status, count in document["recipients"].items()]
    rows.append(("unfinished envelopes", str(stats.unfinished_envelopes)))
    rows.append(("in delivery", str(stats.in_delivery)))
    age = document["oldest_queued_age"]
    rows.append(("oldest queued age", "-" if age is None else f"{age} s ({_duration(age)})"))
    _write_table(context.out, None, rows)
    if stats.domains:
        context.out.write(f"pending recipients by domain (top {TOP_DOMAINS}):\n")
        _write_table(context.out, None, [(d, str(n)) for d, n in stats.domains], right=(1,), indent="  ")
    return 0


def _stats_document(stats: QueueStats, now: float) -> dict[str, Any]:
    counts = dict.fromkeys(STATUSES, 0)
    counts.update(stats.recipients)
    oldest = stats.oldest_created_at
    return {
        "recipients": counts,
        "unfinished_envelopes": stats.unfinished_envelopes,
        "in_delivery": stats.in_delivery,
        "oldest_queued_age": None if oldest is None else max(0, int(now - oldest)),
        "domains": [{"domain": d, "pending_recipients": n} for d, n in stats.domains],
    }


# -- clients -------------------------------------------------------------------------


def _clients_check(args: argparse.Namespace, context: _Context) -> int:
    path: str = args.clients or context.environ.get(env_name("clients")) or _default("clients")
    clients = load_clients(path)
    context.out.write(f"ok: {_count(len(clients), 'client')}\n")
    return 0


def _write(args: argparse.Namespace, context: _Context, call: Callable[[SQLiteStore], Coroutine[Any, Any, T]]) -> T:
    """Like _run, but creates (or upgrades) the database: keys may be made before the daemon's first start."""
    store = SQLiteStore.open_sync(_database(args, context))
    try:
        return _wait(call(store))
    except Conflict as e:
        raise AdminError(str(e)) from None
    finally:
        _wait(store.close())


def _clients_add(args: argparse.Namespace, context: _Context) -> int:
    try:
        client = check_client_id(args.client)
    except ValueError as e:
        raise AdminError(str(e)) from None
    _write(args, context, lambda store: store.add_client(client, context.now()))
    context.out.write(f"added client {client}; create a key with: mmgun keys create {client}\n")
    return 0


def _keys_create(args: argparse.Namespace, context: _Context) -> int:
    key_id, key = new_key()
    _write(args, context, lambda store: store.add_key(args.client, key_id, key_hash(key), context.now()))
    context.out.write(f"key id: {key_id}\nkey:    {key}\n(the key is shown only now: store it safely)\n")
    return 0


def _keys_list(args: argparse.Namespace, context: _Context) -> int:
    keys = _write(args, context, lambda store: store.list_keys(args.client))
    documents = [
        {
            "key_id": k.key_id,
            "client": k.client,
            "created_at": _iso(k.created_at, precise=True),
            "last_used_at": _iso(k.last_used_at, precise=True) if k.last_used_at is not None else None,
            "revoked_at": _iso(k.revoked_at, precise=True) if k.revoked_at is not None else None,
        }
        for k in keys
    ]
    if args.json:
        json.dump(documents, context.out, indent=2)
        context.out.write("\n")
    elif not documents:
        context.out.write(f"client {args.client} has no API key\n")
    else:
        for d in documents:
            state = f"revoked {d['revoked_at']}" if d["revoked_at"] else "active"
            context.out.write(f"{d['key_id']}  created {d['created_at']}  last used {d['last_used_at'] or 'never'}  {state}\n")
    return 0


def _keys_revoke(args: argparse.Namespace, context: _Context) -> int:
    revoked = _write(args, context, lambda store: store.revoke_key(args.key_id, context.now()))
    context.out.write(f"revoked key {args.key_id}\n" if revoked else f"key {args.key_id} was already revoked\n")
    return 0


# -- formatting ----------------------------------------------------------------------


def _iso(timestamp: float, precise: bool = False) -> str:
    """ISO 8601 UTC: seconds for people, milliseconds (as the HTTP API) for JSON."""
    moment = datetime.fromtimestamp(timestamp, UTC)
    return moment.isoformat(timespec="milliseconds" if precise else "seconds").replace("+00:00", "Z")


def _duration(seconds: int) -> str:
    parts = [(seconds // 86400, "d"), (seconds % 86400 // 3600, "h"), (seconds % 3600 // 60, "m"), (seconds % 60, "s")]
    while len(parts) > 1 and parts[0][0] == 0:
        parts.pop(0)
    return " ".join(f"{n}{unit}" for n, unit in parts[:2])


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _cell(value: str) -> str:
    # Replies come from remote servers: never let one move the cursor on the operator's terminal.
    return "".join(c if c.isprintable() else "?" for c in " ".join(value.split()))


def _write_table(
    out: TextIO,
    header: Sequence[str] | None,
    rows: Sequence[tuple[str, ...]],
    right: tuple[int, ...] = (),
    indent: str = "",
) -> None:
    lines = [tuple(_cell(v) for v in row) for row in ([header] if header else []) + list(rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    for line in lines:
        cells = [v.rjust(w) if i in right else v.ljust(w) for i, (v, w) in enumerate(zip(line, widths, strict=True))]
        cells[-1] = line[-1].rjust(widths[-1]) if len(line) - 1 in right else line[-1]
        out.write(indent + "  ".join(cells) + "\n")
