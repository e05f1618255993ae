"""Local data: read JSONL/JSON/CSV/TSV records and turn them into training sequences.

Two task kinds:
- instruction: `instruction`, optional `input`, `output`; the loss covers only the
  response tokens (and the end-of-sequence token).
- classification: a prompt built from the row by a template, plus a *verbalizer* that
  maps each label to a word. Training teaches the label word; evaluation scores every
  label word's likelihood and predicts the most likely one.
"""

from __future__ import annotations

import csv
import json
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from fedpeft.common.errors import DataError
from fedpeft.common.schema import field_problems

Record = dict[str, Any]
TaskKind = Literal["instruction", "classification"]
IGNORE_INDEX = -100

INSTRUCTION_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"
INSTRUCTION_WITH_INPUT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
TEXT_COLUMN_ALIASES = ("text", "sentence", "review", "content")


def read_records(path: Path) -> list[Record]:
    """Read rows from .jsonl, .json (a list of objects), .csv or .tsv (with a header)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            rows = []
            for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
        elif suffix == ".json":
            try:
                rows = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: not valid JSON ({exc})") from None
            if not isinstance(rows, list):
                raise DataError(f"{path}: a .json data file must hold a list of objects")
        elif suffix in (".csv", ".tsv"):
            with path.open(encoding="utf-8", newline="") as fh:
                if suffix == ".tsv":  # GLUE-style TSV: no quoting, quotes are literal text
                    reader = csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
                else:
                    reader = csv.DictReader(fh)
                rows = []
                for row in reader:
                    if None in row or None in row.values():
                        raise DataError(f"{path}:{reader.line_num}: field count differs from the header "
                                        f"{reader.fieldnames}")
                    rows.append(dict(row))
        else:
            raise DataError(f"{path}: unsupported data format {suffix!r}; use .jsonl, .json, .csv or .tsv")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc})") from None
    except (OSError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None
    if not rows:
        raise DataError(f"{path}: no records")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{path}: record {i} is a {type(row).__name__}, not an object")
    return rows


def template_fields(template: str) -> list[str]:
    """Column names a `{column}` template refers to; malformed templates raise DataError."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise DataError(f"template {template!r} is malformed ({exc}); write literal braces as {{{{ and }}}}") from None
    bad = [f for f in fields if not f.isidentifier()]
    if bad:
        raise DataError(f"template {template!r}: placeholders must name a column, e.g. {{text}}; got {bad}")
    return fields


@dataclass(frozen=True)
class TaskSpec:
    """How rows become prompts and targets. Travels to clients as JSON."""

    kind: TaskKind
    template: str = ""
    """Classification prompt template with {column} placeholders (unused for instruction)."""
    label_column: str = "label"
    verbalizer: Mapping[str, str] = field(default_factory=dict)
    """Classification: label value (as text) -> the word the model should produce."""

    def __post_init__(self) -> None:
        if self.kind not in ("instruction", "classification"):
            raise DataError(f"task kind {self.kind!r} is not 'instruction' or 'classification'")
        if self.kind == "classification":
            if not self.template or not template_fields(self.template):
                raise DataError("a classification task needs a prompt template with at least one {column}")
            if len(self.verbalizer) < 2:
                raise DataError("a classification task needs at least two labels in its verbalizer")
            words = list(self.verbalizer.values())
            if len(set(words)) != len(words) or any(not w.strip() for w in words):
                raise DataError(f"verbalizer words must be distinct and non-empty, got {words}")

    @property
    def labels(self) -> list[str]:
        return list(self.verbalizer)

    @property
    def num_labels(self) -> int | None:
        """Classes of a classification task (sizes an encoder's head); None otherwise."""
        return len(self.verbalizer) if self.kind == "classification" else None

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "template": self.template, "label_column": self.label_column,
                "verbalizer": dict(self.verbalizer)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TaskSpec:
        """The task of `to_dict`'s form; anything else (a missing kind, an unknown key, a
        wrong type, a rule `__post_init__` enforces) raises DataError naming the key."""
        found = task_problems(data)
        if found:
            raise DataError(f"invalid task spec: {'; '.join(found)}")
        return cls._build(data)

    @classmethod
    def _build(cls, data: Mapping[str, Any]) -> TaskSpec:
        return cls(kind=data["kind"], template=data.get("template", ""), label_column=data.get("label_column", "label"),
                   verbalizer=dict(data.get("verbalizer", {})))

    def prompt(self, row: Record) -> str:
        if self.kind == "instruction":
            has_input = bool(str(row.get("input") or "").strip())
            template = INSTRUCTION_WITH_INPUT_TEMPLATE if has_input else INSTRUCTION_TEMPLATE
            return template.format(instruction=row["instruction"], input=row.get("input", ""))
        return self.template.format(**row)

    def target(self, row: Record) -> str:
        if self.kind == "instruction":
            return str(row["output"])
        return self.verbalizer[str(row[self.label_column])]

    def check_rows(self, rows: Sequence[Record], source: str) -> None:
        """Fail early, naming the first bad row, if rows lack what the task needs."""
        needed = ["instruction", "output"] if self.kind == "instruction" else [*template_fields(self.template), self.label_column]
        for i, row in enumerate(rows):
            missing = [c for c in needed if c not in row or row[c] is None]
            if missing:
                raise DataError(f"{source}: record {i} lacks column(s) {missing} (has {sorted(row)})")
            if self.kind == "classification" and str(row[self.label_column]) not in self.verbalizer:
                raise DataError(f"{source}: record {i} has label {row[self.label_column]!r}, not one of {self.labels}")


