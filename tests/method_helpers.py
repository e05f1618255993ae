"""Shared steps for method tests: a probe batch, a couple of training steps, logits."""

from __future__ import annotations

import torch

from fedpeft.common.model.adapted import AdaptedModel
from fedpeft.common.training.evaluation import model_device


def probe_batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two fixed token rows, the second right-padded (exercises attention masks)."""
    x = torch.randint(3, vocab, (2, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(x)
    mask[1, 7:] = 0
    return x, mask


def train_steps(adapted: AdaptedModel, x: torch.Tensor, mask: torch.Tensor, steps: int = 2) -> None:
    """A few AdamW steps on the delta (two: LoRA's zero B makes A's first gradient zero)."""
    device = model_device(adapted.model)
    x, mask = x.to(device), mask.to(device)
    opt = torch.optim.AdamW(adapted.trainable_parameters(), lr=1e-2)
    adapted.model.train()
    for _ in range(steps):
        adapted.model(input_ids=x, attention_mask=mask, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()


def logits(model: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Eval-mode logits on CPU."""
    model.eval()
    device = model_device(model)
    with torch.no_grad():
        return model(input_ids=x.to(device), attention_mask=mask.to(device)).logits.cpu()
