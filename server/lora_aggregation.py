"""LoRA-aware aggregation math (pure functions, no I/O).

Averaging LoRA's A and B separately (FedIT) does not average the clients' updates:
mean(B)·mean(A) != mean(B·A). The `svd` mode aggregates in ΔW space instead: the
example-weighted mean of every client's scaled update s·B_i·A_i (s = alpha / r), then
re-factors it to rank r with a truncated SVD (FlexLoRA-style), reporting how much of
the mean the rank-r factorization loses. FFA-LoRA (A frozen at a shared seed, only B
trained; the `lora` method's `freeze_a=true`) makes plain averaging exact instead.

Conventions (HF peft): A is (r, in_features), B is (out_features, r), ΔW = s·B·A has
the base weight's (out_features, in_features) shape.
"""

from __future__ import annotations

import math
import numbers
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from fedpeft.common.errors import DeltaError

LORA_A = ".lora_A."
LORA_B = ".lora_B."


@dataclass(frozen=True)
class RefactorReport:
    """How well the rank-r factors reproduce the exact weighted-mean update."""

    modules: int
    max_relative_error: float
    """max over modules of ||s·B·A - mean ΔW||_F / ||mean ΔW||_F."""


def lora_pairs(names: Sequence[str]) -> list[tuple[str, str]]:
    """(A name, B name) for every LoRA module in a delta; unmatched halves are an error."""
    a_names = [n for n in names if LORA_A in n]
    pairs = []
    for a_name in a_names:
        b_name = a_name.replace(LORA_A, LORA_B)
        if b_name not in names:
            raise DeltaError(f"{a_name}: LoRA A without its B ({b_name})")
        pairs.append((a_name, b_name))
    if len(pairs) != sum(1 for n in names if LORA_B in n):
        raise DeltaError("LoRA B tensor(s) without their A")
    return pairs


def weighted_mean(deltas: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float],
                  names: Sequence[str]) -> OrderedDict[str, torch.Tensor]:
    """Example-weighted mean of the named tensors (float64 accumulation)."""
    total = float(sum(weights))
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for name in names:
        acc = sum(d[name].double() * (w / total) for d, w in zip(deltas, weights, strict=True))
        out[name] = acc.to(deltas[0][name].dtype)  # type: ignore[union-attr]
    return out


CLIENT_BLOCK = 256
"""Clients whose stacked factors are multiplied at once on the dense route (bounds its memory)."""


