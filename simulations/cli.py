"""`peft-sim`: federated PEFT fine-tuning on Flower's Simulation Engine.

With no arguments: 4-bit LoRA on SmolLM2-135M-Instruct, 4 virtual clients, 3 rounds,
on the built-in support-ticket routing task, then a before/after table.

    peft-sim
    peft-sim --config run.toml --rounds 5        # the spec `peft-server run` takes; flags override its fields
    peft-sim --data ../shared/data/sst2/train.tsv --eval-data ../shared/data/sst2/dev.tsv \\
        --labels 0=negative,1=positive --clients 6 --partition dirichlet:0.5
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from fedpeft.common.errors import FedPeftError
from fedpeft.common.logs import apply_offline_env

# Library imports happen inside the functions below, after `apply_offline_env()`:
# Flower reads its telemetry switch when it is first imported.


def build_parser() -> argparse.ArgumentParser:
    from fedpeft.server.federation.flags import add_flags

    p = argparse.ArgumentParser(prog="peft-sim", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="RUN_TOML", help="run spec (the same TOML `peft-server run --config` takes); "
                                                          "every other option overrides one of its fields")
    p.add_argument("--out", default=None, help="run dir (default runs/sim-TIMESTAMP)")
    p.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue an interrupted run from its last completed round, with the spec it was started with")
    add_flags(p)
    return p


def spec_from_args(args: argparse.Namespace):  # -> RunSpec
    """The run spec the command line describes: --config (or the defaults) with the flags applied."""
    from fedpeft.common.errors import ConfigError
    from fedpeft.server.federation.flags import overrides_from_args
    from fedpeft.server.federation.spec import RunSpec

    if args.resume is not None:
        if overrides_from_args(args) or args.config or args.out:
            raise ConfigError("--resume continues a run with the spec it was started with; give no other option")
        return None
    base = RunSpec.from_toml(args.config) if args.config else RunSpec(source="peft-sim")
    return base.with_overrides(overrides_from_args(args, base))


def main(argv: Sequence[str] | None = None) -> int:
    apply_offline_env()
    args = build_parser().parse_args(argv)
    try:
        from fedpeft.simulations.report import before_after_table, offsite_table, overhead_line, rounds_table
        from fedpeft.simulations.runner import run_simulation

        result = run_simulation(spec_from_args(args), args.out, resume=args.resume)
    except FedPeftError as exc:
        from fedpeft.server.federation.flags import describe_for_cli

        print(f"peft-sim: error: {describe_for_cli(str(exc))}", file=sys.stderr)
        return exc.exit_code
    print()
    print(rounds_table(result.rows))
    print()
    print(before_after_table(result.rows))
    print()
    print(overhead_line(result.rows))
    if result.offsite is not None:
        print()
        print(offsite_table(result.rows, result.offsite))
    print(f"run dir: {result.out_dir}  (metrics.jsonl, metrics.png, final/)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
