"""The fast train-metric mean is Flower's `aggregate_metricrecords`, bit for bit."""

import numpy as np
from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from fedpeft.server.metric_mean import weighted_metric_mean


def test_the_same_bits_as_flowers_aggregate_metricrecords():
    rng = np.random.default_rng(0)
    for clients in (1, 2, 7, 300):
        records = []
        for _ in range(clients):
            values = {"num-examples": int(rng.integers(1, 10**6)), "loss": float(rng.standard_normal() * 1e3),
                      "seconds": float(rng.random()), "count": int(rng.integers(0, 50)),
                      "curve": [float(v) for v in rng.standard_normal(3)]}
            records.append(MetricRecord(values))
        ours = weighted_metric_mean(records, "num-examples")
        flowers = aggregate_metricrecords([RecordDict({"metrics": r}) for r in records], "num-examples")
        assert list(ours.keys()) == list(flowers.keys()) == ["loss", "seconds", "count", "curve"]
        for key in flowers:
            assert ours[key] == flowers[key] and type(ours[key]) is type(flowers[key]), key
    # A float weight key, and keys that only some replies carry, as Flower takes them.
    records = [MetricRecord({"w": 2.5, "a": 1.0}), MetricRecord({"w": 0.5, "b": 3.0, "a": 0.1})]
    ours = weighted_metric_mean(records, "w")
    flowers = aggregate_metricrecords([RecordDict({"m": r}) for r in records], "w")
    assert dict(ours.items()) == dict(flowers.items()) and list(ours.keys()) == list(flowers.keys())
