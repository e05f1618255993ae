"""`peft-sim` argument handling: clear one-line errors, all config problems at once."""

from __future__ import annotations

import subprocess
import sys

import pytest

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
    for fragment in ("--clients must be >= 1", "--rounds must be >= 1", "unknown partition 'shards'",
                     "--quantize '8bit'", "LoraMethodConfig.r", "missing.jsonl does not exist"):
        assert fragment in err


def test_bad_data_is_reported_without_traceback(capsys, tmp_path, tiny_model_dir):
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "a", "label": 0}\n{"text": "b", "label": 1}\n')
    assert main(["--model", str(tiny_model_dir), "--data", str(data), "--quantize", "none",
                 "--out", str(tmp_path / "run")]) == 4
    assert "name a word for each" in capsys.readouterr().err


def test_missing_model_is_reported(capsys, tmp_path):
    assert main(["--model", str(tmp_path / "nowhere"), "--quantize", "none", "--out", str(tmp_path / "r")]) == 3
    assert "neither a built-in model" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--help"])
def test_console_script_is_installed(flag):
    out = subprocess.run([sys.executable, "-m", "fedpeft.simulations.cli", flag], capture_output=True, text=True,
                         check=True).stdout
    for option in ("--model", "--method", "--clients", "--rounds", "--local-steps", "--data", "--eval-data",
                   "--partition", "--quantize", "--out", "--seed"):
        assert option in out
