"""Dense value codecs for flat float32 arrays: fp32, fp16, bf16, blockwise int8, blockwise 4-bit.

Each quantizer turns `m` float32 values into a fixed number of bytes (`nbytes(m)`, known
before encoding, so a payload's layout follows from its tensor shapes alone) and back.

- `fp16`, `bf16`: a cast (bf16 rounds to nearest even on the float32 bits; numpy has no
  bfloat16 type).
- `int8`: symmetric absmax per block of 256 values, codes in [-127, 127], float32 scales.
- `nf4`, `fp4`: bitsandbytes' 4-bit data types (the NF4 quantiles of QLoRA and bnb's FP4
  e2m1 table, both copied from `bitsandbytes.functional.get_4bit_type`), absmax per block
  of 64 values, two codes a byte with the first in the high nibble: byte-for-byte what
  `bitsandbytes.functional.quantize_4bit` produces on the CPU (a test checks it).

Written with numpy rather than calling bitsandbytes because the deployment's ClientApp
(`fedpeft.client.flower_app`) encodes and decodes without torch, and a 4-bit delta is a
few MB. Given a `numpy.random.Generator`, int8 and 4-bit codes round stochastically
(to one of the two nearest levels with probabilities that make the decoded value
unbiased), so quantization errors of many clients average out instead of adding up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedpeft.common.errors import DeltaError

INT8_BLOCK = 256
FOUR_BIT_BLOCK = 64
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], dtype=np.float32)
FP4_LEVELS = np.array([
    0.0, 0.0052083334885537624, 0.6666666865348816, 1.0, 0.3333333432674408, 0.5, 0.1666666716337204, 0.25,
    -0.0, -0.0052083334885537624, -0.6666666865348816, -1.0, -0.3333333432674408, -0.5, -0.1666666716337204,
    -0.25], dtype=np.float32)
"""Decoded value of each 4-bit code (index = code), as bitsandbytes defines them."""


class CodecError(DeltaError):
    """An encoded delta is malformed, or a value cannot be encoded with the chosen codec."""


@dataclass(frozen=True)
class Quantizer:
    """One dense value codec: a name, its bytes for m values, encode and decode."""

    name: str
    lossless: bool

    def nbytes(self, m: int) -> int:
        if self.name == "fp32":
            return 4 * m
        if self.name in ("fp16", "bf16"):
            return 2 * m
        if self.name == "int8":
            return m + 4 * math.ceil(m / INT8_BLOCK)
        return (m + 1) // 2 + 4 * math.ceil(m / FOUR_BIT_BLOCK)  # nf4, fp4

    def encode(self, values: np.ndarray, rng: np.random.Generator | None = None) -> tuple[bytes, np.ndarray]:
        """(the bytes, the values they decode to) of a flat float32 array of finite values."""
        x = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
        if self.name == "fp32":
            return x.tobytes(), x.copy()
        if self.name == "fp16":
            half = x.astype(np.float16)
            if not np.isfinite(half).all():
                raise CodecError(f"a value of magnitude {float(np.abs(x).max()):.3g} overflows fp16 (max 65504); "
                                 "use bf16 or int8")
            return half.tobytes(), half.astype(np.float32)
        if self.name == "bf16":
            bits = x.view(np.uint32)
            rounded = ((bits.astype(np.uint64) + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
            return rounded.tobytes(), _bf16_to_float32(rounded)
        if self.name == "int8":
            return _encode_int8(x, rng)
        return _encode_4bit(x, NF4_LEVELS if self.name == "nf4" else FP4_LEVELS, rng)

    def decode(self, data: memoryview | bytes, m: int, where: str) -> np.ndarray:
        """The float32 values of `data` (exactly `nbytes(m)` bytes); bad scales raise CodecError."""
        if self.name == "fp32":
            return np.frombuffer(data, dtype=np.float32, count=m).copy()
        if self.name == "fp16":
            return np.frombuffer(data, dtype=np.float16, count=m).astype(np.float32)
        if self.name == "bf16":
            return _bf16_to_float32(np.frombuffer(data, dtype=np.uint16, count=m))
        block = INT8_BLOCK if self.name == "int8" else FOUR_BIT_BLOCK
        blocks = math.ceil(m / block)
        scales = np.frombuffer(data, dtype=np.float32, count=blocks)
        bad = np.flatnonzero(~np.isfinite(scales) | (scales < 0))
        if bad.size:
            raise CodecError(f"{where}: bad scale {float(scales[bad[0]])!r} in block {int(bad[0])} "
                             "(scales must be finite and >= 0)")
        if self.name == "int8":
            codes = np.frombuffer(data, dtype=np.int8, count=m, offset=4 * blocks)
            if (codes == -128).any():
                raise CodecError(f"{where}: int8 code -128 is outside the symmetric range [-127, 127]")
            return _scaled(codes.astype(np.float32) / np.float32(127.0), scales, block, m)
        packed = np.frombuffer(data, dtype=np.uint8, count=(m + 1) // 2, offset=4 * blocks)
        codes = np.empty(2 * packed.size, dtype=np.uint8)
        codes[0::2], codes[1::2] = packed >> 4, packed & 0x0F
        levels = NF4_LEVELS if self.name == "nf4" else FP4_LEVELS
        return _scaled(levels[codes[:m]], scales, block, m)


QUANTIZERS: dict[str, Quantizer] = {q.name: q for q in (
    Quantizer("fp32", True), Quantizer("fp16", False), Quantizer("bf16", False), Quantizer("int8", False),
    Quantizer("nf4", False), Quantizer("fp4", False))}


def _scaled(normed: np.ndarray, scales: np.ndarray, block: int, m: int) -> np.ndarray:
    """`normed` (m values) times each block's scale, in place, without a per-value copy of the scales."""
    whole = (m // block) * block
    out = np.empty(m, dtype=np.float32)
    out[:whole] = (normed[:whole].reshape(-1, block) * scales[:m // block, None]).reshape(-1)
    if whole < m:
        out[whole:] = normed[whole:] * scales[-1]
    return out


def _bf16_to_float32(half: np.ndarray) -> np.ndarray:
    return (half.astype(np.uint32) << 16).view(np.float32)


def _blocks(x: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """(x padded to whole blocks as rows, each block's absmax)."""
    rows = math.ceil(x.size / block)
    padded = np.zeros(rows * block, dtype=np.float32)
    padded[:x.size] = x
    padded = padded.reshape(rows, block)
    return padded, np.abs(padded).max(axis=1) if rows else np.zeros(0, dtype=np.float32)


def _encode_int8(x: np.ndarray, rng: np.random.Generator | None) -> tuple[bytes, np.ndarray]:
    padded, absmax = _blocks(x, INT8_BLOCK)
    safe = np.where(absmax > 0, absmax, 1.0).astype(np.float32)
    scaled = padded / safe[:, None] * 127.0
    noise = rng.random(scaled.shape, dtype=np.float32) if rng is not None else 0.5
    codes = np.clip(np.floor(scaled + noise), -127, 127).astype(np.int8).reshape(-1)[:x.size]
    decoded = codes.astype(np.float32) / 127.0 * np.repeat(absmax, INT8_BLOCK)[:x.size]
    return absmax.astype(np.float32).tobytes() + codes.tobytes(), decoded


def _encode_4bit(x: np.ndarray, table: np.ndarray, rng: np.random.Generator | None) -> tuple[bytes, np.ndarray]:
    padded, absmax = _blocks(x, FOUR_BIT_BLOCK)
    safe = np.where(absmax > 0, absmax, 1.0).astype(np.float32)
    normed = (padded / safe[:, None]).reshape(-1)[:x.size]
    order = np.argsort(table, kind="stable")  # fp4's +0 and -0: the stable sort picks code 0
    levels = table[order]
    if rng is None:  # nearest level; ties to the lower one
        upper = np.clip(np.searchsorted(levels, normed), 1, levels.size - 1)
        lower = upper - 1
        pick = np.where(np.abs(levels[upper] - normed) < np.abs(normed - levels[lower]), upper, lower)
    else:  # one of the two neighbours, unbiased
        upper = np.clip(np.searchsorted(levels, normed, side="right"), 1, levels.size - 1)
        lower = upper - 1
        gap = levels[upper] - levels[lower]
        p_up = np.where(gap > 0, (normed - levels[lower]) / np.where(gap > 0, gap, 1.0), 0.0)
        pick = np.where(rng.random(normed.shape, dtype=np.float32) < p_up, upper, lower)
    codes = order[pick].astype(np.uint8)
    decoded = table[codes] * np.repeat(absmax, FOUR_BIT_BLOCK)[:x.size]
    if codes.size % 2:
        codes = np.append(codes, np.uint8(0))
    packed = (codes[0::2] << 4) | codes[1::2]
    return absmax.astype(np.float32).tobytes() + packed.astype(np.uint8).tobytes(), decoded.astype(np.float32)
