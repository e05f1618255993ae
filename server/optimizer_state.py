"""A Flower server optimizer's state between rounds, on disk beside the round's checkpoint.

FedAdam, FedYogi and FedAdagrad (Flower's FedOpt family) carry Adam's moment estimates
`m_t` and `v_t` from round to round, FedAvgM its `momentum_vector`; without them a resumed
run would restart Adam cold and drift from the uninterrupted one. Flower keeps them as
plain attributes and has no checkpoint for them, so this module writes them with
safetensors (`m_t/<array name>`, `momentum_vector/<index>`) after every round and puts
them back before a resumed run's first round. The rest of a FedOpt strategy's state
(`current_arrays`) is the global adapter itself, set again from the checkpoint by
`configure_train`; the bias-corrected step sizes follow the run's true round number.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from fedpeft.common.errors import FederationError
from fedpeft.common.files import atomic_write_bytes
from fedpeft.server.strategy import SERVER_OPTIMIZER_STATE

STATE_ATTRIBUTES = tuple(a for a in SERVER_OPTIMIZER_STATE if a != "current_arrays")
"""What is saved of the strategies' state: `current_arrays` is the global adapter itself."""


def state_path(checkpoint: Path) -> Path:
    """Where the state after a round lives: beside that round's global checkpoint."""
    return checkpoint.with_name(checkpoint.name.replace("global-round-", "server-optimizer-round-"))


def optimizer_state(strategy: object) -> dict[str, np.ndarray]:
    """The strategy's optimizer state as named arrays (empty before its first step)."""
    out: dict[str, np.ndarray] = {}
    for attr in STATE_ATTRIBUTES:
        value = getattr(strategy, attr, None)
        if not value:
            continue
        items = value.items() if isinstance(value, Mapping) else enumerate(value)
        for key, array in items:
            out[f"{attr}/{key}"] = np.ascontiguousarray(array).reshape(np.shape(array))  # (0-d stays 0-d)
    return out


def save_optimizer_state(strategy: object, checkpoint: Path) -> None:
    """Write the state after the round whose global adapter is `checkpoint` (atomically)."""
    from safetensors.numpy import save

    atomic_write_bytes(state_path(checkpoint), save(optimizer_state(strategy)))


def restore_optimizer_state(strategy: object, checkpoint: Path) -> None:
    """Put back the state saved with `checkpoint` (a FederationError when it is missing)."""
    from safetensors.numpy import load_file

    path = state_path(checkpoint)
    if not path.is_file():
        raise FederationError(f"cannot resume a stateful server optimizer: {path} is missing (a run dir from before "
                              "fedpeft checkpointed it, or a torn write)")
    groups: dict[str, dict[str, np.ndarray]] = {}
    for name, array in load_file(str(path)).items():
        attr, _, key = name.partition("/")
        if attr not in STATE_ATTRIBUTES or not key:
            raise FederationError(f"{path}: unexpected entry {name!r}")
        groups.setdefault(attr, {})[key] = array
    for attr, arrays in groups.items():
        if attr == "momentum_vector":  # FedAvgM keeps a list in its arrays' order
            setattr(strategy, attr, [arrays[str(i)] for i in range(len(arrays))])
        else:
            setattr(strategy, attr, arrays)
