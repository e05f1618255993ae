"""The federation plan: what the server tells every client about a run, as JSON.

Clients hold their own data and their own copy of the base model; the server dictates
which method and options to train (all deltas must share one shape), the task format
and the local optimization settings. The base model is identified by architecture
fingerprint, because local paths differ between machines.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from fedpeft.common.data.records import TaskSpec, task_problems
from fedpeft.common.errors import ConfigError, FedPeftError, UnknownMethodError
from fedpeft.common.methods import MethodConfig, get_method, make_config
from fedpeft.common.schema import field_problems, show

if TYPE_CHECKING:
    from fedpeft.client.training import TrainConfig

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
    """Split topology: {"cut", "u_shaped", "wire_dtype", "token"} (schema: `SplitEntry`); empty for plain FL
    (the delta is then the whole model's)."""

    def method_config(self) -> MethodConfig:
        return make_config(self.method, self.method_options)

    def task_spec(self) -> TaskSpec:
        return TaskSpec.from_dict(self.task)

    def train_config(self) -> TrainConfig:
        """The local optimization settings (the run spec's `[training]`, as `plan_fields` sent them)."""
        from fedpeft.client.training import TrainConfig

        return TrainConfig(**self.train)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> FederationPlan:
        """The plan a server sent, checked against the schema as a whole (`plan_problems`):
        a plan this returns builds its method config, task spec, train config and split
        settings; anything else raises one ConfigError listing every problem by its key."""
        try:
            data = json.loads(text)
        except (TypeError, ValueError, RecursionError) as exc:  # JSONDecodeError, ints past the digit limit, nesting
            raise ConfigError(f"malformed federation plan from server: not valid JSON ({exc})") from None
        found = plan_problems(data)
        if found:
            raise ConfigError("malformed federation plan from server: " + "; ".join(found))
        return cls(**data)


SEED_RANGE = (0, 2**32 - 1)
"""Seeds every seeded library takes (NumPy's bound; torch takes more)."""


@dataclass(frozen=True)
class SplitEntry:
    """Schema of the plan's `split` entry (the split topology's `plan_entry`)."""

    cut: int
    u_shaped: bool = False
    wire_dtype: str = "bfloat16"
    token: str | None = None
    """The split server's access token (absent when it has none)."""


def plan_problems(data: object) -> list[str]:
    """Everything wrong with a parsed federation plan, each problem named by its key
    ("plan.task.kind: missing", "plan.seed: expected an integer, got \"x\""); empty when valid.

    The schema is the one the server builds the plan from: FederationPlan's own fields, the
    task as `TaskSpec`, `train` as the run spec's `[training]` (`TrainConfig`'s fields and
    `train_problems`), the method options as the method's config (`make_config`), and the
    split entry as the split topology writes it."""
    from fedpeft.client.training import TrainConfig, train_problems

    found = field_problems(FederationPlan, data, "plan")
    if not isinstance(data, dict):
        return found
    bad = {p.split(":", 1)[0].removeprefix("plan.") for p in found}
    if "seed" not in bad and "seed" in data and not SEED_RANGE[0] <= data["seed"] <= SEED_RANGE[1]:
        found.append(f"plan.seed: must be an integer in [{SEED_RANGE[0]}, {SEED_RANGE[1]}] (got {show(data['seed'])})")
    if "method" not in bad and "method" in data:
        try:
            get_method(data["method"])
        except UnknownMethodError as exc:
            found.append(f"plan.method: {exc}")
        else:
            if "method_options" not in bad and "method_options" in data:
                try:
                    make_config(data["method"], data["method_options"])
                except FedPeftError as exc:
                    found.append(f"plan.method_options: {exc}")
    if "task" not in bad and "task" in data:
        found += task_problems(data["task"], "plan.task")
    if "train" not in bad and "train" in data:
        train = data["train"]
        typed = field_problems(TrainConfig, train, "plan.train")
        found += typed or [f"plan.train.{key}: {rule}" for key, rule in (p.split(" ", 1) for p in train_problems(train))]
        for key in ("learning_rate", "local_steps"):  # the server resolves both (TrainConfig.for_method)
            if not typed and train.get(key) is None:
                found.append(f"plan.train.{key}: missing (a plan carries the concrete value)")
    if "split" not in bad and data.get("split"):
        found += _split_problems(data["split"])
    return found


def _split_problems(split: dict[str, Any]) -> list[str]:
    """The split entry: typed as `SplitEntry`, the cut as `SplitConfig` takes it, a wire dtype the wire carries."""
    from fedpeft.common.model.split import SplitConfig
    from fedpeft.common.wire.split import wire_dtype

    found = field_problems(SplitEntry, split, "plan.split")
    if found:
        return found
    try:
        SplitConfig(cut=split["cut"], u_shaped=split.get("u_shaped", False))
    except FedPeftError as exc:
        found.append(f"plan.split.cut: {exc}")
    try:
        wire_dtype(split.get("wire_dtype", "bfloat16"))
    except FedPeftError as exc:
        found.append(f"plan.split.wire_dtype: {exc}")
    return found
