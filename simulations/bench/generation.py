"""`peft-bench-gen`: does federated instruction tuning help a generative model?

One causal LM (default: the built-in SmolLM2-135M-Instruct), one PEFT method, three
adapters scored on the same held-out instructions:

- `zero-shot`: the untrained adapter (the base model itself for LoRA, whose B starts at 0);
- `centralized`: one process trains on all training rows for as many optimizer steps as
  the whole federation takes (rounds x clients x local steps);
- `federated`: a federation on Flower's Simulation Engine over an IID (or `--partition`)
  split of the same rows, with the method's federated defaults.

Each is scored by held-out loss (mean over response tokens, the loss the server reports
every round) and by ROUGE-L F1 of greedy generations against the reference answers
(Google's `rouge-score`, with its Porter stemmer). Held-out data may be fedpeft's
instruction format (instruction / input / output) or Alpaca-style prompt / answer pairs
(dolly_eval_151): `### Instruction:` / `### Input:` sections are parsed out of the prompt
and re-templated the way training prompts are. Writes `results.csv`, `results.md`,
`results.png` and `generations.jsonl` (every prompt, reference and output).

    peft-bench-gen --data ../shared/data/alpaca_1k/alpaca_data_1k.json \\
        --eval-data ../shared/data/dolly_eval_151/dolly.jsonl --out runs/bench-gen
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedpeft.common.data.records import Record
from fedpeft.common.errors import ConfigError, DataError, FedPeftError
from fedpeft.common.logs import apply_offline_env

if TYPE_CHECKING:
    from torch import nn

    from fedpeft.common.data.records import TaskSpec
    from fedpeft.server.federation.spec import RunSpec

log = logging.getLogger("fedpeft.bench")
SETTINGS = ("zero-shot", "centralized", "federated")
_SECTION = re.compile(r"### (Instruction|Input|Response):\s*\n?")


def parse_prompt_answer(row: Record) -> Record:
    """An Alpaca-style {prompt, answer} row as {instruction, input, output}."""
    prompt, answer = row.get("prompt"), row.get("answer")
    if not isinstance(prompt, str) or not isinstance(answer, str):
        raise DataError(f"a held-out row needs text fields prompt and answer (or instruction and output), got {sorted(row)}")
    parts = _SECTION.split(prompt)
    sections = {parts[i]: parts[i + 1].strip() for i in range(1, len(parts) - 1, 2)}
    if not sections.get("Instruction"):
        raise DataError(f"prompt has no '### Instruction:' section: {prompt[:80]!r}")
    return {"instruction": sections["Instruction"], "input": sections.get("Input", ""), "output": answer}


def held_out_rows(path: Path) -> list[Record]:
    """The held-out file as instruction rows (converting prompt / answer rows)."""
    from fedpeft.common.data.records import read_records

    rows = read_records(path)
    if not rows:
        raise DataError(f"{path}: no rows")
    return [r if "instruction" in r else parse_prompt_answer(r) for r in rows]


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F1 (rouge-score, stemmed)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references, strict=True)]
    return sum(scores) / len(scores) if scores else 0.0


def generate_answers(model: nn.Module, tokenizer: Any, task: TaskSpec, rows: Sequence[Record],
                     max_new_tokens: int) -> list[str]:
    """Greedy continuations of each row's training-format prompt (one at a time: no padding effects)."""
    import torch

    from fedpeft.common.training.evaluation import model_device

    model.eval()
    device = model_device(model)
    eos = tokenizer.eos_token_id
    out = []
    with torch.no_grad():
        for i, row in enumerate(rows):
            ids = tokenizer(task.prompt(row), return_tensors="pt").input_ids.to(device)
            generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                       do_sample=False, pad_token_id=tokenizer.pad_token_id or eos, eos_token_id=eos)
            out.append(tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True).strip())
            if (i + 1) % 25 == 0:
                log.info("generated %d/%d answers", i + 1, len(rows))
    return out


@dataclass(frozen=True)
class GenRow:
    setting: str
    eval_loss: float
    rouge_l: float
    optimizer_steps: int
    seconds: float


def score(model: nn.Module, tokenizer: Any, task: TaskSpec, rows: Sequence[Record], max_length: int,
          max_new_tokens: int) -> tuple[float, float, list[str]]:
    """(held-out loss, ROUGE-L, generations) of `model` on `rows`."""
    from fedpeft.common.training.objectives import objective_for

    loss = objective_for(model, tokenizer, task, max_length).evaluate(model, rows, 8).loss
    answers = generate_answers(model, tokenizer, task, rows, max_new_tokens)
    return loss, rouge_l(answers, [str(r["output"]) for r in rows]), answers


def _load(spec: RunSpec, num_labels: int | None = None, steps: int | None = None):  # -> AdaptedModel
    """`spec`'s adapted model; `steps`: it trains that many steps in one go (AdaLoRA's budget
    schedule then spans them unless the spec sets `total_step`)."""
    from fedpeft.common.methods import make_config
    from fedpeft.common.model.adapted import AdaptedModel
    from fedpeft.common.model.base_model import resolve_model_dir
    from fedpeft.common.model.quantization import resolve_quantize

    f = spec.federation
    return AdaptedModel.load(resolve_model_dir(f.model), resolve_quantize(f.quantize), f.method,  # type: ignore[arg-type]
                             make_config(f.method, spec.method_options(steps)), seed=f.seed, num_labels=num_labels)


