"""`peft-client start`: the long-lived local trainer plus a Flower SuperNode.

The trainer (a gRPC service on a private Unix socket, see `trainer_service`) holds the
client's data, its 4-bit base model once loaded, and its identity keys. The SuperNode
(Flower's process, started here as a child) connects to the SuperLink over TLS with the
node's authentication key and runs each message's short-lived ClientApp, which forwards
the work to the trainer. Nothing but PEFT deltas and metrics ever leaves.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from fedpeft.client.app import ClientSetup
from fedpeft.client.trainer_service import TrainerState, serve_trainer, socket_address
from fedpeft.common.codecs.feedback import STATE_DIR_KEY
from fedpeft.common.data.builtin_task import builtin_splits
from fedpeft.common.data.partition import PartitionSpec, partition_records
from fedpeft.common.data.records import Record, read_records
from fedpeft.common.errors import ConfigError, DataError, FederationError
from fedpeft.common.flower_deploy import flower_env, start_process, supernode_command
from fedpeft.common.model.base_model import resolve_model_dir
from fedpeft.common.model.quantization import resolve_quantize, validate_quantize
from fedpeft.common.security.envelope import PeerIdentity, PublicKeys
from fedpeft.common.security.pki import NODE_KEY

log = logging.getLogger("fedpeft.client")
BUILTIN_PREFIX = "builtin:"
MAX_SOCKET_PATH = 100
RECONNECT_MIN_S, RECONNECT_MAX_S = 2.0, 30.0
QUICK_EXIT_S, MAX_QUICK_FAILURES = 10.0, 5  # AF_UNIX paths are limited to 108 bytes


def load_client_rows(data: str, seed: int = 0, builtin_train_rows: int = 800) -> tuple[list[Record], int]:
    """(rows, partition id) of `--data`: a local file, or `builtin:K/N` = partition K of N
    of the built-in task, split exactly as `peft-sim` splits it (iid, same seed)."""
    if data.startswith(BUILTIN_PREFIX):
        try:
            k, n = (int(x) for x in data.removeprefix(BUILTIN_PREFIX).split("/"))
        except ValueError:
            raise ConfigError(f"--data {data!r}: expected builtin:K/N, e.g. builtin:0/3") from None
        if not 0 <= k < n:
            raise ConfigError(f"--data {data!r}: partition K must be in [0, N)")
        train, _ = builtin_splits(builtin_train_rows, 200, seed)
        parts = partition_records(train, n, PartitionSpec.parse("iid"), "label", seed)
        return list(parts[k]), k
    path = Path(data)
    if not path.is_file():
        raise DataError(f"--data {data}: no such file")
    return read_records(path), 0


@dataclass
class ClientOptions:
    superlink: str
    data: str
    model: str
    key_dir: Path | None
    """Dir from `peft-client keygen`: node_key (SuperNode auth) + identity (envelopes)."""
    root_cert: Path | None
    """CA certificate that signed the SuperLink's; None = --insecure."""
    workdir: Path
    quantize: str = "auto"
    partition_id: int | None = None
    clientappio_port: int = 9094
    torch_threads: int = 0
    seed: int = 0
    once: bool = False
    """Exit when the SuperNode exits, instead of reconnecting."""
    server_key: Path | None = None
    """The server's public.json (`peft-server keys`): seal every delta to it, never send plaintext."""
    split_server: str | None = None
    """HOST:PORT of the coordinator's split server (runs with the split topology)."""
    split_ca: Path | None = None
    """CA certificate of the split server's TLS certificate (default: --root-cert)."""


def _absolute(data: str) -> str:
    return data if data.startswith(BUILTIN_PREFIX) else str(Path(data).resolve())


def _socket_path(workdir: Path) -> Path:
    path = workdir.resolve() / "trainer.sock"
    if len(str(path)) > MAX_SOCKET_PATH:
        path = Path(tempfile.mkdtemp(prefix="fedpeft-")) / "trainer.sock"
    path.parent.chmod(0o700)  # only this user may talk to the trainer
    if path.exists():
        path.unlink()
    return path


