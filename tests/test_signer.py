"""
issue 13 (speed): DKIM's private-key operations in a helper process (:mod:`mmgun.signer`).

The real child (``python -m mmgun.signer``) on the real reactor: it signs RSA and Ed25519,
answers many requests in order, reports a bad key without dying, and every request is
answered when the child is killed with SIGKILL, when the service stops, and when a child
ignores the end of its input. The back-off of restarts on a Clock, with a stub reactor
whose children the test ends; the framing with replies cut into single octets.
"""

from __future__ import annotations

import functools
import hashlib
import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

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
    STABLE_AFTER,
    InProcessSigner,
    ReplyReader,
    SignerProcess,
    child_environment,
    encode_request,
    serve_frames,
)

from .helpers import wait_until
from .test_dkim import ED, KEYS, NOW, RSA, request, send, verify_each


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


def not_in_the_frontend(*args: Any) -> bytes:
    raise AssertionError("signed in the frontend, not in the child")


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

    def messages(self) -> list[str]:
        return [event["log_format"] for event in self.events]

    async def test_signs_rsa_and_ed25519_in_the_child(self) -> None:
        """
        issue 13 (speed) signer: a message prepared in the frontend and signed by the child
        (the frontend's own sign_digest made to fail) verifies with dkimpy, RSA and Ed25519,
        and equals what dkim.sign makes.
        """
        service = self.start()
        self.assertNotIn(service.pid, (None, os.getpid()))
        message = send(request())
        expected = dkim.sign(message, KEYS, NOW)
        self.patch(dkim, "sign_digest", not_in_the_frontend)
        unsigned = dkim.prepare(message, KEYS, NOW)
        signed = unsigned.finish(await service.sign(unsigned.requests))
        self.assertEqual(verify_each(signed), [True, True])
        self.assertEqual(signed, expected)

    async def test_large_message_prepared_off_the_reactor_thread(self) -> None:
        """
        issue 13 (speed) signer: a message above LARGE_MESSAGE is canonicalized and hashed in a
        pool thread (the reactor keeps serving), a small one on the reactor thread; both verify.
        """
        service = self.start()
        threads: list[threading.Thread] = []
        real = dkim.prepare

        def recording(*args: Any) -> dkim.Unsigned:
            threads.append(threading.current_thread())
            return real(*args)

        self.patch(dkim, "prepare", recording)
        for body in ("a  line \t of text \n" * (signer_module.LARGE_MESSAGE // 18 + 1), "short\n"):
            message = send(request(body=body), max_size=2 * signer_module.LARGE_MESSAGE)
            unsigned = await service.prepare(message, KEYS, NOW)
            self.assertEqual(verify_each(unsigned.finish(await service.sign(unsigned.requests))), [True, True])
        self.assertNotEqual(threads[0], threading.main_thread())
        self.assertEqual(threads[1], threading.main_thread())

    async def test_many_requests_answered_in_order(self) -> None:
        """
        issue 13 (speed) signer: 600 requests in one batch and 3 batches at once (RSA and
        Ed25519 mixed) are each answered with the signature of their own digest, in order.
        """
        service = self.start()
        self.patch(dkim, "sign_digest", not_in_the_frontend)
        big = [SignRequest(key.private_key, key.algorithm, digest(n)) for n in range(600) for key in (RSA, ED)][:600]
        small = [requests(5, ED), requests(7), requests(1)]
        results = [service.sign(big)] + [service.sign(batch) for batch in small]
        for batch, d in zip([big, *small], results, strict=True):
            signatures = await d
            self.assertEqual(len(signatures), len(batch))
            self.assertTrue(all(verifies(r, s) for r, s in zip(batch, signatures, strict=True)))

    async def test_error_reply_and_the_child_keeps_serving(self) -> None:
        """
        issue 13 (speed) signer: an Ed25519 key sent as rsa-sha256 is a ValueError naming the
        problem (no key material in it); the same child then signs the next requests.
        """
        service = self.start()
        pid = service.pid
        self.patch(dkim, "sign_digest", not_in_the_frontend)
        bad = [requests(1)[0], SignRequest(ED.private_key, dkim.RSA_SHA256, digest(1))]
        with self.assertRaises(ValueError) as raised:
            await service.sign(bad)
        text = str(raised.exception)
        self.assertEqual(text, "ValueError: an Ed25519 key cannot sign rsa-sha256")
        self.assertNotIn("PRIVATE", text)
        good = requests(3)
        self.assertTrue(all(verifies(r, s) for r, s in zip(good, await service.sign(good), strict=True)))
        self.assertEqual(service.pid, pid)

    async def test_killed_child_requests_still_answered_and_replaced(self) -> None:
        """
        issue 13 (speed) signer: kill -9 of the child with 300 requests outstanding: every one
        is answered (signed in the frontend), one warning is logged, a new child (another pid)
        is started at once, and the next requests go to it.
        """
        service = self.start()
        first = service.pid
        assert first is not None
        batch = requests(300)
        d = service.sign(batch)
        os.kill(first, signal.SIGKILL)
        signatures = await d
        self.assertTrue(all(verifies(r, s) for r, s in zip(batch, signatures, strict=True)))
        await wait_until(lambda: service.pid not in (None, first), "a new signing process")
        ended = [m for m in self.messages() if "ended unexpectedly" in m]
        self.assertEqual(len(ended), 1)
        self.patch(dkim, "sign_digest", not_in_the_frontend)
        more = requests(4, ED)
        self.assertTrue(all(verifies(r, s) for r, s in zip(more, await service.sign(more), strict=True)))

    async def test_stop_answers_in_flight_requests_and_the_child_exits(self) -> None:
        """
        issue 13 (speed) signer: stopService right after 200 requests were sent: the child answers
        them all (the frontend's sign_digest made to fail), then exits 0 on end of input;
        no restart, and later requests are signed in the frontend.
        """
        service = self.start()
        self.patch(dkim, "sign_digest", not_in_the_frontend)
        child = service._child
        assert child is not None
        batch = requests(200)
        d = service.sign(batch)
        stopped = service.stopService()
        assert stopped is not None
        await stopped
        signatures = await d
        self.assertTrue(all(verifies(r, s) for r, s in zip(batch, signatures, strict=True)))
        assert child.reason is not None
        self.assertIsInstance(child.reason.value, ProcessDone)
        self.assertIsNone(service.pid)
        self.assertEqual([m for m in self.messages() if "unexpectedly" in m], [])
        self.patch(dkim, "sign_digest", _real_sign_digest)
        later = requests(2)
        self.assertTrue(all(verifies(r, s) for r, s in zip(later, await service.sign(later), strict=True)))

    async def test_child_ignoring_end_of_input_is_killed(self) -> None:
        """
        issue 13 (speed) signer: a child that reads its requests but never answers and does not
        exit at end of input: stopService waits (its Deferred has no result once the child has
        seen the end of input), then after the stop timeout (on a Clock) kills it with SIGKILL
        and signs the outstanding requests in the frontend.
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
        batch = requests(3)
        d = service.sign(batch)
        stopped = service.stopService()
        assert stopped is not None
        await wait_until(lambda: any("saw end of input" in str(e.get("line")) for e in self.events), "the child to read EOF")
        self.assertNoResult(stopped)
        self.assertNoResult(d)
        clock.advance(signer_module.STOP_TIMEOUT)
        await stopped
        assert child.reason is not None
        self.assertIsInstance(child.reason.value, ProcessTerminated)
        self.assertEqual(child.reason.value.signal, signal.SIGKILL)
        signatures = self.successResultOf(d)
        self.assertTrue(all(verifies(r, s) for r, s in zip(batch, signatures, strict=True)))
        self.assertTrue(any("killing it" in m for m in self.messages()))


_real_sign_digest = dkim.sign_digest


class FakeProcess:
    """The transport a stub reactor gives a child: what was written, stdin closed, signals."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.written = bytearray()
        self.stdin_closed = False
        self.signals: list[str] = []

    def write(self, data: bytes) -> None:
        self.written += data

    def closeStdin(self) -> None:
        self.stdin_closed = True

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)


class StubReactor:
    """spawnProcess records each child (or fails while ``failing``); the test ends them."""

    def __init__(self) -> None:
        self.spawned: list[tuple[Any, FakeProcess, list[str]]] = []
        self.failing = False

    def spawnProcess(self, protocol: Any, executable: str, args: Sequence[str], env: Any = None, childFDs: Any = None) -> FakeProcess:
        if self.failing:
            raise OSError("cannot fork (test)")
        process = FakeProcess(1000 + len(self.spawned))
        self.spawned.append((protocol, process, list(args)))
        protocol.makeConnection(process)
        return process

    def end(self, index: int = -1, code: int = 1) -> None:
        protocol = self.spawned[index][0]
        protocol.processEnded(Failure(ProcessTerminated(exitCode=code) if code else ProcessDone(0)))

    def answer(self, index: int = -1, step: int = 1) -> None:
        """What the real child would answer to everything written so far, fed back ``step`` octets at a time."""
        protocol, process, _ = self.spawned[index]
        replies, used = serve_frames(bytes(process.written))
        del process.written[:used]
        data = b"".join(replies)
        for i in range(0, len(data), step):
            protocol.childDataReceived(1, data[i : i + step])


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
        """issue 13 (speed) signer: during a back-off no child is started early; meanwhile requests are signed in the frontend."""
        self.reactor.end()
        self.reactor.end()  # the second death: 1 s
        self.clock.advance(0.999)
        self.assertEqual(self.spawns(), 2)
        self.assertIsNone(self.service.pid)
        batch = requests(2)
        signatures = self.successResultOf(self.service.sign(batch))
        self.assertTrue(all(verifies(r, s) for r, s in zip(batch, signatures, strict=True)))
        self.clock.advance(0.001)
        self.assertEqual(self.spawns(), 3)
        self.assertEqual(self.service.pid, 1002)

    def test_spawn_failure_backs_off(self) -> None:
        """issue 13 (speed) signer: spawnProcess failing (no fork) is retried with the back-off; requests are signed in the frontend meanwhile."""
        self.reactor.failing = True
        self.reactor.end()  # the retry at once fails, the next is in 1 s, then 2 s
        self.assertEqual(self.spawns(), 1)
        batch = requests(1, ED)
        self.assertTrue(verifies(batch[0], self.successResultOf(self.service.sign(batch))[0]))
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
        issue 13 (speed) signer: replies that arrive one octet at a time, for two batches written
        in one reactor turn, answer each batch's requests in order; the frontend signs nothing.
        """
        self.patch(dkim, "sign_digest", not_in_the_frontend)
        first, second = requests(3), requests(2, ED)
        d1, d2 = self.service.sign(first), self.service.sign(second)
        self.assertNoResult(d1)
        self.patch(dkim, "sign_digest", _real_sign_digest)  # the stub child is this process
        self.reactor.answer(step=1)
        for batch, d in ((first, d1), (second, d2)):
            signatures = self.successResultOf(d)
            self.assertTrue(all(verifies(r, s) for r, s in zip(batch, signatures, strict=True)))

    def test_death_signs_outstanding_requests_here(self) -> None:
        """issue 13 (speed) signer: the child dies with requests unanswered: each is signed in the frontend at once."""
        batch = requests(4)
        d = self.service.sign(batch)
        self.assertNoResult(d)
        self.reactor.end(code=1)
        signatures = self.successResultOf(d)
        self.assertTrue(all(verifies(r, s) for r, s in zip(batch, signatures, strict=True)))
        warnings = [e for e in self.events if "ended unexpectedly" in e["log_format"]]
        self.assertEqual(len(warnings), 1)
        self.assertEqual(warnings[0]["outstanding"], 4)

    def test_garbage_from_the_child_kills_it(self) -> None:
        """issue 13 (speed) signer: a reply to no outstanding request: the child is killed, and its requests signed here once it ended."""
        batch = requests(1)
        d = self.service.sign(batch)
        protocol, process, _ = self.reactor.spawned[0]
        protocol.childDataReceived(1, b"\x00\x00\x00\x09" + (12345).to_bytes(8, "big") + b"\x00")
        self.assertEqual(process.signals, ["KILL"])
        self.reactor.end(0, code=1)
        self.assertTrue(verifies(batch[0], self.successResultOf(d)[0]))

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


class ProtocolTests(SynchronousTestCase):
    def test_child_answers_split_and_bad_frames(self) -> None:
        """issue 13 (speed) signer: the child's frame handling: a partial frame waits, an unknown algorithm is an error reply, frames of impossible length end it."""
        frame = encode_request(7, requests(1)[0])
        replies, used = serve_frames(frame[:-1])
        self.assertEqual((replies, used), ([], 0))
        replies, used = serve_frames(frame + frame[:10])
        self.assertEqual(used, len(frame))
        ((request_id, status, payload),) = ReplyReader().feed(replies[0])
        self.assertEqual((request_id, status), (7, 0))
        bad = bytearray(frame)
        bad[12] = 9  # the algorithm code
        ((_, status, payload),) = ReplyReader().feed(serve_frames(bytes(bad))[0][0])
        self.assertEqual((status, payload), (1, b"ValueError: unknown algorithm code 9"))
        with self.assertRaises(signer_module.ProtocolError):
            serve_frames(b"\xff\xff\xff\xff" + b"x" * 20)

    def test_in_process_signer(self) -> None:
        """issue 13 (speed) signer: the in-process signer (tests, tools) signs, and fails with ValueError for a mismatched key."""
        batch = requests(2)
        signatures: list[bytes] = self.successResultOf(InProcessSigner().sign(batch))
        self.assertTrue(all(verifies(r, s) for r, s in zip(batch, signatures, strict=True)))
        self.failureResultOf(InProcessSigner().sign([SignRequest(RSA.private_key, dkim.ED25519_SHA256, digest(0))]), ValueError)

    def test_child_environment_finds_this_package(self) -> None:
        """issue 13 (speed) signer: the child's PYTHONPATH starts with the directory of the mmgun package the frontend runs."""
        env = child_environment({"PYTHONPATH": "/elsewhere", "HOME": "/h"})
        root = os.path.dirname(os.path.dirname(os.path.abspath(signer_module.__file__)))
        self.assertEqual(env["PYTHONPATH"].split(os.pathsep)[0], root)
        self.assertEqual(env["PYTHONPATH"].split(os.pathsep)[-1], "/elsewhere")
        self.assertEqual(env["HOME"], "/h")
