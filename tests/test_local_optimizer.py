"""training.optimizer: clients train with AdamW (the default) or plain SGD, named in the plan."""

from __future__ import annotations

import json

import pytest
import torch

from fedpeft.client.training import TrainConfig, make_optimizer, run_steps, train_problems
from fedpeft.common.errors import ConfigError
from fedpeft.common.protocol.plan import plan_problems
from fedpeft.server.federation.flags import spec_from_flags


def _quadratic_steps(config: TrainConfig, start: list[float], target: list[float]) -> torch.Tensor:
    """Runs `config` on 0.5 ||y - target||^2 (gradient y - target) and returns y."""
    y = torch.nn.Parameter(torch.tensor(start, dtype=torch.float64))
    goal = torch.tensor(target, dtype=torch.float64)
    run_steps([y], lambda _s: {}, config, lambda _s, _b: 0.5 * ((y - goal) ** 2).sum(), seed=0, label="quadratic")
    return y.detach()


def test_sgd_steps_are_the_learning_rate_times_the_gradient():
    config = TrainConfig(learning_rate=0.1, local_steps=3, optimizer="sgd", max_grad_norm=100.0)
    y = _quadratic_steps(config, [1.0, -2.0], [0.0, 0.0])
    # y_{k+1} = y_k - 0.1 * y_k: three steps shrink y by 0.9^3, proportionally to the gradient
    assert y.tolist() == pytest.approx([0.9**3, -2 * 0.9**3])


def test_adamw_steps_do_not_shrink_with_the_gradient_and_sgd_steps_do():
    """Why SGD is offered: a client already near its optimum (one label under label skew)
    still moves AdamW's delta by about the learning rate per step; SGD's by almost nothing."""
    near = [1e-4, -1e-4]
    adam = _quadratic_steps(TrainConfig(learning_rate=0.01, local_steps=1), near, [0.0, 0.0])
    sgd = _quadratic_steps(TrainConfig(learning_rate=0.01, local_steps=1, optimizer="sgd"), near, [0.0, 0.0])
    moved_adam = (torch.tensor(near, dtype=torch.float64) - adam).abs().max().item()
    moved_sgd = (torch.tensor(near, dtype=torch.float64) - sgd).abs().max().item()
    assert moved_adam == pytest.approx(0.01, rel=1e-3)
    assert moved_sgd == pytest.approx(1e-6, rel=1e-6)


def test_make_optimizer_builds_the_named_optimizer_with_the_configured_rate():
    params = [torch.nn.Parameter(torch.zeros(2))]
    sgd = make_optimizer(params, TrainConfig(learning_rate=0.5, local_steps=1, optimizer="sgd", weight_decay=0.1))
    adamw = make_optimizer(params, TrainConfig(learning_rate=0.5, local_steps=1))
    assert type(sgd) is torch.optim.SGD and type(adamw) is torch.optim.AdamW
    assert sgd.param_groups[0]["lr"] == 0.5 and sgd.param_groups[0]["weight_decay"] == 0.1
    assert sgd.param_groups[0]["momentum"] == 0


def test_the_plan_names_the_optimizer_only_when_it_is_not_adamw():
    assert "optimizer" not in TrainConfig(learning_rate=1e-3, local_steps=8).plan_fields()
    assert TrainConfig(learning_rate=0.3, local_steps=8, optimizer="sgd").plan_fields()["optimizer"] == "sgd"


@pytest.mark.parametrize("bad", ["adam", "SGD", "", 1, None])
def test_an_unknown_optimizer_is_refused_by_name(bad):
    assert any(p.startswith("optimizer must be one of adamw, sgd") for p in train_problems({"optimizer": bad}))
    with pytest.raises(ConfigError, match="optimizer"):
        TrainConfig(learning_rate=1e-3, local_steps=8, optimizer=bad)


def test_a_plan_with_an_unknown_optimizer_is_refused_and_a_known_one_read():
    good = TrainConfig(learning_rate=0.3, local_steps=8, optimizer="sgd").plan_fields()
    plan = {"run_name": "r", "model_fingerprint": "f", "method": "lora", "method_options": {},
            "task": {"kind": "classification", "template": "{text}", "verbalizer": {"0": "neg", "1": "pos"},
                     "label_column": "label"}, "train": good, "seed": 0}
    assert plan_problems(json.loads(json.dumps(plan))) == []
    plan["train"] = {**good, "optimizer": "lbfgs"}
    assert any("optimizer" in p for p in plan_problems(plan))


