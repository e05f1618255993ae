"""peft-bench-codecs: every codec runs the same federation as fp32, in one run, and is compared with it."""

from __future__ import annotations

import csv

import pytest

from fedpeft.common.errors import ConfigError
from fedpeft.simulations.bench.codecs import main, parse_codecs


def test_codec_settings_put_the_fp32_baseline_first_and_are_checked_before_any_run():
    assert parse_codecs("int8,none,topk:0.1+int8/bf16") == ["none", "int8", "topk:0.1+int8/bf16"]
    with pytest.raises(ConfigError, match="unknown codec"):
        parse_codecs("int8,int9")
    with pytest.raises(ConfigError, match="twice"):
        parse_codecs("int8,int8")


@pytest.mark.slow
def test_a_tiny_codec_benchmark_compares_bytes_and_accuracy_with_fp32(tiny_model_dir, tmp_path):
    out = tmp_path / "bench"
    assert main(["--model", str(tiny_model_dir), "--method", "lora", "--codecs", "topk:0.25+int8/bf16", "--clients", "2",
                 "--rounds", "2", "--local-steps", "2", "--builtin-train-rows", "48", "--eval-limit", "16",
                 "--max-length", "32", "--out", str(out)]) == 0
    rows = {r["codec"]: r for r in csv.DictReader((out / "results.csv").open())}
    assert list(rows) == ["none", "topk:0.25+int8/bf16"]
    fp32, coded = rows["none"], rows["topk:0.25+int8/bf16"]
    assert float(fp32["up_ratio_vs_fp32"]) == 1.0 and float(fp32["points_vs_fp32"]) == 0.0
    assert float(coded["up_ratio_vs_fp32"]) > 4 and float(coded["down_ratio_vs_fp32"]) > 1.5
    assert float(coded["up_ratio_vs_full_model"]) > float(fp32["up_ratio_vs_full_model"]) > 1
    rounds = list(csv.DictReader((out / "rounds.csv").open()))
    assert len(rounds) == 2 * 3 and float(rounds[-1]["cumulative_mb_up"]) > 0
    assert "topk:0.25+int8 / bf16" in (out / "results.md").read_text() and (out / "results.png").stat().st_size > 0


def test_sizes_print_what_each_codec_sends_for_the_real_delta(tiny_model_dir, capsys):
    assert main(["--sizes", "--model", str(tiny_model_dir), "--method", "lora", "--method-opt", "r=4",
                 "--codecs", "int8,topk:0.1+int8/bf16"]) == 0
    table = capsys.readouterr().out
    lines = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| codec")]
    assert [line.split(" | ")[0] for line in lines] == ["| fp32 (none)", "| int8", "| topk:0.1+int8 / bf16"]
    ratios = [float(line.split(" | ")[3]) for line in lines]
    assert ratios[0] == 1.0 and 3.0 < ratios[1] < 4.0 and ratios[2] > 6
