"""`peft-bench-codecs`: bytes to accuracy of compressed deltas, each codec against fp32 in one run.

Every codec setting runs the same federation (same data, partition, seed, method and
budget) on Flower's Simulation Engine; a setting is an upload codec, optionally with a
download codec after a slash (`topk:0.1+int8/bf16`); `none` is the plain fp32 baseline,
which always runs first. Per run: final and best-round held-out accuracy, its difference
to the fp32 run in points, MB uploaded and downloaded by all clients in all rounds, and
the upload ratio to the fp32 run's (measured in this benchmark) and to uploading the
whole base model in fp32 every client-round (what full fine-tuning would send).

`results.csv` has one row per run, `rounds.csv` one per round (cumulative MB and
accuracy), `results.md` the table and `results.png` accuracy against cumulative MB
uploaded, one line per codec; all rewritten after every run.

    peft-bench-codecs --data ../shared/data/sst2/train.tsv --eval-data ../shared/data/sst2/dev.tsv \\
        --codecs none,fp16,int8,nf4,topk:0.1+int8,topk:0.05+nf4/bf16 --out runs/bench-codecs

`--sizes` only prints what one client sends and receives per round with each codec for a
model and method (the sizes follow from the delta's shapes), e.g. for the default job:

    peft-bench-codecs --sizes --model smollm2-135m-instruct --method lora
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedpeft.common.errors import ConfigError, FedPeftError
from fedpeft.common.logs import apply_offline_env
from fedpeft.simulations.bench.method_quality import best_round, majority_rate

log = logging.getLogger("fedpeft.bench")
BASELINE = "none"
DEFAULT_CODECS = "none,fp16,int8,nf4,topk:0.1+int8,topk:0.05+int8,topk:0.1+int8/bf16"
CSV_COLUMNS = ("codec", "upload", "download", "seed", "accuracy", "best_accuracy", "points_vs_fp32", "mb_up", "mb_down",
               "up_ratio_vs_fp32", "down_ratio_vs_fp32", "up_ratio_vs_full_model", "seconds")


@dataclass(frozen=True)
class CodecRun:
    """One federation with one codec setting."""

    setting: str
    seed: int
    accuracy: float
    best_accuracy: float
    bytes_up: int
    bytes_down: int
    rounds: list[dict[str, Any]]
    seconds: float

    @property
    def upload(self) -> str:
        return self.setting.split("/", 1)[0]

    @property
    def download(self) -> str:
        return self.setting.split("/", 1)[1] if "/" in self.setting else "none"


def parse_codecs(text: str) -> list[str]:
    """Codec settings, the fp32 baseline first (added when missing); each checked before any run."""
    from fedpeft.common.codecs import Codec, CodecError

    settings = [s.strip() for s in text.split(",") if s.strip()]
    if BASELINE in settings:
        settings.remove(BASELINE)
    settings.insert(0, BASELINE)
    for setting in settings:
        upload, _, download = setting.partition("/")
        for name, where in ((upload, "upload"), (download, "download")):
            if name and name != BASELINE:
                try:
                    Codec.parse(name, f"--codecs {setting!r} ({where})")
                except CodecError as exc:
                    raise ConfigError(str(exc)) from None
    if len(set(settings)) != len(settings):
        raise ConfigError(f"--codecs lists a setting twice: {settings}")
    return settings


def full_model_bytes(model: str) -> int:
    """fp32 bytes of every parameter of the base model (what a full fine-tuning client uploads)."""
    from safetensors import safe_open

    from fedpeft.common.model.base_model import resolve_model_dir

    total = 0
    for path in sorted(resolve_model_dir(model).glob("*.safetensors")):
        with safe_open(str(path), framework="numpy") as fh:
            for key in fh.keys():  # noqa: SIM118 (safe_open is not a mapping)
                shape = fh.get_slice(key).get_shape()
                count = 1
                for dim in shape:
                    count *= dim
                total += 4 * count
    return total


def size_table(model: str, method: str, settings: Sequence[str], num_labels: int | None = None,
               options: dict[str, str] | None = None) -> str:
    """Bytes one client sends and receives per round with each codec setting, for the real delta of
    `method` on `model` (no training: the sizes follow from the shapes), against fp32 and a full
    fp32 model upload."""
    from collections import OrderedDict

    from fedpeft.common.codecs import Codec, payload_nbytes
    from fedpeft.common.methods import make_config
    from fedpeft.common.model.adapted import AdaptedModel
    from fedpeft.common.model.base_model import resolve_model_dir
    from fedpeft.server.compression import plain_nbytes

    adapted = AdaptedModel.load(resolve_model_dir(model), "none", method, make_config(method, options or {}),
                                num_labels=num_labels)
    spec = adapted.spec
    layout = OrderedDict((n, s.shape) for n, s in spec.tensors.items())
    plain, full = plain_nbytes(spec), full_model_bytes(model)

    def size(name: str) -> int:
        return plain if not name or name == BASELINE else payload_nbytes(Codec.parse(name), layout)

    lines = [f"**{method} on {model}: {spec.num_parameters:,} trainable parameters in {len(layout)} tensors; "
             f"full model {full / 1e6:,.1f} MB in fp32**", "",
             "| codec (up / down) | MB up per client-round | MB down | up: x fewer than fp32 | "
             "up: x fewer than full model |", "|---|---|---|---|---|"]
    for setting in settings:
        upload, _, download = setting.partition("/")
        up, down = size(upload), size(download)
        label = "fp32 (none)" if setting == BASELINE else setting.replace("/", " / ")
        lines.append(f"| {label} | {up / 1e6:.3f} | {down / 1e6:.3f} | {plain / up:.1f} | {full / up:,.0f} |")
    return "\n".join(lines) + "\n"


def run_codec(base: Any, setting: str, seed: int, out_dir: Path) -> CodecRun:
    from fedpeft.server.federation.flags import spec_from_flags
    from fedpeft.simulations.runner import run_simulation

    upload, _, download = setting.partition("/")
    start = time.perf_counter()
    spec = spec_from_flags(base, seed=seed, upload_codec=upload, download_codec=download or "none")
    name = setting.replace(":", "-").replace("+", "-").replace("/", "--")
    result = run_simulation(spec, out_dir / f"{name}-seed{seed}")
    rows = [dict(r) for r in result.rows]
    _, best = best_round(rows)
    return CodecRun(setting, seed, rows[-1].get("eval_accuracy", 0.0), best, sum(r["bytes_up"] for r in rows),
                    sum(r["bytes_down"] for r in rows), rows, time.perf_counter() - start)


def summary_rows(runs: Sequence[CodecRun], full_model: int, clients_rounds: int) -> list[dict[str, Any]]:
    """One row per run, each compared with the fp32 run of its seed."""
    baseline = {r.seed: r for r in runs if r.setting == BASELINE}
    out = []
    for r in runs:
        base = baseline.get(r.seed)
        out.append({
            "codec": r.setting, "upload": r.upload, "download": r.download, "seed": r.seed,
            "accuracy": r.accuracy, "best_accuracy": r.best_accuracy,
            "points_vs_fp32": 100 * (r.accuracy - base.accuracy) if base else float("nan"),
            "mb_up": r.bytes_up / 1e6, "mb_down": r.bytes_down / 1e6,
            "up_ratio_vs_fp32": base.bytes_up / r.bytes_up if base and r.bytes_up else float("nan"),
            "down_ratio_vs_fp32": base.bytes_down / r.bytes_down if base and r.bytes_down else float("nan"),
            "up_ratio_vs_full_model": full_model * clients_rounds / r.bytes_up if r.bytes_up else float("nan"),
            "seconds": r.seconds})
    return out


def results_markdown(summary: Sequence[dict[str, Any]], title: str) -> str:
    """Per codec setting: means over seeds of accuracy and bytes, ratios to fp32 and to a full-model upload."""
    settings = list(dict.fromkeys(r["codec"] for r in summary))
    seeds = sorted({r["seed"] for r in summary})
    lines = [f"**{title}**", "", f"Means over seeds {', '.join(map(str, seeds))}; ratios are fp32's bytes over the "
             "codec's (both measured in this run), and a full fp32 model upload per client-round over the codec's.", "",
             "| codec (up / down) | accuracy | best round | vs fp32 (points) | MB up | MB down | up: x fewer than fp32 "
             "| down: x fewer | up: x fewer than full model |", "|---|---|---|---|---|---|---|---|---|"]
    for setting in settings:
        rows = [r for r in summary if r["codec"] == setting]

        def mean(key: str, rows: list[dict[str, Any]] = rows) -> float:
            return statistics.fmean(r[key] for r in rows)

        label = "fp32 (none)" if setting == BASELINE else setting.replace("/", " / ")
        lines.append(f"| {label} | {mean('accuracy'):.3f} | {mean('best_accuracy'):.3f} | "
                     f"{mean('points_vs_fp32'):+.1f} | {mean('mb_up'):.2f} | {mean('mb_down'):.2f} | "
                     f"{mean('up_ratio_vs_fp32'):.1f} | {mean('down_ratio_vs_fp32'):.1f} | "
                     f"{mean('up_ratio_vs_full_model'):,.0f} |")
    return "\n".join(lines) + "\n"


def write_results(runs: Sequence[CodecRun], out_dir: Path, title: str, full_model: int, clients_rounds: int) -> str:
    summary = summary_rows(runs, full_model, clients_rounds)
    with (out_dir / "results.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()} for row in summary)
    with (out_dir / "rounds.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["codec", "seed", "round", "accuracy", "cumulative_mb_up", "cumulative_mb_down"])
        for r in runs:
            up = down = 0
            for row in r.rounds:
                up, down = up + row["bytes_up"], down + row["bytes_down"]
                writer.writerow([r.setting, r.seed, row["round"], f"{row.get('eval_accuracy', float('nan')):.4f}",
                                 f"{up / 1e6:.4f}", f"{down / 1e6:.4f}"])
    table = results_markdown(summary, title)
    (out_dir / "results.md").write_text(table)
    _plot(runs, out_dir / "results.png", title)
    return table


def _plot(runs: Sequence[CodecRun], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in runs:
        cumulative, total = [], 0
        for row in r.rounds:
            total += row["bytes_up"]
            cumulative.append(max(total, 1) / 1e6)
        ax.plot(cumulative, [row.get("eval_accuracy", float("nan")) for row in r.rounds], marker="o", markersize=3,
                label=f"{r.setting} (seed {r.seed})")
    ax.set_xscale("log")
    ax.set_xlabel("cumulative MB uploaded by all clients (log)")
    ax.set_ylabel("held-out accuracy")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    apply_offline_env()
    from fedpeft.common.logs import setup_logging
    from fedpeft.server.federation.flags import spec_from_flags
    from fedpeft.server.federation.task_data import load_task_data
    from fedpeft.simulations.bench.method_quality import parse_seeds

    p = argparse.ArgumentParser(prog="peft-bench-codecs", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="all-minilm-l6-v2")
    p.add_argument("--data", help="training file (default: the built-in task)")
    p.add_argument("--eval-data", help="held-out file (with --data)")
    p.add_argument("--labels", default="0=negative,1=positive")
    p.add_argument("--template", default="{sentence}", help="text column(s): {a} or a pair {a} {b}")
    p.add_argument("--method", default="lora")
    p.add_argument("--codecs", default=DEFAULT_CODECS, help="comma-separated UPLOAD[/DOWNLOAD] codec settings; "
                   "'none' (fp32) always runs, first")
    p.add_argument("--partition", default="iid")
    p.add_argument("--seeds", type=parse_seeds, default=[0])
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--local-steps", type=int, help="default: the method's federated default")
    p.add_argument("--lr", type=float, help="default: the method's federated default")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--train-limit", type=int, default=2000)
    p.add_argument("--eval-limit", type=int, default=0)
    p.add_argument("--builtin-train-rows", type=int, default=800)
    p.add_argument("--quantize", default="none")
    p.add_argument("--out", default="runs/bench-codecs")
    p.add_argument("--sizes", action="store_true", help="only print what each codec sends for this model and method "
                   "(no training)")
    p.add_argument("--method-opt", action="append", default=[], metavar="KEY=VALUE", help="method option (with --sizes)")
    args = p.parse_args(argv)
    setup_logging()
    if args.sizes:
        try:
            options = dict(o.split("=", 1) for o in args.method_opt)
            print(size_table(args.model, args.method, parse_codecs(args.codecs), options=options))
        except (FedPeftError, ValueError) as exc:
            print(f"peft-bench-codecs: error: {exc}", file=sys.stderr)
            return 2
        return 0
    out_dir = Path(args.out)
    runs: list[CodecRun] = []
    try:
        settings = parse_codecs(args.codecs)
        optional = {k: v for k, v in {"learning_rate": args.lr, "local_steps": args.local_steps}.items() if v is not None}
        data_flags = ({"data": args.data, "eval_data": args.eval_data, "labels": args.labels, "template": args.template,
                       "train_limit": args.train_limit} if args.data else {"builtin_train_rows": args.builtin_train_rows})
        base = spec_from_flags(model=args.model, method=args.method, clients=args.clients, rounds=args.rounds,
                               partition=args.partition, batch_size=args.batch_size, max_length=args.max_length,
                               eval_limit=args.eval_limit, quantize=args.quantize, **data_flags, **optional)
        full_model = full_model_bytes(args.model)
        title = (f"{args.method} on {args.model}, {Path(args.data).parent.name if args.data else 'built-in task'}: "
                 f"{args.clients} clients x {args.rounds} rounds, {args.partition}")
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "settings.json").write_text(json.dumps({**vars(args), "seeds": args.seeds, "codecs": settings,
                                                           "full_model_bytes": full_model}, indent=1))
        for seed in args.seeds:
            data = load_task_data(base.task, seed)
            majority = majority_rate(data.eval_rows, data.task.label_column) if data.task.kind == "classification" else 0
            for setting in settings:
                log.info("=== codec %s / seed %d ===", setting, seed)
                run = run_codec(base, setting, seed, out_dir)
                runs.append(run)
                log.info("codec %s / seed %d: accuracy %.3f (majority %.3f), %.2f MB up, %.2f MB down (%.0f s)",
                         setting, seed, run.accuracy, majority, run.bytes_up / 1e6, run.bytes_down / 1e6, run.seconds)
                write_results(runs, out_dir, title, full_model, args.clients * args.rounds)
    except FedPeftError as exc:
        print(f"peft-bench-codecs: error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(write_results(runs, out_dir, title, full_model, args.clients * args.rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
