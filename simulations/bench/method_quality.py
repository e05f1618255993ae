"""`peft-bench`: a FedPETuning-shaped quality benchmark of PEFT methods under federation.

Every method of the catalogue (but `adapter_fusion`, which needs stage-1 adapters; pick
with `--methods`) runs in every setting once per seed (`--seeds`). Settings:

- `centralized`: one process trains on all training rows for as many optimizer steps as
  the whole federation takes (rounds x clients x local steps), so it also sees as many
  examples: the budget a federation spends.
- `centralized-seq`: the same for rounds x local steps, the sequential steps of one
  client's path through the federation. Averaging K clients' updates advances the global
  adapter about as far as one client's steps do, so this is the budget a federated run
  effectively has.
- `iid`, `dirichlet:ALPHA`, `natural:COLUMN`: a federation on Flower's Simulation Engine
  over that partition of the training rows; `+scaffold` (`dirichlet:0.1+scaffold`) runs it
  with SCAFFOLD drift correction, `+fedlc` with label-skew logit calibration (tau 1).

Learning rates and local steps: each method's federated defaults (`TrainConfig.for_method`),
in the centralized settings too, unless `--lr` / `--local-steps` set one for every method.
`--recipe server-adam`: clients take one SGD step a round and the server runs Adam at each
method's rate (`RunSpec.server_strategy_options`; `--lr` is then the clients' SGD rate, and
`--strategy-opt eta=R` the server's); the centralized settings train with AdamW at that rate
on as many batches (rounds x clients, or rounds) as the federation's clients take.

`results.csv` has one row per run: final-round and best-round held-out accuracy, and
whether the final accuracy sits on the held-out majority-class rate (a model predicting
one label). `results.md` has, per method, the mean ± std over seeds of each setting, each
federated setting's ratio to `centralized`, trainable parameters and MB each client
uploads per round; `results.png` the same accuracies as grouped bars with std error bars.
All three are rewritten after every run, so an interrupted benchmark keeps its results.

    peft-bench --data ../shared/data/sst2/train.tsv --eval-data ../shared/data/sst2/dev.tsv \\
        --labels 0=negative,1=positive --clients 10 --rounds 4 --seeds 0,1,2 \\
        --settings centralized,centralized-seq,iid,dirichlet:1.0,dirichlet:0.1 --out runs/bench-sst2
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import math
import statistics
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedpeft.common.data.partition import PartitionSpec
from fedpeft.common.errors import ConfigError, FedPeftError
from fedpeft.common.logs import apply_offline_env

if TYPE_CHECKING:
    from fedpeft.server.federation.spec import RunSpec
    from fedpeft.server.federation.task_data import TaskData

log = logging.getLogger("fedpeft.bench")

CENTRALIZED = "centralized"
CENTRALIZED_SEQ = "centralized-seq"
SETTINGS = (CENTRALIZED, CENTRALIZED_SEQ, "iid", "dirichlet:1.0", "dirichlet:0.1")
EXCLUDED_METHODS = ("adapter_fusion",)
"""Methods the default `--methods` leaves out: adapter_fusion fuses adapters trained beforehand."""
COLLAPSE_MARGIN = 0.005
"""A final accuracy this close to the held-out majority-class rate counts as collapse."""
CSV_COLUMNS = ("method", "setting", "seed", "accuracy", "best_accuracy", "best_round", "eval_loss", "majority_rate",
               "collapsed", "trainable_parameters", "upload_mb_per_client_round", "seconds", "auc")


@dataclass(frozen=True)
class BenchRow:
    """One run: a method in a setting with a seed."""

    method: str
    setting: str
    seed: int
    accuracy: float
    """Held-out accuracy at the end: after the last round, or after centralized training."""
    best_accuracy: float
    """The best held-out accuracy of any trained round (centralized: `accuracy`)."""
    best_round: int | None
    """The round of `best_accuracy`; None for centralized runs."""
    eval_loss: float
    majority_rate: float
    """Share of the held-out rows in their most common label (NaN when unknown)."""
    trainable_parameters: int
    upload_mb_per_client_round: float
    seconds: float
    auc: float | None = None
    """Two labels: the final model's ROC AUC of its label margin on the held-out rows (does it
    rank them at all, whatever its threshold); None otherwise."""

    @property
    def collapsed(self) -> bool:
        """True when the run ends where predicting the majority label for every row would."""
        return abs(self.accuracy - self.majority_rate) <= COLLAPSE_MARGIN


def select_methods(text: str | None) -> list[str]:
    """`--methods` (default: the whole catalogue less EXCLUDED_METHODS), checked before any run."""
    from fedpeft.common.methods import available_methods

    known = available_methods()
    if not text:
        return [m for m in known if m not in EXCLUDED_METHODS]
    methods = text.split(",")
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise ConfigError(f"unknown method(s) {unknown}; choose from {known}")
    return methods


def parse_seeds(text: str) -> list[int]:
    """`--seeds 0,1,2`."""
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"{text!r}: give one or more distinct seeds")
    return seeds


VARIANTS: dict[str, dict[str, Any]] = {"scaffold": {"scaffold": True}, "fedlc": {"logit_adjustment": 1.0}}
"""Setting suffixes (`dirichlet:0.1+scaffold`): the run-spec flags a federated setting adds."""


def split_setting(setting: str) -> tuple[str, dict[str, Any]]:
    """(partition, run-spec flags) of a federated setting such as `dirichlet:0.1+scaffold`."""
    partition, *suffixes = setting.split("+")
    unknown = [s for s in suffixes if s not in VARIANTS]
    if unknown:
        raise ConfigError(f"setting {setting!r}: unknown variant(s) {unknown}; choose from {sorted(VARIANTS)}")
    flags: dict[str, Any] = {}
    for suffix in suffixes:
        flags.update(VARIANTS[suffix])
    return partition, flags


def check_settings(settings: Sequence[str]) -> None:
    """Refuse an unknown setting before hours of runs, not when its turn comes."""
    for setting in settings:
        if setting not in (CENTRALIZED, CENTRALIZED_SEQ):
            PartitionSpec.parse(split_setting(setting)[0])
    if len(set(settings)) != len(settings):
        raise ConfigError(f"settings repeat: {','.join(settings)}")


def centralized_steps(setting: str, rounds: int, clients: int, local_steps: int) -> int:
    """Optimizer steps of a centralized setting (the module docstring says why)."""
    sequential = rounds * local_steps
    return sequential * clients if setting == CENTRALIZED else sequential


def majority_rate(rows: Sequence[Mapping[str, Any]], label_column: str) -> float:
    """The accuracy of always predicting the held-out set's most common label."""
    counts = Counter(str(r[label_column]) for r in rows)
    return max(counts.values()) / len(rows)


