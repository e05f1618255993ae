"""Differential privacy for a run: Flower's DP strategy wrapper plus its RDP accountant.

Central DP with client-side fixed clipping: each client's `fixedclipping_mod` (in
`fedpeft.client.flower_app.dp_app`) clips its update to `clipping_norm`, and Flower's
`DifferentialPrivacyClientSideFixedClipping` adds Gaussian noise of std
`noise_multiplier * clipping_norm / clients_per_round` to the average. Flower's
`RdpAccountant` (Google's dp-accounting underneath) composes one Gaussian event per
round, without claiming subsampling amplification (clients are not Poisson-sampled);
the (ε, δ) spent is written into every round's metrics row. Nothing here is
home-made: this module only wires Flower's pieces to fedpeft's settings.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from flwr.serverapp import PrivacyConfig, RdpAccountant
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping

from fedpeft.common.errors import ConfigError

if TYPE_CHECKING:
    from fedpeft.server.run_config import DpSection


def wrap_with_dp(strategy: Any, dp: DpSection, clients_per_round: int, population: int) -> Any:
    """`strategy` behind Flower's client-side-clipping DP wrapper, with an RDP accountant."""
    from flwr.serverapp import NeighboringRelation, SamplingMethod

    try:
        accountant = RdpAccountant(PrivacyConfig(
            target_delta=dp.target_delta, population_size=dp.population or population,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION))
    except (ImportError, ValueError) as exc:
        raise ConfigError(f"dp: cannot set up Flower's RDP accountant: {exc}") from exc
    return DifferentialPrivacyClientSideFixedClipping(strategy, noise_multiplier=dp.noise_multiplier,
                                                      clipping_norm=dp.clipping_norm,
                                                      num_sampled_clients=clients_per_round, accountant=accountant)
