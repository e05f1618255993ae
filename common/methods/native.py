"""Shared plumbing for methods written in-house (no HF peft equivalent).

Their adapter dir mirrors peft's layout — `adapter_config.json` (with a fedpeft
`peft_type`) and `adapter_model.safetensors` holding exactly the delta — and loads back
with `load_adapter` (stock peft cannot load it, having no such method).
"""

from __future__ import annotations

import json
from abc import abstractmethod
from pathlib import Path
from typing import ClassVar

from torch import nn

from fedpeft.common.errors import ConfigError
from fedpeft.common.methods.base import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, MethodConfig, PeftMethod
from fedpeft.common.model.architectures import architecture_of, is_sequence_classifier

CONFIG_ATTR = "fedpeft_method_config"


class NativeMethod(PeftMethod):
    """A fedpeft-implemented method; subclasses implement `attach` and set `peft_type`."""

    peft_backed: ClassVar[bool] = False
    peft_type: ClassVar[str]

    @abstractmethod
    def attach(self, model: nn.Module, config: MethodConfig) -> nn.Module:
        """Add the method's trainable modules/parameters to a frozen model."""

    def build(self, model: nn.Module, config: MethodConfig) -> nn.Module:
        self.check_config(config)
        if hasattr(model, CONFIG_ATTR):
            existing = type(getattr(model, CONFIG_ATTR)).__name__
            raise ConfigError(f"model already carries a {existing}; build on a fresh base model")
        for param in model.parameters():
            param.requires_grad_(False)
        model = self.attach(model, config)
        if is_sequence_classifier(model):  # a new task head is always trained with the method
            for param in model.get_submodule(architecture_of(model).classifier).parameters():
                param.requires_grad_(True)
        setattr(model, CONFIG_ATTR, config)
        return model

    def save_adapter(self, model: nn.Module, out_dir: Path) -> None:
        from fedpeft.common.protocol.deltas import extract_delta, save_delta_file

        config = getattr(model, CONFIG_ATTR, None)
        if not isinstance(config, self.config_cls):
            raise ConfigError(f"model has no {self.name} adapter to save")
        out_dir.mkdir(parents=True, exist_ok=True)
        meta = {"peft_type": self.peft_type, "fedpeft_method": self.name, **config.to_dict()}
        (out_dir / ADAPTER_CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
        save_delta_file(extract_delta(model, self.delta_names(model)), out_dir / ADAPTER_WEIGHTS_FILE)

    def load_adapter(self, base: nn.Module, adapter_dir: Path) -> nn.Module:
        from fedpeft.common.protocol.deltas import DeltaSpec, apply_delta, load_delta_file

        meta = json.loads((adapter_dir / ADAPTER_CONFIG_FILE).read_text())
        if meta.get("peft_type") != self.peft_type:
            raise ConfigError(f"{adapter_dir} is not a fedpeft {self.name} adapter (peft_type={meta.get('peft_type')!r})")
        options = {k: v for k, v in meta.items() if k not in {"peft_type", "fedpeft_method"}}
        model = self.build(base, self.config_cls.from_options(options))
        names = self.delta_names(model)
        apply_delta(model, load_delta_file(adapter_dir / ADAPTER_WEIGHTS_FILE), DeltaSpec.of_model(model, names))
        return model


class PeftWrappedNativeMethod(NativeMethod):
    """A native method whose `attach` places in-house modules and then wraps the model in
    HF peft (prefix tuning for MAM and UniPELT). peft's wrapper, not the base model, is
    returned, and peft trains the task head itself (SEQ_CLS `modules_to_save`), so
    `NativeMethod.build`'s head handling is skipped."""

    def build(self, model: nn.Module, config: MethodConfig) -> nn.Module:
        self.check_config(config)
        if hasattr(model, CONFIG_ATTR):
            raise ConfigError(f"model already carries a {type(getattr(model, CONFIG_ATTR)).__name__}; build on a fresh base")
        for param in model.parameters():
            param.requires_grad_(False)
        wrapped = self.attach(model, config)
        setattr(wrapped, CONFIG_ATTR, config)
        return wrapped
