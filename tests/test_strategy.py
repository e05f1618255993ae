"""PeftFedAvg: example-weighted averaging, and bad client replies left out of the round."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from fedpeft.common.deltas import DeltaSpec
from fedpeft.common.flower_io import delta_from_arrayrecord, delta_to_arrayrecord
from fedpeft.server.strategy import PeftFedAvg

SPEC_DELTA = OrderedDict(a=torch.zeros(2, 3), b=torch.zeros(4))


@pytest.fixture()
def strategy(flower_task_identity) -> PeftFedAvg:
    return PeftFedAvg(spec=DeltaSpec.of_delta(SPEC_DELTA), max_delta_bytes=10_000, min_train_nodes=1,
                      min_available_nodes=1, fraction_evaluate=0.0)


def _request(node: int) -> Message:
    return Message(content=RecordDict({"config": ConfigRecord({"x": 1})}), dst_node_id=node, message_type="train")


def _reply(node: int, arrays: ArrayRecord, examples=10) -> Message:
    return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": examples})}),
                   reply_to=_request(node))


def _delta(value: float) -> OrderedDict:
    return OrderedDict((k, torch.full_like(v, value)) for k, v in SPEC_DELTA.items())


def test_weighted_by_example_counts(strategy):
    replies = [_reply(1, delta_to_arrayrecord(_delta(1.0)), 10), _reply(2, delta_to_arrayrecord(_delta(4.0)), 30)]
    arrays, _ = strategy.aggregate_train(1, replies)
    merged = delta_from_arrayrecord(arrays)
    assert torch.allclose(merged["a"], torch.full((2, 3), 3.25))  # (1*10 + 4*30) / 40
    assert merged["a"].dtype == torch.float32
    assert strategy.traffic[1].accepted == 2


def _nan_delta():
    d = _delta(1.0)
    d["b"][0] = float("nan")
    return delta_to_arrayrecord(d)


def _wrong_shape():
    d = _delta(1.0)
    d["a"] = torch.ones(3, 2)
    return delta_to_arrayrecord(d)


def _tampered():
    record = delta_to_arrayrecord(_delta(1.0))
    array = record["a"]
    record["a"] = Array(dtype=array.dtype, shape=array.shape, stype=array.stype, data=array.data[:-7])
    return record


def _extra_tensor():
    record = delta_to_arrayrecord(_delta(1.0))
    record["base.weight"] = Array(np.ones(2, dtype=np.float32))
    return record


def _oversized():
    return ArrayRecord(OrderedDict(a=Array(np.ones((2, 3), np.float32)), b=Array(np.ones(4000, np.float32))))


@pytest.mark.parametrize(
    ("make_bad", "examples", "reason"),
    [(_nan_delta, 10, "NaN"), (_wrong_shape, 10, "shape"), (_tampered, 10, "cannot decode"),
     (_extra_tensor, 10, "unexpected tensor"), (_oversized, 10, "exceeds the limit"),
     (lambda: delta_to_arrayrecord(_delta(1.0)), 0, "positive number"),
     (lambda: delta_to_arrayrecord(_delta(1.0)), float("inf"), "positive number")],
    ids=["nan", "shape", "tampered", "extra", "oversized", "zero-weight", "inf-weight"],
)
def test_bad_reply_is_rejected_and_round_completes(strategy, make_bad, examples, reason):
    good = [_reply(1, delta_to_arrayrecord(_delta(1.0))), _reply(2, delta_to_arrayrecord(_delta(3.0)))]
    bad = _reply(9, make_bad(), examples)
    arrays, _ = strategy.aggregate_train(1, [good[0], bad, good[1]])
    merged = delta_from_arrayrecord(arrays)
    assert torch.allclose(merged["b"], torch.full((4,), 2.0))  # only the good clients
    traffic = strategy.traffic[1]
    assert traffic.accepted == 2 and len(traffic.rejected) == 1
    assert "node 9" in traffic.rejected[0] and reason in traffic.rejected[0]


def test_error_replies_and_no_valid_update_keep_the_global(strategy):
    failed = Message(Error(code=1, reason="client crashed"), reply_to=_request(4))
    arrays, _ = strategy.aggregate_train(2, [failed, _reply(5, _nan_delta())])
    assert arrays is None  # Flower's start() keeps the previous global adapter
    assert strategy.traffic[2].failed == 1 and len(strategy.traffic[2].rejected) == 1
