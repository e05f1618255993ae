"""Plug an adapter trained on an emulator back into the full model.

The adapter's tensor names carry emulator block indices (`...layers.3.self_attn...`);
re-keying them to full-model indices (and `layers_to_transform` in its config) gives a
stock PEFT adapter dir for the full model, which `PeftModel.from_pretrained` loads.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from fedpeft.common.errors import ConfigError
from fedpeft.common.files import write_json_atomic
from fedpeft.common.methods.base import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE
from fedpeft.common.model.architectures import ArchitectureSpec, architecture_of, blocks_of
from fedpeft.common.offsite.layer_map import LayerMap


def _block_pattern(spec: ArchitectureSpec) -> re.Pattern[str]:
    return re.compile(rf"(^|\.)({re.escape(spec.blocks)})\.(\d+)\.")


def rekey_adapter(adapter_dir: Path, layer_map: LayerMap, out_dir: Path, spec: ArchitectureSpec,
                  base_model: str | None = None) -> Path:
    """Write the full-model version of the peft adapter in `adapter_dir` to `out_dir`.

    Every block-indexed tensor must sit on an adapter block of `layer_map`; a tensor on a
    middle (emulator-only) block or beyond the emulator means the adapter was trained
    on something else, and is refused.
    """
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    try:
        config = json.loads((adapter_dir / ADAPTER_CONFIG_FILE).read_text())
        tensors = load_file(str(adapter_dir / ADAPTER_WEIGHTS_FILE))
    except Exception as exc:  # missing files, bad JSON, corrupt safetensors
        raise ConfigError(f"{adapter_dir} is not a PEFT adapter dir "
                          f"({ADAPTER_CONFIG_FILE} + {ADAPTER_WEIGHTS_FILE}): {exc}") from exc
    pattern = _block_pattern(spec)
    renamed, used = {}, set()
    for name, tensor in tensors.items():
        match = pattern.search(name)
        if match is None:  # embeddings, head, etc.: shared by emulator and full model
            renamed[name] = tensor
            continue
        index = int(match.group(3))
        if index >= layer_map.emulator_layers:
            raise ConfigError(f"adapter tensor {name} is on block {index}, but the emulator has only "
                              f"{layer_map.emulator_layers} blocks: the adapter was not trained on this emulator")
        try:
            full_index = layer_map.to_full(index)
        except ConfigError as exc:
            raise ConfigError(f"adapter tensor {name}: {exc}") from None
        used.add(full_index)
        renamed[pattern.sub(lambda m, f=full_index: f"{m.group(1)}{m.group(2)}.{f}.", name, count=1)] = tensor
    declared = config.get("layers_to_transform")
    if declared is not None:
        declared = [declared] if isinstance(declared, int) else list(declared)
        try:
            config["layers_to_transform"] = sorted(layer_map.to_full(int(i)) for i in declared)
        except ConfigError as exc:
            raise ConfigError(f"{adapter_dir / ADAPTER_CONFIG_FILE}: layers_to_transform {declared}: {exc}") from None
    else:  # an adapter on every emulator block would have been refused above: pin it to its blocks
        config["layers_to_transform"] = sorted(used)
    if base_model is not None:
        config["base_model_name_or_path"] = base_model
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(renamed, str(out_dir / ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})
    write_json_atomic(out_dir / ADAPTER_CONFIG_FILE, config)
    return out_dir


def plug_in(full_model: nn.Module, adapter_dir: Path, layer_map: LayerMap, out_dir: Path,
            base_model: str | None = None) -> nn.Module:
    """The full model with the emulator-trained adapter loaded at its full-model blocks
    (a `PeftModel`); the re-keyed stock adapter dir is left in `out_dir`."""
    from peft import PeftModel

    blocks = len(blocks_of(full_model))
    if blocks != layer_map.full_layers:
        raise ConfigError(f"the full model has {blocks} blocks but the layer map was built from a "
                          f"{layer_map.full_layers}-block model: plug the adapter into the model it came from")
    rekeyed = rekey_adapter(adapter_dir, layer_map, out_dir, architecture_of(full_model), base_model)
    try:
        return PeftModel.from_pretrained(full_model, str(rekeyed))
    except (RuntimeError, ValueError, KeyError) as exc:
        raise ConfigError(f"the re-keyed adapter does not fit the full model: {exc}") from exc
