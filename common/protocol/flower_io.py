"""The one boundary between fedpeft deltas/configs and Flower's message records."""

from __future__ import annotations

import io
import json
import math
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord

from fedpeft.common.errors import ConfigError, DeltaError


def delta_to_arrayrecord(delta: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Pack a delta as a Flower ArrayRecord (numpy .npy bytes per tensor, no pickle)."""
    return ArrayRecord(OrderedDict((name, Array(np.ascontiguousarray(t.detach().cpu().numpy()))) for name, t in delta.items()))


def delta_from_arrayrecord(record: ArrayRecord, max_bytes: int | None = None) -> OrderedDict[str, torch.Tensor]:
    """Unpack an ArrayRecord into a delta; undecodable, inconsistent or oversized arrays raise DeltaError."""
    size = record_bytes(record)
    if max_bytes is not None and size > max_bytes:
        raise DeltaError(f"delta of {size} bytes exceeds the limit of {max_bytes} bytes")
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for name, array in record.items():
        ndarray = _exact_npy(name, array)
        if ndarray.dtype.kind not in "fiub":
            raise DeltaError(f"{name}: not a numeric array (dtype {ndarray.dtype})")
        if not ndarray.dtype.isnative:
            raise DeltaError(f"{name}: non-native byte order {ndarray.dtype.str!r}")
        try:
            out[name] = torch.from_numpy(ndarray.copy())
        except (TypeError, ValueError) as exc:
            raise DeltaError(f"{name}: dtype {ndarray.dtype} has no tensor equivalent ({exc})") from exc
    return out


def _exact_npy(name: str, array: Array) -> np.ndarray:
    """The array whose `.npy` bytes say exactly what the Array's declared dtype and shape say
    (where it declares them).

    `np.load` reads as many bytes as a (possibly tampered) header asks for and ignores the
    rest, so a flipped header byte would decode to a shifted array. Written by hand
    because numpy has no strict loader: the header is parsed with numpy's own (safe,
    pickle-free) reader, then dtype, shape, order and the byte count are all checked.
    """
    if array.stype != "numpy.ndarray":
        raise DeltaError(f"{name}: unsupported serialization {array.stype!r}")
    stream = io.BytesIO(array.data)
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    except Exception as exc:  # any decoding failure of peer-supplied bytes is the peer's fault
        raise DeltaError(f"{name}: cannot decode array ({exc})") from exc
    if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None:
        raise DeltaError(f"{name}: not a numeric array (dtype {dtype})")
    # Flower's legacy Parameters path (the SecAgg+ workflow's broadcast) declares nothing
    # (dtype "", shape ()): then the header is checked against the byte count and, by the
    # caller, against the method's spec.
    declared = bool(array.dtype) or bool(tuple(array.shape))
    if declared and (str(dtype) != str(array.dtype) or tuple(shape) != tuple(array.shape)):
        raise DeltaError(f"{name}: .npy header says {dtype} {tuple(shape)}, the record says "
                         f"{array.dtype} {tuple(array.shape)}")
    if any(not isinstance(d, int) or d < 0 for d in shape):
        raise DeltaError(f"{name}: .npy header has an invalid shape {tuple(shape)}")
    expected = math.prod(shape) * dtype.itemsize
    offset = stream.tell()
    if len(array.data) - offset != expected:
        raise DeltaError(f"{name}: {len(array.data) - offset} data bytes, but {dtype} {tuple(shape)} needs {expected}")
    try:
        flat = np.frombuffer(array.data, dtype=dtype, count=math.prod(shape), offset=offset)
        return flat.reshape(shape, order="F" if fortran else "C")
    except (ValueError, TypeError) as exc:  # defence in depth: numpy's own refusal, as the peer's fault
        raise DeltaError(f"{name}: cannot decode array ({exc})") from exc


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
