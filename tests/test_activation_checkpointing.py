"""Gradient checkpointing: same loss and gradients with far fewer saved activations, for
every method it can train; a clear refusal for the prefix-style methods it would break."""

from __future__ import annotations

import pytest
import torch
from test_objectives import NOT_ON_TINY_LLAMA, OPTIONS, _batch, _objective

from fedpeft.client.training import TrainConfig, train_local
from fedpeft.common.data.builtin_task import builtin_splits, builtin_task
from fedpeft.common.errors import ConfigError
from fedpeft.common.methods import available_methods, get_method, make_config
from fedpeft.common.model.adapted import AdaptedModel
from fedpeft.common.model.quantization import bitsandbytes_available
from fedpeft.common.model.split import SplitConfig, load_client_part
from fedpeft.common.training.activation_checkpointing import _hf_model, gradient_checkpointing, passes_kv_prefix


def _saved_bytes_and_grads(model: torch.nn.Module, params, loss_fn) -> tuple[int, torch.Tensor, list[torch.Tensor]]:
    """Bytes autograd keeps for backward (distinct storages), the loss, and the gradients."""
    storages: dict[int, int] = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        storages.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    model.train()
    for p in params:
        p.grad = None
    torch.manual_seed(0)
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        loss = loss_fn()
    loss.backward()
    return sum(storages.values()), loss.detach(), [p.grad.clone() for p in params]


@pytest.fixture(scope="module")
def deep_model_dir(tmp_path_factory):
    """Six blocks, so block activations (what checkpointing drops) dominate what autograd keeps."""
    from tiny_models import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama-6"), num_layers=6)


@pytest.mark.parametrize("method", [m for m in available_methods() if m not in NOT_ON_TINY_LLAMA])
def test_checkpointing_keeps_the_loss_and_gradients_and_drops_most_saved_activations(deep_model_dir, method):
    adapted = AdaptedModel.load(deep_model_dir, "none", method, make_config(method, OPTIONS.get(method, {})))
    assert passes_kv_prefix(adapted.model) == get_method(method).kv_prefix  # the upfront check matches the model
    params = adapted.trainable_parameters()
    for p in params:  # LoRA's zero B would hide A's gradient
        with torch.no_grad():
            p.add_(0.01 * torch.randn_like(p))
    objective = _objective(deep_model_dir)
    batch = _batch(adapted.model.config.vocab_size)
    if get_method(method).kv_prefix:
        with pytest.raises(ConfigError, match="past_key_values"):
            with gradient_checkpointing(adapted.model, True, what=method):
                pass
        return

    plain_bytes, plain_loss, plain_grads = _saved_bytes_and_grads(adapted.model, params,
                                                                  lambda: objective.loss(adapted.model, batch))
    with gradient_checkpointing(adapted.model, True, what=method):
        ckpt_bytes, ckpt_loss, ckpt_grads = _saved_bytes_and_grads(adapted.model, params,
                                                                   lambda: objective.loss(adapted.model, batch))
    assert not _hf_model(adapted.model).is_activation_checkpointing  # off again: a cached model is reused next round
    torch.testing.assert_close(ckpt_loss, plain_loss)
    for plain, ckpt in zip(plain_grads, ckpt_grads, strict=True):
        torch.testing.assert_close(ckpt, plain, rtol=1e-4, atol=1e-6)
    assert ckpt_bytes < 0.6 * plain_bytes, (ckpt_bytes, plain_bytes)


