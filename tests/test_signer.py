"""
issue 13 (speed): DKIM signing in a helper process (:mod:`mmgun.signer`).

The real child (``python -m mmgun.signer``) on the real reactor: it signs whole messages
(RSA and Ed25519) and the digests of large ones, answers many requests in order, reports a
bad key without dying, and every message is signed when the child is killed with SIGKILL,
when the service stops, and when a child ignores the end of its input. The key frames
(each key sent once per child, again to a restarted child; a rotated key under a new id;
the table of ids starting over), the back-off of restarts on a Clock, with a stub reactor
whose children the test answers (with the child's own frame handling) and ends; the
framing with replies cut into single octets.
"""

from __future__ import annotations

import functools
import hashlib
import os
import signal
import struct
import sys
import threading
from collections.abc import Sequence
from typing import Any

import attrs
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa, utils
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mmgun import dkim, signer as signer_module
from mmgun.dkim import SignRequest
from mmgun.signer import (
    BACKOFF_MAX,
    DIGEST,
    FORGET,
    KEY,
    MESSAGE,
    STABLE_AFTER,
    InProcessSigner,
    ReplyReader,
    SignerProcess,
    child_environment,
    encode_key,
    encode_message,
    encode_request,
    serve_frames,
)

from .helpers import wait_until
from .test_dkim import ED, KEYS, NOW, RSA, make_key, request, send, verify_each


def digest(n: int) -> bytes:
    return hashlib.sha256(b"request %d" % n).digest()


@functools.lru_cache
def public_key(private_pem: bytes) -> Any:
    return serialization.load_pem_private_key(private_pem, password=None).public_key()


def verifies(request: SignRequest, signature: bytes) -> bool:
    """Whether ``signature`` is ``request``'s, checked with the public key (not with mmgun's code)."""
    public = public_key(request.private_key)
    try:
        if isinstance(public, rsa.RSAPublicKey):
            public.verify(signature, request.digest, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))
        else:
            assert isinstance(public, ed25519.Ed25519PublicKey)
            public.verify(signature, request.digest)
    except Exception:
        return False
    return True


def requests(count: int, key: Any = RSA) -> list[SignRequest]:
    return [SignRequest(key.private_key, key.algorithm, digest(n)) for n in range(count)]


def messages(count: int) -> list[bytes]:
    """``count`` different messages, as mmgun builds them."""
    return [send(request(subject=f"message {n}", body=f"body of message {n}\n")) for n in range(count)]


#: What the frontend must not do itself while a child serves: any part of signing.
FRONTEND_SIGNING = ("sign", "prepare", "sign_digest", "signature_fields")


def not_in_the_frontend(*args: Any) -> bytes:
    raise AssertionError("signed in the frontend, not in the child")


def forbid_signing_here(case: SynchronousTestCase) -> None:
    """Make this process's signing functions fail (the real child is another process: it still signs)."""
    for name in FRONTEND_SIGNING:
        case.patch(dkim, name, not_in_the_frontend)


def frames(data: bytes) -> list[tuple[int, Any]]:
    """
    The request frames in ``data``, parsed independently of mmgun.signer: (KEY, (id, domain,
    selector)), (MESSAGE, (request id, key ids)), (DIGEST, request id), (FORGET, None).
    """
    parsed: list[tuple[int, Any]] = []
    offset = 0
    while offset < len(data):
        (length,) = struct.unpack_from(">I", data, offset)
        frame = data[offset + 4 : offset + 4 + length]
        assert len(frame) == length, "a cut frame"
        kind = frame[0]
        if kind == KEY:
            key_id, _, domain_length, selector_length = struct.unpack_from(">IBBB", frame, 1)
            names = frame[8 : 8 + domain_length + selector_length]
            parsed.append((KEY, (key_id, names[:domain_length].decode(), names[domain_length:].decode())))
        elif kind == MESSAGE:
            request_id, _, count = struct.unpack_from(">QdB", frame, 1)
            parsed.append((MESSAGE, (request_id, list(struct.unpack_from(f">{count}I", frame, 18)))))
        elif kind == DIGEST:
            parsed.append((DIGEST, struct.unpack_from(">Q", frame, 1)[0]))
        else:
            parsed.append((kind, None))
        offset += 4 + length
    return parsed


