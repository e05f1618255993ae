"""An example-weighted sum of client deltas, folded one reply at a time, that does not
depend on the order replies arrive in.

Why: holding every decoded reply until the round ends costs O(N x P) coordinator memory,
and sorting them by content (how rounds used to be made reproducible) needs them all at
once. Folding each reply into a running float64 sum as it arrives keeps memory at O(P),
but float addition is not associative: the same replies in another order could round to
another float32 aggregate, and a resumed run would no longer be bit-identical.

So every contribution is added exactly. For a float32 value x and an integer weight
w < 2**29 the product t = w * x is exact in float64. It is split into an integer part
hi = trunc(t) and a fraction lo = trunc((t - hi) * 2**FRACTION_BITS), both integers held
in float64, whose sums are exact while they stay below 2**53 (the fraction's sum is
carried into the integer part before it could get there). Integer sums are associative
and commutative, so the total is the same bits whatever the order; the only rounding is
the fraction's truncation, a function of the reply alone (resolution 2**-49 on w * x,
far below a float32 ulp of any value that matters). Written by hand: numpy and torch
have no exact or order-independent array summation. Single-threaded numpy on purpose:
the coordinator shares its CPUs with the simulation's clients, and torch's OpenMP threads
slow down by an order of magnitude when the cores are busy.

The integer part stays exact while the sum of |w * x| over the round stays below 2**53;
`capacity` splits that range evenly between the replies a round can bring, so whether a
reply fits depends on that reply alone (with the default `robust` bounds, 1e6 examples
times |value| 1e4, a reply needs 2**33 of it: 2**20 replies fit).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np
import torch

from fedpeft.common.protocol.deltas import DeltaSpec

FRACTION_BITS = 49
"""Resolution of the fractional limb (2**-49 of one unit of w * x)."""
_CARRY_EVERY = 2 ** (53 - FRACTION_BITS) - 1
"""Folds after which the fraction limb is carried into the integer limb (its sum < 2**53)."""
_EXACT = float(2**53)
DEFAULT_CAPACITY = 4096
"""Replies a sum is sized for when the caller does not know how many a round sent."""
_NUMPY_FLOATS = frozenset({torch.float16, torch.float32, torch.float64})
MAX_WEIGHT = 2**29
"""Largest weight whose product with any float32 value is exact in float64."""


class ExactWeightedSum:
    """sum_i w_i * x_i over deltas of one spec (floating tensors only), exact and order-independent.

    `problem(delta, weight)` says why a reply cannot be folded (None when it can);
    `add` then folds it; `mean()` is the weighted mean in float64, one tensor per name.
    """

    def __init__(self, spec: DeltaSpec, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if not all(s.dtype.is_floating_point for s in spec.tensors.values()):
            raise ValueError("an exact weighted sum needs floating-point tensors only")
        self.spec = spec
        self.layout: OrderedDict[str, tuple[int, int, tuple[int, ...]]] = OrderedDict()
        offset = 0
        for name, tensor_spec in spec.tensors.items():
            size = math.prod(tensor_spec.shape)
            self.layout[name] = (offset, offset + size, tuple(tensor_spec.shape))
            offset += size
        self.size = offset
        self.capacity = capacity
        self.reply_limit = _EXACT / (capacity + 1)
        """Largest max|w * x| of one reply (its share of the exact integer range)."""
        self._hi = np.zeros(self.size, dtype=np.float64)
        self._lo = np.zeros(self.size, dtype=np.float64)
        self._t = np.empty(self.size, dtype=np.float64)
        self._f = np.empty(self.size, dtype=np.float64)
        self._staged: tuple[Mapping[str, torch.Tensor], float] | None = None  # (the staged delta, its weight)
        self.staged_peak = 0.0
        """An upper bound of max |w * x| of the delta `problem` last accepted (its L2 norm),
        exact whenever it exceeds `bound_peak`."""
        self.bound_peak: float | None = None
        """A caller's own bound on max |w * x| (set per reply): above it, `staged_peak` is exact."""
        self.count = 0
        self.total_weight = 0

    def problem(self, delta: Mapping[str, torch.Tensor], weight: int) -> str | None:
        """Why `delta` (validated against the spec's names, shapes and dtypes) cannot be folded
        with `weight`: non-finite values, or values too large for the exact range.

        Stages w * x in the scratch buffer, so a following `add` of the same delta costs
        only the fold itself. The accumulators are untouched.
        """
        if not (isinstance(weight, int) and 1 <= weight <= MAX_WEIGHT):
            return f"weight {weight!r} must be an integer in [1, {MAX_WEIGHT}]"
        if self.count >= self.capacity:
            return f"more replies than the {self.capacity} this round's sum was sized for"
        t = self._t
        for name, (start, stop, _shape) in self.layout.items():
            tensor = delta[name].detach()
            if tensor.dtype in _NUMPY_FLOATS:  # one pass: cast and multiply in float64
                np.multiply(tensor.numpy().reshape(-1), float(weight), out=t[start:stop], dtype=np.float64)
            else:  # bfloat16 has no numpy twin
                torch.from_numpy(t[start:stop]).copy_(tensor.reshape(-1)).mul_(float(weight))
        self._staged = None
        # One BLAS pass: the squared norm is finite iff every value is, and bounds the peak.
        square = float(np.dot(t, t)) if self.size else 0.0
        peak = math.sqrt(square) if math.isfinite(square) else math.inf
        if peak > self.reply_limit or (self.bound_peak is not None and peak > self.bound_peak):
            low, high = float(t.min()), float(t.max())  # the exact peak
            if not (math.isfinite(low) and math.isfinite(high)):
                return "non-finite values"
            peak = max(-low, high)
        self.staged_peak = peak
        if peak > self.reply_limit:
            return (f"|value| x examples {peak:.3g} exceeds what an exact sum of this round's replies can "
                    f"hold ({self.reply_limit:.3g} per reply)")
        self._staged = (delta, float(weight))
        return None

    def flatten(self, delta: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """`delta` as one float64 vector in this sum's layout (e.g. the delta a round sent)."""
        flat = torch.empty(self.size, dtype=torch.float64)
        for name, (start, stop, _shape) in self.layout.items():
            flat[start:stop].copy_(delta[name].detach().reshape(-1))
        return flat

    def staged_update_norm(self, sent: torch.Tensor) -> float:
        """L2 norm of the staged delta minus `sent` (flat, float64): ||w x - w s|| / w, in two passes."""
        if self._staged is None:
            raise ValueError("no delta is staged")
        weight = self._staged[1]
        diff = np.multiply(sent.numpy(), -weight, out=self._f)
        diff += self._t
        return math.sqrt(float(np.dot(diff, diff))) / weight

    def add(self, delta: Mapping[str, torch.Tensor], weight: int) -> None:
        """Fold a delta that `problem` accepted (the last one staged, or it is staged again)."""
        if self._staged is None or self._staged[0] is not delta or self._staged[1] != float(weight):
            problem = self.problem(delta, weight)
            if problem is not None:
                raise ValueError(problem)
        self._staged = None
        t, f = self._t, self._f
        self._hi += np.trunc(t, out=f)  # the integer part (np.modf is 3x slower than these two passes)
        t -= f  # the fraction, exact
        t *= 2.0**FRACTION_BITS
        self._lo += np.trunc(t, out=t)
        self.count += 1
        self.total_weight += weight
        if self.count % _CARRY_EVERY == 0:
            self._carry()

    def _carry(self) -> None:
        carry = np.trunc(np.multiply(self._lo, 2.0**-FRACTION_BITS, out=self._f), out=self._f)
        self._hi += carry
        carry *= 2.0**FRACTION_BITS
        self._lo -= carry

    def total(self) -> OrderedDict[str, torch.Tensor]:
        """sum_i w_i * x_i in float64 (one rounding, of exact integer sums: order-independent)."""
        flat = torch.from_numpy(self._hi + self._lo * 2.0**-FRACTION_BITS)
        return OrderedDict((name, flat[start:stop].view(shape)) for name, (start, stop, shape) in self.layout.items())

    def mean(self) -> OrderedDict[str, torch.Tensor]:
        """The example-weighted mean in float64; empty sum: a ValueError."""
        if self.total_weight == 0:
            raise ValueError("no reply was folded")
        return OrderedDict((name, t / self.total_weight) for name, t in self.total().items())
