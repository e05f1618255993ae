"""`peft-bench-attack`: what malicious clients do to a federation, under each defense.

N clients (default 10) fine-tune LoRA on a classification task (SST-2 with
all-MiniLM-L6-v2 by default) on Flower's Simulation Engine; 1 or 2 of them (partition ids
0 and 1) are malicious and rewrite their TRAIN replies with one attack of
`fedpeft.simulations.harness.attacks` (update x1e3 / x1e6, sign flip, num-examples
inflation, NaN). Every attack, and a clean run, is run under every defense of
`defense_table` (run-spec overrides). Reported per (attack, defense): final held-out
accuracy, its change vs the clean run of the same defense and vs clean `none`, how far
the global adapter moved (L2 of last minus round-0 global delta), seconds per round and
the replies the server rejected. Writes `results.csv`, `results.md` and `results.png`
into `--out` (each run's own dir beside them; a finished run is reused on a rerun).

    peft-bench-attack --data ../shared/data/sst2/train.tsv --eval-data ../shared/data/sst2/dev.tsv \\
        --attacks clean,scale1e3,nan,inflate --defenses none,median --out runs/bench-attack
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import math
import sys
import textwrap
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fedpeft.common.errors import ConfigError, FedPeftError
from fedpeft.common.logs import apply_offline_env
from fedpeft.server.robust import UNBOUNDED

log = logging.getLogger("fedpeft.bench")

ATTACK_NAMES = ("clean", "scale1e3", "scale1e6", "signflip", "inflate", "nan", "adaptive")
DEFENSE_NAMES = ("default", "none", "normbound", "median", "trimmed", "krum")
NORM_BOUND_RATIO = 5.0
"""`normbound`: refuse an update longer than this multiple of the round's median update norm."""

ROBUST_OFF: dict[str, Any] = {f"robust.{key}": value for key, value in dataclasses.asdict(UNBOUNDED).items()}
"""Every `[robust]` reply bound off (typed metrics and finite deltas are always checked)."""


def defense_table(malicious: int) -> dict[str, dict[str, Any]]:
    """Each defense as run-spec overrides ({"section.key": value}); the one place they are defined.
    `default` is the run spec's own defaults (whatever they are); the others switch every
    `[robust]` bound off except the one they name, so each measures one mechanism."""
    fedavg = {"federation.strategy": "fedavg", "federation.strategy_options": {}}
    return {
        "default": {},
        "none": {**fedavg, **ROBUST_OFF},
        "normbound": {**fedavg, **ROBUST_OFF, "robust.norm_bound_ratio": NORM_BOUND_RATIO},
        "median": {**ROBUST_OFF, "federation.strategy": "fedmedian", "federation.strategy_options": {}},
        "trimmed": {**ROBUST_OFF, "federation.strategy": "fedtrimmedavg", "federation.strategy_options": {}},
        "krum": {**ROBUST_OFF, "federation.strategy": "krum",
                 "federation.strategy_options": {"num_malicious_nodes": malicious}},
    }


@dataclass(frozen=True)
class AttackRow:
    attack: str
    defense: str
    accuracy: float | None
    """Held-out accuracy of the last recorded global adapter."""
    eval_loss: float | None
    rounds_done: int
    rounds: int
    seconds_per_round: float
    """Mean wall time of a training round (send, train, receive, aggregate)."""
    run_seconds: float
    """The whole run, Ray start and evaluations included."""
    accepted: int
    rejected: int
    """Replies the server left out, summed over rounds (from metrics.jsonl's clients_rejected)."""
    update_norm: float
    """L2 norm of the last recorded global delta minus round 0's: how far the federation moved."""
    status: str = "ok"

    @property
    def finished(self) -> bool:
        return self.rounds_done == self.rounds


# ---- one run ----------------------------------------------------------------------------------

def _global_update_norm(run_dir: Path, last_round: int) -> float:
    from fedpeft.common.protocol.deltas import load_delta_file

    checkpoints = run_dir / "checkpoints"
    first = load_delta_file(checkpoints / "global-round-0000.safetensors")
    last = load_delta_file(checkpoints / f"global-round-{last_round:04d}.safetensors")
    return math.sqrt(sum(float(((last[k].double() - first[k].double()) ** 2).sum())
                         for k in first if first[k].is_floating_point()))


