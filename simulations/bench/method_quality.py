"""`peft-bench`: a FedPETuning-shaped quality benchmark of PEFT methods under federation.

For each method: centralized PEFT training (one process, all training rows, the same
total number of optimizer steps as the federation), and federated runs on Flower's
Simulation Engine with IID and Dirichlet(α) label-skewed partitions. Reported per
method: held-out accuracy per setting, trainable parameters, and MB each client uploads
per round. Writes `results.csv`, `results.md` and `results.png` into `--out`.

    peft-bench --data ../shared/data/sst2/train.tsv --eval-data ../shared/data/sst2/dev.tsv \\
        --labels 0=negative,1=positive --out runs/bench-sst2
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fedpeft.common.errors import FedPeftError
from fedpeft.common.logs import apply_offline_env

log = logging.getLogger("fedpeft.bench")

METHODS = ("lora", "bottleneck", "prefix", "bitfit", "ia3", "prompt")
# Per-method learning rates (soft prompts and (IA)³ need much larger steps than LoRA).
LEARNING_RATES = {"lora": 2e-3, "bottleneck": 2e-3, "prefix": 1e-2, "bitfit": 5e-3, "ia3": 1e-2, "prompt": 3e-2}
SETTINGS = ("centralized", "iid", "dirichlet:1.0", "dirichlet:0.1")


@dataclass(frozen=True)
class BenchRow:
    method: str
    setting: str
    accuracy: float
    eval_loss: float
    trainable_parameters: int
    upload_mb_per_client_round: float
    seconds: float


def run_centralized(base, method: str, lr: float, out_dir: Path) -> BenchRow:
    """Train on all training rows in one process for the federation's total step count."""
    from fedpeft.client.training import TrainConfig, train_local
    from fedpeft.common.methods import make_config
    from fedpeft.common.model.adapted import AdaptedModel
    from fedpeft.common.model.base_model import resolve_model_dir
    from fedpeft.common.model.quantization import resolve_quantize
    from fedpeft.common.training.objectives import objective_for
    from fedpeft.server.federation.task_data import load_task_data

    start = time.perf_counter()
    f, training = base.federation, base.training
    data = load_task_data(base.task, f.seed)
    task = data.task
    adapted = AdaptedModel.load(resolve_model_dir(f.model), resolve_quantize(f.quantize), method,  # type: ignore[arg-type]
                                make_config(method), seed=f.seed, num_labels=task.num_labels)
    steps = f.rounds * f.clients * training.local_steps
    config = TrainConfig(local_steps=steps, learning_rate=lr, batch_size=training.batch_size,
                         max_length=training.max_length, log_every=max(1, steps // 5))
    train_local(adapted, task, data.train_rows, config, seed=f.seed, label=f"centralized {method}")
    result = objective_for(adapted.model, adapted.tokenizer, task, training.max_length).evaluate(
        adapted.model, data.eval_rows, 32)
    (out_dir / f"{method}-centralized.json").write_text(json.dumps({"accuracy": result.accuracy, "loss": result.loss}))
    return BenchRow(method, "centralized", result.accuracy or 0.0, result.loss, adapted.spec.num_parameters,
                    0.0, time.perf_counter() - start)


def run_federated(base, method: str, lr: float, setting: str, out_dir: Path) -> BenchRow:
    from fedpeft.server.federation.flags import spec_from_flags
    from fedpeft.simulations.runner import run_simulation

    start = time.perf_counter()
    spec = spec_from_flags(base, method=method, learning_rate=lr, partition=setting)
    result = run_simulation(spec, out_dir / f"{method}-{setting.replace(':', '-')}")
    last = result.rows[-1]
    manifest = json.loads((result.final_dir / "fedpeft.json").read_text())
    per_client_round = last["bytes_up"] / max(last["clients_accepted"], 1) / 1e6
    return BenchRow(method, setting, last.get("eval_accuracy", 0.0), last["eval_loss"],
                    manifest["trainable_parameters"], per_client_round, time.perf_counter() - start)


def write_results(rows: Sequence[BenchRow], out_dir: Path, title: str) -> str:
    """CSV of every run, a Markdown table (methods x settings) and a grouped bar plot."""
    with (out_dir / "results.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["method", "setting", "accuracy", "eval_loss", "trainable_parameters",
                         "upload_mb_per_client_round", "seconds"])
        for r in rows:
            writer.writerow([r.method, r.setting, f"{r.accuracy:.4f}", f"{r.eval_loss:.4f}", r.trainable_parameters,
                             f"{r.upload_mb_per_client_round:.3f}", f"{r.seconds:.1f}"])
    by = {(r.method, r.setting): r for r in rows}
    methods = list(dict.fromkeys(r.method for r in rows))
    settings = [s for s in SETTINGS if any(r.setting == s for r in rows)]
    header = (" | ".join(settings) + " | IID / central | α=1.0 / central | trainable params"
              " | MB up per client per round |")
    lines = [f"**{title}**", "", "| method | " + header,
             "|---|" + "---|" * (len(settings) + 4)]

    def ratio(m: str, setting: str) -> str:
        central = by.get((m, "centralized"))
        if (m, setting) not in by or central is None or not central.accuracy:
            return "-"
        return f"{by[(m, setting)].accuracy / central.accuracy:.1%}"

    for m in methods:
        cells = [f"{by[(m, s)].accuracy:.3f}" if (m, s) in by else "-" for s in settings]
        params = next(r.trainable_parameters for r in rows if r.method == m)
        upload = max(r.upload_mb_per_client_round for r in rows if r.method == m)
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {ratio(m, 'iid')} | {ratio(m, 'dirichlet:1.0')} | "
                     f"{params:,} | {upload:.3f} |")
    table = "\n".join(lines) + "\n"
    (out_dir / "results.md").write_text(table)
    _plot(rows, methods, settings, out_dir / "results.png", title)
    return table


