"""
From an untrusted request to a validated message and its RFC 5322 form.

:class:`SendRequest` is the message both APIs produce: :func:`parse_send` makes one from
the JSON API's object, :func:`compose` from values another API has already taken apart
(each value checked by the ``check_*``/``parse_*`` functions here, naming its field), and
:func:`build_message` writes it as MIME (with the encoders of :mod:`mmgun.mime`).

Everything here is pure: no I/O, no clock (the caller passes the time); the one source
of randomness is the Message-ID and the multipart boundaries.
"""

from __future__ import annotations

import binascii
import functools
import hashlib
import json
import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime, make_msgid, parsedate_tz
from typing import Any

import attrs
import idna

from . import mime

MAX_DEPTH = 32
MAX_SUBJECT = 998
#: RFC 5322 atext, the characters of a dot-atom local part, and RFC 6531 3.3's UTF8-non-ascii
#: (any non-ASCII character; the controls and separators among them are refused before).
_ATEXT = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\u0080-\U0010ffff-]+")
#: RFC 5321 4.5.3.1: a local part of at most 64 octets, a path of at most 256 (254 without its brackets).
MAX_LOCAL_PART = 64
MAX_ADDRESS = 254
_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
#: The seed's fields but its body; the others of /send are optional.
REQUIRED_FIELDS = ("sender", "recipients", "subject")
OPTIONAL_FIELDS = ("body", "html", "cc", "bcc", "reply_to", "attachments", "inline", "headers", "tags", "metadata", "send_at")
SEND_FIELDS = REQUIRED_FIELDS + OPTIONAL_FIELDS

#: Limits on what one message may carry (each refused with a 400 naming the field).
MAX_NAME = 200
MAX_PARTS = 100
MAX_FILENAME = 255
MAX_CONTENT_ID = 200
MAX_CONTENT_TYPE = 255
MAX_HEADERS = 50
MAX_HEADER_NAME = 76
MAX_HEADER_VALUE = 998
MAX_TAGS = 3
MAX_TAG = 128
MAX_METADATA = 4096
MAX_SCHEDULE = 7 * 86400.0
#: Header fields a client may not set: those mmgun writes (the message's identity, its
#: addresses, its MIME structure), Bcc (never in a header), and those only a transport
#: writes (Sender, Return-Path, Received, DKIM-Signature). Content-* too, by prefix.
#: Reply-To has its own field; a Reply-To in ``headers`` is taken as that field.
FORBIDDEN_HEADERS = frozenset(
    {
        "from",
        "sender",
        "to",
        "cc",
        "bcc",
        "subject",
        "date",
        "message-id",
        "mime-version",
        "return-path",
        "received",
        "dkim-signature",
    }
)
#: RFC 5322 field-name: printable ASCII but ":".
FIELD_NAME = re.compile(r"[!-9;-~]+")
#: RFC 6838 restricted-name, for a media type's type and subtype.
_RESTRICTED_NAME = r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}"
#: RFC 2045 token; an attribute without RFC 2231's "*", "'" and "%".
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_ATTRIBUTE = r"[!#$&+.^_`|~0-9A-Za-z-]+"
_QUOTED = r'"(?:[^"\\\x00-\x1f\x7f]|\\[\x20-\x7e])*"'
_PARAMETER = re.compile(rf"[ \t]*;[ \t]*({_ATTRIBUTE})=({_TOKEN}|{_QUOTED})")
_MEDIA_TYPE = re.compile(rf"[ \t]*({_RESTRICTED_NAME})/({_RESTRICTED_NAME})((?:{_PARAMETER.pattern})*)[ \t]*")
#: Top-level media types a part may have. multipart and message are composite: they may
#: not be base64-encoded (RFC 2046 5), and mmgun builds the multiparts itself.
MEDIA_TYPES = frozenset({"application", "audio", "font", "haptics", "image", "model", "text", "video"})
#: Parameters of a part's Content-Type that mmgun writes itself.
_OWN_PARAMETERS = frozenset({"name", "filename", "boundary"})
#: A content id: dot-atom text with "@" (a msg-id without its brackets), no "%" (which a cid: URL would escape).
_CONTENT_ID = re.compile(r"[A-Za-z0-9!#$&'*+/=?^_`{|}~.@-]+")
_CID_CHAR = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.@-]"
#: Bidirectional overrides, embeddings and isolates: a filename "gpj.exe" shown as "exe.jpg".
_BIDI = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c")


class BadRequest(Exception):
    """The request is invalid; the message names the field and is safe to show the client."""

    #: The HTTP status for it.
    status = 400


class MessageTooLarge(BadRequest):
    """The message built from a request would pass the maximum message size (HTTP 413)."""

    status = 413


@attrs.frozen
class Mailbox:
    """An address as a header shows it: the normalized address and an optional display name."""

    address: str
    #: No control characters, runs of spaces made one, no leading or trailing space; None: no name.
    name: str | None = None


@attrs.frozen
class Part:
    """An attachment or an inline part: exactly these bytes arrive, base64-encoded."""

    filename: str
    #: "type/subtype", lower case.
    content_type: str
    content: bytes
    #: Inline parts only: the id the HTML refers to as ``cid:<content_id>`` (without brackets).
    content_id: str | None = None
    #: The Content-Type's parameters given with it (attribute lower case), e.g. (("charset", "utf-8"),).
    parameters: tuple[tuple[str, str], ...] = ()


