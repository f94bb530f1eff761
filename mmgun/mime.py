"""
The MIME encoders under :func:`mmgun.message.build_message`: header fields, display
names, parameters, text and binary bodies, multiparts.

Everything here writes 7-bit text with CRLF line breaks (but an address with a UTF-8 local
part, which has no 7-bit form: RFC 6532), in lines of at most 78 octets
wherever the syntax allows a break (RFC 5322 2.1.1): only a single word that cannot be
split (a long address, a long unbroken word of a plain-ASCII value) makes a longer line,
and never one past 998. Pure functions; the one source of randomness is the boundary.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import urllib.parse
from collections.abc import Callable, Iterable, Sequence
from email import quoprimime
from email.header import Header

#: A header line's recommended limit (RFC 5322 2.1.1).
LINE = 78
#: Body lines: quoted-printable's and base64's limit (RFC 2045 6.7, 6.8).
BODY_LINE = 76
_PLAIN = bytes(range(0x20, 0x7F)) + b"\t\r\n"
#: RFC 5322 atext: a display name made of these words needs no quotes.
_ATOMS = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?: [A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")
#: UTF-8 octets per RFC 2047 encoded word: 56 base64 characters, 68 with the markers,
#: so that "Reply-To: " and one encoded word still fit in 78.
_WORD_OCTETS = 42
#: RFC 2231 attribute-char: what an extended parameter value keeps unencoded.
_ATTRIBUTE_CHARS = "!#$&+-.^_`|~"


def fold(name: str, words: Sequence[str]) -> str:
    """
    ``Name: word word …``, a line break put before a word where the line would pass 78
    octets (never right after the name). Unfolding (RFC 5322 2.2.3) gives back the words
    joined by single spaces, so a word is anything that must not be split. A word may be
    UTF-8 (an address with a UTF-8 local part, RFC 6532): it is measured in octets.
    """
    lines, line = [], name + ":"
    start = size = len(line)
    for word in words:
        octets = len(word) if word.isascii() else len(word.encode("utf-8"))
        if size + 1 + octets > LINE and size > start:
            lines.append(line)
            line, size = "", 0
        line += " " + word
        size += 1 + octets
    lines.append(line)
    return "\r\n".join(lines)


def unstructured(name: str, value: str) -> str:
    """
    An unstructured field (Subject, an extra header): as it is when it is short plain
    ASCII, else folded at spaces by the email package's Header, in RFC 2047 encoded
    words when it is not plain ASCII (or could be mistaken for an encoded word). The
    caller has refused every control character but TAB.
    """
    # Encoded words fold anywhere; plain text folds only at spaces.
    plain = value.isascii() and "=?" not in value and all(len(w) < 900 for w in value.split(" "))
    if plain and len(name) + 2 + len(value) <= LINE:
        return f"{name}: {value}"
    encoded = Header(value, "us-ascii" if plain else "utf-8", header_name=name).encode(linesep="\r\n")
    return f"{name}: {encoded}"


def phrase_words(name: str) -> list[str]:
    """
    A display name (no control characters, single spaces) as the words of an RFC 5322
    phrase: atoms as they are, other plain ASCII as one quoted string (folded only at
    its spaces), anything else as RFC 2047 "B" encoded words of whole UTF-8 characters.
    """
    if name.isascii() and "=?" not in name:
        if _ATOMS.fullmatch(name):
            return name.split(" ")
        return ('"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"').split(" ")
    return encoded_words(name)


def encoded_words(text: str) -> list[str]:
    """``text`` as "=?utf-8?b?…?=" words of at most 68 characters, none splitting a character."""
    words: list[str] = []
    chunk: list[str] = []
    size = 0
    for char in text:
        n = len(char.encode("utf-8"))
        if size + n > _WORD_OCTETS:
            words.append(_b_word("".join(chunk)))
            chunk, size = [], 0
        chunk.append(char)
        size += n
    if chunk or not words:
        words.append(_b_word("".join(chunk)))
    return words


def _b_word(text: str) -> str:
    return "=?utf-8?b?" + base64.b64encode(text.encode("utf-8")).decode("ascii") + "?="


def mailbox_words(address: str, name: str | None) -> list[str]:
    """``Name <address>``, or the bare address, as words for :func:`fold`."""
    if not name:
        return [address]
    return [*phrase_words(name), f"<{address}>"]


def address_list(name: str, mailboxes: Iterable[tuple[str, str | None]]) -> str:
    """``To: a, "B" <b>`` folded after commas (and between the words of a name)."""
    groups = [mailbox_words(address, display) for address, display in mailboxes]
    words: list[str] = []
    for i, group in enumerate(groups):
        if i < len(groups) - 1:
            group = [*group[:-1], group[-1] + ","]
        words.extend(group)
    return fold(name, words)


# -- parameters (RFC 2045 5.1, RFC 2231) ---------------------------------------------


def parameter(attribute: str, value: str) -> list[str]:
    """
    ``attribute="value"``, or its RFC 2231 form: sections ``attribute*0=…`` when it is too
    long for one line, extended ``attribute*0*=utf-8''%E2%82…`` when it is not plain ASCII.
    Each item fits a line of its own (with the ";" the caller puts after it); an extended
    section never splits a character, since parsers decode each section alone.
    """
    # "=?" would be read as an RFC 2047 encoded word by lenient parsers (Python's among them).
    if value.isascii() and value.isprintable() and "=?" not in value:
        quoted = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if len(attribute) + 1 + len(quoted) + 2 <= LINE:
            return [f"{attribute}={quoted}"]
        return _sections(attribute, [c if c not in '\\"' else "\\" + c for c in value], extended=False)
    pieces = [urllib.parse.quote(c, safe=_ATTRIBUTE_CHARS) for c in value]
    return _sections(attribute, pieces, extended=True)


def _sections(attribute: str, pieces: list[str], *, extended: bool) -> list[str]:
    sections: list[str] = []
    current, empty = ("utf-8''" if extended else ""), True

    def close() -> str:
        head = f"{attribute}*{len(sections)}{'*' if extended else ''}="
        return head + (current if extended else f'"{current}"')

    for piece in pieces:
        head = f"{attribute}*{len(sections)}{'*' if extended else ''}="
        # " " before, the quotes (unless extended) and the ";" after: at most 78 in all.
        room = LINE - 2 - len(head) - (0 if extended else 2)
        if not empty and len(current) + len(piece) > room:
            sections.append(close())
            current = ""
        current += piece
        empty = False
    sections.append(close())
    return sections


def content_field(name: str, value: str, params: Iterable[str]) -> str:
    """``Content-Type: value; p1; p2`` folded, one parameter per line when needed."""
    items = [value, *params]
    return fold(name, [item + ";" for item in items[:-1]] + items[-1:])


# -- bodies ----------------------------------------------------------------------


def normalize_text(text: str) -> str:
    """Every line break (CRLF, bare CR, bare LF) becomes one LF (a CRLF-to-be)."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def text_body(text: str) -> tuple[str, bytes]:
    """
    (Content-Transfer-Encoding, encoded body) of text whose line breaks are LFs:
    printable ASCII in lines of at most 76 goes as it is (7bit); any other text as
    quoted-printable UTF-8, in lines of at most 76.
    """
    raw = text.replace("\n", "\r\n").encode("utf-8")
    if not raw.translate(None, _PLAIN) and max(map(len, text.split("\n"))) <= BODY_LINE:
        return "7bit", raw
    return "quoted-printable", quoted_printable(text, raw)


