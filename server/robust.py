"""What the coordinator checks in every client reply before it is aggregated.

A client with a valid identity is still untrusted: each number it reports is typed and
bounded, and each update is held to value and norm bounds, before any aggregation math
sees it. A reply outside the bounds is refused with its reason (never clamped in
silence); the round goes on with the others. `RobustSettings` is the run spec's
`[robust]` section, so simulation and deployment check exactly the same things.

Relative bounds (`examples_ratio`, `norm_bound_ratio`) compare a reply with the median of
the round's other accepted replies; they need at least `RELATIVE_MIN_REPLIES` replies to
mean anything (with two, the median is pulled halfway to the outlier).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from fedpeft.common.protocol.plan import TRAIN_METRIC_KEYS, UNIT_WEIGHT_KEY, WEIGHT_KEY

RELATIVE_MIN_REPLIES = 3
# Metrics that count something (seconds, bytes) cannot be negative.
_NON_NEGATIVE = frozenset({"train-seconds", "load-seconds", "swap-seconds", "bytes-up"})


@dataclass
class RobustSettings:
    """Bounds every client reply is held to (`[robust]` in the run spec)."""

    max_examples: int = 1_000_000
    """Largest num-examples one reply may report (its FedAvg weight)."""
    examples_ratio: float = 1000.0
    """Refuse a reply reporting more than this multiple of the round's median num-examples
    (needs >= 3 replies; 0 = off)."""
    max_abs_value: float = 1e4
    """Largest absolute value of any tensor element in a delta (0 = off). Trained PEFT
    tensors are O(1); this bound keeps every weighted sum far from float overflow."""
    norm_bound: float = 0.0
    """Refuse an update (delta minus what the client was sent) whose L2 norm exceeds this (0 = off)."""
    norm_bound_ratio: float = 10.0
    """Refuse an update whose L2 norm exceeds this multiple of the round's median update
    norm (needs >= 3 replies; 0 = off)."""

    def problems(self) -> list[str]:
        found = []
        if self.max_examples < 1:
            found.append(f"robust.max_examples must be >= 1 (got {self.max_examples})")
        for key in ("examples_ratio", "max_abs_value", "norm_bound", "norm_bound_ratio"):
            value = getattr(self, key)
            if not (value >= 0 and math.isfinite(value)):
                found.append(f"robust.{key} must be a finite number >= 0 (got {value})")
        for key in ("examples_ratio", "norm_bound_ratio"):
            if 0 < getattr(self, key) <= 1:
                found.append(f"robust.{key} must be 0 (off) or > 1: a ratio <= 1 refuses honest replies "
                             f"(got {getattr(self, key)})")
        return found

    @property
    def needs_updates(self) -> bool:
        """Whether each reply's update (its delta minus what it was sent) must be computed."""
        return self.norm_bound > 0 or self.norm_bound_ratio > 0


MAX_WEIGHT = 2**31 - 1
"""The largest example count a Flower MetricRecord int carries everywhere."""
UNBOUNDED = RobustSettings(max_examples=MAX_WEIGHT, examples_ratio=0.0, max_abs_value=0.0, norm_bound=0.0,
                           norm_bound_ratio=0.0)
"""Every reply bound off (metrics are still typed and finite, deltas still finite and on spec)."""


def metric_problem(metrics: Mapping[str, object], settings: RobustSettings) -> str | None:
    """Why a reply's metrics are refused (None if they are fine): exactly the expected keys,
    each a finite number of its type, the example count a positive integer within bounds."""
    if set(metrics) != TRAIN_METRIC_KEYS:
        return f"metrics keys {sorted(metrics)} != expected {sorted(TRAIN_METRIC_KEYS)}"
    for key, value in sorted(metrics.items()):
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"metric {key!r} must be a number, got {type(value).__name__}"
        if not math.isfinite(value):
            return f"metric {key!r} must be finite, got {value}"
        if key in _NON_NEGATIVE and value < 0:
            return f"metric {key!r} must be >= 0, got {value}"
    examples = metrics[WEIGHT_KEY]
    if not isinstance(examples, int) or not 1 <= examples <= settings.max_examples:
        return (f"{WEIGHT_KEY!r} must be an integer in [1, {settings.max_examples}] (robust.max_examples), "
                f"got {examples!r}")
    if metrics[UNIT_WEIGHT_KEY] != 1 or not isinstance(metrics[UNIT_WEIGHT_KEY], int):
        return f"{UNIT_WEIGHT_KEY!r} must be the integer 1, got {metrics[UNIT_WEIGHT_KEY]!r}"
    return None


def value_problem(delta: Mapping[str, torch.Tensor], settings: RobustSettings) -> str | None:
    """Why a (finite, spec-checked) delta's values are refused: any element beyond `max_abs_value`."""
    if settings.max_abs_value <= 0:
        return None
    for name, tensor in delta.items():
        if tensor.is_floating_point() and tensor.numel():
            peak = float(tensor.abs().max())
            if peak > settings.max_abs_value:
                return f"{name}: |value| {peak:.3g} exceeds robust.max_abs_value {settings.max_abs_value:g}"
    return None


def update_norm(delta: Mapping[str, torch.Tensor], sent: Mapping[str, torch.Tensor]) -> float:
    """L2 norm over all tensors of `delta - sent`, in float64."""
    return math.sqrt(sum(float(((delta[k].double() - sent[k].double()) ** 2).sum()) for k in delta))


def relative_outliers(values: Mapping[int, float], ratio: float, what: str, key: str) -> dict[int, str]:
    """{reply index: reason} of values above `ratio` x the median of all of them."""
    if ratio <= 0 or len(values) < RELATIVE_MIN_REPLIES:
        return {}
    median = statistics.median(values.values())
    if median <= 0:  # nothing to scale a bound by
        return {}
    return {i: f"{what} {v:.4g} exceeds {ratio:g} x the round's median {median:.4g} ({key})"
            for i, v in values.items() if v > ratio * median}
