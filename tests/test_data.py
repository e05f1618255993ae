"""Reading local data, inferring the task, and encoding with a target-only loss mask."""

from __future__ import annotations

import json

import pytest

from fedpeft.common.data.builtin_task import builtin_splits, builtin_task
from fedpeft.common.data.records import (
    IGNORE_INDEX,
    TaskSpec,
    encode,
    encode_for_training,
    infer_task,
    parse_verbalizer,
    read_records,
)
from fedpeft.common.errors import DataError


def test_reads_jsonl_json_csv_and_glue_style_tsv(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "hi", "label": 1}\n\n{"text": "yo", "label": 0}\n')
    (tmp_path / "a.json").write_text(json.dumps([{"instruction": "i", "output": "o"}]))
    (tmp_path / "a.csv").write_text('text,label\n"a, quoted",pos\n')
    (tmp_path / "a.tsv").write_text('sentence\tlabel\nit \'s a "great" film\t1\n')
    assert read_records(tmp_path / "a.jsonl") == [{"text": "hi", "label": 1}, {"text": "yo", "label": 0}]
    assert read_records(tmp_path / "a.json")[0]["output"] == "o"
    assert read_records(tmp_path / "a.csv") == [{"text": "a, quoted", "label": "pos"}]
    assert read_records(tmp_path / "a.tsv") == [{"sentence": 'it \'s a "great" film', "label": "1"}]


@pytest.mark.parametrize(
    ("name", "content", "fragment"),
    [("bad.jsonl", '{"a": 1}\n{oops\n', "bad.jsonl:2: not valid JSON"),
     ("bad.json", '{"a": 1}', "must hold a list"),
     ("broken.json", '[{"a": 1}', "not valid JSON"),
     ("ragged.csv", "text,label\na,1,extra\n", "field count differs"),
     ("short.tsv", "sentence\tlabel\njust text\n", "field count differs"),
     ("bad.parquet", "x", "unsupported data format"),
     ("empty.csv", "text,label\n", "no records")],
)
def test_unreadable_data_gets_a_clear_error(tmp_path, name, content, fragment):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=fragment):
        read_records(tmp_path / name)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_records(tmp_path / "nope.jsonl")


def test_task_inference():
    assert infer_task([{"instruction": "a", "output": "b"}]).kind == "instruction"
    task = infer_task([{"sentence": "x", "label": "0"}, {"sentence": "y", "label": "1"}], labels="0=negative,1=positive")
    assert task.kind == "classification"
    assert task.template == "Text: {sentence}\nLabel:"
    assert task.verbalizer == {"0": "negative", "1": "positive"}
    words = infer_task([{"text": "x", "label": "spam"}, {"text": "y", "label": "ham"}])
    assert words.verbalizer == {"ham": "ham", "spam": "spam"}


def test_numeric_labels_without_words_ask_for_them():
    with pytest.raises(DataError, match="--labels 0=WORD,1=WORD"):
        infer_task([{"text": "x", "label": 0}, {"text": "y", "label": 1}])


@pytest.mark.parametrize("template", ["{text", "{}{text}", "{0}", "Label: }"])
def test_malformed_templates_are_rejected(template):
    with pytest.raises(DataError, match="template"):
        TaskSpec(kind="classification", template=template, verbalizer={"0": "no", "1": "yes"})


def test_bad_verbalizer_and_rows_are_reported():
    with pytest.raises(DataError, match="LABEL=WORD"):
        parse_verbalizer("negative,positive")
    with pytest.raises(DataError, match="distinct"):
        TaskSpec(kind="classification", template="{text}", verbalizer={"0": "same", "1": "same"})
    task = TaskSpec(kind="classification", template="{text}", verbalizer={"0": "no", "1": "yes"})
    with pytest.raises(DataError, match="record 1 lacks column"):
        task.check_rows([{"text": "a", "label": 0}, {"label": 1}], "x.csv")
    with pytest.raises(DataError, match="record 0 has label 7, not one of"):
        task.check_rows([{"text": "a", "label": 7}], "x.csv")


def test_loss_mask_covers_only_the_target(tiny_model_dir):
    from fedpeft.common.model.base_model import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    task = TaskSpec(kind="instruction")
    enc = encode_for_training(task, tok, {"instruction": "Route this ticket", "output": "billing"}, 64)
    prompt_len = len(tok(task.prompt({"instruction": "Route this ticket"}))["input_ids"])
    assert enc.labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert enc.labels[prompt_len:] == enc.input_ids[prompt_len:]
    assert enc.input_ids[-1] == tok.eos_token_id  # instruction targets end with EOS


def test_truncation_keeps_the_whole_target(tiny_model_dir):
    from fedpeft.common.model.base_model import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    enc = encode(tok, "word " * 200, " billing", max_length=16, add_eos=False)
    target = tok(" billing", add_special_tokens=False)["input_ids"]
    assert len(enc.input_ids) == 16
    assert enc.input_ids[-len(target):] == target
    assert [t for t in enc.labels if t != IGNORE_INDEX] == target


def test_builtin_task_is_deterministic_and_held_out_is_unseen():
    train_a, eval_a = builtin_splits(400, 100, seed=0)
    train_b, _ = builtin_splits(400, 100, seed=0)
    assert train_a == train_b
    assert len(train_a) == 400 and len(eval_a) == 100
    assert not {r["text"] for r in train_a} & {r["text"] for r in eval_a}
    # held-out tickets use phrasings that never occur in training tickets
    strip = str.maketrans("", "", "0123456789")
    train_bodies = {r["text"].translate(strip) for r in train_a}
    assert not any(r["text"].translate(strip) in train_bodies for r in eval_a)
    builtin_task().check_rows(train_a + eval_a, "built-in")
    assert {r["branch"] for r in train_a} == {"north", "south", "east", "west"}
