"""SplitFed on the coordinator: the shared split server beside the Flower run.

The split server (one server part shared by every client) listens on its own gRPC port;
clients train their client parts against it during a round, and Flower's FedAvg then
averages the client parts' LoRA like any other delta. The coordinator holds a copy of
the client part for the global delta and evaluates it joined with the live server part.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from torch import nn

from fedpeft.common.adapted_model import AdaptedModel
from fedpeft.common.methods import MethodConfig, get_method
from fedpeft.common.models import load_tokenizer, model_fingerprint
from fedpeft.common.pki import TlsFiles
from fedpeft.common.quantization import Quantize
from fedpeft.common.split_model import JoinedSplitModel, SplitConfig, load_client_part, load_server_part
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
        """What the federation plan tells clients about the split."""
        return {"cut": self.split.cut, "u_shaped": self.split.u_shaped, "wire_dtype": self.wire_dtype}

    def stop(self) -> None:
        self.grpc_server.stop(grace=5)


def start_split_run(model_dir: Path, split: SplitConfig, method_config: MethodConfig, quantize: Quantize, *,
                    learning_rate: float, address: str = "127.0.0.1:0", tls: TlsFiles | None = None, seed: int = 0,
                    wire_dtype: str = "bfloat16", public_host: str | None = None) -> SplitRun:
    """Load the server part and serve it; `public_host` is the name clients dial (default: the bind host)."""
    part = load_server_part(Path(model_dir), split, method_config, quantize=quantize, seed=seed)
    server = SplitServer(part=part, model_fingerprint=model_fingerprint(Path(model_dir)), learning_rate=learning_rate)
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
    from fedpeft.common.split_model import ClientPart

    client = ClientPart(model=adapted.model, blocks=range(run.split.cut), split=run.split,
                        delta_names=adapted.delta_names, spec=adapted.spec)
    return JoinedSplitModel(client, run.server.part)


def export_server_part(run: SplitRun, out_dir: Path) -> Path:
    """Write the server part's LoRA (peft format) beside the client part's final adapter."""
    out_dir.mkdir(parents=True, exist_ok=True)
    run.server.part.model.save_pretrained(str(out_dir))
    log.info("server part adapter (blocks %d-%d, %d steps) written to %s", run.split.cut,
             run.server.part.blocks.stop - 1, run.server.steps, out_dir)
    return out_dir
