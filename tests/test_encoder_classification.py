"""Encoders (BERT family) train a sequence-classification head together with any method."""

from __future__ import annotations

import pytest
import torch

from fedpeft.common.data.builtin_task import builtin_splits, builtin_task
from fedpeft.common.data.records import TaskSpec
from fedpeft.common.errors import ConfigError, DataError, ModelLoadError
from fedpeft.common.methods import get_method, make_config
from fedpeft.common.model.adapted import AdaptedModel, check_method_applies
from fedpeft.common.model.base_model import load_base_model, model_kind
from fedpeft.common.training.objectives import SequenceClassificationObjective, objective_for

TASK = builtin_task()
TRAIN, HELD_OUT = builtin_splits(64, 32, seed=3)


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
    from tiny_models import build_tiny_bert

    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


def test_model_kind_is_read_from_the_checkpoint(tiny_bert_dir, tiny_model_dir):
    assert model_kind(tiny_bert_dir) == "seq-cls" and model_kind(tiny_model_dir) == "causal-lm"
    with pytest.raises(ModelLoadError, match="needs a classification task"):
        load_base_model(tiny_bert_dir, "none")


@pytest.mark.parametrize(("method", "options"), [("lora", {"r": "4"}), ("bottleneck", {"style": "houlsby"}),
                                                 ("bottleneck", {"style": "parallel"}),
                                                 ("mam", {"num_virtual_tokens": "4"}),
                                                 ("unipelt", {"num_virtual_tokens": "4", "lora_r": "4"}),
                                                 ("adalora", {"total_step": "15", "init_r": "4", "target_r": "2",
                                                              "target_modules": "query,value"}),
                                                 # default targets: the architecture's own module names
                                                 ("adalora", {"total_step": "15", "init_r": "4", "target_r": "2"}),
                                                 ("loha", {"r": "4"}), ("lokr", {"r": "4"}), ("hra", {"r": "4"}),
                                                 ("bitfit", {}), ("prefix", {"num_virtual_tokens": "4"}),
                                                 ("prompt", {"num_virtual_tokens": "4"}), ("ia3", {})])
def test_every_method_trains_the_head_and_learns(tiny_bert_dir, tmp_path, method, options):
    # Prepare
    adapted = AdaptedModel.load(tiny_bert_dir, "none", method, make_config(method, options), seed=0,
                                num_labels=TASK.num_labels)
    objective = objective_for(adapted.model, adapted.tokenizer, TASK, max_length=48)
    assert isinstance(objective, SequenceClassificationObjective)
    head = [n for n in adapted.delta_names if "classifier" in n]
    assert head  # the new head travels with the delta
    assert any("classifier" not in n for n in adapted.delta_names)  # and the method adapts the encoder itself
    head_before = {n: adapted.model.get_parameter(n).detach().clone() for n in head}
    before = objective.evaluate(adapted.model, TRAIN, batch_size=16)
    # Execute: a few steps on the training rows
    opt = torch.optim.AdamW(adapted.trainable_parameters(), lr=5e-3)
    encoded = [objective.encode(r) for r in TRAIN]
    adapted.model.train()
    for step in range(15):
        batch = objective.collate(encoded[(step * 16) % 64:(step * 16) % 64 + 16])
        objective.loss(adapted.model, batch).backward()
        opt.step()
        opt.zero_grad()
    after = objective.evaluate(adapted.model, TRAIN, batch_size=16)
    # Assert: loss on the same rows fell, the head trained, the saved adapter reloads identically
    assert after.loss < before.loss
    assert all(not torch.equal(adapted.model.get_parameter(n), v) for n, v in head_before.items())
    adapted.save_adapter(tmp_path / "adapter")
    reloaded = get_method(method).load_adapter(load_base_model(tiny_bert_dir, "none", num_labels=4), tmp_path / "adapter")
    again = objective.evaluate(reloaded, TRAIN, batch_size=16)
    assert again.accuracy == after.accuracy and abs(again.loss - after.loss) < 1e-5


