"""
``mmgun``: the operator's command, for the queue of a running (or stopped) daemon.

    mmgun queue [--status queued|scheduled|deferred] [--domain D] [--json]   unfinished envelopes (like mailq)
    mmgun queue flush [ID...]       deferred envelopes due now (like postqueue -f)
    mmgun queue delete ID...        fail pending recipients: "deleted by operator" (like postsuper -d)
    mmgun stats [--json]            recipients by status, queue age, backlog per domain, destinations backed off
    mmgun clients check [--clients PATH]   validate the (deprecated) clients file
    mmgun clients add ID            a client with a stable id, e.g. acme
    mmgun keys create CLIENT        a new API key, printed once
    mmgun keys list CLIENT          key ids, created/last used/revoked (never the keys)
    mmgun keys revoke KEY_ID        refused by every running frontend within seconds
    mmgun domains add DOMAIN --client ID [--ed25519]   a sending domain and its DKIM key(s)
    mmgun domains list [--client ID] [--json] | show DOMAIN [--json] | remove DOMAIN
    mmgun domains dns DOMAIN        the DNS records to publish, in zone-file syntax
    mmgun domains verify DOMAIN [--nameserver HOST[:PORT]]   does DNS match the keys?
    mmgun domains rotate DOMAIN     a new key per algorithm, under a new selector
    mmgun domains retire DOMAIN SELECTOR   stop publishing an old key
    mmgun suppressions list|add|remove --client ID --kind bounce|unsubscribe|complaint [ADDRESS] [--tag T]
                                    the addresses a client's mail is not sent to
    mmgun webhooks add --client ID [--domain D] --url URL [--events delivered,permanent_fail,temporary_fail]
    mmgun webhooks list [--client ID] [--json] | remove WEBHOOK_ID
    mmgun webhooks flush [WEBHOOK_ID...]   events waiting for a retry due now (like queue flush)
    mmgun webhooks key --client ID [--rotate]   print the client's webhook signing key (--rotate: replace it)

An ID is an envelope id (a number, as ``mmgun queue`` shows) or a submission id (all of its
unfinished envelopes). Each subcommand is a coroutine on the :class:`mmgun.store.Store` that
:func:`mmgun.store.open_admin_store` gives, run to its end by :func:`_finish` (under the
reactor when the store or DNS needs it). The command is one more connection to the daemon's SQLite file: in
WAL mode its reads never wait for the daemon, and its writes are short ``BEGIN IMMEDIATE``
transactions that wait out the daemon's (busy timeout). It never creates a database. Every
failure is one line on stderr and a non-zero exit status: 1 for an error, 2 for bad usage.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
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
from .message import BadRequest, check_tags, normalize_address
from .store import (
    SUPPRESSION_KINDS,
    Backoff,
    Conflict,
    DomainKey,
    InDelivery,
    NotInQueue,
    QueueEntry,
    QueueStats,
    SendingDomain,
    StorageError,
    Store,
    Suppression,
    open_admin_store,
)

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
        return _finish(args.run(args, context))
    except _Exit as e:
        return e.status
    except _UsageError as e:
        _error(err, str(e))
        return 2
    except NotInQueue as e:
        _error(err, f"mmgun: not in the queue: {', '.join(e.ids)} (no unfinished envelope or submission has that id); nothing changed")
        return 1
    except (AdminError, StorageError, ClientsFileError, Conflict) as e:
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
    _domains_parser(commands, database, parser_class)
    _suppressions_parser(commands, database, parser_class)
    _webhooks_parser(commands, database, parser_class)
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


def _open(args: argparse.Namespace, context: _Context) -> Store:
    return open_admin_store(_database(args, context))


async def _run(args: argparse.Namespace, context: _Context, call: Callable[[Store], Coroutine[Any, Any, T]]) -> T:
    store = _open(args, context)
    try:
        return await call(store)
    finally:
        await store.close()


# -- queue -------------------------------------------------------------------------


async def _queue(args: argparse.Namespace, context: _Context) -> int:
    domain = _domain(args.domain) if args.domain is not None else None
    now = context.now()
    entries = await _run(args, context, lambda store: store.queue_entries(now, args.status, domain))
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


async def _flush(args: argparse.Namespace, context: _Context) -> int:
    now = context.now()
    flushed, in_delivery = await _run(args, context, lambda store: store.flush_deferred(now, args.ids or None))
    left = f"; {in_delivery} in delivery, left to the sender" if in_delivery else ""
    context.out.write(f"flushed {_count(flushed, 'deferred envelope')}{left}\n")
    return 0


async def _delete(args: argparse.Namespace, context: _Context) -> int:
    now = context.now()
    try:
        envelopes, recipients = await _run(args, context, lambda store: store.fail_queued(args.ids, now, DELETED_REPLY))
    except InDelivery as e:
        raise AdminError(
            f"envelope {e} is being delivered now (lease until {_iso(e.until)}); nothing deleted, try again then"
        ) from None
    context.out.write(f"deleted {_count(envelopes, 'envelope')}: {_count(recipients, 'recipient')} failed ({DELETED_REPLY})\n")
    return 0


# -- stats ---------------------------------------------------------------------------


async def _stats(args: argparse.Namespace, context: _Context) -> int:
    now = context.now()

    async def read(store: Store) -> tuple[QueueStats, list[Backoff]]:
        return await store.queue_stats(now, TOP_DOMAINS), await store.backoffs(now)

    stats, backoffs = await _run(args, context, read)
    document = _stats_document(stats, now)
    document["backed_off"] = [_backoff_document(b) for b in backoffs]
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
    if backoffs:
        context.out.write("destinations backed off:\n")
        header = ("kind", "destination", "until", "sessions", "by", "reply")
        backed_off: list[tuple[str, ...]] = [
            (b.kind, b.name, _iso(b.until), "-" if b.concurrency is None else str(b.concurrency), b.sender, b.reply)
            for b in backoffs
        ]
        _write_table(context.out, header, backed_off, indent="  ")
    return 0


def _backoff_document(entry: Backoff) -> dict[str, Any]:
    """A paused domain (every sender holds its mail until ``until``) or an MX whose concurrency a sender lowered."""
    return {
        "kind": entry.kind,
        "name": entry.name,
        "until": _iso(entry.until, precise=True),
        "concurrency": entry.concurrency,
        "sender": entry.sender,
        "reply": entry.reply,
        "updated_at": _iso(entry.updated_at, precise=True),
    }


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


async def _clients_check(args: argparse.Namespace, context: _Context) -> int:
    path: str = args.clients or context.environ.get(env_name("clients")) or _default("clients")
    clients = load_clients(path)
    context.out.write(f"ok: {_count(len(clients), 'client')}\n")
    return 0


async def _write(args: argparse.Namespace, context: _Context, call: Callable[[Store], Coroutine[Any, Any, T]]) -> T:
    """Like _run, but creates (or upgrades) the database: keys may be made before the daemon's first start."""
    store = open_admin_store(_database(args, context), create=True)
    try:
        return await call(store)
    except Conflict as e:
        raise AdminError(str(e)) from None
    finally:
        await store.close()


