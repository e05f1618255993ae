"""`peft-sim`'s flags: each one an override of one run-spec field, in one table.

The table is the only place a flag is defined: `build_parser` makes the argparse options
from it (types and defaults come from the spec's own fields), `overrides_from_args`
turns the flags a user gave into {"section.key": value} overrides of a spec (from
`--config` or the defaults), and `spec_from_flags` does the same for code and tests
that name settings by their flag names (`spec_from_flags(clients=2, learning_rate=0.01)`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedpeft.client.training import OPTIMIZERS
from fedpeft.server.federation.spec import RECIPES, SECTIONS, RunSpec
from fedpeft.server.rate_schedule import SERVER_LR_SCHEDULES


@dataclass(frozen=True)
class Flag:
    name: str
    """The keyword name (argparse dest, `spec_from_flags` keyword)."""
    key: str
    """The spec field it overrides, "section.key"."""
    help: str
    option: str = ""
    """The option string (default: --NAME with dashes)."""
    short: str = ""
    choices: tuple[str, ...] | None = None
    parse: Callable[[str], Any] | None = None
    """Parser of one command-line value (default: the field's type)."""
    repeated: bool = False
    """KEY=VALUE, repeatable, collected into a table."""
    enables: str = ""
    """A boolean field this flag switches on when given a truthy value (e.g. dp.enabled)."""

    @property
    def flag(self) -> str:
        return self.option or "--" + self.name.replace("_", "-")


def key_value(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    key, value = text.split("=", 1)
    return key.strip(), value.strip()


def ranks(text: str) -> list[int]:
    try:
        parsed = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not parsed or min(parsed) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give one or more ranks >= 1")
    return parsed


FLAGS: tuple[Flag, ...] = (
    Flag("model", "federation.model", "built-in name (smollm2-135m-instruct, all-minilm-l6-v2), .gguf file or HF model dir"),
    Flag("method", "federation.method", "PEFT method (see the README's method table)"),
    Flag("method_options", "federation.method_options", "method option, repeatable (e.g. -o r=16 -o use_dora=true)",
         option="--method-opt", short="-o", repeated=True),
    Flag("clients", "federation.clients", "virtual clients"),
    Flag("clients_per_round", "federation.clients_per_round", "clients sampled per round (0 = all)"),
    Flag("rounds", "federation.rounds", "federated rounds"),
    Flag("local_steps", "training.local_steps", "optimizer steps per client per round; unset: the method's "
         "federated_local_steps"),
    Flag("local_epochs", "training.local_epochs", "epochs per round instead of steps (0 = use steps)"),
    Flag("learning_rate", "training.learning_rate", "local learning rate; unset: the method's "
         "federated_learning_rate", option="--lr"),
    Flag("batch_size", "training.batch_size", "local batch size"),
    Flag("max_length", "training.max_length", "max tokens per example"),
    Flag("gradient_checkpointing", "training.gradient_checkpointing",
         "clients recompute block activations in backward: much less memory, ~30%% slower steps"),
    Flag("data", "task.train_data", "training data (.jsonl/.json/.csv/.tsv); default: the built-in task"),
    Flag("eval_data", "task.eval_data", "held-out data; default: 10%% of --data"),
    Flag("task", "task.kind", "task format", choices=("auto", "instruction", "classification")),
    Flag("template", "task.template", "classification prompt template with {column} placeholders"),
    Flag("labels", "task.labels", "verbalizer LABEL=WORD,... (e.g. 0=negative,1=positive)"),
    Flag("label_column", "task.label_column", "label column of the data"),
    Flag("partition", "task.partition", "iid | dirichlet:ALPHA | natural:COLUMN"),
    Flag("train_limit", "task.train_limit", "subsample training rows (0 = all)"),
    Flag("eval_limit", "task.eval_limit", "held-out rows scored per round (0 = all)"),
    Flag("eval_every", "task.eval_every", "score the held-out rows every N rounds (and always the last)"),
    Flag("builtin_train_rows", "task.builtin_train_rows", "training rows generated for the built-in task"),
    Flag("quantize", "federation.quantize", "4bit | none | auto: 4bit where bitsandbytes works"),
    Flag("seed", "federation.seed", "seed of everything random in the run"),
    Flag("cpus_per_client", "simulation.cpus_per_client", "Ray CPUs per virtual client"),
    Flag("gpus_per_client", "simulation.gpus_per_client", "Ray GPU share per virtual client, e.g. 0.5 (0: CPU)"),
    Flag("strategy", "federation.strategy", "Flower aggregation strategy (fedavg, fedprox, fedadam, fedyogi, "
         "fedadagrad, fedavgm, fedmedian, fedtrimmedavg, krum, multikrum)"),
    Flag("strategy_options", "federation.strategy_options", "strategy option, repeatable (e.g. --strategy fedprox "
         "--strategy-opt proximal_mu=0.01)", option="--strategy-opt", repeated=True),
    Flag("recipe", "federation.recipe", "local: clients take local_steps steps of their optimizer, the strategy "
         "aggregates their deltas; server-adam: clients take one SGD step, the server applies Adam at the method's "
         "rate (FedAdam over FedSGD: robust to label skew, needs about as many rounds as centralized Adam needs steps)",
         choices=RECIPES),
    Flag("server_lr_schedule", "federation.server_lr_schedule", "the server optimizer's eta over rounds: constant "
         "| cosine (decays to ~0 at the last round; FedAdam/FedYogi/FedAdagrad or recipe server-adam)",
         choices=SERVER_LR_SCHEDULES),
    Flag("lora_aggregation", "federation.lora_aggregation",
         "naive: average A and B (FedIT); svd: exact mean of B·A re-factored to rank r; ffa: A frozen, only B "
         "trained (exact); hetlora: per-client ranks, zero-padded A and B averaged; flexlora: per-client ranks, exact "
         "mean of B·A re-factored by SVD to each client's rank",
         choices=("naive", "svd", "ffa", "hetlora", "flexlora")),
    Flag("client_ranks", "federation.client_ranks", "hetlora/flexlora: LoRA ranks cycled over the clients, e.g. 2,4,8 "
         "(the global rank is the max)", parse=ranks),
    Flag("clip_update_norm", "federation.clip_update_norm",
         "clip each client's update (delta minus global, L2) to this norm before aggregation (0 = off)"),
    Flag("scaffold", "federation.scaffold", "SCAFFOLD drift correction: the server's control variate travels with "
         "the global delta (doubling the download) and corrects every local step"),
    Flag("optimizer", "training.optimizer", "the clients' local optimizer: adamw, or sgd (plain SGD: steps shrink "
         "as a client fits its data, which keeps label-skewed clients from dragging the shared delta)",
         choices=OPTIMIZERS),
    Flag("logit_adjustment", "training.logit_adjustment", "classification under label skew: clients train on "
         "logits + TAU x log(their label frequencies) (FedLC); 0 = off"),
    Flag("upload_codec", "compression.upload", "compress each client's update on the wire: none, fp16, bf16, int8, "
         "nf4, fp4 or topk:F[+CODEC] (e.g. topk:0.1+int8)"),
    Flag("download_codec", "compression.download", "compress the broadcast global delta: none, fp16, bf16, int8, "
         "nf4, fp4"),
    Flag("error_feedback", "compression.error_feedback", "clients keep what a lossy upload codec dropped and send it "
         "with their next update (--no-error-feedback: drop it)"),
    Flag("max_examples", "robust.max_examples", "largest num-examples a client reply may report"),
    Flag("examples_ratio", "robust.examples_ratio", "refuse a reply reporting more than this multiple of the round's "
         "median num-examples (0 = off)"),
    Flag("max_abs_value", "robust.max_abs_value", "refuse a delta with any |value| above this (0 = off)"),
    Flag("norm_bound", "robust.norm_bound", "refuse an update whose L2 norm exceeds this (0 = off)"),
    Flag("norm_bound_ratio", "robust.norm_bound_ratio", "refuse an update whose L2 norm exceeds this multiple of "
         "the round's median update norm (0 = off)"),
    Flag("min_clients", "federation.min_clients", "fewest accepted client updates per round; fewer stops the run"),
    Flag("round_timeout", "federation.round_timeout", "seconds a round waits for replies"),
    Flag("dp_clipping_norm", "dp.clipping_norm", "differential privacy: clip each client's update to this L2 norm on "
         "the client and add Gaussian noise to the mean (Flower's DP wrapper + fixedclipping_mod); 0 = off",
         option="--dp-clip", enables="dp.enabled"),
    Flag("dp_noise_multiplier", "dp.noise_multiplier", "DP noise multiplier (noise std = multiplier x clip / clients "
         "per round)", option="--dp-noise"),
    Flag("dp_target_delta", "dp.target_delta", "DP delta at which epsilon is reported", option="--dp-delta"),
    Flag("publish_to", "registry.dir", "publish the global adapter to this registry after every round (peft-server "
         "serve hot-loads it)", enables="registry.enabled"),
    Flag("adapter_id", "registry.adapter_id", "registry adapter id (default: the run dir's name)"),
    Flag("registry_keys", "registry.keys", "registry identity (peft-server keys): seal versions at rest"),
    Flag("topology", "federation.topology", "fl: every client holds the whole model; offsite: Offsite-Tuning, clients "
         "hold a compressed emulator + the adapter blocks, the final adapter is plugged into the full model; split: "
         "clients hold embeddings + the first --split-cut blocks and train against one shared split server over gRPC",
         choices=("fl", "offsite", "split")),
    Flag("offsite_bottom", "offsite.bottom", "offsite: bottom adapter blocks"),
    Flag("offsite_top", "offsite.top", "offsite: top adapter blocks"),
    Flag("offsite_keep_every", "offsite.keep_every", "offsite: keep every n-th middle block in the emulator"),
    Flag("offsite_distill_steps", "offsite.distill_steps", "offsite: steps distilling the emulator against the full "
         "model (0 = off)"),
    Flag("offsite_distill_data", "offsite.distill_data", "offsite: server-owned text file for distillation"),
    Flag("offsite_dtype", "offsite.dtype", "offsite: how the emulator's weights are stored (bfloat16 halves the "
         "download but costs clients more memory)", choices=("float32", "bfloat16")),
    Flag("offsite_emulator", "offsite.emulator", "offsite: a prebuilt emulator dir (peft-server offsite-build)"),
    Flag("split_cut", "split.cut", "split: blocks on each client"),
    Flag("split_u_shaped", "split.u_shaped", "split: clients also hold the head and compute the loss, so labels never "
         "leave them"),
    Flag("split_max_abs_activation", "split.max_abs_activation",
         "split: refuse a client step whose activations or gradients exceed this |value| (0 = off)"),
    Flag("split_wire_dtype", "split.wire_dtype", "split: dtype of activations and gradients on the wire",
         choices=("float32", "float16", "bfloat16")),
)
FLAGS_BY_NAME: dict[str, Flag] = {f.name: f for f in FLAGS}
FLAGS_BY_KEY: dict[str, Flag] = {f.key: f for f in FLAGS}


def _field_type(key: str) -> Any:
    """The type of a spec field (the non-None member of an optional, the container of a table)."""
    section, name = key.split(".", 1)
    hint = typing.get_type_hints(SECTIONS[section])[name]
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return origin or hint


def add_flags(parser: argparse.ArgumentParser) -> None:
    """Every flag of the table as an option of `parser`; unset flags leave the spec alone."""
    defaults = RunSpec()
    for flag in FLAGS:
        kind = _field_type(flag.key)
        default = defaults.get(flag.key)
        names = [flag.flag, *([flag.short] if flag.short else [])]
        shown = f" (spec: {flag.key}; default {'unset' if default is None else repr(default)})" \
            if not flag.repeated else f" (spec: {flag.key})"
        common: dict[str, Any] = {"dest": flag.name, "default": argparse.SUPPRESS, "help": flag.help + shown}
        if flag.repeated:
            parser.add_argument(*names, action="append", type=key_value, metavar="KEY=VALUE", **common)
        elif kind is bool:  # --x / --no-x: a flag can switch a spec's true back off
            parser.add_argument(*names, action=argparse.BooleanOptionalAction, **common)
        else:
            parse = flag.parse or (kind if kind in (int, float) else str)
            parser.add_argument(*names, type=parse, choices=flag.choices, **common)


def build_flag_parser(prog: str = "peft-sim") -> argparse.ArgumentParser:
    """A parser of the table's flags alone."""
    parser = argparse.ArgumentParser(prog=prog)
    add_flags(parser)
    return parser


PATH_KEYS: tuple[str, ...] = ("task.train_data", "task.eval_data", "offsite.distill_data", "offsite.emulator",
                               "registry.dir", "registry.keys", "split.tls_dir")
"""Fields holding paths: given on the command line, they are taken from the current directory
(and saved absolute, so a run resumes from anywhere)."""


def overrides_from_args(args: argparse.Namespace, base: RunSpec | None = None) -> dict[str, Any]:
    """{"section.key": value} for every table flag the user gave (paths made absolute)."""
    given = {f.name: getattr(args, f.name) for f in FLAGS if hasattr(args, f.name)}
    overrides = overrides_from_flags(given, base)
    for key in PATH_KEYS:
        if isinstance(overrides.get(key), str) and overrides[key]:
            overrides[key] = str(Path(overrides[key]).resolve())
    model = overrides.get("federation.model")
    if isinstance(model, str) and Path(model).exists():  # a local file or dir (built-in names stay names)
        overrides["federation.model"] = str(Path(model).resolve())
    return overrides


def overrides_from_flags(values: Mapping[str, Any], base: RunSpec | None = None) -> dict[str, Any]:
    """{"section.key": value} for settings named by their flag names. KEY=VALUE tables (`-o`,
    `--strategy-opt`) are merged into `base`'s table, key by key; a flag that switches its
    section on (`--dp-clip`, `--publish-to`) switches it off when given 0 or "" (and leaves
    the section's value alone)."""
    out: dict[str, Any] = {}
    for name, value in values.items():
        if name not in FLAGS_BY_NAME:
            raise TypeError(f"unknown setting {name!r}; known: {sorted(FLAGS_BY_NAME)}")
        flag = FLAGS_BY_NAME[name]
        if flag.repeated:
            value = {**(base.get(flag.key) if base is not None else {}), **dict(value)}
        if flag.enables:
            out[flag.enables] = bool(value)
            if not value:
                continue
        out[flag.key] = value
    return out


def spec_from_flags(base: RunSpec | None = None, **values: Any) -> RunSpec:
    """A spec with settings given by flag name (`clients=2, learning_rate=0.01, data=...`), type-checked."""
    base = base or RunSpec()
    return base.with_overrides(overrides_from_flags(values, base))


def describe_for_cli(problem: str) -> str:
    """A spec problem with each key it names followed by the flag that sets it ("federation.clients (--clients)")."""
    for key, flag in FLAGS_BY_KEY.items():
        problem = re.sub(rf"(?<![\w.]){re.escape(key)}(?![\w.])(?! \()", f"{key} ({flag.flag})", problem, count=1)
    return problem


def spec_fields() -> list[tuple[str, Any, str]]:
    """(key, default, flag) of every spec field, for docs and tests."""
    defaults = RunSpec()
    rows = []
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            key = f"{section}.{f.name}"
            rows.append((key, defaults.get(key), FLAGS_BY_KEY[key].flag if key in FLAGS_BY_KEY else ""))
    return rows


def spec_table_markdown() -> str:
    """The README's run-spec table: every field, its default and the `peft-sim` flag that overrides it
    (generated here so that the docs cannot drift from the spec; a test compares them)."""
    lines = ["| key | default | `peft-sim` flag |", "|---|---|---|"]
    for key, default, flag in spec_fields():
        shown = "none" if default is None else json.dumps(default) if isinstance(default, (dict, list, str)) else (
            str(default).lower() if isinstance(default, bool) else repr(default))
        lines.append(f"| `{key}` | `{shown}` | {f'`{flag}`' if flag else '-'} |")
    return "\n".join(lines)
