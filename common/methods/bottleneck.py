"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021), written in-house.

HF peft has no bottleneck adapter and AdapterHub's `adapters` pins an older transformers,
so this module provides one. An adapter is down-projection → non-linearity →
up-projection added residually to a sublayer's output; the up-projection starts at zero,
so a fresh adapter is the identity and training starts from the base model.

Placement (per block, looked up in `fedpeft.common.architectures`):
- houlsby: after the attention output projection and after the feed-forward output;
- pfeiffer: after the feed-forward output only.
Both sit before the block's residual add, wrapping the projection module, so no
`forward` of the model is patched.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import ClassVar, Literal

import torch
from torch import nn

from fedpeft.common.architectures import architecture_of, blocks_of
from fedpeft.common.errors import ConfigError
from fedpeft.common.methods.base import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, MethodConfig, PeftMethod, require
from fedpeft.common.methods.registry import register

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}
PEFT_TYPE = "FEDPEFT_BOTTLENECK"


@dataclasses.dataclass(frozen=True)
class BottleneckMethodConfig(MethodConfig):
    """Options of bottleneck adapters."""

    style: Literal["houlsby", "pfeiffer"] = "pfeiffer"
    """houlsby: adapters after attention and FFN; pfeiffer: after the FFN only."""
    reduction_factor: int = 16
    """Bottleneck width = hidden_size // reduction_factor."""
    non_linearity: Literal["relu", "gelu", "silu"] = "relu"
    """Activation between the down and up projections."""
    dropout: float = 0.0
    """Dropout on the adapter's output during training."""

    def __post_init__(self) -> None:
        owner = type(self).__name__
        require(self.style in ("houlsby", "pfeiffer"), owner, "style", f"{self.style!r} is not 'houlsby' or 'pfeiffer'")
        require(self.reduction_factor >= 1, owner, "reduction_factor", f"must be >= 1, got {self.reduction_factor}")
        require(self.non_linearity in ACTIVATIONS, owner, "non_linearity", f"{self.non_linearity!r} is not one of {sorted(ACTIVATIONS)}")
        require(0.0 <= self.dropout < 1.0, owner, "dropout", f"must be in [0, 1), got {self.dropout}")


class BottleneckAdapter(nn.Module):
    """x ↦ x + up(act(down(x))), with `up` zero-initialized (identity at start)."""

    def __init__(self, hidden_size: int, bottleneck_size: int, non_linearity: str, dropout: float) -> None:
        super().__init__()
        self.down = nn.Linear(hidden_size, bottleneck_size)
        self.act = ACTIVATIONS[non_linearity]()
        self.up = nn.Linear(bottleneck_size, hidden_size)
        self.dropout = nn.Dropout(dropout)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.dropout(self.up(self.act(self.down(hidden))))


class AdaptedSublayerOutput(nn.Module):
    """A sublayer's output projection followed by a bottleneck adapter.

    The adapter computes in its own (fp32) dtype and the result is cast back, so it
    works after 4-bit layers whose output is bf16.
    """

    def __init__(self, base_layer: nn.Module, adapter: BottleneckAdapter) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapter = adapter

    def forward(self, *args: object, **kwargs: object) -> torch.Tensor:
        out = self.base_layer(*args, **kwargs)
        adapter_dtype = self.adapter.up.weight.dtype
        return self.adapter(out.to(adapter_dtype)).to(out.dtype)


def _output_features(layer: nn.Module) -> int:
    for attr in ("out_features", "nf"):  # nn.Linear / bnb Linear4bit, GPT-2 Conv1D
        if isinstance(getattr(layer, attr, None), int):
            return getattr(layer, attr)
    raise ConfigError(f"cannot tell the output size of {type(layer).__name__} to place a bottleneck adapter")


@register
class BottleneckMethod(PeftMethod):
    """Houlsby / Pfeiffer bottleneck adapters (in-house; see the module docstring)."""

    name: ClassVar[str] = "bottleneck"
    config_cls: ClassVar[type[MethodConfig]] = BottleneckMethodConfig
    peft_backed: ClassVar[bool] = False

    def build(self, model: nn.Module, config: MethodConfig) -> nn.Module:
        self.check_config(config)
        assert isinstance(config, BottleneckMethodConfig)
        spec = architecture_of(model)
        sites = [spec.ffn_output] if config.style == "pfeiffer" else [spec.attention_output, spec.ffn_output]
        for param in model.parameters():
            param.requires_grad_(False)
        for block in blocks_of(model):
            for site in sites:
                parent_path, _, attr = site.rpartition(".")
                parent = block.get_submodule(parent_path) if parent_path else block
                base_layer = getattr(parent, attr)
                if isinstance(base_layer, AdaptedSublayerOutput):
                    raise ConfigError("model already has bottleneck adapters; build on a fresh base model")
                hidden = _output_features(base_layer)
                adapter = BottleneckAdapter(hidden, max(1, hidden // config.reduction_factor), config.non_linearity, config.dropout)
                device = next(base_layer.parameters()).device
                setattr(parent, attr, AdaptedSublayerOutput(base_layer, adapter.to(device)))
        model.fedpeft_bottleneck_config = config  # type: ignore[assignment]
        return model

    def save_adapter(self, model: nn.Module, out_dir: Path) -> None:
        from fedpeft.common.deltas import extract_delta, save_delta_file

        config = getattr(model, "fedpeft_bottleneck_config", None)
        if not isinstance(config, BottleneckMethodConfig):
            raise ConfigError("model has no bottleneck adapters to save")
        out_dir.mkdir(parents=True, exist_ok=True)
        meta = {"peft_type": PEFT_TYPE, "fedpeft_method": self.name, **config.to_dict()}
        (out_dir / ADAPTER_CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
        save_delta_file(extract_delta(model, self.delta_names(model)), out_dir / ADAPTER_WEIGHTS_FILE)

    def load_adapter(self, base: nn.Module, adapter_dir: Path) -> nn.Module:
        from fedpeft.common.deltas import DeltaSpec, apply_delta, load_delta_file

        meta = json.loads((adapter_dir / ADAPTER_CONFIG_FILE).read_text())
        if meta.get("peft_type") != PEFT_TYPE:
            raise ConfigError(f"{adapter_dir} is not a fedpeft bottleneck adapter (peft_type={meta.get('peft_type')!r})")
        options = {k: v for k, v in meta.items() if k not in {"peft_type", "fedpeft_method"}}
        model = self.build(base, BottleneckMethodConfig.from_options(options))
        names = self.delta_names(model)
        apply_delta(model, load_delta_file(adapter_dir / ADAPTER_WEIGHTS_FILE), DeltaSpec.of_model(model, names))
        return model
