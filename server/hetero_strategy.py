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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedpeft.common.errors import ConfigError, DeltaError
from fedpeft.common.methods.lora import LoraMethodConfig, lora_scaling
from fedpeft.common.protocol.deltas import DeltaSpec
from fedpeft.common.protocol.flower_io import delta_from_arrayrecord, delta_to_arrayrecord
from fedpeft.common.protocol.plan import PARTITION_KEY, QUERY_KEY, RANK_KEY
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
    """Which LoRA rank each node trains at: `ranks` cycled over the clients by the partition
    id each declares (client k trains at ranks[k % len(ranks)], in simulation and deployment
    alike). A node that declares none, or a partition another node already holds, takes the
    lowest turn nobody holds, in the order the server first sees it (ascending node id
    among those seen together)."""

    def __init__(self, ranks: Sequence[int]) -> None:
        if not ranks or any(int(r) != r or r < 1 for r in ranks):
            raise ConfigError(f"client ranks must be integers >= 1, got {list(ranks)}")
        self.ranks = tuple(int(r) for r in ranks)
        self.by_node: dict[int, int] = {}
        self.turn_of: dict[int, int] = {}
        """node -> its turn in the cycle (its declared partition id, or the lowest free one)."""

    @property
    def max_rank(self) -> int:
        return max(self.ranks)

    def assign(self, node_ids: Iterable[int], declared: Mapping[int, int] | None = None) -> None:
        """Give every not yet known node its rank: by its `declared` partition id, else the next of the cycle."""
        declared = declared or {}
        new = sorted(set(node_ids) - set(self.by_node))
        taken = set(self.turn_of.values())
        undeclared = []
        for node in new:  # declared turns first, so a free turn never lands on a declared one
            turn = declared.get(node)
            if turn is None or turn in taken:
                if turn is not None:
                    log.warning("node %d declares partition %d, which another node already holds", node, turn)
                undeclared.append(node)
                continue
            self.turn_of[node] = turn
            taken.add(turn)
        for node in undeclared:
            turn = next(t for t in range(len(taken) + 1) if t not in taken)
            self.turn_of[node] = turn
            taken.add(turn)
        for node in new:
            self.by_node[node] = self.ranks[self.turn_of[node] % len(self.ranks)]

    def rank_of(self, node_id: int) -> int:
        if node_id not in self.by_node:
            raise DeltaError(f"node {node_id} was never assigned a LoRA rank (no train message was sent to it)")
        return self.by_node[node_id]


def declared_partitions(grid: Grid, nodes: Sequence[int], timeout: float = 120.0) -> dict[int, int]:
    """{node: partition id} of the nodes that answer a partition query (see
    `fedpeft.client.flower_app.partition_query`); a node that fails or declares none is left out."""
    query = ConfigRecord({QUERY_KEY: PARTITION_KEY})
    messages = [Message(RecordDict({"config": query}), message_type=MessageType.QUERY, dst_node_id=node) for node in nodes]
    declared: dict[int, int] = {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        if reply.has_error():
            log.warning("node %d did not declare a partition id: %s", reply.metadata.src_node_id, reply.error.reason)
            continue
        record = reply.content.metric_records.get("partition")
        value = record.get(PARTITION_KEY) if record is not None else None
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**31:
            declared[reply.metadata.src_node_id] = value
    silent = sorted(set(nodes) - set(declared))
    if silent:
        log.warning("nodes %s declared no partition id (peft-client start --partition-id K, or --data builtin:K/N); "
                    "they take the lowest free turns of the rank cycle", silent)
    return declared


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
        new_nodes = sorted(set(grid.get_node_ids()) - known)
        if new_nodes:
            self.assignment.assign(new_nodes, declared_partitions(grid, new_nodes))
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
        deltas = [delta_from_arrayrecord(next(iter(msg.content.array_records.values()))) for msg in valid]
        return self.aggregate_deltas(server_round, deltas, valid)

    def aggregate_deltas(self, server_round: int, deltas: Sequence[Mapping[str, torch.Tensor]],
                         replies: Sequence[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The aggregate of decoded, validated `deltas` (one per reply, in a content order)."""
        valid = replies
        contents = [msg.content for msg in valid]
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
