"""torch tensors <-> `fedpeft.v1.SplitTrainer` messages, with the checks every received tensor passes.

Tensors travel as raw little-endian bytes plus dtype and shape (protobuf has no packed
bf16/fp16, and `repeated float` would cost 5 bytes per value): a bf16 activation costs
exactly 2 bytes per value. Decoding validates dtype, shape, byte length, finiteness and a
size cap before any byte becomes a tensor, raising `SplitError` subtypes whose messages
name the offending field; the service maps them onto gRPC status codes.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from fedpeft.common.errors import SplitError, SplitTooLargeError
from fedpeft.common.wire.grpc_service import GrpcService
from fedpeft.v1 import split_pb2

WIRE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
"""Dtypes activations and gradients may travel in (`--split-wire-dtype`)."""

_TO_PROTO: dict[torch.dtype, int] = {
    torch.float32: split_pb2.DTYPE_FLOAT32, torch.float16: split_pb2.DTYPE_FLOAT16,
    torch.bfloat16: split_pb2.DTYPE_BFLOAT16, torch.int64: split_pb2.DTYPE_INT64,
    torch.int32: split_pb2.DTYPE_INT32, torch.uint8: split_pb2.DTYPE_UINT8,
}
_FROM_PROTO: dict[int, torch.dtype] = {v: k for k, v in _TO_PROTO.items()}
MASK_DTYPES = (torch.uint8, torch.int32, torch.int64)
LABEL_DTYPES = (torch.int32, torch.int64)
IGNORE_INDEX = -100
DEFAULT_MAX_TENSOR_BYTES = 256 * 1024 * 1024
"""Largest activation tensor a server accepts by default (e.g. batch 8 x 4096 tokens x 4096 hidden in bf16)."""

if sys.byteorder != "little":  # pragma: no cover - every platform torch ships wheels for is little-endian
    raise ImportError("fedpeft's split wire format assumes a little-endian host")


def dtype_to_proto(dtype: torch.dtype) -> int:
    try:
        return _TO_PROTO[dtype]
    except KeyError:
        raise SplitError(f"dtype {dtype} cannot go on the split wire; allowed: {sorted(map(str, _TO_PROTO))}") from None


def dtype_name(value: int) -> str:
    """The enum name of a wire dtype value (unknown values by number)."""
    try:
        return split_pb2.DType.Name(value)
    except ValueError:
        return f"DType({value})"


def wire_dtype(name: str) -> torch.dtype:
    """Parse a wire dtype name (float32, float16, bfloat16)."""
    try:
        return WIRE_DTYPES[name]
    except KeyError:
        raise SplitError(f"split wire dtype {name!r}: choose one of {list(WIRE_DTYPES)}") from None


def tensor_to_proto(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> split_pb2.Tensor:
    """`tensor` (cast to `dtype` if given) as raw bytes; no copy beyond the cast and `.contiguous()`."""
    t = tensor.detach().to("cpu", dtype or tensor.dtype).contiguous()
    data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return split_pb2.Tensor(dtype=dtype_to_proto(t.dtype), shape=list(t.shape), data=data)


@dataclass(frozen=True)
class TensorRule:
    """What one received tensor must look like; `None` in `shape` matches any size >= 1."""

    field: str
    dtypes: Sequence[torch.dtype]
    shape: Sequence[int | None]
    finite: bool = False
    max_bytes: int = DEFAULT_MAX_TENSOR_BYTES


def tensor_from_proto(msg: split_pb2.Tensor, rule: TensorRule) -> torch.Tensor:
    """Decode and validate one tensor; errors name `rule.field`."""
    field = rule.field
    dtype = _FROM_PROTO.get(msg.dtype)
    if dtype is None or dtype not in rule.dtypes:
        allowed = ", ".join(dtype_name(_TO_PROTO[d]) for d in rule.dtypes)
        raise SplitError(f"{field}.dtype is {dtype_name(msg.dtype)}; expected {allowed}")
    shape = tuple(int(s) for s in msg.shape)
    if len(shape) != len(rule.shape) or any(s < 1 for s in shape) or any(
            want is not None and s != want for s, want in zip(shape, rule.shape, strict=True)):
        want = "(" + ", ".join("*" if w is None else str(w) for w in rule.shape) + ")"
        raise SplitError(f"{field}.shape is {list(shape)}; expected {want}")
    itemsize = torch.empty((), dtype=dtype).element_size()
    expected = math.prod(shape) * itemsize
    if expected > rule.max_bytes or len(msg.data) > rule.max_bytes:
        raise SplitTooLargeError(f"{field} is {max(expected, len(msg.data))} bytes; the cap is {rule.max_bytes}")
    if len(msg.data) != expected:
        raise SplitError(f"{field}.data is {len(msg.data)} bytes; shape {list(shape)} of {dtype_name(msg.dtype)} "
                         f"needs {expected}")
    tensor = torch.frombuffer(bytearray(msg.data), dtype=torch.uint8).view(dtype).reshape(shape)
    if rule.finite and not bool(torch.isfinite(tensor).all()):
        raise SplitError(f"{field} holds NaN or infinite values")
    return tensor


def open_request(client_id: str, model_fingerprint: str, cut: int, u_shaped: bool, dtype: torch.dtype,
                 round: int = 0) -> split_pb2.OpenRequest:
    return split_pb2.OpenRequest(client_id=client_id, model_fingerprint=model_fingerprint, cut=cut, u_shaped=u_shaped,
                                 wire_dtype=dtype_to_proto(dtype), round=round)


def open_reply(session_id: str, hidden_size: int, max_tensor_bytes: int) -> split_pb2.OpenReply:
    return split_pb2.OpenReply(session_id=session_id, hidden_size=hidden_size, max_tensor_bytes=max_tensor_bytes)


def forward_msg(session_id: str, step: int, hidden: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor | None, dtype: torch.dtype) -> split_pb2.ActivationMsg:
    """A step's activations (in the wire dtype), its padding mask (uint8) and, unless U-shaped, labels."""
    forward = split_pb2.Forward(hidden=tensor_to_proto(hidden, dtype),
                                attention_mask=tensor_to_proto(attention_mask, torch.uint8))
    if labels is not None:
        forward.labels.CopyFrom(tensor_to_proto(labels, torch.int64))
    return split_pb2.ActivationMsg(session_id=session_id, step=step, forward=forward)


