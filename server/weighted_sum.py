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

The fast path. The two limbs together hold q = trunc(w * x * 2**49), an integer. For a
reply of float32 (or float16/bfloat16) values with max |w * x| < 2**13, q fits an int64,
and so does the whole float64 product w * 2**49 * x (exact: 29 + 24 bits), whose
conversion to int64 truncates toward zero: q in one pass, summed in an int64 accumulator
whose wrap-around is harmless while the true partial sum fits (tracked with each reply's
bound, and moved exactly into the limbs before it could overflow). Same integers, same
sums, so the same bits as the two-limb fold: one compiled pass a reply
(`fedpeft.server.fold_kernels`) after one checking pass, instead of seven. Replies
outside that range (or float64 ones, e.g. clipped updates) take the two-limb path; both
land in the same exact total.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import NamedTuple

import numpy as np
import torch

from fedpeft.common.protocol.deltas import DeltaSpec
from fedpeft.server.fold_kernels import NON_FINITE_BITS, fold_q, peak_bits, peak_square

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
_Q_SCALE = 2.0**FRACTION_BITS
_INT_ROOM = 2.0**62
"""What the int64 accumulator's true partial sum is kept below (2**63 less a safety margin)."""
_LOW_MASK = (1 << FRACTION_BITS) - 1
_BLOCK = 1 << 15
"""Values per block of the moves and carries between limbs (a 256 KiB scratch, in the L2 cache)."""
_FLOAT32_EXACT = frozenset({torch.float16, torch.bfloat16, torch.float32})
"""Dtypes whose values float32 holds exactly (the fast path stages replies as float32)."""


class Checked(NamedTuple):
    """A reply `ExactWeightedSum.problem` accepted: its delta, weight, float32 values flat
    (the fast path; None on the two-limb path, which stages w * x in its scratch), the
    bound of max |w * x| its fold is sized by (`staged_peak`), and where the check had
    the sent delta, `sum((x - sent)**2)` and that sent vector."""

    delta: Mapping[str, torch.Tensor]
    weight: float
    values: np.ndarray | None
    peak: float
    square: float | None = None
    sent: np.ndarray | None = None


def _immutable(values: np.ndarray) -> bool:
    """Whether `values` views a `bytes` object (nothing can change them)."""
    base: object = values
    while True:
        if isinstance(base, np.ndarray) and not base.flags.writeable and base.base is not None:
            base = base.base
        elif isinstance(base, memoryview) and base.readonly:
            base = base.obj
        else:
            return isinstance(base, bytes)


