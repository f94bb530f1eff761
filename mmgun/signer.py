"""
DKIM signing in a helper process, so that it holds the frontend's GIL as little as possible.

Why a process: ``cryptography`` releases the GIL during an RSA signature, but the signing
thread must take it back afterwards, and a busy reactor thread keeps it for up to the
switch interval (5 ms): beside a busy reactor, a 0.3 ms signature took 5.5 ms, and each
thread-pool hand-off cost the reactor about 0.25 ms of GIL-held time. In a child process
the work costs the frontend only the bytes it writes and reads on a pipe.

The child does all of it for a message of up to :data:`LARGE_MESSAGE` octets: the frontend
writes the message, the ids of the keys and the time, and reads back the DKIM-Signature
fields to prepend (:func:`mmgun.dkim.signature_fields`: canonicalization, hashes, fields,
private-key operations). Each key (domain, selector, algorithm, PEM) goes to a child once,
in a key frame written before the first message that uses it; a child started again gets
them again. A larger message is prepared (canonicalized, hashed) in a thread of the
frontend, whose reactor keeps serving meanwhile, and only its private-key operations go to
the child (the key's PEM and the 32-octet digest): a 10 MB message in the pipe would hold
up the small ones behind it.

One child per frontend process (:class:`SignerProcess`): the child spends 0.5-0.7 ms of CPU
per 1 KB message signed with RSA 2048 (and Ed25519), so one core keeps up with the 1,200-1,600
signed messages per second one frontend process accepts on the bench machine; a second child
would only add a process to manage there (a faster frontend may want one: see the
"Issue 13" section of docs/performance.md).

The pipe protocol, all integers big-endian. A request is u32 length of the rest, u8 kind, then:

- :data:`KEY` (no reply): u32 key id, u8 algorithm code (:data:`ALGORITHM_CODES`), u8 domain
  length, u8 selector length, the domain, the selector (ASCII), the PEM (the rest);
- :data:`MESSAGE`: u64 request id, f64 the time (``t=``), u8 key count, that many u32 key ids
  (each sent in a key frame before), the message (the rest); the reply's payload is the
  fields, CRLF after each;
- :data:`DIGEST`: u64 request id, u8 algorithm code, u16 PEM length, the PEM, the 32-octet
  digest; the reply's payload is the signature;
- :data:`FORGET` (no reply): the child drops every key it was sent (the frontend's table of
  key ids was full and starts over; ids are never reused).

A reply is u32 length of the rest, u64 request id, u8 status (0: ok, the payload follows;
1: error, a short text follows: the exception's class and message, never key material).

``python -m mmgun.signer`` (:func:`main`) is the child: it reads stdin until end of file and
then exits 0, so it ends with its frontend even when that was killed with SIGKILL. It writes
nothing but replies on stdout; it ignores SIGINT, SIGTERM and SIGHUP (a signal sent to the
whole process group), as its frontend decides when it ends, by closing its stdin.
"""

from __future__ import annotations

import os
import signal
import site
import struct
import sys
import time
from collections.abc import Awaitable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple, Protocol

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IDelayedCall, IReactorProcess, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from . import dkim
from .dkim import SignRequest

__all__ = [
    "ALGORITHM_CODES",
    "DIGEST",
    "FORGET",
    "KEY",
    "MESSAGE",
    "InProcessSigner",
    "ProtocolError",
    "ReplyReader",
    "Signer",
    "SignerProcess",
    "child_environment",
    "answers",
    "encode_key",
    "encode_message",
    "encode_request",
    "main",
    "serve_frames",
]

_log = Logger()

#: The algorithm codes of the key and digest frames.
ALGORITHM_CODES = {dkim.RSA_SHA256: 1, dkim.ED25519_SHA256: 2}
_ALGORITHMS = {code: name for name, code in ALGORITHM_CODES.items()}
#: The kinds of request frame.
KEY, MESSAGE, DIGEST, FORGET = 1, 2, 3, 4
OK, ERROR = 0, 1

