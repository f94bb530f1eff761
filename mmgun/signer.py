"""
DKIM's private-key operations in a helper process, so they never hold the frontend's GIL.

Why a process: ``cryptography`` releases the GIL during an RSA signature, but the signing
thread must take it back afterwards, and a busy reactor thread keeps it for up to the
switch interval (5 ms): beside a busy reactor, a 0.3 ms signature took 5.5 ms, and each
thread-pool hand-off cost the reactor about 0.25 ms of GIL-held time. In a child process
the operation costs the frontend only the bytes it writes and reads on a pipe.

The frontend does everything else (:func:`mmgun.dkim.prepare`, :meth:`mmgun.dkim.Unsigned.finish`:
about 0.06 ms per message, and it needs the message); the child gets, per signature, the
key (PEM), the algorithm and the 32-octet SHA-256 digest, and answers the signature.

One child per frontend process (:class:`SignerProcess`): one core makes about 3,400 RSA
2048 signatures per second, more than one frontend process can accept signed messages
(about 2,000 per second), so a second child would only add a process to manage.

The pipe protocol, all integers big-endian:

- request: u32 length of the rest, u64 id, u8 algorithm code (:data:`ALGORITHM_CODES`),
  u16 PEM length, the PEM, the 32-octet digest;
- reply: u32 length of the rest, u64 id, u8 status (0: ok, the signature follows; 1: error,
  a short text follows: the exception's class and message, never key material).

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
from typing import Any, Protocol

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
    "InProcessSigner",
    "ProtocolError",
    "ReplyReader",
    "Signer",
    "SignerProcess",
    "child_environment",
    "answers",
    "encode_request",
    "main",
    "serve_frames",
]

_log = Logger()

#: The algorithm codes of the request frames.
ALGORITHM_CODES = {dkim.RSA_SHA256: 1, dkim.ED25519_SHA256: 2}
_ALGORITHMS = {code: name for name, code in ALGORITHM_CODES.items()}
OK, ERROR = 0, 1

_LENGTH = struct.Struct(">I")
_REQUEST = struct.Struct(">IQBH")  # length, id, algorithm, PEM length
_REPLY = struct.Struct(">IQB")  # length, id, status
_DIGEST = 32
_MAX_PEM = 0xFFFF
#: The longest request (after its length field) and the longest reply a peer may send.
MAX_REQUEST = _REQUEST.size - _LENGTH.size + _MAX_PEM + _DIGEST
MAX_REPLY = _REPLY.size - _LENGTH.size + 4096
#: An error text is cut to this many characters.
_MAX_ERROR = 300
_READ_SIZE = 1 << 20
#: The child writes the replies it has made once they took this long (about 6 RSA 2048 signatures): the
#: frontend gets them in groups (a wake-up per reply cost it ~0.03 ms each), yet early in a burst.
FLUSH_AFTER = 0.002

#: Messages larger than this are prepared (canonicalized, hashed) in a thread, not on the reactor's.
LARGE_MESSAGE = 256 * 1024
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
    """The peer broke the pipe protocol (a frame too long or too short, an unknown id)."""


class Signer(Protocol):
    """What :class:`mmgun.web.signing.SendingDomains` signs with."""

    def prepare(self, message: bytes, keys: Sequence[dkim.DKIMKey], now: float) -> Awaitable[dkim.Unsigned]:
        """:func:`mmgun.dkim.prepare` of ``message``."""

    def sign(self, requests: Sequence[SignRequest]) -> Awaitable[list[bytes]]:
        """The signatures of ``requests``, in order."""


def _error_text(exception: BaseException) -> str:
    """An exception as a reply's error text: class and message only, cut short (no traceback, no key)."""
    return f"{type(exception).__name__}: {exception}"[:_MAX_ERROR]


