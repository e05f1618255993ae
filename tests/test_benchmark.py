"""peft-bench: the results table, CSV and plot, from rows (no training here)."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math

import pytest

from fedpeft.common.errors import ConfigError
from fedpeft.simulations.bench.method_quality import (
    BenchRow,
    best_round,
    centralized_steps,
    check_settings,
    majority_rate,
    mean_std,
    parse_seeds,
    read_results,
    results_markdown,
    write_results,
)

MAJORITY = 0.509


def _run(method: str, setting: str, seed: int, accuracy: float, best: float | None = None,
         best_at: int | None = 3) -> BenchRow:
    central = setting.startswith("centralized")
    return BenchRow(method, setting, seed, accuracy, accuracy if best is None else best, None if central else best_at,
                    0.5, MAJORITY, 1000 if method == "lora" else 200, 0.0 if central else 0.004, 10.0)


SETTINGS = ("centralized", "centralized-seq", "iid", "natural:branch", "dirichlet:0.1")
FINAL = {0: (0.80, 0.70, 0.78, 0.70, 0.51), 1: (0.82, 0.72, 0.76, 0.74, 0.60)}
BEST = {0: (None, None, 0.79, 0.75, 0.66), 1: (None, None, 0.77, 0.74, 0.62)}
ROWS = [_run("lora", s, seed, FINAL[seed][i], BEST[seed][i], best_at=2 + seed)
        for seed in (0, 1) for i, s in enumerate(SETTINGS)]
ROWS.append(_run("bitfit", "iid", 0, 0.70))
ROWS.append(dataclasses.replace(_run("ia3", "dirichlet:0.1", 0, 0.509), auc=0.8125))  # collapsed, yet it ranks


def test_table_has_every_setting_in_run_order_with_mean_std_and_every_ratio():
    lines = results_markdown(ROWS, "test bench").splitlines()
    assert lines[0] == "**test bench**"
    assert "seeds 0, 1" in lines[2]
    assert lines[4] == ("| method | centralized | centralized-seq | iid | natural:branch | dirichlet:0.1 | iid / central"
                        " | natural:branch / central | dirichlet:0.1 / central | trainable params"
                        " | MB up per client per round |")
    assert lines[6] == ("| lora | 0.810 ± 0.014 | 0.710 ± 0.014 | 0.770 ± 0.014 | 0.720 ± 0.028 | 0.555 ± 0.064 †1"
                        " | 95.1% | 88.9% | 68.5% | 1,000 | 0.004 |")
    assert lines[7] == "| bitfit | - | - | 0.700 | - | - | - | - | - | 200 | 0.004 |"  # no centralized run: no ratio
    assert any(line.startswith("†n: n seeds ended within 0.005") and "0.509" in line for line in lines)
    best = lines[lines.index("| method | iid | natural:branch | dirichlet:0.1 |") + 2]
    assert best == "| lora | 0.780 ± 0.014 (r2/3) | 0.745 ± 0.007 (r2/3) | 0.640 ± 0.028 (r2/3) |"
    assert lines[-1] == "| ia3 | - | - | - | - | 0.812 |" and "| lora | - | - | - | - | - |" in lines  # AUC table


def test_without_centralized_there_are_no_ratio_columns_and_one_seed_has_no_spread():
    table = results_markdown([_run("lora", "dirichlet:1.0", 0, 0.7), _run("lora", "iid", 0, 0.8)], "t")
    assert "| method | dirichlet:1.0 | iid | trainable params | MB up per client per round |" in table
    assert "| lora | 0.700 | 0.800 | 1,000 | 0.004 |" in table
    assert "†" not in table


def test_csv_has_one_row_per_run_and_reads_back(tmp_path):
    table = write_results(ROWS, tmp_path, "test bench")
    assert (tmp_path / "results.md").read_text() == table
    assert (tmp_path / "results.png").stat().st_size > 0
    with (tmp_path / "results.csv").open() as fh:
        written = list(csv.DictReader(fh))
    assert len(written) == len(ROWS)
    fields = ("setting", "seed", "accuracy", "best_accuracy", "best_round", "majority_rate", "collapsed")
    assert {k: written[4][k] for k in fields} == {"setting": "dirichlet:0.1", "seed": "0", "accuracy": "0.5100",
                                                  "best_accuracy": "0.6600", "best_round": "2",
                                                  "majority_rate": "0.5090", "collapsed": "1"}
    assert written[0]["best_round"] == "" and written[0]["collapsed"] == "0"
    assert read_results(tmp_path / "results.csv") == ROWS


def test_a_csv_from_before_seeds_reads_as_seed_0(tmp_path):
    path = tmp_path / "results.csv"
    path.write_text("method,setting,accuracy,eval_loss,trainable_parameters,upload_mb_per_client_round,seconds\n"
                    "lora,iid,0.7800,0.5000,1000,0.004,30.0\n")
    (row,) = read_results(path)
    assert (row.seed, row.best_accuracy, row.best_round) == (0, 0.78, None)
    assert math.isnan(row.majority_rate) and not row.collapsed


def test_best_round_skips_the_untrained_round_and_prefers_the_earliest_tie():
    metrics = [{"round": 0, "eval_accuracy": 0.9}, {"round": 1, "eval_accuracy": 0.66}, {"round": 2},
               {"round": 3, "eval_accuracy": 0.77}, {"round": 4, "eval_accuracy": 0.77}]
    assert best_round(metrics) == (3, 0.77)
    assert best_round([{"round": 0}, {"round": 1}]) == (1, 0.0)


def test_collapse_is_the_final_accuracy_on_the_majority_rate():
    assert majority_rate([{"label": 1}, {"label": "1"}, {"label": 0}, {"label": 1}], "label") == 0.75
    assert _run("lora", "iid", 0, MAJORITY + 0.004).collapsed
    assert not _run("lora", "iid", 0, MAJORITY + 0.006).collapsed


def test_centralized_budgets():
    assert centralized_steps("centralized", rounds=4, clients=10, local_steps=6) == 240
    assert centralized_steps("centralized-seq", rounds=4, clients=10, local_steps=6) == 24


def test_mean_std_uses_the_sample_deviation():
    assert mean_std([0.7]) == (0.7, 0.0)
    mean, std = mean_std([0.6, 0.8, 1.0])
    assert mean == pytest.approx(0.8) and std == pytest.approx(0.2)


def test_seeds_and_settings_are_checked_up_front():
    assert parse_seeds("0,1,2") == [0, 1, 2]
    for bad in ("", "0,x", "1,1"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_seeds(bad)
    check_settings(["centralized", "centralized-seq", "iid", "dirichlet:0.1", "natural:site", "dirichlet:0.1+scaffold"])
    for bad in (["central"], ["iid", "iid"], ["dirichlet:0"], ["iid+bogus"], ["dirichlet:0+scaffold"]):
        with pytest.raises(ConfigError):
            check_settings(bad)


@pytest.mark.slow
def test_tiny_benchmark_end_to_end(tmp_path):
    """The CLI as a user runs it, on a tiny BERT: two methods, both centralized budgets and a
    federated setting; every run lands in the CSV, the table and the plot (several seeds are
    covered from rows above: each seed is the same loop again)."""
    from test_attack_bench import _write_sentiment
    from tiny_models import build_tiny_bert

    from fedpeft.simulations.bench.method_quality import main

    model = build_tiny_bert(tmp_path / "bert")
    _write_sentiment(tmp_path / "train.tsv", 64, seed=1)
    _write_sentiment(tmp_path / "dev.tsv", 24, seed=2)
    out = tmp_path / "bench"
    assert main(["--model", str(model), "--data", str(tmp_path / "train.tsv"), "--eval-data", str(tmp_path / "dev.tsv"),
                 "--methods", "lora,ia3", "--settings", "centralized,centralized-seq,dirichlet:1.0,dirichlet:1.0+scaffold",
                 "--seeds", "3", "--clients", "2", "--rounds", "2", "--local-steps", "1", "--batch-size", "4",
                 "--train-limit", "0", "--eval-every", "2", "--out", str(out)]) == 0
    rows = read_results(out / "results.csv")
    assert {(r.method, r.setting, r.seed) for r in rows} == {
        (m, s, 3) for m in ("lora", "ia3")
        for s in ("centralized", "centralized-seq", "dirichlet:1.0", "dirichlet:1.0+scaffold")}
    # SCAFFOLD's control variate travels down only: the upload is the delta's
    scaffold = [r for r in rows if r.setting.endswith("+scaffold")]
    plain = {r.method: r for r in rows if r.setting == "dirichlet:1.0"}
    assert scaffold and all(r.upload_mb_per_client_round == plain[r.method].upload_mb_per_client_round for r in scaffold)
    federated = [r for r in rows if r.setting == "dirichlet:1.0"]
    # --eval-every 2: round 1 trains unscored, so the best scored round is the last
    assert all(r.best_round == 2 and r.best_accuracy == r.accuracy for r in federated)
    metrics = [json.loads(line) for line in (out / "lora-dirichlet-1.0-seed3" / "metrics.jsonl").read_text().splitlines()]
    assert [("eval_accuracy" in m) for m in metrics] == [True, False, True]
    assert all(0 < r.majority_rate < 1 for r in rows)
    assert all(r.auc is not None and 0 <= r.auc <= 1 for r in rows)  # two labels: every run scores its ranking
    table = (out / "results.md").read_text()
    assert "dirichlet:1.0 / central" in table and "| ia3 |" in table
    assert (out / "results.png").stat().st_size > 0


def test_every_run_is_checked_before_the_first_one_trains(tmp_path, capsys):
    """A method the recipe refuses stops the benchmark before LoRA's run, not hours into it."""
    from test_attack_bench import _write_sentiment
    from tiny_models import build_tiny_bert

    from fedpeft.simulations.bench.method_quality import main

    model = build_tiny_bert(tmp_path / "bert")
    _write_sentiment(tmp_path / "train.tsv", 16, seed=1)
    out = tmp_path / "bench"
    assert main(["--model", str(model), "--data", str(tmp_path / "train.tsv"), "--eval-data", str(tmp_path / "train.tsv"),
                 "--methods", "lora,adalora", "--recipe", "server-adam", "--settings", "centralized,dirichlet:1.0",
                 "--clients", "2", "--rounds", "1", "--out", str(out)]) == 2
    assert "federation.method 'adalora' does not learn under" in capsys.readouterr().err
    assert not out.exists()  # nothing trained, nothing written
