"""
HTML forms as Mailgun's clients send them — ``multipart/form-data`` and
``application/x-www-form-urlencoded`` — read strictly and within bounds from a body the
Site has already limited to ``--max-message-size``.

A multipart body is parsed as a stream (the ``multipart`` package's push parser, strict
mode) over that buffer, a chunk at a time: no part is ever copied whole but once, when it
is complete. Every fault is a :class:`~mmgun.message.BadRequest` naming the field (or the
body, when no field is being read): a missing or malformed boundary, a boundary inside a
part, bytes after the last boundary, too many fields, a field longer than its limit, a
text field that is not UTF-8, a file's name with path separators or control characters.
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import unquote_to_bytes

import attrs
import multipart

from ..message import BadRequest

#: Fields of one form: every repeat of ``to``, every attachment, ... (a body of 10,000
#: tiny fields is refused at the 2001st, before it is read further).
MAX_FIELDS = 2000
#: The parser reads the buffered body this many bytes at a time.
CHUNK = 64 * 1024
#: Bytes of one part's header line (its Content-Disposition with a long file name).
MAX_PART_HEADER = 4096


@attrs.frozen
class Field:
    """One form field: a text value, or a file (``filename`` is not None) with its declared Content-Type."""

    name: str
    value: bytes
    filename: str | None = None
    content_type: str | None = None

    def text(self) -> str:
        """The value as text: UTF-8, else 400 naming the field."""
        try:
            return self.value.decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest(f"field {self.name!r} is not valid UTF-8 text") from None


#: Given a field's name, the most bytes its value may have (None: only the body's limit).
FieldLimit = Callable[[str], int | None]


def _no_limit(name: str) -> int | None:
    return None


def read_form(content_type: bytes | None, body: bytes, limit: FieldLimit = _no_limit, max_files: int | None = None) -> list[Field]:
    """
    The fields of ``body``, in order, by the request's ``Content-Type``: 400 for any other
    content type, and for anything :func:`read_multipart` or :func:`read_urlencoded` refuses.
    """
    kind, options = multipart.parse_options_header((content_type or b"").decode("latin-1"))
    if kind == "multipart/form-data":
        boundary = options.get("boundary")
        if not boundary:
            raise BadRequest("header 'Content-Type' is multipart/form-data without a boundary")
        return read_multipart(boundary, body, limit, max_files)
    if kind == "application/x-www-form-urlencoded":
        return read_urlencoded(body, limit)
    raise BadRequest("header 'Content-Type' must be multipart/form-data or application/x-www-form-urlencoded")


def _content_disposition_unquote(value: str, filename: bool = False) -> str:
    # multipart's own unquoting drops everything before a backslash in a file name (an old
    # browser's bug): a path must be seen, and refused, not silently cut.
    return multipart.content_disposition_unquote(value, False)


def read_multipart(boundary: str, body: bytes, limit: FieldLimit = _no_limit, max_files: int | None = None) -> list[Field]:
    """The fields of a ``multipart/form-data`` body (RFC 7578), strictly; at most ``max_files`` of them files."""
    if len(boundary) > 70 or not boundary.isascii() or not boundary.isprintable():
        raise BadRequest("header 'Content-Type' has a boundary that is not 1 to 70 printable ASCII characters")
    try:
        parser = multipart.PushMultipartParser(
            boundary,
            content_length=len(body),
            max_header_size=MAX_PART_HEADER,
            max_header_count=8,
            max_segment_count=MAX_FIELDS,
            strict=True,
        )
    except multipart.MultipartError as e:
        raise BadRequest(f"header 'Content-Type' has a boundary multipart/form-data cannot use ({_reason(e)})") from None
    # The parser stops at the final boundary and ignores what follows it in the same chunk.
    end = b"--" + boundary.encode("ascii") + b"--"
    if not (body.endswith(end) or body.endswith(end + b"\r\n")):
        raise BadRequest("request body is not valid multipart/form-data: it does not end with its final boundary")
    fields: list[Field] = []
    current: multipart.MultipartSegment | None = None
    name = ""
    most: int | None = None
    files = 0
    chunks: list[bytes] = []
    view = memoryview(body)
    try:
        with parser:
            for start in range(0, len(body), CHUNK):
                for event in parser.parse(bytes(view[start : start + CHUNK])):
                    if isinstance(event, multipart.MultipartSegment):
                        current, chunks = event, []
                        name = event.name or ""
                        if not name:
                            raise BadRequest(f"part {len(fields) + 1} of the body has no field name")
                        most = limit(name)
                        if event.filename is not None:
                            files += 1
                            if max_files is not None and files > max_files:
                                raise BadRequest(f"field {name!r} holds more than {max_files} files")
                    elif event is None:
                        assert current is not None
                        fields.append(_field(current, b"".join(chunks)))
                        current, chunks = None, []
                    else:
                        chunks.append(event)
                        if most is not None and current is not None and current.bytes_received > most:
                            raise BadRequest(f"field {name!r} is longer than {most} bytes")
    except multipart.ParserLimitReached:
        if len(fields) >= MAX_FIELDS:
            raise BadRequest(f"request body holds more than {MAX_FIELDS} form fields") from None
        raise BadRequest(f"request body: a part's header (after field {name!r}) is too long or has too many lines") from None
    except multipart.MultipartError as e:
        where = f"field {name!r}" if current is not None else "request body"
        raise BadRequest(f"{where} is not valid multipart/form-data: {_reason(e)}") from None
    return fields


def _reason(error: multipart.MultipartError) -> str:
    """
    The parser's reason as a plain sentence: its message alone, without the exception it
    may carry beside it ("('Segment header failed to decode', UnicodeDecodeError(...))").
    """
    reason = error.args[0] if error.args and isinstance(error.args[0], str) else ""
    if not reason or not reason.isascii() or not reason.isprintable() or len(reason) > 200:
        return "it is malformed"
    return reason


def _field(segment: multipart.MultipartSegment, value: bytes) -> Field:
    name = segment.name or ""
    filename = None
    for header, raw in segment.headerlist:
        if header == "Content-Disposition":
            _, options = multipart.parse_options_header(raw, unquote=_content_disposition_unquote)
            filename = options.get("filename")
    content_type = segment.header("Content-Type")
    return Field(name, value, filename, content_type)


def read_urlencoded(body: bytes, limit: FieldLimit = _no_limit) -> list[Field]:
    """
    The fields of an ``application/x-www-form-urlencoded`` body: ``name=value`` pairs
    joined by ``&``, percent-encoded UTF-8 with ``+`` for a space.
    """
    if not body:
        return []
    # Counted before splitting: 10 MB of "ab&ab&..." would be 180 MB of pairs first.
    if body.count(b"&") >= MAX_FIELDS:
        raise BadRequest(f"request body holds more than {MAX_FIELDS} form fields")
    pairs = body.split(b"&")
    fields = []
    for pair in pairs:
        if not pair:
            continue
        raw_name, equals, raw_value = pair.partition(b"=")
        if not equals or not raw_name:
            raise BadRequest("request body is not valid application/x-www-form-urlencoded: a pair without '=' or a name")
        try:
            name = unquote_to_bytes(raw_name.replace(b"+", b" ")).decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest("request body has a field name that is not valid UTF-8") from None
        value = unquote_to_bytes(raw_value.replace(b"+", b" "))
        most = limit(name)
        if most is not None and len(value) > most:
            raise BadRequest(f"field {name!r} is longer than {most} bytes")
        fields.append(Field(name, value))
    return fields
