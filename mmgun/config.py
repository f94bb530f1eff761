"""
Configuration: the command line, then ``MMGUN_*`` environment variables, then defaults,
resolved once into a frozen :class:`Config`. Nothing reads the environment later.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any

import attrs
from twisted.python import usage

ROLES = ("frontend", "sender", "cleaner", "webhooks")
TLS_MODES = ("opportunistic", "require", "verify", "mta-sts")
LOG_FORMATS = ("text", "json")
SENDER_POLICIES = ("any", "domains")

_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: str) -> float:
    """``"90"``, ``"90s"``, ``"5m"``, ``"1h"``, ``"5d"`` → seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", value)
    if match is None:
        raise ValueError(f"not a duration: {value!r} (use a number with an optional s, m, h or d suffix)")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_size(value: str) -> int:
    """``"10485760"``, ``"512K"``, ``"10M"`` → bytes."""
    match = re.fullmatch(r"\s*(\d+)\s*([kKmMgG]?)i?[bB]?\s*", value)
    if match is None:
        raise ValueError(f"not a size: {value!r} (use a number with an optional K, M or G suffix)")
    return int(match.group(1)) * {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[match.group(2).lower()]


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise ValueError(f"must be at least 1, not {number}")
    return number


def _non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise ValueError(f"must not be negative, not {number}")
    return number


def _workers(value: str) -> int:
    """``auto`` or 0 (0: as many as :func:`mmgun.workers.worker_count` decides) or a number of processes."""
    if value.strip().lower() in ("auto", "0"):
        return 0
    return _positive_int(value)


def _non_negative_float(value: str) -> float:
    number = float(value)
    if not number >= 0 or number == float("inf"):
        raise ValueError(f"must be a non-negative number, not {value!r}")
    return number


def _port(value: str) -> int:
    number = int(value)
    if not 0 < number < 65536:
        raise ValueError(f"not a port number: {number}")
    return number


def _choice(choices: tuple[str, ...]) -> Callable[[str], str]:
    def check(value: str) -> str:
        if value not in choices:
            raise ValueError(f"{value!r} is not one of {', '.join(choices)}")
        return value

    return check


def _identity(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}", value):
        raise ValueError(f"not a sender id: {value!r} (use 1-128 of A-Z a-z 0-9 . _ : - starting with a letter or digit)")
    return value


def _flag(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"{value!r} is not one of 1, true, yes, 0, false, no")


def _hostport(value: str) -> str:
    if not value or any(c.isspace() for c in value):
        raise ValueError(f"not a host[:port]: {value!r}")
    return value


#: name → (default, converter, help). The single list of the daemon's options.
OPTIONS: dict[str, tuple[str | None, Callable[[str], object], str]] = {
    "listen": ("tcp:8080:interface=127.0.0.1", str, "strports endpoint for the HTTP API"),
    "metrics-listen": (
        None,
        str,
        "strports endpoint serving only GET /metrics, for any role (e.g. a sender, or each of several frontends sharing a reuseport: port)",
    ),
    "database": (
        "var/mmgun.sqlite3",
        str,
        "SQLite database file, or a PostgreSQL URL postgresql://USER@HOST:PORT/DBNAME (libpq parameters passed through, e.g. ?sslmode=require)",
    ),
    "database-pool-size": ("4", _positive_int, "PostgreSQL connections (and transactions at once) per process; SQLite ignores it"),
    "clients": ("conf/clients", str, "file of accepted client ids, one per line"),
    "max-message-size": ("10M", parse_size, "largest accepted request body (bytes, or K/M suffix)"),
    "max-recipients": ("1000", _positive_int, "most recipients in one submission"),
    "rate-limit": ("200", _non_negative_float, "per-client /send limit, messages a second (0: no limit)"),
    "rate-burst": ("1000", _positive_int, "per-client burst above --rate-limit"),
    "max-queued": ("100000", _non_negative_int, "per-client cap on queued recipients (0: no cap)"),
    "request-timeout": ("30s", parse_duration, "a request's headers and body must arrive within this"),
    "smtp-port": ("25", _port, "TCP port of every mail exchanger"),
    "relay-host": (None, _hostport, "smarthost HOST[:PORT]: send everything there, no MX lookup"),
    "helo": (None, str, "name used in EHLO and Message-ID (default: this machine's FQDN)"),
    "poll-interval": ("1", parse_duration, "how often a sender looks for due envelopes (seconds)"),
    "retry-min": ("5m", parse_duration, "first retry delay after a temporary failure"),
    "retry-max": ("1h", parse_duration, "longest retry delay"),
    "queue-lifetime": ("5d", parse_duration, "give up on a recipient after this long (reason: expired)"),
    "max-connections": ("100", _positive_int, "most outgoing SMTP sessions at once"),
    "max-per-destination": ("10", _positive_int, "most SMTP sessions to one MX host at once (lowered while it answers 421 or fails to connect, raised again as deliveries succeed)"),
    "destination-pause": (
        "60s",
        parse_duration,
        "pause a recipient domain this long when its MX says it is rate-limiting us (421 4.7.28, 450 4.7.1 ... rate); doubles on repeat up to 16 times (0: never pause)",
    ),
    "smtp-timeout": ("300s", parse_duration, "timeout of each SMTP command (connect: 30s)"),
    "smtp-cache-time": ("2s", parse_duration, "keep an SMTP session to an MX open this long after its deliveries, for the next ones (0: close at once)"),
    "smtp-cache-size": ("100", _non_negative_int, "most idle SMTP sessions kept open in all (at most --max-per-destination to one MX; 0: none)"),
    "lease-time": ("60s", parse_duration, "a sender's claim on an envelope, and a webhooks process's on its webhooks; renewed while it works, taken over after a crash (PostgreSQL ends a session left idle inside a transaction after a quarter of it, 1-10 s)"),
    "tls": (
        "opportunistic",
        _choice(TLS_MODES),
        "STARTTLS: opportunistic, require, verify, or mta-sts (opportunistic, plus each recipient domain's MTA-STS policy, RFC 8461)",
    ),
    "mta-sts-ca": (
        None,
        str,
        "for tests only: PEM file of CA certificates trusted instead of the system's for MTA-STS (policy servers and the MX hosts of enforced policies)",
    ),
    "clean-interval": ("60s", parse_duration, "how often the cleaner runs"),
    "retention": ("7d", parse_duration, "keep finished submissions' status this long"),
    "log-format": ("text", _choice(LOG_FORMATS), "text, or json: one JSON object per line"),
    "shutdown-timeout": ("30s", parse_duration, "on SIGTERM, wait this long for deliveries in flight"),
    "min-free-space": (
        "100M",
        parse_size,
        "refuse new submissions (503) while the database's file system has less free space than this, so results can still be recorded",
    ),
    "max-queued-bytes": ("1G", parse_size, "per-client cap on the bytes of messages still queued (0: no cap)"),
    "max-http-connections": ("4000", _positive_int, "most HTTP connections open at once (all sources)"),
    "max-http-connections-per-source": ("1000", _positive_int, "most HTTP connections open at once from one address"),
    "max-auth-failures": (
        "10",
        _positive_int,
        "failed authentications from one address before it is slowed to this many a minute (429 meanwhile)",
    ),
    "sender-id": (
        None,
        _identity,
        "this sender's stable identity: restarted, it takes back its own envelopes at once (default: the host name)",
    ),
    "mx-address-limit": ("5", _positive_int, "most MX addresses tried in one delivery attempt"),
    "mx-session-limit": ("2", _positive_int, "most SMTP sessions opened in one delivery attempt"),
    "sender-policy": (
        "any",
        _choice(SENDER_POLICIES),
        "any: a client may send from any address; domains: only from its own sending domains (mmgun domains add), else 403",
    ),
    "tls-cert": (None, str, "PEM certificate (chain) for SMTP submission's STARTTLS (with --tls-key)"),
    "tls-key": (None, str, "PEM private key for SMTP submission's STARTTLS (with --tls-cert)"),
    "smtp-command-timeout": ("5m", parse_duration, "SMTP submission: close a connection idle this long between commands (421)"),
    "smtp-data-timeout": ("10m", parse_duration, "SMTP submission: a message's DATA must arrive whole within this (421)"),
    "smtp-greet-pause": (
        "0",
        parse_duration,
        "SMTP submission: wait this long before the greeting; a client that talks first is refused (554) and dropped",
    ),
    "max-smtp-connections": ("1000", _positive_int, "most SMTP submission connections open at once (all sources)"),
    "max-smtp-connections-per-source": ("20", _positive_int, "most SMTP submission connections open at once from one address"),
    "workers": (
        "auto",
        _workers,
        "HTTP frontend processes sharing --listen, supervised by this one, which runs the other roles (auto: one per CPU less the sender's, none on one CPU; 1: a single process, as before)",
    ),
}
#: Boolean options (off unless given): name → help. In the environment: 1/true/yes or 0/false/no.
FLAGS: dict[str, str] = {
    "allow-private-mx": "relay to MX hosts on loopback, private, link-local or this host's own addresses (test setups, private networks)",
    "webhook-allow-private": "POST webhooks to receivers on loopback, private, link-local or this host's own addresses (test setups, private networks)",
    "webhooks-in-process": "run the webhooks role in this process even beside other roles (default: a supervised child process POSTs the webhooks, off the relay's core; small deployments may keep one process)",
}
#: Repeatable options: name → (converter, help).
MULTI_OPTIONS: dict[str, tuple[Callable[[str], object], str]] = {
    "role": (_choice(ROLES), "frontend, sender, cleaner or webhooks; repeatable (default: all four)"),
    "nameserver": (_hostport, "DNS server HOST[:PORT]; repeatable (default: /etc/resolv.conf)"),
    "smtp-listen": (str, "strports endpoint for SMTP submission, e.g. tcp:587 or ssl:465:privateKey=K:certKey=C; repeatable (default: none)"),
}


def env_name(option: str) -> str:
    return "MMGUN_" + option.upper().replace("-", "_")


@attrs.frozen
class Config:
    listen: str
    metrics_listen: str | None
    database: str
    database_pool_size: int
    clients: str
    roles: tuple[str, ...]
    max_message_size: int
    max_recipients: int
    rate_limit: float
    rate_burst: int
    max_queued: int
    request_timeout: float
    nameservers: tuple[str, ...]
    smtp_port: int
    relay_host: str | None
    helo: str
    poll_interval: float
    retry_min: float
    retry_max: float
    queue_lifetime: float
    max_connections: int
    max_per_destination: int
    #: Issue 18 (mmgun.backoff): how long a rate-limiting domain is paused at first.
    destination_pause: float
    smtp_timeout: float
    #: The sender's SMTP connection cache (mmgun.smtp.SessionCache): idle time, and idle sessions in all.
    smtp_cache_time: float
    smtp_cache_size: int
    lease_time: float
    tls: str
    #: --tls mta-sts: a PEM CA bundle trusted instead of the system's (tests only), or None.
    mta_sts_ca: str | None
    clean_interval: float
    retention: float
    log_format: str
    shutdown_timeout: float
    min_free_space: int
    max_queued_bytes: int
    max_http_connections: int
    max_http_connections_per_source: int
    max_auth_failures: int
    #: None: the host name (resolved by the sender, which falls back to a fresh id when it is taken).
    sender_id: str | None
    mx_address_limit: int
    mx_session_limit: int
    allow_private_mx: bool
    webhook_allow_private: bool
    sender_policy: str
    webhooks_in_process: bool
    #: SMTP submission (:mod:`mmgun.submission`): its listeners (none: off), STARTTLS's PEM files, limits.
    smtp_listen: tuple[str, ...]
    tls_cert: str | None
    tls_key: str | None
    smtp_command_timeout: float
    smtp_data_timeout: float
    smtp_greet_pause: float
    max_smtp_connections: int
    max_smtp_connections_per_source: int
    #: HTTP frontend worker processes (:mod:`mmgun.workers`); 0: auto, one per CPU.
    workers: int


class Options(usage.Options):
    """``twistd mmgun`` options. Each option can also come from MMGUN_<NAME>; the command line wins."""

    synopsis = "[options]"
    longdesc = (
        "mmgun: a mail relay. Applications POST JSON messages over HTTP; mmgun queues them "
        "durably and relays them over SMTP. Every option can also be set with an environment "
        "variable MMGUN_<NAME> (e.g. MMGUN_LISTEN, MMGUN_SMTP_PORT); a flag wins over the environment. "
        "Repeatable options take a comma-separated list in the environment."
    )
    optParameters = [
        [name, None, None, f"{text} [default: {default}] (env {env_name(name)})"]
        for name, (default, _, text) in OPTIONS.items()
    ]
    optFlags = [[name, None, f"{text} (env {env_name(name)})"] for name, text in FLAGS.items()]

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self._environ = os.environ if environ is None else environ
        for name in MULTI_OPTIONS:
            self[name] = []

    def opt_role(self, value: str) -> None:
        """frontend, sender, cleaner or webhooks; repeatable (default: all four) (env MMGUN_ROLE, comma-separated)"""
        self["role"].append(value)

    def opt_nameserver(self, value: str) -> None:
        """DNS server HOST[:PORT]; repeatable (default: /etc/resolv.conf) (env MMGUN_NAMESERVER)"""
        self["nameserver"].append(value)

    def opt_smtp_listen(self, value: str) -> None:
        """strports endpoint for SMTP submission, e.g. tcp:587 or ssl:465:privateKey=K:certKey=C; repeatable (default: none) (env MMGUN_SMTP_LISTEN, comma-separated)"""
        self["smtp-listen"].append(value)

    def postOptions(self) -> None:
        self.config = resolve(self, self._environ)


def resolve(given: Mapping[str, Any], environ: Mapping[str, str]) -> Config:
    """Flags, then environment, then defaults; raises usage.UsageError naming the bad option."""
    # Option name → converted value; each converter checks its own type and attrs builds Config from them.
    values: dict[str, Any] = {}
    for name, (default, convert, _) in OPTIONS.items():
        raw = given.get(name)
        source = f"--{name}"
        if raw is None and env_name(name) in environ:
            raw, source = environ[env_name(name)], env_name(name)
        if raw is None:
            raw, source = default, f"default of --{name}"
        values[name] = None if raw is None else _convert(convert, raw, source)
    for name in FLAGS:
        if given.get(name):
            values[name] = True
        else:
            values[name] = _convert(_flag, environ.get(env_name(name), ""), env_name(name))
    for name, (convert, _) in MULTI_OPTIONS.items():
        raws = list(given.get(name) or ())
        source = f"--{name}"
        if not raws and environ.get(env_name(name), "").strip():
            raws = [v.strip() for v in environ[env_name(name)].split(",") if v.strip()]
            source = env_name(name)
        values[name] = tuple(dict.fromkeys(_convert(convert, raw, source) for raw in raws))
    roles = values.pop("role") or ROLES
    if values["retry-min"] > values["retry-max"]:
        raise usage.UsageError("--retry-min must not be longer than --retry-max")
    if (values["tls-cert"] is None) != (values["tls-key"] is None):
        raise usage.UsageError("--tls-cert and --tls-key go together")
    return Config(
        roles=tuple(r for r in ROLES if r in roles),
        nameservers=values.pop("nameserver"),
        helo=values.pop("helo") or socket.getfqdn(),
        **{name.replace("-", "_"): value for name, value in values.items()},
    )


def environment(config: Config) -> dict[str, str]:
    """
    ``config`` as ``MMGUN_*`` variables from which :func:`resolve` (with no command-line
    options) makes an equal Config: how a supervising process configures a child
    (:mod:`mmgun.supervisor`). Every option is given (an option that is None is left
    out, None being its default), so the caller must drop whatever ``MMGUN_*``
    variables it inherited.
    """
    env: dict[str, str] = {}
    for name in OPTIONS:
        value = getattr(config, name.replace("-", "_"))
        if value is not None:
            env[env_name(name)] = _as_text(value)
    for name in FLAGS:
        env[env_name(name)] = "1" if getattr(config, name.replace("-", "_")) else "0"
    env[env_name("role")] = ",".join(config.roles)
    env[env_name("nameserver")] = ",".join(config.nameservers)
    env[env_name("smtp-listen")] = ",".join(config.smtp_listen)
    return env


def _as_text(value: object) -> str:
    """An option's value as its converter reads it back: floats in plain decimals (no exponent), exactly."""
    if isinstance(value, float):
        return format(Decimal(repr(value)), "f")
    return str(value)


def _convert(convert: Callable[[str], object], raw: str, source: str) -> object:
    try:
        return convert(raw)
    except ValueError as e:
        raise usage.UsageError(f"{source}: {e}") from None
