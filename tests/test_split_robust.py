"""Split server steps are all or nothing: a bad activation or gradient from one client is refused
with a `SplitError` and leaves the shared server LoRA, its AdamW state and other sessions as they were."""

from __future__ import annotations

import math
import re
from pathlib import Path

import grpc
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_split import CUT, LORA, _reference

from fedpeft.common.errors import ConfigError, SplitError
from fedpeft.common.model.base_model import model_fingerprint
from fedpeft.common.model.split import SplitConfig, load_server_part
from fedpeft.common.wire import split as wire
from fedpeft.server.split_service import SplitServer, serve_split

HUGE = 3.4e38  # finite in float32 and bfloat16: passes the wire's finiteness check
WIRE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_models import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama-4"), num_layers=4)


@pytest.fixture(scope="module")
def values(model_dir):
    return _reference(model_dir)[1]


def _server(model_dir: Path, values, u_shaped: bool, **options: object) -> SplitServer:
    """A server part holding the seeded non-zero LoRA (every factor gets a gradient), one honest step taken
    so that AdamW has state (exp_avg, exp_avg_sq, step) that a refused step must not touch."""
    part = load_server_part(model_dir, SplitConfig(cut=CUT, u_shaped=u_shaped), LORA, quantize="none")
    part.set_delta({n: values[n].detach() for n in part.delta_names})
    server = SplitServer(part=part, model_fingerprint=model_fingerprint(model_dir), **options)  # type: ignore[arg-type]
    _step(server, _open(server), torch.randn(2, 5, part.hidden_size))
    assert server.steps == 1 and server.optimizer.state
    return server


def _open(server: SplitServer, dtype: torch.dtype = torch.float32) -> str:
    return server.open("c", server.model_fingerprint, CUT, server.part.split.u_shaped, wire.dtype_to_proto(dtype))


def _forward(server: SplitServer, session_id: str, hidden: torch.Tensor, dtype: torch.dtype | None = None,
             step: int = 1) -> object:
    batch, seq = hidden.shape[:2]
    mask = torch.ones(batch, seq, dtype=torch.long)
    labels = None
    if not server.part.split.u_shaped:
        labels = torch.randint(3, int(server.part.base.config.vocab_size), (batch, seq),
                               generator=torch.Generator().manual_seed(1))
    return wire.forward_msg(session_id, step, hidden, mask, labels, dtype or hidden.dtype)


def _step(server: SplitServer, session_id: str, hidden: torch.Tensor, output_grad: torch.Tensor | None = None,
          dtype: torch.dtype | None = None) -> object:
    """One whole step through `handle` (no gRPC): the forward leg and, U-shaped, the backward leg
    (an honest small output gradient unless `output_grad` is given)."""
    reply = server.handle(_forward(server, session_id, hidden, dtype))
    if not server.part.split.u_shaped:
        return reply
    assert reply.WhichOneof("payload") == "output"
    if output_grad is None:
        output_grad = 1e-3 * torch.randn(tuple(reply.output.shape))
    return server.handle(wire.output_grad_msg(session_id, 1, output_grad, dtype or output_grad.dtype))


def _bits(tensor: torch.Tensor) -> bytes:
    return bytes(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).tolist())


def _snapshot(server: SplitServer) -> dict[str, object]:
    """Everything a refused step must leave alone, bit for bit."""
    optimizer = server.optimizer.state_dict()
    return {"delta": {n: _bits(t) for n, t in server.part.get_delta().items()},
            "optim": {(i, k): _bits(torch.as_tensor(v)) for i, s in optimizer["state"].items() for k, v in s.items()},
            "groups": repr(optimizer["param_groups"]), "steps": server.steps,
            "sessions": {sid: s.steps for sid, s in server.sessions.items()}}


def _assert_untouched(server: SplitServer, before: dict[str, object]) -> None:
    assert _snapshot(server) == before
    assert all(s.pending is None for s in server.sessions.values())
    assert not server._step_lock.locked() and server._holder is None  # the next client is not blocked


def _assert_no_stale_grads(server: SplitServer) -> None:
    """After a step refused past its backward pass, its gradients are dropped, not left for the next step."""
    assert all(p.grad is None for p in server.part.trainable_parameters())


def _assert_finite(server: SplitServer) -> None:
    assert all(bool(torch.isfinite(t).all()) for t in server.part.get_delta().values())
    assert all(bool(torch.isfinite(torch.as_tensor(v)).all()) for s in server.optimizer.state.values() for v in s.values())


