"""Serving errors, each carrying the gRPC status code it is reported with.

The engine and registry raise these; only `service.py` touches `grpc` and turns
`status` (a `grpc.StatusCode` member name) into the RPC's status, so the rest of the
serving code stays usable (and testable) without a server.
"""

from __future__ import annotations

from fedpeft.common.errors import FedPeftError


class ServingError(FedPeftError):
    """A request the server refuses; `status` names the gRPC status code."""

    status: str = "INTERNAL"


class AdapterNotFoundError(ServingError):
    """No such adapter id, or no such version of it, in the registry."""

    status = "NOT_FOUND"


class AdapterCorruptError(ServingError):
    """Stored adapter files fail their checksum, signature or decryption, or hold non-finite values."""

    status = "DATA_LOSS"


class AdapterIncompatibleError(ServingError):
    """An adapter the served base model cannot take (other architecture, unsupported LoRA variant)."""

    status = "FAILED_PRECONDITION"


class InvalidRequestError(ServingError):
    """Bad request fields: empty or too long prompt, invalid sampling parameters."""

    status = "INVALID_ARGUMENT"


class OverloadedError(ServingError):
    """Too many queued requests, or an adapter bigger than the adapter memory cap."""

    status = "RESOURCE_EXHAUSTED"


class UnauthenticatedError(ServingError):
    """No tenant token, or one the server does not know."""

    status = "UNAUTHENTICATED"


class PermissionDeniedError(ServingError):
    """The tenant's token does not cover the requested adapter."""

    status = "PERMISSION_DENIED"


class DeadlineError(ServingError):
    """The request produced nothing within the server's request timeout."""

    status = "DEADLINE_EXCEEDED"


class ShuttingDownError(ServingError):
    """The server stopped before the request finished."""

    status = "UNAVAILABLE"
