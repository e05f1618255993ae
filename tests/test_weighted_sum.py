"""The exact, order-independent weighted sum the coordinator folds replies into."""

from __future__ import annotations

from collections import OrderedDict
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedpeft.common.protocol.deltas import DeltaSpec
from fedpeft.server.weighted_sum import FRACTION_BITS, MAX_WEIGHT, ExactWeightedSum


def _spec() -> DeltaSpec:
    return DeltaSpec.of_delta(OrderedDict(a=torch.zeros(3, 2), b=torch.zeros(4)))


def _delta(values: list[float]) -> OrderedDict[str, torch.Tensor]:
    flat = torch.tensor(values, dtype=torch.float32)
    return OrderedDict(a=flat[:6].view(3, 2).clone(), b=flat[6:].clone())


def _fold(replies: list[tuple[OrderedDict[str, torch.Tensor], int]]) -> ExactWeightedSum:
    acc = ExactWeightedSum(_spec(), capacity=len(replies))
    for delta, weight in replies:
        assert acc.problem(delta, weight) is None
        acc.add(delta, weight)
    return acc


finite32 = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, width=32)
reply = st.tuples(st.lists(finite32, min_size=10, max_size=10), st.integers(1, 1_000_000))


@settings(max_examples=60, deadline=None)
@given(st.lists(reply, min_size=1, max_size=40), st.randoms(use_true_random=False))
def test_the_sum_is_the_same_bits_in_any_order_and_within_the_resolution_of_the_exact_sum(replies, rnd):
    deltas = [(_delta(values), weight) for values, weight in replies]
    forward = _fold(deltas).mean()
    shuffled = list(deltas)
    rnd.shuffle(shuffled)
    again = _fold(shuffled).mean()
    for name in forward:
        assert torch.equal(forward[name], again[name])
    # against the exact rational sum: each contribution loses < 2**-49 of a unit of w * x
    total_weight = sum(w for _, w in replies)
    flat = torch.cat([forward["a"].reshape(-1), forward["b"]])
    for j in range(10):
        exact = sum(Fraction(float(np.float32(values[j]))) * w for values, w in replies) / total_weight
        bound = Fraction(len(replies) + 1, 2**FRACTION_BITS) / total_weight + abs(exact) * Fraction(1, 2**52)
        assert abs(Fraction(float(flat[j])) - exact) <= bound


def test_many_folds_carry_the_fraction_exactly():
    rng = np.random.default_rng(0)
    replies = [(_delta(list(rng.standard_normal(10) * 1e-3)), int(rng.integers(1, 5000))) for _ in range(200)]
    acc = _fold(replies)
    expected = sum(torch.cat([d["a"].reshape(-1), d["b"]]).double() * w for d, w in replies) / sum(w for _, w in replies)
    got = torch.cat([acc.mean()["a"].reshape(-1), acc.mean()["b"]])
    assert torch.allclose(got, expected, rtol=1e-12, atol=1e-15)


def test_a_bad_reply_is_named_and_leaves_the_sum_untouched():
    acc = ExactWeightedSum(_spec(), capacity=4)
    good = _delta([0.5] * 10)
    assert acc.problem(good, 2) is None
    acc.add(good, 2)
    before = {k: v.clone() for k, v in acc.total().items()}
    assert acc.problem(_delta([float("nan")] + [0.0] * 9), 3) == "non-finite values"
    assert acc.problem(_delta([float("inf")] + [0.0] * 9), 3) == "non-finite values"
    assert "exceeds what an exact sum" in str(acc.problem(_delta([3e38] + [0.0] * 9), MAX_WEIGHT))
    assert "weight" in str(acc.problem(good, 0))
    assert all(torch.equal(before[k], v) for k, v in acc.total().items())
    assert acc.count == 1 and acc.total_weight == 2
    # add() of a delta that was never staged checks it first
    with pytest.raises(ValueError, match="non-finite"):
        acc.add(_delta([float("nan")] * 10), 1)
    assert acc.mean()["b"].tolist() == [0.5] * 4


def test_bfloat16_tensors_fold_too():
    spec = DeltaSpec.of_delta(OrderedDict(w=torch.zeros(4, dtype=torch.bfloat16)))
    acc = ExactWeightedSum(spec, capacity=2)
    for value, weight in ((1.5, 1), (-0.25, 3)):
        delta = OrderedDict(w=torch.full((4,), value, dtype=torch.bfloat16))
        assert acc.problem(delta, weight) is None
        acc.add(delta, weight)
    assert acc.mean()["w"].tolist() == [(1.5 - 0.75) / 4] * 4


def test_a_sum_takes_no_more_replies_than_it_was_sized_for():
    acc = ExactWeightedSum(_spec(), capacity=2)
    for _ in range(2):
        delta = _delta([1.0] * 10)
        assert acc.problem(delta, 1) is None
        acc.add(delta, 1)
    assert "more replies than the 2" in str(acc.problem(_delta([1.0] * 10), 1))
