"""peft-bench-gen: held-out rows, ROUGE-L and a tiny end-to-end run of the three adapters."""

from __future__ import annotations

import csv
import json

import pytest

from fedpeft.common.errors import DataError
from fedpeft.simulations.bench.generation import held_out_rows, parse_prompt_answer, rouge_l

ALPACA = ("Below is an instruction that describes a task. Write a response that appropriately completes the request."
          "\n\n### Instruction:\n{instruction}\n\n{input}### Response:")


def test_alpaca_style_prompts_become_instruction_rows():
    plain = {"prompt": ALPACA.format(instruction="Why is the sky blue?", input=""), "answer": "Rayleigh scattering."}
    assert parse_prompt_answer(plain) == {"instruction": "Why is the sky blue?", "input": "", "output": "Rayleigh scattering."}
    with_input = {"prompt": ALPACA.format(instruction="Summarize.", input="### Input:\nA long text.\n\n"), "answer": "Short."}
    assert parse_prompt_answer(with_input) == {"instruction": "Summarize.", "input": "A long text.", "output": "Short."}
    for bad in ({"prompt": "no sections", "answer": "x"}, {"prompt": 3, "answer": "x"}, {"text": "x"}):
        with pytest.raises(DataError):
            parse_prompt_answer(bad)


def test_rouge_l_is_one_for_identical_text_and_zero_for_disjoint_text():
    assert rouge_l(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(1.0)
    assert rouge_l(["dogs bark loudly"], ["the cat sat"]) == 0.0
    assert 0 < rouge_l(["a cat was sitting on a mat"], ["the cat sat on the mat"]) < 1


def test_the_shared_dolly_sample_reads_as_instruction_rows():
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "shared" / "data" / "dolly_eval_151" / "dolly.jsonl"
    if not path.is_file():
        pytest.skip("../shared/data/dolly_eval_151 is not beside this checkout")
    rows = held_out_rows(path)
    assert len(rows) == 151 and all(r["instruction"] and r["output"] for r in rows)
    assert sum(1 for r in rows if r["input"]) > 0


@pytest.mark.slow
def test_tiny_generative_benchmark_end_to_end(tiny_model_dir, tmp_path):
    from fedpeft.simulations.bench.generation import main

    train = [{"instruction": f"Say the word {w}.", "input": "", "output": f"{w} {w}"} for w in ("positive", "negative") * 8]
    (tmp_path / "train.json").write_text(json.dumps(train))
    held = [{"prompt": ALPACA.format(instruction=f"Say the word {w}.", input=""), "answer": f"{w} {w}"}
            for w in ("positive", "negative")]
    (tmp_path / "dolly.jsonl").write_text("".join(json.dumps(r) + "\n" for r in held))
    out = tmp_path / "gen"
    assert main(["--model", str(tiny_model_dir), "--data", str(tmp_path / "train.json"),
                 "--eval-data", str(tmp_path / "dolly.jsonl"), "--clients", "2", "--rounds", "2", "--local-steps", "3",
                 "--batch-size", "4", "--max-length", "48", "--max-new-tokens", "4", "--out", str(out)]) == 0
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["setting"] for r in rows] == ["zero-shot", "centralized", "federated"]
    assert rows[1]["optimizer_steps"] == rows[2]["optimizer_steps"] == "12"
    assert float(rows[1]["eval_loss"]) < float(rows[0]["eval_loss"])  # training on the task lowers its loss
    assert float(rows[2]["eval_loss"]) < float(rows[0]["eval_loss"])
    generations = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(generations) == 2 and {"zero-shot", "centralized", "federated", "reference"} <= set(generations[0])
    assert "| federated |" in (out / "results.md").read_text() and (out / "results.png").stat().st_size > 0
    assert (out / "federated" / "metrics.jsonl").is_file()
