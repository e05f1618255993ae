"""Starting Flower's deployment processes (SuperLink, SuperNode, `flwr` CLI) the way
fedpeft needs them; the federation engine itself is entirely Flower's.

Every Flower process gets: its own `FLWR_HOME`, no runtime dependency installation
(`flwr run` would otherwise pip-install the app's dependencies, a CUDA torch), no update
check, no telemetry, and this interpreter's bin dir first on PATH (the SuperLink and
SuperNode launch `flower-superexec` / `flwr-serverapp` / `flwr-clientapp` by name).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from fedpeft.common.errors import ConfigError, FederationError
from fedpeft.common.files import atomic_write_bytes
from fedpeft.common.logs import OFFLINE_ENV

log = logging.getLogger("fedpeft.deploy")
BIN_DIR = Path(sys.executable).parent


def flower_env(flwr_home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for one Flower process (or CLI call) with its own FLWR_HOME."""
    Path(flwr_home).mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update(OFFLINE_ENV)
    env.update({
        "FLWR_HOME": str(Path(flwr_home).resolve()),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "PATH": f"{BIN_DIR}{os.pathsep}{env.get('PATH', '')}",
        "PYTHONUNBUFFERED": "1",
    })
    env.update(extra or {})
    return env


def flower_executable(name: str) -> str:
    """Full path of a Flower console script installed next to this interpreter."""
    candidate = BIN_DIR / name
    found = str(candidate) if candidate.exists() else shutil.which(name)
    if not found:
        raise ConfigError(f"{name} not found next to {sys.executable} or on PATH; is flwr installed?")
    return found


def superlink_command(*, host: str, port: int, tls: tuple[Path, Path, Path] | None, node_auth: bool,
                      database: Path | None = None) -> list[str]:
    """`flower-superlink` with fedpeft's security defaults; `tls` = (ca, cert, key), None = insecure."""
    cmd = [flower_executable("flower-superlink"), "--host", host, "--port", str(port)]
    if tls is None:
        if node_auth:
            raise ConfigError("SuperNode authentication needs TLS (Flower refuses --enable-supernode-auth with --insecure)")
        cmd.append("--insecure")
    else:
        ca, cert, key = tls
        cmd += ["--ssl-ca-certfile", str(ca), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key)]
    if node_auth:
        cmd.append("--enable-supernode-auth")
    if database is not None:
        cmd += ["--database", str(database)]
    return cmd


def supernode_command(*, superlink: str, root_cert: Path | None, auth_key: Path | None, clientappio_port: int,
                      node_config: Mapping[str, str | int]) -> list[str]:
    """`flower-supernode` with TLS (`root_cert`; None = insecure) and optional node auth."""
    cmd = [flower_executable("flower-supernode"), "--superlink", superlink, "--port", str(clientappio_port)]
    cmd += ["--root-certificates", str(root_cert)] if root_cert is not None else ["--insecure"]
    if auth_key is not None:
        cmd += ["--auth-supernode-private-key", str(auth_key)]
    bad = [f"{k}={v!r}" for k, v in node_config.items() if isinstance(v, str) and any(c in v for c in '"\\\n')]
    if bad:
        raise ConfigError(f"node config values cannot contain quotes, backslashes or newlines: {', '.join(bad)}")
    pairs = " ".join(f'{k}="{v}"' if isinstance(v, str) else f"{k}={v}" for k, v in node_config.items())
    cmd += ["--node-config", pairs]
    return cmd


def write_cli_config(flwr_home: Path, name: str, address: str, root_cert: Path | None) -> None:
    """The `flwr` CLI's connection entry `[superlink.NAME]` in $FLWR_HOME/config.toml."""
    lines = ["[superlink]", f'default = "{name}"', "", f"[superlink.{name}]", f'address = "{address}"']
    lines.append(f"root-certificates = {json.dumps(str(Path(root_cert).resolve()))}" if root_cert is not None
                 else "insecure = true")
    Path(flwr_home).mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(Path(flwr_home) / "config.toml", ("\n".join(lines) + "\n").encode())


def run_flwr(args: Sequence[str], env: Mapping[str, str], *, timeout: float = 120.0, check: bool = True,
             stream: bool = False) -> subprocess.CompletedProcess[str]:
    """Call the `flwr` CLI; raises `FederationError` with its output when it fails."""
    cmd = [flower_executable("flwr"), *args]
    log.debug("$ %s", " ".join(cmd))
    try:
        result = subprocess.run(cmd, env=dict(env), text=True, timeout=timeout, check=False,
                                stdout=None if stream else subprocess.PIPE, stderr=None if stream else subprocess.STDOUT)
    except subprocess.TimeoutExpired:
        raise FederationError(f"`flwr {' '.join(args)}` did not finish within {timeout:.0f} s") from None
    if check and result.returncode != 0:
        raise FederationError(f"`flwr {' '.join(args)}` failed (exit {result.returncode}):\n{result.stdout or ''}")
    return result


def start_process(cmd: Sequence[str], env: Mapping[str, str], log_path: Path | None = None, *,
                  own_group: bool = True) -> subprocess.Popen[bytes]:
    """Start a long-running Flower process. In its own process group (`own_group`), stopping
    it stops its children; in ours, a signal to our group (Ctrl-C, a SIGKILL of the whole
    coordinator) reaches it too."""
    out = open(log_path, "ab") if log_path is not None else None  # noqa: SIM115  (owned by the child)
    log.info("starting %s", " ".join(Path(cmd[0]).name if i == 0 else c for i, c in enumerate(cmd)))
    return subprocess.Popen(list(cmd), env=dict(env), stdout=out, stderr=subprocess.STDOUT if out else None,
                            start_new_session=own_group)


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """SIGTERM the process group, then SIGKILL what is left after `timeout`."""
    if proc.poll() is not None:
        return
    try:
        own_group = os.getpgid(proc.pid) == proc.pid
    except ProcessLookupError:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            if own_group:
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=timeout)
            return
        except subprocess.TimeoutExpired:
            continue


def wait_for_port(host: str, port: int, timeout: float = 60.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Block until something listens on host:port (or `proc` died)."""
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise FederationError(f"process exited with code {proc.returncode} before listening on {host}:{port}")
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
            sock.settimeout(1.0)
            if sock.connect_ex((host, port)) == 0:
                return
        time.sleep(0.2)
    raise FederationError(f"nothing listens on {host}:{port} after {timeout:.0f} s")
