"""Registry of PEFT methods: lookup by name, refusing duplicates and unknown names."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedpeft.common.errors import ConfigError, FedPeftError, UnknownMethodError
from fedpeft.common.methods.base import MethodConfig, PeftMethod
from fedpeft.common.schema import show

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
    """Validated config for method `name` from user options (strings are coerced). Every
    failure is a ConfigError: a value coercion cannot take (a number for a list option, an
    int no float can hold) is reported by the option's name, not as a TypeError."""
    config_cls = get_method(name).config_cls
    options = dict(options or {})
    try:
        return config_cls.from_options(options)
    except FedPeftError:
        raise
    except (TypeError, ValueError, OverflowError) as exc:
        culprits = [key for key in options if _fails_outside_checks(config_cls, key, options[key])]
        if len(culprits) == 1:
            raise ConfigError(f"{config_cls.__name__}.{culprits[0]}: {show(options[culprits[0]])} is not a valid value "
                              f"({exc})") from None
        raise ConfigError(f"{config_cls.__name__}: malformed values of option(s) {culprits or sorted(options)} ({exc})") from None


def _fails_outside_checks(config_cls: type[MethodConfig], key: str, value: Any) -> bool:
    """Whether option `key` alone makes `from_options` raise something other than its own checks' ConfigError."""
    try:
        config_cls.from_options({key: value})
    except FedPeftError:
        return False
    except (TypeError, ValueError, OverflowError):
        return True
    return False
