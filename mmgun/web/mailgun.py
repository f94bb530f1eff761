"""
Mailgun's v3 messages API on mmgun's port, so that Mailgun's clients (its SDKs, Django's
anymail, nodemailer's transports) move to mmgun by changing a base URL and a key:

- ``POST /v3/{domain}/messages``: a message from form fields (``from``, ``to``, ``cc``,
  ``bcc``, ``subject``, ``text``, ``html``, ``attachment``, ``inline``, ``h:*``, ``v:*``,
  ``o:tag``, ``o:deliverytime``, ``o:testmode``, ``recipient-variables``);
- ``POST /v3/{domain}/messages.mime``: a complete MIME message (``message``) for the
  envelope recipients ``to``.

``{domain}`` is one of the calling client's sending domains (``mmgun domains add``);
another client's, or an unknown one, is Mailgun's 404 ``Domain not found: ...`` (the same
answer for both: nothing about other clients leaks). Its mail is signed with its keys.

Both take ``multipart/form-data`` or ``application/x-www-form-urlencoded`` (read by
:mod:`.forms`), authenticate with HTTP Basic ``api:<key>`` (mmgun's API keys), and answer
``200 {"id": "<Message-ID>", "message": "Queued. Thank you."}``; ``POST /status`` with
``{"message_id": ...}`` finds the submission by that id. Every error is Mailgun's
``{"message": ...}`` with the status code :func:`.errors.error_answer` chose.

A Klein app, mounted by :class:`.app.Root` under ``/v3/``; its ``handle_errors`` renders
every failure through :mod:`.errors`.
"""

from __future__ import annotations

import json
import mimetypes
import re
from collections.abc import Callable, Coroutine, Iterator, Sequence
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

import attrs
from klein import Klein
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from werkzeug.exceptions import MethodNotAllowed, NotFound
from werkzeug.routing import RequestRedirect

from ..message import (
    FIELD_NAME,
    MAX_HEADER_VALUE,
    MAX_METADATA,
    MAX_PARTS,
    MAX_SUBJECT,
    BadRequest,
    Mailbox,
    MessageTooLarge,
    Part,
    SendRequest,
    check_content_id,
    check_headers,
    check_inline_references,
    check_metadata,
    check_subject,
    check_tags,
    check_text,
    compose,
    make_part,
    new_message_id,
    normalize_address,
    parse_address_list,
    parse_date,
    parse_json_object,
    parse_mailbox,
)
from ..metrics import Metrics
from ..store import Store
from .errors import HTTPError, error_answer, json_response, method_not_allowed, no_such_endpoint, render_error
from .events_api import EventsAPI
from .forms import Field, FieldLimit, read_form
from .settings import WebSettings
from .site import read_body
from .submit import MAX_BATCH_FACTOR, Pipeline, RawMessage
from .suppressions_api import V3Suppressions
from .webhooks_api import V3Webhooks

_log = Logger()

QUEUED = "Queued. Thank you."

