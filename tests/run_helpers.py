"""Shared steps for tests that read or rewind a run dir."""

from __future__ import annotations

import json
from pathlib import Path


def forget_round(run_dir: Path, server_round: int) -> None:
    """Make the run dir look as if the coordinator died before recording `server_round` and later."""
    metrics = Path(run_dir) / "metrics.jsonl"
    kept = [line for line in metrics.read_text().splitlines() if json.loads(line)["round"] < server_round]
    metrics.write_text("".join(line + "\n" for line in kept))
    for path in (Path(run_dir) / "checkpoints").glob("*-round-*.safetensors"):
        if int(path.stem.rsplit("-", 1)[1]) >= server_round:
            path.unlink()


def split_server_steps(run_dir: Path, server_round: int) -> int:
    """Server-part optimizer steps recorded in the split server's checkpoint of `server_round`."""
    from safetensors import safe_open

    path = Path(run_dir) / "checkpoints" / f"split-server-round-{server_round:04d}.safetensors"
    with safe_open(str(path), "pt") as fh:
        return int(fh.metadata()["steps"])
