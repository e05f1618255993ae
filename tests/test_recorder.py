"""Run records: what a restarted server can trust after a crash."""

from __future__ import annotations

import dataclasses
import json
from collections import OrderedDict

import pytest
import torch

from fedpeft.common.data.builtin_task import builtin_task
from fedpeft.common.errors import ConfigError, FederationError
from fedpeft.common.methods import make_config
from fedpeft.server.app import ServerSetup, _resume_point
from fedpeft.server.recorder import RunRecorder, last_completed_round


def _round(recorder: RunRecorder, n: int) -> None:
    recorder.save_checkpoint(n, OrderedDict(w=torch.full((2,), float(n))))
    recorder.record({"round": n, "eval_loss": 1.0 / (n + 1)})


def test_last_completed_round_needs_row_and_checkpoint(tmp_path):
    recorder = RunRecorder(tmp_path)
    assert last_completed_round(tmp_path) is None
    for n in range(3):
        _round(recorder, n)
    recorder.save_checkpoint(3, OrderedDict(w=torch.ones(2)))  # crash before round 3's row
    with (tmp_path / "metrics.jsonl").open("a") as fh:
        fh.write('{"round": 3, "ev')  # torn line
    assert last_completed_round(tmp_path) == 2
    (tmp_path / "checkpoints" / "global-round-0001.safetensors").unlink()
    assert last_completed_round(tmp_path) == 0


def test_resumed_recorder_keeps_completed_rows_only(tmp_path):
    recorder = RunRecorder(tmp_path)
    for n in range(3):
        _round(recorder, n)
    resumed = RunRecorder(tmp_path, resume_from=1)
    assert [r["round"] for r in resumed.rows] == [0, 1]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1]
    assert torch.equal(resumed.load_checkpoint(1)["w"], torch.ones(2))


def _setup(tmp_path, strategy="fedavg", rounds=3) -> ServerSetup:
    return ServerSetup(run_name="r", base_model="m", model_dir=str(tmp_path), quantize="none", method="lora",
                       method_config=make_config("lora"), task=builtin_task(), train={}, eval_rows=[],
                       out_dir=str(tmp_path), num_rounds=rounds, num_clients=2, clients_per_round=2, seed=0,
                       strategy=strategy, resume=True)


def test_resume_point_is_checked(tmp_path):
    with pytest.raises(FederationError, match="no completed round"):
        _resume_point(_setup(tmp_path))
    recorder = RunRecorder(tmp_path)
    for n in range(3):
        _round(recorder, n)
    assert _resume_point(_setup(tmp_path)) == 2
    with pytest.raises(FederationError, match="more than the 1"):
        _resume_point(_setup(tmp_path, rounds=1))
    with pytest.raises(FederationError, match="without its optimizer state"):  # a run dir from before it was saved
        _resume_point(_setup(tmp_path, strategy="fedadam"))
    from fedpeft.server.optimizer_state import state_path

    state_path(recorder.checkpoint_path(2)).write_bytes(b"")  # (its content is read when the run restores it)
    assert _resume_point(_setup(tmp_path, strategy="fedadam")) == 2
    with pytest.raises(ConfigError, match="SCAFFOLD cannot be resumed"):  # clients' c_i are not in the checkpoint
        _resume_point(dataclasses.replace(_setup(tmp_path), scaffold=True))
