"""FedAvg with heterogeneous client LoRA ranks (HetLoRA or FlexLoRA aggregation).

Flower has no strategy whose clients train differently shaped deltas; this one keeps
FedAvg's sampling and metric averaging and changes only what is rank-dependent:
- the server assigns every node its rank (`RankAssignment`, authoritative: clients do
  not choose), sends it in the train config under `RANK_KEY`, and sends each node the
  global delta restricted to that rank;
- `reply_spec` tells `DeltaValidation` the exact delta spec expected from each node, so
  a reply at any other rank is rejected like any malformed delta;
- replies are aggregated per `hetero_lora` (math and scaling there).
The global delta stays at r_max = max(ranks), the rank of the server's own model.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import partial

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedpeft.common.errors import ConfigError, DeltaError
from fedpeft.common.methods.lora import LoraMethodConfig, lora_scaling
from fedpeft.common.protocol.deltas import DeltaSpec
from fedpeft.common.protocol.flower_io import delta_from_arrayrecord, delta_to_arrayrecord
from fedpeft.common.protocol.plan import RANK_KEY
from fedpeft.server.hetero_lora import Scaling, aggregate_flexlora, aggregate_hetlora, restrict, spec_at_rank

log = logging.getLogger("fedpeft.server")

HETERO_MODES = ("hetlora", "flexlora")


@dataclass(frozen=True)
class HeteroRanks:
    """Per-client LoRA ranks of a run and how to aggregate them."""

    mode: str
    """hetlora | flexlora"""
    ranks: tuple[int, ...]
    """cycled over the nodes; the server's own (global) rank is their maximum"""
    scaling: Scaling
    """peft's scale s(r) under the run's alpha (and rsLoRA choice)"""

    @classmethod
    def for_lora(cls, mode: str, ranks: Sequence[int], config: LoraMethodConfig) -> HeteroRanks:
        """Settings for LoRA `config`, whose rank must be the largest client rank."""
        if not ranks or config.r != max(ranks):
            raise ConfigError(f"the global LoRA rank r={config.r} must be the largest client rank ({list(ranks)})")
        if config.use_dora or config.freeze_a:
            raise ConfigError("heterogeneous LoRA ranks need plain LoRA (no use_dora, no freeze_a)")
        return cls(mode=mode, ranks=tuple(ranks), scaling=partial(lora_scaling, config.alpha, use_rslora=config.use_rslora))


class RankAssignment:
    """Which LoRA rank each node trains at: `ranks` cycled over the nodes in the order
    the server first sees them (ascending node id among those seen together)."""

    def __init__(self, ranks: Sequence[int]) -> None:
        if not ranks or any(int(r) != r or r < 1 for r in ranks):
            raise ConfigError(f"client ranks must be integers >= 1, got {list(ranks)}")
        self.ranks = tuple(int(r) for r in ranks)
        self.by_node: dict[int, int] = {}

    @property
    def max_rank(self) -> int:
        return max(self.ranks)

    def assign(self, node_ids: Iterable[int]) -> None:
        """Give every not yet known node the next rank of the cycle."""
        for node in sorted(set(node_ids) - set(self.by_node)):
            self.by_node[node] = self.ranks[len(self.by_node) % len(self.ranks)]

    def rank_of(self, node_id: int) -> int:
        if node_id not in self.by_node:
            raise DeltaError(f"node {node_id} was never assigned a LoRA rank (no train message was sent to it)")
        return self.by_node[node_id]


class HeteroRankLoraFedAvg(FedAvg):
    """FedAvg over LoRA deltas of per-client ranks (see module docstring)."""

    def __init__(self, *, mode: str, ranks: Sequence[int], scaling: Scaling, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        if mode not in HETERO_MODES:
            raise ConfigError(f"heterogeneous-rank LoRA aggregation {mode!r}: choose one of {list(HETERO_MODES)}")
        self.mode = mode
        self.assignment = RankAssignment(ranks)
        self.scaling = scaling
        #: FlexLoRA: round -> {rank: relative Frobenius error of what that rank is sent}.
        self.rank_errors: dict[int, dict[int, float]] = {}

    def reply_spec(self, node_id: int, default: DeltaSpec) -> DeltaSpec:
        """The spec a reply from `node_id` must match: the method's, at the node's rank."""
        return spec_at_rank(default, self.assignment.rank_of(node_id))

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        known = set(self.assignment.by_node)
        self.assignment.assign(grid.get_node_ids())
        new = {n: r for n, r in self.assignment.by_node.items() if n not in known}
        if new:
            log.info("LoRA ranks assigned to nodes: %s", new)
        messages = list(super().configure_train(server_round, arrays, config, grid))
        if not messages:
            return messages
        global_delta = delta_from_arrayrecord(arrays)
        downlinks: dict[int, ArrayRecord] = {}
        out = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            rank = self.assignment.rank_of(node)
            if rank not in downlinks:
                downlinks[rank] = delta_to_arrayrecord(restrict(global_delta, rank, self.scaling))
            train_config = ConfigRecord({**msg.content[self.configrecord_key], RANK_KEY: rank})
            content = RecordDict({self.arrayrecord_key: downlinks[rank], self.configrecord_key: train_config})
            out.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node))
        return out

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        contents = [msg.content for msg in valid]
        deltas = [delta_from_arrayrecord(next(iter(c.array_records.values()))) for c in contents]
        weights = [float(next(iter(c.metric_records.values()))[self.weighted_by_key]) for c in contents]  # type: ignore[arg-type]
        rank = self.assignment.max_rank
        if self.mode == "hetlora":
            merged = aggregate_hetlora(deltas, weights, rank, self.scaling)
            log.info("round %d: HetLoRA aggregation of %d client(s) at ranks %s", server_round, len(deltas),
                     sorted(self.assignment.rank_of(m.metadata.src_node_id) for m in valid))
        else:
            merged, report = aggregate_flexlora(deltas, weights, rank, self.scaling, self.assignment.ranks)
            self.rank_errors[server_round] = report.max_relative_error
            log.info("round %d: FlexLoRA aggregation of %d modules; relative error per rank %s", server_round,
                     report.modules, {r: f"{e:.2e}" for r, e in report.max_relative_error.items()})
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        return delta_to_arrayrecord(merged), metrics