async def _clients_add(args: argparse.Namespace, context: _Context) -> int:
    try:
        client = check_client_id(args.client)
    except ValueError as e:
        raise AdminError(str(e)) from None
    await _write(args, context, lambda store: store.add_client(client, context.now()))
    context.out.write(f"added client {client}; create a key with: mmgun keys create {client}\n")
    return 0


async def _keys_create(args: argparse.Namespace, context: _Context) -> int:
    key_id, key = new_key()
    await _write(args, context, lambda store: store.add_key(args.client, key_id, key_hash(key), context.now()))
    context.out.write(f"key id: {key_id}\nkey:    {key}\n(the key is shown only now: store it safely)\n")
    return 0


async def _keys_list(args: argparse.Namespace, context: _Context) -> int:
    keys = await _write(args, context, lambda store: store.list_keys(args.client))
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


async def _keys_revoke(args: argparse.Namespace, context: _Context) -> int:
    revoked = await _write(args, context, lambda store: store.revoke_key(args.key_id, context.now()))
    context.out.write(f"revoked key {args.key_id}\n" if revoked else f"key {args.key_id} was already revoked\n")
    return 0


# -- suppression lists (issue 14) ---------------------------------------------------------


def _suppressions_parser(commands: Any, database: _Parser, parser_class: type[_Parser]) -> None:
    suppressions = commands.add_parser(
        "suppressions",
        help="a client's suppression lists: addresses its mail is not sent to",
        description=(
            "A recipient on one of its client's lists is failed at once (last_reply \"suppressed: ...\"). Bounces are"
            " added when an MX says the mailbox does not exist; unsubscribes and complaints through the API or here."
        ),
    )
    actions = suppressions.add_subparsers(dest="action", metavar="ACTION", required=True, parser_class=parser_class)
    which = parser_class(add_help=False)
    which.add_argument("--client", metavar="ID", required=True, help="the client whose list it is")
    which.add_argument("--kind", required=True, choices=SUPPRESSION_KINDS, help="which list")
    listing = actions.add_parser("list", parents=[database, which], help="a list, in address order")
    listing.add_argument("--json", action="store_true", help="a JSON array instead of a table")
    listing.set_defaults(run=_suppressions_list)
    add = actions.add_parser("add", parents=[database, which], help="add an address (again: replace its entry)")
    add.add_argument("address", metavar="ADDRESS")
    add.add_argument("--tag", action="append", metavar="TAG", help="unsubscribe: stop only mail with this tag (repeatable; default: all mail)")
    add.add_argument("--error", metavar="TEXT", help="bounce: why, shown in the last_reply of the recipients it stops")
    add.set_defaults(run=_suppressions_add)
    remove = actions.add_parser("remove", parents=[database, which], help="remove an address: its mail is sent again")
    remove.add_argument("address", metavar="ADDRESS")
    remove.set_defaults(run=_suppressions_remove)


