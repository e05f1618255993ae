"""`peft-bench-topology`: what a client pays under each topology, and what accuracy it buys.

For plain FL (4-bit QLoRA on the whole model) and Offsite-Tuning (4-bit emulator +
LoRA on the adapter blocks), on a real task:
- accuracy: a federated run per topology on Flower's Simulation Engine (`peft-sim`'s
  runner). FL gives the full model zero-shot (round 0) and full-model federated LoRA;
  offsite gives emulator zero-shot, emulator + adapter (what clients see) and the
  adapter plugged into the full model;
- per client step, each in a fresh process (`peft-bench-client`'s harness,
  `fedpeft.simulations.bench.client_cost`): peak RSS minus a process that only imports the
  same libraries, compute seconds per step, and bytes on the wire per step (delta up +
  down per round divided by local steps), all as ratios to plain FL.

    peft-bench-topology --data ../shared/data/sst2/train.tsv --eval-data ../shared/data/sst2/dev.tsv \\
        --template $'Review: {sentence}\\nSentiment:' --labels 0=negative,1=positive --out runs/bench-topology
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedpeft.common.errors import ConfigError, FedPeftError
from fedpeft.common.logs import apply_offline_env

log = logging.getLogger("fedpeft.bench")


@dataclass(frozen=True)
class ProbeSettings:
    """What every client-step measurement shares (same data, batch and length for all topologies)."""

    data: str
    template: str | None
    labels: str | None
    quantize: str = "4bit"
    batch_size: int = 8
    max_length: int = 64
    steps: int = 5
    threads: int = 1
    repeats: int = 1
    method_options: dict[str, str] = field(default_factory=dict)


def measure_client_step(model_dir: Path, settings: ProbeSettings, method_options: dict[str, str] | None = None,
                        local_steps: int = 10, baseline: dict[str, Any] | None = None) -> dict[str, Any]:
    """One client holding `model_dir` (the full model for fl, the emulator for offsite):
    peak memory over what the libraries alone take, seconds per step, bytes on the wire
    per step. Measured by `peft-bench-client`'s harness (`client_cost`), so these
    figures and that benchmark's split rows are comparable."""
    from fedpeft.simulations.bench.client_cost import measure_fl_client_step

    result = measure_fl_client_step(model_dir, quantize=settings.quantize, batch_size=settings.batch_size,
                                    max_length=settings.max_length, steps=settings.steps, local_steps=local_steps,
                                    data=settings.data, labels=settings.labels, template=settings.template,
                                    lora={**settings.method_options, **(method_options or {})}, threads=settings.threads,
                                    repeats=settings.repeats, baseline=baseline)
    return {**result, "client_peak_mb": result["peak_memory_bytes"] / 2**20, "model_bytes": result["tensor_bytes"],
            "client_loaded_mb": result["loaded_memory_bytes"] / 2**20, "seconds_per_step": result["step_seconds"]}


@dataclass(frozen=True)
class OffsiteVariant:
    bottom: int
    top: int
    keep_every: int

    @property
    def name(self) -> str:
        return f"offsite {self.bottom}+{self.top}, every {self.keep_every}"

    @classmethod
    def parse(cls, text: str) -> OffsiteVariant:
        try:
            bottom, top, every = (int(p) for p in text.split(":"))
        except ValueError:
            raise ConfigError(f"offsite variant {text!r} is not BOTTOM:TOP:KEEP_EVERY (e.g. 2:2:4)") from None
        return cls(bottom, top, every)


def _accuracy(rows: list[dict[str, Any]], index: int) -> float | None:
    return rows[index].get("eval_accuracy")


