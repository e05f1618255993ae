"""Split one data set across virtual clients with flwr-datasets' partitioners.

Specs: `iid`, `dirichlet:ALPHA` (label skew; Dirichlet over the label column) and
`natural:COLUMN` (one client per distinct value of COLUMN, e.g. a hospital or branch id).
Partitioning is deterministic for a given seed, so every simulation worker computes
the same split independently.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from fedpeft.common.data.records import Record
from fedpeft.common.errors import PartitionError

MIN_DIRICHLET_PARTITION = 2


@dataclass(frozen=True)
class PartitionSpec:
    """A parsed `--partition` value."""

    kind: str
    alpha: float = 0.0
    column: str = ""

    @classmethod
    def parse(cls, text: str) -> PartitionSpec:
        kind, _, arg = text.partition(":")
        if kind == "iid" and not arg:
            return cls("iid")
        if kind == "dirichlet":
            try:
                alpha = float(arg)
            except ValueError:
                raise PartitionError(f"partition {text!r}: alpha must be a number, e.g. dirichlet:0.5") from None
            if not alpha > 0:
                raise PartitionError(f"partition {text!r}: alpha must be > 0")
            return cls("dirichlet", alpha=alpha)
        if kind == "natural" and arg:
            return cls("natural", column=arg)
        raise PartitionError(f"unknown partition {text!r}; use iid, dirichlet:ALPHA or natural:COLUMN")

    def __str__(self) -> str:
        return {"iid": "iid", "dirichlet": f"dirichlet:{self.alpha:g}", "natural": f"natural:{self.column}"}[self.kind]


def partition_records(rows: Sequence[Record], num_partitions: int, spec: PartitionSpec,
                      label_column: str, seed: int) -> list[list[Record]]:
    """All partitions of `rows`, one list per client."""
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, NaturalIdPartitioner

    if num_partitions < 1:
        raise PartitionError(f"need at least one client, got {num_partitions}")
    if len(rows) < num_partitions:
        raise PartitionError(f"{len(rows)} records cannot be split across {num_partitions} clients")
    # flwr-datasets partitions an Arrow table; only the row index and the column the
    # split depends on go into it (as text), so rows with ragged or mixed-type columns
    # come back exactly as they were read.
    key = {"iid": None, "dirichlet": label_column, "natural": spec.column}[spec.kind]
    if key is not None:
        lacking = [i for i, r in enumerate(rows) if r.get(key) is None]
        if lacking:
            raise PartitionError(f"{spec} needs column {key!r}, which record {lacking[0]} lacks")
    table = {"row": list(range(len(rows)))}
    if key is not None:
        table[key] = [str(r[key]) for r in rows]
    dataset = Dataset.from_dict(table)
    if spec.kind == "iid":
        partitioner = IidPartitioner(num_partitions=num_partitions)
        dataset = dataset.shuffle(seed=seed)
    elif spec.kind == "dirichlet":
        partitioner = DirichletPartitioner(num_partitions=num_partitions, partition_by=label_column, alpha=spec.alpha,
                                           min_partition_size=MIN_DIRICHLET_PARTITION, self_balancing=False, seed=seed)
    else:
        distinct = len(set(table[spec.column]))
        if distinct != num_partitions:
            raise PartitionError(f"natural:{spec.column} has {distinct} distinct values but "
                                 f"{num_partitions} clients were asked for")
        partitioner = NaturalIdPartitioner(partition_by=spec.column)
    partitioner.dataset = dataset
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            parts = [[rows[i] for i in partitioner.load_partition(p)["row"]] for p in range(num_partitions)]
    except ValueError as exc:
        raise PartitionError(f"cannot partition {len(rows)} records as {spec} across {num_partitions} clients: {exc}") from exc
    empty = [i for i, p in enumerate(parts) if not p]
    if empty:
        raise PartitionError(f"partition {spec} left client(s) {empty} without data")
    return parts
