"""Soft-prompt methods from HF peft: prompt tuning, P-tuning, and P-tuning v2 (deep prompts).

For all of them the federated delta is every trainable tensor of the prompt encoder.
That matters for P-tuning: its MLP/LSTM reparameterization is trained and must be
averaged, while peft's own saved adapter holds only the prompt embeddings the encoder
produces (enough for inference, not for continuing federated training).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

from torch import nn

from fedpeft.common.methods.base import MethodConfig, require
from fedpeft.common.methods.peft_backed import PeftLibraryMethod
from fedpeft.common.methods.prefix import PrefixMethod, PrefixMethodConfig
from fedpeft.common.methods.registry import register


@dataclasses.dataclass(frozen=True)
class PromptMethodConfig(MethodConfig):
    """Options of prompt tuning (Lester et al. 2021)."""

    num_virtual_tokens: int = 16
    """Soft-prompt length prepended to the input embeddings."""
    init: Literal["random", "text"] = "random"
    """Initialize the prompt randomly, or from the embeddings of `init_text`."""
    init_text: str = ""
    """Text whose token embeddings initialize the prompt (init=text)."""

    def __post_init__(self) -> None:
        owner = type(self).__name__
        require(self.num_virtual_tokens >= 1, owner, "num_virtual_tokens", f"must be >= 1, got {self.num_virtual_tokens}")
        require(self.init in ("random", "text"), owner, "init", f"{self.init!r} is not 'random' or 'text'")
        require(self.init != "text" or bool(self.init_text.strip()), owner, "init_text", "required when init=text")


@register
class PromptMethod(PeftLibraryMethod):
    """Prompt tuning: trainable input embeddings only."""

    name: ClassVar[str] = "prompt"
    federated_learning_rate: ClassVar[float] = 3e-2  # a few virtual tokens: the largest steps
    federated_local_steps: ClassVar[int] = 24  # see PeftMethod.federated_local_steps
    config_cls: ClassVar[type[MethodConfig]] = PromptMethodConfig

    def build(self, model: nn.Module, config: MethodConfig) -> nn.Module:
        self._tokenizer_dir = getattr(getattr(model, "config", None), "_name_or_path", None)
        return super().build(model, config)

    def peft_config(self, config: MethodConfig):
        from peft import PromptTuningConfig, PromptTuningInit

        assert isinstance(config, PromptMethodConfig)
        if config.init == "text":
            return PromptTuningConfig(task_type=self.task_type, num_virtual_tokens=config.num_virtual_tokens,
                                      prompt_tuning_init=PromptTuningInit.TEXT,
                                      prompt_tuning_init_text=config.init_text,
                                      tokenizer_name_or_path=self._tokenizer_dir)
        return PromptTuningConfig(task_type=self.task_type, num_virtual_tokens=config.num_virtual_tokens)


@dataclasses.dataclass(frozen=True)
class PTuningMethodConfig(MethodConfig):
    """Options of P-tuning (Liu et al. 2021, "GPT Understands, Too")."""

    num_virtual_tokens: int = 16
    encoder: Literal["mlp", "lstm"] = "mlp"
    """Reparameterization of the virtual tokens."""
    encoder_hidden_size: int = 128
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    def __post_init__(self) -> None:
        owner = type(self).__name__
        require(self.num_virtual_tokens >= 1, owner, "num_virtual_tokens", f"must be >= 1, got {self.num_virtual_tokens}")
        require(self.encoder in ("mlp", "lstm"), owner, "encoder", f"{self.encoder!r} is not 'mlp' or 'lstm'")
        require(self.encoder_hidden_size >= 1, owner, "encoder_hidden_size", f"must be >= 1, got {self.encoder_hidden_size}")
        require(self.encoder_num_layers >= 1, owner, "encoder_num_layers", f"must be >= 1, got {self.encoder_num_layers}")
        # peft's MLP prompt encoder is a fixed 2-layer MLP without dropout
        require(self.encoder == "lstm" or (self.encoder_num_layers == 2 and self.encoder_dropout == 0.0), owner,
                "encoder_num_layers", "encoder_num_layers and encoder_dropout only apply to encoder=lstm")
        require(0.0 <= self.encoder_dropout < 1.0, owner, "encoder_dropout", f"must be in [0, 1), got {self.encoder_dropout}")


@register
class PTuningMethod(PeftLibraryMethod):
    """P-tuning: virtual tokens produced by a trainable prompt encoder (MLP or LSTM)."""

    name: ClassVar[str] = "ptuning"
    federated_learning_rate: ClassVar[float] = 3e-2  # as prompt tuning
    federated_local_steps: ClassVar[int] = 24  # see PeftMethod.federated_local_steps
    config_cls: ClassVar[type[MethodConfig]] = PTuningMethodConfig

    def peft_config(self, config: MethodConfig):
        from peft import PromptEncoderConfig

        assert isinstance(config, PTuningMethodConfig)
        return PromptEncoderConfig(task_type=self.task_type, num_virtual_tokens=config.num_virtual_tokens,
                                   encoder_reparameterization_type=config.encoder.upper(),
                                   encoder_hidden_size=config.encoder_hidden_size,
                                   encoder_num_layers=config.encoder_num_layers,
                                   encoder_dropout=config.encoder_dropout)


@dataclasses.dataclass(frozen=True)
class PTuningV2MethodConfig(PrefixMethodConfig):
    """Options of P-tuning v2: deep prompts in every layer, no reparameterization."""

    num_virtual_tokens: int = 20


@register
class PTuningV2Method(PrefixMethod):
    """P-tuning v2 (Liu et al. 2022): trainable key/value prompts in every layer — in
    peft's terms prefix tuning, here with the paper's defaults (no MLP reparameterization)."""

    name: ClassVar[str] = "ptuning_v2"
    config_cls: ClassVar[type[MethodConfig]] = PTuningV2MethodConfig
