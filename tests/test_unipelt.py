"""UniPELT: gated LoRA + gated peft prefix + gated bottleneck adapter, trained and saved as one delta."""

from __future__ import annotations

import pytest
import torch
from method_helpers import logits, probe_batch, train_steps

from fedpeft.common.errors import ConfigError
from fedpeft.common.methods import get_method, make_config
from fedpeft.common.methods.unipelt import InputPrefixGate, PrefixGate, StaticPrefixGate
from fedpeft.common.model.adapted import AdaptedModel, check_method_applies
from fedpeft.common.model.base_model import load_base_model
from fedpeft.common.model.quantization import bitsandbytes_available
from fedpeft.common.training.evaluation import model_device

QUANT = ["none", pytest.param("4bit", marks=pytest.mark.skipif(not bitsandbytes_available(), reason="no bnb"))]
OPTIONS = {"num_virtual_tokens": "4", "lora_r": "4", "reduction_factor": "4"}
#: Every kind of tensor the delta must hold (the three submodules and their gates).
PARTS = ("prompt_encoder.", ".lora_A.", ".lora_B.", ".lora_gate.", ".adapter.down.", ".adapter.up.", ".adapter_gate.",
         ".prefix_gate.")


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
    from tiny_models import build_tiny_bert

    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


def _prefix_gates(model: torch.nn.Module) -> list[PrefixGate]:
    return [m for m in model.modules() if isinstance(m, PrefixGate)]


def _zero_tensors_after_backward(adapted: AdaptedModel, loss: torch.Tensor) -> list[str]:
    """Backpropagate `loss`; the delta tensors whose gradient is missing or all zero."""
    adapted.model.zero_grad()
    loss.backward()
    params = dict(adapted.model.named_parameters())
    zero = [n for n in adapted.delta_names if params[n].grad is None or not bool(params[n].grad.abs().sum() > 0)]
    adapted.model.zero_grad()
    return zero


def _lm_loss(adapted: AdaptedModel, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    device = model_device(adapted.model)
    return adapted.model(input_ids=x.to(device), attention_mask=mask.to(device), labels=x.to(device)).loss


@pytest.mark.parametrize("quantize", QUANT)
def test_unipelt_on_a_causal_lm_trains_every_part_and_round_trips(tiny_model_dir, tmp_path, quantize):
    # Prepare
    adapted = AdaptedModel.load(tiny_model_dir, quantize, "unipelt", make_config("unipelt", OPTIONS), seed=0)
    model = adapted.model
    names = adapted.delta_names
    assert set(names) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(any(part in n for part in PARTS) for n in names), names
    assert all(any(part in n for n in names) for part in PARTS), names
    gates = _prefix_gates(model)
    assert len(gates) == model.config.num_hidden_layers and all(isinstance(g, StaticPrefixGate) for g in gates)
    if quantize == "4bit":  # the gated LoRA wraps the 4-bit projection instead of dequantizing it
        import bitsandbytes as bnb

        q_proj = model.get_submodule("base_model.model.layers.0.self_attn.q_proj")
        assert isinstance(q_proj.base_layer, bnb.nn.Linear4bit)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    x, mask = probe_batch(model.config.vocab_size)
    model.eval()
    with torch.no_grad():
        first = float(_lm_loss(adapted, x, mask))
    # Execute
    train_steps(adapted, x, mask, steps=3)
    # Assert: the loss fell, every delta tensor (all three submodules and every gate) gets a gradient
    model.eval()
    with torch.no_grad():
        assert float(_lm_loss(adapted, x, mask)) < first
    model.train()
    assert _zero_tensors_after_backward(adapted, _lm_loss(adapted, x, mask)) == []
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in frozen.items())
    # Assert: the delta alone rebuilds the model on a fresh base (other seed), and the adapter dir reloads
    trained = logits(model, x, mask)
    fresh = AdaptedModel.load(tiny_model_dir, quantize, "unipelt", make_config("unipelt", OPTIONS), seed=5)
    assert not torch.equal(logits(fresh.model, x, mask), trained)
    fresh.set_delta(adapted.get_delta())
    torch.testing.assert_close(logits(fresh.model, x, mask), trained, rtol=0, atol=1e-5)
    adapted.save_adapter(tmp_path / "unipelt")
    reloaded = get_method("unipelt").load_adapter(load_base_model(tiny_model_dir, quantize), tmp_path / "unipelt")
    torch.testing.assert_close(logits(reloaded, x, mask), trained, rtol=0, atol=1e-5)


