"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021), written in-house.

HF peft has no bottleneck adapter and AdapterHub's `adapters` pins an older transformers,
so this module provides one. An adapter is down-projection → non-linearity →
up-projection added residually to a sublayer's output; the up-projection starts at zero,
so a fresh adapter is the identity and training starts from the base model.

Placement (per block, looked up in `fedpeft.common.model.architectures`):
- houlsby: after the attention output projection and after the feed-forward output;
- pfeiffer: after the feed-forward output only;
- parallel (He et al. 2022, "Towards a unified view of parameter-efficient transfer
  learning"): reads the feed-forward sublayer's *input* and adds `scaling`·adapter(x)
  next to the FFN's output, i.e. h = x + FFN(x) + s·up(act(down(x))).
Serial adapters sit before the block's residual add, wrapping the projection module;
the parallel one wraps the FFN module (the table's `ffn_parallel` site). No `forward`
of the model is patched.

AdapterDrop (Rücklé et al. 2021) is built in: `drop_lowest=k` places no adapters in the
lowest k blocks at all (fewer parameters, and backprop can stop above them);
`train_drop_max=m` drops the adapters of the lowest U{0..m} adapted blocks at every
training step (a forward pre-hook draws from torch's seeded RNG), which keeps the
adapter usable when its lowest layers are later dropped at inference with
`set_inference_drop(model, k)` for speed.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from fedpeft.common.errors import ConfigError
from fedpeft.common.methods.base import MethodConfig, require
from fedpeft.common.methods.native import NativeMethod
from fedpeft.common.methods.registry import register
from fedpeft.common.model.architectures import ParallelSite, architecture_of, blocks_of

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}
STYLES = ("houlsby", "pfeiffer", "parallel")


@dataclasses.dataclass(frozen=True)
class BottleneckMethodConfig(MethodConfig):
    """Options of bottleneck adapters."""

    style: Literal["houlsby", "pfeiffer", "parallel"] = "pfeiffer"
    """houlsby: adapters after attention and FFN; pfeiffer: after the FFN only;
    parallel: one adapter beside the FFN, fed the FFN's input."""
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
    scaling: float = 4.0
    """style=parallel only: the adapter output is multiplied by this (He et al.'s s=4)."""

    def __post_init__(self) -> None:
        owner = type(self).__name__
        require(self.style in STYLES, owner, "style", f"{self.style!r} is not one of {list(STYLES)}")
        require(self.scaling > 0, owner, "scaling", f"must be > 0, got {self.scaling}")
        require(self.style == "parallel" or self.scaling == 4.0, owner, "scaling", "only applies to style=parallel")
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

    def branch(self, hidden: torch.Tensor) -> torch.Tensor:
        """The adapter's contribution alone: up(act(down(x))), without the residual."""
        return self.dropout(self.up(self.act(self.down(hidden))))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.branch(hidden)


class AdapterSite(nn.Module):
    """A wrapped base module carrying one adapter; AdapterDrop toggles `active`."""

    def __init__(self, base_layer: nn.Module, adapter: nn.Module, block_index: int) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapter = adapter
        self.block_index = block_index
        self.active = True


class AdaptedSublayerOutput(AdapterSite):
    """A sublayer's output projection followed by a bottleneck adapter.

    The adapter computes in its own (fp32) dtype and the result is cast back, so it
    works after 4-bit layers whose output is bf16.
    """

    def forward(self, *args: object, **kwargs: object) -> torch.Tensor:
        out = self.base_layer(*args, **kwargs)
        if not self.active:
            return out
        adapter_dtype = self.adapter.up.weight.dtype
        return self.adapter(out.to(adapter_dtype)).to(out.dtype)


class ParallelAdaptedSublayer(AdapterSite):
    """An FFN module with a bottleneck adapter beside it, fed the same input (see
    `ParallelSite` for where the scaled adapter output is added)."""

    def __init__(self, base_layer: nn.Module, adapter: BottleneckAdapter, block_index: int, site: ParallelSite,
                 scaling: float) -> None:
        super().__init__(base_layer, adapter, block_index)
        self.site = site
        self.scaling = scaling

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not self.active:
            return self.base_layer(*args, **kwargs)
        x = args[self.site.input_arg]
        branch = self.scaling * self.adapter.branch(x.to(self.adapter.up.weight.dtype))
        if self.site.into_residual:
            args = (*args[:self.site.input_arg], x + branch.to(x.dtype), *args[self.site.input_arg + 1:])
            return self.base_layer(*args, **kwargs)
        out = self.base_layer(*args, **kwargs)
        return out + branch.to(out.dtype)


def output_features(layer: nn.Module) -> int:
    for attr in ("out_features", "nf"):  # nn.Linear / bnb Linear4bit, GPT-2 Conv1D
        if isinstance(getattr(layer, attr, None), int):
            return getattr(layer, attr)
    raise ConfigError(f"cannot tell the output size of {type(layer).__name__} to place a bottleneck adapter")


@register
class BottleneckMethod(NativeMethod):
    """Houlsby / Pfeiffer / parallel bottleneck adapters (in-house; see the module docstring)."""

    name: ClassVar[str] = "bottleneck"
    federated_learning_rate: ClassVar[float] = 2e-3  # zero-initialised up-projections
    federated_local_steps: ClassVar[int] = 24  # see PeftMethod.federated_local_steps
    config_cls: ClassVar[type[MethodConfig]] = BottleneckMethodConfig
    peft_type: ClassVar[str] = "FEDPEFT_BOTTLENECK"

    def attach(self, model: nn.Module, config: MethodConfig) -> nn.Module:
        assert isinstance(config, BottleneckMethodConfig)
        place_bottleneck_adapters(model, config)
        # Always hooked, so set_inference_drop only ever applies in eval mode. On the transformer
        # body, not the whole model: the causal-LM objective calls the body directly.
        body = model.get_submodule(architecture_of(model).backbone)
        body.register_forward_pre_hook(_RandomAdapterDrop(model, config.train_drop_max))
        return model


def _new_adapter(hidden: int, config: BottleneckMethodConfig, like: nn.Module) -> BottleneckAdapter:
    adapter = BottleneckAdapter(hidden, max(1, hidden // config.reduction_factor), config.non_linearity, config.dropout)
    return adapter.to(next(like.parameters()).device)


def place_bottleneck_adapters(model: nn.Module, config: BottleneckMethodConfig) -> None:
    """Wrap every adapted block's sites (per `config.style`) with a fresh adapter."""
    spec = architecture_of(model)
    for index, block in enumerate(blocks_of(model)):
        if index < config.drop_lowest:
            continue
        if config.style == "parallel":
            site = spec.ffn_parallel
            parent, attr, base_layer = sublayer_site(block, site.module)
            adapter = _new_adapter(model.config.hidden_size, config, base_layer)
            setattr(parent, attr, ParallelAdaptedSublayer(base_layer, adapter, index, site, config.scaling))
            continue
        for path in [spec.ffn_output] if config.style == "pfeiffer" else [spec.attention_output, spec.ffn_output]:
            parent, attr, base_layer = sublayer_site(block, path)
            adapter = _new_adapter(output_features(base_layer), config, base_layer)
            setattr(parent, attr, AdaptedSublayerOutput(base_layer, adapter, index))
    if not adapted_sublayers(model):
        raise ConfigError(f"BottleneckMethodConfig.drop_lowest={config.drop_lowest} leaves no block with an adapter")


def sublayer_site(block: nn.Module, path: str) -> tuple[nn.Module, str, nn.Module]:
    """(parent module, attribute name, module) of the dotted `path` inside `block`."""
    parent_path, _, attr = path.rpartition(".")
    parent = block.get_submodule(parent_path) if parent_path else block
    return parent, attr, getattr(parent, attr)


def adapted_sublayers(model: nn.Module) -> list[AdapterSite]:
    return [m for m in model.modules() if isinstance(m, AdapterSite)]


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
    """Forward pre-hook on the transformer body of `model`: in training mode drop the
    lowest U{0..max_drop} adapted blocks; in eval mode apply the inference drop (none
    unless `set_inference_drop` was called on `model`)."""

    def __init__(self, model: nn.Module, max_drop: int) -> None:
        self.model = weakref.ref(model)  # the body is part of the model: no strong cycle
        self.max_drop = max_drop

    def __call__(self, body: nn.Module, args: object) -> None:
        model = self.model()
        if model is None:
            return
        if model.training:
            count = int(torch.randint(0, self.max_drop + 1, ()).item()) if self.max_drop else 0
        else:
            count = int(getattr(model, INFERENCE_DROP_ATTR, 0))
        _drop_lowest_adapted_blocks(model, count)
