"""One run spec, one assembly: both drivers build the same federation from the same spec.

Regression tests for the drift the two copies had: hetlora/flexlora silently ran as
FedAvg in deployment; deployment scaled svd aggregation by alpha/r even under rsLoRA;
FedProx under the split topology was accepted and its proximal term never applied.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from fedpeft.common.errors import ConfigError
from fedpeft.server.federation.assembly import assemble
from fedpeft.server.federation.flags import FLAGS, build_flag_parser, overrides_from_args, spec_from_flags
from fedpeft.server.federation.spec import SECTIONS, RunSpec
from fedpeft.simulations.harness.loopback import write_run_config

DRIVERS = ("simulation", "deployment")


def _spec(tiny_model_dir, **sections) -> RunSpec:
    base = {"federation": {"model": str(tiny_model_dir), "quantize": "none", "clients": 2, "method_options": {"r": 4}}}
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return RunSpec.from_dict(base)


def _comparable(setup) -> dict:
    """A ServerSetup's fields less those naming its own run dir or holding per-run objects."""
    fields = {f.name: getattr(setup, f.name) for f in dataclasses.fields(setup)}
    for name in ("run_name", "out_dir", "topology", "on_complete", "hetero"):
        fields.pop(name)
    fields["method_config"] = fields["method_config"].to_dict()
    fields["task"] = fields["task"].to_dict()
    return fields


@pytest.mark.parametrize("sections", [
    {},
    {"federation": {"lora_aggregation": "svd", "method_options": {"r": 4, "use_rslora": True}}},
    {"federation": {"lora_aggregation": "flexlora", "client_ranks": [2, 4], "method_options": {}}},
    {"federation": {"strategy": "fedprox", "strategy_options": {"proximal_mu": 0.1}}},
    {"dp": {"enabled": True, "clipping_norm": 0.5}},
])
def test_both_drivers_assemble_the_same_server(tiny_model_dir, tmp_path, sections):
    spec = _spec(tiny_model_dir, **sections)
    sim = assemble(spec, "simulation", tmp_path / "sim").server
    dep = assemble(spec, "deployment", tmp_path / "dep").server
    assert _comparable(sim) == _comparable(dep)
    assert (sim.hetero is None) == (dep.hetero is None)
    if sim.hetero is not None:
        assert (sim.hetero.mode, sim.hetero.ranks) == (dep.hetero.mode, dep.hetero.ranks)


@pytest.mark.parametrize("mode", ["hetlora", "flexlora"])
def test_a_deployment_runs_heterogeneous_ranks(tiny_model_dir, tmp_path, mode):
    spec = _spec(tiny_model_dir, federation={"lora_aggregation": mode, "client_ranks": [2, 8], "method_options": {}})
    setup = assemble(spec, "deployment", tmp_path / "run").server
    assert setup.hetero is not None and setup.hetero.mode == mode and setup.hetero.ranks == (2, 8)
    assert setup.method_config.r == 8  # the global rank is the largest client rank


@pytest.mark.parametrize("driver", DRIVERS)
def test_svd_aggregation_uses_peft_scale_under_rslora(tiny_model_dir, tmp_path, driver):
    spec = _spec(tiny_model_dir, federation={"lora_aggregation": "svd",
                                             "method_options": {"r": 4, "alpha": 16, "use_rslora": True}})
    setup = assemble(spec, driver, tmp_path / "run").server
    assert setup.lora_svd_scaling == pytest.approx(16 / math.sqrt(4)) and setup.lora_svd_scaling != 16 / 4


@pytest.mark.parametrize("driver", DRIVERS)
def test_fedprox_under_split_is_refused_up_front(tiny_model_dir, tmp_path, driver):
    spec = _spec(tiny_model_dir, federation={"topology": "split", "strategy": "fedprox"}, split={"cut": 1})
    with pytest.raises(ConfigError, match="strategy 'fedprox' is not supported"):
        assemble(spec, driver, tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("driver", "sections", "fragment"), [
    ("deployment", {"task": {"train_data": "train.jsonl"}}, "task.train_data is a simulation setting"),
    ("deployment", {"task": {"partition": "dirichlet:0.5"}}, "task.partition is a simulation setting"),
    ("deployment", {"simulation": {"gpus_per_client": 0.5}}, "simulation.gpus_per_client is a simulation setting"),
    ("simulation", {"secagg": {"enabled": True}}, "secagg.enabled is a deployment setting"),
    ("simulation", {"envelopes": {"enabled": True}}, "envelopes.enabled is a deployment setting"),
    ("simulation", {"federation": {"topology": "split"}, "split": {"host": "10.0.0.1"}}, "use a loopback host"),
])
def test_a_setting_only_one_driver_honours_is_refused_by_the_other(tiny_model_dir, driver, sections, fragment):
    with pytest.raises(ConfigError, match=fragment):
        _spec(tiny_model_dir, **sections).validate(driver)