def _suppression_address(value: str) -> str:
    """As the HTTP APIs keep it: checked as a recipient is, lower case."""
    try:
        return normalize_address(value, "ADDRESS").lower()
    except BadRequest:
        raise AdminError(f"{value!r} is not a valid email address (local@domain)") from None


def _suppression_document(entry: Suppression) -> dict[str, Any]:
    """As GET /suppressions shows it."""
    document: dict[str, Any] = {"kind": entry.kind, "address": entry.address, "created_at": _iso(entry.created_at, precise=True)}
    if entry.kind == "bounce":
        document.update(code=entry.code, error=entry.error)
    elif entry.kind == "unsubscribe":
        document["tags"] = list(entry.tags) or ["*"]
    return document


def _suppression_detail(entry: Suppression) -> str:
    if entry.kind == "bounce":
        return " ".join(part for part in (entry.code, entry.error) if part)
    if entry.kind == "unsubscribe":
        return f"only mail tagged {', '.join(entry.tags)}" if entry.tags else "all mail"
    return ""


async def _suppressions_list(args: argparse.Namespace, context: _Context) -> int:
    async def read(store: Store) -> list[Suppression]:
        entries: list[Suppression] = []
        while True:
            page = await store.suppressions(args.client, args.kind, after=entries[-1].address if entries else None, limit=1000)
            entries += page
            if len(page) < 1000:
                return entries

    entries = await _run(args, context, read)
    if args.json:
        json.dump([_suppression_document(e) for e in entries], context.out, indent=2)
        context.out.write("\n")
    elif not entries:
        context.out.write(f"client {args.client}'s {args.kind} list is empty\n")
    else:
        rows = [(e.address, _iso(e.created_at), _suppression_detail(e)) for e in entries]
        _write_table(context.out, ("ADDRESS", "ADDED", "DETAIL"), rows)
    return 0


async def _suppressions_add(args: argparse.Namespace, context: _Context) -> int:
    address = _suppression_address(args.address)
    if args.tag and args.kind != "unsubscribe":
        raise AdminError("--tag limits an unsubscribe (--kind unsubscribe) only")
    if args.error is not None and args.kind != "bounce":
        raise AdminError("--error describes a bounce (--kind bounce) only")
    try:
        tags = tuple(t for tag in args.tag or () for t in check_tags([tag], "--tag"))
    except BadRequest as e:
        raise AdminError(str(e)) from None
    tags = () if "*" in tags else tuple(dict.fromkeys(tags))
    code = "550" if args.kind == "bounce" else None
    entry = Suppression(args.client, args.kind, address, context.now(), code=code, error=args.error or None, tags=tags)
    await _run(args, context, lambda store: store.add_suppressions([entry]))
    limited = f" (only mail tagged {', '.join(tags)})" if tags else ""
    context.out.write(f"added {address} to client {args.client}'s {args.kind} list{limited}\n")
    return 0


async def _suppressions_remove(args: argparse.Namespace, context: _Context) -> int:
    address = _suppression_address(args.address)
    if not await _run(args, context, lambda store: store.remove_suppression(args.client, args.kind, address)):
        raise AdminError(f"{address} is not on client {args.client}'s {args.kind} list; nothing changed")
    context.out.write(f"removed {address} from client {args.client}'s {args.kind} list\n")
    return 0


# -- webhooks (issue 14) ------------------------------------------------------------------


def _webhooks_parser(commands: Any, database: _Parser, parser_class: type[_Parser]) -> None:
    from .store import WEBHOOK_EVENTS

    names = ",".join(WEBHOOK_EVENTS)
    webhooks = commands.add_parser(
        "webhooks",
        help="webhooks: URLs a client's events are POSTed to, signed with its key",
        description=(
            "A webhook receives, from when it is added, the client's events of the kinds named (of one sending domain,"
            " or all), POSTed as Mailgun does: JSON signed with the client's webhook signing key."
        ),
    )
    actions = webhooks.add_subparsers(dest="action", metavar="ACTION", required=True, parser_class=parser_class)
    add = actions.add_parser("add", parents=[database], help="add a webhook (and the client's signing key, if it has none)")
    add.add_argument("--client", metavar="ID", required=True, help="the client whose events it receives")
    add.add_argument("--domain", metavar="DOMAIN", help="only the events of mail from this sending domain (default: all)")
    add.add_argument("--url", required=True, help="http or https; user:password@ is sent as HTTP Basic authentication")
    add.add_argument("--events", metavar="NAMES", default=names, help=f"comma-separated, of {names} (default: all)")
    add.set_defaults(run=_webhooks_add)
    listing = actions.add_parser("list", parents=[database], help="the webhooks (passwords in URLs shown as ***)")
    listing.add_argument("--client", metavar="ID", help="only this client's webhooks")
    listing.add_argument("--json", action="store_true", help="a JSON array instead of a table")
    listing.set_defaults(run=_webhooks_list)
    remove = actions.add_parser("remove", parents=[database], help="remove a webhook and the retries waiting for it")
    remove.add_argument("webhook_id", metavar="WEBHOOK_ID")
    remove.set_defaults(run=_webhooks_remove)
    flush = actions.add_parser("flush", parents=[database], help="make the events waiting for a retry due now")
    flush.add_argument("webhook_ids", nargs="*", metavar="WEBHOOK_ID", help="only these webhooks' (default: every webhook's)")
    flush.set_defaults(run=_webhooks_flush)
    key = actions.add_parser("key", parents=[database], help="print the client's signing key, made if it has none (--rotate: a new one)")
    key.add_argument("--client", metavar="ID", required=True)
    key.add_argument("--rotate", action="store_true", help="replace the key: POSTs are signed with the new one within seconds")
    key.set_defaults(run=_webhooks_key)