def run_benchmark(base, variants: Sequence[OffsiteVariant], probe: ProbeSettings, out_dir: Path,
                  skip_accuracy: bool = False) -> list[dict[str, Any]]:
    """One accuracy run and one client-step probe per topology; returns the table rows."""
    from fedpeft.common.model.base_model import resolve_model_dir
    from fedpeft.common.offsite.run import (
        OffsiteSettings,
        adapter_method_options,
        full_layer_count,
        plan_layers,
        prepare_emulator,
    )
    from fedpeft.server.federation.flags import spec_from_flags
    from fedpeft.simulations.bench.client_cost import measure_baseline
    from fedpeft.simulations.runner import run_simulation

    full_dir = resolve_model_dir(base.federation.model)
    baseline = measure_baseline(probe.threads, probe.repeats)
    results: list[dict[str, Any]] = []
    row: dict[str, Any] = {"topology": "fl (4-bit QLoRA, whole model)"}
    if not skip_accuracy:
        fl = run_simulation(spec_from_flags(base, topology="fl"), out_dir / "fl")
        row |= {"full_zero_shot_acc": _accuracy(fl.rows, 0), "federated_acc": _accuracy(fl.rows, -1)}
    row |= measure_client_step(full_dir, probe, local_steps=base.train_config().local_steps, baseline=baseline)
    row["emulator_blocks"] = f"{full_layer_count(full_dir)}/{full_layer_count(full_dir)}"
    results.append(row)
    _write(results, out_dir)
    for variant in variants:
        settings = OffsiteSettings(bottom=variant.bottom, top=variant.top, keep_every=variant.keep_every)
        run_dir = out_dir / f"offsite-{variant.bottom}-{variant.top}-{variant.keep_every}"
        row = {"topology": variant.name}
        if not skip_accuracy:
            off = run_simulation(spec_from_flags(base, topology="offsite", offsite_bottom=variant.bottom,
                                                 offsite_top=variant.top, offsite_keep_every=variant.keep_every), run_dir)
            assert off.offsite is not None
            row |= {"full_zero_shot_acc": off.offsite["full_zero_shot_accuracy"],
                    "emulator_zero_shot_acc": _accuracy(off.rows, 0), "emulator_adapter_acc": _accuracy(off.rows, -1),
                    "plug_in_acc": off.offsite["plug_in_accuracy"]}
            emulator_dir = run_dir / "emulator"
        else:
            emulator_dir, _ = prepare_emulator(full_dir, run_dir, settings, base.federation.seed)
        layer_map = plan_layers(full_dir, settings)
        options = adapter_method_options("lora", probe.method_options, layer_map)
        row |= measure_client_step(emulator_dir, probe, options, local_steps=base.train_config().local_steps, baseline=baseline)
        row["emulator_blocks"] = f"{layer_map.emulator_layers}/{layer_map.full_layers}"
        results.append(row)
        _write(results, out_dir)
    return results


COLUMNS = ("topology", "emulator_blocks", "full_zero_shot_acc", "federated_acc", "emulator_zero_shot_acc",
           "emulator_adapter_acc", "plug_in_acc", "client_peak_mb", "memory_x_less", "client_loaded_mb",
           "model_mb", "seconds_per_step", "time_ratio", "bytes_per_step", "bytes_ratio", "delta_bytes")


def _with_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    fl = rows[0]
    out = []
    for r in rows:
        r = dict(r)
        r["model_mb"] = r["model_bytes"] / 2**20
        r["memory_x_less"] = fl["client_peak_mb"] / r["client_peak_mb"]
        r["time_ratio"] = r["seconds_per_step"] / fl["seconds_per_step"]
        r["bytes_ratio"] = r["bytes_per_step"] / fl["bytes_per_step"]
        out.append(r)
    return out


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:,.0f}"
    return str(value)