class InProcessSigner:
    """A :class:`Signer` that signs on the calling thread (tests, tools, and the fallback of :class:`SignerProcess`)."""

    def prepare(self, message: bytes, keys: Sequence[dkim.DKIMKey], now: float) -> Deferred[dkim.Unsigned]:
        try:
            return succeed(dkim.prepare(message, keys, now))
        except Exception:
            return fail()

    def sign(self, requests: Sequence[SignRequest]) -> Deferred[list[bytes]]:
        try:
            return succeed([dkim.sign_digest(*request) for request in requests])
        except Exception:
            return fail()


# -- the pipe protocol --------------------------------------------------------------------------------


def encode_request(request_id: int, request: SignRequest) -> bytes:
    """One request frame; ValueError for an algorithm without a code, a PEM longer than 65,535 octets or a digest not of 32."""
    code = ALGORITHM_CODES.get(request.algorithm)
    if code is None:
        raise ValueError(f"unknown DKIM algorithm {request.algorithm!r}")
    if len(request.private_key) > _MAX_PEM:
        raise ValueError("a DKIM private key of more than 65,535 octets")
    if len(request.digest) != _DIGEST:
        raise ValueError(f"a SHA-256 digest is {_DIGEST} octets, not {len(request.digest)}")
    length = _REQUEST.size - _LENGTH.size + len(request.private_key) + _DIGEST
    return _REQUEST.pack(length, request_id, code, len(request.private_key)) + request.private_key + request.digest


def _reply(request_id: int, status: int, payload: bytes) -> bytes:
    return _REPLY.pack(_REPLY.size - _LENGTH.size + len(payload), request_id, status) + payload


def _answer(frame: memoryview) -> bytes:
    """The reply to one request frame (its length field included)."""
    _, request_id, code, pem_length = _REQUEST.unpack_from(frame)
    pem = bytes(frame[_REQUEST.size : _REQUEST.size + pem_length])
    digest = bytes(frame[_REQUEST.size + pem_length :])
    try:
        if len(digest) != _DIGEST:
            raise ValueError("malformed request: the PEM length does not match the frame's")
        algorithm = _ALGORITHMS.get(code)
        if algorithm is None:
            raise ValueError(f"unknown algorithm code {code}")
        return _reply(request_id, OK, dkim.sign_digest(pem, algorithm, digest))
    except Exception as e:
        return _reply(request_id, ERROR, _error_text(e).encode("utf-8", "replace"))


def answers(data: bytes | bytearray) -> Iterator[tuple[bytes, int]]:
    """
    The reply to each complete request frame at the start of ``data``, one at a time (each
    signed as it is asked for), with the offset in ``data`` where that request ended.
    ProtocolError for a frame too short or too long to be a request.
    """
    view = memoryview(data)
    offset = 0
    while len(view) - offset >= _LENGTH.size:
        (length,) = _LENGTH.unpack_from(view, offset)
        if not _REQUEST.size - _LENGTH.size + _DIGEST <= length <= MAX_REQUEST:
            raise ProtocolError(f"a request frame of {length} octets")
        end = offset + _LENGTH.size + length
        if end > len(view):
            return
        yield _answer(view[offset:end]), end
        offset = end


def serve_frames(data: bytes | bytearray) -> tuple[list[bytes], int]:
    """
    The replies to every complete request frame at the start of ``data``, and how many
    octets those frames took (the rest is the start of a frame still to come).
    ProtocolError for a frame too short or too long to be a request.
    """
    replies: list[bytes] = []
    used = 0
    for reply, end in answers(data):
        replies.append(reply)
        used = end
    return replies, used


