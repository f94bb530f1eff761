#!/usr/bin/env python3
"""
The two-host bench (issue 15, "Speed"): two mmgun hosts on one PostgreSQL, each in a
network namespace of its own, relaying to the fast sink on the MX host.

    bench/bench.py --backend postgres-2hosts [--mode relay,ingest] [--runs 3] [--messages 20000]
    bench/netns.py [the same options]                        (the same thing)

It reuses the namespace suite's harness, e2e-tests/netns/run.sh (``--exec``), which makes
the namespaces and the two bridges, starts PostgreSQL 15 in "db" (fsync on,
synchronous_commit on) and removes all of it on every exit; this script then runs inside
the load generator's namespace, "lg":

    h1   frontend + sender (--sender-id h1), HTTP 203.0.113.11:8080, database over the back network
    h2   the same on 203.0.113.12 (--sender-id h2)
    db   PostgreSQL on 198.51.100.1:5432; each run gets a fresh database, dropped after it
    mx   bench/sink.py on 203.0.113.25 (the hosts' --relay-host)
    lg   bench/loadgen.py: --concurrency keep-alive connections, half to each frontend,
         taking from one queue of --messages requests (the relay's message: 1-3 recipients,
         a ~1 KB body); and this script

  relay    N POSTs spread over both frontends; the ingest rate (first POST to last answer)
           and the end-to-end rate (first POST to the moment the sink holds every accepted
           recipient); duplicates and losses judged at the sink.
  ingest   the same POSTs to the two frontends alone (no sender): losses and duplicates
           judged in the database.

CPU seconds per 1000 accepted messages of every process: h1, h2 (each one twistd),
postgres (the postmaster and every backend), sink, loadgen; the machine's busy cores.
Each figure is the median of --runs runs; a table is printed and the JSON written to
bench/out/<timestamp>-2hosts.json (or --output). Needs root (ip netns); every process is
bounded in time (run.sh's --exec limit, and each run's --time-limit and --stall).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
NETNS = REPO / "e2e-tests" / "netns"
sys.path.insert(0, str(HERE))

import procs  # noqa: E402

import bench  # noqa: E402  (re-runs under the project's venv first, as bench.py does)

BACKEND = "postgres-2hosts"
#: The hosts: (name, front address); their back addresses and PostgreSQL's are run.sh's.
HOSTS = (("h1", "203.0.113.11"), ("h2", "203.0.113.12"))
HTTP_PORT = 8080
#: The sink's address on the MX host's front interface (run.sh gives "mx" .25, .26, .53, .54).
SINK_ADDRESS = "203.0.113.25"
#: Options of the bench that this one honours (the others are refused with one line).
SUPPORTED_MODES = ("relay", "ingest")
#: Seconds for mmgun, PostgreSQL and the sink to start and stop, per run (the --exec bound's slack).
RUN_SLACK = 240.0


# -- outside: check, then run this script again inside the harness ---------------------------------


def refuse(args: argparse.Namespace) -> str | None:
    """Why these options cannot run on two hosts, or None."""
    if os.geteuid() != 0:
        return "needs root (it creates network namespaces with ip netns); try: sudo " + " ".join(
            [sys.executable, *sys.argv]
        )
    unsupported = [m for m in args.modes if m not in SUPPORTED_MODES]
    if unsupported or not args.modes:
        return f"--mode {','.join(unsupported) or '(none)'}: two hosts run {' and '.join(SUPPORTED_MODES)} only"
    if args.backends != [BACKEND]:
        return f"--backend {BACKEND} runs alone (its processes live in namespaces of their own)"
    if args.dkims != [None] or args.webhooks != [None] or args.compare_postfix or args.profile:
        return "--dkim, --webhook, --compare-postfix and --profile are not measured on two hosts"
    if args.topologies != ["all"]:
        return "--topology: two hosts have one topology (frontend + sender on each)"
    return None


def outside(args: argparse.Namespace, argv: list[str]) -> int:
    """Check what can be checked here, then hand over to run.sh, which runs L{inside} in lg."""
    why_not = refuse(args)
    if why_not is not None:
        print(f"bench: {BACKEND}: {why_not}", file=sys.stderr)
        return 1
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    output = Path(args.output) if args.output else HERE / "out" / f"{stamp}-2hosts.json"
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    # run.sh's logs and state (and this bench's run folders), removed after a clean run unless --keep.
    out = workdir / f"netns-{stamp}"
    per_run = 2 * args.time_limit + RUN_SLACK
    seconds = int(args.runs * len(args.modes) * len(args.contents) * per_run + 120)
    passed = without(argv, "--output", "--workdir")
    command = [
        str(NETNS / "run.sh"),
        "--exec",
        str(seconds),
        sys.executable,
        str(Path(__file__).resolve()),
        "--inside",
        *passed,
        f"--output={output.resolve()}",
        f"--workdir={out.resolve()}",
    ]
    env = os.environ | {"NETNS_OUT": str(out.resolve()), "MMGUN_BENCH_NO_MAKE": "1"}
    print(f"bench: two hosts in network namespaces (e2e-tests/netns/run.sh --exec, at most {seconds} s)", flush=True)
    status = subprocess.run(command, env=env, check=False).returncode
    if status == 0 and not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    elif status != 0:
        print(f"bench: {BACKEND} failed (status {status}); logs in {out}", file=sys.stderr)
    return status


# -- inside the "lg" namespace -------------------------------------------------------------------------


def netns_env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise SystemExit(f"bench: {name} is not set: run through bench.py --backend {BACKEND} (it starts run.sh)")
    return value


class NetnsSink(bench.Sink):
    """bench/sink.py on the MX host's namespace, listening on its front address."""

    def __init__(self, folder: Path, ns: str) -> None:
        self._err = open(folder / "sink.err", "w")
        self.process = subprocess.Popen(
            ["ip", "netns", "exec", ns, bench.PYTHON, str(HERE / "sink.py"), f"--listen={SINK_ADDRESS}"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._err,
            text=True,
            bufsize=1,
        )
        self.port = int(self._answer()["port"])


def without(argv: list[str], *options: str) -> list[str]:
    """``argv`` without ``options`` (as --name=value, or --name value)."""
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in options:
            skip = True
        elif not arg.startswith(tuple(f"{o}=" for o in options)):
            kept.append(arg)
    return kept


class Cluster:
    """run.sh's PostgreSQL, reached through its Unix socket (the hosts reach it by TCP, on the back network)."""

    def __init__(self) -> None:
        sys.path.insert(0, str(NETNS))
        import hosts  # the namespace suite's harness: its Postgres knows run.sh's environment

        self.hosts = hosts
        self.server = hosts.Postgres()

    def postmaster_pid(self) -> int | None:
        try:
            return int((Path(self.server.data) / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def create(self, name: str) -> str:
        self.server.create_database(name)
        return str(self.server.url(name))

    def drop(self, name: str) -> None:
        from psycopg import sql

        with self.server.connect("postgres") as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    def query(self, name: str, sql: str) -> list[tuple[Any, ...]]:
        return list(self.server.query(name, sql))


@dataclass
class NetnsSetup(bench.Setup):
    """bench's Setup, with run.sh's PostgreSQL and the namespaces of the hosts and of the MX."""

    cluster: Any = None
    namespaces: dict[str, str] = field(default_factory=dict)


def start_host(
    setup: NetnsSetup, run: Path, name: str, front: str, ns: str, roles: tuple[str, ...], url: str, sink_port: int
) -> bench.Daemon:
    """One mmgun host: one twistd with ``roles`` in namespace ``ns``."""
    command = [
        "ip", "netns", "exec", ns,
        bench.TWISTD, "-n", "--pidfile=", "mmgun",
        f"--database={url}",
        f"--clients={run / 'clients'}",
        f"--relay-host={SINK_ADDRESS}:{sink_port}",
        f"--helo={name}.bench.test",
        # The namespaces share the machine's host name: without this both senders would lease as one.
        f"--sender-id={name}",
        *[f"--role={role}" for role in roles],
        *setup.limit_flags(),
        *setup.extra,
        f"--listen=tcp:{HTTP_PORT}:interface={front}",
    ]  # fmt: skip
    log = run / f"mmgun-{name}.log"
    with open(os.devnull if setup.args.discard_logs else log, "wb") as out:
        process = subprocess.Popen(command, cwd=run, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if setup.args.discard_logs:
        log.write_text("(discarded: --discard-logs)\n")
    (run / f"mmgun-{name}.cmd").write_text(" ".join(command) + "\n")
    setup.cluster.hosts.record_pid(process.pid)  # run.sh stops it if this script could not
    return bench.Daemon(name, roles, process, log, HTTP_PORT)


def wait_ready(daemon: bench.Daemon, front: str, timeout: float = 60.0) -> None:
    """Poll its /healthz until it answers 200 (fail at once if it exits)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon.process.poll() is not None:
            raise RuntimeError(f"mmgun {daemon.name} exited with {daemon.process.returncode}: {bench.tail(daemon.log)}")
        try:
            with urllib.request.urlopen(f"http://{front}:{HTTP_PORT}/healthz", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"mmgun {daemon.name} not ready within {timeout:g} s: {bench.tail(daemon.log)}")


def queued(cluster: Cluster, database: str, expected: set[str]) -> dict[str, Any]:
    """Losses and duplicates of an ingest-only run, read from the queue itself."""
    stored = [str(address) for (address,) in cluster.query(database, "SELECT address FROM recipients")]
    unique = set(stored)
    return {
        "duplicates": len(stored) - len(unique),
        "lost": len(expected - unique),
        "lost_sample": sorted(expected - unique)[:5],
        "strays": len(unique - expected),
    }


def two_host_run(setup: NetnsSetup, index: int, label: str, content: str) -> dict[str, Any]:
    """One relay (or ingest-only) run on a fresh database: see the module's docstring."""
    args = setup.args
    cluster = setup.cluster
    deliver = label == "relay"
    messages = args.rich_messages if content == "rich" else args.messages
    run = Path(tempfile.mkdtemp(prefix=f"{label}-{content}-2hosts-{index}-", dir=setup.folder))
    # No clients-file id: mmgun refuses the demo id on an address beyond loopback. The load
    # authenticates with an API key, as bench.py's --dkim none does.
    (run / "clients").write_text("# no client ids: the two-host bench authenticates with an API key\n")
    database = f"bench2_{label}_{index}_{os.getpid()}"
    url = cluster.create(database)
    roles = ("frontend", "sender") if deliver else ("frontend",)
    sink = NetnsSink(run, setup.namespaces["mx"])
    daemons: list[bench.Daemon] = []
    loadgen = None
    try:
        for name, front in HOSTS:
            daemons.append(start_host(setup, run, name, front, setup.namespaces[name], roles, url, sink.port))
            # The first host creates the schema; the second starts once it answers.
            wait_ready(daemons[-1], front)
        api_key = cluster.hosts.make_key(setup.namespaces["h1"], url, bench.DKIM_CLIENT)
        result_file = run / "loadgen.json"
        loadgen = bench.start_loadgen(
            args,
            result_file,
            *[f"--target={front}:{HTTP_PORT}" for _, front in HOSTS],
            f"--messages={messages}",
            f"--recipients={args.recipients}",
            f"--content={content}",
            f"--api-key={api_key}",
            f"--sender={bench.DKIM_SENDER}",
        )
        hosts = {d.name: d.pid for d in daemons}
        postmaster = cluster.postmaster_pid()
        server = {"postgres": postmaster} if postmaster is not None else {}
        before = bench.Snapshot(hosts | {"sink": sink.process.pid, "loadgen": loadgen.pid}, server)
        bench.go(loadgen)
        try:
            loadgen.wait(args.time_limit + 120)
        except subprocess.TimeoutExpired:
            loadgen.kill()
            raise RuntimeError("the load generator overran its time limit") from None
        after_ingest = bench.Snapshot(hosts | {"sink": sink.process.pid}, server)
        if loadgen.returncode != 0:
            raise RuntimeError(f"the load generator failed with status {loadgen.returncode}")
        ingest = json.loads(result_file.read_text())
        after_ingest.cpu["loadgen"] = ingest.get("cpu_seconds", 0.0)
        expected = {rcpt for _, rcpts in ingest.pop("recipients") for rcpt in rcpts}
        if deliver:
            delivery = bench.wait_delivered(sink, len(expected), args.stall, args.time_limit)
        else:
            delivery = {"outcome": "not delivered (ingest only)", **sink.stats()}
        after = bench.Snapshot(hosts | {"sink": sink.process.pid}, server)
        # The load generator exited before the drain ended: it reported its own total.
        after.cpu["loadgen"] = ingest.get("cpu_seconds", 0.0)
        peak = {d.name: bench.mib(procs.status_kib(d.pid, "VmHWM")) for d in daemons}
        logs = bench.stop_daemons(daemons)
        dump = run / "sink.tsv"
        sink.dump(dump)
        found = bench.analyse(dump, expected if deliver else set())
        if not deliver:
            found.update(queued(cluster, database, expected))
        times = found.pop("times")
        accepted = ingest["accepted"]
        end = found["complete_at"] if found["lost"] == 0 else delivery.get("last")
        e2e_seconds = end - ingest["first_send"] if end and ingest["first_send"] else None
        cpu = after.since(before)
        machine_busy = after.machine_busy - before.machine_busy
        ours = sum(cpu.values())
        ((size,),) = cluster.query(database, "SELECT pg_database_size(current_database())")
        # Which host delivered each message: the sink counts them by client address.
        by_peer = sink.stats().get("by_peer", {})
        return {
            "label": label,
            "content": content,
            "topology": "two hosts",
            "run": index,
            "folder": str(run),
            "messages": messages,
            "backend": BACKEND,
            "database_mib": bench.mib(int(size) // 1024),
            "concurrency": args.concurrency,
            "recipients_per_message": args.recipients,
            "accepted": accepted,
            "accepted_by_host": {
                name: ingest.get("accepted_by_target", {}).get(f"{front}:{HTTP_PORT}", 0) for name, front in HOSTS
            },
            "delivered_by_host": {name: by_peer.get(front, 0) for name, front in HOSTS},
            "accepted_recipients": len(expected),
            "envelopes_delivered": found["messages"],
            "http_errors": ingest["errors"],
            "ingest_rate": round(ingest["rate"], 1) if ingest["rate"] else None,
            "latency_ms": {k: round(v * 1000, 2) if v is not None else None for k, v in ingest["latency"].items()},
            "e2e_seconds": round(e2e_seconds, 3) if e2e_seconds else None,
            "e2e_rate": round(accepted / e2e_seconds, 1) if e2e_seconds else None,
            "e2e_recipient_rate": round(len(expected) / e2e_seconds, 1) if e2e_seconds else None,
            "drain_after_ingest_s": round(end - ingest["last_answer"], 3) if end and ingest["last_answer"] else None,
            "sink_rate_window": round(bench.window_rate(times, 0, len(times)) or 0, 1),
            "cpu_seconds": cpu,
            "cpu_during_ingest": after_ingest.since(before),
            "cpu_per_1000": {name: round(seconds / accepted * 1000, 3) for name, seconds in cpu.items()}
            if accepted
            else {},
            "peak_rss_mib": peak,
            "seconds": round(after.time - before.time, 3),
            "machine_busy_cores": round(machine_busy / (after.time - before.time), 2),
            "other_cpu_seconds": round(machine_busy - ours, 2),
            **bench._delivery_fields(delivery, found, logs, None),
            "message_ids": found["message_ids"],
        }
    finally:
        if loadgen is not None and loadgen.poll() is None:
            loadgen.kill()
        for daemon in daemons:
            if daemon.process.poll() is None:
                procs.stop_process(daemon.process)
        sink.stop()
        if not args.keep:
            cluster.drop(database)


def render_processes(summary: dict[str, Any]) -> str:
    """Every process's CPU per 1000 messages (bench.render leaves out the sink and the load generator)."""
    rows = []
    for section in ("relay", "ingest"):
        for key, s in summary.get(section, {}).items():
            cpu = s["cpu_per_1000"]
            rows.append(
                [
                    f"{section}: {key}",
                    *[bench.fmt(cpu.get(n), 2) for n in ("h1", "h2", "postgres", "sink", "loadgen")],
                    bench.fmt(sum(v for v in cpu.values() if v is not None), 2),
                    bench.fmt(s["machine_busy_cores"], 2),
                    bench.fmt(s["other_cpu_seconds"], 1),
                ]
            )
    headers = ["run", "h1", "h2", "postgres", "sink", "loadgen", "total", "busy cores", "not ours CPU-s"]
    return "CPU seconds per 1000 accepted messages, every process (median of runs)\n" + bench.table(headers, rows)


def inside(argv: list[str]) -> int:
    """Run the measurements (in lg, under run.sh) and report."""

    def terminated(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)  # run.sh's clean-up sends SIGTERM: stop our processes first

    signal.signal(signal.SIGTERM, terminated)
    args = bench.parse_args(argv)
    folder = Path(args.workdir)
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    output = Path(args.output) if args.output else HERE / "out" / f"{stamp}-2hosts.json"
    h1 = netns_env("NETNS_H1")
    namespaces = {"h1": h1, "h2": netns_env("NETNS_H2"), "mx": netns_env("NETNS_MX")}
    setup = NetnsSetup(folder, bench.mmgun_options(), args, list(args.mmgun_arg), None, Cluster(), namespaces)
    report: dict[str, Any] = {
        "started": stamp,
        "command": " ".join(["bench.py", *without(argv, "--output", "--workdir")]),
        "machine": procs.machine(folder),
        "git": bench.git_state(),
        "topology": "two mmgun hosts (frontend + sender each) in network namespaces h1, h2; PostgreSQL in db "
        "(fsync=on, synchronous_commit=on, over a veth bridge); bench/sink.py in mx; bench/loadgen.py in lg, "
        "its connections half to each frontend; all on one machine's cores",
        "durability": "PostgreSQL: fsync=on, synchronous_commit=on: each acknowledged POST is committed",
        "mmgun_flags": setup.limit_flags() + setup.extra,
        "options": {
            k: v
            for k, v in vars(args).items()
            if k not in ("topologies", "modes", "sizes", "contents", "dkims", "webhooks", "backends")
        },
        "runs": [],
        "summary": {},
    }
    machine = report["machine"]
    print(f"mmgun bench, two hosts: {args.runs} run(s), modes {','.join(args.modes)}, {args.messages:,} messages")
    print(
        f"machine: {machine['nproc']} cores, {machine['cpu_model']}, {machine['memory_gib']} GiB "
        f"(every namespace shares them)",
        flush=True,
    )
    runs: list[dict[str, Any]] = report["runs"]
    summary: dict[str, Any] = report["summary"]

    def record(run: dict[str, Any]) -> dict[str, Any]:
        runs.append(run)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(report, indent=1, default=str))
        return run

    try:
        for label in [m for m in SUPPORTED_MODES if m in args.modes]:
            summary[label] = {}
            for content in args.contents:
                done = []
                for index in range(1, args.runs + 1):
                    run = record(two_host_run(setup, index, label, content))
                    done.append(run)
                    cpu = run["cpu_per_1000"]
                    print(
                        f"  {label} two hosts {content} #{index}: {run['accepted']:,} accepted "
                        f"(h1 {run['accepted_by_host']['h1']:,}, h2 {run['accepted_by_host']['h2']:,}) "
                        f"at {bench.fmt(run['ingest_rate'])}/s (p50 {bench.fmt(run['latency_ms']['p50'], 1)} ms, "
                        f"p99 {bench.fmt(run['latency_ms']['p99'], 1)} ms)"
                        + (
                            f", end-to-end {bench.fmt(run['e2e_rate'])}/s (delivered by "
                            + ", ".join(f"{h} {n:,}" for h, n in run["delivered_by_host"].items())
                            + ")"
                            if label == "relay"
                            else ""
                        )
                        + f", dup {run['duplicates']}, lost {run['lost']}, {run['delivery']['outcome']}; "
                        f"CPU s/1k {bench.per_process(cpu, 2)}; {run['machine_busy_cores']} cores busy",
                        flush=True,
                    )
                name = "two hosts" if label == "relay" else "two frontends only"
                summary[label][bench.content_key(name, content, backend=BACKEND)] = bench.summarize_relay(done)
        summary["log_problems"] = {
            f"{r['label']} #{r['run']} {name}": d["problems"]
            for r in runs
            for name, d in r.get("daemons", {}).items()
            if d["problems"] or d["exit_status"] not in (0, None)
        }
    finally:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(report, indent=1, default=str))
    print()
    print(bench.render(summary))
    print()
    print(render_processes(summary))
    if summary.get("log_problems"):
        print("\nmmgun logged problems (see the JSON for samples):")
        for where, counts in summary["log_problems"].items():
            print(f"  {where}: {counts}")
    print(f"\nJSON: {output}")
    return 1 if any(r.get("lost") or r.get("duplicates") for r in runs) else 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["--inside"]:
        return inside(argv[1:])
    if not any(a == "--backend" or a.startswith("--backend=") for a in argv):
        argv = [*argv, f"--backend={BACKEND}"]
    return outside(bench.parse_args(argv), argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