def quoted_printable(text: str, raw: bytes) -> bytes:
    """
    ``raw`` (``text`` with CRLF line breaks, UTF-8) quoted-printable in lines of at most
    76 octets. binascii's C encoder is twice as fast as the email package's, but writes
    a 77-octet line when it encodes white space at the end of a long line; then the
    email package's encoder does it.
    """
    encoded = binascii.b2a_qp(raw, istext=True)
    if max(map(len, encoded.split(b"\r\n"))) <= BODY_LINE:
        return encoded
    return quoprimime.body_encode(text.encode("utf-8").decode("latin-1"), BODY_LINE, eol="\r\n").encode("ascii")


def base64_body(content: bytes) -> bytes:
    """Base64 in lines of 76 characters, CRLF between them, none after the last."""
    return base64.encodebytes(content).replace(b"\n", b"\r\n").removesuffix(b"\r\n")


# -- multiparts (RFC 2046 5.1) --------------------------------------------------------


def random_boundary() -> str:
    """
    "=_" cannot occur in base64 or quoted-printable text ("=" is padding, or starts a
    hex pair or a soft break); 7bit text is checked by :func:`multipart`.
    """
    return "=_mmgun_" + os.urandom(12).hex()


#: A body part: its header lines (without line breaks) and its encoded content.
BodyPart = tuple[list[str], bytes]


def multipart(
    subtype: str,
    parts: Sequence[BodyPart],
    boundaries: Callable[[], str] = random_boundary,
    params: Sequence[str] = (),
) -> BodyPart:
    """
    A multipart entity of ``parts``, with a boundary that occurs in none of them (drawn
    again until it does not). Each part's content ends where the CRLF before the next
    delimiter begins, so it decodes to exactly the content given.
    """
    encoded = [("\r\n".join(headers) + "\r\n\r\n").encode("ascii") + content for headers, content in parts]
    while True:
        boundary = boundaries()
        delimiter = b"--" + boundary.encode("ascii")
        if not any(delimiter in part for part in encoded):
            break
    body = b"".join(delimiter + b"\r\n" + part + b"\r\n" for part in encoded) + delimiter + b"--\r\n"
    return [content_field("Content-Type", f"multipart/{subtype}", [*params, f'boundary="{boundary}"'])], body
