"""
The Dockerfile, build.sh and both compose files, checked without a Docker engine.

Every mmgun service's command is parsed by mmgun's own option parser (with the image's ENV and the
service's environment), every stub command by the stub's own argument parser, and the wiring between
services (the shared database volume, the published port, DNS and SMTP addresses) is compared with
what those parsers resolved. The checks are functions returning a list of problems so that the
negative tests can feed them a broken copy of a compose file.

In the image itself (no Dockerfile or compose file under /app) these tests skip.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import importlib.util
import io
import ipaddress
import json
import os
import posixpath
import shlex
import stat
import sys
from collections.abc import Mapping
from types import ModuleType
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import yaml
from twisted.python.usage import UsageError
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from mmgun.clients import load_clients
from mmgun.config import ROLES, Config, Options
from mmgun.mx import parse_hostport
from mmgun.service import demo_id_problem

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCKERFILE = os.path.join(ROOT, "Dockerfile")
DOCKERIGNORE = os.path.join(ROOT, ".dockerignore")
BUILD_SH = os.path.join(ROOT, "build.sh")
COMPOSE = os.path.join(ROOT, "docker-compose.yml")
POSTGRES_COMPOSE = os.path.join(ROOT, "docker-compose.postgres.yml")
#: The image of a compose file's database service (issue 15): the official PostgreSQL image.
POSTGRES_IMAGE = "postgres"
E2E_COMPOSE = os.path.join(ROOT, "e2e-tests", "docker-compose.yml")
IMAGE = "mini-mailgun/bundle"
#: The image's WORKDIR is the checkout's root, so relative paths in commands are repository paths.
WORKDIR = "/app"

Problems = list[str]


def require(*paths: str) -> None:
    """Skip where the files are missing: the image carries tests/ but not the Dockerfile or compose files."""
    for path in paths:
        if not os.path.exists(path):
            raise SkipTest(f"{os.path.relpath(path, ROOT)} is not here (not a source checkout)")


# -- the Dockerfile ----------------------------------------------------------------------------------


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            pending += stripped[:-1].rstrip() + " "
            continue
        whole = (pending + stripped).strip()
        pending = ""
        if whole:
            keyword, _, rest = whole.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def exec_form(arguments: str) -> list[str]:
    """The JSON ("exec") form if it is one, else shell words."""
    if arguments.startswith("["):
        return json.loads(arguments)
    return shlex.split(arguments)


def dockerfile_env(instructions: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, arguments in instructions:
        if keyword != "ENV":
            continue
        words = shlex.split(arguments)
        if words and "=" not in words[0]:  # legacy "ENV NAME value with spaces"
            env[words[0]] = arguments.partition(" ")[2].strip()
            continue
        for word in words:
            name, _, value = word.partition("=")
            env[name] = value
    return env


def copy_sources(instructions: list[tuple[str, str]]) -> list[str]:
    """Build-context paths named by COPY/ADD (not those copied from another stage)."""
    sources: list[str] = []
    for keyword, arguments in instructions:
        if keyword not in ("COPY", "ADD"):
            continue
        words = exec_form(arguments)
        flags = [w for w in words if w.startswith("--")]
        if any(f.startswith("--from") for f in flags):
            continue
        paths = [w for w in words if not w.startswith("--")]
        sources.extend(paths[:-1])
    return sources


def dockerignore_patterns() -> list[str]:
    if not os.path.exists(DOCKERIGNORE):
        return []
    with open(DOCKERIGNORE) as f:
        lines = [line.strip() for line in f]
    return [line.rstrip("/") for line in lines if line and not line.startswith(("#", "!"))]


def dockerfile_problems(text: str) -> Problems:
    instructions = dockerfile_instructions(text)
    keywords = [k for k, _ in instructions]
    problems: Problems = []
    froms = [a for k, a in instructions if k == "FROM"]
    if not froms or froms[0].split()[0] != "python:3.11-slim":
        problems.append(f"the base image should be python:3.11-slim, not {froms}")

    runs = " && ".join(a for k, a in instructions if k == "RUN")
    if "pip install -r requirements.txt" not in runs:
        problems.append("the pinned dependencies are not installed with pip install -r requirements.txt")
    if "pip install --no-deps" not in runs:
        problems.append("the project is not installed with pip install --no-deps")
    if " -e " in f" {runs} " or "--editable" in runs:
        problems.append("an editable install hides the twistd plugin")

    ignored = dockerignore_patterns()
    for source in copy_sources(instructions):
        path = source.rstrip("/")
        if not os.path.exists(os.path.join(ROOT, path)):
            problems.append(f"COPY {source}: no such file in the repository")
        for pattern in ignored:
            if fnmatch.fnmatch(path, pattern):
                problems.append(f"COPY {source}: excluded by .dockerignore pattern {pattern!r}")

    users = [a for k, a in instructions if k == "USER"]
    if not users or users[-1].split(":")[0] in ("root", "0"):
        problems.append("the image should run as a non-root USER")

    if "ENTRYPOINT" in keywords:
        problems.append("an ENTRYPOINT would be prepended to the compose services' commands")
    cmds = [exec_form(a) for k, a in instructions if k == "CMD"]
    if not cmds or cmds[-1][:3] != ["python", "-m", "twisted.trial"] or cmds[-1][-1] != "tests":
        problems.append(f"the default CMD should run the unit tests (python -m twisted.trial ... tests), not {cmds[-1:]}")

    env = dockerfile_env(instructions)
    volumes = [v.rstrip("/") for k, a in instructions if k == "VOLUME" for v in exec_form(a)]
    exposed = {int(p.split("/")[0]) for k, a in instructions if k == "EXPOSE" for p in a.split()}
    try:
        config = mmgun_config([], env)
    except UsageError as e:
        return [*problems, f"the image's MMGUN_* ENV does not parse: {e}"]
    if not any(inside(config.database, v) for v in volumes):
        problems.append(f"the database {config.database} is not on a VOLUME ({volumes})")
    port, interface = strport(config.listen)
    if port not in exposed:
        problems.append(f"the API listens on port {port} but the image EXPOSEs {sorted(exposed)}")
    if is_loopback(interface):
        problems.append(f"{config.listen} is unreachable from outside the container")
    problems += demo_problems("the image", config)
    return problems


def demo_problems(name: str, config: Config) -> Problems:
    """
    What ``twistd mmgun`` itself refuses at start (issue 11 item 18): a frontend listening
    beyond loopback while its clients file (from the repository, copied under WORKDIR)
    accepts the well-known demo id.
    """
    if "frontend" not in config.roles or not inside(config.clients, WORKDIR):
        return []
    path = os.path.join(ROOT, posixpath.relpath(config.clients, WORKDIR))
    if not os.path.isfile(path):
        return [f"{name}: clients file {config.clients} is not in the repository"]
    problem = demo_id_problem(config, load_clients(path))
    return [] if problem is None else [f"{name}: mmgun would refuse to start: {problem}"]


# -- mmgun's and the stubs' own parsers ---------------------------------------------------------------


def mmgun_config(args: list[str], environ: Mapping[str, str]) -> Config:
    """What mmgun makes of these arguments (those after ``mmgun``); raises UsageError."""
    options = Options(environ)
    options.parseOptions(args)
    return options.config


def strport(description: str) -> tuple[int, str]:
    """Port and interface of a ``tcp:PORT[:interface=...]`` strports description."""
    kind, *parts = description.split(":")
    if kind != "tcp":
        raise ValueError(f"not a tcp strports description: {description!r}")
    named = dict(p.split("=", 1) for p in parts if "=" in p)
    positional = [p for p in parts if "=" not in p]
    return int(named.get("port") or positional[0]), named.get("interface", "")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def inside(path: str, directory: str) -> bool:
    return posixpath.isabs(path) and posixpath.normpath(path).startswith(posixpath.normpath(directory) + "/")


_stub_modules: dict[str, ModuleType] = {}


def stub_module(script: str) -> ModuleType:
    """Load an e2e stub script (it runs nothing unless it is __main__) to use its parse_args."""
    if script not in _stub_modules:
        name = "_docker_test_" + os.path.splitext(os.path.basename(script))[0]
        spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, script))
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        saved = list(sys.path)
        try:
            spec.loader.exec_module(module)
        finally:
            sys.path[:] = saved
        _stub_modules[script] = module
    return _stub_modules[script]


def stub_arguments(script: str, args: list[str]) -> Any:
    """The stub's parsed arguments; raises ValueError with argparse's message."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return stub_module(script).parse_args(args)
    except SystemExit:
        raise ValueError(err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else "bad arguments") from None


