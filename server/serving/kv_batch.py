"""KV-cache bookkeeping for continuous batching: prefill, join, leave, decode.

A running batch is left-padded: every row's cached keys end at the same column, so one
decode step appends one column for all rows. New requests are prefilled together
(left-padded among themselves) and then joined to the running batch by padding the
shorter of the two caches on the left; finished rows are dropped with `index_select`
and columns that became padding for every row are trimmed. Position ids are carried
per row (pads do not count), so a row's outputs do not depend on who it is batched
with, up to float rounding. Written by hand because transformers' `generate` batches
only requests that start together.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache


@dataclass
class BatchState:
    """The cache, padding mask and next position of every row of a running batch."""

    cache: DynamicCache
    mask: torch.Tensor
    """[rows, columns] 1 for real tokens, 0 for left padding."""
    next_position: torch.Tensor
    """[rows] position id of each row's next token."""

    @property
    def size(self) -> int:
        return int(self.mask.shape[0])


def _layers(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _rebuild(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    return DynamicCache(ddp_cache_data=pairs)


@torch.no_grad()
def prefill(model: nn.Module, prompts: list[list[int]], pad_id: int) -> tuple[BatchState, torch.Tensor]:
    """Run the prompts (left-padded together); return their state and last-token logits."""
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[i, width - len(prompt):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                past_key_values=DynamicCache(), use_cache=True)
    state = BatchState(out.past_key_values, mask.to(device), mask.sum(-1).to(device))
    return state, out.logits[:, -1, :].float()


@torch.no_grad()
def decode_step(model: nn.Module, state: BatchState, tokens: torch.Tensor) -> torch.Tensor:
    """Feed one token per row; returns the next-token logits [rows, vocab]."""
    device = state.mask.device
    state.mask = torch.cat([state.mask, torch.ones((state.size, 1), dtype=state.mask.dtype, device=device)], dim=1)
    out = model(input_ids=tokens.view(-1, 1).to(device), attention_mask=state.mask,
                position_ids=state.next_position.view(-1, 1), past_key_values=state.cache, use_cache=True)
    state.cache = out.past_key_values
    state.next_position = state.next_position + 1
    return out.logits[:, -1, :].float()


def _pad_left(tensor: torch.Tensor, columns: int, dim: int) -> torch.Tensor:
    if columns == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = columns
    return torch.cat([torch.zeros(shape, dtype=tensor.dtype, device=tensor.device), tensor], dim=dim)


def join(a: BatchState | None, b: BatchState) -> BatchState:
    """The rows of `a` followed by the rows of `b`, aligned on their last column."""
    if a is None or a.size == 0:
        return b
    width = max(a.mask.shape[1], b.mask.shape[1])
    pa, pb = width - a.mask.shape[1], width - b.mask.shape[1]
    pairs = [
        (torch.cat([_pad_left(ka, pa, 2), _pad_left(kb, pb, 2)]), torch.cat([_pad_left(va, pa, 2), _pad_left(vb, pb, 2)]))
        for (ka, va), (kb, vb) in zip(_layers(a.cache), _layers(b.cache), strict=True)
    ]
    mask = torch.cat([_pad_left(a.mask, pa, 1), _pad_left(b.mask, pb, 1)])
    return BatchState(_rebuild(pairs), mask, torch.cat([a.next_position, b.next_position]))


def keep(state: BatchState, rows: list[int]) -> BatchState | None:
    """Only `rows` (in that order), with columns that are padding in every kept row trimmed."""
    if not rows:
        return None
    index = torch.tensor(rows, dtype=torch.long, device=state.mask.device)
    mask = state.mask.index_select(0, index)
    real = mask.sum(0).nonzero()
    start = int(real[0]) if len(real) else 0
    pairs = [(k.index_select(0, index)[:, :, start:], v.index_select(0, index)[:, :, start:])
             for k, v in _layers(state.cache)]
    return BatchState(_rebuild(pairs), mask[:, start:].contiguous(), state.next_position.index_select(0, index))
