"""Offsite-Tuning: layer plan, emulator build, plug-in round trip, distillation, bad input."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fedpeft.common.errors import ConfigError
from fedpeft.common.methods import get_method, make_config
from fedpeft.common.model.architectures import blocks_of
from fedpeft.common.model.base_model import load_base_model
from fedpeft.common.offsite import LayerMap, build_emulator, plug_in, read_layer_map
from fedpeft.common.offsite.distill import distill_middle
from fedpeft.common.offsite.emulator import load_full_model
from fedpeft.common.protocol.topology import TOPOLOGIES, validate_topology


@pytest.fixture(scope="module")
def full_dir(tmp_path_factory) -> Path:
    from tiny_models import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("full8"), num_layers=8)


@pytest.fixture(scope="module")
def emulator_dir(full_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("emu") / "emulator"
    build_emulator(full_dir, out, bottom=1, top=2, keep_every=2)
    return out


def _ids() -> torch.Tensor:
    return torch.randint(3, 300, (2, 11), generator=torch.Generator().manual_seed(0))


def _adapter(model_dir: Path, layers: tuple[int, ...], out: Path, perturb: bool) -> Path:
    """A LoRA adapter on `model_dir`'s blocks `layers`, saved; B randomized when `perturb`."""
    torch.manual_seed(0)
    config = make_config("lora", {"layers_to_transform": ",".join(map(str, layers))} if layers else {})
    model = get_method("lora").build(load_base_model(model_dir, "none"), config)
    if perturb:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.5)
    model.save_pretrained(str(out))
    return out


def test_layer_plan_keeps_adapter_blocks_and_every_nth_middle_block():
    plan = LayerMap.plan(30, bottom=2, top=2, keep_every=4)

    assert plan.layers == (0, 1, 2, 6, 10, 14, 18, 22, 26, 28, 29)
    assert plan.adapter == (0, 1, 9, 10)
    assert [plan.to_full(i) for i in plan.adapter] == [0, 1, 28, 29]
    assert LayerMap.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan


@pytest.mark.parametrize(("bottom", "top", "every", "fragment"), [
    (4, 4, 2, "leave no middle block"), (0, 0, 2, "at least one adapter block"), (1, 1, 0, "keep_every=0"),
])
def test_bad_layer_plans_name_the_problem(bottom, top, every, fragment):
    with pytest.raises(ConfigError, match=fragment):
        LayerMap.plan(8, bottom, top, every)


def test_inconsistent_layer_map_and_middle_block_lookup_are_refused():
    with pytest.raises(ConfigError, match="inconsistent"):
        LayerMap(full_layers=8, bottom=1, top=1, keep_every=2, layers=(0, 3, 2, 7))
    with pytest.raises(ConfigError, match="not an adapter block"):
        LayerMap.plan(8, 1, 1, 2).to_full(2)


def test_emulator_is_an_ordinary_model_dir_with_the_adapter_blocks_copied(full_dir, emulator_dir):
    layer_map = read_layer_map(emulator_dir)
    full, emulator = load_full_model(full_dir), load_full_model(emulator_dir)

    assert layer_map.layers == (0, 1, 3, 5, 6, 7)
    assert emulator.config.num_hidden_layers == len(blocks_of(emulator)) == 6
    for emu_index, full_index in enumerate(layer_map.layers):
        for (name, a), (_, b) in zip(blocks_of(emulator)[emu_index].state_dict().items(),
                                     blocks_of(full)[full_index].state_dict().items(), strict=True):
            assert torch.equal(a, b), name
    assert torch.equal(emulator.get_input_embeddings().weight, full.get_input_embeddings().weight)


def test_an_emulator_stored_in_bfloat16_holds_the_rounded_blocks_and_bad_dtypes_are_refused(full_dir, tmp_path):
    layer_map = build_emulator(full_dir, tmp_path / "emu16", bottom=1, top=2, keep_every=2, dtype="bfloat16")
    assert {t.dtype for t in load_file(tmp_path / "emu16" / "model.safetensors").values()} == {torch.bfloat16}
    full, emulator = load_full_model(full_dir), load_full_model(tmp_path / "emu16")  # loads as float32
    for emu_index, full_index in enumerate(layer_map.layers):
        for a, b in zip(blocks_of(emulator)[emu_index].parameters(), blocks_of(full)[full_index].parameters(), strict=True):
            assert torch.equal(a, b.to(torch.bfloat16).float())
    with pytest.raises(ConfigError, match="emulator dtype 'float16'"):
        build_emulator(full_dir, tmp_path / "emu-bad", dtype="float16")