def _webhook_events(value: str) -> tuple[str, ...]:
    from .store import WEBHOOK_EVENTS

    names = [n.strip().lower() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in WEBHOOK_EVENTS]
    if unknown or not names:
        raise AdminError(
            f"--events: {', '.join(unknown) or 'none given'}: a webhook receives {', '.join(WEBHOOK_EVENTS)}"
            " (mmgun makes no accepted webhooks, and no opened, clicked, complained or unsubscribed events)"
        )
    return tuple(n for n in WEBHOOK_EVENTS if n in names)


def _webhook_document(webhook: Any) -> dict[str, Any]:
    from .webhooks import redact_url

    return {
        "id": webhook.id,
        "client": webhook.client,
        "domain": webhook.domain,
        "url": redact_url(webhook.url),
        "events": list(webhook.events),
        "created_at": _iso(webhook.created_at, precise=True),
    }


def _print_new_key(out: TextIO, client: str, key: str, made: str) -> None:
    out.write(
        f"webhook signing key of client {client} ({made}; mmgun webhooks key --client {client} shows it again,"
        f" --rotate replaces it):\n{key}\n"
    )


#: The label mmgun knows a client of the (deprecated) clients file by (mmgun.clients.client_label).
_CLIENTS_FILE_LABEL = re.compile(r"c-[0-9a-f]{16}")


async def _known_client(store: Store, client: str) -> None:
    """
    AdminError unless C{client} is in the database's clients table (C{mmgun clients add}) or
    is a clients-file client's label: never a secret (an API key, a clients-file id), which
    would be stored and never match.
    """
    if _CLIENTS_FILE_LABEL.fullmatch(client) is None and not await store.client_exists(client):
        raise AdminError(
            "no such client in the database: --client is an id added with mmgun clients add (or a clients-file"
            " client's label, c- and 16 hex digits), never an API key or a clients-file id"
        )


async def _webhooks_add(args: argparse.Namespace, context: _Context) -> int:
    from .store import Webhook
    from .webhooks import WebhookURLError, new_signing_key, parse_url, redact_url

    try:
        receiver = parse_url(args.url)
    except WebhookURLError as e:
        raise AdminError(f"--url: {e}") from None
    events = _webhook_events(args.events)
    domain = _sending_domain(args.domain) if args.domain is not None else None
    now = context.now()
    webhook = Webhook(f"wh-{secrets.token_hex(6)}", args.client, domain, args.url, events, now)
    new_key = new_signing_key()

    async def add(store: Store) -> bool:
        await _known_client(store, args.client)
        if domain is not None:
            registered = await store.domain(domain)
            if registered is not None and registered.client != args.client:
                raise AdminError(f"sending domain {domain} is client {registered.client}'s, not {args.client}'s")
        made = await store.webhook_key(args.client) is None
        if made:
            # Another process may have made one meanwhile: the stored key is the one to print.
            made = await store.set_webhook_key(args.client, new_key, now, replace=False) == new_key
        await store.add_webhook(webhook)
        return made

    made = await _write(args, context, add)
    scope = f"mail from {domain}" if domain else "every domain"
    context.out.write(
        f"added webhook {webhook.id} for client {args.client}: {redact_url(args.url)}\n"
        f"events: {', '.join(events)} ({scope}), from now on; POSTed to {receiver}\n"
    )
    if made:
        _print_new_key(context.out, args.client, new_key, "made now")
    return 0


