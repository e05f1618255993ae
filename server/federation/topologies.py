"""The federation topologies as plugins: what differs between fl, offsite and split, and nothing else.

Shared code (`fedpeft.server.app.run_federation`, the assembly, both drivers) calls one
small interface and never asks which topology it runs:

- `refusals(spec, driver)`: the options this topology cannot honour, refused up front;
- `prepare(...)`: where clients' model lives and the method options they train
  (offsite: builds the emulator, restricts LoRA to its adapter blocks);
- `start(...)` / `stop()`: services beside the federation (split: the shared split server);
- `server_model(...)`, `eval_model(...)`: the model holding the global delta, and the one scored;
- `plan_entry()`: what clients must know beyond the delta (split: cut, wire dtype, token);
- `checkpoint(...)` / `restore(...)`: state beyond the global delta (split: the server part);
- `round_metrics(row)`: traffic the topology adds to a round (split: activations);
- `finish(...)`: after the last round (offsite: plug-in and score; split: export the server part).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedpeft.common.errors import ConfigError
from fedpeft.common.model.adapted import AdaptedModel

if TYPE_CHECKING:
    from torch import nn

    from fedpeft.common.data.records import Record, TaskSpec
    from fedpeft.common.methods import MethodConfig
    from fedpeft.common.model.quantization import Quantize
    from fedpeft.common.offsite.layer_map import LayerMap
    from fedpeft.common.security.pki import TlsFiles
    from fedpeft.server.federation.spec import Driver, RunSpec
    from fedpeft.server.split_run import SplitRun

log = logging.getLogger("fedpeft.server")


@dataclass(frozen=True)
class SplitEndpoint:
    """Where a split server listens and with which TLS files (None: loopback without TLS)."""

    address: str
    tls: TlsFiles | None = None

    @classmethod
    def of(cls, spec: RunSpec, driver: Driver, run_dir: Path) -> SplitEndpoint:
        """The `[split]` host, port and TLS dir, with each driver's default for what is left out
        (deployment: port 9095, no TLS on loopback; simulation: a free port, run-local dev certificates)."""
        from fedpeft.common.security.pki import TlsFiles, make_dev_certificates
        from fedpeft.server.federation.spec import DEFAULT_SPLIT_PORT

        sp = spec.split
        host = f"[{sp.host}]" if ":" in sp.host else sp.host
        port = sp.port if sp.port is not None else (DEFAULT_SPLIT_PORT if driver == "deployment" else 0)
        if sp.tls_dir is not None:
            tls: TlsFiles | None = TlsFiles.in_dir(Path(sp.tls_dir))
        elif driver == "simulation":
            tls = make_dev_certificates(Path(run_dir) / "split-tls", overwrite=True)
        else:
            tls = None
        return cls(address=f"{host}:{port}", tls=tls)


@dataclass(frozen=True)
class ModelContext:
    """What a topology needs to build the server's models (resolved by the assembly)."""

    model_dir: Path
    """The model clients hold (offsite: the emulator)."""
    full_model_dir: Path
    """The model the federation fine-tunes (the owner's full model)."""
    quantize: Quantize
    method: str
    method_config: MethodConfig
    seed: int
    num_labels: int | None


class Topology:
    """Plain federated learning: every client holds the whole model (the default behaviour of each hook)."""

    name = "fl"

    def refusals(self, spec: RunSpec, driver: Driver) -> list[str]:
        return []

    def plan_layers(self, spec: RunSpec, full_model_dir: Path, options: dict[str, str]) -> dict[str, str]:
        """The method options clients train (checked before anything is written)."""
        return options

    def prepare(self, spec: RunSpec, full_model_dir: Path, run_dir: Path) -> Path:
        """Build what clients hold; returns their model dir."""
        return full_model_dir

    def start(self, spec: RunSpec, models: ModelContext, run_dir: Path, endpoint: SplitEndpoint | None) -> None:
        """Start services that run beside the federation."""

    def client_endpoint(self) -> tuple[str, str | None] | None:
        """(HOST:PORT, CA certificate) of a service clients must reach, if any."""
        return None

    def server_model(self, models: ModelContext) -> AdaptedModel:
        return AdaptedModel.load(models.model_dir, models.quantize, models.method, models.method_config,
                                 seed=models.seed, num_labels=models.num_labels)

    def eval_model(self, adapted: AdaptedModel) -> nn.Module:
        return adapted.model

    def plan_entry(self) -> dict[str, Any]:
        return {}

    def checkpoint(self, checkpoint_dir: Path, server_round: int) -> None:
        """Save state beyond the global delta after `server_round`."""

    def restore(self, checkpoint_dir: Path, server_round: int) -> None:
        """Restore what `checkpoint` saved (resuming a run)."""

    def round_metrics(self, row: dict[str, Any]) -> None:
        """Add this topology's traffic and figures to a round's metrics row."""

    def finish(self, final_dir: Path, models: ModelContext, task: TaskSpec, eval_rows: list[Record],
               max_length: int) -> dict[str, Any] | None:
        """After the last round; returns extra results (or None)."""
        return None

    def stop(self) -> None:
        """Stop what `start` started (always called)."""


