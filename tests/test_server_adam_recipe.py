"""The server-adam recipe (`federation.recipe`): clients take one plain SGD step, the server
runs Adam at the method's rate (FedAdam over FedSGD), resolved in the run spec for both drivers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fedpeft.common.errors import ConfigError, FederationError
from fedpeft.common.methods import get_method
from fedpeft.server.federation.flags import spec_from_flags
from fedpeft.server.federation.spec import SERVER_ADAM_TAU, RunSpec

ENCODER = "all-minilm-l6-v2"  # a built-in encoder: it gets a fresh classification head


def test_server_adam_runs_fedadam_at_the_methods_rate_over_one_sgd_step():
    spec = spec_from_flags(model=ENCODER, method="ia3", recipe="server-adam", clients=10)
    spec.validate("simulation")
    train = spec.train_config()
    assert (train.optimizer, train.learning_rate, train.local_steps) == ("sgd", 1.0, 1)
    assert spec.federation.server_strategy == "fedadam"
    assert spec.server_strategy_options() == {"eta": repr(spec.method_learning_rate()), "tau": repr(SERVER_ADAM_TAU)}
    ia3_rate = get_method("ia3").federated_learning_rate
    assert spec.method_learning_rate() == ia3_rate
    lora = spec_from_flags(model=ENCODER, method="lora", recipe="server-adam")
    assert float(lora.server_strategy_options()["eta"]) == lora.method_learning_rate() == 3e-3 != ia3_rate
    # the centralized baseline of such a run: AdamW at the server's rate, the same steps a client counts
    central = spec.centralized_train_config()
    assert (central.optimizer, central.learning_rate, central.local_steps) == ("adamw", ia3_rate, 1)


def test_what_a_user_sets_wins_over_the_recipe():
    spec = spec_from_flags(model=ENCODER, method="lora", recipe="server-adam", strategy="fedyogi",
                           strategy_options={"eta": "0.01", "beta_2": "0.999"}, learning_rate=0.5, local_steps=2)
    spec.validate("simulation")
    assert spec.federation.server_strategy == "fedyogi"
    assert spec.server_strategy_options() == {"eta": "0.01", "tau": repr(SERVER_ADAM_TAU), "beta_2": "0.999"}
    train = spec.train_config()
    assert (train.optimizer, train.learning_rate, train.local_steps) == ("sgd", 0.5, 2)
    assert spec.centralized_train_config().learning_rate == 0.01


def test_the_local_recipe_leaves_strategy_and_clients_alone():
    spec = spec_from_flags(model=ENCODER, method="lora", strategy="fedprox", strategy_options={"proximal_mu": "0.1"})
    spec.validate("simulation")
    assert spec.federation.recipe == "local" and spec.federation.server_strategy == "fedprox"
    assert spec.server_strategy_options() == {"proximal_mu": "0.1"}
    assert spec.train_config().optimizer == "adamw"
    assert spec.centralized_train_config() == spec.train_config()


@pytest.mark.parametrize("flags, message", [
    ({"recipe": "server-adam", "strategy": "fedprox"}, "federation.strategy 'fedprox' conflicts"),
    ({"recipe": "server-adam", "strategy": "krum"}, "runs an adaptive server optimizer"),
    ({"recipe": "server-adam", "lora_aggregation": "svd"}, "it needs strategy 'fedavg' and recipe 'local'"),
    ({"recipe": "server-adam", "dp_clipping_norm": 1.0}, "recipe 'local'"),
    ({"recipe": "server-adam", "topology": "split"}, "split: federation.recipe 'server-adam' is not supported"),
    ({"recipe": "server-adam", "local_epochs": 1.0}, "training.local_epochs: federation.recipe 'server-adam'"),
    ({"recipe": "server-adam", "local_steps": 4}, "training.local_steps > 1 under federation.recipe 'server-adam'"),
    ({"recipe": "server-adam", "strategy_options": {"eta": "nan"}}, "option eta must be finite"),
    ({"recipe": "adam"}, "federation.recipe 'adam': choose one of ['local', 'server-adam']"),
    ({"recipe": "server-adam", "method": "adalora"}, "federation.method 'adalora' does not learn under"),
    ({"server_lr_schedule": "cosine"}, "federation.server_lr_schedule 'cosine' schedules an adaptive server"),
    ({"server_lr_schedule": "cosine", "strategy": "fedavgm"}, "federation.strategy 'fedavgm' has none"),
    ({"recipe": "server-adam", "server_lr_schedule": "step"}, "federation.server_lr_schedule 'step': choose one of"),
    ({"strategy": "fedadam", "server_lr_schedule": "cosine", "topology": "split"},
     "split: federation.server_lr_schedule 'cosine' is not supported"),
])
def test_a_recipe_that_cannot_run_is_refused_naming_its_key(flags, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        spec_from_flags(model=ENCODER, **flags).validate("simulation")


def test_server_adam_with_secagg_is_refused_for_the_deployment():
    with pytest.raises(ConfigError, match=r"secagg: .* needs strategy 'fedavg' \(recipe 'local'\)"):
        spec_from_flags(model=ENCODER, recipe="server-adam", clients=3).with_overrides(
            {"secagg.enabled": True}, driver="deployment")


def test_cosine_decay_starts_at_eta_and_ends_near_zero_without_stopping():
    from fedpeft.server.rate_schedule import server_rate

    rates = [server_rate("cosine", 0.01, r, 100) for r in range(1, 101)]
    assert rates[0] == 0.01 and all(a > b for a, b in zip(rates, rates[1:], strict=False))
    assert rates[50] == pytest.approx(0.005) and 0 < rates[-1] < 0.01 * 3e-4
    assert server_rate("cosine", 0.01, 2, 2) == pytest.approx(0.005)
    assert server_rate("constant", 0.01, 77, 100) == 0.01
    with pytest.raises(ValueError, match="outside the run"):
        server_rate("cosine", 0.01, 101, 100)


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedadagrad"])
def test_every_adaptive_server_optimizer_steps_at_the_scheduled_rate(flower_task_identity, name):
    """The same replies from the same state: round 2 of a 2-round cosine (eta / 2) moves the
    global adapter half as far as a constant eta does, for each FedOpt strategy."""
    import functools
    from collections import OrderedDict

    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

    from fedpeft.common.protocol.deltas import DeltaSpec
    from fedpeft.common.protocol.flower_io import delta_from_arrayrecord, delta_to_arrayrecord
    from fedpeft.common.protocol.plan import TRAIN_METRIC_KEYS
    from fedpeft.server.rate_schedule import server_rate
    from fedpeft.server.strategy import build_strategy

    spec_from_flags(model=ENCODER, strategy=name, server_lr_schedule="cosine").validate("simulation")
    zero = OrderedDict(w=torch.zeros(4))
    nodes = (1, 2)

    class Grid:
        def get_node_ids(self):
            return list(nodes)

    def reply(node: int, server_round: int) -> Message:
        delta = OrderedDict(w=torch.tensor([0.1, -0.2, 0.3, 0.05]) * node * server_round)
        metrics = {k: 1 if k in ("num-examples", "unit-weight") else 0.5 for k in TRAIN_METRIC_KEYS}
        request = Message(content=RecordDict({"config": ConfigRecord({"x": 1})}), dst_node_id=node,
                          message_type="train")
        return Message(RecordDict({"arrays": delta_to_arrayrecord(delta), "metrics": MetricRecord(metrics)}),
                       reply_to=request)

    steps = {}
    for schedule in ("constant", "cosine"):
        strategy = build_strategy(name, spec=DeltaSpec.of_delta(zero), max_delta_bytes=10_000,
                                  options={"eta": "0.01", "tau": "1e-8"}, min_train_nodes=2, min_available_nodes=2,
                                  fraction_evaluate=0.0)
        if schedule == "cosine":
            strategy.eta_schedule = functools.partial(server_rate, schedule, strategy.eta, num_rounds=2)
        arrays = delta_to_arrayrecord(zero)
        for server_round in (1, 2):
            list(strategy.configure_train(server_round, arrays, ConfigRecord(), Grid()))
            before = delta_from_arrayrecord(arrays)["w"]
            arrays, _ = strategy.aggregate_train(server_round, [reply(n, server_round) for n in nodes])
            assert arrays is not None
        steps[schedule] = delta_from_arrayrecord(arrays)["w"] - before
        assert strategy.traffic[2].server_rate == (None if schedule == "constant" else pytest.approx(0.005))
    assert steps["constant"].abs().sum() > 0
    assert torch.allclose(steps["cosine"], steps["constant"] / 2, rtol=1e-4, atol=1e-9)


def test_the_recipes_own_sgd_clients_need_no_learning_rate_but_several_steps_do():
    spec_from_flags(model=ENCODER, recipe="server-adam", optimizer="sgd").validate("simulation")
    spec_from_flags(model=ENCODER, recipe="server-adam", local_steps=4, learning_rate=0.1).validate("simulation")


def test_the_adaptive_strategies_are_flowers_fedopt_family():
    from flwr.serverapp.strategy.fedopt import FedOpt

    from fedpeft.server.strategy import ADAPTIVE_SERVER_STRATEGIES, FLOWER_STRATEGIES

    assert set(ADAPTIVE_SERVER_STRATEGIES) == {n for n, c in FLOWER_STRATEGIES.items() if issubclass(c, FedOpt)}


def test_the_recipe_reads_from_a_toml_spec(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[federation]\nmodel = "all-minilm-l6-v2"\nmethod = "bitfit"\nrecipe = "server-adam"\n'
                    '[federation.strategy_options]\neta = 0.002\n')
    spec = RunSpec.from_toml(path, driver="deployment")
    assert spec.federation.server_strategy == "fedadam" and spec.server_strategy_options()["eta"] == "0.002"


def test_a_server_optimizers_state_survives_the_checkpoint_round_trip(tmp_path):
    from flwr.serverapp.strategy import FedAdam, FedAvgM

    from fedpeft.server.optimizer_state import optimizer_state, restore_optimizer_state, save_optimizer_state

    rng = np.random.default_rng(0)
    adam, momentum = FedAdam(), FedAvgM(server_momentum=0.9)
    adam.m_t = {"b.weight": rng.standard_normal((3, 4)).astype(np.float32), "a": rng.standard_normal(5)}
    adam.v_t = {k: v ** 2 for k, v in adam.m_t.items()}
    momentum.momentum_vector = [rng.standard_normal(k) for k in (2, 11, 3, 7, 5, 13, 1, 4, 6, 8, 9, 10)]
    for strategy, fresh in ((adam, FedAdam()), (momentum, FedAvgM(server_momentum=0.9))):
        checkpoint = tmp_path / f"{type(strategy).__name__}" / "global-round-0007.safetensors"
        checkpoint.parent.mkdir()
        save_optimizer_state(strategy, checkpoint)
        restore_optimizer_state(fresh, checkpoint)
        saved, restored = optimizer_state(strategy), optimizer_state(fresh)
        assert saved.keys() == restored.keys() and saved
        assert all(np.array_equal(saved[k], restored[k]) and saved[k].dtype == restored[k].dtype for k in saved)
    assert [len(v) for v in momentum.momentum_vector] == [2, 11, 3, 7, 5, 13, 1, 4, 6, 8, 9, 10]  # order kept


def test_a_run_dir_without_the_optimizer_state_is_not_resumed_cold(tmp_path):
    from flwr.serverapp.strategy import FedAdam

    from fedpeft.common.errors import FederationError
    from fedpeft.server.optimizer_state import restore_optimizer_state

    with pytest.raises(FederationError, match="server-optimizer-round-0003.safetensors is missing"):
        restore_optimizer_state(FedAdam(), tmp_path / "global-round-0003.safetensors")


@pytest.mark.slow
def test_a_resumed_server_adam_run_gives_the_uninterrupted_result(tiny_model_dir, tmp_path):
    """Adam's moments are checkpointed every round: a run stopped after round 1 of 2 and
    resumed ends on the same global adapter, bit for bit, as one never interrupted (restarting
    Adam cold would take a full eta-sized sign step in round 2 instead)."""
    import shutil

    from fedpeft.common.protocol.deltas import load_delta_file
    from fedpeft.simulations.runner import run_simulation

    common = {"model": str(tiny_model_dir), "method": "lora", "method_options": {"r": "4"}, "clients": 2,
              "recipe": "server-adam", "quantize": "none", "builtin_train_rows": 32, "eval_limit": 8,
              "server_lr_schedule": "cosine"}
    reference = run_simulation(spec_from_flags(rounds=2, **common), str(tmp_path / "whole"))
    eta = float(spec_from_flags(**common).server_strategy_options()["eta"])
    assert [r.get("server_rate") for r in reference.rows] == [None, eta, pytest.approx(eta / 2)]
    stopped = tmp_path / "stopped"
    run_simulation(spec_from_flags(rounds=1, **common), str(stopped))
    saved = json.loads((stopped / "run-spec.json").read_text())
    saved["federation"]["rounds"] = 2
    (stopped / "run-spec.json").write_text(json.dumps(saved))
    shutil.rmtree(stopped / "final")

    resumed = run_simulation(None, resume=str(stopped))

    assert [r["round"] for r in resumed.rows] == [0, 1, 2]
    whole = load_delta_file(reference.out_dir / "checkpoints" / "global-round-0002.safetensors")
    again = load_delta_file(stopped / "checkpoints" / "global-round-0002.safetensors")
    assert whole.keys() == again.keys() and all(torch.equal(whole[k], again[k]) for k in whole)
    assert resumed.rows[2]["server_rate"] == pytest.approx(eta / 2)  # the schedule goes on where it stopped
    # (rounds 1 -> 2 could change: a cosine's round 1 is eta whatever its horizon.) Rounds 2 -> 4 cannot: round 2
    # stepped at eta / 2, where a 4-round cosine steps at 0.85 eta; the run would continue neither schedule.
    longer = json.loads((reference.out_dir / "run-spec.json").read_text())
    longer["federation"]["rounds"] = 4
    (reference.out_dir / "run-spec.json").write_text(json.dumps(longer))
    with pytest.raises(FederationError, match="round 2 stepped at server rate .* cannot change on resume"):
        run_simulation(None, resume=str(reference.out_dir))
    # (that the recorded rate is the rate Adam stepped with is the unit test above, for every FedOpt strategy)


def test_a_checkpoint_comes_back_in_the_adapters_order_for_fedavgm(tmp_path):
    """FedAvgM pairs its arrays and momentum by position: a resumed run's first global delta
    must keep the adapter's tensor order, which safetensors does not keep on its own."""
    from collections import OrderedDict

    from fedpeft.server.recorder import RunRecorder

    names = [f"layers.{i}.weight" for i in range(12)]
    delta = OrderedDict((n, torch.full((2, 3), float(i))) for i, n in enumerate(names))
    recorder = RunRecorder(tmp_path)
    recorder.save_checkpoint(4, delta)
    assert list(recorder.load_checkpoint(4, order=names)) == names
    with pytest.raises(Exception, match="other tensors"):
        recorder.load_checkpoint(4, order=names[:-1])


def test_a_scalar_state_array_keeps_its_shape(tmp_path):
    from flwr.serverapp.strategy import FedAdam

    from fedpeft.server.optimizer_state import optimizer_state, restore_optimizer_state, save_optimizer_state

    adam, fresh = FedAdam(), FedAdam()
    adam.m_t, adam.v_t = {"scale": np.array(0.5)}, {"scale": np.array(0.25)}
    save_optimizer_state(adam, tmp_path / "global-round-0001.safetensors")
    restore_optimizer_state(fresh, tmp_path / "global-round-0001.safetensors")
    assert optimizer_state(fresh)["m_t/scale"].shape == ()
