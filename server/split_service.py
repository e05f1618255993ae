"""The split fine-tuning server: one shared server part that every client's steps train.

`SplitServer` holds the server part (blocks[cut:] with its own LoRA), its optimizer and
the open sessions; it is plain Python raising `SplitError`s, so it is tested without
gRPC. `SplitTrainerService` exposes it as the `fedpeft.v1.SplitTrainer` gRPC service
(TLS with the project's certificates) and maps errors onto status codes.

Steps of different clients are serialized by one lock: the server part's LoRA is
updated in place after every step, and a U-shaped step's graph (built on the forward
leg, consumed on the backward leg) must not see parameters change in between.

A step is all or nothing: one client's Inf/NaN (or absurdly large) activation must not
poison the LoRA every client shares. Received tensors are checked for finiteness and a
magnitude bound on arrival, and the server's own gradients (its LoRA's, and the one it
returns) are checked before clipping and `optimizer.step()`; a refused step leaves the
LoRA, the AdamW state and the step counters as they were.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import secrets
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import grpc
import torch

from fedpeft.common.errors import ConfigError, SplitAuthError, SplitError, SplitSessionError, SplitTooLargeError
from fedpeft.common.model.split import MAX_ABS_ACTIVATION, ServerPart
from fedpeft.common.security.pki import TlsFiles
from fedpeft.common.wire import split as wire

log = logging.getLogger("fedpeft.server.split")
LOOPBACK_PREFIXES = ("127.0.0.1:", "localhost:", "[::1]:")


@dataclass
class Session:
    client_id: str
    dtype: torch.dtype
    round: int
    steps: int = 0
    pending: tuple[torch.Tensor, torch.Tensor] | None = None
    """U-shaped: (activations leaf, server output) between the forward and backward legs."""


@dataclass
class SplitServer:
    """The shared server part, its optimizer, and the sessions training against it."""

    part: ServerPart
    model_fingerprint: str
    learning_rate: float = 1e-3
    max_grad_norm: float = 1.0
    """Clip the server LoRA's gradient to this L2 norm each step (0 = off)."""
    max_abs_activation: float = MAX_ABS_ACTIVATION
    """Refuse a received activation or U-shaped output gradient holding a value of larger
    magnitude (0 = off; NaN/Inf are refused regardless). Honest hidden states stay far below:
    the largest "massive activations" reported for real LLMs are ~1e3-1e4, fp16 cannot carry
    more than 65504, and the gradients of a token-mean loss are far smaller still; 1e6 leaves
    two orders of magnitude of headroom while keeping squares and dot products (RMSNorm,
    attention) well inside fp32's range, so no value the bound admits overflows them."""
    max_tensor_bytes: int = wire.DEFAULT_MAX_TENSOR_BYTES
    lock_timeout: float = 120.0
    max_sessions: int = 256
    """Open sessions at most (a session ends with its stream); more Opens are refused."""
    access_token: str | None = field(default=None, repr=False)
    """When set, every call must carry `authorization: Bearer <token>`. The run hands it to
    its clients inside the federation plan, over Flower's authenticated channel, so only
    members of this run can open sessions (TLS alone admits anyone who trusts the CA)."""
    sessions: dict[str, Session] = field(default_factory=dict)
    steps: int = 0
    bytes_in: int = 0
    """Serialized activation messages received (forward activations, U-shaped output gradients)."""
    bytes_out: int = 0
    """Serialized replies sent (activation gradients, U-shaped server outputs)."""

    def __post_init__(self) -> None:
        if not self.max_abs_activation >= 0:  # also refuses NaN
            raise ConfigError(f"max_abs_activation must be >= 0 (0 = off), got {self.max_abs_activation}")
        self.optimizer = torch.optim.AdamW(self.part.trainable_parameters(), lr=self.learning_rate, weight_decay=0.0)
        self._step_lock = threading.Lock()
        self._holder: str | None = None
        self._sessions_lock = threading.Lock()
        self.part.model.train()

    # -- sessions ---------------------------------------------------------------------------------
    def open(self, client_id: str, model_fingerprint: str, cut: int, u_shaped: bool, dtype_enum: int,
             round: int = 0) -> str:
        """Check the client's model, cut and mode against this server's; returns a new session id."""
        if not client_id:
            raise SplitError("open.client_id is empty")
        if model_fingerprint != self.model_fingerprint:
            raise SplitError(f"open.model_fingerprint {model_fingerprint!r} differs from the server's "
                             f"{self.model_fingerprint!r}: both sides must fine-tune the same base model")
        if cut != self.part.split.cut:
            raise SplitError(f"open.cut is {cut}; this server runs blocks from {self.part.split.cut} on")
        if u_shaped != self.part.split.u_shaped:
            mode = "U-shaped" if self.part.split.u_shaped else "labels-on-server"
            raise SplitError(f"open.u_shaped is {u_shaped}; this server is {mode}")
        dtype = wire.wire_dtype_from_proto(dtype_enum)
        session_id = secrets.token_hex(16)
        with self._sessions_lock:
            if len(self.sessions) >= self.max_sessions:
                raise SplitTooLargeError(f"{len(self.sessions)} sessions are open (the cap is {self.max_sessions}); "
                                         "retry when a client's stream ends")
            self.sessions[session_id] = Session(client_id=client_id, dtype=dtype, round=round)
        log.info("split session for client %s (round %d, %s on the wire)", client_id, round, dtype)
        return session_id

    def session(self, session_id: str) -> Session:
        with self._sessions_lock:
            found = self.sessions.get(session_id)
        if found is None:
            raise SplitSessionError(f"session_id {session_id[:32]!r} is not an open session (call Open first)")
        return found

    def close(self, session_id: str) -> None:
        """Forget a session; drops a half-done U-shaped step and frees the server part."""
        with self._sessions_lock:
            session = self.sessions.pop(session_id, None)
        if session is not None and session.pending is not None:
            session.pending = None
            self._release(session_id)

    def check_access(self, metadata: object) -> None:
        """Refuse a call without this run's token (no-op when the server has none)."""
        if self.access_token is None:
            return
        offered = next((value for key, value in (metadata or ()) if key == "authorization"), "")  # type: ignore[attr-defined]
        expected = f"Bearer {self.access_token}"
        if not hmac.compare_digest(str(offered).encode(), expected.encode()):
            raise SplitAuthError("missing or wrong split access token: only clients of this run (which get it in the "
                                 "federation plan) may train against this split server")

    def count_traffic(self, received: int, sent: int) -> None:
        with self._sessions_lock:
            self.bytes_in += received
            self.bytes_out += sent

    # -- state (checkpoints) ----------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self, what: str) -> Iterator[None]:
        """Hold the step lock (no client step runs while the state is read or replaced)."""
        if not self._step_lock.acquire(timeout=self.lock_timeout):
            raise SplitError(f"{what}: the server part stayed busy for {self.lock_timeout:.0f} s")
        try:
            yield
        finally:
            self._step_lock.release()

    def state_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The server part's LoRA and its AdamW state as flat tensors plus string metadata
        (what a checkpoint needs to resume the shared server part exactly), read between steps."""
        with self._locked("checkpoint"):
            tensors = {f"delta.{name}": t for name, t in self.part.get_delta().items()}
            optimizer = self.optimizer.state_dict()
            for index, state in optimizer["state"].items():
                for key, value in state.items():
                    tensors[f"optim.{index}.{key}"] = torch.as_tensor(value).detach().clone()
            return tensors, {"param_groups": json.dumps(optimizer["param_groups"]), "steps": str(self.steps)}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str], source: str) -> None:
        """Restore what `state_tensors` saved, all or nothing: a checkpoint of another server
        part is refused before anything changes. The configured learning rate stays."""
        delta = {name.removeprefix("delta."): t for name, t in tensors.items() if name.startswith("delta.")}
        params = self.part.trainable_parameters()
        state: dict[int, dict[str, torch.Tensor]] = {}
        try:
            for name, value in tensors.items():
                if name.startswith("optim."):
                    _, index, key = name.split(".", 2)
                    state.setdefault(int(index), {})[key] = value
            groups = json.loads(metadata["param_groups"])
            steps = int(metadata.get("steps", 0))
            bad = [i for i, s in state.items() if not 0 <= i < len(params)
                   or any(v.dim() and v.shape != params[i].shape for v in s.values())]
            if bad or len(groups) != 1 or len(groups[0].get("params", ())) != len(params):
                raise ValueError(f"{len(params)} parameters here; the checkpoint's state does not match them")
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            raise SplitError(f"{source}: the server part's optimizer state does not fit this server ({exc})") from exc
        for group in groups:
            group["lr"] = self.learning_rate
        with self._locked("restore"):
            self.part.set_delta(delta, source=source)  # checks names, shapes, finiteness before changing anything
            self.optimizer.load_state_dict({"state": state, "param_groups": groups})
            self.steps = steps

    # -- steps ------------------------------------------------------------------------------------
    def _acquire(self, session_id: str) -> None:
        if not self._step_lock.acquire(timeout=self.lock_timeout):
            raise SplitError(f"the server part stayed busy for {self.lock_timeout:.0f} s; retry the step")
        self._holder = session_id

    def _release(self, session_id: str) -> None:
        if self._holder == session_id:
            self._holder = None
            self._step_lock.release()

    def _update(self) -> None:
        params = self.part.trainable_parameters()
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        self.optimizer.step()
        self.steps += 1

    def _check_received(self, field: str, tensor: torch.Tensor) -> None:
        """Refuse a (finite, already decoded) client tensor beyond `max_abs_activation`."""
        if self.max_abs_activation <= 0 or tensor.numel() == 0:
            return
        peak = float(tensor.detach().abs().max())
        if not peak <= self.max_abs_activation:
            raise SplitError(f"{field} holds a value of magnitude {peak:.3g}; this server accepts at most "
                             f"{self.max_abs_activation:.3g} (max_abs_activation): honest activations and gradients "
                             "stay far below")

    def _refuse(self, message: str) -> NoReturn:
        """Drop this step's gradients (so none leak into the next step) and refuse it."""
        self.optimizer.zero_grad(set_to_none=True)
        raise SplitError(message)

    def _check_sendable(self, step: int, field: str, tensor: torch.Tensor | None, dtype: torch.dtype) -> None:
        """Refuse a step whose reply would not be finite in the wire dtype (fp16 overflows at 65504)."""
        if tensor is None or not bool(torch.isfinite(tensor.detach().to(dtype)).all()):
            self._refuse(f"step {step} refused: the server's {field} is not finite in {dtype}; "
                         "nothing was updated (are the activations sane?)")

    def _checked_update(self, step: int, hidden_grad: torch.Tensor | None, dtype: torch.dtype) -> None:
        """Step the optimizer only if the LoRA's gradients and the returned activation gradient
        are finite. Checked before clipping: clipping an Inf norm gives NaN, and AdamW would
        then write NaN into the shared LoRA and its moments. The sum of squares (in fp32) also
        refuses finite gradients so large that AdamW's squared moment would overflow."""
        grads = [p.grad for p in self.part.trainable_parameters() if p.grad is not None]
        square = torch.stack([g.detach().float().square().sum() for g in grads]).sum() if grads else torch.zeros(())
        if not bool(torch.isfinite(square)):
            self._refuse(f"step {step} refused: the server part's LoRA gradient is not finite (or overflows fp32); "
                         "the shared server part and its optimizer state are unchanged")
        self._check_sendable(step, "activation gradient", hidden_grad, dtype)
        self._update()

    def handle(self, msg) -> object:  # ActivationMsg -> GradientMsg
        """Answer one leg of a step."""
        session = self.session(msg.session_id)
        payload = msg.WhichOneof("payload")
        if payload == "forward":
            return self._forward(msg.session_id, session, int(msg.step), msg.forward)
        if payload == "output_grad":
            return self._backward(msg.session_id, session, int(msg.step), msg.output_grad)
        raise SplitError("activation message has neither forward nor output_grad")

    def _forward(self, session_id: str, session: Session, step: int, forward) -> object:
        if session.pending is not None:
            raise SplitError(f"step {step}: forward before the output_grad of the previous U-shaped step")
        base = self.part.base
        inputs = wire.forward_from_proto(forward, hidden_size=self.part.hidden_size, dtype=session.dtype,
                                         u_shaped=self.part.split.u_shaped, vocab_size=int(base.config.vocab_size),
                                         max_bytes=self.max_tensor_bytes)
        self._check_received("forward.hidden", inputs.hidden)
        hidden = inputs.hidden.to(torch.float32).requires_grad_()
        self._acquire(session_id)
        try:
            self.optimizer.zero_grad(set_to_none=True)
            if self.part.split.u_shaped:
                output = self.part.middle(hidden, inputs.attention_mask)
                self._check_sendable(step, "output", output, session.dtype)
                session.pending = (hidden, output)
                return wire.output_msg(step, output, session.dtype)  # the lock is held until output_grad
            loss = self.part.loss(hidden, inputs.attention_mask, inputs.labels)  # type: ignore[arg-type]
            if not torch.isfinite(loss):
                self._refuse(f"step {step}: the server's loss is {float(loss)}")
            loss.backward()
            self._checked_update(step, hidden.grad, session.dtype)
            session.steps += 1
            return wire.hidden_grad_msg(step, hidden.grad, session.dtype, float(loss.detach()))  # type: ignore[arg-type]
        finally:
            if session.pending is None:
                self._release(session_id)

    def _backward(self, session_id: str, session: Session, step: int, grad_msg) -> object:
        if session.pending is None:
            raise SplitError(f"step {step}: output_grad without a pending U-shaped forward")
        hidden, output = session.pending
        try:
            grad = wire.tensor_from_proto(grad_msg, wire.TensorRule("output_grad", (session.dtype,), tuple(output.shape),
                                                                    finite=True, max_bytes=self.max_tensor_bytes))
            self._check_received("output_grad", grad)
            output.backward(grad.to(output.dtype))
            self._checked_update(step, hidden.grad, session.dtype)
            session.steps += 1
            return wire.hidden_grad_msg(step, hidden.grad, session.dtype)  # type: ignore[arg-type]
        finally:
            session.pending = None
            self._release(session_id)


