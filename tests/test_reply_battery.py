"""A property-based battery over the coordinator's untrusted entry point: client replies.

Three honest replies and one mutated reply (metrics of any type and value, tensors of any
shape, dtype and value, `.npy` bytes truncated, extended or flipped, tensors missing or
extra) go through every strategy. Whatever the mutation, the round either accepts the
reply (and the aggregate is finite and within the value bound) or rejects it with a
reason and aggregates exactly what the three honest replies alone give. No other
exception type, no non-finite or wrong aggregate.

The CI run is bounded; a longer run: `FEDPEFT_BATTERY_EXAMPLES=2000 pytest tests/test_reply_battery.py`.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedpeft.common.protocol.deltas import DeltaSpec
from fedpeft.common.protocol.flower_io import delta_from_arrayrecord, delta_to_arrayrecord
from fedpeft.common.protocol.plan import TRAIN_METRIC_KEYS
from fedpeft.server.robust import RobustSettings
from fedpeft.server.strategy import STRATEGIES, build_strategy

EXAMPLES = int(os.environ.get("FEDPEFT_BATTERY_EXAMPLES", "25"))
SPEC_DELTA = OrderedDict(a=torch.zeros(2, 3), b=torch.zeros(4))
NODES = (1, 2, 3, 4)
ROBUST = RobustSettings()
_OPTIONS = {"krum": {"num_malicious_nodes": "0"}, "multikrum": {"num_malicious_nodes": "0", "num_nodes_to_select": "2"}}


class Grid:
    def get_node_ids(self):
        return list(NODES)


def _metrics(**changed) -> dict:
    values = {k: (10 if k == "num-examples" else 1 if k == "unit-weight" else 0.5) for k in TRAIN_METRIC_KEYS}
    return {**values, **changed}


def _request(node: int) -> Message:
    return Message(content=RecordDict({"config": ConfigRecord({"x": 1})}), dst_node_id=node, message_type="train")


def _honest() -> list[Message]:
    return [Message(RecordDict({"arrays": delta_to_arrayrecord(OrderedDict(
        (k, torch.full_like(v, 1.0 + 0.1 * n)) for k, v in SPEC_DELTA.items())), "metrics": MetricRecord(_metrics())}),
        reply_to=_request(n)) for n in NODES[:3]]


def _strategy(name: str):
    strategy = build_strategy(name, spec=DeltaSpec.of_delta(SPEC_DELTA), max_delta_bytes=10_000,
                              options=_OPTIONS.get(name), min_train_nodes=4, min_available_nodes=4,
                              fraction_evaluate=0.0, robust=ROBUST)
    list(strategy.configure_train(1, delta_to_arrayrecord(OrderedDict((k, torch.zeros_like(v))
                                                                      for k, v in SPEC_DELTA.items())),
                                  ConfigRecord(), Grid()))
    return strategy


# ---- mutations -------------------------------------------------------------------------------
numbers = st.one_of(st.integers(min_value=-(2**63), max_value=2**63 - 1),
                    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0, 1, 10, 9e307, 2**31]))
metric_values = st.one_of(numbers, st.lists(st.floats(allow_nan=True), max_size=3), st.lists(st.integers(), max_size=3))


@st.composite
def mutated_metrics(draw) -> MetricRecord:
    values = _metrics()
    for key in draw(st.lists(st.sampled_from(sorted(TRAIN_METRIC_KEYS)), max_size=3, unique=True)):
        values[key] = draw(metric_values)
    if draw(st.booleans()) and draw(st.booleans()):
        values.pop(draw(st.sampled_from(sorted(values))))
    if draw(st.booleans()) and draw(st.booleans()):
        values[draw(st.text(min_size=1, max_size=8))] = draw(numbers)
    return MetricRecord(values)


tensor_values = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32),
                          st.sampled_from([3.4e38, -3.4e38, 1e5, 1e-45, 0.0]))


@st.composite
def mutated_arrays(draw) -> ArrayRecord:
    delta = OrderedDict((k, torch.full_like(v, 1.0)) for k, v in SPEC_DELTA.items())
    name = draw(st.sampled_from(sorted(delta)))
    kind = draw(st.sampled_from(["values", "shape", "dtype", "bytes", "header", "names", "none"]))
    if kind == "values":
        flat = delta[name].flatten()
        for _ in range(draw(st.integers(1, 3))):
            flat[draw(st.integers(0, flat.numel() - 1))] = draw(tensor_values)
        delta[name] = flat.reshape(delta[name].shape)
    elif kind == "shape":
        delta[name] = torch.ones(draw(st.lists(st.integers(0, 5), min_size=0, max_size=3)))
    elif kind == "dtype":
        delta[name] = delta[name].to(draw(st.sampled_from([torch.float16, torch.float64, torch.int32, torch.bool,
                                                            torch.bfloat16, torch.int8])))
    elif kind == "names":
        if draw(st.booleans()):
            del delta[name]
        else:
            delta[draw(st.text(min_size=1, max_size=12))] = torch.ones(2)
    record = delta_to_arrayrecord(delta) if not any(t.dtype == torch.bfloat16 for t in delta.values()) else \
        ArrayRecord(OrderedDict((k, Array(v.float().numpy().astype(np.float16))) for k, v in delta.items()))
    if kind == "bytes":
        array = record[name]
        data = bytearray(array.data)
        action = draw(st.sampled_from(["flip", "truncate", "extend"]))
        if action == "flip":
            position = draw(st.integers(0, len(data) - 1))
            data[position] ^= 1 << draw(st.integers(0, 7))
        elif action == "truncate":
            data = data[:draw(st.integers(0, len(data) - 1))]
        else:
            data += draw(st.binary(min_size=1, max_size=16))
        record[name] = Array(dtype=array.dtype, shape=array.shape, stype=array.stype, data=bytes(data))
    if kind == "header":  # a rewritten .npy header (same length), declared or not in the record
        array = record[name]
        shape = draw(st.lists(st.integers(-4, 12), min_size=0, max_size=3))
        header = f"{{'descr': '<f4', 'fortran_order': {draw(st.booleans())}, 'shape': {tuple(shape)}, }}"
        end = array.data.index(b"\n") + 1
        old_header = array.data[10:end].decode("latin1")
        if len(header) < len(old_header):
            data = array.data[:10] + (header.ljust(len(old_header) - 1) + "\n").encode("latin1") + array.data[end:]
            declared = draw(st.booleans())
            record[name] = Array(dtype=array.dtype if declared else "", shape=array.shape if declared else (),
                                 stype=array.stype, data=data)
    return record


def _honest_only(name: str) -> ArrayRecord:
    arrays, _ = _strategy(name).aggregate_train(1, _honest())
    return arrays


@pytest.mark.parametrize("name", sorted(STRATEGIES))
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(metrics=mutated_metrics(), arrays=mutated_arrays())
def test_a_mutated_reply_is_accepted_correctly_or_rejected_alone(flower_task_identity, name, metrics, arrays):
    strategy = _strategy(name)
    bad = Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=_request(NODES[3]))
    merged_record, _ = strategy.aggregate_train(1, [*_honest(), bad])  # any exception fails the test
    traffic = strategy.traffic[1]
    assert traffic.accepted + len(traffic.rejected) == 4
    assert merged_record is not None
    merged = delta_from_arrayrecord(merged_record)
    assert all(bool(torch.isfinite(t).all()) for t in merged.values())
    assert all(float(t.abs().max()) <= ROBUST.max_abs_value for t in merged.values())
    if traffic.rejected:
        assert traffic.accepted == 3 and traffic.rejected[0].startswith("node 4: ")
        expected = delta_from_arrayrecord(_honest_only(name))
        for key, tensor in expected.items():
            assert torch.equal(merged[key], tensor), f"{key}: a rejected reply changed the aggregate"
    else:  # accepted: it must have been a valid reply
        assert all(isinstance(v, int | float) and math.isfinite(v) for v in metrics.values())
