"""A frozen base model wrapped by one PEFT method, with its delta contract.

Server and clients both hold one of these. Federated rounds only ever move the delta
in and out (`get_delta` / `set_delta`); the base weights are loaded once and never
change.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedpeft.common.methods import MethodConfig, PeftMethod, get_method
from fedpeft.common.model.base_model import load_base_model, load_tokenizer, model_kind
from fedpeft.common.model.quantization import Quantize
from fedpeft.common.protocol.deltas import DeltaAccess, DeltaSpec


@dataclass
class AdaptedModel(DeltaAccess):
    """Base model + PEFT method + tokenizer, and the exact delta the method trains."""

    model_dir: Path
    quantize: Quantize
    method: PeftMethod
    config: MethodConfig
    model: nn.Module
    tokenizer: Any
    delta_names: list[str]
    spec: DeltaSpec
    load_seconds: float

    @classmethod
    def load(cls, model_dir: Path, quantize: Quantize, method_name: str, config: MethodConfig,
             seed: int = 0, num_labels: int | None = None) -> AdaptedModel:
        """Load the base model and wrap it; `seed` fixes the initialization of the adapter
        (and of a new classification head, for encoders given `num_labels`)."""
        start = time.perf_counter()
        method = get_method(method_name)
        torch.manual_seed(seed)
        base = load_base_model(model_dir, quantize, num_labels=num_labels)
        tokenizer = load_tokenizer(model_dir)
        if getattr(base.config, "pad_token_id", None) is None:  # sequence classifiers find the last token by it
            base.config.pad_token_id = tokenizer.pad_token_id
        torch.manual_seed(seed)
        model = method.build(base, config)
        names = method.delta_names(model)
        return cls(model_dir=Path(model_dir), quantize=quantize, method=method, config=config, model=model,
                   tokenizer=tokenizer, delta_names=names, spec=DeltaSpec.of_model(model, names),
                   load_seconds=time.perf_counter() - start)

    def frozen_fingerprint(self) -> str:
        """Hash of the method's shared frozen tensors ("" when it has none)."""
        names = self.method.shared_frozen_names(self.model, self.config)
        if not names:
            return ""
        digest = hashlib.sha256()
        params = dict(self.model.named_parameters())
        for name in names:
            digest.update(name.encode())
            digest.update(params[name].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]

    def save_adapter(self, out_dir: Path) -> None:
        self.method.save_adapter(self.model, out_dir)


def check_method_applies(model_dir: Path, method_name: str, config: MethodConfig, num_labels: int | None = None,
                         quantize: Quantize = "none") -> int:
    """Build the method on a weightless (meta-device) copy of the architecture.

    Catches options the model cannot take (e.g. target modules it lacks) in well under
    a second, before any process is started; returns the delta's parameter count.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from fedpeft.common.errors import ConfigError

    kind = model_kind(model_dir)
    if kind == "seq-cls" and not num_labels:
        raise ConfigError(f"{model_dir} is an encoder: it needs a classification task (labels), not instruction data")
    try:
        if kind == "seq-cls":
            hf_config = AutoConfig.from_pretrained(model_dir, local_files_only=True, num_labels=num_labels)
            auto_class = AutoModelForSequenceClassification
        else:
            hf_config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
            auto_class = AutoModelForCausalLM
        with torch.device("meta"):
            skeleton = auto_class.from_config(hf_config)
    except Exception as exc:
        raise ConfigError(f"cannot read the architecture in {model_dir}: {exc}") from exc
    for param in skeleton.parameters():
        param.requires_grad_(False)
    method = get_method(method_name)
    if quantize == "4bit" and not method.supports_4bit:  # the meta skeleton is never quantized
        raise ConfigError(f"method {method_name!r} cannot train over a 4-bit backbone in peft 0.21.2; use --quantize none")
    model = method.build(skeleton, config)
    return DeltaSpec.of_model(model, method.delta_names(model)).num_parameters
