"""Local training: reproducible for a seed, and FedProx's proximal term holds the delta back."""

from __future__ import annotations

import pytest
import torch

from fedpeft.client.training import TrainConfig, train_local
from fedpeft.common.data.builtin_task import builtin_splits, builtin_task
from fedpeft.common.errors import ConfigError
from fedpeft.common.methods import make_config
from fedpeft.common.model.adapted import AdaptedModel

ROWS, _ = builtin_splits(24, 4, seed=2)
CONFIG = TrainConfig(local_steps=4, learning_rate=1e-2, batch_size=4, max_length=48)


def _trained(tiny_model_dir, seed: int, mu: float = 0.0):
    adapted = AdaptedModel.load(tiny_model_dir, "none", "lora", make_config("lora", {"r": "4", "dropout": "0.3"}), seed=0)
    start = adapted.get_delta()
    # noise from an unrelated earlier client on the same worker must not matter
    torch.rand(1000)
    stats = train_local(adapted, builtin_task(), ROWS, CONFIG, seed=seed, proximal_mu=mu)
    return start, adapted.get_delta(), stats


def _distance(a, b) -> float:
    return float(sum(((a[k] - b[k]) ** 2).sum() for k in a) ** 0.5)


def test_same_seed_same_local_update(tiny_model_dir):
    _, first, stats = _trained(tiny_model_dir, seed=11)
    _, second, _ = _trained(tiny_model_dir, seed=11)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert stats.steps == 4 and stats.seconds > 0


def test_proximal_term_keeps_the_delta_closer_to_the_global(tiny_model_dir):
    start, plain, _ = _trained(tiny_model_dir, seed=3, mu=0.0)
    _, proximal, _ = _trained(tiny_model_dir, seed=3, mu=50.0)
    assert _distance(proximal, start) < _distance(plain, start)


def test_invalid_settings_are_rejected(tiny_model_dir):
    with pytest.raises(ConfigError, match="learning_rate"):
        TrainConfig(learning_rate=0)
    with pytest.raises(ConfigError, match="proximal-mu"):
        _trained(tiny_model_dir, seed=1, mu=-1.0)
    assert TrainConfig(local_epochs=1.0, batch_size=4).steps_for(10) == 3