def row_from_run(attack: str, defense: str, run_dir: Path, rounds: int, run_seconds: float,
                 status: str = "ok") -> AttackRow:
    """The table row of a run dir, from what its recorder wrote (metrics.jsonl, checkpoints)."""
    from fedpeft.simulations.report import read_metrics

    path = run_dir / "metrics.jsonl"
    rows = read_metrics(path) if path.is_file() else []
    trained = [r for r in rows if r["round"] > 0]
    last = rows[-1] if rows else {}
    return AttackRow(
        attack=attack, defense=defense, accuracy=last.get("eval_accuracy"), eval_loss=last.get("eval_loss"),
        rounds_done=len(trained), rounds=rounds,
        seconds_per_round=sum(r["seconds"] for r in trained) / len(trained) if trained else 0.0,
        run_seconds=run_seconds, accepted=sum(r.get("clients_accepted", 0) for r in trained),
        rejected=sum(r.get("clients_rejected", 0) for r in trained),
        update_norm=_global_update_norm(run_dir, last["round"]) if rows else 0.0, status=status)


def run_one(spec, attack: str, defense: str, malicious_ids: Sequence[int], run_dir: Path) -> AttackRow:
    """One federation with `attack` on `malicious_ids`; a run the attack stops early is a result
    (its status says why), not an error. A finished run dir is read back instead of re-run."""
    from fedpeft.simulations.harness.attacks import attack_mods
    from fedpeft.simulations.runner import run_simulation

    saved = run_dir / "bench-row.json"
    settings = json.loads(json.dumps({"attack": attack, "malicious": list(malicious_ids), "spec": spec.to_dict()}))
    if saved.is_file():
        previous = json.loads(saved.read_text())
        if previous.get("settings") != settings:
            raise ConfigError(f"{run_dir} holds a run of other settings; pick a new --out")
        log.info("reusing the finished run in %s", run_dir)
        return AttackRow(**previous["row"])
    start = time.perf_counter()
    status = "ok"
    try:
        run_simulation(spec, run_dir, client_mods=attack_mods(attack, malicious_ids))
    except FedPeftError as exc:
        if not (run_dir / "metrics.jsonl").is_file():
            raise  # it never started: a setup problem, not an attack's effect
        status = f"stopped: {str(exc).splitlines()[0]}"
        log.warning("%s / %s %s", attack, defense, status)
    row = row_from_run(attack, defense, run_dir, spec.federation.rounds, time.perf_counter() - start, status)
    saved.write_text(json.dumps({"row": asdict(row), "settings": settings}))
    return row


# ---- results ----------------------------------------------------------------------------------

COLUMNS = ("attack", "defense", "accuracy", "delta_vs_clean_same_defense", "delta_vs_clean_none", "eval_loss",
           "update_norm", "rejected", "accepted", "rounds_done", "rounds", "seconds_per_round", "run_seconds", "status")