def _to_from_recipients(request: SendRequest) -> tuple[Mailbox, ...]:
    return tuple(Mailbox(address) for address in request.recipients)


@attrs.frozen
class SendRequest:
    """
    A validated message. Made by :func:`parse_send` or :func:`compose`, which check every
    field; constructed directly (tests, the bench), ``to`` defaults to ``recipients``.
    """

    #: The envelope sender: a bare, normalized address.
    sender: str
    #: Every envelope recipient (to, cc and bcc), normalized, de-duplicated, in order.
    recipients: tuple[str, ...]
    subject: str
    #: The text part (line breaks as given; None: no text part).
    body: str | None
    #: The HTML part (None: no HTML part).
    html: str | None = None
    #: The display name of the From header.
    sender_name: str | None = None
    #: The To header, de-duplicated by address.
    to: tuple[Mailbox, ...] = attrs.field(default=attrs.Factory(_to_from_recipients, takes_self=True))
    cc: tuple[Mailbox, ...] = ()
    #: Envelope recipients only: in no header, ever.
    bcc: tuple[str, ...] = ()
    reply_to: tuple[Mailbox, ...] = ()
    attachments: tuple[Part, ...] = ()
    inline: tuple[Part, ...] = ()
    #: Extra header fields, checked: (name as given, value), in order.
    headers: tuple[tuple[str, str], ...] = ()
    tags: tuple[str, ...] = ()
    #: The metadata object as compact JSON text; None when there is none.
    metadata: str | None = None
    #: Do not deliver before this POSIX time (as given; see :meth:`schedule`).
    send_at: float | None = None

    def _is_plain(self) -> bool:
        """Only the seed's four fields (a message the seed's API could have asked for)."""
        return (
            self.html is None
            and self.sender_name is None
            and not (self.cc or self.bcc or self.reply_to or self.attachments or self.inline)
            and not (self.headers or self.tags)
            and self.metadata is None
            and self.send_at is None
            and self.body is not None
            and len(self.to) == len(self.recipients)
            and all(m.name is None and m.address == a for m, a in zip(self.to, self.recipients, strict=True))
        )

    def digest(self) -> str:
        """
        Identifies the request's content, for Idempotency-Key replays: every field counts.
        A request with only the seed's fields has the seed's digest, so a key used just
        before an upgrade is still honoured after it.
        """
        if self._is_plain():
            canonical = json.dumps([self.sender, list(self.recipients), self.subject, self.body])
            return hashlib.sha256(canonical.encode("utf-8")).hexdigest()
        parts = self.attachments + self.inline

        def mailboxes(boxes: tuple[Mailbox, ...]) -> list[list[str | None]]:
            return [[m.address, m.name] for m in boxes]

        head = [
            2,
            self.sender,
            self.sender_name,
            list(self.recipients),
            mailboxes(self.to),
            mailboxes(self.cc),
            list(self.bcc),
            mailboxes(self.reply_to),
            self.subject,
            self.body,
            self.html,
            [list(h) for h in self.headers],
            list(self.tags),
            self.metadata,
            self.send_at,
            len(self.attachments),
            [[p.filename, p.content_type, [list(x) for x in p.parameters], p.content_id, len(p.content)] for p in parts],
        ]
        h = hashlib.sha256(json.dumps(head).encode("utf-8"))
        # The lengths above make the concatenation unambiguous.
        for part in parts:
            h.update(part.content)
        return h.hexdigest()

    def smtputf8(self) -> bool:
        """
        Whether an address of the envelope or of a header field has a UTF-8 local part:
        the message is then internationalized (RFC 6532, UTF-8 in its address fields) and
        can only be sent with SMTPUTF8 (RFC 6531).
        """
        if not (self.sender.isascii() and all(a.isascii() for a in self.recipients)):
            return True
        return not all(m.address.isascii() for m in (*self.to, *self.cc, *self.reply_to))

    def schedule(self, now: float, field: str = "send_at") -> float | None:
        """:func:`schedule` of this message's ``send_at``."""
        return schedule(self.send_at, now, field)


def schedule(send_at: float | None, now: float, field: str = "send_at") -> float | None:
    """
    When the first delivery attempt may be made: None for at once (no ``send_at``, or
    one that has passed), else ``send_at``. BadRequest (naming ``field``) if it is more
    than 7 days after ``now``.
    """
    if send_at is None or send_at <= now:
        return None
    if send_at > now + MAX_SCHEDULE:
        raise BadRequest(f"field {field!r} is more than 7 days ahead")
    return send_at


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """One UTF-8 JSON object; strict about everything Python's json tolerates."""
    value = parse_json(raw)
    if not isinstance(value, dict):
        raise BadRequest("request body must be a JSON object")
    return value


def parse_json(raw: bytes) -> Any:
    """One UTF-8 JSON value (any kind), as strictly as :func:`parse_json_object` reads an object."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("request body is not valid UTF-8") from None
    try:
        value = _DECODER.decode(text)
    except RecursionError:
        raise BadRequest(f"JSON nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as e:
        raise BadRequest(f"malformed JSON: {e}") from None
    # Fewer brackets than levels allowed cannot nest too deep: no need to walk the tree.
    if raw.count(b"{") + raw.count(b"[") > MAX_DEPTH and _depth(value) > MAX_DEPTH:
        raise BadRequest(f"JSON nested deeper than {MAX_DEPTH} levels")
    return value


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """JSON objects with a key twice are refused, not silently resolved."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _no_constants(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_constant=_no_constants)