class OffsiteTopology(Topology):
    """Offsite-Tuning: clients hold a compressed emulator and train LoRA on its adapter blocks;
    the final adapter is plugged into the full model and scored there."""

    name = "offsite"

    def __init__(self) -> None:
        self.layer_map: LayerMap | None = None
        self.base_model = ""
        """How the owner names its full model (recorded in the plugged-in adapter)."""

    def refusals(self, spec: RunSpec, driver: Driver) -> list[str]:
        from fedpeft.common.offsite.run import OFFSITE_METHODS

        found = spec.offsite.problems()
        if spec.federation.method not in OFFSITE_METHODS:
            found.append(f"federation.topology 'offsite' trains the adapter blocks with {list(OFFSITE_METHODS)}, "
                         f"not method {spec.federation.method!r}")
        if spec.registry.enabled:
            found.append("registry: an offsite run's rounds train the emulator's adapter blocks, which do not serve the "
                         "full model; publish the plugged-in adapter (run_dir/plugged) with peft-server publish")
        return found

    def plan_layers(self, spec: RunSpec, full_model_dir: Path, options: dict[str, str]) -> dict[str, str]:
        from fedpeft.common.offsite.run import adapter_method_options, plan_layers

        return adapter_method_options(spec.federation.method, options, plan_layers(full_model_dir, spec.offsite))

    def prepare(self, spec: RunSpec, full_model_dir: Path, run_dir: Path) -> Path:
        from fedpeft.common.offsite.run import prepare_emulator

        self.base_model = spec.federation.model
        model_dir, self.layer_map = prepare_emulator(full_model_dir, run_dir, spec.offsite, spec.federation.seed,
                                                     spec.training.max_length)
        log.info("offsite: clients hold the emulator %s (%d of %d blocks; adapter blocks %s = full blocks %s)",
                 model_dir, self.layer_map.emulator_layers, self.layer_map.full_layers, list(self.layer_map.adapter),
                 [self.layer_map.to_full(i) for i in self.layer_map.adapter])
        return model_dir

    def finish(self, final_dir: Path, models: ModelContext, task: TaskSpec, eval_rows: list[Record],
               max_length: int) -> dict[str, Any] | None:
        from fedpeft.common.offsite.layer_map import read_layer_map
        from fedpeft.common.offsite.run import evaluate_plug_in

        metrics = evaluate_plug_in(models.full_model_dir, final_dir, read_layer_map(models.model_dir), models.quantize,
                                   task, eval_rows, max_length, final_dir.parent, base_model=self.base_model)
        log.info("offsite: full-model adapter in %s", metrics["plugged_adapter"])
        return metrics


