"""LoRA aggregation math, checked against its definition and against peft itself.

Property tests (hypothesis): the svd mode reproduces the example-weighted mean of the
clients' ΔW = (alpha/r)·B·A whenever that mean has rank <= r, and otherwise is its best
rank-r approximation with the reported error; FFA-LoRA's plain averaging of B is exact;
shapes follow peft's convention (no transposes).
"""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedpeft.common.errors import DeltaError
from fedpeft.common.methods import make_config
from fedpeft.common.model.adapted import AdaptedModel
from fedpeft.server.lora_aggregation import (
    aggregate_lora_svd,
    lora_pairs,
    mean_svd,
    mean_update,
    refactor_svd,
    stacked_factors,
    weighted_mean,
)

A, B = "m.q_proj.lora_A.default.weight", "m.q_proj.lora_B.default.weight"


def refactor(update: torch.Tensor, rank: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: rank-`rank` factors from the dense SVD of `update`."""
    return refactor_svd(*torch.linalg.svd(update, full_matrices=False), rank=rank, scaling=scaling)


def _client(gen: torch.Generator, rank: int, out_f: int, in_f: int, shared_a: torch.Tensor | None = None):
    a = shared_a if shared_a is not None else torch.randn(rank, in_f, generator=gen, dtype=torch.float64)
    return OrderedDict([(A, a), (B, torch.randn(out_f, rank, generator=gen, dtype=torch.float64)),
                        ("m.norm.magnitude", torch.randn(out_f, generator=gen, dtype=torch.float64))])


dims = st.tuples(st.integers(1, 4), st.integers(2, 12), st.integers(2, 12))  # rank, out, in
weights_st = st.lists(st.floats(0.1, 100.0), min_size=1, max_size=5)


@settings(max_examples=60, deadline=None)
@given(dims=dims, weights=weights_st, alpha=st.sampled_from([1.0, 8.0, 16.0, 32.0]), seed=st.integers(0, 10_000))
def test_svd_mode_reproduces_the_weighted_mean_update_when_rank_allows(dims, weights, alpha, seed):
    rank, out_f, in_f = dims
    gen = torch.Generator().manual_seed(seed)
    shared_a = torch.randn(rank, in_f, generator=gen, dtype=torch.float64)
    clients = [_client(gen, rank, out_f, in_f, shared_a) for _ in weights]  # mean ΔW has rank <= r
    scaling = alpha / rank
    merged, report = aggregate_lora_svd(clients, weights, scaling)
    total = sum(weights)
    expected = sum(scaling * (w / total) * (c[B] @ c[A]) for c, w in zip(clients, weights, strict=True))
    got = scaling * (merged[B] @ merged[A])
    assert got.shape == (out_f, in_f)  # peft's (out_features, in_features) convention: no transpose
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
    assert report.max_relative_error < 1e-9
    # non-LoRA tensors are plainly weighted-averaged
    torch.testing.assert_close(merged["m.norm.magnitude"],
                               sum((w / total) * c["m.norm.magnitude"] for c, w in zip(clients, weights, strict=True)))


@settings(max_examples=40, deadline=None)
@given(dims=dims, weights=st.lists(st.floats(0.1, 100.0), min_size=2, max_size=5), seed=st.integers(0, 10_000))
def test_svd_mode_is_the_best_rank_r_approximation_and_reports_its_error(dims, weights, seed):
    rank, out_f, in_f = dims
    gen = torch.Generator().manual_seed(seed)
    clients = [_client(gen, rank, out_f, in_f) for _ in weights]
    merged, report = aggregate_lora_svd(clients, weights, scaling=2.0)
    exact = mean_update(clients, weights, A, B, scaling=2.0)
    got = 2.0 * (merged[B] @ merged[A])
    singular = torch.linalg.svdvals(exact)
    # Eckart–Young: the error of the best rank-r approximation is the tail of the spectrum
    tail = float(torch.sqrt((singular[rank:] ** 2).sum()))
    assert float(torch.linalg.matrix_norm(got - exact)) == pytest.approx(tail, rel=1e-7, abs=1e-9)
    norm = float(torch.linalg.matrix_norm(exact))
    assert report.max_relative_error == pytest.approx(tail / norm if norm else 0.0, rel=1e-7, abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(dims=dims, weights=weights_st, seed=st.integers(0, 10_000))
def test_ffa_lora_plain_averaging_is_exact(dims, weights, seed):
    rank, out_f, in_f = dims
    gen = torch.Generator().manual_seed(seed)
    shared_a = torch.randn(rank, in_f, generator=gen, dtype=torch.float64)
    clients = [_client(gen, rank, out_f, in_f, shared_a) for _ in weights]
    averaged = weighted_mean(clients, weights, [A, B])
    torch.testing.assert_close(averaged[B] @ averaged[A], mean_update(clients, weights, A, B, scaling=1.0))


def test_naive_averaging_is_not_exact_which_is_why_svd_exists():
    gen = torch.Generator().manual_seed(0)
    clients = [_client(gen, 2, 6, 5) for _ in range(2)]
    naive = weighted_mean(clients, [1.0, 1.0], [A, B])
    exact = mean_update(clients, [1.0, 1.0], A, B, scaling=1.0)
    assert float(torch.linalg.matrix_norm(naive[B] @ naive[A] - exact)) > 1e-3


def test_refactor_pads_when_the_update_has_less_rank_than_r():
    update = torch.outer(torch.arange(1.0, 4.0, dtype=torch.float64), torch.ones(2, dtype=torch.float64))
    a, b = refactor(update, rank=4, scaling=0.5)
    assert a.shape == (4, 2) and b.shape == (3, 4)
    torch.testing.assert_close(0.5 * (b @ a), update)
    # unused components restart like LoRA's init (random A, zero B), so they can still learn
    assert bool((a.abs().sum(dim=1) > 0).all())
    assert torch.equal(b[:, 1:], torch.zeros(3, 3, dtype=b.dtype))


def test_scaling_and_orientation_match_peft_on_a_real_model(tiny_model_dir):
    """Mixed alpha/r: our ΔW = (alpha/r)·B·A equals peft's own get_delta_weight."""
    for r, alpha in [(2, 16), (4, 4), (8, 32)]:
        adapted = AdaptedModel.load(tiny_model_dir, "none", "lora",
                                    make_config("lora", {"r": str(r), "alpha": str(alpha), "target_modules": "q_proj"}))
        delta = adapted.get_delta()
        a_name, b_name = lora_pairs(list(delta))[0]
        delta[b_name] = torch.randn_like(delta[b_name])
        adapted.set_delta(delta)
        layer = adapted.model.get_submodule(a_name.split(".lora_A.")[0])
        ours = (alpha / r) * (delta[b_name] @ delta[a_name])
        torch.testing.assert_close(ours, layer.get_delta_weight("default"))
        assert ours.shape == layer.base_layer.weight.shape


def test_unpaired_lora_tensors_are_rejected():
    with pytest.raises(DeltaError, match="without its B"):
        lora_pairs([A])
    with pytest.raises(DeltaError, match="without their A"):
        lora_pairs([B])


def test_ffa_option_freezes_a(tiny_model_dir):
    adapted = AdaptedModel.load(tiny_model_dir, "none", "lora", make_config("lora", {"freeze_a": "true"}))
    assert adapted.delta_names and all(".lora_B." in n for n in adapted.delta_names)
    again = AdaptedModel.load(tiny_model_dir, "none", "lora", make_config("lora", {"freeze_a": "true"}), seed=0)
    first = AdaptedModel.load(tiny_model_dir, "none", "lora", make_config("lora", {"freeze_a": "true"}), seed=0)
    frozen_a = [n for n, _ in first.model.named_parameters() if ".lora_A." in n]
    assert all(torch.equal(first.model.get_parameter(n), again.model.get_parameter(n)) for n in frozen_a)


def test_frozen_a_fingerprint_matches_across_peers_with_the_same_seed(tiny_model_dir):
    def fingerprint(seed, freeze="true"):
        config = make_config("lora", {"freeze_a": freeze})
        return AdaptedModel.load(tiny_model_dir, "none", "lora", config, seed=seed).frozen_fingerprint()

    assert fingerprint(0) == fingerprint(0) != ""
    assert fingerprint(0) != fingerprint(1)
    assert fingerprint(0, freeze="false") == ""


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 4), rank=st.integers(1, 3), out_f=st.integers(13, 20), in_f=st.integers(13, 20),
       seed=st.integers(0, 10_000))
