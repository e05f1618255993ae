"""The Flower ServerApp: holds the frozen base model, runs FedAvg rounds over PEFT
deltas, evaluates the global adapter centrally, and exports the result."""

from __future__ import annotations

import functools
import logging
import math
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy.fedopt import FedOpt

from fedpeft.client.training import TrainConfig
from fedpeft.common.data.records import Record, TaskSpec
from fedpeft.common.errors import ConfigError, FederationError, FedPeftError
from fedpeft.common.files import atomic_write_bytes
from fedpeft.common.methods import MethodConfig
from fedpeft.common.model.adapted import AdaptedModel
from fedpeft.common.model.base_model import model_fingerprint
from fedpeft.common.model.quantization import Quantize
from fedpeft.common.protocol.flower_io import delta_from_arrayrecord, delta_to_arrayrecord
from fedpeft.common.protocol.plan import PLAN_KEY, FederationPlan
from fedpeft.common.training.objectives import objective_for
from fedpeft.server.compression import Compression
from fedpeft.server.export import export_adapter
from fedpeft.server.hetero_strategy import HeteroRanks
from fedpeft.server.optimizer_state import restore_optimizer_state, save_optimizer_state, state_path
from fedpeft.server.privacy import build_dp_strategy, privacy_spent
from fedpeft.server.rate_schedule import CONSTANT, server_rate
from fedpeft.server.recorder import RunRecorder, last_completed_round
from fedpeft.server.robust import RobustSettings
from fedpeft.server.sealed_replies import EnvelopeOpener
from fedpeft.server.secagg import SecAggFedAvg, run_secagg_rounds
from fedpeft.server.serving.publishing import RegistryTarget, publish_round
from fedpeft.server.strategy import ADAPTIVE_SERVER_STRATEGIES, STATEFUL_STRATEGIES, build_strategy
from fedpeft.server.streaming_grid import StreamingGrid

if TYPE_CHECKING:
    from fedpeft.common.security.envelope import PeerIdentity
    from fedpeft.server.federation.spec import DpSection, SecAggSection
    from fedpeft.server.federation.topologies import Topology

log = logging.getLogger("fedpeft.server")


@dataclass(frozen=True)
class ServerSetup:
    """Everything the coordinator needs for one federated run."""

    run_name: str
    base_model: str
    model_dir: str
    quantize: Quantize
    method: str
    method_config: MethodConfig
    task: TaskSpec
    train: dict[str, Any]
    eval_rows: Sequence[Record]
    out_dir: str
    num_rounds: int
    num_clients: int
    clients_per_round: int
    seed: int
    strategy: str = "fedavg"
    strategy_options: dict[str, str] = field(default_factory=dict)
    min_accepted: int = 1
    """Fewest accepted client updates a round may aggregate; fewer stops the run."""
    clip_update_norm: float = 0.0
    """L2 bound on each client's update before aggregation (0 = no clipping)."""
    scaffold: bool = False
    """SCAFFOLD drift correction (`fedpeft.server.scaffold`)."""
    robust: RobustSettings = field(default_factory=RobustSettings)
    """Bounds every client reply is held to (the spec's `reply_bounds()`)."""
    lora_svd_scaling: float | None = None
    """peft's LoRA scale (alpha / r, or alpha / sqrt(r) with rsLoRA) to aggregate LoRA in ΔW space
    (svd mode); None = average A and B."""
    hetero: HeteroRanks | None = None
    """Per-client LoRA ranks (hetlora / flexlora); `method_config.r` is their maximum."""
    eval_batch_size: int = 16
    eval_every: int = 1
    """Score `eval_rows` every this many rounds (rounds 0 and `num_rounds` always)."""
    server_lr_schedule: str = CONSTANT
    """The FedOpt strategy's `eta` over rounds (`fedpeft.server.rate_schedule`)."""
    max_delta_bytes: int = 256 * 1024 * 1024
    round_timeout: float = 3600.0
    resume: bool = False
    """Continue the run in `out_dir` from its last completed round (checkpoint + metrics)."""
    on_complete: Callable[[AdaptedModel], None] | None = None
    """Called with the server's in-process model holding the final adapter (for checks)."""
    secagg: SecAggSection | None = None
    """Aggregate with Flower's SecAgg+ (the server learns only the sum of deltas)."""
    dp: DpSection | None = None
    """Central DP with client-side fixed clipping and an RDP accountant."""
    envelopes: tuple[PeerIdentity, dict[str, bytes]] | None = None
    """(server identity, {client id: Ed25519 key}): clients must reply with sealed envelopes."""
    publish: RegistryTarget | None = None
    """Publish the global adapter to this registry after every round (serving hot-loads it)."""
    topology: Topology | None = None
    """What the topology adds (see `fedpeft.server.federation.topologies`); None = plain FL."""
    full_model_dir: str = ""
    """The model the federation fine-tunes, when clients hold another (offsite: the emulator's source)."""
    compression: Compression | None = None
    """Codecs of the deltas on the wire (`fedpeft.server.compression`); None: plain fp32 arrays."""

    def model_context(self):  # -> ModelContext
        from fedpeft.server.federation.topologies import ModelContext

        return ModelContext(model_dir=Path(self.model_dir), full_model_dir=Path(self.full_model_dir or self.model_dir),
                            quantize=self.quantize, method=self.method, method_config=self.method_config,
                            seed=self.seed, num_labels=self.task.num_labels)

    def plugin(self) -> Topology:
        from fedpeft.server.federation.topologies import Topology

        return self.topology if self.topology is not None else Topology()


