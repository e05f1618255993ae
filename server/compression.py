"""The server side of compressed deltas: encode the broadcast, decode each reply's update.

Clients reply with their *update* encoded by the run's upload codec
(`fedpeft.common.codecs.mod`); the server decodes it against the method's layout (the
reply's node's, with per-client ranks), adds it to the exact global delta that node was
sent and hands the strategy an ordinary delta, so validation, clipping, robust bounds
and every aggregation mode work on compressed runs unchanged. A reply that does not
decode completely is refused with the reason and costs only that client's update.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord

from fedpeft.common.codecs import Codec, CodecError, decode, encode, payload_nbytes
from fedpeft.common.codecs.mod import ENCODED_ARRAY, MAX_DOWNLINK_BYTES, codec_config, encoded_record, payload_of
from fedpeft.common.codecs.wire import decode_flat
from fedpeft.common.errors import FederationError
from fedpeft.common.protocol.deltas import DeltaSpec, TensorSpec
from fedpeft.common.protocol.flower_io import delta_from_arrayrecord, delta_to_arrayrecord, record_bytes


@dataclass(frozen=True)
class Compression:
    """A run's codecs (either may be None: that direction travels as plain fp32 arrays)."""

    upload: Codec | None = None
    download: Codec | None = None
    error_feedback: bool = True
    stochastic_rounding: bool = True
    seed: int = 0
    """The run's seed: with the client's partition and the round, it seeds stochastic rounding."""

    @classmethod
    def from_names(cls, upload: str, download: str, error_feedback: bool = True,
                   stochastic_rounding: bool = True, seed: int = 0) -> Compression | None:
        up = None if upload == "none" else Codec.parse(upload, "compression.upload")
        down = None if download == "none" else Codec.parse(download, "compression.download")
        if up is None and down is None:
            return None
        return cls(up, down, error_feedback, stochastic_rounding, seed)

    def config(self) -> dict[str, str | bool | int]:
        """What each train message's config tells clients."""
        return codec_config(self.upload, self.download, self.error_feedback, self.stochastic_rounding, self.seed)

    def encode_broadcast(self, record: ArrayRecord) -> ArrayRecord:
        """The global delta `record` in the download codec (deterministic rounding: every client gets the same)."""
        assert self.download is not None
        values = OrderedDict((n, t.float().numpy()) for n, t in delta_from_arrayrecord(record).items())
        try:
            payload, _ = encode(self.download, values)
        except CodecError as exc:
            raise FederationError(f"cannot encode the global delta with compression.download "
                                  f"{self.download.name!r}: {exc}") from None
        if len(payload) > MAX_DOWNLINK_BYTES:
            raise FederationError(f"the encoded global delta has {len(payload)} bytes, more than clients accept "
                                  f"({MAX_DOWNLINK_BYTES})")
        return encoded_record(payload)

    def wire_spec(self, spec: DeltaSpec) -> DeltaSpec:
        """What an upload looks like as tensors: the spec sealed envelopes are opened against."""
        assert self.upload is not None
        return payload_spec(self.upload, spec)

    def decode_reply(self, record: ArrayRecord, sent: Mapping[str, torch.Tensor], spec: DeltaSpec,
                     max_bytes: int) -> OrderedDict[str, torch.Tensor]:
        """The delta a reply stands for: the global delta its node was sent plus its decoded update."""
        assert self.upload is not None
        update = decode(payload_of(record), self.upload, _layout(spec), max_bytes)
        return OrderedDict((n, (sent[n].float() + torch.from_numpy(np.ascontiguousarray(u))).to(spec.tensors[n].dtype))
                           for n, u in update.items())


class FlatDelta(Mapping[str, torch.Tensor]):
    """A delta as one float32 vector `flat` in `spec`'s layout: a plain reply that travelled as
    one fp32 buffer (`FLAT_UPLOAD_KEY`; read-only, no copy: the coordinator's fold reads it
    in place), or the folded mean on its way to being published. A tensor, a view of
    `flat`, is made each time something asks for one (not kept: a round holding a thousand
    replies would otherwise hold 120,000 tensor objects)."""

    def __init__(self, flat: np.ndarray, spec: DeltaSpec) -> None:
        self.flat = flat
        self.spec = spec
        self._whole: torch.Tensor | None = None

    def __getitem__(self, name: str) -> torch.Tensor:
        start, stop, shape = self.spec.flat_layout[name]
        if self._whole is None:
            with warnings.catch_warnings():  # torch warns that a view is read-only: readers only read
                warnings.simplefilter("ignore", UserWarning)
                self._whole = torch.from_numpy(self.flat)
        return self._whole[start:stop].view(shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self.spec.tensors)

    def __len__(self) -> int:
        return len(self.spec.tensors)


def travels_flat(spec: DeltaSpec) -> bool:
    """Whether `spec`'s delta can travel as a flat upload: every tensor float32."""
    return all(s.dtype == torch.float32 for s in spec.tensors.values())


def payload_spec(codec: Codec, spec: DeltaSpec) -> DeltaSpec:
    """`spec`'s delta encoded with `codec`, as tensors: one uint8 payload of the exact size."""
    return DeltaSpec(OrderedDict({ENCODED_ARRAY: TensorSpec((payload_nbytes(codec, _layout(spec)),), torch.uint8)}))


def decode_flat_reply(record: ArrayRecord, spec: DeltaSpec, max_bytes: int) -> FlatDelta:
    """A flat upload's delta, checked against `spec` (layout and size; its values are the
    caller's to check); anything else raises CodecError naming what differs."""
    return FlatDelta(decode_flat(payload_of(record), spec.shapes, max_bytes), spec)


def plain_nbytes(spec: DeltaSpec) -> int:
    """Bytes of `spec`'s delta as the plain ArrayRecord an uncompressed run sends (.npy headers included)."""
    key = tuple((n, s.shape, str(s.dtype)) for n, s in spec.tensors.items())
    if key not in _PLAIN_NBYTES:
        empty = OrderedDict((n, torch.empty(s.shape, dtype=s.dtype)) for n, s in spec.tensors.items())
        _PLAIN_NBYTES[key] = record_bytes(delta_to_arrayrecord(empty))
    return _PLAIN_NBYTES[key]


_PLAIN_NBYTES: dict[tuple, int] = {}


def _layout(spec: DeltaSpec) -> OrderedDict[str, tuple[int, ...]]:
    return OrderedDict((n, s.shape) for n, s in spec.tensors.items())
