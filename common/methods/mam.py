"""MAM adapter (He et al. 2022, "Towards a unified view of parameter-efficient transfer
learning"): prefix tuning on attention + a scaled parallel adapter beside the FFN.

Built by composition rather than re-implementing either half:
- the parallel adapter is our in-house bottleneck module (style=parallel), placed
  through the architecture table before wrapping;
- the prefix is HF peft's prefix tuning, wrapped around that model. peft injects the
  prefix as `past_key_values` (a Cache the attention layers read), which is the
  transformers-supported way to add key/value positions for every family peft knows
  (Llama, BERT, ...); re-implementing it in-house would mean patching attention.
peft's own saved adapter would drop our FFN adapters, so the adapter dir is the
native fedpeft layout (config + the whole delta: prompt encoder, adapters, and an
encoder's classification head).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

from torch import nn

from fedpeft.common.errors import ConfigError
from fedpeft.common.methods.base import MethodConfig, require
from fedpeft.common.methods.bottleneck import ACTIVATIONS, BottleneckMethodConfig, place_bottleneck_adapters
from fedpeft.common.methods.native import PeftWrappedNativeMethod
from fedpeft.common.methods.registry import register
from fedpeft.common.model.architectures import is_sequence_classifier


@dataclasses.dataclass(frozen=True)
class MamMethodConfig(MethodConfig):
    """Options of the MAM adapter (defaults follow the paper's shape, scaled down)."""

    num_virtual_tokens: int = 16
    """Prefix length (key/value pairs prepended in every attention layer)."""
    prefix_projection: bool = False
    """Reparameterize the prefix through peft's 2-layer MLP."""
    encoder_hidden_size: int = 256
    """Hidden width of that MLP (prefix_projection=true only)."""
    reduction_factor: int = 4
    """Parallel adapter bottleneck = hidden_size // reduction_factor."""
    non_linearity: Literal["relu", "gelu", "silu"] = "relu"
    scaling: float = 4.0
    """The parallel adapter's output scale s."""
    dropout: float = 0.0
    """Dropout on the adapter's output during training."""

    def __post_init__(self) -> None:
        owner = type(self).__name__
        require(self.num_virtual_tokens >= 1, owner, "num_virtual_tokens", f"must be >= 1, got {self.num_virtual_tokens}")
        require(self.encoder_hidden_size >= 1, owner, "encoder_hidden_size", f"must be >= 1, got {self.encoder_hidden_size}")
        require(self.reduction_factor >= 1, owner, "reduction_factor", f"must be >= 1, got {self.reduction_factor}")
        require(self.non_linearity in ACTIVATIONS, owner, "non_linearity",
                f"{self.non_linearity!r} is not one of {sorted(ACTIVATIONS)}")
        require(self.scaling > 0, owner, "scaling", f"must be > 0, got {self.scaling}")
        require(0.0 <= self.dropout < 1.0, owner, "dropout", f"must be in [0, 1), got {self.dropout}")

    def adapter_config(self) -> BottleneckMethodConfig:
        return BottleneckMethodConfig(style="parallel", reduction_factor=self.reduction_factor,
                                      non_linearity=self.non_linearity, dropout=self.dropout, scaling=self.scaling)


@register
class MamMethod(PeftWrappedNativeMethod):
    """Prefix tuning (peft) + scaled parallel FFN adapter (in-house)."""

    name: ClassVar[str] = "mam"
    kv_prefix: ClassVar[bool] = True
    config_cls: ClassVar[type[MethodConfig]] = MamMethodConfig
    peft_type: ClassVar[str] = "FEDPEFT_MAM"

    def attach(self, model: nn.Module, config: MethodConfig) -> nn.Module:
        from peft import PrefixTuningConfig, get_peft_model

        assert isinstance(config, MamMethodConfig)
        place_bottleneck_adapters(model, config.adapter_config())
        task_type = "SEQ_CLS" if is_sequence_classifier(model) else "CAUSAL_LM"
        prefix = PrefixTuningConfig(num_virtual_tokens=config.num_virtual_tokens, prefix_projection=config.prefix_projection,
                                    encoder_hidden_size=config.encoder_hidden_size, task_type=task_type)
        try:
            wrapped = get_peft_model(model, prefix)
        except (ValueError, TypeError, KeyError) as exc:
            raise ConfigError(f"method 'mam' cannot be applied to this model: {exc}") from exc
        for name, param in wrapped.named_parameters():
            if ".adapter." in name:
                param.requires_grad_(True)
        return wrapped
