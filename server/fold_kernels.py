"""The two per-value loops of folding a reply, compiled (numba): one pass over memory each.

Why compiled: in numpy each step of `q += int64(x * w * 2**49)` is its own pass (a
float64 product, a cast, an integer add) through cache-sized blocks, about 1.4x a plain
float64 weighted mean; the fused loop reads x and q once and writes q once, about half
of it. Written by hand because no library has an exact, order-independent weighted sum.
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


@_compiled(fastmath={"reassoc"})
def update_square(x: np.ndarray, sent: np.ndarray) -> float:  # pragma: no cover (compiled)
    """sum((x - sent)**2) in float64 (x float32, sent float64), summed in the vectorized
    order the compiler picks for this CPU: the same on every run on one machine, while
    another CPU may round it differently (relative ~1e-16)."""
    if x.size != sent.size:
        raise ValueError("update_square: x and sent differ in size")
    total = 0.0
    for i in range(x.size):
        d = np.float64(x[i]) - sent[i]
        total += d * d
    return total


def warm_up() -> None:
    """Load (or compile) the kernels for the arrays folds see (a writable copy and a read-only
    view of received bytes), so that a measurement times and sizes the fold, not the JIT."""
    for x in (np.zeros(2, np.float32), np.frombuffer(bytes(8), np.float32)):
        fold_q(np.zeros(2, np.int64), x, 1.0)
        update_square(x, np.zeros(2))
