"""The TOML run config of a deployed federation (`peft-server run --config run.toml`).

One file says everything the coordinator decides: model, method, rounds, sampling,
strategy, local training, the server's own held-out data, and the security settings
(SecAgg+, differential privacy, sealed envelopes). It is validated as a whole before
anything starts, and every problem is listed with its TOML key.

    [federation]
    model = "smollm2-135m-instruct"   # built-in name, .gguf file or HF dir on the server
    method = "lora"
    rounds = 3
    clients = 2                        # nodes that must be connected before round 1
    [federation.method_options]
    r = 8
    [training]
    local_steps = 8
    [secagg]
    enabled = true

Offsite-Tuning: `topology = "offsite"` in [federation], and an [offsite] section (bottom, top,
keep_every, distill_steps, distill_data, dtype, emulator = a dir made by `peft-server offsite-build`).
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedpeft.client.training import TrainConfig
from fedpeft.common.data.builtin_task import builtin_splits, builtin_task
from fedpeft.common.data.records import Record, TaskSpec, infer_task, parse_verbalizer, read_records
from fedpeft.common.errors import ConfigError, FedPeftError
from fedpeft.common.methods import make_config
from fedpeft.common.model.base_model import DEFAULT_MODEL
from fedpeft.common.model.quantization import QUANTIZE_CHOICES
from fedpeft.common.offsite.run import OFFSITE_METHODS, OffsiteSettings
from fedpeft.common.protocol.topology import DEFAULT_TOPOLOGY, validate_topology
from fedpeft.server.strategy import LORA_AGGREGATIONS, parse_strategy_options


@dataclass
class FederationSection:
    model: str = DEFAULT_MODEL
    method: str = "lora"
    method_options: dict[str, Any] = field(default_factory=dict)
    rounds: int = 3
    clients: int = 2
    """Connected nodes required before a round starts (Flower's min_available_nodes)."""
    clients_per_round: int = 0
    """0 = every connected client each round."""
    min_clients: int = 1
    """Fewest accepted updates a round may aggregate; fewer stops the run."""
    strategy: str = "fedavg"
    strategy_options: dict[str, Any] = field(default_factory=dict)
    lora_aggregation: str = "naive"
    clip_update_norm: float = 0.0
    quantize: str = "auto"
    seed: int = 0
    round_timeout: float = 3600.0
    topology: str = DEFAULT_TOPOLOGY
    """fl: clients hold `model`; offsite: clients hold the emulator of `model` ([offsite] section)
    and the server plugs the final adapter into `model`."""

    @property
    def num_per_round(self) -> int:
        return self.clients_per_round or self.clients


@dataclass
class TaskSection:
    eval_data: str | None = None
    """The server's own held-out file; none = the built-in ticket-routing task."""
    kind: str = "auto"
    template: str | None = None
    labels: str | None = None
    label_column: str = "label"
    eval_limit: int = 200


@dataclass
class SecAggSection:
    """Flower SecAgg+ settings (see `fedpeft.server.secagg`)."""

    enabled: bool = False
    num_shares: int = 3
    reconstruction_threshold: int = 2
    clipping_range: float = 8.0
    quantization_range: int = 4194304
    max_weight: float = 1000.0
    """Largest num-examples a client may report (SecAgg+ weights values by n / max_weight
    before quantizing, so a tight bound keeps the quantization error small)."""
    timeout: float = 600.0
    round_attempts: int = 5
    """Tries per round: a client dead before sharing its keys halts a SecAgg+ round."""
    retry_wait: float = 20.0


@dataclass
class DpSection:
    """Central DP with client-side fixed clipping (Flower's DP wrapper + fixedclipping_mod)."""

    enabled: bool = False
    noise_multiplier: float = 1.0
    clipping_norm: float = 1.0
    target_delta: float = 1e-5
    population: int = 0
    """Size of the client population the rounds sample from (0 = `federation.clients`)."""


@dataclass
class EnvelopeSection:
    """Signed, encrypted delta envelopes on top of TLS (plaintext aggregation only)."""

    enabled: bool = False
    server_identity: str | None = None
    """Directory with the server's identity keys (`peft-server keys`)."""
    trusted_clients: str | None = None
    """Directory of client `*.json` public keys allowed to send deltas."""


@dataclass
class RegistrySection:
    """Publish the global adapter to an adapter registry after every round (`peft-server serve` hot-loads it)."""

    enabled: bool = False
    dir: str | None = None
    """Registry directory (shared with the serving process)."""
    adapter_id: str | None = None
    """Adapter id in the registry (default: the run dir's name)."""
    keys: str | None = None
    """Registry identity dir (`peft-server keys`): versions are sealed at rest."""


@dataclass
class SplitSection:
    """Split fine-tuning (SplitFed): clients hold embeddings + the first `cut` blocks and train
    against one split server that the ServerApp starts beside the federation; FedAvg
    averages the client parts. On with `[federation] topology = "split"`; these are its settings."""

    enabled: bool = False
    cut: int = 2
    """Blocks on each client."""
    u_shaped: bool = False
    """Clients also hold the head and compute the loss: labels never leave them."""
    wire_dtype: str = "bfloat16"
    """Dtype of activations and gradients on the wire: float32 | float16 | bfloat16."""
    host: str = "127.0.0.1"
    """Split server bind address (clients dial it with peft-client start --split-server HOST:PORT)."""
    port: int = 9095
    tls_dir: str | None = None
    """Dir with ca.crt, server.pem, server.key (peft-server certs); required unless host is loopback."""


SECTIONS: dict[str, type] = {"federation": FederationSection, "training": TrainConfig, "task": TaskSection,
                             "secagg": SecAggSection, "dp": DpSection, "envelopes": EnvelopeSection,
                             "registry": RegistrySection, "offsite": OffsiteSettings,
                             "split": SplitSection}
DEPLOY_TOPOLOGIES: tuple[str, ...] = ("fl", "offsite", "split")
"""Topologies `peft-server run` deploys (a subset of `fedpeft.common.protocol.topology.TOPOLOGIES`)."""


@dataclass
class RunConfig:
    federation: FederationSection = field(default_factory=FederationSection)
    training: TrainConfig = field(default_factory=TrainConfig)
    task: TaskSection = field(default_factory=TaskSection)
    secagg: SecAggSection = field(default_factory=SecAggSection)
    dp: DpSection = field(default_factory=DpSection)
    envelopes: EnvelopeSection = field(default_factory=EnvelopeSection)
    registry: RegistrySection = field(default_factory=RegistrySection)
    offsite: OffsiteSettings = field(default_factory=OffsiteSettings)
    split: SplitSection = field(default_factory=SplitSection)
    source: str = "<defaults>"

    @classmethod
    def from_toml(cls, path: Path) -> RunConfig:
        """Read and validate a run config; relative paths are taken from the file's folder."""
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read run config {path}: {exc}") from exc
        config = cls.from_dict(data, source=str(path))
        base = path.resolve().parent
        relative = {"offsite": ("distill_data", "emulator")}
        for section, key in (("task", "eval_data"), ("envelopes", "server_identity"), ("envelopes", "trusted_clients"),
                             ("registry", "dir"), ("registry", "keys"), ("split", "tls_dir")):
            value = getattr(getattr(config, section), key)
            if value and not Path(value).is_absolute():
                setattr(getattr(config, section), key, str(base / value))
        for key in relative["offsite"]:  # OffsiteSettings is frozen: replace it
            value = getattr(config.offsite, key)
            if value and not Path(value).is_absolute():
                config.offsite = dataclasses.replace(config.offsite, **{key: str(base / value)})
        model = config.federation.model
        if (base / model).exists() and not Path(model).is_absolute():
            config.federation.model = str(base / model)
        config.validate()
        return config

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> RunConfig:
        found: list[str] = []
        unknown = sorted(set(data) - set(SECTIONS))
        if unknown:
            found.append(f"unknown section(s) {unknown}; valid sections are {sorted(SECTIONS)}")
        sections: dict[str, Any] = {}
        for name, section_cls in SECTIONS.items():
            values = data.get(name, {})
            if not isinstance(values, dict):
                found.append(f"[{name}] must be a table")
                continue
            names = {f.name for f in dataclasses.fields(section_cls)}
            bad = sorted(set(values) - names)
            if bad:
                found.append(f"[{name}]: unknown key(s) {bad}; valid keys are {sorted(names)}")
                continue
            hints = typing.get_type_hints(section_cls)
            wrong = [f"{name}.{key} = {value!r} is not {_describe(hints[key])}"
                     for key, value in values.items() if not _matches(value, hints[key])]
            if wrong:
                found += wrong
                continue
            try:
                sections[name] = section_cls(**values)
            except (TypeError, ValueError, FedPeftError) as exc:
                found.append(f"[{name}]: {exc}")
        if found:
            raise ConfigError(f"invalid run config {source}:\n  - " + "\n  - ".join(found))
        return cls(**sections, source=source)

    def problems(self) -> list[str]:
        """Everything wrong with the combination of settings (empty when valid)."""
        f, s, dp, env = self.federation, self.secagg, self.dp, self.envelopes
        found: list[str] = []
        for key in ("rounds", "clients", "min_clients"):
            if getattr(f, key) < 1:
                found.append(f"federation.{key} must be >= 1 (got {getattr(f, key)})")
        if not 0 <= f.clients_per_round <= f.clients:
            found.append(f"federation.clients_per_round must be between 0 (all) and clients={f.clients}")
        if f.min_clients > f.num_per_round:
            found.append(f"federation.min_clients {f.min_clients} exceeds the {f.num_per_round} clients sampled per round")
        if f.quantize not in (*QUANTIZE_CHOICES, "auto"):
            found.append(f"federation.quantize {f.quantize!r}: choose one of {[*QUANTIZE_CHOICES, 'auto']}")
        if f.lora_aggregation not in LORA_AGGREGATIONS:
            found.append(f"federation.lora_aggregation {f.lora_aggregation!r}: choose one of {list(LORA_AGGREGATIONS)}")
        if not (f.clip_update_norm >= 0 and math.isfinite(f.clip_update_norm)):
            found.append("federation.clip_update_norm must be a finite number >= 0")
        for check in (lambda: make_config(f.method, self.method_options()),
                      lambda: parse_strategy_options(f.strategy, {k: str(v) for k, v in f.strategy_options.items()})):
            try:
                check()
            except FedPeftError as exc:
                found.append(str(exc))
        try:
            validate_topology(f.topology, DEPLOY_TOPOLOGIES, where="federation.topology")
        except FedPeftError as exc:
            found.append(str(exc))
        if f.topology == "offsite":
            found += self.offsite.problems()
            if f.method not in OFFSITE_METHODS:
                found.append(f"federation.topology 'offsite' trains the adapter blocks with {list(OFFSITE_METHODS)}, "
                             f"not method {f.method!r}")
        if self.training.gradient_checkpointing:
            from fedpeft.common.training.activation_checkpointing import KV_PREFIX_REASON, refuses_checkpointing

            if refuses_checkpointing(f.method):
                found.append(f"training.gradient_checkpointing cannot train method {f.method!r}: {KV_PREFIX_REASON}")
        if self.task.eval_data and not Path(self.task.eval_data).is_file():
            found.append(f"task.eval_data: file {self.task.eval_data} does not exist")
        if s.enabled:
            from fedpeft.server.secagg import secagg_problems

            found += secagg_problems(s, f.num_per_round, f.min_clients)
            if f.strategy != "fedavg" or f.lora_aggregation not in ("naive", "ffa"):
                found.append("secagg: the server only sees the sum of deltas, so it needs strategy 'fedavg' with "
                             "lora_aggregation 'naive' or 'ffa' (robust and ΔW-space aggregation need each client's delta)")
            if f.clip_update_norm > 0:
                found.append("secagg: federation.clip_update_norm needs each client's delta; bound updates with "
                             "secagg.clipping_range or [dp] instead")
            if dp.enabled:
                found.append("secagg and dp cannot be combined yet: Flower's DP wrapper runs on the Message API, "
                             "SecAgg+ only on the legacy workflow")
            if env.enabled:
                found.append("secagg and envelopes exclude each other: with SecAgg+ the server never sees one client's delta")
        if dp.enabled:
            if not (dp.noise_multiplier >= 0 and math.isfinite(dp.noise_multiplier)):
                found.append("dp.noise_multiplier must be a finite number >= 0")
            if not dp.clipping_norm > 0:
                found.append("dp.clipping_norm must be > 0")
            if not 0 < dp.target_delta < 1:
                found.append("dp.target_delta must be in (0, 1)")
            if dp.population and dp.population < f.num_per_round:
                found.append(f"dp.population {dp.population} is smaller than the {f.num_per_round} clients per round")
            if f.strategy != "fedavg" or f.lora_aggregation != "naive":
                found.append("dp: Flower's accounted DP wrapper needs plain FedAvg (strategy 'fedavg', lora_aggregation 'naive')")
        if self.split.enabled and f.topology not in ("fl", "split"):
            found.append(f"split.enabled conflicts with federation.topology {f.topology!r}")
        if self.split_active:
            found += self.split_problems()
        if env.enabled:
            for key in ("server_identity", "trusted_clients"):
                value = getattr(env, key)
                if not value:
                    found.append(f"envelopes.{key} is required when envelopes are enabled")
                elif not Path(value).is_dir():
                    found.append(f"envelopes.{key}: directory {value} does not exist")
        if self.registry.enabled:
            if not self.registry.dir:
                found.append("registry.dir is required when the registry is enabled")
            if self.registry.keys and not Path(self.registry.keys).is_dir():
                found.append(f"registry.keys: directory {self.registry.keys} does not exist")
        return found

    @property
    def split_active(self) -> bool:
        """Split topology: `federation.topology = "split"` (or the older `[split] enabled = true`)."""
        return self.federation.topology == "split" or self.split.enabled

    def split_problems(self) -> list[str]:
        sp, f = self.split, self.federation
        found = []
        if sp.cut < 1:
            found.append(f"split.cut must be >= 1 (got {sp.cut})")
        if sp.wire_dtype not in ("float32", "float16", "bfloat16"):
            found.append(f"split.wire_dtype {sp.wire_dtype!r}: choose float32, float16 or bfloat16")
        if f.method != "lora" or f.lora_aggregation not in ("naive", "ffa"):
            found.append("split: both parts train LoRA (federation.method 'lora', lora_aggregation 'naive' or 'ffa')")
        if self.dp.enabled:
            found.append("split and dp cannot be combined: the split server sees every client's raw activations")
        if sp.tls_dir is None and sp.host not in ("127.0.0.1", "localhost", "::1"):
            found.append(f"split.tls_dir is required: split.host {sp.host!r} is not loopback")
        elif sp.tls_dir is not None and not Path(sp.tls_dir).is_dir():
            found.append(f"split.tls_dir: directory {sp.tls_dir} does not exist")
        return found

    def validate(self) -> None:
        found = self.problems()
        if found:
            raise ConfigError(f"invalid run config {self.source}:\n  - " + "\n  - ".join(found))

    def method_options(self) -> dict[str, str]:
        options = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in self.federation.method_options.items()}
        if self.federation.lora_aggregation == "ffa":
            options["freeze_a"] = "true"
        return options

    def to_dict(self) -> dict[str, Any]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}