def run_federation(grid: Grid, setup: ServerSetup, context: Context | None = None) -> Path:
    """Run all rounds on `grid`; returns the exported final adapter dir."""
    out_dir = Path(setup.out_dir)
    topology, models = setup.plugin(), setup.model_context()
    adapted = topology.server_model(models)
    if setup.publish is not None:
        setup.publish.check(adapted.method.peft_backed)
    log.info("server: %s on %s (%s), %d trainable parameters (%.2f MB per delta)", setup.method, setup.base_model,
             setup.quantize, adapted.spec.num_parameters, adapted.spec.num_bytes / 1e6)
    train = TrainConfig(**setup.train)  # (the plan's fields: an optimizer left out is AdamW)
    log.info("server: strategy %s%s%s; clients: %s at lr %g, %s a round", setup.strategy,
             "".join(f" {k}={v}" for k, v in setup.strategy_options.items()),
             f" ({setup.server_lr_schedule} eta schedule)" if setup.server_lr_schedule != CONSTANT else "",
             train.optimizer, train.learning_rate,
             f"{train.local_epochs:g} epochs" if train.local_epochs > 0 else f"{train.local_steps} steps")
    plan = FederationPlan(run_name=setup.run_name, model_fingerprint=model_fingerprint(Path(setup.model_dir)),
                          method=setup.method, method_options=setup.method_config.to_dict(), task=setup.task.to_dict(),
                          train=dict(setup.train), seed=setup.seed, frozen_fingerprint=adapted.frozen_fingerprint(),
                          split=topology.plan_entry())
    done = _resume_point(setup) if setup.resume else None
    recorder = RunRecorder(out_dir, resume_from=done)
    if done is not None:
        topology.restore(recorder.checkpoint_path(done).parent, done)
    strategy: Any
    if setup.dp is not None:
        strategy = build_dp_strategy(spec=adapted.spec, max_delta_bytes=setup.max_delta_bytes,
                                     min_accepted=setup.min_accepted, clip_update_norm=setup.clip_update_norm,
                                     robust=setup.robust, dp=setup.dp, clients_per_round=setup.clients_per_round,
                                     population=setup.num_clients, compression=setup.compression)
    else:
        strategy = build_strategy(
            setup.strategy,
            spec=adapted.spec,
            max_delta_bytes=setup.max_delta_bytes,
            options=setup.strategy_options,
            min_accepted=setup.min_accepted,
            lora_svd_scaling=setup.lora_svd_scaling,
            hetero=setup.hetero,
            scaffold=TrainConfig(**setup.train) if setup.scaffold else None,
            compression=setup.compression,
            clip_update_norm=setup.clip_update_norm,
            robust=setup.robust,
            fraction_train=setup.clients_per_round / setup.num_clients,
            fraction_evaluate=0.0,
            min_train_nodes=setup.clients_per_round,
            min_available_nodes=setup.num_clients,
        )
    if setup.server_lr_schedule != CONSTANT:
        if not isinstance(strategy, FedOpt):  # (the run spec refuses it; a hand-built setup must not drop it)
            raise ConfigError(f"server_lr_schedule {setup.server_lr_schedule!r} needs a FedOpt strategy "
                              f"({', '.join(ADAPTIVE_SERVER_STRATEGIES)}), not {setup.strategy!r}")
        strategy.eta_schedule = functools.partial(server_rate, setup.server_lr_schedule, strategy.eta,
                                                  num_rounds=setup.num_rounds)
        strategy.eta_schedule(1)  # an unknown schedule fails here, before round 0 is scored
    offset = strategy.round_offset = done or 0
    if done is not None:
        _check_past_rates(recorder.rows, getattr(strategy, "eta_schedule", None), setup)
    # A checkpoint comes back in the delta's own order: FedAvgM pairs its arrays and momentum by position.
    initial = recorder.load_checkpoint(offset, order=adapted.spec.tensors) if done is not None else adapted.get_delta()
    stateful = setup.dp is None and setup.secagg is None and setup.strategy in STATEFUL_STRATEGIES
    if done is not None and stateful:
        restore_optimizer_state(strategy, recorder.checkpoint_path(done))
    if done is not None:
        log.info("server: resuming %s after round %d of %d", out_dir, done, setup.num_rounds)

    objective = objective_for(adapted.model, adapted.tokenizer, setup.task, int(setup.train.get("max_length", 128)))
    eval_model = topology.eval_model(adapted)
    started = time.perf_counter()

    def evaluate_global(local_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        server_round = local_round + offset
        if done is not None and local_round == 0:  # already evaluated and recorded before the restart
            adapted.set_delta(delta_from_arrayrecord(arrays), source=f"checkpoint of round {server_round}")
            last = recorder.rows[-1]
            scored = {k.replace("_", "-"): float(last[k]) for k in ("eval_loss", "eval_accuracy") if k in last}
            return MetricRecord(scored) if scored else None
        delta = delta_from_arrayrecord(arrays)
        adapted.set_delta(delta, source=f"global delta of round {server_round}")
        checkpoint = recorder.save_checkpoint(server_round, delta)
        if stateful:  # Adam's moments (or FedAvgM's momentum) after this round, for a resume
            save_optimizer_state(strategy, checkpoint)
        topology.checkpoint(checkpoint.parent, server_round)
        t0 = time.perf_counter()
        result = (objective.evaluate(eval_model, setup.eval_rows, setup.eval_batch_size)
                  if eval_due(server_round, setup.num_rounds, setup.eval_every) else None)
        traffic = strategy.traffic.get(server_round)
        row: dict[str, Any] = {"round": server_round}
        if traffic is not None and traffic.server_rate is not None:
            row["server_rate"] = traffic.server_rate
        if result is not None:  # a row without eval_loss is a round the schedule skipped
            row.update(eval_loss=result.loss, eval_examples=result.num_examples,
                       eval_seconds=time.perf_counter() - t0)
            if result.accuracy is not None:
                row["eval_accuracy"] = result.accuracy
            if result.auc is not None:
                row["eval_auc"] = result.auc
        row.update({
            "bytes_up": traffic.bytes_up if traffic else 0,
            "bytes_down": traffic.bytes_down if traffic else 0,
            "bytes_up_raw": traffic.bytes_up_raw if traffic else 0,
            "bytes_down_raw": traffic.bytes_down_raw if traffic else 0,
            "seconds": traffic.seconds if traffic else 0.0,
            "elapsed": time.perf_counter() - started,
            "clients_sampled": traffic.sent if traffic else 0,
            "clients_accepted": traffic.accepted if traffic else 0,
            "clients_rejected": len(traffic.rejected) if traffic else 0,
            "clients_clipped": traffic.clipped if traffic else 0,
            "clients_failed": traffic.failed if traffic else 0,
        })
        if setup.compression is not None and traffic:  # how many times fewer bytes than plain fp32 arrays
            row["compression_up"] = traffic.bytes_up_raw / traffic.bytes_up if traffic.bytes_up else 1.0
            row["compression_down"] = traffic.bytes_down_raw / traffic.bytes_down if traffic.bytes_down else 1.0
        topology.round_metrics(row)
        refactor_errors = getattr(strategy, "refactor_errors", {})
        if server_round in refactor_errors:
            row["svd_max_relative_error"] = refactor_errors[server_round]
        error_bounds = getattr(strategy, "error_bounds", {})
        if server_round in error_bounds:
            row["secagg_error_bound"] = error_bounds[server_round]
        spent = privacy_spent(strategy) if local_round > 0 else None
        if spent is not None:
            row["dp_epsilon"], row["dp_delta"] = spent
        rank_errors = getattr(strategy, "rank_errors", {}).get(server_round)
        if rank_errors:  # FlexLoRA: the error of what each rank was sent; the max is the worst client's
            row.update({f"svd_relative_error_r{r}": e for r, e in rank_errors.items()})
            row["svd_max_relative_error"] = max(rank_errors.values())
        if traffic and traffic.train_metrics:
            row["train_loss"] = traffic.train_metrics.get("train-loss")
        if traffic and traffic.client_metrics:
            per_client = traffic.client_metrics
            row["client_swap_seconds"] = sum(c.get("swap-seconds", 0.0) for c in per_client) / len(per_client)
            row["client_train_seconds"] = sum(c.get("train-seconds", 0.0) for c in per_client) / len(per_client)
            row["client_model_loads"] = sum(1 for c in per_client if c.get("load-seconds", 0.0) > 0)
            row["client_load_seconds_max"] = max(c.get("load-seconds", 0.0) for c in per_client)
        recorder.record(row)
        if setup.publish is not None and server_round > 0:  # round 0 is the untrained initial adapter
            try:
                publish_round(adapted, setup.publish, server_round, row)
            except (FedPeftError, OSError) as exc:  # serving misses one version; training goes on
                log.error("round %d: publishing to %s failed: %s", server_round, setup.publish.registry_dir, exc)
        if result is None:
            score = f"train loss {row['train_loss']:.4f}" if row.get("train_loss") is not None else "not scored"
        else:
            score = (f"eval loss {result.loss:.4f}" + (f" acc {result.accuracy:.3f}" if result.accuracy is not None else "")
                     + (f" auc {result.auc:.3f}" if result.auc is not None else ""))
        ratios = (f" (x{row['compression_up']:.1f} / x{row['compression_down']:.1f} smaller than fp32)"
                  if "compression_up" in row else "")
        log.info("round %d/%d: %s | up %.2f MB down %.2f MB%s | %.1f s", server_round, setup.num_rounds,
                 score, row["bytes_up"] / 1e6, row["bytes_down"] / 1e6, ratios, row["seconds"])
        if result is None:
            return None
        metrics: dict[str, float] = {"eval-loss": result.loss}
        if result.accuracy is not None:
            metrics["eval-accuracy"] = result.accuracy
        return MetricRecord(metrics)

    train_config: dict[str, Any] = {PLAN_KEY: plan.to_json()}
    if setup.envelopes is not None:
        identity, trusted = setup.envelopes
        opener = EnvelopeOpener(identity, trusted, run_id=persistent_run_id(out_dir), spec=strategy.upload_spec(),
                                replay_path=out_dir / "replay-guard.json", robust=setup.robust,
                                spec_of=strategy.upload_spec)
        strategy.unseal = opener
        train_config.update(opener.seal_config(setup.method))
    final_arrays: ArrayRecord | None
    if setup.secagg is not None:
        if setup.compression is not None:  # (the run spec refuses it; a hand-built setup must not drop it silently)
            raise ConfigError("SecAgg+ cannot run with compressed deltas: it quantizes and masks the delta itself")
        if setup.server_lr_schedule != CONSTANT:  # (likewise: SecAgg+ runs plain FedAvg, there is no eta)
            raise ConfigError("SecAgg+ runs FedAvg: server_lr_schedule needs a FedOpt strategy")
        secagg_strategy = SecAggFedAvg(
            spec=adapted.spec, initial=dict(initial), plan_json=plan.to_json(), settings=setup.secagg,
            min_accepted=setup.min_accepted, round_offset=offset, evaluate_global=evaluate_global,
            fraction_fit=setup.clients_per_round / setup.num_clients, fraction_evaluate=0.0,
            min_fit_clients=setup.clients_per_round, min_evaluate_clients=0, min_available_clients=setup.num_clients)
        strategy = secagg_strategy  # type: ignore[assignment]  (evaluate_global reads its traffic and error bounds)
        final_arrays = run_secagg_rounds(grid, _require(context), secagg_strategy, setup.num_rounds - offset, setup.secagg)
    else:
        result = strategy.start(
            # a strategy that folds replies as they come gets them one at a time (memory O(P))
            grid=StreamingGrid(grid) if strategy.folds_replies else grid,
            initial_arrays=delta_to_arrayrecord(initial),
            num_rounds=setup.num_rounds - offset,
            timeout=setup.round_timeout,
            train_config=ConfigRecord(train_config),
            evaluate_fn=evaluate_global,
        )
        final_arrays = result.arrays if len(result.arrays) > 0 else None
    if final_arrays is not None:
        adapted.set_delta(delta_from_arrayrecord(final_arrays), source="final global delta")
    else:  # no round ran in this process (resumed a finished run): the checkpoint is final
        adapted.set_delta(initial, source="final global delta")
    final_dir = export_adapter(adapted, out_dir / "final", setup.base_model,
                               {"rounds": setup.num_rounds, "clients": setup.num_clients, "task": setup.task.to_dict()})
    log.info("server: final adapter written to %s", final_dir)
    topology.finish(final_dir, models, setup.task, list(setup.eval_rows), int(setup.train.get("max_length", 128)))
    if setup.on_complete is not None:
        setup.on_complete(adapted)
    return final_dir


def eval_due(server_round: int, num_rounds: int, every: int) -> bool:
    """Whether round `server_round` scores the held-out rows: the untrained adapter (0), the
    final one and every `every`-th round between."""
    return server_round in (0, num_rounds) or server_round % every == 0


def persistent_run_id(out_dir: Path) -> str:
    """A random id for this run dir, created once and kept across `--resume`: envelopes of
    a deleted and re-created run dir with the same name cannot be replayed into it."""
    path = out_dir / "run-id"
    if not path.exists():
        atomic_write_bytes(path, f"{out_dir.name}-{secrets.token_hex(8)}\n".encode())
    return path.read_text().strip()


def _require(context: Context | None) -> Context:
    if context is None:
        raise ConfigError("SecAgg+ runs on Flower's legacy workflow, which needs the ServerApp's Context")
    return context


def _check_past_rates(rows: Sequence[dict[str, Any]], schedule: Callable[[int], float] | None,
                      setup: ServerSetup) -> None:
    """Refuse a resume whose server rate schedule would have stepped the finished rounds at
    other rates than they were (a changed `federation.rounds` moves a cosine's horizon): it
    would continue neither the interrupted run nor the run it now asks for."""
    for row in rows:
        if row["round"] == 0 or "server_rate" not in row and schedule is None:
            continue
        recorded, expected = row.get("server_rate"), schedule(row["round"]) if schedule is not None else None
        if recorded is None or expected is None or not math.isclose(recorded, expected, rel_tol=1e-9):
            raise FederationError(
                f"cannot resume {setup.out_dir}: round {row['round']} stepped at server rate {recorded} where "
                f"federation.server_lr_schedule {setup.server_lr_schedule!r} over federation.rounds = "
                f"{setup.num_rounds} gives {expected} (a schedule's rounds cannot change on resume)")


def _resume_point(setup: ServerSetup) -> int:
    """The last completed round of the run to resume, checked for resumability."""
    if setup.dp is not None:
        raise ConfigError("runs with differential privacy cannot be resumed: the privacy accountant's spent budget "
                          "is not checkpointed, and restarting it would under-report epsilon")
    if setup.scaffold:
        raise ConfigError("runs with SCAFFOLD cannot be resumed: the clients' control variates live in Flower's "
                          "per-run node state, which a resumed run starts without")
    done = last_completed_round(Path(setup.out_dir))
    if done is None:
        raise FederationError(f"{setup.out_dir} has no completed round to resume from (no metrics.jsonl + checkpoint)")
    if done > setup.num_rounds:
        raise FederationError(f"{setup.out_dir} already has {done} rounds, more than the {setup.num_rounds} asked for")
    state = state_path(RunRecorder.checkpoint_path_in(Path(setup.out_dir), done))
    if setup.strategy in STATEFUL_STRATEGIES and not state.is_file():
        raise FederationError(f"cannot resume strategy {setup.strategy!r} without its optimizer state: {state} is "
                              "missing (a run dir from before fedpeft checkpointed it)")
    return done


def build_server_app(setup: ServerSetup) -> ServerApp:
    """A ServerApp that runs `run_federation` with `setup`."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        torch.manual_seed(setup.seed)
        run_federation(grid, setup, context)

    return app
