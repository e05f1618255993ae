"""Flower `ArrayRecord`s <-> `fedpeft.v1.LocalTrainer` messages, without torch.

Flower's ClientApp process is short-lived (a fresh one per message in deployment), so
it must stay light: it forwards each `flwr.app.Array` byte for byte to the long-lived
trainer and back. Decoding the bytes into tensors (and validating them) is the
trainer's job, where torch is already loaded.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping

from flwr.app import Array, ArrayRecord

from fedpeft.common.wire.grpc_service import GrpcService
from fedpeft.v1 import trainer_pb2

MAX_LOCAL_MESSAGE_BYTES = 1024 * 1024 * 1024
"""gRPC message cap on the local channel (deltas of large adapters exceed gRPC's 4 MB default)."""


def arrays_to_proto(record: ArrayRecord) -> list[trainer_pb2.FlowerArray]:
    """Every array of `record`, in order, as it is serialized by Flower."""
    return [trainer_pb2.FlowerArray(name=name, dtype=a.dtype, shape=list(a.shape), stype=a.stype, data=a.data)
            for name, a in record.items()]


def arrays_from_proto(arrays: Iterable[trainer_pb2.FlowerArray]) -> ArrayRecord:
    """The `ArrayRecord` of forwarded arrays (bytes untouched; decoded by the receiver)."""
    return ArrayRecord(OrderedDict(
        (a.name, Array(dtype=a.dtype, shape=tuple(a.shape), stype=a.stype, data=a.data)) for a in arrays
    ))


def train_request(plan_json: str, server_round: int, proximal_mu: float, global_delta: ArrayRecord,
                  lora_rank: int = 0, drift_correction: ArrayRecord | None = None) -> trainer_pb2.TrainRequest:
    return trainer_pb2.TrainRequest(plan_json=plan_json, server_round=server_round, proximal_mu=proximal_mu,
                                    global_delta=arrays_to_proto(global_delta), lora_rank=lora_rank,
                                    drift_correction=arrays_to_proto(drift_correction) if drift_correction else [])


def train_reply(delta: ArrayRecord, metrics: Mapping[str, float],
                mean_step: ArrayRecord | None = None) -> trainer_pb2.TrainReply:
    return trainer_pb2.TrainReply(delta=arrays_to_proto(delta), metrics={k: float(v) for k, v in metrics.items()},
                                  mean_step=arrays_to_proto(mean_step) if mean_step is not None else [])


def seal_request(run_id: str, server_round: int, method: str, recipient_public_key: bytes, delta: ArrayRecord,
                 metrics: Mapping[str, float] | None = None) -> trainer_pb2.SealRequest:
    return trainer_pb2.SealRequest(run_id=run_id, server_round=server_round, method=method,
                                   recipient_public_key=recipient_public_key, delta=arrays_to_proto(delta),
                                   metrics={k: float(v) for k, v in (metrics or {}).items()})


def seal_reply(envelope: bytes, client_id: str, metrics_signature: bytes = b"") -> trainer_pb2.SealReply:
    return trainer_pb2.SealReply(envelope=envelope, client_id=client_id, metrics_signature=metrics_signature)


def health_reply(status: str, client_id: str) -> trainer_pb2.HealthReply:
    return trainer_pb2.HealthReply(status=status, client_id=client_id)


def health_request() -> trainer_pb2.HealthRequest:
    return trainer_pb2.HealthRequest()


_SERVICE = GrpcService("fedpeft.v1.trainer_pb2_grpc", "LocalTrainer")
trainer_stub = _SERVICE.stub
add_trainer_servicer = _SERVICE.add_servicer
trainer_servicer_base = _SERVICE.servicer_base
