"""Per-client data files for a simulation, written once by the driver.

The driver partitions the training set and writes one JSONL file per client in the run
dir, exactly as each client would hold its own file in a deployment. Simulation workers
read only their own partition's file (cached per worker process), so nothing large is
pickled into Flower messages.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from flwr.app import Context

from fedpeft.common.data.records import Record, read_records
from fedpeft.common.errors import DataError

_ROWS_CACHE: dict[str, list[Record]] = {}


def write_partitions(partitions: Sequence[Sequence[Record]], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, rows in enumerate(partitions):
        path = out_dir / f"client-{i}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        paths.append(path)
    return paths


@dataclass(frozen=True)
class PartitionFiles:
    """Data provider: the rows of the client's partition file (`client-{id}.jsonl`)."""

    directory: str

    def __call__(self, context: Context) -> list[Record]:
        if "partition-id" not in context.node_config:
            raise DataError("simulation node has no partition-id in its node config")
        path = Path(self.directory) / f"client-{int(context.node_config['partition-id'])}.jsonl"
        key = str(path)
        if key not in _ROWS_CACHE:
            _ROWS_CACHE[key] = read_records(path)
        return _ROWS_CACHE[key]