#: Mailgun's options that ask for something mmgun does not do, and whose absence harms
#: nobody: accepted (any value) and ignored. mmgun tracks no opens or clicks, and signs
#: every message of a sending domain with that domain's keys (``mmgun domains``), always.
IGNORED_OPTIONS = frozenset(
    {
        "o:tracking",
        "o:tracking-clicks",
        "o:tracking-opens",
        "o:tracking-pixel-location-top",
        "o:dkim",
        "o:secondary-dkim",
        "o:secondary-dkim-public",
        "o:skip-verification",
    }
)
#: Mailgun's fields that mmgun cannot honour, and whose silent absence would send other
#: mail than was asked for (or at another time, or from elsewhere): refused, 400 naming them.
#: o:require-tls is refused only when true.
UNSUPPORTED = frozenset(
    {
        "o:sending-ip",
        "o:sending-ip-pool",
        "o:deliverytime-optimize-period",
        "o:time-zone-localize",
        "o:archive-to",
        "o:suppress-headers",
        "template",
        "amp-html",
    }
)
_TRUE = frozenset({"yes", "true", "1"})
_FALSE = frozenset({"no", "false", "0"})
#: The fields of /messages (beside h:*, v:*, o:*), and those of /messages.mime.
MESSAGE_FIELDS = frozenset(
    {"from", "to", "cc", "bcc", "subject", "text", "html", "attachment", "inline", "recipient-variables"}
)
MIME_FIELDS = frozenset({"to", "message"})
#: Field names of :func:`mmgun.message.compose`'s errors, as this API calls them.
_NAMES = {
    "recipients": "to",
    "body": "text",
    "html": "html",
    "cc": "cc",
    "bcc": "bcc",
    "reply_to": "h:Reply-To",
    "attachments": "attachment",
    "inline": "inline",
    "headers": "h:",
}
#: Where Mailgun substitutes a recipient's variables (batch sending).
_VARIABLE = re.compile(r"%recipient\.([A-Za-z0-9_.-]{1,128})%")
#: Built-in table only: the host's /etc/mime.types would make the result differ between machines.
_TYPES = mimetypes.MimeTypes(filenames=())
#: A Message-ID as RFC 5322 3.6.4 allows it (id-left "@" id-right, no white space or brackets inside).
_MSG_ID = re.compile(r"<[!-;=?-~]{1,900}@[!-;=?-Z^-~]{1,253}>|<[!-;=?-~]{1,900}@\[[!-Z^-~]{1,253}\]>")
#: A line of more than 998 octets (RFC 5322 2.1.1), anchored at a line's start so the
#: search is linear (unanchored, it would rescan each long line from every offset).
_LONG_LINE = re.compile(rb"(?m)^[^\r\n]{999}")
#: Bytes one address of a to, cc or bcc field may take on average while the field is read
#: (254 for the address, the rest for a display name and the separator); the fields of one
#: name together get ``max_recipients`` times this, plus room for one long display name.
ADDRESS_BYTES = 320
#: Header fields a message may have at most once (RFC 5322 3.6).
_ONCE = ("from", "sender", "reply-to", "to", "cc", "subject", "date", "message-id")


def error_document(message: str) -> dict[str, Any]:
    """Mailgun's shape of an error."""
    return {"message": message}


def address_bytes(max_recipients: int) -> int:
    """The most bytes the values of one address field (to, cc, bcc: every repeat together) may have."""
    return max_recipients * ADDRESS_BYTES + 1024


def field_limits(max_recipients: int) -> FieldLimit:
    """:func:`field_limit`, with the address fields limited by ``max_recipients``."""
    addresses = address_bytes(max_recipients)

    def limit(name: str) -> int | None:
        if name in ("to", "cc", "bcc"):
            return addresses
        return field_limit(name)

    return limit


def field_limit(name: str) -> int | None:
    """The most bytes a field's value may have while it is read (UTF-8: up to 4 bytes a character)."""
    if name.startswith("h:"):
        return 4 * MAX_HEADER_VALUE
    if name.startswith("v:"):
        return MAX_METADATA
    if name.startswith("o:"):
        return 1024
    if name == "subject":
        return 4 * MAX_SUBJECT
    if name == "from":
        return 2048
    return None


def sending_domain(domain: str) -> str:
    """The URL's {domain}, IDNA-encoded and lower-cased as an address's domain is."""
    try:
        return normalize_address(f"postmaster@{domain}", "domain").rpartition("@")[2]
    except BadRequest:
        raise BadRequest(f"the domain in the URL ({domain!r}) is not a valid domain name") from None


def _check_domain(sender: str, domain: str, field: str) -> None:
    expected = sending_domain(domain)
    actual = sender.rpartition("@")[2]
    if actual != expected:
        raise BadRequest(
            f"field {field!r}: the sender's domain ({actual}) is not the sending domain of the URL ({expected})"
        )


class _Form:
    """A form's fields by name, each taken at most once by the parser (what is left is unknown)."""

    def __init__(self, fields: Sequence[Field]) -> None:
        self.groups: dict[str, list[Field]] = {}
        for field in fields:
            self.groups.setdefault(field.name, []).append(field)

    def take(self, name: str) -> list[Field]:
        return self.groups.pop(name, [])

    def prefixed(self, prefix: str) -> list[Field]:
        names = [name for name in self.groups if name.startswith(prefix)]
        return [field for name in names for field in self.groups.pop(name)]

    def text(self, name: str, required: bool = False) -> str | None:
        values = self.take(name)
        if len(values) > 1:
            raise BadRequest(f"field {name!r} is given more than once")
        if not values:
            if required:
                raise BadRequest(f"missing field {name!r}")
            return None
        return _text(values[0])

    def texts(self, name: str) -> list[str]:
        return [_text(field) for field in self.take(name)]

    def check_unknown(self, allowed: frozenset[str]) -> None:
        for name in self.groups:
            if name in UNSUPPORTED or name.startswith("t:"):
                raise BadRequest(f"field {name!r} is not supported by mmgun")
            if name not in allowed:
                raise BadRequest(f"unknown field {name!r}")


