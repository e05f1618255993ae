"""What a model is trained and scored on, per model kind.

- causal LMs learn the target tokens (instruction responses, or a classification task's
  label *word*) and are scored by label-word likelihoods (`fedpeft.common.training.evaluation`);
- sequence classifiers (encoders with a task head) learn label indices with
  cross-entropy on the head and are scored by the head's argmax.

Training (`fedpeft.client.training`) and evaluation (server and clients) both go
through an `Objective`, so they always agree on how a row becomes tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from fedpeft.common.data.records import IGNORE_INDEX, Record, TaskSpec, collate, encode_for_training, template_fields
from fedpeft.common.errors import ConfigError, DataError
from fedpeft.common.model.architectures import ARCHITECTURES, is_sequence_classifier
from fedpeft.common.training.evaluation import EvalResult, binary_auc, evaluate, model_device


class Objective(Protocol):
    def encode(self, row: Record) -> Any:
        """One row as the unit `collate` batches."""

    def collate(self, items: Sequence[Any]) -> dict[str, torch.Tensor]:
        """A batch of encoded rows as model inputs (+ labels)."""

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The training loss of a batch."""

    def evaluate(self, model: nn.Module, rows: Sequence[Record], batch_size: int) -> EvalResult:
        """Held-out loss (and accuracy for classification)."""


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def target_positions(labels: torch.Tensor) -> torch.Tensor:
    """Flat indices into (batch * seq) of the hidden states that predict a target token
    (row-major, as a boolean mask would select them). Computed where `labels` lives: from
    labels still on the host, a GPU step never waits for the device to count targets."""
    rows, cols = (labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)
    return rows * labels.shape[1] + cols


def target_token_loss(head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor,
                      labels: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor | None:
    """The causal-LM loss (shifted cross-entropy, mean over target tokens) with `head` run
    only on the hidden states that predict a target; None when the batch has no target.

    Written here because HF's causal-LM loss takes full (batch, seq, vocab) logits: with a
    49k-token vocabulary those logits and their gradients dominate a training step's
    memory, while a classification row has one or two target tokens. Same value and
    gradients as the full loss. `positions` (`target_positions`, on `hidden`'s device)
    saves counting the targets on the device.
    """
    if positions is None:
        positions = target_positions(labels)
    if positions.numel() == 0:
        return None
    states = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)
    targets = labels.reshape(-1).index_select(0, positions + 1)  # the next token of the same row
    return nn.functional.cross_entropy(head(states).float(), targets)


def _backbone_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """The transformer body (returns the final-normed hidden states) and the plain LM head
    of `model`, when calling them directly computes what `model(...)` would; else None.

    Not for prompt-learning PEFT methods (prompt/P-tuning prepend virtual tokens and
    prefix tuning passes a cache in `PeftModel.forward`), tuners whose forward changes
    the loss (AdaLoRA adds its orthogonality penalty), wrappers with forward hooks (which
    calling the body would skip: e.g. AdapterDrop's random drop), heads other than a plain
    `lm_head` linear map (BERT's transform + decoder), nor logit soft-capping or scaling.
    """
    from peft.tuners.tuners_utils import BaseTuner

    wrappers = [model]
    inner = model
    if hasattr(model, "get_base_model") and hasattr(model, "peft_config"):  # a peft.PeftModel
        if model.active_peft_config.is_prompt_learning or type(model.base_model).forward is not BaseTuner.forward:
            return None
        inner = model.get_base_model()
        wrappers += [model.base_model, inner]
    if any(w._forward_pre_hooks or w._forward_hooks for w in wrappers):
        return None
    config = getattr(inner, "config", None)
    spec = ARCHITECTURES.get(getattr(config, "model_type", None) or "")
    if spec is None or not type(inner).__name__.endswith(("ForCausalLM", "LMHeadModel")):
        return None
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return None
    head = inner.get_output_embeddings()
    if not isinstance(head, nn.Linear) or head is not getattr(inner, "lm_head", None):
        return None
    return inner.get_submodule(spec.backbone), head


