"""Human-facing results of a run: the before/after table and the metrics plot."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def last_scored(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The last row that scored the held-out rows (round 0 always does)."""
    return next(r for r in reversed(rows) if "eval_loss" in r)


def before_after_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table: held-out metrics before training (round 0) and after the last scored
    round (the last one, unless a resume stopped a run on a round `task.eval_every` skipped)."""
    first, last = rows[0], last_scored(rows)
    lines = [f"| metric | before (round 0) | after (round {last['round']}) | change |", "|---|---|---|---|"]
    change = last["eval_loss"] - first["eval_loss"]
    lines.append(f"| eval loss | {first['eval_loss']:.4f} | {last['eval_loss']:.4f} | {change:+.4f} |")
    if "eval_accuracy" in first:
        lines.append(f"| eval accuracy | {first['eval_accuracy']:.3f} | {last['eval_accuracy']:.3f} | "
                     f"{last['eval_accuracy'] - first['eval_accuracy']:+.3f} |")
    up = sum(r.get("bytes_up", 0) for r in rows)
    down = sum(r.get("bytes_down", 0) for r in rows)
    lines.append(f"| bytes up / down (all rounds) | | {up / 1e6:.2f} MB / {down / 1e6:.2f} MB | |")
    raw_up, raw_down = (sum(r.get(k, 0) for r in rows) for k in ("bytes_up_raw", "bytes_down_raw"))
    if any("compression_up" in r for r in rows) and up and down:  # a compressed run: what plain fp32 would have sent
        lines.append(f"| as plain fp32 (compression) | | {raw_up / 1e6:.2f} MB / {raw_down / 1e6:.2f} MB | "
                     f"x{raw_up / up:.1f} / x{raw_down / down:.1f} |")
    return "\n".join(lines)


def offsite_table(rows: Sequence[dict[str, Any]], offsite: dict[str, Any]) -> str:
    """Markdown table of an Offsite-Tuning run: full model zero-shot, emulator before and
    after federated tuning (what clients see), and the adapter plugged into the full model."""

    def cell(loss: float, acc: float | None) -> str:
        return f"| {loss:.4f} | {acc:.3f} |" if acc is not None else f"| {loss:.4f} | - |"

    first, last = rows[0], last_scored(rows)
    lines = ["| model | eval loss | eval acc |", "|---|---|---|",
             "| full model, zero-shot " + cell(offsite["full_zero_shot_loss"], offsite.get("full_zero_shot_accuracy")),
             "| emulator, zero-shot " + cell(first["eval_loss"], first.get("eval_accuracy")),
             f"| emulator + adapter (round {last['round']}) " + cell(last["eval_loss"], last.get("eval_accuracy")),
             "| full model + adapter (plug-in) " + cell(offsite["plug_in_loss"], offsite.get("plug_in_accuracy"))]
    return "\n".join(lines)


def rounds_table(rows: Sequence[dict[str, Any]]) -> str:
    """One line per round, for logs and closing notes."""
    has_acc = "eval_accuracy" in rows[0]
    head = "| round | eval loss |" + (" eval acc |" if has_acc else "") + " train loss | up MB | down MB | round s |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        train = f"{r['train_loss']:.4f}" if r.get("train_loss") is not None else "-"
        acc = f" {_cell(r.get('eval_accuracy'), '.3f')} |" if has_acc else ""
        lines.append(f"| {r['round']} | {_cell(r.get('eval_loss'), '.4f')} |{acc} {train} | {r['bytes_up'] / 1e6:.2f} | "
                     f"{r['bytes_down'] / 1e6:.2f} | {r['seconds']:.1f} |")
    return "\n".join(lines)


def _cell(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def plot_metrics(rows: Sequence[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Eval loss (and accuracy) per round as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    scored = [r for r in rows if "eval_loss" in r]  # `task.eval_every` > 1 skips rounds
    rounds = [r["round"] for r in scored]
    has_acc = "eval_accuracy" in rows[0]
    fig, axes = plt.subplots(1, 2 if has_acc else 1, figsize=(10 if has_acc else 5, 3.6), squeeze=False)
    ax = axes[0][0]
    ax.plot(rounds, [r["eval_loss"] for r in scored], marker="o", label="held-out")
    train = [(r["round"], r["train_loss"]) for r in rows if r.get("train_loss") is not None]
    if train:
        ax.plot(*zip(*train, strict=True), marker="x", linestyle="--", label="client train (mean)")
    ax.set_xlabel("round")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    if has_acc:
        ax = axes[0][1]
        ax.plot(rounds, [r["eval_accuracy"] for r in scored], marker="o", color="tab:green")
        ax.set_xlabel("round")
        ax.set_ylabel("held-out accuracy")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    for axis in axes[0]:
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def line_plot(series: dict[str, list[tuple[float, float]]], path: Path, xlabel: str, ylabel: str, title: str,
              reference: tuple[str, float] | None = None, log2_x: bool = False) -> Path:
    """One line per named series of (x, y) points (benchmarks), plus an optional horizontal reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, points in series.items():
        if points:
            points = sorted(points)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    if reference is not None:
        ax.axhline(reference[1], linestyle="--", color="gray", label=reference[0])
    if log2_x:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def overhead_line(rows: Sequence[dict[str, Any]]) -> str:
    """How much a virtual client costs a worker that already holds the base model."""
    trained = [r for r in rows if r.get("client_swap_seconds") is not None]
    if not trained:
        return ""
    swap = sum(r["client_swap_seconds"] for r in trained) / len(trained)
    train = sum(r["client_train_seconds"] for r in trained) / len(trained)
    loads = sum(r.get("client_model_loads", 0) for r in trained)
    load_max = max(r.get("client_load_seconds_max", 0.0) for r in trained)
    clients = sum(r["clients_accepted"] for r in trained)
    return (f"per-client overhead: {swap:.3f} s to swap the delta in (vs {train:.1f} s local training); "
            f"base model loaded {loads}x for {clients} client-rounds (max {load_max:.1f} s per load)")
