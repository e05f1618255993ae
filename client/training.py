"""One client's local round: train the PEFT delta on private rows for a few steps.

Reads top to bottom like a recipe: encode the rows, set up the optimizer over the
delta's tensors only, run the steps (logging loss), report what happened.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from fedpeft.common.data.records import Record, TaskSpec
from fedpeft.common.errors import ConfigError, DataError
from fedpeft.common.model.adapted import AdaptedModel
from fedpeft.common.training.activation_checkpointing import gradient_checkpointing
from fedpeft.common.training.objectives import SequenceClassificationObjective, objective_for
from fedpeft.common.training.scaffold import DriftCorrection

log = logging.getLogger("fedpeft.client")


@dataclass(frozen=True)
class TrainConfig:
    """Local optimization settings a server sends to every client each round."""

    local_steps: int | None = None
    """Optimizer steps per round (ignored when local_epochs > 0). None: the method's
    `federated_local_steps` (`for_method`); a plan always carries a number."""
    local_epochs: float = 0.0
    """If > 0, train this many passes over the local data instead of local_steps."""
    learning_rate: float | None = None
    """None: the method's `federated_learning_rate` (`for_method`); a plan always carries a number."""
    batch_size: int = 8
    max_length: int = 128
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    log_every: int = 4
    gradient_checkpointing: bool = False
    """Recompute each block's activations in backward instead of keeping them: a fraction of
    the activation memory for about one more forward pass (QLoRA's default). Not with
    prefix-style methods (prefix, ptuning_v2, mam, unipelt)."""
    logit_adjustment: float = 0.0
    """Label-skew calibration for classification heads (FedLC, Zhang et al. 2022; logit adjustment,
    Menon et al. 2021): each client trains on logits + tau * log(its own label frequencies), so a
    client that holds mostly one label stops pulling the shared head toward it; evaluation uses
    the plain logits. tau here; 0 = off. The frequencies never leave the client."""
    optimizer: str = "adamw"
    """The clients' local optimizer: "adamw", or "sgd" (plain SGD, what FedAvg, FedOpt and
    SCAFFOLD are analysed with). SGD steps shrink with the gradient, so a client whose data
    is already fitted (one label under label skew) barely moves the shared delta; AdamW's
    normalised steps keep moving it by about the learning rate per step whatever the loss."""

    def __post_init__(self) -> None:
        bad = train_problems(dataclasses.asdict(self))
        if bad:
            raise ConfigError(f"invalid training settings: {', '.join(bad)}")

    def for_method(self, method: str, fresh_head: bool = False) -> TrainConfig:
        """These settings with the learning rate and local steps made concrete: `method`'s
        federated defaults where unset (its `federated_head_*` ones for a model that gets a
        freshly initialised classification head, where it has them)."""
        if self.learning_rate is not None and self.local_steps is not None:
            return self
        from fedpeft.common.methods import get_method

        chosen = get_method(method)
        rate, steps = chosen.federated_learning_rate, chosen.federated_local_steps
        if fresh_head:
            rate = chosen.federated_head_learning_rate or rate
            steps = chosen.federated_head_local_steps or steps
        return dataclasses.replace(self, learning_rate=rate if self.learning_rate is None else self.learning_rate,
                                   local_steps=steps if self.local_steps is None else self.local_steps)

    def plan_fields(self) -> dict[str, object]:
        """What the federation plan carries to clients: every field, less gradient_checkpointing
        and logit_adjustment while they are off and the optimizer while it is AdamW, so that
        clients from before them still read the plan. The learning rate must be concrete
        (`for_method`): clients never guess it."""
        self._require_resolved()
        fields = dict(self.__dict__)
        for key in ("gradient_checkpointing", "logit_adjustment"):  # newer options, sent when on
            if not fields[key]:
                del fields[key]
        if fields["optimizer"] == "adamw":  # the default, left out for clients from before the option
            del fields["optimizer"]
        return fields

    def _require_resolved(self) -> None:
        for key in ("learning_rate", "local_steps"):
            if getattr(self, key) is None:
                raise ConfigError(f"training.{key} is unset: resolve it with TrainConfig.for_method first")

    def steps_for(self, num_rows: int) -> int:
        if self.local_epochs > 0:
            steps = self.local_epochs * num_rows / self.batch_size
            if not math.isfinite(steps):  # a finite local_epochs so large the product overflows
                raise ConfigError(f"local_epochs {self.local_epochs} over {num_rows} rows is not a finite number of steps")
            return max(1, math.ceil(steps))
        self._require_resolved()
        assert self.local_steps is not None
        return self.local_steps