def _text(field: Field) -> str:
    if field.filename is not None:
        raise BadRequest(f"field {field.name!r} must be a text field, not a file")
    return field.text()


def _boolean(value: str, field: str) -> bool:
    lower = value.strip().lower()
    if lower in _TRUE:
        return True
    if lower in _FALSE:
        return False
    raise BadRequest(f"field {field!r} must be yes or no (or true or false)")


def _addresses(form: _Form, name: str, limit: int) -> list[Mailbox]:
    mailboxes: list[Mailbox] = []
    values = form.texts(name)
    # Each value is limited while it is read; their repeats are too, before any is parsed.
    most = address_bytes(limit)
    if sum(len(value) for value in values) > most:
        raise BadRequest(f"field {name!r} is longer than {most} characters (all its values together)")
    for value in values:
        for item in parse_address_list(value, name):
            mailboxes.append(parse_mailbox(item, name))
            if len(mailboxes) > limit:
                raise BadRequest(f"field {name!r} lists more than {limit} addresses")
    return mailboxes


def _content_type(field: Field) -> str:
    """The file's declared type; without one, the type its file name's extension stands for."""
    if field.content_type:
        return field.content_type
    guessed, _ = _TYPES.guess_type(field.filename or "", strict=True)
    return guessed or "application/octet-stream"


def _files(form: _Form, name: str, *, inline: bool) -> list[Part]:
    parts = []
    for i, field in enumerate(form.take(name)):
        where = f"{name}[{i}]"
        if field.filename is None:
            raise BadRequest(f"field {where!r} must be a file (a part with a filename)")
        content_id = None
        if inline:
            # As Mailgun: an inline file's name is its content id, cid:NAME in the HTML.
            content_id = check_content_id(field.filename, f"{where}.filename")
        parts.append(make_part(field.filename, _content_type(field), field.value, where, content_id))
    return parts


class _Options:
    """The o:, v: and h: fields common to both endpoints."""

    def __init__(self, form: _Form, *, headers: bool) -> None:
        tags = form.texts("o:tag")
        self.tags = check_tags(tags, "o:tag") if tags else ()
        when = form.text("o:deliverytime")
        self.send_at = parse_date(when, "o:deliverytime") if when is not None else None
        testmode = form.text("o:testmode")
        self.test_mode = testmode is not None and _boolean(testmode, "o:testmode")
        require_tls = form.text("o:require-tls")
        if require_tls is not None and _boolean(require_tls, "o:require-tls"):
            raise BadRequest("field 'o:require-tls' cannot be honoured by mmgun (it does not require TLS per message)")
        for name in IGNORED_OPTIONS:
            for field in form.take(name):
                _text(field)
        variables: dict[str, str] = {}
        for field in form.prefixed("v:"):
            key = field.name[2:]
            if not key or key in variables:
                raise BadRequest(f"field {field.name!r} is empty or given more than once")
            variables[key] = _text(field)
        self.metadata = check_metadata(variables, "v:") if variables else None
        self.headers: tuple[tuple[str, str], ...] = ()
        if headers:
            pairs = []
            for field in form.prefixed("h:"):
                pairs.append((field.name[2:], _text(field)))
            self.headers = check_headers(pairs, "h:")


def _recipient_variables(value: str, max_recipients: int) -> dict[str, dict[str, Any]]:
    """
    A JSON object of at most ``max_recipients`` objects, keyed by address (normalized);
    its numbers finite (1e400 would be substituted as "Infinity").
    """
    try:
        obj = parse_json_object(value.encode("utf-8"))
    except BadRequest as e:
        raise BadRequest(f"field 'recipient-variables': {e}") from None
    if len(obj) > max_recipients:
        raise BadRequest(f"field 'recipient-variables' has more than {max_recipients} entries (one per To address)")
    variables: dict[str, dict[str, Any]] = {}
    for address, values in obj.items():
        if not isinstance(values, dict):
            raise BadRequest("field 'recipient-variables' must be a JSON object of objects (address to its variables)")
        variables[normalize_address(address, "recipient-variables")] = values
    try:
        json.dumps(obj, allow_nan=False)
    except ValueError:
        raise BadRequest("field 'recipient-variables' holds a number too large for JSON (such as 1e400)") from None
    return variables


