"""Aggregation strategies over PEFT deltas: Flower's message-based strategies, validated.

Flower's strategies (FedAvg, FedProx, FedAdam, FedYogi, FedAdagrad, FedAvgM, FedMedian,
FedTrimmedAvg) do the sampling and the aggregation math. `DeltaValidation` is mixed in
front of any of them and adds what a federation over untrusted edge clients needs:
- every reply's delta is decoded and checked against the method's delta spec (names,
  shapes, dtypes, finiteness, size) and its example count; a bad reply is logged with
  the reason and left out, and the round completes with the remaining clients. A
  strategy whose clients train differently shaped deltas (heterogeneous LoRA ranks)
  provides `reply_spec(node_id, default)`, and each reply is held to its node's spec;
- a round with fewer accepted updates than `min_accepted` stops the run with a
  `FederationError` instead of silently keeping the old adapter;
- optional update-norm clipping: a client's update (its delta minus the one it was sent)
  longer than `clip_update_norm` (L2 over all tensors) is scaled down to that length
  before aggregation, bounding what one client can move the global adapter;
- bytes sent and received are counted per round;
- the recorder is told about each aggregated round (for metrics and checkpoints).
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
)
from flwr.serverapp.strategy.fedopt import FedOpt
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from fedpeft.client.training import TrainConfig
from fedpeft.common.codecs.mod import ENCODED_ARRAY, FLAT_UPLOAD_KEY
from fedpeft.common.codecs.wire import FP32
from fedpeft.common.errors import ConfigError, DeltaError, FederationError
from fedpeft.common.protocol.control_variates import ACCEPTED_KEY, SERVER_CONTROL_KEY
from fedpeft.common.protocol.deltas import DeltaSpec
from fedpeft.common.protocol.flower_io import delta_from_arrayrecord, delta_to_arrayrecord, record_bytes
from fedpeft.common.protocol.plan import REPLY_ARRAYS_KEY, REPLY_METRICS_KEY, WEIGHT_KEY
from fedpeft.server.compression import (
    Compression,
    FlatDelta,
    decode_flat_reply,
    payload_spec,
    plain_nbytes,
    travels_flat,
)
from fedpeft.server.fold_kernels import NON_FINITE_BITS, peak_bits
from fedpeft.server.hetero_strategy import HETERO_MODES, HeteroRankLoraFedAvg, HeteroRanks
from fedpeft.server.lora_aggregation import aggregate_lora_svd
from fedpeft.server.metric_mean import weighted_metric_mean
from fedpeft.server.robust import RobustSettings, metric_problem, relative_outliers, update_norm, value_problem
from fedpeft.server.scaffold import ControlChanges, ServerControl
from fedpeft.server.weighted_sum import DEFAULT_CAPACITY, Checked, ExactWeightedSum

log = logging.getLogger("fedpeft.server")


@dataclass
class RoundTraffic:
    """What one training round moved and how it went."""

    started: float = field(default_factory=time.perf_counter)
    bytes_down: int = 0
    bytes_up: int = 0
    bytes_down_raw: int = 0
    """What the broadcast would have been as plain fp32 arrays (= bytes_down without a download codec)."""
    bytes_up_raw: int = 0
    """What the replies' deltas would have been as plain arrays (= bytes_up without an upload codec)."""
    sent: int = 0
    accepted: int = 0
    rejected: list[str] = field(default_factory=list)
    clipped: int = 0
    failed: int = 0
    seconds: float = 0.0
    server_rate: float | None = None
    """The rate a server rate schedule set for this round (recorded even when the round's
    aggregate is refused and no step is taken: a resume checks the schedule against it)."""
    train_metrics: dict[str, float] = field(default_factory=dict)
    client_metrics: list[dict[str, float]] = field(default_factory=list)


