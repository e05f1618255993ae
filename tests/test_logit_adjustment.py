"""FedLC-style logit adjustment: a client's training loss sees logits + tau * log(its label frequencies)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fedpeft.client.training import TrainConfig, label_shift, train_problems
from fedpeft.common.data.records import TaskSpec
from fedpeft.common.training.objectives import SequenceClassificationObjective


def test_the_shift_is_tau_times_the_log_of_the_smoothed_local_label_frequencies():
    shift = label_shift([0, 0, 0, 1], 3, tau=0.5)
    expected = [0.5 * math.log(p) for p in (4 / 7, 2 / 7, 1 / 7)]  # add-one smoothing over 3 labels
    assert shift.tolist() == pytest.approx(expected)


class _Classifier(nn.Module):
    """Stands in for a HF sequence classifier: logits from a table, HF's loss when labels are given."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.table = nn.Parameter(logits)

    def forward(self, input_ids, labels=None, **_):
        logits = self.table[input_ids[:, 0]]
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return type("Out", (), {"logits": logits, "loss": loss})()


def test_the_training_loss_adds_the_shift_and_evaluation_does_not():
    task = TaskSpec.from_dict({"kind": "classification", "template": "{text}", "verbalizer": {"0": "neg", "1": "pos"},
                               "label_column": "label"})
    model = _Classifier(torch.tensor([[0.2, -0.1], [1.0, 0.5]]))
    batch = {"input_ids": torch.tensor([[0], [1]]), "labels": torch.tensor([0, 1])}
    plain = SequenceClassificationObjective(task, tokenizer=None, max_length=16)
    shift = torch.tensor([0.3, -1.2])
    adjusted = SequenceClassificationObjective(task, tokenizer=None, max_length=16, label_shift=shift)
    logits = model.table.detach()
    assert float(plain.loss(model, dict(batch))) == pytest.approx(float(nn.functional.cross_entropy(logits, batch["labels"])))
    assert float(adjusted.loss(model, dict(batch))) == pytest.approx(
        float(nn.functional.cross_entropy(logits + shift, batch["labels"])))


def test_the_plan_carries_logit_adjustment_only_when_it_is_on():
    off = TrainConfig(learning_rate=1e-3, local_steps=8)
    on = TrainConfig(learning_rate=1e-3, local_steps=8, logit_adjustment=1.0)
    assert "logit_adjustment" not in off.plan_fields() and on.plan_fields()["logit_adjustment"] == 1.0
    assert train_problems({"logit_adjustment": -1}) and train_problems({"logit_adjustment": float("nan")})
