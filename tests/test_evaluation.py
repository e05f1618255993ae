"""Evaluation: the one-forward label scoring equals full-sequence scoring."""

from __future__ import annotations

import torch

from fedpeft.common.data.builtin_task import builtin_splits, builtin_task
from fedpeft.common.data.records import collate, encode_candidates
from fedpeft.common.methods import make_config
from fedpeft.common.model.adapted import AdaptedModel
from fedpeft.common.training.evaluation import evaluate, sequence_logprobs, single_token_label_ids


def test_single_token_fast_path_equals_full_sequence_scoring(tiny_model_dir):
    # Prepare: the built-in task's label words are single tokens in the tiny tokenizer
    adapted = AdaptedModel.load(tiny_model_dir, "none", "lora", make_config("lora"), seed=0)
    task = builtin_task()
    _, rows = builtin_splits(10, 12, seed=4)
    assert single_token_label_ids(adapted.tokenizer, task) is not None
    # Execute: the slow reference, one sequence per (row, label)
    adapted.model.eval()
    flat = [c for r in rows for c in encode_candidates(task, adapted.tokenizer, r, 64)]
    logp, _ = sequence_logprobs(adapted.model, collate(flat, adapted.tokenizer.pad_token_id))
    scores = logp.view(len(rows), len(task.verbalizer))
    gold = torch.tensor([task.labels.index(r["label"]) for r in rows])
    expected_acc = float((scores.argmax(1) == gold).float().mean())
    expected_loss = float(-scores.gather(1, gold[:, None]).mean())
    result = evaluate(adapted.model, adapted.tokenizer, task, rows, max_length=64, batch_size=5)
    # Assert
    assert result.num_examples == len(rows)
    assert abs(result.accuracy - expected_acc) < 1e-9
    assert abs(result.loss - expected_loss) < 1e-4


def test_instruction_eval_reports_loss_only(tiny_model_dir):
    adapted = AdaptedModel.load(tiny_model_dir, "none", "prefix", make_config("prefix", {"num_virtual_tokens": "2"}))
    from fedpeft.common.data.records import TaskSpec

    rows = [{"instruction": "Say hi", "output": "hi"}, {"instruction": "Route", "input": "refund", "output": "billing"}]
    result = evaluate(adapted.model, adapted.tokenizer, TaskSpec(kind="instruction"), rows, max_length=64)
    assert result.accuracy is None and result.loss > 0