def test_fresh_unipelt_is_its_gated_prefix_alone_not_the_base(tiny_model_dir):
    """LoRA B and the adapter up-projection start at zero, so a fresh UniPELT is exactly
    prefix tuning with keys and values scaled by the fresh gate sigmoid(0) = 0.5; the
    prefix itself moves the outputs from step 0 (as in the paper), so it is not the base."""
    unipelt = AdaptedModel.load(tiny_model_dir, "none", "unipelt", make_config("unipelt", OPTIONS), seed=0)
    prefix = AdaptedModel.load(tiny_model_dir, "none", "prefix", make_config("prefix", {"num_virtual_tokens": "4"}), seed=1)
    name = "prompt_encoder.default.embedding.weight"
    assert all(float(g.gate(torch.zeros(1)).detach()) == 0.5 for g in _prefix_gates(unipelt.model))
    prefix.set_delta({name: unipelt.get_delta()[name] * 0.5})
    x, mask = probe_batch(unipelt.model.config.vocab_size)
    got = logits(unipelt.model, x, mask)
    torch.testing.assert_close(got, logits(prefix.model, x, mask), rtol=0, atol=1e-6)
    assert not torch.allclose(got, logits(load_base_model(tiny_model_dir, "none"), x, mask), atol=1e-3)


def test_causal_lm_outputs_never_depend_on_later_tokens(tiny_model_dir):
    """The causal-LM prefix gate is per layer, not pooled over the sequence (which would
    leak later tokens into earlier positions)."""
    adapted = AdaptedModel.load(tiny_model_dir, "none", "unipelt", make_config("unipelt", OPTIONS), seed=0)
    x, mask = probe_batch(adapted.model.config.vocab_size)
    train_steps(adapted, x, mask, steps=2)
    changed = x.clone()
    changed[:, -1] = (changed[:, -1] + 1) % adapted.model.config.vocab_size
    full = torch.ones_like(x)
    torch.testing.assert_close(logits(adapted.model, changed, full)[:, :-1], logits(adapted.model, x, full)[:, :-1],
                               rtol=0, atol=1e-6)


def _cls_batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x, mask = probe_batch(vocab)
    return x, mask, torch.tensor([1, 3])


@pytest.mark.parametrize("quantize", QUANT)
def test_unipelt_on_an_encoder_gates_the_prefix_per_example_and_round_trips(tiny_bert_dir, tmp_path, quantize):
    # Prepare
    adapted = AdaptedModel.load(tiny_bert_dir, quantize, "unipelt", make_config("unipelt", OPTIONS), seed=0,
                                num_labels=4)
    model = adapted.model
    assert all(any(part in n for n in adapted.delta_names) for part in PARTS + ("classifier",)), adapted.delta_names
    assert all(isinstance(g, InputPrefixGate) for g in _prefix_gates(model)) and _prefix_gates(model)
    x, mask, labels = _cls_batch(model.config.vocab_size)

    def loss() -> torch.Tensor:
        device = model_device(model)
        return model(input_ids=x.to(device), attention_mask=mask.to(device), labels=labels.to(device)).loss

    model.eval()
    with torch.no_grad():
        first = float(loss())
    # Execute
    opt = torch.optim.AdamW(adapted.trainable_parameters(), lr=1e-2)
    model.train()
    for _ in range(4):
        loss().backward()
        opt.step()
        opt.zero_grad()
    # Assert: learned, every part (head included) gets a gradient, delta and adapter dir round-trip
    model.eval()
    with torch.no_grad():
        assert float(loss()) < first
    model.train()
    assert _zero_tensors_after_backward(adapted, loss()) == []
    trained = logits(model, x, mask)
    fresh = AdaptedModel.load(tiny_bert_dir, quantize, "unipelt", make_config("unipelt", OPTIONS), seed=5, num_labels=4)
    fresh.set_delta(adapted.get_delta())
    torch.testing.assert_close(logits(fresh.model, x, mask), trained, rtol=0, atol=1e-5)
    adapted.save_adapter(tmp_path / "unipelt")
    base = load_base_model(tiny_bert_dir, quantize, num_labels=4)
    reloaded = get_method("unipelt").load_adapter(base, tmp_path / "unipelt")
    torch.testing.assert_close(logits(reloaded, x, mask), trained, rtol=0, atol=1e-5)


