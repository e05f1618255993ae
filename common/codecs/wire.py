"""A compressed delta on the wire: one contiguous buffer, its layout implied by the tensor shapes.

    b"FPDC" | version (1 byte) | 3 zero bytes | header length (uint32 LE) | header (JSON) |
    zero padding to 8 | part | padding to 8 | part | ...

The header names the codec and the tensors in order with their shapes:
`{"codec": "topk:0.1+int8", "tensors": [["name", [384, 8]], ...]}`. Every part's size
follows from the codec and the shape (`tensor_nbytes`), never from the payload, so the
decoder knows the exact total length before it reads a value: a truncated or padded
payload, another codec than the run's, another layout than the method's, non-finite or
negative scales, indices out of range, repeated or unsorted, and NaN/Inf after decoding
are all refused with the tensor and the reason. Per tensor, in spec order:

- dense codec: the quantizer's bytes of all values (`fedpeft.common.codecs.quantizers`);
- `topk:F` (+ a quantizer, fp32 by default): k = ceil(F x n) positions of the largest
  magnitudes, as a bitmap (ceil(n / 8) bytes, bit i of byte i // 8 little-endian) when
  that is smaller than k uint32 indices, else the k indices ascending; then the quantizer's
  bytes of those k values in index order.

Written by hand: safetensors or Flower's ArrayRecord would carry the parts, but neither
checks that they are consistent with each other (a bitmap with k bits set, k values).
"""

from __future__ import annotations

import functools
import json
import math
import struct
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fedpeft.common.codecs.quantizers import QUANTIZERS, CodecError, Quantizer

MAGIC = b"FPDC"
VERSION = 1
PREFIX = struct.Struct("<4sB3xI")
MAX_HEADER_BYTES = 8 * 1024 * 1024
MAX_TENSORS = 100_000
MAX_NAME_CHARS = 1024
ALIGN = 8


@dataclass(frozen=True)
class Codec:
    """A parsed codec: optional top-k sparsification, then a dense quantizer of the values kept."""

    quantizer: Quantizer
    topk: float | None = None

    @classmethod
    def parse(cls, text: str, where: str = "codec") -> Codec:
        """`fp16`, `bf16`, `int8`, `nf4`, `fp4`, `fp32`, or `topk:F` optionally followed by
        `+QUANTIZER` (`topk:0.1+int8`); F in (0, 1]."""
        if not isinstance(text, str) or not text:
            raise CodecError(f"{where}: expected a codec name, got {text!r:.60}")
        head, _, tail = text.partition("+")
        if head.startswith("topk:"):
            try:
                fraction = float(head[5:])
            except ValueError:
                raise CodecError(f"{where} {text!r}: top-k fraction must be a number, e.g. topk:0.1") from None
            if not (0 < fraction <= 1) or not math.isfinite(fraction):
                raise CodecError(f"{where} {text!r}: top-k fraction must be in (0, 1]")
            name = tail or "fp32"
            if name not in QUANTIZERS:
                raise CodecError(f"{where} {text!r}: unknown value codec {name!r}; choose one of {sorted(QUANTIZERS)}")
            return cls(QUANTIZERS[name], fraction)
        if tail or head not in QUANTIZERS:
            raise CodecError(f"{where} {text!r}: unknown codec; use one of {sorted(QUANTIZERS)} or topk:F[+CODEC]")
        return cls(QUANTIZERS[head])

    @property
    def name(self) -> str:
        if self.topk is None:
            return self.quantizer.name
        # repr: the shortest text that parses back to the same float, so a client that re-parses the
        # name keeps exactly as many values as the server expects
        return f"topk:{self.topk!r}" + ("" if self.quantizer.name == "fp32" else f"+{self.quantizer.name}")

    @property
    def lossless(self) -> bool:
        return self.topk is None and self.quantizer.lossless

    def kept(self, n: int) -> int:
        """Values sent of a tensor of n values."""
        return n if self.topk is None else min(n, max(1, math.ceil(self.topk * n))) if n else 0

    def tensor_nbytes(self, n: int) -> int:
        """Bytes of one tensor's part (before alignment)."""
        k = self.kept(n)
        return _index_nbytes(n, k) + self.quantizer.nbytes(k) if self.topk is not None else self.quantizer.nbytes(n)