#: Messages larger than this are prepared (canonicalized, hashed) in a thread of the frontend
#: and only their private-key operations go to the child.
LARGE_MESSAGE = 256 * 1024

_LENGTH = struct.Struct(">I")
_HEAD = struct.Struct(">IB")  # length, kind
_KEY = struct.Struct(">IBIBBB")  # length, kind, key id, algorithm, domain length, selector length
_MESSAGE = struct.Struct(">IBQdB")  # length, kind, id, time, key count
_DIGEST_REQUEST = struct.Struct(">IBQBH")  # length, kind, id, algorithm, PEM length
_REPLY = struct.Struct(">IQB")  # length, id, status
_KEY_ID = struct.Struct(">I")
_DIGEST = 32
_MAX_PEM = 0xFFFF
_MAX_NAME = 0xFF
_MAX_KEYS_PER_MESSAGE = 0xFF
_FORGET_FRAME = _HEAD.pack(_HEAD.size - _LENGTH.size, FORGET)
#: The longest request (after its length field) and the longest reply a peer may send.
MAX_REQUEST = _MESSAGE.size - _LENGTH.size + _KEY_ID.size * _MAX_KEYS_PER_MESSAGE + LARGE_MESSAGE
MAX_REPLY = 256 * 1024
#: An error text is cut to this many characters.
_MAX_ERROR = 300
_READ_SIZE = 1 << 20
#: The child writes the replies it has made once they took this long (about 5 messages signed
#: with RSA 2048): the frontend gets them in groups (a wake-up per reply cost it ~0.03 ms
#: each), yet early in a burst.
FLUSH_AFTER = 0.002
#: Keys the frontend keeps an id for; beyond, it starts over (and the child forgets its keys),
#: so keys rotated or removed over a long life do not pile up in either process.
MAX_KEYS = 4096

#: Back-off before starting a child again after it died: none the first time, then this, doubling up to BACKOFF_MAX.
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 30.0
#: A child that lived this long before it died gets started again at once (the back-off starts over).
STABLE_AFTER = 60.0
#: How long :meth:`SignerProcess.stopService` waits for the child to exit before killing it.
STOP_TIMEOUT = 5.0
#: Lines of a child's stderr logged at most (each cut to _MAX_LINE characters), so a child gone wrong cannot flood the log.
MAX_STDERR_LINES = 50
_MAX_LINE = 500


class ProtocolError(Exception):
    """The peer broke the pipe protocol (a frame too long or too short, an unknown kind or id)."""


class Signer(Protocol):
    """What :class:`mmgun.web.signing.SendingDomains` signs with."""

    def sign_message(self, message: bytes, keys: Sequence[dkim.DKIMKey], now: float) -> Awaitable[bytes]:
        """:func:`mmgun.dkim.sign` of ``message``: its DKIM-Signature fields (one per key) prepended."""


def _error_text(exception: BaseException) -> str:
    """An exception as a reply's error text: class and message only, cut short (no traceback, no key)."""
    return f"{type(exception).__name__}: {exception}"[:_MAX_ERROR]


class InProcessSigner:
    """A :class:`Signer` that signs on the calling thread (tests, tools, and the fallback of :class:`SignerProcess`)."""

    def sign_message(self, message: bytes, keys: Sequence[dkim.DKIMKey], now: float) -> Deferred[bytes]:
        try:
            return succeed(dkim.sign(message, keys, now))
        except Exception:
            return fail()

    def sign_digests(self, requests: Sequence[SignRequest]) -> Deferred[list[bytes]]:
        """:func:`mmgun.dkim.sign_digest` of each of ``requests``, in order."""
        try:
            return succeed([dkim.sign_digest(*request) for request in requests])
        except Exception:
            return fail()


# -- the pipe protocol --------------------------------------------------------------------------------


def _algorithm_code(algorithm: str) -> int:
    code = ALGORITHM_CODES.get(algorithm)
    if code is None:
        raise ValueError(f"unknown DKIM algorithm {algorithm!r}")
    return code


