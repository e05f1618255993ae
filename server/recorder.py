"""Per-round records of a run: metrics.jsonl rows and the global delta checkpoint.

Both are written atomically after each round, so a killed server leaves a consistent
run dir (the last completed round) behind.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fedpeft.common.deltas import save_delta_file

log = logging.getLogger("fedpeft.server")

METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"


class RunRecorder:
    """Appends one JSON row per round to metrics.jsonl and checkpoints the global delta."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.out_dir / METRICS_FILE
        self.metrics_path.write_text("")
        self.rows: list[dict[str, Any]] = []

    def checkpoint_path(self, server_round: int) -> Path:
        return self.out_dir / CHECKPOINT_DIR / f"global-round-{server_round:04d}.safetensors"

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