def _uses_bitmap(n: int, k: int) -> bool:
    return math.ceil(n / 8) <= 4 * k


def _index_nbytes(n: int, k: int) -> int:
    return math.ceil(n / 8) if _uses_bitmap(n, k) else 4 * k


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _header(codec: Codec, layout: Mapping[str, tuple[int, ...]]) -> bytes:
    header = json.dumps({"codec": codec.name, "tensors": [[n, list(s)] for n, s in layout.items()]},
                        separators=(",", ":")).encode()
    return PREFIX.pack(MAGIC, VERSION, len(header)) + header


def payload_nbytes(codec: Codec, layout: Mapping[str, tuple[int, ...]]) -> int:
    """The exact size of an encoded delta with this layout."""
    return _aligned(len(_header(codec, layout))) + sum(_aligned(codec.tensor_nbytes(math.prod(s)))
                                                       for s in layout.values())


def encode(codec: Codec, values: Mapping[str, np.ndarray],
           rng: np.random.Generator | None = None) -> tuple[bytes, OrderedDict[str, np.ndarray]]:
    """(the payload, what each tensor decodes to) of float32 `values`; non-finite input raises CodecError."""
    layout = OrderedDict((name, tuple(int(d) for d in np.shape(v))) for name, v in values.items())
    out = bytearray(_header(codec, layout))
    out += bytes(_aligned(len(out)) - len(out))
    decoded: OrderedDict[str, np.ndarray] = OrderedDict()
    for name, array in values.items():
        x = np.ascontiguousarray(array, dtype=np.float32).reshape(-1)
        if not np.isfinite(x).all():
            raise CodecError(f"{name}: cannot encode non-finite values")
        part, dec = _encode_tensor(codec, x, rng)
        out += part + bytes(_aligned(len(part)) - len(part))
        decoded[name] = dec.reshape(layout[name])
    return bytes(out), decoded


def _encode_tensor(codec: Codec, x: np.ndarray, rng: np.random.Generator | None) -> tuple[bytes, np.ndarray]:
    if codec.topk is None:
        return codec.quantizer.encode(x, rng)
    n, k = x.size, codec.kept(x.size)
    index = np.sort(np.argpartition(-np.abs(x), k - 1)[:k]) if 0 < k < n else np.arange(k)
    data, values = codec.quantizer.encode(x[index], rng)
    if _uses_bitmap(n, k):
        bits = np.zeros(n, dtype=bool)
        bits[index] = True
        index_bytes = np.packbits(bits, bitorder="little").tobytes()
    else:
        index_bytes = index.astype("<u4").tobytes()
    dense = np.zeros(n, dtype=np.float32)
    dense[index] = values
    return index_bytes + data, dense