async def _webhooks_list(args: argparse.Namespace, context: _Context) -> int:
    from .webhooks import redact_url

    webhooks = await _run(args, context, lambda store: store.webhooks(args.client))
    if args.json:
        json.dump([_webhook_document(w) for w in webhooks], context.out, indent=2)
        context.out.write("\n")
    elif not webhooks:
        context.out.write(f"client {args.client} has no webhook\n" if args.client else "no webhook\n")
    else:
        rows = [
            (w.id, w.client, w.domain or "*", ",".join(w.events), _iso(w.created_at), redact_url(w.url)) for w in webhooks
        ]
        _write_table(context.out, ("ID", "CLIENT", "DOMAIN", "EVENTS", "CREATED", "URL"), rows)
    return 0


async def _webhooks_remove(args: argparse.Namespace, context: _Context) -> int:
    if not await _write(args, context, lambda store: store.remove_webhook(args.webhook_id)):
        raise AdminError(f"no webhook {args.webhook_id} (see mmgun webhooks list); nothing changed")
    context.out.write(f"removed webhook {args.webhook_id}: its events are no longer POSTed, its retries are dropped\n")
    return 0


async def _webhooks_flush(args: argparse.Namespace, context: _Context) -> int:
    now = context.now()

    async def flush(store: Store) -> tuple[int, int]:
        unknown = [i for i in args.webhook_ids if await store.webhook(i) is None]
        if unknown:
            raise AdminError(f"no webhook {', '.join(unknown)} (see mmgun webhooks list); nothing changed")
        return await store.flush_webhook_retries(now, args.webhook_ids or None)

    flushed, in_delivery = await _run(args, context, flush)
    left = f"; {in_delivery} being POSTed, left to the dispatcher" if in_delivery else ""
    context.out.write(f"flushed {_count(flushed, 'waiting webhook event')}: due now{left}\n")
    return 0


async def _webhooks_key(args: argparse.Namespace, context: _Context) -> int:
    from .webhooks import new_signing_key

    key = new_signing_key()
    now = context.now()

    async def make(store: Store) -> str | None:
        await _known_client(store, args.client)
        if not args.rotate:
            existing = await store.webhook_key(args.client)
            if existing is not None:
                return existing
            # Another process may make one meanwhile: the stored key is the one to print.
            return await store.set_webhook_key(args.client, key, now, replace=False)
        await store.set_webhook_key(args.client, key, now)
        return None

    shown = await _write(args, context, make)
    if shown is not None and shown != key:
        # The key is kept in the database, which is the operator's: showing it again is no disclosure.
        context.out.write(
            f"webhook signing key of client {args.client} (stored in the database; --rotate replaces it):\n{shown}\n"
        )
        return 0
    if args.rotate:
        _print_new_key(context.out, args.client, key, "rotated: POSTs are signed with it within seconds, give it to the receivers now")
    else:
        _print_new_key(context.out, args.client, key, "made now")
    return 0


# -- sending domains and DKIM keys (issue 13) ---------------------------------------------

#: A host name as DNS holds it once IDNA-encoded: LDH labels of 1-63 octets, at least two,
#: a top-level label that is not all digits (so no IP address), 253 octets at most.
_DOMAIN = re.compile(r"(?=.{1,253}\Z)(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+(?!\d+\Z)[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z")
#: Algorithms signed with, in signing order: RSA always, Ed25519 (RFC 8463) on request.
RSA, ED25519 = "rsa-sha256", "ed25519-sha256"


def _domains_parser(commands: Any, database: _Parser, parser_class: type[_Parser]) -> None:
    domains = commands.add_parser(
        "domains",
        help="sending domains and their DKIM keys",
        description="The domains clients send as: mail whose From is at one is DKIM-signed with its newest keys.",
    )
    actions = domains.add_subparsers(dest="action", metavar="ACTION", required=True, parser_class=parser_class)
    add = actions.add_parser("add", parents=[database], help="register a domain for a client and create its DKIM key(s)")
    add.add_argument("domain", metavar="DOMAIN")
    add.add_argument("--client", required=True, metavar="ID", help="the client (mmgun clients add) that sends as it")
    add.add_argument("--ed25519", action="store_true", help="an Ed25519 key too (RFC 8463), signed alongside the RSA key")
    add.set_defaults(run=_domains_add)
    listing = actions.add_parser("list", parents=[database], help="the domains, with their active selectors")
    listing.add_argument("--client", metavar="ID", help="only this client's domains")
    listing.add_argument("--json", action="store_true", help="a JSON array instead of a table")
    listing.set_defaults(run=_domains_list)
    show = actions.add_parser("show", parents=[database], help="a domain and its keys, retired ones too (never a private key)")
    show.add_argument("domain", metavar="DOMAIN")
    show.add_argument("--json", action="store_true", help="a JSON object instead of text")
    show.set_defaults(run=_domains_show)
    remove = actions.add_parser("remove", parents=[database], help="forget a domain and its keys (queued mail keeps its signatures)")
    remove.add_argument("domain", metavar="DOMAIN")
    remove.set_defaults(run=_domains_remove)
    dns_records = actions.add_parser("dns", parents=[database], help="the DNS records to publish, in zone-file syntax")
    dns_records.add_argument("domain", metavar="DOMAIN")
    dns_records.set_defaults(run=_domains_dns)
    verify = actions.add_parser("verify", parents=[database], help="look the records up: does DNS match each key?")
    verify.add_argument("domain", metavar="DOMAIN")
    verify.add_argument(
        "--nameserver",
        action="append",
        metavar="HOST[:PORT]",
        help=f"DNS server to ask; repeatable (default: ${env_name('nameserver')}, comma-separated, else /etc/resolv.conf)",
    )
    verify.set_defaults(run=_domains_verify)
    rotate = actions.add_parser(
        "rotate", parents=[database], help="a new key per algorithm, under a new selector; signed with, beside the old, from now on"
    )
    rotate.add_argument("domain", metavar="DOMAIN")
    rotate.set_defaults(run=_domains_rotate)
    retire = actions.add_parser("retire", parents=[database], help="stop publishing an old key (after a rotate)")
    retire.add_argument("domain", metavar="DOMAIN")
    retire.add_argument("selector", metavar="SELECTOR")
    retire.set_defaults(run=_domains_retire)