# -- compose files -----------------------------------------------------------------------------------


def load_yaml(path: str) -> dict[str, Any]:
    with open(path) as f:
        return yaml.safe_load(f)


def command(service: Mapping[str, Any]) -> list[str]:
    value = service.get("command")
    if value is None:
        return []
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


def environment(service: Mapping[str, Any]) -> dict[str, str]:
    value = service.get("environment") or {}
    if isinstance(value, list):
        return dict(item.partition("=")[::2] for item in value)
    return {k: "" if v is None else str(v) for k, v in value.items()}


def mmgun_arguments(argv: list[str]) -> list[str] | None:
    """The arguments after ``mmgun`` if this is ``twistd ... mmgun ...``, else None."""
    if argv and posixpath.basename(argv[0]) == "twistd" and "mmgun" in argv:
        return argv[argv.index("mmgun") + 1 :]
    return None


def stub_script(argv: list[str]) -> str | None:
    """The script of ``python e2e-tests/<x>stub.py ...``, else None."""
    if len(argv) >= 2 and posixpath.basename(argv[0]).startswith("python") and argv[1].endswith(".py"):
        return argv[1]
    return None


def named_volume_mounts(service: Mapping[str, Any]) -> dict[str, str]:
    """Named volume → mount point (bind mounts left out)."""
    mounts: dict[str, str] = {}
    for volume in service.get("volumes") or []:
        if isinstance(volume, dict):
            if volume.get("type", "volume") == "volume" and volume.get("source"):
                mounts[volume["source"]] = volume["target"]
            continue
        parts = volume.split(":")
        if len(parts) >= 2 and not parts[0].startswith((".", "/", "~", "$")):
            mounts[parts[0]] = parts[1]
    return mounts


