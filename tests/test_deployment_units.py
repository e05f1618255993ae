"""Deployment building blocks without starting Flower: run config, SecAgg+ settings and
its error bound, key material, the app bundle, the local trainer channel."""

from __future__ import annotations

import subprocess
import sys
import time
import tomllib

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedpeft.common.errors import ConfigError
from fedpeft.common.flower_deploy import superlink_command, supernode_command
from fedpeft.common.security.pki import make_dev_certificates, make_node_key
from fedpeft.server.federation.spec import RunSpec, SecAggSection
from fedpeft.server.launcher import clientapp_component, write_app_dir
from fedpeft.server.secagg import quantization_error_bound, secagg_problems


def _config(**sections) -> RunSpec:
    return RunSpec.from_dict({"federation": {"clients": 3}, **sections})


def test_a_valid_run_config_reads_relative_paths_from_its_folder(tmp_path):
    (tmp_path / "eval.jsonl").write_text('{"text": "good", "label": "pos"}\n{"text": "bad", "label": "neg"}\n')
    (tmp_path / "run.toml").write_text('[federation]\nclients = 3\nrounds = 2\n[federation.method_options]\nr = 4\n'
                                       '[task]\neval_data = "eval.jsonl"\n[secagg]\nenabled = true\n')
    config = RunSpec.from_toml(tmp_path / "run.toml", driver="deployment")
    assert config.task.eval_data == str(tmp_path / "eval.jsonl")
    assert config.method_options() == {"r": "4"} and config.secagg.enabled and config.train_config().local_steps == 8


@pytest.mark.parametrize(("sections", "fragment"), [
    ({"federaton": {}}, "unknown section(s) ['federaton']"),
    ({"training": {"lr": 1}}, "[training]: unknown key(s) ['lr']"),
    ({"secagg": {"enabled": True, "num_shares": 4}}, "num_shares must be an odd integer"),
    ({"secagg": {"enabled": True, "num_shares": 5}}, "num_shares 5 exceeds the 3 clients"),
    ({"secagg": {"enabled": True, "reconstruction_threshold": 3}}, "reconstruction_threshold must be >= 2 and < num_shares"),
    ({"secagg": {"enabled": True}, "dp": {"enabled": True}}, "secagg and dp cannot be combined"),
    ({"secagg": {"enabled": True}, "federation": {"clients": 3, "strategy": "fedmedian"}}, "needs strategy 'fedavg'"),
    ({"envelopes": {"enabled": True}}, "envelopes.server_identity is required"),
    ({"dp": {"enabled": True, "clipping_norm": 0}}, "dp.clipping_norm must be a finite number > 0"),
    ({"task": {"train_data": "x.jsonl"}}, "task.train_data is a simulation setting"),
    ({"simulation": {"cpus_per_client": 2.0}}, "simulation.cpus_per_client is a simulation setting"),
    ({"federation": {"clients": 3, "round_timeout": 0.0}}, "federation.round_timeout must be a finite number > 0"),
    ({"federation": {"clients": 3, "method": "nope"}}, "unknown PEFT method"),
    ({"federation": {"clients": 2, "min_clients": 3}}, "min_clients 3 exceeds"),
    ({"dp": {"enabled": "false"}}, "dp.enabled = 'false' is not a boolean"),
    ({"secagg": {"num_shares": 3.0}}, "secagg.num_shares = 3.0 is not an integer"),
    ({"federation": {"rounds": "3"}}, "federation.rounds = '3' is not an integer"),
    ({"registry": {"enabled": True}}, "registry.dir is required"),
    ({"registry": {"enabled": True, "dir": "r", "keys": "/nonexistent-keys"}}, "registry keys dir /nonexistent-keys does not"),
])
def test_bad_run_configs_name_the_key(sections, fragment):
    with pytest.raises(ConfigError) as info:
        RunSpec.from_dict({"federation": {"clients": 3}} | sections).validate("deployment")
    assert fragment in str(info.value)


def test_secaggplus_error_bound_holds_for_flowers_own_quantization():
    """Replays SecAgg+'s arithmetic with Flower's quantizer: the weighted mean it yields is
    within `quantization_error_bound` of the exact one."""
    from flwr.common.secure_aggregation.quantization import dequantize, quantize

    rng = np.random.default_rng(0)
    settings = SecAggSection(enabled=True, clipping_range=2.0, quantization_range=2**16, max_weight=500)
    worst = 0.0
    for trial in range(20):
        counts = list(rng.integers(10, 500, size=int(rng.integers(2, 6))))
        deltas = [rng.uniform(-1, 1, size=(7, 5)).astype(np.float32) for _ in counts]
        ratios = [round(n / settings.max_weight * settings.quantization_range) / settings.quantization_range for n in counts]
        summed = sum(quantize([d * r], settings.clipping_range, settings.quantization_range)[0]
                     for d, r in zip(deltas, ratios, strict=True))
        value = dequantize([summed], settings.clipping_range, settings.quantization_range)[0]
        value = (value - (len(counts) - 1) * settings.clipping_range) / sum(ratios)
        exact = sum(d * n for d, n in zip(deltas, counts, strict=True)) / sum(counts)
        error = float(np.abs(value - exact).max())
        bound = quantization_error_bound(settings, counts)
        assert error <= bound, (trial, error, bound)
        worst = max(worst, error / bound)
    assert worst > 0.05  # the bound is not vacuous: observed errors come within 20x of it


