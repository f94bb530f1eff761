"""
DKIM (RFC 6376) for mmgun's sending domains: keys, the DNS records to publish, and signing.

Signatures are ``c=relaxed/relaxed`` with ``rsa-sha256`` (RSA 2048, PKCS#1 v1.5) or
``ed25519-sha256`` (RFC 8463): the key operations are OpenSSL's, through the
``cryptography`` package; the canonicalization (RFC 6376 3.4.2, 3.4.4) is ours, on bytes,
and is tested against dkimpy's.

What is signed is what a receiver sees: the message's wire form (every line break CRLF, a
CRLF at the end; :func:`mmgun.smtp.wire_form` without the dot-stuffing that the receiver
undoes), so a signature made here verifies after mmgun's SMTP client has sent the message.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import re
import secrets
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from typing import TYPE_CHECKING, NamedTuple, Protocol

import attrs
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa, utils

if TYPE_CHECKING:
    from hashlib import _Hash as Hash

__all__ = [
    "ALGORITHMS",
    "BODY_CHUNK",
    "ED25519_SHA256",
    "RSA_SHA256",
    "OVERSIGNED_HEADERS",
    "body_hash",
    "SIGNED_HEADERS",
    "DKIMKey",
    "dns_records",
    "expected_txt",
    "generate_key",
    "new_selector",
    "random_token",
    "relaxed_body",
    "relaxed_body_chunks",
    "relaxed_header",
    "SignRequest",
    "Unsigned",
    "prepare",
    "sign",
    "sign_digest",
    "signature_fields",
    "split_txt",
]

RSA_SHA256 = "rsa-sha256"
ED25519_SHA256 = "ed25519-sha256"
#: Signing order too: RSA first (its signature is the topmost header), since many receivers verify only RSA.
ALGORITHMS = (RSA_SHA256, ED25519_SHA256)
_K_TAG = {RSA_SHA256: "rsa", ED25519_SHA256: "ed25519"}

#: The fields signed when present (each instance of them), lower case, in h= order; those
#: of :data:`OVERSIGNED_HEADERS` are listed once more than they occur (whether they occur or
#: not), so none of them can be added without breaking the signature (RFC 6376 8.15).
SIGNED_HEADERS = (
    b"from",
    b"to",
    b"cc",
    b"subject",
    b"date",
    b"message-id",
    b"reply-to",
    b"mime-version",
    b"content-type",
    b"content-transfer-encoding",
    b"list-unsubscribe",
    b"list-unsubscribe-post",
)
#: The fields a receiver shows or replies to, which must not be added to a signed message:
#: a second From, or a To, Cc, Subject or Reply-To the message did not have.
OVERSIGNED_HEADERS = frozenset({b"from", b"to", b"cc", b"subject", b"reply-to"})
_SIGNED = frozenset(SIGNED_HEADERS)

# Lines are folded to at most this many octets (RFC 5322 2.1.1's "SHOULD").
_LINE = 78
# One character-string of a TXT record (RFC 1035 3.3.14).
_TXT_STRING = 255
# The octets of a SHA-256 digest: what each private-key operation signs.
_DIGEST_SIZE = 32
#: The octets of a body canonicalized and hashed at a time (see :func:`relaxed_body_chunks`).
BODY_CHUNK = 64 * 1024

_ANY_LINE_BREAK = re.compile(rb"\r\n|\r|\n")
# The end of the header section: a line break and an empty line (atomic groups, so a CRLF is
# never taken for a CR and an LF).
_BLANK_LINE = re.compile(rb"(?>\r\n|\r|\n)(?>\r\n|\r|\n)")
# A run of WSP that is not already one space (replacing only these is what makes it fast).
_WSP_RUN = re.compile(rb"\t[ \t]*| [ \t]+")
# A header field ends at a CRLF not followed by WSP (RFC 5322 2.2.3).
_FIELD_END = re.compile(rb"\r\n(?![ \t])")
_SELECTOR = re.compile(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*", re.ASCII)


class DKIMKey(Protocol):
    """What signing and the DNS records need of a key: :class:`mmgun.store.DomainKey` has it."""

    @property
    def domain(self) -> str: ...

    @property
    def selector(self) -> str: ...

    @property
    def algorithm(self) -> str: ...

    @property
    def private_key(self) -> bytes: ...

    @property
    def public_key(self) -> str: ...

    @property
    def retired_at(self) -> float | None: ...


# -- keys and DNS records ---------------------------------------------------------------------


def generate_key(algorithm: str) -> tuple[bytes, str]:
    """
    A new key for ``algorithm`` (:data:`RSA_SHA256`: RSA 2048, e = 65537; :data:`ED25519_SHA256`):
    the private key as unencrypted PKCS#8 PEM (to be stored readable only by mmgun's user, never
    logged), and the ``p=`` value of its DNS record: base64 of the DER SubjectPublicKeyInfo
    (RSA, RFC 6376 3.6.1) or of the raw 32-octet public key (Ed25519, RFC 8463 4).

    ValueError for any other algorithm.
    """
    private: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    if algorithm == RSA_SHA256:
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        public = private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    elif algorithm == ED25519_SHA256:
        private = ed25519.Ed25519PrivateKey.generate()
        public = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    else:
        raise ValueError(f"unknown DKIM algorithm {algorithm!r}: use one of {', '.join(ALGORITHMS)}")
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return pem, base64.b64encode(public).decode("ascii")


#: The alphabet and length of a selector's random part: 36**6 (about 2e9) values, so two
#: deployments signing one domain, or a domain removed and added again the same day, do not
#: pick the same selector (whose old p= DNS caches may still serve).
_TOKEN_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"
_TOKEN_LENGTH = 6
#: Draws of a random part before :func:`new_selector` gives up (only a broken ``token`` gets there).
_SELECTOR_TRIES = 100


def random_token() -> str:
    """A selector's random part: six lower-case letters and digits from the OS's CSPRNG."""
    return "".join(secrets.choice(_TOKEN_ALPHABET) for _ in range(_TOKEN_LENGTH))


def new_selector(now: float, taken: Collection[str], token: Callable[[], str] = random_token) -> str:
    """
    A selector not in ``taken`` (compared case-insensitively): ``mmgun`` + the UTC date of
    ``now`` + ``-`` + a random part, e.g. ``mmgun20261205-k3f9q2``. The random part keeps a
    selector from being reused with another key (a domain removed and added again, two
    deployments signing one domain), which receivers' DNS caches would answer with the old
    ``p=``. Valid RFC 6376 3.1 selector syntax (one DNS label: letters, digits, hyphens; lower case).

    ValueError if ``token`` gives only taken selectors, :data:`_SELECTOR_TRIES` times.
    """
    day = time.strftime("%Y%m%d", time.gmtime(now))
    used = {selector.lower() for selector in taken}
    for _ in range(_SELECTOR_TRIES):
        selector = f"mmgun{day}-{token()}".lower()
        if selector not in used:
            return selector
    raise ValueError(f"no free selector for {day} after {_SELECTOR_TRIES} tries")


def expected_txt(key: DKIMKey) -> str:
    """The value of the TXT record at ``<selector>._domainkey.<domain>`` (RFC 6376 3.6.1)."""
    return f"v=DKIM1; k={_K_TAG[key.algorithm]}; p={key.public_key}"


def split_txt(value: str) -> list[str]:
    """``value`` cut into the character-strings of one TXT record (at most 255 octets each, RFC 1035 3.3.14)."""
    return [value[i : i + _TXT_STRING] for i in range(0, len(value), _TXT_STRING)] or [""]


def dns_records(domain: str, keys: Sequence[DKIMKey], *, relay_host: str | None = None) -> str:
    """
    The records to publish for ``domain`` (IDNA, no trailing dot), as zone-file text: one DKIM
    TXT record per key not retired, split into 255-octet strings; retired keys as a comment
    (their records may be removed); then the SPF and DMARC records to consider, commented out
    because they are suggestions: a domain has one SPF record, which must list every host that
    sends its mail, and a DMARC policy is the owner's decision. ``relay_host`` (this relay's
    public host name) goes into the SPF suggestion; without it a placeholder does.
    """
    lines = [f"; DKIM: publish every record below (mmgun signs {domain}'s mail with the newest two keys of each algorithm)."]
    for key in keys:
        name = f"{key.selector}._domainkey.{domain}."
        if key.retired_at is not None:
            lines.append(f"; retired, no longer used to sign: {name} ({key.algorithm}) may be removed")
            continue
        strings = split_txt(expected_txt(key))
        if len(strings) == 1:
            lines.append(f'{name} IN TXT "{strings[0]}"')
        else:
            lines.append(f"{name} IN TXT (")
            lines += [f'    "{string}"' for string in strings]
            lines.append("    )")
    if not any(key.retired_at is None for key in keys):
        lines.append(f"; (no active key: {domain}'s mail is not signed)")
    host = relay_host if relay_host is not None else "<this relay's public host name>"
    lines += [
        ";",
        "; Suggestions, not requirements: compare them with what the domain already publishes.",
        "; SPF (RFC 7208): one record per domain, naming every host that sends its mail, this relay included:",
        f'; {domain}. IN TXT "v=spf1 a:{host} ~all"',
        "; DMARC (RFC 7489): start with p=none and read the reports, then move to quarantine or reject:",
        f'; _dmarc.{domain}. IN TXT "v=DMARC1; p=none; rua=mailto:dmarc-reports@{domain}"',
    ]
    return "\n".join(lines) + "\n"


# -- canonicalization ---------------------------------------------------------------------------


def relaxed_header(name: bytes, value: bytes) -> bytes:
    """
    One header field in relaxed canonical form (RFC 6376 3.4.2), CRLF included: the name in
    lower case without trailing WSP, the value unfolded, each run of WSP made one space, no
    WSP at either end. ``value`` is what follows the colon (line breaks CRLF).
    """
    value = _reduce_wsp(value.replace(b"\r\n", b"")).strip(b" \t")
    return name.rstrip(b" \t").lower() + b":" + value + b"\r\n"


def relaxed_body(body: bytes, chunk_size: int | None = None) -> bytes:
    """
    The body in relaxed canonical form (RFC 6376 3.4.4), as a receiver computes it from the
    wire: line breaks made CRLF and a CRLF added at the end if missing (as
    :func:`mmgun.smtp.wire_form` does), then WSP at line ends removed, runs of WSP made one
    space, empty lines at the end removed; an empty body stays empty. The pieces of
    :func:`relaxed_body_chunks`, joined.
    """
    if chunk_size is None and len(body) <= BODY_CHUNK:
        return _relaxed_piece(body)
    return b"".join(relaxed_body_chunks(body, chunk_size if chunk_size is not None else BODY_CHUNK))


def body_hash(body: bytes, chunk_size: int = BODY_CHUNK, new: Callable[[], Hash] = hashlib.sha256) -> bytes:
    """
    The digest of :func:`relaxed_body` of ``body`` (the ``bh=`` value, before base64), fed to
    the hash piece by piece as :func:`relaxed_body_chunks` makes them, so signing a large body
    in a thread never holds the GIL for more than one piece at a time.
    """
    hasher = new()
    if len(body) <= chunk_size:
        # One piece (every message the signing child gets): no generator, nothing carried over.
        hasher.update(_relaxed_piece(body))
        return hasher.digest()
    for piece in relaxed_body_chunks(body, chunk_size):
        hasher.update(piece)
    return hasher.digest()


def _relaxed_piece(body: bytes) -> bytes:
    """
    :func:`relaxed_body` of a whole ``body`` at once (what :func:`relaxed_body_chunks` gives
    when ``body`` is one piece): line breaks made CRLF and one added at the end, runs of WSP
    made one space, the space before each CRLF dropped, empty lines at the end dropped.
    """
    piece = _reduce_wsp(_line_breaks(body))
    if piece[-1:] != b"\n":
        # The wire form ends with a CRLF (after _line_breaks every CR and LF is in a CRLF).
        piece += b"\r\n"
    if b" \r\n" in piece:
        piece = piece.replace(b" \r\n", b"\r\n")
    text = piece.rstrip(b"\r\n")
    return text + b"\r\n" if text else b""


def relaxed_body_chunks(body: bytes, chunk_size: int = BODY_CHUNK) -> Iterator[bytes]:
    """
    :func:`relaxed_body` of ``body`` in pieces, each made from at most ``chunk_size`` + 1
    octets of ``body`` (a CRLF is never cut), with the same result once joined: a run of WSP
    at the end of a piece is carried over to the next as one space (dropped if a line break
    follows, RFC 6376 3.4.4 a), and the CRLFs at the end of a piece are held back until
    something other than empty lines follows (3.4.4 b: empty lines at the end of the body are
    not part of it). No piece is empty.
    """
    if chunk_size < 1:
        raise ValueError("chunk_size must be positive")
    end = len(body)
    start = 0
    space = b""  # b" " when the previous piece ended in a run of WSP, not yet written
    held = 0  # CRLFs at the end of what was read, written only if non-empty lines follow
    written = False
    while start < end:
        cut = min(start + chunk_size, end)
        if body[cut - 1 : cut] == b"\r" and body[cut : cut + 1] == b"\n":
            cut += 1
        piece = space + body[start:cut]
        start = cut
        if cut == end:
            if piece[-1:] not in (b"\r", b"\n"):
                piece += b"\r\n"  # the wire form ends with a CRLF
            space = b""
        else:
            stripped = piece.rstrip(b" \t")
            space = b" " if len(stripped) < len(piece) else b""
            piece = stripped
        # A bare CR at the end of a piece is one (a CR followed by LF is never cut off its LF).
        piece = _reduce_wsp(_line_breaks(piece)).replace(b" \r\n", b"\r\n")
        # After _line_breaks every CR is part of a CRLF, so rstrip takes whole empty lines.
        text = piece.rstrip(b"\r\n")
        if text:
            while held:
                # Counted, not concatenated: a body of many empty lines costs linear time.
                count = min(held, max(chunk_size // 2, 1))
                yield b"\r\n" * count
                held -= count
            yield text
            written = True
        held += (len(piece) - len(text)) // 2
    if written:
        yield b"\r\n"


def _reduce_wsp(data: bytes) -> bytes:
    """Each run of WSP made one space; the regular expression only where there is such a run (rarely)."""
    if b"\t" in data or b"  " in data:
        return _WSP_RUN.sub(b" ", data)
    return data


def _line_breaks(data: bytes) -> bytes:
    """Every line break (CRLF, or a bare CR or LF) made CRLF."""
    crlf = data.count(b"\r\n")
    if data.count(b"\r") != crlf or data.count(b"\n") != crlf:
        return _ANY_LINE_BREAK.sub(b"\r\n", data)
    return data


def _wire_lines(data: bytes) -> bytes:
    """Every line break CRLF, and a CRLF at the end of non-empty ``data``."""
    data = _line_breaks(data)
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data


def _split(message: bytes) -> tuple[list[bytes], bytes]:
    """
    The header fields of the wire form of ``message`` (each without its final CRLF), and its
    body as it is in ``message`` (line breaks not made CRLF yet: :func:`relaxed_body_chunks`
    does that piece by piece, so a large body is never rewritten in one go).
    """
    if message[:1] in (b"\r", b"\n"):
        return [], message[2:] if message.startswith(b"\r\n") else message[1:]
    end = message.find(b"\r\n\r\n")
    if end > 0:
        head = message[:end]
        crlf = head.count(b"\r\n")
        if head.count(b"\r") == crlf and head.count(b"\n") == crlf:
            # The usual case (mmgun builds CRLF messages): no other line break before the first
            # CRLF CRLF, so no earlier blank line and nothing to rewrite in the header.
            return _FIELD_END.split(head), message[end + 4 :]
    blank = _BLANK_LINE.search(message)
    if blank is None:
        head, body = message, b""
    else:
        head, body = message[: blank.start()], message[blank.end() :]
    head = _wire_lines(head)[:-2]
    return (_FIELD_END.split(head) if head else []), body


# -- signing --------------------------------------------------------------------------------------


# Stateless parameters of every RSA signature, made once (1.3 us a signature otherwise).
_PKCS1V15 = padding.PKCS1v15()
_PREHASHED_SHA256 = utils.Prehashed(hashes.SHA256())


@functools.lru_cache(maxsize=256)
def _load_private_key(pem: bytes) -> rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey:
    # Parsing and checking an RSA key costs more than signing with it: keep the parsed keys.
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey):
        raise ValueError("a DKIM key is RSA or Ed25519")
    return key


def _fold(pieces: Sequence[tuple[str, str]]) -> list[str]:
    """
    The header's lines: each piece is (separator, text), joined to the line being built with
    its separator while the line stays within 78 octets, else starting a new line with one
    space (folding white space, which relaxed canonicalization turns back into that space
    for a separator of " ", and which RFC 6376 allows around h='s colons).
    """
    lines: list[str] = []
    line = "DKIM-Signature:"
    for separator, text in pieces:
        if len(line) + len(separator) + len(text) <= _LINE:
            line += separator + text
        else:
            lines.append(line)
            line = " " + text
    lines.append(line)
    return lines


def _signature_lines(algorithm: str, domain: str, selector: str, t: str, names: Sequence[bytes], body_hash: str) -> list[str]:
    """The field's lines with an empty ``b=`` (to be filled by :meth:`Unsigned.finish`); ``t``: the t= value."""
    pieces = [
        (" ", "v=1;"),
        (" ", f"a={algorithm};"),
        (" ", "c=relaxed/relaxed;"),
        (" ", f"d={domain};"),
        (" ", f"s={selector};"),
        (" ", f"t={t};"),
    ]
    pieces += [("" if i else " ", (":" if i else "h=") + name.decode("ascii")) for i, name in enumerate(names)]
    pieces[-1] = (pieces[-1][0], pieces[-1][1] + ";")
    pieces += [(" ", f"bh={body_hash};"), (" ", "b=")]
    return _fold(pieces)


# Stand-ins for t= and bh= in a field's template: neither WSP nor a line break (so folding
# and relaxed canonicalization treat them as any other text of their length), nor ever in a
# field (a template in which either is not found exactly once is not used).
_T_MARK = "\x00"
_BH_MARK = "\x01"


class _Template(NamedTuple):
    """
    A DKIM-Signature field up to its ``b=``, folded, for one key and ``h=`` list, with the
    lengths of ``t=`` and ``bh=`` fixed: (what comes before ``t=``'s value, between it and
    ``bh=``'s value, after it up to ``b=``), as sent and in relaxed canonical form (what is
    hashed: no final CRLF), and how many octets of ``b=``'s value fit on its last line.
    """

    field: tuple[bytes, bytes, bytes]
    relaxed: tuple[bytes, bytes, bytes]
    room: int


@functools.lru_cache(maxsize=1024)
def _template(algorithm: str, domain: str, selector: str, names: tuple[bytes, ...], t_size: int, bh_size: int) -> _Template | None:
    """
    The :class:`_Template` of :func:`_signature_lines`' field (None if a stand-in is not found
    exactly once, as for a domain holding one: such fields are made without a template).
    Folding depends only on the lengths of ``t=`` and ``bh=``, and relaxed canonicalization
    does not touch their (WSP-free) values, so the field is the template with them put in.
    """
    lines = _signature_lines(algorithm, domain, selector, _T_MARK * t_size, names, _BH_MARK * bh_size)
    text = "\r\n".join(lines).encode("ascii")
    name, _, value = text.partition(b":")
    relaxed = relaxed_header(name, value)[:-2]
    t_mark, bh_mark = _T_MARK.encode() * t_size, _BH_MARK.encode() * bh_size
    parts = []
    for whole in (text, relaxed):
        if whole.count(_T_MARK.encode()) != t_size or whole.count(_BH_MARK.encode()) != bh_size:
            return None
        before, t_found, rest = whole.partition(t_mark)
        between, bh_found, after = rest.partition(bh_mark)
        if not (t_found and bh_found):
            return None
        parts.append((before, between, after))
    return _Template(parts[0], parts[1], max(_LINE - len(lines[-1]), 0))


def _filled(head: bytes, room: int, signature: bytes) -> bytes:
    """The field: ``head`` (up to ``b=``), then the base64 signature: ``room`` octets of it on that line, the rest on 78-octet continuation lines."""
    b = base64.b64encode(signature)
    step = _LINE - 1
    return b"".join([head, b[:room], *[b"\r\n " + b[i : i + step] for i in range(room, len(b), step)], b"\r\n"])


def sign_digest(private_pem: bytes, algorithm: str, digest: bytes) -> bytes:
    """
    The private-key operation of one signature: ``digest`` (the SHA-256 of the data to sign,
    :attr:`SignRequest.digest`) signed with ``private_pem`` (PKCS#8 PEM) for ``algorithm``.
    RSA: PKCS#1 v1.5 over the prehashed digest, the same signature as over the data itself;
    Ed25519: the 32-octet digest itself is the message (RFC 8463 3). Parsed keys are cached.

    ValueError if the key is not of ``algorithm`` (or not a key), or ``digest`` is not 32 octets.
    """
    if len(digest) != _DIGEST_SIZE:
        raise ValueError(f"a SHA-256 digest is {_DIGEST_SIZE} octets, not {len(digest)}")
    private = _load_private_key(private_pem)
    if isinstance(private, rsa.RSAPrivateKey):
        if algorithm != RSA_SHA256:
            raise ValueError(f"an RSA key cannot sign {algorithm}")
        return private.sign(digest, _PKCS1V15, _PREHASHED_SHA256)
    if algorithm != ED25519_SHA256:
        raise ValueError(f"an Ed25519 key cannot sign {algorithm}")
    return private.sign(digest)


class SignRequest(NamedTuple):
    """One private-key operation :func:`sign_digest` does: what :func:`prepare` leaves to do."""

    private_key: bytes
    algorithm: str
    digest: bytes


@attrs.frozen
class Unsigned:
    """
    A message with its DKIM-Signature fields made but for their signatures: :attr:`requests`
    (one per key, in field order) are to be signed (:func:`sign_digest`, anywhere: another
    thread or process), then :meth:`finish` makes the signed message.
    """

    message: bytes
    requests: tuple[SignRequest, ...]
    #: Each field up to its b= (folded, CRLFs between lines), and the octets of b='s value that fit on its last line.
    _heads: tuple[tuple[bytes, int], ...] = attrs.field(repr=False)

    def fields(self, signatures: Sequence[bytes]) -> bytes:
        """The DKIM-Signature fields to prepend to the message (CRLF after each); ``signatures`` answer :attr:`requests`, in order."""
        if len(signatures) != len(self.requests):
            raise ValueError(f"{len(signatures)} signatures for {len(self.requests)} requests")
        return b"".join([_filled(head, room, signature) for (head, room), signature in zip(self._heads, signatures, strict=True)])

    def finish(self, signatures: Sequence[bytes]) -> bytes:
        """The message with its signature fields prepended (:meth:`fields`)."""
        return self.fields(signatures) + self.message


def prepare(message: bytes, keys: Sequence[DKIMKey], now: float) -> Unsigned:
    """
    Everything of :func:`sign` but the private-key operations: the split, the relaxed
    canonicalization, the body hash, the fields (folded, ``b=`` empty) and the SHA-256 of
    what each key signs. Cheap (about 0.03 ms for a 1 KB message and two keys: each field is
    made from a template cached per key, ``h=`` list and length of ``t=``); the private-key
    operations (0.3 ms each for RSA 2048) are the :attr:`Unsigned.requests`.
    """
    if not keys:
        return Unsigned(message, (), ())
    fields, body = _split(message)
    present: dict[bytes, list[bytes]] = {}
    for field in fields:
        name, colon, value = field.partition(b":")
        if colon:
            lower = name.rstrip(b" \t").lower()
            if lower in _SIGNED:
                # relaxed_header(name, value), inline: this loop is most of a small message's canonicalization.
                canonical = b"".join((lower, b":", _reduce_wsp(value.replace(b"\r\n", b"")).strip(b" \t"), b"\r\n"))
                instances = present.get(lower)
                if instances is None:
                    present[lower] = [canonical]
                else:
                    instances.append(canonical)
    names: list[bytes] = []
    signed: list[bytes] = []
    for name in SIGNED_HEADERS:
        instances = present.get(name)
        if instances is None:
            if name in OVERSIGNED_HEADERS:
                names.append(name)
            continue
        # RFC 6376 5.4.2: instances are signed from the bottom up.
        names += [name] * (len(instances) + (name in OVERSIGNED_HEADERS))
        signed += reversed(instances)
    # The signed fields are hashed once; each key's hash goes on from a copy (RFC 6376 3.7).
    headers = hashlib.sha256(b"".join(signed))
    bh = base64.b64encode(body_hash(body)).decode("ascii")
    t = str(int(now))
    h = tuple(names)
    ordered = keys if len(keys) == 1 else sorted(keys, key=_algorithm_order)
    requests: list[SignRequest] = []
    heads: list[tuple[bytes, int]] = []
    for key in ordered:
        template = _template(key.algorithm, key.domain, key.selector, h, len(t), len(bh))
        if template is not None:
            (before, between, after), (r_before, r_between, r_after), room = template
            t_ascii, bh_ascii = t.encode("ascii"), bh.encode("ascii")
            head = b"".join((before, t_ascii, between, bh_ascii, after))
            relaxed = b"".join((r_before, t_ascii, r_between, bh_ascii, r_after))
        else:
            lines = _signature_lines(key.algorithm, key.domain, key.selector, t, names, bh)
            head = "\r\n".join(lines).encode("ascii")
            name, _, value = head.partition(b":")
            relaxed = relaxed_header(name, value)[:-2]
            room = max(_LINE - len(lines[-1]), 0)
        # What is signed: the signed fields, then this field with an empty b= and no final CRLF (RFC 6376 3.7).
        hasher = headers.copy()
        hasher.update(relaxed)
        requests.append(SignRequest(key.private_key, key.algorithm, hasher.digest()))
        heads.append((head, room))
    return Unsigned(message, tuple(requests), tuple(heads))


def _algorithm_order(key: DKIMKey) -> int:
    return ALGORITHMS.index(key.algorithm) if key.algorithm in ALGORITHMS else len(ALGORITHMS)


def sign(message: bytes, keys: Sequence[DKIMKey], now: float) -> bytes:
    """
    ``message`` with one DKIM-Signature field per key prepended, the RSA one topmost; the
    message itself is unchanged (a DKIM-Signature it already carries, e.g. another domain's,
    is kept and not signed over). No keys: ``message`` as it is.

    Each signature: ``c=relaxed/relaxed``, ``d=`` the key's domain (the caller's choice: the
    From domain), ``s=`` its selector, ``t=`` ``now``, ``h=`` every instance of
    :data:`SIGNED_HEADERS` present, those of :data:`OVERSIGNED_HEADERS` once more (oversigned), ``bh=`` over the whole
    body (no ``l=``). Folded to lines of at most 78 octets with CRLF. Computed over the wire
    form of ``message`` (see the module docstring).

    :func:`prepare`, :func:`sign_digest` for each of its requests, then :meth:`Unsigned.finish`,
    all on the calling thread (the frontend has :mod:`mmgun.signer`'s child process make
    :func:`signature_fields` instead, for messages of up to 256 KiB).

    ValueError if a key's private key does not match its algorithm.
    """
    return message if not keys else signature_fields(message, keys, now) + message


def signature_fields(message: bytes, keys: Sequence[DKIMKey], now: float) -> bytes:
    """
    The DKIM-Signature fields :func:`sign` prepends to ``message`` (b"" without keys):
    :func:`prepare`, :func:`sign_digest` of each request, :meth:`Unsigned.fields`. What
    :mod:`mmgun.signer`'s child process answers for a message.
    """
    unsigned = prepare(message, keys, now)
    return unsigned.fields([sign_digest(*request) for request in unsigned.requests])