def best_round(metrics: Sequence[Mapping[str, Any]]) -> tuple[int, float]:
    """(round, accuracy) of the best evaluated trained round of a run's per-round metrics
    (round 0, the untrained adapter, does not count); the last round when none was evaluated."""
    scored = [(r["eval_accuracy"], r["round"]) for r in metrics if r["round"] > 0 and "eval_accuracy" in r]
    if not scored:
        return metrics[-1]["round"], 0.0
    accuracy, round_ = max(scored, key=lambda s: (s[0], -s[1]))  # ties: the earliest round
    return round_, accuracy


def run_centralized(base: RunSpec, method: str, setting: str, seed: int, data: TaskData, majority: float,
                    out_dir: Path) -> BenchRow:
    """Train on all training rows in one process for the setting's step count."""
    from fedpeft.client.training import train_local
    from fedpeft.common.methods import make_config
    from fedpeft.common.model.adapted import AdaptedModel
    from fedpeft.common.model.base_model import resolve_model_dir
    from fedpeft.common.model.quantization import resolve_quantize
    from fedpeft.common.training.objectives import objective_for

    start = time.perf_counter()
    f, training = base.federation, base.training
    spec = dataclasses.replace(base, federation=dataclasses.replace(f, method=method))
    resolved = spec.centralized_train_config()
    assert resolved.local_steps is not None
    steps = centralized_steps(setting, f.rounds, f.clients, resolved.local_steps)
    adapted = AdaptedModel.load(resolve_model_dir(f.model), resolve_quantize(f.quantize), method,  # type: ignore[arg-type]
                                make_config(method, spec.method_options(steps)), seed=seed,
                                num_labels=data.task.num_labels)
    config = dataclasses.replace(resolved, local_steps=steps, local_epochs=0.0,
                                 log_every=max(1, steps // 5))
    train_local(adapted, data.task, data.train_rows, config, seed=seed, label=f"{setting} {method}")
    result = objective_for(adapted.model, adapted.tokenizer, data.task, training.max_length).evaluate(
        adapted.model, data.eval_rows, 32)
    (out_dir / f"{method}-{setting}-seed{seed}.json").write_text(
        json.dumps({"accuracy": result.accuracy, "loss": result.loss, "auc": result.auc, "steps": steps,
                    "learning_rate": config.learning_rate}))
    accuracy = result.accuracy or 0.0
    return BenchRow(method, setting, seed, accuracy, accuracy, None, result.loss, majority,
                    adapted.spec.num_parameters, 0.0, time.perf_counter() - start, result.auc)


def federated_spec(base: RunSpec, method: str, setting: str, seed: int) -> RunSpec:
    """The run spec of one federated setting (`dirichlet:0.1+scaffold`: its partition and flags)."""
    from fedpeft.server.federation.flags import spec_from_flags

    partition, flags = split_setting(setting)
    return spec_from_flags(base, method=method, partition=partition, seed=seed, **flags)


def run_federated(base: RunSpec, method: str, setting: str, seed: int, majority: float, out_dir: Path) -> BenchRow:
    """One simulated federation; an unset learning rate or step count is the method's federated default."""
    from fedpeft.simulations.runner import run_simulation

    start = time.perf_counter()
    spec = federated_spec(base, method, setting, seed)
    result = run_simulation(spec, out_dir / f"{method}-{setting.replace(':', '-').replace('+', '-')}-seed{seed}")
    last = result.rows[-1]
    round_, best = best_round(result.rows)
    manifest = json.loads((result.final_dir / "fedpeft.json").read_text())
    per_client_round = last["bytes_up"] / max(last["clients_accepted"], 1) / 1e6
    return BenchRow(method, setting, seed, last.get("eval_accuracy", 0.0), best, round_, last["eval_loss"], majority,
                    manifest["trainable_parameters"], per_client_round, time.perf_counter() - start, last.get("eval_auc"))


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n-1; 0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _mean_accuracy(runs: Sequence[BenchRow]) -> float:
    return statistics.fmean(r.accuracy for r in runs)


def _format(values: Sequence[float]) -> str:
    mean, std = mean_std(values)
    return f"{mean:.3f}" if len(values) == 1 else f"{mean:.3f} ± {std:.3f}"


def group_runs(rows: Sequence[BenchRow]) -> dict[tuple[str, str], list[BenchRow]]:
    """The runs of each (method, setting), seeds in run order."""
    groups: dict[tuple[str, str], list[BenchRow]] = {}
    for r in rows:
        groups.setdefault((r.method, r.setting), []).append(r)
    return groups


def results_markdown(rows: Sequence[BenchRow], title: str) -> str:
    """Methods x settings (mean ± std over seeds), ratios to `centralized`, size and upload;
    then the federated runs' best-round accuracy."""
    groups = group_runs(rows)
    methods = list(dict.fromkeys(r.method for r in rows))
    settings = list(dict.fromkeys(r.setting for r in rows))
    federated = [s for s in settings if s not in (CENTRALIZED, CENTRALIZED_SEQ)]
    ratios = federated if CENTRALIZED in settings else []
    seeds = ", ".join(str(s) for s in dict.fromkeys(r.seed for r in rows))
    header = settings + [f"{s} / central" for s in ratios] + ["trainable params", "MB up per client per round"]
    lines = [f"**{title}**", "",
             f"Final held-out accuracy, mean ± std over seeds {seeds}; `X / central` is the ratio of the means "
             f"to `centralized` (rounds x clients x local steps); `centralized-seq` trains rounds x local steps.",
             "", "| method | " + " | ".join(header) + " |", "|---|" + "---|" * len(header)]

    def accuracy_cell(runs: list[BenchRow] | None) -> str:
        if not runs:
            return "-"
        collapsed = sum(r.collapsed for r in runs)
        return _format([r.accuracy for r in runs]) + (f" †{collapsed}" if collapsed else "")

    def ratio_cell(method: str, setting: str) -> str:
        runs, central = groups.get((method, setting)), groups.get((method, CENTRALIZED))
        if not runs or not central or not _mean_accuracy(central):
            return "-"
        return f"{_mean_accuracy(runs) / _mean_accuracy(central):.1%}"

    for m in methods:
        own = [r for r in rows if r.method == m]
        cells = [accuracy_cell(groups.get((m, s))) for s in settings] + [ratio_cell(m, s) for s in ratios]
        cells += [f"{own[0].trainable_parameters:,}", f"{max(r.upload_mb_per_client_round for r in own):.3f}"]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    if any(r.collapsed for r in rows):
        rates = ", ".join(sorted({f"{r.majority_rate:.3f}" for r in rows if r.collapsed}))
        lines += ["", f"†n: n seeds ended within {COLLAPSE_MARGIN} of the held-out majority-class rate ({rates}): "
                      "the model predicts one label."]
    if federated:
        lines += ["", "Best-round accuracy of the federated runs, mean ± std (the best round of each seed):", "",
                  "| method | " + " | ".join(federated) + " |", "|---|" + "---|" * len(federated)]
        for m in methods:
            cells = []
            for s in federated:
                runs = groups.get((m, s))
                cells.append("-" if not runs else _format([r.best_accuracy for r in runs])
                             + f" (r{'/'.join(str(r.best_round) for r in runs)})")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    if any(r.auc is not None for r in rows):
        lines += ["", "Final held-out AUC of the label margin, mean ± std (0.5: the model does not rank the rows; a "
                      "run at the majority class with a high AUC only sits on one side of its threshold):", "",
                  "| method | " + " | ".join(settings) + " |", "|---|" + "---|" * len(settings)]
        for m in methods:
            aucs = [[r.auc for r in groups.get((m, s), []) if r.auc is not None] for s in settings]
            lines.append(f"| {m} | " + " | ".join(_format(a) if a else "-" for a in aucs) + " |")
    return "\n".join(lines) + "\n"


def write_results(rows: Sequence[BenchRow], out_dir: Path, title: str) -> str:
    """`results.csv` (one row per run), `results.md` and `results.png`; returns the Markdown."""
    with (out_dir / "results.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(CSV_COLUMNS)
        for r in rows:
            writer.writerow([r.method, r.setting, r.seed, f"{r.accuracy:.4f}", f"{r.best_accuracy:.4f}",
                             "" if r.best_round is None else r.best_round, f"{r.eval_loss:.4f}",
                             f"{r.majority_rate:.4f}", int(r.collapsed), r.trainable_parameters,
                             f"{r.upload_mb_per_client_round:.3f}", f"{r.seconds:.1f}",
                             "" if r.auc is None else f"{r.auc:.4f}"])
    table = results_markdown(rows, title)
    (out_dir / "results.md").write_text(table)
    _plot(rows, out_dir / "results.png", title)
    return table


def _plot(rows: Sequence[BenchRow], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = group_runs(rows)
    methods = list(dict.fromkeys(r.method for r in rows))
    settings = list(dict.fromkeys(r.setting for r in rows))
    width = 0.8 / len(settings)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.3 * len(methods) * len(settings) + 2), 4.2))
    for i, setting in enumerate(settings):
        stats = [mean_std([r.accuracy for r in groups[(m, setting)]]) if (m, setting) in groups else (math.nan, math.nan)
                 for m in methods]
        ax.bar([j + i * width for j in range(len(methods))], [s[0] for s in stats], width,
               yerr=[s[1] for s in stats], capsize=2, label=setting)
    ax.set_xticks([j + width * (len(settings) - 1) / 2 for j in range(len(methods))], methods, rotation=30)
    ax.set_ylabel("held-out accuracy (mean ± std over seeds)")
    ax.set_ylim(0, 1.2)  # headroom for the legend above the bars
    ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, ncols=min(len(settings), 5), loc="upper center")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def read_results(path: Path) -> list[BenchRow]:
    """Rows of a results.csv, to re-render the table and plot without re-running (a CSV from
    before seeds and best rounds reads as seed 0, its final round the best)."""
    with Path(path).open(newline="") as fh:
        return [BenchRow(r["method"], r["setting"], int(r.get("seed") or 0), float(r["accuracy"]),
                         float(r.get("best_accuracy") or r["accuracy"]),
                         int(r["best_round"]) if r.get("best_round") else None, float(r["eval_loss"]),
                         float(r.get("majority_rate") or math.nan), int(r["trainable_parameters"]),
                         float(r["upload_mb_per_client_round"]), float(r["seconds"]),
                         float(r["auc"]) if r.get("auc") else None)
                for r in csv.DictReader(fh)]