def bind_mounts(service: Mapping[str, Any]) -> list[str]:
    sources = []
    for volume in service.get("volumes") or []:
        source = volume.get("source", "") if isinstance(volume, dict) else volume.split(":")[0]
        if source.startswith((".", "/", "~")):
            sources.append(source)
    return sources


def published_ports(service: Mapping[str, Any]) -> list[tuple[int, int]]:
    """(host port, container port) pairs."""
    return [(host, target) for _, host, target in published_bindings(service)]


def published_bindings(service: Mapping[str, Any]) -> list[tuple[str, int, int]]:
    """(host address, host port, container port); the address is "" for every interface of the host."""
    bindings = []
    for port in service.get("ports") or []:
        if isinstance(port, dict):
            target = int(port["target"])
            bindings.append((str(port.get("host_ip") or ""), int(port.get("published") or target), target))
            continue
        parts = str(port).split("/")[0].rsplit(":", 2)
        target = int(parts[-1])
        bindings.append((parts[0] if len(parts) == 3 else "", int(parts[-2]) if len(parts) > 1 else target, target))
    return bindings


def namespace(services: Mapping[str, Any], name: str) -> str:
    """The service whose network namespace this one lives in (itself, or network_mode: service:X)."""
    seen = {name}
    while str(services[name].get("network_mode", "")).startswith("service:"):
        name = services[name]["network_mode"].partition(":")[2]
        if name in seen or name not in services:
            break
        seen.add(name)
    return name


def addresses(services: Mapping[str, Any], name: str) -> set[str]:
    """Addresses under which another service reaches this one: its name and any fixed IPs."""
    found = {name}
    networks = services[name].get("networks")
    if isinstance(networks, dict):
        for settings in networks.values():
            for key in ("ipv4_address", "ipv6_address"):
                if settings and settings.get(key):
                    found.add(settings[key])
    return found


def reachable(services: Mapping[str, Any], client: str, server: str, listen_host: str, host: str) -> bool:
    """Can ``client`` reach ``server`` (listening on ``listen_host``) by connecting to ``host``?"""
    if namespace(services, client) == namespace(services, server):
        if listen_host in ("0.0.0.0", "::", ""):
            return is_loopback(host) or host in addresses(services, namespace(services, server))
        return host == listen_host
    if listen_host not in ("0.0.0.0", "::", ""):
        return False  # a loopback (or fixed) address is private to the server's namespace
    return host in addresses(services, namespace(services, server))