_STATUS = {SplitSessionError: grpc.StatusCode.NOT_FOUND, SplitTooLargeError: grpc.StatusCode.RESOURCE_EXHAUSTED,
           SplitAuthError: grpc.StatusCode.UNAUTHENTICATED}


def status_for(exc: SplitError) -> grpc.StatusCode:
    return next((code for kind, code in _STATUS.items() if isinstance(exc, kind)), grpc.StatusCode.INVALID_ARGUMENT)


class SplitTrainerService(wire.split_servicer_base()):  # type: ignore[misc]
    """gRPC `SplitTrainer` over a `SplitServer`."""

    def __init__(self, server: SplitServer) -> None:
        self.server = server

    def Open(self, request, context):  # noqa: N802  (gRPC method name)
        try:
            self.server.check_access(context.invocation_metadata())
            session_id = self.server.open(*wire.open_request_fields(request))
        except SplitError as exc:
            context.abort(status_for(exc), str(exc))
        return wire.open_reply(session_id, self.server.part.hidden_size, self.server.max_tensor_bytes)

    def Train(self, request_iterator, context):  # noqa: N802
        seen: set[str] = set()
        try:
            try:
                self.server.check_access(context.invocation_metadata())
            except SplitError as exc:
                context.abort(status_for(exc), str(exc))
            for msg in request_iterator:
                seen.add(msg.session_id)
                try:
                    reply = self.server.handle(msg)
                except SplitError as exc:
                    log.warning("split step refused: %s", exc)
                    context.abort(status_for(exc), str(exc))
                self.server.count_traffic(msg.ByteSize(), reply.ByteSize())
                yield reply
        finally:  # the stream ended (or broke): its sessions are over
            for session_id in seen:
                self.server.close(session_id)


