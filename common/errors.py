"""Domain exceptions: every failure a user can cause has its own type and exit code.

A CLI turns a `FedPeftError` into one clear line (no traceback) and exits with
`exit_code`; library callers can catch the precise subtype.
"""

from __future__ import annotations


class FedPeftError(Exception):
    """Base class of all errors fedpeft raises on purpose."""

    exit_code: int = 1


class ConfigError(FedPeftError, ValueError):
    """A configuration value is missing, malformed or out of range."""

    exit_code = 2


class UnknownMethodError(ConfigError, KeyError):
    """A PEFT method name that the registry does not know."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


class ModelLoadError(FedPeftError):
    """A base model could not be located, converted or loaded."""

    exit_code = 3


class DataError(FedPeftError, ValueError):
    """Local data is missing, unreadable or not in a supported format."""

    exit_code = 4


class DeltaError(FedPeftError, ValueError):
    """A PEFT delta is malformed: wrong names, shapes, dtypes or non-finite values."""

    exit_code = 5


class PartitionError(ConfigError):
    """A data set cannot be split across clients as requested."""


class FederationError(FedPeftError):
    """A federated round cannot complete (e.g. no client update was accepted)."""

    exit_code = 6


class SplitError(FedPeftError, ValueError):
    """A split fine-tuning message or session is invalid (bad activations, unknown session)."""

    exit_code = 7


class SplitAuthError(SplitError):
    """A split-server call without this run's access token."""


class SplitSessionError(SplitError):
    """A split training message names a session the server does not know (or that closed)."""


class SplitTooLargeError(SplitError):
    """A split training tensor exceeds the configured size cap."""
