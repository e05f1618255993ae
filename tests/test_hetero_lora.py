"""Heterogeneous-rank LoRA math (HetLoRA, FlexLoRA), checked against its definition and peft.

Property tests (hypothesis) over random non-square shapes (out != in, so a transpose
fails on shape or value), mixed ranks, alpha, rsLoRA and example weights:
- lifting/restricting a delta between ranks keeps each module's ΔW = s(r)·B·A;
- FlexLoRA's global reproduces the weighted mean of the clients' ΔW_k = s(r_k)·B_k·A_k
  whenever that mean fits in the global rank, and each rank's restriction is the best
  rank-r approximation, with exactly the error it reports;
- HetLoRA averages the zero-padded factors after moving each client's scale into B.
"""

from __future__ import annotations

from collections import OrderedDict
from functools import partial

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedpeft.common.errors import DeltaError
from fedpeft.common.methods import make_config
from fedpeft.common.methods.lora import lora_scaling
from fedpeft.common.model.adapted import AdaptedModel
from fedpeft.common.protocol.deltas import DeltaSpec
from fedpeft.server.hetero_lora import (
    aggregate_flexlora,
    aggregate_hetlora,
    delta_rank,
    lift,
    restrict,
    spec_at_rank,
)
from fedpeft.server.lora_aggregation import lora_pairs

A, B = "m.q_proj.lora_A.default.weight", "m.q_proj.lora_B.default.weight"
A2, B2 = "m.v_proj.lora_A.default.weight", "m.v_proj.lora_B.default.weight"
HEAD = "m.score.weight"


def _client(gen: torch.Generator, rank: int, out_f: int, in_f: int, basis: torch.Tensor | None = None) -> OrderedDict:
    """A two-module delta at `rank`; with `basis` (R x in) its A rows lie in that row space."""
    def a_of(in_features: int, base: torch.Tensor | None) -> torch.Tensor:
        if base is None:
            return torch.randn(rank, in_features, generator=gen, dtype=torch.float64)
        return torch.randn(rank, base.shape[0], generator=gen, dtype=torch.float64) @ base

    return OrderedDict([
        (A, a_of(in_f, basis)), (B, torch.randn(out_f, rank, generator=gen, dtype=torch.float64)),
        (A2, a_of(in_f, basis)), (B2, torch.randn(out_f + 1, rank, generator=gen, dtype=torch.float64)),
        (HEAD, torch.randn(3, in_f, generator=gen, dtype=torch.float64)),
    ])


def _delta_w(delta, a_name, b_name, scaling) -> torch.Tensor:
    """ΔW of one module, written out from the definition: s(r)·B·A with r = A's rows."""
    return scaling(delta[a_name].shape[0]) * (delta[b_name] @ delta[a_name])


def _exact_mean(clients, weights, a_name, b_name, scaling) -> torch.Tensor:
    total = sum(weights)
    return sum((w / total) * _delta_w(c, a_name, b_name, scaling) for c, w in zip(clients, weights, strict=True))


shapes = st.tuples(st.integers(2, 9), st.integers(2, 9)).filter(lambda t: t[0] != t[1])  # out, in: never square
ranks_st = st.lists(st.integers(1, 6), min_size=1, max_size=4)
scalings = st.builds(lambda alpha, rs: partial(lora_scaling, alpha, use_rslora=rs),
                     st.sampled_from([1.0, 8.0, 16.0, 32.0]), st.booleans())


