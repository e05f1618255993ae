"""`peft-bench-scale`: how the coordinator's aggregation scales with the number of replies.

    peft-bench-scale --clients 10,100,1000 --deltas qv,all-linear --modes fedavg,fedavg-streaming,fedadam,svd

For every delta shape, number of replies N and aggregation mode, the validated strategy
the run spec builds (`build_strategy(...).aggregate_train`) aggregates N real Flower reply
messages, and in the same process a plain numpy example-weighted mean of the same arrays
(already decoded: one multiply-add pass per reply, the memory-bandwidth limit) is timed:
the table reports both and their ratio. Replies travel as the strategy asks clients to send
them (one fp32 buffer each, `fedpeft.common.codecs.mod.FLAT_UPLOAD_KEY`), except where a
mode says otherwise. Modes:

- `fedavg`: FedAvg with the default `[robust]` bounds (its relative bounds hold the
  accepted replies, as views, until the round's median is known);
- `fedavg-streaming`: FedAvg with the relative bounds off: every reply is folded and
  dropped as it comes (what `StreamingGrid` delivers);
- `fedavg-arrays`: `fedavg-streaming` with every reply as one Flower Array per tensor (the
  wire before flat uploads, and what a client that ignores `FLAT_UPLOAD_KEY` sends);
- `fedadam`: FedAvg's fold plus Flower's FedAdam server step;
- `svd`: ΔW-space LoRA aggregation (each client's dense B_i A_i: Flower's path, all
  replies at once);
- `fedavg-flower`: the path every strategy took before replies were folded (and the
  robust aggregators still take): every reply decoded, held, re-encoded in float64, sorted
  by content and averaged by Flower's `aggregate_arrayrecords` (the "before" of a run).

Delta shapes are SmolLM2-135M's (hidden 576, 30 blocks, 3 KV heads of 64, MLP 1536), LoRA
r=8: `qv` on q/v (120 tensors, 460,800 parameters, 1.8 MB) and `all-linear` on every
linear layer of the blocks (the default job: 420 tensors, 2,442,240 parameters, 9.8 MB);
synthesized from those shapes, no model is loaded. Replies cycle through a pool of 64
distinct random payloads (more than the CPU's caches hold), so N can grow without N
payloads in memory; each reply is its own Flower message.

`peak_mb` is the growth of the peak RSS (VmHWM, reset before each aggregation) while it
ran: what the aggregation itself allocates beyond the replies the grid delivers (the reply
messages are built before the clock starts, as a run's grid builds them; their payloads
are the pool's). Each row is measured in a forked child process, so
no row sees heap that an earlier one left behind. Timings are the best of `--repeats`.
`results.csv`, `results.md` and `results.png` (time and memory against N) go to `--out`.

`--simulate 100,1000` also runs one round of `peft-sim` (Flower's Simulation Engine, the
same assembly as any run) with that many virtual clients on a tiny random Llama (one local
step of batch 1 each), in a fresh process per N, and reports the round's wall time, the
clients' own time per client-round (training plus swapping the delta in, from the
metrics), and the marginal wall time per client-round between consecutive N: what one
more client costs the round. `framework ms` is that marginal cost minus the clients' own
time divided by the CPUs running clients in parallel: what the engine, the messages and
the coordinator add per client-round. Written to `simulate.csv` / `simulate.md`.
`--simulate-baseline` runs every N a second time on Flower's own in-memory LinkState
(peft-sim indexes each node's pending messages; Flower's poll scans all of them).
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import logging
import math
import multiprocessing
import os
import platform
import subprocess
import sys
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedpeft.common.codecs.mod import flat_upload_record
from fedpeft.common.protocol.deltas import DeltaSpec
from fedpeft.common.protocol.flower_io import delta_to_arrayrecord
from fedpeft.common.protocol.plan import REPLY_ARRAYS_KEY, REPLY_METRICS_KEY, TRAIN_METRIC_KEYS, WEIGHT_KEY
from fedpeft.server.fold_kernels import warm_up
from fedpeft.server.robust import RobustSettings
from fedpeft.server.strategy import build_strategy
from fedpeft.simulations.bench.process_memory import reset_peak, status_bytes

log = logging.getLogger("fedpeft.bench")

HIDDEN, BLOCKS, KV, MLP, RANK = 576, 30, 192, 1536, 8
MODULES = {"qv": {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.v_proj": (HIDDEN, KV)},
           "all-linear": {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (HIDDEN, KV),
                          "self_attn.v_proj": (HIDDEN, KV), "self_attn.o_proj": (HIDDEN, HIDDEN),
                          "mlp.gate_proj": (HIDDEN, MLP), "mlp.up_proj": (HIDDEN, MLP),
                          "mlp.down_proj": (MLP, HIDDEN)}}
MODES = ("fedavg", "fedavg-streaming", "fedadam", "svd", "fedavg-arrays", "fedavg-flower")
PER_TENSOR_MODES = ("fedavg-arrays", "fedavg-flower")
"""Modes whose replies carry one Array per tensor (the others: what the strategy asks for)."""
POOL = 64


def lora_spec(kind: str) -> DeltaSpec:
    """SmolLM2-135M's LoRA r=8 delta spec for `kind` (`qv` or `all-linear`), by HF peft's names."""
    tensors: OrderedDict[str, torch.Tensor] = OrderedDict()
    for block in range(BLOCKS):
        for module, (fan_in, fan_out) in MODULES[kind].items():
            prefix = f"base_model.model.model.layers.{block}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.empty(RANK, fan_in)
            tensors[f"{prefix}.lora_B.weight"] = torch.empty(fan_out, RANK)
    return DeltaSpec.of_delta(tensors)


class _Grid:
    def __init__(self, nodes: int) -> None:
        self.nodes = list(range(1, nodes + 1))

    def get_node_ids(self) -> list[int]:
        return self.nodes


def _strategy(mode: str, spec: DeltaSpec, clients: int) -> Any:
    streaming = mode in ("fedavg-streaming", "fedavg-arrays")
    robust = RobustSettings(examples_ratio=0.0, norm_bound_ratio=0.0) if streaming else None
    name = "fedadam" if mode == "fedadam" else "fedavg"
    strategy = build_strategy(name, spec=spec, max_delta_bytes=spec.num_bytes * 2, robust=robust,
                              lora_svd_scaling=2.0 if mode == "svd" else None, fraction_train=1.0,
                              fraction_evaluate=0.0, min_train_nodes=clients, min_available_nodes=clients)
    strategy.folds_replies = strategy.folds_replies and mode != "fedavg-flower"
    zero = delta_to_arrayrecord(OrderedDict((n, torch.zeros(s.shape)) for n, s in spec.tensors.items()))
    return strategy, list(strategy.configure_train(1, zero, ConfigRecord(), _Grid(clients)))  # type: ignore[arg-type]


Pool = tuple[dict[str, list[ArrayRecord]], list[np.ndarray], list[int]]


def _pool(spec: DeltaSpec, seed: int) -> Pool:
    """POOL distinct payloads: ({"arrays": as one Array per tensor, "flat": as a flat upload},
    the same values flat, their example counts)."""
    rng = np.random.default_rng(seed)
    records: dict[str, list[ArrayRecord]] = {"arrays": [], "flat": []}
    flats, weights = [], []
    for _ in range(POOL):
        flat = (rng.standard_normal(spec.num_parameters) * 0.01).astype(np.float32)
        views, offset = OrderedDict(), 0
        for name, tensor in spec.tensors.items():
            size = int(np.prod(tensor.shape))
            views[name] = torch.from_numpy(flat[offset:offset + size].reshape(tensor.shape))
            offset += size
        records["arrays"].append(delta_to_arrayrecord(views))
        records["flat"].append(flat_upload_record(OrderedDict((n, v.numpy()) for n, v in views.items())))
        flats.append(flat)
        weights.append(int(rng.integers(50, 500)))
    return records, flats, weights


def _replies(sent: Sequence[Message], records: list[ArrayRecord], weights: list[int]) -> Iterator[Message]:
    """One reply per sent message, payloads cycling through the pool (each its own message)."""
    base = {k: (1 if k == "unit-weight" else 0.5) for k in TRAIN_METRIC_KEYS}
    for i, msg in enumerate(sent):
        metrics = MetricRecord({**base, WEIGHT_KEY: weights[i % POOL]})
        yield Message(RecordDict({REPLY_ARRAYS_KEY: records[i % POOL],
                                  REPLY_METRICS_KEY: metrics}), reply_to=msg)


def numpy_limit(flats: list[np.ndarray], weights: list[int], clients: int) -> np.ndarray:
    """The example-weighted mean of `clients` decoded flat deltas, one numpy pass per reply."""
    acc = np.zeros(flats[0].size)
    total = 0
    for i in range(clients):
        acc += weights[i % POOL] * flats[i % POOL]
        total += weights[i % POOL]
    return acc / total


def measure(kind: str, mode: str, clients: int, repeats: int, pool: Pool, spec: DeltaSpec) -> dict[str, Any]:
    """One (delta, mode, N) row: our aggregation vs the numpy limit, time and peak memory."""
    by_wire, flats, weights = pool
    seconds, peak = [], 0
    for _ in range(repeats):
        strategy, sent = _strategy(mode, spec, clients)
        records = by_wire["flat" if strategy.flat_upload and mode not in PER_TENSOR_MODES else "arrays"]
        replies = list(_replies(sent, records, weights))  # (the grid builds them in a run: not timed)
        warm_up()  # (loading the compiled fold once per process is not the fold's time or memory)
        gc.collect()
        reset_peak()
        before = status_bytes("VmRSS")
        start = time.perf_counter()
        arrays, _ = strategy.aggregate_train(1, iter(replies))
        seconds.append(time.perf_counter() - start)
        peak = max(peak, status_bytes("VmHWM") - before)
        if arrays is None or strategy.traffic[1].accepted != clients:
            raise RuntimeError(f"{mode} N={clients}: {strategy.traffic[1].rejected[:1]}")
        del strategy, sent, arrays, replies
    limit = []
    for _ in range(repeats):
        start = time.perf_counter()
        numpy_limit(flats, weights, clients)
        limit.append(time.perf_counter() - start)
    row = {"delta": kind, "parameters": spec.num_parameters, "tensors": len(spec.tensors), "mode": mode,
           "clients": clients, "seconds": min(seconds), "numpy_seconds": min(limit),
           "ratio": min(seconds) / min(limit), "peak_mb": peak / 2**20}
    log.info("%-10s %-16s N=%-6d %8.3f s  numpy %8.3f s  %6.2fx  peak +%.0f MB", kind, mode, clients,
             row["seconds"], row["numpy_seconds"], row["ratio"], row["peak_mb"])
    return row


def _in_child(*args: Any) -> dict[str, Any]:
    """`measure(*args)` in a forked child: its peak memory is its own, not what earlier
    measurements left in this process's heap (the child shares the payload pool)."""
    context = multiprocessing.get_context("fork")
    results = context.SimpleQueue()
    child = context.Process(target=lambda: results.put(_try(_single_threaded_measure, *args)))
    child.start()
    outcome = results.get()
    child.join()
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def _single_threaded_measure(*args: Any) -> dict[str, Any]:
    """`measure` with torch on one thread, like the numpy limit it is compared with (and
    because a forked child must not enter the OpenMP pool its parent may have started: it
    would wait forever for threads that were not forked)."""
    torch.set_num_threads(1)
    return measure(*args)


