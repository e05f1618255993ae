"""Shared plumbing for methods that HF peft implements: build, save and load through peft."""

from __future__ import annotations

from abc import abstractmethod
from pathlib import Path
from typing import ClassVar

from torch import nn

from fedpeft.common.errors import ConfigError
from fedpeft.common.methods.base import MethodConfig, PeftMethod
from fedpeft.common.model.architectures import is_sequence_classifier


class PeftLibraryMethod(PeftMethod):
    """A method whose modules come from HF peft; the adapter dir is a stock peft dir."""

    peft_backed: ClassVar[bool] = True

    @abstractmethod
    def peft_config(self, config: MethodConfig):  # -> peft.PeftConfig
        """The peft config object equivalent to our validated `config`."""

    #: peft task type of the model being built (set by `build`, read by `peft_config`).
    task_type: str = "CAUSAL_LM"

    def build(self, model: nn.Module, config: MethodConfig) -> nn.Module:
        from peft import get_peft_model

        self.check_config(config)
        # SEQ_CLS makes peft train (and save) the classification head with the method.
        self.task_type = "SEQ_CLS" if is_sequence_classifier(model) else "CAUSAL_LM"
        try:
            return get_peft_model(model, self.peft_config(config))
        except (ValueError, TypeError, KeyError) as exc:  # e.g. target modules the model lacks
            raise ConfigError(f"method {self.name!r} cannot be applied to this model: {exc}") from exc

    def save_adapter(self, model: nn.Module, out_dir: Path) -> None:
        model.save_pretrained(str(out_dir))

    def load_adapter(self, base: nn.Module, adapter_dir: Path) -> nn.Module:
        from peft import PeftModel

        return PeftModel.from_pretrained(base, str(adapter_dir))