class ReplyReader:
    """The frontend's side: reply frames out of the child's stdout, however the pipe cut them."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, int, bytes]]:
        """(id, status, payload) of each reply completed by ``data``; ProtocolError for a frame of impossible length."""
        self._buffer += data
        replies = []
        offset = 0
        buffer = self._buffer
        while len(buffer) - offset >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(buffer, offset)
            if not _REPLY.size - _LENGTH.size <= length <= MAX_REPLY:
                raise ProtocolError(f"a reply frame of {length} octets")
            end = offset + _LENGTH.size + length
            if end > len(buffer):
                break
            _, request_id, status = _REPLY.unpack_from(buffer, offset)
            replies.append((request_id, status, bytes(buffer[offset + _REPLY.size : end])))
            offset = end
        del buffer[:offset]
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
            for reply, end in answers(buffer):
                replies.append(reply)
                used = end
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
    """The signatures of one :meth:`SignerProcess.sign` call, as they arrive; fires once all have."""

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


class _Child(ProcessProtocol):
    """One child process: the requests it has not answered yet, its stdout replies and stderr lines."""

    def __init__(self, owner: SignerProcess, started_at: float) -> None:
        self.owner = owner
        self.started_at = started_at
        self.pending: dict[int, tuple[_Batch, int, SignRequest]] = {}
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
        try:
            replies = self.replies.feed(data)
            for request_id, status, payload in replies:
                slot = self.pending.pop(request_id, None)
                if slot is None:
                    raise ProtocolError(f"a reply to request {request_id}, which is not outstanding")
                batch, index, _ = slot
                if status == OK:
                    batch.answer(index, payload)
                else:
                    batch.answer(index, None, payload.decode("utf-8", "replace"))
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
    started with the service) makes the private-key operations, so they cost the frontend's
    GIL nothing but a pipe write and read. One child per frontend process (see the module
    docstring).

    Every request is answered: while no child runs (it died, it is being started again,
    the service is stopping), requests are signed in this process, and the requests a child
    had not answered when it died are signed here at once. A child that dies is started
    again, at once the first time, then after 1 s, doubling up to 30 s while it keeps dying;
    one that lived 60 s starts the count over.

    ``reactor`` spawns the child (IReactorProcess); ``clock`` (default: ``reactor``) times
    the back-off and the stop timeout; ``argv`` and ``env`` (tests) replace the child's
    command and environment (default: :func:`child_environment`).
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
        #: Wait this long before the next start after a death; None: start at once.
        self._delay: float | None = None
        self._respawn: IDelayedCall | None = None
        self._inline = InProcessSigner()

    @property
    def pid(self) -> int | None:
        """The pid of the child serving requests now (None: none; requests are signed in this process)."""
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

    def prepare(self, message: bytes, keys: Sequence[dkim.DKIMKey], now: float) -> Deferred[dkim.Unsigned]:
        """
        :func:`mmgun.dkim.prepare`: on the calling thread (the reactor's) for a message of up
        to :data:`LARGE_MESSAGE` octets, where it costs about 0.05 ms per KB; in a thread of the
        reactor's pool for a larger one, whose body is canonicalized and hashed in 64 KiB
        pieces, so the reactor keeps serving meanwhile (a 10 MB body takes 50-500 ms).
        """
        if len(message) <= LARGE_MESSAGE:
            return self._inline.prepare(message, keys, now)
        threads: Any = self._reactor
        return deferToThreadPool(threads, threads.getThreadPool(), dkim.prepare, message, keys, now)

    def sign(self, requests: Sequence[SignRequest]) -> Deferred[list[bytes]]:
        """
        The signatures of ``requests``, in order, once all have arrived; ValueError (with the
        child's error text) if one of them could not be signed (a key not of its algorithm).
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
            child.pending[request_id] = (batch, index, request)
            frames.append(frame)
        if frames:
            assert child is not None and child.transport is not None
            # One write per call; the transport sends what a reactor turn wrote at once.
            child.transport.write(b"".join(frames))
        return batch.deferred

    def _ended(self, child: _Child, reason: Failure) -> None:
        if self._child is child:
            self._child = None
        outstanding, child.pending = child.pending, {}
        for batch, index, request in outstanding.values():
            batch.answer_here(index, request)
        if child.kill_call is not None and child.kill_call.active():
            child.kill_call.cancel()
        if child.stopping:
            waiting, child.stopped = child.stopped, []
            for d in waiting:
                d.callback(None)
            return
        lived = self._clock.seconds() - child.started_at
        _log.warn(
            "DKIM signing process {pid} ended unexpectedly after {lived:.1f} s ({reason}); {outstanding} signatures"
            " it owed were made in the frontend, which signs until a new one runs",
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