OPTIMIZERS = ("adamw", "sgd")

# Upper limits keep a plan from asking a client for a job that never ends or cannot be
# allocated (a finite local_epochs of 1e15 is as bad as infinity); far above any real run.
MAX_LOCAL_STEPS = 1_000_000
MAX_LOCAL_EPOCHS = 1000.0
MAX_BATCH_SIZE = 65_536
MAX_LENGTH = 1_048_576

_TRAIN_CHECKS: dict[str, tuple[str, object]] = {
    "local_steps": (f"must be an integer in [1, {MAX_LOCAL_STEPS}]",
                    lambda v: v is None or 1 <= v <= MAX_LOCAL_STEPS),  # None: unset
    "local_epochs": (f"must be a number in [0, {MAX_LOCAL_EPOCHS:g}]", lambda v: 0 <= v <= MAX_LOCAL_EPOCHS),
    "learning_rate": ("must be a finite number > 0", lambda v: v is None or 0 < v < math.inf),  # None: unset
    "batch_size": (f"must be an integer in [1, {MAX_BATCH_SIZE}]", lambda v: 1 <= v <= MAX_BATCH_SIZE),
    "max_length": (f"must be an integer in [8, {MAX_LENGTH}]", lambda v: 8 <= v <= MAX_LENGTH),
    "weight_decay": ("must be a finite number >= 0", lambda v: 0 <= v < math.inf),
    "max_grad_norm": ("must be a finite number > 0", lambda v: 0 < v < math.inf),
    "log_every": ("must be >= 1", lambda v: v >= 1),
    "gradient_checkpointing": ("must be true or false", lambda v: isinstance(v, bool)),
    "logit_adjustment": ("must be a number in [0, 10]", lambda v: 0 <= v <= 10),
    "optimizer": (f"must be one of {', '.join(OPTIMIZERS)}", lambda v: v in OPTIMIZERS),
}


def train_problems(values: dict[str, object]) -> list[str]:
    """What is wrong with these training settings ("KEY must be ... (got V)"); the one check
    used by the run spec and by a client reading the plan it was sent."""
    found = []
    for key, (rule, ok) in _TRAIN_CHECKS.items():
        if key in values:
            try:
                good = bool(ok(values[key]))  # type: ignore[operator]
            except TypeError:
                good = False
            if not good:
                found.append(f"{key} {rule} (got {values[key]!r})")
    return found


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


StepFn = Callable[[int, dict[str, torch.Tensor]], torch.Tensor | float]
"""One step's forward and backward: given the step number and a batch, leave the gradients in
`.grad` and return the loss (a tensor to backpropagate is the caller's to backward, see `run_steps`)."""