MODES = pytest.mark.parametrize("u_shaped", [False, True], ids=["labels-on-server", "u-shaped"])


@MODES
@pytest.mark.parametrize(("bound", "names"), [
    (1e6, "forward.hidden holds a value of magnitude 3.4e+38; this server accepts at most 1e+06"),
    (0.0, "not finite"),  # the bound off: the gradient check before the optimizer step still refuses it
], ids=["bounded", "bound-off"])
def test_a_huge_forward_activation_is_refused_and_changes_nothing(model_dir, values, u_shaped, bound, names):
    # Prepare: a trained server (default grad clipping, which turns an Inf norm into NaN), two clients
    server = _server(model_dir, values, u_shaped, max_abs_activation=bound)
    bad_session, other = _open(server), _open(server)
    hidden = torch.randn(2, 7, server.part.hidden_size)
    hidden[1, 4, 9] = HUGE
    before = _snapshot(server)
    # Execute + assert: refused, nothing changed
    with pytest.raises(SplitError, match=re.escape(names)):
        _step(server, bad_session, hidden)
    _assert_untouched(server, before)
    if not bound:
        _assert_no_stale_grads(server)
    # the other client (and the refused one, with sane activations) train on, and the LoRA stays finite
    for session_id in (other, bad_session):
        reply = _step(server, session_id, torch.randn(2, 7, server.part.hidden_size))
        assert reply.WhichOneof("payload") == "hidden_grad"
    assert server.steps == before["steps"] + 2 and server.sessions[other].steps == 1
    _assert_finite(server)
    assert any(_bits(t) != before["delta"][n] for n, t in server.part.get_delta().items())


@pytest.mark.parametrize(("value", "bound", "names"), [
    (HUGE, 1e6, "output_grad holds a value of magnitude 3.4e+38"),
    (HUGE, 0.0, "LoRA gradient is not finite"),
    (math.nan, 1e6, "output_grad holds NaN or infinite values"),
    (math.nan, 0.0, "output_grad holds NaN or infinite values"),
], ids=["huge", "huge-bound-off", "nan", "nan-bound-off"])
@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0], ids=["clipped", "unclipped"])
def test_a_bad_u_shaped_output_grad_is_refused_and_changes_nothing(model_dir, values, value, bound, names,
                                                                   max_grad_norm):
    # Prepare: a trained U-shaped server, two clients, the bad client's forward leg already answered
    server = _server(model_dir, values, True, max_abs_activation=bound, max_grad_norm=max_grad_norm)
    bad_session, other = _open(server), _open(server)
    before = _snapshot(server)
    reply = server.handle(_forward(server, bad_session, torch.randn(2, 7, server.part.hidden_size)))
    assert server.sessions[bad_session].pending is not None and server._step_lock.locked()
    # Execute: an output gradient full of the bad value
    with pytest.raises(SplitError, match=re.escape(names)):
        server.handle(wire.output_grad_msg(bad_session, 1, torch.full(tuple(reply.output.shape), value), torch.float32))
    # Assert: nothing changed, the pending leg is gone, the lock is free
    _assert_untouched(server, before)
    if value == HUGE and not bound:
        _assert_no_stale_grads(server)
    with pytest.raises(SplitError, match="output_grad without a pending U-shaped forward"):  # refused cleanly, once
        server.handle(wire.output_grad_msg(bad_session, 1, torch.zeros(tuple(reply.output.shape)), torch.float32))
    for session_id in (other, bad_session):
        assert _step(server, session_id, torch.randn(2, 7, server.part.hidden_size)).WhichOneof("payload") == "hidden_grad"
    assert server.steps == before["steps"] + 2
    _assert_finite(server)


def test_a_huge_activation_over_grpc_is_invalid_argument_naming_the_bound(model_dir, values):
    server = _server(model_dir, values, False)
    grpc_server, port = serve_split(server, "127.0.0.1:0", None)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = wire.split_stub(channel)
            session_id = stub.Open(wire.open_request("c", server.model_fingerprint, CUT, False, torch.float32)).session_id
            hidden = torch.randn(2, 7, server.part.hidden_size)
            hidden[0, 0, 0] = -HUGE
            before = _snapshot(server)
            with pytest.raises(grpc.RpcError) as caught:
                list(stub.Train(iter([_forward(server, session_id, hidden)])))
    finally:
        grpc_server.stop(None)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "forward.hidden holds a value of magnitude 3.4e+38" in caught.value.details()
    assert "max_abs_activation" in caught.value.details()
    assert _snapshot(server)["delta"] == before["delta"] and server.steps == before["steps"]


