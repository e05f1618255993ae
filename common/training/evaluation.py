"""Held-out evaluation of a (PEFT-wrapped) causal LM: loss, and accuracy for classification.

Used by the server for centralized evaluation of the global adapter each round, and by
clients for local evaluation; both must score exactly the same way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fedpeft.common.data.records import (
    IGNORE_INDEX,
    Encoded,
    Record,
    TaskSpec,
    collate,
    encode,
    encode_candidates,
    encode_for_training,
)


@dataclass(frozen=True)
class EvalResult:
    """Mean target-token NLL, and label-word accuracy for classification tasks."""

    loss: float
    accuracy: float | None
    num_examples: int
    auc: float | None = None
    """Two labels: the ROC AUC of the score margin (label 1 over label 0), i.e. how well the
    model ranks the rows whatever its threshold; None otherwise or when one label is absent.
    It tells a model that ranks well but sits on one side of its threshold (accuracy at the
    majority rate, AUC high) from one that learned nothing (AUC ~0.5)."""


def binary_auc(margin: torch.Tensor, gold: torch.Tensor) -> float | None:
    """ROC AUC of `margin` for `gold` in {0, 1} (Mann-Whitney U over average ranks, so tied
    scores count one half); None when either label is missing or a margin is NaN (infinite
    margins still rank). A dozen lines here rather
    than a scikit-learn dependency for one function."""
    margin, gold = margin.double().flatten(), gold.flatten()
    positives = int((gold == 1).sum())
    negatives = int(gold.numel()) - positives
    if positives == 0 or negatives == 0 or bool(torch.isnan(margin).any()):
        return None
    values, inverse, counts = torch.unique(margin, sorted=True, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    average_rank = ends - (counts.double() - 1) / 2  # 1-based rank of each distinct value, ties averaged
    rank_sum = float(average_rank[inverse][gold == 1].sum())
    return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def sequence_logprobs(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: summed log-probability of its target tokens, and how many there are."""
    device = model_device(model)
    logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
    logits = logits[:, :-1].float()
    targets = batch["labels"][:, 1:].to(device)
    mask = targets != IGNORE_INDEX
    logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logp * mask).sum(dim=1).cpu(), mask.sum(dim=1).cpu()


def _batched(items: Sequence[Encoded], size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def evaluate(model: nn.Module, tokenizer: Any, task: TaskSpec, rows: Sequence[Record],
             max_length: int, batch_size: int = 16) -> EvalResult:
    """Score `rows` with `model` in eval mode (restores the previous mode afterwards)."""
    was_training = model.training
    model.eval()
    try:
        if task.kind == "classification":
            return _evaluate_classification(model, tokenizer, task, rows, max_length, batch_size)
        return _evaluate_generation_loss(model, tokenizer, task, rows, max_length, batch_size)
    finally:
        model.train(was_training)


def _evaluate_generation_loss(model, tokenizer, task, rows, max_length, batch_size) -> EvalResult:
    encoded = [encode_for_training(task, tokenizer, r, max_length) for r in rows]
    total_logp, total_tokens = 0.0, 0
    for chunk in _batched(encoded, batch_size):
        logp, count = sequence_logprobs(model, collate(chunk, tokenizer.pad_token_id))
        total_logp += float(logp.sum())
        total_tokens += int(count.sum())
    return EvalResult(loss=-total_logp / max(total_tokens, 1), accuracy=None, num_examples=len(rows))


def single_token_label_ids(tokenizer: Any, task: TaskSpec) -> list[int] | None:
    """Token ids of the label words when every one is a single token, else None."""
    ids = [tokenizer(" " + word, add_special_tokens=False)["input_ids"] for word in task.verbalizer.values()]
    return [i[0] for i in ids] if all(len(i) == 1 for i in ids) else None


@torch.no_grad()
def _label_logprobs_single_token(model, tokenizer, task, rows, max_length, batch_size, label_ids) -> torch.Tensor:
    """log p(label word | prompt) for all labels from one forward per prompt.

    Exact, not an approximation: prompt and label word are tokenized separately in
    both paths, so with one-token label words the full-sequence score reduces to the
    next-token distribution after the prompt.
    """
    device = model_device(model)
    out = []
    first_word = " " + next(iter(task.verbalizer.values()))
    prompts = [encode(tokenizer, task.prompt(r), first_word, max_length, add_eos=False) for r in rows]
    for chunk in _batched(prompts, batch_size):
        batch = collate(chunk, tokenizer.pad_token_id)
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
        last = batch["attention_mask"].sum(dim=1) - 2  # position predicting the (single) label token
        picked = logits[torch.arange(len(chunk)), last.to(device)].float()
        out.append(torch.log_softmax(picked, dim=-1)[:, label_ids].cpu())
    return torch.cat(out)


def _evaluate_classification(model, tokenizer, task, rows, max_length, batch_size) -> EvalResult:
    num_labels = len(task.verbalizer)
    label_ids = single_token_label_ids(tokenizer, task)
    if label_ids is not None:
        scores = _label_logprobs_single_token(model, tokenizer, task, rows, max_length, batch_size, label_ids)
        lengths = torch.ones_like(scores)
    else:
        flat = [cand for r in rows for cand in encode_candidates(task, tokenizer, r, max_length)]
        sums, counts = [], []
        for chunk in _batched(flat, batch_size):
            logp, count = sequence_logprobs(model, collate(chunk, tokenizer.pad_token_id))
            sums.append(logp)
            counts.append(count)
        scores = torch.cat(sums).view(len(rows), num_labels)
        lengths = torch.cat(counts).view(len(rows), num_labels)
    gold = torch.tensor([task.labels.index(str(r[task.label_column])) for r in rows])
    predicted = scores.argmax(dim=1)
    gold_nll = -(scores.gather(1, gold[:, None]) / lengths.gather(1, gold[:, None]).clamp(min=1)).squeeze(1)
    loss = float(gold_nll.mean())
    auc = binary_auc(scores[:, 1] - scores[:, 0], gold) if num_labels == 2 else None
    return EvalResult(loss=loss if math.isfinite(loss) else float("inf"),
                      accuracy=float((predicted == gold).float().mean()), num_examples=len(rows), auc=auc)
