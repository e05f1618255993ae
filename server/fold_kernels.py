"""The per-value loops of checking and folding a reply, compiled (numba): one pass over memory each.

Why compiled: in numpy each step of `q += int64(x * w * 2**49)` is its own pass (a
float64 product, a cast, an integer add) through cache-sized blocks, about 1.4x a plain
float64 weighted mean; the fused loop reads x and q once and writes q once, about half
of it. A reply's check (its peak |x|, NaN/inf, and its update norm) is one more pass that
reads x once, instead of numpy's min, max and a norm pass. Written by hand because no
library has an exact, order-independent weighted sum.
Single-threaded on purpose (the coordinator shares its CPUs with simulated clients).
Compiled on first use and cached on disk (beside this module, else in numba's user cache
directory); where no cache directory is writable the kernels are compiled in memory in
each process instead (about a second at the first round).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numba
import numpy as np


def _compiled(**options: Any) -> Callable[[Callable[..., Any]], Any]:
    """numba.njit with an on-disk cache where one can be written, in memory otherwise."""

    def wrap(fn: Callable[..., Any]) -> Any:
        try:
            return numba.njit(cache=True, nogil=True, **options)(fn)
        except RuntimeError:  # "cannot cache function ...: no locator available"
            return numba.njit(cache=False, nogil=True, **options)(fn)

    return wrap


@_compiled()
def fold_q(q: np.ndarray, x: np.ndarray, scale: float) -> None:  # pragma: no cover (compiled)
    """q += trunc(x * scale) as int64, elementwise (x float32; x * scale exact in float64,
    and within the int64 range: the caller bounds |x| * scale)."""
    if q.size != x.size:
        raise ValueError("fold_q: q and x differ in size")
    for i in range(x.size):
        q[i] += np.int64(np.float64(x[i]) * scale)


NON_FINITE_BITS = 0x7F800000
"""The float32 bits of inf with the sign cleared: |x|'s bits are at least this iff x is not finite."""


@_compiled()
def peak_bits(bits: np.ndarray) -> int:  # pragma: no cover (compiled)
    """max |x| of float32 values as their bits (`bits`: the values viewed as int32, sign cleared
    here): for finite floats |x| orders as its bits do, and NaN/inf are >= NON_FINITE_BITS.
    An integer max, which the compiler vectorizes (a float min/max with NaN checks it does not)."""
    peak = np.int32(0)
    for i in range(bits.size):
        b = bits[i] & np.int32(0x7FFFFFFF)
        if b > peak:
            peak = b
    return peak


@_compiled(fastmath={"reassoc"})
def peak_square(bits: np.ndarray, x: np.ndarray, sent: np.ndarray) -> tuple[int, float]:  # pragma: no cover
    """(`peak_bits(bits)`, sum((x - sent)**2)) in one pass over x (float32, `bits` its int32
    view) and sent (float32 or float64). The squares are summed in float64 in the vectorized
    order the compiler picks for this CPU: the same on every run on one machine, while
    another CPU may round it differently (relative ~1e-16)."""
    if x.size != sent.size or bits.size != x.size:
        raise ValueError("peak_square: bits, x and sent differ in size")
    peak = np.int32(0)
    total = 0.0
    for i in range(x.size):
        b = bits[i] & np.int32(0x7FFFFFFF)
        if b > peak:
            peak = b
        d = np.float64(x[i]) - np.float64(sent[i])
        total += d * d
    return peak, total


def warm_up() -> None:
    """Load (or compile) the kernels for the arrays folds see (a writable copy and a read-only
    view of received bytes; a float32 or float64 sent delta), so that a measurement times and
    sizes the fold, not the JIT."""
    for x in (np.zeros(2, np.float32), np.frombuffer(bytes(8), np.float32)):
        fold_q(np.zeros(2, np.int64), x, 1.0)
        peak_bits(x.view(np.int32))
        for sent in (np.zeros(2, np.float32), np.zeros(2)):
            peak_square(x.view(np.int32), x, sent)
