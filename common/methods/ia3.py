"""(IA)³ (Liu et al. 2022): learned rescaling of keys, values and FFN activations; via HF peft."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from fedpeft.common.methods.base import MethodConfig, require
from fedpeft.common.methods.peft_backed import PeftLibraryMethod
from fedpeft.common.methods.registry import register


@dataclasses.dataclass(frozen=True)
class IA3MethodConfig(MethodConfig):
    """Options of (IA)³. Empty tuples use peft's per-architecture defaults
    (for Llama: k_proj, v_proj, down_proj, with down_proj as the feed-forward one)."""

    target_modules: tuple[str, ...] = ()
    feedforward_modules: tuple[str, ...] = ()
    """Subset of target_modules whose *input* is scaled (the FFN's second layer)."""

    def __post_init__(self) -> None:
        owner = type(self).__name__
        require(set(self.feedforward_modules) <= set(self.target_modules) or not self.target_modules,
                owner, "feedforward_modules", f"{list(self.feedforward_modules)} must be a subset of target_modules")
        require(not self.feedforward_modules or bool(self.target_modules), owner, "feedforward_modules",
                "give target_modules too (or neither, for the architecture defaults)")


@register
class IA3Method(PeftLibraryMethod):
    """(IA)³: one learned scale vector per adapted module."""

    name: ClassVar[str] = "ia3"
    federated_learning_rate: ClassVar[float] = 3e-2  # SST-2/MiniLM: learns in 24 steps at 3e-2, not at 1e-2
    config_cls: ClassVar[type[MethodConfig]] = IA3MethodConfig

    def peft_config(self, config: MethodConfig):
        from peft import IA3Config

        assert isinstance(config, IA3MethodConfig)
        if not config.target_modules:
            return IA3Config(task_type=self.task_type)
        return IA3Config(task_type=self.task_type, target_modules=list(config.target_modules),
                         feedforward_modules=list(config.feedforward_modules))
