"""`peft-bench-deploy`: what deployment costs, measured with real processes on one machine.

For each number of clients N and each mode, a real `peft-server run` (TLS + SuperNode
auth) and N real `peft-client start` processes run a short federation on loopback; the
last round's wall time and the bytes each client sent are read from the run's metrics.

Modes:
- `plain`: Flower's Message API, the long-lived local trainer (what peft-client does);
- `secagg`: the same with Flower's SecAgg+ (4 messages per round instead of 1);
- `plain-inprocess`: the Message API with `fedpeft.simulations.harness.inprocess_client_app`, which imports
  torch and loads the base model in every per-message ClientApp process (the baseline
  the long-lived trainer removes).

Ratios are taken within one run: secagg / plain and inprocess / plain round time, and
bytes on the wire per client per round / the full base model's size. Bytes are the
delta each client sends (its .npy tensors); under SecAgg+ the masked vector has the
same number of values, as 64-bit integers, plus a few hundred bytes of key shares. Results: a
Markdown table on stdout, `results.csv`, `results.md` and `round_time.png` in --out.

    peft-bench-deploy --clients 5,10,20 --out runs/bench-deploy
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from fedpeft.common.errors import FedPeftError
from fedpeft.common.logs import apply_offline_env, setup_logging
from fedpeft.simulations.harness.loopback import LoopbackDeployment, write_run_config

MODES = ("plain", "secagg", "plain-inprocess")
INPROCESS_APP = "fedpeft.simulations.harness.inprocess_client_app:app"


@dataclass
class DeployRow:
    clients: int
    mode: str
    rounds: int
    round_seconds: float
    """Wall time of the last round (model already loaded where the mode keeps it)."""
    first_round_seconds: float
    bytes_up_per_client: float
    bytes_down_per_client: float
    base_model_bytes: int
    wire_to_model_ratio: float
    total_seconds: float


def base_model_bytes(model_dir: Path) -> int:
    """Size of the base model's weight files (what plain full-model FL would ship)."""
    return sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors"))


def secagg_shares(clients: int) -> tuple[int, int]:
    """SecAgg+ (num_shares, reconstruction_threshold) for N >= 3 clients: odd, at most 5."""
    if clients < 3:
        raise FedPeftError(f"SecAgg+ needs at least 3 clients per round (got {clients})")
    shares = min(5, clients if clients % 2 else clients - 1)
    return shares, max(2, shares // 2 + 1)


def run_one(root: Path, model_dir: Path, clients: int, mode: str, rounds: int, local_steps: int) -> DeployRow:
    if root.exists():  # a previous benchmark's keys, certs and run dir
        shutil.rmtree(root)
    dep = LoopbackDeployment(root, model=str(model_dir))
    dep.make_tls()
    for k in range(clients):
        dep.make_client_keys(f"c{k}", trust=False)
    sections: dict = {
        "federation": {"model": str(model_dir), "method": "lora", "rounds": rounds, "clients": clients, "seed": 0,
                       "quantize": "4bit", "method_options": {"r": 8}},
        "training": {"local_steps": local_steps, "learning_rate": 0.005, "batch_size": 8},
        "task": {"eval_limit": 32},
    }
    if mode == "secagg":
        shares, threshold = secagg_shares(clients)
        sections["secagg"] = {"enabled": True, "num_shares": shares, "reconstruction_threshold": threshold,
                              "max_weight": 1000}
    config = write_run_config(root / "run.toml", sections)
    run_dir = root / "run"
    started = time.perf_counter()
    extra = ["--client-app", INPROCESS_APP] if mode == "plain-inprocess" else []
    try:
        dep.start_server(config, run_dir, extra=extra)
        for k in range(clients):
            dep.start_client(f"c{k}", f"builtin:{k}/{clients}")
        if dep.wait("server", timeout=3600) != 0:
            raise FedPeftError(f"{mode} with {clients} clients failed:\n{dep.log('server')[-3000:]}")
    finally:
        dep.stop_all()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last, first = rows[-1], rows[1]
    size = base_model_bytes(model_dir)
    up = last["bytes_up"] / clients
    return DeployRow(clients=clients, mode=mode, rounds=rounds, round_seconds=last["seconds"],
                     first_round_seconds=first["seconds"], bytes_up_per_client=up,
                     bytes_down_per_client=last["bytes_down"] / clients, base_model_bytes=size,
                     wire_to_model_ratio=up / size if size else float("nan"),
                     total_seconds=time.perf_counter() - started)


def write_results(rows: Sequence[DeployRow], out_dir: Path) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=[f.name for f in fields(DeployRow)])
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    by = {(r.clients, r.mode): r for r in rows}
    lines = ["| clients | mode | round s (last) | round 1 s | x plain | up KB/client/round | base model MB | wire / model |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        plain = by.get((r.clients, "plain"))
        ratio = f"{r.round_seconds / plain.round_seconds:.2f}" if plain and plain.round_seconds else "-"
        lines.append(f"| {r.clients} | {r.mode} | {r.round_seconds:.1f} | {r.first_round_seconds:.1f} | {ratio} | "
                     f"{r.bytes_up_per_client / 1e3:.1f} | {r.base_model_bytes / 1e6:.1f} | {r.wire_to_model_ratio:.2e} |")
    table = "\n".join(lines)
    (out_dir / "results.md").write_text(table + "\n")
    _plot(rows, out_dir / "round_time.png")
    return table


def _plot(rows: Sequence[DeployRow], path: Path) -> None:
    from fedpeft.simulations.report import line_plot

    line_plot({mode: [(r.clients, r.round_seconds) for r in rows if r.mode == mode]
               for mode in dict.fromkeys(r.mode for r in rows)}, path, "clients", "round time (s)",
              "deployment round time on loopback")


def main(argv: Sequence[str] | None = None) -> int:
    apply_offline_env()
    setup_logging()
    p = argparse.ArgumentParser(prog="peft-bench-deploy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", default="5,10,20", help="comma-separated client counts")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {MODES}")
    p.add_argument("--model", help="built-in name, .gguf or HF dir (default: a tiny random Llama built in --out, "
                                   "which measures system overhead only)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--local-steps", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("runs/bench-deploy"))
    args = p.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        p.error(f"unknown mode(s) {unknown}; choose from {MODES}")
    out = args.out.resolve()
    if args.model:
        from fedpeft.common.model.base_model import resolve_model_dir

        model_dir = resolve_model_dir(args.model).resolve()  # built-in name, .gguf or HF dir
    else:
        from fedpeft.simulations.harness.tiny_models import build_tiny_llama

        model_dir = build_tiny_llama(out / "tiny-llama")
    rows: list[DeployRow] = []
    try:
        for n in (int(x) for x in args.clients.split(",")):
            for mode in modes:
                print(f"[bench] {n} clients, {mode} ...", flush=True)
                row = run_one(out / f"{n}-{mode}", model_dir, n, mode, args.rounds, args.local_steps)
                rows.append(row)
                print(f"[bench] {n} clients, {mode}: last round {row.round_seconds:.1f} s, "
                      f"{row.bytes_up_per_client / 1e3:.1f} KB up per client", flush=True)
                write_results(rows, out)
    except FedPeftError as exc:
        print(f"peft-bench-deploy: error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(write_results(rows, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