def _depth(value: Any) -> int:
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (dict, list)):
            if level > MAX_DEPTH:
                return level
            deepest = max(deepest, level)
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, level + 1) for child in children)
    return deepest


def check_fields(obj: dict[str, Any], allowed: tuple[str, ...], required: tuple[str, ...] | None = None) -> None:
    """Refuse unknown fields (so a typo is never silently ignored) and missing ones (all of ``allowed`` by default)."""
    for key in obj:
        if key not in allowed:
            raise BadRequest(f"unknown field {key!r}")
    for key in allowed if required is None else required:
        if key not in obj:
            raise BadRequest(f"missing field {key!r}")


def parse_send(obj: dict[str, Any], max_recipients: int) -> SendRequest:
    """
    The fields of /send, credentials already taken out. Optional fields may be null
    (the same as absent). The caller checks ``send_at``'s horizon with
    :meth:`SendRequest.schedule` once it knows the time.
    """
    check_fields(obj, SEND_FIELDS, REQUIRED_FIELDS)
    sender = parse_mailbox(_string(obj, "sender"), "sender")
    to = _mailbox_list(obj, "recipients", max_recipients, required=True)
    subject = check_subject(_string(obj, "subject"), "subject")
    if len(obj) == 4 and isinstance(obj.get("body"), str):
        # The seed's request: nothing else to look at.
        return compose(sender=sender, to=to, subject=subject, body=check_text(_string(obj, "body"), "body"), max_recipients=max_recipients)
    get = {key: value for key, value in obj.items() if value is not None}.get
    body = check_text(_string(obj, "body"), "body") if get("body") is not None else None
    html = check_text(_string(obj, "html"), "html") if get("html") is not None else None
    cc = _mailbox_list(obj, "cc", max_recipients) if get("cc") is not None else ()
    bcc = _mailbox_list(obj, "bcc", max_recipients) if get("bcc") is not None else ()
    reply_to: Sequence[Mailbox] = ()
    if get("reply_to") is not None:
        value = obj["reply_to"]
        reply_to = _mailbox_list(obj, "reply_to", 50) if isinstance(value, list) else [parse_mailbox(_string(obj, "reply_to"), "reply_to")]
    attachments = _parts(obj["attachments"], "attachments", inline=False) if get("attachments") is not None else ()
    inline = _parts(obj["inline"], "inline", inline=True) if get("inline") is not None else ()
    headers: Sequence[tuple[str, str]] = ()
    if get("headers") is not None:
        value = obj["headers"]
        if not isinstance(value, dict):
            raise BadRequest("field 'headers' must be an object of header names to string values")
        headers = check_headers(value.items(), "headers")
    tags = check_tags(obj["tags"], "tags") if get("tags") is not None else ()
    metadata = check_metadata(obj["metadata"], "metadata") if get("metadata") is not None else None
    send_at = parse_date(obj["send_at"], "send_at") if get("send_at") is not None else None
    return compose(
        sender=sender,
        to=to,
        cc=cc,
        bcc=bcc,
        reply_to=reply_to,
        subject=subject,
        body=body,
        html=html,
        attachments=attachments,
        inline=inline,
        headers=headers,
        tags=tags,
        metadata=metadata,
        send_at=send_at,
        max_recipients=max_recipients,
    )


def compose(
    *,
    sender: Mailbox,
    to: Sequence[Mailbox],
    subject: str,
    body: str | None,
    max_recipients: int,
    html: str | None = None,
    cc: Sequence[Mailbox] = (),
    bcc: Sequence[Mailbox] = (),
    reply_to: Sequence[Mailbox] = (),
    attachments: Sequence[Part] = (),
    inline: Sequence[Part] = (),
    headers: Sequence[tuple[str, str]] = (),
    tags: Sequence[str] = (),
    metadata: str | None = None,
    send_at: float | None = None,
    names: Mapping[str, str] | None = None,
    check_references: bool = True,
) -> SendRequest:
    """
    The checks that span fields, on values each already checked on its own (by
    :func:`parse_mailbox`, :func:`check_subject`, :func:`check_text`, :func:`make_part`,
    :func:`check_headers`, :func:`check_tags`, :func:`check_metadata`, :func:`parse_date`):
    a text or HTML part; at most ``max_recipients`` addresses in to, cc and bcc together;
    at most 100 parts; every inline part's content id unique and referenced as ``cid:``
    in the HTML; a Reply-To among ``headers`` taken as ``reply_to``. ``names`` maps the
    JSON API's field names (recipients, body, html, cc, bcc, reply_to, attachments,
    inline, headers) to the caller's for the error messages. ``check_references=False``
    leaves the ``cid:`` references to the caller (who checks them with
    :func:`check_inline_references` in the HTML it substitutes).
    """

    def name(field: str) -> str:
        return names.get(field, field) if names else field

    if body is None and html is None:
        raise BadRequest(f"missing field {name('body')!r} (or {name('html')!r})")
    if not to:
        raise BadRequest(f"field {name('recipients')!r} must be a non-empty list of addresses")
    if len(to) + len(cc) + len(bcc) > max_recipients:
        raise BadRequest(
            f"fields {name('recipients')!r}, {name('cc')!r} and {name('bcc')!r} list more than {max_recipients} addresses together"
        )
    if len(attachments) + len(inline) > MAX_PARTS:
        raise BadRequest(f"fields {name('attachments')!r} and {name('inline')!r} hold more than {MAX_PARTS} parts together")
    seen: set[str] = set()
    for i, part in enumerate(inline):
        field = f"{name('inline')}[{i}]"
        if part.content_id is None:
            raise BadRequest(f"field {field!r} needs a content_id")
        if part.content_id in seen:
            raise BadRequest(f"field {field!r} repeats content_id {part.content_id!r}")
        seen.add(part.content_id)
    if check_references and inline:
        check_inline_references(html, inline, names)
    kept = []
    for header, value in headers:
        if header.lower() == "reply-to":
            prefix = name("headers")
            field = f"{prefix}{header}" if prefix.endswith(":") else f"{prefix}.{header}"
            if reply_to:
                raise BadRequest(f"field {field!r} and field {name('reply_to')!r} both set Reply-To")
            reply_to = [parse_mailbox(item, field) for item in parse_address_list(value, field)]
            if not reply_to:
                raise BadRequest(f"field {field!r} names no address")
        else:
            kept.append((header, value))
    to = _unique(to)
    cc = _unique(cc)
    envelope = dict.fromkeys(m.address for m in (*to, *cc, *bcc))
    return SendRequest(
        sender=sender.address,
        recipients=tuple(envelope),
        subject=subject,
        body=body,
        html=html,
        sender_name=sender.name,
        to=to,
        cc=cc,
        bcc=tuple(dict.fromkeys(m.address for m in bcc)),
        reply_to=_unique(reply_to),
        attachments=tuple(attachments),
        inline=tuple(inline),
        headers=tuple(kept),
        tags=tuple(tags),
        metadata=metadata,
        send_at=send_at,
    )


