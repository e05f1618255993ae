"""PEFT method registry. Importing this package registers every built-in method."""

from fedpeft.common.methods import adalora, bitfit, bottleneck, fusion, ia3, lora, lycoris, mam, prefix, prompt, unipelt  # noqa: F401  (registration)
from fedpeft.common.methods.base import MethodConfig, PeftMethod
from fedpeft.common.methods.registry import available_methods, get_method, make_config, register

__all__ = ["MethodConfig", "PeftMethod", "available_methods", "get_method", "make_config", "register"]