class ChildTests(TestCase):
    """The real child process, on the real reactor."""

    def start(self, **kwargs: Any) -> SignerProcess:
        from twisted.internet import reactor

        self.events: list[dict[str, Any]] = []
        self.patch(signer_module, "_log", Logger(observer=self.events.append))  # type: ignore[arg-type]
        service = SignerProcess(reactor, **kwargs)
        service.startService()
        self.addCleanup(lambda: service.stopService() if service.running else None)
        return service

    def log_formats(self) -> list[str]:
        return [event["log_format"] for event in self.events]

    async def test_signs_rsa_and_ed25519_in_the_child(self) -> None:
        """
        issue 13 (speed) signer: a message signed by the child (every signing function of the
        frontend made to fail: it neither prepares nor signs) verifies with dkimpy, RSA and
        Ed25519, and equals what dkim.sign makes in-process.
        """
        service = self.start()
        self.assertNotIn(service.pid, (None, os.getpid()))
        message = send(request())
        expected = dkim.sign(message, KEYS, NOW)
        forbid_signing_here(self)
        signed = await service.sign_message(message, KEYS, NOW)
        self.assertEqual(verify_each(signed), [True, True])
        self.assertEqual(signed, expected)

    async def test_large_message_prepared_off_the_reactor_thread(self) -> None:
        """
        issue 13 (speed) signer: a message above LARGE_MESSAGE is canonicalized and hashed in a
        pool thread of the frontend (the reactor keeps serving) and its digests signed by the
        child; a small one is not prepared in the frontend at all (the child does it); both verify.
        """
        service = self.start()
        threads: list[threading.Thread] = []
        real = dkim.prepare

        def recording(*args: Any) -> dkim.Unsigned:
            threads.append(threading.current_thread())
            return real(*args)

        self.patch(dkim, "prepare", recording)
        self.patch(dkim, "sign_digest", not_in_the_frontend)
        self.patch(dkim, "sign", not_in_the_frontend)
        large = send(request(body="a  line \t of text \n" * (signer_module.LARGE_MESSAGE // 18 + 1)), max_size=2 * signer_module.LARGE_MESSAGE)
        self.assertGreater(len(large), signer_module.LARGE_MESSAGE)
        self.assertEqual(verify_each(await service.sign_message(large, KEYS, NOW)), [True, True])
        self.assertEqual(len(threads), 1)
        self.assertNotEqual(threads[0], threading.main_thread())
        self.assertEqual(verify_each(await service.sign_message(send(request(body="short\n")), KEYS, NOW)), [True, True])
        self.assertEqual(len(threads), 1)

    async def test_many_messages_answered_in_order(self) -> None:
        """
        issue 13 (speed) signer: 300 different messages in flight at once, signed with RSA, with
        RSA and Ed25519, and with Ed25519 in turn, are each answered with their own signed message.
        """
        service = self.start()
        batch = messages(300)
        key_sets = [(RSA,), KEYS, (ED,)]
        expected = [dkim.sign(m, key_sets[n % 3], NOW) for n, m in enumerate(batch)]
        forbid_signing_here(self)
        results = [service.sign_message(m, key_sets[n % 3], NOW) for n, m in enumerate(batch)]
        for want, d in zip(expected, results, strict=True):
            self.assertEqual(await d, want)

    async def test_many_digest_requests_answered_in_order(self) -> None:
        """
        issue 13 (speed) signer: 600 digest requests (large messages' path) in one batch and 3
        batches at once (RSA and Ed25519 mixed) are each answered with the signature of their
        own digest, in order.
        """
        service = self.start()
        self.patch(dkim, "sign_digest", not_in_the_frontend)
        big = [SignRequest(key.private_key, key.algorithm, digest(n)) for n in range(600) for key in (RSA, ED)][:600]
        small = [requests(5, ED), requests(7), requests(1)]
        results = [service.sign_digests(big)] + [service.sign_digests(batch) for batch in small]
        for batch, d in zip([big, *small], results, strict=True):
            signatures = await d
            self.assertEqual(len(signatures), len(batch))
            self.assertTrue(all(verifies(r, s) for r, s in zip(batch, signatures, strict=True)))

    async def test_error_reply_and_the_child_keeps_serving(self) -> None:
        """
        issue 13 (speed) signer: a message with an Ed25519 key labelled rsa-sha256, and such a
        digest request, are each a ValueError naming the problem (no key material in it); the
        same child then signs the next messages.
        """
        service = self.start()
        pid = service.pid
        bad_key = attrs.evolve(ED, algorithm=dkim.RSA_SHA256, selector="mislabelled")
        good = messages(3)
        expected = [dkim.sign(m, KEYS, NOW) for m in good]
        forbid_signing_here(self)
        with self.assertRaises(ValueError) as raised:
            await service.sign_message(good[0], [RSA, bad_key], NOW)
        self.assertEqual(str(raised.exception), "ValueError: an Ed25519 key cannot sign rsa-sha256")
        with self.assertRaises(ValueError) as raised:
            await service.sign_digests([requests(1)[0], SignRequest(ED.private_key, dkim.RSA_SHA256, digest(1))])
        text = str(raised.exception)
        self.assertEqual(text, "ValueError: an Ed25519 key cannot sign rsa-sha256")
        self.assertNotIn("PRIVATE", text)
        for message, want in zip(good, expected, strict=True):
            self.assertEqual(await service.sign_message(message, KEYS, NOW), want)
        self.assertEqual(service.pid, pid)

    async def test_killed_child_requests_still_answered_and_replaced(self) -> None:
        """
        issue 13 (speed) signer: kill -9 of the child with 300 messages outstanding: every one
        is signed (in the frontend), one warning is logged, a new child (another pid) is
        started at once, gets the keys again, and signs the next messages.
        """
        service = self.start()
        first = service.pid
        assert first is not None
        batch = messages(300)
        results = [service.sign_message(m, KEYS, NOW) for m in batch]
        os.kill(first, signal.SIGKILL)
        for message, d in zip(batch, results, strict=True):
            self.assertEqual(await d, dkim.sign(message, KEYS, NOW))
        await wait_until(lambda: service.pid not in (None, first), "a new signing process")
        ended = [m for m in self.log_formats() if "ended unexpectedly" in m]
        self.assertEqual(len(ended), 1)
        more = messages(4)
        expected = [dkim.sign(m, KEYS, NOW) for m in more]
        forbid_signing_here(self)
        for message, want in zip(more, expected, strict=True):
            self.assertEqual(await service.sign_message(message, KEYS, NOW), want)

    async def test_stop_answers_in_flight_requests_and_the_child_exits(self) -> None:
        """
        issue 13 (speed) signer: stopService right after 200 messages were sent: the child signs
        them all (the frontend's signing made to fail), then exits 0 on end of input; no
        restart, and later messages are signed in the frontend.
        """
        service = self.start()
        batch = messages(200)
        expected = [dkim.sign(m, KEYS, NOW) for m in batch]
        forbid_signing_here(self)
        child = service._child
        assert child is not None
        results = [service.sign_message(m, KEYS, NOW) for m in batch]
        stopped = service.stopService()
        assert stopped is not None
        await stopped
        for want, d in zip(expected, results, strict=True):
            self.assertEqual(await d, want)
        assert child.reason is not None
        self.assertIsInstance(child.reason.value, ProcessDone)
        self.assertIsNone(service.pid)
        self.assertEqual([m for m in self.log_formats() if "unexpectedly" in m], [])
        for name in FRONTEND_SIGNING:
            self.patch(dkim, name, _REAL[name])
        later = send(request(subject="later"))
        self.assertEqual(verify_each(await service.sign_message(later, KEYS, NOW)), [True, True])

    async def test_child_ignoring_end_of_input_is_killed(self) -> None:
        """
        issue 13 (speed) signer: a child that reads its requests but never answers and does not
        exit at end of input: stopService waits (its Deferred has no result once the child has
        seen the end of input), then after the stop timeout (on a Clock) kills it with SIGKILL
        and signs the outstanding messages in the frontend.
        """
        clock = Clock()
        script = (
            "import os, signal, sys\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "while os.read(0, 65536): pass\n"
            "sys.stderr.write('saw end of input\\n'); sys.stderr.flush()\n"
            "while True: signal.pause()\n"
        )
        service = self.start(clock=clock, argv=[sys.executable, "-c", script])
        child = service._child
        assert child is not None
        batch = messages(3)
        results = [service.sign_message(m, KEYS, NOW) for m in batch]
        stopped = service.stopService()
        assert stopped is not None
        await wait_until(lambda: any("saw end of input" in str(e.get("line")) for e in self.events), "the child to read EOF")
        self.assertNoResult(stopped)
        for d in results:
            self.assertNoResult(d)
        clock.advance(signer_module.STOP_TIMEOUT)
        await stopped
        assert child.reason is not None
        self.assertIsInstance(child.reason.value, ProcessTerminated)
        self.assertEqual(child.reason.value.signal, signal.SIGKILL)
        for message, d in zip(batch, results, strict=True):
            self.assertEqual(self.successResultOf(d), dkim.sign(message, KEYS, NOW))
        self.assertTrue(any("killing it" in m for m in self.log_formats()))


_REAL = {name: getattr(dkim, name) for name in FRONTEND_SIGNING}


class FakeProcess:
    """The transport a stub reactor gives a child: what was written (each write call apart), stdin closed, signals."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.written = bytearray()
        self.writes: list[bytes] = []
        self.stdin_closed = False
        self.signals: list[str] = []

    def write(self, data: bytes) -> None:
        self.written += data
        self.writes.append(data)

    def writeSequence(self, data: Sequence[bytes]) -> None:
        self.write(b"".join(data))

    def closeStdin(self) -> None:
        self.stdin_closed = True

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)


class StubReactor:
    """spawnProcess records each child (or fails while ``failing``); the test answers them (as the real child would) and ends them."""

    def __init__(self) -> None:
        self.spawned: list[tuple[Any, FakeProcess, list[str]]] = []
        #: The keys each child was sent, as the real child keeps them.
        self.child_keys: list[dict[int, Any]] = []
        self.failing = False

    def spawnProcess(
        self, protocol: Any, executable: str, args: Sequence[str], env: Any = None, path: Any = None, childFDs: Any = None
    ) -> FakeProcess:
        if self.failing:
            raise OSError("cannot fork (test)")
        #: The folder each child was started in.
        self.paths = [*getattr(self, "paths", []), path]
        process = FakeProcess(1000 + len(self.spawned))
        self.spawned.append((protocol, process, list(args)))
        self.child_keys.append({})
        protocol.makeConnection(process)
        return process

    def end(self, index: int = -1, code: int = 1) -> None:
        protocol = self.spawned[index][0]
        protocol.processEnded(Failure(ProcessTerminated(exitCode=code) if code else ProcessDone(0)))

    def answer(self, index: int = -1, step: int | None = None) -> None:
        """What the real child would answer to everything written so far, fed back ``step`` octets at a time (default: at once)."""
        protocol, process, _ = self.spawned[index]
        replies, used = serve_frames(bytes(process.written), self.child_keys[index])
        del process.written[:used]
        data = b"".join(replies)
        step = step or len(data) or 1
        for i in range(0, len(data), step):
            protocol.childDataReceived(1, data[i : i + step])

    def writes(self, index: int = -1) -> list[list[tuple[int, Any]]]:
        """The frames of each write to a child so far."""
        return [frames(data) for data in self.spawned[index][1].writes]


class StubbedTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = StubReactor()
        self.clock = Clock()
        self.events: list[dict[str, Any]] = []
        self.patch(signer_module, "_log", Logger(observer=self.events.append))  # type: ignore[arg-type]
        self.service = SignerProcess(self.reactor, clock=self.clock, argv=["python", "-m", "mmgun.signer"], env={})  # type: ignore[arg-type]
        self.service.startService()

    def spawns(self) -> int:
        return len(self.reactor.spawned)

    def sign_in_child(self, message: bytes, keys: Sequence[Any], index: int = -1) -> bytes:
        """``message`` signed through the service by the stub child (the frontend's own dkim.sign made to fail meanwhile)."""
        with_here = dkim.sign
        self.patch(dkim, "sign", not_in_the_frontend)
        d = self.service.sign_message(message, keys, NOW)
        self.assertNoResult(d)
        self.patch(dkim, "sign", with_here)
        self.reactor.answer(index)
        return self.successResultOf(d)

    def test_back_off_of_restarts(self) -> None:
        """
        issue 13 (speed) signer: a child that keeps dying is started again at once the first
        time, then after 1, 2, 4, 8, 16, 30, 30 s; one that lived 60 s is started again at once.
        """
        self.assertEqual(self.spawns(), 1)
        self.reactor.end()
        self.assertEqual(self.spawns(), 2)  # at once
        for delay in (1, 2, 4, 8, 16, 30, 30):
            before = self.spawns()
            self.reactor.end()
            self.clock.advance(delay - 0.01)
            self.assertEqual(self.spawns(), before, f"before {delay} s")
            self.clock.advance(0.01)
            self.assertEqual(self.spawns(), before + 1, f"after {delay} s")
        self.assertEqual(self.spawns(), 9)
        self.assertEqual(BACKOFF_MAX, 30)
        self.clock.advance(STABLE_AFTER)
        self.reactor.end()
        self.assertEqual(self.spawns(), 10)  # lived 60 s: at once
        self.reactor.end()
        self.clock.advance(0.99)
        self.assertEqual(self.spawns(), 10)
        self.clock.advance(0.01)
        self.assertEqual(self.spawns(), 11)

    def test_not_started_again_before_its_delay(self) -> None:
        """issue 13 (speed) signer: during a back-off no child is started early; meanwhile messages are signed in the frontend."""
        self.reactor.end()
        self.reactor.end()  # the second death: 1 s
        self.clock.advance(0.999)
        self.assertEqual(self.spawns(), 2)
        self.assertIsNone(self.service.pid)
        message = send(request())
        self.assertEqual(verify_each(self.successResultOf(self.service.sign_message(message, KEYS, NOW))), [True, True])
        self.assertEqual(len(self.reactor.spawned[-1][1].written), 0)
        self.clock.advance(0.001)
        self.assertEqual(self.spawns(), 3)
        self.assertEqual(self.service.pid, 1002)

    def test_spawn_failure_backs_off(self) -> None:
        """issue 13 (speed) signer: spawnProcess failing (no fork) is retried with the back-off; messages are signed in the frontend meanwhile."""
        self.reactor.failing = True
        self.reactor.end()  # the retry at once fails, the next is in 1 s, then 2 s
        self.assertEqual(self.spawns(), 1)
        self.assertEqual(verify_each(self.successResultOf(self.service.sign_message(send(request()), KEYS, NOW))), [True, True])
        self.clock.advance(1)
        self.reactor.failing = False
        self.clock.advance(1.99)
        self.assertEqual(self.spawns(), 1)
        self.clock.advance(0.01)
        self.assertEqual(self.spawns(), 2)
        self.assertEqual(len([e for e in self.events if "could not start" in e["log_format"]]), 2)

    def test_stop_cancels_a_pending_restart(self) -> None:
        """issue 13 (speed) signer: stopService during a back-off: no child is started afterwards."""
        self.reactor.end()
        self.reactor.end()
        self.assertIsNone(self.service.stopService())
        self.clock.advance(BACKOFF_MAX * 4)
        self.assertEqual(self.spawns(), 2)

    def test_replies_cut_anywhere_are_matched_to_requests(self) -> None:
        """
        issue 13 (speed) signer: replies that arrive one octet at a time, for two messages and
        two digest batches written in one reactor turn, answer each in order; the frontend
        signs nothing.
        """
        self.patch(dkim, "sign_digest", not_in_the_frontend)
        self.patch(dkim, "sign", not_in_the_frontend)
        first, second = messages(2)
        digests1, digests2 = requests(3), requests(2, ED)
        m1 = self.service.sign_message(first, KEYS, NOW)
        b1 = self.service.sign_digests(digests1)
        m2 = self.service.sign_message(second, (RSA,), NOW)
        b2 = self.service.sign_digests(digests2)
        self.assertNoResult(m1)
        self.patch(dkim, "sign_digest", _REAL["sign_digest"])  # the stub child is this process
        self.reactor.answer(step=1)
        for batch, d in ((digests1, b1), (digests2, b2)):
            signatures = self.successResultOf(d)
            self.assertTrue(all(verifies(r, s) for r, s in zip(batch, signatures, strict=True)))
        self.assertEqual(self.successResultOf(m1), _REAL["sign"](first, KEYS, NOW))
        self.assertEqual(self.successResultOf(m2), _REAL["sign"](second, (RSA,), NOW))

    def test_death_signs_outstanding_requests_here(self) -> None:
        """issue 13 (speed) signer: the child dies with messages and digests unanswered: each is signed in the frontend at once."""
        batch = messages(3)
        results = [self.service.sign_message(m, KEYS, NOW) for m in batch]
        digests = requests(4)
        d = self.service.sign_digests(digests)
        self.assertNoResult(d)
        self.reactor.end(code=1)
        for message, result in zip(batch, results, strict=True):
            self.assertEqual(self.successResultOf(result), dkim.sign(message, KEYS, NOW))
        signatures = self.successResultOf(d)
        self.assertTrue(all(verifies(r, s) for r, s in zip(digests, signatures, strict=True)))
        warnings = [e for e in self.events if "ended unexpectedly" in e["log_format"]]
        self.assertEqual(len(warnings), 1)
        self.assertEqual(warnings[0]["outstanding"], 7)

    def test_garbage_from_the_child_kills_it(self) -> None:
        """issue 13 (speed) signer: a reply to no outstanding request: the child is killed, and its messages signed here once it ended."""
        message = send(request())
        d = self.service.sign_message(message, KEYS, NOW)
        protocol, process, _ = self.reactor.spawned[0]
        protocol.childDataReceived(1, b"\x00\x00\x00\x09" + (12345).to_bytes(8, "big") + b"\x00")
        self.assertEqual(process.signals, ["KILL"])
        self.reactor.end(0, code=1)
        self.assertEqual(self.successResultOf(d), dkim.sign(message, KEYS, NOW))

    def test_stderr_logged_and_bounded(self) -> None:
        """issue 13 (speed) signer: the child's stderr is logged a line at a time, at most MAX_STDERR_LINES lines, each cut short."""
        protocol = self.reactor.spawned[0][0]
        protocol.childDataReceived(2, b"first li")
        protocol.childDataReceived(2, b"ne\n" + b"x" * 10_000 + b"\n" + b"more\n" * 200)
        lines = [e["line"] for e in self.events if "line" in e]
        self.assertEqual(lines[0], "first line")
        self.assertLessEqual(len(lines[1]), 500)
        self.assertEqual(len(lines), signer_module.MAX_STDERR_LINES)

    def test_stop_waits_for_the_exit(self) -> None:
        """issue 13 (speed) signer: stopService closes the child's stdin and fires only when the child has exited."""
        process = self.reactor.spawned[0][1]
        stopped = self.service.stopService()
        assert isinstance(stopped, Deferred)
        self.assertTrue(process.stdin_closed)
        self.assertNoResult(stopped)
        self.reactor.end(code=0)
        self.successResultOf(stopped)
        self.clock.advance(60)
        self.assertEqual(process.signals, [])
        self.assertEqual(self.spawns(), 1)

    # -- key frames

    def test_each_key_sent_once_before_its_first_use(self) -> None:
        """
        issue 13 (speed) signer key frames: the first message with two keys is written as one
        write of both key frames, then the message frame naming their ids; the next messages
        with those keys carry no key frame; each is signed by the (stub) child.
        """
        first, second, third = messages(3)
        self.assertEqual(verify_each(self.sign_in_child(first, KEYS)), [True, True])
        self.assertEqual(verify_each(self.sign_in_child(second, KEYS)), [True, True])
        self.assertEqual(verify_each(self.sign_in_child(third, (ED,)), keys=[ED]), [True])
        writes = self.reactor.writes()
        self.assertEqual([[kind for kind, _ in write] for write in writes], [[KEY, KEY, MESSAGE], [MESSAGE], [MESSAGE]])
        key_ids = {fields[0]: fields[2] for kind, fields in writes[0] if kind == KEY}  # id -> selector
        self.assertEqual(sorted(key_ids.values()), sorted(k.selector for k in KEYS))
        self.assertEqual(sorted(writes[0][2][1][1]), sorted(key_ids))
        self.assertEqual(sorted(writes[1][0][1][1]), sorted(key_ids))
        self.assertEqual([key_ids[i] for i in writes[2][0][1][1]], [ED.selector])

    def test_restarted_child_gets_its_keys_again(self) -> None:
        """
        issue 13 (speed) signer key frames: after the child died, the new child is sent the
        keys again (same ids) before the first message that uses them, and signs it; a child
        that was not sent them (the stub keeps each child's keys apart) could not have.
        """
        self.sign_in_child(messages(1)[0], KEYS)
        first_ids = sorted(fields[0] for kind, fields in self.reactor.writes(0)[0] if kind == KEY)
        self.reactor.end(0)
        self.assertEqual(self.spawns(), 2)
        message = send(request(subject="after the restart"))
        self.assertEqual(self.sign_in_child(message, KEYS), dkim.sign(message, KEYS, NOW))
        (write,) = self.reactor.writes(1)
        self.assertEqual([kind for kind, _ in write], [KEY, KEY, MESSAGE])
        self.assertEqual(sorted(fields[0] for kind, fields in write if kind == KEY), first_ids)

    def test_two_domains_keys_sent_each_once(self) -> None:
        """
        issue 13 (speed) signer key frames: the keys of two domains get distinct ids, each
        sent once, and each message is signed with its own domain's key (d= and s= checked).
        """
        other = make_key(dkim.RSA_SHA256, "mmgun20251205-zz9zz9", domain="other.example")
        for n in range(2):
            for key in (RSA, other):
                signed = self.sign_in_child(send(request(subject=f"{key.domain} {n}")), (key,))
                self.assertIn(f"d={key.domain}; s={key.selector};".encode(), signed.replace(b"\r\n", b""))
                self.assertEqual(verify_each(signed, keys=[key]), [True])
        sent = [fields for write in self.reactor.writes() for kind, fields in write if kind == KEY]
        self.assertEqual(sorted((domain, selector) for _, domain, selector in sent), sorted([(RSA.domain, RSA.selector), (other.domain, other.selector)]))
        self.assertEqual(len({key_id for key_id, _, _ in sent}), 2)

    def test_rotated_key_gets_a_new_id(self) -> None:
        """
        issue 13 (speed) signer key frames: a rotated key (new selector and PEM), and a key
        whose PEM changed under the same selector, each get a new id and key frame; the
        child signs with the new key (the old PEM would not verify under the new record).
        """
        self.sign_in_child(messages(1)[0], (RSA,))
        rotated = make_key(dkim.RSA_SHA256, "mmgun20251206-r0t4t3")
        same_selector = make_key(dkim.RSA_SHA256, rotated.selector)
        ids = []
        for key in (rotated, same_selector):
            message = send(request(subject=f"with {key.selector}"))
            self.assertEqual(verify_each(self.sign_in_child(message, (key,)), keys=[key]), [True])
            write = self.reactor.writes()[-1]
            self.assertEqual([kind for kind, _ in write], [KEY, MESSAGE])
            ids.append(write[0][1][0])
        first_id = self.reactor.writes()[0][0][1][0]
        self.assertEqual(len({first_id, *ids}), 3)

    def test_key_table_starts_over_when_full(self) -> None:
        """
        issue 13 (speed) signer key frames: with room for 2 key ids, a third key makes the
        frontend start its table over: a forget frame, then the key frames again (new ids);
        the child, having forgotten its keys, still signs every message.
        """
        self.patch(signer_module, "MAX_KEYS", 2)
        keys = [make_key(dkim.ED25519_SHA256, f"sel{n}") for n in range(3)]
        for key in [*keys, keys[0]]:
            self.assertEqual(verify_each(self.sign_in_child(send(request(subject=key.selector)), (key,)), keys=[key]), [True])
        kinds = [[kind for kind, _ in write] for write in self.reactor.writes()]
        self.assertEqual(kinds, [[KEY, MESSAGE], [KEY, MESSAGE], [FORGET, KEY, MESSAGE], [KEY, MESSAGE]])
        self.assertEqual(len(self.reactor.child_keys[0]), 2)


class ProtocolTests(SynchronousTestCase):
    def test_child_answers_split_and_bad_frames(self) -> None:
        """issue 13 (speed) signer: the child's frame handling: a partial frame waits, an unknown algorithm is an error reply, frames of impossible length or unknown kind end it."""
        frame = encode_request(7, requests(1)[0])
        replies, used = serve_frames(frame[:-1])
        self.assertEqual((replies, used), ([], 0))
        replies, used = serve_frames(frame + frame[:10])
        self.assertEqual(used, len(frame))
        ((request_id, status, payload),) = ReplyReader().feed(replies[0])
        self.assertEqual((request_id, status), (7, 0))
        bad = bytearray(frame)
        bad[13] = 9  # the algorithm code
        ((_, status, payload),) = ReplyReader().feed(serve_frames(bytes(bad))[0][0])
        self.assertEqual((status, payload), (1, b"ValueError: unknown algorithm code 9"))
        with self.assertRaises(signer_module.ProtocolError):
            serve_frames(b"\xff\xff\xff\xff" + b"x" * 20)
        with self.assertRaises(signer_module.ProtocolError):
            serve_frames(b"\x00\x00\x00\x01\x63")  # kind 99
        with self.assertRaises(signer_module.ProtocolError):
            serve_frames(b"\x00\x00\x00\x03\x02\x00\x00")  # a message frame too short for its head

    def test_message_with_an_unknown_key_id_is_an_error_reply(self) -> None:
        """issue 13 (speed) signer key frames: a message naming a key id the child was not sent is answered with an error, not signed, and the child goes on."""
        message = send(request())
        keys: dict[int, Any] = {}
        data = encode_message(1, NOW, [5], len(message)) + message
        data += encode_key(5, RSA) + encode_message(2, NOW, [5], len(message)) + message
        replies, used = serve_frames(data, keys)
        self.assertEqual(used, len(data))
        (first, second) = [reply for reply in ReplyReader().feed(b"".join(replies))]
        self.assertEqual(first, (1, 1, b"ValueError: no key 5 was sent"))
        self.assertEqual(second[:2], (2, 0))
        self.assertEqual(second[2] + message, dkim.sign(message, (RSA,), NOW))

    def test_key_frames_refuse_what_they_cannot_carry(self) -> None:
        """issue 13 (speed) signer key frames: a non-ASCII or over-long domain, or more than 255 keys, is a ValueError (the frontend then signs in-process)."""
        with self.assertRaises(ValueError):
            encode_key(1, attrs.evolve(RSA, domain="exämple.com"))
        with self.assertRaises(ValueError):
            encode_key(1, attrs.evolve(RSA, domain="a" * 256))
        with self.assertRaises(ValueError):
            encode_message(1, NOW, list(range(256)), 10)

    def test_in_process_signer(self) -> None:
        """issue 13 (speed) signer: the in-process signer (tests, tools) signs messages and digests, and fails with ValueError for a mismatched key."""
        batch = requests(2)
        signatures: list[bytes] = self.successResultOf(InProcessSigner().sign_digests(batch))
        self.assertTrue(all(verifies(r, s) for r, s in zip(batch, signatures, strict=True)))
        self.failureResultOf(InProcessSigner().sign_digests([SignRequest(RSA.private_key, dkim.ED25519_SHA256, digest(0))]), ValueError)
        self.assertEqual(verify_each(self.successResultOf(InProcessSigner().sign_message(send(request()), KEYS, NOW))), [True, True])
        self.failureResultOf(InProcessSigner().sign_message(send(request()), [attrs.evolve(RSA, algorithm=dkim.ED25519_SHA256)], NOW), ValueError)

    def test_child_environment_finds_this_package(self) -> None:
        """issue 13 (speed) signer: the child's PYTHONPATH starts with the directory of the mmgun package the frontend runs."""
        env = child_environment({"PYTHONPATH": "/elsewhere", "HOME": "/h"})
        root = os.path.dirname(os.path.dirname(os.path.abspath(signer_module.__file__)))
        self.assertEqual(env["PYTHONPATH"].split(os.pathsep)[0], root)
        self.assertEqual(env["PYTHONPATH"].split(os.pathsep)[-1], "/elsewhere")
        self.assertEqual(env["HOME"], "/h")
