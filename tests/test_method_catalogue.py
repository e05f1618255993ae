"""The rest of the PEFT catalogue: soft prompts, (IA)³, BitFit, LoHa/LoKr/HRA.

Each method builds, trains only its delta, round-trips that delta exactly through
safetensors, and its saved adapter reloads to the same logits.
"""

from __future__ import annotations

import pytest
import torch
from method_helpers import logits, probe_batch, train_steps

from fedpeft.common.errors import ConfigError
from fedpeft.common.methods import get_method, make_config
from fedpeft.common.model.adapted import AdaptedModel
from fedpeft.common.model.base_model import load_base_model
from fedpeft.common.model.quantization import bitsandbytes_available
from fedpeft.common.protocol.deltas import delta_from_bytes, delta_to_bytes

needs_bnb = pytest.mark.skipif(not bitsandbytes_available(), reason="bitsandbytes not importable")


@pytest.fixture(scope="module")
def tiny_gpt2_dir(tmp_path_factory):
    """A tiny GPT-2 (it has biases, unlike Llama) sharing the tiny tokenizer."""
    from tiny_models import build_tokenizer
    from transformers import GPT2Config, GPT2LMHeadModel

    out = tmp_path_factory.mktemp("tiny-gpt2")
    tok = build_tokenizer(out)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4, n_positions=128,
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)).save_pretrained(out)
    return out


CASES = [
    ("prompt", {"num_virtual_tokens": "4"}, "none"),
    ("prompt", {"num_virtual_tokens": "4", "init": "text", "init_text": "Route the support ticket"}, "none"),
    ("ptuning", {"num_virtual_tokens": "4", "encoder_hidden_size": "32"}, "none"),
    ("ptuning", {"num_virtual_tokens": "4", "encoder": "lstm", "encoder_hidden_size": "32"}, "none"),
    ("ptuning_v2", {"num_virtual_tokens": "4"}, "none"),
    ("ia3", {}, "none"),
    ("loha", {"r": "4"}, "none"),
    ("lokr", {"r": "4"}, "none"),
    ("hra", {"r": "4"}, "none"),
    pytest.param("prompt", {"num_virtual_tokens": "4"}, "4bit", marks=needs_bnb),
    pytest.param("ptuning", {"num_virtual_tokens": "4", "encoder_hidden_size": "32"}, "4bit", marks=needs_bnb),
    pytest.param("ia3", {}, "4bit", marks=needs_bnb),
]


def _check_method(model_dir, tmp_path, method, options, quantize):
    adapted = AdaptedModel.load(model_dir, quantize, method, make_config(method, options), seed=0)
    frozen = {n: p.detach().clone() for n, p in adapted.model.named_parameters() if not p.requires_grad}
    before = adapted.get_delta()
    x, mask = probe_batch(adapted.model.config.vocab_size)
    train_steps(adapted, x, mask)
    after = adapted.get_delta()
    assert after and any(not torch.equal(after[k], before[k]) for k in after)
    params = dict(adapted.model.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in frozen.items())
    back = delta_from_bytes(delta_to_bytes(after))
    assert all(torch.equal(back[k], after[k]) for k in after)
    adapted.save_adapter(tmp_path / "adapter")
    reloaded = get_method(method).load_adapter(load_base_model(model_dir, quantize), tmp_path / "adapter")
    torch.testing.assert_close(logits(reloaded, x, mask), logits(adapted.model, x, mask), rtol=0, atol=1e-5)
    return adapted


# What each method's delta may contain (nothing of the base model, nothing of another method).
DELTA_PATTERN = {"prompt": "prompt_encoder.", "ptuning": "prompt_encoder.", "ptuning_v2": "prompt_encoder.",
                 "ia3": ".ia3_l.", "loha": ".hada_", "lokr": ".lokr_", "hra": ".hra_u."}


@pytest.mark.parametrize(("method", "options", "quantize"), CASES)
def test_method_trains_only_its_delta_and_reloads(tiny_model_dir, tmp_path, method, options, quantize):
    adapted = _check_method(tiny_model_dir, tmp_path, method, options, quantize)
    assert all(DELTA_PATTERN[method] in n for n in adapted.delta_names), adapted.delta_names


