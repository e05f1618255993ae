"""Prefix tuning (Li & Liang 2021): trainable key/value prefixes in every layer; via HF peft."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from fedpeft.common.methods.base import MethodConfig, require
from fedpeft.common.methods.peft_backed import PeftLibraryMethod
from fedpeft.common.methods.registry import register


@dataclasses.dataclass(frozen=True)
class PrefixMethodConfig(MethodConfig):
    """Options of prefix tuning."""

    num_virtual_tokens: int = 16
    """Prefix length (key/value pairs prepended in every layer)."""
    prefix_projection: bool = False
    """Reparameterize the prefix through a 2-layer MLP (the paper's stabilizer)."""
    encoder_hidden_size: int = 256
    """Hidden width of that MLP (used only with prefix_projection=true)."""

    def __post_init__(self) -> None:
        owner = type(self).__name__
        require(self.num_virtual_tokens >= 1, owner, "num_virtual_tokens", f"must be >= 1, got {self.num_virtual_tokens}")
        require(self.encoder_hidden_size >= 1, owner, "encoder_hidden_size", f"must be >= 1, got {self.encoder_hidden_size}")


@register
class PrefixMethod(PeftLibraryMethod):
    """Prefix tuning. The delta is every trainable tensor of the prompt encoder —
    with prefix_projection that includes the MLP, which peft's own saved adapter
    folds away (it stores only the projected prefix)."""

    name: ClassVar[str] = "prefix"
    federated_learning_rate: ClassVar[float] = 1e-2  # soft prefixes need ~10x LoRA's steps
    federated_local_steps: ClassVar[int] = 24  # see PeftMethod.federated_local_steps
    kv_prefix: ClassVar[bool] = True
    config_cls: ClassVar[type[MethodConfig]] = PrefixMethodConfig

    def peft_config(self, config: MethodConfig):
        from peft import PrefixTuningConfig

        assert isinstance(config, PrefixMethodConfig)
        return PrefixTuningConfig(
            num_virtual_tokens=config.num_virtual_tokens,
            prefix_projection=config.prefix_projection,
            encoder_hidden_size=config.encoder_hidden_size,
            task_type=self.task_type,
        )
