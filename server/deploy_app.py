"""The deployment ServerApp (`fedpeft.server.deploy_app:app`), started by Flower's SuperLink.

`peft-server run` builds a Flower App whose `serverapp` component is this module and
passes, as Flower run config, the path of the TOML run spec and the run dir. The
federation itself is assembled by `fedpeft.server.federation.assembly` and run by
`fedpeft.server.app.run_federation`, exactly as the simulation does.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedpeft.common.errors import ConfigError
from fedpeft.common.logs import apply_offline_env, setup_logging
from fedpeft.server.app import run_federation
from fedpeft.server.federation.assembly import Federation, assemble
from fedpeft.server.federation.spec import RunSpec
from fedpeft.server.federation.topologies import SplitEndpoint

log = logging.getLogger("fedpeft.server")
CONFIG_KEY = "fedpeft-config"
RUN_DIR_KEY = "fedpeft-run-dir"
RESUME_KEY = "fedpeft-resume"


def deployed_federation(spec: RunSpec, run_dir: Path, resume: bool) -> Federation:
    """The federation a deployment runs: assembled for the deployment driver, its services started."""
    federation = assemble(spec, "deployment", run_dir, resume=resume)
    federation.start(SplitEndpoint.of(spec, "deployment", federation.run_dir) if spec.topology == "split" else None)
    if spec.topology == "offsite":
        log.info("offsite: clients must start with --model set to a copy of %s", federation.models.model_dir)
    return federation


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    apply_offline_env()
    setup_logging()
    if CONFIG_KEY not in context.run_config or RUN_DIR_KEY not in context.run_config:
        raise ConfigError(f"run config must set {CONFIG_KEY!r} and {RUN_DIR_KEY!r} (start runs with peft-server run)")
    spec = RunSpec.from_toml(Path(str(context.run_config[CONFIG_KEY])))  # validated once, by assemble
    federation = deployed_federation(spec, Path(str(context.run_config[RUN_DIR_KEY])),
                                     bool(context.run_config.get(RESUME_KEY)))
    torch.manual_seed(federation.server.seed)
    try:
        final = run_federation(grid, federation.server, context)
    finally:
        federation.stop()
    log.info("run complete: final adapter in %s", final)
