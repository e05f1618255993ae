"""The run spec: one typed, sectioned description of a federation, for every driver.

`peft-sim` (Flower's Simulation Engine) and `peft-server run` (Flower's deployment
engine) both run a `RunSpec`: read from TOML (`--config run.toml`), overridden field by
field by `peft-sim`'s flags (`fedpeft.server.federation.flags`, one table), validated
here as a whole (every problem at once, each named by its key), and turned into a
federation by `fedpeft.server.federation.assembly`. A setting one driver cannot honour
is refused here, for that driver, instead of being ignored.

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

Sections: federation, training, task, robust, simulation, secagg, dp, envelopes, registry,
offsite, split, compression (see the README's "Run spec" table).
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedpeft.client.training import TrainConfig, train_problems
from fedpeft.common.data.partition import PartitionSpec
from fedpeft.common.errors import ConfigError, FedPeftError
from fedpeft.common.methods import MethodConfig, make_config
from fedpeft.common.methods.lora import LoraMethodConfig
from fedpeft.common.model.base_model import DEFAULT_MODEL
from fedpeft.common.model.quantization import QUANTIZE_CHOICES, bitsandbytes_available
from fedpeft.common.model.split import MAX_ABS_ACTIVATION
from fedpeft.common.offsite.run import OffsiteSettings
from fedpeft.common.protocol.plan import SEED_RANGE
from fedpeft.common.protocol.topology import DEFAULT_TOPOLOGY, TOPOLOGIES, validate_topology
from fedpeft.common.schema import describe, matches
from fedpeft.server.hetero_strategy import HETERO_MODES, HeteroRanks
from fedpeft.server.rate_schedule import CONSTANT, SERVER_LR_SCHEDULES
from fedpeft.server.robust import RobustSettings
from fedpeft.server.strategy import (
    ADAPTIVE_SERVER_STRATEGIES,
    LORA_AGGREGATIONS,
    ROBUST_AGGREGATORS,
    parse_strategy_options,
)

Driver = typing.Literal["simulation", "deployment"]
DRIVERS: tuple[str, ...] = ("simulation", "deployment")
SPLIT_WIRE_DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


LOCAL, SERVER_ADAM = "local", "server-adam"
RECIPES: tuple[str, ...] = (LOCAL, SERVER_ADAM)
"""`federation.recipe` values."""
SERVER_ADAM_TAU = 1e-8
"""server-adam's default `tau` (Adam's epsilon). Flower's default 1e-3 is larger than a PEFT
pseudo-gradient's typical coordinate (a clipped gradient of norm <= 1 over ~10^5 values is
~10^-3), which would shrink every server step several-fold."""


@dataclass
class FederationSection:
    model: str = DEFAULT_MODEL
    method: str = "lora"
    method_options: dict[str, Any] = field(default_factory=dict)
    rounds: int = 3
    clients: int = 4
    """Clients in the federation: virtual clients (simulation); nodes that must be connected
    before round 1 (deployment, Flower's min_available_nodes)."""
    clients_per_round: int = 0
    """0 = every client each round."""
    min_clients: int = 1
    """Fewest accepted updates a round may aggregate; fewer stops the run."""
    strategy: str = "fedavg"
    strategy_options: dict[str, Any] = field(default_factory=dict)
    recipe: str = LOCAL
    """How clients and server share the optimization (`RECIPES`). local: each client takes
    `training.local_steps` steps of its own optimizer and the strategy averages the deltas
    (FedAvg). server-adam: each client takes one plain SGD step (its clipped gradient at the
    global adapter) and the server applies Adam at the method's rate (FedAdam over FedSGD):
    Adam over every client's batch at once, so label-skewed clients cannot drift apart; it
    needs about as many rounds as centralized Adam needs steps."""
    server_lr_schedule: str = CONSTANT
    """The server optimizer's rate over rounds (`SERVER_LR_SCHEDULES`): constant (Flower's
    FedOpt) or cosine (from `eta` in round 1 toward 0 at the last round, so the final adapter
    is not a noisy step off the plateau). Needs an adaptive server strategy (FedAdam, FedYogi,
    FedAdagrad; the server-adam recipe runs FedAdam)."""
    lora_aggregation: str = "naive"
    """naive (average A and B: FedIT) | svd (exact ΔW mean, re-factored) | ffa (A frozen) |
    hetlora (per-client ranks, zero-padded factors averaged) | flexlora (per-client ranks,
    exact ΔW mean, SVD to each client's rank)."""
    client_ranks: list[int] = field(default_factory=list)
    """hetlora/flexlora: LoRA ranks cycled over the clients in the order of the partition id
    they declare (empty: all at the method's r)."""
    clip_update_norm: float = 0.0
    scaffold: bool = False
    """SCAFFOLD drift correction: the server's control variate travels with the global delta
    (doubling the download), each client corrects its local steps by it; the server derives
    each client's control variate change from its validated delta. With FedAvg-family
    strategies and naive/ffa LoRA aggregation; not with SecAgg+, DP, envelopes, the split
    topology or AdaLoRA; not resumable."""
    quantize: str = "auto"
    """4bit | none | auto: the coordinator's backbone and, in a simulation, every virtual client's.
    A deployed client holds its own backbone and picks its precision itself (`peft-client start
    --quantize`): only the delta's shape must agree, and the plan's fingerprint checks the model."""
    seed: int = 0
    round_timeout: float = 3600.0
    topology: str = DEFAULT_TOPOLOGY
    """fl: clients hold `model`; offsite: clients hold an emulator of `model` ([offsite]) and the
    server plugs the final adapter into `model`; split: clients hold the first `split.cut` blocks."""

    @property
    def strategy_option_text(self) -> dict[str, str]:
        """`strategy_options` as `--strategy-opt` text, the form `parse_strategy_options` reads."""
        return {k: str(v) for k, v in self.strategy_options.items()}

    @property
    def server_strategy(self) -> str:
        """The strategy the server runs: `strategy`, but FedAdam where the server-adam recipe
        meets the default FedAvg (server-adam cannot average)."""
        return "fedadam" if self.recipe == SERVER_ADAM and self.strategy == "fedavg" else self.strategy

    @property
    def num_per_round(self) -> int:
        return self.clients_per_round or self.clients


@dataclass
class TaskSection:
    eval_data: str | None = None
    """The server's held-out file; none = the built-in task's held-out split (or, with
    `train_data`, a seeded 10% of it)."""
    kind: str = "auto"
    template: str | None = None
    labels: str | None = None
    label_column: str = "label"
    eval_limit: int = 200
    """Held-out rows scored each round (0 = all)."""
    eval_every: int = 1
    """Score the held-out rows every this many rounds; rounds 0 and the last are always
    scored. Above 1 a long run (server-adam's hundreds of rounds) spends its time training."""
    train_data: str | None = None
    """Simulation: the training file the driver partitions over the virtual clients
    (none = the built-in task). Deployed clients hold their own data (`peft-client --data`)."""
    partition: str = "iid"
    """Simulation: iid | dirichlet:ALPHA | natural:COLUMN."""
    train_limit: int = 0
    """Simulation: subsample this many training rows (seeded; 0 = all)."""
    builtin_train_rows: int = 800
    """Simulation: rows generated for the built-in task's training split."""


@dataclass
class SimulationSection:
    """Flower Simulation Engine resources (simulation only)."""

    cpus_per_client: float = 1.0
    gpus_per_client: float = 0.0
    """Ray GPU share per virtual client; 0 keeps clients on the CPU (Ray hides GPUs)."""


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
class CompressionSection:
    """Codecs for the deltas on the wire (`fedpeft.common.codecs`): none | fp32 | fp16 | bf16 |
    int8 | nf4 | fp4 | topk:F[+CODEC]."""

    upload: str = "none"
    """Each client's update (its trained delta minus the global delta it received)."""
    download: str = "none"
    """The global delta the server broadcasts (dense codecs only: every client needs all of it)."""
    error_feedback: bool = True
    """Clients keep what a lossy upload codec dropped and add it to their next update."""
    stochastic_rounding: bool = True
    """int8 and 4-bit upload codes round stochastically (unbiased), seeded by run, node and round."""


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
    against one split server started beside the federation; FedAvg averages the client
    parts. On with `[federation] topology = "split"`; these are its settings."""

    enabled: bool = False
    """Older spelling of `federation.topology = "split"`."""
    cut: int = 2
    """Blocks on each client."""
    u_shaped: bool = False
    """Clients also hold the head and compute the loss: labels never leave them."""
    wire_dtype: str = "bfloat16"
    """Dtype of activations and gradients on the wire: float32 | float16 | bfloat16."""
    max_abs_activation: float = MAX_ABS_ACTIVATION
    """The split server refuses a client step whose activations or gradients exceed this
    absolute value (0 = off; non-finite values are always refused)."""
    host: str = "127.0.0.1"
    """Split server bind address (deployed clients dial it with peft-client start --split-server HOST:PORT);
    a simulation's clients run on this machine, so there it must be loopback."""
    port: int | None = None
    """Split server port; none: 9095 in a deployment, a free port in a simulation."""
    tls_dir: str | None = None
    """Dir with ca.crt, server.pem, server.key (peft-server certs). None: in a deployment, no TLS (allowed on
    loopback only); in a simulation, run-local dev certificates."""


SECTIONS: dict[str, type] = {"federation": FederationSection, "training": TrainConfig, "task": TaskSection,
                             "robust": RobustSettings,
                             "simulation": SimulationSection, "secagg": SecAggSection, "dp": DpSection,
                             "envelopes": EnvelopeSection, "registry": RegistrySection, "offsite": OffsiteSettings,
                             "split": SplitSection, "compression": CompressionSection}
# Settings only one driver can honour: the other refuses them when they differ from the default.
SIMULATION_ONLY: tuple[str, ...] = ("task.train_data", "task.partition", "task.train_limit", "task.builtin_train_rows",
                                    "simulation.cpus_per_client", "simulation.gpus_per_client")
DEPLOYMENT_ONLY: tuple[str, ...] = ("secagg.enabled", "envelopes.enabled")
DEFAULT_SPLIT_PORT = 9095
MAX_EVAL_EVERY = 1_000_000
MAX_ROWS = {"train_limit": 100_000_000, "eval_limit": 1_000_000, "builtin_train_rows": 1_000_000}
"""Largest row counts a spec may name: bigger numbers are typos that would hang a loader (the
built-in task generates max(eval_limit, 200) held-out rows; every round scores eval_limit rows)."""
TASK_KINDS: tuple[str, ...] = ("auto", "instruction", "classification")
_WHY_NOT = {
    "deployment": "is a simulation setting: deployed clients hold their own data and hardware (peft-client start --data)",
    "simulation": "is a deployment setting: peft-sim runs every client in this process's Flower simulation "
                  "(SecAgg+ and sealed envelopes need the deployment's per-client keys)",
}
_RELATIVE_PATHS = (("task", "eval_data"), ("task", "train_data"), ("envelopes", "server_identity"),
                   ("envelopes", "trusted_clients"), ("registry", "dir"), ("registry", "keys"), ("split", "tls_dir"),
                   ("offsite", "distill_data"), ("offsite", "emulator"))


@dataclass
class RunSpec:
    """A whole federation: what `peft-sim` and `peft-server run` both run."""

    federation: FederationSection = field(default_factory=FederationSection)
    training: TrainConfig = field(default_factory=TrainConfig)
    task: TaskSection = field(default_factory=TaskSection)
    robust: RobustSettings = field(default_factory=RobustSettings)
    simulation: SimulationSection = field(default_factory=SimulationSection)
    secagg: SecAggSection = field(default_factory=SecAggSection)
    dp: DpSection = field(default_factory=DpSection)
    envelopes: EnvelopeSection = field(default_factory=EnvelopeSection)
    registry: RegistrySection = field(default_factory=RegistrySection)
    offsite: OffsiteSettings = field(default_factory=OffsiteSettings)
    split: SplitSection = field(default_factory=SplitSection)
    compression: CompressionSection = field(default_factory=CompressionSection)
    source: str = "<defaults>"

    # ---- reading -----------------------------------------------------------------------------
    @classmethod
    def from_toml(cls, path: Path, driver: Driver | None = None,
                  overrides: dict[str, Any] | None = None) -> RunSpec:
        """Read a spec file (relative paths are taken from its folder), apply `overrides`
        ({"section.key": value}) and validate it for `driver` (None: structure only)."""
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read run config {path}: {exc}") from exc
        base = path.resolve().parent
        for section, key in _RELATIVE_PATHS:
            value = data.get(section, {}).get(key) if isinstance(data.get(section), dict) else None
            if isinstance(value, str) and value and not Path(value).is_absolute():
                data[section][key] = str(base / value)
        model = data.get("federation", {}).get("model") if isinstance(data.get("federation"), dict) else None
        if isinstance(model, str) and not Path(model).is_absolute() and (base / model).exists():
            data["federation"]["model"] = str(base / model)
        return cls.from_dict(_apply(data, overrides or {}), source=str(path), driver=driver)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>", driver: Driver | None = None) -> RunSpec:
        """Build and type-check every section; with `driver`, also validate the combination.
        Every problem found is reported in one `ConfigError`."""
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
            wrong = [f"{name}.{key} = {value!r} is not {describe(hints[key])}"
                     for key, value in values.items() if not matches(value, hints[key])]
            if wrong:
                found += wrong
                continue
            if section_cls is TrainConfig:
                invalid = train_problems(values)
                if invalid:  # reported with the others; the defaults stand in so the rest is still checked
                    found += [f"training.{p}" for p in invalid]
                    values = {k: v for k, v in values.items() if not any(p.startswith(f"{k} ") for p in invalid)}
            try:
                sections[name] = section_cls(**values)
            except (TypeError, ValueError, FedPeftError) as exc:
                found.append(f"[{name}]: {exc}")
        spec = cls(**sections, source=source)
        if driver is not None and not any(p.startswith(("unknown section", "[")) for p in found):
            found += spec.problems(driver)
        if found:
            raise ConfigError(f"invalid run config {source}:\n  - " + "\n  - ".join(found))
        return spec

    def with_overrides(self, overrides: dict[str, Any], driver: Driver | None = None) -> RunSpec:
        """This spec with some fields replaced ({"section.key": value}), checked again."""
        return RunSpec.from_dict(_apply(self.to_dict(), overrides), source=self.source, driver=driver)

    def to_dict(self) -> dict[str, Any]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    def train_config(self) -> TrainConfig:
        """`[training]` as clients run it: an unset learning rate or step count is the method's
        federated default (for this model: encoders get a fresh classification head)."""
        if self.federation.recipe == SERVER_ADAM:  # one plain SGD step: the client sends its clipped gradient
            t = self.training
            return dataclasses.replace(t, optimizer="sgd", learning_rate=1.0 if t.learning_rate is None else t.learning_rate,
                                       local_steps=1 if t.local_steps is None else t.local_steps)
        return self.training.for_method(self.federation.method, fresh_head=self._fresh_head())

    def _fresh_head(self) -> bool:
        from fedpeft.common.model.base_model import source_kind

        return source_kind(self.federation.model) == "seq-cls"

    def method_learning_rate(self) -> float:
        """The method's federated default rate for this model (a fresh classification head or not),
        whatever `training.learning_rate` says: server-adam's server rate."""
        rate = TrainConfig().for_method(self.federation.method, fresh_head=self._fresh_head()).learning_rate
        assert rate is not None
        return rate

    def server_strategy_options(self) -> dict[str, str]:
        """`federation.strategy_options` as the server runs them: under server-adam, Adam's
        rate `eta` defaults to the method's federated learning rate (the rate its clients'
        AdamW would take under the local recipe) and `tau` to `SERVER_ADAM_TAU`."""
        f = self.federation
        if f.recipe != SERVER_ADAM or f.server_strategy not in ADAPTIVE_SERVER_STRATEGIES:  # the latter is refused
            return f.strategy_option_text
        return {"eta": repr(self.method_learning_rate()), "tau": repr(SERVER_ADAM_TAU), **f.strategy_option_text}

    def centralized_train_config(self) -> TrainConfig:
        """What centralized training comparable to this federation runs (peft-bench's baseline):
        the clients' settings, but under server-adam AdamW at the server's rate `eta` (what
        the server's Adam does with every client's batch)."""
        config = self.train_config()
        if self.federation.recipe != SERVER_ADAM:
            return config
        eta = float(self.server_strategy_options()["eta"])
        return dataclasses.replace(config, optimizer="adamw", learning_rate=eta)

    def get(self, key: str) -> Any:
        """The value of a dotted key, e.g. "training.learning_rate"."""
        section, name = key.split(".", 1)
        return getattr(getattr(self, section), name)

    # ---- validation: the one place ---------------------------------------------------------
    def validate(self, driver: Driver) -> None:
        found = self.problems(driver)
        if found:
            raise ConfigError(f"invalid run config {self.source}:\n  - " + "\n  - ".join(found))

    def problems(self, driver: Driver) -> list[str]:
        """Everything wrong with running this spec on `driver` (empty when valid), each
        problem naming its key. Both drivers call this; nothing is checked anywhere else."""
        if driver not in DRIVERS:
            raise ConfigError(f"unknown driver {driver!r}")
        f, task, s, dp, env = self.federation, self.task, self.secagg, self.dp, self.envelopes
        found: list[str] = []
        defaults = RunSpec()
        other_only = SIMULATION_ONLY if driver == "deployment" else DEPLOYMENT_ONLY
        found += [f"{key} {_WHY_NOT[driver]}" for key in other_only if self.get(key) != defaults.get(key)]
        for key in ("rounds", "clients", "min_clients"):
            if getattr(f, key) < 1:
                found.append(f"federation.{key} must be >= 1 (got {getattr(f, key)})")
        if not SEED_RANGE[0] <= f.seed <= SEED_RANGE[1]:
            found.append(f"federation.seed must be an integer in [{SEED_RANGE[0]}, {SEED_RANGE[1]}] (got {f.seed})")
        if not 0 <= f.clients_per_round <= f.clients:
            found.append(f"federation.clients_per_round must be between 0 (all) and clients={f.clients}")
        if f.min_clients > f.num_per_round:
            found.append(f"federation.min_clients {f.min_clients} exceeds the {f.num_per_round} clients sampled per round")
        if f.quantize not in (*QUANTIZE_CHOICES, "auto"):
            found.append(f"federation.quantize {f.quantize!r}: choose one of {[*QUANTIZE_CHOICES, 'auto']}")
        elif f.quantize == "4bit" and not bitsandbytes_available():
            found.append("federation.quantize '4bit' needs bitsandbytes, which cannot be imported here; use 'none'")
        if not (f.clip_update_norm >= 0 and math.isfinite(f.clip_update_norm)):
            found.append(f"federation.clip_update_norm must be a finite number >= 0 (got {f.clip_update_norm})")
        if not (f.round_timeout > 0 and math.isfinite(f.round_timeout)):
            found.append(f"federation.round_timeout must be a finite number > 0 (got {f.round_timeout})")
        found += self._aggregation_problems()
        found += self.robust.problems()
        for check in (lambda: make_config(f.method, self.method_options()),
                      lambda: self._ranks_valid() and self.hetero_ranks(),
                      lambda: PartitionSpec.parse(task.partition),
                      lambda: parse_strategy_options(f.server_strategy, self.server_strategy_options())):
            try:
                check()
            except FedPeftError as exc:
                found.append(str(exc))
        found += self._task_problems(driver)
        if not 0 <= self.simulation.gpus_per_client < math.inf:
            found.append(f"simulation.gpus_per_client must be a finite number >= 0 (got {self.simulation.gpus_per_client})")
        if not 0 < self.simulation.cpus_per_client < math.inf:
            found.append(f"simulation.cpus_per_client must be a finite number > 0 (got {self.simulation.cpus_per_client})")
        found += self._switched_off_problems(defaults)
        if f.recipe == SERVER_ADAM:
            if self.training.local_epochs > 0:
                found.append("training.local_epochs: federation.recipe 'server-adam' counts one local step a round "
                             "(local_epochs would take whole epochs of SGD at the recipe's rate 1); set local_steps")
            elif (self.training.local_steps or 1) > 1 and self.training.learning_rate is None:
                found.append("training.local_steps > 1 under federation.recipe 'server-adam' needs training.learning_rate "
                             "(the recipe's rate 1 is one gradient step, not a local trajectory)")
            if f.method == "adalora":  # measured, README "Label skew": 0.514 against 0.818 centrally on SST-2
                found.append("federation.method 'adalora' does not learn under federation.recipe 'server-adam': every "
                             "client prunes its ranks from one step's importance and the zeros it writes enter the delta "
                             "the server's Adam takes for a gradient; use recipe 'local'")
        elif self.training.optimizer != "adamw" and self.training.learning_rate is None:
            found.append(f"training.optimizer {self.training.optimizer!r} needs training.learning_rate: the methods' "
                         "federated default rates are AdamW rates")
        if self.training.gradient_checkpointing:
            from fedpeft.common.training.activation_checkpointing import KV_PREFIX_REASON, refuses_checkpointing

            if refuses_checkpointing(f.method):
                found.append(f"training.gradient_checkpointing cannot train method {f.method!r}: {KV_PREFIX_REASON}")
        try:
            validate_topology(f.topology, TOPOLOGIES, where="federation.topology")
        except FedPeftError as exc:
            found.append(str(exc))
        else:
            from fedpeft.server.federation.topologies import topology_for

            if self.split.enabled and f.topology not in ("fl", "split"):
                found.append(f"split.enabled conflicts with federation.topology {f.topology!r}")
            found += topology_for(self.topology).refusals(self, driver)
        if s.enabled:
            from fedpeft.server.secagg import secagg_problems

            found += secagg_problems(s, f.num_per_round, f.min_clients)
            if f.server_strategy != "fedavg" or f.lora_aggregation not in ("naive", "ffa"):
                found.append("secagg: the server only sees the sum of deltas, so it needs strategy 'fedavg' "
                             "(recipe 'local') with lora_aggregation 'naive' or 'ffa' (robust and ΔW-space "
                             "aggregation need each client's delta)")
            if f.clip_update_norm > 0:
                found.append("secagg: federation.clip_update_norm needs each client's delta; bound updates with "
                             "secagg.clipping_range or [dp] instead")
            changed = [k for k, v in dataclasses.asdict(self.robust).items()
                       if v != getattr(defaults.robust, k)]
            if changed:
                found.append(f"secagg: robust.{', robust.'.join(changed)} need each client's delta, which SecAgg+ hides "
                             "(it bounds every value by secagg.clipping_range and every weight by secagg.max_weight)")
            if dp.enabled:
                found.append("secagg and dp cannot be combined yet: Flower's DP wrapper runs on the Message API, "
                             "SecAgg+ only on the legacy workflow")
            if env.enabled:
                found.append("secagg and envelopes exclude each other: with SecAgg+ the server never sees one client's delta")
        if dp.enabled:
            if not (dp.noise_multiplier >= 0 and math.isfinite(dp.noise_multiplier)):
                found.append("dp.noise_multiplier must be a finite number >= 0")
            if not (dp.clipping_norm > 0 and math.isfinite(dp.clipping_norm)):
                found.append("dp.clipping_norm must be a finite number > 0")
            if not 0 < dp.target_delta < 1:
                found.append("dp.target_delta must be in (0, 1)")
            if dp.population and dp.population < f.num_per_round:
                found.append(f"dp.population {dp.population} is smaller than the {f.num_per_round} clients per round")
            if f.server_strategy != "fedavg" or f.lora_aggregation != "naive":
                found.append("dp: Flower's accounted DP wrapper needs plain FedAvg (strategy 'fedavg', recipe 'local', "
                             "lora_aggregation 'naive')")
        if env.enabled:
            for key in ("server_identity", "trusted_clients"):
                value = getattr(env, key)
                if not value:
                    found.append(f"envelopes.{key} is required when envelopes are enabled")
                elif not Path(value).is_dir():
                    found.append(f"envelopes.{key}: directory {value} does not exist")
        found += self._registry_problems()
        found += self._compression_problems()
        return found

    def _compression_problems(self) -> list[str]:
        """Codecs that parse, and only where the deltas they compress are what the server aggregates."""
        from fedpeft.common.codecs import Codec, CodecError

        c, found = self.compression, []
        for key in ("upload", "download"):
            name = getattr(c, key)
            if name != "none":
                try:
                    codec = Codec.parse(name, f"compression.{key}")
                except CodecError as exc:
                    found.append(str(exc))
                    continue
                if key == "download" and codec.topk is not None:
                    found.append(f"compression.download {name!r}: the broadcast is the whole global delta, which every "
                                 "client needs; top-k sparsifies updates (use it for compression.upload)")
        if c.upload == "none":  # settings of the upload codec would be ignored: refuse them instead
            defaults = CompressionSection()
            found += [f"compression.{k} is set, but would be ignored without compression.upload"
                      for k in ("error_feedback", "stochastic_rounding") if getattr(c, k) != getattr(defaults, k)]
        if c.upload == "none" and c.download == "none":
            return found
        why = {
            "secagg.enabled": self.secagg.enabled and "SecAgg+ masks each client's quantized delta itself; a codec "
                                                      "would change what the masks sum over",
            "federation.topology": self.topology == "split" and "split clients train against the split server",
            "federation.scaffold": self.federation.scaffold and "not tested together yet",
        }
        found += [f"compression cannot run with {key} = {self.topology if key == 'federation.topology' else self.get(key)!r}: "
                  f"{reason}" for key, reason in why.items() if reason]
        return found

    def _scaffold_problems(self) -> list[str]:
        """What SCAFFOLD cannot run with: its control variates are means over each client's
        own change, sent beside the delta in plaintext."""
        f = self.federation
        if not f.scaffold:
            return []
        why = {
            "secagg.enabled": self.secagg.enabled and "SecAgg+ masks only the delta; the control variate changes "
                                                      "would reach the server unmasked",
            "dp.enabled": self.dp.enabled and "the control variate changes are unclipped, un-noised local gradient "
                                              "information that DP's accounting does not cover",
            "envelopes.enabled": self.envelopes.enabled and "not tested together yet",
            "federation.topology": self.topology == "split" and "split clients train against the split server, "
                                                              "not a local delta",
            "federation.strategy": f.strategy in ROBUST_AGGREGATORS and (
                f"{f.strategy!r} picks or trims updates, but the control variate is a plain mean a single "
                "client could steer"),
            "federation.lora_aggregation": f.lora_aggregation not in ("naive", "ffa") and (
                f"{f.lora_aggregation!r} does not average the trained tensors themselves"),
            "federation.method": f.method == "adalora" and (
                "AdaLoRA prunes singular values between steps, which the mean step would count as drift"),
        }
        return [f"federation.scaffold cannot run with "
                f"{key} = {self.topology if key == 'federation.topology' else self.get(key)!r}: {reason}"
                for key, reason in why.items() if reason]

    def _ranks_valid(self) -> bool:
        ranks = self.federation.client_ranks
        return all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in ranks)

    def _switched_off_problems(self, defaults: RunSpec) -> list[str]:
        """Settings of a section or topology that is off would be ignored: refuse them instead."""
        off: list[tuple[str, str]] = []
        topology = self.topology
        if topology != "split":
            off.append(("split", 'federation.topology = "split"'))
        if topology != "offsite":
            off.append(("offsite", 'federation.topology = "offsite"'))
        for section in ("dp", "secagg", "envelopes"):
            if not getattr(self, section).enabled:
                off.append((section, f"{section}.enabled = true"))
        found = []
        for section, switch in off:
            values, default = dataclasses.asdict(getattr(self, section)), dataclasses.asdict(getattr(defaults, section))
            changed = [k for k in values if k != "enabled" and values[k] != default[k]]
            found += [f"{section}.{k} is set, but would be ignored without {switch}" for k in changed]
        return found

    def _aggregation_problems(self) -> list[str]:
        f = self.federation
        found = self._scaffold_problems()
        if f.recipe not in RECIPES:
            found.append(f"federation.recipe {f.recipe!r}: choose one of {list(RECIPES)}")
        elif f.recipe == SERVER_ADAM and f.server_strategy not in ADAPTIVE_SERVER_STRATEGIES:
            found.append(f"federation.recipe 'server-adam' runs an adaptive server optimizer "
                         f"({', '.join(ADAPTIVE_SERVER_STRATEGIES)}); federation.strategy {f.strategy!r} conflicts")
        if f.server_lr_schedule not in SERVER_LR_SCHEDULES:
            found.append(f"federation.server_lr_schedule {f.server_lr_schedule!r}: choose one of "
                         f"{list(SERVER_LR_SCHEDULES)}")
        elif f.server_lr_schedule != CONSTANT and f.server_strategy not in ADAPTIVE_SERVER_STRATEGIES:
            found.append(f"federation.server_lr_schedule {f.server_lr_schedule!r} schedules an adaptive server "
                         f"optimizer's eta ({', '.join(ADAPTIVE_SERVER_STRATEGIES)}, or recipe 'server-adam'); "
                         f"federation.strategy {f.server_strategy!r} has none")
        if f.strategy in ("krum", "multikrum"):
            try:  # the options as the strategy will take them (`--strategy-opt` values are strings)
                malicious = parse_strategy_options(f.strategy, f.strategy_option_text).get("num_malicious_nodes", 0)
            except ConfigError:
                malicious = 0  # reported where the options are validated
            if f.num_per_round <= 2 * malicious + 2:
                found.append(f"federation.strategy {f.strategy!r} tolerates num_malicious_nodes={malicious} only with "
                             f"more than {2 * malicious + 2} clients per round (got {f.num_per_round})")
        if f.lora_aggregation not in LORA_AGGREGATIONS:
            found.append(f"federation.lora_aggregation {f.lora_aggregation!r}: choose one of {list(LORA_AGGREGATIONS)}")
        elif f.lora_aggregation != "naive" and f.method != "lora":
            found.append(f"federation.lora_aggregation {f.lora_aggregation!r} needs method 'lora' (got {f.method!r})")
        elif f.lora_aggregation in ("svd", *HETERO_MODES) and f.server_strategy != "fedavg":
            found.append(f"federation.lora_aggregation {f.lora_aggregation!r} replaces FedAvg's averaging; "
                         "it needs strategy 'fedavg' and recipe 'local'")
        if f.client_ranks:
            if f.lora_aggregation not in HETERO_MODES:
                found.append(f"federation.client_ranks needs lora_aggregation {' or '.join(HETERO_MODES)}")
            if any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in f.client_ranks):
                found.append(f"federation.client_ranks must be integers >= 1 (got {f.client_ranks})")
            elif "r" in f.method_options and str(f.method_options["r"]) != str(max(f.client_ranks)):
                found.append(f"federation.method_options r={f.method_options['r']} conflicts with client_ranks: the "
                             f"global rank is their maximum, {max(f.client_ranks)} (leave r out)")
        return found

    def _task_problems(self, driver: Driver) -> list[str]:
        task = self.task
        found = []
        if task.kind not in TASK_KINDS:
            found.append(f"task.kind {task.kind!r}: choose one of {list(TASK_KINDS)}")
        if driver == "simulation" and task.eval_data and not task.train_data:
            found.append("task.eval_data needs task.train_data in a simulation (the built-in task has its own "
                         "held-out split)")
        for key in ("eval_limit", "train_limit"):
            if not 0 <= getattr(task, key) <= MAX_ROWS[key]:
                found.append(f"task.{key} must be between 0 (all) and {MAX_ROWS[key]:,} rows (got {getattr(task, key)})")
        if not 1 <= task.eval_every <= MAX_EVAL_EVERY:
            found.append(f"task.eval_every must be in 1..{MAX_EVAL_EVERY:,} rounds (got {task.eval_every})")
        if not 1 <= task.builtin_train_rows <= MAX_ROWS["builtin_train_rows"]:
            found.append(f"task.builtin_train_rows must be in 1..{MAX_ROWS['builtin_train_rows']:,} "
                         f"(got {task.builtin_train_rows})")
        for key in ("train_data", "eval_data"):
            path = getattr(task, key)
            if path and not Path(path).is_file():
                found.append(f"task.{key}: file {path} does not exist")
        return found

    def _registry_problems(self) -> list[str]:
        reg = self.registry
        if not reg.enabled:
            if reg.adapter_id or reg.keys:
                return ["registry.adapter_id and registry.keys need the registry enabled (registry.dir)"]
            return []
        if not reg.dir:
            return ["registry.dir is required when the registry is enabled"]
        from fedpeft.common.methods import get_method

        try:
            self.registry_target("run").check(get_method(self.federation.method).peft_backed)  # type: ignore[union-attr]
        except FedPeftError as exc:
            return [f"registry: {exc}"]
        return []

    # ---- derived settings (one definition each) ----------------------------------------------
    @property
    def topology(self) -> str:
        """The topology run: `federation.topology` (or "split" by the older `[split] enabled = true`)."""
        return "split" if self.split.enabled else self.federation.topology

    @property
    def client_mods(self) -> str:
        """Which ClientApp variant clients run: "secagg" (Flower's secaggplus_mod masks each update),
        "dp" (Flower's fixedclipping_mod clips it) or "plain"."""
        if self.secagg.enabled:
            return "secagg"
        return "dp" if self.dp.enabled else "plain"

    def compression_settings(self):  # -> Compression | None
        """The run's codecs (None when neither direction is compressed)."""
        from fedpeft.server.compression import Compression

        c = self.compression
        return Compression.from_names(c.upload, c.download, c.error_feedback, c.stochastic_rounding, self.federation.seed)

    def reply_bounds(self) -> RobustSettings:
        """The reply bounds the strategy enforces: `[robust]`, except that under DP every update
        is already clipped to dp.clipping_norm, so the relative norm bound (which would make
        an all-or-nothing DP round release nothing over an honest spread of norms) is off."""
        if self.dp.enabled:
            return dataclasses.replace(self.robust, norm_bound_ratio=0.0)
        return self.robust

    def method_options(self, trained_steps: int | None = None) -> dict[str, str]:
        """Method options with what the aggregation implies (ffa freezes A; per-client ranks set
        the global rank to their maximum) and what the run's length implies (AdaLoRA's budget
        schedule spans the steps trained, unless `total_step` is set: rounds x local steps, or
        `trained_steps` for a baseline that trains in one go)."""
        f = self.federation
        options = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in f.method_options.items()}
        if f.method == "adalora" and "total_step" not in options:
            if trained_steps is None and not self.training.local_epochs:
                steps = self.train_config().local_steps
                if isinstance(steps, int) and steps >= 1 and isinstance(f.rounds, int) and f.rounds >= 1:
                    trained_steps = f.rounds * steps
            if trained_steps is not None:
                options["total_step"] = str(trained_steps)
        if f.lora_aggregation == "ffa":
            options["freeze_a"] = "true"
        if f.client_ranks and all(isinstance(r, int) and not isinstance(r, bool) for r in f.client_ranks):
            options["r"] = str(max(f.client_ranks))
        return options

    def hetero_ranks(self, method_config: MethodConfig | None = None) -> HeteroRanks | None:
        """The per-client rank settings of hetlora/flexlora runs (None for other modes)."""
        f = self.federation
        if f.lora_aggregation not in HETERO_MODES or f.method != "lora":
            return None
        config = method_config or make_config("lora", self.method_options())
        if not isinstance(config, LoraMethodConfig):
            raise ConfigError(f"federation.lora_aggregation {f.lora_aggregation!r} needs method 'lora'")
        return HeteroRanks.for_lora(f.lora_aggregation, f.client_ranks or [config.r], config)

    def registry_target(self, run_name: str):  # -> RegistryTarget | None
        """Where each round is published (None without a registry)."""
        from fedpeft.server.serving.publishing import RegistryTarget

        if not self.registry.enabled:
            return None
        return RegistryTarget(str(self.registry.dir), self.registry.adapter_id or run_name, self.registry.keys)


def _apply(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`data` ({section: {key: value}}) with dotted-key `overrides` set (a copy)."""
    out = {name: dict(values) if isinstance(values, dict) else values for name, values in data.items()}
    for key, value in overrides.items():
        section, name = key.split(".", 1)
        table = out.setdefault(section, {})
        if isinstance(table, dict):
            table[name] = value
    return out
