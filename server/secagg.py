"""Secure aggregation with Flower's SecAgg+, bridged onto fedpeft's rounds.

In flwr 1.41 SecAgg+ exists only on the legacy path (`LegacyContext` +
`DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))` on the server, `secaggplus_mod`
on the client). This module is the one bridge to it: `SecAggFedAvg` is a legacy FedAvg
that starts from the global PEFT delta, sends each client the federation plan and the
delta's tensor names, and hands every aggregated (unmasked) sum to fedpeft's
evaluation, checkpointing and recording — the same `evaluate_global` the Message API
path uses. The server never sees one client's delta, so per-client validation is
impossible: the aggregate is validated instead (names, shapes, NaN/Inf), clients refuse
to send values SecAgg+ would clip, and the quantization error bound of the masked sum
is reported per round.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.common import FitRes, Parameters, Scalar, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid

from fedpeft.common.errors import DeltaError, FederationError
from fedpeft.common.protocol.deltas import DeltaSpec
from fedpeft.common.protocol.flower_io import delta_from_arrayrecord, delta_to_arrayrecord
from fedpeft.common.protocol.plan import PLAN_KEY, WEIGHT_KEY
from fedpeft.server.robust import RobustSettings, metric_problem
from fedpeft.server.strategy import RoundTraffic, relax_minimums

if TYPE_CHECKING:
    from fedpeft.server.federation.spec import SecAggSection

log = logging.getLogger("fedpeft.server")
TENSOR_NAMES_KEY = "fedpeft-tensor-names"
MAX_WEIGHT_KEY = "fedpeft-secagg-max-weight"
CLIPPING_RANGE_KEY = "fedpeft-secagg-clipping-range"
MODULUS_RANGE = 2**32  # SecAggPlusWorkflow's default modulus_range


def secagg_problems(settings: SecAggSection, per_round: int, min_clients: int) -> list[str]:
    """Settings Flower 1.41 would crash on or silently mis-handle, checked up front."""
    found: list[str] = []
    n, t = settings.num_shares, settings.reconstruction_threshold
    if n < 3 or n % 2 == 0:
        # Even share counts crash clients with an IndexError in flwr 1.41 (Shamir neighbour
        # selection assumes an odd ring); 1 and 2 are refused by Flower itself.
        found.append(f"secagg.num_shares must be an odd integer >= 3 (got {n}); even values crash flwr 1.41 clients")
    if n > per_round:
        found.append(f"secagg.num_shares {n} exceeds the {per_round} clients sampled per round")
    if not 2 <= t < n:
        found.append(f"secagg.reconstruction_threshold must be >= 2 and < num_shares={n} (got {t})")
    if t > min_clients and min_clients < per_round:
        log.debug("secagg threshold %d above min_clients %d: rounds fail below the threshold", t, min_clients)
    if not (settings.clipping_range > 0 and math.isfinite(settings.clipping_range)):
        found.append("secagg.clipping_range must be a finite number > 0")
    q = settings.quantization_range
    # The masked sum of per_round clients' values in [0, q) must not wrap around the modulus.
    if not 2 <= q or per_round * q > MODULUS_RANGE:
        found.append(f"secagg.quantization_range {q}: clients per round ({per_round}) x range must be <= 2**32, "
                     "or the masked sum wraps around")
    if not 1 <= settings.max_weight < math.inf:
        found.append("secagg.max_weight must be a finite number >= 1 (the largest num-examples any client may report)")
    if not 0 < settings.timeout < math.inf:
        found.append(f"secagg.timeout must be a finite number of seconds > 0 (got {settings.timeout})")
    if not 1 <= settings.round_attempts <= 1000:
        found.append(f"secagg.round_attempts must be in 1..1000 (got {settings.round_attempts})")
    if not 0 <= settings.retry_wait <= 86400:  # NaN fails too (it would crash time.sleep mid-run)
        found.append(f"secagg.retry_wait must be a number of seconds in [0, 86400] (got {settings.retry_wait})")
    return found


def quantization_error_bound(settings: SecAggSection, num_examples: list[int]) -> float:
    """Largest per-value error of the SecAgg+ weighted mean vs the exact one.

    Each client scales its values by n_k / max_weight and stochastically rounds them to a
    grid of step 2c/Q (error < one step); the server divides the sum by Σ n_k / max_weight.
    """
    step = 2 * settings.clipping_range / settings.quantization_range
    total = sum(num_examples)
    return len(num_examples) * step * settings.max_weight / total if total else math.inf


class SecAggFedAvg(LegacyFedAvg):
    """Legacy FedAvg that runs fedpeft's plan, validation and recording under SecAgg+."""

    def __init__(self, *, spec: DeltaSpec, initial: dict[str, Any], plan_json: str, settings: SecAggSection,
                 min_accepted: int, round_offset: int, evaluate_global: Callable[[int, ArrayRecord], MetricRecord | None],
                 **kwargs: Any) -> None:
        super().__init__(initial_parameters=ndarrays_to_parameters([t.numpy() for t in initial.values()]), **kwargs)
        self.spec = spec
        self.names = list(initial)
        self.dtypes = {n: t.dtype for n, t in initial.items()}
        self.plan_json = plan_json
        self.settings = settings
        self.min_accepted = min_accepted
        self.round_offset = round_offset
        self.evaluate_global = evaluate_global
        self.traffic: dict[int, RoundTraffic] = {}
        self.error_bounds: dict[int, float] = {}
        self._aggregated: set[int] = set()
        self._rounds_configured = 0
        self.final: ArrayRecord | None = None

    def configure_fit(self, server_round, parameters, client_manager):  # type: ignore[no-untyped-def]
        if self._rounds_configured:
            relax_minimums(self, "min_fit_clients", "min_available_clients", self.min_accepted)
        self._rounds_configured += 1
        instructions = super().configure_fit(server_round, parameters, client_manager)
        true_round = server_round + self.round_offset
        size = sum(len(t) for t in parameters.tensors)
        self.traffic[true_round] = RoundTraffic(bytes_down=size * len(instructions), sent=len(instructions))
        for _, fit_ins in instructions:
            fit_ins.config = {**fit_ins.config, PLAN_KEY: self.plan_json, "server-round": true_round,
                              TENSOR_NAMES_KEY: json.dumps(self.names), MAX_WEIGHT_KEY: self.settings.max_weight,
                              CLIPPING_RANGE_KEY: self.settings.clipping_range}
        return instructions

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[Any]) -> tuple[Parameters | None, dict[str, Scalar]]:
        true_round = server_round + self.round_offset
        traffic = self.traffic.setdefault(true_round, RoundTraffic())
        traffic.failed = len(failures)
        traffic.accepted = len(results)
        if len(results) < self.min_accepted:
            raise FederationError(f"round {true_round}: SecAgg+ unmasked the sum of only {len(results)} client(s), "
                                  f"need {self.min_accepted} ({len(failures)} failed)")
        summed = results[0][1].parameters  # SecAgg+ put the unmasked weighted mean into every result
        delta = self._to_delta(summed, f"SecAgg+ aggregate of round {true_round}")
        counts = [fit_res.num_examples for _, fit_res in results]
        self.error_bounds[true_round] = quantization_error_bound(self.settings, counts)
        # SecAgg+ already summed every unmasked update; a client's plaintext metrics can only be
        # left out of the round's statistics: held to the same checks as every other reply's,
        # and num-examples to the weight SecAgg+ itself used.
        bounds = RobustSettings(max_examples=int(self.settings.max_weight))
        typed = [r for _, r in results if metric_problem(r.metrics, bounds) is None
                 and r.metrics[WEIGHT_KEY] == r.num_examples]
        if len(typed) < len(results):
            log.error("round %d: %d SecAgg+ client(s) reported malformed metrics, left out of the round's statistics",
                      true_round, len(results) - len(typed))
        traffic.bytes_up = sum(int(r.metrics["bytes-up"]) for r in typed)
        traffic.client_metrics = [{k: float(v) for k, v in r.metrics.items()} for r in typed]
        total = sum(float(r.metrics["num-examples"]) for r in typed) or 1.0
        traffic.train_metrics = {"train-loss": sum(float(r.metrics["train-loss"]) * float(r.metrics["num-examples"])
                                                   for r in typed) / total}
        traffic.seconds = time.perf_counter() - traffic.started
        self._aggregated.add(true_round)
        log.info("round %d: SecAgg+ sum of %d clients (%d failed); quantization error <= %.2e per value",
                 true_round, len(results), len(failures), self.error_bounds[true_round])
        return ndarrays_to_parameters([delta[n].numpy() for n in self.names]), {}

    def _to_delta(self, parameters: Parameters, source: str) -> dict[str, Any]:
        arrays = parameters_to_ndarrays(parameters)
        if len(arrays) != len(self.names):
            raise DeltaError(f"{source}: {len(arrays)} tensors, expected {len(self.names)}")
        record = ArrayRecord({n: _array(a.astype(np.float32, copy=False) if a.dtype == np.float64 else a)
                              for n, a in zip(self.names, arrays, strict=True)})
        delta = delta_from_arrayrecord(record)
        delta = {n: t.to(self.dtypes[n]) for n, t in delta.items()}
        self.spec.validate(delta, source=source)
        return delta

    def evaluate(self, server_round: int, parameters: Parameters):  # type: ignore[no-untyped-def]
        true_round = server_round + self.round_offset
        if server_round > 0 and true_round not in self._aggregated:
            raise FederationError(f"round {true_round}: SecAgg+ did not complete (too few clients survived to unmask "
                                  "the sum); see the log above")
        record = delta_to_arrayrecord(self._to_delta(parameters, f"global delta of round {true_round}"))
        self.final = record
        metrics = self.evaluate_global(server_round, record)
        return None if metrics is None else (float(metrics.get("eval-loss", 0.0)), {})  # None: not scored this round


