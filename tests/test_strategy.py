"""Validated Flower strategies: exact weighted averaging, bad replies left out of the round."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from fedpeft.common.errors import ConfigError, FederationError
from fedpeft.common.protocol.deltas import DeltaSpec
from fedpeft.common.protocol.flower_io import delta_from_arrayrecord, delta_to_arrayrecord
from fedpeft.common.protocol.plan import TRAIN_METRIC_KEYS
from fedpeft.server.robust import UNBOUNDED
from fedpeft.server.strategy import STRATEGIES, build_strategy, strategy_options

SPEC_DELTA = OrderedDict(a=torch.zeros(2, 3), b=torch.zeros(4))


def _build(name="fedavg", options=None, **kwargs):
    return build_strategy(name, spec=DeltaSpec.of_delta(SPEC_DELTA), max_delta_bytes=10_000, options=options,
                          min_train_nodes=1, min_available_nodes=1, fraction_evaluate=0.0, **kwargs)


@pytest.fixture()
def strategy(flower_task_identity):
    return _build()


def _request(node: int) -> Message:
    return Message(content=RecordDict({"config": ConfigRecord({"x": 1})}), dst_node_id=node, message_type="train")


def _metrics(examples) -> MetricRecord:
    return MetricRecord({k: (examples if k == "num-examples" else 1 if k == "unit-weight" else 0.5) for k in TRAIN_METRIC_KEYS})


def _reply(node: int, arrays: ArrayRecord, examples=10, metrics=None) -> Message:
    return Message(RecordDict({"arrays": arrays, "metrics": metrics or _metrics(examples)}), reply_to=_request(node))


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
    [(_nan_delta, 10, "NaN"), (_wrong_shape, 10, "shape"), (_tampered, 10, "data bytes"),
     (_extra_tensor, 10, "unexpected tensor"), (_oversized, 10, "exceeds the limit"),
     (lambda: delta_to_arrayrecord(_delta(1.0)), 0, "must be an integer in [1, "),
     (lambda: delta_to_arrayrecord(_delta(1.0)), float("inf"), "must be finite")],
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


def _string_array():
    record = delta_to_arrayrecord(_delta(1.0))
    record["a"] = Array(np.array([["x"] * 3] * 2))
    return record


def _big_endian():
    record = delta_to_arrayrecord(_delta(1.0))
    record["a"] = Array(np.ones((2, 3), dtype=">f4"))
    return record


@pytest.mark.parametrize(("make_bad", "reason"), [(_string_array, "not a numeric array"), (_big_endian, "byte order")])
def test_undecodable_arrays_are_rejected_not_crashing(strategy, make_bad, reason):
    arrays, _ = strategy.aggregate_train(1, [_reply(1, delta_to_arrayrecord(_delta(2.0))), _reply(2, make_bad())])
    assert torch.allclose(delta_from_arrayrecord(arrays)["a"], torch.full((2, 3), 2.0))
    assert reason in strategy.traffic[1].rejected[0]


def test_replies_flower_would_find_inconsistent_are_rejected_alone(strategy):
    good = _reply(1, delta_to_arrayrecord(_delta(2.0)))
    extra_metric = _metrics(10)
    extra_metric["secret"] = 1.0
    renamed = Message(RecordDict({"weights": delta_to_arrayrecord(_delta(1.0)), "metrics": _metrics(10)}),
                      reply_to=_request(3))
    arrays, _ = strategy.aggregate_train(1, [good, _reply(2, delta_to_arrayrecord(_delta(1.0)), metrics=extra_metric),
                                             renamed])
    assert torch.allclose(delta_from_arrayrecord(arrays)["b"], torch.full((4,), 2.0))
    assert len(strategy.traffic[1].rejected) == 2


def test_a_round_without_accepted_updates_stops_the_run(strategy):
    failed = Message(Error(code=1, reason="client crashed"), reply_to=_request(4))
    with pytest.raises(FederationError, match="round 2: only 0 client update"):
        strategy.aggregate_train(2, [failed, _reply(5, _nan_delta())])
    assert strategy.traffic[2].failed == 1 and len(strategy.traffic[2].rejected) == 1


def test_min_accepted_is_enforced(flower_task_identity):
    strategy = _build(min_accepted=2)
    with pytest.raises(FederationError, match="need 2"):
        strategy.aggregate_train(1, [_reply(1, delta_to_arrayrecord(_delta(1.0))), _reply(2, _nan_delta())])


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_flower_strategy_aggregates_validated_deltas(flower_task_identity, name):
    """Each strategy runs one real configure/aggregate cycle on validated replies."""
    strategy = _build(name, robust=UNBOUNDED)  # the outlier must reach the aggregation
    initial = delta_to_arrayrecord(_delta(0.0))

    class OneNodeGrid:
        def get_node_ids(self):
            return [1, 2, 3]

    messages = list(strategy.configure_train(1, initial, ConfigRecord(), OneNodeGrid()))
    assert len(messages) == 3
    replies = [_reply(n, delta_to_arrayrecord(_delta(v)), examples=10) for n, v in [(1, 1.0), (2, 2.0), (3, 100.0)]]
    arrays, _ = strategy.aggregate_train(1, replies)
    merged = delta_from_arrayrecord(arrays)
    assert set(merged) == set(SPEC_DELTA) and all(torch.isfinite(t).all() for t in merged.values())
    if name == "fedmedian":
        assert torch.allclose(merged["a"], torch.full((2, 3), 2.0))  # the outlier does not move the median
    if name == "fedavg":
        assert torch.allclose(merged["a"], torch.full((2, 3), 103.0 / 3))


def test_fedprox_sends_its_proximal_term(flower_task_identity):
    strategy = _build("fedprox", {"proximal_mu": "0.1"})

    class Grid:
        def get_node_ids(self):
            return [7]

    (message,) = strategy.configure_train(1, delta_to_arrayrecord(_delta(0.0)), ConfigRecord(), Grid())
    assert message.content["config"]["proximal-mu"] == pytest.approx(0.1)


def test_strategy_names_and_options_are_validated(flower_task_identity):
    with pytest.raises(ConfigError, match="supported strategies: fedadagrad"):
        _build("fedsgd")
    with pytest.raises(ConfigError, match="unknown option"):
        _build("fedadam", {"lr": "0.1"})
    with pytest.raises(ConfigError, match="not a number"):
        _build("fedprox", {"proximal_mu": "big"})
    with pytest.raises(ConfigError, match="beta"):
        _build("fedtrimmedavg", {"beta": "0.7"})
    assert "eta" in strategy_options("fedadam") and "fraction_train" not in strategy_options("fedadam")


def test_svd_lora_strategy_aggregates_in_delta_w_space(flower_task_identity):
    from fedpeft.server.lora_aggregation import aggregate_lora_svd

    a, b = "m.lora_A.default.weight", "m.lora_B.default.weight"
    gen = torch.Generator().manual_seed(0)
    deltas = [OrderedDict([(a, torch.randn(2, 5, generator=gen)), (b, torch.randn(4, 2, generator=gen))]) for _ in range(3)]
    strategy = build_strategy("fedavg", spec=DeltaSpec.of_delta(deltas[0]), max_delta_bytes=10_000,
                              lora_svd_scaling=8.0, min_train_nodes=1, min_available_nodes=1, fraction_evaluate=0.0)
    replies = [_reply(i + 1, delta_to_arrayrecord(d), examples=10 * (i + 1)) for i, d in enumerate(deltas)]
    arrays, metrics = strategy.aggregate_train(1, replies)
    expected, report = aggregate_lora_svd(deltas, [10, 20, 30], 8.0)
    merged = delta_from_arrayrecord(arrays)
    torch.testing.assert_close(merged[b] @ merged[a], expected[b] @ expected[a])
    assert strategy.refactor_errors[1] == pytest.approx(report.max_relative_error)
    assert "train-loss" in metrics


def test_svd_lora_strategy_gives_the_same_bits_whatever_the_arrival_order_and_wire_form(flower_task_identity, monkeypatch):
    from fedpeft.common.codecs.mod import flat_upload_record
    from fedpeft.server.strategy import LoraSvdFedAvg

    aggregate = LoraSvdFedAvg.aggregate_deltas

    a, b = "m.lora_A.default.weight", "m.lora_B.default.weight"
    gen = torch.Generator().manual_seed(1)
    deltas = [OrderedDict([(a, torch.randn(4, 24, generator=gen)), (b, torch.randn(24, 4, generator=gen)),
                           ("m.magnitude", torch.randn(24, generator=gen))]) for _ in range(9)]

    def run(order, flat):
        strategy = build_strategy("fedavg", spec=DeltaSpec.of_delta(deltas[0]), max_delta_bytes=10_000,
                                  lora_svd_scaling=2.0, min_train_nodes=1, min_available_nodes=1, fraction_evaluate=0.0)
        record = (lambda d: flat_upload_record(OrderedDict((k, v.numpy()) for k, v in d.items()))) if flat else \
            delta_to_arrayrecord
        seen = []

        def recording(self, server_round, got, replies):  # the order the math sees
            seen.extend(int(m.content["metrics"]["num-examples"]) for m in replies)
            return aggregate(self, server_round, got, replies)

        monkeypatch.setattr(LoraSvdFedAvg, "aggregate_deltas", recording)
        arrays, _ = strategy.aggregate_train(1, [_reply(i + 1, record(deltas[i]), examples=7 * (i + 1)) for i in order])
        assert strategy.traffic[1].accepted == 9
        return delta_from_arrayrecord(arrays), seen

    first, first_order = run(list(range(9)), flat=False)
    assert first_order != sorted(first_order)  # (a content order, not the arrival order)
    for order, flat in (([8, 4, 2, 0, 6, 3, 7, 1, 5], False), ([3, 1, 7, 4, 0, 8, 2, 6, 5], True)):
        got, seen = run(order, flat)
        assert seen == first_order and all(torch.equal(got[k], first[k]) for k in first)


def test_svd_lora_aggregation_needs_fedavg(flower_task_identity):
    with pytest.raises(ConfigError, match="use it with strategy 'fedavg'"):
        _build("fedprox", lora_svd_scaling=2.0)


def _poisoned_round(name: str, clip: float, robust=UNBOUNDED, **options):
    """Four honest clients near 1.0 and one sending a 100x scaled delta (by default with the
    reply bounds off, to see what the aggregation alone does)."""
    strategy = _build(name, options or None, clip_update_norm=clip, robust=robust)

    class Grid:
        def get_node_ids(self):
            return [1, 2, 3, 4, 5]

    list(strategy.configure_train(1, delta_to_arrayrecord(_delta(0.0)), ConfigRecord(), Grid()))
    honest = [_reply(n, delta_to_arrayrecord(_delta(1.0 + 0.01 * n))) for n in range(1, 5)]
    poisoned = _reply(5, delta_to_arrayrecord(_delta(100.0)))
    arrays, _ = strategy.aggregate_train(1, [*honest, poisoned])
    merged = delta_from_arrayrecord(arrays)
    return strategy, float(torch.cat([t.flatten() for t in merged.values()]).abs().max())


def test_one_poisoned_client_dominates_plain_fedavg():
    _, worst = _poisoned_round("fedavg", clip=0.0)
    assert worst > 20  # (4 * ~1 + 100) / 5


@pytest.mark.parametrize(("name", "clip", "options", "bound"),
                         [("fedavg", 3.5, {}, 1.2), ("fedmedian", 0.0, {}, 1.05),
                          ("fedtrimmedavg", 0.0, {"beta": "0.2"}, 1.05)])
def test_clipping_or_a_robust_aggregator_bounds_one_poisoned_client(flower_task_identity, name, clip, options, bound):
    strategy, worst = _poisoned_round(name, clip, **options)
    assert worst < bound
    if clip:
        assert strategy.traffic[1].clipped == 1  # only the poisoned update was long enough to clip


def test_clip_norm_is_validated(flower_task_identity):
    with pytest.raises(ConfigError, match="clip_update_norm"):
        _build(clip_update_norm=-1.0)
