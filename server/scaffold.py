"""SCAFFOLD's server control variate (Karimireddy et al. 2020, Algorithm 1, line 17).

c <- c + (|S| / N) * mean_i (c_i+ - c_i) over the round's accepted replies S out of the
N nodes connected when the round was configured. Only fedavg-family aggregation of
full-shape deltas is supported (the run spec refuses the rest up front); the mean is
taken in float64 in the order the strategy sorts replies in, so a run is reproducible.
A resumed run restarts from c = 0: clients keep c_i in Flower's per-run node state,
which a restarted run does not have, and c = 0 with every c_i = 0 is consistent.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence

import torch
from flwr.app import ArrayRecord

from fedpeft.common.protocol.deltas import DeltaSpec
from fedpeft.common.protocol.flower_io import delta_to_arrayrecord
from fedpeft.common.training.scaffold import control_spec

log = logging.getLogger("fedpeft.server")


class ServerControl:
    """The server's control variate c, starting at zero."""

    def __init__(self, spec: DeltaSpec) -> None:
        self.spec = control_spec(spec)
        self.value: OrderedDict[str, torch.Tensor] = OrderedDict(
            (n, torch.zeros(s.shape, dtype=torch.float32)) for n, s in self.spec.tensors.items())
        self._record: ArrayRecord | None = None

    def record(self) -> ArrayRecord:
        """c as the ArrayRecord every train message of a round shares."""
        if self._record is None:
            self._record = delta_to_arrayrecord(self.value)
        return self._record

    def update(self, changes: Sequence[dict[str, torch.Tensor]], population: int) -> None:
        """Fold the accepted replies' c_i+ - c_i (validated against `self.spec`) into c."""
        if not changes:
            return
        fraction = len(changes) / max(population, len(changes))
        for name in self.value:
            total = torch.zeros(self.value[name].shape, dtype=torch.float64)
            for change in changes:
                total += change[name].double()
            self.value[name] = (self.value[name].double() + total * (fraction / len(changes))).float()
        self._record = None
        norm = sum(float(t.double().pow(2).sum()) for t in self.value.values()) ** 0.5
        log.info("SCAFFOLD: server control variate updated from %d of %d clients, |c| = %.4g",
                 len(changes), population, norm)
