"""The example-weighted mean of the replies' train metrics, as Flower computes it, on plain floats."""

from __future__ import annotations

from collections.abc import Sequence

from flwr.app import MetricRecord


def weighted_metric_mean(records: Sequence[MetricRecord], weight_key: str) -> MetricRecord:
    """Flower's `aggregate_metricrecords` for one MetricRecord per reply: the same arithmetic
    in the same order (bit-identical, tested against it), accumulated in a dict.

    Why not Flower's own: it accumulates into a MetricRecord, whose every assignment
    validates the value, about 40 µs a reply, a fifth of folding a 1,000-client round.
    """
    weights = [record[weight_key] for record in records]
    total = sum(weights)  # type: ignore[arg-type]
    out: dict[str, float | list[float]] = {}
    for record, weight in zip(records, [w / total for w in weights], strict=True):  # type: ignore[operator]
        for key, value in record.items():
            if key == weight_key:
                continue
            if key not in out:
                out[key] = [v * weight for v in value] if isinstance(value, list) else value * weight  # type: ignore[operator]
            elif isinstance(value, list):
                out[key] = [c + v * weight for c, v in zip(out[key], value, strict=True)]  # type: ignore[arg-type]
            else:
                out[key] = out[key] + value * weight  # type: ignore[operator]
    return MetricRecord(out)  # type: ignore[arg-type]
