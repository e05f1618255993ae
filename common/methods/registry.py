"""Registry of PEFT methods: lookup by name, refusing duplicates and unknown names."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedpeft.common.errors import ConfigError, UnknownMethodError
from fedpeft.common.methods.base import MethodConfig, PeftMethod

_METHODS: dict[str, type[PeftMethod]] = {}


def register(method_cls: type[PeftMethod]) -> type[PeftMethod]:
    """Class decorator adding a method to the registry under `method_cls.name`."""
    if method_cls.name in _METHODS:
        raise ConfigError(f"PEFT method {method_cls.name!r} is already registered")
    _METHODS[method_cls.name] = method_cls
    return method_cls


def available_methods() -> list[str]:
    """Names of all registered methods, sorted."""
    return sorted(_METHODS)


def get_method(name: str) -> PeftMethod:
    """The method registered as `name`; unknown names list what is supported."""
    try:
        return _METHODS[name]()
    except KeyError:
        raise UnknownMethodError(f"unknown PEFT method {name!r}; supported methods: {', '.join(available_methods())}") from None


def make_config(name: str, options: Mapping[str, Any] | None = None) -> MethodConfig:
    """Validated config for method `name` from user options (strings are coerced)."""
    return get_method(name).config_cls.from_options(dict(options or {}))
