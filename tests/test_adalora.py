"""AdaLoRA: peft's budgeted SVD-LoRA, driven by the training loop's step hook; its
pruning masks travel in the delta (zeros in E) and survive save/load and aggregation."""

from __future__ import annotations

import pytest
import torch
from method_helpers import logits, probe_batch

from fedpeft.client.training import TrainConfig, train_local
from fedpeft.common.data.builtin_task import builtin_splits, builtin_task
from fedpeft.common.errors import ConfigError
from fedpeft.common.methods import get_method, make_config
from fedpeft.common.model.adapted import AdaptedModel
from fedpeft.common.model.base_model import load_base_model
from fedpeft.common.model.quantization import bitsandbytes_available

ROWS, _ = builtin_splits(32, 4, seed=2)
# 8 steps: budgeting through step 6 (= total_step - tfinal), then 2 final steps
TRAIN = TrainConfig(local_steps=8, learning_rate=1e-2, batch_size=4, max_length=48)
OPTIONS = {"total_step": "8", "init_r": "4", "target_r": "2", "tfinal": "2", "target_modules": "q_proj,v_proj"}
QUANT = ["none", pytest.param("4bit", marks=pytest.mark.skipif(not bitsandbytes_available(), reason="no bnb"))]


def _singular_values(adapted: AdaptedModel) -> dict[str, torch.Tensor]:
    return {n: t for n, t in adapted.get_delta().items() if ".lora_E." in n}


@pytest.mark.parametrize("quantize", QUANT)
def test_adalora_prunes_to_budget_trains_and_reloads(tiny_model_dir, tmp_path, quantize):
    adapted = AdaptedModel.load(tiny_model_dir, quantize, "adalora", make_config("adalora", OPTIONS), seed=0)
    kinds = {n.split(".lora_")[1].split(".")[0] for n in adapted.delta_names}
    assert kinds == {"A", "B", "E"}  # ranknum is not trained: it is rebuilt from init_r
    ranknums = [p for n, p in adapted.model.named_parameters() if "ranknum" in n]
    assert ranknums and all(not p.requires_grad and float(p) == 4.0 for p in ranknums)
    stats = train_local(adapted, builtin_task(), ROWS, TRAIN, seed=0)
    assert stats.last_loss < stats.first_loss
    kept = sum(int((e != 0).sum()) for e in _singular_values(adapted).values())
    matrices = len(_singular_values(adapted))
    assert 0 < kept <= 2 * matrices < 4 * matrices  # target_r=2 of init_r=4 on average
    adapted.save_adapter(tmp_path / "adapter")
    reloaded = get_method("adalora").load_adapter(load_base_model(tiny_model_dir, quantize), tmp_path / "adapter")
    x, mask = probe_batch(adapted.model.config.vocab_size)
    torch.testing.assert_close(logits(reloaded, x, mask), logits(adapted.model, x, mask), rtol=0, atol=1e-5)
    # the stock peft dir holds full-rank tensors (masks as zeros), so deltas keep one shape everywhere
    fresh = AdaptedModel.load(tiny_model_dir, quantize, "adalora", make_config("adalora", OPTIONS), seed=1)
    fresh.set_delta(adapted.get_delta())
    torch.testing.assert_close(logits(fresh.model, x, mask), logits(adapted.model, x, mask), rtol=0, atol=1e-5)


def test_final_phase_keeps_the_support_of_the_received_singular_values(tiny_model_dir):
    adapted = AdaptedModel.load(tiny_model_dir, "none", "adalora", make_config("adalora", OPTIONS), seed=0)
    train_local(adapted, builtin_task(), ROWS, TRAIN, seed=0)
    # e.g. the server's average: one rank per matrix zeroed by hand stands for "pruned everywhere"
    delta = adapted.get_delta()
    for name in [n for n in delta if ".lora_E." in n]:
        delta[name][0] = 0.0
    adapted.set_delta(delta)
    support = {n: e != 0 for n, e in _singular_values(adapted).items()}
    train_local(adapted, builtin_task(), ROWS, TrainConfig(local_steps=3, learning_rate=1e-2, batch_size=4,
                                                           max_length=48), seed=1, step_offset=8)
    after = _singular_values(adapted)
    assert all(torch.equal(after[n] != 0, support[n]) for n in after)


def test_orthogonality_regularizer_is_in_the_training_loss(tiny_model_dir):
    adapted = AdaptedModel.load(tiny_model_dir, "none", "adalora", make_config("adalora", OPTIONS), seed=0)
    x, mask = probe_batch(adapted.model.config.vocab_size)
    adapted.model.eval()
    with torch.no_grad():
        out = adapted.model(input_ids=x, attention_mask=mask, labels=x)
        plain = adapted.model.base_model.model(input_ids=x, attention_mask=mask, labels=x).loss
    assert float(out.loss) > float(plain) + 1e-4  # random A/B are far from orthonormal


@pytest.mark.parametrize(("options", "field"), [({}, "total_step"), ({"total_step": "4", "tinit": "4"}, "tinit"),
                                                ({"total_step": "4", "target_r": "20"}, "target_r"),
                                                ({"total_step": "4", "rank": "3"}, "unknown option")])
def test_adalora_options_are_validated(options, field):
    with pytest.raises(ConfigError, match=field):
        make_config("adalora", options)


def test_adalora_passes_the_weightless_pre_flight_check(tiny_model_dir):
    from fedpeft.common.model.adapted import check_method_applies

    assert check_method_applies(tiny_model_dir, "adalora", make_config("adalora", OPTIONS)) > 0


def test_a_round_whose_first_step_is_the_final_allocation_prunes_to_budget(tiny_model_dir):
    """One local step a round (the server-adam recipe): the final allocation falls on a round's
    first step, after the importance EMAs were reset; it must still prune to budget."""
    options = {**OPTIONS, "total_step": "4", "tfinal": "0", "tinit": "0"}
    adapted = AdaptedModel.load(tiny_model_dir, "none", "adalora", make_config("adalora", options), seed=0)
    one_step = TrainConfig(local_steps=1, learning_rate=1e-2, batch_size=4, max_length=48)
    for round_offset in range(4):  # steps 1..4, one a round; step 4 = total_step - tfinal
        train_local(adapted, builtin_task(), ROWS, one_step, seed=round_offset, step_offset=round_offset)
    kept = sum(int((e != 0).sum()) for e in _singular_values(adapted).values())
    matrices = len(_singular_values(adapted))
    assert 0 < kept <= 2 * matrices < 4 * matrices
