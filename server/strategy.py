"""FedAvg over PEFT deltas, on Flower's message-based FedAvg.

Flower's `FedAvg` does the sampling and the example-weighted average. This subclass adds
what a federation over untrusted edge clients needs around it:
- every reply's delta is decoded and checked against the method's delta spec (names,
  shapes, dtypes, finiteness, size) and its example count; a bad reply is logged with
  the reason and left out, and the round completes with the remaining clients;
- bytes sent and received are counted per round;
- the recorder is told about each aggregated round (for metrics and checkpoints).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedpeft.common.deltas import DeltaSpec
from fedpeft.common.errors import DeltaError
from fedpeft.common.flower_io import delta_from_arrayrecord, record_bytes

log = logging.getLogger("fedpeft.server")


@dataclass
class RoundTraffic:
    """What one training round moved and how it went."""

    started: float = field(default_factory=time.perf_counter)
    bytes_down: int = 0
    bytes_up: int = 0
    sent: int = 0
    accepted: int = 0
    rejected: list[str] = field(default_factory=list)
    failed: int = 0
    seconds: float = 0.0
    train_metrics: dict[str, float] = field(default_factory=dict)
    client_metrics: list[dict[str, float]] = field(default_factory=list)


class PeftFedAvg(FedAvg):
    """Example-weighted FedAvg of PEFT deltas with per-reply validation."""

    def __init__(self, *, spec: DeltaSpec, max_delta_bytes: int, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.spec = spec
        self.max_delta_bytes = max_delta_bytes
        self.traffic: dict[int, RoundTraffic] = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.traffic[server_round] = RoundTraffic(bytes_down=record_bytes(arrays) * len(messages), sent=len(messages))
        return messages

    def reply_problem(self, msg: Message) -> str | None:
        """Why a (non-error) reply must be left out of aggregation, or None if valid."""
        content = msg.content
        if len(content.array_records) != 1 or len(content.metric_records) != 1:
            return (f"expected one delta and one metrics record, got {len(content.array_records)} and "
                    f"{len(content.metric_records)}")
        metrics = next(iter(content.metric_records.values()))
        weight = metrics.get(self.weighted_by_key)
        if not isinstance(weight, int | float) or isinstance(weight, bool) or not math.isfinite(weight) or weight <= 0:
            return f"{self.weighted_by_key!r} must be a positive number, got {weight!r}"
        try:
            delta = delta_from_arrayrecord(next(iter(content.array_records.values())), self.max_delta_bytes)
            self.spec.validate(delta, source="client delta")
        except DeltaError as exc:
            return str(exc)
        return None

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        traffic = self.traffic.setdefault(server_round, RoundTraffic())
        usable: list[Message] = []
        for msg in replies:
            if msg.has_error():
                traffic.failed += 1
                usable.append(msg)  # Flower logs error replies and skips them
                continue
            traffic.bytes_up += sum(record_bytes(r) for r in msg.content.array_records.values())
            problem = self.reply_problem(msg)
            if problem is None:
                usable.append(msg)
                traffic.accepted += 1
                metrics_record = next(iter(msg.content.metric_records.values()))
                traffic.client_metrics.append({k: float(v) for k, v in metrics_record.items() if isinstance(v, int | float)})
            else:
                traffic.rejected.append(f"node {msg.metadata.src_node_id}: {problem}")
                log.error("round %d: rejected update from node %d: %s", server_round, msg.metadata.src_node_id, problem)
        arrays, metrics = super().aggregate_train(server_round, usable)
        if arrays is None:
            log.warning("round %d: no valid client update; the global adapter is unchanged", server_round)
        traffic.seconds = time.perf_counter() - traffic.started
        if metrics is not None:
            traffic.train_metrics = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
        return arrays, metrics
