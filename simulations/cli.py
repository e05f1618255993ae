"""`peft-sim`: federated PEFT fine-tuning on Flower's Simulation Engine.

With no arguments: 4-bit LoRA on SmolLM2-135M-Instruct, 4 virtual clients, 3 rounds,
on the built-in support-ticket routing task, then a before/after table.

    peft-sim
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


def _key_value(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    key, value = text.split("=", 1)
    return key.strip(), value.strip()


def _ranks(text: str) -> list[int]:
    try:
        ranks = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not ranks or min(ranks) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give one or more ranks >= 1")
    return ranks


def build_parser() -> argparse.ArgumentParser:
    from fedpeft.common.methods import available_methods
    from fedpeft.common.model.base_model import DEFAULT_MODEL
    from fedpeft.common.protocol.topology import TOPOLOGIES
    from fedpeft.server.strategy import LORA_AGGREGATIONS, STRATEGIES
    from fedpeft.simulations.config import SimulationConfig

    d = SimulationConfig()
    p = argparse.ArgumentParser(prog="peft-sim", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"built-in name, .gguf file or HF model dir (default {DEFAULT_MODEL})")
    p.add_argument("--method", default=d.method, help=f"PEFT method: {', '.join(available_methods())} (default {d.method})")
    p.add_argument("--method-opt", "-o", action="append", type=_key_value, default=[], metavar="KEY=VALUE",
                   help="method option, repeatable (e.g. -o r=16 -o use_dora=true)")
    p.add_argument("--clients", type=int, default=d.clients, help="virtual clients (default %(default)s)")
    p.add_argument("--clients-per-round", type=int, default=d.clients_per_round, help="sampled per round (0 = all)")
    p.add_argument("--rounds", type=int, default=d.rounds, help="federated rounds (default %(default)s)")
    p.add_argument("--local-steps", type=int, default=d.local_steps, help="optimizer steps per client per round")
    p.add_argument("--local-epochs", type=float, default=d.local_epochs, help="epochs per round instead of steps (0 = use steps)")
    p.add_argument("--lr", type=float, default=d.learning_rate, help="local learning rate (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--max-length", type=int, default=d.max_length, help="max tokens per example")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="clients recompute block activations in backward: much less memory, ~30%% slower steps")
    p.add_argument("--data", default=None, help="training data (.jsonl/.json/.csv/.tsv); default: built-in task")
    p.add_argument("--eval-data", default=None, help="held-out data; default: 10%% of --data")
    p.add_argument("--task", default="auto", choices=["auto", "instruction", "classification"])
    p.add_argument("--template", default=None, help="classification prompt template with {column} placeholders")
    p.add_argument("--labels", default=None, help="verbalizer LABEL=WORD,... (e.g. 0=negative,1=positive)")
    p.add_argument("--label-column", default=d.label_column)
    p.add_argument("--partition", default=d.partition, help="iid | dirichlet:ALPHA | natural:COLUMN (default %(default)s)")
    p.add_argument("--quantize", default=d.quantize, help="4bit | none | auto: 4bit where bitsandbytes works (default)")
    p.add_argument("--out", default=None, help="run dir (default runs/sim-TIMESTAMP)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--train-limit", type=int, default=d.train_limit, help="subsample training rows (0 = all)")
    p.add_argument("--eval-limit", type=int, default=d.eval_limit, help="held-out rows scored per round (0 = all)")
    p.add_argument("--cpus-per-client", type=float, default=d.cpus_per_client, help="Ray CPUs per virtual client")
    p.add_argument("--gpus-per-client", type=float, default=d.gpus_per_client,
                   help="Ray GPU share per virtual client, e.g. 0.5 (default 0: clients train on CPU)")
    p.add_argument("--strategy", default=d.strategy, help=f"aggregation: {', '.join(sorted(STRATEGIES))} (default %(default)s)")
    p.add_argument("--strategy-opt", action="append", type=_key_value, default=[], metavar="KEY=VALUE",
                   help="strategy option, repeatable (e.g. --strategy fedprox --strategy-opt proximal_mu=0.01)")
    p.add_argument("--lora-aggregation", default=d.lora_aggregation, choices=list(LORA_AGGREGATIONS),
                   help="naive: average A and B (FedIT); svd: exact mean of B·A re-factored to rank r; "
                        "ffa: A frozen, only B trained (exact); hetlora: per-client ranks, zero-padded A and B "
                        "averaged; flexlora: per-client ranks, exact mean of B·A re-factored by SVD to each "
                        "client's rank (default %(default)s)")
    p.add_argument("--client-ranks", type=_ranks, default=[], metavar="R1,R2,...",
                   help="hetlora/flexlora: LoRA ranks cycled over the clients, e.g. 2,4,8 (the global rank is the max)")
    p.add_argument("--clip-update-norm", type=float, default=d.clip_update_norm,
                   help="clip each client's update (delta minus global, L2) to this norm before aggregation (0 = off)")
    p.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue an interrupted run from its last completed round (its saved settings are used)")
    p.add_argument("--min-clients", type=int, default=d.min_clients,
                   help="fewest accepted client updates per round; fewer stops the run (default %(default)s)")
    p.add_argument("--dp-clip", type=float, default=d.dp_clipping_norm,
                   help="differential privacy: clip each client's update to this L2 norm on the client and add "
                        "Gaussian noise to the mean (Flower's DP wrapper + fixedclipping_mod); 0 = off")
    p.add_argument("--dp-noise", type=float, default=d.dp_noise_multiplier,
                   help="DP noise multiplier (noise std = multiplier x clip / clients per round)")
    p.add_argument("--dp-delta", type=float, default=d.dp_target_delta, help="DP delta at which epsilon is reported")
    p.add_argument("--publish-to", metavar="REGISTRY_DIR",
                   help="publish the global adapter to this registry after every round (peft-server serve hot-loads it)")
    p.add_argument("--adapter-id", help="registry adapter id (default: the run dir's name)")
    p.add_argument("--registry-keys", metavar="DIR", help="registry identity (peft-server keys): seal versions at rest")
    p.add_argument("--topology", default=d.topology, choices=list(TOPOLOGIES),
                   help="fl: every client holds the whole model; offsite: Offsite-Tuning, clients hold a compressed "
                        "emulator + the adapter blocks, the final adapter is plugged into the full model; split: "
                        "clients hold embeddings + the first --split-cut blocks and train against one shared split "
                        "server over gRPC (SplitFed) (default %(default)s)")
    p.add_argument("--offsite-bottom", type=int, default=d.offsite_bottom, help="offsite: bottom adapter blocks (%(default)s)")
    p.add_argument("--offsite-top", type=int, default=d.offsite_top, help="offsite: top adapter blocks (%(default)s)")
    p.add_argument("--offsite-keep-every", type=int, default=d.offsite_keep_every,
                   help="offsite: keep every n-th middle block in the emulator (%(default)s)")
    p.add_argument("--offsite-distill-steps", type=int, default=d.offsite_distill_steps,
                   help="offsite: steps distilling the emulator against the full model (0 = off)")
    p.add_argument("--offsite-distill-data", default=None, help="offsite: server-owned text file for distillation")
    p.add_argument("--offsite-dtype", choices=("float32", "bfloat16"), default=d.offsite_dtype,
                   help="offsite: how the emulator's weights are stored (%(default)s; bfloat16 halves the download "
                        "but costs clients more memory)")
    p.add_argument("--split-cut", type=int, default=d.split_cut, help="split: blocks on each client (default %(default)s)")
    p.add_argument("--split-u-shaped", action="store_true",
                   help="split: clients also hold the head and compute the loss, so labels never leave them")
    p.add_argument("--split-wire-dtype", default=d.split_wire_dtype, choices=["float32", "float16", "bfloat16"],
                   help="split: dtype of activations and gradients on the wire (default %(default)s)")
    return p


def config_from_args(args: argparse.Namespace):  # -> SimulationConfig
    from fedpeft.simulations.config import SimulationConfig

    return SimulationConfig(
        model=args.model, method=args.method, method_options=dict(args.method_opt), clients=args.clients,
        clients_per_round=args.clients_per_round, rounds=args.rounds, local_steps=args.local_steps,
        local_epochs=args.local_epochs, learning_rate=args.lr, batch_size=args.batch_size, max_length=args.max_length,
        gradient_checkpointing=args.gradient_checkpointing, data=args.data, eval_data=args.eval_data, task=args.task,
        template=args.template, labels=args.labels,
        label_column=args.label_column, partition=args.partition, quantize=args.quantize, out=args.out, seed=args.seed,
        train_limit=args.train_limit, eval_limit=args.eval_limit, cpus_per_client=args.cpus_per_client,
        gpus_per_client=args.gpus_per_client, strategy=args.strategy, strategy_options=dict(args.strategy_opt),
        min_clients=args.min_clients, lora_aggregation=args.lora_aggregation, clip_update_norm=args.clip_update_norm,
        resume=args.resume, client_ranks=args.client_ranks, dp_clipping_norm=args.dp_clip,
        dp_noise_multiplier=args.dp_noise, dp_target_delta=args.dp_delta, publish_to=args.publish_to,
        adapter_id=args.adapter_id, registry_keys=args.registry_keys, topology=args.topology,
        offsite_bottom=args.offsite_bottom, offsite_top=args.offsite_top, offsite_keep_every=args.offsite_keep_every,
        offsite_distill_steps=args.offsite_distill_steps, offsite_distill_data=args.offsite_distill_data,
        offsite_dtype=args.offsite_dtype,
        split_cut=args.split_cut, split_u_shaped=args.split_u_shaped, split_wire_dtype=args.split_wire_dtype,
    )


def main(argv: Sequence[str] | None = None) -> int:
    apply_offline_env()
    args = build_parser().parse_args(argv)
    try:
        from fedpeft.simulations.report import before_after_table, offsite_table, overhead_line, rounds_table
        from fedpeft.simulations.runner import run_simulation

        result = run_simulation(config_from_args(args))
    except FedPeftError as exc:
        print(f"peft-sim: error: {exc}", file=sys.stderr)
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