def test_emulators_with_the_same_block_count_but_other_blocks_have_other_fingerprints(full_dir, emulator_dir, tmp_path):
    from fedpeft.common.model.base_model import model_fingerprint

    other = build_emulator(full_dir, tmp_path / "other", bottom=2, top=2, keep_every=2)

    assert other.emulator_layers == read_layer_map(emulator_dir).emulator_layers == 6
    assert model_fingerprint(tmp_path / "other") != model_fingerprint(emulator_dir)  # clients with the wrong one are refused
    assert model_fingerprint(emulator_dir) != model_fingerprint(full_dir)


def test_emulator_keeping_every_block_computes_the_full_model(full_dir, tmp_path):
    build_emulator(full_dir, tmp_path / "emu", bottom=2, top=2, keep_every=1)
    with torch.no_grad():
        assert torch.equal(load_full_model(tmp_path / "emu")(input_ids=_ids()).logits,
                           load_full_model(full_dir)(input_ids=_ids()).logits)


def test_plugging_the_untouched_adapter_back_gives_the_original_logits_exactly(full_dir, emulator_dir, tmp_path):
    layer_map = read_layer_map(emulator_dir)
    adapter = _adapter(emulator_dir, layer_map.adapter, tmp_path / "adapter", perturb=False)
    full = load_base_model(full_dir, "none")
    with torch.no_grad():
        expected = full(input_ids=_ids()).logits.clone()

    plugged = plug_in(full, adapter, layer_map, tmp_path / "plugged").eval()

    with torch.no_grad():
        assert torch.equal(plugged(input_ids=_ids()).logits, expected)
    config = json.loads((tmp_path / "plugged" / "adapter_config.json").read_text())
    assert config["layers_to_transform"] == [0, 6, 7]


def test_trained_adapter_lands_on_the_same_blocks_of_the_full_model(full_dir, tmp_path):
    # With keep_every=1 the emulator *is* the full model, so emulator+adapter and
    # plugged full model must compute the same function.
    layer_map = build_emulator(full_dir, tmp_path / "emu", bottom=2, top=1, keep_every=1)
    adapter = _adapter(tmp_path / "emu", layer_map.adapter, tmp_path / "adapter", perturb=True)
    from peft import PeftModel

    on_emulator = PeftModel.from_pretrained(load_base_model(tmp_path / "emu", "none"), str(adapter)).eval()
    plugged = plug_in(load_base_model(full_dir, "none"), adapter, layer_map, tmp_path / "plugged").eval()

    with torch.no_grad():
        torch.testing.assert_close(plugged(input_ids=_ids()).logits, on_emulator(input_ids=_ids()).logits)
        assert not torch.equal(plugged(input_ids=_ids()).logits, load_base_model(full_dir, "none")(input_ids=_ids()).logits)


def test_plug_in_changes_only_the_adapter_blocks(full_dir, emulator_dir, tmp_path):
    layer_map = read_layer_map(emulator_dir)
    adapter = _adapter(emulator_dir, layer_map.adapter, tmp_path / "adapter", perturb=True)
    original = load_base_model(full_dir, "none")
    before = {k: v.clone() for k, v in original.state_dict().items()}

    merged = plug_in(load_base_model(full_dir, "none"), adapter, layer_map, tmp_path / "plugged").merge_and_unload()

    changed = {k.split(".")[2] for k, v in merged.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"0", "6", "7"}  # full-model indices of the adapter blocks


def test_adapter_on_a_middle_block_is_refused(full_dir, emulator_dir, tmp_path):
    adapter = _adapter(emulator_dir, (), tmp_path / "adapter", perturb=False)  # LoRA on every emulator block

    with pytest.raises(ConfigError, match=r"layers\.1\..*not an adapter block"):
        plug_in(load_base_model(full_dir, "none"), adapter, read_layer_map(emulator_dir), tmp_path / "plugged")


