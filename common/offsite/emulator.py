"""Build an Offsite-Tuning emulator: the full model with its middle blocks thinned out.

The result is an ordinary Hugging Face model dir (fewer blocks in its config) plus the
layer map `offsite.json`, so every existing path — `peft-sim`, `peft-client`, 4-bit
loading, LoRA, envelopes — trains on it unchanged when given that dir as the model.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from fedpeft.common.errors import ConfigError, ModelLoadError
from fedpeft.common.model.architectures import architecture_of, blocks_of
from fedpeft.common.model.base_model import model_fingerprint, model_kind
from fedpeft.common.offsite.layer_map import LayerMap

log = logging.getLogger("fedpeft.offsite")
EMULATOR_DTYPES: tuple[str, ...] = ("float32", "bfloat16")


def load_full_model(model_dir: Path) -> nn.Module:
    """The owner's full causal LM in fp32 (emulators are built from unquantized weights)."""
    from transformers import AutoModelForCausalLM

    if model_kind(model_dir) != "causal-lm":
        raise ConfigError(f"offsite tuning needs a causal LM; {model_dir} is an encoder")
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
    except Exception as exc:
        raise ModelLoadError(f"could not load the full model from {model_dir}: {exc}") from exc
    return model.eval()


def keep_blocks(model: nn.Module, layers: Sequence[int]) -> nn.Module:
    """Keep only `layers` (in order) of `model`'s blocks, in place, and make the config agree."""
    spec = architecture_of(model)
    blocks = blocks_of(model)
    parent_path, _, attr = spec.blocks.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attr, nn.ModuleList([blocks[i] for i in layers]))
    for new_index, block in enumerate(blocks_of(model)):  # KV-cache slots are addressed by layer_idx
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index
    config = model.config
    setattr(config, spec.num_layers_key, len(layers))
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == len(blocks):
        config.layer_types = [layer_types[i] for i in layers]
    return model


def build_emulator(full_model_dir: Path, out_dir: Path, *, bottom: int = 2, top: int = 2, keep_every: int = 4,
                   distill_texts: Sequence[str] = (), distill_steps: int = 0, distill_lr: float = 1e-4,
                   distill_batch_size: int = 4, max_length: int = 128, seed: int = 0,
                   dtype: str = "float32", overwrite: bool = False) -> LayerMap:
    """Write the emulator model dir for `full_model_dir` to `out_dir`; returns its layer map.

    Adapter = the bottom `bottom` and top `top` blocks, copied unchanged; emulator = every
    `keep_every`-th middle block. With `distill_steps > 0` the kept middle blocks are
    tuned to reproduce the full model's middle output on `distill_texts` (server-owned).
    The weights are stored as `dtype` (EMULATOR_DTYPES). float32 costs clients the least
    memory: the embedding is used straight from the memory-mapped file, while bfloat16
    (half the download) makes every client convert it to a float32 copy at load. Clients
    quantize the blocks to 4 bits at load either way.
    """
    from transformers import AutoTokenizer

    full_model_dir, out_dir = Path(full_model_dir), Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise ConfigError(f"emulator output dir {out_dir} is not empty (pass overwrite to replace it)")
        shutil.rmtree(out_dir)
    if dtype not in EMULATOR_DTYPES:
        raise ConfigError(f"emulator dtype {dtype!r} is not one of {list(EMULATOR_DTYPES)}")
    if distill_steps < 0:
        raise ConfigError(f"distill_steps must be >= 0, got {distill_steps}")
    if distill_steps and not distill_texts:
        raise ConfigError("distillation needs server-owned texts (distill_texts is empty)")
    full = load_full_model(full_model_dir)
    layer_map = LayerMap.plan(len(blocks_of(full)), bottom, top, keep_every, model_fingerprint(full_model_dir))
    emulator = keep_blocks(copy.deepcopy(full), layer_map.layers)
    if distill_steps:
        from fedpeft.common.offsite.distill import distill_middle

        tokenizer = AutoTokenizer.from_pretrained(full_model_dir, local_files_only=True)
        losses = distill_middle(emulator, full, layer_map, distill_texts, tokenizer, steps=distill_steps, lr=distill_lr,
                                batch_size=distill_batch_size, max_length=max_length, seed=seed)
        log.info("offsite: distilled the emulator for %d steps (middle-output MSE %.4g -> %.4g)", distill_steps,
                 losses[0], losses[-1])
        layer_map = dataclasses.replace(layer_map, distill_steps=distill_steps)
    out_dir.mkdir(parents=True, exist_ok=True)
    emulator.to(getattr(torch, dtype)).save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(full_model_dir, local_files_only=True).save_pretrained(out_dir)
    layer_map.save(out_dir)
    log.info("offsite: emulator with %d of %d blocks (adapter %s, keep_every=%d, %s) written to %s",
             layer_map.emulator_layers, layer_map.full_layers, list(layer_map.adapter), keep_every, dtype, out_dir)
    return layer_map
