"""peft-bench: the results table, CSV and plot, from rows (no training here)."""

from __future__ import annotations

import csv

from fedpeft.simulations.benchmark import BenchRow, write_results


def test_results_table_csv_and_plot(tmp_path):
    rows = [BenchRow("lora", "centralized", 0.80, 0.45, 1000, 0.0, 10.0),
            BenchRow("lora", "iid", 0.78, 0.50, 1000, 0.004, 30.0),
            BenchRow("lora", "dirichlet:0.1", 0.60, 0.90, 1000, 0.004, 31.0),
            BenchRow("bitfit", "iid", 0.70, 0.60, 200, 0.001, 29.0)]
    table = write_results(rows, tmp_path, "test bench")
    lines = table.splitlines()
    assert "| method | centralized | iid | dirichlet:0.1 | fed IID / central |" in lines[2]
    assert lines[4].startswith("| lora | 0.800 | 0.780 | 0.600 | 97.5% | 1,000 | 0.004 |")
    assert lines[5].startswith("| bitfit | - | 0.700 | - | - | 200 |")
    with (tmp_path / "results.csv").open() as fh:
        assert len(list(csv.DictReader(fh))) == 4
    assert (tmp_path / "results.png").stat().st_size > 0
