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
objective. The changes are summed exactly (`fedpeft.server.weighted_sum`), so c does not
depend on the order replies arrive in.
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
from fedpeft.server.weighted_sum import ExactWeightedSum

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

    def begin_round(self, capacity: int) -> ControlChanges:
        """An empty exact sum for the changes of a round of at most `capacity` replies."""
        return ControlChanges(ExactWeightedSum(self.spec, capacity, fast=False))  # (float64 changes: two limbs)

    def commit(self, server_round: int, changes: ControlChanges) -> None:
        """c += |S|/N * mean of the round's folded changes; those nodes' changes are now in c."""
        if not changes.nodes:
            return
        count = len(changes.nodes)
        if count > self.population:  # more nodes connected than federation.clients: |S|/N capped at 1
            log.warning("round %d: %d SCAFFOLD changes from a federation of %d clients; set federation.clients to "
                        "the number of nodes", server_round, count, self.population)
        factor = 1.0 / max(self.population, count)  # |S|/N * (1/|S|)
        total = changes.sum.total()
        for name in self.value:
            self.value[name] = (self.value[name].double() + total[name] * factor).float()
        for node in changes.nodes:
            self.accepted[node] = server_round
        self._record = None
        norm = sum(float(t.double().pow(2).sum()) for t in self.value.values()) ** 0.5
        log.info("round %d: SCAFFOLD control variate updated from %d of %d clients, |c| = %.4g",
                 server_round, count, self.population, norm)

    def fold(self, server_round: int, changes: Sequence[tuple[int, Mapping[str, torch.Tensor]]]) -> None:
        """`commit` of the given (node id, change) pairs."""
        round_changes = self.begin_round(capacity=max(len(changes), 1))
        for node, change in changes:
            problem = round_changes.problem(change)
            if problem:
                raise ValueError(f"node {node}: {problem}")
            round_changes.add(node, change)
        self.commit(server_round, round_changes)


class ControlChanges:
    """A round's control variate changes, summed exactly as replies are folded (unweighted)."""

    def __init__(self, total: ExactWeightedSum) -> None:
        self.sum = total
        self.nodes: list[int] = []

    def problem(self, change: Mapping[str, torch.Tensor]) -> str | None:
        return self.sum.problem(change, 1)

    def add(self, node: int, change: Mapping[str, torch.Tensor]) -> None:
        self.sum.add(change, 1)
        self.nodes.append(node)


__all__ = ["ACCEPTED_KEY", "ControlChanges", "ServerControl"]