def test_secagg_settings_flower_would_crash_on_are_refused():
    assert secagg_problems(SecAggSection(num_shares=3, reconstruction_threshold=2), 3, 2) == []
    assert any("odd" in p for p in secagg_problems(SecAggSection(num_shares=4, reconstruction_threshold=2), 5, 2))
    assert any("quantization_range" in p for p in secagg_problems(SecAggSection(quantization_range=2**31), 3, 2))


def test_dev_certificates_carry_the_loopback_sans_flower_needs(tmp_path):
    files = make_dev_certificates(tmp_path, hosts=["coordinator.example.org", "10.0.0.5"])
    cert = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "coordinator.example.org"}
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1", "10.0.0.5"}
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    assert files.server_key.stat().st_mode & 0o077 == 0 and (tmp_path / "ca.key").stat().st_mode & 0o077 == 0
    with pytest.raises(ConfigError, match="exists"):
        make_dev_certificates(tmp_path)


def test_node_keys_are_ec_openssh_keys(tmp_path):
    private, public = make_node_key(tmp_path)
    key = serialization.load_ssh_private_key(private.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and public.read_text().startswith("ecdsa-sha2-nistp384 ")
    assert private.stat().st_mode & 0o077 == 0


def test_security_defaults_of_the_flower_commands(tmp_path):
    tls = (tmp_path / "ca.crt", tmp_path / "server.pem", tmp_path / "server.key")
    cmd = superlink_command(host="127.0.0.1", port=9092, tls=tls, node_auth=True)
    assert "--enable-supernode-auth" in cmd and "--insecure" not in cmd and "--ssl-certfile" in cmd
    with pytest.raises(ConfigError, match="needs TLS"):
        superlink_command(host="127.0.0.1", port=9092, tls=None, node_auth=True)
    node = supernode_command(superlink="h:9092", root_cert=tmp_path / "ca.crt", auth_key=tmp_path / "k",
                             clientappio_port=9101, node_config={"trainer-address": "unix:///s", "partition-id": 2})
    assert node[node.index("--node-config") + 1] == 'trainer-address="unix:///s" partition-id=2'


@pytest.mark.parametrize(("sections", "app"), [
    ({}, "plain_app"), ({"secagg": {"enabled": True}}, "secagg_app"), ({"dp": {"enabled": True}}, "dp_app"),
])
def test_the_app_bundle_names_our_server_app_and_the_client_app_the_run_needs(tmp_path, sections, app):
    config = _config(**sections)
    app_dir = write_app_dir(tmp_path / "run", tmp_path / "run.toml", config, resume=False)
    project = tomllib.loads((app_dir / "pyproject.toml").read_text())
    components = project["tool"]["flwr"]["app"]["components"]
    assert components == {"serverapp": "fedpeft.server.deploy_app:app", "clientapp": clientapp_component(config)}
    assert components["clientapp"].endswith(app)
    assert project["tool"]["flwr"]["app"]["config"]["fedpeft-run-dir"] == str((tmp_path / "run").resolve())


def test_a_registry_section_makes_every_round_publish(tmp_path):
    from fedpeft.server.federation.assembly import assemble

    (tmp_path / "run.toml").write_text('[federation]\nmodel = "tiny"\nquantize = "none"\n'
                                       '[registry]\nenabled = true\ndir = "registry"\nadapter_id = "support"\n')
    from fedpeft.simulations.harness.tiny_models import build_tiny_llama

    build_tiny_llama(tmp_path / "tiny")
    config = RunSpec.from_toml(tmp_path / "run.toml", driver="deployment")
    assert config.registry.dir == str(tmp_path / "registry")
    setup = assemble(config, "deployment", tmp_path / "run").server
    assert setup.publish is not None and setup.publish.adapter_id == "support"
    assert setup.publish.registry_dir == str(tmp_path / "registry")


def test_the_serving_client_does_not_import_torch():
    code = "import sys, fedpeft.client.serving_client; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split() == ["False"]


def test_the_deployment_client_app_does_not_import_torch():
    code = "import sys, fedpeft.client.flower_app; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def test_the_local_trainer_refuses_a_non_local_address(tmp_path):
    from fedpeft.client.trainer_service import TrainerState, serve_trainer

    with pytest.raises(ConfigError, match="loopback"):
        serve_trainer(TrainerState(setup=None, rows=[]), "0.0.0.0:5555")  # type: ignore[arg-type]


def test_sealing_over_the_local_channel_gives_an_envelope_the_server_opens(tmp_path):
    import grpc
    import torch

    from fedpeft.client.trainer_service import TrainerState, serve_trainer, socket_address, wait_until_ready
    from fedpeft.common.protocol.flower_io import delta_to_arrayrecord
    from fedpeft.common.security.envelope import EnvelopeError, PeerIdentity, open_delta, verify_metrics
    from fedpeft.common.wire import envelope_from_bytes
    from fedpeft.common.wire import trainer as wire

    client, server_identity = PeerIdentity.generate(), PeerIdentity.generate()
    address = socket_address(tmp_path / "t.sock")
    state = TrainerState(setup=None, rows=[], identity=client, server_x25519=server_identity.public_x25519)  # type: ignore[arg-type]
    server = serve_trainer(state, address)
    try:
        assert wait_until_ready(address, timeout=10) == client.public_keys.key_id
        delta = {"w": torch.arange(6, dtype=torch.float32).view(2, 3)}
        metrics = {"num-examples": 12.0, "train-loss": 0.5}
        with grpc.insecure_channel(address) as channel:
            stub = wire.trainer_stub(channel)
            reply = stub.Seal(wire.seal_request("run", 3, "lora", server_identity.public_x25519,
                                                delta_to_arrayrecord(delta), metrics))
            with pytest.raises(grpc.RpcError) as refused:  # a seal-to key other than the pinned one
                stub.Seal(wire.seal_request("run", 3, "lora", PeerIdentity.generate().public_x25519,
                                            delta_to_arrayrecord(delta), metrics))
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        envelope = envelope_from_bytes(reply.envelope)
        opened = open_delta(envelope, recipient=server_identity,
                            trusted_senders={client.public_keys.key_id: client.public_ed25519}, replay_guard=None,
                            expected_run_id="run", expected_round=3)
        assert torch.equal(opened["w"], delta["w"]) and reply.client_id == client.public_keys.key_id
        verify_metrics(envelope, metrics, reply.metrics_signature)
        with pytest.raises(EnvelopeError, match="altered"):
            verify_metrics(envelope, {**metrics, "num-examples": 1e9}, reply.metrics_signature)
    finally:
        server.stop(grace=None)


def test_the_client_app_says_when_its_trainer_is_not_running(tmp_path):
    from flwr.app import Context, RecordDict

    from fedpeft.client.flower_app import TrainerUnavailable, _call
    from fedpeft.common.wire import trainer as wire

    context = Context(run_id=1, node_id=1, node_config={"trainer-address": f"unix://{tmp_path}/none.sock"},
                      state=RecordDict(), run_config={})
    with pytest.raises(TrainerUnavailable, match="unreachable"):
        _call(context, "Health", wire.health_request())
    with pytest.raises(TrainerUnavailable, match="start this SuperNode with peft-client"):
        _call(Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={}), "Health",
              wire.health_request())


