"""Heterogeneous-rank LoRA aggregation: HetLoRA and FlexLoRA (pure functions, no I/O).

Client k trains LoRA at its own rank r_k <= r_max with peft's scale s_k = s(r_k)
(alpha/r_k, or alpha/sqrt(r_k) with rsLoRA), so its update of one module is
ΔW_k = s_k·B_k·A_k. The global adapter has rank r_max and scale s_g = s(r_max). Moving
factors between ranks must keep ΔW fixed, so the scale ratio goes into B only (A stays
on its initialization scale):
- lift (client -> global rank): A' = [A_k; 0], B' = [(s_k/s_g)·B_k | 0], so that
  s_g·B'·A' = ΔW_k exactly;
- restrict (global -> client k): A_k = A[:r_k], B_k = (s_g/s_k)·B[:, :r_k], so that
  s_k·B_k·A_k = s_g·B[:, :r_k]·A[:r_k], the global's first r_k components.

Modes:
- HetLoRA (Cho et al. 2024): the global factors are the example-weighted mean of the
  lifted (zero-padded) client factors; client k receives their restriction to r_k. As in
  FedIT, mean(B)·mean(A) != mean(B·A): this is inexact by design (the paper's choice).
- FlexLoRA (Bai et al. 2024): the exact example-weighted mean of the ΔW_k is re-factored
  by truncated SVD to r_max, components in decreasing singular-value order; restricting it
  to r_k is then the best rank-r_k approximation of the mean (Eckart–Young). The relative
  Frobenius error of every restriction is reported per rank, from the mean's spectrum.

FLoRA's stacking (global rank = Σ r_k, merged into the base each round) is not offered:
our global model is frozen base + one rank-r_max LoRA delta, which cannot hold a growing
residual without a new delta kind.

Non-LoRA tensors of a delta (e.g. a classification head) are plainly weighted-averaged
and passed through restriction unchanged. Conventions as in `lora_aggregation`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from fedpeft.common.errors import DeltaError
from fedpeft.common.protocol.deltas import DeltaSpec, TensorSpec
from fedpeft.server.lora_aggregation import (
    LORA_A,
    LORA_B,
    lora_pairs,
    module_svd,
    refactor_svd,
    tail_error,
    weighted_mean,
)

Scaling = Callable[[int], float]
"""peft's scale s(r) of a rank-r LoRA module under the run's alpha (and rsLoRA choice)."""


@dataclass(frozen=True)
class RankErrorReport:
    """How well each rank's restriction of the FlexLoRA global reproduces the exact mean."""

    modules: int
    max_relative_error: dict[int, float]
    """rank -> max over modules of ||s_r·B_r·A_r - mean ΔW||_F / ||mean ΔW||_F."""


def spec_at_rank(spec: DeltaSpec, rank: int) -> DeltaSpec:
    """The delta spec of the same LoRA modules at rank `rank` (what a rank-`rank` client sends)."""
    tensors: OrderedDict[str, TensorSpec] = OrderedDict()
    for name, tensor in spec.tensors.items():
        shape = tensor.shape
        if LORA_A in name:
            shape = (rank, *shape[1:])
        elif LORA_B in name:
            shape = (shape[0], rank, *shape[2:])
        tensors[name] = TensorSpec(shape, tensor.dtype)
    return DeltaSpec(tensors)


def delta_rank(delta: Mapping[str, torch.Tensor]) -> int:
    """The common rank of a LoRA delta's modules; mixed ranks are an error."""
    ranks = {delta[a].shape[0] for a, _ in lora_pairs(list(delta))}
    if len(ranks) != 1:
        raise DeltaError(f"LoRA delta has modules of ranks {sorted(ranks)}; expected one rank")
    return ranks.pop()


