"""Asking `peft-server serve` for text from a shell or a script (torch-free)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc

from fedpeft.common.errors import FedPeftError
from fedpeft.common.protocol.serving_api import GenerateParams
from fedpeft.common.wire import serving as wire


class ServingCallError(FedPeftError):
    """The server refused or failed a call; the message carries its gRPC status."""

    exit_code = 7


def open_stub(address: str, root_cert: Path | None = None):  # -> AdapterServingStub
    """A stub over TLS (when `root_cert` is given) or plaintext."""
    options = [("grpc.max_receive_message_length", 64 << 20)]
    if root_cert is not None:
        channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(Path(root_cert).read_bytes()), options)
    else:
        channel = grpc.insecure_channel(address, options)
    return wire.serving_stub(channel)


def stream_text(stub, params: GenerateParams, token: str | None = None, timeout: float = 600.0) -> Iterator[str]:
    """The generated text, piece by piece as the server decodes it."""
    metadata = [("authorization", f"Bearer {token}")] if token else None
    try:
        for chunk in stub.GenerateStream(wire.generate_request(params), metadata=metadata, timeout=timeout):
            if chunk.text:
                yield chunk.text
    except grpc.RpcError as exc:
        raise ServingCallError(f"{exc.code().name}: {exc.details()}") from None