class _Template:
    """
    A subject, text or HTML with ``%recipient.NAME%`` in it, measured once, so that its
    size once substituted is known before it is built (a 1 KB text naming a 100 KB
    variable 2000 times would be 200 MB).
    """

    def __init__(self, text: str) -> None:
        self.text = text
        #: How often each variable occurs.
        self.counts: dict[str, int] = {}
        references = 0
        for match in _VARIABLE.finditer(text):
            self.counts[match.group(1)] = self.counts.get(match.group(1), 0) + 1
            references += len(match.group(0))  # ASCII: as many octets as characters
        self.characters = len(text) - references
        self.octets = len(text.encode("utf-8")) - references

    def size(self, lengths: dict[str, int], base: int) -> int:
        """The length substituted: ``base`` (characters or octets) plus each variable's ``lengths`` as often as it occurs."""
        return base + sum(count * lengths[name] for name, count in self.counts.items())

    def substitute(self, values: dict[str, str]) -> str:
        if not self.counts:
            return self.text
        return _VARIABLE.sub(lambda match: values[match.group(1)], self.text)


@attrs.frozen
class Batch:
    """
    Mailgun's batch sending, checked: one message per To address, made only when
    iterated (:meth:`mmgun.web.submit.Pipeline.submit_batch` builds each in turn and
    keeps the bytes alone), from a template composed and checked once.
    """

    template: SendRequest
    subject: _Template
    text: _Template | None
    html: _Template | None
    #: Each recipient with the text of every variable the templates name.
    recipients: tuple[tuple[Mailbox, dict[str, str]], ...]

    def __len__(self) -> int:
        return len(self.recipients)

    def __iter__(self) -> Iterator[SendRequest]:
        for mailbox, values in self.recipients:
            yield attrs.evolve(
                self.template,
                recipients=(mailbox.address,),
                to=(mailbox,),
                subject=self.subject.substitute(values),
                body=None if self.text is None else self.text.substitute(values),
                html=None if self.html is None else self.html.substitute(values),
            )


def _value_text(variables: dict[str, Any], name: str) -> str:
    """A variable as substituted: a string as it is, null or a missing one as "", another value as JSON."""
    found = variables.get(name)
    if found is None:
        return ""
    return found if isinstance(found, str) else json.dumps(found, ensure_ascii=False)