def test_ptuning_delta_includes_the_whole_prompt_encoder(tiny_model_dir):
    adapted = AdaptedModel.load(tiny_model_dir, "none", "ptuning", make_config("ptuning", {"encoder_hidden_size": "32"}))
    names = adapted.delta_names
    assert any("embedding" in n for n in names)
    assert any("mlp_head" in n for n in names), names  # the MLP reparameterization travels too


def test_bitfit_trains_biases_on_a_model_that_has_them(tiny_gpt2_dir, tmp_path):
    adapted = _check_method(tiny_gpt2_dir, tmp_path, "bitfit", {}, "none")
    assert adapted.delta_names and all(n.endswith(".bias") for n in adapted.delta_names)
    no_norm = AdaptedModel.load(tiny_gpt2_dir, "none", "bitfit", make_config("bitfit", {"scope": "no_norm"}))
    assert len(no_norm.delta_names) < len(adapted.delta_names)
    assert not any(".ln_" in n for n in no_norm.delta_names)


def test_bitfit_refuses_a_bias_free_model(tiny_model_dir):
    with pytest.raises(ConfigError, match="no bias parameters"):
        AdaptedModel.load(tiny_model_dir, "none", "bitfit", make_config("bitfit"))


@needs_bnb
@pytest.mark.parametrize("method", ["loha", "lokr", "hra"])
def test_methods_without_4bit_support_are_refused_on_a_4bit_base(tiny_model_dir, method):
    with pytest.raises(ConfigError, match="no 4-bit"):
        AdaptedModel.load(tiny_model_dir, "4bit", method, make_config(method, {"r": "4"}))


@pytest.mark.parametrize(
    ("method", "options", "fragment"),
    [("prompt", {"init": "text"}, "init_text"), ("ptuning", {"encoder": "gru"}, "encoder"),
     ("ia3", {"feedforward_modules": "down_proj"}, "feedforward_modules"), ("bitfit", {"scope": "some"}, "scope"),
     ("loha", {"r": "0"}, "LowRankMethodConfig.r"),
     ("ptuning", {"encoder_num_layers": "3"}, "only apply to encoder=lstm")],
)
def test_catalogue_options_are_validated(method, options, fragment):
    with pytest.raises(ConfigError, match=fragment):
        make_config(method, options)


def test_adaloras_schedule_spans_the_run_unless_set():
    from fedpeft.server.federation.flags import spec_from_flags

    spec = spec_from_flags(method="adalora", rounds=3, local_steps=5)
    spec.validate("simulation")
    assert spec.method_options()["total_step"] == "15"
    assert make_config("adalora", spec.method_options()).total_step == 15
    explicit = spec_from_flags(method="adalora", rounds=3, local_steps=5, method_options={"total_step": "40"})
    assert explicit.method_options()["total_step"] == "40"
    assert spec.method_options(60)["total_step"] == "60"  # a centralized baseline: the steps it trains in one go
    assert explicit.method_options(60)["total_step"] == "40"  # what the user sets wins
    with pytest.raises(ConfigError, match="total_step"):  # epochs: the step count is the data's, so say it
        spec_from_flags(method="adalora", rounds=3, local_epochs=1.0).validate("simulation")


@pytest.mark.parametrize(("method", "expected"), [
    ("loha", {"qkv_proj"}),  # Phi-3 fuses query/key/value: not Llama's q_proj/v_proj
    ("adalora", {"qkv_proj", "o_proj"}),
])
def test_default_targets_follow_phi3s_fused_attention(method, expected):
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    model = Phi3ForCausalLM(Phi3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=4, pad_token_id=0))
    options = {"total_step": "10"} if method == "adalora" else {}
    wrapped = get_method(method).build(model, make_config(method, options))
    adapted = {name for name, _ in wrapped.named_modules() if name.endswith(tuple(expected))}
    assert adapted and all(any(p.requires_grad for p in wrapped.get_submodule(n).parameters()) for n in adapted)
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert not any(".q_proj." in n or ".mlp." in n for n in trainable)


def test_a_model_type_without_an_entry_gets_peft_defaults():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4))
    wrapped = get_method("loha").build(model, make_config("loha"))
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert trainable and all("query_key_value" in n for n in trainable)  # peft's own GPT-NeoX default