def test_the_run_spec_and_its_flag_set_the_optimizer():
    spec = spec_from_flags(optimizer="sgd")
    assert spec.training.optimizer == "sgd" and spec.train_config().optimizer == "sgd"
    assert spec_from_flags().train_config().optimizer == "adamw"


def test_sgd_without_a_learning_rate_is_refused_naming_both_keys():
    """The methods' default rates are AdamW rates (3e-3 for LoRA); SGD needs its own, ~100x larger."""
    found = spec_from_flags(optimizer="sgd").problems("simulation")
    assert any("training.optimizer 'sgd' needs training.learning_rate" in p for p in found)
    assert not any("optimizer" in p for p in spec_from_flags(optimizer="sgd", learning_rate=0.3).problems("simulation"))


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
    from tiny_models import build_tiny_bert

    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


def _update_norm(model_dir, rows, optimizer: str, learning_rate: float, logit_adjustment: float) -> float:
    from fedpeft.client.training import train_local
    from fedpeft.common.data.builtin_task import builtin_task
    from fedpeft.common.methods import make_config
    from fedpeft.common.model.adapted import AdaptedModel

    task = builtin_task()
    adapted = AdaptedModel.load(model_dir, "none", "lora", make_config("lora", {"r": "4"}), seed=0,
                                num_labels=task.num_labels)
    start = adapted.get_delta()
    config = TrainConfig(local_steps=8, learning_rate=learning_rate, batch_size=8, max_length=48,
                         optimizer=optimizer, logit_adjustment=logit_adjustment)
    train_local(adapted, task, rows, config, seed=0)
    end = adapted.get_delta()
    return float(sum(((end[k] - start[k]).double() ** 2).sum() for k in start) ** 0.5)


def test_a_one_label_client_with_logit_adjustment_barely_moves_under_sgd_but_does_under_adamw(tiny_bert_dir):
    """The label-skew mechanism the optimizer option exists for: logit adjustment explains a
    one-label client's data by its label prior, so its gradients are tiny; SGD then takes tiny
    steps, AdamW normalises them back to the learning rate."""
    from fedpeft.common.data.builtin_task import builtin_splits

    rows, _ = builtin_splits(200, 4, seed=5)
    one_label = [r for r in rows if r["label"] == rows[0]["label"]][:32]
    assert len(one_label) == 32
    sgd_plain = _update_norm(tiny_bert_dir, one_label, "sgd", 0.5, 0.0)
    sgd_calibrated = _update_norm(tiny_bert_dir, one_label, "sgd", 0.5, 1.0)
    adamw_plain = _update_norm(tiny_bert_dir, one_label, "adamw", 5e-3, 0.0)
    adamw_calibrated = _update_norm(tiny_bert_dir, one_label, "adamw", 5e-3, 1.0)
    # measured: SGD 0.32x of its uncalibrated update, AdamW 0.99x
    assert sgd_calibrated < 0.4 * sgd_plain
    assert adamw_calibrated > 0.8 * adamw_plain


def test_peft_bench_refuses_sgd_without_a_rate_before_any_training(tmp_path, capsys):
    """Its centralized settings train without the assembly's check: the CLI validates up front."""
    from test_attack_bench import _write_sentiment

    from fedpeft.simulations.bench.method_quality import main

    _write_sentiment(tmp_path / "train.tsv", 16, seed=1)
    _write_sentiment(tmp_path / "dev.tsv", 8, seed=2)
    code = main(["--data", str(tmp_path / "train.tsv"), "--eval-data", str(tmp_path / "dev.tsv"), "--methods", "lora",
                 "--settings", "centralized,iid", "--optimizer", "sgd", "--out", str(tmp_path / "bench")])
    assert code != 0 and "training.optimizer 'sgd' needs training.learning_rate" in capsys.readouterr().err
    assert not (tmp_path / "bench" / "results.csv").exists()