def test_every_flag_overrides_exactly_one_spec_field_and_no_field_has_two_flags():
    keys = [f.key for f in FLAGS]
    assert len(keys) == len(set(keys)) and len({f.name for f in FLAGS}) == len(FLAGS)
    fields = {f"{section}.{f.name}" for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
    assert set(keys) <= fields


def test_peft_sim_reads_the_deployment_spec_and_flags_override_its_fields(tiny_model_dir, tmp_path):
    from fedpeft.simulations.cli import build_parser, spec_from_args

    path = write_run_config(tmp_path / "run.toml", {
        "federation": {"model": str(tiny_model_dir), "rounds": 7, "clients": 3, "method_options": {"r": 4}},
        "training": {"local_steps": 5, "learning_rate": 0.02}})
    spec = spec_from_args(build_parser().parse_args(["--config", str(path), "--rounds", "2", "-o", "r=8"]))
    assert spec.federation.rounds == 2 and spec.federation.clients == 3  # flag wins; the rest is the file's
    assert spec.training.local_steps == 5 and spec.training.learning_rate == 0.02
    assert spec.federation.method_options == {"r": "8"}
    assert spec.federation.model == str(tiny_model_dir)
    assert spec_from_args(build_parser().parse_args([])) == RunSpec(source="peft-sim")  # no flag, no change


def test_flag_settings_enable_their_sections():
    parser = build_flag_parser()
    overrides = overrides_from_args(parser.parse_args(["--dp-clip", "0.5", "--publish-to", "/srv/reg"]))
    assert overrides == {"dp.clipping_norm": 0.5, "dp.enabled": True, "registry.dir": "/srv/reg", "registry.enabled": True}
    spec = spec_from_flags(dp_clipping_norm=0.0)  # 0 switches DP off and leaves its settings alone
    assert spec.dp.enabled is False and spec.problems("simulation") == []


def test_all_problems_of_a_spec_are_reported_together(tiny_model_dir):
    with pytest.raises(ConfigError) as info:
        RunSpec.from_dict({"federation": {"model": str(tiny_model_dir), "clients": 0, "rounds": 0},
                           "training": {"local_steps": 0, "learning_rate": float("inf")}}, driver="deployment")
    text = str(info.value)
    for fragment in ("federation.clients must be >= 1", "federation.rounds must be >= 1",
                     "training.local_steps must be an integer in [1,", "training.learning_rate must be a finite number > 0"):
        assert fragment in text


def test_the_readme_lists_every_spec_field_with_its_default_and_flag():
    from pathlib import Path

    from fedpeft.server.federation.flags import spec_table_markdown

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    assert spec_table_markdown() in readme, "regenerate the README's run-spec table with spec_table_markdown()"


def test_key_value_flags_merge_into_the_spec_files_table_and_switches_turn_off(tiny_model_dir, tmp_path):
    from fedpeft.simulations.cli import build_parser, spec_from_args

    path = write_run_config(tmp_path / "run.toml", {
        "federation": {"model": str(tiny_model_dir), "method_options": {"r": 8, "alpha": 32, "use_rslora": True}},
        "training": {"gradient_checkpointing": True}})
    spec = spec_from_args(build_parser().parse_args(["--config", str(path), "-o", "r=16", "--no-gradient-checkpointing"]))
    assert spec.federation.method_options == {"r": "16", "alpha": 32, "use_rslora": True}
    assert spec.training.gradient_checkpointing is False


def test_paths_given_as_flags_are_saved_absolute(tmp_path, monkeypatch):
    from fedpeft.simulations.cli import build_parser, spec_from_args

    monkeypatch.chdir(tmp_path)
    spec = spec_from_args(build_parser().parse_args(["--data", "train.jsonl", "--eval-data", "dev.jsonl"]))
    assert spec.task.train_data == str(tmp_path / "train.jsonl") and spec.task.eval_data == str(tmp_path / "dev.jsonl")


@pytest.mark.parametrize(("sections", "fragment"), [
    ({"split": {"cut": 4}}, 'split.cut is set, but would be ignored without federation.topology = "split"'),
    ({"offsite": {"bottom": 1}}, 'offsite.bottom is set, but would be ignored without federation.topology = "offsite"'),
    ({"dp": {"noise_multiplier": 3.0}}, "dp.noise_multiplier is set, but would be ignored without dp.enabled = true"),
    ({"federation": {"lora_aggregation": "hetlora", "client_ranks": [2, "4"]}},
     "federation.client_ranks = [2, '4'] is not a list of integers"),
    ({"federation": {"topology": "split"}, "registry": {"enabled": True, "dir": "r"}}, "a split run's global delta"),
    ({"federation": {"topology": "offsite"}, "registry": {"enabled": True, "dir": "r"}}, "an offsite run's rounds"),
    ({"task": {"kind": "bogus"}}, "task.kind 'bogus'"),
    ({"simulation": {"gpus_per_client": float("nan")}}, "simulation.gpus_per_client must be a finite number"),
    ({"federation": {"scaffold": True}, "secagg": {"enabled": True}},
     "federation.scaffold cannot run with secagg.enabled = True: SecAgg+ masks only the delta"),
    ({"federation": {"scaffold": True}, "dp": {"enabled": True}}, "federation.scaffold cannot run with dp.enabled"),
    ({"federation": {"scaffold": True, "topology": "split"}}, "federation.scaffold cannot run with federation.topology"),
    ({"federation": {"scaffold": True, "strategy": "krum"}}, "federation.scaffold cannot run with federation.strategy"),
    ({"federation": {"scaffold": True, "lora_aggregation": "svd"}},
     "federation.scaffold cannot run with federation.lora_aggregation = 'svd'"),
    ({"federation": {"scaffold": True, "method": "adalora"}}, "federation.scaffold cannot run with federation.method"),
    ({"training": {"optimizer": "sgd"}}, "training.optimizer 'sgd' needs training.learning_rate"),
    ({"federation": {"topology": "split"}, "training": {"optimizer": "sgd", "learning_rate": 0.3}},
     "split: training.optimizer 'sgd' is not supported"),
])
def test_settings_that_would_be_ignored_or_are_malformed_are_refused(sections, fragment):
    with pytest.raises(ConfigError) as info:
        RunSpec.from_dict(sections, driver="simulation")
    assert fragment in str(info.value)


def test_a_split_cut_the_model_cannot_take_fails_before_the_run_dir_is_written(tiny_model_dir, tmp_path):
    spec = _spec(tiny_model_dir, federation={"topology": "split"}, split={"cut": 99})
    with pytest.raises(ConfigError):
        assemble(spec, "deployment", tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_run_dir_keeps_its_spec_new_runs_refuse_it_and_resumes_may_only_add_rounds(tiny_model_dir, tmp_path, driver):
    run_dir = tmp_path / "run"
    spec = _spec(tiny_model_dir)
    assemble(spec, driver, run_dir)
    saved = RunSpec.from_dict(json.loads((run_dir / "run-spec.json").read_text()))
    assert saved.federation.quantize == "none"
    # the run dir records the learning rate the clients run with (an unset rate: the method's default),
    # so a run dir written before rates were per method (0.001 for LoRA) resumes with the same spec
    assert spec.training.learning_rate is None and saved.training.learning_rate == 1e-3
    (run_dir / "metrics.jsonl").write_text('{"round": 0}\n')
    with pytest.raises(ConfigError, match="already holds a run"):
        assemble(spec, driver, run_dir)
    with pytest.raises(ConfigError, match=r"training.learning_rate differ from"):
        assemble(spec.with_overrides({"training.learning_rate": 0.5}), driver, run_dir, resume=True)
    assemble(spec.with_overrides({"federation.rounds": 9}), driver, run_dir, resume=True)


def test_adaloras_derived_schedule_is_recorded_and_a_resume_may_not_move_it(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    spec = _spec(tiny_model_dir, federation={"method": "adalora", "method_options": {"init_r": 4, "target_r": 2}})
    assemble(spec, "deployment", run_dir)
    saved = RunSpec.from_dict(json.loads((run_dir / "run-spec.json").read_text()))
    steps = spec.train_config().local_steps
    assert saved.federation.method_options == {"init_r": 4, "target_r": 2, "total_step": spec.federation.rounds * steps}
    (run_dir / "metrics.jsonl").write_text('{"round": 0}\n')
    assemble(spec, "deployment", run_dir, resume=True)  # the same run resumes
    with pytest.raises(ConfigError, match=r"federation.method_options differ from"):  # 9 rounds: another schedule
        assemble(spec.with_overrides({"federation.rounds": 9}), "deployment", run_dir, resume=True)