class SplitTopology(Topology):
    """Split fine-tuning (SplitFed): clients hold embeddings + the first `cut` blocks and train
    against one shared split server; FedAvg averages the client parts' LoRA."""

    name = "split"

    def __init__(self) -> None:
        self.run: SplitRun | None = None
        self._traffic = [0, 0]  # the split server's (bytes in, bytes out) when the last round was recorded

    def refusals(self, spec: RunSpec, driver: Driver) -> list[str]:
        from fedpeft.server.federation.spec import LOCAL, LOOPBACK_HOSTS, SPLIT_WIRE_DTYPES
        from fedpeft.server.rate_schedule import CONSTANT

        sp, f = spec.split, spec.federation
        found = []
        if isinstance(sp.cut, bool) or sp.cut < 1:
            found.append(f"split.cut must be an integer >= 1 (got {sp.cut!r})")
        if sp.wire_dtype not in SPLIT_WIRE_DTYPES:
            found.append(f"split.wire_dtype {sp.wire_dtype!r}: choose one of {list(SPLIT_WIRE_DTYPES)}")
        if f.method != "lora" or f.lora_aggregation not in ("naive", "ffa"):
            found.append("split: both parts train LoRA (federation.method 'lora', lora_aggregation 'naive' or 'ffa')")
        if f.strategy == "fedprox":
            found.append("split: strategy 'fedprox' is not supported (the split client's loss has no proximal term); "
                         "use fedavg, or bound updates with federation.clip_update_norm")
        if f.recipe != LOCAL:
            found.append(f"split: federation.recipe {f.recipe!r} is not supported (the split server trains its part "
                         "with AdamW at the clients' rate); use recipe 'local'")
        if f.server_lr_schedule != CONSTANT:
            found.append(f"split: federation.server_lr_schedule {f.server_lr_schedule!r} is not supported (the split "
                         "server trains its part with AdamW at a constant rate); use 'constant'")
        elif spec.training.optimizer != "adamw":
            found.append(f"split: training.optimizer {spec.training.optimizer!r} is not supported (the split server "
                         "trains its part with AdamW, and checkpoints AdamW's state); use adamw")
        if spec.dp.enabled:
            found.append("split and dp cannot be combined: the split server sees every client's raw activations")
        if spec.registry.enabled:
            found.append("registry: a split run's global delta is the client part only (the server part is exported "
                         "beside it); serving cannot publish it per round")
        if not (sp.max_abs_activation >= 0 and math.isfinite(sp.max_abs_activation)):
            found.append(f"split.max_abs_activation must be a finite number >= 0 (got {sp.max_abs_activation})")
        if sp.port is not None and not 1 <= sp.port <= 65535:
            found.append(f"split.port must be in 1..65535 (got {sp.port})")
        if sp.tls_dir is not None and not Path(sp.tls_dir).is_dir():
            found.append(f"split.tls_dir: directory {sp.tls_dir} does not exist")
        if sp.host not in LOOPBACK_HOSTS:
            if driver == "simulation":
                found.append(f"split.host {sp.host!r}: a simulation's clients run on this machine; use a loopback host")
            elif sp.tls_dir is None:
                found.append(f"split.tls_dir is required: split.host {sp.host!r} is not loopback")
        return found

    def plan_layers(self, spec: RunSpec, full_model_dir: Path, options: dict[str, str]) -> dict[str, str]:
        from fedpeft.common.model.split import SplitConfig, check_split

        check_split(full_model_dir, SplitConfig(cut=spec.split.cut, u_shaped=spec.split.u_shaped), spec.federation.method)
        return options

    def start(self, spec: RunSpec, models: ModelContext, run_dir: Path, endpoint: SplitEndpoint | None) -> None:
        from fedpeft.common.model.split import SplitConfig
        from fedpeft.server.split_run import start_split_run

        if endpoint is None:
            raise ConfigError("the split topology needs an address for its split server")
        split = SplitConfig(cut=spec.split.cut, u_shaped=spec.split.u_shaped)
        self.run = start_split_run(models.model_dir, split, models.method_config, models.quantize,
                                   learning_rate=spec.train_config().learning_rate, address=endpoint.address,
                                   tls=endpoint.tls, seed=models.seed, wire_dtype=spec.split.wire_dtype,
                                   max_abs_activation=spec.split.max_abs_activation)
        log.info("split: clients hold blocks 0-%d%s; split server at %s (TLS %s)", split.cut - 1,
                 " + head (U-shaped)" if split.u_shaped else "", self.run.target, "on" if endpoint.tls else "off")

    def _require_run(self) -> SplitRun:
        if self.run is None:
            raise ConfigError("the split server was not started (Topology.start)")
        return self.run

    def client_endpoint(self) -> tuple[str, str | None] | None:
        run = self._require_run()
        return run.target, str(run.ca_cert) if run.ca_cert else None

    def server_model(self, models: ModelContext) -> AdaptedModel:
        from fedpeft.server.split_run import global_client_part

        return global_client_part(self._require_run(), models.model_dir, models.method_config, models.quantize, models.seed)

    def eval_model(self, adapted: AdaptedModel) -> nn.Module:
        from fedpeft.server.split_run import joined_eval_model

        return joined_eval_model(self._require_run(), adapted)

    def plan_entry(self) -> dict[str, Any]:
        return self._require_run().plan_entry()

    def checkpoint(self, checkpoint_dir: Path, server_round: int) -> None:
        from fedpeft.server.split_run import save_server_state, server_state_path

        save_server_state(self._require_run(), server_state_path(checkpoint_dir, server_round), server_round)

    def restore(self, checkpoint_dir: Path, server_round: int) -> None:
        from fedpeft.server.split_run import load_server_state, server_state_path

        load_server_state(self._require_run(), server_state_path(checkpoint_dir, server_round))

    def round_metrics(self, row: dict[str, Any]) -> None:
        server = self._require_run().server
        now = [server.bytes_in, server.bytes_out]
        row["split_bytes_up"], row["split_bytes_down"] = now[0] - self._traffic[0], now[1] - self._traffic[1]
        row["bytes_up"] += row["split_bytes_up"]
        row["bytes_down"] += row["split_bytes_down"]
        self._traffic = now

    def finish(self, final_dir: Path, models: ModelContext, task: TaskSpec, eval_rows: list[Record],
               max_length: int) -> dict[str, Any] | None:
        from fedpeft.server.split_run import export_server_part

        export_server_part(self._require_run(), final_dir / "server-part")
        return None

    def stop(self) -> None:
        if self.run is not None:
            self.run.stop()


_TOPOLOGIES: dict[str, type[Topology]] = {"fl": Topology, "offsite": OffsiteTopology, "split": SplitTopology}


def topology_for(name: str) -> Topology:
    """A fresh plugin for topology `name` (its state lives for one run)."""
    if name not in _TOPOLOGIES:
        raise ConfigError(f"topology {name!r} is not one of {sorted(_TOPOLOGIES)}")
    return _TOPOLOGIES[name]()