def _sending_domain(value: str) -> str:
    """The domain as mmgun keeps it: IDNA-encoded, lower case, no trailing dot; AdminError if it is no host name."""
    try:
        name = idna.encode(value.strip().removesuffix("."), uts46=True).decode("ascii").lower()
    except (idna.IDNAError, UnicodeError):
        name = ""
    if not _DOMAIN.match(name):
        raise AdminError(f"not a domain name: {value!r}")
    return name


def _known_domain(store: Store, name: str) -> Coroutine[Any, Any, SendingDomain]:
    async def find() -> SendingDomain:
        domain = await store.domain(name)
        if domain is None:
            raise AdminError(f"no sending domain {name} (see mmgun domains list)")
        return domain

    return find()


def _new_keys(name: str, algorithms: Sequence[str], now: float, taken: Sequence[str]) -> list[DomainKey]:
    from . import dkim  # Lazily: key generation needs cryptography's bindings, no other command does.

    keys: list[DomainKey] = []
    selectors = list(taken)
    for algorithm in algorithms:
        private_key, public_key = dkim.generate_key(algorithm)
        selector = dkim.new_selector(now, selectors)
        selectors.append(selector)
        keys.append(DomainKey(name, selector, algorithm, private_key, public_key, now, None))
    return keys


def _key_list(keys: Sequence[DomainKey]) -> str:
    return ", ".join(f"{k.selector} ({k.algorithm})" for k in keys) or "none"


def _write_records(out: TextIO, name: str, keys: Sequence[DomainKey]) -> None:
    from . import dkim

    text = dkim.dns_records(name, keys)
    out.write(text if text.endswith("\n") else text + "\n")


async def _domains_add(args: argparse.Namespace, context: _Context) -> int:
    name = _sending_domain(args.domain)
    try:
        client = check_client_id(args.client)
    except ValueError as e:
        raise AdminError(str(e)) from None
    now = context.now()
    keys = _new_keys(name, [RSA, ED25519] if args.ed25519 else [RSA], now, ())

    async def add(store: Store) -> None:
        await store.add_domain(name, client, now)
        try:
            for key in keys:
                await store.add_domain_key(key)
        except BaseException:
            await store.remove_domain(name)  # No domain without its keys.
            raise

    await _write(args, context, add)
    context.out.write(f"added sending domain {name} for client {client}\nDKIM keys: {_key_list(keys)}\n")
    context.out.write(
        f"publish these DNS records (mmgun domains dns {name} prints them again, mmgun domains verify {name} checks them):\n\n"
    )
    _write_records(context.out, name, keys)
    return 0


def _key_document(key: DomainKey) -> dict[str, Any]:
    # Never the private key, nor the public one: `mmgun domains dns` prints what is published.
    return {
        "selector": key.selector,
        "algorithm": key.algorithm,
        "created_at": _iso(key.created_at, precise=True),
        "retired_at": None if key.retired_at is None else _iso(key.retired_at, precise=True),
    }


def _domain_document(domain: SendingDomain, keys: Sequence[DomainKey]) -> dict[str, Any]:
    return {
        "domain": domain.name,
        "client": domain.client,
        "created_at": _iso(domain.created_at, precise=True),
        "keys": [_key_document(k) for k in keys],
    }


async def _domains_list(args: argparse.Namespace, context: _Context) -> int:
    async def read(store: Store) -> list[tuple[SendingDomain, list[DomainKey]]]:
        return [(d, await store.domain_keys(d.name)) for d in await store.domains(args.client)]

    domains = await _run(args, context, read)
    if args.json:
        json.dump([_domain_document(d, keys) for d, keys in domains], context.out, indent=2)
        context.out.write("\n")
    elif not domains:
        context.out.write(f"client {args.client} has no sending domain\n" if args.client else "no sending domain\n")
    else:
        rows = [(d.name, d.client, _iso(d.created_at), _key_list(keys)) for d, keys in domains]
        _write_table(context.out, ("DOMAIN", "CLIENT", "CREATED", "DKIM KEYS"), rows)
    return 0