def make_optimizer(params: list[torch.nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    """The local optimizer `config.optimizer` names, at the configured learning rate and weight decay."""
    if config.learning_rate is None:
        raise ConfigError("training.learning_rate is unset: resolve it with TrainConfig.for_method first")
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)


def run_steps(params: list[torch.nn.Parameter], batches: Callable[[int], dict[str, torch.Tensor]], config: TrainConfig,
              step_fn: StepFn, *, seed: int, label: str, steps: int | None = None,
              after_step: Callable[[int], None] | None = None,
              on_step: Callable[[int, float], None] | None = None,
              optimizer: torch.optim.Optimizer | None = None) -> TrainStats:
    """The one local training loop: `config.optimizer` over `params`, `steps` (default `config.local_steps`)
    steps of `step_fn`, gradient clipping, a finite-loss check, progress logging.

    The step is the plug: plain FL computes the loss on the whole model (`train_local`),
    split training exchanges activations with the split server (`train_split_local`), the
    client-cost benchmark times either. `after_step(step)` runs after each optimizer step
    (AdaLoRA's rank schedule); `on_step(step, seconds)` sees each step's wall time; a caller
    that must see the optimizer's state (the benchmark) passes its own `optimizer` over `params`.
    """
    steps = steps if steps is not None else config.local_steps
    if config.learning_rate is None or steps is None:
        raise ConfigError("training.learning_rate and the step count must be set: resolve the settings with "
                          "TrainConfig.for_method first")
    if optimizer is None:
        optimizer = make_optimizer(params, config)
    torch.manual_seed(seed)  # dropout masks: same seed, same local round, whatever ran before on this worker
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(1, steps + 1):
        batch = batches(step)
        began = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = step_fn(step, batch)
        value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
        if not math.isfinite(value):
            raise DataError(f"{label}: training loss became {value} at step {step}; lower the learning rate")
        if isinstance(loss, torch.Tensor):
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        if after_step is not None:
            after_step(step)
        optimizer.zero_grad(set_to_none=True)
        losses.append(value)
        if on_step is not None:
            on_step(step, time.perf_counter() - began)
        if step % config.log_every == 0 or step == steps:
            log.info("%s step %d/%d loss %.4f (%.1f s)", label, step, steps, value, time.perf_counter() - start)
    return TrainStats(steps=steps, first_loss=losses[0], last_loss=losses[-1], mean_loss=sum(losses) / len(losses),
                      seconds=time.perf_counter() - start)


def shuffled_batches(encoded: Sequence[object], collate: Callable[[list], dict[str, torch.Tensor]], batch_size: int,
                     seed: int) -> Callable[[int], dict[str, torch.Tensor]]:
    """Batches of `encoded` in a seeded order, reshuffled on each pass over the local data."""
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []

    def batch(_step: int) -> dict[str, torch.Tensor]:
        nonlocal order
        if len(order) < batch_size:
            order += torch.randperm(len(encoded), generator=generator).tolist()
        batch_idx, order = order[:batch_size], order[batch_size:]
        return collate([encoded[i] for i in batch_idx])

    return batch


def label_shift(labels: Sequence[int], num_labels: int, tau: float) -> torch.Tensor:
    """tau * log of the local label frequencies (add-one smoothed, so an absent label is rare, not impossible)."""
    counts = torch.bincount(torch.tensor(labels, dtype=torch.long), minlength=num_labels).double()
    return (tau * torch.log((counts + 1) / (counts.sum() + num_labels))).float()


def train_local(adapted: AdaptedModel, task: TaskSpec, rows: Sequence[Record], config: TrainConfig,
                seed: int, label: str = "client", proximal_mu: float = 0.0, step_offset: int = 0,
                drift: DriftCorrection | None = None) -> TrainStats:
    """Train `adapted`'s delta on `rows` in place; returns loss statistics.

    `step_offset` is the number of local steps of earlier rounds: methods with a
    step schedule (AdaLoRA) see the global step `step_offset + step`.

    With `proximal_mu > 0` (FedProx) the loss gets (mu/2)·||w - w_global||² over the
    delta's tensors, w_global being their values when training starts. With `drift`
    (SCAFFOLD) each optimizer step is followed by its drift correction.
    """
    if not rows:
        raise DataError(f"{label}: no local training data")
    if not (proximal_mu >= 0 and math.isfinite(proximal_mu)):
        raise ConfigError(f"{label}: proximal-mu must be a finite number >= 0, got {proximal_mu}")
    objective = objective_for(adapted.model, adapted.tokenizer, task, config.max_length)
    encoded = [objective.encode(r) for r in rows]
    if config.logit_adjustment > 0 and isinstance(objective, SequenceClassificationObjective):
        objective = dataclasses.replace(objective, label_shift=label_shift(
            [int(e["labels"]) for e in encoded], len(task.labels), config.logit_adjustment))
    params = adapted.trainable_parameters()
    anchors = [p.detach().clone() for p in params] if proximal_mu > 0 else []
    model = adapted.model

    def step_fn(_step: int, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        loss = objective.loss(model, batch)
        if anchors:
            loss = loss + 0.5 * proximal_mu * sum(((p - a) ** 2).sum() for p, a in zip(params, anchors, strict=True))
        return loss

    def after_step(step: int) -> None:
        if drift is not None:
            drift.after_step()
        adapted.method.after_optimizer_step(model, step_offset + step)

    model.train()
    adapted.method.begin_local_training(model)
    with gradient_checkpointing(model, config.gradient_checkpointing, what=f"method {adapted.method.name!r}"):
        return run_steps(params, shuffled_batches(encoded, objective.collate, config.batch_size, seed), config, step_fn,
                         seed=seed, label=label, steps=config.steps_for(len(encoded)),
                         after_step=after_step)