def test_text_pairs_and_bad_tasks(tiny_bert_dir):
    adapted = AdaptedModel.load(tiny_bert_dir, "none", "lora", make_config("lora"), num_labels=2)
    pair = TaskSpec(kind="classification", template="{premise} {hypothesis}", verbalizer={"0": "yes", "1": "no"})
    objective = objective_for(adapted.model, adapted.tokenizer, pair, max_length=32)
    item = objective.encode({"premise": "refund please", "hypothesis": "billing", "label": 1})
    assert item["labels"] == 1
    decoded = adapted.tokenizer.decode(item["input_ids"])
    assert "refund" in decoded and "billing" in decoded  # both texts of the pair go in
    with pytest.raises(ConfigError, match="needs a classification task"):
        objective_for(adapted.model, adapted.tokenizer, TaskSpec(kind="instruction"), 32)
    with pytest.raises(DataError, match="text pair"):
        objective_for(adapted.model, adapted.tokenizer,
                      TaskSpec(kind="classification", template="{a}{b}{c}", verbalizer={"0": "x", "1": "y"}), 32)


def test_meta_check_knows_encoders(tiny_bert_dir):
    assert check_method_applies(tiny_bert_dir, "lora", make_config("lora"), num_labels=4) > 0
    with pytest.raises(ConfigError, match="encoder"):
        check_method_applies(tiny_bert_dir, "lora", make_config("lora"))


@pytest.mark.skipif(not __import__("fedpeft.common.model.quantization", fromlist=["x"]).bitsandbytes_available(),
                    reason="bitsandbytes not importable")
@pytest.mark.parametrize("method", ["lora", "bitfit"])
def test_encoder_head_stays_full_precision_on_a_4bit_backbone(tiny_bert_dir, method):
    from fedpeft.common.model.quantization import four_bit_layers

    adapted = AdaptedModel.load(tiny_bert_dir, "4bit", method, make_config(method), num_labels=4)
    assert four_bit_layers(adapted.model)  # the encoder itself is 4-bit
    head = [n for n in adapted.delta_names if "classifier" in n]
    assert head and all(adapted.model.get_parameter(n).dtype == torch.float32 for n in head)
    objective = objective_for(adapted.model, adapted.tokenizer, TASK, max_length=32)
    objective.loss(adapted.model, objective.collate([objective.encode(r) for r in TRAIN[:4]])).backward()
    assert all(adapted.model.get_parameter(n).grad is not None for n in head)


def test_lora_defaults_depend_on_whether_the_model_gets_a_fresh_classification_head(tiny_bert_dir, tiny_model_dir):
    from fedpeft.common.model.base_model import source_kind
    from fedpeft.server.federation.flags import spec_from_flags

    assert source_kind(str(tiny_bert_dir)) == "seq-cls" and source_kind(str(tiny_model_dir)) == "causal-lm"
    assert source_kind("smollm2-135m-instruct") == "causal-lm"  # a GGUF source: no conversion to tell
    encoder = spec_from_flags(model=str(tiny_bert_dir), method="lora").train_config()
    causal = spec_from_flags(model=str(tiny_model_dir), method="lora").train_config()
    assert (encoder.learning_rate, encoder.local_steps) == (3e-3, 24)
    assert (causal.learning_rate, causal.local_steps) == (1e-3, 8)
    # methods without head-specific defaults keep theirs either way; set values always win
    ia3 = spec_from_flags(model=str(tiny_bert_dir), method="ia3").train_config()
    assert (ia3.learning_rate, ia3.local_steps) == (3e-2, 8)
    fixed = spec_from_flags(model=str(tiny_bert_dir), method="lora", local_steps=5, learning_rate=0.1).train_config()
    assert (fixed.learning_rate, fixed.local_steps) == (0.1, 5)
