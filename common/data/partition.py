"""Split one data set across virtual clients.

Specs: `iid`, `dirichlet:ALPHA` (label skew) and `natural:COLUMN` (one client per
distinct value of COLUMN, e.g. a hospital or branch id). `iid` and `natural` use
flwr-datasets' partitioners. `dirichlet` gives every client the same number of rows and
draws each client's label mix from Dirichlet(ALPHA) (Hsu et al. 2019; as
flwr-datasets' InnerDirichletPartitioner, which fails at small alpha), so label skew never turns into one client
holding most of the data. Partitioning is deterministic for a given seed, so every
simulation worker computes the same split independently.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedpeft.common.data.records import Record
from fedpeft.common.errors import PartitionError


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
            if not 0 < alpha < float("inf"):
                raise PartitionError(f"partition {text!r}: alpha must be a finite number > 0")
            return cls("dirichlet", alpha=alpha)
        if kind == "natural" and arg:
            return cls("natural", column=arg)
        raise PartitionError(f"unknown partition {text!r}; use iid, dirichlet:ALPHA or natural:COLUMN")

    def __str__(self) -> str:
        return {"iid": "iid", "dirichlet": f"dirichlet:{self.alpha:g}", "natural": f"natural:{self.column}"}[self.kind]


def partition_records(rows: Sequence[Record], num_partitions: int, spec: PartitionSpec,
                      label_column: str, seed: int) -> list[list[Record]]:
    """All partitions of `rows`, one list per client."""
    if num_partitions < 1:
        raise PartitionError(f"need at least one client, got {num_partitions}")
    if len(rows) < num_partitions:
        raise PartitionError(f"{len(rows)} records cannot be split across {num_partitions} clients")
    key = {"iid": None, "dirichlet": label_column, "natural": spec.column}[spec.kind]
    if key is not None:
        lacking = [i for i, r in enumerate(rows) if r.get(key) is None]
        if lacking:
            raise PartitionError(f"{spec} needs column {key!r}, which record {lacking[0]} lacks")
    if spec.kind == "dirichlet":
        indices = label_skewed_split([str(r[label_column]) for r in rows], num_partitions, spec.alpha, seed)
    else:
        indices = _flwr_split(rows, num_partitions, spec, key, seed)
    return [[rows[i] for i in part] for part in indices]


def label_skewed_split(labels: Sequence[str], num_partitions: int, alpha: float, seed: int) -> list[list[int]]:
    """Row indices of `num_partitions` equal-size clients, each with a Dirichlet(alpha) label mix.

    flwr-datasets' DirichletPartitioner splits each label's rows across clients, so at a
    small alpha a few clients get nearly everything, and its `min_partition_size` only
    re-samples up to 10 times before giving up (at alpha 0.1, 10 clients, two labels it
    cannot reach 20 rows a client); its InnerDirichletPartitioner fixes the sizes but
    fails with NaN probabilities for alpha < 0.1, where NumPy's Dirichlet draws exact
    zeros. Here clients fill up one after another in a seeded random order, each row
    taking a label from the client's mix among the labels with rows left (in proportion to
    the rows left once the mix's labels have run out). The price: the last client takes
    the others' leftovers, so even a large alpha leaves it skewed (its share of the
    majority label is off by ~0.2 at alpha 100 on balanced binary labels); interleaving
    the clients instead blends the skew of small alphas away once a label runs out.
    """
    rng = np.random.default_rng(seed)
    classes = sorted(set(labels))
    pools = [rng.permutation([i for i, y in enumerate(labels) if y == c]).tolist() for c in classes]
    left = np.array([len(pool) for pool in pools], dtype=float)
    mixes = rng.dirichlet(np.full(len(classes), alpha), size=num_partitions)
    sizes = np.full(num_partitions, len(labels) // num_partitions)
    sizes[:len(labels) % num_partitions] += 1
    parts: list[list[int]] = [[] for _ in range(num_partitions)]
    order = rng.permutation(num_partitions)
    for client in np.repeat(order, sizes[order]):
        weights = mixes[client] * (left > 0)
        if not weights.any():
            weights = left
        label = rng.choice(len(classes), p=weights / weights.sum())
        left[label] -= 1
        parts[client].append(pools[label][int(left[label])])
    return parts


def _flwr_split(rows: Sequence[Record], num_partitions: int, spec: PartitionSpec, key: str | None,
                seed: int) -> list[list[int]]:
    """Row indices per client from flwr-datasets' IID or natural-id partitioner."""
    from datasets import Dataset
    from flwr_datasets.partitioner import IidPartitioner, NaturalIdPartitioner

    # flwr-datasets partitions an Arrow table; only the row index and the column the
    # split depends on go into it (as text), so rows with ragged or mixed-type columns
    # come back exactly as they were read.
    table = {"row": list(range(len(rows)))}
    if key is not None:
        table[key] = [str(r[key]) for r in rows]
    dataset = Dataset.from_dict(table)
    if spec.kind == "iid":
        partitioner = IidPartitioner(num_partitions=num_partitions)
        dataset = dataset.shuffle(seed=seed)
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
            return [partitioner.load_partition(p)["row"] for p in range(num_partitions)]
    except ValueError as exc:
        raise PartitionError(f"cannot partition {len(rows)} records as {spec} across {num_partitions} clients: {exc}") from exc
