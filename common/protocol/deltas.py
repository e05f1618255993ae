"""PEFT deltas: extract the trainable tensors, (de)serialize them, apply them back.

A delta is an ordered `{name: tensor}` mapping of exactly the tensors a method trains.
Every apply validates names, shapes, dtypes and finiteness first and reports *all*
problems (which tensor, and why), so a malformed update is rejected before any
parameter is touched. On disk and in checkpoints deltas are safetensors.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from fedpeft.common.errors import DeltaError
from fedpeft.common.files import atomic_write_bytes

MAX_PROBLEMS_SHOWN = 8


@dataclass(frozen=True)
class TensorSpec:
    """Expected shape and dtype of one delta tensor."""

    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class DeltaSpec:
    """The exact set of tensors (with shapes and dtypes) a valid delta must contain."""

    tensors: Mapping[str, TensorSpec]

    @classmethod
    def of_model(cls, model: nn.Module, names: Iterable[str]) -> DeltaSpec:
        params = dict(model.named_parameters())
        missing = [n for n in names if n not in params]
        if missing:
            raise DeltaError(f"model has no parameter(s) {missing[:MAX_PROBLEMS_SHOWN]}")
        return cls(OrderedDict((n, TensorSpec(tuple(params[n].shape), params[n].dtype)) for n in names))

    @classmethod
    def of_delta(cls, delta: Mapping[str, torch.Tensor]) -> DeltaSpec:
        return cls(OrderedDict((n, TensorSpec(tuple(t.shape), t.dtype)) for n, t in delta.items()))

    @functools.cached_property
    def shapes(self) -> tuple[tuple[str, tuple[int, ...]], ...]:
        """(name, shape) of every tensor in order: hashable, computed once per spec."""
        return tuple((name, tuple(s.shape)) for name, s in self.tensors.items())

    @functools.cached_property
    def flat_layout(self) -> OrderedDict[str, tuple[int, int, tuple[int, ...]]]:
        """Each tensor's (start, stop, shape) in one flat vector of all values, in spec order
        (the layout of a flat upload and of the coordinator's running sum)."""
        layout: OrderedDict[str, tuple[int, int, tuple[int, ...]]] = OrderedDict()
        offset = 0
        for name, tensor_spec in self.tensors.items():
            size = _numel(tensor_spec.shape)
            layout[name] = (offset, offset + size, tuple(tensor_spec.shape))
            offset += size
        return layout

    @property
    def num_parameters(self) -> int:
        return sum(_numel(s.shape) for s in self.tensors.values())

    @property
    def num_bytes(self) -> int:
        return sum(_numel(s.shape) * torch.empty((), dtype=s.dtype).element_size() for s in self.tensors.values())

    def problems(self, delta: Mapping[str, object], check_values: bool = True) -> list[str]:
        """Everything wrong with `delta` against this spec (empty when valid); without
        `check_values`, only its names, shapes and dtypes (for a caller that checks the
        values itself in one pass)."""
        found: list[str] = []
        for name in self.tensors:
            if name not in delta:
                found.append(f"{name}: missing")
        for name, tensor in delta.items():
            spec = self.tensors.get(name)
            if spec is None:
                found.append(f"{name}: unexpected tensor (not part of this method's delta)")
            elif not isinstance(tensor, torch.Tensor):
                found.append(f"{name}: is a {type(tensor).__name__}, not a tensor")
            elif tuple(tensor.shape) != spec.shape:
                found.append(f"{name}: shape {tuple(tensor.shape)} != expected {spec.shape}")
            elif tensor.dtype != spec.dtype:
                found.append(f"{name}: dtype {tensor.dtype} != expected {spec.dtype}")
            elif check_values and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                nan = int(torch.isnan(tensor).sum())
                inf = int(torch.isinf(tensor).sum())
                found.append(f"{name}: {nan} NaN and {inf} Inf values")
        return found

    def validate(self, delta: Mapping[str, object], source: str = "delta", check_values: bool = True) -> None:
        """Raise `DeltaError` listing every problem of `delta`."""
        found = self.problems(delta, check_values)
        if found:
            shown = "; ".join(found[:MAX_PROBLEMS_SHOWN])
            more = f" (+{len(found) - MAX_PROBLEMS_SHOWN} more)" if len(found) > MAX_PROBLEMS_SHOWN else ""
            raise DeltaError(f"invalid {source}: {shown}{more}")


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def extract_delta(model: nn.Module, names: Iterable[str]) -> OrderedDict[str, torch.Tensor]:
    """Copies (detached, on CPU, contiguous) of the named parameters of `model`."""
    params = dict(model.named_parameters())
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for name in names:
        if name not in params:
            raise DeltaError(f"model has no parameter {name!r}")
        out[name] = params[name].detach().to("cpu", copy=True).contiguous()
    return out


@torch.no_grad()
def apply_delta(model: nn.Module, delta: Mapping[str, torch.Tensor], spec: DeltaSpec, source: str = "delta") -> None:
    """Validate `delta` against `spec`, then copy it into `model`'s parameters exactly."""
    spec.validate(delta, source)
    params = dict(model.named_parameters())
    for name, tensor in delta.items():
        params[name].copy_(tensor.to(params[name].device))


def delta_to_bytes(delta: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """Serialize a delta with safetensors (no pickle; exact bits)."""
    return st_save({k: v.contiguous() for k, v in delta.items()}, metadata=dict(metadata or {}))


def delta_from_bytes(data: bytes, max_bytes: int | None = None) -> OrderedDict[str, torch.Tensor]:
    """Parse safetensors bytes; truncated or corrupt input raises `DeltaError`."""
    if max_bytes is not None and len(data) > max_bytes:
        raise DeltaError(f"delta of {len(data)} bytes exceeds the limit of {max_bytes} bytes")
    try:
        loaded = st_load(data)
    except Exception as exc:
        raise DeltaError(f"delta is not valid safetensors data ({len(data)} bytes): {exc}") from exc
    return OrderedDict(loaded.items())


def save_delta_file(delta: Mapping[str, torch.Tensor], path: Path, metadata: Mapping[str, str] | None = None) -> None:
    """Write a delta atomically (temp file + rename): a crash never leaves half a file."""
    atomic_write_bytes(path, delta_to_bytes(delta, metadata))


def load_delta_file(path: Path) -> OrderedDict[str, torch.Tensor]:
    """Read a delta written by `save_delta_file` (or any safetensors file)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise DeltaError(f"cannot read delta file {path}: {exc}") from exc
    return delta_from_bytes(data)


class DeltaAccess:
    """`get_delta` / `set_delta` / `trainable_parameters` over `self.model`, `self.delta_names`
    and `self.spec`: shared by `AdaptedModel` and the split parts, which hold the same three."""

    model: nn.Module
    delta_names: list[str]
    spec: DeltaSpec

    def get_delta(self) -> OrderedDict[str, torch.Tensor]:
        return extract_delta(self.model, self.delta_names)

    def set_delta(self, delta: Mapping[str, torch.Tensor], source: str = "delta") -> None:
        apply_delta(self.model, delta, self.spec, source)

    def trainable_parameters(self) -> list[nn.Parameter]:
        params = dict(self.model.named_parameters())
        return [params[n] for n in self.delta_names]
