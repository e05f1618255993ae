"""LoRA (low-rank adapters on linear layers), with DoRA as an option; via HF peft."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

from torch import nn

from fedpeft.common.errors import ConfigError
from fedpeft.common.methods.base import MethodConfig, require
from fedpeft.common.methods.peft_backed import PeftLibraryMethod
from fedpeft.common.methods.registry import register


@dataclasses.dataclass(frozen=True)
class LoraMethodConfig(MethodConfig):
    """Options of LoRA / DoRA."""

    r: int = 8
    """Rank of the update B·A."""
    alpha: int = 16
    """Scaling numerator: the update is (alpha / r)·B·A."""
    dropout: float = 0.05
    """Dropout on the adapter input during training."""
    target_modules: tuple[str, ...] = ("all-linear",)
    """Module-name suffixes to adapt, or "all-linear" for every linear layer but the head."""
    use_dora: bool = False
    """Weight-decomposed LoRA (DoRA): also train a per-output-channel magnitude."""
    freeze_a: bool = False
    """FFA-LoRA: keep A at its (seeded, identical everywhere) initialization and train
    only B, so averaging B averages the clients' updates B·A exactly."""
    use_rslora: bool = False
    """Rank-stabilized LoRA: scale by alpha / sqrt(r) instead of alpha / r."""
    layers_to_transform: tuple[int, ...] = ()
    """Adapt only these transformer blocks (empty: all). Offsite tuning sets it to the adapter blocks."""

    def __post_init__(self) -> None:
        owner = type(self).__name__
        require(self.r >= 1, owner, "r", f"rank must be >= 1, got {self.r}")
        require(self.alpha > 0, owner, "alpha", f"must be > 0, got {self.alpha}")
        require(0.0 <= self.dropout < 1.0, owner, "dropout", f"must be in [0, 1), got {self.dropout}")
        require(len(self.target_modules) > 0, owner, "target_modules", "name at least one module")
        require(
            "all-linear" not in self.target_modules or len(self.target_modules) == 1,
            owner, "target_modules", "'all-linear' cannot be combined with module names",
        )
        require(all(i >= 0 for i in self.layers_to_transform), owner, "layers_to_transform",
                f"block indices must be >= 0, got {list(self.layers_to_transform)}")

    @property
    def scaling(self) -> float:
        """peft's factor s in ΔW = s·B·A for this config's rank."""
        return lora_scaling(self.alpha, self.r, self.use_rslora)


def block_linear_names(model: nn.Module) -> tuple[str, ...]:
    """Names (last component) of every linear layer inside the transformer blocks: what
    "all-linear" selects there (4-bit `Linear4bit` layers are `nn.Linear` subclasses)."""
    from fedpeft.common.model.architectures import blocks_of

    names = {name.rsplit(".", 1)[-1] for block in blocks_of(model) for name, module in block.named_modules()
             if isinstance(module, nn.Linear)}
    if not names:
        raise ConfigError(f"{type(model).__name__} has no linear layers in its blocks for LoRA")
    return tuple(sorted(names))


def lora_scaling(alpha: float, r: int, use_rslora: bool = False) -> float:
    """peft's LoRA scale for rank `r`: alpha/r, or alpha/sqrt(r) with rsLoRA. With mixed
    client ranks it differs per client, so aggregation must use each client's own."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


@register
class LoraMethod(PeftLibraryMethod):
    """Low-rank adaptation (Hu et al. 2021); DoRA (Liu et al. 2024) with use_dora=true."""

    name: ClassVar[str] = "lora"
    config_cls: ClassVar[type[MethodConfig]] = LoraMethodConfig
    # With a fresh classification head, measured on SST-2/MiniLM, 10 clients x 4 rounds, Dirichlet 1.0
    # (README "Quality benchmark"): 1e-3 x 8 steps 0.526, 3e-3 x 8 0.587, 1e-2 x 8 0.718, 1e-3 x 24
    # 0.759, 3e-3 x 24 0.788 (centralized 0.802); IID 3e-3 x 24 0.811. A causal LM scoring label words
    # with its pretrained head keeps 1e-3 x 8 (the default job: accuracy 0.970 after 3 rounds).
    federated_head_learning_rate: ClassVar[float | None] = 3e-3
    federated_head_local_steps: ClassVar[int | None] = 24

    def shared_frozen_names(self, model, config: MethodConfig) -> list[str]:
        assert isinstance(config, LoraMethodConfig)
        return [n for n, _ in model.named_parameters() if ".lora_A." in n] if config.freeze_a else []

    def build(self, model, config: MethodConfig):
        self.check_config(config)
        assert isinstance(config, LoraMethodConfig)
        if config.layers_to_transform and config.target_modules == ("all-linear",):
            # peft refuses "all-linear" with layers_to_transform: name the blocks' linear layers instead.
            config = dataclasses.replace(config, target_modules=block_linear_names(model))
        model = super().build(model, config)
        if config.freeze_a:
            for name, param in model.named_parameters():
                if ".lora_A." in name:
                    param.requires_grad_(False)
        return model

    def peft_config(self, config: MethodConfig):
        from peft import LoraConfig

        assert isinstance(config, LoraMethodConfig)
        targets = "all-linear" if config.target_modules == ("all-linear",) else list(config.target_modules)
        return LoraConfig(
            r=config.r,
            lora_alpha=config.alpha,
            lora_dropout=config.dropout,
            target_modules=targets,
            use_dora=config.use_dora,
            use_rslora=config.use_rslora,
            layers_to_transform=list(config.layers_to_transform) or None,
            bias="none",
            task_type=self.task_type,
        )
