"""One client's local round: train the PEFT delta on private rows for a few steps.

Reads top to bottom like a recipe: encode the rows, set up the optimizer over the
delta's tensors only, run the steps (logging loss), report what happened.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedpeft.common.data.records import Record, TaskSpec
from fedpeft.common.errors import ConfigError, DataError
from fedpeft.common.model.adapted import AdaptedModel
from fedpeft.common.training.activation_checkpointing import gradient_checkpointing
from fedpeft.common.training.objectives import objective_for

log = logging.getLogger("fedpeft.client")


@dataclass(frozen=True)
class TrainConfig:
    """Local optimization settings a server sends to every client each round."""

    local_steps: int = 10
    """Optimizer steps per round (ignored when local_epochs > 0)."""
    local_epochs: float = 0.0
    """If > 0, train this many passes over the local data instead of local_steps."""
    learning_rate: float = 1e-3
    batch_size: int = 8
    max_length: int = 128
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    log_every: int = 5
    gradient_checkpointing: bool = False
    """Recompute each block's activations in backward instead of keeping them: a fraction of
    the activation memory for about one more forward pass (QLoRA's default). Not with
    prefix-style methods (prefix, ptuning_v2, mam, unipelt)."""

    def __post_init__(self) -> None:
        checks = {
            "local_steps": self.local_steps >= 1,
            "local_epochs": self.local_epochs >= 0,
            "learning_rate": self.learning_rate > 0 and math.isfinite(self.learning_rate),
            "batch_size": self.batch_size >= 1,
            "max_length": self.max_length >= 8,
            "weight_decay": self.weight_decay >= 0,
            "max_grad_norm": self.max_grad_norm > 0,
            "log_every": self.log_every >= 1,
            "gradient_checkpointing": isinstance(self.gradient_checkpointing, bool),
        }
        bad = [f"{k}={getattr(self, k)!r}" for k, ok in checks.items() if not ok]
        if bad:
            raise ConfigError(f"invalid training settings: {', '.join(bad)}")

    def plan_fields(self) -> dict[str, object]:
        """What the federation plan carries to clients: every field, less gradient_checkpointing
        while it is off, so that clients from before the option still read the plan."""
        fields = dict(self.__dict__)
        if not self.gradient_checkpointing:
            del fields["gradient_checkpointing"]
        return fields

    def steps_for(self, num_rows: int) -> int:
        if self.local_epochs > 0:
            return max(1, math.ceil(self.local_epochs * num_rows / self.batch_size))
        return self.local_steps


@dataclass(frozen=True)
class TrainStats:
    steps: int
    first_loss: float
    last_loss: float
    mean_loss: float
    seconds: float


def reply_metrics(num_examples: int, stats: TrainStats, load_seconds: float, swap_seconds: float,
                  bytes_up: int) -> dict[str, float]:
    """The metrics a client's train reply carries (FedAvg weight, loss, timings, bytes sent)."""
    from fedpeft.common.protocol.plan import UNIT_WEIGHT_KEY, WEIGHT_KEY

    return {WEIGHT_KEY: num_examples, UNIT_WEIGHT_KEY: 1, "train-loss": stats.mean_loss,
            "train-loss-last": stats.last_loss, "train-seconds": stats.seconds, "load-seconds": load_seconds,
            "swap-seconds": swap_seconds, "bytes-up": bytes_up}


def train_local(adapted: AdaptedModel, task: TaskSpec, rows: Sequence[Record], config: TrainConfig,
                seed: int, label: str = "client", proximal_mu: float = 0.0, step_offset: int = 0) -> TrainStats:
    """Train `adapted`'s delta on `rows` in place; returns loss statistics.

    `step_offset` is the number of local steps of earlier rounds: methods with a
    step schedule (AdaLoRA) see the global step `step_offset + step`.

    With `proximal_mu > 0` (FedProx) the loss gets (mu/2)·||w - w_global||² over the
    delta's tensors, w_global being their values when training starts.
    """
    if not rows:
        raise DataError(f"{label}: no local training data")
    if not (proximal_mu >= 0 and math.isfinite(proximal_mu)):
        raise ConfigError(f"{label}: proximal-mu must be a finite number >= 0, got {proximal_mu}")
    objective = objective_for(adapted.model, adapted.tokenizer, task, config.max_length)
    encoded = [objective.encode(r) for r in rows]
    params = adapted.trainable_parameters()
    anchors = [p.detach().clone() for p in params] if proximal_mu > 0 else []
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    torch.manual_seed(seed)  # dropout masks: same seed, same local round, whatever ran before on this worker
    generator = torch.Generator().manual_seed(seed)
    steps = config.steps_for(len(encoded))
    order: list[int] = []
    losses: list[float] = []
    model = adapted.model
    model.train()
    adapted.method.begin_local_training(model)
    start = time.perf_counter()
    with gradient_checkpointing(model, config.gradient_checkpointing, what=f"method {adapted.method.name!r}"):
        for step in range(1, steps + 1):
            if len(order) < config.batch_size:  # reshuffle each pass over the local data
                order += torch.randperm(len(encoded), generator=generator).tolist()
            batch_idx, order = order[:config.batch_size], order[config.batch_size:]
            loss = objective.loss(model, objective.collate([encoded[i] for i in batch_idx]))
            if anchors:
                loss = loss + 0.5 * proximal_mu * sum(((p - a) ** 2).sum() for p, a in zip(params, anchors, strict=True))
            if not torch.isfinite(loss):
                raise DataError(f"{label}: training loss became {loss.item()} at step {step}; lower the learning rate")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            adapted.method.after_optimizer_step(model, step_offset + step)
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            if step % config.log_every == 0 or step == steps:
                log.info("%s step %d/%d loss %.4f (%.1f s)", label, step, steps, losses[-1], time.perf_counter() - start)
    return TrainStats(steps=steps, first_loss=losses[0], last_loss=losses[-1], mean_loss=sum(losses) / len(losses),
                      seconds=time.perf_counter() - start)