def encode_key(key_id: int, key: dkim.DKIMKey) -> bytes:
    """
    The key frame giving ``key`` the id ``key_id``; ValueError for an algorithm without a
    code, a domain or selector not ASCII or longer than 255 octets, a PEM longer than 65,535.
    """
    code = _algorithm_code(key.algorithm)
    domain, selector = key.domain.encode("ascii"), key.selector.encode("ascii")  # UnicodeEncodeError is a ValueError
    if len(domain) > _MAX_NAME or len(selector) > _MAX_NAME:
        raise ValueError("a DKIM domain or selector of more than 255 octets")
    if len(key.private_key) > _MAX_PEM:
        raise ValueError("a DKIM private key of more than 65,535 octets")
    length = _KEY.size - _LENGTH.size + len(domain) + len(selector) + len(key.private_key)
    return _KEY.pack(length, KEY, key_id, code, len(domain), len(selector)) + domain + selector + key.private_key


def encode_message(request_id: int, now: float, key_ids: Sequence[int], size: int) -> bytes:
    """
    The start of a message frame, up to the message (``size`` octets, which follows it);
    ValueError for more than 255 keys or a message over :data:`LARGE_MESSAGE` octets.
    """
    if len(key_ids) > _MAX_KEYS_PER_MESSAGE:
        raise ValueError("more than 255 DKIM keys for one message")
    if size > LARGE_MESSAGE:
        raise ValueError(f"a message of more than {LARGE_MESSAGE} octets goes to the child as digests")
    length = _MESSAGE.size - _LENGTH.size + _KEY_ID.size * len(key_ids) + size
    return _MESSAGE.pack(length, MESSAGE, request_id, now, len(key_ids)) + struct.pack(f">{len(key_ids)}I", *key_ids)


def encode_request(request_id: int, request: SignRequest) -> bytes:
    """One digest frame; ValueError for an algorithm without a code, a PEM longer than 65,535 octets or a digest not of 32."""
    code = _algorithm_code(request.algorithm)
    if len(request.private_key) > _MAX_PEM:
        raise ValueError("a DKIM private key of more than 65,535 octets")
    if len(request.digest) != _DIGEST:
        raise ValueError(f"a SHA-256 digest is {_DIGEST} octets, not {len(request.digest)}")
    length = _DIGEST_REQUEST.size - _LENGTH.size + len(request.private_key) + _DIGEST
    return _DIGEST_REQUEST.pack(length, DIGEST, request_id, code, len(request.private_key)) + request.private_key + request.digest


def _reply(request_id: int, status: int, payload: bytes) -> bytes:
    return _REPLY.pack(_REPLY.size - _LENGTH.size + len(payload), request_id, status) + payload


class _ChildKey(NamedTuple):
    """A key as the child holds it (what :func:`mmgun.dkim.prepare` reads of a :class:`mmgun.dkim.DKIMKey`)."""

    domain: str
    selector: str
    algorithm: str
    private_key: bytes
    public_key: str = ""
    retired_at: float | None = None


def _answer_message(frame: memoryview, keys: Mapping[int, _ChildKey]) -> bytes:
    if len(frame) < _MESSAGE.size:
        raise ProtocolError(f"a message frame of {len(frame)} octets")
    _, _, request_id, now, count = _MESSAGE.unpack_from(frame)
    start = _MESSAGE.size + _KEY_ID.size * count
    if start > len(frame):
        raise ProtocolError(f"a message frame of {len(frame)} octets with {count} keys")
    ids = struct.unpack_from(f">{count}I", frame, _MESSAGE.size)
    try:
        chosen = []
        for key_id in ids:
            key = keys.get(key_id)
            if key is None:
                raise ValueError(f"no key {key_id} was sent")
            chosen.append(key)
        return _reply(request_id, OK, dkim.signature_fields(bytes(frame[start:]), chosen, now))
    except Exception as e:
        return _reply(request_id, ERROR, _error_text(e).encode("utf-8", "replace"))


