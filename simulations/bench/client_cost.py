"""What one client holds and spends per training step, per topology: plain 4-bit FL, Offsite-Tuning, split.

    peft-bench-client --cut 2 --u-shaped --offsite 2:2:4 --offsite 0:2:4   # SmolLM2-135M on SST-2

Every row is measured the same way (below), so the ratios to plain FL compare like with
like: `fl` trains LoRA on the whole 4-bit model; `offsite B:T:N` trains LoRA on the adapter
blocks of an emulator built from it (bottom B + top T blocks, every N-th middle block,
`peft-server offsite-build`), which is the whole model an offsite client holds; `split
k=K` holds embeddings + the first K blocks and talks to a split server.

Each client step runs in a fresh Python subprocess so memory is measured honestly:
- `peak_memory_bytes`: the subprocess's peak RSS (VmHWM, whole life: loading included)
  minus the peak RSS of a baseline subprocess that only imports the same libraries
  (torch, transformers, peft, bitsandbytes, grpc, fedpeft); `train_peak_memory_bytes`:
  the same for the training steps alone (the peak is reset after loading). Not
  `getrusage`'s ru_maxrss: Linux carries it across fork+exec, so a child of a parent
  holding a model would report the parent's peak;
- `tensor_bytes`: bytes of every parameter, buffer and optimizer-state tensor the client holds;
- `step_seconds`: the client's own compute per step (for split: minus the time spent
  waiting for the server), mean over measured steps after one warm-up step;
- `bytes_per_step`: serialized messages per step. Split: activations up + gradients down.
  Plain FL sends only the delta, twice a round (down and up), so its per-step figure is
  that divided by the round's local steps; both also report `bytes_per_round`.
The split server runs in the parent process (4-bit, on loopback with dev TLS certs), so
none of its memory or compute is counted for the client.

`--gradient-checkpointing on` trains every client with checkpointed blocks (QLoRA's
default: activations recomputed in backward); `both` measures every client both ways and
compares each with the FL client trained the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedpeft.simulations.bench.process_memory import reset_peak, status_bytes

DEFAULT_DATA = str(Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2" / "train.tsv")
DEFAULT_LABELS = "0=negative,1=positive"
CHECKPOINTED_TAG = " +ckpt"


def _import_stack() -> None:
    """The libraries every measured client imports (the baseline imports exactly these)."""
    import bitsandbytes  # noqa: F401
    import grpc  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import fedpeft.client.split_client  # noqa: F401
    import fedpeft.client.training  # noqa: F401
    import fedpeft.common.model.adapted  # noqa: F401
    import fedpeft.common.model.split  # noqa: F401


def _rows(spec: dict[str, Any], count: int):
    from fedpeft.common.data.records import infer_task, read_records

    rows = read_records(Path(spec["data"]))
    task = infer_task(rows, template=spec.get("template"), labels=spec["labels"])
    return task, rows[:count]


def _held_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _optimizer_tensors(optimizer) -> list:
    import torch

    return [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


def _bench_config(spec: dict[str, Any]):  # -> TrainConfig
    """The measured round: one warm-up step plus `steps` measured ones, AdamW at 1e-4."""
    from fedpeft.client.training import TrainConfig

    return TrainConfig(local_steps=spec["steps"] + 1, learning_rate=1e-4, batch_size=spec["batch_size"],
                       max_length=spec["max_length"], log_every=spec["steps"] + 1)


def _sequential(encoded: list, collate: Any, batch_size: int) -> Any:
    """Step k's batch: rows (k-1)*batch_size .. k*batch_size-1 (every client measures the same batches)."""
    return lambda step: collate(encoded[(step - 1) * batch_size:step * batch_size])


