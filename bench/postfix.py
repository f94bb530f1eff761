"""
A private Postfix instance for the comparison run: its own main.cf, master.cf, queue and
data directories under one folder, listening on one loopback port, relaying everything to
the bench's sink. Postfix is not an mmgun dependency: :func:`available` says whether
Debian's postfix (and its ``smtp-source``) is installed, and the bench skips the
comparison otherwise.

Everything else is Postfix's defaults: the queue is fsync'd, the smtp client's
concurrency and connection cache are as shipped. Local delivery is off
(``mydestination`` empty, ``local_transport = error``). Only the instance started here
is ever stopped (``postfix -c DIR stop``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

POSTFIX = "/usr/sbin/postfix"
POSTCONF = "/usr/sbin/postconf"
SMTP_SOURCE = "/usr/sbin/smtp-source"

MAIN_CF = """\
# A private instance for mmgun's bench; see bench/postfix.py.
compatibility_level = 3.6
queue_directory = {queue}
data_directory = {data}
mail_owner = postfix
setgid_group = postdrop
myhostname = postfix.bench.test
mydomain = bench.test
myorigin = $myhostname
mydestination =
local_recipient_maps =
local_transport = error:local delivery is disabled
alias_maps =
alias_database =
relayhost = [127.0.0.1]:{sink_port}
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
smtpd_peername_lookup = no
smtp_tls_security_level = none
smtpd_tls_security_level = none
smtp_dns_support_level = disabled
biff = no
append_dot_mydomain = no
maillog_file = {maillog}
maillog_file_prefixes = {folder}
"""

MASTER_CF = """\
# service type  private unpriv  chroot  wakeup  maxproc command
127.0.0.1:{port} inet n -       n       -       -       smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def available() -> str | None:
    """None when a private instance can be run; else why not (one line)."""
    for program in (POSTFIX, POSTCONF, SMTP_SOURCE):
        if not os.access(program, os.X_OK):
            return f"{program} is not installed (Debian: apt-get install postfix)"
    if os.geteuid() != 0:
        return "postfix must be started as root"
    return None


class PostfixInstance:
    """One private instance under ``folder``; start() then stop(), nothing else is touched."""

    def __init__(self, folder: Path, port: int, sink_port: int) -> None:
        self.folder = folder
        self.port = port
        self.config = folder / "etc"
        self.queue = folder / "queue"
        self.data = folder / "data"
        self.maillog = folder / "maillog"
        self.started = False
        self.config.mkdir(parents=True)
        (self.config / "main.cf").write_text(
            MAIN_CF.format(queue=self.queue, data=self.data, sink_port=sink_port, maillog=self.maillog, folder=folder)
        )
        (self.config / "master.cf").write_text(MASTER_CF.format(port=port))
        # Debian's postfix reads its dynamic map list from the config directory too.
        for name in ("dynamicmaps.cf", "postfix-files"):
            if os.path.exists(f"/etc/postfix/{name}"):
                shutil.copy(f"/etc/postfix/{name}", self.config / name)
        for name in ("dynamicmaps.cf.d", "postfix-files.d"):
            if os.path.isdir(f"/etc/postfix/{name}"):
                shutil.copytree(f"/etc/postfix/{name}", self.config / name)
        # Postfix's daemons run as the postfix user: every parent folder must let them through.
        for parent in [folder, *folder.parents]:
            if parent == Path("/"):
                break
            mode = parent.stat().st_mode
            if mode & 0o001 == 0:
                raise RuntimeError(f"{parent} is not searchable by the postfix user; use --workdir elsewhere")

    def _postfix(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [POSTFIX, "-c", str(self.config), *args], capture_output=True, text=True, timeout=timeout, check=False
        )

    def start(self) -> None:
        self.queue.mkdir()
        self.data.mkdir()
        shutil.chown(self.data, "postfix", "postfix")
        result = self._postfix("start")
        if result.returncode != 0:
            raise RuntimeError(
                f"postfix -c {self.config} start failed: {(result.stderr or result.stdout).strip()} {self.log_tail()}"
            )
        self.started = True
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self._postfix("status").returncode == 0 and _port_open(self.port):
                return
            time.sleep(0.1)
        raise RuntimeError(f"the private postfix did not listen on 127.0.0.1:{self.port} within 20 s")

    def log_tail(self, lines: int = 5) -> str:
        try:
            return " | ".join(self.maillog.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def master_pid(self) -> int | None:
        try:
            return int((self.queue / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def queue_files(self) -> int:
        """Messages still in the instance's queues (incoming, active, deferred, hold, maildrop)."""
        total = 0
        for name in ("maildrop", "incoming", "active", "deferred", "hold"):
            for _, _, files in os.walk(self.queue / name):
                total += len(files)
        return total

    def stop(self) -> None:
        if not self.started:
            return
        pid = self.master_pid()
        self._postfix("stop")
        self.started = False
        deadline = time.monotonic() + 20
        while pid is not None and time.monotonic() < deadline and _alive(pid):
            time.sleep(0.1)
        if pid is not None and _alive(pid):
            self._postfix("abort")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _port_open(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False
