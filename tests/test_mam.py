"""MAM adapter: peft prefix tuning + our parallel FFN adapter, trained and saved as one delta."""

from __future__ import annotations

import pytest
import torch
from method_helpers import logits, probe_batch, train_steps

from fedpeft.common.errors import ConfigError
from fedpeft.common.methods import get_method, make_config
from fedpeft.common.model.adapted import AdaptedModel, check_method_applies
from fedpeft.common.model.base_model import load_base_model
from fedpeft.common.model.quantization import bitsandbytes_available

QUANT = ["none", pytest.param("4bit", marks=pytest.mark.skipif(not bitsandbytes_available(), reason="no bnb"))]
OPTIONS = {"num_virtual_tokens": "4", "reduction_factor": "4", "scaling": "2.0"}


def _loss(model, x, mask) -> float:
    model.eval()
    with torch.no_grad():
        return float(model(input_ids=x, attention_mask=mask, labels=x).loss)


@pytest.mark.parametrize("quantize", QUANT)
def test_mam_trains_prefix_and_parallel_adapter_and_reloads(tiny_model_dir, tmp_path, quantize):
    adapted = AdaptedModel.load(tiny_model_dir, quantize, "mam", make_config("mam", OPTIONS), seed=0)
    names = adapted.delta_names
    assert any(n.startswith("prompt_encoder.") for n in names) and any(".mlp.adapter." in n for n in names)
    assert all(n.startswith("prompt_encoder.") or ".mlp.adapter." in n for n in names), names
    frozen = {n: p.detach().clone() for n, p in adapted.model.named_parameters() if not p.requires_grad}
    before = adapted.get_delta()
    x, mask = probe_batch(adapted.model.config.vocab_size)
    first = _loss(adapted.model, x, mask)
    train_steps(adapted, x, mask, steps=4)
    after = adapted.get_delta()
    assert _loss(adapted.model, x, mask) < first
    assert all(not torch.equal(after[n], before[n]) for n in names if "adapter.up" in n or "prompt_encoder" in n)
    params = dict(adapted.model.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in frozen.items())
    fresh = AdaptedModel.load(tiny_model_dir, quantize, "mam", make_config("mam", OPTIONS), seed=5)
    fresh.set_delta(after)
    torch.testing.assert_close(logits(fresh.model, x, mask), logits(adapted.model, x, mask), rtol=0, atol=1e-5)
    adapted.save_adapter(tmp_path / "mam")
    reloaded = get_method("mam").load_adapter(load_base_model(tiny_model_dir, quantize), tmp_path / "mam")
    torch.testing.assert_close(logits(reloaded, x, mask), logits(adapted.model, x, mask), rtol=0, atol=1e-5)


def test_mam_with_prefix_projection_ships_the_mlp(tiny_model_dir):
    adapted = AdaptedModel.load(tiny_model_dir, "none", "mam",
                                make_config("mam", {**OPTIONS, "prefix_projection": "true", "encoder_hidden_size": "32"}))
    assert any("transform" in n for n in adapted.delta_names), adapted.delta_names
    assert check_method_applies(tiny_model_dir, "mam", make_config("mam", OPTIONS)) > 0


@pytest.mark.parametrize(("options", "fragment"), [({"scaling": "0"}, "MamMethodConfig.scaling"),
                                                   ({"num_virtual_tokens": "0"}, "num_virtual_tokens"),
                                                   ({"style": "houlsby"}, "unknown option")])
def test_mam_options_are_validated(options, fragment):
    with pytest.raises(ConfigError, match=fragment):
        make_config("mam", options)
