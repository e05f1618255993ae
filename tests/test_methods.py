"""Every registered method builds on a tiny Llama (fp32 and 4-bit), trains only its delta,
and saves/loads an adapter that reproduces the in-process logits."""

from __future__ import annotations

import json

import pytest
import torch
from method_helpers import logits, probe_batch, train_steps

from fedpeft.common.methods import get_method, make_config
from fedpeft.common.model.adapted import AdaptedModel
from fedpeft.common.model.base_model import load_base_model
from fedpeft.common.model.quantization import bitsandbytes_available

CASES = [
    ("lora", {"r": "4"}),
    ("lora", {"r": "4", "use_dora": "true", "target_modules": "q_proj,v_proj"}),
    ("prefix", {"num_virtual_tokens": "4"}),
    ("prefix", {"num_virtual_tokens": "4", "prefix_projection": "true", "encoder_hidden_size": "32"}),
    ("bottleneck", {"style": "houlsby", "reduction_factor": "8"}),
    ("bottleneck", {"style": "pfeiffer"}),
    ("bottleneck", {"style": "parallel", "scaling": "2.0", "drop_lowest": "1"}),
]
IDS = ["lora", "dora", "prefix", "prefix-projection", "houlsby", "pfeiffer", "parallel"]
QUANT = ["none", pytest.param("4bit", marks=pytest.mark.skipif(not bitsandbytes_available(), reason="no bnb"))]


@pytest.mark.parametrize("quantize", QUANT)
@pytest.mark.parametrize(("method", "options"), CASES, ids=IDS)
def test_only_the_delta_trains_and_adapter_reloads_exactly(tiny_model_dir, tmp_path, method, options, quantize):
    # Prepare
    adapted = AdaptedModel.load(tiny_model_dir, quantize, method, make_config(method, options), seed=0)
    frozen_before = {n: p.detach().clone() for n, p in adapted.model.named_parameters() if not p.requires_grad}
    delta_before = adapted.get_delta()
    x, mask = probe_batch(adapted.model.config.vocab_size)
    # Execute
    train_steps(adapted, x, mask)
    delta_after = adapted.get_delta()
    adapted.save_adapter(tmp_path / "adapter")
    reloaded = get_method(method).load_adapter(load_base_model(tiny_model_dir, quantize), tmp_path / "adapter")
    # Assert: the delta is non-empty, only the method's own tensors, changed by training; nothing else changed
    assert delta_after and set(delta_after) == {n for n, p in adapted.model.named_parameters() if p.requires_grad}
    own = {"lora": ("lora_A", "lora_B", "lora_magnitude_vector"), "prefix": ("prompt_encoder.",),
           "bottleneck": (".adapter.",)}[method]
    assert all(any(k in n for k in own) for n in delta_after), list(delta_after)
    assert any(not torch.equal(delta_after[k], delta_before[k]) for k in delta_after)
    for name, before in frozen_before.items():
        assert torch.equal(dict(adapted.model.named_parameters())[name], before), name
    # Assert: the saved adapter reproduces the trained model's logits
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    torch.testing.assert_close(logits(reloaded, x, mask), logits(adapted.model, x, mask), rtol=0, atol=1e-5)


@pytest.mark.parametrize("style", ["houlsby", "pfeiffer", "parallel"])
def test_fresh_bottleneck_adapter_is_the_identity(tiny_model_dir, style):
    base = load_base_model(tiny_model_dir, "none")
    x, mask = probe_batch(base.config.vocab_size)
    base_logits = logits(base, x, mask)
    adapted = AdaptedModel.load(tiny_model_dir, "none", "bottleneck", make_config("bottleneck", {"style": style}))
    assert torch.equal(logits(adapted.model, x, mask), base_logits)
    per_block = 2 if style == "houlsby" else 1
    if style == "parallel":  # beside the FFN module, which it wraps
        assert all(".mlp.adapter." in n for n in adapted.delta_names), adapted.delta_names
    assert len(adapted.delta_names) == per_block * 4 * adapted.model.config.num_hidden_layers  # down/up weight+bias


