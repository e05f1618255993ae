"""The server optimizer's learning rate over rounds (`federation.server_lr_schedule`).

Flower's FedOpt strategies (FedAdam, FedYogi, FedAdagrad) step at one constant `eta`.
Under the server-adam recipe that keeps the global adapter moving by about `eta` per
coordinate every round, so the last round's accuracy is a noisy draw from a plateau
(best rounds several points above the final one). A cosine decay (Loshchilov & Hutter,
SGDR) ends the run with small steps. Flower has no schedule hook for FedOpt; this is
the few lines it needs, applied to the strategy's `eta` before each round's step.
"""

from __future__ import annotations

import math

CONSTANT, COSINE = "constant", "cosine"
SERVER_LR_SCHEDULES: tuple[str, ...] = (CONSTANT, COSINE)
"""`federation.server_lr_schedule` values."""


def server_rate(schedule: str, base: float, server_round: int, num_rounds: int) -> float:
    """The server rate of round `server_round` (1-based) of `num_rounds`: `base` throughout
    (constant), or `base` in round 1 decaying along a half cosine toward 0 (cosine; the last
    round still steps, at base * (1 - cos(pi / num_rounds)) / 2). A pure function of the round,
    so a resumed run continues the same schedule."""
    if schedule == CONSTANT:
        return base
    if schedule != COSINE:
        raise ValueError(f"unknown server learning-rate schedule {schedule!r}; choose one of {SERVER_LR_SCHEDULES}")
    if not 1 <= server_round <= num_rounds:
        raise ValueError(f"round {server_round} is outside the run's 1..{num_rounds}")
    return base * 0.5 * (1.0 + math.cos(math.pi * (server_round - 1) / num_rounds))
