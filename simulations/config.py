"""The settings of one `peft-sim` run, validated together (all problems at once)."""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedpeft.common.data.partition import PartitionSpec
from fedpeft.common.errors import ConfigError, FedPeftError
from fedpeft.common.methods import MethodConfig, make_config
from fedpeft.common.methods.lora import LoraMethodConfig
from fedpeft.common.model.base_model import DEFAULT_MODEL
from fedpeft.common.model.quantization import QUANTIZE_CHOICES, bitsandbytes_available, resolve_quantize  # noqa: F401
from fedpeft.common.offsite.run import OFFSITE_METHODS, OffsiteSettings
from fedpeft.common.protocol.topology import DEFAULT_TOPOLOGY, validate_topology
from fedpeft.server.hetero_strategy import HETERO_MODES, HeteroRanks
from fedpeft.server.strategy import LORA_AGGREGATIONS, parse_strategy_options

SIM_TOPOLOGIES: tuple[str, ...] = ("fl", "offsite", "split")
"""Topologies `peft-sim` runs (all of `fedpeft.common.protocol.topology.TOPOLOGIES`)."""
SPLIT_WIRE_DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16")


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
    learning_rate: float = 1e-3
    batch_size: int = 8
    max_length: int = 128
    gradient_checkpointing: bool = False
    """Clients recompute block activations in backward (less memory, ~1 more forward)."""
    data: str | None = None
    eval_data: str | None = None
    task: str = "auto"
    template: str | None = None
    labels: str | None = None
    label_column: str = "label"
    partition: str = "iid"
    quantize: str = "auto"
    """4bit | none | auto (4bit where bitsandbytes imports)."""
    out: str | None = None
    seed: int = 0
    train_limit: int = 0
    """0 = use every training row; else subsample this many (seeded)."""
    eval_limit: int = 200
    """Held-out rows scored each round (0 = all)."""
    builtin_train_rows: int = 800
    cpus_per_client: float = 1.0
    gpus_per_client: float = 0.0
    """Ray GPU share per virtual client; 0 keeps clients on the CPU (Ray hides GPUs)."""
    strategy: str = "fedavg"
    strategy_options: dict[str, str] = field(default_factory=dict)
    min_clients: int = 1
    """Fewest accepted client updates per round; a round with fewer stops the run."""
    clip_update_norm: float = 0.0
    """L2 bound on each client's update (delta minus global) before aggregation; 0 = off."""
    lora_aggregation: str = "naive"
    """naive (average A and B: FedIT) | svd (exact ΔW mean, re-factored) | ffa (A frozen) |
    hetlora (per-client ranks, zero-padded factors averaged) | flexlora (per-client ranks,
    exact ΔW mean, SVD to each client's rank)."""
    client_ranks: list[int] = field(default_factory=list)
    """hetlora/flexlora: LoRA ranks cycled over the clients (empty: all at the method's r)."""
    log_every: int = 4
    resume: str | None = None
    """Run dir of an interrupted run to continue from its last completed round."""
    dp_clipping_norm: float = 0.0
    """> 0 turns on central DP with client-side clipping to this L2 norm."""
    dp_noise_multiplier: float = 1.0
    dp_target_delta: float = 1e-5
    publish_to: str | None = None
    """Adapter registry dir: every finished round publishes the global adapter there (serving hot-loads it)."""
    adapter_id: str | None = None
    """Registry adapter id (default: the run dir's name)."""
    registry_keys: str | None = None
    """Registry identity dir: published versions are sealed at rest."""
    topology: str = DEFAULT_TOPOLOGY
    """fl (every client holds the whole model) | offsite (clients hold an emulator + adapter blocks) |
    split (clients hold embeddings + the first `split_cut` blocks and train against one shared split server)."""
    offsite_bottom: int = 2
    offsite_top: int = 2
    offsite_keep_every: int = 4
    offsite_distill_steps: int = 0
    offsite_distill_data: str | None = None
    offsite_dtype: str = "float32"
    split_cut: int = 2
    """split: blocks on each client."""
    split_u_shaped: bool = False
    """split: clients also hold the head and compute the loss (labels never leave them)."""
    split_wire_dtype: str = "bfloat16"
    """split: dtype of activations and gradients on the wire."""

    def problems(self) -> list[str]:
        """Everything wrong with this config (empty when valid)."""
        found = []
        positive = {"clients": self.clients, "rounds": self.rounds, "local_steps": self.local_steps,
                    "batch_size": self.batch_size, "max_length": self.max_length, "log_every": self.log_every,
                    "builtin_train_rows": self.builtin_train_rows, "min_clients": self.min_clients}
        found += [f"--{k.replace('_', '-')} must be >= 1 (got {v})" for k, v in positive.items() if v < 1]
        if not 0 <= self.clients_per_round <= self.clients:
            found.append(f"--clients-per-round must be between 0 (all) and --clients={self.clients}")
        if self.max_length < 8:
            found.append(f"--max-length must be >= 8 (got {self.max_length})")
        if self.min_clients > self.num_per_round:
            found.append(f"--min-clients {self.min_clients} exceeds the {self.num_per_round} clients sampled per round")
        if self.lora_aggregation not in LORA_AGGREGATIONS:
            found.append(f"--lora-aggregation {self.lora_aggregation!r}: choose one of {list(LORA_AGGREGATIONS)}")
        elif self.lora_aggregation != "naive" and self.method != "lora":
            found.append(f"--lora-aggregation {self.lora_aggregation} needs --method lora (got {self.method!r})")
        elif self.lora_aggregation in ("svd", *HETERO_MODES) and self.strategy != "fedavg":
            found.append(f"--lora-aggregation {self.lora_aggregation} replaces FedAvg's averaging; "
                         "it needs --strategy fedavg")
        if self.client_ranks:
            if self.lora_aggregation not in HETERO_MODES:
                found.append(f"--client-ranks needs --lora-aggregation {' or '.join(HETERO_MODES)}")
            if any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in self.client_ranks):
                found.append(f"--client-ranks must be integers >= 1 (got {self.client_ranks})")
            elif "r" in self.method_options and str(self.method_options["r"]) != str(max(self.client_ranks)):
                found.append(f"-o r={self.method_options['r']} conflicts with --client-ranks: the global rank is "
                             f"their maximum, {max(self.client_ranks)} (leave r out)")
        if not self.clip_update_norm >= 0:
            found.append(f"--clip-update-norm must be >= 0 (got {self.clip_update_norm})")
        if self.dp_clipping_norm:
            found += [p.replace("dp.", "--dp-").replace("clipping_norm", "clip").replace("noise_multiplier", "noise")
                      .replace("target_delta", "delta") for p in self.dp_problems()]
        if self.gradient_checkpointing:
            from fedpeft.common.training.activation_checkpointing import KV_PREFIX_REASON, refuses_checkpointing

            if refuses_checkpointing(self.method):
                found.append(f"--gradient-checkpointing cannot train --method {self.method}: {KV_PREFIX_REASON}")
        if self.publish_to is not None:
            from fedpeft.common.methods import get_method

            try:
                self.registry_target("run").check(get_method(self.method).peft_backed)
            except FedPeftError as exc:
                found.append(f"--publish-to: {exc}")
        elif self.adapter_id or self.registry_keys:
            found.append("--adapter-id and --registry-keys need --publish-to")
        try:
            validate_topology(self.topology, SIM_TOPOLOGIES, where="--topology")
        except FedPeftError as exc:
            found.append(str(exc))
        if self.topology == "offsite":
            found += self.offsite_settings().problems(lambda key: f"--offsite-{key.replace('_', '-')}")
            if self.method not in OFFSITE_METHODS:
                found.append(f"--topology offsite trains the adapter blocks with {list(OFFSITE_METHODS)}, "
                             f"not --method {self.method}")
        found += self.split_problems()
        if self.gpus_per_client < 0:
            found.append("--gpus-per-client must be >= 0")
        if self.learning_rate <= 0:
            found.append(f"--lr must be > 0 (got {self.learning_rate})")
        if self.local_epochs < 0 or self.train_limit < 0 or self.eval_limit < 0:
            found.append("--local-epochs, --train-limit and --eval-limit must be >= 0")
        if self.cpus_per_client <= 0:
            found.append("--cpus-per-client must be > 0")
        if self.quantize not in (*QUANTIZE_CHOICES, "auto"):
            found.append(f"--quantize {self.quantize!r}: choose one of {[*QUANTIZE_CHOICES, 'auto']}")
        elif self.quantize == "4bit" and not bitsandbytes_available():
            found.append("--quantize 4bit needs bitsandbytes, which cannot be imported here; use --quantize none")
        if self.eval_data and not self.data:
            found.append("--eval-data needs --data (the built-in task has its own held-out split)")
        for path in (self.data, self.eval_data):
            if path and not Path(path).is_file():
                found.append(f"data file {path} does not exist")
        for check in (lambda: make_config(self.method, self.effective_method_options()),
                      lambda: (self.method == "lora" and self.lora_aggregation in HETERO_MODES
                               and self.hetero_ranks(make_config("lora", self.effective_method_options()))),
                      lambda: PartitionSpec.parse(self.partition),
                      lambda: parse_strategy_options(self.strategy, self.strategy_options)):
            try:
                check()
            except FedPeftError as exc:
                found.append(str(exc))
        return found

    def registry_target(self, run_name: str):  # -> RegistryTarget | None
        """Where each round is published (None without --publish-to)."""
        from fedpeft.server.serving.publishing import RegistryTarget

        if self.publish_to is None:
            return None
        return RegistryTarget(self.publish_to, self.adapter_id or run_name, self.registry_keys)

    def offsite_settings(self) -> OffsiteSettings:
        return OffsiteSettings(bottom=self.offsite_bottom, top=self.offsite_top, keep_every=self.offsite_keep_every,
                               distill_steps=self.offsite_distill_steps, distill_data=self.offsite_distill_data,
                               dtype=self.offsite_dtype)

    def split_problems(self) -> list[str]:
        """What the split topology cannot combine with (checked before any process starts)."""
        if self.topology != "split":
            return []
        found = []
        if isinstance(self.split_cut, bool) or not isinstance(self.split_cut, int) or self.split_cut < 1:
            found.append(f"--split-cut must be an integer >= 1 (got {self.split_cut!r})")
        if self.split_wire_dtype not in SPLIT_WIRE_DTYPES:
            found.append(f"--split-wire-dtype {self.split_wire_dtype!r}: choose one of {list(SPLIT_WIRE_DTYPES)}")
        if self.method != "lora":
            found.append(f"--topology split trains LoRA on both parts; --method {self.method!r} is not supported")
        if self.lora_aggregation not in ("naive", "ffa"):
            found.append(f"--topology split supports --lora-aggregation naive or ffa, not {self.lora_aggregation!r}")
        if self.dp_clipping_norm:
            found.append("--topology split with --dp-clip is not supported (the server part sees raw activations)")
        return found

    def dp_section(self):  # -> DpSection | None
        """The run's DP settings (None when off), in the deployment run config's terms."""
        from fedpeft.server.run_config import DpSection

        if not self.dp_clipping_norm:
            return None
        return DpSection(enabled=True, noise_multiplier=self.dp_noise_multiplier, clipping_norm=self.dp_clipping_norm,
                         target_delta=self.dp_target_delta, population=self.clients)

    def dp_problems(self) -> list[str]:
        from fedpeft.server.run_config import RunConfig

        config = RunConfig.from_dict({
            "federation": {"clients": self.clients, "clients_per_round": self.clients_per_round, "strategy": self.strategy,
                           "lora_aggregation": self.lora_aggregation, "method": self.method},
            "dp": {"enabled": True, "noise_multiplier": self.dp_noise_multiplier, "clipping_norm": self.dp_clipping_norm,
                   "target_delta": self.dp_target_delta},
        })
        return [p for p in config.problems() if p.startswith("dp")]

    def validate(self) -> None:
        found = self.problems()
        if found:
            raise ConfigError("invalid simulation settings:\n  - " + "\n  - ".join(found))

    @property
    def num_per_round(self) -> int:
        """Clients sampled per round (`clients_per_round`, 0 meaning all)."""
        return self.clients_per_round or self.clients

    def out_dir(self) -> Path:
        return Path(self.out or f"runs/sim-{time.strftime('%Y%m%d-%H%M%S')}")

    @classmethod
    def from_run_dir(cls, run_dir: Path) -> SimulationConfig:
        """The settings a run dir was started with (its config.json), set to resume it."""
        path = Path(run_dir) / "config.json"
        try:
            saved = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot resume {run_dir}: no readable config.json ({exc})") from exc
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in known} | {"out": str(run_dir), "resume": str(run_dir)})

    def effective_method_options(self) -> dict[str, str]:
        """Method options with what --lora-aggregation implies (ffa freezes A)."""
        if self.lora_aggregation == "ffa":
            return {**self.method_options, "freeze_a": "true"}
        if self.client_ranks and all(isinstance(r, int) for r in self.client_ranks):
            return {**self.method_options, "r": str(max(self.client_ranks))}  # the server's (global) rank
        return dict(self.method_options)

    def hetero_ranks(self, method_config: MethodConfig) -> HeteroRanks | None:
        """The per-client rank settings of hetlora/flexlora runs (None for other modes)."""
        if self.lora_aggregation not in HETERO_MODES:
            return None
        if not isinstance(method_config, LoraMethodConfig):
            raise ConfigError(f"--lora-aggregation {self.lora_aggregation} needs --method lora")
        return HeteroRanks.for_lora(self.lora_aggregation, self.client_ranks or [method_config.r], method_config)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
