"""One assembly: a validated `RunSpec` in, the server side and the client side of a federation out.

`peft-sim` and the deployment ServerApp both call `assemble`; everything a setting
changes is decided here once (the model, the task data, the method options the topology
implies, the aggregation mode and its LoRA scale, per-client ranks, DP, SecAgg+, sealed
envelopes, publishing), so a setting cannot be honoured by one driver and dropped by
the other. Nothing is written to the run dir before every input has been checked.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedpeft.common.data.partition import PartitionSpec, partition_records
from fedpeft.common.data.records import Record
from fedpeft.common.errors import ConfigError
from fedpeft.common.files import write_json_atomic
from fedpeft.common.methods import make_config
from fedpeft.common.model.adapted import AdaptedModel, check_method_applies
from fedpeft.common.model.base_model import resolve_model_dir
from fedpeft.common.model.quantization import resolve_quantize, validate_quantize
from fedpeft.server.app import ServerSetup
from fedpeft.server.federation.spec import SERVER_ADAM, Driver, RunSpec
from fedpeft.server.federation.task_data import TaskData, load_task_data
from fedpeft.server.federation.topologies import ModelContext, SplitEndpoint, Topology, topology_for

if TYPE_CHECKING:
    from fedpeft.client.app import ClientSetup, DataProvider

log = logging.getLogger("fedpeft.server")
SPEC_FILE = "run-spec.json"
"""The resolved spec a run dir was started with (what `peft-sim --resume` reads back)."""


@dataclass
class Federation:
    """An assembled federation: hand `server` to `run_federation`, build clients with `client_setup`."""

    spec: RunSpec
    run_dir: Path
    data: TaskData
    models: ModelContext
    topology: Topology
    server: ServerSetup
    partitions: list[list[Record]]
    """Simulation: each virtual client's rows (partition k is client k's); empty in a deployment."""

    def start(self, endpoint: SplitEndpoint | None = None) -> None:
        """Start the topology's services (split: the split server at `endpoint`)."""
        self.topology.start(self.spec, self.models, self.run_dir, endpoint)

    def stop(self) -> None:
        self.topology.stop()

    def client_setup(self, data: DataProvider, torch_threads: int = 1) -> ClientSetup:
        """What an in-process client of this federation holds (the simulation's virtual clients)."""
        from fedpeft.client.app import ClientSetup

        endpoint = self.topology.client_endpoint()
        return ClientSetup(model_dir=str(self.models.model_dir), quantize=self.models.quantize, data=data,
                           torch_threads=torch_threads, split_server=endpoint[0] if endpoint else None,
                           split_ca=endpoint[1] if endpoint else None)


RESUMABLE_CHANGES = frozenset({"federation.rounds", "task.eval_every"})
"""What a resumed run may change: how many rounds it runs in all (a non-constant server
rate schedule then checks its past rates, `fedpeft.server.app`), and how often it scores."""


