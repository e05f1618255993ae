"""The deployment ClientApp: a thin, torch-free forwarder to `peft-client`'s trainer.

Flower's SuperNode starts a fresh ClientApp process for each message. This module only
imports Flower, gRPC and generated protobuf code; the work (the loaded 4-bit model, the
private data, the identity keys) lives in the long-lived trainer
(`fedpeft.client.trainer_service`), reached at the node-config entry `trainer-address`.

Three apps, one per server workflow (the server names the one to use in the FAB):
- `plain_app`: Flower's Message API; compresses the update when the run has codecs
  (`fedpeft.common.codecs.mod.codec_mod`) and seals the reply delta into a signed,
  encrypted envelope when the server asks for it (`seal_mod`);
- `dp_app`: as `plain_app`, with Flower's `fixedclipping_mod` clipping the update first
  (central DP with client-side clipping; the server adds the noise);
- `secagg_app`: Flower's legacy SecAgg+ path (`secaggplus_mod`), which masks the delta
  so the server only learns the sum.
"""

from __future__ import annotations

import json
import os

import grpc
import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.common import Code, FitRes, Parameters, Status
from flwr.compat.common import recorddict_compat as compat

from fedpeft.common.codecs.mod import codec_mod
from fedpeft.common.protocol.control_variates import SERVER_CONTROL_KEY, accepted_round, begin_round, end_round
from fedpeft.common.wire import trainer as wire

# Keys shared with the server side (duplicated from fedpeft.common.protocol.plan, which imports torch).
PLAN_KEY = "fedpeft-plan"
SEAL_TO_KEY = "fedpeft-seal-to"
RUN_ID_KEY = "fedpeft-run-id"
METHOD_KEY = "fedpeft-method"
TENSOR_NAMES_KEY = "fedpeft-tensor-names"
RANK_KEY = "lora-rank"
MAX_WEIGHT_KEY = "fedpeft-secagg-max-weight"
CLIPPING_RANGE_KEY = "fedpeft-secagg-clipping-range"
ENVELOPE_RECORD = "envelope"
TRAINER_ADDRESS_KEY = "trainer-address"
PARTITION_KEY = "partition-id"
QUERY_KEY = "fedpeft-query"
WEIGHT_KEY = "num-examples"
UNIT_WEIGHT_KEY = "unit-weight"
_CHANNEL_OPTIONS = [("grpc.max_receive_message_length", wire.MAX_LOCAL_MESSAGE_BYTES),
                    ("grpc.max_send_message_length", wire.MAX_LOCAL_MESSAGE_BYTES)]
TRAIN_TIMEOUT_S = float(os.environ.get("FEDPEFT_TRAIN_TIMEOUT", "3600"))


class TrainerUnavailable(RuntimeError):
    """The node's long-lived trainer is not reachable (peft-client not running?)."""


def _trainer_address(context: Context) -> str:
    address = context.node_config.get(TRAINER_ADDRESS_KEY)
    if not address:
        raise TrainerUnavailable(f"node config has no {TRAINER_ADDRESS_KEY!r}: start this SuperNode with peft-client")
    return str(address)


def _call(context: Context, method: str, request: object) -> object:
    address = _trainer_address(context)
    with grpc.insecure_channel(address, options=_CHANNEL_OPTIONS) as channel:
        stub = wire.trainer_stub(channel)
        try:
            return getattr(stub, method)(request, timeout=TRAIN_TIMEOUT_S)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            detail = exc.details() if hasattr(exc, "details") else str(exc)
            if code == grpc.StatusCode.UNAVAILABLE:
                raise TrainerUnavailable(f"local trainer at {address} is unreachable: {detail}") from None
            raise RuntimeError(f"local trainer refused {method}: {detail}") from None


def _train(context: Context, plan_json: str, server_round: int, proximal_mu: float,
           arrays: ArrayRecord, lora_rank: int = 0,
           correction: ArrayRecord | None = None) -> tuple[ArrayRecord, dict[str, float], ArrayRecord | None]:
    reply = _call(context, "Train", wire.train_request(plan_json, server_round, proximal_mu, arrays, lora_rank,
                                                      correction))
    mean_step = wire.arrays_from_proto(reply.mean_step) if reply.mean_step else None  # type: ignore[attr-defined]
    return wire.arrays_from_proto(reply.delta), dict(reply.metrics), mean_step  # type: ignore[attr-defined]


def partition_query(msg: Message, context: Context) -> Message:
    """Answer the server's partition query: the partition id this node declares (the simulation's
    partition, or `peft-client start --partition-id`). The server orders per-client LoRA ranks by it,
    so the same spec gives each client the same rank in simulation and in deployment."""
    config = msg.content.config_records.get("config")
    if config is None or config.get(QUERY_KEY) != PARTITION_KEY:
        raise ValueError(f"unsupported query {dict(config) if config is not None else {}!r}")
    value = context.node_config.get(PARTITION_KEY)
    metrics = {PARTITION_KEY: int(value)} if isinstance(value, int) and not isinstance(value, bool) else {}
    return Message(RecordDict({"partition": MetricRecord(metrics)}), reply_to=msg)


