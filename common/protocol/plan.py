"""The federation plan: what the server tells every client about a run, as JSON.

Clients hold their own data and their own copy of the base model; the server dictates
which method and options to train (all deltas must share one shape), the task format
and the local optimization settings. The base model is identified by architecture
fingerprint, because local paths differ between machines.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from fedpeft.common.data.records import TaskSpec
from fedpeft.common.errors import ConfigError
from fedpeft.common.methods import MethodConfig, make_config

PLAN_KEY = "fedpeft-plan"
# The shape of a client's train reply (checked by the server before aggregation).
REPLY_ARRAYS_KEY = "arrays"
REPLY_METRICS_KEY = "metrics"
WEIGHT_KEY = "num-examples"
UNIT_WEIGHT_KEY = "unit-weight"
"""Always 1: the weight key of unweighted FedAvg (what DP's sensitivity bound assumes)."""
# Train-config entry with the LoRA rank the server assigned this client (heterogeneous
# ranks); absent when every client trains the plan's own rank.
RANK_KEY = "lora-rank"
# A query message asking a node which data partition it holds (answered from its node
# config's partition-id); per-client LoRA ranks are assigned by it.
QUERY_KEY = "fedpeft-query"
PARTITION_KEY = "partition-id"
TRAIN_METRIC_KEYS = frozenset({WEIGHT_KEY, UNIT_WEIGHT_KEY, "train-loss", "train-loss-last", "train-seconds", "load-seconds",
                               "swap-seconds", "bytes-up"})


@dataclass(frozen=True)
class FederationPlan:
    run_name: str
    model_fingerprint: str
    method: str
    method_options: dict[str, Any]
    task: dict[str, Any]
    train: dict[str, Any]
    seed: int
    frozen_fingerprint: str = ""
    """Hash of tensors every peer must share untrained (FFA-LoRA's A); "" if none."""
    split: dict[str, Any] = field(default_factory=dict)
    """Split topology: {"cut", "u_shaped", "wire_dtype"}; empty for plain FL (the delta is then the whole model's)."""

    def method_config(self) -> MethodConfig:
        return make_config(self.method, self.method_options)

    def task_spec(self) -> TaskSpec:
        return TaskSpec.from_dict(self.task)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> FederationPlan:
        try:
            data = json.loads(text)
            return cls(**data)
        except (json.JSONDecodeError, TypeError) as exc:
            raise ConfigError(f"malformed federation plan from server: {exc}") from exc