def _unique(mailboxes: Iterable[Mailbox]) -> tuple[Mailbox, ...]:
    """One mailbox per address, the first one's name kept, in order."""
    seen: dict[str, Mailbox] = {}
    for m in mailboxes:
        seen.setdefault(m.address, m)
    return tuple(seen.values())


#: A ``cid:`` URL (RFC 2392) and the whole id after it; a lookahead, so that one found
#: inside another's id ("cid:a:cid:b" refers to b too) is not skipped.
_CID_URL = re.compile(f"(?i:cid:)(?=({_CID_CHAR}+))")


def cid_references(html: str) -> set[str]:
    """Every content id ``html`` refers to as ``cid:<id>``: one scan, however many inline parts there are."""
    return set(_CID_URL.findall(html))


def check_inline_references(html: str | None, inline: Sequence[Part], names: Mapping[str, str] | None = None) -> None:
    """Every inline part's content id referred to as ``cid:<id>`` in ``html`` (not merely a longer id starting with it)."""
    references = cid_references(html) if html is not None else set()
    for i, part in enumerate(inline):
        if part.content_id not in references:
            inline_name = names.get("inline", "inline") if names else "inline"
            html_name = names.get("html", "html") if names else "html"
            raise BadRequest(
                f"field '{inline_name}[{i}]': content_id {part.content_id!r} is not referenced as cid:{part.content_id} in {html_name!r}"
            )


def _mailbox_list(obj: dict[str, Any], field: str, limit: int, required: bool = False) -> list[Mailbox]:
    values = obj[field]
    if not isinstance(values, list) or (required and not values):
        raise BadRequest(f"field {field!r} must be a {'non-empty ' if required else ''}list of addresses")
    if len(values) > limit:
        raise BadRequest(f"field {field!r} lists more than {limit} addresses")
    mailboxes = []
    for i, value in enumerate(values):
        if not isinstance(value, str):
            raise BadRequest(f"field '{field}[{i}]' must be a string")
        mailboxes.append(parse_mailbox(value, f"{field}[{i}]"))
    return mailboxes


def _string(obj: dict[str, Any], field: str) -> str:
    value = obj[field]
    if not isinstance(value, str):
        raise BadRequest(f"field {field!r} must be a string")
    if _has_surrogates(value):
        raise BadRequest(f"field {field!r} is not valid Unicode text")
    return value


