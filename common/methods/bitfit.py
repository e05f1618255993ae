"""BitFit (Ben Zaken et al. 2022): train only the bias terms; written in-house.

peft has no BitFit. Bias-free architectures (Llama, Mistral, Qwen without biases) have
nothing to train, which is refused with a clear error instead of a silent no-op.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

from torch import nn

from fedpeft.common.errors import ConfigError
from fedpeft.common.methods.base import MethodConfig, require
from fedpeft.common.methods.native import NativeMethod
from fedpeft.common.methods.registry import register


@dataclasses.dataclass(frozen=True)
class BitFitMethodConfig(MethodConfig):
    """Options of BitFit."""

    scope: Literal["all", "no_norm"] = "all"
    """all: every bias; no_norm: leave LayerNorm biases frozen (only linear/conv biases)."""

    def __post_init__(self) -> None:
        require(self.scope in ("all", "no_norm"), type(self).__name__, "scope", f"{self.scope!r} is not 'all' or 'no_norm'")


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm | nn.GroupNorm) or "norm" in type(module).__name__.lower()


@register
class BitFitMethod(NativeMethod):
    """Bias-only fine-tuning; the delta is the selected bias vectors."""

    name: ClassVar[str] = "bitfit"
    federated_learning_rate: ClassVar[float] = 5e-3  # bias terms only
    federated_local_steps: ClassVar[int] = 24  # see PeftMethod.federated_local_steps
    config_cls: ClassVar[type[MethodConfig]] = BitFitMethodConfig
    peft_type: ClassVar[str] = "FEDPEFT_BITFIT"

    def attach(self, model: nn.Module, config: MethodConfig) -> nn.Module:
        assert isinstance(config, BitFitMethodConfig)
        chosen = 0
        for module in model.modules():
            bias = getattr(module, "bias", None)
            if isinstance(bias, nn.Parameter) and not (config.scope == "no_norm" and _is_norm(module)):
                bias.requires_grad_(True)
                chosen += 1
        if chosen == 0:
            model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
            raise ConfigError(f"BitFit: model type {model_type!r} has no bias parameters to train "
                              "(bias-free architecture); pick another method, e.g. lora or ia3")
        return model
