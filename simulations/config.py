"""The settings of one `peft-sim` run, validated together (all problems at once)."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedpeft.common.errors import ConfigError, FedPeftError
from fedpeft.common.methods import make_config
from fedpeft.common.models import DEFAULT_MODEL
from fedpeft.common.partition import PartitionSpec
from fedpeft.common.quantization import QUANTIZE_CHOICES, bitsandbytes_available


def default_quantize() -> str:
    return "4bit" if bitsandbytes_available() else "none"


@dataclass
class SimulationConfig:
    model: str = DEFAULT_MODEL
    method: str = "lora"
    method_options: dict[str, str] = field(default_factory=dict)
    clients: int = 4
    clients_per_round: int = 0
    """0 = every client every round."""
    rounds: int = 3
    local_steps: int = 8
    local_epochs: float = 0.0
    learning_rate: float = 2e-3
    batch_size: int = 8
    max_length: int = 128
    data: str | None = None
    eval_data: str | None = None
    task: str = "auto"
    template: str | None = None
    labels: str | None = None
    label_column: str = "label"
    partition: str = "iid"
    quantize: str = field(default_factory=default_quantize)
    out: str | None = None
    seed: int = 0
    train_limit: int = 0
    """0 = use every training row; else subsample this many (seeded)."""
    eval_limit: int = 200
    """Held-out rows scored each round (0 = all)."""
    builtin_train_rows: int = 800
    cpus_per_client: float = 1.0
    log_every: int = 4

    def problems(self) -> list[str]:
        """Everything wrong with this config (empty when valid)."""
        found = []
        positive = {"clients": self.clients, "rounds": self.rounds, "local_steps": self.local_steps,
                    "batch_size": self.batch_size, "max_length": self.max_length, "log_every": self.log_every,
                    "builtin_train_rows": self.builtin_train_rows}
        found += [f"--{k.replace('_', '-')} must be >= 1 (got {v})" for k, v in positive.items() if v < 1]
        if not 0 <= self.clients_per_round <= self.clients:
            found.append(f"--clients-per-round must be between 0 (all) and --clients={self.clients}")
        if self.learning_rate <= 0:
            found.append(f"--lr must be > 0 (got {self.learning_rate})")
        if self.local_epochs < 0 or self.train_limit < 0 or self.eval_limit < 0:
            found.append("--local-epochs, --train-limit and --eval-limit must be >= 0")
        if self.cpus_per_client <= 0:
            found.append("--cpus-per-client must be > 0")
        if self.quantize not in QUANTIZE_CHOICES:
            found.append(f"--quantize {self.quantize!r}: choose one of {list(QUANTIZE_CHOICES)}")
        elif self.quantize == "4bit" and not bitsandbytes_available():
            found.append("--quantize 4bit needs bitsandbytes, which cannot be imported here; use --quantize none")
        if self.eval_data and not self.data:
            found.append("--eval-data needs --data (the built-in task has its own held-out split)")
        for path in (self.data, self.eval_data):
            if path and not Path(path).is_file():
                found.append(f"data file {path} does not exist")
        for check in (lambda: make_config(self.method, self.method_options), lambda: PartitionSpec.parse(self.partition)):
            try:
                check()
            except FedPeftError as exc:
                found.append(str(exc))
        return found

    def validate(self) -> None:
        found = self.problems()
        if found:
            raise ConfigError("invalid simulation settings:\n  - " + "\n  - ".join(found))

    @property
    def num_per_round(self) -> int:
        return self.clients_per_round or self.clients

    def out_dir(self) -> Path:
        return Path(self.out or f"runs/sim-{time.strftime('%Y%m%d-%H%M%S')}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