def _has_surrogates(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _controls(value: str, tab: bool = True) -> bool:
    """Whether ``value`` holds a control character (but TAB when ``tab``) or a line or paragraph separator."""
    return any((c != "\t" or not tab) and unicodedata.category(c) in ("Cc", "Zl", "Zp") for c in value)


# -- values, each checked on its own (any API) -----------------------------------------


def check_subject(subject: str, field: str) -> str:
    """
    A Subject from any API, also after a batch send's substitutions: one line of Unicode
    text (a lone surrogate cannot be encoded, so it is refused here, not at encoding).
    """
    if _has_surrogates(subject):
        raise BadRequest(f"field {field!r} is not valid Unicode text")
    if _controls(subject):
        raise BadRequest(f"field {field!r} must not contain CR, LF, NUL or other control characters or line separators")
    if len(subject) > MAX_SUBJECT:
        raise BadRequest(f"field {field!r} is longer than {MAX_SUBJECT} characters")
    return subject


def check_text(text: str, field: str) -> str:
    """A text or HTML part: any Unicode text without NUL."""
    if "\0" in text:
        raise BadRequest(f"field {field!r} must not contain NUL")
    if _has_surrogates(text):
        raise BadRequest(f"field {field!r} is not valid Unicode text")
    return text


def parse_mailbox(value: str, field: str) -> Mailbox:
    """
    ``local@domain``, or ``Display Name <local@domain>`` (the name plain or a quoted
    string with backslash escapes). The address is normalized (:func:`normalize_address`);
    the name may hold any character but controls, line separators, ``<``, ``>`` and
    (unquoted) ``"``; runs of spaces become one.
    """
    if not value.endswith(">"):
        return Mailbox(normalize_address(value, field))
    bad = f"field {field!r} is not a valid address (local@domain or Name <local@domain>)"
    lt = value.rfind("<")
    if lt < 0:
        raise BadRequest(bad)
    address = normalize_address(value[lt + 1 : -1], field)
    raw = value[:lt].strip(" ")
    if len(raw) >= 2 and raw[0] == raw[-1] == '"':
        name = re.sub(r'\\(.)|(")', lambda m: m.group(1) if m.group(1) is not None else "\0", raw[1:-1], flags=re.DOTALL)
    elif '"' in raw:
        raise BadRequest(bad)
    else:
        name = raw
    if "\0" in name or "<" in name or ">" in name or _controls(name, tab=False) or _has_surrogates(name) or any(c in _BIDI for c in name):
        raise BadRequest(f"field {field!r} has a display name with characters it may not hold")
    name = " ".join(word for word in name.split(" ") if word)
    if len(name) > MAX_NAME:
        raise BadRequest(f"field {field!r} has a display name longer than {MAX_NAME} characters")
    return Mailbox(address, name or None)


def parse_address_list(value: str, field: str) -> list[str]:
    """
    Split a comma-separated list of addresses (as Mailgun's form fields carry them) at the
    commas outside quoted strings and angle brackets; surrounding spaces are dropped and
    empty items ignored. Each item still goes through :func:`parse_mailbox`.
    """
    items: list[str] = []
    current: list[str] = []
    quoted = angle = escaped = False
    for c in value:
        if escaped:
            escaped = False
        elif quoted and c == "\\":
            escaped = True
        elif c == '"' and not angle:
            quoted = not quoted
        elif c == "<" and not quoted:
            angle = True
        elif c == ">" and not quoted:
            angle = False
        elif c == "," and not quoted and not angle:
            items.append("".join(current).strip(" \t"))
            current = []
            continue
        current.append(c)
    if quoted or angle:
        raise BadRequest(f"field {field!r} has an unclosed quote or angle bracket")
    items.append("".join(current).strip(" \t"))
    return [item for item in items if item]


def check_filename(value: str, field: str) -> str:
    """A file's name, not a path: no "/" or "\\", no control or bidirectional-override characters, not "." or ".."."""
    if not value or len(value) > MAX_FILENAME:
        raise BadRequest(f"field {field!r} must be 1 to {MAX_FILENAME} characters")
    if "/" in value or "\\" in value or value in (".", ".."):
        raise BadRequest(f"field {field!r} must be a file name, not a path")
    if _controls(value, tab=False) or _has_surrogates(value) or any(c in _BIDI for c in value):
        raise BadRequest(f"field {field!r} must not contain control, line separator or bidirectional override characters")
    return value


def parse_content_type(value: str, field: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """
    ``type/subtype`` with optional ``; attribute=value`` parameters, as (lower-case
    type/subtype, parameters). Not a composite type (multipart, message), and not the
    parameters mmgun writes itself (name, filename, boundary).
    """
    match = _MEDIA_TYPE.fullmatch(value) if len(value) <= MAX_CONTENT_TYPE else None
    if match is None:
        raise BadRequest(f"field {field!r} is not a MIME type (type/subtype)")
    top, sub = match.group(1).lower(), match.group(2).lower()
    if top not in MEDIA_TYPES:
        raise BadRequest(f"field {field!r}: {top}/{sub} is not a MIME type a part may have")
    parameters: dict[str, str] = {}
    for attribute, raw in _PARAMETER.findall(match.group(3)):
        attribute = attribute.lower()
        if attribute in _OWN_PARAMETERS or attribute in parameters:
            raise BadRequest(f"field {field!r} may not set the parameter {attribute!r}")
        parameters[attribute] = re.sub(r"\\(.)", r"\1", raw[1:-1]) if raw.startswith('"') else raw
    return f"{top}/{sub}", tuple(parameters.items())


def check_content_id(value: str, field: str) -> str:
    """A content id (its angle brackets, if given, dropped): dot-atom text with "@", no "%"."""
    if value.startswith("<") and value.endswith(">"):
        value = value[1:-1]
    if len(value) > MAX_CONTENT_ID or not _CONTENT_ID.fullmatch(value):
        raise BadRequest(f"field {field!r} must be 1 to {MAX_CONTENT_ID} letters, digits and !#$&'*+/=?^_`{{|}}~.@-")
    return value


def decode_base64(value: str, field: str) -> bytes:
    """Standard base64 (RFC 4648 4) with its padding, nothing after it; line breaks and spaces in it are ignored."""
    try:
        data = value.encode("ascii").translate(None, b" \t\r\n")
        if len(data) % 4:
            raise binascii.Error("not a whole number of quanta")
        return binascii.a2b_base64(data, strict_mode=True)
    except (UnicodeEncodeError, binascii.Error):
        raise BadRequest(f"field {field!r} is not valid base64") from None


def make_part(
    filename: str, content_type: str, content: bytes, field: str, content_id: str | None = None
) -> Part:
    """An attachment (or, with ``content_id``, an inline part), each value checked; ``field`` names it ("attachments[0]")."""
    ctype, parameters = parse_content_type(content_type, f"{field}.content_type")
    return Part(
        filename=check_filename(filename, f"{field}.filename"),
        content_type=ctype,
        content=content,
        content_id=None if content_id is None else check_content_id(content_id, f"{field}.content_id"),
        parameters=parameters,
    )


def _parts(values: Any, field: str, *, inline: bool) -> tuple[Part, ...]:
    allowed = ("filename", "content_type", "content", "content_id") if inline else ("filename", "content_type", "content")
    if not isinstance(values, list):
        raise BadRequest(f"field {field!r} must be a list of objects")
    if len(values) > MAX_PARTS:
        raise BadRequest(f"field {field!r} holds more than {MAX_PARTS} parts")
    parts = []
    for i, item in enumerate(values):
        name = f"{field}[{i}]"
        if not isinstance(item, dict):
            raise BadRequest(f"field {name!r} must be an object")
        for key in item:
            if key not in allowed:
                raise BadRequest(f"unknown field '{name}.{key}'")
        for key in allowed:
            if key not in item:
                raise BadRequest(f"missing field '{name}.{key}'")
            if not isinstance(item[key], str):
                raise BadRequest(f"field '{name}.{key}' must be a string")
        content = decode_base64(item["content"], f"{name}.content")
        parts.append(make_part(item["filename"], item["content_type"], content, name, item.get("content_id")))
    return tuple(parts)


def check_headers(pairs: Iterable[tuple[str, Any]], field: str) -> tuple[tuple[str, str], ...]:
    """
    Extra header fields: at most 50; a name is an RFC 5322 field name (printable ASCII
    but ":", at most 76) and not one mmgun writes (:data:`FORBIDDEN_HEADERS`, Content-*),
    given once whatever its case; a value is text of at most 998 characters without
    control characters (but TAB) or line separators, its leading and trailing white space
    dropped. ``field`` names them in errors: "headers" gives ``headers.X-Name``; a
    ``field`` ending in ":" is a prefix ("h:" gives ``h:X-Name``, as Mailgun's form fields).
    """
    result: list[tuple[str, str]] = []
    seen: set[str] = set()
    for name, value in pairs:
        if len(result) >= MAX_HEADERS:
            raise BadRequest(f"field {field!r} sets more than {MAX_HEADERS} headers")
        where = f"{field}{name}" if field.endswith(":") else f"{field}.{name}"
        if not isinstance(name, str) or len(name) > MAX_HEADER_NAME or not FIELD_NAME.fullmatch(name):
            raise BadRequest(f"field {field!r}: {name!r} is not a header field name (printable ASCII but ':', at most {MAX_HEADER_NAME})")
        lower = name.lower()
        if lower in FORBIDDEN_HEADERS or lower.startswith("content-"):
            raise BadRequest(f"field {field!r} may not set {name}: mmgun writes it")
        if lower in seen:
            raise BadRequest(f"field {field!r} sets {name} twice")
        seen.add(lower)
        if not isinstance(value, str):
            raise BadRequest(f"field {where!r} must be a string")
        if _controls(value) or _has_surrogates(value):
            raise BadRequest(f"field {where!r} must not contain CR, LF, NUL or other control characters or line separators")
        if len(value) > MAX_HEADER_VALUE:
            raise BadRequest(f"field {where!r} is longer than {MAX_HEADER_VALUE} characters")
        result.append((name, value.strip(" \t")))
    return tuple(result)


def check_tags(values: Any, field: str) -> tuple[str, ...]:
    """Up to 3 tags of 1 to 128 characters without control characters; repeats dropped."""
    if isinstance(values, str):
        values = [values]
    if not isinstance(values, list):
        raise BadRequest(f"field {field!r} must be a list of strings")
    tags: dict[str, None] = {}
    for i, tag in enumerate(values):
        if not isinstance(tag, str) or not 0 < len(tag) <= MAX_TAG or _controls(tag, tab=False) or _has_surrogates(tag):
            raise BadRequest(f"field '{field}[{i}]' must be 1 to {MAX_TAG} characters without control characters")
        tags[tag] = None
    if len(tags) > MAX_TAGS:
        raise BadRequest(f"field {field!r} holds more than {MAX_TAGS} tags")
    return tuple(tags)


def check_metadata(value: Any, field: str) -> str | None:
    """A JSON object of at most 4096 octets as compact JSON; returned as that text (None for {})."""
    if not isinstance(value, dict):
        raise BadRequest(f"field {field!r} must be a JSON object")
    if not value:
        return None
    try:
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        size = len(text.encode("utf-8"))
    except (TypeError, ValueError, UnicodeEncodeError):
        raise BadRequest(f"field {field!r} must be a JSON object of JSON values") from None
    if size > MAX_METADATA:
        raise BadRequest(f"field {field!r} is larger than {MAX_METADATA} octets as JSON")
    return text


def parse_date(value: Any, field: str) -> float:
    """
    An ISO 8601 date and time with its UTC offset ("2026-11-29T15:49:16Z"), or an RFC 5322
    date ("Sun, 29 Nov 2026 15:49:16 +0000"; without a zone, or -0000, it is UTC); the
    POSIX time.
    """
    if not isinstance(value, str) or not 0 < len(value) <= 64:
        raise BadRequest(f"field {field!r} must be an ISO 8601 or RFC 5322 date")
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        pass
    else:
        if when.tzinfo is None:
            raise BadRequest(f"field {field!r} must give its UTC offset (like 2026-11-29T15:49:16Z)")
        return when.timestamp()
    try:
        parts = parsedate_tz(value)
        if parts is None:
            raise ValueError(value)
        naive = datetime(parts[0], parts[1], parts[2], parts[3], parts[4], parts[5])
        # Past year 9999 once the offset is applied ("31 Dec 9999 23:59:59 -0100"): OverflowError.
        return (naive.replace(tzinfo=UTC) - timedelta(seconds=parts[9] or 0)).timestamp()
    except (ValueError, TypeError, OverflowError):
        raise BadRequest(f"field {field!r} must be an ISO 8601 or RFC 5322 date") from None


def normalize_address(value: str, field: str) -> str:
    """
    ``local@domain`` with the domain IDNA-encoded (its A-labels, what DNS and routing use)
    and lower-cased; the local part is kept as given (it is the receiving domain's to
    interpret). No display names, comments, quoted local parts or address literals: an API
    client has no need for them, and each is a way to smuggle something into a header or
    an envelope.

    The local part may be UTF-8 (RFC 6531 3.3: ``josé@example.com``, ``用户@例子.example``
    becomes ``用户@xn--fsqu00a.example``): any non-ASCII character but controls, format
    characters (bidirectional overrides among them), separators and spaces, at most 64
    octets as UTF-8, the address at most 254. Such an address needs SMTPUTF8 to be sent
    (:func:`needs_smtputf8`); an ASCII local part with an internationalized domain does not.
    """
    plain = _PLAIN_ADDRESS.fullmatch(value) if len(value) <= MAX_ADDRESS else None
    if plain is not None:
        # The common case in one regular expression (a fifth of the general path's cost):
        # what it matches, the general path would return unchanged but for the case.
        local, domain = plain.group("local", "domain")
        if len(local) <= 64 and len(domain) <= 253 and "--" not in domain:
            tld = domain.rpartition(".")[2]
            if not tld.isdigit():
                return f"{local}@{domain.lower()}"
    return _normalize_address(value, field)


_LDH = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_PLAIN_ADDRESS = re.compile(rf"(?P<local>{_ATOM}(?:\.{_ATOM})*)@(?P<domain>(?:{_LDH}\.)+{_LDH})\.?")


def _octets(text: str) -> int:
    """Its length in UTF-8 octets (the lengths SMTP limits are octets)."""
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def _normalize_address(value: str, field: str) -> str:
    bad = f"field {field!r} is not a valid email address (local@domain)"
    # str.isprintable() is False for controls (C0, C1), format characters (the bidirectional
    # overrides, zero-width joiners), surrogates, private-use and unassigned code points.
    if not value or len(value) > MAX_ADDRESS or any(c.isspace() or not c.isprintable() for c in value):
        raise BadRequest(bad)
    local, at, domain = value.rpartition("@")
    if not at or not local or not domain:
        raise BadRequest(bad)
    if _octets(local) > MAX_LOCAL_PART:
        raise BadRequest(f"field {field!r} has a local part longer than {MAX_LOCAL_PART} octets (RFC 5321 4.5.3.1.1)")
    if not all(_ATEXT.fullmatch(part) for part in local.split(".")):
        raise BadRequest(bad)
    # One trailing dot (a fully qualified name) is fine; more would be an empty label.
    domain = domain.removesuffix(".")
    if domain.isascii() and not any(label[2:4] == "--" for label in domain.split(".")):
        # Plain LDH labels: UTS 46 would only lower-case them, and the idna package
        # costs ~0.3 ms an address.
        ascii_domain = domain.lower()
    else:
        try:
            ascii_domain = idna.encode(domain, uts46=True).decode("ascii").lower()
        except (idna.IDNAError, UnicodeError):
            raise BadRequest(f"field {field!r} has an invalid domain") from None
    labels = ascii_domain.split(".")
    if len(labels) < 2 or len(ascii_domain) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise BadRequest(f"field {field!r} has an invalid domain")
    if labels[-1].isdigit():
        raise BadRequest(f"field {field!r} has an invalid domain")
    address = f"{local}@{ascii_domain}"
    if _octets(address) > MAX_ADDRESS:
        raise BadRequest(bad)
    return address


def needs_smtputf8(address: str) -> bool:
    """
    Whether a normalized address can only be sent with SMTPUTF8 (RFC 6531): its local
    part is not ASCII (the domain of a normalized address always is).
    """
    return not address.isascii()


def header_needs_smtputf8(message: bytes) -> bool:
    """
    Whether a stored message's header (up to its first empty line; all of it when there
    is none) holds a non-ASCII octet: an internationalized message (RFC 6532), which can
    only be sent with SMTPUTF8 (RFC 6531 3.1 item 9). Copies the header only, not the body.
    """
    end = message.find(b"\r\n\r\n")
    return not (message if end < 0 else message[:end]).isascii()


def transaction_needs_smtputf8(sender: str, recipients: Iterable[str], header_utf8: bool) -> bool:
    """
    Whether one SMTP transaction must carry SMTPUTF8 on MAIL FROM: its reverse path or a
    forward path has a UTF-8 local part, or its message is internationalized
    (``header_utf8``, :func:`header_needs_smtputf8` of the message, computed once per message).
    """
    return header_utf8 or not sender.isascii() or not all(r.isascii() for r in recipients)


def normalize_body(body: str) -> str:
    """Every line break (CRLF, bare CR, bare LF) becomes one CRLF-to-be: no bare CR or LF survives."""
    return mime.normalize_text(body)


def build_message(
    request: SendRequest,
    *,
    hostname: str,
    now: float,
    max_size: int | None = None,
    boundaries: Callable[[], str] = mime.random_boundary,
    message_id: str | None = None,
) -> bytes:
    """
    The RFC 5322 message: 7-bit clean, CRLF line endings, lines of at most 78 octets
    wherever a line may be broken, so it passes through any SMTP server unchanged and no
    bare CR or LF reaches the wire. The one exception: an address with a UTF-8 local part
    (:meth:`SendRequest.smtputf8`) is written in UTF-8 in its header field (RFC 6532), and
    such a message is sent only with SMTPUTF8.

    From, To, Cc, Reply-To (display names RFC 2047-encoded when not ASCII), Subject
    (RFC 2047 when not ASCII), Date, Message-ID, the extra headers, MIME-Version, then the
    content: the text part alone (exactly the seed's message), or multipart/alternative
    (text, HTML) inside multipart/related (with the inline parts) inside multipart/mixed
    (with the attachments), each level only when needed. Text and HTML parts: line breaks
    made CRLF, one added at the end if missing; short printable ASCII lines as they are
    (7bit), else quoted-printable UTF-8. Attachments and inline parts: base64 of exactly their bytes, their
    file names as RFC 2231 parameters. Bcc is in no header.

    MessageTooLarge when the result passes ``max_size`` octets. ``message_id`` (made by
    :func:`new_message_id`) is the Message-ID; None: a fresh one.

    Built from the encoders of :mod:`mmgun.mime` (the email package's Header, quoprimime,
    utils) rather than EmailMessage: the modern header registry costs ~4 ms a message, this
    ~30 µs.
    """
    headers = [
        mime.address_list("From", [(request.sender, request.sender_name)]),
        mime.address_list("To", [(m.address, m.name) for m in request.to]),
    ]
    if request.cc:
        headers.append(mime.address_list("Cc", [(m.address, m.name) for m in request.cc]))
    if request.reply_to:
        headers.append(mime.address_list("Reply-To", [(m.address, m.name) for m in request.reply_to]))
    headers += [
        mime.unstructured("Subject", request.subject),
        "Date: " + _date(now),
        "Message-ID: " + (message_id if message_id is not None else new_message_id(hostname)),
    ]
    headers += [mime.unstructured(name, value) for name, value in request.headers]
    headers.append("MIME-Version: 1.0")
    content_headers, content = _content(request, boundaries)
    # An address with a UTF-8 local part is written as it is, in UTF-8 (RFC 6532 3.2: it has
    # no encoded form); everything else stays 7-bit (display names and Subject as RFC 2047
    # encoded words, which RFC 6532 still allows and every reader decodes).
    charset = "utf-8" if request.smtputf8() else "ascii"
    message = ("\r\n".join(headers + content_headers) + "\r\n\r\n").encode(charset) + content
    if max_size is not None and len(message) > max_size:
        raise MessageTooLarge(f"the message built from this request would be {len(message)} octets, more than the maximum of {max_size}")
    return message


def new_message_id(hostname: str) -> str:
    """A fresh Message-ID for a message of this relay: ``<unique@hostname>``, angle brackets included."""
    return make_msgid(domain=hostname)


def _text(text: str, subtype: str) -> mime.BodyPart:
    text = mime.normalize_text(text)
    if not text.endswith("\n"):
        text += "\n"
    encoding, encoded = mime.text_body(text)
    return [f'Content-Type: text/{subtype}; charset="utf-8"', "Content-Transfer-Encoding: " + encoding], encoded


def _attachment(part: Part, disposition: str) -> mime.BodyPart:
    parameters = [item for attribute, value in part.parameters for item in mime.parameter(attribute, value)]
    headers = [
        mime.content_field("Content-Type", part.content_type, [*parameters, *mime.parameter("name", part.filename)]),
        mime.content_field("Content-Disposition", disposition, mime.parameter("filename", part.filename)),
        "Content-Transfer-Encoding: base64",
    ]
    if part.content_id is not None:
        headers.append(f"Content-ID: <{part.content_id}>")
    return headers, mime.base64_body(part.content)


def _content(request: SendRequest, boundaries: Callable[[], str]) -> mime.BodyPart:
    texts = []
    if request.body is not None:
        texts.append(_text(request.body, "plain"))
    if request.html is not None:
        # Like the text: line breaks made CRLF (RFC 2046 4.1.1's canonical form), one at the end.
        texts.append(_text(request.html, "html"))
    node = texts[0] if len(texts) == 1 else mime.multipart("alternative", texts, boundaries)
    if request.inline:
        root = "multipart/alternative" if len(texts) > 1 else "text/html"
        inline = [_attachment(part, "inline") for part in request.inline]
        node = mime.multipart("related", [node, *inline], boundaries, params=[f'type="{root}"'])
    if request.attachments:
        node = mime.multipart("mixed", [node, *(_attachment(part, "attachment") for part in request.attachments)], boundaries)
    return node


@functools.lru_cache(maxsize=4)
def _date_of_second(second: int) -> str:
    return format_datetime(datetime.fromtimestamp(second, UTC))


def _date(now: float) -> str:
    """The Date header's value: whole seconds, so computed once a second."""
    return _date_of_second(int(now))