@dataclass(frozen=True)
class CausalLMObjective:
    """Next-token loss on target tokens; label-word likelihood scoring."""

    task: TaskSpec
    tokenizer: Any
    max_length: int

    def encode(self, row: Record) -> Any:
        return encode_for_training(self.task, self.tokenizer, row, self.max_length)

    def collate(self, items: Sequence[Any]) -> dict[str, torch.Tensor]:
        return collate(items, self.tokenizer.pad_token_id)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The model's own causal-LM loss; computed with the LM head only at target
        positions (`target_token_loss`) wherever that gives the same result."""
        device = model_device(model)
        parts = _backbone_and_head(model)
        positions = target_positions(batch["labels"]).to(device) if parts is not None else None  # before the move
        batch = _to(batch, device)
        if parts is not None:
            backbone, head = parts
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            hidden = backbone(**inputs, use_cache=False).last_hidden_state  # training: no KV cache to build
            loss = target_token_loss(head, hidden, batch["labels"], positions)
            if loss is not None:
                return loss
        return model(**batch).loss

    def evaluate(self, model: nn.Module, rows: Sequence[Record], batch_size: int) -> EvalResult:
        return evaluate(model, self.tokenizer, self.task, rows, self.max_length, batch_size)


@dataclass(frozen=True)
class SequenceClassificationObjective:
    """Cross-entropy on the classification head; the input is the row's text field(s)
    (one field, or two as a text pair, e.g. premise and hypothesis)."""

    task: TaskSpec
    tokenizer: Any
    max_length: int
    label_shift: torch.Tensor | None = None
    """Added to the logits in the training loss only (`TrainConfig.logit_adjustment`)."""

    def __post_init__(self) -> None:
        if self.task.kind != "classification":
            raise ConfigError("an encoder with a classification head needs a classification task, not an instruction task")
        if not 1 <= len(self.text_fields) <= 2:
            raise DataError(f"a sequence classifier reads one text or a text pair; template {self.task.template!r} "
                            f"names {len(self.text_fields)} columns")

    @property
    def text_fields(self) -> list[str]:
        return list(dict.fromkeys(template_fields(self.task.template)))

    def encode(self, row: Record) -> dict[str, Any]:
        texts = [str(row[f]) for f in self.text_fields]
        encoded = self.tokenizer(*texts, truncation=True, max_length=self.max_length)
        encoded = {k: v for k, v in encoded.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        return {**encoded, "labels": self.task.labels.index(str(row[self.task.label_column]))}

    def collate(self, items: Sequence[Any]) -> dict[str, torch.Tensor]:
        return dict(self.tokenizer.pad(list(items), return_tensors="pt"))

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        batch = _to(batch, model_device(model))
        if self.label_shift is None:
            return model(**batch).loss
        labels = batch.pop("labels")
        logits = model(**batch).logits.float()
        return nn.functional.cross_entropy(logits + self.label_shift.to(logits.device), labels)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, rows: Sequence[Record], batch_size: int) -> EvalResult:
        was_training = model.training
        model.eval()
        try:
            total_loss, correct = 0.0, 0
            margins, golds = [], []
            encoded = [self.encode(r) for r in rows]
            for start in range(0, len(encoded), batch_size):
                batch = _to(self.collate(encoded[start:start + batch_size]), model_device(model))
                out = model(**batch)
                logits = out.logits.float()
                total_loss += float(nn.functional.cross_entropy(logits, batch["labels"], reduction="sum"))
                correct += int((logits.argmax(dim=-1) == batch["labels"]).sum())
                if logits.shape[-1] == 2:
                    margins.append((logits[:, 1] - logits[:, 0]).cpu())
                    golds.append(batch["labels"].cpu())
        finally:
            model.train(was_training)
        auc = binary_auc(torch.cat(margins), torch.cat(golds)) if margins else None
        return EvalResult(loss=total_loss / max(len(rows), 1), accuracy=correct / max(len(rows), 1),
                          num_examples=len(rows), auc=auc)


def objective_for(model: nn.Module, tokenizer: Any, task: TaskSpec, max_length: int) -> Objective:
    """The objective that fits `model`'s kind."""
    if is_sequence_classifier(model):
        return SequenceClassificationObjective(task, tokenizer, max_length)
    return CausalLMObjective(task, tokenizer, max_length)
