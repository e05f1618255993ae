"""The client side of split fine-tuning: run the client part, stream activations, backprop
the gradients the server sends back, step the client part's LoRA.

A round runs the same local loop as plain FL (`fedpeft.client.training.run_steps`); only
the step differs: its middle happens on the server (`SplitSession.step`).
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import torch

from fedpeft.client.training import TrainConfig, TrainStats, run_steps, shuffled_batches
from fedpeft.common.data.records import Record, TaskSpec
from fedpeft.common.errors import ConfigError, DataError, SplitError
from fedpeft.common.model.split import ClientPart
from fedpeft.common.training.activation_checkpointing import gradient_checkpointing
from fedpeft.common.training.objectives import CausalLMObjective
from fedpeft.common.wire import split as wire

log = logging.getLogger("fedpeft.client.split")
_END = object()
LOOPBACK_PREFIXES = ("127.0.0.1:", "localhost:", "[::1]:")


def split_channel(target: str, ca_cert: Path | None, max_tensor_bytes: int = wire.DEFAULT_MAX_TENSOR_BYTES) -> grpc.Channel:
    """A channel to a split server: TLS trusting `ca_cert`; without one, loopback only."""
    limit = min(2 * max_tensor_bytes + (1 << 20), 2**31 - 1)
    options = [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]
    if ca_cert is None:
        if not target.startswith(LOOPBACK_PREFIXES):
            raise ConfigError(f"split server {target!r} is not loopback: pass the CA certificate to use TLS")
        return grpc.insecure_channel(target, options=options)
    credentials = grpc.ssl_channel_credentials(root_certificates=Path(ca_cert).read_bytes())
    return grpc.secure_channel(target, credentials, options=options)


class SplitSession:
    """One open session: a bidirectional stream on which each request gets one reply, in order."""

    def __init__(self, channel: grpc.Channel, part: ClientPart, client_id: str, model_fingerprint: str,
                 dtype: torch.dtype = torch.bfloat16, round: int = 0, timeout: float = 600.0,
                 token: str | None = None) -> None:
        self.part, self.dtype = part, dtype
        self.bytes_up = self.bytes_down = 0
        self.wait_seconds = 0.0
        """Time spent waiting for the server (the rest of a step is the client's own compute)."""
        stub: Any = wire.split_stub(channel)
        request = wire.open_request(client_id, model_fingerprint, part.split.cut, part.split.u_shaped, dtype, round)
        metadata = (("authorization", f"Bearer {token}"),) if token else None
        try:
            reply = stub.Open(request, timeout=timeout, metadata=metadata)
        except grpc.RpcError as exc:
            raise SplitError(f"split server refused the session: {exc.code().name}: {exc.details()}") from exc
        if reply.hidden_size != part.hidden_size:
            raise SplitError(f"split server's hidden size is {reply.hidden_size}; this client part's is {part.hidden_size}")
        self.session_id, self.max_tensor_bytes = reply.session_id, int(reply.max_tensor_bytes)
        self._requests: queue.Queue = queue.Queue()
        self._responses: Iterator = stub.Train(iter(self._requests.get, _END), timeout=timeout, metadata=metadata)

    def exchange(self, msg: Any) -> Any:
        """Send one leg of a step; wait for its answer."""
        self.bytes_up += msg.ByteSize()
        start = time.perf_counter()
        self._requests.put(msg)
        try:
            reply = next(self._responses)
        except grpc.RpcError as exc:
            raise SplitError(f"split server refused step {msg.step}: {exc.code().name}: {exc.details()}") from exc
        except StopIteration:
            raise SplitError(f"split server closed the stream at step {msg.step}") from None
        finally:
            self.wait_seconds += time.perf_counter() - start
        self.bytes_down += reply.ByteSize()
        return reply

    def _tensor(self, msg: Any, field: str, shape: tuple[int, ...]) -> torch.Tensor:
        rule = wire.TensorRule(field, (self.dtype,), shape, finite=True, max_bytes=max(self.max_tensor_bytes, 1))
        return wire.tensor_from_proto(msg, rule)

    def step(self, step: int, batch: dict[str, torch.Tensor]) -> float:
        """One training step's forward and backward through both parts; leaves the client
        part's gradients in `.grad` and returns the loss."""
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        hidden = self.part.bottom(ids, mask)
        shape = tuple(hidden.shape)
        if self.part.split.u_shaped:
            reply = self.exchange(wire.forward_msg(self.session_id, step, hidden, mask, None, self.dtype))
            if reply.WhichOneof("payload") != "output":
                raise SplitError(f"step {step}: a U-shaped server must answer the forward with its output")
            output = self._tensor(reply.output, "output", shape).to(hidden.dtype).requires_grad_()
            loss = self.part.top_loss(output, labels)
            loss.backward()
            reply = self.exchange(wire.output_grad_msg(self.session_id, step, output.grad, self.dtype))  # type: ignore[arg-type]
            value = float(loss.detach())
        else:
            reply = self.exchange(wire.forward_msg(self.session_id, step, hidden, mask, labels, self.dtype))
            value = float(reply.loss)
        if reply.WhichOneof("payload") != "hidden_grad":
            raise SplitError(f"step {step}: the server's answer carries no hidden_grad")
        hidden.backward(self._tensor(reply.hidden_grad, "hidden_grad", shape).to(hidden.dtype))
        return value

    def close(self) -> None:
        """End the stream (the server then forgets the session); never raises, so it can sit in `finally`."""
        self._requests.put(_END)
        try:
            for _ in self._responses:  # drain: the server ends the stream once it sees ours end
                pass
        except grpc.RpcError:  # already ended by an error that the caller has seen
            pass


@dataclass(frozen=True)
class SplitRoundStats(TrainStats):
    bytes_up: int = 0
    bytes_down: int = 0


def train_split_local(part: ClientPart, session: SplitSession, task: TaskSpec, tokenizer: Any, rows: Sequence[Record],
                      config: TrainConfig, seed: int, label: str = "client") -> SplitRoundStats:
    """Train the client part's LoRA on `rows` against the server behind `session`: the one
    local loop (`run_steps`) with a step whose middle happens on the split server."""
    if not rows:
        raise DataError(f"{label}: no local training data")
    objective = CausalLMObjective(task, tokenizer, config.max_length)
    encoded = [objective.encode(r) for r in rows]
    part.model.train()
    with gradient_checkpointing(part.model, config.gradient_checkpointing, what="the split client part"):
        stats = run_steps(part.trainable_parameters(), shuffled_batches(encoded, objective.collate, config.batch_size, seed),
                          config, session.step, seed=seed, label=f"{label} split", steps=config.steps_for(len(encoded)))
    return SplitRoundStats(**dataclasses.asdict(stats), bytes_up=session.bytes_up, bytes_down=session.bytes_down)
