"""The exact, order-independent weighted sum the coordinator folds replies into."""

from __future__ import annotations

import math
from collections import OrderedDict
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedpeft.common.protocol.deltas import DeltaSpec, TensorSpec
from fedpeft.server.weighted_sum import FRACTION_BITS, MAX_WEIGHT, ExactWeightedSum, _immutable


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


# Magnitudes that put replies on both paths: the fast int64 path takes max |w * x| < 2**13,
# the two-limb path the rest (and every float64 reply).
mixed32 = st.one_of(st.floats(min_value=-2.0**-30, max_value=2.0**-30, allow_nan=False, width=32),  # below the grid
                    st.floats(min_value=-2.0**-10, max_value=2.0**-10, allow_nan=False, width=32),
                    st.floats(min_value=-8.0, max_value=8.0, allow_nan=False, width=32),
                    st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, width=32))
mixed_reply = st.tuples(st.lists(mixed32, min_size=10, max_size=10), st.integers(1, 5000),
                        st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))


@settings(max_examples=80, deadline=None)
@given(st.lists(mixed_reply, min_size=1, max_size=60), st.randoms(use_true_random=False))
def test_the_fast_fold_gives_the_same_bits_as_the_two_limb_fold_in_any_order(replies, rnd):
    spec = DeltaSpec(OrderedDict(a=TensorSpec((3, 2), torch.float32), b=TensorSpec((4,), torch.float32)))
    deltas = [(OrderedDict((n, t.to(dtype)) for n, t in _delta(values).items()), weight)
              for values, weight, dtype in replies]
    reference = ExactWeightedSum(spec, capacity=len(deltas), fast=False)
    for delta, weight in deltas:
        assert reference.problem(delta, weight) is None
        reference.add(delta, weight)
    rnd.shuffle(deltas)
    fast = ExactWeightedSum(spec, capacity=len(deltas))
    for delta, weight in deltas:
        assert fast.problem(delta, weight) is None
        fast.add(delta, weight)
    for name, value in reference.total().items():
        assert torch.equal(fast.total()[name], value), name


def test_the_int64_sum_moves_into_the_limbs_before_it_could_overflow():
    spec = _spec()
    values = [8191.0, 8190.5, 4095.5, 1e-7, 3.0, 2.0**-20, 7.25, 0.5, 1.0, 8000.0]  # partial sums far above 2**63
    fast, reference = ExactWeightedSum(spec, capacity=300), ExactWeightedSum(spec, capacity=300, fast=False)
    moves = 0
    for i in range(300):
        delta = _delta([v * (1 + i % 7) / 7 for v in values])
        for acc in (fast, reference):
            assert acc.problem(delta, 1) is None
            acc.add(delta, 1)
        moves += fast._q_room == 0.0 or fast._q_room < fast.staged_peak * 2.0**FRACTION_BITS * 1.5
    assert fast._x.size and moves > 100  # every fold of ~2**13 x 2**49 forced a move
    for name, value in reference.total().items():
        assert torch.equal(fast.total()[name], value)


def test_the_fast_path_refuses_what_the_two_limb_path_refuses():
    for fast in (True, False):
        acc = ExactWeightedSum(_spec(), capacity=4, fast=fast)
        assert acc.problem(_delta([float("nan")] + [0.0] * 9), 3) == "non-finite values"
        assert acc.problem(_delta([0.0] * 9 + [float("-inf")]), 3) == "non-finite values"
        assert "exceeds what an exact sum" in str(acc.problem(_delta([3e38] * 10), 1))
        acc.bound_peak = 9.0
        assert acc.problem(_delta([0.5] * 9 + [-2.0]), 4) is None and acc.staged_peak == 8.0  # exact above the bound


def test_many_blocks_many_moves_same_bits_and_norms_as_the_two_limb_fold():
    # 2 blocks of the fast fold and a ragged third; |w x| up to ~2**12.5: the int64 sum moves
    like = OrderedDict(a=torch.zeros(256, 256), b=torch.zeros(7))
    spec = DeltaSpec.of_delta(like)
    rng = np.random.default_rng(3)
    sent = OrderedDict((k, torch.from_numpy(rng.standard_normal(tuple(v.shape)).astype(np.float32))) for k, v in like.items())
    replies = []
    for i in range(24):
        scale = 500.0 if i % 3 == 0 else 2.0 ** -float(rng.integers(0, 30))
        replies.append((OrderedDict((k, torch.from_numpy((rng.standard_normal(tuple(v.shape)) * scale).astype(np.float32)))
                                    for k, v in like.items()), int(rng.integers(1, 3))))
    fast, reference = ExactWeightedSum(spec, capacity=24), ExactWeightedSum(spec, capacity=24, fast=False)
    flat_sent = fast.flatten_sent(sent)
    assert flat_sent.dtype == np.float32  # (float32 sent tensors: half the bytes a check reads)
    moves, move = [], fast._move_q
    fast._move_q = lambda: (moves.append(fast._q_room), move())[1]  # type: ignore[method-assign]
    for order, acc in ((list(range(24)), reference), (list(rng.permutation(24)), fast)):
        for i in order:
            delta, weight = replies[i]
            assert acc.problem(delta, weight) is None
            norm = acc.staged_update_norm(flat_sent)  # (a pass of its own)
            assert acc.problem(delta, weight, flat_sent) is None  # (measured by the check's pass)
            assert acc.staged_update_norm(flat_sent) == norm
            exact = float(torch.linalg.vector_norm(fast.flatten(delta) - torch.from_numpy(flat_sent).double()))
            assert norm == pytest.approx(exact, rel=1e-6)
            acc.add(delta, weight)
    assert fast._t.size == 0 and sum(r > 0 for r in moves) >= 4  # every reply took the fast path; it moved
    for name, value in reference.total().items():
        assert torch.equal(fast.total()[name], value), name


