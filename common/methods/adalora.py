"""AdaLoRA (Zhang et al. 2023): SVD-shaped LoRA (P·Λ·Q) whose rank budget is pruned
during training by importance; via HF peft (`AdaLoraConfig` / `AdaLoraModel`).

What the delta holds. peft's trainable tensors are `lora_A` (Q), `lora_B` (P) and
`lora_E` (the singular values Λ); `ranknum` is a frozen parameter equal to `init_r`
(the scaling denominator), rebuilt identically from the config. Pruning is
`lora_E[i] = 0`, so the masks travel inside E: the delta alone reproduces the model.

Federation. Every client prunes its own ranks (`update_and_allocate`, called by the
training loop through `after_optimizer_step` with the *global* step, round offset
included). The server averages A, B and E elementwise like any delta (FedAvg), so a
rank pruned on some clients survives, down-weighted, if others kept it; a rank pruned
everywhere stays exactly zero. The kept set after the budgeting phase is therefore the
union of the clients' kept ranks (at most init_r per matrix).
In the final phase peft re-masks with its per-process `rank_pattern`; a simulation
worker serves many virtual clients, so that pattern would belong to whoever trained
last. Instead, here, the final phase freezes the support of the E the round started
with (or that the final-allocation step produced): entries that are zero stay zero.
The importance EMAs are reset at each round's start for the same reason.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from fedpeft.common.methods.base import MethodConfig, require
from fedpeft.common.methods.peft_backed import PeftLibraryMethod
from fedpeft.common.methods.registry import register
from fedpeft.common.model.architectures import default_target_modules

SUPPORT_ATTR = "fedpeft_adalora_support"


@dataclasses.dataclass(frozen=True)
class AdaLoraMethodConfig(MethodConfig):
    """Options of AdaLoRA; `total_step` must be the run's total local steps per client
    (rounds × local steps) so the budget schedule spans the whole federation."""

    total_step: int = 0
    """Total training steps of the schedule (required; a run spec fills it in as rounds x
    local steps when it is not set)."""
    init_r: int = 12
    """Starting rank of every adapted matrix."""
    target_r: int = 8
    """Average rank left after budgeting."""
    tinit: int = 0
    """Warm-up steps before any pruning."""
    tfinal: int = 0
    """Final steps with the allocation frozen."""
    delta_t: int = 1
    """Steps between two budget re-allocations (peft's deltaT)."""
    beta1: float = 0.85
    """EMA factor of the importance (sensitivity) scores."""
    beta2: float = 0.85
    """EMA factor of their uncertainty."""
    orth_reg_weight: float = 0.5
    """Weight of the orthogonality regularizer on P and Q, added to the loss by peft."""
    alpha: int = 32
    """Scaling numerator: the update is (alpha / init_r)·P·Λ·Q."""
    dropout: float = 0.0
    """Dropout on the adapter input during training."""
    target_modules: tuple[str, ...] = ()
    """Module-name suffixes to adapt; empty: every attention projection of the model's
    architecture (`ArchitectureSpec.attention_projections`: q/k/v/o_proj on Llama)."""

    def __post_init__(self) -> None:
        owner = type(self).__name__
        require(self.total_step >= 1, owner, "total_step", f"required: the schedule's total steps (>= 1), got {self.total_step}")
        require(self.init_r >= 1, owner, "init_r", f"must be >= 1, got {self.init_r}")
        require(1 <= self.target_r <= self.init_r, owner, "target_r",
                f"must be in [1, init_r={self.init_r}], got {self.target_r}")
        require(self.tinit >= 0, owner, "tinit", f"must be >= 0, got {self.tinit}")
        require(self.tfinal >= 0, owner, "tfinal", f"must be >= 0, got {self.tfinal}")
        require(self.tinit < self.total_step - self.tfinal, owner, "tinit",
                f"tinit={self.tinit} leaves no budgeting phase before total_step - tfinal = {self.total_step - self.tfinal}")
        require(self.delta_t >= 1, owner, "delta_t", f"must be >= 1, got {self.delta_t}")
        require(0.0 <= self.beta1 < 1.0, owner, "beta1", f"must be in [0, 1), got {self.beta1}")
        require(0.0 <= self.beta2 < 1.0, owner, "beta2", f"must be in [0, 1), got {self.beta2}")
        require(self.orth_reg_weight >= 0, owner, "orth_reg_weight", f"must be >= 0, got {self.orth_reg_weight}")
        require(self.alpha > 0, owner, "alpha", f"must be > 0, got {self.alpha}")
        require(0.0 <= self.dropout < 1.0, owner, "dropout", f"must be in [0, 1), got {self.dropout}")


def _singular_values(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if ".lora_E." in n}


@register
class AdaLoraMethod(PeftLibraryMethod):
    """Adaptive-budget LoRA; see the module docstring for the federated rules."""

    name: ClassVar[str] = "adalora"
    config_cls: ClassVar[type[MethodConfig]] = AdaLoraMethodConfig

    def peft_config(self, config: MethodConfig):
        from peft import AdaLoraConfig

        assert isinstance(config, AdaLoraMethodConfig)
        return AdaLoraConfig(init_r=config.init_r, target_r=config.target_r, tinit=config.tinit, tfinal=config.tfinal,
                             deltaT=config.delta_t, beta1=config.beta1, beta2=config.beta2,
                             orth_reg_weight=config.orth_reg_weight, total_step=config.total_step,
                             lora_alpha=config.alpha, lora_dropout=config.dropout,
                             target_modules=list(config.target_modules) or None, task_type=self.task_type)

    def build(self, model: nn.Module, config: MethodConfig) -> nn.Module:
        assert isinstance(config, AdaLoraMethodConfig)
        if not config.target_modules:  # the architecture's own names, not Llama's on every model
            config = dataclasses.replace(config, target_modules=default_target_modules(model, attention=True))
        model = super().build(model, config)
        # peft 0.21.2 leaves ranknum trainable on bitsandbytes 4-bit layers (not on fp
        # layers); it is the constant init_r, so freeze it everywhere.
        for name, param in model.named_parameters():
            if ".ranknum." in name:
                param.requires_grad_(False)
        return model

    def begin_local_training(self, model: nn.Module) -> None:
        """Fresh importance EMAs for this client's round; remember E's current support."""
        model.base_model.rankallocator.reset_ipt()
        setattr(model, SUPPORT_ATTR, {n: p.detach() != 0 for n, p in _singular_values(model).items()})

    @torch.no_grad()
    def after_optimizer_step(self, model: nn.Module, global_step: int) -> None:
        """Budgeting phase: peft's importance-based pruning. Final phase: keep E's
        support frozen (see the module docstring for why not peft's rank_pattern)."""
        adalora = model.base_model
        peft_config = adalora.peft_config[adalora.trainable_adapter_name]
        final_start = peft_config.total_step - peft_config.tfinal
        if global_step <= final_start:
            allocator = adalora.rankallocator
            if global_step == final_start and not allocator.exp_avg_ipt:
                # The final allocation is this round's first step (one local step a round, as under
                # server-adam): peft scores it with the importance EMAs of earlier steps, which
                # begin_local_training reset, so score this step's gradients instead of failing.
                allocator.update_ipt(adalora.model)
            adalora.update_and_allocate(global_step)
            if global_step == final_start:
                setattr(model, SUPPORT_ATTR, {n: p.detach() != 0 for n, p in _singular_values(model).items()})
            return
        support = getattr(model, SUPPORT_ATTR)
        for name, param in _singular_values(model).items():
            param.mul_(support[name].to(param.dtype))

    def save_adapter(self, model: nn.Module, out_dir: Path) -> None:
        """A stock peft dir at full init_r: pruned ranks are zeros in E. (With a
        rank_pattern set, peft would slice the saved tensors to that process's own
        pattern, giving shapes other peers' deltas do not have.)"""
        configs = model.peft_config.values()
        saved = [c.rank_pattern for c in configs]
        for c in configs:
            c.rank_pattern = None
        try:
            super().save_adapter(model, out_dir)
        finally:
            for c, pattern in zip(configs, saved, strict=True):
                c.rank_pattern = pattern

    def load_adapter(self, base: nn.Module, adapter_dir: Path) -> nn.Module:
        """Load as trainable, then freeze: peft 0.21.2's AdaLoraModel sets
        `trainable_adapter_name` only for trainable adapters but reads it in every
        forward that has labels, so an inference-mode load fails on a labelled batch."""
        from peft import PeftModel

        model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=True)
        for param in model.parameters():
            param.requires_grad_(False)
        return model
