"""The deployment ServerApp (`fedpeft.server.deploy_app:app`), started by Flower's SuperLink.

`peft-server run` builds a Flower App whose `serverapp` component is this module and
passes, as Flower run config, the path of the TOML run config and the run dir. All the
federation logic is `fedpeft.server.app.run_federation`, shared with the simulation.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedpeft.common.errors import ConfigError
from fedpeft.common.logs import apply_offline_env, setup_logging
from fedpeft.common.methods import make_config
from fedpeft.common.model.adapted import check_method_applies
from fedpeft.common.model.base_model import resolve_model_dir
from fedpeft.common.model.quantization import resolve_quantize, validate_quantize
from fedpeft.common.offsite.layer_map import read_layer_map
from fedpeft.common.offsite.run import adapter_method_options, evaluate_plug_in, prepare_emulator
from fedpeft.common.security.envelope import PeerIdentity
from fedpeft.server.app import ServerSetup, run_federation
from fedpeft.server.run_config import RunConfig, load_eval_task
from fedpeft.server.sealed_replies import load_trusted_clients
from fedpeft.server.serving.publishing import RegistryTarget

log = logging.getLogger("fedpeft.server")
CONFIG_KEY = "fedpeft-config"
RUN_DIR_KEY = "fedpeft-run-dir"
RESUME_KEY = "fedpeft-resume"


def server_setup(config: RunConfig, run_dir: Path, resume: bool) -> ServerSetup:
    """The `ServerSetup` a run config describes (model resolved, task and held-out data loaded)."""
    f = config.federation
    quantize = validate_quantize(resolve_quantize(f.quantize))
    model_dir = resolve_model_dir(f.model)
    task, eval_rows = load_eval_task(config.task, f.seed)
    method_options = config.method_options()
    if f.topology == "offsite":  # clients hold the emulator; LoRA only on its adapter blocks
        model_dir, layer_map = prepare_emulator(model_dir, run_dir, config.offsite, f.seed, config.training.max_length)
        method_options = adapter_method_options(f.method, method_options, layer_map)
        log.info("offsite: clients must start with --model set to a copy of %s (%d of %d blocks)", model_dir,
                 layer_map.emulator_layers, layer_map.full_layers)
    method_config = make_config(f.method, method_options)
    check_method_applies(model_dir, f.method, method_config, num_labels=task.num_labels, quantize=quantize)
    envelopes = None
    if config.envelopes.enabled:
        identity = PeerIdentity.load(Path(str(config.envelopes.server_identity)))
        envelopes = (identity, load_trusted_clients(Path(str(config.envelopes.trusted_clients))))
    return ServerSetup(
        run_name=run_dir.name, base_model=str(model_dir) if f.topology == "offsite" else f.model,
        model_dir=str(model_dir), quantize=quantize, method=f.method,
        method_config=method_config, task=task, train=config.training.plan_fields(), eval_rows=eval_rows,
        out_dir=str(run_dir), num_rounds=f.rounds, num_clients=f.clients, clients_per_round=f.num_per_round,
        seed=f.seed, strategy=f.strategy, strategy_options={k: str(v) for k, v in f.strategy_options.items()},
        min_accepted=f.min_clients, clip_update_norm=f.clip_update_norm, round_timeout=f.round_timeout, resume=resume,
        lora_svd_scaling=(method_config.alpha / method_config.r  # type: ignore[attr-defined]
                          if f.lora_aggregation == "svd" else None),
        secagg=config.secagg if config.secagg.enabled else None, dp=config.dp if config.dp.enabled else None,
        envelopes=envelopes,
        publish=(RegistryTarget(str(config.registry.dir), config.registry.adapter_id or run_dir.name, config.registry.keys)
                 if config.registry.enabled else None),
    )


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    apply_offline_env()
    setup_logging()
    if CONFIG_KEY not in context.run_config or RUN_DIR_KEY not in context.run_config:
        raise ConfigError(f"run config must set {CONFIG_KEY!r} and {RUN_DIR_KEY!r} (start runs with peft-server run)")
    config = RunConfig.from_toml(Path(str(context.run_config[CONFIG_KEY])))
    setup = server_setup(config, Path(str(context.run_config[RUN_DIR_KEY])), bool(context.run_config.get(RESUME_KEY)))
    torch.manual_seed(setup.seed)
    split_run = start_configured_split(config, setup) if config.split_active else None
    try:
        final = run_federation(grid, dataclasses.replace(setup, split=split_run) if split_run else setup, context)
    finally:
        if split_run is not None:
            split_run.stop()
    log.info("run complete: final adapter in %s", final)
    if config.federation.topology == "offsite":
        finish_offsite(config, setup, final)


def finish_offsite(config: RunConfig, setup: ServerSetup, final: Path) -> dict:
    """Plug the federated adapter into the full model and score it (writes run_dir/plugged)."""
    f = config.federation
    metrics = evaluate_plug_in(resolve_model_dir(f.model), final, read_layer_map(Path(setup.model_dir)), setup.quantize,
                               setup.task, setup.eval_rows, config.training.max_length, Path(setup.out_dir),
                               base_model=f.model)
    log.info("offsite: full-model adapter in %s", metrics["plugged_adapter"])
    return metrics


def start_configured_split(config: RunConfig, setup: ServerSetup):  # -> SplitRun
    """Start the split server a run config's [split] section describes, beside this ServerApp."""
    from fedpeft.common.model.split import SplitConfig, check_split
    from fedpeft.common.security.pki import TlsFiles
    from fedpeft.server.split_run import start_split_run

    sp = config.split
    split = SplitConfig(cut=sp.cut, u_shaped=sp.u_shaped)
    check_split(Path(setup.model_dir), split, setup.method)
    host = f"[{sp.host}]" if ":" in sp.host else sp.host
    run = start_split_run(Path(setup.model_dir), split, setup.method_config, setup.quantize,
                          learning_rate=config.training.learning_rate, address=f"{host}:{sp.port}",
                          tls=TlsFiles.in_dir(Path(sp.tls_dir)) if sp.tls_dir else None, seed=setup.seed,
                          wire_dtype=sp.wire_dtype)
    log.info("split server for blocks %d+ at %s (clients: peft-client start --split-server HOST:%d)", sp.cut,
             run.target, sp.port)
    return run
