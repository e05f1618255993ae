"""peft-bench: the results table, CSV and plot, from rows (no training here)."""

from __future__ import annotations

import csv

from fedpeft.simulations.bench.method_quality import BenchRow, read_results, write_results


def test_results_table_csv_and_plot(tmp_path):
    rows = [BenchRow("lora", "centralized", 0.80, 0.45, 1000, 0.0, 10.0),
            BenchRow("lora", "iid", 0.78, 0.50, 1000, 0.004, 30.0),
            BenchRow("lora", "dirichlet:0.1", 0.60, 0.90, 1000, 0.004, 31.0),
            BenchRow("bitfit", "iid", 0.70, 0.60, 200, 0.001, 29.0)]
    table = write_results(rows, tmp_path, "test bench")
    lines = table.splitlines()
    assert "| method | centralized | iid | dirichlet:0.1 | IID / central | α=1.0 / central |" in lines[2]
    assert lines[4].startswith("| lora | 0.800 | 0.780 | 0.600 | 97.5% | - | 1,000 | 0.004 |")
    assert lines[5].startswith("| bitfit | - | 0.700 | - | - | - | 200 |")
    with (tmp_path / "results.csv").open() as fh:
        assert len(list(csv.DictReader(fh))) == 4
    assert read_results(tmp_path / "results.csv") == [
        BenchRow(r.method, r.setting, round(r.accuracy, 4), round(r.eval_loss, 4), r.trainable_parameters,
                 round(r.upload_mb_per_client_round, 3), round(r.seconds, 1)) for r in rows]
    assert (tmp_path / "results.png").stat().st_size > 0
