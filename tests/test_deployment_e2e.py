"""The deployed system on loopback: real `peft-server` and `peft-client` processes, the
real Flower SuperLink/SuperNodes, TLS, SuperNode authentication, SecAgg+ and sealed
envelopes; compared against the simulation of the same federation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from run_helpers import forget_round, split_server_steps

from fedpeft.common.protocol.deltas import load_delta_file
from fedpeft.server.federation.flags import spec_from_flags
from fedpeft.simulations.harness.loopback import LoopbackDeployment, write_run_config
from fedpeft.simulations.runner import run_simulation

pytestmark = pytest.mark.slow
CLIENTS, ROUNDS, SEED = 3, 2, 7
FEDERATION = {"method": "lora", "rounds": ROUNDS, "clients": CLIENTS, "seed": SEED, "quantize": "4bit",
              "method_options": {"r": 4}}
TRAINING = {"local_steps": 6, "learning_rate": 0.005}
TASK = {"eval_limit": 48}


def _checkpoint(run_dir: Path, rnd: int) -> dict[str, torch.Tensor]:
    return load_delta_file(run_dir / "checkpoints" / f"global-round-{rnd:04d}.safetensors")


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def simulated(tiny_model_dir, tmp_path_factory) -> Path:
    """The same federation on the Simulation Engine: the reference result."""
    out = tmp_path_factory.mktemp("reference") / "sim"
    config = spec_from_flags(model=str(tiny_model_dir), method="lora", method_options={"r": "4"}, clients=CLIENTS,
                              rounds=ROUNDS, local_steps=6, learning_rate=0.005, quantize="4bit", eval_limit=48,
                              seed=SEED)
    return run_simulation(config, str(out)).out_dir


@pytest.fixture()
def deployment(tiny_model_dir, tmp_path):
    dep = LoopbackDeployment(tmp_path / "dep", model=str(tiny_model_dir))
    dep.make_tls()
    yield dep
    dep.stop_all()


def _config(dep: LoopbackDeployment, name: str, **sections) -> Path:
    federation = {"model": dep.model, **FEDERATION, **sections.pop("federation", {})}
    return write_run_config(dep.root / f"{name}.toml",
                            {"federation": federation, "training": TRAINING, "task": TASK, **sections})


def test_sealed_envelopes_reject_untrusted_and_unauthenticated_peers_and_equal_the_simulation(deployment, simulated):
    dep = deployment
    for k in range(CLIENTS):
        dep.make_client_keys(f"c{k}")
    dep.make_client_keys("mallory", register=True, trust=False)  # joins the federation, but its envelopes are not trusted
    dep.make_client_keys("eve", register=False, trust=True)  # node key never registered: the SuperLink refuses it
    dep.make_server_identity()
    config = _config(dep, "sealed", federation={"clients": CLIENTS + 1, "min_clients": CLIENTS},
                     envelopes={"enabled": True, "server_identity": "server-id", "trusted_clients": "trusted"})
    run_dir = dep.root / "runs" / "sealed"
    dep.start_server(config, run_dir)
    for k in range(CLIENTS):
        dep.start_client(f"c{k}", f"builtin:{k}/{CLIENTS}", extra=["--seed", str(SEED)])
    dep.start_client("mallory", f"builtin:0/{CLIENTS}", extra=["--seed", str(SEED), "--partition-id", "0"])
    dep.start_client("eve", f"builtin:1/{CLIENTS}", extra=["--seed", str(SEED)])
    assert dep.wait("server", timeout=600) == 0, dep.log("server")[-4000:]
    rows = _rows(run_dir)
    assert all(r["clients_sampled"] == CLIENTS + 1 and r["clients_accepted"] == CLIENTS and r["clients_rejected"] == 1
               for r in rows[1:])
    assert "untrusted sender" in dep.log("server")
    assert "Failed to activate SuperNode" in dep.log("eve")
    # The accepted updates are exactly the simulation's: bit-for-bit the same global adapter.
    for rnd in (1, 2):
        assert _max_diff(_checkpoint(run_dir, rnd), _checkpoint(simulated, rnd)) == 0.0


def test_a_coordinator_killed_mid_run_resumes_to_the_uninterrupted_result(deployment, simulated):
    dep = deployment
    for k in range(CLIENTS):
        dep.make_client_keys(f"c{k}")
    config = _config(dep, "resume")
    run_dir = dep.root / "runs" / "resume"
    dep.start_server(config, run_dir)
    for k in range(CLIENTS):
        dep.start_client(f"c{k}", f"builtin:{k}/{CLIENTS}", extra=["--seed", str(SEED)])
    dep.wait_for(lambda: (run_dir / "metrics.jsonl").exists() and len(_rows(run_dir)) >= 2, 400, "round 1")
    dep.kill("server")  # SIGKILL: peft-server, its SuperLink and the ServerApp
    assert len(_rows(run_dir)) == 2
    dep.start_server(config, run_dir, resume=True, name="server-resumed")
    assert dep.wait("server-resumed", timeout=600) == 0, dep.log("server-resumed")[-4000:]
    assert [r["round"] for r in _rows(run_dir)] == [0, 1, 2]
    assert _max_diff(_checkpoint(run_dir, 2), _checkpoint(simulated, 2)) == 0.0
    assert (run_dir / "final" / "fedpeft.json").is_file()


def test_a_client_killed_mid_run_is_tolerated_down_to_min_clients_under_secagg(deployment):
    dep = deployment
    for k in range(CLIENTS):
        dep.make_client_keys(f"c{k}")
    config = _config(dep, "dropout", federation={"min_clients": 2},
                     secagg={"enabled": True, "num_shares": 3, "reconstruction_threshold": 2, "max_weight": 1000})
    run_dir = dep.root / "runs" / "dropout"
    dep.start_server(config, run_dir)
    for k in range(CLIENTS):
        dep.start_client(f"c{k}", f"builtin:{k}/{CLIENTS}", extra=["--seed", str(SEED)])
    dep.wait_for(lambda: (run_dir / "metrics.jsonl").exists() and len(_rows(run_dir)) >= 2, 400, "round 1")
    dep.kill("c2")  # SIGKILL: the client, its trainer and its SuperNode
    assert dep.wait("server", timeout=600) == 0, dep.log("server")[-4000:]
    rows = _rows(run_dir)
    assert rows[1]["clients_accepted"] == CLIENTS and rows[2]["clients_accepted"] == CLIENTS - 1
    assert rows[2]["eval_loss"] == rows[2]["eval_loss"]  # a real (finite) evaluation of the 2-client sum


def test_a_split_run_across_processes_survives_a_coordinator_kill_and_resumes(deployment):
    from fedpeft.simulations.harness.loopback import free_port

    # Prepare: split topology (clients hold embeddings + block 0), the split server on its own TLS port
    dep, split_port, local_steps = deployment, free_port(), 4
    for k in range(2):
        dep.make_client_keys(f"c{k}")
    config = _config(dep, "split", federation={"topology": "split", "clients": 2},
                     training={"local_steps": local_steps, "learning_rate": 0.005},
                     split={"cut": 1, "port": split_port, "tls_dir": str(dep.root / "tls")})
    run_dir = dep.root / "runs" / "split"
    dep.start_server(config, run_dir)
    for k in range(2):
        dep.start_client(f"c{k}", f"builtin:{k}/2", extra=["--seed", str(SEED), "--split-server", f"127.0.0.1:{split_port}"])
    # Execute: kill the coordinator (SuperLink, ServerApp and split server) once round 1 is recorded, then resume
    dep.wait_for(lambda: (run_dir / "metrics.jsonl").exists() and len(_rows(run_dir)) >= 2, 400, "round 1")
    dep.kill("server")
    forget_round(run_dir, 2)  # had round 2 finished before the kill, it is redone all the same
    dep.start_server(config, run_dir, resume=True, name="server-resumed")
    assert dep.wait("server-resumed", timeout=600) == 0, dep.log("server-resumed")[-4000:]

    # Assert: every round trained both clients against the split server, whose state carried over the restart
    rows = _rows(run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["clients_accepted"] == 2 and r["split_bytes_up"] > 0 and r["split_bytes_down"] > 0 for r in rows[1:])
    assert [split_server_steps(run_dir, r) for r in (1, 2)] == [2 * local_steps, 4 * local_steps]
    assert "split server resumed from" in dep.log("server-resumed")
    assert (run_dir / "final" / "server-part" / "adapter_model.safetensors").is_file()