def _take_key(frame: memoryview, keys: dict[int, _ChildKey]) -> None:
    if len(frame) < _KEY.size:
        raise ProtocolError(f"a key frame of {len(frame)} octets")
    _, _, key_id, code, domain_length, selector_length = _KEY.unpack_from(frame)
    start = _KEY.size + domain_length + selector_length
    if start > len(frame):
        raise ProtocolError(f"a key frame of {len(frame)} octets")
    domain = bytes(frame[_KEY.size : _KEY.size + domain_length]).decode("ascii", "replace")
    selector = bytes(frame[_KEY.size + domain_length : start]).decode("ascii", "replace")
    # An unknown algorithm code is kept as is: signing with the key then fails in prepare's
    # sign_digest with a reply naming it, as for any other bad key.
    algorithm = _ALGORITHMS.get(code, f"algorithm code {code}")
    keys[key_id] = _ChildKey(domain, selector, algorithm, bytes(frame[start:]))


def _answer_digest(frame: memoryview) -> bytes:
    if len(frame) < _DIGEST_REQUEST.size:
        raise ProtocolError(f"a digest frame of {len(frame)} octets")
    _, _, request_id, code, pem_length = _DIGEST_REQUEST.unpack_from(frame)
    pem = bytes(frame[_DIGEST_REQUEST.size : _DIGEST_REQUEST.size + pem_length])
    digest = bytes(frame[_DIGEST_REQUEST.size + pem_length :])
    try:
        if len(digest) != _DIGEST:
            raise ValueError("malformed request: the PEM length does not match the frame's")
        algorithm = _ALGORITHMS.get(code)
        if algorithm is None:
            raise ValueError(f"unknown algorithm code {code}")
        return _reply(request_id, OK, dkim.sign_digest(pem, algorithm, digest))
    except Exception as e:
        return _reply(request_id, ERROR, _error_text(e).encode("utf-8", "replace"))


def _answer(frame: memoryview, keys: dict[int, _ChildKey]) -> bytes | None:
    """The reply to one request frame (its length field included); None for a frame without a reply."""
    kind = frame[_LENGTH.size]
    if kind == MESSAGE:
        return _answer_message(frame, keys)
    if kind == KEY:
        _take_key(frame, keys)
        return None
    if kind == DIGEST:
        return _answer_digest(frame)
    if kind == FORGET:
        keys.clear()
        return None
    raise ProtocolError(f"a request frame of unknown kind {kind}")


def answers(data: bytes | bytearray, keys: dict[int, _ChildKey]) -> Iterator[tuple[bytes | None, int]]:
    """
    The reply to each complete request frame at the start of ``data`` (None for a frame that
    has none: a key frame, whose key goes into ``keys``), one at a time (each made as it is
    asked for), with the offset in ``data`` where that request ended. ProtocolError for a
    frame of impossible length or unknown kind.
    """
    view = memoryview(data)
    offset = 0
    try:
        while len(view) - offset >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(view, offset)
            if not _HEAD.size - _LENGTH.size <= length <= MAX_REQUEST:
                raise ProtocolError(f"a request frame of {length} octets")
            end = offset + _LENGTH.size + length
            if end > len(view):
                return
            yield _answer(view[offset:end], keys), end
            offset = end
    finally:
        view.release()


def serve_frames(data: bytes | bytearray, keys: dict[int, Any] | None = None) -> tuple[list[bytes], int]:
    """
    The replies to every complete request frame at the start of ``data``, and how many
    octets those frames took (the rest is the start of a frame still to come). ``keys``: the
    keys the child has been sent (updated by key frames; default: none).
    ProtocolError for a frame of impossible length or unknown kind.
    """
    replies: list[bytes] = []
    used = 0
    for reply, end in answers(data, keys if keys is not None else {}):
        if reply is not None:
            replies.append(reply)
        used = end
    return replies, used


