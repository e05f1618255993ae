"""Differential privacy for a run: Flower's DP strategy wrapper plus its RDP accountant.

Central DP with client-side fixed clipping: each client's `fixedclipping_mod` (in
`fedpeft.client.flower_app.dp_app`, or the simulation's ClientApp) clips its update to
`clipping_norm`, and Flower's `DifferentialPrivacyClientSideFixedClipping` adds Gaussian
noise of std `noise_multiplier * clipping_norm / clients_per_round` to the unweighted
mean. Flower's `RdpAccountant` (Google's dp-accounting underneath) composes one Gaussian
event per round, without claiming subsampling amplification (clients are not
Poisson-sampled); the (ε, δ) spent is written into every round's metrics row.

Flower's accounted wrapper insists that the strategy inside it aggregates with exactly
`FedAvg.aggregate_train`, so fedpeft's reply validation sits *outside* the wrapper
(`ValidatedDpFedAvg`): replies are decoded and checked first, and the wrapper with a
plain FedAvg inside does the clipping bookkeeping, averaging, noise and accounting.
Under DP a round releases an aggregate only when every sampled client's update was
accepted (the noise is calibrated to that sample); otherwise it releases nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp import NeighboringRelation, PrivacyConfig, RdpAccountant, SamplingMethod
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, FedAvg

from fedpeft.common.errors import ConfigError
from fedpeft.common.protocol.deltas import DeltaSpec
from fedpeft.common.protocol.plan import UNIT_WEIGHT_KEY
from fedpeft.server.compression import Compression
from fedpeft.server.robust import RobustSettings
from fedpeft.server.strategy import DeltaValidation

if TYPE_CHECKING:
    from fedpeft.server.federation.spec import DpSection

log = logging.getLogger("fedpeft.server")


class GuardedDpClientSideFixedClipping(DifferentialPrivacyClientSideFixedClipping):
    """Flower's wrapper, with its per-round checks turned from run-killing `ValueError`s
    into a round that releases nothing (e.g. a client reporting a different weight)."""

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        try:
            return super().aggregate_train(server_round, replies)
        except ValueError as exc:
            log.error("round %d: DP aggregation refused the round, nothing released: %s", server_round, exc)
            return None, None

    # DeltaValidation reads these FedAvg settings; they live on the wrapped strategy.
    @property
    def weighted_by_key(self) -> str:
        return str(self.strategy.weighted_by_key)  # type: ignore[attr-defined]

    @property
    def arrayrecord_key(self) -> str:
        return str(self.strategy.arrayrecord_key)  # type: ignore[attr-defined]


class ValidatedDpFedAvg(DeltaValidation, GuardedDpClientSideFixedClipping):
    """Validated replies -> Flower's accounted DP wrapper -> plain FedAvg."""


def build_dp_strategy(*, spec: DeltaSpec, max_delta_bytes: int, min_accepted: int, clip_update_norm: float,
                      dp: DpSection, clients_per_round: int, population: int,
                      robust: RobustSettings | None = None,
                      compression: Compression | None = None) -> ValidatedDpFedAvg:
    """The DP strategy for a run: exactly `clients_per_round` sampled, unweighted mean."""
    try:
        accountant = RdpAccountant(PrivacyConfig(
            target_delta=dp.target_delta, population_size=dp.population or population,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION))
    except (ImportError, ValueError) as exc:
        raise ConfigError(f"dp: cannot set up Flower's RDP accountant: {exc}") from exc
    # A tiny fraction makes Flower sample exactly min_train_nodes: the accountant's sample size.
    inner = FedAvg(fraction_train=1e-9, fraction_evaluate=0.0, min_train_nodes=clients_per_round,
                   min_available_nodes=population, weighted_by_key=UNIT_WEIGHT_KEY)
    # The server clips too: a client that skips its fixedclipping_mod cannot exceed the bound
    # the noise is calibrated to, and neither can a decoded update that a lossy codec's rounding
    # and error feedback carried past it (the client clips before encoding).
    bound = min(clip_update_norm, dp.clipping_norm) if clip_update_norm > 0 else dp.clipping_norm
    strategy = ValidatedDpFedAvg(spec=spec, max_delta_bytes=max_delta_bytes, min_accepted=min_accepted,
                                 clip_update_norm=bound, robust=robust, strategy=inner, compression=compression,
                                 noise_multiplier=dp.noise_multiplier, clipping_norm=dp.clipping_norm,
                                 num_sampled_clients=clients_per_round, accountant=accountant)
    strategy.all_or_nothing = True
    return strategy


def privacy_spent(strategy: Any) -> tuple[float, float] | None:
    """(ε, δ) spent so far by a DP strategy; None for any other strategy."""
    spent = strategy.privacy_spent() if isinstance(strategy, DifferentialPrivacyClientSideFixedClipping) else None
    return (spent.epsilon, spent.delta) if spent is not None else None
