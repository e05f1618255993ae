"""Which full-model block each emulator block is, and which of them are the adapter.

Written next to the emulator as `offsite.json`; plug-in reads it to put the trained
adapter back at the right depth of the full model.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fedpeft.common.errors import ConfigError
from fedpeft.common.files import write_json_atomic

LAYER_MAP_FILE = "offsite.json"
FORMAT = "fedpeft-offsite/1"


@dataclass(frozen=True)
class LayerMap:
    """Emulator block i is full-model block `layers[i]`; `adapter` lists the emulator
    indices of the trainable bottom and top blocks (identical copies of the full model's)."""

    full_layers: int
    bottom: int
    top: int
    keep_every: int
    layers: tuple[int, ...]
    full_fingerprint: str = ""
    """`fedpeft.common.model.base_model.model_fingerprint` of the full model (checked on plug-in)."""
    distill_steps: int = 0
    """Distillation steps the middle blocks got (part of the emulator's fingerprint)."""

    @classmethod
    def plan(cls, full_layers: int, bottom: int, top: int, keep_every: int, full_fingerprint: str = "") -> LayerMap:
        """Keep the bottom and top blocks and every `keep_every`-th middle block (uniform layer drop)."""
        problems = []
        if bottom < 0 or top < 0 or bottom + top < 1:
            problems.append(f"bottom={bottom} and top={top} must be >= 0 with at least one adapter block")
        if keep_every < 1:
            problems.append(f"keep_every={keep_every} must be >= 1 (1 keeps every middle block)")
        if bottom + top >= full_layers:
            problems.append(f"bottom={bottom} + top={top} adapter blocks leave no middle block to emulate in a "
                            f"{full_layers}-block model (need bottom + top < {full_layers})")
        if problems:
            raise ConfigError("offsite layer plan: " + "; ".join(problems))
        middle = list(range(bottom, full_layers - top))[::keep_every]
        layers = (*range(bottom), *middle, *range(full_layers - top, full_layers))
        return cls(full_layers=full_layers, bottom=bottom, top=top, keep_every=keep_every, layers=tuple(layers),
                   full_fingerprint=full_fingerprint)

    def __post_init__(self) -> None:
        n = len(self.layers)
        ok = (self.bottom + self.top < n and all(0 <= i < self.full_layers for i in self.layers)
              and list(self.layers) == sorted(set(self.layers))
              and list(self.layers[:self.bottom]) == list(range(self.bottom))
              and list(self.layers[n - self.top:]) == list(range(self.full_layers - self.top, self.full_layers)))
        if not ok:
            raise ConfigError(f"offsite layer map is inconsistent: layers {list(self.layers)} are not the bottom "
                              f"{self.bottom} and top {self.top} of {self.full_layers} blocks around increasing middle blocks")

    @property
    def emulator_layers(self) -> int:
        return len(self.layers)

    @property
    def adapter(self) -> tuple[int, ...]:
        """Emulator indices of the adapter blocks (trained by clients)."""
        n = len(self.layers)
        return (*range(self.bottom), *range(n - self.top, n))

    @property
    def middle(self) -> tuple[int, ...]:
        """Emulator indices of the compressed middle blocks (frozen, never plugged in)."""
        return tuple(range(self.bottom, len(self.layers) - self.top))

    def to_full(self, emulator_index: int) -> int:
        """The full-model index of an adapter block; middle blocks have no counterpart to plug into."""
        if emulator_index not in self.adapter:
            raise ConfigError(f"emulator block {emulator_index} is not an adapter block (adapter blocks: "
                              f"{list(self.adapter)}); only adapter blocks can be plugged into the full model")
        return self.layers[emulator_index]

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, **asdict(self), "layers": list(self.layers), "adapter": list(self.adapter)}

    def save(self, directory: Path) -> Path:
        path = Path(directory) / LAYER_MAP_FILE
        write_json_atomic(path, self.to_dict())
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> LayerMap:
        if data.get("format") != FORMAT:
            raise ConfigError(f"{source}: not an offsite layer map (format {data.get('format')!r}, expected {FORMAT!r})")
        try:
            return cls(full_layers=int(data["full_layers"]), bottom=int(data["bottom"]), top=int(data["top"]),
                       keep_every=int(data["keep_every"]), layers=tuple(int(i) for i in data["layers"]),
                       full_fingerprint=str(data.get("full_fingerprint", "")),
                       distill_steps=int(data.get("distill_steps", 0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{source}: malformed offsite layer map ({exc!r})") from exc


def read_layer_map(directory: Path) -> LayerMap:
    """The layer map of an emulator dir (written by `build_emulator`)."""
    path = Path(directory) / LAYER_MAP_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{directory} is not an offsite emulator: cannot read {LAYER_MAP_FILE} ({exc})") from exc
    return LayerMap.from_dict(data, str(path))