def _try(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except Exception as exc:  # reported in the parent
        return RuntimeError(f"{type(exc).__name__}: {exc}")


LINK_STATES = ("indexed", "flower")
"""`indexed`: what peft-sim runs (each node's pending messages indexed); `flower`: Flower's own
in-memory LinkState, whose per-node poll scans every stored message (the baseline)."""


def simulate(counts: Sequence[int], out: Path, link_states: Sequence[str] = ("indexed",)) -> list[dict[str, Any]]:
    """One peft-sim round per number of virtual clients (and LinkState) on a tiny model; marginal
    cost per client-round between consecutive counts of the same LinkState."""
    from fedpeft.simulations.harness.tiny_models import build_tiny_llama
    from fedpeft.simulations.ray_runtime import FLOWER_LINK_STATE_ENV

    model = build_tiny_llama(out / "tiny-llama")
    peft_sim = Path(sys.executable).with_name("peft-sim")
    rows: list[dict[str, Any]] = []
    for state, n in ((s, n) for s in link_states for n in counts):
        run_dir = out / f"sim-{n}" if state == "indexed" else out / f"sim-{n}-{state}"
        command = [str(peft_sim), "--model", str(model), "--clients", str(n), "--rounds", "1", "--local-steps", "1",
                   "--batch-size", "1", "--builtin-train-rows", str(max(2 * n, 800)), "--eval-limit", "8",
                   "--out", str(run_dir)]
        log.info("simulating %d virtual clients: %s", n, " ".join(command))
        started = time.perf_counter()
        env = {**os.environ, FLOWER_LINK_STATE_ENV: "1" if state == "flower" else "0"}
        done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"peft-sim with {n} clients failed:\n{done.stderr[-3000:]}")
        last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
        rows.append({"link_state": state, "clients": n, "round_seconds": last["seconds"],
                     "process_seconds": time.perf_counter() - started,
                     "client_seconds": last.get("client_train_seconds", 0.0) + last.get("client_swap_seconds", 0.0),
                     "accepted": last["clients_accepted"]})
    parallel = max(1, os.cpu_count() or 1)
    for before, row in zip(rows, rows[1:], strict=False):
        if before["link_state"] != row["link_state"]:
            continue
        marginal = (row["round_seconds"] - before["round_seconds"]) / (row["clients"] - before["clients"])
        row["marginal_ms"] = marginal * 1e3
        row["framework_ms"] = (marginal - row["client_seconds"] / parallel) * 1e3
    return rows


