"""Run one federated PEFT fine-tuning simulation on Flower's Simulation Engine (Ray).

Top to bottom: resolve the model, load and partition the data, write each client's
partition, start Flower with our ServerApp and ClientApp, then report.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedpeft.client.app import ClientSetup, build_client_app
from fedpeft.client.training import TrainConfig
from fedpeft.common.data.builtin_task import builtin_splits, builtin_task
from fedpeft.common.data.partition import PartitionSpec, partition_records
from fedpeft.common.data.records import Record, TaskSpec, infer_task, parse_verbalizer, read_records
from fedpeft.common.errors import FederationError
from fedpeft.common.files import write_json_atomic
from fedpeft.common.logs import apply_offline_env, setup_logging
from fedpeft.common.methods import make_config
from fedpeft.common.model.adapted import AdaptedModel, check_method_applies
from fedpeft.common.model.base_model import resolve_model_dir
from fedpeft.common.model.split import SplitConfig, check_split
from fedpeft.common.offsite.run import adapter_method_options, evaluate_plug_in, plan_layers, prepare_emulator
from fedpeft.common.security.pki import make_dev_certificates
from fedpeft.server.app import ServerSetup, build_server_app
from fedpeft.server.split_run import start_split_run
from fedpeft.simulations.client_data import PartitionFiles, write_partitions
from fedpeft.simulations.config import SimulationConfig, resolve_quantize
from fedpeft.simulations.ray_runtime import run_flower_simulation
from fedpeft.simulations.report import (
    before_after_table,
    offsite_table,
    overhead_line,
    plot_metrics,
    read_metrics,
    rounds_table,
)

log = logging.getLogger("fedpeft.sim")
HELD_OUT_FRACTION = 0.1


@dataclass(frozen=True)
class SimulationResult:
    out_dir: Path
    rows: list[dict[str, Any]]
    offsite: dict[str, Any] | None = None
    """Offsite topology: full model zero-shot and plug-in metrics (`offsite-metrics.json`)."""

    @property
    def final_dir(self) -> Path:
        return self.out_dir / "final"


def load_task_data(config: SimulationConfig) -> tuple[TaskSpec, list[Record], list[Record]]:
    """Task spec, training rows and held-out rows for `config`."""
    rng = random.Random(config.seed)
    if config.data is None:
        train, held_out = builtin_splits(config.builtin_train_rows, max(config.eval_limit, 200), config.seed)
        task = builtin_task()
        if config.labels or config.template:
            task = TaskSpec(kind="classification", template=config.template or task.template,
                            verbalizer=parse_verbalizer(config.labels) if config.labels else task.verbalizer)
    else:
        train = read_records(Path(config.data))
        task = infer_task(train, kind=config.task, template=config.template, labels=config.labels,
                          label_column=config.label_column)
        if config.eval_data:
            held_out = read_records(Path(config.eval_data))
        else:  # no separate file: hold out a seeded share of the data on the server
            rng.shuffle(train)
            cut = max(1, int(len(train) * HELD_OUT_FRACTION))
            held_out, train = train[:cut], train[cut:]
            log.info("no --eval-data: holding out %d of %d rows for evaluation", cut, cut + len(train))
    if config.train_limit and len(train) > config.train_limit:
        train = rng.sample(train, config.train_limit)
    if config.eval_limit and len(held_out) > config.eval_limit:
        held_out = rng.sample(held_out, config.eval_limit)
    task.check_rows(train, config.data or "built-in training data")
    task.check_rows(held_out, config.eval_data or config.data or "built-in held-out data")
    return task, train, held_out


def describe_partitions(partitions: list[list[Record]], task: TaskSpec) -> list[dict[str, Any]]:
    out = []
    for i, rows in enumerate(partitions):
        entry: dict[str, Any] = {"client": i, "examples": len(rows)}
        if task.kind == "classification":
            entry["labels"] = dict(sorted(Counter(str(r[task.label_column]) for r in rows).items()))
        out.append(entry)
    return out


def run_simulation(config: SimulationConfig,
                   on_complete: Callable[[AdaptedModel], None] | None = None) -> SimulationResult:
    """Run the whole simulation described by `config`; returns the run dir and metrics.

    `on_complete` receives the server's in-process model with the final adapter.
    """
    if config.resume:
        config = SimulationConfig.from_run_dir(Path(config.resume))
    config.validate()
    apply_offline_env()
    setup_logging()
    quantize = resolve_quantize(config.quantize)
    # Everything that can be wrong with the inputs is checked before any process starts.
    task, train_rows, eval_rows = load_task_data(config)
    partition = PartitionSpec.parse(config.partition)
    partitions = partition_records(train_rows, config.clients, partition, task.label_column, config.seed)
    model_dir = resolve_model_dir(config.model)
    method_options = config.effective_method_options()
    offsite = config.offsite_settings() if config.topology == "offsite" else None
    if offsite is not None:  # clients train LoRA on the adapter blocks of an emulator built below
        method_options = adapter_method_options(config.method, method_options, plan_layers(model_dir, offsite))
    method_config = make_config(config.method, method_options)
    check_method_applies(model_dir, config.method, method_config, num_labels=task.num_labels, quantize=quantize)  # type: ignore[arg-type]

    split = SplitConfig(cut=config.split_cut, u_shaped=config.split_u_shaped) if config.topology == "split" else None
    if split is not None:
        check_split(model_dir, split, config.method)

    out_dir = config.out_dir().resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    full_model_dir = model_dir
    if offsite is not None:
        model_dir, layer_map = prepare_emulator(full_model_dir, out_dir, offsite, config.seed, config.max_length)
        log.info("offsite: clients get the emulator %s (%d of %d blocks; adapter blocks %s = full blocks %s)",
                 model_dir, layer_map.emulator_layers, layer_map.full_layers, list(layer_map.adapter),
                 [layer_map.to_full(i) for i in layer_map.adapter])
    if not config.resume:  # a resumed run keeps its settings and its clients' data files
        write_json_atomic(out_dir / "config.json", {**config.to_dict(), "quantize": quantize, "resume": None})
        write_partitions(partitions, out_dir / "partitions")
    clients = describe_partitions(partitions, task)
    write_json_atomic(out_dir / "clients.json", clients)
    log.info("model %s (%s) | method %s | %d clients (%s) | %d rounds | %d train / %d held-out rows",
             config.model, quantize, config.method, config.clients, partition, config.rounds,
             len(train_rows), len(eval_rows))
    for entry in clients:
        log.info("  client %d: %d examples %s", entry["client"], entry["examples"], entry.get("labels", ""))

    split_run = None
    if split is not None:  # the shared split server, in this process, on loopback TLS (run-local dev certificates)
        tls = make_dev_certificates(out_dir / "split-tls", overwrite=True)
        split_run = start_split_run(model_dir, split, method_config, quantize, learning_rate=config.learning_rate,  # type: ignore[arg-type]
                                    tls=tls, seed=config.seed, wire_dtype=config.split_wire_dtype)
        log.info("split topology: clients hold blocks 0-%d%s; split server at %s", split.cut - 1,
                 " + head (U-shaped)" if split.u_shaped else "", split_run.target)
    train = TrainConfig(local_steps=config.local_steps, local_epochs=config.local_epochs,
                        learning_rate=config.learning_rate, batch_size=config.batch_size,
                        max_length=config.max_length, log_every=config.log_every,
                        gradient_checkpointing=config.gradient_checkpointing)
    server = ServerSetup(
        run_name=out_dir.name, base_model=str(model_dir) if offsite else config.model, model_dir=str(model_dir),
        quantize=quantize,  # type: ignore[arg-type]
        method=config.method, method_config=method_config, task=task,
        train=train.plan_fields(), eval_rows=eval_rows, out_dir=str(out_dir), num_rounds=config.rounds,
        num_clients=config.clients, clients_per_round=config.num_per_round, seed=config.seed,
        strategy=config.strategy, strategy_options=dict(config.strategy_options), min_accepted=config.min_clients,
        on_complete=on_complete, clip_update_norm=config.clip_update_norm, resume=bool(config.resume),
        lora_svd_scaling=(method_config.scaling  # type: ignore[attr-defined]
                          if config.lora_aggregation == "svd" else None),
        hetero=config.hetero_ranks(method_config), dp=config.dp_section(), split=split_run,
        publish=config.registry_target(out_dir.name),
    )
    client = ClientSetup(model_dir=str(model_dir), quantize=quantize, data=PartitionFiles(str(out_dir / "partitions")),
                         torch_threads=max(1, int(config.cpus_per_client)),
                         split_server=split_run.target if split_run else None,
                         split_ca=str(split_run.ca_cert) if split_run and split_run.ca_cert else None)
    backend_config = {
        "client_resources": {"num_cpus": config.cpus_per_client, "num_gpus": config.gpus_per_client},
        "init_args": {"include_dashboard": False},
    }
    client_app = build_client_app(client, dp=server.dp is not None)
    try:
        run_flower_simulation(server_app=build_server_app(server), client_app=client_app,
                              num_supernodes=config.clients, backend_config=backend_config)
    finally:
        if split_run is not None:
            split_run.stop()

    rows = read_metrics(out_dir / "metrics.jsonl")
    if len(rows) != config.rounds + 1:
        raise FederationError(f"simulation ended after {len(rows) - 1} of {config.rounds} rounds; see the log above")
    title = f"{config.method} on {config.model} ({config.clients} clients, {partition}"
    title += f", split after block {split.cut})" if split else ")"
    plot_metrics(rows, out_dir / "metrics.png", title=title)
    summary = f"{rounds_table(rows)}\n\n{before_after_table(rows)}\n\n{overhead_line(rows)}\n"
    offsite_metrics = None
    if offsite is not None:  # the owner plugs the federated adapter into its full model
        offsite_metrics = evaluate_plug_in(full_model_dir, out_dir / "final", layer_map, quantize, task, eval_rows,
                                           config.max_length, out_dir, base_model=config.model)
        summary += f"\n{offsite_table(rows, offsite_metrics)}\n"
    (out_dir / "summary.md").write_text(summary)
    return SimulationResult(out_dir=out_dir, rows=rows, offsite=offsite_metrics)