def stacked_factors(deltas: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float], a_name: str,
                    b_name: str, scaling: float | Sequence[float],
                    total: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B_s, A_s), float64, with B_s·A_s the exact example-weighted mean of the clients' s·B·A.

    The mean of s_i·w_i·B_i·A_i is the product of the clients' factors side by side:
    B_s = [c_1·B_1 … c_N·B_N] (out x Σr_i) and A_s = [A_1; …; A_N] (Σr_i x in), with
    c_i = s_i·w_i/Σw. No client's dense out x in product is ever formed. `scaling`: one
    s for all, or one per client (FlexLoRA's per-rank scales); `total`: Σw when `deltas`
    are one block of a larger round.
    """
    total = float(sum(weights)) if total is None else total
    b = torch.cat([d[b_name].double() * (sc * w / total)
                   for d, w, sc in zip(deltas, weights, _scales(scaling, len(deltas)), strict=True)], dim=1)
    a = torch.cat([d[a_name].double() for d in deltas], dim=0)
    return b, a


def _scales(scaling: float | Sequence[float], clients: int) -> list[float]:
    return [float(scaling)] * clients if isinstance(scaling, numbers.Real) else [float(x) for x in scaling]


def mean_update(deltas: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float], a_name: str, b_name: str,
                scaling: float | Sequence[float], block: int = CLIENT_BLOCK) -> torch.Tensor:
    """The exact example-weighted mean of the clients' ΔW = s·B·A for one module (float64):
    the stacked factors' product, `block` clients at a time (memory independent of N)."""
    total = float(sum(weights))
    scales = _scales(scaling, len(deltas))
    mean: torch.Tensor | None = None
    for start in range(0, len(deltas), block):
        part = slice(start, start + block)
        b, a = stacked_factors(deltas[part], weights[part], a_name, b_name, scales[part], total)
        mean = b @ a if mean is None else mean.addmm_(b, a)
    if mean is None:
        raise DeltaError("aggregation needs at least one delta")
    return mean


def module_svd(deltas: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float], a_name: str, b_name: str,
               scaling: float | Sequence[float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thin SVD of one module's exact mean ΔW: from the stacked factors' QR when their
    Σr_i is below the module's smaller side (`mean_svd`), else of the mean formed block by block."""
    stacked = sum(int(d[a_name].shape[0]) for d in deltas)
    if stacked < min(int(deltas[0][b_name].shape[0]), int(deltas[0][a_name].shape[1])):
        return mean_svd(*stacked_factors(deltas, weights, a_name, b_name, scaling))
    return torch.linalg.svd(mean_update(deltas, weights, a_name, b_name, scaling), full_matrices=False)


def mean_svd(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thin SVD (U, S, Vh) of B·A without forming it: B = Q_B·R_B and Aᵀ = Q_A·R_A, so
    B·A = Q_B·(R_B·R_Aᵀ)·Q_Aᵀ and the SVD of the small k x k core gives it (k = N·r for N
    clients: cheap while k is below both sides of B·A, where the dense SVD of out x in
    dominated; `module_svd` takes the dense route above that)."""
    q_b, r_b = torch.linalg.qr(b)
    q_a, r_a = torch.linalg.qr(a.T)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)
    return q_b @ u, s, vh @ q_a.T


NULL_DIRECTION_SEED = 0x5EED


def refactor_svd(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int,
                 scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-`rank` (A, B) with s·B·A the best rank-`rank` approximation of U·diag(S)·Vh.

    The singular values are split evenly between the factors (B = U·√S/√s,
    A = √S·Vᵀ/√s), which keeps A and B on the same scale for further training. Each
    component's sign is fixed (the largest |entry| of its U column positive), so the QR
    and the dense route give the same factors up to rounding (where singular values are
    distinct and no two entries of a U column tie in magnitude; s·B·A is the same
    either way). Components the update does not
    use (zero singular values, or rank beyond the matrix size) get a fresh seeded random
    A row and a zero B column, as LoRA's own initialization does: the product is
    unchanged, and the component can still learn (with both factors zero its gradients
    would be zero forever).
    """
    u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    if u.numel():
        flip = torch.where(u.gather(0, u.abs().argmax(dim=0, keepdim=True)) < 0, -1.0, 1.0).to(u.dtype)
        u, vh = u * flip, vh * flip.T
    root = torch.sqrt(s / scaling)
    b = u * root
    a = root[:, None] * vh
    if rank > s.numel():  # more rank than the matrix has: pad
        b = torch.cat([b, b.new_zeros(b.shape[0], rank - s.numel())], dim=1)
        a = torch.cat([a, a.new_zeros(rank - s.numel(), a.shape[1])], dim=0)
    used = torch.zeros(rank, dtype=torch.bool)
    used[: min(rank, s.numel())] = _used(s)
    if not bool(used.all()):
        generator = torch.Generator().manual_seed(NULL_DIRECTION_SEED)
        bound = 1.0 / math.sqrt(a.shape[1])  # peft's kaiming_uniform(a=sqrt(5)) bound for lora_A
        fresh = (torch.rand(int((~used).sum()), a.shape[1], generator=generator, dtype=a.dtype) * 2 - 1) * bound
        a[~used] = fresh
        b[:, ~used] = 0
    return a, b


def _used(s: torch.Tensor) -> torch.Tensor:
    """Which singular values `refactor_svd` keeps (the others are numerically zero)."""
    return s > (s.max() * 1e-12 if s.numel() else 0)


def tail_error(s: torch.Tensor, rank: int) -> float:
    """||s·B·A - M||_F / ||M||_F for the rank-`rank` factors `refactor_svd` makes of M, from
    M's singular values `s` (descending): the Eckart–Young tail, plus any numerically zero
    component among the first `rank` (replaced by a null direction)."""
    total = float((s**2).sum())
    if total <= 0:
        return 0.0
    head = s[:rank]
    lost = float((s[rank:] ** 2).sum()) + float((head[~_used(s)[:rank]] ** 2).sum())
    return math.sqrt(lost / total)


def aggregate_lora_svd(deltas: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float],
                       scaling: float) -> tuple[OrderedDict[str, torch.Tensor], RefactorReport]:
    """ΔW-space aggregation: exact weighted mean per module, re-factored to the clients' rank.

    Non-LoRA tensors of the delta (e.g. DoRA magnitudes) are plainly weighted-averaged.
    """
    if not deltas or len(deltas) != len(weights) or min(weights) <= 0:
        raise DeltaError("aggregation needs one positive weight per delta")
    names = list(deltas[0])
    pairs = lora_pairs(names)
    in_pairs = {n for pair in pairs for n in pair}
    out = weighted_mean(deltas, weights, [n for n in names if n not in in_pairs])
    worst = 0.0
    for a_name, b_name in pairs:
        rank = deltas[0][a_name].shape[0]
        u, s, vh = module_svd(deltas, weights, a_name, b_name, scaling)
        a, b = refactor_svd(u, s, vh, rank, scaling)
        worst = max(worst, tail_error(s, rank))
        out[a_name] = a.to(deltas[0][a_name].dtype)
        out[b_name] = b.to(deltas[0][b_name].dtype)
    ordered = OrderedDict((n, out[n]) for n in names)
    return ordered, RefactorReport(modules=len(pairs), max_relative_error=worst)