def simulate_markdown(rows: Sequence[dict[str, Any]]) -> str:
    lines = [f"CPU: {cpu_name()}, {os.cpu_count()} cores", "",
             "| link state | virtual clients | round s | clients' own ms per client-round | "
             "marginal ms per client-round | framework ms per client-round |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['link_state']} | {r['clients']:,} | {r['round_seconds']:.1f} | {r['client_seconds'] * 1e3:.1f} | "
                     + (f"{r['marginal_ms']:.1f} | {r['framework_ms']:.1f} |" if "marginal_ms" in r else "— | — |"))
    return "\n".join(lines) + "\n"


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it (figures differ between machines)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    lines = [f"CPU: {cpu_name()}, {os.cpu_count()} cores (aggregation on one thread: numpy, numba, torch)", "",
             "| delta | mode | clients | aggregation s | numpy limit s | x limit | peak MB |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['delta']} | {r['mode']} | {r['clients']:,} | {r['seconds']:.3f} | {r['numpy_seconds']:.3f} | "
              f"{r['ratio']:.2f} | {r['peak_mb']:.0f} |" for r in rows]
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for key in sorted({(r["delta"], r["mode"]) for r in rows}):
        points = sorted((r["clients"], r["seconds"], r["peak_mb"]) for r in rows if (r["delta"], r["mode"]) == key)
        left.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"{key[0]} {key[1]}")
        right.plot([p[0] for p in points], [p[2] for p in points], marker="o", label=f"{key[0]} {key[1]}")
    for delta in sorted({r["delta"] for r in rows}):
        limits: dict[int, float] = {}
        for r in rows:
            if r["delta"] == delta:
                limits[r["clients"]] = min(limits.get(r["clients"], math.inf), r["numpy_seconds"])
        points = sorted(limits.items())
        left.plot([p[0] for p in points], [p[1] for p in points], linestyle="--", label=f"{delta} numpy limit")
    for ax, label in ((left, "aggregation seconds"), (right, "peak MB during aggregation")):
        ax.set_xscale("log")
        ax.set_xlabel("replies in the round")
        ax.set_ylabel(label)
    left.set_yscale("log")
    left.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="peft-bench-scale", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--clients", default="10,100,1000", help="comma-separated numbers of replies per round")
    parser.add_argument("--deltas", default="qv,all-linear", help=f"comma-separated: {', '.join(MODULES)}")
    parser.add_argument("--modes", default=",".join(MODES[:4]), help=f"comma-separated: {', '.join(MODES)}")
    parser.add_argument("--max-dense-clients", type=int, default=1000,
                        help="largest N for the svd mode (it forms every client's dense B_i A_i)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--simulate", default="", help="comma-separated numbers of virtual clients for one "
                        "peft-sim round each on a tiny model (e.g. 100,1000); empty: no simulation")
    parser.add_argument("--simulate-baseline", action="store_true",
                        help="also run each simulated round on Flower's own (unindexed) in-memory LinkState")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-scale"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("flwr").setLevel(logging.WARNING)
    for name in ("fedpeft.server",):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        clients = [int(c) for c in args.clients.split(",") if c]  # --clients "": no aggregation rows
        simulated = [int(c) for c in args.simulate.split(",") if c]
    except ValueError:
        parser.error("--clients and --simulate take comma-separated integers")
    deltas, modes = args.deltas.split(","), args.modes.split(",")
    unknown = sorted(set(deltas) - set(MODULES)) + sorted(set(modes) - set(MODES))
    if unknown or args.repeats < 1 or any(c < 1 for c in clients + simulated):
        parser.error(f"unknown delta(s)/mode(s) {unknown}" if unknown
                     else "--repeats, --clients and --simulate must be >= 1")
    args.out.mkdir(parents=True, exist_ok=True)
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0  # (a run sets them; this is no run)
    rows: list[dict[str, Any]] = []
    for kind in deltas if clients else []:
        spec = lora_spec(kind)
        pool = _pool(spec, args.seed)
        for mode in modes:
            for n in clients:
                if mode == "svd" and n > args.max_dense_clients:
                    continue
                rows.append(_in_child(kind, mode, n, args.repeats, pool, spec))
                with (args.out / "results.csv").open("w", newline="") as handle:
                    writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
                    writer.writeheader()
                    writer.writerows(rows)
                (args.out / "results.md").write_text(markdown(rows))
        del pool
    if simulated:
        sims = simulate(sorted(simulated), args.out, LINK_STATES if args.simulate_baseline else ("indexed",))
        with (args.out / "simulate.csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=sorted({k for r in sims for k in r}))
            writer.writeheader()
            writer.writerows(sims)
        (args.out / "simulate.md").write_text(simulate_markdown(sims))
        print(simulate_markdown(sims))
    if not rows:
        return
    plot(rows, args.out / "results.png")
    print(markdown(rows))
    print(f"wrote {args.out / 'results.csv'}, {args.out / 'results.md'}, {args.out / 'results.png'}")


if __name__ == "__main__":
    main()
