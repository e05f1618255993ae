"""SCAFFOLD's server side (Karimireddy et al. 2020, Algorithm 1, line 17).

c <- c + (|S| / N) * mean_i (c_i+ - c_i) over the round's folded replies S, N being the
federation's clients (`federation.clients`, fixed for the run, so every round's
contributions are scaled alike). A client's change c_i+ - c_i is m_i - c (option II),
with m_i = (x - y_i) / (K_i * lr) its round's mean step: x the delta it was sent, y_i the
delta it returned, K_i its local steps. The server derives it from the delta it has
already validated instead of taking a second tensor from the client, so the change is
bounded by every bound the delta is, and the uplink carries nothing extra.

A change is folded only for a reply that was accepted unclipped into an aggregate that
was kept; the next message to that node names the round (`accepted_round`), and only
then does the client commit its c_i+ (`fedpeft.common.protocol.control_variates`). So c
stays the mean of the clients' c_i whatever is refused, clipped or lost.

c is the clients' unweighted mean, as in the paper, while FedAvg weights updates by
example counts: with unequal partitions SCAFFOLD's fixed point is the per-client average
objective. The sums run in float64, in the order the strategy sorts replies in.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import torch
from flwr.app import ArrayRecord, ConfigRecord

from fedpeft.client.training import TrainConfig
from fedpeft.common.errors import ConfigError
from fedpeft.common.protocol.control_variates import ACCEPTED_KEY, ACCEPTED_ROUND
from fedpeft.common.protocol.deltas import DeltaSpec
from fedpeft.common.protocol.flower_io import delta_to_arrayrecord
from fedpeft.common.training.scaffold import control_spec

log = logging.getLogger("fedpeft.server")


class ServerControl:
    """The server's control variate c (starting at zero) and which node's changes it holds."""

    def __init__(self, spec: DeltaSpec, population: int, train: TrainConfig) -> None:
        if population < 1:
            raise ConfigError(f"SCAFFOLD needs the number of clients in the federation, got {population}")
        if train.learning_rate is None or (train.local_steps is None and train.local_epochs == 0):
            raise ConfigError("SCAFFOLD needs the clients' concrete learning rate and local steps")
        self.spec = control_spec(spec)
        self.population = population
        self.train = train
        self.value: OrderedDict[str, torch.Tensor] = OrderedDict(
            (n, torch.zeros(s.shape, dtype=torch.float32)) for n, s in self.spec.tensors.items())
        self.accepted: dict[int, int] = {}
        """node id -> the last round whose change of that node's c_i was folded into c."""
        self._record: ArrayRecord | None = None

    def record(self) -> ArrayRecord:
        """c as the ArrayRecord every train message of a round shares."""
        if self._record is None:
            self._record = delta_to_arrayrecord(self.value)
        return self._record

    def node_config(self, node_id: int) -> ConfigRecord:
        return ConfigRecord({ACCEPTED_ROUND: self.accepted.get(node_id, 0)})

    def change(self, sent: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor],
               num_examples: int) -> OrderedDict[str, torch.Tensor]:
        """m - c for a client that was sent `sent` and returned `delta` (both validated), float64."""
        steps = self.train.steps_for(num_examples)
        assert self.train.learning_rate is not None
        scale = 1.0 / (steps * self.train.learning_rate)
        return OrderedDict((n, (sent[n].double() - delta[n].double()) * scale - c.double())
                           for n, c in self.value.items())

    def fold(self, server_round: int, changes: Sequence[tuple[int, Mapping[str, torch.Tensor]]]) -> None:
        """c += |S|/N * mean of the (node id, change) pairs; those nodes' changes are now in c."""
        if not changes:
            return
        if len(changes) > self.population:  # more nodes connected than federation.clients: |S|/N capped at 1
            log.warning("round %d: %d SCAFFOLD changes from a federation of %d clients; set federation.clients to "
                        "the number of nodes", server_round, len(changes), self.population)
        factor = 1.0 / max(self.population, len(changes))  # |S|/N * (1/|S|)
        for name in self.value:
            total = torch.zeros(self.value[name].shape, dtype=torch.float64)
            for _node, change in changes:
                total += change[name]
            self.value[name] = (self.value[name].double() + total * factor).float()
        for node, _change in changes:
            self.accepted[node] = server_round
        self._record = None
        norm = sum(float(t.double().pow(2).sum()) for t in self.value.values()) ** 0.5
        log.info("round %d: SCAFFOLD control variate updated from %d of %d clients, |c| = %.4g",
                 server_round, len(changes), self.population, norm)


__all__ = ["ACCEPTED_KEY", "ServerControl"]
