"""
What the bench reads about processes and the machine: CPU time and peak memory from
/proc, the machine's description, and small helpers to start and stop child processes.
Linux only (the numbers come from /proc).
"""

from __future__ import annotations

import os
import platform
import signal
import socket
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    # Field 2 (comm) is in parentheses and may contain spaces: split after its ")".
    return text[text.rindex(")") + 2 :].split()


def cpu_seconds(pid: int, children: bool = False) -> float | None:
    """utime + stime of every thread of ``pid`` (plus its reaped children's if ``children``)."""
    fields = _stat_fields(pid)
    if fields is None:
        return None
    # After comm: [0] state, [1] ppid, … [11] utime, [12] stime, [13] cutime, [14] cstime.
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / CLOCK_TICKS


def run_queue_wait(pid: int) -> float | None:
    """
    Seconds the threads of ``pid`` spent runnable but waiting for a CPU (the kernel's
    schedstat, summed over /proc/PID/task): CPU time a process would have used had a core
    been free. None when the process is gone or the kernel keeps no schedstat.
    """
    total = 0
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return total / 1e9


def parent_pid(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return None if fields is None else int(fields[1])


def cmdline(pid: int) -> bytes:
    """A process's command line (arguments separated by NUL), or b"" when it is gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def descendants(root: int) -> list[int]:
    """Live processes below ``root`` (any depth)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            ppid = parent_pid(int(entry))
            if ppid is not None:
                parents[int(entry)] = ppid
    found, frontier = [], {root}
    while frontier:
        children = {pid for pid, ppid in parents.items() if ppid in frontier}
        found.extend(sorted(children))
        frontier = children
    return found


def tree_cpu_seconds(root: int) -> float:
    """CPU of a process tree: root and live descendants, each with its reaped children."""
    total = 0.0
    for pid in [root, *descendants(root)]:
        total += cpu_seconds(pid, children=True) or 0.0
    return total


def tree_cpu_by_name(root: int) -> dict[str, float]:
    """CPU of a process tree by program name (/proc/PID/comm); reaped children count under their parent."""
    totals: dict[str, float] = {}
    for pid in [root, *descendants(root)]:
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        totals[name] = round(totals.get(name, 0.0) + (cpu_seconds(pid, children=True) or 0.0), 3)
    return dict(sorted(totals.items(), key=lambda item: -item[1]))


def status_kib(pid: int, key: str) -> int | None:
    """A ``/proc/PID/status`` memory line (VmHWM, VmRSS) in KiB."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def system_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, all cores."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (values + [0] * 8)[:8]
    busy = user + nice + system + irq + softirq + steal
    return busy / CLOCK_TICKS, (busy + idle + iowait) / CLOCK_TICKS


def wait_quiet(max_wait: float, threshold: float = 0.25) -> float:
    """
    Wait (at most ``max_wait`` seconds) until the machine is nearly idle (less than
    ``threshold`` of one core busy over half a second); return the busy share last seen.
    """
    deadline = time.monotonic() + max_wait
    while True:
        busy0, _ = system_cpu()
        time.sleep(0.5)
        busy1, _ = system_cpu()
        cores_busy = (busy1 - busy0) / 0.5
        if cores_busy < threshold or time.monotonic() >= deadline:
            return cores_busy


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(process: subprocess.Popen[Any], timeout: float = 40.0) -> int | None:
    """SIGTERM, then SIGKILL after ``timeout``; returns the exit status (negative: killed by a signal)."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
    return process.returncode


def fsync_latency(folder: Path, count: int = 50) -> float:
    """Mean fdatasync of a 4 KiB write in ``folder``, in milliseconds: what a durable commit costs here."""
    path = folder / f".fsync-probe-{os.getpid()}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        started = time.perf_counter()
        for _ in range(count):
            os.write(fd, b"x" * 4096)
            os.fdatasync(fd)
        return (time.perf_counter() - started) / count * 1000
    finally:
        os.close(fd)
        path.unlink()


def filesystem(folder: Path) -> str:
    """The type and device of the mount holding ``folder``."""
    best, answer = "", "unknown"
    target = str(folder.resolve())
    try:
        with open("/proc/mounts") as f:
            for line in f:
                device, mountpoint, fstype, *_ = line.split()
                if (target == mountpoint or target.startswith(mountpoint.rstrip("/") + "/")) and len(mountpoint) > len(
                    best
                ):
                    best, answer = mountpoint, f"{fstype} ({device} on {mountpoint})"
    except OSError:
        pass
    return answer


def machine(workdir: Path) -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_kib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_kib = int(line.split()[1])
    except OSError:
        pass
    try:
        import twisted

        twisted_version = twisted.__version__
    except ImportError:
        twisted_version = None
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(memory_kib / 1024 / 1024, 1) if memory_kib else None,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "twisted": twisted_version,
        "filesystem": filesystem(workdir),
        "fdatasync_ms": round(fsync_latency(workdir), 2),
        "loadavg": Path("/proc/loadavg").read_text().split()[:3],
    }