def compose_problems(compose: Mapping[str, Any], compose_dir: str, image_env: Mapping[str, str]) -> Problems:
    """Everything checkable without an engine; an empty list if the file is consistent."""
    problems: Problems = []
    if not str(compose.get("version", "")).startswith("3"):
        problems.append(f"the compose file format should be version 3.x, not {compose.get('version')!r}")
    services: dict[str, Any] = compose.get("services") or {}
    declared_volumes = set((compose.get("volumes") or {}).keys())

    configs: dict[str, Config] = {}
    stubs: dict[str, tuple[str, Any]] = {}
    databases = {n for n, s in services.items() if str(s.get("image", "")).split(":")[0] == POSTGRES_IMAGE}
    for name in sorted(databases):
        problems += postgres_service_problems(name, services[name], declared_volumes)
    for name, service in services.items():
        if name in databases:
            continue
        problems += image_problems(name, service, compose_dir)
        problems += healthcheck_problems(name, service)
        for source in bind_mounts(service):
            if source.startswith(("/", "~")):
                problems.append(f"{name}: bind mount {source} depends on the host's layout")
        argv = command(service)
        args = mmgun_arguments(argv)
        script = stub_script(argv)
        if args is not None:
            if not {"-n", "--nodaemon"} & set(argv[: argv.index("mmgun")]) or "--pidfile=" not in argv:
                problems.append(f"{name}: twistd needs -n and --pidfile= in a container")
            try:
                configs[name] = mmgun_config(args, {**image_env, **environment(service)})
            except UsageError as e:
                problems.append(f"{name}: mmgun refuses its options: {e}")
        elif script is not None:
            if not os.path.isfile(os.path.join(ROOT, script)):
                problems.append(f"{name}: runs {script}, which is not in the repository")
                continue
            for arg in argv[2:]:
                if "/" in arg and not arg.startswith(("/", "-")) and not os.path.exists(os.path.join(ROOT, arg)):
                    problems.append(f"{name}: {arg} is not in the repository")
            try:
                stubs[name] = (script, stub_arguments(script, argv[2:]))
            except ValueError as e:
                problems.append(f"{name}: {script} refuses its arguments: {e}")
        else:
            problems.append(f"{name}: neither an mmgun role nor a stub: {argv}")

    problems += role_problems(configs)
    if any(is_url(c.database) for c in configs.values()):
        problems += postgres_client_problems(services, configs, databases)
    else:
        problems += volume_problems(services, configs, declared_volumes)
    problems += port_problems(services, configs)
    problems += delivery_problems(services, configs, stubs)
    return problems


def image_problems(name: str, service: Mapping[str, Any], compose_dir: str) -> Problems:
    build = service.get("build")
    if build is not None:
        context = build if isinstance(build, str) else build.get("context", ".")
        if os.path.realpath(os.path.join(compose_dir, context)) != os.path.realpath(ROOT):
            return [f"{name}: builds from {context}, not the repository root"]
        if service.get("image", IMAGE) != IMAGE:
            return [f"{name}: builds an image named {service['image']}, not {IMAGE}"]
        return []
    if str(service.get("image", "")).split(":")[0] != IMAGE:
        return [f"{name}: runs image {service.get('image')!r}, not {IMAGE}"]
    return []


def healthcheck_problems(name: str, service: Mapping[str, Any]) -> Problems:
    check = service.get("healthcheck") or {}
    test = check.get("test")
    if check.get("disable") or not test or test in ("NONE", ["NONE"]):
        return [f"{name}: no healthcheck"]
    return []


def role_problems(configs: Mapping[str, Config]) -> Problems:
    """Each mmgun service is named for the one role it runs, and every role runs somewhere."""
    problems: Problems = []
    for name, config in configs.items():
        if name not in ROLES:
            problems.append(f"{name}: an mmgun service should be named for its role ({', '.join(ROLES)})")
        elif config.roles != (name,):
            problems.append(f"{name}: runs roles {config.roles}, should run only {name}")
    missing = set(ROLES) - {r for c in configs.values() for r in c.roles}
    if missing:
        problems.append(f"no service runs {', '.join(sorted(missing))}")
    return problems


def volume_problems(services: Mapping[str, Any], configs: Mapping[str, Config], declared: set[str]) -> Problems:
    """All roles share one declared named volume, mounted where their --database points."""
    problems: Problems = []
    used: set[tuple[str, str]] = set()
    for name, config in configs.items():
        mounts = named_volume_mounts(services[name])
        for volume in set(mounts) - declared:
            problems.append(f"{name}: volume {volume} is not declared under the top-level volumes")
        holding = [(v, target) for v, target in mounts.items() if inside(config.database, target)]
        if not holding:
            problems.append(f"{name}: database {config.database} is on no named volume ({mounts})")
        used.update(holding)
    if len(used) > 1:
        problems.append(f"the roles keep their database on different volumes or paths: {sorted(used)}")
    databases = {c.database for c in configs.values()}
    if len(databases) > 1:
        problems.append(f"the roles use different databases: {sorted(databases)}")
    return problems


def is_url(database: str) -> bool:
    return database.startswith(("postgresql://", "postgres://"))