def results_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: accuracy, then client cost and its ratio to plain FL."""
    rows = _with_ratios(rows)
    head = ("| topology | blocks held | full zero-shot | FL LoRA | emulator zero-shot | emulator + adapter | plug-in "
            "| client peak MB | × less memory | weights MB | s / step | × FL time | bytes / step | × FL bytes |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        cells = [r["topology"], r.get("emulator_blocks"), r.get("full_zero_shot_acc"), r.get("federated_acc"),
                 r.get("emulator_zero_shot_acc"), r.get("emulator_adapter_acc"), r.get("plug_in_acc"),
                 r["client_peak_mb"], r["memory_x_less"], r["model_mb"], r["seconds_per_step"], r["time_ratio"],
                 int(r["bytes_per_step"]), r["bytes_ratio"]]
        lines.append("| " + " | ".join(_fmt(c) for c in cells) + " |")
    return "\n".join(lines)


def _write(rows: list[dict[str, Any]], out_dir: Path) -> None:
    rows = _with_ratios(rows)
    with (out_dir / "results.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=[*COLUMNS, *sorted({k for r in rows for k in r} - set(COLUMNS))])
        writer.writeheader()
        writer.writerows(rows)
    (out_dir / "results.md").write_text(results_table(rows) + "\n")


def plot_results(rows: list[dict[str, Any]], path: Path) -> Path:
    """Bars: client memory, time and bytes per step as a fraction of plain FL."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _with_ratios(rows)
    names = [r["topology"].split(" (")[0] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, (key, label) in zip(axes, [("client_peak_mb", "client peak memory (MB)"), ("seconds_per_step", "s per step"),
                                       ("bytes_per_step", "bytes on the wire per step")], strict=True):
        ax.bar(names, [r[key] for r in rows], color=["#888"] + ["#3a7"] * (len(rows) - 1))
        ax.set_title(label, fontsize=10)
        ax.tick_params(axis="x", labelrotation=15, labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    apply_offline_env()
    p = argparse.ArgumentParser(prog="peft-bench-topology", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--data", required=True)
    p.add_argument("--eval-data", default=None)
    p.add_argument("--template", default=None)
    p.add_argument("--labels", default=None)
    p.add_argument("--offsite", action="append", default=[], metavar="BOTTOM:TOP:KEEP_EVERY",
                   help="offsite variant(s), repeatable (default 2:2:4)")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--local-steps", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--train-limit", type=int, default=2000)
    p.add_argument("--eval-limit", type=int, default=0, help="held-out rows scored (0 = all)")
    p.add_argument("--probe-steps", type=int, default=5, help="measured client steps per topology (after 1 warm-up)")
    p.add_argument("--probe-threads", type=int, default=1, help="torch threads in the probe (a simulated client uses 1)")
    p.add_argument("--probe-repeats", type=int, default=1, help="fresh-process runs per probe (figures are medians)")
    p.add_argument("--skip-accuracy", action="store_true", help="only the client-step measurements")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/bench-topology")
    args = p.parse_args(argv)
    try:
        from fedpeft.common.logs import setup_logging
        from fedpeft.server.federation.flags import spec_from_flags

        setup_logging()
        variants = [OffsiteVariant.parse(v) for v in (args.offsite or ["2:2:4"])]
        base = spec_from_flags(model=args.model, data=args.data, eval_data=args.eval_data, template=args.template,
                               labels=args.labels, clients=args.clients, rounds=args.rounds, local_steps=args.local_steps,
                               learning_rate=args.lr, batch_size=args.batch_size, max_length=args.max_length,
                               train_limit=args.train_limit, eval_limit=args.eval_limit, quantize="4bit", seed=args.seed)
        base.validate("simulation")
        probe = ProbeSettings(data=args.data, template=args.template, labels=args.labels, batch_size=args.batch_size,
                              max_length=args.max_length, steps=args.probe_steps, threads=args.probe_threads,
                              repeats=args.probe_repeats)
        out_dir = Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        rows = run_benchmark(base, variants, probe, out_dir, skip_accuracy=args.skip_accuracy)
    except FedPeftError as exc:
        print(f"peft-bench-topology: error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(results_table(rows))
    plot_results(rows, out_dir / "results.png")
    print(f"\nwritten: {out_dir / 'results.csv'}, {out_dir / 'results.md'}, {out_dir / 'results.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