@settings(max_examples=60, deadline=None)
@given(shape=shapes, ranks=st.tuples(st.integers(1, 6), st.integers(0, 4)), scaling=scalings, seed=st.integers(0, 10_000))
def test_lift_and_restrict_keep_every_modules_delta_w(shape, ranks, scaling, seed):
    out_f, in_f = shape
    low, extra = ranks
    high = low + extra
    gen = torch.Generator().manual_seed(seed)
    delta = _client(gen, low, out_f, in_f)
    lifted = lift(delta, high, scaling)
    assert lifted[A].shape == (high, in_f) and lifted[B].shape == (out_f, high)
    for a_name, b_name in [(A, B), (A2, B2)]:
        torch.testing.assert_close(_delta_w(lifted, a_name, b_name, scaling), _delta_w(delta, a_name, b_name, scaling),
                                   rtol=1e-12, atol=1e-12)
    back = restrict(lifted, low, scaling)
    for name in delta:
        torch.testing.assert_close(back[name], delta[name], rtol=1e-12, atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(shape=shapes, ranks=ranks_st, scaling=scalings, seed=st.integers(0, 10_000),
       weights_seed=st.integers(0, 10_000))
def test_flexlora_reproduces_the_weighted_mean_update_when_it_fits_the_global_rank(shape, ranks, scaling, seed,
                                                                                    weights_seed):
    out_f, in_f = shape
    top = max(ranks)
    gen = torch.Generator().manual_seed(seed)
    basis = torch.randn(min(top, in_f), in_f, generator=gen, dtype=torch.float64)  # mean ΔW has rank <= top
    clients = [_client(gen, r, out_f, in_f, basis) for r in ranks]
    weights = (torch.rand(len(ranks), generator=torch.Generator().manual_seed(weights_seed), dtype=torch.float64)
               * 99 + 1).tolist()
    merged, report = aggregate_flexlora(clients, weights, top, scaling, ranks)
    for a_name, b_name in [(A, B), (A2, B2)]:
        got = _delta_w(merged, a_name, b_name, scaling)
        expected = _exact_mean(clients, weights, a_name, b_name, scaling)
        assert got.shape == expected.shape == (clients[0][b_name].shape[0], in_f)
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
    assert report.max_relative_error[top] < 1e-9
    assert set(report.max_relative_error) == set(ranks)
    total = sum(weights)
    torch.testing.assert_close(merged[HEAD], sum((w / total) * c[HEAD] for c, w in zip(clients, weights, strict=True)))


@settings(max_examples=50, deadline=None)
@given(shape=shapes, ranks=st.lists(st.integers(1, 4), min_size=2, max_size=4), scaling=scalings,
       seed=st.integers(0, 10_000))
def test_flexlora_sends_each_rank_its_best_approximation_and_reports_the_actual_error(shape, ranks, scaling, seed):
    out_f, in_f = shape
    gen = torch.Generator().manual_seed(seed)
    clients = [_client(gen, r, out_f, in_f) for r in ranks]  # the mean's rank usually exceeds every r
    weights = [float(i + 1) for i in range(len(ranks))]
    top = max(ranks)
    merged, report = aggregate_flexlora(clients, weights, top, scaling, ranks)
    for r in set(ranks):
        sent = restrict(merged, r, scaling)  # exactly what a rank-r client is sent
        assert delta_rank(sent) == r
        worst = 0.0
        for a_name, b_name in [(A, B), (A2, B2)]:
            exact = _exact_mean(clients, weights, a_name, b_name, scaling)
            error = float(torch.linalg.matrix_norm(_delta_w(sent, a_name, b_name, scaling) - exact))
            tail = float(torch.sqrt((torch.linalg.svdvals(exact)[r:] ** 2).sum()))  # Eckart–Young optimum
            assert error == pytest.approx(tail, rel=1e-7, abs=1e-9)
            worst = max(worst, error / float(torch.linalg.matrix_norm(exact)))
        assert report.max_relative_error[r] == pytest.approx(worst, rel=1e-9, abs=1e-12)


@settings(max_examples=50, deadline=None)
@given(shape=shapes, ranks=ranks_st, scaling=scalings, seed=st.integers(0, 10_000))
def test_hetlora_averages_zero_padded_factors_with_each_clients_scale_in_b(shape, ranks, scaling, seed):
    out_f, in_f = shape
    top = max(ranks)
    gen = torch.Generator().manual_seed(seed)
    clients = [_client(gen, r, out_f, in_f) for r in ranks]
    weights = [float(2 * i + 1) for i in range(len(ranks))]
    total = sum(weights)
    merged = aggregate_hetlora(clients, weights, top, scaling)
    for a_name, b_name in [(A, B), (A2, B2)]:
        # the definition, written out: pad A with zero rows, B with zero columns after B·s(r_k)/s(top)
        a_ref = sum((w / total) * torch.cat([c[a_name], torch.zeros(top - c[a_name].shape[0], in_f, dtype=torch.float64)])
                    for c, w in zip(clients, weights, strict=True))
        b_ref = sum((w / total) * torch.cat([c[b_name] * scaling(c[a_name].shape[0]) / scaling(top),
                                             torch.zeros(c[b_name].shape[0], top - c[a_name].shape[0],
                                                         dtype=torch.float64)], dim=1)
                    for c, w in zip(clients, weights, strict=True))
        torch.testing.assert_close(merged[a_name], a_ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(merged[b_name], b_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("aggregate", ["hetlora", "flexlora"])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_a_lone_lower_rank_client_gets_its_own_update_back(aggregate, use_rslora):
    """Mixed-rank scaling end to end: with one client, global and downlink keep its ΔW."""
    scaling = partial(lora_scaling, 16.0, use_rslora=use_rslora)
    client = _client(torch.Generator().manual_seed(3), 2, 7, 5)
    if aggregate == "hetlora":
        merged = aggregate_hetlora([client], [5.0], 8, scaling)
    else:
        merged, _ = aggregate_flexlora([client], [5.0], 8, scaling, [2])
    back = restrict(merged, 2, scaling)
    for a_name, b_name in [(A, B), (A2, B2)]:
        torch.testing.assert_close(_delta_w(merged, a_name, b_name, scaling), _delta_w(client, a_name, b_name, scaling))
        torch.testing.assert_close(_delta_w(back, a_name, b_name, scaling), _delta_w(client, a_name, b_name, scaling))
    # padding without moving the scale into B would change the update by s(8)/s(2) != 1
    naive = scaling(8) * (torch.cat([client[B], torch.zeros(7, 6, dtype=torch.float64)], dim=1)
                          @ torch.cat([client[A], torch.zeros(6, 5, dtype=torch.float64)]))
    assert not torch.allclose(naive, _delta_w(client, A, B, scaling))


@pytest.mark.parametrize("use_rslora", [False, True])
def test_lifted_delta_loaded_into_peft_gives_peft_the_same_update(tiny_model_dir, use_rslora):
    """Against peft itself: a rank-2 client's delta, lifted to rank 8 and loaded into a
    rank-8 peft model, makes peft's own ΔW equal the rank-2 model's; restricting a rank-8
    delta and loading it into a rank-2 model keeps peft's ΔW of the first 2 components."""
    def model(r: int) -> AdaptedModel:
        options = {"r": str(r), "alpha": "16", "target_modules": "q_proj,o_proj", "use_rslora": str(use_rslora)}
        return AdaptedModel.load(tiny_model_dir, "none", "lora", make_config("lora", options))

    small, big = model(2), model(8)
    scaling = partial(lora_scaling, 16, use_rslora=use_rslora)
    gen = torch.Generator().manual_seed(0)
    delta = OrderedDict((k, torch.randn(v.shape, generator=gen)) for k, v in small.get_delta().items())
    small.set_delta(delta)
    big.set_delta(lift(delta, 8, scaling))  # set_delta validates the rank-8 spec
    pairs = lora_pairs(list(delta))
    assert len(pairs) >= 2
    for a_name, _ in pairs:
        module = a_name.split(".lora_A.")[0]
        small_w = small.model.get_submodule(module).get_delta_weight("default")
        big_w = big.model.get_submodule(module).get_delta_weight("default")
        assert small_w.shape == small.model.get_submodule(module).base_layer.weight.shape
        torch.testing.assert_close(big_w, small_w)
    wide = OrderedDict((k, torch.randn(v.shape, generator=gen)) for k, v in big.get_delta().items())
    big.set_delta(wide)
    small.set_delta(restrict(wide, 2, scaling))
    for a_name, b_name in pairs:
        module = a_name.split(".lora_A.")[0]
        first_two = scaling(8) * (wide[b_name][:, :2] @ wide[a_name][:2])
        torch.testing.assert_close(small.model.get_submodule(module).get_delta_weight("default"), first_two)


def test_spec_at_rank_changes_only_the_rank_axis():
    delta = _client(torch.Generator().manual_seed(0), 4, 7, 5)
    spec = spec_at_rank(DeltaSpec.of_delta(delta), 2)
    assert spec.tensors[A].shape == (2, 5) and spec.tensors[B].shape == (7, 2) and spec.tensors[B2].shape == (8, 2)
    assert spec.tensors[HEAD].shape == (3, 5)
    spec.validate(restrict(delta, 2, partial(lora_scaling, 8)))
    with pytest.raises(DeltaError, match="shape"):
        spec.validate(delta)


def test_rank_mismatches_are_rejected():
    scaling = partial(lora_scaling, 8)
    delta = _client(torch.Generator().manual_seed(0), 4, 7, 5)
    with pytest.raises(DeltaError, match="restrict a rank-4"):
        restrict(delta, 5, scaling)
    with pytest.raises(DeltaError, match="lift a rank-4"):
        lift(delta, 3, scaling)
    mixed = OrderedDict(delta)
    mixed[A2], mixed[B2] = mixed[A2][:2], mixed[B2][:, :2]
    with pytest.raises(DeltaError, match="ranks \\[2, 4\\]"):
        delta_rank(mixed)
    with pytest.raises(DeltaError, match="positive weight"):
        aggregate_hetlora([delta], [0.0], 4, scaling)