def grpc_options(max_tensor_bytes: int) -> list[tuple[str, int]]:
    """Message caps a little above the tensor cap, so oversized tensors get our error, not gRPC's."""
    limit = min(2 * max_tensor_bytes + (1 << 20), 2**31 - 1)
    return [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]


def serve_split(server: SplitServer, address: str, tls: TlsFiles | None, max_workers: int = 16) -> tuple[grpc.Server, int]:
    """Start the SplitTrainer service on `address` (HOST:PORT, port 0 = any); returns (server, port).

    TLS is required except on loopback (`tls=None`), where tests and single-host runs may go without.
    """
    if tls is None and not address.startswith(LOOPBACK_PREFIXES):
        raise ConfigError(f"split server address {address!r} is not loopback: it needs TLS (peft-server certs)")
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers),
                              options=grpc_options(server.max_tensor_bytes))
    wire.add_split_servicer(SplitTrainerService(server), grpc_server)
    if tls is None:
        port = grpc_server.add_insecure_port(address)
    else:
        tls.check()
        credentials = grpc.ssl_server_credentials([(Path(tls.server_key).read_bytes(), Path(tls.server_cert).read_bytes())])
        port = grpc_server.add_secure_port(address, credentials)
    if port == 0:
        raise ConfigError(f"cannot bind the split server to {address}")
    grpc_server.start()
    log.info("split server listening on %s (port %d, %s)", address, port, "TLS" if tls else "loopback, no TLS")
    return grpc_server, port
