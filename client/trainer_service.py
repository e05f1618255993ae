"""The long-lived local trainer that `peft-client` owns.

In deployment Flower starts a fresh ClientApp process for every message (SecAgg+ sends
four per round), so a ClientApp that imported torch and loaded the 4-bit base itself
would pay seconds per message. Instead `peft-client` starts this gRPC service once: it
holds the loaded model, the client's private data and its identity keys, and the
short-lived ClientApp (`fedpeft.client.flower_app`) forwards each train message to it
over a local channel (a Unix domain socket by default, never a public port).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc

from fedpeft.client.app import ClientSetup, client_round
from fedpeft.common.data.records import Record
from fedpeft.common.errors import ConfigError, FedPeftError
from fedpeft.common.protocol.flower_io import delta_from_arrayrecord
from fedpeft.common.security.envelope import PeerIdentity, key_id, seal_delta, sign_metrics
from fedpeft.common.wire import trainer as wire
from fedpeft.common.wire.envelopes import envelope_to_bytes

log = logging.getLogger("fedpeft.client")


@dataclass
class TrainerState:
    """What the trainer holds for the life of the `peft-client` process."""

    setup: ClientSetup
    rows: Sequence[Record]
    partition: int = 0
    identity: PeerIdentity | None = None
    server_x25519: bytes | None = None
    """The server's pinned X25519 key (`--server-key`): seal only to it, never send plaintext."""
    rounds_trained: int = 0


class LocalTrainerService(wire.trainer_servicer_base()):  # type: ignore[misc]
    """gRPC `LocalTrainer`: one Train call at a time (the model is shared state)."""

    def __init__(self, state: TrainerState) -> None:
        self.state = state
        self._lock = threading.Lock()

    def Train(self, request, context):  # noqa: N802  (gRPC method name)
        with self._lock:
            state = self.state
            try:
                reply = client_round(
                    state.setup, request.plan_json, wire.arrays_from_proto(request.global_delta), list(state.rows),
                    server_round=int(request.server_round), partition=state.partition,
                    proximal_mu=float(request.proximal_mu), lora_rank=request.lora_rank or None,
                    client_id=state.identity.public_keys.key_id if state.identity else f"partition-{state.partition}",
                    correction=wire.arrays_from_proto(request.drift_correction) if request.drift_correction else None)
            except FedPeftError as exc:
                log.error("round %d: refusing to train: %s", request.server_round, exc)
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            self.state.rounds_trained += 1
            metrics = reply.metrics
            log.info("round %d: sent %.3f MB (delta), %d examples, train loss %.4f", request.server_round,
                     metrics["bytes-up"] / 1e6, metrics["num-examples"], metrics["train-loss"])
            return wire.train_reply(reply.delta, metrics, reply.mean_step)

    def Seal(self, request, context):  # noqa: N802
        identity = self.state.identity
        if identity is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          "the server asks for sealed deltas but this client has no identity (peft-client --identity)")
        pinned = self.state.server_x25519
        if pinned is not None and bytes(request.recipient_public_key) != pinned:
            log.error("round %d: the server asked to seal to X25519 key %s, not the pinned %s: refusing to send",
                      request.server_round, key_id(bytes(request.recipient_public_key)), key_id(pinned))
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "seal-to key differs from the pinned server key")
        try:
            delta = delta_from_arrayrecord(wire.arrays_from_proto(request.delta))
            envelope = seal_delta(delta, run_id=request.run_id, round=int(request.server_round),
                                  client_id=identity.public_keys.key_id, method=request.method, sender=identity,
                                  recipient_public_x25519=bytes(request.recipient_public_key))
            signature = sign_metrics(envelope, dict(request.metrics), identity)
        except FedPeftError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return wire.seal_reply(envelope_to_bytes(envelope), identity.public_keys.key_id, signature)

    def Health(self, request, context):  # noqa: N802
        client_id = self.state.identity.public_keys.key_id if self.state.identity else ""
        # "sealed-only": the ClientApp must refuse any reply the server did not ask to seal
        return wire.health_reply("sealed-only" if self.state.server_x25519 else "ready", client_id)


def socket_address(path: Path) -> str:
    """gRPC address of a Unix domain socket."""
    return f"unix://{Path(path).resolve()}"


def serve_trainer(state: TrainerState, address: str) -> grpc.Server:
    """Start the trainer on `address` (`unix:///abs/path` or `127.0.0.1:PORT`); returns the running server."""
    if not (address.startswith("unix:") or address.startswith(("127.0.0.1:", "localhost:", "[::1]:"))):
        raise ConfigError(f"trainer address {address!r} must be a Unix socket or a loopback address: "
                          "it carries the client's deltas unencrypted and must not leave the machine")
    options = [("grpc.max_receive_message_length", wire.MAX_LOCAL_MESSAGE_BYTES),
               ("grpc.max_send_message_length", wire.MAX_LOCAL_MESSAGE_BYTES)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=options)
    wire.add_trainer_servicer(LocalTrainerService(state), server)
    if server.add_insecure_port(address) == 0 and not address.startswith("unix:"):
        raise ConfigError(f"cannot bind the local trainer to {address}")
    server.start()
    log.info("local trainer listening on %s", address)
    return server


def wait_until_ready(address: str, timeout: float = 60.0) -> str:
    """Block until the trainer at `address` answers Health; returns its client id."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = wire.trainer_stub(channel)
        while True:
            try:
                return stub.Health(wire.health_request(), timeout=5).client_id  # type: ignore[attr-defined]
            except grpc.RpcError as exc:
                if time.monotonic() > deadline:
                    raise ConfigError(f"local trainer at {address} did not become ready: {exc}") from exc
                time.sleep(0.2)
