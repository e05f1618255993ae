"""Per-round records of a run: metrics.jsonl rows and the global delta checkpoint.

Both are written atomically after each round, so a killed server leaves a consistent
run dir (the last completed round) behind.
"""

from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from fedpeft.common.errors import FederationError
from fedpeft.common.protocol.deltas import load_delta_file, save_delta_file

log = logging.getLogger("fedpeft.server")

METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"


class RunRecorder:
    """Appends one JSON row per round to metrics.jsonl and checkpoints the global delta."""

    def __init__(self, out_dir: Path, resume_from: int | None = None) -> None:
        """Start a fresh record, or (resume_from=R) keep rounds 0..R and drop the rest."""
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.out_dir / METRICS_FILE
        self.rows: list[dict[str, Any]] = []
        if resume_from is not None:
            self.rows = [r for r in read_rows(self.metrics_path) if r["round"] <= resume_from]
        self.metrics_path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in self.rows))

    @staticmethod
    def checkpoint_path_in(out_dir: Path, server_round: int) -> Path:
        return out_dir / CHECKPOINT_DIR / f"global-round-{server_round:04d}.safetensors"

    def checkpoint_path(self, server_round: int) -> Path:
        return self.checkpoint_path_in(self.out_dir, server_round)

    def load_checkpoint(self, server_round: int, order: Iterable[str] | None = None) -> OrderedDict[str, torch.Tensor]:
        """The global delta after `server_round`, in `order` when given (safetensors does not
        keep a file's order; `order` must name exactly its tensors)."""
        delta = load_delta_file(self.checkpoint_path(server_round))
        if order is None:
            return delta
        names = list(order)
        if sorted(names) != sorted(delta):
            raise FederationError(f"{self.checkpoint_path(server_round)} holds other tensors than the adapter's")
        return OrderedDict((name, delta[name]) for name in names)

    def save_checkpoint(self, server_round: int, delta: Mapping[str, torch.Tensor]) -> Path:
        path = self.checkpoint_path(server_round)
        save_delta_file(delta, path, metadata={"round": str(server_round)})
        return path

    def record(self, row: Mapping[str, Any]) -> None:
        """Append a round's row (flushed and fsynced: survives a crash right after)."""
        self.rows.append(dict(row))
        with self.metrics_path.open("a") as fh:
            fh.write(json.dumps(row, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl (a torn last line from a crash is ignored)."""
    rows = []
    if Path(path).is_file():
        for line in Path(path).read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return rows


def last_completed_round(out_dir: Path) -> int | None:
    """The last round with both a metrics row and a global checkpoint (rows are written
    after checkpoints, so a row implies its checkpoint), or None for an empty run dir."""
    rows = read_rows(Path(out_dir) / METRICS_FILE)
    completed = None
    for expected, row in enumerate(rows):
        path = Path(out_dir) / CHECKPOINT_DIR / f"global-round-{expected:04d}.safetensors"
        if row.get("round") != expected or not path.is_file():
            break
        completed = expected
    return completed
