"""UniPELT (Mao et al., ACL 2022, "UniPELT: A unified framework for parameter-efficient
language model tuning"): LoRA + prefix tuning + a bottleneck adapter in every block, each
submodule scaled by its own learned gate G = sigmoid(W_g · x) computed from that
submodule's input, so the model learns which submodules to use per layer (and input).

Design (all placement comes from `fedpeft.common.model.architectures`; no forward is patched):

- LoRA, in-house: each query and value projection (the table's `query_value`) is wrapped
  by `GatedLoraLinear`, computing base(x) + G_L(x)·(α/r)·B(A(dropout(x))) with a per-token
  gate G_L(x) = sigmoid(w·x + b). The base layer is only called, never read, so a
  bitsandbytes 4-bit base stays quantized. peft's LoRA cannot take a gate, hence in-house.
- Adapter: our bottleneck adapter at the Pfeiffer site (after the FFN output projection,
  the table's `ffn_output`), as h + G_A(h)·up(act(down(h))) with a per-token gate.
- Prefix: HF peft's prefix tuning wrapped around that model, as in `mam` (peft injects the
  prefix as a `past_key_values` cache; re-implementing it would mean patching attention).
  The gate G_P scales the prefix keys and values of one layer. A forward pre-hook on each
  block (the table's `blocks`) reads the block's input and the cache peft built, and
  replaces that layer's prefix keys/values by G_P·P_k, G_P·P_v before attention reads them;
  it gates only while the layer holds exactly the prefix, so a decoding step reusing an
  already gated cache is left alone.
  - sequence classifiers (the paper's setting): G_P = sigmoid(w·mean(x)) per example, x
    the block's input mean-pooled over non-padding tokens (a pre-hook on the table's
    `backbone` keeps the forward's 2-D padding mask, so padding does not move the gate);
  - causal LMs: a per-layer learned scalar G_P = sigmoid(b_l), independent of the input.
    **This deviates from the paper**: the prefix keys/values are shared by every query
    position, so a gate pooled over the sequence would let position t see tokens after t
    (breaking the causal LM objective) and would differ between a full forward and
    cached decoding. Per-query gating would require changing attention itself.

Initialization: LoRA B = 0 and the adapter's up-projection = 0, so the LoRA and adapter
branches are exactly zero at start whatever their gates say. The prefix is not: as in
the paper (and any prefix tuning), a fresh random prefix already changes the outputs, so
a fresh UniPELT model does *not* reproduce the base model's logits; it reproduces those
of the same prefix alone (tests/test_unipelt.py checks both facts).

The adapter dir is the native fedpeft layout (config + the whole delta: prompt encoder,
LoRA, adapters, all gates, and an encoder's classification head).
"""

from __future__ import annotations

import dataclasses
import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from fedpeft.common.errors import ConfigError
from fedpeft.common.methods.base import MethodConfig, require
from fedpeft.common.methods.bottleneck import ACTIVATIONS, BottleneckAdapter, output_features, sublayer_site
from fedpeft.common.methods.native import PeftWrappedNativeMethod
from fedpeft.common.methods.registry import register
from fedpeft.common.model.architectures import architecture_of, blocks_of, is_sequence_classifier

#: Name fragments of the in-house trainable modules (peft freezes everything it did not add).
OWN_MODULES = (".lora_A.", ".lora_B.", ".lora_gate.", ".adapter.", ".adapter_gate.", ".prefix_gate.")


@dataclasses.dataclass(frozen=True)
class UniPeltMethodConfig(MethodConfig):
    """Options of UniPELT (the paper's shape, scaled down)."""

    lora_r: int = 8
    """Rank of the gated LoRA update on the query and value projections."""
    lora_alpha: int = 16
    """LoRA scaling numerator: the update is (lora_alpha / lora_r)·B·A."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA input during training."""
    num_virtual_tokens: int = 10
    """Prefix length (key/value pairs prepended in every attention layer)."""
    prefix_projection: bool = False
    """Reparameterize the prefix through peft's 2-layer MLP."""
    encoder_hidden_size: int = 256
    """Hidden width of that MLP (prefix_projection=true only)."""
    reduction_factor: int = 16
    """Adapter bottleneck = hidden_size // reduction_factor."""
    non_linearity: Literal["relu", "gelu", "silu"] = "relu"
    """Activation between the adapter's down and up projections."""
    adapter_dropout: float = 0.0
    """Dropout on the adapter's output during training."""

    def __post_init__(self) -> None:
        owner = type(self).__name__
        require(self.lora_r >= 1, owner, "lora_r", f"rank must be >= 1, got {self.lora_r}")
        require(self.lora_alpha > 0, owner, "lora_alpha", f"must be > 0, got {self.lora_alpha}")
        require(0.0 <= self.lora_dropout < 1.0, owner, "lora_dropout", f"must be in [0, 1), got {self.lora_dropout}")
        require(self.num_virtual_tokens >= 1, owner, "num_virtual_tokens", f"must be >= 1, got {self.num_virtual_tokens}")
        require(self.encoder_hidden_size >= 1, owner, "encoder_hidden_size", f"must be >= 1, got {self.encoder_hidden_size}")
        require(self.reduction_factor >= 1, owner, "reduction_factor", f"must be >= 1, got {self.reduction_factor}")
        require(self.non_linearity in ACTIVATIONS, owner, "non_linearity",
                f"{self.non_linearity!r} is not one of {sorted(ACTIVATIONS)}")
        require(0.0 <= self.adapter_dropout < 1.0, owner, "adapter_dropout",
                f"must be in [0, 1), got {self.adapter_dropout}")


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _input_features(layer: nn.Module) -> int:
    for attr in ("in_features", "nx"):  # nn.Linear / bnb Linear4bit, GPT-2 Conv1D
        if isinstance(getattr(layer, attr, None), int):
            return getattr(layer, attr)
    raise ConfigError(f"cannot tell the input size of {type(layer).__name__} to place a gated LoRA")


