"""Deltas: exact round trips and clear rejection of malformed updates."""

from __future__ import annotations

import pytest
import torch

from fedpeft.common.errors import DeltaError
from fedpeft.common.methods import make_config
from fedpeft.common.model.adapted import AdaptedModel
from fedpeft.common.protocol.deltas import DeltaSpec, delta_from_bytes, delta_to_bytes, load_delta_file, save_delta_file
from fedpeft.common.protocol.flower_io import delta_from_arrayrecord, delta_to_arrayrecord


@pytest.fixture()
def adapted(tiny_model_dir) -> AdaptedModel:
    return AdaptedModel.load(tiny_model_dir, "none", "lora", make_config("lora", {"r": "4"}), seed=1)


def _perturbed(delta, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {k: v + torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in delta.items()}


def test_delta_is_exactly_the_trainable_tensors(adapted):
    trainable = {n for n, p in adapted.model.named_parameters() if p.requires_grad}
    assert set(adapted.get_delta()) == trainable
    assert all("lora_" in n for n in trainable)
    assert adapted.spec.num_parameters == sum(adapted.model.get_parameter(n).numel() for n in trainable)


def test_safetensors_round_trip_is_bit_identical(adapted, tiny_model_dir, tmp_path):
    # Prepare: a trained-looking delta
    delta = _perturbed(adapted.get_delta())
    # Execute: bytes -> file -> apply to a *fresh* model -> extract
    save_delta_file(delta, tmp_path / "d.safetensors")
    other = AdaptedModel.load(tiny_model_dir, "none", "lora", make_config("lora", {"r": "4"}), seed=99)
    other.set_delta(load_delta_file(tmp_path / "d.safetensors"))
    back = other.get_delta()
    # Assert
    assert list(back) == list(delta)
    for name in delta:
        assert torch.equal(back[name], delta[name]), name
    assert delta_from_bytes(delta_to_bytes(delta)).keys() == delta.keys()


def test_flower_arrayrecord_round_trip_is_bit_identical(adapted):
    delta = _perturbed(adapted.get_delta(), seed=3)
    back = delta_from_arrayrecord(delta_to_arrayrecord(delta))
    assert all(torch.equal(back[k], delta[k]) for k in delta)


def _drop_first(d):
    d.pop(next(iter(d)))


def _add_foreign(d):
    d["base_model.model.lm_head.weight"] = torch.zeros(2)


def _reshape_first(d):
    d[next(iter(d))] = torch.zeros(3, 3)


def _widen_first(d):
    first = next(iter(d))
    d[first] = d[first].double()


def _nan_first(d):
    d[next(iter(d))].view(-1)[0] = float("nan")


def _inf_first(d):
    d[next(iter(d))].view(-1)[1] = float("inf")


@pytest.mark.parametrize(
    ("corrupt", "expected"),
    [(_drop_first, "missing"), (_add_foreign, "unexpected tensor"), (_reshape_first, "shape"),
     (_widen_first, "dtype"), (_nan_first, "1 NaN"), (_inf_first, "1 Inf")],
    ids=["missing", "unexpected", "shape", "dtype", "nan", "inf"],
)
def test_bad_delta_is_rejected_naming_tensor_and_reason(adapted, corrupt, expected):
    before = adapted.get_delta()
    bad = _perturbed(before)
    corrupt(bad)
    with pytest.raises(DeltaError) as err:
        adapted.set_delta(bad, source="delta from client 7")
    message = str(err.value)
    assert expected in message
    assert "delta from client 7" in message
    # nothing was applied: validation happens before any copy
    after = adapted.get_delta()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_all_problems_are_reported_together(adapted):
    delta = _perturbed(adapted.get_delta())
    names = list(delta)
    delta[names[0]] = torch.zeros(1)
    delta[names[1]] = delta[names[1]].double()
    problems = adapted.spec.problems(delta)
    assert len(problems) == 2
    assert names[0] in problems[0] and names[1] in problems[1]


def test_truncated_or_tampered_bytes_are_rejected(adapted):
    data = delta_to_bytes(adapted.get_delta())
    with pytest.raises(DeltaError, match="not valid safetensors"):
        delta_from_bytes(data[: len(data) // 2])
    with pytest.raises(DeltaError, match="not valid safetensors"):
        delta_from_bytes(b"\xff" * 16 + data[16:])


def test_oversized_delta_is_rejected(adapted):
    delta = adapted.get_delta()
    with pytest.raises(DeltaError, match="exceeds the limit"):
        delta_from_bytes(delta_to_bytes(delta), max_bytes=100)
    with pytest.raises(DeltaError, match="exceeds the limit"):
        delta_from_arrayrecord(delta_to_arrayrecord(delta), max_bytes=100)


def test_spec_of_model_rejects_unknown_names(adapted):
    with pytest.raises(DeltaError, match="no parameter"):
        DeltaSpec.of_model(adapted.model, ["not.a.param"])


def test_arrays_carry_the_same_npy_bytes_as_flowers_own_encoding():
    import numpy as np
    from flwr.app import Array

    from fedpeft.common.protocol.npy import npy_array

    rng = np.random.default_rng(0)
    cases = [np.array(1.5, np.float32), np.zeros((0,)), np.zeros((3, 0), np.float16),
             np.array(["2026-12-06"], "datetime64[D]"),
             rng.standard_normal((5, 7)).astype(np.float32), rng.standard_normal((2, 3, 4)),
             np.arange(10, dtype=np.int64), np.array([True, False]), np.arange(6, dtype=np.uint8),
             rng.standard_normal((4, 6)).T,  # (not C-contiguous: written in C order, as Flower does)
             np.arange(5, dtype=">i4"), np.zeros((1,) * 40, np.float32)]
    for case in cases:
        ours, flowers = npy_array(case), Array(case if case.flags.c_contiguous else np.ascontiguousarray(case))
        assert (ours.dtype, ours.shape, ours.stype, ours.data) == (flowers.dtype, flowers.shape, flowers.stype,
                                                                  flowers.data), case.shape
