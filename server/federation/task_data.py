"""The task and its rows for one run: one function, whichever driver runs it.

The server always holds the held-out rows it scores each round. A simulation also
holds the training rows it partitions over its virtual clients; a deployment's clients
hold their own.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fedpeft.common.data.builtin_task import builtin_splits, builtin_task
from fedpeft.common.data.records import Record, TaskSpec, infer_task, parse_verbalizer, read_records

if TYPE_CHECKING:
    from fedpeft.server.federation.spec import TaskSection

log = logging.getLogger("fedpeft.server")
HELD_OUT_FRACTION = 0.1


@dataclass(frozen=True)
class TaskData:
    task: TaskSpec
    train_rows: list[Record]
    """Rows the simulation partitions over its clients (empty without `task.train_data` in a deployment)."""
    eval_rows: list[Record]


def load_task_data(section: TaskSection, seed: int, *, with_train: bool = True) -> TaskData:
    """The task spec, training rows (when `with_train`) and held-out rows `section` names.

    No file: the built-in task (independently seeded train and held-out splits). A training
    file without an eval file: a seeded 10% of it is held out. Limits subsample, seeded.
    """
    rng = random.Random(seed)
    train: list[Record] = []
    if section.train_data is None and section.eval_data is not None:  # a deployment: the server's held-out file
        held_out = read_records(Path(section.eval_data))
        task = infer_task(held_out, kind=section.kind, template=section.template, labels=section.labels,
                          label_column=section.label_column)
    elif section.train_data is None:  # the built-in task (held-out rows independent of the training rows)
        train, held_out = builtin_splits(section.builtin_train_rows if with_train else 1,
                                         max(section.eval_limit, 200), seed)
        train = train if with_train else []
        task = builtin_task()
        if section.labels or section.template:
            task = TaskSpec(kind="classification", template=section.template or task.template,
                            verbalizer=parse_verbalizer(section.labels) if section.labels else task.verbalizer)
    else:
        train = read_records(Path(section.train_data))
        task = infer_task(train, kind=section.kind, template=section.template, labels=section.labels,
                          label_column=section.label_column)
        if section.eval_data:
            held_out = read_records(Path(section.eval_data))
        else:  # no separate file: hold out a seeded share of the data on the server
            rng.shuffle(train)
            cut = max(1, int(len(train) * HELD_OUT_FRACTION))
            held_out, train = train[:cut], train[cut:]
            log.info("no task.eval_data: holding out %d of %d rows for evaluation", cut, cut + len(train))
    if section.train_limit and len(train) > section.train_limit:
        train = rng.sample(train, section.train_limit)
    if section.eval_limit and len(held_out) > section.eval_limit:  # its own stream: train_limit does not move it
        held_out = random.Random(seed).sample(held_out, section.eval_limit)
    if train:
        task.check_rows(train, section.train_data or "built-in training data")
    task.check_rows(held_out, section.eval_data or section.train_data or "built-in held-out data")
    return TaskData(task=task, train_rows=train, eval_rows=held_out)
