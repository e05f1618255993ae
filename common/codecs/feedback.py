"""Error feedback: the part of its update a client has not sent yet, kept across rounds.

A lossy codec (top-k, int8, 4-bit) sends `decode(encode(u + e))` of the client's update
u plus its residual e, and keeps `e' = (u + e) - decode(encode(u + e))` for the next round
(Seide et al. 2014; Karimireddy et al. 2019, "EF-SGD"), so over rounds

    sum(sent) + residual == sum(true updates)

and nothing the codec drops is lost for good, as long as the server folds the reply in
(a refused, clipped or lost reply loses what it carried, as it would uncompressed). The residual lives in Flower's per-run
`Context.state` (kept between a node's rounds, in simulation and deployment alike) and,
when the node config names a state directory (`peft-client` sets its workdir's
`state/`), also in a safetensors file there, which a restarted client reads back. A
residual whose tensors or shapes differ from this round's update (another run, another
rank) is dropped: the client starts from zero, the method's initialisation.
"""

from __future__ import annotations

import logging
import os
import re
from collections import OrderedDict
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

log = logging.getLogger("fedpeft.client")
RESIDUAL_KEY = "fedpeft-ef-residual"
"""Client state: the error-feedback residual (an ArrayRecord named like the delta)."""
STATE_DIR_KEY = "fedpeft-state-dir"
"""Node config: a directory where the client's state also survives a restart."""


def _path(context: Context) -> Path | None:
    folder = context.node_config.get(STATE_DIR_KEY)
    if not folder:
        return None
    # the state dir is the client's own (peft-client's workdir); a node id would change when a
    # SuperNode without auth keys restarts, so the file is the run's
    safe = re.sub(r"[^0-9A-Za-z_-]", "_", str(context.run_id))
    return Path(str(folder)) / f"error-feedback-{safe}.safetensors"


def load_residual(context: Context, layout: OrderedDict[str, tuple[int, ...]]) -> OrderedDict[str, np.ndarray]:
    """The client's residual for tensors of `layout` (zeros where it has none that matches)."""
    arrays: dict[str, np.ndarray] = {}
    record = context.state.array_records.get(RESIDUAL_KEY)
    if record is not None:
        arrays = {name: np.asarray(array.numpy(), dtype=np.float32) for name, array in record.items()}
    else:
        path = _path(context)
        if path is not None and path.is_file():
            try:
                arrays = load_file(str(path))
            except (OSError, SafetensorError) as exc:
                log.warning("error feedback: cannot read %s (%s); starting from a zero residual", path, exc)
    if set(arrays) == set(layout) and all(arrays[n].shape == s for n, s in layout.items()):  # (a file's are sorted)
        return OrderedDict((n, np.asarray(arrays[n], dtype=np.float32)) for n in layout)
    if arrays:
        log.warning("error feedback: the kept residual does not match this round's tensors; starting from zero")
    return OrderedDict((n, np.zeros(s, dtype=np.float32)) for n, s in layout.items())


def save_residual(context: Context, residual: OrderedDict[str, np.ndarray]) -> None:
    """Keep `residual` in the node's state (and its state directory, written atomically)."""
    arrays = OrderedDict((n, np.ascontiguousarray(r, dtype=np.float32)) for n, r in residual.items())
    context.state[RESIDUAL_KEY] = ArrayRecord(OrderedDict((n, Array(a)) for n, a in arrays.items()))
    path = _path(context)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        save_file(dict(arrays), str(partial))
        os.replace(partial, path)
