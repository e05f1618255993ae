"""SplitFed on the coordinator: the shared split server beside the Flower run.

The split server (one server part shared by every client) listens on its own gRPC port;
clients train their client parts against it during a round, and Flower's FedAvg then
averages the client parts' LoRA like any other delta. The coordinator holds a copy of
the client part for the global delta and evaluates it joined with the live server part.
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from torch import nn

from fedpeft.common.errors import FederationError
from fedpeft.common.files import atomic_write_bytes
from fedpeft.common.methods import MethodConfig, get_method
from fedpeft.common.model.adapted import AdaptedModel
from fedpeft.common.model.base_model import load_tokenizer, model_fingerprint
from fedpeft.common.model.quantization import Quantize
from fedpeft.common.model.split import (
    MAX_ABS_ACTIVATION,
    JoinedSplitModel,
    SplitConfig,
    load_client_part,
    load_server_part,
)
from fedpeft.common.security.pki import TlsFiles
from fedpeft.server.split_service import SplitServer, serve_split

log = logging.getLogger("fedpeft.server.split")


@dataclass
class SplitRun:
    """A running split server and what clients need to reach it."""

    server: SplitServer
    grpc_server: grpc.Server
    target: str
    """HOST:PORT clients connect to."""
    ca_cert: Path | None
    wire_dtype: str = "bfloat16"

    @property
    def split(self) -> SplitConfig:
        return self.server.part.split

    def plan_entry(self) -> dict[str, object]:
        """What the federation plan tells clients about the split (with the run's access token)."""
        entry: dict[str, object] = {"cut": self.split.cut, "u_shaped": self.split.u_shaped, "wire_dtype": self.wire_dtype}
        if self.server.access_token:
            entry["token"] = self.server.access_token
        return entry

    def stop(self) -> None:
        self.grpc_server.stop(grace=5)


def start_split_run(model_dir: Path, split: SplitConfig, method_config: MethodConfig, quantize: Quantize, *,
                    learning_rate: float, address: str = "127.0.0.1:0", tls: TlsFiles | None = None, seed: int = 0,
                    wire_dtype: str = "bfloat16", public_host: str | None = None,
                    max_abs_activation: float = MAX_ABS_ACTIVATION) -> SplitRun:
    """Load the server part and serve it; `public_host` is the name clients dial (default: the bind host)."""
    part = load_server_part(Path(model_dir), split, method_config, quantize=quantize, seed=seed)
    server = SplitServer(part=part, model_fingerprint=model_fingerprint(Path(model_dir)), learning_rate=learning_rate,
                         access_token=secrets.token_urlsafe(32), max_abs_activation=max_abs_activation)
    grpc_server, port = serve_split(server, address, tls)
    host = public_host or address.rsplit(":", 1)[0]
    return SplitRun(server=server, grpc_server=grpc_server, target=f"{host}:{port}",
                    ca_cert=Path(tls.ca_cert) if tls else None, wire_dtype=wire_dtype)


def global_client_part(run: SplitRun, model_dir: Path, method_config: MethodConfig, quantize: Quantize,
                       seed: int) -> AdaptedModel:
    """The coordinator's copy of the client part, wrapped as an `AdaptedModel` so the Flower
    strategy, checkpoints and export handle its delta like any other."""
    start = time.perf_counter()
    part = load_client_part(Path(model_dir), run.split, method_config, quantize=quantize, seed=seed)
    return AdaptedModel(model_dir=Path(model_dir), quantize=quantize, method=get_method("lora"), config=method_config,
                        model=part.model, tokenizer=load_tokenizer(Path(model_dir)), delta_names=part.delta_names,
                        spec=part.spec, load_seconds=time.perf_counter() - start)


def joined_eval_model(run: SplitRun, adapted: AdaptedModel) -> nn.Module:
    """The global client part and the shared server part as one causal LM (for evaluation)."""
    from fedpeft.common.model.split import ClientPart

    client = ClientPart(model=adapted.model, blocks=range(run.split.cut), split=run.split,
                        delta_names=adapted.delta_names, spec=adapted.spec)
    return JoinedSplitModel(client, run.server.part)


def server_state_path(checkpoint_dir: Path, server_round: int) -> Path:
    """Where the split server's state after `server_round` is checkpointed (beside the global deltas)."""
    return Path(checkpoint_dir) / f"split-server-round-{server_round:04d}.safetensors"


def save_server_state(run: SplitRun, path: Path, server_round: int) -> Path:
    """Checkpoint the shared server part (its LoRA, AdamW state and step count) after a
    round, atomically: `--resume` restarts it from here rather than from scratch."""
    from safetensors.torch import save

    tensors, metadata = run.server.state_tensors()
    atomic_write_bytes(Path(path), save(tensors, metadata={**metadata, "round": str(server_round)}))
    return Path(path)


def load_server_state(run: SplitRun, path: Path) -> None:
    """Restore the server part from `save_server_state`'s file (resuming a split run)."""
    from safetensors import SafetensorError, safe_open

    if not Path(path).is_file():
        raise FederationError(f"cannot resume the split server: {path} is missing (the run's checkpoint of its "
                              "server part for the last completed round)")
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = dict(fh.metadata() or {})
            tensors = {name: fh.get_tensor(name) for name in fh.keys()}  # noqa: SIM118  (safe_open is no Mapping)
    except (SafetensorError, OSError) as exc:
        raise FederationError(f"cannot resume the split server: {path} is unreadable ({exc})") from exc
    run.server.load_state_tensors(tensors, metadata, source=str(path))
    log.info("split server resumed from %s (%d server steps so far)", path, run.server.steps)


def export_server_part(run: SplitRun, out_dir: Path) -> Path:
    """Write the server part's LoRA (peft format) beside the client part's final adapter."""
    out_dir.mkdir(parents=True, exist_ok=True)
    run.server.part.model.save_pretrained(str(out_dir))
    log.info("server part adapter (blocks %d-%d, %d steps) written to %s", run.split.cut,
             run.server.part.blocks.stop - 1, run.server.steps, out_dir)
    return out_dir