def task_problems(data: object, where: str = "task") -> list[str]:
    """What is wrong with `data` as a task spec's dict form, each problem named by its key
    ("WHERE.kind: missing"); empty when `TaskSpec.from_dict` accepts it. The schema is
    TaskSpec's own fields and type hints, then the rules of its `__post_init__`."""
    found = field_problems(TaskSpec, data, where)
    if not found:
        try:
            TaskSpec._build(data)  # type: ignore[arg-type]
        except DataError as exc:
            found.append(f"{where}: {exc}")
    return found


def parse_verbalizer(text: str) -> dict[str, str]:
    """Parse "0=negative,1=positive" into {"0": "negative", "1": "positive"}."""
    out: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        if "=" not in item:
            raise DataError(f"verbalizer item {item!r} is not LABEL=WORD (e.g. --labels 0=negative,1=positive)")
        label, word = (s.strip() for s in item.split("=", 1))
        out[label] = word
    return out


def infer_task(rows: Sequence[Record], *, kind: str = "auto", template: str | None = None,
               labels: str | None = None, label_column: str = "label") -> TaskSpec:
    """Work out the task from the columns when not given explicitly."""
    columns = set(rows[0])
    if kind == "auto":
        if {"instruction", "output"} <= columns:
            kind = "instruction"
        elif label_column in columns:
            kind = "classification"
        else:
            raise DataError(f"cannot tell the task from columns {sorted(columns)}: need instruction+output, or {label_column!r}")
    if kind == "instruction":
        return TaskSpec(kind="instruction")
    if template is None:
        text_col = next((c for c in TEXT_COLUMN_ALIASES if c in columns), None)
        if text_col is None:
            raise DataError(f"no text column among {sorted(columns)}; give --template with {{column}} placeholders")
        template = f"Text: {{{text_col}}}\nLabel:"
    distinct = sorted({str(r.get(label_column)) for r in rows})
    if labels:
        verbalizer = parse_verbalizer(labels)
    elif all(not d.lstrip("-").isdigit() for d in distinct):
        verbalizer = {d: d for d in distinct}
    else:
        raise DataError(f"labels {distinct} are numbers; name a word for each, e.g. --labels "
                        + ",".join(f"{d}=WORD" for d in distinct))
    return TaskSpec(kind="classification", template=template, label_column=label_column, verbalizer=verbalizer)


@dataclass(frozen=True)
class Encoded:
    """One token sequence with its loss mask (IGNORE_INDEX where no loss is taken)."""

    input_ids: list[int]
    labels: list[int]


def encode(tokenizer: Any, prompt: str, target: str, max_length: int, add_eos: bool) -> Encoded:
    """Tokenize prompt+target; loss on target tokens only; the prompt is cut from the
    left when too long so the target always fits."""
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    target_ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    if add_eos and tokenizer.eos_token_id is not None:
        target_ids = [*target_ids, tokenizer.eos_token_id]
    if not target_ids:
        raise DataError(f"target {target!r} tokenizes to nothing")
    target_ids = target_ids[: max(1, max_length - 1)]
    prompt_ids = prompt_ids[-(max_length - len(target_ids)):] if max_length > len(target_ids) else []
    return Encoded(prompt_ids + target_ids, [IGNORE_INDEX] * len(prompt_ids) + target_ids)


def encode_for_training(task: TaskSpec, tokenizer: Any, row: Record, max_length: int) -> Encoded:
    """The sequence a row trains on: its prompt and its gold target."""
    target = task.target(row) if task.kind == "instruction" else " " + task.target(row)
    return encode(tokenizer, task.prompt(row), target, max_length, add_eos=task.kind == "instruction")


def encode_candidates(task: TaskSpec, tokenizer: Any, row: Record, max_length: int) -> list[Encoded]:
    """One sequence per label word (classification scoring), in verbalizer order."""
    prompt = task.prompt(row)
    return [encode(tokenizer, prompt, " " + word, max_length, add_eos=False) for word in task.verbalizer.values()]


def collate(batch: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch into input_ids / attention_mask / labels tensors."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
