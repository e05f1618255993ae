"""`docker-compose.yml` without Docker: schema-valid, and every service matches the CLIs.

There is no Docker engine where fedpeft is developed, so the compose file is checked
here: against the Compose specification's JSON schema (vendored verbatim in
tests/data/compose-spec.json, see its SOURCE file), then service by service against the
real `peft-server` / `peft-client` argument parsers and `superlink_command`. The checker
is a set of functions that each return a list of problems; the mutation tests prove each
kind of mistake is reported. (The same topology runs with real processes on loopback in
the deployment tests.)
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import posixpath
import re
import shlex
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from fedpeft.client.cli import build_parser as client_parser
from fedpeft.common.flower_deploy import superlink_command
from fedpeft.common.security.pki import CA_CERT, LOOPBACK_NAMES, NODE_KEY, SERVER_CERT, SERVER_KEY, TlsFiles
from fedpeft.server.cli import build_parser as server_parser

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKER_README = ROOT / "docker" / "README.md"
SCHEMA_FILE = Path(__file__).parent / "data" / "compose-spec.json"
LOOPBACK = {"127.0.0.1", "::1", "localhost"}
FLOWER_ENV = {"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_DISABLE_UPDATE_CHECK": "1"}

Compose = dict[str, Any]


def load_compose(path: Path = COMPOSE_FILE) -> Compose:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


# ---------------------------------------------------------------- reading the file


@dataclass(frozen=True)
class Mount:
    source: str
    """Host path (normalized, relative to the compose file) or `volume:NAME`."""
    target: str
    read_only: bool


def mounts(service: dict[str, Any]) -> list[Mount]:
    """A service's volumes, short (`SRC:DST[:ro]`) or long syntax."""
    found = []
    for entry in service.get("volumes", []):
        if isinstance(entry, str):
            parts = entry.split(":")
            if len(parts) == 1:  # anonymous volume
                found.append(Mount("volume:", parts[0], False))
                continue
            source, target, mode = parts[0], parts[1], parts[2] if len(parts) > 2 else "rw"
            read_only = "ro" in mode.split(",")
        else:
            source, target, read_only = entry.get("source", ""), entry["target"], bool(entry.get("read_only"))
        is_path = source.startswith((".", "/", "~"))
        found.append(Mount(posixpath.normpath(source) if is_path else f"volume:{source}", posixpath.normpath(target),
                           read_only))
    return found


def covering(service_mounts: list[Mount], path: str) -> Mount | None:
    """The mount `path` lies under inside the container (the deepest one), if any."""
    path = posixpath.normpath(path)
    hits = [m for m in service_mounts if path == m.target or path.startswith(m.target.rstrip("/") + "/")]
    return max(hits, key=lambda m: len(m.target), default=None)


def host_path(service_mounts: list[Mount], path: str) -> str | None:
    """Where a container path comes from on the host (or in a named volume)."""
    mount = covering(service_mounts, path)
    if mount is None:
        return None
    rest = posixpath.relpath(posixpath.normpath(path), mount.target)
    return mount.source if rest == "." else posixpath.join(mount.source, rest)