def output_grad_msg(session_id: str, step: int, grad: torch.Tensor, dtype: torch.dtype) -> split_pb2.ActivationMsg:
    return split_pb2.ActivationMsg(session_id=session_id, step=step, output_grad=tensor_to_proto(grad, dtype))


def hidden_grad_msg(step: int, grad: torch.Tensor, dtype: torch.dtype, loss: float = 0.0) -> split_pb2.GradientMsg:
    return split_pb2.GradientMsg(step=step, hidden_grad=tensor_to_proto(grad, dtype), loss=loss)


def output_msg(step: int, output: torch.Tensor, dtype: torch.dtype) -> split_pb2.GradientMsg:
    return split_pb2.GradientMsg(step=step, output=tensor_to_proto(output, dtype))


@dataclass(frozen=True)
class ForwardInputs:
    hidden: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor | None


def forward_from_proto(msg: split_pb2.Forward, *, hidden_size: int, dtype: torch.dtype, u_shaped: bool,
                       vocab_size: int, max_bytes: int) -> ForwardInputs:
    """Validate a Forward against the session: hidden (B, S, hidden_size) in the wire dtype
    and finite; mask (B, S) of 0/1; labels (B, S) in [0, vocab) or -100, present iff not U-shaped."""
    if not msg.HasField("hidden"):
        raise SplitError("forward.hidden is missing")
    hidden = tensor_from_proto(msg.hidden, TensorRule("forward.hidden", (dtype,), (None, None, hidden_size),
                                                      finite=True, max_bytes=max_bytes))
    batch, seq = hidden.shape[:2]
    if not msg.HasField("attention_mask"):
        raise SplitError("forward.attention_mask is missing")
    mask = tensor_from_proto(msg.attention_mask, TensorRule("forward.attention_mask", MASK_DTYPES, (batch, seq),
                                                            max_bytes=max_bytes))
    if bool(((mask != 0) & (mask != 1)).any()):
        raise SplitError("forward.attention_mask must hold only 0 and 1")
    labels = None
    if u_shaped and msg.HasField("labels"):
        raise SplitError("forward.labels sent in a U-shaped session: labels must stay on the client")
    if not u_shaped:
        if not msg.HasField("labels"):
            raise SplitError("forward.labels is missing (the session computes the loss on the server)")
        labels = tensor_from_proto(msg.labels, TensorRule("forward.labels", LABEL_DTYPES, (batch, seq), max_bytes=max_bytes))
        if bool(((labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab_size))).any()):
            raise SplitError(f"forward.labels must be token ids in [0, {vocab_size}) or {IGNORE_INDEX}")
        labels = labels.long()
    return ForwardInputs(hidden=hidden, attention_mask=mask.long(), labels=labels)


def message_bytes(messages: Iterable[object]) -> int:
    """Serialized size of protobuf messages (what goes on the wire, before gRPC framing)."""
    return sum(m.ByteSize() for m in messages)  # type: ignore[attr-defined]


_SERVICE = GrpcService("fedpeft.v1.split_pb2_grpc", "SplitTrainer")
split_stub = _SERVICE.stub
add_split_servicer = _SERVICE.add_servicer
split_servicer_base = _SERVICE.servicer_base


def open_request_fields(msg: split_pb2.OpenRequest) -> tuple[str, str, int, bool, int, int]:
    """(client_id, model_fingerprint, cut, u_shaped, wire dtype enum, round) of an OpenRequest."""
    return msg.client_id, msg.model_fingerprint, int(msg.cut), bool(msg.u_shaped), int(msg.wire_dtype), int(msg.round)


def wire_dtype_from_proto(value: int) -> torch.dtype:
    """The torch dtype of an OpenRequest's wire dtype; only float32/float16/bfloat16 are allowed."""
    dtype = _FROM_PROTO.get(value)
    if dtype not in WIRE_DTYPES.values():
        raise SplitError(f"open.wire_dtype is {dtype_name(value)}; expected one of DTYPE_FLOAT32, DTYPE_FLOAT16, "
                         "DTYPE_BFLOAT16")
    return dtype  # type: ignore[return-value]
