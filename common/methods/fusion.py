"""AdapterFusion (Pfeiffer et al. 2021), stage 2: combine N frozen task adapters with
a trained attention over their outputs; written in-house (HF peft has neither
bottleneck adapters nor fusion).

Stage 1 is the `bottleneck` method (style=pfeiffer) trained once per task and saved
with `save_adapter`. Stage 2 (this method) loads those N adapters, frozen, beside each
block's feed-forward output (the architecture table's `ffn_output`) and adds a fusion
layer per block: with h the sublayer output and z_i = adapter_i(h),

    out = Σ_i softmax_i(Q(h) · K(z_i)) · V(z_i)

Q and K start random, V at the identity (the paper's initialization), so a fresh
fusion averages the adapters' outputs. The delta is the fusion layers only (plus a
new classification head on encoders); the stage-1 adapters are `shared_frozen_names`,
so the server checks every peer loaded bit-identical ones. The adapter dirs are read
from the same paths on every peer, like the base model.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from fedpeft.common.errors import ConfigError
from fedpeft.common.methods.base import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, MethodConfig, require
from fedpeft.common.methods.bottleneck import BottleneckAdapter, BottleneckMethod, BottleneckMethodConfig
from fedpeft.common.methods.native import NativeMethod
from fedpeft.common.methods.registry import register
from fedpeft.common.model.architectures import architecture_of, blocks_of


@dataclasses.dataclass(frozen=True)
class AdapterFusionMethodConfig(MethodConfig):
    """Options of AdapterFusion."""

    adapter_dirs: tuple[str, ...] = ()
    """Directories written by the bottleneck method's save_adapter (style=pfeiffer), at least two."""

    def __post_init__(self) -> None:
        owner = type(self).__name__
        require(len(self.adapter_dirs) >= 2, owner, "adapter_dirs",
                f"name at least two stage-1 adapters, got {len(self.adapter_dirs)}")
        require(len(set(self.adapter_dirs)) == len(self.adapter_dirs), owner, "adapter_dirs", "lists a directory twice")


class FusionLayer(nn.Module):
    """Attention of the sublayer output (query) over the adapters' outputs (keys/values)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)
        for proj in (self.query, self.key):
            nn.init.normal_(proj.weight, std=0.02)
            nn.init.zeros_(proj.bias)
        nn.init.eye_(self.value.weight)
        nn.init.zeros_(self.value.bias)

    def forward(self, hidden: torch.Tensor, adapter_outputs: torch.Tensor) -> torch.Tensor:
        """hidden [..., H], adapter_outputs [..., N, H] → [..., H]."""
        scores = torch.einsum("...h,...nh->...n", self.query(hidden), self.key(adapter_outputs))
        weights = torch.softmax(scores, dim=-1)
        return torch.einsum("...n,...nh->...h", weights, self.value(adapter_outputs))


class FusedSublayerOutput(nn.Module):
    """A sublayer's output projection followed by N frozen adapters and their fusion."""

    def __init__(self, base_layer: nn.Module, adapters: nn.ModuleList, fusion: FusionLayer) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapters = adapters
        self.fusion = fusion

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base_layer(*args, **kwargs)
        hidden = out.to(self.fusion.value.weight.dtype)
        stacked = torch.stack([adapter(hidden) for adapter in self.adapters], dim=-2)
        return self.fusion(hidden, stacked).to(out.dtype)


def _stage_one(adapter_dir: Path) -> tuple[BottleneckMethodConfig, dict[str, torch.Tensor]]:
    """A stage-1 adapter's config and weights, refusing anything but a pfeiffer bottleneck."""
    from fedpeft.common.protocol.deltas import load_delta_file

    config_file = adapter_dir / ADAPTER_CONFIG_FILE
    if not config_file.is_file():
        raise ConfigError(f"AdapterFusionMethodConfig.adapter_dirs: {adapter_dir} has no {ADAPTER_CONFIG_FILE}")
    meta = json.loads(config_file.read_text())
    if meta.get("peft_type") != BottleneckMethod.peft_type:
        raise ConfigError(f"AdapterFusionMethodConfig.adapter_dirs: {adapter_dir} is not a bottleneck adapter "
                          f"(peft_type={meta.get('peft_type')!r})")
    options = {k: v for k, v in meta.items() if k not in {"peft_type", "fedpeft_method"}}
    config = BottleneckMethodConfig.from_options(options)
    assert isinstance(config, BottleneckMethodConfig)
    if config.style != "pfeiffer":
        raise ConfigError(f"AdapterFusionMethodConfig.adapter_dirs: {adapter_dir} has style={config.style!r}; "
                          "fusion combines FFN-output adapters, train stage 1 with style=pfeiffer")
    return config, load_delta_file(adapter_dir / ADAPTER_WEIGHTS_FILE)


def _load_adapter(weights: dict[str, torch.Tensor], prefix: str, config: BottleneckMethodConfig, hidden: int,
                  source: Path) -> BottleneckAdapter:
    adapter = BottleneckAdapter(hidden, max(1, hidden // config.reduction_factor), config.non_linearity, 0.0)
    state = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
    try:
        adapter.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ConfigError(f"adapter in {source} does not fit this model at {prefix}: {exc}") from None
    return adapter


@register
class AdapterFusionMethod(NativeMethod):
    """AdapterFusion stage 2 (in-house; see the module docstring)."""

    name: ClassVar[str] = "adapter_fusion"
    config_cls: ClassVar[type[MethodConfig]] = AdapterFusionMethodConfig
    peft_type: ClassVar[str] = "FEDPEFT_ADAPTER_FUSION"

    def attach(self, model: nn.Module, config: MethodConfig) -> nn.Module:
        assert isinstance(config, AdapterFusionMethodConfig)
        stage_one = [(Path(d), *_stage_one(Path(d))) for d in config.adapter_dirs]
        drop = {c.drop_lowest for _, c, _ in stage_one}
        if len(drop) != 1:
            raise ConfigError("AdapterFusionMethodConfig.adapter_dirs: the adapters skip different blocks "
                              f"(drop_lowest {sorted(drop)})")
        lowest = drop.pop()
        spec = architecture_of(model)
        for index, block in enumerate(blocks_of(model)):
            if index < lowest:
                continue
            parent_path, _, attr = spec.ffn_output.rpartition(".")
            parent = block.get_submodule(parent_path) if parent_path else block
            base_layer = getattr(parent, attr)
            prefix = f"{spec.blocks}.{index}.{spec.ffn_output}.adapter."
            hidden = model.config.hidden_size
            adapters = nn.ModuleList(_load_adapter(w, prefix, c, hidden, d) for d, c, w in stage_one)
            adapters.requires_grad_(False)
            device = next(base_layer.parameters()).device
            setattr(parent, attr, FusedSublayerOutput(base_layer, adapters.to(device), FusionLayer(hidden).to(device)))
        return model

    def shared_frozen_names(self, model: nn.Module, config: MethodConfig) -> list[str]:
        return [n for n, _ in model.named_parameters() if ".adapters." in n]