def decode(payload: bytes | memoryview, codec: Codec, expected: Mapping[str, tuple[int, ...]] | None = None,
           max_bytes: int | None = None) -> OrderedDict[str, np.ndarray]:
    """The float32 tensors of `payload`, checked completely: the codec must be `codec`, the
    layout `expected` (None: as the header says, within the size limit) and every value finite."""
    view = memoryview(payload).cast("B")
    if max_bytes is not None and len(view) > max_bytes:
        raise CodecError(f"encoded delta of {len(view)} bytes exceeds the limit of {max_bytes} bytes")
    if len(view) < PREFIX.size:
        raise CodecError(f"encoded delta of {len(view)} bytes is shorter than its {PREFIX.size}-byte prefix")
    magic, version, header_len = PREFIX.unpack_from(view)
    if magic != MAGIC or version != VERSION:
        raise CodecError(f"not a fedpeft encoded delta (magic {magic!r}, version {version}; expected {MAGIC!r}, {VERSION})")
    if header_len > min(MAX_HEADER_BYTES, len(view) - PREFIX.size):
        raise CodecError(f"encoded delta header of {header_len} bytes does not fit its {len(view)}-byte payload")
    raw_header = bytes(view[PREFIX.size:PREFIX.size + header_len])
    layout, name = _parse_header(raw_header)
    if name != codec.name:
        raise CodecError(f"delta encoded with codec {name!r}, but this run uses {codec.name!r}")
    if expected is not None and dict(layout) != {k: tuple(v) for k, v in expected.items()}:
        raise CodecError(f"encoded delta layout differs from the method's: {_layout_difference(layout, expected)}")
    if list(layout) != list(expected or layout):
        raise CodecError("encoded delta tensors are not in the method's order")
    if raw_header != _header(codec, layout)[PREFIX.size:]:  # the offsets below assume the canonical header
        raise CodecError("encoded delta header is not in canonical form (compact JSON, as the encoder writes it)")
    need = payload_nbytes(codec, layout)
    if len(view) != need:
        raise CodecError(f"encoded delta is {len(view)} bytes, but codec {codec.name!r} with this layout needs exactly {need}")
    offset = _aligned(PREFIX.size + header_len)
    out: OrderedDict[str, np.ndarray] = OrderedDict()
    for tensor, shape in layout.items():
        n = math.prod(shape)
        size = codec.tensor_nbytes(n)
        try:
            values = _decode_tensor(codec, view[offset:offset + size], n, tensor)
        except (ValueError, TypeError) as exc:  # defence in depth: the sizes above make this unreachable
            raise CodecError(f"{tensor}: cannot decode ({exc})") from None
        if not np.isfinite(values).all():
            raise CodecError(f"{tensor}: {int(np.isnan(values).sum())} NaN and {int(np.isinf(values).sum())} Inf "
                             "values after decoding")
        out[tensor] = values.reshape(shape)
        offset += _aligned(size)
    return out


FP32 = Codec(QUANTIZERS["fp32"])
"""The lossless codec a plain (uncompressed) upload travels in: one buffer, float32 values."""


def encode_fp32(values: Mapping[str, np.ndarray]) -> bytes:
    """An fp32 payload of float32 `values` exactly as they are, non-finite ones included:
    a plain upload carries what the client trained, and the server, not the client,
    judges it (a NaN reply is refused there with its reason, like any other bad reply)."""
    layout = OrderedDict((name, tuple(int(d) for d in np.shape(v))) for name, v in values.items())
    out = bytearray(_header(FP32, layout))
    out += bytes(_aligned(len(out)) - len(out))
    for name, array in values.items():
        if np.asarray(array).dtype != np.float32:
            raise CodecError(f"{name}: an fp32 payload carries float32 values, not {np.asarray(array).dtype}")
        part = np.ascontiguousarray(array, dtype="<f4").tobytes()
        out += part + bytes(_aligned(len(part)) - len(part))
    return bytes(out)


@functools.lru_cache(maxsize=256)
def _fp32_frame(layout: tuple[tuple[str, tuple[int, ...]], ...]) -> tuple[bytes, int, int] | None:
    """(the canonical header, the offset of the first value, the payload size) of an fp32
    payload with this layout whose parts are contiguous (even sizes: no padding between
    them); None where padding would split the values."""
    if any(math.prod(shape) % 2 for _, shape in layout):
        return None
    ordered = OrderedDict(layout)
    header = _header(FP32, ordered)
    return header, _aligned(len(header)), payload_nbytes(FP32, ordered)