def _train_message(msg: Message, context: Context) -> Message:
    """Message API train: {"arrays", "config"} in, {"arrays", "metrics"} out; under SCAFFOLD
    the server's control variate comes with them and this node keeps its own in the context's
    state (`control_variates`: the same bookkeeping as the simulation's ClientApp)."""
    config = msg.content.config_records["config"]
    arrays = msg.content.array_records["arrays"]
    server_round = int(config.get("server-round", 0))
    server_control = msg.content.array_records.get(SERVER_CONTROL_KEY)
    correction = (begin_round(server_control, accepted_round(msg.content), context.state)
                  if server_control is not None else None)
    delta, metrics, mean_step = _train(context, str(config[PLAN_KEY]), server_round,
                                       float(config.get("proximal-mu", 0.0)), arrays, int(config.get(RANK_KEY, 0) or 0),
                                       correction)
    if server_control is not None:
        if mean_step is None:
            raise RuntimeError("the server sent a SCAFFOLD control variate, but the local trainer returned no mean step")
        end_round(server_control, mean_step, server_round, context.state)
    return Message(RecordDict({"arrays": delta, "metrics": MetricRecord(_typed(metrics))}), reply_to=msg)


def seal_mod(msg: Message, context: Context, call_next) -> Message:  # type: ignore[no-untyped-def]
    """Replace the reply's plaintext delta by an envelope sealed to the server's key,
    when the server's config asks for it (`fedpeft-seal-to`)."""
    if msg.metadata.message_type != MessageType.TRAIN:  # a query carries no delta
        return call_next(msg, context)
    config = msg.content.config_records.get("config")
    if config is None or SEAL_TO_KEY not in config:
        status = _call(context, "Health", wire.health_request()).status  # type: ignore[attr-defined]
        if status == "sealed-only":  # the client pinned a server key: never send a plaintext delta
            raise PermissionError("the server did not ask for a sealed reply, but this client only sends sealed "
                                  "deltas (peft-client --server-key): refusing to train")
        return call_next(msg, context)
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    delta = reply.content.array_records["arrays"]
    metrics = reply.content.metric_records["metrics"]
    request = wire.seal_request(str(config[RUN_ID_KEY]), int(config.get("server-round", 0)), str(config[METHOD_KEY]),
                                bytes.fromhex(str(config[SEAL_TO_KEY])), delta, {k: float(v) for k, v in metrics.items()})
    sealed = _call(context, "Seal", request)
    content = RecordDict({
        "metrics": metrics,
        ENVELOPE_RECORD: ConfigRecord({"envelope": sealed.envelope, "client-id": sealed.client_id,  # type: ignore[attr-defined]
                                       "metrics-signature": sealed.metrics_signature}),  # type: ignore[attr-defined]
    })
    return Message(content, reply_to=msg)


def _legacy_train(msg: Message, context: Context) -> Message:
    """Legacy FitIns/FitRes train (what SecAgg+'s workflow sends), tensors named by the plan."""
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    names = json.loads(str(fitins.config[TENSOR_NAMES_KEY]))
    if len(names) != len(fitins.parameters.tensors):
        raise ValueError(f"server sent {len(fitins.parameters.tensors)} tensors but names for {len(names)}")
    arrays = wire.arrays_from_proto(
        wire.trainer_pb2.FlowerArray(name=n, stype=fitins.parameters.tensor_type, data=t)
        for n, t in zip(names, fitins.parameters.tensors, strict=True)
    )
    delta, metrics, _ = _train(context, str(fitins.config[PLAN_KEY]), int(fitins.config["server-round"]),
                            float(fitins.config.get("proximal-mu", 0.0)), arrays)
    if list(delta.keys()) != names:
        raise ValueError("local trainer returned tensors in a different order than the plan")
    _check_secagg_bounds(delta, int(metrics["num-examples"]), fitins.config)
    parameters = Parameters(tensors=[a.data for a in delta.values()], tensor_type="numpy.ndarray")
    fitres = FitRes(status=Status(Code.OK, "ok"), parameters=parameters, num_examples=int(metrics["num-examples"]),
                    metrics=_typed(metrics))
    return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)


def _typed(metrics: dict[str, float]) -> dict[str, int | float]:
    """The trainer's metrics (doubles over its gRPC) with the example counts as the integers
    the server requires of them."""
    return {k: (int(v) if k in (WEIGHT_KEY, UNIT_WEIGHT_KEY) else v) for k, v in metrics.items()}


def _check_secagg_bounds(delta: ArrayRecord, num_examples: int, config: dict) -> None:  # type: ignore[type-arg]
    """Refuse to send what SecAgg+ would silently corrupt: values outside its clipping
    range (clipped) or a weight above max_weight (overflows the modulus)."""
    max_weight = float(config.get(MAX_WEIGHT_KEY, 0) or 0)
    clipping = float(config.get(CLIPPING_RANGE_KEY, 0) or 0)
    if max_weight and num_examples > max_weight:
        raise ValueError(f"{num_examples} local examples exceed the server's secagg.max_weight {max_weight:g}; "
                         "the masked sum would overflow (raise secagg.max_weight)")
    if clipping:
        scale = num_examples / max_weight if max_weight else 1.0
        peak = max((float(np.abs(a.numpy()).max()) for a in delta.values() if int(np.prod(a.shape or (1,)))), default=0.0)
        if peak * scale > clipping:
            raise ValueError(f"delta value {peak:.4g} (x weight {scale:.3g}) exceeds secagg.clipping_range {clipping:g}; "
                             "SecAgg+ would clip it (raise secagg.clipping_range)")


def _build(mods: list, legacy: bool = False) -> ClientApp:  # type: ignore[type-arg]
    app = ClientApp(mods=mods)
    app.train()(_legacy_train if legacy else _train_message)
    app.query()(partition_query)
    return app


def _secagg_mods() -> list:  # type: ignore[type-arg]
    from flwr.client.mod import secaggplus_mod

    return [secaggplus_mod]


# codec_mod inside seal_mod (the envelope seals the compressed update) and outside Flower's
# clipping (the clipped update is what is encoded).
plain_app = _build([seal_mod, codec_mod])
dp_app = _build([seal_mod, codec_mod, fixedclipping_mod])
secagg_app = _build(_secagg_mods(), legacy=True)