def _array(ndarray: np.ndarray) -> Any:
    from flwr.app import Array

    return Array(ndarray)


class RetryingSecAggPlusWorkflow(SecAggPlusWorkflow):
    """SecAgg+ that retries a halted round instead of giving it up.

    Flower's SecAgg+ can only recover a client that drops *after* sharing its keys; one
    that is dead before (e.g. killed between rounds, before the SuperLink's heartbeat
    timeout marks it offline) halts the round ("Not enough shares"). The retry samples
    again from the nodes still connected, so the round completes with the survivors down
    to `min_clients` and the reconstruction threshold.
    """

    def __init__(self, *, attempts: int, retry_wait: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.attempts = attempts
        self.retry_wait = retry_wait

    def __call__(self, grid: Grid, context: Context) -> None:
        strategy = context.strategy  # type: ignore[attr-defined]
        for attempt in range(1, self.attempts + 1):
            before = set(strategy._aggregated)
            super().__call__(grid, context)
            if set(strategy._aggregated) != before:
                return
            if attempt < self.attempts:
                log.warning("SecAgg+ round halted (a sampled client dropped before sharing its keys); retrying with "
                            "the connected clients in %.0f s (attempt %d of %d)", self.retry_wait, attempt + 1,
                            self.attempts)
                time.sleep(self.retry_wait)


def run_secagg_rounds(grid: Grid, context: Context, strategy: SecAggFedAvg, num_rounds: int,
                      settings: SecAggSection) -> ArrayRecord | None:
    """Run `num_rounds` SecAgg+ rounds; returns the final global delta."""
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=num_rounds, round_timeout=settings.timeout),
                           strategy=strategy)
    workflow = DefaultWorkflow(fit_workflow=RetryingSecAggPlusWorkflow(
        attempts=settings.round_attempts, retry_wait=settings.retry_wait, num_shares=settings.num_shares,
        reconstruction_threshold=settings.reconstruction_threshold,
        max_weight=settings.max_weight, clipping_range=settings.clipping_range,
        quantization_range=settings.quantization_range, timeout=settings.timeout))
    workflow(grid, legacy)
    return strategy.final