def postgres_service_problems(name: str, service: Mapping[str, Any], declared: set[str]) -> Problems:
    """The database service: a pinned major version, a healthcheck, its data on a named volume, no published port."""
    problems = healthcheck_problems(name, service)
    image = str(service["image"])
    if ":" not in image or not image.split(":")[1].split(".")[0].isdigit():
        problems.append(f"{name}: pin PostgreSQL's major version ({image}), so an upgrade is a decision")
    mounts = named_volume_mounts(service)
    if "/var/lib/postgresql/data" not in mounts.values():
        problems.append(f"{name}: /var/lib/postgresql/data is on no named volume: the queue would die with the container")
    for volume in set(mounts) - declared:
        problems.append(f"{name}: volume {volume} is not declared under the top-level volumes")
    if service.get("ports"):
        problems.append(f"{name}: publishes PostgreSQL's port on the host; only the compose network needs it")
    if not environment(service).get("POSTGRES_PASSWORD"):
        problems.append(f"{name}: no POSTGRES_PASSWORD")
    return problems


def postgres_client_problems(services: Mapping[str, Any], configs: Mapping[str, Config], databases: set[str]) -> Problems:
    """
    Every role on one PostgreSQL URL that names a database service of this file, with the
    password outside the URL (PGPASSWORD, the service's own), started once the database is healthy.
    """
    problems: Problems = []
    urls = {c.database for c in configs.values()}
    if len(urls) > 1:
        return [f"the roles use different databases: {sorted(urls)}"]
    url = urlsplit(urls.pop())
    if url.password is not None:
        problems.append("the --database URL holds a password: give it as PGPASSWORD, which mmgun never logs")
    host, port = url.hostname or "", url.port or 5432
    server = next((d for d in databases if host in addresses(services, namespace(services, d))), None)
    if server is None:
        return [*problems, f"--database names host {host!r}, which is no PostgreSQL service of this file"]
    server_env = environment(services[server])
    if port != 5432:
        problems.append(f"--database names port {port}; {server} listens on 5432")
    if url.username != server_env.get("POSTGRES_USER", "postgres"):
        problems.append(f"--database names user {url.username!r}; {server} makes {server_env.get('POSTGRES_USER', 'postgres')!r}")
    if url.path.lstrip("/") != server_env.get("POSTGRES_DB", server_env.get("POSTGRES_USER", "postgres")):
        problems.append(f"--database names database {url.path.lstrip('/')!r}; {server} makes another")
    for name in configs:
        if environment(services[name]).get("PGPASSWORD") != server_env.get("POSTGRES_PASSWORD"):
            problems.append(f"{name}: PGPASSWORD is not {server}'s POSTGRES_PASSWORD")
        depends = services[name].get("depends_on") or {}
        condition = depends.get(server, {}).get("condition") if isinstance(depends, dict) else None
        if condition != "service_healthy":
            problems.append(f"{name}: should start once {server} is healthy (depends_on: condition: service_healthy)")
    return problems


def port_problems(services: Mapping[str, Any], configs: Mapping[str, Config]) -> Problems:
    problems: Problems = []
    for name, config in configs.items():
        if "frontend" not in config.roles:
            continue
        try:
            port, interface = strport(config.listen)
        except (ValueError, IndexError) as e:
            problems.append(f"{name}: cannot read --listen {config.listen}: {e}")
            continue
        if is_loopback(interface):
            problems.append(f"{name}: {config.listen} is unreachable from outside the container")
        owner = namespace(services, name)
        published = published_ports(services[owner])
        if port not in [inner for _, inner in published]:
            problems.append(f"{name}: listens on {port} but {owner} publishes {published}")
        for address, outer, inner in published_bindings(services[owner]):
            if inner == port and not is_loopback(address):
                problems.append(
                    f"{owner}: publishes the API on {address or 'every interface'} of the host; use 127.0.0.1:{outer}:{inner}"
                )
        problems += demo_problems(name, config)
        test = " ".join(services[name].get("healthcheck", {}).get("test") or [])
        if "/healthz" in test and f":{port}/healthz" not in test:
            problems.append(f"{name}: the healthcheck asks a port other than {port}")
    return problems


