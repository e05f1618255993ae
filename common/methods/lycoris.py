"""LyCORIS-family low-rank methods from HF peft: LoHa, LoKr, and HRA (Householder).

In peft 0.21.2 none of them has a bitsandbytes 4-bit layer implementation, so building
them on a 4-bit backbone fails deep inside peft. They are refused up front with a clear
error instead; on a full-precision base (`--quantize none`) they work.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from torch import nn

from fedpeft.common.errors import ConfigError
from fedpeft.common.methods.base import MethodConfig, require
from fedpeft.common.methods.peft_backed import PeftLibraryMethod
from fedpeft.common.methods.registry import register
from fedpeft.common.model.architectures import default_target_modules
from fedpeft.common.model.quantization import four_bit_layers


@dataclasses.dataclass(frozen=True)
class LowRankMethodConfig(MethodConfig):
    """Options shared by LoHa / LoKr / HRA."""

    r: int = 8
    alpha: int = 16
    """Scaling numerator (LoHa, LoKr); unused by HRA."""
    target_modules: tuple[str, ...] = ()
    """Module-name suffixes to adapt; empty: the model's attention query and value projections
    (`ArchitectureSpec.query_value`: q_proj/v_proj on Llama, query/value on BERT)."""

    def __post_init__(self) -> None:
        owner = type(self).__name__
        require(self.r >= 1, owner, "r", f"rank must be >= 1, got {self.r}")
        require(self.alpha > 0, owner, "alpha", f"must be > 0, got {self.alpha}")


def refuse_4bit_message(display: str) -> str:
    return (f"{display} has no 4-bit (bitsandbytes) layer support in peft 0.21.2; "
            "use --quantize none, or lora/ia3 on a 4-bit backbone")


class FullPrecisionOnlyMethod(PeftLibraryMethod):
    """A peft low-rank method without 4-bit support: refuse 4-bit backbones clearly."""

    config_cls: ClassVar[type[MethodConfig]] = LowRankMethodConfig
    supports_4bit: ClassVar[bool] = False
    display: ClassVar[str]
    peft_config_name: ClassVar[str]
    """Name of the peft config class (imported lazily: peft is slow to import)."""
    uses_alpha: ClassVar[bool] = True

    def build(self, model: nn.Module, config: MethodConfig) -> nn.Module:
        if four_bit_layers(model):
            raise ConfigError(refuse_4bit_message(self.display))
        assert isinstance(config, LowRankMethodConfig)
        if not config.target_modules:  # the architecture's own names, not Llama's on every model
            config = dataclasses.replace(config, target_modules=default_target_modules(model))
        return super().build(model, config)

    def peft_config(self, config: MethodConfig):
        import peft

        assert isinstance(config, LowRankMethodConfig)
        extra = {"alpha": config.alpha} if self.uses_alpha else {}
        return getattr(peft, self.peft_config_name)(r=config.r, target_modules=list(config.target_modules) or None,
                                                    task_type=self.task_type, **extra)


@register
class LoHaMethod(FullPrecisionOnlyMethod):
    """LoHa: low-rank Hadamard product updates."""

    name: ClassVar[str] = "loha"
    display: ClassVar[str] = "LoHa"
    peft_config_name: ClassVar[str] = "LoHaConfig"


@register
class LoKrMethod(FullPrecisionOnlyMethod):
    """LoKr: low-rank Kronecker product updates."""

    name: ClassVar[str] = "lokr"
    display: ClassVar[str] = "LoKr"
    peft_config_name: ClassVar[str] = "LoKrConfig"


@register
class HRAMethod(FullPrecisionOnlyMethod):
    """HRA: Householder reflection adaptation (orthogonal updates; no alpha)."""

    name: ClassVar[str] = "hra"
    display: ClassVar[str] = "HRA"
    peft_config_name: ClassVar[str] = "HRAConfig"
    uses_alpha: ClassVar[bool] = False
