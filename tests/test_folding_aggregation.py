"""The FedAvg family folds each reply into an exact sum as it arrives: same bits in any
order, the weighted mean to float64 precision, and no reply held once it is folded."""

from __future__ import annotations

import gc
import random
import weakref
from collections import OrderedDict

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from fedpeft.client.training import TrainConfig
from fedpeft.common.protocol.deltas import DeltaSpec
from fedpeft.common.protocol.flower_io import delta_from_arrayrecord, delta_to_arrayrecord
from fedpeft.common.protocol.plan import TRAIN_METRIC_KEYS
from fedpeft.server.robust import RobustSettings
from fedpeft.server.strategy import STRATEGIES, build_strategy

SPEC_DELTA = OrderedDict(a=torch.zeros(3, 5), b=torch.zeros(7))
NODES = tuple(range(1, 13))
NO_RELATIVE = RobustSettings(examples_ratio=0.0, norm_bound_ratio=0.0)


class Grid:
    def get_node_ids(self):
        return list(NODES)


def _strategy(name: str = "fedavg", **kwargs):
    strategy = build_strategy(name, spec=DeltaSpec.of_delta(SPEC_DELTA), max_delta_bytes=10_000,
                              min_train_nodes=len(NODES), min_available_nodes=len(NODES), fraction_evaluate=0.0,
                              **kwargs)
    list(strategy.configure_train(1, delta_to_arrayrecord(SPEC_DELTA), ConfigRecord(), Grid()))
    return strategy


def _reply(node: int, seed: int) -> Message:
    rng = np.random.default_rng(seed)
    delta = OrderedDict((k, torch.from_numpy((rng.standard_normal(tuple(v.shape)) * rng.uniform(0.5, 1.5))
                                             .astype(np.float32))) for k, v in SPEC_DELTA.items())
    metrics = {k: (int(rng.integers(100, 5_000)) if k == "num-examples" else 1 if k == "unit-weight"
                   else float(rng.random())) for k in TRAIN_METRIC_KEYS}
    request = Message(content=RecordDict({"config": ConfigRecord({"x": 1})}), dst_node_id=node, message_type="train")
    return Message(RecordDict({"arrays": delta_to_arrayrecord(delta), "metrics": MetricRecord(metrics)}),
                   reply_to=request)


def _replies(seed: int = 0) -> list[Message]:
    return [_reply(node, seed * 100 + node) for node in NODES]


@pytest.mark.parametrize("name, kwargs", [
    ("fedavg", {}), ("fedavg", {"robust": NO_RELATIVE}), ("fedprox", {}), ("fedadam", {}), ("fedavgm", {}),
    ("fedavg", {"clip_update_norm": 0.5}),
    ("fedavg", {"scaffold": TrainConfig(learning_rate=1e-2, local_steps=4)}),
])
def test_the_aggregate_is_the_same_bits_whatever_order_the_replies_arrive_in(flower_task_identity, name, kwargs):
    assert STRATEGIES[name].folds_replies
    results = []
    for order in range(4):
        replies = _replies()
        random.Random(order).shuffle(replies)
        strategy = _strategy(name, **kwargs)
        arrays, metrics = strategy.aggregate_train(1, iter(replies))  # a one-pass iterable, as the grid gives
        assert arrays is not None and strategy.traffic[1].accepted == len(NODES)
        control = dict(strategy.control.value) if strategy.control is not None else {}
        results.append((delta_from_arrayrecord(arrays), dict(metrics), control))
    for delta, metrics, control in results[1:]:
        assert all(torch.equal(delta[k], results[0][0][k]) for k in delta)
        assert metrics == results[0][1]
        assert all(torch.equal(control[k], results[0][2][k]) for k in control)


def test_the_fold_is_the_example_weighted_mean(flower_task_identity):
    replies = _replies(seed=3)
    expected = {k: sum(delta_from_arrayrecord(r.content["arrays"])[k].double() * r.content["metrics"]["num-examples"]
                       for r in replies) / sum(r.content["metrics"]["num-examples"] for r in replies)
                for k in SPEC_DELTA}
    arrays, _ = _strategy().aggregate_train(1, replies)
    got = delta_from_arrayrecord(arrays)
    for k, v in expected.items():
        assert got[k].dtype == torch.float32
        torch.testing.assert_close(got[k], v.float(), rtol=0, atol=0)  # the float32 rounding of the exact mean


def test_a_folded_reply_is_not_held(flower_task_identity):
    """Without relative bounds the strategy keeps no reference to a reply once it is folded."""
    strategy = _strategy(robust=NO_RELATIVE)
    alive: list[weakref.ref] = []

    def arriving():
        for i, node in enumerate(NODES):
            gc.collect()
            assert sum(ref() is not None for ref in alive) <= 1, f"reply {i}: earlier replies are still held"
            reply = _reply(node, node)
            alive.append(weakref.ref(reply))
            yield reply
            del reply

    arrays, _ = strategy.aggregate_train(1, arriving())
    assert arrays is not None and strategy.traffic[1].accepted == len(NODES)


def test_a_reply_that_cannot_be_folded_leaves_the_sum_as_if_it_never_came(flower_task_identity):
    replies = _replies(seed=5)
    clean, _ = _strategy().aggregate_train(1, replies)
    bad = _reply(99, 1)
    bad.content["arrays"] = delta_to_arrayrecord(OrderedDict(a=torch.full((3, 5), float("nan")), b=torch.zeros(7)))
    strategy = _strategy()
    arrays, _ = strategy.aggregate_train(1, [*replies[:6], bad, *replies[6:]])
    assert "a: 15 NaN and 0 Inf values" in strategy.traffic[1].rejected[0]
    assert all(torch.equal(delta_from_arrayrecord(arrays)[k], delta_from_arrayrecord(clean)[k]) for k in SPEC_DELTA)


def test_a_spec_with_integer_tensors_is_aggregated_by_flower(flower_task_identity):
    spec = OrderedDict(a=torch.zeros(2), steps=torch.zeros(1, dtype=torch.int64))
    strategy = build_strategy("fedavg", spec=DeltaSpec.of_delta(spec), max_delta_bytes=10_000, min_train_nodes=2,
                              min_available_nodes=2, fraction_evaluate=0.0)

    class TwoNodes:
        def get_node_ids(self):
            return [1, 2]

    list(strategy.configure_train(1, delta_to_arrayrecord(spec), ConfigRecord(), TwoNodes()))
    replies = []
    for node in (1, 2):
        request = Message(content=RecordDict({"config": ConfigRecord({"x": 1})}), dst_node_id=node,
                          message_type="train")
        metrics = {k: (10 if k == "num-examples" else 1 if k == "unit-weight" else 0.5) for k in TRAIN_METRIC_KEYS}
        delta = OrderedDict(a=torch.full((2,), float(node)), steps=torch.tensor([node], dtype=torch.int64))
        replies.append(Message(RecordDict({"arrays": delta_to_arrayrecord(delta), "metrics": MetricRecord(metrics)}),
                               reply_to=request))
    arrays, _ = strategy.aggregate_train(1, replies)
    assert delta_from_arrayrecord(arrays)["a"].tolist() == [1.5, 1.5]