class ExactWeightedSum:
    """sum_i w_i * x_i over deltas of one spec (floating tensors only), exact and order-independent.

    `problem(delta, weight)` says why a reply cannot be folded (None when it can);
    `add` then folds it; `mean()` is the weighted mean in float64, one tensor per name.
    `fast=False` keeps every reply on the two-limb path (the reference the fast path is
    tested against).
    """

    def __init__(self, spec: DeltaSpec, capacity: int, fast: bool = True) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if not all(s.dtype.is_floating_point for s in spec.tensors.values()):
            raise ValueError("an exact weighted sum needs floating-point tensors only")
        self.spec = spec
        self.layout = spec.flat_layout
        self.size = spec.num_parameters
        self.capacity = capacity
        self.fast = fast
        self.reply_limit = _EXACT / (capacity + 1)
        """Largest max|w * x| of one reply (its share of the exact integer range)."""
        self._hi = np.zeros(self.size, dtype=np.float64)
        self._lo = np.zeros(self.size, dtype=np.float64)
        self._lo_adds = 0  # additions of < 2**49 to the fraction limb since its last carry
        self._t = np.empty(0, dtype=np.float64)  # the two-limb path's staged w * x (allocated on first use)
        self._f = np.empty(0, dtype=np.float64)
        self._x = np.empty(0, dtype=np.float32)  # the fast path's copy of a reply's x (allocated on first use)
        self._q = np.zeros(self.size if fast else 0, dtype=np.int64)  # the fast path's sum of q
        self._q_room = 0.0  # a bound of the |q| folded into _q since it was last moved to the limbs
        self._block = np.empty(max(1, min(_BLOCK, self.size)), dtype=np.float64)
        self._staged: Checked | None = None
        """The reply `problem` last accepted, which `add` folds."""
        self.staged_peak = 0.0
        """An upper bound of max |w * x| of the delta `problem` last accepted: exact on the fast
        path, else from its L2 norm and exact whenever it exceeds `bound_peak`."""
        self.bound_peak: float | None = None
        """A caller's own bound on max |w * x| (set per reply): above it, `staged_peak` is exact."""
        self.count = 0
        self.total_weight = 0

    def problem(self, delta: Mapping[str, torch.Tensor], weight: int, sent: np.ndarray | None = None) -> str | None:
        """Why `delta` (validated against the spec's names, shapes and dtypes) cannot be folded
        with `weight`: non-finite values, or values too large for the exact range.

        Stages the delta in a scratch buffer, so a following `add` of the same delta costs
        only the fold itself. The accumulators are untouched. With `sent` (the delta the
        round sent, from `flatten_sent`) the same pass measures the update norm
        (`staged_update_norm`).
        """
        self._staged = None
        if not (isinstance(weight, int) and 1 <= weight <= MAX_WEIGHT):
            return f"weight {weight!r} must be an integer in [1, {MAX_WEIGHT}]"
        if self.count >= self.capacity:
            return f"more replies than the {self.capacity} this round's sum was sized for"
        flat = self._flat_values(delta)
        fast = self.fast and (flat is not None or all(delta[name].dtype in _FLOAT32_EXACT for name in self.layout))
        square = None
        if fast:
            x = flat if flat is not None else self._flat32(delta)
            # One read-only pass: the exact peak (as float32 bits, NaN and inf above all finite ones).
            if sent is not None:
                bits, square = peak_square(x.view(np.int32), x, sent)
            else:
                bits = peak_bits(x.view(np.int32))
            if bits >= NON_FINITE_BITS:
                return "non-finite values"
            peak = float(np.int32(bits).view(np.float32)) * weight
        else:
            t = self._staging()
            for name, (start, stop, _shape) in self.layout.items():
                tensor = delta[name].detach()
                if tensor.dtype in _NUMPY_FLOATS:  # one pass: cast and multiply in float64
                    np.multiply(tensor.numpy().reshape(-1), float(weight), out=t[start:stop], dtype=np.float64)
                else:  # bfloat16 has no numpy twin
                    torch.from_numpy(t[start:stop]).copy_(tensor.reshape(-1)).mul_(float(weight))
            # One BLAS pass: the squared norm is finite iff every value is, and bounds the peak.
            square_wx = float(np.dot(t, t)) if self.size else 0.0
            peak = math.sqrt(square_wx) if math.isfinite(square_wx) else math.inf
            if peak > self.reply_limit or (self.bound_peak is not None and peak > self.bound_peak):
                low, high = float(t.min()), float(t.max())  # the exact peak
                if not (math.isfinite(low) and math.isfinite(high)):
                    return "non-finite values"
                peak = max(-low, high)
        self.staged_peak = peak
        if peak > self.reply_limit:
            return (f"|value| x examples {peak:.3g} exceeds what an exact sum of this round's replies can "
                    f"hold ({self.reply_limit:.3g} per reply)")
        if fast and peak * _Q_SCALE >= _INT_ROOM:  # q would not fit an int64: the two limbs take it
            return self.problem_two_limbs(delta, weight)
        self._staged = Checked(delta, float(weight), x if fast else None, peak, square, sent if fast else None)
        return None

    def checked(self) -> Checked | None:
        """The staged reply's accepted check, for folding it later (`restage`) without reading
        it again; only where its values are read in place from immutable bytes (a flat
        upload), so what was checked is what will be folded. None otherwise."""
        staged = self._staged
        return staged if staged is not None and staged.values is not None and _immutable(staged.values) else None

    def restage(self, checked: Checked) -> None:
        """Stage a reply `checked` accepted, so that its `add` folds it without a second check."""
        self._staged = checked
        self.staged_peak = checked.peak

    def problem_two_limbs(self, delta: Mapping[str, torch.Tensor], weight: int) -> str | None:
        """`problem`, staging on the two-limb path whatever the values."""
        fast, self.fast = self.fast, False
        try:
            return self.problem(delta, weight)  # (its update norm is measured by `staged_update_norm`)
        finally:
            self.fast = fast

    def _flat_values(self, delta: Mapping[str, torch.Tensor]) -> np.ndarray | None:
        """The one float32 vector `delta` already is, in this sum's layout (a flat upload,
        `fedpeft.server.compression.FlatDelta`): read in place, never copied. None otherwise."""
        flat = getattr(delta, "flat", None)
        spec = getattr(delta, "spec", None)
        if (isinstance(flat, np.ndarray) and flat.dtype == np.float32 and flat.shape == (self.size,)
                and isinstance(spec, DeltaSpec) and (spec is self.spec or spec.flat_layout == self.layout)):
            return flat
        return None

    def _flat32(self, delta: Mapping[str, torch.Tensor]) -> np.ndarray:
        """`delta`'s values (float32/float16/bfloat16) copied into one float32 scratch vector."""
        if self._x.size != self.size:
            self._x = np.empty(self.size, dtype=np.float32)
        x = self._x
        for name, (start, stop, _shape) in self.layout.items():
            tensor = delta[name].detach()
            if tensor.dtype == torch.float32:
                x[start:stop] = tensor.numpy().reshape(-1)
            else:  # float16/bfloat16 -> float32 is exact
                torch.from_numpy(x[start:stop]).copy_(tensor.reshape(-1))
        return x

    def _staging(self) -> np.ndarray:
        if self._t.size != self.size:
            self._t = np.empty(self.size, dtype=np.float64)
            self._f = np.empty(self.size, dtype=np.float64)
        return self._t

    def flatten(self, delta: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """`delta` as one float64 vector in this sum's layout."""
        flat = torch.empty(self.size, dtype=torch.float64)
        for name, (start, stop, _shape) in self.layout.items():
            flat[start:stop].copy_(delta[name].detach().reshape(-1))
        return flat

    def flatten_sent(self, sent: Mapping[str, torch.Tensor]) -> np.ndarray:
        """The delta a round sent as one vector in this sum's layout, for `problem` and
        `staged_update_norm`: float32 where that holds it exactly (half the bytes each
        reply's check reads), float64 otherwise."""
        if all(sent[name].dtype in _FLOAT32_EXACT for name in self.layout):
            flat = np.empty(self.size, dtype=np.float32)
            for name, (start, stop, _shape) in self.layout.items():
                torch.from_numpy(flat[start:stop]).copy_(sent[name].detach().reshape(-1))
            return flat
        return self.flatten(sent).numpy()

    def staged_update_norm(self, sent: np.ndarray) -> float:
        """L2 norm of the staged delta minus `sent` (from `flatten_sent`), in float64: measured
        by `problem`'s pass where it had `sent`, else one more pass."""
        staged = self._staged
        if staged is None:
            raise ValueError("no delta is staged")
        x = staged.values
        if x is not None:
            square = staged.square if staged.sent is sent else None
            return math.sqrt(square if square is not None else peak_square(x.view(np.int32), x, sent)[1])
        diff = np.multiply(sent, -staged.weight, out=self._f, dtype=np.float64)
        diff += self._t
        return math.sqrt(float(np.dot(diff, diff))) / staged.weight

    def add(self, delta: Mapping[str, torch.Tensor], weight: int) -> None:
        """Fold a delta that `problem` accepted (the last one staged, or it is staged again)."""
        if self._staged is None or self._staged.delta is not delta or self._staged.weight != float(weight):
            problem = self.problem(delta, weight)
            if problem is not None:
                raise ValueError(problem)
        assert self._staged is not None
        x, peak = self._staged.values, self._staged.peak
        self._staged = None
        if x is not None:
            self._fold_fast(x, weight, peak)
        else:
            t, f = self._t, self._f
            self._hi += np.trunc(t, out=f)  # the integer part (np.modf is 3x slower than these two passes)
            t -= f  # the fraction, exact
            t *= _Q_SCALE
            self._lo += np.trunc(t, out=t)
            self._lo_added()
        self.count += 1
        self.total_weight += weight

    def _fold_fast(self, x: np.ndarray, weight: int, peak: float) -> None:
        """q += trunc(w * 2**49 * x) into the int64 sum in one compiled pass (the float64
        product is exact; the conversion truncates toward zero, as the two limbs do)."""
        bound = peak * _Q_SCALE
        if self._q_room + bound >= _INT_ROOM:
            self._move_q()
        self._q_room += bound
        fold_q(self._q, x, float(weight) * _Q_SCALE)

    def _move_q(self) -> None:
        """Move the int64 sum into the limbs exactly, block by block: q = hi * 2**49 + lo with
        0 <= lo < 2**49 (an arithmetic shift and a mask)."""
        if self._q_room == 0.0:
            return
        scratch = self._block.view(np.int64)
        for start, stop in self._blocks():
            q, part = self._q[start:stop], scratch[:stop - start]
            self._hi[start:stop] += np.right_shift(q, FRACTION_BITS, out=part)  # |high| < 2**13: exact
            self._lo[start:stop] += np.bitwise_and(q, _LOW_MASK, out=part)  # < 2**49: exact
            q[:] = 0
        self._q_room = 0.0
        self._lo_added()

    def _blocks(self) -> Iterator[tuple[int, int]]:
        """(start, stop) of each scratch-sized block of the flat vector."""
        step = self._block.size
        return ((start, min(self.size, start + step)) for start in range(0, self.size, step))

    def _lo_added(self) -> None:
        self._lo_adds += 1
        if self._lo_adds >= _CARRY_EVERY:
            self._carry()
            self._lo_adds = 0

    def _carry(self) -> None:
        """Carry the fraction limb's whole units into the integer limb, block by block."""
        for start, stop in self._blocks():
            lo, part = self._lo[start:stop], self._block[:stop - start]
            carry = np.trunc(np.multiply(lo, 2.0**-FRACTION_BITS, out=part), out=part)
            self._hi[start:stop] += carry
            carry *= _Q_SCALE
            lo -= carry

    def total(self) -> OrderedDict[str, torch.Tensor]:
        """sum_i w_i * x_i in float64 (one rounding, of exact integer sums: order-independent)."""
        return self._tensors(self._total_flat())

    def mean(self) -> OrderedDict[str, torch.Tensor]:
        """The example-weighted mean in float64, one tensor per name; empty sum: a ValueError."""
        return self._tensors(self.mean_flat())

    def mean_flat(self) -> np.ndarray:
        """The example-weighted mean in float64, flat in the spec's layout; empty sum: a ValueError."""
        if self.total_weight == 0:
            raise ValueError("no reply was folded")
        flat = self._total_flat()
        flat /= self.total_weight
        return flat

    def _total_flat(self) -> np.ndarray:
        self._move_q()
        flat = np.multiply(self._lo, 2.0**-FRACTION_BITS)
        flat += self._hi
        return flat

    def _tensors(self, flat: np.ndarray) -> OrderedDict[str, torch.Tensor]:
        whole = torch.from_numpy(flat)
        return OrderedDict((name, whole[start:stop].view(shape)) for name, (start, stop, shape) in self.layout.items())
