"""A whole deployment on one machine: `peft-server` and N `peft-client` processes on
127.0.0.1, with TLS, node keys and identities made by the real CLIs.

Used by the integration tests and the deployment benchmark; every process is the real
command a user runs (`python -m fedpeft.server.cli`, `python -m fedpeft.client.cli`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedpeft.common.errors import FederationError

_CLIENT_KEYS = ("keys", "nodes", "trusted")


def _pids_with_argument(marker: str) -> list[int]:
    """Processes of this user whose command line contains `marker` (Linux /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def free_port() -> int:
    """A TCP port nothing listens on right now (bound and released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def write_run_config(path: Path, sections: Mapping[str, Mapping[str, Any]]) -> Path:
    """Write a TOML run config from {section: {key: value}} (nested tables one level deep)."""
    lines: list[str] = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        tables = {k: v for k, v in values.items() if isinstance(v, Mapping)}
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items() if k not in tables]
        for name, table in tables.items():
            lines.append(f"[{section}.{name}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@dataclass
class LoopbackDeployment:
    """Owns a work dir with tls/, keys/cN/, nodes/*.pub, trusted/*.json and the processes."""

    root: Path
    model: str
    port: int = field(default_factory=free_port)
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    def cli(self, module: str, *args: str, timeout: float = 120.0) -> str:
        result = subprocess.run([sys.executable, "-m", module, *args], cwd=self.root, env=self.env, text=True,
                                capture_output=True, timeout=timeout, check=False)
        if result.returncode != 0:
            raise FederationError(f"{module} {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
        return result.stdout

    def make_tls(self) -> Path:
        self.cli("fedpeft.server.cli", "certs", "--out", "tls")
        return self.root / "tls"

    def make_server_identity(self) -> Path:
        self.cli("fedpeft.server.cli", "keys", "--out", "server-id")
        return self.root / "server-id"

    def make_client_keys(self, name: str, *, register: bool = True, trust: bool = True) -> Path:
        """`peft-client keygen`, then (like an operator would) copy its node key into nodes/
        and its identity into trusted/."""
        out = self.root / "keys" / name
        self.cli("fedpeft.client.cli", "keygen", "--out", str(out))
        for d in ("nodes", "trusted"):
            (self.root / d).mkdir(exist_ok=True)
        if register:
            shutil.copy(out / "node_key.pub", self.root / "nodes" / f"{name}.pub")
        if trust:
            shutil.copy(out / "identity" / "public.json", self.root / "trusted" / f"{name}.json")
        return out

    def start_server(self, config: Path, run_dir: Path, *, secure: bool = True, node_auth: bool = True,
                     resume: bool = False, name: str = "server", extra: Sequence[str] = ()) -> subprocess.Popen[bytes]:
        args = ["run", "--config", str(config), "--run-dir", str(run_dir), "--port", str(self.port)]
        args += (["--tls", "tls"] + (["--clients", "nodes"] if node_auth else [])) if secure else ["--insecure"]
        if resume:
            args.append("--resume")
        return self._start(name, [sys.executable, "-m", "fedpeft.server.cli", *args, *extra])

    def start_client(self, name: str, data: str, *, secure: bool = True, keys: bool = True, threads: int = 1,
                     extra: Sequence[str] = ()) -> subprocess.Popen[bytes]:
        args = ["start", "--superlink", f"127.0.0.1:{self.port}", "--data", data, "--model", self.model,
                "--workdir", str(self.root / "work" / name), "--port", str(free_port()), "--threads", str(threads)]
        args += ["--root-cert", "tls/ca.crt"] if secure else ["--insecure"]
        if keys:
            args += ["--keys", str(self.root / "keys" / name)]
        return self._start(name, [sys.executable, "-m", "fedpeft.client.cli", *args, *extra])

    def _start(self, name: str, cmd: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.root / f"{name}.log", "ab")  # noqa: SIM115  (owned by the child)
        proc = subprocess.Popen(cmd, cwd=self.root, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.processes[name] = proc
        return proc

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait(self, name: str, timeout: float) -> int:
        try:
            return self.processes[name].wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise FederationError(f"{name} still running after {timeout:.0f} s; log tail:\n{self.log(name)[-3000:]}") from None

    def wait_for(self, predicate: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.5)
        raise FederationError(f"timed out after {timeout:.0f} s waiting for {what}")

    def kill(self, name: str, sig: int = signal.SIGKILL, grace: float = 30.0) -> None:
        """Signal a process's whole group (a server's SuperLink and ServerApp, a client's
        SuperNode die with it); SIGKILL the group if it outlives `grace`."""
        proc = self.processes[name]
        for s in (sig, signal.SIGKILL):
            if proc.poll() is not None:
                return
            try:
                os.killpg(proc.pid, s)
            except ProcessLookupError:
                return
            try:
                proc.wait(timeout=grace)
                return
            except subprocess.TimeoutExpired:
                continue

    def stop_all(self) -> None:
        """Stop everything started here, then anything still attached to this SuperLink port
        (Flower's detached helper processes)."""
        for name in list(self.processes):
            self.kill(name, signal.SIGTERM)
        marker = f"127.0.0.1:{self.port}"
        for pid in _pids_with_argument(marker):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
