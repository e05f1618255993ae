"""The contract every PEFT method implements, and typed option parsing for its config."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from fedpeft.common.errors import ConfigError

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    """Base of every method's options. Subclasses are frozen dataclasses that validate
    themselves in `__post_init__` and raise `ConfigError` naming the bad field."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready options (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> MethodConfig:
        """Build from user options; strings like "16" or "q_proj,v_proj" are coerced
        to each field's declared type. Unknown keys are reported all together."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - set(fields))
        if unknown:
            raise ConfigError(f"{cls.__name__}: unknown option(s) {unknown}; valid options are {sorted(fields)}")
        hints = typing.get_type_hints(cls)
        values = {name: _coerce(cls.__name__, name, value, hints[name]) for name, value in options.items()}
        return cls(**values)


def _coerce(owner: str, name: str, value: Any, hint: Any) -> Any:
    """Convert `value` to the type `hint` names; strings come from the command line."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            try:
                return _coerce(owner, name, value, arg)
            except ConfigError:
                continue
        raise ConfigError(f"{owner}.{name}: {value!r} matches none of {hint}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{owner}.{name}: {value!r} is not one of {list(args)}")
        return value
    if origin is tuple:
        items = [s.strip() for s in value.split(",") if s.strip()] if isinstance(value, str) else list(value)
        return tuple(_coerce(owner, name, item, args[0]) for item in items)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"true", "1", "yes", "false", "0", "no"}:
            return value.lower() in {"true", "1", "yes"}
        raise ConfigError(f"{owner}.{name}: {value!r} is not a boolean (use true/false)")
    if hint in (int, float, str):
        if hint is int and isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{owner}.{name}: {value!r} is not an integer")
        try:
            return hint(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{owner}.{name}: {value!r} is not a valid {hint.__name__}") from None
    return value


def require(condition: bool, owner: str, field: str, message: str) -> None:
    """Raise a `ConfigError` naming `owner.field` unless `condition` holds."""
    if not condition:
        raise ConfigError(f"{owner}.{field}: {message}")


class PeftMethod(ABC):
    """One PEFT method: how to wrap a frozen base model and which tensors are the delta.

    The delta is exactly the set of trainable parameters `build` leaves on the model;
    it is what crosses the client boundary and what aggregation averages.
    """

    name: ClassVar[str]
    config_cls: ClassVar[type[MethodConfig]]
    #: True when the method is HF peft's, so `save_adapter` writes a stock peft dir.
    peft_backed: ClassVar[bool]
    #: False when the method cannot train over bitsandbytes 4-bit layers.
    supports_4bit: ClassVar[bool] = True
    #: True when its trainable prefix reaches the blocks as `past_key_values` (prefix-style
    #: methods), which gradient checkpointing would drop.
    kv_prefix: ClassVar[bool] = False
    #: The client learning rate a federated run uses unless `training.learning_rate` is set.
    #: Methods differ by orders of magnitude (soft prompts and scaling vectors need far larger
    #: steps than LoRA), and a federation of K clients averaging S local steps a round gets
    #: about S sequential steps of progress a round, not K x S. Measured for (IA)3 (README,
    #: "Quality benchmark"); the others are the rates the earlier peft-bench used per
    #: method, provisional until the full benchmark has run.
    federated_learning_rate: ClassVar[float] = 1e-3
    #: Local optimizer steps a round unless `training.local_steps` is set. Averaging K
    #: clients' updates advances the global delta about as far as one client's steps, so a
    #: method that needs many sequential steps to leave its initialisation (zero-initialised
    #: adapter up-projections, soft prefixes, bias terms) needs more local steps a round:
    #: measured on SST-2/MiniLM, bottleneck, prefix, P-tuning v2 and BitFit stay at the
    #: majority class after 4 rounds x 6 steps even centrally, and learn after 4 x 24.
    federated_local_steps: ClassVar[int] = 8
    #: Used instead of the two above when the model gets a freshly initialised classification
    #: head (an encoder such as MiniLM): the head starts from random weights and needs more and
    #: larger local steps than adapting a pretrained LM head does. None: the same as above.
    federated_head_learning_rate: ClassVar[float | None] = None
    federated_head_local_steps: ClassVar[int | None] = None

    @abstractmethod
    def build(self, model: nn.Module, config: MethodConfig) -> nn.Module:
        """Wrap a frozen base model; only the method's own parameters stay trainable."""

    @abstractmethod
    def save_adapter(self, model: nn.Module, out_dir: Path) -> None:
        """Write the adapter (config + safetensors weights) to `out_dir`."""

    @abstractmethod
    def load_adapter(self, base: nn.Module, adapter_dir: Path) -> nn.Module:
        """Rebuild the adapted model on `base` from a directory written by `save_adapter`."""

    def shared_frozen_names(self, model: nn.Module, config: MethodConfig) -> list[str]:
        """Adapter tensors that are *not* trained but must be identical on every peer
        (e.g. FFA-LoRA's frozen A); the server checks clients built the same ones."""
        return []

    def begin_local_training(self, model: nn.Module) -> None:
        """Called by the client training loop before a local round (after the global
        delta is set); methods with per-round training state reset it here."""
        return None

    def after_optimizer_step(self, model: nn.Module, global_step: int) -> None:
        """Called after every optimizer step, before gradients are cleared, with the
        step counted across rounds (e.g. AdaLoRA's rank allocation)."""
        return None

    def delta_names(self, model: nn.Module) -> list[str]:
        """Names of the tensors that make up the delta, in a stable order."""
        return [name for name, param in model.named_parameters() if param.requires_grad]

    def check_config(self, config: MethodConfig) -> None:
        if not isinstance(config, self.config_cls):
            raise ConfigError(f"method {self.name!r} needs a {self.config_cls.__name__}, got {type(config).__name__}")
