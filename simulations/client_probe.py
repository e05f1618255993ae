"""Measure what one client holds and spends per local training step, in a fresh process.

`python -m fedpeft.simulations.client_probe '{"topology": "fl", ...}'` loads the client's
model exactly as a federated client does (`AdaptedModel.load`: 4-bit base + PEFT
method), runs one warm-up step, resets the kernel's peak-RSS counter
(`/proc/self/clear_refs`), runs the measured steps with the client's own training loop
(`train_local`) and prints one JSON line. A fresh process per measurement keeps
allocator state from one topology out of another's numbers; topology `baseline` only
imports the same libraries, so its peak is the fixed cost subtracted from the others.

Each topology names how its client trains in `STEP_PROBES`; a new topology (split)
registers its own function there.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULT_MARK = "CLIENT-PROBE-RESULT "


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not permitted."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _import_client_stack() -> None:
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from fedpeft.client import training  # noqa: F401
    from fedpeft.common import adapted_model  # noqa: F401


def _model_bytes(model: Any) -> int:
    """Bytes of every parameter and buffer the client holds (4-bit weights count their packed size)."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        key = tensor.untyped_storage().data_ptr()
        if key not in seen:  # tied weights (embedding = head) are held once
            seen.add(key)
            total += tensor.untyped_storage().nbytes()
    return total


def adapted_model_steps(spec: dict[str, Any]) -> dict[str, Any]:
    """A client that holds a whole (base) model dir + PEFT method: plain FL, and offsite
    (whose model dir is the emulator)."""
    import torch

    from fedpeft.client.training import TrainConfig, train_local
    from fedpeft.common.adapted_model import AdaptedModel
    from fedpeft.common.data import infer_task, read_records
    from fedpeft.common.methods import make_config

    torch.set_num_threads(int(spec.get("threads", 1)))
    rows = read_records(Path(spec["data"]))[: int(spec.get("rows", 256))]
    task = infer_task(rows, kind=spec.get("task", "auto"), template=spec.get("template"), labels=spec.get("labels"))
    t0 = time.perf_counter()
    adapted = AdaptedModel.load(Path(spec["model_dir"]), spec["quantize"], spec["method"],
                                make_config(spec["method"], spec.get("method_options", {})), seed=0,
                                num_labels=task.num_labels)
    load_seconds = time.perf_counter() - t0
    load_peak_kb = _status_kb("VmHWM")
    config = dict(batch_size=int(spec["batch_size"]), max_length=int(spec["max_length"]),
                  learning_rate=1e-3, log_every=1000)
    train_local(adapted, task, rows, TrainConfig(local_steps=1, **config), seed=0, label="warm-up")
    rss_before_kb = _status_kb("VmRSS")
    reset = reset_peak_rss()
    stats = train_local(adapted, task, rows, TrainConfig(local_steps=int(spec["steps"]), **config), seed=1, label="probe")
    return {
        "load_seconds": load_seconds, "load_peak_rss_kb": load_peak_kb, "rss_before_steps_kb": rss_before_kb,
        "train_peak_rss_kb": _status_kb("VmHWM"), "peak_reset": reset, "seconds_per_step": stats.seconds / stats.steps,
        "steps": stats.steps, "model_bytes": _model_bytes(adapted.model), "delta_bytes": adapted.spec.num_bytes,
        "trainable_parameters": adapted.spec.num_parameters, "loss": stats.mean_loss,
    }


def baseline(spec: dict[str, Any]) -> dict[str, Any]:
    """Only the libraries a client imports: the fixed cost every topology pays."""
    return {"load_peak_rss_kb": _status_kb("VmHWM"), "train_peak_rss_kb": _status_kb("VmHWM")}


STEP_PROBES: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "baseline": baseline,
    "fl": adapted_model_steps,
    "offsite": adapted_model_steps,
}


def main(argv: list[str] | None = None) -> int:
    from fedpeft.common.logs import apply_offline_env

    apply_offline_env()
    spec = json.loads((argv or sys.argv[1:])[0])
    probe = STEP_PROBES.get(spec["topology"])
    if probe is None:
        print(f"client_probe: no step probe for topology {spec['topology']!r}; known: {sorted(STEP_PROBES)}", file=sys.stderr)
        return 2
    _import_client_stack()
    result = probe(spec)
    result["ru_maxrss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(RESULT_MARK + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