def _matches(value: Any, hint: Any) -> bool:
    """Whether a TOML value has the field's declared type (TOML has real bools and ints:
    `enabled = "false"` or `num_shares = 3.0` are mistakes, not values to coerce)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    origin = typing.get_origin(hint) or hint
    return isinstance(value, origin) if isinstance(origin, type) else True


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint) if a is not type(None))
    origin = typing.get_origin(hint) or hint
    return {bool: "a boolean (true/false)", int: "an integer", float: "a number", str: "a string",
            dict: "a table"}.get(origin, str(hint))


def load_eval_task(task: TaskSection, seed: int) -> tuple[TaskSpec, list[Record]]:
    """The task spec and the server's held-out rows (the built-in task when no file is given)."""
    if task.eval_data is None:
        _, rows = builtin_splits(train_rows=1, eval_rows=max(task.eval_limit, 200), seed=seed)
        spec = builtin_task()
        if task.labels or task.template:
            spec = TaskSpec(kind="classification", template=task.template or spec.template,
                            verbalizer=parse_verbalizer(task.labels) if task.labels else spec.verbalizer)
    else:
        rows = read_records(Path(task.eval_data))
        spec = infer_task(rows, kind=task.kind, template=task.template, labels=task.labels, label_column=task.label_column)
    if task.eval_limit and len(rows) > task.eval_limit:
        rows = rows[: task.eval_limit]
    spec.check_rows(rows, task.eval_data or "built-in held-out data")
    return spec, rows
