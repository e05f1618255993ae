"""The federation topologies fedpeft knows, named in one place for every CLI and run config.

- `fl`: plain federated PEFT — every client holds the whole (4-bit) base model.
- `offsite`: Offsite-Tuning — clients hold a compressed *emulator* plus the trainable
  *adapter* blocks; the owner plugs the adapter back into the full model
  (`fedpeft.common.offsite`).
- `split`: split fine-tuning — clients hold only the bottom of the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from fedpeft.common.errors import ConfigError

Topology = Literal["fl", "offsite", "split"]
TOPOLOGIES: tuple[str, ...] = ("fl", "offsite", "split")
DEFAULT_TOPOLOGY: Topology = "fl"


def validate_topology(value: str, supported: Sequence[str] = TOPOLOGIES, where: str = "topology") -> Topology:
    """`value` as a `Topology`; unknown values, or ones this entry point does not run yet,
    name what is accepted."""
    if value not in TOPOLOGIES:
        raise ConfigError(f"{where} {value!r} is not a topology; choose one of {list(TOPOLOGIES)}")
    if value not in supported:
        raise ConfigError(f"{where} {value!r} is not supported here; supported: {list(supported)}")
    return value  # type: ignore[return-value]