def test_builtin_client_data_is_the_simulations_partition():
    from fedpeft.client.launcher import load_client_rows
    from fedpeft.common.data.builtin_task import builtin_splits
    from fedpeft.common.data.partition import PartitionSpec, partition_records

    rows, partition = load_client_rows("builtin:1/3", seed=7)
    train, _ = builtin_splits(800, 200, 7)
    assert partition == 1 and rows == partition_records(train, 3, PartitionSpec.parse("iid"), "label", 7)[1]
    with pytest.raises(ConfigError, match="builtin:K/N"):
        load_client_rows("builtin:x")


def test_a_supernode_left_behind_by_a_restarted_superlink_is_restarted(monkeypatch):
    """Flower's SuperNode that held a message when its SuperLink died never exits (it retries
    against a link that no longer knows it): peft-client stops it once the link is back."""
    import socket
    import threading

    from fedpeft.client import launcher

    monkeypatch.setattr(launcher, "LINK_PROBE_S", 0.2)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    node = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    result: list[object] = []
    waiter = threading.Thread(target=lambda: result.append(
        launcher._wait_watching_link(node, f"127.0.0.1:{port}", threading.Event())))
    waiter.start()
    try:
        time.sleep(0.6)
        assert not result and node.poll() is None  # link up, node running: keep waiting
        listener.close()  # the coordinator dies ...
        time.sleep(0.6)
        assert not result and node.poll() is None
        listener = socket.create_server(("127.0.0.1", port))  # ... and comes back on its port
        waiter.join(timeout=20)
        assert result == [launcher.RESTARTED] and node.poll() is not None
    finally:
        listener.close()
        if node.poll() is None:
            node.kill()


def test_the_flower_apps_copies_of_the_protocol_keys_match_the_protocol():
    """flower_app keeps its own copies of the key names (the protocol module imports torch):
    every name both define must spell the same key."""
    import fedpeft.client.flower_app as app
    import fedpeft.common.protocol.plan as plan

    shared = [n for n in dir(app) if n.endswith("_KEY") and hasattr(plan, n)]
    assert {"PLAN_KEY", "WEIGHT_KEY", "UNIT_WEIGHT_KEY", "PARTITION_KEY"} <= set(shared)
    assert {n: getattr(app, n) for n in shared} == {n: getattr(plan, n) for n in shared}