def _plot(rows, methods, settings, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {(r.method, r.setting): r.accuracy for r in rows}
    width = 0.8 / max(len(settings), 1)
    fig, ax = plt.subplots(figsize=(1.6 * len(methods) + 2, 3.8))
    for i, setting in enumerate(settings):
        xs = [j + i * width for j in range(len(methods))]
        ax.bar(xs, [by.get((m, setting), 0.0) for m in methods], width, label=setting)
    ax.set_xticks([j + width * (len(settings) - 1) / 2 for j in range(len(methods))], methods)
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(fontsize=8, ncols=len(settings))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def read_results(path: Path) -> list[BenchRow]:
    """Rows of a results.csv (to re-render the table and plot without re-running)."""
    with Path(path).open(newline="") as fh:
        return [BenchRow(r["method"], r["setting"], float(r["accuracy"]), float(r["eval_loss"]),
                         int(r["trainable_parameters"]), float(r["upload_mb_per_client_round"]), float(r["seconds"]))
                for r in csv.DictReader(fh)]


def main(argv: Sequence[str] | None = None) -> int:
    apply_offline_env()
    from fedpeft.common.logs import setup_logging
    from fedpeft.server.federation.flags import spec_from_flags

    p = argparse.ArgumentParser(prog="peft-bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="all-minilm-l6-v2")
    p.add_argument("--data", required=True)
    p.add_argument("--eval-data", required=True)
    p.add_argument("--labels", default="0=negative,1=positive")
    p.add_argument("--template", default="{sentence}", help="text column(s): {a} or a pair {a} {b}")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--local-steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--train-limit", type=int, default=2000)
    p.add_argument("--eval-limit", type=int, default=0)
    p.add_argument("--quantize", default="none")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/bench")
    args = p.parse_args(argv)
    setup_logging()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = spec_from_flags(model=args.model, data=args.data, eval_data=args.eval_data, labels=args.labels,
                           template=args.template, clients=args.clients, rounds=args.rounds,
                           local_steps=args.local_steps, batch_size=args.batch_size, max_length=args.max_length,
                           train_limit=args.train_limit, eval_limit=args.eval_limit, quantize=args.quantize,
                           seed=args.seed)
    rows: list[BenchRow] = []
    title = (f"{args.model} on {Path(args.data).parent.name}: {args.train_limit or 'all'} train rows, "
             f"{args.clients} clients x {args.rounds} rounds x {args.local_steps} steps")
    try:
        for method in args.methods.split(","):
            if method not in LEARNING_RATES:
                raise FedPeftError(f"benchmark has no learning rate for method {method!r}; choose from {list(METHODS)}")
            for setting in args.settings.split(","):
                log.info("=== %s / %s ===", method, setting)
                row = (run_centralized(base, method, LEARNING_RATES[method], out_dir)
                       if setting == "centralized" else
                       run_federated(base, method, LEARNING_RATES[method], setting, out_dir))
                rows.append(row)
                log.info("%s / %s: accuracy %.3f (%.0f s)", method, setting, row.accuracy, row.seconds)
                write_results(rows, out_dir, title)  # partial results survive an interrupted benchmark
    except FedPeftError as exc:
        print(f"peft-bench: error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(write_results(rows, out_dir, title))
    return 0


if __name__ == "__main__":
    sys.exit(main())