def test_a_spec_without_parameters_folds_to_nothing():
    spec = DeltaSpec.of_delta(OrderedDict(a=torch.zeros(0)))
    acc = ExactWeightedSum(spec, capacity=2)
    delta = OrderedDict(a=torch.zeros(0))
    assert acc.problem(delta, 3) is None and acc.staged_update_norm(acc.flatten_sent(delta)) == 0.0
    acc.add(delta, 3)
    assert acc.mean()["a"].shape == (0,)


def test_kernels_compile_in_memory_where_no_cache_can_be_written(monkeypatch):
    import importlib.util

    import numba

    from fedpeft.server import fold_kernels

    real = numba.njit

    def njit(*args, cache=False, **kwargs):
        if cache:  # what numba raises at decoration when no cache directory is writable
            raise RuntimeError("cannot cache function 'fold_q': no locator available")
        return real(*args, **kwargs)

    monkeypatch.setattr(numba, "njit", njit)
    spec = importlib.util.spec_from_file_location("fold_kernels_uncached", fold_kernels.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    q = np.zeros(3, np.int64)
    module.fold_q(q, np.array([1.5, -1.5, 2.0], np.float32), 3.0)
    assert q.tolist() == [4, -4, 6] and module.peak_square(np.ones(2, np.float32).view(np.int32), np.ones(2, np.float32),
                                                              np.zeros(2))[1] == 2.0


def test_only_values_read_in_place_from_immutable_bytes_skip_the_second_check():
    from fedpeft.common.codecs.mod import flat_upload_record
    from fedpeft.server.compression import decode_flat_reply

    spec = _spec()
    delta = _delta([0.5] * 10)
    acc = ExactWeightedSum(spec, capacity=4)
    flat = decode_flat_reply(flat_upload_record(OrderedDict((k, v.numpy()) for k, v in delta.items())), spec, 10_000)
    assert acc.problem(flat, 2) is None and acc.checked() is not None  # views of the message's bytes
    assert acc.problem(delta, 2) is None and acc.checked() is None  # copied into the sum's scratch
    writable = np.full(10, 0.5, np.float32)
    readonly = writable.view()
    readonly.flags.writeable = False
    assert not _immutable(readonly) and not _immutable(writable)  # its memory can still change


@pytest.mark.parametrize("sent_dtype", [np.float32, np.float64])
def test_the_check_pass_finds_the_exact_peak_every_non_finite_value_and_the_update_square(sent_dtype):
    from fedpeft.server.fold_kernels import NON_FINITE_BITS, peak_bits, peak_square

    rng = np.random.default_rng(5)
    sizes = [0, 1, 7, 64, 1000, 4099]
    specials = [0.0, -0.0, 1e-45, -1e-45, 1e-38, -3.4e38, 3.4e38, 2.0 ** -149]
    for size in sizes:
        x = (rng.standard_normal(size) * 10.0 ** rng.integers(-30, 30)).astype(np.float32)
        if size:
            x[rng.integers(0, size)] = specials[size % len(specials)]
        sent = rng.standard_normal(size).astype(sent_dtype)
        bits, square = peak_square(x.view(np.int32), x, sent)
        assert bits == peak_bits(x.view(np.int32)) < NON_FINITE_BITS
        assert np.int32(bits).view(np.float32) == (np.abs(x).max() if size else 0.0)
        exact = float(np.sum((x.astype(np.float64) - sent.astype(np.float64)) ** 2))
        assert square == pytest.approx(exact, rel=1e-12)
        for bad in (np.nan, -np.nan, np.inf, -np.inf):
            if size:
                y = x.copy()
                y[rng.integers(0, size)] = bad
                assert peak_bits(y.view(np.int32)) >= NON_FINITE_BITS, (size, bad)
                assert peak_square(y.view(np.int32), y, sent)[0] >= NON_FINITE_BITS


def test_a_cached_update_norm_is_used_only_for_the_reply_and_broadcast_it_was_measured_with():
    spec = _spec()
    acc = ExactWeightedSum(spec, capacity=4)
    sent_a, sent_b = acc.flatten_sent(_delta([0.0] * 10)), acc.flatten_sent(_delta([1.0] * 10))
    assert acc.problem(_delta([2.0] * 10), 1, sent_a) is None
    assert acc.staged_update_norm(sent_a) == pytest.approx(math.sqrt(40.0))
    assert acc.staged_update_norm(sent_b) == pytest.approx(math.sqrt(10.0))  # another broadcast: measured again
    assert "weight" in str(acc.problem(_delta([3.0] * 10), 0, sent_a))
    with pytest.raises(ValueError, match="no delta is staged"):  # (never the previous reply's norm)
        acc.staged_update_norm(sent_a)