def _deltas(rows: Sequence[AttackRow]) -> dict[tuple[str, str], tuple[float | None, float | None]]:
    """(attack, defense) -> (accuracy minus the clean run of that defense, minus clean `none`)."""
    clean = {r.defense: r.accuracy for r in rows if r.attack == "clean"}

    def minus(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else a - b

    return {(r.attack, r.defense): (minus(r.accuracy, clean.get(r.defense)), minus(r.accuracy, clean.get("none")))
            for r in rows}


def _num(value: float | None, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def write_results(rows: Sequence[AttackRow], out_dir: Path, title: str) -> str:
    """`results.csv` (one row per run), `results.md` (an accuracy matrix and the per-run table)
    and `results.png`; returns the Markdown."""
    deltas = _deltas(rows)
    with (out_dir / "results.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(COLUMNS)
        for r in rows:
            same, vs_none = deltas[(r.attack, r.defense)]
            writer.writerow([r.attack, r.defense, _num(r.accuracy, ".4f"), _num(same, "+.4f"), _num(vs_none, "+.4f"),
                             _num(r.eval_loss, ".4f"), f"{r.update_norm:.6g}", r.rejected, r.accepted, r.rounds_done,
                             r.rounds, f"{r.seconds_per_round:.2f}", f"{r.run_seconds:.1f}", r.status])
    attacks = list(dict.fromkeys(r.attack for r in rows))
    defenses = list(dict.fromkeys(r.defense for r in rows))
    by = {(r.attack, r.defense): r for r in rows}

    def cell(a: str, d: str) -> str:
        r = by.get((a, d))
        if r is None:
            return "-"
        text = _num(r.accuracy, ".3f") or "n/a"
        same = deltas[(a, d)][0]
        if a != "clean" and same is not None:
            text += f" ({same:+.3f})"
        return text + ("" if r.finished else f" ⚠ {r.rounds_done}/{r.rounds}")

    lines = [f"**{title}**", "", "Final held-out accuracy (change vs the clean run of the same defense; "
             "⚠ = the federation stopped after that many rounds):", "",
             "| attack | " + " | ".join(defenses) + " |", "|---|" + "---|" * len(defenses)]
    lines += [f"| {a} | " + " | ".join(cell(a, d) for d in defenses) + " |" for a in attacks]
    lines += ["", "| attack | defense | accuracy | Δ vs clean (same defense) | Δ vs clean none | global update L2 "
              "| rejected / accepted replies | s / round | run s | status |", "|---" * 10 + "|"]
    for r in rows:
        same, vs_none = deltas[(r.attack, r.defense)]
        lines.append(f"| {r.attack} | {r.defense} | {_num(r.accuracy, '.3f') or 'n/a'} | {_num(same, '+.3f') or '-'} | "
                     f"{_num(vs_none, '+.3f') or '-'} | {r.update_norm:.3g} | {r.rejected} / {r.accepted} | "
                     f"{r.seconds_per_round:.1f} | {r.run_seconds:.0f} | {r.status} |")
    table = "\n".join(lines) + "\n"
    (out_dir / "results.md").write_text(table)
    _plot(rows, attacks, defenses, out_dir / "results.png", title)
    return table


def _plot(rows: Sequence[AttackRow], attacks: list[str], defenses: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {(r.attack, r.defense): r for r in rows}
    width = 0.8 / max(len(defenses), 1)
    fig, ax = plt.subplots(figsize=(max(7.0, 1.4 * len(attacks) + 3.5), 4.0))
    for i, defense in enumerate(defenses):
        xs = [j + i * width for j in range(len(attacks))]
        found = [by.get((a, defense)) for a in attacks]
        bars = ax.bar(xs, [r.accuracy or 0.0 if r is not None else 0.0 for r in found], width, label=defense)
        for bar, r in zip(bars, found, strict=True):
            if r is not None and not r.finished:  # stopped early: mark the bar
                bar.set_hatch("//")
    clean_none = by.get(("clean", "none"))
    if clean_none is not None and clean_none.accuracy is not None:
        ax.axhline(clean_none.accuracy, color="k", linestyle="--", linewidth=0.8, label="clean, none")
    ax.set_xticks([j + width * (len(defenses) - 1) / 2 for j in range(len(attacks))], attacks)
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(textwrap.fill(title, 80), fontsize=9)
    handles, _ = ax.get_legend_handles_labels()
    if any(not r.finished for r in rows):
        from matplotlib.patches import Patch

        handles.append(Patch(facecolor="white", edgecolor="k", hatch="//", label="stopped early"))
    ax.legend(handles=handles, fontsize=8, title="defense", title_fontsize=8, loc="upper left",
              bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def read_results(path: Path) -> list[AttackRow]:
    """Rows of a results.csv (to re-render the table and plot without re-running)."""
    out = []
    with Path(path).open(newline="") as fh:
        for r in csv.DictReader(fh):
            out.append(AttackRow(
                attack=r["attack"], defense=r["defense"], accuracy=float(r["accuracy"]) if r["accuracy"] else None,
                eval_loss=float(r["eval_loss"]) if r["eval_loss"] else None, rounds_done=int(r["rounds_done"]),
                rounds=int(r["rounds"]), seconds_per_round=float(r["seconds_per_round"]),
                run_seconds=float(r["run_seconds"]), accepted=int(r["accepted"]), rejected=int(r["rejected"]),
                update_norm=float(r["update_norm"]), status=r["status"]))
    return out


# ---- the matrix ---------------------------------------------------------------------------------

def _names(text: str, known: Sequence[str], what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ConfigError(f"unknown {what} {unknown or text!r}; choose from {list(known)}")
    return list(dict.fromkeys(names))


def run_benchmark(base, attacks: Sequence[str], defenses: Sequence[str], malicious: int, out_dir: Path,
                  title: str) -> list[AttackRow]:
    """Every (attack, defense) run, clean first (the deltas need it); results rewritten after each run."""
    table = defense_table(malicious)
    attacks = ["clean", *[a for a in attacks if a != "clean"]]
    specs = {d: base.with_overrides(table[d], driver="simulation") for d in defenses}  # every defense checked up front
    malicious_ids = list(range(malicious))
    rows: list[AttackRow] = []
    total, started = len(attacks) * len(defenses), time.perf_counter()
    for attack in attacks:
        for defense in defenses:
            n = len(rows) + 1
            log.info("=== [%d/%d] attack %s / defense %s (malicious partitions %s) ===", n, total, attack, defense,
                     malicious_ids if attack != "clean" else "none")
            row = run_one(specs[defense], attack, defense, malicious_ids, out_dir / f"{attack}-{defense}")
            rows.append(row)
            elapsed = time.perf_counter() - started
            log.info("[%d/%d] %s / %s: accuracy %s, %d rejected, global update L2 %.3g, %.1f s/round, run %.0f s%s "
                     "| elapsed %.0f s, ~%.0f s left", n, total, attack, defense, _num(row.accuracy, ".3f") or "n/a",
                     row.rejected, row.update_norm, row.seconds_per_round, row.run_seconds,
                     "" if row.status == "ok" else f" ({row.status})", elapsed, elapsed / n * (total - n))
            write_results(rows, out_dir, title)  # partial results survive an interrupted benchmark
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    apply_offline_env()
    p = argparse.ArgumentParser(prog="peft-bench-attack", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--attacks", default=",".join(ATTACK_NAMES), help="comma-separated; clean is always run")
    p.add_argument("--defenses", default=",".join(DEFENSE_NAMES), help="comma-separated")
    p.add_argument("--malicious", type=int, choices=(1, 2), default=1, help="malicious clients (partition ids 0..m-1)")
    p.add_argument("--model", default="all-minilm-l6-v2", help="built-in name or HF model dir (an encoder or causal LM)")
    p.add_argument("--data", required=True, help="training data (e.g. ../shared/data/sst2/train.tsv)")
    p.add_argument("--eval-data", default=None, help="held-out data (default: 10%% of --data)")
    p.add_argument("--labels", default="0=negative,1=positive")
    p.add_argument("--template", default="{sentence}", help="text column(s): {a} or a pair {a} {b}")
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--local-steps", type=int, default=5)
    p.add_argument("--lr", type=float, default=5e-3, help="local LoRA learning rate")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--train-limit", type=int, default=1000)
    p.add_argument("--eval-limit", type=int, default=200, help="held-out rows scored per round (0 = all)")
    p.add_argument("--quantize", default="none")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/bench-attack")
    args = p.parse_args(argv)
    try:
        from fedpeft.common.logs import setup_logging
        from fedpeft.server.federation.flags import spec_from_flags

        setup_logging()
        attacks = _names(args.attacks, ATTACK_NAMES, "attack(s)")
        defenses = _names(args.defenses, DEFENSE_NAMES, "defense(s)")
        data = str(Path(args.data).resolve())
        eval_data = str(Path(args.eval_data).resolve()) if args.eval_data else None
        model = str(Path(args.model).resolve()) if Path(args.model).exists() else args.model
        base = spec_from_flags(model=model, method="lora", data=data, eval_data=eval_data, labels=args.labels,
                               template=args.template, clients=args.clients, rounds=args.rounds,
                               local_steps=args.local_steps, learning_rate=args.lr, batch_size=args.batch_size,
                               max_length=args.max_length, train_limit=args.train_limit, eval_limit=args.eval_limit,
                               quantize=args.quantize, seed=args.seed)
        out_dir = Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        title = (f"{Path(args.model).name} + LoRA on {Path(args.data).parent.name}: {args.clients} clients "
                 f"({args.malicious} malicious) x {args.rounds} rounds x {args.local_steps} steps, "
                 f"{args.train_limit or 'all'} train rows")
        rows = run_benchmark(base, attacks, defenses, args.malicious, out_dir, title)
    except FedPeftError as exc:
        print(f"peft-bench-attack: error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(write_results(rows, out_dir, title))
    print(f"written: {out_dir / 'results.csv'}, {out_dir / 'results.md'}, {out_dir / 'results.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