def restrict(delta: Mapping[str, torch.Tensor], rank: int, scaling: Scaling) -> OrderedDict[str, torch.Tensor]:
    """The first `rank` components of a LoRA delta, re-scaled so each module's s·B·A is kept."""
    source = delta_rank(delta)
    if not 1 <= rank <= source:
        raise DeltaError(f"cannot restrict a rank-{source} LoRA delta to rank {rank}")
    ratio = scaling(source) / scaling(rank)
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for name, tensor in delta.items():
        if LORA_A in name:
            out[name] = tensor[:rank].clone()
        elif LORA_B in name:
            out[name] = (tensor[:, :rank].double() * ratio).to(tensor.dtype)
        else:
            out[name] = tensor.clone()
    return out


def lift(delta: Mapping[str, torch.Tensor], rank: int, scaling: Scaling) -> OrderedDict[str, torch.Tensor]:
    """A LoRA delta zero-padded to `rank` components, re-scaled so each module's s·B·A is kept."""
    source = delta_rank(delta)
    if source > rank:
        raise DeltaError(f"cannot lift a rank-{source} LoRA delta to the lower rank {rank}")
    ratio = scaling(source) / scaling(rank)
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for name, tensor in delta.items():
        if LORA_A in name:
            out[name] = torch.cat([tensor, tensor.new_zeros(rank - source, *tensor.shape[1:])], dim=0)
        elif LORA_B in name:
            scaled = (tensor.double() * ratio).to(tensor.dtype)
            out[name] = torch.cat([scaled, tensor.new_zeros(tensor.shape[0], rank - source)], dim=1)
        else:
            out[name] = tensor.clone()
    return out


def _check(deltas: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> None:
    if not deltas or len(deltas) != len(weights) or min(weights) <= 0:
        raise DeltaError("aggregation needs one positive weight per delta")
    names = list(deltas[0])
    if any(list(d) != names for d in deltas[1:]):
        raise DeltaError("client deltas name different tensors")


def aggregate_hetlora(deltas: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float], rank: int,
                      scaling: Scaling) -> OrderedDict[str, torch.Tensor]:
    """HetLoRA: example-weighted mean of the clients' factors, each lifted to the global `rank`."""
    _check(deltas, weights)
    # lifted in float64: the rank rescaling of B must not round before the mean does
    lifted = [lift(OrderedDict((k, v.double() if v.is_floating_point() else v) for k, v in d.items()), rank, scaling)
              for d in deltas]
    return weighted_mean(lifted, weights, list(lifted[0]))


def aggregate_flexlora(deltas: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float], rank: int,
                       scaling: Scaling, client_ranks: Sequence[int] = ()
                       ) -> tuple[OrderedDict[str, torch.Tensor], RankErrorReport]:
    """FlexLoRA: exact weighted mean of ΔW_k = s(r_k)·B_k·A_k, re-factored by SVD to `rank`.

    The report holds the error of the global (`rank`) and of its restriction to each of
    `client_ranks`, i.e. of what those clients will actually be sent (Eckart–Young, from
    the exact mean's singular values).
    """
    _check(deltas, weights)
    names = list(deltas[0])
    pairs = lora_pairs(names)
    in_pairs = {n for pair in pairs for n in pair}
    out = weighted_mean(deltas, weights, [n for n in names if n not in in_pairs])
    scale = scaling(rank)
    spectra: list[torch.Tensor] = []
    for a_name, b_name in pairs:
        client_scales = [scaling(d[a_name].shape[0]) for d in deltas]
        # The SVD of the exact mean from the stacked factors (no dense ΔW per client, and
        # below the module's side none at all: `module_svd`).
        u, s, vh = module_svd(deltas, weights, a_name, b_name, client_scales)
        a, b = refactor_svd(u, s, vh, rank, scale)
        out[a_name], out[b_name] = a.to(deltas[0][a_name].dtype), b.to(deltas[0][b_name].dtype)
        spectra.append(s)
    merged = OrderedDict((n, out[n]) for n in names)
    # Restricting to r keeps the first r components (rescaled, same product): its error is
    # the Eckart–Young tail of the exact mean's spectrum, without forming either matrix.
    errors = {r: max((tail_error(s, r) for s in spectra), default=0.0) for r in sorted({rank, *client_ranks})}
    return merged, RankErrorReport(modules=len(pairs), max_relative_error=errors)
