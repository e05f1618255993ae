"""Optional emulator distillation: tune the kept middle blocks so that the emulator's
middle output matches the full model's on server-owned text (Offsite-Tuning's NLD step,
cheap version: a few AdamW steps of hidden-state MSE).

The adapter blocks below the middle are identical in both models, so both middles see
the same input; forward hooks capture the middle output and stop the pass there.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from fedpeft.common.model.architectures import blocks_of
from fedpeft.common.offsite.layer_map import LayerMap

log = logging.getLogger("fedpeft.offsite")


class _Stop(Exception):
    """Raised by the capture hook: nothing above the middle is needed."""


def _middle_output(model: nn.Module, last_middle: int, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    captured: list[torch.Tensor] = []

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output)
        raise _Stop

    handle = blocks_of(model)[last_middle].register_forward_hook(hook)
    try:
        model(**batch)
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured[0]


def distill_middle(emulator: nn.Module, full: nn.Module, layer_map: LayerMap, texts: Sequence[str], tokenizer: Any, *,
                   steps: int, lr: float = 1e-4, batch_size: int = 4, max_length: int = 128, seed: int = 0) -> list[float]:
    """Train the emulator's middle blocks in place; returns the loss per step."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    emulator_last = layer_map.middle[-1]
    full_last = layer_map.full_layers - layer_map.top - 1
    for param in emulator.parameters():
        param.requires_grad_(False)
    middle_params = [p for i in layer_map.middle for p in blocks_of(emulator)[i].parameters()]
    for param in middle_params:
        param.requires_grad_(True)
    optimizer = torch.optim.AdamW(middle_params, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    emulator.train()
    losses = []
    for _ in range(steps):
        pick = torch.randint(len(texts), (batch_size,), generator=generator).tolist()
        batch = dict(tokenizer([texts[i] for i in pick], return_tensors="pt", padding=True, truncation=True,
                               max_length=max_length))
        mask = batch["attention_mask"].unsqueeze(-1).float()
        with torch.no_grad():
            target = _middle_output(full, full_last, batch)
        out = _middle_output(emulator, emulator_last, batch)
        loss = (((out - target) ** 2) * mask).sum() / (mask.sum() * out.shape[-1])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if len(losses) % 25 == 0 or len(losses) == steps:
            log.info("offsite: distillation step %d/%d, middle-output MSE %.4g", len(losses), steps, losses[-1])
    for param in middle_params:
        param.requires_grad_(False)
    emulator.eval()
    return losses