def test_stacked_factors_give_the_dense_mean_and_its_factors_without_forming_it(n, rank, out_f, in_f, seed):
    gen = torch.Generator().manual_seed(seed)
    clients = [_client(gen, rank, out_f, in_f) for _ in range(n)]
    weights = [float(w) for w in torch.randint(1, 500, (n,), generator=gen)]
    dense = sum(1.5 * (w / sum(weights)) * (c[B] @ c[A]) for c, w in zip(clients, weights, strict=True))
    b, a = stacked_factors(clients, weights, A, B, 1.5)
    assert b.shape == (out_f, n * rank) and n * rank < min(out_f, in_f)  # the QR route
    torch.testing.assert_close(b @ a, dense, rtol=1e-12, atol=1e-12)
    u, s, vh = mean_svd(b, a)
    torch.testing.assert_close(torch.linalg.svdvals(dense)[: s.numel()], s, rtol=1e-9, atol=1e-12)
    # the factors themselves (signs fixed) match those of the dense SVD
    for got, want in zip(refactor_svd(u, s, vh, rank, 1.5), refactor(dense, rank, 1.5), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 9), block=st.integers(1, 4), seed=st.integers(0, 10_000))
def test_the_dense_mean_formed_block_by_block_is_the_stacked_product(n, block, seed):
    from fedpeft.server.lora_aggregation import module_svd

    gen = torch.Generator().manual_seed(seed)
    clients = [_client(gen, 3, 7, 6) for _ in range(n)]  # n·r >= 6 from n = 2: the dense route
    weights = [float(w) for w in torch.randint(1, 500, (n,), generator=gen)]
    b, a = stacked_factors(clients, weights, A, B, 1.5)
    whole = b @ a
    torch.testing.assert_close(mean_update(clients, weights, A, B, 1.5, block=block), whole, rtol=1e-12, atol=1e-12)
    u, s, vh = module_svd(clients, weights, A, B, 1.5)
    torch.testing.assert_close(s, torch.linalg.svdvals(whole)[: s.numel()], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(u * s @ vh, whole, rtol=1e-9, atol=1e-10)
