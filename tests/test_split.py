"""Split fine-tuning: exact gradients over real gRPC (TLS, loopback), refused bad messages."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import torch
from run_helpers import forget_round, split_server_steps

from fedpeft.client.split_client import SplitSession, split_channel
from fedpeft.common.errors import ConfigError, DeltaError, SplitError
from fedpeft.common.methods import get_method, make_config
from fedpeft.common.model.base_model import load_base_model, model_fingerprint
from fedpeft.common.model.split import JoinedSplitModel, SplitConfig, check_split, load_client_part, load_server_part
from fedpeft.common.security.pki import make_dev_certificates
from fedpeft.common.wire import split as wire
from fedpeft.server.split_service import SplitServer, serve_split

CUT = 2
LORA = make_config("lora", {"dropout": "0", "r": "4"})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_models import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama-4"), num_layers=4)


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory):
    return make_dev_certificates(tmp_path_factory.mktemp("tls"))


def _batch(vocab: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, vocab, (2, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    labels = ids.clone()
    labels[1, 5:] = -100
    labels[:, :2] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _reference(model_dir: Path):
    """The unsplit model with LoRA set to seeded random values (B != 0, so every LoRA factor gets a gradient)."""
    model = get_method("lora").build(load_base_model(model_dir, "none"), LORA)
    names = get_method("lora").delta_names(model)
    params = dict(model.named_parameters())
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name in names:
            params[name].copy_(0.1 * torch.randn(params[name].shape, generator=generator))
    return model, {n: params[n] for n in names}


def _start(model_dir: Path, tls, split: SplitConfig, values, max_tensor_bytes: int = wire.DEFAULT_MAX_TENSOR_BYTES):
    server_part = load_server_part(model_dir, split, LORA, quantize="none")
    server_part.set_delta({n: values[n].detach() for n in server_part.delta_names})
    server = SplitServer(part=server_part, model_fingerprint=model_fingerprint(model_dir), max_grad_norm=0.0,
                         max_tensor_bytes=max_tensor_bytes)
    grpc_server, port = serve_split(server, "127.0.0.1:0", tls)
    return server, grpc_server, f"127.0.0.1:{port}"


@pytest.mark.parametrize("u_shaped", [False, True], ids=["labels-on-server", "u-shaped"])
def test_split_step_over_grpc_gives_the_unsplit_gradients(model_dir, tls, u_shaped):
    # Prepare: the unsplit reference, and both parts holding the same LoRA values
    split = SplitConfig(cut=CUT, u_shaped=u_shaped)
    reference, values = _reference(model_dir)
    batch = _batch(reference.config.vocab_size)
    ref_loss = reference(**batch).loss
    ref_loss.backward()
    client = load_client_part(model_dir, split, LORA, quantize="none")
    client.set_delta({n: values[n].detach() for n in client.delta_names})
    server, grpc_server, target = _start(model_dir, tls, split, values)
    try:
        # Execute: one step over TLS gRPC with float32 on the wire
        with split_channel(target, tls.ca_cert) as channel:
            session = SplitSession(channel, client, "client-0", model_fingerprint(model_dir), dtype=torch.float32)
            loss = session.step(1, batch)
            session.close()
    finally:
        grpc_server.stop(None)
    # Assert: same loss, same gradients on both sides' LoRA, every tensor of both covered
    assert loss == pytest.approx(float(ref_loss.detach()), abs=1e-6)
    assert set(client.delta_names) | set(server.part.delta_names) == set(values)
    assert not set(client.delta_names) & set(server.part.delta_names)
    for part in (client, server.part):
        params = dict(part.model.named_parameters())
        for name in part.delta_names:
            assert params[name].grad is not None, name
            assert torch.allclose(params[name].grad, values[name].grad, atol=1e-6, rtol=1e-5), name
    assert server.steps == 1 and session.bytes_up > 0 and session.bytes_down > 0


def test_joined_parts_compute_the_unsplit_loss(model_dir):
    reference, values = _reference(model_dir)
    batch = _batch(reference.config.vocab_size)
    split = SplitConfig(cut=CUT)
    client = load_client_part(model_dir, split, LORA, quantize="none")
    server = load_server_part(model_dir, split, LORA, quantize="none")
    for part in (client, server):
        part.set_delta({n: values[n].detach() for n in part.delta_names})
    joined = JoinedSplitModel(client, server)
    assert torch.allclose(joined(**batch).logits, reference(**batch).logits, atol=1e-5)


def test_client_part_holds_only_its_blocks(model_dir):
    client = load_client_part(model_dir, SplitConfig(cut=1), LORA, quantize="none")
    assert len(client.base.model.layers) == 1
    assert all(".layers.0." in n for n in client.delta_names)


def test_bad_cuts_and_methods_are_refused(model_dir):
    for cut in (4, 9):
        with pytest.raises(ConfigError, match=f"split cut {cut} must leave blocks on both sides"):
            check_split(model_dir, SplitConfig(cut=cut))
    with pytest.raises(ConfigError, match="supports methods"):
        check_split(model_dir, SplitConfig(cut=1), method="prefix")
    with pytest.raises(ConfigError, match=">= 1"):
        SplitConfig(cut=0)


# -- bad activation messages --------------------------------------------------------------------------
MAX_BYTES = 16 * 1024


@pytest.fixture(scope="module")
def live_server(model_dir, tls):
    _, values = _reference(model_dir)
    server, grpc_server, target = _start(model_dir, tls, SplitConfig(cut=CUT), values, max_tensor_bytes=MAX_BYTES)
    channel = split_channel(target, tls.ca_cert)
    yield server, wire.split_stub(channel)
    channel.close()
    grpc_server.stop(None)


def _open(stub, model_dir, dtype=torch.float32) -> str:
    return stub.Open(wire.open_request("c", model_fingerprint(model_dir), CUT, False, dtype)).session_id


def _good(session_id: str, hidden=None) -> object:
    hidden = torch.randn(2, 7, 64) if hidden is None else hidden
    mask, labels = torch.ones(2, 7, dtype=torch.long), torch.zeros(2, 7, dtype=torch.long)
    return wire.forward_msg(session_id, 1, hidden, mask, labels, torch.float32)


def _refusal(stub, msg) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Train(iter([msg])))
    return caught.value


def _wrong_dtype(msg):
    msg.forward.hidden.CopyFrom(wire.tensor_to_proto(torch.randn(2, 7, 64), torch.float16))


def _truncated(msg):
    msg.forward.hidden.data = msg.forward.hidden.data[:-3]


def _nan(msg):
    hidden = torch.randn(2, 7, 64)
    hidden[0, 3, 5] = float("nan")
    msg.forward.hidden.CopyFrom(wire.tensor_to_proto(hidden))


def _wrong_width(msg):
    msg.forward.hidden.CopyFrom(wire.tensor_to_proto(torch.randn(2, 7, 32)))


def _mask_mismatch(msg):
    msg.forward.attention_mask.CopyFrom(wire.tensor_to_proto(torch.ones(2, 6, dtype=torch.uint8)))


def _bad_label(msg):
    msg.forward.labels.CopyFrom(wire.tensor_to_proto(torch.full((2, 7), 10**6, dtype=torch.long)))


def _no_labels(msg):
    msg.forward.ClearField("labels")


def _oversized(msg):
    msg.forward.hidden.CopyFrom(wire.tensor_to_proto(torch.randn(2, 70, 64)))


@pytest.mark.parametrize(("corrupt", "code", "names"), [
    (_wrong_dtype, grpc.StatusCode.INVALID_ARGUMENT, "forward.hidden.dtype is DTYPE_FLOAT16; expected DTYPE_FLOAT32"),
    (_truncated, grpc.StatusCode.INVALID_ARGUMENT, "forward.hidden.data is 3581 bytes"),
    (_nan, grpc.StatusCode.INVALID_ARGUMENT, "forward.hidden holds NaN"),
    (_wrong_width, grpc.StatusCode.INVALID_ARGUMENT, r"forward.hidden.shape is [2, 7, 32]; expected (*, *, 64)"),
    (_mask_mismatch, grpc.StatusCode.INVALID_ARGUMENT, "forward.attention_mask.shape is [2, 6]; expected (2, 7)"),
    (_bad_label, grpc.StatusCode.INVALID_ARGUMENT, "forward.labels must be token ids"),
    (_no_labels, grpc.StatusCode.INVALID_ARGUMENT, "forward.labels is missing"),
    (_oversized, grpc.StatusCode.RESOURCE_EXHAUSTED, f"forward.hidden is 35840 bytes; the cap is {MAX_BYTES}"),
], ids=["dtype", "truncated", "nan", "width", "mask-shape", "label-range", "no-labels", "oversized"])
def test_bad_activation_messages_are_refused_naming_the_field(live_server, model_dir, corrupt, code, names):
    server, stub = live_server
    steps_before = server.steps
    msg = _good(_open(stub, model_dir))
    corrupt(msg)
    error = _refusal(stub, msg)
    assert error.code() == code
    assert names in error.details()
    assert server.steps == steps_before


def test_unknown_session_and_mismatched_open_are_refused(live_server, model_dir):
    server, stub = live_server
    error = _refusal(stub, _good("no-such-session"))
    assert error.code() == grpc.StatusCode.NOT_FOUND and "not an open session" in error.details()
    for request, names in [(wire.open_request("c", "llama-000000000000", CUT, False, torch.float32), "model_fingerprint"),
                           (wire.open_request("c", model_fingerprint(model_dir), CUT + 1, False, torch.float32), "open.cut"),
                           (wire.open_request("c", model_fingerprint(model_dir), CUT, True, torch.float32), "open.u_shaped")]:
        with pytest.raises(grpc.RpcError) as caught:
            stub.Open(request)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and names in caught.value.details()


def test_opens_beyond_the_session_cap_are_refused(model_dir):
    from fedpeft.common.errors import SplitTooLargeError

    part = load_server_part(model_dir, SplitConfig(cut=CUT), LORA, quantize="none")
    server = SplitServer(part=part, model_fingerprint=model_fingerprint(model_dir), max_sessions=2)
    args = ("c", model_fingerprint(model_dir), CUT, False, wire.dtype_to_proto(torch.float32))
    first = server.open(*args)
    server.open(*args)
    with pytest.raises(SplitTooLargeError, match="the cap is 2"):
        server.open(*args)
    server.close(first)
    server.open(*args)


def test_a_good_message_after_refusals_still_trains(live_server, model_dir):
    server, stub = live_server
    steps_before = server.steps
    replies = list(stub.Train(iter([_good(_open(stub, model_dir))])))
    assert len(replies) == 1 and replies[0].WhichOneof("payload") == "hidden_grad"
    assert list(replies[0].hidden_grad.shape) == [2, 7, 64] and server.steps == steps_before + 1


def test_a_split_server_with_an_access_token_refuses_clients_without_it(model_dir, tls):
    # Prepare: a server that requires this run's token, and a client part
    split = SplitConfig(cut=CUT)
    server_part = load_server_part(model_dir, split, LORA, quantize="none")
    server = SplitServer(part=server_part, model_fingerprint=model_fingerprint(model_dir), access_token="run-secret")
    grpc_server, port = serve_split(server, "127.0.0.1:0", tls)
    client = load_client_part(model_dir, split, LORA, quantize="none")
    try:
        with split_channel(f"127.0.0.1:{port}", tls.ca_cert) as channel:
            # Execute + assert: no token and a wrong token are refused before a session exists
            for token in (None, "guess"):
                with pytest.raises(SplitError, match="UNAUTHENTICATED: missing or wrong split access token"):
                    SplitSession(channel, client, "c", model_fingerprint(model_dir), dtype=torch.float32, token=token)
            stub = wire.split_stub(channel)  # a stream with a session id but no token gets nowhere either
            with pytest.raises(grpc.RpcError) as caught:
                list(stub.Train(iter([_good("any-session")])))
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert not server.sessions and server.steps == 0
            # the run's own client trains
            session = SplitSession(channel, client, "c", model_fingerprint(model_dir), dtype=torch.float32,
                                   token="run-secret")
            assert session.step(1, _batch(client.base.config.vocab_size)) > 0
            session.close()
            assert server.steps == 1
    finally:
        grpc_server.stop(None)


def test_wire_round_trip_keeps_values_and_dtypes():
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8):
        tensor = (torch.randn(3, 5) * 10).to(dtype)
        decoded = wire.tensor_from_proto(wire.tensor_to_proto(tensor), wire.TensorRule("t", (dtype,), (3, 5)))
        assert decoded.dtype == dtype and torch.equal(decoded, tensor)
    assert len(wire.tensor_to_proto(torch.zeros(4, 8), torch.bfloat16).data) == 4 * 8 * 2


def test_client_refuses_plaintext_to_a_remote_server():
    with pytest.raises(ConfigError, match="not loopback"):
        split_channel("10.1.2.3:50051", None)
    with pytest.raises(SplitError, match="choose one of"):
        wire.wire_dtype("int8")


# -- SplitFed on Flower's simulation engine ------------------------------------------------------------
@pytest.mark.slow
def test_splitfed_simulation_trains_client_parts_with_fedavg_against_one_server(model_dir, tmp_path):
    from fedpeft.common.protocol.deltas import load_delta_file
    from fedpeft.server.federation.flags import spec_from_flags
    from fedpeft.simulations.runner import run_simulation

    # Prepare: 2 clients x 2 rounds, 4-bit client parts holding 2 of 4 blocks
    config = spec_from_flags(model=str(model_dir), method="lora", method_options={"r": "4"}, clients=2, rounds=2,
                              local_steps=6, learning_rate=5e-3, quantize="4bit",
                              builtin_train_rows=160, eval_limit=32, seed=3, topology="split", split_cut=CUT)
    # Execute
    result = run_simulation(config, str(tmp_path / "run"))
    # Assert: every round aggregated both clients, the loss fell, the global delta is the client part's
    rows = result.rows
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["clients_accepted"] == 2 for r in rows[1:])
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]
    start = load_delta_file(result.out_dir / "checkpoints" / "global-round-0000.safetensors")
    end = load_delta_file(result.out_dir / "checkpoints" / "global-round-0002.safetensors")
    assert start.keys() == end.keys() and all(f".layers.{i}." in "".join(start) for i in range(CUT))
    assert not any(f".layers.{i}." in k for k in start for i in range(CUT, 4))
    assert any(not torch.equal(start[k], end[k]) for k in start)
    assert (result.final_dir / "server-part" / "adapter_model.safetensors").is_file()
    # the activation traffic is part of the round's bytes (bf16 hidden states up, their gradients down)
    assert all(r["split_bytes_up"] > 0 and r["split_bytes_down"] > 0 for r in rows[1:])
    assert all(r["bytes_up"] > r["split_bytes_up"] for r in rows[1:])  # + the client part's delta

    # A crash before round 2 was recorded: --resume redoes round 2 on the checkpointed server part
    forget_round(result.out_dir, 2)
    resumed = run_simulation(None, resume=str(result.out_dir))
    assert [r["round"] for r in resumed.rows] == [0, 1, 2]
    steps = {r: split_server_steps(result.out_dir, r) for r in (0, 1, 2)}
    assert steps == {0: 0, 1: 12, 2: 24}  # 2 clients x 6 steps a round, counted on from round 1's checkpoint


def test_split_server_state_round_trips_and_a_foreign_state_is_refused(model_dir):
    def server(r: int) -> SplitServer:
        part = load_server_part(model_dir, SplitConfig(cut=CUT), make_config("lora", {"r": str(r)}), quantize="none")
        return SplitServer(part=part, model_fingerprint="fp", learning_rate=1e-2)

    trained = server(4)
    for p in trained.part.trainable_parameters():  # one optimizer step so AdamW has state
        p.grad = torch.randn_like(p)
    trained._update()
    tensors, metadata = trained.state_tensors()

    fresh = server(4)
    fresh.load_state_tensors(tensors, metadata, source="ckpt")
    assert fresh.steps == 1
    for name, value in trained.part.get_delta().items():
        assert torch.equal(fresh.part.get_delta()[name], value)
    assert all(torch.equal(a["exp_avg"], b["exp_avg"]) for a, b in
               zip(trained.optimizer.state.values(), fresh.optimizer.state.values(), strict=True))
    other = server(8)  # another rank: shapes differ, refused before anything changes
    before = {k: v.clone() for k, v in other.part.get_delta().items()}
    with pytest.raises(SplitError, match="does not fit this server"):
        other.load_state_tensors(tensors, metadata, source="ckpt")
    assert all(torch.equal(before[k], v) for k, v in other.part.get_delta().items()) and other.steps == 0
    with pytest.raises(DeltaError):  # optimizer state that fits, but a delta with a missing tensor
        fresh.load_state_tensors({k: v for k, v in tensors.items() if not k.startswith("delta.")}, metadata, "ckpt")


def test_split_topology_settings_are_checked_together():
    from fedpeft.server.federation.flags import spec_from_flags

    found = spec_from_flags(topology="split", method="prefix", split_cut=0, dp_clipping_norm=1.0,
                            strategy="fedprox").problems("simulation")
    assert any("split.cut" in p for p in found) and any("federation.method 'lora'" in p for p in found)
    assert any("split and dp" in p for p in found)
    assert any("strategy 'fedprox' is not supported" in p for p in found)  # the split client has no proximal term
    assert any("federation.topology 'mesh'" in p for p in spec_from_flags(topology="mesh").problems("simulation"))


def test_u_shaped_round_through_the_flower_glue_sends_no_labels(model_dir, tls):
    from fedpeft.client.split_app import split_train_round
    from fedpeft.client.training import TrainConfig
    from fedpeft.common.data.builtin_task import builtin_splits, builtin_task
    from fedpeft.common.protocol.flower_io import delta_from_arrayrecord, delta_to_arrayrecord
    from fedpeft.common.protocol.plan import FederationPlan

    # Prepare: a U-shaped server, the global client part, a plan as the coordinator sends it
    split = SplitConfig(cut=CUT, u_shaped=True)
    _, values = _reference(model_dir)
    server, grpc_server, target = _start(model_dir, tls, split, values)
    seen: list[object] = []
    handle = server.handle
    server.handle = lambda msg: seen.append(msg) or handle(msg)  # type: ignore[method-assign]
    global_part = load_client_part(model_dir, split, LORA, quantize="none")
    plan = FederationPlan(run_name="t", model_fingerprint=model_fingerprint(model_dir), method="lora",
                          method_options=LORA.to_dict(), task=builtin_task().to_dict(),
                          train=TrainConfig(local_steps=3, batch_size=4, learning_rate=1e-2).__dict__.copy(), seed=0,
                          split={"cut": CUT, "u_shaped": True, "wire_dtype": "bfloat16"})
    rows = builtin_splits(24, 8, 0)[0]
    try:
        # Execute: one federated round of one client (4-bit client part, bf16 on the wire)
        reply, metrics = split_train_round(str(model_dir), "4bit", target, str(tls.ca_cert), plan,
                                           delta_to_arrayrecord(global_part.get_delta()), rows, server_round=1,
                                           partition=0, client_id="c0")
    finally:
        grpc_server.stop(None)
    # Assert: the reply is the client part's delta, trained; no forward ever carried labels
    delta = delta_from_arrayrecord(reply)
    assert list(delta) == global_part.delta_names
    assert any(not torch.equal(delta[n], global_part.get_delta()[n]) for n in delta)
    forwards = [m for m in seen if m.WhichOneof("payload") == "forward"]
    assert len(forwards) == 3 and not any(m.forward.HasField("labels") for m in forwards)
    assert all(m.forward.hidden.dtype == wire.dtype_to_proto(torch.bfloat16) for m in forwards)
    assert server.steps == 3 and metrics["num-examples"] == len(rows)


def test_run_config_split_section_is_checked(tmp_path):
    from fedpeft.server.federation.spec import RunSpec

    config = RunSpec.from_dict({"federation": {"method": "prefix"}, "dp": {"enabled": True},
                                  "split": {"enabled": True, "cut": 0, "host": "0.0.0.0", "wire_dtype": "int8"}})
    found = "\n".join(config.problems("deployment"))
    for needle in ("split.cut must be an integer >= 1", "split.wire_dtype", "federation.method 'lora'", "split and dp",
                   "split.tls_dir is required"):
        assert needle in found
    assert RunSpec.from_dict({"split": {"enabled": True}}).problems("deployment") == []
    assert RunSpec.from_dict({"split": {"enabled": True, "port": 70000}}).problems("simulation") == [
        "split.port must be in 1..65535 (got 70000)"]


def test_deployment_serverapp_starts_the_configured_split_server(model_dir, tmp_path):
    from fedpeft.server.deploy_app import deployed_federation
    from fedpeft.server.federation.spec import RunSpec
    from fedpeft.simulations.harness.loopback import free_port

    config = RunSpec.from_dict({"federation": {"model": str(model_dir), "quantize": "none", "method_options": {"r": 4}},
                                "split": {"enabled": True, "cut": CUT, "port": free_port(), "wire_dtype": "float16"}},
                               driver="deployment")
    federation = deployed_federation(config, tmp_path / "run", resume=False)
    run = federation.topology.run
    assert run is not None
    try:
        entry = run.plan_entry()  # the run's split access token travels to clients in the plan
        assert entry == {"cut": CUT, "u_shaped": False, "wire_dtype": "float16", "token": run.server.access_token}
        assert len(str(run.server.access_token)) >= 40
        client = load_client_part(model_dir, SplitConfig(cut=CUT), make_config("lora", {"r": "4"}), quantize="none")
        with split_channel(run.target, None) as channel:
            session = SplitSession(channel, client, "c", model_fingerprint(model_dir), dtype=torch.float16,
                                   token=str(entry["token"]))
            loss = session.step(1, _batch(client.base.config.vocab_size))
            session.close()
        assert loss > 0 and run.server.steps == 1
    finally:
        run.stop()


@pytest.mark.slow
def test_client_step_benchmark_measures_all_three_topologies_the_same_way(tiny_model_dir, tmp_path):
    from fedpeft.simulations.bench.client_cost import (
        measure_baseline,
        measure_fl_client_step,
        measure_offsite_client_step,
        measure_split_client_step,
        ratio_table,
    )

    tiny = tmp_path / "tiny4"
    from fedpeft.simulations.harness.tiny_models import build_tiny_llama

    build_tiny_llama(tiny, num_layers=4)
    data = tmp_path / "train.tsv"
    data.write_text("sentence\tlabel\n" + "".join(f"ticket {i} about the printer\t{i % 2}\n" for i in range(40)))
    common = {"batch_size": 4, "max_length": 32, "steps": 1, "data": str(data), "labels": "0=negative,1=positive",
              "quantize": "none"}
    baseline = measure_baseline()
    rows = {"fl": measure_fl_client_step(tiny, baseline=baseline, **common),
            "split k=1": measure_split_client_step(tiny, 1, baseline=baseline, **common),
            "offsite 1:1:2": measure_offsite_client_step(tiny, "1:1:2", tmp_path / "emu", baseline=baseline, **common)}
    assert rows["offsite 1:1:2"]["blocks"] == "3/4"
    assert rows["offsite 1:1:2"]["tensor_bytes"] < rows["fl"]["tensor_bytes"]
    assert rows["split k=1"]["tensor_bytes"] < rows["fl"]["tensor_bytes"]
    table = ratio_table(rows)
    assert "offsite 1:1:2" in table and "split k=1" in table
