"""Exact decoding of Flower `Array`s serialized as `.npy` bytes; torch-free (the deployment's
ClientApp imports it)."""

from __future__ import annotations

import functools
import io
import math

import numpy as np
from flwr.app import Array

from fedpeft.common.errors import DeltaError

_V1_MAGIC = b"\x93NUMPY\x01\x00"


@functools.lru_cache(maxsize=1024)
def _v1_header(header: bytes) -> tuple[tuple[int, ...], bool, np.dtype, str]:
    """numpy's own parse of a version-1.0 `.npy` header (shape, fortran order, dtype).

    A delta's tensors repeat the same few headers in every reply; numpy parses each with
    `ast.literal_eval` (about 50 µs), which would dominate decoding a reply. The same
    header bytes always parse to the same result, so each distinct header is parsed once
    (bounded: 1,024 headers of at most numpy's 10,000-byte limit; a peer sending new
    headers only costs the parse it would cost anyway).
    """
    stream = io.BytesIO(_V1_MAGIC + len(header).to_bytes(2, "little") + header)
    np.lib.format.read_magic(stream)
    shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
    return shape, fortran, dtype, str(dtype)


def exact_npy(name: str, array: Array) -> np.ndarray:
    """The array whose `.npy` bytes say exactly what the Array's declared dtype and shape say
    (where it declares them).

    `np.load` reads as many bytes as a (possibly tampered) header asks for and ignores the
    rest, so a flipped header byte would decode to a shifted array. Written by hand
    because numpy has no strict loader: the header is parsed with numpy's own (safe,
    pickle-free) reader, then dtype, shape, order and the byte count are all checked.
    """
    if array.stype != "numpy.ndarray":
        raise DeltaError(f"{name}: unsupported serialization {array.stype!r}")
    data = array.data
    if data[:8] == _V1_MAGIC and len(data) >= 10:  # what numpy writes for every delta: header parsed once per layout
        offset = 10 + int.from_bytes(data[8:10], "little")
        if len(data) < offset:
            raise DeltaError(f"{name}: cannot decode array (truncated header)")
        try:
            shape, fortran, dtype, dtype_name = _v1_header(bytes(data[10:offset]))
        except Exception as exc:  # any decoding failure of peer-supplied bytes is the peer's fault
            raise DeltaError(f"{name}: cannot decode array ({exc})") from exc
    else:
        stream = io.BytesIO(data)
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
        offset = stream.tell()
        dtype_name = str(dtype)
    if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None:
        raise DeltaError(f"{name}: not a numeric array (dtype {dtype})")
    # Flower's legacy Parameters path (the SecAgg+ workflow's broadcast) declares nothing
    # (dtype "", shape ()): then the header is checked against the byte count and, by the
    # caller, against the method's spec.
    declared = bool(array.dtype) or bool(tuple(array.shape))
    if declared and (dtype_name != str(array.dtype) or tuple(shape) != tuple(array.shape)):
        raise DeltaError(f"{name}: .npy header says {dtype} {tuple(shape)}, the record says "
                         f"{array.dtype} {tuple(array.shape)}")
    if any(not isinstance(d, int) or d < 0 for d in shape):
        raise DeltaError(f"{name}: .npy header has an invalid shape {tuple(shape)}")
    expected = math.prod(shape) * dtype.itemsize
    if len(array.data) - offset != expected:
        raise DeltaError(f"{name}: {len(array.data) - offset} data bytes, but {dtype} {tuple(shape)} needs {expected}")
    try:
        flat = np.frombuffer(array.data, dtype=dtype, count=math.prod(shape), offset=offset)
        return flat.reshape(shape, order="F" if fortran else "C")
    except (ValueError, TypeError) as exc:  # defence in depth: numpy's own refusal, as the peer's fault
        raise DeltaError(f"{name}: cannot decode array ({exc})") from exc


@functools.lru_cache(maxsize=1024)
def _v1_prefix(descr: str, shape: tuple[int, ...]) -> bytes:
    """The magic and version-1.0 header numpy's `np.save` writes for a C-ordered array, by
    numpy's own writer (a ValueError where the header needs version 2.0)."""
    stream = io.BytesIO()
    np.lib.format.write_array_header_1_0(stream, {"descr": descr, "fortran_order": False, "shape": shape})
    return stream.getvalue()


def npy_array(ndarray: np.ndarray) -> Array:
    """A Flower Array of `ndarray`: the same `.npy` bytes as `Array(ndarray)`, which writes each
    tensor through `np.save` (about 50 µs of header formatting a tensor, 6 ms for a LoRA
    delta's 120 tensors on every aggregate). A delta repeats the same few headers, so each
    distinct one is written once, by numpy's own header writer; the data is the array's
    bytes in C order, as `np.save` writes them (tested byte for byte against Flower's)."""
    dtype = ndarray.dtype
    if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None or dtype.kind in "mM":
        return Array(ndarray)  # (numpy's own errors and formats for what deltas never are)
    if not ndarray.flags.c_contiguous:
        ndarray = np.ascontiguousarray(ndarray)  # (a 0-d array is contiguous: it keeps its shape)
    shape = tuple(int(d) for d in ndarray.shape)
    try:
        prefix = _v1_prefix(np.lib.format.dtype_to_descr(dtype), shape)
    except ValueError:  # a header beyond version 1.0's 64 KiB
        return Array(ndarray)
    return Array(dtype=str(dtype), shape=shape, stype="numpy.ndarray", data=b"".join((prefix, ndarray.data)))
