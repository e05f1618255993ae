"""`peft-bench-scale` measures what it says: the strategy's aggregate and the numpy limit
are the same mean, and a tiny run writes its table, CSV and plot."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from fedpeft.common.protocol.flower_io import delta_from_arrayrecord
from fedpeft.simulations.bench import scale


def test_the_numpy_limit_computes_the_mean_the_strategy_publishes(flower_task_identity):
    spec = scale.lora_spec("qv")
    assert (len(spec.tensors), spec.num_parameters) == (120, 460_800)
    assert scale.lora_spec("all-linear").num_parameters == 2_442_240
    pool = scale._pool(spec, seed=1)
    limit = scale.numpy_limit(pool[1], pool[2], 5)
    means = {}
    for wire in ("flat", "arrays"):  # the same payloads as flat uploads and as one Array per tensor
        strategy, sent = scale._strategy("fedavg-streaming", spec, 5)
        arrays, _ = strategy.aggregate_train(1, scale._replies(sent, pool[0][wire], pool[2]))
        means[wire] = torch.cat([t.reshape(-1) for t in delta_from_arrayrecord(arrays).values()]).numpy()
        np.testing.assert_allclose(means[wire], limit.astype(np.float32), rtol=1e-6, atol=1e-9)
    assert np.array_equal(means["flat"], means["arrays"])


def test_a_tiny_run_writes_its_results(tmp_path, flower_task_identity):
    scale.main(["--clients", "2,3", "--deltas", "qv", "--modes", "fedavg,fedavg-streaming,svd",
                "--repeats", "1", "--out", str(tmp_path)])
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert [(r["mode"], r["clients"]) for r in rows] == [
        ("fedavg", "2"), ("fedavg", "3"), ("fedavg-streaming", "2"), ("fedavg-streaming", "3"),
        ("svd", "2"), ("svd", "3")]
    assert all(float(r["seconds"]) > 0 and float(r["numpy_seconds"]) > 0 for r in rows)
    assert "| qv | svd | 3 |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "results.png").stat().st_size > 0


@pytest.mark.slow
def test_the_simulation_part_runs_real_rounds_and_reports_a_marginal_cost(tmp_path):
    scale.main(["--clients", "", "--simulate", "2,3", "--simulate-baseline", "--out", str(tmp_path)])
    rows = list(csv.DictReader((tmp_path / "simulate.csv").open()))
    assert [(r["link_state"], r["clients"]) for r in rows] == [("indexed", "2"), ("indexed", "3"),
                                                              ("flower", "2"), ("flower", "3")]
    assert [r["accepted"] for r in rows] == ["2", "3", "2", "3"]
    assert rows[0]["marginal_ms"] == rows[2]["marginal_ms"] == "" and float(rows[1]["round_seconds"]) > 0
    assert rows[3]["marginal_ms"] != ""  # within one link state only
    assert "| flower | 3 |" in (tmp_path / "simulate.md").read_text()