class DeltaValidation:
    """Mixin for a Flower strategy: validate every reply's delta before aggregation."""

    weighted_by_key: str

    def __init__(self, *, spec: DeltaSpec, max_delta_bytes: int, min_accepted: int = 1,
                 clip_update_norm: float = 0.0, robust: RobustSettings | None = None,
                 scaffold: TrainConfig | None = None, compression: Compression | None = None,
                 **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[call-arg]
        if not (clip_update_norm >= 0 and math.isfinite(clip_update_norm)):
            raise ConfigError(f"clip_update_norm must be a finite number >= 0, got {clip_update_norm}")
        self.robust = robust if robust is not None else RobustSettings()
        problems = self.robust.problems()
        if problems:
            raise ConfigError("; ".join(problems))
        self.spec = spec
        self.max_delta_bytes = max_delta_bytes
        self.min_accepted = min_accepted
        self.clip_update_norm = clip_update_norm
        #: The delta each node of the current round was sent (for clipping its update).
        self._sent: dict[int, dict[str, torch.Tensor]] = {}
        self._rounds_configured = 0
        #: DP: aggregate only when every sampled client's update was accepted (else release
        #: nothing), and keep sampling exactly the configured number of clients.
        self.all_or_nothing = False
        #: Opens sealed replies in place (see `sealed_replies`); None = plaintext replies.
        self.unseal: Callable[[Message, int], str | None] | None = None
        #: Rounds already completed before this process started (a resumed run).
        self.round_offset = 0
        self.traffic: dict[int, RoundTraffic] = {}
        #: SCAFFOLD's server control variate over the federation's clients (None: no drift correction).
        self.control = (ServerControl(spec, int(kwargs.get("min_available_nodes", 0)), scaffold)  # type: ignore[call-overload]
                        if scaffold is not None else None)
        #: The run's delta codecs (`fedpeft.server.compression`); None: plain fp32 arrays both ways.
        self.compression = compression
        self._travels_flat: bool | None = None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        server_round += self.round_offset  # clients (and their seeds) see the run's true round
        if self._rounds_configured and not self.all_or_nothing:
            relax_minimums(self, "min_train_nodes", "min_available_nodes", self.min_accepted)
        self._rounds_configured += 1
        if self.compression is not None:
            config = ConfigRecord({**dict(config), **self.compression.config()})
        if self.flat_upload:
            config = ConfigRecord({**dict(config), FLAT_UPLOAD_KEY: True})
        messages = list(super().configure_train(server_round, arrays, config, grid))  # type: ignore[misc]
        downlinks = [msg.content.array_records[self.arrayrecord_key] for msg in messages]  # type: ignore[attr-defined]
        self._sent = {}
        uploads_encoded = self.compression is not None and self.compression.upload is not None
        if self.clip_update_norm > 0 or self.robust.needs_updates or self.control is not None or uploads_encoded:
            decoded: dict[int, dict[str, torch.Tensor]] = {}  # messages usually share one record
            for msg, record in zip(messages, downlinks, strict=True):
                if id(record) not in decoded:
                    decoded[id(record)] = dict(delta_from_arrayrecord(record))
                self._sent[msg.metadata.dst_node_id] = decoded[id(record)]
        bytes_down_raw = sum(record_bytes(r) for r in downlinks)
        if self.compression is not None and self.compression.download is not None:
            encoded: dict[int, ArrayRecord] = {}
            for msg, record in zip(messages, downlinks, strict=True):
                if id(record) not in encoded:
                    encoded[id(record)] = self.compression.encode_broadcast(record)
                msg.content[self.arrayrecord_key] = encoded[id(record)]  # type: ignore[attr-defined]
            downlinks = [msg.content.array_records[self.arrayrecord_key] for msg in messages]  # type: ignore[attr-defined]
        bytes_down = sum(record_bytes(r) for r in downlinks)
        if self.control is not None:  # c travels beside the global delta (one shared record), with each
            control = self.control.record()  # node's accepted round (its own content)
            for msg in messages:
                msg.content = RecordDict({**dict(msg.content.items()), SERVER_CONTROL_KEY: control,
                                          ACCEPTED_KEY: self.control.node_config(msg.metadata.dst_node_id)})
            bytes_down += record_bytes(control) * len(messages)
            bytes_down_raw += record_bytes(control) * len(messages)
        self.traffic[server_round] = RoundTraffic(bytes_down=bytes_down, bytes_down_raw=bytes_down_raw,
                                                  sent=len(messages))
        return messages

    @property
    def flat_upload(self) -> bool:
        """Whether plain replies are asked for as one fp32 buffer (`FLAT_UPLOAD_KEY`), decoded
        with one header check and read in place: whenever no upload codec compresses them and
        every tensor is float32. Replies as one Array per tensor are still accepted."""
        if self._travels_flat is None:
            self._travels_flat = travels_flat(self.spec)
        return (self.compression is None or self.compression.upload is None) and self._travels_flat

    def upload_spec(self, node_id: int | None = None) -> DeltaSpec:
        """What a reply's arrays look like on the wire (the spec a sealed envelope is opened
        against): `node_id`'s reply (its own LoRA rank, where ranks differ), else the global spec's."""
        spec = self.spec if node_id is None else self._expected_spec(node_id)
        if self.compression is not None and self.compression.upload is not None:
            return self.compression.wire_spec(spec)
        return payload_spec(FP32, spec) if self.flat_upload else spec

    def _expected_spec(self, node_id: int) -> DeltaSpec:
        """The spec `node_id`'s reply must match (per node where the strategy says so)."""
        per_node = getattr(super(), "reply_spec", None)
        return per_node(node_id, self.spec) if per_node is not None else self.spec

    def _check_reply(self, msg: Message, check_values: bool = True) -> tuple[str | None, dict[str, torch.Tensor] | None]:
        """(problem, None) for a reply to leave out, or (None, its decoded delta).

        Checks everything Flower's own consistency check would raise on (which would
        abort the whole round), so one malformed reply only costs that client's update.
        Without `check_values` only names, shapes and dtypes are checked here, and the
        delta's tensors may be read-only views of the reply's buffers: the caller checks
        the values (`_fold_problem`) and never writes to them.
        """
        content = msg.content
        kinds = _record_kinds(content)  # (one pass: each of Flower's typed views copies the whole content)
        if kinds[ArrayRecord] != [REPLY_ARRAYS_KEY] or kinds[MetricRecord] != [REPLY_METRICS_KEY]:
            return (f"expected records {REPLY_ARRAYS_KEY!r} and {REPLY_METRICS_KEY!r}, got arrays "
                    f"{sorted(kinds[ArrayRecord])} and metrics {sorted(kinds[MetricRecord])}"), None
        if kinds[ConfigRecord]:
            return f"unexpected config records {sorted(kinds[ConfigRecord])}", None
        problem = metric_problem(_reply_metrics(msg), self.robust)
        if problem:
            return problem, None
        node = msg.metadata.src_node_id
        try:
            record = content[REPLY_ARRAYS_KEY]
            assert isinstance(record, ArrayRecord)
            if self.compression is not None and self.compression.upload is not None:
                if node not in self._sent:
                    return "reply from a node this round sent no global delta to", None
                delta = self.compression.decode_reply(record, self._sent[node], self._expected_spec(node),
                                                      self.max_delta_bytes)
            elif list(record.keys()) == [ENCODED_ARRAY] and self.flat_upload:
                delta = decode_flat_reply(record, self._expected_spec(node), self.max_delta_bytes)
            else:
                delta = delta_from_arrayrecord(record, self.max_delta_bytes, copy=check_values)
            if not isinstance(delta, FlatDelta) or check_values:  # (a flat one's layout is checked by its decoding)
                self._expected_spec(node).validate(delta, source="client delta", check_values=check_values)
        except DeltaError as exc:  # (CodecError is one)
            return str(exc), None
        problem = value_problem(delta, self.robust) if check_values else None
        return (problem, None) if problem else (None, delta)

    def _bound_updates(self, candidates: list[tuple[Message, dict[str, torch.Tensor]]],
                       known_norms: list[float | None] | None = None) -> dict[int, str]:
        """{candidate index: reason} of replies outside the round-level bounds: the absolute
        and relative update-norm bounds and the relative example-count bound (`known_norms`:
        the candidates' update norms where the caller has them)."""
        robust = self.robust
        weights = {i: float(_reply_metrics(msg)[WEIGHT_KEY])  # type: ignore[arg-type]
                   for i, (msg, _) in enumerate(candidates)}
        refused = relative_outliers(weights, robust.examples_ratio, WEIGHT_KEY, "robust.examples_ratio")
        if robust.needs_updates:
            # Flower only delivers replies to messages this round sent, so each has its downlink.
            norms = {i: (known_norms[i] if known_norms is not None and known_norms[i] is not None
                         else update_norm(delta, self._sent[msg.metadata.src_node_id]))
                     for i, (msg, delta) in enumerate(candidates) if msg.metadata.src_node_id in self._sent}
            if robust.norm_bound > 0:
                refused.update({i: f"update norm {n:.4g} exceeds robust.norm_bound {robust.norm_bound:g}"
                                for i, n in norms.items() if n > robust.norm_bound and i not in refused})
            for i, reason in relative_outliers(norms, robust.norm_bound_ratio, "update norm",
                                               "robust.norm_bound_ratio").items():
                refused.setdefault(i, reason)
        return refused

    def _clip(self, msg: Message, delta: dict[str, torch.Tensor],
              norm: float | None = None) -> dict[str, torch.Tensor] | None:
        """A reply's update (its already-validated `delta`, whose update norm is `norm` where
        known) scaled down to `clip_update_norm`, in float64; None when it is within the bound."""
        sent = self._sent.get(msg.metadata.src_node_id)
        if self.clip_update_norm <= 0 or sent is None:
            return None
        norm = update_norm(delta, sent) if norm is None else norm
        if norm <= self.clip_update_norm:
            return None
        factor = self.clip_update_norm / norm
        log.warning("node %d: update norm %.3g clipped to %.3g", msg.metadata.src_node_id, norm, self.clip_update_norm)
        return {k: sent[k].double() + (delta[k].double() - sent[k].double()) * factor for k in delta}

    folds_replies = False
    """Whether this strategy's aggregate is the example-weighted mean (FedAvg's family, with
    or without a server optimizer on top): then each reply is folded into an exact running
    sum as it is accepted (`fedpeft.server.weighted_sum`) and dropped, instead of being
    handed to Flower's aggregation with all the others."""

    #: The FedOpt family's `eta` per round (`fedpeft.server.rate_schedule`); None keeps Flower's constant eta.
    eta_schedule: Callable[[int], float] | None = None

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        traffic = self.traffic.setdefault(server_round, RoundTraffic())
        if self.eta_schedule is not None:
            self.eta = self.eta_schedule(server_round)
            traffic.server_rate = self.eta
        if self.folds_replies and all(t.dtype.is_floating_point for t in self.spec.tensors.values()):
            return self._aggregate_by_folding(server_round, replies, traffic)
        return self._aggregate_with_flower(server_round, replies, traffic)

    def _admit(self, msg: Message, traffic: RoundTraffic, server_round: int,
               fold: ExactWeightedSum | None = None, sent: np.ndarray | None = None) -> dict[str, torch.Tensor] | None:
        """A reply's decoded, validated delta, or None (a failed reply counted, a bad one
        rejected with its reason). With `fold`, the values are checked (finite, within
        `robust.max_abs_value`, within the fold's exact range) in one pass over a flat
        buffer that `fold` keeps staged for the reply's `add`; with `sent` too (the round's
        delta to this node, `ExactWeightedSum.flatten_sent`) that pass measures its update norm."""
        traffic.bytes_up += _reply_bytes(msg)
        traffic.bytes_up_raw += (plain_nbytes(self._expected_spec(msg.metadata.src_node_id))
                                 if self.compression is not None and self.compression.upload is not None
                                 else _reply_bytes(msg))
        problem = self.unseal(msg, server_round) if self.unseal is not None else None
        problem, delta = (problem, None) if problem else self._check_reply(msg, check_values=fold is None)
        if delta is not None and fold is not None:
            problem = self._fold_problem(fold, msg, delta, sent)
        if problem or delta is None:
            self._reject(traffic, server_round, msg, str(problem))
            return None
        return delta

    def _fold_problem(self, fold: ExactWeightedSum, msg: Message, delta: dict[str, torch.Tensor],
                      sent: np.ndarray | None = None) -> str | None:
        """Why `delta` cannot be folded (named per tensor where a tensor is at fault); stages it."""
        weight = int(_reply_metrics(msg)[WEIGHT_KEY])  # type: ignore[arg-type]
        fold.bound_peak = self.robust.max_abs_value * weight if self.robust.max_abs_value > 0 else None
        problem = fold.problem(delta, weight, sent)
        if problem == "non-finite values":
            return "; ".join(self._expected_spec(msg.metadata.src_node_id).problems(delta)) or problem
        if problem is None and self.robust.max_abs_value > 0 and fold.staged_peak > self.robust.max_abs_value * weight:
            return value_problem(delta, self.robust)
        return problem

    def _aggregate_by_folding(self, server_round: int, replies: Iterable[Message],
                              traffic: RoundTraffic) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Decode and check each reply once, fold it into an exact, order-independent
        weighted sum, drop it: coordinator memory O(P) whatever the number of replies.

        Relative bounds (`robust.examples_ratio`, `robust.norm_bound_ratio`) compare each
        reply with the round's median, so while they are on the accepted replies are held
        (as zero-copy views of the messages Flower already holds) until all have arrived.
        """
        # Flower delivers replies only to the messages this round sent; without a configured
        # round (a direct call) the sum is sized for DEFAULT_CAPACITY replies.
        capacity = traffic.sent or DEFAULT_CAPACITY
        fold = ExactWeightedSum(self.spec, capacity=capacity)
        changes = self.control.begin_round(capacity=capacity) if self.control is not None else None
        metric_records: list[MetricRecord] = []
        relative = self.robust.examples_ratio > 0 or self.robust.norm_bound_ratio > 0
        held: list[tuple[Message, dict[str, torch.Tensor], Checked | None]] = []
        held_norms: list[float | None] = []
        flat_sent: dict[int, np.ndarray] = {}  # id(sent delta) -> it flat (replies usually share one)
        measure_norms = self.robust.needs_updates or self.clip_update_norm > 0
        for msg in replies:
            if msg.has_error():
                traffic.failed += 1
                log.warning("round %d: node %d replied with an error: %s", server_round, msg.metadata.src_node_id,
                            msg.error.reason)
                continue
            sent = self._sent.get(msg.metadata.src_node_id) if measure_norms else None
            if sent is not None and id(sent) not in flat_sent:
                flat_sent[id(sent)] = fold.flatten_sent(sent)
            sent_flat = flat_sent[id(sent)] if sent is not None else None
            delta = self._admit(msg, traffic, server_round, fold, sent_flat)
            if delta is None:
                continue
            norm = fold.staged_update_norm(sent_flat) if sent_flat is not None else None
            if relative:
                if len(held) >= fold.capacity:
                    self._reject(traffic, server_round, msg, f"more replies than the {fold.capacity} this round's "
                                                              "sum was sized for")
                    continue
                held.append((msg, delta, fold.checked()))  # (a flat upload is not read again to fold)
                held_norms.append(norm)
                continue
            if self.robust.norm_bound > 0 and norm is not None and norm > self.robust.norm_bound:
                self._reject(traffic, server_round, msg, f"update norm {norm:.4g} exceeds robust.norm_bound "
                                                          f"{self.robust.norm_bound:g}")
                continue
            self._fold(msg, delta, fold, changes, metric_records, traffic, server_round, norm)
        refused = self._bound_updates([(msg, delta) for msg, delta, _ in held], held_norms)
        for i, (msg, delta, checked) in enumerate(held):
            if i in refused:
                self._reject(traffic, server_round, msg, refused[i])
                continue
            if checked is not None:
                fold.restage(checked)
            self._fold(msg, delta, fold, changes, metric_records, traffic, server_round, held_norms[i])
        held.clear()
        if not self._enough_accepted(server_round, traffic) or fold.count == 0:
            return None, None
        optimizer = isinstance(self, FedAvgM | FedOpt)
        aggregate: ArrayRecord | Mapping[str, torch.Tensor] = (
            fold.mean() if optimizer or not travels_flat(self.spec)
            else FlatDelta(fold.mean_flat().astype(np.float32), self.spec))  # (the published dtype, cast at once)
        # The metrics' float sums in an order that does not depend on arrival either.
        metric_records.sort(key=lambda record: sorted(record.items()))  # type: ignore[arg-type]
        aggregate_metrics = self.train_metrics_aggr_fn  # type: ignore[attr-defined]
        metrics = (weighted_metric_mean(metric_records, self.weighted_by_key)
                   if aggregate_metrics is aggregate_metricrecords  # (Flower's default: its arithmetic, faster)
                   else aggregate_metrics([RecordDict({REPLY_METRICS_KEY: m}) for m in metric_records],
                                          self.weighted_by_key))
        state = {attr: getattr(self, attr) for attr in SERVER_OPTIMIZER_STATE if hasattr(self, attr)}
        if optimizer:
            # The server optimizer's step on the mean: Flower's own code, given the mean as
            # the one reply it averages (a weight-1 average of one record is that record).
            mean_reply = Message(RecordDict({REPLY_ARRAYS_KEY: delta_to_arrayrecord(aggregate),  # type: ignore[arg-type]
                                             REPLY_METRICS_KEY: MetricRecord({self.weighted_by_key: 1})}),
                                 dst_node_id=0, message_type=MessageType.TRAIN)
            aggregate, _ = super().aggregate_train(server_round, [mean_reply])  # type: ignore[misc]
        return self._publish(server_round, traffic, aggregate, metrics, state,
                             commit=lambda: self.control.commit(server_round, changes)  # type: ignore[union-attr]
                             if self.control is not None and changes is not None else None)

    def _fold(self, msg: Message, delta: dict[str, torch.Tensor], fold: ExactWeightedSum,
              changes: ControlChanges | None, metric_records: list[MetricRecord], traffic: RoundTraffic,
              server_round: int, norm: float | None = None) -> None:
        """Fold one checked reply (clipped first where configured); nothing is folded unless all of it fits."""
        weight = int(_reply_metrics(msg)[WEIGHT_KEY])  # type: ignore[arg-type]
        node = msg.metadata.src_node_id
        clipped = self._clip(msg, delta, norm)
        if clipped is not None:
            problem = fold.problem(clipped, weight)
            if problem:
                self._reject(traffic, server_round, msg, f"clipped update: {problem}")
                return
        change = None
        if clipped is None and changes is not None and node in self._sent:
            # (a clipped reply's change is not folded: its client's own c_i+ would not match it)
            assert self.control is not None
            change = self.control.change(self._sent[node], delta, weight)
            problem = changes.problem(change)
            if problem:
                self._reject(traffic, server_round, msg, f"SCAFFOLD control change: {problem}")
                return
        try:
            fold.add(clipped if clipped is not None else delta, weight)  # (re-checks before it changes anything)
        except ValueError as exc:
            self._reject(traffic, server_round, msg, str(exc))
            return
        if change is not None:
            assert changes is not None
            changes.add(node, change)
        traffic.clipped += clipped is not None
        traffic.accepted += 1
        record = _reply_metrics(msg)
        metric_records.append(record)
        traffic.client_metrics.append({k: float(v) for k, v in record.items()})  # type: ignore[arg-type]

    def _enough_accepted(self, server_round: int, traffic: RoundTraffic) -> bool:
        """Raise when too few updates were accepted; False when DP's all-or-nothing releases nothing."""
        if traffic.accepted < self.min_accepted:
            raise FederationError(
                f"round {server_round}: only {traffic.accepted} client update(s) accepted, need {self.min_accepted} "
                f"({traffic.failed} failed, {len(traffic.rejected)} rejected"
                + (f": {traffic.rejected[0]}" if traffic.rejected else "") + ")")
        if self.all_or_nothing and (traffic.failed or traffic.rejected):
            log.error("round %d: %d failed and %d rejected of %d sampled; under DP the round releases nothing "
                      "(the noise is calibrated to every sampled client's clipped update)", server_round,
                      traffic.failed, len(traffic.rejected), traffic.sent)
            traffic.seconds = time.perf_counter() - traffic.started
            return False
        return True

    def _publish(self, server_round: int, traffic: RoundTraffic,
                 aggregate: ArrayRecord | Mapping[str, torch.Tensor] | None, metrics: MetricRecord | None,
                 state: dict[str, object], commit: Callable[[], None]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The aggregate (as Flower's record, or decoded) in the spec's dtypes, unless it is
        refused (then the server optimizer's `state` is restored and the global adapter
        kept); `commit` runs only for an aggregate that is kept."""
        traffic.seconds = time.perf_counter() - traffic.started
        arrays = None
        if aggregate is not None:
            arrays, problem = self._global_arrays(aggregate)
            if problem:
                log.error("round %d: the aggregate is refused and the global adapter kept: %s", server_round, problem)
                traffic.rejected.append(f"aggregate: {problem}")
                for attr, value in state.items():
                    setattr(self, attr, value)
                return None, None
            if isinstance(state.get("current_arrays"), ArrayRecord):  # FedAvgM's own copy: the published dtypes
                self.current_arrays = arrays
            commit()
        if metrics is not None:
            traffic.train_metrics = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
        return arrays, metrics

    def _aggregate_with_flower(self, server_round: int, replies: Iterable[Message],
                               traffic: RoundTraffic) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Check every reply, then let the Flower strategy aggregate them all at once (the
        robust aggregators, ΔW-space and heterogeneous-rank LoRA, DP's wrapper)."""
        usable: list[Message] = []
        own: list[tuple[Message, Mapping[str, torch.Tensor]]] = []  # for a strategy that takes decoded deltas
        aggregate_deltas = getattr(super(), "aggregate_deltas", None)
        candidates: list[tuple[Message, dict[str, torch.Tensor]]] = []
        for msg in replies:
            if msg.has_error():
                traffic.failed += 1
                if aggregate_deltas is not None:  # (these never reach Flower's aggregation, which logs them)
                    log.warning("round %d: node %d replied with an error: %s", server_round,
                                msg.metadata.src_node_id, msg.error.reason)
                usable.append(msg)  # Flower logs error replies and skips them
                continue
            delta = self._admit(msg, traffic, server_round)
            if delta is not None:
                candidates.append((msg, delta))
        refused = self._bound_updates(candidates)
        for i, (msg, delta) in enumerate(candidates):
            if i in refused:
                self._reject(traffic, server_round, msg, refused[i])
                continue
            traffic.accepted += 1
            clipped = self._clip(msg, delta)
            if clipped is not None:
                traffic.clipped += 1
                delta = clipped
            metrics_record = msg.content.metric_records[REPLY_METRICS_KEY]
            traffic.client_metrics.append({k: float(v) for k, v in metrics_record.items()})  # type: ignore[arg-type]
            if aggregate_deltas is not None:  # decoded once, handed over as it is
                own.append((msg, delta))
                continue
            # Sums of many weighted updates are accumulated in float64 (cast back after aggregation).
            msg.content[REPLY_ARRAYS_KEY] = delta_to_arrayrecord(
                {k: v.double() if v.is_floating_point() else v for k, v in delta.items()})
            usable.append(msg)
        if not self._enough_accepted(server_round, traffic):
            return None, None
        if aggregate_deltas is not None:
            # A content order (as below for Flower's path), from the decoded deltas: no re-encoding.
            own.sort(key=lambda pair: _delta_order(*pair))
            state = {attr: getattr(self, attr) for attr in SERVER_OPTIMIZER_STATE if hasattr(self, attr)}
            arrays, metrics = aggregate_deltas(server_round, [d for _, d in own], [m for m, _ in own])
            return self._publish(server_round, traffic, arrays, metrics, state, commit=lambda: None)
        # Replies arrive in any order; sorting them by content makes the float sums (and
        # so a resumed run) bit-for-bit reproducible.
        usable.sort(key=_reply_order)
        # Flower's server optimizers (FedAvgM, FedAdam, ...) update their state inside
        # aggregate_train (Flower reassigns these, never mutates them): kept to restore it
        # if the aggregate is refused, so a refused round leaves no trace.
        state = {attr: getattr(self, attr) for attr in SERVER_OPTIMIZER_STATE if hasattr(self, attr)}
        arrays, metrics = super().aggregate_train(server_round, usable)  # type: ignore[misc]
        return self._publish(server_round, traffic, arrays, metrics, state, commit=lambda: None)

    def _global_arrays(self, aggregate: ArrayRecord | Mapping[str, torch.Tensor]) -> tuple[ArrayRecord | None, str | None]:
        """The aggregate in the spec's dtypes, or the problem that keeps it from replacing
        the global adapter (non-finite or out-of-bounds values: never published)."""
        if isinstance(aggregate, ArrayRecord):
            try:
                aggregate = delta_from_arrayrecord(aggregate)
            except DeltaError as exc:
                return None, str(exc)
        elif isinstance(aggregate, FlatDelta) and aggregate.spec is self.spec and aggregate.flat.dtype == np.float32:
            # One float32 vector in the spec's own layout (names, shapes and dtypes hold by
            # construction): its values checked in one pass.
            if peak_bits(aggregate.flat.view(np.int32)) >= NON_FINITE_BITS:
                return None, "non-finite values"
            return delta_to_arrayrecord(aggregate), None
        dtypes = {name: spec.dtype for name, spec in self.spec.tensors.items()}
        out = {k: v.to(dtypes.get(k, v.dtype)) for k, v in aggregate.items()}
        if not all(bool(torch.isfinite(t).all()) for t in out.values() if t.is_floating_point()):
            return None, "non-finite values"
        try:
            self.spec.validate(out, source="aggregate")
        except DeltaError as exc:
            return None, str(exc)
        return delta_to_arrayrecord(out), None

    def _reject(self, traffic: RoundTraffic, server_round: int, msg: Message, problem: str) -> None:
        traffic.rejected.append(f"node {msg.metadata.src_node_id}: {problem}")
        log.error("round %d: rejected update from node %d: %s", server_round, msg.metadata.src_node_id, problem)


def relax_minimums(strategy: object, train_attr: str, available_attr: str, min_accepted: int) -> None:
    """After the first round, go on with the clients still connected, down to `min_accepted`.

    `clients` nodes must connect before round 1; a client that dies later would otherwise
    make every following round wait for it forever (Flower's sampling waits for
    `min_available_nodes`). Lowering the minimums to `min_accepted` lets the run go on
    with the survivors, and `min_accepted` still stops it when too few are left.
    """
    floor = max(min_accepted, 1)
    for attr in (train_attr, available_attr):
        setattr(strategy, attr, min(getattr(strategy, attr), floor))


def _reply_bytes(msg: Message) -> int:
    """Payload bytes of a reply's tensors, plaintext or sealed."""
    records = dict(msg.content.items())
    sealed = records.get("envelope")
    envelope = sealed.get("envelope") if isinstance(sealed, ConfigRecord) else None
    return sum(record_bytes(r) for r in records.values() if isinstance(r, ArrayRecord)) + (
        len(envelope) if isinstance(envelope, bytes) else 0)


def _record_kinds(content: RecordDict) -> dict[type, list[str]]:
    """The names of a message's ArrayRecords, MetricRecords and ConfigRecords, in one pass."""
    kinds: dict[type, list[str]] = {ArrayRecord: [], MetricRecord: [], ConfigRecord: []}
    for name, record in content.items():
        kind = next((k for k in kinds if isinstance(record, k)), None)
        if kind is not None:
            kinds[kind].append(name)
    return kinds


def _reply_metrics(msg: Message) -> MetricRecord:
    """A checked reply's metrics record, read without Flower's typed view (which copies the content)."""
    record = msg.content[REPLY_METRICS_KEY]
    assert isinstance(record, MetricRecord)
    return record


def _reply_order(msg: Message) -> tuple[int, str]:
    if msg.has_error():
        return (0, "")
    digest = hashlib.sha256()
    for record in msg.content.array_records.values():
        for name, array in record.items():
            digest.update(name.encode())
            digest.update(array.data)
    return (1, digest.hexdigest())


def _delta_order(msg: Message, delta: Mapping[str, torch.Tensor]) -> str:
    """A content key of an accepted reply (each tensor's name, dtype, shape and bytes, in the
    delta's order, then its metrics), so that aggregating in this order depends neither on
    the order replies arrived in nor on their wire form (a flat upload or one Array per
    tensor give the same key)."""
    digest = hashlib.sha256()
    flat, spec = getattr(delta, "flat", None), getattr(delta, "spec", None)
    if isinstance(flat, np.ndarray) and isinstance(spec, DeltaSpec):
        parts = ((name, flat[start:stop], shape) for name, (start, stop, shape) in spec.flat_layout.items())
    else:
        parts = ((name, t.detach().contiguous().numpy() if t.dtype != torch.bfloat16 else
                  t.detach().contiguous().view(torch.int16).numpy(), tuple(t.shape)) for name, t in delta.items())
    for name, values, shape in parts:
        digest.update(f"{name}|{values.dtype}|{tuple(shape)}|".encode())
        digest.update(memoryview(np.ascontiguousarray(values)).cast("B"))
    digest.update(repr(sorted(_reply_metrics(msg).items())).encode())
    return digest.hexdigest()


SERVER_OPTIMIZER_STATE = ("current_arrays", "momentum_vector", "m_t", "v_t")
"""The attributes Flower's stateful strategies (FedAvgM, FedOpt family) carry between rounds."""
# Strategies whose server-side state (momentum, moment estimates) `fedpeft.server.optimizer_state` checkpoints.
STATEFUL_STRATEGIES = frozenset({"fedadam", "fedyogi", "fedadagrad", "fedavgm"})
ADAPTIVE_SERVER_STRATEGIES: tuple[str, ...] = ("fedadam", "fedyogi", "fedadagrad")
"""Flower's FedOpt family (Reddi et al. 2021): adaptive server optimizers, what
`federation.recipe = "server-adam"` can run (checked against FedOpt in the tests)."""


class LoraSvdFedAvg(FedAvg):
    """FedAvg that aggregates LoRA modules in ΔW space (see `lora_aggregation`).

    Flower has no LoRA-aware strategy; this one keeps Flower's sampling, consistency
    checks and metric averaging and replaces only the array aggregation.
    """

    def __init__(self, *, lora_scaling: float, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.lora_scaling = lora_scaling
        self.refactor_errors: dict[int, float] = {}

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
        contents = [msg.content for msg in replies]
        weights = [float(next(iter(c.metric_records.values()))[self.weighted_by_key]) for c in contents]  # type: ignore[arg-type]
        merged, report = aggregate_lora_svd(deltas, weights, self.lora_scaling)
        self.refactor_errors[server_round] = report.max_relative_error
        log.info("round %d: ΔW-space LoRA aggregation of %d modules, rank-r refactoring error <= %.2e",
                 server_round, report.modules, report.max_relative_error)
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        return delta_to_arrayrecord(merged), metrics


# Flower's strategies by the name users give them; one validated subclass each.
FLOWER_STRATEGIES: dict[str, type[FedAvg]] = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedadagrad": FedAdagrad,
    "fedavgm": FedAvgM,
    "fedmedian": FedMedian,
    "fedtrimmedavg": FedTrimmedAvg,
    "krum": Krum,
    "multikrum": MultiKrum,
}
MEAN_STRATEGIES = frozenset({"fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedavgm"})
"""Strategies whose aggregate is the example-weighted mean of the replies (plus a server step)."""
STRATEGIES: dict[str, type[FedAvg]] = {
    name: type(f"Validated{cls.__name__}", (DeltaValidation, cls),
               {"__doc__": f"{cls.__name__} with validated replies.", "folds_replies": name in MEAN_STRATEGIES})
    for name, cls in FLOWER_STRATEGIES.items()
}
# Options that sampling and record keys own; users tune only the algorithm's own knobs.
_RESERVED = {"self", "fraction_train", "fraction_evaluate", "min_train_nodes", "min_evaluate_nodes",
             "min_available_nodes", "weighted_by_key", "arrayrecord_key", "configrecord_key",
             "train_metrics_aggr_fn", "evaluate_metrics_aggr_fn"}


def strategy_options(name: str) -> list[str]:
    """The tunable options of strategy `name` (e.g. eta, beta_1 for fedadam)."""
    cls = FLOWER_STRATEGIES[name]
    return sorted(p for p in inspect.signature(cls.__init__).parameters if p not in _RESERVED)


def parse_strategy_options(name: str, options: dict[str, str]) -> dict[str, float | int]:
    """Validate `--strategy-opt` values for `name` (all are numbers; integers where Flower's default is one)."""
    if name not in STRATEGIES:
        raise ConfigError(f"unknown strategy {name!r}; supported strategies: {', '.join(sorted(STRATEGIES))}")
    allowed = strategy_options(name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(f"strategy {name!r}: unknown option(s) {unknown}; valid options are {allowed}")
    defaults = inspect.signature(FLOWER_STRATEGIES[name].__init__).parameters
    parsed: dict[str, float | int] = {}
    for key, value in options.items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"strategy {name!r}: option {key}={value!r} is not a number") from None
        if not math.isfinite(number):
            raise ConfigError(f"strategy {name!r}: option {key} must be finite")
        default = defaults[key].default
        if isinstance(default, int) and not isinstance(default, bool):
            if not number.is_integer() or not 0 <= number < 2**31:
                raise ConfigError(f"strategy {name!r}: option {key} must be a non-negative integer (got {value!r})")
            number = int(number)
        parsed[key] = number
    return parsed


LORA_AGGREGATIONS = ("naive", "svd", "ffa", *HETERO_MODES)
ROBUST_AGGREGATORS = frozenset({"fedmedian", "fedtrimmedavg", "krum", "multikrum"})
"""Strategies that pick or trim client updates instead of averaging them all."""
ValidatedLoraSvdFedAvg = type("ValidatedLoraSvdFedAvg", (DeltaValidation, LoraSvdFedAvg), {})
ValidatedHeteroRankLoraFedAvg = type("ValidatedHeteroRankLoraFedAvg", (DeltaValidation, HeteroRankLoraFedAvg), {})


def build_strategy(name: str, *, spec: DeltaSpec, max_delta_bytes: int, options: dict[str, str] | None = None,
                   lora_svd_scaling: float | None = None, hetero: HeteroRanks | None = None,
                   scaffold: TrainConfig | None = None, compression: Compression | None = None,
                   **sampling: object) -> DeltaValidation:
    """A validated Flower strategy by name, with algorithm options and sampling settings.

    With `lora_svd_scaling` (alpha / r) LoRA modules are aggregated in ΔW space, and with
    `hetero` clients train per-client ranks; both replace FedAvg's array averaging, so
    they combine with `fedavg` only. `scaffold` (the clients' training settings) adds
    SCAFFOLD's control variates (`fedpeft.server.scaffold`) to an averaging strategy.
    """
    parsed = parse_strategy_options(name, dict(options or {}))
    if (lora_svd_scaling is not None or hetero is not None) and name != "fedavg":
        raise ConfigError(f"{'heterogeneous-rank' if hetero else 'ΔW-space (svd)'} LoRA aggregation replaces "
                          f"FedAvg's averaging; use it with strategy 'fedavg', not {name!r}")
    if scaffold is not None and not all(t.dtype.is_floating_point for t in spec.tensors.values()):
        raise ConfigError("SCAFFOLD needs a delta of floating-point tensors only")
    if scaffold is not None and (lora_svd_scaling is not None or hetero is not None or name in ROBUST_AGGREGATORS):
        raise ConfigError(f"SCAFFOLD needs an averaging strategy over full-shape deltas, not {name!r} with "
                          f"{'heterogeneous ranks' if hetero else 'svd aggregation' if lora_svd_scaling else 'it'}")
    try:
        if hetero is not None:
            return ValidatedHeteroRankLoraFedAvg(  # type: ignore[return-value]
                spec=spec, max_delta_bytes=max_delta_bytes, mode=hetero.mode, ranks=hetero.ranks,
                scaling=hetero.scaling, compression=compression, **sampling)
        if lora_svd_scaling is not None:
            return ValidatedLoraSvdFedAvg(spec=spec, max_delta_bytes=max_delta_bytes,  # type: ignore[return-value]
                                          lora_scaling=lora_svd_scaling, compression=compression, **sampling)
        return STRATEGIES[name](spec=spec, max_delta_bytes=max_delta_bytes, scaffold=scaffold,  # type: ignore[return-value]
                                compression=compression, **sampling, **parsed)  # type: ignore[return-value]
    except ValueError as exc:  # Flower validates some options itself (e.g. FedTrimmedAvg beta)
        raise ConfigError(f"strategy {name!r}: {exc}") from exc