def run_client(options: ClientOptions) -> int:
    """Serve until the SuperNode exits (run finished, or stopped); returns its exit code."""
    quantize = validate_quantize(resolve_quantize(options.quantize))
    model_dir = resolve_model_dir(options.model)
    rows, partition = load_client_rows(options.data, options.seed)
    declared = options.partition_id is not None or options.data.startswith(BUILTIN_PREFIX)
    if options.partition_id is not None:
        partition = options.partition_id
    identity = None
    auth_key = None
    if options.key_dir is not None:
        identity = PeerIdentity.load(options.key_dir / "identity")
        auth_key = options.key_dir / NODE_KEY
        if not auth_key.is_file():
            raise ConfigError(f"{auth_key} missing: make the node key with `peft-client keygen --out {options.key_dir}`")
    if options.root_cert is None:
        log.warning("connecting WITHOUT TLS (--insecure): deltas travel in plaintext; loopback/lab only")
    elif not options.root_cert.is_file():
        raise ConfigError(f"--root-cert {options.root_cert}: no such file")
    options.workdir.mkdir(parents=True, exist_ok=True)
    threads = options.torch_threads or max(1, (os.cpu_count() or 2) // 2)
    split_ca = options.split_ca or options.root_cert
    if options.split_server and split_ca is not None and not Path(split_ca).is_file():
        raise ConfigError(f"--split-ca {split_ca}: no such file")
    setup = ClientSetup(model_dir=str(model_dir), quantize=quantize, data=lambda _ctx: rows, torch_threads=threads,
                        split_server=options.split_server, split_ca=str(split_ca) if split_ca else None)
    server_x25519 = None
    if options.server_key is not None:
        if identity is None:
            raise ConfigError("--server-key needs --keys (the identity that signs the sealed deltas)")
        try:
            server_x25519 = PublicKeys.from_json(options.server_key.read_text(encoding="utf-8")).x25519
        except (OSError, UnicodeDecodeError, ConfigError) as exc:
            raise ConfigError(f"--server-key {options.server_key}: {exc}") from exc
    state = TrainerState(setup=setup, rows=rows, partition=partition, identity=identity, server_x25519=server_x25519)
    sock = _socket_path(options.workdir)
    server = serve_trainer(state, socket_address(sock))
    log.info("client %s: %d local examples from %s, model %s (%s); trainer on %s",
             identity.public_keys.key_id if identity else "(no identity)", len(rows), options.data, options.model,
             quantize, sock)
    cmd = supernode_command(superlink=options.superlink, root_cert=options.root_cert, auth_key=auth_key,
                            clientappio_port=options.clientappio_port,
                            node_config={"trainer-address": socket_address(sock),
                                         # where error-feedback residuals outlive a restart (fedpeft.common.codecs.feedback)
                                         STATE_DIR_KEY: str((options.workdir / "state").resolve()),
                                         # declared only when known: the server orders per-client ranks by it
                                         **({"partition-id": partition} if declared else {}),
                                         # what fedpeft.simulations.harness.inprocess_client_app needs (the benchmark's baseline)
                                         "model-dir": str(model_dir), "quantize": quantize, "data": _absolute(options.data),
                                         "data-seed": options.seed, "torch-threads": threads})
    try:
        code = _supervise(cmd, flower_env(options.workdir / "flwr-home"), options.once, options.superlink)
    finally:
        server.stop(grace=5)
    log.info("client stopped after %d trained round(s)", state.rounds_trained)
    return code


LINK_PROBE_S = 2.0
RESTARTED = object()
"""`_wait_watching_link`'s answer when it stopped a SuperNode whose SuperLink restarted."""


def _reachable(address: str, timeout: float = 1.0) -> bool:
    """Whether a TCP connection to HOST:PORT opens (the SuperLink is up)."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def _wait_watching_link(node: subprocess.Popen[bytes], superlink: str, stopping: threading.Event) -> object:
    """Wait for the SuperNode to exit; returns its exit code, or `RESTARTED` after stopping it
    because its SuperLink went away and came back while it ran.

    A SuperLink restart (a coordinator restarted with `--resume`) forgets every node. A
    SuperNode that was idle exits and is restarted below; one that held a message when the
    link died keeps retrying against a link that answers 401 and never exits (Flower 1.41),
    so the client would sit out the rest of the run. Watching the link from here covers it.
    """
    link_lost = False
    while True:
        try:
            return node.wait(timeout=LINK_PROBE_S)
        except subprocess.TimeoutExpired:
            pass
        if stopping.is_set():
            continue
        if not _reachable(superlink):
            link_lost = True
        elif link_lost:
            log.warning("the SuperLink at %s went away and is back: restarting the SuperNode (a restarted SuperLink "
                        "does not know it)", superlink)
            node.terminate()
            try:
                node.wait(timeout=15)
            except subprocess.TimeoutExpired:
                node.kill()
                node.wait()
            return RESTARTED


def _supervise(cmd: list[str], env: dict[str, str], once: bool, superlink: str) -> int:
    """Keep a SuperNode connected: Flower's SuperNode exits when its SuperLink goes away
    (a coordinator restart, `peft-server run --resume`), so restart it with backoff while
    the trainer (and its loaded model) stays up. SIGTERM/Ctrl-C stop both. A SuperNode
    that keeps failing right away (unregistered key, wrong CA) ends the client with an error."""
    stopping = threading.Event()
    node: subprocess.Popen[bytes] | None = None

    def stop(*_: object) -> None:  # signal handler: no waiting here (the main loop waits)
        stopping.set()
        if node is not None and node.poll() is None:
            os.kill(node.pid, signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, stop)
    backoff, quick_failures = RECONNECT_MIN_S, 0
    try:
        while True:
            started = time.monotonic()
            node = start_process(cmd, env, own_group=False)  # a signal to peft-client's group reaches it
            try:
                outcome = _wait_watching_link(node, superlink, stopping)
            except KeyboardInterrupt:
                stop()
                outcome = node.wait()
            if stopping.is_set():
                return 0
            if outcome is RESTARTED:
                if once:
                    return 0
                backoff, quick_failures = RECONNECT_MIN_S, 0
                continue
            code = int(outcome)  # type: ignore[call-overload]
            lived = time.monotonic() - started
            if once:
                if code != 0:
                    raise FederationError(f"SuperNode exited with code {code} (not registered? wrong CA? SuperLink gone?)")
                return 0
            quick_failures = quick_failures + 1 if code != 0 and lived < QUICK_EXIT_S else 0
            if quick_failures >= MAX_QUICK_FAILURES:
                raise FederationError(f"SuperNode failed {quick_failures} times in a row within {QUICK_EXIT_S:.0f} s of "
                                      f"starting (last exit code {code}): see its log above (not registered? wrong CA?)")
            backoff = RECONNECT_MIN_S if lived > 60 else min(backoff * 2, RECONNECT_MAX_S)
            log.warning("SuperNode exited (code %s); reconnecting in %.0f s (Ctrl-C to stop)", code, backoff)
            if stopping.wait(backoff):
                return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
