"""Run one federated PEFT fine-tuning simulation on Flower's Simulation Engine (Ray).

Top to bottom: assemble the federation from the run spec (the same assembly a
deployment runs), write each virtual client's partition, start the topology's services,
run Flower with the assembled ServerApp and an in-process ClientApp, then report.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.clientapp.typing import Mod

from fedpeft.client.app import build_client_app
from fedpeft.common.data.records import Record, TaskSpec
from fedpeft.common.errors import ConfigError, FederationError
from fedpeft.common.files import write_json_atomic
from fedpeft.common.logs import apply_offline_env, setup_logging
from fedpeft.common.model.adapted import AdaptedModel
from fedpeft.common.offsite.run import read_result
from fedpeft.server.app import build_server_app
from fedpeft.server.federation.assembly import SPEC_FILE, assemble
from fedpeft.server.federation.spec import RunSpec
from fedpeft.server.federation.topologies import SplitEndpoint
from fedpeft.simulations.client_data import PartitionFiles, write_partitions
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


@dataclass(frozen=True)
class SimulationResult:
    out_dir: Path
    rows: list[dict[str, Any]]
    offsite: dict[str, Any] | None = None
    """Offsite topology: full model zero-shot and plug-in metrics (`offsite-metrics.json`)."""

    @property
    def final_dir(self) -> Path:
        return self.out_dir / "final"


def describe_partitions(partitions: list[list[Record]], task: TaskSpec) -> list[dict[str, Any]]:
    out = []
    for i, rows in enumerate(partitions):
        entry: dict[str, Any] = {"client": i, "examples": len(rows)}
        if task.kind == "classification":
            entry["labels"] = dict(sorted(Counter(str(r[task.label_column]) for r in rows).items()))
        out.append(entry)
    return out


def read_run_spec(run_dir: Path) -> RunSpec:
    """The spec a simulation run dir was started with (to resume it)."""
    path = Path(run_dir) / SPEC_FILE
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot resume {run_dir}: no readable {SPEC_FILE} ({exc})") from exc
    if not isinstance(saved, dict):
        raise ConfigError(f"cannot resume {run_dir}: {path} is not a run spec")
    return RunSpec.from_dict(saved, source=str(path))


def default_out_dir() -> Path:
    return Path(f"runs/sim-{time.strftime('%Y%m%d-%H%M%S')}")


def run_simulation(spec: RunSpec, out: str | Path | None = None, *, resume: str | Path | None = None,
                   on_complete: Callable[[AdaptedModel], None] | None = None,
                   client_mods: Sequence[Mod] = ()) -> SimulationResult:
    """Run the federation `spec` describes in simulation, into run dir `out`; with `resume`,
    continue that run dir from its last completed round with its saved spec.

    `on_complete` receives the server's in-process model with the final adapter. `client_mods`
    are Flower ClientApp mods every virtual client runs, inside the codec mod (the attack benchmark's
    malicious clients rewrite their replies there).
    """
    if resume is not None:
        spec, out = read_run_spec(Path(resume)), resume
    apply_offline_env()
    setup_logging()
    out_dir = Path(out) if out is not None else default_out_dir()
    federation = assemble(spec, "simulation", out_dir, resume=resume is not None, on_complete=on_complete)
    out_dir, data, f = federation.run_dir, federation.data, spec.federation
    if resume is None:  # a resumed run keeps its clients' data files (and the spec, written by assemble)
        write_partitions(federation.partitions, out_dir / "partitions")
    clients = describe_partitions(federation.partitions, data.task)
    write_json_atomic(out_dir / "clients.json", clients)
    log.info("model %s (%s) | method %s | %d clients (%s) | %d rounds | %d train / %d held-out rows",
             f.model, federation.models.quantize, f.method, f.clients, spec.task.partition, f.rounds,
             len(data.train_rows), len(data.eval_rows))
    for entry in clients:
        log.info("  client %d: %d examples %s", entry["client"], entry["examples"], entry.get("labels", ""))

    federation.start(SplitEndpoint.of(spec, "simulation", out_dir) if spec.topology == "split" else None)
    try:
        client = federation.client_setup(PartitionFiles(str(out_dir / "partitions")),
                                         torch_threads=max(1, int(spec.simulation.cpus_per_client)))
        backend_config = {
            "client_resources": {"num_cpus": spec.simulation.cpus_per_client,
                                 "num_gpus": spec.simulation.gpus_per_client},
            "init_args": {"include_dashboard": False},
        }
        run_flower_simulation(server_app=build_server_app(federation.server),
                              client_app=build_client_app(client, dp=spec.dp.enabled, mods=client_mods),
                              num_supernodes=f.clients, backend_config=backend_config)
    finally:
        federation.stop()

    rows = read_metrics(out_dir / "metrics.jsonl")
    if len(rows) != f.rounds + 1:
        raise FederationError(f"simulation ended after {len(rows) - 1} of {f.rounds} rounds; see the log above")
    title = f"{f.method} on {f.model} ({f.clients} clients, {spec.task.partition}"
    title += f", split after block {spec.split.cut})" if spec.topology == "split" else ")"
    plot_metrics(rows, out_dir / "metrics.png", title=title)
    summary = f"{rounds_table(rows)}\n\n{before_after_table(rows)}\n\n{overhead_line(rows)}\n"
    offsite_metrics = read_result(out_dir) if spec.topology == "offsite" else None
    if offsite_metrics is not None:
        summary += f"\n{offsite_table(rows, offsite_metrics)}\n"
    (out_dir / "summary.md").write_text(summary)
    return SimulationResult(out_dir=out_dir, rows=rows, offsite=offsite_metrics)