def delivery_problems(
    services: Mapping[str, Any], configs: Mapping[str, Config], stubs: Mapping[str, tuple[str, Any]]
) -> Problems:
    """Each sender reaches a DNS stub (or relays to an SMTP stub) and the SMTP stubs on its --smtp-port."""
    problems: Problems = []
    dns = {n: a for n, (s, a) in stubs.items() if posixpath.basename(s) == "dnsstub.py"}
    smtp = {n: a for n, (s, a) in stubs.items() if posixpath.basename(s) == "smtpstub.py"}
    for name, config in configs.items():
        if "sender" not in config.roles:
            continue
        if config.relay_host:
            host, port = parse_hostport(config.relay_host, config.smtp_port)
            if not any(reachable(services, name, stub, h, host) and p == port for stub, a in smtp.items() for h, p in a.listen):
                problems.append(f"{name}: --relay-host {config.relay_host} is no SMTP stub")
            continue
        if not config.nameservers:
            problems.append(f"{name}: no --nameserver, so it would ask the container's resolver, not the DNS stub")
        for server in config.nameservers:
            host, port = parse_hostport(server, 53)
            try:
                ipaddress.ip_address(host)
            except ValueError:
                problems.append(f"{name}: --nameserver {server} must be an IP address for twisted.names")
            if not any(reachable(services, name, stub, a.listen[0], host) and a.listen[1] == port for stub, a in dns.items()):
                problems.append(f"{name}: --nameserver {server} is no DNS stub it can reach")
        for stub, arguments in smtp.items():
            for listen_host, listen_port in arguments.listen:
                if listen_port != config.smtp_port:
                    problems.append(f"{name}: --smtp-port {config.smtp_port} but {stub} listens on {listen_port}")
                if is_loopback(listen_host) and namespace(services, stub) != namespace(services, name):
                    problems.append(f"{name}: cannot reach {stub} on {listen_host} from another network namespace")
    return problems


# -- the tests ---------------------------------------------------------------------------------------


class DockerfileTests(SynchronousTestCase):
    def setUp(self) -> None:
        require(DOCKERFILE)
        with open(DOCKERFILE) as f:
            self.text = f.read()

    def test_consistent(self) -> None:
        """Base image, installation, COPY sources, user, CMD, ENV, VOLUME and EXPOSE agree."""
        self.assertEqual(dockerfile_problems(self.text), [])

    def test_image_env_is_for_containers(self) -> None:
        env = dockerfile_env(dockerfile_instructions(self.text))
        self.assertEqual(env["MMGUN_DATABASE"], "/var/lib/mmgun/mmgun.sqlite3")
        self.assertEqual(env["MMGUN_LISTEN"], "tcp:8080:interface=0.0.0.0")
        self.assertTrue(env["MMGUN_CLIENTS"].startswith(WORKDIR + "/"))
        self.assertTrue(os.path.isfile(os.path.join(ROOT, posixpath.relpath(env["MMGUN_CLIENTS"], WORKDIR))))

    def test_image_clients_file_accepts_no_demo_id(self) -> None:
        """issue 11 item 18: the image listens on 0.0.0.0, so its default clients file must not hold the demo id."""
        problems = dockerfile_problems(self.text + "\nENV MMGUN_CLIENTS=/app/conf/clients\n")
        self.assertEqual(len(problems), 1, problems)
        self.assertIn("demo client id", problems[0])

    def test_workdir_is_the_checkout(self) -> None:
        """Compose commands name scripts relative to the repository root, which is the WORKDIR."""
        workdirs = [a for k, a in dockerfile_instructions(self.text) if k == "WORKDIR"]
        self.assertEqual(workdirs[-1:], [WORKDIR])

    def test_missing_copy_source_is_caught(self) -> None:
        problems = dockerfile_problems(self.text + "\nCOPY no-such-dir/ no-such-dir/\n")
        self.assertEqual(problems, ["COPY no-such-dir/: no such file in the repository"])

    def test_database_off_the_volume_is_caught(self) -> None:
        problems = dockerfile_problems(self.text + "\nENV MMGUN_DATABASE=/tmp/mmgun.sqlite3\n")
        self.assertEqual(len(problems), 1)
        self.assertIn("/tmp/mmgun.sqlite3", problems[0])

    def test_parser_joins_continuations(self) -> None:
        instructions = dockerfile_instructions('FROM x\n# note\nRUN a \\\n    # inner\n    && b\nENV A=1 \\\n    B="two words"\n')
        self.assertEqual(instructions, [("FROM", "x"), ("RUN", "a && b"), ("ENV", 'A=1 B="two words"')])
        self.assertEqual(dockerfile_env(instructions), {"A": "1", "B": "two words"})


class BuildScriptTests(SynchronousTestCase):
    def setUp(self) -> None:
        require(BUILD_SH)
        with open(BUILD_SH) as f:
            self.text = f.read()

    def test_executable(self) -> None:
        self.assertTrue(os.stat(BUILD_SH).st_mode & stat.S_IXUSR)
        self.assertTrue(self.text.startswith("#!"))

    def test_strict_and_builds_the_bundle(self) -> None:
        self.assertIn("set -euo pipefail", self.text)
        self.assertIn(f"docker build -t {IMAGE}", self.text)


if TYPE_CHECKING:
    _Mixin = SynchronousTestCase
else:
    _Mixin = object