def parse_messages(
    fields: Sequence[Field], domain: str, max_recipients: int, max_size: int
) -> tuple[list[SendRequest] | Batch, _Options]:
    """
    The message(s) of a /v3/{domain}/messages form: one, or with ``recipient-variables``
    a :class:`Batch` of one per To address, addressed to it alone, its ``%recipient.NAME%``
    replaced in the subject, text and HTML (by "" where it has no such variable).

    A batch is checked whole before any message of it is made: each recipient's
    variables as the fields they are substituted into, and the sizes the substituted
    texts will have (with the parts, a lower bound of the built message): 413 when one
    message would pass ``max_size``, or all of them together
    :data:`~mmgun.web.submit.MAX_BATCH_FACTOR` times it.
    """
    form = _Form(fields)
    sender = parse_mailbox(form.text("from", required=True) or "", "from")
    _check_domain(sender.address, domain, "from")
    to = _addresses(form, "to", max_recipients)
    cc = _addresses(form, "cc", max_recipients)
    bcc = _addresses(form, "bcc", max_recipients)
    subject = check_subject(form.text("subject", required=True) or "", "subject")
    text = form.text("text")
    html = form.text("html")
    text = check_text(text, "text") if text is not None else None
    html = check_text(html, "html") if html is not None else None
    attachments = _files(form, "attachment", inline=False)
    inline = _files(form, "inline", inline=True)
    variables_text = form.text("recipient-variables")
    options = _Options(form, headers=True)
    form.check_unknown(MESSAGE_FIELDS)
    if not to:
        raise BadRequest("missing field 'to'")

    def one(to: Sequence[Mailbox], *, check_references: bool = True) -> SendRequest:
        return compose(
            sender=sender,
            to=to,
            cc=cc,
            bcc=bcc,
            subject=subject,
            body=text,
            html=html,
            attachments=attachments,
            inline=inline,
            headers=options.headers,
            tags=options.tags,
            metadata=options.metadata,
            send_at=options.send_at,
            max_recipients=max_recipients,
            names=_NAMES,
            check_references=check_references,
        )

    if variables_text is None:
        return [one(to)], options
    variables = _recipient_variables(variables_text, max_recipients)
    if cc or bcc:
        raise BadRequest("fields 'cc' and 'bcc' cannot be combined with 'recipient-variables' (each To address gets its own message)")
    templates = {"subject": _Template(subject)}
    if text is not None:
        templates["text"] = _Template(text)
    if html is not None:
        templates["html"] = _Template(html)
    html_varies = "html" in templates and bool(templates["html"].counts)
    # The template checked once: the cid: references only when the HTML has no variables
    # (they may make or break one, so each recipient's HTML is checked below).
    template = one(to[:1], check_references=not html_varies)
    names = {name for t in templates.values() for name in t.counts}
    mailboxes: dict[str, Mailbox] = {}
    for mailbox in to:
        mailboxes.setdefault(mailbox.address, mailbox)  # the first one's display name
    parts = sum(len(part.content) for part in (*attachments, *inline))
    batch_limit = MAX_BATCH_FACTOR * max_size
    recipients = []
    total = 0
    for mailbox in mailboxes.values():
        values = {name: _value_text(variables.get(mailbox.address, {}), name) for name in names}
        try:
            characters = {name: len(value) for name, value in values.items()}
            octets = {name: len(value.encode("utf-8", "surrogatepass")) for name, value in values.items()}
            for name in templates["subject"].counts:
                check_subject(values[name], "subject")
            if templates["subject"].size(characters, templates["subject"].characters) > MAX_SUBJECT:
                raise BadRequest(f"field 'subject' is longer than {MAX_SUBJECT} characters")
            size = parts
            for field in ("text", "html"):
                if field in templates:
                    for name in templates[field].counts:
                        check_text(values[name], field)
                    size += templates[field].size(octets, templates[field].octets)
            if size > max_size:
                raise MessageTooLarge(f"the message built from this request would be more than {max_size} octets, the maximum")
            if html_varies and inline:
                check_inline_references(templates["html"].substitute(values), inline, _NAMES)
        except BadRequest as e:
            raise type(e)(f"{e} (with the 'recipient-variables' of {mailbox.address})") from None
        total += size
        if total > batch_limit:
            raise MessageTooLarge(
                f"the {len(mailboxes)} messages of this batch would be more than {batch_limit} octets together"
                f" ({MAX_BATCH_FACTOR} times the maximum message size)"
            )
        recipients.append((mailbox, values))
    batch = Batch(template, templates["subject"], templates.get("text"), templates.get("html"), tuple(recipients))
    return batch, options


def parse_mime(
    fields: Sequence[Field], domain: str, max_recipients: int, *, hostname: str, now: float, max_size: int
) -> tuple[RawMessage, str, _Options]:
    """The message of a /v3/{domain}/messages.mime form, checked (:func:`check_mime`), and its Message-ID."""
    form = _Form(fields)
    files = form.take("message")
    if not files:
        raise BadRequest("missing field 'message'")
    if len(files) > 1:
        raise BadRequest("field 'message' is given more than once")
    to = _addresses(form, "to", max_recipients)
    options = _Options(form, headers=False)
    if form.prefixed("h:"):
        raise BadRequest("fields 'h:*' are not taken by messages.mime: put the header fields in the message")
    form.check_unknown(MIME_FIELDS)
    if not to:
        raise BadRequest("missing field 'to'")
    message, message_id, sender = check_mime(files[0].value, hostname=hostname, now=now, max_size=max_size)
    _check_domain(sender, domain, "message")
    raw = RawMessage(
        sender=sender,
        other_senders=other_senders(message),
        recipients=tuple(dict.fromkeys(m.address for m in to)),
        message=message,
        tags=options.tags,
        metadata=options.metadata,
        send_at=options.send_at,
    )
    return raw, message_id, options


#: Header fields that name a sender beside From (RFC 5322 3.6.2, 3.6.6): the sender policy checks them too.
_OTHER_SENDER_FIELDS = frozenset({b"sender", b"resent-from", b"resent-sender"})