def test_local_training_with_checkpointing_learns_the_same_delta(deep_model_dir):
    """Dropout included: the recompute replays the forward's random state."""
    train, _ = builtin_splits(24, 4, seed=0)
    deltas = []
    for checkpointed in (False, True):
        adapted = AdaptedModel.load(deep_model_dir, "none", "lora", make_config("lora", {"r": "4", "dropout": "0.1"}))
        config = TrainConfig(local_steps=3, batch_size=4, learning_rate=1e-2, max_length=48,
                             gradient_checkpointing=checkpointed)
        train_local(adapted, builtin_task(), train, config, seed=5)
        deltas.append(adapted.get_delta())
    assert deltas[0].keys() == deltas[1].keys()
    for name in deltas[0]:
        torch.testing.assert_close(deltas[1][name], deltas[0][name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.skipif(not bitsandbytes_available(), reason="no bitsandbytes")
def test_checkpointing_over_a_4bit_backbone(deep_model_dir):
    adapted = AdaptedModel.load(deep_model_dir, "4bit", "lora", make_config("lora", {"r": "4", "dropout": "0"}))
    params = adapted.trainable_parameters()
    for p in params:
        with torch.no_grad():
            p.add_(0.01 * torch.randn_like(p))
    objective, batch = _objective(deep_model_dir), _batch(adapted.model.config.vocab_size)
    plain_bytes, plain_loss, plain_grads = _saved_bytes_and_grads(adapted.model, params,
                                                                  lambda: objective.loss(adapted.model, batch))
    with gradient_checkpointing(adapted.model, True):
        ckpt_bytes, ckpt_loss, ckpt_grads = _saved_bytes_and_grads(adapted.model, params,
                                                                   lambda: objective.loss(adapted.model, batch))
    torch.testing.assert_close(ckpt_loss, plain_loss)
    for plain, ckpt in zip(plain_grads, ckpt_grads, strict=True):
        torch.testing.assert_close(ckpt, plain, rtol=1e-4, atol=1e-6)
    assert ckpt_bytes < 0.6 * plain_bytes


def test_a_split_client_part_checkpoints_its_blocks(deep_model_dir):
    part = load_client_part(deep_model_dir, SplitConfig(cut=4), make_config("lora", {"r": "4", "dropout": "0"}),
                            quantize="none")
    params = part.trainable_parameters()
    for p in params:
        with torch.no_grad():
            p.add_(0.01 * torch.randn_like(p))
    batch = _batch(part.model.config.vocab_size)

    def loss():  # what the server's gradient would weigh: any fixed function of the activations
        return part.bottom(batch["input_ids"], batch["attention_mask"]).pow(2).mean()

    plain_bytes, plain_loss, plain_grads = _saved_bytes_and_grads(part.model, params, loss)
    with gradient_checkpointing(part.model, True, what="the split client part"):
        ckpt_bytes, ckpt_loss, ckpt_grads = _saved_bytes_and_grads(part.model, params, loss)
    torch.testing.assert_close(ckpt_loss, plain_loss)
    for plain, ckpt in zip(plain_grads, ckpt_grads, strict=True):
        torch.testing.assert_close(ckpt, plain, rtol=1e-4, atol=1e-6)
    assert ckpt_bytes < 0.6 * plain_bytes


def test_the_cli_and_the_plan_carry_the_setting_to_clients():
    from fedpeft.simulations.cli import build_parser, spec_from_args

    spec = spec_from_args(build_parser().parse_args(["--gradient-checkpointing"]))
    assert spec.training.gradient_checkpointing is True
    plan_train = spec.train_config().plan_fields()  # what the server puts in the plan
    assert TrainConfig(**plan_train).gradient_checkpointing is True
    assert "gradient_checkpointing" not in TrainConfig(learning_rate=1e-3, local_steps=8).plan_fields()  # older clients read it


def test_prefix_methods_with_checkpointing_are_refused_before_a_run_starts():
    from fedpeft.server.federation.flags import spec_from_flags
    from fedpeft.server.federation.spec import RunSpec

    assert any("training.gradient_checkpointing cannot train method 'prefix'" in p
               for p in spec_from_flags(method="prefix", gradient_checkpointing=True).problems("simulation"))
    assert not any("gradient_checkpointing" in p
                   for p in spec_from_flags(method="lora", gradient_checkpointing=True).problems("simulation"))
    config = RunSpec.from_dict({"federation": {"method": "mam"}, "training": {"gradient_checkpointing": True}})
    assert any("training.gradient_checkpointing cannot train method 'mam'" in p for p in config.problems("deployment"))
    with pytest.raises(ConfigError, match="gradient_checkpointing"):
        TrainConfig(gradient_checkpointing="yes")  # type: ignore[arg-type]


@pytest.mark.parametrize(("method", "options"), [("lora", {"r": "4"}), ("bitfit", {}), ("bottleneck", {})])
def test_an_encoder_classifier_checkpoints_with_the_same_gradients(tmp_path_factory, method, options):
    """BERT-family encoders (sequence classification, where BitFit has biases to train)."""
    from tiny_models import build_tiny_bert

    from fedpeft.common.training.objectives import objective_for

    model_dir = build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))
    task = builtin_task()
    adapted = AdaptedModel.load(model_dir, "none", method, make_config(method, options), seed=0,
                                num_labels=task.num_labels)
    for module in adapted.model.modules():  # dropout on both passes would still match; keep the check strict
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    params = adapted.trainable_parameters()
    objective = objective_for(adapted.model, adapted.tokenizer, task, max_length=48)
    rows, _ = builtin_splits(8, 2, seed=0)
    batch = objective.collate([objective.encode(r) for r in rows])
    plain_bytes, plain_loss, plain_grads = _saved_bytes_and_grads(adapted.model, params,
                                                                  lambda: objective.loss(adapted.model, batch))
    with gradient_checkpointing(adapted.model, True, what=method):
        ckpt_bytes, ckpt_loss, ckpt_grads = _saved_bytes_and_grads(adapted.model, params,
                                                                   lambda: objective.loss(adapted.model, batch))
    torch.testing.assert_close(ckpt_loss, plain_loss)
    for plain, ckpt in zip(plain_grads, ckpt_grads, strict=True):
        torch.testing.assert_close(ckpt, plain, rtol=1e-4, atol=1e-6)
    assert ckpt_bytes < plain_bytes


def test_switching_off_leaves_no_hook_and_keeps_a_callers_own_setting(deep_model_dir):
    adapted = AdaptedModel.load(deep_model_dir, "none", "lora", make_config("lora", {"r": "4"}))
    hf = _hf_model(adapted.model)
    embeddings = hf.get_input_embeddings()
    for _ in range(3):  # the client caches its model: one switch per round
        with gradient_checkpointing(adapted.model, True):
            assert hf.is_activation_checkpointing
        assert not hf.is_activation_checkpointing
    assert not embeddings._forward_hooks  # transformers' input-grad hook is not left behind
    hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False}, every_n_layers=2)
    with gradient_checkpointing(adapted.model, True):
        pass
    assert hf.is_activation_checkpointing  # a setting the caller made is theirs to undo