class GatedLoraLinear(nn.Module):
    """base(x) + sigmoid(gate(x))·(α/r)·B(A(dropout(x))), per token; B starts at zero.

    The branch runs in fp32 and is cast to the base output's dtype (bf16 after 4-bit layers).
    """

    def __init__(self, base_layer: nn.Module, r: int, alpha: int, dropout: float) -> None:
        super().__init__()
        in_features, out_features, device = _input_features(base_layer), output_features(base_layer), _device_of(base_layer)
        self.base_layer = base_layer
        self.lora_A = nn.Linear(in_features, r, bias=False, device=device)
        self.lora_B = nn.Linear(r, out_features, bias=False, device=device)
        self.lora_gate = nn.Linear(in_features, 1, device=device)
        self.dropout = nn.Dropout(dropout)
        self.scaling = alpha / r
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        h = x.to(self.lora_A.weight.dtype)
        update = self.scaling * self.lora_B(self.lora_A(self.dropout(h)))
        return out + (torch.sigmoid(self.lora_gate(h)) * update).to(out.dtype)


class GatedAdapterOutput(nn.Module):
    """A sublayer's output projection followed by h + sigmoid(gate(h))·adapter(h), per token."""

    def __init__(self, base_layer: nn.Module, adapter: BottleneckAdapter) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapter = adapter
        self.adapter_gate = nn.Linear(adapter.up.out_features, 1, device=adapter.up.weight.device)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base_layer(*args, **kwargs)
        h = out.to(self.adapter.up.weight.dtype)
        return (h + torch.sigmoid(self.adapter_gate(h)) * self.adapter.branch(h)).to(out.dtype)


class PaddingMask:
    """Forward pre-hook on the backbone: keeps the current forward's 2-D padding mask
    (peft prepends the prefix's columns) for the input-dependent prefix gates."""

    def __init__(self, backbone: nn.Module) -> None:
        self.mask: torch.Tensor | None = None
        self._signature = inspect.signature(backbone.forward)

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        mask = self._signature.bind_partial(*args, **kwargs).arguments.get("attention_mask")
        self.mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None