class ReplyReader:
    """The frontend's side: reply frames out of the child's stdout, however the pipe cut them."""

    def __init__(self) -> None:
        self._rest = b""

    def feed(self, data: bytes) -> list[tuple[int, int, bytes]]:
        """(id, status, payload) of each reply completed by ``data``; ProtocolError for a frame of impossible length."""
        if self._rest:
            data = self._rest + data
        replies = []
        offset = 0
        size = len(data)
        while size - offset >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(data, offset)
            if not _REPLY.size - _LENGTH.size <= length <= MAX_REPLY:
                raise ProtocolError(f"a reply frame of {length} octets")
            end = offset + _LENGTH.size + length
            if end > size:
                break
            _, request_id, status = _REPLY.unpack_from(data, offset)
            replies.append((request_id, status, data[offset + _REPLY.size : end]))
            offset = end
        self._rest = data[offset:] if offset < size else b""
        return replies


# -- the child ------------------------------------------------------------------------------------------


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def main() -> int:
    """
    The child (``python -m mmgun.signer``): answer requests on fd 0 with replies on fd 1
    until end of file. Replies are written as soon as :data:`FLUSH_AFTER` seconds of
    signing have piled up, and when what was read is answered: the frontend finishes the
    first messages of a burst while the child signs the rest (written all at the end, a
    burst of 30 requests would leave the frontend idle for 10 ms, then the child).
    """
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    keys: dict[int, _ChildKey] = {}
    buffer = bytearray()
    while True:
        data = os.read(0, _READ_SIZE)
        if not data:
            return 0
        buffer += data
        replies: list[bytes] = []
        used = 0
        since = time.monotonic()
        try:
            for reply, end in answers(buffer, keys):
                used = end
                if reply is None:
                    continue
                replies.append(reply)
                if time.monotonic() - since >= FLUSH_AFTER:
                    _write_all(1, b"".join(replies))
                    replies.clear()
                    since = time.monotonic()
            if replies:
                _write_all(1, b"".join(replies))
        except ProtocolError as e:
            os.write(2, f"mmgun.signer: {e}: exiting\n".encode())
            return 2
        except BrokenPipeError:
            return 0  # the frontend is gone
        del buffer[:used]


# -- the frontend's side --------------------------------------------------------------------------------


