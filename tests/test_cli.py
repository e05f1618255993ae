"""`peft-sim` argument handling: clear one-line errors, all config problems at once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fedpeft.common.methods import make_config
from fedpeft.simulations.cli import main


def test_unknown_method_exits_2_listing_supported(capsys):
    assert main(["--method", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown PEFT method 'nope'" in err and "lora" in err and "Traceback" not in err


def test_all_config_problems_are_reported_together(capsys, tmp_path):
    code = main(["--clients", "0", "--rounds", "0", "--partition", "shards", "--quantize", "8bit",
                 "-o", "r=0", "--data", str(tmp_path / "missing.jsonl")])
    err = capsys.readouterr().err
    assert code == 2
    for fragment in ("federation.clients (--clients) must be >= 1", "federation.rounds (--rounds) must be >= 1",
                     "unknown partition 'shards'", "federation.quantize (--quantize) '8bit'", "LoraMethodConfig.r",
                     "missing.jsonl does not exist"):
        assert fragment in err


def test_bad_data_is_reported_without_traceback(capsys, tmp_path, tiny_model_dir):
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "a", "label": 0}\n{"text": "b", "label": 1}\n')
    assert main(["--model", str(tiny_model_dir), "--data", str(data), "--quantize", "none",
                 "--out", str(tmp_path / "run")]) == 4
    assert "name a word for each" in capsys.readouterr().err


def test_options_the_model_cannot_take_fail_before_anything_starts(capsys, tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    assert main(["--model", str(tiny_model_dir), "-o", "target_modules=fc_in", "--quantize", "none",
                 "--out", str(out)]) == 2
    assert "cannot be applied to this model" in capsys.readouterr().err
    assert not out.exists()


def test_bad_template_is_reported(capsys, tmp_path, tiny_model_dir):
    data = tmp_path / "train.csv"
    data.write_text("text,label\na,spam\nb,ham\nc,spam\n")
    assert main(["--model", str(tiny_model_dir), "--data", str(data), "--template", "{text", "--quantize", "none"]) == 4
    assert "malformed" in capsys.readouterr().err


def test_missing_model_is_reported(capsys, tmp_path):
    assert main(["--model", str(tmp_path / "nowhere"), "--quantize", "none", "--out", str(tmp_path / "r")]) == 3
    assert "neither a built-in model" in capsys.readouterr().err


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "peft-sim"
    assert script.is_file(), "the peft-sim entry point is not installed next to this interpreter"
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, check=True).stdout
    for option in ("--model", "--method", "--clients", "--rounds", "--local-steps", "--data", "--eval-data",
                   "--partition", "--quantize", "--out", "--seed"):
        assert option in out


def test_methods_without_4bit_support_fail_before_anything_starts(capsys, tmp_path, tiny_model_dir):
    from fedpeft.common.model.quantization import bitsandbytes_available

    if not bitsandbytes_available():
        pytest.skip("bitsandbytes not importable")
    out = tmp_path / "run"
    assert main(["--model", str(tiny_model_dir), "--method", "loha", "--quantize", "4bit", "--out", str(out)]) == 2
    assert "cannot train over a 4-bit backbone" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(("method", "options", "fragment"), [
    ("adalora", ["-o", "target_r=20"], "AdaLoraMethodConfig.target_r"),
    ("adalora", ["--local-epochs", "1"], "AdaLoraMethodConfig.total_step"),  # no step count to derive it from
    ("adapter_fusion", ["-o", "adapter_dirs=only-one"], "AdapterFusionMethodConfig.adapter_dirs"),
    ("mam", ["-o", "r=4"], "unknown option(s) ['r']"),
    ("unipelt", ["-o", "lora_r=0"], "UniPeltMethodConfig.lora_r"),
])
def test_new_catalogue_methods_are_accepted_and_their_options_checked(capsys, method, options, fragment):
    assert main(["--method", method, *options]) == 2
    err = capsys.readouterr().err
    assert fragment in err and "unknown PEFT method" not in err


def test_client_ranks_are_parsed_and_set_the_global_rank():
    from fedpeft.simulations.cli import build_parser, spec_from_args

    config = spec_from_args(build_parser().parse_args(["--lora-aggregation", "flexlora", "--client-ranks", "2,4,8"]))
    assert config.federation.client_ranks == [2, 4, 8] and config.problems("simulation") == []
    assert config.method_options()["r"] == "8"
    hetero = config.hetero_ranks(make_config("lora", config.method_options()))
    assert hetero.mode == "flexlora" and hetero.ranks == (2, 4, 8)
    assert hetero.scaling(2) == pytest.approx(16 / 2) and hetero.scaling(8) == pytest.approx(16 / 8)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--client-ranks", "2,x"])


@pytest.mark.parametrize(("argv", "fragment"), [
    (["--client-ranks", "2,4"], "federation.client_ranks (--client-ranks) needs lora_aggregation hetlora or flexlora"),
    (["--lora-aggregation", "hetlora", "--client-ranks", "2,4", "-o", "r=16"], "r=16 conflicts with client_ranks"),
    (["--lora-aggregation", "flexlora", "--strategy", "fedmedian"], "it needs strategy 'fedavg'"),
    (["--lora-aggregation", "hetlora", "--client-ranks", "2,4", "-o", "use_dora=true"], "need plain LoRA"),
    (["--lora-aggregation", "flexlora", "--method", "ia3"], "needs method 'lora'"),
])
def test_bad_heterogeneous_rank_settings_are_reported(capsys, argv, fragment):
    assert main(argv) == 2
    assert fragment in capsys.readouterr().err