def test_honest_low_precision_steps_pass_the_checks(model_dir, values):
    server = _server(model_dir, values, True)
    for dtype in WIRE_DTYPES:
        hidden = 50 * torch.randn(2, 7, server.part.hidden_size)
        hidden[0, 1, 2] = 2600.0  # a "massive activation" as real LLMs have
        reply = _step(server, _open(server, dtype), hidden.to(dtype), dtype=dtype)
        assert reply.WhichOneof("payload") == "hidden_grad"
    assert server.steps == 1 + len(WIRE_DTYPES)
    _assert_finite(server)


def test_a_negative_bound_is_a_config_error(model_dir, values):
    part = load_server_part(model_dir, SplitConfig(cut=CUT), LORA, quantize="none")
    for bound in (-1.0, math.nan):
        with pytest.raises(ConfigError, match="max_abs_activation"):
            SplitServer(part=part, model_fingerprint="fp", max_abs_activation=bound)


# -- property: any mutated activation is either a finite step or a clean refusal -----------------------
@pytest.fixture(scope="module")
def servers(model_dir, values) -> dict[tuple[bool, float], SplitServer]:
    """Unclipped servers, with the default bound and without one: the checks after the backward pass
    must hold without clipping's (or the bound's) help."""
    return {(u, bound): _server(model_dir, values, u, max_grad_norm=0.0, max_abs_activation=bound)
            for u in (False, True) for bound in (1e6, 0.0)}


SPECIAL = st.sampled_from([math.nan, math.inf, -math.inf, HUGE, -HUGE, 65504.0, 1e5, 9.9e5, 1e7, 1e20, -1e30, 1e36])
VALUE = st.one_of(SPECIAL, SPECIAL, st.floats(allow_nan=True, allow_infinity=True))


@st.composite
def tensors(draw: st.DrawFn, shape: tuple[int, ...]) -> torch.Tensor:
    """Gaussian values at a drawn scale, a few of them replaced by drawn (often absurd) ones."""
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3, 1e5, 1e7, 1e20]))
    tensor = (scale * torch.randn(shape, generator=generator, dtype=torch.float64)).reshape(-1)
    for _ in range(draw(st.integers(0, 3))):
        tensor[draw(st.integers(0, tensor.numel() - 1))] = draw(VALUE)
    return tensor.reshape(shape)


@st.composite
def steps(draw: st.DrawFn) -> tuple[torch.dtype, torch.dtype, torch.Tensor, torch.Tensor | None]:
    """(session wire dtype, dtype sent, hidden, U-shaped output gradient or None for an honest one)."""
    session_dtype = draw(st.sampled_from(WIRE_DTYPES))
    sent_dtype = draw(st.sampled_from(WIRE_DTYPES)) if draw(st.integers(0, 5)) == 0 else session_dtype
    batch, seq = draw(st.integers(1, 2)), draw(st.integers(2, 5))  # 2+ tokens: the shifted labels have a target
    width = draw(st.sampled_from([64] * 7 + [32]))
    hidden = draw(tensors((batch, seq, width)))
    output_grad = draw(st.none() | tensors((batch, seq, width)).map(lambda t: 1e-3 * t))
    return session_dtype, sent_dtype, hidden, output_grad


@MODES
@pytest.mark.parametrize("bound", [1e6, 0.0], ids=["bounded", "bound-off"])
@settings(max_examples=40, deadline=None, derandomize=True)
@given(case=steps())
def test_any_activation_is_a_finite_step_or_a_clean_refusal(servers, u_shaped, bound, case):
    server = servers[u_shaped, bound]
    assert server.part.hidden_size == 64  # the widths drawn above
    session_dtype, sent_dtype, hidden, output_grad = case
    session_id = _open(server, session_dtype)
    before = _snapshot(server)
    try:
        reply = _step(server, session_id, hidden.to(sent_dtype), None if output_grad is None else output_grad.to(sent_dtype),
                      dtype=sent_dtype)
    except SplitError:  # never another exception type
        _assert_untouched(server, before)
    else:
        assert reply.WhichOneof("payload") == "hidden_grad" and server.steps == before["steps"] + 1
        assert bool(torch.isfinite(wire.tensor_from_proto(reply.hidden_grad, wire.TensorRule(
            "hidden_grad", (session_dtype,), tuple(hidden.shape)))).all())
        _assert_finite(server)
    finally:
        server.close(session_id)
