"""The run report's tables and plot over rows that `task.eval_every` left unscored."""

from __future__ import annotations

from fedpeft.server.app import eval_due
from fedpeft.simulations.report import before_after_table, plot_metrics, rounds_table

TRAFFIC = {"bytes_up": 1e6, "bytes_down": 2e6, "seconds": 1.0, "train_loss": 0.5}
ROWS = [
    {"round": 0, "eval_loss": 0.9, "eval_accuracy": 0.5, **TRAFFIC},
    {"round": 1, **TRAFFIC},
    {"round": 2, "eval_loss": 0.6, "eval_accuracy": 0.7, **TRAFFIC},
    {"round": 3, **TRAFFIC},  # a run resumed and stopped on a round the schedule skipped
]


def test_rounds_zero_and_last_are_always_scored():
    assert [r for r in range(11) if eval_due(r, 10, 4)] == [0, 4, 8, 10]
    assert [r for r in range(4) if eval_due(r, 3, 1)] == [0, 1, 2, 3]
    assert [r for r in range(6) if eval_due(r, 5, 100)] == [0, 5]


def test_unscored_rounds_show_as_dashes_and_the_change_uses_the_last_scored_round(tmp_path):
    table = rounds_table(ROWS)
    assert "| 1 | - | - | 0.5000 |" in table and "| 2 | 0.6000 | 0.700 |" in table
    summary = before_after_table(ROWS)
    assert "after (round 2)" in summary and "| eval loss | 0.9000 | 0.6000 | -0.3000 |" in summary
    assert "4.00 MB / 8.00 MB" in summary  # traffic counts every round, scored or not
    assert plot_metrics(ROWS, tmp_path / "m.png").stat().st_size > 0