def check_run_dir(run_dir: Path, spec: RunSpec, resume: bool) -> None:
    """A new run needs a run dir without one; a resumed run must keep the spec it was started with."""
    saved_path = run_dir / SPEC_FILE
    if not resume:
        if (run_dir / "metrics.jsonl").exists():
            raise ConfigError(f"{run_dir} already holds a run; resume it or pick a new run dir")
        return
    if not saved_path.is_file():
        log.warning("%s has no %s (a run dir from an older fedpeft): its settings cannot be compared", run_dir, SPEC_FILE)
        return
    try:
        saved = json.loads(saved_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot resume {run_dir}: {saved_path} is unreadable ({exc})") from exc
    now = spec.to_dict()
    changed = sorted(f"{section}.{key}" for section, values in now.items() for key, value in values.items()
                     if f"{section}.{key}" not in RESUMABLE_CHANGES
                     and (saved.get(section) or {}).get(key, value) != value)
    if changed:
        raise ConfigError(f"cannot resume {run_dir} with other settings than it was started with: {', '.join(changed)} "
                          f"differ from {saved_path} (only {', '.join(sorted(RESUMABLE_CHANGES))} may change)")


def assemble(spec: RunSpec, driver: Driver, run_dir: Path, *, resume: bool = False,
             on_complete: Callable[[AdaptedModel], None] | None = None) -> Federation:
    """Validate `spec` for `driver` and build its federation in `run_dir`."""
    spec.validate(driver)
    f = spec.federation
    quantize = validate_quantize(resolve_quantize(f.quantize))
    full_model_dir = resolve_model_dir(f.model)
    data = load_task_data(spec.task, f.seed, with_train=driver == "simulation")
    partitions: list[list[Record]] = []
    if driver == "simulation":  # the virtual clients' data, split before anything is written
        partitions = partition_records(data.train_rows, f.clients, PartitionSpec.parse(spec.task.partition),
                                       data.task.label_column, f.seed)
    topology = topology_for(spec.topology)
    method_options = topology.plan_layers(spec, full_model_dir, spec.method_options())
    method_config = make_config(f.method, method_options)
    check_method_applies(full_model_dir, f.method, method_config, num_labels=data.task.num_labels, quantize=quantize)
    run_dir = Path(run_dir).resolve()
    # What the run dir records: the quantization, the clients' optimizer, learning rate and local
    # steps, and the server's strategy and its options as they actually run (the recipe resolved).
    train = spec.train_config()
    recorded: dict[str, Any] = {"federation.quantize": quantize, "training.optimizer": train.optimizer,
                                "training.learning_rate": train.learning_rate, "training.local_steps": train.local_steps}
    if "total_step" in method_options and "total_step" not in f.method_options:
        # AdaLoRA's schedule derived from rounds x local steps: recorded, so a resume that changes
        # the rounds is refused rather than silently moving the schedule under finished rounds
        recorded["federation.method_options"] = {**f.method_options, "total_step": int(method_options["total_step"])}
    if f.recipe == SERVER_ADAM:  # (only then: a local run dir keeps its options as given, as runs before recipes did)
        recorded |= {"federation.strategy": f.server_strategy, "federation.strategy_options": spec.server_strategy_options()}
    resolved = spec.with_overrides(recorded)
    check_run_dir(run_dir, resolved, resume)
    # Every input is checked: from here on the run dir is written.
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        write_json_atomic(run_dir / SPEC_FILE, resolved.to_dict())
    model_dir = topology.prepare(spec, full_model_dir, run_dir)
    envelopes = None
    if spec.envelopes.enabled:
        from fedpeft.common.security.envelope import PeerIdentity
        from fedpeft.server.sealed_replies import load_trusted_clients

        envelopes = (PeerIdentity.load(Path(str(spec.envelopes.server_identity))),
                     load_trusted_clients(Path(str(spec.envelopes.trusted_clients))))
    server = ServerSetup(
        run_name=run_dir.name, base_model=str(model_dir) if model_dir != full_model_dir else f.model,
        model_dir=str(model_dir), full_model_dir=str(full_model_dir), quantize=quantize, method=f.method,
        method_config=method_config, task=data.task, train=train.plan_fields(), eval_rows=data.eval_rows,
        eval_every=spec.task.eval_every, out_dir=str(run_dir), num_rounds=f.rounds, num_clients=f.clients,
        clients_per_round=f.num_per_round,
        seed=f.seed, strategy=f.server_strategy, strategy_options=spec.server_strategy_options(),
        server_lr_schedule=f.server_lr_schedule,
        min_accepted=f.min_clients, clip_update_norm=f.clip_update_norm, scaffold=f.scaffold, robust=spec.reply_bounds(),
        round_timeout=f.round_timeout, resume=resume,
        # peft's own LoRA scale (alpha/r, or alpha/sqrt(r) with rsLoRA) is the ΔW scale the svd mode must use
        lora_svd_scaling=method_config.scaling if f.lora_aggregation == "svd" else None,  # type: ignore[attr-defined]
        hetero=spec.hetero_ranks(method_config),
        secagg=spec.secagg if spec.secagg.enabled else None,
        dp=spec.dp if spec.dp.enabled else None,
        envelopes=envelopes, publish=spec.registry_target(run_dir.name), topology=topology, on_complete=on_complete,
        compression=spec.compression_settings())
    return Federation(spec=spec, run_dir=run_dir, data=data, models=server.model_context(), topology=topology,
                      server=server, partitions=partitions)