class PrefixGate(nn.Module, ABC):
    """G_P of one layer; `scale_prefix` is that block's forward pre-hook (see the module docstring)."""

    def __init__(self, block: nn.Module, layer_index: int, num_virtual_tokens: int) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.num_virtual_tokens = num_virtual_tokens
        self._signature = inspect.signature(block.forward)

    @abstractmethod
    def gate(self, hidden: torch.Tensor) -> torch.Tensor:
        """The gate per example, shape (batch,) or (1,), in (0, 1)."""

    def scale_prefix(self, block: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Block pre-hook: gate this layer's prefix in the cache peft passed, before attention reads it.
        Arguments are bound by name because some families (GPT-2) pass the cache positionally."""
        bound = self._signature.bind_partial(*args, **kwargs).arguments
        cache = bound.get("past_key_values")
        if cache is None:  # no prefix in this forward (e.g. the base model called directly)
            return
        cache = getattr(cache, "self_attention_cache", cache)  # EncoderDecoderCache
        layers = getattr(cache, "layers", ())
        if self.layer_index >= len(layers):
            return
        layer = layers[self.layer_index]
        keys = getattr(layer, "keys", None)
        if not isinstance(keys, torch.Tensor) or keys.shape[-2] != self.num_virtual_tokens:
            return  # a decoding step whose cache already holds the gated prefix and earlier tokens
        gate = self.gate(bound["hidden_states"]).to(keys.dtype).view(-1, 1, 1, 1)
        layer.keys = keys * gate
        layer.values = layer.values * gate


class InputPrefixGate(PrefixGate):
    """The paper's G_P = sigmoid(w · mean-pooled block input), per example."""

    def __init__(self, block: nn.Module, layer_index: int, num_virtual_tokens: int, hidden_size: int,
                 padding: PaddingMask) -> None:
        super().__init__(block, layer_index, num_virtual_tokens)
        self.proj = nn.Linear(hidden_size, 1, device=_device_of(block))
        self.padding = padding

    def gate(self, hidden: torch.Tensor) -> torch.Tensor:
        h = hidden.to(self.proj.weight.dtype)
        mask = self.padding.mask
        if mask is None:
            pooled = h.mean(dim=1)
        else:
            keep = mask[:, -h.shape[1]:].to(h.dtype).unsqueeze(-1)
            pooled = (h * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1.0)
        return torch.sigmoid(self.proj(pooled)).squeeze(-1)


class StaticPrefixGate(PrefixGate):
    """G_P = sigmoid(b_l), one learned scalar per layer (causal LMs; a deviation, see above)."""

    def __init__(self, block: nn.Module, layer_index: int, num_virtual_tokens: int) -> None:
        super().__init__(block, layer_index, num_virtual_tokens)
        self.logit = nn.Parameter(torch.zeros(1, device=_device_of(block)))

    def gate(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logit)


def _place(block: nn.Module, path: str, make: Callable[[nn.Module], nn.Module]) -> None:
    """Replace the module at `path` inside `block` by `make(module)`."""
    parent, attr, base_layer = sublayer_site(block, path)
    setattr(parent, attr, make(base_layer))


def _gated_adapter(layer: nn.Module, config: UniPeltMethodConfig) -> GatedAdapterOutput:
    features = output_features(layer)
    adapter = BottleneckAdapter(features, max(1, features // config.reduction_factor), config.non_linearity,
                                config.adapter_dropout)
    return GatedAdapterOutput(layer, adapter.to(_device_of(layer)))


def place_unipelt_modules(model: nn.Module, config: UniPeltMethodConfig) -> None:
    """Add gated LoRA, gated adapters and prefix gates (with their hooks) to every block."""
    spec = architecture_of(model)
    hidden_size = model.config.hidden_size
    input_gated = is_sequence_classifier(model)
    padding = PaddingMask(model.get_submodule(spec.backbone)) if input_gated else None
    if padding is not None:
        model.get_submodule(spec.backbone).register_forward_pre_hook(padding, with_kwargs=True)
    for index, block in enumerate(blocks_of(model)):
        for path in spec.query_value:
            _place(block, path, lambda layer: GatedLoraLinear(layer, config.lora_r, config.lora_alpha, config.lora_dropout))
        _place(block, spec.ffn_output, lambda layer: _gated_adapter(layer, config))
        if hasattr(block, "prefix_gate"):
            raise ConfigError(f"block {index} of {type(model).__name__} already has a 'prefix_gate' attribute")
        gate: PrefixGate
        if padding is not None:
            gate = InputPrefixGate(block, index, config.num_virtual_tokens, hidden_size, padding)
        else:
            gate = StaticPrefixGate(block, index, config.num_virtual_tokens)
        block.prefix_gate = gate
        block.register_forward_pre_hook(gate.scale_prefix, with_kwargs=True)


@register
class UniPeltMethod(PeftWrappedNativeMethod):
    """Gated LoRA (in-house) + gated prefix tuning (peft) + gated bottleneck adapter (in-house)."""

    name: ClassVar[str] = "unipelt"
    kv_prefix: ClassVar[bool] = True
    config_cls: ClassVar[type[MethodConfig]] = UniPeltMethodConfig
    peft_type: ClassVar[str] = "FEDPEFT_UNIPELT"

    def attach(self, model: nn.Module, config: MethodConfig) -> nn.Module:
        """Place the in-house gated modules, then wrap in peft's prefix tuning (which freezes
        everything it did not add, so our modules are marked trainable again)."""
        from peft import PrefixTuningConfig, get_peft_model

        assert isinstance(config, UniPeltMethodConfig)
        place_unipelt_modules(model, config)
        task_type = "SEQ_CLS" if is_sequence_classifier(model) else "CAUSAL_LM"
        prefix = PrefixTuningConfig(num_virtual_tokens=config.num_virtual_tokens, prefix_projection=config.prefix_projection,
                                    encoder_hidden_size=config.encoder_hidden_size, task_type=task_type)
        try:
            wrapped = get_peft_model(model, prefix)
        except (ValueError, TypeError, KeyError) as exc:
            raise ConfigError(f"method 'unipelt' cannot be applied to this model: {exc}") from exc
        for name, param in wrapped.named_parameters():
            if any(fragment in name for fragment in OWN_MODULES):
                param.requires_grad_(True)
        return wrapped