class _ComposeChecks(_Mixin):
    """Shared by both compose files; subclasses set ``path`` (a mixin, so trial does not run it alone)."""

    path: str

    def setUp(self) -> None:
        require(self.path, DOCKERFILE)
        self.compose = load_yaml(self.path)
        with open(DOCKERFILE) as f:
            self.image_env = dockerfile_env(dockerfile_instructions(f.read()))

    def problems(self, compose: Mapping[str, Any] | None = None) -> Problems:
        return compose_problems(self.compose if compose is None else compose, os.path.dirname(self.path), self.image_env)

    def broken(self) -> dict[str, Any]:
        return copy.deepcopy(self.compose)

    def test_consistent(self) -> None:
        self.assertEqual(self.problems(), [])

    def test_every_role_has_a_service(self) -> None:
        self.assertTrue(set(ROLES) <= set(self.compose["services"]))

    def test_misspelled_role_is_caught(self) -> None:
        compose = self.broken()
        argv = command(compose["services"]["sender"])
        argv[argv.index("sender")] = "sendr"
        compose["services"]["sender"]["command"] = argv
        problems = self.problems(compose)
        self.assertTrue(any(p.startswith("sender: mmgun refuses its options: --role") for p in problems), problems)

    def test_unknown_option_is_caught(self) -> None:
        compose = self.broken()
        compose["services"]["cleaner"]["command"] = [*command(compose["services"]["cleaner"]), "--retension", "1d"]
        problems = self.problems(compose)
        self.assertTrue(any(p.startswith("cleaner: mmgun refuses its options:") and "retension" in p for p in problems), problems)

    def test_wrong_role_for_service_is_caught(self) -> None:
        compose = self.broken()
        argv = command(compose["services"]["cleaner"])
        argv[argv.index("cleaner")] = "sender"
        compose["services"]["cleaner"]["command"] = argv
        self.assertIn("cleaner: runs roles ('sender',), should run only cleaner", self.problems(compose))

    def test_database_on_another_mount_is_caught(self) -> None:
        compose = self.broken()
        compose["services"]["cleaner"]["environment"] = {"MMGUN_DATABASE": "/tmp/mmgun.sqlite3"}
        problems = self.problems(compose)
        self.assertTrue(
            any(p.startswith("cleaner: database /tmp/mmgun.sqlite3 is on no named volume") for p in problems), problems
        )

    def test_undeclared_volume_is_caught(self) -> None:
        compose = self.broken()
        del compose["volumes"]
        problems = self.problems(compose)
        self.assertTrue(any("is not declared under the top-level volumes" in p for p in problems), problems)

    def test_unpublished_listen_port_is_caught(self) -> None:
        compose = self.broken()
        compose["services"]["frontend"]["ports"] = ["8080:8081"]
        problems = self.problems(compose)
        self.assertTrue(any(p.startswith("frontend: listens on 8080") for p in problems), problems)

    def test_bad_stub_flag_is_caught(self) -> None:
        compose = self.broken()
        stub = next(n for n, s in compose["services"].items() if stub_script(command(s)) == "e2e-tests/dnsstub.py")
        compose["services"][stub]["command"] = [*command(compose["services"][stub]), "--zonefile", "x"]
        problems = self.problems(compose)
        self.assertTrue(any(p.startswith(f"{stub}: e2e-tests/dnsstub.py refuses its arguments") for p in problems), problems)

    def test_unreachable_nameserver_is_caught(self) -> None:
        compose = self.broken()
        del compose["services"]["sender"]["network_mode"]
        problems = self.problems(compose)
        self.assertTrue(any(p.startswith("sender: --nameserver 127.0.0.1:5353 is no DNS stub") for p in problems), problems)

    def test_missing_healthcheck_is_caught(self) -> None:
        compose = self.broken()
        del compose["services"]["sender"]["healthcheck"]
        self.assertIn("sender: no healthcheck", self.problems(compose))

    def test_api_published_beyond_loopback_is_caught(self) -> None:
        """issue 11 item 18: the API is published on the host's loopback only."""
        for ports in (["8080:8080"], ["0.0.0.0:8080:8080"], [{"target": 8080, "published": 8080}]):
            compose = self.broken()
            compose["services"]["frontend"]["ports"] = ports
            problems = self.problems(compose)
            self.assertTrue(any(p.startswith("frontend: publishes the API on") for p in problems), (ports, problems))
        compose = self.broken()
        compose["services"]["frontend"]["ports"] = ["[::1]:8080:8080"]
        self.assertEqual(self.problems(compose), [])

    def test_demo_client_id_is_caught(self) -> None:
        """issue 11 item 18: a frontend on 0.0.0.0 with the demo id of conf/clients would refuse to start."""
        compose = self.broken()
        compose["services"]["frontend"]["environment"]["MMGUN_CLIENTS"] = "/app/conf/clients"
        problems = self.problems(compose)
        self.assertTrue(
            any(p.startswith("frontend: mmgun would refuse to start") and "demo client id" in p for p in problems), problems
        )

    def test_foreign_image_is_caught(self) -> None:
        compose = self.broken()
        compose["services"]["frontend"]["image"] = "python:3.11-slim"
        self.assertIn("frontend: runs image 'python:3.11-slim', not mini-mailgun/bundle", self.problems(compose))