def command(service: dict[str, Any]) -> list[str]:
    cmd = service.get("command") or []
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def parse(parser_factory, argv: list[str]) -> tuple[Any, str | None]:
    """(namespace, None) or (None, argparse's error message)."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            return parser_factory().parse_args(argv), None
        except SystemExit:
            return None, stderr.getvalue().strip().splitlines()[-1] if stderr.getvalue().strip() else "parse error"


def split_address(address: str) -> tuple[str, int | None]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port) if port.isdigit() else None


@dataclass
class Topology:
    """The services by role, each `peft-*` command parsed by the real CLI parser."""

    services: dict[str, dict[str, Any]]
    superlink: str | None = None
    server: tuple[str, Any] | None = None
    certs: tuple[str, Any] | None = None
    clients: dict[str, Any] | None = None
    keygens: dict[str, Any] | None = None


def topology(compose: Compose) -> tuple[Topology, list[str]]:
    services = compose.get("services") or {}
    topo = Topology(services=services, clients={}, keygens={})
    problems: list[str] = []
    for name, service in services.items():
        cmd = command(service)
        if not cmd:
            problems.append(f"{name}: no command (every service states the exact CLI call)")
            continue
        exe = posixpath.basename(cmd[0])
        if exe == "flower-superlink":
            if topo.superlink is not None:
                problems.append(f"{name}: a second SuperLink ({topo.superlink} is one)")
            topo.superlink = name
            continue
        if exe not in ("peft-server", "peft-client"):
            problems.append(f"{name}: runs {exe!r}, not flower-superlink, peft-server or peft-client")
            continue
        args, error = parse(server_parser if exe == "peft-server" else client_parser, cmd[1:])
        if error:
            problems.append(f"{name}: `{shlex.join(cmd)}` does not parse: {error}")
            continue
        role = (exe, args.command)
        if role == ("peft-server", "run"):
            if topo.server is not None:
                problems.append(f"{name}: a second `peft-server run` ({topo.server[0]} is one)")
            topo.server = (name, args)
        elif role == ("peft-server", "certs"):
            topo.certs = (name, args)
        elif role == ("peft-client", "start"):
            topo.clients[name] = args
        elif role == ("peft-client", "keygen"):
            topo.keygens[name] = args
        else:
            problems.append(f"{name}: unexpected `{exe} {args.command}` service")
    if topo.superlink is None:
        problems.append("no flower-superlink service")
    if topo.server is None:
        problems.append("no `peft-server run` service")
    if topo.certs is None:
        problems.append("no `peft-server certs` service documenting how the TLS material is made")
    if len(topo.clients) < 2:
        problems.append(f"{len(topo.clients)} `peft-client start` service(s); the topology needs at least two")
    return topo, problems


# ---------------------------------------------------------------- the checks


def schema_problems(compose: Compose) -> list[str]:
    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [f"schema: {'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in sorted(validator.iter_errors(compose), key=lambda e: list(map(str, e.absolute_path)))]


def tls_problems(topo: Topology) -> list[str]:
    """TLS everywhere, from one certificate set whose SANs include the name clients dial."""
    problems = []
    if topo.server is not None:
        name, args = topo.server
        if args.insecure or args.tls is None:
            problems.append(f"{name}: `peft-server run` without --tls")
        if args.clients is None:
            problems.append(f"{name}: no --clients: SuperNode authentication would be off")
    for name, args in topo.clients.items():
        if args.insecure or args.root_cert is None:
            problems.append(f"{name}: `peft-client start` without --root-cert (TLS off)")
        if args.keys is None:
            problems.append(f"{name}: no --keys: the node cannot authenticate")
    if topo.certs is None or topo.superlink is None:
        return problems
    certs_name, certs = topo.certs
    sans = {*LOOPBACK_NAMES, *certs.host}
    dialed = {}
    if topo.server is not None and topo.server[1].attach:
        dialed[topo.server[0]] = topo.server[1].attach
    dialed.update({name: args.superlink for name, args in topo.clients.items()})
    slcmd = command(topo.services[topo.superlink])
    listen = slcmd[slcmd.index("--port") + 1] if "--port" in slcmd[:-1] else None
    for name, address in dialed.items():
        host, port = split_address(address)
        if host != topo.superlink:
            problems.append(f"{name}: dials {host!r}, not the SuperLink service {topo.superlink!r}")
        if str(port) != listen:
            problems.append(f"{name}: dials port {port}, but {topo.superlink} listens on --port {listen}")
        if host not in sans:
            problems.append(f"{name}: dials {host!r}, which is not among the certificate's SANs "
                            f"(loopback + `{certs_name}`'s --host {certs.host})")
    # every TLS file any service reads comes from where `certs` wrote it
    made = {f: host_path(mounts(topo.services[certs_name]), posixpath.join(str(certs.out), f))
            for f in (CA_CERT, SERVER_CERT, SERVER_KEY)}
    used: list[tuple[str, str, str]] = []  # (service, container path, file name)
    if topo.server is not None and topo.server[1].tls is not None:
        tls = TlsFiles.in_dir(topo.server[1].tls)
        used += [(topo.server[0], str(p), p.name) for p in (tls.ca_cert, tls.server_cert, tls.server_key)]
    used += [(name, str(args.root_cert), CA_CERT) for name, args in topo.clients.items() if args.root_cert]
    for flag, file in (("--ssl-ca-certfile", CA_CERT), ("--ssl-certfile", SERVER_CERT), ("--ssl-keyfile", SERVER_KEY)):
        if flag in slcmd[:-1]:
            used.append((topo.superlink, slcmd[slcmd.index(flag) + 1], file))
    for name, path, file in used:
        source = host_path(mounts(topo.services[name]), path)
        if source is not None and source != made[file]:
            problems.append(f"{name}: {path} is mounted from {source}, but `{certs_name}` writes {file} to {made[file]}")
    # clients trust the CA; they never get the CA's or the server's private key
    tls_host_dir = host_path(mounts(topo.services[certs_name]), str(certs.out))
    for name in topo.clients:
        for m in mounts(topo.services[name]):
            if tls_host_dir and (m.source == tls_host_dir or m.source.startswith(tls_host_dir + "/")) \
                    and m.source != made[CA_CERT]:
                problems.append(f"{name}: mounts {m.source} from the TLS dir; a client gets {CA_CERT} only")
    return problems


def superlink_problems(topo: Topology) -> list[str]:
    """The SuperLink command is exactly `superlink_command` for the server's settings."""
    if topo.superlink is None or topo.server is None:
        return []
    name, (server_name, server) = topo.superlink, topo.server
    cmd = command(topo.services[name])
    problems = []
    database = cmd[cmd.index("--database") + 1] if "--database" in cmd[:-1] else None
    if database is None:
        problems.append(f"{name}: no --database: registrations would be lost on a restart")
    else:
        state = covering(mounts(topo.services[name]), posixpath.dirname(database))
        if state is None or not state.source.startswith("volume:") or state.read_only:
            problems.append(f"{name}: --database {database} is not on a writable named volume")
    _, port = split_address(server.attach or "")
    if port is None:
        problems.append(f"{server_name}: --attach {server.attach!r} is not HOST:PORT of the SuperLink service")
        return problems
    tls = TlsFiles.in_dir(server.tls) if server.tls is not None else None
    expected = superlink_command(host="0.0.0.0", port=port,
                                 tls=(tls.ca_cert, tls.server_cert, tls.server_key) if tls else None,
                                 node_auth=server.clients is not None and tls is not None,
                                 database=Path(database) if database else None)
    if posixpath.basename(expected[0]) != posixpath.basename(cmd[0]) or expected[1:] != cmd[1:]:
        problems.append(f"{name}: command {shlex.join(cmd[1:])!r} differs from superlink_command(...) for the "
                        f"server's settings: {shlex.join(expected[1:])!r}")
    return problems