def other_senders(message: bytes) -> tuple[str, ...]:
    """
    The addresses of the Sender, Resent-From and Resent-Sender fields of ``message`` (as
    :func:`check_mime` made it: CRLF, an ASCII or UTF-8 header), each once, in order. An item that is
    no plain mailbox (a group, a comment) is given as it is: its "domain" then belongs to
    no client, so the ``domains`` sender policy refuses it rather than let it by unchecked.
    """
    head = message.partition(b"\r\n\r\n")[0]
    found: dict[str, None] = {}
    for field in re.split(rb"\r\n(?![ \t])", head):
        name, colon, value = field.partition(b":")
        if not colon or name.rstrip(b" \t").lower() not in _OTHER_SENDER_FIELDS:
            continue
        text = re.sub(r"\r\n[ \t]", " ", value.decode("utf-8")).strip()
        try:
            items = parse_address_list(text, "message")
        except BadRequest:
            items = [text]
        for item in items:
            try:
                found[parse_mailbox(item, "message").address] = None
            except BadRequest:
                found[item] = None
    return tuple(found)


#: What a UTF-8 header line may not hold: C0 controls but TAB, DEL, C1 controls, line and paragraph separators.
_HEADER_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")


def _header_line_ok(line: bytes, utf8: bool) -> bool:
    """Printable ASCII (and TAB); with ``utf8``, UTF-8 text too (RFC 6532 3.2), without control characters."""
    if line.isascii():
        return not any(b < 0x20 and b != 0x09 for b in line) and b"\x7f" not in line
    if not utf8:
        return False
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return _HEADER_CONTROL.search(text) is None


def check_mime(raw: bytes, *, hostname: str, now: float, max_size: int, utf8: bool = False) -> tuple[bytes, str, str]:
    """
    A complete message as mmgun queues it, its Message-ID, and the address of its From.

    Its line breaks are made CRLF (SMTP's, and what mmgun sends). Its header fields are
    checked as mmgun's own: each a field name and printable ASCII (RFC 2047 for anything
    else; with ``utf8``, for a message submitted with SMTPUTF8, UTF-8 text too, as RFC 6532
    allows, still without control characters), lines of at most 998 octets, no NUL; From (one mailbox, whose address is the
    envelope sender), Sender, Reply-To, To, Cc, Subject, Date and Message-ID at most once;
    a Date and a Message-ID are added at the top when missing; Bcc fields are removed
    (Bcc recipients are in ``to``, never in a header). The body is kept as it is but for
    its line breaks: 8-bit octets allowed, no NUL, lines of at most 998 octets.
    """
    field = "message"
    text = re.sub(rb"\r\n|\r|\n", b"\r\n", raw)
    if text.startswith(b"\r\n"):
        raise BadRequest(f"field {field!r} has no header")
    head, blank, body = text.partition(b"\r\n\r\n")
    if not blank:
        head = head.removesuffix(b"\r\n")
    if b"\0" in text:
        raise BadRequest(f"field {field!r} holds a NUL octet")
    if _LONG_LINE.search(text):
        raise BadRequest(f"field {field!r} has a line longer than 998 octets")
    fields: list[list[bytes]] = []
    for number, line in enumerate(head.split(b"\r\n"), 1):
        if not _header_line_ok(line, utf8):
            if utf8:
                raise BadRequest(f"field {field!r}: header line {number} is not UTF-8 text without control characters")
            raise BadRequest(f"field {field!r}: header line {number} holds octets other than printable ASCII (encode them as RFC 2047 says)")
        if line[:1] in (b" ", b"\t"):
            if not fields:
                raise BadRequest(f"field {field!r}: its first header line is a continuation line")
            fields[-1].append(line)
            continue
        name, colon, _ = line.partition(b":")
        if not colon or not name.isascii() or not FIELD_NAME.fullmatch(name.decode("ascii")):
            raise BadRequest(f"field {field!r}: header line {number} is not a header field (Name: value)")
        fields.append([line])
    values: dict[str, list[str]] = {}
    kept: list[bytes] = []
    for lines in fields:
        name, _, first = lines[0].partition(b":")
        lower = name.decode("ascii").lower()
        value = b" ".join([first.strip(b" \t"), *(line.strip(b" \t") for line in lines[1:])]).decode("utf-8")
        values.setdefault(lower, []).append(value)
        if lower != "bcc":
            kept.extend(lines)
    for once in _ONCE:
        if len(values.get(once, ())) > 1:
            raise BadRequest(f"field {field!r} has more than one {once} header field")
    froms = values.get("from")
    if not froms:
        raise BadRequest(f"field {field!r} has no From header field")
    mailboxes = parse_address_list(froms[0], f"{field}: From")
    if len(mailboxes) != 1:
        raise BadRequest(f"field {field!r}: its From header field must name exactly one mailbox")
    sender = parse_mailbox(mailboxes[0], f"{field}: From").address
    added: list[bytes] = []
    if "date" not in values:
        added.append(b"Date: " + format_datetime(datetime.fromtimestamp(int(now), UTC)).encode("ascii"))
    if "message-id" in values:
        message_id = values["message-id"][0].strip()
        if not _MSG_ID.fullmatch(message_id):
            raise BadRequest(f"field {field!r}: its Message-ID is not <id-left@id-right>")
    else:
        message_id = new_message_id(hostname)
        added.append(b"Message-ID: " + message_id.encode("ascii"))
    message = b"\r\n".join(added + kept) + b"\r\n\r\n" + body
    if len(message) > max_size:
        raise MessageTooLarge(f"the message would be {len(message)} octets, more than the maximum of {max_size}")
    return message, message_id, sender