def decode_flat(payload: bytes | memoryview, expected: tuple[tuple[str, tuple[int, ...]], ...],
                max_bytes: int | None = None) -> np.ndarray:
    """All float32 values of an fp32 payload with exactly the `expected` layout ((name, shape)
    pairs in order), as one read-only vector viewing `payload` (no copy, values not yet
    checked: the caller checks them in one pass). The header must be the canonical one for
    `expected`, byte for byte, and the size exact; anything else is refused as `decode`
    refuses it. Layouts whose parts are padded apart take `decode` and are concatenated."""
    view = memoryview(payload).cast("B")
    frame = _fp32_frame(expected)
    if frame is None or bytes(view[:len(frame[0])]) != frame[0]:
        # the general decoder names what differs (codec, layout, order, form, size)
        values = decode(view, FP32, OrderedDict(expected), max_bytes)
        return np.concatenate([v.reshape(-1) for v in values.values()]) if values else np.empty(0, np.float32)
    header, start, size = frame
    if max_bytes is not None and len(view) > max_bytes:
        raise CodecError(f"encoded delta of {len(view)} bytes exceeds the limit of {max_bytes} bytes")
    if len(view) != size:
        raise CodecError(f"encoded delta is {len(view)} bytes, but codec 'fp32' with this layout needs exactly {size}")
    return np.frombuffer(view, dtype="<f4", count=(size - start) // 4, offset=start)


def _decode_tensor(codec: Codec, data: memoryview, n: int, where: str) -> np.ndarray:
    if codec.topk is None:
        return codec.quantizer.decode(data, n, where)
    k = codec.kept(n)
    index_size = _index_nbytes(n, k)
    if _uses_bitmap(n, k):
        packed = np.frombuffer(data, dtype=np.uint8, count=index_size)
        bits = np.unpackbits(packed, bitorder="little")
        if bits[n:].any():
            raise CodecError(f"{where}: top-k bitmap marks positions beyond the tensor's {n} values")
        index = np.flatnonzero(bits[:n])
        if index.size != k:
            raise CodecError(f"{where}: top-k bitmap marks {index.size} positions, the codec sends exactly {k}")
    else:
        index = np.frombuffer(data, dtype="<u4", count=k).astype(np.int64)
        if k and int(index.max()) >= n:
            raise CodecError(f"{where}: top-k index {int(index.max())} out of range for {n} values")
        if k > 1 and not (np.diff(index) > 0).all():
            raise CodecError(f"{where}: top-k indices are repeated or not ascending")
    dense = np.zeros(n, dtype=np.float32)
    dense[index] = codec.quantizer.decode(data[index_size:], k, where)
    return dense


def _parse_header(raw: bytes) -> tuple[OrderedDict[str, tuple[int, ...]], str]:
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CodecError(f"encoded delta header is not valid JSON ({exc})") from None
    if not isinstance(header, dict) or set(header) != {"codec", "tensors"}:
        raise CodecError("encoded delta header must be an object with exactly 'codec' and 'tensors'")
    name, tensors = header["codec"], header["tensors"]
    if not isinstance(name, str) or not isinstance(tensors, list) or len(tensors) > MAX_TENSORS:
        raise CodecError(f"encoded delta header: 'codec' must be text and 'tensors' a list of at most {MAX_TENSORS}")
    layout: OrderedDict[str, tuple[int, ...]] = OrderedDict()
    for i, entry in enumerate(tensors):
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)
                and 0 < len(entry[0]) <= MAX_NAME_CHARS and isinstance(entry[1], list) and len(entry[1]) <= 8
                and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**31 for d in entry[1])):
            raise CodecError(f"encoded delta header: tensors[{i}] must be [name, [dims >= 0]] (got {entry!r:.80})")
        if entry[0] in layout:
            raise CodecError(f"encoded delta header names tensor {entry[0]!r} twice")
        layout[entry[0]] = tuple(entry[1])
    return layout, name


def _layout_difference(layout: Mapping[str, Sequence[int]], expected: Mapping[str, Sequence[int]]) -> str:
    missing = [n for n in expected if n not in layout]
    extra = [n for n in layout if n not in expected]
    shapes = [f"{n} {tuple(layout[n])} != {tuple(expected[n])}" for n in expected
              if n in layout and tuple(layout[n]) != tuple(expected[n])]
    parts = ([f"missing {missing[:4]}"] if missing else []) + ([f"unexpected {extra[:4]}"] if extra else []) + shapes[:4]
    return "; ".join(parts)