class ComposeTests(_ComposeChecks, SynchronousTestCase):
    path = COMPOSE


class PostgresComposeTests(_ComposeChecks, SynchronousTestCase):
    """issue 15: docker-compose.postgres.yml, every role on one PostgreSQL service."""

    path = POSTGRES_COMPOSE

    def test_database_on_another_mount_is_caught(self) -> None:
        compose = self.broken()
        compose["services"]["cleaner"]["environment"] = {"MMGUN_DATABASE": "/tmp/mmgun.sqlite3"}
        problems = self.problems(compose)
        self.assertTrue(any(p.startswith("the roles use different databases") for p in problems), problems)

    def test_undeclared_volume_is_caught(self) -> None:
        compose = self.broken()
        del compose["volumes"]
        self.assertIn("postgres: volume pgdata is not declared under the top-level volumes", self.problems(compose))

    def set_database(self, compose: dict[str, Any], url: str) -> None:
        for name in ROLES:
            compose["services"][name]["environment"] = {**compose["services"][name]["environment"], "MMGUN_DATABASE": url}

    def test_password_in_url_is_caught(self) -> None:
        compose = self.broken()
        self.set_database(compose, "postgresql://mmgun:hunter2@postgres:5432/mmgun")
        self.assertIn(
            "the --database URL holds a password: give it as PGPASSWORD, which mmgun never logs", self.problems(compose)
        )

    def test_unknown_host_and_database_are_caught(self) -> None:
        compose = self.broken()
        self.set_database(compose, "postgresql://mmgun@db:5432/mmgun")
        self.assertIn("--database names host 'db', which is no PostgreSQL service of this file", self.problems(compose))
        compose = self.broken()
        self.set_database(compose, "postgresql://mmgun@postgres:5432/queue")
        self.assertIn("--database names database 'queue'; postgres makes another", self.problems(compose))

    def test_published_database_and_unpinned_image_are_caught(self) -> None:
        compose = self.broken()
        compose["services"]["postgres"]["ports"] = ["5432:5432"]
        compose["services"]["postgres"]["image"] = "postgres:latest"
        problems = self.problems(compose)
        self.assertIn("postgres: publishes PostgreSQL's port on the host; only the compose network needs it", problems)
        self.assertIn("postgres: pin PostgreSQL's major version (postgres:latest), so an upgrade is a decision", problems)

    def test_data_off_a_volume_is_caught(self) -> None:
        compose = self.broken()
        del compose["services"]["postgres"]["volumes"]
        self.assertIn(
            "postgres: /var/lib/postgresql/data is on no named volume: the queue would die with the container",
            self.problems(compose),
        )

    def test_start_before_healthy_and_wrong_password_are_caught(self) -> None:
        compose = self.broken()
        compose["services"]["sender"]["depends_on"] = ["postgres"]
        compose["services"]["cleaner"]["environment"] = {**compose["services"]["cleaner"]["environment"], "PGPASSWORD": "x"}
        problems = self.problems(compose)
        self.assertIn("sender: should start once postgres is healthy (depends_on: condition: service_healthy)", problems)
        self.assertIn("cleaner: PGPASSWORD is not postgres's POSTGRES_PASSWORD", problems)


class EndToEndComposeTests(_ComposeChecks, SynchronousTestCase):
    path = E2E_COMPOSE

    def test_two_smtp_stubs_with_short_retries(self) -> None:
        services = self.compose["services"]
        smtp = [n for n, s in services.items() if "e2e-tests/smtpstub.py" in command(s)]
        self.assertEqual(len(smtp), 2)
        sender = mmgun_config(
            mmgun_arguments(command(services["sender"])) or [], {**self.image_env, **environment(services["sender"])}
        )
        self.assertLessEqual(sender.retry_max, 5)
        self.assertLessEqual(sender.poll_interval, 1)

    def test_bind_mounts_stay_under_e2e_out(self) -> None:
        """Stub maildirs go to e2e-tests/out/, which git ignores."""
        for name, service in self.compose["services"].items():
            for source in bind_mounts(service):
                self.assertTrue(posixpath.normpath(source).startswith("out/"), (name, source))