def test_encoder_prefix_gate_ignores_padding_and_depends_on_the_input(tiny_bert_dir):
    adapted = AdaptedModel.load(tiny_bert_dir, "none", "unipelt", make_config("unipelt", OPTIONS), seed=0, num_labels=4)
    model = adapted.model
    torch.nn.init.normal_(model.prompt_encoder.default.embedding.weight, std=1.0)  # a prefix that matters
    for gate in _prefix_gates(model):  # and a gate that moves with the input without saturating
        torch.nn.init.normal_(gate.proj.weight, std=0.2)
    x, mask, _ = _cls_batch(model.config.vocab_size)
    model.eval()

    def last_hidden(ids: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=keep, output_hidden_states=True).hidden_states[-1]

    batched = last_hidden(x, mask)[1:, :7]
    alone = last_hidden(x[1:, :7], mask[1:, :7])  # the padded row without its padding
    torch.testing.assert_close(batched, alone, rtol=0, atol=1e-5)
    hidden = torch.randn(2, 5, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    gate = _prefix_gates(model)[0]
    gate.padding.mask = None
    values = gate.gate(hidden)
    assert values.shape == (2,) and not torch.allclose(values[0], values[1])


def test_gpt2_fused_attention_projection_gets_the_gated_lora():
    """GPT-2 passes the cache to its blocks positionally and fuses q/k/v in one Conv1D."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2))
    model = get_method("unipelt").build(base, make_config("unipelt", OPTIONS))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(".attn.c_attn.lora_B." in n for n in names) and any(".mlp.c_proj.adapter." in n for n in names)
    x = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    model(input_ids=x, labels=x).loss.backward()
    gates = _prefix_gates(model)
    assert len(gates) == 2 and all(float(g.logit.grad.abs()) > 0 for g in gates)


def test_meta_pre_flight_counts_the_delta(tiny_model_dir, tiny_bert_dir):
    config = make_config("unipelt", OPTIONS)
    adapted = AdaptedModel.load(tiny_model_dir, "none", "unipelt", config)
    assert check_method_applies(tiny_model_dir, "unipelt", config) == adapted.spec.num_parameters
    assert check_method_applies(tiny_model_dir, "unipelt", config, quantize="4bit") == adapted.spec.num_parameters
    encoder = AdaptedModel.load(tiny_bert_dir, "none", "unipelt", config, num_labels=4)
    assert check_method_applies(tiny_bert_dir, "unipelt", config, num_labels=4) == encoder.spec.num_parameters


@pytest.mark.parametrize(("options", "fragment"), [({"lora_r": "0"}, "UniPeltMethodConfig.lora_r"),
                                                   ({"lora_alpha": "0"}, "UniPeltMethodConfig.lora_alpha"),
                                                   ({"lora_dropout": "1.0"}, "UniPeltMethodConfig.lora_dropout"),
                                                   ({"num_virtual_tokens": "0"}, "UniPeltMethodConfig.num_virtual_tokens"),
                                                   ({"reduction_factor": "0"}, "UniPeltMethodConfig.reduction_factor"),
                                                   ({"adapter_dropout": "-0.1"}, "UniPeltMethodConfig.adapter_dropout"),
                                                   ({"non_linearity": "tanh"}, "UniPeltMethodConfig.non_linearity"),
                                                   ({"scaling": "2"}, "unknown option")])
def test_unipelt_options_are_validated(options, fragment):
    with pytest.raises(ConfigError, match=fragment):
        make_config("unipelt", options)


def test_unipelt_refuses_a_model_already_carrying_a_method(tiny_model_dir):
    adapted = AdaptedModel.load(tiny_model_dir, "none", "unipelt", make_config("unipelt", OPTIONS))
    with pytest.raises(ConfigError, match="already carries"):
        get_method("unipelt").build(adapted.model, make_config("unipelt", OPTIONS))


def test_cached_decoding_gates_the_prefix_once(tiny_model_dir):
    """generate() reuses the cache after the prefill; the prefix must not be gated again at
    every step, so cached decoding scores equal full re-forwards (the causal-LM gate does
    not depend on the input, so both must agree exactly)."""
    adapted = AdaptedModel.load(tiny_model_dir, "none", "unipelt", make_config("unipelt", OPTIONS), seed=0)
    model = adapted.model
    torch.nn.init.normal_(model.prompt_encoder.default.embedding.weight, std=1.0)  # a prefix that matters
    for gate in _prefix_gates(model):
        torch.nn.init.constant_(gate.logit, -1.0)
    prompt = probe_batch(model.config.vocab_size)[0][:1, :6]
    model.eval()
    with torch.no_grad():
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False,
                             return_dict_in_generate=True, output_logits=True)
        for step, step_logits in enumerate(out.logits):
            seq = out.sequences[:, :prompt.shape[1] + step]
            full = model(input_ids=seq, attention_mask=torch.ones_like(seq)).logits[:, -1]
            torch.testing.assert_close(step_logits, full, rtol=0, atol=1e-5)
