"""This process's memory figures from /proc, for benchmarks that measure a phase's peak."""

from __future__ import annotations

from pathlib import Path


def status_bytes(field: str) -> int:
    """A `/proc/self/status` figure (VmHWM: peak RSS, resettable; VmRSS: current RSS), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so the next peak is the next phase's alone."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
