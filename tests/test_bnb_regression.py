"""Regression test for the bitsandbytes 0.50.2 AVX512-BF16 repacking trap on CPU.

On such CPUs the first no-grad forward repacks 4-bit weights; afterwards gradients stop
flowing through frozen 4-bit layers and state_dict() returns repacked weights.
`load_base_model` disables the repacking; these tests fail if that workaround is lost.
"""

from __future__ import annotations

import pytest
import torch

from fedpeft.common.methods import make_config
from fedpeft.common.model.adapted import AdaptedModel
from fedpeft.common.model.quantization import bitsandbytes_available, cpu_supports_bf16, four_bit_layers
from fedpeft.common.training.evaluation import model_device

pytestmark = pytest.mark.skipif(not bitsandbytes_available(), reason="bitsandbytes not importable")


def _train_after_eval(model, vocab: int):
    """Eval forward (no grad), then one training forward/backward."""
    x = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(0)).to(model_device(model))
    model.eval()
    with torch.no_grad():
        model(input_ids=x)
    model.train()
    model(input_ids=x, labels=x).loss.backward()


def _dead_adapters(adapted) -> list[str]:
    """LoRA B matrices that got no (or an all-zero) gradient.

    B gets a gradient whenever backprop reaches its layer's output. With the trap,
    backprop stops at every frozen 4-bit layer, so only adapters on layers whose output
    feeds the residual stream directly (o_proj, down_proj) still learn.
    """
    params = dict(adapted.model.named_parameters())
    return [n for n in adapted.delta_names if "lora_B" in n and (params[n].grad is None or params[n].grad.abs().sum() == 0)]


def test_training_after_an_eval_pass_still_reaches_every_adapter(tiny_model_dir):
    # Prepare
    adapted = AdaptedModel.load(tiny_model_dir, "4bit", "lora", make_config("lora", {"r": "4"}), seed=0)
    model = adapted.model
    assert four_bit_layers(model), "the backbone must really be 4-bit"
    quantized_before = {k: v.clone() for k, v in model.state_dict().items() if "base_layer.weight" in k}
    # Execute
    _train_after_eval(model, model.config.vocab_size)
    # Assert: every adapter gets a gradient, including those behind frozen 4-bit layers
    assert _dead_adapters(adapted) == []
    # Assert: the stored 4-bit weights (and their quantization state) are unchanged
    quantized_after = model.state_dict()
    for key, before in quantized_before.items():
        after = quantized_after[key]
        assert after.shape == before.shape, f"{key} changed shape {tuple(before.shape)} -> {tuple(after.shape)}"
        assert torch.equal(after, before), f"{key} changed"


@pytest.mark.skipif(not cpu_supports_bf16() or torch.cuda.is_available(), reason="trap needs an AVX512-BF16 CPU")
def test_the_trap_is_real_without_the_workaround(tiny_model_dir):
    """Documents why the workaround exists: re-enabling repacking breaks training."""
    adapted = AdaptedModel.load(tiny_model_dir, "4bit", "lora", make_config("lora", {"r": "4"}), seed=0)
    for layer in four_bit_layers(adapted.model):
        layer.support_avx512bf16_for_cpu = True
    _train_after_eval(adapted.model, adapted.model.config.vocab_size)
    assert _dead_adapters(adapted), "bitsandbytes no longer repacks: the workaround may be obsolete"