def test_adapter_beyond_the_emulator_and_mismatched_full_model_are_refused(full_dir, emulator_dir, tmp_path):
    from tiny_models import build_tiny_llama

    layer_map = read_layer_map(emulator_dir)
    adapter = _adapter(emulator_dir, layer_map.adapter, tmp_path / "adapter", perturb=False)
    other = build_tiny_llama(tmp_path / "other", num_layers=4)
    with pytest.raises(ConfigError, match="has 4 blocks but the layer map was built from a 8-block model"):
        plug_in(load_base_model(other, "none"), adapter, layer_map, tmp_path / "p1")

    weights = adapter / "adapter_model.safetensors"
    tensors = {k.replace("layers.5.", "layers.9."): v for k, v in load_file(str(weights)).items()}
    save_file(tensors, str(weights))
    with pytest.raises(ConfigError, match="emulator has only 6 blocks"):
        plug_in(load_base_model(full_dir, "none"), adapter, layer_map, tmp_path / "p2")


def test_distillation_moves_only_middle_blocks_toward_the_full_model(full_dir, tmp_path):
    from transformers import AutoTokenizer

    full = load_full_model(full_dir)
    layer_map = LayerMap.plan(8, 1, 1, 3)
    from fedpeft.common.offsite.emulator import keep_blocks

    emulator = keep_blocks(load_full_model(full_dir), layer_map.layers)
    before = {k: v.clone() for k, v in emulator.state_dict().items()}
    texts = ["Support ticket: my invoice is wrong", "Department: billing", "the app crashes on login"] * 4

    losses = distill_middle(emulator, full, layer_map, texts, AutoTokenizer.from_pretrained(full_dir), steps=12, lr=3e-3)

    assert losses[-1] < losses[0]
    changed = {k.split(".")[2] for k, v in emulator.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {str(i) for i in layer_map.middle}


def test_four_bit_lora_on_the_emulator_trains_only_adapter_blocks(emulator_dir):
    from fedpeft.common.model.adapted import AdaptedModel
    from fedpeft.common.model.quantization import bitsandbytes_available

    if not bitsandbytes_available():
        pytest.skip("bitsandbytes not importable")
    adapted = AdaptedModel.load(emulator_dir, "4bit", "lora", make_config("lora", {"layers_to_transform": "0,4,5"}))

    assert {name.split(".")[4] for name in adapted.delta_names} == {"0", "4", "5"}


def test_topology_names_are_validated():
    assert validate_topology("offsite") == "offsite" and "split" in TOPOLOGIES
    with pytest.raises(ConfigError, match="not a topology"):
        validate_topology("ring")
    with pytest.raises(ConfigError, match="not supported here"):
        validate_topology("split", supported=("fl", "offsite"))


def test_peft_sim_refuses_bad_offsite_settings_before_anything_starts(capsys, full_dir, tmp_path):
    from fedpeft.simulations.cli import main

    out = tmp_path / "run"
    assert main(["--model", str(full_dir), "--topology", "offsite", "--offsite-bottom", "4", "--offsite-top", "4",
                 "--quantize", "none", "--out", str(out)]) == 2
    assert "leave no middle block to emulate in a 8-block model" in capsys.readouterr().err
    assert main(["--topology", "offsite", "--method", "prefix", "--offsite-keep-every", "0", "--quantize", "none"]) == 2
    err = capsys.readouterr().err
    assert "not method 'prefix'" in err and "offsite.keep_every (--offsite-keep-every) must be >= 1" in err
    from fedpeft.server.federation.flags import spec_from_flags

    with pytest.raises(ConfigError, match="federation.topology 'mesh'"):
        spec_from_flags(topology="mesh").validate("simulation")
    assert not out.exists()


@pytest.mark.slow
def test_offsite_simulation_plugs_the_federated_adapter_into_the_full_model(full_dir, tmp_path):
    from fedpeft.server.federation.flags import spec_from_flags
    from fedpeft.simulations.runner import run_simulation

    config = spec_from_flags(model=str(full_dir), topology="offsite", offsite_bottom=1, offsite_top=1,
                              offsite_keep_every=2, clients=2, rounds=1, local_steps=3, learning_rate=5e-3,
                              quantize="none", eval_limit=24, builtin_train_rows=48)

    result = run_simulation(config, str(tmp_path / "run"))

    emulator = read_layer_map(result.out_dir / "emulator")
    assert emulator.layers == (0, 1, 3, 5, 7) and emulator.adapter == (0, 4)
    names = load_file(str(result.final_dir / "adapter_model.safetensors"))
    assert {n.split(".")[4] for n in names} == {"0", "4"}  # emulator blocks
    plugged = load_file(str(result.out_dir / "plugged" / "adapter_model.safetensors"))
    assert {n.split(".")[4] for n in plugged} == {"0", "7"}  # full-model blocks
    assert set(result.offsite) >= {"full_zero_shot_accuracy", "plug_in_accuracy", "plug_in_loss"}
    assert result.offsite["plug_in_loss"] != result.offsite["full_zero_shot_loss"]
    assert "full model + adapter (plug-in)" in (result.out_dir / "summary.md").read_text()


def test_deployment_run_config_builds_the_emulator_and_plugs_the_adapter_in(full_dir, tmp_path):
    from fedpeft.server.export import export_adapter
    from fedpeft.server.federation.assembly import assemble
    from fedpeft.server.federation.spec import RunSpec

    (tmp_path / "run.toml").write_text(f'[federation]\nmodel = "{full_dir}"\ntopology = "offsite"\nquantize = "none"\n'
                                       "[offsite]\nbottom = 1\ntop = 1\nkeep_every = 3\n[task]\neval_limit = 8\n")
    config = RunSpec.from_toml(tmp_path / "run.toml", driver="deployment")

    federation = assemble(config, "deployment", tmp_path / "run")
    setup = federation.server

    assert Path(setup.model_dir) == tmp_path / "run" / "emulator"
    assert setup.method_config.layers_to_transform == (0, 3)
    from fedpeft.common.model.adapted import AdaptedModel

    adapted = AdaptedModel.load(Path(setup.model_dir), "none", "lora", setup.method_config)
    final = export_adapter(adapted, tmp_path / "run" / "final", setup.base_model, {})
    metrics = federation.topology.finish(final, federation.models, setup.task, list(setup.eval_rows), 128)
    assert metrics["plug_in_loss"] == metrics["full_zero_shot_loss"]  # untouched adapter: the full model itself
    assert (tmp_path / "run" / "plugged" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize(("sections", "fragment"), [
    ({"federation": {"topology": "ring"}}, "federation.topology 'ring' is not a topology"),
    ({"federation": {"topology": "mesh"}}, "federation.topology 'mesh'"),
    ({"federation": {"topology": "offsite", "method": "ia3"}, "offsite": {"keep_every": 0}}, "offsite.keep_every"),
    ({"federation": {"topology": "offsite", "method": "ia3"}}, "not method 'ia3'"),
    ({"federation": {"topology": "offsite"}, "offsite": {"emulator": "/nowhere"}}, "has no offsite.json"),
])
def test_bad_offsite_run_configs_name_the_key(sections, fragment):
    from fedpeft.server.federation.spec import RunSpec

    with pytest.raises(ConfigError, match=fragment):
        RunSpec.from_dict(sections).validate("deployment")


def test_offsite_build_command_writes_an_emulator_dir(capsys, full_dir, tmp_path):
    from fedpeft.server.cli import main

    assert main(["offsite-build", "--model", str(full_dir), "--out", str(tmp_path / "emu"), "--bottom", "2",
                 "--top", "1", "--keep-every", "2"]) == 0
    assert "adapter blocks [0, 1, 5] = full-model blocks [0, 1, 7]" in capsys.readouterr().out
    assert read_layer_map(tmp_path / "emu").layers == (0, 1, 2, 4, 6, 7)
    assert main(["offsite-build", "--model", str(full_dir), "--out", str(tmp_path / "emu")]) == 2
    assert "not empty" in capsys.readouterr().err


def test_topology_benchmark_table_reports_ratios_to_plain_fl():
    from fedpeft.simulations.bench.topology_quality import OffsiteVariant, results_table

    fl = {"topology": "fl", "emulator_blocks": "30/30", "client_peak_mb": 1000.0, "seconds_per_step": 2.0,
          "bytes_per_step": 4000.0, "model_bytes": 2**20, "federated_acc": 0.8}
    off = {"topology": "offsite 2+2, every 4", "emulator_blocks": "11/30", "client_peak_mb": 200.0,
           "seconds_per_step": 0.5, "bytes_per_step": 1000.0, "model_bytes": 2**19, "plug_in_acc": 0.7}

    table = results_table([fl, off])

    row = "| offsite 2+2, every 4 | 11/30 | - | - | - | - | 0.700 | 200 | 5.000 | 0.500 | 0.500 | 0.250 | 1000 | 0.250 |"
    assert row in table
    assert OffsiteVariant.parse("0:2:4") == OffsiteVariant(0, 2, 4)
    with pytest.raises(ConfigError, match="BOTTOM:TOP:KEEP_EVERY"):
        OffsiteVariant.parse("2-2-4")


@pytest.mark.slow
def test_client_step_probe_measures_an_emulator_client_in_a_fresh_process(emulator_dir, tmp_path):
    from fedpeft.common.model.quantization import bitsandbytes_available
    from fedpeft.simulations.bench.topology_quality import ProbeSettings, measure_client_step

    if not bitsandbytes_available():
        pytest.skip("bitsandbytes not importable")
    data = tmp_path / "train.tsv"
    data.write_text("sentence\tlabel\n" + "".join(f"ticket {i} about billing\t{i % 2}\n" for i in range(16)))
    probe = ProbeSettings(data=str(data), template="Support ticket: {sentence}", labels="0=negative,1=positive",
                          batch_size=4, max_length=32, steps=2, repeats=2)

    result = measure_client_step(emulator_dir, probe, {"layers_to_transform": "0,4,5"}, local_steps=4)

    assert result["client_peak_mb"] > 0 and result["seconds_per_step"] > 0 and result["repeats"] == 2
    assert result["bytes_per_step"] == 2 * result["delta_bytes"] / 4 and result["model_bytes"] > 0


@pytest.mark.slow
def test_deployed_offsite_run_clients_hold_only_the_emulator(full_dir, emulator_dir, tmp_path):
    from fedpeft.simulations.harness.loopback import LoopbackDeployment, write_run_config

    dep = LoopbackDeployment(tmp_path / "dep", model=str(emulator_dir))  # what every peft-client gets as --model
    try:
        dep.make_tls()
        for k in range(2):
            dep.make_client_keys(f"c{k}")
        config = write_run_config(dep.root / "run.toml", {
            "federation": {"model": str(full_dir), "topology": "offsite", "rounds": 1, "clients": 2, "quantize": "4bit",
                           "method_options": {"r": 4}},
            "offsite": {"emulator": str(emulator_dir)},
            "training": {"local_steps": 3, "learning_rate": 0.005}, "task": {"eval_limit": 24}})
        run_dir = dep.root / "runs" / "offsite"
        dep.start_server(config, run_dir)
        for k in range(2):
            dep.start_client(f"c{k}", f"builtin:{k}/2")

        assert dep.wait("server", timeout=600) == 0, dep.log("server")[-4000:]
    finally:
        dep.stop_all()
    metrics = json.loads((run_dir / "offsite-metrics.json").read_text())
    assert metrics["layer_map"]["layers"] == [0, 1, 3, 5, 6, 7]
    assert metrics["plug_in_loss"] != metrics["full_zero_shot_loss"]
    plugged = load_file(str(run_dir / "plugged" / "adapter_model.safetensors"))
    assert {n.split(".")[4] for n in plugged} == {"0", "6", "7"}


def test_a_run_reusing_its_emulator_refuses_another_storage_dtype(full_dir, tmp_path):
    from fedpeft.common.offsite.run import OffsiteSettings, prepare_emulator

    settings = OffsiteSettings(bottom=1, top=2, keep_every=2)
    built, _ = prepare_emulator(full_dir, tmp_path, settings)
    assert prepare_emulator(full_dir, tmp_path, settings)[0] == built  # a resumed run finds it
    with pytest.raises(ConfigError, match="stored as float32, asked for bfloat16"):
        prepare_emulator(full_dir, tmp_path, dataclasses.replace(settings, dtype="bfloat16"))