def _worker_split(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from fedpeft.client.split_client import SplitSession, split_channel
    from fedpeft.client.training import run_steps
    from fedpeft.common.methods import make_config
    from fedpeft.common.model.base_model import load_tokenizer, model_fingerprint
    from fedpeft.common.model.split import SplitConfig, load_client_part
    from fedpeft.common.training.activation_checkpointing import gradient_checkpointing
    from fedpeft.common.training.objectives import CausalLMObjective
    from fedpeft.common.wire.split import wire_dtype

    model_dir, steps, batch_size = Path(spec["model_dir"]), spec["steps"], spec["batch_size"]
    task, rows = _rows(spec, batch_size * (steps + 1))
    part = load_client_part(model_dir, SplitConfig(cut=spec["cut"], u_shaped=spec["u_shaped"]),
                            make_config("lora", spec["lora"]), quantize=spec["quantize"])
    objective = CausalLMObjective(task, load_tokenizer(model_dir), spec["max_length"])
    encoded = [objective.encode(r) for r in rows]
    loaded_rss, load_peak = status_bytes("VmRSS"), status_bytes("VmHWM")
    reset_peak()
    params = part.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    part.model.train()  # as train_split_local: dropout on, and blocks only checkpoint in training mode
    times: list[float] = []
    waits: list[float] = []
    checkpointed = gradient_checkpointing(part.model, bool(spec.get("gradient_checkpointing")))
    with checkpointed, split_channel(spec["target"], Path(spec["ca_cert"])) as channel:
        session = SplitSession(channel, part, "bench", model_fingerprint(model_dir), dtype=wire_dtype(spec["wire_dtype"]))

        def timed(_step: int, seconds: float) -> None:  # the step's own compute is its time less the server's
            times.append(seconds)
            waits.append(session.wait_seconds - sum(waits))

        run_steps(params, _sequential(encoded, objective.collate, batch_size), _bench_config(spec), session.step,
                  seed=0, label="bench split", on_step=timed, optimizer=optimizer)
        session.close()
    delta_bytes = _held_bytes(part.get_delta().values())
    per_step = (session.bytes_up + session.bytes_down) / (steps + 1)
    return {
        "peak_rss_bytes": max(load_peak, status_bytes("VmHWM")),
        "loaded_rss_bytes": loaded_rss,
        "train_peak_rss_bytes": status_bytes("VmHWM"),
        "tensor_bytes": _held_bytes([*part.model.parameters(), *part.model.buffers(), *_optimizer_tensors(optimizer)]),
        "step_seconds": sum(t - w for t, w in zip(times[1:], waits[1:], strict=True)) / steps,
        "server_wait_seconds": sum(waits[1:]) / steps,
        "bytes_per_step": per_step,
        "bytes_up_per_step": session.bytes_up / (steps + 1),
        "bytes_down_per_step": session.bytes_down / (steps + 1),
        "bytes_per_round": per_step * spec["local_steps"] + 2 * delta_bytes,
        "delta_bytes": delta_bytes,
        "tokens_per_step": sum(len(e.input_ids) for e in encoded) / (steps + 1),
    }


def _worker_fl(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from fedpeft.client.training import run_steps
    from fedpeft.common.methods import make_config
    from fedpeft.common.model.adapted import AdaptedModel
    from fedpeft.common.training.activation_checkpointing import gradient_checkpointing
    from fedpeft.common.training.objectives import CausalLMObjective

    model_dir, steps, batch_size = Path(spec["model_dir"]), spec["steps"], spec["batch_size"]
    task, rows = _rows(spec, batch_size * (steps + 1))
    adapted = AdaptedModel.load(model_dir, spec["quantize"], "lora", make_config("lora", spec["lora"]))
    objective = CausalLMObjective(task, adapted.tokenizer, spec["max_length"])
    encoded = [objective.encode(r) for r in rows]
    loaded_rss, load_peak = status_bytes("VmRSS"), status_bytes("VmHWM")
    reset_peak()
    params = adapted.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    adapted.model.train()
    times: list[float] = []
    with gradient_checkpointing(adapted.model, bool(spec.get("gradient_checkpointing"))):
        run_steps(params, _sequential(encoded, objective.collate, batch_size), _bench_config(spec),
                  lambda _step, batch: objective.loss(adapted.model, batch), seed=0, label="bench fl",
                  on_step=lambda _step, seconds: times.append(seconds), optimizer=optimizer)
    delta_bytes = _held_bytes(adapted.get_delta().values())
    return {
        "peak_rss_bytes": max(load_peak, status_bytes("VmHWM")),
        "loaded_rss_bytes": loaded_rss,
        "train_peak_rss_bytes": status_bytes("VmHWM"),
        "tensor_bytes": _held_bytes([*adapted.model.parameters(), *adapted.model.buffers(), *_optimizer_tensors(optimizer)]),
        "step_seconds": sum(times[1:]) / steps,
        "bytes_per_step": 2 * delta_bytes / spec["local_steps"],
        "bytes_per_round": 2 * delta_bytes,
        "delta_bytes": delta_bytes,
        "tokens_per_step": sum(len(e.input_ids) for e in encoded) / (steps + 1),
    }


def _worker(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from fedpeft.common.logs import apply_offline_env

    apply_offline_env()
    torch.set_num_threads(int(spec.get("threads", 1)))
    _import_stack()
    if kind == "baseline":
        return {"peak_rss_bytes": status_bytes("VmHWM")}
    torch.manual_seed(0)
    return _worker_split(spec) if kind == "split" else _worker_fl(spec)


def _run_worker(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter (`spec["repeats"]` times, default once;
    each figure is then the median over the runs, taken figure by figure, as peak RSS moves
    by tens of MB between identical runs); its result is the last stdout line (JSON)."""
    runs = [_run_worker_once(kind, spec) for _ in range(max(1, int(spec.get("repeats", 1))))]
    if len(runs) == 1:
        return runs[0]
    result = dict(runs[0])
    for key, value in runs[0].items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            result[key] = statistics.median(r[key] for r in runs)
    result["repeats"] = len(runs)
    return result


def _run_worker_once(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    from fedpeft.common.errors import FedPeftError

    proc = subprocess.run([sys.executable, "-m", "fedpeft.simulations.bench.client_cost", "--worker", kind, json.dumps(spec)],
                          capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if proc.returncode != 0:
        raise FedPeftError(f"{kind} measurement failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _spec(model_dir: Path, *, quantize: str, batch_size: int, max_length: int, steps: int, local_steps: int,
          data: str, labels: str | None, template: str | None, lora: dict[str, str] | None, threads: int,
          repeats: int, gradient_checkpointing: bool = False) -> dict[str, Any]:
    return {"model_dir": str(model_dir), "quantize": quantize, "batch_size": batch_size, "max_length": max_length,
            "steps": steps, "local_steps": local_steps, "data": data, "labels": labels, "template": template,
            "lora": dict(lora or {}), "threads": threads, "repeats": repeats,
            "gradient_checkpointing": gradient_checkpointing}


def _finish(result: dict[str, Any], baseline: dict[str, Any]) -> dict[str, Any]:
    result["baseline_rss_bytes"] = baseline["peak_rss_bytes"]
    result["peak_memory_bytes"] = result["peak_rss_bytes"] - baseline["peak_rss_bytes"]
    result["loaded_memory_bytes"] = result["loaded_rss_bytes"] - baseline["peak_rss_bytes"]
    result["train_peak_memory_bytes"] = result["train_peak_rss_bytes"] - baseline["peak_rss_bytes"]
    return result


def measure_split_client_step(model_dir: Path, k: int, *, u_shaped: bool = False, quantize: str = "4bit",
                              wire_dtype: str = "bfloat16", batch_size: int = 8, max_length: int = 128, steps: int = 3,
                              local_steps: int = 8, data: str = DEFAULT_DATA, labels: str | None = DEFAULT_LABELS,
                              template: str | None = None, lora: dict[str, str] | None = None, threads: int = 1,
                              repeats: int = 1, gradient_checkpointing: bool = False,
                              baseline: dict[str, Any] | None = None) -> dict[str, Any]:
    """Client peak memory, compute seconds and wire bytes per step of a split client holding `k` blocks.

    The server part runs in this process on loopback TLS gRPC; the client in a subprocess.
    """
    from fedpeft.common.methods import make_config
    from fedpeft.common.model.base_model import model_fingerprint
    from fedpeft.common.model.split import SplitConfig, load_server_part
    from fedpeft.common.security.pki import make_dev_certificates
    from fedpeft.server.split_service import SplitServer, serve_split

    spec = _spec(Path(model_dir), quantize=quantize, batch_size=batch_size, max_length=max_length, steps=steps,
                 local_steps=local_steps, data=data, labels=labels, template=template, lora=lora, threads=threads,
                 repeats=repeats, gradient_checkpointing=gradient_checkpointing)
    server_part = load_server_part(Path(model_dir), SplitConfig(cut=k, u_shaped=u_shaped), make_config("lora", spec["lora"]),
                                   quantize=quantize)  # type: ignore[arg-type]
    server = SplitServer(part=server_part, model_fingerprint=model_fingerprint(Path(model_dir)), learning_rate=1e-4)
    with tempfile.TemporaryDirectory(prefix="fedpeft-split-bench-") as tmp:
        tls = make_dev_certificates(Path(tmp))
        grpc_server, port = serve_split(server, "127.0.0.1:0", tls)
        try:
            result = _run_worker("split", {**spec, "cut": k, "u_shaped": u_shaped, "wire_dtype": wire_dtype,
                                           "target": f"127.0.0.1:{port}", "ca_cert": str(tls.ca_cert)})
        finally:
            grpc_server.stop(None)
    return _finish(result, baseline or _run_worker("baseline", spec))


def measure_fl_client_step(model_dir: Path, *, quantize: str = "4bit", batch_size: int = 8, max_length: int = 128,
                           steps: int = 3, local_steps: int = 8, data: str = DEFAULT_DATA,
                           labels: str | None = DEFAULT_LABELS, template: str | None = None,
                           lora: dict[str, str] | None = None, threads: int = 1, repeats: int = 1,
                           gradient_checkpointing: bool = False, baseline: dict[str, Any] | None = None) -> dict[str, Any]:
    """The same figures for a client holding a whole model dir with LoRA, measured the same
    way: plain FL (the full model, 4-bit QLoRA), or an offsite client (`model_dir` = the
    emulator, `lora` restricted to its adapter blocks)."""
    spec = _spec(Path(model_dir), quantize=quantize, batch_size=batch_size, max_length=max_length, steps=steps,
                 local_steps=local_steps, data=data, labels=labels, template=template, lora=lora, threads=threads,
                 repeats=repeats, gradient_checkpointing=gradient_checkpointing)
    return _finish(_run_worker("fl", spec), baseline or _run_worker("baseline", spec))


def measure_offsite_client_step(model_dir: Path, layout: str, emulator_dir: Path, **kwargs: Any) -> dict[str, Any]:
    """An Offsite-Tuning client: LoRA on the adapter blocks of an emulator built from `model_dir`
    (`layout` = "bottom:top:keep_every"), measured exactly like the plain FL client."""
    from fedpeft.common.errors import ConfigError
    from fedpeft.common.offsite.run import OffsiteSettings, adapter_method_options, build_for_clients

    try:
        bottom, top, keep_every = (int(x) for x in layout.split(":"))
    except ValueError:
        raise ConfigError(f"--offsite {layout!r} is not BOTTOM:TOP:KEEP_EVERY, e.g. 2:2:4") from None
    layer_map = build_for_clients(str(model_dir), emulator_dir, OffsiteSettings(bottom=bottom, top=top,
                                                                                 keep_every=keep_every))
    lora = adapter_method_options("lora", dict(kwargs.pop("lora", None) or {}), layer_map)
    result = measure_fl_client_step(emulator_dir, lora=lora, **kwargs)
    result["blocks"] = f"{layer_map.emulator_layers}/{layer_map.full_layers}"
    return result


def measure_baseline(threads: int = 1, repeats: int = 1) -> dict[str, Any]:
    """Peak RSS of a process that only imports the client's libraries (subtracted from the
    others; the median of `repeats` fresh processes)."""
    return _run_worker("baseline", {"threads": threads, "repeats": repeats})


def ratio_table(rows: dict[str, dict[str, Any]], reference: str = "fl") -> str:
    """A markdown table of each row's figures and their ratios to `reference`."""
    ref = rows[reference]
    lines = ["| client | peak memory MB | tensors MB | compute s/step | wire KB/step | wire KB/round "
             "| memory vs FL | compute vs FL | wire/step vs FL |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['peak_memory_bytes'] / 1e6:.1f} | {r['tensor_bytes'] / 1e6:.1f} | "
                     f"{r['step_seconds']:.3f} | {r['bytes_per_step'] / 1e3:.1f} | {r['bytes_per_round'] / 1e3:.1f} | "
                     f"{ref['peak_memory_bytes'] / r['peak_memory_bytes']:.1f}x less | "
                     f"{r['step_seconds'] / ref['step_seconds']:.2f}x | {r['bytes_per_step'] / ref['bytes_per_step']:.1f}x |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--cut", type=int, default=2, help="blocks on the split client (default %(default)s)")
    parser.add_argument("--u-shaped", action="store_true", help="also measure the U-shaped split client")
    parser.add_argument("--offsite", action="append", default=[], metavar="B:T:N",
                        help="also measure an Offsite-Tuning client: bottom:top adapter blocks, keep every N-th "
                             "middle block (repeatable), e.g. 2:2:4")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3, help="measured steps (after one warm-up step)")
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--labels", default=DEFAULT_LABELS)
    parser.add_argument("--repeats", type=int, default=1,
                        help="fresh-process runs per client; figures are medians (peak RSS varies between runs)")
    parser.add_argument("--json", default=None, help="also write the raw figures to this file")
    parser.add_argument("--gradient-checkpointing", choices=["off", "on", "both"], default="off",
                        help="every client recomputes block activations in backward (on), or each client is measured "
                             "both ways, each table against the FL client trained the same way (both)")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args.worker[0], json.loads(args.worker[1]))))
        return 0
    from fedpeft.common.logs import apply_offline_env, setup_logging
    from fedpeft.common.model.base_model import resolve_model_dir

    apply_offline_env()
    setup_logging()
    model_dir = resolve_model_dir(args.model)
    common = {"batch_size": args.batch_size, "max_length": args.max_length, "steps": args.steps, "data": args.data,
              "labels": args.labels, "repeats": args.repeats}
    baseline = measure_baseline(repeats=args.repeats)
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="fedpeft-offsite-bench-") as tmp:
        for checkpointed in {"off": [False], "on": [True], "both": [False, True]}[args.gradient_checkpointing]:
            tag, kwargs = CHECKPOINTED_TAG if checkpointed else "", {**common, "gradient_checkpointing": checkpointed}
            measured = {f"fl{tag}": measure_fl_client_step(model_dir, baseline=baseline, **kwargs),
                        f"split k={args.cut}{tag}": measure_split_client_step(model_dir, args.cut, baseline=baseline,
                                                                               **kwargs)}
            if args.u_shaped:
                measured[f"split k={args.cut} U{tag}"] = measure_split_client_step(model_dir, args.cut, u_shaped=True,
                                                                                    baseline=baseline, **kwargs)
            for text in args.offsite:
                emulator_dir = Path(tmp) / f"{text.replace(':', '-')}{'-ckpt' if checkpointed else ''}"
                measured[f"offsite {text}{tag}"] = measure_offsite_client_step(model_dir, text, emulator_dir,
                                                                               baseline=baseline, **kwargs)
            print(f"\n{'with' if checkpointed else 'without'} gradient checkpointing, against FL trained the same way")
            print(ratio_table(measured, reference=f"fl{tag}"))
            rows.update(measured)
    if args.gradient_checkpointing == "both":
        fl, ckpt = rows["fl"], rows[f"fl{CHECKPOINTED_TAG}"]
        print(f"\nFL with gradient checkpointing: {fl['peak_memory_bytes'] / ckpt['peak_memory_bytes']:.2f}x less memory, "
              f"{ckpt['step_seconds'] / fl['step_seconds']:.2f}x the compute per step")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