async def _domains_show(args: argparse.Namespace, context: _Context) -> int:
    name = _sending_domain(args.domain)

    async def read(store: Store) -> tuple[SendingDomain, list[DomainKey], list[DomainKey]]:
        domain = await _known_domain(store, name)
        return domain, await store.domain_keys(name, include_retired=True), await store.signing_keys(name)

    domain, keys, signing = await _run(args, context, read)
    if args.json:
        document = _domain_document(domain, keys)
        document["signing_selectors"] = [k.selector for k in signing]
        json.dump(document, context.out, indent=2)
        context.out.write("\n")
        return 0
    _write_table(context.out, None, [("domain", domain.name), ("client", domain.client), ("created", _iso(domain.created_at))])
    rows = [
        (
            k.selector,
            k.algorithm,
            _iso(k.created_at),
            f"retired {_iso(k.retired_at)}" if k.retired_at is not None else "signing" if k in signing else "published",
        )
        for k in keys
    ]
    context.out.write("DKIM keys (newest first):\n")
    _write_table(context.out, ("SELECTOR", "ALGORITHM", "CREATED", "STATE"), rows, indent="  ")
    return 0


async def _domains_remove(args: argparse.Namespace, context: _Context) -> int:
    name = _sending_domain(args.domain)

    async def remove(store: Store) -> list[DomainKey]:
        keys = await store.domain_keys(name, include_retired=True)
        await store.remove_domain(name)
        return keys

    keys = await _write(args, context, remove)
    context.out.write(
        f"removed sending domain {name} and its {_count(len(keys), 'DKIM key')}: new mail from {name} is not signed"
        " (nor accepted under --sender-policy domains); queued mail keeps the signatures it got when it was queued,"
        " so leave the DNS records published until it is delivered\n"
    )
    return 0


async def _domains_dns(args: argparse.Namespace, context: _Context) -> int:
    name = _sending_domain(args.domain)

    async def read(store: Store) -> list[DomainKey]:
        await _known_domain(store, name)
        return await store.domain_keys(name)

    _write_records(context.out, name, await _run(args, context, read))
    return 0


async def _domains_rotate(args: argparse.Namespace, context: _Context) -> int:
    name = _sending_domain(args.domain)
    now = context.now()

    async def rotate(store: Store) -> tuple[list[DomainKey], list[DomainKey], list[DomainKey]]:
        await _known_domain(store, name)
        every = await store.domain_keys(name, include_retired=True)
        old = await store.signing_keys(name)
        algorithms = [k.algorithm for k in old] or [RSA]
        new = _new_keys(name, algorithms, now, [k.selector for k in every])
        for key in new:
            await store.add_domain_key(key)
        return old, new, await store.domain_keys(name)

    old, new, published = await _write(args, context, rotate)
    context.out.write(
        f"new DKIM keys for {name}: {_key_list(new)}\n"
        f"publish their records now: mail from {name} is signed with them from now on.\n"
    )
    if old:
        retire = "; ".join(f"mmgun domains retire {name} {k.selector}" for k in old)
        context.out.write(
            f"mail is signed with both the old and the new key until you retire the old one, so it passes"
            f" while DNS catches up. The previous keys ({_key_list(old)}) stay published until you retire them,"
            f" once the new records are in DNS and the mail signed with the old ones has been delivered and"
            f" read (a few days): {retire}\n"
        )
    context.out.write("\n")
    _write_records(context.out, name, published)
    return 0


async def _domains_retire(args: argparse.Namespace, context: _Context) -> int:
    name = _sending_domain(args.domain)

    async def retire(store: Store) -> bool:
        await _known_domain(store, name)
        return await store.retire_domain_key(name, args.selector, context.now())

    if await _write(args, context, retire):
        context.out.write(
            f"retired key {args.selector} of {name}: remove its record, {args.selector}._domainkey.{name}, from DNS\n"
        )
    else:
        context.out.write(f"key {args.selector} of {name} was already retired\n")
    return 0


# -- domains verify --


@attrs.frozen
class _Check:
    kind: str
    name: str
    what: str
    outcome: str
    ok: bool


