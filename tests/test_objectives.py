"""The causal-LM objective computes the LM head only at target positions; for every
method that must give the model's own loss and the same gradients."""

from __future__ import annotations

import pytest
import torch

from fedpeft.common.data.records import IGNORE_INDEX, TaskSpec
from fedpeft.common.methods import available_methods, make_config
from fedpeft.common.model.adapted import AdaptedModel
from fedpeft.common.model.base_model import load_tokenizer
from fedpeft.common.model.quantization import bitsandbytes_available
from fedpeft.common.training.evaluation import model_device
from fedpeft.common.training.objectives import CausalLMObjective, _backbone_and_head

# Options that make a method's default config fit a 2-block tiny Llama.
OPTIONS: dict[str, dict[str, str]] = {"adalora": {"total_step": "10"}}
FULL_LOSS_PATH = {"adalora", "prefix", "prompt", "ptuning", "ptuning_v2", "mam", "unipelt"}  # see _backbone_and_head


def _batch(vocab: int) -> dict[str, torch.Tensor]:
    """Two right-padded rows whose targets are a few tokens at different positions."""
    ids = torch.randint(3, vocab, (2, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, 9:12] = ids[0, 9:12]
    labels[1, 6:8] = ids[1, 6:8]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _own_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's own causal-LM loss (full logits), on the model's device."""
    return model(**{k: v.to(model_device(model)) for k, v in batch.items()}).loss


def _objective(model_dir) -> CausalLMObjective:
    task = TaskSpec(kind="instruction")
    return CausalLMObjective(task, load_tokenizer(model_dir), 64)


def _loss_and_grads(adapted: AdaptedModel, loss_fn) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    adapted.model.train()
    torch.manual_seed(0)
    for p in adapted.trainable_parameters():
        p.grad = None
    loss = loss_fn()
    loss.backward()
    named = dict(adapted.model.named_parameters())
    return loss.detach(), {n: p.grad.clone() for n, p in named.items() if p.requires_grad and p.grad is not None}


# bitfit has nothing to train on a bias-free Llama; adapter_fusion needs trained stage-1
# adapters (its fusion layer is an injected module, like the bottleneck adapters tested here).
NOT_ON_TINY_LLAMA = {"bitfit", "adapter_fusion"}


@pytest.mark.parametrize("method", [m for m in available_methods() if m not in NOT_ON_TINY_LLAMA])
def test_target_only_loss_equals_the_models_own_loss_and_gradients(tiny_model_dir, method):
    adapted = AdaptedModel.load(tiny_model_dir, "none", method, make_config(method, OPTIONS.get(method, {})))
    for module in adapted.model.modules():  # dropout would make the two passes differ
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    for p in adapted.trainable_parameters():  # LoRA's zero B would hide A's gradient
        with torch.no_grad():
            p.add_(0.01 * torch.randn_like(p))
    batch = _batch(adapted.model.config.vocab_size)
    objective = _objective(tiny_model_dir)

    fast, fast_grads = _loss_and_grads(adapted, lambda: objective.loss(adapted.model, batch))
    full, full_grads = _loss_and_grads(adapted, lambda: _own_loss(adapted.model, batch))

    assert (_backbone_and_head(adapted.model) is None) == (method in FULL_LOSS_PATH)
    torch.testing.assert_close(fast, full)
    assert fast_grads.keys() == full_grads.keys() and fast_grads
    for name in fast_grads:
        torch.testing.assert_close(fast_grads[name], full_grads[name], msg=name)


@pytest.mark.skipif(not bitsandbytes_available(), reason="no bitsandbytes")
def test_target_only_loss_on_a_4bit_backbone(tiny_model_dir):
    adapted = AdaptedModel.load(tiny_model_dir, "4bit", "lora", make_config("lora", {"r": "4", "dropout": "0"}))
    batch = _batch(adapted.model.config.vocab_size)
    objective = _objective(tiny_model_dir)
    fast, _ = _loss_and_grads(adapted, lambda: objective.loss(adapted.model, batch))
    full, _ = _loss_and_grads(adapted, lambda: _own_loss(adapted.model, batch))
    torch.testing.assert_close(fast, full)


def test_a_batch_without_targets_falls_back_to_the_models_loss(tiny_model_dir):
    adapted = AdaptedModel.load(tiny_model_dir, "none", "lora", make_config("lora", {}))
    batch = _batch(adapted.model.config.vocab_size)
    batch["labels"][:] = IGNORE_INDEX
    assert torch.isnan(_objective(tiny_model_dir).loss(adapted.model, batch))  # what HF returns: 0 / 0


def test_adapter_drop_draws_the_same_blocks_on_the_target_only_path(tiny_model_dir):
    # AdapterDrop draws which blocks to drop in a forward pre-hook on the transformer body,
    # which both the target-only path and the model's own forward run
    adapted = AdaptedModel.load(tiny_model_dir, "none", "bottleneck", make_config("bottleneck", {"train_drop_max": "2"}))
    assert _backbone_and_head(adapted.model) is not None
    adapted.model.train()
    batch = _batch(adapted.model.config.vocab_size)
    objective = _objective(tiny_model_dir)
    for seed in range(4):
        torch.manual_seed(seed)
        fast = objective.loss(adapted.model, batch)
        torch.manual_seed(seed)
        torch.testing.assert_close(fast, _own_loss(adapted.model, batch))


def test_a_forward_hook_on_the_whole_model_keeps_the_models_own_forward(tiny_model_dir):
    adapted = AdaptedModel.load(tiny_model_dir, "none", "lora", make_config("lora", {}))
    adapted.model.register_forward_pre_hook(lambda module, args: None)
    assert _backbone_and_head(adapted.model) is None


def test_gpt2_and_bert_heads(tmp_path):
    from transformers import BertConfig, BertLMHeadModel, GPT2Config, GPT2LMHeadModel

    # GPT-2: a plain tied lm_head, so the target-only path applies and matches
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=384, n_positions=64, n_embd=32, n_layer=2, n_head=2)).eval()
    batch = _batch(384)
    assert _backbone_and_head(gpt2) is not None
    task = TaskSpec(kind="instruction")
    objective = CausalLMObjective(task, None, 64)
    torch.testing.assert_close(objective.loss(gpt2, batch), _own_loss(gpt2, batch))
    # BERT as a causal LM: its head transforms before the decoder, so the model's own loss is used
    bert = BertLMHeadModel(BertConfig(vocab_size=384, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=64, is_decoder=True)).eval()
    assert _backbone_and_head(bert) is None
    torch.testing.assert_close(objective.loss(bert, batch), _own_loss(bert, batch))