def test_peft_backed_adapter_dir_is_stock_peft(tiny_model_dir, tmp_path):
    adapted = AdaptedModel.load(tiny_model_dir, "none", "lora", make_config("lora", {"r": "4"}))
    adapted.save_adapter(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4


def test_adapter_drop_static_places_no_adapters_in_the_lowest_blocks(tiny_model_dir):
    adapted = AdaptedModel.load(tiny_model_dir, "none", "bottleneck",
                                make_config("bottleneck", {"style": "houlsby", "drop_lowest": "1"}))
    assert adapted.delta_names and not any(".layers.0." in n for n in adapted.delta_names)
    with pytest.raises(Exception, match="leaves no block"):
        AdaptedModel.load(tiny_model_dir, "none", "bottleneck", make_config("bottleneck", {"drop_lowest": "5"}))


def test_robust_adapter_drop_varies_in_training_and_inference_drop_restores_the_base(tiny_model_dir):
    from fedpeft.common.methods.bottleneck import adapted_sublayers, set_inference_drop

    adapted = AdaptedModel.load(tiny_model_dir, "none", "bottleneck",
                                make_config("bottleneck", {"style": "houlsby", "train_drop_max": "2"}))
    model = adapted.model
    # give the adapters non-zero up-projections so they change the output
    for module in adapted_sublayers(model):
        torch.nn.init.normal_(module.adapter.up.weight, std=0.5)
    base = load_base_model(tiny_model_dir, "none")
    x, mask = probe_batch(base.config.vocab_size)
    torch.manual_seed(0)
    model.train()
    active_counts = set()
    for _ in range(12):
        with torch.no_grad():
            model(input_ids=x, attention_mask=mask)
        active_counts.add(sum(m.active for m in adapted_sublayers(model)))
    assert active_counts <= {0, 2, 4} and len(active_counts) > 1  # 2 adapters per block, 2 blocks
    assert not torch.equal(logits(model, x, mask), logits(base, x, mask))  # eval: all adapters back on
    set_inference_drop(model, 2)
    torch.testing.assert_close(logits(model, x, mask), logits(base, x, mask), rtol=0, atol=1e-6)


@pytest.mark.parametrize("style", ["houlsby", "pfeiffer", "parallel"])
def test_adapter_drop_switches_off_every_style_and_restores_the_base(tiny_model_dir, style):
    from fedpeft.common.methods.bottleneck import adapted_sublayers, set_inference_drop

    adapted = AdaptedModel.load(tiny_model_dir, "none", "bottleneck", make_config("bottleneck", {"style": style}))
    for module in adapted_sublayers(adapted.model):
        torch.nn.init.normal_(module.adapter.up.weight, std=0.5)
    base = load_base_model(tiny_model_dir, "none")
    x, mask = probe_batch(base.config.vocab_size)
    assert not torch.equal(logits(adapted.model, x, mask), logits(base, x, mask))
    set_inference_drop(adapted.model, adapted.model.config.num_hidden_layers)
    torch.testing.assert_close(logits(adapted.model, x, mask), logits(base, x, mask), rtol=0, atol=1e-6)


def test_parallel_adapter_adds_its_scaled_output_beside_the_ffn(tiny_model_dir):
    from fedpeft.common.methods.bottleneck import adapted_sublayers

    adapted = AdaptedModel.load(tiny_model_dir, "none", "bottleneck",
                                make_config("bottleneck", {"style": "parallel", "scaling": "3.0"}))
    site = adapted_sublayers(adapted.model)[0]
    torch.nn.init.normal_(site.adapter.up.weight, std=0.5)
    x = torch.randn(1, 5, adapted.model.config.hidden_size)
    with torch.no_grad():
        expected = site.base_layer(x) + 3.0 * site.adapter.up(site.adapter.act(site.adapter.down(x)))
        torch.testing.assert_close(site(x), expected)


def test_scaling_is_refused_for_serial_styles():
    from fedpeft.common.errors import ConfigError

    with pytest.raises(ConfigError, match="scaling"):
        make_config("bottleneck", {"style": "pfeiffer", "scaling": "2"})