def main(argv: Sequence[str] | None = None) -> int:
    apply_offline_env()
    from fedpeft.common.logs import setup_logging
    from fedpeft.server.federation.flags import spec_from_flags
    from fedpeft.server.federation.spec import RECIPES
    from fedpeft.server.federation.task_data import load_task_data
    from fedpeft.server.rate_schedule import SERVER_LR_SCHEDULES

    p = argparse.ArgumentParser(prog="peft-bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="all-minilm-l6-v2")
    p.add_argument("--data", required=True)
    p.add_argument("--eval-data", required=True)
    p.add_argument("--labels", default="0=negative,1=positive")
    p.add_argument("--template", default="{sentence}", help="text column(s): {a} or a pair {a} {b}")
    p.add_argument("--methods", help="comma-separated (default: every method but " + ", ".join(EXCLUDED_METHODS) + ")")
    p.add_argument("--settings", default=",".join(SETTINGS),
                   help="comma-separated: centralized, centralized-seq, iid, dirichlet:ALPHA, natural:COLUMN; a "
                   "federated setting + a variant (dirichlet:0.1+scaffold) runs it with SCAFFOLD")
    p.add_argument("--seeds", type=parse_seeds, default=[0], help="comma-separated; every run once per seed")
    p.add_argument("--lr", type=float, help="one learning rate for every method and setting "
                   "(default: each method's federated default)")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--local-steps", type=int, help="local steps per round for every method "
                   "(default: each method's federated default)")
    p.add_argument("--optimizer", help="the clients' local optimizer for every method (default: adamw)")
    p.add_argument("--strategy", help="the federated settings' server strategy (default: fedavg)")
    p.add_argument("--recipe", choices=RECIPES, help="local (default): clients take the methods' local steps, the "
                   "server averages; server-adam: clients take one SGD step, the server runs Adam at each method's "
                   "rate (the centralized settings then train with AdamW at that rate)")
    p.add_argument("--server-lr-schedule", choices=SERVER_LR_SCHEDULES,
                   help="the federated settings' server eta over rounds (cosine: decays toward 0 at the last round; "
                        "needs --recipe server-adam or an adaptive --strategy); the centralized settings keep a "
                        "constant rate")
    p.add_argument("--strategy-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="a strategy option, repeatable (--strategy fedadam --strategy-opt eta=0.01)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--train-limit", type=int, default=2000)
    p.add_argument("--eval-limit", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=1,
                   help="federated settings score the held-out rows every N rounds and the last; best-round "
                        "accuracy is then the best scored round")
    p.add_argument("--quantize", default="none")
    p.add_argument("--out", default="runs/bench")
    args = p.parse_args(argv)
    setup_logging()
    out_dir = Path(args.out)
    title = (f"{args.model} on {Path(args.data).parent.name}: {args.train_limit or 'all'} train rows, "
             f"{args.clients} clients x {args.rounds} rounds x "
             f"{args.local_steps or 'each method’s federated default'} local steps"
             + (f", recipe {args.recipe}" if args.recipe else "")
             + (f", {args.server_lr_schedule} server rate" if args.server_lr_schedule else ""))
    rows: list[BenchRow] = []
    try:
        methods = select_methods(args.methods)
        settings = args.settings.split(",")
        check_settings(settings)
        overrides = {} if args.lr is None else {"learning_rate": args.lr}
        if args.local_steps is not None:
            overrides["local_steps"] = args.local_steps
        if args.optimizer is not None:
            overrides["optimizer"] = args.optimizer
        if args.strategy is not None:
            overrides["strategy"] = args.strategy
        if args.recipe is not None:
            overrides["recipe"] = args.recipe
        if args.server_lr_schedule is not None:
            overrides["server_lr_schedule"] = args.server_lr_schedule
        if args.strategy_opt:
            overrides["strategy_options"] = dict(item.partition("=")[::2] for item in args.strategy_opt)
        base = spec_from_flags(model=args.model, data=args.data, eval_data=args.eval_data, labels=args.labels,
                               template=args.template, clients=args.clients, rounds=args.rounds,
                               batch_size=args.batch_size, max_length=args.max_length,
                               train_limit=args.train_limit, eval_limit=args.eval_limit,
                               eval_every=args.eval_every, quantize=args.quantize, **overrides)
        base.validate("simulation")  # the centralized settings train without assemble()'s check
        for method in methods:  # every run's spec, before the first trains (a refusal hours in loses the table)
            for setting in settings:
                (spec_from_flags(base, method=method) if setting in (CENTRALIZED, CENTRALIZED_SEQ) else
                 federated_spec(base, method, setting, args.seeds[0])).validate("simulation")
        out_dir.mkdir(parents=True, exist_ok=True)
        for seed in args.seeds:  # seeds outermost: a first full table early, then its spread
            data = load_task_data(base.task, seed)
            if data.task.kind != "classification":
                raise ConfigError(f"peft-bench scores classification tasks; {args.data} is an {data.task.kind} task")
            majority = majority_rate(data.eval_rows, data.task.label_column)
            for method in methods:
                for setting in settings:
                    log.info("=== %s / %s / seed %d ===", method, setting, seed)
                    row = (run_centralized(base, method, setting, seed, data, majority, out_dir)
                           if setting in (CENTRALIZED, CENTRALIZED_SEQ) else
                           run_federated(base, method, setting, seed, majority, out_dir))
                    rows.append(row)
                    log.info("%s / %s / seed %d: accuracy %.3f, best %.3f%s (%.0f s)", method, setting, seed,
                             row.accuracy, row.best_accuracy, " (majority class)" if row.collapsed else "",
                             row.seconds)
                    write_results(rows, out_dir, title)  # partial results survive an interrupted benchmark
    except FedPeftError as exc:
        print(f"peft-bench: error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(write_results(rows, out_dir, title))
    return 0


if __name__ == "__main__":
    sys.exit(main())
