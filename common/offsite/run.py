"""An Offsite-Tuning run around the ordinary federation: before it, build the emulator
and restrict LoRA to the adapter blocks; after it, plug the final adapter into the full
model and score zero-shot full model vs plug-in. Shared by `peft-sim` and the
deployment ServerApp so both compute the same numbers.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedpeft.common.data.records import Record, TaskSpec, read_records
from fedpeft.common.errors import ConfigError
from fedpeft.common.files import write_json_atomic
from fedpeft.common.model.base_model import model_fingerprint
from fedpeft.common.offsite.emulator import EMULATOR_DTYPES
from fedpeft.common.offsite.layer_map import LAYER_MAP_FILE, LayerMap, read_layer_map

log = logging.getLogger("fedpeft.offsite")
EMULATOR_DIR = "emulator"
PLUGGED_DIR = "plugged"
RESULT_FILE = "offsite-metrics.json"
OFFSITE_METHODS = ("lora",)


@dataclass(frozen=True)
class OffsiteSettings:
    """How the owner compresses its model (the defaults fit SmolLM2's 30 blocks: 11 kept)."""

    bottom: int = 2
    """Adapter blocks at the bottom (trained by clients, plugged back)."""
    top: int = 2
    """Adapter blocks at the top."""
    keep_every: int = 4
    """Uniform layer drop: keep every n-th middle block in the emulator."""
    distill_steps: int = 0
    """Steps of middle-output distillation against the full model (0 = off)."""
    distill_data: str | None = None
    """Server-owned text for distillation (any data file; its text fields are used)."""
    distill_lr: float = 1e-4
    dtype: str = "float32"
    """How the emulator's weights are stored (float32 | bfloat16: half the download, more
    client memory; see `build_emulator`)."""
    emulator: str | None = None
    """A prebuilt emulator dir (`peft-server offsite-build`) instead of building one."""

    def problems(self, name: Callable[[str], str] = lambda key: f"offsite.{key}") -> list[str]:
        """Everything wrong with these settings; `name` turns a field into what the user typed."""
        found = []
        if self.bottom < 0 or self.top < 0 or self.bottom + self.top < 1:
            found.append(f"{name('bottom')} and {name('top')} must be >= 0 with at least one adapter block")
        if self.dtype not in EMULATOR_DTYPES:
            found.append(f"{name('dtype')} must be one of {list(EMULATOR_DTYPES)} (got {self.dtype!r})")
        if self.keep_every < 1:
            found.append(f"{name('keep_every')} must be >= 1 (got {self.keep_every})")
        if not 0 < self.distill_lr < float("inf"):
            found.append(f"{name('distill_lr')} must be a finite number > 0 (got {self.distill_lr})")
        if self.distill_steps < 0:
            found.append(f"{name('distill_steps')} must be >= 0 (got {self.distill_steps})")
        if self.distill_steps and not self.distill_data:
            found.append(f"{name('distill_steps')} needs {name('distill_data')} (server-owned text)")
        if self.distill_data and not Path(self.distill_data).is_file():
            found.append(f"{name('distill_data')}: file {self.distill_data} does not exist")
        if self.emulator and not (Path(self.emulator) / LAYER_MAP_FILE).is_file():
            found.append(f"{name('emulator')}: {self.emulator} has no {LAYER_MAP_FILE} (build it with peft-server offsite-build)")
        return found


def full_layer_count(model_dir: Path) -> int:
    """Blocks of a model dir, from its config (no weights loaded)."""
    from transformers import AutoConfig

    from fedpeft.common.model.architectures import ARCHITECTURES

    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    spec = ARCHITECTURES.get(config.model_type)
    if spec is None:
        raise ConfigError(f"model type {config.model_type!r} has no architecture entry; supported: {sorted(ARCHITECTURES)}")
    return int(getattr(config, spec.num_layers_key))


def plan_layers(full_model_dir: Path, settings: OffsiteSettings) -> LayerMap:
    """The layer map `settings` give for this model (validated before anything is built)."""
    if settings.emulator:
        layer_map = read_layer_map(Path(settings.emulator))
        if layer_map.full_fingerprint and layer_map.full_fingerprint != model_fingerprint(full_model_dir):
            raise ConfigError(f"emulator {settings.emulator} was built from another model than {full_model_dir}")
        return layer_map
    return LayerMap.plan(full_layer_count(full_model_dir), settings.bottom, settings.top, settings.keep_every,
                         model_fingerprint(full_model_dir))


def adapter_method_options(method: str, options: Mapping[str, str], layer_map: LayerMap) -> dict[str, str]:
    """`options` with LoRA restricted to the emulator's adapter blocks."""
    if method not in OFFSITE_METHODS:
        raise ConfigError(f"offsite topology trains the adapter blocks with {list(OFFSITE_METHODS)} "
                          f"(layers_to_transform); method {method!r} cannot be restricted to them")
    wanted = ",".join(str(i) for i in layer_map.adapter)
    given = options.get("layers_to_transform")
    if given is not None and [int(i) for i in str(given).split(",") if i.strip()] != list(layer_map.adapter):
        raise ConfigError(f"layers_to_transform={given} conflicts with the offsite adapter blocks {wanted} "
                          "(leave it out: the offsite topology sets it)")
    return {**options, "layers_to_transform": wanted}


def distill_texts(path: str) -> list[str]:
    """The text of every row of a data file (string fields joined)."""
    rows = read_records(Path(path))
    texts = [" ".join(str(v) for v in row.values() if isinstance(v, str) and v.strip()) for row in rows]
    return [t for t in texts if t]


def prepare_emulator(full_model_dir: Path, run_dir: Path, settings: OffsiteSettings, seed: int = 0,
                     max_length: int = 128) -> tuple[Path, LayerMap]:
    """The emulator dir for this run: the prebuilt one, the one a resumed run already
    built in `run_dir/emulator`, or a new one."""
    from fedpeft.common.offsite.emulator import build_emulator

    layer_map = plan_layers(full_model_dir, settings)
    if settings.emulator:
        return Path(settings.emulator).resolve(), layer_map
    target = Path(run_dir) / EMULATOR_DIR
    if (target / LAYER_MAP_FILE).is_file():
        existing = read_layer_map(target)
        if existing != dataclasses.replace(layer_map, distill_steps=settings.distill_steps):
            raise ConfigError(f"{target} holds an emulator with another layer plan ({list(existing.layers)}, "
                              f"asked for {list(layer_map.layers)})")
        stored = json.loads((target / "config.json").read_text()).get("dtype")
        if stored is not None and stored != settings.dtype:
            raise ConfigError(f"{target} holds an emulator stored as {stored}, asked for {settings.dtype} (offsite.dtype)")
        return target, existing
    texts = distill_texts(settings.distill_data) if settings.distill_steps and settings.distill_data else ()
    built = build_emulator(full_model_dir, target, bottom=settings.bottom, top=settings.top,
                           keep_every=settings.keep_every, distill_texts=texts, distill_steps=settings.distill_steps,
                           distill_lr=settings.distill_lr, max_length=max_length, seed=seed, dtype=settings.dtype,
                           overwrite=True)
    return target, built


def build_for_clients(model: str | None, out_dir: Path, settings: OffsiteSettings, overwrite: bool = False) -> LayerMap:
    """`peft-server offsite-build`: validate `settings`, then write the emulator clients get."""
    from fedpeft.common.model.base_model import resolve_model_dir
    from fedpeft.common.offsite.emulator import build_emulator

    problems = settings.problems(lambda key: f"--{key.replace('_', '-')}")
    if settings.emulator:
        problems.append("an emulator is being built here; do not name an existing one")
    if problems:
        raise ConfigError("invalid offsite settings:\n  - " + "\n  - ".join(problems))
    full_dir = resolve_model_dir(model)
    plan_layers(full_dir, settings)  # a bad plan fails before any weights load
    texts = distill_texts(settings.distill_data) if settings.distill_steps and settings.distill_data else ()
    return build_emulator(full_dir, Path(out_dir), bottom=settings.bottom, top=settings.top, keep_every=settings.keep_every,
                          distill_texts=texts, distill_steps=settings.distill_steps, distill_lr=settings.distill_lr,
                          dtype=settings.dtype, overwrite=overwrite)


def evaluate_plug_in(full_model_dir: Path, adapter_dir: Path, layer_map: LayerMap, quantize: str, task: TaskSpec,
                     eval_rows: Sequence[Record], max_length: int, out_dir: Path, base_model: str,
                     batch_size: int = 16) -> dict[str, Any]:
    """Score the full model zero-shot, plug the adapter in, score again; writes the
    full-model adapter to `out_dir/plugged` and the numbers to `out_dir/offsite-metrics.json`."""
    from fedpeft.common.model.base_model import load_base_model, load_tokenizer
    from fedpeft.common.offsite.plugin import plug_in
    from fedpeft.common.training.objectives import objective_for

    full = load_base_model(full_model_dir, quantize)  # type: ignore[arg-type]
    tokenizer = load_tokenizer(full_model_dir)
    objective = objective_for(full, tokenizer, task, max_length)
    zero_shot = objective.evaluate(full, eval_rows, batch_size)
    plugged = plug_in(full, adapter_dir, layer_map, Path(out_dir) / PLUGGED_DIR, base_model=base_model)
    result = objective.evaluate(plugged, eval_rows, batch_size)
    metrics = {
        "full_zero_shot_loss": zero_shot.loss, "full_zero_shot_accuracy": zero_shot.accuracy,
        "plug_in_loss": result.loss, "plug_in_accuracy": result.accuracy, "eval_examples": result.num_examples,
        "layer_map": layer_map.to_dict(), "plugged_adapter": str(Path(out_dir) / PLUGGED_DIR),
    }
    write_json_atomic(Path(out_dir) / RESULT_FILE, metrics)
    log.info("offsite: full model zero-shot loss %.4f acc %s | plug-in loss %.4f acc %s", zero_shot.loss,
             zero_shot.accuracy, result.loss, result.accuracy)
    return metrics


def read_result(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / RESULT_FILE
    return json.loads(path.read_text()) if path.is_file() else None
