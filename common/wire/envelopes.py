"""`Envelope` <-> `fedpeft.v1.DeltaEnvelope` (part of the `fedpeft.common.wire` serde boundary).

Keeping every `_pb2` import here means a .proto change shows up in one place, and the
rest of fedpeft works with plain dataclasses. Everything parsed from the wire is size-
checked before parsing and structure-checked after, so garbage or truncated bytes raise
`EnvelopeError` (MALFORMED/OVERSIZED), never a protobuf exception.
"""

from __future__ import annotations

from pathlib import Path

from google.protobuf.message import DecodeError

from fedpeft.common.errors import DeltaError
from fedpeft.common.files import atomic_write_bytes
from fedpeft.common.security.envelope import (
    DEFAULT_MAX_ENVELOPE_BYTES,
    Envelope,
    EnvelopeError,
    Rejection,
    TensorInfo,
    check_envelope,
)
from fedpeft.v1 import delta_pb2


def envelope_to_proto(envelope: Envelope) -> delta_pb2.DeltaEnvelope:
    """The protobuf message for `envelope` (no validation: sealing already did it)."""
    return delta_pb2.DeltaEnvelope(
        format_version=envelope.format_version,
        run_id=envelope.run_id,
        round=envelope.round,
        client_id=envelope.client_id,
        method=envelope.method,
        manifest=[delta_pb2.TensorInfo(name=t.name, shape=t.shape, dtype=t.dtype) for t in envelope.manifest],
        sender_public_key=envelope.sender_public_key,
        recipient_public_key=envelope.recipient_public_key,
        ephemeral_public_key=envelope.ephemeral_public_key,
        nonce=envelope.nonce,
        ciphertext=envelope.ciphertext,
        signature=envelope.signature,
    )


def envelope_from_proto(message: delta_pb2.DeltaEnvelope) -> Envelope:
    """The `Envelope` of a parsed message; raises `EnvelopeError(MALFORMED)` if ill-formed."""
    envelope = Envelope(
        format_version=message.format_version,
        run_id=message.run_id,
        round=message.round,
        client_id=message.client_id,
        method=message.method,
        manifest=tuple(TensorInfo(t.name, tuple(t.shape), t.dtype) for t in message.manifest),
        sender_public_key=message.sender_public_key,
        recipient_public_key=message.recipient_public_key,
        ephemeral_public_key=message.ephemeral_public_key,
        nonce=message.nonce,
        ciphertext=message.ciphertext,
        signature=message.signature,
    )
    check_envelope(envelope)
    return envelope


def envelope_to_bytes(envelope: Envelope, *, max_bytes: int = DEFAULT_MAX_ENVELOPE_BYTES) -> bytes:
    """Serialized envelope; refuses to produce more than a receiver would accept."""
    data = envelope_to_proto(envelope).SerializeToString(deterministic=True)
    if len(data) > max_bytes:
        raise EnvelopeError(Rejection.OVERSIZED, f"envelope of {len(data)} bytes exceeds the limit of {max_bytes}")
    return data


def envelope_from_bytes(data: bytes, *, max_bytes: int = DEFAULT_MAX_ENVELOPE_BYTES) -> Envelope:
    """Parse wire bytes: size check first (no parsing of huge input), then decode, then structure."""
    if len(data) > max_bytes:
        raise EnvelopeError(Rejection.OVERSIZED, f"envelope of {len(data)} bytes exceeds the limit of {max_bytes}")
    message = delta_pb2.DeltaEnvelope()
    try:
        message.ParseFromString(bytes(data))
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise EnvelopeError(Rejection.MALFORMED, f"{len(data)} bytes are not a DeltaEnvelope: {exc}") from exc
    return envelope_from_proto(message)


def write_envelope_file(path: Path, envelope: Envelope) -> None:
    """Store an envelope (e.g. a personal adapter checkpoint) atomically."""
    atomic_write_bytes(Path(path), envelope_to_bytes(envelope, max_bytes=2**31 - 1))


def read_envelope_file(path: Path, *, max_bytes: int = DEFAULT_MAX_ENVELOPE_BYTES) -> Envelope:
    """Read an envelope file, refusing oversized files before reading them."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise EnvelopeError(Rejection.OVERSIZED, f"envelope file {path} has {size} bytes, limit {max_bytes}")
        data = path.read_bytes()
    except OSError as exc:
        raise DeltaError(f"cannot read envelope file {path}: {exc}") from exc
    return envelope_from_bytes(data, max_bytes=max_bytes)