async def _domains_verify(args: argparse.Namespace, context: _Context) -> int:
    from . import dkim
    from .mx import parse_hostport

    name = _sending_domain(args.domain)
    raw = args.nameserver or [v for v in context.environ.get(env_name("nameserver"), "").split(",") if v.strip()]
    try:
        servers = [parse_hostport(v, 53) for v in raw] or None
    except ValueError as e:
        raise _UsageError(f"mmgun domains verify: argument --nameserver: {e} (see mmgun domains verify --help)") from None

    async def read(store: Store) -> list[DomainKey]:
        await _known_domain(store, name)
        return await store.domain_keys(name)

    keys = await _run(args, context, read)
    expected = [(k, _dkim_tags(dkim.expected_txt(k))) for k in keys]
    from twisted.internet import reactor

    checks = await _verify(reactor, servers, name, expected)
    _write_table(context.out, None, [(c.kind, c.name, c.what, c.outcome) for c in checks])
    dkim_checks = [c for c in checks if c.kind == "DKIM"]
    bad = sum(not c.ok for c in dkim_checks)
    context.out.write(
        f"-- {bad} of {_count(len(dkim_checks), 'DKIM record')} missing or different: publish what mmgun domains dns {name} prints\n"
        if bad
        else f"-- every DKIM record matches its key ({len(dkim_checks)})\n"
    )
    return 1 if bad else 0


def _finish(command: Coroutine[Any, Any, T]) -> T:
    """
    The result of ``command`` (a subcommand's coroutine): at once when it finished without
    waiting for anything (as on the synchronous SQLite store, so tests run commands in-process),
    else by running the global reactor until it has (like task.react, without exiting). Any
    store works: one whose calls finish on a later reactor turn, and the DNS of domains verify.
    """
    outcome: list[Any] = []
    d = Deferred.fromCoroutine(command)
    d.addBoth(outcome.append)
    if not outcome:
        from twisted.internet import reactor

        # Stops at once if the reactor is running (the usual case), else as soon as it is.
        d.addBoth(lambda _: reactor.callWhenRunning(reactor.stop))
        reactor.run()
        if not outcome:  # The reactor stopped first: a signal (SIGINT, SIGTERM).
            d.cancel()
            outcome[:] = [Failure(AdminError("interrupted before the command finished"))]
    (result,) = outcome
    if isinstance(result, Failure):
        result.raiseException()
    return result


def _dkim_tags(text: str) -> dict[str, str]:
    """A DKIM key record's tags (RFC 6376 section 3.6.1); whitespace inside a value is not part of it."""
    tags: dict[str, str] = {}
    for part in text.split(";"):
        tag, equals, value = part.partition("=")
        if equals:
            tags.setdefault(tag.strip(), "".join(value.split()))
    return tags


async def _verify(
    reactor: Any, servers: list[tuple[str, int]] | None, name: str, expected: Sequence[tuple[DomainKey, dict[str, str]]]
) -> list[_Check]:
    from .mx import make_resolver

    resolver = make_resolver(servers, reactor)
    checks = []
    for key, want in expected:
        owner = f"{key.selector}._domainkey.{name}"
        checks.append(_Check("DKIM", owner, key.algorithm, *_compare(await _txt(resolver, owner), want)))
    for kind, owner, prefix in (("SPF", name, "v=spf1"), ("DMARC", f"_dmarc.{name}", "v=dmarc1")):
        found = await _txt(resolver, owner)
        if isinstance(found, str):
            checks.append(_Check(kind, owner, "TXT", found, True))
            continue
        records = [r for r in found if r.strip().lower().startswith(prefix)]
        outcome = f"present: {records[0]}" if len(records) == 1 else f"{len(records)} records (must be one)" if records else "none (see mmgun domains dns)"
        checks.append(_Check(kind, owner, "TXT", outcome, len(records) == 1))
    return checks


async def _txt(resolver: Any, owner: str) -> list[str] | str:
    """The TXT records at C{owner}, each one's strings joined; a str says why the lookup failed."""
    from twisted.names import dns, error

    try:
        answers, _, _ = await resolver.lookupText(owner)
    except error.DNSNameError:
        return []
    except Exception as e:
        return f"LOOKUP FAILED: {type(e).__name__}"
    return [b"".join(a.payload.data).decode("utf-8", "replace") for a in answers if a.type == dns.TXT]


def _compare(found: list[str] | str, want: dict[str, str]) -> tuple[str, bool]:
    if isinstance(found, str):
        return found, False
    records = [_dkim_tags(r) for r in found]
    records = [r for r in records if "p" in r or r.get("v") == "DKIM1"]
    if not records:
        return "MISSING: no DKIM key record", False
    if len(records) > 1:
        return f"DIFFERS: {len(records)} key records (must be one)", False
    (got,) = records
    if got.get("v", "DKIM1") != "DKIM1":
        return f"DIFFERS: v={got['v']}", False
    if got.get("k", "rsa") != want.get("k", "rsa"):
        return f"DIFFERS: k={got.get('k', 'rsa')}, the key is k={want.get('k', 'rsa')}", False
    if not got.get("p"):
        return "DIFFERS: empty p= (the key is published as revoked)", False
    if got["p"] != want.get("p"):
        return "DIFFERS: p= is another key", False
    return "ok: matches the key", True


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
