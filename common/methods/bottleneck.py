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

AdapterDrop (Rücklé et al. 2021) is built in: `drop_lowest=k` places no adapters in the
lowest k blocks at all (fewer parameters, and backprop can stop above them);
`train_drop_max=m` drops the adapters of the lowest U{0..m} adapted blocks at every
training step (a forward pre-hook draws from torch's seeded RNG), which keeps the
adapter usable when its lowest layers are later dropped at inference with
`set_inference_drop(model, k)` for speed.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

import torch
from torch import nn

from fedpeft.common.architectures import architecture_of, blocks_of
from fedpeft.common.errors import ConfigError
from fedpeft.common.methods.base import MethodConfig, require
from fedpeft.common.methods.native import NativeMethod
from fedpeft.common.methods.registry import register

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


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
    drop_lowest: int = 0
    """AdapterDrop: no adapters in the lowest this-many blocks (train and inference)."""
    train_drop_max: int = 0
    """Robust AdapterDrop: each training step drops the lowest U{0..train_drop_max} adapted blocks."""

    def __post_init__(self) -> None:
        owner = type(self).__name__
        require(self.style in ("houlsby", "pfeiffer"), owner, "style", f"{self.style!r} is not 'houlsby' or 'pfeiffer'")
        require(self.reduction_factor >= 1, owner, "reduction_factor", f"must be >= 1, got {self.reduction_factor}")
        require(self.non_linearity in ACTIVATIONS, owner, "non_linearity",
                f"{self.non_linearity!r} is not one of {sorted(ACTIVATIONS)}")
        require(0.0 <= self.dropout < 1.0, owner, "dropout", f"must be in [0, 1), got {self.dropout}")
        require(self.drop_lowest >= 0, owner, "drop_lowest", f"must be >= 0, got {self.drop_lowest}")
        require(self.train_drop_max >= 0, owner, "train_drop_max", f"must be >= 0, got {self.train_drop_max}")


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

    def __init__(self, base_layer: nn.Module, adapter: BottleneckAdapter, block_index: int) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapter = adapter
        self.block_index = block_index
        self.active = True

    def forward(self, *args: object, **kwargs: object) -> torch.Tensor:
        out = self.base_layer(*args, **kwargs)
        if not self.active:
            return out
        adapter_dtype = self.adapter.up.weight.dtype
        return self.adapter(out.to(adapter_dtype)).to(out.dtype)


def _output_features(layer: nn.Module) -> int:
    for attr in ("out_features", "nf"):  # nn.Linear / bnb Linear4bit, GPT-2 Conv1D
        if isinstance(getattr(layer, attr, None), int):
            return getattr(layer, attr)
    raise ConfigError(f"cannot tell the output size of {type(layer).__name__} to place a bottleneck adapter")


@register
class BottleneckMethod(NativeMethod):
    """Houlsby / Pfeiffer bottleneck adapters (in-house; see the module docstring)."""

    name: ClassVar[str] = "bottleneck"
    config_cls: ClassVar[type[MethodConfig]] = BottleneckMethodConfig
    peft_type: ClassVar[str] = "FEDPEFT_BOTTLENECK"

    def attach(self, model: nn.Module, config: MethodConfig) -> nn.Module:
        assert isinstance(config, BottleneckMethodConfig)
        spec = architecture_of(model)
        sites = [spec.ffn_output] if config.style == "pfeiffer" else [spec.attention_output, spec.ffn_output]
        for index, block in enumerate(blocks_of(model)):
            if index < config.drop_lowest:
                continue
            for site in sites:
                parent_path, _, attr = site.rpartition(".")
                parent = block.get_submodule(parent_path) if parent_path else block
                base_layer = getattr(parent, attr)
                hidden = _output_features(base_layer)
                adapter = BottleneckAdapter(hidden, max(1, hidden // config.reduction_factor), config.non_linearity,
                                            config.dropout)
                device = next(base_layer.parameters()).device
                setattr(parent, attr, AdaptedSublayerOutput(base_layer, adapter.to(device), index))
        if not any(isinstance(m, AdaptedSublayerOutput) for m in model.modules()):
            raise ConfigError(f"BottleneckMethodConfig.drop_lowest={config.drop_lowest} leaves no block with an adapter")
        # Always hooked, so set_inference_drop only ever applies in eval mode.
        model.register_forward_pre_hook(_RandomAdapterDrop(config.train_drop_max))
        return model


def adapted_sublayers(model: nn.Module) -> list[AdaptedSublayerOutput]:
    return [m for m in model.modules() if isinstance(m, AdaptedSublayerOutput)]


def _drop_lowest_adapted_blocks(model: nn.Module, count: int) -> None:
    """Deactivate the adapters of the lowest `count` blocks that have adapters."""
    sublayers = adapted_sublayers(model)
    blocks = sorted({m.block_index for m in sublayers})
    dropped = set(blocks[:count])
    for module in sublayers:
        module.active = module.block_index not in dropped


INFERENCE_DROP_ATTR = "fedpeft_inference_drop"


def set_inference_drop(model: nn.Module, count: int) -> None:
    """AdapterDrop at inference: skip the adapters of the lowest `count` adapted blocks
    whenever the model is in eval mode (training mode keeps its own drop policy)."""
    if count < 0:
        raise ConfigError(f"inference drop must be >= 0, got {count}")
    setattr(model, INFERENCE_DROP_ATTR, count)
    _drop_lowest_adapted_blocks(model, count)


class _RandomAdapterDrop:
    """Forward pre-hook: in training mode drop the lowest U{0..max_drop} adapted blocks;
    in eval mode apply the inference drop (none unless `set_inference_drop` was called)."""

    def __init__(self, max_drop: int) -> None:
        self.max_drop = max_drop

    def __call__(self, model: nn.Module, args: object) -> None:
        if model.training:
            count = int(torch.randint(0, self.max_drop + 1, ()).item()) if self.max_drop else 0
        else:
            count = int(getattr(model, INFERENCE_DROP_ATTR, 0))
        _drop_lowest_adapted_blocks(model, count)
