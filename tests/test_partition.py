"""Partitioning one data set across clients with flwr-datasets."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from fedpeft.common.data.builtin_task import generate_tickets
from fedpeft.common.data.partition import PartitionSpec, partition_records
from fedpeft.common.errors import PartitionError

ROWS = generate_tickets(400, seed=5)


def _key(row):
    return (row["text"], row["label"], row["branch"])


def test_iid_covers_every_row_once():
    parts = partition_records(ROWS, 4, PartitionSpec.parse("iid"), "label", seed=0)
    assert [len(p) for p in parts] == [100] * 4
    assert Counter(_key(r) for p in parts for r in p) == Counter(_key(r) for r in ROWS)


def test_dirichlet_is_seeded_and_skews_labels():
    spec = PartitionSpec.parse("dirichlet:0.1")
    parts = partition_records(ROWS, 4, spec, "label", seed=3)
    again = partition_records(ROWS, 4, spec, "label", seed=3)
    assert parts == again
    assert sum(len(p) for p in parts) == len(ROWS)
    top_share = [max(Counter(r["label"] for r in p).values()) / len(p) for p in parts]
    assert max(top_share) > 0.6  # alpha=0.1 concentrates labels


def _binary_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    return [{"text": f"row {i}", "label": rng.choice("01")} for i in range(n)]


def test_dirichlet_keeps_every_client_at_an_equal_share():
    # flwr-datasets' DirichletPartitioner gave one of 10 clients 1,465 of 2,000 rows here
    rows = _binary_rows(2000)
    for seed in range(3):
        parts = partition_records(rows, 10, PartitionSpec.parse("dirichlet:0.1"), "label", seed=seed)
        sizes = [len(p) for p in parts]
        assert max(sizes) <= 0.3 * len(rows) and min(sizes) >= len(rows) // 10
        assert Counter(r["text"] for p in parts for r in p) == Counter(r["text"] for r in rows)
        top_share = [max(Counter(r["label"] for r in p).values()) / len(p) for p in parts]
        assert sum(top_share) / len(parts) > 0.8  # still strongly label-skewed


def test_dirichlet_sizes_differ_by_at_most_one_row():
    parts = partition_records(_binary_rows(2003), 10, PartitionSpec.parse("dirichlet:1"), "label", seed=0)
    assert sorted(len(p) for p in parts) == [200] * 7 + [201] * 3


@pytest.mark.parametrize("alpha", [0.001, 0.01])
def test_dirichlet_with_a_tiny_alpha_splits_into_near_single_label_clients(alpha):
    # NumPy draws exact zeros from Dirichlet(alpha < 0.1): labels running out must not break the split
    for seed in range(5):
        parts = partition_records(_binary_rows(400), 4, PartitionSpec.parse(f"dirichlet:{alpha}"), "label", seed=seed)
        assert [len(p) for p in parts] == [100] * 4
        assert sum(max(Counter(r["label"] for r in p).values()) / len(p) for p in parts) / len(parts) > 0.95


def test_natural_partition_by_column():
    parts = partition_records(ROWS, 4, PartitionSpec.parse("natural:branch"), "label", seed=0)
    assert sorted({p[0]["branch"] for p in parts}) == ["east", "north", "south", "west"]
    assert all(len({r["branch"] for r in p}) == 1 for p in parts)


@pytest.mark.parametrize("text", ["dirichlet", "dirichlet:-1", "dirichlet:x", "dirichlet:inf", "natural", "shards:3", "iid:2"])
def test_bad_partition_specs_are_rejected(text):
    with pytest.raises(PartitionError):
        PartitionSpec.parse(text)


def test_impossible_partitions_are_explained():
    with pytest.raises(PartitionError, match="3 distinct values"):
        partition_records(ROWS[:3], 2, PartitionSpec.parse("natural:branch"), "label", seed=0)
    with pytest.raises(PartitionError, match="cannot be split"):
        partition_records(ROWS[:2], 3, PartitionSpec.parse("iid"), "label", seed=0)
    with pytest.raises(PartitionError, match="needs column 'site'"):
        partition_records(ROWS, 2, PartitionSpec.parse("natural:site"), "label", seed=0)


def test_ragged_and_mixed_type_rows_come_back_intact():
    rows = [{"instruction": f"q{i}", "output": "a"} for i in range(6)]
    rows[3]["input"] = "context"  # only some rows have `input`
    rows[4]["score"] = None
    rows[5]["score"] = 2.5
    parts = partition_records(rows, 2, PartitionSpec.parse("iid"), "label", seed=1)
    assert sorted((r for p in parts for r in p), key=lambda r: r["instruction"]) == rows


def test_partition_column_must_exist_in_every_row():
    rows = [{"text": "a", "label": "x"}, {"text": "b"}] * 4
    with pytest.raises(PartitionError, match="record 1 lacks"):
        partition_records(rows, 2, PartitionSpec.parse("dirichlet:1"), "label", seed=0)
