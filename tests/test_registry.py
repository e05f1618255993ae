"""Method registry and typed method configs: lookups, coercion and validation errors."""

from __future__ import annotations

import pytest

from fedpeft.common.errors import ConfigError, UnknownMethodError
from fedpeft.common.methods import available_methods, get_method, make_config, register
from fedpeft.common.methods.bottleneck import BottleneckMethodConfig
from fedpeft.common.methods.lora import LoraMethod, LoraMethodConfig
from fedpeft.common.methods.prefix import PrefixMethodConfig


def test_builtin_methods_are_registered():
    assert {"lora", "prefix", "bottleneck"} <= set(available_methods())


def test_unknown_method_lists_supported_ones():
    with pytest.raises(UnknownMethodError) as err:
        get_method("lorra")
    message = str(err.value)
    assert "'lorra'" in message
    for name in available_methods():
        assert name in message


def test_duplicate_registration_is_refused():
    with pytest.raises(ConfigError, match="already registered"):
        register(LoraMethod)


def test_options_from_strings_are_coerced_to_field_types():
    config = make_config("lora", {"r": "16", "alpha": "32", "dropout": "0.1", "use_dora": "true",
                                  "target_modules": "q_proj, v_proj"})
    assert config == LoraMethodConfig(r=16, alpha=32, dropout=0.1, use_dora=True, target_modules=("q_proj", "v_proj"))


# Methods with an option no default can fill (a schedule length, stage-1 adapter dirs).
REQUIRED_OPTIONS = {"adalora": {"total_step": "10"}, "adapter_fusion": {"adapter_dirs": "task-a,task-b"}}


def test_defaults_round_trip_through_dict():
    for name in available_methods():
        config = make_config(name, REQUIRED_OPTIONS.get(name))
        assert make_config(name, config.to_dict()) == config


@pytest.mark.parametrize("name", sorted(REQUIRED_OPTIONS))
def test_required_options_are_named_when_missing(name):
    with pytest.raises(ConfigError, match=next(iter(REQUIRED_OPTIONS[name]))):
        make_config(name)


@pytest.mark.parametrize(
    ("method", "options", "fragment"),
    [
        ("lora", {"r": "0"}, "LoraMethodConfig.r"),
        ("lora", {"r": "eight"}, "LoraMethodConfig.r"),
        ("lora", {"dropout": "1.5"}, "LoraMethodConfig.dropout"),
        ("lora", {"use_dora": "maybe"}, "LoraMethodConfig.use_dora"),
        ("lora", {"target_modules": "all-linear,q_proj"}, "LoraMethodConfig.target_modules"),
        ("lora", {"rank": "8"}, "unknown option(s) ['rank']"),
        ("prefix", {"num_virtual_tokens": "0"}, "PrefixMethodConfig.num_virtual_tokens"),
        ("bottleneck", {"style": "serial"}, "BottleneckMethodConfig.style"),
        ("bottleneck", {"reduction_factor": "0"}, "BottleneckMethodConfig.reduction_factor"),
        ("bottleneck", {"non_linearity": "tanh"}, "BottleneckMethodConfig.non_linearity"),
    ],
)
def test_bad_options_name_the_field(method, options, fragment):
    with pytest.raises(ConfigError) as err:
        make_config(method, options)
    assert fragment in str(err.value)


def test_configs_validate_when_built_directly():
    with pytest.raises(ConfigError, match="alpha"):
        LoraMethodConfig(alpha=0)
    with pytest.raises(ConfigError, match="encoder_hidden_size"):
        PrefixMethodConfig(encoder_hidden_size=0)
    with pytest.raises(ConfigError, match="dropout"):
        BottleneckMethodConfig(dropout=-0.1)


def test_method_rejects_a_config_of_another_method(tiny_model_dir):
    from fedpeft.common.model.base_model import load_base_model

    base = load_base_model(tiny_model_dir, quantize="none")
    with pytest.raises(ConfigError, match="needs a LoraMethodConfig"):
        get_method("lora").build(base, PrefixMethodConfig())
