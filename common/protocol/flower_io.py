"""The one boundary between fedpeft deltas/configs and Flower's message records."""

from __future__ import annotations

import json
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord

from fedpeft.common.errors import ConfigError, DeltaError
from fedpeft.common.protocol.npy import exact_npy, npy_array


def delta_to_arrayrecord(delta: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Pack a delta as a Flower ArrayRecord (numpy .npy bytes per tensor, no pickle)."""
    record = ArrayRecord()
    for name, tensor in delta.items():  # (not ArrayRecord(dict): it would build every Array twice)
        record[name] = npy_array(tensor.detach().cpu().numpy())
    return record


def delta_from_arrayrecord(record: ArrayRecord, max_bytes: int | None = None,
                           copy: bool = True) -> OrderedDict[str, torch.Tensor]:
    """Unpack an ArrayRecord into a delta; undecodable, inconsistent or oversized arrays raise DeltaError.

    Without `copy` the tensors are read-only views of the record's bytes (decoding is then
    one header parse per tensor): for a caller that only reads them, while the record lives.
    """
    size = record_bytes(record)
    if max_bytes is not None and size > max_bytes:
        raise DeltaError(f"delta of {size} bytes exceeds the limit of {max_bytes} bytes")
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    if copy:
        for name, array in record.items():
            out[name] = _tensor(name, array, copy)
        return out
    with warnings.catch_warnings():  # torch warns that a view is read-only: the caller only reads
        warnings.simplefilter("ignore", UserWarning)
        for name, array in record.items():
            out[name] = _tensor(name, array, copy)
    return out


def _tensor(name: str, array: Array, copy: bool) -> torch.Tensor:
    ndarray = exact_npy(name, array)
    if ndarray.dtype.kind not in "fiub":
        raise DeltaError(f"{name}: not a numeric array (dtype {ndarray.dtype})")
    if not ndarray.dtype.isnative:
        raise DeltaError(f"{name}: non-native byte order {ndarray.dtype.str!r}")
    try:
        return torch.from_numpy(ndarray.copy() if copy else ndarray)
    except (TypeError, ValueError) as exc:
        raise DeltaError(f"{name}: dtype {ndarray.dtype} has no tensor equivalent ({exc})") from exc


def record_bytes(record: ArrayRecord) -> int:
    """Payload bytes of an ArrayRecord (what crosses the wire for its tensors)."""
    return sum(len(array.data) for array in record.values())


def json_to_config(key: str, value: Any) -> ConfigRecord:
    """Wrap a JSON-serializable object in a ConfigRecord under `key`."""
    return ConfigRecord({key: json.dumps(value, sort_keys=True)})


def config_json(config: ConfigRecord, key: str) -> Any:
    """Read back a JSON object stored by `json_to_config`."""
    if key not in config:
        raise ConfigError(f"message config has no {key!r} entry")
    try:
        return json.loads(str(config[key]))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"message config entry {key!r} is not valid JSON: {exc}") from exc