def mount_problems(topo: Topology) -> list[str]:
    """Every path a command names lies under a mount (writable where the process writes)."""
    needs: dict[str, list[tuple[str, str, bool]]] = {}  # service -> (what, container path, writable)
    if topo.superlink is not None:
        cmd, env = command(topo.services[topo.superlink]), environment(topo.services[topo.superlink])
        paths = [(flag, cmd[cmd.index(flag) + 1], False)
                 for flag in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile") if flag in cmd[:-1]]
        if "--database" in cmd[:-1]:
            paths.append(("--database", posixpath.dirname(cmd[cmd.index("--database") + 1]), True))
        paths += [(key, env[key], True) for key in ("FLWR_HOME", "FEDPEFT_CACHE") if key in env]
        needs[topo.superlink] = paths
    if topo.server is not None:
        name, args = topo.server
        paths = [("--config", str(args.config), False), ("--run-dir", str(args.run_dir), True)]
        if args.tls is not None:
            tls = TlsFiles.in_dir(args.tls)
            paths += [("--tls", str(p), False) for p in (tls.ca_cert, tls.server_cert, tls.server_key)]
        if args.clients is not None:
            paths.append(("--clients", str(args.clients), False))
        needs[name] = paths
    for name, args in topo.clients.items():
        paths = [("--workdir", str(args.workdir), True)]
        paths += [(flag, str(value), False) for flag, value in (("--root-cert", args.root_cert), ("--keys", args.keys))
                  if value is not None]
        if not args.data.startswith("builtin:"):
            paths.append(("--data", args.data, False))
        if args.model.startswith("/"):
            paths.append(("--model", args.model, False))
        needs[name] = paths
    if topo.certs is not None:
        needs[topo.certs[0]] = [("--out", str(topo.certs[1].out), True)]
    for name, args in topo.keygens.items():
        needs[name] = [("--out", str(args.out), True)]
    problems = []
    for name, paths in needs.items():
        service_mounts = mounts(topo.services[name])
        for what, path, writable in paths:
            mount = covering(service_mounts, path)
            if mount is None:
                problems.append(f"{name}: {what} {path} is not under any volume mounted in the service")
            elif writable and mount.read_only:
                problems.append(f"{name}: {what} {path} is written to, but {mount.target} is mounted read-only")
    return problems


def client_isolation_problems(topo: Topology) -> list[str]:
    """Each client has its own data, keys and work volume; its inputs are read-only."""
    problems = []
    owners: dict[tuple[str, str], str] = {}
    for name, args in topo.clients.items():
        service_mounts = mounts(topo.services[name])
        for what, path in (("data", None if args.data.startswith("builtin:") else args.data),
                           ("keys", args.keys and str(args.keys)), ("workdir", str(args.workdir))):
            mount = path and covering(service_mounts, path)
            if not mount:
                continue
            if what != "workdir" and not mount.read_only:
                problems.append(f"{name}: its {what} volume {mount.source} is mounted read-write; mount it :ro")
            other = owners.setdefault((what, mount.source), name)
            if other != name:
                problems.append(f"{name}: shares its {what} volume {mount.source} with {other}; each client needs its own")
    ids = [args.partition_id for args in topo.clients.values() if args.partition_id is not None]
    if len(ids) != len(set(ids)):
        problems.append(f"clients share a --partition-id ({ids}): their local training would be seeded alike")
    # one keygen per client, writing the very dir the client reads its keys from
    made = {host_path(mounts(topo.services[n]), str(a.out)) for n, a in topo.keygens.items()}
    for name, args in topo.clients.items():
        keys = args.keys and host_path(mounts(topo.services[name]), str(args.keys))
        if keys and keys not in made:
            problems.append(f"{name}: no `peft-client keygen` service writes its keys dir {keys}")
    return problems


def shared_path_problems(topo: Topology) -> list[str]:
    """The ServerApp runs inside the SuperLink's container: the run config (and what lies
    beside it, e.g. eval data) and the run dir are the same mounts at the same paths."""
    if topo.superlink is None or topo.server is None:
        return []
    (server_name, args), superlink = topo.server, topo.superlink
    problems = []
    for what, path in (("--config", str(args.config)), ("--config's folder", posixpath.dirname(str(args.config))),
                       ("--run-dir", str(args.run_dir))):
        in_server = covering(mounts(topo.services[server_name]), path)
        in_superlink = covering(mounts(topo.services[superlink]), path)
        if in_server is None:
            continue  # reported by mount_problems
        if in_superlink is None or (in_superlink.source, in_superlink.target) != (in_server.source, in_server.target):
            problems.append(f"{superlink}: {what} {path} must be mounted as in {server_name} "
                            f"({in_server.source}:{in_server.target}); the ServerApp reads it there")
        elif what == "--run-dir" and in_superlink.read_only:
            problems.append(f"{superlink}: the ServerApp writes the run dir {path}, but it is mounted read-only")
    return problems


def published_ports(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(host ip, entry) for every published port; '' = all interfaces."""
    found = []
    for entry in service.get("ports", []):
        if isinstance(entry, dict):
            found.append((str(entry.get("host_ip", "")), json.dumps(entry)))
            continue
        text = str(entry).split("/")[0]
        if text.startswith("["):
            found.append((text[1:text.index("]")], str(entry)))
        else:
            parts = text.split(":")
            found.append((parts[0] if len(parts) == 3 else "", str(entry)))
    return found


def network_problems(topo: Topology) -> list[str]:
    """The SuperLink's one port carries the login-less Control API: never on all interfaces."""
    problems = []
    for name, service in topo.services.items():
        if service.get("network_mode") == "host":
            problems.append(f"{name}: network_mode host exposes every port it listens on")
        for host, entry in published_ports(service):
            if host not in LOOPBACK:
                problems.append(f"{name}: port {entry} is published on {host or 'all interfaces (0.0.0.0)'}; "
                                "publish on 127.0.0.1 at most")
    return problems


def startup_problems(topo: Topology) -> list[str]:
    """Flower's environment in every Flower process; nothing starts before the SuperLink is up."""
    problems = []
    if topo.superlink is None:
        return problems
    if "healthcheck" not in topo.services[topo.superlink]:
        problems.append(f"{topo.superlink}: no healthcheck, so nothing can wait for it")
    flower = [topo.superlink, *([topo.server[0]] if topo.server else []), *topo.clients]
    for name in flower:
        env = environment(topo.services[name])
        wrong = {k: env.get(k) for k, v in FLOWER_ENV.items() if env.get(k) != v}
        if wrong or not env.get("FLWR_HOME"):
            problems.append(f"{name}: needs {FLOWER_ENV} and a FLWR_HOME of its own (has {wrong or 'no FLWR_HOME'})")
        if name == topo.superlink:
            continue
        depends = topo.services[name].get("depends_on") or {}
        condition = depends.get(topo.superlink, {}).get("condition") if isinstance(depends, dict) else None
        if condition != "service_healthy":
            problems.append(f"{name}: must depend on {topo.superlink} with condition service_healthy")
    # the same container path is fine; the same volume behind it is not
    homes = [host_path(mounts(topo.services[n]), home) for n in flower
             if (home := environment(topo.services[n]).get("FLWR_HOME"))]
    if len([h for h in homes if h]) != len({h for h in homes if h}):
        problems.append(f"services share a FLWR_HOME volume: {homes}")
    return problems


def documentation_problems(topo: Topology, text: str) -> list[str]:
    """The header comments name the setup services and the node-key hand-over."""
    problems = []
    for name in [*([topo.certs[0]] if topo.certs else []), *topo.keygens]:
        if f"docker compose run --rm {name}" not in text:
            problems.append(f"the header does not document `docker compose run --rm {name}`")
    if topo.server is not None and topo.server[1].clients is not None:
        nodes = host_path(mounts(topo.services[topo.server[0]]), str(topo.server[1].clients))
        for name, args in topo.clients.items():
            keys = args.keys and host_path(mounts(topo.services[name]), str(args.keys))
            if keys and not re.search(rf"cp {re.escape(keys)}/{NODE_KEY}\.pub {re.escape(str(nodes))}/\S+\.pub", text):
                problems.append(f"the header does not show copying {keys}/{NODE_KEY}.pub into {nodes}/ for {name}")
    return problems


def image_problems(compose: Compose, root: Path = ROOT) -> list[str]:
    """One image for every service, built from a Dockerfile that copies every package dir."""
    problems = []
    services = compose.get("services") or {}
    images = {s.get("image") for s in services.values()}
    if len(images) != 1 or None in images:
        problems.append(f"services should share one named image, found {sorted(map(str, images))}")
    for name, service in services.items():
        build = service.get("build")
        if not isinstance(build, dict):
            problems.append(f"{name}: no build section (context + dockerfile)")
            continue
        dockerfile = root / build.get("context", ".") / build.get("dockerfile", "Dockerfile")
        if not dockerfile.is_file():
            problems.append(f"{name}: build dockerfile {dockerfile} does not exist")
            continue
        copied = {src for line in dockerfile.read_text(encoding="utf-8").splitlines()
                  if line.startswith("COPY ") for src in line.split()[1:-1]}
        setuptools = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
        needed = {"pyproject.toml", "README.md"} | {d.split("/")[0] for d in setuptools["package-dir"].values()}
        if needed - copied:
            problems.append(f"{dockerfile.relative_to(root)}: `pip install .` needs {sorted(needed - copied)} copied")
    return problems


def compose_problems(compose: Compose, text: str | None = None) -> list[str]:
    """Everything wrong with a compose file (empty when it is right)."""
    problems = schema_problems(compose) + image_problems(compose)
    topo, found = topology(compose)
    problems += found
    for check in (tls_problems, superlink_problems, mount_problems, client_isolation_problems, shared_path_problems,
                  network_problems, startup_problems):
        problems += check(topo)
    if text is not None:
        problems += documentation_problems(topo, text)
    return problems


# ---------------------------------------------------------------- tests


def test_compose_file_is_valid_and_matches_the_clis():
    assert compose_problems(load_compose(), COMPOSE_FILE.read_text(encoding="utf-8")) == []


def test_topology_superlink_server_and_two_clients_with_their_own_volumes():
    topo, problems = topology(load_compose())
    assert problems == []
    assert topo.superlink == "superlink" and topo.server is not None and topo.server[1].attach == "superlink:9092"
    assert len(topo.clients) >= 2
    data = {host_path(mounts(topo.services[n]), a.data) for n, a in topo.clients.items()}
    assert len(data) == len(topo.clients)


def test_vendored_schema_is_the_official_file():
    source = (SCHEMA_FILE.parent / "compose-spec.SOURCE.txt").read_text(encoding="utf-8")
    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    assert schema["title"] == "Compose Specification" and "compose-spec/compose-spec" in source
    assert "Apache" in source


def test_documented_run_config_is_valid_and_matches_the_clients(tmp_path):
    """docker/README.md's example run.toml validates and names the clients' model and count."""
    from fedpeft.server.federation.spec import RunSpec
    from fedpeft.server.federation.task_data import load_task_data

    blocks = re.findall(r"```toml\n(.*?)```", DOCKER_README.read_text(encoding="utf-8"), re.S)
    assert len(blocks) == 1
    (tmp_path / "run.toml").write_text(blocks[0], encoding="utf-8")
    rows = [{"text": "great film", "label": 1}, {"text": "dull and long", "label": 0}]
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    config = RunSpec.from_toml(tmp_path / "run.toml", driver="deployment")
    load_task_data(config.task, config.federation.seed, with_train=False)
    topo, _ = topology(load_compose())
    assert {args.model for args in topo.clients.values()} == {config.federation.model}
    assert config.federation.clients == len(topo.clients)


def _set_arg(cmd: list[str], flag: str, value: str) -> None:
    cmd[cmd.index(flag) + 1] = value


def _insecure_client(c: Compose) -> None:
    cmd = c["services"]["client-0"]["command"]
    i = cmd.index("--root-cert")
    cmd[i:i + 2] = ["--insecure"]


def _shared_data_volume(c: Compose) -> None:
    c["services"]["client-1"]["volumes"] = [v.replace("client-1/data", "client-0/data")
                                            for v in c["services"]["client-1"]["volumes"]]


def _writable_data_volume(c: Compose) -> None:
    c["services"]["client-0"]["volumes"] = [v.removesuffix(":ro") if "/data:" in v else v
                                            for v in c["services"]["client-0"]["volumes"]]


def _publish_everywhere(c: Compose) -> None:
    c["services"]["superlink"]["ports"] = ["9092:9092"]


def _no_node_auth(c: Compose) -> None:
    c["services"]["superlink"]["command"].remove("--enable-supernode-auth")


def _run_dir_elsewhere(c: Compose) -> None:
    c["services"]["superlink"]["volumes"] = [v.replace(":/fedpeft/runs", ":/srv/runs")
                                             for v in c["services"]["superlink"]["volumes"]]


def _wrong_superlink_host(c: Compose) -> None:
    _set_arg(c["services"]["client-1"]["command"], "--superlink", "localhost:9092")


def _wrong_port(c: Compose) -> None:
    _set_arg(c["services"]["client-0"]["command"], "--superlink", "superlink:8000")


def _san_missing(c: Compose) -> None:
    cmd = c["services"]["certs"]["command"]
    _set_arg(cmd, "--host", "coordinator.example.org")


def _whole_tls_dir_to_client(c: Compose) -> None:
    c["services"]["client-0"]["volumes"].append("./deploy/tls:/fedpeft/tls-all:ro")


def _data_not_mounted(c: Compose) -> None:
    _set_arg(c["services"]["client-0"]["command"], "--data", "/elsewhere/train.jsonl")


def _bad_cli_flag(c: Compose) -> None:
    c["services"]["server"]["command"].append("--no-such-flag")


def _schema_violation(c: Compose) -> None:
    c["services"]["server"]["restart_policy"] = "never"


def _other_image(c: Compose) -> None:
    c["services"]["client-1"]["image"] = "fedpeft:old"


def _one_client(c: Compose) -> None:
    del c["services"]["client-1"]


@pytest.mark.parametrize(("mutate", "expected"), [
    (_insecure_client, "client-0: `peft-client start` without --root-cert"),
    (_shared_data_volume, "client-1: shares its data volume deploy/client-0/data with client-0"),
    (_writable_data_volume, "client-0: its data volume deploy/client-0/data is mounted read-write"),
    (_publish_everywhere, "superlink: port 9092:9092 is published on all interfaces"),
    (_no_node_auth, "superlink: command"),
    (_run_dir_elsewhere, "superlink: --run-dir /fedpeft/runs/compose must be mounted as in server"),
    (_wrong_superlink_host, "client-1: dials 'localhost', not the SuperLink service 'superlink'"),
    (_wrong_port, "client-0: dials port 8000, but superlink listens on --port 9092"),
    (_san_missing, "which is not among the certificate's SANs"),
    (_whole_tls_dir_to_client, "client-0: mounts deploy/tls from the TLS dir"),
    (_data_not_mounted, "client-0: --data /elsewhere/train.jsonl is not under any volume"),
    (_bad_cli_flag, "server: `peft-server run"),
    (_schema_violation, "schema: services/server"),
    (_one_client, "1 `peft-client start` service(s)"),
    (_other_image, "services should share one named image"),
])
def test_checker_reports_each_kind_of_mistake(mutate, expected):
    compose = copy.deepcopy(load_compose())
    mutate(compose)
    problems = compose_problems(compose)
    assert any(expected in p for p in problems), problems


def test_checker_reports_undocumented_key_handover():
    text = COMPOSE_FILE.read_text(encoding="utf-8").replace("deploy/nodes/client-1.pub", "deploy/client-1.pub")
    problems = compose_problems(load_compose(), text)
    assert problems == ["the header does not show copying deploy/client-1/keys/node_key.pub into deploy/nodes/ "
                        "for client-1"]


def test_port_parsing_covers_the_short_and_long_syntax():
    service = {"ports": ["127.0.0.1:9092:9092", "[::1]:9093:9093", "9094", 9095, "0.0.0.0:9096:9096/tcp",
                         {"target": 9097, "host_ip": "127.0.0.1", "published": "9097"}]}
    hosts = [h for h, _ in published_ports(service)]
    assert hosts == ["127.0.0.1", "::1", "", "", "0.0.0.0", "127.0.0.1"]
