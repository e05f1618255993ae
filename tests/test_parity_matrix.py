"""One spec, two drivers, one result: the parity matrix.

Every case is one TOML run spec, given unchanged to the in-process simulation
(`run_simulation(RunSpec.from_toml(path))`, Flower's Simulation Engine) and to a real
loopback deployment (`peft-server run --config path` submitting to a running Flower
SuperLink, two `peft-client start` processes, TLS on). Both must end with bit-identical
final adapters and the same per-round held-out loss. A combination the federation
cannot run is refused by both drivers with the same problem text.

The deployment side shares one SuperLink and one set of clients across the cases
(`peft-server run --attach`): clients keep their trainer, and each case is a new
Flower run, which keeps the matrix cheap enough for CI.

The split case runs one client: with several, the shared split server applies their
steps in the order they arrive (SplitFed's one shared server part), so two runs of the
same spec, under either driver, differ in float summation order. One client makes that
order fixed, and the case then checks everything else bit for bit (client part, server
part, FedAvg of the client part, evaluation of the joined model).
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedpeft.simulations.harness.loopback import LoopbackDeployment, free_port, write_run_config

pytestmark = pytest.mark.slow
CLIENTS, SEED = 2, 5
BASE = {"federation": {"rounds": 2, "clients": CLIENTS, "seed": SEED, "quantize": "4bit", "method_options": {"r": 4}},
        "training": {"local_steps": 3, "learning_rate": 0.01, "batch_size": 4, "max_length": 64},
        "task": {"eval_limit": 16}}
# Two rounds where round 2 starts from an aggregate that the mode itself shaped (svd's
# re-factored global, per-rank downlinks, the split server's state); one round elsewhere
# (a deployed round costs ~10 s of process starts on 2 cores; CI time is budgeted).
ONE_ROUND = {"rounds": 1}
CASES: dict[str, dict] = {
    "naive-fedavg": {"federation": ONE_ROUND},
    "svd": {"federation": {"lora_aggregation": "svd"}},
    "svd-rslora": {"federation": {"lora_aggregation": "svd", "method_options": {"r": 4, "use_rslora": True}, **ONE_ROUND}},
    "ffa": {"federation": {"lora_aggregation": "ffa", "clip_update_norm": 5.0, **ONE_ROUND}},
    "hetlora": {"federation": {"lora_aggregation": "hetlora", "client_ranks": [2, 4], "method_options": {}}},
    "flexlora": {"federation": {"lora_aggregation": "flexlora", "client_ranks": [4, 2], "method_options": {}}},
    "fedprox": {"federation": {"strategy": "fedprox", "strategy_options": {"proximal_mu": 0.5}, **ONE_ROUND}},
    # two rounds: round 2 is the first whose correction c - c_i is not zero (each node's c_i kept in Flower's state)
    "scaffold": {"federation": {"scaffold": True}},
    # two rounds: round 2 sends the error-feedback residual kept from round 1; stochastic rounding seeded alike
    "compressed": {"compression": {"upload": "topk:0.25+int8", "download": "bf16"}},
    "split": {"federation": {"topology": "split", "clients": 1}, "split": {"cut": 1}},
    # the recipe's one SGD step of rate 1; two rounds: round 2 steps with Adam's moments from round 1 at the
    # cosine schedule's eta / 2 (the server's setting travels through the one assembly to both drivers)
    "server-adam": {"federation": {"recipe": "server-adam", "server_lr_schedule": "cosine"},
                    "training": {"local_steps": 1, "learning_rate": 1.0}},
}
SOLO = {"split"}  # cases run by the one-client cluster (see the module docstring)
REFUSED = {  # case: (sections, a fragment of the problem both drivers name)
    "split-fedprox": ({"federation": {"topology": "split", "strategy": "fedprox"}, "split": {"cut": 1}},
                      "strategy 'fedprox' is not supported"),
    "scaffold-fedmedian": ({"federation": {"scaffold": True, "strategy": "fedmedian"}},
                           "federation.scaffold cannot run with federation.strategy = 'fedmedian'"),
    "topk-broadcast": ({"compression": {"download": "topk:0.1"}}, "compression.download 'topk:0.1': the broadcast"),
    "server-adam-fedprox": ({"federation": {"recipe": "server-adam", "strategy": "fedprox"}},
                            "federation.strategy 'fedprox' conflicts"),
}


def _merge(base: dict, case: dict) -> dict:
    out = {section: dict(values) for section, values in base.items()}
    for section, values in case.items():
        out.setdefault(section, {}).update(values)
    return out


def _cluster(root: Path, model: str, clients: int):
    """A TLS SuperLink and `clients` clients (builtin:K/N, the simulation's partitions), shared by cases."""
    from fedpeft.common.flower_deploy import flower_env, start_process, stop_process, superlink_command, wait_for_port

    dep = LoopbackDeployment(root, model=model)
    tls = dep.make_tls()
    split_port = free_port()
    superlink = start_process(superlink_command(host="127.0.0.1", port=dep.port, node_auth=False,
                                                tls=(tls / "ca.crt", tls / "server.pem", tls / "server.key")),
                              flower_env(dep.root / "superlink-home"), dep.root / "superlink.log")
    try:
        wait_for_port("127.0.0.1", dep.port, proc=superlink)
        for k in range(clients):
            dep.start_client(f"c{k}", f"builtin:{k}/{clients}", keys=False,
                             extra=["--seed", str(SEED), "--split-server", f"127.0.0.1:{split_port}",
                                    "--split-ca", str(tls / "ca.crt")])
        yield dep, split_port
    finally:
        dep.stop_all()
        stop_process(superlink)


@pytest.fixture(scope="module")
def cluster(tiny_model_dir, tmp_path_factory):
    yield from _cluster(tmp_path_factory.mktemp("parity"), str(tiny_model_dir), CLIENTS)


@pytest.fixture(scope="module")
def solo_cluster(tiny_model_dir, tmp_path_factory):
    yield from _cluster(tmp_path_factory.mktemp("parity-solo"), str(tiny_model_dir), 1)


def _spec_file(dep: LoopbackDeployment, name: str, case: dict, split_port: int) -> Path:
    sections = _merge(BASE, case)
    sections["federation"]["model"] = dep.model
    if "split" in sections:  # one split server address for both drivers: the spec's
        sections["split"].update({"port": split_port, "tls_dir": str(dep.root / "tls")})
    return write_run_config(dep.root / f"{name}.toml", sections)


def _final(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final" / "adapter_model.safetensors"))


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["eval_loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", list(CASES))
def test_simulation_and_deployment_give_bit_identical_adapters(request, name):
    from fedpeft.server.federation.spec import RunSpec
    from fedpeft.simulations.runner import run_simulation

    dep, split_port = request.getfixturevalue("solo_cluster" if name in SOLO else "cluster")
    clients = CASES[name].get("federation", {}).get("clients", CLIENTS)
    spec_path = _spec_file(dep, name, CASES[name], split_port)
    server_logits: dict[str, torch.Tensor] = {}
    deployed = dep.root / "dep" / name
    client_logs = {k: len(dep.log(f"c{k}")) for k in range(clients)}

    def deploy() -> None:
        dep.start_server(spec_path, deployed, name=f"server-{name}", node_auth=False,
                         extra=["--attach", f"127.0.0.1:{dep.port}"])

    def simulate() -> Path:
        return run_simulation(RunSpec.from_toml(spec_path), dep.root / "sim" / name,
                              on_complete=lambda adapted: server_logits.update(probe=_probe_logits(adapted.model))).out_dir

    if name in SOLO:  # one split server address in the spec: the drivers take turns
        simulated = simulate()
        deploy()
    else:  # the deployment waits on process starts and polling most of the time: simulate meanwhile
        deploy()
        simulated = simulate()
    assert dep.wait(f"server-{name}", timeout=600) == 0, dep.log(f"server-{name}")[-4000:]

    sim_final, dep_final = _final(simulated), _final(deployed)
    assert sim_final.keys() == dep_final.keys() and sim_final
    different = [k for k in sim_final if not torch.equal(sim_final[k], dep_final[k])]
    assert not different, f"{name}: {len(different)} tensors differ, e.g. {different[:3]}"
    assert _losses(simulated) == _losses(deployed)
    rows = [json.loads(line) for line in (deployed / "metrics.jsonl").read_text().splitlines()]
    assert all(r["clients_accepted"] == clients for r in rows[1:])
    if name == "split":  # the shared server part, trained by both drivers, is bit-identical too
        assert all(r["split_bytes_up"] > 0 for r in rows[1:])
        sim_server = load_file(str(simulated / "final" / "server-part" / "adapter_model.safetensors"))
        dep_server = load_file(str(deployed / "final" / "server-part" / "adapter_model.safetensors"))
        assert sim_server.keys() == dep_server.keys() and all(torch.equal(sim_server[k], dep_server[k]) for k in sim_server)
    if name == "fedprox":  # the proximal term is applied (under both drivers): the adapter is not FedAvg's
        naive = dep.root / "sim" / "naive-fedavg"
        if not (naive / "final").is_dir():  # this case was selected alone: simulate its FedAvg twin here
            spec = RunSpec.from_toml(_spec_file(dep, "naive-fedavg", CASES["naive-fedavg"], split_port))
            run_simulation(spec, naive)
        assert any(not torch.equal(sim_final[k], v) for k, v in _final(naive).items())
    if name == "server-adam":  # the deployed coordinator ran the cosine schedule (the simulation did: same adapter)
        eta = float(RunSpec.from_toml(spec_path).server_strategy_options()["eta"])
        assert [r.get("server_rate") for r in rows] == [None, eta, pytest.approx(eta / 2)]
    _check_mode(name, simulated, rows, server_logits["probe"], dep.model)
    if name in ("hetlora", "flexlora"):  # client k (builtin:k/2) trains at client_ranks[k], whatever its node id
        for k, rank in enumerate(CASES[name]["federation"]["client_ranks"]):
            assert f"training at LoRA rank {rank} (assigned" in dep.log(f"c{k}")[client_logs[k]:]


PROBE = torch.arange(3, 15).view(1, 12)


def _probe_logits(model) -> torch.Tensor:
    from fedpeft.common.training.evaluation import model_device

    model.eval()
    with torch.no_grad():
        return model(input_ids=PROBE.to(model_device(model))).logits.float().cpu()


def _record_sizes(delta: dict[str, torch.Tensor]) -> tuple[int, int]:
    """Bytes of `delta` as a broadcast (one Array per tensor) and as an upload (one flat float32 buffer)."""
    from fedpeft.common.codecs.mod import flat_upload_record
    from fedpeft.common.protocol.flower_io import delta_to_arrayrecord, record_bytes

    flat = flat_upload_record(OrderedDict((k, v.numpy()) for k, v in delta.items()))
    return record_bytes(delta_to_arrayrecord(delta)), record_bytes(flat)


def _check_mode(name: str, run_dir: Path, rows: list[dict], server_logits: torch.Tensor, model_dir: str) -> None:
    """What each aggregation mode promises beyond parity (the rows are both drivers': they are equal)."""
    from fedpeft.common.protocol.deltas import load_delta_file

    if name.startswith("svd"):  # the rank-r refactoring error is measured and logged every round
        assert all(0.0 <= r["svd_max_relative_error"] < 1.0 for r in rows[1:])
    if name == "ffa":  # A frozen at the shared seed (clients built the server's A): only B is federated
        global_delta = load_delta_file(run_dir / "checkpoints" / "global-round-0001.safetensors")
        assert global_delta and all(".lora_B." in n for n in global_delta)
        per_tensor, flat = _record_sizes(global_delta)  # ... and only B's bytes cross the wire, each way
        assert all(r["bytes_down"] == CLIENTS * per_tensor and r["bytes_up"] == CLIENTS * flat for r in rows[1:])
    if name == "compressed":  # both directions encoded: the rows count encoded and plain bytes
        assert all(r["bytes_up"] * 4 < r["bytes_up_raw"] and r["bytes_down"] * 1.5 < r["bytes_down_raw"] for r in rows[1:])
    if name == "flexlora":  # each rank's factors carry their own measured error; a lower rank loses more
        ranks = sorted(CASES[name]["federation"]["client_ranks"])
        for row in rows[1:]:
            errors = [row[f"svd_relative_error_r{r}"] for r in ranks]
            assert 0.0 <= errors[-1] <= errors[0] < 1.0 and row["svd_max_relative_error"] == errors[0]
    if name == "scaffold":  # c travels beside the global delta; replies carry the delta alone (flat)
        per_tensor, flat = _record_sizes(load_delta_file(run_dir / "checkpoints" / "global-round-0001.safetensors"))
        assert all(r["bytes_down"] == 2 * CLIENTS * per_tensor and r["bytes_up"] == CLIENTS * flat for r in rows[1:])
    if name in ("hetlora", "flexlora"):  # the global adapter has the largest rank and loads in stock peft
        from peft import PeftModel

        from fedpeft.common.model.base_model import load_base_model

        final = run_dir / "final"
        assert json.loads((final / "adapter_config.json").read_text())["r"] == max(CASES[name]["federation"]["client_ranks"])
        stock = PeftModel.from_pretrained(load_base_model(Path(model_dir), "4bit"), str(final))
        torch.testing.assert_close(_probe_logits(stock), server_logits, rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", list(REFUSED))
def test_a_refused_combination_is_refused_by_both_drivers_with_the_same_problem(cluster, capsys, name):
    from fedpeft.server.cli import main as server_main
    from fedpeft.simulations.cli import main as sim_main

    dep, split_port = cluster
    sections, fragment = REFUSED[name]
    spec_path = _spec_file(dep, name, sections, split_port)
    assert sim_main(["--config", str(spec_path), "--out", str(dep.root / "sim" / name)]) == 2
    sim_err = capsys.readouterr().err
    assert server_main(["run", "--config", str(spec_path), "--run-dir", str(dep.root / "dep" / name),
                        "--attach", f"127.0.0.1:{dep.port}", "--tls", str(dep.root / "tls")]) == 2
    dep_err = capsys.readouterr().err

    def problems(err: str) -> list[str]:  # peft-sim adds the flag that sets a key: "key (--flag)"
        return [re.sub(r" \(--[a-z-]+\)", "", line.strip()) for line in err.splitlines() if line.strip().startswith("- ")]

    assert problems(sim_err) == problems(dep_err) and problems(dep_err)
    assert any(fragment in p for p in problems(dep_err))
    assert not (dep.root / "sim" / name).exists() and not (dep.root / "dep" / name).exists()
