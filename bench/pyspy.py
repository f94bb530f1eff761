"""
Sampling profiles of the mmgun processes during a bench run, with py-spy.

py-spy is not an mmgun dependency: the bench looks for it (``--py-spy PATH``, then
PATH, then the project's venv) and profiles only when asked (``--profile``). Each
process gets ``py-spy record --format raw`` (collapsed stacks) for the measured
window, written beside the run's logs, and :func:`summarize` turns that into the
functions with the most samples: *self* (the sampled frame itself) and *inclusive*
(anywhere on the stack).
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

_FRAME = re.compile(r"^(?P<function>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def find_py_spy(given: str | None) -> str | None:
    if given:
        return given
    found = shutil.which("py-spy")
    if found:
        return found
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else None


class Recorder:
    """py-spy record on one pid until stop()."""

    def __init__(self, py_spy: str, pid: int, output: Path, rate: int = 100) -> None:
        self.output = output
        self._log = open(output.with_suffix(".log"), "w")
        self.process = subprocess.Popen(
            # Blocking sampling (py-spy pauses the process for each sample): slower, but
            # --nonblocking produced torn stacks on these processes.
            [py_spy, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw", "--output", str(output)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def stop(self) -> Path | None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._log.close()
        return self.output if self.output.exists() else None


def _name(frame: str) -> str:
    """``function (path/to/module.py:123)`` → ``module.py:function`` (lines merged)."""
    match = _FRAME.match(frame.strip())
    if match is None:
        return frame.strip()
    path = match.group("file")
    parts = Path(path).parts
    # Keep the package-relative tail: mmgun/store/sqlite.py, twisted/web/http.py, json/decoder.py …
    for anchor in ("site-packages", "python3.11", "lib"):
        if anchor in parts:
            parts = parts[len(parts) - parts[::-1].index(anchor) :]
            break
    else:
        parts = parts[-3:]
    return f"{'/'.join(parts)}:{match.group('function')}"


#: Leaf frames where a thread waits rather than works (py-spy does not always drop them).
IDLE_LEAVES = (
    "threading.py:Condition.wait",
    "threading.py:Event.wait",
    "queue.py:Queue.get",
    "twisted/internet/epollreactor.py:EPollReactor.doPoll",
)
#: (category, frame prefixes): a sample goes to the first category met walking from its
#: leaf toward the root, i.e. the most specific one.
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "logging",
        (
            "twisted/logger/",
            "twisted/python/log.py:msg",
            "twisted/web/http.py:HTTPFactory.log",
            "twisted/web/http.py:combinedLogFormatter",
            "twisted/internet/protocol.py:Factory.doStart",
            "twisted/internet/protocol.py:Factory.doStop",
        ),
    ),
    ("metrics", ("prometheus_client/", "mmgun/metrics.py")),
    ("build_message", ("mmgun/message.py:build_message",)),
    (
        "validate request",
        (
            "mmgun/message.py",
            "mmgun/auth.py",
            "mmgun/clients.py",
            "mmgun/limits.py",
            "mmgun/web/json_api.py:JSONAPI._read_json",
            "mmgun/web/json_api.py:JSONAPI._authenticate",
            "mmgun/web/submit.py:Pipeline.authenticate",
            "mmgun/web/submit.py:idempotency_key",
        ),
    ),
    ("store (SQL, commit, fsync)", ("mmgun/store/",)),
    ("SMTP client", ("mmgun/smtp/", "twisted/mail/")),
    ("sender loop", ("mmgun/sender.py", "mmgun/mx.py")),
    ("frontend handler", ("mmgun/web/",)),
    ("klein/werkzeug routing", ("klein/", "werkzeug/")),
    ("twisted.web HTTP", ("twisted/web/",)),
    ("Deferreds", ("twisted/internet/defer.py",)),
    ("TCP I/O", ("twisted/internet/tcp.py", "twisted/internet/abstract.py")),
)


def categorize(frames: list[str]) -> str:
    if frames[-1] in IDLE_LEAVES:
        return "idle (waiting)"
    for frame in reversed(frames):
        for category, prefixes in CATEGORIES:
            if frame.startswith(prefixes):
                return category
    return "reactor and other"


def summarize(raw: Path, top: int = 15) -> dict[str, Any]:
    """
    Top functions by self and inclusive samples, as shares of all samples, for the whole
    process and split by thread: the reactor's ("main") and adbapi's pool ("threads").
    Inclusive shares are listed for mmgun's own functions only (the reactor loop is on
    every stack and would fill the list).
    """
    self_counts: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    files: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    thread_self: dict[str, Counter[str]] = {"main": Counter(), "threads": Counter()}
    breakdown: dict[str, Counter[str]] = {"main": Counter(), "threads": Counter()}
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_name(f) for f in stack.split(";") if f.strip()]
        if not frames:
            continue
        thread = "threads" if "threading.py:Thread._bootstrap" in frames[0] else "main"
        total += count
        threads[thread] += count
        self_counts[frames[-1]] += count
        thread_self[thread][frames[-1]] += count
        breakdown[thread][categorize(frames)] += count
        files[frames[-1].split(":", 1)[0]] += count
        for name in set(frames):
            if name.startswith("mmgun/"):
                inclusive[name] += count

    def shares(counter: Counter[str]) -> list[tuple[str, float]]:
        return [(name, round(100 * n / total, 1)) for name, n in counter.most_common(top)] if total else []

    return {
        "samples": total,
        "threads": shares(threads),
        "self": shares(self_counts),
        "self_main": shares(thread_self["main"]),
        "self_threads": shares(thread_self["threads"]),
        "inclusive_mmgun": shares(inclusive),
        "self_by_file": shares(files),
        # Shares of each thread group's own samples.
        "breakdown": {
            thread: [(name, round(100 * n / sum(counter.values()), 1)) for name, n in counter.most_common()]
            for thread, counter in breakdown.items()
            if counter
        },
    }