def _shielded(work: Coroutine[Any, Any, bytes], on_lost: Callable[[Failure], None]) -> Deferred[bytes]:
    """
    ``work``'s result, in a Deferred whose cancelling (Klein cancels a handler's Deferred
    when its client goes away) does not reach ``work``: a submission being committed is
    kept, and its outcome handed to ``on_lost`` if it fails after the client has gone.
    """
    outer: Deferred[bytes] = Deferred(lambda d: None)

    def done(result: bytes | Failure) -> None:
        if outer.called:
            if isinstance(result, Failure):
                on_lost(result)
            return
        if isinstance(result, Failure):
            outer.errback(result)
        else:
            outer.callback(result)

    Deferred.fromCoroutine(work).addBoth(done)
    return outer


class MailgunAPI:
    """The v3 endpoints: a Klein app (:meth:`resource`) on the shared :class:`.submit.Pipeline`."""

    app = Klein()

    def __init__(
        self,
        pipeline: Pipeline,
        store: Store,
        settings: WebSettings,
        *,
        metrics: Metrics,
        wall: Callable[[], float],
    ) -> None:
        self._pipeline = pipeline
        self._store = store
        self._settings = settings
        self._metrics = metrics
        self._wall = wall
        self._events = EventsAPI(pipeline, store)
        self._suppressions = V3Suppressions(pipeline, store, wall=wall, shape=error_document)
        self._webhooks = V3Webhooks(pipeline, store, wall=wall, shape=error_document)

    def resource(self) -> Any:
        return self.app.resource()

    def operations(self) -> set[tuple[str, str]]:
        """Every (method, path) routed, in the OpenAPI document's spelling."""
        return {
            ("POST", "/v3/{domain}/messages"),
            ("POST", "/v3/{domain}/messages.mime"),
            ("GET", "/v3/{domain}/events"),
            ("GET", "/v3/{domain}/events/{page}"),
            *((method, "/v3/{domain}/{table}") for method in ("GET", "POST", "DELETE")),
            *((method, "/v3/{domain}/{table}/{address}") for method in ("GET", "DELETE")),
            *((method, "/v3/domains/{domain}/webhooks") for method in ("GET", "POST")),
            *((method, "/v3/domains/{domain}/webhooks/{webhook}") for method in ("GET", "PUT", "DELETE")),
        }

    @app.route("/v3/<domain>/messages", methods=["POST"])
    def messages(self, request: IRequest, domain: str) -> Deferred[bytes]:
        return _shielded(self._messages(request, domain), self._lost(request))

    @app.route("/v3/<domain>/messages.mime", methods=["POST"])
    def messages_mime(self, request: IRequest, domain: str) -> Deferred[bytes]:
        return _shielded(self._messages_mime(request, domain), self._lost(request))

    @app.route("/v3/<domain>/<any(bounces, unsubscribes, complaints):table>", methods=["GET", "POST", "DELETE"])
    def suppressions(self, request: IRequest, domain: str, table: str) -> Deferred[bytes]:
        """issue 14: a suppression list (:mod:`.suppressions_api`): a page of it, entries added, all removed."""
        return _shielded(self._suppressions.table(request, domain, table), self._lost(request))

    @app.route("/v3/<domain>/<any(bounces, unsubscribes, complaints):table>/<path:address>", methods=["GET", "DELETE"])
    def suppression(self, request: IRequest, domain: str, table: str, address: str) -> Deferred[bytes]:
        return _shielded(self._suppressions.entry(request, domain, table, address), self._lost(request))

    @app.route("/v3/domains/<domain>/webhooks", methods=["GET", "POST"])
    def webhooks(self, request: IRequest, domain: str) -> Deferred[bytes]:
        """issue 14: a sending domain's webhooks (:mod:`.webhooks_api`)."""
        return _shielded(self._webhooks.collection(request, domain), self._lost(request))

    @app.route("/v3/domains/<domain>/webhooks/<webhook>", methods=["GET", "PUT", "DELETE"])
    def webhook(self, request: IRequest, domain: str, webhook: str) -> Deferred[bytes]:
        return _shielded(self._webhooks.one(request, domain, webhook), self._lost(request))

    @app.route("/v3/<domain>/events", methods=["GET"])
    def events(self, request: IRequest, domain: str) -> Deferred[bytes]:
        """issue 14: the event log of a sending domain (:mod:`.events_api`)."""
        return Deferred.fromCoroutine(self._events_page(request, domain, None))

    @app.route("/v3/<domain>/events/<page>", methods=["GET"])
    def events_page(self, request: IRequest, domain: str, page: str) -> Deferred[bytes]:
        return Deferred.fromCoroutine(self._events_page(request, domain, page))

    async def _events_page(self, request: IRequest, domain: str, page: str | None) -> bytes:
        client = await self._pipeline.authenticate(request)
        name = sending_domain(domain)
        if not await self._pipeline.domains.owned(client, name):
            raise HTTPError(404, f"Domain not found: {name}")
        return await self._events.v3(request, client, name, page)

    @app.handle_errors(Exception)
    def error(self, request: IRequest, failure: Failure) -> bytes:
        """Every failure of this app, in Mailgun's shape through the one mapping (:func:`.errors.error_answer`)."""
        error = failure.value
        counted = True
        if isinstance(error, (NotFound, RequestRedirect)):
            failure, counted = Failure(no_such_endpoint()), False
        elif isinstance(error, MethodNotAllowed):
            allowed = tuple(sorted(m.encode("ascii") for m in (error.valid_methods or ())))
            failure = Failure(method_not_allowed(request.method, allowed))
        answer = error_answer(failure, self._store, request.path)
        if counted:
            self._metrics.rejected.labels(answer.reason).inc()
        return render_error(request, answer, error_document)

    def _lost(self, request: IRequest) -> Callable[[Failure], None]:
        path = request.path

        def lost(failure: Failure) -> None:
            error_answer(failure, self._store, path)  # logs what is not the client's doing

        return lost

    async def _read(self, request: IRequest, domain: str) -> tuple[str, list[Field]]:
        client = await self._pipeline.authenticate(request)
        # Mailgun's answer for a domain not in the account: the same for another client's.
        name = sending_domain(domain)
        if not await self._pipeline.domains.owned(client, name):
            raise HTTPError(404, f"Domain not found: {name}")
        if request.getHeader(b"idempotency-key") is not None:
            raise BadRequest("header 'Idempotency-Key' is not supported by the v3 API (use POST /send)")
        body = read_body(request, self._settings.max_message_size)
        return client, read_form(request.getHeader(b"content-type"), body, field_limits(self._settings.max_recipients), MAX_PARTS)

    async def _messages(self, request: IRequest, domain: str) -> bytes:
        client, fields = await self._read(request, domain)
        settings = self._settings
        sends, options = parse_messages(fields, domain, settings.max_recipients, settings.max_message_size)
        sender = sends.template.sender if isinstance(sends, Batch) else sends[0].sender
        message_id = new_message_id(settings.hostname)
        await self._pipeline.submit_batch(
            client, sends, sender=sender, send_at=options.send_at, message_id=message_id, test_mode=options.test_mode, schedule_field="o:deliverytime"
        )
        return json_response(request, 200, {"id": message_id, "message": QUEUED})

    async def _messages_mime(self, request: IRequest, domain: str) -> bytes:
        client, fields = await self._read(request, domain)
        settings = self._settings
        raw, message_id, options = parse_mime(
            fields, domain, settings.max_recipients, hostname=settings.hostname, now=self._wall(), max_size=settings.max_message_size
        )
        await self._pipeline.submit(
            client, raw, None, message_id=message_id, test_mode=options.test_mode, schedule_field="o:deliverytime"
        )
        return json_response(request, 200, {"id": message_id, "message": QUEUED})