def child_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """
    ``environ`` (default: this process's) with PYTHONPATH made to find this very ``mmgun``
    package first: a working tree run with ``PYTHONPATH=.`` or trial spawns the same code as
    the installed copy would (a site-packages directory is not added: it is on the path anyway).
    """
    env = dict(os.environ if environ is None else environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sites = {os.path.abspath(p) for p in [*site.getsitepackages(), site.getusersitepackages()]}
    if root not in sites:
        env["PYTHONPATH"] = os.pathsep.join([root, *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    return env


class _Batch:
    """The signatures of one :meth:`SignerProcess.sign_digests` call, as they arrive; fires once all have."""

    def __init__(self, count: int) -> None:
        self.signatures: list[bytes] = [b""] * count
        self.error: str | None = None
        self.remaining = count
        self.deferred: Deferred[list[bytes]] = Deferred()
        if not count:
            self.deferred.callback([])

    def answer(self, index: int, signature: bytes | None, error: str | None = None) -> None:
        if signature is not None:
            self.signatures[index] = signature
        elif self.error is None:
            self.error = error
        self.remaining -= 1
        if self.remaining == 0:
            if self.error is not None:
                self.deferred.errback(ValueError(self.error))
            else:
                self.deferred.callback(self.signatures)

    def answer_here(self, index: int, request: SignRequest) -> None:
        """Sign ``request`` in this process (the child is gone or was never there)."""
        try:
            signature = dkim.sign_digest(*request)
        except Exception as e:
            self.answer(index, None, _error_text(e))
        else:
            self.answer(index, signature)


class _DigestRequest:
    """A digest request the child owes a reply: one signature of a :class:`_Batch`."""

    __slots__ = ("batch", "index", "request")

    def __init__(self, batch: _Batch, index: int, request: SignRequest) -> None:
        self.batch, self.index, self.request = batch, index, request

    def answer(self, ok: bool, payload: bytes) -> None:
        if ok:
            self.batch.answer(self.index, payload)
        else:
            self.batch.answer(self.index, None, payload.decode("utf-8", "replace"))

    def answer_here(self) -> None:
        self.batch.answer_here(self.index, self.request)


class _MessageRequest:
    """A message the child owes the signature fields of; ``deferred`` fires with the signed message."""

    __slots__ = ("deferred", "message", "keys", "now")

    def __init__(self, message: bytes, keys: Sequence[dkim.DKIMKey], now: float) -> None:
        self.deferred: Deferred[bytes] = Deferred()
        self.message, self.keys, self.now = message, keys, now

    def answer(self, ok: bool, payload: bytes) -> None:
        if ok:
            self.deferred.callback(payload + self.message)
        else:
            self.deferred.errback(ValueError(payload.decode("utf-8", "replace")))

    def answer_here(self) -> None:
        """Sign the message in this process (the child is gone)."""
        try:
            signed = dkim.sign(self.message, self.keys, self.now)
        except Exception:
            self.deferred.errback()
        else:
            self.deferred.callback(signed)


class _Child(ProcessProtocol):
    """One child process: the requests it has not answered yet, the keys it was sent, its stdout replies and stderr lines."""

    def __init__(self, owner: SignerProcess, started_at: float) -> None:
        self.owner = owner
        self.started_at = started_at
        self.pending: dict[int, _DigestRequest | _MessageRequest] = {}
        #: The ids of the keys sent to this child (in key frames).
        self.keys: set[int] = set()
        self.replies = ReplyReader()
        self.stopping = False
        self.ended = False
        self.stopped: list[Deferred[None]] = []
        self.kill_call: IDelayedCall | None = None
        #: Why it ended (ProcessDone, ProcessTerminated), once it has.
        self.reason: Failure | None = None
        self._stderr = bytearray()
        self._lines_logged = 0

    @property
    def pid(self) -> int | None:
        return getattr(self.transport, "pid", None)

    @property
    def serving(self) -> bool:
        """Whether requests may go to this child: started, not stopping, not ended."""
        return self.transport is not None and not self.stopping and not self.ended

    def kill(self) -> None:
        try:
            self.transport.signalProcess("KILL")  # type: ignore[union-attr]
        except (ProcessExitedAlready, OSError):
            pass

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == 2:
            self._stderr_received(data)
            return
        pending = self.pending
        try:
            for request_id, status, payload in self.replies.feed(data):
                request = pending.pop(request_id, None)
                if request is None:
                    raise ProtocolError(f"a reply to request {request_id}, which is not outstanding")
                request.answer(status == OK, payload)
        except ProtocolError as e:
            _log.error("DKIM signing process {pid} broke the protocol ({problem}): killing it", pid=self.pid, problem=str(e))
            self.kill()

    def _stderr_received(self, data: bytes) -> None:
        self._stderr += data
        *lines, rest = self._stderr.split(b"\n")
        self._stderr = bytearray(rest[-_MAX_LINE:])
        for line in lines:
            self._log_line(bytes(line))

    def _log_line(self, line: bytes) -> None:
        self._lines_logged += 1
        if self._lines_logged <= MAX_STDERR_LINES:
            _log.warn("DKIM signing process {pid}: {line}", pid=self.pid, line=line[:_MAX_LINE].decode("utf-8", "replace"))
        elif self._lines_logged == MAX_STDERR_LINES + 1:
            _log.warn("DKIM signing process {pid}: more output, not logged", pid=self.pid)

    def processEnded(self, reason: Failure) -> None:
        if self._stderr:
            self._log_line(bytes(self._stderr))
            self._stderr.clear()
        self.ended = True
        self.reason = reason
        self.owner._ended(self, reason)


class SignerProcess(Service):
    """
    The frontend's DKIM signer (:class:`Signer`): a child process (``python -m mmgun.signer``,
    started with the service) signs, so that signing costs the frontend's GIL little more
    than a pipe write and read. One child per frontend process (see the module docstring).

    Every request is answered: while no child runs (it died, it is being started again,
    the service is stopping), messages are signed in this process, and the messages a child
    had not answered when it died are signed here at once. A child that dies is started
    again, at once the first time, then after 1 s, doubling up to 30 s while it keeps dying;
    one that lived 60 s starts the count over.

    ``reactor`` spawns the child (IReactorProcess) and runs the preparation of large
    messages in its thread pool; ``clock`` (default: ``reactor``) times the back-off and the
    stop timeout; ``argv`` and ``env`` (tests) replace the child's command and environment
    (default: :func:`child_environment`).
    """

    def __init__(
        self,
        reactor: IReactorProcess,
        *,
        clock: IReactorTime | None = None,
        argv: Sequence[str] | None = None,
        env: Mapping[str, str] | None = None,
        stop_timeout: float = STOP_TIMEOUT,
    ) -> None:
        self._reactor = reactor
        self._clock: IReactorTime = clock if clock is not None else reactor  # type: ignore[assignment]
        self._argv = list(argv) if argv is not None else [sys.executable, "-m", "mmgun.signer"]
        self._env = dict(env) if env is not None else child_environment()
        self._stop_timeout = stop_timeout
        self._child: _Child | None = None
        self._next_id = 0
        #: The id of each key (domain, selector, algorithm, PEM) sent to a child; ids are never reused.
        self._key_ids: dict[tuple[str, str, str, bytes], int] = {}
        self._next_key_id = 0
        #: Wait this long before the next start after a death; None: start at once.
        self._delay: float | None = None
        self._respawn: IDelayedCall | None = None
        self._inline = InProcessSigner()

    @property
    def pid(self) -> int | None:
        """The pid of the child serving requests now (None: none; messages are signed in this process)."""
        child = self._child
        return child.pid if child is not None and child.serving else None

    def startService(self) -> None:
        super().startService()
        self._spawn()

    def _spawn(self) -> None:
        self._respawn = None
        if not self.running:
            return
        child = _Child(self, self._clock.seconds())
        try:
            self._reactor.spawnProcess(
                child, self._argv[0], self._argv, env=self._env, childFDs={0: "w", 1: "r", 2: "r"}
            )
        except Exception:
            _log.failure("could not start the DKIM signing process: signing in the frontend meanwhile")
            self._start_again(0.0)
            return
        self._child = child
        _log.info("DKIM signing process {pid} started", pid=child.pid)

    def _start_again(self, lived: float) -> None:
        if not self.running:
            return
        if lived >= STABLE_AFTER:
            self._delay = None
        if self._delay is None:
            self._delay = BACKOFF_FIRST
            self._spawn()
        else:
            delay, self._delay = self._delay, min(self._delay * 2, BACKOFF_MAX)
            self._respawn = self._clock.callLater(delay, self._spawn)

    def sign_message(self, message: bytes, keys: Sequence[dkim.DKIMKey], now: float) -> Deferred[bytes]:
        """
        :func:`mmgun.dkim.sign` of ``message``. Up to :data:`LARGE_MESSAGE` octets: by the child
        (this process writes the message, and each key once per child, and reads the fields);
        larger: prepared in a thread of the reactor's pool (whose body is canonicalized and
        hashed in 64 KiB pieces, so the reactor keeps serving: a 10 MB body takes 50-500 ms),
        its private-key operations made by the child (:meth:`sign_digests`). ValueError if a
        key cannot sign (e.g. not of its algorithm), with the child's error text.
        """
        if not keys:
            return succeed(message)
        if len(message) > LARGE_MESSAGE:
            return Deferred.fromCoroutine(self._sign_large(message, keys, now))
        child = self._child
        if child is None or not child.serving:
            return self._inline.sign_message(message, keys, now)
        request_id = self._next_id
        try:
            key_ids, key_frames = self._keys_for(child, keys)
            head = encode_message(request_id, now, key_ids, len(message))
        except ValueError:
            return self._inline.sign_message(message, keys, now)  # the same error, or a signature
        self._next_id += 1
        request = child.pending[request_id] = _MessageRequest(message, keys, now)
        transport: Any = child.transport
        if key_frames:
            child.keys.update(key_ids)
            transport.writeSequence([*key_frames, head, message])
        else:
            # The transport sends what a reactor turn wrote at once.
            transport.writeSequence((head, message))
        return request.deferred

    def _keys_for(self, child: _Child, keys: Sequence[dkim.DKIMKey]) -> tuple[list[int], list[bytes]]:
        """
        The ids of ``keys`` (new ones for keys not seen yet), and the frames that give
        ``child`` those it was not sent yet (preceded by a forget frame when the table of
        ids was full and starts over); ValueError for a key that has no key frame.
        """
        table = self._key_ids
        frames: list[bytes] = []
        if len(table) >= MAX_KEYS:
            table.clear()
            if child.keys:
                child.keys.clear()
                frames.append(_FORGET_FRAME)
        ids: list[int] = []
        for key in keys:
            identity = (key.domain, key.selector, key.algorithm, key.private_key)
            key_id = table.get(identity)
            if key_id is None:
                key_id = table[identity] = self._next_key_id
                self._next_key_id += 1
            if key_id not in child.keys:
                frames.append(encode_key(key_id, key))
            ids.append(key_id)
        return ids, frames

    async def _sign_large(self, message: bytes, keys: Sequence[dkim.DKIMKey], now: float) -> bytes:
        threads: Any = self._reactor
        unsigned = await deferToThreadPool(threads, threads.getThreadPool(), dkim.prepare, message, keys, now)
        return unsigned.finish(await self.sign_digests(unsigned.requests))

    def sign_digests(self, requests: Sequence[SignRequest]) -> Deferred[list[bytes]]:
        """
        The signatures of ``requests`` (private-key operations only), in order, once all have
        arrived; ValueError (with the child's error text) if one of them could not be signed
        (a key not of its algorithm).
        """
        batch = _Batch(len(requests))
        child = self._child
        frames = []
        for index, request in enumerate(requests):
            if child is None or not child.serving:
                batch.answer_here(index, request)
                continue
            request_id = self._next_id
            try:
                frame = encode_request(request_id, request)
            except ValueError:
                batch.answer_here(index, request)  # the same error, from dkim.sign_digest
                continue
            self._next_id += 1
            child.pending[request_id] = _DigestRequest(batch, index, request)
            frames.append(frame)
        if frames:
            assert child is not None and child.transport is not None
            child.transport.write(b"".join(frames))
        return batch.deferred

    def _ended(self, child: _Child, reason: Failure) -> None:
        if self._child is child:
            self._child = None
        outstanding, child.pending = child.pending, {}
        for request in outstanding.values():
            request.answer_here()
        if child.kill_call is not None and child.kill_call.active():
            child.kill_call.cancel()
        if child.stopping:
            waiting, child.stopped = child.stopped, []
            for d in waiting:
                d.callback(None)
            return
        lived = self._clock.seconds() - child.started_at
        _log.warn(
            "DKIM signing process {pid} ended unexpectedly after {lived:.1f} s ({reason}); {outstanding} messages or"
            " signatures it owed were signed in the frontend, which signs until a new one runs",
            pid=child.pid,
            lived=lived,
            reason=reason.getErrorMessage(),
            outstanding=len(outstanding),
        )
        self._start_again(lived)
    def stopService(self) -> Deferred[None] | None:
        """
        Close the child's stdin: it answers what it has read, then exits. Fires once it has
        exited; killed if it has not within ``stop_timeout`` seconds (what it had not
        answered is then signed in this process).
        """
        super().stopService()
        if self._respawn is not None and self._respawn.active():
            self._respawn.cancel()
        self._respawn = None
        child = self._child
        if child is None or child.ended:
            return None
        stopped: Deferred[None] = Deferred()
        child.stopped.append(stopped)
        child.stopping = True
        assert child.transport is not None
        child.transport.closeStdin()
        child.kill_call = self._clock.callLater(self._stop_timeout, self._kill_on_stop, child)
        return stopped

    def _kill_on_stop(self, child: _Child) -> None:
        _log.warn(
            "DKIM signing process {pid} did not exit within {timeout} s of its input closing: killing it",
            pid=child.pid,
            timeout=self._stop_timeout,
        )
        child.kill()


if __name__ == "__main__":
    sys.exit(main())