def run_benchmark(spec: RunSpec, out_dir: Path, max_new_tokens: int) -> list[GenRow]:
    """Zero-shot, centralized and federated adapters of `spec`, scored on its held-out rows."""
    from fedpeft.client.training import train_local
    from fedpeft.server.federation.task_data import load_task_data
    from fedpeft.simulations.runner import run_simulation

    data = load_task_data(spec.task, spec.federation.seed)
    if data.task.kind != "instruction":
        raise ConfigError(f"peft-bench-gen scores instruction tasks; {spec.task.train_data} is a {data.task.kind} task")
    rows = data.eval_rows
    training = spec.centralized_train_config()
    assert training.local_steps is not None
    steps = spec.federation.rounds * spec.federation.clients * training.local_steps
    results: list[GenRow] = []
    generations: dict[str, list[str]] = {}

    def record(setting: str, model: nn.Module, tokenizer: Any, started: float, optimizer_steps: int) -> None:
        loss, rouge, answers = score(model, tokenizer, data.task, rows, training.max_length, max_new_tokens)
        results.append(GenRow(setting, loss, rouge, optimizer_steps, time.perf_counter() - started))
        generations[setting] = answers
        log.info("%s: held-out loss %.4f, ROUGE-L %.4f", setting, loss, rouge)
        write_results(results, generations, rows, out_dir)

    started = time.perf_counter()
    adapted = _load(spec, steps=steps)  # (zero-shot scores it untrained, then it trains centrally)
    record("zero-shot", adapted.model, adapted.tokenizer, started, 0)
    started = time.perf_counter()
    config = dataclasses.replace(training, local_steps=steps, local_epochs=0.0, log_every=max(1, steps // 10))
    train_local(adapted, data.task, data.train_rows, config, seed=spec.federation.seed, label="centralized")
    record("centralized", adapted.model, adapted.tokenizer, started, steps)
    del adapted
    started = time.perf_counter()
    run_simulation(spec, out_dir / "federated",
                   on_complete=lambda server: record("federated", server.model, server.tokenizer, started, steps))
    return results


def write_results(results: Sequence[GenRow], generations: dict[str, list[str]], rows: Sequence[Record],
                  out_dir: Path) -> str:
    """results.csv, results.md, results.png and generations.jsonl; returns the Markdown table."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "results.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow([f.name for f in dataclasses.fields(GenRow)])
        for r in results:
            writer.writerow([r.setting, f"{r.eval_loss:.4f}", f"{r.rouge_l:.4f}", r.optimizer_steps, f"{r.seconds:.1f}"])
    zero = next((r for r in results if r.setting == "zero-shot"), None)
    lines = ["| setting | held-out loss | ROUGE-L | vs zero-shot (loss / ROUGE-L) | optimizer steps |", "|---|---|---|---|---|"]
    for r in results:
        delta = (f"{r.eval_loss - zero.eval_loss:+.4f} / {r.rouge_l - zero.rouge_l:+.4f}"
                 if zero is not None and r is not zero else "-")
        lines.append(f"| {r.setting} | {r.eval_loss:.4f} | {r.rouge_l:.4f} | {delta} | {r.optimizer_steps} |")
    table = "\n".join(lines) + "\n"
    (out_dir / "results.md").write_text(table)
    with (out_dir / "generations.jsonl").open("w") as fh:
        for i, row in enumerate(rows):
            fh.write(json.dumps({"instruction": row["instruction"], "input": row.get("input", ""),
                                 "reference": row["output"],
                                 **{s: answers[i] for s, answers in generations.items()}}) + "\n")
    _plot(results, out_dir / "results.png")
    return table


def _plot(results: Sequence[GenRow], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    names = [r.setting for r in results]
    axes[0].bar(names, [r.eval_loss for r in results], color="tab:blue")
    axes[0].set_title("held-out loss (lower is better)")
    axes[1].bar(names, [r.rouge_l for r in results], color="tab:green")
    axes[1].set_title("ROUGE-L F1 (higher is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    apply_offline_env()
    from fedpeft.common.files import write_json_atomic
    from fedpeft.common.logs import setup_logging
    from fedpeft.server.federation.flags import spec_from_flags

    p = argparse.ArgumentParser(prog="peft-bench-gen", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--method", default="lora")
    p.add_argument("--data", required=True, help="instruction training rows (instruction / input / output)")
    p.add_argument("--eval-data", required=True, help="held-out rows: instruction / input / output or prompt / answer")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--local-steps", type=int, help="default: the method's federated default")
    p.add_argument("--partition", default="iid")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--train-limit", type=int, default=0)
    p.add_argument("--eval-limit", type=int, default=0, help="held-out rows scored (0 = all)")
    p.add_argument("--quantize", default="none")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/bench-gen")
    args = p.parse_args(argv)
    setup_logging()
    out_dir = Path(args.out)
    try:
        if args.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens must be >= 1 (got {args.max_new_tokens})")
        rows = held_out_rows(Path(args.eval_data))
        rows = rows[:args.eval_limit] if args.eval_limit else rows
        out_dir.mkdir(parents=True, exist_ok=True)
        eval_path = out_dir / "held-out.json"  # the converted rows, the file the federation scores too
        write_json_atomic(eval_path, rows)
        steps = {} if args.local_steps is None else {"local_steps": args.local_steps}
        spec = spec_from_flags(model=args.model, method=args.method, data=args.data, eval_data=str(eval_path),
                               task="instruction", clients=args.clients, rounds=args.rounds, partition=args.partition,
                               batch_size=args.batch_size, max_length=args.max_length, train_limit=args.train_limit,
                               eval_limit=0, quantize=args.quantize, seed=args.seed, **steps)
        spec.validate("simulation")
        results = run_benchmark(spec, out_dir, args.max_new_tokens)
    except FedPeftError as exc:
        print(f"peft-bench-gen: error: {exc}", file=sys.stderr)
        return exc.exit_code
    print((out_dir / "results.md").read_text())
    return 0 if len(results) == len(SETTINGS) else 1


if __name__ == "__main__":
    sys.exit(main())
